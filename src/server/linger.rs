//! The lingering close: how the server closes a connection first without destroying the
//! replies it still owes.
//!
//! A socket closed while the peer's bytes wait unread in it is answered by the kernel with
//! a reset, and a reset throws away everything still queued to send: a client that sent
//! one byte after `quit\n` would lose the tail of its reply. So whenever the server closes
//! first (the protocol said goodbye, a handler panicked, an idle timeout, a drain, a
//! refused PROXY header or TLS handshake), the connection sends everything it owes, shuts
//! down its sending side (the peer reads EOF after the last reply), and only then comes
//! here: the server reads and throws away whatever the peer still sends until the peer's
//! EOF, and closes after that. nginx (`lingering_close`) and Apache (`lingering_close()`)
//! do the same for the same reason.
//!
//! Bounded, so that no peer can hold a descriptor:
//!
//! - [`LINGER_TIME`]: 5 s in all;
//! - [`LINGER_TIMEOUT`]: 2 s without progress: no byte from the peer, and no byte of the
//!   replies still queued taken by it;
//! - [`LINGER_MAX_BYTES`]: 1 MiB thrown away. Past it nothing more is read, but the close
//!   still waits (within the time bounds) until the peer has taken every reply queued: a
//!   peer that sent megabytes before the server stopped reading (a drain) would otherwise
//!   lose the replies still in the send queue to the reset its unread bytes cause.
//!
//! Past a time bound the socket is closed as it is. nginx's defaults are `lingering_time 30s`
//! and `lingering_timeout 5s`, sized for HTTP request bodies still arriving over slow
//! links; an echo peer only has to notice our EOF and stop, so reverb waits a sixth of
//! that in all and less than half between bytes. nginx bounds no byte count; reverb does,
//! so that a peer flooding a closed connection costs at most 1 MiB of reads.
//!
//! At shutdown a lingering connection is closed as soon as both kernel queues are empty
//! (the peer has everything we sent, and no unread input can turn the close into a
//! reset), and at the latest [`LINGER_TIMEOUT`] (or `--drain-timeout`, if shorter) after
//! the drain ended, so a server still stops promptly.
//!
//! Where the waiting happens is the model's business, the rules above are not: a model
//! with a thread (or process) per connection lingers on that thread ([`linger_here`]);
//! event loops, async tasks and pooled workers (which must move on to the next client)
//! hand the socket to one lingering thread ([`hand_off`]), as
//! Apache's event MPM hands lingering connections to its listener thread, so no loop keeps
//! a finished connection in its tables.

use super::{Admission, Shutdown};
use crate::net::Stream;
use crate::sys::eventfd::EventFd;
use crate::sys::poll::{self, POLLIN};
use crate::sys::queues;
use std::io;
use std::os::fd::AsFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// How long a lingering close waits for the peer's EOF in all.
pub const LINGER_TIME: Duration = Duration::from_secs(5);

/// How long a lingering close waits for the next byte (or the EOF) from the peer.
pub const LINGER_TIMEOUT: Duration = Duration::from_secs(2);

/// How many bytes from the peer a lingering close reads and throws away at most.
pub const LINGER_MAX_BYTES: usize = 1024 * 1024;

/// How often a lingering close at shutdown looks again at the kernel queues: emptying
/// them wakes no `poll`.
const EXIT_RECHECK: Duration = Duration::from_millis(10);

/// Bytes read per `read` while throwing input away.
const DISCARD_CHUNK_BYTES: usize = 16 * 1024;

/// Where one lingering close stands.
#[derive(Debug)]
struct Lingering {
    since: Instant,
    /// The last byte from the peer, or of ours it took (see [`LINGER_TIMEOUT`]).
    last_input: Instant,
    discarded: usize,
    /// Past [`LINGER_MAX_BYTES`]: reads nothing more, and closes once nothing we sent is
    /// left untaken; the bytes still untaken when last looked.
    untaken: Option<usize>,
}

