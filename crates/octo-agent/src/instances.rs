//! The instance registry: which tentacle instances exist on this machine and where
//! their configuration files are.
//!
//! Location: `$TENTACLE_CONFIG_DIR` when set; else `/etc/octopus/tentacle` for root
//! and `$XDG_CONFIG_HOME/octopus/tentacle` (or `~/.config/...`) for other users.
//! Each instance is one file `instances/NAME.toml` holding the path of its
//! configuration, so instances never contend for one registry file.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::write_atomic;

/// The default instance name.
pub const DEFAULT_INSTANCE: &str = "Tentacle";

/// Registry problems, with what to do about them.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    /// No such instance.
    #[error("there is no tentacle instance named '{name}' (registry {}); create it with `tentacle create-instance --instance {name}`, or list instances with `tentacle list-instances`", dir.display())]
    Unknown {
        /// The instance name.
        name: String,
        /// The registry directory.
        dir: PathBuf,
    },
    /// Already exists.
    #[error("a tentacle instance named '{name}' already exists (configuration {}); use it, or remove it first with `tentacle delete-instance --instance {name}`", config.display())]
    Exists {
        /// The instance name.
        name: String,
        /// Its configuration file.
        config: PathBuf,
    },
    /// The name cannot be used.
    #[error("'{0}' is not a valid instance name: use 1 to 64 letters, digits, '.', '_' or '-'")]
    BadName(String),
    /// File system trouble.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was attempted.
        action: &'static str,
        /// Where.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A registry entry is corrupt.
    #[error("instance registry entry {} does not parse: {message}; delete it or recreate the instance", path.display())]
    Corrupt {
        /// The entry file.
        path: PathBuf,
        /// Why.
        message: String,
    },
}

/// One registered instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// Its name.
    pub name: String,
    /// Its configuration file.
    pub config: PathBuf,
}

/// The registry directory of this user.
#[derive(Debug, Clone)]
pub struct Registry {
    dir: PathBuf,
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

impl Registry {
    /// The registry for this process (see the module docs for the location).
    pub fn locate() -> Self {
        Self {
            dir: Self::default_dir(),
        }
    }

    /// A registry in `dir`.
    pub fn at(dir: PathBuf) -> Self {
        Self { dir }
    }

    fn default_dir() -> PathBuf {
        if let Some(d) = std::env::var_os("TENTACLE_CONFIG_DIR").filter(|d| !d.is_empty()) {
            return PathBuf::from(d);
        }
        if is_root() {
            return PathBuf::from("/etc/octopus/tentacle");
        }
        xdg("XDG_CONFIG_HOME", ".config").join("octopus/tentacle")
    }

    /// Where a new instance's home goes by default.
    pub fn default_home(&self, name: &str) -> PathBuf {
        if std::env::var_os("TENTACLE_CONFIG_DIR").is_some_and(|d| !d.is_empty()) {
            return self.dir.join(name).join("home");
        }
        if is_root() {
            return PathBuf::from("/var/lib/octopus/tentacle").join(name);
        }
        xdg("XDG_DATA_HOME", ".local/share")
            .join("octopus/tentacle")
            .join(name)
    }

    /// Where a new instance's configuration goes by default.
    pub fn default_config(&self, name: &str) -> PathBuf {
        self.dir.join(name).join("tentacle.toml")
    }

    /// The registry directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn entry(&self, name: &str) -> PathBuf {
        self.dir.join("instances").join(format!("{name}.toml"))
    }

    /// Checks an instance name.
    pub fn check_name(name: &str) -> Result<(), InstanceError> {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            && !name.starts_with('.');
        if ok {
            Ok(())
        } else {
            Err(InstanceError::BadName(name.to_string()))
        }
    }

    /// The instance called `name`.
    pub fn get(&self, name: &str) -> Result<Instance, InstanceError> {
        Self::check_name(name)?;
        let path = self.entry(name);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(InstanceError::Unknown {
                    name: name.to_string(),
                    dir: self.dir.clone(),
                })
            }
            Err(source) => {
                return Err(InstanceError::Io {
                    action: "read",
                    path,
                    source,
                })
            }
        };
        toml::from_str(&text).map_err(|e| InstanceError::Corrupt {
            path,
            message: e.to_string().trim().replace('\n', " "),
        })
    }

    /// Registers a new instance.
    pub fn add(&self, instance: &Instance) -> Result<(), InstanceError> {
        Self::check_name(&instance.name)?;
        if let Ok(existing) = self.get(&instance.name) {
            return Err(InstanceError::Exists {
                name: existing.name,
                config: existing.config,
            });
        }
        let path = self.entry(&instance.name);
        let text = toml::to_string(instance).map_err(|e| InstanceError::Corrupt {
            path: path.clone(),
            message: e.to_string(),
        })?;
        write_atomic(&path, text.as_bytes(), 0o644).map_err(|source| InstanceError::Io {
            action: "write",
            path,
            source,
        })
    }

    /// Removes an instance's registration (not its files).
    pub fn remove(&self, name: &str) -> Result<Instance, InstanceError> {
        let instance = self.get(name)?;
        let path = self.entry(name);
        fs::remove_file(&path).map_err(|source| InstanceError::Io {
            action: "remove",
            path,
            source,
        })?;
        Ok(instance)
    }

    /// Every registered instance, by name.
    pub fn list(&self) -> Result<Vec<Instance>, InstanceError> {
        let dir = self.dir.join("instances");
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(InstanceError::Io {
                    action: "list",
                    path: dir,
                    source,
                })
            }
        };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(stem) = name.strip_suffix(".toml") {
                if !stem.starts_with('.') {
                    out.push(self.get(stem)?);
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}

fn xdg(var: &str, fallback: &str) -> PathBuf {
    if let Some(d) = std::env::var_os(var).filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(fallback)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_get_list_remove() {
        let dir = tempfile::tempdir().expect("tempdir");
        let reg = Registry::at(dir.path().to_path_buf());
        assert!(reg.list().expect("list").is_empty());
        let a = Instance {
            name: "A".into(),
            config: dir.path().join("a.toml"),
        };
        reg.add(&a).expect("add");
        assert!(matches!(reg.add(&a), Err(InstanceError::Exists { .. })));
        assert_eq!(reg.get("A").expect("get"), a);
        assert_eq!(reg.list().expect("list"), vec![a.clone()]);
        let e = reg.get("B").expect_err("unknown").to_string();
        assert!(e.contains("create-instance --instance B"), "{e}");
        assert!(matches!(reg.get("../x"), Err(InstanceError::BadName(_))));
        assert_eq!(reg.remove("A").expect("remove"), a);
        assert!(reg.list().expect("list").is_empty());
    }
}
