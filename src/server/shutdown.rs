//! `Shutdown`: one cloneable handle that tells every loop to stop accepting and drain.

use crate::sys::{self, eventfd::EventFd, poll};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Fired once, by a signal or by a test; every clone sees it.
///
/// Firing makes an eventfd readable and it stays readable (nobody drains it), so any
/// number of loops can add [`Shutdown::fd`] to their poll set, epoll set or io_uring and
/// wake up, in any thread and in forked children alike.
#[derive(Clone, Debug)]
pub struct Shutdown {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Cached "seen fired", so that later checks cost no system call.
    is_fired: AtomicBool,
    event: EventFd,
}

impl Shutdown {
    /// A handle that has not fired.
    ///
    /// # Errors
    ///
    /// The OS error of creating the eventfd.
    pub fn new() -> io::Result<Self> {
        Ok(Shutdown {
            inner: Arc::new(Inner {
                is_fired: AtomicBool::new(false),
                event: EventFd::new()?,
            }),
        })
    }

    /// Makes SIGTERM and SIGINT fire this handle.
    ///
    /// The eventfd must outlive every signal, so this keeps one reference for the rest of
    /// the process.
    ///
    /// # Errors
    ///
    /// The OS error of `sigaction`.
    pub fn fire_on_signals(&self) -> io::Result<()> {
        let forever: &'static Arc<Inner> = Box::leak(Box::new(self.inner.clone()));
        sys::signal::notify_on_terminate(forever.event.as_fd())
    }

    /// Tells every loop to stop accepting and drain.
    pub fn fire(&self) {
        self.inner.is_fired.store(true, Ordering::Release);
        if let Err(e) = self.inner.event.notify() {
            tracing::error!("cannot signal shutdown to the event loops: {e}");
        }
    }

    /// Whether shutdown has been asked for (by [`Shutdown::fire`] or a signal).
    pub fn is_fired(&self) -> bool {
        if self.inner.is_fired.load(Ordering::Acquire) {
            return true;
        }
        // A signal handler can only write the eventfd, so look at it.
        let mut entry = [poll::entry(self.fd(), poll::POLLIN)];
        let is_readable = matches!(poll::poll(&mut entry, Some(Duration::ZERO)), Ok(1));
        if is_readable {
            self.inner.is_fired.store(true, Ordering::Release);
        }
        is_readable
    }

    /// The eventfd that becomes readable when shutdown fires; never read from it.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.inner.event.as_fd()
    }
}
