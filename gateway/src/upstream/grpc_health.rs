//! The gRPC health check (`grpc.health.v1.Health/Check`): one unary call per replica, healthy
//! when the answer is `SERVING` with `grpc-status: 0`.

use bytes::{BufMut, Bytes, BytesMut};
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use pingora::protocols::http::client::HttpSession;
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType, Result};
use prost::Message;
use std::net::SocketAddr;

/// `grpc.health.v1.HealthCheckRequest`.
#[derive(Clone, PartialEq, Message)]
struct HealthCheckRequest {
    #[prost(string, tag = "1")]
    service: String,
}

/// `grpc.health.v1.HealthCheckResponse`; `status` 1 is `SERVING`.
#[derive(Clone, PartialEq, Message)]
struct HealthCheckResponse {
    #[prost(int32, tag = "1")]
    status: i32,
}

const SERVING: i32 = 1;

/// A gRPC health check of one upstream's replicas.
pub struct GrpcHealthCheck {
    connector: Connector,
    /// The upstream's peer (TLS, ALPN), with the check's timeouts.
    template: HttpPeer,
    /// The request message, framed.
    body: Bytes,
    authority: String,
}

impl GrpcHealthCheck {
    /// A check asking about `service` (`""`: the server) with `template`'s connection settings.
    pub fn new(template: HttpPeer, service: &str, authority: &str) -> GrpcHealthCheck {
        let message = HealthCheckRequest {
            service: service.to_string(),
        }
        .encode_to_vec();
        let mut body = BytesMut::with_capacity(5 + message.len());
        body.put_u8(0);
        body.put_u32(message.len() as u32);
        body.put_slice(&message);
        GrpcHealthCheck {
            connector: Connector::new(None),
            template,
            body: body.freeze(),
            // An IPv6 literal is bracketed in an authority.
            authority: match authority.parse::<std::net::Ipv6Addr>() {
                Ok(_) => format!("[{authority}]"),
                Err(_) => authority.to_string(),
            },
        }
    }

    /// Checks the replica at `addr`: `Ok` when it is serving.
    pub async fn check(&self, addr: SocketAddr) -> Result<()> {
        let mut peer = self.template.clone();
        peer._address = pingora::protocols::l4::socket::SocketAddr::Inet(addr);
        let (session, _) = self.connector.get_http_session(&peer).await?;
        let HttpSession::H2(mut h2) = session else {
            return fail("the replica does not speak HTTP/2");
        };
        let mut req = RequestHeader::build("POST", b"/grpc.health.v1.Health/Check", Some(4))?;
        req.insert_header("content-type", "application/grpc")?;
        req.insert_header("te", "trailers")?;
        req.set_uri(
            http::Uri::builder()
                .scheme(if peer.is_tls() { "https" } else { "http" })
                .authority(self.authority.as_str())
                .path_and_query("/grpc.health.v1.Health/Check")
                .build()
                .map_err(|_| Error::explain(ErrorType::InternalError, "bad authority"))?,
        );
        h2.write_request_header(Box::new(req), false)?;
        h2.write_request_body(self.body.clone(), true).await?;
        h2.read_response_header().await?;
        let status = h2.response_header().map_or(0, |r| r.status.as_u16());
        if status != 200 {
            return fail("HTTP status is not 200");
        }
        let mut message = BytesMut::new();
        while let Some(chunk) = h2.read_response_body().await? {
            message.extend_from_slice(&chunk);
        }
        let trailers = h2.read_trailers().await?;
        let grpc_status = trailers
            .as_ref()
            .and_then(|t| t.get("grpc-status"))
            .or_else(|| {
                h2.response_header()
                    .and_then(|r| r.headers.get("grpc-status"))
            });
        if grpc_status.is_none_or(|s| s.as_bytes() != b"0") {
            return fail("grpc-status is not OK");
        }
        let serving = decode(&message).is_some_and(|r| r.status == SERVING);
        // The connection goes back to the pool for the next check.
        self.connector
            .release_http_session(HttpSession::H2(h2), &peer, None)
            .await;
        match serving {
            true => Ok(()),
            false => fail("not SERVING"),
        }
    }
}

/// The one message of a unary answer.
fn decode(framed: &[u8]) -> Option<HealthCheckResponse> {
    let (head, rest) = framed.split_at_checked(5)?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    // Compressed messages are never asked for (no `grpc-accept-encoding` sent).
    if head[0] != 0 || rest.len() != len {
        return None;
    }
    HealthCheckResponse::decode(rest).ok()
}

fn fail(why: &'static str) -> Result<()> {
    Error::e_explain(
        ErrorType::CustomCode("grpc health check", 0),
        format!("gRPC health check: {why}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_the_request_and_reads_only_a_whole_serving_answer() {
        let check = GrpcHealthCheck::new(
            HttpPeer::new("127.0.0.1:1", false, String::new()),
            "users",
            "users:50051",
        );
        assert_eq!(&check.body[..], b"\0\0\0\0\x07\x0a\x05users");
        assert_eq!(decode(b"\0\0\0\0\x02\x08\x01").unwrap().status, SERVING);
        assert_eq!(decode(b"\0\0\0\0\x02\x08\x02").unwrap().status, 2);
        assert!(decode(b"\0\0\0\0\x03\x08\x01").is_none());
        assert!(decode(b"\x01\0\0\0\x02\x08\x01").is_none());
        assert!(decode(b"\0\0").is_none());
        let v6 = GrpcHealthCheck::new(
            HttpPeer::new("127.0.0.1:1", false, String::new()),
            "",
            "::1",
        );
        assert_eq!(v6.authority, "[::1]");
    }
}
