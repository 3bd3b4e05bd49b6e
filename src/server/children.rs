//! The children of a process-per-connection server (`forking`): what each serves, reaping
//! them as they end, and waiting for them at shutdown, killing one that is stuck.
//!
//! A thread that ends needs nobody; a process that ends stays a zombie, holding its place
//! under `--max-conns`, until its parent reaps it. This is the parent's side of that.

use super::lifecycle::{CloseReason, LoopLog};
use super::{Admission, linger};
use crate::metrics::{Metrics, Transport};
use crate::net::Peer;
use crate::sys::process::{self, ChildEnd, Pid};
use std::collections::HashMap;
use std::io;
use std::thread;
use std::time::{Duration, Instant};

/// How long a child may outlive its drain and lingering bounds before it is killed, and
/// then how long it gets to die after SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_secs(1);
/// How often [`Children::wait_for_drain`] reaps while children are still draining.
const DRAIN_REAP_INTERVAL: Duration = Duration::from_millis(10);

/// The children not reaped yet. A connection's child holds the connection's place under
/// `--max-conns`, its peer and its transport, so that the parent can record the close of a
/// connection whose child was killed before it could.
#[derive(Debug, Default)]
pub struct Children {
    running: HashMap<Pid, Option<(Admission, Peer, Transport)>>,
}

impl Children {
    /// Child `pid` serves the connection from `peer` over `transport`, admitted with
    /// `place`.
    pub fn serving_connection(
        &mut self,
        pid: Pid,
        place: Admission,
        peer: Peer,
        transport: Transport,
    ) {
        self.running.insert(pid, Some((place, peer, transport)));
    }

    /// Child `pid` answers one datagram.
    pub fn serving_datagram(&mut self, pid: Pid) {
        self.running.insert(pid, None);
    }

    /// Reaps every child that ended, freeing its place under `--max-conns` and its counter
    /// slots in `metrics` (its counts are kept): a child killed before it could hand its
    /// slot back would otherwise hold it for ever. A connection whose child a signal
    /// killed is counted closed in `log` (reason `error`), since its child never got to.
    ///
    /// # Errors
    ///
    /// The OS error of `waitpid`, other than having no child.
    pub fn reap(&mut self, metrics: Metrics, log: &LoopLog) -> io::Result<()> {
        while let Some((pid, end)) = process::reap_child()? {
            let child = self.running.remove(&pid);
            metrics.retire_process(pid);
            if let (Some(Some((_, peer, transport))), ChildEnd::Killed(signal)) = (child, end) {
                let killed = format!("its child {pid} was killed by signal {signal}");
                let reason = CloseReason::Failed(io::Error::other(killed));
                log.closed(&peer, transport, &reason);
            }
        }
        Ok(())
    }

    /// Children heard the shutdown through the shared eventfd and drain on their own: each
    /// cuts its connection at its own drain deadline (counted `drain_cut` there, with what
    /// it still owed) and lingers at most `linger::exit_bound` after it. Waits for them; a
    /// child still running [`KILL_GRACE`] past both bounds is stuck, and is killed.
    ///
    /// # Errors
    ///
    /// As [`Children::reap`].
    pub fn wait_for_drain(
        &mut self,
        drain_timeout: Duration,
        metrics: Metrics,
        log: &LoopLog,
    ) -> io::Result<()> {
        // Killed at our own drain deadline, a child would often die just before its own
        // (it heard the shutdown a moment later) and its connection would count as `error`.
        let kill_at =
            Instant::now() + drain_timeout + linger::exit_bound(drain_timeout) + KILL_GRACE;
        let mut killed_at: Option<Instant> = None;
        loop {
            self.reap(metrics, log)?;
            if self.running.is_empty() {
                return Ok(());
            }
            let now = Instant::now();
            if killed_at.is_none() && now >= kill_at {
                tracing::warn!("killing {} children still draining", self.running.len());
                for &pid in self.running.keys() {
                    let _ = process::kill(pid, process::SIGKILL);
                }
                killed_at = Some(now);
            }
            if killed_at.is_some_and(|at| now >= at + KILL_GRACE) {
                tracing::error!("{} children did not exit after SIGKILL", self.running.len());
                return Ok(());
            }
            thread::sleep(DRAIN_REAP_INTERVAL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A child answering a datagram is among those [`Children::wait_for_drain`] waits for,
    /// as a connection's child is, with no place, peer or transport to record. The
    /// binary's `forking` tests show the wait for a connection's child; a datagram's
    /// child lives for microseconds, too short to hold alive from outside.
    #[test]
    fn a_datagram_child_is_waited_for_like_a_connection_child() {
        // Above any pid the kernel hands out (pid_max is at most 2^22); nothing signals it.
        const CHILD: Pid = 1 << 23;
        let mut children = Children::default();
        children.serving_datagram(CHILD);
        assert_eq!(
            children.running.len(),
            1,
            "the datagram's child is not waited for"
        );
        assert!(
            children.running.get(&CHILD).is_some_and(Option::is_none),
            "a datagram's child holds no connection's place"
        );
    }
}
