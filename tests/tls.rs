//! TLS and the PROXY protocol on every model, checked with clients nobody here wrote:
//! `openssl s_client`, Python's `ssl` module (tests/tls/peer.py) and a real HAProxy in
//! front of reverb. `cargo test --test tls epoll::` runs one model.
//!
//! The tools are installed by `.ci/run`; when one is missing anyway, its tests say so
//! on stderr and return.

mod common;

use common::{PATIENCE, Server, pattern, temp_socket_path};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

macro_rules! tls_cases {
    (models: [$($model:ident),* $(,)?], cases: $cases:tt $(,)?) => {
        $(tls_cases!(@one $model, $cases);)*
    };
    (@one $model:ident, [$($case:ident),* $(,)?]) => {
        mod $model {
            $(
                #[test]
                fn $case() {
                    super::$case(&super::cli_name(stringify!($model)));
                }
            )*
        }
    };
}

tls_cases! {
    models: [blocking, threaded, pool, forking, busy_poll, select, poll, epoll, own_runtime, tokio, uring],
    cases: [python_payload_half_close, python_unread_flood_bounded, openssl_s_client_until_quit,
            garbage_handshake_closes_only_that_connection, haproxy_send_proxy_v1_and_v2,
            proxy_header_refusals_and_deadline, tls_handshake_deadline,
            idle_and_drain_send_close_notify, refusals_linger, greeting_past_max_buffer],
}

/// The `--model` value for a module name: `own_runtime` is `async` (a keyword in Rust).
fn cli_name(module: &str) -> String {
    match module {
        "own_runtime" => "async".to_string(),
        other => other.replace('_', "-"),
    }
}

/// Whether `tool` runs here; if not, says so (the test then returns without checking).
fn have(tool: &str, probe: &[&str]) -> bool {
    let found = Command::new(tool)
        .args(probe)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        eprintln!("SKIPPED: {tool} is not installed (.ci/run installs it)");
    }
    found
}

/// Starts `model` serving TLS with a self-signed certificate on a TCP port, plus `extra`.
fn start_tls(model: &str, extra: &[&str]) -> Server {
    let tls = ["--tcp", "127.0.0.1:0", "--tls-self-signed"];
    Server::start(model, &[&tls[..], extra].concat())
}

/// Runs tests/tls/peer.py with `args` and asserts that it succeeded, naming `what` and
/// `server`'s log; returns the peer's line.
fn assert_peer(server: &Server, what: &str, args: &[&str]) -> String {
    let (ok, line) = run_peer(args);
    assert!(ok, "{what}: {line}\nserver log:\n{}", server.stderr());
    line
}

fn peer_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tls/peer.py")
}

/// Runs tests/tls/peer.py to the end; returns its one line.
fn run_peer(args: &[&str]) -> (bool, String) {
    let child = Command::new("python3")
        .arg(peer_script())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    let (ok, out, err) = wait_with_timeout(child, Duration::from_secs(90));
    (
        ok,
        format!(
            "{}{}",
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&err)
        ),
    )
}

/// Waits for `child` (killing it after `timeout`): success, stdout, stderr.
fn wait_with_timeout(child: Child, timeout: Duration) -> (bool, Vec<u8>, Vec<u8>) {
    let (status, out, err) = wait_for(child, timeout);
    (status.is_some_and(|s| s.success()), out, err)
}

/// Waits for `child` (killing it after `timeout`): its status (`None`: killed), stdout,
/// stderr.
fn wait_for(mut child: Child, timeout: Duration) -> (Option<ExitStatus>, Vec<u8>, Vec<u8>) {
    let mut stdout = child.stdout.take().expect("stdout piped");
    let mut stderr = child.stderr.take().expect("stderr piped");
    let out_reader = thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stdout.read_to_end(&mut bytes);
        bytes
    });
    let err_reader = thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stderr.read_to_end(&mut bytes);
        bytes
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(20));
    };
    let out = out_reader.join().expect("stdout reader");
    let err = err_reader.join().expect("stderr reader");
    let mut err = err;
    if status.is_none() {
        err.extend_from_slice(b" (killed: timed out)");
    }
    (status, out, err)
}

