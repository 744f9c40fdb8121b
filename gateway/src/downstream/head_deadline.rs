//! The guard around every client stream: a deadline on each HTTP/1 request head (slowloris),
//! the idle wait between keep-alive requests, and the connection gauge it holds while open.

use async_trait::async_trait;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef, ALPN};
use pingora::protocols::{GetProxyDigest, GetSocketDigest, GetTimingDigest};
use pingora::protocols::{Peek, Shutdown, Ssl, Stream, UniqueID, UniqueIDType};
use pingora::protocols::{SocketDigest, TimingDigest};
use prometheus::{IntCounter, IntGauge};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

pub(super) const REQUEST_TIMEOUT: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// The task waker a future was last polled with. A pending future wakes the waker of its
/// last poll, so while polls come with the same one (a connection is one task) the future
/// need not be polled again only to register it: checking whether it has fired is enough.
/// The wait for a request goes pending twice a request under load (callgrind), and each
/// needless poll re-registered the keep-alive timer and locked the shutdown watch's list of
/// waiters.
#[derive(Default)]
pub(super) struct LastWaker(Option<Waker>);

impl LastWaker {
    /// Whether the future was last polled with `cx`'s waker.
    pub(super) fn is(&self, cx: &Context<'_>) -> bool {
        self.0.as_ref().is_some_and(|w| w.will_wake(cx.waker()))
    }

    /// Records `cx`'s waker after a poll with it.
    pub(super) fn set(&mut self, cx: &Context<'_>) {
        if !self.is(cx) {
            self.0 = Some(cx.waker().clone());
        }
    }
}
#[derive(Clone, Copy)]
pub(super) enum Protocol {
    Http1,
    H2,
    H2c,
}

/// Where the connection is in its current request.
#[derive(Debug)]
pub(super) enum Phase {
    /// Reading a request head that must be complete by the deadline.
    Head(HeadState),
    /// Between requests, waiting for the next one's first byte until the keep-alive deadline
    /// (set when the wait first has to block); the head's own deadline follows that byte.
    Idle(Option<Instant>),
    /// Head complete (body, response, upgraded or HTTP/2 traffic): bytes pass untouched.
    Passing,
}

/// The end-of-head search: a head ends at an empty line (`\n\n` or `\n\r\n`).
#[derive(Debug)]
pub(super) struct HeadState {
    /// For the first request of a connection, from the connection's start; for later ones,
    /// set when a read of the head first has to wait. A head that arrives whole (nearly
    /// every one) never reads the clock; one that stalls gets its deadline within
    /// microseconds of its first byte.
    deadline: Option<Instant>,
    /// The previous byte seen ended a line (`\n`, possibly followed by `\r`).
    after_newline: bool,
}

impl HeadState {
    pub(super) fn new(deadline: Option<Instant>) -> HeadState {
        HeadState {
            deadline,
            after_newline: false,
        }
    }

    /// Looks for the end of the head in `bytes`; true when found.
    pub(super) fn scan(&mut self, bytes: &[u8]) -> bool {
        // The common case: a whole head in one read, ending the read.
        if bytes.ends_with(b"\r\n\r\n") {
            return true;
        }
        let mut start = 0;
        if self.after_newline {
            match bytes.iter().position(|&b| b != b'\r') {
                Some(i) if bytes[i] == b'\n' => return true,
                Some(i) => start = i,
                None => return false,
            }
            self.after_newline = false;
        }
        for nl in memchr::memchr_iter(b'\n', &bytes[start..]) {
            let rest = &bytes[start + nl + 1..];
            match rest.iter().position(|&b| b != b'\r') {
                Some(i) if rest[i] == b'\n' => return true,
                Some(_) => {}
                None => {
                    self.after_newline = true;
                    return false;
                }
            }
        }
        false
    }
}

/// A client stream with a deadline on each HTTP/1 request head, and the connection gauge it
/// holds while open.
pub struct HeadGuard {
    pub(super) inner: Stream,
    pub(super) phase: Phase,
    pub(super) header_timeout: Duration,
    /// Longest wait for the next request on a keep-alive connection.
    pub(super) keepalive: Duration,
    /// The deadline's timer, made the first time a read has to wait, then reused.
    pub(super) sleep: Option<Pin<Box<Sleep>>>,
    /// The waker the timer was last polled with: a read that has to wait with the same one
    /// only checks whether the timer has fired.
    pub(super) sleep_polled_with: LastWaker,
    /// The first byte of the next request, read (and scanned) while waiting for it; the next
    /// read returns it first.
    pub(super) first: Option<u8>,
    /// A small write (a response's head) held until the next flush, or until a larger write
    /// takes it along in one vectored write: a response's head goes out with its body in one
    /// send (see [`HELD_WRITES_MAX`]).
    pub(super) held: Vec<u8>,
    pub(super) open: Option<IntGauge>,
    pub(super) timeouts: Option<IntCounter>,
}

impl Drop for HeadGuard {
    fn drop(&mut self) {
        if let Some(g) = &self.open {
            g.dec();
        }
    }
}

impl std::fmt::Debug for HeadGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeadGuard")
            .field("inner", &self.inner)
            .field("phase", &self.phase)
            .finish()
    }
}

