//! `select(2)`: sleep until a descriptor in a read or write set is ready, or a timeout passes.
//!
//! An `fd_set` is a fixed bitmap of [`FD_SETSIZE`] bits. `FD_SET` with a larger descriptor
//! writes past its end (undefined behaviour, and on glibc a fortify abort at best), so
//! [`FdSet::insert`] refuses such descriptors instead of handing them to `FD_SET`.

use super::cvt_r;
use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

/// How many descriptors an `fd_set` can hold: descriptors `0..FD_SETSIZE`.
pub const FD_SETSIZE: usize = libc::FD_SETSIZE;

/// A set of descriptors for [`select`].
///
/// # Invariant
///
/// Every descriptor in `set` is in `0..FD_SETSIZE`, and `highest` is the largest of them
/// (or -1 when the set is empty).
pub struct FdSet {
    set: libc::fd_set,
    highest: RawFd,
}

impl FdSet {
    /// An empty set.
    pub fn new() -> Self {
        let mut set = std::mem::MaybeUninit::<libc::fd_set>::uninit();
        // SAFETY: `set` points to writable memory of one fd_set; FD_ZERO initialises every
        // bit of it, so `assume_init` below reads initialised memory.
        unsafe { libc::FD_ZERO(set.as_mut_ptr()) };
        // SAFETY: FD_ZERO just initialised the whole fd_set.
        let set = unsafe { set.assume_init() };
        FdSet { set, highest: -1 }
    }

    /// Empties the set, to rebuild it for the next turn.
    pub fn clear(&mut self) {
        // SAFETY: `self.set` is a valid, writable fd_set owned by this value.
        unsafe { libc::FD_ZERO(&mut self.set) };
        self.highest = -1;
    }

    /// Adds `fd` to the set.
    ///
    /// # Errors
    ///
    /// `InvalidInput` when `fd` is negative or `>= FD_SETSIZE`: `select(2)` cannot watch it,
    /// and `FD_SET` would write outside the bitmap.
    pub fn insert(&mut self, fd: RawFd) -> io::Result<()> {
        if !is_selectable(fd) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("fd {fd} >= FD_SETSIZE ({FD_SETSIZE}): select(2) cannot watch it"),
            ));
        }
        // SAFETY: `fd` is in `0..FD_SETSIZE` (checked just above), so FD_SET writes a bit
        // inside `self.set`, a valid, writable fd_set.
        unsafe { libc::FD_SET(fd, &mut self.set) };
        self.highest = self.highest.max(fd);
        Ok(())
    }

    /// Whether `fd` is in the set (after [`select`]: whether it is ready).
    pub fn contains(&self, fd: RawFd) -> bool {
        // SAFETY: `fd` is in `0..FD_SETSIZE` (checked first), so FD_ISSET reads a bit
        // inside `self.set`, a valid fd_set.
        is_selectable(fd) && unsafe { libc::FD_ISSET(fd, &self.set) }
    }
}

impl Default for FdSet {
    fn default() -> Self {
        FdSet::new()
    }
}

/// Whether `select(2)` can watch `fd` at all: only descriptors below [`FD_SETSIZE`] fit.
pub fn is_selectable(fd: RawFd) -> bool {
    usize::try_from(fd).is_ok_and(|fd| fd < FD_SETSIZE)
}

/// Waits until a descriptor of `read` is readable or one of `write` is writable, or
/// `timeout` passes (`None`: no timeout); returns how many are ready. On return each set
/// holds only its ready descriptors.
///
/// The descriptors in the sets must stay open for the call.
///
/// # Errors
///
/// The OS error of `select`, other than `EINTR` (retried; on error Linux leaves the sets
/// as they were, so the retry waits for the same descriptors).
pub fn select(read: &mut FdSet, write: &mut FdSet, timeout: Option<Duration>) -> io::Result<usize> {
    let nfds = read.highest.max(write.highest) + 1;
    let ready = cvt_r(|| {
        // Linux rewrites the timeval with the time left, so each attempt gets a fresh one.
        let mut timeval = timeout.map(|t| libc::timeval {
            tv_sec: libc::time_t::try_from(t.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_usec: libc::suseconds_t::from(t.subsec_micros()),
        });
        let timeval_ptr = timeval
            .as_mut()
            .map_or(std::ptr::null_mut(), std::ptr::from_mut);
        // SAFETY: both sets are valid, writable fd_sets holding only descriptors below
        // `nfds` (their invariant); the except set may be null; `timeval_ptr` is null or
        // points to `timeval`, which lives across the call.
        unsafe {
            libc::select(
                nfds,
                &mut read.set,
                &mut write.set,
                std::ptr::null_mut(),
                timeval_ptr,
            )
        }
    })?;
    Ok(ready as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn refuses_descriptors_past_the_bitmap() {
        let mut set = FdSet::new();
        assert!(set.insert(1024).is_err());
        assert!(set.insert(-1).is_err());
        assert!(set.insert(1023).is_ok());
        assert!(set.contains(1023));
        assert!(!set.contains(1024));
        set.clear();
        assert!(!set.contains(1023));
    }

    #[test]
    fn reports_readable_and_writable() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut read, mut write) = (FdSet::new(), FdSet::new());
        read.insert(a.as_raw_fd()).unwrap();
        write.insert(b.as_raw_fd()).unwrap();
        assert_eq!(
            select(&mut read, &mut write, Some(Duration::ZERO)).unwrap(),
            1
        );
        assert!(!read.contains(a.as_raw_fd()));
        assert!(write.contains(b.as_raw_fd()));
        std::io::Write::write_all(&mut &b, b"x").unwrap();
        read.insert(a.as_raw_fd()).unwrap();
        write.clear();
        assert_eq!(select(&mut read, &mut write, None).unwrap(), 1);
        assert!(read.contains(a.as_raw_fd()));
    }
}
