//! Addresses as the user types them (CONTRACT: "Addresses"), parsed once at the edge.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

/// Why an address was rejected; the message names the text as typed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid address {text:?}: {reason}")]
pub struct AddrError {
    text: String,
    reason: String,
    is_lookup_failure: bool,
}

impl AddrError {
    /// Whether the text was well formed but its host name did not resolve: for a client,
    /// that is "cannot connect" (exit 1), not a usage error.
    pub fn is_lookup_failure(&self) -> bool {
        self.is_lookup_failure
    }

    /// Why the text was rejected, without the text itself.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

fn addr_error(text: &str, reason: impl Into<String>) -> AddrError {
    AddrError {
        text: text.to_string(),
        reason: reason.into(),
        is_lookup_failure: false,
    }
}

/// Parses `HOST:PORT` or `[V6]:PORT` where HOST is an IP literal or `localhost`.
///
/// # Errors
///
/// An unbracketed IPv6 literal, a host that is not an IP literal or `localhost`, or a
/// port that is not a number from 0 to 65535.
pub fn parse_ip_port(text: &str) -> Result<SocketAddr, AddrError> {
    // The port is judged first: in `foo:abc` the port is what is wrong, whatever the host.
    if let Some((_, port)) = text.rsplit_once(':') {
        if !text.ends_with(']') {
            parse_port(text, port)?;
        }
    }
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (host, port) = rest
            .split_once("]:")
            .ok_or_else(|| addr_error(text, "expected [V6]:PORT"))?;
        let ip: std::net::Ipv6Addr = host
            .parse()
            .map_err(|_| addr_error(text, format!("{host:?} is not an IPv6 address")))?;
        (IpAddr::V6(ip), port)
    } else {
        let (host, port) = text
            .rsplit_once(':')
            .ok_or_else(|| addr_error(text, "expected HOST:PORT, as in 127.0.0.1:7007"))?;
        if host.is_empty() {
            return Err(addr_error(
                text,
                "the host is missing; write it, as in 127.0.0.1:7007",
            ));
        }
        if host.contains(':') {
            return Err(addr_error(
                text,
                "an IPv6 address needs brackets, as in [::1]:7007",
            ));
        }
        let ip = if host.eq_ignore_ascii_case("localhost") {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            host.parse().map_err(|_| {
                addr_error(
                    text,
                    format!("{host:?} is not an IP address or \"localhost\""),
                )
            })?
        };
        (ip, port)
    };
    Ok(SocketAddr::new(host, parse_port(text, port)?))
}

fn parse_port(text: &str, port: &str) -> Result<u16, AddrError> {
    port.parse().map_err(|_| {
        addr_error(
            text,
            format!("the port {port:?} is not a number from 0 to 65535"),
        )
    })
}

/// Where a server listens (`--tcp`, `--udp`, `--unix`, `--unix-dgram`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenSpec {
    /// A TCP listener.
    Tcp(SocketAddr),
    /// A UDP socket.
    Udp(SocketAddr),
    /// A Unix stream listener at an absolute or relative path.
    Unix(PathBuf),
    /// A Unix datagram socket.
    UnixDatagram(PathBuf),
}

/// How a TLS client checks the server's certificate.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum TlsVerify {
    /// Against the system's trusted roots (`SSL_CERT_FILE`, or the distribution's bundle).
    #[default]
    System,
    /// Against the certificates in this PEM file (`--ca FILE`).
    Ca(PathBuf),
    /// Not at all (`--insecure`), for self-signed test servers; handshake signatures are
    /// still checked.
    Insecure,
}

/// A peer to talk to (`client`, `bench`): `tcp://`, `udp://`, `unix://`, `unix-dgram://`,
/// or a bare `HOST:PORT`, which means TCP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// TCP to this address.
    Tcp(SocketAddr),
    /// UDP to this address.
    Udp(SocketAddr),
    /// A Unix stream socket.
    Unix(PathBuf),
    /// A Unix datagram socket.
    UnixDatagram(PathBuf),
    /// TLS over TCP (`tls://HOST:PORT`).
    Tls {
        /// Where to connect.
        addr: SocketAddr,
        /// The host as typed: sent as SNI (unless an IP literal) and verified.
        server_name: String,
        /// How the server's certificate is checked (`--ca`, `--insecure`).
        verify: TlsVerify,
    },
}

