//! Bindings to io_uring (Linux 5.19+): operations go into a submission ring, results come
//! back on a completion ring, and in between the kernel reads and writes our buffers.
//!
//! io-uring's `push` is `unsafe` because the kernel may use an operation's buffers until
//! that operation's completion arrives. [`Ring`] keeps that promise once, for every
//! operation it offers: each buffer lives in its operation's slot, and a slot is freed only
//! when every operation on it has completed, even after the model closed it (closing
//! cancels the operations, then waits for their completions). Above this file nothing can
//! free a buffer too early, and no model ever sees a raw pointer.
//!
//! A completion names its operation through `user_data`, which packs the slot's index, the
//! slot's generation and the operation; a late completion for a reused slot is stale, and
//! is dropped here after its buffer is recycled or its descriptor closed.
//!
//! Receives come from a provided-buffer ring: the kernel picks a buffer when bytes arrive,
//! so idle connections hold no receive memory. A receive is armed with a byte *budget*
//! (multishot, with the budget as its total limit, on Linux 6.17+; single-shot, with the
//! budget as its length, before that), so the kernel itself never delivers more than the
//! model said it can take: that is how `--max-buffer` holds without copying input aside.

use io_uring::{IoUring, Probe, cqueue, opcode, squeue, types};
use libc::sockaddr_storage;
use socket2::{SockAddr, SockAddrStorage};
use std::alloc::{self, Layout};
use std::collections::VecDeque;
use std::io;
use std::mem::{self, ManuallyDrop};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

/// Receive buffers in the provided-buffer ring (a power of two), and their size: a 1 KiB
/// echo fits one buffer, and every connection of a busy loop can have one in a batch.
const PROVIDED_BUFFERS: u16 = 128;
/// Bytes per provided buffer.
const PROVIDED_BUFFER_BYTES: usize = 8192;
/// The id of our one buffer group.
const BUFFER_GROUP: u16 = 1;
/// Submission queue entries; more are kept in a backlog until the kernel takes them.
const SUBMISSION_ENTRIES: u32 = 1024;
/// Completion queue entries: multishot operations post many per submission.
const COMPLETION_ENTRIES: u32 = 8192;
/// At most this many bytes go into one stream send; the rest waits for its completion.
const MAX_SEND_BYTES: usize = 128 * 1024;
/// A send buffer that grew past this is given back once its send completes.
const KEPT_SEND_BUFFER_BYTES: usize = 16 * 1024;
/// Where `optlen` sits in the kernel's 64-byte `io_uring_sqe` (a stable ABI). For a
/// multishot receive it is the total byte limit (Linux 6.17, IORING_RECV_MSHOT_LIM).
const SQE_OPTLEN_OFFSET: usize = 44;
/// Bits of a slot's generation kept in `user_data`.
const GENERATION_MASK: u32 = 0xff_ffff;
/// How long dropping a ring waits for cancelled operations before it leaks their buffers.
const DROP_WAIT: Duration = Duration::from_secs(2);

/// The operations; each is also its bit in a slot's in-flight set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Op {
    Accept = 1,
    Receive = 2,
    Send = 4,
    DatagramReceive = 8,
    DatagramSend = 16,
    Poll = 32,
    /// An `AsyncCancel`; its own completion carries nothing.
    Cancel = 64,
}

impl Op {
    const IN_FLIGHT: [Op; 6] = [
        Op::Accept,
        Op::Receive,
        Op::Send,
        Op::DatagramReceive,
        Op::DatagramSend,
        Op::Poll,
    ];

    fn from_bits(bits: u8) -> Option<Op> {
        Op::IN_FLIGHT
            .into_iter()
            .chain([Op::Cancel])
            .find(|op| *op as u8 == bits)
    }
}

/// Names one slot of a [`Ring`]: its index and generation. A key of a freed slot never
/// matches again, so a stale key is harmless: every method ignores it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Key {
    index: u32,
    generation: u32,
}

impl Key {
    /// The slot index, for tables kept next to the ring (unique among live slots).
    pub fn index(self) -> usize {
        self.index as usize
    }

    fn user_data(self, op: Op) -> u64 {
        (u64::from(self.index) << 32)
            | (u64::from(self.generation & GENERATION_MASK) << 8)
            | op as u64
    }

    fn from_user_data(user_data: u64) -> (u32, u32, Option<Op>) {
        let index = (user_data >> 32) as u32;
        let generation = ((user_data >> 8) as u32) & GENERATION_MASK;
        (index, generation, Op::from_bits(user_data as u8))
    }
}

