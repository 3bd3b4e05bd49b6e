//! `tokio`: the mainstream async stack; a task per connection on one runtime per loop.
//!
//! Technique: a current-thread runtime per loop, all accepting from the same listeners;
//! a task per connection runs `readable().await`, one read, `write(..).await` + `advance`.
//! Cost: a task switch and a waker per readiness on top of `epoll`'s system calls.
//! Limit: a handler that blocks stalls every task of its loop; datagrams are served by loop 0.
//!
//! Why a current-thread runtime per loop rather than one multi-thread runtime, and why
//! the loops share one accept queue rather than SO_REUSEPORT siblings: docs/benchmarks.md,
//! "Readiness ladder". Datagram sockets are served by loop 0 only: tokio registers
//! descriptors edge-triggered without EPOLLEXCLUSIVE, so a socket shared by every loop
//! would wake every loop for each datagram. They are driven through `AsyncFd` over the
//! shared `DatagramSocket`, which already knows every peer kind (abstract Unix names too).

use crate::net::{DatagramSocket, Peer};
use crate::server::event_loops::{LoopSources, run_loops, split_sources};
use crate::server::is_per_peer_datagram_error;
use crate::server::stop_signal::StopSignal;
use crate::server::{
    ACCEPT_PAUSE, AcceptAction, Admission, Connection, DATAGRAM_BUFFER_BYTES, DatagramReplier,
    Limits, Listeners, Protocol, READ_BUFFER_BYTES, RunOptions, ServeError, Shutdown,
    accept_action, log_accept_pause, log_idle, log_over_limit, log_send_failure,
};
use crate::sys::async_fd;
use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, Interest, ReadBuf, unix::AsyncFd};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep, sleep};

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
    options: RunOptions,
) -> Result<(), ServeError> {
    let loops = options.threads.unwrap_or_else(super::default_loops).max(1);
    let sources = split_sources(&mut listeners, loops, false)?;
    let shared = Arc::new(Shared {
        protocol,
        limits: listeners.limits.clone(),
        counter: listeners.counter.clone(),
    });
    // Every descriptor a loop needs is made now: once loop 0 accepts, the process may run
    // out of them, and a loop that cannot start would stop the whole server.
    let mut prepared = Vec::with_capacity(sources.len());
    for sources in sources {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let shutdown_fd = shutdown.fd().try_clone_to_owned()?;
        let datagram_fds = (sources.datagrams.iter())
            .map(|socket| socket.as_fd().try_clone_to_owned())
            .collect::<io::Result<_>>()?;
        prepared.push((runtime, sources, shutdown_fd, datagram_fds));
    }
    run_loops(
        "tokio",
        prepared,
        &shutdown,
        |_, prepared| Ok(prepared),
        |(runtime, sources, fired, fds)| {
            runtime.block_on(serve_loop(sources, fired, fds, shared.clone()))
        },
    )?;
    // Dropping the listeners removes the Unix socket files, once every loop is done.
    drop(listeners);
    Ok(())
}

/// What every task of every loop reads.
struct Shared {
    protocol: Protocol,
    limits: Limits,
    counter: crate::server::ConnectionCounter,
}

