//! The ring: the sockets it serves, the operations in flight on each, and the completions.
//!
//! Each socket sits in the slot of the caller's [`Token`]. Closing it takes it out of that
//! slot at once (the token may be reused), cancels its operations, and keeps its
//! descriptor and buffers among the closing slots until each operation's final
//! completion has arrived; only then are they freed.

use super::key::{Key, Op};
use super::message::{Datagram, ReceivedDatagram};
use super::provided::{BUFFER_GROUP, ProvidedBuffers, Received};
use super::setup::{build_ring, with_total_limit};
use crate::slab::Token;
use io_uring::{IoUring, cqueue, opcode, squeue, types};
use socket2::{SockAddr, SockRef};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::mem::{self, ManuallyDrop};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// Receive buffers in the provided-buffer ring (a power of two), and their size. A receive
/// takes a whole buffer however few bytes it carries, so the ring's bytes decide how much
/// input a turn can hold before receives fail with ENOBUFS, and the buffers' size how many
/// completions a large message costs: 64 KiB makes a 64 KiB message one completion and one
/// send (32 KiB took two of each, the second copied; 64 KiB at 50 connections went from
/// 0.73 to 0.93 x the C server's bytes/s, the same 1 KiB CPU per message). 128 of them
/// against 64: more room under bursts (docs/benchmarks.md, fairness). Only the pages the
/// kernel writes become resident: an idle connection holds none of them.
pub(super) const PROVIDED_BUFFERS: u16 = 128;
/// Bytes per provided buffer.
pub(super) const PROVIDED_BUFFER_BYTES: usize = 64 * 1024;
/// At most this many provided buffers are lent to sends at once. A send to a peer that does
/// not read completes only when that peer reads, so a buffer lent to it may never come back;
/// without a bound, as many such peers as the ring has buffers would leave every other
/// receive of the loop failing with ENOBUFS. Past the bound, replies are copied instead,
/// and three quarters of the ring always stay free for receiving. Half was measured: 1.14 x
/// the bytes/s at 50 connections of 64 KiB messages (a quarter copies the replies of all
/// but 32), but 1.36 x the p99 and 1.58 x the maximum latency under bursts, paired
/// (docs/benchmarks.md); fairness first.
const MAX_LENT_TO_SENDS: u16 = PROVIDED_BUFFERS / 4;
/// At most this many bytes go into one stream send; the rest waits for its completion.
const MAX_SEND_BYTES: usize = 128 * 1024;
/// A send buffer that grew past this is freed once its send completes.
const KEPT_SEND_BUFFER_BYTES: usize = 16 * 1024;
/// At most this many send buffers wait for reuse between sends; a slot holds one only
/// while its send is in flight, so an idle connection holds none.
const SPARE_SEND_BUFFERS: usize = 16;
/// At most one line per interval tells of receives that found no provided buffer.
const RAN_OUT_LOG_INTERVAL: Duration = Duration::from_secs(1);
/// For this many turns (waits) after a receive found no provided buffer, the ring counts as
/// short, and each receive armed takes at most its share of the ring's bytes
/// (`Ring::share`). Counted in turns, not time: a busy loop turns many times a millisecond.
const SHORT_RING_TURNS: u32 = 64;
/// Slots of each ring's registered file table (a sparse table: Linux 5.19+). A socket whose
/// token's index is below this is named in its sends by that index (`IOSQE_FIXED_FILE`), so
/// a send takes no reference on the socket's file of its own (`fget`/`fput` per operation);
/// the others send by descriptor. 4096 entries: 32 KiB of kernel memory per ring.
const FIXED_FILES: u32 = 4096;
/// Descriptors handed to the kernel for the table in one turn: each `FilesUpdate` reads
/// its own cell when it is submitted, so cells are not reused before that.
const UPDATE_CELLS: usize = 256;
/// What a `FilesUpdate` that empties a table entry reads.
static NO_FILE: RawFd = -1;
/// How long dropping a ring waits for cancelled operations before it leaks their buffers.
const DROP_WAIT: Duration = Duration::from_secs(2);

