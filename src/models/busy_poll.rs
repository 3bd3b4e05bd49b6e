//! Busy polling: non-blocking sockets, tried one after another in an endless loop.
//!
//! Technique: every pass tries `accept` on each listener, `recvfrom` on each datagram
//! socket, and `read` and `write` on each connection; `WouldBlock` means "nothing yet, try
//! the next one" (step 5 of the ladder), with partial writes parked in
//! the connection's buffer.
//! Cost: the loop never sleeps, so it burns a whole core even with no client at all, and
//! makes a system call per connection per pass whether or not anything arrived.
//! Limit: CPU. Each pass ends with `yield_now`, so other threads on the core get their
//! turn, but with nothing else runnable the yield returns at once: still 100% of a core.

use crate::server::readiness::{ReadinessServer, Ready, Source};
use crate::server::{Listeners, Protocol, RunOptions, ServeError, Shutdown};
use std::thread;
use std::time::Instant;

/// Every source is tried as if the kernel had said it was ready: the try is the poll.
const TRY_EVERYTHING: Ready = Ready {
    readable: true,
    writable: true,
};

/// Serves every listener from one spinning thread until `shutdown` fires and the drain
/// ends.
///
/// `--threads` is ignored: one thread already takes a whole core.
///
/// # Errors
///
/// A listener or datagram socket that broke.
pub fn run(
    listeners: Listeners,
    protocol: Protocol,
    shutdown: Shutdown,
    _options: RunOptions,
) -> Result<(), ServeError> {
    let mut server = ReadinessServer::new(listeners, protocol, shutdown)?;
    // The sources of one pass, taken before serving any: closing a connection empties its
    // slab slot, so this list is never edited while it is walked (a tutorial's server removed
    // clients from the list it was iterating and skipped the next one).
    let mut sources: Vec<Source> = Vec::new();
    while !server.is_finished() {
        // Nothing sleeps on the eventfd here, so ask for shutdown on every pass; once
        // fired, the answer is cached and costs no system call.
        if server.shutdown().is_fired() {
            server.begin_drain();
        }
        sources.clear();
        sources.extend(
            server
                .interests(Instant::now())
                .map(|(source, _, _)| source)
                .filter(|source| *source != Source::Shutdown),
        );
        for &source in &sources {
            server.handle(source, TRY_EVERYTHING)?;
        }
        server.expire(Instant::now());
        thread::yield_now();
    }
    Ok(())
}
