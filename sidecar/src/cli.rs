//! Command-line interface. Every flag also reads an `AGENTVM_*` environment variable.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use agentvm_common::policy::PolicyError;
use agentvm_sidecar::dispatch::{self, DispatchConfig, DispatchState};
use agentvm_sidecar::exec::command::{base_env, Policy, DEFAULT_PATH};
use agentvm_sidecar::exec::{self, runner, server, ExecConfig, ExecState};
use agentvm_sidecar::probe;
use agentvm_sidecar::proxy::{self, config::ExecBackend, config::ProxyConfig, policy::ToolPolicy};
use clap::{Parser, Subcommand};

/// Exit status for bad configuration (EX_USAGE).
pub const EXIT_CONFIG: u8 = 64;

/// agentvm-sidecar: the tool-call proxy and the exec server of an agent pod.
#[derive(Debug, Parser)]
#[command(name = "agentvm-sidecar", version)]
pub struct Cli {
    /// Logging.
    #[command(flatten)]
    pub log: agentvm_common::telemetry::LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// GET a loopback URL; exit 0 on a 2xx answer, 1 otherwise (the containers' startup probe).
    Probe(ProbeArgs),
    /// Serve the exec server: run commands in the workspace for the proxy.
    Exec(ExecArgs),
    /// Serve the tool-call proxy: MCP for the agent, every call decided by Rego and audited.
    Proxy(ProxyArgs),
    /// Serve the exec dispatcher: the exec server's API, each command run as a Kubernetes Job.
    Dispatch(DispatchArgs),
    /// Put this program at DEST, for the runner of a dispatcher Job (its init container).
    #[command(hide = true)]
    InstallRunner(InstallRunnerArgs),
}

#[derive(Debug, clap::Args)]
struct InstallRunnerArgs {
    /// Where the program goes.
    dest: PathBuf,
}

#[derive(Debug, clap::Args)]
struct ProxyArgs {
    /// Address of the MCP endpoint (/mcp).
    #[arg(long, env = "AGENTVM_LISTEN", default_value = "127.0.0.1:7411")]
    listen: SocketAddr,
    /// Config file (YAML): upstreams and the exec backend. None: no upstream.
    #[arg(long, env = "AGENTVM_PROXY_CONFIG")]
    config: Option<PathBuf>,
    /// Tool policy folder (package agentvm.tools), reloaded when it changes; the shipped
    /// policy when unset.
    #[arg(long, env = "AGENTVM_POLICIES")]
    policies: Option<PathBuf>,
    /// Start even when the --config file or the policy in --policies is missing (mounted from a
    /// ConfigMap with `optional: true` that does not exist yet): no upstreams, and every
    /// request denied, until they appear; they are then loaded like any change.
    #[arg(long, env = "AGENTVM_ALLOW_MISSING")]
    allow_missing: bool,
    /// Exec backend base URL; overrides the config file's exec.endpoint.
    #[arg(long, env = "AGENTVM_EXEC_ENDPOINT")]
    exec_endpoint: Option<String>,
    /// Folder every credentialFile must be in (the credentials Secret's mount): a config that
    /// names a file elsewhere is refused, and a file whose links lead out of it is not read.
    #[arg(long, env = "AGENTVM_CREDENTIALS_DIR")]
    credentials_dir: Option<PathBuf>,
    /// Pod name of the agent (downward API).
    #[arg(long, env = "AGENTVM_POD_NAME", default_value = "")]
    pod_name: String,
    /// Namespace of the agent (downward API).
    #[arg(long, env = "AGENTVM_POD_NAMESPACE", default_value = "")]
    pod_namespace: String,
    /// Service account of the agent (downward API).
    #[arg(long, env = "AGENTVM_SERVICE_ACCOUNT", default_value = "")]
    service_account: String,
    /// Effective profile of the agent.
    #[arg(long, env = "AGENTVM_PROFILE", default_value = "")]
    profile: String,
    /// Upstream time limit, in milliseconds.
    #[arg(
        long,
        env = "AGENTVM_UPSTREAM_TIMEOUT_MS",
        default_value_t = proxy::state::DEFAULT_UPSTREAM_TIMEOUT_MS,
    )]
    upstream_timeout_ms: u64,
    /// Largest upstream response, in bytes.
    #[arg(
        long,
        env = "AGENTVM_MAX_RESPONSE_BYTES",
        default_value_t = proxy::state::DEFAULT_MAX_RESPONSE_BYTES,
    )]
    max_response_bytes: usize,
    /// Largest request body, in bytes; larger ones get HTTP 413.
    #[arg(
        long,
        env = "AGENTVM_MAX_BODY_BYTES",
        default_value_t = proxy::state::DEFAULT_MAX_BODY_BYTES,
    )]
    max_body_bytes: usize,
    /// Origins accepted besides loopback ones (comma-separated).
    #[arg(long, env = "AGENTVM_ALLOWED_ORIGINS", value_delimiter = ',')]
    allowed_origins: Vec<String>,
    /// Seconds between checks of the policy folder and the config file.
    #[arg(long, env = "AGENTVM_RELOAD_INTERVAL", default_value_t = 10)]
    reload_interval: u64,
    /// Seconds calls in flight may take to finish after SIGTERM.
    #[arg(long, env = "AGENTVM_GRACE_PERIOD", default_value_t = 20)]
    grace_period: u64,
    /// Log one INFO line per HTTP request (audit records are always written).
    #[arg(long, env = "AGENTVM_ACCESS_LOG", default_value_t = false, action = clap::ArgAction::Set)]
    access_log: bool,
}

