//! `--slo pNN=TIME`: the highest open-loop rate whose latency percentile stays within a
//! bound (tcpkali's `@latency` search, with bounds on the steps).
//!
//! Each step is a whole open-loop run at one rate. The rate is multiplied by [`GROWTH`]
//! from the starting rate (`--rate`, or [`START_RATE`]) until a step fails (and divided by
//! it while none has passed), then the search halves the interval between the best passing
//! and the lowest failing rate until they are within [`PRECISION`] of each other; it never
//! runs more than [`MAX_STEPS`] steps. Growing by 4 rather than 2 leaves steps for the
//! halving: from 1000 msgs/s the bracket around 1 M msgs/s is found in 6 steps, and 6 more
//! narrow it to a few per cent. A step passes
//! when the percentile is within the bound, the target rate was reached, and no byte,
//! connection or datagram was wrong, failed or lost.

use super::{BenchConfig, BenchReport, LatencySummary, report::decode_histogram, run};
use crate::addr::Endpoint;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::io;
use std::time::Duration;

/// The first rate tried without `--rate`, in messages per second.
pub const START_RATE: f64 = 1000.0;
/// The factor between steps until the bound is bracketed.
pub const GROWTH: f64 = 4.0;
/// At most this many steps per search.
pub const MAX_STEPS: usize = 12;
/// The search stops when the lowest failing rate is within this share above the best
/// passing one.
pub const PRECISION: f64 = 0.05;
/// The search stops below this rate (messages per second).
const MIN_RATE: f64 = 1.0;

/// A latency bound: `percentile` of the round-trip times stays at or below `bound`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Slo {
    /// 0 to 100 (exclusive of 0).
    pub percentile: f64,
    /// The bound.
    pub bound: Duration,
}

impl std::str::FromStr for Slo {
    type Err = String;

    /// Parses `pNN=TIME`: `p99=1ms`, `p99.9=500us`, `p999=2ms` (99.9), `p50=100us`; TIME
    /// takes the unit `ns`, `us`, `ms` or `s`.
    fn from_str(text: &str) -> Result<Self, String> {
        let expected = "expected pNN=TIME, such as p99=1ms or p99.9=500us (units ns, us, ms, s)";
        let (name, time) = text
            .split_once('=')
            .ok_or_else(|| format!("{text:?}: {expected}"))?;
        let digits = name
            .strip_prefix('p')
            .ok_or_else(|| format!("{name:?} is not a percentile; {expected}"))?;
        let mut percentile: f64 = digits
            .parse()
            .map_err(|_| format!("{name:?} is not a percentile; {expected}"))?;
        // p999 and p9999 are the usual names of 99.9 and 99.99.
        if !digits.contains('.') && digits.len() > 2 && digits.starts_with("99") {
            percentile /= 10f64.powi(digits.len() as i32 - 2);
        }
        if !(percentile > 0.0 && percentile <= 100.0) {
            return Err(format!(
                "{name:?}: the percentile must be above 0 and at most 100"
            ));
        }
        let split = time
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("{time:?} has no unit; {expected}"))?;
        let (number, unit) = time.split_at(split);
        let number: f64 = number
            .parse()
            .map_err(|_| format!("{time:?} is not a time; {expected}"))?;
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            _ => return Err(format!("{time:?}: unknown unit {unit:?}; {expected}")),
        };
        let bound = Duration::try_from_secs_f64(number * scale)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| format!("{time:?} must be a positive time"))?;
        Ok(Slo { percentile, bound })
    }
}

/// One step of the search.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SloStep {
    /// The target rate, messages per second.
    pub rate: f64,
    /// The completed rate.
    pub msgs_per_s: f64,
    /// The bounded percentile at this rate, in µs.
    pub latency_us: f64,
    /// All the step's percentiles, in µs.
    pub latency: LatencySummary,
    /// Whether the step met the bound (and lost, broke and failed nothing).
    pub passed: bool,
    /// Why it failed, when it did.
    pub reason: Option<String>,
}

/// The search: the bound, every step, and the answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SloReport {
    /// The bounded percentile.
    pub percentile: f64,
    /// The bound, in µs.
    pub bound_us: f64,
    /// The steps in the order they ran.
    pub steps: Vec<SloStep>,
    /// The highest passing rate, messages per second (`None`: no rate passed).
    pub best_rate: Option<f64>,
}

