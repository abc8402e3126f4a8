//! End to end over real HTTPS on loopback: `agentvm serve` as started by the binary's own code
//! path, a TLS client that trusts a certificate made for the test, AdmissionReviews as the API
//! server sends them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use agentvm_webhook::server::{self, ServeConfig};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::ServerName;
use serde_json::{json, Value};
use support::*;
use tokio::net::TcpStream;

struct Harness {
    running: server::Running,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    tls: tokio_rustls::TlsConnector,
    dir: PathBuf,
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("agentvm-e2e-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn start(tag: &str, policies: Option<PathBuf>, max_body: usize) -> Harness {
    start_with(tag, policies, max_body, server::ClusterAccess::Off).await
}

async fn start_with(
    tag: &str,
    policies: Option<PathBuf>,
    max_body: usize,
    cluster: server::ClusterAccess,
) -> Harness {
    agentvm_common::tls::install_default_provider();
    let dir = temp_dir(tag);
    let ck =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    std::fs::write(dir.join("tls.crt"), ck.cert.pem()).unwrap();
    std::fs::write(dir.join("tls.key"), ck.signing_key.serialize_pem()).unwrap();
    let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let config = ServeConfig {
        listen: loopback,
        probe_listen: loopback,
        tls_cert: dir.join("tls.crt"),
        tls_key: dir.join("tls.key"),
        policies,
        reload_interval: Duration::from_millis(100),
        grace_period: Duration::from_secs(5),
        max_body_bytes: max_body,
        access_log: false,
        cluster,
        certificates: None,
    };
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let running = server::start(config, async move {
        let _ = rx.await;
    })
    .await
    .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ck.cert.der().clone()).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(agentvm_common::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(client));
    Harness {
        running,
        stop: Some(tx),
        tls,
        dir,
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

impl Harness {
    async fn connect(&self) -> Sender {
        let tcp = TcpStream::connect(self.running.addr).await.unwrap();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let tls = self.tls.connect(name, tcp).await.unwrap();
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        sender
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), &mut self.running.task)
            .await
            .unwrap()
            .unwrap();
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    async fn probe(&self, path: &str) -> (u16, String) {
        let tcp = TcpStream::connect(self.running.probe_addr).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = hyper::Request::get(path)
            .header("host", "probe")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let res = sender.send_request(req).await.unwrap();
        let status = res.status().as_u16();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }
}

async fn post(sender: &mut Sender, path: &str, body: Vec<u8>) -> (u16, Value) {
    sender.ready().await.unwrap();
    let req = hyper::Request::post(path)
        .header("host", "agentvm")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let res = sender.send_request(req).await.unwrap();
    let status = res.status().as_u16();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn capture(name: &str) -> Value {
    let path = repo_tests().join("fixtures/captures").join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reviews_over_https_with_keep_alive() {
    let h = start("reviews", None, server::DEFAULT_MAX_BODY_BYTES).await;
    let mut s = h.connect().await;
    let review = capture("pod-create-agent-minimal.mutate.json");
    // The API server adds a timeout query; routing is on the path.
    let (status, body) = post(
        &mut s,
        "/mutate?timeout=10s",
        review.to_string().into_bytes(),
    )
    .await;
    assert_eq!(status, 200);
    let response = &body["response"];
    assert_eq!(body["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(body["kind"], "AdmissionReview");
    assert!(body.get("request").is_none(), "the request is not echoed");
    assert_eq!(response["uid"], review["request"]["uid"]);
    assert_eq!(response["allowed"], true);
    assert_eq!(response["patchType"], "JSONPatch");
    assert!(response["patch"].is_string(), "patch is a base64 string");

    // Same connection: the raw object fails validation, naming what is missing.
    let (status, body) = post(&mut s, "/validate", review.to_string().into_bytes()).await;
    assert_eq!(status, 200);
    assert_eq!(body["response"]["allowed"], false);
    let message = body["response"]["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("automountServiceAccountToken"),
        "{message}"
    );
    assert_eq!(body["response"]["status"]["code"], 403);

    let (status, metrics) = h.probe("/metrics").await;
    assert_eq!(status, 200);
    assert!(metrics.contains("agentvm_admission_requests_total{endpoint=\"mutate\",operation=\"CREATE\",kind=\"Pod\",decision=\"patched\"} 1"), "{metrics}");
    assert!(
        metrics.contains("agentvm_admission_duration_seconds_bucket"),
        "{metrics}"
    );
    assert_eq!(h.probe("/readyz").await.0, 200);
    assert_eq!(h.probe("/livez").await.0, 200);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_json_reason_and_the_server_keeps_serving() {
    let h = start("bad", None, 64 * 1024).await;
    let mut s = h.connect().await;
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"not json".to_vec(), 400, "not JSON"),
        (b"[]".to_vec(), 400, "not a JSON object"),
        (json!({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview"}).to_string().into_bytes(), 400, "apiVersion"),
        (json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).to_string().into_bytes(), 400, "request"),
        (json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"kind": {"kind": "Pod"}, "operation": "CREATE"}}).to_string().into_bytes(), 400, "uid"),
    ];
    for (body, code, word) in cases {
        let (status, reply) = post(&mut s, "/mutate", body).await;
        assert_eq!(status, code, "{reply}");
        assert!(reply["error"].as_str().unwrap().contains(word), "{reply}");
    }
    let review = capture("pod-create-agent-minimal.mutate.json");
    let (status, body) = post(&mut s, "/mutate", review.to_string().into_bytes()).await;
    assert_eq!(
        (status, body["response"]["allowed"].clone()),
        (200, json!(true))
    );
    let (_, metrics) = h.probe("/metrics").await;
    assert!(metrics.contains("decision=\"bad_request\"} 5"), "{metrics}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_errors_fail_closed_and_reloads_keep_the_last_good_set() {
    let dir = temp_dir("policies");
    for src in agentvm_webhook::policies::shipped_sources() {
        let path = dir.join(&src.path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, src.text).unwrap();
    }
    // A rule that fails at evaluation time for agents: conflicting values of a complete rule.
    std::fs::write(
        dir.join("broken_eval.rego"),
        "package agentvm\n\nteam := \"a\" if input.action == \"admit\"\n\nteam := \"b\" if input.action == \"admit\"\n\ndeny contains msg if {\n\tteam == \"nobody\"\n\tmsg := \"unreachable\"\n}\n",
    )
    .unwrap();
    let h = start(
        "failclosed",
        Some(dir.clone()),
        server::DEFAULT_MAX_BODY_BYTES,
    )
    .await;
    let mut s = h.connect().await;
    let review = capture("pod-create-agent-minimal.mutate.json");
    let (status, body) = post(&mut s, "/mutate", review.to_string().into_bytes()).await;
    assert_eq!(status, 200);
    assert_eq!(body["response"]["allowed"], false, "{body}");
    assert_eq!(body["response"]["status"]["code"], 500);
    assert!(
        body["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("fail closed"),
        "{body}"
    );

    // Fix the policy: the reload takes it. Then break the syntax: the fixed set stays.
    std::fs::remove_file(dir.join("broken_eval.rego")).unwrap();
    let mut allowed = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (_, body) = post(&mut s, "/mutate", review.to_string().into_bytes()).await;
        if body["response"]["allowed"] == true {
            allowed = true;
            break;
        }
    }
    assert!(allowed, "the fixed policy set was not reloaded");
    std::fs::write(
        dir.join("broken_syntax.rego"),
        "package agentvm\n\ndeny contains msg if {\n",
    )
    .unwrap();
    let mut rejected = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if h.probe("/metrics")
            .await
            .1
            .contains("agentvm_policy_current 0")
        {
            rejected = true;
            break;
        }
    }
    assert!(rejected, "the broken update was not reported");
    let (_, body) = post(&mut s, "/mutate", review.to_string().into_bytes()).await;
    assert_eq!(
        body["response"]["allowed"], true,
        "the last good set stays in force"
    );
    assert_eq!(h.probe("/readyz").await.0, 200, "readiness stays up");
    h.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_reviews_in_flight_finish() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = start("drain", None, server::DEFAULT_MAX_BODY_BYTES).await;
    let body = capture("deployment-create-agent-client-side-apply.mutate.json").to_string();
    let (first, rest) = body.as_bytes().split_at(body.len() / 2);
    // A review whose body is only half sent when SIGTERM arrives.
    let tcp = TcpStream::connect(h.running.addr).await.unwrap();
    let mut tls = h
        .tls
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .unwrap();
    let head = format!(
        "POST /mutate HTTP/1.1\r\nhost: agentvm\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.write_all(first).await.unwrap();
    tls.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let state = h.running.state.clone();
    let stopping = tokio::spawn(h.stop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !state.ready.load(std::sync::atomic::Ordering::Relaxed),
        "not ready while draining"
    );
    tls.write_all(rest).await.unwrap();
    tls.flush().await.unwrap();
    let mut reply = Vec::new();
    let _ = tls.read_to_end(&mut reply).await;
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains("\"allowed\":true"), "{reply}");
    stopping.await.unwrap();
}

/// A stand-in for the API server's pod GET: the pods it knows by name, `404` with a `Status`
/// body for the others, as the real one answers.
async fn stand_in_api_server(pods: Vec<Value>) -> SocketAddr {
    use axum::extract::Path;
    use axum::http::StatusCode;
    let app = axum::Router::new().route(
        "/api/v1/namespaces/{ns}/pods/{name}",
        axum::routing::get(move |Path((ns, name)): Path<(String, String)>| {
            let found = pods
                .iter()
                .find(|p| {
                    p["metadata"]["name"] == name.as_str()
                        && p["metadata"]["namespace"] == ns.as_str()
                })
                .cloned();
            async move {
                match found {
                    Some(p) => (StatusCode::OK, axum::Json(p)),
                    None => (
                        StatusCode::NOT_FOUND,
                        axum::Json(json!({"kind": "Status", "apiVersion": "v1",
                        "status": "Failure", "reason": "NotFound", "code": 404,
                        "message": format!("pods \"{name}\" not found")})),
                    ),
                }
            }
        }),
    );
    serve_on_loopback(app).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_reviews_look_their_pod_up() {
    let review = capture("pod-connect-exec.call1.mutate.json");
    let (ns, name) = (
        review["request"]["namespace"].clone(),
        review["request"]["name"].clone(),
    );
    let agent = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns,
        "labels": {"agentvm.dev/agent": "true"}}, "spec": {"containers": [{"name": "a", "image": "i"}]}});
    let plain = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "plain", "namespace": ns},
        "spec": {"containers": [{"name": "a", "image": "i"}]}});
    let api = stand_in_api_server(vec![agent, plain]).await;
    let config = kube::Config::new(format!("http://{api}").parse().unwrap());
    let cluster = agentvm_webhook::cluster::Cluster::from_config(config).unwrap();
    let h = start_with(
        "connect",
        None,
        server::DEFAULT_MAX_BODY_BYTES,
        server::ClusterAccess::Given(cluster),
    )
    .await;
    let mut s = h.connect().await;

    let (_, body) = post(&mut s, "/validate", review.to_string().into_bytes()).await;
    assert_eq!(
        body["response"]["allowed"], false,
        "exec into an agent pod: {body}"
    );
    assert!(body["response"]["status"]["message"]
        .as_str()
        .unwrap()
        .contains("into agent pod"));

    let mut other = review.clone();
    other["request"]["name"] = json!("plain");
    let (_, body) = post(&mut s, "/validate", other.to_string().into_bytes()).await;
    assert_eq!(body["response"]["allowed"], true);
    assert!(
        body["response"].get("warnings").is_none(),
        "a known non-agent needs no warning"
    );

    other["request"]["name"] = json!("gone");
    let (_, body) = post(&mut s, "/validate", other.to_string().into_bytes()).await;
    assert_eq!(
        body["response"]["allowed"], true,
        "the API server answers 404 itself"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_declared_body_is_refused_before_it_is_sent() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = start("declared", None, server::DEFAULT_MAX_BODY_BYTES).await;
    let tcp = TcpStream::connect(h.running.addr).await.unwrap();
    let mut tls = h
        .tls
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .unwrap();
    let head = "POST /mutate HTTP/1.1\r\nhost: agentvm\r\ncontent-type: application/json\r\ncontent-length: 100000000\r\n\r\n";
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.flush().await.unwrap();
    let mut reply = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut reply))
        .await
        .unwrap()
        .unwrap();
    let reply = String::from_utf8_lossy(&reply[..n]);
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    h.stop().await;
}

