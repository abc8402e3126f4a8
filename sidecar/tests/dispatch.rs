//! The exec dispatcher against a stand-in Kubernetes API (`k8s`) whose kubelet runs each Job's
//! containers as processes of this machine: the runner's init container and then the runner
//! with the command. Jobs as specified, answers from the runner's report (standard input fed
//! from a Secret, standard error apart, caps, signals), Jobs deleted afterwards and at start-up,
//! the concurrency limit, and API failures answered within their time limit.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod exec_api;
mod k8s;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentvm_sidecar::dispatch::job::Template;
use agentvm_sidecar::dispatch::jobs::Jobs;
use agentvm_sidecar::dispatch::{app, DispatchConfig, DispatchState};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use exec_api::{call, call_raw};
use k8s::{Mode, StandIn, NAMESPACE};
use serde_json::{json, Value};
use tower::ServiceExt;

const DISPATCHER: &str = "agent-7f9c";
const RUNNER_IMAGE: &str = "registry.example.com/agentvm-sidecar:1";

fn config() -> DispatchConfig {
    DispatchConfig {
        template: Template {
            image: "registry.example.com/tools:1".into(),
            runner_image: RUNNER_IMAGE.into(),
            dispatcher: DISPATCHER.into(),
            workdir: "/workspace".into(),
            base_env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            default_timeout: Duration::from_secs(5),
            max_timeout: Duration::from_secs(60),
            ttl_seconds: 300,
            cpu: None,
            memory: None,
            scratch_size: None,
            max_output_bytes: 1000,
        },
        wait_slack: Duration::from_secs(2),
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
        json!({"argv": ["sh", "-c", "echo hello $GREETING"], "env": {"GREETING": "world"},
            "timeout_ms": 4500}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["exit_code"], 0);
    assert_eq!(answer["stdout"], "hello world\n");
    assert_eq!(answer["stderr"], "");
    assert_eq!(answer["stdout_truncated"], false);
    assert_eq!(answer["timed_out"], false);
    assert!(answer.get("signal").is_none() && answer.get("note").is_none());

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
    let hardened = json!({"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
        "allowPrivilegeEscalation": false, "privileged": false, "readOnlyRootFilesystem": true,
        "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}});
    let init = &pod["initContainers"][0];
    assert_eq!(init["image"], RUNNER_IMAGE);
    assert_eq!(init["securityContext"], hardened);
    let container = &pod["containers"][0];
    assert_eq!(container["image"], "registry.example.com/tools:1");
    assert_eq!(
        container["command"],
        json!([
            "/agentvm/runner/agentvm-sidecar",
            "run",
            "--timeout-ms",
            "4500",
            "--max-output-bytes",
            "1000",
            "--env=GREETING=world",
            "--",
            "sh",
            "-c",
            "echo hello $$GREETING"
        ])
    );
    assert_eq!(
        container["env"],
        json!([{"name": "PATH", "value": "/usr/bin:/bin"}])
    );
    assert_eq!(container["securityContext"], hardened);
    assert!(stand_in.store.lock().unwrap().created_secrets.is_empty());

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
async fn stdin_reaches_the_command_through_a_secret_the_job_owns() {
    let (stand_in, app) = started(config()).await;
    let stdin = "line one\nline two with \u{e9}\n";
    let (status, _, answer) = call(&app, json!({"argv": ["cat"], "stdin": stdin})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["stdout"], stdin);
    assert_eq!(answer["exit_code"], 0);

    let store = stand_in.store.lock().unwrap();
    let job = &store.created[0];
    let secrets = &store.created_secrets;
    assert_eq!(secrets.len(), 1);
    let secret = &secrets[0];
    let name = secret["metadata"]["name"].as_str().unwrap();
    assert!(name.starts_with("agentvm-exec-stdin-"), "{name}");
    let volume = &job["spec"]["template"]["spec"]["volumes"][3];
    assert_eq!(volume["secret"]["secretName"], name);
    let owner = &secret["metadata"]["ownerReferences"][0];
    assert_eq!(
        (owner["kind"].as_str(), owner["apiVersion"].as_str()),
        (Some("Job"), Some("batch/v1"))
    );
    let job_name = &store.deleted[0].0;
    assert_eq!(owner["name"], job_name.as_str());
    assert_eq!(owner["uid"], format!("uid-{job_name}"));
    assert_eq!(secret["immutable"], true);
    assert_eq!(
        secret["metadata"]["labels"]["agentvm.dev/exec-id"],
        job["metadata"]["labels"]["agentvm.dev/exec-id"]
    );
    assert!(store.secrets.is_empty(), "collected with its Job");
}

#[tokio::test]
async fn stderr_comes_back_apart_with_the_exit_code() {
    let (stand_in, app) = started(config()).await;
    let (status, _, answer) = call(
        &app,
        json!({"argv": ["sh", "-c", "echo out; echo err >&2; exit 3"]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["stdout"], "out\n");
    assert_eq!(answer["stderr"], "err\n");
    assert_eq!(answer["exit_code"], 3);
    assert_eq!(answer["timed_out"], false);
    assert_eq!(deleted_in_background(&stand_in).len(), 1);
    assert!(stand_in.job_names().is_empty());
}

#[tokio::test]
async fn output_is_capped_and_flagged_per_stream() {
    let (_, app) = started(config()).await;
    let (status, _, answer) = call(
        &app,
        json!({"argv": ["sh", "-c", "seq 1 2000; seq 1 10 >&2"]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["stdout"].as_str().unwrap().len(), 1000);
    assert_eq!(answer["stdout_truncated"], true);
    assert_eq!(answer["stderr"], "1\n2\n3\n4\n5\n6\n7\n8\n9\n10\n");
    assert_eq!(answer["stderr_truncated"], false);
    let (_, _, answer) = call(&app, json!({"argv": ["sh", "-c", "seq 1 2000 >&2"]})).await;
    assert_eq!(answer["stderr"].as_str().unwrap().len(), 1000);
    assert_eq!(
        (
            answer["stderr_truncated"].clone(),
            answer["stdout_truncated"].clone()
        ),
        (json!(true), json!(false))
    );
    assert_eq!(answer["exit_code"], 0);
}

#[tokio::test]
async fn a_command_killed_by_a_signal_reports_it() {
    let (_, app) = started(config()).await;
    for (signal, name) in [(15, "TERM"), (9, "KILL")] {
        let script = format!("echo before; kill -{name} $$");
        let (status, _, answer) = call(&app, json!({"argv": ["sh", "-c", script]})).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(answer["exit_code"], Value::Null, "{answer}");
        assert_eq!(answer["signal"], signal);
        assert_eq!(answer["stdout"], "before\n");
        assert_eq!(answer["timed_out"], false);
    }
}

/// The dispatcher's environment as the chart's dispatcher has it: `HOME` is defined, so a
/// `$(HOME)` the kubelet got to expand would become the working directory.
fn config_with_home() -> DispatchConfig {
    let mut config = config();
    config.template.base_env = vec![
        ("PATH".into(), "/usr/bin:/bin".into()),
        ("HOME".into(), "/workspace".into()),
    ];
    config
}

#[tokio::test]
async fn dollars_reach_the_command_as_given() {
    let (stand_in, app) = started(config_with_home()).await;
    // The arguments and a variable, echoed back as the shell received them.
    let echo = r#"printf '%s\n' "$0" "$@" "$GREETING""#;
    let words = ["$(HOME)", "$$", "cost=$$5", "$$(PATH)", "x$", "$(NOPE"];
    let mut argv = vec!["sh", "-c", echo];
    argv.extend(words);
    let (status, _, answer) =
        call(&app, json!({"argv": argv, "env": {"GREETING": "$(PATH)"}})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let mut want = words.join("\n");
    want.push_str("\n$(PATH)\n");
    assert_eq!(answer["stdout"], want, "{answer}");

    // The shell itself expands `$$` and runs `$(HOME)` as a command, as it does run directly.
    let script = "echo pid=$$ home=$(HOME) cost=$$5";
    let (status, _, answer) = call(
        &app,
        json!({"argv": ["sh", "-c", script], "env": {"GREETING": "$(PATH)"}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let direct = std::process::Command::new("sh")
        .args(["-c", script])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", "/workspace")
        .env("GREETING", "$(PATH)")
        .output()
        .unwrap();
    // The same but for the shell's pid.
    let as_run = |out: &str| -> String {
        let pid = out
            .strip_prefix("pid=")
            .and_then(|rest| rest.split(' ').next())
            .unwrap_or_default();
        assert!(pid.parse::<u32>().is_ok(), "no pid in {out:?}");
        assert_eq!(out, format!("pid={pid} home= cost={pid}5\n"));
        out.replace(pid, "PID")
    };
    let stdout = answer["stdout"].as_str().unwrap();
    assert_eq!(
        as_run(stdout),
        as_run(&String::from_utf8(direct.stdout).unwrap())
    );
    assert_eq!(answer["stderr"], String::from_utf8(direct.stderr).unwrap());
    assert_eq!(answer["exit_code"], direct.status.code().unwrap());

    // What the Job asked the kubelet for.
    let created = stand_in.store.lock().unwrap().created.clone();
    let command = &created[1]["spec"]["template"]["spec"]["containers"][0]["command"];
    let tail: Vec<&str> = command.as_array().unwrap()[6..]
        .iter()
        .map(|w| w.as_str().unwrap())
        .collect();
    assert_eq!(
        tail,
        [
            "--env=GREETING=$$(PATH)",
            "--",
            "sh",
            "-c",
            "echo pid=$$$$ home=$$(HOME) cost=$$$$5"
        ]
    );
}

#[tokio::test]
async fn a_program_that_cannot_start_gets_400_and_its_job_is_deleted() {
    let (stand_in, app) = started(config()).await;
    let (status, _, answer) = call(&app, json!({"argv": ["no-such-program"]})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    let error = answer["error"].as_str().unwrap();
    assert!(
        error.contains("cannot start \"no-such-program\": No such file"),
        "{error}"
    );
    eventually("job deleted", || stand_in.job_names().is_empty()).await;
    assert_eq!(deleted_in_background(&stand_in).len(), 1);
}

#[tokio::test]
async fn the_runner_stops_a_command_at_its_limit_and_keeps_its_output() {
    let (_, app) = started(config()).await;
    // 1.2 s for the command, 2 s for the Job: the runner's limit comes first.
    let (status, _, answer) = call(
        &app,
        json!({"argv": ["sh", "-c", "echo started; exec sleep 60"], "timeout_ms": 1200}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["timed_out"], true);
    assert_eq!(answer["signal"], 9);
    assert_eq!(answer["stdout"], "started\n");
    assert!(answer.get("note").is_none(), "{answer}");
}

#[tokio::test]
async fn a_command_past_the_jobs_deadline_answers_timed_out() {
    let (stand_in, app) = started(config()).await;
    let started = Instant::now();
    let (status, _, answer) =
        call(&app, json!({"argv": ["sleep", "60"], "timeout_ms": 1000})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["timed_out"], true);
    assert_eq!(answer["exit_code"], Value::Null);
    let note = answer["note"].as_str().unwrap();
    assert!(
        note.contains("went with its pod at the job's deadline"),
        "{note}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(2500),
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
    for (tools, runner, container) in [
        ("registry.example.com/nope:1", RUNNER_IMAGE, "exec"),
        (
            "registry.example.com/tools:1",
            "registry.example.com/nope:2",
            "agentvm-runner",
        ),
    ] {
        let mut config = config();
        config.template.image = tools.into();
        config.template.runner_image = runner.into();
        let (stand_in, app) = started(config).await;
        let started = Instant::now();
        let (status, _, answer) = call(&app, json!({"argv": ["true"], "timeout_ms": 30_000})).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{answer}");
        let error = answer["error"].as_str().unwrap();
        let expected = format!("container {container} cannot start: ImagePullBackOff");
        assert!(error.contains(&expected), "{error}");
        assert!(started.elapsed() < Duration::from_secs(2));
        eventually("job deleted", || stand_in.job_names().is_empty()).await;
    }
}

#[tokio::test]
async fn a_runner_image_without_the_runner_gets_502_naming_the_init_container() {
    let mut config = config();
    config.template.runner_image = "registry.example.com/tools:1".into();
    let (stand_in, app) = started(config).await;
    let (status, _, answer) = call(&app, json!({"argv": ["true"]})).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{answer}");
    let error = answer["error"].as_str().unwrap();
    assert!(
        error.contains("init container agentvm-runner: 128 StartError")
            && error.contains("\"agentvm-sidecar\": executable file not found"),
        "{error}"
    );
    eventually("job deleted", || stand_in.job_names().is_empty()).await;
}

#[tokio::test]
async fn a_job_never_reported_on_is_given_up_after_the_slack() {
    let config = DispatchConfig {
        wait_slack: Duration::from_millis(300),
        ..config()
    };
    let (stand_in, app) = started(config).await;
    stand_in.stop_controller();
    let started = Instant::now();
    let (status, _, answer) = call(&app, json!({"argv": ["true"], "timeout_ms": 500})).await;
    let took = started.elapsed();
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["timed_out"], true);
    assert_eq!(answer["exit_code"], Value::Null);
    assert!(
        answer["note"].as_str().unwrap().contains("deadline"),
        "{answer}"
    );
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
        tokio::spawn(async move {
            call(&app, json!({"argv": ["sleep", "0.5"], "timeout_ms": 3000})).await
        })
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

    // More stdin than a Secret holds, within a body limit that lets it through.
    let config = DispatchConfig {
        max_body_bytes: 2 << 20,
        ..config()
    };
    let (stand_in, app) = started(config).await;
    let stdin = "x".repeat((1 << 20) + 1);
    let (status, _, answer) = call(&app, json!({"argv": ["cat"], "stdin": stdin})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert!(answer["error"]
        .as_str()
        .unwrap()
        .contains("stdin is larger than 1048576 bytes"));
    assert!(stand_in.store.lock().unwrap().created.is_empty());
}

#[tokio::test]
async fn a_client_that_hangs_up_leaves_no_job_and_no_secret() {
    let (stand_in, app) = started(config()).await;
    let request = {
        let app = app.clone();
        tokio::spawn(async move {
            call(
                &app,
                json!({"argv": ["sleep", "30"], "stdin": "x", "timeout_ms": 30_000}),
            )
            .await
        })
    };
    eventually("secret created", || !stand_in.secret_names().is_empty()).await;
    request.abort();
    eventually("job deleted", || stand_in.job_names().is_empty()).await;
    assert_eq!(deleted_in_background(&stand_in).len(), 1);
    assert!(stand_in.secret_names().is_empty(), "collected with its Job");
}

#[tokio::test]
async fn a_job_deleted_by_someone_else_answers_502() {
    let (stand_in, app) = started(config()).await;
    let request = {
        let app = app.clone();
        tokio::spawn(async move {
            call(&app, json!({"argv": ["sleep", "30"], "timeout_ms": 30_000})).await
        })
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
async fn a_dispatcher_that_may_not_create_secrets_answers_502_and_leaves_no_job() {
    let (stand_in, app) = started(config()).await;
    stand_in.forbid_secrets();
    let (status, _, answer) = call(&app, json!({"argv": ["cat"], "stdin": "x"})).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{answer}");
    let error = answer["error"].as_str().unwrap();
    assert!(
        error.contains("refused to create a secret") && error.contains("403"),
        "{error}"
    );
    eventually("job deleted", || stand_in.job_names().is_empty()).await;
    // Without stdin no Secret is needed.
    let (status, _, answer) = call(&app, json!({"argv": ["true"]})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
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

    /// A kubeconfig file, removed when dropped.
    struct Kubeconfig(std::path::PathBuf);

    impl Drop for Kubeconfig {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn kubeconfig(api: SocketAddr) -> Kubeconfig {
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
        Kubeconfig(path)
    }

    /// The dispatcher's command, and its kubeconfig (keep it until the command has started).
    fn command(api: SocketAddr, port: u16) -> (Command, Kubeconfig) {
        let config = kubeconfig(api);
        let mut c = Command::new(BIN);
        c.args(["dispatch", "--listen", &format!("127.0.0.1:{port}")])
            .env("KUBECONFIG", &config.0)
            .env("AGENTVM_POD_NAMESPACE", NAMESPACE)
            .env("AGENTVM_POD_NAME", DISPATCHER)
            .env("AGENTVM_DISPATCH_IMAGE", "registry.example.com/tools:1")
            .env("AGENTVM_DISPATCH_RUNNER_IMAGE", RUNNER_IMAGE)
            .env("AGENTVM_GRACE_PERIOD", "1")
            .env("AGENTVM_LOG_LEVEL", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        (c, config)
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
        let (mut command, _kubeconfig) = command(api, port);
        let mut server = Server(command.spawn().unwrap());
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

        let (status, body) = http(
            port,
            "POST",
            "/v1/exec",
            r#"{"argv":["sh","-c","cat; echo err >&2"],"stdin":"hi\n"}"#,
        )
        .await
        .unwrap();
        assert_eq!(status, 200, "{body}");
        let answer: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(answer["stdout"], "hi\n");
        assert_eq!(answer["stderr"], "err\n");

        // A command still running when the grace period ends: its Job is deleted on the way out.
        let in_flight = tokio::spawn(async move {
            http(
                port,
                "POST",
                "/v1/exec",
                r#"{"argv":["sleep","60"],"timeout_ms":60000}"#,
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
            "AGENTVM_DISPATCH_RUNNER_IMAGE",
            "AGENTVM_POD_NAMESPACE",
            "AGENTVM_POD_NAME",
        ] {
            let (mut command, _kubeconfig) = command(api, free_port());
            let out = command.env_remove(unset).output().unwrap();
            assert_eq!(out.status.code(), Some(64), "{unset}");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(stderr.contains("must be"), "{unset}: {stderr}");
        }
        for bad in [
            ["--cpu", "lots"],
            ["--workdir", "/tmp/work"],
            ["--workdir", "/agentvm"],
        ] {
            let (mut command, _kubeconfig) = command(api, free_port());
            let out = command.args(bad).output().unwrap();
            assert_eq!(out.status.code(), Some(64), "{bad:?}");
        }
    }
}
