//! Text for the operator's terminal: what the tentacle prints may carry a
//! server's words (machine and space names, error messages) or names from a
//! configuration file, so no control character reaches the terminal as it is.
//! ESC is shown as `\e`, CR as `\r`, other C0 and C1 controls and DEL as
//! `\xNN`, the bidirectional overrides as `\u{NNNN}`; line breaks and tabs stay.

use std::borrow::Cow;

/// Whether `c` must not reach a terminal as it is (line breaks and tabs may).
fn is_unsafe(c: char) -> bool {
    (c.is_control() && !matches!(c, '\n' | '\t'))
        || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` with its control characters escaped (line breaks and tabs kept).
pub(crate) fn safe(s: &str) -> Cow<'_, str> {
    if !s.chars().any(is_unsafe) {
        return Cow::Borrowed(s);
    }
    let mut e = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            c if !is_unsafe(c) => e.push(c),
            '\u{1b}' => e.push_str("\\e"),
            '\r' => e.push_str("\\r"),
            c if u32::from(c) <= 0xff => e.push_str(&format!("\\x{:02x}", u32::from(c))),
            c => e.push_str(&format!("\\u{{{:04x}}}", u32::from(c))),
        }
    }
    Cow::Owned(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_line_breaks_kept() {
        assert!(matches!(safe("plain\ttext\n"), Cow::Borrowed(_)));
        assert_eq!(
            safe("evil\u{1b}[31mred\u{7}\r\0\u{9b}\u{202e}x\ny"),
            "evil\\e[31mred\\x07\\r\\x00\\x9b\\u{202e}x\ny"
        );
    }
}