/// 1 MiB of random bytes over TLS 1.3 (TCP) and TLS 1.2 (Unix), each ended by the
/// client's close_notify: every byte comes back, then the server's close_notify.
fn python_payload_half_close(model: &str) {
    if !have("python3", &["--version"]) {
        return;
    }
    let path = temp_socket_path("tls");
    let path_text = path.display().to_string();
    let server = start_tls(model, &["--unix", &path_text]);
    let tcp = server.addr("tcp");
    for (target, version) in [(tcp, "1.3"), (format!("unix:{path_text}"), "1.2")] {
        let what = format!("{model} {target} TLS {version}");
        let line = assert_peer(&server, &what, &["payload", &target, version, "1048576"]);
        assert!(line.contains(&format!("TLSv{version}")), "{line}");
    }
    assert!(server.stderr().contains("SHA-256 fingerprint"));
    server.stop();
}

/// Closing first on a TLS connection (the idle timeout, a drain) sends close_notify
/// before the EOF: Python's `ssl` sees a clean TLS close, not a reset or a bare EOF.
fn idle_and_drain_send_close_notify(model: &str) {
    if !have("python3", &["--version"]) {
        return;
    }
    let server = start_tls(model, &["--idle-timeout", "1"]);
    let what = format!("{model} idle timeout");
    assert_peer(&server, &what, &["silent", &server.addr("tcp"), "1.3", "8"]);
    server.stop();
    let server = start_tls(model, &["-v"]);
    let addr = server.addr("tcp");
    let peer = thread::spawn(move || run_peer(&["silent", &addr, "1.2", "20"]));
    server.wait_for_log("TLS established");
    server.terminate();
    let (ok, line) = peer.join().expect("peer thread");
    let mut server = server;
    let status = server.wait_exit(PATIENCE);
    assert!(
        ok,
        "{model} drain: {line}\nserver log:\n{}",
        server.stderr()
    );
    assert!(status.is_some_and(|s| s.success()), "{}", server.stderr());
}

/// A refused PROXY header and a failed TLS handshake close with a lingering close: the
/// peer reads EOF (after the TLS alert), and the bytes it sends after that meet no reset.
fn refusals_linger(model: &str) {
    for (flag, request) in [
        (
            "--proxy-protocol",
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        ),
        ("--tls-self-signed", &[b'x'; 64][..]),
    ] {
        let server = Server::start(model, &["--tcp", "127.0.0.1:0", flag]);
        let mut conn = server.connect_conn();
        conn.write_all(request).expect("send");
        // Sent at once, so some of it is surely unread when the server gives up.
        conn.write_all(&[b'y'; 4096]).expect("send more");
        let (_alert, error) = conn.read_to_end_lossy();
        assert!(
            error.is_none(),
            "{model} {flag}: {error:?} instead of EOF\n{}",
            server.stderr()
        );
        common::cases::assert_lingers(&mut conn, flag);
        drop(conn);
        server.stop();
    }
}

/// A client sends 64 MiB over TLS without reading: the server stops reading it, its
/// memory stays bounded, and every byte comes back once the client reads.
fn python_unread_flood_bounded(model: &str) {
    if !have("python3", &["--version"]) {
        return;
    }
    let server = start_tls(model, &[]);
    let before = server.rss_kib();
    let mut child = Command::new("python3")
        .arg(peer_script())
        .args(["flood", &server.addr("tcp"), "1.3", &(64 << 20).to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut stdin = child.stdin.take().expect("stdin piped");
    let stdout = child.stdout.take().expect("stdout piped");
    let (lines_tx, lines) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let blocked = lines
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| {
            panic!(
                "{model}: the flood never blocked; log:\n{}",
                server.stderr()
            )
        });
    assert!(blocked.starts_with("blocked "), "{blocked}");
    let during = server.rss_kib();
    eprintln!(
        "{model}: server RSS {before} KiB before, {during} KiB during a 64 MiB TLS flood ({blocked})"
    );
    assert!(
        during < before + 16 * 1024,
        "server RSS grew from {before} KiB to {during} KiB while the client did not read"
    );
    writeln!(stdin, "go").expect("tell the peer to read");
    let result = lines
        .recv_timeout(Duration::from_secs(90))
        .unwrap_or_else(|_| "(no result line)".into());
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        result.starts_with("ok "),
        "{model}: {result}\nlog:\n{}",
        server.stderr()
    );
    server.stop();
}

