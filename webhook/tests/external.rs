//! Checks against real peers, installed by `tests/setup`: the acceptance corpus and its checker
//! (Python, openssl), and the Kubernetes JSON schemas (`kubernetes-validate --strict`) for every
//! object the webhook patches.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::process::Command;

use agentvm_webhook::admission::Mode;
use serde_json::Value;
use support::*;

#[test]
fn acceptance_corpus_passes_against_the_binary() {
    let python = tool("AGENTVM_PYTHON", ".venv/bin/python");
    let out = Command::new(python)
        .arg(repo_tests().join("acceptance/check"))
        .args(["--bin", env!("CARGO_BIN_EXE_agentvm")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}{}", String::from_utf8_lossy(&out.stderr));
    let summary = text.lines().last().unwrap_or("");
    assert!(out.status.success(), "acceptance corpus: {summary}");
    assert!(
        summary.ends_with(" 0 failed") && !summary.starts_with("0 passed"),
        "{summary}"
    );
}

#[test]
fn every_patched_object_passes_the_strict_kubernetes_schemas() {
    let validate = tool(
        "AGENTVM_KUBERNETES_VALIDATE",
        ".venv/bin/kubernetes-validate",
    );
    let reviewer = reviewer();
    let dir = std::env::temp_dir().join(format!("agentvm-schemas-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut files = Vec::new();
    let sources = [
        repo_tests().join("acceptance"),
        repo_tests().join("fixtures/captures"),
    ];
    for (name, review) in sources.iter().flat_map(|d| json_files(d)) {
        let Ok(req) = agentvm_webhook::review::from_value(review) else {
            continue;
        };
        let out = reviewer.review(Mode::Mutate, &req);
        let (Some(ops), Some(object)) = (decoded_patch(&out), req.object()) else {
            continue;
        };
        let mut patched = apply(object, &ops);
        // kubernetes-validate names each result after metadata.name and fails without one;
        // the API server fills it from generateName, so the test does the same.
        if patched["metadata"].get("name").is_none() {
            let prefix = patched["metadata"]["generateName"]
                .as_str()
                .unwrap_or("x-")
                .to_owned();
            patched["metadata"]["name"] = Value::from(prefix + "abcde");
        }
        let path = dir.join(format!("{}.json", name.trim_end_matches(".json")));
        std::fs::write(&path, patched.to_string()).unwrap();
        files.push(path);
    }
    assert!(files.len() > 40, "only {} patched objects", files.len());
    let out = Command::new(validate)
        .arg("--strict")
        .args(&files)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let passed = text
        .lines()
        .filter(|l| l.contains(" passed for resource "))
        .count();
    assert!(
        out.status.success() && passed == files.len(),
        "{passed}/{} passed:\n{text}",
        files.len()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_examples_pass_the_strict_kubernetes_schemas_after_review() {
    let validate = tool(
        "AGENTVM_KUBERNETES_VALIDATE",
        ".venv/bin/kubernetes-validate",
    );
    let out = Command::new(env!("CARGO_BIN_EXE_agentvm"))
        .args(["review", "-o", "json"])
        .arg(repo_tests().join("../examples/agent-deployment.yaml"))
        .arg(repo_tests().join("../examples/mixed-manifest.yaml"))
        .arg(repo_tests().join("../examples/proxy-upstreams.yaml"))
        .output()
        .unwrap();
    let dir = std::env::temp_dir().join(format!("agentvm-example-schemas-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut files = Vec::new();
    for (i, line) in String::from_utf8_lossy(&out.stdout).lines().enumerate() {
        let v: Value = serde_json::from_str(line).unwrap();
        let path = dir.join(format!("{i}.json"));
        std::fs::write(&path, v["patched"].to_string()).unwrap();
        files.push(path);
    }
    // 1 + 3 + 3 documents; the proxy example's ConfigMap and Secret pass untouched.
    assert_eq!(files.len(), 7);
    let out = Command::new(validate)
        .arg("--strict")
        .args(&files)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.matches(" passed for resource ").count() == 7,
        "{text}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
