//! The exec server's router with real commands, each run by the real runner (the
//! `agentvm-sidecar` binary cargo built): answers, limits, and above all that nothing a command
//! starts outlives its request, whatever session or process group it moved to, and that ending
//! one request's processes never touches another's.
//!
//! This test process is the exec server: it becomes a child subreaper, and every child it has is
//! a runner (no test here starts processes any other way).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod exec_api;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentvm_sidecar::exec::command::{base_env, Policy, DEFAULT_PATH};
use agentvm_sidecar::exec::{app, ExecConfig, ExecState};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use exec_api::{call, call_raw};
use serde_json::{json, Value};
use tower::ServiceExt;

const RUNNER: &str = env!("CARGO_BIN_EXE_agentvm-sidecar");

/// A workspace of its own for each test, removed at its end.
struct Workspace(PathBuf);

impl Drop for Workspace {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn workspace(name: &str) -> Workspace {
    let dir = std::env::temp_dir().join(format!("agentvm-exec-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Workspace(dir.canonicalize().unwrap())
}

fn config(workspace: PathBuf) -> ExecConfig {
    ExecConfig {
        policy: Policy {
            base_env: base_env(&workspace, DEFAULT_PATH, "/tmp", &[]),
            workspace,
            default_timeout: Duration::from_secs(5),
            max_timeout: Duration::from_secs(30),
        },
        max_output_bytes: 1024,
        max_body_bytes: 4096,
        max_concurrent: 4,
        access_log: false,
        runner: PathBuf::from(RUNNER),
    }
}

fn server(workspace: &Workspace) -> axum::Router {
    app(Arc::new(ExecState::new(config(workspace.0.clone()))))
}

/// Whether `pid` is a live process. A zombie waiting for its reaper counts as dead, unless it is
/// a thread-group leader that ended alone while other threads of its process still run
/// (`num_threads`, field 20, counts the zombie leader too).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let fields: Vec<&str> = stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .collect();
            let threads: u32 = fields.get(17).and_then(|t| t.parse().ok()).unwrap_or(0);
            fields.first().is_some_and(|state| !state.starts_with('Z')) || threads > 1
        }
        Err(_) => false,
    }
}

/// Fails naming the survivors among `pids`, after killing them.
fn assert_all_dead(pids: &[i32]) {
    let alive: Vec<i32> = pids.iter().copied().filter(|p| alive(*p)).collect();
    for p in &alive {
        if let Some(pid) = rustix::process::Pid::from_raw(*p) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }
    assert!(alive.is_empty(), "still alive: {alive:?} of {pids:?}");
}

