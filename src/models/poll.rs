//! `poll(2)`: one thread sleeps until any descriptor in a pollfd array is ready.
//!
//! Technique: rebuild an array of (fd, wanted events) each turn, sleep in `poll`, then
//! serve the entries whose `revents` came back set: the tutorial's select loop without
//! select's cap (step 7 of the ladder).
//! Cost: every wake-up copies the whole array into the kernel and scans it, even when only
//! one connection is ready: O(connections) per event.
//! Limit: no FD_SETSIZE cap, but the O(n) scan makes thousands of mostly idle connections
//! cost CPU on every wake-up; `epoll` keeps the interest list in the kernel instead.
//!
//! Idle timeouts: a scan of every connection per turn, which the rebuild already pays.

use crate::server::readiness::{IdleCheck, Interest, ReadinessCore};
use crate::server::{Listeners, Protocol, RunOptions, ServeError, Shutdown};
use crate::slab::Token;
use crate::sys::poll::{self, pollfd};

/// Serves every listener from one thread until `shutdown` fires and the drain ends.
///
/// `--threads` is ignored: one array, one thread.
///
/// # Errors
///
/// A listener that broke, or `poll` itself failing.
pub fn run(
    mut listeners: Listeners,
    protocol: Protocol,
    shutdown: Shutdown,
    options: RunOptions,
) -> Result<(), ServeError> {
    // `entries[i]` is the descriptor of `tokens[i]`; both are rebuilt every turn.
    let mut entries: Vec<pollfd> = Vec::new();
    let mut tokens: Vec<Token> = Vec::new();
    let mut core = ReadinessCore::single_loop(&mut listeners, protocol, shutdown, IdleCheck::Scan)?;
    options.on_serving.serving();
    while !core.is_finished() {
        entries.clear();
        tokens.clear();
        for (token, fd, interest) in core.interests() {
            entries.push(poll::entry_for(fd, interest));
            tokens.push(token);
        }
        poll::poll(&mut entries, core.timeout())?;
        core.expire();
        for (entry, &token) in entries.iter().zip(&tokens) {
            let ready = poll::ready_of(entry);
            if ready != Interest::NONE {
                core.handle(token, ready)?;
            }
        }
    }
    // Dropping the listeners removes the Unix socket files, once the loop is done.
    drop(listeners);
    Ok(())
}
