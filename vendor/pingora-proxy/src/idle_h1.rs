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
//! one is a look-up in a short list, with no lock, channel or spawned task per request. One
//! task per thread that holds idle connections sweeps the list every [`SWEEP_EVERY`]: it closes
//! those past their idle timeout and those the upstream closed or wrote to. A connection is
//! also checked when it is taken (closed, written to, or past its idle timeout: not used), as
//! the connector's pool does. With work stealing the connector's pool is used as before.

use futures::FutureExt;
use pingora_core::listeners::ALPN;
use pingora_core::protocols::Stream;
use pingora_core::upstreams::peer::Peer;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::runtime::{Handle, RuntimeFlavor};

/// How often a thread's idle connections are checked for a close or an expired idle timeout.
pub(crate) const SWEEP_EVERY: Duration = Duration::from_secs(1);

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

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Not yet known on this thread.
    Unknown,
    /// A runtime per thread: the list is used.
    On,
    /// A work-stealing runtime: the connector's pool is used.
    Off,
}

struct List {
    mode: Mode,
    idle: VecDeque<Idle>,
    sweeping: bool,
}

thread_local! {
    static LIST: RefCell<List> = const {
        RefCell::new(List { mode: Mode::Unknown, idle: VecDeque::new(), sweeping: false })
    };
}

/// Whether this thread keeps idle HTTP/1 connections in its own list.
pub(crate) fn enabled() -> bool {
    LIST.with(|l| {
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

/// Whether connections to `peer` are always HTTP/1 (no HTTP/2, no custom protocol).
pub(crate) fn h1_only<P: Peer>(peer: &P) -> bool {
    peer.get_peer_options()
        .is_none_or(|o| matches!(o.alpn, ALPN::H1))
}

/// The most recently returned idle connection to `peer` that is still usable, if any.
pub(crate) fn take<P: Peer>(peer: &P) -> Option<Stream> {
    let key = peer.reuse_hash();
    let now = Instant::now();
    loop {
        let idle = LIST.with(|l| {
            let mut l = l.borrow_mut();
            let at = l.idle.iter().rposition(|i| i.key == key)?;
            l.idle.remove(at)
        })?;
        if idle.expired(now) {
            continue;
        }
        let mut stream = idle.stream;
        if same_peer(&stream, peer) && still_open(&mut stream) {
            return Some(stream);
        }
    }
}

/// Keeps `stream` for the next request to `peer`; the oldest idle connection of this thread is
/// closed when `cap` (at least 1) are kept.
pub(crate) fn put<P: Peer>(peer: &P, stream: Stream, idle_timeout: Option<Duration>, cap: usize) {
    let start_sweeper = LIST.with(|l| {
        let mut l = l.borrow_mut();
        while l.idle.len() >= cap {
            l.idle.pop_front();
        }
        l.idle.push_back(Idle {
            key: peer.reuse_hash(),
            stream,
            since: Instant::now(),
            idle_timeout,
        });
        !std::mem::replace(&mut l.sweeping, true)
    });
    if start_sweeper {
        tokio::spawn(sweep());
    }
}

/// Closes this thread's idle connections that expired or were closed, until none is left.
async fn sweep() {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let now = Instant::now();
        let done = LIST.with(|l| {
            let mut l = l.borrow_mut();
            l.idle
                .retain_mut(|i| !i.expired(now) && still_open(&mut i.stream));
            if l.idle.is_empty() {
                l.sweeping = false;
            }
            !l.sweeping
        });
        if done {
            return;
        }
    }
}

/// The connection was made to `peer`'s address: the address noted when it was connected, so
/// no system call is needed (the connector's pool asks the socket).
fn same_peer<P: Peer>(stream: &Stream, peer: &P) -> bool {
    match stream.get_socket_digest() {
        Some(d) => d.peer_addr() == Some(peer.address()),
        None => false,
    }
}

/// An idle connection is usable while nothing can be read from it: an upstream does not speak
/// first, so a close, an error or unexpected bytes all mean it is not.
fn still_open(stream: &mut Stream) -> bool {
    let mut buf = [0u8; 1];
    tokio::task::unconstrained(stream.read(&mut buf[..]))
        .now_or_never()
        .is_none()
}
