//! Linux network namespaces for tests: a NAT between a server and a tentacle,
//! and a path that can be cut silently (packets dropped, no answer).
//!
//! Built with the real tools (`ip` from iproute2, `iptables` from Debian's
//! `iptables` package, nftables backend). Namespaces get unique names
//! (`octo-ROLE-PID-N`) so tests run in parallel; interfaces live only inside
//! their namespaces, so their names and addresses never clash with the host's
//! or another test's. Dropping a [`Namespace`] kills every process still in it
//! and deletes it, also when the test failed; namespaces left by a test process
//! that was killed outright are swept at the next [`Namespace::create`].
//!
//! Tests skip (with a message) only when the OS refuses namespaces
//! ([`Refused`], e.g. `ip netns add` failing with EPERM in an unprivileged
//! container); a missing tool is an error naming the package to install.

use std::ffi::OsStr;
use std::fmt;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

/// The OS refused to create namespaces or links (not privileged enough).
#[derive(Debug, Clone)]
pub struct Refused(pub String);

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "network namespaces are not available here ({}); run as root (CI does) to run this test",
            self.0
        )
    }
}

/// Prefix of every namespace these helpers create.
const PREFIX: &str = "octo-";

static NEXT: AtomicU64 = AtomicU64::new(0);

/// Runs a plumbing command; Err(Refused) when the OS refused it for lack of
/// privilege; panics on any other failure (with the command and its output).
fn plumb(program: &str, args: &[&str]) -> Result<Output, Refused> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            let package = if program == "iptables" {
                "iptables"
            } else {
                "iproute2"
            };
            panic!("cannot run `{program}` ({e}); install it with `apt-get install {package}` (scripts/test.sh does)")
        });
    if out.status.success() {
        return Ok(out);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("Operation not permitted") || stderr.contains("Permission denied") {
        return Err(Refused(format!(
            "`{program} {}`: {}",
            args.join(" "),
            stderr.trim()
        )));
    }
    panic!(
        "`{program} {}` failed ({}): {}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        stderr
    );
}

/// A named network namespace; everything in it is killed and the namespace
/// deleted when this is dropped.
#[derive(Debug)]
pub struct Namespace {
    name: String,
}

