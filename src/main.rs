//! The `reverb` binary: parses the command line, maps errors to the contract's exit codes
//! (1: could not run, 2: usage, 3: bench found wrong bytes), and calls the library.

use anyhow::Result;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, error::ErrorKind};
use reverb::addr::{Endpoint, ListenSpec, parse_ip_port};
use reverb::models::{self, Model};
use reverb::protocol::{Protocol, ProtocolKind};
use reverb::server::{Limits, Listeners, Shutdown};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "reverb",
    version,
    about = "An echo-server toolkit: every I/O model, one protocol core"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve echo (or lines, or until-quit) on TCP, UDP and Unix sockets.
    Serve(ServeArgs),
    /// Talk to a server: interactive on a terminal, nc-style with a pipe.
    Client(ClientArgs),
    /// Load a server with verified echoes and report throughput and latency.
    Bench(BenchArgs),
    /// Run every model side by side and compare them.
    Compare(CompareArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// Listen on TCP (HOST:PORT or [V6]:PORT; port 0 picks a free one).
    #[arg(long, value_name = "ADDR", value_parser = parse_ip_port)]
    tcp: Vec<std::net::SocketAddr>,
    /// Answer datagrams on UDP.
    #[arg(long, value_name = "ADDR", value_parser = parse_ip_port)]
    udp: Vec<std::net::SocketAddr>,
    /// Listen on a Unix stream socket at PATH.
    #[arg(long, value_name = "PATH")]
    unix: Vec<PathBuf>,
    /// Answer datagrams on a Unix datagram socket at PATH.
    #[arg(long, value_name = "PATH")]
    unix_dgram: Vec<PathBuf>,
    /// The I/O model.
    #[arg(long, default_value = "epoll", value_parser = parse_model)]
    model: Model,
    /// Worker threads (pool) or event loops (epoll, async, tokio, uring).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=4096))]
    threads: Option<u32>,
    /// What to answer.
    #[arg(long, default_value = "echo", value_parser = parse_protocol)]
    protocol: ProtocolKind,
    /// Put TEXT in front of every reply unit (not with stream echo).
    #[arg(long, value_name = "TEXT")]
    prefix: Option<String>,
    /// Send TEXT first on every new stream connection.
    #[arg(long, value_name = "TEXT")]
    greeting: Option<String>,
    /// With lines: a line equal to WORD makes its handler panic (tests isolation).
    #[arg(long, value_name = "WORD")]
    panic_on: Option<String>,
    /// At most N stream connections at once.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    max_conns: Option<u64>,
    /// Close a stream connection that sent nothing for SECS.
    #[arg(long, value_name = "SECS", value_parser = parse_positive_secs)]
    idle_timeout: Option<Duration>,
    /// Bytes held for one connection before it stops being read (e.g. 262144, 256K, 1M).
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes, default_value = "256K")]
    max_buffer: usize,
    /// After SIGTERM/SIGINT, how long owed replies may take.
    #[arg(long, value_name = "SECS", value_parser = parse_secs, default_value = "5")]
    drain_timeout: Duration,
    /// Log each connection (debug level).
    #[arg(short, long)]
    verbose: bool,
    /// Serve /metrics, /healthz and /readyz over HTTP on ADDR (e.g. 127.0.0.1:9100).
    #[arg(long, value_name = "ADDR", value_parser = parse_ip_port)]
    metrics: Option<std::net::SocketAddr>,
    /// Log lines as text, or as one JSON object per line (both on stderr).
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line: timestamp, level, message and the event's fields.
    Json,
}

#[derive(Args)]
struct ClientArgs {
    /// tcp://HOST:PORT, udp://HOST:PORT, unix:///path, unix-dgram:///path, or HOST:PORT.
    // Parsed in `client`: a name that does not resolve is "cannot connect" (exit 1).
    addr: String,
}

