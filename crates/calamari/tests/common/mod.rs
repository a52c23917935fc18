//! Test support: build zip and tar.gz packages (malicious ones too, with raw names),
//! and run the real `calamari` binary against a temporary TentacleHome with a bounded
//! wait.
#![allow(dead_code, clippy::unwrap_used)]

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use flate2::write::GzEncoder;
use flate2::Compression;

/// Longest any calamari run may take in these tests.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// One archive entry.
#[derive(Debug, Clone)]
pub enum Item {
    File(String, u32, Vec<u8>),
    Dir(String, u32),
    Symlink(String, String),
    HardLink(String, String),
    Fifo(String),
}

pub fn file(name: &str, content: &str) -> Item {
    Item::File(name.into(), 0o644, content.as_bytes().to_vec())
}

pub fn script(name: &str, content: &str) -> Item {
    Item::File(name.into(), 0o755, content.as_bytes().to_vec())
}

pub fn file_mode(name: &str, mode: u32, content: &[u8]) -> Item {
    Item::File(name.into(), mode, content.to_vec())
}

pub fn dir(name: &str, mode: u32) -> Item {
    Item::Dir(name.into(), mode)
}

pub fn symlink(name: &str, target: &str) -> Item {
    Item::Symlink(name.into(), target.into())
}

pub fn hard_link(name: &str, target: &str) -> Item {
    Item::HardLink(name.into(), target.into())
}

pub fn fifo(name: &str) -> Item {
    Item::Fifo(name.into())
}

/// Writes a tar.gz with the entries' names written raw into the headers (so `..` and
/// absolute names go in as they are).
pub fn tar_gz(path: &Path, items: &[Item]) {
    let gz = GzEncoder::new(File::create(path).unwrap(), Compression::fast());
    let mut builder = tar::Builder::new(gz);
    for item in items {
        append_tar(&mut builder, item);
    }
    builder.into_inner().unwrap().finish().unwrap();
}

fn append_tar<W: Write>(builder: &mut tar::Builder<W>, item: &Item) {
    let mut header = tar::Header::new_gnu();
    let (name, data): (&String, &[u8]) = match item {
        Item::File(name, mode, data) => {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mode(*mode);
            (name, data)
        }
        Item::Dir(name, mode) => {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(*mode);
            (name, &[])
        }
        Item::Symlink(name, target) => {
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_mode(0o777);
            header.set_link_name_literal(target).unwrap();
            (name, &[])
        }
        Item::HardLink(name, target) => {
            header.set_entry_type(tar::EntryType::Link);
            header.set_mode(0o644);
            header.set_link_name_literal(target).unwrap();
            (name, &[])
        }
        Item::Fifo(name) => {
            header.set_entry_type(tar::EntryType::Fifo);
            header.set_mode(0o644);
            (name, &[])
        }
    };
    let raw = &mut header.as_old_mut().name;
    assert!(name.len() < raw.len(), "test names must fit in 100 bytes");
    raw.fill(0);
    raw[..name.len()].copy_from_slice(name.as_bytes());
    header.set_size(data.len() as u64);
    header.set_mtime(1_700_000_000);
    header.set_cksum();
    builder.append(&header, data).unwrap();
}

const MIB: u64 = 1024 * 1024;

/// Writes a tar.gz holding one `kind` header that claims `size` bytes (a multiple of
/// 1 MiB) of zeros as its data, then a small file `after.txt`. Built cheaply as a
/// multi-member gzip (one member compressing 1 MiB of zeros, repeated), which is what
/// `cat a.gz b.gz` makes and every gzip reader accepts: a 256 MiB bomb is ~256 KiB.
fn header_with_zeros_tar_gz(path: &Path, kind: tar::EntryType, name: &str, size: u64) {
    assert_eq!(size % MIB, 0);
    let member = |data: &[u8]| {
        let mut gz = GzEncoder::new(Vec::new(), Compression::best());
        gz.write_all(data).unwrap();
        gz.finish().unwrap()
    };
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    let raw = &mut header.as_old_mut().name;
    raw[..name.len()].copy_from_slice(name.as_bytes());
    header.set_mode(0o644);
    header.set_size(size);
    header.set_cksum();
    let mut out = File::create(path).unwrap();
    out.write_all(&member(header.as_bytes())).unwrap();
    let zeros = member(&vec![0u8; MIB as usize]);
    for _ in 0..size / MIB {
        out.write_all(&zeros).unwrap();
    }
    let mut tail = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_path("after.txt").unwrap();
    header.set_size(5);
    header.set_mode(0o644);
    header.set_cksum();
    tail.append(&header, &b"after"[..]).unwrap();
    out.write_all(&member(&tail.into_inner().unwrap())).unwrap();
}

/// Writes a tar.gz with one file of `size` (a multiple of 1 MiB) zero bytes.
pub fn zeros_tar_gz(path: &Path, name: &str, size: u64) {
    header_with_zeros_tar_gz(path, tar::EntryType::Regular, name, size);
}

