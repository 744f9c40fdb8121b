//! A floor below Pingora's proxy, for the benchmark: pingora-core's HTTP/1.1 sessions driven
//! directly, as the gateway could drive them for plain HTTP/1.1. One task per client connection
//! reads a request, forwards it round robin to a backend over a kept connection, and copies the
//! answer back; the kept upstream connections are a per-thread list (no task, lock or channel
//! per hand-back) and no future is boxed per request. Same tuning and timeouts as
//! `bare-pingora` (one thread, no work stealing, mimalloc; upstream connect 2 s, read and write
//! 30 s, idle connections kept). It forwards GETs without a body and nothing else: a
//! measurement of what such a path costs, not a proxy.
//!
//! `lean-pingora LISTEN BACKEND [BACKEND...]`

use async_trait::async_trait;
use bench_common::{keep_idle, server_conf, take_idle};
use pingora::apps::ServerApp;
use pingora::protocols::http::v1::client::HttpSession as Upstream;
use pingora::protocols::http::v1::server::HttpSession as Downstream;
use pingora::protocols::Stream;
use pingora::server::{Server, ShutdownWatch};
use pingora::services::listening::Service;
use pingora::upstreams::peer::HttpPeer;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[global_allocator]
static GLOBAL: gateway::alloc::Allocator = gateway::alloc::Allocator;

struct Lean {
    backends: Vec<(SocketAddr, HttpPeer)>,
    next: AtomicUsize,
}

impl Lean {
    /// One request: `None` when either side cannot go on.
    async fn proxy(&self, down: &mut Downstream) -> Option<()> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.backends.len();
        let (addr, peer) = &self.backends[i];
        let stream = match take_idle(*addr) {
            Some(s) => s,
            None => {
                let connect = tokio::net::TcpStream::connect(addr);
                let tcp = tokio::time::timeout(Duration::from_secs(2), connect)
                    .await
                    .ok()?
                    .ok()?;
                tcp.set_nodelay(true).ok()?;
                Box::new(pingora::protocols::l4::stream::Stream::from(tcp))
            }
        };
        let mut up = Upstream::new_with_options(stream, peer);
        up.read_timeout = peer.options.read_timeout;
        up.write_timeout = peer.options.write_timeout;
        up.write_request_header(Box::new(down.req_header().clone()))
            .await
            .ok()?;
        up.read_response().await.ok()?;
        let head = Box::new(up.resp_header()?.clone());
        down.write_response_header(head).await.ok()?;
        while let Some(chunk) = up.read_body_ref().await.ok()? {
            down.write_body(chunk).await.ok()?;
        }
        down.finish_body().await.ok()?;
        up.respect_keepalive();
        if let Some(stream) = up.reuse().await {
            keep_idle(*addr, stream);
        }
        Some(())
    }
}

#[async_trait]
impl ServerApp for Lean {
    async fn process_new(self: &Arc<Self>, stream: Stream, _: &ShutdownWatch) -> Option<Stream> {
        let mut stream = stream;
        loop {
            let mut down = Downstream::new(stream);
            // Before the read, as Pingora's loop does: the request may still turn it off.
            down.set_server_keepalive(Some(60));
            down.read_request().await.ok()??;
            self.proxy(&mut down).await?;
            let (next, prefix) = down.reuse().await.ok()??.into_parts();
            if prefix.is_some() {
                return None;
            }
            stream = next;
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        eprintln!("usage: lean-pingora LISTEN BACKEND [BACKEND...]");
        std::process::exit(2);
    }
    let mut server = Server::new_with_opt_and_conf(None, server_conf("lean-pingora"));
    let backends = args[1..]
        .iter()
        .map(|a| {
            let addr: SocketAddr = a.parse().expect("BACKEND is IP:PORT");
            let mut p = HttpPeer::new(addr, false, String::new());
            p.options.read_timeout = Some(Duration::from_secs(30));
            p.options.write_timeout = Some(Duration::from_secs(30));
            (addr, p)
        })
        .collect();
    let app = Lean {
        backends,
        next: AtomicUsize::new(0),
    };
    let mut service = Service::new("lean".to_string(), app);
    service.add_tcp(&args[0]);
    server.add_service(service);
    server.run_forever();
}
