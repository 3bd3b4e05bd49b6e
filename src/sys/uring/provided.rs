//! The provided-buffer ring: receive buffers the kernel picks from when bytes arrive, so
//! an idle connection holds no receive memory.
//!
//! A buffer is the kernel's while it sits in the ring, and ours from the completion that
//! names it until [`ProvidedBuffers::recycle`] puts it back. The completion's claim is a
//! [`Received`], which is neither `Copy` nor `Clone`: whoever holds it may read the bytes,
//! and giving it back is the only way to recycle them.

use io_uring::{IoUring, types};
use std::alloc::{self, Layout};
use std::io;
use std::mem;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

/// The id of our one buffer group.
pub(super) const BUFFER_GROUP: u16 = 1;

/// Bytes a receive completion put in a provided buffer: which buffer, and how many.
///
/// Hand them on with [`super::Ring::take_received`], which gives the buffer back (or
/// keeps it lent to the send of the same bytes); until then the buffer stays out of the
/// kernel's reach.
#[derive(Debug)]
#[must_use = "a provided buffer stays lent until given back to Ring::recycle"]
pub struct Received {
    id: u16,
    len: usize,
}

impl Received {
    /// How many bytes arrived.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no bytes arrived (never the case for a completion that named a buffer).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The provided-buffer ring: entries the kernel takes buffers from, and the buffers.
///
/// # Invariant
///
/// `entries` (page-aligned, `count` entries) and `memory` (`count * size` bytes) stay
/// allocated while registered with the ring; a buffer whose id is marked in `is_lent`
/// belongs to us (the kernel neither reads nor writes it) until [`Self::recycle`].
pub(super) struct ProvidedBuffers {
    entries: NonNull<types::BufRingEntry>,
    memory: NonNull<u8>,
    count: u16,
    size: usize,
    tail: u16,
    is_lent: Vec<bool>,
    /// Buffers given back to the kernel so far (wrapping).
    given_back: u64,
}

impl ProvidedBuffers {
    fn entries_layout(count: u16) -> io::Result<Layout> {
        Layout::from_size_align(
            usize::from(count) * mem::size_of::<types::BufRingEntry>(),
            4096,
        )
        .map_err(io::Error::other)
    }

    /// Page-aligned: the kernel's `rep movsb` copy is slow into a destination that is not
    /// cache-line aligned (measured: `_copy_to_iter` fell from 12 % to 8 % of the profile
    /// at depth 8).
    fn memory_layout(count: u16, size: usize) -> io::Result<Layout> {
        Layout::from_size_align(usize::from(count) * size, 4096).map_err(io::Error::other)
    }