/// What a look at a lingering socket found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Keep waiting for the peer.
    Wait,
    /// Close now: the peer's EOF arrived, it went away, or a bound passed.
    Close,
}

impl Lingering {
    fn new(now: Instant) -> Self {
        Lingering {
            since: now,
            last_input: now,
            discarded: 0,
            untaken: None,
        }
    }

    /// What to wait for on the socket: its input, until the byte bound passed.
    fn events(&self) -> i16 {
        if self.untaken.is_some() { 0 } else { POLLIN }
    }

    /// How long to sleep at most: past the byte bound, emptying the send queue wakes no
    /// `poll`, so it is looked at again every [`EXIT_RECHECK`].
    fn next_look(&self, now: Instant) -> Duration {
        let left = self.deadline().saturating_duration_since(now);
        match self.untaken {
            Some(_) => left.min(EXIT_RECHECK),
            None => left,
        }
    }

    /// Looks at the socket without reading: past the byte bound, closes once the peer has
    /// taken everything we sent, and counts each byte it takes as progress.
    fn look(&mut self, stream: &Stream, now: Instant) -> Step {
        if let Some(untaken) = self.untaken {
            let Ok(queued) = queues::queued(stream.as_fd()) else {
                return Step::Close;
            };
            if queued.unsent == 0 {
                return Step::Close;
            }
            if queued.unsent < untaken {
                self.last_input = now;
            }
            self.untaken = Some(queued.unsent);
        }
        self.check(now)
    }

    /// Reads and throws away what the non-blocking `stream` holds.
    fn discard(&mut self, stream: &Stream, now: Instant) -> Step {
        if self.untaken.is_some() {
            return self.look(stream, now);
        }
        let mut buf = [0u8; DISCARD_CHUNK_BYTES];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => return Step::Close,
                Ok(n) => {
                    self.discarded += n;
                    self.last_input = now;
                    if self.discarded > LINGER_MAX_BYTES {
                        self.untaken = Some(usize::MAX);
                        return self.look(stream, now);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return self.check(now),
                // Reset or gone: nothing is left to protect. (Not `Interrupted`: the socket
                // is non-blocking, and only a call that sleeps is interrupted by a signal,
                // signal(7).)
                Err(_) => return Step::Close,
            }
        }
    }

    /// When the time bounds end this lingering close.
    fn deadline(&self) -> Instant {
        (self.since + LINGER_TIME).min(self.last_input + LINGER_TIMEOUT)
    }

    fn check(&self, now: Instant) -> Step {
        if now >= self.deadline() {
            Step::Close
        } else {
            Step::Wait
        }
    }
}

/// Whether closing `stream` now can hurt nobody: the peer has taken every byte we sent,
/// and nothing unread waits that would make the kernel answer the close with a reset.
fn is_settled(stream: &Stream) -> bool {
    queues::queued(stream.as_fd()).is_ok_and(|q| q.unread == 0 && q.unsent == 0)
}

/// How long a lingering close may still run once shutdown's drain has ended.
pub fn exit_bound(drain_timeout: Duration) -> Duration {
    LINGER_TIMEOUT.min(drain_timeout)
}

/// Closes `stream` with a lingering close on the calling thread, which waits for it: for
/// models with a thread or process per connection. Everything owed must have been sent.
///
/// Shutdown firing meanwhile shortens the wait as the module header says.
pub fn linger_here(stream: &Stream, shutdown: &Shutdown, drain_timeout: Duration) {
    // The peer may be gone already; the reads below then end at once.
    let _ = stream.shutdown_write();
    if stream.set_nonblocking(true).is_err() {
        return;
    }
    let mut lingering = Lingering::new(Instant::now());
    let mut exit_deadline: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if lingering.discard(stream, now) == Step::Close {
            return;
        }
        if exit_deadline.is_none() && shutdown.is_fired() {
            exit_deadline = Some(now + exit_bound(drain_timeout));
        }
        let mut timeout = lingering.next_look(now);
        if let Some(exit_deadline) = exit_deadline {
            if now >= exit_deadline || is_settled(stream) {
                return;
            }
            timeout = timeout.min(EXIT_RECHECK);
        }
        let mut entries = [
            poll::entry(stream.as_fd(), lingering.events()),
            if exit_deadline.is_none() {
                poll::entry(shutdown.fd(), POLLIN)
            } else {
                poll::unused_entry()
            },
        ];
        if poll::poll(&mut entries, Some(timeout)).is_err() {
            return;
        }
    }
}

