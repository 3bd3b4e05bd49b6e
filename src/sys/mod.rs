//! The only code that calls the operating system directly; every `unsafe` lives here.
//!
//! Each function is a safe wrapper over one system call, taking `BorrowedFd`s and byte
//! slices, so the models above read like the tutorial's Python and still never hand the
//! kernel a bad pointer. Errors follow std's shape: a negative return becomes
//! `io::Error::last_os_error()` through [`cvt`], and [`cvt_r`] retries `EINTR` in one place.
#![allow(unsafe_code)]

pub mod activation;
pub mod affinity;
pub mod async_fd;
pub mod bind_no_port;
pub mod datagram;
pub mod dir_lock;
pub mod epoll;
pub mod errno;
pub mod eventfd;
pub mod poll;
pub mod process;
pub mod queues;
pub mod rusage;
pub mod select;
pub mod shared_memory;
pub mod signal;
pub mod stream;
pub mod uring;

use std::io;

/// Readable and/or writable: what a loop waits for on a descriptor, or what it found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interest {
    /// Input, a connection to accept, EOF or an error.
    pub readable: bool,
    /// Room to write (or an error).
    pub writable: bool,
}

impl Interest {
    /// Nothing: not watched.
    pub const NONE: Interest = Interest {
        readable: false,
        writable: false,
    };
    /// Readable only.
    pub const READABLE: Interest = Interest {
        readable: true,
        writable: false,
    };
    /// Writable only.
    pub const WRITABLE: Interest = Interest {
        readable: false,
        writable: true,
    };
    /// Both.
    pub const BOTH: Interest = Interest {
        readable: true,
        writable: true,
    };
}

/// Integer results of system calls: `-1` means "look at errno".
pub trait IsMinusOne {
    /// Whether this is the error return.
    fn is_minus_one(&self) -> bool;
}

macro_rules! impl_is_minus_one {
    ($($t:ident)*) => ($(impl IsMinusOne for $t {
        fn is_minus_one(&self) -> bool {
            *self == -1
        }
    })*)
}

impl_is_minus_one! { i8 i16 i32 i64 isize }

/// Turns a system call's `-1` into the `io::Error` for errno.
///
/// # Errors
///
/// The OS error the call reported.
pub fn cvt<T: IsMinusOne>(result: T) -> io::Result<T> {
    if result.is_minus_one() {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

/// Runs `call` until it does not fail with `EINTR`.
///
/// # Errors
///
/// The first OS error other than `EINTR`.
pub fn cvt_r<T: IsMinusOne>(mut call: impl FnMut() -> T) -> io::Result<T> {
    loop {
        match cvt(call()) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

/// Raises the soft open-file limit to the hard limit, so a model that holds many
/// connections is limited by the administrator's ceiling and not by a shell default.
///
/// # Errors
///
/// The OS error of `getrlimit` or `setrlimit`.
pub fn raise_open_file_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable rlimit for the duration of the call.
    cvt(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) })?;
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: `limit` is a valid rlimit read just above; only the soft value changed.
        cvt(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) })?;
    }
    Ok(limit.rlim_cur)
}
