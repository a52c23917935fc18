//! The built-in package feed's routes: `POST/GET/DELETE /api/packages...` and
//! `GET /api/packages/{id}/{version}/download` (its rules are in
//! [`crate::feed`], where content lives in [`octo_engine::PackageFiles`]).
//!
//! A pushed file is streamed to `DATA/packages/.incoming-*` (0600) while it is
//! hashed and checked whole, as calamari would extract it: a tar.gz as it
//! streams in (gzip checksums, tar structure, every entry), a zip once complete
//! (central directory, every entry's CRC-32, every entry); any fault is refused
//! with 400 naming it, and the file is deleted (the database never sees it).
//! Then its content is streamed into the database chunk by chunk (unless the
//! database has that content already), pending; the package row is recorded;
//! and the content is completed, its SHA-256 checked against the one the
//! push computed: only complete content is ever read, by any node. The row
//! goes in before the content is completed so that a node deleting the last
//! other package with this content meanwhile sees the row and keeps the
//! content (see `Store::delete_unused_package_content`). The file is kept as
//! this node's cache copy, `DATA/packages/<sha256>`. The store holds ID,
//! version, format, size, SHA-256 and upload time; the same ID and version
//! with different content is refused (409) unless `replace=true`. Content is
//! deleted when no package row uses its hash any more. On one node, placing
//! content, recording its row and deleting unused content happen under the
//! feed's lock ([`PackageFiles::lock`](octo_engine::PackageFiles::lock)). An
//! interrupted push leaves its `.incoming-*` file and pending upload only
//! when the server itself dies; the next start removes them.
//!
//! IDs and versions come from the query, else from the original's file naming
//! `ID.VERSION.ext` (e.g. `Acme.Web.1.2.3-beta.1.tar.gz`); versions are semantic
//! versions (`1.2` is read as `1.2.0`), and "latest" means the highest by
//! semantic-version order.
//!
//! The handlers are thin wrappers of service functions the portal calls too:
//! [`push`], [`packages_of`], [`find`], [`remove_package`].

use std::path::{Path, PathBuf};

use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Extension, Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use bytes::Bytes;
use futures_util::StreamExt;
use octo_engine::feed::{incoming_name, ChunkReader, ContentWriter};
use octo_store::{NewPackage, Package, Store, StoreError, PACKAGE_CHUNK_SIZE};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use utoipa::IntoParams;

use octo_api_types::{ErrorBody, Permission, PushReply, Space};
use octo_store::now_ms;

use super::guard::{delete, get, post, Route};
use super::ApiError;
use crate::authz::{Access, Caller, RequestSpace};
use crate::feed::{
    check_package_id, check_zip_file, first_bytes, parse_file_name, parse_version, ratio_fault,
    sniff_format, TarGzCheck,
};
use crate::state::AppState;

/// The feed's routes.
pub(super) fn routes() -> Vec<Route> {
    use Permission as P;
    let mut push = post(
        "/api/packages",
        Access::Space(P::BuiltInFeedPush),
        push_package,
    );
    push.handler = push.handler.layer(DefaultBodyLimit::disable());
    vec![
        get("/api/packages", Access::Space(P::FeedView), list_packages),
        push,
        get(
            "/api/packages/{id}/{version}",
            Access::Space(P::FeedView),
            get_package,
        ),
        get(
            "/api/packages/{id}/{version}/download",
            Access::Space(P::FeedView),
            download_package,
        ),
        delete(
            "/api/packages/{id}/{version}",
            Access::Space(P::BuiltInFeedAdminister),
            delete_package,
        ),
    ]
}

/// The highest version of a package ID (semantic-version order).
pub async fn latest(
    store: &dyn Store,
    space_id: i64,
    package_id: &str,
) -> Result<Package, ApiError> {
    let all = store.list_packages(space_id, Some(package_id)).await?;
    all.into_iter()
        .filter_map(|p| parse_version(&p.version).ok().map(|v| (v, p)))
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, p)| p)
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "package '{package_id}' is not in the feed; push it with `octopus package push FILE`"
            ))
        })
}

