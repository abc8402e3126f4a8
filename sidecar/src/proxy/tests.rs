//! The proxy through its router, in front of a small MCP upstream served on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentvm_common::policy::Source;
use agentvm_common::reload::Reloadable;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde_json::{json, Value};
use tower::ServiceExt;

use super::audit::{capture_logs, LogBuffer};
use super::config::ProxyConfig;
use super::policy::{Agent, ToolPolicy};
use super::upstream::Limits;
use super::{app, ProxySettings, ProxyState};

const TOKEN: &str = "s3cr3t-token";

/// What the upstream saw: headers and bodies of every request.
#[derive(Default)]
struct Seen {
    headers: Vec<HeaderMap>,
    bodies: Vec<Value>,
}

type Log = Arc<Mutex<Seen>>;

/// A minimal MCP server: tools `echo` and `hidden`; answers in SSE when `sse` is set.
async fn upstream(log: Log, sse: bool) -> String {
    async fn handle(
        State((log, sse)): State<(Log, bool)>,
        headers: HeaderMap,
        body: String,
    ) -> Response {
        let msg: Value = serde_json::from_str(&body).unwrap();
        {
            let mut seen = log.lock().unwrap();
            seen.headers.push(headers.clone());
            seen.bodies.push(msg.clone());
        }
        let Some(id) = msg.get("id").cloned() else {
            return StatusCode::ACCEPTED.into_response();
        };
        let result = match msg["method"].as_str().unwrap() {
            "initialize" => json!({"protocolVersion": "2025-06-18",
                                   "capabilities": {"tools": {}, "prompts": {}, "resources": {},
                                                    "completions": {}, "logging": {}},
                                   "serverInfo": {"name": "mock", "version": "1"}}),
            "prompts/list" => json!({"prompts": [{"name": "greet"}, {"name": "secret"}]}),
            "prompts/get" => json!({"messages": [{"role": "user", "content":
                {"type": "text", "text": format!("{} {}", msg["params"]["name"], msg["params"]["arguments"])}}]}),
            "resources/list" => json!({"resources": [{"uri": "mem://a", "name": "a"},
                                                     {"uri": "mem://secret", "name": "s"}]}),
            "resources/templates/list" => json!({"resourceTemplates": [
                {"uriTemplate": "mem://item/{id}", "name": "item"}]}),
            "resources/read" if msg["params"]["uri"] == "mem://item/404" => {
                let answer = json!({"jsonrpc": "2.0", "id": id,
                    "error": {"code": -32002, "message": "no item 404 here"}});
                return ([("content-type", "application/json")], answer.to_string())
                    .into_response();
            }
            "resources/read" => {
                json!({"contents": [{"uri": msg["params"]["uri"], "text": "body"}]})
            }
            "resources/subscribe" | "logging/setLevel" => json!({}),
            "completion/complete" => json!({"completion": {"values": [msg["params"]["ref"]]}}),
            "tools/list" => json!({"tools": [
                {"name": "echo", "inputSchema": {"type": "object"}},
                {"name": "hidden", "inputSchema": {"type": "object"}},
                {"name": "junk", "inputSchema": {"type": "object"}},
                {"name": "escaped", "inputSchema": {"type": "object"}},
                {"name": "misdirected", "inputSchema": {"type": "object"}},
                {"name": "slow", "inputSchema": {"type": "object"}},
                {"name": "quoting", "inputSchema": {"type": "object"}},
            ]}),
            "tools/call" if msg["params"]["name"] == "escaped" => {
                // The credential it was sent, written with JSON escapes (`\/`, `\u0073`).
                let auth = headers.get("authorization").unwrap().to_str().unwrap();
                let escaped = auth.replacen('s', "\\u0073", 1).replace('-', "\\u002d");
                let body = format!(
                    r#"{{"jsonrpc":"2.0","id":{id},"result":{{"content":[{{"type":"text","text":"{escaped}"}}]}}}}"#
                );
                return ([("content-type", "application/json")], body).into_response();
            }
            "tools/call" if msg["params"]["name"] == "misdirected" => {
                // An answer carrying another request's id.
                let other = id.as_u64().unwrap() + 1000;
                let answer = json!({"jsonrpc": "2.0", "id": other, "result": {"content": []}});
                return ([("content-type", "application/json")], answer.to_string())
                    .into_response();
            }
            "tools/call" if msg["params"]["name"] == "slow" => {
                tokio::time::sleep(Duration::from_secs(60)).await;
                json!({"content": []})
            }
            "tools/call" if msg["params"]["name"] == "quoting" => {
                // An error whose text quotes the arguments, as many servers' validation errors do.
                let message = format!("invalid value {} for q", msg["params"]["arguments"]["q"]);
                let answer = json!({"jsonrpc": "2.0", "id": id,
                    "error": {"code": -32602, "message": message}});
                return ([("content-type", "application/json")], answer.to_string())
                    .into_response();
            }
            "tools/call" if msg["params"]["name"] == "junk" => {
                return ([("content-type", "application/json")], "[1]").into_response();
            }
            "tools/call" => {
                let auth = headers
                    .get("authorization")
                    .map(|v| v.to_str().unwrap().to_owned());
                json!({"content": [{"type": "text",
                    "text": format!("{} {}", msg["params"]["arguments"], auth.unwrap_or_default())}]})
            }
            _ => return StatusCode::BAD_REQUEST.into_response(),
        };
        let answer = json!({"jsonrpc": "2.0", "id": id, "result": result}).to_string();
        if sse {
            let body = format!(
                "event: message\ndata: {{\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\"}}\n\n\
                 event: message\ndata: {answer}\n\n"
            );
            (
                [
                    ("content-type", "text/event-stream"),
                    ("mcp-session-id", "up-1"),
                ],
                body,
            )
                .into_response()
        } else {
            (
                [
                    ("content-type", "application/json"),
                    ("mcp-session-id", "up-1"),
                ],
                answer,
            )
                .into_response()
        }
    }
    let router = Router::new()
        .route("/mcp", post(handle))
        .with_state((log, sse));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}/mcp")
}

