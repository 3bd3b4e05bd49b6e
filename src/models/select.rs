//! `select(2)`: one thread sleeps until any connection is readable or writable.
//!
//! Technique: rebuild read and write fd sets each turn (write interest only while output
//! is owed); serve whichever come back ready (step 6 of the ladder).
//! Cost: every wake-up copies both bitmaps into the kernel and scans every connection,
//! even when only one is ready.
//! Limit: an fd >= FD_SETSIZE (1024) cannot be watched; that connection is logged and closed.

use crate::server::readiness::{ReadinessServer, Ready, Source};
use crate::server::{Listeners, Protocol, RunOptions, ServeError, Shutdown};
use crate::sys::select::{FD_SETSIZE, FdSet, select};
use std::os::fd::{AsRawFd, RawFd};
use std::time::Instant;

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
    listeners: Listeners,
    protocol: Protocol,
    shutdown: Shutdown,
    _options: RunOptions,
) -> Result<(), ServeError> {
    let mut server = ReadinessServer::new(listeners, protocol, shutdown)?;
    // Connections are refused at accept: passing their fd to FD_SET would write outside
    // the bitmap, and leaving them unwatched would hang their clients.
    server.refuse_fds_from(FD_SETSIZE, "FD_SETSIZE");
    let (mut read, mut write) = (FdSet::new(), FdSet::new());
    // The sources watched this turn, each with its descriptor, to find them in the sets.
    let mut watched: Vec<(Source, RawFd)> = Vec::new();
    while !server.is_finished() {
        let now = Instant::now();
        read.clear();
        write.clear();
        watched.clear();
        for (source, fd, interest) in server.interests(now) {
            let fd = fd.as_raw_fd();
            // Only our own sockets can fail here (connections past the cap were refused):
            // the server cannot run without them, so it stops with the reason.
            if interest.read {
                read.insert(fd)?;
            }
            if interest.write {
                write.insert(fd)?;
            }
            watched.push((source, fd));
        }
        select(&mut read, &mut write, server.timeout(now))?;
        for &(source, fd) in &watched {
            let ready = Ready {
                readable: read.contains(fd),
                writable: write.contains(fd),
            };
            if ready.readable || ready.writable {
                server.handle(source, ready)?;
            }
        }
        server.expire(Instant::now());
    }
    Ok(())
}
