//! The closes that protect what a peer is owed, seen from the peer: a connection refused by
//! `--max-conns` that already sent bytes reads EOF, not a reset; a lingering close past
//! its byte bound waits without spinning and ends at its inactivity bound; the lingering
//! thread sleeps once nothing lingers. `cargo test --test linger epoll::` runs one model.

mod common;

use common::{Conn, FloodWriter, PATIENCE, Server, TcpQueues};
use std::io::{Read, Write};
use std::thread;
use std::time::{Duration, Instant};

macro_rules! linger_cases {
    ($($case:ident: [$($model:ident),* $(,)?]),* $(,)?) => {
        $(
            mod $case {
                $(
                    #[test]
                    fn $model() {
                        super::$case(&super::cli_name(stringify!($model)));
                    }
                )*
            }
        )*
    };
}

linger_cases! {
    refused_peer_that_sent_first_reads_eof:
        [threaded, pool, forking, select, poll, epoll, own_runtime, tokio, uring],
    past_the_byte_bound_no_spin_and_the_inactivity_bound:
        [threaded, epoll, tokio],
}

/// The `--model` value for a module name: `own_runtime` is `async` (a keyword in Rust).
fn cli_name(module: &str) -> String {
    match module {
        "own_runtime" => "async".to_string(),
        other => other.replace('_', "-"),
    }
}

/// A client refused by `--max-conns` that sent bytes before the server took it from the
/// listen queue reads EOF: the refusal throws away what it sent before closing, so the
/// kernel does not answer the close with a reset. The server is stopped (SIGSTOP) while
/// the client connects and sends, so the bytes are surely there when it accepts.
fn refused_peer_that_sent_first_reads_eof(model: &str) {
    let server = Server::start(model, &["--tcp", "127.0.0.1:0", "--max-conns", "1"]);
    let mut held = server.connect_conn();
    held.write_all(b"1").unwrap();
    assert_eq!(held.read_exactly(1), b"1");
    server.signal("-STOP");
    let mut refused = server.connect_conn();
    let first = b"sent before the refusal";
    let sent = refused.write_all(first);
    // A write returns once the client's kernel holds the bytes; on a loaded machine they
    // may reach the server's socket later, after the refusal read what was there. Resumed
    // only once the server's socket holds them all, so the refusal surely finds them.
    if !TcpQueues::wait_server_unread(&refused, first.len()) {
        server.signal("-CONT");
        panic!("{model}: the refused client's bytes never reached the server's socket");
    }
    server.signal("-CONT");
    sent.expect("send");
    let mut buf = [0u8; 64];
    match refused.read(&mut buf) {
        Ok(0) => {}
        other => panic!("{model}: the refused client that sent first read {other:?}, not EOF"),
    }
    server.wait_for_log("--max-conns");
    // A FIN alone, not a FIN then a reset: the reset of a close that left our bytes unread
    // would arrive right behind the FIN (read returns EOF either way), and then fail the
    // next send at once. A send to a socket closed cleanly is taken; the reset it draws
    // comes later.
    thread::sleep(Duration::from_millis(200));
    let after = refused.write(b"x");
    assert!(
        after.is_ok(),
        "{model}: the refused client was reset, its bytes left unread: {after:?}"
    );
    drop(held);
    server.stop();
}

/// `--idle-timeout 1` cuts a client that floods the server and reads nothing; the
/// lingering close then throws away 1 MiB of the flood and stops reading, waiting only for
/// the client to take the replies still queued. While it waits, the server must not spin
/// (the socket stays readable: it must not be watched for input any more), and since the
/// client takes nothing, the close ends 2 s (the inactivity bound) after the last byte,
/// not at the 5 s bound in all: the client's blocked send then fails.
fn past_the_byte_bound_no_spin_and_the_inactivity_bound(model: &str) {
    let server = Server::start(model, &["--tcp", "127.0.0.1:0", "--idle-timeout", "1"]);
    let conn = server.connect_slow_reader();
    // Bounded in bytes and time; a send blocks at most PATIENCE (the socket's timeout).
    let flood = FloodWriter::start(conn.try_clone(), b'f');
    server.wait_for_log("closing: idle for");
    let cut_at = Instant::now();
    // Usually long enough for the lingering close to read past its byte bound; a span in
    // which it was still reading (a loaded machine) is measured again.
    thread::sleep(Duration::from_millis(300));
    // Spinning, whatever the machine's load: a thread that used CPU in that second
    // without sleeping once (a loaded machine may give a spinner little CPU, but never a
    // sleep), or more CPU than a waiting close could use.
    let (spent, spinning) = server
        .cpu_and_spinning_threads_while_still(Duration::from_secs(1), || TcpQueues::of_conn(&conn));
    assert!(
        spinning.is_empty(),
        "{model}: threads {spinning:?} used CPU for 1 s without sleeping, in a lingering \
         close that waits for its peer: spinning"
    );
    assert!(
        spent < Duration::from_millis(250),
        "{model}: {spent:?} of CPU in 1 s of a lingering close that waits for its peer: \
         spinning"
    );
    let (failed_at, error) = flood
        .failure_within(PATIENCE)
        .unwrap_or_else(|| panic!("{model}: the lingering close never ended"));
    let ended = failed_at - cut_at;
    assert!(
        (Duration::from_millis(1000)..Duration::from_millis(3800)).contains(&ended),
        "{model}: the lingering close of a peer that takes nothing ended {ended:?} after the \
         idle cut ({error}), not about 2 s after"
    );
    let sent = flood.join();
    assert!(sent > 1 << 20, "{model}: only {sent} bytes sent");
    drop(conn);
    server.stop();
}

