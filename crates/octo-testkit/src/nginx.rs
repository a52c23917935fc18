//! A real nginx (Debian packages `nginx` and `libnginx-mod-stream`) on
//! 127.0.0.1 with a generated `stream {}` configuration: TCP pass-through, or
//! routing by TLS SNI (`ssl_preread`). Started as a child process in a
//! temporary directory (one process: `daemon off; master_process off;`, so
//! killing it leaves no workers behind), ready once its listening socket
//! exists, killed and cleaned up when dropped.
//!
//! nginx only relays bytes here: TLS stays end to end between tentacle and
//! server, as it must for thumbprint pinning.

use std::collections::HashSet;
use std::io;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long nginx may take to listen.
const READY_WITHIN: Duration = Duration::from_secs(10);

/// Where Debian installs the dynamic stream module.
const STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

/// A running nginx; killed (and its directory removed) when dropped.
#[derive(Debug)]
pub struct Nginx {
    child: Option<Child>,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

static NEXT_DIR: AtomicU64 = AtomicU64::new(0);

impl Nginx {
    /// TCP pass-through: each connection to [`Nginx::addr`] is relayed byte
    /// for byte to `upstream` (`proxy_pass` in a `stream` server).
    pub fn pass_through(upstream: SocketAddr) -> Self {
        Self::start(&|port| {
            format!(
                "    server {{\n        listen 127.0.0.1:{port};\n        proxy_pass {upstream};\n    }}\n"
            )
        })
    }

    /// A round-robin TCP balancer: each connection goes to the next of
    /// `upstreams` in turn, skipping one that refuses connections (for 5 s
    /// after it failed once), as a load balancer in front of server nodes.
    pub fn round_robin(upstreams: &[SocketAddr]) -> Self {
        let mut group = String::from("    upstream nodes {\n");
        for u in upstreams {
            group.push_str(&format!(
                "        server {u} max_fails=1 fail_timeout=5s;\n"
            ));
        }
        group.push_str("    }\n");
        Self::start(&move |port| {
            format!(
                "{group}    server {{\n        listen 127.0.0.1:{port};\n        proxy_connect_timeout 2s;\n        proxy_pass nodes;\n    }}\n"
            )
        })
    }

    /// Routing by the TLS server name the client sends (SNI), read with
    /// `ssl_preread` without terminating TLS: connections naming `routes[i].0`
    /// go to `routes[i].1`; others to `default`, or are closed when None.
    pub fn sni_router(routes: &[(&str, SocketAddr)], default: Option<SocketAddr>) -> Self {
        let mut map = String::from("    map $ssl_preread_server_name $backend {\n");
        for (name, upstream) in routes {
            map.push_str(&format!("        {name} {upstream};\n"));
        }
        if let Some(d) = default {
            map.push_str(&format!("        default {d};\n"));
        }
        map.push_str("    }\n");
        Self::start(&move |port| {
            format!(
                "{map}    server {{\n        listen 127.0.0.1:{port};\n        ssl_preread on;\n        proxy_pass $backend;\n    }}\n"
            )
        })
    }

    /// Starts nginx with the `stream {}` servers `servers(port)` returns, on a
    /// free port of 127.0.0.1 (another port is tried if that one is lost to
    /// someone else before nginx binds it). Panics with what to do when nginx
    /// or its stream module is missing.
    pub fn start(servers: &dyn Fn(u16) -> String) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "octo-nginx-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create nginx directory");
        let mut last = String::new();
        for _ in 0..5 {
            match Self::try_start(&dir, servers) {
                Ok(n) => return n,
                Err(e) => last = e,
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        panic!("nginx did not start: {last}");
    }

    fn try_start(dir: &Path, servers: &dyn Fn(u16) -> String) -> Result<Self, String> {
        let port = StdListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("finding a free port: {e}"))?
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let conf = dir.join("nginx.conf");
        let error_log = dir.join("error.log");
        let _ = std::fs::remove_file(&error_log);
        std::fs::write(&conf, config_text(dir, &servers(port)))
            .map_err(|e| format!("writing {}: {e}", conf.display()))?;
        let out = std::fs::File::create(dir.join("stderr.log"))
            .map_err(|e| format!("creating the output file: {e}"))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new("nginx")
            .arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(&error_log)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    "the `nginx` program is not installed; install it with `apt-get install nginx libnginx-mod-stream` (scripts/test.sh does this)".to_string()
                } else {
                    format!("running nginx: {e}")
                }
            })?;
        let mut nginx = Self {
            child: Some(child),
            addr,
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            let pid = match nginx.child.as_mut().map(Child::try_wait) {
                Some(Ok(Some(status))) => {
                    nginx.child = None;
                    return Err(format!(
                        "it exited ({status}); its output:\n{}",
                        nginx.output()
                    ));
                }
                Some(Ok(None)) => nginx.child.as_ref().map(Child::id),
                _ => None,
            };
            // Ready once nginx itself holds a listening socket on the port:
            // probing with a connection would be relayed upstream, and could
            // reach someone else's socket if nginx lost the port.
            if pid.is_some_and(|pid| listens(pid, port)) {
                return Ok(nginx);
            }
            if Instant::now() >= deadline {
                let output = nginx.output();
                nginx.stop();
                return Err(format!(
                    "not listening on {addr} within {READY_WITHIN:?}; its output:\n{output}"
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// nginx's error log (level info: one line per relayed connection, naming
    /// client and upstream) followed by its access log (one line per finished
    /// session: client, SNI, upstream, bytes each way).
    pub fn output(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        format!(
            "{}{}{}",
            read("stderr.log"),
            read("error.log"),
            read("access.log")
        )
    }

    /// The upstream addresses nginx connected to so far ("proxy A connected to B").
    pub fn upstreams(&self) -> Vec<SocketAddr> {
        std::fs::read_to_string(self.dir.join("error.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(" proxy ") && l.contains(" connected to "))
            .filter_map(|l| l.rsplit(" connected to ").next())
            .filter_map(|a| a.trim().parse().ok())
            .collect()
    }

    /// Kills nginx (it is down from now on).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn config_text(dir: &Path, servers: &str) -> String {
    let load = if Path::new(STREAM_MODULE).exists() {
        format!("load_module {STREAM_MODULE};\n")
    } else {
        String::new() // built in, or missing: nginx then says "unknown directive stream"
    };
    let dir = dir.display();
    format!(
        "{load}daemon off;\nmaster_process off;\nworker_processes 1;\npid {dir}/nginx.pid;\n\
         error_log {dir}/error.log info;\n\
         events {{\n    worker_connections 256;\n}}\n\
         stream {{\n    log_format relay '$remote_addr sni=$ssl_preread_server_name upstream=$upstream_addr sent=$bytes_sent received=$bytes_received status=$status';\n    access_log {dir}/access.log relay;\n{servers}}}\n"
    )
}

/// Whether process `pid` holds a socket listening on 127.0.0.1:`port`.
fn listens(pid: u32, port: u16) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    let inodes: HashSet<String> = fds
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            l.to_str()
                .and_then(|s| s.strip_prefix("socket:["))
                .and_then(|s| s.strip_suffix(']'))
                .map(str::to_string)
        })
        .collect();
    let local = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .any(|f| f.len() > 9 && f[1] == local && f[3] == "0A" && inodes.contains(f[9]))
}
