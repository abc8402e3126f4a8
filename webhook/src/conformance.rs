//! Checks that a pod (or pod template) meets its profile and the Pod Security Standards
//! "restricted" level. `/validate` denies anything with a violation, whatever `/mutate` did, and
//! `/mutate` denies when its own output still has one (host access and other things it will not
//! fix). Absent fields count as violations: a check never passes because a field is missing.

use std::collections::HashSet;

use serde_json::{Map, Value};

use crate::keys::{
    self, AGENT_LABEL, APPLIED_ANNOTATION, EGRESS_LABEL, PROFILE_KEY, WORKSPACE_VOLUME,
};
use crate::podspec::{self, array, name_of, CONTAINER_LISTS};
use crate::profile_name::Profile;
use crate::proxy_mounts::ProxyMounts;
use crate::settings::Settings;

/// Volume types the restricted Pod Security Standard allows (secrets are refused separately).
const RESTRICTED_VOLUME_TYPES: [&str; 8] = [
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
];

/// Sysctls the baseline Pod Security Standard allows.
const SAFE_SYSCTLS: [&str; 9] = [
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
];

/// SELinux types the baseline Pod Security Standard allows.
const SELINUX_TYPES: [&str; 4] = ["", "container_t", "container_init_t", "container_kvm_t"];

/// Every way the pod misses its profile, as messages that name the field and the container.
/// `proxy` is what the decision gives the proxy (its credentials volume is the one Secret volume
/// allowed, and only the proxy may mount it). `extra_volumes` are names a mount may refer to
/// besides the pod's volumes (a StatefulSet's `volumeClaimTemplates`).
pub fn violations(
    meta: &Map<String, Value>,
    spec: &Map<String, Value>,
    profile: Profile,
    proxy: &ProxyMounts,
    settings: &Settings,
    extra_volumes: &[String],
) -> Vec<String> {
    let mut v = Vec::new();
    check_metadata(meta, profile, &mut v);
    check_pod(spec, &mut v);
    check_volumes(spec, proxy, &mut v);
    let mut volume_names: HashSet<&str> = array(spec, "volumes").iter().map(name_of).collect();
    volume_names.extend(extra_volumes.iter().map(String::as_str));
    let pod_sc = spec.get("securityContext").and_then(Value::as_object);
    let mut seen_names = HashSet::new();
    for (_, c) in podspec::containers(spec) {
        let name = name_of(c);
        if !seen_names.insert(name) {
            v.push(format!("container name {name} is used more than once"));
        }
        check_container(c, pod_sc, settings, &volume_names, &mut v);
    }
    check_injected(spec, profile, settings, &mut v);
    v
}

fn check_metadata(meta: &Map<String, Value>, profile: Profile, v: &mut Vec<String>) {
    let label = |k: &str| {
        meta.get("labels")
            .and_then(|l| l.get(k))
            .and_then(Value::as_str)
    };
    if label(AGENT_LABEL) != Some("true") {
        v.push(format!("label {AGENT_LABEL} must be \"true\""));
    }
    if label(EGRESS_LABEL) != Some("deny") {
        v.push(format!(
            "label {EGRESS_LABEL} must be \"deny\" (the deny-egress NetworkPolicy selects it)"
        ));
    }
    if label(PROFILE_KEY) != Some(profile.as_str()) {
        v.push(format!(
            "label {PROFILE_KEY} must be \"{profile}\", the effective profile"
        ));
    }
    // The annotation form of AppArmor (before the appArmorProfile field), as Pod Security checks it.
    let annotations = meta.get("annotations").and_then(Value::as_object);
    for (key, value) in annotations.into_iter().flatten() {
        let Some(container) = key.strip_prefix("container.apparmor.security.beta.kubernetes.io/")
        else {
            continue;
        };
        let value = value.as_str().unwrap_or("");
        if value != "runtime/default" && !value.starts_with("localhost/") {
            v.push(format!(
                "container {container}: AppArmor profile {value} (annotation {key}) is not allowed"
            ));
        }
    }
    let applied = annotations.and_then(|a| a.get(APPLIED_ANNOTATION));
    if applied.and_then(Value::as_str).is_none_or(str::is_empty) {
        v.push(format!("annotation {APPLIED_ANNOTATION} is missing"));
    }
}

fn check_pod(spec: &Map<String, Value>, v: &mut Vec<String>) {
    if spec.get("automountServiceAccountToken") != Some(&Value::Bool(false)) {
        v.push("automountServiceAccountToken must be false".into());
    }
    for field in ["hostNetwork", "hostPID", "hostIPC", "shareProcessNamespace"] {
        if spec.get(field) == Some(&Value::Bool(true)) {
            v.push(format!("{field} is not allowed for agent pods"));
        }
    }
    if spec
        .get("os")
        .and_then(|o| o.get("name"))
        .and_then(Value::as_str)
        == Some("windows")
    {
        v.push("Windows pods (spec.os.name: windows) are not supported for agents".into());
    }
    let Some(sc) = spec.get("securityContext").and_then(Value::as_object) else {
        v.push("pod securityContext is missing (runAsNonRoot, seccompProfile)".into());
        return;
    };
    if sc.get("runAsUser").and_then(Value::as_i64) == Some(0) {
        v.push("pod securityContext.runAsUser 0 (root) is not allowed".into());
    }
    for sysctl in array(sc, "sysctls") {
        let name = name_of(sysctl);
        if !SAFE_SYSCTLS.contains(&name) {
            v.push(format!("pod securityContext sysctl {name} is not allowed"));
        }
    }
    check_common_security(sc, "pod", v);
}

