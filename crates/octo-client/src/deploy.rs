//! `octopus package ...`, `octopus deploy` and `octopus calamari upgrade`, and
//! the variables of deployments and scripts (`--variable NAME=VALUE`,
//! `--sensitive-variable NAME[=VALUE]`).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use octo_api_types::Package;
use serde_json::{json, Value};

use super::output::{fields, out, out_json, table, time};
use super::{decode, say, Cx, Output};

/// `octopus package ...`
#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum PackageCommand {
    /// Push a package (zip or tar.gz) to the server's feed.
    #[command(
        after_help = "Examples:\n  octopus package push Acme.Web.1.2.3.zip\n  octopus package push build/site.tar.gz --id Acme.Web --version 1.2.4\n\n\
The ID and version come from a file named ID.VERSION.zip or ID.VERSION.tar.gz unless given.\n\
Pushing an ID and version that exist with other content is refused unless --replace."
    )]
    Push {
        /// The package file.
        file: PathBuf,
        /// The package ID (default: from the file name).
        #[arg(long = "id", alias = "package-id")]
        id: Option<String>,
        /// The version (default: from the file name).
        #[arg(long)]
        version: Option<String>,
        /// Replace the same ID and version when its content differs.
        #[arg(long)]
        replace: bool,
    },
    /// List the packages in the feed.
    #[command(
        after_help = "Examples:\n  octopus package list\n  octopus package list --id Acme.Web"
    )]
    List {
        /// Only versions of this package ID.
        #[arg(long = "id", alias = "package-id")]
        id: Option<String>,
    },
    /// Show one version of a package (default: the latest).
    #[command(after_help = "Example:\n  octopus package show Acme.Web 1.2.3")]
    Show {
        /// The package ID.
        id: String,
        /// The version (default: the latest).
        version: Option<String>,
    },
    /// Delete one version of a package from the feed.
    #[command(after_help = "Example:\n  octopus package delete Acme.Web 1.2.3")]
    Delete {
        /// The package ID.
        id: String,
        /// The version.
        version: String,
    },
}

// Options of `octopus deploy`: not a doc comment, which clap would make the command's about (`ClientCommand`).
#[derive(Debug, clap::Args)]
pub struct DeployCliArgs {
    /// The package ID in the feed.
    #[arg(long, value_name = "ID")]
    package: String,
    /// The version (default: the latest in the feed).
    #[arg(long)]
    version: Option<String>,
    /// The environment to deploy to.
    #[arg(long, alias = "env")]
    environment: String,
    /// Only the environment's machines with this role.
    #[arg(long)]
    role: Option<String>,
    /// Only the environment's machines of this tenant.
    #[arg(long)]
    tenant: Option<String>,
    /// A variable NAME=VALUE (repeatable; wins over --variables-file).
    #[arg(long = "variable", short = 'v', value_name = "NAME=VALUE")]
    variables: Vec<String>,
    /// Variables from a JSON object file ({"Name": "value", ...}) or NAME=VALUE lines.
    #[arg(long, value_name = "FILE")]
    variables_file: Option<PathBuf>,
    /// A secret variable (repeatable; wins over --variable): NAME=VALUE, or NAME
    /// alone to take the value from this command's environment variable NAME,
    /// which keeps it out of the process list (`ps`). Its value is never shown
    /// and is masked in the log.
    #[arg(long = "sensitive-variable", value_name = "NAME[=VALUE]")]
    sensitive_variables: Vec<String>,
    /// Extracted versions of the package kept on each machine (default 3).
    #[arg(long)]
    retention: Option<u32>,
    /// A machine whose deployment fails waits for a decision (`octopus task guide`)
    /// instead of failing: retry it, ignore the failure, or fail it.
    #[arg(long)]
    guided_failure: bool,
    /// Machines that run it at once (default: the server's --max-parallel-steps).
    #[arg(long, value_name = "N")]
    max_parallel_steps: Option<u32>,
    /// Print the task's id and return at once instead of following its output.
    #[arg(long)]
    no_wait: bool,
}

