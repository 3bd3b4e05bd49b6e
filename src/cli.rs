//! The command line as clap sees it: every subcommand, flag, default and value name.
//!
//! Values are parsed by [`reverb::flags`] and [`reverb::addr`], and the rules between flags
//! live in [`reverb::flags::check_serve`], so the library's tests cover them; this file only
//! declares the flags and turns them into the library's types.

use clap::builder::{PossibleValue, TypedValueParser};
use clap::{Args, Parser, Subcommand, ValueEnum};
use reverb::addr::{Endpoint, ListenSpec, TlsVerify};
use reverb::flags::{
    PROTOCOLS, ServeFlags, model_help, parse_bytes, parse_count, parse_model, parse_positive_count,
    parse_positive_secs, parse_protocol, parse_secs, parse_tcp_listen, parse_threads,
    parse_udp_listen, protocol_help, protocol_name,
};
use reverb::layer::StreamLayers;
use reverb::layer::greeting::Greeting;
use reverb::layer::tls::{TlsConfig, TlsSetupError};
use reverb::models::Model;
use reverb::protocol::{Protocol, ProtocolKind};
use reverb::server::Limits;
use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

const SERVE_AFTER_HELP: &str = "\
With no listener flag, serves TCP and UDP on 127.0.0.1:7007. Once every listener is bound,
prints one 'listening ADDR' line per listener on stdout; logs go to stderr. SIGTERM or SIGINT
drains what is owed and exits 0. Exit 1: cannot run (address in use, ...); exit 2: usage.

Examples:
  reverb serve
  reverb serve --model uring --tcp 127.0.0.1:0
  reverb serve --protocol lines --prefix 'You Got ' --unix /tmp/reverb.sock";

#[derive(Parser)]
#[command(
    name = "reverb",
    version,
    about = "An echo-server toolkit: every I/O model, one protocol core",
    long_about = "An echo-server toolkit: one protocol core (echo, lines, until-quit) served by \
        11 I/O models, from a blocking loop to io_uring, over TCP, UDP and Unix sockets; a \
        client, a verifying load generator and a side-by-side comparison.",
    after_help = "Start with 'reverb serve', then 'reverb client 127.0.0.1:7007' in another \
        terminal.\nThe full reference is docs/cli.md in the source tree, or 'reverb generate man'."
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
    Bench(Box<BenchArgs>),
    /// Run every model side by side and compare them.
    Compare(CompareArgs),
    /// Print the man page or a shell completion script.
    Generate(GenerateArgs),
}

