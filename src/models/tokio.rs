//! `tokio`: the mainstream async stack; a task per connection on one runtime per loop.
//!
//! Technique: step 10 of the ladder. A current-thread runtime per loop, all accepting from
//! the same listeners; every connection is one task in straight-line code:
//! `write(..).await` what is owed, then wait for input, read it, hand it to `Connection`.
//! Those steps, and the accept and datagram tasks, are the ones `async` takes too
//! (`server::task`); this file says how tokio waits: for the first of readiness, the
//! loop's stop signals and tokio timers.
//! Cost: a task switch and a waker per readiness on top of `epoll`'s system calls.
//! Limit: a handler that blocks stalls every task of its loop; datagrams are served by loop 0.
//!
//! Not `read(&mut buf).await`: as the `async` model explains (a buffer per waiting task),
//! a task waits for the reactor's readiness of its socket, then reads into its loop's one
//! buffer and hands the bytes over at once (`task_buffers::poll_receive`).
//! Not tokio's `TcpStream` either: a connection is reverb's own `Stream` watched through
//! `AsyncFd`, read and written with the crate's own system calls (`sys::stream`), keeping
//! tokio's readiness rules; tokio's streams go through libc's `recv` and `send`, which in a
//! process of several threads pay for thread cancellation on every call.
//! Idle timeout: one tokio timer per connection, reset on progress either way (`TaskWaits`).
//! Why one current-thread runtime per loop: docs/benchmarks.md, "Readiness ladder"; why they share
//! one accept queue and only loop 0 answers datagrams: `AcceptQueues`, for every multi-loop model.
//! Listeners and datagram sockets stay reverb's own types too (they know every address kind,
//! abstract Unix names too), watched through `AsyncFd` on a duplicate.

use crate::net::{Peer, Stream};
use crate::server::event_loops::{LoopSources, run_loops, split_sources};
use crate::server::stop_signal::StopWait;
use crate::server::task::{Sent, SocketWaits, TaskLoop, TaskWaits, Woke};
use crate::server::task::{accept_connections, answer_datagrams, close_served, converse};
use crate::server::task_buffers::poll_receive;
use crate::server::{ACCEPT_PAUSE, Admission, CloseReason, Connection, Listeners, LoopLog};
use crate::server::{Protocol, RunOptions, ServeError, Shutdown, stream_transport};
use crate::sys::async_fd;
use std::future::poll_fn;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use tokio::io::{Interest, unix::AsyncFd};
use tokio::runtime::Runtime;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep, sleep, timeout};

/// Serves every listener with `threads` runtimes until `shutdown` fires and drains.
///
/// # Errors
///
/// Building a runtime or watching a socket failed, or a listener broke.
pub fn run(
    mut listeners: Listeners,
    protocol: Protocol,
    shutdown: Shutdown,
    options: RunOptions,
) -> Result<(), ServeError> {
    let serve = |(runtime, serve): (Runtime, _)| runtime.block_on(serve);
    let sources = split_sources(&mut listeners, super::loop_count(&options), false)?;
    let setup = |_, sources| build_loop(sources, TaskLoop::new(&protocol, &listeners), &shutdown);
    let on_serving = &options.on_serving;
    run_loops("tokio", sources, &shutdown, on_serving, setup, serve)?;
    // Dropping the listeners removes the Unix socket files, once every loop is done.
    drop(listeners);
    Ok(())
}

/// Held by every connection task: the loop knows all have ended when the last is dropped
/// (mini-redis's shutdown_complete).
type Done = mpsc::Sender<()>;