/// Allows everything of upstream `up` and the exec tool; `up__hidden`, the prompt
/// `up__secret` and the resource `mem://secret` are denied.
const POLICY: &str = r#"package agentvm.tools

allow if input.upstream == "up"

allow if input.tool == "exec"

deny contains "hidden is off limits" if input.tool == "up__hidden"

deny contains "no secrets" if input.prompt == "up__secret"

deny contains "no secrets" if input.uri == "mem://secret"
"#;

/// Written once: tests run in parallel, and a file rewritten under a reading proxy would be
/// empty for a moment.
fn credential_file() -> std::path::PathBuf {
    static PATH: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("agentvm-cred-{}", std::process::id()));
        std::fs::write(&path, format!("{TOKEN}\n")).unwrap();
        path
    })
    .clone()
}

fn proxy(url: &str, timeout: Duration) -> Router {
    proxy_with(url, timeout, "")
}

fn proxy_with(url: &str, timeout: Duration, extra_config: &str) -> Router {
    proxy_body_timeout(url, timeout, extra_config, super::state::BODY_TIMEOUT)
}

fn proxy_body_timeout(
    url: &str,
    timeout: Duration,
    extra_config: &str,
    body_timeout: Duration,
) -> Router {
    let config = ProxyConfig::parse(&(format!(
        "upstreams:\n  - name: up\n    url: {url}\n    credentialFile: {}\nexec:\n  endpoint: http://127.0.0.1:9\n",
        credential_file().display()
    ) + extra_config))
    .unwrap();
    let policy =
        ToolPolicy::from_sources(vec![Source::new("p.rego", POLICY)], "test".into()).unwrap();
    let settings = ProxySettings {
        agent: Agent {
            pod: "p".into(),
            namespace: "ns".into(),
            service_account: "sa".into(),
            profile: "sidecar-exec".into(),
        },
        max_body_bytes: 64 * 1024,
        body_timeout,
        limits: Limits {
            timeout,
            max_response_bytes: 1 << 20,
        },
        allowed_origins: vec![],
        access_log: false,
    };
    app(Arc::new(ProxyState::new(
        &config,
        Arc::new(Reloadable::new(policy)),
        settings,
    )))
}

