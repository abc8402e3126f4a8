//! The proxy's HTTP face: MCP Streamable HTTP at `POST /mcp` (JSON answers), session end with
//! `DELETE /mcp`, and `GET /healthz`.
//!
//! Both generations of the protocol are served on the one endpoint. A request whose `_meta`
//! names its revision, or whose `MCP-Protocol-Version` header names 2026-07-28, is served
//! statelessly under that revision: its mirrored headers must match the body (`-32020`
//! otherwise), revisions the proxy does not speak get `-32022` with the list it does,
//! unknown methods HTTP 404, results carry `resultType`, and sessions are neither minted nor
//! checked. Anything else is the session-based revisions (2025-03-26 to 2025-11-25).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::Value;
use tracing::{field, Instrument};

use super::mcp::{self, code, Era, MODERN_VERSIONS, PROTOCOL_VERSIONS};
use super::state::ProxyState;

const SESSION_HEADER: &str = "mcp-session-id";

/// The proxy's router.
pub fn app(state: Arc<ProxyState>) -> Router {
    Router::new()
        .route("/mcp", post(post_mcp).delete(delete_mcp).get(get_mcp))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(state)
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        json_bytes(body),
    )
        .into_response()
}

/// `value` as JSON text, written by the serializer directly (`to_string` goes through the
/// formatting machinery, which checks every piece it writes again).
pub fn json_bytes(value: &Value) -> Vec<u8> {
    // Serializing a `Value` cannot fail (its keys are strings).
    serde_json::to_vec(value).unwrap_or_default()
}

/// Whether `origin` may call: none at all (not a browser), a loopback origin, or a listed one.
fn origin_allowed(state: &ProxyState, headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    if state.allowed_origins.iter().any(|o| o == origin) {
        return true;
    }
    let host = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .unwrap_or("");
    let host = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.split(':').next().unwrap_or(""),
    };
    matches!(host, "localhost" | "127.0.0.1" | "::1")
}

async fn get_mcp() -> Response {
    // No server-initiated stream is offered.
    (
        StatusCode::METHOD_NOT_ALLOWED,
        [(header::ALLOW, "POST, DELETE")],
    )
        .into_response()
}

async fn delete_mcp(State(state): State<Arc<ProxyState>>, headers: HeaderMap) -> Response {
    if !origin_allowed(&state, &headers) {
        return StatusCode::FORBIDDEN.into_response();
    }
    let Some(id) = headers.get(SESSION_HEADER).and_then(|v| v.to_str().ok()) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let removed = state
        .sessions
        .lock()
        .map(|mut s| s.remove(id))
        .unwrap_or(false);
    if removed {
        StatusCode::OK.into_response()
    } else {
        StatusCode::NOT_FOUND.into_response()
    }
}

async fn post_mcp(
    State(state): State<Arc<ProxyState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let span = tracing::info_span!("mcp", mcp.method = field::Empty, status = field::Empty,);
    async move {
        let response = handle_post(&state, &headers, body).await;
        // The status is for the access log line alone; recording a field on a span costs
        // the JSON formatter a pass over the span's fields.
        if state.access_log {
            tracing::Span::current().record("status", response.status().as_u16());
            tracing::info!("mcp request");
        }
        response
    }
    .instrument(span)
    .await
}