/// `octopus calamari ...`
#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum CalamariCommand {
    /// Push the server's deployment tool to machines that do not have its version.
    #[command(
        after_help = "Examples:\n  octopus calamari upgrade\n  octopus calamari upgrade --environment Production\n  octopus calamari upgrade --machine web01 --machine web02"
    )]
    Upgrade {
        /// This machine (repeatable; default: every machine, or those of --environment).
        #[arg(long = "machine", value_name = "NAME", conflicts_with = "environment")]
        machines: Vec<String>,
        /// The machines of this environment.
        #[arg(long, alias = "env")]
        environment: Option<String>,
        /// Print the task's id and return at once.
        #[arg(long)]
        no_wait: bool,
    },
}

/// `octopus tentacle ...`
#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum TentacleCommand {
    /// Upgrade tentacles to the version the server carries: the binary goes
    /// through the file service (hash verified), the tentacle waits for its
    /// running scripts, swaps it in beside a copy of the old one and restarts;
    /// a machine succeeds only when it comes back at the new version (otherwise
    /// the old binary is put back and the machine fails saying why).
    #[command(
        after_help = "Examples:\n  octopus tentacle upgrade --machine web01 --machine web02\n  octopus tentacle upgrade --environment Production --wait-for-scripts 900"
    )]
    Upgrade {
        /// This machine (repeatable).
        #[arg(
            long = "machine",
            value_name = "NAME",
            conflicts_with = "environment",
            required_unless_present = "environment"
        )]
        machines: Vec<String>,
        /// The machines of this environment.
        #[arg(long, alias = "env")]
        environment: Option<String>,
        /// Seconds each tentacle waits for its running scripts before it
        /// refuses the upgrade, naming them (default 300).
        #[arg(long, value_name = "SECONDS")]
        wait_for_scripts: Option<u64>,
        /// Seconds a restarted tentacle has to come back at the new version
        /// before the previous binary is put back (default 120).
        #[arg(long, value_name = "SECONDS")]
        confirm_within: Option<u64>,
        /// Print the task's id and return at once.
        #[arg(long)]
        no_wait: bool,
    },
}

/// Reads variables: a JSON object of strings, or NAME=VALUE lines (# comments).
fn read_variables_file(path: &Path) -> anyhow::Result<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the variables file {}", path.display()))?;
    if text.trim_start().starts_with('{') {
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        let Value::Object(map) = v else {
            anyhow::bail!("{} must hold one JSON object", path.display());
        };
        let mut out = BTreeMap::new();
        for (k, v) in map {
            let value = match v {
                Value::String(s) => s,
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                other => anyhow::bail!(
                    "variable '{k}' in {} must be a string, number or boolean, not {other}",
                    path.display()
                ),
            };
            out.insert(k, value);
        }
        return Ok(out);
    }
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = split_assignment(line).with_context(|| {
            format!("line {} of {}: expected NAME=VALUE", n + 1, path.display())
        })?;
        out.insert(k, v);
    }
    Ok(out)
}

fn split_assignment(s: &str) -> anyhow::Result<(String, String)> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => anyhow::bail!("'{s}' is not NAME=VALUE"),
    }
}

