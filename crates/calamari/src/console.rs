//! Everything calamari prints goes through here. What this module keeps true: every call
//! writes whole lines and flushes them before returning, holding the stream's lock for
//! the whole write, so the server's task log shows each line as it happens and lines
//! written from different threads (script output readers) never interleave.
//!
//! Progress goes to stdout; warnings and errors go to stderr, prefixed `warning: ` and
//! `error: `. A closed stream is ignored (calamari keeps deploying; the exit code still
//! tells the outcome).

use std::io::{self, Write};

/// Prints one progress line (or several, if `text` holds line breaks) on stdout.
pub fn info(text: &str) {
    write_lines(&mut io::stdout().lock(), "", text);
}

/// Prints a warning on stderr, `warning: ` before each line.
pub fn warn(text: &str) {
    write_lines(&mut io::stderr().lock(), "warning: ", text);
}

/// Prints an error on stderr, `error: ` before the first line; the following lines
/// (where it happened, what to do) are indented.
pub fn error(text: &str) {
    let mut err = io::stderr().lock();
    for (i, line) in text.lines().enumerate() {
        let prefix = if i == 0 { "error: " } else { "  " };
        let _ = writeln!(err, "{prefix}{line}");
    }
    let _ = err.flush();
}

/// Forwards one line of a script's stdout unchanged (bytes that are not UTF-8 are
/// replaced), with a line break.
pub fn forward_stdout(line: &[u8]) {
    forward(&mut io::stdout().lock(), line);
}

/// Forwards one line of a script's stderr, like [`forward_stdout`].
pub fn forward_stderr(line: &[u8]) {
    forward(&mut io::stderr().lock(), line);
}

fn forward(out: &mut impl Write, line: &[u8]) {
    let text = String::from_utf8_lossy(line);
    let _ = out.write_all(text.as_bytes());
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

fn write_lines(out: &mut impl Write, prefix: &str, text: &str) {
    for line in text.lines() {
        let _ = writeln!(out, "{prefix}{line}");
    }
    if text.is_empty() {
        let _ = writeln!(out, "{prefix}");
    }
    let _ = out.flush();
}
