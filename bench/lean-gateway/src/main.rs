//! A measurement for the benchmark, not a proxy: the gateway's own phases (its `ProxyHttp`
//! callbacks: `request_filter`, `upstream_peer`, `upstream_request_filter`,
//! `upstream_response_filter`, `response_filter`, `response_body_filter`, `logging`) driven on
//! pingora-core's HTTP/1.1 sessions the way `lean-pingora` drives them, instead of through
//! Pingora's proxy: one task per client connection, kept upstream connections in a list per
//! thread, the upstream's read and write timeouts armed, the request's hop-by-hop fields
//! removed as Pingora removes them. It tells what a request path of the gateway's own would
//! cost with the gateway's phases in it. It forwards requests without a body to plain HTTP/1
//! upstreams and closes the connection on anything else: no retries, no error answers, no TLS,
//! no upgrades, no 1xx answers, and the gateway's client-side guard (head deadline, write
//! coalescing) is not in front of it.
//!
//! `lean-gateway CONFIG LISTEN`: routes and upstreams from the gateway's configuration file;
//! one proxy thread listening on `LISTEN`.

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bench_common::{keep_idle, server_conf, take_idle};
use gateway::proxy::Gateway;
use pingora::apps::ServerApp;
use pingora::http::RequestHeader;
use pingora::protocols::http::v1::client::HttpSession as Upstream;
use pingora::protocols::Stream;
use pingora::proxy::{ProxyHttp, Session};
use pingora::server::{Server, ShutdownWatch};
use pingora::services::listening::Service;
use pingora::upstreams::peer::{HttpPeer, Peer};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

#[global_allocator]
static GLOBAL: gateway::alloc::Allocator = gateway::alloc::Allocator;

/// Hop-by-hop fields, removed from what goes upstream as Pingora's proxy removes them
/// (`strip_standard_hop_by_hop_headers`), after the fields `Connection` names.
const HOP_BY_HOP: [&str; 10] = [
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "connection",
    "upgrade",
    "http2-settings",
];

struct Lean {
    gateway: Gateway,
}

async fn connect(addr: SocketAddr, peer: &HttpPeer) -> Option<Stream> {
    let timeout = peer.connection_timeout().unwrap_or(Duration::from_secs(2));
    let tcp = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    tcp.set_nodelay(true).ok()?;
    Some(Box::new(pingora::protocols::l4::stream::Stream::from(tcp)))
}

fn strip_request(req: &mut RequestHeader) {
    let nominated: Vec<String> = req
        .headers
        .get_all("connection")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect();
    for name in &nominated {
        req.remove_header(name.as_str());
    }
    for name in HOP_BY_HOP {
        req.remove_header(name);
    }
}

impl Lean {
    /// One request through the gateway's phases, logged (with an error when it failed) as
    /// Pingora logs it: `None` when either side cannot go on.
    async fn proxy(&self, session: &mut Session) -> Option<()> {
        let mut ctx = self.gateway.new_ctx();
        let done = self.exchange(session, &mut ctx).await;
        let failed = done
            .is_none()
            .then(|| pingora::Error::new_str("lean-gateway: the exchange failed"));
        self.gateway
            .logging(session, failed.as_deref(), &mut ctx)
            .await;
        done
    }

    async fn exchange(
        &self,
        session: &mut Session,
        ctx: &mut <Gateway as ProxyHttp>::CTX,
    ) -> Option<()> {
        let gw = &self.gateway;
        if gw.request_filter(session, ctx).await.ok()? {
            return Some(());
        }
        if !session.as_downstream_mut().is_body_empty() {
            return None;
        }
        let peer = gw.upstream_peer(session, ctx).await.ok()?;
        if peer.is_tls()
            || peer
                .get_alpn()
                .is_some_and(|a| a.get_min_http_version() > 1)
        {
            return None;
        }
        let addr = *peer.address().as_inet()?;
        let stream = match take_idle(addr) {
            Some(s) => s,
            None => connect(addr, &peer).await?,
        };
        let mut up = Upstream::new_with_options(stream, &*peer);
        up.read_timeout = peer.options.read_timeout;
        up.write_timeout = peer.options.write_timeout;
        let mut req = Box::new(session.req_header().clone());
        strip_request(&mut req);
        req.set_version(pingora::http::Version::HTTP_11);
        gw.upstream_request_filter(session, &mut req, ctx)
            .await
            .ok()?;
        up.write_request_header(req).await.ok()?;
        gw.request_body_filter(session, &mut None, true, ctx)
            .await
            .ok()?;
        up.read_response().await.ok()?;
        let mut resp = Box::new(up.resp_header()?.clone());
        gw.upstream_response_filter(session, &mut resp, ctx)
            .await
            .ok()?;
        gw.response_filter(session, &mut resp, ctx).await.ok()?;
        session.write_response_header(resp, false).await.ok()?;
        loop {
            let mut body = up.read_body_bytes().await.ok()?;
            let end = body.is_none() || up.is_body_done();
            gw.response_body_filter(session, &mut body, end, ctx).ok()?;
            session.write_response_body(body, end).await.ok()?;
            if end {
                break;
            }
        }
        up.respect_keepalive();
        if let Some(stream) = up.reuse().await {
            keep_idle(addr, stream);
        }
        Some(())
    }
}

#[async_trait]
impl ServerApp for Lean {
    async fn process_new(self: &Arc<Self>, stream: Stream, _: &ShutdownWatch) -> Option<Stream> {
        let mut stream = stream;
        loop {
            let mut session = Session::new_h1(stream);
            // Before the read, as Pingora's loop does: the request may still turn it off.
            session.downstream_session.set_keepalive(Some(60));
            if !session.downstream_session.read_request().await.ok()? {
                return None;
            }
            self.proxy(&mut session).await?;
            let reused = session.downstream_session.finish().await.ok()??;
            let (next, prefix) = reused.into_parts();
            if prefix.is_some() {
                return None;
            }
            stream = next;
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != 2 {
        eprintln!("usage: lean-gateway CONFIG LISTEN");
        std::process::exit(2);
    }
    let plan = match gateway::plan::load(Path::new(&args[0])) {
        Ok(plan) => plan,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    // The upstreams' own tasks (discovery, health checks) run on a runtime of their own, as in
    // the gateway.
    let control = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let runtime = match control.block_on(gateway::plan::activate(plan, None, 1)) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    let shared = Arc::new(ArcSwap::from_pointee(runtime));
    {
        let _in_runtime = control.enter();
        gateway::plan::start_tasks(&shared.load());
    }
    let mut server = Server::new_with_opt_and_conf(None, server_conf("lean-gateway"));
    let app = Lean {
        gateway: Gateway::new(shared),
    };
    let mut service = Service::new("lean-gateway".to_string(), app);
    service.add_tcp(&args[1]);
    server.add_service(service);
    server.run_forever();
}
