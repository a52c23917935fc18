//! [`ApiClient`]: the one HTTP client every command uses, so that every command
//! reports a refused key, an unreachable server or an API error the same way,
//! and the one place that builds the API's paths: [`ApiClient::space_url`] for
//! routes of a space (`/api/spaces/{space}/...`, the space from `--space`) and
//! [`ApiClient::system_url`] for the server's own (`/api/spaces`, `/api/users`,
//! `/api/roles`, `/api/api-keys`).

use std::fmt;
use std::time::Duration;

use reqwest::{Method, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::output::cell;

/// Header carrying the API key (as the server's `api.rs` expects it).
const API_KEY_HEADER: &str = "X-Octopus-ApiKey";
/// How long an ordinary call may take, connecting included.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The answer to [`ApiClient::post_following`].
pub(crate) enum Created {
    /// The created task's events, from its creation.
    Events(reqwest::Response),
    /// The created task (a server that does not send its events).
    Json(Value),
}

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
    Unauthorized { key: KeySource },
    /// Any other error status, with the server's `{"error"}` text (its control
    /// characters escaped: a name in it may be anyone's).
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
            // These two are matched whole by the end-to-end tests.
            Self::Unauthorized { key: KeySource::Given } => write!(
                f,
                "the server refused the API key; pass --api-key or set OCTOPUS_API_KEY (the first admin key is in DATA/admin-api-key)"
            ),
            Self::Unauthorized {
                key: KeySource::Session { username },
            } => write!(
                f,
                "the server refused the session key of `octopus login` as '{}' (it expired after a time unused, or was revoked); log in again with `octopus login --username {}`, or pass --api-key",
                cell(username),
                cell(username)
            ),
            Self::Unauthorized { key: KeySource::None } => write!(
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
                } else if *status == StatusCode::FORBIDDEN {
                    write!(
                        f,
                        "{message} (`octopus whoami` shows what you may do; an administrator can grant more with `octopus team grant`)"
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

/// Where the API key of the calls comes from (for what to say when it is refused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KeySource {
    /// None at all.
    None,
    /// `--api-key` or `OCTOPUS_API_KEY`.
    Given,
    /// The session key that `octopus login` stored for this server.
    Session { username: String },
}

/// The server's address, the API key, the space and one connection pool.
#[derive(Debug, Clone)]
pub(crate) struct ApiClient {
    /// The server's root, e.g. `http://127.0.0.1:8080/` (never ending in `/api`).
    base: Url,
    key: Option<String>,
    key_source: KeySource,
    /// The space of space routes (`--space`): a name or `Spaces-N`.
    space: String,
    http: reqwest::Client,
}

impl ApiClient {
    /// A client for the server at `server` (`http://HOST:PORT`; a missing scheme
    /// means http, a trailing `/api` is ignored), working in `space`.
    pub(crate) fn new(server: &str, key: Option<String>, space: &str) -> anyhow::Result<Self> {
        let base = parse_base(server)?;
        let space = check_space(space)?;
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_keepalive(Duration::from_secs(15))
            .user_agent(concat!("octopus-cli/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let key = key.map(|k| k.trim().to_string()).filter(|k| !k.is_empty());
        let key_source = if key.is_some() {
            KeySource::Given
        } else {
            KeySource::None
        };
        Ok(Self {
            base,
            key,
            key_source,
            space,
            http,
        })
    }

    /// Whether calls carry a key.
    pub(crate) fn has_key(&self) -> bool {
        self.key.is_some()
    }

    /// Where the key comes from.
    pub(crate) fn key_source(&self) -> &KeySource {
        &self.key_source
    }

    /// Calls with the session key `octopus login` stored for `username`.
    pub(crate) fn use_session(&mut self, key: &str, username: &str) {
        self.key = Some(key.trim().to_string()).filter(|k| !k.is_empty());
        self.key_source = match self.key {
            Some(_) => KeySource::Session {
                username: username.to_string(),
            },
            None => KeySource::None,
        };
    }

    /// The same client without a key (to log in).
    pub(crate) fn without_key(&self) -> Self {
        Self {
            key: None,
            key_source: KeySource::None,
            ..self.clone()
        }
    }

    /// The server's address as the user should see it (and the sessions file's key).
    pub(crate) fn base(&self) -> String {
        self.base.as_str().trim_end_matches('/').to_string()
    }

    /// The space that space routes go to, as given.
    pub(crate) fn space(&self) -> &str {
        &self.space
    }

    /// `BASE/api/spaces/<space>/<segments>?<query>`: a route of the `--space`
    /// space (environments, machines, tasks, packages, teams, audit). See
    /// [`Self::system_url`] for the encoding.
    pub(crate) fn space_url(&self, segments: &[&str], query: &[(&str, Option<String>)]) -> Url {
        let mut all = Vec::with_capacity(segments.len() + 2);
        all.extend(["spaces", self.space.as_str()]);
        all.extend_from_slice(segments);
        self.system_url(&all, query)
    }

    /// `BASE/api/<segments>?<query>`: a route of the server itself (spaces,
    /// users, roles, API keys, logging in), never in a space. Segments are
    /// percent-encoded as one segment each (names may hold spaces, slashes,
    /// `%`, anything), `None` query values are left out.
    pub(crate) fn system_url(&self, segments: &[&str], query: &[(&str, Option<String>)]) -> Url {
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

    /// PUT a JSON body, answer as JSON (`null` when the answer is empty).
    pub(crate) async fn put<T: DeserializeOwned>(
        &self,
        url: Url,
        body: &Value,
    ) -> Result<T, ClientError> {
        self.call(Method::PUT, url, Some(body)).await
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

    /// POST a JSON body and ask for the created task's events in the answer
    /// (`Accept: text/event-stream`); a server that does not send them answers
    /// with the task as JSON. Waits at most [`CALL_TIMEOUT`] for the answer to
    /// begin; the events then take as long as the task.
    pub(crate) async fn post_following(
        &self,
        url: Url,
        body: &Value,
    ) -> Result<Created, ClientError> {
        let req = self
            .authorize(self.http.post(url.clone()))
            .header(
                reqwest::header::ACCEPT,
                "text/event-stream, application/json;q=0.9",
            )
            .json(body);
        let resp = match tokio::time::timeout(CALL_TIMEOUT, req.send()).await {
            Err(_) => return Err(ClientError::Timeout { base: self.base() }),
            Ok(sent) => sent.map_err(|e| self.transport_error(&e))?,
        };
        let resp = self.check(&url, resp).await?;
        let events = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim_start().starts_with("text/event-stream"));
        if events {
            return Ok(Created::Events(resp));
        }
        let bytes = tokio::time::timeout(CALL_TIMEOUT, resp.bytes())
            .await
            .map_err(|_| ClientError::Timeout { base: self.base() })?
            .map_err(|e| self.transport_error(&e))?;
        serde_json::from_slice(&bytes)
            .map(Created::Json)
            .map_err(|e| ClientError::Unexpected {
                url: url.to_string(),
                detail: e.to_string(),
            })
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
        // 401 is about the key, but for logging in, where it is about the
        // password: the server's words then.
        if status == StatusCode::UNAUTHORIZED && !url.path().ends_with("/users/login") {
            return Err(ClientError::Unauthorized {
                key: self.key_source.clone(),
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
            message: cell(&message).into_owned(),
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

/// `--space` as given, trimmed; refused when no URL path could carry it.
fn check_space(space: &str) -> anyhow::Result<String> {
    let s = space.trim();
    if s.is_empty() {
        anyhow::bail!("--space (or OCTOPUS_SPACE) is empty; give a space's name or id (Spaces-N), or leave it out for the Default space");
    }
    if s == "." || s == ".." {
        anyhow::bail!("--space '{s}': a web address cannot carry this name; give the space's id instead (Spaces-N, from `octopus space list`)");
    }
    Ok(s.to_string())
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
            let c = ApiClient::new(server, None, "Default").unwrap();
            assert_eq!(c.base(), "http://h:8080");
            assert_eq!(
                c.space_url(&["environments", "Prod East/1"], &[]).as_str(),
                "http://h:8080/api/spaces/Default/environments/Prod%20East%2F1"
            );
            assert_eq!(
                c.system_url(&["users", "me"], &[]).as_str(),
                "http://h:8080/api/users/me"
            );
        }
        let c = ApiClient::new("http://h:8080/octopus/", None, "Spaces-2").unwrap();
        assert_eq!(
            c.space_url(
                &["machines"],
                &[("environment", Some("A B".into())), ("role", None)]
            )
            .as_str(),
            "http://h:8080/octopus/api/spaces/Spaces-2/machines?environment=A+B"
        );
        assert_eq!(
            c.system_url(&["api-keys"], &[("all", Some("true".into()))])
                .as_str(),
            "http://h:8080/octopus/api/api-keys?all=true"
        );
    }

    #[test]
    fn the_space_is_one_encoded_path_segment() {
        for (space, segment) in [
            ("Default", "Default"),
            ("  Team A  ", "Team%20A"),
            ("Ops/Prod", "Ops%2FProd"),
            ("a/../b", "a%2F..%2Fb"),
            ("100%", "100%25"),
            ("%2F", "%252F"),
            ("Zürich", "Z%C3%BCrich"),
            ("東京", "%E6%9D%B1%E4%BA%AC"),
            ("a?b#c", "a%3Fb%23c"),
            ("...", "..."),
        ] {
            let c = ApiClient::new("http://h:8080", None, space).unwrap();
            assert_eq!(
                c.space_url(&["teams", "x y"], &[]).as_str(),
                format!("http://h:8080/api/spaces/{segment}/teams/x%20y"),
                "{space:?}"
            );
            assert_eq!(c.space(), space.trim());
            // System routes ignore the space.
            assert_eq!(
                c.system_url(&["spaces"], &[]).as_str(),
                "http://h:8080/api/spaces"
            );
        }
        for bad in ["", "  ", ".", ".."] {
            let e = ApiClient::new("http://h:8080", None, bad).unwrap_err();
            assert!(e.to_string().contains("--space"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn session_keys_are_named_when_refused() {
        let mut c = ApiClient::new("http://h:8080", None, "Default").unwrap();
        assert!(!c.has_key());
        assert_eq!(c.key_source(), &KeySource::None);
        c.use_session("k1", "alice");
        assert!(c.has_key());
        let e = ClientError::Unauthorized {
            key: c.key_source().clone(),
        };
        assert!(
            e.to_string().contains("octopus login --username alice"),
            "{e}"
        );
        let anon = c.without_key();
        assert!(!anon.has_key());
        let given = ApiClient::new("http://h:8080", Some(" k ".into()), "Default").unwrap();
        assert_eq!(given.key_source(), &KeySource::Given);
    }

    #[test]
    fn bad_servers_are_named() {
        let e = ApiClient::new("https://h:8080", None, "Default").unwrap_err();
        assert!(e.to_string().contains("http:// only"), "{e}");
        let e = ApiClient::new("ftp://h", None, "Default").unwrap_err();
        assert!(e.to_string().contains("'ftp' is not http"), "{e}");
    }
}
