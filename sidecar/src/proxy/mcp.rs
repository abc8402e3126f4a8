//! The MCP methods the proxy answers, on parsed JSON-RPC messages. Anything that reaches an
//! upstream passes policy first; methods the proxy does not know are refused, so there is no
//! way around the tool policy. Tools live here; prompts, resources, completions and logging in
//! [`super::features`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::audit;
use super::config::{BUILTIN_UPSTREAM, TOOL_SEPARATOR};
use super::exec_tool::{self, EXEC_TOOL};
use super::features;
use super::policy::DecisionInput;
use super::state::{ProxyState, Routes};
use super::upstream::Kind;

/// Handshake-era revisions the proxy speaks (`initialize`, sessions), newest first.
pub const PROTOCOL_VERSIONS: [&str; 3] = ["2025-11-25", "2025-06-18", "2025-03-26"];

/// Stateless revisions the proxy speaks (per-request `_meta`, no sessions), newest first.
pub const MODERN_VERSIONS: [&str; 1] = ["2026-07-28"];

/// Which generation of the protocol a request speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Era {
    /// `initialize` and sessions: 2025-11-25 and earlier.
    Legacy,
    /// Every request carries its revision: 2026-07-28.
    Modern,
}

/// JSON-RPC error codes.
pub mod code {
    /// The body is not JSON.
    pub const PARSE_ERROR: i64 = -32700;
    /// Not a valid JSON-RPC request (batches included).
    pub const INVALID_REQUEST: i64 = -32600;
    /// The method is not offered.
    pub const METHOD_NOT_FOUND: i64 = -32601;
    /// Bad parameters, and unknown or denied prompts (and resources, from 2026-07-28 on).
    pub const INVALID_PARAMS: i64 = -32602;
    /// An upstream or backend failed.
    pub const INTERNAL_ERROR: i64 = -32603;
    /// Unknown or denied resource, up to 2025-11-25.
    pub const RESOURCE_NOT_FOUND: i64 = -32002;
    /// HTTP headers disagree with the body, or a required one is missing (2026-07-28).
    pub const HEADER_MISMATCH: i64 = -32020;
    /// The requested revision is not spoken here (2026-07-28).
    pub const UNSUPPORTED_PROTOCOL_VERSION: i64 = -32022;
}

/// A JSON-RPC error answer.
pub fn error(id: &Value, code: i64, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}

/// A JSON-RPC result answer.
pub fn result(id: &Value, result: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "result": result})
}

/// What the proxy offers, in `initialize` and `server/discover`. Resource subscriptions are
/// forwarded but their updates are not relayed, so `subscribe` is not claimed.
fn capabilities() -> Value {
    json!({
        "tools": {"listChanged": false},
        "prompts": {"listChanged": false},
        "resources": {"subscribe": false, "listChanged": false},
        "completions": {},
        "logging": {},
    })
}

const INSTRUCTIONS: &str = "Tools and prompts are named <upstream>__<name>; exec runs commands in \
    the workspace.";

fn server_info() -> Value {
    json!({"name": "agentvm-proxy", "version": env!("CARGO_PKG_VERSION")})
}

/// The answer to `initialize`: the client's revision when the proxy speaks it, else the
/// newest.
pub fn initialize(id: &Value, params: &Value) -> Value {
    let asked = params.get("protocolVersion").and_then(Value::as_str);
    let version = asked
        .filter(|v| PROTOCOL_VERSIONS.contains(v))
        .unwrap_or(PROTOCOL_VERSIONS[0]);
    result(
        id,
        json!({
            "protocolVersion": version,
            "capabilities": capabilities(),
            "serverInfo": server_info(),
            "instructions": INSTRUCTIONS,
        }),
    )
}

/// Every revision the proxy speaks, stateless ones first.
pub fn supported_versions() -> Vec<&'static str> {
    MODERN_VERSIONS
        .iter()
        .chain(&PROTOCOL_VERSIONS)
        .copied()
        .collect()
}

/// The answer to `server/discover` (2026-07-28).
fn discover(id: &Value) -> Value {
    let supported = supported_versions();
    result(
        id,
        json!({
            "supportedVersions": supported,
            "capabilities": capabilities(),
            "serverInfo": server_info(),
            "instructions": INSTRUCTIONS,
        }),
    )
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The JSON-RPC response.
    pub body: Value,
    /// Set when a rate limit refused the call: HTTP 429 with this Retry-After.
    pub retry_after: Option<Duration>,
}

