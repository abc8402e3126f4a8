//! A stand-in for the Kubernetes API server, as far as the dispatcher uses it: Jobs create (with
//! `generateName`), get, list by label, delete (with a propagation policy) and watch (a chunked
//! stream of JSON events); Secrets create; pods listed and watched by label, and their logs. The
//! Job controller, the garbage collector and the kubelet are in [`kubelet`]: a created Job gets a
//! pod whose containers run as processes of this machine.
#![allow(dead_code)]

mod kubelet;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use serde_json::{json, Value};
use tokio::sync::broadcast;

/// How the stand-in answers every request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// As the API server does.
    Normal,
    /// 500 with a `Status` body.
    Refuse,
    /// Never answers.
    Hang,
    /// Creates Jobs (which then never run) but never answers the create.
    HangCreate,
}

#[derive(Default)]
pub struct Store {
    pub rv: u64,
    pub jobs: BTreeMap<String, Value>,
    pub pods: BTreeMap<String, Value>,
    pub secrets: BTreeMap<String, Value>,
    /// The log file of each pod's `exec` container.
    pub logs: HashMap<String, PathBuf>,
    /// Every Job as the client sent it.
    pub created: Vec<Value>,
    /// Every Secret as the client sent it.
    pub created_secrets: Vec<Value>,
    /// Every delete: the name and the DeleteOptions body.
    pub deleted: Vec<(String, Value)>,
    /// Query strings of every watch of Jobs.
    pub watches: Vec<HashMap<String, String>>,
    /// Requests to paths the stand-in does not serve.
    pub unexpected: Vec<String>,
}

#[derive(Clone)]
pub struct StandIn {
    pub store: Arc<Mutex<Store>>,
    mode: Arc<Mutex<Mode>>,
    events: broadcast::Sender<Value>,
    /// Each watch is closed after this long (the API server's own watch timeout).
    pub watch_lifetime: Arc<Mutex<Option<Duration>>>,
    pub step: Duration,
    serial: Arc<Mutex<u64>>,
    /// The Job controller is down: new Jobs get no pod and no status.
    controller_down: Arc<AtomicBool>,
    /// The client may not create Secrets (its Role lacks them).
    secrets_forbidden: Arc<AtomicBool>,
    /// Where the kubelet keeps pods' volumes and logs.
    root: Arc<Root>,
}

/// A directory removed when the last clone of the stand-in (its kubelet's included) is gone.
struct Root(PathBuf);

impl Drop for Root {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl std::ops::Deref for Root {
    type Target = PathBuf;

    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

pub const NAMESPACE: &str = "agents";
/// The most data a Secret holds.
const MAX_SECRET_BYTES: usize = 1 << 20;

fn status(code: u16, reason: &str, message: String) -> Response {
    (
        StatusCode::from_u16(code).unwrap(),
        axum::Json(json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "reason": reason, "code": code, "message": message})),
    )
        .into_response()
}

fn selected(object: &Value, selector: Option<&String>) -> bool {
    selector.is_none_or(|s| {
        s.split(',').filter(|t| !t.is_empty()).all(|term| {
            let (k, v) = term.split_once('=').unwrap();
            object["metadata"]["labels"][k] == v
        })
    })
}

