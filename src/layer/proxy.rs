//! The PROXY protocol, versions 1 (text) and 2 (binary), as HAProxy's specification
//! ("The PROXY protocol", haproxy.org/download/1.8/doc/proxy-protocol.txt) defines them.
//!
//! A load balancer that relays TCP puts one header in front of the client's bytes; it
//! carries the client's address, which the server then uses as the peer. [`parse`] is
//! sans-IO: bytes in, "need more", a header, or an error out. [`ProxyLayer`] keeps the
//! header bytes seen so far (never more than a header can hold) and hands on whatever
//! follows the header.
//!
//! Written here rather than taken from a crate so that every refusal says, in one line,
//! which rule of the specification the bytes broke.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The 12 bytes that open a version 2 header (specification, section 2.2).
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest version 1 header, CRLF included (specification, section 2.1: 107 bytes).
pub const V1_MAX_BYTES: usize = 107;
/// The fixed part of a version 2 header: signature, version/command, family, length.
pub const V2_FIXED_BYTES: usize = 16;
/// The longest version 2 header accepted: the fixed part, the largest address block (two
/// 108-byte Unix paths) and room for the TLVs a load balancer adds (ALPN, authority,
/// unique id, SSL details). The specification allows up to 65,535 bytes after the fixed
/// part; a bound keeps one connection's memory small while the header is incomplete.
pub const V2_MAX_BYTES: usize = 4096;

/// The addresses a header carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProxyAddresses {
    /// The client (`source`) and the address it reached at the load balancer
    /// (`destination`).
    Ip {
        /// The client's address: the peer from now on.
        source: SocketAddr,
        /// The address the client connected to.
        destination: SocketAddr,
    },
    /// Unix socket paths (version 2, `AF_UNIX`), without their NUL padding.
    Unix {
        /// The client's socket path (may be empty: unnamed).
        source: Vec<u8>,
        /// The path the client connected to.
        destination: Vec<u8>,
    },
    /// No address to use: version 1 `UNKNOWN`, a version 2 `LOCAL` command (the load
    /// balancer's own health check), or version 2 `AF_UNSPEC`. The specification says
    /// the receiver must then accept the connection and use the real socket addresses.
    Unspecified,
}

/// A parsed header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyHeader {
    /// 1 or 2.
    pub version: u8,
    /// What it says about the connection.
    pub addresses: ProxyAddresses,
}

/// The outcome of [`parse`] on the bytes seen so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Every byte so far is a valid beginning; more are needed.
    Incomplete,
    /// A whole header, `length` bytes long; bytes after it belong to the session.
    Complete {
        /// The header.
        header: ProxyHeader,
        /// How many bytes it took.
        length: usize,
    },
}

/// Why a header was refused; each names what the bytes did wrong and what is accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// The first bytes are neither `PROXY ` nor the version 2 signature.
    #[error(
        "no PROXY protocol header: the connection must start with \"PROXY \" (v1) or the v2 signature"
    )]
    Missing,
    /// A version 1 header without its CRLF within the 107 bytes allowed.
    #[error("PROXY v1 header has no CRLF within {V1_MAX_BYTES} bytes")]
    V1TooLong,
    /// A version 1 header that breaks the grammar.
    #[error("malformed PROXY v1 header: {0}")]
    V1Malformed(&'static str),
    /// A version 2 header that declares more bytes than accepted.
    #[error("PROXY v2 header of {0} bytes is longer than the {V2_MAX_BYTES} accepted")]
    V2TooLong(usize),
    /// A version nibble other than 2 after the signature.
    #[error("PROXY header after the v2 signature has version {0}; only version 2 exists")]
    V2Version(u8),
    /// A command other than LOCAL (0) or PROXY (1).
    #[error("PROXY v2 header has command {0}; accepted: 0 (LOCAL) and 1 (PROXY)")]
    V2Command(u8),
    /// An address family or transport the specification does not define.
    #[error(
        "PROXY v2 header has family/transport byte {0:#04x}; accepted: families UNSPEC, INET, INET6, UNIX with transports UNSPEC, STREAM, DGRAM"
    )]
    V2Family(u8),
    /// The declared length is too short for the address family.
    #[error("PROXY v2 header declares {declared} address bytes; its family needs {needed}")]
    V2Short {
        /// The length field.
        declared: usize,
        /// What the family needs.
        needed: usize,
    },
}

