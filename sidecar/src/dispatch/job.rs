//! The Job of one exec request: argv run (no shell unless argv names one) by the runner
//! (`agentvm-sidecar run`) in a pod hardened the way the webhook hardens exec pods, labelled
//! `agentvm.dev/role: exec` so that the exec-isolation NetworkPolicy (deny-all egress, ingress
//! from agents only) selects it. It does not carry `agentvm.dev/egress: deny`: that would add the
//! agents' own allowances (DNS, exec services, tool CIDRs), since NetworkPolicies add up.
//!
//! The runner comes from the sidecar image: an init container copies it into an `emptyDir`,
//! which the command's container (the tools image) mounts read-only and runs as its command. The
//! runner feeds the command its standard input, captures standard output and standard error
//! apart (each capped), kills everything the command started, and writes one report line to the
//! container log. Standard input travels in a Secret that the dispatcher creates for the Job,
//! owned by it (so the garbage collector deletes it with the Job), mounted as a file.
//!
//! The kubelet expands `$(NAME)` in a container's `command`, `args` and env values and turns
//! `$$` into `$`: every `$` the dispatcher writes there is doubled (`literal`), so that the
//! command gets its arguments and variables exactly as the request gave them.

use std::collections::BTreeMap;
use std::path::{Component, Path};
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Secret;
use serde_json::json;

use crate::exec::command::{ExecRequest, RequestError};
use crate::exec::runner;

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
/// Name of the init container that puts the runner into the pod.
pub const RUNNER_CONTAINER: &str = "agentvm-runner";
/// Under which the pod mounts the runner and standard input: the working directory must not be
/// there, nor at `/tmp`.
pub const RESERVED_DIR: &str = "/agentvm";
/// Where the runner's volume is mounted, in both containers.
pub const RUNNER_DIR: &str = "/agentvm/runner";
/// The runner, as the command's container runs it.
pub const RUNNER_PATH: &str = "/agentvm/runner/agentvm-sidecar";
/// Where the stdin Secret is mounted.
pub const STDIN_DIR: &str = "/agentvm/stdin";
/// Key of the request's standard input in its Secret, and so the file's name.
pub const STDIN_KEY: &str = "stdin";
/// The most standard input a Job can be given: a Secret holds at most 1 MiB of data.
pub const MAX_STDIN_BYTES: usize = 1 << 20;
/// Prefix of Job names; the API server appends a random suffix.
pub const NAME_PREFIX: &str = "agentvm-exec-";
/// User and group the command runs as (the distroless `nonroot` user).
pub const RUN_AS: i64 = 65532;

/// What every Job of one dispatcher shares.
#[derive(Debug, Clone)]
pub struct Template {
    /// Image of the command's container.
    pub image: String,
    /// Image whose `agentvm-sidecar` (on its PATH) is copied into the pod to run the command:
    /// the sidecar image.
    pub runner_image: String,
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
    /// Cap on each of standard output and standard error, in bytes.
    pub max_output_bytes: usize,
}

/// Why a request cannot become a Job. Each is an HTTP 400 with this message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    /// The checks shared with the exec server.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// More standard input than a Secret can hold.
    #[error("stdin is larger than {max} bytes, the most a Job can be given")]
    StdinTooLarge {
        /// The largest allowed.
        max: usize,
    },
}

/// A request that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Working directory inside the scratch volume.
    pub cwd: String,
    /// The request's variables, added to the base environment (they win over it).
    pub env: Vec<(String, String)>,
    /// Time limit.
    pub timeout: Duration,
    /// Standard input, when there is some.
    pub stdin: Option<Vec<u8>>,
}

