//! A task per connection (`async`, `tokio`): the steps every such task takes, written
//! once. A model says only how its runtime waits ([`TaskWaits`]): to send, and for input,
//! shutdown or the idle timeout, whichever comes first.
//!
//! The steps: send what is owed (`write(..).await`; while the peer does not take its
//! replies, it is not read); stop reading once shutdown began; end when the connection is
//! finished; otherwise wait for input, read it into the loop's buffer and hand it over
//! ([`super::task_buffers`]), and after a read that filled the buffer let the loop's other
//! tasks run first; and at the end, one close for every reason ([`close_served`]).
//!
//! The loop's other tasks, one per listener and datagram socket, are written once too
//! ([`accept_connections`], [`answer_datagrams`]); there a model says how its runtime waits
//! for the socket ([`SocketWaits`]).

use super::lifecycle::{CloseReason, Ending, LoopLog};
use super::linger;
use super::stop_signal::StopSignal;
use super::task_buffers::{self, Received};
use super::{
    Accepted, Admission, Connection, ConnectionCounter, DATAGRAM_BATCH, DatagramReplier, Limits,
    Listeners, accept_and_admit,
};
use crate::net::{DatagramSocket, Peer, Stream, StreamListener};
use crate::protocol::Protocol;
use std::future::poll_fn;
use std::io;
use std::os::fd::BorrowedFd;
use std::pin::{Pin, pin};
use std::task::Poll;

/// What every task of one loop reads.
#[derive(Debug)]
pub struct TaskLoop {
    /// What each connection speaks.
    pub protocol: Protocol,
    /// The server's limits.
    pub limits: Limits,
    /// Holds every connection to `--max-conns`, across loops.
    pub counter: ConnectionCounter,
    /// Shutdown fired: stop accepting and reading, send what is owed.
    pub draining: StopSignal,
    /// The drain timeout passed: stop sending too.
    pub cut: StopSignal,
}

impl TaskLoop {
    /// The state of one loop serving `listeners` with `protocol`.
    pub fn new(protocol: &Protocol, listeners: &Listeners) -> TaskLoop {
        TaskLoop {
            protocol: protocol.clone(),
            limits: listeners.limits.clone(),
            counter: listeners.counter.clone(),
            draining: StopSignal::default(),
            cut: StopSignal::default(),
        }
    }

    /// Runs `f` with the log of the loop on this thread: every task of a loop runs on its
    /// one thread, and a runtime may require its tasks to be `Send` (tokio's), so the log
    /// and its counters are the thread's own rather than the task's.
    pub fn with_log<R>(&self, f: impl FnOnce(&LoopLog) -> R) -> R {
        LoopLog::with_thread_log(self.limits.metrics, f)
    }
}

/// What ended a task's wait to send.
#[derive(Debug)]
pub enum Sent {
    /// The kernel took this many bytes of what was offered (`Ok`), or sending failed.
    Wrote(io::Result<usize>),
    /// The drain timeout passed first.
    Cut,
    /// `--idle-timeout` passed first.
    Idle,
}

/// What ended a task's wait for input.
#[derive(Debug)]
pub enum Woke {
    /// Input came and was handed over (`Ok`, with whether more may be queued), or the
    /// connection must close (`Err`).
    Received(Result<Received, CloseReason>),
    /// Shutdown began: read nothing more, send what is owed.
    Draining,
    /// Nothing came for `--idle-timeout`.
    Idle,
}

/// How a model's runtime lets a connection task wait: the one thing the task models differ
/// in. Implemented once per model, so these futures need no `Send` bound here: tokio's are
/// `Send`, the crate's own runtime's are not.
#[allow(async_fn_in_trait)]
pub trait TaskWaits {
    /// Waits until the kernel takes some of `bytes` (one write), or the drain timeout or
    /// `--idle-timeout` passes first.
    async fn send_some(&mut self, bytes: &[u8]) -> Sent;

