//! The deploy scripts: at the package root, for each stage in order (`PreDeploy`,
//! `Deploy`, `PostDeploy`), `<Stage>.sh` with bash, then `<Stage>.py` with python3 (when
//! python3 is on PATH; else a warning says the script was skipped).
//!
//! What this module keeps true:
//! - a script runs in the package folder with the inherited environment plus every
//!   variable, under its exact name and its sanitized name ([`Variables::environment`]),
//!   stdin empty;
//! - its stdout and stderr are forwarded live, line by line, to calamari's stdout and
//!   stderr (one reader thread each; lines kept whole up to 64 KiB, bytes that are not
//!   UTF-8 replaced);
//! - the first script that fails (non-zero exit, or killed by a signal) stops the
//!   deployment; nothing after it runs;
//! - a `setVariable` service message printed by a script is forwarded unchanged and makes
//!   `Octopus.Action.Output.<name>` visible to the scripts that run after it;
//! - calamari never waits on a background process the script left behind: once the
//!   script has exited, its output is drained for at most [`DRAIN_AFTER_EXIT`].

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::console;
use crate::error::DeployError;
use crate::service_message::{self, ServiceMessage};
use crate::time::seconds;
use crate::variables::{Variables, OUTPUT_PREFIX};

/// The stages, in the order they run.
pub const STAGES: [&str; 3] = ["PreDeploy", "Deploy", "PostDeploy"];

/// How long a script's output is still read after it exited.
pub const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(1);

/// Longest line forwarded as one; longer ones are split.
pub const MAX_LINE: usize = 64 * 1024;

/// One script that ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptRun {
    /// Its file name, e.g. `Deploy.sh`.
    pub script: String,
    /// How it ended.
    pub status: ExitStatus,
    /// The `setVariable` messages it printed: (name, value).
    pub output_variables: Vec<(String, String)>,
}

/// Runs the stages' scripts found in `root`, in order, adding output variables to
/// `vars` as scripts set them. Answers the scripts that ran; the first failure is an
/// error of kind [`crate::ErrorKind::ScriptFailed`].
pub fn run_stages(root: &Path, vars: &mut Variables) -> Result<Vec<ScriptRun>, DeployError> {
    let python = find_on_path("python3");
    let mut runs = Vec::new();
    for stage in STAGES {
        for ext in ["sh", "py"] {
            let file = format!("{stage}.{ext}");
            let path = root.join(&file);
            if !path.is_file() {
                continue;
            }
            let interpreter: (PathBuf, Vec<OsString>) = if ext == "sh" {
                (PathBuf::from("bash"), vec![path.clone().into()])
            } else if let Some(python) = &python {
                (python.clone(), vec!["-u".into(), path.clone().into()])
            } else {
                console::warn(&format!(
                    "{file} skipped: python3 is not on PATH; install python3 on this machine to run it"
                ));
                continue;
            };
            let run = run_script(&file, &interpreter.0, &interpreter.1, root, vars)?;
            for (name, value) in &run.output_variables {
                vars.set(format!("{OUTPUT_PREFIX}{name}"), value.clone());
                console::info(&format!(
                    "Output variable {OUTPUT_PREFIX}{name} set by {file}"
                ));
            }
            let failed = !run.status.success();
            let status = run.status;
            runs.push(run);
            if failed {
                return Err(DeployError::new(
                    crate::ErrorKind::ScriptFailed,
                    format!(
                        "{file} {}\nscript: {}\nthe deployment stopped there; fix the script or what it deploys, then deploy again",
                        describe(status),
                        path.display()
                    ),
                ));
            }
        }
    }
    if runs.is_empty() {
        console::info("No deploy scripts in the package (PreDeploy, Deploy, PostDeploy .sh/.py)");
    }
    Ok(runs)
}

/// "exited with code 3" or "was killed by signal 9 (SIGKILL)".
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(sig)) => match nix::sys::signal::Signal::try_from(sig) {
            Ok(s) => format!("was killed by signal {sig} ({})", s.as_str()),
            Err(_) => format!("was killed by signal {sig}"),
        },
        (None, None) => format!("ended with status {status}"),
    }
}

enum Event {
    Variable(String, String),
    Done,
}

