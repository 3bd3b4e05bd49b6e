//! Bindings to epoll (Linux): an interest list in the kernel, and a wait that returns only
//! the descriptors that are ready.
//!
//! Each registration carries a [`Token`] (a slab key), returned with its events, so the
//! loop finds the connection without searching. Callers speak in [`Interest`] and
//! [`Event`]; the kernel's flags stay in this file, and hang-up and error are folded into
//! readiness once, here (as smol-rs/polling does): the next read or write reports them.

use super::{Interest, cvt, cvt_r};
use crate::slab::Token;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

use libc::{
    EPOLLERR, EPOLLET, EPOLLEXCLUSIVE, EPOLLHUP, EPOLLIN, EPOLLOUT, EPOLLPRI, EPOLLRDHUP,
    epoll_event,
};

/// When a registration reports readiness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// Level-triggered: every wait reports the descriptor while it is ready.
    Level,
    /// Level-triggered, and of several epoll instances waiting on the same descriptor only
    /// one is woken (`EPOLLEXCLUSIVE`; it can be added but never modified).
    Exclusive,
    /// Edge-triggered: reported once per change; the caller works until `WouldBlock`.
    Edge,
}

/// What a wait found about one registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    /// The token the descriptor was registered with.
    pub token: Token,
    /// Reading (or accepting) will not block: input, EOF, a hang-up or an error.
    pub readable: bool,
    /// Writing will not block: room, a hang-up or an error.
    pub writable: bool,
    /// The peer closed its sending side or the socket failed: reads return EOF or the
    /// error from now on, so no later edge will say so again.
    pub is_read_closed: bool,
    /// The connection hung up or failed: writes fail from now on.
    pub is_write_closed: bool,
    /// Urgent data is queued (`EPOLLPRI`: TCP's urgent pointer, or a Unix stream's
    /// `MSG_OOB` byte). A stream read stops short at the urgent mark (tcp(7), unix(7)), so
    /// a short read no longer means the queue is empty; an edge-triggered waiter must read
    /// again.
    pub has_urgent: bool,
}

impl Event {
    /// Readable and writable as one [`Interest`].
    pub fn ready(&self) -> Interest {
        Interest {
            readable: self.readable,
            writable: self.writable,
        }
    }

    fn decode(event: &epoll_event) -> Event {
        let flags = event.events as libc::c_int;
        let failed = flags & (EPOLLHUP | EPOLLERR) != 0;
        Event {
            token: Token::from_raw(event.u64),
            readable: failed || flags & (EPOLLIN | EPOLLRDHUP) != 0,
            writable: failed || flags & EPOLLOUT != 0,
            is_read_closed: failed || flags & EPOLLRDHUP != 0,
            is_write_closed: failed,
            has_urgent: flags & EPOLLPRI != 0,
        }
    }
}

fn flags_of(interest: Interest, trigger: Trigger) -> u32 {
    let mut flags = 0;
    if interest.readable {
        flags |= EPOLLIN;
    }
    // A peer's half-close is readable anyway (the read returns EOF); EPOLLRDHUP also says
    // so on its own, which an edge-triggered waiter needs. EPOLLEXCLUSIVE refuses it.
    if interest.readable && trigger != Trigger::Exclusive {
        flags |= EPOLLRDHUP;
    }
    // Edge-triggered, a read that stopped at an urgent mark would leave the rest of the
    // queue unseen until more arrives; EPOLLPRI says a mark is there.
    if interest.readable && trigger == Trigger::Edge {
        flags |= EPOLLPRI;
    }
    if interest.writable {
        flags |= EPOLLOUT;
    }
    flags |= match trigger {
        Trigger::Level => 0,
        Trigger::Exclusive => EPOLLEXCLUSIVE,
        Trigger::Edge => EPOLLET,
    };
    flags as u32
}

/// An epoll instance.
#[derive(Debug)]
pub struct Epoll {
    fd: OwnedFd,
}

/// A buffer of events filled by [`Epoll::wait`].
#[derive(Debug)]
pub struct Events {
    list: Vec<epoll_event>,
    len: usize,
}

impl Events {
    /// Room for `capacity` events per wait.
    pub fn with_capacity(capacity: usize) -> Self {
        Events {
            list: vec![epoll_event { events: 0, u64: 0 }; capacity.max(1)],
            len: 0,
        }
    }

    /// The events of the last wait.
    pub fn iter(&self) -> impl Iterator<Item = Event> + '_ {
        self.list[..self.len].iter().map(Event::decode)
    }
}

