//! `mmap(2)` with `MAP_SHARED | MAP_ANONYMOUS`: memory that a process and the children it
//! forks afterwards see alike, used for the metrics counters of the `forking` model.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;

/// A zero-filled region of 64-bit words shared with every child forked after its creation.
///
/// # Invariant
///
/// `words` points to a mapping of `len` `AtomicU64`s that this value owns: page-aligned
/// (so aligned for `AtomicU64`), readable and writable, and unmapped only by `Drop`.
#[derive(Debug)]
pub struct SharedWords {
    words: NonNull<AtomicU64>,
    len: usize,
}

// SAFETY: the region holds only atomics, which any thread may read and write through a
// shared reference; the pointer itself is never handed out mutably.
unsafe impl Send for SharedWords {}
// SAFETY: as above: `&SharedWords` gives out only `&[AtomicU64]`.
unsafe impl Sync for SharedWords {}

impl SharedWords {
    /// Maps `len` zeroed words shared with future children.
    ///
    /// # Errors
    ///
    /// `mmap`'s OS error (`ENOMEM`), or `InvalidInput` for a zero or overflowing length.
    pub fn new(len: usize) -> io::Result<Self> {
        let bytes = len
            .checked_mul(size_of::<AtomicU64>())
            .filter(|&bytes| bytes > 0)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad region length"))?;
        // SAFETY: a fresh anonymous mapping at an address the kernel picks: no existing
        // memory is touched, and no fd is involved (-1 with MAP_ANONYMOUS).
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let words = NonNull::new(address.cast::<AtomicU64>())
            .ok_or_else(|| io::Error::other("mmap returned a null mapping"))?;
        Ok(SharedWords { words, len })
    }

    /// The words, each an atomic: other threads and forked children write them too.
    pub fn words(&self) -> &[AtomicU64] {
        // SAFETY: by the invariant, `words` is valid and aligned for `len` AtomicU64s for
        // as long as `self` lives; the kernel zero-fills anonymous mappings, and zero is a
        // valid AtomicU64; all access goes through atomics, so sharing is sound.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr(), self.len) }
    }
}

impl Drop for SharedWords {
    fn drop(&mut self) {
        // SAFETY: by the invariant, this is our mapping of exactly this many bytes, and no
        // reference from `words()` outlives `self`.
        unsafe {
            libc::munmap(
                self.words.as_ptr().cast(),
                self.len * size_of::<AtomicU64>(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn zeroed_and_writable() {
        let region = SharedWords::new(1000).expect("mmap");
        assert!(
            region
                .words()
                .iter()
                .all(|w| w.load(Ordering::Relaxed) == 0)
        );
        region.words()[999].store(7, Ordering::Relaxed);
        assert_eq!(region.words()[999].load(Ordering::Relaxed), 7);
    }
}