/// One version ("latest" allowed), 404 naming what exists otherwise.
pub async fn find(
    store: &dyn Store,
    space_id: i64,
    package_id: &str,
    version: Option<&str>,
) -> Result<Package, ApiError> {
    match version.map(str::trim).filter(|v| !v.is_empty()) {
        None | Some("latest") => latest(store, space_id, package_id).await,
        Some(v) => {
            let wanted = parse_version(v).map_err(ApiError::bad_request)?;
            let all = store.list_packages(space_id, Some(package_id)).await?;
            if let Some(p) = all
                .iter()
                .find(|p| parse_version(&p.version).is_ok_and(|pv| pv == wanted))
            {
                return Ok(p.clone());
            }
            let known: Vec<&str> = all.iter().map(|p| p.version.as_str()).collect();
            Err(ApiError::not_found(if known.is_empty() {
                format!("package '{package_id}' is not in the feed; push it with `octopus package push FILE`")
            } else {
                format!(
                    "package '{package_id}' has no version {v}; the feed has {}",
                    known.join(", ")
                )
            }))
        }
    }
}

/// Query of `POST /api/packages`.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PushQuery {
    /// The package ID (default: from `file_name`).
    pub package_id: Option<String>,
    /// The version (default: from `file_name`).
    pub version: Option<String>,
    /// The name of the pushed file, e.g. `Acme.Web.1.2.3.zip`.
    pub file_name: Option<String>,
    /// Replace an existing ID and version whose content differs.
    #[serde(default)]
    pub replace: bool,
}

/// Pushes a package: the request body is the file (zip or tar.gz).
#[utoipa::path(
    post,
    path = "/api/packages",
    tag = "packages",
    params(PushQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "The package file"),
    responses(
        (status = 201, description = "Stored (created or replaced)", body = PushReply),
        (status = 200, description = "The same ID, version and content were there already", body = PushReply),
        (status = 400, description = "Not a zip or tar.gz, a corrupt or truncated archive, an entry calamari would refuse (absolute, `..`, links out, devices, limits), or no ID/version (the message says which)", body = ErrorBody),
        (status = 409, description = "That ID and version exist with other content; push with replace=true", body = ErrorBody),
    )
)]
pub(crate) async fn push_package(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(RequestSpace(space)): Extension<RequestSpace>,
    q: Result<Query<PushQuery>, QueryRejection>,
    body: Body,
) -> Result<impl IntoResponse, ApiError> {
    let Query(q) = q?;
    let (status, reply) = push(&s, &caller, &space, &q, body).await?;
    Ok((status, Json(reply)))
}

