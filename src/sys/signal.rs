//! Turning SIGTERM and SIGINT into a readable eventfd.
//!
//! A signal handler may call only async-signal-safe functions, and `write(2)` is one. The
//! handler writes to the shutdown eventfd, so every loop already asleep on that fd wakes up
//! without a dedicated signal thread; that matters to `forking`, whose parent must stay
//! single-threaded to fork safely.

use super::cvt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicI32, Ordering};

/// The eventfd the handler notifies; -1 until [`notify_on_terminate`] runs.
///
/// # Invariant
///
/// Once set, the fd stays open until the process exits: the `Shutdown` that owns it is
/// leaked by `notify_on_terminate`'s caller contract (it lives as long as the server).
static SHUTDOWN_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_terminate(_signal: libc::c_int) {
    let fd = SHUTDOWN_FD.load(Ordering::Relaxed);
    if fd < 0 {
        return;
    }
    // SAFETY: errno is thread-local; reading it here is sound and async-signal-safe.
    let saved_errno = unsafe { *libc::__errno_location() };
    let one = 1u64.to_ne_bytes();
    // SAFETY: `one` is valid for 8 readable bytes; `fd` stays open for the life of the
    // process (invariant of SHUTDOWN_FD). A failed write is harmless: the counter is
    // already non-zero then.
    let _ = unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) };
    // SAFETY: restores this thread's errno so the interrupted code sees its own value.
    unsafe { *libc::__errno_location() = saved_errno };
}

/// Makes SIGTERM and SIGINT notify the eventfd `fd`.
///
/// `fd` must stay open until the process exits; the server keeps its `Shutdown` alive for
/// its whole run and the process ends right after.
///
/// # Errors
///
/// The OS error of `sigaction`.
pub fn notify_on_terminate(fd: BorrowedFd<'static>) -> io::Result<()> {
    SHUTDOWN_FD.store(fd.as_raw_fd(), Ordering::Relaxed);
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: zeroed is a valid sigaction (empty mask, no flags); the fields set below
        // make it a plain handler.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_terminate as *const () as libc::sighandler_t;
        // Restart interrupted system calls: loops learn of the signal from the eventfd.
        action.sa_flags = libc::SA_RESTART;
        // SAFETY: `action` is a valid sigaction whose handler only does async-signal-safe
        // work; the old action is not wanted, so its pointer is null.
        cvt(unsafe { libc::sigaction(signal, &action, std::ptr::null_mut()) })?;
    }
    Ok(())
}
