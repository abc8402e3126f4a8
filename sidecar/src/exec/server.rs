//! The HTTP face of the exec server: `POST /v1/exec`, `GET /v1/health` and `GET /healthz`.

use std::path::PathBuf;
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
use super::report::Outcome;
use super::run::{self, RunError};

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
    /// The program that runs each command: this one (`/proc/self/exe`), whose `run`
    /// subcommand is the runner.
    pub runner: PathBuf,
}

/// What the handlers share.
#[derive(Debug)]
pub struct ExecState {
    config: ExecConfig,
    slots: Arc<Semaphore>,
    next_id: AtomicU64,
}

impl ExecState {
    /// State for `config`. Makes this process a child subreaper that kills whatever a runner
    /// that died left behind (see [`crate::reaper::kill_orphans`]), so every child of the
    /// process must be started through the reaper.
    pub fn new(config: ExecConfig) -> Self {
        if let Err(e) = crate::reaper::kill_orphans() {
            tracing::warn!(
                error = %e,
                "cannot become a child subreaper: if a runner dies, what its command started \
                 survives"
            );
        }
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
    /// What the server could not find out, when it could not (the dispatcher, when a Job left
    /// no report).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
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
            duration_ms: o.duration_ms,
            note: None,
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

impl ExecApiError for ExecError {
    fn json(&self) -> Option<&serde_json::Error> {
        match self {
            ExecError::Json(j) => Some(j),
            _ => None,
        }
    }

    fn status(&self) -> StatusCode {
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
            ExecError::Run(RunError::Runner(_)) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn label(&self) -> &'static str {
        match self {
            ExecError::TooLarge(_) => "too_large",
            ExecError::Body(_) | ExecError::Json(_) | ExecError::Request(_) => "bad_request",
            ExecError::Busy => "busy",
            ExecError::Run(RunError::Spawn { .. }) => "spawn_failed",
            ExecError::Run(RunError::Runner(_)) => "runner_failed",
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

/// What the exec server's and the dispatcher's errors tell their shared API answer.
pub(crate) trait ExecApiError: std::fmt::Display {
    /// HTTP status of the answer.
    fn status(&self) -> StatusCode;
    /// A short stable label for logs.
    fn label(&self) -> &'static str;
    /// The parser error of a body that is not a valid request, whose message may quote the
    /// request (arguments, stdin): for those only the position is logged.
    fn json(&self) -> Option<&serde_json::Error>;
}

/// The answer to one exec request, recorded in the request's span (`span`), with the access
/// log line when `access_log` is on.
pub(crate) fn respond<E: ExecApiError>(
    span: &tracing::Span,
    outcome: Result<ExecResponse, E>,
    access_log: bool,
) -> Response {
    let response = match outcome {
        Ok(r) => {
            record_answer(span, &r);
            (StatusCode::OK, axum::Json(r)).into_response()
        }
        Err(e) => {
            span.record("outcome", e.label());
            match e.json() {
                Some(j) => span.record(
                    "reason",
                    field::display(format_args!(
                        "invalid request at line {} column {}",
                        j.line(),
                        j.column()
                    )),
                ),
                None => span.record("reason", field::display(&e)),
            };
            error_response(e.status(), &e)
        }
    };
    span.record("status", response.status().as_u16());
    if access_log {
        tracing::info!("exec request");
    }
    response
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
        let outcome = handle(&state, &span, body).await;
        respond(&span, outcome, state.config.access_log)
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
    let outcome = run::run(
        &state.config.runner,
        prepared,
        state.config.max_output_bytes,
    )
    .await?;
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
