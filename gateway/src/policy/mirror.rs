//! Mirroring (`routes[].mirror`): a share of a route's requests, bodies up to a limit, also go
//! to a shadow upstream, whose answers are read and thrown away. The copy never touches the
//! real request: it is handed to a bounded queue (full: dropped and counted) and sent by a
//! task of the control plane, at most a few at a time, each within a timeout.

use crate::proxy::context::RequestCtx;
use crate::upstream::{ms_at, Upstream};
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http_body_util::Full;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use pingora::http::RequestHeader;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// Copies waiting to be sent, per route.
const QUEUE: usize = 256;
/// Copies in flight at once, per route.
const IN_FLIGHT: usize = 16;

static X_GATEWAY_MIRROR: HeaderName = HeaderName::from_static("x-gateway-mirror");

/// A copy of a request, ready to send.
pub struct Copy {
    method: http::Method,
    uri: http::Uri,
    headers: HeaderMap,
    body: BytesMut,
}

/// A request chosen for copying: once its head has been edited for the upstream, that head,
/// then its body as it arrives.
pub struct Capture {
    mirror: Arc<Mirror>,
    copy: Option<Copy>,
}

/// A route's mirror.
pub struct Mirror {
    /// The shadow upstream.
    pub upstream: Arc<Upstream>,
    /// Share of requests copied, in percent.
    pub percent: u32,
    /// Largest body copied; a request with a larger one is not mirrored.
    pub max_body: u64,
    /// Longest a copy may take (connect, send, answer).
    pub timeout: Duration,
    counter: AtomicU64,
    queue: mpsc::Sender<Copy>,
    /// Taken by the sending task when the runtime starts.
    pending: Mutex<Option<mpsc::Receiver<Copy>>>,
    /// Connections to the shadow's replicas, kept between copies.
    client: Client<HttpConnector, Full<Bytes>>,
    metrics: crate::metrics::MirrorMetrics,
}

impl Mirror {
    /// The mirror of route `route` to `upstream`.
    pub fn new(
        route: &str,
        upstream: Arc<Upstream>,
        percent: u32,
        max_body: u64,
        timeout: Duration,
    ) -> Mirror {
        let (queue, pending) = mpsc::channel(QUEUE);
        Mirror {
            upstream,
            percent,
            max_body,
            timeout,
            counter: AtomicU64::new(0),
            queue,
            pending: Mutex::new(Some(pending)),
            client: crate::upstream::own_client(None, IN_FLIGHT),
            metrics: crate::metrics::MirrorMetrics::new(route),
        }
    }

    /// Chooses this admitted request for copying when it falls in the share; the copy is made
    /// of what goes upstream ([`Capture::on_upstream_request`]), so it carries no credential
    /// or header the route's policies took out.
    pub fn on_request(self: &Arc<Self>, req: &RequestHeader, ctx: &mut RequestCtx) {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        if (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) % 100 >= u64::from(self.percent) {
            return;
        }
        let length = req
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if length.is_some_and(|l| l > self.max_body) {
            self.metrics.too_large.inc();
            return;
        }
        ctx.mirror = Some(Box::new(Capture {
            mirror: self.clone(),
            copy: None,
        }));
    }

    fn enqueue(&self, copy: Copy) {
        if self.queue.try_send(copy).is_err() {
            self.metrics.dropped.inc();
        }
    }

    /// Starts the task that sends the copies (once; on the control plane's runtime).
    pub fn spawn_task(self: &Arc<Self>) {
        let Some(mut pending) = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        // The task holds the mirror weakly: when the runtime that owns it is gone, the queue's
        // sender is dropped with it and the task ends.
        let weak = Arc::downgrade(self);
        let slots = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
        tokio::spawn(async move {
            while let Some(copy) = pending.recv().await {
                let Some(mirror) = weak.upgrade() else { return };
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                tokio::spawn(async move {
                    let sent = tokio::time::timeout(mirror.timeout, mirror.send(copy)).await;
                    match sent {
                        Ok(Ok(())) => mirror.metrics.sent.inc(),
                        _ => mirror.metrics.failed.inc(),
                    }
                    drop(slot);
                });
            }
        });
    }

    /// Sends one copy to a replica of the shadow upstream, over a kept connection when one is
    /// idle, and reads its answer to the end.
    async fn send(&self, copy: Copy) -> Result<(), String> {
        use http_body_util::BodyExt;
        let now = std::time::Instant::now();
        let mut attempt = self.upstream.attempt(ms_at(now)).ok_or("no replica")?;
        let target = copy.uri.path_and_query().map_or("/", |p| p.as_str());
        let uri: http::Uri = format!("http://{}{target}", attempt.addr())
            .parse()
            .map_err(|e: http::uri::InvalidUri| e.to_string())?;
        let mut request = http::Request::new(Full::new(copy.body.freeze()));
        *request.method_mut() = copy.method;
        *request.uri_mut() = uri;
        *request.headers_mut() = copy.headers;
        // A copy counts for the replica when it is answered and against it when no connection
        // could be made; a slow answer cut by `timeout` counts neither way: a mirror's
        // deadline must not eject a replica that also serves real routes.
        let response = self.client.request(request).await.map_err(|e| {
            if e.is_connect() {
                attempt.failed();
            }
            e.to_string()
        })?;
        attempt.answered();
        // The answer is read (so the shadow sees a complete exchange) and thrown away.
        let mut body = response.into_body();
        while let Some(frame) = body.frame().await {
            frame.map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

impl Capture {
    /// Copies the head as it goes upstream (first attempt only); a request without a body is
    /// sent at once, the others when their body has arrived.
    pub fn on_upstream_request(ctx: &mut RequestCtx, up: &RequestHeader, body_empty: bool) {
        let Some(capture) = ctx.mirror.as_mut().filter(|c| c.copy.is_none()) else {
            return;
        };
        let mut headers = HeaderMap::with_capacity(up.headers.len() + 1);
        for (name, value) in up.headers.iter() {
            if !hop_by_hop(name) {
                headers.append(name.clone(), value.clone());
            }
        }
        headers.insert(X_GATEWAY_MIRROR.clone(), HeaderValue::from_static("1"));
        if let Some(id) = &ctx.request_id {
            headers.insert(crate::headers::X_REQUEST_ID.clone(), id.clone());
        }
        let copy = Copy {
            method: up.method.clone(),
            uri: up.uri.clone(),
            headers,
            body: BytesMut::new(),
        };
        if body_empty {
            let mirror = capture.mirror.clone();
            ctx.mirror = None;
            mirror.enqueue(copy);
        } else {
            capture.copy = Some(copy);
        }
    }

    /// Adds a chunk of the request body; sends the copy when the body is complete, drops it
    /// when the body grows past the limit.
    pub fn on_body(ctx: &mut RequestCtx, chunk: Option<&Bytes>, end: bool) {
        let Some(capture) = ctx.mirror.as_mut() else {
            return;
        };
        let Some(copy) = capture.copy.as_mut() else {
            return;
        };
        if let Some(chunk) = chunk {
            if copy.body.len() as u64 + chunk.len() as u64 > capture.mirror.max_body {
                capture.mirror.metrics.too_large.inc();
                ctx.mirror = None;
                return;
            }
            copy.body.extend_from_slice(chunk);
        }
        if end {
            if let Some(Capture {
                mirror,
                copy: Some(copy),
            }) = ctx.mirror.take().map(|c| *c)
            {
                mirror.enqueue(copy);
            }
        }
    }
}

/// Headers that belong to one connection, not to the request.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "content-length"
    )
}
