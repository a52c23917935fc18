//! Comms over real sockets on 127.0.0.1: both modes, trust, refusals, queueing,
//! reconnects, concurrency, and the friendly page. Every wait is bounded.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use octo_comms::{is_retryable, CommsError, Connection, Endpoint, ServerCommsOptions};
use octo_proto::v1::*;
use octo_testkit as kit;
use octo_tls::Thumbprint;
use sha2::{Digest, Sha256};
use tokio::time::timeout;

const T: Duration = Duration::from_secs(20);

fn endpoint_listening(addr: std::net::SocketAddr, tp: Thumbprint) -> Endpoint {
    Endpoint::listening(&format!("https://{addr}/"), tp).unwrap()
}

/// Unary, server-streaming, client-streaming and download over one connection.
async fn exercise(conn: &Connection) {
    let reply = conn
        .capabilities()
        .ping(PingRequest {
            payload: b"hi".to_vec(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.payload, b"hi");
    let caps = conn
        .capabilities()
        .get_capabilities(GetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(caps.os, std::env::consts::OS);

    // Script start + live stream of its lines, in order, then the final status.
    let ticket = format!("t-{}", rand_suffix());
    conn.scripts()
        .start_script(StartScriptRequest {
            ticket: ticket.clone(),
            script_body: "20".into(),
            arguments: vec!["2".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let mut stream = conn
        .scripts()
        .stream_logs(ScriptStatusRequest {
            ticket: ticket.clone(),
            since_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut seqs = Vec::new();
    let mut completed = None;
    while let Some(ev) = stream.message().await.unwrap() {
        match ev.event.unwrap() {
            script_event::Event::Log(l) => {
                assert_eq!(l.text, format!("line {}", l.sequence));
                seqs.push(l.sequence);
            }
            script_event::Event::Completed(s) => completed = Some(s),
        }
    }
    assert_eq!(seqs, (0..20).collect::<Vec<_>>());
    let completed = completed.expect("final status");
    assert_eq!(completed.state, ScriptState::Complete as i32);
    assert_eq!(completed.next_sequence, 20);
    // Lines since 15 (what a caller that lost its connection asks for).
    let status = conn
        .scripts()
        .get_status(ScriptStatusRequest {
            ticket: ticket.clone(),
            since_sequence: 15,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.logs.iter().map(|l| l.sequence).collect::<Vec<_>>(),
        vec![15, 16, 17, 18, 19]
    );
    // Start is idempotent on the ticket.
    let again = conn
        .scripts()
        .start_script(StartScriptRequest {
            ticket: ticket.clone(),
            script_body: "20".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.next_sequence, 20);

    // Upload 3 MiB in chunks with a final SHA-256; a wrong hash is refused.
    let data: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 253) as u8).collect();
    let sha = hex(&Sha256::digest(&data));
    let reply = conn
        .files()
        .upload_file(upload_stream(&data, sha.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.length, data.len() as u64);
    assert_eq!(reply.sha256, sha);
    let bad = conn
        .files()
        .upload_file(upload_stream(&data, "00".repeat(32)))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::DataLoss, "{bad}");

    // Download with an offset; the final hash covers the whole file.
    let mut dl = conn
        .files()
        .download_file(DownloadRequest {
            path: "200000".into(),
            offset: 1000,
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    let mut finish = None;
    while let Some(m) = dl.message().await.unwrap() {
        match m.part.unwrap() {
            download_reply::Part::Start(s) => assert_eq!(s.total_length, 200_000),
            download_reply::Part::Chunk(c) => {
                assert_eq!(c.offset, 1000 + got.len() as u64);
                got.extend_from_slice(&c.data);
            }
            download_reply::Part::Finish(f) => finish = Some(f),
        }
    }
    assert_eq!(got, kit::services::fixture_bytes(1000, 199_000));
    assert_eq!(
        finish.unwrap().sha256,
        hex(&Sha256::digest(kit::services::fixture_bytes(0, 200_000)))
    );
}

fn upload_stream(data: &[u8], sha: String) -> impl tokio_stream::Stream<Item = UploadRequest> {
    let total = data.len() as u64;
    let mut msgs = vec![UploadRequest {
        part: Some(upload_request::Part::Start(UploadStart {
            path: "f.bin".into(),
            total_length: total,
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
            sha256: sha,
            total_length: total,
        })),
    });
    tokio_stream::iter(msgs)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02X}")).collect()
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

#[tokio::test]
async fn listening_round_trip() {
    kit::init_tracing();
    let (server_id, tentacle_id) = (kit::identity("server"), kit::identity("tentacle"));
    let (addr, _t, _g) =
        kit::listening_tentacle(tentacle_id.clone(), &[server_id.thumbprint()]).await;
    let (server, _, _sg) = kit::server(server_id, &[]).await;
    let ep = endpoint_listening(addr, tentacle_id.thumbprint());
    let conn = timeout(T, server.connect(&ep)).await.unwrap().unwrap();
    assert_eq!(conn.peer_thumbprint(), tentacle_id.thumbprint());
    assert_eq!(conn.hello().unwrap().subscription_id, "");
    timeout(T, exercise(&conn)).await.unwrap();
    // The connection is reused for the next request.
    let again = server.connect(&ep).await.unwrap();
    assert_eq!(
        format!("{:?}", again.remote_addr()),
        format!("{:?}", conn.remote_addr())
    );
}

#[tokio::test]
async fn polling_round_trip() {
    kit::init_tracing();
    let (server_id, tentacle_id) = (kit::identity("server"), kit::identity("tentacle"));
    let (server, addr, _sg) = kit::server(server_id.clone(), &[tentacle_id.thumbprint()]).await;
    let (_t, _tg) = kit::polling_tentacle(
        tentacle_id.clone(),
        &[server_id.thumbprint()],
        addr,
        "sub-1",
        1,
    );
    let ep = Endpoint::polling("poll://sub-1/", tentacle_id.thumbprint()).unwrap();
    let conn = timeout(T, server.connect(&ep)).await.unwrap().unwrap();
    assert_eq!(conn.hello().unwrap().subscription_id, "sub-1");
    assert_eq!(
        conn.hello().unwrap().thumbprint,
        tentacle_id.thumbprint().to_string()
    );
    timeout(T, exercise(&conn)).await.unwrap();
    assert_eq!(server.polling().len(), 1);
}

#[tokio::test(flavor = "current_thread")]
async fn untrusted_server_is_refused_by_listening_tentacle() {
    let logs = kit::LogCapture::default();
    let _g = logs.install();
    let (server_id, other, tentacle_id) = (
        kit::identity("server"),
        kit::identity("other"),
        kit::identity("tentacle"),
    );
    let (addr, _t, _g) = kit::listening_tentacle(tentacle_id.clone(), &[other.thumbprint()]).await;
    let (server, _, _sg) = kit::server(server_id.clone(), &[]).await;
    let err = timeout(
        T,
        server.connect(&endpoint_listening(addr, tentacle_id.thumbprint())),
    )
    .await
    .unwrap()
    .unwrap_err();
    match &err {
        CommsError::RejectedByPeer { ours, .. } => assert_eq!(*ours, server_id.thumbprint()),
        e => panic!("expected RejectedByPeer, got {e}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains(&format!(
            "tentacle configure --trust {}",
            server_id.thumbprint()
        )),
        "{msg}"
    );
    // The tentacle logged one line naming the address, the thumbprint and the fix.
    let line = logs
        .wait_for_line(
            &[
                "refused connection from 127.0.0.1:",
                &server_id.thumbprint().to_string(),
                "trust it on the tentacle",
            ],
            T,
        )
        .await;
    assert!(line.is_some(), "log was:\n{}", logs.text());
}

#[tokio::test]
async fn untrusted_tentacle_is_refused_by_dialling_server() {
    kit::init_tracing();
    let (server_id, tentacle_id, expected) = (
        kit::identity("server"),
        kit::identity("tentacle"),
        kit::identity("expected"),
    );
    let (addr, _t, _g) =
        kit::listening_tentacle(tentacle_id.clone(), &[server_id.thumbprint()]).await;
    let (server, _, _sg) = kit::server(server_id, &[]).await;
    let err = timeout(
        T,
        server.connect(&endpoint_listening(addr, expected.thumbprint())),
    )
    .await
    .unwrap()
    .unwrap_err();
    let CommsError::Untrusted { source, .. } = &err else {
        panic!("expected Untrusted, got {err}")
    };
    assert_eq!(source.presented, tentacle_id.thumbprint());
    assert_eq!(source.expected, vec![expected.thumbprint()]);
    let msg = err.to_string();
    assert!(
        msg.contains(&format!(
            "the tentacle presented thumbprint {} but {} was expected",
            tentacle_id.thumbprint(),
            expected.thumbprint()
        )),
        "{msg}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn untrusted_polling_tentacle_is_refused_and_requests_time_out_naming_it() {
    let logs = kit::LogCapture::default();
    let _g = logs.install();
    let (server_id, tentacle_id) = (kit::identity("server"), kit::identity("tentacle"));
    let options = ServerCommsOptions {
        polling_wait: Duration::from_millis(300),
        ..Default::default()
    };
    let (server, addr, _sg) = kit::server_with(server_id.clone(), &[], options, None).await;
    let (_t, _tg) = kit::polling_tentacle(
        tentacle_id.clone(),
        &[server_id.thumbprint()],
        addr,
        "sub-x",
        1,
    );
    // The server logs the refusal with the address, thumbprint and fix...
    let line = logs
        .wait_for_line(
            &[
                "refused polling connection from 127.0.0.1:",
                &tentacle_id.thumbprint().to_string(),
                "trust it on the server",
            ],
            T,
        )
        .await;
    assert!(line.is_some(), "log was:\n{}", logs.text());
    // ...the tentacle says the server refused its certificate...
    let line = logs
        .wait_for_line(
            &[
                "refused our certificate",
                &tentacle_id.thumbprint().to_string(),
            ],
            T,
        )
        .await;
    assert!(line.is_some(), "log was:\n{}", logs.text());
    // ...and a request for it fails after the polling wait, naming it.
    let ep = Endpoint::polling("poll://sub-x/", tentacle_id.thumbprint()).unwrap();
    let err = server.connect(&ep).await.unwrap_err();
    assert!(matches!(err, CommsError::PollingTimeout { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("poll://sub-x/") && msg.contains("0 s") || msg.contains("within"),
        "{msg}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn polling_tentacle_refuses_untrusted_server() {
    let logs = kit::LogCapture::default();
    let _g = logs.install();
    let (server_id, expected, tentacle_id) = (
        kit::identity("server"),
        kit::identity("expected"),
        kit::identity("tentacle"),
    );
    let (_server, addr, _sg) = kit::server(server_id.clone(), &[tentacle_id.thumbprint()]).await;
    let (_t, _tg) = kit::polling_tentacle(tentacle_id, &[expected.thumbprint()], addr, "sub-y", 1);
    let want = format!(
        "the server presented thumbprint {} but {} was expected",
        server_id.thumbprint(),
        expected.thumbprint()
    );
    let line = logs.wait_for_line(&[&want], T).await;
    assert!(line.is_some(), "log was:\n{}", logs.text());
}

#[tokio::test]
async fn copied_certificate_with_wrong_key_is_refused() {
    kit::init_tracing();
    let (server_id, tentacle_id, attacker) = (
        kit::identity("server"),
        kit::identity("tentacle"),
        kit::identity("attacker"),
    );
    // A client presenting the trusted server's certificate with its own key.
    let (addr, _t, _g) =
        kit::listening_tentacle(tentacle_id.clone(), &[server_id.thumbprint()]).await;
    let forged = kit::raw::forged_key(&server_id, &attacker);
    let cfg = kit::raw::client_config(Some(forged.clone()), &[b"h2"]);
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let result = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await;
    // TLS 1.3: the client may finish before the server checks; the refusal then
    // arrives on the first read.
    if let Ok(mut tls) = result {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let _ = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
        let mut buf = [0u8; 64];
        let r = timeout(T, tls.read(&mut buf)).await.unwrap();
        assert!(r.is_err(), "forged client was served: {r:?}");
    }

    // A server presenting the tentacle's certificate with its own key, TLS 1.3 and 1.2.
    let (server, _, _sg) = kit::server(server_id, &[]).await;
    for versions in [
        &[&rustls::version::TLS13][..],
        &[&rustls::version::TLS12][..],
    ] {
        let fake = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fake_addr = fake.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(kit::raw::server_config(
            kit::raw::forged_key(&tentacle_id, &attacker),
            versions,
        ));
        tokio::spawn(async move {
            while let Ok((tcp, _)) = fake.accept().await {
                let _ = acceptor.accept(tcp).await;
            }
        });
        let err = timeout(
            T,
            server.connect(&endpoint_listening(fake_addr, tentacle_id.thumbprint())),
        )
        .await
        .unwrap()
        .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, CommsError::Tls { .. }), "{msg}");
        assert!(
            msg.to_lowercase().contains("signature") || msg.contains("decrypt"),
            "{msg}"
        );
    }
}

#[tokio::test]
async fn removing_trust_drops_live_connections() {
    kit::init_tracing();
    let (server_id, tentacle_id) = (kit::identity("server"), kit::identity("tentacle"));
    // Listening: the tentacle stops trusting the server.
    let (addr, tentacle, _g) =
        kit::listening_tentacle(tentacle_id.clone(), &[server_id.thumbprint()]).await;
    let (server, paddr, _sg) = kit::server(server_id.clone(), &[tentacle_id.thumbprint()]).await;
    let conn = server
        .connect(&endpoint_listening(addr, tentacle_id.thumbprint()))
        .await
        .unwrap();
    tentacle.trust().remove(&server_id.thumbprint());
    timeout(T, conn.closed())
        .await
        .expect("listening connection dropped");
    let err = conn
        .capabilities()
        .ping(PingRequest::default())
        .await
        .unwrap_err();
    assert!(is_retryable(&err), "{err}");

    // Polling: the server stops trusting the tentacle.
    let (_t, _tg) = kit::polling_tentacle(
        tentacle_id.clone(),
        &[server_id.thumbprint()],
        paddr,
        "sub-r",
        1,
    );
    let ep = Endpoint::polling("sub-r", tentacle_id.thumbprint()).unwrap();
    let conn = timeout(T, server.connect(&ep)).await.unwrap().unwrap();
    server.polling_trust().remove(&tentacle_id.thumbprint());
    timeout(T, conn.closed())
        .await
        .expect("polling connection dropped");
}

#[tokio::test]
async fn call_in_flight_fails_at_once_and_retryable_when_connection_drops() {
    kit::init_tracing();
    let (server_id, tentacle_id) = (kit::identity("server"), kit::identity("tentacle"));
    let (server, addr, _sg) = kit::server(server_id.clone(), &[tentacle_id.thumbprint()]).await;
    let (_t, _tg) = kit::polling_tentacle(
        tentacle_id.clone(),
        &[server_id.thumbprint()],
        addr,
        "sub-d",
        1,
    );
    let ep = Endpoint::polling("sub-d", tentacle_id.thumbprint()).unwrap();
    let conn = timeout(T, server.connect(&ep)).await.unwrap().unwrap();
    // A script that would log for a minute.
    conn.scripts()
        .start_script(StartScriptRequest {
            ticket: "long".into(),
            script_body: "600".into(),
            arguments: vec!["100".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let mut stream = conn
        .scripts()
        .stream_logs(ScriptStatusRequest {
            ticket: "long".into(),
            since_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(matches!(first.event, Some(script_event::Event::Log(_))));
    conn.close();
    let err = timeout(T, async {
        loop {
            if let Err(e) = stream.message().await {
                return e;
            }
        }
    })
    .await
    .expect("in-flight call fails promptly");
    assert!(is_retryable(&err), "{err:?}");
}

#[tokio::test]
async fn request_queued_before_polling_tentacle_connects_is_delivered() {
    kit::init_tracing();
    let (server_id, tentacle_id) = (kit::identity("server"), kit::identity("tentacle"));
    let (server, addr, _sg) = kit::server(server_id.clone(), &[tentacle_id.thumbprint()]).await;
    let ep = Endpoint::polling("poll://sub-q/", tentacle_id.thumbprint()).unwrap();
    let queued = tokio::spawn({
        let server = server.clone();
        async move {
            let conn = server.connect(&ep).await?;
            let reply = conn
                .capabilities()
                .ping(PingRequest {
                    payload: b"queued".to_vec(),
                })
                .await;
            Ok::<_, CommsError>(reply.map(|r| r.into_inner().payload))
        }
    });
    tokio::task::yield_now().await;
    assert!(!queued.is_finished());
    assert!(server.polling().is_empty());
    let (_t, _tg) = kit::polling_tentacle(tentacle_id, &[server_id.thumbprint()], addr, "sub-q", 1);
    let payload = timeout(T, queued).await.unwrap().unwrap().unwrap().unwrap();
    assert_eq!(payload, b"queued");
}

#[tokio::test]
async fn request_for_absent_polling_tentacle_times_out_with_named_error() {
    kit::init_tracing();
    let options = ServerCommsOptions {
        polling_wait: Duration::from_millis(200),
        ..Default::default()
    };
    let tentacle = kit::identity("tentacle");
    let (server, _, _sg) = kit::server_with(
        kit::identity("server"),
        &[tentacle.thumbprint()],
        options,
        None,
    )
    .await;
    let ep = Endpoint::polling("poll://absent/", tentacle.thumbprint()).unwrap();
    let err = timeout(T, server.connect(&ep)).await.unwrap().unwrap_err();
    let CommsError::PollingTimeout {
        subscription_id,
        waited,
        ..
    } = &err
    else {
        panic!("{err}")
    };
    assert_eq!(subscription_id, "absent");
    assert_eq!(*waited, Duration::from_millis(200));
    assert!(err.is_retryable());
    let msg = err.to_string();
    assert!(
        msg.contains("poll://absent/") && msg.contains(&tentacle.thumbprint().to_string()),
        "{msg}"
    );
}

#[tokio::test]
async fn polling_tentacle_reconnects_after_server_restart_on_same_port() {
    kit::init_tracing();
    let (server_id, tentacle_id) = (kit::identity("server"), kit::identity("tentacle"));
    let (server, addr, guard) = kit::server(server_id.clone(), &[tentacle_id.thumbprint()]).await;
    let (_t, _tg) = kit::polling_tentacle(
        tentacle_id.clone(),
        &[server_id.thumbprint()],
        addr,
        "sub-s",
        1,
    );
    let ep = Endpoint::polling("sub-s", tentacle_id.thumbprint()).unwrap();
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

    // A new server process-equivalent on the same port with the same identity.
    let (server2, addr2, _g2) = kit::server_with(
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
async fn fifty_concurrent_calls_over_one_polling_connection() {
    kit::init_tracing();
    let (server_id, tentacle_id) = (kit::identity("server"), kit::identity("tentacle"));
    let (server, addr, _sg) = kit::server(server_id.clone(), &[tentacle_id.thumbprint()]).await;
    let (_t, _tg) = kit::polling_tentacle(
        tentacle_id.clone(),
        &[server_id.thumbprint()],
        addr,
        "sub-c",
        1,
    );
    let ep = Endpoint::polling("sub-c", tentacle_id.thumbprint()).unwrap();
    let conn = timeout(T, server.connect(&ep)).await.unwrap().unwrap();
    // 50 scripts streaming at once; each holds its call open until all 50 have started,
    // which only works when the calls run concurrently.
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(50));
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..50 {
        let conn = conn.clone();
        let barrier = barrier.clone();
        calls.spawn(async move {
            let ticket = format!("c{i}");
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
            let first = s.message().await?;
            assert!(first.is_some());
            barrier.wait().await; // every stream is open at this point
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
    assert_eq!(done, 50);
    assert_eq!(server.polling().len(), 1, "all calls shared one connection");
}

#[tokio::test]
async fn several_polling_connections_and_several_servers() {
    kit::init_tracing();
    let (s1, s2, tentacle_id) = (
        kit::identity("s1"),
        kit::identity("s2"),
        kit::identity("tentacle"),
    );
    let (server1, addr1, _g1) = kit::server(s1.clone(), &[tentacle_id.thumbprint()]).await;
    let (server2, addr2, _g2) = kit::server(s2.clone(), &[tentacle_id.thumbprint()]).await;
    let trusted = [s1.thumbprint(), s2.thumbprint()];
    let (_t1, _tg1) = kit::polling_tentacle(tentacle_id.clone(), &trusted, addr1, "sub-m", 3);
    let (_t2, _tg2) = kit::polling_tentacle(tentacle_id.clone(), &trusted, addr2, "sub-m2", 1);
    for (server, sub) in [(&server1, "sub-m"), (&server2, "sub-m2")] {
        let ep = Endpoint::polling(sub, tentacle_id.thumbprint()).unwrap();
        let conn = timeout(T, server.connect(&ep)).await.unwrap().unwrap();
        conn.capabilities()
            .ping(PingRequest::default())
            .await
            .unwrap();
    }
    // All three connections to server 1 arrive.
    assert!(
        server1.polling().wait_until(|r| r.len() >= 3, T).await,
        "three connections"
    );
}

#[tokio::test]
async fn friendly_page_on_both_listener_kinds() {
    kit::init_tracing();
    let (server_id, tentacle_id) = (kit::identity("server"), kit::identity("tentacle"));
    let (taddr, _t, _g) = kit::listening_tentacle(tentacle_id, &[server_id.thumbprint()]).await;
    let (_server, saddr, _sg) = kit::server(server_id, &[]).await;
    let page = timeout(T, kit::raw::https_get(taddr))
        .await
        .unwrap()
        .unwrap();
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(
        page.contains("Octopus Tentacle") && page.contains("text/html"),
        "{page}"
    );
    let page = timeout(T, kit::raw::https_get(saddr))
        .await
        .unwrap()
        .unwrap();
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(
        page.contains("Octopus Server") && page.contains("polling"),
        "{page}"
    );
}

#[tokio::test]
async fn listening_tentacle_serves_grpc_reflection() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    kit::init_tracing();
    let (server_id, tentacle_id) = (kit::identity("server"), kit::identity("tentacle"));
    let (addr, _t, _g) =
        kit::listening_tentacle(tentacle_id.clone(), &[server_id.thumbprint()]).await;
    let (server, _, _sg) = kit::server(server_id, &[]).await;
    let conn = timeout(
        T,
        server.connect(&endpoint_listening(addr, tentacle_id.thumbprint())),
    )
    .await
    .unwrap()
    .unwrap();
    let mut client =
        ServerReflectionClient::with_origin(conn.channel(), "https://tentacle".parse().unwrap());
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = client
        .server_reflection_info(tokio_stream::once(req))
        .await
        .unwrap()
        .into_inner();
    let reply = timeout(T, replies.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("{reply:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        octo_proto::service_names::SESSION,
        octo_proto::service_names::CAPABILITIES,
        octo_proto::service_names::SCRIPT,
        octo_proto::service_names::FILE,
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
}

/// Regression: the refusal must reach the dialler as a typed error every time,
/// not as "connection reset" (a race between our first write and the peer's
/// close used to lose the TLS alert about a third of the time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusal_is_typed_every_time() {
    kit::init_tracing();
    let (server_id, other, tentacle_id) = (
        kit::identity("server"),
        kit::identity("other"),
        kit::identity("tentacle"),
    );
    let (addr, _t, _g) = kit::listening_tentacle(tentacle_id.clone(), &[other.thumbprint()]).await;
    let (server, _, _sg) = kit::server(server_id, &[]).await;
    let ep = endpoint_listening(addr, tentacle_id.thumbprint());
    for i in 0..40 {
        let err = timeout(T, server.connect(&ep)).await.unwrap().unwrap_err();
        assert!(
            matches!(err, CommsError::RejectedByPeer { .. }),
            "dial {i}: {err}"
        );
    }
}

#[tokio::test]
async fn a_refused_certificate_is_named_when_its_tentacle_does_not_connect() {
    kit::init_tracing();
    let options = ServerCommsOptions {
        polling_wait: Duration::from_millis(300),
        ..Default::default()
    };
    let server_id = kit::identity("server");
    let (old, new) = (kit::identity("tentacle"), kit::identity("tentacle-new"));
    let (server, addr, _sg) =
        kit::server_with(server_id.clone(), &[old.thumbprint()], options, None).await;
    // The tentacle made a new certificate: the server refuses it.
    let (_t, _tg) = kit::polling_tentacle(new.clone(), &[server_id.thumbprint()], addr, "sub-r", 1);
    assert!(
        server
            .polling()
            .wait_until(|r| r.refused_thumbprints().contains(&new.thumbprint()), T)
            .await,
        "the refusal is recorded"
    );
    let ep = Endpoint::polling("poll://sub-r/", old.thumbprint()).unwrap();
    let err = timeout(T, server.connect(&ep)).await.unwrap().unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("refused a polling tentacle's certificate"),
        "{msg}"
    );
    assert!(msg.contains(&new.thumbprint().to_string()), "{msg}");
    assert!(
        msg.contains(&format!("not the expected {}", old.thumbprint())),
        "{msg}"
    );
    assert!(msg.contains("127.0.0.1"), "{msg}");
}

/// A burst of connections the server has not accepted yet waits in the
/// kernel's accept queue rather than having its SYNs dropped: with the
/// standard library's backlog of 128, all but 129 of these would wait out
/// TCP's retransmissions and never get in (nothing accepts them here).
#[tokio::test]
async fn a_listener_holds_a_burst_of_connections_it_has_not_accepted_yet() {
    let queue = octo_comms::net::accept_queue_limit().unwrap_or(128) as usize;
    let burst = 400;
    assert!(
        queue >= burst,
        "this test needs net.core.somaxconn of at least {burst} (it is {queue}; Linux's default since 5.4 is 4096)"
    );
    let listener = octo_comms::net::listen("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut connects = tokio::task::JoinSet::new();
    for _ in 0..burst {
        connects.spawn(timeout(
            Duration::from_secs(10),
            tokio::net::TcpStream::connect(addr),
        ));
    }
    let (mut connected, mut streams) = (0, Vec::new());
    while let Some(r) = connects.join_next().await {
        if let Ok(Ok(s)) = r.unwrap() {
            connected += 1;
            streams.push(s);
        }
    }
    assert_eq!(connected, burst, "connections in the accept queue");
    // And they are all there to accept, in the order they came.
    for _ in 0..burst {
        timeout(Duration::from_secs(5), listener.accept())
            .await
            .expect("a queued connection to accept")
            .unwrap();
    }
}

#[tokio::test]
async fn a_listener_names_an_address_it_cannot_use() {
    let taken = octo_comms::net::listen("127.0.0.1:0").await.unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let e = octo_comms::net::listen(&addr).await.unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}");
    // No port: refused before any lookup.
    let e = octo_comms::net::listen("127.0.0.1").await.unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
}

/// A server restarting resets the connections still waiting in its accept
/// queue, mid-handshake: the tentacle says so as a warning (not an error
/// someone has to fix) and tries again.
#[tokio::test(flavor = "current_thread")]
async fn a_handshake_cut_by_a_reset_is_a_warning_and_the_tentacle_tries_again() {
    use tokio::io::AsyncReadExt;
    let logs = kit::LogCapture::default();
    let _log = logs.install();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (accepted, mut accepts) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            // Its ClientHello read, the connection is reset (RST, not FIN).
            let mut hello = [0u8; 1];
            let _ = tcp.read(&mut hello).await;
            socket2::SockRef::from(&tcp)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
            drop(tcp);
            let _ = accepted.send(());
        }
    });
    let server = kit::identity("server");
    let (_t, _g) = kit::polling_tentacle(
        kit::identity("tentacle"),
        &[server.thumbprint()],
        addr,
        "sub-reset",
        1,
    );
    for _ in 0..2 {
        timeout(T, accepts.recv())
            .await
            .expect("the tentacle dialled again")
            .unwrap();
    }
    let log = logs.text();
    assert!(
        log.lines()
            .any(|l| l.contains(" WARN ") && l.contains("cut during the handshake")),
        "{log}"
    );
    assert!(!log.contains(" ERROR "), "{log}");
}

/// A rotation that never stages anything; says when a server starts watching.
struct Watched(
    tokio::sync::watch::Sender<Option<Thumbprint>>,
    std::sync::Arc<tokio::sync::Notify>,
);

#[tonic::async_trait]
impl octo_comms::rotation::TentacleRotation for Watched {
    fn staged(&self) -> tokio::sync::watch::Receiver<Option<Thumbprint>> {
        self.1.notify_one();
        self.0.subscribe()
    }
    async fn accepted(
        &self,
        _next: Thumbprint,
        _server: Vec<Thumbprint>,
    ) -> Result<Vec<Thumbprint>, String> {
        Err("not in this test".into())
    }
    async fn trust_server(&self, _current: Thumbprint, _next: Thumbprint) -> Result<bool, String> {
        Err("not in this test".into())
    }
}

#[tokio::test]
async fn a_connection_closed_for_a_new_certificate_is_not_held_open_by_the_rotation_watch() {
    kit::init_tracing();
    let (server_id, old_id, new_id) = (
        kit::identity("server"),
        kit::identity("tentacle"),
        kit::identity("tentacle-next"),
    );
    let (server, addr, _sg) = kit::server(
        server_id.clone(),
        &[old_id.thumbprint(), new_id.thumbprint()],
    )
    .await;
    // As a real server does: a WatchRotation stream on every connection.
    let mut events = server.events();
    let watching = std::sync::Arc::new(tokio::sync::Notify::new());
    let (staged, _) = tokio::sync::watch::channel(None);
    let tentacle = octo_comms::TentacleComms::new(
        old_id.clone(),
        octo_tls::TrustStore::new(
            [server_id.thumbprint()],
            std::sync::Arc::new(|t: &Thumbprint| format!("trust {t}")),
        ),
        kit::services::routes(),
        "Test",
    )
    .with_rotation(std::sync::Arc::new(Watched(staged, watching.clone())));
    let stop = tokio_util::sync::CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let target = octo_comms::PollingTarget {
        address: addr.to_string(),
        subscription_id: "rot".into(),
    };
    let backoff = octo_comms::Backoff::new(Duration::from_millis(50), Duration::from_millis(500));
    tokio::spawn({
        let t = tentacle.clone();
        async move { t.run_polling(target, 1, backoff, stop).await }
    });
    let ep = Endpoint::polling("poll://rot/", old_id.thumbprint()).unwrap();
    let old = timeout(T, server.connect(&ep)).await.unwrap().unwrap();
    assert!(matches!(
        timeout(T, events.recv()).await.unwrap().unwrap(),
        octo_comms::CommsEvent::Connected { .. }
    ));
    timeout(T, watching.notified()).await.unwrap();

    // The switch: GOAWAY on the old connection, which has no call doing
    // work. It closes now, not when ROTATION_DRAIN (300 s) runs out.
    assert!(tentacle.switch_identity(new_id.clone()));
    timeout(T, old.closed())
        .await
        .expect("the old connection was held open by the rotation watch");
    let ep = Endpoint::polling("poll://rot/", new_id.thumbprint()).unwrap();
    let new = timeout(T, server.connect(&ep)).await.unwrap().unwrap();
    assert_eq!(new.peer_thumbprint(), new_id.thumbprint());
}