/// Builds one loop: its runtime, a task (not yet run) per listener and datagram socket,
/// and the loop's future. Every descriptor a loop needs is made here, before the start
/// gate opens, and no task runs before `block_on`.
fn build_loop(
    LoopSources { streams, datagrams }: LoopSources,
    state: TaskLoop,
    shutdown: &Shutdown,
) -> io::Result<(Runtime, impl Future<Output = io::Result<()>>)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let entered = runtime.enter();
    let (state, mut servers) = (Arc::new(state), JoinSet::new());
    let (done, all_done) = mpsc::channel::<()>(1);
    for listener in streams {
        let (readiness, state, done) = (watched(&listener)?, state.clone(), done.clone());
        servers.spawn(async move {
            let adopt = |stream, peer, place, _: &_| {
                let task = serve(stream, peer, place, state.clone(), done.clone());
                drop(tokio::spawn(task));
            };
            let waits = Watched(readiness, &state);
            accept_connections(&listener, &state.counter, &waits, adopt).await
        });
    }
    for socket in datagrams {
        let (readiness, state) = (watched(&socket)?, state.clone());
        servers.spawn(async move {
            answer_datagrams(&socket, &state.protocol, &Watched(readiness, &state)).await
        });
    }
    let fired = async_fd::watch(shutdown.fd().try_clone_to_owned()?, Interest::READABLE)?;
    drop(entered);
    Ok((runtime, serve_loop(servers, fired, all_done, state)))
}

/// Makes `socket` non-blocking and registers a duplicate of its descriptor with the
/// entered runtime (readiness belongs to the open file description, which both share).
fn watched(socket: &impl AsFd) -> io::Result<AsyncFd<OwnedFd>> {
    socket2::SockRef::from(socket).set_nonblocking(true)?;
    async_fd::watch(socket.as_fd().try_clone_to_owned()?, Interest::READABLE)
}

/// One loop: accept and answer until shutdown, then wait for every connection's drain.
async fn serve_loop(
    mut servers: JoinSet<io::Result<()>>,
    fired: AsyncFd<OwnedFd>,
    mut all_done: mpsc::Receiver<()>,
    state: Arc<TaskLoop>,
) -> io::Result<()> {
    let mut result = Ok(());
    let joined = |joined: Result<io::Result<()>, _>| joined.map_err(io::Error::other)?;
    tokio::select! {
        ready = fired.readable() => drop(ready?),
        Some(ended) = servers.join_next() => result = joined(ended),
    }
    // Accept loops end at once, connections once they have sent what they owe.
    state.draining.fire();
    while let Some(ended) = servers.join_next().await {
        result = result.and(joined(ended));
    }
    if timeout(state.limits.drain_timeout, all_done.recv())
        .await
        .is_err()
    {
        state.cut.fire();
        all_done.recv().await;
    }
    result
}

/// How a listener's or datagram socket's task waits under tokio: `select!` over the
/// watched duplicate of its descriptor and the loop's shutdown.
struct Watched<'a>(AsyncFd<OwnedFd>, &'a TaskLoop);

impl SocketWaits for Watched<'_> {
    async fn when_readable(
        &self,
        mut take: impl FnMut(&LoopLog) -> io::Result<bool>,
    ) -> Option<io::Result<()>> {
        let mut ready = tokio::select! {
            () = self.1.draining.wait() => return None,
            ready = self.0.readable() => match ready {
                Ok(ready) => ready,
                Err(e) => return Some(Err(e)),
            },
        };
        // Emptied: tokio waits for the next edge.
        let is_emptied = self.1.with_log(&mut take);
        if let Ok(true) = is_emptied {
            ready.clear_ready();
        }
        Some(is_emptied.map(drop))
    }

    async fn pause(&self) -> bool {
        tokio::select! {
            () = self.1.draining.wait() => false,
            () = sleep(ACCEPT_PAUSE) => true,
        }
    }
}

/// A connected stream, TCP or Unix, watched by tokio's reactor (the crate's own reads and
/// writes, not tokio's `TcpStream`: [`poll_receive`]).
struct Socket {
    fd: AsyncFd<OwnedFd>,
    /// [`Stream::reads_may_stop_short`], for [`poll_receive`].
    reads_may_stop_short: bool,
}