#[derive(Debug, clap::Args)]
struct ProbeArgs {
    /// http://host:port/path, on a loopback address.
    url: String,
    /// Milliseconds for the whole exchange.
    #[arg(long, env = "AGENTVM_PROBE_TIMEOUT_MS", default_value_t = 1000)]
    timeout_ms: u64,
}

#[derive(Debug, clap::Args)]
struct ExecArgs {
    /// Address of the exec API.
    #[arg(long, env = "AGENTVM_LISTEN", default_value = "127.0.0.1:7412")]
    listen: SocketAddr,
    /// Workspace root: commands start here and cannot ask for a directory outside it.
    #[arg(long, env = "AGENTVM_WORKSPACE", default_value = "/workspace")]
    workspace: PathBuf,
    /// Limits of the exec API.
    #[command(flatten)]
    limits: ExecLimits,
    /// TMPDIR of commands.
    #[arg(long, env = "AGENTVM_EXEC_TMPDIR", default_value = "/tmp")]
    tmpdir: String,
    /// Variables of the server's own environment passed on to commands (comma-separated).
    #[arg(long, env = "AGENTVM_EXEC_PASS_ENV", value_delimiter = ',')]
    pass_env: Vec<String>,
    /// Seconds commands in flight may take to finish after SIGTERM.
    #[arg(long, env = "AGENTVM_GRACE_PERIOD", default_value_t = 20)]
    grace_period: u64,
    /// Log one INFO line per request.
    #[arg(long, env = "AGENTVM_ACCESS_LOG", default_value_t = true, action = clap::ArgAction::Set)]
    access_log: bool,
}

#[derive(Debug, clap::Args)]
struct DispatchArgs {
    /// Address of the exec API.
    #[arg(long, env = "AGENTVM_LISTEN", default_value = "127.0.0.1:7412")]
    listen: SocketAddr,
    /// Namespace the Jobs go to (the dispatcher's own, from the downward API). Required.
    #[arg(long, env = "AGENTVM_POD_NAMESPACE", default_value = "")]
    namespace: String,
    /// Value of the agentvm.dev/dispatcher label on this dispatcher's Jobs; Jobs with it are
    /// deleted at start-up and at shutdown. The dispatcher's pod name (downward API). Required.
    #[arg(long, env = "AGENTVM_POD_NAME", default_value = "")]
    dispatcher_id: String,
    /// Image of the Jobs' container: the tools commands may run. Required.
    #[arg(long, env = "AGENTVM_DISPATCH_IMAGE", default_value = "")]
    image: String,
    /// Image of the Jobs' init container, whose agentvm-sidecar (on its PATH) is copied into the
    /// pod to run the command: the sidecar image. Required.
    #[arg(long, env = "AGENTVM_DISPATCH_RUNNER_IMAGE", default_value = "")]
    runner_image: String,
    /// CPU request and limit of a Job's container (a Kubernetes quantity, e.g. 500m).
    #[arg(long, env = "AGENTVM_DISPATCH_CPU")]
    cpu: Option<String>,
    /// Memory request and limit of a Job's container (e.g. 256Mi).
    #[arg(long, env = "AGENTVM_DISPATCH_MEMORY")]
    memory: Option<String>,
    /// Size limit of each scratch volume of a Job (/tmp and the working directory, e.g. 1Gi).
    #[arg(long, env = "AGENTVM_DISPATCH_SCRATCH_SIZE")]
    scratch_size: Option<String>,
    /// Working directory of commands, an empty scratch volume in the Job's pod (neither /tmp
    /// nor under /agentvm, which the pod mounts itself).
    #[arg(long, env = "AGENTVM_DISPATCH_WORKDIR", default_value = "/workspace")]
    workdir: String,
    /// Limits of the exec API.
    #[command(flatten)]
    limits: ExecLimits,
    /// Seconds a finished Job is kept when the dispatcher could not delete it.
    #[arg(long, env = "AGENTVM_DISPATCH_TTL_SECONDS", default_value_t = 300)]
    ttl_seconds: i32,
    /// Time limit of each call to the Kubernetes API, in milliseconds.
    #[arg(
        long,
        env = "AGENTVM_DISPATCH_API_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    api_timeout_ms: u64,
    /// Milliseconds allowed past a command's time limit for the Job controller to report its
    /// end; after that the answer says timed_out and the dispatcher deletes the Job.
    #[arg(long, env = "AGENTVM_DISPATCH_WAIT_SLACK_MS", default_value_t = 30_000)]
    wait_slack_ms: u64,
    /// Seconds requests in flight may take to finish after SIGTERM.
    #[arg(long, env = "AGENTVM_GRACE_PERIOD", default_value_t = 20)]
    grace_period: u64,
    /// Log one INFO line per request.
    #[arg(long, env = "AGENTVM_ACCESS_LOG", default_value_t = true, action = clap::ArgAction::Set)]
    access_log: bool,
}

