//! `Slab`: values in reusable slots, each named by a [`Token`] that also carries the slot's
//! generation, so an event for a closed connection is never delivered to the one that
//! reused its slot (async-io's stale-event guard, with mio's typed `Token`).
//!
//! Every table of connections, tasks, timers and wakers in reverb is this slab.

/// Names a value in a [`Slab`]: its slot, and the slot's generation when it was inserted.
///
/// A kernel carries a token as 64 bits of user data ([`Token::to_raw`]): an epoll
/// registration's `data` field, an io_uring entry's `user_data`. Generation 0 is never
/// given to a value, so [`Token::reserved`] tokens (generation 0) are free for a loop's
/// own sources, such as its listeners and the shutdown eventfd.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Token(u64);

impl Token {
    /// The `n`th token no slab value can have, for a source that lives outside the slab.
    pub const fn reserved(n: u32) -> Token {
        Token(n as u64)
    }

    /// `Some(n)` for [`Token::reserved`]`(n)`, `None` for a slab value's token.
    pub fn reserved_index(self) -> Option<usize> {
        (self.generation() == 0).then_some(self.index())
    }

    /// The token's 64 bits, to hand to the kernel as user data.
    pub fn to_raw(self) -> u64 {
        self.0
    }

    /// The token whose [`Token::to_raw`] gave `raw`.
    pub fn from_raw(raw: u64) -> Token {
        Token(raw)
    }

    fn new(index: u32, generation: u32) -> Token {
        Token((u64::from(generation) << 32) | u64::from(index))
    }

    /// The slot, for a table kept beside the slab (io_uring's slots, which outlive the
    /// value until the kernel returns their buffers).
    pub fn index(self) -> usize {
        (self.0 & 0xffff_ffff) as usize
    }

    /// The slot's generation when the value was inserted (0 for a reserved token).
    pub fn generation(self) -> u32 {
        (self.0 >> 32) as u32
    }
}

/// Values in reusable slots, addressed by [`Token`].
#[derive(Debug)]
pub struct Slab<T> {
    slots: Vec<Slot<T>>,
    /// Indices of empty slots, reused last-in first-out (the warmest memory first).
    free: Vec<u32>,
    len: usize,
}

/// `repr(C)`, the generation first: every lookup reads it and then the value's first
/// fields, and in Rust's own layout it sat after a large value, a cache line of its own
/// (the check was the hottest load of the epoll loop's `serve`).
#[derive(Debug)]
#[repr(C)]
struct Slot<T> {
    generation: u32,
    value: Option<T>,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            slots: Vec::new(),
            free: Vec::new(),
            len: 0,
        }
    }
}

impl<T> Slab<T> {
    /// Stores `value` and returns its token.
    ///
    /// # Panics
    ///
    /// Panics past `u32::MAX` values, far beyond any descriptor limit.
    pub fn insert(&mut self, value: T) -> Token {
        let token = self.vacant_token();
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                let index = u32::try_from(self.slots.len()).expect("fewer than 2^32 slots");
                self.slots.push(Slot {
                    generation: 1,
                    value: None,
                });
                index
            }
        };
        self.slots[index as usize].value = Some(value);
        self.len += 1;
        token
    }

    /// The value for `token`, or `None` when that value was removed (a stale token).
    pub fn get(&self, token: Token) -> Option<&T> {
        let slot = self.slots.get(token.index())?;
        (slot.generation == token.generation())
            .then_some(slot.value.as_ref())
            .flatten()
    }

    /// The value for `token`, mutably, or `None` when that value was removed.
    pub fn get_mut(&mut self, token: Token) -> Option<&mut T> {
        let slot = self.slots.get_mut(token.index())?;
        if slot.generation != token.generation() {
            return None;
        }
        slot.value.as_mut()
    }

    /// Removes and returns the value for `token`; its slot gets a new generation.
    pub fn remove(&mut self, token: Token) -> Option<T> {
        let slot = self.slots.get_mut(token.index())?;
        if slot.generation != token.generation() {
            return None;
        }
        let value = slot.value.take()?;
        // Skip generation 0 on wrap-around: it names the reserved tokens.
        slot.generation = slot.generation.checked_add(1).unwrap_or(1);
        self.free.push(token.index() as u32);
        self.len -= 1;
        Some(value)
    }

    /// The token the next [`Slab::insert`] will return, for a value that must know its own
    /// token (a task's waker).
    ///
    /// # Panics
    ///
    /// Panics past `u32::MAX` values, as [`Slab::insert`] does.
    pub fn vacant_token(&self) -> Token {
        match self.free.last() {
            Some(&index) => Token::new(index, self.slots[index as usize].generation),
            None => Token::new(
                u32::try_from(self.slots.len()).expect("fewer than 2^32 slots"),
                1,
            ),
        }
    }

    /// The tokens of every stored value, collected so the caller may remove while it walks
    /// them.
    pub fn tokens(&self) -> Vec<Token> {
        self.iter().map(|(token, _)| token).collect()
    }

    /// Every stored value with its token.
    pub fn iter(&self) -> impl Iterator<Item = (Token, &T)> + '_ {
        self.slots.iter().enumerate().filter_map(|(index, slot)| {
            let value = slot.value.as_ref()?;
            Some((Token::new(index as u32, slot.generation), value))
        })
    }

    /// How many values are stored.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_tokens_miss() {
        let mut slab = Slab::default();
        let a = slab.insert("a");
        assert_eq!(a.reserved_index(), None, "generation 0 is reserved");
        assert_eq!(slab.remove(a), Some("a"));
        let b = slab.insert("b");
        assert_eq!(a.index(), b.index(), "the slot is reused");
        assert_eq!(slab.get_mut(a), None, "an event for the old value is stale");
        assert_eq!(slab.get(a), None);
        assert_eq!(slab.remove(a), None);
        assert_eq!(slab.get_mut(b), Some(&mut "b"));
        assert_eq!(slab.tokens(), vec![b]);
        assert_eq!(slab.len(), 1);
        assert_eq!(Token::from_raw(b.to_raw()), b);
    }

    #[test]
    fn reserved_tokens_never_name_a_value() {
        let mut slab = Slab::default();
        let a = slab.insert(1);
        assert_eq!(Token::reserved(3).reserved_index(), Some(3));
        assert_eq!(slab.get(Token::reserved(0)), None);
        assert_ne!(Token::reserved(0), a);
        assert_eq!(slab.vacant_token(), slab.insert(2));
    }
}