impl From<Value> for Answer {
    fn from(body: Value) -> Self {
        Self {
            body,
            retry_after: None,
        }
    }
}

/// JSON-RPC error code of a call refused by a rate limit.
pub const RATE_LIMITED: i64 = -32000;

/// Answers one request (a message with an id). `initialize` is the HTTP layer's, which opens
/// the session. `ping`, `logging/setLevel` and resource subscriptions are gone from 2026-07-28
/// on, and so unknown methods there.
pub async fn request(
    state: &Arc<ProxyState>,
    id: &Value,
    method: &str,
    params: &Value,
    era: Era,
) -> Answer {
    match (method, era) {
        ("ping", Era::Legacy) => result(id, json!({})).into(),
        ("server/discover", Era::Modern) => discover(id).into(),
        ("tools/list", _) => result(id, json!({"tools": list_tools(state).await})).into(),
        ("tools/call", _) => call_tool(state, id, params, era).await,
        ("prompts/list", _) => features::list_prompts(state, id).await.into(),
        ("prompts/get", _) => features::get_prompt(state, id, params).await.into(),
        ("resources/list", _) => features::list_resources(state, id, Kind::Resources)
            .await
            .into(),
        ("resources/templates/list", _) => features::list_resources(state, id, Kind::Templates)
            .await
            .into(),
        ("resources/read", _) | ("resources/subscribe" | "resources/unsubscribe", Era::Legacy) => {
            features::resource(state, id, method, params, era)
                .await
                .into()
        }
        ("completion/complete", _) => features::complete(state, id, params).await.into(),
        ("logging/setLevel", Era::Legacy) => features::set_level(state, id, params).await.into(),
        _ => error(
            id,
            code::METHOD_NOT_FOUND,
            &format!("method not found: {method}"),
        )
        .into(),
    }
}

/// What a tool name the agent sent refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The built-in exec tool.
    Exec,
    /// Upstream number `index`, tool `tool` (its own name).
    Upstream {
        /// Index in the config.
        index: usize,
        /// The upstream's name for the tool.
        tool: String,
    },
}

/// Resolves a tool name; `None` for a name that cannot exist.
pub fn resolve(routes: &Routes, name: &str) -> Option<Target> {
    if name == EXEC_TOOL {
        return routes.exec_endpoint.as_ref().map(|_| Target::Exec);
    }
    let (upstream, tool) = name.split_once(TOOL_SEPARATOR)?;
    let index = routes
        .upstreams
        .iter()
        .position(|u| u.config.name == upstream)?;
    (!tool.is_empty()).then(|| Target::Upstream {
        index,
        tool: tool.to_owned(),
    })
}

fn upstream_name<'a>(routes: &'a Routes, target: &Target) -> &'a str {
    match target {
        Target::Exec => BUILTIN_UPSTREAM,
        Target::Upstream { index, .. } => routes
            .upstreams
            .get(*index)
            .map_or("", |u| u.config.name.as_str()),
    }
}

async fn list_tools(state: &Arc<ProxyState>) -> Vec<Value> {
    let policy = state.policy.get();
    let mut tools = Vec::new();
    let mut offer = |upstream: &str, def: Value| {
        let Some(name) = def.get("name").and_then(Value::as_str) else {
            return;
        };
        let decision = policy.decide(&DecisionInput::tool(
            "tools/list",
            upstream,
            name,
            None,
            &state.agent,
        ));
        if decision.allowed {
            tools.push(def);
        }
    };
    let routes = state.routes.get();
    if routes.exec_endpoint.is_some() {
        offer(BUILTIN_UPSTREAM, exec_tool::definition());
    }
    let fetches = routes.upstreams.iter().map(|u| {
        let state = state.clone();
        let u = u.clone();
        tokio::spawn(async move {
            let listed = u.list(&state.client, state.limits, Kind::Tools).await;
            (u.config.name.clone(), listed)
        })
    });
    let fetches: Vec<_> = fetches.collect();
    for f in fetches {
        let Ok((name, listed)) = f.await else {
            continue;
        };
        let list = match listed {
            Ok(list) => list,
            Err(e) => {
                tracing::warn!(upstream = %name, error = ?e.to_string(), "tools/list failed; its tools are left out");
                continue;
            }
        };
        for tool in &list {
            let Some(own) = tool.get("name").and_then(Value::as_str) else {
                continue;
            };
            let mut def = tool.clone();
            def["name"] = Value::String(format!("{name}{TOOL_SEPARATOR}{own}"));
            offer(&name, def);
        }
    }
    tools
}

