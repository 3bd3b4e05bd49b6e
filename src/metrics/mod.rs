//! What the server counts, and how a scrape reads it: per-loop counter slots summed only
//! when `/metrics` is asked for.
//!
//! Counting must cost next to nothing per message, so no counter is shared between
//! writers: every loop thread (and every `forking` child) owns one [`Counters`] slot and
//! is its only writer, adding with a relaxed load and store (no locked instruction).
//! A scrape sums every slot. The slots live in one `MAP_SHARED` anonymous mapping
//! created before any fork, so a `forking` child writes where its parent's metrics
//! server reads. When a slot's owner ends, its counts are folded into a slot of retired
//! totals under a short lock that scrapes take too, so a sum never sees them twice.
//! A slot names the process that claimed it: a `forking` child never folds its own (it
//! may be killed at any moment, even halfway through); the parent folds it when it reaps
//! the child ([`Metrics::retire_process`]), so a killed child frees its slot and keeps
//! its counts.
//!
//! Without `--metrics`, [`Metrics::disabled`] hands out counters that count nothing.

mod exposition;
mod http;
mod process;

pub use http::{MetricsServer, Probe};

use crate::sys::process::Pid;
use crate::sys::shared_memory::SharedWords;
use std::cell::Cell;
use std::io;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};

/// The `transport` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// TCP streams.
    Tcp,
    /// UDP datagrams.
    Udp,
    /// Unix stream sockets.
    Unix,
    /// Unix datagram sockets.
    UnixDatagram,
}

impl Transport {
    const ALL: [Transport; 4] = [
        Transport::Tcp,
        Transport::Udp,
        Transport::Unix,
        Transport::UnixDatagram,
    ];

    /// The label value, spelled as the readiness lines' schemes.
    pub fn label(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
            Transport::Unix => "unix",
            Transport::UnixDatagram => "unix-dgram",
        }
    }

    fn is_stream(self) -> bool {
        matches!(self, Transport::Tcp | Transport::Unix)
    }
}

/// Why the server closed a stream connection (the `reason` label of
/// `reverb_connections_closed_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The peer closed its side and every reply owed was sent.
    PeerEof,
    /// `--idle-timeout` passed without a byte from the peer.
    IdleTimeout,
    /// `until-quit` answered `quit` and closed.
    Quit,
    /// The setup refused the peer: a bad PROXY header, a failed TLS handshake, or the
    /// setup deadline passed.
    Rejected,
    /// The protocol handler panicked.
    HandlerPanic,
    /// The peer reset the connection (`ECONNRESET`, `EPIPE`).
    Reset,
    /// Shutdown: everything owed was sent, then the connection was closed.
    Drain,
    /// Shutdown: `--drain-timeout` passed with bytes still owed.
    DrainCut,
    /// Any other I/O error.
    Error,
}

impl CloseReason {
    const ALL: [CloseReason; 9] = [
        CloseReason::PeerEof,
        CloseReason::IdleTimeout,
        CloseReason::Quit,
        CloseReason::Rejected,
        CloseReason::HandlerPanic,
        CloseReason::Reset,
        CloseReason::Drain,
        CloseReason::DrainCut,
        CloseReason::Error,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::PeerEof => "peer_eof",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::Quit => "quit",
            CloseReason::Rejected => "rejected",
            CloseReason::HandlerPanic => "handler_panic",
            CloseReason::Reset => "reset",
            CloseReason::Drain => "drain",
            CloseReason::DrainCut => "drain_cut",
            CloseReason::Error => "error",
        }
    }
}

/// Why a datagram got no answer (the `reason` label of `reverb_datagrams_dropped_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// From a source port below 1024 or a broadcast/multicast address.
    ReflectionGuard,
    /// It was read truncated, so it is not echoed short.
    TooLarge,
    /// The reply could not be sent at once (the peer's buffer is full).
    PeerNotReading,
    /// It was the `--panic-on` word.
    HandlerPanic,
    /// Sending the reply failed otherwise.
    Error,
}

