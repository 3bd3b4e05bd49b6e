//! `poll(2)`: one thread sleeps until any descriptor in a pollfd array is ready.
//!
//! Technique: rebuild an array of (fd, wanted events) each turn, sleep in `poll`, then
//! serve the entries whose `revents` came back set (the select tutorial's loop, step 7 of the ladder, without select's cap).
//! Cost: every wake-up copies the whole array into the kernel and scans it, even when only
//! one connection is ready: O(connections) per event.
//! Limit: no FD_SETSIZE cap, but the O(n) scan makes thousands of mostly idle connections
//! cost CPU on every wake-up; `epoll` keeps the interest list in the kernel instead.

use crate::server::readiness::{ReadinessServer, Ready, Source};
use crate::server::{Listeners, Protocol, RunOptions, ServeError, Shutdown};
use crate::sys::poll::{self, POLLERR, POLLHUP, POLLIN, POLLOUT, pollfd};
use std::time::Instant;

/// Serves every listener from one thread until `shutdown` fires and the drain ends.
///
/// `--threads` is ignored: one array, one thread.
///
/// # Errors
///
/// A listener that broke, or `poll` itself failing.
pub fn run(
    listeners: Listeners,
    protocol: Protocol,
    shutdown: Shutdown,
    _options: RunOptions,
) -> Result<(), ServeError> {
    let mut server = ReadinessServer::new(listeners, protocol, shutdown)?;
    // `entries[i]` is the descriptor of `sources[i]`; both are rebuilt every turn.
    let mut entries: Vec<pollfd> = Vec::new();
    let mut sources: Vec<Source> = Vec::new();
    while !server.is_finished() {
        let now = Instant::now();
        entries.clear();
        sources.clear();
        for (source, fd, interest) in server.interests(now) {
            let mut events = 0;
            if interest.read {
                events |= POLLIN;
            }
            if interest.write {
                events |= POLLOUT;
            }
            entries.push(poll::entry(fd, events));
            sources.push(source);
        }
        poll::poll(&mut entries, server.timeout(now))?;
        for (entry, &source) in entries.iter().zip(&sources) {
            // An error or hang-up is reported whatever was asked for; the next read or
            // write turns it into an error, and that connection closes.
            let ready = Ready {
                readable: entry.revents & (POLLIN | POLLHUP | POLLERR) != 0,
                writable: entry.revents & (POLLOUT | POLLHUP | POLLERR) != 0,
            };
            if ready.readable || ready.writable {
                server.handle(source, ready)?;
            }
        }
        server.expire(Instant::now());
    }
    Ok(())
}
