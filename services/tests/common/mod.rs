//! Shared by the services' integration tests.

use std::hash::{BuildHasher, Hasher};
use std::sync::Mutex;

/// A port free on 127.0.0.1 now, for a server the test starts next. Chosen below Linux's
/// ephemeral range (32768 and up), where outgoing connections (to PostgreSQL, between services)
/// take their ports, and never the same port twice in one test process: replicas started in
/// parallel could otherwise draw the same one (`bind(0)` only avoids ports bound right now).
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..200 {
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let port = 20_000 + (random % 12_000) as u16;
        if !handed_out.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed_out.push(port);
            return port;
        }
    }
    panic!("no free port between 20000 and 32000");
}
