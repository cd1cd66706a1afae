//! The handlers' connections, each behind one pointer.
//!
//! hyper's HTTP/2 client spawns two tasks for every request (one pipes the
//! body to its stream, one waits for the answer), and each of them is as
//! large as the connection's own task, which holds the connection's stream
//! by value: a TLS stream is 1,104 bytes. [`Boxed`] wraps the connector so
//! that the stream lives in a box of its own, once per connection, and
//! every such task is smaller by that much (BENCHMARKS.md, "A connection
//! behind one pointer"; hyper-util's request future does not hold the
//! stream and is unchanged).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::TryFutureExt as _;
use futures_util::future::MapOk;
use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection};

/// A connector whose connections are [`BoxedStream`]s.
#[derive(Clone, Debug)]
pub struct Boxed<C>(pub C);

impl<C> tower_service::Service<Uri> for Boxed<C>
where
    C: tower_service::Service<Uri>,
{
    type Response = BoxedStream<C::Response>;
    type Error = C::Error;
    type Future = MapOk<C::Future, fn(C::Response) -> BoxedStream<C::Response>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let boxed: fn(C::Response) -> BoxedStream<C::Response> = |stream| BoxedStream(Box::new(stream));
        self.0.call(dst).map_ok(boxed)
    }
}

/// A connection's stream in a box: what it reads, writes and says of
/// itself (the address, whether ALPN chose HTTP/2) is the stream's.
#[derive(Debug)]
pub struct BoxedStream<T>(Box<T>);

impl<T: Read + Unpin> Read for BoxedStream<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: ReadBufCursor<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl<T: Write + Unpin> Write for BoxedStream<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write_vectored(cx, bufs)
    }
}

impl<T: Connection> Connection for BoxedStream<T> {
    fn connected(&self) -> Connected {
        self.0.connected()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper_rustls::MaybeHttpsStream;
    use hyper_util::rt::TokioIo;

    /// What the client's tasks hold of a connection is one pointer, where
    /// the TLS stream itself is over a kilobyte.
    #[test]
    fn a_connection_is_held_by_one_pointer() {
        type Tls = MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>;
        assert!(size_of::<Tls>() > 1_000, "{} bytes", size_of::<Tls>());
        assert_eq!(size_of::<BoxedStream<Tls>>(), size_of::<usize>());
    }
}
