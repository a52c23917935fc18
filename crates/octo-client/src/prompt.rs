//! Reading passwords: from the terminal without echo when standard input is
//! one (and `--password-stdin` was not given), else line by line from standard
//! input. Passwords never come from the command line (but for the discouraged
//! `user create --password`).
//!
//! Echo is turned off with `stty` on the terminal itself (no extra crate, no
//! unsafe code) and turned back on when the line is read, on error, and on
//! Ctrl-C (which ends the command with exit status 130 rather than leaving the
//! terminal silent).

use std::io::{BufRead, IsTerminal, Write};
use std::process::{Command, Stdio};

use anyhow::Context;

/// Where passwords come from.
#[derive(Debug)]
pub(crate) enum Passwords {
    /// Prompts on the terminal, without echo.
    Terminal,
    /// Lines of standard input, in order.
    Stdin { line: usize },
}

/// Why no password was read.
#[derive(Debug)]
pub(crate) enum Interrupted {
    /// Ctrl-C at a prompt.
    CtrlC,
}

impl Passwords {
    /// From the terminal when standard input is one and `--password-stdin` was
    /// not given, else from standard input's lines.
    pub(crate) fn new(password_stdin: bool) -> Self {
        if !password_stdin && std::io::stdin().is_terminal() {
            Self::Terminal
        } else {
            Self::Stdin { line: 0 }
        }
    }

    pub(crate) fn is_terminal(&self) -> bool {
        matches!(self, Self::Terminal)
    }

    /// The next password: `prompt` on the terminal, or the next line of
    /// standard input, which must not be empty. `what` names it in errors
    /// ("the new password"), `usage` says how to pipe passwords in.
    pub(crate) async fn read(
        &mut self,
        prompt: &str,
        what: &str,
        usage: &str,
    ) -> anyhow::Result<Result<String, Interrupted>> {
        self.read_inner(prompt, what, usage, false).await
    }

    /// As [`Self::read`], but an empty password (an empty line) is an answer.
    pub(crate) async fn read_maybe_empty(
        &mut self,
        prompt: &str,
        what: &str,
        usage: &str,
    ) -> anyhow::Result<Result<String, Interrupted>> {
        self.read_inner(prompt, what, usage, true).await
    }

    async fn read_inner(
        &mut self,
        prompt: &str,
        what: &str,
        usage: &str,
        allow_empty: bool,
    ) -> anyhow::Result<Result<String, Interrupted>> {
        match self {
            Self::Terminal => {
                let Some(p) = read_hidden(prompt).await? else {
                    return Ok(Err(Interrupted::CtrlC));
                };
                if p.is_empty() && !allow_empty {
                    anyhow::bail!("{what} is empty");
                }
                Ok(Ok(p))
            }
            Self::Stdin { line } => {
                *line += 1;
                let n = *line;
                let mut stdin = std::io::stdin().lock();
                Ok(Ok(read_line(&mut stdin, n, what, usage, allow_empty)?))
            }
        }
    }
}

/// Line `n` (counting from 1) of `input`, without its line end: `what`,
/// which must not be empty.
pub(crate) fn next_line(
    input: &mut impl BufRead,
    n: usize,
    what: &str,
    usage: &str,
) -> anyhow::Result<String> {
    read_line(input, n, what, usage, false)
}

/// Line `n` of `input`; an empty line is an error unless `allow_empty`, the
/// end of input always is.
fn read_line(
    input: &mut impl BufRead,
    n: usize,
    what: &str,
    usage: &str,
    allow_empty: bool,
) -> anyhow::Result<String> {
    let mut text = String::new();
    input
        .read_line(&mut text)
        .with_context(|| format!("reading {what} from standard input"))?;
    let got = text.trim_end_matches(['\n', '\r']);
    if text.is_empty() || (got.is_empty() && !allow_empty) {
        let where_ = if text.is_empty() {
            "ended before"
        } else {
            "has an empty line for"
        };
        anyhow::bail!("standard input {where_} {what} (line {n}); {usage}");
    }
    Ok(got.to_string())
}

