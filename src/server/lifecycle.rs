//! Where a connection's life is recorded and ended: every event of a loop passes through
//! its [`LoopLog`], and every connection the server ends goes through [`close`].
//!
//! One place for each, so that what must reach every model is written once: the log lines,
//! the per-loop counters, and the lingering close.

use super::{ACCEPT_PAUSE, Admission};
use crate::metrics::{self, Counters, DropReason, Metrics, Transport};
use crate::net::{DatagramSocket, Peer, Stream, StreamListener};
use std::cell::{Cell, OnceCell};
use std::io;
use std::time::{Duration, Instant};

/// Why the server ends a connection.
#[derive(Debug)]
pub enum CloseReason {
    /// The peer half-closed and every reply owed was sent: it reads EOF after the last.
    PeerEof,
    /// The protocol said goodbye (`until-quit`'s `quit`) and everything owed was sent.
    Quit,
    /// A layer refused the peer before the protocol began (a bad PROXY header, a failed
    /// TLS handshake, the setup deadline); what it owed (a TLS alert) was sent.
    Rejected,
    /// Shutdown: everything owed was sent before `--drain-timeout`.
    Drained,
    /// Nothing arrived for `--idle-timeout`.
    Idle(Duration),
    /// `--max-conns` connections were already open: refused, never admitted.
    OverLimit(usize),
    /// The protocol handler panicked (already logged with the panic message).
    HandlerPanicked,
    /// The drain timeout passed with `owed` bytes still unsent.
    DrainTimeout {
        /// Bytes the peer never got.
        owed: usize,
    },
    /// The model cannot watch this connection (select's `FD_SETSIZE`, a failed
    /// `epoll_ctl`, a failed switch to non-blocking mode).
    CannotWatch(String),
    /// A read or write failed: the peer reset or went away.
    Failed(io::Error),
}

impl CloseReason {
    /// Whether everything owed was sent, so the peer should read EOF after the last reply.
    pub fn is_finished(&self) -> bool {
        matches!(
            self,
            CloseReason::PeerEof
                | CloseReason::Quit
                | CloseReason::Rejected
                | CloseReason::Drained
                | CloseReason::HandlerPanicked
        )
    }

    /// The `reason` field of its log line: the label it is counted under, or `max_conns`
    /// for a connection refused by `--max-conns`.
    pub fn label(&self) -> &'static str {
        self.counted_as()
            .map_or("max_conns", metrics::CloseReason::label)
    }

    /// What closing for this reason does to the socket: every close the server starts
    /// before the peer's EOF is a lingering close, so the peer's unread bytes cannot turn
    /// it into a reset that destroys the replies still on their way.
    pub fn ending(&self) -> Ending {
        match self {
            CloseReason::PeerEof => Ending::Eof,
            CloseReason::Quit
            | CloseReason::Rejected
            | CloseReason::Drained
            | CloseReason::HandlerPanicked
            | CloseReason::Idle(_)
            | CloseReason::DrainTimeout { .. } => Ending::Lingering,
            CloseReason::OverLimit(_) => Ending::Refused,
            CloseReason::CannotWatch(_) | CloseReason::Failed(_) => Ending::Abort,
        }
    }

    /// The `reason` label it is counted under, or `None` for a connection never admitted.
    fn counted_as(&self) -> Option<metrics::CloseReason> {
        Some(match self {
            CloseReason::PeerEof => metrics::CloseReason::PeerEof,
            CloseReason::Quit => metrics::CloseReason::Quit,
            CloseReason::Rejected => metrics::CloseReason::Rejected,
            CloseReason::Drained => metrics::CloseReason::Drain,
            CloseReason::Idle(_) => metrics::CloseReason::IdleTimeout,
            CloseReason::OverLimit(_) => return None,
            CloseReason::HandlerPanicked => metrics::CloseReason::HandlerPanic,
            CloseReason::DrainTimeout { .. } => metrics::CloseReason::DrainCut,
            CloseReason::CannotWatch(_) => metrics::CloseReason::Error,
            CloseReason::Failed(e) => match e.kind() {
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => {
                    metrics::CloseReason::Reset
                }
                _ => metrics::CloseReason::Error,
            },
        })
    }
}