/// `openssl s_client` with TLS 1.2 and 1.3: 1 MiB of random text ending in `quit\n` to
/// until-quit comes back byte-exact, then the server's close_notify ends s_client.
fn openssl_s_client_until_quit(model: &str) {
    if !have("openssl", &["version"]) {
        return;
    }
    let server = start_tls(model, &["--protocol", "until-quit"]);
    // Hex text: s_client is a line-oriented tool, and hex never spells "quit".
    let mut payload: Vec<u8> = pattern(512 * 1024, 16)
        .iter()
        .flat_map(|b| format!("{b:02x}").into_bytes())
        .collect();
    for line_end in (79..payload.len()).step_by(80) {
        payload[line_end] = b'\n';
    }
    payload.extend_from_slice(b"\nquit\n");
    for version in ["-tls1_2", "-tls1_3"] {
        let mut child = Command::new("openssl")
            .args(["s_client", "-connect", &server.addr("tcp"), version])
            .args(["-quiet", "-ign_eof", "-nocommands"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("openssl");
        let mut stdin = child.stdin.take().expect("stdin piped");
        let input = payload.clone();
        let writer = thread::spawn(move || {
            let _ = stdin.write_all(&input);
            // s_client keeps reading after its stdin ends (-ign_eof).
        });
        let (ok, stdout, stderr) = wait_with_timeout(child, Duration::from_secs(60));
        writer.join().expect("writer");
        assert!(
            stdout == payload,
            "{model} {version}: {} bytes back of {} (exit ok: {ok}); s_client said:\n{}\nlog:\n{}",
            stdout.len(),
            payload.len(),
            String::from_utf8_lossy(&stderr),
            server.stderr()
        );
    }
    server.stop();
}

/// Bytes that are not TLS close only that connection, with an alert or EOF and one log
/// line; a TLS client at the same time is served.
fn garbage_handshake_closes_only_that_connection(model: &str) {
    if !have("python3", &["--version"]) {
        return;
    }
    let server = start_tls(model, &[]);
    let mut garbage = TcpStream::connect(server.addr("tcp")).expect("connect");
    garbage.set_read_timeout(Some(PATIENCE)).unwrap();
    garbage.write_all(&pattern(4096, 7)).expect("send garbage");
    let mut reply = Vec::new();
    let _ = garbage.read_to_end(&mut reply);
    assert!(
        reply.is_empty() || reply[0] == 21,
        "garbage got {} bytes that are not an alert",
        reply.len()
    );
    server.wait_for_log("TLS handshake failed");
    assert_eq!(server.stderr().matches("TLS handshake failed").count(), 1);
    assert_peer(
        &server,
        model,
        &["payload", &server.addr("tcp"), "1.3", "65536"],
    );
    server.stop();
}

/// A free loopback TCP port (bound, read, released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free port")
}

/// HAProxy on two loopback ports, relaying to `backend` with `send-proxy` on the first
/// and `send-proxy-v2` on the second; killed on drop.
struct Haproxy {
    child: Child,
    ports: [u16; 2],
    _config: tempfile::Config,
}

mod tempfile {
    use std::path::PathBuf;

    /// A config file removed on drop.
    pub struct Config(pub PathBuf);

    impl Drop for Config {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

impl Haproxy {
    fn start(backend: &str) -> Haproxy {
        let ports = [free_port(), free_port()];
        let config = format!(
            "global\n    maxconn 200\n\
             defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 30s\n    timeout server 30s\n\
             frontend v1\n    bind 127.0.0.1:{}\n    default_backend reverb_v1\n\
             backend reverb_v1\n    server reverb {backend} send-proxy\n\
             frontend v2\n    bind 127.0.0.1:{}\n    default_backend reverb_v2\n\
             backend reverb_v2\n    server reverb {backend} send-proxy-v2\n",
            ports[0], ports[1]
        );
        let path = std::env::temp_dir().join(format!(
            "reverb-haproxy-{}-{}.cfg",
            std::process::id(),
            ports[0]
        ));
        std::fs::write(&path, config).expect("write haproxy config");
        let child = Command::new("haproxy")
            .args(["-db", "-f"])
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("haproxy");
        let haproxy = Haproxy {
            child,
            ports,
            _config: tempfile::Config(path),
        };
        let deadline = Instant::now() + PATIENCE;
        for port in ports {
            while TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "haproxy never listened on {port}"
                );
                thread::sleep(Duration::from_millis(50));
            }
        }
        haproxy
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Through HAProxy with `send-proxy` (v1) and `send-proxy-v2`: the greeting names the
/// client's own address and the address it reached, a payload comes back byte-exact
/// after a half-close, and reverb's log names the client, not HAProxy.
fn haproxy_send_proxy_v1_and_v2(model: &str) {
    if !have("haproxy", &["-v"]) {
        return;
    }
    let server = Server::start(
        model,
        &[
            "--tcp",
            "127.0.0.1:0",
            "--proxy-protocol",
            "--greeting",
            "hello {peer}, you reached {local}\n",
            "--protocol",
            "lines",
            "--panic-on",
            "boom",
            "-v",
        ],
    );
    let haproxy = Haproxy::start(&server.addr("tcp"));
    for port in haproxy.ports {
        let client = TcpStream::connect(("127.0.0.1", port)).expect("connect to haproxy");
        client.set_read_timeout(Some(PATIENCE)).unwrap();
        let me = client.local_addr().expect("local addr");
        let mut reader = BufReader::new(client.try_clone().expect("clone"));
        let mut greeting = String::new();
        reader.read_line(&mut greeting).expect("greeting");
        assert_eq!(
            greeting,
            format!("hello {me}, you reached 127.0.0.1:{port}\n"),
            "{model} via haproxy port {port}"
        );
        let payload: Vec<u8> = pattern(100_000, u64::from(port))
            .iter()
            .flat_map(|b| format!("{b:02x}\n").into_bytes())
            .collect();
        let mut writer = client.try_clone().expect("clone");
        let input = payload.clone();
        let sender = thread::spawn(move || {
            writer.write_all(&input).expect("send");
            writer.shutdown(Shutdown::Write).expect("half-close");
        });
        let mut back = Vec::new();
        reader.read_to_end(&mut back).expect("read to EOF");
        sender.join().expect("sender");
        assert!(
            back == payload,
            "{model}: {} bytes back of {}",
            back.len(),
            payload.len()
        );
        // A panic is logged with the client's address, not HAProxy's.
        let mut client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        client.set_read_timeout(Some(PATIENCE)).unwrap();
        let me = client.local_addr().expect("local addr");
        client.write_all(b"boom\n").expect("send");
        let mut rest = Vec::new();
        let _ = client.read_to_end(&mut rest);
        server.wait_for_log_line(&["handler panicked", &format!("peer={me}")]);
    }
    server.stop();
}

/// Seconds until the server closes `stream` (EOF or reset), at most `limit`.
fn seconds_until_closed(stream: &mut TcpStream, since: Instant, limit: Duration) -> f64 {
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return since.elapsed().as_secs_f64(),
            Ok(_) => {}
        }
    }
}

/// A request that is not a PROXY header is refused at once, a header trickled slower than
/// `--proxy-timeout` is cut at the deadline (a slowloris cannot push it back), each with
/// one log line naming the socket's peer; a v2 LOCAL header (a load balancer's health
/// check) is served with the real addresses, undisturbed by the others.
fn proxy_header_refusals_and_deadline(model: &str) {
    let server = Server::start(
        model,
        &[
            "--tcp",
            "127.0.0.1:0",
            "--proxy-protocol",
            "--proxy-timeout",
            "1",
            "--greeting",
            "{peer}\n",
        ],
    );
    let addr = server.addr("tcp");
    let health_check = || {
        let local = TcpStream::connect(&addr).expect("connect");
        local.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        header.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        (&local).write_all(&header).expect("v2 LOCAL header");
        local
    };
    // `blocking` serves one client at a time, so there it comes after the others.
    let mut early = (model != "blocking").then(health_check);

    let mut http = TcpStream::connect(&addr).expect("connect");
    let http_peer = http.local_addr().unwrap();
    let start = Instant::now();
    http.write_all(b"GET / HTTP/1.1\r\n\r\n").expect("send");
    let refused_after = seconds_until_closed(&mut http, start, PATIENCE);
    assert!(
        refused_after < 0.9,
        "a non-header is refused at once, not after {refused_after} s"
    );

    let mut slow = TcpStream::connect(&addr).expect("connect");
    let slow_peer = slow.local_addr().unwrap();
    let start = Instant::now();
    let mut trickle = slow.try_clone().expect("clone");
    let trickler = thread::spawn(move || {
        for byte in b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n" {
            if trickle.write_all(&[*byte]).is_err() {
                break;
            }
            thread::sleep(Duration::from_millis(200));
        }
    });
    let cut_after = seconds_until_closed(&mut slow, start, PATIENCE);
    let _ = trickler.join();
    assert!(
        (0.9..5.0).contains(&cut_after),
        "{model}: the trickled header was cut after {cut_after} s, not at the 1 s deadline"
    );
    server.wait_for_log_line(&[
        "closing: no PROXY protocol header: ",
        &format!("peer={http_peer}"),
    ]);
    server.wait_for_log_line(&[
        "closing: no PROXY protocol header within 1.0 s of accept",
        &format!("peer={slow_peer}"),
    ]);

    let mut local = early.take().unwrap_or_else(health_check);
    let mut reader = BufReader::new(local.try_clone().expect("clone"));
    let mut greeting = String::new();
    reader.read_line(&mut greeting).expect("greeting");
    assert_eq!(greeting, format!("{}\n", local.local_addr().unwrap()));
    local.write_all(b"still here").expect("send");
    local.shutdown(Shutdown::Write).expect("half-close");
    let mut back = Vec::new();
    reader.read_to_end(&mut back).expect("echo");
    assert_eq!(back, b"still here");
    let log = server.stderr();
    assert_eq!(
        log.matches(&http_peer.to_string()).count(),
        1,
        "one line per refusal:\n{log}"
    );
    assert_eq!(
        log.matches(&slow_peer.to_string()).count(),
        1,
        "one line per refusal:\n{log}"
    );
    server.stop();
}

