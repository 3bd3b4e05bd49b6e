//! `tokio`: the mainstream async stack; a task per connection on one runtime per loop.
//!
//! Technique: step 10 of the ladder. A current-thread runtime per loop, all accepting from
//! the same listeners; every connection is one task in straight-line code:
//! `write_all(..).await` what is owed, then wait for input, read it, hand it to `Connection`.
//! Cost: a task switch and a waker per readiness on top of `epoll`'s system calls.
//! Limit: a handler that blocks stalls every task of its loop; datagrams are served by loop 0.
//!
//! Not `read(&mut buf).await`: as the `async` model explains (a buffer per waiting task),
//! a task polls `poll_read` with its loop's one buffer and hands the bytes over at once.
//! Idle timeout: one tokio timer per connection, moved only when it fires early.
//!
//! Why a current-thread runtime per loop, and one accept queue rather than SO_REUSEPORT
//! siblings: docs/benchmarks.md, "Readiness ladder". Datagrams go to loop 0 only: tokio
//! registers descriptors edge-triggered without EPOLLEXCLUSIVE, so a shared socket would
//! wake every loop per datagram. `AsyncFd` watches a duplicate of each `DatagramSocket`,
//! which already knows every peer kind (abstract Unix names too).

use crate::net::{DatagramSocket, Peer, StreamListener};
use crate::server::event_loops::{LoopSources, run_loops, split_sources};
use crate::server::stop_signal::StopSignal;
use crate::server::{
    ACCEPT_PAUSE, AcceptAction, Admission, Connection, ConnectionCounter, DATAGRAM_BUFFER_BYTES,
    DatagramReplier, Limits, Listeners, Protocol, READ_BUFFER_BYTES, RunOptions, ServeError,
    Shutdown, accept_action, is_per_peer_datagram_error, log_accept_pause, log_drain_cut, log_idle,
    log_over_limit, log_send_failure,
};
use crate::sys::async_fd;
use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, Interest, ReadBuf, unix::AsyncFd};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep, sleep, timeout};

thread_local! {
    /// The one read buffer of each loop's thread: a connection borrows it for one read
    /// and hands it back before it awaits, so 10,000 connections share it.
    static READ_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; READ_BUFFER_BYTES]);
    /// The output allocation lent to whichever connection is producing replies.
    static SPARE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Serves every listener with `threads` runtimes until `shutdown` fires and drains.
///
/// # Errors
///
/// Building a runtime or adopting a socket failed, or a listener broke.
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
    let setup = |_, sources: LoopSources| {
        let mut runtime = tokio::runtime::Builder::new_current_thread();
        let runtime = runtime.enable_all().build()?;
        let dup = |fd: BorrowedFd<'_>| fd.try_clone_to_owned();
        let fds = sources.datagrams.iter().map(|s| dup(s.as_fd()));
        let fds = fds.collect::<io::Result<Vec<_>>>()?;
        let state = Arc::new(Loop {
            protocol: protocol.clone(),
            limits: limits.clone(),
            counter: counter.clone(),
            draining: StopSignal::default(),
            cut: StopSignal::default(),
        });
        io::Result::Ok((runtime, sources, dup(shutdown.fd())?, fds, state))
    };
    run_loops(
        "tokio",
        sources,
        &shutdown,
        setup,
        |(runtime, sources, fired, fds, state)| {
            runtime.block_on(serve_loop(sources, fired, fds, state))
        },
    )?;
    // Dropping the listeners removes the Unix socket files, once every loop is done.
    drop(listeners);
    Ok(())
}

/// Held by every connection task; the loop knows all have ended when the last is dropped.
type Done = mpsc::Sender<()>;

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

