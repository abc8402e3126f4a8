//! `agentvm audit` and `agentvm adopt` against a stand-in API server: a store of objects that
//! answers list requests (cluster-wide or per namespace, with label selectors) and merge patches
//! the way the API server does, reached through a kubeconfig as kubectl would.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use agentvm_webhook::admission::Mode;
use axum::extract::{Query, State};
use axum::http::{Method, StatusCode, Uri};
use serde_json::{json, Value};
use support::*;

#[derive(Clone, Default)]
struct Store(Arc<Mutex<HashMap<String, Vec<Value>>>>);

fn plural(kind: &str) -> String {
    format!("{}s", kind.to_lowercase())
}

impl Store {
    fn put(&self, object: Value) {
        let key = plural(object["kind"].as_str().unwrap());
        self.0.lock().unwrap().entry(key).or_default().push(object);
    }
}

/// `/api/v1[/namespaces/NS]/PLURAL[/NAME]` or `/apis/GROUP/VERSION[/namespaces/NS]/PLURAL[/NAME]`.
fn parse(path: &str) -> (Option<String>, String, Option<String>) {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let rest = if parts[0] == "api" {
        &parts[2..]
    } else {
        &parts[3..]
    };
    match rest {
        ["namespaces", ns, plural] => (Some(ns.to_string()), plural.to_string(), None),
        ["namespaces", ns, plural, name] => (
            Some(ns.to_string()),
            plural.to_string(),
            Some(name.to_string()),
        ),
        [plural] => (None, plural.to_string(), None),
        [plural, name] => (None, plural.to_string(), Some(name.to_string())),
        _ => panic!("unexpected path {path}"),
    }
}

fn selected(object: &Value, selector: Option<&String>) -> bool {
    let Some(selector) = selector else {
        return true;
    };
    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
        let (k, v) = term.split_once('=').unwrap();
        object["metadata"]["labels"][k] == v
    })
}

async fn handle(
    State(store): State<Store>,
    method: Method,
    uri: Uri,
    Query(query): Query<HashMap<String, String>>,
    body: axum::body::Bytes,
) -> (StatusCode, axum::Json<Value>) {
    let (ns, plural, name) = parse(uri.path());
    let mut all = store.0.lock().unwrap();
    let items = all.entry(plural.clone()).or_default();
    let in_ns = |o: &Value| {
        ns.as_ref()
            .is_none_or(|n| o["metadata"]["namespace"] == n.as_str())
    };
    match (method, name) {
        (Method::GET, None) => {
            let list: Vec<Value> = items
                .iter()
                .filter(|o| in_ns(o) && selected(o, query.get("labelSelector")))
                .map(|o| {
                    // Lists do not repeat apiVersion and kind per item.
                    let mut o = o.clone();
                    o.as_object_mut().unwrap().remove("kind");
                    o
                })
                .collect();
            (
                StatusCode::OK,
                axum::Json(
                    json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": list}),
                ),
            )
        }
        (Method::PATCH, Some(name)) => {
            let object = items
                .iter_mut()
                .find(|o| in_ns(o) && o["metadata"]["name"] == name.as_str())
                .unwrap();
            let patch: Value = serde_json::from_slice(&body).unwrap();
            json_patch::merge(object, &patch);
            (StatusCode::OK, axum::Json(object.clone()))
        }
        (m, n) => panic!("unexpected {m} {plural} {n:?}"),
    }
}

async fn stand_in(store: Store) -> SocketAddr {
    let app = axum::Router::new().fallback(handle).with_state(store);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn deployment(name: &str, ns: &str, agent: bool) -> Value {
    let mut labels = json!({"app": name});
    if agent {
        labels["agentvm.dev/agent"] = json!("true");
    }
    json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"selector": {"matchLabels": {"app": name}}, "template": {
            "metadata": {"labels": labels},
            "spec": {"containers": [{"name": "agent", "image": "registry.example.com/agent:1"}]}}}})
}

fn locked_down(object: Value) -> Value {
    let kind = object["kind"].as_str().unwrap().to_owned();
    let req = agentvm_webhook::offline::to_request(object.clone(), 0).unwrap();
    let out = reviewer().review(Mode::Mutate, &req);
    assert!(out.response.allowed, "{kind}: {}", out.response.message);
    apply(&object, &decoded_patch(&out).unwrap())
}

fn cluster() -> (Store, Vec<Value>) {
    let store = Store::default();
    let namespaces = vec![
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-a"}}),
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "secure", "labels": {"agentvm.dev/enforce": "true"}}}),
    ];
    for n in &namespaces {
        store.put(n.clone());
    }
    store.put(deployment("raw-agent", "team-a", true));
    store.put(locked_down(deployment("good-agent", "team-a", true)));
    store.put(deployment("web", "team-a", false));
    // Labelled on the workload only (README step one without step two).
    let mut half = deployment("half", "team-a", false);
    half["metadata"]["labels"]["agentvm.dev/agent"] = json!("true");
    store.put(half);
    // An excluded namespace is not audited.
    store.put(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "system", "namespace": "kube-system",
        "labels": {"agentvm.dev/agent": "true"}}, "spec": {"containers": [{"name": "a", "image": "i"}]}}));
    let mut rs = locked_down(deployment("good-agent", "team-a", true));
    rs["kind"] = json!("ReplicaSet");
    rs["metadata"]["name"] = json!("good-agent-5d4f");
    rs["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "Deployment", "name": "good-agent", "uid": "1", "controller": true}]);
    store.put(rs);
    // What `kubectl debug --copy-to` leaves: an unlabelled copy, in a namespace that enforces.
    store.put(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "copy", "namespace": "secure"},
        "spec": {"containers": [{"name": "agent", "image": "registry.example.com/agent:1"}]}}));
    (store, namespaces)
}

