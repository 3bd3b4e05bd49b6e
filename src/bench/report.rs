//! The bench's result: counts, rates and latency percentiles, as JSON or a human table.
//!
//! The JSON carries each latency histogram whole, in HdrHistogram's standard compressed
//! encoding (V2, deflate, base64: what `HistogramLogReader` and other HdrHistogram tools
//! read), so reports of several agents merge exactly ([`super::merge`]).

use super::tally::{Exhausted, IntervalTally, Tally};
use super::{Plan, RATE_REACHED_SHARE, Watched};
use base64::Engine as _;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer as _, V2DeflateSerializer};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::io;

/// Latency percentiles, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// The slowest.
    pub max: f64,
    /// The mean.
    pub mean: f64,
}

impl LatencySummary {
    /// The percentiles of a histogram of nanoseconds (all zero when it is empty).
    pub fn of(histogram: &Histogram<u64>) -> Self {
        if histogram.is_empty() {
            return LatencySummary::default();
        }
        let us = |ns: u64| (ns as f64 / 100.0).round() / 10.0;
        LatencySummary {
            p50: us(histogram.value_at_quantile(0.50)),
            p90: us(histogram.value_at_quantile(0.90)),
            p99: us(histogram.value_at_quantile(0.99)),
            p999: us(histogram.value_at_quantile(0.999)),
            max: us(histogram.max()),
            mean: (histogram.mean() / 100.0).round() / 10.0,
        }
    }

    /// The value at `percentile` (0 to 100) of a histogram of nanoseconds, in µs.
    pub fn percentile_us(histogram: &Histogram<u64>, percentile: f64) -> f64 {
        if histogram.is_empty() {
            return 0.0;
        }
        let ns = histogram.value_at_quantile(percentile / 100.0);
        (ns as f64 / 100.0).round() / 10.0
    }
}

/// A histogram of nanoseconds in HdrHistogram's compressed base64 encoding.
pub(super) fn encode_histogram(histogram: &Histogram<u64>) -> String {
    let mut bytes = Vec::new();
    match V2DeflateSerializer::new().serialize(histogram, &mut bytes) {
        Ok(_) => base64::engine::general_purpose::STANDARD.encode(bytes),
        Err(_) => String::new(),
    }
}

/// Reads a histogram in HdrHistogram's compressed base64 encoding (the report's, or any
/// HdrHistogram tool's).
///
/// # Errors
///
/// Text that is not base64, or bytes that are not an HdrHistogram encoding.
pub fn decode_histogram(text: &str) -> io::Result<Histogram<u64>> {
    let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| invalid(format!("histogram is not base64: {e}")))?;
    Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|e| invalid(format!("histogram cannot be decoded: {e:?}")))
}

/// What went wrong with connections; `errors` in the report is their sum.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Connections that could not be established (by cause in the connect summary).
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

/// Failed connects by cause.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectErrors {
    /// Nobody listens (ECONNREFUSED), or the listener refused.
    pub refused: u64,
    /// No handshake within the connect timeout of the connection's own `connect`.
    pub timed_out: u64,
    /// The process or system ran out of file descriptors (EMFILE, ENFILE).
    pub out_of_descriptors: u64,
    /// No local port was left for the source address (EADDRNOTAVAIL, EADDRINUSE).
    pub out_of_ports: u64,
    /// Any other error (its text is among the problems).
    pub other: u64,
}

impl ConnectErrors {
    /// Counts `error` under its cause; says which resource ran out, if one did.
    pub(super) fn count(&mut self, error: &io::Error) -> Option<Exhausted> {
        use crate::sys::errno::{EMFILE, ENFILE};
        if matches!(error.raw_os_error(), Some(EMFILE | ENFILE)) {
            self.out_of_descriptors += 1;
            return Some(Exhausted::Descriptors);
        }
        match error.kind() {
            io::ErrorKind::AddrNotAvailable | io::ErrorKind::AddrInUse => {
                self.out_of_ports += 1;
                return Some(Exhausted::Ports);
            }
            io::ErrorKind::ConnectionRefused => self.refused += 1,
            io::ErrorKind::TimedOut => self.timed_out += 1,
            _ => self.other += 1,
        }
        None
    }

