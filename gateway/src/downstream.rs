//! Client connections, between the listener and Pingora's HTTP layer: the TLS handshake
//! (bounded by `limits.header_timeout`, counted by version and by reason of failure), a deadline
//! for every HTTP/1 request head (slowloris), the idle wait between keep-alive requests
//! (`limits.keepalive_timeout`), the open-connection gauges by listener and protocol, and
//! small writes held so that a response's head goes out with its body in one send.
//!
//! [`Downstream`] is the listening service's application. It wraps each accepted stream in a
//! [`HeadGuard`] and runs Pingora's HTTP/1 keep-alive loop itself, so that the guard is re-armed
//! before every request, and so that Pingora's per-request state is made only when a request's
//! first byte has arrived; HTTP/2 connections go to Pingora's own loop (their heads are frames,
//! bounded by the h2 settings).

use crate::metrics::METRICS;
use crate::proxy::Gateway;
use crate::runtime::Runtime;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora::listeners::tls::{Acceptor, TlsSettings};
use pingora::protocols::http::ServerSession;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef, ALPN};
use pingora::protocols::{GetProxyDigest, GetSocketDigest, GetTimingDigest};
use pingora::protocols::{Peek, Shutdown, Ssl, Stream, UniqueID, UniqueIDType};
use pingora::protocols::{SocketDigest, TimingDigest};
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use prometheus::{IntCounter, IntGauge};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const REQUEST_TIMEOUT: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// What the service needs to know of one listener: its TLS acceptor, and its metric handles,
/// resolved once at start.
struct ListenerHandles {
    address: SocketAddr,
    tls: Option<TlsListener>,
    accepted: IntCounter,
    header_timeouts: IntCounter,
    http1: IntGauge,
    h2: IntGauge,
    h2c: IntGauge,
}

/// A TLS listener's acceptor and handshake counters.
struct TlsListener {
    acceptor: Acceptor,
    /// Handshakes completed with TLS 1.2 and 1.3.
    tls12: IntCounter,
    tls13: IntCounter,
    /// Handshakes failed, by [`HANDSHAKE_FAILURES`] reason.
    failures: [IntCounter; HANDSHAKE_FAILURES.len()],
}

/// The application of the client listeners: the guard around Pingora's HTTP proxy.
pub struct Downstream {
    proxy: Arc<HttpProxy<Gateway>>,
    runtime: Arc<ArcSwap<Runtime>>,
    listeners: Vec<ListenerHandles>,
    h2c: bool,
}

impl Downstream {
    /// Guards `proxy` on `listeners`: name, address, and for TLS listeners the settings the
    /// handshake is made with (the listener itself is bound as plain TCP).
    pub fn new(
        proxy: HttpProxy<Gateway>,
        runtime: Arc<ArcSwap<Runtime>>,
        listeners: impl IntoIterator<Item = (String, SocketAddr, Option<TlsSettings>)>,
        h2c: bool,
    ) -> Downstream {
        let listeners = listeners
            .into_iter()
            .map(|(name, address, tls)| ListenerHandles {
                // Counters made from the start, so that dashboards and alerts see zeros rather
                // than nothing, and no handshake looks a label up.
                tls: tls.map(|settings| TlsListener {
                    acceptor: settings.build(),
                    tls12: METRICS
                        .tls_handshakes
                        .with_label_values(&[&name, "TLSv1.2"]),
                    tls13: METRICS
                        .tls_handshakes
                        .with_label_values(&[&name, "TLSv1.3"]),
                    failures: HANDSHAKE_FAILURES.map(|reason| {
                        METRICS
                            .tls_handshake_errors
                            .with_label_values(&[&name, reason])
                    }),
                }),
                accepted: METRICS.connections_accepted.with_label_values(&[&name]),
                header_timeouts: METRICS.header_timeouts.with_label_values(&[&name]),
                http1: METRICS.connections.with_label_values(&[&name, "http/1.1"]),
                h2: METRICS.connections.with_label_values(&[&name, "h2"]),
                h2c: METRICS.connections.with_label_values(&[&name, "h2c"]),
                address,
            })
            .collect();
        Downstream {
            proxy: Arc::new(proxy),
            runtime,
            listeners,
            h2c,
        }
    }

