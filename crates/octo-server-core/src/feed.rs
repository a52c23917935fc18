//! The built-in feed's rules, apart from HTTP: package IDs, versions (semantic,
//! `1.2` read as `1.2.0`), the original's file naming `ID.VERSION.ext`, and the
//! archive formats (zip or tar.gz, known by their first bytes).

use std::path::Path;

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

/// The format of an archive from its first bytes.
pub fn sniff_format(head: &[u8]) -> Option<&'static str> {
    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        Some("zip")
    } else if head.starts_with(&[0x1f, 0x8b]) {
        Some("tar.gz")
    } else {
        None
    }
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
        assert_eq!(sniff_format(&[0x1f, 0x8b, 8, 0]), Some("tar.gz"));
        assert_eq!(sniff_format(b"Rar!"), None);
    }
}
