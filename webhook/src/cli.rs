//! Command-line interface. Every flag also reads an `AGENTVM_*` environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use agentvm_common::policy::{PolicySet, TestResult};
use agentvm_webhook::admission::Reviewer;
use agentvm_webhook::policies::Policies;
use agentvm_webhook::server::{self, ClusterAccess, ServeConfig};
use agentvm_webhook::{existing, offline};
use clap::{Parser, Subcommand, ValueEnum};

/// Exit status for bad configuration (EX_USAGE).
pub const EXIT_CONFIG: u8 = 64;

/// agentvm: a locked-down runtime for AI agent pods, enforced by an admission webhook.
#[derive(Debug, Parser)]
#[command(name = "agentvm", version)]
pub struct Cli {
    /// Logging.
    #[command(flatten)]
    pub log: agentvm_common::telemetry::LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the admission webhook over HTTPS.
    Serve(Box<ServeArgs>),
    /// Review manifests or AdmissionReviews offline: print the decision and the patch.
    Review(ReviewArgs),
    /// Check the agents running in the cluster against the profile their policy gives them.
    Audit(AuditArgs),
    /// Label workloads as agents and restart them, so that their new pods get the profile.
    Adopt(AdoptArgs),
    /// Work with policies.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// HTTPS address of /mutate and /validate.
    #[arg(long, env = "AGENTVM_LISTEN", default_value = "0.0.0.0:8443")]
    listen: SocketAddr,
    /// Plain-HTTP address of /livez, /readyz and /metrics.
    #[arg(long, env = "AGENTVM_PROBE_LISTEN", default_value = "0.0.0.0:8080")]
    probe_listen: SocketAddr,
    /// PEM certificate chain (reloaded when it changes).
    #[arg(long, env = "AGENTVM_TLS_CERT")]
    tls_cert: PathBuf,
    /// PEM private key (reloaded when it changes).
    #[arg(long, env = "AGENTVM_TLS_KEY")]
    tls_key: PathBuf,
    /// Policy folder (reloaded when it changes); the shipped policies when unset.
    #[arg(long, env = "AGENTVM_POLICIES")]
    policies: Option<PathBuf>,
    /// Seconds between checks of the policy and certificate files.
    #[arg(long, env = "AGENTVM_RELOAD_INTERVAL", default_value_t = 10)]
    reload_interval: u64,
    /// Seconds reviews in flight may take to finish after SIGTERM.
    #[arg(long, env = "AGENTVM_GRACE_PERIOD", default_value_t = 20)]
    grace_period: u64,
    /// Largest request body accepted, in bytes; larger ones get HTTP 413.
    #[arg(long, env = "AGENTVM_MAX_BODY_BYTES", default_value_t = server::DEFAULT_MAX_BODY_BYTES)]
    max_body_bytes: usize,
    /// Log one INFO line per review.
    #[arg(long, env = "AGENTVM_ACCESS_LOG", default_value_t = true, action = clap::ArgAction::Set)]
    access_log: bool,
    /// Serving certificate: `files` (read --tls-cert and --tls-key as they are) or
    /// `self-managed` (keep a CA and the certificate in a Secret, write the CA bundle into the
    /// webhook configurations, renew, and write the files; needs cluster access).
    #[arg(long, env = "AGENTVM_CERTIFICATES", default_value = "files", value_parser = ["files", "self-managed"])]
    certificates: String,
    /// Secret of the self-managed certificates.
    #[arg(long, env = "AGENTVM_CERT_SECRET", default_value = "agentvm-tls")]
    cert_secret: String,
    /// Namespace of that Secret (the webhook's own).
    #[arg(long, env = "AGENTVM_POD_NAMESPACE", default_value = "agentvm-system")]
    cert_namespace: String,
    /// DNS names of the serving certificate, comma-separated (the webhook Service's).
    #[arg(
        long,
        env = "AGENTVM_CERT_DNS_NAMES",
        value_delimiter = ',',
        default_value = "agentvm.agentvm-system.svc"
    )]
    cert_dns_names: Vec<String>,
    /// Name of the Mutating- and ValidatingWebhookConfiguration that get the CA bundle.
    #[arg(long, env = "AGENTVM_WEBHOOK_CONFIGURATION", default_value = "agentvm")]
    webhook_configuration: String,
    /// Cluster access (pod lookups, namespace labels, the deny-egress NetworkPolicy,
    /// certificates): `infer` (like kubectl; without it, run without), `required` (refuse to
    /// start without it; what the chart uses) or `off`.
    #[arg(long, env = "AGENTVM_CLUSTER", default_value = "infer", value_parser = ["infer", "required", "off"])]
    cluster: String,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Debug, clap::Args)]