    pub(super) fn add(&mut self, other: &ConnectErrors) {
        self.refused += other.refused;
        self.timed_out += other.timed_out;
        self.out_of_descriptors += other.out_of_descriptors;
        self.out_of_ports += other.out_of_ports;
        self.other += other.other;
    }

    /// "3 timed out, 1 refused", or "" when none failed.
    fn describe(&self) -> String {
        [
            (self.timed_out, "timed out"),
            (self.refused, "refused"),
            (self.out_of_descriptors, "out of descriptors"),
            (self.out_of_ports, "out of ports"),
            (self.other, "other"),
        ]
        .into_iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, what)| format!("{n} {what}"))
        .collect::<Vec<_>>()
        .join(", ")
    }
}

/// How connecting went: counts, rate, causes and the time from `connect` to established.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ConnectSummary {
    /// Connections established over the whole run (reopened ones included).
    pub opened: u64,
    /// Connects that failed (the sum of `errors`).
    pub failed: u64,
    /// Connections established inside the measured window, per second.
    pub opened_per_s: f64,
    /// How long the connect phase before the load took, in seconds.
    pub phase_s: f64,
    /// Time from `connect` to established, percentiles in µs.
    pub latency_us: LatencySummary,
    /// The same, whole: HdrHistogram's compressed base64 encoding, in nanoseconds.
    pub histogram_ns: String,
    /// Failed connects by cause.
    pub errors: ConnectErrors,
}

/// One `--interval` record of the measured window.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct IntervalReport {
    /// Where the interval starts, in seconds from the start of the window.
    pub start_s: f64,
    /// Its length in seconds (the last one may be shorter).
    pub duration_s: f64,
    /// Messages completed in it.
    pub msgs: u64,
    /// `msgs / duration_s`.
    pub msgs_per_s: f64,
    /// Connections established in it.
    pub connects: u64,
    /// Round-trip percentiles of its messages, in µs.
    pub latency_us: LatencySummary,
    /// Its round-trip histogram (2 significant figures), compressed base64, in ns.
    pub histogram_ns: String,
}

/// One agent's share of a merged report.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentSummary {
    /// The agent's index, when it had one.
    pub agent: Option<u32>,
    /// The file its report came from.
    pub file: String,
    /// Its server address.
    pub endpoint: String,
    /// Its messages in the window.
    pub msgs: u64,
    /// Its rate over its own window.
    pub msgs_per_s: f64,
    /// Its connection errors.
    pub errors: u64,
    /// Its wrong bytes.
    pub mismatches: u64,
    /// Its lost datagrams.
    pub lost: u64,
    /// Its window, in seconds since the Unix epoch.
    pub window_start_unix_s: Option<f64>,
    /// The end of its window.
    pub window_end_unix_s: Option<f64>,
    /// Its problems, described.
    pub problems: Vec<String>,
}

