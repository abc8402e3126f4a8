//! tools/call through `agentvm-sidecar proxy` against a direct call to the same upstream, in one
//! run: latency at a fixed rate (median, p99, added by the proxy), throughput with a closed loop,
//! the CPU time each process spends per call, and the proxy's resident memory idle and after
//! load. A third path goes through a bare forwarder (an HTTP server that relays the bytes to the
//! upstream with an HTTP client, on one thread, reading and deciding nothing): the least that
//! any proxy in a process of its own adds on this machine, so that what the extra hop costs and
//! what the proxy's own work costs are told apart.
//!
//! `cargo bench -p agentvm-sidecar --bench proxy` (release build). Everything listens on
//! loopback; the upstream, the forwarder and the proxy run as their own processes, the load in
//! this one. Every path uses the same client (keep-alive, TCP_NODELAY; the connections it had to
//! open are counted) and the paths are measured in alternating one-second rounds, so that
//! whatever else the machine does falls on all of them alike. The proxy runs as in a pod: log
//! level info, its audit records written (to a file here).
//!
//! Settings: BENCH_RATE (calls/s, default 1000), BENCH_SECS (rounds of one second per path,
//! default 5), BENCH_WORKERS (closed loop, default 16), BENCH_AUDIT=off (log level warn: no
//! audit records), BENCH_PROXY_WRAPPER (a command the proxy runs under, such as
//! `valgrind --tool=callgrind`; the proxy gets SIGTERM at the end so that it writes its profile),
//! BENCH_EVERYTHING (the `dist/index.js` of `@modelcontextprotocol/server-everything`, which
//! `sidecar/tests/interop/run.sh` installs into `target/interop`: a real MCP server on Node.js as
//! the upstream instead of the minimal one, its `echo` tool called in a session on every path).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, Request, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::serve::ListenerExt;
use axum::Router;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

/// An HTTP connector that counts the connections it opens.
#[derive(Clone)]
struct Counting {
    inner: HttpConnector,
    opened: Arc<AtomicU64>,
}

impl tower::Service<Uri> for Counting {
    type Response = <HttpConnector as tower::Service<Uri>>::Response;
    type Error = <HttpConnector as tower::Service<Uri>>::Error;
    type Future = <HttpConnector as tower::Service<Uri>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        self.opened.fetch_add(1, Ordering::Relaxed);
        self.inner.call(dst)
    }
}

type HttpClient = Client<Counting, Full<Bytes>>;

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

/// POSTs one JSON-RPC message in the MCP session `session`; the time to the whole answer (JSON,
/// or the one message of an SSE stream), and the answer with its session header.
async fn exchange(
    client: &HttpClient,
    url: &str,
    session: Option<&str>,
    body: &Value,
) -> (Duration, Option<String>, Value) {
    let mut req = Request::post(url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream");
    if let Some(s) = session {
        req = req
            .header("mcp-session-id", s)
            .header("mcp-protocol-version", "2025-06-18");
    }
    let req = req.body(Full::new(Bytes::from(body.to_string()))).unwrap();
    let started = Instant::now();
    let response = client.request(req).await.unwrap();
    let status = response.status();
    assert!(status.is_success(), "{status}");
    let session = response
        .headers()
        .get("mcp-session-id")
        .map(|v| v.to_str().unwrap().to_owned());
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let elapsed = started.elapsed();
    if status == StatusCode::ACCEPTED {
        return (elapsed, session, Value::Null);
    }
    let text = std::str::from_utf8(&bytes).unwrap();
    let json = text
        .lines()
        .find_map(|l| l.strip_prefix("data:"))
        .unwrap_or(text);
    (elapsed, session, serde_json::from_str(json.trim()).unwrap())
}

async fn post_json(
    client: &HttpClient,
    url: &str,
    session: Option<&str>,
    body: &Value,
) -> Duration {
    let (elapsed, _, v) = exchange(client, url, session, body).await;
    assert!(v.get("result").is_some(), "{v}");
    elapsed
}

/// Opens an MCP session at `url`: its id.
async fn open_session(client: &HttpClient, url: &str) -> Option<String> {
    let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "bench", "version": "1"}}});
    let (_, session, answer) = exchange(client, url, None, &init).await;
    assert!(answer.get("result").is_some(), "{answer}");
    let note = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    exchange(client, url, session.as_deref(), &note).await;
    session
}

