//! The gateway's own HTTP/1 request path, for the requests most traffic is made of, beside
//! Pingora's proxy for the rest.
//!
//! A client's HTTP/1 request is read here and goes through the gateway's phases (its
//! `ProxyHttp` callbacks, in Pingora's order, with a retry loop as Pingora's and the same
//! error answers); a request without a body and without an upgrade, whose route goes to an
//! upstream that speaks HTTP/1 only, is then exchanged here ([`exchange`]): the upstream head prepared by
//! Pingora's own rules, Pingora's upstream connections (kept per thread), the response read
//! and written in turn. Any other request (a body, an upgrade, an HTTP/2 or gRPC upstream,
//! no route state) is handed to Pingora's proxy after `request_filter`, which carries it on
//! from there. The same request costs less here: none of the proxy's per-request machinery
//! for caching, subrequests, body channels and task pipes (`bench/README.md` has the figures).
//!
//! It calls the callbacks the gateway implements (`proxy/mod.rs`), those of the phases up to
//! the response head through the `Gateway` functions their trait methods delegate to
//! (`on_request`, `route_peer`, ...), and the defaults it reads (`request_summary`,
//! `upstream_response_body_filter`). Those the gateway leaves at Pingora's defaults, which do
//! nothing, are not called, on this path nor for a request it hands on:
//! `early_request_filter`, `on_connection_reuse`, `proxy_upstream_filter`,
//! `connected_to_upstream`, `suppress_proxy_warn_log`; nor are the session's upstream byte
//! counts and write-pending time recorded (the gateway does not read them). A callback the
//! gateway comes to implement must be called here too.
//!
//! One deliberate difference: a `101` to a request that asked for no upgrade is refused as an
//! invalid answer (502, and the replica's failure); Pingora's proxy passes it on.
//! The head is read by Pingora's own `handle_new_request`; the log lines of the attempts and
//! the exchange come from this module (`gateway::proxy::own`) rather than from
//! `pingora_proxy`, at the levels Pingora uses, but for a client's hang-up (debug; Pingora:
//! error, which the gateway's log filter quiets anyway).

mod exchange;

use super::Gateway;
use pingora::apps::ReusedHttpStream;
use pingora::protocols::http::ServerSession;
use pingora::proxy::{HttpProxy, ProxyHttp, Session};
use pingora::server::ShutdownWatch;
use pingora::Error;
use std::sync::Arc;

type Ctx = <Gateway as ProxyHttp>::CTX;

/// The own path, and Pingora's proxy for what it hands on.
pub struct OwnPath {
    proxy: Arc<HttpProxy<Gateway>>,
}

impl OwnPath {
    /// The own path beside `proxy`, driving the same `Gateway`.
    pub fn new(proxy: Arc<HttpProxy<Gateway>>) -> OwnPath {
        OwnPath { proxy }
    }

    /// Pingora's proxy, for the connections this path does not read (HTTP/2).
    pub fn proxy(&self) -> &Arc<HttpProxy<Gateway>> {
        &self.proxy
    }

    /// Reads one request on `http` (an HTTP/1 session whose head is unread) and serves it: the
    /// connection back when the client may send another request on it.
    pub async fn serve(
        &self,
        http: Box<ServerSession>,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        // Read as Pingora's proxy reads it: given up when shutdown begins, 400 for a malformed
        // head, 405 for `CONNECT` unless the server allows it.
        let http = self.proxy.handle_new_request(http).await?;
        let mut session = self.proxy.new_session(http);
        if *shutdown.borrow() {
            // Stop clients from reusing the connection once shutdown has begun.
            session.set_keepalive(None);
        }
        let gw = self.proxy.app();
        let mut ctx = gw.new_ctx();
        let req = session.downstream_session.req_header_mut();
        if let Err(e) = session
            .downstream_modules_ctx
            .request_header_filter(req)
            .await
        {
            let context = "Failed in downstream modules request filter:";
            return self.proxy.handle_error(session, &mut ctx, e, context).await;
        }
        match gw.on_request(&mut session, &mut ctx).await {
            Ok(true) => return self.proxy.finish(session, &mut ctx, true, None).await,
            Ok(false) => {}
            Err(e) => {
                let context = "Fail to filter request:";
                return self.proxy.handle_error(session, &mut ctx, e, context).await;
            }
        }
        if !takes(&mut session, &ctx) {
            return self.proxy.process_filtered(session, ctx).await;
        }
        let (reuse, error) = self.attempts(&mut session, &mut ctx).await;
        self.proxy.finish(session, &mut ctx, reuse, error).await
    }

    /// A retry loop as Pingora's: attempts until one succeeds, one fails for good, or the server's
    /// `max_retries` are spent; then the final error's answer (`fail_to_proxy`). Whether the
    /// client connection may be kept, and the final error.
    async fn attempts(&self, session: &mut Session, ctx: &mut Ctx) -> (bool, Option<Box<Error>>) {
        let gw = self.proxy.app();
        let mut tries = 0;
        let mut reuse = false;
        let mut error = None;
        while tries < self.proxy.max_retries() {
            tries += 1;
            let (reused, failed) = self.attempt(session, ctx).await;
            reuse = reused;
            let Some(e) = failed else {
                error = None;
                break;
            };
            let retry = e.retry();
            if retry {
                let summary = gw.request_summary(session, ctx);
                tracing::warn!("Fail to proxy: {e}, tries: {tries}, retry: true, {summary}");
            }
            error = Some(e);
            if !retry {
                break;
            }
        }
        if let Some(e) = error.as_deref() {
            let answered = gw.fail_to_proxy(session, e, ctx).await;
            if !gw.suppress_error_log(session, ctx, e) {
                let (status, summary) = (answered.error_code, gw.request_summary(session, ctx));
                tracing::error!(
                    "Fail to proxy: {e}, status: {status}, tries: {tries}, retry: false, {summary}"
                );
            }
        }
        (reuse, error)
    }

    /// One attempt, as Pingora's `proxy_to_upstream` makes it: a replica, a connection to it
    /// (`fail_to_connect` when none), the exchange (`error_while_proxy` when it fails).
    async fn attempt(&self, session: &mut Session, ctx: &mut Ctx) -> (bool, Option<Box<Error>>) {
        let gw = self.proxy.app();
        let peer = match gw.route_peer(session, ctx) {
            Ok(peer) => peer,
            Err(e) => return (false, Some(e)),
        };
        let (mut upstream, reused) = match self.proxy.h1_upstream(&peer).await {
            Ok(connection) => connection,
            Err(mut e) => {
                e.as_up();
                let e = gw.fail_to_connect(session, &peer, ctx, e);
                return (false, Some(e.into_up()));
            }
        };
        let done = exchange::exchange(gw, session, &mut upstream, &peer, ctx).await;
        if done.upstream_reusable {
            self.proxy.release_h1_upstream(upstream, &peer).await;
        }
        let error = done
            .error
            .map(|e| gw.error_while_proxy(&peer, session, e, ctx, reused));
        (done.downstream_reusable, error)
    }
}

/// Whether this path exchanges the request (else Pingora's proxy does): no body, no upgrade,
/// not gRPC, and a route whose upstream speaks HTTP/1 only.
fn takes(session: &mut Session, ctx: &Ctx) -> bool {
    ctx.grpc.is_none()
        && ctx.upstream().is_some_and(|up| up.http1_only())
        && !session.is_upgrade_req()
        && session.as_downstream_mut().is_body_empty()
}
