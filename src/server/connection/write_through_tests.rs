//! The connection core without a socket: reads in any split, writes that take any short
//! count or nothing, against what the protocol owes for the whole input at once.

use super::*;
use crate::protocol::ProtocolKind;
use proptest::prelude::*;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;

/// A peer's socket as the kernel would treat it: each write takes the next count of its
/// script (`None`: `WouldBlock`; a count larger than offered takes everything), then
/// everything once the script is used up.
struct Sink {
    taken: Vec<u8>,
    script: Vec<Option<usize>>,
    next: usize,
    /// The most bytes the peer is owed: a connection that offers the same bytes twice
    /// (never advancing past what was taken) fails at once instead of writing forever.
    owed: usize,
}

impl Sink {
    fn new(script: Vec<Option<usize>>) -> Self {
        Sink {
            taken: Vec::new(),
            script,
            next: 0,
            owed: usize::MAX,
        }
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        // A send of nothing is a wasted system call; a loop that keeps writing after the
        // input is gone (or never counts what was taken) must fail, not hang.
        assert!(!bytes.is_empty(), "offered a write of nothing");
        assert!(self.next < 100_000, "still writing after 100000 writes");
        let step = self.script.get(self.next).copied();
        self.next += 1;
        let count = match step {
            Some(None) => return Err(io::ErrorKind::WouldBlock.into()),
            Some(Some(count)) => count.min(bytes.len()),
            None => bytes.len(),
        };
        assert!(
            self.taken.len() + count <= self.owed,
            "the peer got more than the {} bytes it is owed",
            self.owed
        );
        self.taken.extend_from_slice(&bytes[..count]);
        Ok(count)
    }
}

fn connection(protocol: &Protocol, max_buffer_bytes: usize) -> Connection {
    let (socket, _) = UnixStream::pair().expect("a socket pair");
    let limits = Limits {
        max_buffer_bytes,
        ..Limits::default()
    };
    let peer = Peer::Ip("127.0.0.1:9".parse().expect("an address"));
    Connection::new(protocol, peer, &limits, socket.as_fd())
}

/// What the protocol owes for `input` arriving in one piece, then EOF.
fn owed_for_whole(protocol: &Protocol, input: &[u8]) -> Vec<u8> {
    let mut session = protocol.new_session();
    let mut out = WriteBuffer::new(usize::MAX);
    session.on_connect(&mut out);
    let _ = session.on_data(input, &mut out);
    session.on_eof(&mut out);
    out.unsent().to_vec()
}

