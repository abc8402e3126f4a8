//! What the injected proxy gets: its config and tool policy from ConfigMaps and its upstream
//! credentials from a Secret, named by the platform's settings or by the workload's annotations
//! (`policies/proxy/`), mounted into the proxy container only. Inputs are the examples and
//! `tests/fixtures/proxy/`; every allowed answer goes through `mutate_and_check` (the patch
//! applies, `/validate` admits the result, mutating it again changes nothing).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use agentvm_webhook::admission::{Mode, Reviewer};
use agentvm_webhook::offline;
use serde_json::{json, Value};
use support::*;

const CONFIG: &str = "agentvm-proxy-config";
const POLICY: &str = "agentvm-proxy-policy";
const CREDENTIALS: &str = "agentvm-proxy-credentials";

fn documents(path: &str) -> Vec<offline::Document> {
    let path = repo_tests().join("..").join(path);
    offline::read_file(path.to_str().unwrap()).unwrap()
}

/// The pod template (or pod) of an object.
fn template(object: &Value) -> &Value {
    match object["kind"].as_str().unwrap() {
        "Pod" => object,
        _ => &object["spec"]["template"],
    }
}

/// Mutates the last document of a file (the workload, after its ConfigMap and Secret) with the
/// invariants checked; the patched object.
fn patched(reviewer: &Reviewer, path: &str) -> Value {
    let docs = documents(path);
    let doc = docs.last().unwrap();
    mutate_and_check(reviewer, &doc.request, path).unwrap_or_else(|| {
        panic!(
            "{path} denied: {}",
            reviewer.review(Mode::Mutate, &doc.request).response.message
        )
    })
}