/// One loop: accept and answer until shutdown, then wait for every connection's drain.
///
/// `fired` duplicates the shutdown eventfd, `datagram_fds` the datagram sockets.
async fn serve_loop(
    LoopSources { streams, datagrams }: LoopSources,
    fired: OwnedFd,
    datagram_fds: Vec<OwnedFd>,
    state: Arc<Loop>,
) -> io::Result<()> {
    // Each connection holds a `done` sender, so when the receiver sees every sender
    // dropped, every connection has finished (mini-redis's shutdown_complete).
    let (done_tx, mut done) = mpsc::channel::<()>(1);
    let mut tasks = JoinSet::new();
    for listener in streams {
        tasks.spawn(accept_loop(listener, state.clone(), done_tx.clone()));
    }
    for (socket, fd) in datagrams.into_iter().zip(datagram_fds) {
        let readiness = async_fd::watch(fd, Interest::READABLE)?;
        tasks.spawn(answer_datagrams(socket, readiness, state.clone()));
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

/// Accepts connections until shutdown, spawning a task for each admitted one.
async fn accept_loop(
    listener: StreamListener,
    state: Arc<Loop>,
    done: mpsc::Sender<()>,
) -> io::Result<()> {
    let name = listener.name().to_string();
    listener.set_nonblocking(true)?;
    let acceptor = match listener.into_std() {
        Ok(tcp) => Acceptor::Tcp(TcpListener::from_std(tcp)?),
        Err(unix) => Acceptor::Unix(UnixListener::from_std(unix)?),
    };
    loop {
        let accepted = tokio::select! {
            () = state.draining.wait() => return Ok(()),
            accepted = acceptor.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => match state.counter.admit() {
                Some(admission) => {
                    tracing::debug!("accepted {peer} on {name}");
                    let held = (admission, done.clone());
                    let task = serve(stream, peer, held, state.clone());
                    tokio::spawn(task);
                }
                None => log_over_limit(&peer, state.counter.max_conns().unwrap_or(0)),
            },
            Err(e) => match accept_action(&e) {
                AcceptAction::Wait | AcceptAction::Retry => {}
                AcceptAction::Pause => {
                    log_accept_pause(&name, &e);
                    tokio::select! {
                        () = state.draining.wait() => return Ok(()),
                        () = sleep(ACCEPT_PAUSE) => {}
                    }
                }
                AcceptAction::Fail => return Err(e),
            },
        }
    }
}

/// A listener as tokio's type for its transport.
enum Acceptor {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// A connected tokio stream, TCP or Unix.
trait Socket: AsyncRead + AsyncWrite + Unpin + Send {}
impl<S: AsyncRead + AsyncWrite + Unpin + Send> Socket for S {}

impl Acceptor {
    async fn accept(&self) -> io::Result<(Box<dyn Socket>, Peer)> {
        Ok(match self {
            Acceptor::Tcp(listener) => {
                let (stream, addr) = listener.accept().await?;
                // Replies are small; Nagle would hold them for the peer's ACK.
                let _ = stream.set_nodelay(true);
                (Box::new(stream), Peer::Ip(addr))
            }
            Acceptor::Unix(listener) => {
                let (stream, addr) = listener.accept().await?;
                (Box::new(stream), Peer::Unix(addr.into()))
            }
        })
    }
}

/// One connection's task: sends what is owed, reads, hands the bytes over, until the
/// connection is finished. Its errors end only this connection.
async fn serve(stream: Box<dyn Socket>, peer: Peer, _held: (Admission, Done), state: Arc<Loop>) {
    let mut connection = Connection::new(&state.protocol, peer, state.limits.max_buffer_bytes);
    if let Err(e) = converse(stream, &mut connection, &state).await {
        tracing::debug!("connection {} ended: {e}", connection.peer());
    }
}

async fn converse(
    mut stream: Box<dyn Socket>,
    connection: &mut Connection,
    state: &Loop,
) -> io::Result<()> {
    let stream = &mut stream;
    let idle_timeout = state.limits.idle_timeout;
    let mut idle = pin!(sleep(idle_timeout.unwrap_or_default()));
    // Made once: a fresh wait per message would take a lock.
    let (mut draining, mut cut) = (pin!(state.draining.wait()), pin!(state.cut.wait()));
    loop {
        if connection.wants_write() {
            // While the peer does not take its replies, it is not read (backpressure).
            let owed = connection.owed();
            tokio::select! {
                biased;
                sent = stream.write_all(connection.unsent()) => sent?,
                () = &mut cut => {
                    log_drain_cut(connection.peer(), owed);
                    return Ok(());
                }
            }
            connection.advance(owed);
            SPARE.with_borrow_mut(|spare| connection.return_spare(spare));
        }
        if state.draining.is_fired() {
            connection.stop_reading();
        }
        if connection.is_finished() {
            // Everything owed was sent: the peer reads EOF after the last reply.
            let _ = stream.shutdown().await;
            return Ok(());
        }
        let idle_at = idle_timeout.map(|timeout| Instant::now() + timeout);
        tokio::select! {
            biased;
            received = poll_fn(|cx| poll_receive(cx, stream, connection)) => received?,
            // Shutdown began: stop reading at the top of the loop.
            () = &mut draining => {}
            () = idle_expired(idle.as_mut(), idle_at) => {
                log_idle(connection.peer(), idle_timeout.unwrap_or_default());
                return Ok(());
            }
        }
    }
}

/// Completes at `deadline` (never when `None`). The timer is moved only when it fires
/// before `deadline`: a reset per message would cost a timer-wheel update.
async fn idle_expired(mut timer: Pin<&mut Sleep>, deadline: Option<Instant>) {
    let Some(deadline) = deadline else {
        return std::future::pending().await;
    };
    loop {
        timer.as_mut().await;
        if timer.deadline() >= deadline {
            return;
        }
        timer.as_mut().reset(deadline);
    }
}

/// Reads once into the loop's shared buffer and feeds the protocol; pending until the
/// socket is readable. tokio's `poll_read` keeps one waker slot per socket (no waiter
/// list) and treats a short read as "drained", so no `read` returns `EAGAIN`.
fn poll_receive(
    cx: &mut Context<'_>,
    stream: &mut Box<dyn Socket>,
    connection: &mut Connection,
) -> Poll<io::Result<()>> {
    READ_BUF.with_borrow_mut(|buf| {
        let limit = connection.read_limit(buf.len());
        let mut input = ReadBuf::new(&mut buf[..limit]);
        ready!(Pin::new(&mut **stream).poll_read(cx, &mut input))?;
        SPARE.with_borrow_mut(|spare| connection.lend_spare(spare));
        let received = match input.filled() {
            [] => connection.receive_eof(),
            bytes => connection.receive(bytes),
        };
        Poll::Ready(received.map_err(|_| io::Error::other("handler panicked")))
    })
}

/// Answers datagrams on `socket`; `readiness` watches a duplicate of its descriptor.
async fn answer_datagrams(
    socket: DatagramSocket,
    readiness: AsyncFd<OwnedFd>,
    state: Arc<Loop>,
) -> io::Result<()> {
    socket.set_nonblocking(true)?;
    let mut replier = DatagramReplier::new(state.protocol.clone());
    let mut buf = vec![0u8; DATAGRAM_BUFFER_BYTES];
    loop {
        let mut ready = tokio::select! {
            () = state.draining.wait() => return Ok(()),
            ready = readiness.readable() => ready?,
        };
        let (n, peer) = match ready.try_io(|_| socket.recv_from(&mut buf)) {
            Ok(Ok(received)) => received,
            Ok(Err(e)) if is_per_peer_datagram_error(&e) => continue,
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        };
        if let Some(reply) = replier.reply(&peer, &buf[..n]) {
            // A full send buffer drops this one reply, as a lost datagram would.
            if let Err(e) = socket.send_to(reply, &peer) {
                log_send_failure(&peer, &e);
            }
        }
    }
}