/// A client that connects and never finishes its TLS handshake is cut at
/// `--tls-handshake-timeout` with one log line; others are served meanwhile.
fn tls_handshake_deadline(model: &str) {
    let server = start_tls(model, &["--tls-handshake-timeout", "1"]);
    let mut stalled = TcpStream::connect(server.addr("tcp")).expect("connect");
    let stalled_peer = stalled.local_addr().unwrap();
    let start = Instant::now();
    // Half a ClientHello record header, then nothing.
    stalled.write_all(&[0x16, 0x03, 0x01]).expect("send");
    // Another client is served meanwhile (on its own thread, so the cut is timed here).
    let target = server.addr("tcp");
    let other = have("python3", &["--version"])
        .then(|| thread::spawn(move || run_peer(&["payload", &target, "1.3", "65536"])));
    let cut_after = seconds_until_closed(&mut stalled, start, PATIENCE);
    if let Some(other) = other {
        let (ok, line) = other.join().expect("peer thread");
        assert!(ok, "{model}: {line}");
    }
    assert!(
        (0.9..5.0).contains(&cut_after),
        "{model}: the stalled handshake was cut after {cut_after} s, not at the 1 s deadline"
    );
    server.wait_for_log_line(&[
        "closing: TLS handshake not finished within 1.0 s of accept",
        &format!("peer={stalled_peer}"),
    ]);
    assert_eq!(
        server.stderr().matches(&stalled_peer.to_string()).count(),
        1
    );
    server.stop();
}

