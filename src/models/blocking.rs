//! Blocking sockets: one thread waits for one client, serves it to the end, then takes the next.
//!
//! Technique: `accept`, then read and write that one connection until it closes (step 1
//! of the ladder); each listener gets its own such thread.
//! Cost: nothing but one thread per listener; no bookkeeping at all.
//! Limit: serial. While one client is connected, every other client waits in the kernel's
//! accept backlog, and a client that never leaves blocks the listener forever.

use crate::server::one_socket::{accept_until_shutdown, serve_connection, serve_datagrams};
use crate::server::{Listeners, Protocol, RunOptions, ServeError, Shutdown};
use std::thread;

/// Serves each listener serially on its own thread until `shutdown` fires.
///
/// # Errors
///
/// A listener that broke (see `server::accept_action`).
pub fn run(
    listeners: Listeners,
    protocol: Protocol,
    shutdown: Shutdown,
    _options: RunOptions,
) -> Result<(), ServeError> {
    let Listeners {
        streams,
        datagrams,
        limits,
        counter,
        ..
    } = &listeners;
    let metrics = listeners.limits.metrics;
    thread::scope(|scope| {
        let mut threads = Vec::new();
        for listener in streams {
            threads.push(scope.spawn(|| {
                accept_until_shutdown(
                    listener,
                    counter,
                    &shutdown,
                    metrics,
                    |stream, peer, _admission| {
                        // Served right here: the next accept waits until this client is done.
                        serve_connection(stream, peer, &protocol, limits, &shutdown);
                    },
                )
            }));
        }
        for socket in datagrams {
            threads.push(scope.spawn(|| serve_datagrams(socket, &protocol, &shutdown, metrics)));
        }
        join_all(threads)
    })
}

/// Joins listener threads, returning the first error; a panicking thread is a bug in
/// reverb, so it is re-raised rather than hidden.
pub(crate) fn join_all(
    threads: Vec<thread::ScopedJoinHandle<'_, std::io::Result<()>>>,
) -> Result<(), ServeError> {
    let mut first_error = None;
    for handle in threads {
        match handle.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
    first_error.map_or(Ok(()), |e| Err(ServeError::Io(e)))
}
