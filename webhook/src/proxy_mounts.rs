//! What the injected proxy gets from the cluster: its config file and tool policy from
//! ConfigMaps and its upstream credentials from a Secret, each named by the decision's `proxy`
//! and mounted into the proxy container only.
//!
//! Volumes, not `subPath` mounts: the kubelet updates a mounted ConfigMap by swapping a link in
//! its folder, which the proxy's reload sees; a `subPath` mount never changes. Every volume is
//! `optional: true`, so that a missing object does not hold the pod in ContainerCreating: the
//! proxy starts without it (`--allow-missing`: no upstreams, every request denied without a
//! tool policy) and loads it when it appears.

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::keys::{
    PROXY_CONFIG_DIR, PROXY_CONFIG_KEY, PROXY_CONFIG_VOLUME, PROXY_CONTAINER,
    PROXY_CREDENTIALS_DIR, PROXY_CREDENTIALS_VOLUME, PROXY_POLICY_DIR, PROXY_POLICY_VOLUME,
};
use crate::podspec;

/// The file mode the API server gives ConfigMap and Secret volumes that set none (0644), spelled
/// out so that a stored template and the pods made from it come back unchanged.
const DEFAULT_MODE: u32 = 0o644;

/// The objects the proxy of one pod gets, by name, in the pod's namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyMounts {
    /// ConfigMap whose key `config.yaml` is the proxy config (upstreams, rate limits).
    #[serde(default)]
    pub config_map: Option<String>,
    /// ConfigMap of the tool policy (package `agentvm.tools`); the shipped one when none.
    #[serde(default)]
    pub policy_config_map: Option<String>,
    /// Secret of upstream credentials, one key per token.
    #[serde(default)]
    pub credentials_secret: Option<String>,
}

impl ProxyMounts {
    /// Reads the decision's `proxy` (null when a policy set does not define it: nothing is
    /// mounted), naming what is wrong with it.
    pub fn from_decision(value: &Value) -> Result<Self, String> {
        if value.is_null() {
            return Ok(Self::default());
        }
        let mounts = Self::deserialize(value).map_err(|e| e.to_string())?;
        for (field, name) in mounts.named() {
            check_name(field, name)?;
        }
        Ok(mounts)
    }

    /// Whether nothing is mounted.
    pub fn is_empty(&self) -> bool {
        self.named().next().is_none()
    }

    /// `(field, name)` of every object named.
    fn named(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [
            ("config_map", &self.config_map),
            ("policy_config_map", &self.policy_config_map),
            ("credentials_secret", &self.credentials_secret),
        ]
        .into_iter()
        .filter_map(|(field, name)| name.as_deref().map(|n| (field, n)))
    }

    /// The pod volumes, in a fixed order.
    pub fn volumes(&self) -> Vec<Value> {
        let mut out = Vec::new();
        let config_map = |volume: &str, name: &str| {
            json!({"name": volume, "configMap": {
                "name": name, "optional": true, "defaultMode": DEFAULT_MODE}})
        };
        if let Some(name) = &self.config_map {
            out.push(config_map(PROXY_CONFIG_VOLUME, name));
        }
        if let Some(name) = &self.policy_config_map {
            out.push(config_map(PROXY_POLICY_VOLUME, name));
        }
        if let Some(name) = &self.credentials_secret {
            out.push(json!({"name": PROXY_CREDENTIALS_VOLUME, "secret": {
                "secretName": name, "optional": true, "defaultMode": DEFAULT_MODE}}));
        }
        out
    }

    /// The proxy container's mounts of those volumes (whole folders, read-only).
    pub fn mounts(&self) -> Vec<Value> {
        let mount =
            |volume: &str, path: &str| json!({"name": volume, "mountPath": path, "readOnly": true});
        let mut out = Vec::new();
        if self.config_map.is_some() {
            out.push(mount(PROXY_CONFIG_VOLUME, PROXY_CONFIG_DIR));
        }
        if self.policy_config_map.is_some() {
            out.push(mount(PROXY_POLICY_VOLUME, PROXY_POLICY_DIR));
        }
        if self.credentials_secret.is_some() {
            out.push(mount(PROXY_CREDENTIALS_VOLUME, PROXY_CREDENTIALS_DIR));
        }
        out
    }

    /// The proxy's arguments that point it at the mounts.
    pub fn args(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.config_map.is_some() {
            out.push("--config".into());
            out.push(format!("{PROXY_CONFIG_DIR}/{PROXY_CONFIG_KEY}"));
            // The config names credential files; they may only be the Secret's.
            out.push("--credentials-dir".into());
            out.push(PROXY_CREDENTIALS_DIR.into());
        }
        if self.policy_config_map.is_some() {
            out.push("--policies".into());
            out.push(PROXY_POLICY_DIR.into());
        }
        if !self.is_empty() {
            out.push("--allow-missing".into());
        }
        out
    }

