//! `async`: reverb's own runtime (`crate::runtime`): a task per connection on our epoll reactor.
//!
//! Technique: `--threads` runtimes, each on its own thread with its own SO_REUSEPORT
//! listener; every connection is one task (asyncio's `start_server`) that awaits readiness
//! and drives `Connection`, with one timer for its idle timeout and then its drain.
//! Cost: as `epoll`, plus a wake (a run-queue push) and a poll of the task's future per
//! readiness event; an idle connection is a boxed future of a few hundred bytes, not a stack.
//! Limit: Linux only; a task that computes without awaiting stalls its whole runtime.

use crate::net::{DatagramSocket, Peer, Stream, StreamListener};
use crate::runtime::{self, Async, Direction, Runtime, Timer};
use crate::server::event_loops::listener_for_another_loop;
use crate::server::is_per_peer_datagram_error;
use crate::server::{
    ACCEPT_PAUSE, AcceptAction, Admission, Connection, ConnectionCounter, DATAGRAM_BUFFER_BYTES,
    DatagramReplier, Limits, Listeners, Protocol, READ_BUFFER_BYTES, RunOptions, ServeError,
    Shutdown, accept_action, log_accept_pause, log_idle, log_over_limit, log_send_failure,
};
use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::io;
use std::mem::take;
use std::net::Shutdown as Half;
use std::os::fd::AsFd;
use std::rc::Rc;
use std::sync::{Condvar, Mutex, PoisonError};
use std::task::Poll;
use std::thread;

/// Steps (reads or writes) a connection task takes before it lets the others run.
const STEPS_PER_TURN: usize = 16;

thread_local! {
    /// The one read buffer of a runtime thread. A task copies input into it and hands it
    /// to its `Connection` without awaiting in between, so tasks can share it and an idle
    /// connection holds no read buffer at all.
    static READ_BUFFER: RefCell<Vec<u8>> = RefCell::new(vec![0; READ_BUFFER_BYTES]);
    /// The output allocation lent to whichever connection is producing replies, and taken
    /// back once they are sent, so an idle connection holds no output buffer either.
    static SPARE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// What every task of one runtime shares.
struct Loop {
    protocol: Protocol,
    limits: Limits,
    counter: ConnectionCounter,
    /// Shutdown fired: stop accepting, stop reading, drain. Tasks re-check it whenever they
    /// are polled, and the loop wakes them all once when it is set.
    is_draining: Cell<bool>,
}

/// Serves every listener on `threads` runtimes until `shutdown` fires, then drains.
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
    let loops = options.threads.unwrap_or_else(super::default_loops).max(1);
    // Loop 0 serves the bound sockets themselves; the others get SO_REUSEPORT siblings
    // (their own accept queues) for TCP, and second descriptors for the rest.
    let mut sockets = vec![(take(&mut listeners.streams), take(&mut listeners.datagrams))];
    for _ in 1..loops {
        let (streams, datagrams) = &sockets[0];
        let streams = streams
            .iter()
            .map(listener_for_another_loop)
            .collect::<io::Result<_>>()?;
        let datagrams = datagrams.iter().map(DatagramSocket::try_clone);
        sockets.push((streams, datagrams.collect::<io::Result<_>>()?));
    }
    // No loop accepts before every loop has its epoll and eventfd: a busy first loop could
    // otherwise use up the descriptors the others still need to start.
    let started = Gate::new(loops);
    thread::scope(|scope| {
        let mut threads = Vec::new();
        for (index, (streams, datagrams)) in sockets.into_iter().enumerate() {
            let state = Loop {
                protocol: protocol.clone(),
                limits: listeners.limits.clone(),
                counter: listeners.counter.clone(),
                is_draining: Cell::new(false),
            };
            let (started, shutdown) = (&started, &shutdown);
            let spawned = thread::Builder::new()
                .name(format!("reverb-async-{index}"))
                .spawn_scoped(scope, move || {
                    let runtime = Runtime::new();
                    started.arrive_and_wait();
                    serve_loop(runtime?, streams, datagrams, Rc::new(state), shutdown)
                });
            match spawned {
                Ok(thread) => threads.push(thread),
                Err(e) => {
                    // The loops already running must still hear shutdown before we return.
                    shutdown.fire();
                    started.open();
                    return Err(e.into());
                }
            }
        }
        // Every loop is joined before the first error is returned.
        let mut result = Ok(());
        for thread in threads {
            let panicked = |_| Err(io::Error::other("an event loop panicked"));
            result = result.and(thread.join().unwrap_or_else(panicked));
        }
        result.map_err(ServeError::from)
    })
}

