//! `agentvm serve`: the admission endpoints over HTTPS and the probe port over plain HTTP.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::routing::{get, post};
use axum::Router;
use serde_json::json;
use tracing::{field, Instrument};

use crate::admission::{Facts, Mode, Outcome, Reviewer, Verdict};
use crate::metrics::{kind_label, Metrics, ReviewLabels};
use crate::review::{self, Response};

/// Default request body limit: an AdmissionReview of an UPDATE carries two objects of up to
/// 3 MiB (the API server's own limit) each.
pub const DEFAULT_MAX_BODY_BYTES: usize = 8 << 20;

/// Reviews read or running at once; the others wait (up to [`BODY_TIMEOUT`]) for a slot. Bounds
/// the memory that large reviews take.
pub const MAX_IN_FLIGHT: usize = 16;

/// How long a client may take to send a body, and a review may wait for a slot.
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Requests up to this size are reviewed on the async worker that read them; larger ones on
/// the blocking pool.
const INLINE_REVIEW_BYTES: usize = 256 << 10;

/// Wall-clock budget of one policy evaluation.
pub const POLICY_TIME_LIMIT: std::time::Duration = std::time::Duration::from_secs(1);

/// What the handlers share.
#[derive(Debug)]
pub struct AppState {
    /// Decides reviews.
    pub reviewer: Reviewer,
    /// Metrics registry.
    pub metrics: Metrics,
    /// Requests with bodies above this size get 413.
    pub max_body_bytes: usize,
    /// Log one INFO line per review.
    pub access_log: bool,
    /// False once shutdown has begun, so that load balancers stop sending.
    pub ready: AtomicBool,
    /// The cluster, for CONNECT reviews' pod lookups; `None` without cluster access.
    pub cluster: Option<crate::cluster::Cluster>,
    /// Slots for reviews in flight.
    pub in_flight: Arc<tokio::sync::Semaphore>,
    /// The slot for a large review in flight.
    pub large_in_flight: Arc<tokio::sync::Semaphore>,
    /// Keeps the deny-egress NetworkPolicy, with cluster access.
    pub network: Option<crate::network::NetworkPolicies>,
}

impl AppState {
    /// State with the defaults for everything but the reviewer.
    pub fn new(reviewer: Reviewer) -> Self {
        Self {
            reviewer,
            metrics: Metrics::new(),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            access_log: true,
            ready: AtomicBool::new(true),
            cluster: None,
            in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
            large_in_flight: Arc::new(tokio::sync::Semaphore::new(1)),
            network: None,
        }
    }
}

/// The admission router: `POST /mutate` and `POST /validate` (query strings such as
/// `?timeout=10s` are ignored).
pub fn app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .route("/validate", post(validate))
        .with_state(state)
}

