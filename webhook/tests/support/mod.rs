//! Helpers shared by the integration tests: fixtures from disk, strict patch application, and a
//! reviewer with the shipped policies.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use agentvm_webhook::admission::{Mode, Outcome, Reviewer};
use agentvm_webhook::policies::Policies;
use agentvm_webhook::review::{self, Request};
use base64::Engine as _;
use serde_json::Value;

/// `tests/` at the repository root.
pub fn repo_tests() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests")
}

/// Every `*.json` file of a fixture folder, sorted, with its parsed content.
pub fn json_files(dir: &Path) -> Vec<(String, Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    files
        .into_iter()
        .filter_map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(&p).unwrap();
            serde_json::from_str(&text).ok().map(|v| (name, v))
        })
        .collect()
}

/// A reviewer with the shipped policies and no cluster access.
pub fn reviewer() -> Reviewer {
    Reviewer::fixed(Policies::shipped().expect("shipped policies load"))
}

/// A reviewer with the shipped policies and settings overridden by `settings_yaml` (the keys
/// under `agentvm_settings`, as a data document holds them).
pub fn reviewer_with(settings_yaml: &str) -> Reviewer {
    let mut sources = agentvm_webhook::policies::shipped_sources();
    sources.push(agentvm_common::policy::Source::new(
        "data.yaml",
        format!("agentvm_settings:\n{settings_yaml}"),
    ));
    Reviewer::fixed(Policies::from_sources(sources, "test".into()).expect("settings load"))
}

/// Settings that give every proxy the platform's config, tool policy and credentials.
pub const PLATFORM_PROXY: &str = "  proxy:
    config_map: agentvm-proxy
    policy_config_map: agentvm-tools
    credentials_secret: agentvm-proxy-credentials
";

/// Parses an AdmissionReview value.
pub fn request(review: &Value) -> Request {
    review::from_value(review.clone()).expect("valid AdmissionReview")
}

/// The decoded patch of an outcome, as the API server would decode it.
pub fn decoded_patch(outcome: &Outcome) -> Option<Value> {
    let wire = outcome.response.to_json();
    let b64 = wire
        .get("patch")?
        .as_str()
        .expect("patch is a base64 string");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("standard base64");
    Some(serde_json::from_slice(&bytes).expect("patch is JSON"))
}

/// Applies RFC 6902 operations strictly (a missing parent is an error).
pub fn apply(object: &Value, ops: &Value) -> Value {
    let mut doc = object.clone();
    let patch: json_patch::Patch = serde_json::from_value(ops.clone()).expect("patch operations");
    json_patch::patch(&mut doc, &patch).unwrap_or_else(|e| panic!("patch does not apply: {e}"));
    doc
}

/// The same request with another object and a new uid.
pub fn with_object(req: &Request, object: &Value, uid: &str) -> Request {
    let mut raw = req.raw.clone();
    raw["object"] = object.clone();
    raw["uid"] = Value::from(uid);
    let review = serde_json::json!({
        "apiVersion": review::API_VERSION, "kind": "AdmissionReview", "request": raw});
    request(&review)
}

/// Mutates, applies the patch, and checks the invariants every allowed answer must keep:
/// the patch applies, `/validate` admits the result, and mutating it again changes nothing.
/// Returns the final object (the input when nothing changed) or `None` for a denial.
pub fn mutate_and_check(reviewer: &Reviewer, req: &Request, what: &str) -> Option<Value> {
    let out = reviewer.review(Mode::Mutate, req);
    assert_eq!(out.response.uid, req.uid, "{what}: uid echoed");
    if !out.response.allowed {
        assert!(
            out.response.patch.is_none(),
            "{what}: a denial carries no patch"
        );
        assert!(
            !out.response.message.is_empty(),
            "{what}: a denial says why"
        );
        return None;
    }
    let object = req.object().cloned().unwrap_or(Value::Null);
    let Some(ops) = decoded_patch(&out) else {
        return Some(object);
    };
    let patched = apply(&object, &ops);
    let again = reviewer.review(Mode::Mutate, &with_object(req, &patched, "again"));
    assert!(
        again.response.allowed,
        "{what}: re-review denied: {}",
        again.response.message
    );
    assert!(
        again.response.patch.is_none(),
        "{what}: not idempotent: {:?}",
        again.response.patch
    );
    let validated = reviewer.review(Mode::Validate, &with_object(req, &patched, "closure"));
    assert!(
        validated.response.allowed,
        "{what}: /validate denies /mutate's output: {}",
        validated.response.message
    );
    Some(patched)
}

/// A tool installed by `tests/setup` (or named by an environment variable).
pub fn tool(env: &str, path_in_repo: &str) -> PathBuf {
    if let Ok(p) = std::env::var(env) {
        return PathBuf::from(p);
    }
    let p = repo_tests().join("..").join(path_in_repo);
    assert!(
        p.exists(),
        "{} is missing: run tests/setup first (or set {env})",
        p.display()
    );
    p
}