/// The outcome of a bench run. Serialises to the contract's `--json` object.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    /// The server, as `tcp://...`, `udp://...`, `unix://...` or `unix-dgram://...`.
    pub endpoint: String,
    /// The agent's index (`JOB_COMPLETION_INDEX`), when it had one.
    #[serde(default)]
    pub agent: Option<u32>,
    /// Connections asked for.
    pub conns: u32,
    /// Connections established in the connect phase, before the load.
    pub conns_established: u64,
    /// Bytes per message.
    pub size: usize,
    /// Messages in flight per connection (closed loop).
    pub depth: u32,
    /// Client threads.
    pub threads: u32,
    /// Seconds of load before the window.
    pub warmup_s: f64,
    /// The measured window as it really ran, in seconds (shorter than asked when every
    /// connection failed or closed early; 0 when the load never started).
    pub duration_s: f64,
    /// The whole run, connecting and draining included, in seconds.
    #[serde(default)]
    pub elapsed_s: f64,
    /// When the window started, in seconds since the Unix epoch.
    #[serde(default)]
    pub window_start_unix_s: Option<f64>,
    /// When it ended.
    #[serde(default)]
    pub window_end_unix_s: Option<f64>,
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
    /// The window's round-trip histogram: HdrHistogram's compressed base64 encoding, in ns.
    #[serde(default)]
    pub latency_histogram_ns: String,
    /// How connecting went.
    #[serde(default)]
    pub connect: ConnectSummary,
    /// The parts of `errors`.
    pub error_detail: ErrorDetail,
    /// CPU seconds this client process used during the window (all its threads).
    pub client_cpu_s: Option<f64>,
    /// `client_cpu_s` per message, in microseconds.
    pub client_cpu_us_per_msg: Option<f64>,
    /// `--interval`: the window's time series.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub intervals: Vec<IntervalReport>,
    /// Why connecting stopped early (a resource ran out), and how to raise it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
    /// `--slo`: the rate search's steps and answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slo: Option<super::SloReport>,
    /// A merged report: each agent's share.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<AgentSummary>,
    /// The first few problems, described.
    pub problems: Vec<String>,
}

