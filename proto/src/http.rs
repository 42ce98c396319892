//! The plain-HTTP listener both binaries serve on `FERRY_HTTP_LISTEN`, next
//! to (never instead of) the mTLS gRPC port: `/healthz` (the process is
//! alive), `/readyz` (ready to take work) and `/metrics` (Prometheus text,
//! see [`crate::metrics`]), for load balancers, orchestrators and Prometheus,
//! which cannot speak mTLS gRPC.
//!
//! Deliberately tiny: `GET` requests with a path, one response per
//! connection, bounded request size and time. Each binary supplies its own
//! [`Probes`].

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// An HTTP answer: status code, content type and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    pub fn text(status: u16, body: impl Into<String>) -> Reply {
        Reply {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }
}

/// A boxed future of a probe answer.
pub type ProbeFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a binary answers on its HTTP port.
pub trait Probes: Send + Sync + 'static {
    /// Whether the process may serve at all (it is always alive if it answers).
    fn ready(&self) -> ProbeFuture<'_, Result<(), String>>;

    /// The Prometheus text exposition for `/metrics`; `None`: not served
    /// (404), `Some(Err)`: cannot be computed now (503).
    fn metrics(&self) -> ProbeFuture<'_, Option<Result<String, String>>> {
        Box::pin(async { None })
    }
}

/// Largest request head read; probes send a few hundred bytes.
const MAX_REQUEST: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Why `/readyz` fails once the binary drains (see [`serve`]).
pub const DRAINING: &str = "draining";

/// Binds `addr` (port 0 picks one) and serves until the process exits;
/// returns the bound address once listening.
///
/// `drain` marks the graceful shutdown: from the moment it fires `/readyz`
/// answers 503 `not ready: draining` whatever the probes say, while
/// `/healthz` and `/metrics` answer as before. The listener deliberately
/// outlives the drain (it goes away with the process, i.e. the runtime), so
/// a balancer checking `/readyz` sees "not ready" for the whole drain rather
/// than a refused connection it could take for a crash.
pub async fn serve(
    addr: SocketAddr,
    probes: Arc<dyn Probes>,
    drain: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("listen for HTTP (FERRY_HTTP_LISTEN) on {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let probes = probes.clone();
            let draining = drain.is_cancelled();
            tokio::spawn(async move {
                let _ =
                    tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, probes, draining)).await;
            });
        }
    });
    Ok(bound)
}

async fn answer(
    mut stream: TcpStream,
    probes: Arc<dyn Probes>,
    draining: bool,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let reply = route(&String::from_utf8_lossy(&head), probes.as_ref(), draining).await;
    let response = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        reply.status,
        reason(reply.status),
        reply.content_type,
        reply.body.len(),
        reply.body
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// The reply to a request head (pure apart from the readiness check);
/// `draining`: the binary is shutting down gracefully.
async fn route(head: &str, probes: &dyn Probes, draining: bool) -> Reply {
    let mut words = head.lines().next().unwrap_or_default().split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    if method != "GET" && method != "HEAD" {
        return Reply::text(405, "only GET\n");
    }
    let path = target.split('?').next().unwrap_or("");
    match path {
        "/healthz" => Reply::text(200, "ok\n"),
        "/readyz" if draining => Reply::text(503, format!("not ready: {DRAINING}\n")),
        "/readyz" => match probes.ready().await {
            Ok(()) => Reply::text(200, "ready\n"),
            Err(why) => Reply::text(503, format!("not ready: {why}\n")),
        },
        "/metrics" => match probes.metrics().await {
            Some(Ok(text)) => Reply {
                status: 200,
                content_type: "text/plain; version=0.0.4; charset=utf-8",
                body: text,
            },
            Some(Err(why)) => Reply::text(503, format!("metrics unavailable: {why}\n")),
            None => Reply::text(404, "no metrics here\n"),
        },
        _ => Reply::text(404, "not found (try /healthz, /readyz or /metrics)\n"),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(Result<(), String>);

    impl Probes for Fixed {
        fn ready(&self) -> ProbeFuture<'_, Result<(), String>> {
            Box::pin(async move { self.0.clone() })
        }
    }

    #[tokio::test]
    async fn routes_health_and_readiness() {
        let ready = Fixed(Ok(()));
        let down = Fixed(Err("database unreachable".into()));
        assert_eq!(
            route("GET /healthz HTTP/1.1\r\n\r\n", &down, false)
                .await
                .status,
            200
        );
        assert_eq!(
            route("GET /readyz HTTP/1.1\r\n\r\n", &ready, false)
                .await
                .status,
            200
        );
        let r = route("GET /readyz?verbose HTTP/1.1\r\n\r\n", &down, false).await;
        assert_eq!(r.status, 503);
        assert!(r.body.contains("database unreachable"));
        assert_eq!(
            route("GET /nope HTTP/1.1\r\n\r\n", &ready, false)
                .await
                .status,
            404
        );
        assert_eq!(
            route("POST /readyz HTTP/1.1\r\n\r\n", &ready, false)
                .await
                .status,
            405
        );
        assert_eq!(route("", &ready, false).await.status, 405);
    }

    #[tokio::test]
    async fn a_draining_binary_is_not_ready_but_alive() {
        let ready = Fixed(Ok(()));
        let r = route("GET /readyz HTTP/1.1\r\n\r\n", &ready, true).await;
        assert_eq!(r.status, 503);
        assert_eq!(r.body, "not ready: draining\n");
        assert_eq!(
            route("GET /healthz HTTP/1.1\r\n\r\n", &ready, true)
                .await
                .status,
            200
        );
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn keeps_listening_through_the_drain() {
        let drain = CancellationToken::new();
        let addr = serve(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(Fixed(Ok(()))),
            drain.clone(),
        )
        .await
        .unwrap();
        assert!(
            get(addr, "/readyz")
                .await
                .starts_with("HTTP/1.1 200 OK\r\n")
        );
        drain.cancel();
        let out = get(addr, "/readyz").await;
        assert!(
            out.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{out}"
        );
        assert!(out.ends_with("not ready: draining\n"), "{out}");
        assert!(
            get(addr, "/healthz")
                .await
                .starts_with("HTTP/1.1 200 OK\r\n")
        );
    }

    #[tokio::test]
    async fn serves_over_tcp() {
        let cancel = CancellationToken::new();
        let addr = serve(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(Fixed(Err("draining".into()))),
            cancel.clone(),
        )
        .await
        .unwrap();
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(
            out.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{out}"
        );
        assert!(out.ends_with("not ready: draining\n"), "{out}");
        cancel.cancel();
    }
}
