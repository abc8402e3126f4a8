//! The HTTP face of the dispatcher: the exec server's `POST /v1/exec`, `GET /v1/health` and
//! `GET /healthz`, each exec request run as one Job.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::json;
use tokio::sync::Semaphore;
use tracing::{field, Instrument};

use super::job::{PlanError, Template};
use super::jobs::{ApiError, JobEnd, Jobs, Terminated};
use crate::exec::command::ExecRequest;
use crate::exec::server::{
    error_response, read_body, record_answer, record_failure, ExecError, ExecResponse,
};

/// Container termination reasons that mean the program never ran.
const START_FAILURES: [&str; 2] = ["StartError", "ContainerCannotRun"];

/// Everything the dispatcher needs, already checked.
#[derive(Debug, Clone)]
pub struct DispatchConfig {
    /// What every Job shares.
    pub template: Template,
    /// Time allowed past a command's time limit for the Job controller to report the end;
    /// after it the dispatcher answers `timed_out` and deletes the Job itself.
    pub wait_slack: Duration,
    /// Cap on the output, in bytes.
    pub max_output_bytes: usize,
    /// Request body limit, in bytes.
    pub max_body_bytes: usize,
    /// Jobs running at once; more get HTTP 429.
    pub max_concurrent: usize,
    /// One INFO line per request.
    pub access_log: bool,
}

/// What the handlers share.
#[derive(Debug)]
pub struct DispatchState {
    config: DispatchConfig,
    jobs: Jobs,
    slots: Arc<Semaphore>,
    next_id: AtomicU64,
    /// Start time in milliseconds, in hex: with `next_id`, a request id unique across restarts.
    epoch: String,
}

impl DispatchState {
    /// State for `config`, creating Jobs through `jobs`.
    pub fn new(config: DispatchConfig, jobs: Jobs) -> Self {
        let slots = Arc::new(Semaphore::new(config.max_concurrent));
        Self {
            config,
            jobs,
            slots,
            next_id: AtomicU64::new(1),
            epoch: format!(
                "{:x}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis())
                    .unwrap_or_default()
            ),
        }
    }

    /// Deletes every Job of this dispatcher: at start-up those a previous run left behind, at
    /// shutdown those of requests still in flight. The number deleted.
    pub async fn delete_orphans(&self) -> Result<usize, ApiError> {
        self.jobs.delete_all(&self.config.template.selector()).await
    }
}