#[derive(Args)]
#[command(after_help = SERVE_AFTER_HELP)]
pub struct ServeArgs {
    /// Listen on TCP at ADDR: HOST:PORT, [V6]:PORT or tcp://HOST:PORT; port 0 picks a free one
    /// [default with no listener flag: 127.0.0.1:7007]
    #[arg(long, value_name = "ADDR", value_parser = parse_tcp_listen, help_heading = "Listeners")]
    pub tcp: Vec<SocketAddr>,
    /// Answer datagrams on UDP at ADDR: HOST:PORT, [V6]:PORT or udp://HOST:PORT
    /// [default with no listener flag: 127.0.0.1:7007]
    #[arg(long, value_name = "ADDR", value_parser = parse_udp_listen, help_heading = "Listeners")]
    pub udp: Vec<SocketAddr>,
    /// Listen on a Unix stream socket at PATH (a stale socket file is replaced)
    #[arg(long, value_name = "PATH", help_heading = "Listeners")]
    pub unix: Vec<PathBuf>,
    /// Answer datagrams on a Unix datagram socket at PATH
    #[arg(long, value_name = "PATH", help_heading = "Listeners")]
    pub unix_dgram: Vec<PathBuf>,
    /// The I/O model: how the server waits for its sockets
    #[arg(long, value_name = "MODEL", default_value = "epoll", value_parser = ModelParser)]
    pub model: Model,
    /// Threads: the pool's size (pool, default 16) or the event loops (epoll, async, tokio,
    /// uring; default one per core); other models ignore it
    #[arg(long, value_name = "N", value_parser = parse_threads)]
    pub threads: Option<u32>,
    /// What to answer
    #[arg(long, value_name = "PROTOCOL", default_value = "echo", value_parser = ProtocolParser)]
    pub protocol: ProtocolKind,
    /// Put TEXT in front of every reply: each line (lines), the whole answer (until-quit),
    /// each datagram; not with echo on a stream listener
    #[arg(long, value_name = "TEXT")]
    pub prefix: Option<String>,
    /// Send TEXT first on every new stream connection; {peer} and {local} become the
    /// client's address and the address it reached, {{ and }} are literal braces
    #[arg(long, value_name = "TEXT", value_parser = parse_greeting)]
    pub greeting: Option<Greeting>,
    /// With --protocol lines: a line equal to WORD makes its connection's handler panic, to
    /// show that the others carry on
    #[arg(long, value_name = "WORD")]
    pub panic_on: Option<String>,
    /// At most N stream connections at once; the next is accepted and closed [default: no limit]
    #[arg(long, value_name = "N", value_parser = parse_positive_count, help_heading = "Limits")]
    pub max_conns: Option<u64>,
    /// Close a stream connection that sent nothing for SECS seconds (fractions allowed)
    /// [default: off]
    #[arg(long, value_name = "SECS", value_parser = parse_positive_secs, help_heading = "Limits")]
    pub idle_timeout: Option<Duration>,
    /// Bytes held for one connection before it stops being read: a count, or K, M, G (KiB)
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes, default_value = "256K", help_heading = "Limits")]
    pub max_buffer: usize,
    /// After SIGTERM or SIGINT, seconds the replies still owed may take
    #[arg(long, value_name = "SECS", value_parser = parse_secs, default_value = "5", help_heading = "Limits")]
    pub drain_timeout: Duration,
    /// Every stream connection must start with a PROXY protocol v1 or v2 header; the
    /// client address it carries is the peer from then on
    #[arg(long, help_heading = "Load balancers and TLS")]
    pub proxy_protocol: bool,
    /// Seconds from accept to a complete PROXY header before the connection is closed
    #[arg(long, value_name = "SECS", value_parser = parse_positive_secs, default_value = "5", help_heading = "Load balancers and TLS")]
    pub proxy_timeout: Duration,
    /// Speak TLS 1.2/1.3 on every stream listener with this PEM certificate chain (needs
    /// --tls-key)
    #[arg(
        long,
        value_name = "PEM",
        requires = "tls_key",
        conflicts_with = "tls_self_signed",
        help_heading = "Load balancers and TLS"
    )]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1)
    #[arg(
        long,
        value_name = "PEM",
        requires = "tls_cert",
        help_heading = "Load balancers and TLS"
    )]
    pub tls_key: Option<PathBuf>,
    /// Speak TLS with a throwaway certificate made at start; its SHA-256 fingerprint is logged
    #[arg(long, help_heading = "Load balancers and TLS")]
    pub tls_self_signed: bool,
    /// Seconds from accept to a finished TLS handshake before the connection is closed
    #[arg(long, value_name = "SECS", value_parser = parse_positive_secs, default_value = "10", help_heading = "Load balancers and TLS")]
    pub tls_handshake_timeout: Duration,
    /// Log each connection (debug level) on stderr
    #[arg(short, long)]
    pub verbose: bool,
    /// Serve /metrics, /healthz and /readyz over HTTP on ADDR (e.g. 127.0.0.1:9100)
    #[arg(long, value_name = "ADDR", value_parser = parse_metrics_addr, help_heading = "Operations")]
    pub metrics: Option<SocketAddr>,
    /// Log lines as text, or as one JSON object per line (both on stderr)
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t = LogFormat::Text, help_heading = "Operations")]
    pub log_format: LogFormat,
}

/// `--metrics ADDR`: `HOST:PORT` as for `--tcp`, or the `http://HOST:PORT` its readiness
/// line prints.
fn parse_metrics_addr(text: &str) -> Result<SocketAddr, String> {
    reverb::addr::parse_ip_port(text.strip_prefix("http://").unwrap_or(text))
        .map_err(|e| e.to_string())
}

/// `--log-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line: timestamp, level, message and the event's fields.
    Json,
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
            ..Limits::default()
        }
    }
}

