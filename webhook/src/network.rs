//! The deny-egress NetworkPolicy: no agent pod is admitted into a namespace unless the policy
//! that selects `agentvm.dev/egress: deny` exists there, or is created in the same admission (not
//! on dry runs). A reconciler puts it back when it is deleted or changed.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, PostParams};
use serde_json::{json, Value};

use crate::keys::{EGRESS_LABEL, ROLE_LABEL};
use crate::settings::Settings;

/// Name of the NetworkPolicy in each agent namespace.
pub const POLICY_NAME: &str = "agentvm-deny-egress";

/// Label on the objects agentvm manages.
const MANAGED_BY: &str = "app.kubernetes.io/managed-by";

/// Why the NetworkPolicy could not be made.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The API server refused or failed.
    #[error("cannot ensure NetworkPolicy {POLICY_NAME} in namespace {namespace}: {message}")]
    Api {
        /// The namespace.
        namespace: String,
        /// What went wrong.
        message: String,
    },
}

/// The NetworkPolicy agentvm wants in `namespace`.
pub fn desired(namespace: &str, settings: &Settings) -> Value {
    let mut egress = Vec::new();
    if settings.network.cluster_dns {
        egress.push(json!({
            "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                    "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
            "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
        }));
    }
    // The namespace's exec pod (profile exec-pod) and dispatcher (profile dispatcher).
    egress.push(json!({
        "to": [{"podSelector": {"matchExpressions": [
            {"key": ROLE_LABEL, "operator": "In", "values": ["exec", "dispatcher"]}]}}],
        "ports": [{"protocol": "TCP", "port": settings.exec.port}],
    }));
    for cidr in &settings.network.allowed_cidrs {
        egress.push(json!({"to": [{"ipBlock": {"cidr": cidr}}]}));
    }
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": POLICY_NAME, "namespace": namespace, "labels": {MANAGED_BY: "agentvm"}},
        "spec": {
            "podSelector": {"matchLabels": {EGRESS_LABEL: "deny"}},
            "policyTypes": ["Egress"],
            "egress": egress,
        },
    })
}

/// Keeps the NetworkPolicy in the namespaces where agents were admitted.
#[derive(Clone)]
pub struct NetworkPolicies {
    client: kube::Client,
    namespaces: Arc<Mutex<BTreeSet<String>>>,
}

impl std::fmt::Debug for NetworkPolicies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetworkPolicies").finish_non_exhaustive()
    }
}

impl NetworkPolicies {
    /// Over a cluster client.
    pub fn new(client: kube::Client) -> Self {
        Self {
            client,
            namespaces: Arc::default(),
        }
    }

    /// Makes sure the NetworkPolicy in `namespace` is the one wanted: created when missing,
    /// replaced when changed. With `dry_run`, nothing is written (and a missing policy is not an
    /// error: the dry run shows what the real request would do).
    pub async fn ensure(
        &self,
        namespace: &str,
        settings: &Settings,
        dry_run: bool,
    ) -> Result<(), NetworkError> {
        // Checked on every admission: a cached "it was there" would admit agents into a
        // namespace whose policy was just deleted.
        self.check_and_fix(namespace, settings, dry_run).await?;
        if !dry_run {
            // Only namespaces where the policy now exists are kept up: a review for a namespace
            // that does not exist (anyone can POST to a webhook) leaves nothing behind.
            if let Ok(mut set) = self.namespaces.lock() {
                set.insert(namespace.to_owned());
            }
        }
        Ok(())
    }

    /// Adds every namespace that already has agentvm's policy to the reconcile set (after a
    /// restart, policies deleted meanwhile are then restored without waiting for an admission).
    pub async fn seed(&self) -> Result<usize, NetworkError> {
        let api: Api<NetworkPolicy> = Api::all(self.client.clone());
        let params = kube::api::ListParams::default().labels(&format!("{MANAGED_BY}=agentvm"));
        let list = tokio::time::timeout(Duration::from_secs(10), api.list(&params))
            .await
            .map_err(|_| NetworkError::Api {
                namespace: "(all)".into(),
                message: "timed out".into(),
            })?
            .map_err(|e| NetworkError::Api {
                namespace: "(all)".into(),
                message: e.to_string(),
            })?;
        let mut set = match self.namespaces.lock() {
            Ok(set) => set,
            Err(_) => return Ok(0),
        };
        for p in list.items {
            if p.metadata.name.as_deref() == Some(POLICY_NAME) {
                if let Some(ns) = p.metadata.namespace {
                    set.insert(ns);
                }
            }
        }
        Ok(set.len())
    }

