//! `GET /api/tasks/{id}/log/stream?after=ID`: a task's log as server-sent events.
//! The same events answer `POST /api/tasks/script` when the request accepts
//! `text/event-stream` ([`created_stream`]): the task is followed from its
//! creation in the request that created it, with no second request and no read.
//!
//! Events: `task` with `{"task", "steps"}` first and whenever the task or a step
//! changes state; `log` with one log line (its id as the event id) for every line
//! after `after` (or the `Last-Event-ID` header), stored ones first, then live
//! ones as they are stored; finally `end` with `{"task", "steps"}` once the task
//! is final, after its last line, and the stream ends. A comment every 15 s keeps
//! proxies from closing an idle stream.
//!
//! Live means pushed: the producer waits on the engine's notifier for the task,
//! then reads whatever rows are new from the store. A slow reader therefore
//! loses nothing; it reads more rows at once. Lines are read only when the
//! notifier counted new ones; the task is read again only when it counted a
//! state change, with its steps and new lines in the same read (one store
//! call on SQLite), and for a task whose reading is costly (thousands of steps)
//! not more often than a few times its cost apart (changes meanwhile are
//! shown together), so a large fan-out's stream does not re-read every step
//! for every step that changes.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::IntoResponse;
use octo_store::{Store, TaskLogLine, TaskState, TaskStep};
use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use octo_api_types::TaskView;
use octo_engine::{Changes, Engine};

use super::tasks::load_view_with_log;
use super::{ApiError, ApiResult};
use crate::authz::{Caller, RequestSpace};
use crate::state::AppState;

/// Keep-alive comment interval.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Log lines read from the store at once.
const PAGE: i64 = 1000;
/// Events buffered towards a slow client before the producer waits.
const BUFFER: usize = 256;
/// A `task` event that took less than this to read and send is followed by
/// the next at once; a costlier one (a task of thousands of steps) is
/// followed by a pause of [`VIEW_PAUSE_FACTOR`] times its cost (at most
/// [`VIEW_PAUSE_MAX`]), whatever changed meanwhile then shown at once, so
/// that a stream spends at most about a tenth of its time re-reading the task
/// (a fifth before; with a tenth, a watched fan-out to 1,000 machines costs the
/// server 11-15 % less CPU a step: BENCHMARKS, issue 15).
///
/// Only a task of at least [`VIEW_PAUSE_MIN_STEPS`] steps pauses: a smaller
/// one's view is cheap by nature, and a read that took long once (the store
/// busy at that moment) must not hold back its next event, its end say, by
/// nine times as long (a one-machine task's round trip had a p99 of 16-20 ms
/// from that: BENCHMARKS, issue 15).
const VIEW_COST_FREE: Duration = Duration::from_millis(1);
const VIEW_PAUSE_FACTOR: u32 = 9;
const VIEW_PAUSE_MAX: Duration = Duration::from_millis(500);
const VIEW_PAUSE_MIN_STEPS: usize = 64;

/// How long a stream waits before its next `task` event after a read of a
/// task of `steps` steps that took `cost` (see [`VIEW_COST_FREE`]).
fn pause_after(cost: Duration, steps: usize) -> Option<Duration> {
    (steps >= VIEW_PAUSE_MIN_STEPS && cost >= VIEW_COST_FREE)
        .then(|| (cost * VIEW_PAUSE_FACTOR).min(VIEW_PAUSE_MAX))
}

#[derive(Debug, Deserialize)]
pub(crate) struct StreamQuery {
    after: Option<i64>,
}

pub(crate) async fn stream_log(
    State(s): State<AppState>,
    axum::extract::Extension(caller): axum::extract::Extension<Caller>,
    axum::extract::Extension(RequestSpace(space)): axum::extract::Extension<RequestSpace>,
    id: Result<Path<String>, PathRejection>,
    q: Result<Query<StreamQuery>, QueryRejection>,
    headers: HeaderMap,
) -> ApiResult<impl IntoResponse> {
    let Path(id) = id?;
    let Query(q) = q?;
    let last_event_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok());
    let after = q.after.or(last_event_id).unwrap_or(0);
    open_stream(&s, caller, space, id, after).await
}