    fn listener(&self, stream: &Stream) -> Option<&ListenerHandles> {
        let digest = stream.get_socket_digest()?;
        let local = *digest.local_addr()?.as_inet()?;
        self.listeners.iter().find(|l| {
            l.address == local
                || (l.address.ip().is_unspecified() && l.address.port() == local.port())
        })
    }

    /// Pingora's HTTP/1 keep-alive loop (as in its `ServerApp` for HTTP apps), with the guard
    /// re-armed before every request. Each request's session and Pingora's request future
    /// (together ~19 KB) are made only once its first byte has arrived, so an idle keep-alive
    /// connection holds neither.
    async fn serve_http1(self: &Arc<Self>, guard: Box<HeadGuard>, shutdown: &ShutdownWatch) {
        let keepalive = guard.keepalive.as_secs().max(1);
        // One shutdown waiter for the connection's life, rather than one per request.
        let mut watch = shutdown.clone();
        let mut shutting_down = ShutdownWaiter {
            changed: std::pin::pin!(watch.changed()),
            polled_with: LastWaker::default(),
        };
        let mut next = next_request(guard, false, shutdown, &mut shutting_down).await;
        let mut settings = None;
        while let Some(stream) = next {
            let mut session = ServerSession::new_http1(stream);
            match settings {
                Some(settings) => HttpPersistentSettings::apply_to_session(settings, &mut session),
                None => session.set_keepalive(Some(keepalive)),
            }
            if *shutdown.borrow() {
                // Stop clients from reusing the connection once shutdown has begun.
                session.set_keepalive(None);
            }
            let Some(reused) = self.proxy.process_new_http(session, shutdown).await else {
                return;
            };
            let stream;
            (stream, settings) = reused.consume();
            // Every client stream is wrapped in a guard (`process_new`); anything else is
            // closed rather than served unguarded.
            let Ok(guard) = stream.into_any().downcast::<HeadGuard>() else {
                return;
            };
            next = next_request(guard, true, shutdown, &mut shutting_down).await;
        }
    }
}

/// The task waker a future was last polled with. A pending future wakes the waker of its
/// last poll, so while polls come with the same one (a connection is one task) the future
/// need not be polled again only to register it: checking whether it has fired is enough.
/// The wait for a request goes pending twice a request under load (callgrind), and each
/// needless poll re-registered the keep-alive timer and locked the shutdown watch's list of
/// waiters.
#[derive(Default)]
struct LastWaker(Option<Waker>);

impl LastWaker {
    /// Whether the future was last polled with `cx`'s waker.
    fn is(&self, cx: &Context<'_>) -> bool {
        self.0.as_ref().is_some_and(|w| w.will_wake(cx.waker()))
    }

    /// Records `cx`'s waker after a poll with it.
    fn set(&mut self, cx: &Context<'_>) {
        if !self.is(cx) {
            self.0 = Some(cx.waker().clone());
        }
    }
}

/// The connection's one wait for shutdown, and the waker it was last polled with.
struct ShutdownWaiter<'a, F> {
    changed: Pin<&'a mut F>,
    polled_with: LastWaker,
}

/// Waits for the first byte of the connection's next request (kept in the guard for Pingora to
/// read) and gives the stream back; `None` when the client closed or went quiet, or shutdown
/// began. Between requests (`between`) the wait is bounded by the keep-alive timeout; the first
/// request's by the head deadline.
async fn next_request<F: Future>(
    mut guard: Box<HeadGuard>,
    between: bool,
    shutdown: &ShutdownWatch,
    shutting_down: &mut ShutdownWaiter<'_, F>,
) -> Option<Stream> {
    if *shutdown.borrow() {
        return None;
    }
    if between {
        guard.phase = Phase::Idle(None);
    }
    let arrived = {
        let mut first_byte = std::pin::pin!(guard.first_byte());
        std::future::poll_fn(|cx| {
            // The next request is usually there already: then the shutdown wait is not polled.
            if let Poll::Ready(read) = first_byte.as_mut().poll(cx) {
                return Poll::Ready(matches!(read, Ok(true)));
            }
            // A closed watch (`Err`) ends the wait as a shutdown does.
            if shutting_down.polled_with.is(cx) && matches!(shutdown.has_changed(), Ok(false)) {
                return Poll::Pending;
            }
            if shutting_down.changed.as_mut().poll(cx).is_ready() {
                return Poll::Ready(false);
            }
            shutting_down.polled_with.set(cx);
            Poll::Pending
        })
        .await
    };
    arrived.then_some(guard as Stream)
}

