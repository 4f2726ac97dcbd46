//! Accepting connections so that slow, idle or too many clients cannot take the process down:
//! a cap on open connections per port (beyond it a new connection is closed at once, so the
//! descriptors left keep the other port, Redis and Feishu working), a deadline for a new
//! connection's first bytes, a pause after accept errors (EMFILE would otherwise spin), and
//! the metrics port's own HTTP/1 loop with a header read timeout and a lifetime per connection.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tonic::codegen::http;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::metrics::Metrics;

/// Bytes a new connection must send within the handshake timeout: an HTTP/2 client preface is
/// 24 bytes, a TLS ClientHello more, an HTTP/1 request line about as many.
const FIRST_BYTES: usize = 24;

/// How long to wait after a failed accept (EMFILE, ENFILE, …) before accepting again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Descriptors kept for everything that is not a client connection (Redis, Feishu, files,
/// the other port).
const FD_RESERVE: u64 = 128;

/// Limits of one listening port.
#[derive(Debug, Clone, Copy)]
pub struct PortLimits {
    /// `grpc` or `metrics` (the metric label).
    pub port: &'static str,
    pub max_connections: usize,
    /// A new connection that has not sent its first bytes by then is closed.
    pub handshake_timeout: Duration,
}

/// The process's soft limit on open files, if the platform says (Linux: /proc/self/limits).
pub fn open_files_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// `wanted` client connections, lowered so that the ports together leave `FD_RESERVE` (128)
/// descriptors free under `limit`.
pub fn fit_connections(wanted: usize, share_of_fds: f64, limit: Option<u64>) -> usize {
    match limit {
        Some(l) => {
            let usable = l.saturating_sub(FD_RESERVE) as f64 * share_of_fds;
            wanted.min(usable as usize).max(1)
        }
        None => wanted,
    }
}

/// A client connection that holds one of its port's connection slots until it is dropped,
/// and fails its reads if its first bytes are late.
pub struct Guarded<S> {
    inner: S,
    _slot: OwnedSemaphorePermit,
    /// Until the first bytes have arrived: the deadline and how many are still due.
    first: Option<(Pin<Box<Sleep>>, usize)>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let got = buf.filled().len() - before;
                if let Some((_, due)) = &mut self.first {
                    *due = due.saturating_sub(got);
                    if *due == 0 || got == 0 {
                        self.first = None;
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let late = match &mut self.first {
                    Some((deadline, _)) => deadline.as_mut().poll(cx).is_ready(),
                    None => false,
                };
                if late {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client sent too little before the handshake timeout",
                    )));
                }
                Poll::Pending
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl Connected for Guarded<TcpStream> {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// Accepts connections on `listener` within `limits`. Never yields an error (a failed
/// accept is logged and retried after a pause), so the server never stops accepting.
pub fn guarded(
    listener: TcpListener,
    limits: PortLimits,
    metrics: Arc<Metrics>,
) -> impl Stream<Item = io::Result<Guarded<TcpStream>>> + Send + 'static {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    futures_util::stream::unfold(
        (listener, slots, metrics),
        move |(listener, slots, metrics)| async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((s, _)) => s,
                    Err(e) => {
                        metrics.connection_refused(limits.port, "accept_error");
                        tracing::warn!(port = limits.port, error = %e, "accept failed; pausing");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    metrics.connection_refused(limits.port, "too_many");
                    continue; // dropped: closed at once
                };
                // Nagle off: small gRPC responses otherwise wait for the peer's delayed ACK.
                let _ = stream.set_nodelay(true);
                let conn = Guarded {
                    inner: stream,
                    _slot: slot,
                    first: Some((
                        Box::pin(tokio::time::sleep(limits.handshake_timeout)),
                        FIRST_BYTES,
                    )),
                };
                return Some((Ok(conn), (listener, slots, metrics)));
            }
        },
    )
}

/// Serves `router` (HTTP/1) on the metrics port: headers must arrive within the handshake
/// timeout and a connection lives at most `max_lifetime` (probes and scrapes are short).
pub async fn serve_http(
    listener: TcpListener,
    router: axum::Router,
    limits: PortLimits,
    max_lifetime: Duration,
    metrics: Arc<Metrics>,
) {
    use futures_util::StreamExt;
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;

    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.handshake_timeout);
    let builder = builder.http1_only();
    let mut incoming = std::pin::pin!(guarded(listener, limits, metrics));
    while let Some(Ok(conn)) = incoming.next().await {
        let service = TowerToHyperService::new(router.clone());
        let builder = builder.clone();
        tokio::spawn(async move {
            let serving = builder.serve_connection(TokioIo::new(conn), service);
            let _ = tokio::time::timeout(max_lifetime, serving).await;
        });
    }
}

