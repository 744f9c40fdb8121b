//! W3C trace context and OpenTelemetry spans.
//!
//! Without span export the gateway only passes a valid `traceparent` on, or starts a trace for a
//! request that has none. With `traces` configured it is a hop of the trace: each request gets a
//! span of its own (a child of the client's span, if any) whose id goes upstream as the parent,
//! and sampled spans are exported over OTLP/HTTP by the SDK's batch processor, which runs on its
//! own thread behind a bounded queue: exporting never blocks a request, and when the collector
//! falls behind, spans are dropped, not requests delayed.

use crate::config::TracesConfig;
use http::HeaderValue;
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracer};
use opentelemetry_sdk::trace::{IdGenerator, SdkTracerProvider, SpanExporter};
use std::cell::Cell;
use std::sync::OnceLock;
use std::time::SystemTime;

/// The span a request is, as far as the trace context goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestSpan {
    /// The trace it belongs to.
    pub trace_id: u128,
    /// This request's span: the parent id sent upstream.
    pub span_id: u64,
    /// The client's span, when the request came with one.
    pub parent_id: Option<u64>,
    /// Sampled: exported, and flagged so upstreams record it too.
    pub sampled: bool,
}

/// Parses a valid `traceparent` (see [`valid_traceparent`]): trace id, parent id, flags.
pub fn parse_traceparent(v: &[u8]) -> Option<(u128, u64, u8)> {
    if !valid_traceparent(v) {
        return None;
    }
    let text = std::str::from_utf8(v).ok()?;
    Some((
        u128::from_str_radix(&text[3..35], 16).ok()?,
        u64::from_str_radix(&text[36..52], 16).ok()?,
        u8::from_str_radix(&text[53..55], 16).ok()?,
    ))
}

/// A W3C `traceparent` this gateway can pass on: `VV-TRACEID-PARENTID-FLAGS` in lower-case
/// hex, version not `ff`, ids not all zero (version 00 is exactly 55 bytes; later versions may
/// append fields).
pub fn valid_traceparent(v: &[u8]) -> bool {
    let hex = |b: &[u8]| {
        b.iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
    };
    let zero = |b: &[u8]| b.iter().all(|c| *c == b'0');
    v.len() >= 55
        && (v.len() == 55 || (v[..2] != *b"00" && v[55] == b'-'))
        && v[2] == b'-'
        && v[35] == b'-'
        && v[52] == b'-'
        && hex(&v[..2])
        && v[..2] != *b"ff"
        && hex(&v[3..35])
        && !zero(&v[3..35])
        && hex(&v[36..52])
        && !zero(&v[36..52])
        && hex(&v[53..55])
}

/// `00-TRACEID-SPANID-FLAGS`.
pub fn format_traceparent(trace_id: u128, span_id: u64, flags: u8) -> HeaderValue {
    let mut text = crate::text::HexText::<55>::default();
    text.put_u8(0, 0);
    text.put_u128(3, trace_id);
    text.put_u64(36, span_id);
    text.put_u8(53, flags);
    text.value()
}

/// A new trace: random trace and span ids.
pub fn new_ids() -> (u128, u64) {
    (fastrand::u128(1..), fastrand::u64(1..))
}

/// The span exporter, made once at start when `traces` is configured.
pub struct SpanExport {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    sample_ratio: f64,
}

static EXPORT: OnceLock<SpanExport> = OnceLock::new();

/// The exporter, when span export is on.
pub fn export() -> Option<&'static SpanExport> {
    EXPORT.get()
}

/// Starts span export (once per process; later calls are ignored).
pub fn start_export(cfg: &TracesConfig) -> Result<(), String> {
    if EXPORT.get().is_some() {
        return Ok(());
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(cfg.otlp_endpoint.value.clone())
        .with_timeout(cfg.timeout.0)
        .build()
        .map_err(|e| format!("traces.otlp_endpoint: {e}"))?;
    start_with(exporter, cfg);
    Ok(())
}

fn start_with(exporter: impl SpanExporter + 'static, cfg: &TracesConfig) {
    let batch = BatchConfigBuilder::default()
        .with_max_queue_size(cfg.max_queue)
        .build();
    let processor = BatchSpanProcessor::builder(exporter)
        .with_batch_config(batch)
        .build();
    let provider = SdkTracerProvider::builder()
        .with_id_generator(PresetIds)
        .with_span_processor(processor)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(cfg.service_name.clone())
                .build(),
        )
        .build();
    let tracer = provider.tracer("gateway");
    let _ = EXPORT.set(SpanExport {
        provider,
        tracer,
        sample_ratio: cfg.sample_ratio,
    });
}

