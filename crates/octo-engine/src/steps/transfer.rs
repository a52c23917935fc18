//! Files to a tentacle through its file service: the deployment tool
//! ([`ensure_tool`]) and packages ([`transfer`]), both verified by SHA-256 on
//! the tentacle before they are moved into place, and resumed from the bytes
//! it holds after an interruption.

use std::path::{Path, PathBuf};
use std::time::Duration;

use octo_comms::Connection;
use octo_proto::v1::{
    upload_request, FileChunk, UploadFinish, UploadRequest, UploadStart, UploadStateRequest,
};
use octo_store::Package;
use tokio::io::AsyncReadExt;
use tokio::time::Instant;

use crate::context::StepContext;
use crate::tool::ToolBuild;

/// Upload chunk size (well under tonic's 4 MiB message limit).
const CHUNK: usize = 256 << 10;
/// Bound on single unary file calls.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// A phase failure: what happened, and whether trying again may help.
#[derive(Debug)]
pub(crate) struct PhaseError {
    pub message: String,
    pub retryable: bool,
}

impl PhaseError {
    pub(crate) fn fatal(message: impl Into<String>) -> Self {
        PhaseError {
            message: message.into(),
            retryable: false,
        }
    }

    pub(crate) fn from_status(what: &str, status: &tonic::Status) -> Self {
        PhaseError {
            message: format!("{what}: {} ({:?})", status.message(), status.code()),
            retryable: octo_comms::is_retryable(status),
        }
    }
}

/// Makes sure the machine has the server's tool version, verified and marked
/// complete. Returns whether it was pushed now.
pub(crate) async fn ensure_tool(
    ctx: &StepContext,
    conn: &Connection,
    tool: &ToolBuild,
) -> Result<bool, PhaseError> {
    let binary = upload_state(conn, &tool.remote_path()).await?;
    let marker = upload_state(conn, &tool.remote_marker()).await?;
    if binary.exists && binary.sha256.eq_ignore_ascii_case(&tool.sha256) && marker.exists {
        ctx.say(format!("deployment tool {} is installed", tool.version))
            .await;
        return Ok(false);
    }
    ctx.say(format!(
        "pushing deployment tool {} ({:.1} MiB)",
        tool.version,
        tool.size as f64 / (1 << 20) as f64
    ))
    .await;
    let started = Instant::now();
    let resume_from = if binary.exists {
        0
    } else {
        binary.received_bytes
    };
    upload_file(
        conn,
        &tool.path,
        &tool.remote_path(),
        &tool.sha256,
        tool.size,
        resume_from,
        0o755,
    )
    .await?;
    // Only now, with the binary verified in place, does the version count.
    let marker_body = format!("{}\n", tool.sha256);
    upload_bytes(conn, &tool.remote_marker(), marker_body.into_bytes()).await?;
    ctx.say(format!(
        "deployment tool {} installed in {:.1} s (SHA-256 verified)",
        tool.version,
        started.elapsed().as_secs_f32()
    ))
    .await;
    Ok(true)
}

/// Puts the package in the machine's `Files/` unless it is there; returns its
/// path relative to the tentacle's home.
pub(crate) async fn transfer(
    ctx: &StepContext,
    conn: &Connection,
    local: &Path,
    package: &Package,
) -> Result<String, PhaseError> {
    let remote = format!(
        "Files/{}@{}@{}.{}",
        package.package_id,
        package.version,
        package.sha256.to_ascii_lowercase(),
        package.format
    );
    let state = upload_state(conn, &remote).await?;
    let size = u64::try_from(package.size).unwrap_or(0);
    let mib = size as f64 / (1 << 20) as f64;
    if state.exists && state.sha256.eq_ignore_ascii_case(&package.sha256) {
        ctx.say(format!(
            "package {} {} found in cache ({mib:.1} MiB, SHA-256 matches)",
            package.package_id, package.version
        ))
        .await;
        return Ok(remote);
    }
    let resume_from = if state.exists {
        0
    } else {
        state.received_bytes
    };
    let started = Instant::now();
    if resume_from > 0 && resume_from < size {
        ctx.say(format!(
            "resuming the transfer of {} {} at {:.1} of {mib:.1} MiB",
            package.package_id,
            package.version,
            resume_from as f64 / (1 << 20) as f64
        ))
        .await;
    } else {
        ctx.say(format!(
            "uploading package {} {} ({mib:.1} MiB)",
            package.package_id, package.version
        ))
        .await;
    }
    let resume_from = if resume_from <= size { resume_from } else { 0 };
    upload_file(conn, local, &remote, &package.sha256, size, resume_from, 0).await?;
    let secs = started.elapsed().as_secs_f64().max(1e-6);
    let moved = (size - resume_from) as f64 / (1 << 20) as f64;
    ctx.say(format!(
        "package uploaded in {secs:.2} s ({:.0} MiB/s, SHA-256 verified by the tentacle)",
        moved / secs
    ))
    .await;
    Ok(remote)
}

