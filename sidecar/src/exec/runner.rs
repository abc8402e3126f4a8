//! The runner (`agentvm-sidecar run`, not listed in `--help`): runs one command and reports how
//! it ended as one line on standard output (see [`super::report`]). The exec server starts one
//! runner per request; a dispatcher Job runs one as its container's command, copied into the pod
//! by an init container (`agentvm-sidecar install-runner`).
//!
//! The runner is a child subreaper, so whatever the command starts stays among its descendants,
//! even in a new session or process group, or after a double fork. When the command exits, at its
//! time limit, and when the runner is told to stop (SIGTERM, SIGINT, SIGHUP), every descendant is
//! stopped and killed before the report is written: background processes never outlive their
//! command. The runner is not dumpable either, so the command (the same user) can neither trace
//! it nor open its descriptors to write a report of its own.
//!
//! Its arguments are its only input. Its environment belongs to the command (passed on unless
//! `--clear-env`), so, unlike every other subcommand, no flag reads a variable, and the runner is
//! started before the main command line is parsed (whose flags do).

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;
use tokio::time::Instant as TokioInstant;

use super::report::{NotStarted, Outcome, Report, RUNNER_FAILED};
use crate::reaper;

/// The first argument that selects the runner.
pub const SUBCOMMAND: &str = "run";

/// How long stopping and killing what a command left may take.
const SWEEP_BOUND: Duration = Duration::from_secs(5);
/// How long output is still read once everything is killed (the pipes are at their end then,
/// unless the sweep ran out of time).
const DRAIN_GRACE: Duration = Duration::from_millis(500);
/// How long to wait for a killed command to be reaped before giving up on its status.
const REAP_GRACE: Duration = Duration::from_secs(2);

/// The runner's command line (no flag reads the environment: it is the command's).
#[derive(Debug, Clone, Parser)]
#[command(
    name = "agentvm-sidecar run",
    no_binary_name = true,
    disable_version_flag = true
)]
pub struct RunArgs {
    /// Time limit in milliseconds, from the start of the command.
    #[arg(long)]
    pub timeout_ms: u64,
    /// Cap on each of standard output and standard error, in bytes; the rest is dropped and
    /// flagged.
    #[arg(long)]
    pub max_output_bytes: usize,
    /// File the command reads as its standard input. Without it, the command gets the runner's.
    #[arg(long)]
    pub stdin_file: Option<PathBuf>,
    /// Start the command with no variable of the runner's environment.
    #[arg(long)]
    pub clear_env: bool,
    /// A variable added to the command's environment, as NAME=VALUE (repeatable).
    #[arg(long = "env", value_name = "NAME=VALUE", allow_hyphen_values = true)]
    pub env: Vec<String>,
    /// The program and its arguments, after `--`.
    #[arg(last = true, required = true)]
    pub argv: Vec<String>,
}