/// Voluntary context switches of the process's thread named `name`, or `None` if no
/// thread has that name.
fn thread_wakeups(pid: u32, name: &str) -> Option<u64> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let dir = task.ok()?.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let status = std::fs::read_to_string(dir.join("status")).ok()?;
        return status
            .lines()
            .find_map(|line| line.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|n| n.trim().parse().ok());
    }
    None
}

/// The lingering thread of an event-loop model sleeps while a silent peer lingers (until
/// that peer's deadline: input wakes it) and once nothing lingers: after a client quits
/// and stays (so its close is handed to the thread), and again after it leaves, the thread
/// wakes at most a few times a second, not every few milliseconds.
#[test]
fn epoll_lingering_thread_sleeps_while_a_silent_peer_lingers_and_after() {
    let server = Server::start(
        "epoll",
        &["--tcp", "127.0.0.1:0", "--protocol", "until-quit"],
    );
    let mut conn: Conn = server.connect_conn();
    conn.write_all(b"quit\n").unwrap();
    let (got, error) = conn.read_to_end_lossy();
    assert!(error.is_none() && got == b"quit\n", "{got:?} {error:?}");
    thread::sleep(Duration::from_millis(200));
    let pid = server.pid();
    let before = thread_wakeups(pid, "reverb-linger")
        .expect("no lingering thread: the close was not handed to it");
    // Within the 2 s the silent peer may linger.
    thread::sleep(Duration::from_secs(1));
    let woke = thread_wakeups(pid, "reverb-linger").unwrap() - before;
    assert!(
        woke <= 10,
        "the lingering thread woke {woke} times in 1 s while a silent peer lingered"
    );
    drop(conn);
    thread::sleep(Duration::from_millis(300));
    let before = thread_wakeups(pid, "reverb-linger").unwrap();
    thread::sleep(Duration::from_secs(1));
    let woke = thread_wakeups(pid, "reverb-linger").unwrap() - before;
    assert!(
        woke <= 10,
        "the lingering thread woke {woke} times in 1 s with nothing lingering"
    );
    server.stop();
}

/// At shutdown, the lingering thread of an event-loop model closes a lingering connection
/// as soon as its peer has taken every reply queued (which wakes no `poll`, so the thread
/// looks again every few milliseconds while the server exits), and the server exits then,
/// not when the linger's own deadline (2 s after the peer's last byte) comes.
#[test]
fn epoll_exits_as_soon_as_the_last_lingering_peer_takes_its_replies() {
    let args = [
        "--tcp",
        "127.0.0.1:0",
        "--protocol",
        "until-quit",
        "--drain-timeout",
        "10",
    ];
    let server = Server::start("epoll", &args);
    let mut conn = server.connect_slow_reader();
    let mut input = vec![b'x'; 100_000];
    input.extend_from_slice(b"quit\n");
    conn.write_all(&input).unwrap();
    // until-quit replies only once `quit` is read, so the first reply bytes at the client
    // say the server accepted the connection and read it all: a returned `connect` is not
    // an accepted connection (the client's final ACK may wait in a busy CPU's backlog),
    // and one still in the kernel's backlog at SIGTERM would be reset, never answered.
    let deadline = Instant::now() + PATIENCE;
    while TcpQueues::of_conn(&conn).is_none_or(|q| q.client_unread == 0) {
        assert!(Instant::now() < deadline, "no reply within {PATIENCE:?}");
        thread::sleep(Duration::from_millis(5));
    }
    // The reply goes to the kernel's queues, where the client leaves most of it, and the
    // close to the lingering thread; a byte more keeps it lingering 2 s from now.
    thread::sleep(Duration::from_millis(500));
    conn.write_all(b"!").unwrap();
    thread::sleep(Duration::from_millis(100));
    server.terminate();
    thread::sleep(Duration::from_millis(300));
    let (got, error) = conn.read_to_end_lossy();
    let took_all = Instant::now();
    assert!(
        error.is_none() && got == input,
        "{error:?} after {} of {} bytes",
        got.len(),
        input.len()
    );
    let mut server = server;
    let status = server.wait_exit(PATIENCE).expect("exits");
    let after = took_all.elapsed();
    assert!(status.success(), "exit {status}; {}", server.stderr());
    assert!(
        after < Duration::from_secs(1),
        "the server exited {after:?} after its last lingering peer took every reply"
    );
}