#[derive(Args)]
#[command(after_help = concat!(
    "On a terminal: a '> ' prompt, one line sent at a time, its reply printed; 'exit' quits.\n",
    "With a pipe: stdin is sent, replies go to stdout, and at stdin's end the client\n",
    "half-closes and prints until the server closes (like nc). Exit 1: cannot connect.\n\n",
    "Examples:\n",
    "  reverb client 127.0.0.1:7007\n",
    "  printf 'hello\\n' | reverb client udp://127.0.0.1:7007",
))]
pub struct ClientArgs {
    /// The server: HOST:PORT, tcp://HOST:PORT, udp://HOST:PORT, unix:///path or
    /// unix-dgram:///path
    // Parsed in `client`: a name that does not resolve is "cannot connect" (exit 1).
    #[arg(value_name = "ADDR")]
    pub addr: String,
    /// With tls://: trust the server certificates in this PEM file instead of the system's.
    #[arg(long, value_name = "FILE", conflicts_with = "insecure")]
    pub ca: Option<PathBuf>,
    /// With tls://: accept any server certificate (a self-signed test server).
    #[arg(long)]
    pub insecure: bool,
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
#[command(after_help = concat!(
    "Addresses:\n",
    "  HOST:PORT, tcp://HOST:PORT    TCP (HOST: an IP, localhost, or a name; IPv6 as [::1]:7007)\n",
    "  udp://HOST:PORT               UDP: each message is one datagram\n",
    "  unix:///abs/path              a Unix stream socket\n",
    "  unix-dgram:///abs/path        a Unix datagram socket\n\n",
    "Every byte that comes back is checked. Exit 0: all correct; 3: a wrong byte or a failed\n",
    "connection (after the results); 2: usage.\n\n",
    "Examples:\n",
    "  reverb bench 127.0.0.1:7007 --conns 50 --size 1K --depth 8 --duration 5\n",
    "  reverb bench 127.0.0.1:7007 --conns 100 --conn-lifetime 1     (connection churn)\n",
    "  reverb bench 127.0.0.1:7007 --slo p99=1ms --duration 2        (rate search)\n",
    "  reverb bench merge agent-0.json agent-1.json agent-2.json",
))]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: Option<BenchCommand>,
    /// The server to load (see Addresses below)
    #[arg(value_name = "ADDR", value_parser = parse_endpoint, required = true)]
    pub addr: Option<Endpoint>,
    /// Connections (for datagrams: sockets)
    #[arg(long, value_name = "N", default_value = "10", value_parser = parse_count)]
    pub conns: u32,
    /// Bytes per message: a count, or K, M (KiB)
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes, default_value = "64")]
    pub size: usize,
    /// Messages in flight per connection (closed loop)
    #[arg(long, value_name = "D", default_value = "1", value_parser = parse_count)]
    pub depth: u32,
    /// Seconds measured (fractions allowed; with --slo: of each step)
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_positive_secs)]
    pub duration: Duration,
    /// Seconds of load before measuring: verified, not counted
    #[arg(long, value_name = "SECS", default_value = "1", value_parser = parse_secs)]
    pub warmup: Duration,
    /// Open loop: total messages per second, latency counted from each scheduled send
    /// (with --slo: the first step's rate, default 1000) [default: closed loop]
    #[arg(long, value_name = "MSGS_PER_S")]
    pub rate: Option<f64>,
    /// Client threads, each its own event loop
    #[arg(long, value_name = "N", default_value = "1", value_parser = parse_count)]
    pub threads: u32,
    /// Print one JSON object on stdout instead of the table
    #[arg(long)]
    pub json: bool,
    /// With tls://: trust the server certificates in this PEM file instead of the system's.
    #[arg(long, value_name = "FILE", conflicts_with = "insecure")]
    pub ca: Option<PathBuf>,
    /// With tls://: accept any server certificate (a self-signed test server).
    #[arg(long)]
    pub insecure: bool,
    /// Seconds one connection may take to be established, from its own connect
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_positive_secs)]
    pub connect_timeout: Duration,
    /// Open connections at N per second (a ramp) [default: all at once]
    #[arg(long, value_name = "N")]
    pub connect_rate: Option<f64>,
    /// Close a connection after MSGS messages and open a new one in its place
    /// [default: never]
    #[arg(long, value_name = "MSGS", value_parser = clap::value_parser!(u64).range(1..))]
    pub conn_lifetime: Option<u64>,
    /// Spread connections over these local addresses: ADDR[,ADDR...] or a range
    /// such as 127.0.0.2-127.0.0.9 [default: the OS chooses]
    #[arg(long, value_name = "ADDRS", value_parser = parse_sources)]
    pub source: Option<Sources>,
    /// Search for the highest open-loop rate whose latency percentile stays within a
    /// bound, e.g. p99=1ms or p99.9=500us [default: off]
    #[arg(long, value_name = "pNN=TIME")]
    pub slo: Option<reverb::bench::Slo>,
    /// Record msgs/s and latency for each interval of SECS (a time series) [default: off]
    #[arg(long, value_name = "SECS", value_parser = parse_positive_secs)]
    pub interval: Option<Duration>,
    /// Start the load at TIME (after connecting): Unix seconds, +SECS, or RFC 3339
    /// (2026-11-29T16:30:00Z); lets several agents start together [default: once
    /// connected]
    #[arg(long, value_name = "TIME", value_parser = reverb::bench::parse_start_at)]
    pub start_at: Option<std::time::SystemTime>,
}

