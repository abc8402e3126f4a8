//! Property tests over generated agent pods and workloads: every patch applies strictly, the
//! result passes `/validate` and an independent Pod Security Standards "restricted" check,
//! applying the profile twice changes nothing, and user containers survive in order.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use agentvm_webhook::admission::Mode;
use proptest::prelude::*;
use serde_json::{json, Map, Value};
use support::*;

fn security_context() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        Just(None),
        Just(Some(json!({}))),
        (1i64..70000).prop_map(|u| Some(json!({"runAsUser": u}))),
        Just(Some(
            json!({"runAsNonRoot": false, "allowPrivilegeEscalation": true})
        )),
        Just(Some(json!({"runAsNonRoot": true}))),
        Just(Some(
            json!({"capabilities": {"drop": ["NET_RAW"]}, "readOnlyRootFilesystem": false})
        )),
        Just(Some(json!({"seccompProfile": {"type": "Unconfined"}}))),
        Just(Some(
            json!({"capabilities": {"add": []}, "privileged": false})
        )),
    ]
}

fn env() -> impl Strategy<Value = Vec<Value>> {
    prop::collection::vec(
        prop_oneof![
            "[A-Z]{1,6}".prop_map(|n| json!({"name": n, "value": "v"})),
            "[A-Z]{1,6}".prop_map(
                |n| json!({"name": n, "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}})
            ),
            "[A-Z]{1,6}".prop_map(
                |n| json!({"name": n, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}})
            ),
        ],
        0..4,
    )
}

fn container(name: String, mounts: Vec<&'static str>) -> impl Strategy<Value = Value> {
    (security_context(), env(), any::<bool>(), any::<bool>()).prop_map(move |(sc, env, secret_env_from, port)| {
        let mut c = Map::new();
        c.insert("name".into(), json!(name));
        c.insert("image".into(), json!(format!("registry.example.com/{name}:1")));
        if let Some(sc) = sc {
            c.insert("securityContext".into(), sc);
        }
        if !env.is_empty() {
            c.insert("env".into(), Value::Array(env));
        }
        if secret_env_from {
            c.insert("envFrom".into(), json!([{"configMapRef": {"name": "cm"}}, {"secretRef": {"name": "creds"}}]));
        }
        if port {
            c.insert("ports".into(), json!([{"containerPort": 8080, "protocol": "TCP"}]));
        }
        let mounts: Vec<Value> = mounts
            .iter()
            .map(|v| match *v {
                "kube-api-access-abcde" => json!({"name": v, "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}),
                other => json!({"name": other, "mountPath": format!("/mnt/{other}")}),
            })
            .collect();
        if !mounts.is_empty() {
            c.insert("volumeMounts".into(), Value::Array(mounts));
        }
        Value::Object(c)
    })
}

fn volumes() -> Vec<(&'static str, Value)> {
    vec![
        ("scratch", json!({"name": "scratch", "emptyDir": {}})),
        (
            "settings",
            json!({"name": "settings", "configMap": {"name": "settings"}}),
        ),
        (
            "creds",
            json!({"name": "creds", "secret": {"secretName": "creds"}}),
        ),
        (
            "kube-api-access-abcde",
            json!({"name": "kube-api-access-abcde", "projected": {"sources": [
            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}}]}}),
        ),
        (
            "bundle",
            json!({"name": "bundle", "projected": {"sources": [
            {"secret": {"name": "tls"}}, {"configMap": {"name": "ca"}}]}}),
        ),
    ]
}

prop_compose! {
    fn pod_spec()(
        used in prop::sample::subsequence((0..5usize).collect::<Vec<_>>(), 0..5),
        n_containers in 1..3usize,
        n_init in 0..3usize,
        native_sidecar in any::<bool>(),
        pod_sc in prop_oneof![
            Just(None),
            Just(Some(json!({}))),
            Just(Some(json!({"runAsUser": 1000, "fsGroup": 2000}))),
            Just(Some(json!({"seccompProfile": {"type": "Localhost", "localhostProfile": "p.json"}}))),
        ],
        seeds in prop::collection::vec(any::<u8>(), 6),
    )(
        containers in {
            let all = volumes();
            let chosen: Vec<&'static str> = used.iter().map(|i| all[*i].0).collect();
            let list: Vec<_> = (0..n_containers).map(|i| {
                let mounts: Vec<&'static str> = chosen.iter().copied().filter(|_| seeds[i] % 2 == 0).collect();
                container(format!("agent{i}"), mounts)
            }).collect();
            list
        },
        init in {
            let list: Vec<_> = (0..n_init).map(|i| container(format!("init{i}"), vec![])).collect();
            list
        },
        used in Just(used),
        native_sidecar in Just(native_sidecar),
        pod_sc in Just(pod_sc),
    ) -> Value {
        let all = volumes();
        let mut spec = Map::new();
        spec.insert("containers".into(), Value::Array(containers));
        if !init.is_empty() {
            let mut init = init;
            if native_sidecar {
                init[0]["restartPolicy"] = json!("Always");
            }
            spec.insert("initContainers".into(), Value::Array(init));
        }
        let vols: Vec<Value> = used.iter().map(|i| all[*i].1.clone()).collect();
        if !vols.is_empty() {
            spec.insert("volumes".into(), Value::Array(vols));
        }
        if let Some(sc) = pod_sc {
            spec.insert("securityContext".into(), sc);
        }
        Value::Object(spec)
    }
}

fn metadata() -> impl Strategy<Value = Value> {
    (
        prop_oneof![
            Just(None),
            Just(Some("no-exec")),
            Just(Some("sidecar-exec")),
            Just(Some("exec-pod")),
            Just(Some("dispatcher"))
        ],
        any::<bool>(),
        any::<bool>(),
        prop::sample::select(vec![
            json!({}),
            json!({"agentvm.dev/proxy-config": "team-tools"}),
            json!({"agentvm.dev/proxy-credentials": "team-tokens"}),
            json!({"agentvm.dev/proxy-config": "team-tools", "agentvm.dev/proxy-credentials": "team-tokens"}),
        ]),
    )
        .prop_map(|(profile, odd_keys, annotations, proxy)| {
            let mut labels = json!({"agentvm.dev/agent": "true"});
            if let Some(p) = profile {
                labels["agentvm.dev/profile"] = json!(p);
            }
            if odd_keys {
                labels["example.com/team~a"] = json!("x");
            }
            let mut meta = json!({"labels": labels});
            if annotations {
                meta["annotations"] = json!({"example.com/owner": "team-a"});
            }
            for (k, v) in proxy.as_object().unwrap() {
                meta["annotations"][k] = v.clone();
            }
            meta
        })
}

fn object() -> impl Strategy<Value = (Value, &'static str)> {
    (metadata(), pod_spec(), prop::sample::select(vec!["Pod", "Deployment", "CronJob"])).prop_map(|(meta, spec, kind)| {
        let object = match kind {
            "Pod" => {
                let mut m = meta.clone();
                m["generateName"] = json!("agent-");
                m["namespace"] = json!("team-a");
                json!({"apiVersion": "v1", "kind": "Pod", "metadata": m, "spec": spec})
            }
            "Deployment" => json!({"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "agent", "namespace": "team-a"},
                "spec": {"selector": {"matchLabels": {"app": "a"}}, "template": {"metadata": meta, "spec": spec}}}),
            _ => json!({"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "agent", "namespace": "team-a"},
                "spec": {"schedule": "* * * * *", "jobTemplate": {"spec": {"template": {"metadata": meta, "spec": spec}}}}}),
        };
        (object, kind)
    })
}

fn review_for(object: &Value, kind: &str) -> agentvm_webhook::review::Request {
    let group = match kind {
        "Pod" => "",
        "Deployment" => "apps",
        _ => "batch",
    };
    request(
        &json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": "prop", "kind": {"group": group, "version": "v1", "kind": kind},
        "resource": {"group": group, "version": "v1", "resource": format!("{}s", kind.to_lowercase())},
        "namespace": "team-a", "operation": "CREATE", "userInfo": {"username": "prop"},
        "object": object, "oldObject": null, "dryRun": false}}),
    )
}

