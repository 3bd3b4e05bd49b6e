//! The buffers of an async loop's thread, lent to one connection task at a time, so that a
//! waiting task holds none: 10,000 idle connections cost no read or output buffers.
//!
//! A task reads into the thread's one read buffer only once its socket is ready, and hands
//! the bytes to its `Connection` before it awaits again. The thread's spare output
//! allocation is lent to the connection producing replies and taken back once they are sent
//! (`Connection::lend_spare`, `return_spare`). A runtime that polls its sockets the way
//! tokio does (a reactor's readiness, `AsyncFd`) reads through [`poll_receive`].

use super::read_buffer::ReadBuffer;
use super::task::TaskLoop;
use super::{CloseReason, Connection, LoopLog, READ_BUFFER_BYTES};
use crate::sys::stream;
use std::cell::RefCell;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::task::{Context, Poll, ready};
use tokio::io::Interest;
use tokio::io::unix::{AsyncFd, AsyncFdReadyGuard};

thread_local! {
    static READ_BUFFER: RefCell<ReadBuffer> = RefCell::new(ReadBuffer::new(READ_BUFFER_BYTES));
    static SPARE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// One connection's socket as its task sees it: one non-blocking read or write at a time,
/// `WouldBlock` when the kernel has nothing (or no room) now.
pub trait SocketIo {
    /// Reads into `buf`; `Ok(0)` is EOF.
    ///
    /// # Errors
    ///
    /// `WouldBlock`, or the OS error of the read.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize>;

    /// Writes a prefix of `bytes`, as much as the kernel takes now; returns its length.
    ///
    /// # Errors
    ///
    /// `WouldBlock`, or the OS error of the write.
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize>;
}

/// Reads from `socket` into this thread's read buffer, cut to what `connection` may take
/// under its bound, and hands what came (bytes, counted in `log`, or EOF for `Ok(0)`) to
/// `connection`; an echo goes straight back from the read buffer when nothing is owed
/// (`Connection::receive_through`, counted as sent). Returns whether the read took all it
/// asked for ([`Received`]), or `None` when it would block (nothing is handed over).
///
/// # Errors
///
/// Why the connection must close: the read or a write-through failed. A handler panic is
/// no error here: the connection stops reading and finishes as usual.
pub fn receive_into(
    connection: &mut Connection,
    log: &LoopLog,
    socket: &mut impl SocketIo,
) -> Result<Option<Received>, CloseReason> {
    READ_BUFFER.with_borrow_mut(|buf| {
        let buf = buf.first_mut(READ_BUFFER_BYTES);
        let limit = connection.read_limit(buf.len());
        let result = socket.read(&mut buf[..limit]);
        let got = match &result {
            Ok(n) => *n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(_) => 0,
        };
        if !connection.may_write_through() {
            SPARE.with_borrow_mut(|spare| connection.lend_spare(spare));
        }
        let handed_over =
            connection.on_read_through(result, buf, log, |bytes| socket.write(bytes))?;
        let received = Received {
            bytes: got,
            is_full: got > 0 && got == limit,
        };
        Ok(handed_over.then_some(received))
    })
}

/// What one read of a connection's socket found, for its task's turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// How many bytes came; 0 is EOF.
    pub bytes: usize,
    /// Whether the read took as many bytes as it asked for, so more may be queued. Reading
    /// on in the same poll would serve this peer ahead of every other connection of the
    /// loop ([`converse`](super::task::converse) lets the others go first). Fewer bytes, or
    /// EOF: the kernel had nothing more queued.
    pub is_full: bool,
}
/// `connection` sent everything it owed: its output allocation goes back to the thread.
pub fn return_spare(connection: &mut Connection) {
    SPARE.with_borrow_mut(|spare| connection.return_spare(spare));
}