/// `(config, policy, credentials)`: the ConfigMap and Secret names of the proxy volumes.
fn mounted(spec: &Value) -> (Option<String>, Option<String>, Option<String>) {
    let volume = |name: &str, pointer: &str| {
        spec["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == name)
            .map(|v| v.pointer(pointer).unwrap().as_str().unwrap().to_owned())
    };
    (
        volume(CONFIG, "/configMap/name"),
        volume(POLICY, "/configMap/name"),
        volume(CREDENTIALS, "/secret/secretName"),
    )
}

/// Checks what every result must hold: the proxy volumes are optional and mounted read-only,
/// by the proxy alone, as whole folders, and the proxy is pointed at them; the credentials
/// volume is the only Secret in the pod; the annotation records the names.
fn assert_proxy_only(spec: &Value, meta: &Value) {
    let (config, policy, credentials) = mounted(spec);
    let proxy = &spec["initContainers"][0];
    assert_eq!(proxy["name"], "agentvm-proxy");
    let args: Vec<&str> = proxy["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let has = |pair: &[&str]| args.windows(pair.len()).any(|w| w == pair);
    assert_eq!(
        has(&["--config", "/etc/agentvm/proxy/config.yaml"]),
        config.is_some()
    );
    assert_eq!(
        has(&["--credentials-dir", "/var/run/agentvm/credentials"]),
        config.is_some(),
        "a config's credential files are confined to the Secret's folder"
    );
    assert_eq!(has(&["--policies", "/etc/agentvm/tools"]), policy.is_some());
    let any = config.is_some() || policy.is_some() || credentials.is_some();
    assert_eq!(args.contains(&"--allow-missing"), any, "{args:?}");
    for v in spec["volumes"].as_array().into_iter().flatten() {
        if v.get("secret").is_some() {
            assert_eq!(v["name"], CREDENTIALS, "the only Secret volume: {v}");
        }
        if [CONFIG, POLICY, CREDENTIALS].contains(&v["name"].as_str().unwrap()) {
            let source = v.get("configMap").or(v.get("secret")).unwrap();
            assert_eq!(source["optional"], true, "{v}");
            assert_eq!(
                source["defaultMode"], 420,
                "as the API server defaults it: {v}"
            );
        }
    }
    for list in ["initContainers", "containers", "ephemeralContainers"] {
        for c in spec[list].as_array().into_iter().flatten() {
            for m in c["volumeMounts"].as_array().into_iter().flatten() {
                let volume = m["name"].as_str().unwrap();
                if [CONFIG, POLICY, CREDENTIALS].contains(&volume) {
                    assert_eq!(
                        c["name"], "agentvm-proxy",
                        "{volume} mounted by {}",
                        c["name"]
                    );
                    assert_eq!(m["readOnly"], true);
                    assert!(m.get("subPath").is_none(), "a subPath mount never updates");
                }
            }
            let from_secret =
                c.to_string().contains("secretKeyRef") || c.to_string().contains("secretRef");
            assert!(!from_secret, "{}: env from a Secret", c["name"]);
        }
    }
    let applied: Value =
        serde_json::from_str(meta["annotations"]["agentvm.dev/applied"].as_str().unwrap()).unwrap();
    let recorded = |k: &str| applied["proxy"][k].as_str().map(str::to_owned);
    assert_eq!(
        (
            recorded("config_map"),
            recorded("policy_config_map"),
            recorded("credentials_secret")
        ),
        (config, policy, credentials),
        "{applied}"
    );
    assert_eq!(applied.get("proxy").is_some(), any, "{applied}");
}

fn names(config: &str, policy: Option<&str>, credentials: Option<&str>) -> [Option<String>; 3] {
    [Some(config), policy, credentials].map(|n| n.map(str::to_owned))
}

#[test]
fn the_platform_settings_give_every_proxy_its_config_policy_and_credentials() {
    let platform = reviewer_with(PLATFORM_PROXY);
    let deployment = patched(&platform, "examples/agent-deployment.yaml");
    let t = template(&deployment);
    assert_proxy_only(&t["spec"], &t["metadata"]);
    let (c, p, s) = mounted(&t["spec"]);
    assert_eq!(
        [c, p, s],
        names(
            "agentvm-proxy",
            Some("agentvm-tools"),
            Some("agentvm-proxy-credentials")
        )
    );
    // The shipped settings give nothing: the patch is what it was before proxy mounts existed.
    let plain = patched(&reviewer(), "examples/agent-deployment.yaml");
    let t = template(&plain);
    assert_eq!(mounted(&t["spec"]), (None, None, None));
    assert_proxy_only(&t["spec"], &t["metadata"]);
    assert_eq!(
        t["spec"]["initContainers"][0]["args"],
        json!(["proxy", "--listen", "127.0.0.1:7411"])
    );
}

#[test]
fn pods_made_from_the_template_come_out_unchanged() {
    // The API server defaults defaultMode on ConfigMap and Secret volumes; the webhook spells it
    // out, or every copy of the template would be patched (and the Deployment controller would
    // see a new template).
    let reviewer = reviewer_with(PLATFORM_PROXY);
    let deployment = patched(&reviewer, "examples/proxy-upstreams.yaml");
    let template = &deployment["spec"]["template"];
    let mut pod = json!({"apiVersion": "v1", "kind": "Pod", "spec": template["spec"]});
    pod["metadata"] = template["metadata"].clone();
    pod["metadata"]["generateName"] = json!("coding-agent-5d4f8b7c9-");
    pod["metadata"]["namespace"] = json!("team-a");
    let req = offline::to_request(pod, 0).unwrap();
    for mode in [Mode::Mutate, Mode::Validate] {
        let out = reviewer.review(mode, &req);
        assert!(out.response.allowed, "{}", out.response.message);
        assert!(out.response.patch.is_none(), "{:?}", decoded_patch(&out));
    }
}

#[test]
fn a_workload_names_its_own_config_and_credentials_never_the_tool_policy() {
    // Shipped settings: the workload's ConfigMap and Secret, the shipped tool policy.
    let shipped = patched(&reviewer(), "examples/proxy-upstreams.yaml");
    let t = template(&shipped);
    assert_proxy_only(&t["spec"], &t["metadata"]);
    let (c, p, s) = mounted(&t["spec"]);
    assert_eq!(
        [c, p, s],
        names("coding-agent-proxy", None, Some("coding-agent-proxy"))
    );
    // Platform settings: the platform's tool policy whatever the workload says.
    let platform = reviewer_with(PLATFORM_PROXY);
    let t = patched(&platform, "examples/proxy-upstreams.yaml")["spec"]["template"].clone();
    assert_proxy_only(&t["spec"], &t["metadata"]);
    let (c, p, s) = mounted(&t["spec"]);
    assert_eq!(
        [c, p, s],
        names(
            "coding-agent-proxy",
            Some("agentvm-tools"),
            Some("coding-agent-proxy")
        )
    );
}

/// The example Deployment with other proxy annotations, reviewed with `reviewer`.
fn review_annotated(
    reviewer: &Reviewer,
    annotations: Value,
) -> agentvm_webhook::admission::Outcome {
    let docs = documents("examples/proxy-upstreams.yaml");
    let mut object = docs.last().unwrap().request.object().unwrap().clone();
    object["spec"]["template"]["metadata"]["annotations"] = annotations;
    let req = offline::to_request(object, 0).unwrap();
    if let Some(done) = mutate_and_check(reviewer, &req, "annotated") {
        let t = template(&done);
        assert_proxy_only(&t["spec"], &t["metadata"]);
    }
    reviewer.review(Mode::Mutate, &req)
}

#[test]
fn credentials_go_only_with_a_config_from_the_same_party() {
    let platform = reviewer_with(PLATFORM_PROXY);
    let mounts_of = |annotations: Value| {
        let out = review_annotated(&platform, annotations.clone());
        assert!(
            out.response.allowed,
            "{annotations}: {}",
            out.response.message
        );
        let docs = documents("examples/proxy-upstreams.yaml");
        let mut object = docs.last().unwrap().request.object().unwrap().clone();
        object["spec"]["template"]["metadata"]["annotations"] = annotations;
        let done = apply(&object, &decoded_patch(&out).unwrap());
        mounted(&done["spec"]["template"]["spec"])
    };
    // A workload's config never gets the platform's Secret.
    let (c, _, s) = mounts_of(json!({"agentvm.dev/proxy-config": "team-tools"}));
    assert_eq!((c.as_deref(), s), (Some("team-tools"), None));
    // A workload's Secret may go to the platform's upstreams.
    let (c, _, s) = mounts_of(json!({"agentvm.dev/proxy-credentials": "team-tokens"}));
    assert_eq!(
        (c.as_deref(), s.as_deref()),
        (Some("agentvm-proxy"), Some("team-tokens"))
    );
    // A workload cannot take the platform's Secret for its own config.
    let out = review_annotated(
        &platform,
        json!({"agentvm.dev/proxy-config": "team-tools",
               "agentvm.dev/proxy-credentials": "agentvm-proxy-credentials"}),
    );
    assert!(!out.response.allowed);
    assert!(
        out.response
            .message
            .contains("the platform's credentials Secret"),
        "{}",
        out.response.message
    );
    // Settings can take the choice away; a bad name is refused with the name.
    let closed = reviewer_with(
        "  proxy:\n    workload_config_map: false\n    workload_credentials_secret: false\n",
    );
    let out = review_annotated(&closed, json!({"agentvm.dev/proxy-config": "team-tools"}));
    assert!(
        out.response
            .message
            .contains("proxy.workload_config_map is false"),
        "{}",
        out.response.message
    );
    let out = review_annotated(&platform, json!({"agentvm.dev/proxy-config": "Team_Tools"}));
    assert_eq!(out.response.code, 403);
    assert!(
        out.response.message.contains("Team_Tools"),
        "{}",
        out.response.message
    );
}

fn fixture(name: &str) -> offline::Document {
    let mut docs = documents(&format!("tests/fixtures/proxy/{name}"));
    assert_eq!(docs.len(), 1, "{name}");
    docs.remove(0)
}

#[test]
fn reserved_proxy_volumes_are_denied_or_replaced() {
    let platform = reviewer_with(PLATFORM_PROXY);
    let reserved = fixture("pod-reserved-proxy-volume.yaml");
    let out = platform.review(Mode::Mutate, &reserved.request);
    assert!(!out.response.allowed);
    assert!(
        out.response
            .message
            .contains("volume agentvm-proxy-config uses a name reserved"),
        "{}",
        out.response.message
    );
    // A forged annotation: agentvm's volumes are replaced by what the decision names.
    let forged = fixture("pod-forged-credentials-volume.yaml");
    for (reviewer, secret) in [
        (&platform, Some("agentvm-proxy-credentials")),
        (&reviewer(), None),
    ] {
        let done = mutate_and_check(reviewer, &forged.request, "forged").unwrap();
        assert_proxy_only(&done["spec"], &done["metadata"]);
        assert_eq!(mounted(&done["spec"]).2.as_deref(), secret);
        assert!(!done.to_string().contains("prod-database"), "{done}");
    }
    // Whoever claims to be agentvm's output, only the proxy may mount its volumes.
    let mounting = fixture("pod-agent-mounts-proxy-credentials.yaml");
    for mode in [Mode::Mutate, Mode::Validate] {
        let out = platform.review(mode, &mounting.request);
        assert!(!out.response.allowed, "{mode:?}");
        assert!(
            out.response.message.contains("container agent")
                && out.response.message.contains(CREDENTIALS),
            "{mode:?}: {}",
            out.response.message
        );
    }
}

/// A correctly patched agent pod with the platform's proxy mounts.
fn patched_pod(reviewer: &Reviewer) -> Value {
    let pod = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "agent", "namespace": "team-a",
            "labels": {"agentvm.dev/agent": "true", "agentvm.dev/profile": "sidecar-exec"}},
        "spec": {
            "initContainers": [{"name": "setup", "image": "registry.example.com/setup:1"}],
            "containers": [{"name": "agent", "image": "registry.example.com/agent:1"}]}});
    let req = offline::to_request(pod, 0).unwrap();
    mutate_and_check(reviewer, &req, "pod").unwrap()
}

