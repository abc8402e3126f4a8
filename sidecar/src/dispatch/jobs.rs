//! What the dispatcher asks of the Kubernetes API: create a Job (and the Secret of its standard
//! input), watch it to its end, read its pod's exit code and log, delete it. Every call is
//! bounded by a time limit.

use std::future::Future;
use std::time::Duration;

use futures_util::io::AsyncReadExt;
use futures_util::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod, Secret};
use kube::api::{DeleteParams, ListParams, LogParams, PostParams, WatchEvent, WatchParams};
use kube::Api;
use tokio::time::Instant;

use super::job::{CONTAINER, JOB_NAME_LABEL, RUNNER_CONTAINER};

/// The longest a single watch request asks the API server to stay open, in seconds.
const MAX_WATCH_SECS: u64 = 290;
/// Pause before watching again after a watch ended without the Job ending.
const REWATCH_PAUSE: Duration = Duration::from_millis(200);
/// Waiting reasons of a container that will not start without someone changing something:
/// the Job would only sit there until its deadline.
const STUCK: [&str; 4] = [
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
];

/// A failed call to the Kubernetes API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The API server answered with an error status.
    #[error("kubernetes API refused to {action}: {message} ({code})")]
    Refused {
        /// What was asked.
        action: &'static str,
        /// HTTP status.
        code: u16,
        /// The API server's message.
        message: String,
    },
    /// The API server could not be reached or its answer could not be read.
    #[error("kubernetes API unreachable to {action}: {source}")]
    Unreachable {
        /// What was asked.
        action: &'static str,
        /// The failure.
        #[source]
        source: kube::Error,
    },
    /// No answer within the time limit.
    #[error("kubernetes API did not {action} within {}ms", after.as_millis())]
    Timeout {
        /// What was asked.
        action: &'static str,
        /// The time limit.
        after: Duration,
    },
    /// The Job disappeared before it ended (deleted by someone else).
    #[error("job {0} was deleted before it finished")]
    Vanished(String),
}

/// How a Job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEnd {
    /// Condition `Complete`: the command exited 0.
    Complete,
    /// Condition `Failed` with reason `DeadlineExceeded`.
    DeadlineExceeded,
    /// Condition `Failed` for another reason (the command failed or could not start).
    Failed(String),
    /// A container waits for something that will not come (an image that cannot be pulled).
    Stuck {
        /// The container (the runner's init container or the command's).
        container: String,
        /// The waiting reason (`ImagePullBackOff`, ...).
        reason: String,
        /// The kubelet's message.
        message: String,
    },
}

/// The state of the command's container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Terminated {
    /// Name of the pod.
    pub pod: String,
    /// The container ended.
    pub ended: bool,
    /// Exit code, as Kubernetes reports it.
    pub exit_code: Option<i32>,
    /// Signal, when the runtime reports one.
    pub signal: Option<i32>,
    /// Reason (`Completed`, `Error`, `StartError`, ...).
    pub reason: String,
    /// Message of the runtime (why a container could not start).
    pub message: String,
    /// How the runner's init container failed, when it did.
    pub runner_install: Option<String>,
}

/// The Jobs and pods of one namespace.
#[derive(Clone)]
pub struct Jobs {
    jobs: Api<Job>,
    pods: Api<Pod>,
    secrets: Api<Secret>,
    api_timeout: Duration,
}

impl std::fmt::Debug for Jobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jobs")
            .field("api_timeout", &self.api_timeout)
            .finish_non_exhaustive()
    }
}

impl Jobs {
    /// Jobs in `namespace`; each call gets at most `api_timeout`.
    pub fn new(client: kube::Client, namespace: &str, api_timeout: Duration) -> Self {
        Self {
            jobs: Api::namespaced(client.clone(), namespace),
            pods: Api::namespaced(client.clone(), namespace),
            secrets: Api::namespaced(client, namespace),
            api_timeout,
        }
    }

    /// The time limit of each call.
    pub fn api_timeout(&self) -> Duration {
        self.api_timeout
    }