/// Why the runner could not run a command at all (it exits 125 without a report).
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// A time limit of 0.
    #[error("--timeout-ms must be at least 1")]
    Timeout,
    /// An `--env` value without `=` or with an empty name.
    #[error("--env {0:?} must be NAME=VALUE")]
    Env(String),
    /// The runner cannot keep what its command starts.
    #[error("cannot become a child subreaper: {0}")]
    Subreaper(#[source] std::io::Error),
    /// No runtime for the runner.
    #[error("cannot start the runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// A pipe of the command could not be registered with the runtime.
    #[error("cannot read the output of the command: {0}")]
    Pipe(#[source] std::io::Error),
    /// The report could not be written.
    #[error("cannot write the report: {0}")]
    Write(#[source] std::io::Error),
}

/// Runs the runner with `args` (what follows `run` on the command line): the command, then the
/// report on standard output. The exit status follows [`Report::exit_status`], 125 when the
/// runner itself failed.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let args = match RunArgs::try_parse_from(args) {
        Ok(args) => args,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(RUNNER_FAILED)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let result = run_to_report(args);
    // Whatever happened above, nothing the command started outlives the runner.
    let _ = reaper::kill_descendants(SWEEP_BOUND);
    match result {
        Ok(report) => ExitCode::from(report.exit_status()),
        Err(e) => {
            eprintln!("agentvm-sidecar run: {e}");
            ExitCode::from(RUNNER_FAILED)
        }
    }
}

fn run_to_report(args: RunArgs) -> Result<Report, RunnerError> {
    reaper::become_subreaper().map_err(RunnerError::Subreaper)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(RunnerError::Runtime)?;
    let report = runtime.block_on(run(args))?;
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(report.line().as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(RunnerError::Write)?;
    Ok(report)
}

/// Runs the command `args` describes in this process (which must be a child subreaper, see
/// [`reaper::become_subreaper`]) and reports how it ended, once every process it started is
/// dead.
pub async fn run(args: RunArgs) -> Result<Report, RunnerError> {
    if args.timeout_ms == 0 {
        return Err(RunnerError::Timeout);
    }
    let mut env = Vec::with_capacity(args.env.len());
    for pair in &args.env {
        match pair.split_once('=') {
            Some((name, value)) if !name.is_empty() => env.push((name, value)),
            _ => return Err(RunnerError::Env(pair.clone())),
        }
    }
    let Some((program, arguments)) = args.argv.split_first() else {
        return Ok(not_started(NotStarted::NotFound, "argv is empty".into()));
    };
    let stdin = match &args.stdin_file {
        Some(path) => match std::fs::File::open(path) {
            Ok(file) => Stdio::from(file),
            Err(e) => {
                let message = format!("cannot open standard input {}: {e}", path.display());
                return Ok(not_started(NotStarted::of(&e), message));
            }
        },
        None => Stdio::inherit(),
    };
    let mut cmd = Command::new(program);
    cmd.args(arguments);
    if args.clear_env {
        cmd.env_clear();
    }
    cmd.envs(env)
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());

    // Before the command starts: a stop signal must never find the default action (death,
    // leaving the command behind).
    let mut stops = [
        SignalKind::terminate(),
        SignalKind::interrupt(),
        SignalKind::hangup(),
    ]
    .map(|kind| signal(kind).ok());
    let started = Instant::now();
    let deadline = TokioInstant::now() + Duration::from_millis(args.timeout_ms);
    let mut child = match reaper::start(cmd) {
        Ok(child) => child,
        Err(e) => return Ok(not_started(NotStarted::of(&e), e.to_string())),
    };
    let reaper::Pipes { stdout, stderr, .. } = child.pipes().map_err(RunnerError::Pipe)?;
    let (drain_by, drain) = watch::channel(None);
    let cap = args.max_output_bytes;
    let out = tokio::spawn(capture(stdout, cap, drain.clone()));
    let err = tokio::spawn(capture(stderr, cap, drain));

    let [term, int, hup] = &mut stops;
    let (exit, timed_out) = tokio::select! {
        exit = &mut child.exit => (exit.ok(), false),
        () = tokio::time::sleep_until(deadline) => (None, true),
        () = stopped(term) => (None, false),
        () = stopped(int) => (None, false),
        () = stopped(hup) => (None, false),
    };
    let duration = started.elapsed();
    let swept = reaper::kill_descendants(SWEEP_BOUND);
    if !swept.complete {
        eprintln!(
            "agentvm-sidecar run: processes of the command still alive after {}s",
            SWEEP_BOUND.as_secs()
        );
    }
    let exit = match exit {
        Some(exit) => Some(exit),
        None => tokio::time::timeout(REAP_GRACE, &mut child.exit)
            .await
            .ok()
            .and_then(Result::ok),
    };
    let _ = drain_by.send(Some(TokioInstant::now() + DRAIN_GRACE));
    let (stdout, stdout_truncated) = out.await.unwrap_or_default();
    let (stderr, stderr_truncated) = err.await.unwrap_or_default();
    Ok(Report::Ran(Outcome {
        exit_code: exit.and_then(|e| e.code),
        signal: exit.and_then(|e| e.signal),
        stdout,
        stderr,
        stdout_truncated,
        stderr_truncated,
        timed_out,
        duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
    }))
}

fn not_started(reason: NotStarted, message: String) -> Report {
    Report::NotStarted { reason, message }
}

/// Resolves when `signal` arrives; never when it could not be registered.
async fn stopped(signal: &mut Option<Signal>) {
    match signal {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

/// Reads `pipe` to its end, keeping the first `cap` bytes; once `drain` names an instant, reads
/// no longer than that. Reading goes on past the cap, so that a chatty command is not blocked on
/// a full pipe.
async fn capture(
    pipe: Option<impl AsyncRead + Unpin>,
    cap: usize,
    mut drain: watch::Receiver<Option<TokioInstant>>,
) -> (Vec<u8>, bool) {
    let Some(mut pipe) = pipe else {
        return (Vec::new(), false);
    };
    let mut kept = Vec::new();
    let mut truncated = false;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let until = *drain.borrow_and_update();
        let read = match until {
            Some(until) => match tokio::time::timeout_at(until, pipe.read(&mut buf)).await {
                Ok(read) => read,
                Err(_) => break,
            },
            // `read` is cancel-safe: nothing is lost when the drain time arrives first.
            None => tokio::select! {
                read = pipe.read(&mut buf) => read,
                changed = drain.changed() => match changed {
                    Ok(()) => continue,
                    Err(_) => break,
                },
            },
        };
        let n = match read {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let room = cap.saturating_sub(kept.len());
        if n > room {
            truncated = true;
        }
        kept.extend_from_slice(&buf[..n.min(room)]);
    }
    (kept, truncated)
}

/// Puts this program at `dest` (mode 0555), as an init container does for a Job's pod: a hard
/// link where `dest` is on the same filesystem as the program, a copy otherwise (always, in a
/// pod: the volume is not the image's filesystem).
pub fn install(dest: &Path) -> std::io::Result<()> {
    let program = std::env::current_exe().ok();
    // /proc/self/exe is this program even if its file was replaced or removed since it started.
    place(program.as_deref(), Path::new("/proc/self/exe"), dest)
}

fn place(link_from: Option<&Path>, copy_from: &Path, dest: &Path) -> std::io::Result<()> {
    let _ = std::fs::remove_file(dest);
    if let Some(source) = link_from {
        if std::fs::hard_link(source, dest).is_ok() {
            return Ok(());
        }
    }
    let partial = dest.with_extension("partial");
    std::fs::copy(copy_from, &partial)?;
    std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o555))?;
    std::fs::rename(&partial, dest)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<RunArgs, clap::Error> {
        RunArgs::try_parse_from(args.iter().map(OsString::from))
    }

    #[test]
    fn the_command_follows_a_double_dash_and_env_values_may_look_like_flags() {
        let args = parse(&[
            "--timeout-ms",
            "5",
            "--max-output-bytes",
            "10",
            "--env=A=-x",
            "--env",
            "B=--y",
            "--",
            "ls",
            "--timeout-ms",
        ])
        .unwrap();
        assert_eq!(args.env, ["A=-x", "B=--y"]);
        assert_eq!(args.argv, ["ls", "--timeout-ms"]);
        assert!(!args.clear_env && args.stdin_file.is_none());
        assert!(parse(&["--timeout-ms", "5", "--max-output-bytes", "1"]).is_err());
        assert!(parse(&["--max-output-bytes", "1", "--", "ls"]).is_err());
    }

    #[tokio::test]
    async fn bad_arguments_are_runner_errors() {
        let base = ["--timeout-ms", "5", "--max-output-bytes", "1"];
        let with = |extra: &[&str]| {
            let mut all: Vec<&str> = base.to_vec();
            all.extend_from_slice(extra);
            parse(&all).unwrap()
        };
        let env = run(with(&["--env", "=x", "--", "true"])).await;
        assert!(matches!(env, Err(RunnerError::Env(_))), "{env:?}");
        let mut zero = with(&["--", "true"]);
        zero.timeout_ms = 0;
        assert!(matches!(run(zero).await, Err(RunnerError::Timeout)));
        let stdin = run(with(&["--stdin-file", "/nonexistent/stdin", "--", "cat"]))
            .await
            .unwrap();
        match stdin {
            Report::NotStarted { reason, message } => {
                assert_eq!(reason, NotStarted::NotFound);
                assert!(message.contains("/nonexistent/stdin"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn install_links_or_copies_and_replaces() {
        use std::os::unix::fs::MetadataExt;
        let dir = std::env::temp_dir().join(format!("agentvm-install-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let program = dir.join("program");
        std::fs::write(&program, "#!/bin/sh\n").unwrap();
        let dest = dir.join("agentvm-sidecar");
        std::fs::write(&dest, "old").unwrap();
        place(Some(&program), &program, &dest).unwrap();
        let linked = std::fs::metadata(&dest).unwrap();
        assert_eq!(linked.ino(), std::fs::metadata(&program).unwrap().ino());
        place(None, &program, &dest).unwrap();
        let copied = std::fs::metadata(&dest).unwrap();
        assert_ne!(copied.ino(), linked.ino());
        assert_eq!(copied.permissions().mode() & 0o777, 0o555);
        assert_eq!(std::fs::read(&dest).unwrap(), b"#!/bin/sh\n");
        let missing = place(None, &dir.join("nothing"), &dest);
        assert!(missing.is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
