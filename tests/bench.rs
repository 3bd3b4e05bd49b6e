//! Black-box tests of `reverb bench`: deliberately faulty echo servers (written here, one
//! std thread per connection on 127.0.0.1:0) must each be caught and exit 3; correct runs
//! against `reverb serve --model threaded` exit 0 with every contract field in the JSON.

use serde_json::Value;
mod common;

use common::{Server, temp_socket_path};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const REVERB: &str = env!("CARGO_BIN_EXE_reverb");
/// No bench run in these tests may take longer (the drain alone is 5 s).
const RUN_LIMIT: Duration = Duration::from_secs(40);
/// Where in each connection's byte stream the faulty servers misbehave.
const FAULT_AT: u64 = 1000;

struct Outcome {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Outcome {
    fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {}", self.stdout))
    }
}

/// Runs the binary with `args`, killing it if it runs past [`RUN_LIMIT`].
fn reverb(args: &[&str]) -> Outcome {
    let mut child = Command::new(REVERB)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn reverb");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out = thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + RUN_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("reverb {args:?} ran past {RUN_LIMIT:?}");
        }
        thread::sleep(Duration::from_millis(20));
    };
    Outcome {
        code: status.code().unwrap_or(-1),
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

/// A short bench against `addr` with JSON output; `extra` flags add to or replace the
/// defaults (2 connections, 0.5 s after 0.1 s of warmup).
fn bench(addr: &str, extra: &[&str]) -> Outcome {
    let mut args = vec!["bench", addr, "--json"];
    for (flag, value) in [("--conns", "2"), ("--duration", "0.5"), ("--warmup", "0.1")] {
        if !extra.contains(&flag) {
            args.extend([flag, value]);
        }
    }
    args.extend_from_slice(extra);
    reverb(&args)
}

#[derive(Clone, Copy, Debug)]
enum StreamFault {
    DropByte,
    CorruptByte,
    DuplicateByte,
    ExtraByte,
    SwapBytes,
    CloseEarly,
    Reset,
    NeverAnswer,
}

/// Echoes every byte except around stream position [`FAULT_AT`], where it does `fault`.
fn faulty_stream_server(fault: StreamFault) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            thread::spawn(move || serve_faulty(stream, fault));
        }
    });
    addr
}

fn serve_faulty(mut stream: TcpStream, fault: StreamFault) {
    let _ = stream.set_read_timeout(Some(RUN_LIMIT));
    let mut position = 0_u64;
    let mut held: Option<u8> = None;
    let mut buf = [0_u8; 4096];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut out = Vec::with_capacity(n + 1);
        for &byte in &buf[..n] {
            let at = position;
            position += 1;
            match fault {
                StreamFault::NeverAnswer => {}
                StreamFault::DropByte if at == FAULT_AT => {}
                StreamFault::CorruptByte if at == FAULT_AT => out.push(byte ^ 0x20),
                StreamFault::DuplicateByte if at == FAULT_AT => out.extend([byte, byte]),
                // The last byte of message 15 (64-byte messages), then one nobody sent.
                StreamFault::ExtraByte if at == 1023 => out.extend([byte, 0]),
                StreamFault::SwapBytes if at == FAULT_AT => held = Some(byte),
                StreamFault::SwapBytes if at == FAULT_AT + 1 => {
                    out.push(byte);
                    out.extend(held.take());
                }
                StreamFault::CloseEarly if at == FAULT_AT => {
                    let _ = stream.write_all(&out);
                    return;
                }
                StreamFault::Reset if at == FAULT_AT => {
                    // Linger 0: closing sends RST instead of FIN.
                    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                    return;
                }
                _ => out.push(byte),
            }
        }
        if stream.write_all(&out).is_err() {
            return;
        }
    }
}

fn assert_caught(fault: StreamFault, needle: &str) {
    let addr = faulty_stream_server(fault);
    let outcome = bench(&format!("tcp://{addr}"), &[]);
    assert_eq!(outcome.code, 3, "{fault:?} not caught: {}", outcome.stdout);
    let report = outcome.json();
    let wrong = report["mismatches"].as_u64().unwrap() + report["errors"].as_u64().unwrap();
    assert!(wrong >= 1, "{fault:?}: {report}");
    let problems = report["problems"].to_string();
    assert!(
        problems.contains(needle),
        "{fault:?}: expected {needle:?} in {problems}"
    );
}

#[test]
fn dropped_byte_is_caught() {
    assert_caught(StreamFault::DropByte, "expected");
}

