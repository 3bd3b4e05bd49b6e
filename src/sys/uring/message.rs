//! Message headers for datagram receives: a `msghdr` points at its own buffer
//! and address, so it must not move while the kernel holds it.

use libc::sockaddr_storage;
use socket2::{SockAddr, SockAddrStorage};
use std::mem;

/// A datagram the kernel received: its length, its sender, whether it was cut short. The
/// bytes stay in the socket's receive buffer until the next receive is armed.
#[derive(Debug)]
pub struct ReceivedDatagram {
    /// Bytes received (at most the receive buffer's size).
    pub len: usize,
    /// The datagram's real length, when it was longer than the buffer (`MSG_TRUNC`):
    /// then `len` bytes are a prefix.
    pub truncated_from: Option<usize>,
    /// Who sent it (an unnamed Unix socket has an empty address).
    pub sender: SockAddr,
}

/// The receive message of a datagram socket, boxed (see [`Message`]).
pub(super) struct Datagram {
    pub(super) receive: Message,
}

impl Datagram {
    pub(super) fn new(max_datagram_bytes: usize) -> Box<Datagram> {
        Box::new(Datagram {
            receive: Message::new(max_datagram_bytes),
        })
    }
}

/// A `msghdr` with its one buffer and its address.
///
/// # Invariant
///
/// Self-referential once [`Message::prepare`] ran: the header points at `iov`, `name` and
/// `bytes`. It lives in a `Box` owned by its slot, which is freed only after the final
/// completion of the operation that uses it, so those pointers stay valid while the
/// kernel may follow them.
pub(super) struct Message {
    pub(super) bytes: Vec<u8>,
    iov: libc::iovec,
    name: sockaddr_storage,
    header: libc::msghdr,
}

impl Message {
    fn new(capacity: usize) -> Message {
        Message {
            bytes: vec![0; capacity],
            iov: libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            },
            // SAFETY: sockaddr_storage is plain data; all zeroes is an unnamed address.
            name: unsafe { mem::zeroed() },
            // SAFETY: msghdr is plain data; all zeroes is null pointers and zero lengths.
            header: unsafe { mem::zeroed() },
        }
    }

    /// Points the header at the whole buffer and a cleared address, for a receive.
    pub(super) fn prepare_receive(&mut self) -> *mut libc::msghdr {
        // SAFETY: as in `Message::new`.
        self.name = unsafe { mem::zeroed() };
        let name_len = mem::size_of::<sockaddr_storage>() as libc::socklen_t;
        self.prepare(self.bytes.len(), name_len)
    }

    fn prepare(&mut self, len: usize, name_len: libc::socklen_t) -> *mut libc::msghdr {
        self.iov.iov_base = self.bytes.as_mut_ptr().cast();
        self.iov.iov_len = len;
        self.header.msg_name = (&raw mut self.name).cast();
        self.header.msg_namelen = name_len;
        self.header.msg_iov = &raw mut self.iov;
        self.header.msg_iovlen = 1;
        self.header.msg_control = std::ptr::null_mut();
        self.header.msg_controllen = 0;
        self.header.msg_flags = 0;
        &raw mut self.header
    }

    /// What a completed receive of a datagram of `len` bytes (its real length: the
    /// receive asks for `MSG_TRUNC`) left in the header.
    pub(super) fn received(&self, len: usize) -> ReceivedDatagram {
        let mut storage = SockAddrStorage::zeroed();
        // SAFETY: `sockaddr_storage` is this platform's type that SockAddrStorage wraps.
        unsafe { *storage.view_as::<sockaddr_storage>() = self.name };
        // SAFETY: the receive completed, so the kernel wrote a valid address of
        // `msg_namelen` bytes into `name` (or left it zeroed: an unnamed sender).
        let sender = unsafe { SockAddr::new(storage, self.header.msg_namelen) };
        let is_truncated = len > self.bytes.len() || self.header.msg_flags & libc::MSG_TRUNC != 0;
        ReceivedDatagram {
            len: len.min(self.bytes.len()),
            truncated_from: is_truncated.then_some(len),
            sender,
        }
    }
}
