//! `reverb compare`: every model measured side by side. Config in, report out; nothing
//! printed (the caller renders the report with [`CompareReport::to_table`] and writes its
//! files with [`CompareReport::write_files`]).
//!
//! Each model runs as its own `reverb serve --model M --tcp 127.0.0.1:0` child, pinned to
//! one CPU while the load runs on another (when there are two). For each model, in order:
//!
//! 1. idle: [`IDLE_CONNS`] connections open and silent; server CPU over the idle window;
//! 2. one bench point per connection count: the bench engine drives the child in-process,
//!    while the child's CPU and memory are read from `/proc` at the window's edges;
//! 3. probes: every connection of the largest count held open at once, each sending one
//!    message (does everyone get an answer?), then, if they all did,
//!    [`DESCRIPTOR_PROBE_CONNS`] connections the same way (can it watch fds past 1024?).
//!
//! A model's limits are results: they are measured and written in plain words in
//! [`ModelResult::limits`]. Every phase is bounded in time, and a bench point that outlives
//! its bound has its server killed, which ends the point and the model.

mod child;
mod probe;
mod proc;
mod render;
mod svg;

pub use probe::ProbeResult;

use crate::addr::Endpoint;
use crate::bench::{self, BenchConfig, BenchReport, Phase};
use crate::models::Model;
use crate::sys::affinity;
use child::{Server, Stopped};
use serde::Serialize;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// Default connection counts: one client, a few, many.
pub const DEFAULT_CONNS: [u32; 3] = [1, 10, 100];
/// Default measured window per point.
pub const DEFAULT_DURATION: Duration = Duration::from_secs(1);
/// Load before each window: enough to fault pages in and spawn threads.
pub const DEFAULT_WARMUP: Duration = Duration::from_millis(250);
/// Connections held open, silent, while idle CPU is measured.
pub const IDLE_CONNS: usize = 10;
/// How long idle CPU is measured.
pub const IDLE_WINDOW: Duration = Duration::from_secs(1);
/// Connections held at once by the descriptor probe: past `select`'s FD_SETSIZE (1024).
pub const DESCRIPTOR_PROBE_CONNS: usize = 1100;
/// How long the probes wait for answers.
pub const PROBE_WAIT: Duration = Duration::from_secs(1);
/// The descriptor probe's wait: a thousand forks or threads take a moment.
pub const DESCRIPTOR_PROBE_WAIT: Duration = Duration::from_secs(2);
/// After a point's window, how long replies still owed are awaited. A model serving fewer
/// clients than connected leaves the rest waiting; this bounds that wait.
pub const POINT_DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a point's connections may take to connect.
pub const POINT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Slack past a point's own bounds before its server is killed.
pub const POINT_GRACE: Duration = Duration::from_secs(5);
/// Idle CPU above this share of one core is a limit.
pub const IDLE_CPU_LIMIT_PERCENT: f64 = 10.0;

/// What to compare.
#[derive(Clone, Debug)]
pub struct CompareConfig {
    /// Models to run; empty means every model that is built.
    pub models: Vec<Model>,
    /// Connection counts, one bench point each.
    pub conns: Vec<u32>,
    /// Bytes per message.
    pub size: usize,
    /// Messages in flight per connection.
    pub depth: u32,
    /// Measured window per point.
    pub duration: Duration,
    /// Load before each window.
    pub warmup: Duration,
    /// The `reverb` binary the servers run (the caller's `current_exe()`).
    pub server_exe: PathBuf,
    /// Connections held by the descriptor probe; `None` skips it.
    pub descriptor_probe_conns: Option<usize>,
    /// Pin the server and the load to different CPUs when there are two or more.
    pub pin: bool,
    /// How long a server may take to print its `listening` line.
    pub start_timeout: Duration,
}

impl CompareConfig {
    /// The contract's defaults, with `server_exe` as the servers' binary.
    pub fn new(server_exe: PathBuf) -> Self {
        CompareConfig {
            models: Vec::new(),
            conns: DEFAULT_CONNS.to_vec(),
            size: 64,
            depth: 1,
            duration: DEFAULT_DURATION,
            warmup: DEFAULT_WARMUP,
            server_exe,
            descriptor_probe_conns: Some(DESCRIPTOR_PROBE_CONNS),
            pin: true,
            start_timeout: child::START_TIMEOUT,
        }
    }

