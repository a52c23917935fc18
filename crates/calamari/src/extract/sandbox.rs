//! The sandbox every archive entry is written through, whatever the format.
//!
//! What it keeps true, for a fresh, empty root folder:
//! - nothing is created outside the root: entry names are normalised lexically and
//!   refused when absolute or containing `..`; every parent folder is checked on disk to
//!   be a real folder (never a symlink, so `link -> /etc` then `link/passwd` is refused),
//!   missing ones are created; files are created with `O_CREAT|O_EXCL|O_NOFOLLOW`, so an
//!   entry never writes through anything already there (a second entry of the same name
//!   is refused);
//! - a symlink's target is relative and resolves, lexically from the link's own folder,
//!   inside the root; and no symlink is ever stepped out of with `..` by another link's
//!   target (whichever comes first in the archive), which is what makes the lexical
//!   resolution the same as the kernel's;
//! - a hard link points to a regular file this archive already extracted;
//! - the bytes actually written (never a header's claim) stay within
//!   [`Limits::max_extracted_bytes`], and within [`Limits::max_ratio`] times the archive's
//!   size once past [`RATIO_FREE_BYTES`]; entries (folders implied by paths included:
//!   they are inodes too) stay within [`Limits::max_entries`]; what was written and how
//!   many entries there were is shared through a [`Meter`], so a format reader can bound
//!   the archive's own overhead (headers, long names) against it;
//! - permissions are the archive's bits masked with `0o777` (never setuid, setgid or
//!   sticky); folders always keep owner `rwx` so the tree can be removed later; folder
//!   modes are applied last, deepest first, so a read-only folder does not stop its own
//!   entries from being written.
//!
//! A sandbox without a root ([`Sandbox::check_only`]) writes nothing: it keeps what
//! the entries would have created in memory (which, for a fresh, empty root, is
//! exactly what the checks on disk see) and reads file contents to the end, so the
//! server's feed refuses at push time what calamari would refuse at deployment.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io::{self, ErrorKind as IoKind, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use super::{ExtractError, Limits};

/// Output below this many bytes is never refused by the ratio rule.
pub const RATIO_FREE_BYTES: u64 = 16 * 1024 * 1024;

/// Longest symlink target accepted.
pub const MAX_LINK_TARGET: usize = 4096;

const DEFAULT_DIR_MODE: u32 = 0o755;

/// Counts of what was extracted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Regular files (hard links included).
    pub files: u64,
    /// Folders, explicit or implied.
    pub dirs: u64,
    /// Symbolic links.
    pub symlinks: u64,
    /// Bytes written.
    pub bytes: u64,
}

/// Progress of an extraction, shared with the format reader.
#[derive(Debug, Default)]
pub struct Meter {
    written: Cell<u64>,
    entries: Cell<u64>,
}

impl Meter {
    /// File bytes written so far.
    pub fn written(&self) -> u64 {
        self.written.get()
    }

    /// Entries counted so far.
    pub fn entries(&self) -> u64 {
        self.entries.get()
    }
}

/// Writes entries under `root`, enforcing the rules in the module docs.
#[derive(Debug)]
pub struct Sandbox {
    /// Where entries are written; None: nowhere, only checked.
    root: Option<PathBuf>,
    limits: Limits,
    archive_len: u64,
    meter: Rc<Meter>,
    counts: Counts,
    /// Relative paths of the symlinks created.
    symlinks: HashSet<PathBuf>,
    /// Relative paths of the regular files created (hard link targets).
    regular: HashSet<PathBuf>,
    /// Relative paths of the folders created or checked.
    dirs: HashSet<PathBuf>,
    /// Paths some symlink's target steps out of with `..`, and that link: no symlink
    /// may ever be created at one of them.
    stepped_out_of: HashMap<PathBuf, PathBuf>,
    /// Modes to apply to folders at the end.
    dir_modes: Vec<(PathBuf, u32)>,
}

impl Sandbox {
    /// A sandbox writing under `root` (an empty folder) for an archive of `archive_len`
    /// bytes.
    pub fn new(root: &Path, limits: Limits, archive_len: u64) -> Self {
        Sandbox {
            root: Some(root.to_owned()),
            ..Self::check_only(limits, archive_len)
        }
    }

    /// A sandbox that writes nothing and refuses what [`Sandbox::new`] would.
    pub fn check_only(limits: Limits, archive_len: u64) -> Self {
        Sandbox {
            root: None,
            limits,
            archive_len,
            meter: Rc::default(),
            counts: Counts::default(),
            symlinks: HashSet::new(),
            regular: HashSet::new(),
            dirs: HashSet::new(),
            stepped_out_of: HashMap::new(),
            dir_modes: Vec::new(),
        }
    }

