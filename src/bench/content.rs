//! What a bench message contains: a pure function of (connection, message number), so the
//! checker recomputes the expected bytes at any stream position without keeping what it sent.
//!
//! A message's first `min(8, size)` bytes are a 64-bit tag mixed from (connection, message);
//! the rest is a slice of one fixed pseudo-random pattern, starting at an offset taken from
//! the tag (the scheme of the yardstick's `echoload`, with more offsets). So two messages
//! never share their head, a shifted, dropped, duplicated or swapped byte lands on
//! different pseudo-random bytes, and checking a chunk is one `memcmp`.
//!
//! Datagram messages carry their number instead of the tag in the first 8 bytes (masked
//! per connection), so a reply can be matched to its request whatever order replies come in.

/// How many different starting offsets a message body can have in the shared pattern.
const PATTERN_OFFSETS: usize = 4096;
/// Datagram messages need room for their 8-byte number.
pub const DATAGRAM_HEADER_BYTES: usize = 8;

/// SplitMix64's finaliser: a bijection on `u64` that scatters every input bit.
fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The message generator and checker for one run (one message size).
#[derive(Debug)]
pub struct Content {
    size: usize,
    pattern: Box<[u8]>,
}

impl Content {
    /// Content for messages of `size` bytes.
    pub fn new(size: usize) -> Self {
        let mut x = 12345_u64;
        let pattern = (0..size + PATTERN_OFFSETS)
            .map(|_| {
                x = mix64(x);
                x as u8
            })
            .collect();
        Content { size, pattern }
    }

    /// Bytes per message.
    pub fn size(&self) -> usize {
        self.size
    }

    fn tag(connection: u64, message: u64) -> u64 {
        mix64(mix64(connection ^ 0x5eed_5eed_0000_0000) ^ message)
    }

    fn body(&self, tag: u64) -> &[u8] {
        let start = (tag % PATTERN_OFFSETS as u64) as usize;
        &self.pattern[start..start + self.size]
    }

    /// Writes bytes `offset..offset + out.len()` of stream message (`connection`, `message`).
    pub fn fill(&self, connection: u64, message: u64, offset: usize, out: &mut [u8]) {
        let tag = Self::tag(connection, message);
        let end = offset + out.len();
        let head = end.min(8);
        let mut at = offset;
        while at < head {
            out[at - offset] = (tag >> (8 * at)) as u8;
            at += 1;
        }
        if at < end {
            out[at - offset..].copy_from_slice(&self.body(tag)[at..end]);
        }
    }

    /// Compares `got` with bytes `offset..offset + got.len()` of stream message
    /// (`connection`, `message`); returns the index in `got` of the first wrong byte and
    /// the byte that was expected there.
    pub fn check(
        &self,
        connection: u64,
        message: u64,
        offset: usize,
        got: &[u8],
    ) -> Option<(usize, u8)> {
        let tag = Self::tag(connection, message);
        let end = offset + got.len();
        let head = end.min(8);
        let mut at = offset;
        while at < head {
            let expected = (tag >> (8 * at)) as u8;
            if got[at - offset] != expected {
                return Some((at - offset, expected));
            }
            at += 1;
        }
        if at < end {
            let expected = &self.body(tag)[at..end];
            let got = &got[at - offset..];
            if got != expected {
                let first = got.iter().zip(expected).position(|(a, b)| a != b)?;
                return Some((at - offset + first, expected[first]));
            }
        }
        None
    }

    /// The per-connection mask that hides a datagram's number in its first 8 bytes, so the
    /// same number on two connections still gives two different datagrams.
    fn datagram_key(connection: u64) -> u64 {
        mix64(connection ^ 0xda7a_9a4a_0000_0000)
    }

    /// Writes datagram (`connection`, `message`) into `out` (`size` bytes, at least
    /// [`DATAGRAM_HEADER_BYTES`]).
    pub fn fill_datagram(&self, connection: u64, message: u64, out: &mut [u8]) {
        let header = message ^ Self::datagram_key(connection);
        out[..DATAGRAM_HEADER_BYTES].copy_from_slice(&header.to_le_bytes());
        let tag = Self::tag(connection, message);
        out[DATAGRAM_HEADER_BYTES..].copy_from_slice(&self.body(tag)[DATAGRAM_HEADER_BYTES..]);
    }

    /// The message number a datagram claims to answer, if it is long enough to claim one.
    pub fn datagram_number(connection: u64, datagram: &[u8]) -> Option<u64> {
        let header: [u8; DATAGRAM_HEADER_BYTES] =
            datagram.get(..DATAGRAM_HEADER_BYTES)?.try_into().ok()?;
        Some(u64::from_le_bytes(header) ^ Self::datagram_key(connection))
    }

    /// Whether `datagram` is exactly datagram (`connection`, `message`).
    pub fn datagram_matches(&self, connection: u64, message: u64, datagram: &[u8]) -> bool {
        datagram.len() == self.size
            && Self::datagram_number(connection, datagram) == Some(message)
            && datagram[DATAGRAM_HEADER_BYTES..]
                == self.body(Self::tag(connection, message))[DATAGRAM_HEADER_BYTES..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(content: &Content, connection: u64, message: u64) -> Vec<u8> {
        let mut out = vec![0; content.size()];
        content.fill(connection, message, 0, &mut out);
        out
    }

    #[test]
    fn pieces_agree_with_the_whole() {
        for size in [1, 7, 8, 9, 64, 1000] {
            let content = Content::new(size);
            let full = whole(&content, 3, 17);
            for offset in 0..size {
                for len in [0, 1, 5, size - offset] {
                    let len = len.min(size - offset);
                    let mut piece = vec![0; len];
                    content.fill(3, 17, offset, &mut piece);
                    assert_eq!(piece, full[offset..offset + len]);
                    assert_eq!(content.check(3, 17, offset, &piece), None);
                }
            }
        }
    }

    #[test]
    fn messages_differ_per_connection_and_number() {
        let content = Content::new(64);
        let a = whole(&content, 0, 0);
        assert_ne!(a, whole(&content, 0, 1));
        assert_ne!(a, whole(&content, 1, 0));
        let tiny = Content::new(1);
        let distinct: std::collections::HashSet<_> = (0..64).map(|m| whole(&tiny, 0, m)).collect();
        assert!(
            distinct.len() > 40,
            "one-byte messages should mostly differ"
        );
    }

    #[test]
    fn check_finds_the_wrong_byte() {
        let content = Content::new(100);
        let mut bytes = whole(&content, 2, 5);
        bytes[40] ^= 1;
        assert_eq!(content.check(2, 5, 0, &bytes), Some((40, bytes[40] ^ 1)));
        bytes[40] ^= 1;
        bytes[3] ^= 0x80;
        assert_eq!(content.check(2, 5, 0, &bytes).map(|(at, _)| at), Some(3));
        // A dropped byte shifts everything after it.
        let full = whole(&content, 2, 5);
        let mut dropped = full.clone();
        dropped.remove(50);
        assert!(content.check(2, 5, 0, &dropped[..99]).is_some());
    }

    #[test]
    fn datagrams_round_trip() {
        let content = Content::new(32);
        let mut d = vec![0; 32];
        content.fill_datagram(4, 99, &mut d);
        assert_eq!(Content::datagram_number(4, &d), Some(99));
        assert!(content.datagram_matches(4, 99, &d));
        assert!(!content.datagram_matches(5, 99, &d));
        d[20] ^= 1;
        assert!(!content.datagram_matches(4, 99, &d));
        assert!(!content.datagram_matches(4, 99, &d[..31]));
    }
}
