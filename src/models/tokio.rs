//! `tokio`: the mainstream async stack; a task per connection on one runtime per loop.
//!
//! Technique: step 10 of the ladder. A current-thread runtime per loop, all accepting from
//! the same listeners; every connection is one task in straight-line code:
//! `write_all(..).await` what is owed, then wait for input, read it, hand it to `Connection`
//! (the steps `async` takes too, in `server::task`; this file says how tokio waits).
//! Cost: a task switch and a waker per readiness on top of `epoll`'s system calls.
//! Limit: a handler that blocks stalls every task of its loop; datagrams are served by loop 0.
//!
//! Not `read(&mut buf).await`: as the `async` model explains (a buffer per waiting task),
//! a task polls `poll_read` with its loop's one buffer and hands the bytes over at once.
//! Idle timeout: one tokio timer per connection, reset whenever it starts waiting for input.
//! Why one current-thread runtime per loop, sharing one accept queue: docs/benchmarks.md,
//! "Readiness ladder". Listeners and datagram sockets stay reverb's own types (they know
//! every address kind, abstract Unix names too), watched through `AsyncFd` on a duplicate;
//! datagrams go to loop 0 only, since tokio registers without EPOLLEXCLUSIVE and a shared
//! socket would wake every loop per datagram.

use crate::net::{DatagramSocket, Peer, Stream, StreamListener};
use crate::server::event_loops::{LoopSources, run_loops, split_sources};
use crate::server::stop_signal::{StopSignal, StopWait};
use crate::server::task::{TaskWaits, Woke, close_served, converse};
use crate::server::task_buffers;
use crate::server::{
    ACCEPT_PAUSE, Accepted, Admission, CloseReason, Connection, ConnectionCounter, DATAGRAM_BATCH,
    DatagramReplier, Limits, Listeners, LoopLog, Protocol, RunOptions, ServeError, Shutdown,
    accept_and_admit, stream_transport,
};
use crate::sys::async_fd;
use std::future::poll_fn;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, Interest, ReadBuf, unix::AsyncFd};
use tokio::net::{TcpStream, UnixStream};
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
    RunOptions { threads, .. }: RunOptions,
) -> Result<(), ServeError> {
    let loops = threads.unwrap_or_else(super::default_loops);
    let sources = split_sources(&mut listeners, loops, false)?;
    let (limits, counter) = (&listeners.limits, &listeners.counter);
    // Every descriptor a loop needs is made in its setup, before the start gate opens.
    let setup = |_, LoopSources { streams, datagrams }| {
        let mut runtime = tokio::runtime::Builder::new_current_thread();
        let runtime = runtime.enable_all().build()?;
        let sockets = (streams.into_iter().map(Source::Stream))
            .chain(datagrams.into_iter().map(Source::Datagram));
        let sockets = sockets.map(Source::watchable).collect::<io::Result<_>>()?;
        let fired = shutdown.fd().try_clone_to_owned()?;
        io::Result::Ok((runtime, sockets, fired))
    };
    run_loops(
        "tokio",
        sources,
        &shutdown,
        setup,
        |(runtime, sockets, fired)| {
            let state = Arc::new(Loop {
                protocol: protocol.clone(),
                limits: limits.clone(),
                counter: counter.clone(),
                draining: StopSignal::default(),
                cut: StopSignal::default(),
            });
            runtime.block_on(serve_loop(sockets, fired, state))
        },
    )?;
    // Dropping the listeners removes the Unix socket files, once every loop is done.
    drop(listeners);
    Ok(())
}

/// A socket a loop watches for readability.
enum Source {
    Stream(StreamListener),
    Datagram(DatagramSocket),
}

impl Source {
    /// Makes the socket non-blocking and duplicates its descriptor for tokio to watch
    /// (readiness belongs to the open file description, which both share).
    fn watchable(self) -> io::Result<(OwnedFd, Source)> {
        let fd = match &self {
            Source::Stream(listener) => listener.set_nonblocking(true).map(|()| listener.as_fd()),
            Source::Datagram(socket) => socket.set_nonblocking(true).map(|()| socket.as_fd()),
        };
        Ok((fd?.try_clone_to_owned()?, self))
    }
}

