//! Several event loops (`--threads N`) in the readiness models: every loop serves, and
//! the limits stay global across loops.

mod common;

use common::{Conn, PATIENCE, Server, pattern, reverb, round_trip};
use std::io::{Read, Write};
use std::process::Stdio;
use std::thread;
use std::time::{Duration, Instant};

/// 50 clients connected at once over 2 (or 3) loops each get their own bytes back; with
/// SO_REUSEPORT siblings the kernel spreads them, so every loop must be serving.
fn fifty_clients_over_loops(model: &str, threads: &str) {
    let server = Server::start(model, &["--threads", threads, "--tcp", "127.0.0.1:0"]);
    let addr = format!("tcp://{}", server.addr("tcp"));
    let conns: Vec<Conn> = (0..50).map(|_| Conn::connect(&addr).unwrap()).collect();
    let workers: Vec<_> = (conns.into_iter().enumerate())
        .map(|(n, conn)| {
            thread::spawn(move || {
                let input = pattern(32 * 1024, n as u64 + 7);
                round_trip(conn, input.clone()) == input
            })
        })
        .collect();
    for worker in workers {
        assert!(worker.join().unwrap(), "a client got wrong bytes");
    }
    server.stop();
}

/// `--max-conns` counts connections of every loop together.
fn max_conns_across_loops(model: &str) {
    let server = Server::start(
        model,
        &["--threads", "2", "--tcp", "127.0.0.1:0", "--max-conns", "6"],
    );
    let mut open: Vec<Conn> = (0..6).map(|_| server.connect_conn()).collect();
    for (n, conn) in open.iter_mut().enumerate() {
        conn.write_all(&[b'a' + n as u8]).unwrap();
        assert_eq!(conn.read_exactly(1), [b'a' + n as u8]);
    }
    for _ in 0..4 {
        let mut extra = server.connect_conn();
        assert!(
            extra.sees_close_within(PATIENCE),
            "a seventh connection is refused"
        );
    }
    server.stop();
}

/// How long a server whose loop cannot start may take to exit.
const START_FAILURE_LIMIT: Duration = Duration::from_secs(5);

/// Loop 1 of 3 cannot be set up (the loop helper's hidden test hook): the loops already
/// built must stop, and `serve` exits 1 within [`START_FAILURE_LIMIT`] with one error line
/// that names the loop.
fn loop_that_cannot_start_stops_the_server(model: &str) {
    let mut child = reverb()
        .args([
            "serve",
            "--model",
            model,
            "--threads",
            "3",
            "--tcp",
            "127.0.0.1:0",
        ])
        .env("REVERB_TEST_FAIL_LOOP", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("reverb starts");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waitpid") {
            break status;
        }
        if started.elapsed() > START_FAILURE_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{model}: still running {START_FAILURE_LIMIT:?} after loop 1 failed to start");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    let _ = child
        .stderr
        .take()
        .expect("piped")
        .read_to_string(&mut stderr);
    assert_eq!(
        status.code(),
        Some(1),
        "{model}: exit status; stderr: {stderr}"
    );
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("reverb: "))
        .collect();
    assert_eq!(errors.len(), 1, "{model}: one error line; stderr: {stderr}");
    assert!(
        errors[0].contains(&format!("cannot start {model} loop 1")),
        "{model}: the line names the loop: {}",
        errors[0]
    );
}

#[test]
fn epoll_loop_that_cannot_start() {
    loop_that_cannot_start_stops_the_server("epoll");
}

#[test]
fn async_loop_that_cannot_start() {
    loop_that_cannot_start_stops_the_server("async");
}

#[test]
fn tokio_loop_that_cannot_start() {
    loop_that_cannot_start_stops_the_server("tokio");
}

#[test]
fn uring_loop_that_cannot_start() {
    loop_that_cannot_start_stops_the_server("uring");
}

#[test]
fn epoll_two_loops() {
    fifty_clients_over_loops("epoll", "2");
}

#[test]
fn epoll_three_loops() {
    fifty_clients_over_loops("epoll", "3");
}

#[test]
fn epoll_max_conns_across_loops() {
    max_conns_across_loops("epoll");
}

#[test]
fn tokio_two_loops() {
    fifty_clients_over_loops("tokio", "2");
}

#[test]
fn tokio_max_conns_across_loops() {
    max_conns_across_loops("tokio");
}

#[test]
fn async_two_loops() {
    fifty_clients_over_loops("async", "2");
}

#[test]
fn async_max_conns_across_loops() {
    max_conns_across_loops("async");
}

#[test]
fn uring_two_loops() {
    fifty_clients_over_loops("uring", "2");
}

#[test]
fn uring_three_loops() {
    fifty_clients_over_loops("uring", "3");
}

#[test]
fn uring_max_conns_across_loops() {
    max_conns_across_loops("uring");
}