/// Writes a tar.gz whose first header, of type `kind`, carries `size` zero bytes of
/// data (a GNU long name, a PAX record, a folder claiming a size), then a small file.
pub fn overhead_tar_gz(path: &Path, kind: tar::EntryType, size: u64) {
    header_with_zeros_tar_gz(path, kind, "././@LongLink", size);
}

/// Writes a zip with one file of `size` zero bytes.
pub fn zeros_zip(path: &Path, name: &str, size: u64) {
    let mut zip = zip::ZipWriter::new(File::create(path).unwrap());
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .compression_level(Some(9))
        .large_file(size >= u32::MAX as u64);
    zip.start_file(name, options).unwrap();
    let chunk = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        zip.write_all(&chunk[..n]).unwrap();
        left -= n as u64;
    }
    zip.finish().unwrap();
}

/// Writes a zip; names go in as given (absolute and `..` names included).
pub fn zip(path: &Path, items: &[Item]) {
    let mut zip = zip::ZipWriter::new(File::create(path).unwrap());
    for item in items {
        match item {
            Item::File(name, mode, data) => {
                let options = zip::write::SimpleFileOptions::default()
                    .compression_method(zip::CompressionMethod::Deflated)
                    .unix_permissions(*mode);
                zip.start_file(name.as_str(), options).unwrap();
                zip.write_all(data).unwrap();
            }
            Item::Dir(name, mode) => {
                let options = zip::write::SimpleFileOptions::default().unix_permissions(*mode);
                zip.add_directory(name.as_str(), options).unwrap();
            }
            Item::Symlink(name, target) => {
                zip.add_symlink(
                    name.as_str(),
                    target.as_str(),
                    zip::write::SimpleFileOptions::default(),
                )
                .unwrap();
            }
            Item::HardLink(..) | Item::Fifo(..) => panic!("not representable in zip"),
        }
    }
    zip.finish().unwrap();
}

/// A temporary tentacle home.
pub struct Home {
    pub dir: tempfile::TempDir,
}

impl Home {
    pub fn new() -> Self {
        Home {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn apps(&self) -> PathBuf {
        self.path().join("Applications")
    }

    /// `Applications/<env>/<id>`.
    pub fn package_dir(&self, env: &str, id: &str) -> PathBuf {
        self.apps().join(env).join(id)
    }

    /// The names in `Applications/<env>/<id>`, sorted (hidden ones included).
    pub fn versions(&self, env: &str, id: &str) -> Vec<String> {
        let Ok(entries) = fs::read_dir(self.package_dir(env, id)) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    pub fn journal_path(&self) -> PathBuf {
        self.path().join("DeploymentJournal.json")
    }

    pub fn journal(&self) -> Vec<serde_json::Value> {
        match fs::read(self.journal_path()) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap(),
            Err(_) => Vec::new(),
        }
    }

    /// Writes a package file under the home's `Files` folder.
    pub fn package_path(&self, name: &str) -> PathBuf {
        let dir = self.path().join("Files");
        fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    pub fn variables(&self, name: &str, vars: &[(&str, &str)]) -> PathBuf {
        let map: serde_json::Map<String, serde_json::Value> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), serde_json::Value::String((*v).to_owned())))
            .collect();
        let path = self.path().join(name);
        fs::write(&path, serde_json::to_vec(&map).unwrap()).unwrap();
        path
    }

    /// A `calamari` command with this home in its environment.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_calamari"));
        cmd.env("TentacleHome", self.path())
            .env_remove("TentacleApplications")
            .current_dir(self.path())
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `calamari deploy-package` for `package` with the standard flags plus `extra`.
    pub fn deploy(&self, package: &Path, id: &str, version: &str, extra: &[&str]) -> Output {
        let mut args: Vec<OsString> = vec![
            "deploy-package".into(),
            "--package".into(),
            package.into(),
            "--package-id".into(),
            id.into(),
            "--package-version".into(),
            version.into(),
            "--environment".into(),
            "Production".into(),
        ];
        args.extend(extra.iter().map(OsString::from));
        let mut cmd = self.command();
        cmd.args(args);
        run(cmd)
    }
}

/// What a run printed and how it ended.
#[derive(Debug)]
pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code,
            Some(code),
            "exit code\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout,
            self.stderr
        );
        self
    }
}

/// Runs `cmd` to completion, capturing output; panics (killing it) after
/// [`RUN_TIMEOUT`].
pub fn run(mut cmd: Command) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(RUN_TIMEOUT) {
        Ok(out) => {
            let out = out.unwrap();
            Output {
                code: out.status.code(),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            }
        }
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("calamari did not finish within {RUN_TIMEOUT:?}");
        }
    }
}

pub fn python3_available() -> bool {
    Command::new("python3")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
}

/// The first `name` on PATH.
pub fn which(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} is not on PATH"))
}