/// The pids a command printed, one per line.
fn pids_in(text: &str) -> Vec<i32> {
    text.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// Waits up to 5 s for `file` to hold `n` pids.
async fn pids_from(file: &std::path::Path, n: usize) -> Vec<i32> {
    let started = Instant::now();
    loop {
        let pids = pids_in(&std::fs::read_to_string(file).unwrap_or_default());
        if pids.len() >= n {
            return pids;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no pids in {file:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts a process in a new session, one in a new process group (`setpgid`), and one through
/// a double fork into a new session, and prints their pids. The last holds the output pipe.
const ESCAPES: &str = "setsid sleep 300 >/dev/null 2>&1 & echo $!; \
    perl -e 'setpgrp(0, 0); exec \"sleep\", \"300\"' >/dev/null 2>&1 & echo $!; \
    (setsid sh -c 'sleep 300 & echo $!' &); sleep 0.3";

#[tokio::test]
async fn processes_that_left_the_group_die_at_the_timeout() {
    let ws = workspace("escape-timeout");
    let app = server(&ws);
    let script = format!("{ESCAPES}; exec sleep 300");
    let started = Instant::now();
    let (status, _, answer) = call(
        &app,
        json!({"argv": ["sh", "-c", script], "timeout_ms": 1000}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(answer["timed_out"], true);
    assert_eq!(
        (answer["exit_code"].clone(), answer["signal"].clone()),
        (Value::Null, json!(9))
    );
    let pids = pids_in(answer["stdout"].as_str().unwrap());
    assert_eq!(pids.len(), 3, "{answer}");
    // At once: the answer comes after everything is dead.
    assert_all_dead(&pids);
}

#[tokio::test]
async fn processes_that_left_the_group_die_when_the_command_ends() {
    let ws = workspace("escape-exit");
    let app = server(&ws);
    let started = Instant::now();
    let (status, _, answer) = call(&app, json!({"argv": ["sh", "-c", ESCAPES]})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["exit_code"], 0);
    assert_eq!(answer["timed_out"], false);
    // The double-forked process held the output pipe; the answer did not wait for it.
    assert!(started.elapsed() < Duration::from_secs(3));
    let pids = pids_in(answer["stdout"].as_str().unwrap());
    assert_eq!(pids.len(), 3, "{answer}");
    assert_all_dead(&pids);
}

#[tokio::test]
async fn ending_one_request_spares_the_processes_of_another() {
    let ws = workspace("neighbours");
    let app = server(&ws);
    // B keeps a process in a new session while A runs and ends, several times over.
    let b = {
        let app = app.clone();
        tokio::spawn(async move {
            let script = "setsid sleep 300 >/dev/null 2>&1 & echo $! > b.pid; \
                          sleep 300 & echo $! >> b.pid; wait";
            call(
                &app,
                json!({"argv": ["sh", "-c", script], "timeout_ms": 4000}),
            )
            .await
        })
    };
    let neighbours = pids_from(&ws.0.join("b.pid"), 2).await;
    for round in 0..3 {
        let timeout = if round == 1 { 500 } else { 5000 };
        let script = if round == 1 {
            format!("{ESCAPES}; exec sleep 300")
        } else {
            ESCAPES.to_owned()
        };
        let (status, _, answer) = call(
            &app,
            json!({"argv": ["sh", "-c", script], "timeout_ms": timeout}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_all_dead(&pids_in(answer["stdout"].as_str().unwrap()));
        for pid in &neighbours {
            assert!(
                alive(*pid),
                "round {round}: {pid} of the other request was killed"
            );
        }
    }
    let (status, _, answer) = b.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["timed_out"], true);
    assert_all_dead(&neighbours);
}

#[tokio::test]
async fn a_command_that_kills_its_runner_leaves_nothing_behind() {
    let ws = workspace("runner-killed");
    let app = server(&ws);
    let script = "echo $$ > left.pid; setsid sleep 300 >/dev/null 2>&1 & echo $! >> left.pid; \
                  (setsid sh -c 'sleep 300 & echo $! >> left.pid' &); sleep 0.3; kill -9 $PPID; \
                  sleep 300";
    let (status, _, answer) = call(&app, json!({"argv": ["sh", "-c", script]})).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{answer}");
    let error = answer["error"].as_str().unwrap();
    assert!(
        error.contains("runner failed") && error.contains("killed by signal 9"),
        "{error}"
    );
    let pids = pids_in(&std::fs::read_to_string(ws.0.join("left.pid")).unwrap());
    assert_eq!(
        pids.len(),
        3,
        "the command and two processes in sessions of their own"
    );
    assert_all_dead(&pids);
}

#[tokio::test]
async fn a_client_that_hangs_up_leaves_nothing_behind() {
    let ws = workspace("hang-up");
    let app = server(&ws);
    let request = {
        let app = app.clone();
        tokio::spawn(async move {
            let script = "setsid sleep 300 >/dev/null 2>&1 & echo $! > left.pid; sleep 300";
            call(
                &app,
                json!({"argv": ["sh", "-c", script], "timeout_ms": 30000}),
            )
            .await
        })
    };
    let pids = pids_from(&ws.0.join("left.pid"), 1).await;
    request.abort();
    let started = Instant::now();
    while alive(pids[0]) {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{pids:?} survived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A Python program whose processes end their main thread alone (`SYS_exit`, not
/// `exit_group`): each leader is then a zombie that `waitid` does not report, while another
/// thread of its process runs on. It forks two such processes, one of them in a session of its
/// own, waits until both are in that state, then, as its first argument says, exits (`exit`),
/// does the same itself (`timeout`), or does the same and then kills its runner
/// (`kill-runner`). Each process's surviving thread appends its pid to `leaders.pid` once its
/// leader is a zombie: a pid in the file proves that process outlived its leader.
const LEADERS_END_ALONE: &str = r#"
import ctypes, os, platform, signal, sys, threading, time
SYS_EXIT = {"x86_64": 60, "aarch64": 93}[platform.machine()]
mode = sys.argv[1]
ready_r, ready_w = os.pipe()

def live_on(kill_runner):
    me = os.getpid()
    while open(f"/proc/{me}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
        time.sleep(0.01)
    fd = os.open("leaders.pid", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, b"%d\n" % me)
    os.write(ready_w, b".")
    if kill_runner:
        os.kill(os.getppid(), signal.SIGKILL)
    while True:
        time.sleep(0.05)

def end_main_thread(kill_runner=False):
    threading.Thread(target=live_on, args=(kill_runner,)).start()
    ctypes.CDLL(None).syscall(SYS_EXIT, 0)

for new_session in (False, True):
    if os.fork() == 0:
        try:
            if new_session:
                os.setsid()
            end_main_thread()
        finally:
            os._exit(1)
got = b""
while len(got) < 2:
    got += os.read(ready_r, 2 - len(got))
if mode == "exit":
    sys.exit(0)
end_main_thread(kill_runner=mode == "kill-runner")
"#;

/// Runs [`LEADERS_END_ALONE`] in `mode`: the answer, and the pids of the processes whose
/// leader ended alone. Fails, rather than skips, without `python3` on the commands' `PATH`.
async fn leaders_end_alone(ws: &Workspace, mode: &str, leaders: usize) -> (StatusCode, Value) {
    let python = DEFAULT_PATH
        .split(':')
        .any(|dir| std::path::Path::new(dir).join("python3").is_file());
    assert!(
        python,
        "this test needs python3 in one of {DEFAULT_PATH} (it is not skipped without it)"
    );
    let app = server(ws);
    let started = Instant::now();
    let (status, _, answer) = call(
        &app,
        json!({"argv": ["python3", "-c", LEADERS_END_ALONE, mode], "timeout_ms": 2000}),
    )
    .await;
    let pids = pids_in(&std::fs::read_to_string(ws.0.join("leaders.pid")).unwrap_or_default());
    // At once: the answer comes after everything is dead.
    assert_all_dead(&pids);
    assert_eq!(pids.len(), leaders, "{answer}");
    assert!(started.elapsed() < Duration::from_secs(4), "{answer}");
    (status, answer)
}

#[tokio::test]
async fn a_process_whose_leader_ended_alone_dies_at_the_timeout() {
    let ws = workspace("leader-timeout");
    let (status, answer) = leaders_end_alone(&ws, "timeout", 3).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["timed_out"], true);
    assert_eq!(
        (answer["exit_code"].clone(), answer["signal"].clone()),
        (Value::Null, json!(9))
    );
}

#[tokio::test]
async fn a_process_whose_leader_ended_alone_dies_when_the_command_ends() {
    let ws = workspace("leader-exit");
    let (status, answer) = leaders_end_alone(&ws, "exit", 2).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["timed_out"], false);
    assert_eq!(answer["exit_code"], 0);
}

#[tokio::test]
async fn a_process_whose_leader_ended_alone_dies_when_it_kills_its_runner() {
    let ws = workspace("leader-runner-killed");
    let (status, answer) = leaders_end_alone(&ws, "kill-runner", 3).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{answer}");
    let error = answer["error"].as_str().unwrap();
    assert!(error.contains("killed by signal 9"), "{error}");
}

#[tokio::test]
async fn exit_code_output_stdin_and_environment() {
    let ws = workspace("basics");
    let app = server(&ws);
    let (status, _, answer) = call(
        &app,
        json!({"argv": ["sh", "-c", "echo $0 $X; cat; echo oops >&2; exit 3", "hi"],
            "stdin": "in", "env": {"X": "y"}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["stdout"], "hi y\nin");
    assert_eq!(answer["stderr"], "oops\n");
    assert_eq!(answer["exit_code"], 3);
    assert!(answer.get("signal").is_none() && answer.get("note").is_none());
    assert_eq!(answer["stdout_truncated"], false);

    let (_, _, answer) = call(&app, json!({"argv": ["env"]})).await;
    let mut names: Vec<&str> = answer["stdout"]
        .as_str()
        .unwrap()
        .lines()
        .filter_map(|l| l.split('=').next())
        .collect();
    names.sort();
    assert_eq!(names, ["HOME", "LANG", "PATH", "TMPDIR"]);

    // Variables meant for the runner itself reach only the command.
    let (status, _, answer) = call(
        &app,
        json!({"argv": ["sh", "-c", "echo $AGENTVM_LOG_FORMAT"],
            "env": {"AGENTVM_LOG_FORMAT": "bad", "RUST_MIN_STACK": "99999999999999"}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["stdout"], "bad\n");
}

#[tokio::test]
async fn a_signal_that_ends_the_command_is_reported() {
    let ws = workspace("signal");
    let app = server(&ws);
    let (status, _, answer) = call(&app, json!({"argv": ["sh", "-c", "kill -TERM $$"]})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["exit_code"], Value::Null);
    assert_eq!(answer["signal"], 15);
    assert_eq!(answer["timed_out"], false);
}

#[tokio::test]
async fn output_is_capped_and_the_command_still_finishes() {
    let ws = workspace("cap");
    let app = server(&ws);
    // 1 MiB on each stream against a 1024-byte cap.
    let script = "head -c 1048576 /dev/zero; head -c 1048576 /dev/zero >&2; exit 0";
    let (_, _, answer) = call(&app, json!({"argv": ["sh", "-c", script]})).await;
    assert_eq!(answer["exit_code"], 0, "{answer}");
    assert_eq!(answer["stdout"].as_str().unwrap().len(), 1024);
    assert_eq!(answer["stderr"].as_str().unwrap().len(), 1024);
    assert_eq!(
        (
            answer["stdout_truncated"].clone(),
            answer["stderr_truncated"].clone()
        ),
        (json!(true), json!(true))
    );
    let exact = "x".repeat(1024);
    let (_, _, answer) = call(&app, json!({"argv": ["printf", exact]})).await;
    assert_eq!(answer["stdout"], exact);
    assert_eq!(answer["stdout_truncated"], false);
}

#[tokio::test]
async fn no_descriptor_of_the_server_is_inherited() {
    let ws = workspace("fds");
    let app = server(&ws);
    // Descriptors the server holds while the command runs: a file, a listener, a socket.
    let _file = std::fs::File::open("/proc/self/stat").unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let _conn = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (_, _, answer) = call(&app, json!({"argv": ["ls", "/proc/self/fd"]})).await;
    let fds: Vec<&str> = answer["stdout"].as_str().unwrap().lines().collect();
    // 0-2 are /dev/null and the pipes; 3 is the directory `ls` itself opened.
    assert_eq!(fds, ["0", "1", "2", "3"], "{answer}");
}

#[tokio::test]
async fn bad_requests_get_400_with_a_reason() {
    let ws = workspace("bad");
    let app = server(&ws);
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
        (
            r#"{"argv": ["/no/such/program"]}"#,
            "cannot start \"/no/such/program\": No such file",
        ),
    ] {
        let (status, _, answer) = call_raw(&app, body.to_owned()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
        let error = answer["error"].as_str().unwrap();
        assert!(error.contains(reason), "{body}: {error}");
    }
    let body = format!(r#"{{"argv": ["true"], "stdin": "{}"}}"#, "x".repeat(5000));
    let (status, _, answer) = call_raw(&app, body).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
}

#[tokio::test]
async fn a_full_server_answers_429_and_runs_at_most_the_limit() {
    let ws = workspace("busy");
    let app = app(Arc::new(ExecState::new(ExecConfig {
        max_concurrent: 3,
        ..config(ws.0.clone())
    })));
    let calls: Vec<_> = (0..12)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move { call(&app, json!({"argv": ["sleep", "0.5"]})).await })
        })
        .collect();
    let mut ok = 0;
    let mut busy = 0;
    for c in calls {
        let (status, retry, _) = c.await.unwrap();
        match status {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                assert_eq!(retry.as_deref(), Some("1"));
                busy += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!((ok, busy), (3, 9));
    // The slots are free again.
    assert_eq!(
        call(&app, json!({"argv": ["true"]})).await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn health_endpoints_answer() {
    let ws = workspace("health");
    let app = server(&ws);
    for path in ["/v1/health", "/healthz"] {
        let request = Request::get(path).body(Body::empty()).unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }
}