/// The plain and the sensitive variables of a deployment or script: `base`
/// (from a variables file) with `--variable NAME=VALUE` over it, and
/// `--sensitive-variable NAME=VALUE` or `NAME` (the value of the environment
/// variable NAME, looked up with `env`). A sensitive variable takes its name
/// out of the plain ones (ignoring case, as variable names are compared), so
/// its value is never sent in the clear. Errors name the flag and never show a
/// sensitive value.
pub(crate) fn variables_from_args(
    mut plain: BTreeMap<String, String>,
    variables: &[String],
    sensitive_variables: &[String],
    env: impl Fn(&str) -> Option<OsString>,
) -> anyhow::Result<(BTreeMap<String, String>, BTreeMap<String, String>)> {
    for v in variables {
        let (k, val) = split_assignment(v).map_err(|_| {
            anyhow::anyhow!("--variable '{v}': expected NAME=VALUE with a name before the '='")
        })?;
        plain.insert(k, val);
    }
    let mut sensitive = BTreeMap::new();
    for v in sensitive_variables {
        let (name, value) = match v.split_once('=') {
            Some((k, val)) => {
                let k = k.trim();
                if k.is_empty() {
                    anyhow::bail!("--sensitive-variable: a value was given without a name; give NAME=VALUE, or NAME alone to take the value from the environment variable NAME");
                }
                (k.to_string(), val.to_string())
            }
            None => {
                let k = v.trim();
                if k.is_empty() {
                    anyhow::bail!("--sensitive-variable: the name is empty; give NAME=VALUE, or NAME alone to take the value from the environment variable NAME");
                }
                let value = env(k).ok_or_else(|| {
                    anyhow::anyhow!("--sensitive-variable {k}: the environment variable {k} is not set; set it first (e.g. `read -rs {k} && export {k}` reads it without echo), or give {k}=VALUE")
                })?;
                let value = value.into_string().map_err(|_| {
                    anyhow::anyhow!(
                        "--sensitive-variable {k}: the environment variable {k} is not valid UTF-8"
                    )
                })?;
                (k.to_string(), value)
            }
        };
        plain.retain(|p, _| !p.eq_ignore_ascii_case(&name));
        sensitive.insert(name, value);
    }
    Ok((plain, sensitive))
}

fn package_rows(packages: &[Package]) -> String {
    let rows: Vec<_> = packages
        .iter()
        .map(|p| {
            vec![
                p.package_id.clone(),
                p.version.clone(),
                p.format.clone(),
                human_size(p.size),
                p.sha256.chars().take(12).collect(),
                time(p.uploaded_at),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "VERSION",
            "FORMAT",
            "SIZE",
            "SHA-256",
            "UPLOADED (UTC)",
        ],
        &rows,
    )
}

fn human_size(bytes: i64) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.1} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1 << 20) as f64 {
        format!("{:.1} MiB", b / (1 << 20) as f64)
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{bytes} B")
    }
}

