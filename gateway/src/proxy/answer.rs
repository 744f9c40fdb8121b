//! Every answer the gateway writes itself: refusals from the head checks and the policies,
//! redirects, `404 no route`, and the upstream failures of `fail_to_proxy`. One writer, so
//! every such answer carries the JSON error shape with the request id (a redirect, with no
//! body, carries neither) and the right connection handling.

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::Result;
use std::borrow::Cow;
use std::time::Duration;

/// How long the body of a request refused with 413 is read and discarded after the answer.
const BODY_DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// What happens to the client connection after the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    /// Kept for the next request.
    KeepAlive,
    /// Closed: after a malformed head nothing that follows on it can be trusted, and a
    /// client waiting on `Expect: 100-continue` would otherwise wait for nothing.
    Close,
    /// The request body the client sends anyway is read and discarded for a while (nginx's
    /// lingering close), then the connection is reused or, past that, closed.
    DrainBody,
}

/// An answer the gateway writes instead of forwarding the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The status code.
    pub status: u16,
    /// The JSON error's message; `None` for an answer with an empty body (a redirect).
    pub message: Option<Cow<'static, str>>,
    /// Headers besides `Content-Type`, `Content-Length` and `X-Request-Id`.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The connection after it.
    pub after: After,
    /// A body of its own with its content type, in place of the JSON error (`respond`).
    pub fixed: Option<std::sync::Arc<(HeaderValue, Bytes)>>,
}

impl Answer {
    /// A JSON error answer; the connection is kept.
    pub fn error(status: u16, message: impl Into<Cow<'static, str>>) -> Answer {
        Answer {
            status,
            message: Some(message.into()),
            headers: Vec::new(),
            after: After::KeepAlive,
            fixed: None,
        }
    }

    /// A JSON error answer with the standard message for `status`.
    pub fn status(status: u16) -> Answer {
        Answer::error(status, message_for(status))
    }

    /// An answer with no body (redirects).
    pub fn empty(status: u16) -> Answer {
        Answer {
            status,
            message: None,
            headers: Vec::new(),
            after: After::KeepAlive,
            fixed: None,
        }
    }

    /// An answer with a body of its own (`respond`).
    pub fn fixed(status: u16, content: std::sync::Arc<(HeaderValue, Bytes)>) -> Answer {
        Answer {
            fixed: Some(content),
            ..Answer::empty(status)
        }
    }

    /// The answer with one more header.
    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Answer {
        self.headers.push((name, value));
        self
    }

    /// The answer, then what happens to the connection.
    pub fn then(mut self, after: After) -> Answer {
        self.after = after;
        self
    }

    /// The JSON body: `{"error":…,"status":…,"request_id":…}`.
    fn body(&self, request_id: Option<&HeaderValue>) -> Option<Bytes> {
        use crate::accesslog::put_text;
        let message = self.message.as_deref()?;
        let id = request_id.map_or(&[][..], |v| v.as_bytes());
        let mut out = Vec::with_capacity(64 + message.len() + id.len());
        out.extend_from_slice(b"{\"error\":");
        put_text(&mut out, message.as_bytes());
        out.extend_from_slice(format!(",\"status\":{},\"request_id\":", self.status).as_bytes());
        put_text(&mut out, id);
        out.extend_from_slice(b"}\n");
        Some(Bytes::from(out))
    }
}

/// The standard message of the gateway's own error answers.
pub fn message_for(status: u16) -> &'static str {
    match status {
        400 => "bad request",
        404 => "no route",
        408 => "request timeout",
        413 => "request body too large",
        431 => "request header fields too large",
        502 => "bad gateway",
        503 => "no healthy upstream",
        504 => "upstream timeout",
        _ => "error",
    }
}

/// What a gateway answer takes from the request's listener and route: its error page, and the
/// response edits of their policies (CORS, header rules, HSTS), so that a refusal a browser
/// reads carries them too.
#[derive(Default)]
pub struct Dressing<'a> {
    /// The page for the answer's status.
    pub page: Option<&'a crate::policy::ErrorPage>,
    /// The listener's and the route's pipelines, in that order.
    pub pipelines: [Option<&'a crate::policy::Pipeline>; 2],
    /// The request's context.
    pub ctx: Option<&'a crate::proxy::context::RequestCtx>,
}