/// Feeds `input` in reads of the sizes `splits` gives (cut to what the connection may
/// take), writing through `sink` after every read and flushing when `flushes` says so;
/// then EOF, and flushes until finished. Returns what the peer received.
fn run(
    protocol: &Protocol,
    max_buffer_bytes: usize,
    input: &[u8],
    splits: &[usize],
    flushes: &[bool],
    script: Vec<Option<usize>>,
) -> Vec<u8> {
    let log = LoopLog::default();
    let mut connection = connection(protocol, max_buffer_bytes);
    let mut sink = Sink::new(script);
    sink.owed = owed_for_whole(protocol, input).len();
    let mut offset = 0;
    let mut step = 0;
    // Turns in a row in which backpressure let nothing be read: a flush that can never
    // make room again must fail the test, not hang it.
    let mut blocked_turns = 0;
    while offset < input.len() {
        let limit = connection.read_limit(64 * 1024);
        if limit == 0 {
            blocked_turns += 1;
            assert!(
                blocked_turns <= 100,
                "no room to read after 100 flushes: {} bytes owed, wants_write {}",
                connection.owed(),
                connection.wants_write()
            );
            // Backpressure: the peer must take replies before it is read again.
            connection
                .flush_with(|bytes| sink.write(bytes), &log)
                .expect("the sink never fails");
            continue;
        }
        blocked_turns = 0;
        let split = splits[step % splits.len()].max(1);
        if step % 2 == 0 && connection.may_write_through() {
            // Every other read takes the readiness loops' path for a connection owing
            // nothing; the read gets what the bound lets it ask for, as a socket would.
            let mut buf = vec![0u8; 64 * 1024];
            let rest = &input[offset..];
            let mut n = 0;
            let read = |buf: &mut [u8]| {
                n = split.min(buf.len()).min(rest.len());
                buf[..n].copy_from_slice(&rest[..n]);
                Ok(n)
            };
            let (outcome, is_unchanged) = connection
                .read_through_with(read, |bytes| sink.write(bytes), || false, &mut buf, &log)
                .expect("the sink never fails");
            assert!(outcome.has_arrived);
            // Unchanged means still reading and owing nothing: the loop asks nothing more.
            assert_eq!(is_unchanged, connection.may_write_through());
            assert_eq!(is_unchanged, connection.owed() == 0);
            offset += n;
        } else {
            let n = split.min(limit).min(input.len() - offset);
            let chunk = &input[offset..offset + n];
            connection
                .on_read_through(Ok(n), chunk, &log, |bytes| sink.write(bytes))
                .expect("the sink never fails");
            offset += n;
        }
        // Echo owes at most the bound; `lines` may pass it by a prefixed piece of a line
        // (the hold limit's answer), which write-through does not touch.
        let bound = match connection.session.echoes_input() {
            true => max_buffer_bytes,
            false => 2 * max_buffer_bytes,
        };
        assert!(
            connection.owed() <= bound,
            "{} bytes owed past {bound}",
            connection.owed()
        );
        if flushes[step % flushes.len()] {
            connection
                .flush_with(|bytes| sink.write(bytes), &log)
                .expect("the sink never fails");
        }
        step += 1;
    }
    connection
        .on_read(Ok(0), &[], &log)
        .expect("EOF is handled");
    for _ in 0..10_000 {
        if connection.is_finished() {
            break;
        }
        connection
            .flush_with(|bytes| sink.write(bytes), &log)
            .expect("the sink never fails");
    }
    assert!(connection.is_finished(), "owed bytes never drained");
    sink.taken
}

fn write_step() -> impl Strategy<Value = Option<usize>> {
    prop_oneof![Just(None), (0usize..3000).prop_map(Some)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Echo writes through when nothing is owed; whatever the reads' split and the
    /// kernel's short writes, the peer gets every byte once, in order, and the owed bytes
    /// stay within the bound.
    #[test]
    fn echo_with_write_through_keeps_order_and_bound(
        input in proptest::collection::vec(any::<u8>(), 0..20_000),
        splits in proptest::collection::vec(1usize..5000, 1..8),
        flushes in proptest::collection::vec(any::<bool>(), 1..8),
        script in proptest::collection::vec(write_step(), 0..64),
        max_buffer_bytes in 1usize..8192,
    ) {
        let protocol = Protocol::new(ProtocolKind::Echo, max_buffer_bytes);
        let got = run(&protocol, max_buffer_bytes, &input, &splits, &flushes, script);
        prop_assert_eq!(got, input);
    }

    /// The same with a greeting owed first: it goes out before any echoed byte.
    #[test]
    fn echo_after_a_greeting_keeps_order(
        input in proptest::collection::vec(any::<u8>(), 0..5000),
        splits in proptest::collection::vec(1usize..2000, 1..8),
        flushes in proptest::collection::vec(any::<bool>(), 1..8),
        script in proptest::collection::vec(write_step(), 0..64),
    ) {
        let protocol = Protocol::new(ProtocolKind::Echo, 4096).with_greeting(b"hello\n");
        let got = run(&protocol, 4096, &input, &splits, &flushes, script);
        prop_assert_eq!(got, owed_for_whole(&protocol, &input));
    }

}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// `lines` replies differ from the input: nothing is written through, and the peer
    /// gets what the protocol owes for the whole input, whatever the split.
    #[test]
    fn lines_are_never_written_through(
        input in proptest::collection::vec(prop_oneof![Just(b'\n'), Just(b'a'), any::<u8>()], 0..3000),
        splits in proptest::collection::vec(1usize..2000, 1..8),
        flushes in proptest::collection::vec(any::<bool>(), 1..8),
        script in proptest::collection::vec(write_step(), 0..64),
    ) {
        let protocol = Protocol::new(ProtocolKind::Lines, 4096).with_prefix(b"> ");
        let got = run(&protocol, 4096, &input, &splits, &flushes, script);
        prop_assert_eq!(got, owed_for_whole(&protocol, &input));
    }
}

