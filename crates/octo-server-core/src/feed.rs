//! The built-in feed's rules, apart from HTTP: package IDs, versions (semantic,
//! `1.2` read as `1.2.0`), the original's file naming `ID.VERSION.ext`, the
//! archive formats (zip or tar.gz, known by their first bytes), and the check
//! of a pushed archive: the whole of it, as calamari would extract it (its own
//! check-only sandbox), so the feed never holds a package a deployment refuses.

use std::path::Path;

use bytes::Bytes;
use octo_calamari::extract::{check_tar_gz, check_zip, Counts, Format};
use octo_calamari::Limits;

/// Reads a version leniently: semantic versions, and `1` / `1.2` padded with zeros.
pub fn parse_version(text: &str) -> Result<semver::Version, String> {
    let text = text.trim();
    if let Ok(v) = semver::Version::parse(text) {
        return Ok(v);
    }
    // "1.2" or "1" (optionally with a pre-release or build suffix).
    let split = text.find(['-', '+']).unwrap_or(text.len());
    let (core, rest) = text.split_at(split);
    let parts: Vec<&str> = core.split('.').collect();
    if (1..=2).contains(&parts.len())
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    {
        let padded = format!("{core}{}{rest}", ".0".repeat(3 - parts.len()));
        if let Ok(v) = semver::Version::parse(&padded) {
            return Ok(v);
        }
    }
    Err(format!(
        "'{text}' is not a semantic version (MAJOR.MINOR.PATCH, optionally -PRERELEASE, e.g. 1.2.3 or 2.0.0-beta.1)"
    ))
}

/// Splits a file name like `Acme.Web.1.2.3.zip` into ID, version and format.
pub fn parse_file_name(name: &str) -> Result<(String, semver::Version, &'static str), String> {
    let base = Path::new(name)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(name);
    let lower = base.to_ascii_lowercase();
    let (stem, format) = if lower.ends_with(".tar.gz") {
        (&base[..base.len() - 7], "tar.gz")
    } else if lower.ends_with(".tgz") {
        (&base[..base.len() - 4], "tar.gz")
    } else if lower.ends_with(".zip") {
        (&base[..base.len() - 4], "zip")
    } else {
        return Err(format!(
            "cannot tell the package ID and version from '{base}': name it ID.VERSION.zip or ID.VERSION.tar.gz (e.g. Acme.Web.1.2.3.zip), or give --id and --version"
        ));
    };
    for (i, _) in stem.match_indices('.') {
        let (id, rest) = (&stem[..i], &stem[i + 1..]);
        if !id.is_empty() && rest.starts_with(|c: char| c.is_ascii_digit()) {
            if let Ok(v) = parse_version(rest) {
                return Ok((id.to_string(), v, format));
            }
        }
    }
    Err(format!(
        "cannot tell the package ID and version from '{base}': expected ID.VERSION (e.g. Acme.Web.1.2.3), or give --id and --version"
    ))
}

/// A package ID must be usable as one folder name on every target.
pub fn check_package_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 100
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        && !id.starts_with('.')
        && !id.contains("..");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "package ID '{id}' is not valid: use letters, digits, '.', '-' and '_' (at most 100, not starting with '.')"
        ))
    }
}

/// The format of an archive from its first bytes (4 for a zip), as calamari
/// decides it: "zip" or "tar.gz".
pub fn sniff_format(head: &[u8]) -> Option<&'static str> {
    Format::of_magic(head).map(|f| match f {
        Format::Zip => "zip",
        Format::TarGz => "tar.gz",
    })
}

