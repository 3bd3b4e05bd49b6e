//! Our own async runtime, from scratch: a reactor, an executor and timers on `std::task`.
//!
//! The tutorial ends with asyncio: coroutines on an epoll selector. This module is that
//! layer in Rust, small enough to read in one sitting and with no `unsafe` (wakers come
//! from [`std::task::Wake`] on an `Arc`, pinning from `Box::pin` and `pin!`). It talks to
//! the OS only through `crate::sys`.
//!
//! | file          | what it owns                                                            |
//! |---------------|-------------------------------------------------------------------------|
//! | `reactor.rs`  | one epoll instance; per registered fd, "ready?" flags and a waker each for reading and writing |
//! | `executor.rs` | the tasks, the run queue their wakers push to, and the loop: run, then sleep in the reactor |
//! | `timer.rs`    | deadlines in a binary heap; [`Timer`], [`sleep`], [`timeout`]           |
//! | `net.rs`      | [`Async`]: a non-blocking socket registered with the reactor; TCP, UDP and Unix aliases |
//!
//! One [`Runtime`] runs on one thread and its tasks never leave it (so they need not be
//! `Send`); a server runs one runtime per core. Wakers alone cross threads: waking a task
//! from anywhere is always safe.
//!
//! # Following one byte
//!
//! A client sends `x` to an echo task that is waiting in `stream.read(&mut buf).await`.
//!
//! 1. **Registration.** When the task wrapped its socket in [`Async::new`], the socket was
//!    made non-blocking and added to epoll *once*, edge-triggered, for reading and writing,
//!    with the key of its slot in the reactor's slab as the epoll token. The slot starts
//!    as "ready" both ways: we try the system call before we wait for it.
//! 2. **The task parks.** `read` is a future. Polled, it called `read(2)`, which said
//!    `EAGAIN` (`WouldBlock`): the reactor cleared the slot's read flag and stored the
//!    task's [`Waker`] there, and the future returned `Pending`. The
//!    executor put the task's boxed future back in its slab slot and moved on.
//! 3. **The loop sleeps.** With no task queued, the executor asks the timers for the next
//!    deadline and calls `epoll_wait` with it (`Reactor::wait`).
//! 4. **The byte arrives.** The kernel queues `x` on the socket and reports an edge:
//!    `epoll_wait` returns the token. The reactor looks the slot up (a stale token whose
//!    slot was reused is ignored), sets its read flag, and calls the stored waker.
//! 5. **The waker.** A waker is an `Arc<TaskWaker>`: a task key, an "already queued" flag,
//!    and the run queue. Waking pushes the key onto the queue, once; if the loop were
//!    asleep (woken from another thread), it would also write the runtime's eventfd.
//! 6. **The task runs.** The executor pops the key, takes the future out of its slot and
//!    polls it with that same waker. `read` sees the flag set, calls `read(2)` again, gets
//!    `x`, and returns `Ready(Ok(1))`: the `async fn` continues after its `.await`. One
//!    byte is less than `buf` holds, so the socket is empty now: `read` forgets the flag,
//!    and the next read waits for the next edge instead of asking `read(2)` for an
//!    `EAGAIN`. (The `async` model waits with `ready().await` and reads with `try_read`,
//!    so that a silent peer's task holds no buffer; the steps are the same.)
//! 7. **And back out.** The task awaits `stream.write_all(&buf[..1])`: the write flag is
//!    still set from registration, `write(2)` takes the byte at once, and the future is
//!    ready without ever parking. Had the send buffer been full, the same dance (flag
//!    cleared, waker stored, `EPOLLOUT` edge, wake, poll) would have run for writing.
//!
//! Edge-triggered epoll reports a change once; the cached flags remember it until a system
//! call says `WouldBlock`, so nothing is lost and no `epoll_ctl` is needed per operation.
//! A hang-up is remembered apart (`is_final`): its edge may come with the last bytes.
//! A task gets [`executor`]'s budget of I/O operations per poll, as in tokio: a socket
//! that never runs dry (a peer that floods) would otherwise keep its task running and
//! starve every other task of the runtime.
//! A task may be polled when nothing changed (a spurious wake-up); every future here
//! re-checks its condition, as the `Future` contract requires.

pub mod executor;
pub mod net;
pub mod reactor;
pub mod timer;

#[cfg(test)]
mod tests;

pub use executor::{
    JoinHandle, Runtime, all_tasks_done, spawn, spawn_detached, unless, wake_all, yield_now,
};
pub use net::{Async, TcpListener, TcpStream, UdpSocket, UnixDatagram, UnixListener, UnixStream};
pub use reactor::Direction;
pub use timer::{Elapsed, Timer, now, sleep, timeout};

use std::task::{Context, Waker};

/// Remembers the waker of the task polling with `cx`. A task is polled with the same waker
/// each time, so usually this is a comparison and no clone.
fn store_waker(slot: &mut Option<Waker>, cx: &Context<'_>) {
    if !slot
        .as_ref()
        .is_some_and(|waker| waker.will_wake(cx.waker()))
    {
        *slot = Some(cx.waker().clone());
    }
}
