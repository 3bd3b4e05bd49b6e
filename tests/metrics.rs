//! `serve --metrics`: the HTTP endpoint (`/metrics`, `/healthz`, `/readyz`) of the real
//! binary, its scrape read back with the Prometheus project's own Python parser.

mod common;

use common::{PATIENCE, Server};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// `GET path` on the metrics endpoint: status code and body.
fn get(server: &Server, path: &str) -> (u16, String) {
    try_get(server, path).expect("GET from the metrics endpoint")
}

/// `GET path` on the metrics endpoint, or the error of connecting or reading.
fn try_get(server: &Server, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(server.addr("http"))?;
    stream.set_read_timeout(Some(PATIENCE))?;
    stream.set_write_timeout(Some(PATIENCE))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, body)| body.to_string());
    Ok((status, body))
}

/// Parses a scrape with `prometheus_client.parser.text_string_to_metric_families` and
/// returns every sample as `name{label="value",...}` (labels sorted) to its value.
/// `None` when Python's prometheus-client is not installed and this is not CI (where
/// `.ci/run` installs it, so its absence fails).
fn parse_scrape(text: &str) -> Option<BTreeMap<String, f64>> {
    const SCRIPT: &str = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
        print(f"{s.name}{{{labels}}} {s.value!r}")
"#;
    let has_parser = Command::new("python3")
        .args(["-c", "import prometheus_client"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_parser {
        assert!(
            std::env::var_os("CI").is_none(),
            "python3 with prometheus-client is needed (.ci/run installs it)"
        );
        eprintln!("SKIPPED: python3 -m pip install prometheus-client to check scrapes");
        return None;
    }
    let mut child = Command::new("python3")
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed the parser");
    let output = child.wait_with_output().expect("parser output");
    assert!(
        output.status.success(),
        "the Prometheus parser rejected the scrape: {}\n{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    let samples = String::from_utf8(output.stdout)
        .expect("utf-8")
        .lines()
        .map(|line| {
            let (name, value) = line.rsplit_once(' ').expect("sample line");
            (name.to_string(), value.parse().expect("sample value"))
        })
        .collect();
    Some(samples)
}

#[test]
fn endpoints_answer() {
    let server = Server::start(
        "epoll",
        &["--tcp", "127.0.0.1:0", "--metrics", "127.0.0.1:0"],
    );
    assert_eq!(get(&server, "/healthz"), (200, "ok\n".to_string()));
    assert_eq!(get(&server, "/readyz"), (200, "ready\n".to_string()));
    assert_eq!(get(&server, "/nowhere").0, 404);
    let (status, body) = get(&server, "/metrics");
    assert_eq!(status, 200);
    assert!(
        body.contains("# TYPE reverb_connections_accepted_total counter"),
        "{body}"
    );
    server.stop();
}

#[test]
fn scrape_parses_with_the_prometheus_parser() {
    let server = Server::start(
        "epoll",
        &[
            "--tcp",
            "127.0.0.1:0",
            "--udp",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
        ],
    );
    let (_, body) = get(&server, "/metrics");
    server.stop();
    let Some(samples) = parse_scrape(&body) else {
        return;
    };
    for name in [
        r#"reverb_connections_accepted_total{transport="tcp"}"#,
        r#"reverb_connections_refused_total{transport="unix"}"#,
        r#"reverb_connections_open{transport="tcp"}"#,
        r#"reverb_connections_closed_total{reason="drain_cut",transport="tcp"}"#,
        r#"reverb_received_bytes_total{transport="udp"}"#,
        r#"reverb_sent_bytes_total{transport="unix-dgram"}"#,
        r#"reverb_datagrams_dropped_total{reason="reflection_guard",transport="udp"}"#,
        r#"reverb_handler_panics_total{transport="tcp"}"#,
        r#"reverb_accept_pauses_total{transport="tcp"}"#,
        r#"reverb_ready{}"#,
        r#"process_cpu_seconds_total{}"#,
        r#"process_resident_memory_bytes{}"#,
        r#"process_open_fds{}"#,
        r#"process_start_time_seconds{}"#,
    ] {
        assert!(samples.contains_key(name), "no {name} in {samples:?}");
    }
    assert_eq!(samples[r#"reverb_ready{}"#], 1.0);
    assert!(samples[r#"process_resident_memory_bytes{}"#] > 0.0);
    assert!(samples[r#"process_open_fds{}"#] >= 3.0);
}

/// A connection the server has accepted: one byte went there and back. A returned
/// `connect` is not an accepted connection (the client's final ACK may wait in a busy
/// CPU's backlog), and one still in the kernel's backlog at SIGTERM is never served, so
/// it owes nothing to drain.
fn accepted_connection(server: &Server) -> TcpStream {
    let mut stream = server.connect_tcp();
    stream.write_all(b"a").expect("send");
    let mut echo = [0u8; 1];
    stream.read_exact(&mut echo).expect("the echo of one byte");
    assert_eq!(echo, *b"a");
    stream
}

/// A client that sends and never reads leaves replies owed, so the drain lasts until
/// `--drain-timeout`; meanwhile the endpoint still answers, and `/readyz` says draining.
#[test]
fn readyz_fails_while_draining() {
    let mut server = Server::start(
        "epoll",
        &[
            "--tcp",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
            "--drain-timeout",
            "3",
        ],
    );
    let mut stuck = accepted_connection(&server);
    stuck
        .set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let chunk = vec![b'x'; 64 * 1024];
    while stuck.write(&chunk).is_ok_and(|n| n > 0) {}
    assert_eq!(get(&server, "/readyz").0, 200);
    server.terminate();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (status, body) = get(&server, "/readyz");
        if status == 503 {
            assert_eq!(body, "draining\n");
            break;
        }
        assert!(Instant::now() < deadline, "/readyz never said draining");
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(get(&server, "/healthz").0, 200);
    let status = server.wait_exit(PATIENCE).expect("exit after the drain");
    assert!(status.success());
}

/// The forking parent must stay single-threaded, so a helper process answers; it reads
/// the same counters and dies with the server.
#[test]
fn forking_serves_metrics_from_a_helper_that_dies_with_it() {
    let mut server = Server::start(
        "forking",
        &["--tcp", "127.0.0.1:0", "--metrics", "127.0.0.1:0"],
    );
    let metrics_addr = server.addr("http");
    assert_eq!(get(&server, "/readyz").0, 200);
    let (status, body) = get(&server, "/metrics");
    assert_eq!(status, 200);
    assert!(body.contains("process_open_fds "), "{body}");
    server.terminate();
    assert!(server.wait_exit(PATIENCE).expect("exit").success());
    let deadline = Instant::now() + PATIENCE;
    while TcpStream::connect(&metrics_addr).is_ok() {
        assert!(
            Instant::now() < deadline,
            "the metrics helper outlived the server"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn metrics_address_in_use_is_exit_1_naming_it() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let output = common::reverb()
        .args(["serve", "--tcp", "127.0.0.1:0", "--metrics", &addr])
        .stdin(Stdio::null())
        .output()
        .expect("run reverb");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("cannot serve metrics on http://{addr}")),
        "{stderr}"
    );
    assert!(output.stdout.is_empty(), "no readiness line before failing");
}

/// Known traffic through `model`, then the scrape read by the Prometheus parser must show
/// exactly it: three TCP connections of 100 bytes, one Unix connection of 50 bytes, one
/// connection refused by `--max-conns`, two UDP datagrams of 10 bytes. Counts land just
/// after a connection closes, so the scrape is retried until it matches (at most
/// `PATIENCE`), and must then match exactly. `blocking` (one client at a time) and
/// `forking` (a place under `--max-conns` is freed only when the child is reaped) skip
/// the refusal.
/// A stream, TCP or Unix, for [`counts_known_traffic`].
trait ReadWrite: Read + Write {
    /// Half-closes (errors ignored: a refused connection may be gone).
    fn shutdown_write(&self);
}

impl ReadWrite for TcpStream {
    fn shutdown_write(&self) {
        let _ = self.shutdown(std::net::Shutdown::Write);
    }
}

impl ReadWrite for std::os::unix::net::UnixStream {
    fn shutdown_write(&self) {
        let _ = self.shutdown(std::net::Shutdown::Write);
    }
}

fn counts_known_traffic(model: &str) {
    let refuses = !matches!(model, "blocking" | "forking");
    use std::os::unix::net::UnixStream;
    let unix_path = common::temp_socket_path("metrics");
    let unix_text = unix_path.to_str().unwrap().to_string();
    let mut args = vec![
        "--tcp",
        "127.0.0.1:0",
        "--udp",
        "127.0.0.1:0",
        "--unix",
        &unix_text,
        "--metrics",
        "127.0.0.1:0",
    ];
    if refuses {
        args.extend(["--max-conns", "1"]);
    }
    let server = Server::start(model, &args);
    // --max-conns 1 counts a connection until the server has closed it, a moment after
    // the client read EOF; wait for that before the next one, or it would be refused.
    let wait_until_none_open = || {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let (_, body) = get(&server, "/metrics");
            let is_none_open = body.contains("reverb_connections_open{transport=\"tcp\"} 0\n")
                && body.contains("reverb_connections_open{transport=\"unix\"} 0\n");
            if is_none_open {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "connections never closed:\n{body}"
            );
            thread::sleep(Duration::from_millis(10));
        }
    };
    // A connection is counted closed a moment before its place under --max-conns is
    // released (after the lingering close), so a try may still be refused (the client
    // reads EOF at once): it is tried again, and each such refusal is counted too.
    let early_refusals = std::cell::Cell::new(0.0);
    let echo_admitted = |connect: &dyn Fn() -> Box<dyn ReadWrite>, bytes: usize| {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let mut stream = connect();
            let _ = stream.write_all(&vec![b'a'; bytes]);
            stream.shutdown_write();
            let mut back = Vec::new();
            let _ = stream.read_to_end(&mut back);
            if back.len() == bytes {
                break;
            }
            assert!(
                back.is_empty() && refuses,
                "{model}: {} of {bytes} bytes",
                back.len()
            );
            early_refusals.set(early_refusals.get() + 1.0);
            assert!(Instant::now() < deadline, "{model}: never admitted again");
            thread::sleep(Duration::from_millis(20));
        }
        wait_until_none_open();
    };
    let echo_tcp = |bytes: usize| {
        echo_admitted(&|| Box::new(server.connect_tcp()), bytes);
    };
    for _ in 0..3 {
        echo_tcp(100);
    }
    let connect_unix = || -> Box<dyn ReadWrite> {
        let stream = UnixStream::connect(&unix_path).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        Box::new(stream)
    };
    let unix_refusals_before = early_refusals.get();
    echo_admitted(&connect_unix, 50);
    let unix_refusals = early_refusals.get() - unix_refusals_before;
    if refuses {
        // One connection held open, so the next is refused (--max-conns 1): the refused
        // client reads EOF at once.
        let deadline = Instant::now() + PATIENCE;
        let mut held = loop {
            let mut held = server.connect_tcp();
            let _ = held.write_all(b"x");
            let mut one = [0u8; 1];
            if held.read_exact(&mut one).is_ok() {
                break held;
            }
            early_refusals.set(early_refusals.get() + 1.0);
            assert!(Instant::now() < deadline, "{model}: never admitted again");
            thread::sleep(Duration::from_millis(20));
        };
        let mut refused = server.connect_tcp();
        let mut rest = Vec::new();
        refused.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        held.shutdown(std::net::Shutdown::Write).unwrap();
        held.read_to_end(&mut rest).unwrap();
    }
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(PATIENCE)).unwrap();
    for _ in 0..2 {
        udp.send_to(&[b'd'; 10], server.addr("udp")).unwrap();
        let mut reply = [0u8; 64];
        assert_eq!(udp.recv(&mut reply).unwrap(), 10);
    }
    let tcp_refusals = early_refusals.get() - unix_refusals;
    let (held, refused) = if refuses {
        (1.0, 1.0 + tcp_refusals)
    } else {
        (0.0, 0.0)
    };
    let expected = Expected::default()
        .series("connections_accepted_total", "tcp", 3.0 + held)
        .series("connections_accepted_total", "unix", 1.0)
        .series("connections_refused_total", "tcp", refused)
        .series("connections_open", "tcp", 0.0)
        .closed("peer_eof", "tcp", 3.0 + held)
        .closed("peer_eof", "unix", 1.0)
        .closed("error", "tcp", 0.0)
        .series("received_bytes_total", "tcp", 300.0 + held)
        .series("sent_bytes_total", "tcp", 300.0 + held)
        .series("received_bytes_total", "unix", 50.0)
        .series("sent_bytes_total", "unix", 50.0)
        .series("datagrams_received_total", "udp", 2.0)
        .series("datagrams_answered_total", "udp", 2.0)
        .series("received_bytes_total", "udp", 20.0)
        .series("sent_bytes_total", "udp", 20.0)
        .series("handler_panics_total", "tcp", 0.0);
    if !wait_for_counts(&server, model, &expected) {
        return;
    }
    server.stop();
}

/// The series a scrape must show, each with its value, named as [`parse_scrape`] names
/// them (labels sorted).
#[derive(Debug, Default)]
struct Expected(BTreeMap<String, f64>);

impl Expected {
    /// `reverb_{name}{transport="transport"}` is `value`.
    fn series(self, name: &str, transport: &str, value: f64) -> Self {
        self.with(
            format!(r#"reverb_{name}{{transport="{transport}"}}"#),
            value,
        )
    }

    /// `reverb_connections_closed_total{reason="reason",transport="transport"}` is `value`.
    fn closed(self, reason: &str, transport: &str, value: f64) -> Self {
        let labels = format!(r#"{{reason="{reason}",transport="{transport}"}}"#);
        self.with(format!("reverb_connections_closed_total{labels}"), value)
    }

    /// `reverb_datagrams_dropped_total{reason="reason",transport="transport"}` is `value`.
    fn dropped(self, reason: &str, transport: &str, value: f64) -> Self {
        let labels = format!(r#"{{reason="{reason}",transport="{transport}"}}"#);
        self.with(format!("reverb_datagrams_dropped_total{labels}"), value)
    }

    fn with(mut self, series: String, value: f64) -> Self {
        self.0.insert(series, value);
        self
    }
}

/// Scrapes until every series in `expected` has exactly its value (counts land just after
/// the event), failing after `PATIENCE` with what the last scrape showed. `false` when the
/// parser is not installed (outside CI).
fn wait_for_counts(server: &Server, model: &str, Expected(expected): &Expected) -> bool {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (_, body) = get(server, "/metrics");
        let Some(samples) = parse_scrape(&body) else {
            return false;
        };
        let seen: BTreeMap<String, f64> = expected
            .keys()
            .map(|name| (name.clone(), samples.get(name).copied().unwrap_or(f64::NAN)))
            .collect();
        if seen == *expected {
            return true;
        }
        assert!(
            Instant::now() < deadline,
            "{model}: the scrape never showed the traffic; last:\n{seen:#?}\nexpected:\n{expected:#?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// A UDP socket on a free loopback address 127.0.0.2-254 at source `port`, or `None`
/// without the privilege to bind a port below 1024.
fn bind_udp_port(port: u16) -> Option<std::net::UdpSocket> {
    (2..255).find_map(|host| std::net::UdpSocket::bind(format!("127.0.0.{host}:{port}")).ok())
}

/// Every way a connection or a datagram can end, counted under its reason: a handler
/// panic (TCP and UDP), an idle timeout, `quit`, the reflection guard, a peer that never
/// reads its Unix datagram replies; and accepts paused for lack of descriptors.
fn counts_reasons(model: &str) {
    use std::os::unix::net::{UnixDatagram, UnixStream};
    let dgram_path = common::temp_socket_path("metrics-dgram");
    let dgram_text = dgram_path.to_str().unwrap().to_string();
    let server = Server::start(
        model,
        &[
            "--tcp",
            "127.0.0.1:0",
            "--udp",
            "127.0.0.1:0",
            "--unix-dgram",
            &dgram_text,
            "--protocol",
            "lines",
            "--panic-on",
            "boom",
            "--idle-timeout",
            "1",
            "--metrics",
            "127.0.0.1:0",
        ],
    );
    // A handler panic closes that connection only.
    let mut panics = server.connect_tcp();
    panics.write_all(b"boom\n").unwrap();
    let mut back = Vec::new();
    let _ = panics.read_to_end(&mut back);
    assert!(back.is_empty(), "{model}: the panic word got a reply");
    // A silent connection is closed by --idle-timeout.
    let mut idle = server.connect_tcp();
    let _ = idle.read_to_end(&mut back);
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(PATIENCE)).unwrap();
    udp.send_to(b"boom\n", server.addr("udp")).unwrap();
    udp.send_to(b"fine\n", server.addr("udp")).unwrap();
    let mut reply = [0u8; 64];
    assert_eq!(udp.recv(&mut reply).unwrap(), 5);
    let guarded = bind_udp_port(1023);
    if let Some(low) = &guarded {
        low.send_to(b"spoofed\n", server.addr("udp")).unwrap();
    }
    // Replies to a Unix datagram peer that never reads fill its queue; the rest are dropped.
    let silent_path = common::temp_socket_path("metrics-silent");
    let silent = UnixDatagram::bind(&silent_path).unwrap();
    for n in 0..20u8 {
        silent.send_to(&[b'a' + n, b'\n'], &dgram_path).unwrap();
        thread::sleep(Duration::from_millis(10));
    }
    let unix_received = r#"reverb_datagrams_received_total{transport="unix-dgram"}"#;
    let deadline = Instant::now() + PATIENCE;
    while samples_of_server(&server, unix_received).is_some_and(|n| n != 20.0) {
        assert!(
            Instant::now() < deadline,
            "{model}: 20 Unix datagrams never counted"
        );
        thread::sleep(Duration::from_millis(50));
    }
    let Some(not_reading) = samples_of_server(
        &server,
        r#"reverb_datagrams_dropped_total{reason="peer_not_reading",transport="unix-dgram"}"#,
    ) else {
        return;
    };
    assert!(
        (1.0..20.0).contains(&not_reading),
        "{model}: {not_reading} replies dropped for a peer that never reads"
    );
    let spoofed = if guarded.is_some() { 1.0 } else { 0.0 };
    let expected = Expected::default()
        .series("connections_accepted_total", "tcp", 2.0)
        .series("connections_open", "tcp", 0.0)
        .closed("handler_panic", "tcp", 1.0)
        .closed("idle_timeout", "tcp", 1.0)
        .series("handler_panics_total", "tcp", 1.0)
        .series("received_bytes_total", "tcp", 5.0)
        .series("sent_bytes_total", "tcp", 0.0)
        .series("handler_panics_total", "udp", 1.0)
        .series("datagrams_received_total", "udp", 2.0 + spoofed)
        .series("datagrams_answered_total", "udp", 1.0)
        .dropped("handler_panic", "udp", 1.0)
        .dropped("reflection_guard", "udp", spoofed)
        .series("datagrams_received_total", "unix-dgram", 20.0)
        .series("datagrams_answered_total", "unix-dgram", 20.0 - not_reading)
        .series("received_bytes_total", "unix-dgram", 40.0)
        .series("sent_bytes_total", "unix-dgram", 2.0 * (20.0 - not_reading))
        .dropped("error", "unix-dgram", 0.0);
    if !wait_for_counts(&server, model, &expected) {
        return;
    }
    drop(silent);
    let _ = std::fs::remove_file(&silent_path);
    server.stop();

    // until-quit's goodbye, over a Unix stream socket.
    let unix_path = common::temp_socket_path("metrics-quit");
    let unix_text = unix_path.to_str().unwrap().to_string();
    let server = Server::start(
        model,
        &[
            "--unix",
            &unix_text,
            "--protocol",
            "until-quit",
            "--metrics",
            "127.0.0.1:0",
        ],
    );
    let mut quits = UnixStream::connect(&unix_path).unwrap();
    quits.set_read_timeout(Some(PATIENCE)).unwrap();
    quits.write_all(b"bye quit\n").unwrap();
    back.clear();
    let _ = quits.read_to_end(&mut back);
    assert_eq!(back, b"bye quit\n");
    let expected = Expected::default()
        .closed("quit", "unix", 1.0)
        .series("received_bytes_total", "unix", 9.0)
        .series("sent_bytes_total", "unix", 9.0);
    if !wait_for_counts(&server, model, &expected) {
        return;
    }
    server.stop();

    // Out of descriptors: accepts pause, and each pause is counted. A serial model holds
    // one connection at a time and a forking parent hands each away: neither runs out.
    if model == "blocking" || model == "forking" {
        return;
    }
    let server = Server::start_with_fd_limit(
        model,
        &["--tcp", "127.0.0.1:0", "--metrics", "127.0.0.1:0"],
        48,
    );
    let held: Vec<TcpStream> = (0..60)
        .map(|_| TcpStream::connect(server.addr("tcp")).unwrap())
        .collect();
    server.wait_for_log("pausing accepts");
    drop(held);
    // The endpoint itself may meet the descriptor limit while the loops catch up (and
    // starts again): ask until it answers.
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Ok((200, body)) = try_get(&server, "/metrics") {
            let Some(samples) = parse_scrape(&body) else {
                return;
            };
            let name = r#"reverb_accept_pauses_total{transport="tcp"}"#;
            if samples.get(name).is_some_and(|&pauses| pauses >= 1.0) {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{model}: accept pauses never counted"
        );
        thread::sleep(Duration::from_millis(50));
    }
    server.stop();
}

/// A client that sends and never reads is still owed replies when `--drain-timeout`
/// passes: its connection is closed for the reason `drain_cut`, once, in every model (a
/// `forking` child was killed at the deadline and counted `error` instead). The endpoint
/// stops with the server, a moment after the cut, so the log line, written with the count
/// by the same call and carrying the same label, is what is checked.
fn counts_drain_cut(model: &str) {
    let args = ["--tcp", "127.0.0.1:0", "--metrics", "127.0.0.1:0"];
    let mut server = Server::start(model, &[&args[..], &["--drain-timeout", "1"]].concat());
    let mut stuck = accepted_connection(&server);
    let chunk = vec![b'x'; 64 * 1024];
    // Until the kernel's buffers both ways are full and the server stopped reading, so
    // replies are still owed when the drain timeout passes.
    let pause = Some(Duration::from_millis(500));
    stuck.set_write_timeout(pause).unwrap();
    while stuck.write(&chunk).is_ok_and(|n| n > 0) {}
    // It keeps sending through the drain and the lingering close after the cut, so
    // neither ends early; it stops when the server is gone or a write times out.
    stuck.set_write_timeout(Some(PATIENCE)).unwrap();
    let sender = thread::spawn(move || {
        for _ in 0..1024 {
            if stuck.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    server.terminate();
    let status = server.wait_exit(PATIENCE).expect("exit after the drain");
    let _ = sender.join();
    assert!(status.success(), "{model}: exit {status}");
    let log = server.stderr();
    let cuts = log
        .lines()
        .filter(|l| l.contains("reason=\"drain_cut\""))
        .count();
    assert_eq!(cuts, 1, "{model}: the cut connection, in\n{log}");
    assert!(!log.contains("killing"), "{model}: {log}");
}

/// One series of a scrape of `server`; `None` without the parser.
fn samples_of_server(server: &Server, name: &str) -> Option<f64> {
    let (_, body) = get(server, "/metrics");
    parse_scrape(&body).map(|samples| samples.get(name).copied().unwrap_or(f64::NAN))
}

macro_rules! counting_models {
    ($($model:ident => $name:literal),* $(,)?) => {
        mod counts {
            $(#[test]
            fn $model() {
                super::counts_known_traffic($name);
            })*
        }
        mod reasons {
            $(#[test]
            fn $model() {
                super::counts_reasons($name);
            })*
        }
        mod drain_cuts {
            $(#[test]
            fn $model() {
                super::counts_drain_cut($name);
            })*
        }
    };
}

counting_models! {
    blocking => "blocking",
    threaded => "threaded",
    pool => "pool",
    forking => "forking",
    busy_poll => "busy-poll",
    select => "select",
    poll => "poll",
    epoll => "epoll",
    own_runtime => "async",
    tokio => "tokio",
    uring => "uring",
}

/// A pool worker counts every connection it serves once, whether the peer ends it or the
/// server does (a lingering close on the lingering thread), while scrapes run alongside:
/// many connections through few workers, each worker serving one after another.
#[test]
fn pool_workers_count_each_connection_once_while_scraped() {
    const EACH_WAY: usize = 30;
    let server = Server::start(
        "pool",
        &[
            "--threads",
            "2",
            "--protocol",
            "until-quit",
            "--tcp",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
        ],
    );
    let is_done = std::sync::atomic::AtomicBool::new(false);
    thread::scope(|scope| {
        scope.spawn(|| {
            // Bounded: the clients below finish well within PATIENCE.
            let deadline = Instant::now() + PATIENCE;
            while !is_done.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
                get(&server, "/metrics");
            }
        });
        for index in 0..2 * EACH_WAY {
            let mut conn = server.connect_tcp();
            // Every other client half-closes (the peer ends it); the others send `quit`, and
            // the server closes first.
            let ends_itself = index % 2 == 0;
            let input: &[u8] = if ends_itself { b"hey" } else { b"quit\n" };
            conn.write_all(input).unwrap();
            if ends_itself {
                conn.shutdown(std::net::Shutdown::Write).unwrap();
            }
            let mut reply = Vec::new();
            conn.read_to_end(&mut reply).unwrap();
            assert_eq!(reply, input, "connection {index}");
        }
        is_done.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let count = EACH_WAY as f64;
    let bytes = count * (3.0 + 5.0);
    let expected = Expected::default()
        .series("connections_accepted_total", "tcp", 2.0 * count)
        .series("connections_open", "tcp", 0.0)
        .closed("peer_eof", "tcp", count)
        .closed("quit", "tcp", count)
        .closed("error", "tcp", 0.0)
        .series("received_bytes_total", "tcp", bytes)
        .series("sent_bytes_total", "tcp", bytes);
    if !wait_for_counts(&server, "pool", &expected) {
        return;
    }
    server.stop();
}

/// The value of the sample line starting with `sample` in the scrape `body`.
fn sample(body: &str, sample: &str) -> Option<f64> {
    body.lines()
        .find_map(|line| line.strip_prefix(sample)?.trim().parse().ok())
}

/// A refused PROXY header and a failed TLS handshake are counted as `rejected`, not as the
/// protocol's `quit`.
#[test]
fn refused_setups_are_counted_as_rejected() {
    for (flag, garbage) in [
        ("--proxy-protocol", &b"GET / HTTP/1.0\r\n\r\n"[..]),
        ("--tls-self-signed", &b"\x16\x03\x01\x00\x05hello"[..]),
    ] {
        let server = Server::start(
            "epoll",
            &["--tcp", "127.0.0.1:0", "--metrics", "127.0.0.1:0", flag],
        );
        let mut peer = server.connect_tcp();
        peer.write_all(garbage).unwrap();
        let mut rest = Vec::new();
        // The close may come as a reset when the server's alert meets unread bytes.
        let _ = peer.read_to_end(&mut rest);
        let rejected = r#"reverb_connections_closed_total{transport="tcp",reason="rejected"}"#;
        let quit = r#"reverb_connections_closed_total{transport="tcp",reason="quit"}"#;
        let deadline = Instant::now() + PATIENCE;
        let body = loop {
            let body = get(&server, "/metrics").1;
            if sample(&body, rejected) == Some(1.0) {
                break body;
            }
            assert!(
                Instant::now() < deadline,
                "{flag}: never counted as rejected:\n{body}"
            );
            thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(sample(&body, quit), Some(0.0), "{flag}:\n{body}");
        server.stop();
    }
}

/// The endpoint answers what it cannot serve with a status of its own and goes on: a
/// method other than GET or HEAD is 405, a malformed request 400, a request past 8 KiB 431;
/// HEAD gets GET's headers without the body.
#[test]
fn bad_requests_are_answered_and_the_endpoint_goes_on() {
    let server = Server::start(
        "epoll",
        &["--tcp", "127.0.0.1:0", "--metrics", "127.0.0.1:0"],
    );
    let raw = |request: &[u8]| {
        let mut stream = TcpStream::connect(server.addr("http")).expect("connect to metrics");
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        stream.write_all(request).expect("send request");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("read response");
        response
    };
    let status = |response: &str| response.split_whitespace().nth(1).map(str::to_string);
    let post = raw(b"POST /metrics HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(status(&post).as_deref(), Some("405"), "{post}");
    let garbage = raw(b"\x01\x02 nonsense\r\n\r\n");
    assert_eq!(status(&garbage).as_deref(), Some("400"), "{garbage}");
    let mut huge = b"GET /metrics HTTP/1.1\r\nX-Filler: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 9000));
    huge.extend(b"\r\n\r\n");
    let too_large = raw(&huge);
    assert_eq!(status(&too_large).as_deref(), Some("431"), "{too_large}");
    let head = raw(b"HEAD /healthz HTTP/1.1\r\nHost: t\r\n\r\n");
    assert!(
        head.starts_with("HTTP/1.1 200 OK\r\n") && head.contains("Content-Length: 3\r\n"),
        "{head}"
    );
    assert!(head.ends_with("\r\n\r\n"), "no body after HEAD: {head:?}");
    assert_eq!(get(&server, "/healthz"), (200, "ok\n".to_string()));
    server.stop();
}

/// The processes whose parent is `pid`, from `/proc`.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&child| {
            std::fs::read_to_string(format!("/proc/{child}/stat")).is_ok_and(|stat| {
                // Fields after the command name (in parentheses): state, then ppid.
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                    == Some(pid)
            })
        })
        .collect()
}

/// A `forking` child killed with SIGKILL keeps what it counted (counters never go
/// backwards), its connection is counted closed (reason `error`) when the parent reaps
/// it, and the server goes on counting the next connections.
#[test]
fn forking_child_killed_keeps_its_counts() {
    let server = Server::start(
        "forking",
        &["--tcp", "127.0.0.1:0", "--metrics", "127.0.0.1:0"],
    );
    let before = children_of(server.pid());
    let mut victim = server.connect_tcp();
    victim.write_all(&[b'k'; 10]).unwrap();
    let mut back = [0u8; 10];
    victim.read_exact(&mut back).unwrap();
    let child = children_of(server.pid())
        .into_iter()
        .find(|pid| !before.contains(pid))
        .expect("the connection's child");
    let killed = Command::new("kill")
        .args(["-KILL", &child.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let mut rest = Vec::new();
    let _ = victim.read_to_end(&mut rest);
    let mut after = server.connect_tcp();
    after.write_all(&[b'a'; 5]).unwrap();
    after.shutdown(std::net::Shutdown::Write).unwrap();
    after.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, [b'a'; 5]);
    let expected = Expected::default()
        .series("connections_accepted_total", "tcp", 2.0)
        .series("connections_open", "tcp", 0.0)
        .closed("error", "tcp", 1.0)
        .closed("peer_eof", "tcp", 1.0)
        .series("received_bytes_total", "tcp", 15.0)
        .series("sent_bytes_total", "tcp", 15.0);
    if !wait_for_counts(&server, "forking", &expected) {
        return;
    }
    server.stop();
}