/// One finished operation of an open slot; [`Ring::next_completion`] gives it with the
/// slot's token.
#[derive(Debug)]
pub enum Completion {
    /// A listener accepted a connection, or failed to.
    Accepted {
        /// The new connection's descriptor.
        result: io::Result<OwnedFd>,
        /// Whether the multishot accept goes on (otherwise arm it again).
        is_armed: bool,
    },
    /// Bytes arrived, in the provided buffer the [`Received`] names; `Ok(None)` is the
    /// peer's EOF. A receive that [`Ring::cancel_receive`] ended reports nothing.
    Received(io::Result<Option<Received>>),
    /// A stream send finished.
    Sent {
        /// `Ok(n)`: the kernel took the first `n` bytes offered.
        result: io::Result<usize>,
        /// The bytes that send read, ours again: the caller owes first what the kernel did
        /// not take ([`Ring::unsent`]), then gives them back ([`Ring::recycle_sent`]).
        sent: SentBytes,
    },
    /// A datagram arrived: its length and sender; its bytes wait in the socket's slot
    /// ([`Ring::datagram_bytes`]).
    DatagramReceived(io::Result<ReceivedDatagram>),
    /// A watched descriptor became readable.
    Readable,
}

/// The bytes a stream send read, handed back by its [`Completion::Sent`].
#[derive(Debug)]
pub struct SentBytes(Sending);

/// Where the bytes of a stream send lie while the kernel reads them; they stay put until
/// its completion.
#[derive(Debug)]
enum Sending {
    /// Bytes moved out of the caller's output buffer ([`Ring::send`]), which no longer
    /// holds them: held once, here, they count against the receive budget instead.
    Copied(Vec<u8>),
    /// The provided buffer the input arrived in ([`Ring::take_received`]), kept lent (out
    /// of the kernel's ring).
    Provided(Received),
}

impl Sending {
    fn len(&self) -> usize {
        match self {
            Sending::Copied(bytes) => bytes.len(),
            Sending::Provided(received) => received.len(),
        }
    }
}

/// One socket and the buffers of its operations.
struct SlotIo {
    token: Token,
    fd: OwnedFd,
    /// Bits of the operations whose final completion has not arrived.
    in_flight: u8,
    /// The budget of the receive in flight, kept to re-arm it (single-shot, or after it
    /// waited for a buffer).
    budget: u32,
    /// Bytes received since the receive was armed, checked against `budget`.
    received_since_arm: usize,
    /// The bytes of the stream send in flight, until its completion.
    sending: Option<Sending>,
    /// Datagram sockets: one message each way.
    datagram: Option<Box<Datagram>>,
    /// The receive ended for want of a provided buffer, and waits in `Ring::starved`.
    is_starved: bool,
    /// `ProvidedBuffers::given_back` when a receive of this slot last found no buffer.
    no_buffer_at: Option<u64>,
    /// Whether the registered file table names this socket at the token's index.
    is_fixed: bool,
}

impl SlotIo {
    fn is_in_flight(&self, op: Op) -> bool {
        self.in_flight & op as u8 != 0
    }
}

