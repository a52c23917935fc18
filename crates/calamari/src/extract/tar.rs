//! tar.gz packages: the gzip stream is decompressed as it is read, entries in archive
//! order, each through the sandbox. Regular files (and GNU sparse files) are written,
//! folders created, symlinks and hard links checked by the sandbox; devices and fifos
//! are refused, as is any entry type calamari does not know. PAX and GNU long-name
//! headers are applied by the `tar` crate; global PAX headers count as entries but
//! create nothing. After the end-of-archive marker, the rest of the gzip stream is read
//! (up to 1 MiB) so its checksum is verified.
//!
//! The decompressed stream is metered: what it yields beyond the file bytes written
//! (headers, padding, long names, PAX records, data of entries that have none, like a
//! folder claiming a size) may not exceed [`OVERHEAD_PER_ENTRY_MAX`] between two
//! entries, nor [`OVERHEAD_FREE`] plus [`OVERHEAD_PER_ENTRY`] per entry in all. The
//! `tar` crate reads long names and PAX records into memory whole, so without this a
//! few KiB of gzip could make calamari allocate gigabytes.

use std::cell::Cell;
use std::io::{self, BufReader, Read};
use std::rc::Rc;

use flate2::read::MultiGzDecoder;
use tar::EntryType;

use super::sandbox::{display, normalise, Meter, Sandbox};
use super::ExtractError;

/// How much of the gzip stream after the tar end is read to verify its checksum.
const TRAILER_DRAIN: u64 = 1024 * 1024;

/// Archive overhead always allowed in all.
pub const OVERHEAD_FREE: u64 = 16 * 1024 * 1024;
/// Archive overhead allowed in all per entry.
pub const OVERHEAD_PER_ENTRY: u64 = 16 * 1024;
/// Most overhead between two entries (a header, a long name, a PAX record, padding).
pub const OVERHEAD_PER_ENTRY_MAX: u64 = 1024 * 1024;

/// The decompressed tar stream, refusing to yield more than the file bytes written plus
/// the allowed overhead.
struct Metered<R> {
    inner: R,
    meter: Rc<Meter>,
    /// Why it stopped, when it did.
    tripped: Rc<Cell<Option<&'static str>>>,
    read: u64,
    /// Entries seen, and `read` and bytes written when that count last changed.
    entries: u64,
    read_at_entry: u64,
    written_at_entry: u64,
}

impl<R: Read> Read for Metered<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let entries = self.meter.entries();
        if entries != self.entries {
            self.entries = entries;
            self.read_at_entry = self.read;
            self.written_at_entry = self.meter.written();
        }
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        let written = self.meter.written();
        let since_entry = (self.read - self.read_at_entry)
            .saturating_sub(written.saturating_sub(self.written_at_entry));
        let total = self.read.saturating_sub(written);
        let total_allowed = OVERHEAD_FREE
            .saturating_add(entries.saturating_add(1).saturating_mul(OVERHEAD_PER_ENTRY));
        let why = if since_entry > OVERHEAD_PER_ENTRY_MAX {
            Some("more than 1 MiB of headers, names or metadata for one entry")
        } else if total > total_allowed {
            Some("more headers, names or metadata than its entries can need")
        } else {
            None
        };
        if let Some(why) = why {
            self.tripped.set(Some(why));
            return Err(io::Error::other(why));
        }
        Ok(n)
    }
}

pub(super) fn extract(file: impl Read, sb: &mut Sandbox) -> Result<(), ExtractError> {
    let tripped = Rc::new(Cell::new(None));
    let corrupt = |name: Option<&str>, e: io::Error| match tripped.get() {
        Some(why) => ExtractError::refused(
            name,
            format!("the archive holds {why}: a decompression bomb?"),
        ),
        None => ExtractError::refused(name, format!("the archive is corrupt or truncated: {e}")),
    };
    let mut archive = tar::Archive::new(Metered {
        inner: MultiGzDecoder::new(BufReader::new(file)),
        meter: sb.meter(),
        tripped: Rc::clone(&tripped),
        read: 0,
        entries: 0,
        read_at_entry: 0,
        written_at_entry: 0,
    });
    let entries = archive.entries().map_err(|e| corrupt(None, e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| corrupt(None, e))?;
        let raw_name = entry.path_bytes().into_owned();
        let name = String::from_utf8_lossy(&raw_name).into_owned();
        sb.count_entry(&name)?;
        let kind = entry.header().entry_type();
        if kind == EntryType::XGlobalHeader {
            continue;
        }
        let rel =
            normalise(&raw_name, false).map_err(|why| ExtractError::refused(Some(&name), why))?;
        let mode = entry.header().mode().unwrap_or(0o644);
        let Some(rel) = rel else {
            if kind == EntryType::Directory {
                continue;
            }
            return Err(ExtractError::refused(
                Some(&name),
                "an entry without a name",
            ));
        };
        match kind {
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                sb.file(&rel, mode, &mut entry)?;
            }
            EntryType::Directory => sb.dir(&rel, mode)?,
            EntryType::Symlink => {
                let target = entry.link_name_bytes().unwrap_or_default().into_owned();
                sb.symlink(&rel, &target)?;
            }
            EntryType::Link => {
                let target = entry.link_name_bytes().unwrap_or_default().into_owned();
                sb.hard_link(&rel, &target)?;
            }
            other => {
                let what = match other {
                    EntryType::Char => "character device".to_owned(),
                    EntryType::Block => "block device".to_owned(),
                    EntryType::Fifo => "fifo".to_owned(),
                    other => format!("type {:?}", other.as_byte() as char),
                };
                return Err(ExtractError::refused(
                    Some(&display(&rel)),
                    format!("{what} entries are not allowed in packages"),
                ));
            }
        }
    }
    let mut rest = archive.into_inner().inner.take(TRAILER_DRAIN);
    io::copy(&mut rest, &mut io::sink()).map_err(|e| corrupt(None, e))?;
    Ok(())
}
