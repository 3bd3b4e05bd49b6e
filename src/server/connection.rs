//! `Connection`: one stream peer's protocol session, its owed bytes, and where it stands.
//!
//! Models own the socket and the waiting; this type owns every decision about bytes, so
//! that half-close, backpressure and panic isolation are written once for all models.

use super::lifecycle::{CloseReason, LoopLog};
use crate::buffer::WriteBuffer;
use crate::net::{Peer, Stream};
use crate::protocol::{Flow, Protocol, Session};
use std::cell::Cell;
use std::io;
use std::panic::{self, AssertUnwindSafe};

/// The connection's handler panicked; it was logged, and the model should close it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandlerPanicked;

/// One stream peer, from accept to close.
#[derive(Debug)]
pub struct Connection {
    session: Session,
    out: WriteBuffer,
    peer: Peer,
    /// Whether we still read this peer: false after its EOF, after the protocol asked to
    /// close, and during drain.
    is_reading: bool,
}

impl Connection {
    /// A new connection with its greeting (if any) already owed.
    pub fn new(protocol: &Protocol, peer: Peer, max_buffer_bytes: usize) -> Self {
        let mut session = protocol.new_session();
        let mut out = WriteBuffer::new(max_buffer_bytes);
        session.on_connect(&mut out);
        Connection {
            session,
            out,
            peer,
            is_reading: true,
        }
    }

    /// Who is at the other end.
    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    /// Whether to ask the kernel for input now: still reading, and the owed bytes are
    /// under the bound (backpressure: a peer that does not read stops being read).
    pub fn wants_read(&self) -> bool {
        self.is_reading && !self.out.is_full()
    }

    /// Whether bytes are owed to the peer.
    pub fn wants_write(&self) -> bool {
        !self.out.is_empty()
    }

    /// Whether everything is done: no more reading and nothing owed. The model then shuts
    /// down its write side (the peer reads EOF after the last reply) and closes.
    pub fn is_finished(&self) -> bool {
        !self.is_reading && self.out.is_empty()
    }

    /// How many bytes to read at most now, given a read buffer of `buf_len` bytes: as many
    /// as fit under the bound, with the bytes the protocol holds counted against it, once
    /// the protocol has expanded them; 0 when reading is off.
    pub fn read_limit(&self, buf_len: usize) -> usize {
        if !self.wants_read() {
            return 0;
        }
        let room = self.out.room().saturating_sub(self.session.held_bytes());
        (room / self.session.max_expansion()).clamp(1, buf_len)
    }

    /// Feeds bytes the peer sent to the protocol.
    ///
    /// # Errors
    ///
    /// [`HandlerPanicked`] when the protocol handler panicked (already logged with the
    /// peer's address); the model closes this connection and nothing else.
    pub fn receive(&mut self, input: &[u8]) -> Result<(), HandlerPanicked> {
        if !self.is_reading {
            // Bytes after the protocol closed, or during drain, are owed nothing.
            return Ok(());
        }
        let Connection {
            session, out, peer, ..
        } = self;
        let flow = catch_handler_panic(peer, || session.on_data(input, out))?;
        if flow == Flow::Close {
            self.is_reading = false;
        }
        Ok(())
    }

    /// The peer half-closed: queue what is still owed, then finish once it is sent.
    ///
    /// # Errors
    ///
    /// As [`Connection::receive`].
    pub fn receive_eof(&mut self) -> Result<(), HandlerPanicked> {
        if !self.is_reading {
            return Ok(());
        }
        self.is_reading = false;
        let Connection {
            session, out, peer, ..
        } = self;
        catch_handler_panic(peer, || session.on_eof(out))
    }

    /// Handles what one read of the peer's socket returned into `buf`: bytes, EOF
    /// (`Ok(0)`), nothing yet, or an error. Returns whether input (or EOF) arrived.
    ///
    /// # Errors
    ///
    /// Why the connection must close: the read failed, or the handler panicked.
    pub fn on_read(
        &mut self,
        result: io::Result<usize>,
        buf: &[u8],
        log: &LoopLog,
    ) -> Result<bool, CloseReason> {
        let received = match result {
            Ok(0) => self.receive_eof(),
            Ok(n) => {
                log.received(n);
                self.receive(&buf[..n])
            }
            Err(e) if is_transient(&e) => return Ok(false),
            Err(e) => return Err(CloseReason::Failed(e)),
        };
        received.map_err(|HandlerPanicked| CloseReason::HandlerPanicked)?;
        Ok(true)
    }

