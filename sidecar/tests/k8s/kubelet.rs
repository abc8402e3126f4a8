//! The Job controller and the kubelet of the stand-in. A new Job gets one pod; the kubelet pulls
//! its images, sets up its volumes (waiting for a Secret that does not exist yet, as a kubelet
//! retries the mount), runs its init containers in order and then its container, and reports
//! each container's state as the kubelet does (an exit by signal is exit code 128 + the signal,
//! the `signal` field stays unset). The Job controller marks the Job `Complete` or, through
//! `FailureTarget`, `Failed`; at `activeDeadlineSeconds` it deletes the pod, whose container then
//! gets SIGTERM and, after `terminationGracePeriodSeconds`, SIGKILL.
//!
//! Containers run as processes of this machine, not in containers:
//! - Images: an image whose name holds `agentvm-sidecar` holds only `agentvm-sidecar` on its
//!   PATH, the binary cargo built; an image named `*/nope:*` cannot be pulled (`ErrImagePull`,
//!   then `ImagePullBackOff`); any other image holds this machine's programs, without
//!   `agentvm-sidecar`.
//! - Volumes are directories of their own. A command word, argument, variable value or working
//!   directory that is a volume's mount path, or under it, is rewritten to that directory (the
//!   kubelet would mount the volume there instead). A Secret's keys become files.
//! - Standard output and standard error go to one log file, as the kubelet keeps them; a working
//!   directory that does not exist is created, as the runtime does.
//! - Variable references are expanded as the kubelet expands them (see [`expand`]): in each env
//!   `value`, from the variables declared before it and the service variables; in `command` and
//!   `args`, from all of the container's variables.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::StandIn;

const SIDECAR_BIN: &str = env!("CARGO_BIN_EXE_agentvm-sidecar");
/// The PATH an image sets when its container sets none.
const IMAGE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How often the kubelet looks at what changed.
const POLL: Duration = Duration::from_millis(20);
/// The service variables every container gets (those of the `kubernetes` Service), unless its
/// own env declares them.
const SERVICE_ENV: [(&str, &str); 2] = [
    ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
    ("KUBERNETES_SERVICE_PORT", "443"),
];