#[derive(Args)]
struct BenchArgs {
    /// The server to load.
    #[arg(value_parser = parse_endpoint)]
    addr: Endpoint,
    /// Connections (for datagrams: sockets).
    #[arg(long, value_name = "N", default_value_t = 10)]
    conns: u32,
    /// Bytes per message (e.g. 64, 1K, 1M).
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes, default_value = "64")]
    size: usize,
    /// Messages in flight per connection (closed loop).
    #[arg(long, value_name = "D", default_value_t = 1)]
    depth: u32,
    /// Measured seconds.
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_positive_secs)]
    duration: Duration,
    /// Seconds of load before measuring (verified, not counted).
    #[arg(long, value_name = "SECS", default_value = "1", value_parser = parse_secs)]
    warmup: Duration,
    /// Open loop: total messages per second, latency counted from each scheduled send.
    #[arg(long, value_name = "MSGS_PER_S")]
    rate: Option<f64>,
    /// Client threads, each its own event loop.
    #[arg(long, value_name = "T", default_value_t = 1)]
    threads: u32,
    /// One JSON object on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct CompareArgs {
    /// Comma-separated models (default: all available).
    #[arg(long, value_delimiter = ',', value_parser = parse_model)]
    models: Vec<Model>,
    /// Comma-separated connection counts.
    #[arg(long, value_delimiter = ',')]
    conns: Vec<u32>,
    /// Bytes per message.
    #[arg(long)]
    size: Option<u32>,
    /// Messages in flight per connection.
    #[arg(long)]
    depth: Option<u32>,
    /// Measured seconds per point.
    #[arg(long, value_parser = parse_positive_secs)]
    duration: Option<Duration>,
    /// Where compare.json, compare.md and compare.svg go.
    #[arg(long, default_value = "compare-out")]
    out: PathBuf,
}

fn parse_model(text: &str) -> Result<Model, String> {
    Model::from_name(text).ok_or_else(|| {
        let names: Vec<_> = Model::ALL.iter().map(|m| m.name()).collect();
        format!(
            "unknown model {text:?}; expected one of {}",
            names.join(", ")
        )
    })
}

fn parse_protocol(text: &str) -> Result<ProtocolKind, String> {
    match text {
        "echo" => Ok(ProtocolKind::Echo),
        "lines" => Ok(ProtocolKind::Lines),
        "until-quit" => Ok(ProtocolKind::UntilQuit),
        _ => Err(format!(
            "unknown protocol {text:?}; expected echo, lines or until-quit"
        )),
    }
}

fn parse_endpoint(text: &str) -> Result<Endpoint, String> {
    Endpoint::parse(text).map_err(|e| e.to_string())
}

fn parse_secs(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(secs).map_err(|_| format!("{text:?} is not a valid duration"))
}

fn parse_positive_secs(text: &str) -> Result<Duration, String> {
    let duration = parse_secs(text)?;
    if duration.is_zero() {
        return Err("must be more than 0 seconds".to_string());
    }
    Ok(duration)
}

fn parse_bytes(text: &str) -> Result<usize, String> {
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, ""),
    };
    let multiplier: usize = match unit {
        "" | "B" => 1,
        "K" | "k" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (use K, M or G)")),
    };
    let count: usize = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a byte count"))?;
    let bytes = count
        .checked_mul(multiplier)
        .ok_or_else(|| format!("{text:?} is too large"))?;
    if bytes == 0 {
        return Err("must be at least 1 byte".to_string());
    }
    Ok(bytes)
}

/// A usage error after parsing: the contract's exit 2, with usage.
fn usage_error(message: impl std::fmt::Display) -> ! {
    let mut command = Cli::command();
    command.build();
    let error = match command.find_subcommand_mut("serve") {
        Some(serve) => serve.error(ErrorKind::ArgumentConflict, message),
        None => command.error(ErrorKind::ArgumentConflict, message),
    };
    exit_with_usage(error)
}

/// A bad client address: the contract's exit 2, with the client's usage.
fn client_usage_error(message: impl std::fmt::Display) -> ! {
    let mut command = Cli::command();
    command.build();
    let error = match command.find_subcommand_mut("client") {
        Some(client) => client.error(ErrorKind::ValueValidation, message),
        None => command.error(ErrorKind::ValueValidation, message),
    };
    exit_with_usage(error)
}

