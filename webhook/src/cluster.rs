//! What `serve` asks the cluster: the pod a CONNECT review targets (CONNECT reviews carry only
//! the exec/attach/port-forward options, never the pod). Without cluster access the webhook
//! still runs, and says so in its answers.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;

use crate::admission::Target;

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
        Ok(Self { client })
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
