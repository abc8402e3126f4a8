//! Applies a profile to a pod (or pod template): drops credentials, hardens every container,
//! labels the pod and injects the proxy (with the ConfigMaps and Secret the decision names for
//! it) and, for `sidecar-exec`, the exec server.
//!
//! It fixes what can be fixed and reports, as denials, what it will not touch (a reserved name,
//! credentials under the `deny` setting). What cannot be fixed at all (host access and the like)
//! is left for [`crate::conformance`] to find in the result. Every step is idempotent: applying
//! the profile to its own output changes nothing.

use serde_json::{json, Map, Value};

use crate::keys::{self, env, APPLIED_ANNOTATION, EGRESS_LABEL, PROFILE_KEY, WORKSPACE_VOLUME};
use crate::podspec::{self, array, name_of, object_mut, CONTAINER_LISTS};
use crate::profile_name::Profile;
use crate::proxy_mounts::ProxyMounts;
use crate::settings::{CredentialHandling, Settings};

/// What applying the profile found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Changes the user should know about (stripped credentials).
    pub warnings: Vec<String>,
    /// Reasons the pod cannot be admitted as it is.
    pub denials: Vec<String>,
}

/// Version of the annotation format.
const APPLIED_VERSION: &str = "v1";

/// Applies `profile` to a pod's `metadata` and `spec`, giving the proxy `proxy`.
pub fn apply(
    meta: &mut Map<String, Value>,
    spec: &mut Map<String, Value>,
    profile: Profile,
    proxy: &ProxyMounts,
    settings: &Settings,
    namespace: &str,
) -> Applied {
    let mut out = Applied::default();
    let owned = is_owned(meta);
    check_reserved_names(spec, owned, &mut out);
    if !out.denials.is_empty() {
        return out;
    }
    drop_credentials(spec, settings.credentials, &mut out);
    inject(spec, profile, proxy, settings, namespace, &mut out);
    harden(spec, settings);
    label(meta, profile, proxy);
    out
}

/// Whether the pod carries the webhook's annotation, so that reserved names in it are the
/// webhook's own output (re-invocation, a controller copying a mutated template).
pub fn is_owned(meta: &Map<String, Value>) -> bool {
    meta.get("annotations")
        .and_then(|a| a.get(APPLIED_ANNOTATION))
        .is_some()
}

/// The annotation value for a profile: what was injected, as JSON. `proxy` (the names of what
/// the proxy got) is there only when it got something.
pub fn applied_annotation(profile: Profile, proxy: &ProxyMounts) -> String {
    let containers: &[&str] = match profile {
        Profile::SidecarExec => &[keys::PROXY_CONTAINER, keys::EXEC_CONTAINER],
        _ => &[keys::PROXY_CONTAINER],
    };
    let mut applied =
        json!({"version": APPLIED_VERSION, "profile": profile.as_str(), "containers": containers});
    if !proxy.is_empty() {
        applied["proxy"] = proxy.applied();
    }
    applied.to_string()
}

fn check_reserved_names(spec: &Map<String, Value>, owned: bool, out: &mut Applied) {
    for (list, c) in podspec::containers(spec) {
        let name = name_of(c);
        if !keys::RESERVED_CONTAINERS.contains(&name) {
            continue;
        }
        if !owned {
            out.denials.push(format!(
                "container {name} in {list} uses a name reserved for agentvm, and the pod has no \
                 {APPLIED_ANNOTATION} annotation: rename the container"
            ));
        } else if list != "initContainers" {
            out.denials.push(format!(
                "container {name} must be a native sidecar in initContainers, not in {list}"
            ));
        }
    }
    for (list, c) in podspec::containers(spec) {
        let name = name_of(c);
        if name == keys::PROXY_CONTAINER {
            continue;
        }
        for volume in podspec::proxy_volume_mounts(c) {
            out.denials.push(format!(
                "container {name} in {list} mounts volume {volume}, which only {} may mount",
                keys::PROXY_CONTAINER
            ));
        }
    }
    if owned {
        return;
    }
    for v in array(spec, "volumes") {
        let name = name_of(v);
        if keys::RESERVED_VOLUMES.contains(&name) {
            out.denials.push(format!(
                "volume {name} uses a name reserved for agentvm: rename the volume"
            ));
        }
    }
}

