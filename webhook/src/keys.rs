//! The names users type: labels, annotations, container and volume names. They are a contract;
//! keep them stable.

/// Label that marks a Pod or pod template as an agent (value exactly `"true"`).
pub const AGENT_LABEL: &str = "agentvm.dev/agent";
/// Label or annotation that requests a profile; as a label, the webhook sets the effective one.
pub const PROFILE_KEY: &str = "agentvm.dev/profile";
/// Label the deny-egress NetworkPolicy selects.
pub const EGRESS_LABEL: &str = "agentvm.dev/egress";
/// Annotation that records what the webhook applied.
pub const APPLIED_ANNOTATION: &str = "agentvm.dev/applied";
/// Label of exec pods and dispatcher Jobs (`exec`).
pub const ROLE_LABEL: &str = "agentvm.dev/role";
/// Namespace label that makes every pod in the namespace an agent.
pub const ENFORCE_LABEL: &str = "agentvm.dev/enforce";
/// Annotation by which a workload names the ConfigMap of its proxy's config, in its namespace.
pub const PROXY_CONFIG_ANNOTATION: &str = "agentvm.dev/proxy-config";
/// Annotation by which a workload names the Secret of its proxy's upstream credentials.
pub const PROXY_CREDENTIALS_ANNOTATION: &str = "agentvm.dev/proxy-credentials";
/// Prefix shared by every key above.
pub const KEY_PREFIX: &str = "agentvm.dev/";

/// The injected tool-call proxy container.
pub const PROXY_CONTAINER: &str = "agentvm-proxy";
/// The injected exec server container (`sidecar-exec` only).
pub const EXEC_CONTAINER: &str = "agentvm-exec";
/// The shared workspace volume (`sidecar-exec` only).
pub const WORKSPACE_VOLUME: &str = "agentvm-workspace";
/// Container names only the webhook may use.
pub const RESERVED_CONTAINERS: [&str; 2] = [PROXY_CONTAINER, EXEC_CONTAINER];
/// The proxy's config ConfigMap volume, mounted at [`PROXY_CONFIG_DIR`].
pub const PROXY_CONFIG_VOLUME: &str = "agentvm-proxy-config";
/// The proxy's tool policy ConfigMap volume, mounted at [`PROXY_POLICY_DIR`].
pub const PROXY_POLICY_VOLUME: &str = "agentvm-proxy-policy";
/// The proxy's credentials Secret volume, mounted at [`PROXY_CREDENTIALS_DIR`].
pub const PROXY_CREDENTIALS_VOLUME: &str = "agentvm-proxy-credentials";
/// Volumes only the proxy container may mount.
pub const PROXY_VOLUMES: [&str; 3] = [
    PROXY_CONFIG_VOLUME,
    PROXY_POLICY_VOLUME,
    PROXY_CREDENTIALS_VOLUME,
];
/// Volume names only the webhook may use.
pub const RESERVED_VOLUMES: [&str; 4] = [
    WORKSPACE_VOLUME,
    PROXY_CONFIG_VOLUME,
    PROXY_POLICY_VOLUME,
    PROXY_CREDENTIALS_VOLUME,
];
/// Where the proxy container finds its config ConfigMap.
pub const PROXY_CONFIG_DIR: &str = "/etc/agentvm/proxy";
/// The key of the config file in that ConfigMap.
pub const PROXY_CONFIG_KEY: &str = "config.yaml";
/// Where the proxy container finds its tool policy ConfigMap.
pub const PROXY_POLICY_DIR: &str = "/etc/agentvm/tools";
/// Where the proxy container finds its credentials Secret (`credentialFile` paths point here).
pub const PROXY_CREDENTIALS_DIR: &str = "/var/run/agentvm/credentials";

/// Where Kubernetes mounts the service-account token.
pub const SERVICE_ACCOUNT_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Environment variables the agent containers get.
pub mod env {
    /// URL of the proxy's MCP endpoint.
    pub const PROXY_URL: &str = "AGENTVM_PROXY_URL";
    /// The effective profile.
    pub const PROFILE: &str = "AGENTVM_PROFILE";
    /// Where the proxy sends exec requests.
    pub const EXEC_ENDPOINT: &str = "AGENTVM_EXEC_ENDPOINT";
    /// The shared workspace (`sidecar-exec`).
    pub const WORKSPACE: &str = "AGENTVM_WORKSPACE";
}