/// Why a datagram got no answer.
#[derive(Debug)]
pub enum DatagramDrop<'a> {
    /// Its source may be spoofed to turn the server into a reflector.
    ReflectionGuard,
    /// The protocol handler panicked (already logged).
    HandlerPanicked,
    /// It was longer than the socket's receive buffer, so it was read truncated.
    TooLarge {
        /// Its real length in bytes.
        len: usize,
        /// The longest datagram the socket answers, in bytes.
        max: usize,
    },
    /// `sendto` failed.
    SendFailed(&'a io::Error),
}

/// At most one line per interval tells of an event of one kind that can repeat without
/// end, per loop, however often it happens: datagrams dropped (a peer that never reads its
/// replies, or one that sends datagrams too large) and accept pauses (the process out of
/// descriptors) must not flood the log, nor slow the loop with logging.
pub const REPEATED_LINE_INTERVAL: Duration = Duration::from_secs(1);

/// Rate limit of one kind of line: events since the last line, and when it was.
#[derive(Clone, Copy, Debug, Default)]
struct RepeatedLines {
    unlogged: u64,
    last_line: Option<Instant>,
}

impl RepeatedLines {
    /// Counts one event; returns how many events the line due now tells of, or `None`
    /// when a line was written less than [`REPEATED_LINE_INTERVAL`] ago.
    fn count(cell: &Cell<RepeatedLines>) -> Option<u64> {
        let mut lines = cell.get();
        lines.unlogged += 1;
        let now = Instant::now();
        let is_due = lines
            .last_line
            .is_none_or(|at| now.duration_since(at) >= REPEATED_LINE_INTERVAL);
        let told = is_due.then_some(lines.unlogged);
        if is_due {
            lines = RepeatedLines {
                unlogged: 0,
                last_line: Some(now),
            };
        }
        cell.set(lines);
        told
    }
}

/// The one place every connection event of one loop (or thread, or forked child) passes:
/// accepted, refused, closed with its reason, bytes in and out, datagrams answered and
/// dropped, accepts paused. It writes the log lines (with the fields `peer`, `listener` and
/// `reason`, never folded into the message) and this loop's counters (`--metrics`), of
/// which it is the only writer.
#[derive(Debug)]
pub struct LoopLog {
    counters: Counters,
    /// Replies dropped because `sendto` failed, told of at most once an interval.
    dropped_replies: Cell<RepeatedLines>,
    /// Datagrams dropped as too large, told of at most once an interval.
    too_large: Cell<RepeatedLines>,
    /// Accept pauses for want of descriptors, told of at most once an interval.
    accept_pauses: Cell<RepeatedLines>,
}

impl Default for LoopLog {
    /// A log that counts nothing.
    fn default() -> Self {
        LoopLog::new(Metrics::disabled())
    }
}

thread_local! {
    /// The log of the loop running on this thread, for runtimes whose tasks cannot borrow
    /// one (tokio's tasks must be `Send`).
    static THREAD_LOG: OnceCell<LoopLog> = const { OnceCell::new() };
}

impl LoopLog {
    /// A log counting into a slot of its own in `metrics`; the slot's counts are kept
    /// when the log is dropped.
    pub fn new(metrics: Metrics) -> Self {
        LoopLog {
            counters: metrics.counters(),
            dropped_replies: Cell::default(),
            too_large: Cell::default(),
            accept_pauses: Cell::default(),
        }
    }

    /// Runs `f` with this thread's own log, made on first use and counting into
    /// `metrics`; its counts are kept when the thread ends. For a loop whose tasks run on
    /// its one thread but cannot hold a reference to a log (tokio's must be `Send`).
    pub fn with_thread_log<R>(metrics: Metrics, f: impl FnOnce(&LoopLog) -> R) -> R {
        THREAD_LOG.with(|log| f(log.get_or_init(|| LoopLog::new(metrics))))
    }

