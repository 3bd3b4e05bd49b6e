//! The `reverb` binary: dispatches each subcommand to the library and maps errors to the
//! exit codes of docs/cli.md (1: could not run, 2: usage, 3: bench found wrong bytes).
//! The flags themselves are declared in `cli.rs`.

mod bench_cli;
mod cli;

use clap::{CommandFactory, FromArgMatches, error::ErrorKind};
use cli::{Cli, ClientArgs, Command, CompareArgs, LogFormat, ServeArgs};
use reverb::addr::{Endpoint, ListenSpec};
use reverb::models::{self, Model};
use reverb::server::{Listeners, OnServing, RunOptions, Shutdown};
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

/// A usage error found after parsing: the contract's exit 2, with the usage of
/// `subcommand`, the one that was run.
pub(crate) fn usage_error(
    subcommand: &str,
    message: impl std::fmt::Display,
    hint: Option<&str>,
) -> ! {
    let message = match hint {
        Some(hint) => format!("{message}\n  tip: {hint}"),
        None => message.to_string(),
    };
    exit_with_usage(
        clap::Error::raw(ErrorKind::ValueValidation, message),
        subcommand,
    )
}

/// Prints a parse error with the usage of the subcommand at fault and exits 2 (help and
/// version requests print and exit 0 as usual).
fn exit_with_usage(error: clap::Error, subcommand: &str) -> ! {
    if !error.use_stderr() {
        error.exit();
    }
    eprint!("{}", cli::render_error(&error, subcommand));
    std::process::exit(2)
}

/// The subcommand the user ran, for the usage shown with an error.
fn subcommand_typed() -> String {
    let names: Vec<String> = Cli::command()
        .get_subcommands()
        .map(|sub| sub.get_name().to_string())
        .collect();
    std::env::args()
        .skip(1)
        .find(|arg| names.contains(arg))
        .unwrap_or_default()
}

fn main() -> ExitCode {
    let matches = Cli::command()
        .try_get_matches()
        .unwrap_or_else(|e| exit_with_usage(e, &subcommand_typed()));
    let cli =
        Cli::from_arg_matches(&matches).unwrap_or_else(|e| exit_with_usage(e, &subcommand_typed()));
    match cli.command {
        Command::Serve(args) => {
            let specs = match matches.subcommand_matches("serve") {
                Some(serve_matches) => args.listen_specs(serve_matches),
                None => Vec::new(),
            };
            serve(*args, specs)
        }
        Command::Client(args) => client(args),
        Command::Bench(args) => bench_cli::run(*args),
        Command::Compare(args) => compare(args),
        Command::Generate(args) => {
            let mut stdout = std::io::stdout().lock();
            match cli::generate(args.what, &mut stdout).and_then(|()| stdout.flush()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(format!("cannot write to stdout: {e}")),
            }
        }
    }
}