impl Cx {
    pub(super) async fn package(&self, c: PackageCommand) -> anyhow::Result<ExitCode> {
        let c_ = &self.client;
        match c {
            PackageCommand::Push {
                file,
                id,
                version,
                replace,
            } => {
                let f = tokio::fs::File::open(&file)
                    .await
                    .with_context(|| format!("opening the package {}", file.display()))?;
                let len = f.metadata().await?.len();
                let name = file
                    .file_name()
                    .and_then(|n| n.to_str())
                    .map(str::to_string);
                let url = c_.space_url(
                    &["packages"],
                    &[
                        ("package_id", id),
                        ("version", version),
                        ("file_name", name),
                        ("replace", replace.then(|| "true".to_string())),
                    ],
                );
                let v: Value = c_
                    .post_file(url, f, len)
                    .await
                    .with_context(|| format!("pushing {}", file.display()))?;
                if self.output == Output::Json {
                    out_json(&v);
                    return Ok(ExitCode::SUCCESS);
                }
                let outcome = v["outcome"].as_str().unwrap_or("").to_string();
                let p: Package = decode(v["package"].clone(), "the pushed package")?;
                let what = match outcome.as_str() {
                    "unchanged" => "is already in the feed with the same content",
                    "replaced" => "replaced the previous content",
                    _ => "pushed",
                };
                out(&format!(
                    "Package {} {} {what} ({}, {}, SHA-256 {}).",
                    p.package_id,
                    p.version,
                    p.format,
                    human_size(p.size),
                    p.sha256
                ));
                Ok(ExitCode::SUCCESS)
            }
            PackageCommand::List { id } => {
                let v: Value = c_
                    .get(c_.space_url(&["packages"], &[("package_id", id)]))
                    .await
                    .context("listing packages")?;
                if self.output == Output::Json {
                    out_json(&v);
                } else {
                    let packages: Vec<Package> = decode(v, "the packages")?;
                    if packages.is_empty() {
                        out("No packages yet; push one with `octopus package push FILE`.");
                    } else {
                        out(&package_rows(&packages));
                    }
                }
                Ok(ExitCode::SUCCESS)
            }
            PackageCommand::Show { id, version } => {
                let version = version.unwrap_or_else(|| "latest".into());
                let v: Value = c_
                    .get(c_.space_url(&["packages", &id, &version], &[]))
                    .await
                    .with_context(|| format!("reading package {id} {version}"))?;
                if self.output == Output::Json {
                    out_json(&v);
                } else {
                    let p: Package = decode(v, "the package")?;
                    out(&fields(&[
                        ("ID", p.package_id.clone()),
                        ("Version", p.version.clone()),
                        ("Format", p.format.clone()),
                        ("Size", format!("{} ({} bytes)", human_size(p.size), p.size)),
                        ("SHA-256", p.sha256.clone()),
                        ("File name", p.file_name.clone()),
                        ("Uploaded (UTC)", time(p.uploaded_at)),
                    ]));
                }
                Ok(ExitCode::SUCCESS)
            }
            PackageCommand::Delete { id, version } => {
                c_.delete(c_.space_url(&["packages", &id, &version], &[]))
                    .await
                    .with_context(|| format!("deleting package {id} {version}"))?;
                say(self.output, &format!("Deleted package {id} {version}."));
                Ok(ExitCode::SUCCESS)
            }
        }
    }

    pub(super) async fn deploy(&self, a: DeployCliArgs) -> anyhow::Result<ExitCode> {
        let from_file = match &a.variables_file {
            Some(f) => read_variables_file(f)?,
            None => BTreeMap::new(),
        };
        let (variables, sensitive) =
            variables_from_args(from_file, &a.variables, &a.sensitive_variables, |name| {
                std::env::var_os(name)
            })?;
        let mut body = json!({
            "package_id": a.package,
            "environment": a.environment,
            "variables": variables,
        });
        // Sent only when given, so that older servers still take the request.
        if !sensitive.is_empty() {
            body["sensitive_variables"] = json!(sensitive);
        }
        for (k, v) in [
            ("version", &a.version),
            ("role", &a.role),
            ("tenant", &a.tenant),
        ] {
            if let Some(v) = v {
                body[k] = json!(v);
            }
        }
        if let Some(r) = a.retention {
            body["retention"] = json!(r);
        }
        if a.guided_failure {
            body["guided_failure"] = json!(true);
        }
        if let Some(n) = a.max_parallel_steps {
            body["max_parallel_steps"] = json!(n);
        }
        let url = self.client.space_url(&["tasks", "deploy"], &[]);
        let followed = self
            .create_and_follow(url, &body, a.no_wait, "deployment")
            .await
            .context("starting the deployment")?;
        Ok(self.exit_of(followed))
    }

    pub(super) async fn calamari(&self, c: CalamariCommand) -> anyhow::Result<ExitCode> {
        let CalamariCommand::Upgrade {
            machines,
            environment,
            no_wait,
        } = c;
        let mut body = json!({ "machines": machines });
        if let Some(e) = &environment {
            body["environment"] = json!(e);
        }
        let url = self.client.space_url(&["tasks", "upgrade"], &[]);
        let followed = self
            .create_and_follow(url, &body, no_wait, "upgrade")
            .await
            .context("starting the deployment tool upgrade")?;
        Ok(self.exit_of(followed))
    }