impl Epoll {
    /// A new epoll instance (close-on-exec).
    ///
    /// # Errors
    ///
    /// The OS error of `epoll_create1`.
    pub fn new() -> io::Result<Self> {
        // SAFETY: epoll_create1 takes no pointers; a non-negative result is a new fd.
        let raw = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: `raw` was just returned by epoll_create1 and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Epoll { fd })
    }

    fn control(
        &self,
        op: libc::c_int,
        fd: BorrowedFd<'_>,
        token: Token,
        events: u32,
    ) -> io::Result<()> {
        let mut event = epoll_event {
            events,
            u64: token.to_raw(),
        };
        // SAFETY: `event` is a valid epoll_event for the call (the kernel copies it);
        // both fds are open for the duration of the call (owned / borrowed).
        cvt(unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd.as_raw_fd(), &mut event) })?;
        Ok(())
    }

    /// Starts watching `fd` for `interest`, reporting it with `token`.
    ///
    /// The caller removes `fd` with [`Epoll::delete`] before closing it, or closes it
    /// knowing the kernel drops a closed fd's registration (when no dup of it remains).
    ///
    /// # Errors
    ///
    /// The OS error of `epoll_ctl`, e.g. `EEXIST` when already added.
    pub fn add(
        &self,
        fd: BorrowedFd<'_>,
        token: Token,
        interest: Interest,
        trigger: Trigger,
    ) -> io::Result<()> {
        self.control(libc::EPOLL_CTL_ADD, fd, token, flags_of(interest, trigger))
    }

    /// Changes what is watched for `fd` (and its token).
    ///
    /// # Errors
    ///
    /// The OS error of `epoll_ctl`: `ENOENT` when not added, `EINVAL` for
    /// [`Trigger::Exclusive`] (delete and add instead).
    pub fn modify(
        &self,
        fd: BorrowedFd<'_>,
        token: Token,
        interest: Interest,
        trigger: Trigger,
    ) -> io::Result<()> {
        self.control(libc::EPOLL_CTL_MOD, fd, token, flags_of(interest, trigger))
    }

    /// Stops watching `fd`.
    ///
    /// # Errors
    ///
    /// The OS error of `epoll_ctl`, e.g. `ENOENT` when not added.
    pub fn delete(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.control(libc::EPOLL_CTL_DEL, fd, Token::reserved(0), 0)
    }

    /// Waits until at least one watched fd is ready or `timeout` passes (`None`: no
    /// timeout), filling `events`; returns how many are ready.
    ///
    /// # Errors
    ///
    /// The OS error of `epoll_wait`, other than `EINTR` (retried).
    pub fn wait(&self, events: &mut Events, timeout: Option<Duration>) -> io::Result<usize> {
        let timeout_ms = super::poll::timeout_ms(timeout);
        let capacity = i32::try_from(events.list.len()).unwrap_or(i32::MAX);
        // SAFETY: `events.list` is valid for `capacity` writable epoll_event structs for
        // the duration of the call; `self.fd` is an open epoll fd.
        let n = cvt_r(|| unsafe {
            libc::epoll_wait(
                self.fd.as_raw_fd(),
                events.list.as_mut_ptr(),
                capacity,
                timeout_ms,
            )
        })?;
        events.len = n as usize;
        Ok(events.len)
    }

    /// As [`Epoll::wait`], but the timeout has nanosecond resolution (`epoll_pwait2`,
    /// Linux 5.11+; older kernels fall back to [`Epoll::wait`], rounding up to 1 ms).
    ///
    /// # Errors
    ///
    /// The OS error of `epoll_pwait2`, other than `EINTR` (retried) and `ENOSYS`.
    pub fn wait_precise(
        &self,
        events: &mut Events,
        timeout: Option<Duration>,
    ) -> io::Result<usize> {
        let Some(timeout) = timeout else {
            return self.wait(events, None);
        };
        let spec = libc::timespec {
            tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        let capacity = i32::try_from(events.list.len()).unwrap_or(i32::MAX);
        // SAFETY: `events.list` is valid for `capacity` writable epoll_event structs and
        // `spec` is a valid timespec, both for the duration of the call; a null sigmask
        // means "leave the mask alone"; `self.fd` is an open epoll fd.
        let result = cvt_r(|| unsafe {
            libc::epoll_pwait2(
                self.fd.as_raw_fd(),
                events.list.as_mut_ptr(),
                capacity,
                &spec,
                std::ptr::null(),
            )
        });
        match result {
            Ok(n) => {
                events.len = n as usize;
                Ok(events.len)
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => self.wait(events, Some(timeout)),
            Err(e) => Err(e),
        }
    }
}

impl std::os::fd::AsFd for Epoll {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
