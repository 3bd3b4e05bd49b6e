//! Registering a descriptor we own with tokio's reactor (`AsyncFd`), for sources tokio has
//! no type for: the shutdown eventfd, and readiness of our own datagram sockets.

use std::io;
use std::os::fd::OwnedFd;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Watches `fd` for `interest` in the current tokio runtime.
///
/// Pass a `dup` (`try_clone_to_owned`) to watch a socket that other code keeps using:
/// readiness belongs to the open file description, which both descriptors share.
///
/// # Errors
///
/// The OS error of registering with the runtime's epoll instance.
///
/// # Panics
///
/// Outside a tokio runtime (tokio's own panic).
pub fn watch(fd: OwnedFd, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd takes ownership of `fd`: it stays open and names the same file
    // description until the AsyncFd drops, and `OwnedFd::as_raw_fd` always returns it.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(|e| e.into_parts().1)
}
