//! `epoll(7)`: one reactor thread per core sleeps until the kernel names the ready sockets.
//!
//! Technique: the interest list lives in the kernel; `epoll_ctl` runs only when a
//! connection's interest changes, and a wait returns only the ready sockets, each read
//! once per wake-up (step 8 of the ladder).
//! Cost: O(ready) per wake-up, plus an `epoll_ctl` per change of interest.
//! Limit: Linux only; one slow handler stalls every connection of its loop.
//!
//! Idle timeouts: a coarse timing wheel, so thousands of idle connections cost nothing
//! per wake-up.
//!
//! Connections are edge-triggered (`EPOLLET`); the loop's own sockets (listeners, datagram
//! sockets, the shutdown eventfd) are level-triggered. Level-triggered, a wait puts every
//! connection it returned back on the ready list, and the next wait polls each of them
//! again only to find most already read: one socket poll per message that edge-triggered
//! epoll does not make (4-5 % of `epoll`'s server CPU per message at 1 KiB, paired
//! windows in docs/benchmarks.md). Edge-triggered, a connection is reported only when
//! something new arrives, so a read must not leave input behind unseen: the loop still
//! reads once per report, and a read that filled all it asked for is served again next
//! turn without waiting (`ReadinessCore::handle_edge`); a short TCP read took everything
//! queued (tcp_recvmsg copies until the queue is empty). Where a short read proves
//! nothing, the connection is served again until a read finds nothing: after the peer's
//! EOF came (`EPOLLRDHUP`: the EOF is still to be read), when urgent data is queued
//! (`EPOLLPRI`: a read stops at the urgent mark), and on Unix stream sockets (a read stops
//! after a message that carried descriptors). Backpressure stays a matter of dropping
//! readable from the interest when the write buffer fills: adding it back (`EPOLL_CTL_MOD`)
//! makes the kernel look again and report the input that waited.
//!
//! Loops: every loop watches the same listeners and datagram sockets, exclusively
//! (`AcceptQueues` explains the choice for every multi-loop model).

use crate::server::event_loops::{LoopSources, run_loops, split_sources};
use crate::server::readiness::{IdleCheck, Interest, LoopConfig, ReadinessCore};
use crate::server::{Listeners, Protocol, RunOptions, ServeError, Shutdown};
use crate::slab::Token;
use crate::sys::epoll::{Epoll, Events, Trigger};
use std::io;
use std::os::fd::BorrowedFd;

/// Events one `epoll_wait` can return.
const EVENTS_PER_WAIT: usize = 1024;

/// Serves every listener with `--threads` event loops (default: one per core) until
/// `shutdown` fires and the drain ends.
///
/// # Errors
///
/// Setting up a loop failed, or a listener broke (the other loops then drain and stop).
pub fn run(
    mut listeners: Listeners,
    protocol: Protocol,
    shutdown: Shutdown,
    options: RunOptions,
) -> Result<(), ServeError> {
    let config = LoopConfig::new(&listeners, protocol, shutdown.clone());
    let loops = super::loop_count(&options);
    let sources = split_sources(&mut listeners, loops, true)?;
    let start = |_, sources: LoopSources| {
        let core = ReadinessCore::new(sources, config.clone(), IdleCheck::Wheel)?;
        Ok((Epoll::new()?, core))
    };
    let serve = |(epoll, core)| serve_loop(&epoll, core, loops > 1);
    run_loops(
        "epoll",
        sources,
        &shutdown,
        &options.on_serving,
        start,
        serve,
    )?;
    // Dropping the listeners removes the Unix socket files, once every loop is done.
    drop(listeners);
    Ok(())
}

fn serve_loop(epoll: &Epoll, mut core: ReadinessCore, is_sharing: bool) -> io::Result<()> {
    let mut events = Events::with_capacity(EVENTS_PER_WAIT);
    let mut registry = Registry { epoll, is_sharing };
    while !core.is_finished() {
        core.sync(|token, fd, watched, wanted| registry.update(token, fd, watched, wanted))?;
        epoll.wait(&mut events, core.timeout())?;
        core.expire();
        core.serve_again();
        for event in events.iter() {
            core.handle_edge(
                event.token,
                event.ready(),
                event.is_read_closed,
                event.has_urgent,
            )?;
            if is_sharing && core.is_listener(event.token) && core.is_accepting() {
                // EPOLLEXCLUSIVE wakes the first idle epoll on the listener's wait queue;
                // re-adding moves this loop to the back, so new connections go round the
                // loops instead of all to loop 0.
                if let Some(fd) = core.fd(event.token) {
                    epoll.delete(fd)?;
                    epoll.add(fd, event.token, Interest::READABLE, Trigger::Exclusive)?;
                }
            }
        }
    }
    Ok(())
}

/// What epoll adds to the readiness core: the interest list kept in the kernel.
struct Registry<'a> {
    epoll: &'a Epoll,
    /// Whether other loops watch the same listeners and datagram sockets.
    is_sharing: bool,
}

impl Registry<'_> {
    fn update(
        &mut self,
        token: Token,
        fd: BorrowedFd<'_>,
        watched: Interest,
        wanted: Interest,
    ) -> io::Result<()> {
        // The loop's own sockets (reserved tokens) may be shared with the other loops; the
        // shutdown eventfd must wake them all, so it is never exclusive. Connections are
        // edge-triggered (the module's comment says why).
        let trigger = match token.reserved_index() {
            None => Trigger::Edge,
            Some(n) if self.is_sharing && n > 0 => Trigger::Exclusive,
            Some(_) => Trigger::Level,
        };
        match (watched == Interest::NONE, wanted == Interest::NONE) {
            (true, _) => self.epoll.add(fd, token, wanted, trigger),
            (false, true) => self.epoll.delete(fd),
            (false, false) => self.epoll.modify(fd, token, wanted, trigger),
        }
    }
}
