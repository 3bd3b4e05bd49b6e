//! The one client loop every bench thread runs, for streams and datagrams alike.
//!
//! A thread owns a level-triggered epoll and a table of connection slots. The loop opens
//! connections (all at once, or at `--connect-rate`), gives each its own connect deadline
//! counted from its own `connect`, counts a connection established whenever its handshake
//! is seen complete (also at its deadline, if the event was not read yet), then drives the
//! load: every event goes to the connection's [`Conn`], which knows its transport and does
//! the verifying. A connection that has answered `--conn-lifetime` messages is closed and a
//! new one opened in its slot. When descriptors or local ports run out, the thread stops
//! opening connections and goes on with those it has.

use super::tally::{Exhausted, Tally};
use super::{AlignedBuf, MAX_WAIT, PUBLISH_EVERY_NS, Plan, Timeline, index_of, index_u32};
use crate::slab::Token;
use crate::sys::Interest;
use crate::sys::epoll::{Epoll, Events, Trigger};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::io;
use std::net::IpAddr;
use std::os::fd::BorrowedFd;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// At most this many connects between two looks at the events, so handshakes that
/// completed are noticed while thousands more are being opened.
const OPEN_BATCH: usize = 256;
/// A Unix stream `connect` that found the listener's backlog full is tried again after
/// this long (a non-blocking Unix connect never waits by itself).
const RETRY_NS: u64 = 1_000_000;
/// How often in-flight datagrams are checked against the loss timeout.
const EXPIRE_EVERY_NS: u64 = 10_000_000;
/// Events read per wait.
const EVENTS_PER_WAIT: usize = 1024;

/// Who a connection is: its slot, the id its content is made from, and (open loop) how
/// many messages earlier connections in its slot were scheduled.
#[derive(Clone, Copy, Debug)]
pub(super) struct ConnId {
    /// The slot, `0..conns`: the connection number users see in problems.
    pub slot: u32,
    /// The content id ([`Plan::content_id`]).
    pub content: u64,
    /// Open loop: the slot's schedule position of this connection's first message.
    pub schedule_base: u64,
}

/// What a new socket's `connect` did.
pub(super) enum Opened<C> {
    /// Connected at once (Unix stream, datagrams).
    Established(C),
    /// The handshake is under way; the socket becomes writable when it is done.
    Connecting(C),
    /// The listener's backlog is full (Unix stream): try again.
    Busy,
}

/// What a connection wants after handling something.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Flow {
    /// Still open; whether it waits for writability.
    Open { wants_write: bool },
    /// Closed (failed, or wrong bytes): its socket can go.
    Closed,
}

/// One transport's connection: stream (`stream.rs`) or datagram (`datagram.rs`). Errors
/// and wrong bytes are counted in `io.tally` by the connection itself.
pub(super) trait Conn: Sized {
    /// Bytes of the loop's read scratch buffer.
    const READ_BUF_BYTES: usize;
    /// Bytes of the loop's write scratch buffer.
    const WRITE_BUF_BYTES: usize;
    /// Whether [`Conn::expire`] must be called regularly.
    const EXPIRES: bool;

