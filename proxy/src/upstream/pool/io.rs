//! Upstream TCP: connecting a socket the way the proxy needs it, and a stream type that lets
//! the pool look at a connection while hyper owns it.
//!
//! hyper takes ownership of a connection's I/O object. To tell, before reusing a pooled
//! HTTP/1.1 connection, whether the backend already closed it (a FIN or RST that arrived while
//! the connection sat idle, which hyper may not have read yet), the pool keeps a second handle
//! on the same socket: [`SharedTcp`] is an `Arc<TcpStream>` that implements tokio's
//! `AsyncRead`/`AsyncWrite`, and [`peer_state`] peeks at the socket without consuming data.

use std::io;
use std::mem::MaybeUninit;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};

use crate::upstream::manager::UpstreamHooks;

/// Connects to `addr` with TCP_NODELAY, after handing the socket to
/// [`UpstreamHooks::on_upstream_socket`].
pub(crate) async fn connect(addr: SocketAddr, hooks: &dyn UpstreamHooks) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    hooks.on_upstream_socket(socket.as_fd());
    let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
    socket.connect(addr).await
}

/// What an idle connection's socket says about the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PeerState {
    /// Nothing to read: the connection can be reused.
    Quiet,
    /// The peer closed its side (FIN).
    Closed,
    /// Bytes arrived on a connection with no request outstanding (for TLS, typically a
    /// close_notify alert): not safe to reuse.
    UnexpectedData,
    /// The socket reports an error (e.g. a RST).
    Error,
}

/// One non-blocking `recv(MSG_PEEK)` of a byte: tells a live idle connection from one the
/// peer closed, without taking anything from the stream.
pub(crate) fn peer_state(tcp: &TcpStream) -> PeerState {
    let mut byte = [MaybeUninit::<u8>::uninit(); 1];
    match SockRef::from(tcp).peek(&mut byte) {
        Ok(0) => PeerState::Closed,
        Ok(_) => PeerState::UnexpectedData,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => PeerState::Quiet,
        Err(e) if e.kind() == io::ErrorKind::Interrupted => PeerState::Quiet,
        Err(_) => PeerState::Error,
    }
}

/// A TCP stream shared between hyper (which reads and writes it) and the pool (which only
/// peeks).
#[derive(Debug, Clone)]
pub(crate) struct SharedTcp(pub Arc<TcpStream>);

impl AsyncRead for SharedTcp {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let tcp = &*self.0;
        loop {
            ready!(tcp.poll_read_ready(cx))?;
            // `try_io` clears tokio's readiness when the read would block, so the next
            // `poll_read_ready` waits for the reactor instead of spinning.
            let read = tcp.try_io(Interest::READABLE, || {
                // SAFETY: `recv` only writes into the slice and returns how many bytes it
                // initialized; `assume_init` below covers exactly those.
                let unfilled = unsafe { buf.unfilled_mut() };
                SockRef::from(tcp).recv(unfilled)
            });
            match read {
                Ok(n) => {
                    // SAFETY: `recv` initialized the first `n` bytes of the unfilled part.
                    unsafe { buf.assume_init(n) };
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for SharedTcp {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let tcp = &*self.0;
        loop {
            ready!(tcp.poll_write_ready(cx))?;
            match tcp.try_write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return Poll::Ready(other),
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let tcp = &*self.0;
        loop {
            ready!(tcp.poll_write_ready(cx))?;
            match tcp.try_write_vectored(bufs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return Poll::Ready(other),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match SockRef::from(&*self.0).shutdown(Shutdown::Write) {
            Err(e) if e.kind() != io::ErrorKind::NotConnected => Poll::Ready(Err(e)),
            _ => Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::manager::NoHooks;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn shared_stream_round_trip_and_peek() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = connect(addr, &NoHooks).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let tcp = Arc::new(client);
        let mut io = SharedTcp(tcp.clone());
        assert_eq!(peer_state(&tcp), PeerState::Quiet);

        io.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");

        server.write_all(b"pong").await.unwrap();
        // Wait until the bytes are there, then check that peeking does not consume them.
        tcp.readable().await.unwrap();
        assert_eq!(peer_state(&tcp), PeerState::UnexpectedData);
        io.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");

        drop(server);
        let mut rest = Vec::new();
        io.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        assert_eq!(peer_state(&tcp), PeerState::Closed);
    }
}
