//! The built-in feed: packages by ID with their versions; uploading one (the
//! script sends the file as the request's body, with a progress bar, to the
//! feed's own `push`, and reads its JSON answer as the API gives it); deleting
//! a version; and deploying a package (the API's own `tasks::start`).
//!
//! Uploading needs the script: the gate takes a form's CSRF token from a
//! urlencoded body or the `X-CSRF-Token` header only, so a classic multipart
//! form post would be refused. Without the script the upload form is a plain
//! GET back to the list (no file, no token in the address), which then says
//! so and names the command line instead.

use askama::Template;
use axum::body::Body;
use axum::extract::rejection::{FormRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Form, Json};
use octo_api_types::{DeployRequest, Package, Permission};
use octo_server_core::api::environments::visible_environments;
use octo_server_core::api::packages::{packages_of, push, remove_package, PushQuery};
use octo_server_core::api::tasks;
use octo_server_core::api::ApiError;
use octo_server_core::authz::{Access, Caller, RequestSpace};
use octo_server_core::feed::parse_version;
use octo_server_core::AppState;

use super::console::{given, known_roles, parse_secrets, parse_variables, secret_rows, Fields};
use super::{api_error, enc, render, see_other, when, Frame};
use crate::gate::{get, post, Page};

pub(crate) fn pages() -> Vec<Page> {
    use Permission as P;
    let mut upload = post(
        "/spaces/{space}/packages/upload",
        Access::Space(P::BuiltInFeedPush),
        upload,
    );
    // A package may be large: streamed to disk by the feed, never held whole.
    upload.handler = upload.handler.layer(DefaultBodyLimit::disable());
    vec![
        get("/spaces/{space}/packages", Access::Space(P::FeedView), list),
        upload,
        post(
            "/spaces/{space}/packages/{id}/{version}/delete",
            Access::Space(P::BuiltInFeedAdminister),
            delete,
        ),
        get(
            "/spaces/{space}/deploy",
            Access::Space(P::DeploymentCreate),
            deploy_form,
        ),
        post(
            "/spaces/{space}/deploy",
            Access::Space(P::DeploymentCreate),
            deploy,
        ),
    ]
}

