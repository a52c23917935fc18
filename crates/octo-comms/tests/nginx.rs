//! Through a real nginx (`stream` module, started by each test on 127.0.0.1):
//! polling over WebSocket through a TCP pass-through, and routing by TLS SNI
//! (`ssl_preread`) of two names on one port to two different servers. nginx
//! never terminates TLS: thumbprints are pinned end to end. Every wait is
//! bounded.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use octo_comms::{
    Backoff, Endpoint, PollingOptions, PollingTarget, ProxySetting, ServerComms,
    ServerCommsOptions, TentacleComms, WebSocketListenerOptions,
};
use octo_proto::v1::*;
use octo_testkit as kit;
use octo_testkit::nginx::Nginx;
use octo_tls::{Identity, Thumbprint, TrustStore};
use tokio::net::TcpListener;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(20);

/// Starts `comms`' WebSocket listener on a free port of 127.0.0.1.
async fn serve_ws(comms: &ServerComms) -> (SocketAddr, kit::Guard) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let token = CancellationToken::new();
    let (c, t) = (comms.clone(), token.clone());
    tokio::spawn(async move {
        c.run_web_socket_listener(listener, WebSocketListenerOptions::default(), t)
            .await
    });
    (addr, kit::Guard(token))
}

/// A polling tentacle trusting only `server`, polling `address` (dialled at
/// `connect_to`, if given).
fn tentacle(
    identity: Identity,
    server: Thumbprint,
    address: &str,
    connect_to: Option<SocketAddr>,
    subscription_id: &str,
) -> (TentacleComms, kit::Guard) {
    let trust = TrustStore::new([server], kit::hint("tentacle"));
    let comms = TentacleComms::new(identity, trust, kit::services::routes(), "Test")
        .with_proxy(ProxySetting::Direct);
    let token = CancellationToken::new();
    let target = PollingTarget {
        address: address.to_string(),
        subscription_id: subscription_id.to_string(),
    };
    let options = PollingOptions {
        connect_to: connect_to.map(|a| a.to_string()),
        server_thumbprint: Some(server),
        rotating_to: None,
    };
    let (c, t) = (comms.clone(), token.clone());
    let backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(500));
    tokio::spawn(async move { c.run_polling_with(target, options, 1, backoff, t).await });
    (comms, kit::Guard(token))
}

/// A ping and a streamed script over the connection to `subscription`.
async fn reach(server: &ServerComms, subscription: &str, tentacle: Thumbprint) {
    let ep = Endpoint::polling(subscription, tentacle).unwrap();
    let conn = timeout(T, server.connect(&ep)).await.unwrap().unwrap();
    assert_eq!(conn.peer_thumbprint(), tentacle);
    let reply = conn
        .capabilities()
        .ping(PingRequest {
            payload: subscription.as_bytes().to_vec(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.payload, subscription.as_bytes());
    let ticket = format!("{subscription}-script");
    conn.scripts()
        .start_script(StartScriptRequest {
            ticket: ticket.clone(),
            script_body: "10".into(),
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
    assert_eq!((lines, completed), (10, true));
}

#[tokio::test]
async fn web_socket_polling_through_nginx_stream_pass_through() {
    kit::init_tracing();
    let (server_id, tentacle_id) = (kit::identity("server"), kit::identity("tentacle"));
    let trust = TrustStore::new([tentacle_id.thumbprint()], kit::hint("server"));
    let server = ServerComms::new(server_id.clone(), trust, ServerCommsOptions::default());
    let (ws_addr, _wg) = serve_ws(&server).await;
    let nginx = Nginx::pass_through(ws_addr);
    // The tentacle knows only nginx's address.
    let (_t, _tg) = tentacle(
        tentacle_id.clone(),
        server_id.thumbprint(),
        &format!("wss://localhost:{}/tentacle", nginx.addr().port()),
        None,
        "via-nginx",
    );
    timeout(T, reach(&server, "via-nginx", tentacle_id.thumbprint()))
        .await
        .unwrap();
    assert!(
        nginx.upstreams().contains(&ws_addr),
        "nginx did not relay to {ws_addr}:\n{}",
        nginx.output()
    );
}

#[tokio::test]
async fn sni_routing_through_nginx_reaches_the_right_server() {
    kit::init_tracing();
    let (a_id, b_id) = (kit::identity("server A"), kit::identity("server B"));
    let (ta, tb, tc) = (
        kit::identity("tentacle a"),
        kit::identity("tentacle b"),
        kit::identity("tentacle c"),
    );
    // Each server trusts only its own tentacles; each tentacle only its server.
    let (a, a_addr, _ag) = kit::server(a_id.clone(), &[ta.thumbprint(), tc.thumbprint()]).await;
    let (b, b_addr, _bg) = kit::server(b_id.clone(), &[tb.thumbprint()]).await;
    let (a_ws, _awg) = serve_ws(&a).await;
    let nginx = Nginx::sni_router(
        &[
            ("alpha.test", a_addr),
            ("beta.test", b_addr),
            ("gamma.test", a_ws),
        ],
        None,
    );
    // Three names, one nginx port: the names are not in DNS, so each tentacle
    // dials nginx's address and sends its name as SNI.
    let at = Some(nginx.addr());
    let (_t1, _g1) = tentacle(ta.clone(), a_id.thumbprint(), "alpha.test:443", at, "sub-a");
    let (_t2, _g2) = tentacle(tb.clone(), b_id.thumbprint(), "beta.test:443", at, "sub-b");
    let (_t3, _g3) = tentacle(
        tc.clone(),
        a_id.thumbprint(),
        "wss://gamma.test/tentacle",
        at,
        "sub-c",
    );
    // A wrong route would fail both ways (neither side trusts the other), so a
    // successful call proves each tentacle reached its own server.
    timeout(T, reach(&a, "sub-a", ta.thumbprint()))
        .await
        .unwrap();
    timeout(T, reach(&b, "sub-b", tb.thumbprint()))
        .await
        .unwrap();
    timeout(T, reach(&a, "sub-c", tc.thumbprint()))
        .await
        .unwrap();
    assert_eq!(a.polling().len(), 2);
    assert_eq!(b.polling().len(), 1);
    let upstreams = nginx.upstreams();
    for want in [a_addr, b_addr, a_ws] {
        assert!(
            upstreams.contains(&want),
            "nginx did not route to {want}:\n{}",
            nginx.output()
        );
    }
}

#[tokio::test(flavor = "current_thread")]
async fn an_unknown_name_is_not_routed_and_the_tentacle_says_why() {
    let logs = kit::LogCapture::default();
    let _l = logs.install();
    let (a_id, ta) = (kit::identity("server A"), kit::identity("tentacle a"));
    let (_a, a_addr, _ag) = kit::server(a_id.clone(), &[ta.thumbprint()]).await;
    let nginx = Nginx::sni_router(&[("alpha.test", a_addr)], None);
    let (_t, _g) = tentacle(
        ta,
        a_id.thumbprint(),
        "unknown.test:443",
        Some(nginx.addr()),
        "sub-u",
    );
    // nginx has no route for the name and closes; the tentacle names the
    // address it dialled and the likely cause.
    let line = logs
        .wait_for_line(
            &[
                &format!(
                    "TLS handshake with the server at unknown.test:443 (dialled at {})",
                    nginx.addr()
                ),
                "closed before the handshake finished",
                "SNI",
            ],
            T,
        )
        .await;
    assert!(line.is_some(), "log was:\n{}", logs.text());
    assert!(!nginx.upstreams().contains(&a_addr), "{}", nginx.output());
}
