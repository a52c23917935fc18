//! `octopus run-script` against a scripted HTTP server: the task's events read
//! from the answer that created it, a server that answers with JSON (it does
//! not send them), and events that stop before the end (followed on from the
//! last line seen, no line printed twice).
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{json, Value};

const CLIENT: &str = env!("CARGO_BIN_EXE_octopus");
const TASK: &str = "ServerTasks-7";

/// One request as the server saw it.
#[derive(Debug)]
struct Seen {
    method: String,
    target: String,
    accept: String,
}

/// What the scripted server answers a request with.
enum Answer {
    Json(u16, Value),
    /// Events, then the connection closes.
    Events(Vec<(&'static str, Value)>),
}

fn view(state: &str, step_state: &str) -> Value {
    json!({
        "task": {
            "id": TASK, "space_id": 1, "kind": "Script", "description": "Run a bash script on machine web01",
            "arguments": {}, "environments": ["Test"], "state": state, "error": null,
            "cancel_requested": false, "created_at": 1, "started_at": null, "completed_at": null
        },
        "steps": [{
            "task_id": TASK, "machine_id": 3, "machine_name": "web01", "state": step_state,
            "exit_code": if step_state == "Success" { json!(0) } else { Value::Null },
            "error": null, "started_at": null, "completed_at": null, "ticket": "ServerTasks-7-m3",
            "next_sequence": 0, "output_variables": {}
        }]
    })
}

fn line(id: i64, text: &str) -> Value {
    json!({
        "id": id, "task_id": TASK, "machine_id": 3, "sequence": id, "timestamp": 1,
        "stream": "stdout", "text": text
    })
}

/// Serves `answers` in order, one per connection, and reports each request.
fn serve(answers: Vec<Answer>) -> (String, mpsc::Receiver<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for answer in answers {
            let (stream, _) = listener.accept().unwrap();
            let seen = answer_one(stream, answer);
            if tx.send(seen).is_err() {
                return;
            }
        }
    });
    (base, rx)
}

fn answer_one(mut stream: TcpStream, answer: Answer) -> Seen {
    stream.set_nodelay(true).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    reader.read_line(&mut request_line).unwrap();
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap().to_string();
    let target = parts.next().unwrap().to_string();
    let (mut length, mut accept) = (0usize, String::new());
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).unwrap();
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':').unwrap();
        match name.to_ascii_lowercase().as_str() {
            "content-length" => length = value.trim().parse().unwrap(),
            "accept" => accept = value.trim().to_string(),
            _ => {}
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    let response = match answer {
        Answer::Json(status, v) => {
            let text = v.to_string();
            format!(
                "HTTP/1.1 {status} Created\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
                text.len()
            )
        }
        Answer::Events(events) => {
            let mut text = String::from(
                "HTTP/1.1 201 Created\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n",
            );
            for (name, data) in events {
                text.push_str(&format!("event: {name}\ndata: {data}\n\n"));
            }
            text
        }
    };
    stream.write_all(response.as_bytes()).unwrap();
    Seen {
        method,
        target,
        accept,
    }
}

fn run_script(base: &str) -> (i32, String, String) {
    let args = ["--server", base, "--api-key", "API-TEST", "run-script"];
    let script = ["--machine", "web01", "--script", "echo"];
    common::output(CLIENT, &[&args[..], &script[..]].concat())
}

fn next(rx: &mpsc::Receiver<Seen>) -> Seen {
    rx.recv_timeout(Duration::from_secs(30)).unwrap()
}

#[test]
fn the_events_of_the_answer_that_created_the_task_are_all_it_needs() {
    let (base, rx) = serve(vec![Answer::Events(vec![
        ("task", view("Queued", "Queued")),
        ("log", line(1, "hello")),
        ("end", view("Success", "Success")),
    ])]);
    let (code, out, err) = run_script(&base);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        err.contains(&format!("Started script task {TASK} on web01")),
        "{err}"
    );
    assert_eq!(out.matches("[web01] hello").count(), 1, "{out}");
    let post = next(&rx);
    assert_eq!(post.method, "POST");
    assert_eq!(post.target, "/api/spaces/Default/tasks/script");
    assert!(post.accept.contains("text/event-stream"), "{post:?}");
    // No other request: the stream was not opened again.
    assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
}

#[test]
fn a_server_that_answers_with_json_is_followed_through_its_stream() {
    let (base, rx) = serve(vec![
        Answer::Json(201, view("Queued", "Queued")),
        Answer::Events(vec![
            ("task", view("Executing", "Executing")),
            ("log", line(1, "hello")),
            ("end", view("Success", "Success")),
        ]),
    ]);
    let (code, out, err) = run_script(&base);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(out.matches("[web01] hello").count(), 1, "{out}");
    assert_eq!(next(&rx).method, "POST");
    let get = next(&rx);
    assert_eq!(get.method, "GET");
    assert_eq!(
        get.target,
        format!("/api/spaces/Default/tasks/{TASK}/log/stream?after=0")
    );
}

#[test]
fn events_that_stop_before_the_end_are_followed_on_from_the_last_line() {
    let (base, rx) = serve(vec![
        Answer::Events(vec![
            ("task", view("Queued", "Queued")),
            ("log", line(1, "one")),
        ]),
        // The stream opened again replays line 1 (overlap), then goes on.
        Answer::Events(vec![
            ("log", line(1, "one")),
            ("log", line(2, "two")),
            ("end", view("Success", "Success")),
        ]),
    ]);
    let (code, out, err) = run_script(&base);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(out.matches("[web01] one").count(), 1, "{out}");
    assert_eq!(out.matches("[web01] two").count(), 1, "{out}");
    assert!(err.contains("lost the log stream"), "{err}");
    assert_eq!(next(&rx).method, "POST");
    let get = next(&rx);
    assert_eq!(
        get.target,
        format!("/api/spaces/Default/tasks/{TASK}/log/stream?after=1")
    );
}

#[test]
fn an_answer_that_does_not_begin_with_the_task_is_an_error_that_says_so() {
    let (base, _rx) = serve(vec![Answer::Events(vec![("log", line(1, "hello"))])]);
    let (code, out, err) = run_script(&base);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        err.contains("starting the script") && err.contains("not the task it created"),
        "{err}"
    );
}