/// Reads as much of a cleartext connection's start as it takes to tell HTTP/2 with prior
/// knowledge (h2c) from HTTP/1, puts it back for the protocol to read, and says which it is
/// (true for HTTP/2). An HTTP/1 request differs from the 24-byte preface within its first
/// bytes (no method is `PRI`), so a short one, `GET / HTTP/1.0` and an empty line (18 bytes),
/// is told at once; Pingora's own check waits for 24 bytes, and such a request would wait
/// for the head deadline. The caller has checked that the stream is Pingora's TCP stream;
/// `None` when the connection fails.
async fn read_h2c_preface(stream: Stream) -> Option<(Stream, bool)> {
    use tokio::io::AsyncReadExt;
    let mut tcp = stream.into_any().downcast::<L4Stream>().ok()?;
    let mut start = [0u8; H2_PREFACE.len()];
    let mut len = 0;
    let is_h2 = loop {
        let read = tcp.read(&mut start[len..]).await.ok()?;
        len += read;
        if read == 0 || start[..len] != H2_PREFACE[..len] {
            break false;
        }
        if len == start.len() {
            break true;
        }
    };
    tcp.rewind(&start[..len]);
    Some((tcp, is_h2))
}

/// The TLS handshake of a connection on a TLS listener, within `limit` (a client that opens a
/// connection and sends nothing holds it no longer than a slow request head). The error is
/// the index of the reason in [`HANDSHAKE_FAILURES`].
async fn tls_handshake(
    acceptor: &Acceptor,
    stream: Stream,
    limit: Duration,
) -> Result<Stream, usize> {
    // Pingora hands a plain listener's connections over as its own TCP stream type.
    if !stream.as_any().is::<L4Stream>() {
        return Err(OTHER);
    }
    let Ok(tcp) = stream.into_any().downcast::<L4Stream>() else {
        return Err(OTHER);
    };
    match tokio::time::timeout(limit, acceptor.tls_handshake(*tcp)).await {
        Ok(Ok(tls)) => Ok(Box::new(tls)),
        Ok(Err(e)) => {
            let reason = handshake_failure(&e);
            tracing::debug!(reason = HANDSHAKE_FAILURES[reason], error = %e, "TLS handshake failed");
            Err(reason)
        }
        Err(_) => Err(TIMEOUT),
    }
}

/// Every reason [`handshake_failure`] and the handshake deadline give.
const HANDSHAKE_FAILURES: [&str; 7] = [
    "timeout",
    "malformed",
    "incompatible",
    "alert",
    "client_certificate",
    "closed",
    "other",
];

const TIMEOUT: usize = 0;
const OTHER: usize = 6;

/// Why a handshake failed, as an index into [`HANDSHAKE_FAILURES`]. Pingora keeps only the
/// text of the TLS error (rustls' messages), so that is what is read.
fn handshake_failure(e: &pingora::Error) -> usize {
    let text = e.to_string();
    let has = |needle: &str| text.contains(needle);
    if has("peer is incompatible") || has("no protocols in common") {
        2
    } else if has("received corrupt message") || has("received unexpected message") {
        1
    } else if has("received fatal alert") {
        3
    } else if has("peer sent no certificates") || has("invalid peer certificate") {
        4
    } else if has("eof") || has("reset") || has("broken pipe") || has("closed") {
        5
    } else {
        OTHER
    }
}