    /// Checks the values.
    ///
    /// # Errors
    ///
    /// A message naming the bad value: no connection counts, or bench settings the bench
    /// engine refuses.
    pub fn validate(&self) -> Result<(), String> {
        if self.conns.is_empty() {
            return Err("--conns needs at least one count".to_string());
        }
        let endpoint = Endpoint::Tcp(SocketAddr::from(([127, 0, 0, 1], 1)));
        for &conns in &self.conns {
            self.bench_config(conns)
                .validate(&endpoint)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn bench_config(&self, conns: u32) -> BenchConfig {
        BenchConfig {
            conns,
            size: self.size,
            depth: self.depth,
            duration: self.duration,
            warmup: self.warmup,
            rate: None,
            threads: 1,
            drain_timeout: POINT_DRAIN_TIMEOUT,
            connect_timeout: POINT_CONNECT_TIMEOUT,
            ..BenchConfig::default()
        }
    }

    /// The models to run, in ladder order.
    fn chosen_models(&self) -> Vec<Model> {
        if self.models.is_empty() {
            Model::ALL.to_vec()
        } else {
            let mut models = Vec::new();
            for model in &self.models {
                if !models.contains(model) {
                    models.push(*model);
                }
            }
            models
        }
    }
}

/// The whole comparison. Serialises to `compare.json`.
#[derive(Clone, Debug, Serialize)]
pub struct CompareReport {
    /// The settings every point used.
    pub settings: Settings,
    /// Where things ran.
    pub machine: Machine,
    /// Models measured, in ladder order.
    pub models: Vec<ModelResult>,
    /// Models not measured, and why.
    pub skipped: Vec<Skipped>,
    /// How long the whole comparison took.
    pub elapsed_s: f64,
    /// The command that made it, when the caller sets it.
    pub command: Option<String>,
}

impl CompareReport {
    /// 0 when every byte every server sent back was right; 3 (the bench's "wrong bytes")
    /// otherwise. A model's limits are results, not failures, and do not change it.
    pub fn exit_code(&self) -> u8 {
        let is_wrong = self.models.iter().any(|m| {
            m.points
                .iter()
                .any(|p| p.bench.as_ref().is_some_and(|b| b.mismatches > 0))
                || [m.concurrency_probe, m.descriptor_probe]
                    .iter()
                    .flatten()
                    .any(|found| found.wrong > 0)
        });
        if is_wrong { 3 } else { 0 }
    }
}

/// The settings of a run.
#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    /// Connection counts.
    pub conns: Vec<u32>,
    /// Bytes per message.
    pub size: usize,
    /// Messages in flight per connection.
    pub depth: u32,
    /// Measured window per point.
    pub duration_s: f64,
    /// Load before each window.
    pub warmup_s: f64,
    /// Idle connections during the idle measurement.
    pub idle_conns: usize,
    /// The idle measurement's length.
    pub idle_window_s: f64,
    /// Connections held by the descriptor probe, if it ran.
    pub descriptor_probe_conns: Option<usize>,
}

/// The machine the run measured.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    /// CPUs this process may use.
    pub cpus: usize,
    /// The CPU every server was pinned to, if pinned.
    pub server_cpu: Option<usize>,
    /// The CPU the load ran on, if pinned.
    pub load_cpu: Option<usize>,
    /// `uname -r`-style kernel release, from `/proc`.
    pub kernel: String,
    /// Load average when the run started, from `/proc/loadavg`.
    pub loadavg_at_start: String,
}

/// A model that was not measured.
#[derive(Clone, Debug, Serialize)]
pub struct Skipped {
    /// The model.
    pub model: String,
    /// Why, in plain words.
    pub reason: String,
}

