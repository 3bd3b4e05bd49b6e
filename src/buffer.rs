//! `WriteBuffer`: the only place where bytes owed to a peer wait.
//!
//! Every model writes the same way: offer [`WriteBuffer::unsent`] to the kernel, then call
//! [`WriteBuffer::advance`] with the count the kernel took. The kernel may take fewer bytes
//! than offered (a short write); the rest stays here until the socket is writable again.
//! The tutorials called `send()` and dropped whatever it did not take; this type makes that
//! mistake impossible to write without ignoring a return value.
//!
//! The buffer is bounded: once [`WriteBuffer::is_full`] says so, the model stops reading
//! from that peer until it reads its replies (backpressure). A model asks
//! [`WriteBuffer::room`] how much it may read, so one read's replies never push the buffer
//! far past its bound.

/// Bytes owed to one peer, at most about `max_bytes` of them.
#[derive(Debug)]
pub struct WriteBuffer {
    /// Owed bytes are `bytes[start..]`; the sent prefix is reclaimed lazily so that an
    /// `advance` after a short write costs no copy.
    bytes: Vec<u8>,
    start: usize,
    max_bytes: usize,
}

impl WriteBuffer {
    /// An empty buffer that reports full at `max_bytes` owed bytes (at least one byte).
    pub fn new(max_bytes: usize) -> Self {
        WriteBuffer {
            bytes: Vec::new(),
            start: 0,
            max_bytes: max_bytes.max(1),
        }
    }

