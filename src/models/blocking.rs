//! Blocking sockets: one thread waits for one client, serves it to the end, then takes the next.
//!
//! Technique: `accept`, then read and write that one connection until it closes, as the
//! tutorials' first servers do (step 1 of the ladder); each listener gets its own such
//! thread.
//! Cost: nothing but one thread per listener; no bookkeeping at all.
//! Limit: serial. While one client is connected, every other client waits in the kernel's
//! accept backlog, and a client that never leaves blocks the listener forever.
//!
//! Idle timeouts: the scan, over the one connection a thread (or child) serves: its
//! `poll` waits no longer than that connection's idle deadline.

use crate::server::one_socket::{
    LingerOn, accept_until_shutdown, serve_connection, serve_each_socket,
};
use crate::server::{Listeners, Protocol, RunOptions, ServeError, Shutdown};

/// Serves each listener serially on its own thread until `shutdown` fires.
///
/// `--threads` is ignored: one thread per listener.
///
/// # Errors
///
/// A listener that broke (see `server::accept_action`).
pub fn run(
    mut listeners: Listeners,
    protocol: Protocol,
    shutdown: Shutdown,
    options: RunOptions,
) -> Result<(), ServeError> {
    let RunOptions {
        threads: _,
        on_serving,
    } = options;
    let (counter, limits) = (listeners.counter.clone(), listeners.limits.clone());
    serve_each_socket(
        &mut listeners,
        &protocol,
        &shutdown,
        &on_serving,
        |listener| {
            let metrics = limits.metrics;
            accept_until_shutdown(
                listener,
                &counter,
                &shutdown,
                metrics,
                |stream, peer, _admission, listener| {
                    // Served right here: the next accept waits until this client is done.
                    // The drain may begin while it is served: new clients are refused then.
                    serve_connection(
                        stream,
                        peer,
                        &protocol,
                        &limits,
                        &shutdown,
                        LingerOn::ThisThread,
                        || drop(listener.take()),
                    );
                },
            )
        },
    )?;
    // Dropping the listeners removes the Unix socket files, once every thread is done.
    drop(listeners);
    Ok(())
}