#[test]
fn corrupted_byte_is_caught() {
    assert_caught(StreamFault::CorruptByte, "byte 40 of message 15");
}

#[test]
fn duplicated_byte_is_caught() {
    assert_caught(StreamFault::DuplicateByte, "byte 41 of message 15");
}

#[test]
fn extra_byte_is_caught() {
    assert_caught(
        StreamFault::ExtraByte,
        "never sent (after byte 0 of message 16)",
    );
}

#[test]
fn swapped_bytes_are_caught() {
    assert_caught(StreamFault::SwapBytes, "byte 40 of message 15");
}

#[test]
fn early_close_is_caught() {
    assert_caught(StreamFault::CloseEarly, "closed the connection");
}

#[test]
fn reset_is_caught() {
    assert_caught(StreamFault::Reset, "read failed");
}

#[test]
fn silent_server_is_caught_after_the_drain() {
    let started = Instant::now();
    assert_caught(StreamFault::NeverAnswer, "still unanswered");
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "drain must wait 5 s"
    );
}

#[test]
fn human_table_reports_the_problem() {
    let addr = faulty_stream_server(StreamFault::CorruptByte);
    let outcome = reverb(&[
        "bench",
        &addr.to_string(),
        "--conns",
        "1",
        "--duration",
        "0.3",
        "--warmup",
        "0",
    ]);
    assert_eq!(outcome.code, 3);
    assert!(outcome.stdout.contains("mismatches"), "{}", outcome.stdout);
    assert!(
        outcome
            .stdout
            .contains("problem: connection 0: byte 40 of message 15"),
        "{}",
        outcome.stdout
    );
    // stderr is not a terminal here: no progress bar.
    assert!(outcome.stderr.is_empty(), "stderr: {}", outcome.stderr);
}

#[test]
fn refused_connection_exits_3_after_printing() {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let outcome = bench(&format!("127.0.0.1:{port}"), &[]);
    assert_eq!(outcome.code, 3);
    let report = outcome.json();
    assert_eq!(report["error_detail"]["connect_failed"], 2);
    assert_eq!(report["conns_established"], 0);
}

#[test]
fn bad_address_is_a_usage_error() {
    let outcome = reverb(&["bench", "::1:7007"]);
    assert_eq!(outcome.code, 2, "{}", outcome.stderr);
    let outcome = reverb(&["bench", "udp://127.0.0.1:9", "--size", "4"]);
    assert_eq!(outcome.code, 2, "{}", outcome.stderr);
}

#[derive(Clone, Copy, Debug)]
enum DatagramFault {
    Corrupt,
    Duplicate,
    Drop,
}

/// Answers each datagram, except the 20th of each sender, which gets `fault`.
fn faulty_udp_server(fault: DatagramFault) -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = socket.local_addr().expect("addr");
    thread::spawn(move || {
        let mut seen = std::collections::HashMap::<SocketAddr, u64>::new();
        let mut buf = [0_u8; 65536];
        while let Ok((n, peer)) = socket.recv_from(&mut buf) {
            let count = seen.entry(peer).or_default();
            *count += 1;
            let datagram = &mut buf[..n];
            if *count == 20 {
                match fault {
                    DatagramFault::Corrupt => datagram[n - 1] ^= 1,
                    DatagramFault::Duplicate => {
                        let _ = socket.send_to(datagram, peer);
                    }
                    DatagramFault::Drop => continue,
                }
            }
            let _ = socket.send_to(datagram, peer);
        }
    });
    addr
}

#[test]
fn corrupted_datagram_is_caught() {
    let addr = faulty_udp_server(DatagramFault::Corrupt);
    let outcome = bench(&format!("udp://{addr}"), &[]);
    assert_eq!(outcome.code, 3, "{}", outcome.stdout);
    assert!(outcome.json()["mismatches"].as_u64().unwrap() >= 1);
}

#[test]
fn duplicated_datagram_is_caught() {
    let addr = faulty_udp_server(DatagramFault::Duplicate);
    let outcome = bench(&format!("udp://{addr}"), &["--depth", "4"]);
    assert_eq!(outcome.code, 3, "{}", outcome.stdout);
    assert!(
        outcome.stdout.contains("came back twice"),
        "{}",
        outcome.stdout
    );
}

#[test]
fn lost_datagrams_are_counted_not_errors() {
    let addr = faulty_udp_server(DatagramFault::Drop);
    let outcome = bench(&format!("udp://{addr}"), &["--depth", "2"]);
    assert_eq!(outcome.code, 0, "{}", outcome.stdout);
    let report = outcome.json();
    assert_eq!(report["lost"], 2, "{report}");
    assert_eq!(report["mismatches"], 0);
    assert_eq!(report["errors"], 0);
}

