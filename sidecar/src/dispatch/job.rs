//! The Job of one exec request: argv run directly (no shell unless argv names one) in a pod
//! hardened the way the webhook hardens exec pods, labelled `agentvm.dev/role: exec` so that the
//! exec-isolation NetworkPolicy (deny-all egress, ingress from agents only) selects it. It does
//! not carry `agentvm.dev/egress: deny`: that would add the agents' own allowances (DNS, exec
//! services, tool CIDRs), since NetworkPolicies add up.

use std::collections::BTreeMap;
use std::path::{Component, Path};
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use serde_json::json;

use crate::exec::command::{ExecRequest, RequestError};

/// Label of exec pods and dispatcher Jobs.
pub const ROLE_LABEL: &str = "agentvm.dev/role";
/// Label naming the dispatcher that created a Job, so it can find its own orphans.
pub const DISPATCHER_LABEL: &str = "agentvm.dev/dispatcher";
/// Label naming the request a Job serves, to find a Job whose creation went unanswered.
pub const REQUEST_LABEL: &str = "agentvm.dev/exec-id";
/// Label the Job controller puts on the pods of a Job.
pub const JOB_NAME_LABEL: &str = "job-name";
/// Name of the container that runs the command.
pub const CONTAINER: &str = "exec";
/// Prefix of Job names; the API server appends a random suffix.
pub const NAME_PREFIX: &str = "agentvm-exec-";
/// User and group the command runs as (the distroless `nonroot` user).
pub const RUN_AS: i64 = 65532;

/// What every Job of one dispatcher shares.
#[derive(Debug, Clone)]
pub struct Template {
    /// Image of the command's container.
    pub image: String,
    /// Value of [`DISPATCHER_LABEL`].
    pub dispatcher: String,
    /// Working directory, an empty scratch volume.
    pub workdir: String,
    /// Environment of every command; request variables win over it.
    pub base_env: Vec<(String, String)>,
    /// Time limit when the request sets none.
    pub default_timeout: Duration,
    /// Largest time limit a request may ask for.
    pub max_timeout: Duration,
    /// Seconds a finished Job is kept if the dispatcher fails to delete it.
    pub ttl_seconds: i32,
    /// CPU request and limit of the container (a Kubernetes quantity); none when unset.
    pub cpu: Option<String>,
    /// Memory request and limit of the container; none when unset.
    pub memory: Option<String>,
    /// Size limit of each scratch volume (`/tmp` and the working directory); none when unset.
    pub scratch_size: Option<String>,
}

/// Why a request cannot become a Job. Each is an HTTP 400 with this message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    /// The checks shared with the exec server.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// Standard input cannot reach a Job's container.
    #[error("stdin is not supported by the dispatcher")]
    Stdin,
}

/// A request that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Working directory inside the scratch volume.
    pub cwd: String,
    /// The complete environment.
    pub env: Vec<(String, String)>,
    /// Time limit.
    pub timeout: Duration,
}

