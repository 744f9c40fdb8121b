//! Client connections, between the listener and Pingora's HTTP layer: the TLS handshake
//! (bounded by `limits.header_timeout`, counted by version and by reason of failure), a deadline
//! for every HTTP/1 request head (slowloris), the idle wait between keep-alive requests
//! (`limits.keepalive_timeout`), the open-connection gauges by listener and protocol, and
//! small writes held so that a response's head goes out with its body in one send.
//!
//! [`Downstream`] is the listening service's application. It wraps each accepted stream in a
//! [`HeadGuard`] and runs the HTTP/1 keep-alive loop itself, so that the guard is re-armed
//! before every request, and so that the per-request state is made only when a request's first
//! byte has arrived; each HTTP/1 request goes to the gateway's own path
//! ([`crate::proxy::own`]), which hands what it does not serve to Pingora's proxy. HTTP/2
//! connections go to Pingora's own loop (their heads are frames, bounded by the h2 settings).
//!
//! By concern: [`tls_accept`] (the handshake and its failure reasons), [`h2c`] (HTTP/2 with
//! prior knowledge told from HTTP/1), [`head_deadline`] (the guard and its head deadline),
//! [`coalesce`] (small writes held for one send).

mod coalesce;
mod h2c;
mod head_deadline;
mod tls_accept;

use h2c::read_h2c_preface;
pub use head_deadline::HeadGuard;
use head_deadline::{HeadState, LastWaker, Phase, Protocol};
pub(crate) use tls_accept::tls_version;
use tls_accept::{tls_handshake, HandshakeFailure};

use crate::metrics::METRICS;
use crate::proxy::own::OwnPath;
use crate::proxy::Gateway;
use crate::runtime::Runtime;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora::listeners::tls::Acceptor;
use pingora::protocols::http::ServerSession;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::tls::ALPN;
use pingora::protocols::Stream;
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use prometheus::{IntCounter, IntGauge};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio::time::{Instant, Sleep};

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
    /// Handshakes failed, by reason (indexed by `HandshakeFailure as usize`).
    failures: [IntCounter; HandshakeFailure::ALL.len()],
}

/// The application of the client listeners: the guard around the gateway's own HTTP/1 path and
/// Pingora's HTTP proxy.
pub struct Downstream {
    own: OwnPath,
    runtime: Arc<ArcSwap<Runtime>>,
    listeners: Vec<ListenerHandles>,
    h2c: bool,
    /// The shutdown under way hands the listeners to a new process (an upgrade).
    handing_over: Arc<AtomicBool>,
}