/// As `POST /api/packages`, for the portal too: streams `body` (the file) into
/// the feed; answers 201 (created or replaced) or 200 (the same content was
/// there already) with what was stored.
pub async fn push(
    s: &AppState,
    caller: &Caller,
    space: &Space,
    q: &PushQuery,
    body: Body,
) -> Result<(StatusCode, PushReply), ApiError> {
    // Name first, so a bad request is refused before the upload.
    let from_name = q.file_name.as_deref().map(parse_file_name);
    let (package_id, version) = match (&q.package_id, &q.version) {
        (Some(id), Some(v)) => (
            id.trim().to_string(),
            parse_version(v).map_err(ApiError::bad_request)?,
        ),
        _ => match from_name {
            Some(Ok((id, v, _))) => (
                q.package_id.clone().unwrap_or(id).trim().to_string(),
                match &q.version {
                    Some(v) => parse_version(v).map_err(ApiError::bad_request)?,
                    None => v,
                },
            ),
            Some(Err(e)) => return Err(ApiError::bad_request(e)),
            None => {
                return Err(ApiError::bad_request(
                    "give `package_id` and `version`, or a `file_name` like Acme.Web.1.2.3.zip",
                ))
            }
        },
    };
    check_package_id(&package_id).map_err(ApiError::bad_request)?;
    if q.replace {
        caller.require_throughout(Permission::BuiltInFeedAdminister, space)?;
    }
    let dir = s.packages.dir().to_path_buf();
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
    // Removed on every way out but the rename into place.
    let incoming = Incoming(dir.join(incoming_name()));
    let Received {
        sha256,
        size,
        format,
    } = receive(body, &incoming.0).await?;
    let version = version.to_string();
    let file_name = q
        .file_name
        .clone()
        .unwrap_or_else(|| format!("{package_id}.{version}.{format}"));
    // From here to the row, one push or delete at a time (see the module docs).
    let _feed = s.packages.lock().await;
    // Same ID, version and content: nothing to do.
    let mut repair = None;
    if let Some(existing) = s.store.package(space.id, &package_id, &version).await? {
        if existing.sha256.eq_ignore_ascii_case(&sha256) {
            if s.packages.content(&sha256).await?.is_some() {
                return Ok((
                    StatusCode::OK,
                    PushReply {
                        package: existing,
                        outcome: "unchanged".into(),
                    },
                ));
            }
            // A push that died between row and content, or a feed never
            // imported: this push supplies the content.
            repair = Some(existing);
        } else if !q.replace {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "package {package_id} {version} already exists with different content (SHA-256 {} vs {sha256} now); push a new version, or replace it with --replace",
                    existing.sha256
                ),
            ));
        }
    }
    let new = NewPackage {
        space_id: space.id,
        package_id: package_id.clone(),
        version: version.clone(),
        format: format.into(),
        sha256: sha256.clone(),
        size: i64::try_from(size).unwrap_or(i64::MAX),
        file_name,
    };
    // The content, written pending unless the database has it already.
    let writer = if s.packages.content(&sha256).await?.is_some() {
        None
    } else {
        Some(write_pending(s, &incoming.0).await?)
    };
    let repaired = repair.is_some();
    let (package, previous) = if let Some(existing) = repair {
        // The row is there; only its content was missing.
        (existing, None)
    } else {
        match s.store.put_package(&new, q.replace, now_ms()).await {
            Ok(r) => r,
            // The pending content is dropped with its writer.
            Err(StoreError::Conflict { .. }) => return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("package {package_id} {version} was pushed by someone else meanwhile; push again with --replace to replace it"),
            )),
            Err(e) => return Err(e.into()),
        }
    };
    let completed = match writer {
        Some(w) => w.finish(Some(&sha256), &incoming.0).await,
        // The content was there before the row; a node that deleted it
        // since (its last other user gone) did so before the row: write it.
        None => s.packages.store_file(&incoming.0, Some(&sha256)).await,
    };
    if let Err(e) = completed {
        return Err(ApiError::internal(format!(
            "package {package_id} {version} is recorded but its content could not be stored in the database: {e}; push it again"
        )));
    }
    // Kept as this node's cache copy.
    let target = s.packages.by_sha256(&sha256);
    if !tokio::fs::try_exists(&target).await.unwrap_or(false) {
        if let Err(e) = tokio::fs::rename(&incoming.0, &target).await {
            tracing::warn!(
                "cannot keep the package as {}: {e} (it is read from the database instead)",
                target.display()
            );
        }
    }
    if repaired {
        tracing::info!(
            "package {} {}: its missing content was restored by a push",
            package.package_id,
            package.version
        );
        return Ok((
            StatusCode::OK,
            PushReply {
                package,
                outcome: "unchanged".into(),
            },
        ));
    }
    if let Some(old) = &previous {
        s.packages.remove_if_unused(&old.sha256).await;
    }
    tracing::info!(
        "package {} {} pushed to space '{}' ({size} bytes, SHA-256 {sha256})",
        package.package_id,
        package.version,
        space.name
    );
    let action = if previous.is_some() {
        "replaced"
    } else {
        "created"
    };
    s.audit(
        caller,
        Some(space),
        action,
        "package",
        &format!("{} {}", package.package_id, package.version),
        format!("{size} bytes, SHA-256 {sha256}"),
    )
    .await;
    Ok((
        StatusCode::CREATED,
        PushReply {
            package,
            outcome: if previous.is_some() {
                "replaced"
            } else {
                "created"
            }
            .into(),
        },
    ))
}