/// The dispatcher's router.
pub fn app(state: Arc<DispatchState>) -> Router {
    Router::new()
        .route("/v1/exec", post(exec))
        .route(
            "/v1/health",
            get(|| async { axum::Json(json!({"status": "ok"})) }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(state)
}

/// Why a request got no result. One deliberate answer each.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    /// The body is too large or unreadable.
    #[error(transparent)]
    Body(ExecError),
    /// The body is not a valid request document.
    #[error("invalid request: {0}")]
    Json(#[source] serde_json::Error),
    /// The request fails a check.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// Every slot is taken.
    #[error("too many commands running, retry later")]
    Busy,
    /// The program could not be started in the Job's container.
    #[error("cannot start {program:?}: {message}")]
    Start {
        /// `argv[0]`.
        program: String,
        /// The container runtime's reason and message.
        message: String,
    },
    /// The Job failed without a container that ended (evicted, for instance).
    #[error("job {job} failed ({reason}) before its command ended")]
    NoOutcome {
        /// The Job.
        job: String,
        /// The Job's failure reason.
        reason: String,
    },
    /// The Job's container cannot start (an image that cannot be pulled, for instance).
    #[error("the job's container cannot start: {reason}: {message}")]
    Stuck {
        /// The kubelet's waiting reason.
        reason: String,
        /// The kubelet's message.
        message: String,
    },
    /// The Job could not be built (a bug: the template does not deserialise).
    #[error("cannot build the job: {0}")]
    Build(#[source] serde_json::Error),
    /// A call to the Kubernetes API failed.
    #[error(transparent)]
    Api(#[from] ApiError),
}

impl DispatchError {
    /// The HTTP status of each error.
    pub fn status(&self) -> StatusCode {
        match self {
            DispatchError::Body(e) => e.status(),
            DispatchError::Json(_) | DispatchError::Plan(_) | DispatchError::Start { .. } => {
                StatusCode::BAD_REQUEST
            }
            DispatchError::Busy => StatusCode::TOO_MANY_REQUESTS,
            DispatchError::Build(_) => StatusCode::INTERNAL_SERVER_ERROR,
            DispatchError::NoOutcome { .. } | DispatchError::Stuck { .. } => {
                StatusCode::BAD_GATEWAY
            }
            DispatchError::Api(ApiError::Refused { .. } | ApiError::Vanished(_)) => {
                StatusCode::BAD_GATEWAY
            }
            DispatchError::Api(ApiError::Unreachable { .. } | ApiError::Timeout { .. }) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// A short stable label for logs.
    fn label(&self) -> &'static str {
        match self {
            DispatchError::Body(_) | DispatchError::Json(_) | DispatchError::Plan(_) => {
                "bad_request"
            }
            DispatchError::Busy => "busy",
            DispatchError::Start { .. } => "spawn_failed",
            DispatchError::NoOutcome { .. } => "no_outcome",
            DispatchError::Stuck { .. } => "not_started",
            DispatchError::Build(_) => "internal",
            DispatchError::Api(_) => "api_failed",
        }
    }
}

impl IntoResponse for DispatchError {
    fn into_response(self) -> Response {
        error_response(self.status(), &self)
    }
}

async fn exec(State(state): State<Arc<DispatchState>>, body: Body) -> Response {
    let id = state.next_id.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!(
        "exec",
        exec.id = id,
        exec.program = field::Empty,
        exec.timeout_ms = field::Empty,
        k8s.job = field::Empty,
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
        let response = match handle(&state, id, &span, body).await {
            Ok(r) => {
                record_answer(&span, &r);
                (StatusCode::OK, axum::Json(r)).into_response()
            }
            Err(e) => {
                let json = match &e {
                    DispatchError::Json(j) => Some(j),
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

/// Deletes the Job when dropped before [`Cleanup::disarm`]: a client that hangs up, or an
/// error on the way, leaves no Job behind.
struct Cleanup {
    jobs: Jobs,
    name: Option<String>,
}

impl Cleanup {
    fn disarm(&mut self) -> Option<String> {
        self.name.take()
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(name) = self.name.take() {
            let jobs = self.jobs.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    if let Err(e) = jobs.delete(&name).await {
                        tracing::warn!(k8s.job = %name, error = %e, "cannot delete job");
                    }
                });
            }
        }
    }
}

async fn handle(
    state: &DispatchState,
    id: u64,
    span: &tracing::Span,
    body: Body,
) -> Result<ExecResponse, DispatchError> {
    let config = &state.config;
    let bytes = read_body(config.max_body_bytes, body)
        .await
        .map_err(DispatchError::Body)?;
    let request: ExecRequest = serde_json::from_slice(&bytes).map_err(DispatchError::Json)?;
    let program = request.argv.first().cloned().unwrap_or_default();
    // The program only: arguments may carry secrets.
    span.record("exec.program", program.as_str());
    let plan = config.template.plan(request)?;
    span.record("exec.timeout_ms", plan.timeout.as_millis() as u64);
    let request_id = format!("{}-{id}", state.epoch);
    let job = config
        .template
        .job(&plan, &request_id)
        .map_err(DispatchError::Build)?;
    let _slot = state
        .slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| DispatchError::Busy)?;

    let started = Instant::now();
    let created = match state.jobs.create(&job).await {
        Ok(created) => created,
        Err(e) => {
            if matches!(e, ApiError::Timeout { .. } | ApiError::Unreachable { .. }) {
                // The API server may have created the Job without the answer reaching us, or
                // may still: look for it once the create would have been answered.
                let jobs = state.jobs.clone();
                let selector = config.template.request_selector(&request_id);
                tokio::spawn(async move {
                    tokio::time::sleep(jobs.api_timeout()).await;
                    if let Err(e) = jobs.delete_all(&selector).await {
                        tracing::debug!(error = %e, "cannot look for a job created unanswered");
                    }
                });
            }
            return Err(e.into());
        }
    };
    let name = created.metadata.name.clone().unwrap_or_default();
    span.record("k8s.job", name.as_str());
    let mut cleanup = Cleanup {
        jobs: state.jobs.clone(),
        name: Some(name.clone()),
    };
    let version = created.metadata.resource_version.unwrap_or_default();
    let end = state
        .jobs
        .wait(&name, version, plan.timeout + config.wait_slack)
        .await?;
    let duration = started.elapsed();
    if let Some(JobEnd::Stuck { reason, message }) = end {
        // Dropping `cleanup` deletes the Job.
        return Err(DispatchError::Stuck { reason, message });
    }
    let container = state.jobs.terminated(&name).await?;
    let timed_out = matches!(end, None | Some(JobEnd::DeadlineExceeded));
    let mut answer = ExecResponse {
        exit_code: None,
        signal: None,
        stdout: String::new(),
        stderr: String::new(),
        stdout_truncated: false,
        stderr_truncated: false,
        timed_out,
        duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
        note: None,
    };
    match (&end, &container) {
        (_, Some(c)) if c.ended && START_FAILURES.contains(&c.reason.as_str()) => {
            return Err(DispatchError::Start {
                program,
                message: format!("{}: {}", c.reason, c.message),
            });
        }
        (Some(JobEnd::Failed(reason)), c) if !c.as_ref().is_some_and(|c| c.ended) => {
            return Err(DispatchError::NoOutcome {
                job: name,
                reason: reason.clone(),
            });
        }
        _ => {}
    }
    if end == Some(JobEnd::Complete) {
        // What the container reports, below; exit 0 is what `Complete` means.
        answer.exit_code = Some(0);
    }
    if let Some(c) = &container {
        if c.ended && !timed_out {
            (answer.exit_code, answer.signal) = exit_of(c);
        }
        let log = state.jobs.log(&c.pod, config.max_output_bytes).await;
        match log {
            Ok((bytes, truncated)) => {
                answer.stdout = String::from_utf8_lossy(&bytes).into_owned();
                answer.stdout_truncated = truncated;
            }
            // Past the deadline the Job controller deletes the pod: its log may be gone.
            Err(e) if timed_out => tracing::debug!(error = %e, "no log after the deadline"),
            Err(e) => return Err(e.into()),
        }
    }
    if let Some(name) = cleanup.disarm() {
        if let Err(e) = state.jobs.delete(&name).await {
            // The result is known; ttlSecondsAfterFinished removes the Job later.
            tracing::warn!(error = %e, "cannot delete job");
        }
    }
    Ok(answer)
}

/// Exit code and signal as the exec server reports them: a signal, when the runtime names one,
/// replaces the exit code.
fn exit_of(c: &Terminated) -> (Option<i32>, Option<i32>) {
    match c.signal {
        Some(signal) if signal != 0 => (None, Some(signal)),
        _ => (c.exit_code, None),
    }
}