/// What every task of one loop reads.
struct Loop {
    protocol: Protocol,
    limits: Limits,
    counter: ConnectionCounter,
    /// Shutdown fired: stop accepting and reading, send what is owed.
    draining: StopSignal,
    /// The drain timeout passed: stop sending too.
    cut: StopSignal,
}

impl Loop {
    /// Runs `f` with the log of the loop on this thread: every task of a loop runs on its
    /// thread (a current-thread runtime), and tokio's tasks must be `Send`, so the log
    /// and its counters are the thread's own rather than the task's.
    fn with_log<R>(&self, f: impl FnOnce(&LoopLog) -> R) -> R {
        LoopLog::with_thread_log(self.limits.metrics, f)
    }
}

/// Held by every connection task: the loop knows all have ended when the last is dropped
/// (mini-redis's shutdown_complete).
type Done = mpsc::Sender<()>;

/// One loop: accept and answer until shutdown, then wait for every connection's drain.
async fn serve_loop(
    sockets: Vec<(OwnedFd, Source)>,
    fired: OwnedFd,
    state: Arc<Loop>,
) -> io::Result<()> {
    let (done_tx, mut done) = mpsc::channel::<()>(1);
    let mut tasks = JoinSet::new();
    for (fd, socket) in sockets {
        let readiness = async_fd::watch(fd, Interest::READABLE)?;
        tasks.spawn(serve_socket(
            socket,
            readiness,
            state.clone(),
            done_tx.clone(),
        ));
    }
    drop(done_tx);
    let fired = async_fd::watch(fired, Interest::READABLE)?;
    let mut result = Ok(());
    let joined = |joined: Result<io::Result<()>, _>| joined.map_err(io::Error::other)?;
    tokio::select! {
        ready = fired.readable() => drop(ready?),
        Some(ended) = tasks.join_next() => result = joined(ended),
    }
    // Accept loops end at once, connections once they have sent what they owe.
    state.draining.fire();
    while let Some(ended) = tasks.join_next().await {
        result = result.and(joined(ended));
    }
    if timeout(state.limits.drain_timeout, done.recv())
        .await
        .is_err()
    {
        state.cut.fire();
        done.recv().await;
    }
    result
}

/// Accepts connections (spawning a task for each admitted one) or answers datagrams on
/// `socket` until shutdown; `readiness` watches a duplicate of its descriptor.
async fn serve_socket(
    socket: Source,
    readiness: AsyncFd<OwnedFd>,
    state: Arc<Loop>,
    done: Done,
) -> io::Result<()> {
    let mut replier = DatagramReplier::new(state.protocol.clone());
    let mut buf = Vec::new();
    loop {
        let mut ready = tokio::select! {
            () = state.draining.wait() => return Ok(()),
            ready = readiness.readable() => ready?,
        };
        match &socket {
            Source::Stream(listener) => {
                match state.with_log(|log| accept_and_admit(listener, &state.counter, log))? {
                    Accepted::Connection(stream, peer, admission) => {
                        adopt(stream, peer, admission, &state, &done);
                    }
                    Accepted::Again => {}
                    // Drained: tokio waits for the next edge.
                    Accepted::Empty => ready.clear_ready(),
                    Accepted::Paused => tokio::select! {
                        () = state.draining.wait() => return Ok(()),
                        () = sleep(ACCEPT_PAUSE) => {}
                    },
                }
            }
            Source::Datagram(socket) => {
                buf.resize(socket.max_datagram_bytes(), 0);
                let answer = |log: &_| replier.answer_queued(socket, &mut buf, DATAGRAM_BATCH, log);
                // Emptied: tokio waits for the next edge.
                if state.with_log(answer)? {
                    ready.clear_ready();
                }
            }
        }
    }
}

/// A connected tokio stream, TCP or Unix.
trait Socket: AsyncRead + AsyncWrite + AsFd + Unpin + Send {}
impl<S: AsyncRead + AsyncWrite + AsFd + Unpin + Send> Socket for S {}