/// `--source`'s addresses (a type of its own, so clap takes the list as one value).
#[derive(Clone, Debug)]
pub struct Sources(pub Vec<std::net::IpAddr>);

fn parse_sources(text: &str) -> Result<Sources, String> {
    reverb::bench::parse_sources(text).map(Sources)
}

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Merge the --json reports of several agents into one report.
    Merge(MergeArgs),
}

#[derive(Args)]
pub struct MergeArgs {
    /// The agents' --json reports
    #[arg(value_name = "FILE", required = true)]
    pub files: Vec<PathBuf>,
    /// One JSON object on stdout
    #[arg(long)]
    pub json: bool,
}

impl BenchArgs {
    /// The bench engine's configuration; `agent` comes from the environment.
    pub fn config(&self, agent: Option<u32>) -> reverb::bench::BenchConfig {
        reverb::bench::BenchConfig {
            conns: self.conns,
            size: self.size,
            depth: self.depth,
            duration: self.duration,
            warmup: self.warmup,
            rate: self.rate,
            threads: self.threads,
            connect_timeout: self.connect_timeout,
            connect_rate: self.connect_rate,
            conn_lifetime: self.conn_lifetime,
            sources: self.source.clone().map(|s| s.0).unwrap_or_default(),
            interval: self.interval,
            start_at: self.start_at,
            agent,
            ..reverb::bench::BenchConfig::default()
        }
    }
}

#[derive(Args)]
#[command(after_help = concat!(
    "Each model runs as its own 'reverb serve' on a free loopback port, pinned to CPU 0 while\n",
    "the load runs on CPU 1. Exit 0: measured; 1: no model could be measured; 2: usage;\n",
    "3: a server sent wrong bytes.\n\n",
    "Example:\n",
    "  reverb compare --models epoll,uring --conns 1,10,100 --duration 2",
))]
pub struct CompareArgs {
    /// Models to run, comma-separated [default: every model available here]
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = ModelParser)]
    pub models: Vec<Model>,
    /// Connection counts to measure each model at, comma-separated
    #[arg(long, value_name = "LIST", value_delimiter = ',', default_value = "1,10,100", value_parser = parse_count)]
    pub conns: Vec<u32>,
    /// Bytes per message: a count, or K, M (KiB)
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes, default_value = "64")]
    pub size: usize,
    /// Messages in flight per connection
    #[arg(long, value_name = "D", default_value = "1", value_parser = parse_count)]
    pub depth: u32,
    /// Seconds measured per point (fractions allowed)
    #[arg(long, value_name = "SECS", value_parser = parse_positive_secs, default_value = "1")]
    pub duration: Duration,
    /// Directory for compare.json, compare.md and compare.svg
    #[arg(long, value_name = "DIR", default_value = "compare-out")]
    pub out: PathBuf,
}

impl CompareArgs {
    /// The comparison's configuration; `server_exe` is the binary each model runs as.
    pub fn config(&self, server_exe: PathBuf) -> reverb::compare::CompareConfig {
        let mut config = reverb::compare::CompareConfig::new(server_exe);
        config.models = self.models.clone();
        config.conns = self.conns.clone();
        config.size = self.size;
        config.depth = self.depth;
        config.duration = self.duration;
        config
    }
}

