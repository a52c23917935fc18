//! Printing: aligned tables, label/value blocks, times, and a stdout that a closed
//! pipe (`octopus task log X | head`) ends quietly instead of panicking.
//!
//! Terminal safety: text from the server (names, descriptions, log lines, error
//! messages) is written by people this operator may not trust, so nothing printed
//! for people carries its control characters to the terminal: [`table`] and
//! [`fields`] escape every cell ([`cell`]), and [`out`] and [`note`] escape what
//! is left but line breaks ([`text`]). ESC is shown as `\e`, tab, CR and LF as
//! `\t`, `\r`, `\n`, other C0 and C1 controls and DEL as `\xNN`, and the
//! bidirectional overrides (which reorder what is shown) as `\u{NNNN}`. JSON
//! output stays exact JSON: serde escapes C0 controls, and [`out_json`] writes
//! DEL and C1 controls as `\u00NN` escapes, which mean the same.

use std::borrow::Cow;
use std::io::Write;

use serde::Serialize;

/// Writes `text` and a newline to stdout, control characters but line breaks
/// and tabs escaped ([`text`]). A closed pipe ends the process quietly (the
/// reader has all it wanted); other write errors are reported.
pub(crate) fn out(text: &str) {
    write_stdout(&self::text(text));
}

/// A message for people on stderr, escaped as [`out`] escapes.
pub(crate) fn note(text: &str) {
    eprintln!("{}", self::text(text));
}

/// Writes `text` and a newline to stdout as it is (see [`out`]).
fn write_stdout(text: &str) {
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = writeln!(stdout, "{text}").and_then(|()| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing to stdout: {e}");
        std::process::exit(1);
    }
}

/// Pretty JSON of `value` on stdout.
pub(crate) fn out_json<T: Serialize + ?Sized>(value: &T) {
    write_stdout(&json_safe(
        serde_json::to_string_pretty(value).unwrap_or_else(|e| json_error(&e)),
    ));
}

/// One JSON document per line (for streams of events).
pub(crate) fn out_json_line<T: Serialize + ?Sized>(value: &T) {
    write_stdout(&json_safe(
        serde_json::to_string(value).unwrap_or_else(|e| json_error(&e)),
    ));
}

fn json_error(e: &serde_json::Error) -> String {
    serde_json::Value::String(e.to_string()).to_string()
}

/// JSON text with DEL and the C1 controls (which serde leaves as they are)
/// written as `\u00NN`. Outside strings JSON has no such characters, so the
/// document means exactly the same.
pub(crate) fn json_safe(json: String) -> String {
    if !json.chars().any(|c| ('\u{7f}'..='\u{9f}').contains(&c)) {
        return json;
    }
    let mut s = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if ('\u{7f}'..='\u{9f}').contains(&c) {
            s.push_str(&format!("\\u{:04x}", u32::from(c)));
        } else {
            s.push(c);
        }
    }
    s
}