async fn send(
    app: &Router,
    body: Value,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap, Value) {
    let mut req = Request::post("/mcp")
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let response = app
        .clone()
        .oneshot(req.body(Body::from(body.to_string())).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    let json = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    (status, headers, json)
}

fn call(id: i64, name: &str, arguments: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": name, "arguments": arguments}})
}

/// A client that starts a body and never finishes it gets 408 once the body timeout has
/// passed (30 s in the proxy, a fifth of a second here).
#[tokio::test]
async fn a_body_that_never_ends_is_refused_at_the_body_timeout() {
    use futures_util::StreamExt;
    let limit = Duration::from_millis(200);
    let app = proxy_body_timeout("http://127.0.0.1:9/mcp", Duration::from_secs(1), "", limit);
    let first = futures_util::stream::once(async {
        Ok::<_, std::io::Error>(axum::body::Bytes::from_static(b"{\"jsonrpc\": \"2.0\", "))
    });
    let body = Body::from_stream(first.chain(futures_util::stream::pending()));
    let request = Request::post("/mcp")
        .header("content-type", "application/json")
        .body(body)
        .unwrap();
    let started = tokio::time::Instant::now();
    let response = tokio::time::timeout(Duration::from_secs(10), app.clone().oneshot(request))
        .await
        .expect("the proxy gave up on the body")
        .unwrap();
    let waited = started.elapsed();
    assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
    assert!((limit..limit * 10).contains(&waited), "{waited:?}");
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    let answer: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(answer["error"]["code"], -32600, "{answer}");
}

#[tokio::test]
async fn initialize_negotiates_and_opens_a_session() {
    let app = proxy("http://127.0.0.1:9/mcp", Duration::from_secs(1));
    let init = |v: &str| {
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": v, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}})
    };
    let (status, headers, body) = send(&app, init("2025-06-18"), &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["result"]["protocolVersion"], "2025-06-18");
    let session = headers
        .get("mcp-session-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(session.len(), 32);
    let (_, _, body) = send(&app, init("1999-01-01"), &[]).await;
    assert_eq!(body["result"]["protocolVersion"], "2025-11-25");
    let note = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    assert_eq!(
        send(&app, note, &[("mcp-session-id", &session)]).await.0,
        StatusCode::ACCEPTED
    );
    let ping = json!({"jsonrpc": "2.0", "id": 2, "method": "ping"});
    assert_eq!(
        send(&app, ping.clone(), &[("mcp-session-id", "nope")])
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    let (status, _, body) = send(&app, ping, &[("mcp-session-id", &session)]).await;
    assert_eq!((status, &body["result"]), (StatusCode::OK, &json!({})));
}

#[tokio::test]
async fn tools_are_listed_with_prefixes_and_filtered_by_policy() {
    for sse in [false, true] {
        let log = Log::default();
        let app = proxy(&upstream(log.clone(), sse).await, Duration::from_secs(5));
        let (status, _, body) = send(
            &app,
            json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}),
            &[],
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let names: Vec<&str> = body["result"]["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "exec",
                "up__echo",
                "up__junk",
                "up__escaped",
                "up__misdirected",
                "up__slow",
                "up__quoting"
            ],
            "sse={sse}"
        );
    }
}

#[tokio::test]
async fn calls_are_forwarded_with_the_credential_and_nothing_of_the_agent() {
    let log = Log::default();
    let app = proxy(&upstream(log.clone(), false).await, Duration::from_secs(5));
    let agent_headers = [
        ("authorization", "Bearer agent-token"),
        ("cookie", "c=1"),
        ("x-custom", "1"),
    ];
    let (status, _, body) = send(&app, call(7, "up__echo", json!({"a": 1})), &agent_headers).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["id"], 7);
    // The upstream echoed the Authorization it got, which the proxy then redacted.
    assert_eq!(
        body["result"]["content"][0]["text"],
        "{\"a\":1} Bearer [redacted]"
    );
    let seen = log.lock().unwrap();
    let methods: Vec<&str> = seen
        .bodies
        .iter()
        .map(|b| b["method"].as_str().unwrap())
        .collect();
    assert_eq!(
        methods,
        [
            "initialize",
            "notifications/initialized",
            "tools/list",
            "tools/call"
        ]
    );
    assert_eq!(seen.bodies[3]["params"]["name"], "echo");
    for h in &seen.headers {
        assert_eq!(h.get("authorization").unwrap(), &format!("Bearer {TOKEN}"));
        assert!(h.get("cookie").is_none() && h.get("x-custom").is_none());
    }
    assert_eq!(seen.headers[3].get("mcp-session-id").unwrap(), "up-1");
}

