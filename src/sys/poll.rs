//! `poll(2)`: sleep until one of a few descriptors is ready, or a timeout passes.

use super::{Interest, cvt_r};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

pub use libc::{POLLERR, POLLHUP, POLLIN, POLLNVAL, POLLOUT, POLLRDHUP, pollfd};

/// One entry of a poll set: the fd, the events wanted, and (after [`poll`]) those that
/// happened.
pub fn entry(fd: BorrowedFd<'_>, events: i16) -> pollfd {
    pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    }
}

/// An entry waiting for `interest` on `fd`.
pub fn entry_for(fd: BorrowedFd<'_>, interest: Interest) -> pollfd {
    let mut events = 0;
    if interest.readable {
        events |= POLLIN;
    }
    if interest.writable {
        events |= POLLOUT;
    }
    entry(fd, events)
}

/// What an entry came back with. An error or hang-up is reported whatever was asked for,
/// and counts as both: the next read or write turns it into an error.
pub fn ready_of(entry: &pollfd) -> Interest {
    let failed = entry.revents & (POLLHUP | POLLERR) != 0;
    Interest {
        readable: failed || entry.revents & POLLIN != 0,
        writable: failed || entry.revents & POLLOUT != 0,
    }
}

/// An entry that poll skips (a negative fd), for slots that are momentarily unused.
pub fn unused_entry() -> pollfd {
    pollfd {
        fd: -1,
        events: 0,
        revents: 0,
    }
}

/// Waits until an entry is ready or `timeout` passes (`None`: no timeout), and returns
/// how many entries have `revents` set.
///
/// The fds in `entries` must stay open for the call; callers build them with [`entry`]
/// from `BorrowedFd`s that outlive the call.
///
/// # Errors
///
/// The OS error of `poll`, other than `EINTR` (retried).
pub fn poll(entries: &mut [pollfd], timeout: Option<Duration>) -> io::Result<usize> {
    let timeout_ms = timeout_ms(timeout);
    // SAFETY: `entries` is a valid, writable array of `entries.len()` pollfd structs for
    // the duration of the call; poll only writes their `revents` fields.
    let ready = cvt_r(|| unsafe {
        libc::poll(
            entries.as_mut_ptr(),
            entries.len() as libc::nfds_t,
            timeout_ms,
        )
    })?;
    Ok(ready as usize)
}

/// A poll-style timeout in milliseconds, rounded up so a sleep never ends early and spins.
pub fn timeout_ms(timeout: Option<Duration>) -> i32 {
    match timeout {
        None => -1,
        Some(t) => {
            let ms = t.as_micros().div_ceil(1000);
            i32::try_from(ms).unwrap_or(i32::MAX)
        }
    }
}
