//! Printing: aligned tables, label/value blocks, times, and a stdout that a closed
//! pipe (`octopus task log X | head`) ends quietly instead of panicking.

use std::io::Write;

use serde::Serialize;

/// Writes `text` and a newline to stdout. A closed pipe ends the process
/// quietly (the reader has all it wanted); other write errors are reported.
pub(crate) fn out(text: &str) {
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
    out(&serde_json::to_string_pretty(value).unwrap_or_else(|e| format!("\"{e}\"")));
}

/// One JSON document per line (for streams of events).
pub(crate) fn out_json_line<T: Serialize + ?Sized>(value: &T) {
    out(&serde_json::to_string(value).unwrap_or_else(|e| format!("\"{e}\"")));
}

/// An aligned table: upper-case headers, columns two spaces apart, the last
/// column not padded (so long reasons do not push trailing blanks).
pub(crate) fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
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
    let mut lines = vec![line(&mut headers.iter().copied())];
    for row in rows {
        lines.push(line(&mut row.iter().map(String::as_str)));
    }
    lines.join("\n")
}

/// `Label:  value` lines with the values aligned.
pub(crate) fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs
        .iter()
        .map(|(l, _)| l.chars().count() + 1)
        .max()
        .unwrap_or(0);
    pairs
        .iter()
        .map(|(label, value)| format!("{:<width$}  {value}", format!("{label}:")))
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
    fn fields_align() {
        assert_eq!(
            fields(&[("Name", "web01".into()), ("Thumbprint", "AB".into())]),
            "Name:        web01\nThumbprint:  AB"
        );
    }
}
