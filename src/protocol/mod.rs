//! The sans-IO protocol core: what reverb answers, with no socket, clock or thread in sight.
//!
//! A stream connection is a [`Session`]: it is told that the peer connected, that bytes
//! arrived (in whatever pieces the kernel delivered them) and that the peer half-closed,
//! and each time it appends the bytes owed to the peer to a [`WriteBuffer`]. A datagram
//! socket is served by [`Protocol::reply_to_datagram`]: one datagram in, one reply out.
//!
//! Every model, from `blocking` to `uring`, drives these same types, so a protocol behaves
//! identically on every rung of the ladder and the tests can state it once.
//!
//! Memory stays bounded whatever the peer sends: `echo` holds nothing, `lines` holds a
//! partial line of at most its hold limit (or the `--panic-on` word, if longer) before it
//! answers it in pieces, and `until-quit` holds at most its hold limit before it starts
//! streaming what it collected. [`Session::held_bytes`] tells a model how much is held, so
//! that held and owed bytes together stay within `--max-buffer`.

mod echo;
mod lines;
mod until_quit;

use crate::buffer::WriteBuffer;
use std::sync::Arc;

pub use echo::Echo;
pub use lines::Lines;
pub use until_quit::UntilQuit;

/// Which reply rule a server speaks (`--protocol`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProtocolKind {
    /// Every byte back as received (RFC 862).
    Echo,
    /// Each `\n`-terminated line back as `PREFIX + line + "\n"`.
    Lines,
    /// Everything collected, once, when the input ends with `quit\n` or the peer half-closes.
    UntilQuit,
}

/// What the session wants after it consumed some input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Keep reading from the peer.
    Continue,
    /// Send what is owed, then close the connection; read nothing more.
    Close,
}

/// Everything a server was told about its protocol; makes one [`Session`] per connection.
///
/// Cloning is cheap: the strings are shared.
#[derive(Clone, Debug)]
pub struct Protocol {
    kind: ProtocolKind,
    prefix: Arc<[u8]>,
    greeting: Arc<[u8]>,
    panic_on: Option<Arc<[u8]>>,
    hold_limit_bytes: usize,
}

impl Protocol {
    /// A protocol of `kind` with no prefix, greeting or panic word.
    ///
    /// `hold_limit_bytes` bounds what `lines` holds of a partial line and what
    /// `until-quit` collects before either answers in pieces (the server's `--max-buffer`).
    pub fn new(kind: ProtocolKind, hold_limit_bytes: usize) -> Self {
        Protocol {
            kind,
            prefix: Arc::from(&b""[..]),
            greeting: Arc::from(&b""[..]),
            panic_on: None,
            hold_limit_bytes: hold_limit_bytes.max(1),
        }
    }

    /// Puts `prefix` in front of every reply unit.
    pub fn with_prefix(mut self, prefix: &[u8]) -> Self {
        self.prefix = Arc::from(prefix);
        self
    }

    /// Sends `greeting` first on every new stream connection.
    pub fn with_greeting(mut self, greeting: &[u8]) -> Self {
        self.greeting = Arc::from(greeting);
        self
    }

    /// Makes a `lines` handler panic on a line equal to `word` (a test of panic isolation).
    pub fn with_panic_on(mut self, word: &[u8]) -> Self {
        self.panic_on = Some(Arc::from(word));
        self
    }

    /// The reply rule.
    pub fn kind(&self) -> ProtocolKind {
        self.kind
    }

    /// A fresh session for one new stream connection.
    pub fn new_session(&self) -> Session {
        let state = match self.kind {
            ProtocolKind::Echo => State::Echo(Echo),
            ProtocolKind::Lines => State::Lines(Lines::new(
                self.prefix.clone(),
                self.panic_on.clone(),
                self.hold_limit_bytes,
            )),
            ProtocolKind::UntilQuit => {
                State::UntilQuit(UntilQuit::new(self.prefix.clone(), self.hold_limit_bytes))
            }
        };
        Session {
            state,
            greeting: self.greeting.clone(),
            max_expansion: 1 + self.prefix.len(),
        }
    }

