//! An exec request, checked and turned into a command: argv as given (no shell unless argv
//! names one), a working directory confined to the workspace, and an environment built from an
//! allow-list.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The body of `POST /v1/exec`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Program and arguments. The program is looked up in the command's `PATH`.
    pub argv: Vec<String>,
    /// Text written to the command's standard input, which is then closed. Without it, standard
    /// input is `/dev/null`.
    #[serde(default)]
    pub stdin: Option<String>,
    /// Working directory, relative to the workspace (or absolute inside it).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Variables added to the allow-listed environment (they win over it).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Time limit in milliseconds; the server's default when absent.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// Why a request cannot run. Each is an HTTP 400 with this message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    /// `argv` is empty or its first element is.
    #[error("argv must name a program")]
    NoProgram,
    /// A NUL byte, which no argument, variable or path can hold.
    #[error("{0} contains a NUL byte")]
    Nul(&'static str),
    /// A variable name that is empty or holds `=`.
    #[error("bad environment variable name {0:?}")]
    EnvName(String),
    /// `timeout_ms` out of range.
    #[error("timeout_ms must be between 1 and {max}")]
    Timeout {
        /// The largest allowed.
        max: u64,
    },
    /// `cwd` is refused.
    #[error("cwd {cwd:?} {reason}")]
    Cwd {
        /// The requested directory.
        cwd: String,
        /// Why.
        reason: &'static str,
    },
}

/// Server-side limits and the base environment that every request starts from.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Canonical workspace root.
    pub workspace: PathBuf,
    /// Allow-listed environment of every command.
    pub base_env: Vec<(String, String)>,
    /// Time limit when the request sets none.
    pub default_timeout: Duration,
    /// Largest time limit a request may ask for.
    pub max_timeout: Duration,
}

/// A request that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Standard input, if any.
    pub stdin: Option<Vec<u8>>,
    /// Canonical working directory inside the workspace.
    pub cwd: PathBuf,
    /// The complete environment.
    pub env: Vec<(String, String)>,
    /// Time limit.
    pub timeout: Duration,
}

/// The default `PATH` of commands.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The allow-listed environment: `PATH`, `HOME` (the workspace), `LANG`, `TMPDIR`, plus the
/// server's own values of the variables named in `pass`.
pub fn base_env(
    workspace: &Path,
    path: &str,
    tmpdir: &str,
    pass: &[String],
) -> Vec<(String, String)> {
    let mut env = vec![
        ("PATH".to_owned(), path.to_owned()),
        ("HOME".to_owned(), workspace.display().to_string()),
        ("LANG".to_owned(), "C.UTF-8".to_owned()),
        ("TMPDIR".to_owned(), tmpdir.to_owned()),
    ];
    for name in pass {
        if let Ok(value) = std::env::var(name) {
            env.retain(|(k, _)| k != name);
            env.push((name.clone(), value));
        }
    }
    env
}

impl ExecRequest {
    /// Checks the request against `policy`.
    pub fn prepare(self, policy: &Policy) -> Result<Prepared, RequestError> {
        if self.argv.first().is_none_or(String::is_empty) {
            return Err(RequestError::NoProgram);
        }
        if self.argv.iter().any(|a| a.contains('\0')) {
            return Err(RequestError::Nul("argv"));
        }
        let max = policy.max_timeout.as_millis() as u64;
        let timeout = match self.timeout_ms {
            None => policy.default_timeout,
            Some(ms) if ms == 0 || ms > max => return Err(RequestError::Timeout { max }),
            Some(ms) => Duration::from_millis(ms),
        };
        let mut env = policy.base_env.clone();
        for (k, v) in self.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(RequestError::EnvName(k));
            }
            if v.contains('\0') {
                return Err(RequestError::Nul("an environment value"));
            }
            env.retain(|(name, _)| *name != k);
            env.push((k, v));
        }
        let cwd = resolve_cwd(&policy.workspace, self.cwd.as_deref())?;
        Ok(Prepared {
            argv: self.argv,
            stdin: self.stdin.map(String::into_bytes),
            cwd,
            env,
            timeout,
        })
    }
}