/// One io_uring with the sockets it serves.
pub struct Ring {
    ring: IoUring,
    /// Open sockets, in the slot of their token's index.
    slots: Vec<Option<SlotIo>>,
    /// Closed sockets whose operations have not all completed, by key.
    closing: HashMap<Key, SlotIo>,
    provided: ManuallyDrop<ProvidedBuffers>,
    /// Completions copied out of the kernel's queue, not yet handed out.
    completions: VecDeque<cqueue::Entry>,
    /// Entries that did not fit the submission queue yet.
    backlog: Vec<squeue::Entry>,
    /// Send buffers of completed sends, for the next ones (at most `SPARE_SEND_BUFFERS`).
    spare_sends: Vec<Vec<u8>>,
    /// Whether multishot receives take a total limit; cleared on the first EINVAL.
    has_receive_limit: bool,
    /// Provided buffers that sends read from now (at most `MAX_LENT_TO_SENDS`).
    lent_to_sends: u16,
    /// Receives that ended because every provided buffer was in use (ENOBUFS) a second
    /// time with no buffer given back in between, oldest first. Each is armed again only
    /// after a buffer came back: armed at once, it would fail the same way in every turn,
    /// and the loop would spin.
    starved: VecDeque<Token>,
    /// `ProvidedBuffers::given_back` when `starved` was last served.
    given_back_seen: u64,
    /// Receives that found no buffer: in all, as of the last line about them, and when
    /// that line was written.
    ran_out: (u64, u64, Option<Instant>),
    /// Open slots (connections, listeners, datagram sockets): the divisor of a receive's
    /// share of the ring while it is short.
    open_slots: usize,
    /// Turns left before the ring no longer counts as short (`SHORT_RING_TURNS`).
    short_turns: u32,
    /// Entries of the registered file table: `FIXED_FILES`, or 0 if the kernel refused one.
    fixed_files: usize,
    /// The descriptors of this turn's `FilesUpdate`s, each read by the kernel when it is
    /// submitted; never moved (`UPDATE_CELLS`), and reused only after a submission.
    update_cells: Box<[RawFd]>,
    /// Cells taken since the last submission.
    cells_used: usize,
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
        let fixed_files = match ring.submitter().register_files_sparse(FIXED_FILES) {
            Ok(()) => FIXED_FILES as usize,
            Err(e) => {
                tracing::debug!("io_uring: no registered file table ({e}); sending by descriptor");
                0
            }
        };
        Ok(Ring {
            ring,
            slots: Vec::new(),
            closing: HashMap::new(),
            provided: ManuallyDrop::new(provided),
            completions: VecDeque::new(),
            backlog: Vec::new(),
            spare_sends: Vec::new(),
            has_receive_limit: true,
            lent_to_sends: 0,
            starved: VecDeque::new(),
            given_back_seen: 0,
            ran_out: (0, 0, None),
            open_slots: 0,
            short_turns: 0,
            fixed_files,
            update_cells: vec![-1; UPDATE_CELLS].into_boxed_slice(),
            cells_used: 0,
        })
    }

    /// Takes `fd` into `token`'s slot (a token of the caller's slab, not in use here).
    pub fn add(&mut self, token: Token, fd: OwnedFd) {
        self.insert(token, fd, None);
    }

    /// Takes a datagram socket into `token`'s slot, with buffers for one datagram each
    /// way.
    pub fn add_datagram(&mut self, token: Token, fd: OwnedFd, max_datagram_bytes: usize) {
        self.insert(token, fd, Some(Datagram::new(max_datagram_bytes)));
    }

    fn insert(&mut self, token: Token, fd: OwnedFd, datagram: Option<Box<Datagram>>) {
        let index = token.index();
        if self.slots.len() <= index {
            self.slots.resize_with(index + 1, || None);
        }
        if let Some(old) = self.slots[index].take() {
            // The caller reused a token it never closed here: close the old socket now.
            self.open_slots -= 1;
            self.retire(old);
        }
        self.open_slots += 1;
        let is_fixed = self.name_fixed(token, fd.as_raw_fd());
        self.slots[index] = Some(SlotIo {
            token,
            fd,
            in_flight: 0,
            budget: 0,
            received_since_arm: 0,
            sending: None,
            datagram,
            is_starved: false,
            no_buffer_at: None,
            is_fixed,
        });
    }

    /// Points the registered file table's entry for `token` at `fd`, in order with the
    /// operations queued around it; false if the table has no such entry or no cell is
    /// free this turn (the socket is then named by its descriptor).
    fn name_fixed(&mut self, token: Token, fd: RawFd) -> bool {
        let Ok(offset @ 0..) = i32::try_from(token.index()) else {
            return false;
        };
        if token.index() >= self.fixed_files || self.cells_used == UPDATE_CELLS {
            return false;
        }
        let cell = &mut self.update_cells[self.cells_used];
        *cell = fd;
        self.cells_used += 1;
        let pointer: *const RawFd = cell;
        self.update_fixed(token, pointer, offset);
        true
    }

    /// Queues a `FilesUpdate` of `token`'s table entry to the descriptor at `fd`, which
    /// stays put (a cell or `NO_FILE`) until it is submitted. Its completion is ignored:
    /// an entry that could not be set fails the sends that name it, which close the socket.
    fn update_fixed(&mut self, token: Token, fd: *const RawFd, offset: i32) {
        let entry = opcode::FilesUpdate::new(fd, 1).offset(offset).build();
        self.push(entry.user_data(Key::of(token).user_data(Op::Cancel)));
    }

    /// A send of `len` bytes at `pointer` on the slot's socket, named by its table entry
    /// when it has one.
    fn send_entry(io: &SlotIo, fd: types::Fd, pointer: *const u8, len: u32) -> squeue::Entry {
        let send = match io.is_fixed {
            true => opcode::Send::new(types::Fixed(io.token.index() as u32), pointer, len),
            false => opcode::Send::new(fd, pointer, len),
        };
        send.flags(libc::MSG_NOSIGNAL).build()
    }

    /// The slot of `token` while it is open.
    fn open(&mut self, token: Token) -> Option<&mut SlotIo> {
        let io = self.slots.get_mut(token.index())?.as_mut()?;
        (io.token == token).then_some(io)
    }

    fn open_ref(&self, token: Token) -> Option<&SlotIo> {
        let io = self.slots.get(token.index())?.as_ref()?;
        (io.token == token).then_some(io)
    }

    /// Whether a receive is armed on `token`.
    pub fn is_receiving(&self, token: Token) -> bool {
        self.open_ref(token).is_some_and(|io| {
            io.is_in_flight(Op::Receive) || io.is_in_flight(Op::DatagramReceive) || io.is_starved
        })
    }

    /// Whether a stream send on `token` has not completed.
    pub fn is_sending(&self, token: Token) -> bool {
        self.open_ref(token)
            .is_some_and(|io| io.is_in_flight(Op::Send))
    }

    /// The descriptor of `token`'s open socket, for work the ring does not do (the
    /// lingering close duplicates it).
    pub fn fd(&self, token: Token) -> Option<BorrowedFd<'_>> {
        self.open_ref(token).map(|io| io.fd.as_fd())
    }

    /// Sockets not yet freed: open, or closed with operations still in flight.
    pub fn live_slots(&self) -> usize {
        self.slots.iter().flatten().count() + self.closing.len()
    }

    fn push(&mut self, entry: squeue::Entry) {
        if !self.backlog.is_empty() {
            self.backlog.push(entry);
            return;
        }
        // SAFETY: every entry built in this file points only into buffers owned by its
        // slot (or by `provided`), and a slot is freed only after the final completion of
        // each of its operations (`settle`); `Ring::drop` waits for those completions or
        // leaks the buffers. The descriptor is the slot's own, open as long. A
        // `FilesUpdate` points at `NO_FILE` or at an update cell, which is not written again
        // before the kernel has taken every queued entry (`wait`), nor freed before the
        // ring (`ring` is dropped first).
        if unsafe { self.ring.submission().push(&entry) }.is_err() {
            self.backlog.push(entry);
        }
    }

    /// Submits `entry` as `op` on `token`'s open slot, which does not have `op` in flight.
    fn start(&mut self, token: Token, op: Op, entry: squeue::Entry) {
        if let Some(io) = self.open(token) {
            io.in_flight |= op as u8;
            self.push(entry.user_data(Key::of(token).user_data(op)));
        }
    }

    /// The open slot of `token` without `op` in flight, and its descriptor for an entry.
    fn idle_for(&mut self, token: Token, op: Op) -> Option<(&mut SlotIo, types::Fd)> {
        let io = self.open(token).filter(|io| !io.is_in_flight(op))?;
        let fd = types::Fd(io.fd.as_raw_fd());
        Some((io, fd))
    }

    /// Arms a multishot accept on a listener's slot (no-op if armed or closed).
    pub fn arm_accept(&mut self, token: Token) {
        if let Some((_, fd)) = self.idle_for(token, Op::Accept) {
            let entry = opcode::AcceptMulti::new(fd)
                .flags(libc::SOCK_CLOEXEC)
                .build();
            self.start(token, Op::Accept, entry);
        }
    }

    /// Arms a receive of at most `budget` bytes in total, less what the send in flight on
    /// `token` still holds ([`Ring::send`], [`Ring::take_received`]): bytes the caller no
    /// longer holds, but owes until they are sent. So what the caller holds and what the
    /// ring holds for it stay within one bound together. No-op if armed, closed, or nothing is left; a
    /// receive that waits for a provided buffer takes the new budget and stays waiting.
    /// Completions come as [`Completion::Received`] until the budget is used up or the
    /// peer's EOF; then [`Ring::is_receiving`] turns false.
    pub fn arm_receive(&mut self, token: Token, budget: usize) {
        let Some((io, _)) = self.idle_for(token, Op::Receive) else {
            return;
        };
        let sending = io.sending.as_ref().map_or(0, Sending::len);
        io.budget = u32::try_from(budget.saturating_sub(sending)).unwrap_or(u32::MAX);
        io.received_since_arm = 0;
        if !io.is_starved {
            self.submit_receive(token);
        }
    }

    /// Submits a receive on `token`'s open slot for what is left of its budget.
    fn submit_receive(&mut self, token: Token) {
        let has_limit = self.has_receive_limit;
        let share = self.share();
        let Some((io, fd)) = self.idle_for(token, Op::Receive) else {
            return;
        };
        let left = (io.budget as usize).saturating_sub(io.received_since_arm);
        let left = share.map_or(left, |share| left.min(share));
        let Ok(budget @ 1..) = u32::try_from(left) else {
            return;
        };
        io.budget = budget;
        io.received_since_arm = 0;
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
        self.start(token, Op::Receive, entry);
    }

    /// While the ring is short (a receive found no provided buffer in the last
    /// `SHORT_RING_TURNS` turns), the most one receive may take: the ring's bytes over the
    /// open slots, at least one buffer. So a few connections with much to send cannot take the
    /// whole ring in one turn and leave every other receive waiting behind them; while no
    /// receive goes short, budgets stay whole (a share at all times cost 1.65 x the CPU per
    /// message at 500 connections: every receive ended after a buffer or two).
    fn share(&self) -> Option<usize> {
        if self.short_turns == 0 {
            return None;
        }
        let ring_bytes = usize::from(PROVIDED_BUFFERS) * PROVIDED_BUFFER_BYTES;
        Some((ring_bytes / self.open_slots.max(1)).max(PROVIDED_BUFFER_BYTES))
    }

    /// The bytes a [`Completion::Received`] named (the loop takes them through
    /// [`Ring::take_received`]; the tests look at them here).
    #[cfg(test)]
    pub fn received(&self, received: &Received) -> &[u8] {
        self.provided.bytes(received)
    }

    /// Gives the buffer of a [`Completion::Received`] back to the kernel.
    pub fn recycle(&mut self, received: Received) {
        self.provided.recycle(received);
    }

    /// Sends a prefix of `bytes`, what the caller owes, unless a send is in flight; returns
    /// how many bytes the ring took. They are copied into the send, so the caller owes
    /// them no more and must drop them (otherwise they would be held twice, past the
    /// bound); the kernel may send fewer, and [`Completion::Sent`] hands back the rest.
    pub fn send(&mut self, token: Token, bytes: &[u8]) -> usize {
        let offered = bytes.len().min(MAX_SEND_BYTES);
        let is_idle = self
            .open_ref(token)
            .is_some_and(|io| !io.is_in_flight(Op::Send));
        if offered == 0 || !is_idle {
            return 0;
        }
        let mut send = self.spare_sends.pop().unwrap_or_default();
        let Some((io, fd)) = self.idle_for(token, Op::Send) else {
            return 0;
        };
        send.clear();
        send.extend_from_slice(&bytes[..offered]);
        // The vector's heap bytes stay put while the slot and the vector move.
        let entry = Ring::send_entry(io, fd, send.as_ptr(), offered as u32);
        io.sending = Some(Sending::Copied(send));
        self.start(token, Op::Send, entry);
        offered
    }

    /// Hands the bytes of `received` to `take`, with whether they may leave straight from
    /// their provided buffer now: `token` has no send in flight, and the ring has a buffer
    /// to spare for a send (one lent to a peer that never reads is lent for ever, so at
    /// most `MAX_LENT_TO_SENDS` are). When they may and `take` says they are the whole
    /// reply, they are sent from there (zero-copy), and the ring keeps the buffer lent until
    /// the send's [`Completion::Sent`] hands it back; otherwise it goes back to the kernel
    /// now.
    pub fn take_received(
        &mut self,
        token: Token,
        received: Received,
        take: impl FnOnce(&[u8], bool) -> bool,
    ) {
        let may_send = self.lent_to_sends < MAX_LENT_TO_SENDS
            && self
                .open_ref(token)
                .is_some_and(|io| !io.is_in_flight(Op::Send));
        let bytes = self.provided.bytes(&received);
        let (pointer, len) = (bytes.as_ptr(), bytes.len() as u32);
        let is_sent = take(bytes, may_send) && may_send && len > 0;
        let Some((io, fd)) = self.idle_for(token, Op::Send).filter(|_| is_sent) else {
            return self.provided.recycle(received);
        };
        // The buffer stays lent, so the kernel does not hand it to a receive while this
        // send reads it; `complete` gives it back only after the send's completion.
        io.sending = Some(Sending::Provided(received));
        let entry = Ring::send_entry(io, fd, pointer, len);
        self.start(token, Op::Send, entry);
        self.lent_to_sends += 1;
    }

    /// The bytes of `sent`, a [`Completion::Sent`]'s, that its send did not take.
    pub fn unsent<'a>(&'a self, sent: &'a SentBytes, written: usize) -> &'a [u8] {
        let bytes = match &sent.0 {
            Sending::Copied(bytes) => bytes,
            Sending::Provided(received) => self.provided.bytes(received),
        };
        bytes.get(written..).unwrap_or_default()
    }

    /// Takes back the bytes of a [`Completion::Sent`]: a provided buffer goes back to the
    /// kernel, a small copy's allocation is kept for the next send.
    pub fn recycle_sent(&mut self, sent: SentBytes) {
        self.give_back(sent.0);
    }

    fn give_back(&mut self, sending: Sending) {
        match sending {
            Sending::Provided(received) => self.provided.recycle(received),
            Sending::Copied(send) => {
                let is_kept = (1..=KEPT_SEND_BUFFER_BYTES).contains(&send.capacity());
                if is_kept && self.spare_sends.len() < SPARE_SEND_BUFFERS {
                    self.spare_sends.push(send);
                }
            }
        }
    }

    /// Bytes the send in flight on `token` holds: owed to the peer, no longer held by the
    /// caller (the count a drain cut owes).
    pub fn sending_bytes(&self, token: Token) -> usize {
        let io = self.open_ref(token).filter(|io| io.is_in_flight(Op::Send));
        io.and_then(|io| io.sending.as_ref())
            .map_or(0, Sending::len)
    }

    /// Arms a receive of one datagram (no-op if armed, closed or not a datagram slot).
    /// The last datagram's bytes are gone from then on.
    pub fn arm_datagram_receive(&mut self, token: Token) {
        let Some((io, fd)) = self.idle_for(token, Op::DatagramReceive) else {
            return;
        };
        let Some(datagram) = io.datagram.as_mut() else {
            return;
        };
        let header = datagram.receive.prepare_receive();
        // MSG_TRUNC: the result is the datagram's real length, so a truncated one is seen
        // with its size (recv(2)).
        let entry = opcode::RecvMsg::new(fd, header)
            .flags(libc::MSG_TRUNC as u32)
            .build();
        self.start(token, Op::DatagramReceive, entry);
    }

    /// The bytes of `datagram`, the last one received on `token`, while its receive is not
    /// armed again.
    pub fn datagram_bytes(&self, token: Token, datagram: &ReceivedDatagram) -> &[u8] {
        let Some(io) = self
            .open_ref(token)
            .filter(|io| !io.is_in_flight(Op::DatagramReceive))
        else {
            return &[];
        };
        io.datagram.as_ref().map_or(&[], |d| {
            &d.receive.bytes[..datagram.len.min(d.receive.bytes.len())]
        })
    }

    /// Sends `bytes` as one datagram to `to` at once, with a plain `sendto`, never waiting:
    /// a peer whose queue is full fails it with `EAGAIN` (`WouldBlock`), and the reply is
    /// the caller's to drop. Nothing stays in flight, so nothing is copied or kept.
    ///
    /// # Errors
    ///
    /// The OS error of `sendto`; `NotFound` for a token that is not open here.
    pub fn send_datagram(&self, token: Token, to: &SockAddr, bytes: &[u8]) -> io::Result<usize> {
        let io = self.open_ref(token).ok_or(io::ErrorKind::NotFound)?;
        SockRef::from(&io.fd).send_to_with_flags(bytes, to, libc::MSG_DONTWAIT)
    }

    /// Watches the slot's descriptor until it is readable, once.
    pub fn arm_readable(&mut self, token: Token) {
        if let Some((_, fd)) = self.idle_for(token, Op::Poll) {
            let entry = opcode::PollAdd::new(fd, libc::POLLIN as u32).build();
            self.start(token, Op::Poll, entry);
        }
    }

    fn cancel(&mut self, key: Key, op: Op) {
        let entry = opcode::AsyncCancel::new(key.user_data(op))
            .build()
            .user_data(key.user_data(Op::Cancel));
        self.push(entry);
    }

    /// Cancels the receive armed on `token`, if any (or waiting for a buffer); it reports
    /// nothing more.
    pub fn cancel_receive(&mut self, token: Token) {
        let Some(io) = self.open(token) else {
            return;
        };
        io.is_starved = false;
        if io.is_in_flight(Op::Receive) {
            self.cancel(Key::of(token), Op::Receive);
        }
    }

    /// Closes `token`'s slot: its operations are cancelled, and its socket is closed and
    /// its buffers freed once their completions have arrived. Nothing more is reported
    /// for it, and the token may be given to another socket at once.
    pub fn close(&mut self, token: Token) {
        if self.open_ref(token).is_some() {
            if let Some(io) = self.slots[token.index()].take() {
                self.open_slots -= 1;
                self.retire(io);
            }
        }
    }

    fn retire(&mut self, mut io: SlotIo) {
        if io.is_fixed {
            // The table's reference would keep the socket open; operations in flight keep
            // their own until they complete.
            let offset = io.token.index() as i32;
            self.update_fixed(io.token, &NO_FILE, offset);
        }
        if io.in_flight == 0 {
            // No send reads a provided buffer any more (its completion took it back).
            if let Some(Sending::Provided(from)) = io.sending.take() {
                self.lent_to_sends -= 1;
                self.provided.recycle(from);
            }
            return;
        }
        let key = Key::of(io.token);
        for op in Op::IN_FLIGHT.into_iter().filter(|op| io.is_in_flight(*op)) {
            self.cancel(key, op);
        }
        self.closing.insert(key, io);
    }

    /// Submits what is queued and sleeps until a completion arrives or `timeout` passes.
    ///
    /// # Errors
    ///
    /// The OS error of `io_uring_enter`, other than an interrupted or timed-out wait.
    pub fn wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.short_turns = self.short_turns.saturating_sub(1);
        self.serve_starved();
        self.flush_backlog()?;
        let result = match timeout {
            Some(timeout) => {
                let timespec = types::Timespec::from(timeout);
                let args = types::SubmitArgs::new().timespec(&timespec);
                self.ring.submitter().submit_with_args(1, &args)
            }
            None => self.ring.submit_and_wait(1),
        };
        if self.backlog.is_empty() && self.ring.submission().is_empty() {
            // The kernel has read every `FilesUpdate`'s cell.
            self.cells_used = 0;
        }
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

    /// Arms again, oldest first, every receive that waits for a provided buffer, once a
    /// buffer was given back since the last turn. (One receive per buffer given back left
    /// the waiting ones behind the receives still armed, which take buffers as fast: the
    /// tail of a burst grew by half.)
    fn serve_starved(&mut self) {
        let given_back = self.provided.given_back();
        if given_back == self.given_back_seen {
            return;
        }
        self.given_back_seen = given_back;
        while let Some(token) = self.starved.pop_front() {
            if let Some(io) = self.open(token).filter(|io| io.is_starved) {
                io.is_starved = false;
                self.submit_receive(token);
            }
        }
    }

    /// Drops entries of closed or cancelled receives from `starved` once it holds more than
    /// there are slots: a bound on the queue.
    fn bound_starved(&mut self) {
        if self.starved.len() > self.slots.len() {
            let slots = &self.slots;
            let is_waiting = |token: &Token| {
                let io = slots.get(token.index()).and_then(Option::as_ref);
                io.is_some_and(|io| io.token == *token && io.is_starved)
            };
            self.starved.retain(is_waiting);
        }
    }

    /// Counts a receive that found every provided buffer in use; the line that tells of
    /// such receives is written at most once an interval.
    fn count_no_buffer(&mut self) {
        let (total, logged, line) = &mut self.ran_out;
        *total += 1;
        let now = Instant::now();
        self.short_turns = SHORT_RING_TURNS;
        if line.is_none_or(|at| now.duration_since(at) >= RAN_OUT_LOG_INTERVAL) {
            tracing::warn!(
                "io_uring: all {PROVIDED_BUFFERS} provided receive buffers were in use; {} \
                 receives found none since the last such line (logged at most once a second)",
                *total - *logged
            );
            (*logged, *line) = (*total, Some(now));
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

    /// The next completion for an open slot, with the slot's token, or `None` when none
    /// has arrived.
    pub fn next_completion(&mut self) -> Option<(Token, Completion)> {
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
    fn complete(&mut self, entry: &cqueue::Entry) -> Option<(Token, Completion)> {
        let (key, op) = Key::from_user_data(entry.user_data());
        let op = op.filter(|op| *op != Op::Cancel)?;
        let (result, flags) = (entry.result(), entry.flags());
        let buffer = cqueue::buffer_select(flags);
        let is_armed = cqueue::more(flags);
        let has_receive_limit = self.has_receive_limit;
        let open = (self.slots.get_mut(key.index()))
            .and_then(Option::as_mut)
            .filter(|io| Key::of(io.token) == key);
        let Some(io) = open else {
            self.settle_closed(key, op, result, buffer, is_armed);
            return None;
        };
        if !is_armed {
            io.in_flight &= !(op as u8);
        }
        let token = io.token;
        let completion = match op {
            Op::Accept => Completion::Accepted {
                // SAFETY: a non-negative accept result is a new descriptor nobody owns.
                result: count_result(result).map(|fd| unsafe { OwnedFd::from_raw_fd(fd as i32) }),
                is_armed,
            },
            Op::Receive if result == -libc::EINVAL && has_receive_limit => {
                // This kernel has no multishot total limit: use single-shot receives.
                tracing::debug!(
                    "io_uring: multishot receive limits unsupported; receiving single-shot"
                );
                self.has_receive_limit = false;
                self.submit_receive(token);
                return None;
            }
            // Every provided buffer is in use. Buffers come back all the time, so the first
            // such failure is retried at once (waiting for a buffer to come back made the
            // tail of a burst 1.5 x longer, docs/benchmarks.md); a second one with none
            // given back in between waits for one (`serve_starved`).
            Op::Receive if result == -libc::ENOBUFS => {
                let given_back = self.provided.given_back();
                let is_starved = io.no_buffer_at.replace(given_back) == Some(given_back);
                io.is_starved = is_starved;
                self.count_no_buffer();
                match is_starved {
                    true => self.starved.push_back(token),
                    false => self.submit_receive(token),
                }
                self.bound_starved();
                return None;
            }
            // Ended by `cancel_receive`: the caller stopped reading and expects nothing.
            Op::Receive if result == -libc::ECANCELED => return None,
            Op::Receive => {
                let result = count_result(result);
                let mut received = None;
                if let Some(id) = buffer {
                    let bytes = self.provided.take(id, *result.as_ref().unwrap_or(&0));
                    io.received_since_arm += bytes.len();
                    if io.received_since_arm > io.budget as usize && has_receive_limit {
                        // A kernel that accepts the limit but overshoots it: stay exact.
                        tracing::warn!(
                            "io_uring: receive overshot its budget; receiving single-shot"
                        );
                        self.has_receive_limit = false;
                    }
                    match bytes.is_empty() {
                        true => self.provided.recycle(bytes),
                        false => received = Some(bytes),
                    }
                }
                Completion::Received(result.map(|_| received))
            }
            Op::Send => {
                let sending = io.sending.take().unwrap_or(Sending::Copied(Vec::new()));
                if matches!(sending, Sending::Provided(_)) {
                    self.lent_to_sends -= 1;
                }
                let result = count_result(result);
                Completion::Sent {
                    result,
                    sent: SentBytes(sending),
                }
            }
            Op::DatagramReceive => {
                let datagram = io.datagram.as_ref()?;
                let result = count_result(result).map(|len| datagram.receive.received(len));
                Completion::DatagramReceived(result)
            }
            Op::Poll | Op::Cancel => Completion::Readable,
        };
        Some((token, completion))
    }

    /// A completion for a closing or stale slot: give back what it carries, and free the
    /// slot after its last operation.
    fn settle_closed(&mut self, key: Key, op: Op, result: i32, buffer: Option<u16>, more: bool) {
        if let Some(id) = buffer {
            self.provided.reclaim(id);
        }
        if op == Op::Accept && result >= 0 {
            // SAFETY: the kernel just created this descriptor for us; nobody owns it.
            drop(unsafe { OwnedFd::from_raw_fd(result) });
        }
        let Some(io) = self.closing.get_mut(&key) else {
            tracing::debug!("io_uring: stale completion ignored");
            return;
        };
        if !more {
            io.in_flight &= !(op as u8);
        }
        // The send is over: a provided buffer it read may go back to the kernel.
        let sent = (op == Op::Send).then(|| io.sending.take()).flatten();
        if io.in_flight == 0 {
            self.closing.remove(&key);
        }
        if let Some(sending) = sent {
            if matches!(sending, Sending::Provided(_)) {
                self.lent_to_sends -= 1;
            }
            self.give_back(sending);
        }
    }
}

#[cfg(test)]
impl Ring {
    /// Receives that found every provided buffer in use, so far.
    pub(super) fn starved_receives(&self) -> u64 {
        self.ran_out.0
    }

    /// Bytes of a provided buffer that `token`'s send in flight reads.
    pub(super) fn sending_received(&self, token: Token) -> usize {
        match self.open_ref(token).and_then(|io| io.sending.as_ref()) {
            Some(Sending::Provided(received)) => received.len(),
            _ => 0,
        }
    }

    /// Whether multishot receives take a total limit here (Linux 6.17+).
    pub(super) fn has_receive_limit(&self) -> bool {
        self.has_receive_limit
    }
}

fn count_result(result: i32) -> io::Result<usize> {
    usize::try_from(result).map_err(|_| io::Error::from_raw_os_error(-result))
}

impl Drop for Ring {
    fn drop(&mut self) {
        // The kernel may still use a buffer until its operation completes: cancel what is
        // in flight and wait for every completion before freeing anything.
        for io in mem::take(&mut self.slots).into_iter().flatten() {
            self.retire(io);
        }
        let deadline = Instant::now() + DROP_WAIT;
        while !self.closing.is_empty() {
            let now = Instant::now();
            if now >= deadline || self.wait(Some(deadline - now)).is_err() {
                break;
            }
            while self.next_completion().is_some() {}
        }
        if !self.closing.is_empty() {
            tracing::error!(
                "io_uring: {} sockets still had operations in flight at exit; leaking their buffers",
                self.closing.len()
            );
            mem::forget(mem::take(&mut self.closing));
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
