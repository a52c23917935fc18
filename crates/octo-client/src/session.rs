//! The sessions file: the session keys `octopus login` got, one per server, so
//! that later commands need no `--api-key`.
//!
//! It is `$XDG_CONFIG_HOME/octopus/sessions.json` (`~/.config/octopus/` when
//! `XDG_CONFIG_HOME` is unset or not absolute). The directory is created
//! `0700` and the file is only ever written whole: to a new temporary file
//! created `0600` beside it, flushed to disk, then renamed over the old one, so
//! a reader never sees half a file and the key is never readable by others,
//! not even for a moment.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// The file's name in the configuration directory.
const FILE_NAME: &str = "sessions.json";

/// One server's session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Session {
    /// The session key, sent as the API key.
    pub api_key: String,
    /// Who logged in.
    pub username: String,
    /// The key's id on the server.
    pub key_id: i64,
    /// When (Unix ms).
    pub created_at: i64,
}

/// The file's content: sessions by server address (as [`super::http::ApiClient::base`] spells it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Sessions {
    #[serde(default)]
    pub sessions: BTreeMap<String, Session>,
}

/// `$XDG_CONFIG_HOME/octopus`, or `$HOME/.config/octopus`; None when neither
/// is usable. Relative `XDG_CONFIG_HOME` values are ignored, as the XDG base
/// directory specification says.
pub(crate) fn config_dir_from(
    xdg_config_home: Option<OsString>,
    home: Option<OsString>,
) -> Option<PathBuf> {
    let xdg = xdg_config_home
        .map(PathBuf::from)
        .filter(|p| p.is_absolute());
    let base = match xdg {
        Some(p) => p,
        None => PathBuf::from(home.filter(|h| !h.is_empty())?).join(".config"),
    };
    Some(base.join("octopus"))
}

/// The sessions file of this user (from the environment).
pub(crate) fn default_path() -> anyhow::Result<PathBuf> {
    config_dir_from(
        std::env::var_os("XDG_CONFIG_HOME"),
        std::env::var_os("HOME"),
    )
    .map(|d| path_in(&d))
    .context("cannot tell where to keep the session: neither XDG_CONFIG_HOME nor HOME is set")
}

/// The sessions file in configuration directory `dir`.
pub(crate) fn path_in(dir: &Path) -> PathBuf {
    dir.join(FILE_NAME)
}

/// Reads the file; a missing file holds no sessions.
pub(crate) fn load(path: &Path) -> anyhow::Result<Sessions> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Sessions::default()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    if text.trim().is_empty() {
        return Ok(Sessions::default());
    }
    serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a sessions file this version understands; remove it and log in again",
            path.display()
        )
    })
}

/// Writes the file whole (see the module's documentation): the directory
/// `0700`, the file `0600` from its creation, replaced atomically.
pub(crate) fn save(path: &Path, sessions: &Sessions) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .with_context(|| format!("{} has no directory", path.display()))?;
    create_private_dir(dir)?;
    let mut json = serde_json::to_vec_pretty(sessions)?;
    json.push(b'\n');
    let name = path
        .file_name()
        .map_or_else(|| FILE_NAME.into(), |n| n.to_string_lossy().into_owned());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tmp = dir.join(format!(".{name}.{}.{nanos}.tmp", std::process::id()));
    let result = write_new_private(&tmp, &json).and_then(|()| {
        std::fs::rename(&tmp, path)
            .with_context(|| format!("replacing {} with {}", path.display(), tmp.display()))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return result;
    }
    // The rename is durable once the directory is on disk too (best effort).
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Creates `dir` (and its parents) readable by its owner only; an existing
/// `dir` open to others is closed to them.
fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        let meta = std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
        if meta.permissions().mode() & 0o077 != 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("making {} private (chmod 700)", dir.display()))?;
        }
    }
    #[cfg(not(unix))]
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(())
}

/// Creates `path`, which must not exist, with mode 0600 and `bytes`, on disk.
fn write_new_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