/// Sends what is queued and stops the export thread (at shutdown).
pub fn stop_export() {
    if let Some(e) = EXPORT.get() {
        let _ = e
            .provider
            .shutdown_with_timeout(std::time::Duration::from_secs(2));
    }
}

thread_local! {
    /// The ids the next span built on this thread takes (see [`PresetIds`]).
    static NEXT_IDS: Cell<Option<(u128, u64)>> = const { Cell::new(None) };
}

/// Span ids are chosen when the request arrives (the span id goes upstream as the parent
/// before the span exists); the SDK asks its id generator when the span is built, so the
/// generator hands out the ids preset for it on this thread.
#[derive(Debug)]
struct PresetIds;

impl IdGenerator for PresetIds {
    fn new_trace_id(&self) -> TraceId {
        let preset = NEXT_IDS.with(Cell::get).map(|ids| ids.0);
        TraceId::from(preset.unwrap_or_else(|| new_ids().0))
    }

    fn new_span_id(&self) -> SpanId {
        let preset = NEXT_IDS.with(Cell::get).map(|ids| ids.1);
        SpanId::from(preset.unwrap_or_else(|| new_ids().1))
    }
}

/// What a finished request contributes to its span.
pub struct FinishedRequest<'a> {
    pub span: RequestSpan,
    pub start: SystemTime,
    pub end: SystemTime,
    pub method: &'a str,
    pub path: &'a str,
    pub route: Option<&'a str>,
    pub upstream: Option<&'a str>,
    pub replica: Option<std::net::SocketAddr>,
    pub status: u16,
    pub client_ip: Option<std::net::IpAddr>,
    pub request_id: Option<&'a str>,
    pub host: Option<&'a str>,
}

impl SpanExport {
    /// Whether a new trace (no sampled parent) is sampled.
    pub fn sample_new(&self) -> bool {
        self.sample_ratio >= 1.0 || fastrand::f64() < self.sample_ratio
    }

    /// Queues the span of a finished, sampled request. Never waits.
    pub fn record(&self, r: &FinishedRequest<'_>) {
        let mut attributes = Vec::with_capacity(10);
        attributes.push(KeyValue::new("http.request.method", r.method.to_string()));
        attributes.push(KeyValue::new("url.path", r.path.to_string()));
        attributes.push(KeyValue::new(
            "http.response.status_code",
            i64::from(r.status),
        ));
        if let Some(route) = r.route {
            attributes.push(KeyValue::new("http.route", route.to_string()));
        }
        if let Some(up) = r.upstream {
            attributes.push(KeyValue::new("gateway.upstream", up.to_string()));
        }
        if let Some(replica) = r.replica {
            attributes.push(KeyValue::new("server.address", replica.ip().to_string()));
            attributes.push(KeyValue::new("server.port", i64::from(replica.port())));
        }
        if let Some(ip) = r.client_ip {
            attributes.push(KeyValue::new("client.address", ip.to_string()));
        }
        if let Some(id) = r.request_id {
            attributes.push(KeyValue::new("gateway.request_id", id.to_string()));
        }
        if let Some(host) = r.host {
            attributes.push(KeyValue::new("server.host", host.to_string()));
        }
        let name = match r.route {
            Some(route) => format!("{} {route}", r.method),
            None => r.method.to_string(),
        };
        let builder = self
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Server)
            .with_start_time(r.start)
            .with_attributes(attributes);
        let parent = match r.span.parent_id {
            Some(parent) => Context::new().with_remote_span_context(SpanContext::new(
                TraceId::from(r.span.trace_id),
                SpanId::from(parent),
                TraceFlags::SAMPLED,
                true,
                TraceState::default(),
            )),
            None => Context::new(),
        };
        NEXT_IDS.with(|ids| ids.set(Some((r.span.trace_id, r.span.span_id))));
        let mut span = self.tracer.build_with_context(builder, &parent);
        NEXT_IDS.with(|ids| ids.set(None));
        if r.status >= 500 || r.status == 0 {
            span.set_status(Status::error(""));
        }
        // Ending hands it to the batch processor's queue.
        span.end_with_timestamp(r.end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_round_trip() {
        let v = format_traceparent(0x4bf92f3577b34da6a3ce929d0e0e4736, 0x00f067aa0ba902b7, 1);
        assert_eq!(
            v.to_str().unwrap(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        assert_eq!(
            parse_traceparent(v.as_bytes()),
            Some((0x4bf92f3577b34da6a3ce929d0e0e4736, 0x00f067aa0ba902b7, 1))
        );
        assert_eq!(parse_traceparent(b"00-0000-00"), None);
        assert_eq!(
            parse_traceparent(b"00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            None
        );
        // A later version with an extra field is understood.
        assert_eq!(
            parse_traceparent(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03-x")
                .map(|t| t.2),
            Some(3)
        );
    }
}
