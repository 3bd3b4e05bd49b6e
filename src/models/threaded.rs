//! Thread per connection: every accepted client gets its own OS thread.
//!
//! Technique: the accepting thread spawns a thread that serves the connection with
//! blocking-style code (`socketserver.ThreadingTCPServer`, step 2 of the ladder).
//! Cost: a thread's stack and a context switch per wake-up; thousands of clients mean
//! thousands of threads, and the scheduler, not the program, decides who runs.
//! Limit: memory and scheduler load grow with every connection; `--max-conns` is the cap.

use super::blocking::join_all;
use crate::server::one_socket::{accept_until_shutdown, serve_connection, serve_datagrams};
use crate::server::{Listeners, Protocol, RunOptions, ServeError, Shutdown};
use std::thread;

/// Stack for connection threads: the handler needs little, and the default 2 MiB of
/// reserved address space per thread is what makes thread-per-connection look costly.
const CONNECTION_STACK_BYTES: usize = 128 * 1024;

/// Serves every listener, one thread per connection, until `shutdown` fires and every
/// connection thread has drained.
///
/// # Errors
///
/// A listener that broke.
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
            let (protocol, shutdown) = (&protocol, &shutdown);
            threads.push(scope.spawn(move || {
                thread::scope(|connections| {
                    accept_until_shutdown(
                        listener,
                        counter,
                        shutdown,
                        metrics,
                        |stream, peer, admission| {
                            let spawned = thread::Builder::new()
                                .stack_size(CONNECTION_STACK_BYTES)
                                .spawn_scoped(connections, move || {
                                    serve_connection(stream, peer, protocol, limits, shutdown);
                                    drop(admission);
                                });
                            if let Err(e) = spawned {
                                tracing::error!("cannot start a thread for a connection: {e}");
                            }
                        },
                    )
                    // Leaving this scope waits for every connection thread to drain.
                })
            }));
        }
        for socket in datagrams {
            threads.push(scope.spawn(|| serve_datagrams(socket, &protocol, &shutdown, metrics)));
        }
        join_all(threads)
    })
}
