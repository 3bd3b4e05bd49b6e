//! The connect phase under load: a listener that accepts slowly, thousands of connections,
//! the machine's cores kept busy; every handshake that completed must be counted, each
//! connection's deadline runs from its own connect, and failures are counted by cause.

use super::{REVERB, reverb};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

/// An echo listener that accepts one connection per `pace` and echoes on a tokio runtime;
/// it counts what it accepted.
struct SlowListener {
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    /// Accept as fast as possible from now on (to count what is left in the queue).
    is_hurried: Arc<AtomicBool>,
    is_stopped: Arc<AtomicBool>,
    last_accept: Arc<std::sync::Mutex<Instant>>,
}

impl SlowListener {
    fn start(pace: Duration, backlog: i32, is_echoing: bool) -> SlowListener {
        let _ = reverb::sys::raise_open_file_limit();
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        socket
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .expect("bind");
        socket.listen(backlog).expect("listen");
        let listener: TcpListener = socket.into();
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicU64::new(0));
        let is_hurried = Arc::new(AtomicBool::new(false));
        let is_stopped = Arc::new(AtomicBool::new(false));
        let last_accept = Arc::new(std::sync::Mutex::new(Instant::now()));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let (counter, hurried, stopped, last) = (
            accepted.clone(),
            is_hurried.clone(),
            is_stopped.clone(),
            last_accept.clone(),
        );
        thread::spawn(move || {
            let mut held = Vec::new();
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        counter.fetch_add(1, Ordering::Relaxed);
                        *last.lock().expect("lock") = Instant::now();
                        if is_echoing {
                            let _ = stream.set_nonblocking(true);
                            runtime.spawn(async move {
                                let Ok(stream) = tokio::net::TcpStream::from_std(stream) else {
                                    return;
                                };
                                let (mut reader, mut writer) = stream.into_split();
                                let _ = tokio::io::copy(&mut reader, &mut writer).await;
                                let _ = writer.shutdown().await;
                            });
                        } else {
                            held.push(stream);
                        }
                        if !hurried.load(Ordering::Relaxed) {
                            thread::sleep(pace);
                        }
                    }
                    Err(_) => thread::sleep(Duration::from_micros(200)),
                }
            }
            runtime.shutdown_background();
        });
        SlowListener {
            addr,
            accepted,
            is_hurried,
            is_stopped,
            last_accept,
        }
    }

    /// Accepts what is still queued and returns how many connections were accepted in all,
    /// once `expected` were, or nothing more came for a while. A handshake whose last ACK
    /// found the queue full completes on the server only when the kernel retransmits its
    /// SYN-ACK (1 s, 3 s, ... later), so the count is waited for, not sampled.
    fn accepted_in_all(&self, expected: u64) -> u64 {
        self.is_hurried.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline
            && self.accepted.load(Ordering::Relaxed) < expected
            && self.last_accept.lock().expect("lock").elapsed() < Duration::from_secs(4)
        {
            thread::sleep(Duration::from_millis(50));
        }
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for SlowListener {
    fn drop(&mut self) {
        self.is_stopped.store(true, Ordering::Relaxed);
    }
}

/// Keeps every core busy until dropped (and never longer than a minute).
struct BusyCores(Arc<AtomicBool>);

impl BusyCores {
    fn start() -> BusyCores {
        let is_stopped = Arc::new(AtomicBool::new(false));
        let cores = thread::available_parallelism().map_or(2, |n| n.get());
        for _ in 0..cores {
            let stop = is_stopped.clone();
            thread::spawn(move || {
                let end = Instant::now() + Duration::from_secs(60);
                let mut x = 0_u64;
                while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                    for i in 0..10_000 {
                        x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
                    }
                }
            });
        }
        BusyCores(is_stopped)
    }
}

