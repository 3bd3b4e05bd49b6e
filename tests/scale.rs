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

/// What the server did with one connection that sent one line.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// The line came back whole.
    Echoed,
    /// The server closed the connection: EOF or a reset, at once rather than never.
    Closed,
}

/// Sends connection `n`'s line on `stream` and says whether the server echoed or closed it.
fn echo_or_close(stream: &mut TcpStream, n: usize) -> Outcome {
    if let Err(e) = stream.write_all(line_of(n).as_bytes()) {
        assert!(
            matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe),
            "connection {n}: write failed: {e}"
        );
        return Outcome::Closed;
    }
    echoed_or_closed(stream, n)
}

/// Connection `n`'s line.
fn line_of(n: usize) -> String {
    format!("{n:07}\n")
}

/// Whether the server echoed connection `n`'s line, already sent on `stream`, or closed it.
fn echoed_or_closed(stream: &mut TcpStream, n: usize) -> Outcome {
    let line = line_of(n);
    let mut reply = [0u8; 8];
    match stream.read_exact(&mut reply) {
        Ok(()) => {
            assert_eq!(reply, *line.as_bytes(), "connection {n}");
            Outcome::Echoed
        }
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
            ) =>
        {
            Outcome::Closed
        }
        Err(e) => panic!("connection {n}: expected its echo, EOF or a reset, got {e}"),
    }
}

#[test]
fn select_closes_connections_past_fd_setsize_and_serves_the_rest() {
    with_server("select", 2_000, |server| {
        // One connection at a time, each settled by its echo before the next connects: a
        // returned `connect` does not mean the server has accepted it (the client's final
        // ACK may wait in a busy CPU's backlog while later handshakes complete), so opening
        // them all first would let the kernel hand them over in another order.
        let mut served = Vec::new();
        let mut closed = 0;
        for n in 0..1_100 {
            let mut stream = server.connect_tcp();
            match echo_or_close(&mut stream, n) {
                Outcome::Echoed => {
                    // Served ones keep their descriptors, so the server stays full.
                    assert_eq!(closed, 0, "connection {n} served after one was closed");
                    served.push(stream);
                }
                Outcome::Closed => closed += 1,
            }
        }
        // The server holds fewer than a dozen descriptors of its own, so at least the first
        // 1,000 fit below 1,024; every later one got a descriptor of 1,024 or more and was
        // closed at once instead of left waiting for a server that cannot watch it.
        assert!(
            (1_000..1_024).contains(&served.len()),
            "{} served, {closed} closed",
            served.len()
        );
        server.wait_for_log("fd 1024 >= FD_SETSIZE (1024)");

        // With every descriptor below 1,024 taken, order no longer matters, so a backlog may
        // build again, as it did before this test went one at a time: while the server is
        // stopped, 20 clients connect and send their line. Once it runs on, it takes them
        // from the backlog one after another, and each is closed: none left hanging behind
        // a refused neighbour, none watched past the cap.
        server.signal("-STOP");
        let burst: Vec<_> = (1_100..1_120)
            .map(|n| {
                let mut stream = server.connect_tcp();
                let sent = stream.write_all(line_of(n).as_bytes());
                (n, stream, sent)
            })
            .collect();
        server.signal("-CONT");
        for (n, mut stream, sent) in burst {
            sent.unwrap_or_else(|e| panic!("connection {n}: send to a stopped server: {e}"));
            assert_eq!(
                echoed_or_closed(&mut stream, n),
                Outcome::Closed,
                "connection {n}, of a burst past the cap"
            );
        }

        // The server goes on: once early clients leave, a new one is served.
        served.drain(..20);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut fresh = server.connect_tcp();
            if echo_or_close(&mut fresh, 0) == Outcome::Echoed {
                break;
            }
            // Accepted before the server saw the departures, so it was past the cap too.
            assert!(Instant::now() < deadline, "no new connection served");
            thread::sleep(Duration::from_millis(50));
        }
        // And the fd sets were not corrupted: every connection it kept is still served.
        assert_all_echo(&mut served);
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

#[test]
fn async_serves_five_thousand_connections() {
    with_server("async", 11_000, |server| {
        let mut connections: Vec<TcpStream> = (0..5_000).map(|_| server.connect_tcp()).collect();
        assert_all_echo(&mut connections);
        assert_all_echo(&mut connections);
    });
}