/// One finished operation, matched to a live slot.
#[derive(Debug)]
pub enum Completion {
    /// A listener accepted a connection, or failed to; `is_armed` says whether the
    /// multishot accept goes on (otherwise arm it again).
    Accepted {
        /// The listener's slot.
        key: Key,
        /// The new connection's descriptor.
        result: io::Result<OwnedFd>,
        /// Whether the accept is still armed.
        is_armed: bool,
    },
    /// Bytes arrived (read them with [`Ring::received`]), `Ok(0)` for the peer's EOF.
    Received {
        /// The connection's slot.
        key: Key,
        /// Bytes received.
        result: io::Result<usize>,
    },
    /// A stream send finished; `Ok(n)`: the kernel took the first `n` bytes offered.
    Sent {
        /// The connection's slot.
        key: Key,
        /// Bytes sent.
        result: io::Result<usize>,
    },
    /// A datagram arrived (read it with [`Ring::datagram`]).
    DatagramReceived {
        /// The socket's slot.
        key: Key,
        /// The datagram's length.
        result: io::Result<usize>,
    },
    /// A datagram reply was sent.
    DatagramSent {
        /// The socket's slot.
        key: Key,
        /// Bytes sent.
        result: io::Result<usize>,
    },
    /// A watched descriptor became readable.
    Readable {
        /// The watched slot.
        key: Key,
    },
}

/// One socket and the buffers of its operations.
struct SlotIo {
    fd: OwnedFd,
    /// Bits of the operations whose final completion has not arrived.
    in_flight: u8,
    /// The model closed the slot; it is freed once `in_flight` is empty.
    is_closing: bool,
    /// The budget of the receive in flight, kept to re-arm it single-shot.
    budget: u32,
    /// Bytes received since the receive was armed, checked against `budget`.
    received_since_arm: usize,
    /// The bytes of the stream send in flight: a copy, because the model's output
    /// buffer may grow and move while the kernel reads this one.
    send: Vec<u8>,
    /// Datagram sockets: one message each way.
    datagram: Option<Box<Datagram>>,
}

struct Slot {
    generation: u32,
    io: Option<SlotIo>,
}

/// The receive and send messages of a datagram socket, boxed so the kernel's pointers
/// into them stay valid while the slot table grows.
struct Datagram {
    receive: Message,
    send: Message,
}

/// A `msghdr` with its one buffer and its address; self-referential, so always boxed.
struct Message {
    bytes: Vec<u8>,
    len: usize,
    iov: libc::iovec,
    name: sockaddr_storage,
    header: libc::msghdr,
}

impl Message {
    fn new(capacity: usize) -> Message {
        Message {
            bytes: vec![0; capacity],
            len: 0,
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

    /// Points the header at this message's buffer (`len` bytes of it) and address.
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
}

/// The provided-buffer ring: entries the kernel takes buffers from, and the buffers.
///
/// # Invariant
///
/// `entries` (page-aligned, `count` entries) and `memory` (`count * size` bytes) stay
/// allocated while registered with the ring; a buffer id the kernel handed out in a
/// completion belongs to us until [`ProvidedBuffers::recycle`] gives it back.
struct ProvidedBuffers {
    entries: NonNull<types::BufRingEntry>,
    memory: NonNull<u8>,
    count: u16,
    size: usize,
    tail: u16,
}

impl ProvidedBuffers {
    fn entries_layout(count: u16) -> io::Result<Layout> {
        Layout::from_size_align(
            usize::from(count) * mem::size_of::<types::BufRingEntry>(),
            4096,
        )
        .map_err(io::Error::other)
    }

    /// Page-aligned: the kernel's `rep movsb` copy is slow into a destination that is not
    /// cache-line aligned (bench's issue 6 notes; here `_copy_to_iter` fell from 12 % to 8 %
    /// of the profile at depth 8).
    fn memory_layout(count: u16, size: usize) -> io::Result<Layout> {
        Layout::from_size_align(usize::from(count) * size, 4096).map_err(io::Error::other)
    }

    /// Allocates `count` buffers of `size` bytes and registers them with `ring`.
    fn new(ring: &IoUring, count: u16, size: usize) -> io::Result<ProvidedBuffers> {
        let entries_layout = Self::entries_layout(count)?;
        let memory_layout = Self::memory_layout(count, size)?;
        // SAFETY: both layouts have a non-zero size (count and size are non-zero constants).
        let entries: NonNull<types::BufRingEntry> =
            NonNull::new(unsafe { alloc::alloc_zeroed(entries_layout) })
                .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?
                .cast();
        // SAFETY: as above.
        let Some(memory) = NonNull::new(unsafe { alloc::alloc(memory_layout) }) else {
            // SAFETY: allocated just above with this layout and never shared.
            unsafe { alloc::dealloc(entries.as_ptr().cast(), entries_layout) };
            return Err(io::ErrorKind::OutOfMemory.into());
        };
        let mut buffers = ProvidedBuffers {
            entries,
            memory,
            count,
            size,
            tail: 0,
        };
        // SAFETY: `entries` is page-aligned and holds `count` entries, and it stays
        // allocated until unregistered (the struct's invariant; see `Ring::drop`).
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                entries.as_ptr() as u64,
                count,
                BUFFER_GROUP,
                0,
            )?
        };
        for id in 0..count {
            buffers.recycle(id);
        }
        Ok(buffers)
    }

