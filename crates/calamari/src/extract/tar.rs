//! tar.gz packages: the gzip stream is decompressed as it is read, entries in archive
//! order, each through the sandbox. Regular files (and GNU sparse files) are written,
//! folders created, symlinks and hard links checked by the sandbox; devices and fifos
//! are refused, as is any entry type calamari does not know. PAX and GNU long-name
//! headers are applied by the `tar` crate; global PAX headers count as entries but
//! create nothing. After the end-of-archive marker, the rest of the gzip stream is read
//! (up to 1 MiB) so its checksum is verified.

use std::fs::File;
use std::io::{self, BufReader, Read};

use flate2::read::MultiGzDecoder;
use tar::EntryType;

use super::sandbox::{display, normalise, Sandbox};
use super::ExtractError;

/// How much of the gzip stream after the tar end is read to verify its checksum.
const TRAILER_DRAIN: u64 = 1024 * 1024;

pub(super) fn extract(file: File, sb: &mut Sandbox) -> Result<(), ExtractError> {
    let corrupt = |name: Option<&str>, e: io::Error| {
        ExtractError::refused(name, format!("the archive is corrupt or truncated: {e}"))
    };
    let mut archive = tar::Archive::new(MultiGzDecoder::new(BufReader::new(file)));
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
    let mut rest = archive.into_inner().take(TRAILER_DRAIN);
    io::copy(&mut rest, &mut io::sink()).map_err(|e| corrupt(None, e))?;
    Ok(())
}
