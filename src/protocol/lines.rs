//! `lines`: each `\n`-terminated line comes back as `PREFIX + line + "\n"`, once its newline
//! has arrived and never before.
//!
//! A partial line waits here until its newline (or the peer's EOF) arrives. Only a line
//! longer than the hold limit (`--max-buffer`) is answered in pieces as it arrives, so a
//! peer that never sends `\n` costs at most the hold limit of memory. Either way the bytes
//! on the wire are exactly those of answering whole lines, for any split of the input.
//!
//! The `--panic-on` word is the one line that is never answered: a line that can still
//! become the word is held even past the hold limit (the word is at most as long as the
//! command line), so a line that panics never had any of its reply sent, and every line
//! before it was answered first.

use super::{Flow, panic_on_word};
use crate::buffer::WriteBuffer;
use std::sync::Arc;

/// A held line's allocation is kept for the next line up to this many bytes; a longer one
/// is freed, so that a connection that once sent a long line does not keep its memory.
const KEPT_HOLD_CAPACITY_BYTES: usize = 4096;

/// Line-splitting state of one connection.
#[derive(Debug)]
pub struct Lines {
    prefix: Arc<[u8]>,
    panic_on: Option<Arc<[u8]>>,
    hold_limit_bytes: usize,
    /// Whether the current line outgrew the hold limit: its prefix and first bytes went
    /// out, and the rest follows as it arrives.
    is_streaming: bool,
    /// The current line so far, while it is not streaming.
    pub(super) held: Vec<u8>,
}

impl Lines {
    /// A session at the start of its first line that holds a partial line of up to
    /// `hold_limit_bytes` until its newline.
    pub fn new(prefix: Arc<[u8]>, panic_on: Option<Arc<[u8]>>, hold_limit_bytes: usize) -> Self {
        Lines {
            prefix,
            panic_on,
            hold_limit_bytes,
            is_streaming: false,
            held: Vec::new(),
        }
    }

    /// Queues the reply to every line `input` ends; holds the line it begins.
    ///
    /// # Panics
    ///
    /// On a line equal to the panic word, after the replies to the lines before it were
    /// queued in `out`.
    pub fn on_data(&mut self, input: &[u8], out: &mut WriteBuffer) -> Flow {
        // An iterator over the newlines, not a loop that cuts `input` down: a wrong cut
        // then gives wrong lines, not a loop that never ends.
        let mut start = 0;
        for end in memchr::memchr_iter(b'\n', input) {
            self.end_line(&input[start..end], out);
            start = end + 1;
        }
        self.take(&input[start..], out);
        Flow::Continue
    }

    /// The peer half-closed: a trailing partial line goes out without a newline.
    pub fn on_eof(&mut self, out: &mut WriteBuffer) {
        if !self.is_streaming && !self.held.is_empty() {
            out.push(&self.prefix);
            out.push(&self.held);
            self.release_held();
        }
    }

    /// Bytes held for the current line.
    pub fn held_bytes(&self) -> usize {
        self.held.len()
    }

    /// Bytes of the current line, with no `\n` among them.
    fn take(&mut self, piece: &[u8], out: &mut WriteBuffer) {
        if piece.is_empty() {
            return;
        }
        if self.is_streaming {
            out.push(piece);
        } else if self.held.len() + piece.len() <= self.hold_limit_bytes
            || self.could_become_word(piece)
        {
            self.held.extend_from_slice(piece);
        } else {
            out.push(&self.prefix);
            out.push(&self.held);
            out.push(piece);
            self.release_held();
            self.is_streaming = true;
        }
    }

    /// Whether the held bytes followed by `piece` are still the start of the panic word.
    fn could_become_word(&self, piece: &[u8]) -> bool {
        self.panic_on.as_ref().is_some_and(|word| {
            word.starts_with(&self.held) && word[self.held.len()..].starts_with(piece)
        })
    }

    /// A `\n` arrived after `rest`, the last bytes of the current line.
    fn end_line(&mut self, rest: &[u8], out: &mut WriteBuffer) {
        if self.is_streaming {
            out.push(rest);
        } else {
            if let Some(word) = &self.panic_on {
                if word.len() == self.held.len() + rest.len()
                    && word.starts_with(&self.held)
                    && word[self.held.len()..] == *rest
                {
                    panic_on_word(word);
                }
            }
            out.push(&self.prefix);
            out.push(&self.held);
            out.push(rest);
            self.release_held();
        }
        out.push(b"\n");
        self.is_streaming = false;
    }

    fn release_held(&mut self) {
        if self.held.capacity() > KEPT_HOLD_CAPACITY_BYTES {
            self.held = Vec::new();
        } else {
            self.held.clear();
        }
    }
}
