//! Polling over WebSocket on 127.0.0.1: a polling tentacle opens `wss://` to a
//! server's WebSocket port (TLS with its certificate, upgrade with subprotocol
//! `octopus-tentacle.v1`) and serves the same HTTP/2 gRPC as over TCP. Round
//! trip, streaming, concurrency, refusals both ways, wrong path/subprotocol,
//! the friendly page, reconnect after a restart, and through a real HTTP
//! CONNECT proxy. Every wait is bounded.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use octo_comms::websocket::SUBPROTOCOL;
use octo_comms::{
    Backoff, CommsError, Connection, Endpoint, PollingOptions, PollingTarget, ProxySetting,
    ServerComms, ServerCommsOptions, TentacleComms, WebSocketListenerOptions,
};
use octo_proto::v1::*;
use octo_testkit as kit;
use octo_tls::{Identity, Thumbprint, TrustStore};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(20);

/// A server whose WebSocket port (127.0.0.1, `addr` or a free port) trusts `tentacles`.
async fn ws_server(
    identity: Identity,
    tentacles: &[Thumbprint],
    options: ServerCommsOptions,
    addr: Option<SocketAddr>,
) -> (ServerComms, SocketAddr, kit::Guard) {
    let trust = TrustStore::new(tentacles.iter().copied(), kit::hint("server"));
    let comms = ServerComms::new(identity, trust, options);
    let (addr, guard) = serve_ws(&comms, addr, WebSocketListenerOptions::default()).await;
    (comms, addr, guard)
}

async fn serve_ws(
    comms: &ServerComms,
    addr: Option<SocketAddr>,
    options: WebSocketListenerOptions,
) -> (SocketAddr, kit::Guard) {
    let listener = TcpListener::bind(addr.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let token = CancellationToken::new();
    let (c, t) = (comms.clone(), token.clone());
    tokio::spawn(async move { c.run_web_socket_listener(listener, options, t).await });
    (addr, kit::Guard(token))
}

/// A polling tentacle keeping `connections` WebSockets open to `url`.
fn ws_tentacle(
    identity: Identity,
    servers: &[Thumbprint],
    url: &str,
    subscription_id: &str,
    connections: usize,
    proxy: ProxySetting,
) -> (TentacleComms, kit::Guard) {
    let trust = TrustStore::new(servers.iter().copied(), kit::hint("tentacle"));
    let comms =
        TentacleComms::new(identity, trust, kit::services::routes(), "Test").with_proxy(proxy);
    let token = CancellationToken::new();
    let target = PollingTarget {
        address: url.to_string(),
        subscription_id: subscription_id.to_string(),
    };
    let (c, t) = (comms.clone(), token.clone());
    let backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(500));
    tokio::spawn(async move {
        c.run_polling_with(target, PollingOptions::default(), connections, backoff, t)
            .await
    });
    (comms, kit::Guard(token))
}

fn url(addr: SocketAddr) -> String {
    format!("wss://{addr}/tentacle")
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02X}")).collect()
}

