//! Existing workloads: `agentvm audit` says which agents in the cluster meet the profile their
//! policy gives them, and `agentvm adopt` labels workloads as agents and restarts them (the way
//! `kubectl rollout restart` does) so that their new pods pass through the webhook.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{Namespace, Pod, ReplicationController};
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::{json, Map, Value};

use crate::admission::{Facts, Mode, Reviewer};
use crate::keys::{AGENT_LABEL, ENFORCE_LABEL};
use crate::workload::{self, WorkloadKind};

/// Why the cluster could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum ExistingError {
    /// A list or patch failed.
    #[error("{what}: {message}")]
    Api {
        /// What was asked.
        what: String,
        /// What the API server said.
        message: String,
    },
    /// A target is not of the form KIND/NAME with a supported kind.
    #[error("{0}")]
    Target(String),
}

/// One agent workload or pod and whether it meets its profile.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Finding {
    /// Kind of the object.
    pub kind: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The effective profile, when the policy gave one.
    pub profile: Option<String>,
    /// Whether it meets the profile.
    pub compliant: bool,
    /// Why not.
    pub reasons: Vec<String>,
}

async fn list<K>(api: Api<K>, what: &str) -> Result<Vec<Value>, ExistingError>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let items = api
        .list(&ListParams::default())
        .await
        .map_err(|e| ExistingError::Api {
            what: format!("list {what}"),
            message: e.to_string(),
        })?;
    Ok(items
        .items
        .iter()
        .filter_map(|o| serde_json::to_value(o).ok())
        .collect())
}

fn api<K>(client: &kube::Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// The objects of one namespaced kind, with `apiVersion` and `kind` filled in (lists do not
/// repeat them per item). A kind the caller may not list is skipped with a warning.
async fn objects_of<K>(client: &kube::Client, ns: Option<&str>) -> Vec<Value>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let (api_version, kind) = (K::api_version(&()), K::kind(&()));
    match list(api::<K>(client, ns), &K::plural(&())).await {
        Ok(items) => items
            .into_iter()
            .map(|mut o| {
                o["apiVersion"] = json!(api_version);
                o["kind"] = json!(kind);
                o
            })
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "skipped");
            Vec::new()
        }
    }
}

/// Every object that carries a pod.
async fn objects(client: &kube::Client, ns: Option<&str>) -> Vec<Value> {
    let mut all = objects_of::<Pod>(client, ns).await;
    all.extend(objects_of::<Deployment>(client, ns).await);
    all.extend(objects_of::<ReplicaSet>(client, ns).await);
    all.extend(objects_of::<StatefulSet>(client, ns).await);
    all.extend(objects_of::<DaemonSet>(client, ns).await);
    all.extend(objects_of::<Job>(client, ns).await);
    all.extend(objects_of::<CronJob>(client, ns).await);
    all.extend(objects_of::<ReplicationController>(client, ns).await);
    all
}

/// Checks every agent (by label, or by its namespace's `agentvm.dev/enforce`) in `namespace`,
/// or in the whole cluster, against the profile its policy gives it, as `/validate` would on
/// creation. ReplicaSets and Jobs made by a controller are left to their owner.
pub async fn audit(
    client: &kube::Client,
    reviewer: &Reviewer,
    namespace: Option<&str>,
) -> Result<Vec<Finding>, ExistingError> {
    // Namespace labels (for agentvm.dev/enforce) need a cluster-wide list; without the right
    // to it, agents labelled as such are still audited.
    let listed = match list(Api::<Namespace>::all(client.clone()), "namespaces").await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "namespace labels unavailable: agentvm.dev/enforce is not taken into account");
            Vec::new()
        }
    };
    let namespaces: BTreeMap<String, Map<String, Value>> = listed
        .into_iter()
        .filter_map(|n| {
            let name = n.pointer("/metadata/name")?.as_str()?.to_owned();
            let labels = n
                .pointer("/metadata/labels")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            Some((name, labels))
        })
        .collect();
    let excluded = reviewer.policies();
    let mut findings = Vec::new();
    for (index, object) in objects(client, namespace).await.into_iter().enumerate() {
        let Some(kind) = WorkloadKind::of_object(&object) else {
            continue;
        };
        let ns = object
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_owned();
        let labels = namespaces.get(&ns).cloned();
        let enforced = labels
            .as_ref()
            .and_then(|l| l.get(ENFORCE_LABEL))
            .and_then(Value::as_str)
            == Some("true");
        if excluded.settings().is_excluded(&ns) || workload::made_by_controller(&object, kind) {
            continue;
        }
        let labelled_workload = kind != WorkloadKind::Pod
            && object
                .pointer("/metadata/labels")
                .and_then(|l| l.get(AGENT_LABEL))
                .and_then(Value::as_str)
                == Some("true");
        if !(workload::is_agent(&object, kind) || enforced) {
            if labelled_workload {
                // README step one without step two: the webhook locks down templates and pods
                // that carry the label, so these pods run without the profile.
                let name = object
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned();
                findings.push(Finding {
                    kind: kind.name().into(),
                    namespace: ns,
                    name,
                    profile: None,
                    compliant: false,
                    reasons: vec![format!("the workload is labelled {AGENT_LABEL} but its pod template is not: its pods are not agents (run agentvm adopt)")],
                });
            }
            continue;
        }
        let name = object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let request = match crate::offline::to_request(object, index) {
            Ok(r) => r,
            Err(e) => {
                findings.push(Finding {
                    kind: kind.name().into(),
                    namespace: ns,
                    name,
                    profile: None,
                    compliant: false,
                    reasons: vec![e],
                });
                continue;
            }
        };
        let facts = Facts {
            namespace_labels: labels,
            ..Facts::default()
        };
        let out = reviewer.review_with(Mode::Validate, &request, facts);
        let reasons = if out.response.allowed {
            Vec::new()
        } else {
            out.response
                .message
                .split("; ")
                .map(str::to_owned)
                .collect()
        };
        findings.push(Finding {
            kind: kind.name().into(),
            namespace: ns,
            name,
            profile: out.profile.map(|p| p.as_str().to_owned()),
            compliant: out.response.allowed,
            reasons,
        });
    }
    Ok(findings)
}

