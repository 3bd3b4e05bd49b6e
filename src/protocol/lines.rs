//! `lines`: each `\n`-terminated line comes back as `PREFIX + line + "\n"`.
//!
//! The session streams: the prefix goes out with the first byte of a line and the rest of
//! the line follows as it arrives, so a peer that never sends `\n` costs no memory. The
//! bytes on the wire are exactly those of answering whole lines, for any split of the input.
//!
//! The one exception is the `--panic-on` word: while the line so far could still equal it,
//! those few bytes are held back, so a line that panics never had any of its reply sent.

use super::{Flow, panic_on_word};
use crate::buffer::WriteBuffer;
use std::sync::Arc;

/// Line-splitting state of one connection.
#[derive(Debug)]
pub struct Lines {
    prefix: Arc<[u8]>,
    panic_on: Option<Arc<[u8]>>,
    /// Whether the current line's prefix has gone out.
    has_started_line: bool,
    /// Start of the current line, held while it is still a prefix of the panic word.
    pub(super) held: Vec<u8>,
}

impl Lines {
    /// A session at the start of its first line.
    pub fn new(prefix: Arc<[u8]>, panic_on: Option<Arc<[u8]>>) -> Self {
        Lines {
            prefix,
            panic_on,
            has_started_line: false,
            held: Vec::new(),
        }
    }

    /// Queues the reply to every line `input` ends, and the start of the line it begins.
    pub fn on_data(&mut self, mut input: &[u8], out: &mut WriteBuffer) -> Flow {
        while !input.is_empty() {
            match memchr::memchr(b'\n', input) {
                Some(end) => {
                    self.take(&input[..end], out);
                    self.end_line(out);
                    input = &input[end + 1..];
                }
                None => {
                    self.take(input, out);
                    input = &[];
                }
            }
        }
        Flow::Continue
    }

    /// The peer half-closed: a trailing partial line goes out without a newline.
    pub fn on_eof(&mut self, out: &mut WriteBuffer) {
        if !self.has_started_line && !self.held.is_empty() {
            out.push(&self.prefix);
            out.push(&self.held);
            self.held.clear();
        }
    }

    /// Bytes of the current line, with no `\n` among them.
    fn take(&mut self, piece: &[u8], out: &mut WriteBuffer) {
        if piece.is_empty() {
            return;
        }
        if !self.has_started_line {
            if let Some(word) = &self.panic_on {
                let so_far = self.held.len();
                if word.len() >= so_far + piece.len() && word[so_far..].starts_with(piece) {
                    self.held.extend_from_slice(piece);
                    return;
                }
            }
            out.push(&self.prefix);
            out.push(&self.held);
            self.held.clear();
            self.has_started_line = true;
        }
        out.push(piece);
    }

    /// A `\n` arrived: finish the current line.
    fn end_line(&mut self, out: &mut WriteBuffer) {
        if !self.has_started_line {
            if let Some(word) = &self.panic_on {
                if self.held == word[..] {
                    panic_on_word(word);
                }
            }
            out.push(&self.prefix);
            out.push(&self.held);
            self.held.clear();
        }
        out.push(b"\n");
        self.has_started_line = false;
    }
}