/// Whether `c` must not reach a terminal as it is.
fn is_unsafe(c: char) -> bool {
    c.is_control() // C0, DEL, C1
        || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` with its control characters escaped, but those in `keep`.
fn escape<'a>(s: &'a str, keep: &[char]) -> Cow<'a, str> {
    if !s.chars().any(|c| is_unsafe(c) && !keep.contains(&c)) {
        return Cow::Borrowed(s);
    }
    let mut e = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if !is_unsafe(c) || keep.contains(&c) {
            e.push(c);
            continue;
        }
        match c {
            '\u{1b}' => e.push_str("\\e"),
            '\t' => e.push_str("\\t"),
            '\n' => e.push_str("\\n"),
            '\r' => e.push_str("\\r"),
            c if u32::from(c) <= 0xff => e.push_str(&format!("\\x{:02x}", u32::from(c))),
            c => e.push_str(&format!("\\u{{{:04x}}}", u32::from(c))),
        }
    }
    Cow::Owned(e)
}

/// A value for one table cell or label: every control character escaped,
/// line breaks and tabs too.
pub(crate) fn cell(s: &str) -> Cow<'_, str> {
    escape(s, &[])
}

/// One line of output (a log line): control characters escaped, tabs kept.
pub(crate) fn line(s: &str) -> Cow<'_, str> {
    escape(s, &['\t'])
}

/// Text of several lines: control characters escaped, line breaks and tabs kept.
pub(crate) fn text(s: &str) -> Cow<'_, str> {
    escape(s, &['\n', '\t'])
}

/// An aligned table: upper-case headers, columns two spaces apart, the last
/// column not padded (so long reasons do not push trailing blanks). Cells are
/// escaped ([`cell`]).
pub(crate) fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| cell(c).into_owned()).collect())
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let render = |cells: &mut dyn Iterator<Item = &str>| {
        let mut s = String::new();
        for (i, cell) in cells.enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            s.push_str(cell);
            if i + 1 < widths.len() {
                let pad = widths[i].saturating_sub(cell.chars().count());
                s.extend(std::iter::repeat_n(' ', pad));
            }
        }
        s.trim_end().to_string()
    };
    let mut lines = vec![render(&mut headers.iter().copied())];
    for row in &rows {
        lines.push(render(&mut row.iter().map(String::as_str)));
    }
    lines.join("\n")
}

/// `Label:  value` lines with the values aligned and escaped ([`cell`]).
pub(crate) fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs
        .iter()
        .map(|(l, _)| l.chars().count() + 1)
        .max()
        .unwrap_or(0);
    pairs
        .iter()
        .map(|(label, value)| format!("{:<width$}  {}", format!("{label}:"), cell(value)))
        .map(|l| l.trim_end().to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// A list for a table cell: comma-separated, `-` when empty.
pub(crate) fn list(items: &[String]) -> String {
    if items.is_empty() {
        "-".into()
    } else {
        items.join(",")
    }
}

/// A text for a cell: `-` when empty.
pub(crate) fn or_dash(s: &str) -> String {
    if s.trim().is_empty() {
        "-".into()
    } else {
        s.to_string()
    }
}

/// Unix milliseconds as `YYYY-MM-DD HH:MM:SS` in UTC.
pub(crate) fn time(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// An optional time; `-` when unset.
pub(crate) fn time_opt(ms: Option<i64>) -> String {
    ms.map_or_else(|| "-".into(), time)
}

/// A duration in milliseconds, roughly: `850ms`, `12.3s`, `4m05s`, `2h03m`.
pub(crate) fn duration(ms: i64) -> String {
    let ms = ms.max(0);
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if ms < 3_600_000 {
        format!("{}m{:02}s", ms / 60_000, ms % 60_000 / 1000)
    } else {
        format!("{}h{:02}m", ms / 3_600_000, ms % 3_600_000 / 60_000)
    }
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn tables_align_and_do_not_pad_the_last_column() {
        let t = table(
            &["NAME", "STATUS", "REASON"],
            &[
                vec!["web01".into(), "Healthy".into(), String::new()],
                vec!["db".into(), "Unavailable".into(), "refused".into()],
            ],
        );
        assert_eq!(
            t,
            "NAME   STATUS       REASON\nweb01  Healthy\ndb     Unavailable  refused"
        );
    }

    #[test]
    fn times_are_utc() {
        assert_eq!(time(0), "1970-01-01 00:00:00");
        assert_eq!(time(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(time(1_774_094_400_123), "2026-03-21 12:00:00");
        assert_eq!(duration(850), "850ms");
        assert_eq!(duration(12_345), "12.3s");
        assert_eq!(duration(245_000), "4m05s");
    }

    #[test]
    fn control_characters_never_reach_the_terminal() {
        // ESC, CSI-style sequences, the C1 CSI, DEL, BEL, CR, LF, tab.
        let hostile = "web\u{1b}[2J\u{1b}]0;pwned\u{7}\u{9b}31m\u{7f}\r\nx\ty";
        assert_eq!(cell(hostile), r"web\e[2J\e]0;pwned\x07\x9b31m\x7f\r\nx\ty");
        assert_eq!(
            line(hostile),
            "web\\e[2J\\e]0;pwned\\x07\\x9b31m\\x7f\\r\\nx\ty"
        );
        assert_eq!(
            text(hostile),
            "web\\e[2J\\e]0;pwned\\x07\\x9b31m\\x7f\\r\nx\ty"
        );
        // Bidirectional overrides reorder what is shown.
        assert_eq!(cell("abc\u{202e}fed"), r"abc\u{202e}fed");
        // Ordinary text, unicode and backslashes are left alone (and not copied).
        for ok in ["Production", "Zürich 東京 🐙", r"DOMAIN\user", ""] {
            assert!(matches!(cell(ok), Cow::Borrowed(_)), "{ok}");
            assert_eq!(cell(ok), ok);
        }
        let t = table(
            &["NAME", "DESCRIPTION"],
            &[vec!["a\u{1b}[31m".into(), "two\nlines\tand tab".into()]],
        );
        assert_eq!(t, "NAME     DESCRIPTION\na\\e[31m  two\\nlines\\tand tab");
        assert_eq!(fields(&[("Name", "x\u{1b}y".into())]), "Name:  x\\ey");
    }

    #[test]
    fn json_stays_exact_json() {
        let v = serde_json::json!({ "name": "a\u{1b}b\u{9b}c\u{7f}d\u{e9}" });
        let safe = json_safe(serde_json::to_string(&v).unwrap());
        assert!(!safe.chars().any(|c| c.is_control()), "{safe}");
        let back: serde_json::Value = serde_json::from_str(&safe).unwrap();
        assert_eq!(back, v);
        assert_eq!(safe, r#"{"name":"a\u001bb\u009bc\u007fdé"}"#);
    }

    #[test]
    fn fields_align() {
        assert_eq!(
            fields(&[("Name", "web01".into()), ("Thumbprint", "AB".into())]),
            "Name:        web01\nThumbprint:  AB"
        );
    }
}
