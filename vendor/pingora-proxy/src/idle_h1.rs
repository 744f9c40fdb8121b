// Copyright 2026 Cloudflare, Inc.
//
// Licensed under the Apache License, Version 2.0 (the "License");
// you may not use this file except in compliance with the License.
// You may obtain a copy of the License at
//
//     http://www.apache.org/licenses/LICENSE-2.0
//
// Unless required by applicable law or agreed to in writing, software
// distributed under the License is distributed on an "AS IS" BASIS,
// WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
// See the License for the specific language governing permissions and
// limitations under the License.

//! Idle HTTP/1 upstream connections kept per worker thread.
//!
//! With a runtime per thread (no work stealing), a connection handed back after a request is
//! kept in a list of its thread's own, in front of the connector's pool: taking and returning
//! one is a look-up in a short list, with no lock, channel or spawned task per request. A
//! connection is checked when it is taken (closed, written to, or past its idle timeout:
//! closed, not used); the connector's pool also checks one when it is returned, which a take
//! would repeat. One task per thread that holds idle connections sweeps the lists every
//! [`SWEEP_EVERY`]: it closes those past their idle timeout and those the upstream closed or
//! wrote to. With work stealing, a pool
//! callback or a pool size of 0, the connector's pool is used as before.

use futures::FutureExt;
use log::warn;
use pingora_core::listeners::ALPN;
use pingora_core::protocols::Stream;
use pingora_core::upstreams::peer::Peer;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::runtime::{Handle, RuntimeFlavor};

/// How often a thread's idle connections are checked for a close or an expired idle timeout.
pub(crate) const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// One proxy's idle HTTP/1 connections, kept per thread.
pub(crate) struct IdleH1 {
    /// Tells this proxy's connections from another's on the same thread: a connector's own
    /// settings (CA, client certificate, bind address) are not in a peer's reuse hash.
    id: u64,
    /// Idle connections this proxy keeps per thread (the connector's pool size per thread).
    cap: usize,
    /// The connector's count of idle connections found with unexpected data.
    unexpected: Arc<AtomicU64>,
}

struct Idle {
    key: u64,
    stream: Stream,
    since: Instant,
    idle_timeout: Option<Duration>,
}

impl Idle {
    fn expired(&self, now: Instant) -> bool {
        self.idle_timeout
            .is_some_and(|t| now.saturating_duration_since(self.since) >= t)
    }
}

/// The idle connections of one proxy on this thread.
struct ProxyList {
    id: u64,
    idle: VecDeque<Idle>,
    unexpected: Arc<AtomicU64>,
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Not yet known on this thread.
    Unknown,
    /// A runtime per thread: the lists are used.
    On,
    /// A work-stealing runtime: the connector's pool is used.
    Off,
}

struct Lists {
    mode: Mode,
    proxies: Vec<ProxyList>,
    sweeping: bool,
}

thread_local! {
    static LISTS: RefCell<Lists> = const {
        RefCell::new(Lists { mode: Mode::Unknown, proxies: Vec::new(), sweeping: false })
    };
}

