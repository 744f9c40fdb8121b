//! Policies: what the gateway does to a request besides routing and forwarding it.
//!
//! A route (and a listener, for what applies before routing) compiles into a [`Pipeline`]: an
//! ordered list of [`Policy`] values, one enum variant per kind, matched in a loop (no vtable,
//! no allocation per request). Each policy may act in four places:
//!
//! - `on_request`: pass, or refuse with an [`Answer`] (written by `proxy::answer`, the one
//!   writer of the gateway's own answers). What a policy learns (a token's claims, a rate-limit
//!   quota) it leaves on the request context for the policies after it and the later phases.
//! - the request body: a policy that needs it arms it on the context (`body_limit`).
//! - `on_upstream_request`: headers added to or removed from what goes upstream.
//! - `on_response`: headers added to or removed from what goes to the client.
//! - the response body: `compress` arms an encoder on the context, which the proxy's response
//!   phases drive.
//!
//! A pipeline knows at compile time how many headers its policies may add and whether any of
//! them edits the upstream request or the response, so a route without policies pays nothing.
//! `docs/architecture.md` walks through adding a policy.

pub mod api_key;
pub mod basic_auth;
mod body_limit;
pub mod circuit_breaker;
pub mod compress;
pub mod concurrency;
pub mod cors;
pub mod error_pages;
pub mod forward_auth;
mod grpc_web;
pub mod headers;
mod hsts;
mod https_redirect;
pub mod ip_list;
mod jwt;
pub mod mirror;
mod rate_limit;
pub mod respond;
pub mod retry_budget;
pub mod split;
mod template;
mod window;

pub use api_key::ApiKey;
pub use basic_auth::BasicAuth;
pub use body_limit::BodyLimit;
pub use compress::{Compress, Compression};
pub use concurrency::{ConcurrencyLimit, ConcurrencySpec};
pub use cors::Cors;
pub use error_pages::{ErrorPage, ErrorPages};
pub use forward_auth::ForwardAuth;
pub use grpc_web::GrpcWeb;
pub use headers::HeaderRules;
pub use hsts::Hsts;
pub use https_redirect::HttpsRedirect;
pub use ip_list::IpList;
pub use jwt::Jwt;
pub use rate_limit::RateLimit;
pub use respond::{Redirect, Respond};
use std::sync::Arc;

use crate::headers::HeaderEdits;
use crate::proxy::answer::Answer;
use crate::proxy::context::RequestCtx;
use pingora::proxy::Session;

/// One compiled policy. A clone shares the policy's state (its buckets, caches, places).
#[derive(Clone)]
pub enum Policy {
    /// Plain-HTTP requests answered with a redirect to HTTPS (listener).
    HttpsRedirect(HttpsRedirect),
    /// `Strict-Transport-Security` on TLS responses (listener).
    Hsts(Hsts),
    /// Request body size (413).
    BodyLimit(BodyLimit),
    /// JWT bearer tokens (401/403/503).
    Jwt(Jwt),
    /// Rate limit (429).
    RateLimit(RateLimit),
    /// Allow and deny by client address (403).
    IpList(Arc<IpList>),
    /// Request and response header edits.
    Headers(Arc<HeaderRules>),
    /// A redirect built from the request.
    Redirect(Arc<Redirect>),
    /// A fixed answer.
    Respond(Arc<Respond>),
    /// Cross-origin requests.
    Cors(Arc<Cors>),
    /// Response compression.
    Compress(Arc<Compress>),
    /// API keys (401/403).
    ApiKey(Arc<ApiKey>),
    /// Users and passwords (401/429).
    BasicAuth(Arc<BasicAuth>),
    /// Requests in flight at once (503).
    Concurrency(Arc<ConcurrencyLimit>),
    /// An auth service asked about each request.
    ForwardAuth(Arc<ForwardAuth>),
    /// gRPC-Web translated to gRPC.
    GrpcWeb(GrpcWeb),
}

impl Policy {
    /// Passes the request on, or refuses it.
    async fn on_request(&self, session: &Session, ctx: &mut RequestCtx) -> Result<(), Answer> {
        match self {
            Policy::HttpsRedirect(p) => p.on_request(session, ctx),
            Policy::Hsts(_) => Ok(()),
            Policy::BodyLimit(p) => p.on_request(session, ctx),
            Policy::Jwt(p) => p.on_request(session, ctx).await,
            Policy::RateLimit(p) => p.on_request(session, ctx).await,
            Policy::IpList(p) => p.on_request(ctx),
            Policy::Headers(_) => Ok(()),
            Policy::Redirect(p) => p.on_request(session, ctx),
            Policy::Respond(p) => p.on_request(),
            Policy::Cors(p) => p.on_request(session, ctx),
            Policy::Compress(p) => p.on_request(session, ctx),
            Policy::ApiKey(p) => p.on_request(session, ctx),
            Policy::BasicAuth(p) => p.on_request(session, ctx).await,
            Policy::Concurrency(p) => p.on_request(ctx).await,
            Policy::ForwardAuth(p) => p.on_request(session, ctx).await,
            Policy::GrpcWeb(p) => p.on_request(ctx),
        }
    }

