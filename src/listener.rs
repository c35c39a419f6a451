//! The listening socket with a cap on open connections. Each accepted
//! connection holds a permit until it closes; at the cap, accepting waits (new
//! connections queue in the kernel's backlog) instead of the process running
//! out of file descriptors or memory.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Descriptors kept back from the connection cap: the store's and Redis's
/// connections, peers, log and database files, and headroom.
const RESERVED_DESCRIPTORS: u64 = 512;

/// The connection cap: `configured`, or else what the open-file limit allows
/// less a reserve. The soft limit is raised to the hard one first (most
/// systems start processes at 1,024 soft with far more allowed). Returns the
/// cap and the open-file limit now in force (`None` where it cannot be read).
pub fn connection_cap(configured: Option<u64>) -> (usize, Option<u64>) {
    let limit = raise_open_file_limit();
    let cap = match (configured, limit) {
        (Some(cap), _) => cap,
        (None, Some(limit)) => limit.saturating_sub(RESERVED_DESCRIPTORS).max(limit / 2).max(1),
        (None, None) => 1_024,
    };
    (usize::try_from(cap).unwrap_or(usize::MAX), limit)
}

#[cfg(unix)]
fn raise_open_file_limit() -> Option<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return None;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    (limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}

#[cfg(not(unix))]
fn raise_open_file_limit() -> Option<u64> {
    None
}

pub struct LimitedListener {
    listener: TcpListener,
    permits: Arc<Semaphore>,
    send_buffer_bytes: Option<usize>,
}

impl LimitedListener {
    pub fn new(listener: TcpListener, max_connections: usize) -> LimitedListener {
        LimitedListener { listener, permits: Arc::new(Semaphore::new(max_connections)), send_buffer_bytes: None }
    }

    /// Fixes each connection's kernel send buffer (otherwise the kernel sizes
    /// it, up to megabytes): bounds what a slow WebSocket reader holds in the
    /// kernel, so it is found slow sooner and costs less memory.
    pub fn with_send_buffer(mut self, bytes: Option<usize>) -> LimitedListener {
        self.send_buffer_bytes = bytes;
        self
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The next connection, once the cap leaves room for it.
    pub async fn accept(&mut self) -> (LimitedStream, SocketAddr) {
        let permit = self.permits.clone().acquire_owned().await.expect("the semaphore is never closed");
        loop {
            match self.listener.accept().await {
                Ok((stream, address)) => {
                    // Bids are small request/response exchanges: send them at once.
                    let _ = stream.set_nodelay(true);
                    if let Some(bytes) = self.send_buffer_bytes {
                        let _ = socket2::SockRef::from(&stream).set_send_buffer_size(bytes);
                    }
                    metrics::gauge!(crate::telemetry::HTTP_CONNECTIONS).increment(1.0);
                    return (LimitedStream { stream, _permit: permit }, address);
                }
                Err(error) => {
                    // Out of descriptors and the like: back off briefly, as axum's own listener does.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// A connection and its permit: the permit returns when the connection drops.
pub struct LimitedStream {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl LimitedStream {
    /// Waits until the client has sent something, and copies what it has
    /// without consuming it.
    pub async fn peek(&self, buffer: &mut [u8]) -> io::Result<usize> {
        self.stream.peek(buffer).await
    }
}

impl Drop for LimitedStream {
    fn drop(&mut self) {
        metrics::gauge!(crate::telemetry::HTTP_CONNECTIONS).decrement(1.0);
    }
}

impl AsyncRead for LimitedStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
