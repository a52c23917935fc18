//! A throwaway PostgreSQL cluster (Debian's `postgresql` package) for tests:
//! `initdb` into a temporary folder, the server on a free port of 127.0.0.1
//! (and a Unix socket in that folder only), a random password, and the
//! folder removed when the cluster stops.
//!
//! [`shared`] is the one cluster of a test process, started on first use;
//! each test makes a database of its own in it ([`Postgres::create_database`]).
//! [`Postgres::start`] makes a cluster of one's own, stopped when dropped.
//!
//! PostgreSQL refuses to run as root, and tests run as root: then `initdb`
//! and `postgres` run as the `postgres` user (`setpriv`), in a folder that
//! user owns. The cluster is stopped and its folder removed by a small shell
//! that waits for its standard input to close: when the [`Postgres`] is
//! dropped, or when the test process ends in any way (the kernel closes the
//! pipe), even killed, so no cluster outlives its tests.

use std::io::{self, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long the cluster may take to accept connections.
const READY_WITHIN: Duration = Duration::from_secs(60);

/// How long `createdb` may take.
const COMMAND_WITHIN: Duration = Duration::from_secs(60);

/// The superuser (and the Unix user it runs as when the tests are root).
const SUPERUSER: &str = "postgres";

static NEXT: AtomicU64 = AtomicU64::new(0);

/// A running cluster; stopped and removed when dropped (see the module's
/// documentation).
#[derive(Debug)]
pub struct Postgres {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    password: String,
    /// The watchdog shell; its standard input closing stops the cluster.
    child: Option<Child>,
    stdin: Option<ChildStdin>,
}

/// The cluster of this test process, started on first use and stopped when
/// the process ends. Panics, saying what to install, when PostgreSQL is not.
pub fn shared() -> &'static Postgres {
    static SHARED: OnceLock<Postgres> = OnceLock::new();
    SHARED.get_or_init(|| Postgres::start().unwrap_or_else(|e| panic!("{e}")))
}

