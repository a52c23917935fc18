//! Package extraction: zip or tar.gz, detected by magic bytes, into
//! `<parent>/<version>` (or `<version>_1`, `_2`, ... when taken).
//!
//! What this module keeps true: a package either lands complete in a new folder, or
//! leaves nothing behind. Everything is written into a hidden staging folder beside the
//! target (`<parent>/.calamari-staging-XXXX`, the same file system, so the final rename
//! is atomic), through the [`sandbox::Sandbox`] rules; only when every entry succeeded is
//! the staging folder renamed into place, with `RENAME_NOREPLACE` so two deployments of
//! the same version at once take different folders and never replace each other. On any
//! refusal or error the staging folder is removed, and the target folder and every
//! earlier version are untouched.

pub mod sandbox;
mod tar;
mod zip;

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

pub use sandbox::{Counts, RATIO_FREE_BYTES};

/// The default of `--max-extracted-bytes`: 10 GiB.
pub const DEFAULT_MAX_EXTRACTED_BYTES: u64 = 10 * 1024 * 1024 * 1024;
/// The default of `--max-entries`.
pub const DEFAULT_MAX_ENTRIES: u64 = 100_000;
/// The default of `--max-ratio`.
pub const DEFAULT_MAX_RATIO: u64 = 200;

/// Prefix of the staging folders; folders starting with it are never deployed versions.
pub const STAGING_PREFIX: &str = ".calamari-staging-";

/// Limits against decompression bombs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most bytes written, all files together.
    pub max_extracted_bytes: u64,
    /// Most archive entries (files, folders, links).
    pub max_entries: u64,
    /// Most bytes written per byte of archive, enforced once past
    /// [`RATIO_FREE_BYTES`].
    pub max_ratio: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_extracted_bytes: DEFAULT_MAX_EXTRACTED_BYTES,
            max_entries: DEFAULT_MAX_ENTRIES,
            max_ratio: DEFAULT_MAX_RATIO,
        }
    }
}

/// The package formats calamari extracts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A zip archive (`PK\x03\x04`).
    Zip,
    /// A gzip-compressed tar archive (`\x1f\x8b`).
    TarGz,
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::Zip => "zip",
            Format::TarGz => "tar.gz",
        })
    }
}

/// Why extraction failed.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    /// The package is refused: unsafe, too large, unknown format or corrupt.
    #[error("{}{reason}", entry.as_ref().map(|e| format!("entry {e:?}: ")).unwrap_or_default())]
    Refused {
        /// The entry concerned, if any.
        entry: Option<String>,
        /// Why.
        reason: String,
    },
    /// Reading or writing the file system failed.
    #[error("{what} {} failed: {source}", path.display())]
    Io {
        /// What was being done.
        what: String,
        /// Where.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

impl ExtractError {
    /// A refusal of `entry` (when there is one) because of `reason`.
    pub fn refused(entry: Option<&str>, reason: impl Into<String>) -> Self {
        ExtractError::Refused {
            entry: entry.map(str::to_owned),
            reason: reason.into(),
        }
    }

    /// An I/O failure.
    pub fn io(what: &str, path: &Path, source: io::Error) -> Self {
        ExtractError::Io {
            what: what.to_owned(),
            path: path.to_owned(),
            source,
        }
    }
}

/// A package extracted into its final folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extracted {
    /// The final folder.
    pub path: PathBuf,
    /// The archive format.
    pub format: Format,
    /// What was written.
    pub counts: Counts,
}

impl Format {
    /// The format of an archive whose first bytes are `magic` (at least 4 for a
    /// zip), as [`detect_format`] decides it.
    pub fn of_magic(magic: &[u8]) -> Option<Format> {
        if magic.starts_with(b"PK\x03\x04") {
            Some(Format::Zip)
        } else if magic.starts_with(&[0x1f, 0x8b]) {
            Some(Format::TarGz)
        } else {
            None
        }
    }
}

/// Checks a tar.gz archive read from `archive` as [`extract_package`] would
/// extract it, writing nothing: the gzip stream and its checksums, the tar
/// structure, and every entry against the sandbox's rules (names, links,
/// entry types, limits; `archive_len` is the archive's size for the ratio
/// limit, `u64::MAX` when not known yet). Reads the archive to its end.
pub fn check_tar_gz(
    archive: impl Read,
    archive_len: u64,
    limits: Limits,
) -> Result<Counts, ExtractError> {
    let mut sb = sandbox::Sandbox::check_only(limits, archive_len);
    tar::extract(archive, &mut sb)?;
    sb.finish()
}