/// The protocol version as people write it (rustls names them `TLSv1_3`); rustls negotiates
/// no other.
pub(crate) fn tls_version(rustls_name: &str) -> Option<&'static str> {
    match rustls_name {
        "TLSv1_3" => Some("TLSv1.3"),
        "TLSv1_2" => Some("TLSv1.2"),
        _ => None,
    }
}

#[async_trait]
impl ServerApp for Downstream {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let listener = self.listener(&stream);
        let limits = self.runtime.load().limits;
        let (header_timeout, keepalive) = (limits.header_timeout.0, limits.keepalive_timeout.0);
        let tls_listener = listener.and_then(|l| l.tls.as_ref());
        if let Some(tls) = tls_listener {
            // Boxed: the handshake's state is several KB, and inline it would size this
            // connection's future (held while the connection lives) to fit it.
            stream = match Box::pin(tls_handshake(&tls.acceptor, stream, header_timeout)).await {
                Ok(stream) => stream,
                Err(reason) => {
                    tls.failures[reason].inc();
                    return None;
                }
            };
        }
        let tls = stream.get_ssl_digest();
        let mut protocol = Protocol::Http1;
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            protocol = Protocol::H2;
        } else if self.h2c && tls.is_none() && stream.as_any().is::<L4Stream>() {
            // Bounded: a client that sends nothing is cut off at the head deadline.
            match tokio::time::timeout(header_timeout, read_h2c_preface(stream)).await {
                Ok(Some((read, is_h2))) => {
                    stream = read;
                    if is_h2 {
                        protocol = Protocol::H2c;
                    }
                }
                // A read error: the connection is gone.
                Ok(None) => return None,
                Err(_) => {
                    if let Some(l) = listener {
                        l.header_timeouts.inc();
                    }
                    return None;
                }
            }
        }
        let mut open = None;
        let mut timeouts = None;
        if let Some(l) = listener {
            l.accepted.inc();
            if let (Some(counters), Some(digest)) = (tls_listener, &tls) {
                match tls_version(&digest.version) {
                    Some("TLSv1.3") => counters.tls13.inc(),
                    Some("TLSv1.2") => counters.tls12.inc(),
                    _ => {}
                }
            }
            let gauge = match protocol {
                Protocol::Http1 => &l.http1,
                Protocol::H2 => &l.h2,
                Protocol::H2c => &l.h2c,
            };
            gauge.inc();
            open = Some(gauge.clone());
            timeouts = Some(l.header_timeouts.clone());
        }
        let phase = match protocol {
            Protocol::Http1 => Phase::Head(HeadState::new(Some(Instant::now() + header_timeout))),
            Protocol::H2 | Protocol::H2c => Phase::Passing,
        };
        let guarded = Box::new(HeadGuard {
            inner: stream,
            phase,
            header_timeout,
            keepalive,
            sleep: None,
            sleep_polled_with: LastWaker::default(),
            held: Vec::new(),
            first: None,
            open,
            timeouts,
        });
        match protocol {
            Protocol::Http1 => self.serve_http1(guarded, shutdown).await,
            // Pingora's own loop: the h2 handshake and one task per stream.
            Protocol::H2 | Protocol::H2c => {
                self.proxy.process_new(guarded, shutdown).await;
            }
        }
        None
    }

    async fn cleanup(&self) {
        self.proxy.http_cleanup().await;
    }
}

#[derive(Clone, Copy)]
enum Protocol {
    Http1,
    H2,
    H2c,
}

/// Where the connection is in its current request.
#[derive(Debug)]
enum Phase {
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
struct HeadState {
    /// For the first request of a connection, from the connection's start; for later ones,
    /// set when a read of the head first has to wait. A head that arrives whole (nearly
    /// every one) never reads the clock; one that stalls gets its deadline within
    /// microseconds of its first byte.
    deadline: Option<Instant>,
    /// The previous byte seen ended a line (`\n`, possibly followed by `\r`).
    after_newline: bool,
}

impl HeadState {
    fn new(deadline: Option<Instant>) -> HeadState {
        HeadState {
            deadline,
            after_newline: false,
        }
    }