/// Writes `answer` to the client, with `request_id` in the body and as `X-Request-Id`.
pub async fn write(
    session: &mut Session,
    answer: &Answer,
    request_id: Option<&HeaderValue>,
    dressing: Dressing<'_>,
) -> Result<()> {
    let page = dressing.page;
    connection_after(session, answer.after);
    if let Some(call) = dressing.ctx.and_then(|c| c.grpc.as_deref()) {
        return write_grpc(session, answer, call, request_id, dressing).await;
    }
    let (body, content_type) = match (answer.fixed.as_deref(), page) {
        (Some((content_type, body)), _) => (Some(body.clone()), content_type.clone()),
        // A JSON error answer, replaced by the configured page.
        (None, Some(page)) if answer.message.is_some() => (
            Some(page.render(answer.status, request_id)),
            page.content_type.clone(),
        ),
        _ => (
            answer.body(request_id),
            HeaderValue::from_static("application/json"),
        ),
    };
    let mut resp = ResponseHeader::build(answer.status, Some(3 + answer.headers.len()))?;
    if body.is_some() {
        resp.insert_header(http::header::CONTENT_TYPE, content_type)?;
    }
    resp.insert_header(
        http::header::CONTENT_LENGTH,
        body.as_ref().map_or(0, Bytes::len),
    )?;
    if let (Some(id), true) = (request_id, body.is_some()) {
        resp.insert_header("X-Request-Id", id.clone())?;
    }
    own_headers_and_edits(session, &mut resp, answer, &dressing)?;
    match body {
        Some(body) => {
            session.write_response_header(Box::new(resp), false).await?;
            session.write_response_body(Some(body), true).await
        }
        None => session.write_response_header(Box::new(resp), true).await,
    }
}

/// The answer's own headers, then the listener's and route's response edits.
fn own_headers_and_edits(
    session: &Session,
    resp: &mut ResponseHeader,
    answer: &Answer,
    dressing: &Dressing<'_>,
) -> Result<()> {
    for (name, value) in &answer.headers {
        resp.insert_header(name.clone(), value.clone())?;
    }
    if let Some(ctx) = dressing.ctx {
        let request = &session.req_header().headers;
        for pipeline in dressing.pipelines.iter().flatten() {
            pipeline.on_response(resp, ctx, request)?;
        }
    }
    Ok(())
}

/// What happens to the client connection after the answer.
fn connection_after(session: &mut Session, after: After) {
    match after {
        After::KeepAlive => {}
        After::Close => session.set_keepalive(None),
        After::DrainBody => {
            let downstream = session.as_downstream_mut();
            downstream.set_close_on_response_before_downstream_finish(false);
            downstream.set_total_drain_timeout(Some(BODY_DRAIN_LIMIT));
        }
    }
}

/// The answer to a gRPC call: trailers-only, the status mapped from `answer`'s, its headers
/// (`WWW-Authenticate`, `Retry-After`), the request id, and the pipelines' response edits
/// (CORS for gRPC-Web).
async fn write_grpc(
    session: &mut Session,
    answer: &Answer,
    call: &super::grpc::Call,
    request_id: Option<&HeaderValue>,
    dressing: Dressing<'_>,
) -> Result<()> {
    let message = answer
        .message
        .as_deref()
        .unwrap_or_else(|| message_for(answer.status));
    let http2 = session.as_downstream().is_http2();
    let status = call
        .status
        .unwrap_or_else(|| call.status_for(answer.status));
    let mut resp = super::grpc::answer_head(call, status, message, http2)?;
    if let Some(id) = request_id {
        resp.insert_header("X-Request-Id", id.clone())?;
    }
    own_headers_and_edits(session, &mut resp, answer, &dressing)?;
    session.write_response_header(Box::new(resp), true).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_json_body_carries_the_request_id_and_stays_json() {
        let id = HeaderValue::from_static("abc");
        let body = Answer::status(404).body(Some(&id)).unwrap();
        assert_eq!(
            &body[..],
            b"{\"error\":\"no route\",\"status\":404,\"request_id\":\"abc\"}\n"
        );
        let odd = Answer::error(400, "a \"quoted\"\nthing")
            .body(None)
            .unwrap();
        let parsed: serde_json::Value = serde_json::from_slice(&odd).unwrap();
        assert_eq!(parsed["error"], "a \"quoted\"\nthing");
        assert!(Answer::empty(308).body(Some(&id)).is_none());
    }
}
