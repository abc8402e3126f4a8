//! The proxy's config file (YAML): the upstream MCP servers it fronts and where the built-in
//! exec tool goes.
//!
//! ```yaml
//! upstreams:
//!   - name: github                 # tools appear to the agent as github__<tool>
//!     url: http://mcp-github.tools.svc:8080/mcp
//!     credentialFile: /var/run/agentvm/credentials/github   # optional bearer token
//! exec:
//!   endpoint: http://127.0.0.1:7412   # optional: enables the built-in exec tool
//! rateLimits:                         # optional
//!   - tool: exec                      # or "*" for every tool without its own entry
//!     perMinute: 60
//!     burst: 10                       # optional, perMinute when unset
//! ```

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Separator between the upstream name and the upstream's tool name in the names the agent
/// sees. Upstream names cannot contain `_`, so the first `__` always ends the upstream name.
pub const TOOL_SEPARATOR: &str = "__";

/// The upstream name the built-in tools (exec) are decided under.
pub const BUILTIN_UPSTREAM: &str = "agentvm";

/// The whole config file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProxyConfig {
    /// Upstream MCP servers.
    #[serde(default)]
    pub upstreams: Vec<UpstreamConfig>,
    /// The exec backend, when the profile has an exec surface.
    #[serde(default)]
    pub exec: Option<ExecBackend>,
    /// Per-tool rate limits; tools with no entry (and no `"*"` entry) are not limited.
    #[serde(default)]
    pub rate_limits: Vec<RateLimitConfig>,
}

/// A rate limit of one tool (`tool: exec`, `tool: github__create_issue`) or of every tool
/// without its own entry (`tool: "*"`), each tool with its own budget.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RateLimitConfig {
    /// Tool name as the agent sees it, or `*`.
    pub tool: String,
    /// Calls a minute, on average.
    pub per_minute: u32,
    /// Calls that may come at once after a quiet spell; `perMinute` when unset.
    #[serde(default)]
    pub burst: Option<u32>,
}

/// One upstream MCP server (Streamable HTTP).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UpstreamConfig {
    /// Lowercase letters, digits and `-`; prefixes its tool names.
    pub name: String,
    /// `http://host:port/path` of its MCP endpoint.
    pub url: String,
    /// File holding a bearer token sent upstream (re-read on every call, trailing newline
    /// stripped). Mounted into the proxy container only.
    #[serde(default)]
    pub credential_file: Option<PathBuf>,
    /// The folder `credential_file` must resolve into, when the proxy confines credentials
    /// (`--credentials-dir`); not part of the file.
    #[serde(skip)]
    pub credentials_dir: Option<PathBuf>,
}

/// Where the built-in exec tool sends commands.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ExecBackend {
    /// Base URL of an exec server or dispatcher (`POST {endpoint}/v1/exec`).
    pub endpoint: String,
}

/// Why a config file is refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid YAML for this schema.
    #[error("config is not valid: {0}")]
    Parse(#[source] serde_yaml::Error),
    /// A value is out of bounds.
    #[error("config is not valid: {0}")]
    Invalid(String),
}

