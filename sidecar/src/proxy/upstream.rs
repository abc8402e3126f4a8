//! Talking to upstream MCP servers over Streamable HTTP, as a client: one session per upstream
//! (opened lazily with `initialize`, re-opened once when the upstream forgets it), JSON or SSE
//! answers, a time limit and a size limit on every exchange.
//!
//! Every request is built from scratch: nothing the agent sent (its `Authorization`, cookies,
//! other headers) reaches an upstream. The upstream's credential is added here, and removed
//! from any error text before it can reach the agent or a log.

use std::time::Duration;

use axum::body::Bytes;
use axum::http::{header, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::sync::Mutex;

use super::config::UpstreamConfig;

/// The protocol revision the proxy asks upstreams for.
pub const UPSTREAM_PROTOCOL: &str = "2025-06-18";

/// The HTTP client shared by all upstreams.
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Builds the shared HTTP client.
pub fn http_client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(connector)
}

/// Limits of every upstream exchange.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Whole exchange, connect to last byte.
    pub timeout: Duration,
    /// Largest response body.
    pub max_response_bytes: usize,
}

/// Why an upstream exchange failed. Messages never hold the credential.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No answer in time.
    #[error("upstream {0} did not answer in time")]
    Timeout(String),
    /// Connection or protocol failure.
    #[error("upstream {name} is unreachable: {message}")]
    Transport {
        /// Upstream name.
        name: String,
        /// What failed (credential removed).
        message: String,
    },
    /// A status other than 200/202.
    #[error("upstream {name} answered HTTP {status}")]
    Status {
        /// Upstream name.
        name: String,
        /// The status.
        status: u16,
    },
    /// The body is over the limit.
    #[error("upstream {0} sent a response over the size limit")]
    TooLarge(String),
    /// The body holds no JSON-RPC answer to the request.
    #[error("upstream {name} sent a bad response: {message}")]
    BadResponse {
        /// Upstream name.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// The credential file cannot be read.
    #[error("credential of upstream {0} cannot be read")]
    Credential(String),
}

#[derive(Debug, Default, Clone)]
struct Session {
    id: Option<String>,
    protocol: String,
    /// What the upstream said it offers in its `initialize` answer.
    capabilities: Value,
}

/// The things an upstream offers through a paginated list method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `tools/list`, named by `name`.
    Tools,
    /// `prompts/list`, named by `name`.
    Prompts,
    /// `resources/list`, named by `uri`.
    Resources,
    /// `resources/templates/list`, named by `uriTemplate`.
    Templates,
}

impl Kind {
    /// The list method.
    pub fn method(self) -> &'static str {
        match self {
            Kind::Tools => "tools/list",
            Kind::Prompts => "prompts/list",
            Kind::Resources => "resources/list",
            Kind::Templates => "resources/templates/list",
        }
    }

    /// The field of the result that holds the page.
    pub fn key(self) -> &'static str {
        match self {
            Kind::Tools => "tools",
            Kind::Prompts => "prompts",
            Kind::Resources => "resources",
            Kind::Templates => "resourceTemplates",
        }
    }

    /// The field of an entry that names it.
    pub fn name_field(self) -> &'static str {
        match self {
            Kind::Tools | Kind::Prompts => "name",
            Kind::Resources => "uri",
            Kind::Templates => "uriTemplate",
        }
    }

    /// The capability an upstream declares when it offers this kind.
    fn capability(self) -> &'static str {
        match self {
            Kind::Tools => "tools",
            Kind::Prompts => "prompts",
            Kind::Resources | Kind::Templates => "resources",
        }
    }
}

/// Names from the last listing of each kind, and when it was made.
type Names =
    std::collections::HashMap<Kind, (std::collections::HashSet<String>, std::time::Instant)>;

/// A name missing from a listing younger than this is taken as absent without asking the
/// upstream again: requests for unknown names cannot make the proxy list its upstreams at
/// will, and answer as fast as requests for denied ones.
pub const LISTING_FRESH_FOR: Duration = Duration::from_secs(10);

/// One upstream and its session.
#[derive(Debug)]
pub struct Upstream {
    /// Its config entry.
    pub config: UpstreamConfig,
    session: Mutex<Option<Session>>,
    /// Names from its last listing of each kind, so that requests for things it does not have
    /// get the proxy's own unknown-name error (the same as for a denied one).
    known: std::sync::Mutex<Names>,
    /// JSON-RPC id of the next request: every request in flight on the shared session has its
    /// own, and an answer is taken only for the id it carries.
    next_id: std::sync::atomic::AtomicU64,
}

