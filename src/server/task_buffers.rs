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
        let received = match got {
            0 => Received::Drained,
            got if got < limit => Received::Drained,
            _ => Received::Full,
        };
        Ok(handed_over.then_some(received))
    })
}

/// What one read of a connection's socket found, for its task's turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// Fewer bytes than asked for, or EOF: the kernel had nothing more queued.
    Drained,
    /// As many bytes as asked for: more may be queued. Reading on in the same poll would
    /// serve this peer ahead of every other connection of the loop
    /// ([`converse`](super::task::converse) yields instead).
    Full,
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
