//! What a run records: the time series (`--interval`, a stall visible in it), the whole
//! histogram in HdrHistogram's encoding (read back by another implementation), connection
//! churn and the connect ramp, and source addresses.

use super::common::Server;
use super::{Outcome, reverb};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// `reverb serve --model epoll --threads 1` on a free TCP port (its `addrs[0]`).
pub(super) fn serve_epoll() -> Server {
    Server::start("epoll", &["--threads", "1", "--tcp", "127.0.0.1:0"])
}

/// An echo server (a thread per connection) that answers nothing while `stall` covers
/// the present moment, then everything at once.
fn stalling_server(stall: Arc<Mutex<Option<(Instant, Instant)>>>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let stall = stall.clone();
            thread::spawn(move || {
                let mut buf = [0_u8; 4096];
                while let Ok(n @ 1..) = stream.read(&mut buf) {
                    let window = *stall.lock().expect("lock");
                    if let Some((from, until)) = window {
                        let now = Instant::now();
                        if now >= from && now < until {
                            thread::sleep(until - now);
                        }
                    }
                    if stream.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn a_stall_is_visible_in_the_time_series() {
    let stall = Arc::new(Mutex::new(None));
    let addr = stalling_server(stall.clone()).to_string();
    let started = Instant::now();
    *stall.lock().expect("lock") = Some((
        started + Duration::from_millis(1500),
        started + Duration::from_millis(2500),
    ));
    let outcome = reverb(&[
        "bench",
        &addr,
        "--json",
        "--conns",
        "2",
        "--duration",
        "3.5",
        "--warmup",
        "0",
        "--interval",
        "0.25",
    ]);
    let report = outcome.json();
    assert_eq!(outcome.code, 0, "{report}");
    let intervals = report["intervals"].as_array().expect("intervals");
    assert_eq!(intervals.len(), 14, "{report}");
    let msgs: Vec<u64> = intervals
        .iter()
        .map(|i| i["msgs"].as_u64().expect("msgs"))
        .collect();
    let total: u64 = msgs.iter().sum();
    assert_eq!(total, report["msgs"].as_u64().expect("msgs"), "{msgs:?}");
    // Busy before, silent for at least two intervals (a second of stall), busy after.
    let silent: Vec<usize> = (0..msgs.len()).filter(|&i| msgs[i] == 0).collect();
    assert!(silent.len() >= 2, "{msgs:?}");
    let (first, last) = (silent[0], silent[silent.len() - 1]);
    assert!(msgs[..first].iter().all(|&m| m > 0), "{msgs:?}");
    assert!(msgs[last + 1..].iter().any(|&m| m > 0), "{msgs:?}");
    assert!(first >= 4 && last <= 11, "{msgs:?}");
}

#[test]
fn intervals_print_one_line_each() {
    let server = serve_epoll();
    let outcome = reverb(&[
        "bench",
        &server.addrs[0],
        "--conns",
        "2",
        "--duration",
        "1",
        "--warmup",
        "0",
        "--interval",
        "0.5",
    ]);
    assert_eq!(outcome.code, 0, "{}", outcome.stdout);
    let lines: Vec<&str> = outcome
        .stdout
        .lines()
        .filter(|l| l.starts_with("interval"))
        .collect();
    assert_eq!(lines.len(), 2, "{}", outcome.stdout);
    assert!(
        lines[0].contains("msgs/s") && lines[0].contains("p99"),
        "{lines:?}"
    );
}

/// Python's `hdrh` (a separate HdrHistogram implementation) decodes the report's histogram
/// to the same count and percentiles.
#[test]
fn histogram_reads_back_in_another_hdrhistogram() {
    // The probe's own ImportError traceback would read as a failure next to "ok".
    let has_hdrh = Command::new("python3")
        .args(["-c", "import hdrh"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_hdrh {
        println!(
            "SKIPPED: python3 with the hdrhistogram package is not installed \
             (pip install hdrhistogram; .ci/run installs it)"
        );
        return;
    }
    let server = serve_epoll();
    let outcome = reverb(&[
        "bench",
        &server.addrs[0],
        "--json",
        "--duration",
        "0.5",
        "--warmup",
        "0",
    ]);
    let report = outcome.json();
    let encoded = report["latency_histogram_ns"].as_str().expect("histogram");
    let script = "import sys, json\n\
                  from hdrh.histogram import HdrHistogram\n\
                  h = HdrHistogram.decode(sys.argv[1])\n\
                  buckets = [[i.value_iterated_to, i.count_at_value_iterated_to] \
                             for i in h.get_recorded_iterator()]\n\
                  print(json.dumps({'count': h.get_total_count(), 'max': h.get_max_value(), \
                  'buckets': buckets}))";
    let decoded = Command::new("python3")
        .args(["-c", script, encoded])
        .output()
        .expect("python3");
    assert!(
        decoded.status.success(),
        "{}",
        String::from_utf8_lossy(&decoded.stderr)
    );
    let decoded: Value = serde_json::from_slice(&decoded.stdout).expect("json");
    assert_eq!(decoded["count"], report["msgs"], "{decoded} {report}");
    // Every bucket the bench recorded, read back with the same count.
    let ours = reverb::bench::decode_histogram(encoded).expect("decode");
    let buckets: Vec<Value> = ours
        .iter_recorded()
        .map(|v| serde_json::json!([v.value_iterated_to(), v.count_at_value()]))
        .collect();
    assert!(!buckets.is_empty());
    assert_eq!(decoded["buckets"], Value::Array(buckets), "{decoded}");
    let max_us = report["latency_us"]["max"].as_f64().expect("max");
    let python_max_us = decoded["max"].as_f64().expect("max") / 1000.0;
    assert!(
        (python_max_us - max_us).abs() <= max_us * 0.002 + 0.1,
        "{decoded} {report}"
    );
}

fn churn(outcome: &Outcome) -> Value {
    let report = outcome.json();
    assert_eq!(outcome.code, 0, "{report}");
    report
}

#[test]
fn conn_lifetime_churns_connections() {
    let server = serve_epoll();
    let outcome = reverb(&[
        "bench",
        &server.addrs[0],
        "--json",
        "--conns",
        "4",
        "--duration",
        "0.5",
        "--warmup",
        "0",
        "--conn-lifetime",
        "1",
    ]);
    let report = churn(&outcome);
    let msgs = report["msgs"].as_u64().expect("msgs");
    let opened = report["connect"]["opened"].as_u64().expect("opened");
    // One message per connection: a new connection for each message, plus the first four.
    assert!(msgs > 20, "{report}");
    assert!(opened >= msgs && opened <= msgs + 8, "{report}");
    assert!(report["connect"]["opened_per_s"].as_f64().expect("rate") > 0.0);
    assert!(
        report["connect"]["latency_us"]["p99"]
            .as_f64()
            .expect("p99")
            > 0.0
    );
    // Lifetime 3 at depth 2: each connection answers exactly three messages.
    let outcome = reverb(&[
        "bench",
        &server.addrs[0],
        "--json",
        "--conns",
        "2",
        "--depth",
        "2",
        "--duration",
        "0.5",
        "--warmup",
        "0",
        "--conn-lifetime",
        "3",
    ]);
    let report = churn(&outcome);
    assert!(
        report["connect"]["opened"].as_u64().expect("opened") > 4,
        "{report}"
    );
}

#[test]
fn connect_rate_ramps() {
    let server = serve_epoll();
    let outcome = reverb(&[
        "bench",
        &server.addrs[0],
        "--json",
        "--conns",
        "50",
        "--connect-rate",
        "100",
        "--duration",
        "0.2",
        "--warmup",
        "0",
    ]);
    let report = churn(&outcome);
    let phase_s = report["connect"]["phase_s"].as_f64().expect("phase");
    // 50 connections at 100 per second: about half a second, not a burst.
    assert!((0.4..3.0).contains(&phase_s), "{report}");
    assert_eq!(report["conns_established"], 50);
}

#[test]
fn sources_spread_connections() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let peers = Arc::new(Mutex::new(Vec::<IpAddr>::new()));
    let seen = peers.clone();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            if let Ok(peer) = stream.peer_addr() {
                seen.lock().expect("lock").push(peer.ip());
            }
            thread::spawn(move || {
                let mut buf = [0_u8; 4096];
                while let Ok(n @ 1..) = stream.read(&mut buf) {
                    if stream.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    let outcome = reverb(&[
        "bench",
        &addr,
        "--json",
        "--conns",
        "9",
        "--duration",
        "0.2",
        "--warmup",
        "0",
        "--source",
        "127.0.0.2-127.0.0.4",
    ]);
    churn(&outcome);
    let mut peers = peers.lock().expect("lock").clone();
    peers.sort();
    let expected: Vec<IpAddr> = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
        .iter()
        .flat_map(|a| std::iter::repeat_n(a.parse().expect("ip"), 3))
        .collect();
    assert_eq!(peers, expected);
    let bad = reverb(&["bench", &addr, "--source", "127.0.0.9-127.0.0.2"]);
    assert_eq!(bad.code, 2, "{}", bad.stderr);
    assert!(bad.stderr.contains("runs backwards"), "{}", bad.stderr);
}

/// With `--source`, the local port is chosen at connect, per destination
/// (IP_BIND_ADDRESS_NO_PORT), so one source address is not used up by connections to
/// another server: two benches from the same address, to two servers, open more
/// connections together than the address has ports. Runs in a network namespace of its
/// own, whose port range is 8 ports (a plain bind to port 0 gives at most 8 in all).
#[test]
fn a_source_address_is_shared_between_destinations() {
    const SCRIPT: &str = r#"
        set -u
        ip link set lo up
        echo "40000 40007" > /proc/sys/net/ipv4/ip_local_port_range
        "$1" serve --tcp 127.0.0.1:7101 --tcp 127.0.0.1:7102 >/dev/null 2>&1 & server=$!
        trap 'kill $server' EXIT
        for _ in $(seq 100); do
            ss -Htln | grep -q ':7102' && break
            sleep 0.05
        done
        run() { "$1" bench "127.0.0.1:$2" --json --conns 6 --duration 1 --warmup 0                     --source 127.0.0.1 2>/dev/null; }
        run "$1" 7101 & first=$!
        sleep 0.3
        run "$1" 7102
        wait $first
    "#;
    if !Command::new("unshare")
        .args(["-n", "true"])
        .status()
        .is_ok_and(|s| s.success())
    {
        println!("skipped: needs `unshare -n` (util-linux, as root) for a namespace of its own");
        return;
    }
    let output = Command::new("timeout")
        .args(["30", "unshare", "-n", "bash", "-c", SCRIPT, "script"])
        .arg(super::REVERB)
        .stdin(Stdio::null())
        .output()
        .expect("run unshare");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let reports: Vec<Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {stdout}")))
        .collect();
    assert_eq!(reports.len(), 2, "{stdout}");
    for report in reports {
        assert_eq!(report["conns_established"], 6, "{report}");
        assert_eq!(report["connect"]["errors"]["out_of_ports"], 0, "{report}");
        assert_eq!(report["errors"], 0, "{report}");
    }
}

#[test]
fn every_connection_failed_reports_the_time_actually_run() {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let addr = format!("127.0.0.1:{port}");
    let outcome = reverb(&["bench", &addr, "--json", "--duration", "5", "--warmup", "0"]);
    let report = outcome.json();
    assert_eq!(outcome.code, 3);
    assert_eq!(report["duration_s"], 0.0, "{report}");
    assert!(
        report["elapsed_s"].as_f64().expect("elapsed") < 3.0,
        "{report}"
    );
    assert_eq!(report["connect"]["errors"]["refused"], 10, "{report}");
    let table = reverb(&["bench", &addr, "--duration", "5"]);
    assert!(table.stdout.contains("no load ran"), "{}", table.stdout);
    assert!(
        table.stdout.contains("connections failed: 10 (10 refused)"),
        "{}",
        table.stdout
    );
}

/// On a terminal the connect phase shows its progress (run under script(1), which gives
/// the bench a pseudo-terminal).
#[test]
fn connect_phase_progress_on_a_terminal() {
    if Command::new("script").arg("--version").output().is_err() {
        println!("SKIPPED: script(1) is not installed (util-linux)");
        return;
    }
    let server = serve_epoll();
    let log = std::env::temp_dir().join(format!("reverb-bench-pty-{}.log", std::process::id()));
    let command = format!(
        "{} bench {} --conns 200 --connect-rate 400 --duration 0.2 --warmup 0",
        super::REVERB,
        server.addrs[0]
    );
    let status = Command::new("timeout")
        .args(["60", "script", "-qec", &command])
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("script");
    let typescript = String::from_utf8_lossy(&std::fs::read(&log).expect("typescript")).to_string();
    let _ = std::fs::remove_file(&log);
    assert!(status.success(), "{typescript}");
    assert!(typescript.contains("connecting: "), "{typescript}");
    assert!(
        typescript.contains(" of 200 established, 0 failed"),
        "{typescript}"
    );
}
