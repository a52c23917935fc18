//! Following a task: its log stream (server-sent events) printed as it comes,
//! reconnecting after a drop from the last line seen, until the `end` event.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use futures_util::{Stream, StreamExt};
use octo_api_types::{TaskLogLine, TaskStep};

use super::http::{root_cause, ApiClient};
use super::output::{self, cell, out, out_json_line};
use super::sse::{SseEvent, SseParser};
use super::{Output, TaskDetail};

/// How long to keep trying to reconnect to a lost stream before giving up.
pub(crate) const RECONNECT_FOR: Duration = Duration::from_secs(120);
/// First wait between reconnects; doubles up to [`BACKOFF_MAX`].
const BACKOFF_START: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A stream silent this long (not even a keep-alive) is dropped and reopened, in
/// case the connection died without a word.
const IDLE: Duration = Duration::from_secs(60);

/// Machine id → name, from a task's steps.
#[derive(Debug, Default)]
pub(crate) struct Names(HashMap<i64, String>);

impl Names {
    pub(crate) fn learn(&mut self, steps: &[TaskStep]) {
        for s in steps {
            self.0.insert(s.machine_id, s.machine_name.clone());
        }
    }

    /// `[web01] text`, `[web01]! text` for stderr, `[server] text` for the
    /// server's own lines. What a script printed is anyone's text: its control
    /// characters are escaped (tabs kept, a line's closing CR dropped), so a
    /// script cannot move the cursor, retitle the window or forge other lines.
    pub(crate) fn format(&self, line: &TaskLogLine) -> String {
        let who = match line.machine_id {
            None => "server".to_string(),
            Some(id) => self
                .0
                .get(&id)
                .cloned()
                .unwrap_or_else(|| format!("machine {id}")),
        };
        let mark = if line.stream == "stderr" { "!" } else { "" };
        let text = line.text.strip_suffix('\r').unwrap_or(&line.text);
        format!("[{}]{mark} {}", cell(&who), output::line(text))
    }
}

/// Prints one log line in the chosen output. For people, `##octopus[...]`
/// service messages are shown as what they mean (JSON keeps every line as stored).
pub(crate) fn print_line(names: &Names, line: &TaskLogLine, output: Output) {
    match output {
        Output::Table => match service_message_text(line) {
            Some(text) => out(&names.format(&TaskLogLine {
                text,
                ..line.clone()
            })),
            None => out(&names.format(line)),
        },
        Output::Json => out_json_line(line),
    }
}

/// "output variable NAME = VALUE" for a setVariable line, None for other lines.
fn service_message_text(line: &TaskLogLine) -> Option<String> {
    use octo_calamari::service_message::{parse, ServiceMessage};
    if line.stream != "stdout" {
        return None;
    }
    match parse(&line.text)? {
        ServiceMessage::SetVariable {
            name,
            value,
            sensitive,
        } => Some(format!(
            "(output variable {name} = {})",
            if sensitive {
                "********"
            } else {
                value.as_str()
            }
        )),
        ServiceMessage::Progress {
            percentage,
            message,
        } => Some(match percentage {
            Some(p) => format!("(progress {p}%: {message})"),
            None => format!("(progress: {message})"),
        }),
        ServiceMessage::Other { .. } => None,
    }
}

/// How one connection to the stream ended.
enum Outcome {
    /// The `end` event: the task is final.
    Ended(Box<TaskDetail>),
    /// The server sent something this client cannot go on from.
    Broken(String),
    /// The connection ended first.
    Dropped {
        /// Whether it carried any event (so the server is there and answering).
        useful: bool,
        /// Why, for the person watching.
        cause: String,
    },
}