    /// Appends bytes owed to the peer.
    ///
    /// This never refuses: the protocol core has already produced the reply. Callers keep
    /// the total bounded by reading at most [`WriteBuffer::room`] bytes at a time.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start == self.bytes.len() {
            // Everything before was sent: reuse the allocation from its start.
            self.bytes.clear();
            self.start = 0;
        } else if self.start > 0 && self.start >= self.bytes.len() / 2 {
            // More than half is already sent: compact instead of growing.
            self.bytes.drain(..self.start);
            self.start = 0;
        }
        self.bytes.extend_from_slice(bytes);
    }

    /// Puts `bytes` before everything owed: bytes offered to the kernel from somewhere
    /// else (a send straight from a read buffer) that it did not take, and that are owed
    /// before whatever was pushed since.
    pub fn push_front(&mut self, bytes: &[u8]) {
        if let Some(start) = self.start.checked_sub(bytes.len()) {
            // The sent prefix has room: no bytes move.
            self.bytes[start..self.start].copy_from_slice(bytes);
            self.start = start;
        } else {
            self.bytes
                .splice(self.start..self.start, bytes.iter().copied());
        }
    }

    /// The owed bytes, in order: what to offer the kernel next.
    #[inline]
    pub fn unsent(&self) -> &[u8] {
        &self.bytes[self.start..]
    }

    /// Records that the kernel took the first `written` bytes of [`WriteBuffer::unsent`].
    ///
    /// # Panics
    ///
    /// Panics if `written` is more than is owed: that would mean the caller counted bytes
    /// the kernel was never offered.
    pub fn advance(&mut self, written: usize) {
        assert!(
            written <= self.len(),
            "advance({written}) past the {} owed bytes",
            self.len()
        );
        self.start += written;
        if self.start == self.bytes.len() {
            self.bytes.clear();
            self.start = 0;
            // A burst may have grown the allocation far past the bound; give it back.
            if self.bytes.capacity() > 2 * self.max_bytes {
                self.bytes.shrink_to(self.max_bytes);
            }
        }
    }

    /// Lends `spare`'s allocation to this buffer while it holds none, so that the next
    /// [`WriteBuffer::push`] costs no allocation. An event loop keeps one spare and lends
    /// it to whichever connection it is serving.
    #[inline]
    pub fn lend_spare(&mut self, spare: &mut Vec<u8>) {
        if self.bytes.capacity() == 0 {
            spare.clear();
            std::mem::swap(&mut self.bytes, spare);
            self.start = 0;
        }
    }

    /// Once nothing is owed, hands the allocation back to `spare` (or frees it when the
    /// spare already has one), so that an idle connection holds no heap bytes here.
    #[inline]
    pub fn return_spare(&mut self, spare: &mut Vec<u8>) {
        if !self.is_empty() || self.bytes.capacity() == 0 {
            return;
        }
        if spare.capacity() == 0 {
            std::mem::swap(&mut self.bytes, spare);
            spare.clear();
        } else {
            self.bytes = Vec::new();
        }
        self.start = 0;
    }

    /// How many bytes are owed.
    #[inline]
    pub fn len(&self) -> usize {
        self.bytes.len() - self.start
    }

    /// Whether nothing is owed.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the owed bytes reached the bound: stop reading this peer until it drains.
    #[inline]
    pub fn is_full(&self) -> bool {
        self.len() >= self.max_bytes
    }

    /// The bound this buffer was made with (`max_bytes` of [`WriteBuffer::new`]), so an
    /// idle connection can drop its allocation and get a fresh buffer with the same bound.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// How many more bytes fit under the bound.
    #[inline]
    pub fn room(&self) -> usize {
        self.max_bytes.saturating_sub(self.len())
    }

    /// Heap bytes held by this buffer, for memory accounting in tests.
    #[inline]
    pub fn capacity(&self) -> usize {
        self.bytes.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn push_front_owes_bytes_before_those_pushed() {
        let mut buffer = WriteBuffer::new(64);
        buffer.push(b"abcdef");
        buffer.advance(4);
        buffer.push_front(b"12");
        assert_eq!(buffer.unsent(), b"12ef");
        buffer.push_front(b"xyz");
        assert_eq!(buffer.unsent(), b"xyz12ef");
        buffer.push(b"!");
        assert_eq!(buffer.unsent(), b"xyz12ef!");
        assert_eq!(buffer.len(), 8);
    }

    #[test]
    fn short_writes_keep_order() {
        let mut out = WriteBuffer::new(16);
        out.push(b"hello ");
        out.push(b"world");
        assert_eq!(out.unsent(), b"hello world");
        out.advance(3);
        assert_eq!(out.unsent(), b"lo world");
        out.push(b"!");
        out.advance(2);
        assert_eq!(out.unsent(), b" world!");
        out.advance(7);
        assert!(out.is_empty());
    }

    #[test]
    fn full_at_the_bound() {
        let mut out = WriteBuffer::new(4);
        out.push(b"abc");
        assert!(!out.is_full());
        assert_eq!(out.room(), 1);
        out.push(b"d");
        assert!(out.is_full());
        assert_eq!(out.room(), 0);
        out.advance(1);
        assert!(!out.is_full());
    }

    #[test]
    fn a_rebuilt_buffer_keeps_the_bound() {
        // A connection that drops its allocation after a burst rebuilds the buffer from
        // `max_bytes`: the new buffer must be full exactly where the old one was.
        let old = WriteBuffer::new(4096);
        assert_eq!(old.max_bytes(), 4096);
        let mut rebuilt = WriteBuffer::new(old.max_bytes());
        assert_eq!(rebuilt.room(), 4096);
        rebuilt.push(&[0u8; 4095]);
        assert!(!rebuilt.is_full(), "one byte under the bound is not full");
        rebuilt.push(b"x");
        assert!(rebuilt.is_full());
        assert_eq!(
            WriteBuffer::new(0).max_bytes(),
            1,
            "the bound is at least one byte"
        );
    }

    #[test]
    #[should_panic(expected = "past the")]
    fn advance_past_owed_panics() {
        let mut out = WriteBuffer::new(4);
        out.push(b"ab");
        out.advance(3);
    }

    #[test]
    fn spare_is_lent_and_returned() {
        let mut spare = Vec::with_capacity(64);
        let mut out = WriteBuffer::new(1024);
        out.lend_spare(&mut spare);
        assert_eq!(spare.capacity(), 0);
        assert!(out.capacity() >= 64);
        out.push(b"abc");
        out.return_spare(&mut spare);
        assert_eq!(
            spare.capacity(),
            0,
            "nothing is returned while bytes are owed"
        );
        out.advance(3);
        out.return_spare(&mut spare);
        assert!(spare.capacity() >= 64);
        assert_eq!(out.capacity(), 0, "an empty buffer holds no allocation");
    }

    #[test]
    fn a_small_advance_moves_no_bytes() {
        // The promise of `start`: after a short write, the owed bytes stay where they are
        // until the sent prefix is at least half of the buffer.
        let mut buffer = WriteBuffer::new(1 << 20);
        buffer.push(&[7u8; 100]);
        buffer.advance(10);
        buffer.push(b"x");
        assert_eq!(buffer.start, 10, "the owed bytes were moved to the front");
        assert_eq!(buffer.unsent().len(), 91);
    }

    #[test]
    fn a_burst_gives_its_memory_back_once_sent() {
        let mut out = WriteBuffer::new(1024);
        out.push(&[7u8; 1 << 20]);
        assert!(out.capacity() >= 1 << 20);
        // Sent in pieces, as the kernel takes it; the memory is given back only at the end.
        out.advance(1000);
        out.advance((1 << 20) - 1001);
        assert!(out.capacity() >= 1 << 20, "still owed: nothing given back");
        out.advance(1);
        assert!(out.is_empty());
        assert!(
            out.capacity() <= 2 * 1024,
            "capacity {} after the burst was sent, bound 1024",
            out.capacity()
        );
    }

    #[test]
    fn an_allocation_near_the_bound_is_kept_for_reuse() {
        let mut spare = Vec::with_capacity(2 * 1024);
        let mut out = WriteBuffer::new(1024);
        out.lend_spare(&mut spare);
        let kept = out.capacity();
        out.push(b"abc");
        out.advance(3);
        assert_eq!(
            out.capacity(),
            kept,
            "no allocation churn for small replies"
        );
    }

    #[test]
    fn a_mostly_sent_buffer_compacts_instead_of_growing() {
        let mut out = WriteBuffer::new(1 << 20);
        out.push(&[1u8; 1000]);
        let capacity = out.capacity();
        out.advance(900);
        // 900 of 1000 sent: the next push moves the 100 owed bytes to the front.
        out.push(&[2u8; 800]);
        assert_eq!(out.capacity(), capacity, "reused, not grown");
        assert_eq!(out.len(), 900);
        assert!(out.unsent()[..100].iter().all(|&b| b == 1));
        assert!(out.unsent()[100..].iter().all(|&b| b == 2));
    }

    proptest! {
        /// Random pushes and partial writes deliver exactly the pushed bytes, in order, and
        /// the allocation stays within a small multiple of what is owed plus the bound.
        #[test]
        fn push_advance_preserves_bytes(
            max in 1usize..256,
            ops in proptest::collection::vec((proptest::collection::vec(any::<u8>(), 0..64), 0usize..80), 0..200)
        ) {
            let mut out = WriteBuffer::new(max);
            let mut pushed = Vec::new();
            let mut written = Vec::new();
            for (bytes, take) in ops {
                if out.room() > 0 {
                    let n = bytes.len().min(out.room());
                    out.push(&bytes[..n]);
                    pushed.extend_from_slice(&bytes[..n]);
                }
                let n = take.min(out.len());
                written.extend_from_slice(&out.unsent()[..n]);
                out.advance(n);
                prop_assert!(out.len() <= max);
                prop_assert!(out.capacity() <= 4 * max + 128);
            }
            written.extend_from_slice(out.unsent());
            prop_assert_eq!(written, pushed);
        }
    }
}
