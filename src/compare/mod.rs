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
mod measure;
mod pinning;
mod probe;
mod proc;
mod render;
mod report;
mod svg;

pub use probe::ProbeResult;
pub use report::{CompareReport, Machine, ModelResult, Point, Settings, Skipped};

use crate::addr::Endpoint;
use crate::bench::{self, BenchConfig};
use crate::models::Model;
use pinning::Pinning;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
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
        match measure::measure_model(config, model, &pinning, &mut tracker) {
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

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|text| text.trim().to_string())
        .unwrap_or_default()
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
}
