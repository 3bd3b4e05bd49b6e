//! `IdleWheel`: `--idle-timeout` for thousands of connections without looking at each one
//! every tick.
//!
//! Time is cut into ticks of [`IDLE_TICK`]. Each connection sits in exactly one slot of a
//! circular wheel, the slot of the tick at which it may first be idle. A read only stamps
//! the connection's last-input tick (no wheel operation); when the slot comes round, the
//! owner re-checks each entry lazily: idle entries are closed, the others move to the slot
//! of their real deadline. So each connection is looked at about once per idle timeout.
//!
//! The wheel has at most [`MAX_SLOTS`] slots, whatever the timeout: a deadline further
//! ahead than one turn waits in the farthest slot and is put back, one turn on, when that
//! slot comes round (a hashed wheel's "rounds", kept lazily). A timeout of days costs the
//! same memory as one of minutes, and a connection is looked at once per turn at most.

use crate::slab::Token;
use std::time::{Duration, Instant};

/// Granularity of idle deadlines. A connection is closed between the timeout and the
/// timeout plus two ticks after its last input, inside the contract's one second.
pub const IDLE_TICK: Duration = Duration::from_millis(250);

/// The most slots a wheel has: 4,096 ticks of [`IDLE_TICK`] are about 17 minutes, so a
/// longer timeout re-checks each connection once every 17 minutes, and the empty wheel
/// takes 96 KiB (a slot is an empty `Vec`, 24 bytes).
pub const MAX_SLOTS: usize = 4096;

/// A wheel of connection tokens keyed by the tick at which they may be idle.
#[derive(Debug)]
pub struct IdleWheel {
    start: Instant,
    /// Ticks from a last input to the tick at which that connection is surely idle.
    idle_ticks: u32,
    /// The furthest tick ahead of the last expired one a token is put in: the timeout, or
    /// one turn of the wheel when the timeout is longer.
    horizon: u32,
    /// `slots[t % len]` holds the tokens due at tick `t`, for every `t` within one turn.
    slots: Vec<Vec<Token>>,
    /// Every tick up to this one has been expired.
    expired_tick: u32,
    len: usize,
}

impl IdleWheel {
    /// A wheel for `idle_timeout`, counting ticks from now.
    pub fn new(idle_timeout: Duration) -> Self {
        let tick_ms = IDLE_TICK.as_millis();
        let ticks = idle_timeout.as_millis().div_ceil(tick_ms);
        // One tick more: the last input may have come at the very end of its tick.
        let idle_ticks = u32::try_from(ticks + 1).unwrap_or(u32::MAX / 2);
        let horizon = idle_ticks.min(MAX_SLOTS as u32 - 2);
        IdleWheel {
            start: Instant::now(),
            idle_ticks,
            horizon,
            slots: (0..horizon as usize + 2).map(|_| Vec::new()).collect(),
            expired_tick: 0,
            len: 0,
        }
    }

    /// The tick `now` falls in.
    pub fn tick_at(&self, now: Instant) -> u32 {
        tick_between(self.start, now)
    }

    /// Watches `token`, whose last input came at `last_input` (no later than the last
    /// expiry).
    pub fn insert_at(&mut self, token: Token, last_input: Instant) {
        self.insert(token, self.tick_at(last_input));
    }

    /// Expires every tick up to `now`. For each token due, `last_input` says when its
    /// connection last had input (`None`: it is gone). Tokens idle for the timeout are
    /// pushed to `idle` and no longer watched; the others wait for their real deadline.
    pub fn expire_idle(
        &mut self,
        now: Instant,
        mut last_input: impl FnMut(Token) -> Option<Instant>,
        idle: &mut Vec<Token>,
    ) {
        let (start, idle_ticks) = (self.start, self.idle_ticks);
        let now_tick = tick_between(start, now);
        self.expire(now_tick, |token| {
            let last_input_tick = tick_between(start, last_input(token)?);
            if now_tick >= last_input_tick.saturating_add(idle_ticks) {
                idle.push(token);
                return None;
            }
            Some(last_input_tick)
        });
    }

