//! `async`: reverb's own runtime (`crate::runtime`): a task per connection on our epoll reactor.
//!
//! Technique: step 9 of the ladder. `--threads` runtimes, each on its own thread and accept queue
//! (`AcceptQueues` says why); every connection is one task (asyncio's `start_server`) written as
//! straight-line code: `write(..).await` what is owed, `ready().await` for input, read it, hand it
//! to `Connection`; those steps, shared with `tokio`, are `server::task`: this file only waits.
//! Cost: as `epoll`, plus a wake (a run-queue push) and a poll of the task's future per
//! readiness event; an idle connection is a boxed future of a few hundred bytes, not a stack.
//! Limit: Linux only; a task that computes without awaiting stalls its whole runtime.
//!
//! Not `read(&mut buf).await` as `runtime/mod.rs` shows: that future holds `buf` while the
//! peer is silent, so each connection would own a read buffer (16 KiB each: 160 MiB for
//! 10,000 idle ones), and it cost 2 to 11 % more CPU per message at 50 and 500 connections
//! in a before/after run. A task awaits `ready()`, then `try_read`s into its loop's buffer.
//!
//! Idle timeout: one runtime timer per connection, reset on progress either way (`TaskWaits`).

use crate::net::{Peer, Stream};
use crate::runtime::{self, Async, Direction, Runtime, unless};
use crate::server::event_loops::{LoopSources, run_loops, split_sources};
use crate::server::task::{Sent, SocketWaits, TaskLoop, TaskWaits, Woke, close_served, converse};
use crate::server::task::{accept_connections, answer_datagrams};
use crate::server::task_buffers::{self, Received};
use crate::server::{
    ACCEPT_PAUSE, Admission, CloseReason, Connection, Listeners, LoopLog, Protocol, RunOptions,
    ServeError, Shutdown, stream_transport,
};
use std::io;
use std::os::fd::AsFd;
use std::pin::pin;
use std::rc::Rc;

/// Serves every listener on `--threads` runtimes until `shutdown` fires, then drains.
///
/// # Errors
///
/// Setup failures (epoll, siblings, threads) or a listener that broke.
pub fn run(
    mut listeners: Listeners,
    protocol: Protocol,
    shutdown: Shutdown,
    options: RunOptions,
) -> Result<(), ServeError> {
    // Every loop also answers datagrams, from duplicates of the same sockets.
    let sources = split_sources(&mut listeners, super::loop_count(&options), true)?;
    let state = || Rc::new(TaskLoop::new(&protocol, &listeners));
    run_loops(
        "async",
        sources,
        &shutdown,
        &options.on_serving,
        |_, sources| Ok((Runtime::new()?, sources, state())),
        |(runtime, sources, state)| serve_loop(&runtime, sources, &state, &shutdown),
    )?;
    Ok(())
}

/// One runtime: a task per listener and datagram socket, then a task per connection.
fn serve_loop(
    runtime: &Runtime,
    LoopSources { streams, datagrams }: LoopSources,
    state: &Rc<TaskLoop>,
    shutdown: &Shutdown,
) -> io::Result<()> {
    runtime.block_on(async {
        let mut servers = Vec::new();
        for listener in streams {
            let (listener, state) = (Async::new(listener)?, state.clone());
            servers.push(runtime::spawn(async move {
                let adopt = |stream, peer, place, log: &_| adopt(stream, peer, place, &state, log);
                let waits = &Watched(&listener, &state);
                accept_connections(listener.get_ref(), &state.counter, waits, adopt).await
            }));
        }
        for socket in datagrams {
            let (socket, state) = (Async::new(socket)?, state.clone());
            servers.push(runtime::spawn(async move {
                let waits = &Watched(&socket, &state);
                answer_datagrams(socket.get_ref(), &state.protocol, waits).await
            }));
        }
        // Shutdown's eventfd becomes readable when it fires and stays so: one wait.
        let fired = Async::new(shutdown.fd())?;
        let would_block = io::ErrorKind::WouldBlock;
        let is_fired = |_: &_| shutdown.is_fired().then_some(()).ok_or(would_block.into());
        fired.read_with(is_fired).await?;
        // Accept loops end at once, connections once they have sent what they owe.
        state.draining.fire();
        runtime::wake_all();
        let drain_timeout = state.limits.drain_timeout;
        if runtime::timeout(drain_timeout, runtime::all_tasks_done())
            .await
            .is_err()
        {
            state.cut.fire();
            runtime::wake_all();
            runtime::all_tasks_done().await;
        }
        for server in servers {
            server.await.unwrap_or(Ok(()))?;
        }
        Ok(())
    })?
}