fn drop_credentials(
    spec: &mut Map<String, Value>,
    handling: CredentialHandling,
    out: &mut Applied,
) {
    spec.insert("automountServiceAccountToken".into(), Value::Bool(false));
    let mut report = |what: String| match handling {
        CredentialHandling::Strip => out.warnings.push(format!("agentvm removed {what}")),
        CredentialHandling::Deny => out.denials.push(format!(
            "{what} is not allowed in an agent pod (credentials setting: deny)"
        )),
    };

    let mut removed_volumes: Vec<String> = Vec::new();
    if let Some(Value::Array(volumes)) = spec.get_mut("volumes") {
        volumes.retain_mut(|v| {
            let name = name_of(v).to_owned();
            // agentvm's own (the pod carries its annotation): `inject` replaces them.
            if keys::RESERVED_VOLUMES.contains(&name.as_str()) {
                return true;
            }
            if podspec::is_token_volume(v) {
                removed_volumes.push(name);
                return false;
            }
            if let Some(what) = podspec::credential_volume(v) {
                report(format!("volume {name} ({what})"));
                removed_volumes.push(name);
                return false;
            }
            let creds = podspec::projected_credentials(v);
            if creds.is_empty() {
                return true;
            }
            report(format!("{} of projected volume {name}", creds.join(", ")));
            if let Some(Value::Array(sources)) = v.pointer_mut("/projected/sources") {
                sources.retain(|s| !podspec::is_credential_source(s));
                if sources.is_empty() {
                    removed_volumes.push(name);
                    return false;
                }
            }
            true
        });
        if volumes.is_empty() {
            spec.remove("volumes");
        }
    }
    for list in CONTAINER_LISTS {
        let Some(Value::Array(items)) = spec.get_mut(list) else {
            continue;
        };
        for c in items.iter_mut() {
            let Value::Object(c) = c else { continue };
            let cname = c
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned();
            if let Some(Value::Array(mounts)) = c.get_mut("volumeMounts") {
                mounts.retain(|m| {
                    let volume = name_of(m);
                    let path = m.get("mountPath").and_then(Value::as_str).unwrap_or("");
                    !removed_volumes.iter().any(|r| r == volume)
                        && !podspec::is_service_account_path(path)
                });
                if mounts.is_empty() {
                    c.remove("volumeMounts");
                }
            }
            if let Some(Value::Array(vars)) = c.get_mut("env") {
                vars.retain(|e| match podspec::env_secret(e) {
                    Some((secret, key)) => {
                        report(format!(
                            "env {} of container {cname} (Secret {secret}, key {key})",
                            name_of(e)
                        ));
                        false
                    }
                    None => true,
                });
                if vars.is_empty() {
                    c.remove("env");
                }
            }
            if let Some(Value::Array(sources)) = c.get_mut("envFrom") {
                sources.retain(|e| match podspec::env_from_secret(e) {
                    Some(secret) => {
                        report(format!("envFrom Secret {secret} of container {cname}"));
                        false
                    }
                    None => true,
                });
                if sources.is_empty() {
                    c.remove("envFrom");
                }
            }
        }
    }
}

