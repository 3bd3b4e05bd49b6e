//! Serving from threads and processes: the code `blocking`, `threaded`, `pool` and
//! `forking` share. Those models differ only in *who* runs [`serve_connection`]: the
//! accepting thread itself, a new thread, a pooled worker, or a forked child. That is the
//! lesson of Python's `socketserver` too: one handler, many server classes.
//!
//! A thread here blocks in `poll(2)` on its one socket *and* the shutdown eventfd, rather
//! than in `read(2)` alone: a thread stuck in `read` cannot hear SIGTERM, cannot send a
//! reply while the peer is still sending, and cannot time out an idle peer. With one
//! connection per thread, its idle deadline is simply that poll's timeout.

use super::accept::{Accepted, accept_and_admit};
use super::event_loops::LoopSources;
use super::lifecycle::{CloseReason, Linger, LoopLog, close};
use super::{
    ACCEPT_PAUSE, Admission, Connection, ConnectionCounter, DATAGRAM_BATCH, DatagramReplier,
    Limits, Listeners, OnServing, READ_BUFFER_BYTES, Shutdown,
};
use crate::metrics::Metrics;
use crate::net::{DatagramSocket, Peer, Stream, StreamListener};
use crate::protocol::Protocol;
use crate::sys::Interest;
use crate::sys::poll;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

/// What woke a thread that waited for one descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The descriptor is ready.
    Ready,
    /// Shutdown fired.
    Shutdown,
    /// The timeout passed.
    Timeout,
}

/// Sleeps until `fd` is ready for `interest`, shutdown fires, or `timeout` passes.
///
/// # Errors
///
/// The OS error of `poll`.
pub fn wait_for(
    fd: BorrowedFd<'_>,
    interest: Interest,
    shutdown: &Shutdown,
    timeout: Option<Duration>,
) -> io::Result<Wake> {
    let mut entries = [
        poll::entry_for(fd, interest),
        poll::entry_for(shutdown.fd(), Interest::READABLE),
    ];
    if poll::poll(&mut entries, timeout)? == 0 {
        return Ok(Wake::Timeout);
    }
    if entries[1].revents != 0 {
        return Ok(Wake::Shutdown);
    }
    Ok(Wake::Ready)
}