impl Endpoint {
    /// Parses an endpoint as typed on the command line.
    ///
    /// Hosts may be names here, resolved as `nc` would; the first address wins.
    ///
    /// # Errors
    ///
    /// An unknown scheme, a relative Unix path, or an address that does not resolve.
    pub fn parse(text: &str) -> Result<Endpoint, AddrError> {
        if let Some(path) = text.strip_prefix("unix-dgram://") {
            return Ok(Endpoint::UnixDatagram(absolute_path(text, path)?));
        }
        if let Some(path) = text.strip_prefix("unix://") {
            return Ok(Endpoint::Unix(absolute_path(text, path)?));
        }
        if let Some(rest) = text.strip_prefix("udp://") {
            return Ok(Endpoint::Udp(resolve(text, rest)?));
        }
        if let Some(rest) = text.strip_prefix("tls://") {
            let addr = resolve(text, rest)?;
            let host = rest.rsplit_once(':').map_or(rest, |(host, _)| host);
            return Ok(Endpoint::Tls {
                addr,
                server_name: host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string(),
                verify: TlsVerify::System,
            });
        }
        let rest = text.strip_prefix("tcp://").unwrap_or(text);
        if rest.contains("://") {
            return Err(addr_error(
                text,
                "unknown scheme; use tcp://, udp://, tls://, unix:// or unix-dgram://",
            ));
        }
        Ok(Endpoint::Tcp(resolve(text, rest)?))
    }

    /// Whether this endpoint carries datagrams.
    pub fn is_datagram(&self) -> bool {
        matches!(self, Endpoint::Udp(_) | Endpoint::UnixDatagram(_))
    }
}

/// The longest Unix socket path, in bytes: `sun_path` holds 108 bytes, the last one the
/// closing NUL (unix(7)).
pub const MAX_UNIX_PATH_BYTES: usize = 107;

/// Refuses a Unix socket path longer than [`MAX_UNIX_PATH_BYTES`], saying how long it is
/// and what is accepted.
///
/// # Errors
///
/// The path is too long for `sun_path`.
pub fn check_unix_path_length(path: &std::path::Path) -> Result<(), String> {
    let bytes = path.as_os_str().len();
    if bytes > MAX_UNIX_PATH_BYTES {
        return Err(format!(
            "the path is {bytes} bytes long; a Unix socket path takes at most \
             {MAX_UNIX_PATH_BYTES} bytes (sun_path, unix(7))"
        ));
    }
    Ok(())
}

fn absolute_path(text: &str, path: &str) -> Result<PathBuf, AddrError> {
    if path.starts_with('/') {
        check_unix_path_length(path.as_ref()).map_err(|reason| addr_error(text, reason))?;
        Ok(PathBuf::from(path))
    } else {
        Err(addr_error(
            text,
            "a Unix socket path must be absolute, as in unix:///tmp/reverb.sock",
        ))
    }
}

fn resolve(text: &str, host_port: &str) -> Result<SocketAddr, AddrError> {
    match parse_ip_port(host_port) {
        Ok(addr) => Ok(addr),
        Err(literal_error) => {
            if host_port.starts_with('[')
                || host_port.starts_with(':')
                || host_port.matches(':').count() != 1
            {
                return Err(AddrError {
                    text: text.to_string(),
                    ..literal_error
                });
            }
            let lookup_error = |reason: String| AddrError {
                is_lookup_failure: true,
                ..addr_error(text, reason)
            };
            // The port must be a number before a failed lookup can be blamed on the name.
            if parse_ip_port(&format!(
                "0.0.0.0:{}",
                host_port.rsplit(':').next().unwrap_or("")
            ))
            .is_err()
            {
                return Err(AddrError {
                    text: text.to_string(),
                    ..literal_error
                });
            }
            let mut addrs = host_port
                .to_socket_addrs()
                .map_err(|e| lookup_error(e.to_string()))?;
            addrs
                .next()
                .ok_or_else(|| lookup_error("the name resolved to no address".to_string()))
        }
    }
}

/// Formats a socket address as the contract prints it: `[v6]:port` keeps its brackets.
fn fmt_ip(addr: &SocketAddr, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    write!(f, "{addr}")
}

fn fmt_path(path: &Path, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    write!(f, "{}", path.display())
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(addr) => {
                f.write_str("tcp://")?;
                fmt_ip(addr, f)
            }
            Endpoint::Udp(addr) => {
                f.write_str("udp://")?;
                fmt_ip(addr, f)
            }
            Endpoint::Unix(path) => {
                f.write_str("unix://")?;
                fmt_path(path, f)
            }
            Endpoint::UnixDatagram(path) => {
                f.write_str("unix-dgram://")?;
                fmt_path(path, f)
            }
            Endpoint::Tls { addr, .. } => {
                f.write_str("tls://")?;
                fmt_ip(addr, f)
            }
        }
    }
}