    /// A connection from `peer` over `transport` was accepted on `listener` and admitted.
    pub fn accepted(&self, peer: &Peer, transport: Transport, listener: &str) {
        tracing::debug!(peer = %peer, listener, "accepted");
        self.counters.accepted(transport);
    }

    /// A connection over `transport` ended for `reason`.
    pub fn closed(&self, peer: &Peer, transport: Transport, reason: &CloseReason) {
        log_close(peer, reason);
        match reason.counted_as() {
            Some(counted) => self.counters.closed(transport, counted),
            None => self.counters.refused(transport),
        }
        if matches!(reason, CloseReason::HandlerPanicked) {
            self.counters.handler_panicked(transport);
        }
    }

    /// `bytes` arrived from a peer over `transport`.
    #[inline]
    pub fn received(&self, transport: Transport, bytes: usize) {
        self.counters.received(transport, bytes);
    }

    /// The kernel took `bytes` owed to a peer over `transport`.
    #[inline]
    pub fn sent(&self, transport: Transport, bytes: usize) {
        self.counters.sent(transport, bytes);
    }

    /// A datagram of `bytes` arrived over `transport`.
    #[inline]
    pub fn datagram_received(&self, transport: Transport, bytes: usize) {
        self.counters.datagram_received(transport, bytes);
    }

    /// The reply to a datagram from `peer` was offered to the kernel: `sent` is what
    /// `sendto` returned (a failure drops the reply).
    pub fn reply_sent(&self, peer: &Peer, transport: Transport, sent: &io::Result<usize>) {
        match sent {
            Ok(bytes) => self.counters.datagram_answered(transport, *bytes),
            Err(e) => self.dropped(peer, transport, &DatagramDrop::SendFailed(e)),
        }
    }

    /// A datagram from `peer` got no answer.
    ///
    /// Every model sends datagram replies without waiting (a full queue at one peer
    /// answers `EAGAIN` at once), so a peer that never reads loses its own replies and
    /// delays nobody; such drops, and datagrams too large, are logged at most once per
    /// second by each loop.
    pub fn dropped(&self, peer: &Peer, transport: Transport, reason: &DatagramDrop<'_>) {
        let counted = match reason {
            DatagramDrop::ReflectionGuard => DropReason::ReflectionGuard,
            DatagramDrop::HandlerPanicked => {
                self.counters.handler_panicked(transport);
                DropReason::HandlerPanic
            }
            DatagramDrop::TooLarge { .. } => DropReason::TooLarge,
            DatagramDrop::SendFailed(e) if e.kind() == io::ErrorKind::WouldBlock => {
                DropReason::PeerNotReading
            }
            DatagramDrop::SendFailed(_) => DropReason::Error,
        };
        self.counters.datagram_dropped(transport, counted);
        let label = counted.label();
        match reason {
            DatagramDrop::ReflectionGuard => {
                tracing::debug!(peer = %peer, reason = label, "dropping a datagram");
            }
            DatagramDrop::HandlerPanicked => {}
            DatagramDrop::TooLarge { len, max } => {
                if let Some(dropped) = RepeatedLines::count(&self.too_large) {
                    tracing::warn!(
                        peer = %peer,
                        reason = label,
                        "dropping a datagram of {len} bytes: over {max} bytes, the most this \
                         socket answers whole ({dropped} dropped since the last such line, \
                         logged at most once a second)"
                    );
                }
            }
            DatagramDrop::SendFailed(e) => {
                if let Some(dropped) = RepeatedLines::count(&self.dropped_replies) {
                    tracing::warn!(
                        peer = %peer,
                        reason = label,
                        "cannot answer a datagram: {e}; reply dropped ({dropped} dropped since \
                         the last such line, logged at most once a second)"
                    );
                }
            }
        }
    }

