//! Many connections against the single-thread readiness models, through the binary.
//!
//! `select` must survive descriptors past FD_SETSIZE (closing those connections, never
//! leaving them hanging or corrupting its fd sets); `poll` has no such cap.

mod common;

use common::Server;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

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

/// Each test must finish well within this, debug build included.
const TIME_BUDGET: Duration = Duration::from_secs(20);

/// Raises this process's descriptor limit to `fds_needed` or more, starts `model` on a
/// TCP port, runs `body`, and stops the server (which must exit 0) within [`TIME_BUDGET`].
fn with_server(model: &str, fds_needed: u64, body: impl FnOnce(&Server)) {
    let limit = reverb::sys::raise_open_file_limit().expect("raise RLIMIT_NOFILE");
    assert!(
        limit >= fds_needed,
        "RLIMIT_NOFILE hard limit {limit} < {fds_needed}"
    );
    let started = Instant::now();
    let server = Server::start(model, &["--tcp", "127.0.0.1:0"]);
    body(&server);
    server.stop();
    let took = started.elapsed();
    assert!(took < TIME_BUDGET, "{model}: took {took:?}");
}

#[test]
fn select_closes_connections_past_fd_setsize_and_serves_the_rest() {
    with_server("select", 2_000, |server| {
        let mut connections: Vec<TcpStream> = (0..1_100).map(|_| server.connect_tcp()).collect();

        // The server holds fewer than a dozen descriptors of its own, so the first 1,000
        // connections are below 1,024 and must be served.
        assert_all_echo(&mut connections[..1_000]);

        // The last ones got descriptors of 1,024 or more: closed at once, so the client
        // reads EOF instead of waiting forever for a server that cannot watch it.
        for (n, stream) in connections.iter_mut().enumerate().skip(1_050) {
            let mut byte = [0u8; 1];
            match stream.read(&mut byte) {
                Ok(0) => {}
                Ok(_) => panic!("connection {n}: unexpected data"),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
                Err(e) => panic!("connection {n}: expected EOF, got {e}"),
            }
        }
        server.wait_for_log("fd 1024 >= FD_SETSIZE (1024)");

        // The server goes on: once early clients leave, a new one is served.
        connections.drain(..20);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut fresh = server.connect_tcp();
            let mut reply = [0u8; 8];
            if fresh.write_all(b"0000000\n").is_ok() && fresh.read_exact(&mut reply).is_ok() {
                assert_eq!(&reply, b"0000000\n");
                break;
            }
            // Accepted before the server saw the departures, so it was past the cap too.
            assert!(Instant::now() < deadline, "no new connection served");
            thread::sleep(Duration::from_millis(50));
        }
        assert_all_echo(&mut connections[..100]);
    });
}

#[test]
fn poll_serves_five_thousand_connections() {
    with_server("poll", 11_000, |server| {
        let mut connections: Vec<TcpStream> = (0..5_000).map(|_| server.connect_tcp()).collect();
        assert_all_echo(&mut connections);
        // Twice, so every connection is served again after all were open at once.
        assert_all_echo(&mut connections);
    });
}
