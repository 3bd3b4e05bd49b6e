//! Input that is already queued when a readiness loop wakes must all be answered without
//! more arriving. `epoll` watches connections edge-triggered: the kernel reports a socket
//! once when something arrives, so a loop that reads only part of what waits, or reads
//! the last bytes without the EOF queued behind them, would never hear of the rest. The
//! server is stopped (SIGSTOP) while the client queues everything, so the whole of it is
//! waiting before the loop's next wait returns; the other readiness models are checked
//! the same way, and so are `async` and `tokio`, whose reactors are edge-triggered too.

mod common;

use common::{Conn, FloodWriter, PATIENCE, Server, TcpQueues, pattern};
use std::io::Write;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

const MODELS: [&str; 6] = ["epoll", "poll", "select", "busy-poll", "async", "tokio"];

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

/// Sends all of `bytes` on `socket` with `flags`, or fails the test.
fn send_flags(socket: &impl std::os::fd::AsFd, bytes: &[u8], flags: libc::c_int) {
    let sent = socket2::SockRef::from(socket).send_with_flags(bytes, flags);
    assert_eq!(
        sent.ok(),
        Some(bytes.len()),
        "send {bytes:?} with flags {flags}"
    );
}

/// Urgent data queued in the middle of the input: a read stops at the urgent mark (tcp(7)),
/// short although more is queued behind it, so what follows the mark must still be read
/// without more arriving. The urgent byte itself is out of band (no `SO_OOBINLINE`): the
/// in-band bytes come back.
fn input_behind_an_urgent_mark_is_answered(model: &str) {
    let server = Server::start(model, &["--tcp", "127.0.0.1:0"]);
    let mut conn = watched_connection(&server);
    let Conn::Tcp(tcp) = &conn else {
        unreachable!("a TCP listener")
    };
    let tcp = tcp.try_clone().expect("clone");
    signal_and_wait(server.pid(), "STOP");
    send_flags(&tcp, b"abc", 0);
    send_flags(&tcp, b"!", libc::MSG_OOB);
    send_flags(&tcp, b"def", 0);
    signal_and_wait(server.pid(), "CONT");
    assert_eq!(conn.read_exactly(6), b"abcdef", "{model}");
    // Read on past the mark until a read finds nothing, and then no more: the connection
    // stays open and quiet, and the loop sleeps (busy-poll never does).
    if model == "busy-poll" {
        server.stop();
        return;
    }
    let (spent, spinning) = server.cpu_and_spinning_threads_over(Duration::from_secs(1));
    assert!(
        spinning.is_empty() && spent < Duration::from_millis(250),
        "{model}: {spent:?} of CPU in 1 s after urgent data, threads {spinning:?} never \
         slept: spinning"
    );
    drop(conn);
    server.stop();
}

/// A connection under backpressure (its client sends and reads nothing, so replies fill
/// `--max-buffer`) stops being read, and the loop sleeps: it is not served again and again
/// for input it will not take.
fn backpressure_does_not_spin(model: &str) {
    let server = Server::start(model, &["--tcp", "127.0.0.1:0", "--max-buffer", "4096"]);
    let conn = server.connect_slow_reader();
    // Until the kernel's buffers are full and a send times out (PATIENCE), bounded.
    let flood = FloodWriter::start(conn.try_clone(), b'b');
    // Replies at the client say the server accepted and serves it: a returned `connect` is
    // not an accepted connection (its final ACK may wait in a busy CPU's backlog), and one
    // still in the kernel's backlog would hold still queues and cost no CPU, spinning or not.
    let deadline = Instant::now() + PATIENCE;
    while TcpQueues::of_conn(&conn).is_none_or(|q| q.client_unread == 0) {
        assert!(
            Instant::now() < deadline,
            "{model}: no reply within {PATIENCE:?}"
        );
        thread::sleep(Duration::from_millis(5));
    }
    // Usually long enough for the client's and the server's buffers to fill; a span in
    // which they were still filling (a loaded machine) is measured again.
    thread::sleep(Duration::from_millis(500));
    let (spent, spinning) = server
        .cpu_and_spinning_threads_while_still(Duration::from_secs(1), || TcpQueues::of_conn(&conn));
    assert!(
        spinning.is_empty() && spent < Duration::from_millis(250),
        "{model}: {spent:?} of CPU in 1 s under backpressure, threads {spinning:?} never \
         slept: spinning"
    );
    drop(conn);
    server.stop();
    flood.join();
}

