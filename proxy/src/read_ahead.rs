//! The TLS side's socket, read ahead in TLS-record-sized portions.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

/// Bytes asked of the kernel per read on the TLS side: two full TLS 1.3 records as they arrive on
/// the wire (16 KiB of data plus 22 bytes of header, type and tag each).
const TLS_READ_SIZE: usize = 2 * (16 * 1024 + 22);

/// The TLS side's socket. rustls asks for at most 4 KiB per read, so a full 16 KiB record took
/// four or five recv calls, each of which can send the peer a window update and wake it; this
/// reads [`TLS_READ_SIZE`] per call instead and hands it over in rustls's portions. The buffer is
/// allocated only when the socket is readable and freed once rustls has taken every byte, so an
/// idle connection holds none.
pub struct ReadAhead {
    socket: TcpStream,
    buffered: Vec<u8>,
    taken: usize,
}

impl ReadAhead {
    pub fn new(socket: TcpStream) -> Self {
        Self {
            socket,
            buffered: Vec::new(),
            taken: 0,
        }
    }
}

impl AsyncRead for ReadAhead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.taken == this.buffered.len() {
            if out.remaining() >= TLS_READ_SIZE {
                return Pin::new(&mut this.socket).poll_read(cx, out);
            }
            // Allocated only once the socket says it is readable, not on every wake-up.
            this.buffered = loop {
                ready!(this.socket.poll_read_ready(cx))?;
                let mut fresh = Vec::with_capacity(TLS_READ_SIZE);
                match this.socket.try_read_buf(&mut fresh) {
                    // Empty is end of stream, passed on below as a read of nothing.
                    Ok(_) => break fresh,
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(error) => return Poll::Ready(Err(error)),
                }
            };
            this.taken = 0;
        }
        let n = out.remaining().min(this.buffered.len() - this.taken);
        out.put_slice(&this.buffered[this.taken..this.taken + n]);
        this.taken += n;
        if this.taken == this.buffered.len() {
            this.buffered = Vec::new();
            this.taken = 0;
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ReadAhead {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().socket).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().socket).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().socket).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().socket).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.socket.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn read_ahead_hands_out_every_byte_and_frees_its_buffer_when_drained() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        // A period prime to rustls's portion size, so a lost or repeated portion shows.
        let sent: Vec<u8> = (0..150_000u32).map(|i| (i % 251) as u8).collect();
        let to_send = sent.clone();
        let writer = tokio::spawn(async move {
            let mut peer = TcpStream::connect(address).await?;
            peer.write_all(&to_send).await?;
            peer.shutdown().await
        });
        let (socket, _) = listener.accept().await.expect("accept");
        let mut reader = ReadAhead::new(socket);
        let mut got = Vec::new();
        // rustls's portion size: smaller than a read-ahead, so the buffer is used.
        let mut portion = [0u8; 4096];
        loop {
            let n = reader.read(&mut portion).await.expect("read");
            if n == 0 {
                break;
            }
            got.extend_from_slice(&portion[..n]);
            if reader.taken == 0 {
                assert_eq!(reader.buffered.capacity(), 0, "drained buffer kept");
            }
        }
        writer.await.expect("writer task").expect("writer");
        assert!(got == sent, "bytes lost or reordered");
        assert_eq!(reader.buffered.capacity(), 0);
    }
}
