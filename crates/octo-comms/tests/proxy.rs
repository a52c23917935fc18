//! Both dials through a real HTTP CONNECT proxy (tinyproxy, started by each test
//! on 127.0.0.1): polling tentacle → proxy → server, and server → proxy →
//! listening tentacle; with and without Basic authentication; and the errors a
//! person sees when the proxy refuses (407/401, 403, 500), is down, or is not a
//! proxy. TLS runs end to end: the proxy sees only CONNECT, and the bytes inside
//! its tunnel are TLS records. Every wait is bounded.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use octo_comms::proxy::{self, ProxyConfig, ProxyError, ProxySetting};
use octo_comms::{CommsError, Connection, Endpoint, ServerCommsOptions};
use octo_proto::v1::*;
use octo_testkit as kit;
use octo_testkit::tinyproxy::{Tap, Tinyproxy, TinyproxyOptions};
use tokio::time::timeout;

const T: Duration = Duration::from_secs(20);

fn with_auth() -> TinyproxyOptions {
    TinyproxyOptions {
        basic_auth: Some(("octo".into(), "s3cret-pw".into())),
        ..Default::default()
    }
}

/// Unary, server-streaming and a 1 MiB upload over the connection.
async fn round_trip(conn: &Connection) {
    let reply = conn
        .capabilities()
        .ping(PingRequest {
            payload: b"through the proxy".to_vec(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.payload, b"through the proxy");
    let ticket = format!("proxy-{}", conn.remote_addr().port());
    conn.scripts()
        .start_script(StartScriptRequest {
            ticket: ticket.clone(),
            script_body: "5".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut stream = conn
        .scripts()
        .stream_logs(ScriptStatusRequest {
            ticket,
            since_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut lines = 0;
    let mut completed = false;
    while let Some(ev) = stream.message().await.unwrap() {
        match ev.event.unwrap() {
            script_event::Event::Log(_) => lines += 1,
            script_event::Event::Completed(_) => completed = true,
        }
    }
    assert_eq!((lines, completed), (5, true));
    let data = vec![7u8; 1 << 20];
    let sha = kit_sha(&data);
    let msgs = vec![
        UploadRequest {
            part: Some(upload_request::Part::Start(UploadStart {
                path: "p.bin".into(),
                total_length: data.len() as u64,
                ..Default::default()
            })),
        },
        UploadRequest {
            part: Some(upload_request::Part::Chunk(FileChunk {
                offset: 0,
                data: bytes::Bytes::from(data.clone()),
            })),
        },
        UploadRequest {
            part: Some(upload_request::Part::Finish(UploadFinish {
                sha256: sha.clone(),
                total_length: data.len() as u64,
            })),
        },
    ];
    let reply = conn
        .files()
        .upload_file(tokio_stream::iter(msgs))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.sha256, sha);
}

fn kit_sha(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect()
}

/// A port on 127.0.0.1 where nothing listens, held (bound, never listening)
/// so that no other test can take it while the socket lives.
fn closed_port() -> (socket2::Socket, SocketAddr) {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let addr = s.local_addr().unwrap().as_socket().unwrap();
    (s, addr)
}

fn explicit(p: ProxyConfig) -> ProxySetting {
    ProxySetting::Explicit(p)
}

/// Every request tinyproxy saw is `CONNECT <target> HTTP/1.1`, and there was one.
fn only_connects(proxy: &Tinyproxy, target: &str) {
    let requests = proxy.requests();
    assert!(!requests.is_empty(), "no request logged:\n{}", proxy.log());
    for r in &requests {
        assert_eq!(
            r,
            &format!("CONNECT {target} HTTP/1.1"),
            "log:\n{}",
            proxy.log()
        );
    }
}

/// Each connection through the tunnel started with a TLS handshake record
/// (content type 0x16, version 3.x): the proxy relayed TLS it cannot read.
fn tls_inside(tap: &Tap) {
    let seen = tap.first_bytes();
    assert!(!seen.is_empty(), "nothing went through the tunnel");
    for first in &seen {
        assert!(
            first.len() >= 3 && first[0] == 0x16 && first[1] == 0x03,
            "not a TLS record: {first:02X?}"
        );
    }
}

#[tokio::test]
async fn polling_tentacle_through_tinyproxy_with_tls_end_to_end() {
    kit::init_tracing();
    let proxy = Tinyproxy::start(&TinyproxyOptions::default());
    let (server_id, tentacle_id) = (kit::identity("server"), kit::identity("tentacle"));
    let (server, addr, _sg) = kit::server(server_id.clone(), &[tentacle_id.thumbprint()]).await;
    // The tap sits between the proxy and the server: it sees the tunnel's bytes.
    let tap = Tap::start(addr).await.unwrap();
    let (_t, _tg) = kit::polling_tentacle_via(
        tentacle_id.clone(),
        &[server_id.thumbprint()],
        &tap.addr().to_string(),
        "via-proxy",
        1,
        explicit(proxy.config()),
    );
    let ep = Endpoint::polling("via-proxy", tentacle_id.thumbprint()).unwrap();
    let conn = timeout(T, server.connect(&ep)).await.unwrap().unwrap();
    assert_eq!(conn.hello().unwrap().subscription_id, "via-proxy");
    timeout(T, round_trip(&conn)).await.unwrap();
    only_connects(&proxy, &tap.addr().to_string());
    tls_inside(&tap);
}

#[tokio::test]
async fn polling_tentacle_through_tinyproxy_with_basic_auth() {
    kit::init_tracing();
    let proxy = Tinyproxy::start(&with_auth());
    let (server_id, tentacle_id) = (kit::identity("server"), kit::identity("tentacle"));
    let (server, addr, _sg) = kit::server(server_id.clone(), &[tentacle_id.thumbprint()]).await;
    let (_t, _tg) = kit::polling_tentacle_via(
        tentacle_id.clone(),
        &[server_id.thumbprint()],
        &addr.to_string(),
        "auth",
        2,
        explicit(proxy.config().with_credentials("octo", "s3cret-pw")),
    );
    let ep = Endpoint::polling("auth", tentacle_id.thumbprint()).unwrap();
    let conn = timeout(T, server.connect(&ep)).await.unwrap().unwrap();
    timeout(T, round_trip(&conn)).await.unwrap();
    // Both connections came through the proxy.
    timeout(T, async {
        while proxy.requests().len() < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("two CONNECTs expected:\n{}", proxy.log()));
    only_connects(&proxy, &addr.to_string());
}

#[tokio::test]
async fn server_dials_a_listening_tentacle_through_tinyproxy() {
    kit::init_tracing();
    let proxy = Tinyproxy::start(&with_auth());
    let (server_id, tentacle_id) = (kit::identity("server"), kit::identity("tentacle"));
    let (addr, _t, _g) =
        kit::listening_tentacle(tentacle_id.clone(), &[server_id.thumbprint()]).await;
    let tap = Tap::start(addr).await.unwrap();
    let options = ServerCommsOptions {
        proxy: explicit(proxy.config().with_credentials("octo", "s3cret-pw")),
        ..Default::default()
    };
    let (server, _, _sg) = kit::server_with(server_id, &[], options, None).await;
    let ep = Endpoint::listening(
        &format!("https://{}/", tap.addr()),
        tentacle_id.thumbprint(),
    )
    .unwrap();
    let conn = timeout(T, server.connect(&ep)).await.unwrap().unwrap();
    // The TCP peer is the proxy; the TLS peer is the tentacle.
    assert_eq!(conn.remote_addr(), proxy.addr());
    assert_eq!(conn.peer_thumbprint(), tentacle_id.thumbprint());
    timeout(T, round_trip(&conn)).await.unwrap();
    only_connects(&proxy, &tap.addr().to_string());
    tls_inside(&tap);
}

#[tokio::test]
async fn the_configured_host_name_is_what_the_proxy_is_asked_for() {
    kit::init_tracing();
    let proxy = Tinyproxy::start(&TinyproxyOptions::default());
    let (server_id, tentacle_id) = (kit::identity("server"), kit::identity("tentacle"));
    let (server, addr, _sg) = kit::server(server_id.clone(), &[tentacle_id.thumbprint()]).await;
    // The proxy resolves the name (SNI carries it too).
    let target = format!("localhost:{}", addr.port());
    let (_t, _tg) = kit::polling_tentacle_via(
        tentacle_id.clone(),
        &[server_id.thumbprint()],
        &target,
        "named",
        1,
        explicit(proxy.config()),
    );
    let ep = Endpoint::polling("named", tentacle_id.thumbprint()).unwrap();
    let conn = timeout(T, server.connect(&ep)).await.unwrap().unwrap();
    timeout(T, round_trip(&conn)).await.unwrap();
    assert!(
        proxy
            .requests()
            .contains(&format!("CONNECT {target} HTTP/1.1")),
        "{}",
        proxy.log()
    );
}

async fn dial(setting: &ProxySetting, target: SocketAddr) -> ProxyError {
    proxy::connect(setting, "127.0.0.1", target.port(), Duration::from_secs(5))
        .await
        .map(|d| d.proxy)
        .expect_err("the dial should fail")
}

#[tokio::test]
async fn missing_or_wrong_credentials_name_the_proxy_and_its_answer() {
    kit::init_tracing();
    let proxy = Tinyproxy::start(&with_auth());
    let target = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = target.local_addr().unwrap();
    let p = proxy.addr();

    let e = dial(&explicit(proxy.config()), target).await;
    let msg = e.to_string();
    assert!(
        matches!(e, ProxyError::Authentication { status: 407, .. }),
        "{msg}"
    );
    assert_eq!(
        msg,
        format!("the proxy {p} requires authentication or refused the credentials (407 Proxy Authentication Required); set or fix --proxy-username/--proxy-password")
    );
    assert!(!e.is_retryable());

    // tinyproxy answers a wrong password with 401; the same advice applies.
    let e = dial(
        &explicit(proxy.config().with_credentials("octo", "wrong-pw")),
        target,
    )
    .await;
    let msg = e.to_string();
    assert!(matches!(e, ProxyError::Authentication { .. }), "{msg}");
    assert!(
        msg.starts_with(&format!(
            "the proxy {p} requires authentication or refused the credentials (40"
        )) && msg.ends_with("set or fix --proxy-username/--proxy-password"),
        "{msg}"
    );
    assert!(!msg.contains("wrong-pw"), "{msg}");
    assert!(!e.is_retryable());

    // The server's dial reports it as a comms error naming the tentacle too.
    let server_id = kit::identity("server");
    let options = ServerCommsOptions {
        proxy: explicit(proxy.config().with_credentials("octo", "wrong-pw")),
        ..Default::default()
    };
    let (server, _, _sg) = kit::server_with(server_id, &[], options, None).await;
    let ep = Endpoint::listening(
        &format!("https://{target}/"),
        kit::identity("t").thumbprint(),
    )
    .unwrap();
    let err = timeout(T, server.connect(&ep)).await.unwrap().unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, CommsError::Proxy { .. }), "{msg}");
    assert!(
        msg.starts_with(&format!(
            "could not reach the tentacle at {target}: the proxy {p} requires authentication"
        )),
        "{msg}"
    );
    assert!(!err.is_retryable(), "{msg}");
}

#[tokio::test(flavor = "current_thread")]
async fn a_polling_tentacle_logs_the_proxys_refusal() {
    let logs = kit::LogCapture::default();
    let _g = logs.install();
    let proxy = Tinyproxy::start(&with_auth());
    let (server_id, tentacle_id) = (kit::identity("server"), kit::identity("tentacle"));
    let (_server, addr, _sg) = kit::server(server_id.clone(), &[tentacle_id.thumbprint()]).await;
    let (_t, _tg) = kit::polling_tentacle_via(
        tentacle_id,
        &[server_id.thumbprint()],
        &addr.to_string(),
        "refused",
        1,
        explicit(proxy.config().with_credentials("octo", "wrong-pw")),
    );
    let line = logs
        .wait_for_line(
            &[
                &format!("could not reach the server at {addr}"),
                &format!("the proxy {} requires authentication", proxy.addr()),
                "--proxy-username/--proxy-password",
            ],
            T,
        )
        .await
        .unwrap_or_else(|| panic!("no refusal logged:\n{}", logs.text()));
    assert!(line.contains("ERROR"), "{line}");
    assert!(!logs.text().contains("wrong-pw"));
}

#[tokio::test]
async fn a_connect_port_rule_gives_403_with_the_fix() {
    kit::init_tracing();
    let proxy = Tinyproxy::start(&TinyproxyOptions {
        connect_ports: vec![443],
        ..Default::default()
    });
    let target = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = target.local_addr().unwrap();
    let e = dial(&explicit(proxy.config()), target).await;
    let msg = e.to_string();
    assert!(
        matches!(e, ProxyError::Forbidden { status: 403, .. }),
        "{msg}"
    );
    assert!(
        msg.starts_with(&format!(
            "the proxy {} refused CONNECT to {target} (403 ",
            proxy.addr()
        )) && msg.contains("the proxy's rules do not allow this destination port")
            && msg.contains(&format!("ConnectPort {}", target.port())),
        "{msg}"
    );
    assert!(!e.is_retryable());
}

#[tokio::test]
async fn a_proxy_that_is_down_is_unreachable_and_retryable() {
    kit::init_tracing();
    let (_held, down) = closed_port();
    let target = SocketAddr::from(([127, 0, 0, 1], 10943));
    let e = dial(
        &explicit(ProxyConfig::new("127.0.0.1", down.port())),
        target,
    )
    .await;
    let msg = e.to_string();
    assert!(matches!(e, ProxyError::Unreachable { .. }), "{msg}");
    assert!(
        msg.starts_with(&format!(
            "could not connect to the proxy {down}: connection refused"
        )) && msg.ends_with("check --proxy-host/--proxy-port"),
        "{msg}"
    );
    assert!(e.is_retryable());
    let comms = e.into_comms("octopus.example:10943", octo_tls::Role::Server);
    assert!(comms.is_retryable());
    assert!(
        comms.to_string().starts_with(
            "could not reach the server at octopus.example:10943: could not connect to the proxy"
        ),
        "{comms}"
    );
}

#[tokio::test]
async fn a_destination_the_proxy_cannot_reach_is_retryable() {
    kit::init_tracing();
    let proxy = Tinyproxy::start(&TinyproxyOptions::default());
    let (_held, closed) = closed_port();
    let e = dial(&explicit(proxy.config()), closed).await;
    let msg = e.to_string();
    assert!(matches!(e, ProxyError::TargetUnreachable { .. }), "{msg}");
    assert!(
        msg.starts_with(&format!(
            "the proxy {} could not reach {closed} (500 ",
            proxy.addr()
        )),
        "{msg}"
    );
    assert!(e.is_retryable());
}

#[tokio::test]
async fn something_that_is_not_a_proxy_is_named_and_a_silent_one_times_out() {
    kit::init_tracing();
    // Accepts and closes at once.
    let closer = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closer_addr = closer.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = closer.accept().await {
            drop(s);
        }
    });
    let target = SocketAddr::from(([127, 0, 0, 1], 10943));
    let e = dial(
        &explicit(ProxyConfig::new("127.0.0.1", closer_addr.port())),
        target,
    )
    .await;
    let msg = e.to_string();
    assert!(matches!(e, ProxyError::Protocol { .. }), "{msg}");
    assert!(
        msg.contains(&format!("is {closer_addr} an HTTP proxy?")),
        "{msg}"
    );

    // Accepts and never answers: the step that timed out is named.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let e = proxy::connect(
        &explicit(ProxyConfig::new("127.0.0.1", silent_addr.port())),
        "127.0.0.1",
        10943,
        Duration::from_millis(300),
    )
    .await
    .map(|d| d.proxy)
    .expect_err("times out");
    let msg = e.to_string();
    assert!(matches!(e, ProxyError::Timeout { .. }), "{msg}");
    assert!(
        msg.starts_with(&format!(
            "the proxy {silent_addr} did not answer CONNECT to 127.0.0.1:10943 within 0.3 s"
        )),
        "{msg}"
    );
    assert!(e.is_retryable());
    hold.abort();
}

#[tokio::test]
async fn direct_and_loopback_dials_do_not_use_a_proxy() {
    kit::init_tracing();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    for setting in [ProxySetting::Direct, ProxySetting::FromEnvironment] {
        let d = proxy::connect(&setting, "127.0.0.1", addr.port(), T)
            .await
            .unwrap();
        assert_eq!(d.proxy, None);
        assert_eq!(d.peer_addr, addr);
        assert!(d.stream.pending().is_empty());
        assert!(d.stream.get_ref().nodelay().unwrap());
    }
    // A failed direct dial is an ordinary connect error.
    let (_held, closed) = closed_port();
    let e = proxy::connect(&ProxySetting::Direct, "127.0.0.1", closed.port(), T)
        .await
        .map(|d| d.proxy)
        .unwrap_err();
    let comms = e.into_comms(&closed.to_string(), octo_tls::Role::Tentacle);
    assert!(matches!(comms, CommsError::Connect { .. }), "{comms}");
}
