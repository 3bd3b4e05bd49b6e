//! Key packing: a submission's `user_data` names the slot's [`Token`] and the operation, so
//! its completion finds both, and a completion for a closed slot is recognised as stale.
//!
//! 64 bits hold the token's slot (32), the low 24 bits of its generation, and the
//! operation (8). Two tokens of one slot share a key only after 2^24 reuses of that slot
//! while an operation of the older one is still in flight, which a cancelled operation
//! does not survive.

use crate::slab::Token;

/// Bits of a token's generation kept in `user_data`.
const GENERATION_MASK: u32 = 0xff_ffff;

/// The operations; each is also its bit in a slot's in-flight set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum Op {
    Accept = 1,
    Receive = 2,
    Send = 4,
    DatagramReceive = 8,
    Poll = 16,
    /// An `AsyncCancel`; its own completion carries nothing.
    Cancel = 64,
}

impl Op {
    /// Every operation that holds a slot's buffers or descriptor until it completes.
    pub(super) const IN_FLIGHT: [Op; 5] = [
        Op::Accept,
        Op::Receive,
        Op::Send,
        Op::DatagramReceive,
        Op::Poll,
    ];

    fn from_bits(bits: u8) -> Option<Op> {
        Op::IN_FLIGHT
            .into_iter()
            .chain([Op::Cancel])
            .find(|op| *op as u8 == bits)
    }
}

/// A token as `user_data` keeps it: its slot and the low bits of its generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct Key(u64);

impl Key {
    /// The key of `token`.
    pub(super) fn of(token: Token) -> Key {
        let generation = u64::from(token.generation() & GENERATION_MASK);
        Key(((token.index() as u64) << 32) | (generation << 8))
    }

    /// The `user_data` of `op` on this key.
    pub(super) fn user_data(self, op: Op) -> u64 {
        self.0 | op as u64
    }

    /// The key and operation a completion's `user_data` names.
    pub(super) fn from_user_data(user_data: u64) -> (Key, Option<Op>) {
        (Key(user_data & !0xff), Op::from_bits(user_data as u8))
    }

    /// The slot.
    pub(super) fn index(self) -> usize {
        (self.0 >> 32) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slab::Slab;

    #[test]
    fn user_data_round_trips() {
        let mut slab = Slab::default();
        let token = slab.insert(());
        let key = Key::of(token);
        assert_eq!(
            Key::from_user_data(key.user_data(Op::Send)),
            (key, Some(Op::Send))
        );
        assert_eq!(key.index(), token.index());
        slab.remove(token);
        let reused = slab.insert(());
        assert_eq!(reused.index(), token.index());
        assert_ne!(Key::of(reused), key, "a reused slot has a new key");
    }
}
