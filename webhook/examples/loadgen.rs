//! Load generator for `agentvm serve` (and anything else that answers POSTs over HTTPS): keeps
//! `--connections` TLS connections alive and either sends back to back (`--rate 0`, the
//! throughput ceiling) or at a fixed rate, measuring each latency from the moment the request was
//! due (so that a stalled server cannot hide its queueing). Prints one JSON line.
//!
//! `cargo run --release -p agentvm-webhook --example loadgen -- --help`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use rustls::pki_types::pem::PemObject;

#[derive(Debug, Parser)]
struct Args {
    /// Address, e.g. 127.0.0.1:8443.
    #[arg(long)]
    addr: std::net::SocketAddr,
    /// Path, e.g. /mutate.
    #[arg(long, default_value = "/mutate")]
    path: String,
    /// File whose bytes are the body of every request.
    #[arg(long)]
    body: std::path::PathBuf,
    /// PEM certificate to trust (the server's self-signed certificate or its CA).
    #[arg(long)]
    ca: std::path::PathBuf,
    /// Server name to verify.
    #[arg(long, default_value = "127.0.0.1")]
    server_name: String,
    /// Keep-alive connections.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Requests per second in total; 0 sends back to back.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Seconds of measurement (after one second of warm-up).
    #[arg(long, default_value_t = 10)]
    duration: u64,
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(args: &Args, tls: &tokio_rustls::TlsConnector) -> Sender {
    let tcp = tokio::net::TcpStream::connect(args.addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let name = rustls::pki_types::ServerName::try_from(args.server_name.clone()).unwrap();
    let stream = tls.connect(name, tcp).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

async fn send(sender: &mut Sender, path: &str, body: &Bytes) -> bool {
    if sender.ready().await.is_err() {
        return false;
    }
    let req = hyper::Request::post(path)
        .header("host", "agentvm")
        .header("content-type", "application/json")
        .body(Full::new(body.clone()))
        .unwrap();
    match sender.send_request(req).await {
        Ok(res) => {
            let ok = res.status().is_success();
            ok && res.into_body().collect().await.is_ok()
        }
        Err(_) => false,
    }
}

fn main() {
    let args = Arc::new(Args::parse());
    // One worker thread: the load generator shares the machine with the server under test.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(args));
}

async fn run(args: Arc<Args>) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(&args.ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config));
    let body = Bytes::from(std::fs::read(&args.body).unwrap());

    let warmup = Duration::from_secs(1);
    let measure = Duration::from_secs(args.duration);
    let start = Instant::now() + Duration::from_millis(200);
    let mut tasks = Vec::new();
    for c in 0..args.connections {
        let (args, tls, body) = (args.clone(), tls.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let mut sender = connect(&args, &tls).await;
            let mut latencies: Vec<u64> = Vec::new();
            let mut errors = 0u64;
            let mut i: u64 = 0;
            loop {
                // Request k of the whole run goes to connection k % connections.
                let k = i * args.connections as u64 + c as u64;
                let due = match (k * 1_000_000_000).checked_div(args.rate) {
                    Some(offset) => start + Duration::from_nanos(offset),
                    None => Instant::now(),
                };
                if due >= start + warmup + measure {
                    break;
                }
                // Late because the previous answer came after `due`: that wait is the server's
                // and counts. Late only because the timer fired late (millisecond granularity):
                // that is the generator's, and the clock starts at the actual send.
                let backlog = Instant::now() > due;
                tokio::time::sleep_until(due.into()).await;
                let sent = if backlog { due } else { Instant::now() };
                let ok = send(&mut sender, &args.path, &body).await;
                if !ok {
                    errors += 1;
                    sender = connect(&args, &tls).await;
                }
                if due >= start + warmup {
                    latencies.push(sent.elapsed().as_micros() as u64);
                }
                i += 1;
            }
            (latencies, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.unwrap();
        all.extend(l);
        errors += e;
    }
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    let out = serde_json::json!({
        "connections": args.connections,
        "target_rate": args.rate,
        "requests": all.len(),
        "errors": errors,
        "throughput_rps": (all.len() as f64 / measure.as_secs_f64()).round(),
        "p50_us": pct(0.50),
        "p90_us": pct(0.90),
        "p99_us": pct(0.99),
        "max_us": all.last().copied().unwrap_or(0),
    });
    println!("{out}");
}
