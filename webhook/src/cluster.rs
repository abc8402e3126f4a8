//! What `serve` asks the cluster before a review: the pod a CONNECT review targets (CONNECT
//! reviews carry only the exec/attach/port-forward options, never the pod), and the labels of the
//! request's namespace (policy input, and `agentvm.dev/enforce`). Without cluster access the
//! webhook still runs, and says so in its answers.

use std::time::Duration;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::Api;
use serde_json::{Map, Value};

use crate::admission::{Facts, Reviewer, Target};
use crate::review::Request;

/// Namespace labels by name, with the time they were read.
type NamespaceCache = HashMap<String, (Instant, Map<String, Value>)>;

/// How long namespace labels are reused before they are read again.
const NAMESPACE_TTL: Duration = Duration::from_secs(30);

/// How long a CONNECT review waits for its pod lookup; the API server's own webhook timeout is
/// a few seconds and an exec should not fail because of a slow lookup.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the cluster cannot be reached.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Neither in-cluster configuration nor a kubeconfig was found or usable.
    #[error("no cluster configuration: {0}")]
    Config(String),
}

/// A client of the cluster the webhook serves.
#[derive(Clone)]
pub struct Cluster {
    client: kube::Client,
    namespaces: Arc<Mutex<NamespaceCache>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").finish_non_exhaustive()
    }
}

impl Cluster {
    /// Connects the way kubectl does: in-cluster service account, else `KUBECONFIG` or
    /// `~/.kube/config`.
    pub async fn infer() -> Result<Self, ClusterError> {
        let config = kube::Config::infer()
            .await
            .map_err(|e| ClusterError::Config(e.to_string()))?;
        Self::from_config(config)
    }

    /// A cluster behind an explicit configuration (tests point it at a stand-in API server).
    pub fn from_config(config: kube::Config) -> Result<Self, ClusterError> {
        let client =
            kube::Client::try_from(config).map_err(|e| ClusterError::Config(e.to_string()))?;
        Ok(Self {
            client,
            namespaces: Arc::default(),
        })
    }

    /// The client, for the other parts that talk to the cluster.
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// The pod `name` in `namespace`, as JSON.
    pub async fn pod(&self, namespace: &str, name: &str) -> Target {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        match tokio::time::timeout(LOOKUP_TIMEOUT, api.get_opt(name)).await {
            Ok(Ok(Some(pod))) => match serde_json::to_value(pod) {
                Ok(v) => Target::Found(v),
                Err(e) => {
                    Target::Unknown(format!("pod {namespace}/{name} does not serialise: {e}"))
                }
            },
            Ok(Ok(None)) => Target::NotFound,
            Ok(Err(e)) => Target::Unknown(format!("lookup of pod {namespace}/{name} failed: {e}")),
            Err(_) => Target::Unknown(format!("lookup of pod {namespace}/{name} timed out")),
        }
    }
}

impl Cluster {
    /// What the review of `req` needs to know from the cluster.
    pub async fn facts(&self, req: &Request) -> Facts {
        let mut facts = Facts::default();
        if let Some((ns, name)) = Reviewer::connect_target(req) {
            facts.target = self.pod(ns, name).await;
        }
        if !req.namespace.is_empty() {
            facts.namespace_labels = self.namespace_labels(&req.namespace).await;
        }
        facts
    }

    /// Labels of a namespace, read at most every 30 s per namespace; `None` when they cannot be
    /// read (a namespace-wide `agentvm.dev/enforce` then goes unseen: pods labelled as agents
    /// are still locked down).
    pub async fn namespace_labels(&self, name: &str) -> Option<Map<String, Value>> {
        if let Ok(cache) = self.namespaces.lock() {
            if let Some((at, labels)) = cache.get(name) {
                if at.elapsed() < NAMESPACE_TTL {
                    return Some(labels.clone());
                }
            }
        }
        let api: Api<Namespace> = Api::all(self.client.clone());
        let labels = match tokio::time::timeout(LOOKUP_TIMEOUT, api.get_opt(name)).await {
            Ok(Ok(Some(ns))) => ns
                .metadata
                .labels
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect::<Map<String, Value>>(),
            Ok(Ok(None)) => Map::new(),
            Ok(Err(e)) => {
                tracing::warn!(namespace = name, error = %e, "cannot read namespace labels");
                return None;
            }
            Err(_) => {
                tracing::warn!(namespace = name, "reading namespace labels timed out");
                return None;
            }
        };
        if let Ok(mut cache) = self.namespaces.lock() {
            cache.insert(name.to_owned(), (Instant::now(), labels.clone()));
        }
        Some(labels)
    }
}