    /// What the `agentvm.dev/applied` annotation records: the names, without the unset ones.
    pub fn applied(&self) -> Value {
        let map: Map<String, Value> = self
            .named()
            .map(|(field, name)| (field.to_owned(), json!(name)))
            .collect();
        Value::Object(map)
    }

    /// Whether `volume` is the credentials volume exactly as this injects it (the one Secret
    /// volume an agent pod may have).
    pub fn is_credentials_volume(&self, volume: &Value) -> bool {
        let Some(secret) = &self.credentials_secret else {
            return false;
        };
        volume.get("name").and_then(Value::as_str) == Some(PROXY_CREDENTIALS_VOLUME)
            && volume.pointer("/secret/secretName").and_then(Value::as_str) == Some(secret)
    }
}

/// Ephemeral containers (`kubectl debug`) of `pod` that would reach the proxy's config, tool
/// policy or credentials: by mounting its volumes, or by targeting its container (whose
/// processes, and so whose files through `/proc`, they would share). One message each.
pub fn debug_reach(pod: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let containers = pod
        .pointer("/spec/ephemeralContainers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten();
    for c in containers {
        let name = podspec::name_of(c);
        for volume in podspec::proxy_volume_mounts(c) {
            out.push(format!(
                "ephemeral container {name} mounts volume {volume}, which only {PROXY_CONTAINER} \
                 may mount"
            ));
        }
        if c.get("targetContainerName").and_then(Value::as_str) == Some(PROXY_CONTAINER) {
            out.push(format!(
                "ephemeral container {name} targets {PROXY_CONTAINER}, whose credentials no \
                 debug container may reach"
            ));
        }
    }
    out
}

/// Whether `name` can name a ConfigMap or Secret: a DNS subdomain (RFC 1123), as the API server
/// checks it.
pub fn is_object_name(name: &str) -> bool {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    !name.is_empty() && name.len() <= 253 && name.split('.').all(label_ok)
}

/// An error naming `field` unless `name` is a valid object name.
pub fn check_name(field: &str, name: &str) -> Result<(), String> {
    if is_object_name(name) {
        Ok(())
    } else {
        Err(format!(
            "{field} {name:?} is not a ConfigMap or Secret name (lowercase letters, digits, '-' \
             and '.', at most 253)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_like_the_api_server_does() {
        for good in ["a", "agentvm-proxy", "team-a.tools", "0x"] {
            assert!(is_object_name(good), "{good}");
        }
        let long = "a".repeat(254);
        for bad in [
            "",
            "A",
            "-a",
            "a-",
            "a..b",
            "a_b",
            "a/b",
            ".a",
            long.as_str(),
        ] {
            assert!(!is_object_name(bad), "{bad}");
        }
    }

    #[test]
    fn the_decision_is_read_strictly() {
        assert_eq!(
            ProxyMounts::from_decision(&Value::Null).unwrap(),
            ProxyMounts::default()
        );
        let all_null = json!({"config_map": null, "policy_config_map": null,
            "credentials_secret": null});
        assert!(ProxyMounts::from_decision(&all_null).unwrap().is_empty());
        for (bad, word) in [
            (json!({"config_map": "Bad_Name"}), "config_map"),
            (json!({"credentials_secret": 3}), "invalid type"),
            (json!({"config": "x"}), "unknown field"),
            (json!("x"), "invalid type"),
        ] {
            let err = ProxyMounts::from_decision(&bad).unwrap_err();
            assert!(err.contains(word), "{bad}: {err}");
        }
    }

    #[test]
    fn only_what_is_named_is_mounted_and_the_proxy_is_pointed_at_it() {
        let config_only = ProxyMounts {
            config_map: Some("tools".into()),
            ..ProxyMounts::default()
        };
        assert_eq!(config_only.volumes().len(), 1);
        assert_eq!(
            config_only.args(),
            [
                "--config",
                "/etc/agentvm/proxy/config.yaml",
                "--credentials-dir",
                "/var/run/agentvm/credentials",
                "--allow-missing"
            ]
        );
        assert_eq!(config_only.applied(), json!({"config_map": "tools"}));
        let all = ProxyMounts {
            config_map: Some("c".into()),
            policy_config_map: Some("p".into()),
            credentials_secret: Some("s".into()),
        };
        let volumes = all.volumes();
        assert_eq!(volumes[2]["secret"]["optional"], true);
        assert!(all.is_credentials_volume(&volumes[2]));
        assert!(!config_only.is_credentials_volume(&volumes[2]));
        assert!(all.mounts().iter().all(|m| m["readOnly"] == true));
        assert!(all.args().contains(&"/etc/agentvm/tools".to_owned()));
        assert!(ProxyMounts::default().args().is_empty());
    }
}
