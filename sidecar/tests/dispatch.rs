//! The exec dispatcher against a stand-in Kubernetes API (`k8s`): Jobs as specified, answers
//! from the pod's log and exit code, Jobs deleted afterwards and at start-up, the concurrency
//! limit, and API failures answered within their time limit.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod k8s;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentvm_sidecar::dispatch::job::Template;
use agentvm_sidecar::dispatch::jobs::Jobs;
use agentvm_sidecar::dispatch::{app, DispatchConfig, DispatchState};
use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use k8s::{Mode, StandIn, NAMESPACE};
use serde_json::{json, Value};
use tower::ServiceExt;

const DISPATCHER: &str = "agent-7f9c";

fn config() -> DispatchConfig {
    DispatchConfig {
        template: Template {
            image: "registry.example.com/tools:1".into(),
            dispatcher: DISPATCHER.into(),
            workdir: "/workspace".into(),
            base_env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            default_timeout: Duration::from_secs(5),
            max_timeout: Duration::from_secs(60),
            ttl_seconds: 300,
            cpu: None,
            memory: None,
            scratch_size: None,
        },
        wait_slack: Duration::from_secs(2),
        max_output_bytes: 1000,
        max_body_bytes: 4096,
        max_concurrent: 2,
        access_log: false,
    }
}

fn dispatcher(
    api: SocketAddr,
    config: DispatchConfig,
    api_timeout: Duration,
) -> Arc<DispatchState> {
    let kube_config = kube::Config::new(format!("http://{api}").parse().unwrap());
    let client = kube::Client::try_from(kube_config).unwrap();
    Arc::new(DispatchState::new(
        config,
        Jobs::new(client, NAMESPACE, api_timeout),
    ))
}

async fn started(config: DispatchConfig) -> (StandIn, axum::Router) {
    let stand_in = StandIn::new();
    let api = stand_in.serve().await;
    let state = dispatcher(api, config, Duration::from_secs(2));
    (stand_in, app(state))
}

async fn call(app: &axum::Router, body: Value) -> (StatusCode, Option<String>, Value) {
    call_raw(app, body.to_string()).await
}

async fn call_raw(app: &axum::Router, body: String) -> (StatusCode, Option<String>, Value) {
    let request = Request::post("/v1/exec")
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let retry = response
        .headers()
        .get(header::RETRY_AFTER)
        .map(|v| v.to_str().unwrap().to_owned());
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, retry, serde_json::from_slice(&bytes).unwrap())
}

/// Waits up to 2 s for `check` to hold.
async fn eventually(what: &str, check: impl Fn() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < Duration::from_secs(2), "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn deleted_in_background(stand_in: &StandIn) -> Vec<String> {
    let store = stand_in.store.lock().unwrap();
    store
        .deleted
        .iter()
        .map(|(name, options)| {
            assert_eq!(options["propagationPolicy"], "Background", "{name}");
            name.clone()
        })
        .collect()
}