    /// Accepting on the listener named `listener`, of `transport`, failed for want of
    /// descriptors or memory; it pauses for [`ACCEPT_PAUSE`]. Told of at most once a
    /// `REPEATED_LINE_INTERVAL` by each loop: while descriptors stay short, a loop pauses
    /// again after every pause.
    pub fn accept_paused(&self, listener: &str, transport: Transport, error: &io::Error) {
        self.counters.accept_paused(transport);
        if let Some(pauses) = RepeatedLines::count(&self.accept_pauses) {
            tracing::warn!(
                listener,
                reason = "accept_paused",
                "accept failed: {error}; pausing accepts for {} ms ({} since the last such \
                 line, logged at most once a second)",
                ACCEPT_PAUSE.as_millis(),
                count_of(pauses, "pause")
            );
        }
    }
}

/// The line for a connection that ended for `reason` (nothing for an ordinary end).
pub(super) fn log_close(peer: &Peer, reason: &CloseReason) {
    let label = reason.label();
    match reason {
        CloseReason::PeerEof
        | CloseReason::Quit
        | CloseReason::Rejected
        | CloseReason::Drained
        | CloseReason::HandlerPanicked => {}
        CloseReason::Idle(timeout) => tracing::info!(
            peer = %peer,
            reason = label,
            "closing: idle for {:.1} s (--idle-timeout)",
            timeout.as_secs_f64()
        ),
        CloseReason::OverLimit(max_conns) => tracing::warn!(
            peer = %peer,
            reason = label,
            "refusing: already {} open (--max-conns)",
            count_of(*max_conns as u64, "connection")
        ),
        CloseReason::DrainTimeout { owed } => tracing::warn!(
            peer = %peer,
            reason = label,
            "closing: drain timeout with {owed} bytes still owed"
        ),
        CloseReason::CannotWatch(why) => {
            tracing::warn!(peer = %peer, reason = label, "closing: {why}");
        }
        CloseReason::Failed(e) => {
            tracing::debug!(peer = %peer, reason = label, "connection ended: {e}");
        }
    }
}

/// `1 connection`, `2 connections`: a count with its noun, for log lines.
fn count_of(count: impl Into<u64>, noun: &str) -> String {
    match count.into() {
        1 => format!("1 {noun}"),
        count => format!("{count} {noun}s"),
    }
}

/// Ends a connection: the one way the server closes one, whatever the model.
///
/// What the socket gets depends on the reason ([`CloseReason::ending`]): a peer that
/// half-closed reads EOF after the last reply; a connection the server ends first gets a
/// lingering close ([`super::linger`]), on the lingering thread, or on the calling thread
/// when `linger` says so; a broken one is just closed.
pub fn close(stream: Stream, peer: &Peer, reason: CloseReason, log: &LoopLog, linger: Linger<'_>) {
    log.closed(peer, stream_transport(&stream), &reason);
    end(stream, reason.ending(), linger);
}

/// Where a lingering close waits for the peer.
#[derive(Debug)]
pub enum Linger<'a> {
    /// On the lingering thread: the caller serves other connections (an event loop, an
    /// async task's runtime, a pooled worker, an accepting thread). The connection's place
    /// under `--max-conns`, if it was admitted, goes with the socket: it is released when
    /// the socket is finally closed, so lingering peers count against the limit.
    Elsewhere(Option<Admission>),
    /// On the calling thread, which serves nothing else (a thread or process per
    /// connection); `shutdown` and `drain_timeout` shorten it at exit.
    Here {
        /// The server's shutdown.
        shutdown: &'a super::Shutdown,
        /// `--drain-timeout`.
        drain_timeout: Duration,
    },
}

/// What closing does to the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The peer half-closed and has every reply: shut down our side, close.
    Eof,
    /// The server ends it first: shut down our side, read and discard until the peer's
    /// EOF (bounded), close.
    Lingering,
    /// Refused before it was served: shut down our side, discard what already arrived,
    /// close without waiting, so a refused peer holds no descriptor.
    Refused,
    /// Broken or never watched: close.
    Abort,
}