/// The probe router: `/livez`, `/readyz`, `/metrics`.
pub fn probe_app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(state): State<Arc<AppState>>) -> HttpResponse {
    if state.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response()
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> HttpResponse {
    let body = state.metrics.encode();
    // prometheus-client writes the OpenMetrics text format.
    let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

async fn mutate(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> HttpResponse {
    handle(state, Mode::Mutate, headers, body).await
}

async fn validate(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> HttpResponse {
    handle(state, Mode::Validate, headers, body).await
}

/// Why a request got no review. One deliberate answer each.
#[derive(Debug, thiserror::Error)]
enum HandlerError {
    #[error("request body exceeds {0} bytes")]
    TooLarge(usize),
    #[error("cannot read request body: {0}")]
    Body(String),
    #[error("request body not received within {} s", BODY_TIMEOUT.as_secs())]
    Timeout,
    #[error("too many reviews in flight, try again")]
    Busy,
    #[error(transparent)]
    Envelope(#[from] review::EnvelopeError),
}

impl HandlerError {
    fn status(&self) -> StatusCode {
        match self {
            HandlerError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            HandlerError::Timeout => StatusCode::REQUEST_TIMEOUT,
            HandlerError::Busy => StatusCode::SERVICE_UNAVAILABLE,
            HandlerError::Body(_) | HandlerError::Envelope(_) => StatusCode::BAD_REQUEST,
        }
    }
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> HttpResponse {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn handle(state: Arc<AppState>, mode: Mode, headers: HeaderMap, body: Body) -> HttpResponse {
    let started = Instant::now();
    let span = tracing::info_span!(
        "admission",
        endpoint = mode.as_str(),
        admission.uid = field::Empty,
        k8s.namespace = field::Empty,
        k8s.kind = field::Empty,
        operation = field::Empty,
        dry_run = field::Empty,
        allowed = field::Empty,
        patched = field::Empty,
        profile = field::Empty,
        decision = field::Empty,
        reason = field::Empty,
    );
    async move {
        // Bounded work in flight: a permit before the body is read bounds memory too. Large
        // reviews (declared over 256 KiB, or of unknown length) have one slot of their own:
        // their JSON trees take some twenty times the body's size, and they must not hold up
        // the usual small ones.
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        let pool = match declared {
            Some(n) if n <= INLINE_REVIEW_BYTES => &state.in_flight,
            _ => &state.large_in_flight,
        };
        let acquire = pool.clone().acquire_owned();
        let permit = match tokio::time::timeout(BODY_TIMEOUT, acquire).await {
            Ok(Ok(p)) => Ok(p),
            _ => Err(HandlerError::Busy),
        };
        let read = match permit {
            Ok(p) => read_request(&state, &headers, body).await.map(|r| (p, r)),
            Err(e) => Err(e),
        };
        let (permit, (request, body_len)) = match read {
            Ok(pair) => pair,
            Err(e) => {
                let span = tracing::Span::current();
                span.record("decision", "bad_request");
                span.record("reason", field::display(&e));
                if state.access_log {
                    tracing::info!("admission request rejected");
                }
                let labels = ReviewLabels {
                    endpoint: mode.as_str(),
                    operation: "none",
                    kind: "none",
                    decision: "bad_request",
                };
                state
                    .metrics
                    .observe(labels, started.elapsed().as_secs_f64());
                return json_response(e.status(), &json!({"error": e.to_string()}));
            }
        };
        let span = tracing::Span::current();
        span.record("admission.uid", request.uid.as_str());
        span.record("k8s.namespace", request.namespace.as_str());
        span.record("k8s.kind", request.kind.as_str());
        span.record("operation", request.operation.as_str());
        span.record("dry_run", request.dry_run);

        let facts = match &state.cluster {
            Some(cluster) => cluster.facts(&request).await,
            None => Facts::default(),
        };
        // A review of a usual object takes well under a millisecond and runs right here; a
        // large one (tens of thousands of containers take seconds) runs on the blocking pool,
        // so that it cannot hold the async workers that also serve the probes. Either way a
        // panic is answered as a fail-closed denial.
        let uid = request.uid.clone();
        let panicked = |_| {
            tracing::error!("review panicked; denying (fail closed)");
            Outcome {
                response: Response::deny(
                    &uid,
                    500,
                    "agentvm internal error, denying (fail closed)",
                ),
                verdict: Verdict::Error,
                profile: None,
            }
        };
        let request = Arc::new(request);
        let outcome = if body_len <= INLINE_REVIEW_BYTES {
            let reviewer = &state.reviewer;
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                reviewer.review_with(mode, &request, facts)
            }));
            drop(permit);
            out.unwrap_or_else(panicked)
        } else {
            let reviewer = state.reviewer.clone();
            let job = request.clone();
            tokio::task::spawn_blocking(move || {
                let outcome = reviewer.review_with(mode, &job, facts);
                drop(permit);
                outcome
            })
            .await
            .unwrap_or_else(|e| panicked(e.into_panic()))
        };
        let outcome = ensure_network_policy(&state, mode, &request, outcome).await;
        span.record("allowed", outcome.response.allowed);
        span.record("patched", outcome.response.patch.is_some());
        span.record("decision", outcome.verdict.as_str());
        if let Some(p) = outcome.profile {
            span.record("profile", p.as_str());
        }
        if !outcome.response.allowed {
            span.record("reason", outcome.response.message.as_str());
        }
        if state.access_log {
            tracing::info!("admission reviewed");
        }
        let labels = ReviewLabels {
            endpoint: mode.as_str(),
            operation: request.operation.as_str(),
            kind: kind_label(&request.group, &request.kind),
            decision: outcome.verdict.as_str(),
        };
        let body = outcome.response.to_review();
        state
            .metrics
            .observe(labels, started.elapsed().as_secs_f64());
        json_response(StatusCode::OK, &body)
    }
    .instrument(span)
    .await
}

/// An agent is only admitted where the deny-egress NetworkPolicy exists: `/mutate` makes sure
/// of it (creates or restores it; not on dry runs), and a failure denies (fail closed).
async fn ensure_network_policy(
    state: &AppState,
    mode: Mode,
    request: &review::Request,
    outcome: Outcome,
) -> Outcome {
    let (Some(network), Some(_)) = (&state.network, outcome.profile) else {
        return outcome;
    };
    let policies = state.reviewer.policies();
    let settings = policies.settings();
    if mode != Mode::Mutate || !outcome.response.allowed || !settings.network.manage_network_policy
    {
        return outcome;
    }
    let namespace = if request.namespace.is_empty() {
        "default"
    } else {
        &request.namespace
    };
    match network.ensure(namespace, settings, request.dry_run).await {
        Ok(()) => outcome,
        Err(e) => {
            tracing::error!(error = %e, "denying agent: no deny-egress NetworkPolicy");
            let message =
                format!("{e}; agentvm admits agents only where egress is denied (fail closed)");
            Outcome {
                response: Response::deny(&request.uid, 500, message),
                verdict: Verdict::Error,
                ..outcome
            }
        }
    }
}

async fn read_request(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<(review::Request, usize), HandlerError> {
    let limit = state.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(HandlerError::TooLarge(limit));
    }
    let read = tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, limit));
    let bytes = read
        .await
        .map_err(|_| HandlerError::Timeout)?
        .map_err(|e| {
            // `to_bytes` reports the limit through the error's source chain.
            let mut source: Option<&dyn std::error::Error> = Some(&e);
            while let Some(s) = source {
                if s.is::<http_body_util::LengthLimitError>() {
                    return HandlerError::TooLarge(limit);
                }
                source = s.source();
            }
            HandlerError::Body(e.to_string())
        })?;
    Ok((review::parse(&bytes)?, bytes.len()))
}

/// Everything `agentvm serve` needs, already parsed.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// HTTPS address of the admission endpoints.
    pub listen: std::net::SocketAddr,
    /// Plain-HTTP address of the probes and metrics.
    pub probe_listen: std::net::SocketAddr,
    /// PEM certificate chain.
    pub tls_cert: std::path::PathBuf,
    /// PEM private key.
    pub tls_key: std::path::PathBuf,
    /// Policy folder; `None` uses the shipped policies.
    pub policies: Option<std::path::PathBuf>,
    /// How often files (policies, certificate) are checked for changes.
    pub reload_interval: std::time::Duration,
    /// How long reviews in flight may take to finish after SIGTERM.
    pub grace_period: std::time::Duration,
    /// Request body limit.
    pub max_body_bytes: usize,
    /// One INFO line per review.
    pub access_log: bool,
    /// Where CONNECT reviews look their pod up.
    pub cluster: ClusterAccess,
    /// Manage the serving certificate in the cluster (`None`: read the files as they are).
    pub certificates: Option<crate::certs::CertConfig>,
}

/// How `serve` reaches the cluster.
#[derive(Debug, Clone)]
pub enum ClusterAccess {
    /// Like kubectl (in-cluster, else kubeconfig); without either, run without cluster access.
    Infer,
    /// No cluster access: CONNECT reviews are decided without their pod.
    Off,
    /// This cluster (tests use a stand-in API server).
    Given(crate::cluster::Cluster),
    /// Like `Infer`, but without cluster access `serve` does not start (in a cluster, running
    /// without it would admit agents with no deny-egress NetworkPolicy).
    Required,
}

/// Why `serve` could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The policies do not load.
    #[error("{0}")]
    Policies(#[from] crate::policies::LoadError),
    /// The certificate or key is unusable.
    #[error("{0}")]
    Tls(#[from] agentvm_common::tls::TlsError),
    /// Self-managed certificates could not be made.
    #[error("{0}")]
    Certificates(#[from] crate::certs::CertError),
    /// The serving certificate's names are not DNS names.
    #[error("{0}")]
    Names(String),
    /// `--cluster required` and no cluster access.
    #[error("{0}")]
    Cluster(crate::cluster::ClusterError),
    /// `--cluster required`, and the API server does not answer (or refuses) the first call.
    #[error("--cluster required, but the API server does not answer: {0}")]
    Unreachable(String),
    /// Self-managed certificates need cluster access.
    #[error("--certificates self-managed needs cluster access")]
    NoCluster,
    /// A port cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
}

/// Starts both servers and runs until SIGTERM or SIGINT, then drains.
pub async fn run(config: ServeConfig) -> Result<(), StartError> {
    let running = start(config, agentvm_common::serve::shutdown_signal()).await?;
    let _ = running.task.await;
    tracing::info!("stopped");
    Ok(())
}

/// A started server.
#[derive(Debug)]
pub struct Running {
    /// Bound HTTPS address (useful with port 0).
    pub addr: std::net::SocketAddr,
    /// Bound probe address.
    pub probe_addr: std::net::SocketAddr,
    /// Shared state (metrics, readiness).
    pub state: Arc<AppState>,
    /// Completes when both servers have drained after `shutdown`.
    pub task: tokio::task::JoinHandle<()>,
}

/// Starts both servers; they drain and stop when `shutdown` completes.
pub async fn start(
    config: ServeConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<Running, StartError> {
    use crate::policies::Policies;
    use agentvm_common::reload::{spawn_watch, ReloadEvent, Reloadable};

    agentvm_common::policy::set_evaluation_time_limit(POLICY_TIME_LIMIT);
    let policies = match &config.policies {
        Some(dir) => Policies::load_dir(dir)?,
        None => Policies::shipped()?,
    };
    tracing::info!(origin = policies.origin(), "policies loaded");
    let policies = Arc::new(Reloadable::new(policies));
    let cluster = match config.cluster.clone() {
        ClusterAccess::Off => None,
        ClusterAccess::Given(c) => Some(c),
        ClusterAccess::Required => Some(
            crate::cluster::Cluster::infer()
                .await
                .map_err(StartError::Cluster)?,
        ),
        ClusterAccess::Infer => match crate::cluster::Cluster::infer().await {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(error = %e, "running without cluster access: CONNECT reviews cannot look up their pod, and the deny-egress NetworkPolicy is not ensured (use --cluster required in a cluster)");
                None
            }
        },
    };
    let network = cluster
        .as_ref()
        .map(|c| crate::network::NetworkPolicies::new(c.client()));
    if let Some(network) = &network {
        match network.seed().await {
            Ok(n) => tracing::info!(namespaces = n, "deny-egress NetworkPolicies to keep"),
            // A configuration is not access: a wrong CA, address or role shows here, and a
            // webhook that must have the cluster does not start (and report ready) without it.
            Err(e) if matches!(config.cluster, ClusterAccess::Required) => {
                return Err(StartError::Unreachable(e.to_string()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot list existing deny-egress NetworkPolicies")
            }
        }
        let p = policies.clone();
        network.spawn_reconciler(move || p.get(), std::time::Duration::from_secs(60));
    }
    let state = Arc::new(AppState {
        max_body_bytes: config.max_body_bytes,
        access_log: config.access_log,
        network,
        cluster,
        ..AppState::new(Reviewer::new(policies.clone()))
    });
    if let Some(dir) = config.policies.clone() {
        let metrics_state = state.clone();
        let load_dir = dir.clone();
        spawn_watch(
            policies,
            vec![dir],
            config.reload_interval,
            move || Policies::load_dir(&load_dir),
            move |event| {
                let m = &metrics_state.metrics;
                match event {
                    ReloadEvent::Reloaded => {
                        tracing::info!("policies reloaded");
                        m.reloads
                            .get_or_create(&crate::metrics::ReloadLabels { result: "success" })
                            .inc();
                        m.policy_current.set(1);
                    }
                    ReloadEvent::Rejected(e) => {
                        tracing::error!(error = %e, "policy update rejected; the last good policies stay in force");
                        m.reloads
                            .get_or_create(&crate::metrics::ReloadLabels { result: "failure" })
                            .inc();
                        m.policy_current.set(0);
                    }
                }
            },
        );
    }
    if let Some(certs) = &config.certificates {
        crate::certs::check_names(&certs.dns_names).map_err(StartError::Names)?;
        let client = state
            .cluster
            .as_ref()
            .ok_or(StartError::NoCluster)?
            .client();
        crate::certs::reconcile(&client, certs, time::OffsetDateTime::now_utc()).await?;
        crate::certs::spawn(client, certs.clone());
    }
    let cert = agentvm_common::tls::ReloadingCert::new(
        config.tls_cert.clone(),
        config.tls_key.clone(),
        Some(config.reload_interval),
    )?;
    let tls = agentvm_common::tls::server_config(Arc::new(cert))?;
    let bind = |addr| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })
    };
    let listener = bind(config.listen).await?;
    let probe_listener = bind(config.probe_listen).await?;
    let local = |l: &tokio::net::TcpListener, fallback| l.local_addr().unwrap_or(fallback);
    let addr = local(&listener, config.listen);
    let probe_addr = local(&probe_listener, config.probe_listen);
    tracing::info!(listen = %addr, probe_listen = %probe_addr, "serving");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let grace = config.grace_period;
    let admission = tokio::spawn(agentvm_common::serve::serve(
        listener,
        Some(tls),
        app(state.clone()),
        stopped(),
        grace,
    ));
    let probes = tokio::spawn(agentvm_common::serve::serve(
        probe_listener,
        None,
        probe_app(state.clone()),
        stopped(),
        grace,
    ));
    let stopping = state.clone();
    let task = tokio::spawn(async move {
        shutdown.await;
        stopping.ready.store(false, Ordering::Relaxed);
        let _ = stop_tx.send(true);
        let _ = admission.await;
        let _ = probes.await;
    });
    Ok(Running {
        addr,
        probe_addr,
        state,
        task,
    })
}