    /// Reads once from the non-blocking `stream`, as much as the bound allows, and
    /// handles the result ([`Connection::on_read`]).
    ///
    /// # Errors
    ///
    /// As [`Connection::on_read`].
    pub fn read_from(
        &mut self,
        stream: &Stream,
        buf: &mut [u8],
        log: &LoopLog,
    ) -> Result<bool, CloseReason> {
        let limit = self.read_limit(buf.len());
        if limit == 0 {
            return Ok(false);
        }
        let result = stream.read(&mut buf[..limit]);
        self.on_read(result, buf, log)
    }

    /// Writes owed bytes to the non-blocking `stream` until none are left or the kernel's
    /// send buffer is full.
    ///
    /// # Errors
    ///
    /// The write failed (the peer reset or went away): the connection must close.
    pub fn flush_to(&mut self, stream: &Stream, log: &LoopLog) -> Result<(), CloseReason> {
        while self.wants_write() {
            match stream.write(self.unsent()) {
                // The kernel may take fewer bytes than offered; the rest waits for writable.
                Ok(written) => {
                    log.sent(written);
                    self.advance(written);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(CloseReason::Failed(e)),
            }
        }
        Ok(())
    }

    /// Shutdown began: read nothing more, finish sending what is owed.
    pub fn stop_reading(&mut self) {
        self.is_reading = false;
    }

    /// The owed bytes: offer them to the kernel.
    pub fn unsent(&self) -> &[u8] {
        self.out.unsent()
    }

    /// The kernel took `written` bytes of [`Connection::unsent`].
    pub fn advance(&mut self, written: usize) {
        self.out.advance(written);
    }

    /// Lends an event loop's spare output allocation to this connection (see
    /// [`WriteBuffer::lend_spare`]), so replies need no allocation of their own.
    pub fn lend_spare(&mut self, spare: &mut Vec<u8>) {
        self.out.lend_spare(spare);
    }

    /// Gives the output allocation back once nothing is owed (see
    /// [`WriteBuffer::return_spare`]).
    pub fn return_spare(&mut self, spare: &mut Vec<u8>) {
        self.out.return_spare(spare);
    }

    /// Bytes owed now.
    pub fn owed(&self) -> usize {
        self.out.len()
    }
}

/// Errors after which the same read simply comes again later.
fn is_transient(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

thread_local! {
    /// Whether this thread is inside a protocol handler right now.
    static IS_IN_HANDLER: Cell<bool> = const { Cell::new(false) };
}

/// Whether the calling thread is running a protocol handler: a panic hook uses it to tell
/// an isolated handler panic (reported with its peer when caught) from a bug in reverb.
pub fn is_in_handler() -> bool {
    IS_IN_HANDLER.with(Cell::get)
}

/// Runs a protocol handler, turning a panic into a logged [`HandlerPanicked`].
fn catch_handler_panic<T>(peer: &Peer, handler: impl FnOnce() -> T) -> Result<T, HandlerPanicked> {
    IS_IN_HANDLER.with(|flag| flag.set(true));
    let result = catch_unwind_logged(peer, handler);
    IS_IN_HANDLER.with(|flag| flag.set(false));
    result
}

fn catch_unwind_logged<T>(peer: &Peer, handler: impl FnOnce() -> T) -> Result<T, HandlerPanicked> {
    // The session is dropped with the connection after a panic, so no broken state is
    // ever observed; that is why asserting unwind safety is sound here.
    panic::catch_unwind(AssertUnwindSafe(handler)).map_err(|payload| {
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("(no message)");
        tracing::error!("handler for {peer} panicked: {message}; closing that connection only");
        HandlerPanicked
    })
}

/// Runs a datagram handler the same way.
pub(super) fn catch_datagram_panic<T>(
    peer: &Peer,
    handler: impl FnOnce() -> T,
) -> Result<T, HandlerPanicked> {
    catch_handler_panic(peer, handler)
}