#[tokio::test]
async fn a_command_runs_as_a_hardened_job_that_is_deleted_afterwards() {
    let (stand_in, app) = started(config()).await;
    let (status, _, answer) = call(
        &app,
        json!({"argv": ["echo", "hello", "world"], "env": {"GREETING": "hi"}, "timeout_ms": 4500}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["exit_code"], 0);
    assert_eq!(answer["stdout"], "hello world\n");
    assert_eq!(
        answer["stderr"], "",
        "Kubernetes merges stderr into the log"
    );
    assert_eq!(answer["stdout_truncated"], false);
    assert_eq!(answer["timed_out"], false);
    assert!(answer.get("signal").is_none());
    assert!(answer["duration_ms"].as_u64().unwrap() >= 100);

    let created = stand_in.store.lock().unwrap().created.clone();
    assert_eq!(created.len(), 1);
    let job = &created[0];
    let labels = json!({"agentvm.dev/role": "exec",
        "agentvm.dev/dispatcher": DISPATCHER, "app.kubernetes.io/managed-by": "agentvm-dispatcher"});
    assert_eq!(job["spec"]["template"]["metadata"]["labels"], labels);
    let mut job_labels = job["metadata"]["labels"].clone();
    let request_id = job_labels
        .as_object_mut()
        .unwrap()
        .remove("agentvm.dev/exec-id")
        .unwrap();
    assert_eq!(job_labels, labels);
    assert!(request_id.as_str().unwrap().ends_with("-1"), "{request_id}");
    assert_eq!(job["spec"]["backoffLimit"], 0);
    assert_eq!(job["spec"]["activeDeadlineSeconds"], 5);
    assert_eq!(job["spec"]["ttlSecondsAfterFinished"], 300);
    let pod = &job["spec"]["template"]["spec"];
    assert_eq!(pod["restartPolicy"], "Never");
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_eq!(
        pod["securityContext"],
        json!({"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532,
            "seccompProfile": {"type": "RuntimeDefault"}})
    );
    let container = &pod["containers"][0];
    assert_eq!(container["image"], "registry.example.com/tools:1");
    assert_eq!(container["command"], json!(["echo", "hello", "world"]));
    assert_eq!(
        container["env"],
        json!([{"name": "PATH", "value": "/usr/bin:/bin"}, {"name": "GREETING", "value": "hi"}])
    );
    assert_eq!(
        container["securityContext"],
        json!({"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
            "allowPrivilegeEscalation": false, "privileged": false, "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}})
    );

    let deleted = deleted_in_background(&stand_in);
    assert_eq!(deleted.len(), 1);
    assert!(deleted[0].starts_with("agentvm-exec-"));
    assert!(stand_in.job_names().is_empty());
    assert!(stand_in.store.lock().unwrap().pods.is_empty());
    let store = stand_in.store.lock().unwrap();
    assert_eq!(
        store.watches[0]["fieldSelector"],
        format!("metadata.name={}", deleted[0])
    );
    assert!(store.unexpected.is_empty(), "{:?}", store.unexpected);
}

#[tokio::test]
async fn a_failing_command_answers_its_exit_code_and_output() {
    let (stand_in, app) = started(config()).await;
    let (status, _, answer) = call(&app, json!({"argv": ["fail", "3"]})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["exit_code"], 3);
    assert_eq!(answer["stdout"], "failing\n");
    assert_eq!(answer["timed_out"], false);
    assert_eq!(deleted_in_background(&stand_in).len(), 1);
    assert!(stand_in.job_names().is_empty());
}

#[tokio::test]
async fn output_is_capped_and_flagged() {
    let (_, app) = started(config()).await;
    let (status, _, answer) = call(&app, json!({"argv": ["yes"]})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["stdout"].as_str().unwrap().len(), 1000);
    assert_eq!(answer["stdout_truncated"], true);
    assert_eq!(answer["exit_code"], 0);
}

#[tokio::test]
async fn a_program_that_cannot_start_gets_400_and_its_job_is_deleted() {
    let (stand_in, app) = started(config()).await;
    let (status, _, answer) = call(&app, json!({"argv": ["missing"]})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    let error = answer["error"].as_str().unwrap();
    assert!(error.contains("cannot start \"missing\""), "{error}");
    assert!(error.contains("executable file not found"), "{error}");
    eventually("job deleted", || stand_in.job_names().is_empty()).await;
    assert_eq!(deleted_in_background(&stand_in).len(), 1);
}

#[tokio::test]
async fn a_command_past_its_deadline_answers_timed_out() {
    let (stand_in, app) = started(config()).await;
    let started = Instant::now();
    let (status, _, answer) =
        call(&app, json!({"argv": ["sleep", "60"], "timeout_ms": 1000})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["timed_out"], true);
    assert_eq!(answer["exit_code"], Value::Null);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        stand_in.store.lock().unwrap().created[0]["spec"]["activeDeadlineSeconds"],
        1
    );
    assert_eq!(deleted_in_background(&stand_in).len(), 1);
    assert!(stand_in.job_names().is_empty());
}

#[tokio::test]
async fn an_image_that_cannot_be_pulled_gets_502_before_the_deadline() {
    let (stand_in, app) = started(config()).await;
    let started = Instant::now();
    let (status, _, answer) = call(&app, json!({"argv": ["badimage"], "timeout_ms": 30_000})).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{answer}");
    let error = answer["error"].as_str().unwrap();
    assert!(error.contains("cannot start: ImagePullBackOff"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(2));
    eventually("job deleted", || stand_in.job_names().is_empty()).await;
}

#[tokio::test]
async fn a_job_never_reported_on_is_given_up_after_the_slack() {
    let config = DispatchConfig {
        wait_slack: Duration::from_millis(300),
        ..config()
    };
    let (stand_in, app) = started(config).await;
    let started = Instant::now();
    let (status, _, answer) = call(&app, json!({"argv": ["stall"], "timeout_ms": 500})).await;
    let took = started.elapsed();
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["timed_out"], true);
    assert_eq!(answer["exit_code"], Value::Null);
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(2),
        "{took:?}"
    );
    assert!(stand_in.job_names().is_empty(), "deleted by the dispatcher");
}

#[tokio::test]
async fn a_watch_that_ends_early_is_resumed() {
    let (stand_in, app) = started(config()).await;
    *stand_in.watch_lifetime.lock().unwrap() = Some(Duration::from_millis(30));
    let (status, _, answer) = call(&app, json!({"argv": ["echo", "late"]})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["stdout"], "late\n");
    let watches = stand_in.store.lock().unwrap().watches.len();
    assert!(watches >= 2, "{watches} watches");
}

#[tokio::test]
async fn a_full_dispatcher_answers_429_with_retry_after() {
    let config = DispatchConfig {
        max_concurrent: 1,
        ..config()
    };
    let (stand_in, app) = started(config).await;
    let busy = {
        let app = app.clone();
        tokio::spawn(
            async move { call(&app, json!({"argv": ["sleep"], "timeout_ms": 1000})).await },
        )
    };
    eventually("first job created", || !stand_in.job_names().is_empty()).await;
    let (status, retry, answer) = call(&app, json!({"argv": ["echo", "x"]})).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{answer}");
    assert_eq!(retry.as_deref(), Some("1"));
    assert_eq!(
        stand_in.store.lock().unwrap().created.len(),
        1,
        "no job for a refused request"
    );
    assert_eq!(busy.await.unwrap().0, StatusCode::OK);
    assert_eq!(
        call(&app, json!({"argv": ["echo", "x"]})).await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn bad_requests_get_400_or_413_and_create_nothing() {
    let (stand_in, app) = started(config()).await;
    for (body, reason) in [
        (
            json!({"argv": ["cat"], "stdin": "x"}),
            "stdin is not supported",
        ),
        (json!({"argv": []}), "argv must name a program"),
        (
            json!({"argv": ["ls"], "cwd": "../etc"}),
            "must not contain ..",
        ),
        (json!({"argv": ["ls"], "timeout_ms": 60_001}), "timeout_ms"),
        (json!({"argv": ["ls"], "shell": true}), "unknown field"),
    ] {
        let (status, _, answer) = call(&app, body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
        let error = answer["error"].as_str().unwrap();
        assert!(error.contains(reason), "{body}: {error}");
    }
    let large = json!({"argv": ["echo", "x".repeat(5000)]}).to_string();
    assert_eq!(call_raw(&app, large).await.0, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(stand_in.store.lock().unwrap().created.is_empty());
}

#[tokio::test]
async fn a_client_that_hangs_up_leaves_no_job() {
    let (stand_in, app) = started(config()).await;
    let request = {
        let app = app.clone();
        tokio::spawn(
            async move { call(&app, json!({"argv": ["sleep"], "timeout_ms": 30_000})).await },
        )
    };
    eventually("job created", || !stand_in.job_names().is_empty()).await;
    request.abort();
    eventually("job deleted", || stand_in.job_names().is_empty()).await;
    assert_eq!(deleted_in_background(&stand_in).len(), 1);
}

#[tokio::test]
async fn a_job_deleted_by_someone_else_answers_502() {
    let (stand_in, app) = started(config()).await;
    let request = {
        let app = app.clone();
        tokio::spawn(
            async move { call(&app, json!({"argv": ["sleep"], "timeout_ms": 30_000})).await },
        )
    };
    eventually("job created", || !stand_in.job_names().is_empty()).await;
    let name = stand_in.job_names()[0].clone();
    stand_in.remove_job(&name);
    let (status, _, answer) = request.await.unwrap();
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{answer}");
    let error = answer["error"].as_str().unwrap();
    assert!(error.contains("was deleted before it finished"), "{error}");
}

#[tokio::test]
async fn orphans_of_this_dispatcher_are_deleted_and_no_others() {
    let stand_in = StandIn::new();
    let api = stand_in.serve().await;
    stand_in.put_job(
        "agentvm-exec-old1",
        json!({"agentvm.dev/dispatcher": DISPATCHER, "agentvm.dev/role": "exec"}),
    );
    stand_in.put_job(
        "agentvm-exec-old2",
        json!({"agentvm.dev/dispatcher": DISPATCHER}),
    );
    stand_in.put_job(
        "agentvm-exec-other",
        json!({"agentvm.dev/dispatcher": "agent-other"}),
    );
    stand_in.put_job("unrelated", json!({"app": "batch"}));
    let state = dispatcher(api, config(), Duration::from_secs(2));
    assert_eq!(state.delete_orphans().await.unwrap(), 2);
    let mut deleted = deleted_in_background(&stand_in);
    deleted.sort();
    assert_eq!(deleted, ["agentvm-exec-old1", "agentvm-exec-old2"]);
    assert_eq!(stand_in.job_names(), ["agentvm-exec-other", "unrelated"]);
}

#[tokio::test]
async fn api_failures_answer_502_or_503_within_the_bound() {
    let stand_in = StandIn::new();
    let api = stand_in.serve().await;
    let bound = Duration::from_millis(500);
    let app = app(dispatcher(api, config(), bound));

    stand_in.set_mode(Mode::Refuse);
    let (status, _, answer) = call(&app, json!({"argv": ["echo", "x"]})).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{answer}");
    let error = answer["error"].as_str().unwrap();
    assert!(
        error.contains("refused to create a job") && error.contains("500"),
        "{error}"
    );

    stand_in.set_mode(Mode::Hang);
    let started = Instant::now();
    let (status, _, answer) = call(&app, json!({"argv": ["echo", "x"]})).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    assert!(answer["error"]
        .as_str()
        .unwrap()
        .contains("did not create a job within 500ms"));
    assert!(started.elapsed() < bound * 2, "{:?}", started.elapsed());
    let state = dispatcher(api, config(), bound);
    let started = Instant::now();
    assert!(state.delete_orphans().await.is_err());
    assert!(started.elapsed() < bound * 2);

    // Created, but the answer never came: the Job is found by its request label and deleted.
    stand_in.set_mode(Mode::HangCreate);
    let started = Instant::now();
    let (status, _, answer) = call(&app, json!({"argv": ["echo", "x"]})).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    assert!(started.elapsed() < bound * 2);

    assert_eq!(stand_in.store.lock().unwrap().created.len(), 1);
    eventually("the unanswered job deleted", || {
        stand_in.job_names().is_empty()
    })
    .await;
    assert_eq!(deleted_in_background(&stand_in).len(), 1);

    // Nothing listens on the port any more.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let app = app_for(closed, bound);
    let started = Instant::now();
    let (status, _, answer) = call(&app, json!({"argv": ["echo", "x"]})).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("unreachable"),
        "{answer}"
    );
    assert!(started.elapsed() < bound * 2);
}

fn app_for(api: SocketAddr, bound: Duration) -> axum::Router {
    app(dispatcher(api, config(), bound))
}

#[tokio::test]
async fn health_endpoints_answer() {
    let (_, app) = started(config()).await;
    for path in ["/v1/health", "/healthz"] {
        let request = Request::get(path).body(Body::empty()).unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }
}

/// The binary as a pod runs it: configured by the downward API's variables, reaching the API
/// through a kubeconfig.
mod binary {
    use super::*;
    use std::process::{Child, Command, Stdio};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const BIN: &str = env!("CARGO_BIN_EXE_agentvm-sidecar");

    struct Server(Child);

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn kubeconfig(api: SocketAddr) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!(
            "agentvm-dispatch-kubeconfig-{}-{}",
            api.port(),
            std::process::id()
        ));
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster:\n    \
             server: http://{api}\ncontexts:\n- name: stand-in\n  context:\n    cluster: \
             stand-in\n    user: tester\ncurrent-context: stand-in\nusers:\n- name: tester\n  \
             user: {{}}\n"
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    fn command(api: SocketAddr, port: u16) -> Command {
        let mut c = Command::new(BIN);
        c.args(["dispatch", "--listen", &format!("127.0.0.1:{port}")])
            .env("KUBECONFIG", kubeconfig(api))
            .env("AGENTVM_POD_NAMESPACE", NAMESPACE)
            .env("AGENTVM_POD_NAME", DISPATCHER)
            .env("AGENTVM_DISPATCH_IMAGE", "registry.example.com/tools:1")
            .env("AGENTVM_GRACE_PERIOD", "1")
            .env("AGENTVM_LOG_LEVEL", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    }

    /// One HTTP/1.1 request with `Connection: close`; the status and the body.
    async fn http(port: u16, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(request.as_bytes()).await.ok()?;
        let mut answer = String::new();
        s.read_to_string(&mut answer).await.ok()?;
        let status = answer.get(9..12)?.parse().ok()?;
        let (_, body) = answer.split_once("\r\n\r\n")?;
        Some((status, body.to_owned()))
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deletes_orphans_serves_and_deletes_jobs_in_flight_on_sigterm() {
        let stand_in = StandIn::new();
        let api = stand_in.serve().await;
        stand_in.put_job(
            "agentvm-exec-old",
            json!({"agentvm.dev/dispatcher": DISPATCHER}),
        );
        let port = free_port();
        let mut server = Server(command(api, port).spawn().unwrap());
        let started = Instant::now();
        while http(port, "GET", "/healthz", "").await.is_none() {
            assert!(started.elapsed() < Duration::from_secs(10), "never served");
            assert!(server.0.try_wait().unwrap().is_none(), "exited");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            stand_in.job_names().is_empty(),
            "orphan deleted before serving"
        );
        assert_eq!(deleted_in_background(&stand_in), ["agentvm-exec-old"]);

        let (status, body) = http(port, "POST", "/v1/exec", r#"{"argv":["echo","hi"]}"#)
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
        let answer: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(answer["stdout"], "hi\n");

        // A command still running when the grace period ends: its Job is deleted on the way out.
        let in_flight = tokio::spawn(async move {
            http(
                port,
                "POST",
                "/v1/exec",
                r#"{"argv":["sleep"],"timeout_ms":60000}"#,
            )
            .await
        });
        eventually("job created", || !stand_in.job_names().is_empty()).await;
        let term = Command::new("kill")
            .args(["-TERM", &server.0.id().to_string()])
            .status()
            .unwrap();
        assert!(term.success());
        let waited = Instant::now();
        let status = loop {
            if let Some(status) = server.0.try_wait().unwrap() {
                break status;
            }
            assert!(waited.elapsed() < Duration::from_secs(5), "did not stop");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(status.success(), "{status:?}");
        assert!(
            stand_in.job_names().is_empty(),
            "job of the cut-off request deleted"
        );
        let _ = in_flight.await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn missing_settings_exit_64() {
        let api: SocketAddr = "127.0.0.1:9".parse().unwrap();
        for unset in [
            "AGENTVM_DISPATCH_IMAGE",
            "AGENTVM_POD_NAMESPACE",
            "AGENTVM_POD_NAME",
        ] {
            let out = command(api, free_port())
                .env_remove(unset)
                .output()
                .unwrap();
            assert_eq!(out.status.code(), Some(64), "{unset}");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(stderr.contains("must be"), "{unset}: {stderr}");
        }
        let out = command(api, free_port())
            .args(["--cpu", "lots"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64));
    }
}