async fn handle_post(state: &Arc<ProxyState>, headers: &HeaderMap, body: Body) -> Response {
    let null = Value::Null;
    if !origin_allowed(state, headers) {
        let e = mcp::error(&null, code::INVALID_REQUEST, "origin not allowed");
        return json_response(StatusCode::FORBIDDEN, &e);
    }
    let read = tokio::time::timeout(
        state.body_timeout,
        axum::body::to_bytes(body, state.max_body_bytes),
    );
    let bytes = match read.await {
        Ok(Ok(b)) => b,
        Err(_) => {
            let e = mcp::error(
                &null,
                code::INVALID_REQUEST,
                "request body not received in time",
            );
            return json_response(StatusCode::REQUEST_TIMEOUT, &e);
        }
        Ok(Err(_)) => {
            let e = mcp::error(
                &null,
                code::INVALID_REQUEST,
                "request body too large or unreadable",
            );
            return json_response(StatusCode::PAYLOAD_TOO_LARGE, &e);
        }
    };
    let mut message: Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(_) => {
            let e = mcp::error(&null, code::PARSE_ERROR, "parse error");
            return json_response(StatusCode::BAD_REQUEST, &e);
        }
    };
    if message.is_array() {
        // Refused before anything else looks at it: no batch reaches policy, audit or upstream.
        let e = mcp::error(
            &null,
            code::INVALID_REQUEST,
            "batch requests are not supported",
        );
        return json_response(StatusCode::BAD_REQUEST, &e);
    }
    let params = match &mut message {
        Value::Object(fields) => fields.remove("params").unwrap_or(Value::Null),
        _ => Value::Null,
    };
    let id = message.get("id").cloned();
    let method = message.get("method").and_then(Value::as_str);
    let valid = message.get("jsonrpc").and_then(Value::as_str) == Some("2.0")
        && id
            .as_ref()
            .is_none_or(|i| i.is_string() || i.is_i64() || i.is_u64());
    let span = tracing::Span::current();
    if let Some(m) = method {
        span.record("mcp.method", m);
    }
    let Some(method) = method.filter(|_| valid) else {
        if valid
            && method.is_none()
            && (message.get("result").is_some() || message.get("error").is_some())
        {
            // A response to a server request; the proxy sends none, so there is nothing to do.
            return StatusCode::ACCEPTED.into_response();
        }
        let e = mcp::error(
            id.as_ref().unwrap_or(&null),
            code::INVALID_REQUEST,
            "invalid request",
        );
        return json_response(StatusCode::BAD_REQUEST, &e);
    };
    let reply_id = id.as_ref().unwrap_or(&null);
    let era = match check_revision(headers, method, &params) {
        Ok(era) => era,
        Err((status, code, message, data)) => {
            let mut e = mcp::error(reply_id, code, &message);
            if let Some(data) = data {
                e["error"]["data"] = data;
            }
            return json_response(status, &e);
        }
    };
    if era == Era::Modern {
        let Some(id) = id else {
            return StatusCode::ACCEPTED.into_response();
        };
        let answer = mcp::request(state, &id, method, &params, era).await;
        let mut answer = answer;
        if let Some(Value::Object(result)) = answer.body.get_mut("result") {
            result.insert("resultType".into(), Value::from("complete"));
            if CACHEABLE.contains(&method) {
                result.insert("ttlMs".into(), Value::from(0));
                result.insert("cacheScope".into(), Value::from("private"));
            }
        }
        let not_found =
            answer.body.pointer("/error/code") == Some(&Value::from(code::METHOD_NOT_FOUND));
        if not_found {
            return json_response(StatusCode::NOT_FOUND, &answer.body);
        }
        return answer_response(answer);
    }
    let session = headers.get(SESSION_HEADER).and_then(|v| v.to_str().ok());
    if let Some(s) = session {
        let known = state
            .sessions
            .lock()
            .map(|set| set.contains(s))
            .unwrap_or(false);
        if !known && method != "initialize" {
            let e = mcp::error(
                id.as_ref().unwrap_or(&null),
                code::INVALID_REQUEST,
                "unknown session",
            );
            return json_response(StatusCode::NOT_FOUND, &e);
        }
    }
    let Some(id) = id else {
        // A notification: nothing to answer.
        return StatusCode::ACCEPTED.into_response();
    };
    if method == "initialize" {
        let answer = mcp::initialize(&id, &params);
        let session_id = new_session_id();
        if let Ok(mut set) = state.sessions.lock() {
            set.insert(session_id.clone());
        }
        let mut response = json_response(StatusCode::OK, &answer);
        if let Ok(v) = HeaderValue::from_str(&session_id) {
            response.headers_mut().insert(SESSION_HEADER, v);
        }
        return response;
    }
    answer_response(mcp::request(state, &id, method, &params, Era::Legacy).await)
}

