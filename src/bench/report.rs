//! The bench's result: counts, rates and latency percentiles, as JSON or a human table.

use super::{CpuWindow, Plan, RATE_REACHED_SHARE, Tally};
use serde::Serialize;
use std::fmt::Write as _;

/// Round-trip time percentiles of the window's messages, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// The slowest message.
    pub max: f64,
    /// The mean.
    pub mean: f64,
}

/// What went wrong with connections; `errors` in the report is their sum.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ErrorDetail {
    /// Connections that could not be established (refused, timed out, ...).
    pub connect_failed: u64,
    /// Connections the server closed while replies were still owed.
    pub closed_early: u64,
    /// Connections that failed with an OS error (reset, broken pipe, refused datagram...).
    pub reset: u64,
    /// Stream messages still unanswered when the drain timeout ran out.
    pub missing: u64,
}

impl ErrorDetail {
    /// The total.
    pub fn total(&self) -> u64 {
        self.connect_failed + self.closed_early + self.reset + self.missing
    }

    pub(super) fn add(&mut self, other: &ErrorDetail) {
        self.connect_failed += other.connect_failed;
        self.closed_early += other.closed_early;
        self.reset += other.reset;
        self.missing += other.missing;
    }
}

/// The outcome of a bench run. Serialises to the contract's `--json` object.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BenchReport {
    /// The server, as `tcp://...`, `udp://...`, `unix://...` or `unix-dgram://...`.
    pub endpoint: String,
    /// Connections asked for.
    pub conns: u32,
    /// Connections established.
    pub conns_established: u64,
    /// Bytes per message.
    pub size: usize,
    /// Messages in flight per connection (closed loop).
    pub depth: u32,
    /// Client threads.
    pub threads: u32,
    /// Seconds of load before the window.
    pub warmup_s: f64,
    /// The measured window, in seconds.
    pub duration_s: f64,
    /// Open loop: the target total rate in messages per second.
    pub rate: Option<f64>,
    /// Open loop: whether the completed rate came within [`RATE_REACHED_SHARE`] of the target.
    pub rate_reached: Option<bool>,
    /// Messages completed (fully echoed and verified) inside the window.
    pub msgs: u64,
    /// `msgs / duration_s`.
    pub msgs_per_s: f64,
    /// Echoed payload bytes per second (one direction).
    pub bytes_per_s: f64,
    /// Failed connections, resets, early closes and missing replies (see `error_detail`).
    pub errors: u64,
    /// Wrong, extra or duplicated bytes or datagrams (warmup included).
    pub mismatches: u64,
    /// Datagrams never answered.
    pub lost: u64,
    /// Datagrams answered after they had been counted lost.
    pub late: u64,
    /// Round-trip percentiles of the window's messages.
    pub latency_us: LatencySummary,
    /// The parts of `errors`.
    pub error_detail: ErrorDetail,
    /// CPU seconds this client process used during the window (all its threads).
    pub client_cpu_s: Option<f64>,
    /// `client_cpu_s` per message, in microseconds.
    pub client_cpu_us_per_msg: Option<f64>,
    /// The first few problems, described.
    pub problems: Vec<String>,
}

impl BenchReport {
    /// Whether every byte was right and every connection worked (lost datagrams allowed).
    pub fn is_clean(&self) -> bool {
        self.errors == 0 && self.mismatches == 0
    }

    /// The contract's exit code: 0 when clean, 3 otherwise.
    pub fn exit_code(&self) -> u8 {
        if self.is_clean() { 0 } else { 3 }
    }