pub(crate) fn fail(message: impl std::fmt::Display) -> ExitCode {
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

fn serve(args: ServeArgs, specs: Vec<ListenSpec>) -> ExitCode {
    if let Err(e) = reverb::flags::check_serve(&args.flags(&specs)) {
        usage_error("serve", &e.message, Some(&e.hint));
    }
    init_logging(args.verbose, args.log_format);
    if let Err(e) = args.model.check_available() {
        return fail(e);
    }
    if let Err(e) = reverb::sys::raise_open_file_limit() {
        tracing::warn!("cannot raise the open-file limit: {e}");
    }
    let protocol = args.protocol();
    let tls = match args.tls() {
        Ok(tls) => tls,
        Err(e) => return fail(e),
    };
    if let Some(tls) = &tls
        && args.tls_self_signed
    {
        tracing::info!(
            "TLS with a self-signed certificate for localhost, 127.0.0.1 and ::1; SHA-256 fingerprint {}",
            tls.fingerprint()
        );
    }
    let limits = args.limits(tls);
    // Signals first: a SIGTERM that arrives while binding still means "stop cleanly".
    let shutdown = match Shutdown::new().and_then(|s| s.fire_on_signals().map(|()| s)) {
        Ok(shutdown) => shutdown,
        Err(e) => return fail(format!("cannot set up signal handling: {e}")),
    };
    // Socket activation: the service manager's sockets replace the listener flags.
    let mut listeners = match reverb::service::passed_listeners(limits.clone()) {
        Ok(Some(listeners)) => listeners,
        Ok(None) => match Listeners::bind(&specs, limits, args.model.accept_queues()) {
            Ok(listeners) => listeners,
            Err(e) => {
                let code = fail(&e);
                match &e {
                    reverb::server::ServeError::Bind { source, .. }
                        if source.kind() == std::io::ErrorKind::AddrInUse =>
                    {
                        eprintln!(
                            "  tip: another program holds it (a reverb serve still running?); \
                             stop it, or serve elsewhere: --tcp 127.0.0.1:0 picks a free port"
                        );
                    }
                    reverb::server::ServeError::UnixPathInUse { .. } => {
                        eprintln!(
                            "  tip: another program serves on it (a reverb serve still running?); \
                             stop it, or give another path (reverb replaces a socket file only \
                             once nothing is bound to it)"
                        );
                    }
                    _ => {}
                }
                return code;
            }
        },
        Err(e) => return fail(e),
    };
    let notifier = reverb::service::Notifier::from_env().unwrap_or_else(|e| {
        tracing::warn!("cannot reach the service manager: {e}");
        reverb::service::Notifier::disconnected()
    });
    let metrics = match args.metrics {
        Some(addr) => match start_metrics(addr, args.model, &shutdown) {
            Ok(started) => Some(started),
            Err(e) => return fail(e),
        },
        None => None,
    };
    if let Some((metrics, _)) = &metrics {
        listeners.limits.metrics = *metrics;
    }
    // STOPPING=1 is armed first: a manager may send SIGTERM as soon as it reads READY=1.
    if let Err(e) = notifier.stopping_on_signals() {
        tracing::warn!("cannot notify the service manager: {e}");
    }
    let mut names = listeners.names().to_vec();
    names.extend(metrics.as_ref().map(|(_, addr)| format!("http://{addr}")));
    let (model, metrics) = (args.model, metrics.map(|(metrics, _)| metrics));
    // Told by the model once all its threads and loops run: a server that fails to start
    // prints no `listening` line and never says READY=1.
    let draining = shutdown.clone();
    let on_serving = OnServing::new(move || {
        // A drain that began while the model was starting: nobody may be told it serves.
        if draining.is_fired() {
            tracing::info!("stopping before serving: not announced");
            return;
        }
        // Ready before the readiness lines, so whoever reads them finds /readyz agreeing.
        if let Some(metrics) = metrics {
            metrics.set_ready(true);
        }
        let mut stdout = std::io::stdout().lock();
        for name in &names {
            if writeln!(stdout, "listening {name}").is_err() {
                break;
            }
        }
        let _ = stdout.flush();
        if let Err(e) = notifier.ready() {
            tracing::warn!("cannot notify the service manager: {e}");
        }
        tracing::info!("serving with model {model}");
    });
    let options = RunOptions {
        threads: args.threads.map(|n| n as usize),
        on_serving,
    };
    match models::run(args.model, listeners, protocol, shutdown, options) {
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
        Err(e) => usage_error("client", e, None),
    };
    let endpoint = match cli::with_tls_verify(endpoint, args.ca.as_ref(), args.insecure) {
        Ok(endpoint) => endpoint,
        Err(e) => usage_error("client", e, None),
    };
    match reverb::client::run(&endpoint) {
        Ok(()) => ExitCode::SUCCESS,
        // Ctrl-C: the shell's convention for a program ended by SIGINT (128 + 2).
        Err(reverb::client::ClientError::Interrupted) => ExitCode::from(130),
        Err(e) => fail(e),
    }
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
    let config = args.config(server_exe);
    if let Err(e) = config.validate() {
        usage_error("compare", e, None);
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
            let phase = progress
                .bench
                .map_or(String::new(), |b| format!(", {}", b.phase.name()));
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
    match report.write_files(&args.out) {
        Ok(written) => {
            let names: Vec<String> = written.iter().map(|p| p.display().to_string()).collect();
            if writeln!(stdout, "\nwrote {}", names.join(", "))
                .and_then(|()| stdout.flush())
                .is_err()
            {
                return ExitCode::from(1);
            }
        }
        Err(e) => return fail(e),
    }
    if report.models.is_empty() {
        return fail("compare: no model could be measured");
    }
    ExitCode::from(report.exit_code())
}

pub(crate) fn progress_bar() -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(1);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{spinner} [{bar:40}] {elapsed_precise} {msg}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}
