//! The command line as clap sees it: every subcommand, flag, default and value name.
//!
//! Values are parsed by [`reverb::flags`] and [`reverb::addr`], and the rules between flags
//! live in [`reverb::flags::check_serve`], so the library's tests cover them; this file only
//! declares the flags and turns them into the library's types.

use clap::{Args, Parser, Subcommand};
use reverb::addr::{Endpoint, ListenSpec, TlsVerify, parse_ip_port};
use reverb::flags::{
    ServeFlags, parse_bytes, parse_model, parse_positive_secs, parse_protocol, parse_secs,
};
use reverb::layer::StreamLayers;
use reverb::layer::greeting::Greeting;
use reverb::layer::tls::{TlsConfig, TlsSetupError};
use reverb::models::Model;
use reverb::protocol::{Protocol, ProtocolKind};
use reverb::server::Limits;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "reverb",
    version,
    about = "An echo-server toolkit: every I/O model, one protocol core"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Serve echo (or lines, or until-quit) on TCP, UDP and Unix sockets.
    Serve(Box<ServeArgs>),
    /// Talk to a server: interactive on a terminal, nc-style with a pipe.
    Client(ClientArgs),
    /// Load a server with verified echoes and report throughput and latency.
    Bench(BenchArgs),
    /// Run every model side by side and compare them.
    Compare(CompareArgs),
}

#[derive(Args)]
pub struct ServeArgs {
    /// Listen on TCP (HOST:PORT or [V6]:PORT; port 0 picks a free one).
    #[arg(long, value_name = "ADDR", value_parser = parse_ip_port)]
    pub tcp: Vec<SocketAddr>,
    /// Answer datagrams on UDP.
    #[arg(long, value_name = "ADDR", value_parser = parse_ip_port)]
    pub udp: Vec<SocketAddr>,
    /// Listen on a Unix stream socket at PATH.
    #[arg(long, value_name = "PATH")]
    pub unix: Vec<PathBuf>,
    /// Answer datagrams on a Unix datagram socket at PATH.
    #[arg(long, value_name = "PATH")]
    pub unix_dgram: Vec<PathBuf>,
    /// The I/O model.
    #[arg(long, value_name = "MODEL", default_value = "epoll", value_parser = parse_model)]
    pub model: Model,
    /// Worker threads (pool) or event loops (epoll, async, tokio, uring).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub threads: Option<u32>,
    /// What to answer.
    #[arg(long, value_name = "PROTOCOL", default_value = "echo", value_parser = parse_protocol)]
    pub protocol: ProtocolKind,
    /// Put TEXT in front of every reply unit (not with stream echo).
    #[arg(long, value_name = "TEXT")]
    pub prefix: Option<String>,
    /// Send TEXT first on every new stream connection; {peer} and {local} are replaced by
    /// the client's address and the address it reached, {{ and }} are literal braces.
    #[arg(long, value_name = "TEXT", value_parser = parse_greeting)]
    pub greeting: Option<Greeting>,
    /// With lines: a line equal to WORD makes its handler panic (tests isolation).
    #[arg(long, value_name = "WORD")]
    pub panic_on: Option<String>,
    /// At most N stream connections at once.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_conns: Option<u64>,
    /// Close a stream connection that sent nothing for SECS.
    #[arg(long, value_name = "SECS", value_parser = parse_positive_secs)]
    pub idle_timeout: Option<Duration>,
    /// Bytes held for one connection before it stops being read (e.g. 262144, 256K, 1M).
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes, default_value = "256K")]
    pub max_buffer: usize,
    /// After SIGTERM/SIGINT, how long owed replies may take.
    #[arg(long, value_name = "SECS", value_parser = parse_secs, default_value = "5")]
    pub drain_timeout: Duration,
    /// Every stream connection must start with a PROXY protocol v1 or v2 header; the
    /// client address it carries is the peer from then on.
    #[arg(long)]
    pub proxy_protocol: bool,
    /// Seconds from accept to a complete PROXY header before the connection is closed.
    #[arg(long, value_name = "SECS", value_parser = parse_positive_secs, default_value = "5")]
    pub proxy_timeout: Duration,
    /// Speak TLS on every stream listener with this PEM certificate chain (needs --tls-key).
    #[arg(
        long,
        value_name = "PEM",
        requires = "tls_key",
        conflicts_with = "tls_self_signed"
    )]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Speak TLS with a throwaway certificate made at start; its SHA-256 fingerprint is logged.
    #[arg(long)]
    pub tls_self_signed: bool,
    /// Seconds from accept to a finished TLS handshake before the connection is closed.
    #[arg(long, value_name = "SECS", value_parser = parse_positive_secs, default_value = "10")]
    pub tls_handshake_timeout: Duration,
    /// Log each connection (debug level).
    #[arg(short, long)]
    pub verbose: bool,
}