#[test]
fn validate_refuses_every_other_way_to_the_credentials() {
    let platform = reviewer_with(PLATFORM_PROXY);
    let good = patched_pod(&platform);
    type Tamper = fn(&mut Value);
    let cases: [(&str, Tamper, &str); 7] = [
        (
            "the agent mounts the credentials volume",
            |p| {
                p["spec"]["containers"][0]["volumeMounts"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"name": CREDENTIALS, "mountPath": "/tokens"}));
            },
            "only agentvm-proxy may mount it",
        ),
        (
            "a user init container mounts it",
            |p| {
                p["spec"]["initContainers"][2]["volumeMounts"] =
                    json!([{"name": CREDENTIALS, "mountPath": "/tokens"}]);
            },
            "container setup: volume agentvm-proxy-credentials is the proxy's",
        ),
        (
            "a second volume of the same Secret",
            |p| {
                p["spec"]["volumes"].as_array_mut().unwrap().push(
                    json!({"name": "tokens", "secret": {"secretName": "agentvm-proxy-credentials"}}),
                );
                p["spec"]["containers"][0]["volumeMounts"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"name": "tokens", "mountPath": "/tokens"}));
            },
            "volume tokens: credentials (Secret agentvm-proxy-credentials)",
        ),
        (
            "the Secret projected into another volume",
            |p| {
                p["spec"]["volumes"].as_array_mut().unwrap().push(json!({"name": "bundle",
                    "projected": {"sources": [{"secret": {"name": "agentvm-proxy-credentials"}}]}}));
            },
            "projected credentials (Secret agentvm-proxy-credentials)",
        ),
        (
            "a key of the Secret in the agent's env",
            |p| {
                p["spec"]["containers"][0]["env"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({
                    "name": "TOKEN", "valueFrom": {"secretKeyRef": {
                        "name": "agentvm-proxy-credentials", "key": "github"}}}));
            },
            "comes from Secret agentvm-proxy-credentials",
        ),
        (
            "the whole Secret in the agent's env",
            |p| {
                p["spec"]["containers"][0]["envFrom"] =
                    json!([{"secretRef": {"name": "agentvm-proxy-credentials"}}]);
            },
            "envFrom Secret agentvm-proxy-credentials",
        ),
        (
            "the credentials volume pointed at another Secret",
            |p| {
                let volumes = p["spec"]["volumes"].as_array_mut().unwrap();
                let v = volumes
                    .iter_mut()
                    .find(|v| v["name"] == CREDENTIALS)
                    .unwrap();
                v["secret"]["secretName"] = json!("prod-database");
            },
            "credentials (Secret prod-database) are not allowed",
        ),
    ];
    let req = offline::to_request(good.clone(), 0).unwrap();
    assert!(platform.review(Mode::Validate, &req).response.allowed);
    for (what, tamper, word) in cases {
        let mut bad = good.clone();
        tamper(&mut bad);
        let req = offline::to_request(bad, 0).unwrap();
        let out = platform.review(Mode::Validate, &req);
        assert!(!out.response.allowed, "{what}");
        assert!(
            out.response.message.contains(word),
            "{what}: {}",
            out.response.message
        );
    }
}

