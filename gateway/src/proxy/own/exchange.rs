//! One exchange with an HTTP/1 upstream for a request without a body, as Pingora's proxy makes
//! it for such a request (its `proxy_1to1` and the exchange in turn of the carried patch):
//! the head prepared by Pingora's rules around `upstream_request_filter` (the fields the
//! gateway adds written after the head's own, not through its map), the empty body
//! through `request_body_filter`, then the response's parts as they are read (those already
//! read written together, so a head and its body go out in one write) through the response
//! callbacks, while the client connection is watched for a close.

use super::Ctx;
use crate::headers::{first_values, FieldLines};
use crate::proxy::Gateway;
use futures_util::FutureExt;
use pingora::http::ResponseHeader;
use pingora::protocols::http::v1::client::HttpSession as Upstream;
use pingora::protocols::http::HttpTask;
use pingora::proxy::{
    finish_h1_upstream_request, h1_upstream_request, push_task, ProxyHttp, Session,
};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType, Result};

/// The most response parts written in one go (Pingora's task buffer).
const BATCH: usize = 4;

/// How an exchange ended.
pub(super) struct Done {
    /// The client connection may carry another request.
    pub downstream_reusable: bool,
    /// The upstream connection may carry another request.
    pub upstream_reusable: bool,
    pub error: Option<Box<Error>>,
}

impl Done {
    fn failed(upstream_reusable: bool, e: Box<Error>) -> Done {
        Done {
            downstream_reusable: false,
            upstream_reusable,
            error: Some(e),
        }
    }
}

pub(super) async fn exchange(
    gw: &Gateway,
    session: &mut Session,
    up: &mut Upstream,
    peer: &HttpPeer,
    ctx: &mut Ctx,
) -> Done {
    up.read_timeout = peer.options.read_timeout;
    up.write_timeout = peer.options.write_timeout;
    let keep_case = ctx
        .rt
        .as_ref()
        .is_some_and(|rt| rt.forwarding.preserve_header_case);
    up.set_keep_header_case(keep_case);
    let mut lines = FieldLines::default();
    let req = match upstream_head(gw, session, peer, ctx, &mut lines) {
        Ok(req) => req,
        // Nothing was written: the connection is as good as it was.
        Err(e) => return Done::failed(true, e),
    };
    let written = up.write_request_header_with(Box::new(req), lines.as_slice());
    if let Err(e) = written.await {
        return Done::failed(false, e.into_up());
    }
    // The empty body goes through the request body filter, as Pingora passes it on.
    let mut body = None;
    if let Err(e) = gw.on_request_body(&mut body, true, ctx) {
        return Done::failed(false, e);
    }
    if let Err(e) = send_body(up, body).await {
        // As Pingora does: the upstream may still have answered; its answer is read.
        tracing::warn!("send error, draining read buf: {e}");
        let mut done = respond(gw, session, up, ctx, Some(e.into_up())).await;
        done.upstream_reusable = false;
        return done;
    }
    respond(gw, session, up, ctx, None).await
}

/// What the request body filter left (nothing, for a request without a body), and the body's
/// end.
async fn send_body(up: &mut Upstream, body: Option<bytes::Bytes>) -> Result<()> {
    if let Some(data) = body {
        up.write_body(&data).await?;
    }
    up.finish_body().await?;
    Ok(())
}

/// The upstream's request head: Pingora's preparation around `upstream_request_filter`, whose
/// added fields may go into `lines`, written after the head's own.
fn upstream_head(
    gw: &Gateway,
    session: &mut Session,
    peer: &HttpPeer,
    ctx: &mut Ctx,
    lines: &mut FieldLines,
) -> Result<pingora::http::RequestHeader> {
    let mut req = h1_upstream_request(session, peer)?;
    gw.on_upstream_request(session, &mut req, ctx, Some(lines))?;
    finish_h1_upstream_request(session, &mut req, false)?;
    Ok(req)
}