    /// The report as one line of JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// The report as a short human-readable table (several lines, ending in a newline).
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{}: {} conns x {} B, depth {}, {:.1} s measured after {:.1} s warmup, {} thread{}",
            self.endpoint,
            self.conns,
            self.size,
            self.depth,
            self.duration_s,
            self.warmup_s,
            self.threads,
            if self.threads == 1 { "" } else { "s" }
        );
        let _ = writeln!(
            out,
            "{:>12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7} {:>10}",
            "msgs/s", "MB/s", "p50 us", "p99 us", "p99.9 us", "max us", "errors", "mismatches"
        );
        let l = &self.latency_us;
        let _ = writeln!(
            out,
            "{:>12.0} {:>9.2} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>7} {:>10}",
            self.msgs_per_s,
            self.bytes_per_s / 1e6,
            l.p50,
            l.p99,
            l.p999,
            l.max,
            self.errors,
            self.mismatches
        );
        if self.endpoint.starts_with("udp://") || self.endpoint.starts_with("unix-dgram://") {
            let _ = writeln!(out, "datagrams lost: {}, late: {}", self.lost, self.late);
        }
        if let (Some(rate), Some(false)) = (self.rate, self.rate_reached) {
            let _ = writeln!(
                out,
                "target rate {rate:.0} msgs/s NOT reached: {:.0} msgs/s completed",
                self.msgs_per_s
            );
        }
        if self.conns_established < u64::from(self.conns) {
            let _ = writeln!(
                out,
                "connections established: {} of {}",
                self.conns_established, self.conns
            );
        }
        for problem in &self.problems {
            let _ = writeln!(out, "problem: {problem}");
        }
        let hidden = (self.errors + self.mismatches).saturating_sub(self.problems.len() as u64);
        if !self.problems.is_empty() && hidden > 0 {
            let _ = writeln!(out, "problem: ... and {hidden} more");
        }
        out
    }
}

pub(super) fn build(plan: &Plan, tally: Tally, cpu: CpuWindow) -> BenchReport {
    let config = &plan.config;
    let duration_s = config.duration.as_secs_f64();
    let msgs_per_s = tally.msgs as f64 / duration_s;
    let h = &tally.histogram;
    let us = |ns: u64| (ns as f64 / 100.0).round() / 10.0;
    let latency_us = if h.is_empty() {
        LatencySummary::default()
    } else {
        LatencySummary {
            p50: us(h.value_at_quantile(0.50)),
            p90: us(h.value_at_quantile(0.90)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
            mean: (h.mean() / 100.0).round() / 10.0,
        }
    };
    BenchReport {
        endpoint: plan.endpoint.to_string(),
        conns: config.conns,
        conns_established: tally.established,
        size: config.size,
        depth: config.depth,
        threads: config.threads.min(config.conns),
        warmup_s: config.warmup.as_secs_f64(),
        duration_s,
        rate: config.rate,
        rate_reached: config
            .rate
            .map(|rate| msgs_per_s >= rate * RATE_REACHED_SHARE),
        msgs: tally.msgs,
        msgs_per_s,
        bytes_per_s: msgs_per_s * config.size as f64,
        errors: tally.errors.total(),
        mismatches: tally.mismatches,
        lost: tally.lost,
        late: tally.late,
        latency_us,
        error_detail: tally.errors,
        client_cpu_s: cpu.seconds,
        client_cpu_us_per_msg: cpu
            .seconds
            .filter(|_| tally.msgs > 0)
            .map(|s| s * 1e6 / tally.msgs as f64),
        problems: tally.problems,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> BenchReport {
        BenchReport {
            endpoint: "tcp://127.0.0.1:7".to_string(),
            conns: 2,
            conns_established: 2,
            size: 64,
            depth: 1,
            threads: 1,
            warmup_s: 1.0,
            duration_s: 10.0,
            rate: None,
            rate_reached: None,
            msgs: 1000,
            msgs_per_s: 100.0,
            bytes_per_s: 6400.0,
            errors: 0,
            mismatches: 0,
            lost: 3,
            late: 0,
            latency_us: LatencySummary::default(),
            error_detail: ErrorDetail::default(),
            client_cpu_s: None,
            client_cpu_us_per_msg: None,
            problems: Vec::new(),
        }
    }

    #[test]
    fn json_has_every_contract_field() {
        let json: serde_json::Value = serde_json::from_str(&report().to_json()).unwrap();
        for field in [
            "msgs",
            "msgs_per_s",
            "bytes_per_s",
            "conns",
            "size",
            "depth",
            "duration_s",
            "errors",
            "mismatches",
            "lost",
        ] {
            assert!(json[field].is_number(), "{field}");
        }
        for p in ["p50", "p90", "p99", "p999", "max"] {
            assert!(json["latency_us"][p].is_number(), "{p}");
        }
    }

    #[test]
    fn exit_code_ignores_lost_datagrams_only() {
        let mut r = report();
        assert_eq!(r.exit_code(), 0);
        r.mismatches = 1;
        assert_eq!(r.exit_code(), 3);
        r.mismatches = 0;
        r.errors = 1;
        assert_eq!(r.exit_code(), 3);
    }
}