async fn call_tool(state: &Arc<ProxyState>, id: &Value, params: &Value, era: Era) -> Answer {
    let started = Instant::now();
    let Some(name) = params.get("name").and_then(Value::as_str) else {
        return error(id, code::INVALID_PARAMS, "tools/call needs params.name").into();
    };
    let empty = json!({});
    let arguments = params.get("arguments").unwrap_or(&empty);
    let digest = audit::digest(arguments);
    let unknown = || -> Answer { unknown_tool(id, name, era).into() };
    // Declared before the record, which borrows from them and writes itself when dropped.
    let routes = state.routes.get();
    let mut record = audit::Record::new(&state.agent, "tools/call", &digest, started);
    record.tool = name;
    let Some(target) = resolve(&routes, name) else {
        record.reason = "no such tool".into();
        record.emit();
        return unknown();
    };
    let upstream = upstream_name(&routes, &target);
    record.upstream = upstream;
    let decision = state.policy.get().decide(&DecisionInput::tool(
        "tools/call",
        upstream,
        name,
        Some(arguments),
        &state.agent,
    ));
    if !decision.allowed {
        // The agent gets the unknown-tool error; the reasons go to the audit record only.
        record.decision = if decision.error { "error" } else { "deny" };
        record.reason = decision.reasons.join("; ");
        record.emit();
        return unknown();
    }
    record.decision = "allow";
    if let Target::Exec = target {
        if let Some(refused) = rate_limited(state, id, name, &mut record) {
            return refused;
        }
    }
    let forwarded_at = Instant::now();
    let (answer, failure) = match &target {
        Target::Exec => {
            let endpoint = routes.exec_endpoint.as_deref().unwrap_or_default();
            record.forwarding();
            match exec_tool::call(&state.client, state.limits, endpoint, arguments).await {
                Ok(ran) => {
                    let failure = ran
                        .refused
                        .map(|status| format!("the exec server refused it: HTTP {status}"));
                    (result(id, ran.result), failure)
                }
                Err(e) => (
                    error(id, code::INTERNAL_ERROR, &e.to_string()),
                    Some(e.to_string()),
                ),
            }
        }
        Target::Upstream { index, tool } => {
            let Some(u) = routes.upstreams.get(*index) else {
                record.reason = "no such upstream".into();
                record.emit();
                return unknown();
            };
            match u.has(&state.client, state.limits, Kind::Tools, tool).await {
                Ok(true) => {
                    if let Some(refused) = rate_limited(state, id, name, &mut record) {
                        return refused;
                    }
                }
                Ok(false) => {
                    record.decision = "unknown";
                    record.reason = "the upstream has no such tool".into();
                    record.emit();
                    return unknown();
                }
                Err(e) => {
                    record.reason = e.to_string();
                    record.is_error = Some(true);
                    record.emit();
                    return error(id, code::INTERNAL_ERROR, &e.to_string()).into();
                }
            }
            let forwarded = json!({"name": tool, "arguments": arguments});
            record.forwarding();
            u.answer(&state.client, state.limits, id, "tools/call", forwarded)
                .await
        }
    };
    record.finish(&answer, forwarded_at, failure);
    answer.into()
}

/// The answer for a tool that is denied or does not exist, the same for both so that a
/// denied tool looks like an absent one: what an upstream of the agent's revision answers for
/// a tool it does not have. Under 2026-07-28 that is the `-32602` protocol error its tools page
/// prescribes; in 2025-era sessions it is a tool error result, which is what the reference SDK
/// servers of that generation send (and what the model can read).
pub fn unknown_tool(id: &Value, name: &str, era: Era) -> Value {
    let message = format!("Unknown tool: {name}");
    match era {
        Era::Modern => error(id, code::INVALID_PARAMS, &message),
        Era::Legacy => result(
            id,
            json!({"content": [{"type": "text", "text": message}], "isError": true}),
        ),
    }
}

/// Takes a token for `name`; the refusal to send when there is none.
fn rate_limited(
    state: &ProxyState,
    id: &Value,
    name: &str,
    record: &mut audit::Record<'_>,
) -> Option<Answer> {
    let wait = state.routes.get().rate_limits.check(name).err()?;
    record.decision = "rate_limited";
    record.reason = format!("rate limit of {name}");
    record.emit();
    let body = error(
        id,
        RATE_LIMITED,
        &format!("rate limit of {name} reached, retry later"),
    );
    Some(Answer {
        body,
        retry_after: Some(wait),
    })
}
