//! Input that is already queued when a readiness loop wakes must all be answered without
//! more arriving. `epoll` watches connections edge-triggered: the kernel reports a socket
//! once when something arrives, so a loop that reads only part of what waits, or reads
//! the last bytes without the EOF queued behind them, would never hear of the rest. The
//! server is stopped (SIGSTOP) while the client queues everything, so the whole of it is
//! waiting before the loop's next wait returns; the other readiness models are checked
//! the same way.

mod common;

use common::{Conn, PATIENCE, Server, pattern};
use std::io::Write;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

const MODELS: [&str; 4] = ["epoll", "poll", "select", "busy-poll"];

/// Sends `signal` (`STOP` or `CONT`) to `pid` and waits until the process is stopped or
/// running again, as `/proc/PID/stat` tells.
fn signal_and_wait(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .expect("running kill");
    assert!(status.success(), "kill -{signal} {pid}");
    let deadline = Instant::now() + PATIENCE;
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("server's stat");
        // The state follows the command name, which is in parentheses.
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.trim().chars().next());
        let is_stopped = state == Some('T');
        if is_stopped == (signal == "STOP") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "server {pid} never took SIGSTOP/SIGCONT"
        );
        thread::sleep(Duration::from_millis(5));
    }
}

/// A connection the server has accepted and watches: one byte went there and back.
fn watched_connection(server: &Server) -> Conn {
    let mut conn = server.connect_conn();
    conn.write_all(b"x").expect("send");
    assert_eq!(conn.read_exactly(1), b"x");
    conn
}

/// 8 KiB queued at once against `--max-buffer 1024`: each read may take at most 1 KiB, so
/// the loop must come back for the rest without the kernel reporting anything new.
fn input_past_one_read_is_all_answered(model: &str) {
    let server = Server::start(model, &["--tcp", "127.0.0.1:0", "--max-buffer", "1024"]);
    let mut conn = watched_connection(&server);
    let input = pattern(8 * 1024, 3);
    signal_and_wait(server.pid(), "STOP");
    conn.write_all(&input)
        .expect("send while the server is stopped");
    signal_and_wait(server.pid(), "CONT");
    assert_eq!(conn.read_exactly(input.len()), input, "{model}");
    server.stop();
}

/// The peer's last bytes and its EOF queued together: one read takes the bytes, and the
/// EOF must still be seen, so the reply ends with the server's EOF.
fn eof_queued_behind_the_last_bytes_is_seen(model: &str) {
    let server = Server::start(model, &["--tcp", "127.0.0.1:0"]);
    let mut conn = watched_connection(&server);
    signal_and_wait(server.pid(), "STOP");
    conn.write_all(b"hello")
        .expect("send while the server is stopped");
    conn.shutdown_write();
    signal_and_wait(server.pid(), "CONT");
    let (got, error) = conn.read_to_end_lossy();
    assert!(error.is_none(), "{model}: no EOF after {got:?}: {error:?}");
    assert_eq!(got, b"hello", "{model}");
    server.stop();
}

#[test]
fn queued_input_past_one_read_is_all_answered() {
    for model in MODELS {
        input_past_one_read_is_all_answered(model);
    }
}

#[test]
fn an_eof_queued_behind_the_last_bytes_is_seen() {
    for model in MODELS {
        eof_queued_behind_the_last_bytes_is_seen(model);
    }
}
