//! A bare Pingora proxy: round robin over the backends given on the command line, nothing else.
//! Tuned as the gateway is (one thread, no work stealing, mimalloc, pool sized for the load, no
//! disabled compression module), so that the gateway's own cost shows as a ratio to it. Its
//! upstream timeouts are the gateway's defaults (connect 2 s, read and write 30 s): every proxy
//! in the run has some (nginx 60 s, HAProxy 30 s), and Pingora arms a timer for every upstream
//! read that has to wait for one.
//!
//! `bare-pingora LISTEN BACKEND [BACKEND...]` (add `--h2c` to accept HTTP/2 with prior knowledge,
//! `--tls CERT KEY` to terminate TLS with Pingora's rustls listener)

use async_trait::async_trait;
use pingora::apps::HttpServerOptions;
use pingora::prelude::*;
use pingora::proxy::{ProxyHttp, ProxyServiceBuilder, Session};
use pingora::server::configuration::ServerConf;
use pingora::upstreams::peer::HttpPeer;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

#[global_allocator]
static GLOBAL: gateway::alloc::Allocator = gateway::alloc::Allocator;

struct Bare {
    peers: Vec<HttpPeer>,
    next: AtomicUsize,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();
    fn new_ctx(&self) {}
    /// Without Pingora's disabled compression module, as the gateway.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    async fn upstream_peer(&self, _s: &mut Session, _c: &mut ()) -> Result<Box<HttpPeer>> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.peers.len();
        Ok(Box::new(self.peers[i].clone()))
    }
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let h2c = args.iter().any(|a| a == "--h2c");
    args.retain(|a| a != "--h2c");
    let tls = match args.iter().position(|a| a == "--tls") {
        Some(i) if i + 2 < args.len() => {
            let pair: Vec<String> = args.drain(i..i + 3).skip(1).collect();
            Some((pair[0].clone(), pair[1].clone()))
        }
        _ => None,
    };
    if args.len() < 2 {
        eprintln!("usage: bare-pingora [--h2c] LISTEN BACKEND [BACKEND...]");
        std::process::exit(2);
    }
    let conf = ServerConf {
        upstream_keepalive_pool_size: 1024,
        ..bench_common::server_conf("bare-pingora")
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    let peers = args[1..]
        .iter()
        .map(|a| {
            let mut p = HttpPeer::new(a.as_str(), false, String::new());
            p.options.idle_timeout = Some(Duration::from_secs(60));
            p.options.connection_timeout = Some(Duration::from_secs(2));
            p.options.read_timeout = Some(Duration::from_secs(30));
            p.options.write_timeout = Some(Duration::from_secs(30));
            p
        })
        .collect();
    let mut opts = HttpServerOptions::default();
    opts.h2c = h2c;
    let mut svc = ProxyServiceBuilder::new(
        &server.configuration,
        Bare {
            peers,
            next: AtomicUsize::new(0),
        },
    )
    .name("bare")
    .server_options(opts)
    .build();
    match &tls {
        Some((cert, key)) => {
            if let Err(e) = svc.add_tls(&args[0], cert, key) {
                eprintln!("bare-pingora: TLS: {e}");
                std::process::exit(2);
            }
        }
        None => svc.add_tcp(&args[0]),
    }
    server.add_service(svc);
    server.bootstrap();
    server.run_forever();
}
