//! Prompts, resources, completions and logging: everything besides tools that reaches an
//! upstream, under the same policy (package `agentvm.tools`) and the same audit as tool calls.
//!
//! Naming: a prompt `p` of upstream `u` is `u__p` to the agent, like tools. Resource URIs are
//! left as the upstream wrote them (results and embedded resources refer to them): a URI
//! belongs to the first upstream, in config order, that lists it or has a template matching
//! it; other URIs do not exist. A URI listed by two upstreams is shown once, the first
//! upstream's, so that listing and routing agree.
//!
//! What the agent gets for a prompt or resource that is denied is exactly what it gets for one
//! that does not exist: the proxy's own error, also in place of an upstream's error for a
//! resource it cannot read (only the upstream knows which URIs of a template exist). The
//! reasons go to the audit record only.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Value};

use super::audit;
use super::config::TOOL_SEPARATOR;
use super::mcp::{code, error, result, Era};
use super::policy::{Decision, DecisionInput};
use super::state::{ProxyState, Routes};
use super::upstream::{Kind, Upstream, UpstreamError};

/// Lists what every upstream offers of `kind`, each upstream asked in parallel; an upstream
/// that fails is left out (and logged).
async fn gather(state: &Arc<ProxyState>, routes: &Routes, kind: Kind) -> Vec<(usize, Vec<Value>)> {
    let fetches: Vec<_> = routes
        .upstreams
        .iter()
        .enumerate()
        .map(|(index, u)| {
            let state = state.clone();
            let u = u.clone();
            tokio::spawn(async move { (index, u.list(&state.client, state.limits, kind).await) })
        })
        .collect();
    let mut out = Vec::new();
    for f in fetches {
        let Ok((index, listed)) = f.await else {
            continue;
        };
        match listed {
            Ok(items) => out.push((index, items)),
            Err(e) => {
                let name = routes.upstreams.get(index).map(|u| u.config.name.as_str());
                tracing::warn!(
                    upstream = name.unwrap_or(""),
                    method = kind.method(),
                    error = ?e.to_string(),
                    "listing failed; its entries are left out"
                );
            }
        }
    }
    out
}

fn decide(state: &ProxyState, input: DecisionInput<'_>) -> Decision {
    state.policy.get().decide(&input)
}

/// `prompts/list`: every upstream's prompts, renamed `<upstream>__<prompt>`, that policy
/// allows with method `prompts/list`.
pub async fn list_prompts(state: &Arc<ProxyState>, id: &Value) -> Value {
    let routes = state.routes.get();
    let mut prompts = Vec::new();
    for (index, items) in gather(state, &routes, Kind::Prompts).await {
        let upstream = routes.upstreams[index].config.name.as_str();
        for item in items {
            let Some(own) = item.get("name").and_then(Value::as_str) else {
                continue;
            };
            let name = format!("{upstream}{TOOL_SEPARATOR}{own}");
            let allowed = decide(
                state,
                DecisionInput {
                    method: "prompts/list",
                    upstream,
                    prompt: Some(&name),
                    ..DecisionInput::empty(&state.agent)
                },
            )
            .allowed;
            if allowed {
                let mut def = item.clone();
                def["name"] = Value::String(name);
                prompts.push(def);
            }
        }
    }
    result(id, json!({"prompts": prompts}))
}

/// `resources/list` or `resources/templates/list`: every upstream's entries that policy
/// allows (method as asked, `uri` the resource URI or template), first upstream first, a URI
/// already shown left out.
pub async fn list_resources(state: &Arc<ProxyState>, id: &Value, kind: Kind) -> Value {
    let routes = state.routes.get();
    let mut seen = HashSet::new();
    let mut entries = Vec::new();
    for (index, items) in gather(state, &routes, kind).await {
        let upstream = routes.upstreams[index].config.name.as_str();
        for item in items {
            let Some(uri) = item.get(kind.name_field()).and_then(Value::as_str) else {
                continue;
            };
            if !seen.insert(uri.to_owned()) {
                tracing::warn!(
                    upstream,
                    uri,
                    "a URI listed by an earlier upstream is left out"
                );
                continue;
            }
            let allowed = decide(
                state,
                DecisionInput {
                    method: kind.method(),
                    upstream,
                    uri: Some(uri),
                    ..DecisionInput::empty(&state.agent)
                },
            )
            .allowed;
            if allowed {
                entries.push(item.clone());
            }
        }
    }
    result(id, json!({ kind.key(): entries }))
}

