//! The HTTP face of the dispatcher: the exec server's `POST /v1/exec`, `GET /v1/health` and
//! `GET /healthz`, each exec request run as one Job, answered from the runner's report in the
//! pod's log.

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

use super::job::{PlanError, Template, NAME_PREFIX, RUNNER_CONTAINER};
use super::jobs::{ApiError, JobEnd, Jobs, Terminated};
use crate::exec::command::ExecRequest;
use crate::exec::report::{self, NotStarted, Report};
use crate::exec::server::{
    error_response, read_body, respond, ExecApiError, ExecError, ExecResponse,
};

/// Container termination reasons that mean the runner never ran.
const START_FAILURES: [&str; 2] = ["StartError", "ContainerCannotRun"];
/// Room in the log read for what the runner writes besides its report (its own warnings).
const LOG_SLACK_BYTES: usize = 64 * 1024;

/// Everything the dispatcher needs, already checked.
#[derive(Debug, Clone)]
pub struct DispatchConfig {
    /// What every Job shares.
    pub template: Template,
    /// Time allowed past a command's time limit for the Job controller to report the end;
    /// after it the dispatcher answers `timed_out` and deletes the Job itself.
    pub wait_slack: Duration,
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
    /// The runner could not start the program (its report says why).
    #[error("cannot start {program:?}: {message}")]
    Start {
        /// `argv[0]`.
        program: String,
        /// Why, in short.
        reason: NotStarted,
        /// The system's message.
        message: String,
    },
    /// The runner itself could not start in the Job's container.
    #[error("the job's runner could not start: {0}")]
    RunnerStart(String),
    /// The Job failed without a container that ended (evicted, for instance).
    #[error("job {job} failed ({reason}) before its command ended")]
    NoOutcome {
        /// The Job.
        job: String,
        /// The Job's failure reason.
        reason: String,
    },
    /// A container of the Job cannot start (an image that cannot be pulled, for instance).
    #[error("the job's container {container} cannot start: {reason}: {message}")]
    Stuck {
        /// The container.
        container: String,
        /// The kubelet's waiting reason.
        reason: String,
        /// The kubelet's message.
        message: String,
    },
    /// The Job or its Secret could not be built (a bug: the template does not deserialise, or
    /// the API server's answer lacks the Job's name or uid).
    #[error("cannot build the job: {0}")]
    Build(#[source] serde_json::Error),
    /// No random name for the stdin Secret: the system's random source failed.
    #[error("cannot name the job's stdin secret: no random bytes")]
    NoRandom,
    /// A call to the Kubernetes API failed.
    #[error(transparent)]
    Api(#[from] ApiError),
}

impl ExecApiError for DispatchError {
    fn json(&self) -> Option<&serde_json::Error> {
        match self {
            DispatchError::Json(j) => Some(j),
            _ => None,
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            DispatchError::Body(e) => e.status(),
            DispatchError::Json(_) | DispatchError::Plan(_) => StatusCode::BAD_REQUEST,
            // The caller named a program that is not there or not runnable.
            DispatchError::Start {
                reason: NotStarted::NotFound | NotStarted::PermissionDenied,
                ..
            } => StatusCode::BAD_REQUEST,
            DispatchError::Start {
                reason: NotStarted::Other,
                ..
            } => StatusCode::BAD_GATEWAY,
            DispatchError::Busy => StatusCode::TOO_MANY_REQUESTS,
            DispatchError::Build(_) | DispatchError::NoRandom => StatusCode::INTERNAL_SERVER_ERROR,
            DispatchError::NoOutcome { .. }
            | DispatchError::Stuck { .. }
            | DispatchError::RunnerStart(_) => StatusCode::BAD_GATEWAY,
            DispatchError::Api(ApiError::Refused { .. } | ApiError::Vanished(_)) => {
                StatusCode::BAD_GATEWAY
            }
            DispatchError::Api(ApiError::Unreachable { .. } | ApiError::Timeout { .. }) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    fn label(&self) -> &'static str {
        match self {
            DispatchError::Body(_) | DispatchError::Json(_) | DispatchError::Plan(_) => {
                "bad_request"
            }
            DispatchError::Busy => "busy",
            DispatchError::Start { .. } => "spawn_failed",
            DispatchError::RunnerStart(_) => "runner_failed",
            DispatchError::NoOutcome { .. } => "no_outcome",
            DispatchError::Stuck { .. } => "not_started",
            DispatchError::Build(_) | DispatchError::NoRandom => "internal",
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
        let outcome = handle(&state, id, &span, body).await;
        respond(&span, outcome, state.config.access_log)
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
    let template = &config.template;
    let plan = template.plan(request)?;
    span.record("exec.timeout_ms", plan.timeout.as_millis() as u64);
    let request_id = format!("{}-{id}", state.epoch);
    let stdin_secret = match plan.stdin {
        Some(_) => Some(secret_name()?),
        None => None,
    };
    let job = template
        .job(&plan, &request_id, stdin_secret.as_deref())
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
                let selector = template.request_selector(&request_id);
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
    if let (Some(secret), Some(stdin)) = (&stdin_secret, &plan.stdin) {
        // Created after the Job, to be owned by it; the kubelet waits for it to mount it.
        let secret = template
            .stdin_secret(secret, &created, &request_id, stdin)
            .map_err(DispatchError::Build)?;
        state.jobs.create_secret(&secret).await?;
    }
    let version = created
        .metadata
        .resource_version
        .clone()
        .unwrap_or_default();
    let end = state
        .jobs
        .wait(&name, version, plan.timeout + config.wait_slack)
        .await?;
    let duration = started.elapsed();
    if let Some(JobEnd::Stuck {
        container,
        reason,
        message,
    }) = end
    {
        // Dropping `cleanup` deletes the Job.
        return Err(DispatchError::Stuck {
            container,
            reason,
            message,
        });
    }
    let container = state.jobs.terminated(&name).await?;
    let job_timed_out = matches!(end, None | Some(JobEnd::DeadlineExceeded));
    match (&end, &container) {
        (_, Some(c)) if c.ended && START_FAILURES.contains(&c.reason.as_str()) => {
            return Err(DispatchError::RunnerStart(format!(
                "{}: {}",
                c.reason, c.message
            )));
        }
        (Some(JobEnd::Failed(reason)), c) if !c.as_ref().is_some_and(|c| c.ended) => {
            let reason = match c.as_ref().and_then(|c| c.runner_install.as_ref()) {
                Some(install) => format!("{reason}; init container {RUNNER_CONTAINER}: {install}"),
                None => reason.clone(),
            };
            return Err(DispatchError::NoOutcome { job: name, reason });
        }
        _ => {}
    }
    let cap = template.max_output_bytes;
    let log = match &container {
        Some(c) => {
            let limit = report::max_line_bytes(cap).saturating_add(LOG_SLACK_BYTES);
            match state.jobs.log(&c.pod, limit).await {
                Ok(log) => Some(log),
                // Past the deadline the Job controller deletes the pod: its log may be gone.
                Err(e) if job_timed_out => {
                    tracing::debug!(error = %e, "no log after the deadline");
                    None
                }
                Err(e) => return Err(e.into()),
            }
        }
        None => None,
    };
    let mut answer = answer(&end, container.as_ref(), log, cap, &program, duration)?;
    answer.timed_out |= job_timed_out;
    if let Some(name) = cleanup.disarm() {
        if let Err(e) = state.jobs.delete(&name).await {
            // The result is known; ttlSecondsAfterFinished removes the Job later.
            tracing::warn!(error = %e, "cannot delete job");
        }
    }
    Ok(answer)
}

/// A random name for the Secret of a Job's standard input. It must be known before the Job is
/// created (the pod mounts it), when the Job's own generated name is not.
fn secret_name() -> Result<String, DispatchError> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 8];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| DispatchError::NoRandom)?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("{NAME_PREFIX}stdin-{hex}"))
}

/// The answer from what is left of a Job: the runner's report in its log when there is one,
/// else the container's status and the plain log (`elapsed` as the duration), with a note
/// saying so.
fn answer(
    end: &Option<JobEnd>,
    container: Option<&Terminated>,
    log: Option<(Vec<u8>, bool)>,
    cap: usize,
    program: &str,
    elapsed: Duration,
) -> Result<ExecResponse, DispatchError> {
    let report = log.as_ref().map(|(bytes, _)| Report::find(bytes));
    match report {
        Some(Ok(Report::Ran(outcome))) => {
            let mut answer = ExecResponse::from(outcome);
            // The runner caps its output; a report that does not is cut here.
            for (text, truncated) in [
                (&mut answer.stdout, &mut answer.stdout_truncated),
                (&mut answer.stderr, &mut answer.stderr_truncated),
            ] {
                if text.len() > cap {
                    let mut end = cap;
                    while !text.is_char_boundary(end) {
                        end -= 1;
                    }
                    text.truncate(end);
                    *truncated = true;
                }
            }
            return Ok(answer);
        }
        Some(Ok(Report::NotStarted { reason, message })) => {
            return Err(DispatchError::Start {
                program: program.to_owned(),
                reason,
                message,
            });
        }
        _ => {}
    }
    let mut answer = ExecResponse {
        exit_code: None,
        signal: None,
        stdout: String::new(),
        stderr: String::new(),
        stdout_truncated: false,
        stderr_truncated: false,
        timed_out: false,
        duration_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
        note: None,
    };
    if *end == Some(JobEnd::Complete) {
        // What the container reports, below; exit 0 is what `Complete` means.
        answer.exit_code = Some(0);
    }
    let job_timed_out = matches!(end, None | Some(JobEnd::DeadlineExceeded));
    if let Some(c) = container.filter(|c| c.ended && !job_timed_out) {
        (answer.exit_code, answer.signal) = exit_of(c);
    }
    answer.note = Some(match (report, log) {
        (Some(Err(e)), Some((bytes, truncated))) => {
            let kept = &bytes[..bytes.len().min(cap)];
            answer.stdout = String::from_utf8_lossy(kept).into_owned();
            answer.stdout_truncated = truncated || bytes.len() > cap;
            format!(
                "the job's runner left {e} in the pod's log; stdout holds the log, exit_code \
                 the container's status"
            )
        }
        _ if job_timed_out => {
            "the command's output went with its pod at the job's deadline".to_owned()
        }
        _ => "the job's pod was gone before its log could be read".to_owned(),
    });
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::exec::report::Outcome;

    fn ended(exit_code: i32) -> Terminated {
        Terminated {
            pod: "p".into(),
            ended: true,
            exit_code: Some(exit_code),
            reason: "Error".into(),
            ..Terminated::default()
        }
    }

    #[test]
    fn the_report_in_the_log_is_the_answer() {
        let report = Report::Ran(Outcome {
            exit_code: None,
            signal: Some(15),
            stdout: b"out".to_vec(),
            stderr: b"err".to_vec(),
            stdout_truncated: false,
            stderr_truncated: true,
            timed_out: false,
            duration_ms: 7,
        });
        let log = format!("a warning\n{}", report.line()).into_bytes();
        let end = Some(JobEnd::Failed("BackoffLimitExceeded".into()));
        let a = answer(
            &end,
            Some(&ended(143)),
            Some((log, false)),
            10,
            "x",
            Duration::ZERO,
        )
        .unwrap();
        assert_eq!((a.exit_code, a.signal), (None, Some(15)));
        assert_eq!((a.stdout.as_str(), a.stderr.as_str()), ("out", "err"));
        assert_eq!((a.stdout_truncated, a.stderr_truncated), (false, true));
        assert_eq!((a.duration_ms, a.note), (7, None));

        let not_started = Report::NotStarted {
            reason: NotStarted::NotFound,
            message: "No such file or directory (os error 2)".into(),
        };
        let log = not_started.line().into_bytes();
        let e = answer(
            &end,
            Some(&ended(127)),
            Some((log, false)),
            10,
            "x",
            Duration::ZERO,
        )
        .unwrap_err();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            e.to_string(),
            "cannot start \"x\": No such file or directory (os error 2)"
        );
    }