fn kubeconfig(addr: SocketAddr, tag: &str) -> std::path::PathBuf {
    let path =
        std::env::temp_dir().join(format!("agentvm-kubeconfig-{tag}-{}", std::process::id()));
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster:\n    server: http://{addr}\ncontexts:\n- name: stand-in\n  context:\n    cluster: stand-in\n    user: tester\ncurrent-context: stand-in\nusers:\n- name: tester\n  user: {{}}\n"
    );
    std::fs::write(&path, text).unwrap();
    path
}

async fn agentvm(args: Vec<String>, kubeconfig: std::path::PathBuf) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_agentvm"))
            .args(&args)
            .env("KUBECONFIG", kubeconfig)
            .env("AGENTVM_LOG_LEVEL", "error")
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_lists_agents_and_says_which_miss_their_profile() {
    let (store, _) = cluster();
    let addr = stand_in(store).await;
    let config = kubeconfig(addr, "audit");
    let out = agentvm(
        vec!["audit".into(), "-o".into(), "json".into()],
        config.clone(),
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let findings: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let by_name = |n: &str| {
        findings
            .iter()
            .find(|f| f["name"] == n)
            .unwrap_or_else(|| panic!("{n} missing: {findings:?}"))
    };
    assert_eq!(
        findings.len(),
        4,
        "web is no agent, the ReplicaSet belongs to its Deployment, kube-system is excluded: \
         {findings:?}"
    );
    assert!(by_name("half")["reasons"][0]
        .as_str()
        .unwrap()
        .contains("pod template is not"));
    assert_eq!(by_name("good-agent")["compliant"], true);
    assert_eq!(by_name("good-agent")["profile"], "no-exec");
    let raw = by_name("raw-agent");
    assert_eq!(raw["compliant"], false);
    assert!(raw["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r.as_str().unwrap().contains("automountServiceAccountToken")));
    assert_eq!(
        by_name("copy")["compliant"],
        false,
        "an unlabelled pod in an enforcing namespace is an agent"
    );

    let out = agentvm(
        vec!["audit".into(), "--namespace".into(), "team-a".into()],
        config.clone(),
    )
    .await;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("raw-agent") && !table.contains("copy"),
        "{table}"
    );
    assert!(table.contains("3 agents, 2 not compliant"), "{table}");
    std::fs::remove_file(config).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adopt_labels_and_restarts_and_dry_run_changes_nothing() {
    let (store, _) = cluster();
    let addr = stand_in(store.clone()).await;
    let config = kubeconfig(addr, "adopt");
    let web = |store: &Store| {
        store.0.lock().unwrap()["deployments"]
            .iter()
            .find(|d| d["metadata"]["name"] == "web")
            .unwrap()
            .clone()
    };
    let before = web(&store);

    let out = agentvm(
        vec![
            "adopt".into(),
            "deployment/web".into(),
            "-n".into(),
            "team-a".into(),
            "--dry-run".into(),
        ],
        config.clone(),
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("(dry run)"));
    assert_eq!(web(&store), before, "a dry run changes nothing");

    let out = agentvm(
        vec![
            "adopt".into(),
            "-n".into(),
            "team-a".into(),
            "--selector".into(),
            "app=web".into(),
        ],
        config.clone(),
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = web(&store);
    assert_eq!(after["metadata"]["labels"]["agentvm.dev/agent"], "true");
    assert_eq!(
        after["spec"]["template"]["metadata"]["labels"]["agentvm.dev/agent"],
        "true"
    );
    assert!(after["spec"]["template"]["metadata"]["annotations"]
        ["kubectl.kubernetes.io/restartedAt"]
        .is_string());
    assert_eq!(
        after["spec"]["selector"], before["spec"]["selector"],
        "the selector stays"
    );

    let out = agentvm(vec!["adopt".into(), "pod/copy".into()], config.clone()).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("recreate"));
    for bad in [
        "deployment/web/status",
        "deployment/../x",
        "deploymentsss/web",
    ] {
        let out = agentvm(
            vec!["adopt".into(), bad.into(), "--dry-run".into()],
            config.clone(),
        )
        .await;
        assert_eq!(out.status.code(), Some(2), "{bad}");
    }
    for alias in ["sts/web", "deploy/web", "deployment.apps/web", "cj/web"] {
        let out = agentvm(
            vec!["adopt".into(), alias.into(), "--dry-run".into()],
            config.clone(),
        )
        .await;
        assert!(
            out.status.success(),
            "{alias}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::remove_file(config).unwrap();
}
