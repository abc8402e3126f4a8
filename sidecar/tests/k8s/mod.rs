//! A stand-in for the Kubernetes API server, the Job controller and the kubelet, as far as the
//! dispatcher uses them: Jobs create (with `generateName`), get, list by label, delete (with a
//! propagation policy) and watch (a chunked stream of JSON events); pods listed by label and
//! their logs. A created Job "runs" the way its argv asks:
//!
//! - `echo ARGS...`: writes ARGS and a newline, exits 0;
//! - `fail N`: writes `failing`, exits N;
//! - `yes`: writes 5000 bytes, exits 0;
//! - `missing`: the runtime cannot start it (`StartError`, exit code 128);
//! - `sleep`: runs until `activeDeadlineSeconds`, then the Job fails with `DeadlineExceeded`
//!   and its pod is deleted, as the Job controller does;
//! - `stall`: starts and is never reported on again;
//! - `badimage`: its image cannot be pulled (`ErrImagePull`, then `ImagePullBackOff`) until
//!   the deadline.
//!
//! Each step takes `step` (50 ms by default).
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
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
    pub logs: HashMap<String, Vec<u8>>,
    /// Every Job as the client sent it.
    pub created: Vec<Value>,
    /// Every delete: the name and the DeleteOptions body.
    pub deleted: Vec<(String, Value)>,
    /// Query strings of every watch.
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
}

