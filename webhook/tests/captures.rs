//! Every request captured from a real kube-apiserver (`tests/fixtures/captures/`), sent through
//! the reviewer with the shipped policies: the invariants hold for all of them, and each kind of
//! situation gets the answer it should.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use agentvm_webhook::admission::Mode;
use serde_json::Value;
use support::*;

fn captures() -> Vec<(String, Value)> {
    let all = json_files(&repo_tests().join("fixtures/captures"));
    assert!(
        all.len() >= 181,
        "expected the 181 captures, found {}",
        all.len()
    );
    all
}

#[test]
fn every_capture_keeps_the_invariants() {
    let reviewer = reviewer();
    for (name, review) in captures() {
        let req = request(&review);
        mutate_and_check(&reviewer, &req, &name);
        let validated = reviewer.review(Mode::Validate, &req);
        assert!(
            validated.response.patch.is_none(),
            "{name}: /validate never patches"
        );
        assert_eq!(validated.response.uid, req.uid);
    }
}

#[test]
fn every_capture_keeps_the_invariants_when_the_proxy_gets_its_mounts() {
    // The platform names the proxy's config, tool policy and credentials: every capture still
    // mutates once and for all, passes /validate, and only the proxy mounts those volumes.
    let reviewer = reviewer_with(PLATFORM_PROXY);
    let mut injected = 0;
    for (name, review) in captures() {
        let req = request(&review);
        let Some(patched) = mutate_and_check(&reviewer, &req, &name) else {
            continue;
        };
        let pointers = [
            "/spec/template/spec",
            "/spec/jobTemplate/spec/template/spec",
            "/spec",
        ];
        let Some(spec) = pointers
            .iter()
            .filter_map(|p| patched.pointer(p))
            .find(|s| s.get("initContainers").is_some())
        else {
            continue;
        };
        let text = |list: &str| spec[list].to_string();
        if !text("initContainers").contains("\"agentvm-proxy\"") {
            continue;
        }
        injected += 1;
        assert!(
            text("volumes").contains("agentvm-proxy-credentials"),
            "{name}"
        );
        for list in ["initContainers", "containers", "ephemeralContainers"] {
            for c in spec[list].as_array().into_iter().flatten() {
                let mounts = c["volumeMounts"].to_string();
                let ours = mounts.contains("\"agentvm-proxy-");
                assert_eq!(ours, c["name"] == "agentvm-proxy", "{name}: {}", c["name"]);
            }
        }
    }
    assert!(injected > 20, "only {injected} captures got the proxy");
}

fn outcome(name: &str, mode: Mode) -> agentvm_webhook::admission::Outcome {
    let (_, review) = captures()
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no {name}"));
    reviewer().review(mode, &request(&review))
}