/// Starts a lingering close of `stream` and returns at once: the socket is shut down for
/// sending here, and the lingering thread reads and closes it later. Everything owed must
/// have been sent. For event loops, async tasks and pooled workers, which cannot wait.
///
/// `place`, the connection's place under `--max-conns`, goes with the socket and is
/// released when the lingering close ends: a lingering peer still holds a descriptor, so
/// it still counts.
pub fn hand_off(stream: Stream, place: Option<Admission>) {
    // The peer may be gone already; the reads below then end at once.
    let _ = stream.shutdown_write();
    if stream.set_nonblocking(true).is_err() {
        return;
    }
    // Most peers that already sent their last byte close at once: no thread needed then.
    if Lingering::new(Instant::now()).discard(&stream, Instant::now()) == Step::Close {
        return;
    }
    match lingerer() {
        Some(lingerer) => lingerer.add(Handed {
            stream,
            _place: place,
        }),
        // Without the thread, closing now is all that is left (logged once, at its start).
        None => drop(stream),
    }
}

/// Closes `stream` without waiting: shuts down our side and discards what the peer
/// already sent, so the close is a reset only if more arrives later. For a connection
/// refused before it was served: it is owed nothing, and waiting would let refused peers
/// hold descriptors past `--max-conns`.
pub fn close_now(stream: &Stream) {
    let _ = stream.shutdown_write();
    if stream.set_nonblocking(true).is_ok() {
        Lingering::new(Instant::now()).discard(stream, Instant::now());
    }
}

/// At shutdown, after the model's loops have returned: gives sockets still lingering on
/// the lingering thread until they settle, or [`exit_bound`] passes.
pub fn finish(drain_timeout: Duration) {
    let Some(lingerer) = LINGERER.get().and_then(Option::as_ref) else {
        return;
    };
    let deadline = Instant::now() + exit_bound(drain_timeout);
    let mut state = lingerer.lock();
    state.is_exiting = true;
    let _ = lingerer.wake.notify();
    while state.lingering + state.incoming.len() > 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        state = match lingerer.settled.wait_timeout(state, left) {
            Ok((state, _)) => state,
            Err(poisoned) => poisoned.into_inner().0,
        };
    }
    // A later server in the same process lingers in full again.
    state.is_exiting = false;
}

/// The process's one lingering thread, started on first use.
static LINGERER: OnceLock<Option<Arc<Lingerer>>> = OnceLock::new();

fn lingerer() -> Option<&'static Arc<Lingerer>> {
    LINGERER.get_or_init(start_lingerer).as_ref()
}

fn start_lingerer() -> Option<Arc<Lingerer>> {
    let started = EventFd::new().and_then(|wake| {
        let lingerer = Arc::new(Lingerer {
            state: Mutex::new(LingererState::default()),
            settled: Condvar::new(),
            wake,
        });
        let shared = lingerer.clone();
        std::thread::Builder::new()
            .name("reverb-linger".into())
            .spawn(move || shared.run())?;
        Ok(lingerer)
    });
    match started {
        Ok(lingerer) => Some(lingerer),
        Err(e) => {
            tracing::warn!(
                "cannot start the lingering-close thread: {e}; connections the server ends \
                 are closed at once"
            );
            None
        }
    }
}

/// The lingering thread and what it shares with the threads that hand sockets to it.
#[derive(Debug)]
struct Lingerer {
    state: Mutex<LingererState>,
    /// Signalled whenever nothing is left lingering.
    settled: Condvar,
    /// Wakes the thread: a socket was handed over, or shutdown began.
    wake: EventFd,
}

