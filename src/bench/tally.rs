//! One client thread's counts, merged into the report: messages, errors by cause, and the
//! latency histograms (messages, connects, and one per `--interval`).

use super::report::{ConnectErrors, ErrorDetail};
use super::{HISTOGRAM_MAX_NS, MAX_PROBLEMS, Plan, Timeline};
use hdrhistogram::Histogram;
use std::io;

/// Significant figures of the message and connect histograms.
const SIGNIFICANT_FIGURES: u8 = 3;
/// Significant figures of each interval's histogram: a time series needs less precision,
/// and thousands of intervals must stay small.
const INTERVAL_SIGNIFICANT_FIGURES: u8 = 2;

/// A latency histogram in nanoseconds, with the bounds every report uses.
pub(super) fn new_histogram(significant_figures: u8) -> io::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, HISTOGRAM_MAX_NS, significant_figures)
        .map_err(|e| io::Error::other(format!("cannot make a histogram: {e}")))
}

/// One `--interval` record.
pub(super) struct IntervalTally {
    /// Messages completed in the interval.
    pub msgs: u64,
    /// Connections established in the interval.
    pub connects: u64,
    /// Their round-trip times, in ns.
    pub histogram: Histogram<u64>,
}

/// Why connecting stopped early: a resource ran out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Exhausted {
    /// Open-file descriptors (EMFILE, ENFILE).
    Descriptors,
    /// Local ports of the source addresses (EADDRNOTAVAIL, EADDRINUSE).
    Ports,
}

/// One thread's counts.
pub(super) struct Tally {
    /// Messages completed inside the window.
    pub msgs: u64,
    /// Connections established while connecting, before the load.
    pub established: u64,
    /// Connections established in all (reopened ones included).
    pub opened: u64,
    /// Connections established inside the measured window.
    pub opened_in_window: u64,
    pub mismatches: u64,
    pub lost: u64,
    pub late: u64,
    pub errors: ErrorDetail,
    pub connect_errors: ConnectErrors,
    pub problems: Vec<String>,
    /// Round-trip times of the window's messages, in ns.
    pub histogram: Histogram<u64>,
    /// Times from `connect` to established, in ns (every connection of the run).
    pub connect_histogram: Histogram<u64>,
    /// The window's time series (`--interval`), created as messages arrive.
    pub intervals: Vec<IntervalTally>,
    interval_ns: Option<u64>,
    /// The first resource that ran out, and how many connections were open then.
    pub exhausted: Option<(Exhausted, u64)>,
}

impl Tally {
    pub fn new(plan: &Plan) -> io::Result<Self> {
        Ok(Tally {
            msgs: 0,
            established: 0,
            opened: 0,
            opened_in_window: 0,
            mismatches: 0,
            lost: 0,
            late: 0,
            errors: ErrorDetail::default(),
            connect_errors: ConnectErrors::default(),
            problems: Vec::new(),
            histogram: new_histogram(SIGNIFICANT_FIGURES)?,
            connect_histogram: new_histogram(SIGNIFICANT_FIGURES)?,
            intervals: Vec::new(),
            interval_ns: plan.config.interval.map(|i| i.as_nanos() as u64),
            exhausted: None,
        })
    }

    pub fn merge(&mut self, other: Tally) {
        self.msgs += other.msgs;
        self.established += other.established;
        self.opened += other.opened;
        self.opened_in_window += other.opened_in_window;
        self.mismatches += other.mismatches;
        self.lost += other.lost;
        self.late += other.late;
        self.errors.add(&other.errors);
        self.connect_errors.add(&other.connect_errors);
        for problem in other.problems {
            self.note(problem);
        }
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.histogram.add(&other.histogram);
        let _ = self.connect_histogram.add(&other.connect_histogram);
        for (index, interval) in other.intervals.into_iter().enumerate() {
            if let Some(mine) = self.interval_mut(index) {
                mine.msgs += interval.msgs;
                mine.connects += interval.connects;
                let _ = mine.histogram.add(&interval.histogram);
            }
        }
        if self.exhausted.is_none() {
            self.exhausted = other.exhausted;
        }
    }

    /// Keeps the first few problem descriptions.
    pub fn note(&mut self, problem: String) {
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(problem);
        }
    }

    /// The interval record at `index`, made (with those before it) on first use.
    fn interval_mut(&mut self, index: usize) -> Option<&mut IntervalTally> {
        while self.intervals.len() <= index {
            let histogram = new_histogram(INTERVAL_SIGNIFICANT_FIGURES).ok()?;
            self.intervals.push(IntervalTally {
                msgs: 0,
                connects: 0,
                histogram,
            });
        }
        self.intervals.get_mut(index)
    }

    /// Which interval `now` falls in, if intervals are recorded and `now` is measured.
    fn interval_index(&self, timeline: &Timeline, now: u64) -> Option<usize> {
        let interval_ns = self.interval_ns?;
        timeline
            .is_measured(now)
            .then(|| ((now - timeline.measure_from) / interval_ns) as usize)
    }

    /// A message completed at `now`, `rtt_ns` after it was sent (or scheduled).
    pub fn complete(&mut self, timeline: &Timeline, now: u64, rtt_ns: u64) {
        if timeline.is_measured(now) {
            self.msgs += 1;
            self.histogram.saturating_record(rtt_ns.max(1));
            if let Some(index) = self.interval_index(timeline, now) {
                if let Some(interval) = self.interval_mut(index) {
                    interval.msgs += 1;
                    interval.histogram.saturating_record(rtt_ns.max(1));
                }
            }
        }
    }

    /// A connection was established at `now`, `connect_ns` after its `connect`; `timeline`
    /// is `None` while the load has not started.
    pub fn connected(&mut self, timeline: Option<&Timeline>, now: u64, connect_ns: u64) {
        self.opened += 1;
        self.connect_histogram.saturating_record(connect_ns.max(1));
        match timeline {
            None => self.established += 1,
            Some(timeline) => {
                if timeline.is_measured(now) {
                    self.opened_in_window += 1;
                }
                if let Some(index) = self.interval_index(timeline, now) {
                    if let Some(interval) = self.interval_mut(index) {
                        interval.connects += 1;
                    }
                }
            }
        }
    }
}
