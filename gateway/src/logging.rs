//! The process log: `RUST_LOG` levels (default `info`) on standard error, with the lines that any
//! client could write at will kept out. On a public port a client decides when a TLS handshake
//! fails, when a request head stops half way and when it stalls; each such event written as a
//! log line would be a line of the client's choosing, formatted and written on the thread that
//! serves traffic. Failed handshakes and stalled heads are counted instead
//! (`gateway_tls_handshake_errors_total`, `gateway_downstream_header_timeouts_total`); a client
//! that hangs up is not. `RUST_LOG` that names the library concerned (`rustls`, `pingora`)
//! brings its lines back.

use std::fmt::Write as _;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Installs the process log (and the bridge for libraries that use the `log` crate, Pingora
/// among them).
pub fn init() {
    let spec = std::env::var("RUST_LOG").unwrap_or_default();
    let quiet = (!spec.contains("pingora")).then_some(QuietClientErrors);
    tracing_subscriber::registry()
        .with(level_filter(&spec))
        .with(quiet)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .init();
}

/// `spec` (default `info`), with rustls at `error` unless `spec` names rustls: rustls logs a
/// client's mistakes at `warn` (an IP address as SNI, an unexpected handshake message, a
/// warning alert).
fn level_filter(spec: &str) -> EnvFilter {
    let filter = EnvFilter::try_new(spec)
        .ok()
        .filter(|_| !spec.is_empty())
        .unwrap_or_else(|| EnvFilter::new("info"));
    match "rustls=error".parse() {
        Ok(quiet) if !spec.contains("rustls") => filter.add_directive(quiet),
        _ => filter,
    }
}

/// Drops Pingora's error lines about a client connection that failed before a request began:
/// Pingora logs at `error`, unconditionally, a client that hangs up in the middle of a request
/// head, one that stalls past the head deadline, one that sends a malformed head and leaves
/// before the 400, and an HTTP/2 connection that hangs up before its preface or sends a wrong
/// one. (Errors during a request go through the proxy's `suppress_error_log`.)
struct QuietClientErrors;

impl<S: Subscriber> Layer<S> for QuietClientErrors {
    fn event_enabled(&self, event: &Event<'_>, _cx: Context<'_, S>) -> bool {
        // Only error lines are read; every other event passes untouched. Pingora logs through
        // the `log` crate: its lines arrive with the target `log`, the real one in a field.
        let meta = event.metadata();
        if *meta.level() != Level::ERROR || !(meta.target() == "log" || is_pingora(meta.target())) {
            return true;
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        let from_pingora = is_pingora(meta.target()) || is_pingora(&fields.log_target);
        if from_pingora && is_pool_race(&fields.message) {
            crate::metrics::METRICS.pool_reuse_failures.inc();
            return false;
        }
        !(from_pingora && is_client_failure(&fields.message))
    }
}

fn is_pingora(target: &str) -> bool {
    target.starts_with("pingora")
}

/// Pingora's line for a pooled upstream connection it could not take back out of its pool: the
/// pool's idle watcher still held the connection for an instant (a race between two threads in
/// `pingora-core`'s connector). The request goes on over a new connection, so nothing is lost
/// and no one is to act: it is counted in `gateway_upstream_pool_reuse_failures_total`.
fn is_pool_race(message: &str) -> bool {
    message == "failed to acquire reusable stream"
}

/// Pingora's messages for a client connection that failed before a request began.
fn is_client_failure(message: &str) -> bool {
    // `Fail to proxy: Downstream …` comes from reading the request head, the source of the
    // error being the client; the next from answering 400 to a malformed head when the client
    // has gone already; the last from the HTTP/2 connection preface.
    [
        "Fail to proxy: Downstream ",
        "failed to send error response to downstream",
        "H2 handshake error",
    ]
    .iter()
    .any(|start| message.starts_with(start))
}

/// The fields of an event that tell its origin and what it says.
#[derive(Default)]
struct Fields {
    message: String,
    /// The target of a line logged through the `log` crate.
    log_target: String,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => {
                let _ = write!(self.message, "{value:?}");
            }
            // Text recorded through `Debug` comes quoted.
            "log.target" => {
                let _ = write!(self.log_target, "{value:?}");
                self.log_target.retain(|c| c != '"');
            }
            _ => {}
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message.push_str(value),
            "log.target" => self.log_target.push_str(value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{is_client_failure, is_pool_race};

    #[test]
    fn the_pool_race_is_told_by_its_exact_line() {
        assert!(is_pool_race("failed to acquire reusable stream"));
        assert!(!is_pool_race(
            "failed to acquire reusable stream: something else"
        ));
        assert!(!is_client_failure("failed to acquire reusable stream"));
    }

    #[test]
    fn client_failures_are_told_from_upstream_ones() {
        for client in [
            "Fail to proxy: Downstream ConnectionClosed context: while reading request headers, \
             bytes already read: 8, downstream session type: h1",
            "Fail to proxy: Downstream ReadError context: while reading request headers cause: \
             request head not received in time, downstream session type: h1",
            "failed to send error response to downstream: Downstream WriteError",
            "H2 handshake error h2 error: invalid connection preface",
        ] {
            assert!(is_client_failure(client), "{client}");
        }
        for kept in [
            "Fail to proxy: Upstream ConnectRefused context: …, status: 502, tries: 1",
            "Fail to proxy: Internal Error context: …",
        ] {
            assert!(!is_client_failure(kept), "{kept}");
        }
    }
}
