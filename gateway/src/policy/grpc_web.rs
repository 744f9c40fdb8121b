//! `grpc_web`: gRPC-Web calls (`application/grpc-web`, `+proto`, `-text`) from browsers go to
//! the upstream as gRPC over HTTP/2, and its answers, trailers included, come back as gRPC-Web.
//! The translation itself is in `proxy::grpc`; this policy turns it on for a route.

use crate::proxy::answer::Answer;
use crate::proxy::context::RequestCtx;
use crate::proxy::grpc::Wire;

/// Turns the gRPC-Web bridge on for the route's gRPC-Web calls.
#[derive(Debug, Clone, Copy)]
pub struct GrpcWeb;

impl GrpcWeb {
    /// Marks a gRPC-Web call for translation; other requests pass untouched.
    pub fn on_request(&self, ctx: &mut RequestCtx) -> Result<(), Answer> {
        if let Some(call) = ctx.grpc.as_mut().filter(|c| c.wire != Wire::Grpc) {
            call.bridged = true;
        }
        Ok(())
    }
}
