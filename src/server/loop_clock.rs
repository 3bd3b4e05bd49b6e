//! `LoopClock`: the timers of an event loop that owns many connections, in one place: the
//! accept pause after running out of descriptors, `--idle-timeout` on the coarse wheel of
//! the scalable models ([`IdleWheel`]), and the drain deadline after shutdown fired.
//!
//! The loop reads the clock once per batch of events ([`LoopClock::tick`]), asks how long
//! it may sleep ([`LoopClock::timeout`]), and after each wait takes what came due: the
//! listeners to accept on again ([`LoopClock::resume_next`]), and the connections to close
//! ([`LoopClock::expired`]): those idle for too long, or all of them at the drain cut.

use super::idle_wheel::IdleWheel;
use super::{ACCEPT_PAUSE, CloseReason, Connection};
use crate::slab::{Slab, Token};
use std::time::{Duration, Instant};

/// A slab entry whose connection [`LoopClock::expired`] may close: the connection and when
/// it last made progress (input came, or the kernel took replies), or `None` for a source
/// of another kind.
pub trait Expiring {
    /// The connection and when it last made progress.
    fn expiring(&mut self) -> Option<(&Connection, &mut Instant)>;
}

/// The timers of one event loop.
#[derive(Debug)]
pub struct LoopClock {
    /// When the last wait returned: one clock read per batch of events.
    now: Instant,
    /// Listeners that ran out of descriptors, and when they accept again.
    paused: Vec<(Instant, Token)>,
    /// Connections by the tick at which they may be idle, and `--idle-timeout`; `None`
    /// without it.
    idle: Option<(IdleWheel, Duration)>,
    /// Set when shutdown fired: stop accepting, send what is owed until then.
    drain_deadline: Option<Instant>,
}

impl LoopClock {
    /// A clock for connections closed after `idle_timeout` without input, if any.
    pub fn new(idle_timeout: Option<Duration>) -> Self {
        LoopClock {
            now: Instant::now(),
            paused: Vec::new(),
            idle: idle_timeout.map(|timeout| (IdleWheel::new(timeout), timeout)),
            drain_deadline: None,
        }
    }

    /// Reads the clock: call once after every wait.
    pub fn tick(&mut self) {
        self.now = Instant::now();
    }

    /// The time of the last [`LoopClock::tick`].
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Whether any timer runs (an accept pause, the idle wheel, the drain): a loop with
    /// none need not read the clock at all.
    pub fn is_timing(&self) -> bool {
        self.idle.is_some() || !self.paused.is_empty() || self.drain_deadline.is_some()
    }