    /// Looks for the end of the head in `bytes`; true when found.
    fn scan(&mut self, bytes: &[u8]) -> bool {
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
    inner: Stream,
    phase: Phase,
    header_timeout: Duration,
    /// Longest wait for the next request on a keep-alive connection.
    keepalive: Duration,
    /// The deadline's timer, made the first time a read has to wait, then reused.
    sleep: Option<Pin<Box<Sleep>>>,
    /// The waker the timer was last polled with: a read that has to wait with the same one
    /// only checks whether the timer has fired.
    sleep_polled_with: LastWaker,
    /// The first byte of the next request, read (and scanned) while waiting for it; the next
    /// read returns it first.
    first: Option<u8>,
    /// A small write (a response's head) held until the next flush, or until a larger write
    /// takes it along in one vectored write: a response's head goes out with its body in one
    /// send (see [`HELD_WRITES_MAX`]).
    held: Vec<u8>,
    open: Option<IntGauge>,
    timeouts: Option<IntCounter>,
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
    async fn first_byte(&mut self) -> io::Result<bool> {
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
    fn saw(&mut self, new: &[u8]) {
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

impl HeadGuard {
    /// Writes out the held bytes.
    fn poll_write_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.held.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.held))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.held.drain(..n);
        }
        Poll::Ready(Ok(()))
    }
}

/// A write of up to this size, with nothing held, is held for the next flush or the next
/// write. Pingora writes a response's head, then its body, and flushes at the end (at once
/// after the head when the body is streamed); the stream under the guard buffers 1460 bytes,
/// so a head and a larger body went out in two sends (over TLS, two records as well), each
/// waking the client. Held, the head goes out with the body in one vectored write.
const HELD_WRITES_MAX: usize = 4096;

/// A held write and the next that together fit this are passed on one after the other, as
/// they were written: the stream under the guard buffers them and sends them at the flush.
const SMALL_RESPONSE_MAX: usize = 1460;

impl AsyncWrite for HeadGuard {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.held.is_empty() {
            if buf.len() > HELD_WRITES_MAX {
                return Pin::new(&mut this.inner).poll_write(cx, buf);
            }
            this.held.extend_from_slice(buf);
            return Poll::Ready(Ok(buf.len()));
        }
        if this.held.len() + buf.len() <= SMALL_RESPONSE_MAX {
            // A small response: its pieces go on as they were written, to be sent together
            // at the flush by the stream under the guard. (Sent as one piece, over TLS as one
            // record, a 13-byte response cost 0.5 µs more CPU time, all of it in the kernel.)
            ready!(this.poll_write_held(cx))?;
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        // The held bytes and this write together, in one vectored write when the stream
        // takes them so.
        while !this.held.is_empty() {
            let both = [io::IoSlice::new(&this.held), io::IoSlice::new(buf)];
            let n = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, &both))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            if n > this.held.len() {
                let of_buf = n - this.held.len();
                this.held.clear();
                return Poll::Ready(Ok(of_buf));
            }
            this.held.drain(..n);
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_write_held(cx))?;
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_write_held(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_write_held(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
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
    use super::{handshake_failure, HeadState, HANDSHAKE_FAILURES};
    use pingora::{Error, ErrorType};

    #[test]
    fn handshake_failures_get_bounded_reasons() {
        let reason = |text: &'static str| {
            HANDSHAKE_FAILURES
                [handshake_failure(&Error::explain(ErrorType::TLSHandshakeFailure, text))]
        };
        assert_eq!(
            reason("tls connect error: received corrupt message of type InvalidContentType"),
            "malformed"
        );
        assert_eq!(
            reason("tls connect error: peer is incompatible: ServerDoesNotSupportTls12Or13"),
            "incompatible"
        );
        assert_eq!(
            reason("tls connect error: received fatal alert: UnknownCA"),
            "alert"
        );
        assert_eq!(
            reason("tls connect error: peer sent no certificates"),
            "client_certificate"
        );
        assert_eq!(reason("tls connect error: tls handshake eof"), "closed");
        assert_eq!(reason("something new"), "other");
    }

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