    /// The shared progress meter.
    pub fn meter(&self) -> Rc<Meter> {
        Rc::clone(&self.meter)
    }

    /// Counts one more entry of the archive (named `name`), refusing past the limit.
    pub fn count_entry(&mut self, name: &str) -> Result<(), ExtractError> {
        let entries = self.meter.entries.get() + 1;
        self.meter.entries.set(entries);
        if entries > self.limits.max_entries {
            return Err(ExtractError::refused(
                Some(name),
                format!(
                    "the package has more than {} entries (--max-entries), counting files, folders and links",
                    self.limits.max_entries
                ),
            ));
        }
        Ok(())
    }

    /// Refuses at once an archive that declares more entries than allowed.
    pub fn expect_entries(&self, declared: u64) -> Result<(), ExtractError> {
        if declared > self.limits.max_entries {
            return Err(ExtractError::refused(
                None,
                format!(
                    "the archive has {declared} entries, more than {} (--max-entries)",
                    self.limits.max_entries
                ),
            ));
        }
        Ok(())
    }

    /// Creates a folder (an explicit folder entry) with `mode`.
    pub fn dir(&mut self, rel: &Path, mode: u32) -> Result<(), ExtractError> {
        self.prepare_parents(rel)?;
        let Some(root) = &self.root else {
            if self.regular.contains(rel) || self.symlinks.contains(rel) {
                return Err(ExtractError::refused(
                    Some(&display(rel)),
                    "a folder entry has the same name as an earlier file or link entry",
                ));
            }
            if self.dirs.insert(rel.to_owned()) {
                self.counts.dirs += 1;
            }
            return Ok(());
        };
        let path = root.join(rel);
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(ExtractError::refused(
                    Some(&display(rel)),
                    "a folder entry has the same name as an earlier file or link entry",
                ))
            }
            Err(e) if e.kind() == IoKind::NotFound => {
                fs::create_dir(&path)
                    .map_err(|e| ExtractError::io("creating a folder", &path, e))?;
                self.dirs.insert(rel.to_owned());
                self.counts.dirs += 1;
            }
            Err(e) => return Err(ExtractError::io("inspecting a folder", &path, e)),
        }
        self.dir_modes.push((rel.to_owned(), mode));
        Ok(())
    }

    /// Creates a regular file with `mode`, streaming its content from `data`.
    pub fn file(&mut self, rel: &Path, mode: u32, data: &mut dyn Read) -> Result<(), ExtractError> {
        self.prepare_parents(rel)?;
        let Some(root) = &self.root else {
            self.refuse_taken(rel)?;
            self.copy(rel, data, &mut io::sink())?;
            self.regular.insert(rel.to_owned());
            self.counts.files += 1;
            return Ok(());
        };
        let path = root.join(rel);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| self.create_error(rel, &path, e))?;
        self.copy(rel, data, &mut file)?;
        file.set_permissions(fs::Permissions::from_mode(mode & 0o777))
            .map_err(|e| ExtractError::io("setting permissions", &path, e))?;
        self.regular.insert(rel.to_owned());
        self.counts.files += 1;
        Ok(())
    }

    /// Creates a symbolic link to `target` (the raw bytes of the archive's link name).
    pub fn symlink(&mut self, rel: &Path, target: &[u8]) -> Result<(), ExtractError> {
        let name = display(rel);
        if let Some(other) = self.stepped_out_of.get(rel) {
            return Err(ExtractError::refused(
                Some(&name),
                format!(
                    "the target of the earlier link {} steps out of this path with `..`; a symlink here would let it point outside the package",
                    display(other)
                ),
            ));
        }
        let stepped = self.check_link_target(rel, target)?;
        self.prepare_parents(rel)?;
        if let Some(root) = &self.root {
            let path = root.join(rel);
            std::os::unix::fs::symlink(OsStr::from_bytes(target), &path)
                .map_err(|e| self.create_error(rel, &path, e))?;
        } else {
            self.refuse_taken(rel)?;
        }
        for prefix in stepped {
            self.stepped_out_of
                .entry(prefix)
                .or_insert_with(|| rel.to_owned());
        }
        self.symlinks.insert(rel.to_owned());
        self.counts.symlinks += 1;
        Ok(())
    }

    /// Creates a hard link to `target` (the raw bytes of the archive's link name), which
    /// must be a regular file extracted earlier from this archive.
    pub fn hard_link(&mut self, rel: &Path, target: &[u8]) -> Result<(), ExtractError> {
        let name = display(rel);
        let target_rel = match normalise(target, false) {
            Ok(Some(t)) => t,
            Ok(None) => {
                return Err(ExtractError::refused(
                    Some(&name),
                    "a hard link to the package folder itself",
                ))
            }
            Err(why) => {
                return Err(ExtractError::refused(
                    Some(&name),
                    format!(
                        "hard link target {:?}: {why}",
                        String::from_utf8_lossy(target)
                    ),
                ))
            }
        };
        if !self.regular.contains(&target_rel) {
            return Err(ExtractError::refused(
                Some(&name),
                format!(
                    "hard link to {:?}, which is not a regular file extracted earlier from this package",
                    display(&target_rel)
                ),
            ));
        }
        self.prepare_parents(rel)?;
        if let Some(root) = &self.root {
            let path = root.join(rel);
            fs::hard_link(root.join(&target_rel), &path)
                .map_err(|e| self.create_error(rel, &path, e))?;
        } else {
            self.refuse_taken(rel)?;
        }
        self.regular.insert(rel.to_owned());
        self.counts.files += 1;
        Ok(())
    }

    /// Applies folder modes (deepest first) and answers the counts.
    pub fn finish(mut self) -> Result<Counts, ExtractError> {
        let Some(root) = &self.root else {
            return Ok(self.counts);
        };
        self.dir_modes
            .sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
        for (rel, mode) in &self.dir_modes {
            let path = root.join(rel);
            fs::set_permissions(&path, fs::Permissions::from_mode((mode & 0o777) | 0o700))
                .map_err(|e| ExtractError::io("setting folder permissions", &path, e))?;
        }
        Ok(self.counts)
    }

    /// Checks (and creates where missing) every folder above `rel`.
    fn prepare_parents(&mut self, rel: &Path) -> Result<(), ExtractError> {
        let Some(parent) = rel.parent() else {
            return Ok(());
        };
        let mut current = PathBuf::new();
        for component in parent.components() {
            current.push(component);
            if self.dirs.contains(&current) {
                continue;
            }
            if self.symlinks.contains(&current) {
                return Err(ExtractError::refused(
                    Some(&display(rel)),
                    format!(
                        "its path goes through the symlink {:?} extracted earlier",
                        display(&current)
                    ),
                ));
            }
            let Some(root) = &self.root else {
                if self.regular.contains(&current) {
                    return Err(ExtractError::refused(
                        Some(&display(rel)),
                        format!("its path goes through the file {:?}", display(&current)),
                    ));
                }
                self.count_entry(&display(&current))?;
                self.counts.dirs += 1;
                self.dirs.insert(current.clone());
                continue;
            };
            let path = root.join(&current);
            match fs::symlink_metadata(&path) {
                Ok(meta) if meta.is_dir() => {}
                Ok(meta) => {
                    let what = if meta.file_type().is_symlink() {
                        "the symlink"
                    } else {
                        "the file"
                    };
                    return Err(ExtractError::refused(
                        Some(&display(rel)),
                        format!("its path goes through {what} {:?}", display(&current)),
                    ));
                }
                Err(e) if e.kind() == IoKind::NotFound => {
                    self.count_entry(&display(&current))?;
                    fs::create_dir(&path)
                        .map_err(|e| ExtractError::io("creating a folder", &path, e))?;
                    self.counts.dirs += 1;
                    self.dir_modes.push((current.clone(), DEFAULT_DIR_MODE));
                }
                Err(e) => return Err(ExtractError::io("inspecting a folder", &path, e)),
            }
            self.dirs.insert(current.clone());
        }
        Ok(())
    }

    /// Refuses unsafe link targets; answers the paths the target steps out of with `..`.
    fn check_link_target(&self, rel: &Path, target: &[u8]) -> Result<Vec<PathBuf>, ExtractError> {
        let name = display(rel);
        let shown = String::from_utf8_lossy(target);
        let refuse = |why: String| ExtractError::refused(Some(&name), why);
        if target.is_empty() {
            return Err(refuse("a symlink with an empty target".into()));
        }
        if target.len() > MAX_LINK_TARGET {
            return Err(refuse(format!(
                "a symlink target longer than {MAX_LINK_TARGET} bytes"
            )));
        }
        if target.contains(&0) {
            return Err(refuse("a symlink target containing a NUL byte".into()));
        }
        if target.starts_with(b"/") {
            return Err(refuse(format!(
                "a symlink to the absolute path {shown:?}; only relative links inside the package are allowed"
            )));
        }
        let mut stack: Vec<&OsStr> = rel
            .parent()
            .map(|p| p.components().map(|c| c.as_os_str()).collect())
            .unwrap_or_default();
        let mut stepped = Vec::new();
        for part in target.split(|b| *b == b'/') {
            match part {
                b"" | b"." => {}
                b".." => {
                    if stack.is_empty() {
                        return Err(refuse(format!(
                            "a symlink to {shown:?}, which resolves outside the package folder"
                        )));
                    }
                    // `..` only means the lexical parent when no folder on the way is
                    // a symlink: check every prefix now, and remember them so that no
                    // later entry makes one a symlink.
                    let mut prefix = PathBuf::new();
                    for part in &stack {
                        prefix.push(part);
                        if self.symlinks.contains(&prefix) {
                            return Err(refuse(format!(
                                "a symlink to {shown:?}, which steps out of the symlink {:?} with `..`",
                                display(&prefix)
                            )));
                        }
                        stepped.push(prefix.clone());
                    }
                    stack.pop();
                }
                other => stack.push(OsStr::from_bytes(other)),
            }
        }
        Ok(stepped)
    }

    /// Streams `data` into `out`, counting the bytes against the limits.
    fn copy(
        &mut self,
        rel: &Path,
        data: &mut dyn Read,
        out: &mut dyn Write,
    ) -> Result<(), ExtractError> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match data.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == IoKind::Interrupted => continue,
                Err(e) => {
                    return Err(ExtractError::refused(
                        Some(&display(rel)),
                        format!("the archive is corrupt or truncated: {e}"),
                    ))
                }
            };
            let total = self.counts.bytes.saturating_add(n as u64);
            self.check_size(rel, total)?;
            out.write_all(&buf[..n]).map_err(|e| {
                let path = self
                    .root
                    .as_ref()
                    .map_or_else(|| rel.to_owned(), |r| r.join(rel));
                ExtractError::io("writing", &path, e)
            })?;
            self.counts.bytes = total;
            self.meter.written.set(total);
        }
    }

    fn check_size(&self, rel: &Path, total: u64) -> Result<(), ExtractError> {
        if total > self.limits.max_extracted_bytes {
            return Err(ExtractError::refused(
                Some(&display(rel)),
                format!(
                    "the package would extract to more than {} bytes (--max-extracted-bytes)",
                    self.limits.max_extracted_bytes
                ),
            ));
        }
        let ratio_limit = self
            .limits
            .max_ratio
            .saturating_mul(self.archive_len.max(1));
        if total > RATIO_FREE_BYTES && total > ratio_limit {
            return Err(ExtractError::refused(
                Some(&display(rel)),
                format!(
                    "the package would extract to more than {} times its size of {} bytes (--max-ratio): a decompression bomb?",
                    self.limits.max_ratio, self.archive_len
                ),
            ));
        }
        Ok(())
    }

    /// Without a root: refuses a second entry of a name already taken (what
    /// `O_EXCL` does on disk).
    fn refuse_taken(&self, rel: &Path) -> Result<(), ExtractError> {
        if self.regular.contains(rel) || self.symlinks.contains(rel) || self.dirs.contains(rel) {
            return Err(ExtractError::refused(
                Some(&display(rel)),
                "the name appears more than once in the archive",
            ));
        }
        Ok(())
    }

    fn create_error(&self, rel: &Path, path: &Path, e: io::Error) -> ExtractError {
        if e.kind() == IoKind::AlreadyExists || e.raw_os_error() == Some(nix::libc::ELOOP) {
            ExtractError::refused(
                Some(&display(rel)),
                "the name appears more than once in the archive",
            )
        } else {
            ExtractError::io("creating", path, e)
        }
    }
}