/// The first bytes of a refused file, for messages ("50 4b 05 06").
pub fn first_bytes(head: &[u8]) -> String {
    head.iter()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Checks a tar.gz package while it streams in, on a blocking thread, exactly
/// as calamari would extract it (see [`octo_calamari::extract::check_tar_gz`]):
/// the bytes are fed in as they arrive, and the check reads them to the end.
#[derive(Debug)]
pub struct TarGzCheck {
    tx: Option<tokio::sync::mpsc::Sender<Bytes>>,
    done: tokio::task::JoinHandle<Result<Counts, String>>,
}

impl TarGzCheck {
    /// Starts a check; `len` is the archive's size when announced (for the
    /// ratio limit; without it, [`ratio_fault`] applies once the size is known).
    pub fn start(len: Option<u64>) -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let done = tokio::task::spawn_blocking(move || {
            let reader = ChannelReader {
                rx,
                current: Bytes::new(),
            };
            check_tar_gz(reader, len.unwrap_or(u64::MAX), Limits::default())
                .map_err(|e| e.to_string())
        });
        TarGzCheck { tx: Some(tx), done }
    }

    /// Feeds the next bytes; false once the check has ended (refused, or it
    /// read all it reads), after which [`TarGzCheck::finish`] tells which.
    pub async fn feed(&mut self, bytes: Bytes) -> bool {
        match &self.tx {
            Some(tx) => tx.send(bytes).await.is_ok(),
            None => false,
        }
    }

    /// Ends the input and answers the check's verdict.
    pub async fn finish(mut self) -> Result<Counts, String> {
        self.tx = None;
        match self.done.await {
            Ok(verdict) => verdict,
            Err(e) => Err(format!("the archive check failed: {e}")),
        }
    }
}

/// A `Read` over the chunks of a channel; EOF when the sender is gone.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(b) => self.current = b,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        let _ = self.current.split_to(n);
        Ok(n)
    }
}

/// Checks a zip package (complete, in `path`) as calamari would extract it:
/// its central directory, every entry's CRC-32 and the entry list.
pub fn check_zip_file(path: &Path, len: u64) -> Result<Counts, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    check_zip(std::io::BufReader::new(file), len, Limits::default()).map_err(|e| e.to_string())
}

/// The ratio limit calamari applies (checked here once an archive's size is
/// known when it was not announced): what would be extracted against `len`.
pub fn ratio_fault(counts: &Counts, len: u64) -> Option<String> {
    let limits = Limits::default();
    let allowed = limits.max_ratio.saturating_mul(len.max(1));
    (counts.bytes > octo_calamari::extract::RATIO_FREE_BYTES && counts.bytes > allowed).then(|| {
        format!(
            "the package would extract to more than {} times its size of {len} bytes (--max-ratio): a decompression bomb?",
            limits.max_ratio
        )
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn file_names_split_into_id_version_and_format() {
        let (id, v, f) = parse_file_name("Acme.Web.1.2.3.zip").unwrap();
        assert_eq!(
            (id.as_str(), v.to_string().as_str(), f),
            ("Acme.Web", "1.2.3", "zip")
        );
        let (id, v, f) = parse_file_name("/tmp/Acme.Web.2.0.0-beta.1.tar.gz").unwrap();
        assert_eq!(
            (id.as_str(), v.to_string().as_str(), f),
            ("Acme.Web", "2.0.0-beta.1", "tar.gz")
        );
        let (id, v, _) = parse_file_name("My.2Fast.App.1.4.tgz").unwrap();
        assert_eq!(
            (id.as_str(), v.to_string().as_str()),
            ("My.2Fast.App", "1.4.0")
        );
        assert!(parse_file_name("Acme.Web.zip")
            .unwrap_err()
            .contains("--id"));
        assert!(parse_file_name("Acme.Web.1.0.0.rar")
            .unwrap_err()
            .contains("zip"));
    }

    #[test]
    fn versions_are_semantic_and_padded() {
        assert_eq!(parse_version("1.2").unwrap().to_string(), "1.2.0");
        assert_eq!(parse_version("3").unwrap().to_string(), "3.0.0");
        assert_eq!(parse_version("1.2-rc.1").unwrap().to_string(), "1.2.0-rc.1");
        assert!(parse_version("1.2.3.4").is_err());
        assert!(parse_version("abc").unwrap_err().contains("semantic"));
        assert!(parse_version("1.10.0").unwrap() > parse_version("1.9.0").unwrap());
    }

    #[test]
    fn package_ids_must_be_folder_names() {
        assert!(check_package_id("Acme.Web_2-x").is_ok());
        for bad in ["", "../x", "a/b", ".hidden", "a..b", "sp ace"] {
            assert!(check_package_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn formats_are_sniffed_from_the_first_bytes() {
        assert_eq!(sniff_format(b"PK\x03\x04rest"), Some("zip"));
        // An empty zip (only its end record) has nothing to deploy.
        assert_eq!(sniff_format(b"PK\x05\x06"), None);
        assert_eq!(sniff_format(&[0x1f, 0x8b, 8, 0]), Some("tar.gz"));
        assert_eq!(sniff_format(b"Rar!"), None);
    }
}
