//! `select(2)`: one thread sleeps until any connection is readable or writable.
//!
//! Technique: rebuild read and write fd sets each turn (write interest only while output
//! is owed); serve whichever come back ready, as the tutorial's select server does (step 6
//! of the ladder).
//! Cost: every wake-up copies both bitmaps into the kernel and scans every connection,
//! even when only one is ready.
//! Limit: an fd >= FD_SETSIZE (1024) cannot be watched; that connection is logged and closed.
//!
//! Idle timeouts: a scan of every connection per turn, which the rebuild already pays.

use crate::server::readiness::{IdleCheck, Interest, ReadinessCore};
use crate::server::{Listeners, Protocol, RunOptions, ServeError, Shutdown};
use crate::slab::Token;
use crate::sys::select::{FD_SETSIZE, FdSet, select};
use std::os::fd::{AsRawFd, RawFd};

/// Serves every listener from one thread until `shutdown` fires and the drain ends.
///
/// `--threads` is ignored: one pair of sets, one thread.
///
/// # Errors
///
/// A listener, datagram socket or the shutdown eventfd with a descriptor that `select`
/// cannot watch (they are opened first, so only a process that starts with ~1,000
/// descriptors open hits this); a listener that broke; `select` itself failing.
pub fn run(
    mut listeners: Listeners,
    protocol: Protocol,
    shutdown: Shutdown,
    options: RunOptions,
) -> Result<(), ServeError> {
    let (mut read, mut write) = (FdSet::new(), FdSet::new());
    // The sources watched this turn, each with its descriptor, to find them in the sets.
    let mut watched: Vec<(Token, RawFd)> = Vec::new();
    let mut core = ReadinessCore::single_loop(&mut listeners, protocol, shutdown, IdleCheck::Scan)?;
    // Connections are refused at accept: passing their fd to FD_SET would write outside
    // the bitmap, and leaving them unwatched would hang their clients.
    core.refuse_fds_from(FD_SETSIZE, "FD_SETSIZE");
    options.on_serving.serving();
    while !core.is_finished() {
        read.clear();
        write.clear();
        watched.clear();
        for (token, fd, interest) in core.interests() {
            let fd = fd.as_raw_fd();
            // Only our own sockets can fail here (connections past the cap were refused):
            // the server cannot run without them, so it stops with the reason.
            if interest.readable {
                read.insert(fd)?;
            }
            if interest.writable {
                write.insert(fd)?;
            }
            watched.push((token, fd));
        }
        select(&mut read, &mut write, core.timeout())?;
        core.expire();
        for &(token, fd) in &watched {
            let ready = Interest {
                readable: read.contains(fd),
                writable: write.contains(fd),
            };
            if ready != Interest::NONE {
                core.handle(token, ready)?;
            }
        }
    }
    // Dropping the listeners removes the Unix socket files, once the loop is done.
    drop(listeners);
    Ok(())
}
