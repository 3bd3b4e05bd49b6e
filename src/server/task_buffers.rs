//! The buffers of an async loop's thread, lent to one connection task at a time, so that a
//! waiting task holds none: 10,000 idle connections cost no read or output buffers.
//!
//! A task reads into the thread's one read buffer only once its socket is ready, and hands
//! the bytes to its `Connection` before it awaits again. The thread's spare output
//! allocation is lent to the connection producing replies and taken back once they are sent
//! (`Connection::lend_spare`, `return_spare`). A runtime that polls its sockets the way
//! tokio does (`AsyncRead`) reads through [`poll_receive`].

use super::read_buffer::ReadBuffer;
use super::{CloseReason, Connection, LoopLog, READ_BUFFER_BYTES};
use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

thread_local! {
    static READ_BUFFER: RefCell<ReadBuffer> = RefCell::new(ReadBuffer::new(READ_BUFFER_BYTES));
    static SPARE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// One connection's socket as its task sees it: one non-blocking read or write at a time,
/// `WouldBlock` when the kernel has nothing (or no room) now.
pub trait SocketIo {
    /// Reads into `buf`; `Ok(0)` is EOF.
    ///
    /// # Errors
    ///
    /// `WouldBlock`, or the OS error of the read.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize>;

    /// Writes a prefix of `bytes`, as much as the kernel takes now; returns its length.
    ///
    /// # Errors
    ///
    /// `WouldBlock`, or the OS error of the write.
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize>;
}

/// Reads from `socket` into this thread's read buffer, cut to what `connection` may take
/// under its bound, and hands what came (bytes, counted in `log`, or EOF for `Ok(0)`) to
/// `connection`; an echo goes straight back from the read buffer when nothing is owed
/// (`Connection::receive_through`, counted as sent). Returns whether the read took all it
/// asked for ([`Received`]), or `None` when it would block (nothing is handed over).
///
/// # Errors
///
/// Why the connection must close: the read or a write-through failed. A handler panic is
/// no error here: the connection stops reading and finishes as usual.
pub fn receive_into(
    connection: &mut Connection,
    log: &LoopLog,
    socket: &mut impl SocketIo,
) -> Result<Option<Received>, CloseReason> {
    READ_BUFFER.with_borrow_mut(|buf| {
        let buf = buf.first_mut(READ_BUFFER_BYTES);
        let limit = connection.read_limit(buf.len());
        let result = socket.read(&mut buf[..limit]);
        let got = match &result {
            Ok(n) => *n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(_) => 0,
        };
        if !connection.may_write_through() {
            SPARE.with_borrow_mut(|spare| connection.lend_spare(spare));
        }
        let handed_over =
            connection.on_read_through(result, buf, log, |bytes| socket.write(bytes))?;
        let received = Received {
            bytes: got,
            is_full: got > 0 && got == limit,
        };
        Ok(handed_over.then_some(received))
    })
}

/// What one read of a connection's socket found, for its task's turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// How many bytes came; 0 is EOF.
    pub bytes: usize,
    /// Whether the read took as many bytes as it asked for, so more may be queued. Reading
    /// on in the same poll would serve this peer ahead of every other connection of the
    /// loop ([`converse`](super::task::converse) lets the others go first). Fewer bytes, or
    /// EOF: the kernel had nothing more queued.
    pub is_full: bool,
}
/// `connection` sent everything it owed: its output allocation goes back to the thread.
pub fn return_spare(connection: &mut Connection) {
    SPARE.with_borrow_mut(|spare| connection.return_spare(spare));
}

/// Reads once from `stream`, a socket polled the way tokio's are (`AsyncRead`), into this
/// thread's read buffer and hands the bytes to `connection` ([`receive_into`]); `Pending`
/// until the socket is readable. tokio's `poll_read` takes a short read to mean "drained",
/// so no read ends in `EAGAIN`.
///
/// # Errors
///
/// As [`receive_into`]: why the connection must close.
pub fn poll_receive<S: AsyncRead + AsyncWrite + Unpin + ?Sized>(
    cx: &mut Context<'_>,
    stream: &mut S,
    connection: &mut Connection,
    log: &LoopLog,
) -> Poll<Result<Received, CloseReason>> {
    match receive_into(connection, log, &mut Polled { cx, stream }) {
        Ok(None) => Poll::Pending,
        Ok(Some(received)) => Poll::Ready(Ok(received)),
        Err(reason) => Poll::Ready(Err(reason)),
    }
}

/// A socket inside a task being polled: `Pending` is `WouldBlock`.
struct Polled<'a, 'b, S: ?Sized> {
    cx: &'a mut Context<'b>,
    stream: &'a mut S,
}