/// Prompts on stderr and reads a line from the terminal with echo off; None
/// after Ctrl-C. Echo is back on in every case.
async fn read_hidden(prompt: &str) -> anyhow::Result<Option<String>> {
    eprint!("{prompt}");
    let _ = std::io::stderr().flush();
    let echo = EchoOff::new()?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    // A plain thread: a blocking read that Ctrl-C leaves behind must not keep
    // the runtime from shutting down.
    std::thread::spawn(move || {
        let mut line = String::new();
        let r = std::io::stdin().lock().read_line(&mut line).map(|_| line);
        let _ = tx.send(r);
    });
    let result = tokio::select! {
        r = rx => Some(r),
        _ = tokio::signal::ctrl_c() => None,
    };
    drop(echo);
    // The Enter the person typed was not echoed.
    eprintln!();
    match result {
        None => Ok(None),
        Some(Err(_)) => anyhow::bail!("reading the password from the terminal failed"),
        Some(Ok(r)) => {
            let line = r.context("reading the password from the terminal")?;
            if line.is_empty() {
                anyhow::bail!("the terminal closed before a password was typed");
            }
            Ok(Some(line.trim_end_matches(['\n', '\r']).to_string()))
        }
    }
}

/// The terminal's echo turned off until dropped.
#[derive(Debug)]
struct EchoOff {
    /// `stty -g`: the settings to restore.
    saved: String,
}

impl EchoOff {
    fn new() -> anyhow::Result<Self> {
        let saved = stty(&["-g"])
            .context("cannot turn off the terminal's echo to read the password (is `stty` installed?); pipe it in with --password-stdin instead")?;
        stty(&["-echo"]).context("cannot turn off the terminal's echo to read the password; pipe it in with --password-stdin instead")?;
        Ok(Self {
            saved: saved.trim().to_string(),
        })
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        if stty(&[self.saved.as_str()]).is_err() {
            let _ = stty(&["echo"]);
        }
    }
}

/// Runs `stty ARGS` on the terminal that is standard input; its output.
fn stty(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("stty")
        .args(args)
        .stdin(Stdio::inherit())
        .stderr(Stdio::null())
        .output()
        .context("running stty")?;
    if !out.status.success() {
        anyhow::bail!("stty {} failed ({})", args.join(" "), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const USAGE: &str = "give the current password on line 1 and the new one on line 2";

    #[test]
    fn passwords_are_whole_lines() {
        let mut input = std::io::Cursor::new("  old pass \r\nnew\n");
        assert_eq!(
            next_line(&mut input, 1, "the current password", USAGE).unwrap(),
            "  old pass "
        );
        assert_eq!(
            next_line(&mut input, 2, "the new password", USAGE).unwrap(),
            "new"
        );
        let e = next_line(&mut input, 3, "the new password", USAGE).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("standard input ended before the new password (line 3); {USAGE}")
        );
        let mut input = std::io::Cursor::new("\nx\n");
        let e = next_line(&mut input, 1, "the current password", USAGE).unwrap_err();
        assert!(
            e.to_string()
                .contains("has an empty line for the current password (line 1)"),
            "{e}"
        );
        // The last line need not end with a line break.
        let mut input = std::io::Cursor::new("last");
        assert_eq!(next_line(&mut input, 1, "it", USAGE).unwrap(), "last");
        // Where an empty answer means "none", an empty line is one; the end of
        // input is still not.
        let mut input = std::io::Cursor::new("\r\nnew\n");
        assert_eq!(read_line(&mut input, 1, "it", USAGE, true).unwrap(), "");
        assert_eq!(read_line(&mut input, 2, "it", USAGE, true).unwrap(), "new");
        assert!(read_line(&mut input, 3, "it", USAGE, true).is_err());
    }
}
