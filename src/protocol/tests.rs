//! The protocol's definition, stated once as a whole-input function, and checked against
//! the session for any split of the input into reads.

use super::*;
use proptest::prelude::*;

/// What the contract says a stream session sends for `input` followed by a half-close.
fn expected(protocol: &Protocol, greeting: &[u8], prefix: &[u8], input: &[u8]) -> Vec<u8> {
    let mut reply = greeting.to_vec();
    match protocol.kind() {
        ProtocolKind::Echo => reply.extend_from_slice(input),
        ProtocolKind::Lines => {
            let mut rest = input;
            while let Some(end) = rest.iter().position(|&b| b == b'\n') {
                reply.extend_from_slice(prefix);
                reply.extend_from_slice(&rest[..=end]);
                rest = &rest[end + 1..];
            }
            if !rest.is_empty() {
                reply.extend_from_slice(prefix);
                reply.extend_from_slice(rest);
            }
        }
        ProtocolKind::UntilQuit => {
            let end = input
                .windows(until_quit::QUIT.len())
                .position(|w| w == until_quit::QUIT)
                .map_or(input.len(), |at| at + until_quit::QUIT.len());
            reply.extend_from_slice(prefix);
            reply.extend_from_slice(&input[..end]);
        }
    }
    reply
}

/// Feeds `input` in pieces of the given sizes, then EOF unless the session closed first.
fn run_session(protocol: &Protocol, input: &[u8], cuts: &[usize]) -> Vec<u8> {
    let mut session = protocol.new_session();
    let mut out = WriteBuffer::new(usize::MAX / 2);
    let mut wire = Vec::new();
    session.on_connect(&mut out);
    let mut rest = input;
    let mut cuts = cuts.iter().cycle();
    let mut closed = false;
    while !rest.is_empty() {
        let n = (*cuts.next().unwrap_or(&1)).clamp(1, rest.len());
        let flow = session.on_data(&rest[..n], &mut out);
        rest = &rest[n..];
        wire.extend_from_slice(out.unsent());
        out.advance(out.len());
        if flow == Flow::Close {
            closed = true;
            break;
        }
    }
    if !closed {
        session.on_eof(&mut out);
    }
    wire.extend_from_slice(out.unsent());
    wire
}

fn protocol_strategy() -> impl Strategy<Value = (Protocol, Vec<u8>, Vec<u8>)> {
    (
        prop_oneof![
            Just(ProtocolKind::Echo),
            Just(ProtocolKind::Lines),
            Just(ProtocolKind::UntilQuit)
        ],
        proptest::collection::vec(any::<u8>(), 0..4),
        proptest::collection::vec(any::<u8>(), 0..6),
        1usize..40,
    )
        .prop_map(|(kind, greeting, prefix, hold)| {
            let prefix = if kind == ProtocolKind::Echo {
                Vec::new()
            } else {
                prefix
            };
            let protocol = Protocol::new(kind, hold)
                .with_prefix(&prefix)
                .with_greeting(&greeting);
            (protocol, greeting, prefix)
        })
}

/// Input rich in the bytes that matter: newlines and the letters of `quit`.
fn input_strategy() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        prop_oneof![
            Just(b'\n'),
            Just(b'q'),
            Just(b'u'),
            Just(b'i'),
            Just(b't'),
            any::<u8>()
        ],
        0..300,
    )
}

proptest! {
    #[test]
    fn any_split_gives_the_whole_reply(
        (protocol, greeting, prefix) in protocol_strategy(),
        input in input_strategy(),
        cuts in proptest::collection::vec(1usize..50, 1..20),
    ) {
        let wire = run_session(&protocol, &input, &cuts);
        prop_assert_eq!(wire, expected(&protocol, &greeting, &prefix, &input));
    }

    #[test]
    fn a_datagram_gets_one_prefixed_reply(
        (protocol, _greeting, prefix) in protocol_strategy(),
        datagram in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let mut reply = Vec::new();
        protocol.reply_to_datagram(&datagram, &mut reply);
        let mut want = prefix.clone();
        want.extend_from_slice(&datagram);
        prop_assert_eq!(reply, want);
    }

    /// Held bytes stay bounded: `lines` holds at most the panic word, `until-quit` at most
    /// its hold limit plus one read.
    #[test]
    fn held_bytes_stay_bounded(
        input in proptest::collection::vec(prop_oneof![Just(b'b'), Just(b'x'), Just(b'\n')], 0..2000),
        cuts in proptest::collection::vec(1usize..64, 1..10),
    ) {
        let lines = Protocol::new(ProtocolKind::Lines, 64).with_panic_on(b"bbbb");
        let mut session = lines.new_session();
        let mut out = WriteBuffer::new(usize::MAX / 2);
        let mut rest = &input[..];
        let mut cuts = cuts.iter().cycle();
        while !rest.is_empty() {
            let n = (*cuts.next().unwrap_or(&1)).min(rest.len());
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                session.on_data(&rest[..n], &mut out)
            }));
            rest = &rest[n..];
            if let State::Lines(state) = &session.state {
                prop_assert!(state.held.len() <= 4);
            }
        }
    }
}

#[test]
fn lines_prefixes_each_line_and_the_partial_tail() {
    let protocol = Protocol::new(ProtocolKind::Lines, 1024).with_prefix(b"> ");
    assert_eq!(
        run_session(&protocol, b"a\nbc\n\nd", &[1]),
        b"> a\n> bc\n> \n> d"
    );
}

#[test]
fn until_quit_answers_once_and_closes() {
    let protocol = Protocol::new(ProtocolKind::UntilQuit, 1024).with_prefix(b"got:");
    assert_eq!(
        run_session(&protocol, b"one\ntwo\nquit\nlater", &[3]),
        b"got:one\ntwo\nquit\n"
    );
    // The collected input need only end with `quit\n`, not be a line of its own.
    assert_eq!(
        run_session(&protocol, b"squit\nmore", &[64]),
        b"got:squit\n"
    );
}

#[test]
fn until_quit_streams_past_its_hold_limit() {
    let protocol = Protocol::new(ProtocolKind::UntilQuit, 8);
    let mut session = protocol.new_session();
    let mut out = WriteBuffer::new(1 << 20);
    assert_eq!(session.on_data(&[b'x'; 100], &mut out), Flow::Continue);
    assert_eq!(out.len(), 100 - (until_quit::QUIT.len() - 1));
}

#[test]
fn the_panic_word_panics_only_as_a_whole_line() {
    let protocol = Protocol::new(ProtocolKind::Lines, 1024).with_panic_on(b"boom");
    assert_eq!(
        run_session(&protocol, b"boo\nboomer\nxboom\nboom", &[2]),
        b"boo\nboomer\nxboom\nboom"
    );
    let mut session = protocol.new_session();
    let mut out = WriteBuffer::new(1024);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        session.on_data(b"ok\nbo", &mut out);
        session.on_data(b"om\n", &mut out);
    }));
    assert!(result.is_err());
    assert_eq!(
        out.unsent(),
        b"ok\n",
        "no byte of the panicking line went out"
    );
}

#[test]
fn the_panic_word_panics_on_a_datagram() {
    let protocol = Protocol::new(ProtocolKind::Lines, 1024).with_panic_on(b"boom");
    let mut reply = Vec::new();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        protocol.reply_to_datagram(b"boom\n", &mut reply)
    }));
    assert!(result.is_err());
}
