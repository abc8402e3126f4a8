//! `agentvm-sidecar probe URL`: the startup probe of the injected containers. A plain HTTP/1.1
//! `GET` written by hand over a TCP stream, so that the image needs no curl or wget. Only
//! loopback addresses are probed: the probe has no business reaching anything else.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Default time for the whole exchange (connect, request, status line).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The URL is not `http://host[:port][/path]`.
    #[error("bad url {url:?}: {reason}")]
    BadUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The host does not resolve, or not only to loopback addresses.
    #[error("{0} is not a loopback address")]
    NotLoopback(String),
    /// Name resolution failed.
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        /// The host.
        host: String,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// Connecting, writing or reading failed.
    #[error("cannot reach {addr}: {source}")]
    Io {
        /// The address.
        addr: SocketAddr,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// No answer within the time limit.
    #[error("no answer within {0} ms")]
    Timeout(u128),
    /// The answer is not an HTTP status line.
    #[error("bad answer: {0:?}")]
    BadResponse(String),
    /// The server answered with a status other than 2xx.
    #[error("status {0}")]
    Status(u16),
}

/// The parts of a probe URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `host:port`, as written (with brackets for IPv6).
    pub authority: String,
    /// Path and query, starting with `/`.
    pub path: String,
}

/// Parses `http://host[:port][/path]`. The port defaults to 80.
pub fn parse_url(url: &str) -> Result<Target, ProbeError> {
    let bad = |reason| ProbeError::BadUrl {
        url: url.to_owned(),
        reason,
    };
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| bad("only http:// is supported"))?;
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) if rest[i..].starts_with('/') => (&rest[..i], rest[i..].to_owned()),
        Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
        None => (rest, "/".to_owned()),
    };
    if authority.is_empty() {
        return Err(bad("no host"));
    }
    if authority.contains('@') {
        return Err(bad("credentials in the url are not supported"));
    }
    if path.chars().any(|c| c.is_control() || c == ' ') {
        return Err(bad("the path has spaces or control characters"));
    }
    let has_port = match authority.rfind(']') {
        Some(end) => authority[end..].contains(':'),
        None => authority.contains(':'),
    };
    let authority = if has_port {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    Ok(Target { authority, path })
}

/// Probes `url`; `Ok` carries the 2xx status.
pub async fn probe(url: &str, timeout: Duration) -> Result<u16, ProbeError> {
    let target = parse_url(url)?;
    match tokio::time::timeout(timeout, exchange(&target)).await {
        Ok(result) => result,
        Err(_) => Err(ProbeError::Timeout(timeout.as_millis())),
    }
}

async fn exchange(target: &Target) -> Result<u16, ProbeError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(&target.authority)
        .await
        .map_err(|source| ProbeError::Resolve {
            host: target.authority.clone(),
            source,
        })?
        .collect();
    let addr = match addrs.first() {
        Some(a) if addrs.iter().all(|a| a.ip().is_loopback()) => *a,
        _ => return Err(ProbeError::NotLoopback(target.authority.clone())),
    };
    let io = |source| ProbeError::Io { addr, source };
    let mut stream = TcpStream::connect(addr).await.map_err(io)?;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: agentvm-probe\r\nConnection: close\r\n\r\n",
        target.path, target.authority
    );
    stream.write_all(request.as_bytes()).await.map_err(io)?;
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 1024 {
        let n = stream.read(&mut buf).await.map_err(io)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let line = line.lines().next().unwrap_or_default();
    let status = parse_status_line(line).ok_or_else(|| ProbeError::BadResponse(line.into()))?;
    if (200..300).contains(&status) {
        Ok(status)
    } else {
        Err(ProbeError::Status(status))
    }
}

fn parse_status_line(line: &str) -> Option<u16> {
    let mut parts = line.split(' ');
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn parses_urls() {
        let t = parse_url("http://127.0.0.1:7411/healthz").unwrap();
        assert_eq!(t.authority, "127.0.0.1:7411");
        assert_eq!(t.path, "/healthz");
        assert_eq!(
            parse_url("http://localhost").unwrap().authority,
            "localhost:80"
        );
        assert_eq!(parse_url("http://[::1]/x").unwrap().authority, "[::1]:80");
        assert_eq!(parse_url("http://[::1]:9/").unwrap().authority, "[::1]:9");
        assert_eq!(parse_url("http://h:1?a=b").unwrap().path, "/?a=b");
        for bad in [
            "https://127.0.0.1/",
            "127.0.0.1:80",
            "http:///x",
            "http://u@h/",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    /// A one-shot server answering every connection with `answer`.
    async fn serve_once(answer: &'static str) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(answer.as_bytes()).await;
        });
        addr
    }

    #[tokio::test]
    async fn two_hundred_passes_and_others_fail() {
        let ok = serve_once("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await;
        assert_eq!(
            probe(&format!("http://{ok}/healthz"), DEFAULT_TIMEOUT)
                .await
                .unwrap(),
            200
        );
        let bad = serve_once("HTTP/1.1 503 Service Unavailable\r\n\r\n").await;
        let err = probe(&format!("http://{bad}/healthz"), DEFAULT_TIMEOUT).await;
        assert!(matches!(err, Err(ProbeError::Status(503))), "{err:?}");
        let junk = serve_once("SSH-2.0-nope\r\n").await;
        let err = probe(&format!("http://{junk}/"), DEFAULT_TIMEOUT).await;
        assert!(matches!(err, Err(ProbeError::BadResponse(_))), "{err:?}");
    }

    #[tokio::test]
    async fn silent_server_times_out_and_closed_port_fails() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let err = probe(&format!("http://{addr}/"), Duration::from_millis(200)).await;
        assert!(matches!(err, Err(ProbeError::Timeout(200))), "{err:?}");
        drop(listener);
        let err = probe(&format!("http://{addr}/"), DEFAULT_TIMEOUT).await;
        assert!(matches!(err, Err(ProbeError::Io { .. })), "{err:?}");
    }

    #[tokio::test]
    async fn refuses_non_loopback_addresses() {
        // Nothing is sent: the address is refused before connecting.
        let err = probe("http://192.0.2.1:80/", DEFAULT_TIMEOUT).await;
        assert!(matches!(err, Err(ProbeError::NotLoopback(_))), "{err:?}");
    }
}