    async fn check_and_fix(
        &self,
        namespace: &str,
        settings: &Settings,
        dry_run: bool,
    ) -> Result<(), NetworkError> {
        let err = |message: String| NetworkError::Api {
            namespace: namespace.to_owned(),
            message,
        };
        let api: Api<NetworkPolicy> = Api::namespaced(self.client.clone(), namespace);
        let want: NetworkPolicy =
            serde_json::from_value(desired(namespace, settings)).map_err(|e| err(e.to_string()))?;
        let current = tokio::time::timeout(Duration::from_secs(2), api.get_opt(POLICY_NAME))
            .await
            .map_err(|_| err("timed out".into()))?
            .map_err(|e| err(e.to_string()))?;
        let written = match current {
            Some(cur) if cur.spec == want.spec => return Ok(()),
            _ if dry_run => return Ok(()),
            Some(cur) => {
                let mut replacement = want.clone();
                replacement.metadata.resource_version = cur.metadata.resource_version;
                let r = api
                    .replace(POLICY_NAME, &PostParams::default(), &replacement)
                    .await;
                if r.is_ok() {
                    tracing::warn!(
                        namespace,
                        "NetworkPolicy {POLICY_NAME} was changed; restored"
                    );
                }
                r.map(drop)
            }
            None => {
                let r = api.create(&PostParams::default(), &want).await;
                if r.is_ok() {
                    tracing::info!(namespace, "NetworkPolicy {POLICY_NAME} created");
                }
                r.map(drop)
            }
        };
        match written {
            Ok(()) => Ok(()),
            // Another replica wrote at the same moment: what counts is what is there now.
            Err(kube::Error::Api(e)) if e.code == 409 => {
                let now = tokio::time::timeout(Duration::from_secs(2), api.get_opt(POLICY_NAME))
                    .await
                    .map_err(|_| err("timed out".into()))?
                    .map_err(|e| err(e.to_string()))?;
                match now {
                    Some(p) if p.spec == want.spec => Ok(()),
                    _ => Err(err(
                        "changed concurrently; not the policy agentvm wants".into()
                    )),
                }
            }
            Err(e) => Err(err(e.to_string())),
        }
    }

    /// Puts back the NetworkPolicy in every namespace it was ensured in, where it was deleted
    /// or changed.
    pub async fn reconcile_once(&self, settings: &Settings) {
        let namespaces: Vec<String> = match self.namespaces.lock() {
            Ok(set) => set.iter().cloned().collect(),
            Err(_) => return,
        };
        for ns in namespaces {
            if let Err(e) = self.check_and_fix(&ns, settings, false).await {
                tracing::error!(error = %e, "NetworkPolicy reconcile failed");
            }
        }
    }

    /// Every `interval`, puts back the NetworkPolicy in every namespace it was ensured in.
    pub fn spawn_reconciler(
        &self,
        settings: impl Fn() -> Arc<crate::policies::Policies> + Send + 'static,
        interval: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                this.reconcile_once(settings().settings()).await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policies::Policies;

    #[test]
    fn agents_reach_dns_their_exec_surface_and_the_listed_cidrs_only() {
        let mut settings = Policies::shipped().unwrap().settings().clone();
        settings.network.allowed_cidrs = vec!["10.20.0.0/16".into()];
        let p = desired("team-a", &settings);
        assert_eq!(
            p["spec"]["podSelector"]["matchLabels"][EGRESS_LABEL],
            "deny"
        );
        assert_eq!(p["spec"]["policyTypes"], json!(["Egress"]));
        let egress = p["spec"]["egress"].as_array().unwrap();
        assert_eq!(egress.len(), 3);
        assert_eq!(egress[0]["ports"][0]["port"], 53);
        assert_eq!(
            egress[1]["to"][0]["podSelector"]["matchExpressions"][0]["values"],
            json!(["exec", "dispatcher"])
        );
        assert_eq!(egress[2]["to"][0]["ipBlock"]["cidr"], "10.20.0.0/16");
        settings.network.cluster_dns = false;
        settings.network.allowed_cidrs.clear();
        assert_eq!(
            desired("team-a", &settings)["spec"]["egress"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
        // It is a valid NetworkPolicy as far as the typed API goes.
        let _: NetworkPolicy = serde_json::from_value(p).unwrap();
    }
}
