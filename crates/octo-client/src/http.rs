//! [`ApiClient`]: the one HTTP client every command uses, so that every command
//! reports a refused key, an unreachable server or an API error the same way.

use std::fmt;
use std::time::Duration;

use reqwest::{Method, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Header carrying the API key (as the server's `api.rs` expects it).
const API_KEY_HEADER: &str = "X-Octopus-ApiKey";
/// How long an ordinary call may take, connecting included.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What went wrong talking to the server, one variant per thing a person does
/// differently about it.
#[derive(Debug)]
pub(crate) enum ClientError {
    /// No connection could be made.
    Unreachable { base: String, cause: String },
    /// A connection was made but the exchange failed half-way.
    Transport { base: String, cause: String },
    /// The server took longer than [`CALL_TIMEOUT`].
    Timeout { base: String },
    /// 401: no key, or a key the server does not accept.
    Unauthorized { key_given: bool },
    /// Any other error status, with the server's `{"error"}` text.
    Api {
        status: StatusCode,
        /// The route asked for (for "no such API route" answers).
        path: String,
        message: String,
    },
    /// A successful answer this client does not understand.
    Unexpected { url: String, detail: String },
}

impl ClientError {
    /// Whether trying again later may help (the server is away or overloaded), as
    /// opposed to an answer that will not change (bad key, no such task).
    pub(crate) fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable { .. } | Self::Transport { .. } | Self::Timeout { .. } => true,
            Self::Api { status, .. } => status.is_server_error(),
            Self::Unauthorized { .. } | Self::Unexpected { .. } => false,
        }
    }

    /// The HTTP status, when the server answered with an error.
    pub(crate) fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Api { status, .. } => Some(*status),
            Self::Unauthorized { .. } => Some(StatusCode::UNAUTHORIZED),
            _ => None,
        }
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unreachable { base, cause } => write!(
                f,
                "cannot reach the server at {base} ({cause}): is `octopus server run` running? (point at another server with --server or OCTOPUS_URL)"
            ),
            Self::Transport { base, cause } => write!(
                f,
                "the connection to the server at {base} failed ({cause}); try again, and check the server's log if it persists"
            ),
            Self::Timeout { base } => write!(
                f,
                "the server at {base} did not answer within {}s; check that it is not overloaded (its log says more)",
                CALL_TIMEOUT.as_secs()
            ),
            Self::Unauthorized { key_given: true } => write!(
                f,
                "the server refused the API key; pass --api-key or set OCTOPUS_API_KEY (the first admin key is in DATA/admin-api-key)"
            ),
            Self::Unauthorized { key_given: false } => write!(
                f,
                "no API key was given; pass --api-key or set OCTOPUS_API_KEY (the first admin key is in DATA/admin-api-key)"
            ),
            Self::Api { status, path, message } => {
                if *status == StatusCode::NOT_FOUND && message.starts_with("no such API route") {
                    write!(
                        f,
                        "the server has no {path} (is it an older version than this client?): {message}"
                    )
                } else if status.is_server_error() {
                    write!(
                        f,
                        "the server failed ({status}): {message}; its log says more"
                    )
                } else {
                    f.write_str(message)
                }
            }
            Self::Unexpected { url, detail } => {
                write!(f, "unexpected answer from {url}: {detail}")
            }
        }
    }
}

impl std::error::Error for ClientError {}

/// The server's address, the API key and one connection pool.
#[derive(Debug, Clone)]
pub(crate) struct ApiClient {
    /// The server's root, e.g. `http://127.0.0.1:8080/` (never ending in `/api`).
    base: Url,
    key: Option<String>,
    http: reqwest::Client,
}

