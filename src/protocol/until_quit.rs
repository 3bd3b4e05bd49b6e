//! `until-quit`: collect input until it ends with `quit\n` or the peer half-closes, then
//! send everything collected back once, as `PREFIX + all`, and close.
//!
//! The tutorial this grew from kept collecting without a bound. Here, once more than the hold
//! limit is collected, all but the last few bytes are streamed out early: the bytes on the
//! wire are the same, memory stays bounded, and nothing is lost. The last
//! `QUIT.len() - 1` bytes stay held so that a `quit\n` split across reads is still seen.

use super::Flow;
use crate::buffer::WriteBuffer;
use std::sync::Arc;

/// The input that ends a session.
pub const QUIT: &[u8] = b"quit\n";

/// Collecting state of one connection.
#[derive(Debug)]
pub struct UntilQuit {
    prefix: Arc<[u8]>,
    hold_limit_bytes: usize,
    held: Vec<u8>,
    has_sent_prefix: bool,
    is_finished: bool,
}

impl UntilQuit {
    /// A session that holds up to `hold_limit_bytes` before it streams.
    pub fn new(prefix: Arc<[u8]>, hold_limit_bytes: usize) -> Self {
        UntilQuit {
            prefix,
            hold_limit_bytes: hold_limit_bytes.max(QUIT.len()),
            held: Vec::new(),
            has_sent_prefix: false,
            is_finished: false,
        }
    }

    /// Collects `input`; answers and asks to close once the input ends with `quit\n`.
    pub fn on_data(&mut self, input: &[u8], out: &mut WriteBuffer) -> Flow {
        if self.is_finished {
            return Flow::Close;
        }
        // `quit\n` may straddle the previous read, whose last bytes are still held; input
        // after it in the same read is not collected.
        let search_from = self.held.len().saturating_sub(QUIT.len() - 1);
        self.held.extend_from_slice(input);
        if let Some(at) = memchr::memmem::find(&self.held[search_from..], QUIT) {
            self.held.truncate(search_from + at + QUIT.len());
            self.finish(out);
            return Flow::Close;
        }
        if self.held.len() > self.hold_limit_bytes {
            let keep = QUIT.len() - 1;
            let send = self.held.len() - keep;
            self.send_prefix_once(out);
            out.push(&self.held[..send]);
            self.held.drain(..send);
        }
        Flow::Continue
    }

    /// Bytes collected and not yet owed.
    pub fn held_bytes(&self) -> usize {
        self.held.len()
    }

    /// The peer half-closed: everything collected goes back.
    pub fn on_eof(&mut self, out: &mut WriteBuffer) {
        if !self.is_finished {
            self.finish(out);
        }
    }

    fn finish(&mut self, out: &mut WriteBuffer) {
        self.send_prefix_once(out);
        out.push(&self.held);
        self.held = Vec::new();
        self.is_finished = true;
    }

    fn send_prefix_once(&mut self, out: &mut WriteBuffer) {
        if !self.has_sent_prefix {
            out.push(&self.prefix);
            self.has_sent_prefix = true;
        }
    }
}
