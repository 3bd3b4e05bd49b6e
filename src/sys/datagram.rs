//! Receiving one datagram and learning its real length, so a truncated read is seen.

use socket2::{SockAddr, SockRef};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::BorrowedFd;

/// Receives one datagram from `fd` into `buf` with `recvfrom(MSG_TRUNC)`: the length
/// returned is the datagram's real length, larger than `buf.len()` when the kernel cut
/// it to fit (only `buf.len()` bytes of it are in `buf` then). Linux reports the real
/// length this way for UDP (since 2.4.27) and Unix datagram sockets (since 3.4), per
/// recv(2).
///
/// # Errors
///
/// The OS error of `recvfrom`, including `WouldBlock` on a non-blocking socket.
pub fn recv_from_whole(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, SockAddr)> {
    // SAFETY: `MaybeUninit<u8>` has the layout of `u8`, and every initialised byte is a
    // valid `MaybeUninit<u8>`; `recvfrom` only ever writes initialised bytes into it, so
    // `buf` stays fully initialised when the borrow ends.
    let uninit = unsafe { &mut *(std::ptr::from_mut::<[u8]>(buf) as *mut [MaybeUninit<u8>]) };
    SockRef::from(&fd).recv_from_with_flags(uninit, libc::MSG_TRUNC)
}