impl Template {
    /// Checks `request` the way the exec server does, with `cwd` resolved inside the scratch
    /// working directory and `stdin` no larger than a Secret holds.
    pub fn plan(&self, request: ExecRequest) -> Result<Plan, PlanError> {
        let stdin = request
            .stdin
            .map(String::into_bytes)
            .filter(|s| !s.is_empty());
        if stdin.as_ref().is_some_and(|s| s.len() > MAX_STDIN_BYTES) {
            return Err(PlanError::StdinTooLarge {
                max: MAX_STDIN_BYTES,
            });
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
        let mut env = Vec::with_capacity(request.env.len());
        for (k, v) in request.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(RequestError::EnvName(k).into());
            }
            if v.contains('\0') {
                return Err(RequestError::Nul("an environment value").into());
            }
            env.push((k, v));
        }
        let cwd = self.cwd(request.cwd.as_deref())?;
        Ok(Plan {
            argv: request.argv,
            cwd,
            env,
            timeout,
            stdin,
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

    /// The Job that runs `plan` for the request `request_id` (a label value), reading its
    /// standard input from the Secret `stdin_secret` (see [`Template::stdin_secret`]) when
    /// there is one.
    pub fn job(
        &self,
        plan: &Plan,
        request_id: &str,
        stdin_secret: Option<&str>,
    ) -> Result<Job, serde_json::Error> {
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
        // The base environment is the container's, so the runner has it too; the request's
        // variables are given to the runner for the command only.
        let env: Vec<_> = self
            .base_env
            .iter()
            .map(|(name, value)| json!({"name": name, "value": literal(value)}))
            .collect();
        let mut command = vec![
            RUNNER_PATH.to_owned(),
            runner::SUBCOMMAND.to_owned(),
            "--timeout-ms".to_owned(),
            plan.timeout.as_millis().max(1).to_string(),
            "--max-output-bytes".to_owned(),
            self.max_output_bytes.to_string(),
        ];
        let mut mounts = vec![
            json!({"name": "tmp", "mountPath": "/tmp"}),
            json!({"name": "work", "mountPath": self.workdir}),
            json!({"name": "runner", "mountPath": RUNNER_DIR, "readOnly": true}),
        ];
        let mut volumes = vec![
            json!({"name": "tmp", "emptyDir": scratch}),
            json!({"name": "work", "emptyDir": scratch}),
            json!({"name": "runner", "emptyDir": {}}),
        ];
        if let Some(secret) = stdin_secret {
            command.extend([
                "--stdin-file".to_owned(),
                format!("{STDIN_DIR}/{STDIN_KEY}"),
            ]);
            mounts.push(json!({"name": "stdin", "mountPath": STDIN_DIR, "readOnly": true}));
            // Owner root, group fsGroup: readable by the runner's group only.
            volumes.push(json!({"name": "stdin", "secret": {
                "secretName": secret, "defaultMode": 0o440, "optional": false}}));
        }
        command.extend(plan.env.iter().map(|(k, v)| format!("--env={k}={v}")));
        command.push("--".to_owned());
        command.extend(plan.argv.iter().cloned());
        let command: Vec<String> = command.iter().map(|word| literal(word)).collect();
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
                        "initContainers": [{
                            "name": RUNNER_CONTAINER,
                            "image": self.runner_image,
                            "command": ["agentvm-sidecar", "install-runner", RUNNER_PATH],
                            "securityContext": container_security,
                            "resources": resources,
                            "volumeMounts": [{"name": "runner", "mountPath": RUNNER_DIR}],
                        }],
                        "containers": [{
                            "name": CONTAINER,
                            "image": self.image,
                            "command": command,
                            "workingDir": plan.cwd,
                            "env": env,
                            "securityContext": container_security,
                            "resources": resources,
                            "volumeMounts": mounts,
                        }],
                        "volumes": volumes,
                    },
                },
            },
        }))
    }

    /// The Secret `name` that holds `stdin` for the Job `job` (as the API server answered its
    /// creation), owned by it: deleting the Job deletes it. Whoever may read Secrets in the
    /// namespace can read it until then.
    pub fn stdin_secret(
        &self,
        name: &str,
        job: &Job,
        request_id: &str,
        stdin: &[u8],
    ) -> Result<Secret, serde_json::Error> {
        let mut labels = self.labels();
        labels.remove(ROLE_LABEL);
        labels.insert(REQUEST_LABEL, request_id.to_owned());
        let owner = json!({
            "apiVersion": "batch/v1",
            "kind": "Job",
            "name": job.metadata.name,
            "uid": job.metadata.uid,
        });
        serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "labels": labels, "ownerReferences": [owner]},
            "type": "Opaque",
            "immutable": true,
            "data": {STDIN_KEY: k8s_openapi::ByteString(stdin.to_vec())},
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