/// The limits the exec server and the dispatcher share (they serve the same API).
#[derive(Debug, clap::Args)]
struct ExecLimits {
    /// Cap on the output of a command (each of stdout and stderr), in bytes; the rest is
    /// dropped and flagged.
    #[arg(
        long,
        env = "AGENTVM_EXEC_MAX_OUTPUT_BYTES",
        default_value_t = server::DEFAULT_MAX_OUTPUT_BYTES,
    )]
    max_output_bytes: usize,
    /// Time limit of a command that sets none, in milliseconds.
    #[arg(
        long,
        env = "AGENTVM_EXEC_DEFAULT_TIMEOUT_MS",
        default_value_t = 30_000
    )]
    default_timeout_ms: u64,
    /// Largest time limit a request may set, in milliseconds.
    #[arg(long, env = "AGENTVM_EXEC_MAX_TIMEOUT_MS", default_value_t = 600_000)]
    max_timeout_ms: u64,
    /// Commands running at once; further requests get HTTP 429.
    #[arg(
        long,
        env = "AGENTVM_EXEC_MAX_CONCURRENT",
        default_value_t = server::DEFAULT_MAX_CONCURRENT,
    )]
    max_concurrent: usize,
    /// Largest request body, in bytes; larger ones get HTTP 413.
    #[arg(long, env = "AGENTVM_MAX_BODY_BYTES", default_value_t = server::DEFAULT_MAX_BODY_BYTES)]
    max_body_bytes: usize,
    /// PATH of commands.
    #[arg(long, env = "AGENTVM_EXEC_PATH", default_value = DEFAULT_PATH)]
    path: String,
}

impl ExecLimits {
    fn check(&self) -> Result<(), String> {
        if self.max_concurrent == 0 {
            return Err("--max-concurrent must be at least 1".into());
        }
        if self.default_timeout_ms == 0 || self.default_timeout_ms > self.max_timeout_ms {
            return Err("--default-timeout-ms must be between 1 and --max-timeout-ms".into());
        }
        Ok(())
    }
}

/// Runs the chosen command.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Probe(args) => run_probe(&args),
        Command::Exec(args) => run_exec(args),
        Command::Proxy(args) => run_proxy(args),
        Command::Dispatch(args) => run_dispatch(args),
        Command::InstallRunner(args) => match runner::install(&args.dest) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!(
                    "agentvm-sidecar install-runner {}: {e}",
                    args.dest.display()
                );
                ExitCode::FAILURE
            }
        },
    }
}

fn runtime(multi_thread: bool) -> Option<tokio::runtime::Runtime> {
    let mut builder = if multi_thread {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    match builder.enable_all().build() {
        Ok(rt) => Some(rt),
        Err(e) => {
            eprintln!("agentvm-sidecar: cannot start the runtime: {e}");
            None
        }
    }
}

fn run_probe(args: &ProbeArgs) -> ExitCode {
    let Some(rt) = runtime(false) else {
        return ExitCode::FAILURE;
    };
    let timeout = Duration::from_millis(args.timeout_ms);
    match rt.block_on(probe::probe(&args.url, timeout)) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agentvm-sidecar probe {}: {e}", args.url);
            ExitCode::FAILURE
        }
    }
}