#[test]
fn an_echo_leaves_from_the_read_buffer_when_nothing_is_owed() {
    let protocol = Protocol::new(ProtocolKind::Echo, 1024);
    let mut connection = connection(&protocol, 1024);
    let mut sink = Sink::new(vec![Some(3)]);
    let sent = connection
        .receive_through(b"hello", |bytes| sink.write(bytes))
        .expect("the sink never fails");
    // The kernel took 3 bytes in the first write and the rest in the second.
    assert_eq!(sent, 5);
    assert_eq!(sink.taken, b"hello");
    assert_eq!(
        connection.owed(),
        0,
        "nothing was copied into the write buffer"
    );
}

#[test]
fn only_what_the_kernel_did_not_take_is_owed() {
    let protocol = Protocol::new(ProtocolKind::Echo, 1024);
    let mut connection = connection(&protocol, 1024);
    let mut sink = Sink::new(vec![Some(2), None]);
    let sent = connection
        .receive_through(b"hello", |bytes| sink.write(bytes))
        .expect("the sink never fails");
    assert_eq!(sent, 2);
    assert_eq!(connection.unsent(), b"llo");
    // Owed bytes come first: the next input waits behind them, never overtakes them.
    let sent = connection
        .receive_through(b"!", |bytes| sink.write(bytes))
        .expect("the sink never fails");
    assert_eq!(sent, 0);
    assert_eq!(connection.unsent(), b"llo!");
}

#[test]
fn a_failed_write_through_closes_the_connection() {
    let protocol = Protocol::new(ProtocolKind::Echo, 1024);
    let mut connection = connection(&protocol, 1024);
    let mut calls = 0;
    let result = connection.receive_through(
        b"hello",
        counted(&mut calls, |_, _| {
            Err(io::Error::from(io::ErrorKind::ConnectionReset))
        }),
    );
    assert_eq!(
        result.map_err(|e| e.kind()),
        Err(io::ErrorKind::ConnectionReset)
    );
    assert_eq!(calls, 1, "a failed write is not tried again");
}

/// A write that `f` answers, counting its calls, and failing the test past 100 of them
/// (a loop that retries the same error forever).
fn counted<'a>(
    calls: &'a mut usize,
    mut f: impl FnMut(usize, &[u8]) -> io::Result<usize> + 'a,
) -> impl FnMut(&[u8]) -> io::Result<usize> + 'a {
    move |bytes| {
        *calls += 1;
        assert!(*calls <= 100, "the same write retried 100 times");
        f(*calls, bytes)
    }
}

#[test]
fn an_interrupted_write_through_is_tried_again() {
    let protocol = Protocol::new(ProtocolKind::Echo, 1024);
    let mut connection = connection(&protocol, 1024);
    let mut calls = 0;
    let sent = connection
        .receive_through(
            b"hello",
            counted(&mut calls, |call, bytes| match call {
                1 => Err(io::ErrorKind::Interrupted.into()),
                _ => Ok(bytes.len()),
            }),
        )
        .expect("EINTR is not a failure");
    assert_eq!((sent, calls), (5, 2));
    assert_eq!(connection.owed(), 0);
}

#[test]
fn a_write_through_that_fails_is_not_tried_again() {
    let protocol = Protocol::new(ProtocolKind::Echo, 1024);
    let mut connection = connection(&protocol, 1024);
    let mut calls = 0;
    let result = connection.receive_through(
        b"hello",
        counted(&mut calls, |_, _| Err(io::ErrorKind::BrokenPipe.into())),
    );
    assert_eq!(result.map_err(|e| e.kind()), Err(io::ErrorKind::BrokenPipe));
    assert_eq!(calls, 1);
}

#[test]
fn a_kernel_that_takes_nothing_leaves_everything_owed() {
    let protocol = Protocol::new(ProtocolKind::Echo, 1024);
    let mut connection = connection(&protocol, 1024);
    let mut calls = 0;
    let sent = connection
        .receive_through(b"hello", counted(&mut calls, |_, _| Ok(0)))
        .expect("taking nothing is not a failure");
    assert_eq!((sent, calls), (0, 1), "asked once, then left for writable");
    assert_eq!(connection.unsent(), b"hello");
    assert_eq!(connection.owed(), 5);
}