/// Waits until tokio's reactor says `socket` may be readable, then reads it once into this
/// thread's read buffer and hands the bytes to `connection` ([`receive_into`], with the
/// log of `state`'s loop); `Pending` until a read finds something. Readiness comes
/// first, so a task polled with nothing queued (once per message) touches neither the
/// read buffer nor the log. The socket is read and written with the crate's own
/// `recvfrom` and `sendto` (`sys::stream`), and tokio's readiness kept as its own streams
/// keep it: a read the kernel cut short, or one that would block, clears it, so the next
/// one waits for an edge (the reactor is edge-triggered) instead of failing with `EAGAIN`.
/// A short read proves nothing where reads stop short (`reads_may_stop_short`,
/// [`Stream::reads_may_stop_short`](crate::net::Stream::reads_may_stop_short)) or after
/// urgent data, where only a read that would block clears it.
/// An echo written straight back from the read buffer is one `sendto`, without waiting for
/// write readiness: a full send buffer leaves the rest owed, and waiting to send it finds
/// out.
///
/// # Errors
///
/// As [`receive_into`]: why the connection must close; or the reactor failed.
pub fn poll_receive(
    cx: &mut Context<'_>,
    socket: &AsyncFd<OwnedFd>,
    reads_may_stop_short: bool,
    connection: &mut Connection,
    state: &TaskLoop,
) -> Poll<Result<Received, CloseReason>> {
    loop {
        let mut readiness = match ready!(socket.poll_read_ready(cx)) {
            Ok(readiness) => readiness,
            Err(e) => return Poll::Ready(Err(CloseReason::Failed(e))),
        };
        let socket = &mut Ready {
            guard: &mut readiness,
            reads_may_stop_short,
        };
        let received = state.with_log(|log| receive_into(connection, log, socket));
        // `None`: the read would have blocked, and readiness is cleared: poll it again, to
        // wait for the next edge.
        if let Some(received) = received.transpose() {
            return Poll::Ready(received);
        }
    }
}

/// A socket tokio's reactor said may be readable, registered with
/// `Interest::PRIORITY` as well (`EPOLLPRI`: urgent data is queued).
struct Ready<'a, 'b> {
    guard: &'a mut AsyncFdReadyGuard<'b, OwnedFd>,
    /// A short read proves nothing ([`Stream::reads_may_stop_short`](crate::net::Stream::reads_may_stop_short)).
    reads_may_stop_short: bool,
}

impl Ready<'_, '_> {
    /// Whether urgent data was reported since a read last found nothing: a TCP read stops
    /// at the urgent mark (tcp(7)), so until then only a read that would block proves the
    /// queue empty.
    fn has_urgent(&self) -> bool {
        self.guard
            .get_ref()
            .try_io(Interest::PRIORITY, |_| Ok(()))
            .is_ok()
    }

    /// The kernel said `WouldBlock`: forget readable, and urgent data with it (the read
    /// passed the mark), so both wait for their next edge.
    fn clear_all(&mut self) {
        self.guard.clear_ready();
        let would_block = || Err::<(), _>(io::Error::from(io::ErrorKind::WouldBlock));
        drop(
            self.guard
                .get_ref()
                .try_io(Interest::PRIORITY, |_| would_block()),
        );
    }
}

impl SocketIo for Ready<'_, '_> {
    #[inline]
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let read = stream::recv(self.guard.get_inner().as_fd(), buf);
        match &read {
            // A short TCP read took all the socket held (tcp_recvmsg copies until the
            // queue is empty), unless it stopped at an urgent mark.
            Ok(n)
                if 0 < *n && *n < buf.len() && !self.reads_may_stop_short && !self.has_urgent() =>
            {
                self.guard.clear_ready();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.clear_all(),
            _ => {}
        }
        read
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        stream::send(self.guard.get_inner().as_fd(), bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::Peer;
    use crate::protocol::{Protocol, ProtocolKind};
    use crate::server::ConnectionCounter;
    use crate::server::Limits;
    use crate::server::stop_signal::StopSignal;
    use std::collections::VecDeque;
    use std::future::poll_fn;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::task::Waker;
    use std::time::Duration;

    /// A connection without layers: its socket is never touched, so any descriptor does.
    fn connection(kind: ProtocolKind) -> Connection {
        let (socket, _peer) = UnixStream::pair().unwrap();
        let limits = Limits {
            max_buffer_bytes: 1024,
            ..Limits::default()
        };
        let peer = Peer::Ip("127.0.0.1:40000".parse().unwrap());
        Connection::new(&Protocol::new(kind, 1024), peer, &limits, socket.as_fd())
    }

    /// A socket whose reads return what is queued (`WouldBlock` once nothing is) and
    /// whose writes take up to `room` bytes.
    #[derive(Default)]
    struct Scripted {
        reads: VecDeque<io::Result<Vec<u8>>>,
        room: usize,
        written: Vec<u8>,
    }

    impl SocketIo for Scripted {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let Some(read) = self.reads.pop_front() else {
                return Err(io::ErrorKind::WouldBlock.into());
            };
            let bytes = read?;
            assert!(bytes.len() <= buf.len(), "a read past the buffer");
            buf[..bytes.len()].copy_from_slice(&bytes);
            Ok(bytes.len())
        }

        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            let taken = bytes.len().min(self.room);
            if taken == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.room -= taken;
            self.written.extend_from_slice(&bytes[..taken]);
            Ok(taken)
        }
    }

