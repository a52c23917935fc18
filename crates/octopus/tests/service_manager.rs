//! `octopus server run` under a service manager: on sockets passed as
//! systemd's socket units pass them (`LISTEN_FDS`), a restart refuses no
//! connection, and a passed socket that disagrees with the server's options
//! stops it with both named; with `NOTIFY_SOCKET` (`Type=notify`), it says
//! when it is ready and when it stops; a stop during its start ends the start.
//!
//! The servers are real processes; the sockets are this test's, as they are
//! systemd's on a host, so they outlive each server. The polling tentacle is a
//! `TentacleComms` with the real agent services in this process. Every wait is
//! bounded and waits for an event.
#![allow(clippy::unwrap_used)]
// `ServerProcess` waits for its child in `Drop`, which the lint cannot see.
#![allow(clippy::zombie_processes)]

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::time::Duration;

use common::live::{
    admin_api, in_process_tentacle, poll_as_pol, register_pol, script_on_pol, Api, ServerProcess, T,
};
use octo_testkit as kit;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

fn loopback_socket() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").unwrap()
}

/// SIGTERM, and the process's exit (its shutdown run to the end).
async fn stop(server: ServerProcess) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(server.child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = timeout(
        T,
        tokio::task::spawn_blocking(move || {
            let mut server = server;
            server.child.wait()
        }),
    )
    .await
    .expect("the server did not exit after SIGTERM")
    .unwrap()
    .unwrap();
    assert!(status.success(), "{status:?}");
}

/// A script task on `pol`, followed to its end: its state.
async fn run_on_pol(api: &Api, script: &str) -> String {
    let id = script_on_pol(api, script).await;
    let end = api.events(&id).await.until(|e, _| e == "end").await;
    end["task"]["state"].as_str().unwrap().to_string()
}

