//! Many connections against the single-thread readiness models, through the binary.
//!
//! `select` must survive descriptors past FD_SETSIZE (closing those connections, never
//! leaving them hanging or corrupting its fd sets); `poll` has no such cap.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// Every read in these tests gives up after this long instead of hanging.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A `reverb serve` process, killed if the test fails before it is stopped.
struct Server {
    child: Child,
    addr: SocketAddr,
    /// Collects the server's log as it is written, so the pipe never fills up.
    log: Option<thread::JoinHandle<String>>,
}

impl Server {
    fn start(model: &str) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_reverb"))
            .args(["serve", "--model", model, "--tcp", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start reverb serve");
        let mut stderr = child.stderr.take().expect("piped stderr");
        let log = thread::spawn(move || {
            let mut log = String::new();
            let _ = stderr.read_to_string(&mut log);
            log
        });
        let stdout = child.stdout.take().expect("piped stdout");
        let (sender, receiver) = mpsc::channel();
        thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = sender.send(line);
        });
        let line = receiver
            .recv_timeout(READ_TIMEOUT)
            .expect("server printed its listening line in time");
        let addr = line
            .trim()
            .strip_prefix("listening tcp://")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .expect("a socket address");
        Server {
            child,
            addr,
            log: Some(log),
        }
    }

    fn connect(&self) -> TcpStream {
        let stream = TcpStream::connect(self.addr).expect("connect");
        stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        stream
    }

    /// SIGTERM, then the exit status must be 0 within the drain timeout; returns the log.
    fn stop(mut self) -> String {
        send_sigterm(self.child.id());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let log = self.log.take().and_then(|log| log.join().ok());
                let log = log.unwrap_or_default();
                assert!(status.success(), "server exited with {status}; log:\n{log}");
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "server did not exit after SIGTERM"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends SIGTERM through kill(1): `unsafe` is denied outside `src/sys/`, tests included.
fn send_sigterm(pid: u32) {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -TERM {pid} failed");
}

/// Each of `connections` sends a distinct line and must get exactly it back.
fn assert_all_echo(connections: &mut [TcpStream]) {
    for (n, stream) in connections.iter_mut().enumerate() {
        stream.write_all(format!("{n:07}\n").as_bytes()).unwrap();
    }
    for (n, stream) in connections.iter_mut().enumerate() {
        let mut reply = [0u8; 8];
        stream
            .read_exact(&mut reply)
            .unwrap_or_else(|e| panic!("connection {n}: no echo: {e}"));
        assert_eq!(reply, *format!("{n:07}\n").as_bytes(), "connection {n}");
    }
}

fn raise_limit_to(needed: u64) {
    let limit = reverb::sys::raise_open_file_limit().expect("raise RLIMIT_NOFILE");
    assert!(
        limit >= needed,
        "RLIMIT_NOFILE hard limit {limit} < {needed}"
    );
}

#[test]
fn select_closes_connections_past_fd_setsize_and_serves_the_rest() {
    raise_limit_to(2_000);
    let started = Instant::now();
    let server = Server::start("select");
    let mut connections: Vec<TcpStream> = (0..1_100).map(|_| server.connect()).collect();

    // The server holds fewer than a dozen descriptors of its own, so the first 1,000
    // connections are below 1,024 and must be served.
    assert_all_echo(&mut connections[..1_000]);

    // The last ones got descriptors of 1,024 or more: closed at once, so the client reads
    // EOF instead of waiting forever for a server that cannot watch it.
    for (n, stream) in connections.iter_mut().enumerate().skip(1_050) {
        let mut byte = [0u8; 1];
        match stream.read(&mut byte) {
            Ok(0) => {}
            Ok(_) => panic!("connection {n}: unexpected data"),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Err(e) => panic!("connection {n}: expected EOF, got {e}"),
        }
    }

    // The server goes on: once early clients leave, a new one is served.
    connections.drain(..20);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut fresh = [server.connect()];
        fresh[0].write_all(b"0000000\n").unwrap();
        let mut reply = [0u8; 8];
        if fresh[0].read_exact(&mut reply).is_ok() {
            assert_eq!(&reply, b"0000000\n");
            break;
        }
        // Accepted before the server saw the departures, so it was past the cap too.
        assert!(Instant::now() < deadline, "no new connection served");
        thread::sleep(Duration::from_millis(50));
    }
    assert_all_echo(&mut connections[..100]);
    drop(connections);
    server.stop();
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn poll_serves_five_thousand_connections() {
    raise_limit_to(11_000);
    let started = Instant::now();
    let server = Server::start("poll");
    let mut connections: Vec<TcpStream> = (0..5_000).map(|_| server.connect()).collect();
    assert_all_echo(&mut connections);
    // Twice, so every connection is served again after all were open at once.
    assert_all_echo(&mut connections);
    drop(connections);
    server.stop();
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
}