impl SloReport {
    pub(super) fn write_table(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "rate search: p{} <= {:.1} us",
            self.percentile, self.bound_us
        );
        for (number, step) in self.steps.iter().enumerate() {
            let _ = writeln!(
                out,
                "  step {:>2}: rate {:>10.0} msgs/s, got {:>10.0} msgs/s, p{} {:>9.1} us: {}",
                number + 1,
                step.rate,
                step.msgs_per_s,
                self.percentile,
                step.latency_us,
                match &step.reason {
                    None => "pass".to_string(),
                    Some(reason) => format!("fail ({reason})"),
                }
            );
        }
        match self.best_rate {
            Some(rate) => {
                let _ = writeln!(out, "highest rate within the bound: {rate:.0} msgs/s");
            }
            None => {
                let _ = writeln!(out, "no rate tried met the bound");
            }
        }
    }
}

/// Why a step's report fails the bound, if it does.
fn judge(report: &BenchReport, slo: &Slo, at_percentile_us: f64) -> Option<String> {
    let bound_us = slo.bound.as_secs_f64() * 1e6;
    if report.mismatches > 0 {
        return Some(format!("{} wrong", report.mismatches));
    }
    if report.errors > 0 {
        return Some(format!("{} errors", report.errors));
    }
    if report.lost > 0 {
        return Some(format!("{} lost", report.lost));
    }
    if report.rate_reached == Some(false) {
        return Some("rate not reached".to_string());
    }
    if at_percentile_us > bound_us {
        return Some(format!("p{} above the bound", slo.percentile));
    }
    None
}

/// Runs the search against `endpoint` with `config` (its `rate` is the first step's) and
/// returns the report of the best passing step (or of the last step, if none passed) with
/// the search attached; `on_step` sees each step as it ends.
///
/// # Errors
///
/// As [`run`].
pub fn search_rate(
    endpoint: &Endpoint,
    config: &BenchConfig,
    slo: &Slo,
    mut on_step: impl FnMut(&SloStep),
) -> io::Result<BenchReport> {
    let mut search = SloReport {
        percentile: slo.percentile,
        bound_us: slo.bound.as_secs_f64() * 1e6,
        steps: Vec::new(),
        best_rate: None,
    };
    let mut rate = config.rate.unwrap_or(START_RATE);
    let mut best: Option<(f64, BenchReport)> = None;
    let mut lowest_failing: Option<f64> = None;
    let mut last = None;
    for _ in 0..MAX_STEPS {
        let step_config = BenchConfig {
            rate: Some(rate),
            ..config.clone()
        };
        let report = run(endpoint, &step_config)?;
        let histogram = decode_histogram(&report.latency_histogram_ns)?;
        let at_percentile_us = LatencySummary::percentile_us(&histogram, slo.percentile);
        let reason = judge(&report, slo, at_percentile_us);
        let step = SloStep {
            rate,
            msgs_per_s: report.msgs_per_s,
            latency_us: at_percentile_us,
            latency: report.latency_us,
            passed: reason.is_none(),
            reason,
        };
        on_step(&step);
        let passed = step.passed;
        search.steps.push(step);
        if passed {
            if best.as_ref().is_none_or(|(b, _)| rate > *b) {
                best = Some((rate, report));
            } else {
                last = Some(report);
            }
        } else {
            lowest_failing = Some(lowest_failing.map_or(rate, |f: f64| f.min(rate)));
            last = Some(report);
        }
        let next = match (best.as_ref().map(|(b, _)| *b), lowest_failing) {
            (Some(b), Some(f)) if f <= b * (1.0 + PRECISION) => break,
            (Some(b), Some(f)) => (b + f) / 2.0,
            (Some(b), None) => b * GROWTH,
            (None, Some(f)) => f / GROWTH,
            (None, None) => rate * GROWTH,
        };
        if next < MIN_RATE {
            break;
        }
        rate = next;
    }
    search.best_rate = best.as_ref().map(|(b, _)| *b);
    let mut report = match (best, last) {
        (Some((_, report)), _) | (None, Some(report)) => report,
        (None, None) => return Err(io::Error::other("the rate search ran no step")),
    };
    report.slo = Some(search);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bounds() {
        let slo: Slo = "p99=1ms".parse().unwrap();
        assert_eq!(slo.percentile, 99.0);
        assert_eq!(slo.bound, Duration::from_millis(1));
        let slo: Slo = "p999=250us".parse().unwrap();
        assert!((slo.percentile - 99.9).abs() < 1e-9);
        assert_eq!(slo.bound, Duration::from_micros(250));
        let slo: Slo = "p99.99=1.5s".parse().unwrap();
        assert!((slo.percentile - 99.99).abs() < 1e-9);
        for bad in [
            "99=1ms",
            "p99",
            "p99=1",
            "p99=1 parsec",
            "p0=1ms",
            "p101=1ms",
            "p99=0ms",
        ] {
            assert!(bad.parse::<Slo>().is_err(), "{bad}");
        }
    }
}
