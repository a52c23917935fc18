//! In-memory implementations of the tentacle services, for proving the transport.
//! They are test fixtures, not the agent: the tentacle crate has the real ones.
//!
//! - Capabilities: ping echoes; capabilities describe this process.
//! - Scripts: the body is a number N; the "script" writes lines `line 0`..`line N-1`,
//!   one every `arguments[0]` milliseconds (default 0), then exits 0.
//! - Files: uploads are hashed (SHA-256) and checked against the final hash, then
//!   discarded; downloads stream `path`'s length (a number) of deterministic bytes.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use octo_proto::v1::capabilities_server::{Capabilities, CapabilitiesServer};
use octo_proto::v1::file_service_server::{FileService, FileServiceServer};
use octo_proto::v1::script_service_server::{ScriptService, ScriptServiceServer};
use octo_proto::v1::*;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};

/// All three fixture services as tonic routes.
pub fn routes() -> tonic::service::Routes {
    let scripts = FakeScripts::default();
    tonic::service::Routes::new(CapabilitiesServer::new(FakeCapabilities))
        .add_service(ScriptServiceServer::new(scripts))
        .add_service(
            FileServiceServer::new(FakeFiles)
                .max_decoding_message_size(16 << 20)
                .max_encoding_message_size(16 << 20),
        )
}

/// Capabilities fixture.
#[derive(Debug, Clone, Copy)]
pub struct FakeCapabilities;

#[tonic::async_trait]
impl Capabilities for FakeCapabilities {
    async fn ping(&self, request: Request<PingRequest>) -> Result<Response<PingReply>, Status> {
        Ok(Response::new(PingReply {
            payload: request.into_inner().payload,
        }))
    }

    async fn get_capabilities(
        &self,
        _request: Request<GetCapabilitiesRequest>,
    ) -> Result<Response<CapabilitiesReply>, Status> {
        Ok(Response::new(CapabilitiesReply {
            tentacle_version: "test".into(),
            os: std::env::consts::OS.into(),
            arch: std::env::consts::ARCH.into(),
            services: vec![ServiceVersion {
                name: octo_proto::service_names::SCRIPT.into(),
                version: 1,
            }],
            ..Default::default()
        }))
    }
}

#[derive(Debug)]
struct FakeScript {
    lines: watch::Sender<Vec<LogLine>>,
    done: watch::Sender<bool>,
}

/// Script fixture: a script of N lines (its body), one every M ms (its first
/// argument). It has no RunScript (as a tentacle of contract version 1).
#[derive(Debug, Clone, Default)]
pub struct FakeScripts {
    scripts: Arc<Mutex<HashMap<String, Arc<FakeScript>>>>,
}

