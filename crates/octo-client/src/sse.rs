//! An incremental parser for `text/event-stream` (server-sent events), fed the
//! body's chunks as they arrive: chunks may split lines, UTF-8 characters and
//! `\r\n` pairs anywhere.

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SseEvent {
    /// The `event:` field; `message` when the server sent none.
    pub event: String,
    /// The `data:` lines, joined by `\n`.
    pub data: String,
    /// The `id:` field, if any.
    pub id: Option<String>,
}

/// Parser state between chunks.
#[derive(Debug, Default)]
pub(crate) struct SseParser {
    /// Bytes of the line not yet ended.
    line: Vec<u8>,
    /// The last chunk ended in `\r`: a `\n` starting the next one is the same line end.
    after_cr: bool,
    event: Option<String>,
    data: Option<String>,
    id: Option<String>,
}

impl SseParser {
    /// Feeds a chunk; returns the events it completed.
    pub(crate) fn push(&mut self, mut chunk: &[u8]) -> Vec<SseEvent> {
        let mut events = Vec::new();
        if chunk.is_empty() {
            return events;
        }
        if self.after_cr {
            self.after_cr = false;
            if let Some(rest) = chunk.strip_prefix(b"\n") {
                chunk = rest;
            }
        }
        while let Some(end) = chunk.iter().position(|&b| b == b'\n' || b == b'\r') {
            self.line.extend_from_slice(&chunk[..end]);
            let line = std::mem::take(&mut self.line);
            if let Some(ev) = self.line_done(&line) {
                events.push(ev);
            }
            let was_cr = chunk[end] == b'\r';
            chunk = &chunk[end + 1..];
            if was_cr {
                match chunk.first() {
                    Some(b'\n') => chunk = &chunk[1..],
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
        }
        self.line.extend_from_slice(chunk);
        events
    }

    fn line_done(&mut self, line: &[u8]) -> Option<SseEvent> {
        if line.is_empty() {
            // A blank line dispatches the event gathered so far (if it has data).
            let event = self.event.take();
            let id = self.id.take();
            return self.data.take().map(|data| SseEvent {
                event: event.unwrap_or_else(|| "message".into()),
                data,
                id,
            });
        }
        if line[0] == b':' {
            return None; // A comment (keep-alive).
        }
        let line = String::from_utf8_lossy(line);
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line.as_ref(), ""),
        };
        match field {
            "event" => self.event = Some(value.to_string()),
            "data" => match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            },
            "id" => self.id = Some(value.to_string()),
            _ => {} // "retry" and unknown fields.
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(event: &str, data: &str) -> SseEvent {
        SseEvent {
            event: event.into(),
            data: data.into(),
            id: None,
        }
    }

    #[test]
    fn events_comments_and_multiline_data() {
        let mut p = SseParser::default();
        let got = p.push(
            b": keep-alive\n\nevent: log\ndata: {\"a\":1}\n\ndata:x\ndata: y\n\nevent: end\nid: 7\ndata: {}\n\n",
        );
        assert_eq!(
            got,
            vec![
                ev("log", "{\"a\":1}"),
                ev("message", "x\ny"),
                SseEvent {
                    event: "end".into(),
                    data: "{}".into(),
                    id: Some("7".into()),
                },
            ]
        );
    }

    #[test]
    fn any_split_gives_the_same_events() {
        let text = "event: log\r\ndata: h\u{e9}llo\r\n\r\nevent: task\rdata: 2\r\rdata: 3\n\n: c\n";
        let mut whole = SseParser::default();
        let expected = whole.push(text.as_bytes());
        assert_eq!(
            expected,
            vec![ev("log", "h\u{e9}llo"), ev("task", "2"), ev("message", "3")]
        );
        let bytes = text.as_bytes();
        for i in 0..bytes.len() {
            for j in i..bytes.len() {
                let mut p = SseParser::default();
                let mut got = p.push(&bytes[..i]);
                got.extend(p.push(&bytes[i..j]));
                got.extend(p.push(&bytes[j..]));
                assert_eq!(got, expected, "split at {i}, {j}");
            }
        }
    }

    #[test]
    fn an_unfinished_event_is_not_dispatched() {
        let mut p = SseParser::default();
        assert!(p.push(b"event: log\ndata: partial\n").is_empty());
    }
}
