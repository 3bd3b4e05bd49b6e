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
use std::process::{Child, Command, Stdio};
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
            garbage_handshake_closes_only_that_connection, haproxy_send_proxy_v1_and_v2],
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
fn wait_with_timeout(mut child: Child, timeout: Duration) -> (bool, Vec<u8>, Vec<u8>) {
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
    (status.is_some_and(|s| s.success()), out, err)
}

/// 1 MiB of random bytes over TLS 1.3 (TCP) and TLS 1.2 (Unix), each ended by the
/// client's close_notify: every byte comes back, then the server's close_notify.
fn python_payload_half_close(model: &str) {
    if !have("python3", &["--version"]) {
        return;
    }
    let path = temp_socket_path("tls");
    let path_text = path.display().to_string();
    let server = Server::start(
        model,
        &[
            "--tcp",
            "127.0.0.1:0",
            "--unix",
            &path_text,
            "--tls-self-signed",
        ],
    );
    let tcp = server.addr("tcp");
    for (target, version) in [(tcp, "1.3"), (format!("unix:{path_text}"), "1.2")] {
        let (ok, line) = run_peer(&["payload", &target, version, "1048576"]);
        assert!(
            ok,
            "{model} {target} TLS {version}: {line}\nserver log:\n{}",
            server.stderr()
        );
        assert!(line.contains(&format!("TLSv{version}")), "{line}");
    }
    assert!(server.stderr().contains("SHA-256 fingerprint"));
    server.stop();
}

/// A client sends 64 MiB over TLS without reading: the server stops reading it, its
/// memory stays bounded, and every byte comes back once the client reads.
fn python_unread_flood_bounded(model: &str) {
    if !have("python3", &["--version"]) {
        return;
    }
    let server = Server::start(model, &["--tcp", "127.0.0.1:0", "--tls-self-signed"]);
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
    let server = Server::start(
        model,
        &[
            "--tcp",
            "127.0.0.1:0",
            "--tls-self-signed",
            "--protocol",
            "until-quit",
        ],
    );
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
    let server = Server::start(model, &["--tcp", "127.0.0.1:0", "--tls-self-signed"]);
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
    let (ok, line) = run_peer(&["payload", &server.addr("tcp"), "1.3", "65536"]);
    assert!(ok, "{model}: {line}");
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
        server.wait_for_log(&format!("handler for {me} panicked"));
    }
    server.stop();
}