    /// Gives buffer `id` back to the kernel.
    fn recycle(&mut self, id: u16) {
        if id >= self.count {
            return;
        }
        let slot = usize::from(self.tail & (self.count - 1));
        // SAFETY: `slot < count`, inside the entries allocation (invariant); the kernel
        // reads entries only between its head and our tail, and this one is past the tail.
        let entry = unsafe { &mut *self.entries.as_ptr().add(slot) };
        // SAFETY: `id < count`, so the buffer lies inside `memory`.
        entry.set_addr(unsafe { self.memory.as_ptr().add(usize::from(id) * self.size) } as u64);
        entry.set_len(self.size as u32);
        entry.set_bid(id);
        self.tail = self.tail.wrapping_add(1);
        // SAFETY: `entries` points at the ring's first entry, initialised (zeroed) at
        // allocation, as `tail` requires.
        let tail = unsafe { types::BufRingEntry::tail(self.entries.as_ptr()) };
        // SAFETY: the tail is an aligned u16 inside our allocation that the kernel only
        // reads; AtomicU16 has u16's layout. Release publishes the entry written above.
        unsafe { (*tail.cast::<AtomicU16>()).store(self.tail, Ordering::Release) };
    }

    /// The first `len` bytes of buffer `id`, which a completion handed to us.
    fn bytes(&self, id: u16, len: usize) -> &[u8] {
        if id >= self.count {
            return &[];
        }
        let len = len.min(self.size);
        // SAFETY: buffer `id` lies inside `memory` (invariant) and is ours until recycled
        // (the kernel does not write it meanwhile); `&self` keeps it from being recycled
        // while the slice lives.
        unsafe {
            std::slice::from_raw_parts(self.memory.as_ptr().add(usize::from(id) * self.size), len)
        }
    }
}

impl Drop for ProvidedBuffers {
    fn drop(&mut self) {
        // The ring unregisters the buffers before this runs (see `Ring::drop`).
        if let (Ok(entries), Ok(memory)) = (
            Self::entries_layout(self.count),
            Self::memory_layout(self.count, self.size),
        ) {
            // SAFETY: allocated in `new` with these layouts; no longer registered.
            unsafe {
                alloc::dealloc(self.entries.as_ptr().cast(), entries);
                alloc::dealloc(self.memory.as_ptr(), memory);
            }
        }
    }
}

/// Checks that io_uring can serve here, before anything is bound.
///
/// # Errors
///
/// Why not, in words: disabled by sysctl, blocked by seccomp, a kernel too old, or an
/// operation it lacks.
pub fn probe() -> io::Result<()> {
    let ring = IoUring::new(8).map_err(|e| {
        let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
            .ok()
            .and_then(|text| text.trim().parse().ok());
        explain_setup_error(&e, disabled)
    })?;
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe).map_err(|e| {
        io::Error::new(e.kind(), format!("cannot probe io_uring's operations: {e}"))
    })?;
    let needed = [
        (opcode::Accept::CODE, "ACCEPT"),
        (opcode::Recv::CODE, "RECV"),
        (opcode::Send::CODE, "SEND"),
        (opcode::RecvMsg::CODE, "RECVMSG"),
        (opcode::SendMsg::CODE, "SENDMSG"),
        (opcode::PollAdd::CODE, "POLL_ADD"),
        (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
    ];
    if let Some((_, name)) = needed.iter().find(|(code, _)| !probe.is_supported(*code)) {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "this kernel's io_uring lacks IORING_OP_{name} (Linux 5.19 or newer is needed)"
            ),
        ));
    }
    // Provided-buffer rings and multishot accept came with Linux 5.19.
    ProvidedBuffers::new(&ring, 1, 64).map(drop).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("this kernel's io_uring lacks provided-buffer rings (Linux 5.19 or newer is needed): {e}"),
        )
    })
}

/// Words for an `io_uring_setup` failure, given `kernel.io_uring_disabled` if readable.
pub fn explain_setup_error(error: &io::Error, disabled_sysctl: Option<u8>) -> io::Error {
    let message = match (error.raw_os_error(), disabled_sysctl) {
        (Some(libc::EPERM | libc::EACCES), Some(level)) if level > 0 => {
            format!("io_uring is disabled by sysctl kernel.io_uring_disabled={level} ({error})")
        }
        (Some(libc::ENOSYS), _) => format!(
            "io_uring is not available: the kernel lacks it or a seccomp filter blocks it ({error})"
        ),
        (Some(libc::EPERM | libc::EACCES), _) => format!(
            "io_uring_setup was refused, probably by a seccomp filter or container policy ({error})"
        ),
        _ => format!("io_uring_setup failed: {error}"),
    };
    io::Error::new(error.kind(), message)
}