impl ServeArgs {
    /// The listeners in the order their flags were given, which the readiness lines follow;
    /// clap keeps each flag's values in order, and their indices give the order across flags.
    /// No listener flag at all means TCP and UDP on 127.0.0.1:7007.
    pub fn listen_specs(&self, matches: &clap::ArgMatches) -> Vec<ListenSpec> {
        let mut indexed = Vec::new();
        let mut push = |name: &str, make: &dyn Fn(usize) -> ListenSpec| {
            if let Some(indices) = matches.indices_of(name) {
                for (n, index) in indices.enumerate() {
                    indexed.push((index, make(n)));
                }
            }
        };
        push("tcp", &|n| ListenSpec::Tcp(self.tcp[n]));
        push("udp", &|n| ListenSpec::Udp(self.udp[n]));
        push("unix", &|n| ListenSpec::Unix(self.unix[n].clone()));
        push("unix_dgram", &|n| {
            ListenSpec::UnixDatagram(self.unix_dgram[n].clone())
        });
        indexed.sort_by_key(|(index, _)| *index);
        let mut specs: Vec<ListenSpec> = indexed.into_iter().map(|(_, spec)| spec).collect();
        if specs.is_empty() {
            let default = SocketAddr::from(([127, 0, 0, 1], 7007));
            specs = vec![ListenSpec::Tcp(default), ListenSpec::Udp(default)];
        }
        specs
    }

    /// The flags whose combinations [`reverb::flags::check_serve`] judges.
    pub fn flags<'a>(&'a self, listeners: &'a [ListenSpec]) -> ServeFlags<'a> {
        ServeFlags {
            protocol: self.protocol,
            prefix: self.prefix.as_deref(),
            panic_on: self.panic_on.as_deref(),
            listeners,
        }
    }

    /// The protocol core configured by `--protocol`, `--prefix`, `--greeting`, `--panic-on`.
    pub fn protocol(&self) -> Protocol {
        let mut protocol = Protocol::new(self.protocol, self.max_buffer);
        if let Some(prefix) = &self.prefix {
            protocol = protocol.with_prefix(prefix.as_bytes());
        }
        if let Some(word) = &self.panic_on {
            protocol = protocol.with_panic_on(word.as_bytes());
        }
        protocol
    }

    /// The TLS configuration, if any: certificate files loaded, or a throwaway made.
    pub fn tls(&self) -> Result<Option<TlsConfig>, TlsSetupError> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => TlsConfig::from_pem_files(cert, key).map(Some),
            _ if self.tls_self_signed => TlsConfig::self_signed().map(Some),
            _ => Ok(None),
        }
    }

    /// The limits every model applies, with `tls` from [`ServeArgs::tls`].
    pub fn limits(&self, tls: Option<TlsConfig>) -> Limits {
        Limits {
            layers: StreamLayers {
                proxy_protocol: self.proxy_protocol,
                proxy_timeout: self.proxy_timeout,
                tls,
                tls_handshake_timeout: self.tls_handshake_timeout,
                greeting: self
                    .greeting
                    .clone()
                    .filter(|greeting| !greeting.is_empty())
                    .map(Arc::new),
            },
            max_conns: self.max_conns.map(|n| n as usize),
            idle_timeout: self.idle_timeout,
            max_buffer_bytes: self.max_buffer,
            drain_timeout: self.drain_timeout,
        }
    }
}

#[derive(Args)]
pub struct ClientArgs {
    /// tcp://HOST:PORT, udp://HOST:PORT, unix:///path, unix-dgram:///path, or HOST:PORT.
    // Parsed in `client`: a name that does not resolve is "cannot connect" (exit 1).
    pub addr: String,
    /// With tls://: trust the server certificates in this PEM file instead of the system's.
    #[arg(long, value_name = "FILE", conflicts_with = "insecure")]
    pub ca: Option<PathBuf>,
    /// With tls://: accept any server certificate (a self-signed test server).
    #[arg(long)]
    pub insecure: bool,
}