/// One model's results.
#[derive(Clone, Debug, Serialize)]
pub struct ModelResult {
    /// The model's `--model` name.
    pub model: String,
    /// Server CPU while idle with [`IDLE_CONNS`] connections open, in % of one core.
    pub idle_cpu_percent: Option<f64>,
    /// Server memory while idle, in bytes.
    pub idle_memory_bytes: Option<u64>,
    /// One result per connection count, in the order given.
    pub points: Vec<Point>,
    /// Every connection of the largest count held open at once, one message each.
    pub concurrency_probe: Option<ProbeResult>,
    /// [`DESCRIPTOR_PROBE_CONNS`] connections held at once, one message each.
    pub descriptor_probe: Option<ProbeResult>,
    /// What the model cannot do, measured, in plain words; empty when nothing was found.
    pub limits: Vec<String>,
    /// How the server ended: `clean`, `exit N`, `killed`.
    pub stopped: String,
}

/// One bench point.
#[derive(Clone, Debug, Serialize)]
pub struct Point {
    /// Connections.
    pub conns: u32,
    /// Verified messages per second in the window.
    pub msgs_per_s: f64,
    /// Median round trip, µs.
    pub p50_us: f64,
    /// 99th percentile round trip, µs.
    pub p99_us: f64,
    /// Server CPU in the window, in % of one core (all threads and children).
    pub server_cpu_percent: Option<f64>,
    /// Server CPU per verified message, µs.
    pub cpu_us_per_msg: Option<f64>,
    /// Peak server memory during the point, bytes.
    pub memory_bytes: Option<u64>,
    /// Peak number of server processes (more than 1 only for `forking`).
    pub processes: usize,
    /// Connections whose messages were never answered within the bounds.
    pub unanswered_conns: u64,
    /// What went wrong, in plain words (`None`: nothing).
    pub note: Option<String>,
    /// The bench engine's full report, when the point ran.
    pub bench: Option<BenchReport>,
}

/// Where a run is, for a progress display.
#[derive(Clone, Debug)]
pub struct Progress {
    /// Steps done so far.
    pub step: usize,
    /// All steps (per model: idle, one per point, probes).
    pub steps: usize,
    /// The model being measured.
    pub model: &'static str,
    /// What is happening, e.g. `idle` or `100 conns`.
    pub activity: String,
    /// The bench engine's own progress, during a point.
    pub bench: Option<bench::Progress>,
}

/// Runs the comparison.
///
/// # Errors
///
/// An invalid config (`InvalidInput`). A model that cannot start is reported in
/// [`CompareReport::skipped`], not as an error.
pub fn run(config: &CompareConfig) -> io::Result<CompareReport> {
    run_with_progress(config, |_| {})
}

/// [`run`], calling `progress` as it goes (several times a second during the load).
///
/// # Errors
///
/// As [`run`].
pub fn run_with_progress(
    config: &CompareConfig,
    mut progress: impl FnMut(&Progress),
) -> io::Result<CompareReport> {
    config
        .validate()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let started = Instant::now();
    // The probes hold over a thousand sockets in this process.
    let _ = crate::sys::raise_open_file_limit();
    let mut skipped = Vec::new();
    let models = config.chosen_models();
    let pinning = Pinning::choose(config.pin);
    let machine = Machine {
        cpus: pinning.allowed.len(),
        server_cpu: pinning.server_cpu(),
        load_cpu: pinning.load_cpu(),
        kernel: read_trimmed("/proc/sys/kernel/osrelease"),
        loadavg_at_start: read_trimmed("/proc/loadavg"),
    };
    pinning.pin_load();
    let mut tracker = Tracker {
        step: 0,
        steps: models.len() * (config.conns.len() + 2),
        callback: &mut progress,
    };
    let mut results = Vec::new();
    for model in models {
        let first_step = tracker.step;
        match measure_model(config, model, &pinning, &mut tracker) {
            Ok(result) => results.push(result),
            Err(reason) => skipped.push(Skipped {
                model: model.name().to_string(),
                reason,
            }),
        }
        tracker.step = first_step + config.conns.len() + 2;
    }
    pinning.restore();
    Ok(CompareReport {
        settings: Settings {
            conns: config.conns.clone(),
            size: config.size,
            depth: config.depth,
            duration_s: config.duration.as_secs_f64(),
            warmup_s: config.warmup.as_secs_f64(),
            idle_conns: IDLE_CONNS,
            idle_window_s: IDLE_WINDOW.as_secs_f64(),
            descriptor_probe_conns: config.descriptor_probe_conns,
        },
        machine,
        models: results,
        skipped,
        elapsed_s: started.elapsed().as_secs_f64(),
        command: None,
    })
}