/// Normalises an entry name to a relative path: `.` and empty components dropped,
/// refused when absolute, containing `..` or NUL. `backslash_is_separator` treats `\`
/// as `/` (zip archives made on Windows) and also refuses drive letters (`C:`).
/// `Ok(None)` is the root itself (e.g. `./`).
pub fn normalise(name: &[u8], backslash_is_separator: bool) -> Result<Option<PathBuf>, String> {
    if name.is_empty() {
        return Err("an empty name".into());
    }
    if name.contains(&0) {
        return Err("a name containing a NUL byte".into());
    }
    let is_sep = |b: &u8| *b == b'/' || (backslash_is_separator && *b == b'\\');
    if name.first().is_some_and(is_sep) {
        return Err("an absolute path".into());
    }
    let mut path = PathBuf::new();
    for (i, part) in name.split(is_sep).enumerate() {
        match part {
            b"" | b"." => {}
            b".." => return Err("a path containing `..`".into()),
            part => {
                if i == 0 && backslash_is_separator && part.len() == 2 && part[1] == b':' {
                    return Err("an absolute path (drive letter)".into());
                }
                path.push(OsStr::from_bytes(part));
            }
        }
    }
    Ok(if path.as_os_str().is_empty() {
        None
    } else {
        Some(path)
    })
}