/// A size for people: "812 B", "14.2 KiB", "3.0 MiB".
fn size(bytes: i64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

struct VersionRow {
    version: String,
    format: String,
    size: String,
    sha_short: String,
    sha256: String,
    uploaded: String,
    file_name: String,
    /// Where its delete form posts.
    delete: String,
}

struct PackageRow {
    id: String,
    deploy: String,
    versions: Vec<VersionRow>,
}

#[derive(Template)]
#[template(path = "packages.html")]
struct PackagesPage {
    f: Frame,
    packages: Vec<PackageRow>,
    may_push: bool,
    may_delete: bool,
    may_deploy: bool,
    /// The upload form came without the script (so without its file).
    no_script_upload: bool,
    error: Option<String>,
}

/// The feed's packages by ID (ignoring case), each's versions newest first.
fn grouped(all: Vec<Package>) -> Vec<(String, Vec<Package>)> {
    let mut groups: Vec<(String, Vec<Package>)> = Vec::new();
    for p in all {
        match groups
            .iter_mut()
            .find(|(id, _)| id.eq_ignore_ascii_case(&p.package_id))
        {
            Some((_, v)) => v.push(p),
            None => groups.push((p.package_id.clone(), vec![p])),
        }
    }
    groups.sort_by_key(|(id, _)| id.to_lowercase());
    for (_, versions) in &mut groups {
        versions.sort_by(
            |a, b| match (parse_version(&a.version), parse_version(&b.version)) {
                (Ok(x), Ok(y)) => y.cmp(&x),
                _ => b.uploaded_at.cmp(&a.uploaded_at),
            },
        );
    }
    groups
}

#[derive(Debug, Default, serde::Deserialize)]
struct ListQuery {
    /// Set when the upload form was sent without the script.
    #[serde(default)]
    file: Option<String>,
}

async fn list(
    State(s): State<AppState>,
    f: Frame,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Response {
    let no_script = q.is_ok_and(|Query(q)| q.file.is_some());
    show(&s, f, None, no_script).await
}

async fn show(s: &AppState, f: Frame, error: Option<ApiError>, no_script_upload: bool) -> Response {
    let f = f.titled("Packages", "packages");
    let all = match packages_of(s, &f.space, None).await {
        Ok(p) => p,
        Err(e) => return api_error(&e),
    };
    let packages = grouped(all)
        .into_iter()
        .map(|(id, versions)| PackageRow {
            deploy: f.href(&format!("/deploy?package={}", enc(&id))),
            versions: versions
                .into_iter()
                .map(|p| VersionRow {
                    delete: f.href(&format!(
                        "/packages/{}/{}/delete",
                        enc(&p.package_id),
                        enc(&p.version)
                    )),
                    sha_short: p.sha256.chars().take(12).collect(),
                    size: size(p.size),
                    uploaded: when(Some(p.uploaded_at)),
                    version: p.version,
                    format: p.format,
                    sha256: p.sha256,
                    file_name: p.file_name,
                })
                .collect(),
            id,
        })
        .collect();
    let status = error.as_ref().map(|e| e.status()).unwrap_or(StatusCode::OK);
    let page = PackagesPage {
        may_push: f.may(Permission::BuiltInFeedPush),
        may_delete: f.may(Permission::BuiltInFeedAdminister),
        may_deploy: f.may(Permission::DeploymentCreate),
        no_script_upload,
        f,
        packages,
        error: error.map(|e| e.message),
    };
    (status, render(&page)).into_response()
}

/// The body is the file; the query names it (`file_name`, or `package_id` and
/// `version`) and may ask to `replace` an existing version. Answers as
/// `POST /api/packages` does: the JSON the page's script reads.
async fn upload(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(RequestSpace(space)): Extension<RequestSpace>,
    q: Result<Query<PushQuery>, QueryRejection>,
    body: Body,
) -> Response {
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => return ApiError::from(e).into_response(),
    };
    match push(&s, &caller, &space, &q, body).await {
        Ok((status, reply)) => (status, Json(reply)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn delete(
    State(s): State<AppState>,
    f: Frame,
    Path((_, id, version)): Path<(String, String, String)>,
) -> Response {
    match remove_package(&s, &f.caller, &f.space, &id, &version).await {
        Ok(_) => see_other(&f.href("/packages")),
        Err(e) => show(&s, f, Some(e), false).await,
    }
}

/// The deploy form's fields (kept after a refusal, secret values excepted).
#[derive(Debug, Clone, Default)]
struct Entered {
    package: String,
    version: String,
    environment: String,
    role: String,
    tenant: String,
    variables: String,
    secret_names: Vec<String>,
    retention: String,
    guided_failure: bool,
}

/// A package and its versions, to choose from.
struct Choice {
    id: String,
    versions: Vec<String>,
}

#[derive(Template)]
#[template(path = "deploy.html")]
struct DeployPage {
    f: Frame,
    entered: Entered,
    packages: Vec<Choice>,
    environments: Vec<String>,
    roles: Vec<String>,
    tenants: Vec<String>,
    error: Option<String>,
}

#[derive(Debug, Default, serde::Deserialize)]
struct DeployQuery {
    #[serde(default)]
    package: String,
    #[serde(default)]
    version: String,
    #[serde(default)]
    environment: String,
}

async fn deploy_form(
    State(s): State<AppState>,
    f: Frame,
    q: Result<Query<DeployQuery>, QueryRejection>,
) -> Response {
    let q = q.map(|Query(q)| q).unwrap_or_default();
    let entered = Entered {
        package: q.package,
        version: q.version,
        environment: q.environment,
        secret_names: vec![String::new(); 3],
        retention: "3".into(),
        ..Entered::default()
    };
    show_deploy(&s, f, entered, None).await
}

async fn show_deploy(
    s: &AppState,
    f: Frame,
    entered: Entered,
    error: Option<ApiError>,
) -> Response {
    let f = f.titled("Deploy", "packages");
    let all = match packages_of(s, &f.space, None).await {
        Ok(p) => p,
        Err(e) => return api_error(&e),
    };
    let packages = grouped(all)
        .into_iter()
        .map(|(id, versions)| Choice {
            id,
            versions: versions.into_iter().map(|p| p.version).collect(),
        })
        .collect();
    let environments = match visible_environments(s, &f.caller, &f.space).await {
        Ok(e) => e.into_iter().map(|e| e.name).collect(),
        Err(e) => return api_error(&e),
    };
    let roles = match known_roles(s, &f).await {
        Ok(r) => r,
        Err(e) => return api_error(&e),
    };
    let tenants = match s.store.list_tenants(f.space.id).await {
        Ok(t) => t.into_iter().map(|t| t.name).collect(),
        Err(e) => return api_error(&e.into()),
    };
    let status = error.as_ref().map(|e| e.status()).unwrap_or(StatusCode::OK);
    let page = DeployPage {
        f,
        entered,
        packages,
        environments,
        roles,
        tenants,
        error: error.map(|e| e.message),
    };
    (status, render(&page)).into_response()
}

/// The deployment the form describes.
fn deploy_request(fields: &Fields, e: &Entered) -> Result<DeployRequest, ApiError> {
    if e.package.trim().is_empty() {
        return Err(ApiError::bad_request("choose the package to deploy"));
    }
    let retention = match e.retention.trim() {
        "" => None,
        r => Some(r.parse::<u32>().map_err(|_| {
            ApiError::bad_request(format!(
                "retention: '{r}' is not a number of versions to keep"
            ))
        })?),
    };
    Ok(DeployRequest {
        max_parallel_steps: None,
        package_id: e.package.trim().to_string(),
        version: given(&e.version).filter(|v| !v.eq_ignore_ascii_case("latest")),
        environment: e.environment.trim().to_string(),
        role: given(&e.role),
        tenant: given(&e.tenant),
        variables: parse_variables(&e.variables)?,
        sensitive_variables: parse_secrets(fields)?,
        retention,
        guided_failure: e.guided_failure,
    })
}

async fn deploy(
    State(s): State<AppState>,
    f: Frame,
    form: Result<Form<Vec<(String, String)>>, FormRejection>,
) -> Response {
    let fields = Fields::from(form);
    let entered = Entered {
        package: fields.one("package"),
        version: fields.one("version"),
        environment: fields.one("environment"),
        role: fields.one("role"),
        tenant: fields.one("tenant"),
        variables: fields.one("variables"),
        secret_names: secret_rows(&fields),
        retention: fields.one("retention"),
        guided_failure: fields.flag("guided_failure"),
    };
    let result = match deploy_request(&fields, &entered) {
        Ok(req) => tasks::start(&s, &f.caller, &f.space, req).await,
        Err(e) => Err(e),
    };
    match result {
        // Task ids ("ServerTasks-7") are safe in a path as they are.
        Ok(view) => see_other(&f.href(&format!("/tasks/{}", view.task.id))),
        Err(e) => show_deploy(&s, f, entered, Some(e)).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(size(812), "812 B");
        assert_eq!(size(14_540), "14.2 KiB");
        assert_eq!(size(3 * 1024 * 1024), "3.0 MiB");
    }
}