fn run_script(
    file: &str,
    program: &Path,
    args: &[OsString],
    cwd: &Path,
    vars: &Variables,
) -> Result<ScriptRun, DeployError> {
    let (env, skipped) = vars.environment();
    if !skipped.is_empty() {
        console::warn(&format!(
            "variables not passed to {file} as environment variables (name empty or containing `=`, or value containing NUL): {}",
            skipped.join(", ")
        ));
    }
    console::info(&format!("Running {file}"));
    let started = Instant::now();
    let mut child = Command::new(program)
        .args(args)
        .current_dir(cwd)
        .env_remove(crate::variables::SENSITIVE_VARIABLES_ENV)
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            DeployError::other(format!(
                "starting {file} with {} failed: {e}\nfolder: {}\ncheck that {} is installed and on PATH",
                program.display(),
                cwd.display(),
                program.display()
            ))
        })?;
    let (tx, rx) = mpsc::channel();
    let mut readers = 0;
    if let Some(stdout) = child.stdout.take() {
        let tx = tx.clone();
        spawn_reader(file, "stdout", move || {
            for_each_line(stdout, |line| {
                console::forward_stdout(line);
                if let Some(ServiceMessage::SetVariable { name, value, .. }) =
                    std::str::from_utf8(line)
                        .ok()
                        .and_then(service_message::parse)
                {
                    let _ = tx.send(Event::Variable(name, value));
                }
            });
            let _ = tx.send(Event::Done);
        })?;
        readers += 1;
    }
    if let Some(stderr) = child.stderr.take() {
        let tx = tx.clone();
        spawn_reader(file, "stderr", move || {
            for_each_line(stderr, console::forward_stderr);
            let _ = tx.send(Event::Done);
        })?;
        readers += 1;
    }
    drop(tx);
    let status = child
        .wait()
        .map_err(|e| DeployError::io(&format!("waiting for {file}"), cwd, &e))?;
    let elapsed = started.elapsed();
    let deadline = Instant::now() + DRAIN_AFTER_EXIT;
    let mut output_variables = Vec::new();
    let mut done = 0;
    while done < readers {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Event::Variable(name, value)) => output_variables.push((name, value)),
            Ok(Event::Done) => done += 1,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                console::warn(&format!(
                    "{file} exited but a process it started still holds its output open; not waiting for it"
                ));
                break;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    // Messages already read but not yet received.
    while let Ok(event) = rx.try_recv() {
        if let Event::Variable(name, value) = event {
            output_variables.push((name, value));
        }
    }
    let ended = match status.code() {
        Some(code) => format!("exit code {code}"),
        None => describe(status).replacen("was ", "", 1),
    };
    console::info(&format!("{file} finished ({ended}, {})", seconds(elapsed)));
    Ok(ScriptRun {
        script: file.to_owned(),
        status,
        output_variables,
    })
}

fn spawn_reader(
    file: &str,
    stream: &str,
    f: impl FnOnce() + Send + 'static,
) -> Result<(), DeployError> {
    std::thread::Builder::new()
        .name(format!("{stream} of {file}"))
        .spawn(f)
        .map(drop)
        .map_err(|e| {
            DeployError::other(format!(
                "starting a thread to read the {stream} of {file} failed: {e}"
            ))
        })
}

/// Calls `f` with each line of `reader` (without its `\n`; lines longer than
/// [`MAX_LINE`] in pieces), the last one even without a line break.
pub fn for_each_line(reader: impl Read, mut f: impl FnMut(&[u8])) {
    let mut reader = BufReader::with_capacity(MAX_LINE, reader);
    let mut line = Vec::new();
    loop {
        let buf = match reader.fill_buf() {
            Ok([]) => break,
            Ok(buf) => buf,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let room = MAX_LINE - line.len();
        let (take, complete) = match buf.iter().take(room).position(|b| *b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len().min(room), line.len() + buf.len() >= MAX_LINE),
        };
        line.extend_from_slice(&buf[..take]);
        reader.consume(take);
        if complete {
            if line.last() == Some(&b'\n') {
                line.pop();
            }
            f(&line);
            line.clear();
        }
    }
    if !line.is_empty() {
        f(&line);
    }
}

/// The first executable file called `name` in the directories of `PATH`.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join(name))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for_each_line(input, |l| out.push(l.to_vec()));
        out
    }

    #[test]
    fn splits_lines() {
        assert_eq!(lines(b""), Vec::<Vec<u8>>::new());
        assert_eq!(lines(b"a\nb\n"), vec![b"a".to_vec(), b"b".to_vec()]);
        assert_eq!(
            lines(b"a\n\nlast"),
            vec![b"a".to_vec(), b"".to_vec(), b"last".to_vec()]
        );
        let long = vec![b'x'; MAX_LINE + 10];
        let got = lines(&long);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].len(), MAX_LINE);
        assert_eq!(got[1].len(), 10);
    }
}
