//! `deploy-package`: the steps in order. Validate the names, read the variables, hash
//! the package, extract it ([`crate::extract`]), record the deployment in the journal,
//! add the standard variables, substitute ([`crate::substitute`]), run the scripts
//! ([`crate::scripts`]), record the outcome, apply retention ([`crate::retention`]) and
//! announce the installation folder.
//!
//! What this module keeps true: every deployment that got as far as the package is in
//! the journal: a refused or unextractable package with `extracted_to: null`, an
//! extracted one from the moment its folder exists (`finished_at: null` until it ends),
//! then with its outcome. Retention runs only after a success, under the same journal
//! lock as the final record.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use crate::console;
use crate::error::DeployError;
use crate::extract::{self, ExtractError, Limits};
use crate::journal::{Journal, JournalEntry};
use crate::retention;
use crate::scripts;
use crate::service_message::{self, ServiceMessage};
use crate::substitute;
use crate::time;
use crate::variables::{self, Variables};

/// What to deploy, and where. Paths are used as given (the command line makes them
/// absolute).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeployOptions {
    /// The package file (zip or tar.gz).
    pub package: PathBuf,
    /// The package id, a folder name.
    pub package_id: String,
    /// The package version, a folder name.
    pub package_version: String,
    /// The environment name, a folder name.
    pub environment: String,
    /// The variables file (JSON object of strings), if any.
    pub variables_file: Option<PathBuf>,
    /// The applications root.
    pub applications: PathBuf,
    /// The deployment journal.
    pub journal: PathBuf,
    /// How many versions to keep (at least 1).
    pub retention: usize,
    /// Extraction limits.
    pub limits: Limits,
}

/// A successful deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeployOutcome {
    /// The folder the package was extracted to.
    pub installation_dir: PathBuf,
    /// The journal entry's id.
    pub journal_id: String,
    /// The folders retention removed.
    pub removed: Vec<PathBuf>,
}

/// Checks that `value` (what the `flag` gave) is usable as one folder name.
pub fn validate_component(flag: &str, value: &str) -> Result<(), DeployError> {
    let why = if value.is_empty() {
        Some("it is empty")
    } else if value == "." || value == ".." {
        Some("it is `.` or `..`")
    } else if value.contains('/') {
        Some("it contains `/`")
    } else if value.contains('\0') {
        Some("it contains a NUL byte")
    } else if value.starts_with(extract::STAGING_PREFIX) || value.starts_with(".calamari-") {
        Some("names starting with `.calamari-` are reserved")
    } else {
        None
    };
    match why {
        Some(why) => Err(DeployError::usage(format!(
            "{flag} {value:?} cannot be used as a folder name: {why}\npass a plain name such as `Production`, `Acme.Web` or `1.2.3`"
        ))),
        None => Ok(()),
    }
}