fn answer_response(answer: mcp::Answer) -> Response {
    match answer.retry_after {
        None => json_response(StatusCode::OK, &answer.body),
        Some(wait) => {
            let mut response = json_response(StatusCode::TOO_MANY_REQUESTS, &answer.body);
            // Whole seconds, rounded up, at least one.
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            if let Ok(v) = HeaderValue::from_str(&secs.max(1).to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
            response
        }
    }
}

/// Why a request's revision or mirrored headers are refused: HTTP status, JSON-RPC code,
/// message, error data.
type Refusal = (StatusCode, i64, String, Option<Value>);

const META_VERSION: &str = "io.modelcontextprotocol/protocolVersion";
const META_CAPABILITIES: &str = "io.modelcontextprotocol/clientCapabilities";

/// Results 2026-07-28 lets clients cache, given hints: private (they depend on the agent's
/// policy) and not to be kept (policy and upstreams change without notice).
const CACHEABLE: [&str; 5] = [
    "tools/list",
    "prompts/list",
    "resources/list",
    "resources/templates/list",
    "resources/read",
];

/// The revision a request speaks, with its mirrored headers checked against the body.
fn check_revision(headers: &HeaderMap, method: &str, params: &Value) -> Result<Era, Refusal> {
    let mismatch = |message: String| -> Refusal {
        (
            StatusCode::BAD_REQUEST,
            code::HEADER_MISMATCH,
            message,
            None,
        )
    };
    let header = |name: &str| -> Result<Option<String>, Refusal> {
        match headers.get(name) {
            None => Ok(None),
            // Optional whitespace around a field value is not part of it (RFC 9110, 5.5).
            Some(v) => match v.to_str() {
                Ok(text) => Ok(Some(text.trim_matches([' ', '\t']).to_owned())),
                Err(_) => Err(mismatch(format!("{name} header holds invalid characters"))),
            },
        }
    };
    let version_header = header("mcp-protocol-version")?;
    let meta_version = params
        .get("_meta")
        .and_then(|m| m.get(META_VERSION))
        .and_then(Value::as_str);
    let modern = meta_version.is_some()
        || version_header
            .as_deref()
            .is_some_and(|v| MODERN_VERSIONS.contains(&v));
    let method_header = header("mcp-method")?;
    let name_header = header("mcp-name")?;
    if modern {
        let Some(version) = version_header.as_deref() else {
            return Err(mismatch(
                "Header mismatch: MCP-Protocol-Version header is required".into(),
            ));
        };
        let meta = params.get("_meta").and_then(Value::as_object);
        for key in [META_VERSION, META_CAPABILITIES] {
            if meta.and_then(|m| m.get(key)).is_none() {
                return Err((
                    StatusCode::BAD_REQUEST,
                    code::INVALID_PARAMS,
                    format!("Invalid params: _meta must hold {key}"),
                    None,
                ));
            }
        }
        if meta_version != Some(version) {
            return Err(mismatch(format!(
                "Header mismatch: MCP-Protocol-Version header value '{version}' does not match \
                 body value '{}'",
                meta_version.unwrap_or("")
            )));
        }
        if !MODERN_VERSIONS.contains(&version) {
            return Err(unsupported(version));
        }
        if method_header.is_none() {
            return Err(mismatch(
                "Header mismatch: Mcp-Method header is required".into(),
            ));
        }
    } else if let Some(version) = version_header.as_deref() {
        if method != "initialize" && !PROTOCOL_VERSIONS.contains(&version) {
            return Err(unsupported(version));
        }
    }
    if let Some(h) = method_header {
        if h != method {
            return Err(mismatch(format!(
                "Header mismatch: Mcp-Method header value '{h}' does not match body value '{method}'"
            )));
        }
    }
    let named = matches!(method, "tools/call" | "prompts/get" | "resources/read");
    let body_name = if method == "resources/read" {
        params.get("uri")
    } else {
        params.get("name")
    }
    .and_then(Value::as_str);
    match name_header {
        Some(h) => {
            let decoded = decode_sentinel(&h).ok_or_else(|| {
                mismatch("Header mismatch: Mcp-Name header is not valid base64".into())
            })?;
            if Some(decoded.as_str()) != body_name {
                return Err(mismatch(format!(
                    "Header mismatch: Mcp-Name header value '{h}' does not match body value '{}'",
                    body_name.unwrap_or("")
                )));
            }
        }
        None if modern && named => {
            return Err(mismatch(format!(
                "Header mismatch: Mcp-Name header is required for {method}"
            )));
        }
        None => {}
    }
    Ok(if modern { Era::Modern } else { Era::Legacy })
}

fn unsupported(requested: &str) -> Refusal {
    let supported = mcp::supported_versions();
    (
        StatusCode::BAD_REQUEST,
        code::UNSUPPORTED_PROTOCOL_VERSION,
        "Unsupported protocol version".into(),
        Some(serde_json::json!({"supported": supported, "requested": requested})),
    )
}

/// A header value, decoded when it is in the `=?base64?...?=` form; `None` when that form holds
/// no valid base64 of UTF-8.
fn decode_sentinel(value: &str) -> Option<String> {
    use base64::Engine as _;
    let Some(inner) = value
        .strip_prefix("=?base64?")
        .and_then(|v| v.strip_suffix("?="))
    else {
        return Some(value.to_owned());
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(inner)
        .ok()?;
    String::from_utf8(bytes).ok()
}

/// 128 random bits from the kernel, hex; a counter and the time if that fails.
fn new_session_id() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if read.is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        bytes = nanos.to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
