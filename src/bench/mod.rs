//! `reverb bench`: a verifying load generator. Config in, report out; nothing printed.
//!
//! Every client thread runs its own epoll loop over its share of the connections. Each
//! connection keeps `depth` messages in flight (closed loop) or sends on a fixed schedule
//! (open loop, `rate`), and every byte that comes back is checked against what was sent at
//! that stream position (`content.rs`), so reordered, duplicated, corrupted, missing and extra
//! bytes are all caught. Round-trip times go into an HDR histogram.
//!
//! Timeline, shared by all threads: connect everything, then load for `warmup` (replies
//! verified, not counted), then the measured window of `duration` (a message counts when its
//! last byte arrives inside it), then no new sends while outstanding replies are awaited up
//! to `drain_timeout`; on a stream one still missing then is an error, a datagram is lost.
//!
//! [`run`] is the library entry point used by `reverb bench` and `reverb compare`.

mod content;
mod datagram;
mod report;
mod stream;

pub use report::{BenchReport, ErrorDetail, LatencySummary};

use crate::addr::Endpoint;
use content::Content;
use hdrhistogram::Histogram;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

/// How long replies still owed after the window are awaited (CONTRACT: "up to 5 s").
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection may take to be established.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A datagram unanswered for this long is counted lost (and its slot reused); a reply
/// arriving later is counted late.
pub const DATAGRAM_LOSS_TIMEOUT: Duration = Duration::from_secs(1);
/// Open loop: at most this many messages in flight per connection (bounded memory); past
/// it sends wait, and their latency still counts from their scheduled time.
pub const OPEN_LOOP_MAX_IN_FLIGHT: u32 = 1024;
/// The largest datagram payload (UDP's limit, used for Unix datagrams too).
pub const MAX_DATAGRAM_BYTES: usize = 65_507;
/// The largest stream message.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// At most this many problems are described in a report (all are counted).
pub const MAX_PROBLEMS: usize = 8;
/// Below this share of the target rate, the report says the rate was not reached.
pub const RATE_REACHED_SHARE: f64 = 0.95;
/// Latencies are recorded in nanoseconds up to this bound (larger ones saturate).
const HISTOGRAM_MAX_NS: u64 = 3_600_000_000_000;

/// What to run. [`Default`] is the contract's defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct BenchConfig {
    /// Connections (for datagrams: sockets, each with its own port or path).
    pub conns: u32,
    /// Bytes per message.
    pub size: usize,
    /// Messages in flight per connection (closed loop).
    pub depth: u32,
    /// The measured window.
    pub duration: Duration,
    /// Load before the window: verified, not counted.
    pub warmup: Duration,
    /// Open loop: total messages per second over all connections.
    pub rate: Option<f64>,
    /// Client threads, each with its own event loop.
    pub threads: u32,
    /// How long outstanding replies are awaited after the window.
    pub drain_timeout: Duration,
    /// How long connecting may take.
    pub connect_timeout: Duration,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            conns: 10,
            size: 64,
            depth: 1,
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(1),
            rate: None,
            threads: 1,
            drain_timeout: DRAIN_TIMEOUT,
            connect_timeout: CONNECT_TIMEOUT,
        }
    }
}

/// Why a configuration cannot run.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{0}")]
pub struct ConfigError(String);

