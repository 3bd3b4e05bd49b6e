//! Reading and writing a connected stream socket (TCP or Unix) with `recvfrom(2)` and
//! `sendto(2)`, made by rustix, not through libc's `recv` and `send`. On Linux rustix's
//! default backend (`linux_raw`) makes them with an inlined `syscall` instruction; built
//! with its `use-libc` feature, it would go through libc again.
//!
//! libc's `recv` and `send` are cancellation points: in a process with more than one
//! thread (every server: its loops, its signal thread) glibc switches asynchronous
//! cancellation on before each call and off after it, about 60 instructions per echoed
//! message (a read and a write) that buy nothing here, since reverb never cancels a thread.
//! libc's generic `syscall(2)` skips them but is a variadic call that shuffles seven
//! arguments, some 20 instructions per message more; rustix's raw system calls are inlined
//! where they are made. The system calls, their flags and their errors are exactly those
//! of `recv(fd, buf, len, 0)` and `send(fd, bytes, len, MSG_NOSIGNAL)`; `EINTR` is
//! returned, not retried, as std does.

use rustix::net::{RecvFlags, SendFlags};
use std::io;
use std::os::fd::BorrowedFd;

/// One `recvfrom` into `buf`: how many bytes arrived, `Ok(0)` for the peer's EOF.
///
/// # Errors
///
/// The OS error of `recvfrom`: `WouldBlock` on a non-blocking socket with nothing queued,
/// `Interrupted`, a reset.
#[inline]
pub fn recv(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // Without MSG_TRUNC the second count, what the kernel had, equals the first.
    let (n, _) = rustix::net::recv(fd, buf, RecvFlags::empty())?;
    Ok(n)
}

/// One `sendto` of `bytes` with `MSG_NOSIGNAL` (a peer that is gone is `EPIPE`, never
/// `SIGPIPE`): how many bytes the kernel took, maybe fewer than offered.
///
/// # Errors
///
/// The OS error of `sendto`: `WouldBlock` when the send buffer is full, `Interrupted`,
/// `EPIPE` or a reset when the peer is gone.
#[inline]
pub fn send(fd: BorrowedFd<'_>, bytes: &[u8]) -> io::Result<usize> {
    Ok(rustix::net::send(fd, bytes, SendFlags::NOSIGNAL)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn bytes_sent_arrive_and_eof_and_errors_are_told_apart() {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 16];
        let again = recv(b.as_fd(), &mut buf).unwrap_err();
        assert_eq!(again.kind(), io::ErrorKind::WouldBlock);
        assert_eq!(send(a.as_fd(), b"hello").unwrap(), 5);
        assert_eq!(recv(b.as_fd(), &mut buf[..3]).unwrap(), 3);
        assert_eq!(&buf[..3], b"hel");
        assert_eq!(recv(b.as_fd(), &mut buf).unwrap(), 2);
        assert_eq!(&buf[..2], b"lo");
        drop(a);
        assert_eq!(recv(b.as_fd(), &mut buf).unwrap(), 0);
        // The peer is gone: EPIPE, and no SIGPIPE kills the test.
        let gone = send(b.as_fd(), b"x").unwrap_err();
        assert_eq!(gone.kind(), io::ErrorKind::BrokenPipe);
    }
}
