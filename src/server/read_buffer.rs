//! The read buffer of a loop or a loop's thread: one per loop, lent to one connection at a
//! time, starting a page.

/// Where a read buffer starts: a multiple of this many bytes, a page (and so a cache line).
const READ_BUFFER_ALIGN: usize = 4096;

/// A zeroed read buffer whose first byte starts a page.
///
/// Why: every message is copied twice by the kernel, into this buffer by `recvfrom` and
/// out of it by `sendto` (`_copy_to_iter`, `_copy_from_iter`, a `rep movsb` each), and
/// those copies run slower when the user-space side starts mid cache line. A 64 KiB `Vec`
/// from glibc's heap starts 16 bytes past a 32-byte boundary (its chunk header), and the
/// copies then took about 4 % of `epoll`'s server CPU at 1 KiB messages against 3 % when
/// it starts a page (cpu-clock samples of the two builds under the same load; the C
/// yardstick's static buffer, 32-byte aligned, took 2.8 %). Costs one page per loop.
#[derive(Debug)]
pub struct ReadBuffer {
    bytes: Vec<u8>,
    /// Where the aligned part of `bytes` starts.
    start: usize,
}

impl ReadBuffer {
    /// A buffer of at least `len` bytes.
    pub fn new(len: usize) -> Self {
        let bytes = vec![0; len + READ_BUFFER_ALIGN - 1];
        // `align_offset` may decline to answer (usize::MAX); unaligned is only slower.
        let start = bytes.as_ptr().align_offset(READ_BUFFER_ALIGN);
        let start = if start < READ_BUFFER_ALIGN { start } else { 0 };
        ReadBuffer { bytes, start }
    }

    /// Its first `len` bytes.
    ///
    /// # Panics
    ///
    /// When `len` exceeds the length it was made with.
    #[inline]
    pub fn first_mut(&mut self, len: usize) -> &mut [u8] {
        &mut self.bytes[self.start..self.start + len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::READ_BUFFER_BYTES;

    #[test]
    fn a_read_buffer_starts_a_page_and_holds_what_it_was_made_for() {
        for len in [1, 1000, READ_BUFFER_BYTES, 65_507 + 1] {
            let mut buf = ReadBuffer::new(len);
            let first = buf.first_mut(len);
            assert_eq!(first.len(), len);
            assert_eq!(first.as_ptr() as usize % READ_BUFFER_ALIGN, 0, "len {len}");
            assert!(first.iter().all(|&b| b == 0));
        }
    }
}