    /// Edits the headers that go upstream.
    fn on_upstream_request(
        &self,
        headers: &mut dyn HeaderEdits,
        ctx: &RequestCtx,
        uri: &http::Uri,
    ) -> pingora::Result<()> {
        match self {
            Policy::Jwt(p) => p.on_upstream_request(headers, ctx),
            Policy::Headers(p) => p.on_upstream_request(headers, ctx, uri),
            Policy::ApiKey(p) => p.on_upstream_request(headers, ctx),
            Policy::BasicAuth(p) => p.on_upstream_request(headers, ctx),
            Policy::ForwardAuth(p) => p.on_upstream_request(headers, ctx),
            _ => Ok(()),
        }
    }

    /// Edits the headers that go to the client.
    fn on_response(
        &self,
        headers: &mut dyn HeaderEdits,
        ctx: &RequestCtx,
        request: &http::HeaderMap,
    ) -> pingora::Result<()> {
        match self {
            Policy::Hsts(p) => p.on_response(headers, ctx),
            Policy::RateLimit(p) => p.on_response(headers, ctx),
            Policy::Headers(p) => p.on_response(headers, ctx),
            Policy::Cors(p) => p.on_response(headers, request),
            _ => Ok(()),
        }
    }

    /// Whether `on_upstream_request` does anything (the headers it adds, a token's claims,
    /// are counted per request).
    fn edits_upstream(&self) -> bool {
        match self {
            Policy::Jwt(_) | Policy::ApiKey(_) | Policy::BasicAuth(_) => true,
            Policy::ForwardAuth(p) => !p.response_headers.is_empty(),
            Policy::Headers(p) => !p.request.is_empty(),
            _ => false,
        }
    }

    /// Headers `on_response` may add.
    fn response_headers(&self) -> usize {
        match self {
            Policy::Hsts(_) => 1,
            Policy::RateLimit(_) => 2,
            // Removals alone add nothing but still need the response phase: count one.
            Policy::Headers(p) => p.response_adds().max(usize::from(!p.response.is_empty())),
            Policy::Cors(_) => 4,
            _ => 0,
        }
    }

    /// The policy's kind, as the configuration and `/routes` name it.
    pub fn kind(&self) -> &'static str {
        match self {
            Policy::HttpsRedirect(_) => "https_redirect",
            Policy::Hsts(_) => "hsts",
            Policy::BodyLimit(_) => "body_limit",
            Policy::Jwt(_) => "auth",
            Policy::RateLimit(_) => "rate_limit",
            Policy::IpList(_) => "ip_list",
            Policy::Headers(_) => "headers",
            Policy::Redirect(_) => "redirect",
            Policy::Respond(_) => "respond",
            Policy::Cors(_) => "cors",
            Policy::Compress(_) => "compress",
            Policy::ApiKey(_) => "api_key",
            Policy::BasicAuth(_) => "basic_auth",
            Policy::Concurrency(_) => "concurrency",
            Policy::ForwardAuth(_) => "forward_auth",
            Policy::GrpcWeb(_) => "grpc_web",
        }
    }
}

/// A route's or a listener's policies, in the order they run.
#[derive(Default)]
pub struct Pipeline {
    policies: Box<[Policy]>,
    /// Headers the response phase may add.
    response_headers: usize,
    /// Some policy edits the upstream request.
    edits_upstream: bool,
    /// Bodies of the gateway's own answers, by status.
    error_pages: Option<Arc<ErrorPages>>,
}

impl Pipeline {
    /// A pipeline running `policies` in order.
    pub fn new(policies: Vec<Policy>) -> Pipeline {
        Pipeline {
            response_headers: policies.iter().map(Policy::response_headers).sum(),
            edits_upstream: policies.iter().any(Policy::edits_upstream),
            policies: policies.into_boxed_slice(),
            error_pages: None,
        }
    }

    /// The pipeline with these error pages.
    pub fn with_error_pages(mut self, pages: Option<Arc<ErrorPages>>) -> Pipeline {
        self.error_pages = pages;
        self
    }

    /// The page for an answer with `status` the gateway makes itself, if one is set.
    pub fn error_page(&self, status: u16) -> Option<&ErrorPage> {
        self.error_pages.as_ref()?.get(status)
    }

    /// Whether it has anything to run or to answer with.
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty() && self.error_pages.is_none()
    }

    /// The policies, in order.
    pub fn policies(&self) -> &[Policy] {
        &self.policies
    }

    /// Runs every policy on the request until one refuses it.
    pub async fn on_request(&self, session: &Session, ctx: &mut RequestCtx) -> Result<(), Answer> {
        for policy in self.policies.iter() {
            policy.on_request(session, ctx).await?;
        }
        Ok(())
    }

    /// Whether some policy edits the upstream request.
    pub fn edits_upstream(&self) -> bool {
        self.edits_upstream
    }

    /// Lets every policy edit the headers that go upstream.
    pub fn on_upstream_request(
        &self,
        headers: &mut dyn HeaderEdits,
        ctx: &RequestCtx,
        uri: &http::Uri,
    ) -> pingora::Result<()> {
        if self.edits_upstream {
            for policy in self.policies.iter() {
                policy.on_upstream_request(headers, ctx, uri)?;
            }
        }
        Ok(())
    }

    /// How many headers the response phase may add (0: it edits nothing).
    pub fn response_headers(&self) -> usize {
        self.response_headers
    }

    /// Lets every policy edit the headers that go to the client.
    pub fn on_response(
        &self,
        headers: &mut dyn HeaderEdits,
        ctx: &RequestCtx,
        request: &http::HeaderMap,
    ) -> pingora::Result<()> {
        if self.response_headers > 0 {
            for policy in self.policies.iter() {
                policy.on_response(headers, ctx, request)?;
            }
        }
        Ok(())
    }
}
