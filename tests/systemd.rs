//! Socket activation and readiness notification, with the real `systemd-socket-activate`
//! starting the real binary: it binds, waits for the first client, then execs reverb with
//! `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` set.

mod common;

use common::{PATIENCE, temp_socket_path};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const ACTIVATE: &str = "systemd-socket-activate";

/// Whether the tool is here; outside CI a missing tool skips with a message, in CI
/// (where `.ci/run` installs it) it fails.
fn has_activate() -> bool {
    let found = Command::new(ACTIVATE)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{ACTIVATE} is needed (.ci/run installs the systemd package)"
        );
        eprintln!("SKIPPED: install the systemd package for {ACTIVATE}");
    }
    found
}

/// A loopback port that was free a moment ago (the tool refuses port 0).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// `systemd-socket-activate ACTIVATE_ARGS... reverb serve SERVE_ARGS...`, waiting until
/// it has bound (it says so on stderr).
struct Activated {
    child: Child,
    stdout: Option<std::process::ChildStdout>,
}

impl Activated {
    fn start(activate_args: &[&str], serve_args: &[&str]) -> Activated {
        let mut child = Command::new(ACTIVATE)
            .args(activate_args)
            .arg(env!("CARGO_BIN_EXE_reverb"))
            .arg("serve")
            .args(serve_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start systemd-socket-activate");
        let stderr = child.stderr.take().expect("stderr");
        let (said, heard) = std::sync::mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("  activate/serve: {line}");
                let _ = said.send(line);
            }
        });
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = heard
                .recv_timeout(left)
                .expect("systemd-socket-activate listening");
            if line.starts_with("Listening on") {
                break;
            }
        }
        let stdout = child.stdout.take();
        Activated { child, stdout }
    }

    /// The readiness lines reverb printed once activated.
    fn readiness_lines(&mut self, count: usize) -> Vec<String> {
        let mut reader = BufReader::new(self.stdout.take().expect("stdout"));
        (0..count)
            .map(|_| {
                let mut line = String::new();
                reader.read_line(&mut line).expect("a readiness line");
                line.trim_end().to_string()
            })
            .collect()
    }

    fn terminate_and_wait(mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                assert!(status.success(), "reverb exit {status} after SIGTERM");
                return;
            }
            assert!(Instant::now() < deadline, "no exit after SIGTERM");
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Activated {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn tcp_is_served_from_the_passed_socket() {
    if !has_activate() {
        return;
    }
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut activated = Activated::start(
        &["-l", &addr, "--fdname=echo"],
        &["--model", "epoll", "--tcp", "127.0.0.1:1"],
    );
    let mut stream = TcpStream::connect(&addr).expect("connect");
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream.write_all(b"activated\n").unwrap();
    let mut reply = [0u8; 10];
    stream.read_exact(&mut reply).expect("echo");
    assert_eq!(&reply, b"activated\n");
    // The passed socket replaces the flags: nothing was bound on port 1.
    assert_eq!(
        activated.readiness_lines(1),
        [format!("listening tcp://{addr}")]
    );
    activated.terminate_and_wait();
}

#[test]
fn udp_is_served_from_the_passed_socket() {
    if !has_activate() {
        return;
    }
    let port = {
        let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let mut activated = Activated::start(&["--datagram", "-l", &addr], &["--model", "threaded"]);
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client.set_read_timeout(Some(PATIENCE)).unwrap();
    client.send_to(b"one datagram", &addr).unwrap();
    let mut reply = [0u8; 64];
    let (n, _) = client.recv_from(&mut reply).expect("echo");
    assert_eq!(&reply[..n], b"one datagram");
    assert_eq!(
        activated.readiness_lines(1),
        [format!("listening udp://{addr}")]
    );
    activated.terminate_and_wait();
}

#[test]
fn unix_is_served_and_its_file_left_to_the_manager() {
    if !has_activate() {
        return;
    }
    let path = temp_socket_path("activated");
    let path_text = path.to_str().unwrap().to_string();
    let mut activated = Activated::start(&["-l", &path_text], &["--model", "forking"]);
    let mut stream = UnixStream::connect(&path).expect("connect");
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream.write_all(b"unix\n").unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).expect("echo");
    assert_eq!(reply, b"unix\n");
    assert_eq!(
        activated.readiness_lines(1),
        [format!("listening unix://{path_text}")]
    );
    activated.terminate_and_wait();
    assert!(
        path.exists(),
        "the service manager's socket file is not ours to remove"
    );
    let _ = std::fs::remove_file(&path);
}

#[test]
fn unix_datagram_is_served_and_named_as_datagram() {
    if !has_activate() {
        return;
    }
    let path = temp_socket_path("activated-d");
    let path_text = path.to_str().unwrap().to_string();
    let mut activated = Activated::start(&["--datagram", "-l", &path_text], &["--model", "poll"]);
    // A datagram client needs an address of its own for the reply to reach it.
    let client_path = temp_socket_path("activated-d-client");
    let client = UnixDatagram::bind(&client_path).expect("client socket");
    client.set_read_timeout(Some(PATIENCE)).unwrap();
    client.send_to(b"unix datagram", &path).expect("send");
    let mut reply = [0u8; 64];
    let n = client.recv(&mut reply).expect("echo");
    assert_eq!(&reply[..n], b"unix datagram");
    assert_eq!(
        activated.readiness_lines(1),
        [format!("listening unix-dgram://{path_text}")]
    );
    activated.terminate_and_wait();
    assert!(
        path.exists(),
        "the service manager's socket file is not ours to remove"
    );
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&client_path);
}