/// Parses a PROXY header from the start of `bytes`.
///
/// # Errors
///
/// A [`ProxyError`] as soon as the bytes cannot be the beginning of a valid header; a
/// caller never has to wait for bytes that cannot help.
pub fn parse(bytes: &[u8]) -> Result<Parsed, ProxyError> {
    const V1_PREFIX: &[u8] = b"PROXY ";
    if starts_like(bytes, &V2_SIGNATURE) {
        if bytes.len() < V2_SIGNATURE.len() {
            return Ok(Parsed::Incomplete);
        }
        return parse_v2(bytes);
    }
    if starts_like(bytes, V1_PREFIX) {
        if bytes.len() < V1_PREFIX.len() {
            return Ok(Parsed::Incomplete);
        }
        return parse_v1(bytes);
    }
    Err(ProxyError::Missing)
}

/// Whether `bytes` and `prefix` agree on their common length.
fn starts_like(bytes: &[u8], prefix: &[u8]) -> bool {
    let common = bytes.len().min(prefix.len());
    bytes[..common] == prefix[..common]
}

fn parse_v1(bytes: &[u8]) -> Result<Parsed, ProxyError> {
    let window = &bytes[..bytes.len().min(V1_MAX_BYTES)];
    let end = window.windows(2).position(|pair| pair == b"\r\n");
    // The bytes are checked before anything else, in order, so a byte no header line can
    // hold is refused as soon as it arrives, and the first such byte names the error,
    // whatever pieces the header came in. A CR is fine only as the last byte so far (its
    // LF may be on its way).
    let scanned = &window[..end.unwrap_or(window.len())];
    let last = if end.is_some() {
        scanned.len()
    } else {
        scanned.len().saturating_sub(1)
    };
    for (at, &byte) in scanned.iter().enumerate() {
        if byte == b'\r' {
            if at < last {
                return Err(ProxyError::V1Malformed("a CR not followed by LF"));
            }
        } else if !(b' '..=b'~').contains(&byte) {
            return Err(ProxyError::V1Malformed(
                "only printable ASCII may come before the CRLF",
            ));
        }
    }
    let Some(end) = end else {
        if window.len() >= V1_MAX_BYTES {
            return Err(ProxyError::V1TooLong);
        }
        return Ok(Parsed::Incomplete);
    };
    let line = std::str::from_utf8(scanned)
        .map_err(|_| ProxyError::V1Malformed("only printable ASCII may come before the CRLF"))?;
    let header = parse_v1_line(line)?;
    Ok(Parsed::Complete {
        header,
        length: end + 2,
    })
}

fn parse_v1_line(line: &str) -> Result<ProxyHeader, ProxyError> {
    let mut fields = line.split(' ');
    fields.next(); // "PROXY", checked by the caller
    let unspecified = ProxyHeader {
        version: 1,
        addresses: ProxyAddresses::Unspecified,
    };
    let family = fields.next().unwrap_or("");
    let is_v6 = match family {
        "TCP4" => false,
        "TCP6" => true,
        // The specification: whatever follows UNKNOWN up to the CRLF is ignored.
        "UNKNOWN" => return Ok(unspecified),
        _ => {
            return Err(ProxyError::V1Malformed(
                "protocol must be TCP4, TCP6 or UNKNOWN",
            ));
        }
    };
    let (Some(source), Some(destination), Some(source_port), Some(destination_port), None) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return Err(ProxyError::V1Malformed(
            "expected \"PROXY TCP4|TCP6 SRC DST SPORT DPORT\" separated by single spaces",
        ));
    };
    let ip = |text: &str| -> Result<IpAddr, ProxyError> {
        let parsed = if is_v6 {
            text.parse::<Ipv6Addr>().map(IpAddr::V6)
        } else {
            text.parse::<Ipv4Addr>().map(IpAddr::V4)
        };
        parsed.map_err(|_| {
            ProxyError::V1Malformed(if is_v6 {
                "an address is not an IPv6 address as TCP6 requires"
            } else {
                "an address is not a dotted IPv4 address as TCP4 requires"
            })
        })
    };
    let port = |text: &str| -> Result<u16, ProxyError> {
        // The specification forbids leading zeros, so "080" is refused, not read as 80.
        let is_canonical = !text.is_empty()
            && text.bytes().all(|b| b.is_ascii_digit())
            && (text == "0" || !text.starts_with('0'));
        text.parse::<u16>()
            .ok()
            .filter(|_| is_canonical)
            .ok_or(ProxyError::V1Malformed(
                "a port is not a decimal number 0-65535 without leading zeros",
            ))
    };
    Ok(ProxyHeader {
        version: 1,
        addresses: ProxyAddresses::Ip {
            source: SocketAddr::new(ip(source)?, port(source_port)?),
            destination: SocketAddr::new(ip(destination)?, port(destination_port)?),
        },
    })
}