/// The upstream a resource URI belongs to: the first that lists it, else the first with a
/// matching template. Lists again (listings older than the freshness limit only) when the
/// listings do not tell.
async fn route_uri(
    state: &ProxyState,
    routes: &Routes,
    uri: &str,
) -> Result<Option<usize>, UpstreamError> {
    let find = |routes: &Routes| -> Option<usize> {
        let listed = routes
            .upstreams
            .iter()
            .position(|u| u.knows(Kind::Resources, uri) == Some(true));
        listed.or_else(|| {
            routes.upstreams.iter().position(|u| {
                u.known_names(Kind::Templates)
                    .iter()
                    .any(|t| template_matches(t, uri))
            })
        })
    };
    if let Some(found) = find(routes) {
        return Ok(Some(found));
    }
    for u in &routes.upstreams {
        u.refresh(&state.client, state.limits, Kind::Resources)
            .await?;
        u.refresh(&state.client, state.limits, Kind::Templates)
            .await?;
    }
    Ok(find(routes))
}

/// Whether `uri` is an expansion of RFC 6570 `template`. A simple `{var}` stands for text
/// without `/`, `?` or `#`; operator expressions (`{+var}`, `{/var}`, `{?q}`, ...) for any
/// text.
pub fn template_matches(template: &str, uri: &str) -> bool {
    enum Part<'a> {
        Literal(&'a str),
        Simple,
        Any,
    }
    let mut parts = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        if open > 0 {
            parts.push(Part::Literal(&rest[..open]));
        }
        let Some(close) = rest[open..].find('}') else {
            return false;
        };
        let expr = &rest[open + 1..open + close];
        let simple = expr
            .chars()
            .next()
            .is_some_and(|c| c.is_alphanumeric() || c == '_');
        parts.push(if simple { Part::Simple } else { Part::Any });
        rest = &rest[open + close + 1..];
    }
    if !rest.is_empty() {
        parts.push(Part::Literal(rest));
    }
    // Backtracking over the parts; templates are short.
    fn matches(parts: &[Part<'_>], text: &str) -> bool {
        let Some((first, more)) = parts.split_first() else {
            return text.is_empty();
        };
        match first {
            Part::Literal(l) => text.strip_prefix(l).is_some_and(|t| matches(more, t)),
            Part::Simple | Part::Any => {
                let limit = match first {
                    Part::Simple => text.find(['/', '?', '#']).unwrap_or(text.len()),
                    _ => text.len(),
                };
                (0..=limit)
                    .rev()
                    .filter(|i| text.is_char_boundary(*i))
                    .any(|i| matches(more, &text[i..]))
            }
        }
    }
    matches(&parts, uri)
}

/// The error for a resource that is denied or does not exist.
fn unknown_resource(id: &Value, uri: &str, era: Era) -> Value {
    let code = match era {
        Era::Legacy => code::RESOURCE_NOT_FOUND,
        Era::Modern => code::INVALID_PARAMS,
    };
    let mut e = error(id, code, &format!("Resource not found: {uri}"));
    e["error"]["data"] = json!({"uri": uri});
    e
}

/// Sends `method` with `params` to `upstream` and records the outcome; the answer carries the
/// agent's id.
async fn forward(
    state: &ProxyState,
    id: &Value,
    upstream: &Upstream,
    method: &str,
    params: Value,
    record: &mut audit::Record<'_>,
) -> Value {
    let forwarded_at = Instant::now();
    record.forwarding();
    let (answer, failure) = upstream
        .answer(&state.client, state.limits, id, method, params)
        .await;
    record.finish(&answer, forwarded_at, failure);
    answer
}

