use super::*;
use proptest::prelude::*;
use rustls::{ClientConfig, ClientConnection, RootCertStore};

struct Pair {
    server: TlsLayer,
    client: ClientConnection,
    /// Server's bytes for the client.
    wire: WriteBuffer,
    /// Plaintext the server received.
    received: Vec<u8>,
    /// Plaintext the client received.
    client_received: Vec<u8>,
}

fn fixture_files() -> (tempdir::Dir, TlsConfig, CertificateDer<'static>) {
    let dir = tempdir::Dir::new();
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert = dir.write("cert.pem", generated.cert.pem().as_bytes());
    let key = dir.write("key.pem", generated.signing_key.serialize_pem().as_bytes());
    let config = TlsConfig::from_pem_files(&cert, &key).expect("valid pair");
    (dir, config, generated.cert.der().clone())
}

/// A tiny temporary directory, removed on drop.
mod tempdir {
    use std::path::{Path, PathBuf};
    pub struct Dir(PathBuf);
    impl Dir {
        pub fn new() -> Self {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "reverb-tls-test-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&path).unwrap();
            Dir(path)
        }
        pub fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, bytes).unwrap();
            path
        }
        pub fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn pair(version: &'static rustls::SupportedProtocolVersion) -> Pair {
    let (_dir, config, cert) = fixture_files();
    let mut roots = RootCertStore::empty();
    roots.add(cert).unwrap();
    let client_config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    let client =
        ClientConnection::new(Arc::new(client_config), "localhost".try_into().unwrap()).unwrap();
    Pair {
        server: config.new_layer().unwrap(),
        client,
        wire: WriteBuffer::new(1 << 20),
        received: Vec::new(),
        client_received: Vec::new(),
    }
}

impl Pair {
    /// Moves bytes both ways until neither side has anything to say, feeding the server
    /// the client's bytes in pieces of `piece` bytes.
    fn pump(&mut self, piece: usize) -> Result<TlsInput, TlsError> {
        let mut last = TlsInput::Open;
        for _ in 0..100 {
            let mut to_server = Vec::new();
            while self.client.wants_write() {
                self.client.write_tls(&mut to_server).unwrap();
            }
            let received = &mut self.received;
            for chunk in to_server.chunks(piece.max(1)) {
                last = self
                    .server
                    .receive(chunk, &mut |p| received.extend_from_slice(p))?;
            }
            self.server.write_to(&mut self.wire);
            let to_client = self.wire.unsent().to_vec();
            self.wire.advance(to_client.len());
            if to_server.is_empty() && to_client.is_empty() {
                return Ok(last);
            }
            let mut slice = to_client.as_slice();
            while !slice.is_empty() {
                self.client.read_tls(&mut slice).unwrap();
                self.client.process_new_packets().unwrap();
                let _ = std::io::Read::read_to_end(
                    &mut self.client.reader(),
                    &mut self.client_received,
                );
            }
        }
        panic!("no quiet point after 100 rounds");
    }

    fn client_plaintext(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.client_received)
    }
}

#[test]
fn tls12_and_tls13_carry_bytes_both_ways_and_close_notify() {
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let mut pair = pair(version);
        pair.pump(usize::MAX).unwrap();
        assert!(!pair.server.is_handshaking());
        assert!(
            pair.server
                .describe()
                .contains(&format!("{:?}", version.version))
        );
        pair.client.writer().write_all(b"hello").unwrap();
        pair.pump(usize::MAX).unwrap();
        assert_eq!(pair.received, b"hello");
        pair.server.send(b"world", &mut pair.wire);
        pair.pump(usize::MAX).unwrap();
        assert_eq!(pair.client_plaintext(), b"world");
        pair.client.send_close_notify();
        assert_eq!(pair.pump(usize::MAX).unwrap(), TlsInput::PeerClosed);
        pair.server.close(&mut pair.wire);
        pair.pump(usize::MAX).unwrap();
        assert!(
            pair.client.process_new_packets().unwrap().peer_has_closed(),
            "client saw a clean close_notify"
        );
    }
}

#[test]
fn a_garbage_handshake_is_an_error_with_an_alert() {
    let (_dir, config, _) = fixture_files();
    let mut server = config.new_layer().unwrap();
    let error = server
        .receive(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", &mut |_| {
            panic!("no plaintext from garbage")
        })
        .expect_err("garbage refused");
    let mut wire = WriteBuffer::new(4096);
    server.write_to(&mut wire);
    assert_eq!(wire.unsent().first(), Some(&21), "an alert record: {error}");
}

#[test]
fn file_errors_name_the_file_and_the_problem() {
    let (dir, _config, _) = fixture_files();
    let missing = dir.path().join("missing.pem");
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    let garbage = dir.write("garbage.pem", b"this is not PEM\n");
    let other = rcgen::generate_simple_self_signed(vec!["other".into()]).unwrap();
    let other_key = dir.write(
        "other-key.pem",
        other.signing_key.serialize_pem().as_bytes(),
    );
    let cases = [
        (&missing, &key, "cannot read", "missing.pem"),
        (&cert, &missing, "cannot read", "missing.pem"),
        (&garbage, &key, "no certificate found", "garbage.pem"),
        (&cert, &garbage, "no private key found", "garbage.pem"),
        (&key, &key, "no certificate found", "key.pem"),
        (&cert, &cert, "no private key found", "cert.pem"),
        (
            &cert,
            &other_key,
            "do not make a usable certificate",
            "other-key.pem",
        ),
    ];
    for (cert, key, what, file) in cases {
        let message = TlsConfig::from_pem_files(cert, key)
            .expect_err("refused")
            .to_string();
        assert!(
            message.contains(what) && message.contains(file),
            "{message}"
        );
    }
}

#[test]
fn self_signed_has_an_openssl_style_fingerprint() {
    let config = TlsConfig::self_signed().unwrap();
    let fingerprint = config.fingerprint();
    assert_eq!(fingerprint.len(), 32 * 3 - 1);
    assert!(fingerprint.split(':').all(|b| b.len() == 2));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]
    /// Any payload, fed to the server in any piece size, arrives whole and in order.
    #[test]
    fn any_split_delivers_the_same_plaintext(
        payload in proptest::collection::vec(any::<u8>(), 0..40_000),
        piece in 1usize..5000,
        tls13 in any::<bool>(),
    ) {
        let mut pair = pair(if tls13 { &rustls::version::TLS13 } else { &rustls::version::TLS12 });
        pair.pump(piece).unwrap();
        pair.client.writer().write_all(&payload).unwrap();
        pair.pump(piece).unwrap();
        prop_assert_eq!(&pair.received, &payload);
        pair.server.send(&payload, &mut pair.wire);
        pair.pump(piece).unwrap();
        prop_assert_eq!(pair.client_plaintext(), payload);
    }
}