/// Forwards progress with the step count.
struct Tracker<'a, F: FnMut(&Progress)> {
    step: usize,
    steps: usize,
    callback: &'a mut F,
}

impl<F: FnMut(&Progress)> Tracker<'_, F> {
    fn report(&mut self, model: Model, activity: String, bench: Option<bench::Progress>) {
        (self.callback)(&Progress {
            step: self.step,
            steps: self.steps,
            model: model.name(),
            activity,
            bench,
        });
    }
}

/// Which CPUs the servers and the load use.
struct Pinning {
    /// CPUs this process could use at the start (restored at the end).
    allowed: Vec<usize>,
    is_pinned: bool,
}

impl Pinning {
    fn choose(wanted: bool) -> Pinning {
        let allowed = affinity::allowed_cpus(0).unwrap_or_default();
        let is_pinned = wanted && allowed.len() >= 2;
        Pinning { allowed, is_pinned }
    }

    fn server_cpu(&self) -> Option<usize> {
        self.is_pinned.then(|| self.allowed[0])
    }

    fn load_cpu(&self) -> Option<usize> {
        self.is_pinned.then(|| self.allowed[1])
    }

    /// Pins the calling thread to the load CPU; the bench's threads, spawned from it,
    /// inherit that.
    fn pin_load(&self) {
        if let Some(cpu) = self.load_cpu() {
            if let Err(e) = affinity::pin(0, &[cpu]) {
                tracing::warn!("cannot pin the load to cpu {cpu}: {e}");
            }
        }
    }

    /// Pins every thread of the server; threads and children it makes later inherit.
    fn pin_server(&self, pid: u32) {
        if let Some(cpu) = self.server_cpu() {
            for tid in proc::threads(pid) {
                if let Err(e) = affinity::pin(tid, &[cpu]) {
                    tracing::warn!("cannot pin server thread {tid} to cpu {cpu}: {e}");
                }
            }
        }
    }

    fn restore(&self) {
        if self.is_pinned {
            let _ = affinity::pin(0, &self.allowed);
        }
    }
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|text| text.trim().to_string())
        .unwrap_or_default()
}