/// A pushed file not (yet) in its place; deleted when dropped (after a rename
/// into place there is nothing left to delete).
struct Incoming(PathBuf);

impl Drop for Incoming {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("cannot delete {}: {e}", self.0.display());
            }
        }
    }
}

/// A pushed file, received whole and checked.
struct Received {
    /// Lower-case hex.
    sha256: String,
    size: u64,
    /// "zip" or "tar.gz".
    format: &'static str,
}

/// How the check of a pushed file stands while it streams in.
enum Check {
    /// Fewer than 4 bytes so far: the format is not known yet.
    Undecided(Vec<Bytes>),
    /// A tar.gz, checked as it streams.
    TarGz(TarGzCheck),
    /// A zip, checked once complete.
    Zip,
    /// A tar.gz whose check read all it reads before the body ended (what
    /// follows is stored but, as calamari ignores it, not checked).
    Checked(octo_calamari::extract::Counts),
    /// Refused (why); the rest of the body is read and dropped, so the client
    /// gets the answer rather than a broken connection.
    Refused(String),
}

/// Streams the body to `path` (0600), hashing it and checking it whole (see
/// the module docs); a fault is a 400 naming it.
async fn receive(body: Body, path: &Path) -> Result<Received, ApiError> {
    use axum::body::HttpBody;
    let announced = body.size_hint().exact();
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .await
        .map_err(|e| anyhow::anyhow!("creating {}: {e}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut check = Check::Undecided(Vec::new());
    let mut stream = body.into_data_stream();
    let mut ended = false;
    while !ended {
        let chunk = match stream.next().await {
            Some(chunk) => chunk.map_err(|e| {
                ApiError::bad_request(format!(
                    "the upload was interrupted after {size} bytes: {e}"
                ))
            })?,
            None => {
                ended = true;
                Bytes::new()
            }
        };
        size += chunk.len() as u64;
        if matches!(check, Check::Refused(_)) {
            continue;
        }
        hasher.update(&chunk);
        file.write_all(&chunk)
            .await
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
        // Decide the format on the first 4 bytes (or at the end, when shorter).
        if let Check::Undecided(pending) = &mut check {
            if !chunk.is_empty() {
                pending.push(chunk.clone());
            }
            let head: Vec<u8> = pending
                .iter()
                .flat_map(|b| b.iter().copied())
                .take(4)
                .collect();
            if head.len() < 4 && !ended {
                continue;
            }
            let pending = std::mem::take(pending);
            check = match sniff_format(&head) {
                Some("zip") => Check::Zip,
                Some(_) => {
                    let mut c = TarGzCheck::start(announced);
                    for b in pending {
                        c.feed(b).await;
                    }
                    Check::TarGz(c)
                }
                None => Check::Refused(format!(
                    "it is neither a zip nor a tar.gz archive (first bytes: {})",
                    if head.is_empty() {
                        "none".to_string()
                    } else {
                        first_bytes(&head)
                    }
                )),
            };
            continue;
        }
        let early_end = match &mut check {
            Check::TarGz(c) => !chunk.is_empty() && !c.feed(chunk).await,
            _ => false,
        };
        if early_end {
            // The check ended early: a fault (refuse now) or it read all it reads.
            if let Check::TarGz(c) = std::mem::replace(&mut check, Check::Zip) {
                check = match c.finish().await {
                    Err(why) => Check::Refused(why),
                    Ok(counts) => Check::Checked(counts),
                };
            }
        }
    }
    let (format, counts) = match check {
        Check::Refused(why) => return Err(refused(size, &why)),
        Check::Undecided(_) => return Err(refused(size, "it is empty")),
        Check::TarGz(c) => (
            "tar.gz",
            c.finish()
                .await
                .map_err(|why: String| refused(size, &why))?,
        ),
        Check::Checked(counts) => ("tar.gz", counts),
        Check::Zip => {
            file.flush()
                .await
                .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
            let p = path.to_path_buf();
            let verdict = tokio::task::spawn_blocking(move || check_zip_file(&p, size))
                .await
                .map_err(|e| anyhow::anyhow!("checking the zip: {e}"))?;
            ("zip", verdict.map_err(|why: String| refused(size, &why))?)
        }
    };
    if announced.is_none() {
        if let Some(why) = ratio_fault(&counts, size) {
            return Err(refused(size, &why));
        }
    }
    file.sync_all()
        .await
        .map_err(|e| anyhow::anyhow!("flushing {}: {e}", path.display()))?;
    let sha256: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(Received {
        sha256,
        size,
        format,
    })
}

/// The 400 for a pushed file that is not a package calamari would deploy.
fn refused(size: u64, why: &str) -> ApiError {
    ApiError::bad_request(format!(
        "the pushed file ({size} bytes) is not a package that can be deployed: {why}"
    ))
}

/// Streams a received file into the database as pending content (completed
/// by the caller once the package row is recorded).
async fn write_pending(s: &AppState, path: &Path) -> Result<ContentWriter, ApiError> {
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))?;
    let mut writer = s.packages.writer().await?;
    let mut buf = vec![0u8; PACKAGE_CHUNK_SIZE];
    loop {
        let n = file
            .read(&mut buf)
            .await
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        if n == 0 {
            return Ok(writer);
        }
        writer.write(&buf[..n]).await?;
    }
}