#[tokio::test]
async fn denied_and_unknown_tools_get_the_same_answer() {
    let log = Log::default();
    let app = proxy(&upstream(log.clone(), false).await, Duration::from_secs(5));
    let (_, _, denied) = send(&app, call(1, "up__hidden", json!({})), &[]).await;
    // 2025-era sessions: a tool error result, as the reference SDK servers answer.
    assert_eq!(denied["result"]["isError"], true, "{denied}");
    let text = |v: &Value, name: &str| {
        v["result"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .replace(name, "X")
    };
    for name in [
        "nope__echo",
        "UP__echo",
        "up__",
        "up_echo",
        "up__nothing_here",
    ] {
        let (_, _, unknown) = send(&app, call(1, name, json!({})), &[]).await;
        assert_eq!(unknown["result"]["isError"], true, "{name}");
        assert_eq!(text(&unknown, name), text(&denied, "up__hidden"), "{name}");
    }
    // 2026-07-28: the -32602 protocol error of that revision, again the same for both.
    let (status, _, denied) = send_modern(&app, call(1, "up__hidden", json!({}))).await;
    assert_eq!(
        (status, &denied["error"]["code"]),
        (StatusCode::OK, &json!(-32602))
    );
    let (_, _, unknown) = send_modern(&app, call(1, "up__nothing_here", json!({}))).await;
    assert_eq!(unknown["error"]["code"], -32602);
    assert_eq!(
        unknown["error"]["message"]
            .as_str()
            .unwrap()
            .replace("up__nothing_here", "X"),
        denied["error"]["message"]
            .as_str()
            .unwrap()
            .replace("up__hidden", "X"),
    );
    // The denied one never left the proxy; the unknown one was never forwarded either (the
    // upstream's listing says it has no such tool).
    let seen = log.lock().unwrap();
    assert!(seen.bodies.iter().all(|b| b["method"] != "tools/call"));
}

/// Sends `body` as a 2026-07-28 request: `_meta` and the mirrored headers filled in.
async fn send_modern(app: &Router, mut body: Value) -> (StatusCode, HeaderMap, Value) {
    if !body["params"].is_object() {
        body["params"] = json!({});
    }
    body["params"]["_meta"] = json!({
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
    });
    let method = body["method"].as_str().unwrap().to_owned();
    let name = body["params"]
        .get("name")
        .or(body["params"].get("uri"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let mut headers = vec![
        ("mcp-protocol-version", "2026-07-28"),
        ("mcp-method", method.as_str()),
    ];
    let named = matches!(
        method.as_str(),
        "tools/call" | "prompts/get" | "resources/read"
    );
    if let (true, Some(n)) = (named, name.as_deref()) {
        headers.push(("mcp-name", n));
    }
    send(app, body, &headers).await
}

fn names(list: &Value, field: &str) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|t| t[field].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn prompts_are_prefixed_and_denied_ones_look_unknown() {
    let log = Log::default();
    let app = proxy(&upstream(log.clone(), false).await, Duration::from_secs(5));
    let list = json!({"jsonrpc": "2.0", "id": 1, "method": "prompts/list"});
    let (_, _, body) = send(&app, list, &[]).await;
    assert_eq!(names(&body["result"]["prompts"], "name"), ["up__greet"]);
    let get = |name: &str| {
        json!({"jsonrpc": "2.0", "id": 2, "method": "prompts/get",
               "params": {"name": name, "arguments": {"who": "me"}}})
    };
    let (_, _, body) = send(&app, get("up__greet"), &[]).await;
    assert_eq!(
        body["result"]["messages"][0]["content"]["text"],
        "\"greet\" {\"who\":\"me\"}"
    );
    let (_, _, denied) = send(&app, get("up__secret"), &[]).await;
    let (_, _, unknown) = send(&app, get("up__other"), &[]).await;
    assert_eq!(denied["error"]["code"], -32602);
    assert_eq!(
        denied["error"]["message"]
            .as_str()
            .unwrap()
            .replace("up__secret", "X"),
        unknown["error"]["message"]
            .as_str()
            .unwrap()
            .replace("up__other", "X"),
    );
    let seen = log.lock().unwrap();
    let got: Vec<&Value> = seen
        .bodies
        .iter()
        .filter(|b| b["method"] == "prompts/get")
        .map(|b| &b["params"]["name"])
        .collect();
    assert_eq!(
        got,
        [&json!("greet")],
        "only the allowed prompt reached the upstream"
    );
}

#[tokio::test]
async fn resources_are_routed_by_uri_and_denied_ones_look_unknown() {
    let log = Log::default();
    let app = proxy(&upstream(log.clone(), false).await, Duration::from_secs(5));
    let (_, _, body) = send(
        &app,
        json!({"jsonrpc": "2.0", "id": 1, "method": "resources/list"}),
        &[],
    )
    .await;
    assert_eq!(names(&body["result"]["resources"], "uri"), ["mem://a"]);
    let (_, _, body) = send(
        &app,
        json!({"jsonrpc": "2.0", "id": 1, "method": "resources/templates/list"}),
        &[],
    )
    .await;
    assert_eq!(
        names(&body["result"]["resourceTemplates"], "uriTemplate"),
        ["mem://item/{id}"]
    );
    let read = |uri: &str| json!({"jsonrpc": "2.0", "id": 3, "method": "resources/read", "params": {"uri": uri}});
    for uri in ["mem://a", "mem://item/7"] {
        let (_, _, body) = send(&app, read(uri), &[]).await;
        assert_eq!(body["result"]["contents"][0]["uri"], uri, "{body}");
    }
    let (_, _, denied) = send(&app, read("mem://secret"), &[]).await;
    assert_eq!(
        (&denied["error"]["code"], &denied["error"]["data"]["uri"]),
        (&json!(-32002), &json!("mem://secret"))
    );
    let (_, _, modern) = send_modern(&app, read("mem://secret")).await;
    assert_eq!(modern["error"]["code"], -32602, "2026-07-28 retired -32002");
    // Subscriptions are answered alike, denied or not; only the allowed one is forwarded.
    for uri in ["mem://secret", "mem://a", "mem://nowhere"] {
        let sub = json!({"jsonrpc": "2.0", "id": 4, "method": "resources/subscribe",
                         "params": {"uri": uri}});
        let (_, _, body) = send(&app, sub, &[]).await;
        assert_eq!(body["result"], json!({}), "{uri}");
    }
    let seen = log.lock().unwrap();
    assert!(
        seen.bodies
            .iter()
            .all(|b| b["params"]["uri"] != "mem://secret"),
        "the denied URI never reached the upstream"
    );
}

#[tokio::test]
async fn completions_and_log_levels_pass_policy() {
    let log = Log::default();
    let app = proxy(&upstream(log.clone(), false).await, Duration::from_secs(5));
    let complete = |reference: Value| {
        json!({"jsonrpc": "2.0", "id": 5, "method": "completion/complete",
               "params": {"ref": reference, "argument": {"name": "who", "value": "m"}}})
    };
    let (_, _, body) = send(
        &app,
        complete(json!({"type": "ref/prompt", "name": "up__greet"})),
        &[],
    )
    .await;
    assert_eq!(
        body["result"]["completion"]["values"][0],
        json!({"type": "ref/prompt", "name": "greet"}),
        "the upstream got its own name"
    );
    let (_, _, body) = send(
        &app,
        complete(json!({"type": "ref/prompt", "name": "up__secret"})),
        &[],
    )
    .await;
    assert_eq!(body["error"]["code"], -32602);
    let (_, _, body) = send(
        &app,
        complete(json!({"type": "ref/resource", "uri": "mem://item/{id}"})),
        &[],
    )
    .await;
    assert!(body["result"]["completion"].is_object(), "{body}");
    let level = json!({"jsonrpc": "2.0", "id": 6, "method": "logging/setLevel", "params": {"level": "debug"}});
    let (_, _, body) = send(&app, level, &[]).await;
    assert_eq!(body["result"], json!({}));
    let seen = log.lock().unwrap();
    assert!(seen
        .bodies
        .iter()
        .any(|b| b["method"] == "logging/setLevel"));
    assert!(seen
        .bodies
        .iter()
        .all(|b| b["params"]["ref"]["name"] != "secret"));
}

#[tokio::test]
async fn the_stateless_revision_is_served_without_sessions() {
    let log = Log::default();
    let app = proxy(&upstream(log.clone(), false).await, Duration::from_secs(5));
    let discover = json!({"jsonrpc": "2.0", "id": "d", "method": "server/discover"});
    let (status, headers, body) = send_modern(&app, discover).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers.get("mcp-session-id").is_none());
    assert_eq!(body["result"]["resultType"], "complete");
    assert_eq!(body["result"]["supportedVersions"][0], "2026-07-28");
    let (_, _, body) = send_modern(
        &app,
        json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}),
    )
    .await;
    assert_eq!(
        (
            &body["result"]["resultType"],
            &body["result"]["cacheScope"],
            &body["result"]["ttlMs"]
        ),
        (&json!("complete"), &json!("private"), &json!(0))
    );
    let (_, _, body) = send_modern(&app, call(2, "up__echo", json!({"a": 1}))).await;
    assert_eq!(body["result"]["resultType"], "complete");
    // The forwarded call carries none of the agent's _meta.
    assert!(log
        .lock()
        .unwrap()
        .bodies
        .iter()
        .all(|b| b["params"].get("_meta").is_none()));
    // Removed methods are unknown: 404 with -32601.
    for method in [
        "ping",
        "logging/setLevel",
        "resources/subscribe",
        "initialize",
    ] {
        let req = json!({"jsonrpc": "2.0", "id": 3, "method": method, "params": {"uri": "mem://a", "level": "info"}});
        let (status, _, body) = send_modern(&app, req).await;
        assert_eq!(
            (status, &body["error"]["code"]),
            (StatusCode::NOT_FOUND, &json!(-32601)),
            "{method}"
        );
    }
}