/// Measures one model; `Err` is why it could not be measured at all.
fn measure_model<F: FnMut(&Progress)>(
    config: &CompareConfig,
    model: Model,
    pinning: &Pinning,
    tracker: &mut Tracker<'_, F>,
) -> Result<ModelResult, String> {
    tracker.report(model, "starting".to_string(), None);
    let mut server = Server::start(&config.server_exe, model, config.start_timeout)
        .map_err(|e| e.to_string())?;
    pinning.pin_server(server.pid());
    let mut result = ModelResult {
        model: model.name().to_string(),
        idle_cpu_percent: None,
        idle_memory_bytes: None,
        points: Vec::new(),
        concurrency_probe: None,
        descriptor_probe: None,
        limits: Vec::new(),
        stopped: String::new(),
    };

    tracker.report(model, "idle".to_string(), None);
    match measure_idle(&server) {
        Ok((cpu_percent, memory_bytes)) => {
            result.idle_cpu_percent = Some(cpu_percent);
            result.idle_memory_bytes = Some(memory_bytes);
        }
        Err(e) => result.limits.push(format!("idle measurement failed: {e}")),
    }
    tracker.step += 1;

    let mut was_killed = false;
    for &conns in &config.conns {
        // Again: a thread started while the first pinning walked the list kept the old set.
        pinning.pin_server(server.pid());
        let point = measure_point(config, conns, &server, model, tracker);
        tracker.step += 1;
        was_killed = point.note.as_deref().is_some_and(|n| n.starts_with(HUNG));
        result.points.push(point);
        if was_killed {
            break;
        }
    }

    if !was_killed {
        tracker.report(model, "probing".to_string(), None);
        let most = config.conns.iter().copied().max().unwrap_or(1).max(2) as usize;
        match probe::hold_open(server.addr, most, PROBE_WAIT) {
            Ok(found) => result.concurrency_probe = Some(found),
            Err(e) => result.limits.push(format!("concurrency probe failed: {e}")),
        }
        let everyone_answered = result
            .concurrency_probe
            .is_some_and(|found| found.is_complete());
        if let (true, Some(count)) = (everyone_answered, config.descriptor_probe_conns) {
            tracker.report(model, format!("probing {count} conns"), None);
            match probe::hold_open(server.addr, count, DESCRIPTOR_PROBE_WAIT) {
                Ok(found) => result.descriptor_probe = Some(found),
                Err(e) => result.limits.push(format!("descriptor probe failed: {e}")),
            }
        }
    }
    tracker.step += 1;

    tracker.report(model, "stopping".to_string(), None);
    let stopped = server.stop();
    result.stopped = match stopped {
        Stopped::Clean => "clean".to_string(),
        Stopped::Failed(Some(code)) => format!("exit {code}"),
        Stopped::Failed(None) => "killed by a signal".to_string(),
        Stopped::Killed => "killed".to_string(),
        Stopped::DiedEarly(Some(code)) => format!("died early, exit {code}"),
        Stopped::DiedEarly(None) => "died early, by a signal".to_string(),
    };
    let mut limits = describe_limits(&result, stopped);
    limits.append(&mut result.limits);
    result.limits = limits;
    Ok(result)
}

/// Server CPU (% of one core) and memory while [`IDLE_CONNS`] connections sit silent.
fn measure_idle(server: &Server) -> io::Result<(f64, u64)> {
    let connections = probe::open_idle(server.addr, IDLE_CONNS)?;
    // Let accepting (threads, forks) finish before the window opens.
    thread::sleep(Duration::from_millis(200));
    let before = proc::usage(server.pid())?;
    let start = Instant::now();
    thread::sleep(IDLE_WINDOW);
    let after = proc::usage(server.pid())?;
    let wall = start.elapsed();
    drop(connections);
    let cpu_percent = percent(after.cpu.saturating_sub(before.cpu), wall);
    Ok((cpu_percent, after.memory_bytes))
}

fn percent(cpu: Duration, wall: Duration) -> f64 {
    if wall.is_zero() {
        0.0
    } else {
        cpu.as_secs_f64() / wall.as_secs_f64() * 100.0
    }
}

/// The note of a point whose server had to be killed.
const HUNG: &str = "did not finish";

