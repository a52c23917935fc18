//! Service messages: the line protocol scripts and calamari use on stdout to tell the
//! server something (an output variable, progress), TeamCity style:
//!
//! ```text
//! ##octopus[setVariable name='Url' value='http://example|'s']
//! ##octopus[progress percentage='50' message='Halfway']
//! ```
//!
//! A message is one line that starts with `##octopus[` and ends with `]` (surrounding
//! whitespace ignored). After the opening bracket comes the message name, then any
//! number of `key='value'` attributes separated by whitespace. Names and keys are made
//! of ASCII letters, digits, `_`, `-` and `.`. Values are single-quoted; inside them `|`
//! escapes: `|'` quote, `||` pipe, `|n` newline, `|r` carriage return, `|[` and `|]`
//! brackets. Any other `|` sequence, an unterminated value, a missing `=` or anything
//! after the last attribute makes the line an ordinary log line (`parse` answers `None`).
//!
//! What this module keeps true: `parse(&format(m)) == Some(m)` for every message whose
//! names are well formed (see [`format`]); `format` never produces a line break.

/// The prefix every service message line starts with.
pub const PREFIX: &str = "##octopus[";

/// One parsed service message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceMessage {
    /// `setVariable name='N' value='V' [sensitive='True']`: an output variable. `value`
    /// defaults to empty; `sensitive` is true when the attribute is `True` (any case).
    SetVariable {
        name: String,
        value: String,
        sensitive: bool,
    },
    /// `progress [percentage='50'] message='Halfway'`.
    Progress {
        percentage: Option<u8>,
        message: String,
    },
    /// Any other well-formed message, attributes in the order they appeared.
    Other {
        name: String,
        attributes: Vec<(String, String)>,
    },
}

impl ServiceMessage {
    /// A non-sensitive `setVariable` message.
    pub fn set_variable(name: impl Into<String>, value: impl Into<String>) -> Self {
        ServiceMessage::SetVariable {
            name: name.into(),
            value: value.into(),
            sensitive: false,
        }
    }
}

/// Parses one log line (surrounding whitespace ignored); `None` when it is not a
/// well-formed service message. A `setVariable` without `name`, or a `progress` whose
/// `percentage` is not a number from 0 to 255, is not well formed.
pub fn parse(line: &str) -> Option<ServiceMessage> {
    let line = line.trim();
    let inner = line.strip_prefix(PREFIX)?.strip_suffix(']')?;
    let (name, mut rest) = split_token(inner);
    if name.is_empty() {
        return None;
    }
    // The name must be followed by whitespace or the end.
    if !rest.is_empty() && !rest.starts_with(char::is_whitespace) {
        return None;
    }
    let mut attributes = Vec::new();
    loop {
        rest = rest.trim_start();
        if rest.is_empty() {
            break;
        }
        let (key, after_key) = split_token(rest);
        if key.is_empty() {
            return None;
        }
        let after_eq = after_key.strip_prefix('=')?;
        let after_quote = after_eq.strip_prefix('\'')?;
        let (value, after_value) = unescape_value(after_quote)?;
        if !after_value.is_empty() && !after_value.starts_with(char::is_whitespace) {
            return None;
        }
        attributes.push((key.to_owned(), value));
        rest = after_value;
    }
    classify(name, attributes)
}

/// Formats a message as one line (no trailing newline). `parse(&format(m)) == Some(m)`
/// as long as the message name and attribute keys are non-empty and made of ASCII
/// letters, digits, `_`, `-` and `.`, and an `Other` message is not named
/// `setVariable` or `progress` (those parse as their own variants).
pub fn format(msg: &ServiceMessage) -> String {
    match msg {
        ServiceMessage::SetVariable {
            name,
            value,
            sensitive,
        } => {
            let mut attributes = vec![("name", name.as_str()), ("value", value.as_str())];
            if *sensitive {
                attributes.push(("sensitive", "True"));
            }
            build("setVariable", attributes)
        }
        ServiceMessage::Progress {
            percentage,
            message,
        } => {
            let percentage = percentage.map(|p| p.to_string());
            let mut attributes = Vec::new();
            if let Some(p) = &percentage {
                attributes.push(("percentage", p.as_str()));
            }
            attributes.push(("message", message.as_str()));
            build("progress", attributes)
        }
        ServiceMessage::Other { name, attributes } => build(
            name,
            attributes.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        ),
    }
}

/// Escapes a value for use between single quotes.
pub fn escape_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '|' => out.push_str("||"),
            '\'' => out.push_str("|'"),
            '\n' => out.push_str("|n"),
            '\r' => out.push_str("|r"),
            '[' => out.push_str("|["),
            ']' => out.push_str("|]"),
            c => out.push(c),
        }
    }
    out
}

fn build<'a>(name: &str, attributes: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut line = String::from(PREFIX);
    line.push_str(name);
    for (key, value) in attributes {
        line.push(' ');
        line.push_str(key);
        line.push_str("='");
        line.push_str(&escape_value(value));
        line.push('\'');
    }
    line.push(']');
    line
}

fn classify(name: &str, attributes: Vec<(String, String)>) -> Option<ServiceMessage> {
    let get = |key: &str| {
        attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    Some(match name {
        "setVariable" => ServiceMessage::SetVariable {
            name: get("name")?,
            value: get("value").unwrap_or_default(),
            sensitive: get("sensitive").is_some_and(|s| s.eq_ignore_ascii_case("true")),
        },
        "progress" => ServiceMessage::Progress {
            percentage: match get("percentage") {
                Some(p) => Some(p.trim().parse::<u8>().ok()?),
                None => None,
            },
            message: get("message").unwrap_or_default(),
        },
        _ => ServiceMessage::Other {
            name: name.to_owned(),
            attributes,
        },
    })
}

fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')
}