/// Builds the ring with the cheapest task-running mode the kernel has.
fn build_ring() -> io::Result<IoUring> {
    // DEFER_TASKRUN (6.1) runs completions only when we wait, in our thread, and
    // SINGLE_ISSUER lets the kernel skip locking; COOP_TASKRUN (5.19) avoids interrupting
    // us with IPIs. Each one falls back to the next on EINVAL.
    let attempts: [fn(&mut io_uring::Builder); 3] = [
        |b| {
            b.setup_single_issuer().setup_defer_taskrun();
        },
        |b| {
            b.setup_coop_taskrun();
        },
        |_| {},
    ];
    let mut last = io::Error::from(io::ErrorKind::Unsupported);
    for configure in attempts {
        let mut builder = IoUring::builder();
        builder.setup_cqsize(COMPLETION_ENTRIES).setup_submit_all();
        configure(&mut builder);
        match builder.build(SUBMISSION_ENTRIES) {
            Ok(ring) => return Ok(ring),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => last = e,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

/// Sets a receive SQE's `optlen`: the multishot total byte limit.
fn with_total_limit(entry: squeue::Entry, limit: u32) -> squeue::Entry {
    // SAFETY: `squeue::Entry` is `#[repr(C)]` around the kernel's 64-byte `io_uring_sqe`
    // (transmute checks the size), which is integers only: every bit pattern is valid.
    let mut bytes: [u8; 64] = unsafe { mem::transmute(entry) };
    bytes[SQE_OPTLEN_OFFSET..SQE_OPTLEN_OFFSET + 4].copy_from_slice(&limit.to_ne_bytes());
    // SAFETY: as above; the bytes are a valid SQE with one integer field changed.
    unsafe { mem::transmute::<[u8; 64], squeue::Entry>(bytes) }
}

fn count_result(result: i32) -> io::Result<usize> {
    usize::try_from(result).map_err(|_| io::Error::from_raw_os_error(-result))
}

/// One io_uring with the sockets it serves.
pub struct Ring {
    ring: IoUring,
    slots: Vec<Slot>,
    free: Vec<u32>,
    live: usize,
    provided: ManuallyDrop<ProvidedBuffers>,
    /// Completions copied out of the kernel's queue, not yet handed out.
    completions: VecDeque<cqueue::Entry>,
    /// Entries that did not fit the submission queue yet.
    backlog: Vec<squeue::Entry>,
    /// The buffer and length of the last `Received`, recycled on the next call.
    received: Option<(u16, usize)>,
    /// Whether multishot receives take a total limit; cleared on the first EINVAL.
    has_receive_limit: bool,
}

impl Ring {
    /// A ring with its provided buffers.
    ///
    /// # Errors
    ///
    /// The OS error of setting up the ring or registering buffers.
    pub fn new() -> io::Result<Ring> {
        let ring = build_ring()?;
        let provided = ProvidedBuffers::new(&ring, PROVIDED_BUFFERS, PROVIDED_BUFFER_BYTES)?;
        Ok(Ring {
            ring,
            slots: Vec::new(),
            free: Vec::new(),
            live: 0,
            provided: ManuallyDrop::new(provided),
            completions: VecDeque::new(),
            backlog: Vec::new(),
            received: None,
            has_receive_limit: true,
        })
    }

    /// Takes `fd` into a new slot.
    pub fn add(&mut self, fd: OwnedFd) -> Key {
        self.insert(fd, None)
    }

    /// Takes a datagram socket into a new slot, with buffers for one datagram each way.
    pub fn add_datagram(&mut self, fd: OwnedFd, max_datagram_bytes: usize) -> Key {
        let datagram = Box::new(Datagram {
            receive: Message::new(max_datagram_bytes),
            send: Message::new(0),
        });
        self.insert(fd, Some(datagram))
    }

    fn insert(&mut self, fd: OwnedFd, datagram: Option<Box<Datagram>>) -> Key {
        let io = SlotIo {
            fd,
            in_flight: 0,
            is_closing: false,
            budget: 0,
            received_since_arm: 0,
            send: Vec::new(),
            datagram,
        };
        self.live += 1;
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    io: None,
                });
                (self.slots.len() - 1) as u32
            }
        };
        let slot = &mut self.slots[index as usize];
        slot.io = Some(io);
        Key {
            index,
            generation: slot.generation,
        }
    }

    /// The slot of `key` while it is open (not closing).
    fn open(&mut self, key: Key) -> Option<&mut SlotIo> {
        let slot = self.slots.get_mut(key.index())?;
        if slot.generation != key.generation {
            return None;
        }
        slot.io.as_mut().filter(|io| !io.is_closing)
    }

    fn is_in_flight(&self, key: Key, op: Op) -> bool {
        self.slots
            .get(key.index())
            .filter(|slot| slot.generation == key.generation)
            .and_then(|slot| slot.io.as_ref())
            .is_some_and(|io| io.in_flight & op as u8 != 0)
    }

    /// Whether a receive is armed on `key`.
    pub fn is_receiving(&self, key: Key) -> bool {
        self.is_in_flight(key, Op::Receive) || self.is_in_flight(key, Op::DatagramReceive)
    }

    /// Whether a send on `key` has not completed.
    pub fn is_sending(&self, key: Key) -> bool {
        self.is_in_flight(key, Op::Send) || self.is_in_flight(key, Op::DatagramSend)
    }

    /// Whether an accept is armed on `key`.
    pub fn is_accepting(&self, key: Key) -> bool {
        self.is_in_flight(key, Op::Accept)
    }

    /// The socket of an open slot.
    pub fn fd(&self, key: Key) -> Option<BorrowedFd<'_>> {
        let slot = self.slots.get(key.index())?;
        let io = slot
            .io
            .as_ref()
            .filter(|_| slot.generation == key.generation)?;
        Some(io.fd.as_fd())
    }

    /// Slots not yet freed (open, or closed with operations still in flight).
    pub fn live_slots(&self) -> usize {
        self.live
    }

    fn push(&mut self, entry: squeue::Entry) {
        if !self.backlog.is_empty() {
            self.backlog.push(entry);
            return;
        }
        // SAFETY: every entry built in this file points only into buffers owned by its
        // slot (or by `provided`), and a slot is freed only after the final completion of
        // each of its operations (`complete`); `Ring::drop` waits for those completions
        // or leaks the buffers. The descriptor is the slot's own, open as long.
        if unsafe { self.ring.submission().push(&entry) }.is_err() {
            self.backlog.push(entry);
        }
    }

    fn start(&mut self, key: Key, op: Op, entry: squeue::Entry) {
        if let Some(io) = self.open(key) {
            io.in_flight |= op as u8;
            self.push(entry.user_data(key.user_data(op)));
        }
    }

    /// Arms a multishot accept on a listener's slot (no-op if armed or closing).
    pub fn arm_accept(&mut self, key: Key) {
        let Some(io) = self
            .open(key)
            .filter(|io| io.in_flight & Op::Accept as u8 == 0)
        else {
            return;
        };
        let entry = opcode::AcceptMulti::new(types::Fd(io.fd.as_raw_fd()))
            .flags(libc::SOCK_CLOEXEC)
            .build();
        self.start(key, Op::Accept, entry);
    }

    /// Arms a receive of at most `budget` bytes in total (no-op if armed or closing).
    /// Completions come as [`Completion::Received`] until the budget is used up or the
    /// peer's EOF; then [`Ring::is_receiving`] turns false.
    pub fn arm_receive(&mut self, key: Key, budget: usize) {
        let has_limit = self.has_receive_limit;
        let Some(io) = self
            .open(key)
            .filter(|io| io.in_flight & Op::Receive as u8 == 0)
        else {
            return;
        };
        let budget = u32::try_from(budget).unwrap_or(u32::MAX).max(1);
        io.budget = budget;
        io.received_since_arm = 0;
        let fd = types::Fd(io.fd.as_raw_fd());
        let entry = if has_limit {
            // The kernel ends a limited multishot receive once its total reaches the limit,
            // but the receive that crosses it may take up to `len` bytes; so the two are
            // chosen with `len + limit - 1 <= budget`.
            let per_receive = (budget / 2).max(1);
            let limit = (budget - per_receive).max(1);
            let entry = opcode::RecvMulti::new(fd, BUFFER_GROUP)
                .len(per_receive)
                .build();
            with_total_limit(entry, limit)
        } else {
            // The kernel reads at most min(budget, buffer size) into the buffer it picks.
            opcode::Recv::new(fd, std::ptr::null_mut(), budget)
                .buf_group(BUFFER_GROUP)
                .build()
                .flags(squeue::Flags::BUFFER_SELECT)
        };
        self.start(key, Op::Receive, entry);
    }

    /// The bytes of the last [`Completion::Received`]; valid until the next completion.
    pub fn received(&self) -> &[u8] {
        match self.received {
            Some((id, len)) => self.provided.bytes(id, len),
            None => &[],
        }
    }

    /// Sends a prefix of `bytes` (copied), unless a send is in flight; returns how many
    /// bytes were offered. The kernel may take fewer: see [`Completion::Sent`].
    pub fn send(&mut self, key: Key, bytes: &[u8]) -> usize {
        let Some(io) = self
            .open(key)
            .filter(|io| io.in_flight & Op::Send as u8 == 0)
        else {
            return 0;
        };
        let offered = bytes.len().min(MAX_SEND_BYTES);
        if offered == 0 {
            return 0;
        }
        io.send.clear();
        io.send.extend_from_slice(&bytes[..offered]);
        let entry = opcode::Send::new(
            types::Fd(io.fd.as_raw_fd()),
            io.send.as_ptr(),
            offered as u32,
        )
        .flags(libc::MSG_NOSIGNAL)
        .build();
        self.start(key, Op::Send, entry);
        offered
    }

    /// Arms a receive of one datagram (no-op if armed, closing or not a datagram slot).
    pub fn arm_datagram_receive(&mut self, key: Key) {
        let Some(io) = self
            .open(key)
            .filter(|io| io.in_flight & Op::DatagramReceive as u8 == 0)
        else {
            return;
        };
        let fd = types::Fd(io.fd.as_raw_fd());
        let Some(datagram) = io.datagram.as_mut() else {
            return;
        };
        let receive = &mut datagram.receive;
        // SAFETY: as in `Message::new`.
        receive.name = unsafe { mem::zeroed() };
        let capacity = receive.bytes.len();
        let name_len = mem::size_of::<sockaddr_storage>() as libc::socklen_t;
        let header = receive.prepare(capacity, name_len);
        self.start(
            key,
            Op::DatagramReceive,
            opcode::RecvMsg::new(fd, header).build(),
        );
    }

    /// The last datagram received on `key`, its sender, and whether it was truncated;
    /// valid until the receive is armed again.
    pub fn datagram(&self, key: Key) -> Option<(&[u8], SockAddr, bool)> {
        let slot = self.slots.get(key.index())?;
        let io = slot
            .io
            .as_ref()
            .filter(|_| slot.generation == key.generation)?;
        if io.in_flight & Op::DatagramReceive as u8 != 0 {
            return None;
        }
        let receive = &io.datagram.as_ref()?.receive;
        let mut storage = SockAddrStorage::zeroed();
        // SAFETY: `sockaddr_storage` is this platform's type that SockAddrStorage wraps.
        unsafe { *storage.view_as::<sockaddr_storage>() = receive.name };
        // SAFETY: the receive completed, so the kernel wrote a valid address of
        // `msg_namelen` bytes into `name` (or left it zeroed: an unnamed sender).
        let sender = unsafe { SockAddr::new(storage, receive.header.msg_namelen) };
        let is_truncated = receive.header.msg_flags & libc::MSG_TRUNC != 0;
        Some((&receive.bytes[..receive.len], sender, is_truncated))
    }

    /// Sends `bytes` as one datagram to the sender of the last datagram received, unless
    /// a send is in flight; returns whether it was submitted.
    pub fn send_datagram(&mut self, key: Key, bytes: &[u8]) -> bool {
        let Some(io) = self
            .open(key)
            .filter(|io| io.in_flight & Op::DatagramSend as u8 == 0)
        else {
            return false;
        };
        let fd = types::Fd(io.fd.as_raw_fd());
        let Some(datagram) = io.datagram.as_mut() else {
            return false;
        };
        let Datagram { receive, send } = &mut **datagram;
        send.bytes.clear();
        send.bytes.extend_from_slice(bytes);
        send.name = receive.name;
        let header = send.prepare(bytes.len(), receive.header.msg_namelen);
        self.start(
            key,
            Op::DatagramSend,
            // MSG_DONTWAIT: a peer whose queue is full fails this send at once (EAGAIN)
            // instead of parking it, and with it every later reply on this socket.
            opcode::SendMsg::new(fd, header)
                .flags(libc::MSG_DONTWAIT as u32)
                .build(),
        );
        true
    }

    /// Watches the slot's descriptor until it is readable, once.
    pub fn arm_readable(&mut self, key: Key) {
        let Some(io) = self
            .open(key)
            .filter(|io| io.in_flight & Op::Poll as u8 == 0)
        else {
            return;
        };
        let entry = opcode::PollAdd::new(types::Fd(io.fd.as_raw_fd()), libc::POLLIN as u32).build();
        self.start(key, Op::Poll, entry);
    }

    fn cancel(&mut self, key: Key, op: Op) {
        let entry = opcode::AsyncCancel::new(key.user_data(op))
            .build()
            .user_data(key.user_data(Op::Cancel));
        self.push(entry);
    }

    /// Cancels the receive armed on `key`, if any; its last completion still arrives.
    pub fn cancel_receive(&mut self, key: Key) {
        if self.open(key).is_some() && self.is_in_flight(key, Op::Receive) {
            self.cancel(key, Op::Receive);
        }
    }

    /// Closes the slot: its operations are cancelled, and its socket is closed and its
    /// buffers freed once their completions have arrived. Nothing more is reported for it.
    pub fn close(&mut self, key: Key) {
        let Some(io) = self.open(key) else {
            return;
        };
        io.is_closing = true;
        let in_flight = io.in_flight;
        for op in Op::IN_FLIGHT {
            if in_flight & op as u8 != 0 {
                self.cancel(key, op);
            }
        }
        if in_flight == 0 {
            self.free(key.index);
        }
    }

    fn free(&mut self, index: u32) {
        let slot = &mut self.slots[index as usize];
        if slot.io.take().is_some() {
            slot.generation = slot.generation.wrapping_add(1) & GENERATION_MASK;
            self.free.push(index);
            self.live -= 1;
        }
    }

    /// Submits what is queued and sleeps until a completion arrives or `timeout` passes.
    ///
    /// # Errors
    ///
    /// The OS error of `io_uring_enter`, other than an interrupted or timed-out wait.
    pub fn wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.flush_backlog()?;
        let result = match timeout {
            Some(timeout) => {
                let timespec = types::Timespec::from(timeout);
                let args = types::SubmitArgs::new().timespec(&timespec);
                self.ring.submitter().submit_with_args(1, &args)
            }
            None => self.ring.submit_and_wait(1),
        };
        match result {
            Ok(_) => Ok(()),
            // ETIME: the timeout passed; EBUSY: completions must be reaped first.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn flush_backlog(&mut self) -> io::Result<()> {
        while !self.backlog.is_empty() {
            let mut taken = 0;
            {
                let mut queue = self.ring.submission();
                for entry in &self.backlog {
                    // SAFETY: as in `push`: these entries were built by this file.
                    if unsafe { queue.push(entry) }.is_err() {
                        break;
                    }
                    taken += 1;
                }
            }
            self.backlog.drain(..taken);
            if !self.backlog.is_empty() {
                match self.ring.submit() {
                    Ok(_) => {}
                    Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => {
                        return Ok(());
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// The next completion for an open slot, or `None` when none has arrived.
    pub fn next_completion(&mut self) -> Option<Completion> {
        if let Some((id, _)) = self.received.take() {
            self.provided.recycle(id);
        }
        loop {
            if self.completions.is_empty() {
                self.completions.extend(self.ring.completion());
            }
            let entry = self.completions.pop_front()?;
            if let Some(completion) = self.complete(&entry) {
                return Some(completion);
            }
        }
    }

    /// Settles one completion: in-flight bits, buffers, stale and closing slots.
    fn complete(&mut self, entry: &cqueue::Entry) -> Option<Completion> {
        let (index, generation, op) = Key::from_user_data(entry.user_data());
        let (result, flags) = (entry.result(), entry.flags());
        let buffer = cqueue::buffer_select(flags);
        let is_armed = cqueue::more(flags);
        let key = Key { index, generation };
        let op = op.filter(|op| *op != Op::Cancel)?;
        let is_live = self
            .slots
            .get(key.index())
            .is_some_and(|slot| slot.generation == generation && slot.io.is_some());
        let io = if is_live {
            self.slots[key.index()].io.as_mut()
        } else {
            None
        };
        let Some(io) = io.filter(|io| !io.is_closing) else {
            // Stale (a reused slot) or closing: settle what the completion carries.
            if let Some(id) = buffer {
                self.provided.recycle(id);
            }
            if op == Op::Accept && result >= 0 {
                // SAFETY: the kernel just created this descriptor for us; nobody owns it.
                drop(unsafe { OwnedFd::from_raw_fd(result) });
            }
            if is_live {
                let io = self.slots[key.index()].io.as_mut()?;
                if !is_armed {
                    io.in_flight &= !(op as u8);
                }
                if io.in_flight == 0 {
                    self.free(index);
                }
            } else {
                tracing::debug!("io_uring: stale completion for slot {index} ignored");
            }
            return None;
        };
        if !is_armed {
            io.in_flight &= !(op as u8);
        }
        Some(match op {
            Op::Accept => Completion::Accepted {
                key,
                // SAFETY: a non-negative accept result is a new descriptor nobody owns.
                result: count_result(result).map(|fd| unsafe { OwnedFd::from_raw_fd(fd as i32) }),
                is_armed,
            },
            Op::Receive => {
                if result == -libc::EINVAL && self.has_receive_limit {
                    // This kernel has no multishot total limit: use single-shot receives.
                    tracing::debug!(
                        "io_uring: multishot receive limits unsupported; receiving single-shot"
                    );
                    self.has_receive_limit = false;
                    let budget = io.budget as usize;
                    self.arm_receive(key, budget);
                    return None;
                }
                if let Some(id) = buffer {
                    let len = count_result(result).unwrap_or(0);
                    self.received = Some((id, len));
                    io.received_since_arm += len;
                    if io.received_since_arm > io.budget as usize && self.has_receive_limit {
                        // A kernel that accepts the limit but overshoots it: stay exact.
                        tracing::warn!(
                            "io_uring: receive overshot its budget; receiving single-shot"
                        );
                        self.has_receive_limit = false;
                    }
                }
                Completion::Received {
                    key,
                    result: count_result(result),
                }
            }
            Op::Send => {
                if io.send.capacity() > KEPT_SEND_BUFFER_BYTES {
                    io.send = Vec::new();
                }
                Completion::Sent {
                    key,
                    result: count_result(result),
                }
            }
            Op::DatagramReceive => {
                if let (Ok(len), Some(datagram)) = (count_result(result), io.datagram.as_mut()) {
                    datagram.receive.len = len.min(datagram.receive.bytes.len());
                }
                Completion::DatagramReceived {
                    key,
                    result: count_result(result),
                }
            }
            Op::DatagramSend => Completion::DatagramSent {
                key,
                result: count_result(result),
            },
            Op::Poll | Op::Cancel => Completion::Readable { key },
        })
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // The kernel may still use a buffer until its operation completes: cancel what is
        // in flight and wait for every completion before freeing anything.
        for index in 0..self.slots.len() {
            let generation = self.slots[index].generation;
            self.close(Key {
                index: index as u32,
                generation,
            });
        }
        let deadline = Instant::now() + DROP_WAIT;
        while self.live > 0 {
            let now = Instant::now();
            if now >= deadline || self.wait(Some(deadline - now)).is_err() {
                break;
            }
            while self.next_completion().is_some() {}
        }
        if self.live > 0 {
            tracing::error!(
                "io_uring: {} slots still had operations in flight at exit; leaking their buffers",
                self.live
            );
            mem::forget(mem::take(&mut self.slots));
            return;
        }
        if self
            .ring
            .submitter()
            .unregister_buf_ring(BUFFER_GROUP)
            .is_ok()
        {
            // SAFETY: unregistered just above and no operation is in flight, so the kernel
            // holds no pointer into the buffers; `provided` is not used again.
            unsafe { ManuallyDrop::drop(&mut self.provided) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    fn next(ring: &mut Ring) -> Completion {
        for _ in 0..100 {
            if let Some(completion) = ring.next_completion() {
                return completion;
            }
            ring.wait(Some(Duration::from_millis(50))).unwrap();
        }
        panic!("no completion");
    }

    #[test]
    fn user_data_round_trips() {
        let key = Key {
            index: 77,
            generation: 0x12_3456,
        };
        assert_eq!(
            Key::from_user_data(key.user_data(Op::Send)),
            (77, 0x12_3456, Some(Op::Send))
        );
    }

    #[test]
    fn receive_stops_at_its_budget() {
        let mut ring = Ring::new().unwrap();
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let key = ring.add(OwnedFd::from(ours));
        // Some bytes first, then more than the budget while the receive is armed.
        theirs.write_all(&[7u8; 300]).unwrap();
        ring.arm_receive(key, 1000);
        let mut got = 0;
        while ring.is_receiving(key) {
            match next(&mut ring) {
                Completion::Received { result, .. } => {
                    let n = result.unwrap();
                    assert_eq!(ring.received().len(), n);
                    if got == 0 {
                        theirs.write_all(&[8u8; 3000]).unwrap();
                    }
                    got += n;
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(
            got > 0 && got <= 1000,
            "received {got} bytes on a budget of 1000"
        );
        assert!(
            ring.has_receive_limit,
            "this kernel (6.17+) takes multishot limits"
        );
        ring.send(key, b"hello");
        match next(&mut ring) {
            Completion::Sent { result, .. } => assert_eq!(result.unwrap(), 5),
            other => panic!("{other:?}"),
        }
        let mut reply = [0u8; 5];
        theirs.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"hello");
    }

    #[test]
    fn close_waits_for_cancelled_operations() {
        let mut ring = Ring::new().unwrap();
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let key = ring.add(OwnedFd::from(ours));
        ring.arm_receive(key, 100);
        ring.wait(Some(Duration::from_millis(10))).unwrap();
        ring.close(key);
        assert_eq!(
            ring.live_slots(),
            1,
            "freed before the cancelled receive completed"
        );
        for _ in 0..100 {
            if ring.live_slots() == 0 {
                break;
            }
            ring.wait(Some(Duration::from_millis(50))).unwrap();
            assert!(
                ring.next_completion().is_none(),
                "a closed slot reports nothing"
            );
        }
        assert_eq!(ring.live_slots(), 0);
        let reused = ring.add(OwnedFd::from(UnixStream::pair().unwrap().0));
        assert_eq!(reused.index(), key.index());
        assert_ne!(reused, key, "a reused slot has a new generation");
        assert!(!ring.is_receiving(key));
    }

    #[test]
    fn setup_errors_name_the_cause() {
        let eperm = io::Error::from_raw_os_error(libc::EPERM);
        let text = explain_setup_error(&eperm, Some(2)).to_string();
        assert!(text.contains("kernel.io_uring_disabled=2"), "{text}");
        let enosys = io::Error::from_raw_os_error(libc::ENOSYS);
        assert!(
            explain_setup_error(&enosys, Some(0))
                .to_string()
                .contains("seccomp")
        );
    }
}
