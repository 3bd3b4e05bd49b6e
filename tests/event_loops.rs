//! Several event loops (`--threads N`) in the readiness models: every loop serves, and
//! the limits stay global across loops.

mod common;

use common::{Conn, PATIENCE, Server, pattern, round_trip};
use std::io::Write;
use std::thread;

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