#[tokio::test]
async fn stateless_headers_must_match_the_body() {
    let app = proxy(
        &upstream(Log::default(), false).await,
        Duration::from_secs(5),
    );
    let meta = json!({"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                      "io.modelcontextprotocol/clientCapabilities": {}});
    let body = json!({"jsonrpc": "2.0", "id": 9, "method": "tools/call",
                      "params": {"name": "up__echo", "arguments": {}, "_meta": meta}});
    let v = "2026-07-28";
    let cases: [&[(&str, &str)]; 7] = [
        // No Mcp-Name on a tools/call.
        &[("mcp-protocol-version", v), ("mcp-method", "tools/call")],
        // Mcp-Name names another tool.
        &[
            ("mcp-protocol-version", v),
            ("mcp-method", "tools/call"),
            ("mcp-name", "up__hidden"),
        ],
        // Mcp-Method names another method.
        &[
            ("mcp-protocol-version", v),
            ("mcp-method", "tools/list"),
            ("mcp-name", "up__echo"),
        ],
        // No Mcp-Method.
        &[("mcp-protocol-version", v), ("mcp-name", "up__echo")],
        // The header's revision is not the body's.
        &[
            ("mcp-protocol-version", "2025-11-25"),
            ("mcp-method", "tools/call"),
            ("mcp-name", "up__echo"),
        ],
        // Base64 that is not.
        &[
            ("mcp-protocol-version", v),
            ("mcp-method", "tools/call"),
            ("mcp-name", "=?base64?!!?="),
        ],
        // No MCP-Protocol-Version at all, though the body names its revision.
        &[("mcp-method", "tools/call"), ("mcp-name", "up__echo")],
    ];
    for headers in cases {
        let (status, _, answer) = send(&app, body.clone(), headers).await;
        assert_eq!(
            (status, answer["error"]["code"].as_i64()),
            (StatusCode::BAD_REQUEST, Some(-32020)),
            "{headers:?}"
        );
        assert_eq!(answer["id"], 9);
    }
    // The same name in the base64 form is accepted.
    let encoded = [
        ("mcp-protocol-version", v),
        ("mcp-method", "tools/call"),
        ("mcp-name", "=?base64?dXBfX2VjaG8=?="),
    ];
    let (status, _, answer) = send(&app, body.clone(), &encoded).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    // An unknown revision named in both places gets the list of those spoken here.
    let mut old = body.clone();
    old["params"]["_meta"]["io.modelcontextprotocol/protocolVersion"] = json!("1900-01-01");
    let headers = [
        ("mcp-protocol-version", "1900-01-01"),
        ("mcp-method", "tools/call"),
        ("mcp-name", "up__echo"),
    ];
    let (status, _, answer) = send(&app, old, &headers).await;
    assert_eq!(
        (status, &answer["error"]["code"]),
        (StatusCode::BAD_REQUEST, &json!(-32022))
    );
    assert_eq!(answer["error"]["data"]["requested"], "1900-01-01");
    assert!(answer["error"]["data"]["supported"]
        .as_array()
        .unwrap()
        .contains(&json!("2026-07-28")));
    // _meta without its required keys is an invalid request, HTTP 400.
    let mut bare = body.clone();
    bare["params"]["_meta"] = json!({"io.modelcontextprotocol/protocolVersion": v});
    let headers = [
        ("mcp-protocol-version", v),
        ("mcp-method", "tools/call"),
        ("mcp-name", "up__echo"),
    ];
    let (status, _, answer) = send(&app, bare, &headers).await;
    assert_eq!(
        (status, &answer["error"]["code"]),
        (StatusCode::BAD_REQUEST, &json!(-32602))
    );
}

#[tokio::test]
async fn batches_bad_origins_and_unknown_methods_are_refused() {
    let log = Log::default();
    let app = proxy(&upstream(log.clone(), false).await, Duration::from_secs(5));
    let (status, _, body) = send(&app, json!([call(1, "up__echo", json!({}))]), &[]).await;
    assert_eq!(
        (status, body["error"]["code"].as_i64()),
        (StatusCode::BAD_REQUEST, Some(-32600))
    );
    let (status, _, _) = send(
        &app,
        call(1, "up__echo", json!({})),
        &[("origin", "http://evil.example")],
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _, _) = send(
        &app,
        json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}),
        &[("origin", "http://localhost:3000")],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    for method in ["tools/lsit", "sampling/createMessage", "resources/write"] {
        let (_, _, body) = send(
            &app,
            json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": {}}),
            &[],
        )
        .await;
        assert_eq!(body["error"]["code"], -32601, "{method}");
    }
    let (status, _, body) = send(&app, json!({"id": 1, "method": "ping"}), &[]).await;
    assert_eq!(
        (status, body["error"]["code"].as_i64()),
        (StatusCode::BAD_REQUEST, Some(-32600))
    );
    let mismatch = [("mcp-method", "tools/list")];
    let (status, _, body) = send(&app, call(1, "up__echo", json!({})), &mismatch).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (StatusCode::BAD_REQUEST, &json!(-32020))
    );
    assert!(
        log.lock().unwrap().bodies.is_empty(),
        "nothing reached the upstream"
    );
}