/// Unary, server-streaming, a 3 MiB client-streaming upload and a download.
async fn exercise(conn: &Connection, ticket: &str) {
    let reply = conn
        .capabilities()
        .ping(PingRequest {
            payload: b"over a websocket".to_vec(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.payload, b"over a websocket");
    conn.scripts()
        .start_script(StartScriptRequest {
            ticket: ticket.into(),
            script_body: "20".into(),
            arguments: vec!["2".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let mut stream = conn
        .scripts()
        .stream_logs(ScriptStatusRequest {
            ticket: ticket.into(),
            since_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut seqs = Vec::new();
    let mut completed = false;
    while let Some(ev) = stream.message().await.unwrap() {
        match ev.event.unwrap() {
            script_event::Event::Log(l) => {
                assert_eq!(l.text, format!("line {}", l.sequence));
                seqs.push(l.sequence);
            }
            script_event::Event::Completed(s) => {
                assert_eq!(s.state, ScriptState::Complete as i32);
                completed = true;
            }
        }
    }
    assert_eq!(seqs, (0..20).collect::<Vec<_>>());
    assert!(completed);

    let data: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 251) as u8).collect();
    let sha = hex(&Sha256::digest(&data));
    let mut msgs = vec![UploadRequest {
        part: Some(upload_request::Part::Start(UploadStart {
            path: "ws.bin".into(),
            total_length: data.len() as u64,
            ..Default::default()
        })),
    }];
    for (i, c) in data.chunks(256 << 10).enumerate() {
        msgs.push(UploadRequest {
            part: Some(upload_request::Part::Chunk(FileChunk {
                offset: (i * (256 << 10)) as u64,
                data: bytes::Bytes::copy_from_slice(c),
            })),
        });
    }
    msgs.push(UploadRequest {
        part: Some(upload_request::Part::Finish(UploadFinish {
            sha256: sha.clone(),
            total_length: data.len() as u64,
        })),
    });
    let reply = conn
        .files()
        .upload_file(tokio_stream::iter(msgs))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((reply.length, reply.sha256), (data.len() as u64, sha));

    let mut dl = conn
        .files()
        .download_file(DownloadRequest {
            path: "300000".into(),
            offset: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(m) = dl.message().await.unwrap() {
        if let Some(download_reply::Part::Chunk(c)) = m.part {
            got.extend_from_slice(&c.data);
        }
    }
    assert_eq!(got, kit::services::fixture_bytes(0, 300_000));
}

#[tokio::test]
async fn polling_over_web_socket_round_trip() {
    kit::init_tracing();
    let (server_id, tentacle_id) = (kit::identity("server"), kit::identity("tentacle"));
    let (server, addr, _sg) = ws_server(
        server_id.clone(),
        &[tentacle_id.thumbprint()],
        ServerCommsOptions::default(),
        None,
    )
    .await;
    let (_t, _tg) = ws_tentacle(
        tentacle_id.clone(),
        &[server_id.thumbprint()],
        &url(addr),
        "ws-1",
        1,
        ProxySetting::Direct,
    );
    let ep = Endpoint::polling("poll://ws-1/", tentacle_id.thumbprint()).unwrap();
    let conn = timeout(T, server.connect(&ep)).await.unwrap().unwrap();
    let hello = conn.hello().unwrap();
    assert_eq!(hello.subscription_id, "ws-1");
    assert_eq!(hello.thumbprint, tentacle_id.thumbprint().to_string());
    timeout(T, exercise(&conn, "ws-round-trip")).await.unwrap();
    assert_eq!(server.polling().len(), 1);
}

#[tokio::test]
async fn twenty_concurrent_calls_over_one_web_socket() {
    kit::init_tracing();
    let (server_id, tentacle_id) = (kit::identity("server"), kit::identity("tentacle"));
    let (server, addr, _sg) = ws_server(
        server_id.clone(),
        &[tentacle_id.thumbprint()],
        ServerCommsOptions::default(),
        None,
    )
    .await;
    let (_t, _tg) = ws_tentacle(
        tentacle_id.clone(),
        &[server_id.thumbprint()],
        &url(addr),
        "ws-c",
        1,
        ProxySetting::Direct,
    );
    let ep = Endpoint::polling("ws-c", tentacle_id.thumbprint()).unwrap();
    let conn = timeout(T, server.connect(&ep)).await.unwrap().unwrap();
    // 20 live log streams at once; each waits at the barrier until all 20 are
    // open, which only works when the calls really run concurrently.
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(20));
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..20 {
        let (conn, barrier) = (conn.clone(), barrier.clone());
        calls.spawn(async move {
            let ticket = format!("wsc{i}");
            conn.scripts()
                .start_script(StartScriptRequest {
                    ticket: ticket.clone(),
                    script_body: "5".into(),
                    arguments: vec!["1".into()],
                    ..Default::default()
                })
                .await?;
            let mut s = conn
                .scripts()
                .stream_logs(ScriptStatusRequest {
                    ticket,
                    since_sequence: 0,
                })
                .await?
                .into_inner();
            assert!(s.message().await?.is_some());
            barrier.wait().await;
            let mut n = 1;
            while let Some(ev) = s.message().await? {
                if matches!(ev.event, Some(script_event::Event::Log(_))) {
                    n += 1;
                }
            }
            Ok::<_, tonic::Status>(n)
        });
    }
    let mut done = 0;
    while let Some(r) = timeout(T, calls.join_next()).await.unwrap() {
        assert_eq!(r.unwrap().unwrap(), 5);
        done += 1;
    }
    assert_eq!(done, 20);
    assert_eq!(server.polling().len(), 1, "all calls shared one WebSocket");
}

#[tokio::test(flavor = "current_thread")]
async fn untrusted_tentacle_is_refused_on_the_web_socket_port() {
    let logs = kit::LogCapture::default();
    let _g = logs.install();
    let (server_id, tentacle_id) = (kit::identity("server"), kit::identity("tentacle"));
    let options = ServerCommsOptions {
        polling_wait: Duration::from_millis(300),
        ..Default::default()
    };
    let (server, addr, _sg) = ws_server(server_id.clone(), &[], options, None).await;
    let (_t, _tg) = ws_tentacle(
        tentacle_id.clone(),
        &[server_id.thumbprint()],
        &url(addr),
        "ws-x",
        1,
        ProxySetting::Direct,
    );
    // The server names the address, the thumbprint and the fix...
    let line = logs
        .wait_for_line(
            &[
                "refused polling connection (WebSocket port) from 127.0.0.1:",
                &tentacle_id.thumbprint().to_string(),
                "trust it on the server",
            ],
            T,
        )
        .await;
    assert!(line.is_some(), "log was:\n{}", logs.text());
    // ...the tentacle says the server refused its certificate (typed, not "reset")...
    let line = logs
        .wait_for_line(
            &[
                &format!("the server at {} refused our certificate", url(addr)),
                &tentacle_id.thumbprint().to_string(),
                "tentacle register-with",
            ],
            T,
        )
        .await;
    assert!(line.is_some(), "log was:\n{}", logs.text());
    // ...and a request for it times out naming it.
    let ep = Endpoint::polling("ws-x", tentacle_id.thumbprint()).unwrap();
    let err = server.connect(&ep).await.unwrap_err();
    assert!(matches!(err, CommsError::PollingTimeout { .. }), "{err}");
}

#[tokio::test(flavor = "current_thread")]
async fn tentacle_refuses_an_untrusted_server_over_web_socket() {
    let logs = kit::LogCapture::default();
    let _g = logs.install();
    let (server_id, expected, tentacle_id) = (
        kit::identity("server"),
        kit::identity("expected"),
        kit::identity("tentacle"),
    );
    let (_server, addr, _sg) = ws_server(
        server_id.clone(),
        &[tentacle_id.thumbprint()],
        ServerCommsOptions::default(),
        None,
    )
    .await;
    let (_t, _tg) = ws_tentacle(
        tentacle_id,
        &[expected.thumbprint()],
        &url(addr),
        "ws-y",
        1,
        ProxySetting::Direct,
    );
    let want = format!(
        "the server presented thumbprint {} but {} was expected",
        server_id.thumbprint(),
        expected.thumbprint()
    );
    let line = logs.wait_for_line(&[&want], T).await;
    assert!(line.is_some(), "log was:\n{}", logs.text());
}

#[tokio::test(flavor = "current_thread")]
async fn a_wrong_path_is_refused_naming_the_right_one() {
    let logs = kit::LogCapture::default();
    let _g = logs.install();
    let (server_id, tentacle_id) = (kit::identity("server"), kit::identity("tentacle"));
    let (_server, addr, _sg) = ws_server(
        server_id.clone(),
        &[tentacle_id.thumbprint()],
        ServerCommsOptions::default(),
        None,
    )
    .await;
    let wrong = format!("wss://{addr}/OctopusComms");
    let (_t, _tg) = ws_tentacle(
        tentacle_id,
        &[server_id.thumbprint()],
        &wrong,
        "ws-p",
        1,
        ProxySetting::Direct,
    );
    let line = logs
        .wait_for_line(
            &[
                &format!("the WebSocket upgrade at {wrong} failed"),
                "404",
                "accepts polling tentacles at /tentacle",
                "--web-socket-path",
            ],
            T,
        )
        .await;
    assert!(line.is_some(), "log was:\n{}", logs.text());
}

/// Sends `request` over TLS (presenting `cert`, if any) and returns the whole
/// answer (until the server closes), or only its head when `head_only`.
async fn raw_request(addr: SocketAddr, cert: Option<&Identity>, request: &str) -> String {
    raw_exchange(addr, cert, request, false).await
}

async fn raw_exchange(
    addr: SocketAddr,
    cert: Option<&Identity>,
    request: &str,
    head_only: bool,
) -> String {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let cfg = kit::raw::client_config(cert.map(|c| c.certified_key().unwrap()), &[b"http/1.1"]);
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .unwrap();
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    if head_only {
        let mut buf = [0u8; 4096];
        while !out.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = timeout(T, tls.read(&mut buf)).await.unwrap().unwrap();
            assert!(n > 0, "closed before the end of the head");
            out.extend_from_slice(&buf[..n]);
        }
    } else {
        let _ = timeout(T, tls.read_to_end(&mut out)).await.unwrap();
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn upgrade_request(path: &str, protocol: Option<&str>) -> String {
    let protocol = protocol
        .map(|p| format!("Sec-WebSocket-Protocol: {p}\r\n"))
        .unwrap_or_default();
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade, close\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{protocol}\r\n"
    )
}

#[tokio::test]
async fn wrong_subprotocol_missing_certificate_and_plain_requests_get_clear_answers() {
    kit::init_tracing();
    let (server_id, tentacle_id) = (kit::identity("server"), kit::identity("tentacle"));
    let (_server, addr, _sg) = ws_server(
        server_id,
        &[tentacle_id.thumbprint()],
        ServerCommsOptions::default(),
        None,
    )
    .await;
    // A trusted client offering another subprotocol: 400 naming ours.
    let answer = raw_request(
        addr,
        Some(&tentacle_id),
        &upgrade_request("/tentacle", Some("chat.v2")),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        answer.contains(SUBPROTOCOL) && answer.contains("chat.v2"),
        "{answer}"
    );
    // The right subprotocol: 101 with ours echoed.
    let answer = raw_exchange(
        addr,
        Some(&tentacle_id),
        &upgrade_request("/tentacle", Some(SUBPROTOCOL)),
        true,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains(&format!("sec-websocket-protocol: {SUBPROTOCOL}")),
        "{answer}"
    );
    // A trusted client not asking for a WebSocket: 426 saying what is expected.
    let answer = raw_request(
        addr,
        Some(&tentacle_id),
        "GET /tentacle HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 426"), "{answer}");
    assert!(
        answer.contains("accepts only WebSocket upgrades"),
        "{answer}"
    );
    // An upgrade without a certificate: 401 saying a certificate is needed.
    let answer = raw_request(addr, None, &upgrade_request("/tentacle", Some(SUBPROTOCOL))).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(answer.contains("certificate"), "{answer}");
    // A browser (no certificate, no upgrade): the friendly page.
    let page = timeout(T, kit::raw::https_get(addr))
        .await
        .unwrap()
        .unwrap();
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(
        page.contains("Octopus Server") && page.contains("WebSocket"),
        "{page}"
    );
}

#[tokio::test]
async fn requests_without_a_certificate_under_the_http_prefix_reach_the_http_service() {
    kit::init_tracing();
    let (server_id, tentacle_id) = (kit::identity("server"), kit::identity("tentacle"));
    let trust = TrustStore::new([tentacle_id.thumbprint()], kit::hint("server"));
    let comms = ServerComms::new(server_id.clone(), trust, ServerCommsOptions::default());
    let api = tower::service_fn(|req: http::Request<hyper::body::Incoming>| async move {
        Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
            bytes::Bytes::from(format!("api saw {}", req.uri().path())),
        )))
    });
    let (addr, _g) = serve_ws(
        &comms,
        None,
        WebSocketListenerOptions::new("/tentacle").with_http("/api", api),
    )
    .await;
    let answer = raw_request(
        addr,
        None,
        "GET /api/server HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.contains("api saw /api/server"),
        "{answer}"
    );
    let page = timeout(T, kit::raw::https_get(addr))
        .await
        .unwrap()
        .unwrap();
    assert!(page.contains("Octopus Server"), "{page}");
    // Tentacles still poll on the same port.
    let (_t, _tg) = ws_tentacle(
        tentacle_id.clone(),
        &[server_id.thumbprint()],
        &url(addr),
        "ws-api",
        1,
        ProxySetting::Direct,
    );
    let ep = Endpoint::polling("ws-api", tentacle_id.thumbprint()).unwrap();
    let conn = timeout(T, comms.connect(&ep)).await.unwrap().unwrap();
    conn.capabilities()
        .ping(PingRequest::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn web_socket_tentacle_reconnects_after_server_restart_on_same_port() {
    kit::init_tracing();
    let (server_id, tentacle_id) = (kit::identity("server"), kit::identity("tentacle"));
    let (server, addr, guard) = ws_server(
        server_id.clone(),
        &[tentacle_id.thumbprint()],
        ServerCommsOptions::default(),
        None,
    )
    .await;
    let (_t, _tg) = ws_tentacle(
        tentacle_id.clone(),
        &[server_id.thumbprint()],
        &url(addr),
        "ws-s",
        1,
        ProxySetting::Direct,
    );
    let ep = Endpoint::polling("ws-s", tentacle_id.thumbprint()).unwrap();
    let conn = timeout(T, server.connect(&ep)).await.unwrap().unwrap();
    conn.capabilities()
        .ping(PingRequest::default())
        .await
        .unwrap();
    drop(guard); // stop the listener and close its connections
    timeout(T, conn.closed())
        .await
        .expect("old connection closed");
    drop(server);

    let (server2, addr2, _g2) = ws_server(
        server_id,
        &[tentacle_id.thumbprint()],
        ServerCommsOptions::default(),
        Some(addr),
    )
    .await;
    assert_eq!(addr, addr2);
    let conn2 = timeout(T, server2.connect(&ep)).await.unwrap().unwrap();
    conn2
        .capabilities()
        .ping(PingRequest::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn web_socket_through_tinyproxy_with_tls_end_to_end() {
    use octo_testkit::tinyproxy::{Tinyproxy, TinyproxyOptions};
    kit::init_tracing();
    let proxy = Tinyproxy::start(&TinyproxyOptions::default());
    let (server_id, tentacle_id) = (kit::identity("server"), kit::identity("tentacle"));
    let (server, addr, _sg) = ws_server(
        server_id.clone(),
        &[tentacle_id.thumbprint()],
        ServerCommsOptions::default(),
        None,
    )
    .await;
    let (_t, _tg) = ws_tentacle(
        tentacle_id.clone(),
        &[server_id.thumbprint()],
        &url(addr),
        "ws-proxy",
        1,
        ProxySetting::Explicit(proxy.config()),
    );
    let ep = Endpoint::polling("ws-proxy", tentacle_id.thumbprint()).unwrap();
    let conn = timeout(T, server.connect(&ep)).await.unwrap().unwrap();
    timeout(T, exercise(&conn, "ws-proxy")).await.unwrap();
    // The proxy saw only CONNECT to the WebSocket port: no GET, no upgrade.
    let requests = proxy.requests();
    assert!(
        !requests.is_empty()
            && requests
                .iter()
                .all(|r| r == &format!("CONNECT {addr} HTTP/1.1")),
        "{}",
        proxy.log()
    );
}
