//! The HTTP server loop. gavel runs its own rather than `axum::serve` for the
//! limits that one leaves open: a deadline for each request's head (which
//! also closes keep-alive connections left idle), and a shutdown that ends
//! within a bound whatever the clients do. (A request's body has its deadline
//! in the extractor that reads it: `http::extract::ApiJson`.)

use std::future::Future;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower::ServiceExt as _;
use tracing::{debug, info, warn};

use crate::listener::{LimitedListener, LimitedStream};

/// HTTP/2 pings an idle connection this often and drops it when the answer
/// takes longer than the head deadline.
const HTTP2_PING_INTERVAL: Duration = Duration::from_secs(20);

#[derive(Clone, Copy, Debug)]
pub struct HttpLimits {
    /// How long a connection may take to send a request's head, counted from
    /// when the server is ready for it: on a new connection, and on a
    /// keep-alive connection after the previous response (so it is also how
    /// long an idle keep-alive connection is kept). A client that trickles
    /// its head in, or says nothing, is disconnected then.
    pub head_timeout: Duration,
    /// After the shutdown signal: how long connections get to finish the
    /// requests they are in (idle ones close at once); then the rest are cut.
    pub shutdown_timeout: Duration,
}

/// HTTP/2 with prior knowledge opens with this.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Waits, within `deadline`, until the client has sent enough for hyper to
/// tell HTTP/1 from HTTP/2: until then hyper's own head deadline has not
/// started, and a client that says nothing would hold its connection forever.
/// False when the deadline passed or the client left.
async fn request_begun(stream: &LimitedStream, deadline: Duration) -> bool {
    let mut start = [0u8; H2_PREFACE.len()];
    let begun = tokio::time::timeout(deadline, async {
        loop {
            match stream.peek(&mut start).await {
                Ok(0) | Err(_) => return false,
                Ok(count) if count == start.len() || !H2_PREFACE.starts_with(&start[..count]) => return true,
                // Part of the HTTP/2 preface: the rest is on its way.
                Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    })
    .await;
    begun.unwrap_or(false)
}

/// Serves `router` on `listener` until `shutdown` completes; then stops
/// accepting, lets every connection finish its request in flight within
/// `limits.shutdown_timeout`, and cuts the ones still open after that.
/// Upgraded connections (WebSockets) have left hyper by then: the hub closes
/// them.
pub async fn serve(
    mut listener: LimitedListener,
    router: Router,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.head_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(HTTP2_PING_INTERVAL)
        .keep_alive_timeout(limits.head_timeout);
    let (stop, stopping) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let (builder, router, mut stopping) = (builder.clone(), router.clone(), stopping.clone());
        connections.spawn(async move {
            tokio::select! {
                begun = request_begun(&stream, limits.head_timeout) => if !begun { return },
                _ = stopping.wait_for(|stop| *stop) => return,
            }
            // Each request carries its peer's address, as axum's `ConnectInfo`.
            let service = hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(ConnectInfo(peer));
                router.clone().oneshot(request)
            });
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        debug!(%error, "connection ended with an error");
                    }
                    return;
                }
                _ = stopping.wait_for(|stop| *stop) => {}
            }
            connection.as_mut().graceful_shutdown();
            if let Err(error) = connection.await {
                debug!(%error, "connection ended with an error while shutting down");
            }
        });
        // Reap the connections that have ended, so that the set stays as large as the open ones.
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    let _ = stop.send(true);
    let open = connections.len();
    info!(open, "stopped accepting; finishing the requests in flight");
    let drained =
        tokio::time::timeout(limits.shutdown_timeout, async { while connections.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        warn!(
            still_open = connections.len(),
            after = ?limits.shutdown_timeout,
            "connections did not finish within the shutdown timeout; closing them"
        );
        connections.shutdown().await;
    }
}