fn inject(
    spec: &mut Map<String, Value>,
    profile: Profile,
    proxy: &ProxyMounts,
    settings: &Settings,
    namespace: &str,
    out: &mut Applied,
) {
    let sidecar_exec = profile == Profile::SidecarExec;
    let workspace = settings.workspace_path.as_str();

    // Injected containers go first among the init containers, in a fixed order.
    let mut init: Vec<Value> = vec![proxy_container(profile, proxy, settings, namespace)];
    if sidecar_exec {
        init.push(exec_container(settings));
    }
    let user_init = array(spec, "initContainers")
        .iter()
        .filter(|c| !keys::RESERVED_CONTAINERS.contains(&name_of(c)))
        .cloned();
    init.extend(user_init);
    spec.insert("initContainers".into(), Value::Array(init));

    let volumes = match spec.get_mut("volumes") {
        Some(Value::Array(v)) => v,
        _ => {
            spec.insert("volumes".into(), Value::Array(Vec::new()));
            match spec.get_mut("volumes") {
                Some(Value::Array(v)) => v,
                _ => unreachable!("volumes was just set to an array"),
            }
        }
    };
    // Injected volumes go last, in a fixed order.
    volumes.retain(|v| !keys::RESERVED_VOLUMES.contains(&name_of(v)));
    if sidecar_exec {
        volumes.push(json!({"name": WORKSPACE_VOLUME, "emptyDir": {}}));
    }
    volumes.extend(proxy.volumes());
    if volumes.is_empty() {
        spec.remove("volumes");
    }

    let proxy_url = format!("http://127.0.0.1:{}/mcp", settings.proxy.port);
    for list in ["initContainers", "containers"] {
        let Some(Value::Array(items)) = spec.get_mut(list) else {
            continue;
        };
        for c in items.iter_mut() {
            if keys::RESERVED_CONTAINERS.contains(&name_of(c)) {
                continue;
            }
            let Value::Object(c) = c else { continue };
            set_env(c, env::PROXY_URL, Some(&proxy_url));
            set_env(c, env::PROFILE, Some(profile.as_str()));
            let in_containers = list == "containers";
            set_env(
                c,
                env::WORKSPACE,
                (sidecar_exec && in_containers).then_some(workspace),
            );
            set_workspace_mount(c, sidecar_exec && in_containers, workspace, out);
        }
    }
}

/// Sets (in place, keeping the position) or removes an env var.
fn set_env(c: &mut Map<String, Value>, name: &str, value: Option<&str>) {
    let vars = match (c.get_mut("env"), value) {
        (Some(Value::Array(v)), _) => v,
        (_, None) => return,
        (_, Some(_)) => {
            c.insert("env".into(), Value::Array(Vec::new()));
            match c.get_mut("env") {
                Some(Value::Array(v)) => v,
                _ => unreachable!("env was just set to an array"),
            }
        }
    };
    // Every duplicate goes: the kubelet uses the last one, so a second entry would win.
    let first = vars.iter().position(|e| name_of(e) == name);
    vars.retain(|e| name_of(e) != name);
    if let Some(v) = value {
        let entry = json!({"name": name, "value": v});
        match first {
            Some(i) => vars.insert(i.min(vars.len()), entry),
            None => vars.push(entry),
        }
    }
    if vars.is_empty() {
        c.remove("env");
    }
}

fn set_workspace_mount(c: &mut Map<String, Value>, wanted: bool, path: &str, out: &mut Applied) {
    let cname = c
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let mounts = match c.get_mut("volumeMounts") {
        Some(Value::Array(m)) => m,
        _ if !wanted => return,
        _ => {
            c.insert("volumeMounts".into(), Value::Array(Vec::new()));
            match c.get_mut("volumeMounts") {
                Some(Value::Array(m)) => m,
                _ => unreachable!("volumeMounts was just set to an array"),
            }
        }
    };
    if wanted {
        let clash = mounts.iter().find(|m| {
            name_of(m) != WORKSPACE_VOLUME
                && m.get("mountPath").and_then(Value::as_str) == Some(path)
        });
        if let Some(m) = clash {
            out.denials.push(format!(
                "container {cname} already mounts volume {} at {path}, where sidecar-exec mounts \
                 the shared workspace",
                name_of(m)
            ));
            return;
        }
        let mount = json!({"name": WORKSPACE_VOLUME, "mountPath": path});
        match mounts.iter().position(|m| name_of(m) == WORKSPACE_VOLUME) {
            Some(i) => mounts[i] = mount,
            None => mounts.push(mount),
        }
    } else {
        mounts.retain(|m| name_of(m) != WORKSPACE_VOLUME);
    }
    if mounts.is_empty() {
        c.remove("volumeMounts");
    }
}