impl Socket {
    /// Writes a prefix of `bytes` once the socket may be writable; clears tokio's
    /// readiness as [`poll_receive`] does for reads.
    fn poll_write(&self, cx: &mut Context<'_>, bytes: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            let mut readiness = ready!(self.fd.poll_write_ready(cx))?;
            match crate::sys::stream::send(self.fd.get_ref().as_fd(), bytes) {
                Ok(n) => {
                    // Edge-triggered: a short write filled the kernel's send buffer.
                    if 0 < n && n < bytes.len() {
                        readiness.clear_ready();
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => readiness.clear_ready(),
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// One connection's task: the shared steps ([`converse`], [`close_served`]), waiting the
/// way tokio does ([`Task`]). How it ended is logged and counted here; it ends only this
/// connection.
async fn serve(stream: Stream, peer: Peer, place: Admission, state: Arc<TaskLoop>, _done: Done) {
    let transport = stream_transport(&stream);
    let adopted = stream.set_nonblocking(true).and_then(|()| {
        let reads_may_stop_short = stream.reads_may_stop_short();
        // PRIORITY: urgent data, after which a short read proves nothing (`poll_receive`).
        let interest = Interest::READABLE | Interest::WRITABLE | Interest::PRIORITY;
        let fd = async_fd::watch(stream.into(), interest)?;
        Ok(Socket {
            fd,
            reads_may_stop_short,
        })
    });
    let socket = match adopted {
        Ok(socket) => socket,
        Err(e) => {
            let why = CloseReason::CannotWatch(format!("tokio cannot watch it: {e}"));
            return state.with_log(|log| log.closed(&peer, transport, &why));
        }
    };
    let fd = socket.fd.get_ref().as_fd();
    let mut connection = Connection::new(&state.protocol, peer, &state.limits, fd);
    let mut task = Task {
        socket: &socket,
        state: &state,
        idle: pin!(sleep(state.limits.idle_timeout.unwrap_or_default())),
        // Made once: a fresh wait per message would take a lock.
        draining: state.draining.wait(),
        cut: state.cut.wait(),
    };
    let reason = converse(&mut task, &mut connection).await;
    drop(task);
    state.with_log(|log| close_served(fd, &mut connection, reason, log, place, false));
}

/// How a connection's task waits under tokio: for the first of the socket, the loop's
/// signals and one tokio timer per connection for its idle timeout.
struct Task<'a> {
    socket: &'a Socket,
    state: &'a TaskLoop,
    idle: Pin<&'a mut Sleep>,
    draining: StopWait<'a>,
    cut: StopWait<'a>,
}

impl TaskWaits for Task<'_> {
    async fn send_some(&mut self, bytes: &[u8]) -> Sent {
        let is_timed = self.state.limits.idle_timeout.is_some();
        tokio::select! {
            biased;
            written = poll_fn(|cx| self.socket.poll_write(cx, bytes)) => Sent::Wrote(written),
            () = &mut self.cut => Sent::Cut,
            () = &mut self.idle, if is_timed => Sent::Idle,
        }
    }

    fn send_now(&self, bytes: &[u8]) -> io::Result<usize> {
        crate::sys::stream::send(self.socket.fd.get_ref().as_fd(), bytes)
    }

    fn restart_idle(&mut self) {
        if let Some(timeout) = self.state.limits.idle_timeout {
            self.idle.as_mut().reset(Instant::now() + timeout);
        }
    }

    async fn receive(&mut self, connection: &mut Connection) -> Woke {
        let is_timed = self.state.limits.idle_timeout.is_some();
        let (socket, state) = (self.socket, self.state);
        let (draining, idle) = (&mut self.draining, &mut self.idle);
        // What `select!` with `biased` does, in that order (input, shutdown, idle timeout),
        // written out: this wait ends every message, and the macro's bookkeeping of which
        // branch is done cost about 35 instructions per message more (callgrind).
        poll_fn(|cx| {
            if let Poll::Ready(received) = poll_receive(
                cx,
                &socket.fd,
                socket.reads_may_stop_short,
                connection,
                state,
            ) {
                Poll::Ready(Woke::Received(received))
            } else if Pin::new(&mut *draining).poll(cx).is_ready() {
                Poll::Ready(Woke::Draining)
            } else if is_timed && idle.as_mut().poll(cx).is_ready() {
                Poll::Ready(Woke::Idle)
            } else {
                Poll::Pending
            }
        })
        .await
    }

    fn state(&self) -> &TaskLoop {
        self.state
    }
}
