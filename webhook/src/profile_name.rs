//! The four execution profiles.

use std::fmt;
use std::str::FromStr;

/// An execution profile: how much exec surface an agent pod gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Profile {
    /// No exec surface: tools only, through the proxy.
    NoExec,
    /// An exec server container in the pod, sharing a workspace volume.
    SidecarExec,
    /// A separate exec pod with deny-all egress.
    ExecPod,
    /// One ephemeral Job per exec request.
    Dispatcher,
}

impl Profile {
    /// Every profile, safest first.
    pub const ALL: [Profile; 4] = [
        Profile::NoExec,
        Profile::SidecarExec,
        Profile::ExecPod,
        Profile::Dispatcher,
    ];

    /// The name users type.
    pub fn as_str(self) -> &'static str {
        match self {
            Profile::NoExec => "no-exec",
            Profile::SidecarExec => "sidecar-exec",
            Profile::ExecPod => "exec-pod",
            Profile::Dispatcher => "dispatcher",
        }
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Profile {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Profile::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("unknown profile {s:?}"))
    }
}
