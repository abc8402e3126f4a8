//! The webhook's view of a policy set: one compiled decision entry point and the settings,
//! evaluated once at load.

use std::path::Path;

use agentvm_common::policy::{Entrypoint, PolicyError, PolicySet, Source};
use serde_json::Value;

use crate::profile_name::Profile;
use crate::proxy_mounts::ProxyMounts;
use crate::settings::Settings;

mod shipped {
    include!(concat!(env!("OUT_DIR"), "/shipped_policies.rs"));
}

/// The Rego package policies write to.
pub const PACKAGE: &str = "agentvm";

/// A module owned by the webhook (not user-editable) that gathers the decision in one
/// evaluation, with the documented defaults for rules a policy set leaves undefined.
const RUNTIME_MODULE: &str = r#"package agentvm_runtime

default profile := null

profile := data.agentvm.profile

default deny := set()

deny := data.agentvm.deny

default warn := set()

warn := data.agentvm.warn

default proxy := null

proxy := data.agentvm.proxy

decision := {"profile": profile, "deny": deny, "warn": warn, "proxy": proxy}
"#;

const RUNTIME_PATH: &str = "<agentvm runtime>/decision.rego";

/// Why a policy set cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Loading or compiling failed.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// `data.agentvm.settings` is undefined or does not match the schema.
    #[error("data.agentvm.settings is not valid: {0}")]
    Settings(String),
}

/// What the policies decided for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The effective profile; `None` when the policies left it undefined (fails closed).
    pub profile: Option<Result<Profile, String>>,
    /// Denial messages, sorted.
    pub deny: Vec<String>,
    /// Warning messages, sorted.
    pub warn: Vec<String>,
    /// What the proxy gets mounted; nothing when the policies leave `proxy` undefined, an
    /// error (fails closed) when it is not a valid answer.
    pub proxy: Result<ProxyMounts, String>,
}

/// A loaded policy set, ready to decide.
#[derive(Debug, Clone)]
pub struct Policies {
    decision: Entrypoint,
    settings: Settings,
    origin: String,
}

impl Policies {
    /// The policies shipped in `policies/`, embedded in the binary.
    pub fn shipped() -> Result<Self, LoadError> {
        Self::from_sources(shipped_sources(), "shipped policies".into())
    }

    /// Every policy under `dir`.
    pub fn load_dir(dir: &Path) -> Result<Self, LoadError> {
        Self::from_sources(
            agentvm_common::policy::read_dir(dir)?,
            dir.display().to_string(),
        )
    }

    /// Policies from sources in memory. Test files (`*_test.rego`) are left out: they are for
    /// `agentvm policy test`, not for serving.
    pub fn from_sources(sources: Vec<Source>, origin: String) -> Result<Self, LoadError> {
        let mut sources: Vec<Source> = sources.into_iter().filter(|s| !s.is_test()).collect();
        sources.push(Source::new(RUNTIME_PATH, RUNTIME_MODULE));
        let set = PolicySet::from_sources(sources)?;
        let decision = set.entrypoint("data.agentvm_runtime.decision")?;
        let raw = match set.eval_rule("data.agentvm.settings", regorus::Value::new_object()) {
            Ok(raw) => raw,
            // Most often a folder of user policies without the shipped ones.
            Err(e) => {
                return Err(LoadError::Settings(format!(
                    "cannot be evaluated ({e}); note that a --policies folder replaces the \
                     shipped policies, so it must hold them too (start from a copy of policies/ \
                     and add yours beside them)"
                )))
            }
        };
        if raw == regorus::Value::Undefined {
            return Err(LoadError::Settings(
                "undefined (settings must not depend on input; see policies/README.md)".into(),
            ));
        }
        let settings = Settings::from_json(to_json(&raw)).map_err(LoadError::Settings)?;
        Ok(Self {
            decision,
            settings,
            origin,
        })
    }

    /// The settings in force.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Where the policies came from, for logs.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Evaluates the decision for an input document.
    pub fn decide(&self, input: Value) -> Result<Decision, PolicyError> {
        let value = self.decision.eval(regorus::Value::from(input))?;
        let json = to_json(&value);
        let strings = |key: &str| -> Vec<String> {
            let mut v: Vec<String> = json
                .get(key)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|m| m.as_str().map_or_else(|| m.to_string(), str::to_owned))
                .collect();
            v.sort();
            v
        };
        let profile = match json.get("profile") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.parse::<Profile>()),
            Some(other) => Some(Err(format!("profile must be a string, got {other}"))),
        };
        let proxy = ProxyMounts::from_decision(json.get("proxy").unwrap_or(&Value::Null));
        Ok(Decision {
            profile,
            deny: strings("deny"),
            warn: strings("warn"),
            proxy,
        })
    }
}

/// The shipped policy files, tests included (as in `policies/`, without `examples/`).
pub fn shipped_sources() -> Vec<Source> {
    shipped::SHIPPED
        .iter()
        .map(|(p, t)| Source::new(*p, *t))
        .collect()
}

/// regorus values to serde_json (sets become arrays); undefined becomes null.
fn to_json(v: &regorus::Value) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}