impl DropReason {
    const ALL: [DropReason; 5] = [
        DropReason::ReflectionGuard,
        DropReason::TooLarge,
        DropReason::PeerNotReading,
        DropReason::HandlerPanic,
        DropReason::Error,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::ReflectionGuard => "reflection_guard",
            DropReason::TooLarge => "too_large",
            DropReason::PeerNotReading => "peer_not_reading",
            DropReason::HandlerPanic => "handler_panic",
            DropReason::Error => "error",
        }
    }
}

// Where each counter sits inside one transport's block of words.
const ACCEPTED: usize = 0;
const REFUSED: usize = 1;
const CLOSED: usize = 2;
const HANDLER_PANICS: usize = CLOSED + CloseReason::ALL.len();
const RECEIVED_BYTES: usize = HANDLER_PANICS + 1;
const SENT_BYTES: usize = RECEIVED_BYTES + 1;
const DATAGRAMS_RECEIVED: usize = SENT_BYTES + 1;
const DATAGRAMS_ANSWERED: usize = DATAGRAMS_RECEIVED + 1;
const DROPPED: usize = DATAGRAMS_ANSWERED + 1;
const ACCEPT_PAUSES: usize = DROPPED + DropReason::ALL.len();
const PER_TRANSPORT: usize = ACCEPT_PAUSES + 1;
const COUNTER_WORDS: usize = PER_TRANSPORT * Transport::ALL.len();

/// Words per slot: a state word, the counters, padded to whole 128-byte lines so two
/// loops never write the same cache line.
const SLOT_WORDS: usize = (1 + COUNTER_WORDS).div_ceil(16) * 16;
/// Slots in the mapping. Slot 0 holds retired totals and slot 1 is shared (with atomic
/// adds) by owners that find every other slot taken; only touched pages cost memory.
const SLOTS: usize = 4096;
const RETIRED_SLOT: usize = 0;
const OVERFLOW_SLOT: usize = 1;
/// The header: readiness, the fold lock and the highest slot ever claimed.
const HEADER_WORDS: usize = 16;
const READY: usize = 0;
const FOLD_LOCK: usize = 1;
const HIGH_WATER: usize = 2;

/// A slot's state word: `FREE`, or the process id of the owner that claimed it.
const FREE: u64 = 0;

/// The state word of a slot claimed by process `pid`.
fn claimed_by(pid: Pid) -> u64 {
    // A process id is positive, so this is never FREE.
    u64::from(pid.unsigned_abs())
}

/// The server's metrics: a cheap, copyable handle. [`Metrics::disabled`] counts nothing.
#[derive(Clone, Copy, Debug)]
pub struct Metrics {
    shared: Option<&'static Shared>,
}

#[derive(Debug)]
struct Shared {
    words: SharedWords,
    /// The serving process, whose `process_*` metrics are reported (a `forking` server's
    /// metrics may be served by a helper process).
    server_pid: Pid,
}