fn call(name: &str) -> Value {
    // `text` for the minimal upstream, `message` for server-everything's `echo`.
    json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
           "params": {"name": name, "arguments": {"text": "hello", "message": "hello"}}})
}

/// Open loop: `rate` calls a second for `secs` seconds; latencies in microseconds.
async fn at_rate(
    client: &HttpClient,
    url: &str,
    session: Option<&str>,
    name: &str,
    rate: u64,
    secs: u64,
) -> Vec<u64> {
    let session = session.map(str::to_owned);
    let body = Arc::new(call(name));
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::new();
    for _ in 0..rate * secs {
        ticker.tick().await;
        let (client, url, body) = (client.clone(), url.to_owned(), body.clone());
        let session = session.clone();
        tasks.push(tokio::spawn(async move {
            post_json(&client, &url, session.as_deref(), &body).await
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap().as_micros() as u64);
    }
    out
}

/// Closed loop: `workers` callers for `secs` seconds; the number of calls.
async fn closed_loop(
    client: &HttpClient,
    url: &str,
    session: Option<&str>,
    name: &str,
    workers: usize,
    secs: u64,
) -> u64 {
    let session = session.map(str::to_owned);
    let body = Arc::new(call(name));
    let until = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (client, url, body) = (client.clone(), url.to_owned(), body.clone());
        let session = session.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < until {
                post_json(&client, &url, session.as_deref(), &body).await;
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// CPU time of a process so far (all its threads), in microseconds: the scheduler's own count
/// in nanoseconds (`/proc/PID/task/TID/schedstat`), not the tick-sampled user and system times
/// of `/proc/PID/stat`, which charge whole ticks to whoever runs when one falls and so
/// overcharge processes that wake up a thousand times a second.
fn cpu_us(pid: u32) -> u64 {
    let mut ns = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let path = task.unwrap().path().join("schedstat");
        // A thread that ended between listing and reading counts no more.
        if let Ok(text) = std::fs::read_to_string(path) {
            ns += text
                .split_whitespace()
                .next()
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    ns / 1000
}

/// CPU time of the load generator, the upstream and the process in the middle (forwarder or
/// proxy), in microseconds.
#[derive(Clone, Copy, Default)]
struct Cpu([u64; 3]);

impl Cpu {
    fn now(pids: [u32; 3]) -> Self {
        Self(pids.map(|pid| if pid == 0 { 0 } else { cpu_us(pid) }))
    }

    /// Adds what was used between `before` and `after`.
    fn add(&mut self, after: Cpu, before: Cpu) {
        for i in 0..3 {
            self.0[i] += after.0[i] - before.0[i];
        }
    }

    /// Microseconds per call of each process.
    fn per_call(self, calls: u64) -> [f64; 3] {
        self.0.map(|us| us as f64 / calls.max(1) as f64)
    }
}

/// A child process stopped when dropped: SIGTERM (a profiler around it then writes its
/// output), SIGKILL if it is still there after 10 s.
struct Proxy(Child);

impl Drop for Proxy {
    fn drop(&mut self) {
        use rustix::process::{kill_process, Pid, Signal};
        if let Some(pid) = Pid::from_raw(self.0.id() as i32) {
            let _ = kill_process(pid, Signal::TERM);
        }
        for _ in 0..100 {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
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
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let app = Router::new().route("/mcp", post(upstream));
    axum::serve(listener, app).await.unwrap();
}

/// The bare forwarder process: the least any proxy in its own process adds (one more HTTP
/// server and client, nothing read or decided). Prints its address, serves until killed.
async fn serve_forwarder(upstream: String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("{}", listener.local_addr().unwrap());
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(connector);
    let forward = move |headers: HeaderMap, body: Bytes| {
        let (client, upstream) = (client.clone(), upstream.clone());
        async move {
            let mut req = Request::post(&upstream);
            for name in [
                "content-type",
                "accept",
                "mcp-session-id",
                "mcp-protocol-version",
            ] {
                if let Some(v) = headers.get(name) {
                    req = req.header(name, v);
                }
            }
            let response = client
                .request(req.body(Full::new(body)).unwrap())
                .await
                .unwrap();
            let (mut parts, body) = response.into_parts();
            let bytes = body.collect().await.unwrap().to_bytes();
            // Hop-by-hop headers are the upstream connection's, not the answer's (a chunked
            // empty 202 relayed with its `transfer-encoding` would be a broken response).
            for name in [
                "connection",
                "keep-alive",
                "transfer-encoding",
                "te",
                "trailer",
                "upgrade",
            ] {
                parts.headers.remove(name);
            }
            Response::from_parts(parts, axum::body::Body::from(bytes))
        }
    };
    let app = Router::new().route("/mcp", post(forward));
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

/// One path: its URL, the tool name, the process between client and upstream, what it
/// measured.
struct Path {
    name: &'static str,
    url: String,
    tool: &'static str,
    middle: Option<u32>,
    latencies: Vec<u64>,
    cpu_at_rate: Cpu,
    opened: u64,
    calls: u64,
    cpu_closed: Cpu,
    session: Option<String>,
}

impl Path {
    fn new(name: &'static str, url: String, tool: &'static str, middle: Option<u32>) -> Self {
        Self {
            name,
            url,
            tool,
            middle,
            latencies: Vec::new(),
            cpu_at_rate: Cpu::default(),
            opened: 0,
            calls: 0,
            cpu_closed: Cpu::default(),
            session: None,
        }
    }
}

fn main() {
    let role = std::env::var("BENCH_ROLE").unwrap_or_default();
    // The forwarder runs on one thread, as the proxy does: the floor it is compared with.
    let mut rt = match role.as_str() {
        "forwarder" => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    let rt = rt.enable_all().build().unwrap();
    match role.as_str() {
        "upstream" => rt.block_on(serve_upstream()),
        "forwarder" => rt.block_on(serve_forwarder(std::env::var("BENCH_UPSTREAM").unwrap())),
        _ => rt.block_on(run()),
    }
}

/// Starts server-everything (`node SCRIPT streamableHttp`) on a free port; its address and the
/// child, once it accepts connections.
fn spawn_everything(script: &str) -> (std::net::SocketAddr, Child) {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut child = Command::new("node")
        .arg(script)
        .arg("streamableHttp")
        .env("PORT", port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("node, to run server-everything");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    for _ in 0..100 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return (addr, child);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("server-everything did not start on {addr}");
}

/// Starts this binary again in `role`; its address and the child.
fn spawn_role(role: &str, upstream: &str) -> (std::net::SocketAddr, Child) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env("BENCH_ROLE", role)
        .env("BENCH_UPSTREAM", upstream)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::BufRead;
    let mut line = String::new();
    let stdout = child.stdout.take().unwrap();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .unwrap();
    (line.trim().parse().unwrap(), child)
}

async fn run() {
    println!("policy decision (shipped policy): p50 {} us", decision_us());
    let rate = env_or("BENCH_RATE", 1000);
    let secs = env_or("BENCH_SECS", 5);
    let workers = env_or("BENCH_WORKERS", 16) as usize;
    let audit = std::env::var("BENCH_AUDIT").as_deref() != Ok("off");

    // The upstream runs in its own process (this binary again, or server-everything), as it
    // would in a cluster: the direct path crosses one process boundary and the proxied path three.
    let everything = std::env::var("BENCH_EVERYTHING").ok();
    let (up, up_child) = match &everything {
        Some(script) => spawn_everything(script),
        None => spawn_role("upstream", ""),
    };
    let upstream_pid = up_child.id();
    let _upstream = Proxy(up_child);
    let (fwd, fwd_child) = spawn_role("forwarder", &format!("http://{up}/mcp"));
    let forwarder = Proxy(fwd_child);
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
    let audit_log = dir.join("audit.log");
    // BENCH_PROXY_WRAPPER runs the proxy under another program (`valgrind --tool=callgrind`).
    let wrapper = std::env::var("BENCH_PROXY_WRAPPER").unwrap_or_default();
    let mut command = wrapper.split_whitespace();
    let child = match command.next() {
        Some(program) => {
            let mut c = Command::new(program);
            c.args(command).arg(env!("CARGO_BIN_EXE_agentvm-sidecar"));
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_agentvm-sidecar")),
    }
    .args([
        "proxy",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--config",
    ])
    .arg(&config)
    .env("AGENTVM_LOG_LEVEL", if audit { "info" } else { "warn" })
    .env("AGENTVM_LOG_FORMAT", "json")
    .stdout(Stdio::null())
    .stderr(Stdio::from(std::fs::File::create(&audit_log).unwrap()))
    .spawn()
    .unwrap();
    let proxy = Proxy(child);
    let opened = Arc::new(AtomicU64::new(0));
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let connector = Counting {
        inner: connector,
        opened: opened.clone(),
    };
    let client: HttpClient = Client::builder(TokioExecutor::new()).build(connector);
    let proxy_url = format!("http://127.0.0.1:{port}/mcp");
    for _ in 0..600 {
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

    let mut paths = [
        Path::new("direct", format!("http://{up}/mcp"), "echo", None),
        Path::new(
            "forwarded",
            format!("http://{fwd}/mcp"),
            "echo",
            Some(forwarder.0.id()),
        ),
        Path::new("proxied", proxy_url, "up__echo", Some(proxy.0.id())),
    ];
    let pids = |p: &Path| [std::process::id(), upstream_pid, p.middle.unwrap_or(0)];
    // A real MCP server wants a session on every path (the proxy keeps its own upstream).
    for p in paths.iter_mut() {
        if everything.is_some() {
            p.session = open_session(&client, &p.url).await;
        }
    }
    // Warm up every path (connections, the proxy's upstream session and tool list).
    for p in &paths {
        post_json(&client, &p.url, p.session.as_deref(), &call(p.tool)).await;
        at_rate(&client, &p.url, p.session.as_deref(), p.tool, 500, 1).await;
    }
    for _ in 0..secs {
        for p in paths.iter_mut() {
            let (before, opened_before) = (Cpu::now(pids(p)), opened.load(Ordering::Relaxed));
            let l = at_rate(&client, &p.url, p.session.as_deref(), p.tool, rate, 1).await;
            p.cpu_at_rate.add(Cpu::now(pids(p)), before);
            p.latencies.extend(l);
            p.opened += opened.load(Ordering::Relaxed) - opened_before;
        }
    }
    const ROUNDS: u64 = 3;
    for _ in 0..ROUNDS {
        for p in paths.iter_mut() {
            let before = Cpu::now(pids(p));
            p.calls += closed_loop(&client, &p.url, p.session.as_deref(), p.tool, workers, 1).await;
            p.cpu_closed.add(Cpu::now(pids(p)), before);
        }
    }
    let loaded_kib = rss_kib(proxy.0.id());
    for p in paths.iter_mut() {
        p.latencies.sort_unstable();
    }

    println!(
        "tools/call, {rate} calls/s, {secs} alternating rounds of 1 s per path ({} calls per \
         path), audit records {}, upstream {}",
        paths[0].latencies.len(),
        if audit { "on" } else { "off" },
        if everything.is_some() {
            "server-everything"
        } else {
            "minimal"
        },
    );
    println!(
        "{:<10} {:>7} {:>7} {:>7} {:>6} {:>6} {:>9}  CPU us/call: load, upstream, middle",
        "path", "p50 us", "p99 us", "max us", "+p50", "+p99", "new conns"
    );
    let [d, ..] = &paths;
    for p in &paths {
        let l = &p.latencies;
        let c = p.cpu_at_rate.per_call(p.latencies.len() as u64);
        println!(
            "{:<10} {:>7} {:>7} {:>7} {:>6} {:>6} {:>9}  {:.0}, {:.0}, {:.0}",
            p.name,
            pct(l, 0.5),
            pct(l, 0.99),
            pct(l, 1.0),
            pct(l, 0.5) as i64 - pct(&d.latencies, 0.5) as i64,
            pct(l, 0.99) as i64 - pct(&d.latencies, 0.99) as i64,
            p.opened,
            c[0],
            c[1],
            c[2],
        );
    }
    println!("closed loop, {workers} callers, {ROUNDS} alternating rounds of 1 s per path:");
    for p in &paths {
        let c = p.cpu_closed.per_call(p.calls);
        let per_sec = p.calls as f64 / ROUNDS as f64;
        println!(
            "{:<10} {:>7.0}/s {:>4.0}% of direct  CPU us/call: load {:.1}, upstream {:.1}, middle {:.1}",
            p.name,
            per_sec,
            100.0 * p.calls as f64 / d.calls as f64,
            c[0],
            c[1],
            c[2],
        );
    }
    println!(
        "proxy RSS: idle {} KiB, after load {} KiB",
        idle_kib, loaded_kib
    );
    drop(proxy);
    let _ = std::fs::remove_dir_all(&dir);
}
