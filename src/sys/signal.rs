//! Turning SIGTERM and SIGINT into a readable eventfd.
//!
//! A signal handler may call only async-signal-safe functions, and `write(2)` is one. The
//! handler writes to the shutdown eventfd, so every loop already asleep on that fd wakes up
//! without a dedicated signal thread; that matters to `forking`, whose parent must stay
//! single-threaded to fork safely.

use super::cvt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

/// The eventfd the handler notifies; -1 until [`notify_on_terminate`] runs.
///
/// # Invariant
///
/// Once set, the fd stays open until the process exits: the `Shutdown` that owns it is
/// leaked by `notify_on_terminate`'s caller contract (it lives as long as the server).
static SHUTDOWN_FD: AtomicI32 = AtomicI32::new(-1);

/// A connected datagram socket the handler also sends [`STOPPING_MESSAGE`] on (the
/// service manager's notification socket); -1 when there is none.
///
/// # Invariant
///
/// Once set, the fd stays open until the process exits (its socket is leaked by
/// [`send_stopping_on_terminate`]).
static STOPPING_FD: AtomicI32 = AtomicI32::new(-1);
/// The process that set [`STOPPING_FD`]: forked children inherit the handler, but only
/// the server itself speaks to the service manager.
static STOPPING_PID: AtomicI32 = AtomicI32::new(0);
/// Whether the message went out already: one per process, however many signals come.
static STOPPING_SENT: AtomicBool = AtomicBool::new(false);
/// Whether the server has told the manager `READY=1` (or tried to). `STOPPING=1` must
/// never come before it: a handler that runs first leaves it to [`ready_announced`].
static READY_ANNOUNCED: AtomicBool = AtomicBool::new(false);
/// Whether SIGTERM or SIGINT has come. With [`READY_ANNOUNCED`] it decides, without a
/// lock (a handler cannot take one), who sends `STOPPING=1`: each side stores its own flag
/// and then loads the other's, all `SeqCst`, so at least one of them sees both set.
static TERMINATED: AtomicBool = AtomicBool::new(false);
/// What sd_notify(3) calls the start of a shutdown.
const STOPPING_MESSAGE: &[u8] = b"STOPPING=1";

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
    TERMINATED.store(true, Ordering::SeqCst);
    if READY_ANNOUNCED.load(Ordering::SeqCst) {
        send_stopping_once();
    }
    // SAFETY: restores this thread's errno so the interrupted code sees its own value.
    unsafe { *libc::__errno_location() = saved_errno };
}

/// Sends `STOPPING=1` unless it went out already or this is not the server's process.
/// Async-signal-safe: atomics, getpid(2) and send(2) only.
fn send_stopping_once() {
    let notify_fd = STOPPING_FD.load(Ordering::Relaxed);
    // SAFETY: getpid is async-signal-safe and takes no pointers.
    let is_server = STOPPING_PID.load(Ordering::Relaxed) == unsafe { libc::getpid() };
    if notify_fd >= 0 && is_server && !STOPPING_SENT.swap(true, Ordering::SeqCst) {
        // SAFETY: the message is a static byte string valid for its length; the fd stays
        // open for the life of the process (invariant of STOPPING_FD); send(2) is
        // async-signal-safe, and MSG_DONTWAIT keeps a full socket from blocking a handler.
        let _ = unsafe {
            libc::send(
                notify_fd,
                STOPPING_MESSAGE.as_ptr().cast(),
                STOPPING_MESSAGE.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
    }
}

/// Records that `READY=1` was announced; a SIGTERM/SIGINT that came before this sends
/// `STOPPING=1` now, so the manager always hears `READY=1` first and `STOPPING=1` once.
pub fn ready_announced() {
    READY_ANNOUNCED.store(true, Ordering::SeqCst);
    if TERMINATED.load(Ordering::SeqCst) {
        send_stopping_once();
    }
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

/// Makes the SIGTERM/SIGINT handler also send `STOPPING=1` on `socket` (the service
/// manager's notification socket, see `activation::notify_socket`), once, from this
/// process only. The socket is kept open for the rest of the process.
pub fn send_stopping_on_terminate(socket: UnixDatagram) {
    let socket: &'static UnixDatagram = Box::leak(Box::new(socket));
    STOPPING_PID.store(super::process::id(), Ordering::Relaxed);
    STOPPING_FD.store(socket.as_raw_fd(), Ordering::Relaxed);
}