#[test]
fn nothing_is_written_through_once_reading_stopped() {
    let protocol = Protocol::new(ProtocolKind::Echo, 1024);
    let mut connection = connection(&protocol, 1024);
    connection.stop_reading();
    let mut calls = 0;
    let sent = connection
        .receive_through(b"late", counted(&mut calls, |_, bytes| Ok(bytes.len())))
        .expect("nothing is written");
    assert_eq!(
        (sent, calls),
        (0, 0),
        "bytes read during a drain owe nothing"
    );
    assert_eq!(connection.owed(), 0);
}

#[test]
fn bytes_a_later_send_did_not_take_are_owed_first() {
    let protocol = Protocol::new(ProtocolKind::Echo, 1024);
    let mut connection = connection(&protocol, 1024);
    let mut sink = Sink::new(vec![None]);
    connection
        .receive_through(b"cd", |bytes| sink.write(bytes))
        .expect("WouldBlock is not a failure");
    connection.owe_first(b"ab");
    assert_eq!(connection.unsent(), b"abcd");
    assert_eq!(connection.owed(), 4);
}

#[test]
fn what_is_written_through_is_counted_as_sent() {
    let metrics = crate::metrics::Metrics::new().expect("metrics");
    let log = LoopLog::new(metrics);
    let protocol = Protocol::new(ProtocolKind::Echo, 1024);
    let mut connection = connection(&protocol, 1024);
    let mut sink = Sink::new(vec![Some(3), None]);
    let got = connection
        .on_read_through(Ok(5), b"hello", &log, |bytes| sink.write(bytes))
        .expect("the sink never fails");
    assert!(got, "input arrived");
    let totals = metrics.totals();
    assert_eq!(totals.received_bytes(Transport::Tcp), 5);
    assert_eq!(
        totals.sent_bytes(Transport::Tcp),
        3,
        "only what the kernel took"
    );
    connection
        .flush_with(|bytes| sink.write(bytes), &log)
        .expect("the sink never fails");
    assert_eq!(metrics.totals().sent_bytes(Transport::Tcp), 5);
    assert_eq!(sink.taken, b"hello");
}

#[test]
fn a_flush_tries_an_interrupted_write_again_and_stops_at_a_failure() {
    let log = LoopLog::default();
    let protocol = Protocol::new(ProtocolKind::Echo, 1024);
    let mut connection = connection(&protocol, 1024);
    connection.receive(b"hello");
    let mut calls = 0;
    connection
        .flush_with(
            counted(&mut calls, |call, bytes| match call {
                1 => Err(io::ErrorKind::Interrupted.into()),
                _ => Ok(bytes.len()),
            }),
            &log,
        )
        .expect("EINTR is not a failure");
    assert_eq!(calls, 2);
    assert!(!connection.wants_write());
    connection.receive(b"again");
    let mut calls = 0;
    let result = connection.flush_with(
        counted(&mut calls, |_, _| Err(io::ErrorKind::BrokenPipe.into())),
        &log,
    );
    assert!(matches!(result, Err(CloseReason::Failed(_))), "{result:?}");
    assert_eq!(calls, 1, "a failed write is not tried again");
}

#[test]
fn the_server_ending_first_lingers_and_the_peers_eof_does_not() {
    let log = LoopLog::default();
    let protocol = Protocol::new(ProtocolKind::Echo, 1024);
    let mut connection = connection(&protocol, 1024);
    assert!(connection.needs_linger(), "the peer has not half-closed");
    connection.stop_reading();
    assert!(connection.needs_linger(), "a drain is the server's doing");
    let mut connection = self::connection(&protocol, 1024);
    connection
        .on_read(Ok(0), &[], &log)
        .expect("EOF is handled");
    assert!(!connection.needs_linger(), "the peer half-closed first");
}

