//! Tool-call decisions with Rego (package `agentvm.tools`): `allow` (default false) and `deny`
//! (a set of messages that wins). A policy that fails to evaluate denies (fail closed).

use std::path::Path;

use std::collections::BTreeMap;

use agentvm_common::policy::{read_dir, PolicyError, PolicySet, Rules, Source};
use regorus::Value;
use serde::Serialize;

/// The policy shipped in the binary (`policies/tools/`).
const SHIPPED: &str = include_str!("../../../policies/tools/policy.rego");

/// Added to every policy set: `allow` and `deny` with the documented defaults, so that a
/// policy without `deny` rules (or without any rule) still loads. A policy that defines both
/// rules itself is asked directly (a third of the time); the defaults are then applied here.
const RUNTIME: &str = r#"package agentvm_proxy_runtime

default allow := false

allow := data.agentvm.tools.allow

default deny := set()

deny := data.agentvm.tools.deny
"#;

/// The policy's own rules, asked directly when it defines both.
const OWN_RULES: [&str; 2] = ["data.agentvm.tools.allow", "data.agentvm.tools.deny"];

/// The same through the runtime's defaults, for any other policy.
const RUNTIME_RULES: [&str; 2] = [
    "data.agentvm_proxy_runtime.allow",
    "data.agentvm_proxy_runtime.deny",
];

/// Who is calling, from the downward API.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Agent {
    /// Pod name.
    pub pod: String,
    /// Namespace.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
    /// Effective profile.
    pub profile: String,
}

/// What policy is asked. Exactly one of `tool`, `prompt` and `uri` names what the request is
/// about; `logging/setLevel` names nothing but the upstream.
#[derive(Debug, Clone, Serialize)]
pub struct DecisionInput<'a> {
    /// The MCP method: `tools/list`, `tools/call`, `prompts/list`, `prompts/get`,
    /// `resources/list`, `resources/templates/list`, `resources/read`, `resources/subscribe`,
    /// `resources/unsubscribe`, `completion/complete` or `logging/setLevel`.
    pub method: &'a str,
    /// Upstream name (`agentvm` for built-in tools).
    pub upstream: &'a str,
    /// Tool name as the agent sees it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool: Option<&'a str>,
    /// Prompt name as the agent sees it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt: Option<&'a str>,
    /// Resource URI, or URI template when listing templates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uri: Option<&'a str>,
    /// Call, prompt or completion arguments; absent when listing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arguments: Option<&'a serde_json::Value>,
    /// The calling agent.
    pub agent: &'a Agent,
}

impl<'a> DecisionInput<'a> {
    /// A question about tool `tool` (listing when `arguments` is `None`).
    pub fn tool(
        method: &'a str,
        upstream: &'a str,
        tool: &'a str,
        arguments: Option<&'a serde_json::Value>,
        agent: &'a Agent,
    ) -> Self {
        Self {
            method,
            upstream,
            tool: Some(tool),
            arguments,
            agent,
            ..Self::empty(agent)
        }
    }

    /// A question that names only the method and the upstream.
    pub fn empty(agent: &'a Agent) -> Self {
        Self {
            method: "",
            upstream: "",
            tool: None,
            prompt: None,
            uri: None,
            arguments: None,
            agent,
        }
    }
}

/// What policy said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The call may go through.
    pub allowed: bool,
    /// Why not (deny messages, or the evaluation error).
    pub reasons: Vec<String>,
    /// Evaluation failed (and so the call was denied).
    pub error: bool,
}

/// A compiled tool policy.
#[derive(Debug, Clone)]
pub struct ToolPolicy {
    /// `allow` and `deny`, in that order.
    decision: Rules,
    origin: String,
    none_yet: bool,
}

impl ToolPolicy {
    /// The policy shipped in the binary.
    pub fn shipped() -> Result<Self, PolicyError> {
        let sources = vec![Source::new("tools/policy.rego", SHIPPED)];
        Self::from_sources(sources, "shipped".into())
    }

    /// Every `.rego` file and data document under `dir`.
    pub fn load_dir(dir: &Path) -> Result<Self, PolicyError> {
        Self::from_sources(read_dir(dir)?, dir.display().to_string())
    }