impl Upstream {
    /// An upstream with no session yet.
    pub fn new(config: UpstreamConfig) -> Self {
        Self {
            config,
            session: Mutex::new(None),
            known: std::sync::Mutex::new(Names::new()),
            next_id: std::sync::atomic::AtomicU64::new(1),
        }
    }

    /// Lists everything of `kind` the upstream offers (following `nextCursor`, at most 100
    /// pages) and remembers the names. An upstream that does not declare the capability, or
    /// answers the list with a JSON-RPC error, offers nothing of that kind.
    pub async fn list(
        &self,
        client: &HttpClient,
        limits: Limits,
        kind: Kind,
    ) -> Result<Vec<Value>, UpstreamError> {
        let session = match tokio::time::timeout(limits.timeout, self.session(client, limits)).await
        {
            Ok(s) => s?,
            Err(_) => return Err(UpstreamError::Timeout(self.config.name.clone())),
        };
        let mut items = Vec::new();
        // Tools are always asked for (the proxy's reason to exist); the rest only where the
        // upstream declared them.
        if kind == Kind::Tools || session.capabilities.get(kind.capability()).is_some() {
            let mut cursor: Option<Value> = None;
            for _ in 0..100 {
                let params = match &cursor {
                    Some(c) => json!({"cursor": c}),
                    None => json!({}),
                };
                let answer = self.request(client, limits, kind.method(), params).await?;
                if answer.get("error").is_some() {
                    if kind == Kind::Tools {
                        return Err(self.bad("tools/list answered with an error"));
                    }
                    break;
                }
                let page = answer
                    .pointer(&format!("/result/{}", kind.key()))
                    .and_then(Value::as_array)
                    .ok_or_else(|| {
                        self.bad(&format!("{} answer has no {}", kind.method(), kind.key()))
                    })?;
                items.extend(page.iter().cloned());
                cursor = answer.pointer("/result/nextCursor").cloned();
                if cursor.as_ref().is_none_or(Value::is_null) {
                    break;
                }
            }
        }
        let names = items
            .iter()
            .filter_map(|t| {
                t.get(kind.name_field())
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .collect();
        if let Ok(mut known) = self.known.lock() {
            known.insert(kind, (names, std::time::Instant::now()));
        }
        Ok(items)
    }

    /// Whether the upstream offers `name` of `kind`, from its last listing; lists again when
    /// the name is not there and the listing is older than [`LISTING_FRESH_FOR`] (things come
    /// and go).
    pub async fn has(
        &self,
        client: &HttpClient,
        limits: Limits,
        kind: Kind,
        name: &str,
    ) -> Result<bool, UpstreamError> {
        if self.knows(kind, name) == Some(true) {
            return Ok(true);
        }
        self.refresh(client, limits, kind).await?;
        Ok(self.knows(kind, name) == Some(true))
    }

    /// Lists `kind` again unless the last listing is younger than [`LISTING_FRESH_FOR`].
    pub async fn refresh(
        &self,
        client: &HttpClient,
        limits: Limits,
        kind: Kind,
    ) -> Result<(), UpstreamError> {
        let fresh = self
            .known
            .lock()
            .ok()
            .and_then(|k| k.get(&kind).map(|(_, at)| at.elapsed() < LISTING_FRESH_FOR))
            .unwrap_or(false);
        if !fresh {
            self.list(client, limits, kind).await?;
        }
        Ok(())
    }

    /// Whether the last listing of `kind` had `name`; `None` before the first listing.
    pub fn knows(&self, kind: Kind, name: &str) -> Option<bool> {
        let known = self.known.lock().ok()?;
        known.get(&kind).map(|(set, _)| set.contains(name))
    }

    /// The names of the last listing of `kind`.
    pub fn known_names(&self, kind: Kind) -> Vec<String> {
        self.known
            .lock()
            .ok()
            .and_then(|k| k.get(&kind).map(|(s, _)| s.iter().cloned().collect()))
            .unwrap_or_default()
    }

    /// Sends one request for the agent: the upstream's answer under the agent's id `id` (the
    /// upstream's own id is never the agent's), or an internal error saying why there is none,
    /// with that reason apart for the audit record.
    pub async fn answer(
        &self,
        client: &HttpClient,
        limits: Limits,
        id: &Value,
        method: &str,
        params: Value,
    ) -> (Value, Option<String>) {
        match self.request(client, limits, method, params).await {
            Ok(mut a) => {
                a["id"] = id.clone();
                (a, None)
            }
            Err(e) => {
                let reason = e.to_string();
                let answer = json!({"jsonrpc": "2.0", "id": id,
                    "error": {"code": super::mcp::code::INTERNAL_ERROR, "message": reason}});
                (answer, Some(reason))
            }
        }
    }

    /// Sends one JSON-RPC request and returns the JSON-RPC response object (with `result` or
    /// `error`).
    pub async fn request(
        &self,
        client: &HttpClient,
        limits: Limits,
        method: &str,
        params: Value,
    ) -> Result<Value, UpstreamError> {
        let name = self.config.name.clone();
        match tokio::time::timeout(
            limits.timeout,
            self.request_inner(client, limits, method, params),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(UpstreamError::Timeout(name)),
        }
    }

    async fn request_inner(
        &self,
        client: &HttpClient,
        limits: Limits,
        method: &str,
        params: Value,
    ) -> Result<Value, UpstreamError> {
        for attempt in 0..2 {
            let session = self.session(client, limits).await?;
            let id = self
                .next_id
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let body = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
            match self.post(client, limits, Some(&session), &body).await {
                // The upstream forgot the session (restart): open a new one, once.
                Err(UpstreamError::Status { status: 404, .. })
                    if attempt == 0 && session.id.is_some() =>
                {
                    *self.session.lock().await = None;
                }
                other => {
                    return other.and_then(|(v, _)| match v {
                        Some(v) if v.get("result").is_some() || v.get("error").is_some() => Ok(v),
                        _ => Err(self.bad("the answer has no result or error")),
                    })
                }
            }
        }
        Err(self.bad("session lost twice"))
    }

    async fn session(&self, client: &HttpClient, limits: Limits) -> Result<Session, UpstreamError> {
        let mut guard = self.session.lock().await;
        if let Some(s) = guard.as_ref() {
            return Ok(s.clone());
        }
        let init = json!({
            "jsonrpc": "2.0", "id": 0, "method": "initialize",
            "params": {
                "protocolVersion": UPSTREAM_PROTOCOL,
                "capabilities": {},
                "clientInfo": {"name": "agentvm-proxy", "version": env!("CARGO_PKG_VERSION")},
            },
        });
        let (answer, id) = self.post(client, limits, None, &init).await?;
        let answer = answer.ok_or_else(|| self.bad("no answer to initialize"))?;
        let protocol = answer
            .pointer("/result/protocolVersion")
            .and_then(Value::as_str)
            .ok_or_else(|| self.bad("initialize failed"))?
            .to_owned();
        let capabilities = answer
            .pointer("/result/capabilities")
            .cloned()
            .unwrap_or_else(|| json!({}));
        let session = Session {
            id,
            protocol,
            capabilities,
        };
        let note = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
        self.post(client, limits, Some(&session), &note).await?;
        *guard = Some(session.clone());
        Ok(session)
    }

    fn bad(&self, message: &str) -> UpstreamError {
        UpstreamError::BadResponse {
            name: self.config.name.clone(),
            message: message.to_owned(),
        }
    }

    fn credential(&self) -> Result<Option<String>, UpstreamError> {
        let Some(path) = &self.config.credential_file else {
            return Ok(None);
        };
        let refused = || UpstreamError::Credential(self.config.name.clone());
        if let Some(dir) = &self.config.credentials_dir {
            // The Secret's files are links into its own folder; nothing may lead out of it.
            let real = std::fs::canonicalize(path).map_err(|_| refused())?;
            let real_dir = std::fs::canonicalize(dir).map_err(|_| refused())?;
            if !real.starts_with(&real_dir) {
                tracing::warn!(upstream = %self.config.name, "credential file leads out of the credentials folder; refused");
                return Err(refused());
            }
        }
        // Re-read every time: a rotated token is used from the next call on.
        let text = std::fs::read_to_string(path).map_err(|_| refused())?;
        Ok(Some(text.trim_end_matches(['\n', '\r']).to_owned()))
    }

    /// POSTs one message; returns the JSON-RPC answer (none for a notification) and the
    /// session id header.
    async fn post(
        &self,
        client: &HttpClient,
        limits: Limits,
        session: Option<&Session>,
        body: &Value,
    ) -> Result<(Option<Value>, Option<String>), UpstreamError> {
        let name = &self.config.name;
        let token = self.credential()?;
        let scrub = |text: String| match &token {
            Some(t) if !t.is_empty() => text.replace(t.as_str(), "[redacted]"),
            _ => text,
        };
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(&self.config.url)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json, text/event-stream");
        if let Some(s) = session {
            req = req.header("mcp-protocol-version", s.protocol.as_str());
            if let Some(id) = &s.id {
                req = req.header("mcp-session-id", id.as_str());
            }
        }
        if let Some(t) = &token {
            let value = HeaderValue::from_str(&format!("Bearer {t}"))
                .map_err(|_| UpstreamError::Credential(name.clone()))?;
            req = req.header(header::AUTHORIZATION, value);
        }
        let req = req
            .body(Full::new(Bytes::from(super::server::json_bytes(body))))
            .map_err(|e| UpstreamError::Transport {
                name: name.clone(),
                message: scrub(e.to_string()),
            })?;
        let response = client
            .request(req)
            .await
            .map_err(|e| UpstreamError::Transport {
                name: name.clone(),
                message: scrub(error_chain(&e)),
            })?;
        let status = response.status();
        let session_id = response
            .headers()
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let is_sse = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if status == StatusCode::ACCEPTED {
            return Ok((None, session_id));
        }
        if status != StatusCode::OK {
            return Err(UpstreamError::Status {
                name: name.clone(),
                status: status.as_u16(),
            });
        }
        let want_answer = body.get("id").is_some();
        let mut body_stream = Limited::new(response.into_body(), limits.max_response_bytes);
        if !want_answer {
            return Ok((None, session_id));
        }
        // Whatever the upstream sends back (results, error texts) loses the credential: in the
        // raw text, and again in every string once decoded (JSON escapes such as `\/` or
        // `\u0041` would hide it from the first pass).
        let answer = if is_sse {
            read_sse_answer(&mut body_stream, body.get("id"), &scrub).await
        } else {
            match body_stream.collect().await {
                Ok(c) => {
                    let bytes = c.to_bytes();
                    let parsed = match (&token, std::str::from_utf8(&bytes)) {
                        // Nothing to remove: parsed where it lies.
                        (None, Ok(text)) => serde_json::from_str::<Value>(text),
                        _ => {
                            let text = scrub(String::from_utf8_lossy(&bytes).into_owned());
                            serde_json::from_str::<Value>(&text)
                        }
                    };
                    parsed.map_err(|e| e.to_string()).and_then(|v| {
                        if v.get("id") == body.get("id") {
                            Ok(v)
                        } else {
                            Err("the answer is for another request".to_owned())
                        }
                    })
                }
                Err(e) => Err(limit_or(e)),
            }
        };
        let answer = answer.map(|mut v| {
            if let Some(t) = token.as_deref().filter(|t| !t.is_empty()) {
                scrub_strings(&mut v, t);
            }
            v
        });
        match answer {
            Ok(v) => Ok((Some(v), session_id)),
            Err(m) if m == LIMIT => Err(UpstreamError::TooLarge(name.clone())),
            Err(m) => Err(self.bad(&scrub(m))),
        }
    }
}

const LIMIT: &str = "size limit";

/// Replaces `token` in every string (and object key) of `value`.
fn scrub_strings(value: &mut Value, token: &str) {
    match value {
        Value::String(s) if s.contains(token) => *s = s.replace(token, "[redacted]"),
        Value::Array(items) => items.iter_mut().for_each(|v| scrub_strings(v, token)),
        Value::Object(map) => {
            if map.keys().any(|k| k.contains(token)) {
                let entries = std::mem::take(map);
                *map = entries
                    .into_iter()
                    .map(|(k, v)| (k.replace(token, "[redacted]"), v))
                    .collect();
            }
            map.values_mut().for_each(|v| scrub_strings(v, token));
        }
        _ => {}
    }
}

fn limit_or(e: Box<dyn std::error::Error + Send + Sync>) -> String {
    if e.is::<http_body_util::LengthLimitError>() {
        LIMIT.to_owned()
    } else {
        e.to_string()
    }
}

/// Reads server-sent events until the JSON-RPC response whose id is `id` (requests and
/// notifications the upstream sends first are skipped).
async fn read_sse_answer<B>(
    body: &mut B,
    id: Option<&Value>,
    scrub: &(dyn Fn(String) -> String + Sync),
) -> Result<Value, String>
where
    B: http_body::Body<Data = Bytes, Error = Box<dyn std::error::Error + Send + Sync>> + Unpin,
{
    let mut buf: Vec<u8> = Vec::new();
    // Where the search for the end of the current event goes on from: each byte is looked at
    // about once, however the upstream splits its stream.
    let mut scanned = 0;
    loop {
        while let Some(end) = find_event_end(&buf, scanned) {
            scanned = 0;
            let event: Vec<u8> = buf.drain(..end).collect();
            let data = scrub(sse_data(&event));
            if data.is_empty() {
                continue;
            }
            if let Ok(v) = serde_json::from_str::<Value>(&data) {
                let is_answer = v.get("method").is_none()
                    && (v.get("result").is_some() || v.get("error").is_some());
                if is_answer && (id.is_none() || v.get("id") == id) {
                    return Ok(v);
                }
            }
        }
        // The last three bytes may begin a blank line that the next frame ends.
        scanned = buf.len().saturating_sub(3);
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(&data);
                }
            }
            Some(Err(e)) => return Err(limit_or(e)),
            None => return Err("stream ended without an answer".into()),
        }
    }
}

