//! TLS 1.2 and 1.3 with rustls, driven sans-IO: ciphertext in, plaintext out, and back.
//!
//! [`TlsLayer`] wraps a `rustls::ServerConnection` and never touches a socket: the
//! connection core hands it the bytes a model read and takes from it the bytes a model
//! must write, exactly as it does for plaintext. So backpressure, half-close, idle
//! timeouts and drain need nothing TLS-specific from any model.

use crate::buffer::WriteBuffer;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ServerConfig, ServerConnection};
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why the TLS configuration could not be built; each names the file and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file as given.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The file is not valid PEM, or holds nothing of the kind needed.
    #[error("{}: {detail}", path.display())]
    Pem {
        /// The file as given.
        path: PathBuf,
        /// What is wrong with it and what is expected.
        detail: String,
    },
    /// rustls refused the pair (for example, the key does not belong to the certificate).
    #[error("{} and {} do not make a usable certificate: {source}", cert.display(), key.display())]
    Rejected {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls's reason.
        source: rustls::Error,
    },
    /// The throwaway certificate could not be made.
    #[error("cannot make a self-signed certificate: {0}")]
    SelfSigned(String),
}

/// A server's TLS configuration, shared by every connection.
#[derive(Clone, Debug)]
pub struct TlsConfig {
    config: Arc<ServerConfig>,
    /// SHA-256 of the leaf certificate's DER, as `AA:BB:...` (the form
    /// `openssl x509 -fingerprint -sha256` prints).
    fingerprint: String,
}

impl TlsConfig {
    /// Loads a certificate chain and its private key from PEM files (`--tls-cert`,
    /// `--tls-key`). The key may be PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
    ///
    /// # Errors
    ///
    /// A [`TlsSetupError`] naming the file: unreadable, not PEM, no certificate, no key,
    /// or a key that does not match the certificate.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, TlsSetupError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| TlsSetupError::Read {
                path: path.to_path_buf(),
                source,
            })
        };
        let pem_error = |path: &Path, detail: String| TlsSetupError::Pem {
            path: path.to_path_buf(),
            detail,
        };
        let cert_pem = read(cert)?;
        let chain = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| pem_error(cert, format!("not a valid PEM file ({error})")))?;
        if chain.is_empty() {
            return Err(pem_error(
                cert,
                "no certificate found (expected a PEM \"BEGIN CERTIFICATE\" section)".into(),
            ));
        }
        let key_pem = read(key)?;
        let private_key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|error| {
            pem_error(
                key,
                match error {
                    rustls::pki_types::pem::Error::NoItemsFound => "no private key found \
                        (expected a PEM \"BEGIN PRIVATE KEY\", \"BEGIN RSA PRIVATE KEY\" \
                        or \"BEGIN EC PRIVATE KEY\" section)"
                        .into(),
                    other => format!("not a valid PEM private key ({other})"),
                },
            )
        })?;
        let fingerprint = sha256_fingerprint(&chain[0]);
        let config =
            server_config(chain, private_key).map_err(|source| TlsSetupError::Rejected {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
                source,
            })?;
        Ok(TlsConfig {
            config,
            fingerprint,
        })
    }

    /// A throwaway certificate for `localhost`, `127.0.0.1` and `::1`, made now
    /// (`--tls-self-signed`); clients must skip verification or pin its fingerprint.
    ///
    /// # Errors
    ///
    /// [`TlsSetupError::SelfSigned`] if the key or certificate cannot be generated.
    pub fn self_signed() -> Result<Self, TlsSetupError> {
        let names = ["localhost", "127.0.0.1", "::1"].map(String::from).to_vec();
        let generated = rcgen::generate_simple_self_signed(names)
            .map_err(|error| TlsSetupError::SelfSigned(error.to_string()))?;
        let cert = CertificateDer::from(generated.cert.der().to_vec());
        let key = PrivatePkcs8KeyDer::from(generated.signing_key.serialize_der());
        let fingerprint = sha256_fingerprint(&cert);
        let config = server_config(vec![cert], key.into())
            .map_err(|error| TlsSetupError::SelfSigned(error.to_string()))?;
        Ok(TlsConfig {
            config,
            fingerprint,
        })
    }

    /// The leaf certificate's SHA-256 fingerprint, `AA:BB:...`.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// A new server-side TLS session for one connection.
    ///
    /// # Errors
    ///
    /// rustls's error if it cannot start a session (it allocates nothing that can fail
    /// with a valid configuration, so this does not happen in practice).
    pub fn new_layer(&self) -> Result<TlsLayer, rustls::Error> {
        let mut connection = ServerConnection::new(self.config.clone())?;
        // The bound is the connection core's (`--max-buffer` over plaintext and
        // ciphertext held), so rustls takes every byte offered and holds it only until
        // `write_to` moves it out.
        connection.set_buffer_limit(None);
        Ok(TlsLayer {
            connection,
            has_queued_close_notify: false,
        })
    }
}

fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(Arc::new(config))
}

/// `AA:BB:...`: the SHA-256 of a certificate's DER, as openssl prints it.
pub fn sha256_fingerprint(cert: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, cert);
    let hex: Vec<String> = digest.as_ref().iter().map(|b| format!("{b:02X}")).collect();
    hex.join(":")
}

/// The most plaintext one TLS record carries (RFC 8446, section 5.1: 2^14 bytes).
const MAX_RECORD_PLAINTEXT_BYTES: usize = 16 * 1024;

/// Why a TLS session ended badly.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(String);

/// One connection's TLS session, sans-IO.
#[derive(Debug)]
pub struct TlsLayer {
    connection: ServerConnection,
    has_queued_close_notify: bool,
}

/// What [`TlsLayer::receive`] found besides plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsInput {
    /// The session goes on.
    Open,
    /// The peer sent close_notify: it will send nothing more (a TLS half-close).
    PeerClosed,
}

impl TlsLayer {
    /// Takes ciphertext from the peer; hands each piece of plaintext to `deliver`.
    /// Handshake replies and alerts are queued; [`TlsLayer::write_to`] moves them out.
    ///
    /// The caller bounds `ciphertext` by the room its output has: plaintext is never
    /// longer than the ciphertext that carried it, so everything is delivered at once
    /// and nothing waits inside rustls.
    ///
    /// # Errors
    ///
    /// A [`TlsError`] when the peer's bytes break TLS (a handshake of garbage, a bad
    /// record); an alert saying so is queued for the peer, and the connection should be
    /// closed once it is written.
    pub fn receive(
        &mut self,
        mut ciphertext: &[u8],
        deliver: &mut dyn FnMut(&[u8]),
    ) -> Result<TlsInput, TlsError> {
        let mut input = TlsInput::Open;
        while !ciphertext.is_empty() {
            self.connection
                .read_tls(&mut ciphertext)
                .map_err(|error| TlsError(error.to_string()))?;
            let state = self
                .connection
                .process_new_packets()
                .map_err(|error| TlsError(error.to_string()))?;
            if state.plaintext_bytes_to_read() > 0 || state.peer_has_closed() {
                let mut reader = self.connection.reader();
                loop {
                    match reader.fill_buf() {
                        Ok([]) => {
                            input = TlsInput::PeerClosed;
                            break;
                        }
                        Ok(chunk) => {
                            deliver(chunk);
                            let taken = chunk.len();
                            reader.consume(taken);
                        }
                        Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                        Err(error) => return Err(TlsError(error.to_string())),
                    }
                }
            }
        }
        Ok(input)
    }

    /// Whether the handshake is still going on (application data cannot flow yet).
    pub fn is_handshaking(&self) -> bool {
        self.connection.is_handshaking()
    }

    /// Encrypts `plaintext` into `wire`. Call only once the handshake is done.
    pub fn send(&mut self, plaintext: &[u8], wire: &mut WriteBuffer) {
        // Pieces of one TLS record's payload each, so rustls holds at most one record
        // before `write_to` moves it out.
        for piece in plaintext.chunks(MAX_RECORD_PLAINTEXT_BYTES) {
            // Without a buffer limit rustls takes the whole piece once the handshake is
            // done (`write_all` would report it if it ever did not, rather than spin).
            if self.connection.writer().write_all(piece).is_err() {
                break;
            }
            self.write_to(wire);
        }
    }

    /// Moves every queued TLS record (handshake, data, alert, close_notify) to `wire`.
    pub fn write_to(&mut self, wire: &mut WriteBuffer) {
        let mut sink = Sink(wire);
        while self.connection.wants_write() {
            // Writing into memory cannot fail or stop short; the loop ends when rustls
            // has nothing left.
            if self.connection.write_tls(&mut sink).is_err() {
                break;
            }
        }
    }

    /// Queues close_notify (once), after everything sent so far.
    pub fn close(&mut self, wire: &mut WriteBuffer) {
        if !self.has_queued_close_notify {
            self.has_queued_close_notify = true;
            self.connection.send_close_notify();
            self.write_to(wire);
        }
    }

    /// The protocol version and cipher suite agreed, for a log line.
    pub fn describe(&self) -> String {
        match (
            self.connection.protocol_version(),
            self.connection.negotiated_cipher_suite(),
        ) {
            (Some(version), Some(suite)) => format!("{version:?} {:?}", suite.suite()),
            _ => "handshake not finished".into(),
        }
    }
}

/// `io::Write` into a [`WriteBuffer`], for `write_tls`.
struct Sink<'a>(&'a mut WriteBuffer);

impl Write for Sink<'_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0.push(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests;
