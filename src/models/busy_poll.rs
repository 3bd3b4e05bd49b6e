//! Busy polling: non-blocking sockets, tried one after another in an endless loop.
//!
//! Technique: every pass tries `accept` on each listener, `recvfrom` on each datagram
//! socket, and `read` and `write` on each connection; `WouldBlock` means "nothing yet, try
//! the next one", as the tutorial's non-blocking server does (step 5 of the ladder), with
//! partial writes parked in the connection's buffer.
//! Cost: the loop never sleeps, so it burns a whole core even with no client at all, and
//! makes a system call per connection per pass whether or not anything arrived.
//! Limit: CPU. Each pass ends with `yield_now`, so other threads on the core get their
//! turn, but with nothing else runnable the yield returns at once: still 100% of a core.
//!
//! Idle timeouts: a scan of every connection per pass, which the pass already pays.

use crate::server::readiness::{IdleCheck, Interest, ReadinessCore};
use crate::server::{Listeners, Protocol, RunOptions, ServeError, Shutdown};
use crate::slab::Token;
use std::thread;

/// Serves every listener from one spinning thread until `shutdown` fires and the drain
/// ends.
///
/// `--threads` is ignored: one thread already takes a whole core.
///
/// # Errors
///
/// A listener or datagram socket that broke.
pub fn run(
    mut listeners: Listeners,
    protocol: Protocol,
    shutdown: Shutdown,
    options: RunOptions,
) -> Result<(), ServeError> {
    let mut core = ReadinessCore::single_loop(&mut listeners, protocol, shutdown, IdleCheck::Scan)?;
    options.on_serving.serving();
    // The sources of one pass, taken before serving any: closing a connection empties its
    // slab slot, so this list is never edited while it is walked (the tutorial's
    // non-blocking server removed clients from the list it was iterating and skipped the
    // next one).
    let mut tokens: Vec<Token> = Vec::new();
    while !core.is_finished() {
        core.expire();
        tokens.clear();
        tokens.extend(core.interests().map(|(token, _, _)| token));
        for &token in &tokens {
            // Every source is tried as if the kernel had said it was ready: the try is
            // the poll (for the shutdown eventfd, a look at whether it fired).
            core.handle(token, Interest::BOTH)?;
        }
        thread::yield_now();
    }
    // Dropping the listeners removes the Unix socket files, once the loop is done.
    drop(listeners);
    Ok(())
}