fn template<'a>(object: &'a Value, kind: &str) -> &'a Value {
    match kind {
        "Pod" => object,
        "Deployment" => &object["spec"]["template"],
        _ => &object["spec"]["jobTemplate"]["spec"]["template"],
    }
}

/// The Pod Security Standards "restricted" profile, written from the published standard and
/// independent of the webhook's own conformance code.
fn pss_restricted_violations(spec: &Value) -> Vec<String> {
    let mut v = Vec::new();
    for f in ["hostNetwork", "hostPID", "hostIPC"] {
        if spec[f] == true {
            v.push(f.to_string());
        }
    }
    let allowed_volumes = [
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    ];
    for vol in spec["volumes"].as_array().into_iter().flatten() {
        let kind = vol
            .as_object()
            .unwrap()
            .keys()
            .find(|k| *k != "name")
            .unwrap();
        if !allowed_volumes.contains(&kind.as_str()) {
            v.push(format!("volume type {kind}"));
        }
    }
    let pod_sc = &spec["securityContext"];
    for list in ["initContainers", "containers", "ephemeralContainers"] {
        for c in spec[list].as_array().into_iter().flatten() {
            let sc = &c["securityContext"];
            let name = c["name"].as_str().unwrap();
            if sc["privileged"] == true {
                v.push(format!("{name} privileged"));
            }
            if sc["allowPrivilegeEscalation"] != false {
                v.push(format!("{name} allowPrivilegeEscalation"));
            }
            let non_root = if sc["runAsNonRoot"].is_boolean() {
                &sc["runAsNonRoot"]
            } else {
                &pod_sc["runAsNonRoot"]
            };
            if non_root != true {
                v.push(format!("{name} runAsNonRoot"));
            }
            if sc["runAsUser"] == 0 || (sc["runAsUser"].is_null() && pod_sc["runAsUser"] == 0) {
                v.push(format!("{name} runAsUser 0"));
            }
            let seccomp = if sc["seccompProfile"].is_object() {
                &sc["seccompProfile"]["type"]
            } else {
                &pod_sc["seccompProfile"]["type"]
            };
            if seccomp != "RuntimeDefault" && seccomp != "Localhost" {
                v.push(format!("{name} seccomp"));
            }
            let drop = sc["capabilities"]["drop"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if !drop.contains(&json!("ALL")) {
                v.push(format!("{name} drop ALL"));
            }
            for cap in sc["capabilities"]["add"].as_array().into_iter().flatten() {
                if cap != "NET_BIND_SERVICE" {
                    v.push(format!("{name} add {cap}"));
                }
            }
            for p in c["ports"].as_array().into_iter().flatten() {
                if p["hostPort"].as_i64().unwrap_or(0) != 0 {
                    v.push(format!("{name} hostPort"));
                }
            }
        }
    }
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn profile_applies_cleanly_once_and_for_all((object, kind) in object(), platform in any::<bool>()) {
        // With and without the platform naming the proxy's config, tool policy and credentials.
        let reviewer = if platform { reviewer_with(PLATFORM_PROXY) } else { reviewer() };
        let req = review_for(&object, kind);
        let patched = mutate_and_check(&reviewer, &req, kind).expect("fixable pods are allowed");
        let before = template(&object, kind);
        let after = template(&patched, kind);
        prop_assert_eq!(pss_restricted_violations(&after["spec"]), Vec::<String>::new());
        prop_assert_eq!(&after["spec"]["automountServiceAccountToken"], &json!(false));
        prop_assert_eq!(&after["metadata"]["labels"]["agentvm.dev/egress"], &json!("deny"));
        prop_assert_eq!(&after["spec"]["initContainers"][0]["name"], &json!("agentvm-proxy"));
        // User containers survive, in order, with their images.
        let names = |spec: &Value, list: &str| -> Vec<(Value, Value)> {
            spec[list].as_array().into_iter().flatten()
                .filter(|c| !c["name"].as_str().unwrap().starts_with("agentvm-"))
                .map(|c| (c["name"].clone(), c["image"].clone())).collect()
        };
        for list in ["containers", "initContainers"] {
            prop_assert_eq!(names(&before["spec"], list), names(&after["spec"], list));
        }
        // The proxy's volumes are mounted by the proxy alone; the one Secret volume left is its
        // credentials.
        for list in ["containers", "initContainers"] {
            for c in after["spec"][list].as_array().into_iter().flatten() {
                let ours = c["volumeMounts"].to_string().contains("\"agentvm-proxy-");
                prop_assert_eq!(ours && c["name"] != "agentvm-proxy", false);
            }
        }
        for v in after["spec"]["volumes"].as_array().into_iter().flatten() {
            if v.get("secret").is_some() {
                prop_assert_eq!(&v["name"], &json!("agentvm-proxy-credentials"));
            }
        }
        // Nothing outside the pod template changes.
        let tp = match kind { "Pod" => "", "Deployment" => "/spec/template", _ => "/spec/jobTemplate/spec/template" };
        let out = reviewer.review(Mode::Mutate, &req);
        if let Some(ops) = decoded_patch(&out) {
            for op in ops.as_array().unwrap() {
                prop_assert!(op["path"].as_str().unwrap().starts_with(tp));
            }
        }
    }

    #[test]
    fn host_access_is_denied_without_a_patch(
        (object, kind) in object(),
        field in prop::sample::select(vec!["hostNetwork", "hostPID", "hostIPC", "shareProcessNamespace"]),
    ) {
        let mut object = object;
        let ptr = match kind { "Pod" => "/spec", "Deployment" => "/spec/template/spec", _ => "/spec/jobTemplate/spec/template/spec" };
        object.pointer_mut(ptr).unwrap()[field] = json!(true);
        let out = reviewer().review(Mode::Mutate, &review_for(&object, kind));
        prop_assert!(!out.response.allowed);
        prop_assert!(out.response.patch.is_none());
        prop_assert!(out.response.message.contains(field));
    }
}