pub const NAMESPACE: &str = "agents";

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
        Self {
            store: Arc::default(),
            mode: Arc::new(Mutex::new(Mode::Normal)),
            events: broadcast::channel(1024).0,
            watch_lifetime: Arc::default(),
            step: Duration::from_millis(50),
            serial: Arc::default(),
        }
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
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

    /// Deletes a Job behind the dispatcher's back, as `kubectl delete job` would.
    pub fn remove_job(&self, name: &str) {
        let mut store = self.store.lock().unwrap();
        if let Some(job) = store.jobs.remove(name) {
            let _ = self.events.send(json!({"type": "DELETED", "object": job}));
        }
    }

    pub fn job_names(&self) -> Vec<String> {
        self.store.lock().unwrap().jobs.keys().cloned().collect()
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

    fn put_pod(&self, job: &str, pod: &str, container_state: Value, log: Option<Vec<u8>>) {
        let mut store = self.store.lock().unwrap();
        if !store.jobs.contains_key(job) {
            return;
        }
        store.rv += 1;
        let kind = if store.pods.contains_key(pod) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let object = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod, "namespace": NAMESPACE, "resourceVersion": store.rv.to_string(),
                "labels": {"job-name": job, "batch.kubernetes.io/job-name": job}},
            "spec": {"containers": [{"name": "exec", "image": "i"}]},
            "status": {"phase": if container_state.get("terminated").is_some() { "Succeeded" } else { "Running" },
                "containerStatuses": [{"name": "exec", "image": "i", "imageID": "", "ready": false,
                    "restartCount": 0, "state": container_state}]}});
        store.pods.insert(pod.to_owned(), object.clone());
        let _ = self.events.send(json!({"type": kind, "object": object}));
        if let Some(log) = log {
            store.logs.insert(pod.to_owned(), log);
        }
    }

    /// The Job controller and kubelet at work on a new Job.
    async fn run(self, name: String, argv: Vec<String>, deadline: u64) {
        let pod = format!("{name}-p0d");
        tokio::time::sleep(self.step).await;
        self.update_job(&name, |j| {
            j["status"] = json!({"active": 1, "startTime": "2026-12-04T18:00:00Z"});
        });
        self.put_pod(&name, &pod, json!({"running": {}}), None);
        tokio::time::sleep(self.step).await;
        let program = argv.first().map(String::as_str).unwrap_or_default();
        let (code, reason, message, log) = match program {
            "echo" => (
                0,
                "Completed",
                "",
                format!("{}\n", argv[1..].join(" ")).into_bytes(),
            ),
            "yes" => (0, "Completed", "", b"y\n".repeat(2500)),
            "fail" => (argv[1].parse().unwrap(), "Error", "", b"failing\n".to_vec()),
            "missing" => (
                128,
                "StartError",
                "exec: \"missing\": executable file not found in $PATH",
                Vec::new(),
            ),
            "badimage" => {
                let waiting = |reason: &str| {
                    json!({"waiting": {"reason": reason,
                        "message": "Back-off pulling image \"registry.example.com/nope:1\""}})
                };
                self.put_pod(&name, &pod, waiting("ErrImagePull"), None);
                tokio::time::sleep(self.step).await;
                self.put_pod(&name, &pod, waiting("ImagePullBackOff"), None);
                tokio::time::sleep(Duration::from_secs(deadline)).await;
                self.fail(
                    &name,
                    "DeadlineExceeded",
                    "Job was active longer than specified deadline",
                )
                .await;
                return;
            }
            "sleep" => {
                tokio::time::sleep(Duration::from_secs(deadline)).await;
                self.fail(
                    &name,
                    "DeadlineExceeded",
                    "Job was active longer than specified deadline",
                )
                .await;
                return;
            }
            _ => return,
        };
        let terminated =
            json!({"terminated": {"exitCode": code, "reason": reason, "message": message}});
        self.put_pod(&name, &pod, terminated, Some(log));
        if code == 0 {
            self.update_job(&name, |j| {
                j["status"] = json!({"succeeded": 1, "conditions": [
                    {"type": "SuccessCriteriaMet", "status": "True", "reason": "CompletionsReached"},
                    {"type": "Complete", "status": "True", "reason": "CompletionsReached"}]});
            });
        } else {
            self.fail(
                &name,
                "BackoffLimitExceeded",
                "Job has reached the specified backoff limit",
            )
            .await;
        }
    }

    /// A failing Job as the Job controller reports it: `FailureTarget` first, then `Failed`
    /// once its pods are gone or terminated.
    async fn fail(&self, name: &str, reason: &str, message: &str) {
        let target = json!({"type": "FailureTarget", "status": "True", "reason": reason, "message": message});
        self.update_job(name, |j| {
            j["status"] = json!({"failed": 1, "conditions": [target.clone()]});
        });
        tokio::time::sleep(self.step).await;
        if reason == "DeadlineExceeded" {
            let mut store = self.store.lock().unwrap();
            store
                .pods
                .retain(|_, p| p["metadata"]["labels"]["job-name"] != name);
        }
        self.update_job(name, |j| {
            j["status"] = json!({"failed": 1, "conditions": [target,
                {"type": "Failed", "status": "True", "reason": reason, "message": message}]});
        });
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
    let argv: Vec<String> =
        serde_json::from_value(job["spec"]["template"]["spec"]["containers"][0]["command"].clone())
            .unwrap_or_default();
    let deadline = job["spec"]["activeDeadlineSeconds"].as_u64().unwrap_or(600);
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
    tokio::spawn(s.clone().run(name, argv, deadline));
    (StatusCode::CREATED, axum::Json(job)).into_response()
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
    let mut store = s.store.lock().unwrap();
    store.deleted.push((name.clone(), options.clone()));
    let Some(job) = store.jobs.remove(&name) else {
        return status(404, "NotFound", format!("jobs.batch \"{name}\" not found"));
    };
    if options["propagationPolicy"] == "Background" {
        // The garbage collector removes the pods soon after; at once here.
        store
            .pods
            .retain(|_, p| p["metadata"]["labels"]["job-name"] != name.as_str());
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
    let matches = move |job: &Value| {
        name.as_ref()
            .is_none_or(|n| job["metadata"]["name"] == n.as_str())
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
            .filter(|j| matches(j))
            .filter(|j| {
                j["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap()
                    .parse::<u64>()
                    .unwrap()
                    > since
            })
            .map(|j| json!({"type": "MODIFIED", "object": j}))
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

async fn pod_log(
    State(s): State<StandIn>,
    Path((_, name)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let store = s.store.lock().unwrap();
    if !store.pods.contains_key(&name) {
        return status(404, "NotFound", format!("pods \"{name}\" not found"));
    }
    assert_eq!(query.get("container").map(String::as_str), Some("exec"));
    let mut log = store.logs.get(&name).cloned().unwrap_or_default();
    if let Some(limit) = query.get("limitBytes") {
        log.truncate(limit.parse().unwrap());
    }
    ([("content-type", "text/plain")], log).into_response()
}
