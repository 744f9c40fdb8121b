//! Small writes held so that a response's head goes out with its body in one send.

use super::HeadGuard;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::AsyncWrite;

impl HeadGuard {
    /// Writes out the held bytes.
    pub(super) fn poll_write_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.held.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.held))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.held.drain(..n);
        }
        Poll::Ready(Ok(()))
    }
}

/// A write of up to this size, with nothing held, is held for the next flush or the next
/// write. Pingora writes a response's head, then its body, and flushes at the end (at once
/// after the head when the body is streamed); the stream under the guard buffers 1460 bytes,
/// so a head and a larger body went out in two sends (over TLS, two records as well), each
/// waking the client. Held, the head goes out with the body in one vectored write.
const HELD_WRITES_MAX: usize = 4096;

/// A held write and the next that together fit this are passed on one after the other, as
/// they were written: the stream under the guard buffers them and sends them at the flush.
const SMALL_RESPONSE_MAX: usize = 1460;

impl AsyncWrite for HeadGuard {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.held.is_empty() {
            if buf.len() > HELD_WRITES_MAX {
                return Pin::new(&mut this.inner).poll_write(cx, buf);
            }
            this.held.extend_from_slice(buf);
            return Poll::Ready(Ok(buf.len()));
        }
        if this.held.len() + buf.len() <= SMALL_RESPONSE_MAX {
            // A small response: its pieces go on as they were written, to be sent together
            // at the flush by the stream under the guard (sent as one piece, over TLS as one
            // record, a small response cost more kernel time: `bench/README.md`).
            ready!(this.poll_write_held(cx))?;
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        // The held bytes and this write together, in one vectored write when the stream
        // takes them so.
        while !this.held.is_empty() {
            let both = [io::IoSlice::new(&this.held), io::IoSlice::new(buf)];
            let n = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, &both))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            if n > this.held.len() {
                let of_buf = n - this.held.len();
                this.held.clear();
                return Poll::Ready(Ok(of_buf));
            }
            this.held.drain(..n);
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_write_held(cx))?;
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_write_held(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_write_held(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}