/// Runs the deployment described by `opts`, printing progress.
pub fn deploy(opts: &DeployOptions) -> Result<DeployOutcome, DeployError> {
    let clock = Instant::now();
    let started_at = time::now();
    validate_component("--environment", &opts.environment)?;
    validate_component("--package-id", &opts.package_id)?;
    validate_component("--package-version", &opts.package_version)?;
    if opts.retention == 0 {
        return Err(DeployError::usage("--retention must be at least 1"));
    }
    let mut vars = match &opts.variables_file {
        Some(path) => Variables::load(path)?,
        None => Variables::new(),
    };
    // Secret values come only in the environment, never in a file.
    if let Ok(json) = std::env::var(variables::SENSITIVE_VARIABLES_ENV) {
        let secrets = Variables::parse(json.as_bytes()).map_err(|why| {
            DeployError::other(format!(
                "the secret variables in {} are not valid: {why}",
                variables::SENSITIVE_VARIABLES_ENV
            ))
        })?;
        vars.extend(secrets);
    }
    let sha256 = hash_file(&opts.package)?;
    console::info(&format!(
        "Deploying {} {} to {} (calamari {})",
        opts.package_id,
        opts.package_version,
        opts.environment,
        crate::VERSION
    ));
    console::info(&format!(
        "Package {} (sha256 {sha256})",
        opts.package.display()
    ));
    let journal = Journal::new(&opts.journal);
    let mut entry = JournalEntry {
        id: new_id(),
        environment: opts.environment.clone(),
        package_id: opts.package_id.clone(),
        version: opts.package_version.clone(),
        package_file: opts.package.clone(),
        package_sha256: sha256,
        extracted_to: None,
        started_at,
        finished_at: None,
        success: false,
        error: None,
        removed_by_retention: false,
    };

    let parent = opts
        .applications
        .join(&opts.environment)
        .join(&opts.package_id);
    let extracted = match extract::extract_package(
        &opts.package,
        &parent,
        &opts.package_version,
        opts.limits,
    ) {
        Ok(x) => x,
        Err(e) => {
            let err = extraction_error(opts, &parent, e);
            entry.finished_at = Some(time::now());
            entry.error = Some(err.message.clone());
            if let Err(journal_err) = journal.update(|entries| entries.push(entry)) {
                console::warn(&format!(
                    "the failed deployment could not be recorded in the journal: {journal_err}"
                ));
            }
            return Err(err);
        }
    };
    let dir = extracted.path.clone();
    console::info(&format!(
        "Extracted {} ({}): {} files, {} folders, {} symlinks, {} bytes into {}",
        opts.package
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        extracted.format,
        extracted.counts.files,
        extracted.counts.dirs,
        extracted.counts.symlinks,
        extracted.counts.bytes,
        dir.display()
    ));
    entry.extracted_to = Some(dir.clone());
    let id = entry.id.clone();
    journal.update(|entries| entries.push(entry.clone()))?;

    let result = run_steps(opts, &dir, &mut vars);

    let removed = journal.update(|entries| {
        let index = match entries.iter().position(|e| e.id == id) {
            Some(i) => i,
            None => {
                entries.push(entry.clone());
                entries.len() - 1
            }
        };
        let e = &mut entries[index];
        e.finished_at = Some(time::now());
        e.success = result.is_ok();
        e.error = result.as_ref().err().map(|err| err.message.clone());
        if result.is_ok() {
            retention::apply(entries, &id, opts.retention, &opts.applications)
        } else {
            Vec::new()
        }
    });
    result?;
    let removed = removed?;

    console::info(&format!(
        "Deployed {} {} to {} in {} ({})",
        opts.package_id,
        opts.package_version,
        opts.environment,
        dir.display(),
        time::seconds(clock.elapsed())
    ));
    console::info(&service_message::format(&ServiceMessage::set_variable(
        variables::INSTALLATION_DIRECTORY_PATH,
        dir.to_string_lossy(),
    )));
    Ok(DeployOutcome {
        installation_dir: dir,
        journal_id: id,
        removed: removed.into_iter().map(|r| r.path).collect(),
    })
}

/// Standard variables, substitution, scripts.
fn run_steps(opts: &DeployOptions, dir: &Path, vars: &mut Variables) -> Result<(), DeployError> {
    vars.set(variables::ENVIRONMENT_NAME, &opts.environment);
    vars.set(variables::PACKAGE_ID, &opts.package_id);
    vars.set(variables::PACKAGE_VERSION, &opts.package_version);
    vars.set(
        variables::INSTALLATION_DIRECTORY_PATH,
        dir.to_string_lossy(),
    );
    vars.set(variables::PACKAGE_FILE_PATH, opts.package.to_string_lossy());
    let patterns = vars
        .get(variables::SUBSTITUTE_TARGET_FILES)
        .map(substitute::target_patterns)
        .unwrap_or_default();
    if !patterns.is_empty() {
        console::info(&format!(
            "Substituting variables in files matching {}",
            patterns.join(", ")
        ));
        substitute::substitute_in_files(dir, &patterns, vars)?;
    }
    scripts::run_stages(dir, vars)?;
    Ok(())
}

fn extraction_error(opts: &DeployOptions, parent: &Path, e: ExtractError) -> DeployError {
    match e {
        ExtractError::Refused { ref reason, .. } => {
            let hint = if reason.contains("(--max-") {
                "if the package is trusted and really that large, raise the limit named above; otherwise fix the package"
            } else if reason.contains("unknown package format") {
                "build the package as a zip or tar.gz archive"
            } else {
                "fix the package (rebuild it from a clean folder, or upload it again if it was damaged) and deploy again"
            };
            DeployError::refused(format!(
                "the package was refused: {e}\npackage: {}\nnothing was deployed: no folder was created under {} and earlier versions are untouched\n{hint}",
                opts.package.display(),
                parent.display()
            ))
        }
        ExtractError::Io { what, path, source } => DeployError::other(format!(
            "extracting the package failed: {what} {} failed: {source}\npackage: {}\nnothing was deployed; check that the folder is writable by this user and that the disk is not full",
            path.display(),
            opts.package.display()
        )),
    }
}

fn hash_file(path: &Path) -> Result<String, DeployError> {
    let open_error = |e: &io::Error| {
        DeployError::other(format!(
            "reading the package failed: {e}\npackage: {}\ncheck that the file was uploaded to this path and is readable",
            path.display()
        ))
    };
    let mut file = File::open(path).map_err(|e| open_error(&e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(open_error(&e)),
        }
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn new_id() -> String {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    format!("{ms}-{}", std::process::id())
}