/// The hardened security context of the injected containers.
fn injected_security_context(settings: &Settings) -> Value {
    json!({
        "runAsNonRoot": true,
        "runAsUser": settings.default_run_as_user,
        "runAsGroup": settings.default_run_as_user,
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    })
}

/// What an injected container is made of, from its settings.
struct Sidecar<'a> {
    name: &'a str,
    image: &'a str,
    image_pull_policy: &'a str,
    port: u16,
    resources: &'a Value,
}

/// Fields the API server would default are set explicitly, so that a stored template, and a pod
/// or ReplicaSet made from it, come back unchanged (otherwise the Deployment controller sees a
/// new template and creates ReplicaSets forever).
fn sidecar_base(c: Sidecar<'_>, settings: &Settings, args: Vec<String>) -> Value {
    json!({
        "name": c.name,
        "image": c.image,
        "imagePullPolicy": c.image_pull_policy,
        "args": args,
        "restartPolicy": "Always",
        "resources": c.resources,
        "securityContext": injected_security_context(settings),
        "startupProbe": {
            "exec": {"command": [
                "agentvm-sidecar", "probe", format!("http://127.0.0.1:{}/healthz", c.port)]},
            "initialDelaySeconds": 0,
            "timeoutSeconds": 1,
            "periodSeconds": 1,
            "successThreshold": 1,
            "failureThreshold": 30,
        },
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "FallbackToLogsOnError",
    })
}