/// A stand-in for the API server's NetworkPolicy and Namespace endpoints: a store that answers
/// GET (404 with a Status when absent), POST (201) and PUT (200), and refuses every write in
/// namespace `locked` (403), as RBAC would.
#[derive(Clone, Default)]
struct PolicyStore(std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Value>>>);

async fn stand_in_network_api(store: PolicyStore) -> SocketAddr {
    use axum::extract::{Path, State};
    use axum::http::StatusCode;
    use axum::routing::get;
    fn status(code: u16, reason: &str, message: String) -> (StatusCode, axum::Json<Value>) {
        (
            StatusCode::from_u16(code).unwrap(),
            axum::Json(json!({"kind": "Status", "apiVersion": "v1",
            "status": "Failure", "reason": reason, "code": code, "message": message})),
        )
    }
    let app = axum::Router::new()
        .route("/api/v1/namespaces/{ns}", get(|Path(ns): Path<String>| async move {
            status(404, "NotFound", format!("namespaces \"{ns}\" not found"))
        }))
        .route(
            "/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies/{name}",
            get(|State(s): State<PolicyStore>, Path((ns, name)): Path<(String, String)>| async move {
                match s.0.lock().unwrap().get(&ns) {
                    Some(p) => (StatusCode::OK, axum::Json(p.clone())),
                    None => status(404, "NotFound", format!("networkpolicies \"{name}\" not found")),
                }
            })
            .put(|State(s): State<PolicyStore>, Path((ns, _)): Path<(String, String)>, axum::Json(p): axum::Json<Value>| async move {
                if ns == "locked" {
                    return status(403, "Forbidden", "forbidden".into());
                }
                s.0.lock().unwrap().insert(ns, p.clone());
                (StatusCode::OK, axum::Json(p))
            }),
        )
        .route(
            "/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies",
            axum::routing::post(|State(s): State<PolicyStore>, Path(ns): Path<String>, axum::Json(p): axum::Json<Value>| async move {
                if ns == "locked" {
                    return status(403, "Forbidden", "networkpolicies is forbidden".into());
                }
                s.0.lock().unwrap().insert(ns, p.clone());
                (StatusCode::CREATED, axum::Json(p))
            }),
        )
        .with_state(store);
    serve_on_loopback(app).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_are_admitted_only_where_egress_is_denied() {
    let store = PolicyStore::default();
    let api = stand_in_network_api(store.clone()).await;
    let config = kube::Config::new(format!("http://{api}").parse().unwrap());
    let cluster = agentvm_webhook::cluster::Cluster::from_config(config).unwrap();
    let h = start_with(
        "netpol",
        None,
        server::DEFAULT_MAX_BODY_BYTES,
        server::ClusterAccess::Given(cluster.clone()),
    )
    .await;
    let mut s = h.connect().await;
    let review = capture("pod-create-agent-minimal.mutate.json");
    let ns = review["request"]["namespace"].as_str().unwrap().to_owned();

    let mut dry = review.clone();
    dry["request"]["dryRun"] = json!(true);
    let (_, body) = post(&mut s, "/mutate", dry.to_string().into_bytes()).await;
    assert_eq!(body["response"]["allowed"], true, "{body}");
    assert!(
        store.0.lock().unwrap().is_empty(),
        "a dry run writes nothing"
    );

    let (_, body) = post(&mut s, "/mutate", review.to_string().into_bytes()).await;
    assert_eq!(body["response"]["allowed"], true, "{body}");
    let created = store
        .0
        .lock()
        .unwrap()
        .get(&ns)
        .cloned()
        .expect("NetworkPolicy created");
    assert_eq!(created["metadata"]["name"], "agentvm-deny-egress");
    assert_eq!(
        created["spec"]["podSelector"]["matchLabels"]["agentvm.dev/egress"],
        "deny"
    );
    assert_eq!(created["spec"]["policyTypes"], json!(["Egress"]));

    // Deleted behind agentvm's back: the next admission checks again and puts it back.
    store.0.lock().unwrap().remove(&ns);
    let (_, body) = post(&mut s, "/mutate", review.to_string().into_bytes()).await;
    assert_eq!(body["response"]["allowed"], true, "{body}");
    assert!(
        store.0.lock().unwrap().contains_key(&ns),
        "re-created at the next admission"
    );

    let mut locked = review.clone();
    locked["request"]["namespace"] = json!("locked");
    locked["request"]["object"]["metadata"]["namespace"] = json!("locked");
    let (_, body) = post(&mut s, "/mutate", locked.to_string().into_bytes()).await;
    assert_eq!(body["response"]["allowed"], false, "{body}");
    assert_eq!(body["response"]["status"]["code"], 500);
    assert!(body["response"]["status"]["message"]
        .as_str()
        .unwrap()
        .contains("agentvm-deny-egress"));

    // Deleted or loosened behind agentvm's back: the reconciler puts it back.
    let network = h.running.state.network.clone().unwrap();
    let settings = agentvm_webhook::policies::Policies::shipped()
        .unwrap()
        .settings()
        .clone();
    store.0.lock().unwrap().get_mut(&ns).unwrap()["spec"]["egress"] = json!([{}]);
    network.reconcile_once(&settings).await;
    assert_eq!(store.0.lock().unwrap()[&ns]["spec"], created["spec"]);
    store.0.lock().unwrap().remove(&ns);
    network.reconcile_once(&settings).await;
    assert!(
        store.0.lock().unwrap().contains_key(&ns),
        "recreated after deletion"
    );
    h.stop().await;
}

/// Serves a stand-in API server on a free loopback port.
async fn serve_on_loopback(app: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// A stand-in for the Secret and webhook-configuration endpoints, with optimistic concurrency
/// as the API server has it (a replace with a stale resourceVersion gets 409).
#[derive(Clone, Default)]
struct ObjectStore(std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Value>>>);

async fn stand_in_object_api(store: ObjectStore) -> SocketAddr {
    use axum::extract::{Path, State};
    use axum::http::StatusCode;
    use axum::routing::{get, post};
    fn status(code: u16, reason: &str) -> (StatusCode, axum::Json<Value>) {
        (
            StatusCode::from_u16(code).unwrap(),
            axum::Json(json!({"kind": "Status", "apiVersion": "v1",
            "status": "Failure", "reason": reason, "code": code, "message": reason})),
        )
    }
    async fn get_one(
        State(s): State<ObjectStore>,
        Path(key): Path<String>,
    ) -> (StatusCode, axum::Json<Value>) {
        match s.0.lock().unwrap().get(&key) {
            Some(o) => (StatusCode::OK, axum::Json(o.clone())),
            None => status(404, "NotFound"),
        }
    }
    async fn put_one(
        State(s): State<ObjectStore>,
        Path(key): Path<String>,
        axum::Json(mut o): axum::Json<Value>,
    ) -> (StatusCode, axum::Json<Value>) {
        let mut all = s.0.lock().unwrap();
        let current = all
            .get(&key)
            .map(|c| c["metadata"]["resourceVersion"].clone());
        if current.as_ref() != Some(&o["metadata"]["resourceVersion"]) {
            return status(409, "Conflict");
        }
        let next = current
            .and_then(|v| v.as_str().and_then(|v| v.parse::<u64>().ok()))
            .unwrap_or(0)
            + 1;
        o["metadata"]["resourceVersion"] = json!(next.to_string());
        all.insert(key, o.clone());
        (StatusCode::OK, axum::Json(o))
    }
    let app = axum::Router::new()
        .route(
            "/api/v1/namespaces/agentvm-system/secrets/{key}",
            get(|s: State<ObjectStore>, Path(k): Path<String>| {
                get_one(s, Path(format!("secret-{k}")))
            })
            .put(
                |s: State<ObjectStore>, Path(k): Path<String>, b: axum::Json<Value>| {
                    put_one(s, Path(format!("secret-{k}")), b)
                },
            ),
        )
        .route(
            "/api/v1/namespaces/agentvm-system/secrets",
            post(
                |State(s): State<ObjectStore>, axum::Json(mut o): axum::Json<Value>| async move {
                    let key = format!("secret-{}", o["metadata"]["name"].as_str().unwrap());
                    let mut all = s.0.lock().unwrap();
                    if all.contains_key(&key) {
                        return status(409, "AlreadyExists");
                    }
                    o["metadata"]["resourceVersion"] = json!("1");
                    all.insert(key, o.clone());
                    (StatusCode::CREATED, axum::Json(o))
                },
            ),
        )
        .route(
            "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{key}",
            get(|s: State<ObjectStore>, Path(k): Path<String>| {
                get_one(s, Path(format!("mutating-{k}")))
            })
            .put(
                |s: State<ObjectStore>, Path(k): Path<String>, b: axum::Json<Value>| {
                    put_one(s, Path(format!("mutating-{k}")), b)
                },
            ),
        )
        .route(
            "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/{key}",
            get(|s: State<ObjectStore>, Path(k): Path<String>| {
                get_one(s, Path(format!("validating-{k}")))
            })
            .put(
                |s: State<ObjectStore>, Path(k): Path<String>, b: axum::Json<Value>| {
                    put_one(s, Path(format!("validating-{k}")), b)
                },
            ),
        )
        .route(
            "/api/v1/namespaces/{ns}",
            get(|| async { status(404, "NotFound") }),
        )
        .with_state(store);
    serve_on_loopback(app).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_managed_certificates_are_made_published_and_served() {
    use base64::Engine as _;
    agentvm_common::tls::install_default_provider();
    let store = ObjectStore::default();
    let entry = |name: &str| {
        json!({"name": name, "admissionReviewVersions": ["v1"], "sideEffects": "None",
        "clientConfig": {"service": {"name": "agentvm", "namespace": "agentvm-system", "path": "/mutate"}}})
    };
    for (key, kind) in [
        ("mutating-agentvm", "MutatingWebhookConfiguration"),
        ("validating-agentvm", "ValidatingWebhookConfiguration"),
    ] {
        store.0.lock().unwrap().insert(key.into(), json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": kind,
            "metadata": {"name": "agentvm", "resourceVersion": "7"}, "webhooks": [entry("a.agentvm.dev"), entry("b.agentvm.dev")]}));
    }
    let api = stand_in_object_api(store.clone()).await;
    let cluster = agentvm_webhook::cluster::Cluster::from_config(kube::Config::new(
        format!("http://{api}").parse().unwrap(),
    ))
    .unwrap();
    let dir = temp_dir("selfcerts");
    let names = vec!["agentvm.agentvm-system.svc".to_owned()];
    let certs = agentvm_webhook::certs::CertConfig {
        namespace: "agentvm-system".into(),
        secret: "agentvm-tls".into(),
        dns_names: names.clone(),
        webhook_configuration: "agentvm".into(),
        cert_path: dir.join("tls.crt"),
        key_path: dir.join("tls.key"),
    };
    let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let config = ServeConfig {
        listen: loopback,
        probe_listen: loopback,
        tls_cert: certs.cert_path.clone(),
        tls_key: certs.key_path.clone(),
        policies: None,
        reload_interval: Duration::from_millis(100),
        grace_period: Duration::from_secs(5),
        max_body_bytes: server::DEFAULT_MAX_BODY_BYTES,
        access_log: false,
        cluster: server::ClusterAccess::Given(cluster.clone()),
        certificates: Some(certs.clone()),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = server::start(config, async move {
        let _ = stopped.await;
    })
    .await
    .unwrap();

    let (secret, mutating, validating) = {
        let all = store.0.lock().unwrap();
        (
            all["secret-agentvm-tls"].clone(),
            all["mutating-agentvm"].clone(),
            all["validating-agentvm"].clone(),
        )
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    let bundle = b64
        .decode(secret["data"]["ca.crt"].as_str().unwrap())
        .unwrap();
    for config in [&mutating, &validating] {
        for w in config["webhooks"].as_array().unwrap() {
            assert_eq!(
                b64.decode(w["clientConfig"]["caBundle"].as_str().unwrap())
                    .unwrap(),
                bundle,
                "{}",
                w["name"]
            );
        }
    }
    // The API server's view: trust exactly the published bundle, check the service name.
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(&bundle) {
        roots.add(c.unwrap()).unwrap();
    }
    let client = rustls::ClientConfig::builder_with_provider(agentvm_common::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(running.addr).await.unwrap();
    let name = ServerName::try_from(names[0].clone()).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(client))
        .connect(name, tcp)
        .await
        .expect("the served certificate verifies against the bundle");

    // A second round changes nothing; a second replica adopts the same Secret.
    let again = agentvm_webhook::certs::reconcile(
        &cluster.client(),
        &certs,
        time::OffsetDateTime::now_utc(),
    )
    .await
    .unwrap();
    assert_eq!(
        store.0.lock().unwrap()["secret-agentvm-tls"]["metadata"]["resourceVersion"],
        secret["metadata"]["resourceVersion"]
    );
    assert_eq!(again.bundle().as_bytes(), bundle.as_slice());
    let _ = stop.send(());
    running.task.await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
