//! Where the pod sits in each workload kind, and whether it is an agent.

use serde_json::Value;

use crate::keys::AGENT_LABEL;

/// A kind that carries a pod or a pod template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkloadKind {
    /// `v1/Pod`: the pod itself.
    Pod,
    /// `apps/v1/Deployment`.
    Deployment,
    /// `apps/v1/ReplicaSet`.
    ReplicaSet,
    /// `apps/v1/StatefulSet`.
    StatefulSet,
    /// `apps/v1/DaemonSet`.
    DaemonSet,
    /// `batch/v1/Job`.
    Job,
    /// `batch/v1/CronJob`: the template is under `spec.jobTemplate`.
    CronJob,
    /// `v1/ReplicationController`.
    ReplicationController,
}

impl WorkloadKind {
    /// The kind for an API group and kind name, if it carries a pod.
    pub fn from_group_kind(group: &str, kind: &str) -> Option<Self> {
        Some(match (group, kind) {
            ("", "Pod") => Self::Pod,
            ("", "ReplicationController") => Self::ReplicationController,
            ("apps", "Deployment") => Self::Deployment,
            ("apps", "ReplicaSet") => Self::ReplicaSet,
            ("apps", "StatefulSet") => Self::StatefulSet,
            ("apps", "DaemonSet") => Self::DaemonSet,
            ("batch", "Job") => Self::Job,
            ("batch", "CronJob") => Self::CronJob,
            _ => return None,
        })
    }

    /// The kind of a bare object from its `apiVersion` and `kind`.
    pub fn of_object(object: &Value) -> Option<Self> {
        let api_version = object.get("apiVersion")?.as_str()?;
        let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
        Self::from_group_kind(group, object.get("kind")?.as_str()?)
    }

    /// JSON pointer of the pod (template) in the object: its `metadata` and `spec` live below.
    pub fn template_pointer(self) -> &'static str {
        match self {
            Self::Pod => "",
            Self::CronJob => "/spec/jobTemplate/spec/template",
            _ => "/spec/template",
        }
    }

    /// The kind's name, as in `kind:`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Pod => "Pod",
            Self::Deployment => "Deployment",
            Self::ReplicaSet => "ReplicaSet",
            Self::StatefulSet => "StatefulSet",
            Self::DaemonSet => "DaemonSet",
            Self::Job => "Job",
            Self::CronJob => "CronJob",
            Self::ReplicationController => "ReplicationController",
        }
    }
}

/// The pod (or template) `metadata` of an object, if there is one.
pub fn pod_metadata(object: &Value, kind: WorkloadKind) -> Option<&Value> {
    object.pointer(&format!("{}/metadata", kind.template_pointer()))
}

/// Whether the pod (or template) carries `agentvm.dev/agent: "true"`, exactly.
pub fn is_agent(object: &Value, kind: WorkloadKind) -> bool {
    pod_metadata(object, kind)
        .and_then(|m| m.get("labels"))
        .and_then(|l| l.get(AGENT_LABEL))
        .and_then(Value::as_str)
        == Some("true")
}

/// Whether a ReplicaSet or Job was made by its controller (a Deployment, a CronJob) from the
/// owner's template.
pub fn made_by_controller(object: &Value, kind: WorkloadKind) -> bool {
    matches!(kind, WorkloadKind::ReplicaSet | WorkloadKind::Job)
        && object
            .pointer("/metadata/ownerReferences")
            .and_then(Value::as_array)
            .is_some_and(|refs| {
                refs.iter()
                    .any(|r| r.get("controller") == Some(&Value::Bool(true)))
            })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn finds_templates_in_every_kind() {
        let cron = json!({"apiVersion": "batch/v1", "kind": "CronJob", "spec": {"jobTemplate":
            {"spec": {"template": {"metadata": {"labels": {"agentvm.dev/agent": "true"}}}}}}});
        let kind = WorkloadKind::of_object(&cron).unwrap();
        assert_eq!(kind, WorkloadKind::CronJob);
        assert!(is_agent(&cron, kind));
        let rc = json!({"apiVersion": "v1", "kind": "ReplicationController"});
        assert_eq!(
            WorkloadKind::of_object(&rc),
            Some(WorkloadKind::ReplicationController)
        );
        assert_eq!(
            WorkloadKind::of_object(&json!({"apiVersion": "v1", "kind": "Service"})),
            None
        );
        assert_eq!(
            WorkloadKind::from_group_kind("extensions", "Deployment"),
            None
        );
    }

    #[test]
    fn only_the_exact_string_true_marks_an_agent() {
        for (value, agent) in [
            (json!("true"), true),
            (json!("True"), false),
            (json!(true), false),
        ] {
            let pod = json!({"metadata": {"labels": {"agentvm.dev/agent": value}}});
            assert_eq!(is_agent(&pod, WorkloadKind::Pod), agent);
        }
        assert!(!is_agent(&json!({}), WorkloadKind::Pod));
        assert!(!is_agent(
            &json!({"spec": {"template": null}}),
            WorkloadKind::Deployment
        ));
    }
}