/// A barrier the spawning thread can also open, should a thread fail to start.
struct Gate {
    waiting_for: Mutex<usize>,
    opened: Condvar,
}

impl Gate {
    fn new(count: usize) -> Self {
        Gate {
            waiting_for: Mutex::new(count),
            opened: Condvar::new(),
        }
    }

    fn arrive_and_wait(&self) {
        let mut waiting_for = self
            .waiting_for
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *waiting_for = waiting_for.saturating_sub(1);
        self.opened.notify_all();
        let waiting = self.opened.wait_while(waiting_for, |n| *n > 0);
        drop(waiting.unwrap_or_else(PoisonError::into_inner));
    }

    fn open(&self) {
        *self
            .waiting_for
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = 0;
        self.opened.notify_all();
    }
}

/// One runtime: a task per listener and datagram socket, then a task per connection.
fn serve_loop(
    runtime: Runtime,
    streams: Vec<StreamListener>,
    datagrams: Vec<DatagramSocket>,
    state: Rc<Loop>,
    shutdown: &Shutdown,
) -> io::Result<()> {
    let servers = runtime.block_on(async {
        let mut servers = Vec::new();
        for listener in streams {
            servers.push(runtime::spawn(accept_loop(
                Async::new(listener)?,
                state.clone(),
            )));
        }
        for socket in datagrams {
            servers.push(runtime::spawn(datagram_loop(
                Async::new(socket)?,
                state.clone(),
            )));
        }
        // Shutdown's eventfd becomes readable when it fires and stays so: one wait.
        let fired = Async::new(shutdown.fd())?;
        fired
            .read_with(|_| match shutdown.is_fired() {
                true => Ok(()),
                false => Err(io::ErrorKind::WouldBlock.into()),
            })
            .await?;
        state.is_draining.set(true);
        runtime::wake_all();
        io::Result::Ok(servers)
    })??;
    // Accept loops end at once; each connection ends when drained or at its drain timeout.
    runtime.wait_for_tasks()?;
    runtime.block_on(async {
        for server in servers {
            server.await.unwrap_or(Ok(()))?;
        }
        Ok(())
    })?
}

/// Accepts connections until shutdown, spawning a task for each admitted one.
async fn accept_loop(listener: Async<StreamListener>, state: Rc<Loop>) -> io::Result<()> {
    loop {
        let accepted = poll_fn(|cx| match state.is_draining.get() {
            true => Poll::Ready(None),
            false => listener
                .poll_io(cx, Direction::Read, StreamListener::accept)
                .map(Some),
        })
        .await;
        match accepted {
            None => return Ok(()),
            Some(Ok((stream, peer))) => match state.counter.admit() {
                Some(admission) => {
                    runtime::spawn(serve_connection(stream, peer, admission, state.clone()));
                }
                None => log_over_limit(&peer, state.counter.max_conns().unwrap_or(0)),
            },
            Some(Err(e)) => match accept_action(&e) {
                AcceptAction::Wait | AcceptAction::Retry => {}
                AcceptAction::Pause => {
                    log_accept_pause(listener.get_ref().name(), &e);
                    let mut pause = runtime::sleep(ACCEPT_PAUSE);
                    poll_fn(|cx| match state.is_draining.get() {
                        true => Poll::Ready(()),
                        false => pause.poll_expired(cx),
                    })
                    .await;
                }
                AcceptAction::Fail => return Err(e),
            },
        }
    }
}

/// One connection's task; its errors are logged here and never reach the loop.
async fn serve_connection(stream: Stream, peer: Peer, admission: Admission, state: Rc<Loop>) {
    let _admission = admission;
    let mut connection = Connection::new(&state.protocol, peer, &state.limits, stream.as_fd());
    if let Err(e) = drive(stream, &mut connection, &state).await {
        tracing::debug!("connection {} ended: {e}", connection.peer());
    }
}

/// What woke a connection task.
enum Step {
    Drain,
    Deadline,
    /// A write: its result, and how many bytes were offered.
    Wrote(io::Result<usize>, usize),
    /// A read: how many bytes came (0: EOF), and how many were asked for.
    Read(io::Result<(usize, usize)>),
}