/// Query of `GET /api/packages`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    /// Only versions of this package ID.
    package_id: Option<String>,
}

/// Packages in the feed, by ID then upload time.
#[utoipa::path(
    get,
    path = "/api/packages",
    tag = "packages",
    params(ListQuery),
    responses(
        (status = 200, description = "The packages", body = [Package]),
        (status = 400, description = "Malformed query (the message names the field)", body = ErrorBody),
    )
)]
pub(crate) async fn list_packages(
    State(s): State<AppState>,
    Extension(RequestSpace(space)): Extension<RequestSpace>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Vec<Package>>, ApiError> {
    let Query(q) = q?;
    Ok(Json(
        packages_of(&s, &space, q.package_id.as_deref()).await?,
    ))
}

/// As `GET /api/packages`, for the portal too: the feed's packages, by ID then
/// upload time (only versions of `package_id` when given).
pub async fn packages_of(
    s: &AppState,
    space: &Space,
    package_id: Option<&str>,
) -> Result<Vec<Package>, ApiError> {
    Ok(s.store.list_packages(space.id, package_id).await?)
}

/// One version of a package (`latest` for the highest).
#[utoipa::path(
    get,
    path = "/api/packages/{id}/{version}",
    tag = "packages",
    params(
        ("id" = String, Path, description = "Package ID"),
        ("version" = String, Path, description = "Version, or `latest`"),
    ),
    responses(
        (status = 200, description = "The package", body = Package),
        (status = 400, description = "The ID is not a package ID or the version not a semantic version (the message says which)", body = ErrorBody),
        (status = 404, description = "No such package or version (the message lists the versions)", body = ErrorBody),
    )
)]
pub(crate) async fn get_package(
    State(s): State<AppState>,
    Extension(RequestSpace(space)): Extension<RequestSpace>,
    p: Result<UrlPath<(String, String)>, PathRejection>,
) -> Result<Json<Package>, ApiError> {
    let UrlPath((id, version)) = p?;
    Ok(Json(
        find(s.store.as_ref(), space.id, &id, Some(&version)).await?,
    ))
}