    /// How long the loop may sleep from the last [`LoopClock::tick`]: until an accept
    /// pause ends, the next idle tick, or the drain deadline; `None` when no timer runs.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout_from(self.now)
    }

    /// As [`LoopClock::timeout`], counted from `now`.
    pub fn timeout_from(&self, now: Instant) -> Option<Duration> {
        let pauses = self.paused.iter().map(|(until, _)| *until);
        let at = pauses.chain(self.drain_deadline).min();
        let until = at.map(|at| at.saturating_duration_since(now));
        let wheel = self.idle.as_ref();
        let idle = wheel.and_then(|(wheel, _)| wheel.time_to_next_tick(now));
        until.into_iter().chain(idle).min()
    }

    /// Stops accepting on `listener` for [`ACCEPT_PAUSE`].
    pub fn pause(&mut self, listener: Token) {
        self.paused.push((self.now + ACCEPT_PAUSE, listener));
    }

    /// Whether `listener` waits for its accept pause to end.
    pub fn is_paused(&self, listener: Token) -> bool {
        self.paused.iter().any(|(_, paused)| *paused == listener)
    }

    /// Whether any listener waits for its accept pause to end.
    pub fn is_pausing(&self) -> bool {
        !self.paused.is_empty()
    }

    /// A listener whose accept pause has ended, to accept on again; `None` once none is
    /// left.
    pub fn resume_next(&mut self) -> Option<Token> {
        let now = self.now;
        let at = self.paused.iter().position(|(until, _)| now >= *until)?;
        Some(self.paused.swap_remove(at).1)
    }

    /// Watches a new connection for `--idle-timeout`, as if its input came now.
    pub fn watch(&mut self, token: Token) {
        if let Some((wheel, _)) = self.idle.as_mut() {
            wheel.insert_at(token, self.now);
        }
    }

    /// The connections of `entries` to close now, each with why: once the drain deadline
    /// has passed, every one, cut with what it still owes; before that, those that made no
    /// progress for `--idle-timeout`: no byte read from the peer and no byte of its replies
    /// taken by the kernel (the model records either in the entry's last-progress time).
    /// Replies owed to a peer that takes none of them do not make it less idle: it would
    /// hold its place and its buffer for ever.
    pub fn expired<E: Expiring>(&mut self, entries: &mut Slab<E>) -> Vec<(Token, CloseReason)> {
        let mut due = Vec::new();
        if self.is_past_drain() {
            for token in entries.tokens() {
                if let Some((cut, _)) = entries.get_mut(token).and_then(E::expiring) {
                    due.push((token, CloseReason::DrainTimeout { owed: cut.owed() }));
                }
            }
        } else if let Some((wheel, timeout)) = self.idle.as_mut() {
            let (now, mut idle) = (self.now, Vec::new());
            let last_progress = |token| Some(*entries.get_mut(token)?.expiring()?.1);
            wheel.expire_idle(now, last_progress, &mut idle);
            let idle = idle
                .into_iter()
                .map(|token| (token, CloseReason::Idle(*timeout)));
            due.extend(idle);
        }
        due
    }

    /// Shutdown fired: the drain ends `drain_timeout` from now. Returns false if it had
    /// already begun.
    pub fn start_drain(&mut self, drain_timeout: Duration) -> bool {
        let is_new = self.drain_deadline.is_none();
        self.drain_deadline = self.drain_deadline.or(Some(self.now + drain_timeout));
        is_new
    }

    /// When the drain ends, once shutdown fired.
    pub fn drain_deadline(&self) -> Option<Instant> {
        self.drain_deadline
    }

    /// Whether the drain deadline has passed: what is still owed is cut.
    pub fn is_past_drain(&self) -> bool {
        self.drain_deadline.is_some_and(|at| self.now >= at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::Peer;
    use crate::protocol::{Protocol, ProtocolKind};
    use crate::server::Limits;
    use crate::server::idle_wheel::IDLE_TICK;
    use crate::slab::Slab;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    /// A loop's slab entry: a connection, or a source of another kind (a listener).
    struct Entry {
        connection: Option<Connection>,
        last_progress: Instant,
    }

    impl Expiring for Entry {
        fn expiring(&mut self) -> Option<(&Connection, &mut Instant)> {
            let connection = self.connection.as_ref()?;
            Some((connection, &mut self.last_progress))
        }
    }

    /// A listener's entry and a connection's that owes `greeting`, last active at `now`.
    fn listener_and_connection(greeting: &[u8], now: Instant) -> (Slab<Entry>, Token, Token) {
        let protocol = Protocol::new(ProtocolKind::Echo, 1024).with_greeting(greeting);
        let (socket, _) = UnixStream::pair().expect("a socket pair");
        let peer = Peer::Ip("127.0.0.1:9".parse().expect("an address"));
        let connection = Connection::new(&protocol, peer, &Limits::default(), socket.as_fd());
        let mut entries = Slab::default();
        let listener = entries.insert(Entry {
            connection: None,
            last_progress: now,
        });
        let connection = entries.insert(Entry {
            connection: Some(connection),
            last_progress: now,
        });
        (entries, listener, connection)
    }

    #[test]
    fn a_tick_reads_the_clock() {
        let mut clock = LoopClock::new(None);
        let before = clock.now();
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(clock.now(), before, "only a tick reads the clock");
        clock.tick();
        assert!(clock.now() > before);
    }

    #[test]
    fn a_loop_times_only_while_a_timer_runs() {
        let mut tokens = Slab::default();
        let listener = tokens.insert(());
        assert!(!LoopClock::new(None).is_timing(), "no timer");
        assert!(
            LoopClock::new(Some(Duration::from_secs(1))).is_timing(),
            "idle"
        );
        let mut clock = LoopClock::new(None);
        assert!(!clock.is_pausing());
        clock.pause(listener);
        assert!(clock.is_pausing());
        assert!(clock.is_timing(), "an accept pause");
        let mut clock = LoopClock::new(None);
        clock.start_drain(Duration::from_secs(1));
        assert!(clock.is_timing(), "the drain");
    }

    #[test]
    fn a_connection_without_progress_for_the_idle_timeout_expires() {
        let timeout = Duration::from_secs(1);
        let mut clock = LoopClock::new(Some(timeout));
        let (mut entries, _, connection) = listener_and_connection(b"", clock.now());
        clock.watch(connection);
        clock.now += timeout / 2;
        assert!(clock.expired(&mut entries).is_empty(), "not idle yet");
        // Closed within two ticks after the timeout.
        clock.now += timeout / 2 + IDLE_TICK * 2;
        let expired = clock.expired(&mut entries);
        assert!(
            matches!(expired[..], [(token, CloseReason::Idle(t))] if token == connection && t == timeout),
            "{expired:?}"
        );
    }

    #[test]
    fn past_the_drain_deadline_every_connection_is_cut_with_what_it_owes() {
        let mut clock = LoopClock::new(Some(Duration::from_secs(60)));
        let (mut entries, _, connection) = listener_and_connection(b"hello\n", clock.now());
        let drain_timeout = Duration::from_secs(5);
        assert_eq!(clock.drain_deadline(), None);
        assert!(clock.start_drain(drain_timeout));
        assert_eq!(clock.drain_deadline(), Some(clock.now() + drain_timeout));
        clock.now += drain_timeout / 2;
        assert!(
            clock.expired(&mut entries).is_empty(),
            "before the deadline"
        );
        clock.now += drain_timeout / 2;
        let expired = clock.expired(&mut entries);
        assert!(
            matches!(expired[..], [(token, CloseReason::DrainTimeout { owed: 6 })] if token == connection),
            "{expired:?}"
        );
    }

    #[test]
    fn a_paused_listener_resumes_after_the_pause() {
        let mut tokens = Slab::default();
        let listener = tokens.insert(());
        let mut clock = LoopClock::new(None);
        clock.pause(listener);
        assert!(clock.is_paused(listener));
        assert_eq!(clock.resume_next(), None);
        assert!(
            clock
                .timeout()
                .is_some_and(|t| t <= ACCEPT_PAUSE && !t.is_zero())
        );
        clock.now += ACCEPT_PAUSE;
        assert_eq!(clock.resume_next(), Some(listener));
        assert!(!clock.is_paused(listener));
        assert_eq!(clock.timeout(), None);
    }

    #[test]
    fn the_drain_deadline_is_set_once() {
        let mut clock = LoopClock::new(None);
        assert!(clock.start_drain(Duration::from_secs(5)));
        let deadline = clock.drain_deadline();
        clock.now += Duration::from_secs(1);
        assert!(!clock.start_drain(Duration::from_secs(5)));
        assert_eq!(clock.drain_deadline(), deadline);
        assert!(!clock.is_past_drain());
        clock.now += Duration::from_secs(4);
        assert!(clock.is_past_drain());
    }
}
