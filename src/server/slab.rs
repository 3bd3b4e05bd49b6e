//! `Slab`: connections stored by index, named by a token that also carries a generation,
//! so an event for a closed connection is never delivered to the one that reused its slot.

/// Where a value lives: the low 32 bits are its slot, the high 32 bits the slot's
/// generation when it was inserted. Generation 0 is never used, so tokens whose high half
/// is 0 are free for the caller's own sources (listeners, the shutdown eventfd).
pub type Token = u64;

/// Values in reusable slots, addressed by [`Token`].
#[derive(Debug)]
pub struct Slab<T> {
    slots: Vec<Slot<T>>,
    /// Indices of empty slots, reused last-in first-out (the warmest memory first).
    free: Vec<u32>,
    len: usize,
}

#[derive(Debug)]
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
        self.len += 1;
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
        let slot = &mut self.slots[index as usize];
        slot.value = Some(value);
        (u64::from(slot.generation) << 32) | u64::from(index)
    }

    /// The value for `token`, or `None` when that value was removed (a stale token).
    pub fn get(&self, token: Token) -> Option<&T> {
        let slot = self.slots.get((token & 0xffff_ffff) as usize)?;
        if u64::from(slot.generation) != token >> 32 {
            return None;
        }
        slot.value.as_ref()
    }

    /// The value for `token`, mutably, or `None` when that value was removed.
    pub fn get_mut(&mut self, token: Token) -> Option<&mut T> {
        let slot = self.slots.get_mut((token & 0xffff_ffff) as usize)?;
        if u64::from(slot.generation) != token >> 32 {
            return None;
        }
        slot.value.as_mut()
    }

    /// Removes and returns the value for `token`; its slot gets a new generation.
    pub fn remove(&mut self, token: Token) -> Option<T> {
        let index = (token & 0xffff_ffff) as u32;
        let slot = self.slots.get_mut(index as usize)?;
        if u64::from(slot.generation) != token >> 32 {
            return None;
        }
        let value = slot.value.take()?;
        // Skip generation 0 on wrap-around: it names the caller's own sources.
        slot.generation = slot.generation.checked_add(1).unwrap_or(1);
        self.free.push(index);
        self.len -= 1;
        Some(value)
    }

    /// The tokens of every stored value.
    pub fn tokens(&self) -> Vec<Token> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, slot)| slot.value.is_some())
            .map(|(index, slot)| (u64::from(slot.generation) << 32) | index as u64)
            .collect()
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
        assert_eq!(a >> 32, 1, "generation 0 is reserved");
        assert_eq!(slab.remove(a), Some("a"));
        let b = slab.insert("b");
        assert_eq!(a & 0xffff_ffff, b & 0xffff_ffff, "the slot is reused");
        assert_eq!(slab.get_mut(a), None, "an event for the old value is stale");
        assert_eq!(slab.remove(a), None);
        assert_eq!(slab.get_mut(b), Some(&mut "b"));
        assert_eq!(slab.tokens(), vec![b]);
        assert_eq!(slab.len(), 1);
    }
}
