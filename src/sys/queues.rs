//! Socket queue lengths (`SIOCINQ`, `SIOCOUTQ`): what a stream socket still holds in each
//! direction, as `ioctl(2)` reports it (tcp(7), unix(7)).

use super::cvt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Bytes queued on a stream socket, as the kernel counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Queued {
    /// Bytes that arrived and were not read yet (`SIOCINQ`, the same request as
    /// `FIONREAD`).
    pub unread: usize,
    /// Bytes sent that the peer has not yet taken: on TCP not yet acknowledged by the
    /// peer's kernel, on a Unix socket not yet read by the peer (`SIOCOUTQ`, the same
    /// request as `TIOCOUTQ`).
    pub unsent: usize,
}

/// Both queue lengths of the stream socket `fd`.
///
/// # Errors
///
/// The OS error of `ioctl`, for example `EINVAL` on a listening socket.
pub fn queued(fd: BorrowedFd<'_>) -> io::Result<Queued> {
    let mut unread: libc::c_int = 0;
    let mut unsent: libc::c_int = 0;
    // SAFETY: `unread` is a valid, writable int for the duration of the call, the size
    // FIONREAD writes; the caller's borrow keeps `fd` open.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut unread) })?;
    // SAFETY: as above, for the int TIOCOUTQ writes.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut unsent) })?;
    Ok(Queued {
        unread: usize::try_from(unread).unwrap_or(0),
        unsent: usize::try_from(unsent).unwrap_or(0),
    })
}
