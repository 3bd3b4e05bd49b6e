//! `IP_BIND_ADDRESS_NO_PORT` (ip(7)): bind a socket to a local address now and let
//! `connect` choose its port.
//!
//! A load generator that spreads connections over source addresses binds each socket
//! before it connects. A plain `bind` to port 0 picks the port at once and must pick one
//! that no other socket of that address holds, whatever it connects to, so one address
//! gives at most one connection per port of `ip_local_port_range`, across every
//! destination together. With this option the port is chosen at `connect`, where only the
//! whole four-tuple must be unique: the same port serves one connection to each
//! destination, as it does for a socket that was never bound (Linux 4.2, ip(7)).

use super::cvt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Asks the kernel to choose the local port of the socket `fd` at `connect`, not at
/// `bind`. Call it before `bind`.
///
/// # Errors
///
/// The OS error of `setsockopt`: `ENOPROTOOPT` on a kernel before 4.2 or a socket that is
/// not IPv4 or IPv6.
pub fn defer_port_to_connect(fd: BorrowedFd<'_>) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: `on` is a valid int that outlives the call, and the length passed is its
    // size; the caller's borrow keeps `fd` open.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })?;
    Ok(())
}