impl Downstream {
    /// Guards `proxy` on `listeners`: name, address, and for TLS listeners the settings the
    /// handshake is made with (the listener itself is bound as plain TCP).
    pub fn new(
        proxy: HttpProxy<Gateway>,
        runtime: Arc<ArcSwap<Runtime>>,
        listeners: impl IntoIterator<Item = (String, SocketAddr, Option<Acceptor>)>,
        h2c: bool,
        handing_over: Arc<AtomicBool>,
    ) -> Downstream {
        let listeners = listeners
            .into_iter()
            .map(|(name, address, tls)| ListenerHandles {
                // Counters made from the start, so that dashboards and alerts see zeros rather
                // than nothing, and no handshake looks a label up.
                tls: tls.map(|acceptor| TlsListener {
                    acceptor,
                    tls12: METRICS
                        .tls_handshakes
                        .with_label_values(&[&name, "TLSv1.2"]),
                    tls13: METRICS
                        .tls_handshakes
                        .with_label_values(&[&name, "TLSv1.3"]),
                    failures: HandshakeFailure::ALL.map(|reason| {
                        METRICS
                            .tls_handshake_errors
                            .with_label_values(&[&name, reason.label()])
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
            own: OwnPath::new(Arc::new(proxy)),
            runtime,
            listeners,
            h2c,
            handing_over,
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
    /// re-armed before every request. Each request's session and request future are made only
    /// once its first byte has arrived, so an idle keep-alive connection holds neither.
    async fn serve_http1(self: &Arc<Self>, guard: Box<HeadGuard>, shutdown: &ShutdownWatch) {
        let keepalive = guard.keepalive.as_secs().max(1);
        // One shutdown waiter for the connection's life, rather than one per request.
        let mut watch = shutdown.clone();
        let mut shutting_down = ShutdownWaiter {
            changed: std::pin::pin!(watch.changed()),
            polled_with: LastWaker::default(),
        };
        let mut next = next_request(
            guard,
            false,
            shutdown,
            &mut shutting_down,
            &self.handing_over,
        )
        .await;
        let mut settings = None;
        while let Some(stream) = next {
            // Boxed where it is made: the proxy reads the head of a boxed session.
            let mut session = Box::new(ServerSession::new_http1(stream));
            match settings {
                Some(settings) => HttpPersistentSettings::apply_to_session(settings, &mut session),
                None => session.set_keepalive(Some(keepalive)),
            }
            // (Once shutdown has begun, `OwnPath::serve` stops the client reusing the
            // connection, after the head is read, as Pingora's proxy does.)
            // Header names go out in canonical case unless told to keep the client's: then
            // their spelling is not kept as they are read either.
            let keep_case = self.runtime.load().forwarding.preserve_header_case;
            session.set_keep_header_case(keep_case);
            let Some(reused) = self.own.serve(session, shutdown).await else {
                return;
            };
            let stream;
            (stream, settings) = reused.consume();
            // Every client stream is wrapped in a guard (`process_new`); anything else is
            // closed rather than served unguarded.
            let Ok(guard) = stream.into_any().downcast::<HeadGuard>() else {
                return;
            };
            next = next_request(
                guard,
                true,
                shutdown,
                &mut shutting_down,
                &self.handing_over,
            )
            .await;
        }
    }
}

/// The connection's one wait for shutdown, and the waker it was last polled with.
struct ShutdownWaiter<'a, F> {
    changed: Pin<&'a mut F>,
    polled_with: LastWaker,
}

/// When an upgrade hands the listeners to a new process, how long a connection of the old one
/// still waits for its next request, which is answered with `Connection: close`: a client that
/// sends one just then gets an answer instead of a reset, and its next connection goes to the
/// new process. (A plain shutdown closes idle connections at once: no one takes over.)
const DRAIN_WINDOW: Duration = Duration::from_secs(1);

/// Waits for the first byte of the connection's next request (kept in the guard for Pingora to
/// read) and gives the stream back; `None` when the client closed or went quiet, or shutdown
/// began (for an upgrade: and no request came within [`DRAIN_WINDOW`]). Between requests (`between`) the wait is
/// bounded by the keep-alive timeout; the first request's by the head deadline.
async fn next_request<F: Future>(
    mut guard: Box<HeadGuard>,
    between: bool,
    shutdown: &ShutdownWatch,
    shutting_down: &mut ShutdownWaiter<'_, F>,
    handing_over: &AtomicBool,
) -> Option<Stream> {
    let draining = || handing_over.load(Ordering::Relaxed);
    if *shutdown.borrow() && !draining() {
        return None;
    }
    if between {
        guard.phase = Phase::Idle(None);
    }
    // Made only once shutdown has begun: the usual wait pays nothing for it.
    let mut drain: Option<Pin<Box<Sleep>>> = None;
    if *shutdown.borrow() {
        drain = Some(Box::pin(tokio::time::sleep(DRAIN_WINDOW)));
    }
    let arrived = {
        let mut first_byte = std::pin::pin!(guard.first_byte());
        std::future::poll_fn(|cx| {
            // The next request is usually there already: then the shutdown wait is not polled.
            if let Poll::Ready(read) = first_byte.as_mut().poll(cx) {
                return Poll::Ready(matches!(read, Ok(true)));
            }
            if let Some(window) = drain.as_mut() {
                return window.as_mut().poll(cx).map(|_| false);
            }
            // A closed watch (`Err`) ends the wait as a shutdown does.
            if shutting_down.polled_with.is(cx) && matches!(shutdown.has_changed(), Ok(false)) {
                return Poll::Pending;
            }
            if shutting_down.changed.as_mut().poll(cx).is_ready() {
                if !draining() {
                    return Poll::Ready(false);
                }
                let mut window = Box::pin(tokio::time::sleep(DRAIN_WINDOW));
                if window.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(false);
                }
                drain = Some(window);
                return Poll::Pending;
            }
            shutting_down.polled_with.set(cx);
            Poll::Pending
        })
        .await
    };
    arrived.then_some(guard as Stream)
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
                    tls.failures[reason as usize].inc();
                    return None;
                }
            };
        }
        let tls = stream.get_ssl_digest();
        let mut protocol = Protocol::Http1;
        match stream.selected_alpn_proto() {
            Some(ALPN::H2) => protocol = Protocol::H2,
            // ACME validation (TLS-ALPN-01) ends with the handshake.
            Some(ALPN::Custom(p)) if p.protocol() == crate::acme::ACME_TLS_ALPN => return None,
            _ => {}
        }
        if !matches!(protocol, Protocol::H2)
            && self.h2c
            && tls.is_none()
            && stream.as_any().is::<L4Stream>()
        {
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
                self.own.proxy().process_new(guarded, shutdown).await;
            }
        }
        None
    }

    async fn cleanup(&self) {
        self.own.proxy().http_cleanup().await;
    }
}