/// The file of one version of a package (`latest` for the highest), streamed
/// from the database: any node serves any package.
#[utoipa::path(
    get,
    path = "/api/packages/{id}/{version}/download",
    tag = "packages",
    params(
        ("id" = String, Path, description = "Package ID"),
        ("version" = String, Path, description = "Version, or `latest`"),
    ),
    responses(
        (status = 200, description = "The package file (its SHA-256 in `ETag`)", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 400, description = "The ID is not a package ID or the version not a semantic version (the message says which)", body = ErrorBody),
        (status = 404, description = "No such package or version (the message lists the versions)", body = ErrorBody),
    )
)]
pub(crate) async fn download_package(
    State(s): State<AppState>,
    Extension(RequestSpace(space)): Extension<RequestSpace>,
    p: Result<UrlPath<(String, String)>, PathRejection>,
) -> Result<axum::response::Response, ApiError> {
    use axum::http::header;
    let UrlPath((id, version)) = p?;
    let package = find(s.store.as_ref(), space.id, &id, Some(&version)).await?;
    let Some(content) = s.packages.content(&package.sha256).await? else {
        return Err(ApiError::internal(format!(
            "the content of package {} {} (SHA-256 {}) is missing from the database; push it again with `octopus package push --replace`",
            package.package_id, package.version, package.sha256
        )));
    };
    let size = content.size;
    let reader = ChunkReader::new(s.store.clone(), content, 0);
    let shown = format!("{} {}", package.package_id, package.version);
    let chunks = futures_util::stream::unfold(Some(reader), move |reader| {
        let shown = shown.clone();
        async move {
            let mut reader = reader?;
            match reader.next().await {
                Ok(Some(chunk)) => Some((Ok(Bytes::from(chunk)), Some(reader))),
                Ok(None) => None,
                // The body ends broken (short of Content-Length): the client
                // sees a failed download, never a wrong file.
                Err(e) => {
                    tracing::warn!("download of package {shown} failed: {e}");
                    Some((Err(std::io::Error::other(e.to_string())), None))
                }
            }
        }
    });
    let name: String = package
        .file_name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '+'))
        .collect();
    let response = axum::response::Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, size)
        .header(header::ETAG, format!("\"{}\"", package.sha256))
        .header(
            header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"{name}\""),
        )
        .body(Body::from_stream(chunks))
        .map_err(|e| anyhow::anyhow!("building the download of {id} {version}: {e}"))?;
    Ok(response)
}

/// Deletes one version of a package (its file too, when no other version uses it).
#[utoipa::path(
    delete,
    path = "/api/packages/{id}/{version}",
    tag = "packages",
    params(
        ("id" = String, Path, description = "Package ID"),
        ("version" = String, Path, description = "Version"),
    ),
    responses(
        (status = 200, description = "Deleted; the deleted package", body = Package),
        (status = 400, description = "The ID is not a package ID or the version not a semantic version (the message says which)", body = ErrorBody),
        (status = 404, description = "No such package or version", body = ErrorBody),
    )
)]
pub(crate) async fn delete_package(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(RequestSpace(space)): Extension<RequestSpace>,
    p: Result<UrlPath<(String, String)>, PathRejection>,
) -> Result<Json<Package>, ApiError> {
    let UrlPath((id, version)) = p?;
    Ok(Json(
        remove_package(&s, &caller, &space, &id, &version).await?,
    ))
}

/// As `DELETE /api/packages/{id}/{version}`, for the portal too: deletes one
/// version (its file too, when no other version uses it); answers it.
pub async fn remove_package(
    s: &AppState,
    caller: &Caller,
    space: &Space,
    id: &str,
    version: &str,
) -> Result<Package, ApiError> {
    let found = find(s.store.as_ref(), space.id, id, Some(version)).await?;
    let _feed = s.packages.lock().await;
    let gone = s
        .store
        .delete_package(space.id, &found.package_id, &found.version)
        .await?;
    s.audit(
        caller,
        Some(space),
        "deleted",
        "package",
        &format!("{} {}", gone.package_id, gone.version),
        "",
    )
    .await;
    s.packages.remove_if_unused(&gone.sha256).await;
    tracing::info!("package {} {} deleted", gone.package_id, gone.version);
    Ok(gone)
}
