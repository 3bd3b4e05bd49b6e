//! `async`: reverb's own runtime (`crate::runtime`): a task per connection on our epoll reactor.
//!
//! Technique: step 9 of the ladder. `--threads` runtimes, each on its own thread with its
//! own SO_REUSEPORT listener; every connection is one task (asyncio's `start_server`)
//! written as straight-line code: `write_all(..).await` what is owed, `ready().await` for
//! input, read it, hand it to `Connection` (those steps, shared with `tokio`, are
//! `server::task`; this file says how this runtime waits).
//! Cost: as `epoll`, plus a wake (a run-queue push) and a poll of the task's future per
//! readiness event; an idle connection is a boxed future of a few hundred bytes, not a stack.
//! Limit: Linux only; a task that computes without awaiting stalls its whole runtime.
//!
//! Not `read(&mut buf).await` as `runtime/mod.rs` shows: that future holds `buf` while the
//! peer is silent, so each connection would own a read buffer (16 KiB each: 160 MiB for
//! 10,000 idle ones), and it cost 2 to 11 % more CPU per message at 50 and 500 connections
//! in a before/after run. A task awaits `ready()`, then `try_read`s into its loop's buffer.
//!
//! Idle timeout: one runtime timer per connection, moved to "now + timeout" whenever the
//! task starts waiting for input, so waiting to send never counts as idle.

use crate::net::{DatagramSocket, Peer, Stream, StreamListener};
use crate::runtime::{self, Async, Direction, Runtime, unless};
use crate::server::event_loops::{LoopSources, run_loops, split_sources};
use crate::server::task::{TaskWaits, Woke, close_served, converse};
use crate::server::task_buffers;
use crate::server::{
    ACCEPT_PAUSE, Accepted, Admission, CloseReason, Connection, ConnectionCounter, DATAGRAM_BATCH,
    DatagramReplier, Limits, Listeners, LoopLog, Protocol, RunOptions, ServeError, Shutdown,
    listener_transport, on_accept,
};
use std::cell::Cell;
use std::io;
use std::os::fd::AsFd;
use std::pin::pin;
use std::rc::Rc;

/// What every task of one runtime shares.
struct Loop {
    protocol: Protocol,
    limits: Limits,
    counter: ConnectionCounter,
    /// Shutdown fired: stop accepting and reading, send what is owed.
    is_draining: Cell<bool>,
    /// The drain timeout passed: stop sending too.
    is_cut: Cell<bool>,
    /// This runtime's log and counters: every task of the loop runs on its one thread.
    log: LoopLog,
}

/// Serves every listener on `--threads` runtimes until `shutdown` fires, then drains.
///
/// # Errors
///
/// Setup failures (epoll, siblings, threads) or a listener that broke.
pub fn run(
    mut listeners: Listeners,
    protocol: Protocol,
    shutdown: Shutdown,
    RunOptions { threads: loops, .. }: RunOptions,
) -> Result<(), ServeError> {
    let loops = loops.unwrap_or_else(super::default_loops).max(1);
    // Every loop also answers datagrams, from duplicates of the same sockets.
    let sources = split_sources(&mut listeners, loops, true)?;
    let state = || Loop {
        protocol: protocol.clone(),
        limits: listeners.limits.clone(),
        counter: listeners.counter.clone(),
        is_draining: Cell::new(false),
        is_cut: Cell::new(false),
        log: LoopLog::new(listeners.limits.metrics),
    };
    run_loops(
        "async",
        sources,
        &shutdown,
        |_, sources| Ok((Runtime::new()?, sources, Rc::new(state()))),
        |(runtime, sources, state)| serve_loop(&runtime, sources, &state, &shutdown),
    )?;
    Ok(())
}

/// One runtime: a task per listener and datagram socket, then a task per connection.
fn serve_loop(
    runtime: &Runtime,
    LoopSources { streams, datagrams }: LoopSources,
    state: &Rc<Loop>,
    shutdown: &Shutdown,
) -> io::Result<()> {
    runtime.block_on(async {
        let mut servers = Vec::new();
        for listener in streams {
            let listener = Async::new(listener)?;
            servers.push(runtime::spawn(accept_loop(listener, state.clone())));
        }
        for socket in datagrams {
            let socket = Async::new(socket)?;
            servers.push(runtime::spawn(answer_datagrams(socket, state.clone())));
        }
        // Shutdown's eventfd becomes readable when it fires and stays so: one wait.
        let fired = Async::new(shutdown.fd())?;
        let is_fired = |_: &_| match shutdown.is_fired() {
            true => Ok(()),
            false => Err(io::ErrorKind::WouldBlock.into()),
        };
        fired.read_with(is_fired).await?;
        // Accept loops end at once, connections once they have sent what they owe.
        state.is_draining.set(true);
        runtime::wake_all();
        let drain_timeout = state.limits.drain_timeout;
        if runtime::timeout(drain_timeout, runtime::all_tasks_done())
            .await
            .is_err()
        {
            state.is_cut.set(true);
            runtime::wake_all();
            runtime::all_tasks_done().await;
        }
        for server in servers {
            server.await.unwrap_or(Ok(()))?;
        }
        Ok(())
    })?
}