/// The events of a task the caller may see, from after line `after` (the
/// portal's live task page uses this too).
pub async fn open_stream(
    s: &AppState,
    caller: Caller,
    space: octo_api_types::Space,
    id: String,
    after: i64,
) -> ApiResult<Sse<axum::response::sse::KeepAliveStream<ReceiverStream<Result<Event, Infallible>>>>>
{
    // Subscribed before the task is read: a change after the read is counted.
    let engine = s.engine.clone();
    let rx = engine.subscribe(&id);
    let counted = *rx.borrow();
    let sub = Subscription {
        rx: Some(rx),
        engine: engine.clone(),
        task_id: id.clone(),
    };
    // Read before the stream opens, so that a task the caller may not see is
    // a 404 rather than an `error` event; the first events show this read
    // unless a change was counted since the subscription.
    let read = load_view_with_log(s.store.as_ref(), &caller, &space, &id, after, PAGE).await?;
    let (tx, rx) = mpsc::channel(BUFFER);
    let reader = Reader {
        store: s.store.clone(),
        caller,
        space,
    };
    engine.spawn(produce(sub, reader, Some((counted, read)), after, tx, None));
    Ok(Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}

/// A task's notifier, subscribed to before the task started (so nothing it
/// does goes uncounted), with its counters then.
pub(crate) struct Early {
    rx: watch::Receiver<Changes>,
    counted: Changes,
}

impl Early {
    /// Subscribes to task `task_id`'s changes; call it before the task starts.
    pub(crate) fn subscribe(engine: &Engine, task_id: &str) -> Self {
        let rx = engine.subscribe(task_id);
        let counted = *rx.borrow();
        Self { rx, counted }
    }
}

/// The events of a task this request created and the caller may see: first
/// a `task` event with `view`, the task as created (no read), then, as for
/// any stream, every line, every change of state and `end`.
pub(crate) fn created_stream(
    s: &AppState,
    caller: Caller,
    space: octo_api_types::Space,
    view: TaskView,
    early: Early,
) -> Sse<axum::response::sse::KeepAliveStream<ReceiverStream<Result<Event, Infallible>>>> {
    let engine = s.engine.clone();
    let sub = Subscription {
        rx: Some(early.rx),
        engine: engine.clone(),
        task_id: view.task.id.clone(),
    };
    let (tx, rx) = mpsc::channel(BUFFER);
    // First whatever happens next: the channel is empty.
    let _ = tx.try_send(Ok(json_event("task", &view)));
    let sent = key(&view);
    let reader = Reader {
        store: s.store.clone(),
        caller,
        space,
    };
    let opened = Some((early.counted, (view, Vec::new())));
    engine.spawn(produce(sub, reader, opened, 0, tx, Some(sent)));
    Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
}

/// Who reads the stream, and from where.
struct Reader {
    store: Arc<dyn Store>,
    caller: Caller,
    space: octo_api_types::Space,
}

/// A receiver of the task's notifier, released when dropped.
struct Subscription {
    rx: Option<watch::Receiver<Changes>>,
    engine: Arc<Engine>,
    task_id: String,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.rx.take();
        self.engine.release(&self.task_id);
    }
}

/// What a `task` event is sent again for.
#[derive(Debug, PartialEq)]
struct StateKey {
    task: (TaskState, Option<String>, bool),
    steps: Vec<(i64, TaskState, Option<i32>, Option<String>)>,
}

fn key(v: &TaskView) -> StateKey {
    StateKey {
        task: (v.task.state, v.task.error.clone(), v.task.cancel_requested),
        steps: v
            .steps
            .iter()
            .map(|s: &TaskStep| (s.machine_id, s.state, s.exit_code, s.error.clone()))
            .collect(),
    }
}

/// The client went away or the server stops.
struct Gone;

