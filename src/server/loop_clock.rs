//! `LoopClock`: the timers of an event loop that owns many connections, in one place: the
//! accept pause after running out of descriptors, `--idle-timeout` on the coarse wheel of
//! the scalable models ([`IdleWheel`]), and the drain deadline after shutdown fired.
//!
//! The loop reads the clock once per batch of events ([`LoopClock::tick`]), asks how long
//! it may sleep ([`LoopClock::timeout`]), and after each wait takes what came due: the
//! listeners to accept on again, the connections idle for too long, the drain cut.

use super::ACCEPT_PAUSE;
use super::idle_wheel::IdleWheel;
use crate::slab::Token;
use std::time::{Duration, Instant};

/// The timers of one event loop.
#[derive(Debug)]
pub struct LoopClock {
    /// When the last wait returned: one clock read per batch of events.
    now: Instant,
    /// Listeners that ran out of descriptors, and when they accept again.
    paused: Vec<(Instant, Token)>,
    /// Connections by the tick at which they may be idle; `None` without `--idle-timeout`.
    idle: Option<IdleWheel>,
    /// Set when shutdown fired: stop accepting, send what is owed until then.
    drain_deadline: Option<Instant>,
}

impl LoopClock {
    /// A clock for connections closed after `idle_timeout` without input, if any.
    pub fn new(idle_timeout: Option<Duration>) -> Self {
        LoopClock {
            now: Instant::now(),
            paused: Vec::new(),
            idle: idle_timeout.map(IdleWheel::new),
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
        let idle = wheel.and_then(|wheel| wheel.time_to_next_tick(now));
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
        if let Some(wheel) = self.idle.as_mut() {
            wheel.insert_at(token, self.now);
        }
    }

    /// Pushes to `idle` the connections that sent nothing for `--idle-timeout`;
    /// `last_input` says when one last had input (`None`: it is gone). See
    /// [`IdleWheel::expire_idle`].
    pub fn expire_idle(
        &mut self,
        last_input: impl FnMut(Token) -> Option<Instant>,
        idle: &mut Vec<Token>,
    ) {
        if let Some(wheel) = self.idle.as_mut() {
            wheel.expire_idle(self.now, last_input, idle);
        }
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
    use crate::slab::Slab;

    #[test]
    fn a_paused_listener_resumes_after_the_pause() {
        let mut tokens = Slab::default();
        let listener = tokens.insert(());
        let mut clock = LoopClock::new(None);
        clock.pause(listener);
        assert!(clock.is_paused(listener));
        assert_eq!(clock.resume_next(), None);
        assert!(clock.timeout().is_some_and(|t| t <= ACCEPT_PAUSE));
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
