//! Points in time as people type them (`audit list --since`): an RFC 3339 time
//! (`2026-12-01T10:00:00Z`, `2026-12-01T11:00:00+01:00`), a date
//! (`2026-12-01`, midnight UTC) or an age (`30m`, `2h`, `7d`, `1h30m`), turned
//! into Unix milliseconds as the API takes them.

/// Unix milliseconds now.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// What `--since` takes, for error messages.
const FORMS: &str = "give a time like 2026-12-01T10:00:00Z (RFC 3339), a date like 2026-12-01 (UTC), or an age like 30m, 2h, 7d or 1h30m";

/// `s` as Unix milliseconds, ages counted back from `now` (Unix ms).
pub(crate) fn parse_since(s: &str, now: i64) -> Result<i64, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err(format!("--since is empty; {FORMS}"));
    }
    let result = if t.as_bytes().first().is_some_and(u8::is_ascii_digit)
        && t.chars().any(|c| c.is_ascii_alphabetic())
        && !t.contains('-')
    {
        parse_age(t).map(|age| now.saturating_sub(age))
    } else if t.len() == 10 {
        parse_date(t).map(|days| days * 86_400_000)
    } else if t.chars().all(|c| c.is_ascii_digit()) {
        Err("a number alone has no unit".to_string())
    } else if !t.as_bytes().first().is_some_and(u8::is_ascii_digit) {
        Err("not a time, a date or an age".to_string())
    } else {
        parse_rfc3339(t)
    };
    result.map_err(|why| format!("--since '{s}': {why}; {FORMS}"))
}

/// `30m`, `2h`, `7d`, `1w`, `45s`, and sums such as `1h30m`, in milliseconds.
fn parse_age(s: &str) -> Result<i64, String> {
    let mut total: i64 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits == 0 {
            return Err(format!("expected a number before '{rest}'"));
        }
        let n: i64 = rest[..digits]
            .parse()
            .map_err(|_| "the number is too large".to_string())?;
        rest = &rest[digits..];
        let unit_len = rest.len()
            - rest
                .trim_start_matches(|c: char| c.is_ascii_alphabetic())
                .len();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let ms: i64 = match unit {
            "s" | "sec" | "secs" => 1000,
            "m" | "min" | "mins" => 60_000,
            "h" | "hr" | "hrs" => 3_600_000,
            "d" | "day" | "days" => 86_400_000,
            "w" | "week" | "weeks" => 7 * 86_400_000,
            "" => return Err(format!("{n} has no unit (s, m, h, d or w)")),
            other => return Err(format!("'{other}' is not a unit (s, m, h, d or w)")),
        };
        total = n
            .checked_mul(ms)
            .and_then(|x| total.checked_add(x))
            .ok_or_else(|| "the age is too large".to_string())?;
    }
    Ok(total)
}

/// `YYYY-MM-DD` as days since 1970-01-01.
fn parse_date(s: &str) -> Result<i64, String> {
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return Err("expected YYYY-MM-DD".into());
    }
    let num = |r: std::ops::Range<usize>| -> Result<i64, String> {
        let part = &s[r];
        if part.bytes().all(|c| c.is_ascii_digit()) {
            part.parse().map_err(|_| "expected YYYY-MM-DD".to_string())
        } else {
            Err("expected YYYY-MM-DD".into())
        }
    };
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if !(1..=12).contains(&m) {
        return Err(format!("month {m} does not exist"));
    }
    if d < 1 || d > days_in_month(y, m) {
        return Err(format!("{y:04}-{m:02} has no day {d}"));
    }
    Ok(days_from_civil(y, m, d))
}