/// `text` as the kubelet passes on a container's `command` and `args` words and its env
/// `value`s: `$(NAME)` becomes the value `lookup` finds for NAME and stays as it is when there is
/// none, `$$` becomes `$` (so `$$(NAME)` is the literal `$(NAME)`), and any other `$`, an
/// unclosed `$(` included, stays.
pub fn expand(text: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some((name, tail)) = after.strip_prefix('(').and_then(|r| r.split_once(')')) {
            match lookup(name) {
                Some(value) => out.push_str(&value),
                None => out.push_str(&format!("$({name})")),
            }
            rest = tail;
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Sends SIGTERM to `pid`, as the kubelet does to a container's process.
fn terminate(pid: Option<u32>) {
    let pid = pid.and_then(|p| rustix::process::Pid::from_raw(p as i32));
    if let Some(pid) = pid {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
}

/// Sends SIGTERM to a container's process when dropped.
struct Terminate(Option<u32>);

impl Drop for Terminate {
    fn drop(&mut self) {
        terminate(self.0);
    }
}

/// What an image holds, as far as the stand-in knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Image {
    Sidecar,
    Tools,
    Unpullable,
}

fn image(name: &str) -> Image {
    if name.contains("/nope:") {
        Image::Unpullable
    } else if name.contains("agentvm-sidecar") {
        Image::Sidecar
    } else {
        Image::Tools
    }
}

/// How a pod ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PodEnd {
    Succeeded,
    Failed,
    /// Deleted before its containers ended.
    Deleted,
}

/// How a container ended.
enum ContainerEnd {
    Exited(i32),
    StartError(String),
    Deleted,
}

fn waiting(name: &str, image: &str, reason: &str, message: &str) -> Value {
    json!({"name": name, "image": image, "imageID": "", "ready": false, "restartCount": 0,
        "state": {"waiting": {"reason": reason, "message": message}}})
}

impl StandIn {
    /// The Job controller at work on a new Job.
    pub(super) async fn control(self, name: String, job: Value) {
        if self
            .controller_down
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        tokio::time::sleep(self.step).await;
        let seconds = job["spec"]["activeDeadlineSeconds"].as_u64().unwrap_or(600);
        let deadline = Instant::now() + Duration::from_secs(seconds);
        self.update_job(&name, |j| {
            j["status"] = json!({"active": 1, "startTime": "2026-12-04T18:00:00Z"});
        });
        let template = &job["spec"]["template"];
        let spec = template["spec"].clone();
        let pod = format!("{name}-p0d");
        let mut labels = template["metadata"]["labels"].clone();
        labels["job-name"] = json!(name);
        labels["batch.kubernetes.io/job-name"] = json!(name);
        let status = |field: &str| -> Vec<Value> {
            spec[field]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| {
                    let image = c["image"].as_str().unwrap_or_default();
                    waiting(c["name"].as_str().unwrap(), image, "PodInitializing", "")
                })
                .collect()
        };
        let object = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod, "namespace": super::NAMESPACE, "labels": labels,
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": name,
                    "uid": job["metadata"]["uid"], "controller": true}]},
            "spec": spec,
            "status": {"phase": "Pending",
                "initContainerStatuses": status("initContainers"),
                "containerStatuses": status("containers")}});
        if !self.add_pod(&name, object) {
            return;
        }
        let (done, ended) = tokio::sync::oneshot::channel();
        tokio::spawn(self.clone().kubelet(pod, spec, done));
        tokio::select! {
            end = ended => match end {
                Ok(PodEnd::Succeeded) => self.update_job(&name, |j| {
                    j["status"] = json!({"succeeded": 1, "conditions": [
                        {"type": "SuccessCriteriaMet", "status": "True",
                            "reason": "CompletionsReached"},
                        {"type": "Complete", "status": "True", "reason": "CompletionsReached"}]});
                }),
                Ok(PodEnd::Failed) => {
                    self.fail(&name, "BackoffLimitExceeded",
                        "Job has reached the specified backoff limit").await;
                }
                Ok(PodEnd::Deleted) | Err(_) => {}
            },
            () = tokio::time::sleep_until(deadline) => {
                self.fail(&name, "DeadlineExceeded",
                    "Job was active longer than specified deadline").await;
            }
        }
    }

    /// A failing Job as the Job controller reports it: `FailureTarget` first, then `Failed`
    /// once its pods are gone or terminated.
    async fn fail(&self, name: &str, reason: &str, message: &str) {
        let target = json!({"type": "FailureTarget", "status": "True", "reason": reason,
            "message": message});
        self.update_job(name, |j| {
            j["status"] = json!({"failed": 1, "conditions": [target.clone()]});
        });
        tokio::time::sleep(self.step).await;
        if reason == "DeadlineExceeded" {
            self.delete_pods_of(name);
        }
        self.update_job(name, |j| {
            j["status"] = json!({"failed": 1, "conditions": [target,
                {"type": "Failed", "status": "True", "reason": reason, "message": message}]});
        });
    }

    /// The kubelet at work on `pod`: tells `done` how it ended, then keeps its volumes and log
    /// until the pod is deleted.
    async fn kubelet(self, pod: String, spec: Value, done: tokio::sync::oneshot::Sender<PodEnd>) {
        let dir = self.root.join(&pod);
        std::fs::create_dir_all(&dir).unwrap();
        let end = self.run_pod(&pod, &spec, &dir).await;
        let _ = done.send(end);
        let kept = Instant::now();
        while self.pod_exists(&pod) && kept.elapsed() < Duration::from_secs(120) {
            tokio::time::sleep(POLL).await;
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    async fn run_pod(&self, pod: &str, spec: &Value, dir: &Path) -> PodEnd {
        let inits: Vec<Value> = spec["initContainers"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mains: Vec<Value> = spec["containers"].as_array().cloned().unwrap_or_default();
        let all = inits
            .iter()
            .map(|c| ("initContainerStatuses", c))
            .chain(mains.iter().map(|c| ("containerStatuses", c)));
        for (field, c) in all {
            let name = c["name"].as_str().unwrap();
            let image_name = c["image"].as_str().unwrap_or_default();
            if image(image_name) == Image::Unpullable {
                let message = format!("Back-off pulling image \"{image_name}\"");
                for reason in ["ErrImagePull", "ImagePullBackOff"] {
                    self.container_state(pod, field, name, |s| {
                        *s = waiting(name, image_name, reason, &message);
                    });
                    tokio::time::sleep(self.step).await;
                }
                return self.until_deleted(pod).await;
            }
        }
        let Some(volumes) = self.volumes(pod, spec, dir).await else {
            return PodEnd::Deleted;
        };
        for c in &inits {
            match self
                .container(pod, "initContainerStatuses", c, spec, &volumes, None)
                .await
            {
                ContainerEnd::Exited(0) => {}
                ContainerEnd::Exited(_) | ContainerEnd::StartError(_) => {
                    self.update_pod(pod, |p| p["status"]["phase"] = json!("Failed"));
                    return PodEnd::Failed;
                }
                ContainerEnd::Deleted => return PodEnd::Deleted,
            }
        }
        self.update_pod(pod, |p| p["status"]["phase"] = json!("Running"));
        let mut end = PodEnd::Succeeded;
        for c in &mains {
            let log = dir.join(format!("{}.log", c["name"].as_str().unwrap()));
            if c["name"] == "exec" {
                let mut store = self.store.lock().unwrap();
                store.logs.insert(pod.to_owned(), log.clone());
            }
            match self
                .container(pod, "containerStatuses", c, spec, &volumes, Some(&log))
                .await
            {
                ContainerEnd::Exited(0) => {}
                ContainerEnd::Exited(_) | ContainerEnd::StartError(_) => end = PodEnd::Failed,
                ContainerEnd::Deleted => return PodEnd::Deleted,
            }
        }
        let phase = if end == PodEnd::Succeeded {
            "Succeeded"
        } else {
            "Failed"
        };
        self.update_pod(pod, |p| p["status"]["phase"] = json!(phase));
        end
    }

    async fn until_deleted(&self, pod: &str) -> PodEnd {
        while self.pod_exists(pod) {
            tokio::time::sleep(POLL).await;
        }
        PodEnd::Deleted
    }

    /// The pod's volumes, each a directory (by volume name); `None` when the pod was deleted
    /// while a Secret was still missing.
    async fn volumes(&self, pod: &str, spec: &Value, dir: &Path) -> Option<Vec<(String, PathBuf)>> {
        let mut volumes = Vec::new();
        for v in spec["volumes"].as_array().into_iter().flatten() {
            let name = v["name"].as_str().unwrap().to_owned();
            let host = dir.join("volumes").join(&name);
            std::fs::create_dir_all(&host).unwrap();
            if let Some(secret) = v["secret"].as_object() {
                let secret_name = secret["secretName"].as_str().unwrap();
                let data = loop {
                    let found = self.store.lock().unwrap().secrets.get(secret_name).cloned();
                    if let Some(found) = found {
                        break found["data"].clone();
                    }
                    // FailedMount: the kubelet tries again.
                    if !self.pod_exists(pod) {
                        return None;
                    }
                    tokio::time::sleep(self.step).await;
                };
                let mode = secret["defaultMode"].as_u64().unwrap_or(0o644) as u32;
                for (key, value) in data.as_object().into_iter().flatten() {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(value.as_str().unwrap())
                        .unwrap();
                    let file = host.join(key);
                    std::fs::write(&file, bytes).unwrap();
                    // With fsGroup the kubelet makes the files group-readable.
                    let perms = std::fs::Permissions::from_mode(mode | 0o040);
                    std::fs::set_permissions(&file, perms).unwrap();
                }
            }
            volumes.push((name, host));
        }
        Some(volumes)
    }

    /// Runs one container to its end (or the pod's deletion), reporting its state.
    async fn container(
        &self,
        pod: &str,
        field: &'static str,
        c: &Value,
        spec: &Value,
        volumes: &[(String, PathBuf)],
        log: Option<&Path>,
    ) -> ContainerEnd {
        let name = c["name"].as_str().unwrap();
        let image_name = c["image"].as_str().unwrap_or_default().to_owned();
        let mut mounts: Vec<(String, PathBuf)> = c["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| {
                let volume = m["name"].as_str().unwrap();
                let host = volumes.iter().find(|(n, _)| n == volume).unwrap().1.clone();
                (m["mountPath"].as_str().unwrap().to_owned(), host)
            })
            .collect();
        mounts.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
        let map = |s: &str| -> String {
            for (path, host) in &mounts {
                if s == path {
                    return host.display().to_string();
                }
                if let Some(rest) = s.strip_prefix(path.as_str()) {
                    if rest.starts_with('/') {
                        return format!("{}{rest}", host.display());
                    }
                }
            }
            s.to_owned()
        };
        // The container's variables, each value expanded from those declared before it.
        let service = |name: &str| {
            SERVICE_ENV
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| (*v).to_owned())
        };
        let mut env: Vec<(String, String)> = Vec::new();
        for v in c["env"].as_array().into_iter().flatten() {
            let name = v["name"].as_str().unwrap().to_owned();
            let value = expand(v["value"].as_str().unwrap(), |n| {
                let declared = env.iter().rev().find(|(d, _)| d == n);
                declared.map(|(_, v)| v.clone()).or_else(|| service(n))
            });
            env.retain(|(d, _)| *d != name);
            env.push((name, value));
        }
        let lookup = |n: &str| {
            let declared = env.iter().find(|(d, _)| d == n);
            declared.map(|(_, v)| v.clone()).or_else(|| service(n))
        };
        let words: Vec<String> = ["command", "args"]
            .iter()
            .flat_map(|f| c[*f].as_array().cloned().unwrap_or_default())
            .map(|w| map(&expand(w.as_str().unwrap(), lookup)))
            .collect();
        let kind = image(&image_name);
        let program = words.first().cloned().unwrap_or_default();
        let in_volume = mounts
            .iter()
            .any(|(_, host)| Path::new(&program).starts_with(host));
        let resolved = if program.contains('/') {
            (in_volume || kind == Image::Tools).then(|| program.clone())
        } else {
            match (kind, program.as_str()) {
                (Image::Sidecar, "agentvm-sidecar") => Some(SIDECAR_BIN.to_owned()),
                (Image::Tools, p) if p != "agentvm-sidecar" => Some(program.clone()),
                _ => None,
            }
        };
        let run = async {
            let Some(resolved) = resolved else {
                return Err(format!(
                    "exec: \"{program}\": executable file not found in $PATH"
                ));
            };
            let mut cmd = tokio::process::Command::new(&resolved);
            cmd.args(&words[1..]).env_clear().env("PATH", IMAGE_PATH);
            for (name, value) in SERVICE_ENV {
                cmd.env(name, value);
            }
            for (name, value) in &env {
                cmd.env(name, map(value));
            }
            cmd.env("HOSTNAME", pod);
            let cwd = match c["workingDir"].as_str() {
                Some(dir) => PathBuf::from(map(dir)),
                None => self.root.join(pod),
            };
            std::fs::create_dir_all(&cwd).unwrap();
            cmd.current_dir(cwd).stdin(Stdio::null());
            match log {
                Some(log) => {
                    let file = std::fs::File::create(log).unwrap();
                    cmd.stdout(file.try_clone().unwrap()).stderr(file);
                }
                None => {
                    cmd.stdout(Stdio::null()).stderr(Stdio::null());
                }
            }
            cmd.spawn().map_err(|e| format!("exec: \"{program}\": {e}"))
        };
        let mut child = match run.await {
            Ok(child) => child,
            Err(message) => {
                self.container_state(pod, field, name, |s| {
                    s["state"] = json!({"terminated": {"exitCode": 128, "reason": "StartError",
                        "message": message}});
                });
                return ContainerEnd::StartError(message);
            }
        };
        self.container_state(pod, field, name, |s| {
            s["state"] = json!({"running": {"startedAt": "2026-12-04T18:00:01Z"}});
        });
        // A test that ends first (its runtime dropping this task) stops the container too;
        // disarmed once the process is reaped (its pid may then be another's).
        let mut stop = Terminate(child.id());
        let status = loop {
            tokio::select! {
                status = child.wait() => break status.unwrap(),
                () = tokio::time::sleep(POLL) => {
                    if !self.pod_exists(pod) {
                        let grace = spec["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
                        terminate(child.id());
                        let grace = Duration::from_secs(grace);
                        if tokio::time::timeout(grace, child.wait()).await.is_err() {
                            let _ = child.kill().await;
                        }
                        stop.0 = None;
                        return ContainerEnd::Deleted;
                    }
                }
            }
        };
        stop.0 = None;
        use std::os::unix::process::ExitStatusExt;
        let code = status
            .code()
            .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
        let reason = if code == 0 { "Completed" } else { "Error" };
        self.container_state(pod, field, name, |s| {
            s["state"] = json!({"terminated": {"exitCode": code, "reason": reason}});
        });
        ContainerEnd::Exited(code)
    }

    /// Applies `change` to the status of container `name` in `field` of the pod's status.
    fn container_state(&self, pod: &str, field: &str, name: &str, change: impl FnOnce(&mut Value)) {
        self.update_pod(pod, |p| {
            let statuses = p["status"][field].as_array_mut().unwrap();
            let status = statuses.iter_mut().find(|s| s["name"] == name).unwrap();
            change(status);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::expand;

    #[test]
    fn expansion_follows_the_kubelet() {
        let lookup = |n: &str| (n == "A").then(|| "x".to_owned());
        for (text, want) in [
            ("$(A)/$(B)", "x/$(B)"),
            ("$$(A) $$$(A) $$$$", "$(A) $x $$"),
            ("a$ $b $( $(A $)", "a$ $b $( $(A $)"),
            ("$(A$$)", "$(A$$)"),
            ("end$", "end$"),
            ("\u{e9}$$\u{e9}", "\u{e9}$\u{e9}"),
        ] {
            assert_eq!(expand(text, lookup), want, "{text}");
        }
        // Doubling every `$` passes any text through unchanged.
        for text in ["$(A)", "$$", "$", "$(A$)x$$(A)", "($)"] {
            assert_eq!(expand(&text.replace('$', "$$"), lookup), text);
        }
    }
}