/// One bench point, bounded: past its own bounds plus [`POINT_GRACE`] the server is
/// killed, which resets every connection and ends the bench.
fn measure_point<F: FnMut(&Progress)>(
    config: &CompareConfig,
    conns: u32,
    server: &Server,
    model: Model,
    tracker: &mut Tracker<'_, F>,
) -> Point {
    let bench_config = config.bench_config(conns);
    let endpoint = Endpoint::Tcp(server.addr);
    let pid = server.pid();
    let bound = bench_config.connect_timeout
        + bench_config.warmup
        + bench_config.duration
        + bench_config.drain_timeout
        + POINT_GRACE;
    let was_killed = AtomicBool::new(false);
    let (finished, watched) = mpsc::channel::<()>();

    let mut peak_memory = None::<u64>;
    let mut peak_processes = 0;
    // CPU is read at the window's first sample and at its last one (the progress callback
    // runs about every 100 ms). Not at the window's end: once the load stops, connections
    // close, and a forking server's children exit, and a child that exited but is not yet
    // reaped shows neither its CPU time nor its memory.
    let mut window_start = None::<(Instant, proc::Usage)>;
    let mut window_last = None::<(Instant, proc::Usage)>;
    let outcome = thread::scope(|scope| {
        let was_killed = &was_killed;
        scope.spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = watched.recv_timeout(bound) {
                was_killed.store(true, Ordering::SeqCst);
                let _ = crate::sys::process::kill(
                    pid as crate::sys::process::Pid,
                    crate::sys::process::SIGKILL,
                );
            }
        });
        let activity = format!("{conns} conns");
        let outcome = bench::run_with_progress(&endpoint, &bench_config, |bench_progress| {
            if bench_progress.phase == Phase::Measuring {
                if let Ok(usage) = proc::usage(pid) {
                    peak_memory = Some(peak_memory.unwrap_or(0).max(usage.memory_bytes));
                    peak_processes = peak_processes.max(usage.processes);
                    let sample = Some((Instant::now(), usage));
                    if window_start.is_none() {
                        window_start = sample;
                    } else {
                        window_last = sample;
                    }
                }
            }
            tracker.report(model, activity.clone(), Some(bench_progress));
        });
        let _ = finished.send(());
        outcome
    });

    let mut point = Point {
        conns,
        msgs_per_s: 0.0,
        p50_us: 0.0,
        p99_us: 0.0,
        server_cpu_percent: None,
        cpu_us_per_msg: None,
        memory_bytes: peak_memory,
        processes: peak_processes,
        unanswered_conns: 0,
        note: None,
        bench: None,
    };
    if let (Some((t0, u0)), Some((t1, u1))) = (window_start, window_last) {
        let cpu_percent = percent(u1.cpu.saturating_sub(u0.cpu), t1.duration_since(t0));
        point.server_cpu_percent = Some(cpu_percent);
        // CPU seconds per second over messages per second: CPU per message.
        if let Some(rate) = outcome
            .as_ref()
            .ok()
            .map(|r| r.msgs_per_s)
            .filter(|&r| r > 0.0)
        {
            point.cpu_us_per_msg = Some(cpu_percent / 100.0 * 1e6 / rate);
        }
    }
    match outcome {
        Ok(report) => {
            point.msgs_per_s = report.msgs_per_s;
            point.p50_us = report.latency_us.p50;
            point.p99_us = report.latency_us.p99;
            let detail = report.error_detail;
            let depth = u64::from(report.depth.max(1));
            point.unanswered_conns = detail.missing.div_ceil(depth).min(u64::from(conns));
            point.note = describe_point(&report, point.unanswered_conns);
            point.bench = Some(report);
        }
        Err(e) => point.note = Some(format!("bench failed: {e}")),
    }
    if was_killed.load(Ordering::SeqCst) {
        point.note = Some(format!(
            "{HUNG} within {:.0} s: server killed",
            bound.as_secs_f64()
        ));
    }
    point
}

