//! A real tinyproxy (Debian package `tinyproxy`) on 127.0.0.1, started as a
//! child process with a generated configuration in a temporary directory and
//! killed when dropped; and [`Tap`], a relay that records the first bytes each
//! connection carries (to show what travels inside a proxy's tunnel).

use std::io;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use octo_comms::proxy::ProxyConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How long tinyproxy may take to accept connections.
const READY_WITHIN: Duration = Duration::from_secs(10);

/// What the proxy allows.
#[derive(Debug, Clone, Default)]
pub struct TinyproxyOptions {
    /// `BasicAuth USER PASSWORD`: only authenticated clients are served.
    pub basic_auth: Option<(String, String)>,
    /// `ConnectPort N` lines: CONNECT only to these ports (empty: any port).
    pub connect_ports: Vec<u16>,
}

/// A running tinyproxy; killed (and its directory removed) when dropped.
#[derive(Debug)]
pub struct Tinyproxy {
    child: Option<Child>,
    addr: SocketAddr,
    dir: PathBuf,
    log: PathBuf,
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

static NEXT_DIR: AtomicU64 = AtomicU64::new(0);

impl Tinyproxy {
    /// Starts tinyproxy on a free port of 127.0.0.1 and waits (bounded) until it
    /// accepts connections (it logs so after binding; a port lost to someone
    /// else meanwhile makes it exit, and another port is tried). Panics with what to do when tinyproxy is missing.
    pub fn start(options: &TinyproxyOptions) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "octo-tinyproxy-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create tinyproxy directory");
        // A port picked by the OS may be taken again before tinyproxy binds it:
        // try a few.
        let mut last = String::new();
        for _ in 0..5 {
            match Self::try_start(&dir, options) {
                Ok(p) => return p,
                Err(e) => last = e,
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        panic!("tinyproxy did not start: {last}");
    }

    fn try_start(dir: &Path, options: &TinyproxyOptions) -> Result<Self, String> {
        let port = StdListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("finding a free port: {e}"))?
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let conf = dir.join("tinyproxy.conf");
        let log = dir.join("tinyproxy.log");
        std::fs::write(&conf, config_text(port, options))
            .map_err(|e| format!("writing {}: {e}", conf.display()))?;
        let out = std::fs::File::create(&log).map_err(|e| format!("creating the log: {e}"))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new("tinyproxy")
            .arg("-d")
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    "the `tinyproxy` program is not installed; install it with `apt-get install tinyproxy` (scripts/test.sh does this)".to_string()
                } else {
                    format!("running tinyproxy: {e}")
                }
            })?;
        let mut proxy = Self {
            child: Some(child),
            addr,
            dir: dir.to_path_buf(),
            log,
        };
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if let Some(Ok(Some(status))) = proxy.child.as_mut().map(Child::try_wait) {
                let log = proxy.log();
                proxy.child = None;
                return Err(format!("it exited ({status}); its log:\n{log}"));
            }
            // Ready once it says so: probing the port instead could reach
            // another test's socket if tinyproxy lost the port to it.
            if proxy.log().contains("Accepting connections") {
                return Ok(proxy);
            }
            if Instant::now() >= deadline {
                let log = proxy.log();
                proxy.stop();
                return Err(format!(
                    "not accepting on {addr} within {READY_WITHIN:?}; its log:\n{log}"
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// This proxy, without credentials.
    pub fn config(&self) -> ProxyConfig {
        ProxyConfig::new(&self.addr.ip().to_string(), self.addr.port())
    }

    /// Everything tinyproxy logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The request lines tinyproxy received ("CONNECT 127.0.0.1:1234 HTTP/1.1").
    pub fn requests(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter_map(|l| l.split_once("): "))
            .filter(|(head, _)| head.contains("Request (file descriptor"))
            .map(|(_, rest)| rest.trim().to_string())
            .collect()
    }

    /// Kills the proxy (it is down from now on).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn config_text(port: u16, options: &TinyproxyOptions) -> String {
    let mut s = String::new();
    let mut line = |l: String| {
        s.push_str(&l);
        s.push('\n');
    };
    // As root, tinyproxy drops privileges after binding; say to whom (numeric:
    // the group is "nogroup" on Debian, "nobody" elsewhere).
    if is_root() {
        line("User 65534".into());
        line("Group 65534".into());
    }
    line("Listen 127.0.0.1".into());
    line(format!("Port {port}"));
    line("Timeout 600".into());
    line("MaxClients 100".into());
    line("Allow 127.0.0.1".into());
    // Info logs every request line; no LogFile with -d means stderr.
    line("LogLevel Info".into());
    line("DisableViaHeader Yes".into());
    if let Some((user, pass)) = &options.basic_auth {
        line(format!("BasicAuth {user} {pass}"));
    }
    for p in &options.connect_ports {
        line(format!("ConnectPort {p}"));
    }
    s
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// A TCP relay on 127.0.0.1 to `upstream` that records the first bytes each
/// connection sends upstream (up to 64 per connection).
#[derive(Debug)]
pub struct Tap {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Vec<u8>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Tap {
    /// Relays connections made to [`Tap::addr`] to `upstream`.
    pub async fn start(upstream: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let seen: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let record = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let record = record.clone();
                tokio::spawn(async move {
                    let Ok(up) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = down.set_nodelay(true);
                    let _ = up.set_nodelay(true);
                    let index = {
                        let mut r = record.lock().unwrap_or_else(|p| p.into_inner());
                        r.push(Vec::new());
                        r.len() - 1
                    };
                    let (mut dr, mut dw) = down.into_split();
                    let (mut ur, mut uw) = up.into_split();
                    let upward = async move {
                        let mut buf = vec![0u8; 64 << 10];
                        loop {
                            let n = match dr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            {
                                let mut r = record.lock().unwrap_or_else(|p| p.into_inner());
                                let first = &mut r[index];
                                let take = n.min(64usize.saturating_sub(first.len()));
                                first.extend_from_slice(&buf[..take]);
                            }
                            if uw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = uw.shutdown().await;
                    };
                    let downward = async move {
                        let _ = tokio::io::copy(&mut ur, &mut dw).await;
                        let _ = dw.shutdown().await;
                    };
                    tokio::join!(upward, downward);
                });
            }
        });
        Ok(Self { addr, seen, task })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The first bytes each connection sent upstream, in accept order.
    pub fn first_bytes(&self) -> Vec<Vec<u8>> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