/// Follows task `detail.task` from log line id `after` until it ends, printing
/// every line once; returns the final task and steps. `opened`: the events of
/// the request that created the task, read first (a new stream is opened from
/// the last line seen if they stop before the end).
pub(crate) async fn follow(
    client: &ApiClient,
    detail: &TaskDetail,
    after: i64,
    output: Output,
    mut opened: Option<Events>,
) -> anyhow::Result<TaskDetail> {
    let task_id = detail.task.id.clone();
    let mut names = Names::default();
    names.learn(&detail.steps);
    let mut last_id = after;
    let mut failing_since: Option<Instant> = None;
    let mut backoff = BACKOFF_START;
    // A warning was printed and no connection has been made since.
    let mut outage = false;
    loop {
        let url = client.space_url(
            &["tasks", &task_id, "log", "stream"],
            &[("after", Some(last_id.to_string()))],
        );
        let stream = match opened.take() {
            Some(events) => Ok(events),
            None => client.open_stream(url).await.map(Events::new),
        };
        let cause = match stream {
            Err(e) if !e.is_transient() => {
                return Err(
                    anyhow::Error::new(e).context(format!("following the log of task {task_id}"))
                )
            }
            Err(e) => e.to_string(),
            Ok(events) => {
                if std::mem::take(&mut outage) {
                    output::note(&format!("Reconnected to the log stream of task {task_id}."));
                }
                match read(events, &mut names, &mut last_id, output).await {
                    Outcome::Ended(detail) => return Ok(*detail),
                    Outcome::Broken(e) => anyhow::bail!(
                        "following the log of task {task_id}: {e}; see `octopus task show {task_id}`"
                    ),
                    Outcome::Dropped { useful, cause } => {
                        if useful {
                            failing_since = None;
                            backoff = BACKOFF_START;
                        }
                        cause
                    }
                }
            }
        };
        let since = *failing_since.get_or_insert_with(|| {
            output::note(&format!(
                "warning: lost the log stream of task {task_id} ({cause}); reconnecting"
            ));
            outage = true;
            Instant::now()
        });
        if since.elapsed() >= RECONNECT_FOR {
            anyhow::bail!(
                "lost the log stream of task {task_id} and could not get it back within {}s; the task goes on on the server (follow it again with `octopus task log {task_id} --follow`); last error: {cause}",
                RECONNECT_FOR.as_secs()
            );
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// One connection's events, parsed as they arrive.
pub(crate) struct Events {
    stream: std::pin::Pin<Box<dyn Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    parser: SseParser,
    /// Parsed and not yet taken (one chunk may hold several events).
    queued: VecDeque<SseEvent>,
}

/// What [`Events::next`] found.
enum Next {
    Event(SseEvent),
    /// Nothing for [`IDLE`].
    Idle,
    /// The server ended the response.
    Closed,
    /// The connection failed, and why.
    Failed(String),
}

impl Events {
    pub(crate) fn new(resp: reqwest::Response) -> Self {
        Self {
            stream: Box::pin(resp.bytes_stream()),
            parser: SseParser::default(),
            queued: VecDeque::new(),
        }
    }

    async fn next(&mut self) -> Next {
        loop {
            if let Some(event) = self.queued.pop_front() {
                return Next::Event(event);
            }
            match tokio::time::timeout(IDLE, self.stream.next()).await {
                Err(_) => return Next::Idle,
                Ok(None) => return Next::Closed,
                Ok(Some(Err(e))) => return Next::Failed(root_cause(&e)),
                Ok(Some(Ok(chunk))) => self.queued.extend(self.parser.push(&chunk)),
            }
        }
    }

    /// The first event of the events a task's creation answered with: the
    /// task as created (its id, its steps), the rest left to [`follow`].
    pub(crate) async fn created(mut self) -> anyhow::Result<(TaskDetail, Self)> {
        let event = match self.next().await {
            Next::Event(event) => event,
            Next::Idle => anyhow::bail!(
                "the server said nothing for {}s after creating the task",
                IDLE.as_secs()
            ),
            Next::Closed => anyhow::bail!("the server closed the response before naming the task"),
            Next::Failed(cause) => anyhow::bail!("reading the server's answer: {cause}"),
        };
        if event.event != "task" {
            anyhow::bail!(
                "the server's answer began with a `{}` event, not the task it created",
                output::line(&event.event)
            );
        }
        let detail = serde_json::from_str::<TaskDetail>(&event.data)
            .map_err(|e| anyhow::anyhow!("the server's `task` event for the new task: {e}"))?;
        Ok((detail, self))
    }
}

/// Reads one connection's events until `end` or until it drops.
async fn read(mut events: Events, names: &mut Names, last_id: &mut i64, output: Output) -> Outcome {
    let mut useful = false;
    loop {
        let event = match events.next().await {
            Next::Idle => {
                return Outcome::Dropped {
                    // Silence is not a failure of the server: a quiet script says nothing.
                    useful: true,
                    cause: format!("no data for {}s", IDLE.as_secs()),
                };
            }
            Next::Closed => {
                return Outcome::Dropped {
                    useful,
                    cause: "the server closed the stream before the task ended".into(),
                }
            }
            Next::Failed(cause) => return Outcome::Dropped { useful, cause },
            Next::Event(event) => event,
        };
        useful = true;
        match handle(&event, names, last_id, output) {
            Ok(None) => {}
            Ok(Some(detail)) => return Outcome::Ended(Box::new(detail)),
            Err(e) => return Outcome::Broken(e),
        }
    }
}

/// Acts on one event; returns the final detail on `end`.
fn handle(
    event: &SseEvent,
    names: &mut Names,
    last_id: &mut i64,
    output: Output,
) -> Result<Option<TaskDetail>, String> {
    match event.event.as_str() {
        "log" => match serde_json::from_str::<TaskLogLine>(&event.data) {
            Ok(line) if line.id > *last_id => {
                *last_id = line.id;
                print_line(names, &line, output);
            }
            Ok(_) => {} // Already printed (a resumed stream overlapping).
            Err(e) => output::note(&format!(
                "warning: ignoring a malformed log event from the server: {e}"
            )),
        },
        "task" => match serde_json::from_str::<TaskDetail>(&event.data) {
            Ok(detail) => names.learn(&detail.steps),
            Err(e) => output::note(&format!(
                "warning: ignoring a malformed task event from the server: {e}"
            )),
        },
        "end" => {
            return serde_json::from_str::<TaskDetail>(&event.data)
                .map(Some)
                .map_err(|e| {
                    format!("the server ended the stream with a malformed end event ({e})")
                });
        }
        _ => {}
    }
    Ok(None)
}

#[cfg(test)]
mod service_message_tests {
    use super::*;

    fn line(stream: &str, text: &str) -> TaskLogLine {
        TaskLogLine {
            id: 1,
            task_id: "ServerTasks-1".into(),
            machine_id: Some(1),
            sequence: Some(0),
            timestamp: 0,
            stream: stream.into(),
            text: text.into(),
        }
    }

    #[test]
    fn service_messages_are_shown_as_what_they_mean() {
        let set = line(
            "stdout",
            "##octopus[setVariable name='Url' value='http://x/']",
        );
        assert_eq!(
            service_message_text(&set).as_deref(),
            Some("(output variable Url = http://x/)")
        );
        let secret = line(
            "stdout",
            "##octopus[setVariable name='Pw' value='********' sensitive='True']",
        );
        assert_eq!(
            service_message_text(&secret).as_deref(),
            Some("(output variable Pw = ********)")
        );
        let progress = line(
            "stdout",
            "##octopus[progress percentage='50' message='Half']",
        );
        assert_eq!(
            service_message_text(&progress).as_deref(),
            Some("(progress 50%: Half)")
        );
        assert_eq!(service_message_text(&line("stdout", "plain text")), None);
        assert_eq!(service_message_text(&line("stderr", &set.text)), None);
    }

    #[test]
    fn log_lines_cannot_drive_the_terminal() {
        let mut names = Names::default();
        names.0.insert(1, "web\u{1b}[1m01".into());
        let l = line(
            "stderr",
            "ok\u{1b}]0;owned\u{7}\rfake\n[server] done\u{9b}2J\u{7f}\tcol\r",
        );
        assert_eq!(
            names.format(&l),
            r"[web\e[1m01]! ok\e]0;owned\x07\rfake\n[server] done\x9b2J\x7f".to_string() + "\tcol"
        );
        assert_eq!(
            names.format(&line("stdout", "plain\ttext")),
            "[web\\e[1m01] plain\ttext"
        );
    }
}