    /// Opens a non-blocking socket to the plan's endpoint, from `source` when given.
    fn open(plan: &Plan, id: ConnId, source: Option<IpAddr>) -> io::Result<Opened<Self>>;
    /// The socket, for epoll.
    fn fd(&self) -> BorrowedFd<'_>;
    /// Whether the handshake has completed (`Ok(false)`: not yet).
    fn connect_state(&self) -> io::Result<bool>;
    /// The load begins for this connection (closed loop: queue `depth` messages).
    fn start(&mut self, io: &mut Io<'_>, now: u64) -> Flow;
    /// Open loop: sends what is due; returns when the next send is due.
    fn send_due(&mut self, io: &mut Io<'_>, now: u64) -> (Flow, u64);
    /// The socket is writable.
    fn on_writable(&mut self, io: &mut Io<'_>, now: u64) -> Flow;
    /// The socket is readable (or hung up, or has an error).
    fn on_readable(&mut self, io: &mut Io<'_>, now: u64) -> Flow;
    /// Regular housekeeping (datagram loss).
    fn expire(&mut self, io: &mut Io<'_>, now: u64) -> Flow;
    /// Nothing in flight.
    fn is_idle(&self) -> bool;
    /// Messages queued so far (the open-loop schedule of the next connection in the slot).
    fn messages(&self) -> u64;
    /// Every one of `lifetime` messages has been sent and nothing is in flight.
    fn is_spent(&self, lifetime: u64) -> bool;
    /// The drain is over: count what is still owed.
    fn finish(&mut self, io: &mut Io<'_>);
}

/// What a connection needs from its thread while handling an event.
pub(super) struct Io<'a> {
    pub plan: &'a Plan,
    /// The load's timeline (meaningful once the load has started).
    pub timeline: Timeline,
    pub tally: Tally,
    pub read_buf: AlignedBuf,
    pub write_buf: AlignedBuf,
    /// Messages verified since the last publish to `plan.verified`.
    unpublished: u64,
}

impl Io<'_> {
    /// A message completed at `now`, `rtt_ns` after it was sent (or scheduled).
    pub fn complete(&mut self, now: u64, rtt_ns: u64) {
        self.tally.complete(&self.timeline, now, rtt_ns);
        self.unpublished += 1;
    }

    /// Whether a connection may send its message number `message` (from 0) at `now`.
    pub fn may_send(&self, now: u64, message: u64) -> bool {
        self.timeline.is_sending(now)
            && self
                .plan
                .config
                .conn_lifetime
                .is_none_or(|lifetime| message < lifetime)
    }

    fn publish(&mut self) {
        if self.unpublished > 0 {
            self.plan
                .verified
                .fetch_add(self.unpublished, Ordering::Relaxed);
            self.unpublished = 0;
        }
    }
}

enum State<C> {
    /// Not open: waiting in `to_open`, or done for good.
    Closed,
    Connecting(C),
    Open(C),
}

/// One connection slot.
struct Entry<C> {
    slot: u32,
    /// How many connections this slot has opened before the current one.
    generation: u32,
    state: State<C>,
    /// When the current connection's first `connect` was made (ns since `Plan::base`).
    since_ns: Option<u64>,
    /// Whether writable is in the registered interest.
    wants_write: bool,
    /// Removed from epoll while the load has not started (an early event is handled then).
    is_parked: bool,
    /// Open loop: the slot's schedule position of the current connection's first message.
    schedule_base: u64,
}

struct Worker<'a, C> {
    plan: &'a Plan,
    epoll: Epoll,
    entries: Vec<Entry<C>>,
    io: Io<'a>,
    /// Slots to open, by due time.
    to_open: BinaryHeap<Reverse<(u64, usize)>>,
    /// Connect deadlines in the order the connects were made (so in deadline order).
    deadlines: VecDeque<(u64, usize, u32)>,
    /// Slots queued or connecting.
    pending: usize,
    /// `--connect-rate`: this thread's time between two connects, and the next allowed.
    open_interval_ns: Option<u64>,
    next_open_ns: u64,
    next_source: usize,
    is_loading: bool,
}

/// Connects `slots` to the plan's endpoint, waits at the start gate, runs the load, and
/// returns this thread's counts.
pub(super) fn run_worker<C: Conn>(plan: &Plan, slots: &[u32]) -> io::Result<Tally> {
    let setup = Epoll::new().and_then(|epoll| Ok((epoll, Tally::new(plan)?)));
    let (epoll, tally) = match setup {
        Ok(setup) => setup,
        Err(e) => {
            // Arrive anyway, so the other threads are not held at the gate.
            let _ = plan.gate.arrive_and_wait();
            return Err(e);
        }
    };
    let config = &plan.config;
    let mut worker = Worker {
        plan,
        epoll,
        entries: slots
            .iter()
            .map(|&slot| Entry {
                slot,
                generation: 0,
                state: State::<C>::Closed,
                since_ns: None,
                wants_write: false,
                is_parked: false,
                schedule_base: 0,
            })
            .collect(),
        io: Io {
            plan,
            timeline: Timeline::default(),
            tally,
            read_buf: AlignedBuf::new(C::READ_BUF_BYTES),
            write_buf: AlignedBuf::new(C::WRITE_BUF_BYTES),
            unpublished: 0,
        },
        to_open: (0..slots.len()).map(|index| Reverse((0, index))).collect(),
        deadlines: VecDeque::new(),
        pending: slots.len(),
        open_interval_ns: config
            .connect_rate
            .map(|rate| (plan.threads as f64 * 1e9 / rate) as u64),
        next_open_ns: 0,
        next_source: slots.first().copied().unwrap_or(0) as usize,
        is_loading: false,
    };
    let mut events = Events::with_capacity(EVENTS_PER_WAIT);
    worker.connect_phase(&mut events)?;
    let Some(start) = plan.gate.arrive_and_wait() else {
        return Ok(worker.io.tally);
    };
    worker.load(plan.timeline(start), &mut events)?;
    Ok(worker.io.tally)
}

impl<C: Conn> Worker<'_, C> {
    /// Opens every slot and waits until each is established or has failed.
    fn connect_phase(&mut self, events: &mut Events) -> io::Result<()> {
        while self.pending > 0 {
            let now = self.plan.now_ns();
            self.open_due(now);
            self.expire_deadlines(now);
            if self.pending == 0 {
                break;
            }
            let timeout = self.next_connect_event(now).min(MAX_WAIT);
            self.epoll.wait_precise(events, Some(timeout))?;
            self.dispatch(events);
        }
        Ok(())
    }

    /// How long until the next connect is due or the next deadline passes.
    fn next_connect_event(&self, now: u64) -> Duration {
        let mut at = u64::MAX;
        if let Some(Reverse((due, _))) = self.to_open.peek() {
            at = (*due).max(self.next_open_ns);
        }
        if let Some((deadline, _, _)) = self.deadlines.front() {
            at = at.min(*deadline);
        }
        Duration::from_nanos(at.saturating_sub(now))
    }

    /// Makes the connects that are due (at most [`OPEN_BATCH`], and at the connect rate).
    fn open_due(&mut self, now: u64) {
        for _ in 0..OPEN_BATCH {
            let Some(&Reverse((due, index))) = self.to_open.peek() else {
                return;
            };
            if due > now || self.next_open_ns > now {
                return;
            }
            self.to_open.pop();
            if let Some(interval) = self.open_interval_ns {
                // A steady ramp: falling behind allows one connect to catch up, not a burst.
                self.next_open_ns = self.next_open_ns.max(now.saturating_sub(interval)) + interval;
            }
            self.open(index);
        }
    }

    fn open(&mut self, index: usize) {
        let plan = self.plan;
        // Each connect's own time: a batch of them takes a while.
        let now = plan.now_ns();
        let entry = &mut self.entries[index];
        let since = *entry.since_ns.get_or_insert(now);
        let id = ConnId {
            slot: entry.slot,
            content: plan.content_id(entry.slot, entry.generation),
            schedule_base: entry.schedule_base,
        };
        let sources = &plan.config.sources;
        let source = (!sources.is_empty()).then(|| sources[self.next_source % sources.len()]);
        self.next_source = self.next_source.wrapping_add(1);
        let timeout_ns = plan.config.connect_timeout.as_nanos() as u64;
        let opened = C::open(plan, id, source);
        if matches!(opened, Ok(Opened::Connecting(_) | Opened::Established(_))) {
            plan.open_now.fetch_add(1, Ordering::Relaxed);
        }
        match opened {
            Ok(Opened::Busy) if now.saturating_sub(since) < timeout_ns => {
                self.to_open.push(Reverse((now + RETRY_NS, index)));
            }
            Ok(Opened::Busy) => self.connect_failed(index, &timed_out()),
            Ok(Opened::Connecting(conn)) => {
                match self
                    .epoll
                    .add(conn.fd(), token(index), Interest::WRITABLE, Trigger::Level)
                {
                    Ok(()) => {
                        let generation = entry.generation;
                        entry.state = State::Connecting(conn);
                        self.deadlines
                            .push_back((since + timeout_ns, index, generation));
                    }
                    Err(e) => self.socket_failed(index, conn, &e),
                }
            }
            Ok(Opened::Established(conn)) => {
                match self
                    .epoll
                    .add(conn.fd(), token(index), Interest::READABLE, Trigger::Level)
                {
                    Ok(()) => self.established(index, conn, now),
                    Err(e) => self.socket_failed(index, conn, &e),
                }
            }
            Err(e) => self.connect_failed(index, &e),
        }
    }

    /// Connections whose deadline has passed: established if the handshake completed
    /// meanwhile, otherwise timed out.
    fn expire_deadlines(&mut self, now: u64) {
        while let Some(&(deadline, index, generation)) = self.deadlines.front() {
            if deadline > now {
                return;
            }
            self.deadlines.pop_front();
            let entry = &self.entries[index];
            if entry.generation == generation && matches!(entry.state, State::Connecting(_)) {
                self.finish_connect(index, now, true);
            }
        }
    }

    /// A connecting socket reported an event (or reached its deadline).
    fn finish_connect(&mut self, index: usize, now: u64, is_deadline: bool) {
        let State::Connecting(conn) =
            std::mem::replace(&mut self.entries[index].state, State::Closed)
        else {
            return;
        };
        match conn.connect_state() {
            Ok(true) => match (self.epoll).modify(
                conn.fd(),
                token(index),
                Interest::READABLE,
                Trigger::Level,
            ) {
                Ok(()) => self.established(index, conn, now),
                Err(e) => self.socket_failed(index, conn, &e),
            },
            Ok(false) if !is_deadline => self.entries[index].state = State::Connecting(conn),
            result => {
                let error = result.err().unwrap_or_else(timed_out);
                self.socket_failed(index, conn, &error);
            }
        }
    }

    /// A socket that was opened did not become a connection: close it, count the failure.
    fn socket_failed(&mut self, index: usize, conn: C, error: &io::Error) {
        let _ = self.epoll.delete(conn.fd());
        drop(conn);
        self.plan.open_now.fetch_sub(1, Ordering::Relaxed);
        self.connect_failed(index, error);
    }

    fn established(&mut self, index: usize, mut conn: C, now: u64) {
        self.pending -= 1;
        let plan = self.plan;
        let entry = &mut self.entries[index];
        let since = entry.since_ns.take().unwrap_or(now);
        entry.wants_write = false;
        entry.is_parked = false;
        let timeline = self.is_loading.then_some(&self.io.timeline);
        self.io.tally.connected(timeline, now, now - since);
        plan.established.fetch_add(1, Ordering::Relaxed);
        if self.is_loading {
            let flow = conn.start(&mut self.io, now);
            self.entries[index].state = State::Open(conn);
            self.apply(index, flow, now);
        } else {
            entry.state = State::Open(conn);
        }
    }

    fn connect_failed(&mut self, index: usize, error: &io::Error) {
        self.pending -= 1;
        let plan = self.plan;
        let entry = &mut self.entries[index];
        entry.state = State::Closed;
        entry.since_ns = None;
        let slot = entry.slot;
        let exhausted = self.io.tally.connect_errors.count(error);
        self.io.tally.errors.connect_failed += 1;
        plan.connect_failed.fetch_add(1, Ordering::Relaxed);
        let endpoint = &plan.endpoint;
        self.io.tally.note(format!(
            "connection {slot}: cannot connect to {endpoint}: {error}"
        ));
        if let Some(resource) = exhausted {
            self.stop_opening(resource, error);
        }
    }

    /// A resource ran out: the slots still waiting fail with the same cause, and no
    /// connection is opened again.
    fn stop_opening(&mut self, resource: Exhausted, error: &io::Error) {
        if self.io.tally.exhausted.is_none() {
            let open = self.plan.open_now.load(Ordering::Relaxed);
            self.io.tally.exhausted = Some((resource, open));
        }
        while let Some(Reverse((_, index))) = self.to_open.pop() {
            self.pending -= 1;
            self.entries[index].since_ns = None;
            self.io.tally.connect_errors.count(error);
            self.io.tally.errors.connect_failed += 1;
            self.plan.connect_failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Hands each event to its connection.
    fn dispatch(&mut self, events: &Events) {
        let now = self.plan.now_ns();
        for event in events.iter() {
            let index = index_of(event.token);
            let Some(entry) = self.entries.get_mut(index) else {
                continue;
            };
            match &mut entry.state {
                State::Closed => {}
                State::Connecting(_) => self.finish_connect(index, now, false),
                State::Open(conn) if !self.is_loading => {
                    // Bytes or a hang-up before the load: handled when it starts.
                    if self.epoll.delete(conn.fd()).is_ok() {
                        entry.is_parked = true;
                    }
                }
                State::Open(conn) => {
                    let mut flow = Flow::Open {
                        wants_write: entry.wants_write,
                    };
                    if event.writable && !event.is_write_closed {
                        flow = conn.on_writable(&mut self.io, now);
                    }
                    if flow != Flow::Closed && event.readable {
                        flow = conn.on_readable(&mut self.io, now);
                    }
                    self.apply(index, flow, now);
                }
            }
        }
    }

    /// Carries out what a connection asked for: interest changes, closing, and (at the
    /// end of its lifetime) a new connection in its slot.
    fn apply(&mut self, index: usize, flow: Flow, now: u64) {
        let entry = &mut self.entries[index];
        let State::Open(conn) = &entry.state else {
            return;
        };
        let wants_write = match flow {
            Flow::Closed => {
                self.close(index);
                return;
            }
            Flow::Open { wants_write } => wants_write,
        };
        if let Some(lifetime) = self.plan.config.conn_lifetime {
            if conn.is_spent(lifetime) {
                entry.schedule_base += conn.messages();
                self.close(index);
                self.reopen(index, now);
                return;
            }
        }
        if wants_write != entry.wants_write {
            let interest = if wants_write {
                Interest::BOTH
            } else {
                Interest::READABLE
            };
            if self
                .epoll
                .modify(conn.fd(), token(index), interest, Trigger::Level)
                .is_ok()
            {
                entry.wants_write = wants_write;
            }
        }
    }

    fn close(&mut self, index: usize) {
        match std::mem::replace(&mut self.entries[index].state, State::Closed) {
            State::Open(conn) => {
                let _ = self.epoll.delete(conn.fd());
                self.plan.open_now.fetch_sub(1, Ordering::Relaxed);
            }
            // Still connecting when the run ended: neither established nor failed.
            State::Connecting(conn) => {
                let _ = self.epoll.delete(conn.fd());
                self.plan.open_now.fetch_sub(1, Ordering::Relaxed);
            }
            State::Closed => {}
        }
    }

    /// Opens the next connection of a slot whose connection reached its lifetime.
    fn reopen(&mut self, index: usize, now: u64) {
        if !self.io.timeline.is_sending(now) || self.io.tally.exhausted.is_some() {
            return;
        }
        let entry = &mut self.entries[index];
        entry.generation = entry.generation.wrapping_add(1);
        entry.since_ns = None;
        self.pending += 1;
        self.to_open.push(Reverse((now, index)));
    }

    /// Runs the load on `timeline`: warmup, window and drain.
    fn load(&mut self, timeline: Timeline, events: &mut Events) -> io::Result<()> {
        self.io.timeline = timeline;
        self.is_loading = true;
        let now = self.plan.now_ns();
        for index in 0..self.entries.len() {
            let entry = &mut self.entries[index];
            let State::Open(conn) = &mut entry.state else {
                continue;
            };
            if entry.is_parked {
                entry.is_parked = false;
                if let Err(e) =
                    self.epoll
                        .add(conn.fd(), token(index), Interest::READABLE, Trigger::Level)
                {
                    self.io.tally.errors.reset += 1;
                    let slot = entry.slot;
                    self.io.tally.note(format!("connection {slot}: {e}"));
                    self.close(index);
                    continue;
                }
            }
            let flow = conn.start(&mut self.io, now);
            self.apply(index, flow, now);
        }
        let is_open_loop = self.plan.config.rate.is_some();
        // The first iteration checks for live connections.
        let mut last_publish = timeline.start.saturating_sub(PUBLISH_EVERY_NS);
        let mut last_expire = timeline.start;
        loop {
            let now = self.plan.now_ns();
            self.open_due(now);
            self.expire_deadlines(now);
            let mut next_due = u64::MAX;
            if is_open_loop && timeline.is_sending(now) {
                for index in 0..self.entries.len() {
                    if let State::Open(conn) = &mut self.entries[index].state {
                        let (flow, due) = conn.send_due(&mut self.io, now);
                        next_due = next_due.min(due);
                        self.apply(index, flow, now);
                    }
                }
            }
            if C::EXPIRES {
                if now - last_expire >= EXPIRE_EVERY_NS {
                    last_expire = now;
                    for index in 0..self.entries.len() {
                        if let State::Open(conn) = &mut self.entries[index].state {
                            let flow = conn.expire(&mut self.io, now);
                            self.apply(index, flow, now);
                        }
                    }
                }
                next_due = next_due.min(last_expire + EXPIRE_EVERY_NS);
            }
            if now - last_publish >= PUBLISH_EVERY_NS {
                self.io.publish();
                last_publish = now;
                // Every connection failed or closed: nothing is left to wait for.
                if self.pending == 0
                    && self
                        .entries
                        .iter()
                        .all(|e| matches!(e.state, State::Closed))
                {
                    break;
                }
            }
            if !timeline.is_sending(now) {
                let is_done = self.entries.iter().all(|e| match &e.state {
                    State::Open(conn) => conn.is_idle(),
                    _ => true,
                });
                if is_done || now >= timeline.drain_until {
                    break;
                }
            }
            let edge = [
                timeline.measure_from,
                timeline.measure_until,
                timeline.drain_until,
                next_due,
            ]
            .into_iter()
            .filter(|&t| t > now)
            .min()
            .unwrap_or(now);
            let timeout = Duration::from_nanos(edge - now)
                .min(self.next_connect_event(now))
                .min(MAX_WAIT);
            self.epoll.wait_precise(events, Some(timeout))?;
            self.dispatch(events);
        }
        self.io.publish();
        for index in 0..self.entries.len() {
            if let State::Open(conn) = &mut self.entries[index].state {
                conn.finish(&mut self.io);
            }
            self.close(index);
        }
        Ok(())
    }
}

/// The epoll token of connection slot `index` of a worker.
fn token(index: usize) -> Token {
    Token::reserved(index_u32(index))
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "connect timed out")
}