/// A warning when the file is open to other users (None when it is private).
pub(crate) fn loose_permissions(path: &Path) -> Option<String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).ok()?.permissions().mode();
        if mode & 0o077 != 0 {
            return Some(format!(
                "warning: {} holds session keys and other users may read it (mode {:o}); run `chmod 600 {}`",
                path.display(),
                mode & 0o777,
                path.display()
            ));
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn session(key: &str, user: &str) -> Session {
        Session {
            api_key: key.into(),
            username: user.into(),
            key_id: 7,
            created_at: 1,
        }
    }

    #[test]
    fn the_directory_follows_xdg_then_home() {
        assert_eq!(
            config_dir_from(Some("/x/cfg".into()), Some("/home/a".into())),
            Some(PathBuf::from("/x/cfg/octopus"))
        );
        // Relative or empty XDG_CONFIG_HOME: ignored.
        for xdg in [Some("rel/cfg".into()), Some(OsString::new()), None] {
            assert_eq!(
                config_dir_from(xdg, Some("/home/a".into())),
                Some(PathBuf::from("/home/a/.config/octopus"))
            );
        }
        assert_eq!(config_dir_from(None, None), None);
        assert_eq!(config_dir_from(None, Some(OsString::new())), None);
    }

    #[test]
    fn a_missing_or_empty_file_holds_no_sessions() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = config_dir_from(Some(tmp.path().into()), None).unwrap();
        let path = path_in(&dir);
        assert_eq!(load(&path).unwrap(), Sessions::default());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(&path, "\n").unwrap();
        assert_eq!(load(&path).unwrap(), Sessions::default());
        std::fs::write(&path, "{oops").unwrap();
        let e = format!("{:#}", load(&path).unwrap_err());
        assert!(e.contains("remove it and log in again"), "{e}");
    }

    #[cfg(unix)]
    #[test]
    fn saved_private_atomically_and_read_back() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let cfg = tmp.path().join("cfg");
        let dir = config_dir_from(Some(cfg.into()), None).unwrap();
        let path = path_in(&dir);

        let mut s = Sessions::default();
        s.sessions
            .insert("http://127.0.0.1:8080".into(), session("k1", "alice"));
        save(&path, &s).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&path), 0o600);
        assert_eq!(load(&path).unwrap(), s);
        assert_eq!(loose_permissions(&path), None);

        // A file left open to others is replaced by a private one (a new inode:
        // the rename), and a directory open to others is closed.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(loose_permissions(&path).unwrap().contains("chmod 600"));
        let before = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(&path).unwrap().ino()
        };
        s.sessions
            .insert("http://other:8080".into(), session("k2", "bob"));
        save(&path, &s).unwrap();
        let after = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(&path).unwrap().ino()
        };
        assert_ne!(
            before, after,
            "the file is replaced, not rewritten in place"
        );
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(load(&path).unwrap().sessions.len(), 2);

        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["sessions.json".to_string()]);

        // Removing the last session leaves an empty, still private file.
        s.sessions.clear();
        save(&path, &s).unwrap();
        assert_eq!(load(&path).unwrap(), Sessions::default());
        assert_eq!(mode(&path), 0o600);
    }

    #[cfg(unix)]
    #[test]
    fn a_failed_write_leaves_the_old_file() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("octopus");
        let path = path_in(&dir);
        let mut s = Sessions::default();
        s.sessions
            .insert("http://h:1".into(), session("k1", "alice"));
        save(&path, &s).unwrap();
        // The target is a directory: the rename fails, the temp file goes.
        let blocked = dir.join("blocked");
        std::fs::create_dir(&blocked).unwrap();
        std::fs::write(blocked.join("x"), "x").unwrap();
        assert!(save(&blocked, &s).is_err());
        let leftovers = std::fs::read_dir(&dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".tmp")
            })
            .count();
        assert_eq!(leftovers, 0);
        assert_eq!(load(&path).unwrap(), s);
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
