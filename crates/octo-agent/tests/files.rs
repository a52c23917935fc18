//! The real file and capabilities services, through the real transport (mutual
//! TLS, HTTP/2, gRPC) on 127.0.0.1. Every wait is bounded; nothing sleeps to
//! synchronise.
#![allow(clippy::unwrap_used, clippy::print_stderr)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use octo_agent::capabilities::{installed_tool_version, CapabilitiesImpl};
use octo_agent::files::{resolve_path, FileServiceImpl};
use octo_agent::AgentContext;
use octo_comms::{Connection, Endpoint, ServerComms, ServerCommsOptions, TentacleComms};
use octo_proto::v1::capabilities_server::CapabilitiesServer;
use octo_proto::v1::file_service_server::FileServiceServer;
use octo_proto::v1::*;
use octo_testkit as kit;
use octo_tls::{Identity, TrustStore};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};

/// Bound on any single wait: generous, as `files_beyond_4_gib` hashes 4.5 GiB
/// three times at once (about 5 s each alone, over a minute on a loaded machine).
const T: Duration = Duration::from_secs(240);
const CHUNK: usize = 256 << 10;
const MIB: u64 = 1 << 20;

/// A listening tentacle serving the real services, and a server connected to it.
struct Rig {
    home: tempfile::TempDir,
    ctx: AgentContext,
    server: ServerComms,
    endpoint: Endpoint,
    conn: Connection,
    _stop: kit::Guard,
}

impl Rig {
    async fn start() -> Rig {
        kit::init_tracing();
        let home = tempfile::tempdir().unwrap();
        let ctx = AgentContext {
            instance_name: "Test".into(),
            home: home.path().to_path_buf(),
            applications: home.path().join("Applications"),
        };
        let routes = tonic::service::Routes::new(
            FileServiceServer::new(FileServiceImpl::new(ctx.clone()))
                .max_decoding_message_size(16 << 20)
                .max_encoding_message_size(16 << 20),
        )
        .add_service(CapabilitiesServer::new(CapabilitiesImpl::new(ctx.clone())));
        let (server_id, tentacle_id): (Identity, Identity) =
            (kit::identity("server"), kit::identity("tentacle"));
        let comms = TentacleComms::new(
            tentacle_id.clone(),
            TrustStore::new([server_id.thumbprint()], kit::hint("tentacle")),
            routes,
            "t",
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let token = CancellationToken::new();
        let t = token.clone();
        tokio::spawn(async move { comms.run_listening(listener, t).await });
        let server = ServerComms::new(
            server_id,
            TrustStore::new([], kit::hint("server")),
            ServerCommsOptions::default(),
        );
        let endpoint =
            Endpoint::listening(&format!("https://{addr}/"), tentacle_id.thumbprint()).unwrap();
        let conn = timeout(T, server.connect(&endpoint))
            .await
            .unwrap()
            .unwrap();
        Rig {
            home,
            ctx,
            server,
            endpoint,
            conn,
            _stop: kit::Guard(token),
        }
    }

    fn home(&self) -> &Path {
        self.home.path()
    }

    async fn upload(&self, msgs: Vec<UploadRequest>) -> Result<UploadReply, Status> {
        timeout(T, self.conn.files().upload_file(tokio_stream::iter(msgs)))
            .await
            .expect("upload timed out")
            .map(|r| r.into_inner())
    }

    async fn state(&self, path: &str) -> UploadStateReply {
        timeout(
            T,
            self.conn
                .files()
                .get_upload_state(UploadStateRequest { path: path.into() }),
        )
        .await
        .expect("state timed out")
        .unwrap()
        .into_inner()
    }

    async fn download(&self, path: &str, offset: u64) -> Result<Downloaded, Status> {
        timeout(T, download(&self.conn, path, offset))
            .await
            .expect("download timed out")
    }
}

#[derive(Debug, Default)]
struct Downloaded {
    total_length: Option<u64>,
    offsets: Vec<u64>,
    data: Vec<u8>,
    finish: Option<DownloadFinish>,
}

async fn download(conn: &Connection, path: &str, offset: u64) -> Result<Downloaded, Status> {
    let mut stream = conn
        .files()
        .download_file(DownloadRequest {
            path: path.into(),
            offset,
        })
        .await?
        .into_inner();
    let mut out = Downloaded::default();
    while let Some(m) = stream.message().await? {
        match m.part.unwrap() {
            download_reply::Part::Start(s) => {
                assert!(out.total_length.is_none(), "two starts");
                out.total_length = Some(s.total_length);
            }
            download_reply::Part::Chunk(c) => {
                assert!(out.total_length.is_some(), "chunk before start");
                assert!(out.finish.is_none(), "chunk after finish");
                out.offsets.push(c.offset);
                out.data.extend_from_slice(&c.data);
            }
            download_reply::Part::Finish(f) => out.finish = Some(f),
        }
    }
    Ok(out)
}

fn start(path: &str, total: u64, resume_from: u64, overwrite: bool) -> UploadRequest {
    UploadRequest {
        part: Some(upload_request::Part::Start(UploadStart {
            path: path.into(),
            total_length: total,
            resume_from,
            overwrite,
            mode: 0,
        })),
    }
}

/// Chunk messages for `data`, which sits at `base` in the whole file.
fn chunks(data: &[u8], base: u64) -> Vec<UploadRequest> {
    data.chunks(CHUNK)
        .enumerate()
        .map(|(i, c)| UploadRequest {
            part: Some(upload_request::Part::Chunk(FileChunk {
                offset: base + (i * CHUNK) as u64,
                data: Bytes::copy_from_slice(c),
            })),
        })
        .collect()
}

fn finish(sha256: &str, total: u64) -> UploadRequest {
    UploadRequest {
        part: Some(upload_request::Part::Finish(UploadFinish {
            sha256: sha256.into(),
            total_length: total,
        })),
    }
}

/// A whole upload of `data` to `path`.
fn whole(path: &str, data: &[u8], overwrite: bool) -> Vec<UploadRequest> {
    let total = data.len() as u64;
    let mut msgs = vec![start(path, total, 0, overwrite)];
    msgs.extend(chunks(data, 0));
    msgs.push(finish(&sha_hex(data), total));
    msgs
}

/// SHA-256 with the `sha2` crate: an implementation independent of the service's.
fn sha_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02X}")).collect()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i % 251) as u8).wrapping_add(seed))
        .collect()
}