impl Namespace {
    /// Creates `octo-ROLE-PID-N` with its loopback up.
    pub fn create(role: &str) -> Result<Self, Refused> {
        sweep_stale();
        let name = format!(
            "{PREFIX}{role}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        plumb("ip", &["netns", "add", &name])?;
        let ns = Namespace { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name (for `ip netns exec`, `ip -n`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME ARGS...`.
    pub fn ip(&self, args: &[&str]) -> Result<(), Refused> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        plumb("ip", &all).map(|_| ())
    }

    /// Runs `program ARGS...` inside the namespace and waits for it.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output, Refused> {
        let mut all = vec!["netns", "exec", self.name.as_str(), program];
        all.extend_from_slice(args);
        plumb("ip", &all)
    }

    /// A command that runs `program` inside the namespace (`ip netns exec`
    /// execs it, so the child's pid is the program's).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Kills every process in the namespace (SIGKILL).
    pub fn kill_all(&self) {
        kill_all_in(&self.name);
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        kill_all_in(&self.name);
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Pids of the processes in namespace `name`.
fn pids_in(name: &str) -> Vec<String> {
    Command::new("ip")
        .args(["netns", "pids", name])
        .stderr(Stdio::null())
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn kill_all_in(name: &str) {
    // A process may fork while we kill: a few rounds.
    for _ in 0..5 {
        let pids = pids_in(name);
        if pids.is_empty() {
            return;
        }
        let _ = Command::new("kill")
            .arg("-KILL")
            .args(&pids)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Deletes namespaces of ours whose test process no longer exists (it was
/// killed before its guards ran).
fn sweep_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        // ROLE-PID-N
        let mut parts = rest.rsplitn(3, '-');
        let (_, pid) = (parts.next(), parts.next());
        let Some(pid) = pid.and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            kill_all_in(name);
            let _ = Command::new("ip")
                .args(["netns", "del", name])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Three namespaces: a server on the "internet", a NAT router, and a private
/// network behind the router.
///
/// ```text
///  server 10.99.1.2 ──wan── 10.99.1.1 router 10.99.2.1 ──lan── 10.99.2.2 inside
///  (default via router)       forwarding, MASQUERADE          (default via router)
///                             lan→wan: allowed; wan→lan: replies only
/// ```
///
/// Like a home or office router: connections from inside go out (with the
/// router's address as source); nothing from outside can open a connection to
/// an inside address (its packets are dropped silently), and the router's own
/// outside address has nothing listening (a connection there is refused).
#[derive(Debug)]
pub struct NatLab {
    /// The server's namespace ([`NatLab::SERVER_IP`]).
    pub server: Namespace,
    /// The router's namespace.
    pub router: Namespace,
    /// The private network's namespace ([`NatLab::INSIDE_IP`]).
    pub inside: Namespace,
}

impl NatLab {
    /// The server's address.
    pub const SERVER_IP: &'static str = "10.99.1.2";
    /// The router's outside address (the NAT's public address).
    pub const ROUTER_OUTSIDE_IP: &'static str = "10.99.1.1";
    /// The router's inside address.
    pub const ROUTER_INSIDE_IP: &'static str = "10.99.2.1";
    /// The inside host's address (private: unreachable from the server).
    pub const INSIDE_IP: &'static str = "10.99.2.2";

    /// Creates the namespaces, links, addresses, routes and NAT rules.
    pub fn create() -> Result<Self, Refused> {
        let lab = NatLab {
            server: Namespace::create("srv")?,
            router: Namespace::create("nat")?,
            inside: Namespace::create("in")?,
        };
        let (srv, inside) = (lab.server.name(), lab.inside.name());
        // veth pairs created inside the router's namespace, the peer moved at once.
        lab.router.ip(&[
            "link", "add", "wan", "type", "veth", "peer", "name", "eth0", "netns", srv,
        ])?;
        lab.router.ip(&[
            "link", "add", "lan", "type", "veth", "peer", "name", "eth0", "netns", inside,
        ])?;
        for (ns, dev, addr) in [
            (&lab.server, "eth0", "10.99.1.2/24"),
            (&lab.router, "wan", "10.99.1.1/24"),
            (&lab.router, "lan", "10.99.2.1/24"),
            (&lab.inside, "eth0", "10.99.2.2/24"),
        ] {
            ns.ip(&["addr", "add", addr, "dev", dev])?;
            ns.ip(&["link", "set", dev, "up"])?;
        }
        lab.server
            .ip(&["route", "add", "default", "via", Self::ROUTER_OUTSIDE_IP])?;
        lab.inside
            .ip(&["route", "add", "default", "via", Self::ROUTER_INSIDE_IP])?;
        lab.router
            .exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        lab.iptables(&[
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-s",
            "10.99.2.0/24",
            "-o",
            "wan",
            "-j",
            "MASQUERADE",
        ])?;
        lab.iptables(&[
            "-A",
            "FORWARD",
            "-i",
            "wan",
            "-o",
            "lan",
            "-m",
            "conntrack",
            "--ctstate",
            "NEW",
            "-j",
            "DROP",
        ])?;
        Ok(lab)
    }

    fn iptables(&self, args: &[&str]) -> Result<(), Refused> {
        // -w: wait for the xtables lock rather than fail beside another test.
        let mut all = vec!["-w"];
        all.extend_from_slice(args);
        self.router.exec("iptables", &all).map(|_| ())
    }

    /// Cuts the path through the router silently: every forwarded packet, either
    /// way, is dropped (no RST, no ICMP), like a dead link or a firewall that
    /// drops. Established connections see nothing at all.
    pub fn cut(&self) {
        self.iptables(&["-I", "FORWARD", "1", "-j", "DROP"])
            .expect("cut the path");
    }

    /// Undoes [`NatLab::cut`].
    pub fn restore(&self) {
        self.iptables(&["-D", "FORWARD", "-j", "DROP"])
            .expect("restore the path");
    }
}
