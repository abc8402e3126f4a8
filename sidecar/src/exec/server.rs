//! The HTTP face of the exec server: `POST /v1/exec`, `GET /v1/health` and `GET /healthz`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Serialize;
use serde_json::json;
use tokio::sync::Semaphore;
use tracing::{field, Instrument};

use super::command::{ExecRequest, Policy, RequestError};
use super::run::{self, Outcome, RunError};

/// Default cap on each output stream: 1 MiB.
pub const DEFAULT_MAX_OUTPUT_BYTES: usize = 1 << 20;
/// Default request body limit: 2 MiB (argv, env and stdin together).
pub const DEFAULT_MAX_BODY_BYTES: usize = 2 << 20;
/// Default number of commands running at once.
pub const DEFAULT_MAX_CONCURRENT: usize = 4;
/// Seconds a client is told to wait when every slot is taken.
const RETRY_AFTER_SECS: &str = "1";

/// Everything the exec server needs, already checked.
#[derive(Debug, Clone)]
pub struct ExecConfig {
    /// Workspace, environment and time limits.
    pub policy: Policy,
    /// Cap on each output stream, in bytes.
    pub max_output_bytes: usize,
    /// Request body limit, in bytes.
    pub max_body_bytes: usize,
    /// Commands running at once; more get HTTP 429.
    pub max_concurrent: usize,
    /// One INFO line per request.
    pub access_log: bool,
}

/// What the handlers share.
#[derive(Debug)]
pub struct ExecState {
    config: ExecConfig,
    slots: Arc<Semaphore>,
    next_id: AtomicU64,
}

impl ExecState {
    /// State for `config`.
    pub fn new(config: ExecConfig) -> Self {
        let slots = Arc::new(Semaphore::new(config.max_concurrent));
        Self {
            config,
            slots,
            next_id: AtomicU64::new(1),
        }
    }
}