/// `reverb serve --model threaded` on all four transports, in the order TCP, UDP, Unix
/// stream, Unix datagram (its `addrs`).
fn serve_all_transports() -> Server {
    let stream = temp_socket_path("bench-stream");
    let datagram = temp_socket_path("bench-dgram");
    Server::start(
        "threaded",
        &[
            "--tcp",
            "127.0.0.1:0",
            "--udp",
            "127.0.0.1:0",
            "--unix",
            stream.to_str().expect("UTF-8 temp path"),
            "--unix-dgram",
            datagram.to_str().expect("UTF-8 temp path"),
        ],
    )
}

const CONTRACT_FIELDS: [&str; 11] = [
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
    "latency_us",
];

fn assert_clean(outcome: &Outcome) -> Value {
    assert_eq!(
        outcome.code, 0,
        "stdout: {}\nstderr: {}",
        outcome.stdout, outcome.stderr
    );
    let report = outcome.json();
    for field in CONTRACT_FIELDS {
        assert!(report.get(field).is_some(), "missing {field}: {report}");
    }
    for p in ["p50", "p90", "p99", "p999", "max"] {
        assert!(
            report["latency_us"][p].is_number(),
            "latency_us.{p}: {report}"
        );
    }
    assert!(report["msgs"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["errors"], 0);
    assert_eq!(report["mismatches"], 0);
    report
}

#[test]
fn correct_server_passes_on_every_transport() {
    let server = serve_all_transports();
    for name in &server.addrs {
        let outcome = bench(name, &["--depth", "3", "--size", "300"]);
        let report = assert_clean(&outcome);
        assert_eq!(report["conns"], 2);
        assert_eq!(report["size"], 300);
        assert_eq!(report["depth"], 3);
        assert_eq!(report["duration_s"], 0.5);
        assert_eq!(report["lost"], 0, "{name}: {report}");
    }
    server.stop();
    // The Unix datagram client sockets' paths are gone.
    let leftovers: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .expect("temp dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("reverb-bench-"))
        .filter(|e| e.file_name().to_string_lossy().ends_with(".sock"))
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
}

#[test]
fn threads_and_large_messages() {
    let server = serve_all_transports();
    let outcome = bench(
        &server.addrs[0],
        &[
            "--threads",
            "2",
            "--conns",
            "4",
            "--size",
            "100000",
            "--depth",
            "2",
        ],
    );
    let report = assert_clean(&outcome);
    assert_eq!(report["threads"], 2);
    server.stop();
}

#[test]
fn open_loop_holds_the_rate() {
    let server = serve_all_transports();
    let outcome = bench(&server.addrs[0], &["--rate", "400", "--duration", "1"]);
    let report = assert_clean(&outcome);
    let msgs = report["msgs"].as_u64().unwrap();
    assert!((380..=420).contains(&msgs), "{report}");
    assert_eq!(report["rate_reached"], true);
    let outcome = bench(&server.addrs[1], &["--rate", "400", "--duration", "1"]);
    assert_clean(&outcome);
    server.stop();
}

#[test]
fn open_loop_says_when_the_rate_is_not_reached() {
    // A server that answers each message only after 20 ms, on 2 connections, cannot
    // complete 1000 msgs/s.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            thread::spawn(move || {
                let mut buf = [0_u8; 64];
                while stream.read_exact(&mut buf).is_ok() {
                    thread::sleep(Duration::from_millis(20));
                    if stream.write_all(&buf).is_err() {
                        return;
                    }
                }
            });
        }
    });
    let outcome = reverb(&[
        "bench",
        &addr.to_string(),
        "--conns",
        "2",
        "--duration",
        "0.5",
        "--warmup",
        "0",
        "--rate",
        "1000",
    ]);
    assert!(
        outcome.stdout.contains("NOT reached"),
        "stdout: {}",
        outcome.stdout
    );
}

#[test]
fn client_keeps_working() {
    let server = serve_all_transports();
    let mut child = Command::new(REVERB)
        .args(["client", &server.addrs[0]])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn client");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(b"hello\nworld\n").expect("write");
    drop(stdin);
    let mut out = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .expect("read");
    assert!(child.wait().expect("wait").success());
    assert_eq!(out, "hello\nworld\n");
    server.stop();
}

#[path = "bench/agents.rs"]
mod agents;
#[path = "bench/connect.rs"]
mod connect;
#[path = "bench/series.rs"]
mod series;