/// Records a refusal (denied, unknown, or a failed lookup) and returns `answer`.
fn refuse(
    record: &mut audit::Record<'_>,
    decision: &'static str,
    reason: String,
    answer: Value,
) -> Value {
    record.decision = decision;
    record.reason = reason;
    record.emit();
    answer
}

/// Records that looking up what an upstream offers failed (`e`, the proxy's own account), and
/// returns the internal error the agent gets for it.
fn lookup_failed(record: &mut audit::Record<'_>, id: &Value, e: &impl std::fmt::Display) -> Value {
    record.is_error = Some(true);
    let answer = error(id, code::INTERNAL_ERROR, &e.to_string());
    refuse(record, "unknown", e.to_string(), answer)
}

/// Records a refusal and returns the answer for it, unless `upstream` offers `own` of `kind`
/// (by its listing, listed again when stale).
async fn unless_offered(
    state: &ProxyState,
    id: &Value,
    upstream: &Upstream,
    kind: Kind,
    own: &str,
    record: &mut audit::Record<'_>,
    unknown: Value,
) -> Option<Value> {
    match upstream.has(&state.client, state.limits, kind, own).await {
        Ok(true) => None,
        Ok(false) => Some(refuse(
            record,
            "unknown",
            "the upstream does not offer it".into(),
            unknown,
        )),
        Err(e) => Some(lookup_failed(record, id, &e)),
    }
}

/// The upstream and own name behind an agent-visible `<upstream>__<name>`.
fn split_name<'a>(routes: &'a Routes, name: &'a str) -> Option<(&'a Arc<Upstream>, &'a str)> {
    let (upstream, own) = name.split_once(TOOL_SEPARATOR)?;
    let u = routes
        .upstreams
        .iter()
        .find(|u| u.config.name == upstream)?;
    (!own.is_empty()).then_some((u, own))
}

/// `prompts/get`: `<upstream>__<prompt>` with its arguments, decided with method
/// `prompts/get`.
pub async fn get_prompt(state: &Arc<ProxyState>, id: &Value, params: &Value) -> Value {
    let Some(name) = params.get("name").and_then(Value::as_str) else {
        return error(id, code::INVALID_PARAMS, "prompts/get needs params.name");
    };
    let empty = json!({});
    let arguments = params.get("arguments").unwrap_or(&empty);
    let digest = audit::digest(arguments);
    // Declared before the record, which borrows from them and writes itself when dropped.
    let routes = state.routes.get();
    let mut record = audit::Record::new(&state.agent, "prompts/get", &digest, Instant::now());
    record.tool = name;
    let unknown = error(id, code::INVALID_PARAMS, &format!("Unknown prompt: {name}"));
    let Some((upstream, own)) = split_name(&routes, name) else {
        return refuse(&mut record, "unknown", "no such prompt".into(), unknown);
    };
    record.upstream = &upstream.config.name;
    let decision = decide(
        state,
        DecisionInput {
            method: "prompts/get",
            upstream: &upstream.config.name,
            prompt: Some(name),
            arguments: Some(arguments),
            ..DecisionInput::empty(&state.agent)
        },
    );
    if !decision.allowed {
        let verdict = if decision.error { "error" } else { "deny" };
        return refuse(&mut record, verdict, decision.reasons.join("; "), unknown);
    }
    if let Some(refused) = unless_offered(
        state,
        id,
        upstream,
        Kind::Prompts,
        own,
        &mut record,
        unknown,
    )
    .await
    {
        return refused;
    }
    record.decision = "allow";
    let forwarded = json!({"name": own, "arguments": arguments});
    forward(state, id, upstream, "prompts/get", forwarded, &mut record).await
}

/// `resources/read`, `resources/subscribe` and `resources/unsubscribe` of `params.uri`,
/// decided with that method and the URI.
///
/// A subscription is forwarded when policy allows it and an upstream offers the URI, and is
/// answered with success in every case: the proxy relays no updates, so a subscription changes
/// nothing the agent can see, and answering alike keeps denied, unknown and allowed URIs apart
/// for the audit record only (subscribing to a URI that does not exist yet is legitimate).
pub async fn resource(
    state: &Arc<ProxyState>,
    id: &Value,
    method: &str,
    params: &Value,
    era: Era,
) -> Value {
    let Some(uri) = params.get("uri").and_then(Value::as_str) else {
        return error(
            id,
            code::INVALID_PARAMS,
            &format!("{method} needs params.uri"),
        );
    };
    let answer = decide_resource(state, id, method, uri, era).await;
    if method == "resources/read" {
        answer
    } else {
        result(id, json!({}))
    }
}