    /// Offers `bytes` to the kernel once, without waiting (a non-blocking send).
    ///
    /// # Errors
    ///
    /// The OS error of the send, `WouldBlock` when the kernel took nothing.
    fn send_now(&self, bytes: &[u8]) -> io::Result<usize>;

    /// Restarts the idle clock (progress was made); nothing without `--idle-timeout`.
    fn restart_idle(&mut self);

    /// Waits until input came (read and handed to `connection` with
    /// [`task_buffers::receive_into`]), shutdown began or `--idle-timeout` passed, and
    /// says which.
    ///
    /// The idle clock runs from the connection's start and restarts whenever input came
    /// or the kernel took a byte of replies ([`TaskWaits::send_some`]); waiting to send
    /// counts too: replies owed to a peer that does not read them do not make it less
    /// idle, or it would hold its place and its buffer for ever.
    async fn receive(&mut self, connection: &mut Connection) -> Woke;

    /// The loop the task belongs to.
    fn state(&self) -> &TaskLoop;
}

/// Serves `connection` until it must close, and says why.
pub async fn converse(task: &mut impl TaskWaits, connection: &mut Connection) -> CloseReason {
    // A peer that keeps its socket full would otherwise keep its task reading (a runtime's
    // budget of operations still allows a MiB or more per poll) while every other
    // connection of the loop waits: after a read that filled the buffer, the others go
    // first, as a readiness loop serves one read per ready connection per wait.
    let mut is_turn_over = false;
    loop {
        if connection.wants_write() {
            // While the peer does not take its replies, it is not read (backpressure).
            let owed = connection.owed();
            // What can be sent now: with TLS, plaintext owed before the handshake ended (a
            // greeting) is owed too, but is no byte of `unsent` until it is encrypted.
            let sending = connection.unsent().len();
            if let Err(reason) = send_all(task, connection.unsent()).await {
                return reason.unwrap_or(CloseReason::DrainTimeout { owed });
            }
            task.state()
                .with_log(|log| log.sent(connection.transport(), sending));
            connection.advance(sending);
            task_buffers::return_spare(connection);
        }
        if task.state().draining.is_fired() {
            connection.stop_reading();
        }
        if connection.is_finished() {
            return connection.finish_reason(task.state().draining.is_fired());
        }
        let woke = after_turn(is_turn_over, pin!(task.receive(connection))).await;
        is_turn_over = false;
        match woke {
            Woke::Received(Ok(received)) => {
                is_turn_over = received.is_full;
                task.restart_idle();
            }
            // Shutdown began: stop reading at the top of the loop.
            Woke::Draining => {}
            Woke::Received(Err(reason)) => return reason,
            Woke::Idle => return idle(task),
        }
    }
}