pub(crate) async fn upload_state(
    conn: &Connection,
    path: &str,
) -> Result<octo_proto::v1::UploadStateReply, PhaseError> {
    let mut client = conn.files();
    match tokio::time::timeout(
        CALL_TIMEOUT,
        client.get_upload_state(UploadStateRequest { path: path.into() }),
    )
    .await
    {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(PhaseError::from_status(
            &format!("asking the tentacle about {path}"),
            &s,
        )),
        Err(_) => Err(PhaseError {
            message: format!(
                "the tentacle did not answer about {path} within {} s",
                CALL_TIMEOUT.as_secs()
            ),
            retryable: true,
        }),
    }
}

/// Uploads a local file from `resume_from` (the tentacle verifies the whole
/// file's SHA-256 before it moves it into place).
pub(crate) async fn upload_file(
    conn: &Connection,
    local: &Path,
    remote: &str,
    sha256: &str,
    size: u64,
    resume_from: u64,
    mode: u32,
) -> Result<(), PhaseError> {
    let mut file = tokio::fs::File::open(local).await.map_err(|e| {
        PhaseError::fatal(format!(
            "cannot read {} on the server: {e}",
            local.display()
        ))
    })?;
    if resume_from > 0 {
        use tokio::io::AsyncSeekExt;
        file.seek(std::io::SeekFrom::Start(resume_from))
            .await
            .map_err(|e| PhaseError::fatal(format!("cannot seek in {}: {e}", local.display())))?;
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<UploadRequest>(8);
    let start = UploadRequest {
        part: Some(upload_request::Part::Start(UploadStart {
            path: remote.into(),
            total_length: size,
            resume_from,
            overwrite: true,
            mode,
        })),
    };
    let local_path: PathBuf = local.to_path_buf();
    let finish_sha = sha256.to_string();
    let reader = tokio::spawn(async move {
        if tx.send(start).await.is_err() {
            return Ok(());
        }
        let mut offset = resume_from;
        loop {
            let mut buf = vec![0u8; CHUNK];
            let n = file.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            buf.truncate(n);
            let chunk = UploadRequest {
                part: Some(upload_request::Part::Chunk(FileChunk {
                    offset,
                    data: buf.into(),
                })),
            };
            offset += n as u64;
            if tx.send(chunk).await.is_err() {
                return Ok(());
            }
        }
        let finish = UploadRequest {
            part: Some(upload_request::Part::Finish(UploadFinish {
                sha256: finish_sha,
                total_length: offset,
            })),
        };
        let _ = tx.send(finish).await;
        Ok::<(), std::io::Error>(())
    });
    let mut client = conn.files();
    let reply = client
        .upload_file(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    match reader.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            return Err(PhaseError::fatal(format!(
                "reading {} on the server failed: {e}",
                local_path.display()
            )))
        }
        Err(e) => return Err(PhaseError::fatal(format!("the upload reader failed: {e}"))),
    }
    reply
        .map(|_| ())
        .map_err(|s| PhaseError::from_status(&format!("uploading {remote}"), &s))
}

/// Uploads a small file from memory (overwriting).
async fn upload_bytes(conn: &Connection, remote: &str, data: Vec<u8>) -> Result<(), PhaseError> {
    use sha2::{Digest, Sha256};
    let sha = crate::tool::hex_upper(&Sha256::digest(&data));
    let total = data.len() as u64;
    let parts = vec![
        UploadRequest {
            part: Some(upload_request::Part::Start(UploadStart {
                path: remote.into(),
                total_length: total,
                resume_from: 0,
                overwrite: true,
                mode: 0,
            })),
        },
        UploadRequest {
            part: Some(upload_request::Part::Chunk(FileChunk {
                offset: 0,
                data: data.into(),
            })),
        },
        UploadRequest {
            part: Some(upload_request::Part::Finish(UploadFinish {
                sha256: sha,
                total_length: total,
            })),
        },
    ];
    let mut client = conn.files();
    client
        .upload_file(tokio_stream::iter(parts))
        .await
        .map(|_| ())
        .map_err(|s| PhaseError::from_status(&format!("uploading {remote}"), &s))
}