/// One loop: accept and answer until shutdown, then wait for every connection's drain.
///
/// `shutdown_fd` is a duplicate of the shutdown eventfd, `datagram_fds` duplicates of the
/// datagram sockets, made before the loop started (see `run`).
async fn serve_loop(
    LoopSources { streams, datagrams }: LoopSources,
    shutdown_fd: OwnedFd,
    datagram_fds: Vec<OwnedFd>,
    shared: Arc<Shared>,
) -> io::Result<()> {
    // Tasks watch `stop`; each connection holds a `done` sender, so when the receiver sees
    // every sender dropped, every connection has finished (mini-redis's shutdown_complete).
    let stop = Arc::new(StopSignal::default());
    let (done_tx, mut done) = mpsc::channel::<()>(1);
    let mut tasks = JoinSet::new();
    for listener in streams {
        listener.set_nonblocking(true)?;
        let (shared, stop, done_tx) = (shared.clone(), stop.clone(), done_tx.clone());
        let name = listener.name().to_string();
        match listener.into_std() {
            Ok(tcp) => {
                let tcp = TcpListener::from_std(tcp)?;
                tasks.spawn(accept_loop(name, Acceptor::Tcp(tcp), shared, stop, done_tx));
            }
            Err(unix) => {
                let unix = UnixListener::from_std(unix)?;
                tasks.spawn(accept_loop(
                    name,
                    Acceptor::Unix(unix),
                    shared,
                    stop,
                    done_tx,
                ));
            }
        }
    }
    for (socket, fd) in datagrams.into_iter().zip(datagram_fds) {
        socket.set_nonblocking(true)?;
        let readiness = async_fd::watch(fd, Interest::READABLE)?;
        tasks.spawn(answer_datagrams(
            socket,
            readiness,
            shared.protocol.clone(),
            stop.clone(),
        ));
    }
    drop(done_tx);
    let fired = async_fd::watch(shutdown_fd, Interest::READABLE)?;
    let mut result = Ok(());
    tokio::select! {
        ready = fired.readable() => drop(ready?),
        Some(joined) = tasks.join_next() => result = joined.map_err(io::Error::other).and_then(|r| r),
    }
    // Stop accepting and reading; connections flush within the drain timeout themselves.
    stop.fire();
    while let Some(joined) = tasks.join_next().await {
        result = result.and(joined.map_err(io::Error::other).and_then(|r| r));
    }
    let margin = shared.limits.drain_timeout + ACCEPT_PAUSE;
    let _ = tokio::time::timeout(margin, done.recv()).await;
    result
}

enum Acceptor {
    Tcp(TcpListener),
    Unix(UnixListener),
}

async fn accept_loop(
    name: String,
    acceptor: Acceptor,
    shared: Arc<Shared>,
    stop: Arc<StopSignal>,
    done: mpsc::Sender<()>,
) -> io::Result<()> {
    loop {
        let accepted = tokio::select! {
            () = stop.wait() => return Ok(()),
            accepted = accept(&acceptor) => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Some(admission) = shared.counter.admit() else {
                    log_over_limit(&peer, shared.counter.max_conns().unwrap_or(0));
                    continue;
                };
                tracing::debug!("accepted {peer} on {name}");
                let task = (shared.clone(), stop.clone(), done.clone(), admission);
                match stream {
                    Accepted::Tcp(s) => tokio::spawn(serve(s, peer, task)),
                    Accepted::Unix(s) => tokio::spawn(serve(s, peer, task)),
                };
            }
            Err(e) => match accept_action(&e) {
                AcceptAction::Wait | AcceptAction::Retry => {}
                AcceptAction::Pause => {
                    log_accept_pause(&name, &e);
                    tokio::select! {
                        () = stop.wait() => return Ok(()),
                        () = sleep(ACCEPT_PAUSE) => {}
                    }
                }
                AcceptAction::Fail => return Err(e),
            },
        }
    }
}

enum Accepted {
    Tcp(TcpStream),
    Unix(UnixStream),
}

async fn accept(acceptor: &Acceptor) -> io::Result<(Accepted, Peer)> {
    Ok(match acceptor {
        Acceptor::Tcp(listener) => {
            let (stream, addr) = listener.accept().await?;
            // Replies are small; Nagle would hold them for the peer's ACK.
            let _ = stream.set_nodelay(true);
            (Accepted::Tcp(stream), Peer::Ip(addr))
        }
        Acceptor::Unix(listener) => {
            let (stream, addr) = listener.accept().await?;
            (Accepted::Unix(stream), Peer::Unix(addr.into()))
        }
    })
}

/// A connected tokio stream, TCP or Unix.
trait Socket: AsyncRead + AsyncWrite + AsFd + Unpin + Send {}
impl<S: AsyncRead + AsyncWrite + AsFd + Unpin + Send> Socket for S {}

