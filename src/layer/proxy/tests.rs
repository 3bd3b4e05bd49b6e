use super::*;
use proptest::prelude::*;

fn v2(command: u8, family_transport: u8, block: &[u8]) -> Vec<u8> {
    let mut bytes = V2_SIGNATURE.to_vec();
    bytes.push(0x20 | command);
    bytes.push(family_transport);
    bytes.extend_from_slice(
        &u16::try_from(block.len())
            .expect("short block")
            .to_be_bytes(),
    );
    bytes.extend_from_slice(block);
    bytes
}

fn complete(bytes: &[u8]) -> (ProxyHeader, usize) {
    match parse(bytes) {
        Ok(Parsed::Complete { header, length }) => (header, length),
        other => panic!("{:?} gave {other:?}", String::from_utf8_lossy(bytes)),
    }
}

#[test]
fn v1_tcp4_and_tcp6() {
    let (header, length) = complete(b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\nhello");
    assert_eq!(length, 45);
    assert_eq!(
        header.addresses,
        ProxyAddresses::Ip {
            source: "192.0.2.1:56324".parse().unwrap(),
            destination: "198.51.100.2:443".parse().unwrap(),
        }
    );
    let (header, _) = complete(b"PROXY TCP6 2001:db8::1 ::1 1 65535\r\n");
    assert_eq!(
        header.addresses,
        ProxyAddresses::Ip {
            source: "[2001:db8::1]:1".parse().unwrap(),
            destination: "[::1]:65535".parse().unwrap(),
        }
    );
}

#[test]
fn v1_unknown_uses_the_real_addresses() {
    let (header, length) = complete(b"PROXY UNKNOWN ffff::1 whatever\r\nx");
    assert_eq!(header.addresses, ProxyAddresses::Unspecified);
    assert_eq!(length, 32);
    complete(b"PROXY UNKNOWN\r\n");
}

#[test]
fn v1_refusals_say_why() {
    let cases: &[(&[u8], &str)] = &[
        (b"GET / HTTP/1.1\r\n", "no PROXY protocol header"),
        (
            b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n",
            "TCP4, TCP6 or UNKNOWN",
        ),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n", "single spaces"),
        (b"PROXY TCP4 1.2.3.4  1.2.3.4 1 2\r\n", "single spaces"),
        (b"PROXY TCP4 ::1 1.2.3.4 1 2\r\n", "dotted IPv4"),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "IPv6"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 080 2\r\n", "leading zeros"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 65536 2\r\n", "0-65535"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n", "printable ASCII"),
        (b"PROXY TCP4 1.2.3.4\r1.2.3.4 1 2", "CR not followed by LF"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 \r\n", "single spaces"),
    ];
    for (bytes, expected) in cases {
        let error = parse(bytes).expect_err("refused").to_string();
        assert!(
            error.contains(expected),
            "{:?}: {error}",
            String::from_utf8_lossy(bytes)
        );
    }
    let long = [b"PROXY UNKNOWN ".as_slice(), &[b'a'; 100]].concat();
    assert_eq!(parse(&long), Err(ProxyError::V1TooLong));
}

#[test]
fn v2_inet_inet6_unix() {
    let mut block = vec![192, 0, 2, 1, 198, 51, 100, 2];
    block.extend_from_slice(&56324u16.to_be_bytes());
    block.extend_from_slice(&443u16.to_be_bytes());
    block.extend_from_slice(&[0x03, 0x00, 0x04, b'a', b'b', b'c', b'd']); // a TLV, skipped
    let bytes = v2(1, 0x11, &block);
    let (header, length) = complete(&bytes);
    assert_eq!(length, bytes.len());
    assert_eq!(header.version, 2);
    assert_eq!(
        header.addresses,
        ProxyAddresses::Ip {
            source: "192.0.2.1:56324".parse().unwrap(),
            destination: "198.51.100.2:443".parse().unwrap(),
        }
    );

    let mut block = Ipv6Addr::LOCALHOST.octets().to_vec();
    block.extend_from_slice(&"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
    block.extend_from_slice(&[0, 1, 0, 2]);
    let (header, _) = complete(&v2(1, 0x21, &block));
    assert_eq!(
        header.addresses,
        ProxyAddresses::Ip {
            source: "[::1]:1".parse().unwrap(),
            destination: "[2001:db8::7]:2".parse().unwrap(),
        }
    );

    let mut block = vec![0u8; 216];
    block[..4].copy_from_slice(b"/src");
    block[108..112].copy_from_slice(b"/dst");
    let (header, _) = complete(&v2(1, 0x31, &block));
    assert_eq!(
        header.addresses,
        ProxyAddresses::Unix {
            source: b"/src".to_vec(),
            destination: b"/dst".to_vec(),
        }
    );
}

#[test]
fn v2_local_and_unspec_use_the_real_addresses() {
    // LOCAL with a (meaningless) INET block, as a health check may send; and with none.
    let (header, length) = complete(&v2(0, 0x11, &[0; 12]));
    assert_eq!(
        (header.addresses, length),
        (ProxyAddresses::Unspecified, 28)
    );
    let (header, _) = complete(&v2(0, 0x00, &[]));
    assert_eq!(header.addresses, ProxyAddresses::Unspecified);
    let (header, _) = complete(&v2(1, 0x00, &[1, 2, 3]));
    assert_eq!(header.addresses, ProxyAddresses::Unspecified);
}

#[test]
fn v2_refusals_say_why() {
    let mut wrong_version = v2(1, 0x11, &[0; 12]);
    wrong_version[12] = 0x11;
    assert_eq!(parse(&wrong_version), Err(ProxyError::V2Version(1)));
    assert_eq!(parse(&v2(2, 0x11, &[0; 12])), Err(ProxyError::V2Command(2)));
    assert_eq!(
        parse(&v2(1, 0x41, &[0; 12])),
        Err(ProxyError::V2Family(0x41))
    );
    assert_eq!(
        parse(&v2(1, 0x13, &[0; 12])),
        Err(ProxyError::V2Family(0x13))
    );
    assert_eq!(
        parse(&v2(1, 0x21, &[0; 12])),
        Err(ProxyError::V2Short {
            declared: 12,
            needed: 36
        })
    );
    let mut oversized = v2(1, 0x11, &[0; 12]);
    oversized[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
    assert_eq!(
        parse(&oversized[..16]),
        Err(ProxyError::V2TooLong(16 + 65535)),
        "refused from the length field, without waiting for the bytes"
    );
    for error in [
        ProxyError::V2Version(1),
        ProxyError::V2TooLong(70000),
        ProxyError::V2Family(0x41),
    ] {
        assert!(error.to_string().contains("accepted") || error.to_string().contains("only"));
    }
}

#[test]
fn the_layer_passes_what_follows_the_header() {
    let mut layer = ProxyLayer::new();
    assert_eq!(
        layer.receive(b"PROXY TCP4 1.2.3.4 "),
        Ok(ProxyProgress::Incomplete)
    );
    match layer.receive(b"5.6.7.8 1 2\r\nhello") {
        Ok(ProxyProgress::Complete { header, rest }) => {
            assert_eq!(rest, b"hello");
            assert_eq!(header.version, 1);
        }
        other => panic!("{other:?}"),
    }
}

/// Valid headers of both versions, with their addresses.
fn header_strategy() -> impl Strategy<Value = (Vec<u8>, ProxyAddresses)> {
    let v1 = (
        any::<[u8; 4]>(),
        any::<[u8; 4]>(),
        any::<u16>(),
        any::<u16>(),
    )
        .prop_map(|(s, d, sp, dp)| {
            let source = SocketAddr::new(IpAddr::from(s), sp);
            let destination = SocketAddr::new(IpAddr::from(d), dp);
            let text = format!(
                "PROXY TCP4 {} {} {sp} {dp}\r\n",
                Ipv4Addr::from(s),
                Ipv4Addr::from(d)
            );
            (
                text.into_bytes(),
                ProxyAddresses::Ip {
                    source,
                    destination,
                },
            )
        });
    let v1_six = (
        any::<[u8; 16]>(),
        any::<[u8; 16]>(),
        any::<u16>(),
        any::<u16>(),
    )
        .prop_map(|(s, d, sp, dp)| {
            let text = format!(
                "PROXY TCP6 {} {} {sp} {dp}\r\n",
                Ipv6Addr::from(s),
                Ipv6Addr::from(d)
            );
            (
                text.into_bytes(),
                ProxyAddresses::Ip {
                    source: SocketAddr::new(IpAddr::from(s), sp),
                    destination: SocketAddr::new(IpAddr::from(d), dp),
                },
            )
        });
    let v2_four = (
        any::<[u8; 4]>(),
        any::<[u8; 4]>(),
        any::<u16>(),
        any::<u16>(),
        proptest::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(s, d, sp, dp, tlvs)| {
            let mut block = [s, d].concat();
            block.extend_from_slice(&sp.to_be_bytes());
            block.extend_from_slice(&dp.to_be_bytes());
            block.extend_from_slice(&tlvs);
            (
                v2(1, 0x11, &block),
                ProxyAddresses::Ip {
                    source: SocketAddr::new(IpAddr::from(s), sp),
                    destination: SocketAddr::new(IpAddr::from(d), dp),
                },
            )
        });
    let v2_local = proptest::collection::vec(any::<u8>(), 0..64)
        .prop_map(|block| (v2(0, 0x11, &block), ProxyAddresses::Unspecified));
    prop_oneof![v1, v1_six, v2_four, v2_local]
}

/// Feeds `bytes` to a fresh layer in the pieces `cuts` makes; returns the header and
/// every byte passed through, or the error.
fn feed(bytes: &[u8], cuts: &[usize]) -> Result<(ProxyHeader, Vec<u8>), ProxyError> {
    let mut layer = ProxyLayer::new();
    let mut header = None;
    let mut passed = Vec::new();
    let mut start = 0;
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    points.push(bytes.len());
    points.sort_unstable();
    for end in points {
        let piece = &bytes[start..end];
        start = end;
        if header.is_some() {
            passed.extend_from_slice(piece);
            continue;
        }
        if let ProxyProgress::Complete { header: h, rest } = layer.receive(piece)? {
            header = Some(h);
            passed.extend_from_slice(rest);
        }
    }
    header
        .map(|h| (h, passed))
        .ok_or(ProxyError::V1Malformed("(test) incomplete"))
}

proptest! {
    #[test]
    fn any_split_of_a_valid_header_gives_the_same_result(
        (header, addresses) in header_strategy(),
        payload in proptest::collection::vec(any::<u8>(), 0..64),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let bytes = [header.as_slice(), &payload].concat();
        let (parsed, passed) = feed(&bytes, &cuts).expect("valid header");
        prop_assert_eq!(parsed.addresses, addresses);
        prop_assert_eq!(passed, payload);
    }

    /// The fuzz-style test: arbitrary bytes, with or without a valid beginning, in
    /// arbitrary pieces, never panic, and every split agrees with parsing the whole.
    #[test]
    fn arbitrary_bytes_in_any_split_agree_with_the_whole(
        start in prop_oneof![
            Just(Vec::new()),
            Just(b"PROXY ".to_vec()),
            Just(b"PROXY TCP4 ".to_vec()),
            Just(V2_SIGNATURE.to_vec()),
            Just([V2_SIGNATURE.as_slice(), &[0x21, 0x11]].concat()),
        ],
        noise in proptest::collection::vec(any::<u8>(), 0..300),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let bytes = [start.as_slice(), &noise].concat();
        let whole = match parse(&bytes) {
            Ok(Parsed::Complete { header, length }) => Ok((header, bytes[length..].to_vec())),
            Ok(Parsed::Incomplete) => Err(ProxyError::V1Malformed("(test) incomplete")),
            Err(error) => Err(error),
        };
        prop_assert_eq!(feed(&bytes, &cuts), whole);
    }

    /// A byte that makes a prefix invalid is refused at once, never after more input.
    #[test]
    fn an_error_never_waits_for_more_bytes(
        (header, _) in header_strategy(),
        at in any::<usize>(),
        byte in any::<u8>(),
    ) {
        let mut bytes = header.clone();
        let at = at % bytes.len();
        bytes[at] = byte;
        if parse(&bytes[..=at]).is_err() {
            prop_assert!(parse(&bytes).is_err());
        }
    }
}

/// A stray CR before a byte no header line can hold: the first bad byte names the error,
/// in one piece or any two cuts (the property test found the two disagreeing).
#[test]
fn the_first_bad_byte_names_the_error_in_any_pieces() {
    let mut bytes = b"PROXY \r  \0".to_vec();
    bytes.extend(std::iter::repeat_n(0u8, 40));
    let whole = match parse(&bytes) {
        Ok(Parsed::Complete { header, length }) => Ok((header, bytes[length..].to_vec())),
        Ok(Parsed::Incomplete) => Err(ProxyError::V1Malformed("(test) incomplete")),
        Err(error) => Err(error),
    };
    for a in 0..=bytes.len() {
        for b in a..=bytes.len() {
            let got = feed(&bytes, &[a, b]);
            assert_eq!(got, whole, "cuts {a} {b}");
        }
    }
}