/// Hands an admitted connection to tokio and spawns its task.
fn adopt(stream: Stream, peer: Peer, admission: Admission, state: &Arc<Loop>, done: &Done) {
    let transport = stream_transport(&stream);
    let adopted = stream.set_nonblocking(true).and_then(|()| match stream {
        Stream::Tcp(s) => Ok(Box::new(TcpStream::from_std(s)?) as Box<dyn Socket>),
        Stream::Unix(s) => Ok(Box::new(UnixStream::from_std(s)?) as Box<dyn Socket>),
    });
    match adopted {
        Ok(stream) => drop(tokio::spawn(serve(
            stream,
            peer,
            state.clone(),
            (admission, done.clone()),
        ))),
        Err(e) => {
            let why = CloseReason::CannotWatch(format!("tokio cannot watch it: {e}"));
            state.with_log(|log| log.closed(&peer, transport, &why));
        }
    }
}

/// One connection's task: the shared steps ([`converse`], [`close_served`]), waiting the
/// way tokio does ([`Task`]). How it ended is logged and counted here; it ends only this
/// connection.
async fn serve(mut stream: Box<dyn Socket>, peer: Peer, state: Arc<Loop>, held: (Admission, Done)) {
    let mut connection = Connection::new(&state.protocol, peer, &state.limits, stream.as_fd());
    let idle_timeout = state.limits.idle_timeout;
    let mut task = Task {
        stream: &mut stream,
        state: &state,
        idle: pin!(sleep(idle_timeout.unwrap_or_default())),
        // Made once: a fresh wait per message would take a lock.
        draining: state.draining.wait(),
        cut: state.cut.wait(),
    };
    let reason = converse(&mut task, &mut connection).await;
    drop(task);
    let (fd, place) = (stream.as_fd(), held.0);
    state.with_log(|log| close_served(fd, &mut connection, reason, log, place));
}

/// How a connection's task waits under tokio: `select!` over the socket, the loop's
/// signals and one tokio timer per connection for its idle timeout.
struct Task<'a> {
    stream: &'a mut Box<dyn Socket>,
    state: &'a Loop,
    idle: Pin<&'a mut Sleep>,
    draining: StopWait<'a>,
    cut: StopWait<'a>,
}

impl TaskWaits for Task<'_> {
    async fn send_all(&mut self, bytes: &[u8]) -> Option<io::Result<()>> {
        tokio::select! {
            biased;
            sent = self.stream.write_all(bytes) => Some(sent),
            () = &mut self.cut => None,
        }
    }

    async fn receive(&mut self, connection: &mut Connection) -> Woke {
        let idle_timeout = self.state.limits.idle_timeout;
        if let Some(timeout) = idle_timeout {
            self.idle.as_mut().reset(Instant::now() + timeout);
        }
        let (stream, state) = (&mut *self.stream, self.state);
        tokio::select! {
            biased;
            received = poll_fn(|cx| poll_receive(cx, stream, connection, state)) => {
                Woke::Received(received)
            }
            () = &mut self.draining => Woke::Draining,
            () = &mut self.idle, if idle_timeout.is_some() => {
                Woke::Idle(idle_timeout.unwrap_or_default())
            }
        }
    }

    fn is_draining(&self) -> bool {
        self.state.draining.is_fired()
    }

    fn with_log<R>(&self, f: impl FnOnce(&LoopLog) -> R) -> R {
        self.state.with_log(f)
    }
}

/// A connection's socket inside a task being polled: `Pending` is `WouldBlock`.
struct TaskSocket<'a, 'b, 'c> {
    cx: &'a mut Context<'b>,
    stream: &'a mut Box<dyn Socket + 'c>,
}

impl task_buffers::SocketIo for TaskSocket<'_, '_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut input = ReadBuf::new(buf);
        match Pin::new(&mut **self.stream).poll_read(self.cx, &mut input) {
            Poll::Ready(read) => read.map(|()| input.filled().len()),
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        match Pin::new(&mut **self.stream).poll_write(self.cx, bytes) {
            Poll::Ready(written) => written,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

/// Reads once into the loop's buffer and hands the bytes to `connection`; pending until
/// the socket is readable. tokio's `poll_read` treats a short read as "drained", so no
/// `read` returns `EAGAIN`.
fn poll_receive(
    cx: &mut Context<'_>,
    stream: &mut Box<dyn Socket>,
    connection: &mut Connection,
    state: &Loop,
) -> Poll<Result<(), CloseReason>> {
    let received = state.with_log(|log| {
        task_buffers::receive_into(connection, log, &mut TaskSocket { cx, stream })
    });
    match received {
        Ok(None) => Poll::Pending,
        received => Poll::Ready(received.map(drop)),
    }
}
