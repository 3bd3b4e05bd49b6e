//! `reverb bench merge FILE...`: one report from the `--json` reports of several agents.
//!
//! Counts are summed and histograms merged, so the merged percentiles are those of one
//! histogram fed every agent's samples. Rates are summed over the agents (each agent's
//! rate over its own window); the merged window is the common one, the span in which every
//! agent was measuring, and agents whose windows do not overlap are named. Errors,
//! mismatches and problems are kept per agent.

use super::report::encode_histogram;
use super::report::{AgentSummary, BenchReport, IntervalReport, LatencySummary, decode_histogram};
use super::{ConnectSummary, MAX_PROBLEMS};
use std::path::{Path, PathBuf};

/// Why reports cannot be merged.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    /// A file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file is not a bench report.
    #[error("{path} is not a reverb bench --json report: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Reports of different message sizes measure different things.
    #[error("{path} has --size {size}, the first report {first}: merge runs of one size")]
    SizeDiffers {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: usize,
        /// The first report's size.
        first: usize,
    },
}

/// Reads `paths` and merges their reports.
///
/// # Errors
///
/// A file that cannot be read or is not a report (or has a histogram that cannot be
/// decoded), or reports of different message sizes.
pub fn merge(paths: &[PathBuf]) -> Result<BenchReport, MergeError> {
    let mut reports = Vec::with_capacity(paths.len());
    for path in paths {
        let text = std::fs::read_to_string(path).map_err(|source| MergeError::Read {
            path: path.clone(),
            source,
        })?;
        let report: BenchReport =
            serde_json::from_str(text.trim()).map_err(|e| MergeError::Invalid {
                path: path.clone(),
                message: e.to_string(),
            })?;
        reports.push((path.as_path(), report));
    }
    merge_reports(&reports)
}

fn invalid(path: &Path, message: String) -> MergeError {
    MergeError::Invalid {
        path: path.to_path_buf(),
        message,
    }
}

