// Copyright 2026 Cloudflare, Inc.
//
// Licensed under the Apache License, Version 2.0 (the "License");
// you may not use this file except in compliance with the License.
// You may obtain a copy of the License at
//
// http://www.apache.org/licenses/LICENSE-2.0
//
// Unless required by applicable law or agreed to in writing, software
// distributed under the License is distributed on an "AS IS" BASIS,
// WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
// See the License for the specific language governing permissions and
// limitations under the License.

//! For an application with a request path of its own for some HTTP/1 requests, which hands the
//! others to the proxy: a session made as the proxy makes one, the proxy's HTTP/1 upstream
//! connections (its per-thread idle lists and its connector), and the upstream request head
//! prepared by the proxy's own rules (hop-by-hop fields, `Host` and the authority, framing).
//! A request handed on after `request_filter` goes to [`HttpProxy::process_filtered`].

use super::*;
use pingora_core::protocols::http::authority::{raw_target_authority, validate_request_authority};
use proxy_common::{
    finalize_h1_upstream_request_framing, reconcile_upstream_authority,
    sanitize_h1_upstream_request, set_h1_host_from_authority,
};

impl<SV, C> HttpProxy<SV, C>
where
    C: custom::Connector,
{
    /// A session for a request the application has read from `downstream` (with
    /// [`HttpProxy::handle_new_request`]), with the proxy's downstream modules and shutdown
    /// flag, as `process_new_http` makes it.
    pub fn new_session(&self, downstream: Box<HttpSession>) -> Session {
        Session::new(
            downstream,
            &self.downstream_modules,
            #[cfg(feature = "upstream_modules")]
            &self.upstream_modules,
            self.shutdown_flag.clone(),
        )
    }

    /// The application the proxy drives (its `ProxyHttp`).
    pub fn app(&self) -> &SV {
        &self.inner
    }

    /// The most attempts the proxy gives a request (the server's `max_retries`).
    pub fn max_retries(&self) -> usize {
        self.max_retries
    }

    /// An HTTP/1 connection to `peer`, and whether it was kept from an earlier request: from
    /// this thread's idle list, else from the connector (its pool, or a new connection). A
    /// peer that may use HTTP/2 is refused: its connection is the proxy's to drive.
    pub async fn h1_upstream(&self, peer: &HttpPeer) -> Result<(HttpSessionV1, bool)> {
        if self.idle_h1.serves(peer) {
            if let Some(stream) = self.idle_h1.take(peer) {
                return Ok((HttpSessionV1::new_with_options(stream, peer), true));
            }
        }
        match self.client_upstream.get_http_session(peer).await? {
            (ClientSession::H1(h1), reused) => Ok((h1, reused)),
            (other, _) => {
                self.client_upstream
                    .release_http_session(other, peer, peer.idle_timeout())
                    .await;
                Error::e_explain(InternalError, "not an HTTP/1 connection")
            }
        }
    }

    /// Keeps `h1` for another request after an exchange that left it reusable, as the proxy
    /// keeps its own: this thread's idle list, else the connector's pool.
    pub async fn release_h1_upstream(&self, mut h1: HttpSessionV1, peer: &HttpPeer) {
        if self.idle_h1.serves(peer) {
            h1.respect_keepalive();
            if let Some(stream) = h1.reuse().await {
                self.idle_h1.put(peer, stream);
            }
        } else {
            self.client_upstream
                .release_http_session(ClientSession::H1(h1), peer, peer.idle_timeout())
                .await;
        }
    }
}

/// The request head for an HTTP/1 upstream, before the application's
/// `upstream_request_filter`: the client's head as HTTP/1.1, the fields the peer's request
/// policy removes (hop-by-hop, those `Connection` nominates) removed.
pub fn h1_upstream_request(session: &Session, peer: &HttpPeer) -> Result<RequestHeader> {
    let downstream = session.req_header();
    let mut req = downstream.clone();
    req.set_version(Version::HTTP_11);
    sanitize_h1_upstream_request(
        &mut req,
        peer.options.http_upstream_request_policy,
        downstream.version == Version::HTTP_11,
    )
    .map_err(|e| e.into_down())?;
    Ok(req)
}

/// The same head after `upstream_request_filter`: `Host` and the authority reconciled and
/// checked, and the framing of a body (`has_body`), as the proxy finishes its own.
pub fn finish_h1_upstream_request(
    session: &Session,
    req: &mut RequestHeader,
    has_body: bool,
) -> Result<()> {
    let downstream_had_host = session.req_header().headers.contains_key(header::HOST);
    reconcile_upstream_authority(req).map_err(|e| e.into_in())?;
    let target_has_authority = raw_target_authority(req.raw_path()).authority().is_some();
    if downstream_had_host || req.uri.authority().is_some() || target_has_authority {
        set_h1_host_from_authority(req).map_err(|e| e.into_in())?;
    }
    validate_request_authority(req).map_err(|e| e.into_in())?;
    finalize_h1_upstream_request_framing(req, has_body)
}