    /// Appends the one reply to `datagram` to `reply`: `PREFIX + datagram`, whatever the
    /// protocol, because a datagram is already a whole unit.
    ///
    /// # Panics
    ///
    /// With `lines` and a panic word, panics when the datagram (without a final `\n`)
    /// equals it, exactly as a stream line would.
    pub fn reply_to_datagram(&self, datagram: &[u8], reply: &mut Vec<u8>) {
        if self.kind == ProtocolKind::Lines {
            if let Some(word) = &self.panic_on {
                let line = datagram.strip_suffix(b"\n").unwrap_or(datagram);
                if line == &word[..] {
                    panic_on_word(word);
                }
            }
        }
        reply.clear();
        reply.extend_from_slice(&self.prefix);
        reply.extend_from_slice(datagram);
    }
}

/// The deliberate panic of `--panic-on`, shared by streams and datagrams.
fn panic_on_word(word: &[u8]) -> ! {
    panic!(
        "the handler was asked to panic by the line {:?}",
        String::from_utf8_lossy(word)
    )
}

/// One stream connection's protocol state.
#[derive(Debug)]
pub struct Session {
    state: State,
    greeting: Arc<[u8]>,
    max_expansion: usize,
}

#[derive(Debug)]
enum State {
    Echo(Echo),
    Lines(Lines),
    UntilQuit(UntilQuit),
}

impl Session {
    /// The peer connected: queue the greeting, if any.
    pub fn on_connect(&mut self, out: &mut WriteBuffer) {
        if !self.greeting.is_empty() {
            out.push(&self.greeting);
        }
    }

    /// `input` arrived: queue the replies it completes.
    ///
    /// # Panics
    ///
    /// A `lines` session with a panic word panics on a line equal to it; the caller
    /// isolates that panic to this connection. When it does, `out` already holds the
    /// replies to every line before that one (in this `input` and earlier ones) and no byte
    /// of that line's reply, so a caller that sends what is owed before closing answers
    /// every earlier line whatever the segmentation.
    pub fn on_data(&mut self, input: &[u8], out: &mut WriteBuffer) -> Flow {
        match &mut self.state {
            State::Echo(echo) => echo.on_data(input, out),
            State::Lines(lines) => lines.on_data(input, out),
            State::UntilQuit(until_quit) => until_quit.on_data(input, out),
        }
    }

    /// The peer half-closed: queue whatever is still owed for the input so far.
    pub fn on_eof(&mut self, out: &mut WriteBuffer) {
        match &mut self.state {
            State::Echo(_) => {}
            State::Lines(lines) => lines.on_eof(out),
            State::UntilQuit(until_quit) => until_quit.on_eof(out),
        }
    }

    /// Whether every reply is exactly the input that caused it, owed as soon as it
    /// arrives (`echo`; stream `echo` takes no prefix): a model may then send input straight
    /// from its read buffer instead of copying it into a [`WriteBuffer`] first.
    pub fn echoes_input(&self) -> bool {
        matches!(self.state, State::Echo(_))
    }

    /// Input bytes held inside the session, not yet owed to the peer (a partial line, or
    /// what `until-quit` collected). A model counts them against the write buffer's bound.
    pub fn held_bytes(&self) -> usize {
        match &self.state {
            State::Echo(_) => 0,
            State::Lines(lines) => lines.held_bytes(),
            State::UntilQuit(until_quit) => until_quit.held_bytes(),
        }
    }

    /// At most how many reply bytes one input byte can cause (a `\n` becomes
    /// `PREFIX + "\n"`). Models read at most `(room - held) / max_expansion` bytes at a
    /// time so that one read's replies stay within the write buffer's bound.
    pub fn max_expansion(&self) -> usize {
        self.max_expansion
    }
}

#[cfg(test)]
mod tests;