    fn reading(reads: Vec<io::Result<Vec<u8>>>, room: usize) -> Scripted {
        Scripted {
            reads: reads.into(),
            room,
            ..Scripted::default()
        }
    }

    /// What [`receive_into`] returned, when the connection goes on.
    fn received(conn: &mut Connection, log: &LoopLog, socket: &mut Scripted) -> Option<usize> {
        let received = receive_into(conn, log, socket).unwrap_or_else(|e| panic!("closing: {e:?}"));
        received.map(|received| received.bytes)
    }

    fn spare_capacity() -> usize {
        SPARE.with_borrow(Vec::capacity)
    }

    #[test]
    fn what_is_read_is_handed_over_and_counted() {
        let log = LoopLog::default();
        let mut conn = connection(ProtocolKind::Lines);
        let mut socket = reading(vec![Ok(b"one\ntw".to_vec())], 0);
        assert_eq!(received(&mut conn, &log, &mut socket), Some(6));
        assert_eq!(conn.unsent(), b"one\n");
        assert_eq!(
            received(&mut conn, &log, &mut socket),
            None,
            "nothing queued: the read would block"
        );
        assert_eq!(conn.unsent(), b"one\n", "and nothing was handed over");
    }

    #[test]
    fn an_echo_goes_straight_back_when_nothing_is_owed() {
        let log = LoopLog::default();
        let mut conn = connection(ProtocolKind::Echo);
        let mut socket = reading(vec![Ok(b"hello".to_vec()), Ok(b"world".to_vec())], 7);
        assert_eq!(received(&mut conn, &log, &mut socket), Some(5));
        assert_eq!(socket.written, b"hello", "written from the read buffer");
        assert_eq!(conn.owed(), 0);
        assert_eq!(received(&mut conn, &log, &mut socket), Some(5));
        assert_eq!(socket.written, b"hellowo", "the kernel took two bytes");
        assert_eq!(conn.unsent(), b"rld", "the rest is owed");
    }

    #[test]
    fn a_failed_read_closes_and_eof_is_handed_over() {
        let log = LoopLog::default();
        let mut conn = connection(ProtocolKind::Echo);
        let mut socket = reading(vec![Err(io::ErrorKind::ConnectionReset.into())], 0);
        match receive_into(&mut conn, &log, &mut socket) {
            Err(CloseReason::Failed(e)) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
            other => panic!("a reset peer must close its connection, got {other:?}"),
        }
        let mut conn = connection(ProtocolKind::Echo);
        let mut socket = reading(vec![Ok(Vec::new())], 0);
        assert_eq!(received(&mut conn, &log, &mut socket), Some(0));
        assert!(conn.is_finished(), "EOF with nothing owed: finished");
    }

    /// A read that took all it asked for may have left more queued, so the task lets the
    /// others go first; a short read or EOF found the queue empty, so it need not.
    #[test]
    fn a_read_is_full_when_it_took_all_it_asked_for() {
        let log = LoopLog::default();
        let full = |conn: &mut Connection, socket: &mut Scripted| {
            let received = receive_into(conn, &log, socket).expect("no close");
            received.expect("handed over").is_full
        };
        let mut conn = connection(ProtocolKind::Lines);
        let limit = conn.read_limit(READ_BUFFER_BYTES);
        assert!(limit > 1);
        let mut socket = reading(vec![Ok(vec![b'\n'; limit]), Ok(vec![b'\n'; 1])], 0);
        assert!(full(&mut conn, &mut socket), "{limit} bytes of {limit}");
        conn.advance(conn.owed());
        assert!(!full(&mut conn, &mut socket), "a short read");
        let mut socket = reading(vec![Ok(Vec::new())], 0);
        assert!(!full(&mut conn, &mut socket), "EOF");
        // A connection that reads nothing more asks for 0 bytes and gets 0: not full either.
        let mut conn = connection(ProtocolKind::Lines);
        conn.stop_reading();
        assert_eq!(conn.read_limit(READ_BUFFER_BYTES), 0);
        let mut socket = reading(vec![Ok(Vec::new())], 0);
        assert!(!full(&mut conn, &mut socket), "0 bytes of 0");
    }