impl StandIn {
    pub fn new() -> Self {
        let serial = {
            static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            N.fetch_add(1, Ordering::Relaxed)
        };
        let root =
            std::env::temp_dir().join(format!("agentvm-stand-in-{}-{serial}", std::process::id()));
        Self {
            store: Arc::default(),
            mode: Arc::new(Mutex::new(Mode::Normal)),
            events: broadcast::channel(1024).0,
            watch_lifetime: Arc::default(),
            step: Duration::from_millis(50),
            serial: Arc::default(),
            controller_down: Arc::default(),
            secrets_forbidden: Arc::default(),
            root: Arc::new(Root(root)),
        }
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    /// Stops the Job controller: Jobs created from now on are never run or reported on.
    pub fn stop_controller(&self) {
        self.controller_down.store(true, Ordering::Relaxed);
    }

    /// Answers Secret creates with 403, as for a Role without them.
    pub fn forbid_secrets(&self) {
        self.secrets_forbidden.store(true, Ordering::Relaxed);
    }

    /// Serves on a free loopback port.
    pub async fn serve(&self) -> SocketAddr {
        let app = axum::Router::new()
            .route(
                "/apis/batch/v1/namespaces/{ns}/jobs",
                get(list_jobs).post(create_job),
            )
            .route(
                "/apis/batch/v1/namespaces/{ns}/jobs/{name}",
                get(get_job).delete(delete_job),
            )
            .route("/api/v1/namespaces/{ns}/secrets", post(create_secret))
            .route("/api/v1/namespaces/{ns}/pods", get(list_pods))
            .route("/api/v1/namespaces/{ns}/pods/{name}/log", get(pod_log))
            .fallback(|State(s): State<StandIn>, request: Request| async move {
                let line = format!("{} {}", request.method(), request.uri());
                s.store.lock().unwrap().unexpected.push(line.clone());
                status(404, "NotFound", line)
            })
            .layer(axum::middleware::from_fn_with_state(self.clone(), gate))
            .with_state(self.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        addr
    }

    /// Puts a Job in the store as if created earlier (by a previous run of a dispatcher).
    pub fn put_job(&self, name: &str, labels: Value) {
        let mut store = self.store.lock().unwrap();
        store.rv += 1;
        let job = json!({"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels,
                "resourceVersion": store.rv.to_string(), "uid": format!("uid-{name}")},
            "spec": {"template": {"spec": {"containers": [{"name": "exec", "image": "i"}],
                "restartPolicy": "Never"}}},
            "status": {}});
        store.jobs.insert(name.to_owned(), job);
    }

    /// Deletes a Job behind the dispatcher's back, as `kubectl delete job` would (its pods are
    /// orphaned and keep running).
    pub fn remove_job(&self, name: &str) {
        let mut store = self.store.lock().unwrap();
        if let Some(job) = store.jobs.remove(name) {
            let _ = self.events.send(json!({"type": "DELETED", "object": job}));
        }
    }

    pub fn job_names(&self) -> Vec<String> {
        self.store.lock().unwrap().jobs.keys().cloned().collect()
    }

    pub fn secret_names(&self) -> Vec<String> {
        self.store.lock().unwrap().secrets.keys().cloned().collect()
    }

    /// Applies `change` to the Job `name` (if it still exists), bumps its resource version and
    /// tells the watches.
    fn update_job(&self, name: &str, change: impl FnOnce(&mut Value)) {
        let mut store = self.store.lock().unwrap();
        store.rv += 1;
        let rv = store.rv.to_string();
        let Some(job) = store.jobs.get_mut(name) else {
            return;
        };
        change(job);
        job["metadata"]["resourceVersion"] = json!(rv);
        let event = json!({"type": "MODIFIED", "object": job.clone()});
        let _ = self.events.send(event);
    }

    /// Applies `change` to the pod `name` (if it still exists), bumps its resource version and
    /// tells the watches. Whether the pod exists.
    fn update_pod(&self, name: &str, change: impl FnOnce(&mut Value)) -> bool {
        let mut store = self.store.lock().unwrap();
        store.rv += 1;
        let rv = store.rv.to_string();
        let Some(pod) = store.pods.get_mut(name) else {
            return false;
        };
        change(pod);
        pod["metadata"]["resourceVersion"] = json!(rv);
        let event = json!({"type": "MODIFIED", "object": pod.clone()});
        let _ = self.events.send(event);
        true
    }

    /// Adds `pod` for the Job `job`, unless the Job is gone. Whether it was added.
    fn add_pod(&self, job: &str, mut pod: Value) -> bool {
        let mut store = self.store.lock().unwrap();
        if !store.jobs.contains_key(job) {
            return false;
        }
        store.rv += 1;
        pod["metadata"]["resourceVersion"] = json!(store.rv.to_string());
        let name = pod["metadata"]["name"].as_str().unwrap().to_owned();
        store.pods.insert(name, pod.clone());
        let _ = self.events.send(json!({"type": "ADDED", "object": pod}));
        true
    }

    fn pod_exists(&self, name: &str) -> bool {
        self.store.lock().unwrap().pods.contains_key(name)
    }

    /// Deletes the pods of the Job `job` (as the Job controller does past a deadline, and the
    /// garbage collector after a background deletion).
    fn delete_pods_of(&self, job: &str) {
        let mut store = self.store.lock().unwrap();
        let names: Vec<String> = store
            .pods
            .iter()
            .filter(|(_, p)| p["metadata"]["labels"]["job-name"] == job)
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            if let Some(pod) = store.pods.remove(&name) {
                store.logs.remove(&name);
                let _ = self.events.send(json!({"type": "DELETED", "object": pod}));
            }
        }
    }
}

