//! The friendly page, fetched by real `curl -k` (installed by scripts/test.sh),
//! over HTTP/2 and HTTP/1.1, on every listener kind (a listening tentacle, the
//! server's polling port and its WebSocket port).
#![allow(clippy::unwrap_used)]

use std::process::Command;

use octo_testkit as kit;

fn curl(args: &[&str], url: &str) -> (String, String) {
    let out = Command::new("curl")
        .args([
            "-k",
            "-sS",
            "--max-time",
            "20",
            "-w",
            "\n%{http_code} %{http_version}",
        ])
        .args(args)
        .arg(url)
        .output()
        .expect("curl is installed by scripts/test.sh");
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap();
    (body.to_string(), status.to_string())
}

#[tokio::test]
async fn curl_gets_the_page_over_http2_and_http1_on_both_ports() {
    kit::init_tracing();
    let (server_id, tentacle_id) = (kit::identity("server"), kit::identity("tentacle"));
    let (taddr, _t, _g) = kit::listening_tentacle(tentacle_id, &[server_id.thumbprint()]).await;
    let (server, saddr, _sg) = kit::server(server_id, &[]).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let waddr = listener.local_addr().unwrap();
    let _wg = kit::Guard(tokio_util::sync::CancellationToken::new());
    tokio::spawn({
        let (server, token) = (server.clone(), _wg.0.clone());
        async move {
            server
                .run_web_socket_listener(listener, Default::default(), token)
                .await
        }
    });
    for (addr, title) in [
        (taddr, "Octopus Tentacle"),
        (saddr, "Octopus Server"),
        (waddr, "WebSocket polling endpoint"),
    ] {
        let url = format!("https://127.0.0.1:{}/", addr.port());
        for (flag, version) in [("--http2", "2"), ("--http1.1", "1.1")] {
            let url = url.clone();
            let (body, status) = tokio::task::spawn_blocking(move || curl(&[flag], &url))
                .await
                .unwrap();
            assert_eq!(status, format!("200 {version}"), "{flag} {body}");
            assert!(body.contains(title), "{body}");
        }
    }
}