#[test]
fn an_echo_is_lent_to_a_later_send_only_when_nothing_is_owed() {
    let protocol = Protocol::new(ProtocolKind::Echo, 1024);
    let mut connection = connection(&protocol, 1024);
    assert!(
        connection.receive_lent(b"ab", true),
        "sent from where it lies"
    );
    assert_eq!(connection.owed(), 0, "none of it owed here");
    assert!(
        !connection.receive_lent(b"cd", false),
        "no send may start now"
    );
    assert_eq!(connection.unsent(), b"cd");
    assert!(!connection.receive_lent(b"ef", true), "owed bytes go first");
    assert_eq!(connection.unsent(), b"cdef");
    let lines = Protocol::new(ProtocolKind::Lines, 1024).with_prefix(b"> ");
    let mut connection = self::connection(&lines, 1024);
    assert!(
        !connection.receive_lent(b"x\n", true),
        "the reply is not the input"
    );
    assert_eq!(connection.unsent(), b"> x\n");
    let mut connection = self::connection(&protocol, 1024);
    connection.stop_reading();
    assert!(!connection.receive_lent(b"late", true), "reading is over");
    assert_eq!(connection.owed(), 0);
}

#[test]
fn only_a_plain_echo_owing_nothing_may_skip_the_lent_allocation() {
    let echo = Protocol::new(ProtocolKind::Echo, 1024);
    let mut plain = connection(&echo, 1024);
    assert!(plain.may_write_through(), "a fresh echo owes nothing");
    let mut sink = Sink::new(vec![Some(2), None]);
    plain
        .receive_through(b"hello", |bytes| sink.write(bytes))
        .expect("the sink never fails");
    // Not lent the loop's spare: what the kernel did not take sits in an allocation of
    // its own, and is owed first.
    assert_eq!(plain.unsent(), b"llo");
    assert!(!plain.may_write_through(), "bytes are owed");
    // Once sent, the allocation goes to a loop whose spare has none, and the connection
    // holds nothing while idle.
    plain.advance(3);
    let mut spare = Vec::new();
    plain.return_spare(&mut spare);
    assert!(
        spare.capacity() > 0,
        "the allocation became the loop's spare"
    );
    assert_eq!(plain.out.capacity(), 0);
    assert!(plain.may_write_through(), "nothing is owed again");
    plain.receive_eof();
    assert!(!plain.may_write_through(), "no input comes after EOF");

    let lines = Protocol::new(ProtocolKind::Lines, 1024);
    assert!(
        !connection(&lines, 1024).may_write_through(),
        "a reply that is not the input itself needs the output buffer"
    );
}

/// One `read_through_with` on a fresh echo connection under a bound of `max_buffer_bytes`,
/// whose read gives `read` what it asked for (the length of the slice it is handed) and
/// returns `result`, with the read's bytes `b'a'`, `b'b'`, ... and the writes to `sink`.
/// Returns what it returned, the length the read was offered, and the connection.
fn read_once(
    max_buffer_bytes: usize,
    result: io::Result<usize>,
    stops_short: bool,
    sink: &mut Sink,
    log: &LoopLog,
) -> (Result<(ReadOutcome, bool), CloseReason>, usize, Connection) {
    let protocol = Protocol::new(ProtocolKind::Echo, max_buffer_bytes);
    let mut connection = connection(&protocol, max_buffer_bytes);
    let mut buf = vec![0u8; 64];
    let mut offered = 0;
    let read = |buf: &mut [u8]| {
        offered = buf.len();
        for (i, byte) in buf.iter_mut().enumerate() {
            *byte = b'a' + (i % 26) as u8;
        }
        result
    };
    let got = connection.read_through_with(
        read,
        |bytes| sink.write(bytes),
        || stops_short,
        &mut buf,
        log,
    );
    (got, offered, connection)
}

fn outcome(has_arrived: bool, may_hold_more: bool) -> ReadOutcome {
    ReadOutcome {
        has_arrived,
        may_hold_more,
    }
}