/// Accepts connections until shutdown fires, handing each admitted one to `dispatch`, then
/// closes `listener`: while the connections drain, the kernel refuses new clients instead
/// of completing handshakes in a queue nobody accepts from any more. `dispatch` also gets
/// the listener, to close it itself when it serves the connection on this thread and the
/// drain begins there (`blocking`); it is accepting no longer once the listener is taken.
///
/// # Errors
///
/// A listener error that is not about one connection (see `server::accept_action`).
pub fn accept_until_shutdown(
    listener: StreamListener,
    counter: &ConnectionCounter,
    shutdown: &Shutdown,
    metrics: Metrics,
    mut dispatch: impl FnMut(Stream, Peer, Admission, &mut Option<StreamListener>),
) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    // The accepting thread's own counters (each connection's thread has its own).
    let log = LoopLog::new(metrics);
    let mut listening = Some(listener);
    while let Some(listener) = &listening {
        if wait_for(listener.as_fd(), Interest::READABLE, shutdown, None)? == Wake::Shutdown {
            return Ok(());
        }
        match accept_and_admit(listener, counter, &log)? {
            Accepted::Connection(stream, peer, admission) => {
                dispatch(stream, peer, admission, &mut listening);
            }
            Accepted::Again | Accepted::Empty => {}
            Accepted::Paused => {
                if !pause_accepting(shutdown)? {
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}

/// Pauses accepting for [`ACCEPT_PAUSE`] after the process ran out of descriptors, and
/// wakes early when shutdown fires, so that a pause never delays the drain. Returns
/// whether to go on accepting (`false`: shutdown fired).
///
/// # Errors
///
/// The OS error of `poll`.
pub fn pause_accepting(shutdown: &Shutdown) -> io::Result<bool> {
    let pause = Some(ACCEPT_PAUSE);
    Ok(wait_for(shutdown.fd(), Interest::READABLE, shutdown, pause)? == Wake::Timeout)
}

/// Where [`serve_connection`] leaves a connection the server closes first.
#[derive(Debug)]
pub enum LingerOn {
    /// The calling thread (or process) serves nobody else after this connection: the
    /// lingering close waits right here, and the caller holds the connection's place
    /// under `--max-conns` until it returns.
    ThisThread,
    /// The calling thread serves the next connection (a pooled worker): the lingering
    /// thread takes the socket with its place under `--max-conns`, so lingering peers
    /// cannot hold every worker, but still count against the limit.
    LingeringThread(Admission),
}

/// Serves one stream connection on the calling thread until the peer is done, its
/// handler panics, it idles out, or shutdown's drain ends; errors are logged, not returned.
/// `on_drain` runs once if the drain begins while the connection is served.
pub fn serve_connection(
    stream: Stream,
    peer: Peer,
    protocol: &Protocol,
    limits: &Limits,
    shutdown: &Shutdown,
    linger_on: LingerOn,
    on_drain: impl FnOnce(),
) {
    let connection = Connection::new(protocol, peer, limits, stream.as_fd());
    // A counter slot for this connection's thread (or forked child), kept when it ends.
    let log = LoopLog::new(limits.metrics);
    serve_accepted(
        stream, connection, limits, shutdown, linger_on, &log, on_drain,
    );
}

/// Closes a connection accepted before shutdown and never served (it waited for a pooled
/// worker): nothing it sent was read, so nothing is owed but an EOF (a greeting owed is
/// cut, and counted so). Closed with a lingering close, never a reset, and counted in
/// `log`, the worker's own.
pub fn close_unserved(stream: Stream, connection: &Connection, place: Admission, log: &LoopLog) {
    let reason = match connection.owed() {
        0 => CloseReason::Drained,
        owed => CloseReason::DrainTimeout { owed },
    };
    close(
        stream,
        connection.peer(),
        reason,
        log,
        Linger::Elsewhere(Some(place)),
    );
}

/// [`serve_connection`] for a connection made at accept, before it waited for this thread:
/// its setup deadline (`--proxy-timeout`, `--tls-handshake-timeout`) counts from accept,
/// not from when a pooled worker took it. It counts in `log`, the calling thread's: a
/// pooled worker keeps one counter slot for every connection it serves.
pub fn serve_accepted(
    stream: Stream,
    mut connection: Connection,
    limits: &Limits,
    shutdown: &Shutdown,
    linger_on: LingerOn,
    log: &LoopLog,
    on_drain: impl FnOnce(),
) {
    let reason = drive(&stream, &mut connection, limits, shutdown, log, on_drain);
    let linger = match linger_on {
        LingerOn::ThisThread => Linger::Here {
            shutdown,
            drain_timeout: limits.drain_timeout,
        },
        LingerOn::LingeringThread(place) => Linger::Elsewhere(Some(place)),
    };
    close(stream, connection.peer(), reason, log, linger);
}

/// Serves `connection` until it must close, and says why.
fn drive(
    stream: &Stream,
    connection: &mut Connection,
    limits: &Limits,
    shutdown: &Shutdown,
    log: &LoopLog,
    on_drain: impl FnOnce(),
) -> CloseReason {
    if let Err(e) = stream.set_nonblocking(true) {
        return CloseReason::CannotWatch(e.to_string());
    }
    let mut buf = vec![0u8; READ_BUFFER_BYTES];
    let mut last_progress = Instant::now();
    let mut drain_deadline: Option<Instant> = None;
    // A shutdown that fired before this connection was served is seen by the first poll:
    // the eventfd stays readable once fired.
    let mut on_drain = Some(on_drain);
    loop {
        match connection.flush_progress(stream, log) {
            // A peer still taking its replies is not idle, however slowly it takes them.
            Ok(true) => last_progress = Instant::now(),
            Ok(false) => {}
            Err(reason) => return reason,
        }
        if connection.is_finished() {
            return connection.finish_reason(drain_deadline.is_some());
        }
        // Counted from the last progress either way, even while replies are owed: a peer
        // that stops reading and sending must not hold this thread for ever.
        let idle_deadline = limits.idle_timeout.map(|idle| last_progress + idle);
        let deadline = idle_deadline.into_iter().chain(drain_deadline).min();
        let timeout = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let interest = Interest {
            readable: connection.wants_read(),
            writable: connection.wants_write(),
        };
        let mut entries = [
            poll::entry_for(stream.as_fd(), interest),
            match drain_deadline {
                None => poll::entry_for(shutdown.fd(), Interest::READABLE),
                Some(_) => poll::unused_entry(),
            },
        ];
        if let Err(e) = poll::poll(&mut entries, timeout) {
            return CloseReason::Failed(e);
        }
        let now = Instant::now();
        if entries[1].revents != 0 {
            // Shutdown: read nothing more, send what is owed within the drain timeout.
            connection.stop_reading();
            drain_deadline = Some(now + limits.drain_timeout);
            if let Some(begun) = on_drain.take() {
                begun();
            }
            continue;
        }
        if drain_deadline.is_some_and(|d| now >= d) {
            let owed = connection.owed();
            connection.close_first(stream, log);
            return CloseReason::DrainTimeout { owed };
        }
        if idle_deadline.is_some_and(|d| now >= d) {
            // A send buffer the peer drains slowly may not turn writable for longer than
            // the timeout (a Unix socket signals it only once three quarters are free):
            // a peer whose replies the kernel still takes now is not idle.
            if connection.wants_write()
                && matches!(connection.flush_progress(stream, log), Ok(true))
            {
                last_progress = now;
                continue;
            }
            connection.close_first(stream, log);
            return CloseReason::Idle(limits.idle_timeout.unwrap_or_default());
        }
        let ready = poll::ready_of(&entries[0]);
        if ready.readable && connection.wants_read() {
            match connection.read_from(stream, &mut buf, log) {
                Ok(true) => last_progress = now,
                Ok(false) => {}
                Err(reason) => return reason,
            }
        } else if ready.writable && !interest.writable {
            // Writable without asking means a hang-up or an error, with nothing to read or
            // write: the peer is gone, and waiting again would spin.
            return CloseReason::Failed(io::Error::from(io::ErrorKind::ConnectionReset));
        }
    }
}

/// Serves `listeners` from one thread per socket until shutdown fires: each stream
/// listener's thread runs `accept_on(listener)`, which owns the listener so it can close
/// it as soon as it stops accepting, each datagram socket's thread answers
/// datagrams ([`serve_datagrams`]). Once every thread has started, `on_serving` is told.
/// Returns when every thread has returned.
///
/// # Errors
///
/// The first thread's error, a listener or datagram socket that broke; or a thread that
/// could not be started (then `shutdown` is fired, so the ones started stop).
pub fn serve_each_socket(
    listeners: &mut Listeners,
    protocol: &Protocol,
    shutdown: &Shutdown,
    on_serving: &OnServing,
    accept_on: impl Fn(StreamListener) -> io::Result<()> + Sync,
) -> io::Result<()> {
    let LoopSources { streams, datagrams } = LoopSources::take_all(listeners);
    let metrics = listeners.limits.metrics;
    let accept_on = &accept_on;
    std::thread::scope(|scope| {
        let start = || std::thread::Builder::new();
        let accepting = streams.into_iter().map(|listener| {
            let started = start().spawn_scoped(scope, move || accept_on(listener));
            ("a listener", started)
        });
        let answering = datagrams.iter().map(|socket| {
            let serve = move || serve_datagrams(socket, protocol, shutdown, metrics);
            ("a datagram socket", start().spawn_scoped(scope, serve))
        });
        let mut outcome = Ok(());
        let mut threads = Vec::new();
        for (what, started) in accepting.chain(answering) {
            match started {
                Ok(thread) => threads.push(thread),
                Err(e) => {
                    shutdown.fire();
                    outcome = Err(io::Error::other(format!(
                        "cannot start a thread for {what}: {e}"
                    )));
                    break;
                }
            }
        }
        if outcome.is_ok() {
            on_serving.serving();
        }
        for thread in threads {
            // A panicking thread is a bug in reverb: re-raise it rather than hide it.
            let result = thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            outcome = outcome.and(result);
        }
        outcome
    })
}

/// Answers datagrams on `socket` from the calling thread until shutdown fires.
///
/// Each datagram is answered in microseconds, so one thread per socket serves it; a
/// thread per datagram (as socketserver's ThreadingUDPServer does) would cost more than
/// the work it runs.
///
/// # Errors
///
/// A receive error that is not about one datagram.
pub fn serve_datagrams(
    socket: &DatagramSocket,
    protocol: &Protocol,
    shutdown: &Shutdown,
    metrics: Metrics,
) -> io::Result<()> {
    socket.set_nonblocking(true)?;
    let log = LoopLog::new(metrics);
    let mut replier = DatagramReplier::for_socket(protocol.clone(), socket);
    let mut buf = vec![0u8; socket.max_datagram_bytes()];
    loop {
        if wait_for(socket.as_fd(), Interest::READABLE, shutdown, None)? == Wake::Shutdown {
            return Ok(());
        }
        replier.answer_queued(socket, &mut buf, DATAGRAM_BATCH, &log)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_accept_pause_lasts_its_time_unless_shutdown_fires() {
        let shutdown = Shutdown::new().expect("eventfd");
        let started = Instant::now();
        assert!(pause_accepting(&shutdown).expect("poll"));
        assert!(started.elapsed() >= ACCEPT_PAUSE);
        shutdown.fire();
        let started = Instant::now();
        assert!(!pause_accepting(&shutdown).expect("poll"));
        assert!(
            started.elapsed() < ACCEPT_PAUSE,
            "a pause outlasted the shutdown"
        );
    }
}