fn check_volumes(spec: &Map<String, Value>, proxy: &ProxyMounts, v: &mut Vec<String>) {
    let mut seen = HashSet::new();
    for vol in array(spec, "volumes") {
        let name = name_of(vol);
        if !seen.insert(name) {
            v.push(format!("volume name {name} is used more than once"));
        }
        if vol.get("hostPath").is_some() {
            v.push(format!("volume {name}: hostPath volumes are not allowed"));
        }
        if podspec::is_token_volume(vol) {
            v.push(format!(
                "volume {name}: projected serviceAccountToken volumes are not allowed"
            ));
        }
        if let Some(what) = podspec::credential_volume(vol) {
            if !proxy.is_credentials_volume(vol) {
                v.push(format!(
                    "volume {name}: credentials ({what}) are not allowed"
                ));
            }
        }
        for what in podspec::projected_credentials(vol) {
            v.push(format!(
                "volume {name}: projected credentials ({what}) are not allowed"
            ));
        }
        if let Some(obj) = vol.as_object() {
            let other = obj.keys().find(|k| {
                *k != "name" && *k != "hostPath" && !RESTRICTED_VOLUME_TYPES.contains(&k.as_str())
            });
            if let Some(kind) = other {
                v.push(format!("volume {name}: volume type {kind} is not allowed (restricted Pod Security Standard)"));
            }
        }
    }
}

/// Checks that apply to a pod or a container security context alike.
fn check_common_security(sc: &Map<String, Value>, who: &str, v: &mut Vec<String>) {
    if let Some(se) = sc.get("seLinuxOptions") {
        let t = se.get("type").and_then(Value::as_str).unwrap_or("");
        if !SELINUX_TYPES.contains(&t) {
            v.push(format!(
                "{who} securityContext.seLinuxOptions.type {t} is not allowed"
            ));
        }
        for field in ["user", "role"] {
            if se
                .get(field)
                .and_then(Value::as_str)
                .is_some_and(|s| !s.is_empty())
            {
                v.push(format!(
                    "{who} securityContext.seLinuxOptions.{field} is not allowed"
                ));
            }
        }
    }
    if sc
        .get("appArmorProfile")
        .and_then(|p| p.get("type"))
        .and_then(Value::as_str)
        == Some("Unconfined")
    {
        v.push(format!(
            "{who} securityContext.appArmorProfile Unconfined is not allowed"
        ));
    }
    if sc.get("windowsOptions").and_then(|w| w.get("hostProcess")) == Some(&Value::Bool(true)) {
        v.push(format!(
            "{who} securityContext.windowsOptions.hostProcess is not allowed"
        ));
    }
}