impl fmt::Display for ListenSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let endpoint = match self {
            ListenSpec::Tcp(addr) => Endpoint::Tcp(*addr),
            ListenSpec::Udp(addr) => Endpoint::Udp(*addr),
            ListenSpec::Unix(path) => Endpoint::Unix(path.clone()),
            ListenSpec::UnixDatagram(path) => Endpoint::UnixDatagram(path.clone()),
        };
        endpoint.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        assert_eq!(
            parse_ip_port("127.0.0.1:7007"),
            Ok("127.0.0.1:7007".parse().unwrap())
        );
        assert_eq!(
            parse_ip_port("localhost:0"),
            Ok("127.0.0.1:0".parse().unwrap())
        );
        assert_eq!(parse_ip_port("[::1]:9"), Ok("[::1]:9".parse().unwrap()));
        assert!(
            parse_ip_port("::1:7007")
                .unwrap_err()
                .to_string()
                .contains("brackets")
        );
        assert!(parse_ip_port("127.0.0.1:70000").is_err());
        assert!(parse_ip_port("example.com:80").is_err());
        assert!(parse_ip_port("7007").is_err());
        assert!(
            parse_ip_port(":7007")
                .unwrap_err()
                .to_string()
                .contains("host is missing")
        );
        assert!(
            parse_ip_port("localhost:abc")
                .unwrap_err()
                .to_string()
                .contains("port")
        );
    }

    #[test]
    fn endpoints() {
        assert_eq!(
            Endpoint::parse("127.0.0.1:1"),
            Ok(Endpoint::Tcp("127.0.0.1:1".parse().unwrap()))
        );
        assert_eq!(
            Endpoint::parse("udp://[::1]:5").unwrap().to_string(),
            "udp://[::1]:5"
        );
        assert_eq!(
            Endpoint::parse("unix:///tmp/x.sock"),
            Ok(Endpoint::Unix("/tmp/x.sock".into()))
        );
        assert_eq!(
            Endpoint::parse("unix-dgram:///tmp/d").unwrap().to_string(),
            "unix-dgram:///tmp/d"
        );
        assert!(Endpoint::parse("unix://relative").is_err());
        assert!(Endpoint::parse("http://127.0.0.1:1").is_err());
        assert!(Endpoint::parse("a..b:7").unwrap_err().is_lookup_failure());
        assert!(
            !Endpoint::parse("a..b:port")
                .unwrap_err()
                .is_lookup_failure()
        );
        assert!(!Endpoint::parse("::1:7").unwrap_err().is_lookup_failure());
        let bad_port = Endpoint::parse("foo:abc").unwrap_err();
        assert!(bad_port.reason().contains("port \"abc\""), "{bad_port}");
        let no_host = Endpoint::parse(":7007").unwrap_err();
        assert!(!no_host.is_lookup_failure(), "{no_host}");
    }

    #[test]
    fn kinds_and_spellings() {
        for (text, is_datagram) in [
            ("tcp://127.0.0.1:1", false),
            ("127.0.0.1:1", false),
            ("udp://127.0.0.1:1", true),
            ("unix:///tmp/s", false),
            ("unix-dgram:///tmp/d", true),
        ] {
            assert_eq!(
                Endpoint::parse(text).unwrap().is_datagram(),
                is_datagram,
                "{text}"
            );
        }
        let specs = [
            (ListenSpec::Tcp("[::1]:7".parse().unwrap()), "tcp://[::1]:7"),
            (
                ListenSpec::Udp("127.0.0.1:7".parse().unwrap()),
                "udp://127.0.0.1:7",
            ),
            (ListenSpec::Unix("/tmp/s".into()), "unix:///tmp/s"),
            (
                ListenSpec::UnixDatagram("/tmp/d".into()),
                "unix-dgram:///tmp/d",
            ),
        ];
        for (spec, printed) in specs {
            assert_eq!(spec.to_string(), printed);
        }
        // The port is judged first, whatever the host.
        assert!(
            parse_ip_port("foo:abc")
                .unwrap_err()
                .reason()
                .contains("port \"abc\"")
        );
        assert!(
            parse_ip_port("[::1]:abc")
                .unwrap_err()
                .reason()
                .contains("port \"abc\"")
        );
        assert!(
            parse_ip_port(":7")
                .unwrap_err()
                .reason()
                .contains("host is missing")
        );
        assert!(
            parse_ip_port("[::1]")
                .unwrap_err()
                .reason()
                .contains("[V6]:PORT")
        );
        assert_eq!(
            parse_ip_port("LocalHost:1"),
            Ok("127.0.0.1:1".parse().unwrap())
        );
        assert_eq!(
            parse_ip_port("[::ffff:127.0.0.1]:0"),
            Ok("[::ffff:127.0.0.1]:0".parse().unwrap())
        );
    }

    #[test]
    fn errors_name_the_address_as_typed() {
        for text in [
            "udp://::1:7",
            "tcp://::1:7",
            "udp://[::1]:port",
            "udp://localhost:port",
            "tcp://[nope]:7",
            "unix://relative",
            "unix-dgram://relative",
            "ftp://127.0.0.1:1",
        ] {
            let message = Endpoint::parse(text).unwrap_err().to_string();
            assert!(
                message.starts_with(&format!("invalid address {text:?}: ")),
                "{text}: {message}"
            );
        }
        let error = Endpoint::parse("udp://::1:7").unwrap_err();
        assert!(error.reason().contains("brackets"), "{}", error.reason());
        assert!(!error.to_string().contains("\"::1:7\""));
    }
}