    pub(super) async fn tentacle(&self, c: TentacleCommand) -> anyhow::Result<ExitCode> {
        let TentacleCommand::Upgrade {
            machines,
            environment,
            wait_for_scripts,
            confirm_within,
            no_wait,
        } = c;
        let mut body = json!({ "machines": machines });
        if let Some(e) = &environment {
            body["environment"] = json!(e);
        }
        if let Some(s) = wait_for_scripts {
            body["wait_for_scripts_s"] = json!(s);
        }
        if let Some(s) = confirm_within {
            body["confirm_within_s"] = json!(s);
        }
        let url = self.client.space_url(&["tasks", "tentacle-upgrade"], &[]);
        let followed = self
            .create_and_follow(url, &body, no_wait, "tentacle upgrade")
            .await
            .context("starting the tentacle upgrade")?;
        Ok(self.exit_of(followed))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn variables_files_are_json_or_assignments() {
        let dir = tempfile::tempdir().unwrap();
        let json_file = dir.path().join("v.json");
        std::fs::write(&json_file, r#"{"A": "1", "B": 2, "C": true}"#).unwrap();
        let v = read_variables_file(&json_file).unwrap();
        assert_eq!(v["A"], "1");
        assert_eq!(v["B"], "2");
        assert_eq!(v["C"], "true");
        let lines = dir.path().join("v.env");
        std::fs::write(&lines, "# comment\nA=x=y\n\nB = z\n").unwrap();
        let v = read_variables_file(&lines).unwrap();
        assert_eq!(v["A"], "x=y");
        assert_eq!(v["B"], " z");
        std::fs::write(&lines, "oops\n").unwrap();
        let e = format!("{:#}", read_variables_file(&lines).unwrap_err());
        assert!(e.contains("line 1"), "{e}");
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn sensitive_variables_come_from_flags_or_the_environment() {
        let env = |name: &str| match name {
            "DbPassword" => Some(OsString::from("s3cret from env")),
            "Empty" => Some(OsString::new()),
            _ => None,
        };
        let base = BTreeMap::from([
            ("FromFile".to_string(), "1".to_string()),
            ("apikey".to_string(), "plain".to_string()),
        ]);
        let (plain, secret) = variables_from_args(
            base,
            &strings(&["Greeting=Hello=World", " Spaced = x", "Blank="]),
            &strings(&["DbPassword", "ApiKey=abc=def", "Empty"]),
            env,
        )
        .unwrap();
        assert_eq!(plain["Greeting"], "Hello=World");
        assert_eq!(plain["Spaced"], " x");
        assert_eq!(plain["Blank"], "");
        assert_eq!(plain["FromFile"], "1");
        // A sensitive variable takes its name out of the plain ones.
        assert!(!plain.contains_key("apikey"), "{plain:?}");
        assert_eq!(secret["DbPassword"], "s3cret from env");
        assert_eq!(secret["ApiKey"], "abc=def");
        assert_eq!(secret["Empty"], "");
    }

    #[test]
    fn malformed_variables_name_the_flag_and_hide_secrets() {
        let none = |_: &str| None;
        for (plain, sensitive, want) in [
            (
                &["NoEquals"][..],
                &[][..],
                "--variable 'NoEquals': expected NAME=VALUE",
            ),
            (&["=x"], &[], "--variable '=x': expected NAME=VALUE"),
            (
                &[],
                &["=hunter2"],
                "--sensitive-variable: a value was given without a name",
            ),
            (&[], &["  "], "--sensitive-variable: the name is empty"),
            (
                &[],
                &["Missing"],
                "--sensitive-variable Missing: the environment variable Missing is not set",
            ),
        ] {
            let e =
                variables_from_args(BTreeMap::new(), &strings(plain), &strings(sensitive), none)
                    .unwrap_err()
                    .to_string();
            assert!(e.starts_with(want), "{e}");
            assert!(!e.contains("hunter2"), "a secret in an error: {e}");
        }
    }
}