/// Resolves `cwd` inside the canonical `root`: `..` components are refused outright, and the
/// canonical result (symlinks resolved) must still be inside the root.
///
/// This guards the starting directory only. A command can `cd` anywhere its container lets it:
/// the filesystem the exec container mounts is the real boundary.
pub fn resolve_cwd(root: &Path, cwd: Option<&str>) -> Result<PathBuf, RequestError> {
    let Some(cwd) = cwd else {
        return Ok(root.to_path_buf());
    };
    let refuse = |reason| RequestError::Cwd {
        cwd: cwd.to_owned(),
        reason,
    };
    if cwd.contains('\0') {
        return Err(RequestError::Nul("cwd"));
    }
    let path = Path::new(cwd);
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(refuse("must not contain .."));
    }
    let joined = if path.is_absolute() {
        path.to_path_buf()
    } else {
        root.join(path)
    };
    let canonical = joined
        .canonicalize()
        .map_err(|_| refuse("does not exist in the workspace"))?;
    if !canonical.starts_with(root) {
        return Err(refuse("is outside the workspace"));
    }
    if !canonical.is_dir() {
        return Err(refuse("is not a directory"));
    }
    Ok(canonical)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn workspace(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("agentvm-cwd-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("ws/sub")).unwrap();
        std::fs::create_dir_all(dir.join("outside")).unwrap();
        std::fs::write(dir.join("ws/file"), "x").unwrap();
        std::os::unix::fs::symlink(dir.join("outside"), dir.join("ws/escape")).unwrap();
        std::os::unix::fs::symlink(dir.join("ws/sub"), dir.join("ws/inner")).unwrap();
        dir.join("ws").canonicalize().unwrap()
    }

    #[test]
    fn cwd_stays_inside_the_workspace() {
        let root = workspace("inside");
        assert_eq!(resolve_cwd(&root, None).unwrap(), root);
        assert_eq!(resolve_cwd(&root, Some("sub")).unwrap(), root.join("sub"));
        assert_eq!(
            resolve_cwd(&root, Some("./sub/")).unwrap(),
            root.join("sub")
        );
        assert_eq!(resolve_cwd(&root, Some("inner")).unwrap(), root.join("sub"));
        let abs = root.join("sub").display().to_string();
        assert_eq!(resolve_cwd(&root, Some(&abs)).unwrap(), root.join("sub"));
        std::fs::remove_dir_all(root.parent().unwrap()).unwrap();
    }

    #[test]
    fn traversal_and_escaping_symlinks_are_refused() {
        let root = workspace("escape");
        let reason = |cwd: &str| match resolve_cwd(&root, Some(cwd)) {
            Err(RequestError::Cwd { reason, .. }) => reason,
            other => panic!("{cwd}: {other:?}"),
        };
        assert_eq!(reason(".."), "must not contain ..");
        assert_eq!(reason("sub/../../outside"), "must not contain ..");
        assert_eq!(reason("sub/.."), "must not contain ..");
        assert_eq!(reason("escape"), "is outside the workspace");
        assert_eq!(reason("/etc"), "is outside the workspace");
        assert_eq!(reason("/"), "is outside the workspace");
        assert_eq!(reason("missing"), "does not exist in the workspace");
        assert_eq!(reason("file"), "is not a directory");
        std::fs::remove_dir_all(root.parent().unwrap()).unwrap();
    }

    fn policy() -> Policy {
        let root = std::env::temp_dir().canonicalize().unwrap();
        Policy {
            base_env: base_env(&root, DEFAULT_PATH, "/tmp", &[]),
            workspace: root,
            default_timeout: Duration::from_secs(5),
            max_timeout: Duration::from_secs(60),
        }
    }

    fn request(json: serde_json::Value) -> Result<Prepared, RequestError> {
        serde_json::from_value::<ExecRequest>(json)
            .unwrap()
            .prepare(&policy())
    }

    #[test]
    fn checks_argv_env_and_timeout() {
        use serde_json::json;
        assert_eq!(request(json!({"argv": []})), Err(RequestError::NoProgram));
        assert_eq!(request(json!({"argv": [""]})), Err(RequestError::NoProgram));
        assert_eq!(
            request(json!({"argv": ["a\u{0}b"]})),
            Err(RequestError::Nul("argv"))
        );
        let bad_env = request(json!({"argv": ["x"], "env": {"A=B": "1"}}));
        assert_eq!(bad_env, Err(RequestError::EnvName("A=B".into())));
        let zero = request(json!({"argv": ["x"], "timeout_ms": 0}));
        assert_eq!(zero, Err(RequestError::Timeout { max: 60_000 }));
        let long = request(json!({"argv": ["x"], "timeout_ms": 60_001}));
        assert_eq!(long, Err(RequestError::Timeout { max: 60_000 }));
        let ok = request(json!({"argv": ["x"], "env": {"HOME": "/h", "X": "1"}})).unwrap();
        assert_eq!(ok.timeout, Duration::from_secs(5));
        let names: Vec<&str> = ok.env.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["PATH", "LANG", "TMPDIR", "HOME", "X"]);
        assert!(ok.env.contains(&("HOME".into(), "/h".into())));
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = serde_json::from_str::<ExecRequest>(r#"{"argv":["x"],"shell":true}"#);
        assert!(err.unwrap_err().to_string().contains("unknown field"));
    }
}