/// `YYYY-MM-DDTHH:MM:SS[.fff][Z|±HH:MM]` (a space or `t` may stand for `T`, `z`
/// for `Z`) as Unix milliseconds.
fn parse_rfc3339(s: &str) -> Result<i64, String> {
    if s.len() < 20 || !s.is_char_boundary(10) || !s.is_char_boundary(11) {
        return Err("expected YYYY-MM-DDTHH:MM:SSZ or an offset such as +01:00".into());
    }
    let days = parse_date(&s[..10])?;
    if !matches!(s.as_bytes()[10], b'T' | b't' | b' ') {
        return Err("expected T between the date and the time".into());
    }
    let rest = &s[11..];
    let clock = rest.get(..8).ok_or("expected HH:MM:SS after the date")?;
    let cb = clock.as_bytes();
    if cb[2] != b':'
        || cb[5] != b':'
        || !clock
            .bytes()
            .filter(|&c| c != b':')
            .all(|c| c.is_ascii_digit())
    {
        return Err("expected HH:MM:SS after the date".into());
    }
    let field = |r: std::ops::Range<usize>| clock[r].parse::<i64>().unwrap_or(99);
    let (h, mi, sec) = (field(0..2), field(3..5), field(6..8));
    if h > 23 || mi > 59 || sec > 60 {
        return Err(format!("{clock} is not a time of day"));
    }
    let mut rest = &rest[8..];
    let mut ms = 0i64;
    if let Some(frac) = rest.strip_prefix('.') {
        let n = frac.len() - frac.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if n == 0 {
            return Err("expected digits after the decimal point".into());
        }
        let digits = &frac[..n];
        // Milliseconds: the first three digits, padded.
        let first3: String = digits.chars().chain("000".chars()).take(3).collect();
        ms = first3.parse().unwrap_or(0);
        rest = &frac[n..];
    }
    let offset_min = match rest {
        "Z" | "z" => 0,
        o if o.len() == 6
            && (o.starts_with('+') || o.starts_with('-'))
            && o.as_bytes()[3] == b':'
            && o[1..3]
                .bytes()
                .chain(o[4..6].bytes())
                .all(|c| c.is_ascii_digit()) =>
        {
            let oh: i64 = o[1..3].parse().unwrap_or(99);
            let om: i64 = o[4..6].parse().unwrap_or(99);
            if oh > 23 || om > 59 {
                return Err(format!("{o} is not a UTC offset"));
            }
            let m = oh * 60 + om;
            if o.starts_with('-') {
                -m
            } else {
                m
            }
        }
        "" => {
            return Err(
                "the time has no zone: end it with Z (UTC) or an offset such as +01:00".into(),
            )
        }
        other => return Err(format!("'{other}' is not Z or an offset such as +01:00")),
    };
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec.min(59) - offset_min * 60;
    Ok(secs * 1000 + ms)
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`, the inverse of `output::civil_from_days`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::output::time;

    const NOW: i64 = 1_796_126_400_000; // 2026-12-01 12:00:00 UTC

    #[test]
    fn rfc3339_times() {
        assert_eq!(time(NOW), "2026-12-01 12:00:00");
        let t = parse_since("2026-12-01T10:00:00Z", NOW).unwrap();
        assert_eq!(time(t), "2026-12-01 10:00:00");
        assert_eq!(t, NOW - 2 * 3_600_000);
        assert_eq!(parse_since("2026-12-01t10:00:00z", NOW).unwrap(), t);
        assert_eq!(parse_since("2026-12-01 10:00:00Z", NOW).unwrap(), t);
        assert_eq!(parse_since("2026-12-01T11:00:00+01:00", NOW).unwrap(), t);
        assert_eq!(parse_since("2026-12-01T04:30:00-05:30", NOW).unwrap(), t);
        assert_eq!(
            parse_since("2026-12-01T10:00:00.250Z", NOW).unwrap(),
            t + 250
        );
        assert_eq!(parse_since("2026-12-01T10:00:00.5Z", NOW).unwrap(), t + 500);
        assert_eq!(
            parse_since("2026-12-01T10:00:00.123456789Z", NOW).unwrap(),
            t + 123
        );
        assert_eq!(parse_since("1970-01-01T00:00:00Z", NOW).unwrap(), 0);
        assert_eq!(
            parse_since("2000-02-29T00:00:00Z", NOW).unwrap(),
            951_782_400_000
        );
    }

    #[test]
    fn dates_are_midnight_utc() {
        assert_eq!(
            parse_since("2026-12-01", NOW).unwrap(),
            NOW - 12 * 3_600_000
        );
        assert_eq!(parse_since("1970-01-01", NOW).unwrap(), 0);
        assert_eq!(parse_since(" 2024-02-29 ", NOW).unwrap(), 1_709_164_800_000);
        for y in [1900, 1999, 2000, 2024, 2100] {
            for (m, d) in [(1, 1), (2, 28), (3, 1), (12, 31)] {
                let ms = parse_since(&format!("{y:04}-{m:02}-{d:02}"), NOW).unwrap();
                assert_eq!(time(ms), format!("{y:04}-{m:02}-{d:02} 00:00:00"));
            }
        }
    }

    #[test]
    fn ages_count_back_from_now() {
        assert_eq!(parse_since("30m", NOW).unwrap(), NOW - 30 * 60_000);
        assert_eq!(parse_since("2h", NOW).unwrap(), NOW - 2 * 3_600_000);
        assert_eq!(parse_since("7d", NOW).unwrap(), NOW - 7 * 86_400_000);
        assert_eq!(parse_since("1w", NOW).unwrap(), NOW - 7 * 86_400_000);
        assert_eq!(parse_since("45s", NOW).unwrap(), NOW - 45_000);
        assert_eq!(parse_since("1h30m", NOW).unwrap(), NOW - 90 * 60_000);
        assert_eq!(parse_since("0m", NOW).unwrap(), NOW);
    }

    #[test]
    fn nonsense_is_refused_with_the_forms() {
        for bad in [
            "",
            "yesterday",
            "30",
            "30x",
            "h2",
            "2026-13-01",
            "2026-02-29",
            "2026-12-32",
            "2026-12-01T25:00:00Z",
            "2026-12-01T10:00:00",
            "2026-12-01T10:00Z",
            "2026-12-01T10:00:00+1:00",
            "2026-12-01T10:00:00.Z",
            "99999999999999999999d",
            "2026-1é-01",
            "2026-12-01Té0:00:00Z",
        ] {
            let e = parse_since(bad, NOW).unwrap_err();
            assert!(e.starts_with("--since"), "{bad:?}: {e}");
            assert!(
                e.contains("2026-12-01T10:00:00Z") && e.contains("30m"),
                "{bad:?}: {e}"
            );
        }
    }
}
