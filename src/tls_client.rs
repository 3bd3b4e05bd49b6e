//! The client side of TLS for `reverb client tls://` and `reverb bench tls://`.
//!
//! [`connect`] makes the TLS handshake on a connected TCP stream (verifying the server
//! against `--ca`, the system's roots, or nothing with `--insecure`; SNI from the host
//! name), then hands back a plain Unix stream: a relay thread carries bytes between it and
//! the TLS session. So the client and the bench engine, written for plain streams, speak
//! TLS without a line of TLS in them; a half-close of the plain stream becomes
//! close_notify, and the server's close_notify an EOF.

pub use crate::addr::TlsVerify;
use crate::layer::tls::TlsSetupError;
use crate::sys::poll::{self, POLLERR, POLLHUP, POLLIN, POLLOUT};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Where the distributions keep their trusted roots, tried in order after `SSL_CERT_FILE`.
const SYSTEM_BUNDLES: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// The handshake must finish within this long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Plaintext waiting for the local side, past which the relay stops reading the server.
const RELAY_BUFFER_BYTES: usize = 256 * 1024;

/// A client TLS configuration for `verify`.
///
/// # Errors
///
/// A [`TlsSetupError`] naming the CA file when it cannot be read or holds no certificate.
pub fn client_config(verify: &TlsVerify) -> Result<Arc<ClientConfig>, TlsSetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsSetupError::SelfSigned(e.to_string()))?;
    let config = match verify {
        TlsVerify::Insecure => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth(),
        TlsVerify::Ca(path) => builder
            .with_root_certificates(roots_from(path)?)
            .with_no_client_auth(),
        TlsVerify::System => {
            let bundle = std::env::var_os("SSL_CERT_FILE")
                .map(PathBuf::from)
                .or_else(|| {
                    SYSTEM_BUNDLES
                        .iter()
                        .map(PathBuf::from)
                        .find(|path| path.exists())
                });
            let roots = match bundle {
                Some(path) => roots_from(&path)?,
                None => RootCertStore::empty(),
            };
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    Ok(Arc::new(config))
}

fn roots_from(path: &Path) -> Result<RootCertStore, TlsSetupError> {
    let pem = std::fs::read(path).map_err(|source| TlsSetupError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| TlsSetupError::Pem {
            path: path.to_path_buf(),
            detail: format!("not a valid PEM file ({e})"),
        })?;
        // Bundles hold certificates webpki cannot parse; the others still count.
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(TlsSetupError::Pem {
            path: path.to_path_buf(),
            detail: "no usable certificate found (expected PEM \"BEGIN CERTIFICATE\" sections)"
                .into(),
        });
    }
    Ok(roots)
}

/// `--insecure`: any certificate is accepted, but the handshake's signatures are still
/// verified, so the session is at least bound to the certificate shown.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Makes the TLS handshake on `tcp` for `server_name` (the SNI and the name verified),
/// then returns a plain stream whose bytes a relay thread carries over TLS.
///
/// # Errors
///
/// The CA file's problem, a failed or timed-out handshake (an untrusted certificate, no
/// common version), or the OS error of making the relay.
pub fn connect(tcp: TcpStream, server_name: &str, verify: &TlsVerify) -> io::Result<UnixStream> {
    let config = client_config(verify).map_err(io::Error::other)?;
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut tls = ClientConnection::new(config, name).map_err(io::Error::other)?;
    // The relay bounds what it holds itself: it reads no more plaintext while records wait.
    tls.set_buffer_limit(None);
    tcp.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    tcp.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let mut handshake_stream = &tcp;
    while tls.is_handshaking() {
        tls.complete_io(&mut handshake_stream)
            .map_err(|e| match e.kind() {
                io::ErrorKind::WouldBlock => {
                    io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")
                }
                _ => e,
            })?;
    }
    let (local, relay_end) = UnixStream::pair()?;
    tcp.set_nonblocking(true)?;
    relay_end.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name("tls-relay".into())
        .spawn(move || {
            if let Err(e) = relay(&mut tls, &tcp, &relay_end) {
                tracing::debug!("TLS relay ended: {e}");
            }
        })?;
    Ok(local)
}

/// Carries plaintext from `local` into TLS records on `tcp` and back, until both
/// directions are done.
fn relay(tls: &mut ClientConnection, tcp: &TcpStream, local: &UnixStream) -> io::Result<()> {
    let mut to_local: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut is_local_done = false;
    let mut is_server_done = false;
    let mut has_shut_tcp = false;
    loop {
        while tls.wants_write() {
            match tls.write_tls(&mut &*tcp) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if is_local_done && !tls.wants_write() && !has_shut_tcp {
            // close_notify is out: the TCP half-close follows, as a plain client's would.
            has_shut_tcp = true;
            let _ = tcp.shutdown(Shutdown::Write);
        }
        while !to_local.is_empty() {
            match (&*local).write(&to_local) {
                Ok(n) => drop(to_local.drain(..n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if is_server_done && to_local.is_empty() {
            let _ = local.shutdown(Shutdown::Write);
            return Ok(());
        }
        let tcp_events = if !is_server_done && to_local.len() < RELAY_BUFFER_BYTES {
            POLLIN
        } else {
            0
        } | if tls.wants_write() { POLLOUT } else { 0 };
        let local_events = if !is_local_done && !tls.wants_write() {
            POLLIN
        } else {
            0
        } | if to_local.is_empty() { 0 } else { POLLOUT };
        let mut entries = [
            poll::entry(tcp.as_fd(), tcp_events),
            poll::entry(local.as_fd(), local_events),
        ];
        poll::poll(&mut entries, None)?;
        if entries[0].revents & (POLLIN | POLLHUP | POLLERR) != 0 && tcp_events & POLLIN != 0 {
            match tls.read_tls(&mut &*tcp) {
                Ok(0) => is_server_done = true,
                Ok(_) => {
                    tls.process_new_packets().map_err(io::Error::other)?;
                    loop {
                        match tls.reader().read(&mut buf) {
                            Ok(0) => {
                                is_server_done = true;
                                break;
                            }
                            Ok(n) => to_local.extend_from_slice(&buf[..n]),
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(e) => return Err(e),
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        if entries[1].revents & (POLLIN | POLLHUP | POLLERR) != 0 && local_events & POLLIN != 0 {
            match (&*local).read(&mut buf) {
                Ok(0) => {
                    is_local_done = true;
                    tls.send_close_notify();
                }
                Ok(n) => tls.writer().write_all(&buf[..n])?,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
}