#[tokio::test]
async fn a_silent_upstream_is_an_error_not_a_hang() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/mcp", listener.local_addr().unwrap());
    let app = proxy(&url, Duration::from_millis(300));
    let started = std::time::Instant::now();
    let (status, _, body) = send(&app, call(1, "up__echo", json!({})), &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["error"]["code"], -32603);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("did not answer"));
    assert!(started.elapsed() < Duration::from_secs(2));
    drop(listener);
}

#[tokio::test]
async fn rate_limits_answer_429_with_retry_after_for_allowed_calls_only() {
    let log = Log::default();
    let limits = "rateLimits:\n  - {tool: up__echo, perMinute: 60, burst: 1}\n  - {tool: '*', perMinute: 1, burst: 1}\n";
    let app = proxy_with(&upstream(log, false).await, Duration::from_secs(5), limits);
    let (status, _, _) = send(&app, call(1, "up__echo", json!({})), &[]).await;
    assert_eq!(status, StatusCode::OK);
    let (status, headers, body) = send(&app, call(2, "up__echo", json!({})), &[]).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers.get("retry-after").unwrap(), "1");
    assert_eq!(
        (body["id"].as_i64(), body["error"]["code"].as_i64()),
        (Some(2), Some(-32000))
    );
    // Denied and unknown tools never count nor answer 429: that would tell them apart.
    for _ in 0..3 {
        let (status, _, body) = send(&app, call(3, "up__hidden", json!({})), &[]).await;
        assert_eq!(
            (status, &body["result"]["isError"]),
            (StatusCode::OK, &json!(true))
        );
    }
}

