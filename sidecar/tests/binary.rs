//! The `agentvm-sidecar` binary as the kubelet and the proxy use it: the startup probe against
//! a running exec server, a command through it, and a clean stop on SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_agentvm-sidecar");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn probe(url: &str) -> bool {
    Command::new(BIN)
        .args(["probe", url])
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

fn wait_ready(url: &str) {
    let started = Instant::now();
    while !probe(url) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{url} never came up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One HTTP/1.1 POST with `Connection: close`; the raw answer.
fn post(port: u16, path: &str, body: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    answer
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn exec_server_answers_the_probe_runs_commands_and_stops_on_sigterm() {
    let workspace = std::env::temp_dir().join(format!("agentvm-bin-ws-{}", std::process::id()));
    std::fs::create_dir_all(&workspace).unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/healthz");
    assert!(!probe(&url), "nothing listens yet: the probe must fail");
    let mut server = Server(
        Command::new(BIN)
            .args([
                "exec",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--workspace",
            ])
            .arg(&workspace)
            .env("AGENTVM_LOG_LEVEL", "warn")
            .spawn()
            .unwrap(),
    );
    wait_ready(&url);
    let answer = post(port, "/v1/exec", r#"{"argv": ["sh", "-c", "pwd"]}"#);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let canonical = workspace.canonicalize().unwrap();
    assert!(
        answer.contains(&format!("{}\\n", canonical.display())),
        "{answer}"
    );
    // A command in flight when SIGTERM arrives finishes within the grace period.
    let slow = std::thread::spawn(move || post(port, "/v1/exec", r#"{"argv": ["sleep", "0.5"]}"#));
    std::thread::sleep(Duration::from_millis(150));
    sigterm(&server.0);
    let answer = slow.join().unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"exit_code\":0"), "{answer}");
    let status = server.0.wait().unwrap();
    assert!(status.success(), "{status}");
    std::fs::remove_dir_all(&workspace).unwrap();
}

/// Whether `pid` is a live process (a zombie counts as dead).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

/// Runs the runner as a Job's container does; its report (decoded) and exit status.
fn runner(args: &[&str], stdin: Stdio) -> (serde_json::Value, Option<i32>) {
    let out = Command::new(BIN)
        .arg("run")
        .args(args)
        .stdin(stdin)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let json = text
        .strip_prefix("agentvm-exec-report/1 ")
        .unwrap_or_else(|| panic!("not a report: {text:?}"));
    assert_eq!(json.matches('\n').count(), 1, "one line: {text:?}");
    let mut report: serde_json::Value = serde_json::from_str(json).unwrap();
    if let Some(ran) = report.get_mut("ran") {
        use base64::Engine as _;
        for stream in ["stdout", "stderr"] {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(ran[stream].as_str().unwrap())
                .unwrap();
            ran[stream] = String::from_utf8(bytes).unwrap().into();
        }
    }
    (report, out.status.code())
}

/// A process in a new session, one in a new process group (`setpgid`), one double-forked into
/// a new session, their pids printed.
const ESCAPES: &str = "setsid sleep 300 >/dev/null 2>&1 & echo $!; \
    perl -e 'setpgrp(0, 0); exec \"sleep\", \"300\"' >/dev/null 2>&1 & echo $!; \
    (setsid sh -c 'sleep 300 & echo $!' &); sleep 0.3";

fn assert_all_dead(stdout: &serde_json::Value) {
    let pids: Vec<i32> = stdout
        .as_str()
        .unwrap()
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect();
    assert_eq!(pids.len(), 3, "{stdout}");
    let alive: Vec<i32> = pids.iter().copied().filter(|p| alive(*p)).collect();
    for p in &alive {
        let _ = Command::new("kill").args(["-9", &p.to_string()]).status();
    }
    assert!(alive.is_empty(), "outlived the runner: {alive:?}");
}

/// The runner alone (this test process is no subreaper): nothing its command started, in
/// whatever session or group, outlives it, at the command's end or at the time limit.
#[test]
fn the_runner_ends_everything_its_command_started() {
    let (report, status) = runner(
        &[
            "--timeout-ms=5000",
            "--max-output-bytes=100",
            "--",
            "sh",
            "-c",
            ESCAPES,
        ],
        Stdio::null(),
    );
    assert_eq!(status, Some(0), "{report}");
    assert_eq!(report["ran"]["exit_code"], 0);
    assert_all_dead(&report["ran"]["stdout"]);

    let script = format!("{ESCAPES}; echo late >&2; exec sleep 300");
    let (report, status) = runner(
        &[
            "--timeout-ms=1000",
            "--max-output-bytes=100",
            "--",
            "sh",
            "-c",
            &script,
        ],
        Stdio::null(),
    );
    assert_eq!(status, Some(124), "{report}");
    let ran = &report["ran"];
    assert_eq!(
        (ran["timed_out"].clone(), ran["signal"].clone()),
        (true.into(), 9.into())
    );
    assert_eq!(ran["stderr"], "late\n");
    assert_all_dead(&ran["stdout"]);
}

/// As a Job runs it: standard input from a file, the environment passed on, output capped per
/// stream, a signal reported, a missing program reported.
#[test]
fn the_runner_reports_how_its_command_ended() {
    let dir = std::env::temp_dir().join(format!("agentvm-runner-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let stdin = dir.join("stdin");
    std::fs::write(&stdin, "from the file").unwrap();
    let (report, status) = runner(
        &[
            "--timeout-ms=5000",
            "--max-output-bytes=20",
            "--stdin-file",
            stdin.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            "cat; echo; seq 1 100 >&2; exit 7",
        ],
        Stdio::null(),
    );
    assert_eq!(status, Some(7));
    let ran = &report["ran"];
    assert_eq!(ran["stdout"], "from the file\n");
    assert_eq!(ran["stdout_truncated"], false);
    assert_eq!(ran["stderr"], "1\n2\n3\n4\n5\n6\n7\n8\n9\n10");
    assert_eq!(ran["stderr_truncated"], true);

    let (report, status) = runner(
        &[
            "--timeout-ms=5000",
            "--max-output-bytes=20",
            "--",
            "sh",
            "-c",
            "kill -TERM $$",
        ],
        Stdio::null(),
    );
    assert_eq!(status, Some(128 + 15));
    assert_eq!(report["ran"]["signal"], 15);
    assert_eq!(report["ran"]["exit_code"], serde_json::Value::Null);

    let (report, status) = runner(
        &[
            "--timeout-ms=5000",
            "--max-output-bytes=20",
            "--",
            "no-such-program",
        ],
        Stdio::null(),
    );
    assert_eq!(status, Some(127));
    assert_eq!(report["not_started"]["reason"], "not_found");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Told to stop (as the kubelet does at a Job's deadline), the runner ends its command and
/// everything it started, and still reports.
#[test]
fn the_runner_stops_on_sigterm() {
    let child = Command::new(BIN)
        .args([
            "run",
            "--timeout-ms=60000",
            "--max-output-bytes=100",
            "--",
            "sh",
            "-c",
        ])
        .arg(format!("{ESCAPES}; exec sleep 300"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    sigterm(&child);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(128 + 9));
    let text = String::from_utf8(out.stdout).unwrap();
    let json = text.strip_prefix("agentvm-exec-report/1 ").unwrap();
    let report: serde_json::Value = serde_json::from_str(json).unwrap();
    use base64::Engine as _;
    let stdout = base64::engine::general_purpose::STANDARD
        .decode(report["ran"]["stdout"].as_str().unwrap())
        .unwrap();
    assert_all_dead(&String::from_utf8(stdout).unwrap().into());
}

#[test]
fn bad_configuration_exits_with_64() {
    let status = Command::new(BIN)
        .args(["exec", "--workspace", "/nonexistent/agentvm"])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(64));
    let bad = std::env::temp_dir().join(format!("agentvm-bad-{}.yaml", std::process::id()));
    std::fs::write(&bad, "upstreams:\n  - name: Bad_Name\n    url: http://h/\n").unwrap();
    let status = Command::new(BIN)
        .args(["proxy", "--config"])
        .arg(&bad)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(64));
    std::fs::remove_file(&bad).unwrap();
}

#[test]
fn proxy_answers_the_probe_and_mcp() {
    let port = free_port();
    let _server = Server(
        Command::new(BIN)
            .args(["proxy", "--listen", &format!("127.0.0.1:{port}")])
            .env("AGENTVM_LOG_LEVEL", "warn")
            .spawn()
            .unwrap(),
    );
    wait_ready(&format!("http://127.0.0.1:{port}/healthz"));
    let answer = post(
        port,
        "/mcp",
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(r#""tools":[]"#), "{answer}");
}

fn tool_names(port: u16) -> String {
    let answer = post(
        port,
        "/mcp",
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
    );
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    let names: Vec<&str> = v["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    names.join(",")
}

fn wait_for_tools(port: u16, want: &str) {
    let started = Instant::now();
    while tool_names(port) != want {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "tools never became {want:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn proxy_reloads_config_and_policy_and_keeps_the_last_good_ones() {
    let dir = std::env::temp_dir().join(format!("agentvm-bin-reload-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    let config = dir.join("proxy.yaml");
    let policy = dir.join("policies/policy.rego");
    std::fs::write(&config, "exec:\n  endpoint: http://127.0.0.1:9\n").unwrap();
    std::fs::write(
        &policy,
        "package agentvm.tools\n\nallow if input.tool == \"exec\"\n",
    )
    .unwrap();
    let port = free_port();
    let _server = Server(
        Command::new(BIN)
            .args(["proxy", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--config")
            .arg(&config)
            .arg("--policies")
            .arg(dir.join("policies"))
            .args(["--reload-interval", "1"])
            .env("AGENTVM_LOG_LEVEL", "error")
            .spawn()
            .unwrap(),
    );
    wait_ready(&format!("http://127.0.0.1:{port}/healthz"));
    assert_eq!(tool_names(port), "exec");
    // A policy that allows nothing hides the tool.
    std::fs::write(&policy, "package agentvm.tools\n\nallow := false\n").unwrap();
    wait_for_tools(port, "");
    // A broken policy is rejected: still nothing allowed, and the proxy still answers.
    std::fs::write(&policy, "package agentvm.tools\n\nallow if {\n").unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(tool_names(port), "");
    std::fs::write(&policy, "package agentvm.tools\n\nallow := true\n").unwrap();
    wait_for_tools(port, "exec");
    // A config without exec removes the tool; a broken config keeps the last good one.
    std::fs::write(&config, "upstreams: []\n").unwrap();
    wait_for_tools(port, "");
    std::fs::write(&config, "exec:\n  endpoint: not a url\n").unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(tool_names(port), "");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Writes `files` into `dir` the way the kubelet updates a ConfigMap volume: a new hidden
/// folder, the `..data` link swapped to it in one rename, and a link per key into `..data`.
fn kubelet_write(dir: &std::path::Path, version: &str, files: &[(&str, &str)]) {
    use std::os::unix::fs::symlink;
    let target = format!("..{version}");
    std::fs::create_dir_all(dir.join(&target)).unwrap();
    for (key, text) in files {
        std::fs::write(dir.join(&target).join(key), text).unwrap();
    }
    symlink(&target, dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    for (key, _) in files {
        let link = dir.join(key);
        if std::fs::symlink_metadata(&link).is_err() {
            symlink(format!("..data/{key}"), link).unwrap();
        }
    }
}

fn proxy_with_mounts(port: u16, config: &std::path::Path, tools: &std::path::Path) -> Server {
    Server(
        Command::new(BIN)
            .args(["proxy", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--config")
            .arg(config)
            .arg("--policies")
            .arg(tools)
            .args(["--allow-missing", "--reload-interval", "1"])
            .env("AGENTVM_LOG_LEVEL", "error")
            .spawn()
            .unwrap(),
    )
}

#[test]
fn proxy_waits_for_optional_configmaps_and_follows_their_updates() {
    let dir = std::env::temp_dir().join(format!("agentvm-bin-mounts-{}", std::process::id()));
    let (config_dir, tools) = (dir.join("config"), dir.join("tools"));
    // What the kubelet mounts for an optional ConfigMap that does not exist: an empty folder.
    std::fs::create_dir_all(&config_dir).unwrap();
    std::fs::create_dir_all(&tools).unwrap();
    let config = config_dir.join("config.yaml");
    let exec = ("config.yaml", "exec:\n  endpoint: http://127.0.0.1:9\n");
    kubelet_write(&config_dir, "v1", &[exec]);

    // The config is there, the tool policy is not: the proxy starts and denies every tool.
    let port = free_port();
    let server = proxy_with_mounts(port, &config, &tools);
    wait_ready(&format!("http://127.0.0.1:{port}/healthz"));
    assert_eq!(tool_names(port), "", "no tool policy yet: exec is denied");
    let allow_exec = (
        "policy.rego",
        "package agentvm.tools\n\nallow if input.tool == \"exec\"\n",
    );
    kubelet_write(&tools, "v1", &[allow_exec]);
    wait_for_tools(port, "exec");
    // An update of the ConfigMap arrives through the swapped ..data link.
    kubelet_write(&config_dir, "v2", &[("config.yaml", "upstreams: []\n")]);
    wait_for_tools(port, "");
    drop(server);

    // The config is not there yet: the proxy starts without upstreams and loads it later.
    std::fs::remove_dir_all(&config_dir).unwrap();
    std::fs::create_dir_all(&config_dir).unwrap();
    let port = free_port();
    let _server = proxy_with_mounts(port, &config, &tools);
    wait_ready(&format!("http://127.0.0.1:{port}/healthz"));
    assert_eq!(tool_names(port), "");
    kubelet_write(&config_dir, "v1", &[exec]);
    wait_for_tools(port, "exec");

    // Without --allow-missing, a missing config file is a configuration error that names it.
    let out = Command::new(BIN)
        .args(["proxy", "--listen", "127.0.0.1:0", "--config"])
        .arg(dir.join("nowhere/config.yaml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("nowhere/config.yaml"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}
