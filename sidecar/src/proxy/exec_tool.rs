//! The built-in `exec` tool: forwarded to the exec server (or dispatcher) configured for the
//! pod, its answer turned into an MCP tool result.

use axum::body::Bytes;
use axum::http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use serde_json::{json, Map, Value};

use super::upstream::{HttpClient, Limits};

/// The least the proxy accepts from the exec backend: its 1 MiB of stdout and of stderr, each
/// byte escaped as JSON at worst six times its size (`\u0000`), and the rest of the answer.
/// An answer the command's caps allow must never turn into "backend unreachable", which would
/// invite a retry that repeats the command's side effects.
const EXEC_ANSWER_FLOOR: usize = 2 * 6 * (1 << 20) + (64 << 10);

/// The tool name the agent sees.
pub const EXEC_TOOL: &str = "exec";

/// The exec tool's definition in `tools/list`.
pub fn definition() -> Value {
    json!({
        "name": EXEC_TOOL,
        "title": "Run a command",
        "description": "Run a command in the shared workspace. argv is run as given, without a \
            shell (use [\"sh\", \"-c\", \"...\"] for one). Output is capped; the command and \
            everything it started are killed at the time limit.",
        "inputSchema": {
            "type": "object",
            "properties": {
                "argv": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                "cwd": {"type": "string", "description": "Relative to the workspace."},
                "stdin": {"type": "string"},
                "env": {"type": "object", "additionalProperties": {"type": "string"}},
                "timeout_ms": {"type": "integer", "minimum": 1},
            },
            "required": ["argv"],
            "additionalProperties": false,
        },
    })
}

/// Why the exec backend gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum ExecToolError {
    /// Connection failure, timeout or a bad answer.
    #[error("exec backend is unreachable: {0}")]
    Transport(String),
}

/// Runs the tool: the known argument keys are copied into a fresh request (nothing else is
/// forwarded); the answer becomes a `CallToolResult`.
pub async fn call(
    client: &HttpClient,
    limits: Limits,
    endpoint: &str,
    arguments: &Value,
) -> Result<Ran, ExecToolError> {
    let mut body = Map::new();
    for key in ["argv", "cwd", "stdin", "env", "timeout_ms"] {
        if let Some(v) = arguments.get(key) {
            body.insert(key.to_owned(), v.clone());
        }
    }
    let uri = format!("{}/v1/exec", endpoint.trim_end_matches('/'));
    let transport = |e: String| ExecToolError::Transport(e);
    let req = Request::builder()
        .method(Method::POST)
        .uri(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(super::server::json_bytes(
            &Value::Object(body),
        ))))
        .map_err(|e| transport(e.to_string()))?;
    // The command's own time limit plus a margin, when it is longer than the usual one.
    let command_ms = arguments
        .get("timeout_ms")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let timeout = limits.timeout.max(std::time::Duration::from_millis(
        command_ms.saturating_add(5_000),
    ));
    let exchange = async {
        let response = client
            .request(req)
            .await
            .map_err(|e| transport(e.to_string()))?;
        let status = response.status();
        let limit = limits.max_response_bytes.max(EXEC_ANSWER_FLOOR);
        let bytes = Limited::new(response.into_body(), limit)
            .collect()
            .await
            .map_err(|e| transport(e.to_string()))?
            .to_bytes();
        let json: Value = serde_json::from_slice(&bytes).map_err(|e| transport(e.to_string()))?;
        Ok::<_, ExecToolError>((status, json))
    };
    let (status, answer) = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| transport("no answer in time".into()))??;
    Ok(Ran {
        result: to_result(status, &answer),
        refused: (status != StatusCode::OK).then_some(status.as_u16()),
    })
}

/// What the exec backend answered: the tool result, and the HTTP status when it refused the
/// command (busy, a bad request) rather than ran it.
#[derive(Debug)]
pub struct Ran {
    /// The `CallToolResult`.
    pub result: Value,
    /// The exec server's status when it did not run the command.
    pub refused: Option<u16>,
}

fn to_result(status: StatusCode, answer: &Value) -> Value {
    if status != StatusCode::OK {
        let error = answer
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("exec failed");
        let text = if status == StatusCode::TOO_MANY_REQUESTS {
            format!("{error} (the exec server is busy)")
        } else {
            error.to_owned()
        };
        return json!({"content": [{"type": "text", "text": text}], "isError": true});
    }
    let stdout = answer.get("stdout").and_then(Value::as_str).unwrap_or("");
    let stderr = answer.get("stderr").and_then(Value::as_str).unwrap_or("");
    let exit = answer.get("exit_code").and_then(Value::as_i64);
    let timed_out = answer.get("timed_out").and_then(Value::as_bool) == Some(true);
    let mut text = stdout.to_owned();
    if !stderr.is_empty() {
        text.push_str("\n[stderr]\n");
        text.push_str(stderr);
    }
    if let Some(note) = answer.get("note").and_then(Value::as_str) {
        text.push_str("\n[note] ");
        text.push_str(note);
    }
    if timed_out {
        text.push_str("\n[killed at the time limit]");
    } else if exit != Some(0) {
        let how = match exit {
            Some(code) => format!("exit status {code}"),
            None => "killed by a signal".into(),
        };
        text.push_str(&format!("\n[{how}]"));
    }
    json!({
        "content": [{"type": "text", "text": text}],
        "structuredContent": answer,
        "isError": timed_out || exit != Some(0),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn answers_become_tool_results() {
        let ok = to_result(
            StatusCode::OK,
            &json!({"exit_code": 0, "stdout": "hi\n", "stderr": ""}),
        );
        assert_eq!(ok["isError"], false);
        assert_eq!(ok["content"][0]["text"], "hi\n");
        let failed = to_result(
            StatusCode::OK,
            &json!({"exit_code": 2, "stdout": "", "stderr": "no"}),
        );
        assert_eq!(failed["isError"], true);
        assert_eq!(
            failed["content"][0]["text"],
            "\n[stderr]\nno\n[exit status 2]"
        );
        let lost = to_result(
            StatusCode::OK,
            &json!({"exit_code": null, "stdout": "", "stderr": "", "timed_out": true,
                "note": "output lost"}),
        );
        assert_eq!(
            lost["content"][0]["text"],
            "\n[note] output lost\n[killed at the time limit]"
        );
        let busy = to_result(StatusCode::TOO_MANY_REQUESTS, &json!({"error": "too many"}));
        assert_eq!(busy["isError"], true);
    }
}
