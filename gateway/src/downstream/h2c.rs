//! HTTP/2 with prior knowledge (h2c) told from HTTP/1 on a cleartext connection.

use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::Stream;

pub(super) const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads as much of a cleartext connection's start as it takes to tell HTTP/2 with prior
/// knowledge (h2c) from HTTP/1, puts it back for the protocol to read, and says which it is
/// (true for HTTP/2). An HTTP/1 request differs from the 24-byte preface within its first
/// bytes (no method is `PRI`), so a short one, `GET / HTTP/1.0` and an empty line (18 bytes),
/// is told at once; Pingora's own check waits for 24 bytes, and such a request would wait
/// for the head deadline. A connection that starts the preface (`PRI `) and then breaks it, or
/// ends inside it, is closed (RFC 9113 section 3.4), never handed to the HTTP/1 parser. The
/// caller has checked that the stream is Pingora's TCP stream; `None` when the connection
/// fails or breaks the preface (a connection closed before its first byte is `Some(false)`,
/// and HTTP/1 sees the end of stream).
pub(super) async fn read_h2c_preface(stream: Stream) -> Option<(Stream, bool)> {
    use tokio::io::AsyncReadExt;
    let mut tcp = stream.into_any().downcast::<L4Stream>().ok()?;
    let mut start = [0u8; H2_PREFACE.len()];
    let mut len = 0;
    let is_h2 = loop {
        let read = tcp.read(&mut start[len..]).await.ok()?;
        len += read;
        let matched = common_prefix(&start[..len], H2_PREFACE);
        if matched < len || read == 0 {
            if matched >= PREFACE_COMMITTED {
                tracing::debug!("broken HTTP/2 preface: connection closed");
                return None;
            }
            break false;
        }
        if len == start.len() {
            break true;
        }
    };
    tcp.rewind(&start[..len]);
    Some((tcp, is_h2))
}

/// Bytes of the preface after which a connection is HTTP/2 or nothing: `PRI ` starts no
/// HTTP/1 request a server should take (RFC 9113 section 3.4 reserves the method).
const PREFACE_COMMITTED: usize = 4;

fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_started_preface_commits_the_connection() {
        assert_eq!(common_prefix(b"PRI * HTTP/2.0", H2_PREFACE), 14);
        assert_eq!(common_prefix(b"GET / HTTP/1.1", H2_PREFACE), 0);
        assert_eq!(common_prefix(b"PRI * HTTP/1.1", H2_PREFACE), 11);
        assert!(common_prefix(b"PRIX", H2_PREFACE) < PREFACE_COMMITTED);
        assert!(common_prefix(b"PRI ", H2_PREFACE) >= PREFACE_COMMITTED);
    }
}
