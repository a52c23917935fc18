//! Retention: after a successful deployment, keep the `N` most recent deployed folders of
//! the same environment and package id, and remove the older ones.
//!
//! What this module keeps true:
//! - the versions counted are the journal entries (in journal order, newest last) of the
//!   same environment and package id whose folder still exists and was not already
//!   removed, failed deployments included; the deployment just made is always one of
//!   the `N` kept;
//! - a folder is only removed when it is exactly `<applications>/<environment>/<package
//!   id>/<name>` after resolving symlinks, so a tampered journal cannot make calamari
//!   remove anything else;
//! - a deployment that never finished (`finished_at` null: still running, or killed) is
//!   counted but never removed;
//! - a folder is first renamed to a hidden name, then deleted, so a removal cut short
//!   never leaves a half-deleted folder under a version's name;
//! - a removal that fails is a warning, not a failed deployment.

use std::fs;
use std::path::{Path, PathBuf};

use crate::console;
use crate::journal::JournalEntry;

/// One folder removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removal {
    /// The journal entry's id.
    pub id: String,
    /// Its version.
    pub version: String,
    /// The folder removed.
    pub path: PathBuf,
}

/// Applies retention for the deployment `current_id` in `entries`, keeping `keep`
/// (at least 1) folders under `applications`. Marks removed entries
/// `removed_by_retention` and prints a line per removal.
pub fn apply(
    entries: &mut [JournalEntry],
    current_id: &str,
    keep: usize,
    applications: &Path,
) -> Vec<Removal> {
    let Some(current) = entries.iter().find(|e| e.id == current_id).cloned() else {
        return Vec::new();
    };
    let keep = keep.max(1);
    // Newest first, the current deployment excluded (it is always kept).
    let others: Vec<usize> = (0..entries.len())
        .rev()
        .filter(|&i| {
            let e = &entries[i];
            e.id != current.id
                && e.environment == current.environment
                && e.package_id == current.package_id
                && !e.removed_by_retention
                && e.extracted_to.as_deref().is_some_and(|p| {
                    p != current.extracted_to.as_deref().unwrap_or(Path::new("")) && p.is_dir()
                })
        })
        .collect();
    let expected_parent = applications
        .join(&current.environment)
        .join(&current.package_id);
    let mut removals = Vec::new();
    for &i in others.iter().skip(keep - 1) {
        let entry = &mut entries[i];
        let Some(path) = entry.extracted_to.clone() else {
            continue;
        };
        if entry.finished_at.is_none() {
            console::info(&format!(
                "Retention: keeping {} ({}): that deployment never finished (still running or killed); remove it by hand when it is not in use",
                path.display(),
                entry.version
            ));
            continue;
        }
        if let Err(why) = check_inside(&path, &expected_parent) {
            console::warn(&format!(
                "retention: not removing {}: {why}",
                path.display()
            ));
            continue;
        }
        match remove(&path) {
            Ok(()) => {
                entry.removed_by_retention = true;
                console::info(&format!(
                    "Retention: removed {} {} ({}), keeping the {keep} most recent",
                    entry.package_id,
                    entry.version,
                    path.display()
                ));
                removals.push(Removal {
                    id: entry.id.clone(),
                    version: entry.version.clone(),
                    path,
                });
            }
            Err(e) => console::warn(&format!(
                "retention: removing {} failed: {e}\nremove the folder by hand",
                path.display()
            )),
        }
    }
    removals
}

/// Checks that `path` is a folder directly inside `expected_parent`, symlinks resolved.
fn check_inside(path: &Path, expected_parent: &Path) -> Result<(), String> {
    let resolved = fs::canonicalize(path).map_err(|e| format!("cannot resolve it: {e}"))?;
    let parent = fs::canonicalize(expected_parent)
        .map_err(|e| format!("cannot resolve {}: {e}", expected_parent.display()))?;
    if resolved.parent() != Some(parent.as_path()) {
        return Err(format!(
            "it is not a version folder inside {} (the applications folder of this deployment)",
            expected_parent.display()
        ));
    }
    let is_dir = fs::symlink_metadata(path).is_ok_and(|m| m.is_dir());
    if !is_dir {
        return Err("it is not a folder".into());
    }
    Ok(())
}

fn remove(path: &Path) -> std::io::Result<()> {
    let parent = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let hidden = parent.join(format!(".calamari-removing-{name}-{}", std::process::id()));
    fs::rename(path, &hidden)?;
    fs::remove_dir_all(&hidden)
}
