//! Settings: the part of the policy decision that does not depend on the request. Policies
//! define them as `data.agentvm.settings`; they are evaluated once, when the policies load, and
//! checked against this schema (unknown keys are an error, so a typo never goes unnoticed).

use serde::{Deserialize, Serialize};
#[cfg(test)]
use serde_json::json;
use serde_json::Value;

use crate::profile_name::Profile;

/// What to do with Secret-sourced credentials in an agent pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CredentialHandling {
    /// Remove them, with a warning naming each.
    Strip,
    /// Refuse the pod, naming each.
    Deny,
}

/// Every setting, with the shipped defaults in `policies/settings/policy.rego`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Namespaces whose pods are never touched, by exact name.
    pub excluded_namespaces: Vec<String>,
    /// Secret env vars, `envFrom` secrets and secret volumes: `strip` or `deny`.
    pub credentials: CredentialHandling,
    /// Give every container a read-only root filesystem.
    pub read_only_root_filesystem: bool,
    /// User id for pods that set none (the image's `USER` may be a name or root, which the
    /// kubelet refuses with `runAsNonRoot`).
    pub default_run_as_user: i64,
    /// `runtimeClassName` for agent pods (for example a gVisor or Kata class); none when null.
    pub runtime_class: Option<String>,
    /// Profiles agents may request.
    pub allowed_profiles: Vec<Profile>,
    /// The injected proxy container, and what it gets mounted.
    pub proxy: ProxySettings,
    /// The injected exec server container (`sidecar-exec`).
    pub exec: ContainerSettings,
    /// Where the proxy sends exec requests, by profile; `{namespace}` is replaced by the pod's
    /// namespace.
    pub exec_endpoints: ExecEndpoints,
    /// Mount path of the shared workspace (`sidecar-exec`).
    pub workspace_path: String,
    /// Interactive access to agent pods (`kubectl debug`, `exec`, `attach`, `port-forward`).
    pub debug: DebugSettings,
    /// The deny-egress NetworkPolicy `serve` keeps in every namespace with agents.
    pub network: NetworkSettings,
}

/// What the deny-egress NetworkPolicy lets agent pods reach.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSettings {
    /// Create and keep the NetworkPolicy (needs cluster access); agents are refused where it
    /// cannot be made.
    pub manage_network_policy: bool,
    /// Allow DNS to the cluster DNS pods (kube-system, `k8s-app: kube-dns`, port 53).
    pub cluster_dns: bool,
    /// CIDRs of tool upstreams the pods may reach.
    pub allowed_cidrs: Vec<String>,
}

/// One injected container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerSettings {
    /// Image reference.
    pub image: String,
    /// `imagePullPolicy`.
    pub image_pull_policy: String,
    /// Loopback port it listens on.
    pub port: u16,
    /// `resources` of the container, as in a pod spec.
    pub resources: Value,
}

/// The injected proxy: its container, and the ConfigMaps and Secret it gets, by name, in the
/// agent pod's namespace. The shipped policy `proxy/policy.rego` turns these into the decision's
/// `proxy`; Rust only checks them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySettings {
    /// Image reference.
    pub image: String,
    /// `imagePullPolicy`.
    pub image_pull_policy: String,
    /// Loopback port it listens on.
    pub port: u16,
    /// `resources` of the container, as in a pod spec.
    pub resources: Value,
    // The fields below default when missing, so that a copy of the settings made before they
    // existed still loads (with nothing mounted and no workload choice).
    /// ConfigMap whose key `config.yaml` is the proxy config.
    #[serde(default)]
    pub config_map: Option<String>,
    /// ConfigMap of the tool policy; the shipped tool policy when none.
    #[serde(default)]
    pub policy_config_map: Option<String>,
    /// Secret of upstream credentials, mounted with the platform's config only.
    #[serde(default)]
    pub credentials_secret: Option<String>,
    /// Workloads may name their own config ConfigMap (`agentvm.dev/proxy-config`).
    #[serde(default)]
    pub workload_config_map: bool,
    /// Workloads may name their own credentials Secret (`agentvm.dev/proxy-credentials`).
    #[serde(default)]
    pub workload_credentials_secret: bool,
}

/// Exec endpoints for the profiles without an exec server in the pod.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecEndpoints {
    /// `exec-pod`: the namespace's exec pod service.
    pub exec_pod: String,
    /// `dispatcher`: the namespace's dispatcher service.
    pub dispatcher: String,
}

/// Interactive access rules, read by the shipped debug policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DebugSettings {
    /// Allow ephemeral containers (`kubectl debug`) on agent pods.
    pub allow_ephemeral_containers: bool,
    /// Groups allowed to `exec`, `attach` and `port-forward` into agent pods.
    pub connect_allowed_groups: Vec<String>,
    /// Decision for CONNECT when the target pod cannot be looked up.
    pub connect_unknown_pod: UnknownPod,
}

