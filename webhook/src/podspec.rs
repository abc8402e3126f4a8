//! Small helpers over pod specs held as JSON: the three container lists, maps that may be
//! missing, volume classification. Shared by the mutation and the conformance check.

use serde_json::{Map, Value};

use crate::keys::{PROXY_VOLUMES, SERVICE_ACCOUNT_PATH};

/// The container lists of a pod spec, in the order the kubelet starts them.
pub const CONTAINER_LISTS: [&str; 3] = ["initContainers", "containers", "ephemeralContainers"];

/// The object at `key`, created (or replacing a non-object) when needed.
pub fn object_mut<'a>(map: &'a mut Map<String, Value>, key: &str) -> &'a mut Map<String, Value> {
    let slot = map
        .entry(key.to_owned())
        .or_insert_with(|| Value::Object(Map::new()));
    if !slot.is_object() {
        *slot = Value::Object(Map::new());
    }
    match slot {
        Value::Object(m) => m,
        _ => unreachable!("the slot was made an object above"),
    }
}

/// The array at `key`, or an empty slice.
pub fn array<'a>(map: &'a Map<String, Value>, key: &str) -> &'a [Value] {
    map.get(key)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// `name` of an entry, or an empty string.
pub fn name_of(entry: &Value) -> &str {
    entry.get("name").and_then(Value::as_str).unwrap_or("")
}

/// Every container of a spec with the list it is in.
pub fn containers(spec: &Map<String, Value>) -> impl Iterator<Item = (&'static str, &Value)> {
    CONTAINER_LISTS
        .into_iter()
        .flat_map(move |list| array(spec, list).iter().map(move |c| (list, c)))
}

/// The proxy's volumes (config, tool policy, credentials) a container mounts.
pub fn proxy_volume_mounts(container: &Value) -> impl Iterator<Item = &str> {
    container
        .get("volumeMounts")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(name_of)
        .filter(|v| PROXY_VOLUMES.contains(v))
}

/// Whether a volume is a projected volume with a service-account token source.
pub fn is_token_volume(volume: &Value) -> bool {
    projected_sources(volume)
        .iter()
        .any(|s| s.get("serviceAccountToken").is_some())
}

/// The sources of a projected volume (empty for other volumes).
pub fn projected_sources(volume: &Value) -> &[Value] {
    volume
        .pointer("/projected/sources")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// Whether a mount path is the service-account path or below it.
pub fn is_service_account_path(path: &str) -> bool {
    let path = path.trim_end_matches('/');
    path == SERVICE_ACCOUNT_PATH
        || path
            .strip_prefix(SERVICE_ACCOUNT_PATH)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// The Secret an env var reads, as `(secret, key)`.
pub fn env_secret(env: &Value) -> Option<(&str, &str)> {
    let r = env.pointer("/valueFrom/secretKeyRef")?;
    Some((
        r.get("name").and_then(Value::as_str).unwrap_or(""),
        r.get("key").and_then(Value::as_str).unwrap_or(""),
    ))
}

/// The Secret an `envFrom` entry reads.
pub fn env_from_secret(entry: &Value) -> Option<&str> {
    let r = entry.get("secretRef")?;
    Some(r.get("name").and_then(Value::as_str).unwrap_or(""))
}

/// What a volume mounts that is a credential, for messages: a `secret` volume, or an inline
/// `csi` volume (secrets-store and similar drivers put credentials in the pod).
pub fn credential_volume(volume: &Value) -> Option<String> {
    if let Some(s) = volume.get("secret") {
        let name = s.get("secretName").and_then(Value::as_str).unwrap_or("");
        return Some(format!("Secret {name}"));
    }
    let csi = volume.get("csi")?;
    let driver = csi.get("driver").and_then(Value::as_str).unwrap_or("");
    Some(format!("CSI driver {driver}"))
}

/// Whether a projected volume source carries a credential: a Secret, or a pod certificate with
/// its private key.
pub fn is_credential_source(source: &Value) -> bool {
    source.get("secret").is_some() || source.get("podCertificate").is_some()
}

/// The credential sources of a projected volume, for messages.
pub fn projected_credentials(volume: &Value) -> Vec<String> {
    projected_sources(volume)
        .iter()
        .filter(|s| is_credential_source(s))
        .map(|s| match s.get("secret") {
            Some(secret) => {
                format!(
                    "Secret {}",
                    secret.get("name").and_then(Value::as_str).unwrap_or("")
                )
            }
            None => "podCertificate".to_owned(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn service_account_path_matches_the_folder_and_below_only() {
        assert!(is_service_account_path(
            "/var/run/secrets/kubernetes.io/serviceaccount"
        ));
        assert!(is_service_account_path(
            "/var/run/secrets/kubernetes.io/serviceaccount/"
        ));
        assert!(is_service_account_path(
            "/var/run/secrets/kubernetes.io/serviceaccount/token"
        ));
        assert!(!is_service_account_path(
            "/var/run/secrets/kubernetes.io/serviceaccounts"
        ));
        assert!(!is_service_account_path("/var/run/secrets"));
    }

    #[test]
    fn token_volumes_are_found_by_source_not_by_name() {
        let v = json!({"name": "anything", "projected": {"sources": [
            {"configMap": {"name": "kube-root-ca.crt"}}, {"serviceAccountToken": {"path": "t"}}]}});
        assert!(is_token_volume(&v));
        assert!(!is_token_volume(
            &json!({"name": "kube-api-access-x", "emptyDir": {}})
        ));
    }

    #[test]
    fn object_mut_creates_and_replaces_non_objects() {
        let mut m = Map::new();
        m.insert("a".into(), json!(null));
        object_mut(&mut m, "a").insert("x".into(), json!(1));
        object_mut(&mut m, "b");
        assert_eq!(Value::Object(m), json!({"a": {"x": 1}, "b": {}}));
    }
}