/// Streams the task's events to `tx` until its end, or until the client
/// goes away or the server stops.
///
/// At a state change the task, its steps and the lines after the last sent
/// are one read (one store call on SQLite), the lines read after the task:
/// every line stored before the state shown is sent before the `task` event
/// showing it (the first `task` event excepted: it comes first). Between
/// state changes only new lines are read, and only when some were counted.
/// `opened` is the read made when the stream opened, with the notifier's
/// counters just before it: the first events show it when nothing was
/// counted since. `sent` is the state a `task` event already showed.
async fn produce(
    mut sub: Subscription,
    reader: Reader,
    mut opened: Option<(Changes, (TaskView, Vec<TaskLogLine>))>,
    mut after: i64,
    tx: mpsc::Sender<Result<Event, Infallible>>,
    sent: Option<StateKey>,
) {
    let Some(mut rx) = sub.rx.take() else { return };
    let engine = sub.engine.clone();
    let id = sub.task_id.clone();
    let mut sent_key: Option<StateKey> = sent;
    let mut seen_state: Option<u64> = None;
    // The log counter when lines were last read: no new count, no new line
    // to read (a line stored is counted after it is stored).
    let mut seen_log: Option<u64> = None;
    let result: Result<(), Gone> = async {
        let mut first = true;
        let mut pause_until: Option<tokio::time::Instant> = None;
        loop {
            let changes = *rx.borrow_and_update();
            if first || seen_state != Some(changes.state) {
                seen_state = Some(changes.state);
                // Lines counted after `changes` was taken are read again
                // at the next change of the counter, if this read missed them.
                seen_log = Some(changes.log);
                let started = tokio::time::Instant::now();
                // The read made when the stream opened, if nothing was
                // counted since the subscription before it.
                let read = match opened.take() {
                    Some((counted, read)) if counted == changes => Ok(read),
                    _ => {
                        load_view_with_log(
                            reader.store.as_ref(),
                            &reader.caller,
                            &reader.space,
                            &id,
                            after,
                            PAGE,
                        )
                        .await
                    }
                };
                let (view, lines) = match read {
                    Ok(r) => r,
                    Err(e) => {
                        send(&tx, Event::default().event("error").data(e_message(&e))).await?;
                        return Ok(());
                    }
                };
                let done = view.task.state.is_final();
                let steps = view.steps.len();
                let k = key(&view);
                let changed = sent_key.as_ref() != Some(&k);
                if first && changed && !done {
                    send(&tx, json_event("task", &view)).await?;
                }
                let full = page_full(lines.len());
                send_read_lines(lines, &mut after, &tx).await?;
                if full {
                    send_lines(reader.store.as_ref(), &id, &mut after, &tx).await?;
                }
                if done {
                    send(&tx, json_event("end", &view)).await?;
                    return Ok(());
                }
                if !first && changed {
                    send(&tx, json_event("task", &view)).await?;
                }
                sent_key = Some(k);
                first = false;
                pause_until = pause_after(started.elapsed(), steps)
                    .map(|pause| tokio::time::Instant::now() + pause);
            } else if seen_log != Some(changes.log) {
                seen_log = Some(changes.log);
                send_lines(reader.store.as_ref(), &id, &mut after, &tx).await?;
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { return Ok(()) },
                _ = tx.closed() => return Err(Gone),
                _ = engine.stopping().cancelled() => return Err(Gone),
            }
            if let Some(at) = pause_until.take() {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = tx.closed() => return Err(Gone),
                    _ = engine.stopping().cancelled() => return Err(Gone),
                }
            }
        }
    }
    .await;
    let _ = result;
    sub.rx = Some(rx);
}

fn e_message(e: &ApiError) -> String {
    serde_json::json!({ "error": e.message }).to_string()
}

async fn send_lines(
    store: &dyn Store,
    id: &str,
    after: &mut i64,
    tx: &mpsc::Sender<Result<Event, Infallible>>,
) -> Result<(), Gone> {
    loop {
        let lines = match store.task_log(id, *after, PAGE).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("reading the log of {id}: {e}");
                return Err(Gone);
            }
        };
        let full = page_full(lines.len());
        send_read_lines(lines, after, tx).await?;
        if !full {
            return Ok(());
        }
    }
}

/// Whether a read of `n` lines filled its page (more may follow).
fn page_full(n: usize) -> bool {
    i64::try_from(n).unwrap_or(i64::MAX) >= PAGE
}

/// Sends lines read, moving `after` past each.
async fn send_read_lines(
    lines: Vec<TaskLogLine>,
    after: &mut i64,
    tx: &mpsc::Sender<Result<Event, Infallible>>,
) -> Result<(), Gone> {
    for line in lines {
        *after = line.id;
        send(tx, json_event("log", &line).id(line.id.to_string())).await?;
    }
    Ok(())
}

fn json_event<T: serde::Serialize>(name: &str, value: &T) -> Event {
    let data = serde_json::to_string(value).unwrap_or_else(|e| {
        serde_json::json!({ "error": format!("serializing the event: {e}") }).to_string()
    });
    Event::default().event(name).data(data)
}

async fn send(tx: &mpsc::Sender<Result<Event, Infallible>>, event: Event) -> Result<(), Gone> {
    tx.send(Ok(event)).await.map_err(|_| Gone)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small task's stream never pauses, however long one read took; a
    /// large one's pauses nine times the read, at most half a second.
    #[test]
    fn only_a_large_tasks_costly_read_pauses_its_stream() {
        let ms = Duration::from_millis;
        assert_eq!(pause_after(ms(3), 1), None);
        assert_eq!(pause_after(ms(3), VIEW_PAUSE_MIN_STEPS - 1), None);
        assert_eq!(pause_after(Duration::from_micros(900), 5_000), None);
        assert_eq!(pause_after(ms(2), VIEW_PAUSE_MIN_STEPS), Some(ms(18)));
        assert_eq!(pause_after(ms(200), 5_000), Some(VIEW_PAUSE_MAX));
    }
}
