//! What a comparison found: the report `compare.json` serialises, and its exit code.

use super::ProbeResult;
use crate::bench::BenchReport;
use serde::Serialize;

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
    /// Server CPU while idle with [`IDLE_CONNS`](super::IDLE_CONNS) connections open, in % of one core.
    pub idle_cpu_percent: Option<f64>,
    /// Server memory while idle, in bytes.
    pub idle_memory_bytes: Option<u64>,
    /// One result per connection count, in the order given.
    pub points: Vec<Point>,
    /// Every connection of the largest count held open at once, one message each.
    pub concurrency_probe: Option<ProbeResult>,
    /// [`DESCRIPTOR_PROBE_CONNS`](super::DESCRIPTOR_PROBE_CONNS) connections held at once, one message each.
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