/// Prints a parse error followed by the usage of the subcommand at fault, and exits 2
/// (help and version requests print and exit 0 as usual).
fn exit_with_usage(error: clap::Error) -> ! {
    if !error.use_stderr() {
        error.exit();
    }
    let _ = error.print();
    let rendered = error.render().to_string();
    if !rendered.contains("Usage:") {
        let mut command = Cli::command();
        command.build();
        let name = std::env::args().nth(1).unwrap_or_default();
        let usage = match command.find_subcommand_mut(&name) {
            Some(sub) => sub.render_usage(),
            None => command.render_usage(),
        };
        eprintln!("\n{usage}");
    }
    std::process::exit(2)
}

fn main() -> ExitCode {
    let matches = Cli::command()
        .try_get_matches()
        .unwrap_or_else(|e| exit_with_usage(e));
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| exit_with_usage(e));
    match cli.command {
        Command::Serve(args) => {
            let specs = match matches.subcommand_matches("serve") {
                Some(serve_matches) => listen_specs(&args, serve_matches),
                None => Vec::new(),
            };
            serve(args, specs)
        }
        Command::Client(args) => client(args),
        Command::Bench(args) => bench(args),
        Command::Compare(args) => compare(args),
    }
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("reverb: {message}");
    ExitCode::from(1)
}

fn init_logging(verbose: bool, format: LogFormat) {
    let level = if verbose {
        tracing::Level::DEBUG
    } else {
        tracing::Level::INFO
    };
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level)
        .with_target(false);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        // Flattened, so a line reads {"timestamp":..,"level":..,"message":..,"peer":..}.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
    // One line per panic. A protocol handler's panic is reported again, with the peer's
    // address, by the connection that caught it, so its location goes to debug; any other
    // panic is a bug in reverb and is logged as an error.
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("(no message)");
        let at = info
            .location()
            .map_or_else(String::new, |at| format!(" at {}:{}", at.file(), at.line()));
        if reverb::server::is_in_handler() {
            tracing::debug!("handler panic{at}: {message}");
        } else {
            tracing::error!("panic{at}: {message}");
        }
    }));
}

/// The listeners in the order their flags were given, which the readiness lines follow;
/// clap keeps each flag's values in order, and their indices give the order across flags.
fn listen_specs(args: &ServeArgs, serve: &clap::ArgMatches) -> Vec<ListenSpec> {
    let mut indexed = Vec::new();
    let mut push = |name: &str, make: &dyn Fn(usize) -> ListenSpec| {
        if let Some(indices) = serve.indices_of(name) {
            for (n, index) in indices.enumerate() {
                indexed.push((index, make(n)));
            }
        }
    };
    push("tcp", &|n| ListenSpec::Tcp(args.tcp[n]));
    push("udp", &|n| ListenSpec::Udp(args.udp[n]));
    push("unix", &|n| ListenSpec::Unix(args.unix[n].clone()));
    push("unix_dgram", &|n| {
        ListenSpec::UnixDatagram(args.unix_dgram[n].clone())
    });
    indexed.sort_by_key(|(index, _)| *index);
    let mut specs: Vec<ListenSpec> = indexed.into_iter().map(|(_, spec)| spec).collect();
    if specs.is_empty() {
        let default = std::net::SocketAddr::from(([127, 0, 0, 1], 7007));
        specs = vec![ListenSpec::Tcp(default), ListenSpec::Udp(default)];
    }
    specs
}

