//! systemd's socket-passing and notification protocols, on the process side:
//! `sd_listen_fds(3)` (descriptors a service manager opened for us) and `sd_notify(3)`'s
//! environment.

use super::cvt;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// The first passed descriptor (`SD_LISTEN_FDS_START` in sd-daemon.h).
const LISTEN_FDS_START: RawFd = 3;

/// Set once the passed descriptors have been taken, so no two `OwnedFd`s ever own one.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// One descriptor the service manager passed, with its `FileDescriptorName=` if any.
#[derive(Debug)]
pub struct PassedFd {
    /// The socket, close-on-exec from now on.
    pub fd: OwnedFd,
    /// Its name from `LISTEN_FDNAMES` (systemd names unnamed ones after their unit).
    pub name: Option<String>,
}

/// Takes the descriptors passed by socket activation: `None` unless `LISTEN_PID` is this
/// process. The `LISTEN_*` variables are removed so that no child mistakes them for its
/// own (as `sd_listen_fds(1)` does).
///
/// Call it once, at start, while the process is still single-threaded.
///
/// # Errors
///
/// `LISTEN_FDS` is not a number, a passed descriptor is not open, or this was called
/// before.
pub fn take_listen_fds() -> io::Result<Option<Vec<PassedFd>>> {
    let is_ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|pid| pid.trim().parse::<libc::pid_t>().ok())
        .is_some_and(|pid| pid == super::process::id());
    if !is_ours {
        return Ok(None);
    }
    let count_text = std::env::var("LISTEN_FDS").unwrap_or_default();
    let names_text = std::env::var("LISTEN_FDNAMES").ok();
    for name in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        // SAFETY: the environment is changed only here, at start, while the process has a
        // single thread (the contract above), so no other thread reads it concurrently.
        unsafe { std::env::remove_var(name) };
    }
    let count: RawFd = count_text.trim().parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("LISTEN_FDS={count_text:?} is not a number of descriptors"),
        )
    })?;
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Err(io::Error::other(
            "the passed descriptors were already taken",
        ));
    }
    let mut names = names_text
        .as_deref()
        .map(|names| names.split(':').map(str::to_string).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter();
    let mut passed = Vec::new();
    for raw in LISTEN_FDS_START..LISTEN_FDS_START.saturating_add(count.max(0)) {
        // SAFETY: fcntl on any integer is sound; it fails with EBADF if nothing is open.
        let flags = cvt(unsafe { libc::fcntl(raw, libc::F_GETFD) })
            .map_err(|e| io::Error::new(e.kind(), format!("passed descriptor {raw}: {e}")))?;
        // SAFETY: as above; only the close-on-exec flag of an open descriptor changes.
        cvt(unsafe { libc::fcntl(raw, libc::F_SETFD, flags | libc::FD_CLOEXEC) })?;
        // SAFETY: by the protocol, descriptors 3 .. 3 + LISTEN_FDS were opened for this
        // process (LISTEN_PID is ours) and nothing in it owns them yet; `TAKEN` makes sure
        // this wraps each one at most once, and fcntl above proved it open.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        passed.push(PassedFd {
            fd,
            name: names.next().filter(|name| !name.is_empty()),
        });
    }
    Ok(Some(passed))
}

/// The datagram socket `NOTIFY_SOCKET` names (a path, or `@name` in the abstract
/// namespace), connected and non-blocking; `None` when the variable is not set.
///
/// Non-blocking, because a send to a manager whose receive queue is full would otherwise
/// wait until it reads, and the server sends from the thread that serves (and from its
/// signal handler): a notification that does not fit at once fails with `WouldBlock`.
///
/// # Errors
///
/// The OS error of connecting to it, after `NOTIFY_SOCKET=VALUE: `.
pub fn notify_socket() -> io::Result<Option<std::os::unix::net::UnixDatagram>> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(None);
    };
    let named = |e: io::Error| {
        let target = target.to_string_lossy();
        // connect(2) says ECONNREFUSED for a file that is not a socket: say what it is.
        let is_other_file = std::fs::metadata(&*target)
            .is_ok_and(|meta| !std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()));
        if is_other_file && !target.starts_with('@') {
            io::Error::new(e.kind(), format!("NOTIFY_SOCKET={target}: not a socket"))
        } else {
            io::Error::new(e.kind(), format!("NOTIFY_SOCKET={target}: {e}"))
        }
    };
    let socket = UnixDatagram::unbound()?;
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(target.as_os_str());
    match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)
            .and_then(|addr| socket.connect_addr(&addr))
            .map_err(named)?,
        None => socket.connect(&target).map_err(named)?,
    }
    socket.set_nonblocking(true)?;
    Ok(Some(socket))
}
