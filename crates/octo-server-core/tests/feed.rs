//! The package feed refuses what calamari would refuse, whole: corrupt or
//! truncated archives (gzip, tar, zip and its CRCs) and entries that escape,
//! with a 400 naming the fault, and none of them is stored or becomes
//! `latest`. A lost race or a push cut midway leaves no file behind, and a
//! start removes what a dead server's pushes left.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Body, Server, T};
use futures_util::StreamExt;
use reqwest::Method;
use tokio::time::timeout;

/// One entry of a test archive.
enum Entry<'a> {
    File(&'a str, &'a [u8]),
    Symlink(&'a str, &'a str),
}

/// A tar.gz with the names written raw into the headers (so `..` and absolute
/// names go in as they are).
fn tar_gz(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::default(),
    ));
    for e in entries {
        let mut header = tar::Header::new_gnu();
        let (name, kind, size, link) = match e {
            Entry::File(n, data) => (*n, tar::EntryType::Regular, data.len(), None),
            Entry::Symlink(n, target) => (*n, tar::EntryType::Symlink, 0, Some(*target)),
        };
        {
            let raw = &mut header.as_old_mut().name;
            raw[..name.len()].copy_from_slice(name.as_bytes());
        }
        header.set_entry_type(kind);
        header.set_size(size as u64);
        header.set_mode(0o644);
        if let Some(t) = link {
            header.set_link_name(t).unwrap();
        }
        header.set_cksum();
        let data: &[u8] = match e {
            Entry::File(_, d) => d,
            Entry::Symlink(..) => &[],
        };
        builder.append(&header, data).unwrap();
    }
    builder.into_inner().unwrap().finish().unwrap()
}

fn zip(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, data) in entries {
        w.start_file(
            *name,
            zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Deflated),
        )
        .unwrap();
        w.write_all(data).unwrap();
    }
    w.finish().unwrap().into_inner()
}

/// Some files of text, compressible and not tiny.
fn app(version: &str) -> Vec<(String, Vec<u8>)> {
    (0..20)
        .map(|i| {
            (
                format!("site/page{i}.html"),
                format!("<p>version {version}, page {i}</p>\n")
                    .repeat(200)
                    .into_bytes(),
            )
        })
        .collect()
}

fn app_tar_gz(version: &str) -> Vec<u8> {
    let files = app(version);
    let entries: Vec<Entry<'_>> = files.iter().map(|(n, d)| Entry::File(n, d)).collect();
    tar_gz(&entries)
}

fn app_zip(version: &str) -> Vec<u8> {
    let files = app(version);
    let entries: Vec<(&str, &[u8])> = files.iter().map(|(n, d)| (n.as_str(), &d[..])).collect();
    zip(&entries)
}

