//! The TLS handshake of a client connection: bounded in time, and when it fails, why, as one of
//! a closed set of reasons (a metric label each).

use pingora::listeners::tls::Acceptor;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::Stream;
use std::time::Duration;

/// Why a handshake failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum HandshakeFailure {
    /// Not complete within the deadline.
    Timeout,
    /// Bytes that are not TLS, or not in order.
    Malformed,
    /// No protocol version or cipher suite in common.
    Incompatible,
    /// The client sent a fatal alert.
    Alert,
    /// No client certificate, or one that does not verify.
    ClientCertificate,
    /// The client went away.
    Closed,
    /// Anything else.
    Other,
}

impl HandshakeFailure {
    /// Every reason, in the order of `as usize`.
    pub(super) const ALL: [HandshakeFailure; 7] = [
        HandshakeFailure::Timeout,
        HandshakeFailure::Malformed,
        HandshakeFailure::Incompatible,
        HandshakeFailure::Alert,
        HandshakeFailure::ClientCertificate,
        HandshakeFailure::Closed,
        HandshakeFailure::Other,
    ];

    /// The metric label.
    pub(super) fn label(self) -> &'static str {
        match self {
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Malformed => "malformed",
            HandshakeFailure::Incompatible => "incompatible",
            HandshakeFailure::Alert => "alert",
            HandshakeFailure::ClientCertificate => "client_certificate",
            HandshakeFailure::Closed => "closed",
            HandshakeFailure::Other => "other",
        }
    }

    /// The reason of a failed handshake. Pingora keeps only the text of the TLS error
    /// (rustls' messages), so that is what is read.
    fn of(e: &pingora::Error) -> HandshakeFailure {
        let text = e.to_string();
        let has = |needle: &str| text.contains(needle);
        if has("peer is incompatible") || has("no protocols in common") {
            HandshakeFailure::Incompatible
        } else if has("received corrupt message") || has("received unexpected message") {
            HandshakeFailure::Malformed
        } else if has("received fatal alert") {
            HandshakeFailure::Alert
        } else if has("peer sent no certificates") || has("invalid peer certificate") {
            HandshakeFailure::ClientCertificate
        } else if has("eof") || has("reset") || has("broken pipe") || has("closed") {
            HandshakeFailure::Closed
        } else {
            HandshakeFailure::Other
        }
    }
}

/// The TLS handshake of a connection on a TLS listener, within `limit` (a client that opens a
/// connection and sends nothing holds it no longer than a slow request head).
pub(super) async fn tls_handshake(
    acceptor: &Acceptor,
    stream: Stream,
    limit: Duration,
) -> Result<Stream, HandshakeFailure> {
    // Pingora hands a plain listener's connections over as its own TCP stream type.
    if !stream.as_any().is::<L4Stream>() {
        return Err(HandshakeFailure::Other);
    }
    let Ok(tcp) = stream.into_any().downcast::<L4Stream>() else {
        return Err(HandshakeFailure::Other);
    };
    match tokio::time::timeout(limit, acceptor.tls_handshake(*tcp)).await {
        Ok(Ok(tls)) => Ok(Box::new(tls)),
        Ok(Err(e)) => {
            let reason = HandshakeFailure::of(&e);
            tracing::debug!(reason = reason.label(), error = %e, "TLS handshake failed");
            Err(reason)
        }
        Err(_) => Err(HandshakeFailure::Timeout),
    }
}

/// The protocol version as people write it (rustls names them `TLSv1_3`); rustls negotiates
/// no other.
pub(crate) fn tls_version(rustls_name: &str) -> Option<&'static str> {
    match rustls_name {
        "TLSv1_3" => Some("TLSv1.3"),
        "TLSv1_2" => Some("TLSv1.2"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::HandshakeFailure;
    use pingora::{Error, ErrorType};

    #[test]
    fn handshake_failures_get_bounded_reasons() {
        let reason = |text: &'static str| {
            HandshakeFailure::of(&Error::explain(ErrorType::TLSHandshakeFailure, text)).label()
        };
        assert_eq!(
            reason("tls connect error: received corrupt message of type InvalidContentType"),
            "malformed"
        );
        assert_eq!(
            reason("tls connect error: peer is incompatible: ServerDoesNotSupportTls12Or13"),
            "incompatible"
        );
        assert_eq!(
            reason("tls connect error: received fatal alert: UnknownCA"),
            "alert"
        );
        assert_eq!(
            reason("tls connect error: peer sent no certificates"),
            "client_certificate"
        );
        assert_eq!(reason("tls connect error: tls handshake eof"), "closed");
        assert_eq!(reason("something new"), "other");
    }

    #[test]
    fn every_reason_is_at_its_index() {
        for (i, r) in HandshakeFailure::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }
}