    /// The tick at which a connection whose last input came during `last_input_tick` is idle.
    pub fn deadline(&self, last_input_tick: u32) -> u32 {
        last_input_tick.saturating_add(self.idle_ticks)
    }

    /// Watches `token`, whose last input came during `last_input_tick` (at most the last
    /// expired tick).
    pub fn insert(&mut self, token: Token, last_input_tick: u32) {
        // Deadlines stay within one turn ahead, so every slot holds a single tick's tokens;
        // one further ahead is looked at again when the farthest slot comes round.
        let deadline = self.deadline(last_input_tick).clamp(
            self.expired_tick.saturating_add(1),
            self.expired_tick.saturating_add(self.horizon),
        );
        let turn = self.slots.len();
        self.slots[deadline as usize % turn].push(token);
        self.len += 1;
    }

    /// Expires every tick up to `now_tick`. For each token due, `check` returns the
    /// connection's last-input tick to keep watching it, or `None` when it was closed (idle
    /// or already gone).
    pub fn expire(&mut self, now_tick: u32, mut check: impl FnMut(Token) -> Option<u32>) {
        let turn = self.slots.len();
        let first = self.expired_tick.saturating_add(1);
        // After a long stall, one pass over the whole wheel covers every tick.
        let first = first.max(now_tick.saturating_sub(turn as u32 - 1));
        self.expired_tick = now_tick;
        for tick in first..=now_tick {
            let due = std::mem::take(&mut self.slots[tick as usize % turn]);
            self.len -= due.len();
            for &token in &due {
                if let Some(last_input_tick) = check(token) {
                    self.insert(token, last_input_tick);
                }
            }
            // Keep the slot's allocation for its next turn if it is still empty.
            let slot = &mut self.slots[tick as usize % turn];
            if slot.is_empty() {
                *slot = due;
                slot.clear();
            }
        }
    }

    /// How long until the next tick, if anything is watched; `None` lets the loop sleep.
    pub fn time_to_next_tick(&self, now: Instant) -> Option<Duration> {
        if self.len == 0 {
            return None;
        }
        let next = self.start + IDLE_TICK * (self.tick_at(now) + 1);
        Some(next.saturating_duration_since(now))
    }
}