/// Index just past the blank line that ends the first event, if the buffer holds one; the
/// search starts at `from` (nothing before it ends an event).
fn find_event_end(buf: &[u8], from: usize) -> Option<usize> {
    let tail = buf.get(from..)?;
    let lf = tail
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|i| from + i + 2);
    let crlf = tail
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| from + i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The `data:` lines of one event, joined with newlines.
fn sse_data(event: &[u8]) -> String {
    let text = String::from_utf8_lossy(event);
    let mut out = String::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("data:") {
            if !out.is_empty() {
                out.push('\n');
            }
            out.push_str(rest.strip_prefix(' ').unwrap_or(rest));
        }
    }
    out
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn a_credential_link_out_of_its_folder_is_not_read() {
        let root =
            std::env::temp_dir().join(format!("agentvm-cred-confine-{}", std::process::id()));
        let dir = root.join("credentials");
        std::fs::create_dir_all(dir.join("..data")).unwrap();
        std::fs::write(dir.join("..data/gh"), "token\n").unwrap();
        std::fs::write(root.join("outside"), "not yours\n").unwrap();
        // The kubelet's layout: the file is a link into the folder's own ..data.
        std::os::unix::fs::symlink("..data/gh", dir.join("gh")).unwrap();
        std::os::unix::fs::symlink("../outside", dir.join("escape")).unwrap();
        let upstream = |file: &str| {
            Upstream::new(UpstreamConfig {
                name: "gh".into(),
                url: "http://127.0.0.1:9/mcp".into(),
                credential_file: Some(dir.join(file)),
                credentials_dir: Some(dir.clone()),
            })
        };
        assert_eq!(
            upstream("gh").credential().unwrap().as_deref(),
            Some("token")
        );
        assert!(matches!(
            upstream("escape").credential(),
            Err(UpstreamError::Credential(_))
        ));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn sse_events_are_split_and_joined() {
        let buf = b"event: message\ndata: {\"a\":\ndata: 1}\n\nrest";
        let end = find_event_end(buf, 0).unwrap();
        assert_eq!(sse_data(&buf[..end]), "{\"a\":\n1}");
        assert_eq!(find_event_end(b"data: x\r\n\r\n", 0), Some(11));
        assert_eq!(find_event_end(b"data: x\n", 0), None);
        assert_eq!(find_event_end(b"data: x\n\n", 6), Some(9));
        let mut v = serde_json::json!({"a": ["Bearer t0k", {"t0k": "x t0k y"}], "n": 1});
        scrub_strings(&mut v, "t0k");
        assert_eq!(
            v,
            serde_json::json!({"a": ["Bearer [redacted]", {"[redacted]": "x [redacted] y"}], "n": 1})
        );
    }
}