    #[test]
    fn a_log_without_a_report_is_answered_as_it_is_with_a_note() {
        let end = Some(JobEnd::Failed("BackoffLimitExceeded".into()));
        let log = b"agentvm-sidecar run: cannot become a child subreaper\n".to_vec();
        let a = answer(
            &end,
            Some(&ended(125)),
            Some((log, false)),
            20,
            "x",
            Duration::ZERO,
        )
        .unwrap();
        assert_eq!(a.exit_code, Some(125));
        assert_eq!(a.stdout, "agentvm-sidecar run:");
        assert!(a.stdout_truncated);
        let note = a.note.unwrap();
        assert!(
            note.contains("no report line") && note.contains("stdout holds the log"),
            "{note}"
        );

        let report = Report::NotStarted {
            reason: NotStarted::Other,
            message: "m".into(),
        };
        let cut = report.line()[..30].to_owned();
        let a = answer(
            &end,
            Some(&ended(1)),
            Some((cut.into_bytes(), true)),
            100,
            "x",
            Duration::ZERO,
        )
        .unwrap();
        assert!(a.note.unwrap().contains("unreadable report line"));
    }

    #[test]
    fn no_log_at_the_deadline_or_after_completion_is_said_so() {
        let a = answer(
            &Some(JobEnd::DeadlineExceeded),
            None,
            None,
            10,
            "x",
            Duration::ZERO,
        )
        .unwrap();
        assert_eq!((a.exit_code, a.signal), (None, None));
        assert!(a.note.unwrap().contains("at the job's deadline"));
        let a = answer(&Some(JobEnd::Complete), None, None, 10, "x", Duration::ZERO).unwrap();
        assert_eq!(a.exit_code, Some(0));
        assert!(a.note.unwrap().contains("gone before its log"));
    }
}