impl Drop for BusyCores {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Thousands of connections at once against a listener that accepts one per 2 ms: the
/// accept queue overflows, SYNs are retried by the kernel, and every connection gets in
/// within its own deadline. The bench must count exactly what the listener accepted.
fn slow_acceptor_is_counted_exactly(conns: u64) {
    let listener = SlowListener::start(Duration::from_millis(2), 1024, true);
    let addr = listener.addr.to_string();
    let outcome = reverb(&[
        "bench",
        &addr,
        "--json",
        "--conns",
        &conns.to_string(),
        "--duration",
        "1",
        "--warmup",
        "0",
    ]);
    let report = outcome.json();
    let accepted = listener.accepted_in_all(conns);
    let established = report["conns_established"].as_u64().expect("established");
    let failed = report["connect"]["failed"].as_u64().expect("failed");
    assert_eq!(established, accepted, "{report}\n{}", outcome.stderr);
    assert_eq!(established + failed, conns, "{report}");
    assert_eq!(established, conns, "{report}");
    // Connections still in the listener's queue when the window ends have their replies
    // counted missing (the echo comes only once accepted); nothing else may go wrong.
    assert_eq!(report["mismatches"], 0, "{report}");
    assert_eq!(report["error_detail"]["closed_early"], 0, "{report}");
    assert_eq!(report["error_detail"]["reset"], 0, "{report}");
    assert!(report["msgs"].as_u64().expect("msgs") > 0, "{report}");
}

#[test]
fn slow_acceptor_every_handshake_is_counted() {
    slow_acceptor_is_counted_exactly(2000);
}

#[test]
fn slow_acceptor_on_busy_cores_every_handshake_is_counted() {
    let _busy = BusyCores::start();
    slow_acceptor_is_counted_exactly(2000);
}

/// A ramp that lasts longer than the connect timeout: each connection's deadline runs
/// from its own connect, so none times out.
#[test]
fn connect_deadline_runs_per_connection() {
    let listener = SlowListener::start(Duration::from_micros(100), 1024, true);
    let addr = listener.addr.to_string();
    let outcome = reverb(&[
        "bench",
        &addr,
        "--json",
        "--conns",
        "1200",
        "--connect-rate",
        "500",
        "--connect-timeout",
        "1",
        "--duration",
        "0.5",
        "--warmup",
        "0",
    ]);
    let report = outcome.json();
    assert_eq!(report["conns_established"], 1200, "{report}");
    assert_eq!(listener.accepted_in_all(1200), 1200);
    let phase_s = report["connect"]["phase_s"].as_f64().expect("phase");
    // 1200 connections at 500 per second: about 2.4 s, longer than the 1 s timeout.
    assert!(phase_s >= 2.0, "{report}");
    assert_eq!(outcome.code, 0, "{report}");
}

/// A listener that never accepts: the queue holds a few, the rest time out. The run goes
/// on with those established, counts the others by cause, and exits 3.
#[test]
fn timed_out_connections_are_counted_and_the_run_goes_on() {
    let listener = SlowListener::start(Duration::from_secs(3600), 4, false);
    // Take the one connection the listener accepts before it sleeps, so the queue is
    // what remains.
    let addr = listener.addr.to_string();
    let outcome = reverb(&[
        "bench",
        &addr,
        "--conns",
        "40",
        "--connect-timeout",
        "1",
        "--duration",
        "0.2",
        "--warmup",
        "0",
    ]);
    assert_eq!(outcome.code, 3, "{}", outcome.stdout);
    let table = &outcome.stdout;
    let line = table
        .lines()
        .find(|l| l.starts_with("connections established:"))
        .unwrap_or_else(|| panic!("{table}"));
    let established: u64 = line
        .split_whitespace()
        .nth(2)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!((1..40).contains(&established), "{table}");
    let failed = 40 - established;
    assert!(
        table.contains(&format!(
            "connections failed: {failed} ({failed} timed out)"
        )),
        "{table}"
    );
}

/// Descriptors run out: the bench stops opening connections, goes on with those it has,
/// and says which resource ran out, how many were open, and how to raise it.
#[test]
fn out_of_descriptors_stops_with_a_line() {
    let listener = SlowListener::start(Duration::ZERO, 1024, true);
    let addr = listener.addr.to_string();
    let script = format!(
        "ulimit -n 100 && exec {REVERB} bench {addr} --json --conns 300 --duration 0.3 \
         --warmup 0"
    );
    let output = std::process::Command::new("bash")
        .args(["-c", &script])
        .output()
        .expect("bash");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).expect("json");
    assert_eq!(output.status.code(), Some(3), "{report}");
    let stopped = report["stopped"]
        .as_str()
        .unwrap_or_else(|| panic!("{report}"));
    assert!(stopped.contains("out of file descriptors"), "{stopped}");
    assert!(stopped.contains("open-file limit 100"), "{stopped}");
    let established = report["conns_established"].as_u64().expect("established");
    assert!(
        stopped.contains(&format!("with {established} connections open")),
        "{stopped}"
    );
    let failed = report["connect"]["errors"]["out_of_descriptors"]
        .as_u64()
        .expect("count");
    assert_eq!(established + failed, 300, "{report}");
    assert!(report["msgs"].as_u64().expect("msgs") > 0, "{report}");
}