/// A point's problems in plain words.
fn describe_point(report: &BenchReport, unanswered_conns: u64) -> Option<String> {
    let mut parts = Vec::new();
    let detail = report.error_detail;
    if unanswered_conns > 0 {
        parts.push(format!(
            "{} of {} clients answered",
            u64::from(report.conns) - unanswered_conns,
            report.conns
        ));
    }
    if detail.connect_failed > 0 {
        parts.push(format!("{} connects failed", detail.connect_failed));
    }
    if detail.closed_early + detail.reset > 0 {
        parts.push(format!(
            "{} connections closed or reset",
            detail.closed_early + detail.reset
        ));
    }
    if report.mismatches > 0 {
        parts.push(format!("{} WRONG BYTES", report.mismatches));
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}

/// The model's limits, from the measurements.
fn describe_limits(result: &ModelResult, stopped: Stopped) -> Vec<String> {
    let mut limits = Vec::new();
    if let Some(found) = result.concurrency_probe {
        if !found.is_complete() {
            limits.push(describe_probe(&found, false));
        }
    }
    if let Some(found) = result.descriptor_probe {
        if !found.is_complete() {
            limits.push(describe_probe(&found, true));
        }
    }
    if let Some(idle) = result.idle_cpu_percent {
        if idle >= IDLE_CPU_LIMIT_PERCENT {
            limits.push(format!(
                "burns {idle:.0}% of a core while idle ({IDLE_CONNS} silent clients)"
            ));
        }
    }
    if let Some(point) = result
        .points
        .iter()
        .find(|p| p.note.as_deref().is_some_and(|n| n.starts_with(HUNG)))
    {
        limits.push(format!("hung at {} conns (killed)", point.conns));
    }
    let wrong: u64 = result
        .points
        .iter()
        .filter_map(|p| p.bench.as_ref().map(|b| b.mismatches))
        .sum();
    if wrong > 0 {
        limits.push(format!("returned {wrong} WRONG BYTES (a bug)"));
    }
    match stopped {
        Stopped::Clean => {}
        Stopped::Failed(code) => limits.push(format!(
            "exited {} on SIGTERM",
            code.map_or("by a signal".to_string(), |c| format!("with code {c}"))
        )),
        Stopped::Killed => limits.push(format!(
            "ignored SIGTERM for {} s (killed)",
            child::STOP_TIMEOUT.as_secs()
        )),
        // A point that hung has already said so; its server was killed on purpose.
        Stopped::DiedEarly(_) if limits.iter().any(|l| l.starts_with("hung")) => {}
        Stopped::DiedEarly(code) => limits.push(format!(
            "the server died during the run ({})",
            code.map_or("killed by a signal".to_string(), |c| format!("exit {c}"))
        )),
    }
    limits
}

/// A probe that was not fully answered, in plain words.
fn describe_probe(found: &ProbeResult, is_descriptor_probe: bool) -> String {
    let n = found.conns;
    let served = found.answered;
    if found.wrong > 0 {
        return format!("{} of {n} answers had wrong bytes", found.wrong);
    }
    if is_descriptor_probe && found.closed > 0 && (1000..1024).contains(&served) {
        return format!(
            "cannot watch fds >= 1024: {served} of {n} open clients served, {} closed",
            found.closed
        );
    }
    let mut text = if found.waiting > 0 && found.closed == 0 {
        format!("serves {served} of {n} clients at a time; the others wait")
    } else {
        format!("serves {served} of {n} clients held open at once")
    };
    if found.closed > 0 {
        text += &format!(", {} closed", found.closed);
    }
    if found.waiting > 0 && found.closed > 0 {
        text += &format!(", {} waiting", found.waiting);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_that_do_not_start_are_skipped_with_their_reason() {
        let dir = std::env::temp_dir().join(format!("reverb-compare-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let silent = dir.join("silent.sh");
        std::fs::write(&silent, "#!/bin/sh\nexec sleep 30\n").expect("write script");
        let failing = dir.join("failing.sh");
        std::fs::write(
            &failing,
            "#!/bin/sh\necho 'reverb: cannot bind: no' >&2\nexit 1\n",
        )
        .expect("write script");
        for script in [&silent, &failing] {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(script, std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
        }
        for (exe, reason) in [
            (&silent, "printed no listening line within 0.5 s"),
            (&failing, "cannot bind: no"),
        ] {
            let mut config = CompareConfig::new(exe.clone());
            config.models = vec![Model::Threaded];
            config.start_timeout = Duration::from_millis(500);
            let started = Instant::now();
            let report = run(&config).expect("run");
            assert!(started.elapsed() < Duration::from_secs(8), "bounded");
            assert!(report.models.is_empty());
            assert_eq!(report.skipped.len(), 1, "{:?}", report.skipped);
            assert_eq!(report.skipped[0].model, "threaded");
            assert_eq!(report.skipped[0].reason, reason);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn probe(conns: usize, answered: usize, closed: usize, waiting: usize) -> ProbeResult {
        ProbeResult {
            conns,
            connected: conns,
            answered,
            closed,
            waiting,
            wrong: 0,
        }
    }

    #[test]
    fn limits_in_plain_words() {
        assert_eq!(
            describe_probe(&probe(100, 1, 0, 99), false),
            "serves 1 of 100 clients at a time; the others wait"
        );
        assert_eq!(
            describe_probe(&probe(1100, 1019, 81, 0), true),
            "cannot watch fds >= 1024: 1019 of 1100 open clients served, 81 closed"
        );
        assert_eq!(
            describe_probe(&probe(1100, 900, 100, 100), true),
            "serves 900 of 1100 clients held open at once, 100 closed, 100 waiting"
        );
    }
}