    /// Like [`ToolPolicy::load_dir`], but a folder that does not exist or holds no policy gives
    /// [`ToolPolicy::none_yet`]: it is mounted from a ConfigMap with `optional: true` that does
    /// not exist (yet). A policy that is there but broken stays an error.
    pub fn load_dir_if_present(dir: &Path) -> Result<Self, PolicyError> {
        match read_dir(dir) {
            Ok(sources) => Self::from_sources(sources, dir.display().to_string()),
            Err(PolicyError::Empty(_)) => Self::none_yet(dir),
            Err(PolicyError::Read { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Self::none_yet(dir)
            }
            Err(e) => Err(e),
        }
    }

    /// A policy that denies every tool, saying that `dir` holds no policy yet (fail closed: the
    /// shipped policy may allow more than the one the platform meant to mount).
    pub fn none_yet(dir: &Path) -> Result<Self, PolicyError> {
        let reason = format!("no tool policy in {} yet", dir.display());
        // A JSON string is a Rego string literal.
        let literal = serde_json::Value::String(reason).to_string();
        let text = format!("package agentvm.tools\n\ndeny contains {literal}\n");
        let origin = format!("none yet ({})", dir.display());
        let policy = Self::from_sources(vec![Source::new("none-yet.rego", text)], origin)?;
        Ok(Self {
            none_yet: true,
            ..policy
        })
    }

    /// Whether this is [`ToolPolicy::none_yet`].
    pub fn is_none_yet(&self) -> bool {
        self.none_yet
    }

    /// Compiles `sources` with the proxy's entry point.
    pub fn from_sources(mut sources: Vec<Source>, origin: String) -> Result<Self, PolicyError> {
        sources.push(Source::new("agentvm-proxy-runtime.rego", RUNTIME));
        let set = PolicySet::from_sources(sources)?;
        // Only where both paths name rules of the policy does asking them directly give what
        // the runtime's rules would (`data.agentvm.tools.deny` could also come from a data
        // document or an enclosing package's rule, which only the runtime's rules see).
        let own = OWN_RULES.iter().all(|rule| set.entrypoint(rule).is_ok());
        Self::with_rules(&set, if own { OWN_RULES } else { RUNTIME_RULES }, origin)
    }

    fn with_rules(set: &PolicySet, rules: [&str; 2], origin: String) -> Result<Self, PolicyError> {
        Ok(Self {
            decision: set.rules(&rules)?,
            origin,
            none_yet: false,
        })
    }

    /// Where the policy came from, for logs.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Decides one listing entry or call.
    pub fn decide(&self, input: &DecisionInput<'_>) -> Decision {
        let input = match input.to_rego() {
            Ok(v) => v,
            Err(e) => return fail(format!("cannot build the policy input: {e}")),
        };
        let (allow, deny) = match self.decision.eval(input).as_deref() {
            Ok([allow, deny]) => (allow.clone(), deny.clone()),
            Ok(_) => return fail("allow and deny were not both evaluated".into()),
            Err(e) => return fail(e.to_string()),
        };
        // The documented defaults, for a policy asked directly.
        let allow = match allow {
            Value::Bool(b) => b,
            Value::Undefined => false,
            other => return fail(format!("allow must be a boolean, got {other}")),
        };
        let reasons: Vec<String> = match &deny {
            Value::Set(items) => items.iter().map(message).collect(),
            Value::Array(items) => items.iter().map(message).collect(),
            Value::Undefined => Vec::new(),
            other => return fail(format!("deny must be a set, got {other}")),
        };
        let allowed = allow && reasons.is_empty();
        let mut reasons = reasons;
        if !allowed && reasons.is_empty() {
            reasons.push("no rule allows it".into());
        }
        Decision {
            allowed,
            reasons,
            error: false,
        }
    }
}

impl DecisionInput<'_> {
    /// The Rego `input`: the fields that are set, built directly (arguments are converted once,
    /// not copied into an intermediate JSON tree first).
    fn to_rego(&self) -> Result<Value, serde_json::Error> {
        use serde::Deserialize;
        let text = |s: &str| Value::from(s);
        let mut agent = BTreeMap::new();
        agent.insert(text("pod"), text(&self.agent.pod));
        agent.insert(text("namespace"), text(&self.agent.namespace));
        agent.insert(text("service_account"), text(&self.agent.service_account));
        agent.insert(text("profile"), text(&self.agent.profile));
        let mut input = BTreeMap::new();
        input.insert(text("method"), text(self.method));
        input.insert(text("upstream"), text(self.upstream));
        for (key, value) in [
            ("tool", self.tool),
            ("prompt", self.prompt),
            ("uri", self.uri),
        ] {
            if let Some(v) = value {
                input.insert(text(key), text(v));
            }
        }
        if let Some(arguments) = self.arguments {
            input.insert(text("arguments"), Value::deserialize(arguments)?);
        }
        input.insert(text("agent"), Value::from(agent));
        Ok(Value::from(input))
    }
}