fn merge_reports(reports: &[(&Path, BenchReport)]) -> Result<BenchReport, MergeError> {
    let Some((_, first)) = reports.first() else {
        return Err(invalid(Path::new("(none)"), "no report given".to_string()));
    };
    let mut merged = first.clone();
    let mut histogram = decode_histogram(&first.latency_histogram_ns)
        .map_err(|e| invalid(reports[0].0, e.to_string()))?;
    let mut connect_histogram = decode_histogram(&first.connect.histogram_ns).ok();
    let mut interval_histograms = Vec::new();
    for interval in &first.intervals {
        interval_histograms.push(decode_histogram(&interval.histogram_ns).ok());
    }
    let mut endpoints = vec![first.endpoint.clone()];
    merged.agents = vec![agent_summary(reports[0].0, first)];
    merged.problems = Vec::new();
    merged.agent = None;
    for (path, report) in &reports[1..] {
        if report.size != first.size {
            return Err(MergeError::SizeDiffers {
                path: path.to_path_buf(),
                size: report.size,
                first: first.size,
            });
        }
        let other = decode_histogram(&report.latency_histogram_ns)
            .map_err(|e| invalid(path, e.to_string()))?;
        histogram
            .add(&other)
            .map_err(|e| invalid(path, format!("histogram cannot be merged: {e:?}")))?;
        connect_histogram = match (
            connect_histogram,
            decode_histogram(&report.connect.histogram_ns),
        ) {
            (Some(mut mine), Ok(theirs)) => mine.add(&theirs).ok().map(|()| mine),
            _ => None,
        };
        if !endpoints.contains(&report.endpoint) {
            endpoints.push(report.endpoint.clone());
        }
        merged.conns += report.conns;
        merged.conns_established += report.conns_established;
        merged.threads += report.threads;
        merged.elapsed_s = merged.elapsed_s.max(report.elapsed_s);
        merged.window_start_unix_s = later(merged.window_start_unix_s, report.window_start_unix_s);
        merged.window_end_unix_s = earlier(merged.window_end_unix_s, report.window_end_unix_s);
        merged.rate = merged.rate.zip(report.rate).map(|(a, b)| a + b);
        merged.rate_reached = merged
            .rate_reached
            .zip(report.rate_reached)
            .map(|(a, b)| a && b);
        merged.msgs += report.msgs;
        merged.msgs_per_s += report.msgs_per_s;
        merged.bytes_per_s += report.bytes_per_s;
        merged.errors += report.errors;
        merged.mismatches += report.mismatches;
        merged.lost += report.lost;
        merged.late += report.late;
        merged.error_detail.add(&report.error_detail);
        add_connect(&mut merged.connect, &report.connect);
        merged.client_cpu_s = merged
            .client_cpu_s
            .zip(report.client_cpu_s)
            .map(|(a, b)| a + b);
        if merged.stopped.is_none() {
            merged.stopped.clone_from(&report.stopped);
        }
        for (index, interval) in report.intervals.iter().enumerate() {
            match merged.intervals.get_mut(index) {
                Some(mine) => {
                    mine.msgs += interval.msgs;
                    mine.msgs_per_s += interval.msgs_per_s;
                    mine.connects += interval.connects;
                    let theirs = decode_histogram(&interval.histogram_ns).ok();
                    let slot = &mut interval_histograms[index];
                    *slot = match (slot.take(), theirs) {
                        (Some(mut a), Some(b)) => a.add(&b).ok().map(|()| a),
                        (a, b) => a.or(b),
                    };
                }
                None => {
                    merged.intervals.push(interval.clone());
                    interval_histograms.push(decode_histogram(&interval.histogram_ns).ok());
                }
            }
        }
        merged.agents.push(agent_summary(path, report));
    }
    merged.endpoint = endpoints.join(",");
    merged.latency_us = LatencySummary::of(&histogram);
    merged.latency_histogram_ns = encode_histogram(&histogram);
    if let Some(h) = connect_histogram {
        merged.connect.latency_us = LatencySummary::of(&h);
        merged.connect.histogram_ns = encode_histogram(&h);
    }
    for (interval, h) in merged.intervals.iter_mut().zip(&interval_histograms) {
        set_interval_histogram(interval, h.as_ref());
    }
    merged.duration_s = match (merged.window_start_unix_s, merged.window_end_unix_s) {
        (Some(start), Some(end)) => (end - start).max(0.0),
        _ => 0.0,
    };
    merged.client_cpu_us_per_msg = merged
        .client_cpu_s
        .filter(|_| merged.msgs > 0)
        .map(|s| s * 1e6 / merged.msgs as f64);
    for agent in &merged.agents {
        for problem in &agent.problems {
            if merged.problems.len() < MAX_PROBLEMS {
                let name = agent
                    .agent
                    .map_or_else(|| agent.file.clone(), |a| format!("agent {a}"));
                merged.problems.push(format!("{name}: {problem}"));
            }
        }
    }
    if merged.duration_s == 0.0 && reports.len() > 1 {
        merged.problems.insert(
            0,
            "the agents' measured windows do not overlap (start them together with \
             --start-at)"
                .to_string(),
        );
    }
    Ok(merged)
}

fn set_interval_histogram(
    interval: &mut IntervalReport,
    histogram: Option<&hdrhistogram::Histogram<u64>>,
) {
    if let Some(h) = histogram {
        interval.latency_us = LatencySummary::of(h);
        interval.histogram_ns = encode_histogram(h);
    }
}

fn add_connect(mine: &mut ConnectSummary, theirs: &ConnectSummary) {
    mine.opened += theirs.opened;
    mine.failed += theirs.failed;
    mine.opened_per_s += theirs.opened_per_s;
    mine.phase_s = mine.phase_s.max(theirs.phase_s);
    mine.errors.add(&theirs.errors);
}

fn later(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    a.zip(b).map(|(a, b)| a.max(b))
}

fn earlier(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    a.zip(b).map(|(a, b)| a.min(b))
}

fn agent_summary(path: &Path, report: &BenchReport) -> AgentSummary {
    AgentSummary {
        agent: report.agent,
        file: path.display().to_string(),
        endpoint: report.endpoint.clone(),
        msgs: report.msgs,
        msgs_per_s: report.msgs_per_s,
        errors: report.errors,
        mismatches: report.mismatches,
        lost: report.lost,
        window_start_unix_s: report.window_start_unix_s,
        window_end_unix_s: report.window_end_unix_s,
        problems: report.problems.clone(),
    }
}
