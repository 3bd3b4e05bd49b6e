//! Measuring one model: its idle cost, one bench point per connection count, and the probes
//! that find what it cannot do. Every phase is bounded in time.

use super::child::{Server, Stopped};
use super::pinning::Pinning;
use super::render::{HUNG, describe_limits, describe_point};
use super::{
    CompareConfig, DESCRIPTOR_PROBE_WAIT, IDLE_CONNS, IDLE_WINDOW, ModelResult, POINT_GRACE,
    PROBE_WAIT, Point, Progress, Tracker, probe, proc,
};
use crate::addr::Endpoint;
use crate::bench::{self, Phase};
use crate::models::Model;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// Measures one model; `Err` is why it could not be measured at all.
pub(super) fn measure_model<F: FnMut(&Progress)>(
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