/// The files in the feed's folder.
fn feed_files(data: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(data.join("packages"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

async fn push_raw(server: &Server, id: &str, version: &str, bytes: Vec<u8>) -> common::Reply {
    server
        .admin
        .call(
            Method::POST,
            &format!("/api/packages?package_id={id}&version={version}"),
            Body::Bytes(bytes),
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_or_unsafe_archives_are_refused_and_never_become_latest() {
    let server = Server::start().await;
    let good = push_raw(&server, "Acme.Web", "1.0.0", app_tar_gz("1.0.0"))
        .await
        .expect(201);
    let good_sha = good["package"]["sha256"].as_str().unwrap().to_string();

    let tgz = app_tar_gz("9");
    let z = app_zip("9");
    let mut flipped = z.clone();
    for b in &mut flipped[200..260] {
        *b ^= 0xFF;
    }
    let mut tgz_flipped = tgz.clone();
    let mid = tgz_flipped.len() / 2;
    tgz_flipped[mid] ^= 0xFF;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "9 bytes of fake gzip",
            vec![0x1f, 0x8b, 0x08, 0x00, 0, 0, 0, 0, 0],
            "corrupt or truncated",
        ),
        (
            "a truncated tar.gz",
            tgz[..tgz.len() / 2].to_vec(),
            "corrupt or truncated",
        ),
        (
            "a tar.gz without its last 8 bytes (the gzip trailer)",
            tgz[..tgz.len() - 8].to_vec(),
            "corrupt or truncated",
        ),
        ("a damaged tar.gz", tgz_flipped, "corrupt"),
        (
            "a truncated zip",
            z[..z.len() / 2].to_vec(),
            "not a readable zip archive",
        ),
        ("a zip with damaged data (CRC)", flipped, "corrupt"),
        (
            "an entry climbing out",
            tar_gz(&[Entry::File("../evil.sh", b"rm -rf /")]),
            "a path containing `..`",
        ),
        (
            "an absolute entry",
            tar_gz(&[Entry::File("/etc/cron.d/evil", b"* * * * * root sh")]),
            "an absolute path",
        ),
        (
            "a symlink to an absolute path",
            tar_gz(&[Entry::Symlink("etc", "/etc")]),
            "a symlink to the absolute path",
        ),
        (
            "a symlink out of the package",
            tar_gz(&[Entry::Symlink("a/up", "../../x")]),
            "resolves outside the package folder",
        ),
        (
            "a zip entry climbing out",
            zip(&[("..\\evil.bat", b"del")]),
            "a path containing `..`",
        ),
        (
            "neither format",
            b"just some text, not an archive".to_vec(),
            "neither a zip nor a tar.gz archive (first bytes: 6a 75 73 74)",
        ),
        (
            "an empty zip",
            b"PK\x05\x06".to_vec(),
            "neither a zip nor a tar.gz",
        ),
        (
            "nothing",
            Vec::new(),
            "neither a zip nor a tar.gz archive (first bytes: none)",
        ),
    ];
    for (i, (what, bytes, fault)) in cases.into_iter().enumerate() {
        let size = bytes.len();
        let version = format!("9.9.{i}");
        let r = push_raw(&server, "Acme.Web", &version, bytes).await;
        assert_eq!(r.status, 400, "{what}: {}", r.body);
        let e = r.error();
        assert!(
            e.contains(&format!("({size} bytes)")) && e.contains(fault),
            "{what}: wanted {fault:?} in {e}"
        );
        // Not stored, not latest, no file left.
        server
            .admin
            .get(&format!("/api/packages/Acme.Web/{version}"))
            .await
            .expect(404);
        let latest = server
            .admin
            .get("/api/packages/Acme.Web/latest")
            .await
            .expect(200);
        assert_eq!(latest["version"], "1.0.0", "{what}");
        assert_eq!(
            feed_files(&server.data),
            std::slice::from_ref(&good_sha),
            "{what}"
        );
    }

    // A good zip is taken, and is latest.
    push_raw(&server, "Acme.Web", "2.0.0", app_zip("2.0.0"))
        .await
        .expect(201);
    let latest = server
        .admin
        .get("/api/packages/Acme.Web/latest")
        .await
        .expect(200);
    assert_eq!(
        (latest["version"].as_str(), latest["format"].as_str()),
        (Some("2.0.0"), Some("zip"))
    );
    assert_eq!(feed_files(&server.data).len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_race_leaves_no_file_behind() {
    let server = Server::start().await;
    // Eight pushes of the same ID and version at once, each with other content.
    let pushes = (0..8).map(|i| {
        let admin = server.admin.clone();
        let body = app_tar_gz(&format!("racer {i}"));
        tokio::spawn(async move {
            admin
                .call(
                    Method::POST,
                    "/api/packages?package_id=Acme.Race&version=1.0.0",
                    Body::Bytes(body),
                )
                .await
        })
    });
    let mut statuses = Vec::new();
    for p in pushes.collect::<Vec<_>>() {
        let r = timeout(T, p).await.unwrap().unwrap();
        if r.status == 409 {
            assert!(
                r.error().contains("already exists") || r.error().contains("meanwhile"),
                "{}",
                r.body
            );
        }
        statuses.push(r.status);
    }
    statuses.sort_unstable();
    assert_eq!(statuses, [201, 409, 409, 409, 409, 409, 409, 409]);
    let stored = server
        .admin
        .get("/api/packages/Acme.Race/1.0.0")
        .await
        .expect(200);
    assert_eq!(
        feed_files(&server.data),
        [stored["sha256"].as_str().unwrap().to_string()],
        "only the winner's file"
    );
}

/// Waits (bounded) until `cond` holds of the feed's files.
async fn until_files(data: &Path, what: &str, cond: impl Fn(&[String]) -> bool) {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let files = feed_files(data);
        if cond(&files) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: still {files:?} after {T:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_cut_midway_leaves_no_file_and_a_start_cleans_what_a_dead_server_left() {
    let mut server = Server::start().await;
    // Half an archive, then the client goes away.
    let archive = app_tar_gz("cut");
    let half = archive[..archive.len() / 2].to_vec();
    let (cut, cut_rx) = tokio::sync::oneshot::channel::<()>();
    let body = futures_util::stream::once(async move { Ok::<_, std::io::Error>(half) }).chain(
        futures_util::stream::once(async move {
            let _ = cut_rx.await;
            Err(std::io::Error::other("client gone"))
        }),
    );
    let req = server
        .admin
        .http
        .post(format!(
            "{}/api/packages?package_id=Acme.Cut&version=1.0.0",
            server.base
        ))
        .header("X-Octopus-ApiKey", server.admin.key.clone().unwrap())
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(body));
    let push = tokio::spawn(async move { req.send().await });
    // The push is being received...
    until_files(&server.data, "the upload started", |f| {
        f.iter().any(|n| n.starts_with(".incoming-"))
    })
    .await;
    // ...and then cut.
    cut.send(()).unwrap();
    assert!(timeout(T, push).await.unwrap().unwrap().is_err());
    until_files(&server.data, "the cut upload removed", <[String]>::is_empty).await;
    server
        .admin
        .get("/api/packages/Acme.Cut/1.0.0")
        .await
        .expect(404);

    // A server that dies mid-push leaves its .incoming file; the next start removes it.
    let data = server.data.clone();
    server.stop().await;
    let stale: PathBuf = data.join("packages").join(".incoming-left-by-a-crash");
    std::fs::write(&stale, b"half a package").unwrap();
    let running = timeout(
        T,
        octo_server_core::start(&octo_server_core::RunArgs::loopback(&data)),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(!stale.exists(), "removed at start");
    timeout(T, running.stop()).await.unwrap();
}

/// Downloads a package's file whole (status 200 checked).
async fn download(
    server: &Server,
    id: &str,
    version: &str,
) -> (Vec<u8>, reqwest::header::HeaderMap) {
    let resp = timeout(
        T,
        server
            .admin
            .http
            .get(format!(
                "{}/api/packages/{id}/{version}/download",
                server.base
            ))
            .header("X-Octopus-ApiKey", server.admin.key.clone().unwrap())
            .send(),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(resp.status().as_u16(), 200, "download of {id} {version}");
    let headers = resp.headers().clone();
    let bytes = timeout(T, resp.bytes()).await.unwrap().unwrap();
    (bytes.to_vec(), headers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_package_downloads_byte_identical_from_the_database() {
    let mut server = Server::start().await;
    let zip = app_zip("1.0.0");
    let pushed = push_raw(&server, "Acme.Web", "1.0.0", zip.clone())
        .await
        .expect(201);
    let sha = pushed["package"]["sha256"].as_str().unwrap().to_string();
    let (got, headers) = download(&server, "Acme.Web", "1.0.0").await;
    assert_eq!(got, zip);
    assert_eq!(headers["etag"], format!("\"{sha}\"").as_str());
    assert_eq!(headers["content-length"], zip.len().to_string().as_str());
    // Read from the database, not from this node's copy.
    std::fs::remove_file(server.data.join("packages").join(&sha)).unwrap();
    let (got, _) = download(&server, "Acme.Web", "latest").await;
    assert_eq!(got, zip);
    // More than one chunk (1 MiB): a big, incompressible file.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let noise: Vec<u8> = (0..2_500_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    let big = zip_of(&[("big.bin", &noise)]);
    assert!(big.len() > 2 << 20, "{} bytes", big.len());
    push_raw(&server, "Acme.Big", "1.0.0", big.clone())
        .await
        .expect(201);
    assert_eq!(download(&server, "Acme.Big", "1.0.0").await.0, big);
    // Deleted: the download is a 404 like the package.
    server
        .admin
        .delete("/api/packages/Acme.Web/1.0.0")
        .await
        .expect(200);
    let gone = server
        .admin
        .get("/api/packages/Acme.Web/1.0.0/download")
        .await;
    assert_eq!(gone.status, 404, "{}", gone.body);
    server.stop().await;
}

fn zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
    zip(entries)
}

/// A data directory from before package content lived in the database (files
/// under DATA/packages, rows without content) is imported at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn package_files_of_an_older_server_are_imported_into_the_database_at_start() {
    use octo_store::Store;
    let mut server = Server::start().await;
    let web = app_tar_gz("1.0.0");
    let api = app_zip("2.0.0");
    let unused = app_zip("3.0.0");
    let web_sha = push_raw(&server, "Acme.Web", "1.0.0", web.clone())
        .await
        .expect(201)["package"]["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    let api_sha = push_raw(&server, "Acme.Api", "2.0.0", api.clone())
        .await
        .expect(201)["package"]["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    let data = server.data.clone();
    server.stop().await;
    // Make it an old feed: drop the content from the database, keep the rows
    // and the files; one file is damaged (its name is not its hash), one
    // belongs to no package.
    let unused_sha = {
        use sha2::Digest;
        let d = sha2::Sha256::digest(&unused);
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    std::fs::write(data.join("packages").join(&unused_sha), &unused).unwrap();
    {
        let store = octo_store_sqlite::SqliteStore::open_existing(&data.join("octopus.db"))
            .await
            .unwrap();
        for (id, version) in [("Acme.Web", "1.0.0"), ("Acme.Api", "2.0.0")] {
            let p = store.delete_package(1, id, version).await.unwrap();
            assert!(store
                .delete_unused_package_content(&p.sha256)
                .await
                .unwrap());
            let again = octo_store::NewPackage {
                space_id: p.space_id,
                package_id: p.package_id,
                version: p.version,
                format: p.format,
                sha256: p.sha256,
                size: p.size,
                file_name: p.file_name,
            };
            store.put_package(&again, false, 1).await.unwrap();
        }
        assert!(store.package_content(&web_sha).await.unwrap().is_none());
        store.close().await;
    }
    let api_file = data.join("packages").join(&api_sha);
    std::fs::write(&api_file, b"not the package any more").unwrap();
    assert_eq!(feed_files(&data).len(), 3);

    let running = timeout(
        T,
        octo_server_core::start(&octo_server_core::RunArgs::loopback(&data)),
    )
    .await
    .unwrap()
    .unwrap();
    let base = format!("http://{}", running.api_addr);
    server.admin = common::Api::new(&base, server.admin.key.clone());
    server.base = base;
    server.running = Some(running);
    let restarted = &server;
    // Imported and downloadable, from the database.
    std::fs::remove_file(data.join("packages").join(&web_sha)).unwrap();
    assert_eq!(download(restarted, "Acme.Web", "1.0.0").await.0, web);
    // The unused file is gone; the damaged one is left for a person, and its
    // package says what to do.
    assert!(!data.join("packages").join(&unused_sha).exists());
    assert!(api_file.exists());
    let damaged = restarted
        .admin
        .get("/api/packages/Acme.Api/2.0.0/download")
        .await;
    assert_eq!(damaged.status, 500, "{}", damaged.body);
    assert!(
        damaged.error().contains("push it again"),
        "{}",
        damaged.error()
    );
    // Pushing it again restores it.
    push_raw(restarted, "Acme.Api", "2.0.0", api.clone())
        .await
        .expect(200);
    assert_eq!(download(restarted, "Acme.Api", "2.0.0").await.0, api);
    server.stop().await;
}
