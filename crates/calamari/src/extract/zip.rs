//! Zip packages: entries in central-directory order, each through the sandbox. Entry
//! kinds come from the Unix mode when the archive has one (folders, regular files,
//! symlinks whose content is the target; devices, fifos and sockets are refused), else
//! from the name (a trailing `/` is a folder). `\` counts as a separator, as archives
//! made on Windows use it. Encrypted entries are refused.

use std::io::{BufReader, Read, Seek};

use super::sandbox::{display, normalise, Sandbox, MAX_LINK_TARGET};
use super::ExtractError;

const S_IFMT: u32 = 0o170_000;
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;

pub(super) fn extract(file: impl Read + Seek, sb: &mut Sandbox) -> Result<(), ExtractError> {
    let mut archive = ::zip::ZipArchive::new(BufReader::new(file))
        .map_err(|e| ExtractError::refused(None, format!("not a readable zip archive: {e}")))?;
    // The central directory says how many entries there are: refuse early.
    sb.expect_entries(archive.len() as u64)?;
    for i in 0..archive.len() {
        let mut entry = archive
            .by_index(i)
            .map_err(|e| ExtractError::refused(None, format!("entry #{i} cannot be read: {e}")))?;
        let name = entry.name().to_owned();
        sb.count_entry(&name)?;
        let rel = normalise(name.as_bytes(), true)
            .map_err(|why| ExtractError::refused(Some(&name), why))?;
        let mode = entry.unix_mode();
        let kind = mode.map(|m| m & S_IFMT).filter(|k| *k != 0);
        let is_dir = kind == Some(S_IFDIR) || (kind.is_none() && name.ends_with(['/', '\\']));
        let Some(rel) = rel else {
            if is_dir {
                continue;
            }
            return Err(ExtractError::refused(
                Some(&name),
                "a file entry without a name",
            ));
        };
        match kind {
            _ if is_dir => sb.dir(&rel, mode.unwrap_or(0o755))?,
            None | Some(S_IFREG) => sb.file(&rel, mode.unwrap_or(0o644), &mut entry)?,
            Some(S_IFLNK) => {
                let mut target = Vec::new();
                (&mut entry)
                    .take(MAX_LINK_TARGET as u64 + 1)
                    .read_to_end(&mut target)
                    .map_err(|e| {
                        ExtractError::refused(Some(&name), format!("the archive is corrupt: {e}"))
                    })?;
                let target: Vec<u8> = target
                    .into_iter()
                    .map(|b| if b == b'\\' { b'/' } else { b })
                    .collect();
                sb.symlink(&rel, &target)?;
            }
            Some(other) => {
                return Err(ExtractError::refused(
                    Some(&display(&rel)),
                    format!("{} entries are not allowed in packages", kind_name(other)),
                ))
            }
        }
    }
    Ok(())
}

fn kind_name(kind: u32) -> &'static str {
    match kind {
        0o010_000 => "fifo",
        0o020_000 => "character device",
        0o060_000 => "block device",
        0o140_000 => "socket",
        _ => "unknown file type",
    }
}