/// Reads once into the loop's shared buffer and feeds the protocol; pending until the
/// socket is readable. tokio's `poll_read` keeps one waker slot per socket (no waiter
/// list) and treats a short read as "drained", so no `read` returns `EAGAIN`.
fn poll_receive<S: Socket>(
    cx: &mut Context<'_>,
    stream: &mut S,
    connection: &mut Connection,
) -> Poll<io::Result<()>> {
    READ_BUF.with_borrow_mut(|buf| {
        let limit = connection.read_limit(buf.len());
        let mut input = ReadBuf::new(&mut buf[..limit]);
        ready!(Pin::new(stream).poll_read(cx, &mut input))?;
        SPARE.with_borrow_mut(|spare| connection.lend_spare(spare));
        let received = match input.filled() {
            [] => connection.receive_eof(),
            bytes => connection.receive(bytes),
        };
        Poll::Ready(received.map_err(|_| io::Error::other("handler panicked")))
    })
}

type TaskContext = (Arc<Shared>, Arc<StopSignal>, mpsc::Sender<()>, Admission);

/// One connection's task; its errors end only this connection.
async fn serve<S: Socket>(mut stream: S, peer: Peer, context: TaskContext) {
    let (shared, stop, _done, _admission) = context;
    let mut connection = Connection::new(&shared.protocol, peer, &shared.limits, stream.as_fd());
    if let Err(e) = drive(&mut stream, &mut connection, &shared.limits, &stop).await {
        tracing::debug!("connection {} ended: {e}", connection.peer());
    }
}

async fn drive<S: Socket>(
    stream: &mut S,
    connection: &mut Connection,
    limits: &Limits,
    stop: &StopSignal,
) -> io::Result<()> {
    let mut last_input = Instant::now();
    // One timer per connection, re-armed lazily when it fires early (not on every read).
    let idle_timer = sleep(limits.idle_timeout.unwrap_or_default());
    tokio::pin!(idle_timer);
    // Made once: a fresh wait or timer per message would cost a lock or a clock read.
    let stopped = stop.wait();
    tokio::pin!(stopped);
    let mut drain_timer: Option<Pin<Box<Sleep>>> = None;
    loop {
        // A cheap check each turn: a busy peer keeps the I/O branches ready, so the
        // selects below might never poll `stopped`.
        if drain_timer.is_none() && stop.is_fired() {
            connection.stop_reading();
            drain_timer = Some(Box::pin(sleep(limits.drain_timeout)));
        }
        let is_draining = drain_timer.is_some();
        if connection.wants_write() {
            tokio::select! {
                biased;
                // The kernel may take fewer bytes than offered; the rest is written next turn.
                written = stream.write(connection.unsent()) => connection.advance(written?),
                () = &mut stopped, if !is_draining => {}
                () = expire(drain_timer.as_mut()), if is_draining => {
                    let (peer, owed) = (connection.peer(), connection.owed());
                    tracing::warn!("closing {peer}: drain timeout with {owed} bytes still owed");
                    return Ok(());
                }
            }
            continue;
        }
        SPARE.with_borrow_mut(|spare| connection.return_spare(spare));
        if connection.is_finished() {
            // Everything owed was sent: the peer reads EOF after the last reply.
            let _ = stream.shutdown().await;
            return Ok(());
        }
        tokio::select! {
            biased;
            received = poll_fn(|cx| poll_receive(cx, stream, connection)) => received?,
            () = &mut stopped, if !is_draining => continue,
            () = &mut idle_timer, if limits.idle_timeout.is_some() => {
                let idle = limits.idle_timeout.unwrap_or_default();
                if Instant::now() >= last_input + idle {
                    log_idle(connection.peer(), idle);
                    return Ok(());
                }
                idle_timer.as_mut().reset(last_input + idle);
                continue;
            }
        }
        if limits.idle_timeout.is_some() {
            last_input = Instant::now();
        }
    }
}

/// Waits for `timer`, or forever when there is none.
async fn expire(timer: Option<&mut Pin<Box<Sleep>>>) {
    match timer {
        Some(timer) => timer.await,
        None => std::future::pending().await,
    }
}

/// Answers datagrams on `socket`; `readiness` watches a duplicate of its descriptor.
async fn answer_datagrams(
    socket: DatagramSocket,
    readiness: AsyncFd<OwnedFd>,
    protocol: Protocol,
    stop: Arc<StopSignal>,
) -> io::Result<()> {
    let mut replier = DatagramReplier::new(protocol);
    let mut buf = vec![0u8; DATAGRAM_BUFFER_BYTES];
    loop {
        let mut ready = tokio::select! {
            () = stop.wait() => return Ok(()),
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