/// A greeting over TLS is owed before the handshake ends and cannot be sent until it does:
/// the client gets the greeting, then its bytes back. Once with a short greeting (what is
/// owed then is more than what can be sent), once with one longer than `--max-buffer`: the
/// server must go on reading the handshake (the bound counts what can be sent) instead of
/// waiting, reading nothing, for the handshake deadline.
fn greeting_past_max_buffer(model: &str) {
    let long = format!("{}\n", "g".repeat(300));
    for (greeting, max_buffer) in [("hello\n", "256K"), (long.as_str(), "64")] {
        let server = start_tls(
            model,
            &[
                "--greeting",
                greeting,
                "--max-buffer",
                max_buffer,
                "--tls-handshake-timeout",
                "3",
            ],
        );
        let port = server.addr("tcp").rsplit(':').next().unwrap().to_string();
        let target = format!("tls://127.0.0.1:{port}");
        let (code, out, err) = run_reverb(&["client", &target, "--insecure"], b"past the bound\n");
        assert_eq!(
            String::from_utf8_lossy(&out),
            format!("{greeting}past the bound\n"),
            "{model}, --max-buffer {max_buffer}: exit {code:?}; client said: {err}\nserver log:\n{}",
            server.stderr()
        );
        assert_eq!(code, Some(0), "{model}: {err}");
        server.stop();
    }
}