impl ApiClient {
    /// A client for the server at `server` (`http://HOST:PORT`; a missing scheme
    /// means http, a trailing `/api` is ignored).
    pub(crate) fn new(server: &str, key: Option<String>) -> anyhow::Result<Self> {
        let base = parse_base(server)?;
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_keepalive(Duration::from_secs(15))
            .user_agent(concat!("octopus-cli/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let key = key.map(|k| k.trim().to_string()).filter(|k| !k.is_empty());
        Ok(Self { base, key, http })
    }

    /// The server's address as the user should see it.
    pub(crate) fn base(&self) -> String {
        self.base.as_str().trim_end_matches('/').to_string()
    }

    /// `BASE/api/<segments>?<query>`; segments are percent-encoded (names may hold
    /// spaces or slashes), `None` query values are left out.
    pub(crate) fn url(&self, segments: &[&str], query: &[(&str, Option<String>)]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().push("api").extend(segments);
        }
        let pairs: Vec<_> = query
            .iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| (*k, v)))
            .collect();
        if !pairs.is_empty() {
            let mut q = url.query_pairs_mut();
            for (k, v) in pairs {
                q.append_pair(k, v);
            }
        }
        url
    }

    /// GET, answer as JSON.
    pub(crate) async fn get<T: DeserializeOwned>(&self, url: Url) -> Result<T, ClientError> {
        self.call(Method::GET, url, None).await
    }

    /// POST a JSON body, answer as JSON (`null` when the answer is empty).
    pub(crate) async fn post<T: DeserializeOwned>(
        &self,
        url: Url,
        body: &Value,
    ) -> Result<T, ClientError> {
        self.call(Method::POST, url, Some(body)).await
    }

    /// POST a file as the raw body (streamed, no overall time limit), answer as JSON.
    pub(crate) async fn post_file<T: DeserializeOwned>(
        &self,
        url: Url,
        file: tokio::fs::File,
        len: u64,
    ) -> Result<T, ClientError> {
        let stream = tokio_util::io::ReaderStream::with_capacity(file, 256 << 10);
        let req = self
            .authorize(self.http.post(url.clone()))
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .header(reqwest::header::CONTENT_LENGTH, len)
            .body(reqwest::Body::wrap_stream(stream));
        let resp = req.send().await.map_err(|e| self.transport_error(&e))?;
        let resp = self.check(&url, resp).await?;
        let bytes = resp.bytes().await.map_err(|e| self.transport_error(&e))?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Unexpected {
            url: url.to_string(),
            detail: e.to_string(),
        })
    }

    /// DELETE; the answer's body is ignored.
    pub(crate) async fn delete(&self, url: Url) -> Result<(), ClientError> {
        self.call::<Value>(Method::DELETE, url, None)
            .await
            .map(|_| ())
    }

    /// GET without an overall time limit, for a response read as a stream
    /// (server-sent events). The status has been checked.
    pub(crate) async fn open_stream(&self, url: Url) -> Result<reqwest::Response, ClientError> {
        let req = self
            .authorize(self.http.get(url.clone()))
            .header(reqwest::header::ACCEPT, "text/event-stream");
        let resp = req.send().await.map_err(|e| self.transport_error(&e))?;
        self.check(&url, resp).await
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        url: Url,
        body: Option<&Value>,
    ) -> Result<T, ClientError> {
        let mut req = self
            .authorize(self.http.request(method, url.clone()))
            .timeout(CALL_TIMEOUT);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|e| self.transport_error(&e))?;
        let resp = self.check(&url, resp).await?;
        let bytes = resp.bytes().await.map_err(|e| self.transport_error(&e))?;
        let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
            b"null"
        } else {
            &bytes
        };
        serde_json::from_slice(bytes).map_err(|e| ClientError::Unexpected {
            url: url.to_string(),
            detail: e.to_string(),
        })
    }

    fn authorize(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.key {
            Some(k) => req.header(API_KEY_HEADER, k),
            None => req,
        }
    }

    /// Turns an error status into a [`ClientError`] carrying the server's words.
    async fn check(
        &self,
        url: &Url,
        resp: reqwest::Response,
    ) -> Result<reqwest::Response, ClientError> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        if status == StatusCode::UNAUTHORIZED {
            return Err(ClientError::Unauthorized {
                key_given: self.key.is_some(),
            });
        }
        let text = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_else(|| {
                let t = text.trim();
                if t.is_empty() {
                    status.to_string()
                } else {
                    t.chars().take(300).collect()
                }
            });
        Err(ClientError::Api {
            status,
            path: url.path().to_string(),
            message,
        })
    }

    fn transport_error(&self, e: &reqwest::Error) -> ClientError {
        let base = self.base();
        if e.is_timeout() {
            return ClientError::Timeout { base };
        }
        let cause = root_cause(e);
        if e.is_connect() {
            ClientError::Unreachable { base, cause }
        } else {
            ClientError::Transport { base, cause }
        }
    }
}

/// The innermost error's words, without the OS error number.
pub(crate) fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut inner = e;
    while let Some(next) = inner.source() {
        inner = next;
    }
    let text = inner.to_string();
    match text.find(" (os error") {
        Some(i) => text[..i].to_lowercase(),
        None => text,
    }
}

/// `--server` as a base URL: `http://HOST:PORT/` (a missing scheme means http;
/// a trailing `/api` is dropped so both `http://h:8080` and `http://h:8080/api` work).
fn parse_base(server: &str) -> anyhow::Result<Url> {
    let s = server.trim();
    let with_scheme = if s.contains("://") {
        s.to_string()
    } else {
        format!("http://{s}")
    };
    let mut url = Url::parse(&with_scheme).map_err(|e| {
        anyhow::anyhow!(
            "--server '{server}' is not a web address like http://octopus.example:8080 ({e})"
        )
    })?;
    match url.scheme() {
        "http" => {}
        "https" => anyhow::bail!(
            "--server '{server}': this build talks to the server over http:// only (the server's API has no TLS yet); use http://"
        ),
        other => anyhow::bail!(
            "--server '{server}': '{other}' is not http; give a web address like http://octopus.example:8080"
        ),
    }
    if url.host_str().is_none_or(str::is_empty) {
        anyhow::bail!(
            "--server '{server}' has no host; give a web address like http://octopus.example:8080"
        );
    }
    let path = url.path().trim_end_matches('/');
    let path = path.strip_suffix("/api").unwrap_or(path).to_string();
    url.set_path(&format!("{path}/"));
    url.set_query(None);
    url.set_fragment(None);
    Ok(url)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn urls_are_built_from_segments_and_encoded() {
        for server in [
            "http://h:8080",
            "http://h:8080/",
            "http://h:8080/api",
            "h:8080",
        ] {
            let c = ApiClient::new(server, None).unwrap();
            assert_eq!(c.base(), "http://h:8080");
            assert_eq!(
                c.url(&["environments", "Prod East/1"], &[]).as_str(),
                "http://h:8080/api/environments/Prod%20East%2F1"
            );
        }
        let c = ApiClient::new("http://h:8080/octopus/", None).unwrap();
        assert_eq!(
            c.url(
                &["machines"],
                &[("environment", Some("A B".into())), ("role", None)]
            )
            .as_str(),
            "http://h:8080/octopus/api/machines?environment=A+B"
        );
    }

    #[test]
    fn bad_servers_are_named() {
        let e = ApiClient::new("https://h:8080", None).unwrap_err();
        assert!(e.to_string().contains("http:// only"), "{e}");
        let e = ApiClient::new("ftp://h", None).unwrap_err();
        assert!(e.to_string().contains("'ftp' is not http"), "{e}");
    }
}