struct ReviewArgs {
    /// YAML or JSON files, multi-document; `-` reads standard input.
    #[arg(required = true)]
    files: Vec<String>,
    /// text for people, json for one line per document.
    #[arg(long, short, env = "AGENTVM_OUTPUT", default_value = "text")]
    output: Output,
    /// Policy folder; the shipped policies when unset.
    #[arg(long, env = "AGENTVM_POLICIES")]
    policies: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct AuditArgs {
    /// Only this namespace (default: the whole cluster).
    #[arg(long, short, env = "AGENTVM_NAMESPACE")]
    namespace: Option<String>,
    /// table for people, json for one line per agent.
    #[arg(long, short, default_value = "text")]
    output: Output,
    /// Policy folder; the shipped policies when unset.
    #[arg(long, env = "AGENTVM_POLICIES")]
    policies: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct AdoptArgs {
    /// Workloads as KIND/NAME (deployment, statefulset, daemonset, cronjob).
    targets: Vec<String>,
    /// Namespace of the workloads.
    #[arg(long, short, env = "AGENTVM_NAMESPACE", default_value = "default")]
    namespace: String,
    /// Adopt every workload of --kind matching this label selector.
    #[arg(long, short = 'l')]
    selector: Option<String>,
    /// Kind for --selector.
    #[arg(long, default_value = "deployment")]
    kind: String,
    /// Show the patches, change nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Run the Rego tests (rules named test_*) in a folder, like `opa test`.
    Test {
        /// Policy folder.
        dir: PathBuf,
    },
}

/// Runs the chosen command.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Review(args) => review(args),
        Command::Audit(args) => with_cluster(|cluster| audit(cluster, args)),
        Command::Adopt(args) => with_cluster(|cluster| adopt(cluster, args)),
        Command::Policy {
            command: PolicyCommand::Test { dir },
        } => policy_test(&dir),
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let config = ServeConfig {
        listen: args.listen,
        probe_listen: args.probe_listen,
        tls_cert: args.tls_cert.clone(),
        tls_key: args.tls_key.clone(),
        policies: args.policies,
        reload_interval: Duration::from_secs(args.reload_interval.max(1)),
        grace_period: Duration::from_secs(args.grace_period),
        max_body_bytes: args.max_body_bytes,
        access_log: args.access_log,
        certificates: (args.certificates == "self-managed").then(|| {
            agentvm_webhook::certs::CertConfig {
                namespace: args.cert_namespace.clone(),
                secret: args.cert_secret.clone(),
                dns_names: args.cert_dns_names.clone(),
                webhook_configuration: args.webhook_configuration.clone(),
                cert_path: args.tls_cert.clone(),
                key_path: args.tls_key.clone(),
            }
        }),
        cluster: if args.cluster == "required" {
            ClusterAccess::Required
        } else if args.cluster == "off" {
            ClusterAccess::Off
        } else {
            ClusterAccess::Infer
        },
    };
    // Large reviews run on the blocking pool; a few threads are enough and bound memory.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .max_blocking_threads(4)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("agentvm: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(server::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            eprintln!("agentvm serve: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

fn load_policies(dir: Option<&PathBuf>) -> Result<Policies, String> {
    match dir {
        Some(d) => Policies::load_dir(d),
        None => Policies::shipped(),
    }
    .map_err(|e| e.to_string())
}

fn review(args: ReviewArgs) -> ExitCode {
    let policies = match load_policies(args.policies.as_ref()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("agentvm review: {e}");
            return ExitCode::from(2);
        }
    };
    let mut documents = Vec::new();
    for file in &args.files {
        match offline::read_file(file) {
            Ok(docs) => documents.extend(docs),
            Err(e) => {
                eprintln!("agentvm review: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let reviewer = Reviewer::fixed(policies);
    let mut denied = false;
    for doc in &documents {
        let reviewed = offline::review_document(&reviewer, doc);
        denied |= !reviewed.response.allowed;
        match args.output {
            Output::Json => println!("{}", reviewed.to_json()),
            Output::Text => print!("{}", reviewed.to_text()),
        }
    }
    if denied {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn policy_test(dir: &std::path::Path) -> ExitCode {
    let set = match PolicySet::load_dir(dir) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("agentvm policy test: {e}");
            return ExitCode::from(2);
        }
    };
    let report = set.run_tests();
    for o in &report.outcomes {
        match &o.result {
            TestResult::Pass => {}
            TestResult::Fail(why) => println!("FAIL {}:{}: {} ({why})", o.file, o.line, o.rule),
            TestResult::Error(why) => println!("ERROR {}:{}: {}: {why}", o.file, o.line, o.rule),
        }
    }
    println!("{} passed, {} failed", report.passed(), report.failed());
    if report.failed() > 0 || report.outcomes.is_empty() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn with_cluster<F, Fut>(run: F) -> ExitCode
where
    F: FnOnce(agentvm_webhook::cluster::Cluster) -> Fut,
    Fut: std::future::Future<Output = ExitCode>,
{
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("agentvm: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        match agentvm_webhook::cluster::Cluster::infer().await {
            Ok(cluster) => run(cluster).await,
            Err(e) => {
                eprintln!("agentvm: {e}");
                ExitCode::from(2)
            }
        }
    })
}

async fn audit(cluster: agentvm_webhook::cluster::Cluster, args: AuditArgs) -> ExitCode {
    let policies = match load_policies(args.policies.as_ref()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("agentvm audit: {e}");
            return ExitCode::from(2);
        }
    };
    let reviewer = Reviewer::fixed(policies);
    let findings =
        match existing::audit(&cluster.client(), &reviewer, args.namespace.as_deref()).await {
            Ok(f) => f,
            Err(e) => {
                eprintln!("agentvm audit: {e}");
                return ExitCode::from(2);
            }
        };
    match args.output {
        Output::Json => {
            for f in &findings {
                println!("{}", serde_json::to_string(f).unwrap_or_default());
            }
        }
        Output::Text => print!("{}", existing::audit_table(&findings)),
    }
    if findings.iter().all(|f| f.compliant) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

async fn adopt(cluster: agentvm_webhook::cluster::Cluster, args: AdoptArgs) -> ExitCode {
    let client = cluster.client();
    let mut targets = Vec::new();
    for t in &args.targets {
        match t.parse::<existing::Target>() {
            Ok(t) => targets.push(t),
            Err(e) => {
                eprintln!("agentvm adopt: {e}");
                return ExitCode::from(2);
            }
        }
    }
    if let Some(selector) = &args.selector {
        let kind = match format!("{}/x", args.kind).parse::<existing::Target>() {
            Ok(t) => t.kind,
            Err(e) => {
                eprintln!("agentvm adopt: {e}");
                return ExitCode::from(2);
            }
        };
        match existing::select(&client, &args.namespace, &kind, selector).await {
            Ok(found) => targets.extend(found),
            Err(e) => {
                eprintln!("agentvm adopt: {e}");
                return ExitCode::from(2);
            }
        }
    }
    if targets.is_empty() {
        eprintln!("agentvm adopt: nothing to adopt (give KIND/NAME or --selector)");
        return ExitCode::from(2);
    }
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let mut failed = false;
    for t in &targets {
        let patch = existing::adopt_patch(&t.kind, &now);
        if args.dry_run {
            println!(
                "{}/{} in {} (dry run): {patch}",
                t.kind, t.name, args.namespace
            );
            continue;
        }
        match existing::adopt(&client, &args.namespace, t, &patch).await {
            Ok(()) if t.kind == "cronjob" => println!(
                "{}/{} in {}: labelled agentvm.dev/agent=true; its next Jobs get the profile",
                t.kind, t.name, args.namespace
            ),
            Ok(()) => println!(
                "{}/{} in {}: labelled agentvm.dev/agent=true, restarted",
                t.kind, t.name, args.namespace
            ),
            Err(e) => {
                eprintln!("agentvm adopt: {e}");
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