    async fn bounded<T>(
        &self,
        action: &'static str,
        call: impl Future<Output = kube::Result<T>>,
    ) -> Result<T, ApiError> {
        match tokio::time::timeout(self.api_timeout, call).await {
            Err(_) => Err(ApiError::Timeout {
                action,
                after: self.api_timeout,
            }),
            Ok(Err(kube::Error::Api(status))) => Err(ApiError::Refused {
                action,
                code: status.code,
                message: status.message,
            }),
            Ok(Err(source)) => Err(ApiError::Unreachable { action, source }),
            Ok(Ok(v)) => Ok(v),
        }
    }

    /// Creates `job`; the answer carries its generated name and resource version.
    pub async fn create(&self, job: &Job) -> Result<Job, ApiError> {
        self.bounded(
            "create a job",
            self.jobs.create(&PostParams::default(), job),
        )
        .await
    }

    /// Creates `secret` (the standard input of a Job, owned by it).
    pub async fn create_secret(&self, secret: &Secret) -> Result<(), ApiError> {
        self.bounded(
            "create a secret",
            self.secrets.create(&PostParams::default(), secret),
        )
        .await
        .map(drop)
    }

    /// Waits until the Job `name` ends, watching from `version`; `None` when `bound` passed
    /// first. Its pod is watched too, to give up early on a container that cannot start.
    pub async fn wait(
        &self,
        name: &str,
        mut version: String,
        bound: Duration,
    ) -> Result<Option<JobEnd>, ApiError> {
        let deadline = Instant::now() + bound;
        let fields = format!("metadata.name={name}");
        let secs = |deadline: Instant| {
            let remaining = deadline.saturating_duration_since(Instant::now());
            remaining.as_secs().clamp(1, MAX_WATCH_SECS) as u32
        };
        // Best effort: without the pod watch the Job still ends at its deadline.
        let pod_params = WatchParams::default()
            .labels(&format!("{JOB_NAME_LABEL}={name}"))
            .timeout(secs(deadline));
        let mut pods = self
            .bounded("watch the pods of a job", self.pods.watch(&pod_params, "0"))
            .await
            .ok()
            .map(Box::pin);
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Ok(None);
            }
            let params = WatchParams::default()
                .fields(&fields)
                .timeout(secs(deadline));
            let stream = self
                .bounded("watch a job", self.jobs.watch(&params, &version))
                .await?;
            let mut stream = std::pin::pin!(stream);
            let mut gone = false;
            loop {
                let event = tokio::select! {
                    event = stream.next() => event,
                    event = next_or_pending(&mut pods) => {
                        match event {
                            Some(Ok(WatchEvent::Added(pod) | WatchEvent::Modified(pod))) => {
                                if let Some(stuck) = stuck(&pod) {
                                    return Ok(Some(stuck));
                                }
                            }
                            Some(_) => {}
                            None => pods = None,
                        }
                        continue;
                    }
                    () = tokio::time::sleep_until(deadline) => return Ok(None),
                };
                let Some(event) = event else {
                    break;
                };
                match event {
                    Ok(WatchEvent::Added(job)) | Ok(WatchEvent::Modified(job)) => {
                        if let Some(end) = job_end(&job) {
                            return Ok(Some(end));
                        }
                    }
                    Ok(WatchEvent::Deleted(_)) => return Err(ApiError::Vanished(name.to_owned())),
                    Ok(WatchEvent::Bookmark(_)) => {}
                    // 410 Gone (the version is too old) and the like: read the Job again.
                    Ok(WatchEvent::Error(_)) | Err(_) => {
                        gone = true;
                        break;
                    }
                }
            }
            // The watch ended without the Job ending: read it, then watch again from there.
            let job = self.bounded("read a job", self.jobs.get_opt(name)).await?;
            let Some(job) = job else {
                return Err(ApiError::Vanished(name.to_owned()));
            };
            if let Some(end) = job_end(&job) {
                return Ok(Some(end));
            }
            version = job.metadata.resource_version.unwrap_or_default();
            if !gone {
                tokio::time::sleep(REWATCH_PAUSE.min(remaining)).await;
            }
        }
    }

    /// The state of the command's container, if its pod still exists; a pod whose container
    /// ended is preferred.
    pub async fn terminated(&self, job: &str) -> Result<Option<Terminated>, ApiError> {
        let params = ListParams::default().labels(&format!("{JOB_NAME_LABEL}={job}"));
        let pods = self
            .bounded("list the pods of a job", self.pods.list(&params))
            .await?;
        let ended = pods.items.iter().filter_map(state_of).find(|s| s.ended);
        Ok(ended.or_else(|| pods.items.iter().find_map(state_of)))
    }

    /// The log of the command's container in `pod`: at most `cap` bytes, and whether there
    /// was more.
    pub async fn log(&self, pod: &str, cap: usize) -> Result<(Vec<u8>, bool), ApiError> {
        let params = LogParams {
            container: Some(CONTAINER.to_owned()),
            limit_bytes: Some(i64::try_from(cap).unwrap_or(i64::MAX).saturating_add(1)),
            ..LogParams::default()
        };
        let read = async {
            let stream = self.pods.log_stream(pod, &params).await?;
            let mut bytes = Vec::new();
            let limit = u64::try_from(cap).unwrap_or(u64::MAX).saturating_add(1);
            std::pin::pin!(stream)
                .take(limit)
                .read_to_end(&mut bytes)
                .await
                .map_err(kube::Error::ReadEvents)?;
            Ok(bytes)
        };
        let mut bytes = self.bounded("read a pod log", read).await?;
        let truncated = bytes.len() > cap;
        bytes.truncate(cap);
        Ok((bytes, truncated))
    }

    /// Deletes the Job `name` and, in the background, its pods. A Job already gone is fine.
    pub async fn delete(&self, name: &str) -> Result<(), ApiError> {
        match self
            .bounded(
                "delete a job",
                self.jobs.delete(name, &DeleteParams::background()),
            )
            .await
        {
            Ok(_) | Err(ApiError::Refused { code: 404, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Deletes every Job matching `selector`; the number deleted.
    pub async fn delete_all(&self, selector: &str) -> Result<usize, ApiError> {
        let params = ListParams::default().labels(selector);
        let list = self.bounded("list jobs", self.jobs.list(&params)).await?;
        let mut deleted = 0;
        for job in list.items {
            if let Some(name) = job.metadata.name {
                self.delete(&name).await?;
                deleted += 1;
            }
        }
        Ok(deleted)
    }
}

/// How `job` ended, if it did.
pub fn job_end(job: &Job) -> Option<JobEnd> {
    let conditions = job.status.as_ref()?.conditions.as_ref()?;
    conditions
        .iter()
        .filter(|c| c.status == "True")
        .find_map(|c| match c.type_.as_str() {
            "Complete" => Some(JobEnd::Complete),
            "Failed" => match c.reason.as_deref() {
                Some("DeadlineExceeded") => Some(JobEnd::DeadlineExceeded),
                other => Some(JobEnd::Failed(other.unwrap_or_default().to_owned())),
            },
            _ => None,
        })
}

/// The next item of `stream`, or never when there is none.
async fn next_or_pending<S: futures_util::Stream + Unpin>(
    stream: &mut Option<S>,
) -> Option<S::Item> {
    match stream {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

/// A container of the pod (the runner's init container or the command's) waits for something
/// that will not come.
fn stuck(pod: &Pod) -> Option<JobEnd> {
    let status = pod.status.as_ref()?;
    let init = status.init_container_statuses.iter().flatten();
    let main = status.container_statuses.iter().flatten();
    init.chain(main)
        .filter(|s| s.name == RUNNER_CONTAINER || s.name == CONTAINER)
        .find_map(|s| {
            let waiting = s.state.as_ref()?.waiting.as_ref()?;
            let reason = waiting.reason.clone().unwrap_or_default();
            STUCK.contains(&reason.as_str()).then(|| JobEnd::Stuck {
                container: s.name.clone(),
                reason,
                message: waiting.message.clone().unwrap_or_default(),
            })
        })
}

fn state_of(pod: &Pod) -> Option<Terminated> {
    let name = pod.metadata.name.clone()?;
    let status = pod.status.as_ref();
    let terminated = |statuses: Option<&Vec<ContainerStatus>>, container: &str| {
        statuses
            .and_then(|all| all.iter().find(|s| s.name == container))
            .and_then(|s| s.state.as_ref())
            .and_then(|s| s.terminated.clone())
    };
    let runner_install = terminated(
        status.and_then(|s| s.init_container_statuses.as_ref()),
        RUNNER_CONTAINER,
    )
    .filter(|t| t.exit_code != 0)
    .map(|t| {
        format!(
            "{} {}: {}",
            t.exit_code,
            t.reason.unwrap_or_default(),
            t.message.unwrap_or_default()
        )
    });
    let Some(t) = terminated(
        status.and_then(|s| s.container_statuses.as_ref()),
        CONTAINER,
    ) else {
        return Some(Terminated {
            pod: name,
            runner_install,
            ..Terminated::default()
        });
    };
    Some(Terminated {
        pod: name,
        ended: true,
        exit_code: Some(t.exit_code),
        signal: t.signal,
        reason: t.reason.unwrap_or_default(),
        message: t.message.unwrap_or_default(),
        runner_install,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use serde_json::json;

    fn job(conditions: serde_json::Value) -> Job {
        serde_json::from_value(
            json!({"metadata": {"name": "j"}, "status": {"conditions": conditions}}),
        )
        .unwrap()
    }

    #[test]
    fn only_complete_and_failed_end_a_job() {
        assert_eq!(job_end(&Job::default()), None);
        let target =
            json!({"type": "FailureTarget", "status": "True", "reason": "DeadlineExceeded"});
        assert_eq!(job_end(&job(json!([target]))), None, "pods may still run");
        let failed = json!({"type": "Failed", "status": "True", "reason": "DeadlineExceeded"});
        assert_eq!(
            job_end(&job(json!([target, failed]))),
            Some(JobEnd::DeadlineExceeded)
        );
        let backoff = json!({"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"});
        assert_eq!(
            job_end(&job(json!([backoff]))),
            Some(JobEnd::Failed("BackoffLimitExceeded".into()))
        );
        let complete = json!({"type": "Complete", "status": "True"});
        let met = json!({"type": "SuccessCriteriaMet", "status": "True"});
        assert_eq!(
            job_end(&job(json!([met, complete]))),
            Some(JobEnd::Complete)
        );
        let not_yet = json!({"type": "Complete", "status": "False"});
        assert_eq!(job_end(&job(json!([not_yet]))), None);
    }

    #[test]
    fn the_container_state_comes_from_the_exec_container() {
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "p"}, "status": {
            "containerStatuses": [
                {"name": "other", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                 "state": {"terminated": {"exitCode": 9}}},
                {"name": "exec", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                 "state": {"terminated": {"exitCode": 2, "reason": "Error"}}}]}}))
        .unwrap();
        let state = state_of(&pod).unwrap();
        assert_eq!((state.ended, state.exit_code), (true, Some(2)));
        assert_eq!(state.reason, "Error");
        assert_eq!(state.runner_install, None);
        let running: Pod = serde_json::from_value(json!({"metadata": {"name": "p"}})).unwrap();
        assert!(!state_of(&running).unwrap().ended);
        let no_runner: Pod = serde_json::from_value(json!({"metadata": {"name": "p"}, "status": {
            "initContainerStatuses": [
                {"name": "agentvm-runner", "image": "i", "imageID": "", "ready": false,
                 "restartCount": 0, "state": {"terminated": {"exitCode": 128,
                    "reason": "StartError", "message": "not found"}}}],
            "containerStatuses": [
                {"name": "exec", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                 "state": {"waiting": {"reason": "PodInitializing"}}}]}}))
        .unwrap();
        let state = state_of(&no_runner).unwrap();
        assert!(!state.ended);
        assert_eq!(
            state.runner_install.as_deref(),
            Some("128 StartError: not found")
        );
        assert_eq!(stuck(&no_runner), None);
    }

    #[test]
    fn a_container_stuck_on_its_image_is_found_init_containers_too() {
        let pod = |field: &str, name: &str| -> Pod {
            serde_json::from_value(json!({"metadata": {"name": "p"}, "status": {field: [
                {"name": name, "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                 "state": {"waiting": {"reason": "ImagePullBackOff", "message": "nope"}}}]}}))
            .unwrap()
        };
        let end = |container: &str| JobEnd::Stuck {
            container: container.into(),
            reason: "ImagePullBackOff".into(),
            message: "nope".into(),
        };
        assert_eq!(
            stuck(&pod("initContainerStatuses", "agentvm-runner")),
            Some(end("agentvm-runner"))
        );
        assert_eq!(stuck(&pod("containerStatuses", "exec")), Some(end("exec")));
        assert_eq!(stuck(&pod("containerStatuses", "other")), None);
    }
}
