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

    /// After every read, `lines` has sent exactly the replies to the complete lines so far,
    /// plus the current partial line only once it is longer than the hold limit (and can
    /// no longer become the panic word): nothing of a line goes out before its newline.
    #[test]
    fn lines_answer_a_line_only_once_it_is_complete(
        input in proptest::collection::vec(prop_oneof![Just(b'b'), Just(b'x'), Just(b'\n')], 0..400),
        cuts in proptest::collection::vec(1usize..24, 1..10),
        hold in 1usize..10,
        prefix in proptest::collection::vec(any::<u8>(), 0..4),
        has_word in any::<bool>(),
    ) {
        let word = b"bbbbb";
        let mut protocol = Protocol::new(ProtocolKind::Lines, hold).with_prefix(&prefix);
        if has_word {
            protocol = protocol.with_panic_on(word);
        }
        let mut session = protocol.new_session();
        let mut out = WriteBuffer::new(usize::MAX / 2);
        let mut cuts = cuts.iter().cycle();
        let mut fed = 0;
        while fed < input.len() {
            let n = (*cuts.next().unwrap_or(&1)).min(input.len() - fed);
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                session.on_data(&input[fed..fed + n], &mut out)
            }));
            let complete = input[..fed + n].iter().rposition(|&b| b == b'\n').map_or(0, |at| at + 1);
            let mut want = expected(&protocol, b"", &prefix, &input[..complete]);
            if result.is_err() {
                // Panicked on the first line ending in this read that equals the word: the
                // lines before it were answered, and nothing of it.
                prop_assert!(has_word);
                let mut line_start = input[..fed].iter().rposition(|&b| b == b'\n').map_or(0, |at| at + 1);
                loop {
                    let end = line_start + input[line_start..fed + n].iter().position(|&b| b == b'\n').expect("the panic needs a newline");
                    if input[line_start..end] == word[..] {
                        break;
                    }
                    line_start = end + 1;
                }
                let before = expected(&protocol, b"", &prefix, &input[..line_start]);
                prop_assert_eq!(out.unsent(), &before[..]);
                return Ok(());
            }
            let partial = &input[complete..fed + n];
            let could_be_word = has_word && word.starts_with(partial);
            if partial.len() > hold && !could_be_word {
                want.extend_from_slice(&prefix);
                want.extend_from_slice(partial);
            }
            prop_assert_eq!(out.unsent(), &want[..], "after {} bytes", fed + n);
            prop_assert!(session.held_bytes() <= hold.max(word.len()));
            fed += n;
        }
    }
}

#[test]
fn lines_hold_a_partial_line_until_its_newline() {
    let protocol = Protocol::new(ProtocolKind::Lines, 1024).with_prefix(b"You Got ");
    let mut session = protocol.new_session();
    let mut out = WriteBuffer::new(1024);
    session.on_data(b"spl", &mut out);
    assert_eq!(out.unsent(), b"", "nothing before the newline");
    assert_eq!(session.held_bytes(), 3);
    session.on_data(
        b"it
ne", &mut out,
    );
    assert_eq!(out.unsent(), b"You Got split\n");
    session.on_eof(&mut out);
    assert_eq!(out.unsent(), b"You Got split\nYou Got ne");
    assert_eq!(session.held_bytes(), 0);
}

#[test]
fn lines_answer_a_line_past_the_hold_limit_in_pieces() {
    let protocol = Protocol::new(ProtocolKind::Lines, 4).with_prefix(b"> ");
    let mut session = protocol.new_session();
    let mut out = WriteBuffer::new(1024);
    session.on_data(b"abcd", &mut out);
    assert_eq!(out.unsent(), b"", "exactly the hold limit is still held");
    session.on_data(b"e", &mut out);
    assert_eq!(out.unsent(), b"> abcde");
    assert_eq!(session.held_bytes(), 0);
    session.on_data(b"f", &mut out);
    assert_eq!(out.unsent(), b"> abcdef", "the rest follows as it arrives");
    session.on_data(b"\ng", &mut out);
    assert_eq!(out.unsent(), b"> abcdef\n");
    assert_eq!(session.held_bytes(), 1, "the next line is held again");
}

#[test]
fn lines_hold_past_the_limit_only_what_can_still_become_the_word() {
    let protocol = Protocol::new(ProtocolKind::Lines, 2)
        .with_prefix(b"> ")
        .with_panic_on(b"boom");
    let mut session = protocol.new_session();
    let mut out = WriteBuffer::new(1024);
    session.on_data(b"boo", &mut out);
    assert_eq!(out.unsent(), b"", "still the start of the word");
    assert_eq!(session.held_bytes(), 3);
    session.on_data(b"x", &mut out);
    assert_eq!(out.unsent(), b"> boox", "can no longer become the word");
    assert_eq!(session.held_bytes(), 0);
    session.on_data(b"\nbot", &mut out);
    assert_eq!(out.unsent(), b"> boox\n> bot");
}

#[test]
fn until_quit_holds_exactly_its_limit() {
    let protocol = Protocol::new(ProtocolKind::UntilQuit, 8);
    let mut session = protocol.new_session();
    let mut out = WriteBuffer::new(1 << 20);
    session.on_data(&[b'x'; 8], &mut out);
    assert_eq!(out.len(), 0, "exactly the hold limit owes nothing yet");
    assert_eq!(session.held_bytes(), 8);
    session.on_data(b"y", &mut out);
    assert_eq!(out.len(), 9 - (until_quit::QUIT.len() - 1));
    assert_eq!(session.held_bytes(), until_quit::QUIT.len() - 1);
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

#[test]
fn lines_free_a_long_held_line_once_answered() {
    let protocol = Protocol::new(ProtocolKind::Lines, 1 << 20);
    let mut session = protocol.new_session();
    let mut out = WriteBuffer::new(1 << 21);
    let held_capacity = |session: &Session| match &session.state {
        State::Lines(lines) => lines.held.capacity(),
        _ => unreachable!(),
    };
    session.on_data(&[b'x'; 100_000], &mut out);
    session.on_data(b"\n", &mut out);
    assert_eq!(
        held_capacity(&session),
        0,
        "a connection that once sent a long line keeps no memory for it"
    );
    session.on_data(b"ab", &mut out);
    session.on_data(b"\n", &mut out);
    assert!(
        held_capacity(&session) > 0,
        "a short line's allocation is kept for the next one"
    );
}

#[test]
fn one_input_byte_owes_at_most_the_prefix_and_itself() {
    // A bare newline is the worst case: it owes `PREFIX + "\n"`.
    for prefix in [&b""[..], b"p", b"You Got "] {
        let protocol = Protocol::new(ProtocolKind::Lines, 1024).with_prefix(prefix);
        let mut session = protocol.new_session();
        assert_eq!(session.max_expansion(), prefix.len() + 1, "{prefix:?}");
        let mut out = WriteBuffer::new(1024);
        session.on_data(b"\n", &mut out);
        assert_eq!(out.len(), session.max_expansion());
    }
}