impl FakeScripts {
    fn get(&self, ticket: &str) -> Result<Arc<FakeScript>, Status> {
        self.scripts
            .lock()
            .map_err(|_| Status::internal("poisoned"))?
            .get(ticket)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("unknown ticket {ticket}")))
    }

    fn status(ticket: &str, s: &FakeScript, since: u64) -> ScriptStatus {
        let lines = s.lines.borrow();
        let done = *s.done.borrow();
        ScriptStatus {
            ticket: ticket.into(),
            state: if done {
                ScriptState::Complete
            } else {
                ScriptState::Running
            } as i32,
            exit_code: 0,
            logs: lines.iter().skip(since as usize).cloned().collect(),
            next_sequence: lines.len() as u64,
            more_logs: false,
        }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<ScriptEvent, Status>> + Send>>;

#[tonic::async_trait]
impl ScriptService for FakeScripts {
    async fn start_script(
        &self,
        request: Request<StartScriptRequest>,
    ) -> Result<Response<ScriptStatus>, Status> {
        let req = request.into_inner();
        let n: u64 = req
            .script_body
            .trim()
            .parse()
            .map_err(|_| Status::invalid_argument("fixture scripts are a line count"))?;
        let delay: u64 = req
            .arguments
            .first()
            .and_then(|a| a.parse().ok())
            .unwrap_or(0);
        let script = {
            let mut map = self
                .scripts
                .lock()
                .map_err(|_| Status::internal("poisoned"))?;
            if let Some(s) = map.get(&req.ticket) {
                return Ok(Response::new(Self::status(&req.ticket, s, 0)));
            }
            let s = Arc::new(FakeScript {
                lines: watch::Sender::new(Vec::new()),
                done: watch::Sender::new(false),
            });
            map.insert(req.ticket.clone(), s.clone());
            s
        };
        let runner = script.clone();
        tokio::spawn(async move {
            for i in 0..n {
                if delay > 0 {
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                }
                runner.lines.send_modify(|l| {
                    l.push(LogLine {
                        sequence: i,
                        timestamp_unix_ms: 0,
                        stream: LogStream::Stdout as i32,
                        text: format!("line {i}"),
                    })
                });
            }
            runner.done.send_replace(true);
        });
        Ok(Response::new(Self::status(&req.ticket, &script, 0)))
    }

    async fn get_status(
        &self,
        request: Request<ScriptStatusRequest>,
    ) -> Result<Response<ScriptStatus>, Status> {
        let req = request.into_inner();
        let s = self.get(&req.ticket)?;
        Ok(Response::new(Self::status(
            &req.ticket,
            &s,
            req.since_sequence,
        )))
    }

    type RunScriptStream = EventStream;

    /// Refused as a tentacle of contract version 1 would (it has no such
    /// call): callers then start the script and stream its log apart, so the
    /// tests on this fake keep that way covered.
    async fn run_script(
        &self,
        _request: Request<RunScriptRequest>,
    ) -> Result<Response<Self::RunScriptStream>, Status> {
        Err(Status::unimplemented(
            "RunScript (this fake speaks contract version 1)",
        ))
    }

    type StreamLogsStream = EventStream;

    async fn stream_logs(
        &self,
        request: Request<ScriptStatusRequest>,
    ) -> Result<Response<Self::StreamLogsStream>, Status> {
        let req = request.into_inner();
        let s = self.get(&req.ticket)?;
        let ticket = req.ticket.clone();
        let stream = async_stream(move |tx| async move {
            let mut next = req.since_sequence;
            let mut lines_rx = s.lines.subscribe();
            loop {
                let (batch, len) = {
                    let lines = lines_rx.borrow_and_update();
                    let batch: Vec<LogLine> = lines.iter().skip(next as usize).cloned().collect();
                    (batch, lines.len() as u64)
                };
                for l in batch {
                    if tx
                        .send(Ok(ScriptEvent {
                            event: Some(script_event::Event::Log(l)),
                        }))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                next = len;
                if *s.done.borrow() && s.lines.borrow().len() as u64 == next {
                    let status = FakeScripts::status(&ticket, &s, next);
                    let _ = tx
                        .send(Ok(ScriptEvent {
                            event: Some(script_event::Event::Completed(status)),
                        }))
                        .await;
                    return;
                }
                let mut done_rx = s.done.subscribe();
                tokio::select! {
                    r = lines_rx.changed() => if r.is_err() { return },
                    r = done_rx.wait_for(|d| *d) => if r.is_err() { return },
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn cancel_script(
        &self,
        request: Request<CancelScriptRequest>,
    ) -> Result<Response<ScriptStatus>, Status> {
        let req = request.into_inner();
        let s = self.get(&req.ticket)?;
        Ok(Response::new(Self::status(
            &req.ticket,
            &s,
            req.since_sequence,
        )))
    }

    async fn complete_script(
        &self,
        request: Request<CompleteScriptRequest>,
    ) -> Result<Response<ScriptStatus>, Status> {
        let req = request.into_inner();
        let s = self.get(&req.ticket)?;
        let status = Self::status(&req.ticket, &s, req.since_sequence);
        if let Ok(mut map) = self.scripts.lock() {
            map.remove(&req.ticket);
        }
        Ok(Response::new(status))
    }
}

/// Runs `f` with a sender and returns the receiving half as a boxed stream.
fn async_stream<F, Fut>(f: F) -> EventStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<ScriptEvent, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// File fixture.
#[derive(Debug, Clone, Copy)]
pub struct FakeFiles;

type DownloadStream = Pin<Box<dyn Stream<Item = Result<DownloadReply, Status>> + Send>>;

/// Deterministic content of a fixture download.
pub fn fixture_bytes(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((offset + i) % 251) as u8)
        .collect()
}

#[tonic::async_trait]
impl FileService for FakeFiles {
    async fn upload_file(
        &self,
        request: Request<Streaming<UploadRequest>>,
    ) -> Result<Response<UploadReply>, Status> {
        let mut stream = request.into_inner();
        // Hash on a separate thread so decryption and hashing use both cores.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Bytes>(64);
        let hasher = tokio::task::spawn_blocking(move || {
            let mut h = Sha256::new();
            for chunk in rx {
                h.update(&chunk);
            }
            h.finalize()
        });
        let mut received = 0u64;
        let mut path = String::new();
        let mut finish = None;
        while let Some(msg) = stream.message().await? {
            match msg.part {
                Some(upload_request::Part::Start(s)) => path = s.path,
                Some(upload_request::Part::Chunk(c)) => {
                    if c.offset != received {
                        return Err(Status::invalid_argument(format!(
                            "chunk at offset {} but {} bytes received",
                            c.offset, received
                        )));
                    }
                    received += c.data.len() as u64;
                    tx.send(c.data)
                        .map_err(|_| Status::internal("hasher stopped"))?;
                }
                Some(upload_request::Part::Finish(f)) => finish = Some(f),
                None => return Err(Status::invalid_argument("empty upload message")),
            }
        }
        drop(tx);
        let digest = hasher.await.map_err(|e| Status::internal(e.to_string()))?;
        let actual: String = digest.iter().map(|b| format!("{b:02X}")).collect();
        let finish =
            finish.ok_or_else(|| Status::invalid_argument("upload ended without UploadFinish"))?;
        if !finish.sha256.eq_ignore_ascii_case(&actual) || finish.total_length != received {
            return Err(Status::data_loss(format!(
                "SHA-256 mismatch for {path}: sender said {} ({} bytes), received {actual} ({received} bytes)",
                finish.sha256, finish.total_length
            )));
        }
        Ok(Response::new(UploadReply {
            full_path: path,
            length: received,
            sha256: actual,
        }))
    }

    async fn get_upload_state(
        &self,
        _request: Request<UploadStateRequest>,
    ) -> Result<Response<UploadStateReply>, Status> {
        Ok(Response::new(UploadStateReply::default()))
    }

    type DownloadFileStream = DownloadStream;

    async fn download_file(
        &self,
        request: Request<DownloadRequest>,
    ) -> Result<Response<Self::DownloadFileStream>, Status> {
        let req = request.into_inner();
        let total: u64 = req
            .path
            .parse()
            .map_err(|_| Status::invalid_argument("fixture downloads are a byte count"))?;
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tokio::spawn(async move {
            let _ = tx
                .send(Ok(DownloadReply {
                    part: Some(download_reply::Part::Start(DownloadStart {
                        total_length: total,
                    })),
                }))
                .await;
            let mut h = Sha256::new();
            h.update(fixture_bytes(0, req.offset as usize));
            let mut off = req.offset;
            while off < total {
                let n = (total - off).min(64 << 10) as usize;
                let data = fixture_bytes(off, n);
                h.update(&data);
                let chunk = FileChunk {
                    offset: off,
                    data: data.into(),
                };
                if tx
                    .send(Ok(DownloadReply {
                        part: Some(download_reply::Part::Chunk(chunk)),
                    }))
                    .await
                    .is_err()
                {
                    return;
                }
                off += n as u64;
            }
            let sha256 = h.finalize().iter().map(|b| format!("{b:02X}")).collect();
            let _ = tx
                .send(Ok(DownloadReply {
                    part: Some(download_reply::Part::Finish(DownloadFinish {
                        sha256,
                        total_length: total,
                    })),
                }))
                .await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