    #[test]
    fn a_connection_producing_replies_borrows_the_threads_spare_until_it_sent_them() {
        SPARE.set(Vec::with_capacity(512));
        let log = LoopLog::default();
        let mut conn = connection(ProtocolKind::Lines);
        let mut socket = reading(vec![Ok(b"a line\n".to_vec())], 0);
        assert_eq!(received(&mut conn, &log, &mut socket), Some(7));
        assert_eq!(
            spare_capacity(),
            0,
            "the reply went into the thread's allocation"
        );
        return_spare(&mut conn);
        assert_eq!(spare_capacity(), 0, "still owed: kept");
        conn.advance(conn.owed());
        return_spare(&mut conn);
        assert!(
            spare_capacity() >= 512,
            "everything sent: the allocation is the thread's again, so an idle connection \
             holds none"
        );
    }

    /// A task waiting for input holds no buffer of the thread's: a read that would block
    /// lends it nothing.
    #[test]
    fn a_read_that_would_block_lends_nothing() {
        SPARE.set(Vec::with_capacity(512));
        let log = LoopLog::default();
        let mut conn = connection(ProtocolKind::Lines);
        let mut socket = reading(Vec::new(), 0);
        assert_eq!(received(&mut conn, &log, &mut socket), None);
        assert_eq!(spare_capacity(), 512, "the spare stays the thread's");
    }

    /// A socket watched by a runtime's reactor, with the loop state to read it with.
    fn watched_pair(runtime: &tokio::runtime::Runtime) -> (AsyncFd<OwnedFd>, UnixStream, TaskLoop) {
        let (socket, peer) = UnixStream::pair().unwrap();
        socket.set_nonblocking(true).unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _entered = runtime.enter();
        let interest = tokio::io::Interest::READABLE | tokio::io::Interest::WRITABLE;
        let socket = crate::sys::async_fd::watch(socket.into(), interest).unwrap();
        let state = TaskLoop {
            protocol: Protocol::new(ProtocolKind::Echo, 1024),
            limits: Limits::default(),
            counter: ConnectionCounter::new(None),
            draining: StopSignal::default(),
            cut: StopSignal::default(),
        };
        (socket, peer, state)
    }

    /// A current-thread runtime, a socket it watches, the peer's end, the loop state and a
    /// connection on the socket.
    fn watched_connection() -> (
        tokio::runtime::Runtime,
        AsyncFd<OwnedFd>,
        UnixStream,
        TaskLoop,
        Connection,
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (socket, peer, state) = watched_pair(&runtime);
        let peer_address = Peer::Ip("127.0.0.1:40000".parse().unwrap());
        let conn = Connection::new(&state.protocol, peer_address, &state.limits, socket.as_fd());
        (runtime, socket, peer, state, conn)
    }

    #[test]
    fn a_watched_socket_is_read_once_it_is_ready_and_pending_when_empty() {
        let (runtime, socket, mut peer, state, mut conn) = watched_connection();
        let receive = |conn: &mut Connection| {
            let polled = poll_fn(|cx| poll_receive(cx, &socket, true, conn, &state));
            let within = async { tokio::time::timeout(Duration::from_secs(5), polled).await };
            runtime.block_on(within).expect("input within 5 s")
        };
        let mut cx = Context::from_waker(Waker::noop());
        let polled = poll_receive(&mut cx, &socket, true, &mut conn, &state);
        assert!(
            matches!(polled, Poll::Pending),
            "nothing sent yet: {polled:?}"
        );
        peer.write_all(b"ping").unwrap();
        let received = receive(&mut conn);
        assert!(
            matches!(received, Ok(Received { bytes: 4, .. })),
            "{received:?}"
        );
        let mut echoed = [0; 4];
        peer.read_exact(&mut echoed).expect("the echo within 5 s");
        assert_eq!(&echoed, b"ping", "the echo went straight back");
        assert_eq!(conn.owed(), 0);
        let polled = poll_receive(&mut cx, &socket, true, &mut conn, &state);
        assert!(
            matches!(polled, Poll::Pending),
            "nothing to read: {polled:?}"
        );
        assert!(!conn.is_finished());
        peer.shutdown(std::net::Shutdown::Write).unwrap();
        let received = receive(&mut conn);
        assert!(
            matches!(received, Ok(Received { bytes: 0, .. })),
            "{received:?}"
        );
        assert!(conn.is_finished(), "an empty read is EOF");
    }

