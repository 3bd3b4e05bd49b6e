//! Accept and admit: taking a connection from a listener, sorting accept errors, and
//! holding every connection to `--max-conns`, the same for every model.

use super::lifecycle::{CloseReason, Linger, LoopLog, close, listener_transport};
use super::{Admission, ConnectionCounter};
use crate::metrics::Transport;
use crate::net::{Peer, Stream, StreamListener};
use crate::sys::errno;
use std::io;

/// What one [`accept_and_admit`] came to.
#[derive(Debug)]
pub enum Accepted {
    /// A connection, admitted: it holds its place under `--max-conns` until `admission`
    /// is dropped.
    Connection(Stream, Peer, Admission),
    /// Accept again at once: the connection died in the queue, or it was over
    /// `--max-conns` and closed at once, so that its client reads EOF instead of waiting
    /// in the backlog.
    Again,
    /// Nothing is queued: wait for the listener to be readable.
    Empty,
    /// Out of descriptors or memory (logged): stop accepting for
    /// [`ACCEPT_PAUSE`](super::ACCEPT_PAUSE) so that a full descriptor table never turns
    /// the accept loop into a spin.
    Paused,
}

/// What a model does about an error from `accept`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptAction {
    /// Nothing more is queued right now (`EAGAIN`): wait for readiness.
    Wait,
    /// The connection died in the queue or a signal interrupted: accept again at once.
    Retry,
    /// Out of descriptors or memory: log, pause accepting for
    /// [`ACCEPT_PAUSE`](super::ACCEPT_PAUSE), go on.
    Pause,
    /// The listener itself is broken: the server fails.
    Fail,
}

/// Sorts an `accept` error rather than backing off on all alike (as mini-redis does,
/// which turns a harmless `ECONNABORTED` into a stall and a broken listener into endless
/// retries).
pub fn accept_action(error: &io::Error) -> AcceptAction {
    if error.kind() == io::ErrorKind::WouldBlock {
        return AcceptAction::Wait;
    }
    match error.raw_os_error() {
        Some(
            errno::ECONNABORTED
            | errno::EINTR
            | errno::EPROTO
            | errno::ENETDOWN
            | errno::ENOPROTOOPT
            | errno::EHOSTDOWN
            | errno::ENONET
            | errno::EHOSTUNREACH
            | errno::EOPNOTSUPP
            | errno::ENETUNREACH
            | errno::EPERM
            | errno::ECONNRESET,
        ) => AcceptAction::Retry,
        Some(errno::EMFILE | errno::ENFILE | errno::ENOBUFS | errno::ENOMEM) => AcceptAction::Pause,
        _ => AcceptAction::Fail,
    }
}

/// Handles what one `accept` on the listener named `listener`, of `transport`, returned,
/// for a model that accepts its own way (a runtime's future, a completion): sorts an
/// error, or admits the connection under `counter`.
///
/// # Errors
///
/// The listener is broken: the server fails.
pub fn on_accept(
    result: io::Result<(Stream, Peer)>,
    listener: &str,
    transport: Transport,
    counter: &ConnectionCounter,
    log: &LoopLog,
) -> io::Result<Accepted> {
    let (stream, peer) = match result {
        Ok(accepted) => accepted,
        Err(e) => {
            return match accept_action(&e) {
                AcceptAction::Wait => Ok(Accepted::Empty),
                AcceptAction::Retry => Ok(Accepted::Again),
                AcceptAction::Pause => {
                    log.accept_paused(listener, transport, &e);
                    Ok(Accepted::Paused)
                }
                AcceptAction::Fail => Err(e),
            };
        }
    };
    let Some(admission) = counter.admit() else {
        let max_conns = counter.max_conns().unwrap_or(0);
        close(
            stream,
            &peer,
            CloseReason::OverLimit(max_conns),
            log,
            Linger::Elsewhere(None),
        );
        return Ok(Accepted::Again);
    };
    log.accepted(&peer, transport, listener);
    Ok(Accepted::Connection(stream, peer, admission))
}

/// Accepts one connection from the non-blocking `listener` and admits it under `counter`
/// ([`on_accept`]).
///
/// # Errors
///
/// The listener is broken: the server fails.
pub fn accept_and_admit(
    listener: &StreamListener,
    counter: &ConnectionCounter,
    log: &LoopLog,
) -> io::Result<Accepted> {
    let transport = listener_transport(listener);
    on_accept(listener.accept(), listener.name(), transport, counter, log)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn action_of(errno: i32) -> AcceptAction {
        accept_action(&io::Error::from_raw_os_error(errno))
    }

    #[test]
    fn an_empty_queue_waits_for_readiness() {
        assert_eq!(
            accept_action(&io::Error::from(io::ErrorKind::WouldBlock)),
            AcceptAction::Wait
        );
    }

    #[test]
    fn a_connection_that_died_in_the_queue_is_retried_at_once() {
        for errno in [
            errno::ECONNABORTED,
            errno::EINTR,
            errno::EPROTO,
            errno::ECONNRESET,
            errno::ENETUNREACH,
            errno::EPERM,
        ] {
            assert_eq!(action_of(errno), AcceptAction::Retry, "errno {errno}");
        }
    }

    #[test]
    fn running_out_of_descriptors_or_memory_pauses_accepting() {
        for errno in [errno::EMFILE, errno::ENFILE, errno::ENOBUFS, errno::ENOMEM] {
            assert_eq!(action_of(errno), AcceptAction::Pause, "errno {errno}");
        }
    }

    #[test]
    fn a_broken_listener_fails_the_server() {
        for errno in [errno::ECONNREFUSED, errno::EPROTOTYPE, errno::EINPROGRESS] {
            assert_eq!(action_of(errno), AcceptAction::Fail, "errno {errno}");
        }
        assert_eq!(
            accept_action(&io::Error::other("not from the kernel")),
            AcceptAction::Fail
        );
    }
}
