//! Thread per connection: every accepted client gets its own OS thread.
//!
//! Technique: the accepting thread spawns a thread that serves the connection with
//! blocking-style code (`socketserver.ThreadingTCPServer`, step 2 of the ladder).
//! Cost: a thread's stack and a context switch per wake-up; thousands of clients mean
//! thousands of threads, and the scheduler, not the program, decides who runs.
//! Limit: memory and scheduler load grow with every connection; `--max-conns` is the cap.
//!
//! Idle timeouts: the scan, over the one connection a thread (or child) serves: its
//! `poll` waits no longer than that connection's idle deadline.

use crate::server::one_socket::{
    LingerOn, accept_until_shutdown, serve_connection, serve_each_socket,
};
use crate::server::{Listeners, Protocol, RunOptions, ServeError, Shutdown};
use std::thread;

/// Stack for connection threads: the handler needs little, and the default 2 MiB of
/// reserved address space per thread is what makes thread-per-connection look costly.
const CONNECTION_STACK_BYTES: usize = 128 * 1024;

/// Serves every listener, one thread per connection, until `shutdown` fires and every
/// connection thread has drained.
///
/// `--threads` is ignored: a thread per connection.
///
/// # Errors
///
/// A listener that broke.
pub fn run(
    mut listeners: Listeners,
    protocol: Protocol,
    shutdown: Shutdown,
    options: RunOptions,
) -> Result<(), ServeError> {
    let (counter, limits) = (listeners.counter.clone(), listeners.limits.clone());
    let RunOptions {
        threads: _,
        on_serving,
    } = options;
    let (protocol, limits, shutdown_ref) = (&protocol, &limits, &shutdown);
    serve_each_socket(
        &mut listeners,
        protocol,
        shutdown_ref,
        &on_serving,
        |listener| {
            thread::scope(|connections| {
                accept_until_shutdown(
                    listener,
                    &counter,
                    shutdown_ref,
                    limits.metrics,
                    |stream, peer, admission, _| {
                        let spawned = thread::Builder::new()
                            .stack_size(CONNECTION_STACK_BYTES)
                            .spawn_scoped(connections, move || {
                                serve_connection(
                                    stream,
                                    peer,
                                    protocol,
                                    limits,
                                    shutdown_ref,
                                    LingerOn::ThisThread,
                                    || {},
                                );
                                drop(admission);
                            });
                        if let Err(e) = spawned {
                            tracing::error!("cannot start a thread for a connection: {e}");
                        }
                    },
                )
                // Leaving this scope waits for every connection thread to drain.
            })
        },
    )?;
    // Dropping the listeners removes the Unix socket files, once every thread is done.
    drop(listeners);
    Ok(())
}