async fn gate(State(s): State<StandIn>, request: Request, next: Next) -> Response {
    let mode = *s.mode.lock().unwrap();
    match mode {
        Mode::Normal | Mode::HangCreate => next.run(request).await,
        Mode::Refuse => status(500, "InternalError", "etcdserver: request timed out".into()),
        Mode::Hang => std::future::pending().await,
    }
}

async fn create_job(
    State(s): State<StandIn>,
    Path(ns): Path<String>,
    axum::Json(mut job): axum::Json<Value>,
) -> Response {
    let name = {
        let mut serial = s.serial.lock().unwrap();
        *serial += 1;
        match job["metadata"]["generateName"].as_str() {
            Some(prefix) => format!("{prefix}{:05x}", *serial),
            None => job["metadata"]["name"].as_str().unwrap().to_owned(),
        }
    };
    {
        let mut store = s.store.lock().unwrap();
        store.created.push(job.clone());
        store.rv += 1;
        job["metadata"]["name"] = json!(name);
        job["metadata"]["namespace"] = json!(ns);
        job["metadata"]["uid"] = json!(format!("uid-{name}"));
        job["metadata"]["resourceVersion"] = json!(store.rv.to_string());
        // What the Job controller adds to the pod template.
        let labels = &mut job["spec"]["template"]["metadata"]["labels"];
        labels["job-name"] = json!(name);
        labels["batch.kubernetes.io/job-name"] = json!(name);
        job["status"] = json!({});
        store.jobs.insert(name.clone(), job.clone());
    }
    if *s.mode.lock().unwrap() == Mode::HangCreate {
        return std::future::pending().await;
    }
    tokio::spawn(s.clone().control(name, job.clone()));
    (StatusCode::CREATED, axum::Json(job)).into_response()
}

async fn create_secret(
    State(s): State<StandIn>,
    Path(ns): Path<String>,
    axum::Json(mut secret): axum::Json<Value>,
) -> Response {
    if s.secrets_forbidden.load(Ordering::Relaxed) {
        return status(
            403,
            "Forbidden",
            format!(
                "secrets is forbidden: User \"system:serviceaccount:{ns}:agentvm-dispatcher\" \
                 cannot create resource \"secrets\" in API group \"\" in the namespace \"{ns}\""
            ),
        );
    }
    let name = secret["metadata"]["name"].as_str().unwrap().to_owned();
    let size: usize = secret["data"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(_, v)| {
            base64::engine::general_purpose::STANDARD
                .decode(v.as_str().unwrap())
                .unwrap()
                .len()
        })
        .sum();
    let mut store = s.store.lock().unwrap();
    store.created_secrets.push(secret.clone());
    if size > MAX_SECRET_BYTES {
        return status(
            422,
            "Invalid",
            format!(
                "Secret \"{name}\" is invalid: data: Too long: must have at most \
                 {MAX_SECRET_BYTES} bytes"
            ),
        );
    }
    if store.secrets.contains_key(&name) {
        return status(
            409,
            "AlreadyExists",
            format!("secrets \"{name}\" already exists"),
        );
    }
    store.rv += 1;
    secret["metadata"]["namespace"] = json!(ns);
    secret["metadata"]["uid"] = json!(format!("uid-{name}"));
    secret["metadata"]["resourceVersion"] = json!(store.rv.to_string());
    store.secrets.insert(name, secret.clone());
    (StatusCode::CREATED, axum::Json(secret)).into_response()
}

async fn get_job(State(s): State<StandIn>, Path((_, name)): Path<(String, String)>) -> Response {
    match s.store.lock().unwrap().jobs.get(&name) {
        Some(j) => axum::Json(j.clone()).into_response(),
        None => status(404, "NotFound", format!("jobs.batch \"{name}\" not found")),
    }
}

