//! One audit record per request that reaches (or is refused before) an upstream: tool calls,
//! prompts, resource reads and subscriptions, completions. A tracing event with target
//! `agentvm::audit` (a JSON line with `--log-format json`). Argument values never appear: only
//! their SHA-256.

use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;

use super::policy::Agent;

/// The facts of one call.
#[derive(Debug)]
pub struct Record<'a> {
    /// The caller.
    pub agent: &'a Arc<Agent>,
    /// The MCP method (`tools/call`, `prompts/get`, `resources/read`, ...).
    pub method: &'a str,
    /// Tool or prompt name as the agent sent it; empty for resources.
    pub tool: &'a str,
    /// Resource URI (or the template a completion refers to); empty otherwise.
    pub uri: &'a str,
    /// Upstream name (`agentvm` for exec), empty for a name that resolves to nothing.
    pub upstream: &'a str,
    /// `allow`, `deny`, `error` (policy failed), `unknown` or `rate_limited`.
    pub decision: &'static str,
    /// Deny messages, or the failure.
    pub reason: String,
    /// SHA-256 of the canonical JSON of the arguments.
    pub args_digest: &'a str,
    /// When the call arrived.
    pub started: Instant,
    /// Time spent waiting for the upstream or exec backend, in microseconds.
    pub upstream_us: u64,
    /// Size of the result in bytes.
    pub result_bytes: usize,
    /// The result's `isError`, when there is a result or an error.
    pub is_error: Option<bool>,
    /// The request went to the upstream or exec backend ([`Record::forwarding`]).
    in_flight: bool,
    /// The record was written.
    written: bool,
}

/// The reason of a record whose request ended while it was with the upstream.
pub const ABANDONED: &str =
    "abandoned: the request ended before its answer (the agent went away or the proxy stopped)";

impl<'a> Record<'a> {
    /// Writes the record: after the answer has gone out when called in the proxy's runtime
    /// (formatting a record costs as much as a small policy decision, and the agent need not
    /// wait for it), at once elsewhere. A record still waiting when the runtime stops is
    /// written as it is dropped, so none is lost at shutdown.
    pub fn emit(&mut self) {
        self.written = true;
        let written = Written {
            agent: self.agent.clone(),
            method: self.method.to_owned(),
            tool: self.tool.to_owned(),
            uri: self.uri.to_owned(),
            upstream: self.upstream.to_owned(),
            decision: self.decision,
            reason: std::mem::take(&mut self.reason),
            args_digest: self.args_digest.to_owned(),
            latency_us: self.started.elapsed().as_micros() as u64,
            upstream_us: self.upstream_us,
            result_bytes: self.result_bytes,
            is_error: self.is_error,
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            use tracing::Instrument;
            // On the proxy's single thread, a spawned task runs once the request's task has
            // handed its answer to the socket and yielded.
            runtime.spawn(async move { drop(written) }.instrument(tracing::Span::current()));
        } else {
            drop(written);
        }
    }

    /// Marks the request as sent on to the upstream or exec backend: from now on the record is
    /// written even if the request ends without an answer (see [`ABANDONED`]).
    pub fn forwarding(&mut self) {
        self.in_flight = true;
    }

    /// Records what came back (`answer`, the JSON-RPC response sent to the agent, awaited
    /// since `forwarded_at`) and writes the record. `failure` is the proxy's own account of a
    /// call that got no answer from its backend (a timeout, a refusal); an upstream's error
    /// text is never recorded (it may quote the arguments), only its code.
    pub fn finish(&mut self, answer: &Value, forwarded_at: Instant, failure: Option<String>) {
        self.upstream_us = forwarded_at.elapsed().as_micros() as u64;
        if let Some(r) = answer.get("result") {
            self.result_bytes = json_len(r);
            self.is_error = Some(r.get("isError").and_then(Value::as_bool).unwrap_or(false));
        } else if let Some(e) = answer.get("error") {
            self.is_error = Some(true);
            let code = e.get("code").map(Value::to_string).unwrap_or_default();
            self.reason = format!("the upstream answered error {code}");
        }
        if let Some(f) = failure {
            self.reason = f;
        }
        self.emit();
    }

    /// A record for `method` on `tool` (or `uri`), not yet decided.
    pub fn new(
        agent: &'a Arc<Agent>,
        method: &'a str,
        args_digest: &'a str,
        started: Instant,
    ) -> Self {
        Self {
            agent,
            method,
            tool: "",
            uri: "",
            upstream: "",
            decision: "unknown",
            reason: String::new(),
            args_digest,
            started,
            upstream_us: 0,
            result_bytes: 0,
            is_error: None,
            in_flight: false,
            written: false,
        }
    }
}

impl Drop for Record<'_> {
    /// A request dropped while it was with the upstream (the agent closed the connection, the
    /// grace period at shutdown ran out) is recorded all the same: the call may have had its
    /// effect.
    fn drop(&mut self) {
        if self.in_flight && !self.written {
            self.reason = ABANDONED.to_owned();
            self.emit();
        }
    }
}