/// A socket handed to the lingering thread, with the place under `--max-conns` that it
/// holds until the thread closes it.
#[derive(Debug)]
struct Handed {
    stream: Stream,
    _place: Option<Admission>,
}

#[derive(Debug, Default)]
struct LingererState {
    /// Sockets handed over and not yet taken by the thread.
    incoming: Vec<Handed>,
    /// How many sockets the thread holds.
    lingering: usize,
    /// Whether shutdown began: close settled sockets at once.
    is_exiting: bool,
}

impl Lingerer {
    fn lock(&self) -> MutexGuard<'_, LingererState> {
        // A panic elsewhere cannot leave this state half-changed: every change is one
        // assignment or push.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn add(&self, handed: Handed) {
        self.lock().incoming.push(handed);
        if let Err(e) = self.wake.notify() {
            tracing::debug!("cannot wake the lingering-close thread: {e}");
        }
    }

    fn run(&self) {
        let mut lingering: Vec<(Handed, Lingering)> = Vec::new();
        let mut entries = Vec::new();
        let mut timeout = None;
        loop {
            entries.clear();
            entries.push(poll::entry(self.wake.as_fd(), POLLIN));
            entries.extend(
                lingering
                    .iter()
                    .map(|(h, l)| poll::entry(h.stream.as_fd(), l.events())),
            );
            if let Err(e) = poll::poll(&mut entries, timeout) {
                // Only a lack of kernel memory gets here; closing is what is left.
                tracing::warn!("lingering close: poll failed: {e}; closing those sockets");
                lingering.clear();
            }
            let _ = self.wake.drain();
            let now = Instant::now();
            let mut steps: Vec<Step> = lingering
                .iter_mut()
                .zip(entries.iter().skip(1))
                .map(|((handed, state), entry)| {
                    if entry.revents != 0 {
                        state.discard(&handed.stream, now)
                    } else {
                        state.look(&handed.stream, now)
                    }
                })
                .collect();
            let is_exiting = {
                let mut state = self.lock();
                for handed in state.incoming.drain(..) {
                    lingering.push((handed, Lingering::new(now)));
                    steps.push(Step::Wait);
                }
                // Counted before they leave `incoming`, so `finish` never sees a gap.
                state.lingering = lingering.len();
                state.is_exiting
            };
            let mut steps = steps.into_iter();
            // Dropping a socket closes it and releases its place under --max-conns.
            lingering.retain(|(handed, _)| {
                steps.next() == Some(Step::Wait) && !(is_exiting && is_settled(&handed.stream))
            });
            let mut state = self.lock();
            state.lingering = lingering.len();
            if lingering.is_empty() && state.incoming.is_empty() {
                self.settled.notify_all();
            }
            drop(state);
            timeout = lingering.iter().map(|(_, l)| l.next_look(now)).min();
            if is_exiting && !lingering.is_empty() {
                timeout = Some(timeout.map_or(EXIT_RECHECK, |t| t.min(EXIT_RECHECK)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    fn pair() -> (Stream, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        theirs
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        // A close that stopped reading too early must fail a test, not hang its writes.
        theirs
            .set_write_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        (Stream::Unix(ours), theirs)
    }

    #[test]
    fn the_peer_reads_eof_and_its_bytes_are_thrown_away_until_its_eof() {
        let (ours, mut theirs) = pair();
        ours.write(b"owed").unwrap();
        theirs.write_all(b"unread").unwrap();
        let shutdown = Shutdown::new().unwrap();
        let closer = std::thread::spawn(move || {
            linger_here(&ours, &shutdown, Duration::from_secs(5));
        });
        let mut got = Vec::new();
        theirs.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"owed");
        // Just under the 1 MiB bound: all of it is read and thrown away, and then the EOF,
        // so the close leaves nothing unread and the peer reads no reset.
        let mut writer = theirs.try_clone().unwrap();
        let sender = std::thread::spawn(move || {
            writer.write_all(&vec![0u8; 1_000_000]).unwrap();
            writer.shutdown(std::net::Shutdown::Write).unwrap();
        });
        sender.join().unwrap();
        closer.join().unwrap();
        let mut rest = [0u8; 1];
        let after = theirs.read(&mut rest);
        assert!(
            matches!(after, Ok(0)),
            "{after:?} after sending 1,000,000 bytes to a lingering close"
        );
    }

    #[test]
    fn a_peer_that_floods_is_cut_at_the_byte_bound() {
        let (ours, theirs) = pair();
        let mut writer = theirs.try_clone().unwrap();
        let flood = std::thread::spawn(move || {
            let chunk = [1u8; 64 * 1024];
            let mut sent = 0;
            while writer.write_all(&chunk).is_ok() {
                sent += chunk.len();
            }
            sent
        });
        let start = Instant::now();
        linger_here(&ours, &Shutdown::new().unwrap(), Duration::from_secs(5));
        assert!(start.elapsed() < LINGER_TIME, "{:?}", start.elapsed());
        drop(ours);
        let sent = flood.join().unwrap();
        assert!(sent >= LINGER_MAX_BYTES, "cut after {sent} bytes");
    }

    /// A peer that sent far more than the byte bound before the server stopped reading (a
    /// drain with a peer that does not read) still gets every reply the server queued: the
    /// close waits for the send queue to empty instead of resetting it away.
    #[test]
    fn past_the_byte_bound_every_queued_reply_still_arrives() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut theirs = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        theirs
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let ours = Stream::Tcp(listener.accept().unwrap().0);
        ours.set_nonblocking(true).unwrap();
        // Replies owed: as many as the kernel queues while the peer reads nothing.
        let mut owed = 0;
        let chunk = [7u8; 64 * 1024];
        // At most 64 MiB, far past any send buffer, and a write that takes nothing ends it
        // too: a `send` that always says 0, or claims bytes it never took, must fail the
        // test, not spin here for ever.
        for _ in 0..1024 {
            match ours.write(&chunk) {
                Ok(n) if n > 0 => owed += n,
                _ => break,
            }
        }
        assert!(owed > 0);
        // The peer's input: more than the bound, in flight before the close.
        let mut writer = theirs.try_clone().unwrap();
        let flood = std::thread::spawn(move || {
            let chunk = [1u8; 64 * 1024];
            for _ in 0..48 {
                if writer.write_all(&chunk).is_err() {
                    break;
                }
            }
        });
        let closer = std::thread::spawn(move || {
            linger_here(&ours, &Shutdown::new().unwrap(), Duration::from_secs(5));
        });
        std::thread::sleep(Duration::from_millis(300));
        let mut got = 0;
        let mut buf = [0u8; 64 * 1024];
        let ended = loop {
            match theirs.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => got += n,
                Err(e) => break Err(e),
            }
        };
        closer.join().unwrap();
        drop(theirs);
        let _ = flood.join();
        assert_eq!(got, owed, "{ended:?} after {got} of {owed} owed bytes");
    }

    #[test]
    fn the_inactivity_bound_ends_a_silent_linger() {
        let mut lingering = Lingering::new(Instant::now());
        let start = lingering.since;
        assert_eq!(lingering.check(start), Step::Wait);
        assert_eq!(lingering.check(start + LINGER_TIMEOUT), Step::Close);
        lingering.last_input = start + Duration::from_secs(1);
        assert_eq!(lingering.check(start + LINGER_TIMEOUT), Step::Wait);
        lingering.last_input = start + LINGER_TIME;
        assert_eq!(lingering.check(start + LINGER_TIME), Step::Close);
    }

    /// The byte bound is exact: exactly [`LINGER_MAX_BYTES`] thrown away is still within
    /// it, so the socket is still read; one byte more and nothing more is read.
    #[test]
    fn the_byte_bound_is_exact() {
        let (ours, mut theirs) = pair();
        ours.set_nonblocking(true).unwrap();
        // Something owed that the peer has not taken, so that past the bound the close
        // waits instead of ending.
        ours.write(b"owed").unwrap();
        let now = Instant::now();
        let mut lingering = Lingering::new(now);
        let chunk = [1u8; 64 * 1024];
        let mut fed = 0;
        while fed < LINGER_MAX_BYTES {
            let n = chunk.len().min(LINGER_MAX_BYTES - fed);
            theirs.write_all(&chunk[..n]).unwrap();
            fed += n;
            assert_eq!(
                lingering.discard(&ours, now),
                Step::Wait,
                "after {fed} bytes"
            );
            assert_eq!(lingering.events(), POLLIN, "stopped reading at {fed} bytes");
        }
        assert_eq!(lingering.discarded, LINGER_MAX_BYTES);
        assert_eq!(
            lingering.events(),
            POLLIN,
            "exactly at the bound: still reading"
        );
        theirs.write_all(&[1, 2]).unwrap();
        assert_eq!(lingering.discard(&ours, now), Step::Wait);
        assert_eq!(lingering.events(), 0, "past the bound: waits for no input");
        assert_eq!(lingering.next_look(now), EXIT_RECHECK);
        theirs.write_all(&[3]).unwrap();
        assert_eq!(lingering.discard(&ours, now), Step::Wait);
        assert_eq!(
            lingering.discarded,
            LINGER_MAX_BYTES + 2,
            "nothing more is read past the bound"
        );
    }

    /// Before the byte bound the close sleeps until its deadline (input wakes it); past
    /// it, it looks at the send queue every [`EXIT_RECHECK`], never less.
    #[test]
    fn a_lingering_close_sleeps_until_its_deadline() {
        let start = Instant::now();
        let mut lingering = Lingering::new(start);
        assert_eq!(lingering.events(), POLLIN);
        assert_eq!(lingering.next_look(start), LINGER_TIMEOUT);
        let later = start + Duration::from_millis(500);
        assert_eq!(lingering.next_look(later), LINGER_TIMEOUT - (later - start));
        lingering.untaken = Some(1);
        assert_eq!(lingering.next_look(start), EXIT_RECHECK);
    }

    /// Past the byte bound, only replies the peer takes count as progress: a look that
    /// finds the send queue as it was leaves the inactivity deadline where it was.
    #[test]
    fn past_the_byte_bound_only_taken_replies_are_progress() {
        let (ours, mut theirs) = pair();
        // Two writes, two buffers in the queue: reading the first frees it.
        ours.write(b"first").unwrap();
        ours.write(b"second").unwrap();
        let start = Instant::now();
        let mut lingering = Lingering::new(start);
        lingering.untaken = Some(usize::MAX);
        assert_eq!(lingering.look(&ours, start), Step::Wait);
        let second = start + Duration::from_secs(1);
        assert_eq!(lingering.look(&ours, second), Step::Wait);
        assert_eq!(lingering.last_input, start, "nothing taken is no progress");
        assert_eq!(
            lingering.look(&ours, start + LINGER_TIMEOUT),
            Step::Close,
            "{LINGER_TIMEOUT:?} without progress"
        );
        let mut lingering = Lingering::new(start);
        lingering.untaken = Some(usize::MAX);
        assert_eq!(lingering.look(&ours, start), Step::Wait);
        let mut first = [0u8; 5];
        theirs.read_exact(&mut first).unwrap();
        assert_eq!(lingering.look(&ours, second), Step::Wait);
        assert_eq!(lingering.last_input, second, "a reply taken is progress");
        assert_eq!(lingering.look(&ours, start + LINGER_TIMEOUT), Step::Wait);
        assert_eq!(lingering.look(&ours, second + LINGER_TIMEOUT), Step::Close);
    }

    /// Runs `linger_here` on a thread, with shutdown firing `fire_after` later; returns
    /// the thread and the shutdown.
    fn linger_here_until_shutdown(
        ours: Stream,
        drain_timeout: Duration,
    ) -> (std::thread::JoinHandle<()>, Shutdown) {
        let shutdown = Shutdown::new().unwrap();
        let theirs = shutdown.clone();
        let closer = std::thread::spawn(move || linger_here(&ours, &theirs, drain_timeout));
        (closer, shutdown)
    }

    /// Waits up to `limit` for `closer` to end; how long it took.
    fn ends_within(closer: &std::thread::JoinHandle<()>, limit: Duration) -> Option<Duration> {
        let start = Instant::now();
        while !closer.is_finished() {
            if start.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Some(start.elapsed())
    }

    /// At shutdown, a lingering close whose peer has taken everything and left nothing
    /// unread ends at once, even while the peer keeps sending (which, without shutdown,
    /// keeps it lingering up to [`LINGER_TIME`]).
    #[test]
    fn at_shutdown_a_settled_linger_ends_at_once() {
        let (ours, mut theirs) = pair();
        let (closer, shutdown) = linger_here_until_shutdown(ours, Duration::from_secs(30));
        for _ in 0..5 {
            theirs.write_all(b"x").unwrap();
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(!closer.is_finished(), "a peer that sends is lingered on");
        shutdown.fire();
        let mut sender = theirs.try_clone().unwrap();
        let chatter = std::thread::spawn(move || {
            for _ in 0..30 {
                if sender.write_all(b"x").is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let took = ends_within(&closer, LINGER_TIME);
        chatter.join().unwrap();
        let took = took.expect("still lingering");
        assert!(
            took < Duration::from_millis(1200),
            "a settled lingering close ended {took:?} after shutdown, not at once"
        );
    }

    /// At shutdown, a lingering close whose peer has not taken every reply goes on, up to
    /// [`exit_bound`] after shutdown, and the peer still gets those replies.
    #[test]
    fn at_shutdown_an_unsettled_linger_waits_up_to_the_exit_bound() {
        let (ours, mut theirs) = pair();
        ours.write(b"owed").unwrap();
        let drain_timeout = Duration::from_secs(1);
        let (closer, shutdown) = linger_here_until_shutdown(ours, drain_timeout);
        std::thread::sleep(Duration::from_millis(100));
        shutdown.fire();
        std::thread::sleep(Duration::from_millis(500));
        assert!(
            !closer.is_finished(),
            "closed within 0.5 s of shutdown with a reply untaken"
        );
        theirs.write_all(b"late").expect("still lingering");
        ends_within(&closer, LINGER_TIME).expect("still lingering past every bound");
        let mut got = Vec::new();
        theirs.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"owed");
    }

    #[test]
    fn handed_off_sockets_close_at_the_peers_eof_and_release_their_place() {
        let (ours, mut theirs) = pair();
        theirs.write_all(b"late").unwrap();
        let counter = crate::server::ConnectionCounter::new(Some(1));
        hand_off(ours, counter.admit());
        let mut got = Vec::new();
        theirs.read_to_end(&mut got).unwrap();
        assert!(got.is_empty());
        // Settled (the peer has everything, nothing is unread) but not at shutdown: the
        // lingering thread keeps it until the peer's EOF or a bound.
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(counter.open(), 1, "a lingering socket holds its place");
        // Bytes that reach the lingering thread itself: it reads them, then the EOF.
        theirs.write_all(b"later").unwrap();
        theirs.shutdown(std::net::Shutdown::Write).unwrap();
        // The lingering thread takes the peer's EOF, closes our end, frees the place.
        let deadline = Instant::now() + Duration::from_secs(10);
        while counter.open() > 0 {
            assert!(Instant::now() < deadline, "still lingering");
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut rest = [0u8; 1];
        let after = theirs.read(&mut rest);
        assert!(
            matches!(after, Ok(0)),
            "{after:?}: closed with the peer's bytes unread"
        );
    }
}
