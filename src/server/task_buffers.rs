//! The buffers of an async loop's thread, lent to one connection task at a time, so that a
//! waiting task holds none: 10,000 idle connections cost no read or output buffers.
//!
//! A task reads into the thread's one read buffer only once its socket is ready, and hands
//! the bytes to its `Connection` before it awaits again. The thread's spare output
//! allocation is lent to the connection producing replies and taken back once they are sent
//! (`Connection::lend_spare`, `return_spare`).

use super::{CloseReason, Connection, LoopLog, READ_BUFFER_BYTES};
use std::cell::RefCell;
use std::io;

thread_local! {
    static READ_BUFFER: RefCell<Vec<u8>> = RefCell::new(vec![0; READ_BUFFER_BYTES]);
    static SPARE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Runs `read` on this thread's read buffer, cut to what `connection` may take under its
/// bound, and hands what came (bytes, counted in `log`, or EOF for `Ok(0)`) to
/// `connection`. Returns how many bytes came, or `None` when `read` would block (nothing
/// is handed over).
///
/// # Errors
///
/// Why the connection must close: `read` failed. A handler panic is no error here: the
/// connection stops reading and finishes as usual.
pub fn receive_into(
    connection: &mut Connection,
    log: &LoopLog,
    read: impl FnOnce(&mut [u8]) -> io::Result<usize>,
) -> Result<Option<usize>, CloseReason> {
    READ_BUFFER.with_borrow_mut(|buf| {
        let limit = connection.read_limit(buf.len());
        let result = read(&mut buf[..limit]);
        let got = match &result {
            Ok(n) => *n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(_) => 0,
        };
        SPARE.with_borrow_mut(|spare| connection.lend_spare(spare));
        let handed_over = connection.on_read(result, buf, log)?;
        Ok(handed_over.then_some(got))
    })
}

/// `connection` sent everything it owed: its output allocation goes back to the thread.
pub fn return_spare(connection: &mut Connection) {
    SPARE.with_borrow_mut(|spare| connection.return_spare(spare));
}