/// The tick `at` falls in, counting from `start`.
fn tick_between(start: Instant, at: Instant) -> u32 {
    let elapsed = at.saturating_duration_since(start);
    u32::try_from(elapsed.as_millis() / IDLE_TICK.as_millis()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_count_whole_ticks_from_the_start() {
        let wheel = IdleWheel::new(Duration::from_secs(1));
        let start = wheel.start;
        assert_eq!(wheel.tick_at(start), 0);
        assert_eq!(wheel.tick_at(start + IDLE_TICK / 2), 0);
        assert_eq!(wheel.tick_at(start + IDLE_TICK * 5 / 2), 2);
        assert_eq!(wheel.tick_at(start + IDLE_TICK * 7), 7);
    }

    #[test]
    fn the_loop_sleeps_until_the_next_tick_only_while_something_is_watched() {
        let mut wheel = IdleWheel::new(Duration::from_secs(1));
        let start = wheel.start;
        let mid_tick = start + IDLE_TICK * 5 / 2;
        assert_eq!(wheel.time_to_next_tick(mid_tick), None, "nothing watched");
        wheel.insert(Token::reserved(0), 0);
        assert_eq!(wheel.time_to_next_tick(mid_tick), Some(IDLE_TICK / 2));
        assert_eq!(wheel.time_to_next_tick(start), Some(IDLE_TICK));
        // Once its only connection is closed, nothing wakes the loop.
        wheel.expire(wheel.idle_ticks, |_| None);
        assert_eq!(wheel.time_to_next_tick(mid_tick), None, "all closed");
    }

    #[test]
    fn a_connection_is_idle_once_the_timeout_passed_since_its_last_input() {
        let timeout = Duration::from_secs(1);
        let mut wheel = IdleWheel::new(timeout);
        let start = wheel.start;
        let (a, b) = (Token::reserved(0), Token::reserved(1));
        wheel.insert_at(a, start);
        wheel.insert_at(b, start);
        // `b` had input half a second in; `a` none since it was watched.
        let b_input = start + Duration::from_millis(500);
        let last_input = |token: Token| Some(if token == a { start } else { b_input });
        let mut idle = Vec::new();
        let mut now = start;
        let mut closed = Vec::new();
        while now < start + timeout * 3 {
            now += IDLE_TICK;
            wheel.expire_idle(now, last_input, &mut idle);
            closed.extend(idle.drain(..).map(|token| (token, now - start)));
        }
        let (idle_ticks, b_tick) = (wheel.idle_ticks, wheel.tick_at(b_input));
        assert_eq!(
            closed,
            vec![
                (a, IDLE_TICK * idle_ticks),
                (b, IDLE_TICK * (b_tick + idle_ticks))
            ]
        );
        for (_, after) in &closed {
            assert!(*after >= timeout, "closed {after:?} after the last input");
        }
        assert_eq!(wheel.time_to_next_tick(now), None);
    }

    #[test]
    fn after_a_long_stall_each_slot_is_looked_at_once() {
        let mut wheel = IdleWheel::new(Duration::from_secs(1));
        let (idle_ticks, turn) = (wheel.idle_ticks, wheel.slots.len() as u32);
        let token = Token::reserved(0);
        wheel.insert(token, 0);
        // The loop slept through a thousand turns of the wheel and wakes in the tick of
        // the token's slot. The connection had input just now: it is put back in a slot
        // this pass has already looked at, and looked at again only at its deadline.
        let now = 1000 * turn + idle_ticks;
        let mut checks = 0;
        wheel.expire(now, |_| {
            checks += 1;
            Some(now - 1)
        });
        assert_eq!(checks, 1, "one check in one pass over the wheel");
        let mut rechecked = Vec::new();
        for tick in now + 1..=now + idle_ticks {
            wheel.expire(tick, |token| {
                rechecked.push((token, tick));
                None
            });
        }
        assert_eq!(
            rechecked,
            vec![(token, now - 1 + idle_ticks)],
            "at its deadline"
        );
    }

    #[test]
    fn closes_only_after_the_deadline_and_rechecks_lazily() {
        let mut wheel = IdleWheel::new(Duration::from_secs(1));
        let idle_ticks = wheel.idle_ticks;
        let mut last_input = [0u32, 0];
        let mut closed = Vec::new();
        let (a, b) = (Token::reserved(0), Token::reserved(1));
        wheel.insert(a, 0);
        wheel.insert(b, 0);
        last_input[1] = 3; // connection b sent something at tick 3
        let mut checks = 0;
        for now in 1..=(idle_ticks + 5) {
            wheel.expire(now, |token| {
                checks += 1;
                let last = last_input[token.reserved_index().expect("a test token")];
                if now >= last + idle_ticks {
                    closed.push((token, now));
                    None
                } else {
                    Some(last)
                }
            });
        }
        assert_eq!(closed, vec![(a, idle_ticks), (b, idle_ticks + 3)]);
        assert_eq!(
            checks, 3,
            "one early check for the busy connection, no scans"
        );
    }

    #[test]
    fn a_long_timeout_takes_one_turn_of_memory_and_still_closes_at_its_deadline() {
        // A billion seconds: one slot per tick would be 4 billion slots (96 GB).
        assert_eq!(
            IdleWheel::new(Duration::from_secs(1_000_000_000))
                .slots
                .len(),
            MAX_SLOTS
        );
        // Three turns' worth of ticks: the token comes round twice before it is idle.
        let mut wheel = IdleWheel::new(IDLE_TICK * (3 * MAX_SLOTS as u32));
        let idle_ticks = wheel.idle_ticks;
        assert_eq!(wheel.slots.len(), MAX_SLOTS);
        let token = Token::reserved(0);
        wheel.insert(token, 0);
        let (mut closed, mut checks) = (None, 0);
        for now in 1..=(idle_ticks + 2) {
            wheel.expire(now, |_| {
                checks += 1;
                if now >= idle_ticks {
                    closed = Some(now);
                    None
                } else {
                    Some(0)
                }
            });
        }
        assert_eq!(closed, Some(idle_ticks));
        assert_eq!(
            checks, 4,
            "once per turn of the wheel, then at the deadline"
        );
    }
}