#[tokio::test]
async fn a_junk_answer_from_the_upstream_is_an_error() {
    let app = proxy(
        &upstream(Log::default(), false).await,
        Duration::from_secs(5),
    );
    let (status, _, body) = send(&app, call(4, "up__junk", json!({})), &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (body["id"].as_i64(), body["error"]["code"].as_i64()),
        (Some(4), Some(-32603))
    );
}

#[tokio::test]
async fn sessions_end_with_delete_and_large_bodies_get_413() {
    let app = proxy("http://127.0.0.1:9/mcp", Duration::from_secs(1));
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}});
    let (_, headers, _) = send(&app, init, &[]).await;
    let session = headers
        .get("mcp-session-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let delete = |id: String| {
        let app = app.clone();
        async move {
            let req = Request::delete("/mcp")
                .header("mcp-session-id", id)
                .body(Body::empty());
            app.oneshot(req.unwrap()).await.unwrap().status()
        }
    };
    assert_eq!(delete(session.clone()).await, StatusCode::OK);
    assert_eq!(delete(session.clone()).await, StatusCode::NOT_FOUND);
    let ping = json!({"jsonrpc": "2.0", "id": 2, "method": "ping"});
    let (status, _, _) = send(&app, ping, &[("mcp-session-id", &session)]).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "an ended session is unknown");
    let big = call(3, "up__echo", json!({"blob": "x".repeat(70 * 1024)}));
    let (status, _, body) = send(&app, big, &[]).await;
    assert_eq!(
        (status, body["error"]["code"].as_i64()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some(-32600))
    );
}

#[tokio::test]
async fn upstream_requests_have_their_own_ids_and_answers_must_match() {
    let log = Log::default();
    let app = proxy(&upstream(log.clone(), false).await, Duration::from_secs(5));
    let calls = (0..4).map(|i| send(&app, call(i, "up__echo", json!({"n": i})), &[]));
    for (i, (_, _, body)) in futures_util::future::join_all(calls)
        .await
        .into_iter()
        .enumerate()
    {
        // Each agent call got its own answer back, whatever the order upstream.
        let text = body["result"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(text.starts_with(&format!("{{\"n\":{i}}}")), "{text}");
    }
    let ids: Vec<String> = log
        .lock()
        .unwrap()
        .bodies
        .iter()
        .filter_map(|b| b.get("id").map(Value::to_string))
        .collect();
    let distinct: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "ids reused: {ids:?}");
    let (_, _, body) = send(&app, call(9, "up__misdirected", json!({})), &[]).await;
    assert_eq!(body["error"]["code"], -32603, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("another request"));
}

#[tokio::test]
async fn a_credential_hidden_in_json_escapes_is_still_removed() {
    let app = proxy(
        &upstream(Log::default(), false).await,
        Duration::from_secs(5),
    );
    let (_, _, body) = send(&app, call(1, "up__escaped", json!({})), &[]).await;
    let text = body["result"]["content"][0]["text"].as_str().unwrap();
    assert_eq!(text, "Bearer [redacted]", "{body}");
    assert!(!body.to_string().contains(TOKEN));
}