/// Bytes of request bodies being read at once, over all connections and streams: a stream
/// holds what it has received until its request is decoded (or it fails).
pub struct BodyBudget {
    left: AtomicUsize,
    /// A request body must be complete this long after its headers.
    timeout: Duration,
    metrics: Arc<Metrics>,
}

impl BodyBudget {
    pub fn new(bytes: usize, timeout: Duration, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            left: AtomicUsize::new(bytes),
            timeout,
            metrics,
        })
    }

    fn take(&self, n: usize) -> bool {
        let ok = self
            .left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                left.checked_sub(n)
            })
            .is_ok();
        if ok {
            self.metrics.request_bytes_reading(n as i64);
        }
        ok
    }

    fn give(&self, n: usize) {
        if n > 0 {
            self.left.fetch_add(n, Ordering::AcqRel);
            self.metrics.request_bytes_reading(-(n as i64));
        }
    }
}

/// The bytes one request took from a [`BodyBudget`], given back when the last holder drops
/// it: the body while it is read, then the request (its extensions), then the job until the
/// scheduler has queued it (where the queue's byte bound takes over) or refused it. So the
/// bytes of requests between the socket and the queue are bounded too, not just of reading.
#[derive(Debug)]
pub struct Intake {
    budget: Arc<BodyBudget>,
    bytes: AtomicUsize,
}

impl Drop for Intake {
    fn drop(&mut self) {
        self.budget.give(*self.bytes.get_mut());
    }
}

impl std::fmt::Debug for BodyBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyBudget")
            .field("left", &self.left.load(Ordering::Relaxed))
            .finish()
    }
}

/// A gRPC service whose requests draw on a [`BodyBudget`] from their first byte until they
/// are queued or refused ([`Intake`], in the request's extensions), and whose bodies must
/// arrive in time: half-sent or piled-up requests cannot hold memory without bound, nor a
/// handler for long.
#[derive(Clone)]
pub struct Budgeted<S> {
    inner: S,
    budget: Arc<BodyBudget>,
}

impl<S> Budgeted<S> {
    pub fn new(inner: S, budget: Arc<BodyBudget>) -> Self {
        Self { inner, budget }
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for Budgeted<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tonic::codegen::Service<http::Request<tonic::body::Body>> for Budgeted<S>
where
    S: tonic::codegen::Service<http::Request<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<tonic::body::Body>) -> Self::Future {
        let intake = Arc::new(Intake {
            budget: self.budget.clone(),
            bytes: AtomicUsize::new(0),
        });
        req.extensions_mut().insert(intake.clone());
        let deadline = Box::pin(tokio::time::sleep(self.budget.timeout));
        self.inner.call(req.map(|inner| {
            tonic::body::Body::new(BudgetedBody {
                inner,
                intake,
                deadline: Some(deadline),
            })
        }))
    }
}

struct BudgetedBody {
    inner: tonic::body::Body,
    intake: Arc<Intake>,
    /// None once the body ended.
    deadline: Option<Pin<Box<Sleep>>>,
}

impl BudgetedBody {
    fn fail(&mut self, why: &'static str, status: tonic::Status) -> tonic::Status {
        self.deadline = None;
        self.intake.budget.metrics.request_body_refused(why);
        status
    }
}

impl http_body::Body for BudgetedBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if !this.intake.budget.take(data.len()) {
                        return Poll::Ready(Some(Err(this.fail(
                            "budget",
                            tonic::Status::resource_exhausted(
                                "the gateway is reading too many requests at once; retry shortly",
                            ),
                        ))));
                    }
                    this.intake.bytes.fetch_add(data.len(), Ordering::AcqRel);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.deadline = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.deadline = None;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Pending => {
                let late = this
                    .deadline
                    .as_mut()
                    .is_some_and(|d| d.as_mut().poll(cx).is_ready());
                if late {
                    return Poll::Ready(Some(Err(this.fail(
                        "timeout",
                        tonic::Status::deadline_exceeded(
                            "the request was not received in time (handshake_timeout_ms)",
                        ),
                    ))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_fit_the_descriptor_limit() {
        assert_eq!(fit_connections(1024, 0.9, None), 1024);
        assert_eq!(fit_connections(1024, 0.9, Some(1_048_576)), 1024);
        // ulimit -n 1024: 896 usable, 90 % of them for gRPC clients.
        assert_eq!(fit_connections(1024, 0.9, Some(1024)), 806);
        assert_eq!(fit_connections(64, 0.05, Some(1024)), 44);
        assert_eq!(fit_connections(10, 0.5, Some(16)), 1);
    }
}