fn serve(args: ServeArgs, specs: Vec<ListenSpec>) -> ExitCode {
    let has_stream = specs
        .iter()
        .any(|s| matches!(s, ListenSpec::Tcp(_) | ListenSpec::Unix(_)));
    if args.prefix.is_some() && args.protocol == ProtocolKind::Echo && has_stream {
        usage_error(
            "--prefix cannot be used with --protocol echo on a stream listener \
             (the kernel's segmentation would decide where prefixes go); use --protocol lines",
        );
    }
    if args.panic_on.is_some() && args.protocol != ProtocolKind::Lines {
        usage_error("--panic-on works only with --protocol lines");
    }
    if args
        .panic_on
        .as_deref()
        .is_some_and(|w| w.is_empty() || w.contains('\n'))
    {
        usage_error("--panic-on WORD must be non-empty and contain no newline");
    }
    init_logging(args.verbose, args.log_format);
    if let Err(e) = args.model.check_available() {
        return fail(e);
    }
    if let Err(e) = reverb::sys::raise_open_file_limit() {
        tracing::warn!("cannot raise the open-file limit: {e}");
    }
    let mut protocol = Protocol::new(args.protocol, args.max_buffer);
    if let Some(prefix) = &args.prefix {
        protocol = protocol.with_prefix(prefix.as_bytes());
    }
    if let Some(greeting) = &args.greeting {
        protocol = protocol.with_greeting(greeting.as_bytes());
    }
    if let Some(word) = &args.panic_on {
        protocol = protocol.with_panic_on(word.as_bytes());
    }
    let limits = Limits {
        max_conns: args.max_conns.map(|n| n as usize),
        idle_timeout: args.idle_timeout,
        max_buffer_bytes: args.max_buffer,
        drain_timeout: args.drain_timeout,
    };
    // Signals first: a SIGTERM that arrives while binding still means "stop cleanly".
    let shutdown = match Shutdown::new().and_then(|s| s.fire_on_signals().map(|()| s)) {
        Ok(shutdown) => shutdown,
        Err(e) => return fail(format!("cannot set up signal handling: {e}")),
    };
    let listeners = match Listeners::bind(&specs, limits, args.model.wants_reuseport()) {
        Ok(listeners) => listeners,
        Err(e) => return fail(e),
    };
    let metrics = match args.metrics {
        Some(addr) => match start_metrics(addr, args.model, &shutdown) {
            Ok(started) => Some(started),
            Err(e) => return fail(e),
        },
        None => None,
    };
    // Ready before the readiness lines, so whoever reads them finds /readyz agreeing.
    if let Some((metrics, _)) = &metrics {
        metrics.set_ready(true);
    }
    {
        let mut stdout = std::io::stdout().lock();
        let metrics_name = metrics.as_ref().map(|(_, addr)| format!("http://{addr}"));
        for name in listeners.names().iter().chain(&metrics_name) {
            if writeln!(stdout, "listening {name}").is_err() {
                break;
            }
        }
        let _ = stdout.flush();
    }
    tracing::info!("serving with model {}", args.model);
    let threads = args.threads.map(|n| n as usize);
    match models::run(args.model, listeners, protocol, shutdown, threads) {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

/// Binds the metrics endpoint and starts answering it: on a thread, or from a helper
/// process for `forking`, whose parent must stay single-threaded.
fn start_metrics(
    addr: std::net::SocketAddr,
    model: Model,
    shutdown: &Shutdown,
) -> Result<(reverb::metrics::Metrics, std::net::SocketAddr), String> {
    let cannot = |e: std::io::Error| format!("cannot serve metrics on http://{addr}: {e}");
    let metrics = reverb::metrics::Metrics::new().map_err(cannot)?;
    let server = reverb::metrics::MetricsServer::bind(addr).map_err(cannot)?;
    let bound = server.local_addr().map_err(cannot)?;
    let shutdown = shutdown.clone();
    let is_draining: reverb::metrics::Probe = Box::new(move || shutdown.is_fired());
    if model == Model::Forking {
        server.spawn_process(metrics, is_draining)
    } else {
        server.spawn(metrics, is_draining)
    }
    .map_err(cannot)?;
    Ok((metrics, bound))
}

fn client(args: ClientArgs) -> ExitCode {
    let endpoint = match Endpoint::parse(&args.addr) {
        Ok(endpoint) => endpoint,
        Err(e) if e.is_lookup_failure() => {
            return fail(format!("cannot connect to {}: {}", args.addr, e.reason()));
        }
        Err(e) => client_usage_error(e),
    };
    match reverb::client::run(&endpoint) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

fn bench(args: BenchArgs) -> ExitCode {
    let config = reverb::bench::BenchConfig {
        conns: args.conns,
        size: args.size,
        depth: args.depth,
        duration: args.duration,
        warmup: args.warmup,
        rate: args.rate,
        threads: args.threads,
        ..reverb::bench::BenchConfig::default()
    };
    if let Err(e) = config.validate(&args.addr) {
        usage_error(e);
    }
    if let Err(e) = reverb::sys::raise_open_file_limit() {
        eprintln!("reverb: cannot raise the open-file limit: {e}");
    }
    let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(progress_bar);
    let result = reverb::bench::run_with_progress(&args.addr, &config, |progress| {
        if let Some(bar) = &bar {
            let total = progress.total.as_millis().max(1) as u64;
            bar.set_position((progress.elapsed.as_millis() as u64).min(total));
            bar.set_length(total);
            let phase = match progress.phase {
                reverb::bench::Phase::Warmup => "warmup",
                reverb::bench::Phase::Measuring => "measuring",
                reverb::bench::Phase::Draining => "draining",
            };
            bar.set_message(format!("{phase}, {} verified", progress.verified));
        }
    });
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let report = match result {
        Ok(report) => report,
        Err(e) => return fail(format!("bench {}: {e}", args.addr)),
    };
    let text = if args.json {
        report.to_json() + "\n"
    } else {
        report.to_table()
    };
    let mut stdout = std::io::stdout().lock();
    if stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .is_err()
    {
        return ExitCode::from(1);
    }
    ExitCode::from(report.exit_code())
}

fn compare(args: CompareArgs) -> ExitCode {
    let server_exe = match std::env::current_exe() {
        Ok(path) => path,
        Err(e) => {
            return fail(format!(
                "cannot find the reverb binary for the servers: {e}"
            ));
        }
    };
    let mut config = reverb::compare::CompareConfig::new(server_exe);
    config.models = args.models;
    if !args.conns.is_empty() {
        config.conns = args.conns;
    }
    if let Some(size) = args.size {
        config.size = size as usize;
    }
    if let Some(depth) = args.depth {
        config.depth = depth;
    }
    if let Some(duration) = args.duration {
        config.duration = duration;
    }
    if let Err(e) = config.validate() {
        usage_error(e);
    }
    // Fail before a minute of measuring, not after it.
    if let Err(e) = std::fs::create_dir_all(&args.out) {
        return fail(format!("cannot create {}: {e}", args.out.display()));
    }
    let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(progress_bar);
    let result = reverb::compare::run_with_progress(&config, |progress| {
        if let Some(bar) = &bar {
            bar.set_length(progress.steps.max(1) as u64);
            bar.set_position(progress.step as u64);
            let phase = match progress.bench.map(|b| b.phase) {
                Some(reverb::bench::Phase::Warmup) => ", warmup",
                Some(reverb::bench::Phase::Measuring) => ", measuring",
                Some(reverb::bench::Phase::Draining) => ", draining",
                None => "",
            };
            bar.set_message(format!("{}: {}{phase}", progress.model, progress.activity));
        }
    });
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let mut report = match result {
        Ok(report) => report,
        Err(e) => return fail(format!("compare: {e}")),
    };
    report.command = Some(
        std::iter::once("reverb".to_string())
            .chain(std::env::args().skip(1))
            .collect::<Vec<_>>()
            .join(" "),
    );
    let mut stdout = std::io::stdout().lock();
    if stdout
        .write_all(report.to_table().as_bytes())
        .and_then(|()| stdout.flush())
        .is_err()
    {
        return ExitCode::from(1);
    }
    if let Err(e) = report.write_files(&args.out) {
        return fail(e);
    }
    if report.models.is_empty() {
        return fail("compare: no model could be measured");
    }
    ExitCode::from(report.exit_code())
}

fn progress_bar() -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(1);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{spinner} [{bar:40}] {elapsed_precise} {msg}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}