impl Metrics {
    /// Metrics that count; call before forking or starting any loop.
    ///
    /// The mapping lives for the rest of the process: every loop and child may hold a
    /// slot in it until the process exits.
    ///
    /// # Errors
    ///
    /// The OS error of mapping the counter slots.
    pub fn new() -> io::Result<Self> {
        let words = SharedWords::new(HEADER_WORDS + SLOTS * SLOT_WORDS)?;
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            words,
            server_pid: crate::sys::process::id(),
        }));
        shared.words()[HIGH_WATER].store(OVERFLOW_SLOT as u64 + 1, Ordering::Relaxed);
        Ok(Metrics {
            shared: Some(shared),
        })
    }

    /// Metrics that count nothing (no `--metrics`): every count is one branch.
    pub fn disabled() -> Self {
        Metrics { shared: None }
    }

    /// Whether counts are kept.
    pub fn is_enabled(&self) -> bool {
        self.shared.is_some()
    }

    /// A counter slot for one loop thread (or one `forking` child, claimed by the parent
    /// before the fork). Its owner is its only writer; dropping it folds its counts into
    /// the retired totals.
    pub fn counters(&self) -> Counters {
        let Some(shared) = self.shared else {
            return Counters::nothing();
        };
        let words = shared.words();
        let owner = claimed_by(crate::sys::process::id());
        for slot in OVERFLOW_SLOT + 1..SLOTS {
            let state = &words[slot_start(slot)];
            if state.load(Ordering::Relaxed) == FREE
                && state
                    .compare_exchange(FREE, owner, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                words[HIGH_WATER].fetch_max(slot as u64 + 1, Ordering::Release);
                return Counters::owning(shared, slot, false);
            }
        }
        Counters::owning(shared, OVERFLOW_SLOT, true)
    }

    /// Marks every listener as served (`true`) for `/readyz`.
    pub fn set_ready(&self, is_ready: bool) {
        if let Some(shared) = self.shared {
            shared.words()[READY].store(u64::from(is_ready), Ordering::Release);
        }
    }

    /// Whether [`Metrics::set_ready`] said so last.
    pub fn is_ready(&self) -> bool {
        self.shared
            .is_some_and(|shared| shared.words()[READY].load(Ordering::Acquire) == 1)
    }

    /// The sum of every slot, read under the fold lock.
    pub fn totals(&self) -> Totals {
        let mut totals = Totals {
            values: [0; COUNTER_WORDS],
        };
        let Some(shared) = self.shared else {
            return totals;
        };
        let words = shared.words();
        let _lock = shared.lock_folds();
        let high_water = (words[HIGH_WATER].load(Ordering::Acquire) as usize).min(SLOTS);
        for slot in 0..high_water {
            let start = slot_start(slot);
            if slot > OVERFLOW_SLOT && words[start].load(Ordering::Acquire) == FREE {
                continue;
            }
            for (total, word) in totals.values.iter_mut().zip(&words[start + 1..]) {
                *total += word.load(Ordering::Relaxed);
            }
        }
        totals
    }

    /// Folds the slots of process `pid`, which has ended (a `forking` child its parent
    /// reaped), into the retired totals and frees them: the counts stay, the slots are
    /// reused. Call only once `pid` can no longer write (it was reaped).
    pub fn retire_process(&self, pid: Pid) {
        let Some(shared) = self.shared else {
            return;
        };
        let words = shared.words();
        let owner = claimed_by(pid);
        let high_water = (words[HIGH_WATER].load(Ordering::Acquire) as usize).min(SLOTS);
        for slot in OVERFLOW_SLOT + 1..high_water {
            if words[slot_start(slot)].load(Ordering::Acquire) == owner {
                shared.retire(slot);
            }
        }
    }

    fn server_pid(&self) -> Pid {
        self.shared
            .map_or_else(crate::sys::process::id, |shared| shared.server_pid)
    }
}

impl Shared {
    fn words(&self) -> &[AtomicU64] {
        self.words.words()
    }

    /// Folds `slot`'s counts into the retired totals under the fold lock, then frees it.
    fn retire(&self, slot: usize) {
        let words = self.words();
        let start = slot_start(slot);
        {
            let _lock = self.lock_folds();
            let retired = &words[slot_start(RETIRED_SLOT) + 1..];
            for (total, word) in retired
                .iter()
                .zip(&words[start + 1..start + 1 + COUNTER_WORDS])
            {
                total.fetch_add(word.swap(0, Ordering::Relaxed), Ordering::Relaxed);
            }
        }
        words[start].store(FREE, Ordering::Release);
    }

    /// Takes the fold lock. Holders: a slot's retirement and a scrape, in the server and
    /// in the `forking` model's metrics process; each holds it for one pass over slots.
    fn lock_folds(&self) -> FoldLock<'_> {
        let lock = &self.words()[FOLD_LOCK];
        while lock
            .compare_exchange_weak(0, 1, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            std::thread::yield_now();
        }
        FoldLock { lock }
    }
}

struct FoldLock<'a> {
    lock: &'a AtomicU64,
}

impl Drop for FoldLock<'_> {
    fn drop(&mut self) {
        self.lock.store(0, Ordering::Release);
    }
}