#[test]
fn debug_containers_cannot_reach_the_proxy_files() {
    let debug_allowed = reviewer_with(&format!(
        "{PLATFORM_PROXY}  debug:\n    allow_ephemeral_containers: true\n"
    ));
    let pod = patched_pod(&debug_allowed);
    let review = |ephemeral: Value| {
        let mut object = pod.clone();
        object["spec"]["ephemeralContainers"] = json!([ephemeral]);
        let req = request(
            &json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "debug", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "subResource": "ephemeralcontainers", "name": "agent", "namespace": "team-a",
                "operation": "UPDATE", "userInfo": {"username": "oncall"},
                "object": object, "oldObject": pod}}),
        );
        debug_allowed.review(Mode::Validate, &req).response
    };
    let plain =
        json!({"name": "debugger", "image": "busybox:1.37", "targetContainerName": "agent"});
    assert!(
        review(plain.clone()).allowed,
        "policy allows kubectl debug here"
    );
    let mut mounting = plain.clone();
    mounting["volumeMounts"] = json!([{"name": CREDENTIALS, "mountPath": "/t"}]);
    let answer = review(mounting);
    assert!(!answer.allowed);
    assert!(
        answer
            .message
            .contains("mounts volume agentvm-proxy-credentials"),
        "{}",
        answer.message
    );
    let mut targeting = plain;
    targeting["targetContainerName"] = json!("agentvm-proxy");
    let answer = review(targeting);
    assert!(!answer.allowed);
    assert!(
        answer.message.contains("targets agentvm-proxy"),
        "{}",
        answer.message
    );
}