/// The exec server's router.
pub fn app(state: Arc<ExecState>) -> Router {
    Router::new()
        .route("/v1/exec", post(exec))
        .route(
            "/v1/health",
            get(|| async { axum::Json(json!({"status": "ok"})) }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(state)
}

/// The body of a `POST /v1/exec` answer.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ExecResponse {
    /// Exit status; `null` when a signal ended the command.
    pub exit_code: Option<i32>,
    /// Number of the signal that ended the command (9 after a timeout).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// Standard output, as UTF-8 (invalid sequences replaced).
    pub stdout: String,
    /// Standard error, as UTF-8 (invalid sequences replaced).
    pub stderr: String,
    /// Standard output was cut at the cap.
    pub stdout_truncated: bool,
    /// Standard error was cut at the cap.
    pub stderr_truncated: bool,
    /// The time limit was reached and the command's process group killed.
    pub timed_out: bool,
    /// Wall time from start to exit.
    pub duration_ms: u64,
}

impl From<Outcome> for ExecResponse {
    fn from(o: Outcome) -> Self {
        Self {
            exit_code: o.exit_code,
            signal: o.signal,
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
            stdout_truncated: o.stdout_truncated,
            stderr_truncated: o.stderr_truncated,
            timed_out: o.timed_out,
            duration_ms: u64::try_from(o.duration.as_millis()).unwrap_or(u64::MAX),
        }
    }
}

/// Why a request got no result. One deliberate answer each.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The body is over the limit.
    #[error("request body exceeds {0} bytes")]
    TooLarge(usize),
    /// The body could not be read.
    #[error("cannot read request body: {0}")]
    Body(String),
    /// The body is not a valid request document.
    #[error("invalid request: {0}")]
    Json(#[source] serde_json::Error),
    /// The request fails a check.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// Every slot is taken.
    #[error("too many commands running, retry later")]
    Busy,
    /// The command could not be started.
    #[error(transparent)]
    Run(#[from] RunError),
}

impl ExecError {
    /// The HTTP status of each error.
    pub fn status(&self) -> StatusCode {
        match self {
            ExecError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ExecError::Body(_) | ExecError::Json(_) | ExecError::Request(_) => {
                StatusCode::BAD_REQUEST
            }
            ExecError::Busy => StatusCode::TOO_MANY_REQUESTS,
            ExecError::Run(RunError::Spawn { source, .. }) => match source.kind() {
                // The caller named a program that is not there or not runnable.
                std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => {
                    StatusCode::BAD_REQUEST
                }
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
            ExecError::Run(RunError::Pipe { .. }) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A short stable label for logs.
    fn label(&self) -> &'static str {
        match self {
            ExecError::TooLarge(_) => "too_large",
            ExecError::Body(_) | ExecError::Json(_) | ExecError::Request(_) => "bad_request",
            ExecError::Busy => "busy",
            ExecError::Run(_) => "spawn_failed",
        }
    }
}

impl IntoResponse for ExecError {
    fn into_response(self) -> Response {
        error_response(self.status(), &self)
    }
}

/// The JSON error answer of the exec API (`{"error": ...}`), with `Retry-After` on 429. Shared
/// by the exec server and the dispatcher, which speak the same API.
pub(crate) fn error_response(status: StatusCode, error: &dyn std::fmt::Display) -> Response {
    let body = json!({"error": error.to_string()}).to_string();
    let mut response = (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
    if status == StatusCode::TOO_MANY_REQUESTS {
        response.headers_mut().insert(
            header::RETRY_AFTER,
            header::HeaderValue::from_static(RETRY_AFTER_SECS),
        );
    }
    response
}

/// Records an answer of the exec API in the request's span.
pub(crate) fn record_answer(span: &tracing::Span, r: &ExecResponse) {
    span.record("outcome", "ran");
    span.record("exit_code", r.exit_code.map(i64::from));
    span.record("signal", r.signal.map(i64::from));
    span.record("timed_out", r.timed_out);
    span.record("stdout_bytes", r.stdout.len());
    span.record("stderr_bytes", r.stderr.len());
    span.record("duration_ms", r.duration_ms);
}

/// Records why a request failed. A JSON parser's message may quote the request (arguments,
/// stdin): for those only the position is kept.
pub(crate) fn record_failure(
    span: &tracing::Span,
    label: &'static str,
    json: Option<&serde_json::Error>,
    error: &dyn std::fmt::Display,
) {
    span.record("outcome", label);
    match json {
        Some(j) => span.record(
            "reason",
            field::display(format_args!(
                "invalid request at line {} column {}",
                j.line(),
                j.column()
            )),
        ),
        None => span.record("reason", field::display(error)),
    };
}

async fn exec(State(state): State<Arc<ExecState>>, body: Body) -> Response {
    let id = state.next_id.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!(
        "exec",
        exec.id = id,
        exec.program = field::Empty,
        exec.timeout_ms = field::Empty,
        status = field::Empty,
        outcome = field::Empty,
        exit_code = field::Empty,
        signal = field::Empty,
        timed_out = field::Empty,
        stdout_bytes = field::Empty,
        stderr_bytes = field::Empty,
        duration_ms = field::Empty,
        reason = field::Empty,
    );
    async move {
        let span = tracing::Span::current();
        let response = match handle(&state, &span, body).await {
            Ok(r) => {
                record_answer(&span, &r);
                (StatusCode::OK, axum::Json(r)).into_response()
            }
            Err(e) => {
                let json = match &e {
                    ExecError::Json(j) => Some(j),
                    _ => None,
                };
                record_failure(&span, e.label(), json, &e);
                e.into_response()
            }
        };
        span.record("status", response.status().as_u16());
        if state.config.access_log {
            tracing::info!("exec request");
        }
        response
    }
    .instrument(span)
    .await
}

async fn handle(
    state: &ExecState,
    span: &tracing::Span,
    body: Body,
) -> Result<ExecResponse, ExecError> {
    let bytes = read_body(state.config.max_body_bytes, body).await?;
    let request: ExecRequest = serde_json::from_slice(&bytes).map_err(ExecError::Json)?;
    if let Some(program) = request.argv.first() {
        // The program only: arguments may carry secrets.
        span.record("exec.program", program.as_str());
    }
    let prepared = request.prepare(&state.config.policy)?;
    span.record("exec.timeout_ms", prepared.timeout.as_millis() as u64);
    let _slot = state
        .slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| ExecError::Busy)?;
    let outcome = run::run(prepared, state.config.max_output_bytes).await?;
    Ok(outcome.into())
}

pub(crate) async fn read_body(limit: usize, body: Body) -> Result<axum::body::Bytes, ExecError> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        // `to_bytes` reports the limit through the error's source chain.
        let mut source: Option<&dyn std::error::Error> = Some(&e);
        while let Some(s) = source {
            if s.is::<http_body_util::LengthLimitError>() {
                return ExecError::TooLarge(limit);
            }
            source = s.source();
        }
        ExecError::Body(e.to_string())
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::exec::command::{base_env, DEFAULT_PATH};
    use axum::http::Request;
    use std::time::Duration;
    use tower::ServiceExt;

    fn config() -> ExecConfig {
        let root = std::env::temp_dir().canonicalize().unwrap();
        ExecConfig {
            policy: Policy {
                base_env: base_env(&root, DEFAULT_PATH, "/tmp", &[]),
                workspace: root,
                default_timeout: Duration::from_secs(5),
                max_timeout: Duration::from_secs(30),
            },
            max_output_bytes: 1024,
            max_body_bytes: 4096,
            max_concurrent: 1,
            access_log: false,
        }
    }

    async fn call(app: &Router, body: &str) -> (StatusCode, Option<String>, serde_json::Value) {
        let request = Request::post("/v1/exec")
            .header("content-type", "application/json")
            .body(Body::from(body.to_owned()))
            .unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let retry = response
            .headers()
            .get(header::RETRY_AFTER)
            .map(|v| v.to_str().unwrap().to_owned());
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, retry, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn runs_a_command() {
        let app = app(Arc::new(ExecState::new(config())));
        let (status, _, body) = call(
            &app,
            r#"{"argv": ["sh", "-c", "echo $0 $X; cat", "hi"], "stdin": "in", "env": {"X": "y"}}"#,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["stdout"], "hi y\nin");
        assert_eq!(body["exit_code"], 0);
        assert_eq!(body["stdout_truncated"], false);
        assert!(body.get("signal").is_none());
    }

    #[tokio::test]
    async fn timeout_answers_with_the_signal() {
        let app = app(Arc::new(ExecState::new(config())));
        let (status, _, body) = call(&app, r#"{"argv": ["sleep", "10"], "timeout_ms": 100}"#).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["exit_code"], serde_json::Value::Null);
        assert_eq!(
            (body["signal"].as_i64(), body["timed_out"].as_bool()),
            (Some(9), Some(true))
        );
    }

    #[tokio::test]
    async fn bad_requests_get_400_with_a_reason() {
        let app = app(Arc::new(ExecState::new(config())));
        for (body, reason) in [
            ("not json", "invalid request"),
            (r#"{"argv": "ls"}"#, "invalid request"),
            (r#"{"argv": []}"#, "argv must name a program"),
            (
                r#"{"argv": ["ls"], "cwd": "../etc"}"#,
                "must not contain ..",
            ),
            (
                r#"{"argv": ["ls"], "cwd": "/etc"}"#,
                "outside the workspace",
            ),
            (r#"{"argv": ["ls"], "timeout_ms": 999999999}"#, "timeout_ms"),
            (r#"{"argv": ["/no/such/program"]}"#, "cannot start"),
        ] {
            let (status, _, answer) = call(&app, body).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
            let error = answer["error"].as_str().unwrap();
            assert!(error.contains(reason), "{body}: {error}");
        }
    }

    #[tokio::test]
    async fn large_bodies_get_413() {
        let app = app(Arc::new(ExecState::new(config())));
        let body = format!(r#"{{"argv": ["true"], "stdin": "{}"}}"#, "x".repeat(5000));
        let (status, _, answer) = call(&app, &body).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
    }

    #[tokio::test]
    async fn a_full_server_answers_429_with_retry_after() {
        let app = app(Arc::new(ExecState::new(config())));
        let busy = {
            let app = app.clone();
            tokio::spawn(async move { call(&app, r#"{"argv": ["sleep", "1"]}"#).await })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (status, retry, answer) = call(&app, r#"{"argv": ["true"]}"#).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{answer}");
        assert_eq!(retry.as_deref(), Some(RETRY_AFTER_SECS));
        assert_eq!(busy.await.unwrap().0, StatusCode::OK);
        // The slot is free again.
        assert_eq!(call(&app, r#"{"argv": ["true"]}"#).await.0, StatusCode::OK);
    }

    #[tokio::test]
    async fn concurrent_load_runs_at_most_the_limit_and_refuses_the_rest() {
        let config = ExecConfig {
            max_concurrent: 3,
            ..config()
        };
        let app = app(Arc::new(ExecState::new(config)));
        let calls: Vec<_> = (0..12)
            .map(|_| {
                let app = app.clone();
                tokio::spawn(async move { call(&app, r#"{"argv": ["sleep", "0.5"]}"#).await })
            })
            .collect();
        let mut ok = 0;
        let mut busy = 0;
        for c in calls {
            let (status, retry, _) = c.await.unwrap();
            match status {
                StatusCode::OK => ok += 1,
                StatusCode::TOO_MANY_REQUESTS => {
                    assert_eq!(retry.as_deref(), Some(RETRY_AFTER_SECS));
                    busy += 1;
                }
                other => panic!("unexpected {other}"),
            }
        }
        assert_eq!((ok, busy), (3, 9));
    }

    #[tokio::test]
    async fn health_endpoints_answer() {
        let app = app(Arc::new(ExecState::new(config())));
        for path in ["/v1/health", "/healthz"] {
            let request = Request::get(path).body(Body::empty()).unwrap();
            let response = app.clone().oneshot(request).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK, "{path}");
        }
    }
}