async fn decide_resource(
    state: &Arc<ProxyState>,
    id: &Value,
    method: &str,
    uri: &str,
    era: Era,
) -> Value {
    let digest = audit::digest(&json!({"uri": uri}));
    let routes = state.routes.get();
    let mut record = audit::Record::new(&state.agent, method, &digest, Instant::now());
    record.uri = uri;
    let unknown = unknown_resource(id, uri, era);
    let index = match route_uri(state, &routes, uri).await {
        Ok(Some(i)) => i,
        Ok(None) => {
            return refuse(
                &mut record,
                "unknown",
                "no upstream offers it".into(),
                unknown,
            )
        }
        Err(e) => return lookup_failed(&mut record, id, &e),
    };
    let upstream = &routes.upstreams[index];
    record.upstream = &upstream.config.name;
    let decision = decide(
        state,
        DecisionInput {
            method,
            upstream: &upstream.config.name,
            uri: Some(uri),
            ..DecisionInput::empty(&state.agent)
        },
    );
    if !decision.allowed {
        let verdict = if decision.error { "error" } else { "deny" };
        return refuse(&mut record, verdict, decision.reasons.join("; "), unknown);
    }
    record.decision = "allow";
    let answer = forward(
        state,
        id,
        upstream,
        method,
        json!({"uri": uri}),
        &mut record,
    )
    .await;
    let refused_by_upstream = answer.get("error").is_some()
        && answer.pointer("/error/code") != Some(&json!(code::INTERNAL_ERROR));
    if refused_by_upstream {
        // The upstream's own "not found" would tell a missing URI from a denied one.
        return unknown;
    }
    answer
}