#[derive(Args)]
#[command(after_help = concat!(
    "Examples:\n",
    "  reverb generate man > reverb.1 && man ./reverb.1\n",
    "  reverb generate complete-bash > /etc/bash_completion.d/reverb\n",
    "  reverb generate complete-zsh > ~/.zfunc/_reverb\n",
    "  reverb generate complete-fish > ~/.config/fish/completions/reverb.fish",
))]
pub struct GenerateArgs {
    /// What to print on stdout
    #[arg(value_name = "WHAT")]
    pub what: Generated,
}

/// What `reverb generate` prints.
#[derive(Clone, Copy, ValueEnum)]
pub enum Generated {
    /// The man page (roff), every subcommand in one page
    Man,
    /// A bash completion script
    CompleteBash,
    /// A zsh completion script
    CompleteZsh,
    /// A fish completion script
    CompleteFish,
}

fn parse_endpoint(text: &str) -> Result<Endpoint, String> {
    Endpoint::parse(text).map_err(|e| e.reason().to_string())
}

/// A value error laid out as clap's own: `invalid value 'V' for '--flag <NAME>': why`.
fn value_error(
    command: &clap::Command,
    arg: Option<&clap::Arg>,
    value: &OsStr,
    why: &str,
) -> clap::Error {
    let flag = arg.map_or_else(|| "...".to_string(), ToString::to_string);
    let message = format!(
        "invalid value '{}' for '{flag}': {why}",
        value.to_string_lossy()
    );
    clap::Error::raw(clap::error::ErrorKind::InvalidValue, message).with_cmd(command)
}

/// `--model`: the names, each with its technique in `--help` and in completions.
#[derive(Clone)]
struct ModelParser;

impl TypedValueParser for ModelParser {
    type Value = Model;

    fn parse_ref(
        &self,
        command: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<Model, clap::Error> {
        parse_model(&value.to_string_lossy()).map_err(|why| value_error(command, arg, value, &why))
    }

    fn possible_values(&self) -> Option<Box<dyn Iterator<Item = PossibleValue> + '_>> {
        Some(Box::new(Model::ALL.into_iter().map(|model| {
            PossibleValue::new(model.name()).help(model_help(model))
        })))
    }
}

/// `--protocol`: the names, each with what it answers.
#[derive(Clone)]
struct ProtocolParser;

impl TypedValueParser for ProtocolParser {
    type Value = ProtocolKind;

    fn parse_ref(
        &self,
        command: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<ProtocolKind, clap::Error> {
        parse_protocol(&value.to_string_lossy())
            .map_err(|why| value_error(command, arg, value, &why))
    }

    fn possible_values(&self) -> Option<Box<dyn Iterator<Item = PossibleValue> + '_>> {
        Some(Box::new(PROTOCOLS.into_iter().map(|kind| {
            PossibleValue::new(protocol_name(kind)).help(protocol_help(kind))
        })))
    }
}

/// Writes what `reverb generate` was asked for, built from the same definitions as `--help`.
///
/// The man page holds every subcommand: the top page, then one section per subcommand with
/// its synopsis, description and options, so `man reverb` is the whole reference.
pub fn generate(what: Generated, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    use clap::CommandFactory;
    let mut command = Cli::command();
    let shell = match what {
        Generated::Man => {
            // `reverb help` is clap's own; the page documents it in its synopsis instead.
            let mut command = command.disable_help_subcommand(true);
            command.build();
            return man_page(&command, out);
        }
        Generated::CompleteBash => clap_complete::Shell::Bash,
        Generated::CompleteZsh => clap_complete::Shell::Zsh,
        Generated::CompleteFish => clap_complete::Shell::Fish,
    };
    clap_complete::generate(shell, &mut command, "reverb", out);
    Ok(())
}