#[tokio::test]
async fn unknown_resources_and_prompt_completions_look_like_denied_ones() {
    let log = Log::default();
    let app = proxy(&upstream(log.clone(), false).await, Duration::from_secs(5));
    let read = |uri: &str| json!({"jsonrpc": "2.0", "id": 3, "method": "resources/read", "params": {"uri": uri}});
    let (_, _, denied) = send(&app, read("mem://secret"), &[]).await;
    // A URI no listing or template offers is never sent upstream; one the upstream refuses
    // gets the proxy's answer, not the upstream's.
    for uri in ["mem://nowhere", "mem://item/404"] {
        let (_, _, unknown) = send(&app, read(uri), &[]).await;
        assert_eq!(unknown["error"]["code"], denied["error"]["code"], "{uri}");
        assert_eq!(
            unknown["error"]["message"]
                .as_str()
                .unwrap()
                .replace(uri, "X"),
            denied["error"]["message"]
                .as_str()
                .unwrap()
                .replace("mem://secret", "X"),
        );
    }
    let complete = |name: &str| {
        json!({"jsonrpc": "2.0", "id": 5, "method": "completion/complete",
               "params": {"ref": {"type": "ref/prompt", "name": name},
                          "argument": {"name": "who", "value": "m"}}})
    };
    let (_, _, denied) = send(&app, complete("up__secret"), &[]).await;
    let (_, _, unknown) = send(&app, complete("up__nothing"), &[]).await;
    assert_eq!(unknown["error"], {
        let mut e = denied["error"].clone();
        e["message"] = json!(e["message"]
            .as_str()
            .unwrap()
            .replace("up__secret", "up__nothing"));
        e
    });
    let seen = log.lock().unwrap();
    assert!(seen
        .bodies
        .iter()
        .all(|b| b["params"]["uri"] != "mem://nowhere"));
    assert!(seen
        .bodies
        .iter()
        .all(|b| b["method"] != "completion/complete"));
}

fn audit_lines(buffer: &LogBuffer) -> Vec<String> {
    buffer
        .text()
        .lines()
        .filter(|l| l.contains("tool call"))
        .map(str::to_owned)
        .collect()
}

/// A call that was forwarded and then dropped (the agent went away, or the grace period at
/// shutdown ran out) may have had its effect: it gets its record all the same.
#[tokio::test]
async fn a_call_dropped_while_with_the_upstream_is_recorded_as_abandoned() {
    let (buffer, _guard) = capture_logs();
    let log = Log::default();
    let url = upstream(log.clone(), false).await;
    let app = proxy(&url, Duration::from_secs(120));
    let pending = tokio::spawn({
        let app = app.clone();
        async move { send(&app, call(1, "up__slow", json!({"n": 1})), &[]).await }
    });
    let forwarded = || {
        log.lock()
            .unwrap()
            .bodies
            .iter()
            .any(|b| b["params"]["name"] == "slow")
    };
    let started = std::time::Instant::now();
    while !forwarded() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never forwarded"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        audit_lines(&buffer).is_empty(),
        "no record while the call runs"
    );
    pending.abort();
    assert!(pending.await.is_err());
    tokio::task::yield_now().await;
    let lines = audit_lines(&buffer);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("tool=\"up__slow\""), "{}", lines[0]);
    assert!(lines[0].contains("decision=\"allow\""), "{}", lines[0]);
    assert!(lines[0].contains(super::audit::ABANDONED), "{}", lines[0]);

    // Refused before anything was forwarded: one record, not abandoned.
    let (_, _, body) = send(&app, call(2, "up__hidden", json!({})), &[]).await;
    assert_eq!(body["result"]["isError"], true);
    tokio::task::yield_now().await;
    let lines = audit_lines(&buffer);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[1].contains("decision=\"deny\""), "{}", lines[1]);
}

/// An upstream's error text may quote the arguments: the agent gets it (without the
/// credential), the audit record only its code.
#[tokio::test]
async fn upstream_error_texts_stay_out_of_the_audit_record() {
    let (buffer, _guard) = capture_logs();
    let log = Log::default();
    let url = upstream(log.clone(), false).await;
    let app = proxy(&url, Duration::from_secs(10));
    let value = "value-that-must-not-be-logged";
    let (_, _, body) = send(&app, call(1, "up__quoting", json!({"q": value})), &[]).await;
    assert_eq!(body["error"]["code"], -32602, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains(value));
    tokio::task::yield_now().await;
    let lines = audit_lines(&buffer);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(!lines[0].contains(value), "{}", lines[0]);
    assert!(
        lines[0].contains("reason=\"the upstream answered error -32602\""),
        "{}",
        lines[0]
    );
    assert!(lines[0].contains("is_error=true"), "{}", lines[0]);
}