impl Template {
    /// Checks `request` the way the exec server does, with `stdin` refused and `cwd` resolved
    /// inside the scratch working directory.
    pub fn plan(&self, request: ExecRequest) -> Result<Plan, PlanError> {
        if request.stdin.is_some() {
            return Err(PlanError::Stdin);
        }
        if request.argv.first().is_none_or(String::is_empty) {
            return Err(RequestError::NoProgram.into());
        }
        if request.argv.iter().any(|a| a.contains('\0')) {
            return Err(RequestError::Nul("argv").into());
        }
        let max = u64::try_from(self.max_timeout.as_millis()).unwrap_or(u64::MAX);
        let timeout = match request.timeout_ms {
            None => self.default_timeout,
            Some(ms) if ms == 0 || ms > max => return Err(RequestError::Timeout { max }.into()),
            Some(ms) => Duration::from_millis(ms),
        };
        let mut env = self.base_env.clone();
        for (k, v) in request.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(RequestError::EnvName(k).into());
            }
            if v.contains('\0') {
                return Err(RequestError::Nul("an environment value").into());
            }
            env.retain(|(name, _)| *name != k);
            env.push((k, v));
        }
        let cwd = self.cwd(request.cwd.as_deref())?;
        Ok(Plan {
            argv: request.argv,
            cwd,
            env,
            timeout,
        })
    }

    /// `cwd` relative to the working directory (or absolute inside it), without `..`.
    fn cwd(&self, cwd: Option<&str>) -> Result<String, RequestError> {
        let root = Path::new(&self.workdir);
        let Some(cwd) = cwd else {
            return Ok(self.workdir.clone());
        };
        let refuse = |reason| RequestError::Cwd {
            cwd: cwd.to_owned(),
            reason,
        };
        if cwd.contains('\0') {
            return Err(RequestError::Nul("cwd"));
        }
        let path = Path::new(cwd);
        if path.components().any(|c| c == Component::ParentDir) {
            return Err(refuse("must not contain .."));
        }
        let joined = root.join(path);
        if !joined.starts_with(root) {
            return Err(refuse("is outside the workspace"));
        }
        // Drops `.` components and trailing slashes.
        let clean: std::path::PathBuf = joined.components().collect();
        Ok(clean.display().to_string())
    }

    /// The Job that runs `plan` for the request `request_id` (a label value).
    pub fn job(&self, plan: &Plan, request_id: &str) -> Result<Job, serde_json::Error> {
        let labels = self.labels();
        let mut job_labels = labels.clone();
        job_labels.insert(REQUEST_LABEL, request_id.to_owned());
        let mut resources = serde_json::Map::new();
        for (name, value) in [("cpu", &self.cpu), ("memory", &self.memory)] {
            if let Some(value) = value {
                resources.insert(name.to_owned(), json!(value));
            }
        }
        let resources = if resources.is_empty() {
            json!({})
        } else {
            json!({"requests": resources, "limits": resources})
        };
        let scratch = match &self.scratch_size {
            Some(size) => json!({"sizeLimit": size}),
            None => json!({}),
        };
        let env: Vec<_> = plan
            .env
            .iter()
            .map(|(name, value)| json!({"name": name, "value": value}))
            .collect();
        let seconds = plan.timeout.as_millis().div_ceil(1000).max(1);
        let deadline = i64::try_from(seconds).unwrap_or(i64::MAX);
        let pod_security = json!({
            "runAsNonRoot": true,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "fsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"},
        });
        let container_security = json!({
            "runAsNonRoot": true,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "allowPrivilegeEscalation": false,
            "privileged": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        });
        serde_json::from_value(json!({
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"generateName": NAME_PREFIX, "labels": job_labels},
            "spec": {
                "backoffLimit": 0,
                "completions": 1,
                "parallelism": 1,
                "activeDeadlineSeconds": deadline,
                "ttlSecondsAfterFinished": self.ttl_seconds,
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "restartPolicy": "Never",
                        "automountServiceAccountToken": false,
                        "enableServiceLinks": false,
                        // A command past its deadline gets one second after SIGTERM.
                        "terminationGracePeriodSeconds": 1,
                        "securityContext": pod_security,
                        "containers": [{
                            "name": CONTAINER,
                            "image": self.image,
                            "command": plan.argv,
                            "workingDir": plan.cwd,
                            "env": env,
                            "securityContext": container_security,
                            "resources": resources,
                            "volumeMounts": [
                                {"name": "tmp", "mountPath": "/tmp"},
                                {"name": "work", "mountPath": self.workdir},
                            ],
                        }],
                        "volumes": [
                            {"name": "tmp", "emptyDir": scratch},
                            {"name": "work", "emptyDir": scratch},
                        ],
                    },
                },
            },
        }))
    }

    /// Labels of the Job and of its pod.
    pub fn labels(&self) -> BTreeMap<&'static str, String> {
        BTreeMap::from([
            (ROLE_LABEL, "exec".to_owned()),
            (DISPATCHER_LABEL, self.dispatcher.clone()),
            (
                "app.kubernetes.io/managed-by",
                "agentvm-dispatcher".to_owned(),
            ),
        ])
    }

    /// The label selector of this dispatcher's Jobs.
    pub fn selector(&self) -> String {
        format!("{DISPATCHER_LABEL}={}", self.dispatcher)
    }

    /// The label selector of the Job of the request `request_id`.
    pub fn request_selector(&self, request_id: &str) -> String {
        format!("{},{REQUEST_LABEL}={request_id}", self.selector())
    }
}