fn check_container(
    c: &Value,
    pod_sc: Option<&Map<String, Value>>,
    settings: &Settings,
    volumes: &HashSet<&str>,
    v: &mut Vec<String>,
) {
    let name = name_of(c);
    let who = format!("container {name}");
    let empty = Map::new();
    let sc = c
        .get("securityContext")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let pod = pod_sc.unwrap_or(&empty);
    let effective = |key: &str| sc.get(key).or_else(|| pod.get(key));

    if effective("runAsNonRoot") != Some(&Value::Bool(true)) {
        v.push(format!("{who}: securityContext.runAsNonRoot must be true"));
    }
    if sc.get("runAsUser").and_then(Value::as_i64) == Some(0) {
        v.push(format!(
            "{who}: securityContext.runAsUser 0 (root) is not allowed"
        ));
    }
    let seccomp = effective("seccompProfile")
        .and_then(|p| p.get("type"))
        .and_then(Value::as_str);
    if seccomp != Some("RuntimeDefault") {
        v.push(format!("{who}: seccompProfile must be RuntimeDefault"));
    }
    if sc.get("allowPrivilegeEscalation") != Some(&Value::Bool(false)) {
        v.push(format!(
            "{who}: securityContext.allowPrivilegeEscalation must be false"
        ));
    }
    if sc.get("privileged") == Some(&Value::Bool(true)) {
        v.push(format!("{who}: privileged is not allowed"));
    }
    let caps = sc.get("capabilities");
    let drop = caps.and_then(|c| c.get("drop")).and_then(Value::as_array);
    if !drop.is_some_and(|d| d.iter().any(|x| x == "ALL")) {
        v.push(format!(
            "{who}: securityContext.capabilities.drop must contain ALL"
        ));
    }
    let add = caps.and_then(|c| c.get("add")).and_then(Value::as_array);
    if let Some(add) = add.filter(|a| !a.is_empty()) {
        let names: Vec<&str> = add.iter().filter_map(Value::as_str).collect();
        v.push(format!(
            "{who}: securityContext.capabilities.add ({}) is not allowed",
            names.join(", ")
        ));
    }
    if settings.read_only_root_filesystem
        && sc.get("readOnlyRootFilesystem") != Some(&Value::Bool(true))
    {
        v.push(format!(
            "{who}: securityContext.readOnlyRootFilesystem must be true"
        ));
    }
    if sc
        .get("procMount")
        .and_then(Value::as_str)
        .is_some_and(|p| p != "Default")
    {
        v.push(format!("{who}: securityContext.procMount must be Default"));
    }
    check_common_security(sc, &who, v);

    if let Some(obj) = c.as_object() {
        for port in array(obj, "ports") {
            if port
                .get("hostPort")
                .and_then(Value::as_i64)
                .is_some_and(|p| p != 0)
            {
                v.push(format!("{who}: hostPort is not allowed"));
            }
        }
        if name != keys::PROXY_CONTAINER {
            for volume in podspec::proxy_volume_mounts(c) {
                v.push(format!(
                    "{who}: volume {volume} is the proxy's: only {} may mount it",
                    keys::PROXY_CONTAINER
                ));
            }
        }
        let mut paths = HashSet::new();
        for m in array(obj, "volumeMounts") {
            let path = m.get("mountPath").and_then(Value::as_str).unwrap_or("");
            if podspec::is_service_account_path(path) {
                v.push(format!(
                    "{who}: nothing may be mounted at {}",
                    keys::SERVICE_ACCOUNT_PATH
                ));
            }
            if !volumes.contains(name_of(m)) {
                v.push(format!(
                    "{who}: volumeMount {} refers to no volume of the pod",
                    name_of(m)
                ));
            }
            if !paths.insert(path) {
                v.push(format!("{who}: two volumes are mounted at {path}"));
            }
        }
        for e in array(obj, "env") {
            if let Some((secret, key)) = podspec::env_secret(e) {
                v.push(format!("{who}: env {} comes from Secret {secret} key {key} (credentials are not allowed)", name_of(e)));
            }
        }
        for e in array(obj, "envFrom") {
            if let Some(secret) = podspec::env_from_secret(e) {
                v.push(format!(
                    "{who}: envFrom Secret {secret} is not allowed (credentials)"
                ));
            }
        }
    }
}

fn check_injected(
    spec: &Map<String, Value>,
    profile: Profile,
    settings: &Settings,
    v: &mut Vec<String>,
) {
    let find = |wanted: &str| -> Vec<(&str, usize, &Value)> {
        CONTAINER_LISTS
            .into_iter()
            .flat_map(|list| {
                array(spec, list)
                    .iter()
                    .enumerate()
                    .map(move |(i, c)| (list, i, c))
            })
            .filter(|(_, _, c)| name_of(c) == wanted)
            .collect()
    };
    let native = |c: &Value| c.get("restartPolicy").and_then(Value::as_str) == Some("Always");

    let proxies = find(keys::PROXY_CONTAINER);
    match proxies.as_slice() {
        [("initContainers", 0, c)] if native(c) => {}
        [] => v.push(format!("container {} is missing", keys::PROXY_CONTAINER)),
        _ => v.push(format!(
            "container {} must appear once, first in initContainers with restartPolicy Always",
            keys::PROXY_CONTAINER
        )),
    }
    let execs = find(keys::EXEC_CONTAINER);
    if profile != Profile::SidecarExec {
        if !execs.is_empty() {
            v.push(format!(
                "container {} is only allowed with profile sidecar-exec",
                keys::EXEC_CONTAINER
            ));
        }
        return;
    }
    match execs.as_slice() {
        [("initContainers", _, c)] if native(c) => {
            let workspace = settings.workspace_path.as_str();
            let mounts_workspace = |c: &Value| {
                c.get("volumeMounts")
                    .and_then(Value::as_array)
                    .is_some_and(|ms| {
                        ms.iter().any(|m| {
                            name_of(m) == WORKSPACE_VOLUME
                                && m.get("mountPath").and_then(Value::as_str) == Some(workspace)
                        })
                    })
            };
            let is_empty_dir = array(spec, "volumes")
                .iter()
                .any(|vol| name_of(vol) == WORKSPACE_VOLUME && vol.get("emptyDir").is_some());
            let shared = array(spec, "containers").iter().any(mounts_workspace);
            if !(is_empty_dir && mounts_workspace(c) && shared) {
                v.push(format!(
                    "the {WORKSPACE_VOLUME} emptyDir volume must be mounted at {workspace} in {} and the agent containers",
                    keys::EXEC_CONTAINER
                ));
            }
        }
        [] => v.push(format!(
            "container {} is missing (profile sidecar-exec)",
            keys::EXEC_CONTAINER
        )),
        _ => v.push(format!(
            "container {} must appear once, in initContainers with restartPolicy Always",
            keys::EXEC_CONTAINER
        )),
    }
}