impl<S: AsyncRead + AsyncWrite + Unpin + ?Sized> SocketIo for Polled<'_, '_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut input = ReadBuf::new(buf);
        match Pin::new(&mut *self.stream).poll_read(self.cx, &mut input) {
            Poll::Ready(read) => read.map(|()| input.filled().len()),
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        match Pin::new(&mut *self.stream).poll_write(self.cx, bytes) {
            Poll::Ready(written) => written,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::Peer;
    use crate::protocol::{Protocol, ProtocolKind};
    use crate::server::Limits;
    use std::collections::VecDeque;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;
    use std::task::Waker;

    /// A connection without layers: its socket is never touched, so any descriptor does.
    fn connection(kind: ProtocolKind) -> Connection {
        let (socket, _peer) = UnixStream::pair().unwrap();
        let limits = Limits {
            max_buffer_bytes: 1024,
            ..Limits::default()
        };
        let peer = Peer::Ip("127.0.0.1:40000".parse().unwrap());
        Connection::new(&Protocol::new(kind, 1024), peer, &limits, socket.as_fd())
    }

    /// A socket whose reads return what is queued (`WouldBlock` once nothing is) and
    /// whose writes take up to `room` bytes.
    #[derive(Default)]
    struct Scripted {
        reads: VecDeque<io::Result<Vec<u8>>>,
        room: usize,
        written: Vec<u8>,
    }

    impl SocketIo for Scripted {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let Some(read) = self.reads.pop_front() else {
                return Err(io::ErrorKind::WouldBlock.into());
            };
            let bytes = read?;
            assert!(bytes.len() <= buf.len(), "a read past the buffer");
            buf[..bytes.len()].copy_from_slice(&bytes);
            Ok(bytes.len())
        }

        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            let taken = bytes.len().min(self.room);
            if taken == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.room -= taken;
            self.written.extend_from_slice(&bytes[..taken]);
            Ok(taken)
        }
    }

    fn reading(reads: Vec<io::Result<Vec<u8>>>, room: usize) -> Scripted {
        Scripted {
            reads: reads.into(),
            room,
            ..Scripted::default()
        }
    }

    /// What [`receive_into`] returned, when the connection goes on.
    fn received(conn: &mut Connection, log: &LoopLog, socket: &mut Scripted) -> Option<usize> {
        let received = receive_into(conn, log, socket).unwrap_or_else(|e| panic!("closing: {e:?}"));
        received.map(|received| received.bytes)
    }

    fn spare_capacity() -> usize {
        SPARE.with_borrow(Vec::capacity)
    }

    #[test]
    fn what_is_read_is_handed_over_and_counted() {
        let log = LoopLog::default();
        let mut conn = connection(ProtocolKind::Lines);
        let mut socket = reading(vec![Ok(b"one\ntw".to_vec())], 0);
        assert_eq!(received(&mut conn, &log, &mut socket), Some(6));
        assert_eq!(conn.unsent(), b"one\n");
        assert_eq!(
            received(&mut conn, &log, &mut socket),
            None,
            "nothing queued: the read would block"
        );
        assert_eq!(conn.unsent(), b"one\n", "and nothing was handed over");
    }

    #[test]
    fn an_echo_goes_straight_back_when_nothing_is_owed() {
        let log = LoopLog::default();
        let mut conn = connection(ProtocolKind::Echo);
        let mut socket = reading(vec![Ok(b"hello".to_vec()), Ok(b"world".to_vec())], 7);
        assert_eq!(received(&mut conn, &log, &mut socket), Some(5));
        assert_eq!(socket.written, b"hello", "written from the read buffer");
        assert_eq!(conn.owed(), 0);
        assert_eq!(received(&mut conn, &log, &mut socket), Some(5));
        assert_eq!(socket.written, b"hellowo", "the kernel took two bytes");
        assert_eq!(conn.unsent(), b"rld", "the rest is owed");
    }

    #[test]
    fn a_failed_read_closes_and_eof_is_handed_over() {
        let log = LoopLog::default();
        let mut conn = connection(ProtocolKind::Echo);
        let mut socket = reading(vec![Err(io::ErrorKind::ConnectionReset.into())], 0);
        match receive_into(&mut conn, &log, &mut socket) {
            Err(CloseReason::Failed(e)) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
            other => panic!("a reset peer must close its connection, got {other:?}"),
        }
        let mut conn = connection(ProtocolKind::Echo);
        let mut socket = reading(vec![Ok(Vec::new())], 0);
        assert_eq!(received(&mut conn, &log, &mut socket), Some(0));
        assert!(conn.is_finished(), "EOF with nothing owed: finished");
    }

    /// A read that took all it asked for may have left more queued, so the task lets the
    /// others go first; a short read or EOF found the queue empty, so it need not.
    #[test]
    fn a_read_is_full_when_it_took_all_it_asked_for() {
        let log = LoopLog::default();
        let full = |conn: &mut Connection, socket: &mut Scripted| {
            let received = receive_into(conn, &log, socket).expect("no close");
            received.expect("handed over").is_full
        };
        let mut conn = connection(ProtocolKind::Lines);
        let limit = conn.read_limit(READ_BUFFER_BYTES);
        assert!(limit > 1);
        let mut socket = reading(vec![Ok(vec![b'\n'; limit]), Ok(vec![b'\n'; 1])], 0);
        assert!(full(&mut conn, &mut socket), "{limit} bytes of {limit}");
        conn.advance(conn.owed());
        assert!(!full(&mut conn, &mut socket), "a short read");
        let mut socket = reading(vec![Ok(Vec::new())], 0);
        assert!(!full(&mut conn, &mut socket), "EOF");
        // A connection that reads nothing more asks for 0 bytes and gets 0: not full either.
        let mut conn = connection(ProtocolKind::Lines);
        conn.stop_reading();
        assert_eq!(conn.read_limit(READ_BUFFER_BYTES), 0);
        let mut socket = reading(vec![Ok(Vec::new())], 0);
        assert!(!full(&mut conn, &mut socket), "0 bytes of 0");
    }

    #[test]
    fn a_connection_producing_replies_borrows_the_threads_spare_until_it_sent_them() {
        SPARE.set(Vec::with_capacity(512));
        let log = LoopLog::default();
        let mut conn = connection(ProtocolKind::Lines);
        let mut socket = reading(vec![Ok(b"a line\n".to_vec())], 0);
        assert_eq!(received(&mut conn, &log, &mut socket), Some(7));
        assert_eq!(
            spare_capacity(),
            0,
            "the reply went into the thread's allocation"
        );
        return_spare(&mut conn);
        assert_eq!(spare_capacity(), 0, "still owed: kept");
        conn.advance(conn.owed());
        return_spare(&mut conn);
        assert!(
            spare_capacity() >= 512,
            "everything sent: the allocation is the thread's again, so an idle connection \
             holds none"
        );
    }

    /// A task waiting for input holds no buffer of the thread's: a read that would block
    /// lends it nothing.
    #[test]
    fn a_read_that_would_block_lends_nothing() {
        SPARE.set(Vec::with_capacity(512));
        let log = LoopLog::default();
        let mut conn = connection(ProtocolKind::Lines);
        let mut socket = reading(Vec::new(), 0);
        assert_eq!(received(&mut conn, &log, &mut socket), None);
        assert_eq!(spare_capacity(), 512, "the spare stays the thread's");
    }

    /// A stream polled as tokio's are: reads give what is queued, then `Pending`.
    struct Polling {
        input: VecDeque<Vec<u8>>,
        is_at_eof: bool,
        written: Vec<u8>,
    }

    impl AsyncRead for Polling {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            match self.input.pop_front() {
                Some(bytes) => {
                    buf.put_slice(&bytes);
                    Poll::Ready(Ok(()))
                }
                None if self.is_at_eof => Poll::Ready(Ok(())),
                None => Poll::Pending,
            }
        }
    }

    impl AsyncWrite for Polling {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            bytes: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.written.extend_from_slice(bytes);
            Poll::Ready(Ok(bytes.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn a_polled_stream_is_read_once_and_pending_when_empty() {
        let log = LoopLog::default();
        let mut cx = Context::from_waker(Waker::noop());
        let mut stream = Polling {
            input: [b"ping".to_vec()].into(),
            is_at_eof: false,
            written: Vec::new(),
        };
        let mut conn = connection(ProtocolKind::Echo);
        let polled = poll_receive(&mut cx, &mut stream, &mut conn, &log);
        assert!(matches!(polled, Poll::Ready(Ok(_))), "{polled:?}");
        assert_eq!(stream.written, b"ping", "the echo went straight back");
        assert_eq!(conn.owed(), 0);
        let polled = poll_receive(&mut cx, &mut stream, &mut conn, &log);
        assert!(
            matches!(polled, Poll::Pending),
            "nothing to read: {polled:?}"
        );
        assert!(!conn.is_finished());
        stream.is_at_eof = true;
        let polled = poll_receive(&mut cx, &mut stream, &mut conn, &log);
        assert!(matches!(polled, Poll::Ready(Ok(_))), "{polled:?}");
        assert!(conn.is_finished(), "an empty read is EOF");
        assert_eq!(stream.written, b"ping", "nothing more");
    }
}