/// Whether `value` is a valid label value (63 characters at most, alphanumeric at both ends,
/// `-`, `_` and `.` inside).
pub fn is_label_value(value: &str) -> bool {
    let bytes = value.as_bytes();
    !value.is_empty()
        && value.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(b))
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn template() -> Template {
        Template {
            image: "registry.example.com/tools:1".into(),
            dispatcher: "agent-7f9c".into(),
            workdir: "/workspace".into(),
            base_env: vec![("PATH".into(), "/bin".into()), ("HOME".into(), "/w".into())],
            default_timeout: Duration::from_secs(30),
            max_timeout: Duration::from_secs(600),
            ttl_seconds: 300,
            cpu: None,
            memory: None,
            scratch_size: None,
        }
    }

    fn plan(body: serde_json::Value) -> Result<Plan, PlanError> {
        template().plan(serde_json::from_value(body).unwrap())
    }

    #[test]
    fn checks_like_the_exec_server_and_refuses_stdin() {
        assert_eq!(
            plan(json!({"argv": ["cat"], "stdin": "x"})),
            Err(PlanError::Stdin)
        );
        assert_eq!(
            plan(json!({"argv": []})),
            Err(RequestError::NoProgram.into())
        );
        assert_eq!(
            plan(json!({"argv": ["x"], "timeout_ms": 600_001})),
            Err(RequestError::Timeout { max: 600_000 }.into())
        );
        assert_eq!(
            plan(json!({"argv": ["x"], "env": {"A=B": "1"}})),
            Err(RequestError::EnvName("A=B".into()).into())
        );
        for cwd in ["..", "a/../..", "/etc", "/workspace/../etc"] {
            assert!(
                matches!(
                    plan(json!({"argv": ["x"], "cwd": cwd})),
                    Err(PlanError::Request(RequestError::Cwd { .. }))
                ),
                "{cwd}"
            );
        }
        let ok = plan(json!({"argv": ["x"], "cwd": "./src/", "env": {"HOME": "/h"}})).unwrap();
        assert_eq!(ok.cwd, "/workspace/src");
        assert_eq!(ok.timeout, Duration::from_secs(30));
        assert_eq!(
            ok.env,
            [("PATH".into(), "/bin".into()), ("HOME".into(), "/h".into())]
        );
        let abs = plan(json!({"argv": ["x"], "cwd": "/workspace/a"})).unwrap();
        assert_eq!(abs.cwd, "/workspace/a");
    }

    #[test]
    fn the_job_is_hardened_labelled_and_bounded() {
        let t = template();
        let p = plan(json!({"argv": ["ls", "-l"], "timeout_ms": 1500})).unwrap();
        let job = serde_json::to_value(t.job(&p, "r1").unwrap()).unwrap();
        let mut labels = json!({"agentvm.dev/role": "exec",
            "agentvm.dev/dispatcher": "agent-7f9c",
            "app.kubernetes.io/managed-by": "agentvm-dispatcher"});
        let pod_labels = labels.clone();
        labels[REQUEST_LABEL] = json!("r1");
        assert_eq!(job["metadata"]["labels"], labels);
        assert_eq!(job["metadata"]["generateName"], NAME_PREFIX);
        let spec = &job["spec"];
        assert_eq!(spec["backoffLimit"], 0);
        assert_eq!(spec["activeDeadlineSeconds"], 2, "rounded up");
        assert_eq!(spec["ttlSecondsAfterFinished"], 300);
        let pod = &spec["template"]["spec"];
        assert_eq!(spec["template"]["metadata"]["labels"], pod_labels);
        assert_eq!(pod["restartPolicy"], "Never");
        assert_eq!(pod["automountServiceAccountToken"], false);
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        assert_eq!(pod["securityContext"]["runAsUser"], RUN_AS);
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );
        let c = &pod["containers"][0];
        assert_eq!(c["command"], json!(["ls", "-l"]));
        assert!(c.get("args").is_none() && c.get("stdin").is_none());
        assert_eq!(c["workingDir"], "/workspace");
        let sc = &c["securityContext"];
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
        assert_eq!(sc["runAsUser"], RUN_AS);
        let mounts: Vec<&str> = c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["mountPath"].as_str().unwrap())
            .collect();
        assert_eq!(mounts, ["/tmp", "/workspace"]);
        assert!(pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["emptyDir"] == json!({})));
        assert_eq!(c["resources"], json!({}));

        let bounded = Template {
            cpu: Some("500m".into()),
            memory: Some("256Mi".into()),
            scratch_size: Some("1Gi".into()),
            ..template()
        };
        let job = serde_json::to_value(bounded.job(&p, "r2").unwrap()).unwrap();
        let pod = &job["spec"]["template"]["spec"];
        let both = json!({"cpu": "500m", "memory": "256Mi"});
        assert_eq!(
            pod["containers"][0]["resources"],
            json!({"requests": both, "limits": both})
        );
        assert_eq!(pod["volumes"][0]["emptyDir"], json!({"sizeLimit": "1Gi"}));
        assert_eq!(pod["volumes"][1]["emptyDir"], json!({"sizeLimit": "1Gi"}));
        assert_eq!(
            bounded.request_selector("r2"),
            "agentvm.dev/dispatcher=agent-7f9c,agentvm.dev/exec-id=r2"
        );
    }

    #[test]
    fn label_values_are_checked() {
        assert!(is_label_value("agent-7f9c-x2"));
        assert!(!is_label_value(""));
        assert!(!is_label_value("-a"));
        assert!(!is_label_value("a/b"));
        assert!(!is_label_value(&"a".repeat(64)));
    }
}
