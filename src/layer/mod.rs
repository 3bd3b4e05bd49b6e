//! What sits between a stream's socket bytes and its protocol session: the PROXY protocol
//! header a load balancer puts first ([`proxy`]), TLS ([`tls`]), and the greeting
//! template filled in once the peer is known ([`greeting`]).
//!
//! Each is sans-IO, bytes in and bytes out with no socket, clock or thread, so the shared
//! connection core drives them the same way for every model.

pub mod greeting;
pub mod proxy;
pub mod tls;

use std::sync::Arc;
use std::time::Duration;

/// Default time from accept to a complete PROXY header (`--proxy-timeout`).
pub const DEFAULT_PROXY_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time from accept to a finished TLS handshake (`--tls-handshake-timeout`).
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What every stream connection puts between its socket and its session.
#[derive(Clone, Debug)]
pub struct StreamLayers {
    /// Require a PROXY protocol header first (`--proxy-protocol`).
    pub proxy_protocol: bool,
    /// Time from accept to a complete PROXY header.
    pub proxy_timeout: Duration,
    /// Speak TLS (`--tls-cert`/`--tls-key` or `--tls-self-signed`).
    pub tls: Option<tls::TlsConfig>,
    /// Time from accept to a finished TLS handshake (PROXY header included).
    pub tls_handshake_timeout: Duration,
    /// The greeting template (`--greeting`), filled in once the peer is known.
    pub greeting: Option<Arc<greeting::Greeting>>,
}

impl Default for StreamLayers {
    fn default() -> Self {
        StreamLayers {
            proxy_protocol: false,
            proxy_timeout: DEFAULT_PROXY_TIMEOUT,
            tls: None,
            tls_handshake_timeout: DEFAULT_TLS_HANDSHAKE_TIMEOUT,
            greeting: None,
        }
    }
}