fn field_env(name: &str, path: &str) -> Value {
    json!({"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}})
}

fn proxy_container(
    profile: Profile,
    proxy: &ProxyMounts,
    settings: &Settings,
    namespace: &str,
) -> Value {
    let p = &settings.proxy;
    let mut args = vec![
        "proxy".into(),
        "--listen".into(),
        format!("127.0.0.1:{}", p.port),
    ];
    args.extend(proxy.args());
    let sidecar = Sidecar {
        name: keys::PROXY_CONTAINER,
        image: &p.image,
        image_pull_policy: &p.image_pull_policy,
        port: p.port,
        resources: &p.resources,
    };
    let mut c = sidecar_base(sidecar, settings, args);
    let mut vars = vec![json!({"name": env::PROFILE, "value": profile.as_str()})];
    if let Some(endpoint) = settings.exec_endpoint(profile, namespace) {
        vars.push(json!({"name": env::EXEC_ENDPOINT, "value": endpoint}));
    }
    vars.push(field_env("AGENTVM_POD_NAME", "metadata.name"));
    vars.push(field_env("AGENTVM_POD_NAMESPACE", "metadata.namespace"));
    vars.push(field_env(
        "AGENTVM_SERVICE_ACCOUNT",
        "spec.serviceAccountName",
    ));
    c["env"] = Value::Array(vars);
    let mounts = proxy.mounts();
    if !mounts.is_empty() {
        c["volumeMounts"] = Value::Array(mounts);
    }
    c
}

fn exec_container(settings: &Settings) -> Value {
    let listen = format!("127.0.0.1:{}", settings.exec.port);
    let workspace = settings.workspace_path.clone();
    let e = &settings.exec;
    let sidecar = Sidecar {
        name: keys::EXEC_CONTAINER,
        image: &e.image,
        image_pull_policy: &e.image_pull_policy,
        port: e.port,
        resources: &e.resources,
    };
    let mut c = sidecar_base(
        sidecar,
        settings,
        // The root filesystem is read-only: commands get the workspace as TMPDIR.
        vec![
            "exec".into(),
            "--listen".into(),
            listen,
            "--workspace".into(),
            workspace.clone(),
            "--tmpdir".into(),
            workspace.clone(),
        ],
    );
    c["volumeMounts"] = json!([{"name": WORKSPACE_VOLUME, "mountPath": workspace}]);
    c
}

fn harden(spec: &mut Map<String, Value>, settings: &Settings) {
    if let Some(class) = &settings.runtime_class {
        spec.insert("runtimeClassName".into(), json!(class));
    }
    let pod = object_mut(spec, "securityContext");
    // A container that already runs with runAsNonRoot: true and no user id has an image with a
    // numeric non-root USER: it keeps it. Where agentvm introduces runAsNonRoot, it also sets a
    // numeric user, or the kubelet would refuse images whose USER is a name or root.
    let pod_user = pod.contains_key("runAsUser");
    let pod_non_root = pod.get("runAsNonRoot") == Some(&Value::Bool(true));
    pod.insert("runAsNonRoot".into(), Value::Bool(true));
    set_runtime_default_seccomp(pod, true);

    for list in CONTAINER_LISTS {
        let Some(Value::Array(items)) = spec.get_mut(list) else {
            continue;
        };
        for c in items.iter_mut() {
            let Value::Object(c) = c else { continue };
            let sc = object_mut(c, "securityContext");
            let non_root = match sc.get("runAsNonRoot") {
                Some(Value::Bool(b)) => *b,
                _ => pod_non_root,
            };
            if !pod_user && !non_root && !sc.contains_key("runAsUser") {
                sc.insert("runAsUser".into(), json!(settings.default_run_as_user));
            }
            if sc.get("runAsNonRoot") == Some(&Value::Bool(false)) {
                sc.insert("runAsNonRoot".into(), Value::Bool(true));
            }
            sc.insert("allowPrivilegeEscalation".into(), Value::Bool(false));
            if settings.read_only_root_filesystem {
                sc.insert("readOnlyRootFilesystem".into(), Value::Bool(true));
            }
            set_runtime_default_seccomp(sc, false);
            let caps = object_mut(sc, "capabilities");
            let drop = caps
                .entry("drop")
                .or_insert_with(|| Value::Array(Vec::new()));
            if !drop.is_array() {
                *drop = Value::Array(Vec::new());
            }
            if let Value::Array(drop) = drop {
                if !drop.iter().any(|d| d == "ALL") {
                    drop.push(json!("ALL"));
                }
            }
        }
    }
}

/// Pod level: always `RuntimeDefault`. Container level: an explicit profile other than
/// `RuntimeDefault` (Unconfined, Localhost) is replaced; an absent one inherits the pod's.
fn set_runtime_default_seccomp(sc: &mut Map<String, Value>, pod_level: bool) {
    let current = sc
        .get("seccompProfile")
        .and_then(|p| p.get("type"))
        .and_then(Value::as_str);
    let present = sc.contains_key("seccompProfile");
    if current != Some("RuntimeDefault") && (pod_level || present) {
        sc.insert("seccompProfile".into(), json!({"type": "RuntimeDefault"}));
    }
}

fn label(meta: &mut Map<String, Value>, profile: Profile, proxy: &ProxyMounts) {
    let labels = object_mut(meta, "labels");
    // Already there, or the pod is an agent because its namespace enforces the profile.
    labels.insert(keys::AGENT_LABEL.into(), json!("true"));
    labels.insert(EGRESS_LABEL.into(), json!("deny"));
    labels.insert(PROFILE_KEY.into(), json!(profile.as_str()));
    let annotations = object_mut(meta, "annotations");
    annotations.insert(
        APPLIED_ANNOTATION.into(),
        json!(applied_annotation(profile, proxy)),
    );
}