impl ProxyConfig {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Like [`ProxyConfig::load`], but a file that does not exist gives `None`: it is mounted
    /// from a ConfigMap with `optional: true` that does not exist (yet), or lacks the key.
    pub fn load_if_present(path: &Path) -> Result<Option<Self>, ConfigError> {
        match Self::load(path) {
            Ok(config) => Ok(Some(config)),
            Err(ConfigError::Read { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Parses and checks config text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: ProxyConfig = if text.trim().is_empty() {
            ProxyConfig::default()
        } else {
            serde_yaml::from_str(text).map_err(ConfigError::Parse)?
        };
        config.check()?;
        Ok(config)
    }

    /// Refuses a `credentialFile` outside `dir` (relative, with `.` or `..`, or not below it),
    /// and has every upstream check again, when it reads the file, that the file resolves
    /// into `dir` (symbolic links included).
    pub fn confine_credentials(&mut self, dir: &Path) -> Result<(), ConfigError> {
        use std::path::Component;
        for u in &mut self.upstreams {
            if let Some(file) = &u.credential_file {
                let plain = file.is_absolute()
                    && file
                        .components()
                        .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
                if !plain || !file.starts_with(dir) || file == dir {
                    return Err(ConfigError::Invalid(format!(
                        "credentialFile of upstream {} must be a file in {}",
                        u.name,
                        dir.display()
                    )));
                }
            }
            u.credentials_dir = Some(dir.to_path_buf());
        }
        Ok(())
    }

    /// Checks names and URLs (done by [`ProxyConfig::parse`]; call again after changing it).
    pub fn check(&self) -> Result<(), ConfigError> {
        let mut seen = HashSet::new();
        for u in &self.upstreams {
            if !valid_name(&u.name) {
                return Err(ConfigError::Invalid(format!(
                    "upstream name {:?} must be 1-32 lowercase letters, digits or '-'",
                    u.name
                )));
            }
            if u.name == BUILTIN_UPSTREAM {
                return Err(ConfigError::Invalid(format!(
                    "upstream name {BUILTIN_UPSTREAM:?} is reserved"
                )));
            }
            if !seen.insert(u.name.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "upstream name {:?} appears twice",
                    u.name
                )));
            }
            check_url(&u.url, &format!("upstream {}", u.name))?;
        }
        if let Some(exec) = &self.exec {
            check_url(&exec.endpoint, "exec endpoint")?;
        }
        let mut limited = HashSet::new();
        for l in &self.rate_limits {
            if l.per_minute == 0 || l.burst == Some(0) {
                return Err(ConfigError::Invalid(format!(
                    "rate limit of {:?}: perMinute and burst must be at least 1",
                    l.tool
                )));
            }
            if !limited.insert(l.tool.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "rate limit of {:?} appears twice",
                    l.tool
                )));
            }
        }
        Ok(())
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn check_url(url: &str, what: &str) -> Result<(), ConfigError> {
    let parsed: Result<axum::http::Uri, _> = url.parse();
    match parsed {
        Ok(uri) if uri.scheme_str() == Some("http") && uri.host().is_some() => Ok(()),
        _ => Err(ConfigError::Invalid(format!(
            "{what}: url {url:?} must be http://host[:port]/path (https is not supported yet)"
        ))),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_example() {
        let c = ProxyConfig::parse(
            "upstreams:\n  - name: github\n    url: http://mcp-github.tools.svc:8080/mcp\n    \
             credentialFile: /var/run/agentvm/credentials/github\nexec:\n  endpoint: \
             http://127.0.0.1:7412\n",
        )
        .unwrap();
        assert_eq!(c.upstreams[0].name, "github");
        assert_eq!(
            c.upstreams[0].credential_file.as_deref(),
            Some(Path::new("/var/run/agentvm/credentials/github"))
        );
        assert_eq!(c.exec.unwrap().endpoint, "http://127.0.0.1:7412");
        assert_eq!(ProxyConfig::parse("").unwrap(), ProxyConfig::default());
    }

    #[test]
    fn a_missing_file_is_none_only_when_asked_and_a_bad_one_stays_an_error() {
        let dir = std::env::temp_dir().join(format!("agentvm-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("config.yaml");
        assert!(ProxyConfig::load_if_present(&missing).unwrap().is_none());
        let err = ProxyConfig::load(&missing).unwrap_err().to_string();
        assert!(err.contains("cannot read config"), "{err}");
        std::fs::write(&missing, "upstreams: nope\n").unwrap();
        assert!(ProxyConfig::load_if_present(&missing).is_err());
        std::fs::write(&missing, "upstreams: []\n").unwrap();
        assert_eq!(
            ProxyConfig::load_if_present(&missing).unwrap(),
            Some(ProxyConfig::default())
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn credential_files_are_confined_to_their_folder() {
        let dir = Path::new("/var/run/agentvm/credentials");
        let with = |file: &str| {
            ProxyConfig::parse(&format!(
                "upstreams:\n  - name: gh\n    url: http://h/mcp\n    credentialFile: {file}\n"
            ))
            .unwrap()
        };
        let mut inside = with("/var/run/agentvm/credentials/gh");
        inside.confine_credentials(dir).unwrap();
        assert_eq!(inside.upstreams[0].credentials_dir.as_deref(), Some(dir));
        for outside in [
            "/etc/passwd",
            "/var/run/agentvm/credentials/../../../../etc/passwd",
            "/var/run/agentvm/credentials",
            "/var/run/agentvm/credentials-other/gh",
            "credentials/gh",
        ] {
            let err = with(outside).confine_credentials(dir).unwrap_err();
            assert!(
                err.to_string().contains("must be a file in"),
                "{outside}: {err}"
            );
        }
    }

    #[test]
    fn refuses_bad_configs() {
        for (text, needle) in [
            (
                "upstreams:\n  - name: Git_Hub\n    url: http://h/",
                "lowercase",
            ),
            (
                "upstreams:\n  - name: agentvm\n    url: http://h/",
                "reserved",
            ),
            (
                "upstreams:\n  - {name: a, url: 'http://h/'}\n  - {name: a, url: 'http://i/'}",
                "twice",
            ),
            (
                "upstreams:\n  - name: a\n    url: https://h/",
                "must be http",
            ),
            (
                "upstreams:\n  - name: a\n    url: http://h/\n    token: x",
                "unknown field",
            ),
            ("exec:\n  endpoint: /tmp/sock", "must be http"),
            ("rateLimits:\n  - {tool: exec, perMinute: 0}", "at least 1"),
            (
                "rateLimits:\n  - {tool: x, perMinute: 1}\n  - {tool: x, perMinute: 2}",
                "twice",
            ),
        ] {
            let err = ProxyConfig::parse(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }
}