/// Splits the leading name/key token off `s`.
fn split_token(s: &str) -> (&str, &str) {
    let end = s.find(|c: char| !is_token_char(c)).unwrap_or(s.len());
    s.split_at(end)
}

/// Reads a quoted value whose opening quote was already consumed; answers the value and
/// what follows the closing quote.
fn unescape_value(s: &str) -> Option<(String, &str)> {
    let mut value = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\'' => return Some((value, &s[i + 1..])),
            '|' => {
                let (_, escaped) = chars.next()?;
                value.push(match escaped {
                    '\'' => '\'',
                    '|' => '|',
                    'n' => '\n',
                    'r' => '\r',
                    '[' => '[',
                    ']' => ']',
                    _ => return None,
                });
            }
            c => value.push(c),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn round_trip(msg: ServiceMessage) {
        let line = format(&msg);
        assert!(!line.contains('\n') && !line.contains('\r'), "{line}");
        assert_eq!(parse(&line), Some(msg), "{line}");
    }

    #[test]
    fn parses_set_variable() {
        assert_eq!(
            parse("##octopus[setVariable name='Url' value='http://x']"),
            Some(ServiceMessage::set_variable("Url", "http://x"))
        );
        assert_eq!(
            parse("  ##octopus[setVariable   name='P'  value='s3cret' sensitive='true']\r"),
            Some(ServiceMessage::SetVariable {
                name: "P".into(),
                value: "s3cret".into(),
                sensitive: true
            })
        );
        assert_eq!(
            parse("##octopus[setVariable name='Empty']"),
            Some(ServiceMessage::set_variable("Empty", ""))
        );
    }

    #[test]
    fn parses_escapes() {
        assert_eq!(
            parse("##octopus[setVariable name='A' value='it|'s |[x|] a||b|nline2|r']"),
            Some(ServiceMessage::set_variable("A", "it's [x] a|b\nline2\r"))
        );
    }

    #[test]
    fn parses_progress_and_other() {
        assert_eq!(
            parse("##octopus[progress percentage='50' message='Halfway']"),
            Some(ServiceMessage::Progress {
                percentage: Some(50),
                message: "Halfway".into()
            })
        );
        assert_eq!(
            parse("##octopus[progress message='Starting']"),
            Some(ServiceMessage::Progress {
                percentage: None,
                message: "Starting".into()
            })
        );
        assert_eq!(
            parse("##octopus[stdout-warning]"),
            Some(ServiceMessage::Other {
                name: "stdout-warning".into(),
                attributes: vec![]
            })
        );
        assert_eq!(
            parse("##octopus[createArtifact path='/tmp/a b' name='a b']"),
            Some(ServiceMessage::Other {
                name: "createArtifact".into(),
                attributes: vec![
                    ("path".into(), "/tmp/a b".into()),
                    ("name".into(), "a b".into())
                ]
            })
        );
    }

    #[test]
    fn rejects_malformed_lines() {
        for line in [
            "",
            "hello",
            "##octopus[",
            "##octopus[]",
            "##octopus[setVariable name='x' value='y'",
            "#octopus[setVariable name='x']",
            "##octopus[setVariable name='x' value='unterminated]",
            "##octopus[setVariable name='x' value='bad |x escape']",
            "##octopus[setVariable name='x' value='trailing |']",
            "##octopus[setVariable name=x]",
            "##octopus[setVariable name 'x']",
            "##octopus[setVariable name='x'value='y']",
            "##octopus[setVariable name='x' junk]",
            "##octopus[setVariable value='no name']",
            "##octopus[progress percentage='lots' message='x']",
            "##octopus[progress percentage='300' message='x']",
            "##octopus[set'Variable name='x']",
            "##octopus[ setVariable name='x']",
            "echo ##octopus[setVariable name='x']",
        ] {
            assert_eq!(parse(line), None, "{line:?}");
        }
    }

    #[test]
    fn formats_canonically() {
        assert_eq!(
            format(&ServiceMessage::set_variable("Url", "http://x")),
            "##octopus[setVariable name='Url' value='http://x']"
        );
        assert_eq!(
            format(&ServiceMessage::SetVariable {
                name: "P".into(),
                value: "a'b|c\nd[e]".into(),
                sensitive: true
            }),
            "##octopus[setVariable name='P' value='a|'b||c|nd|[e|]' sensitive='True']"
        );
        assert_eq!(
            format(&ServiceMessage::Progress {
                percentage: Some(50),
                message: "Halfway".into()
            }),
            "##octopus[progress percentage='50' message='Halfway']"
        );
    }

    #[test]
    fn round_trips() {
        for value in [
            "",
            "plain",
            "it's",
            "a|b",
            "||''[[]]",
            "line1\nline2\r\n",
            "|n is not a newline",
            "ünïcödé ✓",
            "  spaces  ",
            "]",
            "'",
        ] {
            round_trip(ServiceMessage::set_variable("Name.With-Dots_1", value));
            round_trip(ServiceMessage::SetVariable {
                name: "S".into(),
                value: value.into(),
                sensitive: true,
            });
            round_trip(ServiceMessage::Progress {
                percentage: Some(99),
                message: value.into(),
            });
            round_trip(ServiceMessage::Progress {
                percentage: None,
                message: value.into(),
            });
            round_trip(ServiceMessage::Other {
                name: "custom".into(),
                attributes: vec![("a".into(), value.into()), ("b".into(), value.into())],
            });
        }
        round_trip(ServiceMessage::Other {
            name: "bare".into(),
            attributes: vec![],
        });
    }
}