fn exec_config(args: &ExecArgs) -> Result<ExecConfig, String> {
    let workspace = args
        .workspace
        .canonicalize()
        .map_err(|e| format!("workspace {}: {e}", args.workspace.display()))?;
    if !workspace.is_dir() {
        return Err(format!(
            "workspace {} is not a directory",
            workspace.display()
        ));
    }
    args.limits.check()?;
    Ok(ExecConfig {
        policy: Policy {
            base_env: base_env(&workspace, &args.limits.path, &args.tmpdir, &args.pass_env),
            workspace,
            default_timeout: Duration::from_millis(args.limits.default_timeout_ms),
            max_timeout: Duration::from_millis(args.limits.max_timeout_ms),
        },
        max_output_bytes: args.limits.max_output_bytes,
        max_body_bytes: args.limits.max_body_bytes,
        max_concurrent: args.limits.max_concurrent,
        access_log: args.access_log,
        runner: PathBuf::from("/proc/self/exe"),
    })
}

fn run_exec(args: ExecArgs) -> ExitCode {
    let config = match exec_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("agentvm-sidecar exec: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let Some(rt) = runtime(true) else {
        return ExitCode::FAILURE;
    };
    let grace = Duration::from_secs(args.grace_period);
    rt.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(args.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!(
                    "agentvm-sidecar exec: cannot listen on {}: {e}",
                    args.listen
                );
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        tracing::info!(
            listen = %args.listen,
            workspace = %config.policy.workspace.display(),
            "exec server serving"
        );
        let app = exec::app(Arc::new(ExecState::new(config)));
        let shutdown = agentvm_common::serve::shutdown_signal();
        agentvm_common::serve::serve(listener, None, app, shutdown, grace).await;
        // Commands still running after the grace period do not outlive the server: their
        // runners, told to stop, end everything the commands started.
        agentvm_sidecar::reaper::end_all(Duration::from_secs(5));
        tracing::info!("stopped");
        ExitCode::SUCCESS
    })
}

fn dispatch_config(args: &DispatchArgs) -> Result<DispatchConfig, String> {
    if args.namespace.is_empty() {
        return Err("--namespace (AGENTVM_POD_NAMESPACE) must be set".into());
    }
    if !dispatch::job::is_label_value(&args.dispatcher_id) {
        return Err(format!(
            "--dispatcher-id {:?} must be a label value: 1 to 63 letters, digits, '-', '_' or \
             '.', starting and ending with a letter or digit",
            args.dispatcher_id
        ));
    }
    if args.image.is_empty() {
        return Err("--image must be set".into());
    }
    if args.runner_image.is_empty() {
        return Err("--runner-image (the sidecar image) must be set".into());
    }
    if !args.workdir.starts_with('/') || args.workdir.split('/').any(|c| c == "..") {
        return Err("--workdir must be an absolute path without ..".into());
    }
    let workdir = std::path::Path::new(&args.workdir);
    let reserved = [
        std::path::Path::new("/tmp"),
        std::path::Path::new(dispatch::job::RESERVED_DIR),
    ];
    if workdir.parent().is_none() || reserved.iter().any(|r| workdir.starts_with(r)) {
        return Err(format!(
            "--workdir must not be /, /tmp or under {}",
            dispatch::job::RESERVED_DIR
        ));
    }
    args.limits.check()?;
    for (flag, value) in [
        ("--cpu", &args.cpu),
        ("--memory", &args.memory),
        ("--scratch-size", &args.scratch_size),
    ] {
        if let Some(v) = value {
            let ok = v.starts_with(|c: char| c.is_ascii_digit())
                && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '.');
            if !ok {
                return Err(format!("{flag} {v:?} is not a Kubernetes quantity"));
            }
        }
    }
    if args.ttl_seconds < 0 || args.api_timeout_ms == 0 {
        return Err("--ttl-seconds must be at least 0 and --api-timeout-ms at least 1".into());
    }
    let base_env = vec![
        ("PATH".to_owned(), args.limits.path.clone()),
        ("HOME".to_owned(), args.workdir.clone()),
        ("LANG".to_owned(), "C.UTF-8".to_owned()),
        ("TMPDIR".to_owned(), "/tmp".to_owned()),
    ];
    Ok(DispatchConfig {
        template: dispatch::job::Template {
            image: args.image.clone(),
            runner_image: args.runner_image.clone(),
            dispatcher: args.dispatcher_id.clone(),
            workdir: args.workdir.clone(),
            base_env,
            default_timeout: Duration::from_millis(args.limits.default_timeout_ms),
            max_timeout: Duration::from_millis(args.limits.max_timeout_ms),
            ttl_seconds: args.ttl_seconds,
            cpu: args.cpu.clone(),
            memory: args.memory.clone(),
            scratch_size: args.scratch_size.clone(),
            max_output_bytes: args.limits.max_output_bytes,
        },
        wait_slack: Duration::from_millis(args.wait_slack_ms),
        max_body_bytes: args.limits.max_body_bytes,
        max_concurrent: args.limits.max_concurrent,
        access_log: args.access_log,
    })
}