#[derive(Args)]
pub struct BenchArgs {
    /// The server to load.
    #[arg(value_parser = parse_endpoint)]
    pub addr: Endpoint,
    /// Connections (for datagrams: sockets).
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub conns: u32,
    /// Bytes per message (e.g. 64, 1K, 1M).
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes, default_value = "64")]
    pub size: usize,
    /// Messages in flight per connection (closed loop).
    #[arg(long, value_name = "D", default_value_t = 1)]
    pub depth: u32,
    /// Measured seconds.
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_positive_secs)]
    pub duration: Duration,
    /// Seconds of load before measuring (verified, not counted).
    #[arg(long, value_name = "SECS", default_value = "1", value_parser = parse_secs)]
    pub warmup: Duration,
    /// Open loop: total messages per second, latency counted from each scheduled send.
    #[arg(long, value_name = "MSGS_PER_S")]
    pub rate: Option<f64>,
    /// Client threads, each its own event loop.
    #[arg(long, value_name = "T", default_value_t = 1)]
    pub threads: u32,
    /// One JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// With tls://: trust the server certificates in this PEM file instead of the system's.
    #[arg(long, value_name = "FILE", conflicts_with = "insecure")]
    pub ca: Option<PathBuf>,
    /// With tls://: accept any server certificate (a self-signed test server).
    #[arg(long)]
    pub insecure: bool,
}

impl BenchArgs {
    /// The bench engine's configuration.
    pub fn config(&self) -> reverb::bench::BenchConfig {
        reverb::bench::BenchConfig {
            conns: self.conns,
            size: self.size,
            depth: self.depth,
            duration: self.duration,
            warmup: self.warmup,
            rate: self.rate,
            threads: self.threads,
            ..reverb::bench::BenchConfig::default()
        }
    }
}

#[derive(Args)]
pub struct CompareArgs {
    /// Comma-separated models (default: all available).
    #[arg(long, value_delimiter = ',', value_parser = parse_model)]
    pub models: Vec<Model>,
    /// Comma-separated connection counts.
    #[arg(long, value_delimiter = ',')]
    pub conns: Vec<u32>,
    /// Bytes per message.
    #[arg(long)]
    pub size: Option<u32>,
    /// Messages in flight per connection.
    #[arg(long)]
    pub depth: Option<u32>,
    /// Measured seconds per point.
    #[arg(long, value_parser = parse_positive_secs)]
    pub duration: Option<Duration>,
    /// Where compare.json, compare.md and compare.svg go.
    #[arg(long, default_value = "compare-out")]
    pub out: PathBuf,
}

impl CompareArgs {
    /// The comparison's configuration; `server_exe` is the binary each model runs as.
    pub fn config(&self, server_exe: PathBuf) -> reverb::compare::CompareConfig {
        let mut config = reverb::compare::CompareConfig::new(server_exe);
        config.models = self.models.clone();
        if !self.conns.is_empty() {
            config.conns = self.conns.clone();
        }
        if let Some(size) = self.size {
            config.size = size as usize;
        }
        if let Some(depth) = self.depth {
            config.depth = depth;
        }
        if let Some(duration) = self.duration {
            config.duration = duration;
        }
        config
    }
}

fn parse_endpoint(text: &str) -> Result<Endpoint, String> {
    Endpoint::parse(text).map_err(|e| e.to_string())
}

/// `--greeting`: a template with `{peer}`, `{local}`, `{{` and `}}`.
fn parse_greeting(text: &str) -> Result<Greeting, String> {
    Greeting::parse(text).map_err(|e| e.to_string())
}

/// `endpoint` with the certificate check `--ca`/`--insecure` ask for.
///
/// # Errors
///
/// A usage message when either flag is given for an address that is not `tls://`.
pub fn with_tls_verify(
    endpoint: Endpoint,
    ca: Option<&PathBuf>,
    insecure: bool,
) -> Result<Endpoint, String> {
    let wanted = match (ca, insecure) {
        (Some(path), _) => Some(TlsVerify::Ca(path.clone())),
        (None, true) => Some(TlsVerify::Insecure),
        (None, false) => None,
    };
    match (endpoint, wanted) {
        (endpoint, None) => Ok(endpoint),
        (
            Endpoint::Tls {
                addr, server_name, ..
            },
            Some(verify),
        ) => Ok(Endpoint::Tls {
            addr,
            server_name,
            verify,
        }),
        (other, Some(_)) => Err(format!(
            "--ca and --insecure apply to tls:// addresses only, not {other}"
        )),
    }
}