fn slot_start(slot: usize) -> usize {
    HEADER_WORDS + slot * SLOT_WORDS
}

/// One owner's counter slot. It is `Send` (a loop may be built on one thread and run on
/// another) but not `Sync` or `Clone`: one writer per slot is what makes a relaxed load
/// and store a correct increment.
#[derive(Debug)]
pub struct Counters {
    shared: Option<&'static Shared>,
    slot: usize,
    /// The overflow slot is shared, so its adds must be atomic read-modify-writes.
    is_overflow: bool,
    _not_sync: PhantomData<Cell<()>>,
}

impl Counters {
    fn nothing() -> Self {
        Counters {
            shared: None,
            slot: 0,
            is_overflow: false,
            _not_sync: PhantomData,
        }
    }

    fn owning(shared: &'static Shared, slot: usize, is_overflow: bool) -> Self {
        Counters {
            shared: Some(shared),
            slot,
            is_overflow,
            _not_sync: PhantomData,
        }
    }

    #[inline]
    fn add(&self, transport: Transport, counter: usize, amount: u64) {
        let Some(shared) = self.shared else {
            return;
        };
        let index = slot_start(self.slot) + 1 + transport as usize * PER_TRANSPORT + counter;
        let word = &shared.words()[index];
        if self.is_overflow {
            word.fetch_add(amount, Ordering::Relaxed);
        } else {
            // The single writer: no other thread stores to this word, so no add is lost.
            word.store(word.load(Ordering::Relaxed) + amount, Ordering::Relaxed);
        }
    }

    /// A stream connection was accepted and admitted.
    pub fn accepted(&self, transport: Transport) {
        self.add(transport, ACCEPTED, 1);
    }

    /// A stream connection was refused by `--max-conns` (accepted, then closed at once).
    pub fn refused(&self, transport: Transport) {
        self.add(transport, REFUSED, 1);
    }

    /// An admitted stream connection was closed.
    pub fn closed(&self, transport: Transport, reason: CloseReason) {
        self.add(transport, CLOSED + reason as usize, 1);
    }

    /// A protocol handler panicked (stream or datagram).
    pub fn handler_panicked(&self, transport: Transport) {
        self.add(transport, HANDLER_PANICS, 1);
    }

    /// `bytes` were read from a peer (stream bytes or a datagram's payload).
    #[inline]
    pub fn received(&self, transport: Transport, bytes: usize) {
        self.add(transport, RECEIVED_BYTES, bytes as u64);
    }

    /// `bytes` were taken by the kernel for a peer.
    #[inline]
    pub fn sent(&self, transport: Transport, bytes: usize) {
        self.add(transport, SENT_BYTES, bytes as u64);
    }

    /// A datagram of `bytes` arrived.
    pub fn datagram_received(&self, transport: Transport, bytes: usize) {
        self.add(transport, DATAGRAMS_RECEIVED, 1);
        self.add(transport, RECEIVED_BYTES, bytes as u64);
    }

    /// A reply datagram of `bytes` was sent.
    pub fn datagram_answered(&self, transport: Transport, bytes: usize) {
        self.add(transport, DATAGRAMS_ANSWERED, 1);
        self.add(transport, SENT_BYTES, bytes as u64);
    }

    /// A datagram got no answer.
    pub fn datagram_dropped(&self, transport: Transport, reason: DropReason) {
        self.add(transport, DROPPED + reason as usize, 1);
    }

    /// Accepting paused for lack of descriptors or memory.
    pub fn accept_paused(&self, transport: Transport) {
        self.add(transport, ACCEPT_PAUSES, 1);
    }
}

impl Drop for Counters {
    fn drop(&mut self) {
        let Some(shared) = self.shared else {
            return;
        };
        // A forked child leaves its slot to the parent that reaps it: killed halfway
        // through a fold (or while holding the fold lock) it would lose counts or stop
        // every scrape.
        if self.is_overflow || crate::sys::process::id() != shared.server_pid {
            return;
        }
        shared.retire(self.slot);
    }
}

/// Every counter summed over all slots, at one scrape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Totals {
    values: [u64; COUNTER_WORDS],
}

