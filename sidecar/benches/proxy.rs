//! tools/call through `agentvm-sidecar proxy` against a direct call to the same upstream, in one
//! run: latency at a fixed rate (median, p99, added by the proxy), throughput with a closed loop,
//! and the proxy's resident memory idle and after load.
//!
//! `cargo bench -p agentvm-sidecar --bench proxy` (release build). Everything listens on
//! loopback; the proxy and the upstream run as their own processes, the load in this one.
//! Settings: BENCH_RATE (calls/s, default 1000), BENCH_SECS (default 5), BENCH_WORKERS (closed
//! loop, default 16).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// A minimal MCP upstream with one tool, `echo`, answering in JSON.
async fn upstream(_headers: HeaderMap, body: String) -> Response {
    let msg: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let Some(id) = msg.get("id").cloned() else {
        return StatusCode::ACCEPTED.into_response();
    };
    let result = match msg["method"].as_str().unwrap_or("") {
        "initialize" => json!({"protocolVersion": "2025-06-18", "capabilities": {"tools": {}},
                               "serverInfo": {"name": "bench", "version": "1"}}),
        "tools/list" => json!({"tools": [{"name": "echo", "inputSchema": {"type": "object"}}]}),
        _ => json!({"content": [{"type": "text", "text": msg["params"]["arguments"]["text"]}]}),
    };
    let answer = json!({"jsonrpc": "2.0", "id": id, "result": result}).to_string();
    (
        [
            ("content-type", "application/json"),
            ("mcp-session-id", "bench"),
        ],
        answer,
    )
        .into_response()
}

async fn post_json(client: &HttpClient, url: &str, body: &Value) -> Duration {
    let req = Request::post(url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let started = Instant::now();
    let response = client.request(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let elapsed = started.elapsed();
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    assert!(v.get("result").is_some(), "{v}");
    elapsed
}

fn call(name: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
           "params": {"name": name, "arguments": {"text": "hello"}}})
}

