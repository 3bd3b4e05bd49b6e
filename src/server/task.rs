//! A task per connection (`async`, `tokio`): the steps every such task takes, written
//! once. A model says only how its runtime waits ([`TaskWaits`]): to send, and for input,
//! shutdown or the idle timeout, whichever comes first.
//!
//! The steps: send what is owed (`write_all(..).await`; while the peer does not take its
//! replies, it is not read); stop reading once shutdown began; end when the connection is
//! finished; otherwise wait for input, read it into the loop's buffer and hand it over
//! ([`super::task_buffers`]); and at the end, one close for every reason ([`close_served`]).

use super::lifecycle::{CloseReason, Ending, LoopLog};
use super::linger;
use super::{Admission, Connection, task_buffers};
use crate::net::Stream;
use std::io;
use std::os::fd::BorrowedFd;
use std::time::Duration;

/// What ended a task's wait for input.
#[derive(Debug)]
pub enum Woke {
    /// Input came and was handed over (`Ok`), or the connection must close (`Err`).
    Received(Result<(), CloseReason>),
    /// Shutdown began: read nothing more, send what is owed.
    Draining,
    /// Nothing came for `--idle-timeout`, which is this long.
    Idle(Duration),
}

/// How a model's runtime lets a connection task wait: the one thing the task models differ
/// in. Implemented once per model, so these futures need no `Send` bound here: tokio's are
/// `Send`, the crate's own runtime's are not.
#[allow(async_fn_in_trait)]
pub trait TaskWaits {
    /// Sends all of `bytes`; `None` once the drain timeout passed first.
    async fn send_all(&mut self, bytes: &[u8]) -> Option<io::Result<()>>;

    /// Waits until input came (read and handed to `connection` with
    /// [`task_buffers::receive_into`]), shutdown began or `--idle-timeout` passed, and
    /// says which. The idle clock starts at this call: waiting to send never counts as
    /// idle.
    async fn receive(&mut self, connection: &mut Connection) -> Woke;

    /// Whether shutdown began.
    fn is_draining(&self) -> bool;

    /// Runs `f` with the log of the task's loop.
    fn with_log<R>(&self, f: impl FnOnce(&LoopLog) -> R) -> R;
}

/// Serves `connection` until it must close, and says why.
pub async fn converse(task: &mut impl TaskWaits, connection: &mut Connection) -> CloseReason {
    loop {
        if connection.wants_write() {
            // While the peer does not take its replies, it is not read (backpressure).
            let owed = connection.owed();
            match task.send_all(connection.unsent()).await {
                None => return CloseReason::DrainTimeout { owed },
                Some(Err(e)) => return CloseReason::Failed(e),
                Some(Ok(())) => {}
            }
            task.with_log(|log| log.sent(connection.transport(), owed));
            connection.advance(owed);
            task_buffers::return_spare(connection);
        }
        if task.is_draining() {
            connection.stop_reading();
        }
        if connection.is_finished() {
            return connection.finish_reason(task.is_draining());
        }
        match task.receive(connection).await {
            // Shutdown began: stop reading at the top of the loop.
            Woke::Received(Ok(())) | Woke::Draining => {}
            Woke::Received(Err(reason)) => return reason,
            Woke::Idle(timeout) => return CloseReason::Idle(timeout),
        }
    }
}

/// Ends a connection a task served, for `reason`, and logs it: the one close of the task
/// models, whose runtime keeps the socket `fd` in a type of its own and closes it when the
/// task ends. A peer that half-closed reads EOF after the last reply; one the server ends
/// first gets (with TLS, `close_notify` and then) a lingering close on a duplicate of
/// `fd`, which takes `place`, the connection's place under `--max-conns`, with it.
pub fn close_served(
    fd: BorrowedFd<'_>,
    connection: &mut Connection,
    reason: CloseReason,
    log: &LoopLog,
    place: Admission,
) {
    match reason.ending() {
        // The peer may be gone already; closing is all that is left either way.
        Ending::Eof => drop(socket2::SockRef::from(&fd).shutdown(std::net::Shutdown::Write)),
        Ending::Lingering => match Stream::duplicate(fd) {
            Ok(stream) => {
                if !connection.is_finished() {
                    // An idle timeout or a drain cut: with TLS, close_notify goes out first.
                    connection.close_first(&stream, log);
                }
                linger::hand_off(stream, Some(place));
            }
            Err(e) => tracing::debug!("closing without lingering: cannot duplicate it: {e}"),
        },
        Ending::Refused | Ending::Abort => {}
    }
    log.closed(connection.peer(), connection.transport(), &reason);
}