/// A relative path for messages.
pub fn display(rel: &Path) -> String {
    rel.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_extracted_bytes: 1 << 30,
            max_entries: 1000,
            max_ratio: 200,
        }
    }

    #[test]
    fn normalises_names() {
        assert_eq!(
            normalise(b"a/./b//c", false).unwrap(),
            Some(PathBuf::from("a/b/c"))
        );
        assert_eq!(normalise(b"./", false).unwrap(), None);
        assert_eq!(
            normalise(b"a\\b", false).unwrap(),
            Some(PathBuf::from("a\\b"))
        );
        assert_eq!(
            normalise(b"a\\b", true).unwrap(),
            Some(PathBuf::from("a/b"))
        );
        assert!(normalise(b"../x", false).is_err());
        assert!(normalise(b"a/../../x", false).is_err());
        assert!(normalise(b"/etc/passwd", false).is_err());
        assert!(normalise(b"\\evil", true).is_err());
        assert!(normalise(b"..\\evil", true).is_err());
        assert!(normalise(b"C:\\evil", true).is_err());
        assert!(normalise(b"", false).is_err());
        assert!(normalise(b"a\0b", false).is_err());
    }

    #[test]
    fn link_targets_resolve_lexically_inside() {
        let dir = tempfile::tempdir().unwrap();
        let mut sb = Sandbox::new(dir.path(), limits(), 1);
        sb.symlink(Path::new("a/b/up"), b"../..").unwrap();
        sb.symlink(Path::new("a/sib"), b"./b/../c").unwrap();
        assert!(sb.symlink(Path::new("a/out"), b"../..").is_err());
        assert!(sb.symlink(Path::new("abs"), b"/etc").is_err());
        assert!(sb.symlink(Path::new("x"), b"").is_err());
        // Stepping out of a symlink with `..`, in either order.
        sb.symlink(Path::new("d/up"), b"..").unwrap();
        let err = sb.symlink(Path::new("l"), b"d/up/..").unwrap_err();
        assert!(
            err.to_string().contains("steps out of the symlink"),
            "{err}"
        );
        sb.symlink(Path::new("m"), b"e/f/../..").unwrap();
        let err = sb.symlink(Path::new("e/f"), b".").unwrap_err();
        assert!(err.to_string().contains("steps out of this path"), "{err}");
        // `..` after a path that goes through a symlink, even when the `..` pops a
        // real name: sub/f -> .. is fine, but g -> s/f/.. (s -> sub) is not.
        sb.symlink(Path::new("sub/f"), b"..").unwrap();
        sb.symlink(Path::new("s"), b"sub").unwrap();
        let err = sb.symlink(Path::new("g"), b"s/f/..").unwrap_err();
        assert!(
            err.to_string().contains("steps out of the symlink \"s\""),
            "{err}"
        );
        // Entries through a symlink.
        sb.symlink(Path::new("link"), b"a").unwrap();
        let err = sb
            .file(Path::new("link/passwd"), 0o644, &mut &b"x"[..])
            .unwrap_err();
        assert!(
            err.to_string().contains("goes through the symlink"),
            "{err}"
        );
        let err = sb
            .file(Path::new("link"), 0o644, &mut &b"x"[..])
            .unwrap_err();
        assert!(err.to_string().contains("more than once"), "{err}");
    }

    #[test]
    fn counts_bytes_actually_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut sb = Sandbox::new(
            dir.path(),
            Limits {
                max_extracted_bytes: 10,
                ..limits()
            },
            1,
        );
        sb.file(Path::new("a"), 0o644, &mut &[0u8; 10][..]).unwrap();
        let err = sb
            .file(Path::new("b"), 0o644, &mut &[0u8; 1][..])
            .unwrap_err();
        assert!(err.to_string().contains("max-extracted-bytes"), "{err}");
    }
}