/// Reads the response and writes it to the client, part by part, until it ends; the client
/// connection is watched for a close meanwhile. `send_error` is an error writing the request,
/// reported if reading the response fails too.
async fn respond(
    gw: &Gateway,
    session: &mut Session,
    up: &mut Upstream,
    ctx: &mut Ctx,
    mut send_error: Option<Box<Error>>,
) -> Done {
    let mut upstream_reusable = true;
    let mut tasks = Vec::new();
    let mut response_done = false;
    while !response_done {
        tokio::select! {
            read = up.read_response_task() => {
                let (mut end, mut failed) = push_task(read, &mut tasks, &mut send_error);
                // Take what is already read, so a head and its body go out in one write.
                while !end && tasks.len() < BATCH {
                    let Some(read) = tokio::task::unconstrained(up.read_response_task())
                        .now_or_never()
                    else {
                        break;
                    };
                    (end, failed) = push_task(read, &mut tasks, &mut send_error);
                }
                response_done = end;
                if failed {
                    // The response's framing was not read to its end.
                    upstream_reusable = false;
                }
                let client_done = match write_tasks(gw, session, ctx, &mut tasks).await {
                    Ok(done) => done,
                    Err(e) => return Done::failed(false, e),
                };
                if client_done && !response_done {
                    // The client's answer ended by its own framing (a callback changed the
                    // status or the length): the rest of the upstream's is unread.
                    upstream_reusable = false;
                    break;
                }
            }
            read = session.downstream_session.read_body_or_idle(true) => {
                // With no body to read, only a close or an error ends the wait.
                if let Err(e) = read {
                    return Done::failed(false, e.into_down());
                }
            }
        }
    }
    let mut downstream_reusable = true;
    if let Err(e) = session.as_mut().finish_body().await {
        // A client's hang-up: routine (Pingora logs it as an error).
        tracing::debug!("Error finish sending body to downstream: {e}");
        downstream_reusable = false;
    }
    Done {
        downstream_reusable,
        upstream_reusable,
        error: None,
    }
}

/// The parts through the response callbacks, then written to the client in one go: whether the
/// client's response is complete.
async fn write_tasks(
    gw: &Gateway,
    session: &mut Session,
    ctx: &mut Ctx,
    tasks: &mut Vec<HttpTask>,
) -> Result<bool> {
    for task in tasks.iter_mut() {
        match task {
            HttpTask::Header(header, end) => response_head(gw, session, header, *end, ctx)?,
            HttpTask::Body(data, end) => {
                if let Some(pause) = gw.upstream_response_body_filter(session, data, *end, ctx)? {
                    tokio::time::sleep(pause).await;
                }
                if let Some(pause) = gw.response_body_filter(session, data, *end, ctx)? {
                    tokio::time::sleep(pause).await;
                }
            }
            // Not read from an HTTP/1 upstream without an upgrade.
            HttpTask::UpgradedBody(..) => {
                return Error::e_explain(ErrorType::InvalidHTTPHeader, "an upgraded body")
                    .map_err(|e| e.into_up());
            }
            HttpTask::Trailer(_) | HttpTask::Done | HttpTask::Failed(_) => {}
        }
    }
    session.write_response_tasks(std::mem::take(tasks)).await
}

/// A response head through `upstream_response_filter` and `response_filter`, as Pingora's
/// proxy passes it, but for a `101`, refused before the callbacks as an invalid answer (the
/// request asked for no upgrade; Pingora passes it on). A body without framing (an HTTP/1.0
/// upstream's, ended by the close) is sent chunked so the client connection stays.
fn response_head(
    gw: &Gateway,
    session: &mut Session,
    header: &mut Box<ResponseHeader>,
    end: bool,
    ctx: &mut Ctx,
) -> Result<()> {
    if header.status == 101 {
        return Error::e_explain(
            ErrorType::InvalidHTTPHeader,
            "101 without an upgrade request",
        )
        .map_err(|e| e.into_up());
    }
    gw.on_upstream_response(header, ctx);
    let no_body = session.req_header().method == pingora::http::Method::HEAD
        || matches!(header.status.as_u16(), 204 | 304);
    let framed = || {
        let names = [
            &http::header::TRANSFER_ENCODING,
            &http::header::CONTENT_LENGTH,
        ];
        first_values(&header.headers, names) != [None, None]
    };
    if !no_body && !header.status.is_informational() && !end && !framed() {
        header.set_version(http::Version::HTTP_11);
        header.insert_header(http::header::TRANSFER_ENCODING, "chunked")?;
    }
    gw.on_response(session, header, ctx)?;
    if header.status == 101 {
        return Error::e_explain(
            ErrorType::InvalidHTTPHeader,
            "101 without an upgrade request",
        )
        .map_err(|e| e.into_in());
    }
    Ok(())
}
