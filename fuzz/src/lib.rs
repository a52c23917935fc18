//! The fuzz targets' bodies, shared by the libFuzzer targets (`fuzz_targets/`,
//! `cargo fuzz`, nightly) and the stable driver (`src/bin/stable_driver.rs`).
//!
//! Each function takes arbitrary bytes and panics only when a property the code
//! promises is broken (a panic inside the code under test counts too). See
//! docs/fuzzing.md.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;

/// Every target, by name.
pub const TARGETS: &[(&str, fn(&[u8]))] = &[
    ("archive_extract", archive_extract),
    ("service_message", service_message),
    ("tentacle_config", tentacle_config),
    ("certificate_import", certificate_import),
    ("package_name", package_name),
];

/// A scratch folder for this process (on tmpfs when there is one).
fn scratch() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let b = tempfile::Builder::new().prefix("octo-fuzz-").tempdir_in(if shm.is_dir() {
            shm
        } else {
            Path::new("/tmp")
        });
        b.or_else(|_| tempfile::tempdir()).expect("a scratch folder")
    })
    .path()
}

/// Makes every folder under `root` writable and removes it.
fn remove_tree(root: &Path) {
    fn open_up(p: &Path) {
        if let Ok(meta) = fs::symlink_metadata(p) {
            if meta.is_dir() {
                let _ = fs::set_permissions(p, fs::Permissions::from_mode(0o700));
                if let Ok(entries) = fs::read_dir(p) {
                    for e in entries.flatten() {
                        open_up(&e.path());
                    }
                }
            }
        }
    }
    open_up(root);
    let _ = fs::remove_dir_all(root);
}

/// `base.join(rel)` with `.` and `..` resolved lexically; `None` when `..`
/// climbs above the file system root.
fn resolve(base: &Path, rel: &Path) -> Option<PathBuf> {
    let mut out = if rel.is_absolute() {
        PathBuf::from("/")
    } else {
        base.to_path_buf()
    };
    for c in rel.components() {
        match c {
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::Normal(n) => out.push(n),
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
        }
    }
    Some(out)
}

/// Every symlink under `dir` must point inside `root`; nothing but files,
/// folders and symlinks may exist.
fn check_tree(root: &Path, dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let meta = fs::symlink_metadata(&path).expect("metadata of an extracted entry");
        let ft = meta.file_type();
        if ft.is_symlink() {
            let target = fs::read_link(&path).expect("a symlink's target");
            let parent = path.parent().expect("a parent");
            let resolved = resolve(parent, &target);
            assert!(
                resolved.as_deref().is_some_and(|r| r.starts_with(root)),
                "symlink {} points out of the extracted folder: {}",
                path.display(),
                target.display()
            );
        } else if ft.is_dir() {
            check_tree(root, &path);
        } else {
            assert!(ft.is_file(), "{} is not a file, folder or symlink", path.display());
        }
    }
}