/// Checks a zip archive as [`extract_package`] would extract it, writing
/// nothing: its central directory, every entry's data and CRC-32, and every
/// entry against the sandbox's rules (see [`check_tar_gz`]).
pub fn check_zip(
    archive: impl Read + io::Seek,
    archive_len: u64,
    limits: Limits,
) -> Result<Counts, ExtractError> {
    let mut sb = sandbox::Sandbox::check_only(limits, archive_len);
    zip::extract(archive, &mut sb)?;
    sb.finish()
}

/// Detects the format of `package` by its first bytes.
pub fn detect_format(package: &Path) -> Result<Format, ExtractError> {
    let mut file =
        File::open(package).map_err(|e| ExtractError::io("opening the package", package, e))?;
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < magic.len() {
        match file.read(&mut magic[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ExtractError::io("reading the package", package, e)),
        }
    }
    if let Some(format) = Format::of_magic(&magic[..got]) {
        Ok(format)
    } else {
        Err(ExtractError::refused(
            None,
            format!(
                "unknown package format (first bytes {}); calamari extracts zip (PK\\x03\\x04) and tar.gz (\\x1f\\x8b) packages",
                magic[..got]
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        ))
    }
}

/// Extracts `package` into a new folder under `parent` (created if missing) named
/// `version`, or `version_1`, `version_2`, ... when taken.
pub fn extract_package(
    package: &Path,
    parent: &Path,
    version: &str,
    limits: Limits,
) -> Result<Extracted, ExtractError> {
    let format = detect_format(package)?;
    let archive_len = fs::metadata(package)
        .map_err(|e| ExtractError::io("reading the package", package, e))?
        .len();
    fs::create_dir_all(parent).map_err(|e| ExtractError::io("creating the folder", parent, e))?;
    let staging = tempfile::Builder::new()
        .prefix(STAGING_PREFIX)
        .tempdir_in(parent)
        .map_err(|e| ExtractError::io("creating a staging folder in", parent, e))?;
    let file =
        File::open(package).map_err(|e| ExtractError::io("opening the package", package, e))?;
    let mut sb = sandbox::Sandbox::new(staging.path(), limits, archive_len);
    match format {
        Format::Zip => zip::extract(file, &mut sb)?,
        Format::TarGz => tar::extract(file, &mut sb)?,
    }
    let counts = sb.finish()?;
    fs::set_permissions(staging.path(), fs::Permissions::from_mode(0o755))
        .map_err(|e| ExtractError::io("setting permissions of", staging.path(), e))?;
    let path = place(staging.path(), parent, version)?;
    // Renamed away: nothing left for the guard to remove.
    let _ = staging.keep();
    Ok(Extracted {
        path,
        format,
        counts,
    })
}

/// Renames `staging` to the first free name of `version`, `version_1`, ...
fn place(staging: &Path, parent: &Path, version: &str) -> Result<PathBuf, ExtractError> {
    for n in 0..100_000u32 {
        let name = if n == 0 {
            version.to_owned()
        } else {
            format!("{version}_{n}")
        };
        let target = parent.join(name);
        if rename_no_replace(staging, &target)
            .map_err(|e| ExtractError::io("moving the extracted package to", &target, e))?
        {
            return Ok(target);
        }
    }
    Err(ExtractError::io(
        "finding a free folder name for this version in",
        parent,
        io::Error::other("every name up to _99999 is taken"),
    ))
}

/// Renames `from` to `to` unless `to` exists; `Ok(false)` when it does.
fn rename_no_replace(from: &Path, to: &Path) -> io::Result<bool> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use nix::errno::Errno;
        use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
        match renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE) {
            Ok(()) => return Ok(true),
            Err(Errno::EEXIST | Errno::ENOTEMPTY) => return Ok(false),
            // File systems without RENAME_NOREPLACE: fall back below.
            Err(Errno::EINVAL | Errno::ENOSYS) => {}
            Err(e) => return Err(e.into()),
        }
    }
    if fs::symlink_metadata(to).is_ok() {
        return Ok(false);
    }
    match fs::rename(from, to) {
        Ok(()) => Ok(true),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(nix::libc::EEXIST | nix::libc::ENOTEMPTY)
            ) =>
        {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}
