//! The reactor: epoll, and for each registered fd whether it is ready and who waits for it.
//!
//! Each fd is added to epoll once, edge-triggered, for both directions. The kernel then
//! reports each *change* to ready once; the reactor caches it in a flag, and the flag stays
//! set until a system call on the fd says `WouldBlock`. A future that finds the flag clear
//! stores its task's waker in the slot and returns `Pending`; the next edge sets the flag
//! and wakes that task. That keeps the per-operation cost at the one system call the
//! operation needs: no `epoll_ctl` to re-arm, no `epoll_wait` before a read that succeeds.

use crate::slab::{Slab, Token};
use crate::sys::epoll::{Epoll, Events, Trigger};
use std::cell::RefCell;
use std::io;
use std::os::fd::BorrowedFd;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

/// The epoll token of the executor's eventfd, which no slab key can equal.
const WAKE_TOKEN: Token = Token::reserved(0);
/// How many readiness events one `epoll_wait` can return.
const EVENTS_PER_WAIT: usize = 1024;

/// Which half of a socket a future waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Input is available, a connection can be accepted, or the peer closed.
    Read,
    /// The send buffer has room.
    Write,
}

/// One epoll instance and the state of everything registered with it.
pub(crate) struct Reactor {
    epoll: Epoll,
    events: RefCell<Events>,
    sources: RefCell<Slab<Source>>,
}

/// One registered fd: readiness and waiter for each direction (indexed by [`Direction`]).
type Source = [Interest; 2];

#[derive(Default)]
struct Interest {
    /// The last edge said ready, and no system call has said `WouldBlock` since.
    is_ready: bool,
    /// The task to wake at the next edge; one waiter per direction, as with asyncio's
    /// `add_reader`.
    waker: Option<Waker>,
    /// The peer closed or the socket failed: every later call returns at once (EOF or the
    /// error), so the flag stays set; there will be no further edge to set it again.
    is_final: bool,
    /// Urgent data was reported (`EPOLLPRI`) since a call last said `WouldBlock`: a TCP
    /// read stops at the urgent mark (tcp(7)), so a short read no longer proves the queue
    /// empty.
    has_urgent: bool,
}

impl Reactor {
    /// A reactor that also watches `wake_fd`, the eventfd other threads write to.
    pub(crate) fn new(wake_fd: BorrowedFd<'_>) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        // Level-triggered: the executor drains it after each wait that reports it.
        epoll.add(
            wake_fd,
            WAKE_TOKEN,
            crate::sys::Interest::READABLE,
            Trigger::Level,
        )?;
        Ok(Reactor {
            epoll,
            events: RefCell::new(Events::with_capacity(EVENTS_PER_WAIT)),
            sources: RefCell::default(),
        })
    }

    /// Adds `fd` to epoll for both directions; returns its key (its epoll token).
    pub(crate) fn register(&self, fd: BorrowedFd<'_>) -> io::Result<Token> {
        let mut sources = self.sources.borrow_mut();
        // Optimistic: try the system call first, and wait only once it says WouldBlock.
        let ready = || Interest {
            is_ready: true,
            ..Interest::default()
        };
        let key = sources.insert([ready(), ready()]);
        let both = crate::sys::Interest::BOTH;
        if let Err(e) = self.epoll.add(fd, key, both, Trigger::Edge) {
            sources.remove(key);
            return Err(e);
        }
        Ok(key)
    }

    /// Removes `fd` from epoll before it closes (a dup elsewhere would otherwise keep the
    /// registration alive) and frees its slot; late events for `key` are then ignored.
    pub(crate) fn deregister(&self, key: Token, fd: BorrowedFd<'_>) {
        if let Err(e) = self.epoll.delete(fd) {
            tracing::debug!("epoll_ctl(DEL) failed for a closing socket: {e}");
        }
        let source = self.sources.borrow_mut().remove(key);
        drop(source);
    }

    /// `Ready` if `direction` is ready; otherwise remembers `cx`'s waker for the next edge.
    pub(crate) fn poll_ready(
        &self,
        key: Token,
        direction: Direction,
        cx: &Context<'_>,
    ) -> Poll<()> {
        let mut sources = self.sources.borrow_mut();
        let Some(source) = sources.get_mut(key) else {
            return Poll::Ready(());
        };
        let interest = &mut source[direction as usize];
        if interest.is_ready {
            return Poll::Ready(());
        }
        super::store_waker(&mut interest.waker, cx);
        Poll::Pending
    }

    /// A system call said `WouldBlock` (or proved the kernel has nothing more): wait for
    /// the next edge before trying again.
    ///
    /// No edge can slip in between: events are only read in [`Reactor::wait`], on this
    /// same thread, never while a task is being polled.
    pub(crate) fn clear_ready(&self, key: Token, direction: Direction) {
        if let Some(source) = self.sources.borrow_mut().get_mut(key) {
            let interest = &mut source[direction as usize];
            interest.is_ready = interest.is_final;
            interest.has_urgent = false;
        }
    }

    /// A read took less than it asked for: as [`Reactor::clear_ready`] for reading, unless
    /// urgent data was reported, where the read may have stopped at its mark.
    pub(crate) fn clear_after_short_read(&self, key: Token) {
        if let Some(source) = self.sources.borrow_mut().get_mut(key) {
            let interest = &mut source[Direction::Read as usize];
            if !interest.has_urgent {
                interest.is_ready = interest.is_final;
            }
        }
    }

    /// Sleeps in `epoll_wait` until an fd changes or `timeout` passes, then marks what
    /// became ready and wakes its waiters. Returns whether the eventfd was among them.
    ///
    /// `awake` runs as soon as `epoll_wait` returns, before any waker: the executor marks
    /// itself awake there, so the wakes below need no eventfd write.
    pub(crate) fn wait(&self, timeout: Option<Duration>, awake: impl FnOnce()) -> io::Result<bool> {
        let mut events = self.events.borrow_mut();
        let waited = self.epoll.wait(&mut events, timeout);
        awake();
        waited?;
        let mut is_woken = false;
        let mut sources = self.sources.borrow_mut();
        for event in events.iter() {
            if event.token == WAKE_TOKEN {
                is_woken = true;
                continue;
            }
            // A stale token (the fd was deregistered, its slot maybe reused) finds nothing.
            let Some(source) = sources.get_mut(event.token) else {
                continue;
            };
            // An error or hang-up must wake both sides: the next system call reports it.
            // A FIN that came with the last bytes has no edge of its own, so "closed" is
            // remembered apart from "ready" (a short read must not hide the EOF after it).
            let [read, write] = source;
            read.is_final |= event.is_read_closed;
            read.has_urgent |= event.has_urgent;
            write.is_final |= event.is_write_closed;
            if event.readable {
                wake(read);
            }
            if event.writable {
                wake(write);
            }
        }
        Ok(is_woken)
    }

    /// How many fds are registered (for tests of deregistration).
    #[cfg(test)]
    pub(crate) fn registrations(&self) -> usize {
        self.sources.borrow().len()
    }
}

fn wake(interest: &mut Interest) {
    interest.is_ready = true;
    if let Some(waker) = interest.waker.take() {
        // Waking only queues the task; nothing runs inside this call.
        waker.wake();
    }
}