impl BenchConfig {
    /// Checks the values against each other and against the endpoint's transport.
    ///
    /// # Errors
    ///
    /// Zero connections, threads or depth; a size of 0 or above [`MAX_MESSAGE_BYTES`]; a
    /// datagram size below 8 (a datagram carries its number) or above
    /// [`MAX_DATAGRAM_BYTES`]; a rate that is not a positive number; a zero duration.
    pub fn validate(&self, endpoint: &Endpoint) -> Result<(), ConfigError> {
        let fail = |message: String| Err(ConfigError(message));
        if self.conns == 0 || self.conns > 1_000_000 {
            return fail(format!("--conns must be 1 to 1000000, not {}", self.conns));
        }
        if self.threads == 0 {
            return fail("--threads must be at least 1".to_string());
        }
        if self.depth == 0 || self.depth > 65_536 {
            return fail(format!("--depth must be 1 to 65536, not {}", self.depth));
        }
        if self.size == 0 || self.size > MAX_MESSAGE_BYTES {
            return fail(format!(
                "--size must be 1 to {MAX_MESSAGE_BYTES} bytes, not {}",
                self.size
            ));
        }
        if endpoint.is_datagram()
            && !(content::DATAGRAM_HEADER_BYTES..=MAX_DATAGRAM_BYTES).contains(&self.size)
        {
            return fail(format!(
                "--size must be {} to {MAX_DATAGRAM_BYTES} bytes for datagrams (each carries its \
                 sequence number), not {}",
                content::DATAGRAM_HEADER_BYTES,
                self.size
            ));
        }
        if let Some(rate) = self.rate {
            if !(rate.is_finite() && rate > 0.0) {
                return fail(format!("--rate must be a positive number, not {rate}"));
            }
        }
        if self.duration.is_zero() {
            return fail("--duration must be more than 0 seconds".to_string());
        }
        Ok(())
    }

    /// Messages a connection may have in flight: `depth`, or the open loop's bound.
    fn window(&self) -> u32 {
        match self.rate {
            Some(_) => self.depth.max(OPEN_LOOP_MAX_IN_FLIGHT),
            None => self.depth,
        }
    }
}

/// Where a run is, for a progress display.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Loading before the window.
    Warmup,
    /// Inside the measured window.
    Measuring,
    /// After the window, awaiting outstanding replies.
    Draining,
}

/// A progress snapshot, given to the callback of [`run_with_progress`] about ten times a
/// second.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    /// The current phase.
    pub phase: Phase,
    /// Time since the load started.
    pub elapsed: Duration,
    /// Warmup plus duration: when the window ends.
    pub total: Duration,
    /// Verified messages so far, warmup included.
    pub verified: u64,
}

/// How often the progress callback of [`run_with_progress`] is called.
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// Runs the benchmark against `endpoint` and returns its report.
///
/// Connection failures, resets and wrong bytes are not errors here: they are counted in the
/// report (see [`BenchReport::exit_code`]). Each connection is a descriptor: a caller that
/// opens many should raise its open-file limit first (`sys::raise_open_file_limit`).
///
/// # Errors
///
/// An invalid config (`InvalidInput`), or a failure to set the client up (epoll, threads).
pub fn run(endpoint: &Endpoint, config: &BenchConfig) -> io::Result<BenchReport> {
    run_with_progress(endpoint, config, |_| {})
}

/// [`run`], calling `progress` from the calling thread about every
/// [`PROGRESS_INTERVAL`] while the load runs.
///
/// # Errors
///
/// As [`run`].
pub fn run_with_progress(
    endpoint: &Endpoint,
    config: &BenchConfig,
    mut progress: impl FnMut(Progress),
) -> io::Result<BenchReport> {
    config
        .validate(endpoint)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let threads = config.threads.min(config.conns) as usize;
    let plan = Plan {
        endpoint: endpoint.clone(),
        config: config.clone(),
        content: Content::new(config.size),
        base: Instant::now(),
        gate: StartGate::default(),
        verified: AtomicU64::new(0),
    };
    let (results, cpu) = thread::scope(|scope| {
        let mut handles = Vec::with_capacity(threads);
        for index in 0..threads {
            let ids: Vec<u32> = (0..config.conns)
                .filter(|id| *id as usize % threads == index)
                .collect();
            let plan = &plan;
            let spawned = thread::Builder::new()
                .name(format!("bench-{index}"))
                .spawn_scoped(scope, move || {
                    if plan.endpoint.is_datagram() {
                        datagram::run_worker(plan, &ids)
                    } else {
                        stream::run_worker(plan, &ids)
                    }
                });
            match spawned {
                Ok(handle) => handles.push(handle),
                Err(e) => {
                    // The threads already started are waiting at the gate: send them home.
                    plan.gate.abort();
                    for handle in handles {
                        let _ = handle.join();
                    }
                    return (vec![Err(e)], CpuWindow::default());
                }
            }
        }
        let timeline = plan.timeline(plan.gate.open(threads, || plan.now_ns()));
        let cpu = watch(&plan, &timeline, &handles, &mut progress);
        let results = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(io::Error::other("a bench thread panicked")))
            })
            .collect::<Vec<_>>();
        (results, cpu)
    });
    let mut total = Tally::new()?;
    for result in results {
        total.merge(result?);
    }
    Ok(report::build(&plan, total, cpu))
}

