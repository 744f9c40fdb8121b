//! `max_request_body` (a route's, else `limits.max_request_body`): a declared
//! `Content-Length` over the limit is refused before the upstream is asked; a body that grows
//! past it while streaming ends the request with 413.

use crate::proxy::answer::{After, Answer};
use crate::proxy::context::RequestCtx;
use bytes::Bytes;
use pingora::proxy::Session;
use pingora::{Error, ErrorType};

/// The compiled limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyLimit {
    /// Request body bytes allowed.
    pub max: u64,
}

impl BodyLimit {
    /// Refuses a declared length over the limit, else arms the streaming count.
    pub(super) fn on_request(&self, session: &Session, ctx: &mut RequestCtx) -> Result<(), Answer> {
        let headers = &session.req_header().headers;
        let declared = headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| std::str::from_utf8(v.as_bytes()).ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max) {
            let expects_continue = headers
                .get(http::header::EXPECT)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
            // A client waiting for our word before sending the body will not send it; one that
            // sends it anyway is read to the end for a while, so the answer is not reset.
            let after = if expects_continue {
                After::Close
            } else {
                After::DrainBody
            };
            return Err(Answer::status(413).then(after));
        }
        ctx.body_limit = Some(self.max);
        Ok(())
    }

    /// Counts a chunk of the request body against the limit armed on `ctx`.
    pub fn on_body(ctx: &mut RequestCtx, chunk: Option<&Bytes>) -> pingora::Result<()> {
        if let (Some(max), Some(chunk)) = (ctx.body_limit, chunk) {
            ctx.body_received += chunk.len() as u64;
            if ctx.body_received > max {
                // The client's fault: marked so, Pingora stops at once whatever the upstream
                // protocol (on HTTP/2 it would otherwise only log an upstream send error).
                return Err(Error::create(
                    ErrorType::HTTPStatus(413),
                    pingora::ErrorSource::Downstream,
                    Some("request body larger than the route allows".into()),
                    None,
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_streamed_body_is_counted_against_the_armed_limit() {
        let mut ctx = RequestCtx::default();
        let chunk = Bytes::from_static(b"12345");
        // Not armed: nothing is counted.
        BodyLimit::on_body(&mut ctx, Some(&chunk)).unwrap();
        assert_eq!(ctx.body_received, 0);
        ctx.body_limit = Some(8);
        BodyLimit::on_body(&mut ctx, Some(&chunk)).unwrap();
        BodyLimit::on_body(&mut ctx, None).unwrap();
        let err = BodyLimit::on_body(&mut ctx, Some(&chunk)).unwrap_err();
        assert_eq!(*err.etype(), ErrorType::HTTPStatus(413));
    }
}