/// Runs `reverb serve ARGS` expecting it to exit at once; returns (code, stderr).
fn serve_fails(args: &[&str]) -> (Option<i32>, String) {
    let child = common::reverb()
        .arg("serve")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn reverb");
    let mut child = child;
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "serve {args:?} did not exit");
        thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    let _ = child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr);
    (status.code(), stderr)
}

#[test]
fn bad_certificate_or_key_files_exit_1_naming_the_file() {
    let dir = std::env::temp_dir().join(format!("reverb-tls-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let missing = dir.join("missing.pem");
    let g = garbage.display().to_string();
    let m = missing.display().to_string();
    let cases = [
        (vec!["--tls-cert", &m, "--tls-key", &g], "cannot read", &m),
        (
            vec!["--tls-cert", &g, "--tls-key", &g],
            "no certificate found",
            &g,
        ),
    ];
    for (flags, what, file) in cases {
        let mut args = vec!["--tcp", "127.0.0.1:0"];
        args.extend(flags);
        let (code, stderr) = serve_fails(&args);
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains(what) && stderr.contains(file.as_str()),
            "{stderr}"
        );
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    }
    let (code, stderr) = serve_fails(&["--tcp", "127.0.0.1:0", "--tls-cert", &g]);
    assert_eq!(code, Some(2), "--tls-cert needs --tls-key: {stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_greeting_with_an_unknown_placeholder_is_a_usage_error() {
    let (code, stderr) = serve_fails(&["--tcp", "127.0.0.1:0", "--greeting", "hi {user}"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("{user}") && stderr.contains("{peer}"),
        "{stderr}"
    );
}

/// A test CA and a certificate it signed for `localhost`, made by openssl (a tool nobody
/// here wrote), in a fresh directory: (dir, CA certificate, leaf certificate, leaf key).
fn openssl_certificate(tag: &str) -> Option<(PathBuf, PathBuf, PathBuf, PathBuf)> {
    if !have("openssl", &["version"]) {
        return None;
    }
    let dir = std::env::temp_dir().join(format!("reverb-tls-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = |name: &str| dir.join(name).display().to_string();
    std::fs::write(
        file("leaf.ext"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let steps: [Vec<String>; 3] = [
        [
            &["req", "-x509"][..],
            &ec,
            &["-days", "2", "-subj", "/CN=reverb test CA"],
        ]
        .concat()
        .iter()
        .map(|s| s.to_string())
        .chain([
            "-keyout".into(),
            file("ca.key"),
            "-out".into(),
            file("ca.pem"),
        ])
        .collect(),
        [&["req"][..], &ec, &["-subj", "/CN=localhost"]]
            .concat()
            .iter()
            .map(|s| s.to_string())
            .chain([
                "-keyout".into(),
                file("key.pem"),
                "-out".into(),
                file("leaf.csr"),
            ])
            .collect(),
        [
            "x509",
            "-req",
            "-days",
            "2",
            "-in",
            &file("leaf.csr"),
            "-CA",
            &file("ca.pem"),
            "-CAkey",
            &file("ca.key"),
            "-CAcreateserial",
            "-extfile",
            &file("leaf.ext"),
            "-out",
            &file("cert.pem"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
    ];
    for step in steps {
        let output = Command::new("openssl")
            .args(&step)
            .stdin(Stdio::null())
            .output()
            .expect("openssl");
        assert!(
            output.status.success(),
            "openssl {step:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Some((
        dir.clone(),
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    ))
}

/// Runs `reverb ARGS` with `stdin`; returns (exit code, stdout, stderr).
fn run_reverb(args: &[&str], stdin: &[u8]) -> (Option<i32>, Vec<u8>, String) {
    let mut child = common::reverb()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn reverb");
    let mut input = child.stdin.take().expect("stdin");
    let bytes = stdin.to_vec();
    let writer = thread::spawn(move || {
        let _ = input.write_all(&bytes);
    });
    let (status, out, err) = wait_for(child, Duration::from_secs(60));
    let _ = writer.join();
    (
        status.and_then(|s| s.code()),
        out,
        String::from_utf8_lossy(&err).into_owned(),
    )
}

/// `reverb client tls://` and `reverb bench tls://` against a certificate made by
/// openssl: verified with `--ca` and SNI `localhost`, refused without it or for a name
/// the certificate does not hold, and accepted with `--insecure`.
#[test]
fn client_and_bench_speak_tls() {
    let Some((dir, ca, cert, key)) = openssl_certificate("client") else {
        return;
    };
    let (cert_text, key_text) = (cert.display().to_string(), key.display().to_string());
    let ca_text = ca.display().to_string();
    let server = Server::start(
        "epoll",
        &[
            "--tcp",
            "127.0.0.1:0",
            "--tls-cert",
            &cert_text,
            "--tls-key",
            &key_text,
        ],
    );
    let port = server.addr("tcp").rsplit(':').next().unwrap().to_string();
    let by_name = format!("tls://localhost:{port}");
    let by_ip = format!("tls://127.0.0.1:{port}");
    let payload = pattern(300_000, 3);

    let (code, out, err) = run_reverb(&["client", &by_name, "--ca", &ca_text], &payload);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out == payload,
        "{} bytes back of {}",
        out.len(),
        payload.len()
    );

    let (code, out, err) = run_reverb(&["client", &by_ip, "--insecure"], &payload);
    assert_eq!(code, Some(0), "{err}");
    assert!(out == payload);

    let (code, _, err) = run_reverb(&["client", &by_name], b"x");
    assert_eq!(code, Some(1), "an unknown issuer is refused: {err}");
    assert!(
        err.contains("cannot connect to tls://") && err.contains("UnknownIssuer"),
        "{err}"
    );
    let (code, _, err) = run_reverb(&["client", &by_ip, "--ca", &ca_text], b"x");
    assert_eq!(
        code,
        Some(1),
        "127.0.0.1 is not a name in the certificate: {err}"
    );
    assert!(err.contains("not valid for name"), "{err}");
    let (code, _, err) = run_reverb(&["client", &server.addr("tcp"), "--insecure"], b"x");
    assert_eq!(code, Some(2), "--insecure with tcp://: {err}");

    let (code, out, err) = run_reverb(
        &[
            "bench",
            &by_name,
            "--ca",
            &ca_text,
            "--conns",
            "4",
            "--size",
            "1024",
            "--duration",
            "1",
            "--warmup",
            "0",
            "--json",
        ],
        b"",
    );
    assert_eq!(code, Some(0), "bench over TLS: {err}");
    let report: serde_json::Value = serde_json::from_slice(&out).expect("one JSON object");
    assert!(report["msgs"].as_u64().unwrap_or(0) > 0, "{report}");
    assert_eq!(report["mismatches"], 0);
    server.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// PROXY header first, then TLS, as a balancer relaying TCP sends them: Python's ssl
/// through HAProxy (both versions) gets its payload back, and reverb's log names the
/// client behind HAProxy.
#[test]
fn haproxy_in_front_of_tls() {
    if !have("haproxy", &["-v"]) || !have("python3", &["--version"]) {
        return;
    }
    let server = start_tls("epoll", &["--proxy-protocol", "-v"]);
    let haproxy = Haproxy::start(&server.addr("tcp"));
    for (port, version) in haproxy.ports.iter().zip([1, 2]) {
        let (what, target) = (
            format!("through haproxy port {port}"),
            format!("127.0.0.1:{port}"),
        );
        assert_peer(&server, &what, &["payload", &target, "1.3", "1048576"]);
        server.wait_for_log(&format!("PROXY v{version} header: client 127.0.0.1:"));
    }
    server.wait_for_log("TLS established");
    server.stop();
}

/// Out of descriptors, a connection whose setup deadline cannot be watched (the watcher's
/// duplicate of its socket cannot be made) is refused rather than served without one:
/// every client that sends no PROXY header is closed within a few `--proxy-timeout`s,
/// however the server's descriptors fall. Two limits one apart, so that in one of them an
/// accept takes the last descriptor and the duplicate fails.
#[test]
fn proxy_deadline_is_kept_out_of_descriptors() {
    for model in ["epoll", "poll", "async", "tokio", "uring", "threaded"] {
        for limit in [40, 41] {
            proxy_deadline_kept_at(model, limit);
        }
    }
}

fn proxy_deadline_kept_at(model: &str, limit: u32) {
    {
        let args = [
            "--tcp",
            "127.0.0.1:0",
            "--proxy-protocol",
            "--proxy-timeout",
            "1",
        ];
        let server = Server::start_with_fd_limit(model, &args, limit);
        let addr = server.addr("tcp");
        let clients: Vec<TcpStream> = (0..30)
            .map(|_| TcpStream::connect(&addr).expect("connect"))
            .collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        for (n, mut client) in clients.into_iter().enumerate() {
            let left = deadline.saturating_duration_since(Instant::now());
            client
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            let mut buf = [0u8; 64];
            let open = match client.read(&mut buf) {
                Ok(0) => false,
                Ok(_) => true,
                Err(e) => matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
            };
            assert!(
                !open,
                "{model}, limit {limit}: client {n} still open 10 s after connecting with no PROXY \
                 header and --proxy-timeout 1; {}",
                server.stderr()
            );
        }
    }
}

/// `pool` with every worker busy: a silent client waiting in the queue is still cut
/// `--proxy-timeout` after accept (the deadline counts from accept, not from when a worker
/// takes it), so silent peers cannot hold the workers one after another.
#[test]
fn pool_setup_deadline_counts_from_accept() {
    let args = [
        "--tcp",
        "127.0.0.1:0",
        "--threads",
        "1",
        "--proxy-protocol",
        "--proxy-timeout",
        "1",
    ];
    let server = Server::start("pool", &args);
    let addr = server.addr("tcp");
    let mut busy = TcpStream::connect(&addr).expect("connect");
    busy.set_read_timeout(Some(PATIENCE)).unwrap();
    busy.write_all(b"PROXY UNKNOWN\r\nhold\n").unwrap();
    let mut echoed = [0u8; 5];
    busy.read_exact(&mut echoed)
        .expect("the only worker serves it");
    let mut silent = TcpStream::connect(&addr).expect("connect");
    let start = Instant::now();
    let closed_after = seconds_until_closed(&mut silent, start, PATIENCE);
    assert!(
        closed_after < 4.0,
        "a queued silent client was cut {closed_after:.1} s after connecting, with \
         --proxy-timeout 1 and the only worker busy"
    );
    drop(busy);
}