/// While the workers run: report progress and take CPU snapshots at the window's edges.
fn watch<T>(
    plan: &Plan,
    timeline: &Timeline,
    handles: &[thread::ScopedJoinHandle<'_, T>],
    progress: &mut impl FnMut(Progress),
) -> CpuWindow {
    // Each snapshot is taken once (`Some`), even if reading the CPU time failed (`Some(None)`).
    let mut at_start: Option<Option<Duration>> = None;
    let mut window_cpu: Option<Option<f64>> = None;
    let total = Duration::from_nanos(timeline.measure_until - timeline.start);
    loop {
        let now = plan.now_ns();
        if at_start.is_none() && now >= timeline.measure_from {
            at_start = Some(crate::sys::rusage::process_cpu_time().ok());
        }
        if window_cpu.is_none() && now >= timeline.measure_until {
            let at_end = crate::sys::rusage::process_cpu_time().ok();
            let used = at_start
                .flatten()
                .zip(at_end)
                .map(|(a, b)| b.saturating_sub(a));
            window_cpu = Some(used.map(|d| d.as_secs_f64()));
        }
        if handles.iter().all(|h| h.is_finished()) {
            return CpuWindow {
                seconds: window_cpu.flatten(),
            };
        }
        let phase = if now < timeline.measure_from {
            Phase::Warmup
        } else if now < timeline.measure_until {
            Phase::Measuring
        } else {
            Phase::Draining
        };
        progress(Progress {
            phase,
            elapsed: Duration::from_nanos(now.saturating_sub(timeline.start)),
            total,
            verified: plan.verified.load(Ordering::Relaxed),
        });
        // Wake at the next window edge if it is nearer than the next progress tick.
        let mut sleep = PROGRESS_INTERVAL;
        for edge in [timeline.measure_from, timeline.measure_until] {
            if edge > now {
                sleep = sleep.min(Duration::from_nanos(edge - now));
            }
        }
        thread::sleep(sleep);
    }
}

/// The client's own CPU time over the measured window (this process, all threads).
#[derive(Clone, Copy, Debug, Default)]
struct CpuWindow {
    seconds: Option<f64>,
}

/// What every client thread shares.
struct Plan {
    endpoint: Endpoint,
    config: BenchConfig,
    content: Content,
    /// The zero of every `*_ns` time in the run.
    base: Instant,
    /// Everyone connects first; the load starts when all are through.
    gate: StartGate,
    /// Verified messages so far (for progress only; updated in batches).
    verified: AtomicU64,
}

/// The run's phase edges, in ns since [`Plan::base`].
#[derive(Clone, Copy, Debug)]
struct Timeline {
    start: u64,
    measure_from: u64,
    measure_until: u64,
    drain_until: u64,
}

/// The longest epoll wait, so phase edges are noticed promptly.
const MAX_WAIT: Duration = Duration::from_millis(100);
/// How often a client thread adds its verified count to the shared progress counter.
const PUBLISH_EVERY_NS: u64 = 50_000_000;
impl Timeline {
    /// How long a client loop may wait in epoll at `now`: until the next phase edge or
    /// open-loop send (`next_due`), at most [`MAX_WAIT`].
    fn wait_timeout(&self, now: u64, next_due: u64) -> Duration {
        let edge = [
            self.measure_from,
            self.measure_until,
            self.drain_until,
            next_due,
        ]
        .into_iter()
        .filter(|&t| t > now)
        .min()
        .unwrap_or(now);
        Duration::from_nanos(edge - now).min(MAX_WAIT)
    }

    /// Whether new messages may still be sent at `now`.
    fn is_sending(&self, now: u64) -> bool {
        now < self.measure_until
    }

    /// Whether a message completed at `now` is counted.
    fn is_measured(&self, now: u64) -> bool {
        now >= self.measure_from && now < self.measure_until
    }
}

impl Plan {
    /// A client thread's epoll and counters. When they cannot be made, the thread still
    /// arrives at the start gate, so the other threads are not held there.
    fn prepare_worker(&self) -> io::Result<(crate::sys::epoll::Epoll, Tally)> {
        let setup = crate::sys::epoll::Epoll::new().and_then(|epoll| Ok((epoll, Tally::new()?)));
        if setup.is_err() {
            let _ = self.gate.arrive_and_wait();
        }
        setup
    }

    fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    /// The shared timeline of a load that started at `start` (ns since `base`).
    fn timeline(&self, start: u64) -> Timeline {
        let measure_from = start + self.config.warmup.as_nanos() as u64;
        let measure_until = measure_from + self.config.duration.as_nanos() as u64;
        Timeline {
            start,
            measure_from,
            measure_until,
            drain_until: measure_until + self.config.drain_timeout.as_nanos() as u64,
        }
    }

    /// Open loop: when message `message` of connection `connection` is due. Connections are
    /// staggered evenly across one interval so the total rate is smooth.
    fn scheduled_ns(&self, timeline: &Timeline, connection: u32, message: u64) -> Option<u64> {
        let rate = self.config.rate?;
        let conns = f64::from(self.config.conns);
        let interval_ns = conns * 1e9 / rate;
        let slot = f64::from(connection) / conns + message as f64;
        Some(timeline.start + (slot * interval_ns) as u64)
    }
}

/// One thread's counts, merged into the report.
struct Tally {
    /// Messages completed inside the window.
    msgs: u64,
    /// Connections established.
    established: u64,
    mismatches: u64,
    lost: u64,
    late: u64,
    errors: ErrorDetail,
    problems: Vec<String>,
    /// Round-trip times of the window's messages, in ns.
    histogram: Histogram<u64>,
}

impl Tally {
    fn new() -> io::Result<Self> {
        let histogram = Histogram::new_with_bounds(1, HISTOGRAM_MAX_NS, 3)
            .map_err(|e| io::Error::other(format!("cannot make a histogram: {e}")))?;
        Ok(Tally {
            msgs: 0,
            established: 0,
            mismatches: 0,
            lost: 0,
            late: 0,
            errors: ErrorDetail::default(),
            problems: Vec::new(),
            histogram,
        })
    }

    fn merge(&mut self, other: Tally) {
        self.msgs += other.msgs;
        self.established += other.established;
        self.mismatches += other.mismatches;
        self.lost += other.lost;
        self.late += other.late;
        self.errors.add(&other.errors);
        for problem in other.problems {
            self.note(problem);
        }
        // Both histograms have the same bounds, so adding cannot fail.
        let _ = self.histogram.add(&other.histogram);
    }

    /// Keeps the first few problem descriptions.
    fn note(&mut self, problem: String) {
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(problem);
        }
    }

    /// A message completed at `now`, `rtt_ns` after it was sent (or scheduled).
    fn complete(&mut self, timeline: &Timeline, now: u64, rtt_ns: u64) {
        if timeline.is_measured(now) {
            self.msgs += 1;
            self.histogram.saturating_record(rtt_ns.max(1));
        }
    }
}

