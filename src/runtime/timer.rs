//! Timers: deadlines in a binary heap, checked each time the loop wakes up.
//!
//! The loop sleeps in `epoll_wait` no longer than until the earliest deadline, then fires
//! every timer that is due by waking its task. A [`Timer`] can be moved to a new deadline
//! without touching the heap when the deadline moves later (an idle timeout pushed back
//! by every read): the old heap entry fires, finds the deadline moved, and re-queues
//! itself once. So a busy connection costs no heap operation per read.

use super::executor::{Core, current};
use crate::slab::{Slab, Token};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// Every timer of one runtime.
#[derive(Default)]
pub(crate) struct Timers {
    slots: Slab<TimerSlot>,
    /// `(when, key)`, earliest first; an entry whose slot moved on is skipped when popped.
    heap: BinaryHeap<Reverse<(Instant, Token)>>,
}

struct TimerSlot {
    deadline: Instant,
    /// The heap entry that speaks for this slot; `None`: no entry.
    queued_at: Option<Instant>,
    has_fired: bool,
    waker: Option<Waker>,
}

impl Timers {
    /// How long the loop may sleep before the earliest deadline (`None`: forever).
    pub(crate) fn next_timeout(&self, now: Instant) -> Option<Duration> {
        self.heap
            .peek()
            .map(|Reverse((when, _))| when.saturating_duration_since(now))
    }

    /// Fires every timer due at `now`.
    pub(crate) fn fire(&mut self, now: Instant) {
        while let Some(&Reverse((when, key))) = self.heap.peek() {
            if when > now {
                return;
            }
            self.heap.pop();
            let Some(slot) = self.slots.get_mut(key) else {
                continue;
            };
            if slot.queued_at != Some(when) {
                continue;
            }
            slot.queued_at = None;
            if slot.deadline <= now {
                slot.has_fired = true;
                if let Some(waker) = slot.waker.take() {
                    waker.wake();
                }
            } else {
                // The deadline moved later since this entry was queued.
                slot.queued_at = Some(slot.deadline);
                self.heap.push(Reverse((slot.deadline, key)));
            }
        }
    }

    fn reset(&mut self, key: Token, deadline: Instant) {
        let Some(slot) = self.slots.get_mut(key) else {
            return;
        };
        slot.deadline = deadline;
        slot.has_fired = false;
        // Only an earlier deadline needs a new entry; a later one is found by the old.
        if slot.queued_at.is_none_or(|queued| deadline < queued) {
            slot.queued_at = Some(deadline);
            self.heap.push(Reverse((deadline, key)));
        }
    }
}

/// A deadline that wakes the task awaiting it; reusable through [`Timer::reset`].
///
/// Must be created and used inside a runtime's `block_on`.
pub struct Timer {
    key: Token,
    core: Rc<Core>,
}

impl Timer {
    /// A timer that expires at `deadline`.
    ///
    /// # Panics
    ///
    /// Outside a runtime's `block_on`: there is no loop to fire it.
    pub fn at(deadline: Instant) -> Timer {
        let core = current().expect("a Timer needs a runtime: create it inside block_on");
        let key = core.timers.borrow_mut().slots.insert(TimerSlot {
            deadline,
            queued_at: None,
            has_fired: false,
            waker: None,
        });
        let mut timer = Timer { key, core };
        timer.reset(deadline);
        timer
    }

    /// Moves the deadline; a fired timer is armed again.
    pub fn reset(&mut self, deadline: Instant) {
        self.core.timers.borrow_mut().reset(self.key, deadline);
    }

    /// `Ready` once the deadline has passed; otherwise the task is woken when it does.
    pub fn poll_expired(&mut self, cx: &Context<'_>) -> Poll<()> {
        let mut timers = self.core.timers.borrow_mut();
        let Some(slot) = timers.slots.get_mut(self.key) else {
            return Poll::Ready(());
        };
        if slot.has_fired {
            return Poll::Ready(());
        }
        super::store_waker(&mut slot.waker, cx);
        Poll::Pending
    }
}

impl Future for Timer {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.get_mut().poll_expired(cx)
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        // Its heap entry stays and is skipped when it comes due.
        let slot = self.core.timers.borrow_mut().slots.remove(self.key);
        drop(slot);
    }
}

/// The loop's current time: read once per wake-up, so it is cheap and at most one turn
/// of the loop old (outside a runtime: the clock).
pub fn now() -> Instant {
    current().map_or_else(Instant::now, |core| core.now.get())
}

/// A timer that expires `duration` from [`now`].
pub fn sleep(duration: Duration) -> Timer {
    Timer::at(now() + duration)
}

/// `future` ran out of time (see [`timeout`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

/// Runs `future` for at most `duration`; dropping it on time-out cancels it.
///
/// # Errors
///
/// [`Elapsed`] when `duration` passed first.
pub async fn timeout<F: Future>(duration: Duration, future: F) -> Result<F::Output, Elapsed> {
    let mut timer = sleep(duration);
    let mut future = pin!(future);
    poll_fn(|cx| {
        if let Poll::Ready(output) = future.as_mut().poll(cx) {
            return Poll::Ready(Ok(output));
        }
        timer.poll_expired(cx).map(|()| Err(Elapsed))
    })
    .await
}
