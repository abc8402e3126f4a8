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