/// Holds every client thread until all have connected, so the load starts at once.
#[derive(Default)]
struct StartGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default)]
struct GateState {
    arrived: usize,
    start_ns: Option<u64>,
    is_aborted: bool,
}

impl StartGate {
    /// A worker is connected; returns the start time, or `None` if the run was aborted.
    fn arrive_and_wait(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.arrived += 1;
        self.changed.notify_all();
        loop {
            if state.is_aborted {
                return None;
            }
            if let Some(start) = state.start_ns {
                return Some(start);
            }
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Waits until `workers` have arrived, then starts the load now.
    fn open(&self, workers: usize, now: impl Fn() -> u64) -> u64 {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        while state.arrived < workers {
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        let start = now();
        state.start_ns = Some(start);
        self.changed.notify_all();
        start
    }

    fn abort(&self) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.is_aborted = true;
        self.changed.notify_all();
    }
}

/// Page alignment for I/O buffers.
const PAGE_BYTES: usize = 4096;

/// A byte buffer whose usable part starts on a page boundary.
///
/// The kernel copies socket data with `rep movsb`, which is markedly slower when the
/// destination is not cache-line aligned, and a large `Vec` from malloc starts 16 bytes
/// into a page. Measured here, 1 KiB echoes at depth 8: 1.54 µs of client CPU per message
/// into a malloc'd buffer, 1.10 µs into an aligned one (echoload: 1.07 µs).
struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let storage = vec![0; len + PAGE_BYTES];
        let address = storage.as_ptr() as usize;
        let start = (PAGE_BYTES - address % PAGE_BYTES) % PAGE_BYTES;
        AlignedBuf {
            storage,
            start,
            len,
        }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// A worker's connection `index` as an epoll token: workers keep connections in a plain
/// vector, so their tokens are reserved ones (no slab generation).
fn index_u32(index: usize) -> u32 {
    u32::try_from(index).expect("fewer than 2^32 connections per worker")
}

/// The connection index a token from [`index_u32`] names.
fn index_of(token: crate::slab::Token) -> usize {
    token.reserved_index().unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    /// A plain echo server on a free port, a thread per connection.
    fn echo_server() -> Endpoint {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                thread::spawn(move || {
                    let mut buf = [0; 4096];
                    while let Ok(n @ 1..) = stream.read(&mut buf) {
                        if stream.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Endpoint::Tcp(addr)
    }

    #[test]
    fn library_run_reports_and_calls_progress() {
        let config = BenchConfig {
            conns: 3,
            size: 100,
            depth: 2,
            duration: Duration::from_millis(300),
            warmup: Duration::from_millis(100),
            threads: 2,
            ..BenchConfig::default()
        };
        let mut phases = Vec::new();
        let report =
            run_with_progress(&echo_server(), &config, |p| phases.push(p.phase)).expect("run");
        assert!(report.is_clean(), "{report:?}");
        assert!(report.msgs > 0);
        assert_eq!(report.conns_established, 3);
        assert_eq!(report.threads, 2);
        assert!(report.latency_us.p50 > 0.0);
        assert!(report.latency_us.p50 <= report.latency_us.p99);
        assert!(report.client_cpu_s.is_some());
        assert!(phases.contains(&Phase::Warmup) && phases.contains(&Phase::Measuring));
    }

    #[test]
    fn invalid_configs_are_rejected() {
        let udp = Endpoint::Udp("127.0.0.1:9".parse().expect("addr"));
        let small = BenchConfig {
            size: 4,
            ..BenchConfig::default()
        };
        assert!(small.validate(&udp).is_err());
        let error = run(&udp, &small).expect_err("size 4 on udp");
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        let tcp = Endpoint::Tcp("127.0.0.1:9".parse().expect("addr"));
        assert!(small.validate(&tcp).is_ok());
        for bad in [
            BenchConfig {
                conns: 0,
                ..BenchConfig::default()
            },
            BenchConfig {
                depth: 0,
                ..BenchConfig::default()
            },
            BenchConfig {
                rate: Some(-1.0),
                ..BenchConfig::default()
            },
        ] {
            assert!(bad.validate(&tcp).is_err());
        }
    }
}
