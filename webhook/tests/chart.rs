//! The Helm chart, checked with a real helm (from `tests/setup`): lint, render with default and
//! non-default values, every manifest through `kubernetes-validate --strict`, unknown values
//! refused; and end to end, `agentvm serve` started with the rendered policies, settings and
//! certificate, answering the reviews an API server sends to the rendered webhook entries.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use agentvm_webhook::server::{self, ClusterAccess, ServeConfig};
use base64::Engine as _;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use rustls::pki_types::pem::PemObject;
use serde::Deserialize;
use serde_json::{json, Value};
use support::*;

fn chart() -> PathBuf {
    repo_tests().join("../charts/agentvm")
}

fn helm(args: &[&str]) -> (bool, String) {
    let out = Command::new(tool("AGENTVM_HELM", ".tools/bin/helm"))
        .args(args)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn render(extra: &[&str]) -> Vec<Value> {
    let chart = chart();
    let mut args = vec![
        "template",
        "t",
        chart.to_str().unwrap(),
        "--namespace",
        "agentvm-system",
    ];
    args.extend_from_slice(extra);
    let out = Command::new(tool("AGENTVM_HELM", ".tools/bin/helm"))
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helm template failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_yaml::Deserializer::from_str(&String::from_utf8_lossy(&out.stdout))
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn validate(objects: &[Value], tag: &str) {
    let dir = std::env::temp_dir().join(format!("agentvm-chart-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut files = Vec::new();
    for (i, o) in objects.iter().enumerate() {
        if o["apiVersion"]
            .as_str()
            .unwrap_or("")
            .starts_with("cert-manager.io/")
        {
            continue; // a CRD: kubernetes-validate carries only the built-in schemas
        }
        let f = dir.join(format!("{i}.json"));
        std::fs::write(&f, o.to_string()).unwrap();
        files.push(f);
    }
    let out = Command::new(tool(
        "AGENTVM_KUBERNETES_VALIDATE",
        ".venv/bin/kubernetes-validate",
    ))
    .arg("--strict")
    .args(&files)
    .output()
    .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let passed = text.matches(" passed for resource ").count();
    assert!(
        out.status.success() && passed == files.len(),
        "{tag}: {passed}/{} passed\n{text}",
        files.len()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

#[test]
fn chart_lints_strictly_and_refuses_unknown_values() {
    let chart = chart();
    let (ok, text) = helm(&["lint", "--strict", chart.to_str().unwrap()]);
    assert!(ok && text.contains("0 chart(s) failed"), "{text}");
    let (ok, text) = helm(&[
        "template",
        "t",
        chart.to_str().unwrap(),
        "--set",
        "webhok.failurePolicy=Fail",
    ]);
    assert!(
        !ok && text.contains("additional properties 'webhok' not allowed"),
        "{text}"
    );
    let (ok, text) = helm(&[
        "template",
        "t",
        chart.to_str().unwrap(),
        "--set",
        "settings.credentials=keep",
    ]);
    assert!(!ok && text.contains("credentials"), "{text}");
    for (value, word) in [
        (
            "proxy.configMapp=x",
            "additional properties 'configMapp' not allowed",
        ),
        (
            "proxy.credentialsSecret=Team_Tokens",
            "/proxy/credentialsSecret",
        ),
    ] {
        let (ok, text) = helm(&["template", "t", chart.to_str().unwrap(), "--set", value]);
        assert!(!ok && text.contains(word), "{value}: {text}");
    }
}

#[test]
fn default_render_is_valid_and_cannot_take_a_cluster_down() {
    let objects = render(&[]);
    validate(&objects, "default");
    let mutating = find(&objects, "MutatingWebhookConfiguration", "t-agentvm");
    let validating = find(&objects, "ValidatingWebhookConfiguration", "t-agentvm");
    let entries: Vec<&Value> = [mutating, validating]
        .iter()
        .flat_map(|c| c["webhooks"].as_array().unwrap())
        .collect();
    assert_eq!(entries.len(), 8);
    for w in &entries {
        let name = w["name"].as_str().unwrap();
        assert_eq!(w["sideEffects"], "NoneOnDryRun", "{name}");
        assert_eq!(w["matchPolicy"], "Equivalent", "{name}");
        assert!(w["timeoutSeconds"].as_i64().unwrap() <= 10, "{name}");
        assert!(
            w["clientConfig"].get("caBundle").is_none(),
            "{name}: the webhook writes it"
        );
        let excluded = &w["namespaceSelector"]["matchExpressions"][0]["values"];
        for ns in ["kube-system", "agentvm-system"] {
            assert!(
                excluded.as_array().unwrap().contains(&json!(ns)),
                "{name} must exclude {ns}"
            );
        }
        if name.starts_with("connect.") {
            assert!(
                w.get("objectSelector").is_none(),
                "CONNECT carries no pod to select"
            );
        } else if name.starts_with("enforced-pods.") {
            assert!(
                w.get("objectSelector").is_none(),
                "{name}: every pod of the namespace"
            );
            assert_eq!(
                w["namespaceSelector"]["matchLabels"]["agentvm.dev/enforce"],
                "true"
            );
        } else {
            assert_eq!(
                w["objectSelector"]["matchLabels"]["agentvm.dev/agent"], "true",
                "{name}"
            );
            let expected = if name.starts_with("pods-status.") {
                "Ignore"
            } else {
                "Fail"
            };
            assert_eq!(w["failurePolicy"], expected, "{name}");
        }
    }
    for w in mutating["webhooks"].as_array().unwrap() {
        assert_eq!(w["reinvocationPolicy"], "IfNeeded");
    }
    let deployment = find(&objects, "Deployment", "t-agentvm");
    let args = deployment["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(args.contains("--cluster=required"), "{args}");
    assert!(
        args.contains("--certificates=self-managed")
            && args.contains("--webhook-configuration=t-agentvm"),
        "{args}"
    );
    assert!(
        !objects.iter().any(|o| o["kind"] == "Secret"),
        "the webhook makes its own Secret"
    );
    let role = find(&objects, "Role", "t-agentvm-certificates");
    assert_eq!(role["rules"][1]["resourceNames"][0], "t-agentvm-tls");
    assert_eq!(deployment["spec"]["replicas"], 2);
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert!(objects.iter().any(|o| o["kind"] == "PodDisruptionBudget"));
    assert!(
        !objects.iter().any(|o| o["kind"] == "NetworkPolicy"),
        "no agent namespace listed"
    );
}

#[test]
fn non_default_render_is_valid() {
    let objects = render(&[
        "--set",
        "execPod.namespaces={team-a}",
        "--set",
        "dispatcher.namespaces={team-b}",
        "--set",
        "egress.allowedCIDRs={10.20.0.0/16}",
        "--set",
        "certificates.mode=cert-manager",
        "--set",
        "policies.extraConfigMaps={team-policies}",
        "--set",
        "settings.credentials=deny",
        "--set",
        "settings.runtimeClass=gvisor",
        "--set",
        "webhook.failurePolicy=Ignore",
        "--set",
        "webhook.reviewConnect=false",
        "--set",
        "replicaCount=3",
        "--set",
        "proxy.configMap=agentvm-proxy",
        "--set",
        "proxy.policyConfigMap=agentvm-tools",
        "--set",
        "proxy.credentialsSecret=agentvm-proxy-credentials",
        "--set",
        "proxy.workloadCredentialsSecret=false",
    ]);
    validate(&objects, "custom");
    let policies: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == "NetworkPolicy")
        .collect();
    assert_eq!(
        policies.len(),
        3,
        "exec isolation in team-a and team-b, dispatcher ingress in team-b"
    );
    // Only agents of the matching effective profile may reach an exec pod or a dispatcher: an
    // agent of another profile must not bypass its proxy.
    for (name, profile) in [
        ("agentvm-dispatcher-ingress", "dispatcher"),
        ("agentvm-exec-isolation", "exec-pod"),
    ] {
        let policy = find(&objects, "NetworkPolicy", name);
        assert_eq!(
            policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"],
            json!({"agentvm.dev/agent": "true", "agentvm.dev/profile": profile}),
            "{name}"
        );
    }
    assert_eq!(
        find(&objects, "Deployment", "agentvm-exec")["metadata"]["namespace"],
        "team-a"
    );
    let dispatcher = find(&objects, "Deployment", "agentvm-dispatcher");
    let env = dispatcher["spec"]["template"]["spec"]["containers"][0]["env"].to_string();
    for name in [
        "AGENTVM_POD_NAME",
        "AGENTVM_POD_NAMESPACE",
        "AGENTVM_DISPATCH_IMAGE",
        "AGENTVM_DISPATCH_RUNNER_IMAGE",
    ] {
        assert!(
            env.contains(name),
            "the dispatcher exits 64 without {name}: {env}"
        );
    }
    let role = find(&objects, "Role", "agentvm-dispatcher");
    assert_eq!(role["metadata"]["namespace"], "team-b");
    let secrets: Vec<&Value> = role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["resources"] == json!(["secrets"]))
        .collect();
    assert_eq!(secrets.len(), 1);
    assert_eq!(secrets[0]["verbs"], json!(["create"]), "never read");
    assert!(objects.iter().any(|o| o["kind"] == "Certificate"));
    let mutating = find(&objects, "MutatingWebhookConfiguration", "t-agentvm");
    assert_eq!(
        mutating["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
        "agentvm-system/t-agentvm"
    );
    let validating = find(&objects, "ValidatingWebhookConfiguration", "t-agentvm");
    assert_eq!(
        validating["webhooks"].as_array().unwrap().len(),
        4,
        "no CONNECT entry"
    );
    let settings = &find(&objects, "ConfigMap", "t-agentvm-policies")["data"]["data.yaml"];
    assert!(
        settings.as_str().unwrap().contains("credentials: deny"),
        "{settings}"
    );
    for line in [
        "config_map: \"agentvm-proxy\"",
        "policy_config_map: \"agentvm-tools\"",
        "credentials_secret: \"agentvm-proxy-credentials\"",
        "workload_credentials_secret: false",
    ] {
        assert!(
            settings.as_str().unwrap().contains(line),
            "{line}: {settings}"
        );
    }
}

/// The rendered chart, served: policies and settings from the ConfigMap, certificate from the
/// Secret, and a client that trusts exactly the rendered CA bundle and checks the service name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_answers_with_the_rendered_configuration() {
    agentvm_common::tls::install_default_provider();
    let objects = render(&[
        "--set",
        "certificates.mode=helm",
        "--set",
        "proxy.configMap=agentvm-proxy",
        "--set",
        "proxy.credentialsSecret=agentvm-proxy-credentials",
    ]);
    validate(&objects, "helm-certificates");
    let dir = std::env::temp_dir().join(format!("agentvm-chart-e2e-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    for (key, text) in find(&objects, "ConfigMap", "t-agentvm-policies")["data"]
        .as_object()
        .unwrap()
    {
        std::fs::write(dir.join("policies").join(key), text.as_str().unwrap()).unwrap();
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let secret = &find(&objects, "Secret", "t-agentvm-tls")["data"];
    for key in ["tls.crt", "tls.key"] {
        std::fs::write(
            dir.join(key),
            b64.decode(secret[key].as_str().unwrap()).unwrap(),
        )
        .unwrap();
    }
    let mutating = find(&objects, "MutatingWebhookConfiguration", "t-agentvm");
    let client_config = &mutating["webhooks"][0]["clientConfig"];
    let ca = b64
        .decode(client_config["caBundle"].as_str().unwrap())
        .unwrap();
    let service = format!(
        "{}.{}.svc",
        client_config["service"]["name"].as_str().unwrap(),
        client_config["service"]["namespace"].as_str().unwrap()
    );

    let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let config = ServeConfig {
        listen: loopback,
        probe_listen: loopback,
        tls_cert: dir.join("tls.crt"),
        tls_key: dir.join("tls.key"),
        policies: Some(dir.join("policies")),
        reload_interval: Duration::from_secs(10),
        grace_period: Duration::from_secs(5),
        max_body_bytes: server::DEFAULT_MAX_BODY_BYTES,
        access_log: false,
        cluster: ClusterAccess::Off,
        certificates: None,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = server::start(config, async move {
        let _ = stopped.await;
    })
    .await
    .unwrap();

    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&ca) {
        roots.add(cert.unwrap()).unwrap();
    }
    let client = rustls::ClientConfig::builder_with_provider(agentvm_common::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(running.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(service.clone()).unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(client))
        .connect(name, tcp)
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);

    let path = client_config["service"]["path"]
        .as_str()
        .unwrap()
        .to_owned();
    async fn send(
        sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
        host: &str,
        path: &str,
        body: &Value,
    ) -> Value {
        sender.ready().await.unwrap();
        let req = hyper::Request::post(format!("{path}?timeout=5s"))
            .header("host", host)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let res = sender.send_request(req).await.unwrap();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice::<Value>(&bytes).unwrap()
    }
    macro_rules! post {
        ($path:expr, $body:expr) => {
            send(&mut sender, &service, &$path, &$body).await
        };
    }
    let captures = repo_tests().join("fixtures/captures");
    let read = |n: &str| -> Value {
        serde_json::from_str(&std::fs::read_to_string(captures.join(n)).unwrap()).unwrap()
    };

    let review = read("pod-create-agent-minimal.mutate.json");
    let answer = post!(path, review);
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
    let out = agentvm_webhook::admission::Reviewer::fixed(
        agentvm_webhook::policies::Policies::load_dir(&dir.join("policies")).unwrap(),
    )
    .review(agentvm_webhook::admission::Mode::Mutate, &request(&review));
    let patched = apply(&review["request"]["object"], &decoded_patch(&out).unwrap());
    let proxy = &patched["spec"]["initContainers"][0];
    assert_eq!(
        proxy["image"], "agentvm/agentvm-sidecar:0.1.0",
        "image from the chart values"
    );
    // The proxy's ConfigMap and Secret from the chart values, mounted into the proxy only.
    assert_eq!(
        proxy["args"],
        json!([
            "proxy",
            "--listen",
            "127.0.0.1:7411",
            "--config",
            "/etc/agentvm/proxy/config.yaml",
            "--credentials-dir",
            "/var/run/agentvm/credentials",
            "--allow-missing"
        ])
    );
    let volumes = patched["spec"]["volumes"].to_string();
    assert!(
        volumes.contains(r#""secretName":"agentvm-proxy-credentials""#),
        "{volumes}"
    );
    assert!(patched["spec"]["containers"][0]["volumeMounts"]
        .to_string()
        .find("agentvm-proxy")
        .is_none());

    // The release namespace is excluded by the rendered settings, as the chart excludes it
    // from the webhook entries.
    let mut in_release = review.clone();
    in_release["request"]["namespace"] = json!("agentvm-system");
    let answer = post!(path, in_release);
    assert!(answer["response"]["allowed"] == true && answer["response"].get("patch").is_none());

    let validating = find(&objects, "ValidatingWebhookConfiguration", "t-agentvm");
    let vpath = validating["webhooks"][0]["clientConfig"]["service"]["path"]
        .as_str()
        .unwrap()
        .to_owned();
    let answer = post!(vpath, read("pod-update-remove-agent-label.validate.json"));
    assert_eq!(answer["response"]["allowed"], false, "{answer}");
    // The chart's default for a pod that cannot be looked up: allowed, with a warning that
    // says why (a failed lookup must not block `kubectl exec` cluster-wide).
    let answer = post!(vpath, read("pod-connect-exec.call1.validate.json"));
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
    assert!(answer["response"]["warnings"][0]
        .as_str()
        .unwrap()
        .contains("could not look up"));

    let _ = stop.send(());
    running.task.await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