#[test]
fn agent_pod_creates_are_patched_and_lose_the_token() {
    for name in [
        "pod-create-agent-minimal.mutate.json",
        "pod-create-agent-generatename.mutate.json",
        "pod-create-agent-kubectl-run.mutate.json",
        "pod-create-server-side-apply.mutate.json",
        "pod-create-agent-dryrun.mutate.json",
    ] {
        let (_, review) = captures().into_iter().find(|(n, _)| n == name).unwrap();
        let req = request(&review);
        let patched = mutate_and_check(&reviewer(), &req, name).expect(name);
        assert_eq!(
            patched["spec"]["automountServiceAccountToken"], false,
            "{name}"
        );
        let volumes = patched["spec"]["volumes"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(
            volumes.iter().all(|v| !v["name"]
                .as_str()
                .unwrap_or("")
                .starts_with("kube-api-access")),
            "{name}: token volume left"
        );
        assert_eq!(
            patched["metadata"]["labels"]["agentvm.dev/egress"], "deny",
            "{name}"
        );
        assert_eq!(
            patched["spec"]["initContainers"][0]["name"], "agentvm-proxy",
            "{name}"
        );
    }
}

#[test]
fn secrets_are_stripped_with_a_warning_naming_them() {
    for name in [
        "pod-create-agent-secret-env-valuefrom.mutate.json",
        "pod-create-agent-secret-envfrom.mutate.json",
        "pod-create-agent-secret-volume.mutate.json",
        "pod-create-agent-secret-projected-volume.mutate.json",
    ] {
        let out = outcome(name, Mode::Mutate);
        assert!(out.response.allowed, "{name}: {}", out.response.message);
        assert!(
            out.response.warnings.iter().any(|w| w.contains("Secret")),
            "{name}: warnings {:?}",
            out.response.warnings
        );
    }
}

#[test]
fn host_access_and_privilege_are_denied_by_field() {
    for (name, word) in [
        ("pod-create-agent-hostpath.mutate.json", "hostPath"),
        ("pod-create-agent-privileged-init.mutate.json", "privileged"),
    ] {
        let out = outcome(name, Mode::Mutate);
        assert!(!out.response.allowed, "{name}");
        assert_eq!(out.response.code, 403);
        assert!(
            out.response.message.contains(word),
            "{name}: {}",
            out.response.message
        );
    }
}

#[test]
fn non_agents_and_deletes_pass_untouched() {
    for name in [
        "pod-create-non-agent.mutate.json",
        "pod-delete.call2.mutate.json",
        "pod-delete-dryrun.validate.json",
        "pod-delete-force-grace0.call1.mutate.json",
        "namespace-create-team-a.mutate.json",
    ] {
        let out = outcome(name, Mode::Mutate);
        assert!(
            out.response.allowed && out.response.patch.is_none(),
            "{name}"
        );
    }
}

#[test]
fn pod_updates_never_patch_and_guard_agentvm_keys() {
    let allowed = [
        "pod-update-image.mutate.json",
        "pod-update-annotation.mutate.json",
    ];
    for name in allowed {
        for mode in [Mode::Mutate, Mode::Validate] {
            let out = outcome(name, mode);
            assert!(out.response.allowed, "{name}: {}", out.response.message);
            assert!(out.response.patch.is_none(), "{name}");
        }
    }
    for (name, key) in [
        (
            "pod-update-remove-agent-label.mutate.json",
            "agentvm.dev/agent",
        ),
        (
            "pod-update-labels-remove-egress-add-tier.mutate.json",
            "agentvm.dev/egress",
        ),
    ] {
        let out = outcome(name, Mode::Validate);
        assert!(!out.response.allowed, "{name}");
        assert!(
            out.response.message.contains(key),
            "{name}: {}",
            out.response.message
        );
    }
}

#[test]
fn kubectl_debug_on_an_agent_is_denied() {
    for name in [
        "pod-update-ephemeralcontainers-kubectl-debug.mutate.json",
        "pod-update-ephemeralcontainers-kubectl-debug-sysadmin-privileged.validate.json",
    ] {
        let out = outcome(name, Mode::Mutate);
        assert!(!out.response.allowed, "{name}");
        assert!(
            out.response.message.contains("ephemeral containers"),
            "{name}"
        );
    }
}

#[test]
fn connect_without_cluster_access_is_allowed_with_a_warning() {
    for name in [
        "pod-connect-exec.call1.mutate.json",
        "pod-connect-attach.call2.validate.json",
        "pod-connect-portforward.mutate.json",
        "pod-connect-exec-nonexistent-pod.validate.json",
    ] {
        let out = outcome(name, Mode::Validate);
        assert!(out.response.allowed, "{name}");
        assert!(
            out.response
                .warnings
                .iter()
                .any(|w| w.contains("could not look up")),
            "{name}"
        );
    }
}

#[test]
fn workloads_are_patched_under_their_template_only() {
    for (name, template) in [
        (
            "deployment-create-agent-client-side-apply.mutate.json",
            "/spec/template",
        ),
        (
            "statefulset-create-agent-volumeclaimtemplates.mutate.json",
            "/spec/template",
        ),
        ("daemonset-create-agent.mutate.json", "/spec/template"),
        ("job-create-agent.mutate.json", "/spec/template"),
        (
            "cronjob-create-agent.mutate.json",
            "/spec/jobTemplate/spec/template",
        ),
        ("replicaset-create-agent.mutate.json", "/spec/template"),
        (
            "replicationcontroller-create-agent.mutate.json",
            "/spec/template",
        ),
        ("deployment-update-set-image.mutate.json", "/spec/template"),
    ] {
        let out = outcome(name, Mode::Mutate);
        assert!(out.response.allowed, "{name}: {}", out.response.message);
        let ops = decoded_patch(&out).unwrap_or_else(|| panic!("{name}: no patch"));
        for op in ops.as_array().unwrap() {
            let path = op["path"].as_str().unwrap();
            assert!(path.starts_with(&format!("{template}/")), "{name}: {path}");
        }
    }
}

#[test]
fn objects_made_from_a_mutated_template_come_out_unchanged() {
    // The Deployment controller copies the stored template into a ReplicaSet (adding the
    // pod-template-hash label), the ReplicaSet controller into Pods. If the webhook changed
    // either copy, the Deployment controller would see a new template and create ReplicaSets
    // without end.
    let reviewer = reviewer();
    let (_, review) = captures()
        .into_iter()
        .find(|(n, _)| n == "deployment-create-agent-client-side-apply.mutate.json")
        .unwrap();
    let req = request(&review);
    let deployment = mutate_and_check(&reviewer, &req, "deployment").unwrap();
    let mut template = deployment["spec"]["template"].clone();
    template["metadata"]["labels"]["pod-template-hash"] = Value::from("5d4f8b7c9");

    let replicaset = serde_json::json!({
        "apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {"name": "agent-5d4f8b7c9", "namespace": req.namespace,
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": req.name,
                "uid": "7a1c", "controller": true, "blockOwnerDeletion": true}]},
        "spec": {"replicas": 1, "selector": deployment["spec"]["selector"], "template": template},
    });
    let mut pod = serde_json::json!({"apiVersion": "v1", "kind": "Pod", "spec": template["spec"]});
    pod["metadata"] = template["metadata"].clone();
    pod["metadata"]["generateName"] = Value::from("agent-5d4f8b7c9-");
    pod["metadata"]["namespace"] = Value::from(req.namespace.clone());

    for (kind, group, object) in [("ReplicaSet", "apps", replicaset), ("Pod", "", pod)] {
        let review = serde_json::json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "copy", "kind": {"group": group, "version": "v1", "kind": kind},
                "resource": {"group": group, "version": "v1", "resource": format!("{}s", kind.to_lowercase())},
                "namespace": req.namespace, "operation": "CREATE",
                "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
                "object": object}});
        for mode in [Mode::Mutate, Mode::Validate] {
            let out = reviewer.review(mode, &request(&review));
            assert!(out.response.allowed, "{kind}: {}", out.response.message);
            assert!(
                out.response.patch.is_none(),
                "{kind} made from a mutated template was patched: {:?}",
                decoded_patch(&out)
            );
        }
    }
}