/// Open loop: `rate` calls a second for `secs` seconds; latencies in microseconds, sorted.
async fn at_rate(client: &HttpClient, url: &str, name: &str, rate: u64, secs: u64) -> Vec<u64> {
    let body = Arc::new(call(name));
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::new();
    for _ in 0..rate * secs {
        ticker.tick().await;
        let (client, url, body) = (client.clone(), url.to_owned(), body.clone());
        tasks.push(tokio::spawn(async move {
            post_json(&client, &url, &body).await
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap().as_micros() as u64);
    }
    out.sort_unstable();
    out
}

/// Closed loop: `workers` callers for `secs` seconds; calls per second.
async fn throughput(client: &HttpClient, url: &str, name: &str, workers: usize, secs: u64) -> f64 {
    let body = Arc::new(call(name));
    let until = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (client, url, body) = (client.clone(), url.to_owned(), body.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < until {
                post_json(&client, &url, &body).await;
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total as f64 / secs as f64
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A child process killed when dropped.
struct Proxy(Child);

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The upstream process: prints its address, serves until killed.
async fn serve_upstream() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("{}", listener.local_addr().unwrap());
    let app = Router::new().route("/mcp", post(upstream));
    axum::serve(listener, app).await.unwrap();
}

/// Time of one policy decision with the shipped policy, in microseconds (median of 2,000).
fn decision_us() -> u64 {
    use agentvm_sidecar::proxy::policy::{Agent, DecisionInput, ToolPolicy};
    let policy = ToolPolicy::shipped().unwrap();
    let agent = Agent::default();
    let args = json!({"text": "hello"});
    let mut times = Vec::new();
    for _ in 0..2000 {
        let started = Instant::now();
        let d = policy.decide(&DecisionInput::tool(
            "tools/call",
            "up",
            "up__echo",
            Some(&args),
            &agent,
        ));
        times.push(started.elapsed().as_micros() as u64);
        assert!(d.allowed);
    }
    times.sort_unstable();
    pct(&times, 0.5)
}

#[tokio::main]
async fn main() {
    if std::env::var("BENCH_ROLE").as_deref() != Ok("upstream") {
        println!("policy decision (shipped policy): p50 {} us", decision_us());
    }
    let rate = env_or("BENCH_RATE", 1000);
    let secs = env_or("BENCH_SECS", 5);
    let workers = env_or("BENCH_WORKERS", 16) as usize;
    // With BENCH_AUDIT_LOG=FILE the proxy writes its audit records there (at some cost).
    let audit_log = std::env::var("BENCH_AUDIT_LOG").ok();

    if std::env::var("BENCH_ROLE").as_deref() == Ok("upstream") {
        return serve_upstream().await;
    }
    // The upstream runs in its own process (this binary again), as it would in a cluster: the
    // direct path crosses one process boundary and the proxied path three.
    let mut up_child = Command::new(std::env::current_exe().unwrap())
        .env("BENCH_ROLE", "upstream")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let up: std::net::SocketAddr = {
        use std::io::BufRead;
        let mut line = String::new();
        let stdout = up_child.stdout.take().unwrap();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .unwrap();
        line.trim().parse().unwrap()
    };
    let _upstream = Proxy(up_child);
    let dir = std::env::temp_dir().join(format!("agentvm-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("proxy.yaml");
    std::fs::write(
        &config,
        format!("upstreams:\n  - name: up\n    url: http://{up}/mcp\n"),
    )
    .unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let child = Command::new(env!("CARGO_BIN_EXE_agentvm-sidecar"))
        .args([
            "proxy",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--config",
        ])
        .arg(&config)
        .env(
            "AGENTVM_LOG_LEVEL",
            if audit_log.is_some() { "info" } else { "warn" },
        )
        .env("AGENTVM_LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(match &audit_log {
            Some(path) => Stdio::from(std::fs::File::create(path).unwrap()),
            None => Stdio::null(),
        })
        .spawn()
        .unwrap();
    let proxy = Proxy(child);
    let proxy_url = format!("http://127.0.0.1:{port}/mcp");
    let direct_url = format!("http://{up}/mcp");
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    for _ in 0..100 {
        let ping = json!({"jsonrpc": "2.0", "id": 1, "method": "ping"});
        let req = Request::post(&proxy_url)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(ping.to_string())))
            .unwrap();
        if client.request(req).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let idle_kib = rss_kib(proxy.0.id());

    // Warm up both paths (connections, the proxy's upstream session and tool list).
    at_rate(&client, &direct_url, "echo", 500, 1).await;
    at_rate(&client, &proxy_url, "up__echo", 500, 1).await;

    let direct = at_rate(&client, &direct_url, "echo", rate, secs).await;
    let proxied = at_rate(&client, &proxy_url, "up__echo", rate, secs).await;
    let direct_tput = throughput(&client, &direct_url, "echo", workers, 3).await;
    let proxied_tput = throughput(&client, &proxy_url, "up__echo", workers, 3).await;
    let loaded_kib = rss_kib(proxy.0.id());

    println!(
        "tools/call, {rate} calls/s for {secs} s ({} calls per path)",
        direct.len()
    );
    println!(
        "{:<10} {:>10} {:>10} {:>10}",
        "path", "p50 us", "p99 us", "max us"
    );
    for (name, l) in [("direct", &direct), ("proxied", &proxied)] {
        println!(
            "{name:<10} {:>10} {:>10} {:>10}",
            pct(l, 0.5),
            pct(l, 0.99),
            pct(l, 1.0)
        );
    }
    let added_p50 = pct(&proxied, 0.5) as i64 - pct(&direct, 0.5) as i64;
    let added_p99 = pct(&proxied, 0.99) as i64 - pct(&direct, 0.99) as i64;
    println!("added by the proxy: p50 {added_p50} us, p99 {added_p99} us");
    println!(
        "throughput, {workers} callers: direct {direct_tput:.0}/s, proxied {proxied_tput:.0}/s ({:.0}%)",
        100.0 * proxied_tput / direct_tput
    );
    println!(
        "proxy RSS: idle {} KiB, after load {} KiB",
        idle_kib, loaded_kib
    );
    drop(proxy);
    let _ = std::fs::remove_dir_all(&dir);
}