/// Accepts connections until shutdown, spawning a task for each admitted one.
async fn accept_loop(listener: Async<StreamListener>, state: Rc<Loop>) -> io::Result<()> {
    let is_draining = || state.is_draining.get();
    let (name, transport) = (
        listener.get_ref().name(),
        listener_transport(listener.get_ref()),
    );
    let accept = || listener.read_with(StreamListener::accept);
    while let Some(accepted) = unless(is_draining, None, pin!(accept())).await {
        match on_accept(accepted, name, transport, &state.counter, &state.log)? {
            Accepted::Connection(stream, peer, admission) => match Async::new(stream) {
                Ok(stream) => {
                    let task = serve_connection(stream, peer, admission, state.clone());
                    runtime::spawn_detached(task);
                }
                Err(e) => {
                    let why = CloseReason::CannotWatch(format!("cannot watch it: {e}"));
                    state.log.closed(&peer, transport, &why);
                }
            },
            Accepted::Paused => {
                unless(is_draining, None, pin!(runtime::sleep(ACCEPT_PAUSE))).await;
            }
            Accepted::Again | Accepted::Empty => {}
        }
    }
    Ok(())
}

/// One connection's task: the shared steps ([`converse`], [`close_served`]), waiting the
/// way this runtime does ([`Task`]). How it ended is logged and counted, and never
/// reaches the loop.
///
/// A function returning an `async move` block rather than an `async fn`: an `async fn`
/// moves each argument into a local of its body and keeps both copies, which cost every
/// connection 312 bytes (`-Zprint-type-sizes`); the block uses what it captures in place,
/// and the `Connection` is built before it, so the peer's address is not held twice.
fn serve_connection(
    stream: Async<Stream>,
    peer: Peer,
    place: Admission,
    state: Rc<Loop>,
) -> impl Future<Output = ()> {
    let fd = stream.get_ref().as_fd();
    let mut connection = Connection::new(&state.protocol, peer, &state.limits, fd);
    async move {
        let idle = state.limits.idle_timeout.map(runtime::sleep);
        let mut task = Task {
            stream: &stream,
            state: &state,
            idle,
        };
        let reason = converse(&mut task, &mut connection).await;
        let fd = stream.get_ref().as_fd();
        close_served(fd, &mut connection, reason, &state.log, place);
    }
}

/// How a connection's task waits under this runtime: `unless` the loop's flags say
/// stop, with one runtime timer per connection for its idle timeout.
struct Task<'a> {
    stream: &'a Async<Stream>,
    state: &'a Loop,
    idle: Option<runtime::Timer>,
}

impl TaskWaits for Task<'_> {
    async fn send_all(&mut self, bytes: &[u8]) -> Option<io::Result<()>> {
        let is_cut = || self.state.is_cut.get();
        unless(is_cut, None, pin!(self.stream.write_all(bytes))).await
    }

    async fn receive(&mut self, connection: &mut Connection) -> Woke {
        let timeout = self.state.limits.idle_timeout.unwrap_or_default();
        if let Some(timer) = &mut self.idle {
            timer.reset(runtime::now() + timeout);
        }
        let is_draining = || self.state.is_draining.get();
        let receive = pin!(receive(self.stream, connection, &self.state.log));
        match unless(is_draining, self.idle.as_mut(), receive).await {
            Some(received) => Woke::Received(received),
            None if is_draining() => Woke::Draining,
            None => Woke::Idle(timeout),
        }
    }

    fn is_draining(&self) -> bool {
        self.state.is_draining.get()
    }

    fn with_log<R>(&self, f: impl FnOnce(&LoopLog) -> R) -> R {
        f(&self.state.log)
    }
}

/// Waits for input, then reads it into the loop's buffer and hands it to `connection`.
async fn receive(
    stream: &Async<Stream>,
    connection: &mut Connection,
    log: &LoopLog,
) -> Result<(), CloseReason> {
    loop {
        stream.ready(Direction::Read).await;
        // `None`: readiness was cached from an earlier edge; wait for the next one.
        if task_buffers::receive_into(connection, log, &mut TaskSocket(stream))?.is_some() {
            return Ok(());
        }
    }
}

/// A connection's socket under this runtime: reads keep the reactor's readiness cache
/// right; a write that finds no room is simply owed, and `write_all` waits for it.
struct TaskSocket<'a>(&'a Async<Stream>);

impl task_buffers::SocketIo for TaskSocket<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0.get_ref().write(bytes)
    }
}

/// Answers datagrams until shutdown.
async fn answer_datagrams(socket: Async<DatagramSocket>, state: Rc<Loop>) -> io::Result<()> {
    let mut replier = DatagramReplier::new(state.protocol.clone());
    let mut buf = vec![0u8; socket.get_ref().max_datagram_bytes()];
    let is_draining = || state.is_draining.get();
    while unless(is_draining, None, pin!(socket.ready(Direction::Read)))
        .await
        .is_some()
    {
        let (socket_ref, log) = (socket.get_ref(), &state.log);
        // Emptied: wait for the next edge.
        if replier.answer_queued(socket_ref, &mut buf, DATAGRAM_BATCH, log)? {
            socket.clear_ready(Direction::Read);
        }
    }
    Ok(())
}