/// `completion/complete` for a prompt (`ref/prompt`, by its agent-visible name) or a resource
/// template (`ref/resource`), decided with method `completion/complete` and the prompt or URI.
pub async fn complete(state: &Arc<ProxyState>, id: &Value, params: &Value) -> Value {
    let reference = params.get("ref").cloned().unwrap_or(Value::Null);
    let kind = reference.get("type").and_then(Value::as_str).unwrap_or("");
    let argument = params.get("argument").cloned().unwrap_or_else(|| json!({}));
    let digest = audit::digest(&argument);
    let routes = state.routes.get();
    let mut record =
        audit::Record::new(&state.agent, "completion/complete", &digest, Instant::now());
    let unknown = |what: &str| {
        error(
            id,
            code::INVALID_PARAMS,
            &format!("Unknown reference: {what}"),
        )
    };
    let (upstream, own_ref, input) = match kind {
        "ref/prompt" => {
            let Some(name) = reference.get("name").and_then(Value::as_str) else {
                return error(id, code::INVALID_PARAMS, "ref/prompt needs a name");
            };
            record.tool = name;
            let Some((upstream, own)) = split_name(&routes, name) else {
                return refuse(
                    &mut record,
                    "unknown",
                    "no such prompt".into(),
                    unknown(name),
                );
            };
            let offered = unless_offered(
                state,
                id,
                upstream,
                Kind::Prompts,
                own,
                &mut record,
                unknown(name),
            );
            if let Some(refused) = offered.await {
                return refused;
            }
            let own_ref = json!({"type": "ref/prompt", "name": own});
            let input = DecisionInput {
                method: "completion/complete",
                upstream: &upstream.config.name,
                prompt: Some(name),
                arguments: Some(&argument),
                ..DecisionInput::empty(&state.agent)
            };
            (upstream, own_ref, input)
        }
        "ref/resource" => {
            let Some(uri) = reference.get("uri").and_then(Value::as_str) else {
                return error(id, code::INVALID_PARAMS, "ref/resource needs a uri");
            };
            record.uri = uri;
            let offers = |u: &Upstream| {
                u.knows(Kind::Templates, uri) == Some(true)
                    || u.knows(Kind::Resources, uri) == Some(true)
            };
            let mut index = routes.upstreams.iter().position(|u| offers(u));
            if index.is_none() {
                for u in &routes.upstreams {
                    let refreshed = async {
                        u.refresh(&state.client, state.limits, Kind::Templates)
                            .await?;
                        u.refresh(&state.client, state.limits, Kind::Resources)
                            .await
                    };
                    if let Err(e) = refreshed.await {
                        return lookup_failed(&mut record, id, &e);
                    }
                }
                index = routes.upstreams.iter().position(|u| offers(u));
            }
            let Some(upstream) = index.and_then(|i| routes.upstreams.get(i)) else {
                return refuse(
                    &mut record,
                    "unknown",
                    "no upstream offers it".into(),
                    unknown(uri),
                );
            };
            let input = DecisionInput {
                method: "completion/complete",
                upstream: &upstream.config.name,
                uri: Some(uri),
                arguments: Some(&argument),
                ..DecisionInput::empty(&state.agent)
            };
            (upstream, json!({"type": "ref/resource", "uri": uri}), input)
        }
        _ => {
            return error(
                id,
                code::INVALID_PARAMS,
                "ref.type must be ref/prompt or ref/resource",
            )
        }
    };
    record.upstream = &upstream.config.name;
    let decision = decide(state, input);
    if !decision.allowed {
        let what = record.tool.to_owned() + record.uri;
        let verdict = if decision.error { "error" } else { "deny" };
        return refuse(
            &mut record,
            verdict,
            decision.reasons.join("; "),
            unknown(&what),
        );
    }
    record.decision = "allow";
    // Built from scratch like every upstream request: no `_meta` of the agent's rides along.
    let mut forwarded = json!({"ref": own_ref, "argument": argument});
    if let Some(arguments) = params.pointer("/context/arguments") {
        forwarded["context"] = json!({"arguments": arguments});
    }
    forward(
        state,
        id,
        upstream,
        "completion/complete",
        forwarded,
        &mut record,
    )
    .await
}

/// `logging/setLevel`: passed to every upstream policy allows (method `logging/setLevel`,
/// no name), failures logged. The upstreams' log notifications are not relayed.
pub async fn set_level(state: &Arc<ProxyState>, id: &Value, params: &Value) -> Value {
    let Some(level) = params.get("level").and_then(Value::as_str) else {
        return error(
            id,
            code::INVALID_PARAMS,
            "logging/setLevel needs params.level",
        );
    };
    let routes = state.routes.get();
    for u in &routes.upstreams {
        let allowed = decide(
            state,
            DecisionInput {
                method: "logging/setLevel",
                upstream: &u.config.name,
                ..DecisionInput::empty(&state.agent)
            },
        )
        .allowed;
        if !allowed {
            continue;
        }
        let answer = u
            .request(
                &state.client,
                state.limits,
                "logging/setLevel",
                json!({"level": level}),
            )
            .await;
        if let Err(e) = answer {
            tracing::warn!(upstream = %u.config.name, error = ?e.to_string(), "logging/setLevel failed");
        }
    }
    result(id, json!({}))
}

#[cfg(test)]
mod tests {
    use super::template_matches;

    #[test]
    fn templates_match_their_expansions_only() {
        let t = "demo://resource/dynamic/text/{resourceId}";
        assert!(template_matches(t, "demo://resource/dynamic/text/42"));
        assert!(!template_matches(t, "demo://resource/dynamic/text/4/2"));
        assert!(!template_matches(t, "demo://resource/dynamic/blob/42"));
        assert!(template_matches("file:///{+path}", "file:///a/b/c.txt"));
        assert!(template_matches("x://{a}/{b}{?q,r}", "x://1/2?q=3&r=4"));
        assert!(template_matches("x://{a}/{b}{?q,r}", "x://1/2"));
        assert!(!template_matches("x://{a", "x://1"));
        assert!(template_matches("plain://exact", "plain://exact"));
        assert!(!template_matches("plain://exact", "plain://exactly"));
    }
}
