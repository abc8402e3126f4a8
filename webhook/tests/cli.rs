//! The `agentvm` binary as users run it: `review` on the shipped examples and on bad input,
//! `policy test` on the shipped policies and on failing ones.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use serde_json::Value;
use support::repo_tests;

fn agentvm(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_agentvm"))
        .args(args)
        .current_dir(repo_tests().join(".."))
        .env("AGENTVM_LOG_LEVEL", "error")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

fn json_lines(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn review_of_the_example_deployment_allows_with_patch_and_warning() {
    let out = agentvm(&["review", "examples/agent-deployment.yaml"], None);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "ALLOWED",
        "profile: sidecar-exec",
        "GITHUB_TOKEN",
        "patch (",
        "patched object:",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    let out = agentvm(
        &[
            "review",
            "--output",
            "json",
            "examples/agent-deployment.yaml",
        ],
        None,
    );
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 1);
    let line = &lines[0];
    assert_eq!(line["source"], "examples/agent-deployment.yaml#0");
    assert_eq!(line["response"]["allowed"], true);
    assert!(
        line["response"]["patch"].is_string(),
        "base64 patch as the server sends it"
    );
    let template = &line["patched"]["spec"]["template"];
    assert_eq!(template["metadata"]["labels"]["agentvm.dev/egress"], "deny");
    assert_eq!(
        template["spec"]["initContainers"][1]["name"],
        "agentvm-exec"
    );
    assert_eq!(
        line["patched"]["spec"]["selector"]["matchLabels"]["app"],
        "coding-agent"
    );
}

#[test]
fn review_exits_1_when_anything_is_denied_and_names_the_reason() {
    let out = agentvm(&["review", "-o", "json", "examples/denied-pods.yaml"], None);
    assert_eq!(out.status.code(), Some(1));
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 2);
    assert!(lines
        .iter()
        .all(|l| l["patched"].is_null() && l["response"]["allowed"] == false));
    assert!(lines[0]["response"]["status"]["message"]
        .as_str()
        .unwrap()
        .contains("hostNetwork"));
    assert!(lines[1]["response"]["status"]["message"]
        .as_str()
        .unwrap()
        .contains("root-shell"));
    assert_eq!(lines[1]["source"], "examples/denied-pods.yaml#1");
}

#[test]
fn review_reads_multi_document_stdin_and_passes_objects_without_pods() {
    let manifest =
        std::fs::read_to_string(repo_tests().join("../examples/mixed-manifest.yaml")).unwrap();
    let out = agentvm(&["review", "-o", "json", "-"], Some(&manifest));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["source"], "-#0");
    assert!(
        lines[0]["response"].get("patch").is_none(),
        "a Service is not touched"
    );
    let cron = &lines[1]["patched"]["spec"]["jobTemplate"]["spec"]["template"];
    assert_eq!(
        cron["metadata"]["labels"]["agentvm.dev/profile"],
        "dispatcher"
    );
    assert!(
        lines[2]["response"].get("patch").is_none(),
        "a plain Job is not touched"
    );
}

#[test]
fn review_of_admission_reviews_keeps_their_uid() {
    let path = "tests/acceptance/05-deployment-agent.json";
    let out = agentvm(&["review", "-o", "json", path], None);
    let line = &json_lines(&out)[0];
    let review: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_tests().join("acceptance/05-deployment-agent.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(line["response"]["uid"], review["request"]["uid"]);
}

#[test]
fn bad_input_exits_2_naming_file_and_document() {
    let cases = [
        ("apiVersion: v1\nkind: Pod\n---\n: : :\n", "-#1"),
        ("kind: Pod\nmetadata: {}\n", "-#0"),
        ("- just\n- a list\n", "-#0"),
        (
            "apiVersion: admission.k8s.io/v1\nkind: AdmissionReview\n",
            "-#0",
        ),
    ];
    for (input, source) in cases {
        let out = agentvm(&["review", "-"], Some(input));
        assert_eq!(out.status.code(), Some(2), "{input}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(source), "{input}: {err}");
        assert!(out.stdout.is_empty(), "nothing is printed for a bad batch");
    }
    let out = agentvm(&["review", "no/such/file.yaml"], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no/such/file.yaml"));
}

#[test]
fn policy_test_passes_on_the_shipped_policies_and_the_example() {
    for dir in ["policies", "examples/policies"] {
        let out = agentvm(&["policy", "test", dir], None);
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{dir}: {text}");
        assert!(text.contains(" passed, 0 failed"), "{text}");
    }
}

#[test]
fn policy_test_reports_failures_with_file_line_and_rule() {
    let dir = std::env::temp_dir().join(format!("agentvm-cli-policy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("policy_test.rego"),
        "package agentvm\n\ntest_ok if true\n\ntest_wrong if 1 == 2\n",
    )
    .unwrap();
    let out = agentvm(&["policy", "test", dir.to_str().unwrap()], None);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text.contains("FAIL policy_test.rego:5: test_wrong"),
        "{text}"
    );
    assert!(text.contains("1 passed, 1 failed"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `serve` with `extra`, files from `tls` as certificate and key (the tests stop before they
/// are read), and ports the system picks.
fn serve_args<'a>(tls: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["serve"];
    args.extend_from_slice(extra);
    args.extend([
        "--tls-cert",
        tls,
        "--tls-key",
        tls,
        "--listen",
        "127.0.0.1:0",
        "--probe-listen",
        "127.0.0.1:0",
    ]);
    args
}

#[test]
fn serve_refuses_to_start_on_a_broken_policy_naming_file_and_line() {
    let dir = std::env::temp_dir().join(format!("agentvm-cli-serve-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("policy.rego"),
        "package agentvm\n\ndeny contains msg if {\n",
    )
    .unwrap();
    let p = dir.to_str().unwrap();
    let out = agentvm(&serve_args(p, &["--policies", p]), None);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("policy.rego:4"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--cluster required` with a kubeconfig whose API server does not answer: the webhook does not
/// start (it used to start, and report ready, with only a warning).
#[test]
fn serve_with_cluster_required_refuses_to_start_when_the_api_does_not_answer() {
    let dir = std::env::temp_dir().join(format!("agentvm-cli-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    // Port 9 (discard) on loopback: nothing listens there.
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: \
         http://127.0.0.1:9\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\n\
         current-context: c\nusers:\n- name: u\n  user: {}\n",
    )
    .unwrap();
    let p = dir.to_str().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_agentvm"))
        .args(serve_args(
            p,
            &["--cluster", "required", "--certificates", "files"],
        ))
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("AGENTVM_LOG_LEVEL", "error")
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--cluster required, but the API server does not answer"),
        "{err}"
    );
}