/// calamari's extractor: a package lands complete in a new folder, or leaves
/// nothing behind; nothing is written outside the parent folder; no symlink in
/// the result points out of it.
pub fn archive_extract(data: &[u8]) {
    let base = scratch().join("extract");
    remove_tree(&base);
    let parent = base.join("apps");
    let outside = base.join("outside");
    fs::create_dir_all(&parent).expect("create the parent folder");
    fs::create_dir_all(&outside).expect("create the sentinel folder");
    let package = base.join("package.bin");
    fs::write(&package, data).expect("write the package");
    let limits = octo_calamari::Limits {
        max_extracted_bytes: 16 << 20,
        max_entries: 2_000,
        ..octo_calamari::Limits::default()
    };
    let result = octo_calamari::extract::extract_package(&package, &parent, "1.0.0", limits);
    let mut names: Vec<String> = fs::read_dir(&parent)
        .expect("list the parent folder")
        .map(|e| e.expect("an entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    match &result {
        Ok(extracted) => {
            assert_eq!(names, vec!["1.0.0".to_owned()], "after success");
            assert_eq!(extracted.path, parent.join("1.0.0"));
            check_tree(&extracted.path, &extracted.path);
        }
        Err(_) => assert!(names.is_empty(), "a refused package left {names:?} behind"),
    }
    let mut top: Vec<String> = fs::read_dir(&base)
        .expect("list the scratch folder")
        .map(|e| e.expect("an entry").file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    assert_eq!(top, ["apps", "outside", "package.bin"], "written beside the parent");
    assert!(
        fs::read_dir(&outside).expect("list").next().is_none(),
        "written outside the parent folder"
    );
    remove_tree(&base);
}

/// Service messages: a parsed message formats to one line that parses back to
/// the same message.
pub fn service_message(data: &[u8]) {
    use octo_calamari::service_message::{format, parse};
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(m) = parse(line) {
        let text = format(&m);
        assert!(!text.contains(['\n', '\r']), "format made a line break: {text:?}");
        assert_eq!(parse(&text), Some(m), "round trip of {line:?} via {text:?}");
    }
}

/// The tentacle's configuration loader: never panics; a loaded configuration
/// saves and loads back equal.
pub fn tentacle_config(data: &[u8]) {
    use octo_agent::config::TentacleConfig;
    let dir = scratch().join("config");
    fs::create_dir_all(&dir).expect("create the config folder");
    let path = dir.join("tentacle.toml");
    fs::write(&path, data).expect("write the configuration");
    if let Ok(cfg) = TentacleConfig::load(&path) {
        let again = dir.join("again.toml");
        cfg.save(&again).expect("save a loaded configuration");
        let back = TentacleConfig::load(&again).expect("load a saved configuration");
        assert_eq!(back, cfg, "save and load changed the configuration");
    }
}

/// Certificate import: PEM (certificate and key) and PKCS#12 never panic; an
/// imported identity exports to PEM that imports back to the same thumbprint.
pub fn certificate_import(data: &[u8]) {
    use octo_tls::Identity;
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let identity = if selector & 1 == 0 {
        // Certificate and key in one text, or split at the first NUL.
        match rest.iter().position(|b| *b == 0) {
            Some(i) => Identity::from_pem(&rest[..i], &rest[i + 1..]),
            None => Identity::from_pem(rest, rest),
        }
    } else {
        // A password of up to 15 bytes first, then the DER.
        let n = usize::from(selector >> 4).min(rest.len());
        let password = String::from_utf8_lossy(&rest[..n]).into_owned();
        Identity::from_pkcs12(&rest[n..], &password)
    };
    if let Ok(id) = identity {
        let back = Identity::from_pem(id.cert_pem().as_bytes(), id.key_pem().as_bytes())
            .expect("an imported identity's own PEM imports");
        assert_eq!(back.thumbprint(), id.thumbprint());
    }
}

/// The feed's package file names (`ID.VERSION.ext`), versions and IDs: never
/// panic; what is parsed is part of the name, and the canonical name of a
/// parsed package parses back to the same ID and version.
pub fn package_name(data: &[u8]) {
    use octo_server_core::feed::{check_package_id, parse_file_name, parse_version};
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = check_package_id(text);
    if let Ok(v) = parse_version(text) {
        assert_eq!(
            parse_version(&v.to_string()).ok(),
            Some(v.clone()),
            "version {v} does not parse back"
        );
    }
    if let Ok((id, version, format)) = parse_file_name(text) {
        assert!(!id.is_empty());
        assert!(matches!(format, "zip" | "tar.gz"), "{format}");
        let base = Path::new(text)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or(text);
        assert!(base.starts_with(&id), "{id:?} is not the start of {base:?}");
        let canonical = format!("{id}.{version}.{format}");
        let (id2, version2, format2) =
            parse_file_name(&canonical).expect("a canonical name parses");
        assert_eq!((&id2, &version2, format2), (&id, &version, format), "{canonical}");
    }
}
