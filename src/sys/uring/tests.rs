//! The ring against real socket pairs: budgets, sends, closing with operations in flight.

use super::*;
use crate::slab::{Slab, Token};
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

fn next(ring: &mut Ring) -> Completion {
    next_with_token(ring).1
}

fn next_with_token(ring: &mut Ring) -> (Token, Completion) {
    for _ in 0..100 {
        if let Some(completion) = ring.next_completion() {
            return completion;
        }
        ring.wait(Some(Duration::from_millis(50))).unwrap();
    }
    panic!("no completion");
}

#[test]
fn receive_stops_at_its_budget() {
    let mut ring = Ring::new().unwrap();
    let mut tokens = Slab::default();
    let (ours, mut theirs) = UnixStream::pair().unwrap();
    let token = tokens.insert(());
    ring.add(token, OwnedFd::from(ours));
    // Some bytes first, then more than the budget while the receive is armed.
    theirs.write_all(&[7u8; 300]).unwrap();
    ring.arm_receive(token, 1000);
    let mut got = 0;
    while ring.is_receiving(token) {
        match next(&mut ring) {
            Completion::Received(result) => {
                let received = result.unwrap().expect("bytes, not EOF");
                let bytes = ring.received(&received);
                assert!(bytes.iter().all(|b| *b == bytes[0]) && !bytes.is_empty());
                let n = received.len();
                ring.recycle(received);
                if got == 0 {
                    theirs.write_all(&[8u8; 3000]).unwrap();
                }
                got += n;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(
        got > 0 && got <= 1000,
        "received {got} bytes on a budget of 1000"
    );
    assert!(
        ring.has_receive_limit(),
        "this kernel (6.17+) takes multishot limits"
    );
    ring.send(token, b"hello");
    match next(&mut ring) {
        Completion::Sent { result, .. } => assert_eq!(result.unwrap(), 5),
        other => panic!("{other:?}"),
    }
    let mut reply = [0u8; 5];
    theirs.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"hello");
}

#[test]
fn received_bytes_outlive_later_completions() {
    let mut ring = Ring::new().unwrap();
    let mut tokens = Slab::default();
    let (a, mut a_peer) = UnixStream::pair().unwrap();
    let (b, mut b_peer) = UnixStream::pair().unwrap();
    let (a_token, b_token) = (tokens.insert(()), tokens.insert(()));
    ring.add(a_token, OwnedFd::from(a));
    ring.add(b_token, OwnedFd::from(b));
    a_peer.write_all(b"from a").unwrap();
    b_peer.write_all(b"from b").unwrap();
    ring.arm_receive(a_token, 100);
    ring.arm_receive(b_token, 100);
    let mut held = Vec::new();
    while held.len() < 2 {
        match next_with_token(&mut ring) {
            (token, Completion::Received(result)) => {
                held.push((token, result.unwrap().expect("bytes")));
            }
            other => panic!("{other:?}"),
        }
    }
    // Both completions were taken before either buffer was read: each still holds its own.
    for (token, received) in held {
        let expected: &[u8] = if token == a_token {
            b"from a"
        } else {
            b"from b"
        };
        assert_eq!(ring.received(&received), expected);
        ring.recycle(received);
    }
}

#[test]
fn close_waits_for_cancelled_operations() {
    let mut ring = Ring::new().unwrap();
    let mut tokens = Slab::default();
    let (ours, _theirs) = UnixStream::pair().unwrap();
    let token = tokens.insert(());
    ring.add(token, OwnedFd::from(ours));
    ring.arm_receive(token, 100);
    ring.wait(Some(Duration::from_millis(10))).unwrap();
    ring.close(token);
    tokens.remove(token);
    assert_eq!(
        ring.live_slots(),
        1,
        "freed before the cancelled receive completed"
    );
    // The token's slot is free for another socket at once.
    let reused = tokens.insert(());
    ring.add(reused, OwnedFd::from(UnixStream::pair().unwrap().0));
    assert_eq!(ring.live_slots(), 2);
    for _ in 0..100 {
        if ring.live_slots() == 1 {
            break;
        }
        ring.wait(Some(Duration::from_millis(50))).unwrap();
        assert!(
            ring.next_completion().is_none(),
            "a closed slot reports nothing"
        );
    }
    assert_eq!(ring.live_slots(), 1);
    assert!(!ring.is_receiving(token));
    assert!(!ring.is_receiving(reused));
}

/// A send straight from a provided buffer keeps that buffer out of the kernel's reach
/// until the send completes, then hands it back with the bytes the kernel did not take.
#[test]
fn send_received_returns_its_buffer_with_the_unsent_tail() {
    let mut ring = Ring::new().unwrap();
    let mut tokens = Slab::default();
    let (ours, mut theirs) = UnixStream::pair().unwrap();
    // A small send buffer (the kernel's minimum, 4608 bytes) so one 8000-byte send
    // can only go out in part while the peer reads nothing.
    socket2::SockRef::from(&ours)
        .set_send_buffer_size(1)
        .unwrap();
    let token = tokens.insert(());
    ring.add(token, OwnedFd::from(ours));
    let input: Vec<u8> = (0..8000u32).map(|i| (i % 251) as u8).collect();
    theirs.write_all(&input).unwrap();
    ring.arm_receive(token, 2 * input.len());
    let received = match next(&mut ring) {
        Completion::Received(Ok(Some(received))) => received,
        other => panic!("{other:?}"),
    };
    let len = received.len();
    assert!(len > 4608, "one receive took only {len} bytes");
    ring.take_received(token, received, |bytes, may_send| {
        assert_eq!(bytes.len(), len);
        may_send
    });
    assert!(ring.is_sending(token));
    assert_eq!(ring.sending_received(token), len);
    let (sent, from) = loop {
        match next(&mut ring) {
            Completion::Sent { result, sent } => break (result.unwrap(), sent),
            Completion::Received(result) => {
                if let Ok(Some(received)) = result {
                    ring.recycle(received);
                }
            }
            other => panic!("{other:?}"),
        }
    };
    assert!(0 < sent && sent < len, "sent {sent} of {len} bytes at once");
    assert_eq!(
        ring.unsent(&from, 0),
        &input[..len],
        "the buffer was reused in flight"
    );
    assert_eq!(ring.unsent(&from, sent), &input[sent..len]);
    assert_eq!(ring.sending_received(token), 0);
    let mut echoed = vec![0u8; sent];
    theirs.read_exact(&mut echoed).unwrap();
    assert_eq!(echoed, input[..sent]);
    ring.recycle_sent(from);
}

/// A receive that completes with bytes after its slot was closed still gives its buffer back
/// to the kernel: more such closes than the ring has buffers leave receiving possible.
#[test]
fn closing_with_bytes_received_keeps_every_buffer() {
    let mut ring = Ring::new().unwrap();
    let mut tokens = Slab::default();
    for _ in 0..usize::from(ring::PROVIDED_BUFFERS) + 10 {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let token = tokens.insert(());
        ring.add(token, OwnedFd::from(ours));
        theirs.write_all(b"late").unwrap();
        ring.arm_receive(token, 100);
        // Submits the receive; its completion (with a buffer) waits to be handed out.
        ring.wait(Some(Duration::from_millis(10))).unwrap();
        ring.close(token);
        tokens.remove(token);
        while ring.live_slots() > 0 {
            ring.wait(Some(Duration::from_millis(10))).unwrap();
            assert!(
                ring.next_completion().is_none(),
                "a closed slot reports nothing"
            );
        }
    }
    let (ours, mut theirs) = UnixStream::pair().unwrap();
    let token = tokens.insert(());
    ring.add(token, OwnedFd::from(ours));
    theirs.write_all(b"still room").unwrap();
    ring.arm_receive(token, 100);
    match next(&mut ring) {
        Completion::Received(result) => {
            let received = result.expect("a provided buffer left").expect("bytes");
            assert_eq!(ring.received(&received), b"still room");
            ring.recycle(received);
        }
        other => panic!("{other:?}"),
    }
}

/// A receive that finds every provided buffer in use (ENOBUFS) reports nothing: it is
/// retried once at once, and after a second failure with no buffer given back in between
/// it waits, armed again only after a buffer comes back (not in every turn, which spun the
/// loop), and then it gets its bytes.
#[test]
fn a_receive_without_a_buffer_waits_for_one() {
    let mut ring = Ring::new().unwrap();
    let mut tokens = Slab::default();
    let mut peers = Vec::new();
    let starving = usize::from(ring::PROVIDED_BUFFERS) + 3;
    for _ in 0..starving {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let token = tokens.insert(());
        ring.add(token, OwnedFd::from(ours));
        theirs.write_all(b"0123456789").unwrap();
        ring.arm_receive(token, 100);
        peers.push((token, theirs));
    }
    // Hold every buffer the receives were given; three receives find none.
    let mut held = Vec::new();
    let turn = |ring: &mut Ring, held: &mut Vec<(Token, Received)>| {
        ring.wait(Some(Duration::from_millis(10))).unwrap();
        while let Some((token, completion)) = ring.next_completion() {
            match completion {
                Completion::Received(Ok(Some(received))) => held.push((token, received)),
                other => panic!("only bytes are reported, not {other:?}"),
            }
        }
    };
    for _ in 0..10 {
        turn(&mut ring, &mut held);
    }
    assert_eq!(held.len(), usize::from(ring::PROVIDED_BUFFERS));
    let failures = ring.starved_receives();
    assert!(
        (3..=6).contains(&failures),
        "{failures} receives found no buffer"
    );
    for _ in 0..10 {
        turn(&mut ring, &mut held);
    }
    assert_eq!(
        ring.starved_receives(),
        failures,
        "a receive without a buffer was armed again before one came back"
    );
    let is_held = |token: &Token| held.iter().any(|(t, _)| t == token);
    let starved: Vec<Token> = (peers.iter().map(|(token, _)| *token))
        .filter(|token| !is_held(token))
        .collect();
    assert_eq!(starved.len(), 3);
    assert!(starved.iter().all(|token| ring.is_receiving(*token)));
    // A buffer back: the waiting receives are armed again, the oldest first, and one gets
    // its bytes.
    let (_, received) = held.pop().unwrap();
    ring.recycle(received);
    let (token, completion) = next_with_token(&mut ring);
    assert!(starved.contains(&token), "{token:?} did not wait");
    match completion {
        Completion::Received(Ok(Some(received))) => {
            assert_eq!(ring.received(&received), b"0123456789");
            ring.recycle(received);
        }
        other => panic!("{other:?}"),
    }
    for (_, received) in held {
        ring.recycle(received);
    }
}

/// Once a receive found no provided buffer, the ring is short for a while, and each receive
/// armed meanwhile takes at most its share of the ring (here one buffer: there are more
/// sockets than buffers), so a connection with much to send cannot take the whole ring
/// again in one turn and leave the others' receives without a buffer.
#[test]
fn a_short_ring_gives_each_receive_its_share() {
    let mut ring = Ring::new().unwrap();
    let mut tokens = Slab::default();
    let mut peers = Vec::new();
    for _ in 0..=usize::from(ring::PROVIDED_BUFFERS) {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let token = tokens.insert(());
        ring.add(token, OwnedFd::from(ours));
        theirs.write_all(b"x").unwrap();
        ring.arm_receive(token, 100);
        peers.push(theirs);
    }
    let mut held = Vec::new();
    for _ in 0..20 {
        ring.wait(Some(Duration::from_millis(10))).unwrap();
        while let Some((_, completion)) = ring.next_completion() {
            match completion {
                Completion::Received(Ok(Some(received))) => held.push(received),
                other => panic!("only bytes are reported, not {other:?}"),
            }
        }
        if ring.starved_receives() > 0 && held.len() == usize::from(ring::PROVIDED_BUFFERS) {
            break;
        }
    }
    assert!(ring.starved_receives() > 0, "the ring never ran short");
    for received in held {
        ring.recycle(received);
    }
    let (ours, mut theirs) = UnixStream::pair().unwrap();
    let token = tokens.insert(());
    ring.add(token, OwnedFd::from(ours));
    theirs.set_nonblocking(true).unwrap();
    let chunk = [9u8; 4096];
    let mut written = 0;
    while written < 4 * ring::PROVIDED_BUFFER_BYTES {
        match theirs.write(&chunk) {
            Ok(n) => written += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(
        written > 2 * ring::PROVIDED_BUFFER_BYTES,
        "wrote only {written}"
    );
    ring.arm_receive(token, 1 << 20);
    let mut got = 0;
    while ring.is_receiving(token) && got <= ring::PROVIDED_BUFFER_BYTES {
        let (from, completion) = next_with_token(&mut ring);
        match completion {
            Completion::Received(Ok(Some(received))) => {
                if from == token {
                    got += received.len();
                }
                ring.recycle(received);
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(
        got > 0 && got <= ring::PROVIDED_BUFFER_BYTES,
        "a receive on a short ring took {got} bytes, more than its share"
    );
}

/// A copied send holds the bytes it took until its completion, and the caller no longer
/// does: a receive armed meanwhile gets its budget less those bytes, so the two together
/// stay within it. The completion hands back what the kernel did not send, in order.
#[test]
fn a_copied_send_counts_against_the_receive_budget() {
    let mut ring = Ring::new().unwrap();
    let mut tokens = Slab::default();
    let (ours, mut theirs) = UnixStream::pair().unwrap();
    // The kernel's minimum send buffer: the send can only go out in part.
    socket2::SockRef::from(&ours)
        .set_send_buffer_size(1)
        .unwrap();
    let token = tokens.insert(());
    ring.add(token, OwnedFd::from(ours));
    let output: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(ring.send(token, &output), output.len());
    assert_eq!(ring.sending_bytes(token), output.len());
    theirs.write_all(&[9u8; 30_000]).unwrap();
    let budget = 25_000;
    ring.arm_receive(token, budget);
    let (mut got, mut sent) = (0, None);
    while ring.is_receiving(token) || sent.is_none() {
        match next(&mut ring) {
            Completion::Received(result) => {
                let received = result.unwrap().expect("bytes, not EOF");
                got += received.len();
                ring.recycle(received);
            }
            Completion::Sent {
                result,
                sent: bytes,
            } => sent = Some((result.unwrap(), bytes)),
            other => panic!("{other:?}"),
        }
    }
    assert!(
        0 < got && got <= budget - output.len(),
        "received {got} bytes with {} of a {budget}-byte budget in flight",
        output.len()
    );
    let (written, sent) = sent.unwrap();
    assert!(
        written < output.len(),
        "the kernel took all {written} bytes at once"
    );
    assert_eq!(ring.unsent(&sent, written), &output[written..]);
    assert_eq!(ring.sending_bytes(token), 0);
    ring.recycle_sent(sent);
}

/// Sends name their socket by its entry in the registered file table. A socket closed in
/// the turn it was opened, its slot given to another at once, sends nothing to the other
/// (each table update reads a descriptor of its own); and a closed socket's entry no
/// longer holds it open: its peer sees EOF.
#[test]
fn sends_by_table_entry_reach_their_own_socket() {
    let mut ring = Ring::new().unwrap();
    let mut tokens = Slab::default();
    let (a, mut a_peer) = UnixStream::pair().unwrap();
    let (b, mut b_peer) = UnixStream::pair().unwrap();
    for peer in [&a_peer, &b_peer] {
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    }
    let a_token = tokens.insert(());
    ring.add(a_token, OwnedFd::from(a));
    assert_eq!(ring.send(a_token, b"to a"), 4);
    ring.close(a_token);
    tokens.remove(a_token);
    let b_token = tokens.insert(());
    assert_eq!(b_token.index(), a_token.index());
    ring.add(b_token, OwnedFd::from(b));
    assert_eq!(ring.send(b_token, b"to b"), 4);
    match next(&mut ring) {
        Completion::Sent { result, sent } => {
            assert_eq!(result.unwrap(), 4);
            ring.recycle_sent(sent);
        }
        other => panic!("{other:?}"),
    }
    let mut got = [0u8; 4];
    b_peer.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"to b");
    let mut rest = Vec::new();
    a_peer
        .read_to_end(&mut rest)
        .expect("EOF on the closed socket");
    assert!(rest.is_empty() || rest == b"to a", "{rest:?}");
    ring.close(b_token);
    ring.wait(Some(Duration::from_millis(10))).unwrap();
    let mut after = Vec::new();
    b_peer
        .read_to_end(&mut after)
        .expect("EOF once the slot is closed");
    assert!(after.is_empty(), "{after:?}");
}