/// `text` written so that the kubelet's expansion of a container's `command`, `args` and env
/// values gives it back unchanged: each `$` doubled (`$$` is how that expansion writes a `$`, and
/// no `$(NAME)` is left to replace).
fn literal(text: &str) -> String {
    text.replace('$', "$$")
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
            runner_image: "registry.example.com/agentvm-sidecar:1".into(),
            dispatcher: "agent-7f9c".into(),
            workdir: "/workspace".into(),
            base_env: vec![("PATH".into(), "/bin".into()), ("HOME".into(), "/w".into())],
            default_timeout: Duration::from_secs(30),
            max_timeout: Duration::from_secs(600),
            ttl_seconds: 300,
            cpu: None,
            memory: None,
            scratch_size: None,
            max_output_bytes: 1000,
        }
    }

    fn plan(body: serde_json::Value) -> Result<Plan, PlanError> {
        template().plan(serde_json::from_value(body).unwrap())
    }

    #[test]
    fn checks_like_the_exec_server_and_bounds_stdin() {
        let large = "x".repeat(MAX_STDIN_BYTES + 1);
        assert_eq!(
            plan(json!({"argv": ["cat"], "stdin": large})),
            Err(PlanError::StdinTooLarge {
                max: MAX_STDIN_BYTES
            })
        );
        let full = "x".repeat(MAX_STDIN_BYTES);
        let ok = plan(json!({"argv": ["cat"], "stdin": full})).unwrap();
        assert_eq!(ok.stdin.map(|s| s.len()), Some(MAX_STDIN_BYTES));
        let empty = plan(json!({"argv": ["cat"], "stdin": ""})).unwrap();
        assert_eq!(empty.stdin, None, "no Secret for nothing");
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
        assert_eq!(ok.env, [("HOME".into(), "/h".into())]);
        let abs = plan(json!({"argv": ["x"], "cwd": "/workspace/a"})).unwrap();
        assert_eq!(abs.cwd, "/workspace/a");
    }

    #[test]
    fn the_job_is_hardened_labelled_and_bounded() {
        let t = template();
        let p =
            plan(json!({"argv": ["ls", "-l"], "timeout_ms": 1500, "env": {"HOME": "/h"}})).unwrap();
        let job = serde_json::to_value(t.job(&p, "r1", None).unwrap()).unwrap();
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
        assert_eq!(
            c["command"],
            json!([
                RUNNER_PATH,
                "run",
                "--timeout-ms",
                "1500",
                "--max-output-bytes",
                "1000",
                "--env=HOME=/h",
                "--",
                "ls",
                "-l"
            ])
        );
        assert_eq!(
            c["env"],
            json!([{"name": "PATH", "value": "/bin"}, {"name": "HOME", "value": "/w"}])
        );
        assert!(c.get("args").is_none() && c.get("stdin").is_none());
        assert_eq!(c["workingDir"], "/workspace");
        let init = &pod["initContainers"][0];
        assert_eq!(init["name"], RUNNER_CONTAINER);
        assert_eq!(init["image"], "registry.example.com/agentvm-sidecar:1");
        assert_eq!(
            init["command"],
            json!(["agentvm-sidecar", "install-runner", RUNNER_PATH])
        );
        assert_eq!(
            init["volumeMounts"],
            json!([{"name": "runner", "mountPath": "/agentvm/runner"}])
        );
        for c in [c, init] {
            let sc = &c["securityContext"];
            assert_eq!(sc["allowPrivilegeEscalation"], false);
            assert_eq!(sc["readOnlyRootFilesystem"], true);
            assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
            assert_eq!(sc["runAsUser"], RUN_AS);
            assert_eq!(c["resources"], json!({}));
        }
        let mounts: Vec<(&str, bool)> = c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| (m["mountPath"].as_str().unwrap(), m["readOnly"] == true))
            .collect();
        assert_eq!(
            mounts,
            [
                ("/tmp", false),
                ("/workspace", false),
                ("/agentvm/runner", true)
            ]
        );
        assert!(pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["emptyDir"] == json!({})));

        let bounded = Template {
            cpu: Some("500m".into()),
            memory: Some("256Mi".into()),
            scratch_size: Some("1Gi".into()),
            ..template()
        };
        let job = serde_json::to_value(bounded.job(&p, "r2", None).unwrap()).unwrap();
        let pod = &job["spec"]["template"]["spec"];
        let both = json!({"cpu": "500m", "memory": "256Mi"});
        assert_eq!(
            pod["containers"][0]["resources"],
            json!({"requests": both, "limits": both})
        );
        assert_eq!(pod["volumes"][0]["emptyDir"], json!({"sizeLimit": "1Gi"}));
        assert_eq!(pod["volumes"][1]["emptyDir"], json!({"sizeLimit": "1Gi"}));
        assert_eq!(pod["volumes"][2]["emptyDir"], json!({}), "the runner's");
        assert_eq!(
            bounded.request_selector("r2"),
            "agentvm.dev/dispatcher=agent-7f9c,agentvm.dev/exec-id=r2"
        );
    }

    #[test]
    fn stdin_goes_in_a_secret_owned_by_the_job_and_mounted_for_the_runner() {
        let t = template();
        let p = plan(json!({"argv": ["cat"], "stdin": "hello"})).unwrap();
        let job = t.job(&p, "r3", Some("agentvm-exec-stdin-0a1b")).unwrap();
        let value = serde_json::to_value(&job).unwrap();
        let pod = &value["spec"]["template"]["spec"];
        let c = &pod["containers"][0];
        let command: Vec<&str> = c["command"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(
            command[6..],
            ["--stdin-file", "/agentvm/stdin/stdin", "--", "cat"]
        );
        assert_eq!(
            c["volumeMounts"][3],
            json!({"name": "stdin", "mountPath": "/agentvm/stdin", "readOnly": true})
        );
        assert_eq!(
            pod["volumes"][3],
            json!({"name": "stdin", "secret": {"secretName": "agentvm-exec-stdin-0a1b",
                "defaultMode": 0o440, "optional": false}})
        );

        let mut created = job;
        created.metadata.name = Some("agentvm-exec-x7k2p".into());
        created.metadata.uid = Some("uid-1".into());
        let secret = t
            .stdin_secret("agentvm-exec-stdin-0a1b", &created, "r3", b"hello")
            .unwrap();
        let secret = serde_json::to_value(secret).unwrap();
        assert_eq!(
            secret["metadata"],
            json!({"name": "agentvm-exec-stdin-0a1b",
                "labels": {"agentvm.dev/dispatcher": "agent-7f9c", "agentvm.dev/exec-id": "r3",
                    "app.kubernetes.io/managed-by": "agentvm-dispatcher"},
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job",
                    "name": "agentvm-exec-x7k2p", "uid": "uid-1"}]})
        );
        assert_eq!(secret["data"], json!({"stdin": "aGVsbG8="}));
        assert_eq!(secret["immutable"], true);
    }

    #[test]
    fn every_dollar_in_the_command_and_the_environment_is_doubled() {
        let t = Template {
            base_env: vec![("PATH".into(), "/opt/$(X)/bin".into())],
            ..template()
        };
        let p = plan(json!({"argv": ["sh", "-c", "echo $$ $(HOME) $", "$$(A)"],
            "env": {"GREETING": "$(PATH)"}}))
        .unwrap();
        let job = serde_json::to_value(t.job(&p, "r4", None).unwrap()).unwrap();
        let c = &job["spec"]["template"]["spec"]["containers"][0];
        let command: Vec<&str> = c["command"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(
            command[6..],
            [
                "--env=GREETING=$$(PATH)",
                "--",
                "sh",
                "-c",
                "echo $$$$ $$(HOME) $$",
                "$$$$(A)"
            ]
        );
        assert_eq!(
            c["env"],
            json!([{"name": "PATH", "value": "/opt/$$(X)/bin"}])
        );
        assert_eq!(c["workingDir"], "/workspace", "not expanded by the kubelet");
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