impl Postgres {
    /// Starts a cluster of its own.
    pub fn start() -> Result<Self, String> {
        let bin = binaries()?;
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("octo-pg-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        make_private_dir(&dir)?;
        let password = random_word();
        let result = initdb(&bin, &dir, &password).and_then(|()| {
            let mut last = String::new();
            for _ in 0..5 {
                match Self::try_run(&bin, &dir, &password) {
                    Ok(pg) => return Ok(pg),
                    Err(e) => last = e,
                }
            }
            Err(last)
        });
        result.map_err(|e| {
            let _ = std::fs::remove_dir_all(&dir);
            format!("the test PostgreSQL cluster did not start: {e}")
        })
    }

    /// Runs the server on a free port (another is tried when that one is
    /// taken before the server binds it).
    fn try_run(bin: &Path, dir: &Path, password: &str) -> Result<Self, String> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("finding a free port: {e}"))?
            .port();
        let data = dir.join("data");
        let _ = std::fs::remove_file(data.join("postmaster.pid"));
        let mut server = as_superuser(&bin.join("postgres"));
        server
            .arg("-D")
            .arg(&data)
            .arg("-p")
            .arg(port.to_string())
            .arg("-k")
            .arg(dir)
            // Throwaway: speed over durability.
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off", "-c", "max_connections=300"])
            .args(["-c", "shared_buffers=32MB"]);
        // The watchdog: runs the server, stops it (immediate shutdown) when
        // its standard input closes, and removes the folder once it ends.
        let script = r#"dir="$1"; shift
"$@" >>"$dir/postgres.log" 2>&1 &
pid=$!
exec 3<&0
( read -r _ <&3; kill -QUIT "$pid" 2>/dev/null ) &
reader=$!
wait "$pid"
kill "$reader" 2>/dev/null
rm -rf "$dir""#;
        let mut argv = vec![server.get_program().to_owned()];
        argv.extend(server.get_args().map(ToOwned::to_owned));
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .arg(dir)
            .args(argv)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("running sh: {e}"))?;
        let stdin = child.stdin.take();
        let mut pg = Postgres {
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
            port,
            password: password.to_string(),
            child: Some(child),
            stdin,
        };
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if let Some(Ok(Some(status))) = pg.child.as_mut().map(Child::try_wait) {
                pg.child = None;
                pg.stdin = None;
                // The watchdog removed the folder; make it again for the next try.
                let log = pg.log();
                let _ = make_private_dir(dir).and_then(|()| initdb(bin, dir, password));
                return Err(format!(
                    "postgres exited ({status}) before accepting connections; its log:\n{log}"
                ));
            }
            if ready(&data) {
                return Ok(pg);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "postgres did not accept connections within {READY_WITHIN:?}; its log:\n{}",
                    pg.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `name`, as the superuser (with its password).
    pub fn url(&self, name: &str) -> String {
        format!(
            "postgres://{SUPERUSER}:{}@127.0.0.1:{}/{name}",
            self.password, self.port
        )
    }

    /// A new, empty database; its URL.
    pub fn create_database(&self) -> String {
        let name = format!(
            "octo_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let out = run_bounded(
            Command::new(self.bin.join("createdb"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                .args(["-U", SUPERUSER, &name])
                .env("PGPASSWORD", &self.password)
                .env("PGCONNECT_TIMEOUT", "30"),
        );
        match out {
            Ok(o) if o.status.success() => self.url(&name),
            Ok(o) => panic!(
                "createdb {name} failed ({}): {}{}\nthe cluster's log:\n{}",
                o.status,
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr),
                self.log()
            ),
            Err(e) => panic!("createdb {name}: {e}"),
        }
    }

    /// Runs `sql` with `psql` in the database `url` names (one of this
    /// cluster's, as [`Postgres::create_database`] gave it), as the
    /// superuser: what it printed (unaligned, tuples only). Panics, with
    /// psql's message, when it fails. For a test that must set what the API
    /// refuses on purpose (e.g. a policy checking every 2 s).
    pub fn psql(&self, url: &str, sql: &str) -> String {
        let name = url.rsplit('/').next().unwrap_or_default();
        let out = run_bounded(
            Command::new(self.bin.join("psql"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                .args(["-U", SUPERUSER, "-d", name])
                .args(["-v", "ON_ERROR_STOP=1", "-At", "-c", sql])
                .env("PGPASSWORD", &self.password)
                .env("PGCONNECT_TIMEOUT", "30"),
        );
        match out {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
            Ok(o) => panic!(
                "psql in {name} failed ({}): {}{}",
                o.status,
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => panic!("psql in {name}: {e}"),
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }

    /// Stops the cluster and removes its folder (waits for both).
    pub fn stop(&mut self) {
        self.stdin = None;
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The folder holding `initdb` and `postgres`: `$OCTO_PG_BIN`, or the newest
/// `/usr/lib/postgresql/*/bin` (Debian).
fn binaries() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("OCTO_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).ok_or_else(|| {
        "PostgreSQL is not installed: install Debian's `postgresql` package (`apt-get install \
         postgresql`; scripts/test.sh does), or set OCTO_PG_BIN to the folder holding initdb \
         and postgres"
            .to_string()
    })
}

/// Whether the tests run as root (PostgreSQL then runs as `postgres`).
fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `program`, run as the superuser's Unix user when the tests are root.
fn as_superuser(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args([
            &format!("--reuid={SUPERUSER}"),
            &format!("--regid={SUPERUSER}"),
            "--init-groups",
        ])
        .arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// `dir`, mode 0700, owned by the user PostgreSQL runs as.
fn make_private_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("creating {}: {e}", dir.display()))?;
    if is_root() {
        let user = nix::unistd::User::from_name(SUPERUSER)
            .ok()
            .flatten()
            .ok_or_else(|| {
                format!(
                    "there is no `{SUPERUSER}` user to run PostgreSQL as (it refuses root); \
                     Debian's `postgresql` package creates it"
                )
            })?;
        nix::unistd::chown(dir, Some(user.uid), Some(user.gid))
            .map_err(|e| format!("giving {} to {SUPERUSER}: {e}", dir.display()))?;
    }
    Ok(())
}

/// `initdb` into `dir/data`: UTF-8, C locale, password authentication.
fn initdb(bin: &Path, dir: &Path, password: &str) -> Result<(), String> {
    let pwfile = dir.join("pwfile");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&pwfile)
            .map_err(|e| format!("writing {}: {e}", pwfile.display()))?;
        writeln!(f, "{password}").map_err(|e| format!("writing {}: {e}", pwfile.display()))?;
    }
    if is_root() {
        if let Some(user) = nix::unistd::User::from_name(SUPERUSER).ok().flatten() {
            let _ = nix::unistd::chown(&pwfile, Some(user.uid), Some(user.gid));
        }
    }
    let out = run_bounded(
        as_superuser(&bin.join("initdb"))
            .arg("-D")
            .arg(dir.join("data"))
            .args(["-U", SUPERUSER, "--auth=scram-sha-256", "--encoding=UTF8"])
            .args(["--locale=C", "--no-sync"])
            .arg(format!("--pwfile={}", pwfile.display())),
    );
    let _ = std::fs::remove_file(&pwfile);
    match out {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "initdb failed ({}): {}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )),
        Err(e) => Err(format!("running initdb: {e}")),
    }
}

/// Whether the server in `data` accepts connections: the status line of
/// its `postmaster.pid` says "ready".
fn ready(data: &Path) -> bool {
    std::fs::read_to_string(data.join("postmaster.pid"))
        .map(|pid| pid.lines().nth(7).is_some_and(|l| l.trim() == "ready"))
        .unwrap_or(false)
}

/// Runs a command to its end, killing it after [`COMMAND_WITHIN`].
fn run_bounded(cmd: &mut Command) -> io::Result<std::process::Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + COMMAND_WITHIN;
    loop {
        if child.try_wait()?.is_some() {
            return child.wait_with_output();
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no end within {COMMAND_WITHIN:?}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// 32 random letters and digits.
fn random_word() -> String {
    use rand::distr::{Alphanumeric, SampleString};
    Alphanumeric.sample_string(&mut rand::rng(), 32)
}