impl Totals {
    fn get(&self, transport: Transport, counter: usize) -> u64 {
        self.values[transport as usize * PER_TRANSPORT + counter]
    }

    /// Stream connections accepted and admitted.
    pub fn accepted(&self, transport: Transport) -> u64 {
        self.get(transport, ACCEPTED)
    }

    /// Stream connections refused by `--max-conns`.
    pub fn refused(&self, transport: Transport) -> u64 {
        self.get(transport, REFUSED)
    }

    /// Stream connections closed for `reason`.
    pub fn closed(&self, transport: Transport, reason: CloseReason) -> u64 {
        self.get(transport, CLOSED + reason as usize)
    }

    /// Stream connections open now: accepted and not yet closed.
    pub fn open(&self, transport: Transport) -> u64 {
        let closed: u64 = CloseReason::ALL
            .iter()
            .map(|&reason| self.closed(transport, reason))
            .sum();
        self.accepted(transport).saturating_sub(closed)
    }

    /// Bytes received.
    pub fn received_bytes(&self, transport: Transport) -> u64 {
        self.get(transport, RECEIVED_BYTES)
    }

    /// Bytes sent.
    pub fn sent_bytes(&self, transport: Transport) -> u64 {
        self.get(transport, SENT_BYTES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_sum_and_retire_without_double_counting() {
        let metrics = Metrics::new().expect("metrics");
        let first = metrics.counters();
        let second = metrics.counters();
        first.accepted(Transport::Tcp);
        second.accepted(Transport::Tcp);
        second.received(Transport::Tcp, 10);
        first.closed(Transport::Tcp, CloseReason::PeerEof);
        assert_eq!(metrics.totals().accepted(Transport::Tcp), 2);
        assert_eq!(metrics.totals().open(Transport::Tcp), 1);
        drop(second);
        let totals = metrics.totals();
        assert_eq!(totals.accepted(Transport::Tcp), 2);
        assert_eq!(totals.received_bytes(Transport::Tcp), 10);
        // The freed slot is reused and starts from zero.
        let third = metrics.counters();
        third.sent(Transport::Udp, 5);
        assert_eq!(metrics.totals().accepted(Transport::Tcp), 2);
        assert_eq!(metrics.totals().sent_bytes(Transport::Udp), 5);
    }

    #[test]
    fn a_retired_process_keeps_its_counts_and_frees_its_slots() {
        let metrics = Metrics::new().expect("metrics");
        let words = metrics.shared.expect("enabled").words();
        // A slot as a forked child that was killed leaves it: claimed by its pid, never
        // dropped.
        let child_pid = crate::sys::process::id() + 1;
        let slot = OVERFLOW_SLOT + 1;
        words[slot_start(slot)].store(claimed_by(child_pid), Ordering::Relaxed);
        words[HIGH_WATER].fetch_max(slot as u64 + 1, Ordering::Relaxed);
        let child = Counters::owning(metrics.shared.expect("enabled"), slot, false);
        child.accepted(Transport::Unix);
        child.received(Transport::Unix, 7);
        std::mem::forget(child);
        metrics.retire_process(child_pid + 1);
        assert_eq!(
            words[slot_start(slot)].load(Ordering::Relaxed),
            claimed_by(child_pid)
        );
        metrics.retire_process(child_pid);
        assert_eq!(words[slot_start(slot)].load(Ordering::Relaxed), FREE);
        let totals = metrics.totals();
        assert_eq!(totals.accepted(Transport::Unix), 1);
        assert_eq!(totals.received_bytes(Transport::Unix), 7);
        // Retiring again adds nothing.
        metrics.retire_process(child_pid);
        assert_eq!(metrics.totals().accepted(Transport::Unix), 1);
    }

    #[test]
    fn disabled_counts_nothing() {
        let metrics = Metrics::disabled();
        metrics.counters().accepted(Transport::Tcp);
        assert_eq!(metrics.totals().accepted(Transport::Tcp), 0);
        assert!(!metrics.is_ready());
    }
}