async fn drive(stream: Stream, connection: &mut Connection, state: &Loop) -> io::Result<()> {
    let stream = Async::new(stream)?;
    let limits = &state.limits;
    // One timer per connection, pushed back by every read: the idle timeout; after
    // shutdown, the drain deadline.
    let mut deadline = limits
        .idle_timeout
        .map(|idle| Timer::at(runtime::now() + idle));
    let mut is_draining = false;
    let mut steps = 0;
    loop {
        if connection.is_finished() {
            // Everything owed was sent: the peer reads EOF after the last reply.
            let _ = stream.shutdown(Half::Write);
            return Ok(());
        }
        steps += 1;
        if steps > STEPS_PER_TURN {
            // Input keeps coming without a pause: let the other connections run.
            steps = 0;
            runtime::yield_now().await;
        }
        let step = poll_fn(|cx| {
            if state.is_draining.get() && !is_draining {
                return Poll::Ready(Step::Drain);
            }
            if let Some(timer) = &mut deadline {
                if timer.poll_expired(cx).is_ready() {
                    return Poll::Ready(Step::Deadline);
                }
            }
            if connection.wants_write() {
                let offered = connection.owed();
                if let Poll::Ready(written) =
                    stream.poll_io(cx, Direction::Write, |s| s.write(connection.unsent()))
                {
                    return Poll::Ready(Step::Wrote(written, offered));
                }
            }
            if connection.wants_read() {
                let read = stream.poll_io(cx, Direction::Read, |s| read_into(s, connection));
                if let Poll::Ready(read) = read {
                    return Poll::Ready(Step::Read(read));
                }
            }
            // Parked: a request-reply connection never uses up its turn.
            steps = 0;
            Poll::Pending
        })
        .await;
        match step {
            Step::Drain => {
                is_draining = true;
                connection.stop_reading();
                let drain_deadline = runtime::now() + limits.drain_timeout;
                deadline = Some(Timer::at(drain_deadline));
            }
            Step::Deadline if is_draining => {
                tracing::warn!(
                    "closing {}: drain timeout with {} bytes still owed",
                    connection.peer(),
                    connection.owed()
                );
                return Ok(());
            }
            Step::Deadline => match (limits.idle_timeout, &mut deadline) {
                (Some(idle), _) if connection.wants_read() => {
                    log_idle(connection.peer(), idle);
                    return Ok(());
                }
                // Not reading (the peer does not read its replies): not idle.
                (Some(idle), Some(timer)) => timer.reset(runtime::now() + idle),
                _ => deadline = None,
            },
            Step::Wrote(written, offered) => {
                // The kernel may take fewer bytes than offered; the rest waits for writable.
                let written = written?;
                connection.advance(written);
                if written < offered {
                    stream.clear_ready(Direction::Write);
                } else {
                    SPARE.with_borrow_mut(|spare| connection.return_spare(spare));
                }
            }
            Step::Read(read) => {
                let (got, asked) = read?;
                if got < asked {
                    // A short read emptied the socket: skip the read that would say EAGAIN.
                    stream.clear_ready(Direction::Read);
                }
                if let (Some(idle), Some(timer)) = (limits.idle_timeout, &mut deadline) {
                    if !is_draining {
                        timer.reset(runtime::now() + idle);
                    }
                }
            }
        }
    }
}

/// One read into the thread's buffer, handed straight to the connection; returns how many
/// bytes came (0: EOF) and how many were asked for.
fn read_into(stream: &Stream, connection: &mut Connection) -> io::Result<(usize, usize)> {
    READ_BUFFER.with_borrow_mut(|buf| {
        let limit = connection.read_limit(buf.len());
        let got = stream.read(&mut buf[..limit])?;
        SPARE.with_borrow_mut(|spare| connection.lend_spare(spare));
        let received = match got {
            0 => connection.receive_eof(),
            n => connection.receive(&buf[..n]),
        };
        received.map_err(|_| io::Error::other("handler panicked"))?;
        Ok((got, limit))
    })
}

/// Answers datagrams until shutdown.
async fn datagram_loop(socket: Async<DatagramSocket>, state: Rc<Loop>) -> io::Result<()> {
    let mut replier = DatagramReplier::new(state.protocol.clone());
    let mut buf = vec![0u8; DATAGRAM_BUFFER_BYTES];
    let mut answered = 0usize;
    loop {
        let received = poll_fn(|cx| {
            if state.is_draining.get() {
                return Poll::Ready(None);
            }
            let received = socket.poll_io(cx, Direction::Read, |s| s.recv_from(&mut buf));
            if received.is_pending() {
                answered = 0;
            }
            received.map(Some)
        })
        .await;
        let (n, peer) = match received {
            None => return Ok(()),
            Some(Ok(received)) => received,
            Some(Err(e)) if is_per_peer_datagram_error(&e) => continue,
            Some(Err(e)) => return Err(e),
        };
        if let Some(reply) = replier.reply(&peer, &buf[..n]) {
            if let Err(e) = socket.get_ref().send_to(reply, &peer) {
                log_send_failure(&peer, &e);
            }
        }
        answered += 1;
        if answered > STEPS_PER_TURN {
            answered = 0;
            runtime::yield_now().await;
        }
    }
}