impl IdleH1 {
    pub(crate) fn new(cap: usize, unexpected: Arc<AtomicU64>) -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        IdleH1 {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            cap,
            unexpected,
        }
    }

    /// Whether connections to `peer` are kept here on this thread: always HTTP/1 (no HTTP/2,
    /// no custom protocol), and a runtime per thread.
    pub(crate) fn serves<P: Peer>(&self, peer: &P) -> bool {
        self.cap > 0
            && peer
                .get_peer_options()
                .is_none_or(|o| matches!(o.alpn, ALPN::H1))
            && per_thread_runtime()
    }

    /// The most recently returned idle connection to `peer` that is still usable, if any.
    pub(crate) fn take<P: Peer>(&self, peer: &P) -> Option<Stream> {
        let key = peer.reuse_hash();
        let now = Instant::now();
        loop {
            let idle = LISTS.with(|l| {
                let mut l = l.borrow_mut();
                let list = l.proxies.iter_mut().find(|p| p.id == self.id)?;
                let at = list.idle.iter().rposition(|i| i.key == key)?;
                list.idle.remove(at)
            })?;
            if idle.expired(now) {
                continue;
            }
            let mut stream = idle.stream;
            if same_peer(&stream, peer) && still_open(&mut stream, &self.unexpected) {
                return Some(stream);
            }
        }
    }

    /// Keeps `stream` for the next request to `peer`; the oldest idle connection of this proxy
    /// on this thread is closed when `cap` are kept. It is not checked here: every take checks
    /// the connection it takes, and the sweep closes one the upstream ended (so one ended just
    /// now is kept until then, and may push out the oldest while it is).
    pub(crate) fn put<P: Peer>(&self, peer: &P, stream: Stream) {
        let idle = Idle {
            key: peer.reuse_hash(),
            stream,
            since: Instant::now(),
            idle_timeout: peer.idle_timeout(),
        };
        let start_sweeper = LISTS.with(|l| {
            let mut l = l.borrow_mut();
            let at = match l.proxies.iter().position(|p| p.id == self.id) {
                Some(at) => at,
                None => {
                    l.proxies.push(ProxyList {
                        id: self.id,
                        idle: VecDeque::new(),
                        unexpected: self.unexpected.clone(),
                    });
                    l.proxies.len() - 1
                }
            };
            let list = &mut l.proxies[at].idle;
            while list.len() >= self.cap {
                list.pop_front();
            }
            list.push_back(idle);
            !std::mem::replace(&mut l.sweeping, true)
        });
        if start_sweeper {
            tokio::spawn(sweep());
        }
    }
}

/// Whether this thread runs a runtime of its own (Pingora's no-steal runtime), noted once.
fn per_thread_runtime() -> bool {
    LISTS.with(|l| {
        let mut l = l.borrow_mut();
        if l.mode == Mode::Unknown {
            l.mode = match Handle::try_current().map(|h| h.runtime_flavor()) {
                Ok(RuntimeFlavor::CurrentThread) => Mode::On,
                _ => Mode::Off,
            };
        }
        l.mode == Mode::On
    })
}

/// Closes this thread's idle connections that expired or were closed, until none is left.
async fn sweep() {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let now = Instant::now();
        let emptied = LISTS.with(|l| {
            let mut l = l.borrow_mut();
            for list in l.proxies.iter_mut() {
                let unexpected = &list.unexpected;
                list.idle
                    .retain_mut(|i| !i.expired(now) && still_open(&mut i.stream, unexpected));
            }
            let empty = l.proxies.iter().all(|p| p.idle.is_empty());
            l.sweeping = !empty;
            empty
        });
        if emptied {
            return;
        }
    }
}

/// The connection was made to `peer`'s address. The list is keyed by the peer's reuse hash;
/// this also compares the address noted when the stream was connected, without asking the
/// socket (`getpeername(2)`) as the connector's pool does, which it does for a stream that
/// noted none (one connected through a CONNECT proxy).
fn same_peer<P: Peer>(stream: &Stream, peer: &P) -> bool {
    match stream.get_socket_digest() {
        Some(d) => d.peer_addr() == Some(peer.address()),
        #[cfg(unix)]
        None => peer.matches_fd(stream.id()),
        #[cfg(not(unix))]
        None => false,
    }
}

/// An idle connection is usable while nothing can be read from it: an upstream does not speak
/// first, so a close, an error or unexpected bytes all mean it is not (the last counted, as the
/// connector's pool counts them).
fn still_open(stream: &mut Stream, unexpected: &AtomicU64) -> bool {
    let mut buf = [0u8; 1];
    match tokio::task::unconstrained(stream.read(&mut buf[..])).now_or_never() {
        None => true,
        Some(Ok(n)) if n > 0 => {
            warn!("Unexpected data read in idle connection");
            unexpected.fetch_add(1, Ordering::Relaxed);
            false
        }
        Some(_) => false,
    }
}