/// Awaits `future`, after ending the task's turn first when `is_turn_over`: `Pending`
/// once and woken at once, so every task its runtime has queued runs before it goes on
/// (what `yield_now` does in either runtime). One future, not a `yield_now().await` of its
/// own: an await point more in [`converse`] cost the `tokio` model 2 % more instructions
/// per message (its `select!` was no longer inlined), even where no read fills the buffer.
fn after_turn<F: Future>(
    mut is_turn_over: bool,
    mut future: Pin<&mut F>,
) -> impl Future<Output = F::Output> {
    poll_fn(move |cx| {
        if is_turn_over {
            is_turn_over = false;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        future.as_mut().poll(cx)
    })
}

/// Sends all of `bytes`, unless the drain timeout (`Err(None)`) or `--idle-timeout`
/// passes first or sending fails (`Err(Some(why))`); each write the kernel takes a byte
/// of restarts the idle clock, so a peer still taking its replies is not idle.
async fn send_all(task: &mut impl TaskWaits, bytes: &[u8]) -> Result<(), Option<CloseReason>> {
    let mut rest = bytes;
    while !rest.is_empty() {
        let written = match task.send_some(rest).await {
            Sent::Wrote(written) => written,
            Sent::Cut => return Err(None),
            // A send buffer the peer drains slowly may not turn writable for longer than
            // the timeout (a Unix socket signals it only once three quarters are free): a
            // peer whose replies the kernel still takes now is not idle.
            Sent::Idle => match task.send_now(rest) {
                Ok(written) if written > 0 => Ok(written),
                _ => return Err(Some(idle(task))),
            },
        };
        match written {
            Ok(0) => return Err(Some(CloseReason::Failed(io::ErrorKind::WriteZero.into()))),
            Ok(written) => rest = &rest[written..],
            Err(e) => return Err(Some(CloseReason::Failed(e))),
        }
        task.restart_idle();
    }
    Ok(())
}

/// Why a connection that sent nothing for `--idle-timeout` closes.
fn idle(task: &impl TaskWaits) -> CloseReason {
    CloseReason::Idle(task.state().limits.idle_timeout.unwrap_or_default())
}

/// Ends a connection for `reason`, and logs it: the one close of the models whose runtime
/// (the task models) or ring (`uring`) keeps the socket `fd` in a type of its own and
/// closes it later. A peer that half-closed reads EOF after the last reply; one the server
/// ends first gets (with TLS, `close_notify` and then) a lingering close on a duplicate of
/// `fd`, which takes `place`, the connection's place under `--max-conns`, with it. What is
/// owed is offered once before that, unless `is_sending`: a send of it still in flight
/// elsewhere (io_uring's) would then be sent twice.
pub fn close_served(
    fd: BorrowedFd<'_>,
    connection: &mut Connection,
    reason: CloseReason,
    log: &LoopLog,
    place: Admission,
    is_sending: bool,
) {
    match reason.ending() {
        // The peer may be gone already; closing is all that is left either way.
        Ending::Eof => drop(socket2::SockRef::from(&fd).shutdown(std::net::Shutdown::Write)),
        Ending::Lingering => match Stream::duplicate(fd) {
            Ok(stream) => {
                if !connection.is_finished() && !is_sending {
                    // An idle timeout or a drain cut: with TLS, close_notify goes out first.
                    connection.close_first(&stream, log);
                }
                linger::hand_off(stream, Some(place));
            }
            Err(e) => tracing::debug!("closing without lingering: cannot duplicate it: {e}"),
        },
        Ending::Refused | Ending::Abort => {}
    }
    log.closed(connection.peer(), connection.transport(), &reason);
}

/// How a model's runtime lets a listener's or datagram socket's task wait: the one thing
/// the task models differ in there. Implemented once per model, so these futures need no
/// `Send` bound here.
#[allow(async_fn_in_trait)]
pub trait SocketWaits {
    /// Waits until the non-blocking socket may be readable, then runs `take` (with the
    /// loop's log) to take what is queued; when `take` says it emptied the queue, forgets
    /// the readiness, so the next wait is for a new edge. Readiness is cached, so `take`
    /// may find nothing. `None` once shutdown began, before or instead of `take`.
    async fn when_readable(
        &self,
        take: impl FnMut(&LoopLog) -> io::Result<bool>,
    ) -> Option<io::Result<()>>;

    /// Waits [`ACCEPT_PAUSE`](super::ACCEPT_PAUSE); `false` when shutdown began first.
    async fn pause(&self) -> bool;
}

/// Accepts connections on `listener` until shutdown began, admitting each under `counter`
/// and handing it to `adopt` (which spawns its task), pausing after running out of
/// descriptors.
///
/// # Errors
///
/// The listener is broken, or waiting for it failed.
pub async fn accept_connections(
    listener: &StreamListener,
    counter: &ConnectionCounter,
    waits: &impl SocketWaits,
    mut adopt: impl FnMut(Stream, Peer, Admission, &LoopLog),
) -> io::Result<()> {
    loop {
        let mut is_paused = false;
        let accept = |log: &LoopLog| match accept_and_admit(listener, counter, log)? {
            Accepted::Connection(stream, peer, admission) => {
                adopt(stream, peer, admission, log);
                Ok(false)
            }
            Accepted::Again => Ok(false),
            Accepted::Empty => Ok(true),
            Accepted::Paused => {
                is_paused = true;
                Ok(false)
            }
        };
        match waits.when_readable(accept).await {
            Some(accepted) => accepted?,
            None => return Ok(()),
        }
        if is_paused && !waits.pause().await {
            return Ok(());
        }
    }
}

/// Answers datagrams on `socket` with `protocol` until shutdown began.
///
/// # Errors
///
/// A receive error that breaks the socket ([`DatagramReplier::answer_queued`]), or
/// waiting for it failed.
pub async fn answer_datagrams(
    socket: &DatagramSocket,
    protocol: &Protocol,
    waits: &impl SocketWaits,
) -> io::Result<()> {
    let mut replier = DatagramReplier::for_socket(protocol.clone(), socket);
    let mut buf = vec![0; socket.max_datagram_bytes()];
    let mut answer = |log: &_| replier.answer_queued(socket, &mut buf, DATAGRAM_BATCH, log);
    while let Some(answered) = waits.when_readable(&mut answer).await {
        answered?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ProtocolKind;
    use std::cell::{Cell, RefCell};
    use std::collections::VecDeque;
    use std::io::Read;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;
    use std::rc::Rc;
    use std::task::{Context, Waker};
    use std::time::Duration;

    const IDLE: Duration = Duration::from_secs(1);

    fn task_loop(kind: ProtocolKind) -> TaskLoop {
        let limits = Limits {
            max_buffer_bytes: 1024,
            idle_timeout: Some(IDLE),
            ..Limits::default()
        };
        TaskLoop {
            protocol: Protocol::new(kind, 1024),
            limits,
            counter: ConnectionCounter::new(None),
            draining: StopSignal::default(),
            cut: StopSignal::default(),
        }
    }

    /// A connection without layers on `socket`.
    fn connection(state: &TaskLoop, socket: &UnixStream) -> Connection {
        let peer = Peer::Ip("127.0.0.1:40000".parse().unwrap());
        Connection::new(&state.protocol, peer, &state.limits, socket.as_fd())
    }

    /// Runs a future that never waits (every wait of [`Scripted`] ends at once).
    fn run<T>(future: impl Future<Output = T>) -> T {
        let mut cx = Context::from_waker(Waker::noop());
        match pin!(future).poll(&mut cx) {
            Poll::Ready(output) => output,
            Poll::Pending => panic!("a scripted task waited"),
        }
    }

    /// A runtime whose waits end as scripted: a wait to send as `sends` says (the whole
    /// offer taken once it is empty), a send without waiting as `sends_now` says
    /// (`WouldBlock` once it is empty), and input is `inputs`, then EOF.
    struct Scripted {
        state: TaskLoop,
        sends: VecDeque<Sent>,
        sends_now: RefCell<VecDeque<io::Result<usize>>>,
        inputs: VecDeque<&'static [u8]>,
        sent: RefCell<Vec<u8>>,
    }

    impl Scripted {
        fn new(kind: ProtocolKind, inputs: Vec<&'static [u8]>) -> Scripted {
            Scripted {
                state: task_loop(kind),
                sends: VecDeque::new(),
                sends_now: RefCell::default(),
                inputs: inputs.into(),
                sent: RefCell::default(),
            }
        }

        fn take(&self, bytes: &[u8], taken: io::Result<usize>) -> io::Result<usize> {
            let taken = taken?.min(bytes.len());
            self.sent.borrow_mut().extend_from_slice(&bytes[..taken]);
            Ok(taken)
        }

        /// Serves one connection on a socket nobody reads, and says why it closed.
        fn converse(&mut self) -> CloseReason {
            let (socket, _peer) = UnixStream::pair().unwrap();
            let mut conn = connection(&self.state, &socket);
            run(converse(self, &mut conn))
        }
    }

    impl TaskWaits for Scripted {
        async fn send_some(&mut self, bytes: &[u8]) -> Sent {
            match self.sends.pop_front() {
                Some(Sent::Wrote(taken)) => Sent::Wrote(self.take(bytes, taken)),
                Some(other) => other,
                None => Sent::Wrote(self.take(bytes, Ok(bytes.len()))),
            }
        }

        fn send_now(&self, bytes: &[u8]) -> io::Result<usize> {
            let taken = self.sends_now.borrow_mut().pop_front();
            self.take(
                bytes,
                taken.unwrap_or(Err(io::ErrorKind::WouldBlock.into())),
            )
        }

        fn restart_idle(&mut self) {}

        async fn receive(&mut self, connection: &mut Connection) -> Woke {
            match self.inputs.pop_front() {
                Some(bytes) => connection.receive(bytes),
                None => connection.receive_eof(),
            }
            Woke::Received(Ok(Received {
                bytes: 1,
                is_full: false,
            }))
        }

        fn state(&self) -> &TaskLoop {
            &self.state
        }
    }

    #[test]
    fn every_reply_is_sent_however_the_kernel_takes_it() {
        let mut task = Scripted::new(ProtocolKind::Lines, vec![b"one\ntw", b"o\n"]);
        task.sends = [Sent::Wrote(Ok(1)), Sent::Wrote(Ok(2))].into();
        assert!(matches!(task.converse(), CloseReason::PeerEof));
        assert_eq!(*task.sent.borrow(), b"one\ntwo\n");
    }

    /// The idle timeout passing while a send waits is no close when the kernel takes some
    /// of it now (a Unix socket turns writable only once three quarters of its buffer are
    /// free, so the wait may outlast the timeout while the peer steadily reads).
    #[test]
    fn a_peer_still_taking_its_replies_is_not_idle() {
        let mut task = Scripted::new(ProtocolKind::Lines, vec![b"one\n", b"two\n"]);
        task.sends = [Sent::Wrote(Ok(2)), Sent::Idle].into();
        task.sends_now = RefCell::new([Ok(1)].into());
        let reason = task.converse();
        assert!(matches!(reason, CloseReason::PeerEof), "{reason:?}");
        assert_eq!(*task.sent.borrow(), b"one\ntwo\n");
    }

    #[test]
    fn a_peer_taking_nothing_when_the_idle_timeout_passes_is_idle() {
        for taken_now in [Err(io::ErrorKind::WouldBlock.into()), Ok(0)] {
            let mut task = Scripted::new(ProtocolKind::Lines, vec![b"one\n"]);
            task.sends = [Sent::Wrote(Ok(2)), Sent::Idle].into();
            task.sends_now = RefCell::new([taken_now].into());
            let reason = task.converse();
            assert!(matches!(reason, CloseReason::Idle(IDLE)), "{reason:?}");
            assert_eq!(*task.sent.borrow(), b"on");
        }
    }

    #[test]
    fn a_send_cut_by_the_drain_timeout_counts_what_was_owed() {
        let mut task = Scripted::new(ProtocolKind::Lines, vec![b"one\n"]);
        task.sends = [Sent::Wrote(Ok(1)), Sent::Cut].into();
        let reason = task.converse();
        assert!(
            matches!(reason, CloseReason::DrainTimeout { owed: 4 }),
            "{reason:?}"
        );
    }

    /// What the peer of a connection `close_served` ended reads, up to EOF.
    fn closed_with(reason: CloseReason, is_sending: bool) -> Vec<u8> {
        let state = task_loop(ProtocolKind::Lines);
        let (socket, mut peer) = UnixStream::pair().unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut conn = connection(&state, &socket);
        conn.receive(b"owed\n");
        let place = state.counter.admit().unwrap();
        close_served(
            socket.as_fd(),
            &mut conn,
            reason,
            &LoopLog::default(),
            place,
            is_sending,
        );
        let mut got = Vec::new();
        peer.read_to_end(&mut got)
            .expect("the peer reads EOF within 5 s");
        got
    }

    #[test]
    fn a_connection_the_server_ends_is_offered_what_it_owes_once() {
        assert_eq!(closed_with(CloseReason::Idle(IDLE), false), b"owed\n");
        assert_eq!(
            closed_with(CloseReason::DrainTimeout { owed: 5 }, false),
            b"owed\n"
        );
        assert_eq!(
            closed_with(CloseReason::Idle(IDLE), true),
            b"",
            "a send of it is in flight elsewhere: it would go twice"
        );
    }

    #[test]
    fn a_peer_that_half_closed_reads_eof() {
        let state = task_loop(ProtocolKind::Echo);
        let (socket, mut peer) = UnixStream::pair().unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut conn = connection(&state, &socket);
        conn.receive_eof();
        let place = state.counter.admit().unwrap();
        let log = LoopLog::default();
        close_served(
            socket.as_fd(),
            &mut conn,
            CloseReason::PeerEof,
            &log,
            place,
            false,
        );
        let mut got = Vec::new();
        peer.read_to_end(&mut got)
            .expect("the peer reads EOF within 5 s, though the socket is still open");
        assert_eq!(got, b"");
        assert_eq!(
            state.counter.open(),
            0,
            "its place under --max-conns is free"
        );
    }

    /// A runtime's view of a socket whose every read finds `found` (a flooding peer when
    /// full), until `reads` run out and the peer resets. Counts the reads of the poll
    /// under way.
    struct ScriptedPeer {
        state: TaskLoop,
        found: Received,
        reads: u32,
        reads_this_poll: Rc<Cell<u32>>,
    }

    impl TaskWaits for ScriptedPeer {
        async fn send_some(&mut self, bytes: &[u8]) -> Sent {
            Sent::Wrote(Ok(bytes.len()))
        }

        fn send_now(&self, bytes: &[u8]) -> io::Result<usize> {
            Ok(bytes.len())
        }

        fn restart_idle(&mut self) {}

        async fn receive(&mut self, _: &mut Connection) -> Woke {
            if self.reads == 0 {
                let reset = io::Error::from(io::ErrorKind::ConnectionReset);
                return Woke::Received(Err(CloseReason::Failed(reset)));
            }
            self.reads -= 1;
            self.reads_this_poll.set(self.reads_this_poll.get() + 1);
            Woke::Received(Ok(self.found))
        }

        fn state(&self) -> &TaskLoop {
            &self.state
        }
    }

    /// Runs `converse` over `reads` reads that each find `found`; returns the most reads
    /// one poll made.
    fn most_reads_in_one_poll(found: Received, reads: u32) -> u32 {
        let (socket, _other) = UnixStream::pair().unwrap();
        let reads_this_poll = Rc::new(Cell::new(0));
        let mut task = ScriptedPeer {
            state: task_loop(ProtocolKind::Echo),
            found,
            reads,
            reads_this_poll: reads_this_poll.clone(),
        };
        let mut conn = connection(&task.state, &socket);
        let mut conversing = pin!(converse(&mut task, &mut conn));
        let mut cx = Context::from_waker(Waker::noop());
        let mut most = 0;
        for _ in 0..=reads {
            reads_this_poll.set(0);
            let polled = conversing.as_mut().poll(&mut cx);
            most = most.max(reads_this_poll.get());
            if let Poll::Ready(reason) = polled {
                assert!(matches!(reason, CloseReason::Failed(_)), "{reason:?}");
                return most;
            }
        }
        panic!("{reads} reads took more than {} polls", reads + 1);
    }

    #[test]
    fn a_task_reads_one_full_buffer_per_poll() {
        let full = Received {
            bytes: 64,
            is_full: true,
        };
        assert_eq!(most_reads_in_one_poll(full, 20), 1);
    }

    #[test]
    fn a_task_whose_reads_drain_the_socket_does_not_yield() {
        // Each read ends at WouldBlock's edge: the next one waits anyway, no turn is owed.
        let drained = Received {
            bytes: 64,
            is_full: false,
        };
        assert_eq!(most_reads_in_one_poll(drained, 20), 20);
    }
}
