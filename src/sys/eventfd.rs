//! `eventfd(2)`: a counter in the kernel that any thread (or signal handler) can make
//! readable, so a loop asleep in `poll` or `epoll_wait` wakes up.

use super::{cvt, cvt_r};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// An eventfd, non-blocking and close-on-exec.
#[derive(Debug)]
pub struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    /// A new eventfd with a count of zero (not readable).
    ///
    /// # Errors
    ///
    /// The OS error of `eventfd`, for example `EMFILE`.
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd takes no pointers; a non-negative result is a new fd we own.
        let raw = cvt(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
        // SAFETY: `raw` was just returned by eventfd, is open, and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(EventFd { fd })
    }

    /// Adds one to the count, making the fd readable until [`EventFd::drain`].
    ///
    /// # Errors
    ///
    /// The OS error of `write`; a full counter (`EAGAIN`) is not an error, since the fd is
    /// readable then anyway.
    pub fn notify(&self) -> io::Result<()> {
        notify_raw(self.fd.as_fd())
    }

    /// Resets the count to zero, so the fd is no longer readable.
    ///
    /// # Errors
    ///
    /// The OS error of `read`, other than "already zero".
    pub fn drain(&self) -> io::Result<()> {
        let mut count = [0u8; 8];
        // SAFETY: `count` is valid for 8 writable bytes, the size eventfd reads require;
        // `self.fd` is open for the duration of the call.
        match cvt_r(|| unsafe {
            libc::read(self.fd.as_raw_fd(), count.as_mut_ptr().cast(), count.len())
        }) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Adds one to the count of the eventfd `fd`.
///
/// # Errors
///
/// As [`EventFd::notify`].
pub fn notify_raw(fd: BorrowedFd<'_>) -> io::Result<()> {
    let one = 1u64.to_ne_bytes();
    // SAFETY: `one` is valid for 8 readable bytes, the size eventfd writes require; the
    // borrow keeps `fd` open for the duration of the call.
    match cvt_r(|| unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) }) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
        Err(e) => Err(e),
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