async fn delete_job(
    State(s): State<StandIn>,
    Path((_, name)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let options: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let job = {
        let mut store = s.store.lock().unwrap();
        store.deleted.push((name.clone(), options.clone()));
        let Some(job) = store.jobs.remove(&name) else {
            return status(404, "NotFound", format!("jobs.batch \"{name}\" not found"));
        };
        job
    };
    if options["propagationPolicy"] == "Background" {
        // The garbage collector deletes what the Job owns soon after; at once here.
        s.delete_pods_of(&name);
        let uid = job["metadata"]["uid"].clone();
        s.store.lock().unwrap().secrets.retain(|_, secret| {
            !secret["metadata"]["ownerReferences"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|owner| owner["uid"] == uid)
        });
    }
    let _ = s
        .events
        .send(json!({"type": "DELETED", "object": job.clone()}));
    axum::Json(job).into_response()
}

async fn list_jobs(
    State(s): State<StandIn>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if query.get("watch").map(String::as_str) == Some("true") {
        return watch(s, query, "Job");
    }
    let store = s.store.lock().unwrap();
    let items: Vec<Value> = store
        .jobs
        .values()
        .filter(|j| selected(j, query.get("labelSelector")))
        .cloned()
        .collect();
    axum::Json(json!({"apiVersion": "batch/v1", "kind": "JobList",
        "metadata": {"resourceVersion": store.rv.to_string()}, "items": items}))
    .into_response()
}

/// `?watch=true`: events of the objects of `kind` that match `fieldSelector=metadata.name=NAME`
/// and `labelSelector`, newer than `resourceVersion`, one JSON document per line, until
/// `timeoutSeconds`.
fn watch(s: StandIn, query: HashMap<String, String>, kind: &'static str) -> Response {
    let name = query
        .get("fieldSelector")
        .and_then(|f| f.strip_prefix("metadata.name="))
        .map(str::to_owned);
    let labels = query.get("labelSelector").cloned();
    let since: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let timeout: u64 = query["timeoutSeconds"].parse().unwrap();
    let lifetime = s
        .watch_lifetime
        .lock()
        .unwrap()
        .unwrap_or(Duration::from_secs(timeout));
    let receiver = s.events.subscribe();
    let matches = move |object: &Value| {
        object["kind"] == kind
            && name
                .as_ref()
                .is_none_or(|n| object["metadata"]["name"] == n.as_str())
            && selected(object, labels.as_ref())
    };
    let initial: Vec<Value> = {
        let mut store = s.store.lock().unwrap();
        if kind == "Job" {
            store.watches.push(query.clone());
        }
        let objects = if kind == "Job" {
            &store.jobs
        } else {
            &store.pods
        };
        objects
            .values()
            .filter(|o| matches(o))
            .filter(|o| {
                o["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap()
                    .parse::<u64>()
                    .unwrap()
                    > since
            })
            .map(|o| json!({"type": "MODIFIED", "object": o}))
            .collect()
    };
    let end = tokio::time::Instant::now() + lifetime;
    let stream = futures_util::stream::unfold(
        (initial.into_iter(), receiver),
        move |(mut initial, mut receiver)| {
            let matches = matches.clone();
            async move {
                if let Some(event) = initial.next() {
                    return Some((line(&event), (initial, receiver)));
                }
                loop {
                    match tokio::time::timeout_at(end, receiver.recv()).await {
                        Ok(Ok(event)) if matches(&event["object"]) => {
                            return Some((line(&event), (initial, receiver)))
                        }
                        Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => continue,
                        Ok(Err(_)) | Err(_) => return None,
                    }
                }
            }
        },
    );
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap()
}

fn line(event: &Value) -> Result<Bytes, std::convert::Infallible> {
    Ok(Bytes::from(format!("{event}\n")))
}

async fn list_pods(
    State(s): State<StandIn>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if query.get("watch").map(String::as_str) == Some("true") {
        return watch(s, query, "Pod");
    }
    let store = s.store.lock().unwrap();
    let items: Vec<Value> = store
        .pods
        .values()
        .filter(|p| selected(p, query.get("labelSelector")))
        .cloned()
        .collect();
    axum::Json(json!({"apiVersion": "v1", "kind": "PodList",
        "metadata": {"resourceVersion": store.rv.to_string()}, "items": items}))
    .into_response()
}

/// The log of the `exec` container: its standard output and standard error, merged as the
/// kubelet keeps them.
async fn pod_log(
    State(s): State<StandIn>,
    Path((_, name)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let file = {
        let store = s.store.lock().unwrap();
        if !store.pods.contains_key(&name) {
            return status(404, "NotFound", format!("pods \"{name}\" not found"));
        }
        store.logs.get(&name).cloned()
    };
    assert_eq!(query.get("container").map(String::as_str), Some("exec"));
    let Some(file) = file else {
        return status(
            400,
            "BadRequest",
            format!("container \"exec\" in pod \"{name}\" is waiting to start: PodInitializing"),
        );
    };
    let mut log = std::fs::read(file).unwrap_or_default();
    if let Some(limit) = query.get("limitBytes") {
        log.truncate(limit.parse().unwrap());
    }
    ([("content-type", "text/plain")], log).into_response()
}
