//! `StopSignal`: tells every connection task of a loop that shutdown began, at the cost of
//! one atomic load per poll while it has not.
//!
//! A task waits for input and for this signal at once, so it polls the signal each time it
//! parks: once per message. `tokio::sync::watch` (or `Notify`) takes a mutex on every such
//! poll; a [`StopWait`] takes it only when its task's waker changes.

use crate::slab::{Slab, Token};
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};

/// Fired once; wakes every task waiting on it.
#[derive(Debug, Default)]
pub struct StopSignal {
    is_fired: AtomicBool,
    wakers: Mutex<Slab<Waker>>,
}

impl StopSignal {
    /// Fires the signal and wakes every waiting task.
    pub fn fire(&self) {
        self.is_fired.store(true, Ordering::SeqCst);
        let wakers = self.wakers.lock().unwrap_or_else(|e| e.into_inner());
        for token in wakers.tokens() {
            if let Some(waker) = wakers.get(token) {
                waker.wake_by_ref();
            }
        }
    }

    /// Whether [`StopSignal::fire`] was called.
    pub fn is_fired(&self) -> bool {
        self.is_fired.load(Ordering::SeqCst)
    }

    /// A future that completes once the signal fires; poll it again after each wake-up.
    pub fn wait(&self) -> StopWait<'_> {
        StopWait {
            signal: self,
            registered: None,
        }
    }
}

/// Waits for a [`StopSignal`]; reusable across polls, registered until dropped.
#[derive(Debug)]
pub struct StopWait<'a> {
    signal: &'a StopSignal,
    registered: Option<(Token, Waker)>,
}

impl Future for StopWait<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.signal.is_fired() {
            return Poll::Ready(());
        }
        let is_current = matches!(&self.registered, Some((_, w)) if w.will_wake(cx.waker()));
        if !is_current {
            let signal = self.signal;
            let mut wakers = signal.wakers.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((token, _)) = self.registered.take() {
                wakers.remove(token);
            }
            let token = wakers.insert(cx.waker().clone());
            self.registered = Some((token, cx.waker().clone()));
        }
        // `fire` stores the flag before it takes the lock, so a fire that raced with the
        // registration above either sees our waker or is seen here.
        if self.signal.is_fired() {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

impl Drop for StopWait<'_> {
    fn drop(&mut self) {
        if let Some((token, _)) = self.registered.take() {
            let mut wakers = self.signal.wakers.lock().unwrap_or_else(|e| e.into_inner());
            wakers.remove(token);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn fire_wakes_a_parked_waiter_and_later_waits_finish_at_once() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        runtime.block_on(async {
            let signal = Arc::new(StopSignal::default());
            let waiter = tokio::spawn({
                let signal = signal.clone();
                async move { signal.wait().await }
            });
            tokio::task::yield_now().await;
            assert!(!waiter.is_finished(), "nothing fired yet");
            signal.fire();
            tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
                .await
                .expect("the waiter woke")
                .expect("the waiter did not panic");
            signal.wait().await;
            assert!(signal.wakers.lock().expect("no poison").is_empty());
        });
    }
}