/// How a listener's or datagram socket's task waits under this runtime: `unless`
/// shutdown began, for the reactor's cached readiness.
struct Watched<'a, T: AsFd>(&'a Async<T>, &'a TaskLoop);

impl<T: AsFd> SocketWaits for Watched<'_, T> {
    async fn when_readable(
        &self,
        mut take: impl FnMut(&LoopLog) -> io::Result<bool>,
    ) -> Option<io::Result<()>> {
        let is_draining = || self.1.draining.is_fired();
        unless(is_draining, None, pin!(self.0.ready(Direction::Read))).await?;
        let is_emptied = self.1.with_log(&mut take);
        // Emptied: wait for the next edge.
        if let Ok(true) = is_emptied {
            self.0.clear_ready(Direction::Read);
        }
        Some(is_emptied.map(drop))
    }

    async fn pause(&self) -> bool {
        let is_draining = || self.1.draining.is_fired();
        (unless(is_draining, None, pin!(runtime::sleep(ACCEPT_PAUSE))).await).is_some()
    }
}

/// Hands an admitted connection to the reactor and spawns its task.
fn adopt(stream: Stream, peer: Peer, place: Admission, state: &Rc<TaskLoop>, log: &LoopLog) {
    let transport = stream_transport(&stream);
    match Async::new(stream) {
        Ok(stream) => drop(runtime::spawn(serve_connection(
            stream,
            peer,
            place,
            state.clone(),
        ))),
        Err(e) => {
            let why = CloseReason::CannotWatch(format!("cannot watch it: {e}"));
            log.closed(&peer, transport, &why);
        }
    }
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
    state: Rc<TaskLoop>,
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
        state.with_log(|log| close_served(fd, &mut connection, reason, log, place, false));
    }
}

/// How a connection's task waits under this runtime: `unless` the loop's flags say
/// stop, with one runtime timer per connection for its idle timeout.
struct Task<'a> {
    stream: &'a Async<Stream>,
    state: &'a TaskLoop,
    idle: Option<runtime::Timer>,
}

impl TaskWaits for Task<'_> {
    async fn send_some(&mut self, bytes: &[u8]) -> Sent {
        let is_cut = || self.state.cut.is_fired();
        let writing = pin!(self.stream.write(bytes));
        match unless(is_cut, self.idle.as_mut(), writing).await {
            Some(written) => Sent::Wrote(written),
            None if is_cut() => Sent::Cut,
            None => Sent::Idle,
        }
    }

    fn send_now(&self, bytes: &[u8]) -> io::Result<usize> {
        self.stream.get_ref().write(bytes)
    }

    fn restart_idle(&mut self) {
        if let (Some(timer), Some(timeout)) = (self.idle.as_mut(), self.state.limits.idle_timeout) {
            timer.reset(runtime::now() + timeout);
        }
    }

    async fn receive(&mut self, connection: &mut Connection) -> Woke {
        let is_draining = || self.state.draining.is_fired();
        let receive = pin!(receive(self.stream, connection, self.state));
        match unless(is_draining, self.idle.as_mut(), receive).await {
            Some(received) => Woke::Received(received),
            None if is_draining() => Woke::Draining,
            None => Woke::Idle,
        }
    }

    fn state(&self) -> &TaskLoop {
        self.state
    }
}

/// Waits for input, then reads it into the loop's buffer and hands it to `connection`.
async fn receive(
    stream: &Async<Stream>,
    connection: &mut Connection,
    state: &TaskLoop,
) -> Result<Received, CloseReason> {
    loop {
        stream.ready(Direction::Read).await;
        let socket = &mut TaskSocket(stream);
        let received = state.with_log(|log| task_buffers::receive_into(connection, log, socket));
        // `None`: readiness was cached from an earlier edge; wait for the next one.
        if let Some(received) = received? {
            return Ok(received);
        }
    }
}

/// A connection's socket under this runtime: reads keep the reactor's readiness cache
/// right; a write that finds no room is simply owed, and `send_some` waits for it.
struct TaskSocket<'a>(&'a Async<Stream>);

impl task_buffers::SocketIo for TaskSocket<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0.get_ref().write(bytes)
    }
}
