//! API errors: every failure is `{"error": "..."}` ([`ErrorBody`]) with a
//! status that says who must act: 400 for a malformed request (naming the
//! field), 401 without valid credentials (saying nothing else), 403 when the
//! caller may not, 404/409 for missing or duplicate things.

use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use octo_api_types::{ErrorBody, Invalid, Validate};
use octo_store::StoreError;

/// An API error.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    pub message: String,
    /// The `Allow` header of a 405.
    allow: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            allow: None,
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message)
    }

    pub fn unprocessable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    /// 405: `method` is not served at `path`; `allowed` (comma-separated)
    /// becomes the `Allow` header.
    pub fn method_not_allowed(method: &axum::http::Method, path: &str, allowed: &str) -> Self {
        let shown = if allowed.is_empty() { "none" } else { allowed };
        Self {
            status: StatusCode::METHOD_NOT_ALLOWED,
            message: format!("method {method} is not allowed on {path}; allowed: {shown}"),
            allow: Some(allowed.to_string()),
        }
    }

    /// The status this error answers with.
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(r: axum::extract::rejection::QueryRejection) -> Self {
        Self::bad_request(format!("malformed query: {}", r.body_text()))
    }
}

impl From<axum::extract::rejection::PathRejection> for ApiError {
    fn from(r: axum::extract::rejection::PathRejection) -> Self {
        Self::bad_request(format!("malformed path: {}", r.body_text()))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (
            self.status,
            Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response();
        if let Some(allow) = self
            .allow
            .and_then(|a| axum::http::HeaderValue::from_str(&a).ok())
        {
            resp.headers_mut().insert(axum::http::header::ALLOW, allow);
        }
        resp
    }
}

impl From<Invalid> for ApiError {
    fn from(e: Invalid) -> Self {
        Self::bad_request(e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let status = match &e {
            StoreError::NotFound { .. } => StatusCode::NOT_FOUND,
            StoreError::Conflict { .. } => StatusCode::CONFLICT,
            StoreError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            StoreError::Database(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!("store: {e}");
        }
        Self::new(status, e.to_string())
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        tracing::error!("{e:#}");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
    }
}

/// What handlers return.
pub type ApiResult<T> = Result<T, ApiError>;

/// `Json` whose rejections are 400s naming what is wrong (the field, line and
/// column), and whose body is checked against the input rules
/// ([`octo_api_types::validate`]) before the handler sees it.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: serde::de::DeserializeOwned + Validate,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let malformed = |why: &str| ApiError::bad_request(format!("malformed request: {why}"));
        let json = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|ct| ct.split(';').next())
            .map(|ct| ct.trim().to_ascii_lowercase())
            .is_some_and(|ct| {
                ct == "application/json"
                    || (ct.starts_with("application/") && ct.ends_with("+json"))
            });
        if !json {
            return Err(malformed(
                "expected a JSON body with `Content-Type: application/json`",
            ));
        }
        let bytes = match axum::body::Bytes::from_request(req, state).await {
            Ok(b) => b,
            Err(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the request body is too large: {}", r.body_text()),
                ))
            }
            Err(r) => return Err(malformed(&r.body_text())),
        };
        // serde would also read a struct from an array of its fields.
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(malformed("the body must be a JSON object (`{...}`)"));
        }
        match Json::<T>::from_bytes(&bytes) {
            Ok(Json(v)) => {
                v.validate()?;
                Ok(Self(v))
            }
            Err(rejection) => Err(malformed(&rejection.body_text())),
        }
    }
}

/// The most of a non-JSON error body that is read to become a JSON one.
const MAX_PLAIN_ERROR: usize = 16 * 1024;

/// Makes every error answer of the API the JSON error body ([`ErrorBody`]):
/// axum's own rejections (plain text: a path parameter that does not parse, a
/// body too large, a wrong content type) and its 405 (no body) become
/// `{"error": "..."}` with the same status and headers (`Allow` stays).
pub(crate) async fn json_errors(req: Request, next: axum::middleware::Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"));
    if is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, MAX_PLAIN_ERROR)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = plain_error_message(status, &method, &path, &parts.headers, &text);
    let mut out = ApiError::new(status, message).into_response();
    for (name, value) in &parts.headers {
        if name != axum::http::header::CONTENT_TYPE && name != axum::http::header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}

/// What a plain-text (or empty) error answer says, as an API error message.
fn plain_error_message(
    status: StatusCode,
    method: &axum::http::Method,
    path: &str,
    headers: &axum::http::HeaderMap,
    text: &str,
) -> String {
    let path: String = path.chars().take(200).collect();
    match status {
        StatusCode::METHOD_NOT_ALLOWED => {
            let allowed = headers
                .get(axum::http::header::ALLOW)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("none");
            format!("method {method} is not allowed on {path}; allowed: {allowed}")
        }
        StatusCode::NOT_FOUND if text.is_empty() => {
            format!("no such API route: {path}; see /api/openapi.json")
        }
        StatusCode::PAYLOAD_TOO_LARGE => format!("the request body is too large: {text}"),
        _ if text.is_empty() => format!(
            "{} {}",
            status.as_u16(),
            status.canonical_reason().unwrap_or("error")
        ),
        _ if status.is_client_error() => format!("malformed request: {text}"),
        _ => text.to_string(),
    }
}