/// What to do with a CONNECT review whose pod cannot be looked up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownPod {
    /// Allow, with a warning that says why.
    Allow,
    /// Deny, saying why.
    Deny,
}

impl Settings {
    /// Reads settings from the policy's value, naming the offending key on error.
    pub fn from_json(value: Value) -> Result<Self, String> {
        let settings: Settings = serde_json::from_value(value).map_err(|e| e.to_string())?;
        if settings.default_run_as_user <= 0 {
            return Err("default_run_as_user must be a positive (non-root) user id".into());
        }
        let workspace = settings.workspace_path.trim_end_matches('/');
        if !settings.workspace_path.starts_with('/') || workspace.is_empty() {
            return Err("workspace_path must be an absolute path other than /".into());
        }
        if crate::podspec::is_service_account_path(workspace)
            || workspace.starts_with("/var/run/secrets")
        {
            return Err("workspace_path must not be under /var/run/secrets".into());
        }
        if settings.proxy.port == 0
            || settings.exec.port == 0
            || settings.proxy.port == settings.exec.port
        {
            return Err("proxy.port and exec.port must be two different, non-zero ports".into());
        }
        if settings.runtime_class.as_deref() == Some("") {
            return Err("runtime_class must be null or a RuntimeClass name, not empty".into());
        }
        for (name, image) in [
            ("proxy", &settings.proxy.image),
            ("exec", &settings.exec.image),
        ] {
            if image.is_empty() {
                return Err(format!("{name}.image must not be empty"));
            }
        }
        let p = &settings.proxy;
        for (field, name) in [
            ("proxy.config_map", &p.config_map),
            ("proxy.policy_config_map", &p.policy_config_map),
            ("proxy.credentials_secret", &p.credentials_secret),
        ] {
            if let Some(name) = name {
                crate::proxy_mounts::check_name(field, name)?;
            }
        }
        Ok(settings)
    }

    /// The exec endpoint the proxy uses for `profile` in `namespace`, if the profile has one.
    pub fn exec_endpoint(&self, profile: Profile, namespace: &str) -> Option<String> {
        let template = match profile {
            Profile::NoExec => return None,
            Profile::SidecarExec => return Some(format!("http://127.0.0.1:{}", self.exec.port)),
            Profile::ExecPod => &self.exec_endpoints.exec_pod,
            Profile::Dispatcher => &self.exec_endpoints.dispatcher,
        };
        Some(template.replace("{namespace}", namespace))
    }

    /// Whether `namespace` is excluded by exact name.
    pub fn is_excluded(&self, namespace: &str) -> bool {
        self.excluded_namespaces.iter().any(|n| n == namespace)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policies::Policies;

    fn settings() -> Value {
        serde_json::to_value(Policies::shipped().unwrap().settings()).unwrap()
    }

    #[test]
    fn the_shipped_settings_pass_and_each_bad_one_is_named() {
        assert!(Settings::from_json(settings()).is_ok());
        let bad = [
            ("/workspace_path", json!("/"), "workspace_path"),
            ("/workspace_path", json!("relative"), "workspace_path"),
            ("/proxy/port", json!(0), "port"),
            ("/exec/port", json!(7411), "port"),
            ("/runtime_class", json!(""), "runtime_class"),
            ("/default_run_as_user", json!(0), "default_run_as_user"),
            (
                "/debug/connect_unknown_pod",
                json!("maybe"),
                "unknown variant",
            ),
            ("/credentials", json!("keep"), "unknown variant"),
            ("/proxy/config_map", json!("Tools"), "proxy.config_map"),
            (
                "/proxy/credentials_secret",
                json!(""),
                "proxy.credentials_secret",
            ),
            ("/proxy/workload_config_map", json!("yes"), "invalid type"),
        ];
        for (pointer, value, word) in bad {
            let mut s = settings();
            *s.pointer_mut(pointer).unwrap() = value;
            let err = Settings::from_json(s).unwrap_err();
            assert!(err.contains(word), "{pointer}: {err}");
        }
        let mut before_proxy_mounts = settings();
        for key in [
            "config_map",
            "policy_config_map",
            "credentials_secret",
            "workload_config_map",
            "workload_credentials_secret",
        ] {
            before_proxy_mounts["proxy"]
                .as_object_mut()
                .unwrap()
                .remove(key);
        }
        let old = Settings::from_json(before_proxy_mounts).unwrap();
        assert!(old.proxy.config_map.is_none() && !old.proxy.workload_config_map);
        let mut typo = settings();
        typo["debug"]["allow_ephemeral_container"] = json!(true);
        assert!(Settings::from_json(typo)
            .unwrap_err()
            .contains("unknown field"));
    }
}
