//! Starting a script's process and finding and signalling what it left behind.
//!
//! A script runs as the leader of its own process group, so its children (including
//! `nohup ... &`) can be signalled together. Descendants that left the group
//! (`setsid`, daemons) are found by the environment every script process inherits:
//! `TentacleScriptTicket` and `TentacleHome` together identify one script of one
//! tentacle instance (the same technique as Jenkins' process tree killer).

use std::collections::HashSet;
use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use octo_proto::v1::ScriptSyntax;
use tokio::time::Instant;

/// How a syntax is run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Interpreter {
    pub(crate) program: &'static str,
    pub(crate) leading_args: &'static [&'static str],
    pub(crate) script_file: &'static str,
}

pub(crate) fn interpreter(syntax: ScriptSyntax) -> Interpreter {
    match syntax {
        ScriptSyntax::Unspecified | ScriptSyntax::Bash => Interpreter {
            program: "bash",
            leading_args: &[],
            script_file: "script.sh",
        },
        ScriptSyntax::Sh => Interpreter {
            program: "sh",
            leading_args: &[],
            script_file: "script.sh",
        },
        // -u: unbuffered, so output streams live rather than at exit.
        ScriptSyntax::Python3 => Interpreter {
            program: "python3",
            leading_args: &["-u"],
            script_file: "script.py",
        },
        ScriptSyntax::Powershell => Interpreter {
            program: "pwsh",
            leading_args: &["-NoLogo", "-NoProfile", "-NonInteractive", "-File"],
            script_file: "script.ps1",
        },
    }
}

/// Identifies the processes of one script of one tentacle instance by environment.
#[derive(Debug, Clone)]
pub(crate) struct Cookie {
    ticket_entry: Vec<u8>,
    home_entry: Vec<u8>,
}

impl Cookie {
    pub(crate) fn new(ticket: &str, home: &Path) -> Self {
        let mut home_entry = b"TentacleHome=".to_vec();
        home_entry.extend_from_slice(home.as_os_str().as_bytes());
        Self {
            ticket_entry: format!("TentacleScriptTicket={ticket}").into_bytes(),
            home_entry,
        }
    }

    fn matches(&self, pid: i32) -> bool {
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            return false;
        };
        let mut ticket = false;
        let mut home = false;
        for entry in env.split(|b| *b == 0) {
            ticket |= entry == self.ticket_entry.as_slice();
            home |= entry == self.home_entry.as_slice();
        }
        ticket && home
    }
}

/// Builds the command for a prepared script.
pub(crate) fn command(
    interp: Interpreter,
    dir: &Path,
    arguments: &[String],
    env: &[(OsString, OsString)],
) -> tokio::process::Command {
    let mut cmd = std::process::Command::new(interp.program);
    cmd.args(interp.leading_args)
        .arg(dir.join(interp.script_file))
        .args(arguments)
        .current_dir(dir)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(false);
    cmd
}

/// Which live processes to act on.
#[derive(Debug, Clone)]
pub(crate) struct Selector {
    /// Members of this process group.
    pub(crate) pgid: Option<i32>,
    /// Processes carrying this script's environment, wherever they went.
    pub(crate) cookie: Option<Cookie>,
}

impl Selector {
    /// Live (not zombie) processes selected, never this tentacle itself. Empty where
    /// there is no `/proc`.
    pub(crate) fn scan(&self) -> Vec<i32> {
        self.scan_groups().into_iter().map(|(pid, _)| pid).collect()
    }

    /// True when the selection is a process group alone and that group has no
    /// member at all (signal 0 to the group: ESRCH). The common case after a
    /// script exits; it spares a walk over every process in `/proc`.
    fn group_is_empty(&self) -> bool {
        match (self.pgid, &self.cookie) {
            (Some(pgid), None) => {
                killpg(Pid::from_raw(pgid), None) == Err(nix::errno::Errno::ESRCH)
            }
            _ => false,
        }
    }

    /// Like [`Selector::scan`], with each process's group.
    fn scan_groups(&self) -> Vec<(i32, i32)> {
        if self.group_is_empty() {
            return Vec::new();
        }
        let me = std::process::id() as i32;
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        let mut found = Vec::new();
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            if pid == me {
                continue;
            }
            let Some((state, pgid)) = stat(pid) else {
                continue;
            };
            if state == 'Z' || state == 'X' {
                continue;
            }
            if self.pgid == Some(pgid) || self.cookie.as_ref().is_some_and(|c| c.matches(pid)) {
                found.push((pid, pgid));
            }
        }
        found
    }

    /// Sends `sig` to the group and to every selected process; returns how many
    /// processes were selected.
    pub(crate) fn signal(&self, sig: Signal) -> usize {
        let found = self.scan_groups();
        self.signal_group(&found, sig);
        for (pid, _) in &found {
            let _ = kill(Pid::from_raw(*pid), sig);
        }
        found.len()
    }

    /// Signals the whole group, but only while a live member was just seen: a group id
    /// cannot be reused while the group has a member, so this never hits a stranger
    /// that was given the same number later.
    fn signal_group(&self, found: &[(i32, i32)], sig: Signal) {
        if let Some(pgid) = self.pgid {
            if found.iter().any(|(_, g)| *g == pgid) {
                let _ = killpg(Pid::from_raw(pgid), sig);
            }
        }
    }

    /// Sends SIGKILL to every selected process, scanning again until no new one
    /// appears (a process may fork between a scan and its kill); returns how many.
    pub(crate) fn kill_all(&self) -> usize {
        let mut killed = HashSet::new();
        for _ in 0..50 {
            let found = self.scan_groups();
            self.signal_group(&found, Signal::SIGKILL);
            let new: Vec<i32> = found
                .into_iter()
                .map(|(pid, _)| pid)
                .filter(|p| !killed.contains(p))
                .collect();
            if new.is_empty() {
                break;
            }
            for pid in new {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                killed.insert(pid);
            }
        }
        killed.len()
    }

    /// Waits until no selected process is alive, or `deadline`; true if none is.
    /// With `kill`, anything still found (forked meanwhile) is sent SIGKILL again.
    /// (The death of a process that is not our child has no event to wait on, so this
    /// polls `/proc`.)
    pub(crate) async fn wait_gone(&self, deadline: Instant, kill: bool) -> bool {
        loop {
            if self.scan().is_empty() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            if kill {
                self.kill_all();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// State letter and process group of `pid`, from `/proc/<pid>/stat`.
fn stat(pid: i32) -> Option<(char, i32)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid pgrp ..."; comm may hold spaces and parentheses.
    let rest = &s[s.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let _ppid = fields.next()?;
    let pgid = fields.next()?.parse().ok()?;
    Some((state, pgid))
}