fn partial_of(p: &Path) -> PathBuf {
    let mut name = p.file_name().unwrap().to_os_string();
    name.push(".partial");
    p.with_file_name(name)
}

#[test]
fn paths_resolve_under_home_and_refuse_escapes() {
    let home = Path::new("/srv/tentacle");
    let ok = |p: &str| resolve_path(home, p).unwrap();
    assert_eq!(ok("a.bin"), home.join("a.bin"));
    assert_eq!(ok("./a/./b/../c.bin"), home.join("a/c.bin"));
    assert_eq!(ok("/tmp/../etc/x"), PathBuf::from("/etc/x"));
    assert_eq!(ok("/../x"), PathBuf::from("/x"));
    for bad in ["../x", "a/../../x", "..", "", "a/\0b"] {
        let e = resolve_path(home, bad).unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad:?}: {e}");
    }
    let e = resolve_path(home, "a/../../x").unwrap_err();
    assert!(e.message().contains("/srv/tentacle"), "{e}");
    assert!(e.message().contains("a/../../x"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_land_on_disk_with_the_right_hash() {
    let rig = Rig::start().await;

    // Small, relative: lands under home, parent directories created.
    let small = b"hello tentacle".to_vec();
    let reply = rig
        .upload(whole("sub/dir/small.txt", &small, false))
        .await
        .unwrap();
    let target = rig.home().join("sub/dir/small.txt");
    assert_eq!(PathBuf::from(&reply.full_path), target);
    assert_eq!(reply.length, small.len() as u64);
    assert_eq!(reply.sha256, sha_hex(&small));
    assert_eq!(std::fs::read(&target).unwrap(), small);
    assert!(!partial_of(&target).exists());

    // Empty file.
    let reply = rig.upload(whole("empty", &[], false)).await.unwrap();
    assert_eq!(reply.length, 0);
    assert_eq!(reply.sha256, sha_hex(&[]));
    assert_eq!(
        std::fs::metadata(rig.home().join("empty")).unwrap().len(),
        0
    );

    // 20 MiB, absolute path elsewhere (the server is trusted).
    let other = tempfile::tempdir().unwrap();
    let big_path = other.path().join("big.bin");
    let big = pattern(20 << 20, 7);
    let msgs = whole(big_path.to_str().unwrap(), &big, false);
    let began = Instant::now();
    let reply = rig.upload(msgs).await.unwrap();
    let secs = began.elapsed().as_secs_f64();
    eprintln!(
        "20 MiB upload through TLS/HTTP/2: {secs:.2} s, {:.1} MiB/s",
        20.0 / secs
    );
    assert_eq!(reply.length, big.len() as u64);
    assert_eq!(reply.sha256, sha_hex(&big));
    assert_eq!(PathBuf::from(&reply.full_path), big_path);
    assert!(std::fs::read(&big_path).unwrap() == big);

    // The state of a complete file: exists, with its hash; nothing partial.
    let state = rig.state(big_path.to_str().unwrap()).await;
    assert!(state.exists);
    assert_eq!(state.received_bytes, 0);
    assert_eq!(state.sha256, sha_hex(&big));
    let state = rig.state("nothing-here").await;
    assert!(!state.exists && state.received_bytes == 0 && state.sha256.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_refuse_escapes_overwrites_and_bad_streams() {
    let rig = Rig::start().await;
    let data = pattern(300_000, 1);

    // `..` out of home.
    let name = format!("octo-escape-{}", std::process::id());
    let escape = format!("../{name}");
    let e = rig.upload(whole(&escape, &data, false)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains(&escape), "{e}");
    assert!(e.message().contains(rig.home().to_str().unwrap()), "{e}");
    assert!(!rig.home().parent().unwrap().join(&name).exists());

    // Overwrite refused, then allowed.
    rig.upload(whole("f.bin", &data, false)).await.unwrap();
    let other = pattern(1000, 9);
    let e = rig.upload(whole("f.bin", &other, false)).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e}");
    assert!(e.message().contains("overwrite"), "{e}");
    assert_eq!(std::fs::read(rig.home().join("f.bin")).unwrap(), data);
    let reply = rig.upload(whole("f.bin", &other, true)).await.unwrap();
    assert_eq!(reply.sha256, sha_hex(&other));
    assert_eq!(std::fs::read(rig.home().join("f.bin")).unwrap(), other);

    // Hash mismatch: refused, no target, no partial left behind.
    let mut msgs = whole("bad.bin", &data, false);
    *msgs.last_mut().unwrap() = finish(&"AB".repeat(32), data.len() as u64);
    let e = rig.upload(msgs).await.unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{e}");
    assert!(e.message().contains(&"AB".repeat(32)), "{e}");
    assert!(e.message().contains(&sha_hex(&data)), "{e}");
    assert!(!rig.home().join("bad.bin").exists());
    assert!(!rig.home().join("bad.bin.partial").exists());
    // Length mismatch likewise (lower-case hash is accepted for the hash itself).
    let mut msgs = whole("bad.bin", &data, false);
    *msgs.last_mut().unwrap() = finish(&sha_hex(&data).to_lowercase(), 1);
    let e = rig.upload(msgs).await.unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{e}");
    assert!(!rig.home().join("bad.bin").exists());
    assert!(!rig.home().join("bad.bin.partial").exists());
    let mut msgs = whole("lower.bin", &data, false);
    *msgs.last_mut().unwrap() = finish(&sha_hex(&data).to_lowercase(), data.len() as u64);
    assert_eq!(rig.upload(msgs).await.unwrap().sha256, sha_hex(&data));

    // Free space: refused up front, nothing created.
    let msgs = vec![
        start("huge.bin", u64::MAX / 2, 0, false),
        finish(&sha_hex(&[]), 0),
    ];
    let e = rig.upload(msgs).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    assert!(e.message().contains(&(u64::MAX / 2).to_string()), "{e}");
    assert!(e.message().contains("free"), "{e}");
    assert!(!rig.home().join("huge.bin.partial").exists());

    // The first message must be UploadStart.
    let e = rig.upload(chunks(&data, 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");

    // Chunks must be contiguous.
    let mut msgs = whole("gap.bin", &data, false);
    if let Some(upload_request::Part::Chunk(c)) = &mut msgs[2].part {
        c.offset += 1;
    }
    let e = rig.upload(msgs).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("contiguous"), "{e}");
    assert!(!rig.home().join("gap.bin").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_upload_resumes() {
    let rig = Rig::start().await;
    let data = pattern(8 << 20, 3);
    let total = data.len() as u64;
    let half = data.len() / 2;
    let target = rig.home().join("r.bin");

    // The client's stream ends after half the chunks, without UploadFinish.
    let mut msgs = vec![start("r.bin", total, 0, false)];
    msgs.extend(chunks(&data[..half], 0));
    let e = rig.upload(msgs).await.unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e}");
    let state = rig.state("r.bin").await;
    assert_eq!(state.received_bytes, half as u64);
    assert!(!state.exists);
    assert!(!target.exists());

    // Resuming from anywhere else is refused, naming what is held.
    let mut msgs = vec![start("r.bin", total, half as u64 + 1, false)];
    msgs.extend(chunks(&data[half + 1..], half as u64 + 1));
    msgs.push(finish(&sha_hex(&data), total));
    let e = rig.upload(msgs).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(e.message().contains(&half.to_string()), "{e}");
    assert_eq!(rig.state("r.bin").await.received_bytes, half as u64);

    // Resume from what the tentacle holds: the hash covers the whole file.
    let mut msgs = vec![start("r.bin", total, half as u64, false)];
    msgs.extend(chunks(&data[half..], half as u64));
    msgs.push(finish(&sha_hex(&data), total));
    let reply = rig.upload(msgs).await.unwrap();
    assert_eq!(reply.length, total);
    assert_eq!(reply.sha256, sha_hex(&data));
    assert!(std::fs::read(&target).unwrap() == data);
    assert!(!partial_of(&target).exists());
    let state = rig.state("r.bin").await;
    assert!(state.exists && state.received_bytes == 0);

    // resume_from 0 starts over, discarding a partial file.
    let mut msgs = vec![start("s.bin", total, 0, false)];
    msgs.extend(chunks(&data[..CHUNK], 0));
    rig.upload(msgs).await.unwrap_err();
    assert_eq!(rig.state("s.bin").await.received_bytes, CHUNK as u64);
    let reply = rig
        .upload(whole("s.bin", &data[..1000], false))
        .await
        .unwrap();
    assert_eq!(reply.sha256, sha_hex(&data[..1000]));
    // Resuming with nothing held is refused.
    let mut msgs = vec![start("none.bin", total, 10, false)];
    msgs.push(finish(&sha_hex(&data), total));
    let e = rig.upload(msgs).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_cut_by_a_lost_connection_resumes_on_a_new_one() {
    let rig = Rig::start().await;
    let data = pattern(8 << 20, 5);
    let total = data.len() as u64;
    let half = data.len() / 2;

    // Feed the call through a channel, then kill the connection mid-upload.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut client = rig.conn.files();
    let call = tokio::spawn(async move {
        client
            .upload_file(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    let mut msgs = vec![start("cut.bin", total, 0, false)];
    msgs.extend(chunks(&data[..half], 0));
    for m in msgs {
        timeout(T, tx.send(m)).await.unwrap().unwrap();
    }
    rig.conn.close();
    let e = timeout(T, call).await.unwrap().unwrap().unwrap_err();
    assert!(octo_comms::is_retryable(&e), "{e}");
    drop(tx);

    // A new connection: ask what is held (waits for the cut upload to settle).
    let conn = timeout(T, rig.server.connect(&rig.endpoint))
        .await
        .unwrap()
        .unwrap();
    let state = timeout(
        T,
        conn.files().get_upload_state(UploadStateRequest {
            path: "cut.bin".into(),
        }),
    )
    .await
    .unwrap()
    .unwrap()
    .into_inner();
    let held = state.received_bytes;
    eprintln!("connection cut after sending {half} bytes; tentacle held {held}");
    assert!(held <= half as u64, "{held}");
    assert_eq!(
        std::fs::metadata(rig.home().join("cut.bin.partial"))
            .map(|m| m.len())
            .unwrap_or(0),
        held
    );

    let from = usize::try_from(held).unwrap();
    let mut msgs = vec![start("cut.bin", total, held, false)];
    msgs.extend(chunks(&data[from..], held));
    msgs.push(finish(&sha_hex(&data), total));
    let reply = timeout(T, conn.files().upload_file(tokio_stream::iter(msgs)))
        .await
        .unwrap()
        .unwrap()
        .into_inner();
    assert_eq!(reply.sha256, sha_hex(&data));
    assert!(std::fs::read(rig.home().join("cut.bin")).unwrap() == data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_stream_from_an_offset_with_the_whole_hash() {
    let rig = Rig::start().await;
    let data = pattern(1_000_000, 11);
    std::fs::write(rig.home().join("d.bin"), &data).unwrap();

    let d = rig.download("d.bin", 0).await.unwrap();
    assert_eq!(d.total_length, Some(data.len() as u64));
    assert!(d.data == data);
    assert_eq!(d.offsets[1] - d.offsets[0], CHUNK as u64);
    let f = d.finish.unwrap();
    assert_eq!(f.sha256, sha_hex(&data));
    assert_eq!(f.total_length, data.len() as u64);

    let d = rig.download("d.bin", 1000).await.unwrap();
    assert!(d.data == data[1000..]);
    assert_eq!(d.offsets[0], 1000);
    assert_eq!(d.finish.unwrap().sha256, sha_hex(&data));

    // At the end: no chunks, still the whole hash.
    let d = rig.download("d.bin", data.len() as u64).await.unwrap();
    assert!(d.data.is_empty() && d.offsets.is_empty());
    assert_eq!(d.finish.unwrap().sha256, sha_hex(&data));

    let e = rig
        .download("d.bin", data.len() as u64 + 1)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e}");
    let e = rig.download("missing.bin", 0).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
    assert!(e.message().contains("missing.bin"), "{e}");
    let e = rig.download("../d.bin", 0).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
}

/// Offsets beyond 32 bits, both ways, on sparse files (no real disk use). The
/// SHA-256 of 4.5 GiB is computed three times (download, resumed upload, and the
/// expected value here): ~5 s each in a debug build with ring's assembly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_beyond_4_gib() {
    let rig = Rig::start().await;
    const LEN: u64 = 4608 * MIB; // 4.5 GiB, a multiple of the 64-byte SHA-256 block
    let tail = pattern(MIB as usize, 13);

    // Expected hashes: LEN zeros (the download), LEN zeros + tail (the upload).
    let tail_copy = tail.clone();
    let expected = tokio::task::spawn_blocking(move || {
        let zeros = vec![0u8; 1 << 20];
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for _ in 0..LEN / MIB {
            ctx.update(&zeros);
        }
        let mut with_tail = ctx.clone();
        with_tail.update(&tail_copy);
        (hex(ctx.finish().as_ref()), hex(with_tail.finish().as_ref()))
    });

    let sparse = rig.home().join("sparse.bin");
    std::fs::File::create(&sparse)
        .unwrap()
        .set_len(LEN)
        .unwrap();
    let partial = rig.home().join("up.bin.partial");
    std::fs::File::create(&partial)
        .unwrap()
        .set_len(LEN)
        .unwrap();

    // Download only the last MiB.
    let conn = rig.conn.clone();
    let dl = tokio::spawn(async move { download(&conn, "sparse.bin", LEN - MIB).await });

    // Resume an upload held at 4.5 GiB with its last MiB.
    let state = rig.state("up.bin").await;
    assert_eq!(state.received_bytes, LEN);
    let total = LEN + MIB;
    let mut msgs = vec![start("up.bin", total, LEN, false)];
    msgs.extend(chunks(&tail, LEN));
    let (expected_dl, expected_up) = timeout(T, expected).await.unwrap().unwrap();
    msgs.push(finish(&expected_up, total));
    let reply = rig.upload(msgs).await.unwrap();
    assert_eq!(reply.length, total);
    assert_eq!(reply.sha256, expected_up);
    let up = rig.home().join("up.bin");
    assert_eq!(std::fs::metadata(&up).unwrap().len(), total);
    let mut last = vec![0u8; MIB as usize];
    std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(&up).unwrap(), &mut last, LEN)
        .unwrap();
    assert!(last == tail);
    assert!(!partial.exists());

    let d = timeout(T, dl).await.unwrap().unwrap().unwrap();
    assert_eq!(d.total_length, Some(LEN));
    assert_eq!(d.data.len() as u64, MIB);
    assert!(d.data.iter().all(|&b| b == 0));
    assert_eq!(d.offsets[0], LEN - MIB);
    assert!(d.offsets.iter().all(|&o| o > u64::from(u32::MAX)));
    let f = d.finish.unwrap();
    assert_eq!(f.total_length, LEN);
    assert_eq!(f.sha256, expected_dl);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capabilities_describe_the_tentacle() {
    let rig = Rig::start().await;
    let mut caps_client = rig.conn.capabilities();
    let pong = timeout(
        T,
        caps_client.ping(PingRequest {
            payload: b"are you there".to_vec(),
        }),
    )
    .await
    .unwrap()
    .unwrap()
    .into_inner();
    assert_eq!(pong.payload, b"are you there");

    let caps = || async {
        timeout(
            T,
            rig.conn
                .capabilities()
                .get_capabilities(GetCapabilitiesRequest {}),
        )
        .await
        .unwrap()
        .unwrap()
        .into_inner()
    };
    let c = caps().await;
    assert_eq!(c.tentacle_version, octo_agent::VERSION);
    assert_eq!(c.os, "linux");
    assert_eq!(c.arch, std::env::consts::ARCH);
    assert!(!c.hostname.is_empty());
    assert_eq!(c.instance_name, "Test");
    assert!(c.home_free_bytes > 0);
    assert_eq!(c.tool_version, "");
    let mut services: Vec<(String, u32)> = c
        .services
        .into_iter()
        .map(|s| (s.name, s.version))
        .collect();
    services.sort();
    let mut want: Vec<(String, u32)> = [
        octo_proto::service_names::SESSION,
        octo_proto::service_names::CAPABILITIES,
        octo_proto::service_names::SCRIPT,
        octo_proto::service_names::FILE,
        octo_proto::service_names::UPGRADE,
    ]
    .iter()
    .map(|n| (n.to_string(), 1))
    .collect();
    want.sort();
    assert_eq!(services, want);
    if Path::new("/etc/os-release").exists() {
        assert!(!c.os_version.is_empty());
    }

    let calamari = rig.home().join("Tools/calamari");
    let install = |v: &str, complete: bool| {
        let dir = calamari.join(v);
        std::fs::create_dir_all(&dir).unwrap();
        if complete {
            std::fs::write(dir.join(".complete"), b"").unwrap();
        }
    };
    install("1.2.3", true);
    assert_eq!(caps().await.tool_version, "1.2.3");
    install("1.9.0", true);
    install("1.10.0", true);
    install("2.0.0", false); // not complete: ignored
    install("latest", true); // not a version: ignored
    assert_eq!(caps().await.tool_version, "1.10.0");
    assert_eq!(installed_tool_version(&rig.ctx).as_deref(), Some("1.10.0"));

    // A home without Tools/calamari has no tool installed.
    let gone = AgentContext {
        home: rig.home().join("no-such-home"),
        ..rig.ctx.clone()
    };
    assert_eq!(installed_tool_version(&gone), None);
}