impl BenchReport {
    /// Whether every byte was right and every connection worked (lost datagrams allowed),
    /// and a rate search found a rate within its bound.
    pub fn is_clean(&self) -> bool {
        self.errors == 0
            && self.mismatches == 0
            && self.slo.as_ref().is_none_or(|s| s.best_rate.is_some())
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
        let measured = if self.window_start_unix_s.is_none() && self.agents.is_empty() {
            format!(
                "no load ran (no connection was established; {:.1} s in all)",
                self.elapsed_s
            )
        } else {
            format!(
                "{:.1} s measured after {:.1} s warmup",
                self.duration_s, self.warmup_s
            )
        };
        let _ = writeln!(
            out,
            "{}: {} conns x {} B, depth {}, {measured}, {} thread{}",
            self.endpoint,
            self.conns,
            self.size,
            self.depth,
            self.threads,
            if self.threads == 1 { "" } else { "s" }
        );
        let _ = writeln!(
            out,
            "{:>12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7} {:>10}",
            "msgs/s",
            "MB/s",
            "p50 us",
            "p90 us",
            "p99 us",
            "p99.9 us",
            "max us",
            "errors",
            "mismatches"
        );
        let l = &self.latency_us;
        let _ = writeln!(
            out,
            "{:>12.0} {:>9.2} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>7} {:>10}",
            self.msgs_per_s,
            self.bytes_per_s / 1e6,
            l.p50,
            l.p90,
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
        self.write_connect(&mut out);
        for interval in &self.intervals {
            let l = &interval.latency_us;
            let _ = writeln!(
                out,
                "interval {:>7.2}-{:<7.2} s {:>12.0} msgs/s  p50 {:>9.1}  p99 {:>9.1}  max {:>9.1} \
                 us  connects {}",
                interval.start_s,
                interval.start_s + interval.duration_s,
                interval.msgs_per_s,
                l.p50,
                l.p99,
                l.max,
                interval.connects
            );
        }
        if let Some(slo) = &self.slo {
            slo.write_table(&mut out);
        }
        for agent in &self.agents {
            let name = agent
                .agent
                .map_or_else(|| agent.file.clone(), |a| format!("agent {a}"));
            let _ = writeln!(
                out,
                "{name}: {} msgs, {:.0} msgs/s, {} errors, {} mismatches, {} lost",
                agent.msgs, agent.msgs_per_s, agent.errors, agent.mismatches, agent.lost
            );
        }
        if let Some(stopped) = &self.stopped {
            let _ = writeln!(out, "{stopped}");
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

    fn write_connect(&self, out: &mut String) {
        let c = &self.connect;
        let l = &c.latency_us;
        let churn = if c.opened > self.conns_established {
            format!(
                ", {} opened in all ({:.0} per s in the window)",
                c.opened, c.opened_per_s
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "connections established: {} of {} in {:.2} s{churn}",
            self.conns_established, self.conns, c.phase_s
        );
        if c.opened > 0 {
            let _ = writeln!(
                out,
                "connect us: p50 {:.1}, p90 {:.1}, p99 {:.1}, p99.9 {:.1}, max {:.1}",
                l.p50, l.p90, l.p99, l.p999, l.max
            );
        }
        if c.failed > 0 {
            let _ = writeln!(
                out,
                "connections failed: {} ({})",
                c.failed,
                c.errors.describe()
            );
        }
    }
}

/// The `--interval` records as reported, the last one cut at the window's end.
fn intervals(plan: &Plan, tally: &mut Tally, duration_s: f64) -> Vec<IntervalReport> {
    let Some(interval) = plan.config.interval else {
        return Vec::new();
    };
    let step = interval.as_secs_f64();
    let count = (plan.config.duration.as_secs_f64() / step).ceil() as usize;
    // Intervals with no message have no record yet: make them, so a stall shows as zeros.
    let mut records: Vec<IntervalTally> = std::mem::take(&mut tally.intervals);
    records.truncate(count);
    let mut reports = Vec::with_capacity(count);
    for index in 0..count {
        let start_s = index as f64 * step;
        if start_s >= duration_s && index > 0 {
            break;
        }
        let length = step.min(duration_s - start_s).max(0.0);
        let (msgs, connects, latency_us, histogram_ns) = match records.get(index) {
            Some(r) => (
                r.msgs,
                r.connects,
                LatencySummary::of(&r.histogram),
                encode_histogram(&r.histogram),
            ),
            None => (0, 0, LatencySummary::default(), String::new()),
        };
        reports.push(IntervalReport {
            start_s,
            duration_s: length,
            msgs,
            msgs_per_s: if length > 0.0 {
                msgs as f64 / length
            } else {
                0.0
            },
            connects,
            latency_us,
            histogram_ns,
        });
    }
    reports
}

/// The line that says which resource ran out, how many connections were open, and how to
/// get more.
fn stopped_line(plan: &Plan, resource: Exhausted, open: u64) -> String {
    match resource {
        Exhausted::Descriptors => {
            let limit = plan
                .open_file_limit
                .map_or_else(|| "unknown".to_string(), |l| l.to_string());
            format!(
                "stopped opening connections: out of file descriptors with {open} connections \
                 open (open-file limit {limit}); raise the hard limit (ulimit -Hn, \
                 /etc/security/limits.conf, LimitNOFILE= in a systemd unit) or spread the \
                 connections over more processes (--threads does not help)"
            )
        }
        Exhausted::Ports => {
            let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
                .map(|r| r.split_whitespace().collect::<Vec<_>>().join("-"))
                .unwrap_or_else(|_| "unknown".to_string());
            let sources = plan.config.sources.len().max(1);
            format!(
                "stopped opening connections: out of local ports with {open} connections open \
                 from {sources} source address(es) (ports {range} each); add source addresses \
                 with --source (for example 127.0.0.2-127.0.0.9 on loopback) or widen \
                 net.ipv4.ip_local_port_range"
            )
        }
    }
}

pub(super) fn build(plan: &Plan, mut tally: Tally, watched: &Watched) -> BenchReport {
    let config = &plan.config;
    // With no connection established the load never ran, whatever the timeline says.
    let timeline = watched.timeline.filter(|_| tally.opened > 0);
    let end_ns = watched.end_ns.unwrap_or_else(|| plan.now_ns());
    let duration_s = timeline.map_or(0.0, |t| {
        let end = end_ns.min(t.measure_until);
        end.saturating_sub(t.measure_from) as f64 / 1e9
    });
    let per_s = |count: u64| {
        if duration_s > 0.0 {
            count as f64 / duration_s
        } else {
            0.0
        }
    };
    let msgs_per_s = per_s(tally.msgs);
    let intervals = intervals(plan, &mut tally, duration_s);
    let stopped = tally
        .exhausted
        .map(|(resource, open)| stopped_line(plan, resource, open));
    BenchReport {
        endpoint: plan.endpoint.to_string(),
        agent: config.agent,
        conns: config.conns,
        conns_established: tally.established,
        size: config.size,
        depth: config.depth,
        threads: plan.threads as u32,
        warmup_s: config.warmup.as_secs_f64(),
        duration_s,
        elapsed_s: end_ns as f64 / 1e9,
        window_start_unix_s: timeline.map(|t| plan.unix_s(t.measure_from)),
        window_end_unix_s: timeline.map(|t| plan.unix_s(end_ns.min(t.measure_until))),
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
        latency_us: LatencySummary::of(&tally.histogram),
        latency_histogram_ns: encode_histogram(&tally.histogram),
        connect: ConnectSummary {
            opened: tally.opened,
            failed: tally.errors.connect_failed,
            opened_per_s: per_s(tally.opened_in_window),
            phase_s: watched.connect_phase.map_or(0.0, |d| d.as_secs_f64()),
            latency_us: LatencySummary::of(&tally.connect_histogram),
            histogram_ns: encode_histogram(&tally.connect_histogram),
            errors: tally.connect_errors,
        },
        error_detail: tally.errors,
        client_cpu_s: watched.cpu_s,
        client_cpu_us_per_msg: watched
            .cpu_s
            .filter(|_| tally.msgs > 0)
            .map(|s| s * 1e6 / tally.msgs as f64),
        intervals,
        stopped,
        slo: None,
        agents: Vec::new(),
        problems: tally.problems,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn report() -> BenchReport {
        BenchReport {
            endpoint: "tcp://127.0.0.1:7".to_string(),
            agent: None,
            conns: 2,
            conns_established: 2,
            size: 64,
            depth: 1,
            threads: 1,
            warmup_s: 1.0,
            duration_s: 10.0,
            elapsed_s: 11.5,
            window_start_unix_s: Some(1.0),
            window_end_unix_s: Some(11.0),
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
            latency_histogram_ns: String::new(),
            connect: ConnectSummary::default(),
            error_detail: ErrorDetail::default(),
            client_cpu_s: None,
            client_cpu_us_per_msg: None,
            intervals: Vec::new(),
            stopped: None,
            slo: None,
            agents: Vec::new(),
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
    fn json_reads_back() {
        let r = report();
        let back: BenchReport = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn table_shows_p90() {
        let mut r = report();
        r.latency_us.p90 = 123.4;
        let table = r.to_table();
        assert!(table.contains("p90 us"), "{table}");
        assert!(table.contains("123.4"), "{table}");
    }

    #[test]
    fn histograms_round_trip() {
        let mut h = super::super::tally::new_histogram(3).unwrap();
        for v in [1_000, 2_000, 50_000, 7_000_000] {
            h.record(v).unwrap();
        }
        let back = decode_histogram(&encode_histogram(&h)).unwrap();
        assert_eq!(back, h);
    }

    #[test]
    fn connect_errors_are_sorted_by_cause() {
        let mut errors = ConnectErrors::default();
        let emfile = io::Error::from_raw_os_error(crate::sys::errno::EMFILE);
        assert_eq!(errors.count(&emfile), Some(Exhausted::Descriptors));
        let ports = io::Error::from(io::ErrorKind::AddrNotAvailable);
        assert_eq!(errors.count(&ports), Some(Exhausted::Ports));
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(errors.count(&refused), None);
        assert_eq!(
            errors.count(&io::Error::from(io::ErrorKind::TimedOut)),
            None
        );
        assert_eq!(errors.count(&io::Error::other("odd")), None);
        assert_eq!(
            errors,
            ConnectErrors {
                refused: 1,
                timed_out: 1,
                out_of_descriptors: 1,
                out_of_ports: 1,
                other: 1
            }
        );
        assert_eq!(
            errors.describe(),
            "1 timed out, 1 refused, 1 out of descriptors, 1 out of ports, 1 other"
        );
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
