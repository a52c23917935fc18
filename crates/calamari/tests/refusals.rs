//! Packages calamari must refuse (exit code 3) without touching anything: no new folder,
//! no staging folder left, earlier versions intact, nothing written outside, and the
//! refusal recorded in the journal with `extracted_to: null`.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::{dir, fifo, file, hard_link, symlink, tar_gz, zip, Home, Item};

const ID: &str = "Acme.Web";
const VERSION: &str = "1.0.0";

/// A home where `1.0.0` was deployed successfully.
fn home_with_a_deployed_version() -> Home {
    let home = Home::new();
    let good = home.package_path("good.zip");
    zip(&good, &[file("index.html", "v1"), dir("sub/", 0o755)]);
    home.deploy(&good, ID, VERSION, &[]).assert_code(0);
    home
}

/// Deploys `package` as `1.0.0` again and checks it is refused for `reason`, and that
/// nothing changed.
fn assert_refused(home: &Home, package: &Path, reason: &str, extra: &[&str]) -> String {
    let before = home.journal().len();
    let out = home.deploy(package, ID, VERSION, extra);
    out.assert_code(3);
    assert!(
        out.stderr.contains("the package was refused"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains(reason),
        "wanted {reason:?} in\n{}",
        out.stderr
    );
    assert!(
        out.stderr.contains(package.to_str().unwrap()),
        "the message names the package\n{}",
        out.stderr
    );
    // No `1.0.0_1`, no staging folder: only the earlier version.
    assert_eq!(home.versions("Production", ID), [VERSION]);
    let earlier = home.package_dir("Production", ID).join(VERSION);
    assert_eq!(
        fs::read_to_string(earlier.join("index.html")).unwrap(),
        "v1"
    );
    assert_eq!(
        fs::read_dir(&earlier).unwrap().count(),
        2,
        "the earlier version is untouched"
    );
    assert_eq!(
        fs::read_dir(home.apps()).unwrap().count(),
        1,
        "nothing beside the environment folder"
    );
    let journal = home.journal();
    assert_eq!(journal.len(), before + 1);
    let last = &journal[before];
    assert_eq!(last["success"], false);
    assert_eq!(last["extracted_to"], serde_json::Value::Null);
    assert!(last["error"].as_str().unwrap().contains(reason));
    // The check the server's feed runs at push time refuses it for the same reason.
    let checked = check_only(package, extra).expect_err("the check-only sandbox accepted it");
    assert!(
        checked.contains(reason),
        "check only: wanted {reason:?} in {checked}"
    );
    out.stderr
}

/// What the feed's check (no root, nothing written) says of `package`, with the
/// limits of `extra`'s flags.
fn check_only(package: &Path, extra: &[&str]) -> Result<(), String> {
    use octo_calamari::extract::{check_tar_gz, check_zip, Format};
    let mut limits = octo_calamari::Limits::default();
    for pair in extra.chunks(2) {
        let value: u64 = pair[1].parse().unwrap();
        match pair[0] {
            "--max-entries" => limits.max_entries = value,
            "--max-extracted-bytes" => limits.max_extracted_bytes = value,
            "--max-ratio" => limits.max_ratio = value,
            other => panic!("unknown flag {other}"),
        }
    }
    let bytes = fs::read(package).unwrap();
    let len = bytes.len() as u64;
    let result = match Format::of_magic(&bytes[..bytes.len().min(4)]) {
        Some(Format::Zip) => check_zip(std::io::Cursor::new(bytes), len, limits),
        Some(Format::TarGz) => check_tar_gz(&bytes[..], len, limits),
        None => return Err("unknown package format".into()),
    };
    result.map(|_| ()).map_err(|e| e.to_string())
}

/// A path outside the package folder that a malicious entry targets; must not exist
/// afterwards.
fn outside(home: &Home, name: &str) -> PathBuf {
    home.path().join(name)
}

#[test]
fn tar_entries_climbing_out_with_dot_dot() {
    let home = home_with_a_deployed_version();
    for (i, name) in ["../x", "a/../../x", "./../../../../../escaped-tar"]
        .iter()
        .enumerate()
    {
        let pkg = home.package_path(&format!("evil{i}.tar.gz"));
        tar_gz(&pkg, &[file("ok.txt", "ok"), file(name, "evil")]);
        let stderr = assert_refused(&home, &pkg, "a path containing `..`", &[]);
        assert!(stderr.contains(&format!("entry {name:?}")), "{stderr}");
    }
    assert!(!home.package_dir("Production", ID).join("x").exists());
    assert!(!home.path().join("escaped-tar").exists());
}

#[test]
fn zip_entries_climbing_out_with_dot_dot_or_backslashes() {
    let home = home_with_a_deployed_version();
    for (i, name) in ["../x", "sub/../../x", "..\\..\\x"].iter().enumerate() {
        let pkg = home.package_path(&format!("evil{i}.zip"));
        zip(&pkg, &[file("ok.txt", "ok"), file(name, "evil")]);
        assert_refused(&home, &pkg, "a path containing `..`", &[]);
    }
    assert!(!home.package_dir("Production", ID).join("x").exists());
}

#[test]
fn absolute_entry_names() {
    let home = home_with_a_deployed_version();
    let target = outside(&home, "abs-evil");
    let name = target.to_str().unwrap();
    let pkg = home.package_path("abs.zip");
    zip(&pkg, &[file(name, "evil")]);
    assert_refused(&home, &pkg, "an absolute path", &[]);
    let pkg = home.package_path("abs.tar.gz");
    tar_gz(&pkg, &[file(name, "evil")]);
    assert_refused(&home, &pkg, "an absolute path", &[]);
    let pkg = home.package_path("drive.zip");
    zip(&pkg, &[file("C:\\Windows\\evil", "evil")]);
    assert_refused(&home, &pkg, "drive letter", &[]);
    assert!(!target.exists());
}

#[test]
fn symlinks_pointing_outside() {
    let home = home_with_a_deployed_version();
    let abs = outside(&home, "linked");
    let cases: Vec<(Vec<Item>, &str)> = vec![
        (
            vec![symlink("l", abs.to_str().unwrap())],
            "a symlink to the absolute path",
        ),
        (
            vec![symlink("l", "../../..")],
            "resolves outside the package folder",
        ),
        (
            vec![symlink("a/b/l", "../../../x")],
            "resolves outside the package folder",
        ),
        (
            // Each link alone stays inside; together they would escape.
            vec![symlink("d/up", ".."), symlink("l", "d/up/../x")],
            "steps out of the symlink \"d/up\"",
        ),
        (
            vec![symlink("l", "d/up/../x"), symlink("d/up", "..")],
            "steps out of this path",
        ),
    ];
    for (i, (items, reason)) in cases.into_iter().enumerate() {
        let pkg = home.package_path(&format!("link{i}.tar.gz"));
        tar_gz(&pkg, &items);
        assert_refused(&home, &pkg, reason, &[]);
    }
    let pkg = home.package_path("link.zip");
    zip(&pkg, &[symlink("l", "/etc")]);
    assert_refused(&home, &pkg, "a symlink to the absolute path \"/etc\"", &[]);
}

#[test]
fn entries_through_a_symlink() {
    let home = home_with_a_deployed_version();
    let victim = outside(&home, "victim");
    fs::create_dir(&victim).unwrap();
    // The classic: the link is refused before anything can be written through it.
    let pkg = home.package_path("classic.tar.gz");
    tar_gz(
        &pkg,
        &[
            symlink("etc", victim.to_str().unwrap()),
            file("etc/passwd", "evil"),
        ],
    );
    assert_refused(&home, &pkg, "a symlink to the absolute path", &[]);
    // A link that is fine by itself, then an entry through it.
    let pkg = home.package_path("through.tar.gz");
    tar_gz(
        &pkg,
        &[
            dir("real/", 0o755),
            symlink("link", "real"),
            file("link/passwd", "evil"),
        ],
    );
    assert_refused(
        &home,
        &pkg,
        "its path goes through the symlink \"link\"",
        &[],
    );
    let pkg = home.package_path("through.zip");
    zip(&pkg, &[symlink("link", "."), file("link/passwd", "evil")]);
    assert_refused(
        &home,
        &pkg,
        "its path goes through the symlink \"link\"",
        &[],
    );
    // A file entry written over a link of the same name.
    let pkg = home.package_path("over.tar.gz");
    tar_gz(&pkg, &[symlink("f", "g"), file("f", "evil")]);
    assert_refused(&home, &pkg, "appears more than once", &[]);
    assert_eq!(fs::read_dir(&victim).unwrap().count(), 0);
}

#[test]
fn hard_links_must_point_to_files_extracted_earlier() {
    let home = home_with_a_deployed_version();
    let secret = outside(&home, "secret");
    fs::write(&secret, "secret").unwrap();
    let cases: Vec<(Vec<Item>, &str)> = vec![
        (
            vec![hard_link("h", secret.to_str().unwrap())],
            "an absolute path",
        ),
        (
            vec![hard_link("h", "../../../secret")],
            "a path containing `..`",
        ),
        (
            vec![hard_link("h", "later"), file("later", "x")],
            "not a regular file extracted earlier",
        ),
        (
            vec![dir("d/", 0o755), hard_link("h", "d")],
            "not a regular file extracted earlier",
        ),
        (
            vec![symlink("s", "x"), hard_link("h", "s")],
            "not a regular file extracted earlier",
        ),
    ];
    for (i, (items, reason)) in cases.into_iter().enumerate() {
        let pkg = home.package_path(&format!("hard{i}.tar.gz"));
        tar_gz(&pkg, &items);
        assert_refused(&home, &pkg, reason, &[]);
    }
    assert_eq!(fs::read_to_string(&secret).unwrap(), "secret");
}

#[test]
fn devices_and_fifos() {
    let home = home_with_a_deployed_version();
    let pkg = home.package_path("fifo.tar.gz");
    tar_gz(&pkg, &[file("a", "a"), fifo("pipe")]);
    assert_refused(&home, &pkg, "fifo entries are not allowed", &[]);
}

#[test]
fn too_many_entries() {
    let home = home_with_a_deployed_version();
    let items: Vec<Item> = (0..20).map(|i| file(&format!("f{i}"), "x")).collect();
    let pkg = home.package_path("many.tar.gz");
    tar_gz(&pkg, &items);
    assert_refused(
        &home,
        &pkg,
        "more than 10 entries (--max-entries)",
        &["--max-entries", "10"],
    );
    let pkg = home.package_path("many.zip");
    zip(&pkg, &items);
    assert_refused(
        &home,
        &pkg,
        "more than 10 (--max-entries)",
        &["--max-entries", "10"],
    );
    // At the limit it is fine.
    let out = home.deploy(&pkg, ID, "2.0.0", &["--max-entries", "20"]);
    out.assert_code(0);
}

const MIB: u64 = 1024 * 1024;

#[test]
fn a_bomb_over_max_extracted_bytes() {
    let home = home_with_a_deployed_version();
    let pkg = home.package_path("bomb.tar.gz");
    common::zeros_tar_gz(&pkg, "zeros.bin", 512 * MIB);
    assert!(
        fs::metadata(&pkg).unwrap().len() < MIB,
        "a real bomb: small archive"
    );
    let limit = (4 * MIB).to_string();
    let stderr = assert_refused(
        &home,
        &pkg,
        &format!("more than {limit} bytes (--max-extracted-bytes)"),
        &["--max-extracted-bytes", &limit],
    );
    assert!(stderr.contains("entry \"zeros.bin\""), "{stderr}");
    let pkg = home.package_path("bomb.zip");
    common::zeros_zip(&pkg, "zeros.bin", 16 * MIB);
    assert_refused(
        &home,
        &pkg,
        "(--max-extracted-bytes)",
        &["--max-extracted-bytes", &limit, "--max-ratio", "1000000"],
    );
}

#[test]
fn a_bomb_over_the_ratio() {
    let home = home_with_a_deployed_version();
    let pkg = home.package_path("bomb.zip");
    common::zeros_zip(&pkg, "zeros.bin", 24 * MIB);
    let size = fs::metadata(&pkg).unwrap().len();
    assert!(size < MIB, "a real bomb: small archive ({size} bytes)");
    assert_refused(&home, &pkg, "more than 200 times its size", &[]);
    let pkg = home.package_path("bomb.tar.gz");
    common::zeros_tar_gz(&pkg, "zeros.bin", 512 * MIB);
    assert_refused(&home, &pkg, "(--max-ratio)", &[]);
}

/// The `tar` crate reads a long name or a PAX record into memory whole: a huge one is
/// refused while it streams, not allocated.
#[test]
fn a_bomb_in_the_tar_headers() {
    let home = home_with_a_deployed_version();
    for (name, kind) in [
        ("longname.tar.gz", tar::EntryType::GNULongName),
        ("pax.tar.gz", tar::EntryType::XHeader),
        ("dir.tar.gz", tar::EntryType::Directory),
    ] {
        let pkg = home.package_path(name);
        common::overhead_tar_gz(&pkg, kind, 256 * MIB);
        assert!(fs::metadata(&pkg).unwrap().len() < MIB);
        assert_refused(&home, &pkg, "of headers, names or metadata", &[]);
    }
    // A long name of a sane length is fine.
    let pkg = home.package_path("long-ok.tar.gz");
    let long = format!("{}/file.txt", "d".repeat(200));
    let gz =
        flate2::write::GzEncoder::new(fs::File::create(&pkg).unwrap(), flate2::Compression::fast());
    let mut builder = tar::Builder::new(gz);
    let mut header = tar::Header::new_gnu();
    header.set_size(2);
    header.set_mode(0o644);
    builder.append_data(&mut header, &long, &b"ok"[..]).unwrap();
    builder.into_inner().unwrap().finish().unwrap();
    home.deploy(&pkg, ID, "2.0.0", &[]).assert_code(0);
    let extracted = home.package_dir("Production", ID).join("2.0.0").join(&long);
    assert_eq!(fs::read_to_string(extracted).unwrap(), "ok");
}

#[test]
fn the_ratio_is_not_enforced_below_16_mib() {
    let home = Home::new();
    let pkg = home.package_path("small-bomb.tar.gz");
    common::zeros_tar_gz(&pkg, "zeros.bin", 8 * MIB);
    let ratio = 8 * MIB / fs::metadata(&pkg).unwrap().len();
    assert!(ratio > 200, "ratio {ratio}");
    home.deploy(&pkg, ID, VERSION, &[]).assert_code(0);
    let extracted = home
        .package_dir("Production", ID)
        .join(VERSION)
        .join("zeros.bin");
    assert_eq!(fs::metadata(extracted).unwrap().len(), 8 * MIB);
}

#[test]
fn unknown_formats() {
    let home = home_with_a_deployed_version();
    for (name, content) in [
        ("text.zip", &b"just some text"[..]),
        ("empty.tar.gz", b""),
        ("bzip2.tar.bz2", b"BZh91AY&SY"),
    ] {
        let pkg = home.package_path(name);
        fs::write(&pkg, content).unwrap();
        assert_refused(&home, &pkg, "unknown package format", &[]);
    }
    // A plain tar is not a tar.gz, whatever its name.
    let tarball = home.package_path("plain.tar.gz");
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_path("a").unwrap();
    header.set_size(1);
    header.set_cksum();
    builder.append(&header, &b"a"[..]).unwrap();
    fs::write(&tarball, builder.into_inner().unwrap()).unwrap();
    assert_refused(&home, &tarball, "unknown package format", &[]);
}

#[test]
fn corrupt_archives() {
    let home = home_with_a_deployed_version();
    let items: Vec<Item> = (0..50)
        .map(|i| {
            Item::File(
                format!("dir/f{i}"),
                0o644,
                format!("content {i} ").repeat(500).into_bytes(),
            )
        })
        .collect();

    let good_zip = home.package_path("good.zip");
    zip(&good_zip, &items);
    let bytes = fs::read(&good_zip).unwrap();
    let truncated = home.package_path("truncated.zip");
    fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    assert_refused(&home, &truncated, "not a readable zip archive", &[]);
    let garbage = home.package_path("garbage.zip");
    let mut g = b"PK\x03\x04".to_vec();
    g.extend(std::iter::repeat_n(0xA5u8, 4096));
    fs::write(&garbage, &g).unwrap();
    assert_refused(&home, &garbage, "not a readable zip archive", &[]);
    // Damaged data with an intact central directory: the CRC check catches it.
    let mut flipped = bytes;
    for b in &mut flipped[200..260] {
        *b ^= 0xFF;
    }
    let damaged = home.package_path("damaged.zip");
    fs::write(&damaged, &flipped).unwrap();
    assert_refused(&home, &damaged, "corrupt", &[]);

    let good_tgz = home.package_path("good.tar.gz");
    tar_gz(&good_tgz, &items);
    let bytes = fs::read(&good_tgz).unwrap();
    let truncated = home.package_path("truncated.tar.gz");
    fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    assert_refused(
        &home,
        &truncated,
        "the archive is corrupt or truncated",
        &[],
    );
    // Gzip of something that is not a tar.
    let not_tar = home.package_path("not-tar.tar.gz");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &[b'x'; 2000]).unwrap();
    fs::write(&not_tar, gz.finish().unwrap()).unwrap();
    assert_refused(&home, &not_tar, "the archive is corrupt or truncated", &[]);
}
