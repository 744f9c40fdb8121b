//! What the benchmark's own proxies (`bare-pingora`, `lean-pingora`, `lean-gateway`) share: the
//! server settings every proxy in the benchmark runs with, and the per-thread list of kept
//! upstream connections the two `lean-*` use.

use pingora::protocols::Stream;
use pingora::server::configuration::ServerConf;
use std::cell::RefCell;
use std::net::SocketAddr;

/// One proxy thread, no work stealing, a quick shutdown; pid file and upgrade socket named
/// after `name` and the process.
pub fn server_conf(name: &str) -> ServerConf {
    let pid = std::process::id();
    ServerConf {
        threads: 1,
        work_stealing: false,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        pid_file: format!("/tmp/{name}-{pid}.pid"),
        upgrade_sock: format!("/tmp/{name}-{pid}.sock"),
        ..ServerConf::default()
    }
}

thread_local! {
    /// Idle upstream connections of this thread, per upstream address.
    static IDLE: RefCell<Vec<(SocketAddr, Vec<Stream>)>> = const { RefCell::new(Vec::new()) };
}

/// A kept connection to `addr`, if this thread has one.
pub fn take_idle(addr: SocketAddr) -> Option<Stream> {
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        let (_, list) = idle.iter_mut().find(|(a, _)| *a == addr)?;
        list.pop()
    })
}

/// Keeps a connection to `addr` for this thread's next request there.
pub fn keep_idle(addr: SocketAddr, stream: Stream) {
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        match idle.iter_mut().find(|(a, _)| *a == addr) {
            Some((_, list)) => list.push(stream),
            None => idle.push((addr, vec![stream])),
        }
    })
}
