//! Holes a tester found by attacking the webhook as a new user (inputs in
//! `tests/fixtures/findings/`), each pinned by a test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use agentvm_webhook::admission::Mode;
use agentvm_webhook::offline;
use serde_json::Value;
use support::*;

fn review_file(name: &str) -> Vec<offline::Reviewed> {
    let path = repo_tests().join("fixtures/findings").join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    let reviewer = reviewer();
    offline::parse_documents(name, &text)
        .unwrap()
        .iter()
        .map(|d| offline::review_document(&reviewer, d))
        .collect()
}

fn one(name: &str) -> offline::Reviewed {
    let mut all = review_file(name);
    assert_eq!(all.len(), 1, "{name}");
    all.remove(0)
}

#[test]
fn csi_and_pod_certificate_credentials_are_stripped_with_a_warning() {
    for (name, word) in [
        ("csi-secrets-store.yaml", "CSI driver"),
        ("pod-certificate.yaml", "podCertificate"),
    ] {
        let r = one(name);
        assert!(r.response.allowed, "{name}: {}", r.response.message);
        assert!(
            r.response.warnings.iter().any(|w| w.contains(word)),
            "{name}: {:?}",
            r.response.warnings
        );
        let spec = &r.patched.unwrap()["spec"];
        for v in spec["volumes"].as_array().into_iter().flatten() {
            assert!(v.get("csi").is_none(), "{name}: {v}");
            for s in v
                .pointer("/projected/sources")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                assert!(s.get("podCertificate").is_none(), "{name}: {s}");
            }
        }
    }
}

#[test]
fn updates_cannot_swap_the_proxy_or_drop_the_egress_label_through_status() {
    for (name, word) in [
        ("update-proxy-image.json", "container agentvm-proxy"),
        ("pods-status-remove-egress.json", "agentvm.dev/egress"),
    ] {
        let r = one(name);
        for mode in [Mode::Mutate, Mode::Validate] {
            let out = reviewer().review(mode, &r.request);
            assert!(!out.response.allowed, "{name}");
            assert!(
                out.response.message.contains(word),
                "{name}: {}",
                out.response.message
            );
        }
    }
}

#[test]
fn the_apparmor_annotation_cannot_unconfine_an_agent() {
    let r = one("apparmor-annotation.yaml");
    assert!(!r.response.allowed);
    assert!(
        r.response.message.contains("AppArmor profile unconfined"),
        "{}",
        r.response.message
    );
}

#[test]
fn a_duplicate_proxy_url_cannot_win() {
    let r = one("dup-env.yaml");
    let patched = r.patched.unwrap();
    let env = patched["spec"]["containers"][0]["env"].as_array().unwrap();
    let urls: Vec<&Value> = env
        .iter()
        .filter(|e| e["name"] == "AGENTVM_PROXY_URL")
        .collect();
    assert_eq!(urls.len(), 1, "{env:?}");
    assert_eq!(urls[0]["value"], "http://127.0.0.1:7411/mcp");
}

#[test]
fn a_selector_on_an_agentvm_label_is_denied_clearly() {
    let r = one("selector-clash.yaml");
    assert!(!r.response.allowed);
    assert!(
        r.response
            .message
            .contains("would no longer match the template"),
        "{}",
        r.response.message
    );
}

#[test]
fn yaml_merge_keys_and_lists_are_reviewed_as_kubectl_sends_them() {
    let merged = one("yaml-merge-key.yaml");
    assert!(
        !merged.response.allowed,
        "the merged hostNetwork must be seen"
    );
    let listed = one("list-hides-agent.yaml");
    assert_eq!(listed.source, "list-hides-agent.yaml#0.0");
    assert!(
        !listed.response.allowed,
        "an agent inside a List must be reviewed"
    );
    let err = offline::parse_documents("empty.yaml", "---\n# nothing\n").unwrap_err();
    assert!(err.to_string().contains("no document"), "{err}");
}
