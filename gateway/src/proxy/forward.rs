//! The request as it goes upstream: the rewritten path, the policies' edits, identity headers
//! removed, and the fields the gateway adds (the request id, `traceparent`, the forwarding
//! fields). The added fields go into the head's header map, or, given [`FieldLines`] (the own
//! path), into lines written after the head's own fields, which spares the map's inserts.

use super::context::RequestCtx;
use crate::config::ForwardingConfig;
use crate::headers::{
    carries_added_fields, edit_request, forwarded_lines, set_forwarded_headers, FieldLines,
    Forwarded, HeaderEdits, ADDED_REQUEST_HEADERS, TRACEPARENT, TRACESTATE, X_REQUEST_ID,
};
use crate::policy::Pipeline;
use crate::runtime::Route;
use http::HeaderValue;
use pingora::http::RequestHeader;
use pingora::proxy::Session;
use pingora::{Error, ErrorType, Result};

/// Edits `up` for its upstream. With `lines`, the added fields are written there when the head
/// carries none of them (after the policies' edits); otherwise, and without `lines`, they go
/// into the map, replacing or extending the client's.
pub(super) fn edit_upstream_request(
    session: &Session,
    up: &mut RequestHeader,
    ctx: &RequestCtx,
    lines: Option<&mut FieldLines>,
) -> Result<()> {
    if ctx.new_path.is_some() || ctx.new_query.is_some() {
        rewrite_target(up, ctx)?;
    }
    let Some(rt) = ctx.rt.as_ref() else {
        return Ok(());
    };
    let Some(route) = ctx.route() else {
        return Ok(());
    };
    let edits = Edits {
        listener: ctx.listener.map(|i| &rt.listeners[i as usize].1),
        route,
        identity_headers: &rt.identity_headers,
        forwarding: rt.forwarding,
        request_id: ctx.request_id.as_ref().filter(|_| rt.forwarding.request_id),
        from: Forwarded {
            client_ip: ctx.client_ip,
            peer: session
                .client_addr()
                .and_then(|a| a.as_inet())
                .map(|a| a.ip()),
            peer_trusted: ctx.peer_trusted,
            tls: ctx.tls,
        },
        ctx,
    };
    let edits_map = edits.edits_map();
    if !edits_map && !edits.adds_fields() {
        return Ok(());
    }
    let preserve_case = edits.forwarding.preserve_header_case;
    let Some(lines) = lines else {
        let adds = ADDED_REQUEST_HEADERS + ctx.claims.len();
        return edit_request(up, preserve_case, adds, |headers, uri| {
            edits.policies(headers, uri)?;
            edits.added(headers, uri)
        });
    };
    // A head read without its names' spelling (`preserve_header_case` off) needs no edit to
    // go out in canonical case.
    if edits_map {
        edit_request(up, preserve_case, ctx.claims.len(), |headers, uri| {
            edits.policies(headers, uri)
        })?;
    }
    if carries_added_fields(&up.headers) {
        // The client's (or a policy's) copies are replaced or extended in the map.
        return edit_request(up, preserve_case, ADDED_REQUEST_HEADERS, |headers, uri| {
            edits.added(headers, uri)
        });
    }
    edits.added_lines(&up.headers, &up.uri, lines)
}

/// The rewritten path and query as the request's target.
fn rewrite_target(up: &mut RequestHeader, ctx: &RequestCtx) -> Result<()> {
    let path = ctx.new_path.as_deref().unwrap_or(up.uri.path());
    let uri = match ctx.new_query.as_deref().or(up.uri.query()) {
        Some(q) if !q.is_empty() => format!("{path}?{q}"),
        _ => path.to_string(),
    };
    up.set_uri(uri.parse().map_err(|_| {
        Error::explain(
            ErrorType::HTTPStatus(400),
            "rewritten path is not a valid URI",
        )
    })?);
    Ok(())
}

/// What goes into a request's upstream head, settled before any edit.
struct Edits<'a> {
    listener: Option<&'a Pipeline>,
    route: &'a Route,
    identity_headers: &'a [http::HeaderName],
    forwarding: ForwardingConfig,
    request_id: Option<&'a HeaderValue>,
    from: Forwarded,
    ctx: &'a RequestCtx,
}

impl Edits<'_> {
    /// Whether the policies edit the head's fields (a token's claims, header policies, identity
    /// headers removed).
    fn edits_map(&self) -> bool {
        self.route.policies.edits_upstream()
            || self.listener.is_some_and(|l| l.edits_upstream())
            || !self.identity_headers.is_empty()
    }

    /// Whether the gateway adds fields of its own.
    fn adds_fields(&self) -> bool {
        self.forwarding.x_forwarded
            || self.request_id.is_some()
            || self.ctx.new_traceparent.is_some()
    }

    /// The listener's and the route's edits, and identity headers the token did not set
    /// removed.
    fn policies(&self, headers: &mut dyn HeaderEdits, uri: &http::Uri) -> Result<()> {
        if let Some(listener) = self.listener {
            listener.on_upstream_request(headers, self.ctx, uri)?;
        }
        self.route
            .policies
            .on_upstream_request(headers, self.ctx, uri)?;
        // Identity headers come from verified tokens only, never from the client: the headers
        // a token's claims did not set are removed.
        for name in self.identity_headers {
            if !self.ctx.claims.iter().any(|(claimed, _)| claimed == name) {
                headers.unset(name);
            }
        }
        Ok(())
    }

    /// The request id, `traceparent` and the forwarding fields.
    fn added(&self, headers: &mut dyn HeaderEdits, uri: &http::Uri) -> Result<()> {
        if let Some(id) = self.request_id {
            headers.set(&X_REQUEST_ID, id.clone())?;
        }
        if let Some(tp) = &self.ctx.new_traceparent {
            // A trace state without a valid parent belongs to no trace.
            if !self.ctx.keep_tracestate {
                headers.unset(&TRACESTATE);
            }
            headers.set(&TRACEPARENT, tp.clone())?;
        }
        if self.forwarding.x_forwarded {
            set_forwarded_headers(headers, uri, self.from)?;
        }
        Ok(())
    }

    /// [`Edits::added`] as lines, for a head that carries none of the added fields
    /// ([`carries_added_fields`]): each is new, so none is looked up, replaced or extended,
    /// and no trace state is there to drop.
    fn added_lines(
        &self,
        head: &http::HeaderMap,
        uri: &http::Uri,
        lines: &mut FieldLines,
    ) -> Result<()> {
        lines.clear();
        if let Some(id) = self.request_id {
            lines.push(&X_REQUEST_ID, id.clone())?;
        }
        if let Some(tp) = &self.ctx.new_traceparent {
            lines.push(&TRACEPARENT, tp.clone())?;
        }
        if self.forwarding.x_forwarded {
            forwarded_lines(head, uri, self.from, lines)?;
        }
        Ok(())
    }
}