impl HeadGuard {
    /// Reads the first byte of a request and keeps it for the next read: true when one came,
    /// false at end of stream. A head deadline in force applies (408 when it passes).
    pub(super) async fn first_byte(&mut self) -> io::Result<bool> {
        let mut byte = [0u8; 1];
        let read = std::future::poll_fn(|cx| {
            let mut buf = ReadBuf::new(&mut byte);
            Pin::new(&mut *self)
                .poll_read(cx, &mut buf)
                .map_ok(|()| buf.filled().len())
        })
        .await?;
        if read == 0 {
            return Ok(false);
        }
        self.first = Some(byte[0]);
        Ok(true)
    }

    /// Bookkeeping for bytes just read: a request's first byte starts its head (the deadline
    /// is set when a read of it first has to wait), and the end of the head ends it.
    pub(super) fn saw(&mut self, new: &[u8]) {
        if matches!(self.phase, Phase::Idle(_)) {
            self.phase = Phase::Head(HeadState::new(None));
        }
        if let Phase::Head(head) = &mut self.phase {
            if head.scan(new) {
                self.phase = Phase::Passing;
            }
        }
    }
}

impl AsyncRead for HeadGuard {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        // A byte read while waiting for the request comes first; it has been scanned already.
        let before = buf.filled().len();
        if let Some(byte) = this.first.take() {
            buf.put_slice(&[byte]);
        }
        let seen = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > seen {
            this.saw(&buf.filled()[seen..]);
        }
        if buf.filled().len() > before {
            // Bytes to hand over; an error or a wait after the kept byte comes with the next read.
            return Poll::Ready(Ok(()));
        }
        match polled {
            // End of stream, or an error.
            Poll::Ready(result) => Poll::Ready(result),
            Poll::Pending => {
                let (keepalive, header_timeout) = (this.keepalive, this.header_timeout);
                let deadline = match &mut this.phase {
                    Phase::Head(head) => *head
                        .deadline
                        .get_or_insert_with(|| Instant::now() + header_timeout),
                    Phase::Idle(until) => *until.get_or_insert_with(|| Instant::now() + keepalive),
                    Phase::Passing => return Poll::Pending,
                };
                // A deadline earlier than the armed one re-arms the timer at once; a later one
                // (every keep-alive wait starts later than the last) waits for the armed one to
                // fire and re-arms then, so the timer is not moved for every request.
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if sleep.deadline() > deadline {
                    // Re-armed: polled again below.
                    sleep.as_mut().reset(deadline);
                } else if this.sleep_polled_with.is(cx) && !sleep.is_elapsed() {
                    return Poll::Pending;
                }
                loop {
                    if sleep.as_mut().poll(cx).is_pending() {
                        this.sleep_polled_with.set(cx);
                        return Poll::Pending;
                    }
                    if sleep.deadline() >= deadline {
                        break;
                    }
                    sleep.as_mut().reset(deadline);
                }
                if matches!(this.phase, Phase::Idle(_)) {
                    // Idle past the keep-alive timeout: the end of the connection, quietly.
                    this.phase = Phase::Passing;
                    return Poll::Ready(Ok(()));
                }
                // Too slow: say so if the socket takes it at once, then fail the read.
                if let Some(t) = &this.timeouts {
                    t.inc();
                }
                this.phase = Phase::Passing;
                if let Poll::Ready(Ok(_)) =
                    Pin::new(&mut this.inner).poll_write(cx, REQUEST_TIMEOUT)
                {
                    let _ = Pin::new(&mut this.inner).poll_flush(cx);
                }
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "request head not received in time",
                )))
            }
        }
    }
}

#[async_trait]
impl Shutdown for HeadGuard {
    async fn shutdown(&mut self) {
        // Held bytes go out first.
        let _ = std::future::poll_fn(|cx| self.poll_write_held(cx)).await;
        self.inner.shutdown().await
    }
}

impl UniqueID for HeadGuard {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for HeadGuard {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }
    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for HeadGuard {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }
    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }
    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for HeadGuard {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for HeadGuard {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }
    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

/// Peeking is for protocol detection when a connection starts (Pingora's h2c check), before
/// any request byte has been read and kept in the guard.
#[async_trait]
impl Peek for HeadGuard {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::HeadState;

    fn ends(chunks: &[&[u8]]) -> bool {
        let mut h = HeadState::new(None);
        chunks.iter().any(|c| h.scan(c))
    }

    #[test]
    fn finds_the_end_of_a_head_across_reads() {
        assert!(ends(&[b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"]));
        assert!(ends(&[b"GET / HTTP/1.1\nHost: a\n\n"]));
        assert!(ends(&[b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nok"]));
        assert!(ends(&[b"GET / HTTP/1.1\r\nHost: a\r\n", b"\r\n"]));
        assert!(ends(&[b"GET / HTTP/1.1\r\nHost: a\r\n\r", b"\n"]));
        assert!(ends(&[b"GET / HTTP/1.1\r\nHost: a\r\n", b"\r", b"\r\n"]));
        assert!(!ends(&[b"GET / HTTP/1.1\r\nHost: a\r\n"]));
        assert!(!ends(&[b"GET / HTTP/1.1\r\nHost: a\r\n", b"X: b\r\n"]));
        assert!(!ends(&[b"GET / HTTP/1.1\r\n", b"Host: a\r\n", b"X"]));
    }
}