fn man_page(command: &clap::Command, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    let mut top = Vec::new();
    clap_mangen::Man::new(command.clone()).render(&mut top)?;
    let mut top = String::from_utf8_lossy(&top).replace(".SH EXTRA", ".SH NOTES");
    // The subcommands are sections of this page, not pages of their own.
    for sub in command.get_subcommands() {
        top = top.replace(
            &format!("reverb\\-{}(1)", sub.get_name()),
            &format!("\\fBreverb {}\\fR (below)", sub.get_name()),
        );
    }
    out.write_all(top.as_bytes())?;
    for sub in command.get_subcommands() {
        let name = format!("reverb {}", sub.get_name());
        let page = clap_mangen::Man::new(
            sub.clone()
                .bin_name(name.clone())
                .display_name(name.clone()),
        );
        let mut section = Vec::new();
        page.render_synopsis_section(&mut section)?;
        page.render_description_section(&mut section)?;
        page.render_options_section(&mut section)?;
        page.render_extra_section(&mut section)?;
        // Each subcommand is one section of the page; its own headings become subsections.
        let section = String::from_utf8_lossy(&section)
            .replace("\n.SH ", "\n.SS ")
            .replace(".SH EXTRA", ".SH NOTES")
            .replace(".SS EXTRA", ".SS NOTES");
        let section = section
            .strip_prefix(".SH ")
            .map_or(section.clone(), |rest| format!(".SS {rest}"));
        writeln!(out, ".SH \"{}\"", name.to_uppercase())?;
        out.write_all(section.as_bytes())?;
    }
    Ok(())
}

/// Names the bad flag once more where clap's own suggestion would mislead.
fn misleading_suggestion(flag: &str, subcommand: &str) -> Option<&'static str> {
    match (subcommand, flag) {
        ("serve", "--port" | "-p" | "--host" | "--bind" | "--listen" | "--address") => Some(
            "the address and port go together: --tcp 127.0.0.1:PORT (and --udp 127.0.0.1:PORT)",
        ),
        ("client" | "bench", "--port" | "-p" | "--host") => {
            Some("the address and port go together: 127.0.0.1:PORT")
        }
        _ => None,
    }
}

/// Renders a parse error as docs/cli.md says: one `error:` line naming the flag, the value
/// and what is accepted; at most one `tip:` line; then the usage of the subcommand that was
/// run and where to read more.
pub fn render_error(error: &clap::Error, subcommand: &str) -> String {
    use clap::CommandFactory;
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let rendered = error.render().to_string();
    let mut lines: Vec<String> = Vec::new();
    for line in rendered.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with("Usage:") || trimmed.starts_with("For more information") {
            break;
        }
        if trimmed.is_empty() {
            continue;
        }
        // clap puts the accepted values on a line of their own; they belong to the error.
        if let Some(values) = trimmed
            .strip_prefix("[possible values: ")
            .and_then(|rest| rest.strip_suffix(']'))
        {
            if let Some(first) = lines.first_mut() {
                first.push_str(&format!("; expected one of {values}"));
                continue;
            }
        }
        if trimmed.starts_with("tip:") {
            lines.push(format!("  {trimmed}"));
        } else if let (true, Some(last)) = (line.starts_with(' '), lines.last_mut()) {
            // clap lists missing arguments on lines of their own; one line says it.
            last.push(' ');
            last.push_str(trimmed);
        } else {
            lines.push(line.to_string());
        }
    }
    if error.kind() == ErrorKind::UnknownArgument {
        if let Some(ContextValue::String(flag)) = error.get(ContextKind::InvalidArg) {
            let flag = flag.split('=').next().unwrap_or(flag);
            if let Some(tip) = misleading_suggestion(flag, subcommand) {
                lines.retain(|line| !line.trim_start().starts_with("tip:"));
                lines.push(format!("  tip: {tip}"));
            }
        }
    }
    // One hint is enough: keep the first.
    let mut seen_tip = false;
    lines.retain(|line| {
        let is_tip = line.trim_start().starts_with("tip:");
        let keep = !(is_tip && seen_tip);
        seen_tip |= is_tip;
        keep
    });
    let mut command = Cli::command();
    command.build();
    let (usage, help) = match command.find_subcommand_mut(subcommand) {
        Some(sub) => (sub.render_usage(), format!("reverb {subcommand} --help")),
        None => (command.render_usage(), "reverb --help".to_string()),
    };
    format!(
        "{}\n\n{usage}\n\nFor more information, try '{help}'.\n",
        lines.join("\n")
    )
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