/// The findings as a table for people.
pub fn audit_table(findings: &[Finding]) -> String {
    let mut out = format!(
        "{:<22} {:<20} {:<36} {:<13} {}\n",
        "KIND", "NAMESPACE", "NAME", "PROFILE", "COMPLIANT"
    );
    for f in findings {
        out.push_str(&format!(
            "{:<22} {:<20} {:<36} {:<13} {}\n",
            f.kind,
            f.namespace,
            f.name,
            f.profile.as_deref().unwrap_or("-"),
            if f.compliant { "yes" } else { "no" }
        ));
        for r in &f.reasons {
            out.push_str(&format!("    - {r}\n"));
        }
    }
    let bad = findings.iter().filter(|f| !f.compliant).count();
    out.push_str(&format!("{} agents, {bad} not compliant\n", findings.len()));
    out
}

/// A workload to adopt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// deployment, statefulset, daemonset, cronjob.
    pub kind: String,
    /// Name.
    pub name: String,
}

impl std::str::FromStr for Target {
    type Err = ExistingError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, name) = s
            .split_once('/')
            .ok_or_else(|| ExistingError::Target(format!("{s:?} is not KIND/NAME")))?;
        // The forms kubectl takes: singular, plural, short name, and KIND.GROUP.
        let kind = match kind.to_lowercase().as_str() {
            "deployment" | "deployments" | "deploy" | "deployment.apps" | "deployments.apps" => {
                "deployment"
            }
            "statefulset" | "statefulsets" | "sts" | "statefulset.apps" | "statefulsets.apps" => {
                "statefulset"
            }
            "daemonset" | "daemonsets" | "ds" | "daemonset.apps" | "daemonsets.apps" => "daemonset",
            "cronjob" | "cronjobs" | "cj" | "cronjob.batch" | "cronjobs.batch" => "cronjob",
            other => {
                return Err(ExistingError::Target(format!(
                    "{other}: adopt takes deployment, statefulset, daemonset or cronjob (pods and \
                     jobs cannot be restarted: recreate them with the label)"
                )))
            }
        };
        let valid_name = !name.is_empty()
            && name.len() <= 253
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
            && !name.starts_with(['-', '.']);
        if !valid_name {
            return Err(ExistingError::Target(format!(
                "{name:?} is not an object name"
            )));
        }
        Ok(Self {
            kind: kind.into(),
            name: name.into(),
        })
    }
}

/// The merge patch that makes a workload an agent and restarts its pods, as `kubectl rollout
/// restart` does (a CronJob's next Jobs pick the label up; nothing to restart).
pub fn adopt_patch(kind: &str, restarted_at: &str) -> Value {
    let template = json!({"metadata": {
        "labels": {AGENT_LABEL: "true"},
        "annotations": {"kubectl.kubernetes.io/restartedAt": restarted_at},
    }});
    let spec = if kind == "cronjob" {
        json!({"jobTemplate": {"spec": {"template": {"metadata": {"labels": {AGENT_LABEL: "true"}}}}}})
    } else {
        json!({"template": template})
    };
    json!({"metadata": {"labels": {AGENT_LABEL: "true"}}, "spec": spec})
}

/// Runs `$body` with `$api` bound to the namespaced API of the adoptable `$kind`.
macro_rules! with_api {
    ($kind:expr, $client:expr, $namespace:expr, |$api:ident| $body:expr) => {
        match $kind {
            "deployment" => {
                let $api = Api::<Deployment>::namespaced($client.clone(), $namespace);
                $body
            }
            "statefulset" => {
                let $api = Api::<StatefulSet>::namespaced($client.clone(), $namespace);
                $body
            }
            "daemonset" => {
                let $api = Api::<DaemonSet>::namespaced($client.clone(), $namespace);
                $body
            }
            _ => {
                let $api = Api::<CronJob>::namespaced($client.clone(), $namespace);
                $body
            }
        }
    };
}

/// Names of the workloads of `kind` in `namespace` matching a label selector.
pub async fn select(
    client: &kube::Client,
    namespace: &str,
    kind: &str,
    selector: &str,
) -> Result<Vec<Target>, ExistingError> {
    let params = ListParams::default().labels(selector);
    let err = |e: kube::Error| ExistingError::Api {
        what: format!("list {kind}s"),
        message: e.to_string(),
    };
    let names: Vec<String> = with_api!(kind, client, namespace, |api| api
        .list(&params)
        .await
        .map_err(err)?
        .items
        .into_iter()
        .filter_map(|o| o.metadata.name)
        .collect());
    Ok(names
        .into_iter()
        .map(|name| Target {
            kind: kind.into(),
            name,
        })
        .collect())
}

/// Applies the adopt patch to one workload.
pub async fn adopt(
    client: &kube::Client,
    namespace: &str,
    target: &Target,
    patch: &Value,
) -> Result<(), ExistingError> {
    let params = PatchParams::default();
    let p = Patch::Merge(patch);
    let err = |e: kube::Error| ExistingError::Api {
        what: format!("patch {}/{}", target.kind, target.name),
        message: e.to_string(),
    };
    with_api!(target.kind.as_str(), client, namespace, |api| api
        .patch(&target.name, &params, &p)
        .await
        .map(drop)
        .map_err(err))
}
