//! A path that goes silent (no FIN, no RST) is noticed by HTTP/2 keepalive, on
//! both sides, and the polling tentacle reconnects. Short keepalive settings make
//! the test fast; production uses 10 s + 10 s (dead noticed within 30 s).
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use octo_comms::{
    is_retryable, Backoff, Endpoint, H2Settings, PollingTarget, ServerCommsOptions, TentacleComms,
};
use octo_proto::v1::*;
use octo_testkit as kit;
use octo_tls::TrustStore;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

fn fast_keepalive() -> H2Settings {
    H2Settings {
        keepalive_interval: Duration::from_millis(300),
        keepalive_timeout: Duration::from_millis(300),
        ..Default::default()
    }
}

#[tokio::test]
async fn silent_dead_polling_path_is_noticed_and_the_tentacle_reconnects() {
    kit::init_tracing();
    let (server_id, tentacle_id) = (kit::identity("server"), kit::identity("tentacle"));
    let options = ServerCommsOptions {
        h2: fast_keepalive(),
        ..Default::default()
    };
    let (server, addr, _sg) = kit::server_with(
        server_id.clone(),
        &[tentacle_id.thumbprint()],
        options,
        None,
    )
    .await;
    // The tentacle reaches the server only through the relay.
    let relay = kit::proxy::Blackhole::start(addr).await.unwrap();
    let trust = TrustStore::new([server_id.thumbprint()], kit::hint("tentacle"));
    let tentacle = TentacleComms::new(tentacle_id.clone(), trust, kit::services::routes(), "t")
        .with_h2(fast_keepalive());
    let stop = CancellationToken::new();
    let _guard = kit::Guard(stop.clone());
    tokio::spawn({
        let target = PollingTarget {
            address: relay.addr().to_string(),
            subscription_id: "sub-k".into(),
        };
        let backoff = Backoff::new(Duration::from_millis(20), Duration::from_millis(200));
        async move { tentacle.run_polling(target, 1, backoff, stop).await }
    });
    let ep = Endpoint::polling("sub-k", tentacle_id.thumbprint()).unwrap();
    let conn = timeout(Duration::from_secs(20), server.connect(&ep))
        .await
        .unwrap()
        .unwrap();
    conn.scripts()
        .start_script(StartScriptRequest {
            ticket: "k".into(),
            script_body: "1000".into(),
            arguments: vec!["50".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let mut stream = conn
        .scripts()
        .stream_logs(ScriptStatusRequest {
            ticket: "k".into(),
            since_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut lines: Vec<u64> = Vec::new();
    let take = |ev: ScriptEvent, lines: &mut Vec<u64>| {
        if let Some(script_event::Event::Log(l)) = ev.event {
            lines.push(l.sequence);
        }
    };
    take(stream.message().await.unwrap().unwrap(), &mut lines);

    let cut = Instant::now();
    relay.freeze();
    // The call in flight fails with a retryable error once keepalive gives up...
    let err = timeout(Duration::from_secs(10), async {
        loop {
            match stream.message().await {
                Ok(Some(ev)) => take(ev, &mut lines),
                Ok(None) => panic!("stream ended cleanly on a dead path"),
                Err(e) => return e,
            }
        }
    })
    .await
    .expect("dead path noticed");
    assert!(is_retryable(&err), "{err:?}");
    timeout(Duration::from_secs(10), conn.closed())
        .await
        .expect("connection closed");
    let noticed = cut.elapsed();
    assert!(
        noticed < Duration::from_secs(5),
        "took {noticed:?} with a 0.6 s keepalive budget"
    );

    // ...the tentacle notices too and reconnects through the relay (the path is
    // back), and the caller resumes the log where it stopped: nothing lost or repeated.
    let conn2 = timeout(Duration::from_secs(20), server.connect(&ep))
        .await
        .unwrap()
        .unwrap();
    let since = lines.last().map_or(0, |s| s + 1);
    let mut stream = conn2
        .scripts()
        .stream_logs(ScriptStatusRequest {
            ticket: "k".into(),
            since_sequence: since,
        })
        .await
        .unwrap()
        .into_inner();
    for _ in 0..5 {
        take(stream.message().await.unwrap().unwrap(), &mut lines);
    }
    let expected: Vec<u64> = (0..lines.len() as u64).collect();
    assert_eq!(lines, expected);
}

#[tokio::test]
async fn silent_dead_listening_path_is_noticed_and_the_server_redials() {
    kit::init_tracing();
    let (server_id, tentacle_id) = (kit::identity("server"), kit::identity("tentacle"));
    let trust = TrustStore::new([server_id.thumbprint()], kit::hint("tentacle"));
    let tentacle = TentacleComms::new(tentacle_id.clone(), trust, kit::services::routes(), "t")
        .with_h2(fast_keepalive());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let taddr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let _guard = kit::Guard(stop.clone());
    tokio::spawn({
        let stop = stop.clone();
        async move { tentacle.run_listening(listener, stop).await }
    });
    let relay = kit::proxy::Blackhole::start(taddr).await.unwrap();
    let options = ServerCommsOptions {
        h2: fast_keepalive(),
        ..Default::default()
    };
    let (server, _, _sg) = kit::server_with(server_id, &[], options, None).await;
    let ep = Endpoint::listening(
        &format!("https://{}/", relay.addr()),
        tentacle_id.thumbprint(),
    )
    .unwrap();
    let conn = timeout(Duration::from_secs(20), server.connect(&ep))
        .await
        .unwrap()
        .unwrap();
    conn.capabilities()
        .ping(PingRequest::default())
        .await
        .unwrap();

    let cut = Instant::now();
    relay.freeze();
    timeout(Duration::from_secs(10), conn.closed())
        .await
        .expect("dead path noticed");
    assert!(
        cut.elapsed() < Duration::from_secs(5),
        "took {:?}",
        cut.elapsed()
    );
    let err = conn
        .capabilities()
        .ping(PingRequest::default())
        .await
        .unwrap_err();
    assert!(is_retryable(&err), "{err:?}");

    // The next request dials afresh.
    let conn2 = timeout(Duration::from_secs(20), server.connect(&ep))
        .await
        .unwrap()
        .unwrap();
    assert!(!conn2.is_closed());
    conn2
        .capabilities()
        .ping(PingRequest::default())
        .await
        .unwrap();
}
