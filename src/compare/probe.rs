//! Probes that find a model's limits by measurement: how many connections held open at
//! once get an answer, and what an idle server costs.

use crate::sys::poll::{self, POLLERR, POLLHUP, POLLIN};
use serde::Serialize;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

/// How long one connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// After the minimum wait, the probe goes on while answers keep coming: it ends once none
/// has come for this long.
const QUIET: Duration = Duration::from_millis(500);
/// However answers trickle in, the probe ends after this many times its minimum wait.
const MAX_WAIT_FACTOR: u32 = 5;
/// How often the probe checks whether it may end.
const POLL_SLICE: Duration = Duration::from_millis(50);

/// What happened to connections held open together, each sending one message.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ProbeResult {
    /// Connections attempted.
    pub conns: usize,
    /// Connections established.
    pub connected: usize,
    /// Connections whose message came back whole and right in time.
    pub answered: usize,
    /// Connections the server closed or reset before answering.
    pub closed: usize,
    /// Connections still waiting for an answer when the probe ended.
    pub waiting: usize,
    /// Answers with wrong bytes.
    pub wrong: usize,
}

impl ProbeResult {
    /// Whether every connection was answered.
    pub fn is_complete(&self) -> bool {
        self.answered == self.conns
    }
}

/// Opens `count` connections that send nothing (for the idle measurement).
///
/// # Errors
///
/// The first connect failure.
pub fn open_idle(addr: SocketAddr, count: usize) -> io::Result<Vec<TcpStream>> {
    (0..count)
        .map(|_| TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT))
        .collect()
}

/// Opens `count` connections, then sends one short, distinct message on each and waits for
/// the answers, all connections staying open meanwhile. The probe ends once every
/// connection is answered or closed; otherwise after `wait`, or later while answers are
/// still arriving (a busy machine answers slowly, a model that serves N at a time stops
/// answering), but never after `MAX_WAIT_FACTOR` times `wait`.
///
/// # Errors
///
/// Only a failure of `poll` itself; connect and socket failures are counted.
pub fn hold_open(addr: SocketAddr, count: usize, wait: Duration) -> io::Result<ProbeResult> {
    let mut result = ProbeResult {
        conns: count,
        ..ProbeResult::default()
    };
    let started = Instant::now();
    let hard_deadline = started + wait * MAX_WAIT_FACTOR;
    // Connecting is bounded too: a server that stops accepting must not stall the run.
    let connect_deadline = hard_deadline;
    let mut streams = Vec::with_capacity(count);
    for _ in 0..count {
        let left = connect_deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match TcpStream::connect_timeout(&addr, left.min(CONNECT_TIMEOUT)) {
            Ok(stream) => streams.push(stream),
            Err(_) => break,
        }
    }
    result.connected = streams.len();
    // Unconnected ones count as closed: the server would not take them.
    result.closed = count - streams.len();

    let messages: Vec<Vec<u8>> = (0..streams.len())
        .map(|index| format!("probe {index:08}\n").into_bytes())
        .collect();
    let mut received: Vec<Vec<u8>> = vec![Vec::new(); streams.len()];
    let mut entries = Vec::with_capacity(streams.len());
    for (stream, message) in streams.iter_mut().zip(&messages) {
        let _ = stream.set_nodelay(true);
        // A message this short fits any socket buffer, so the write does not block.
        let sent = stream
            .write_all(message)
            .and_then(|()| stream.set_nonblocking(true));
        match sent {
            Ok(()) => entries.push(poll::entry(stream.as_fd(), POLLIN)),
            Err(_) => {
                result.closed += 1;
                entries.push(poll::unused_entry());
            }
        }
    }

    let waited_from = Instant::now();
    let mut last_progress = waited_from;
    let mut buf = [0u8; 64];
    loop {
        let open = entries.iter().filter(|e| e.fd >= 0).count();
        let now = Instant::now();
        let is_quiet = now >= waited_from + wait && now >= last_progress + QUIET;
        if open == 0 || is_quiet || now >= hard_deadline.max(waited_from + wait) {
            result.waiting = open;
            break;
        }
        if poll::poll(&mut entries, Some(POLL_SLICE))? > 0 {
            last_progress = Instant::now();
        }
        for (index, entry) in entries.iter_mut().enumerate() {
            if entry.fd < 0 || entry.revents & (POLLIN | POLLHUP | POLLERR) == 0 {
                continue;
            }
            entry.revents = 0;
            let outcome = match streams[index].read(&mut buf) {
                Ok(0) => Some(Outcome::Closed),
                Ok(n) => {
                    received[index].extend_from_slice(&buf[..n]);
                    let expected = &messages[index];
                    if !expected.starts_with(&received[index]) {
                        Some(Outcome::Wrong)
                    } else if received[index].len() == expected.len() {
                        Some(Outcome::Answered)
                    } else {
                        None
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => None,
                Err(_) => Some(Outcome::Closed),
            };
            match outcome {
                None => continue,
                Some(Outcome::Answered) => result.answered += 1,
                Some(Outcome::Closed) => result.closed += 1,
                Some(Outcome::Wrong) => result.wrong += 1,
            }
            *entry = poll::unused_entry();
        }
    }
    Ok(result)
}

enum Outcome {
    Answered,
    Closed,
    Wrong,
}