/// The readiness loops' path for a connection owing nothing says what `read_some` says:
/// a read that filled the bound may have left more, and so may a short one where reads
/// stop short; a short one elsewhere took all that was queued. And the read asks for the
/// whole bound, no more.
#[test]
fn reading_through_says_when_the_socket_may_still_hold_input() {
    let log = LoopLog::default();
    for (n, stops_short, may_hold_more) in [
        (4, false, true),
        (2, false, false),
        (2, true, true),
        (4, true, true),
    ] {
        let mut sink = Sink::new(Vec::new());
        let (got, offered, connection) = read_once(4, Ok(n), stops_short, &mut sink, &log);
        let (read, is_unchanged) = got.expect("the sink never fails");
        assert_eq!(offered, 4, "the read asks for the bound, not the buffer");
        assert_eq!(
            read,
            outcome(true, may_hold_more),
            "{n} of 4 read, reads stop short: {stops_short}"
        );
        assert!(is_unchanged, "all of it went back out");
        assert_eq!(&sink.taken[..], &b"abcd"[..n]);
        assert_eq!(connection.owed(), 0);
    }
}

/// EOF, nothing queued, an interrupted read and a failed one take `read_some`'s path:
/// only EOF changes the connection (it reads no more), and only a failure closes it.
#[test]
fn reading_through_tells_eof_retry_and_failure_apart() {
    let log = LoopLog::default();
    let mut sink = Sink::new(Vec::new());
    let (got, _, connection) = read_once(4, Ok(0), false, &mut sink, &log);
    assert_eq!(
        got.ok(),
        Some((outcome(true, false), false)),
        "EOF is news, and the connection is no longer as it was"
    );
    assert!(!connection.wants_read(), "nothing is read after EOF");
    for (kind, may_hold_more) in [
        (io::ErrorKind::WouldBlock, false),
        (io::ErrorKind::Interrupted, true),
    ] {
        let (got, _, connection) = read_once(4, Err(kind.into()), false, &mut sink, &log);
        assert_eq!(
            got.ok(),
            Some((outcome(false, may_hold_more), true)),
            "{kind:?}: nothing happened"
        );
        assert!(connection.wants_read());
    }
    let (got, _, _) = read_once(
        4,
        Err(io::ErrorKind::ConnectionReset.into()),
        false,
        &mut sink,
        &log,
    );
    assert!(matches!(got, Err(CloseReason::Failed(_))), "{got:?}");
    assert!(sink.taken.is_empty(), "nothing was read, nothing echoed");
}

/// What the kernel does not take is owed, in order, and the connection says it changed;
/// the counters have every byte read and only the bytes the kernel took.
#[test]
fn reading_through_owes_and_counts_what_the_kernel_did_not_take() {
    let metrics = crate::metrics::Metrics::new().expect("metrics");
    let log = LoopLog::new(metrics);
    let mut sink = Sink::new(vec![Some(3), None]);
    let (got, _, connection) = read_once(1024, Ok(5), false, &mut sink, &log);
    let (read, is_unchanged) = got.expect("WouldBlock is not a failure");
    assert_eq!(read, outcome(true, false));
    assert!(!is_unchanged, "bytes are owed now");
    assert_eq!(sink.taken, b"abc");
    assert_eq!(connection.unsent(), b"de");
    let totals = metrics.totals();
    assert_eq!(totals.received_bytes(Transport::Tcp), 5);
    assert_eq!(totals.sent_bytes(Transport::Tcp), 3, "only what it took");
    // All of it taken: all of it counted.
    let mut sink = Sink::new(Vec::new());
    let (got, _, _) = read_once(1024, Ok(5), false, &mut sink, &log);
    assert_eq!(got.ok(), Some((outcome(true, false), true)));
    assert_eq!(metrics.totals().sent_bytes(Transport::Tcp), 8);
    // A failed write closes the connection.
    let mut calls = 0;
    let protocol = Protocol::new(ProtocolKind::Echo, 1024);
    let mut connection = self::connection(&protocol, 1024);
    let got = connection.read_through_with(
        |_| Ok(5),
        counted(&mut calls, |_, _| Err(io::ErrorKind::BrokenPipe.into())),
        || false,
        &mut [0u8; 64],
        &log,
    );
    assert!(matches!(got, Err(CloseReason::Failed(_))), "{got:?}");
    assert_eq!(calls, 1, "a failed write is not tried again");
}