/// Does `ending` to `stream` (see [`close`]), for a model that logged the close itself.
pub fn end(stream: Stream, ending: Ending, linger: Linger<'_>) {
    match (ending, linger) {
        (Ending::Eof, _) => {
            // The peer may be gone already; closing is all that is left either way.
            let _ = stream.shutdown_write();
        }
        (Ending::Lingering, Linger::Elsewhere(place)) => super::linger::hand_off(stream, place),
        (
            Ending::Lingering,
            Linger::Here {
                shutdown,
                drain_timeout,
            },
        ) => super::linger::linger_here(&stream, shutdown, drain_timeout),
        (Ending::Refused, _) => super::linger::close_now(&stream),
        (Ending::Abort, _) => {}
    }
}

/// `tcp` or `unix`.
pub fn stream_transport(stream: &Stream) -> Transport {
    match stream {
        Stream::Tcp(_) => Transport::Tcp,
        Stream::Unix(_) => Transport::Unix,
    }
}

/// `tcp` or `unix`: what `listener` accepts.
pub fn listener_transport(listener: &StreamListener) -> Transport {
    if listener.is_tcp() {
        Transport::Tcp
    } else {
        Transport::Unix
    }
}

/// `udp` or `unix-dgram`.
pub fn datagram_transport(socket: &DatagramSocket) -> Transport {
    match socket {
        DatagramSocket::Udp(_) => Transport::Udp,
        DatagramSocket::Unix(_) => Transport::UnixDatagram,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::{UnixDatagram, UnixStream};

    fn failed(kind: io::ErrorKind) -> CloseReason {
        CloseReason::Failed(kind.into())
    }

    #[test]
    fn only_an_end_with_nothing_owed_counts_as_finished() {
        for reason in [
            CloseReason::PeerEof,
            CloseReason::Quit,
            CloseReason::Rejected,
            CloseReason::Drained,
            CloseReason::HandlerPanicked,
        ] {
            assert!(reason.is_finished(), "{reason:?}");
        }
        for reason in [
            CloseReason::Idle(Duration::from_secs(1)),
            CloseReason::OverLimit(1),
            CloseReason::DrainTimeout { owed: 1 },
            CloseReason::CannotWatch("fd 1024".into()),
            failed(io::ErrorKind::ConnectionReset),
        ] {
            assert!(!reason.is_finished(), "{reason:?}");
        }
    }

    #[test]
    fn each_reason_has_its_label() {
        let labels = [
            (CloseReason::PeerEof, "peer_eof"),
            (CloseReason::Quit, "quit"),
            (CloseReason::Rejected, "rejected"),
            (CloseReason::Drained, "drain"),
            (CloseReason::Idle(Duration::from_secs(1)), "idle_timeout"),
            (CloseReason::OverLimit(1), "max_conns"),
            (CloseReason::HandlerPanicked, "handler_panic"),
            (CloseReason::DrainTimeout { owed: 1 }, "drain_cut"),
            (CloseReason::CannotWatch("fd 1024".into()), "error"),
            (failed(io::ErrorKind::ConnectionReset), "reset"),
            (failed(io::ErrorKind::BrokenPipe), "reset"),
            (failed(io::ErrorKind::TimedOut), "error"),
        ];
        for (reason, label) in labels {
            assert_eq!(reason.label(), label, "{reason:?}");
        }
    }

    #[test]
    fn the_server_ending_first_lingers_and_a_broken_connection_is_just_closed() {
        let endings = [
            (CloseReason::PeerEof, Ending::Eof),
            (CloseReason::Quit, Ending::Lingering),
            (CloseReason::Idle(Duration::from_secs(1)), Ending::Lingering),
            (CloseReason::DrainTimeout { owed: 1 }, Ending::Lingering),
            (CloseReason::OverLimit(1), Ending::Refused),
            (CloseReason::CannotWatch("fd 1024".into()), Ending::Abort),
            (failed(io::ErrorKind::ConnectionReset), Ending::Abort),
        ];
        for (reason, ending) in endings {
            assert_eq!(reason.ending(), ending, "{reason:?}");
        }
    }

    #[test]
    fn drop_lines_tell_of_every_drop_at_most_once_an_interval() {
        let cell = Cell::new(RepeatedLines::default());
        assert_eq!(
            RepeatedLines::count(&cell),
            Some(1),
            "the first drop is told at once"
        );
        assert_eq!(RepeatedLines::count(&cell), None);
        assert_eq!(RepeatedLines::count(&cell), None);
        // An interval later, the next line tells of the drops since the last one.
        let lines = cell.get();
        let Some(earlier) = lines
            .last_line
            .and_then(|at| at.checked_sub(REPEATED_LINE_INTERVAL + Duration::from_millis(1)))
        else {
            return;
        };
        cell.set(RepeatedLines {
            last_line: Some(earlier),
            ..lines
        });
        assert_eq!(RepeatedLines::count(&cell), Some(3));
        assert_eq!(RepeatedLines::count(&cell), None);
    }

    #[test]
    fn counts_in_log_lines_agree_with_their_noun() {
        assert_eq!(count_of(1u64, "connection"), "1 connection");
        assert_eq!(count_of(2u64, "connection"), "2 connections");
        assert_eq!(count_of(0u64, "pause"), "0 pauses");
    }

    #[test]
    fn the_log_counts_accepted_closed_refused_and_bytes() {
        let metrics = Metrics::new().expect("metrics");
        let log = LoopLog::new(metrics);
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let peer = Peer::Unix(ours.local_addr().unwrap());
        log.accepted(&peer, Transport::Tcp, "127.0.0.1:7");
        log.accepted(&peer, Transport::Tcp, "127.0.0.1:7");
        log.received(Transport::Tcp, 5);
        log.sent(Transport::Tcp, 3);
        log.closed(&peer, Transport::Tcp, &CloseReason::PeerEof);
        log.closed(&peer, Transport::Tcp, &CloseReason::OverLimit(1));
        let totals = metrics.totals();
        assert_eq!(totals.accepted(Transport::Tcp), 2);
        assert_eq!(
            totals.closed(Transport::Tcp, metrics::CloseReason::PeerEof),
            1
        );
        assert_eq!(totals.refused(Transport::Tcp), 1);
        assert_eq!(totals.open(Transport::Tcp), 1);
        assert_eq!(totals.received_bytes(Transport::Tcp), 5);
        assert_eq!(totals.sent_bytes(Transport::Tcp), 3);
    }

    #[test]
    fn the_log_counts_datagram_bytes_in_and_out() {
        let metrics = Metrics::new().expect("metrics");
        let log = LoopLog::new(metrics);
        let peer = ip_peer();
        log.datagram_received(Transport::Udp, 5);
        log.reply_sent(&peer, Transport::Udp, &Ok(7));
        let would_block = io::Error::from(io::ErrorKind::WouldBlock);
        log.reply_sent(&peer, Transport::Udp, &Err(would_block));
        let totals = metrics.totals();
        assert_eq!(totals.received_bytes(Transport::Udp), 5);
        assert_eq!(
            totals.sent_bytes(Transport::Udp),
            7,
            "a dropped reply sent nothing"
        );
        assert_eq!(totals.received_bytes(Transport::Tcp), 0);
    }

    /// What `f` logs (every level), as the log's text lines.
    fn logged(f: impl FnOnce()) -> String {
        use std::sync::{Arc, Mutex};
        struct Lines(Arc<Mutex<Vec<u8>>>);
        impl io::Write for Lines {
            fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let text = Arc::new(Mutex::new(Vec::new()));
        let writer = Arc::clone(&text);
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || Lines(Arc::clone(&writer)))
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let text = text.lock().unwrap().clone();
        String::from_utf8(text).unwrap()
    }

    fn ip_peer() -> Peer {
        Peer::Ip("127.0.0.1:40000".parse().unwrap())
    }

    #[test]
    fn a_close_the_server_decides_is_logged_with_why() {
        let log = LoopLog::default();
        let line = |reason: CloseReason| logged(|| log.closed(&ip_peer(), Transport::Tcp, &reason));
        for ordinary in [
            CloseReason::PeerEof,
            CloseReason::Quit,
            CloseReason::Rejected,
            CloseReason::Drained,
            CloseReason::HandlerPanicked,
        ] {
            let text = line(ordinary);
            assert!(text.is_empty(), "{text}");
        }
        let expected = [
            (
                CloseReason::Idle(Duration::from_millis(1500)),
                "closing: idle for 1.5 s (--idle-timeout)",
                "idle_timeout",
            ),
            (
                CloseReason::OverLimit(3),
                "refusing: already 3 connections open (--max-conns)",
                "max_conns",
            ),
            (
                CloseReason::DrainTimeout { owed: 5 },
                "closing: drain timeout with 5 bytes still owed",
                "drain_cut",
            ),
            (
                CloseReason::CannotWatch("fd 1024 is past FD_SETSIZE".into()),
                "closing: fd 1024 is past FD_SETSIZE",
                "error",
            ),
            (
                failed(io::ErrorKind::ConnectionReset),
                "connection ended: ",
                "reset",
            ),
        ];
        for (reason, message, label) in expected {
            let text = line(reason);
            assert!(text.contains(message), "{text}");
            assert!(text.contains(&format!("reason=\"{label}\"")), "{text}");
            assert!(text.contains("127.0.0.1:40000"), "{text}");
            assert_eq!(text.lines().count(), 1, "{text}");
        }
    }

    #[test]
    fn an_accept_pause_is_logged_with_its_length() {
        let log = LoopLog::default();
        let error = io::Error::from_raw_os_error(libc::EMFILE);
        let text = logged(|| log.accept_paused("127.0.0.1:7", Transport::Tcp, &error));
        assert!(
            text.contains("accept failed: ") && text.contains("pausing accepts for 100 ms"),
            "{text}"
        );
        assert!(text.contains("reason=\"accept_paused\""), "{text}");
    }

    #[test]
    fn dropped_datagrams_are_logged_with_their_reason_at_most_once_a_second() {
        let log = LoopLog::default();
        let peer = ip_peer();
        let text = logged(|| {
            for _ in 0..3 {
                log.dropped(
                    &peer,
                    Transport::Udp,
                    &DatagramDrop::TooLarge {
                        len: 70000,
                        max: 65507,
                    },
                );
            }
        });
        assert!(
            text.contains("dropping a datagram of 70000 bytes: over 65507 bytes"),
            "{text}"
        );
        assert!(text.contains("reason=\"too_large\""), "{text}");
        assert_eq!(text.lines().count(), 1, "one line a second: {text}");
        let would_block = io::Error::from(io::ErrorKind::WouldBlock);
        let text = logged(|| {
            log.reply_sent(&peer, Transport::Udp, &Err(would_block));
        });
        assert!(text.contains("cannot answer a datagram: "), "{text}");
        assert!(
            text.contains("reason=\"peer_not_reading\""),
            "a full queue at the peer: {text}"
        );
        let unreachable = io::Error::from(io::ErrorKind::HostUnreachable);
        let log = LoopLog::default();
        let text = logged(|| {
            log.dropped(
                &peer,
                Transport::Udp,
                &DatagramDrop::SendFailed(&unreachable),
            );
        });
        assert!(
            text.contains("reason=\"error\""),
            "any other failure: {text}"
        );
        let text = logged(|| log.reply_sent(&peer, Transport::Udp, &Ok(5)));
        assert!(text.is_empty(), "a reply sent is no news: {text}");
        let text = logged(|| {
            log.dropped(&peer, Transport::Udp, &DatagramDrop::ReflectionGuard);
        });
        assert!(text.contains("reason=\"reflection_guard\""), "{text}");
    }

    #[test]
    fn transports_are_named_by_the_socket() {
        let (stream, _other) = UnixStream::pair().unwrap();
        assert_eq!(stream_transport(&Stream::Unix(stream)), Transport::Unix);
        let tcp = StreamListener::bind_tcp("127.0.0.1:0".parse().unwrap(), false).unwrap();
        assert_eq!(listener_transport(&tcp), Transport::Tcp);
        let (datagram, _other) = UnixDatagram::pair().unwrap();
        let unix = DatagramSocket::Unix(datagram);
        assert_eq!(datagram_transport(&unix), Transport::UnixDatagram);
    }
}