fn run_dispatch(args: DispatchArgs) -> ExitCode {
    let config = match dispatch_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("agentvm-sidecar dispatch: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    agentvm_common::tls::install_default_provider();
    let Some(rt) = runtime(true) else {
        return ExitCode::FAILURE;
    };
    let grace = Duration::from_secs(args.grace_period);
    let api_timeout = Duration::from_millis(args.api_timeout_ms);
    rt.block_on(async move {
        let client = match kube::Config::infer().await.map(kube::Client::try_from) {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => {
                eprintln!("agentvm-sidecar dispatch: no cluster client: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
            Err(e) => {
                eprintln!("agentvm-sidecar dispatch: no cluster configuration: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        let jobs = dispatch::jobs::Jobs::new(client, &args.namespace, api_timeout);
        let state = Arc::new(DispatchState::new(config, jobs));
        let listener = match tokio::net::TcpListener::bind(args.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!(
                    "agentvm-sidecar dispatch: cannot listen on {}: {e}",
                    args.listen
                );
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        match state.delete_orphans().await {
            Ok(n) => tracing::info!(deleted = n, "orphaned jobs deleted"),
            // Not fatal: their deadline ends them and ttlSecondsAfterFinished removes them.
            Err(e) => tracing::warn!(error = %e, "cannot delete orphaned jobs"),
        }
        tracing::info!(
            listen = %args.listen,
            k8s.namespace = %args.namespace,
            image = %args.image,
            runner_image = %args.runner_image,
            "dispatcher serving"
        );
        let shutdown = agentvm_common::serve::shutdown_signal();
        let app = dispatch::app(state.clone());
        agentvm_common::serve::serve(listener, None, app, shutdown, grace).await;
        // Jobs of requests cut off by the grace period do not outlive the dispatcher.
        match state.delete_orphans().await {
            Ok(n) => tracing::info!(deleted = n, "stopped"),
            Err(e) => tracing::warn!(error = %e, "stopped; cannot delete jobs still running"),
        }
        ExitCode::SUCCESS
    })
}

/// The proxy config file with the exec endpoint override; with `allow_missing`, a file that
/// does not exist is an empty config (no upstreams).
fn load_proxy_config(
    path: Option<&Path>,
    allow_missing: bool,
    exec_endpoint: Option<&str>,
    credentials_dir: Option<&Path>,
) -> Result<ProxyConfig, proxy::config::ConfigError> {
    let mut config = match path {
        None => ProxyConfig::default(),
        Some(path) if allow_missing => ProxyConfig::load_if_present(path)?.unwrap_or_else(|| {
            tracing::warn!(
                path = %path.display(),
                "proxy config file missing: no upstreams until it appears"
            );
            ProxyConfig::default()
        }),
        Some(path) => ProxyConfig::load(path)?,
    };
    if let Some(endpoint) = exec_endpoint {
        config.exec = Some(ExecBackend {
            endpoint: endpoint.to_owned(),
        });
        config.check()?;
    }
    if let Some(dir) = credentials_dir {
        config.confine_credentials(dir)?;
    }
    Ok(config)
}

/// The tool policy of a folder; with `allow_missing`, a folder without one denies every call.
fn load_tool_policy(dir: &Path, allow_missing: bool) -> Result<ToolPolicy, PolicyError> {
    if !allow_missing {
        return ToolPolicy::load_dir(dir);
    }
    let policy = ToolPolicy::load_dir_if_present(dir)?;
    if policy.is_none_yet() {
        tracing::warn!(
            path = %dir.display(),
            "no tool policy in the folder: every request is denied until one appears"
        );
    }
    Ok(policy)
}

fn run_proxy(args: ProxyArgs) -> ExitCode {
    use agentvm_common::reload::{spawn_watch, ReloadEvent, Reloadable};
    let exec_override = args.exec_endpoint.clone().filter(|e| !e.is_empty());
    let loaded = load_proxy_config(
        args.config.as_deref(),
        args.allow_missing,
        exec_override.as_deref(),
        args.credentials_dir.as_deref(),
    );
    let config = match loaded {
        Ok(c) => c,
        Err(e) => {
            eprintln!("agentvm-sidecar proxy: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let policy = match &args.policies {
        Some(dir) => load_tool_policy(dir, args.allow_missing),
        None => ToolPolicy::shipped(),
    };
    let policy = match policy {
        Ok(p) => Arc::new(Reloadable::new(p)),
        Err(e) => {
            eprintln!("agentvm-sidecar proxy: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let settings = proxy::ProxySettings {
        agent: proxy::policy::Agent {
            pod: args.pod_name.clone(),
            namespace: args.pod_namespace.clone(),
            service_account: args.service_account.clone(),
            profile: args.profile.clone(),
        },
        max_body_bytes: args.max_body_bytes,
        body_timeout: proxy::state::BODY_TIMEOUT,
        limits: proxy::upstream::Limits {
            timeout: Duration::from_millis(args.upstream_timeout_ms.max(1)),
            max_response_bytes: args.max_response_bytes,
        },
        allowed_origins: args.allowed_origins.clone(),
        access_log: args.access_log,
    };
    // One thread: the proxy serves the one agent of its pod, and a call hops from the agent's
    // connection to an upstream's and back, which on a multi-thread runtime means wakeups and
    // task moves between threads (twice the CPU per call in `cargo bench --bench proxy`).
    // Policy decisions and reloads run on this thread too; they take microseconds and
    // milliseconds.
    let Some(rt) = runtime(false) else {
        return ExitCode::FAILURE;
    };
    // On one thread a runaway rule would hold every call, not one: it fails (and so denies)
    // after a second instead, as the webhook's do.
    agentvm_common::policy::set_evaluation_time_limit(Duration::from_secs(1));
    let grace = Duration::from_secs(args.grace_period);
    rt.block_on(async move {
        let allow_missing = args.allow_missing;
        if let Some(dir) = args.policies.clone() {
            let load_dir = dir.clone();
            spawn_watch(
                policy.clone(),
                vec![dir],
                Duration::from_secs(args.reload_interval.max(1)),
                move || load_tool_policy(&load_dir, allow_missing),
                |event| match event {
                    ReloadEvent::Reloaded => tracing::info!("tool policy reloaded"),
                    ReloadEvent::Rejected(e) => tracing::error!(
                        error = %e,
                        "tool policy update rejected; the last good policy stays in force"
                    ),
                },
            );
        }
        let listener = match tokio::net::TcpListener::bind(args.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!(
                    "agentvm-sidecar proxy: cannot listen on {}: {e}",
                    args.listen
                );
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        tracing::info!(
            listen = %args.listen,
            upstreams = config.upstreams.len(),
            exec = config.exec.is_some(),
            policy = policy.get().origin(),
            "proxy serving"
        );
        let state = Arc::new(proxy::ProxyState::new(&config, policy, settings));
        if let Some(path) = args.config.clone() {
            let routes = state.routes.clone();
            let load_path = path.clone();
            let credentials_dir = args.credentials_dir.clone();
            spawn_watch(
                state.routes.clone(),
                vec![path],
                Duration::from_secs(args.reload_interval.max(1)),
                move || {
                    let config = load_proxy_config(
                        Some(&load_path),
                        allow_missing,
                        exec_override.as_deref(),
                        credentials_dir.as_deref(),
                    )?;
                    Ok::<_, proxy::config::ConfigError>(proxy::state::Routes::new(
                        &config,
                        Some(&routes.get()),
                    ))
                },
                |event| match event {
                    ReloadEvent::Reloaded => tracing::info!("proxy config reloaded"),
                    ReloadEvent::Rejected(e) => tracing::error!(
                        error = %e,
                        "proxy config update rejected; the last good config stays in force"
                    ),
                },
            );
        }
        let shutdown = agentvm_common::serve::shutdown_signal();
        agentvm_common::serve::serve(listener, None, proxy::app(state), shutdown, grace).await;
        tracing::info!("stopped");
        ExitCode::SUCCESS
    })
}