    /// Runs `test` on a thread of its own and fails if it has not ended within 10 s: a
    /// task that never yields (a read loop that spins) hangs its thread, not the suite.
    fn within_10_s(test: impl FnOnce() + Send + 'static) {
        let (done, finished) = std::sync::mpsc::channel();
        let runner = std::thread::spawn(move || {
            test();
            let _ = done.send(());
        });
        match finished.recv_timeout(Duration::from_secs(10)) {
            Ok(()) => runner.join().unwrap(),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                std::panic::resume_unwind(runner.join().unwrap_err())
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                panic!("still polling after 10 s: the read loop never gave up its turn")
            }
        }
    }

    /// `payload` bytes queued at once, then read by polling the watched socket until all of
    /// them came; the echo is read back whole. Returns the sizes of the reads. The pair is
    /// read with TCP's rule (`reads_may_stop_short` false): no descriptors pass, so a short read took all.
    fn read_all_queued(payload: usize) -> Vec<usize> {
        let (runtime, socket, mut peer, state, mut conn) = watched_connection();
        peer.set_write_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let sent: Vec<u8> = (0..payload).map(|i| (i % 251) as u8).collect();
        peer.write_all(&sent).expect("queued within 5 s");
        let mut reads = Vec::new();
        while reads.iter().sum::<usize>() < payload {
            let polled = poll_fn(|cx| poll_receive(cx, &socket, false, &mut conn, &state));
            let within = async { tokio::time::timeout(Duration::from_secs(5), polled).await };
            let received = runtime
                .block_on(within)
                .unwrap_or_else(|_| {
                    panic!("{reads:?} read of {payload} bytes, the rest not in 5 s")
                })
                .expect("the connection goes on");
            reads.push(received.bytes);
        }
        let mut echoed = vec![0; payload];
        peer.read_exact(&mut echoed).expect("the echo within 5 s");
        assert!(echoed == sent, "the echo is the input");
        reads
    }

    #[test]
    fn a_full_read_keeps_the_readiness_so_what_is_still_queued_is_read() {
        // One read takes at most the read buffer: the rest is queued, and no new edge will
        // come for it.
        within_10_s(|| {
            let reads = read_all_queued(READ_BUFFER_BYTES + 1000);
            assert_eq!(reads, [READ_BUFFER_BYTES, 1000]);
        });
    }

    #[test]
    fn a_read_that_would_block_clears_the_readiness_and_the_poll_is_pending() {
        // A full read drained the socket exactly: the next read would block, and the task
        // must wait for an edge instead of reading again and again.
        within_10_s(|| {
            let (runtime, socket, mut peer, state, mut conn) = watched_connection();
            peer.write_all(&vec![7; READ_BUFFER_BYTES]).unwrap();
            let polled = poll_fn(|cx| poll_receive(cx, &socket, false, &mut conn, &state));
            let within = async { tokio::time::timeout(Duration::from_secs(5), polled).await };
            let received = runtime.block_on(within).expect("input within 5 s");
            assert!(
                matches!(received, Ok(Received { is_full: true, .. })),
                "{received:?}"
            );
            let _entered = runtime.enter();
            let mut cx = Context::from_waker(Waker::noop());
            let polled = poll_receive(&mut cx, &socket, false, &mut conn, &state);
            assert!(
                matches!(polled, Poll::Pending),
                "nothing queued: {polled:?}"
            );
            let mut echoed = vec![0; READ_BUFFER_BYTES];
            peer.read_exact(&mut echoed).expect("the echo within 5 s");
        });
    }
}