fn parse_v2(bytes: &[u8]) -> Result<Parsed, ProxyError> {
    let Some(&version_command) = bytes.get(12) else {
        return Ok(Parsed::Incomplete);
    };
    let version = version_command >> 4;
    if version != 2 {
        return Err(ProxyError::V2Version(version));
    }
    let command = version_command & 0x0f;
    if command > 1 {
        return Err(ProxyError::V2Command(command));
    }
    let Some(&family_transport) = bytes.get(13) else {
        return Ok(Parsed::Incomplete);
    };
    let needed = match (family_transport >> 4, family_transport & 0x0f) {
        (_, 3..) | (4.., _) => return Err(ProxyError::V2Family(family_transport)),
        (0, _) => 0,
        (1, _) => 12,
        (2, _) => 36,
        (3, _) => 216,
    };
    let (Some(&high), Some(&low)) = (bytes.get(14), bytes.get(15)) else {
        return Ok(Parsed::Incomplete);
    };
    let declared = usize::from(u16::from_be_bytes([high, low]));
    let length = V2_FIXED_BYTES + declared;
    if length > V2_MAX_BYTES {
        return Err(ProxyError::V2TooLong(length));
    }
    // LOCAL carries no meaningful address, so its block may be shorter than the family's.
    if command == 1 && declared < needed {
        return Err(ProxyError::V2Short { declared, needed });
    }
    if bytes.len() < length {
        return Ok(Parsed::Incomplete);
    }
    let block = &bytes[V2_FIXED_BYTES..length];
    let addresses = match (command, family_transport >> 4) {
        // LOCAL: "the receiver must accept this connection as valid and must use the real
        // connection endpoints and discard the protocol block including the family".
        (0, _) | (_, 0) => ProxyAddresses::Unspecified,
        (_, 1) => {
            let ip = |at: usize| {
                Ipv4Addr::from(<[u8; 4]>::try_from(&block[at..at + 4]).unwrap_or_default())
            };
            let port = |at: usize| u16::from_be_bytes([block[at], block[at + 1]]);
            ProxyAddresses::Ip {
                source: SocketAddr::new(IpAddr::V4(ip(0)), port(8)),
                destination: SocketAddr::new(IpAddr::V4(ip(4)), port(10)),
            }
        }
        (_, 2) => {
            let ip = |at: usize| {
                Ipv6Addr::from(<[u8; 16]>::try_from(&block[at..at + 16]).unwrap_or_default())
            };
            let port = |at: usize| u16::from_be_bytes([block[at], block[at + 1]]);
            ProxyAddresses::Ip {
                source: SocketAddr::new(IpAddr::V6(ip(0)), port(32)),
                destination: SocketAddr::new(IpAddr::V6(ip(16)), port(34)),
            }
        }
        _ => {
            let path = |at: usize| {
                let raw = &block[at..at + 108];
                let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
                raw[..end].to_vec()
            };
            ProxyAddresses::Unix {
                source: path(0),
                destination: path(108),
            }
        }
    };
    Ok(Parsed::Complete {
        header: ProxyHeader {
            version: 2,
            addresses,
        },
        length,
    })
}

/// Consumes a PROXY header at the start of a stream, then passes every byte through.
#[derive(Debug, Default)]
pub struct ProxyLayer {
    /// Header bytes received so far; at most [`V2_MAX_BYTES`].
    pending: Vec<u8>,
}

/// What [`ProxyLayer::receive`] made of some input.
#[derive(Debug, PartialEq, Eq)]
pub enum ProxyProgress<'a> {
    /// The header is not complete yet; every byte was kept.
    Incomplete,
    /// The header is complete; `rest` is what followed it in this input.
    Complete {
        /// The header.
        header: ProxyHeader,
        /// The bytes after the header, for the next layer.
        rest: &'a [u8],
    },
}

impl ProxyLayer {
    /// A layer waiting for its header.
    pub fn new() -> Self {
        ProxyLayer::default()
    }

    /// Takes the next bytes from the peer.
    ///
    /// # Errors
    ///
    /// A [`ProxyError`] when the bytes cannot start a valid header; the connection
    /// should then be closed.
    pub fn receive<'a>(&mut self, input: &'a [u8]) -> Result<ProxyProgress<'a>, ProxyError> {
        let before = self.pending.len();
        // Never copy more than a header can hold: a v1 line is shorter still.
        let take = input.len().min(V2_MAX_BYTES - before);
        self.pending.extend_from_slice(&input[..take]);
        match parse(&self.pending)? {
            Parsed::Incomplete => {
                if take < input.len() {
                    // Only reachable if the parser wanted more than V2_MAX_BYTES.
                    return Err(ProxyError::V2TooLong(before + input.len()));
                }
                Ok(ProxyProgress::Incomplete)
            }
            Parsed::Complete { header, length } => {
                self.pending = Vec::new();
                Ok(ProxyProgress::Complete {
                    header,
                    rest: &input[length - before..],
                })
            }
        }
    }
}

#[cfg(test)]
mod tests;