fn log_of(data: &Path) -> String {
    std::fs::read_to_string(data.with_extension("stderr")).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_made_while_the_server_restarts_wait_for_the_next_process() {
    kit::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let (api_socket, comms_socket, ws_socket) =
        (loopback_socket(), loopback_socket(), loopback_socket());
    let api_addr = api_socket.local_addr().unwrap();
    let comms_port = comms_socket.local_addr().unwrap().port();
    let ws_port = ws_socket.local_addr().unwrap().port().to_string();
    // In another order than the options': each is taken by its port.
    let sockets = [&ws_socket, &api_socket, &comms_socket];
    let listen = api_addr.to_string();
    let ws = ["--web-socket-listen-port", ws_port.as_str()];

    let server = ServerProcess::try_start_on(&sockets, &listen, &data, comms_port, &ws).unwrap();
    assert_eq!(server.base, format!("http://{api_addr}"));
    let said = format!(
        "Listening on the sockets the service manager passed (they stay open across restarts): API {api_addr}, comms 127.0.0.1:{comms_port}, WebSocket 127.0.0.1:{ws_port}"
    );
    assert!(server.lines.contains(&said), "{:?}", server.lines);
    let api = admin_api(&server, &data);
    let identity = kit::identity("pol");
    let comms = in_process_tentacle(tmp.path(), &identity, server.thumbprint);
    let token = CancellationToken::new();
    let polling = poll_as_pol(comms, comms_port, token.clone());
    register_pol(&api, &identity).await;
    assert_eq!(run_on_pol(&api, "echo before").await, "Success");

    // No server runs now. A server that bound its own ports would have closed
    // them: these connections would be refused.
    stop(server).await;
    let mut client = tokio::net::TcpStream::connect(api_addr)
        .await
        .expect("the API's port refused a connection between two servers");
    client
        .write_all(b"GET /api/nodes/ping HTTP/1.1\r\nHost: octopus\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    for port in [comms_port, ws_port.parse().unwrap()] {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("the comms or WebSocket port refused a connection between two servers");
    }

    // The next server answers the request made while none ran, and the
    // tentacle, which lost the first, works through it.
    let server = ServerProcess::try_start_on(&sockets, &listen, &data, comms_port, &ws).unwrap();
    let mut answer = Vec::new();
    timeout(T, client.read_to_end(&mut answer))
        .await
        .expect("the request made between the servers was not answered")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(run_on_pol(&api, "echo after").await, "Success");

    token.cancel();
    timeout(T, polling).await.unwrap().unwrap();
    stop(server).await;
}

#[tokio::test]
async fn a_passed_socket_that_disagrees_with_the_options_stops_the_server_saying_why() {
    let tmp = tempfile::tempdir().unwrap();

    // The API's socket on 127.0.0.1, --listen on 127.0.0.2, same port: serving
    // it would put the API where the operator did not ask for it.
    let data = tmp.path().join("address");
    let api_socket = loopback_socket();
    let port = api_socket.local_addr().unwrap().port();
    let comms_port = common::live::free_port();
    let listen = format!("127.0.0.2:{port}");
    let err = ServerProcess::try_start_on(&[&api_socket], &listen, &data, comms_port, &[])
        .err()
        .expect("the server started on a socket its --listen does not name");
    let log = log_of(&data);
    assert!(
        log.contains(&format!(
            "passed a socket listening on 127.0.0.1:{port}, but --listen asks for 127.0.0.2 port {port}"
        )),
        "{err}\n{log}"
    );

    // A socket no option listens on would hold connections nobody accepts.
    let data = tmp.path().join("stray");
    let stray = loopback_socket();
    let stray_addr = stray.local_addr().unwrap();
    let err = ServerProcess::try_start_on(&[&stray], "127.0.0.1:0", &data, comms_port, &[])
        .err()
        .expect("the server started with a passed socket it does not use");
    let log = log_of(&data);
    assert!(
        log.contains(&format!(
            "passed sockets on {stray_addr} that no option of this program listens on"
        )),
        "{err}\n{log}"
    );
}

#[tokio::test]
async fn the_server_tells_the_service_manager_when_it_is_ready_and_when_it_stops() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let path = tmp.path().join("notify");
    let notify = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    notify.set_read_timeout(Some(T)).unwrap();
    let env = format!("NOTIFY_SOCKET={}", path.display());
    let server =
        ServerProcess::try_start_via(&["env", &env], &data, common::live::free_port(), &[])
            .unwrap();
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("no notice from the server");
    assert_eq!(std::str::from_utf8(&buf[..n]).unwrap(), "READY=1\n");
    stop(server).await;
    let n = notify
        .recv(&mut buf)
        .expect("no notice that the server stops");
    assert_eq!(std::str::from_utf8(&buf[..n]).unwrap(), "STOPPING=1\n");
}

#[tokio::test]
async fn a_stop_during_the_start_ends_it() {
    // A "database" that accepts connections and never answers: the server's
    // start waits for it (up to 30 s).
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "postgres://octopus:secret@{}/octopus",
        silent.local_addr().unwrap()
    );
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let comms_port = common::live::free_port().to_string();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_octopus"))
        .args(["server", "run", "--data", data.to_str().unwrap()])
        .args([
            "--listen",
            "127.0.0.1:0",
            "--comms-listen-port",
            &comms_port,
        ])
        .args(["--database-url", &url])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The server is in its start once its connection arrives.
    let (_held, _) = timeout(T, silent.accept())
        .await
        .expect("the server did not connect to its database")
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    // Well before the database's 30 s: the stop ends the start.
    let output = timeout(
        Duration::from_secs(15),
        tokio::task::spawn_blocking(move || {
            let status = child.wait();
            let mut out = String::new();
            std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
            (status, out)
        }),
    )
    .await
    .expect("the server went on starting after SIGTERM")
    .unwrap();
    let (status, out) = output;
    assert!(status.unwrap().success(), "{out}");
    assert!(
        out.contains("Stopped before the server was ready."),
        "{out}"
    );
}