    /// Allocates `count` buffers (a power of two) of `size` bytes and registers them with
    /// `ring`.
    ///
    /// # Errors
    ///
    /// Out of memory, or the OS error of registering the ring (a kernel before 5.19).
    pub(super) fn new(ring: &IoUring, count: u16, size: usize) -> io::Result<ProvidedBuffers> {
        let entries_layout = Self::entries_layout(count)?;
        let memory_layout = Self::memory_layout(count, size)?;
        // SAFETY: both layouts have a non-zero size (callers pass non-zero constants).
        let entries: NonNull<types::BufRingEntry> =
            NonNull::new(unsafe { alloc::alloc_zeroed(entries_layout) })
                .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?
                .cast();
        // SAFETY: as above.
        let Some(memory) = NonNull::new(unsafe { alloc::alloc(memory_layout) }) else {
            // SAFETY: allocated just above with this layout and never shared.
            unsafe { alloc::dealloc(entries.as_ptr().cast(), entries_layout) };
            return Err(io::ErrorKind::OutOfMemory.into());
        };
        let mut buffers = ProvidedBuffers {
            entries,
            memory,
            count,
            size,
            tail: 0,
            is_lent: vec![true; usize::from(count)],
            given_back: 0,
        };
        // SAFETY: `entries` is page-aligned and holds `count` entries, and it stays
        // allocated until unregistered (the struct's invariant; see `Ring::drop`).
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                entries.as_ptr() as u64,
                count,
                BUFFER_GROUP,
                0,
            )?
        };
        for id in 0..count {
            buffers.give_back(id);
        }
        Ok(buffers)
    }

    /// Claims buffer `id`, which a completion just handed to us with `len` bytes in it.
    pub(super) fn take(&mut self, id: u16, len: usize) -> Received {
        if let Some(is_lent) = self.is_lent.get_mut(usize::from(id)) {
            *is_lent = true;
        }
        Received {
            id,
            len: len.min(self.size),
        }
    }

    /// Gives back buffer `id`, which the kernel picked for a completion nobody will read
    /// (its slot was closed): the completion handed it to us as surely as [`Self::take`]
    /// would have, so it is claimed first, or [`Self::give_back`] would ignore it and the
    /// ring would lose a buffer for good.
    pub(super) fn reclaim(&mut self, id: u16) {
        let received = self.take(id, 0);
        self.recycle(received);
    }

    /// Gives a claimed buffer back to the kernel.
    pub(super) fn recycle(&mut self, received: Received) {
        self.give_back(received.id);
    }

    /// Gives buffer `id` back to the kernel, once: a second give-back is ignored, so an
    /// entry never names a buffer the kernel already has.
    fn give_back(&mut self, id: u16) {
        match self.is_lent.get_mut(usize::from(id)) {
            Some(is_lent) if *is_lent => *is_lent = false,
            _ => return,
        }
        let slot = usize::from(self.tail & (self.count - 1));
        // SAFETY: `slot < count`, inside the entries allocation (invariant); the kernel
        // reads entries only between its head and our tail, and this one is past the tail.
        let entry = unsafe { &mut *self.entries.as_ptr().add(slot) };
        // SAFETY: `id < count` (it indexed `is_lent`), so the buffer lies inside `memory`.
        entry.set_addr(unsafe { self.memory.as_ptr().add(usize::from(id) * self.size) } as u64);
        entry.set_len(self.size as u32);
        entry.set_bid(id);
        self.tail = self.tail.wrapping_add(1);
        self.given_back = self.given_back.wrapping_add(1);
        // SAFETY: `entries` points at the ring's first entry, initialised (zeroed) at
        // allocation, as `tail` requires.
        let tail = unsafe { types::BufRingEntry::tail(self.entries.as_ptr()) };
        // SAFETY: the tail is an aligned u16 inside our allocation that the kernel only
        // reads; AtomicU16 has u16's layout. Release publishes the entry written above.
        unsafe { (*tail.cast::<AtomicU16>()).store(self.tail, Ordering::Release) };
    }

    /// How many buffers were given back to the kernel so far (wrapping): a receive that
    /// found none waits until this moves.
    pub(super) fn given_back(&self) -> u64 {
        self.given_back
    }

    /// The bytes `received` names.
    pub(super) fn bytes(&self, received: &Received) -> &[u8] {
        if !self
            .is_lent
            .get(usize::from(received.id))
            .is_some_and(|l| *l)
        {
            return &[];
        }
        // SAFETY: buffer `id` lies inside `memory` and is lent to us, so the kernel does
        // not write it (invariant); recycling takes the `Received` by value, so it cannot
        // happen while this slice, which borrows it, lives.
        unsafe {
            std::slice::from_raw_parts(
                self.memory
                    .as_ptr()
                    .add(usize::from(received.id) * self.size),
                received.len,
            )
        }
    }
}

impl Drop for ProvidedBuffers {
    fn drop(&mut self) {
        // The ring unregisters the buffers before this runs (see `Ring::drop`).
        if let (Ok(entries), Ok(memory)) = (
            Self::entries_layout(self.count),
            Self::memory_layout(self.count, self.size),
        ) {
            // SAFETY: allocated in `new` with these layouts; no longer registered.
            unsafe {
                alloc::dealloc(self.entries.as_ptr().cast(), entries);
                alloc::dealloc(self.memory.as_ptr(), memory);
            }
        }
    }
}