/// A record's fields, owned, written when dropped.
struct Written {
    agent: Arc<Agent>,
    method: String,
    tool: String,
    uri: String,
    upstream: String,
    decision: &'static str,
    reason: String,
    args_digest: String,
    latency_us: u64,
    upstream_us: u64,
    result_bytes: usize,
    is_error: Option<bool>,
}

impl Drop for Written {
    fn drop(&mut self) {
        tracing::info!(
            target: "agentvm::audit",
            decision = self.decision,
            method = self.method.as_str(),
            agent.pod = %self.agent.pod,
            agent.namespace = %self.agent.namespace,
            agent.service_account = %self.agent.service_account,
            agent.profile = %self.agent.profile,
            upstream = self.upstream.as_str(),
            tool = self.tool.as_str(),
            uri = self.uri.as_str(),
            reason = self.reason.as_str(),
            latency_us = self.latency_us,
            upstream_us = self.upstream_us,
            args_sha256 = self.args_digest.as_str(),
            result_bytes = self.result_bytes,
            is_error = self.is_error,
            "tool call"
        );
    }
}

/// Hex SHA-256 of the arguments as JSON text.
pub fn digest(arguments: &Value) -> String {
    let mut sha = Sha256(ring::digest::Context::new(&ring::digest::SHA256));
    // Writing into the hash cannot fail; the JSON text is never built as a string.
    let _ = serde_json::to_writer(&mut sha, arguments);
    let mut hex = String::with_capacity(64);
    for b in sha.0.finish().as_ref() {
        hex.push(char::from(HEX[usize::from(b >> 4)]));
        hex.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    hex
}

/// Size of `value` as JSON text, without building the text.
pub fn json_len(value: &Value) -> usize {
    let mut counter = Counter(0);
    let _ = serde_json::to_writer(&mut counter, value);
    counter.0
}

const HEX: &[u8; 16] = b"0123456789abcdef";

struct Sha256(ring::digest::Context);

impl std::io::Write for Sha256 {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Counter(usize);

impl std::io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Log lines written on this thread while the guard lives (text format, no colours): what
/// tests read audit records from.
#[cfg(test)]
pub(crate) fn capture_logs() -> (LogBuffer, tracing::subscriber::DefaultGuard) {
    let buffer = LogBuffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    (buffer, tracing::subscriber::set_default(subscriber))
}

/// Where [`capture_logs`] writes.
#[cfg(test)]
#[derive(Clone, Default)]
pub(crate) struct LogBuffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

#[cfg(test)]
impl LogBuffer {
    /// Everything written so far.
    pub(crate) fn text(&self) -> String {
        let bytes = self.0.lock().map(|b| b.clone()).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

#[cfg(test)]
impl std::io::Write for LogBuffer {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut b) = self.0.lock() {
            b.extend_from_slice(data);
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn digest_and_length_are_those_of_the_json_text() {
        let args = json!({"text": "héllo", "n": [1, 2.5, null], "o": {}});
        let text = args.to_string();
        let d = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
        let expected: String = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(digest(&args), expected);
        assert_eq!(json_len(&args), text.len());
        assert_eq!(
            digest(&json!({})),
            "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
    }

    mod text_log {
        use std::time::Instant;

        use super::super::{capture_logs, Agent, Record};

        #[test]
        fn text_from_upstreams_cannot_forge_a_record_in_the_text_log() {
            let (buffer, _guard) = capture_logs();
            let agent = std::sync::Arc::new(Agent::default());
            let mut record = Record::new(&agent, "completion/complete", "d", Instant::now());
            record.tool = "x\n2026-12-04T00:00:00Z  INFO tool call decision=\"allow\"";
            record.reason =
                "Unknown prompt: x\n2026-12-04T00:00:00Z  INFO tool call decision=\"allow\"".into();
            record.emit();
            let text = buffer.text();
            assert_eq!(text.lines().count(), 1, "one record, one line: {text}");
        }

        /// In the proxy's runtime a record is written once the request's task yields (after
        /// its answer went out), inside the request's span, with the latency of the answer;
        /// one still waiting when the runtime stops is written then.
        #[test]
        fn records_are_written_after_the_answer_and_never_lost() {
            let (buffer, _guard) = capture_logs();
            let agent = std::sync::Arc::new(Agent::default());
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            runtime.block_on(async {
                let span = tracing::info_span!("mcp", request = 7);
                let _entered = span.enter();
                let mut record = Record::new(&agent, "tools/call", "d", Instant::now());
                record.tool = "up__echo";
                record.reason = "first".into();
                record.emit();
                assert_eq!(buffer.text(), "", "nothing written before the task yields");
                tokio::task::yield_now().await;
                let written = buffer.text();
                assert_eq!(written.lines().count(), 1, "{written}");
                assert!(written.contains("mcp{request=7}"), "{written}");
                assert!(written.contains("tool=\"up__echo\""), "{written}");
                assert!(written.contains("reason=\"first\""), "{written}");
                record.reason = "second".into();
                record.emit();
            });
            assert_eq!(buffer.text().lines().count(), 1);
            drop(runtime);
            let written = buffer.text();
            assert_eq!(written.lines().count(), 2, "{written}");
            assert!(written.contains("reason=\"second\""), "{written}");
        }
    }
}
