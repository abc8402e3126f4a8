//! The proxy's HTTP face: MCP Streamable HTTP at `POST /mcp` (JSON answers), session end with
//! `DELETE /mcp`, and `GET /healthz`.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::Value;
use tracing::{field, Instrument};

use super::mcp::{self, code};
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
        body.to_string(),
    )
        .into_response()
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
        let span = tracing::Span::current();
        span.record("status", response.status().as_u16());
        if state.access_log {
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
    let bytes = match axum::body::to_bytes(body, state.max_body_bytes).await {
        Ok(b) => b,
        Err(_) => {
            let e = mcp::error(
                &null,
                code::INVALID_REQUEST,
                "request body too large or unreadable",
            );
            return json_response(StatusCode::PAYLOAD_TOO_LARGE, &e);
        }
    };
    let message: Value = match serde_json::from_slice(&bytes) {
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
    // Stateless revisions name the method (and tool) in headers too; they must match the body.
    if let Some(h) = headers.get("mcp-method") {
        if h.to_str().ok() != Some(method) {
            let e = mcp::error(
                id.as_ref().unwrap_or(&null),
                code::INVALID_REQUEST,
                "Mcp-Method header does not match the body",
            );
            return json_response(StatusCode::BAD_REQUEST, &e);
        }
    }
    let params = message.get("params").cloned().unwrap_or(Value::Null);
    if let Some(h) = headers.get("mcp-name") {
        let name = params.get("name").and_then(Value::as_str);
        if h.to_str().ok() != name {
            let e = mcp::error(
                id.as_ref().unwrap_or(&null),
                code::INVALID_REQUEST,
                "Mcp-Name header does not match the body",
            );
            return json_response(StatusCode::BAD_REQUEST, &e);
        }
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
    let answer = mcp::request(state, &id, method, &params).await;
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