#[test]
fn ready_and_stopping_reach_the_notify_socket() {
    if !has_activate() {
        return;
    }
    let notify_path = temp_socket_path("notify");
    let notify = UnixDatagram::bind(&notify_path).expect("notify socket");
    notify.set_read_timeout(Some(PATIENCE)).unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let setenv = format!("NOTIFY_SOCKET={}", notify_path.display());
    let activated = Activated::start(&["-l", &addr, "-E", &setenv], &["--model", "poll"]);
    let _client = TcpStream::connect(&addr).expect("connect");
    let mut message = [0u8; 256];
    let n = notify.recv(&mut message).expect("READY=1");
    assert_eq!(&message[..n], b"READY=1");
    activated.terminate_and_wait();
    let n = notify.recv(&mut message).expect("STOPPING=1");
    assert_eq!(&message[..n], b"STOPPING=1");
    let _ = std::fs::remove_file(&notify_path);
}

#[test]
fn a_full_notify_queue_never_holds_up_serving_or_stopping() {
    // A manager that does not read its notification socket: its queue is filled before
    // the server starts, so READY=1 (and later STOPPING=1) cannot be sent. The server
    // must say so and serve anyway; `poll` announces itself from the thread that serves.
    let notify_path = temp_socket_path("notify-full");
    let manager = UnixDatagram::bind(&notify_path).expect("notify socket");
    let filler = UnixDatagram::unbound().expect("filler");
    filler
        .connect(&notify_path)
        .expect("connect to the notify socket");
    filler.set_nonblocking(true).unwrap();
    let mut queued = 0;
    loop {
        match filler.send(b"STATUS=filling") {
            Ok(_) => queued += 1,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("filling the notify queue: {e}"),
        }
        assert!(queued < 100_000, "the notify queue never filled");
    }
    let notify_env = notify_path.to_str().unwrap();
    let server = common::Server::start_with_env(
        "poll",
        &["--tcp", "127.0.0.1:0"],
        &[("NOTIFY_SOCKET", notify_env)],
    );
    let conn = common::Conn::connect(&server.addrs[0]).expect("connect");
    let got = common::round_trip(conn, b"served meanwhile".to_vec());
    assert_eq!(got, b"served meanwhile");
    server.wait_for_log("READY=1 not sent");
    // SIGTERM and an exit 0 within its patience: STOPPING=1 cannot wait either.
    server.stop();
    drop(manager);
    let _ = std::fs::remove_file(&notify_path);
}

#[test]
fn a_sigterm_during_startup_never_announces_after_the_drain_began() {
    // 4096 pool threads take a while to start, so the SIGTERM lands while the model is
    // still starting: the manager must never hear READY=1 after STOPPING=1, and nothing
    // may print `listening` once the drain began (STOPPING=1 first says it began first).
    for round in 0..3 {
        let notify_path = temp_socket_path("notify-early-term");
        let manager = UnixDatagram::bind(&notify_path).expect("notify socket");
        let mut child = Command::new(env!("CARGO_BIN_EXE_reverb"))
            .args(["serve", "--model", "pool", "--threads", "4096"])
            .args(["--tcp", "127.0.0.1:0"])
            .env("NOTIFY_SOCKET", &notify_path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start reverb");
        thread::sleep(Duration::from_millis(100 + 50 * round));
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        let deadline = Instant::now() + PATIENCE * 3;
        let exit = loop {
            if let Some(exit) = child.try_wait().expect("wait") {
                break exit;
            }
            assert!(Instant::now() < deadline, "no exit after SIGTERM");
            thread::sleep(Duration::from_millis(20));
        };
        assert!(
            exit.success(),
            "reverb exit {exit} after a SIGTERM during startup"
        );
        let mut stdout = String::new();
        child
            .stdout
            .take()
            .expect("stdout")
            .read_to_string(&mut stdout)
            .expect("stdout");
        manager.set_nonblocking(true).unwrap();
        let mut heard = Vec::new();
        let mut message = [0u8; 256];
        while let Ok(n) = manager.recv(&mut message) {
            heard.push(String::from_utf8_lossy(&message[..n]).into_owned());
        }
        let _ = std::fs::remove_file(&notify_path);
        eprintln!("round {round}: heard {heard:?}, stdout {stdout:?}");
        let ready = heard.iter().position(|m| m == "READY=1");
        let stopping = heard.iter().position(|m| m == "STOPPING=1");
        if let (Some(ready), Some(stopping)) = (ready, stopping) {
            assert!(ready < stopping, "READY=1 after STOPPING=1: {heard:?}");
        }
        assert!(heard.len() <= 2, "a notification twice: {heard:?}");
        if ready.is_none() {
            assert!(
                !stdout.contains("listening"),
                "`listening` printed by a server never announced ready: {stdout:?}"
            );
        }
    }
}

#[test]
fn an_unreachable_notify_socket_is_named_in_the_warning() {
    // A regular file: connect(2) says "Connection refused", which hides what is wrong.
    let not_a_socket = temp_socket_path("notify-plain");
    std::fs::write(&not_a_socket, b"").expect("a regular file");
    let value = not_a_socket.to_str().unwrap();
    let server = common::Server::start_with_env(
        "poll",
        &["--tcp", "127.0.0.1:0"],
        &[("NOTIFY_SOCKET", value)],
    );
    server.wait_for_log(&format!("NOTIFY_SOCKET={value}: not a socket"));
    server.stop();
    let _ = std::fs::remove_file(&not_a_socket);
}