/// A Unix stream read stops after a message that carried descriptors (unix(7),
/// `SCM_RIGHTS`; the server reads without taking them, so the kernel closes them): the
/// bytes sent after it must still be read without more arriving.
fn input_behind_passed_descriptors_is_answered(model: &str) {
    use std::os::fd::AsRawFd;
    let dir = std::env::temp_dir();
    let name = format!("reverb-edge-{}-{model}.sock", std::process::id());
    let server = Server::start_in_dir(&dir, model, &["--unix", &name]);
    let mut conn = watched_connection(&server);
    let Conn::Unix(unix) = &conn else {
        unreachable!("a Unix listener")
    };
    let unix = unix.try_clone().expect("clone");
    signal_and_wait(server.pid(), "STOP");
    send_with_descriptor(&unix, b"ab", unix.as_raw_fd());
    conn.write_all(b"cd").expect("send");
    signal_and_wait(server.pid(), "CONT");
    // Wait for the whole reply without taking any of it: a read of the first part would
    // free room in the server's send buffer and so wake the server again, which would
    // hide a loop that stopped reading after the descriptors.
    assert!(
        queued_within(&unix, 4, Duration::from_secs(3)),
        "{model}: the bytes after the descriptors were not answered"
    );
    assert_eq!(conn.read_exactly(4), b"abcd", "{model}");
    server.stop();
}

/// Whether `bytes` bytes are queued for reading on `socket` within `patience`, looked at
/// with `MSG_PEEK`, so nothing is taken.
fn queued_within(socket: &impl std::os::fd::AsFd, bytes: usize, patience: Duration) -> bool {
    let deadline = Instant::now() + patience;
    let mut buf = vec![std::mem::MaybeUninit::<u8>::uninit(); bytes];
    loop {
        let peeked = socket2::SockRef::from(socket)
            .recv_with_flags(&mut buf, libc::MSG_PEEK | libc::MSG_DONTWAIT);
        if matches!(peeked, Ok(n) if n >= bytes) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Sends `bytes` with the descriptor `passed` attached (`SCM_RIGHTS`).
fn send_with_descriptor(socket: &impl std::os::fd::AsFd, bytes: &[u8], passed: libc::c_int) {
    // One control message, laid out as cmsg(3) says: its length (the header, aligned to
    // a word, and one descriptor: CMSG_LEN), level and type, then the descriptor, padded
    // to a word (CMSG_SPACE).
    let word = std::mem::size_of::<usize>();
    let align = |n: usize| n.div_ceil(word) * word;
    let header = align(std::mem::size_of::<libc::cmsghdr>());
    let int = std::mem::size_of::<libc::c_int>();
    let mut control = vec![0u8; header + align(int)];
    control[..word].copy_from_slice(&(header + int).to_ne_bytes());
    control[word..word + 4].copy_from_slice(&libc::SOL_SOCKET.to_ne_bytes());
    control[word + 4..word + 8].copy_from_slice(&libc::SCM_RIGHTS.to_ne_bytes());
    control[header..header + int].copy_from_slice(&passed.to_ne_bytes());
    let buffers = [std::io::IoSlice::new(bytes)];
    let msg = socket2::MsgHdr::new()
        .with_buffers(&buffers)
        .with_control(&control);
    let sent = socket2::SockRef::from(socket).sendmsg(&msg, 0);
    assert_eq!(sent.ok(), Some(bytes.len()), "sendmsg with a descriptor");
}

#[test]
fn input_behind_an_urgent_mark_is_all_answered() {
    for model in MODELS {
        input_behind_an_urgent_mark_is_answered(model);
    }
}

#[test]
fn input_behind_passed_descriptors_is_all_answered() {
    for model in MODELS {
        input_behind_passed_descriptors_is_answered(model);
    }
}

#[test]
fn backpressure_does_not_spin_the_loop() {
    for model in ["epoll", "poll", "select", "async", "tokio"] {
        backpressure_does_not_spin(model);
    }
}