fn message(v: &Value) -> String {
    match v {
        Value::String(s) => s.to_string(),
        other => other.to_string(),
    }
}

fn fail(reason: String) -> Decision {
    Decision {
        allowed: false,
        reasons: vec![format!("policy error: {reason}")],
        error: true,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use serde_json::json;

    fn agent(profile: &str) -> Agent {
        Agent {
            profile: profile.into(),
            ..Agent::default()
        }
    }

    fn decide(p: &ToolPolicy, upstream: &str, tool: &str, args: serde_json::Value) -> Decision {
        let agent = agent("sidecar-exec");
        p.decide(&DecisionInput::tool(
            "tools/call",
            upstream,
            tool,
            Some(&args),
            &agent,
        ))
    }

    fn policy(text: &str) -> ToolPolicy {
        ToolPolicy::from_sources(vec![Source::new("p.rego", text)], "test".into()).unwrap()
    }

    #[test]
    fn a_policy_without_rules_denies_everything() {
        let p = policy("package agentvm.tools\n");
        let d = decide(&p, "u", "a", json!({}));
        assert_eq!((d.allowed, d.error), (false, false));
    }

    #[test]
    fn shipped_policy_allows_upstream_tools_and_gates_exec() {
        let p = ToolPolicy::shipped().unwrap();
        assert!(decide(&p, "github", "github__x", json!({})).allowed);
        assert!(decide(&p, "agentvm", "exec", json!({"argv": ["ls"]})).allowed);
        let d = decide(&p, "agentvm", "exec", json!({"argv": ["/bin/nsenter"]}));
        assert!(!d.allowed);
        assert_eq!(d.reasons, ["exec of nsenter is blocked"]);
    }

    #[test]
    fn engines_kept_between_calls_carry_nothing_from_one_decision_to_the_next() {
        // Decisions alternate on the same policy, so every one runs on an engine a different
        // input used before: a remembered rule value would show as a wrong answer.
        let p = ToolPolicy::shipped().unwrap();
        for round in 0..50 {
            let blocked = decide(&p, "agentvm", "exec", json!({"argv": ["nsenter"]}));
            assert!(!blocked.allowed, "round {round}");
            assert_eq!(
                blocked.reasons,
                ["exec of nsenter is blocked"],
                "round {round}"
            );
            let fine = decide(&p, "agentvm", "exec", json!({"argv": ["ls"]}));
            assert!(
                fine.allowed && fine.reasons.is_empty(),
                "round {round}: {fine:?}"
            );
            let agent = agent("no-exec");
            let no_surface = p.decide(&DecisionInput::tool(
                "tools/call",
                "agentvm",
                "exec",
                Some(&json!({"argv": ["ls"]})),
                &agent,
            ));
            assert!(!no_surface.allowed, "round {round}");
        }
    }

    #[test]
    fn default_is_deny_and_deny_wins() {
        let p = policy(
            "package agentvm.tools\n\nallow if input.tool == \"a\"\n\nallow if input.tool == \"b\"\n\n\
             deny contains \"b is bad\" if input.tool == \"b\"\n",
        );
        assert!(decide(&p, "u", "a", json!({})).allowed);
        let b = decide(&p, "u", "b", json!({}));
        assert_eq!(
            (b.allowed, b.reasons.as_slice()),
            (false, &["b is bad".to_owned()][..])
        );
        let c = decide(&p, "u", "c", json!({}));
        assert_eq!(
            (c.allowed, c.reasons.as_slice()),
            (false, &["no rule allows it".to_owned()][..])
        );
    }

    /// Policies asked directly decide as they do through the runtime's rules.
    #[test]
    fn own_rules_decide_as_the_runtime_rules_do() {
        let policies = [
            SHIPPED,
            "package agentvm.tools\n\nallow if input.tool == \"a\"\n\ndeny contains \"no\" if false\n",
            "package agentvm.tools\n\nallow := \"yes\"\n\ndeny contains \"x\" if input.tool == \"b\"\n",
            "package agentvm.tools\n\nallow if true\n\ndeny := [\"listed\"] if input.tool == \"c\"\n",
            "package agentvm.tools\n\nallow if to_number(input.arguments.n) > 0\n\n\
             deny contains \"big\" if input.arguments.n > 10\n",
        ];
        let calls = [
            ("agentvm", "exec", json!({"argv": ["ls"]})),
            (
                "agentvm",
                "exec",
                json!({"argv": ["/usr/bin/nsenter", "-t"]}),
            ),
            ("agentvm", "exec", json!({"argv": []})),
            ("u", "a", json!({"n": 3})),
            ("u", "b", json!({"n": 30})),
            ("u", "c", json!({"n": "not a number"})),
        ];
        for text in policies {
            let sources = vec![Source::new("p.rego", text), Source::new("rt.rego", RUNTIME)];
            let set = PolicySet::from_sources(sources).unwrap();
            assert!(
                OWN_RULES.iter().all(|r| set.entrypoint(r).is_ok()),
                "{text}"
            );
            let own = ToolPolicy::with_rules(&set, OWN_RULES, "own".into()).unwrap();
            let runtime = ToolPolicy::with_rules(&set, RUNTIME_RULES, "rt".into()).unwrap();
            for (upstream, tool, args) in &calls {
                for profile in ["sidecar-exec", "no-exec"] {
                    let agent = agent(profile);
                    let input =
                        DecisionInput::tool("tools/call", upstream, tool, Some(args), &agent);
                    let (a, b) = (own.decide(&input), runtime.decide(&input));
                    assert_eq!((a.allowed, a.error), (b.allowed, b.error), "{text} {tool}");
                    if !a.error {
                        assert_eq!(a.reasons, b.reasons, "{text} {tool}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_deny_from_data_alone_is_seen() {
        let sources = vec![
            Source::new("p.rego", "package agentvm.tools\n\nallow := true\n"),
            Source::new(
                "data.json",
                r#"{"agentvm": {"tools": {"deny": ["from data"]}}}"#,
            ),
        ];
        let p = ToolPolicy::from_sources(sources, "test".into()).unwrap();
        let d = decide(&p, "u", "a", json!({}));
        assert_eq!(
            (d.allowed, d.reasons.as_slice()),
            (false, &["from data".to_owned()][..])
        );
    }

    #[test]
    fn the_input_is_the_serialized_decision_input() {
        let agent = Agent {
            pod: "p".into(),
            namespace: "n".into(),
            service_account: "sa".into(),
            profile: "sidecar-exec".into(),
        };
        let args = json!({"argv": ["ls", "-l"], "n": -3, "big": u64::MAX, "f": 1.5,
                          "none": null, "yes": true, "nested": {"é": [{"a": []}]}});
        let inputs = [
            DecisionInput::tool("tools/call", "u", "u__t", Some(&args), &agent),
            DecisionInput::tool("tools/list", "u", "u__t", None, &agent),
            DecisionInput {
                method: "resources/read",
                upstream: "u",
                uri: Some("file:///x"),
                ..DecisionInput::empty(&agent)
            },
            DecisionInput {
                method: "prompts/get",
                prompt: Some("u__p"),
                arguments: Some(&args),
                ..DecisionInput::empty(&agent)
            },
        ];
        for input in inputs {
            let expected = Value::from(serde_json::to_value(&input).unwrap());
            assert_eq!(input.to_rego().unwrap(), expected);
        }
    }

    #[test]
    fn a_folder_without_a_policy_denies_everything_until_one_appears() {
        let dir = std::env::temp_dir().join(format!("agentvm-tools-{}", std::process::id()));
        let gone = dir.join("not-mounted");
        for d in [&gone, &dir] {
            let p = ToolPolicy::load_dir_if_present(d).unwrap();
            assert!(p.is_none_yet());
            let d = decide(&p, "github", "github__x", json!({}));
            assert!(!d.allowed && !d.error, "{d:?}");
            assert!(d.reasons[0].contains("no tool policy in"), "{d:?}");
            std::fs::create_dir_all(&dir).unwrap();
        }
        assert!(
            ToolPolicy::load_dir(&dir).is_err(),
            "without asking, still an error"
        );
        std::fs::write(
            dir.join("policy.rego"),
            "package agentvm.tools\n\nallow := true\n",
        )
        .unwrap();
        let p = ToolPolicy::load_dir_if_present(&dir).unwrap();
        assert!(!p.is_none_yet());
        assert!(decide(&p, "github", "github__x", json!({})).allowed);
        std::fs::write(
            dir.join("policy.rego"),
            "package agentvm.tools\n\nallow if {\n",
        )
        .unwrap();
        assert!(
            ToolPolicy::load_dir_if_present(&dir).is_err(),
            "broken is not missing"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn evaluation_errors_deny() {
        let p = policy("package agentvm.tools\n\nallow if to_number(input.arguments.n) > 0\n");
        let d = decide(&p, "u", "a", json!({"n": "not a number"}));
        assert!(!d.allowed);
        assert!(
            d.error || d.reasons.iter().any(|r| r.contains("policy")),
            "{d:?}"
        );
    }
}
