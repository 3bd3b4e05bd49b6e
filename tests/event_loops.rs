//! Several event loops (`--threads N`) in the readiness models: every loop serves, and
//! the limits stay global across loops.

mod common;

use common::{Conn, PATIENCE, Server, TcpQueues, pattern, reverb, round_trip};
use std::io::{Read, Write};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::process::{ExitStatus, Stdio};
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

/// Waits at most [`START_FAILURE_LIMIT`] for a server that cannot start to exit (`what`
/// names it in the failure), and returns its status and its stderr.
fn exit_and_stderr(mut child: std::process::Child, what: &str) -> (ExitStatus, String) {
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waitpid") {
            break status;
        }
        if started.elapsed() > START_FAILURE_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after {START_FAILURE_LIMIT:?}");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    let _ = child
        .stderr
        .take()
        .expect("piped")
        .read_to_string(&mut stderr);
    (status, stderr)
}

/// Loop 1 of 3 cannot be set up (the loop helper's hidden test hook, honoured by debug
/// builds only): the loops already built must stop, and `serve` exits 1 within
/// [`START_FAILURE_LIMIT`] with one error line that names the loop, having printed no
/// `listening` line and told the service manager nothing (no `READY=1`).
fn loop_that_cannot_start_stops_the_server(model: &str) {
    if !cfg!(debug_assertions) {
        common::skip("a release build ignores REVERB_TEST_FAIL_LOOP");
        return;
    }
    let notify_path = common::temp_socket_path("notify");
    let notify = UnixDatagram::bind(&notify_path).expect("notify socket");
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
        .env("NOTIFY_SOCKET", &notify_path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("reverb starts");
    let mut stdout = child.stdout.take().expect("piped");
    let (status, stderr) = exit_and_stderr(child, &format!("{model}, after loop 1 failed"));
    let mut printed = String::new();
    stdout.read_to_string(&mut printed).expect("stdout");
    assert_eq!(
        printed, "",
        "{model}: no readiness line from a server that did not start"
    );
    notify.set_nonblocking(true).unwrap();
    let mut message = [0u8; 64];
    let told = notify.recv(&mut message).map(|n| message[..n].to_vec());
    assert!(
        told.is_err(),
        "{model}: the service manager was told {:?}",
        told.map(|m| String::from_utf8_lossy(&m).into_owned())
    );
    let _ = std::fs::remove_file(&notify_path);
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

/// The threads of the server process, by name, from `/proc/PID/task`.
fn thread_names(server: &Server) -> Vec<String> {
    let tasks = std::fs::read_dir(format!("/proc/{}/task", server.pid())).expect("/proc/PID/task");
    (tasks.map(|task| task.expect("a task").path().join("comm")))
        .map(|comm| {
            std::fs::read_to_string(comm)
                .unwrap_or_default()
                .trim()
                .to_owned()
        })
        .collect()
}

/// With one loop (`--threads 1`) the server serves on its own thread and starts no other
/// while no feature needs one: a process of one thread has a descriptor table nobody
/// shares, so the kernel lends every socket call its file without counting a reference
/// (docs/benchmarks.md). A connection the server ends itself then starts the lingering
/// thread, and the peer still reads every reply and a clean EOF.
fn one_loop_serves_on_the_only_thread(model: &str) {
    let server = Server::start(
        model,
        &[
            "--threads",
            "1",
            "--tcp",
            "127.0.0.1:0",
            "--idle-timeout",
            "0.3",
        ],
    );
    let mut conn = server.connect_conn();
    conn.write_all(b"one thread\n").unwrap();
    assert_eq!(conn.read_exactly(11), b"one thread\n");
    // The announcement's thread ends once the `listening` line is written.
    let deadline = Instant::now() + Duration::from_secs(5);
    while thread_names(&server) != ["reverb"] && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        thread_names(&server),
        ["reverb"],
        "{model}: one loop, no other thread"
    );
    let (rest, error) = conn.read_to_end_lossy();
    assert!(
        rest.is_empty() && error.is_none(),
        "{model}: the idle close is a clean EOF, got {rest:?} {error:?}"
    );
    server.stop();
}

#[test]
fn epoll_one_loop_serves_on_the_only_thread() {
    one_loop_serves_on_the_only_thread("epoll");
}

#[test]
fn async_one_loop_serves_on_the_only_thread() {
    one_loop_serves_on_the_only_thread("async");
}

#[test]
fn tokio_one_loop_serves_on_the_only_thread() {
    one_loop_serves_on_the_only_thread("tokio");
}

#[test]
fn uring_one_loop_serves_on_the_only_thread() {
    one_loop_serves_on_the_only_thread("uring");
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

/// More peers than a ring has provided buffers (128 per loop) send a trickle and never read
/// their replies: each one's backpressure must stay its own. A reply sent straight from the
/// provided buffer that received it keeps that buffer until the send completes, which for a
/// peer that never reads is never; if every buffer could be lent so, every receive of every
/// other connection would fail for want of a buffer, and a newcomer would get no answer.
fn non_reading_peers_leave_the_others_served(model: &str) {
    let path = common::temp_socket_path("hogs");
    let path_arg = path.to_str().unwrap();
    let server = Server::start(model, &["--threads", "1", "--unix", path_arg]);
    let addr = format!("unix://{}", server.addr("unix"));
    let mut hogs: Vec<UnixStream> = (0..160)
        .map(|_| UnixStream::connect(&path).unwrap())
        .collect();
    for hog in &hogs {
        hog.set_nonblocking(true).unwrap();
    }
    // Each chunk arrives alone (nothing owed yet), so its reply leaves from the buffer that
    // received it, until the peer's queue is full. Bounded: at most 3 s of trickle.
    let chunk = pattern(8 * 1024, 3);
    let started = Instant::now();
    let mut blocked = vec![false; hogs.len()];
    while started.elapsed() < Duration::from_secs(3) && blocked.iter().any(|b| !b) {
        for (hog, is_blocked) in hogs.iter_mut().zip(blocked.iter_mut()) {
            if hog.write(&chunk).is_err() {
                *is_blocked = true;
            }
        }
        thread::sleep(Duration::from_millis(10));
    }
    let mut newcomer = Conn::connect(&addr).unwrap();
    newcomer.write_all(b"still served?\n").unwrap();
    assert_eq!(
        newcomer.read_exactly(14),
        b"still served?\n",
        "a newcomer is answered while {} peers do not read",
        hogs.len()
    );
    drop(hogs);
    server.stop();
}

#[test]
fn uring_non_reading_peers_leave_the_others_served() {
    non_reading_peers_leave_the_others_served("uring");
}

#[test]
fn epoll_non_reading_peers_leave_the_others_served() {
    non_reading_peers_leave_the_others_served("epoll");
}

/// `reverb serve --model MODEL ARGS` as a user of its own (uid 64999, which owns no other
/// process) allowed `nproc` processes and threads in all (RLIMIT_NPROC, setrlimit(2); root
/// is exempt from it, hence the other user). `None`, after saying why, when `setpriv` or
/// `prlimit` is missing or the binary is not reachable by that user.
fn serve_with_nproc(nproc: u32, model: &str, args: &[&str]) -> Option<std::process::Command> {
    let binary = env!("CARGO_BIN_EXE_reverb");
    let as_user = |command: &mut std::process::Command| {
        command.args([
            "--reuid=64999",
            "--regid=64999",
            "--clear-groups",
            "prlimit",
        ]);
        command.arg(format!("--nproc={nproc}")).arg(binary);
    };
    let mut probe = std::process::Command::new("setpriv");
    as_user(&mut probe);
    let reachable = probe
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if !reachable.status().is_ok_and(|status| status.success()) {
        common::skip("setpriv/prlimit missing, or the binary is not reachable by uid 64999");
        return None;
    }
    let mut command = std::process::Command::new("setpriv");
    as_user(&mut command);
    command.args(["serve", "--model", model]).args(args);
    Some(command)
}

/// A thread that cannot be started (the process limit) stops the server with one line and
/// exit status 1, rather than a panic that leaves it serving some sockets and not others.
fn thread_that_cannot_start_stops_the_server(model: &str, nproc: u32, args: &[&str], says: &str) {
    let Some(mut command) = serve_with_nproc(nproc, model, args) else {
        return;
    };
    let child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (status, stderr) = exit_and_stderr(child, &format!("{model}, with a thread short"));
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(says), "{stderr}");
    assert!(!stderr.contains("panic"), "{stderr}");
}

#[test]
fn blocking_thread_that_cannot_start() {
    let args = [
        "--tcp",
        "127.0.0.1:0",
        "--tcp",
        "127.0.0.1:0",
        "--udp",
        "127.0.0.1:0",
    ];
    thread_that_cannot_start_stops_the_server("blocking", 2, &args, "cannot start a thread for");
}

#[test]
fn pool_worker_that_cannot_start() {
    let args = ["--threads", "8", "--tcp", "127.0.0.1:0"];
    thread_that_cannot_start_stops_the_server("pool", 3, &args, "cannot start pool worker");
}

/// Out of processes, `forking` leaves the connection it cannot fork for unserved and goes on
/// serving: once the children end, a new client is answered.
#[test]
fn forking_out_of_processes_goes_on_serving() {
    let Some(mut command) = serve_with_nproc(4, "forking", &["--tcp", "127.0.0.1:0"]) else {
        return;
    };
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    let addr = line.trim().strip_prefix("listening ").unwrap().to_string();
    // More connections than processes: some are served, the rest closed unserved.
    let held: Vec<Conn> = (0..8)
        .map(|_| {
            let mut conn = Conn::connect(&addr).unwrap();
            conn.write_all(b"x").unwrap();
            thread::sleep(Duration::from_millis(50));
            conn
        })
        .collect();
    assert!(
        child.try_wait().unwrap().is_none(),
        "the server died out of processes"
    );
    drop(held);
    let started = Instant::now();
    let answered = loop {
        let mut conn = Conn::connect(&addr).unwrap();
        conn.set_timeouts(Duration::from_secs(1));
        conn.write_all(b"again\n").unwrap();
        let mut reply = [0u8; 6];
        if conn.read_exact(&mut reply).is_ok() {
            break reply == *b"again\n";
        }
        assert!(
            started.elapsed() < PATIENCE,
            "no client served after the children ended"
        );
        thread::sleep(Duration::from_millis(100));
    };
    assert!(answered);
    child.kill().unwrap();
    child.wait().unwrap();
}

/// The hidden loop-failure hook takes a loop number; anything else is an error naming the
/// variable, not a server started as if it were unset.
#[test]
fn fail_loop_hook_takes_a_loop_number() {
    if !cfg!(debug_assertions) {
        common::skip("a release build ignores REVERB_TEST_FAIL_LOOP");
        return;
    }
    let child = reverb()
        .args(["serve", "--model", "epoll", "--tcp", "127.0.0.1:0"])
        .env("REVERB_TEST_FAIL_LOOP", "one")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("reverb starts");
    let (status, stderr) = exit_and_stderr(child, "epoll, with REVERB_TEST_FAIL_LOOP=one");
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("REVERB_TEST_FAIL_LOOP is \"one\": expected a loop number"),
        "{stderr}"
    );
}

/// With one loop the announcement must not hold up serving: a `listening` line written to
/// a stdout pipe nobody reads blocks, and the server serves meanwhile.
fn serves_while_stdout_is_blocked(model: &str) {
    let dir = std::env::temp_dir().join(format!("reverb-blocked-{model}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("echo.sock");
    // stdout is a socket whose buffers are already full, so the server's first write to
    // stdout blocks (as on a pipe nobody reads).
    let (mut writer, reader) = UnixStream::pair().unwrap();
    writer.set_nonblocking(true).unwrap();
    while writer.write(&[b'.'; 4096]).is_ok() {}
    writer.set_nonblocking(false).unwrap();
    let mut child = reverb()
        .args(["serve", "--model", model, "--threads", "1", "--unix"])
        .arg(&path)
        .stdout(std::os::fd::OwnedFd::from(writer))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + PATIENCE;
    let echoed = loop {
        if let Ok(mut stream) = UnixStream::connect(&path) {
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            stream.write_all(b"still served\n").unwrap();
            let mut reply = [0; 13];
            break stream.read_exact(&mut reply).map(|()| reply.to_vec());
        }
        assert!(
            Instant::now() < deadline,
            "{model}: the socket never appeared"
        );
        thread::sleep(Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    drop(reader);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        echoed.ok().as_deref(),
        Some(&b"still served\n"[..]),
        "{model}: no echo while the listening line could not be written"
    );
}

#[test]
fn epoll_serves_while_stdout_is_blocked() {
    serves_while_stdout_is_blocked("epoll");
}

#[test]
fn uring_serves_while_stdout_is_blocked() {
    serves_while_stdout_is_blocked("uring");
}

/// `pool` at shutdown: a client accepted but still waiting for a worker when the drain
/// begins, and that already sent bytes the server never read, reads EOF (a lingering
/// close), not a reset, and the server still exits 0.
#[test]
fn pool_queued_client_reads_eof_at_shutdown() {
    // Verbose, for the line that says a connection was accepted.
    let args = ["--threads", "1", "--tcp", "127.0.0.1:0", "--verbose"];
    let server = Server::start("pool", &args);
    let addr = format!("tcp://{}", server.addr("tcp"));
    let mut busy = Conn::connect(&addr).unwrap();
    busy.write_all(b"hold").unwrap();
    assert_eq!(busy.read_exactly(4), b"hold");
    let mut queued = Conn::connect(&addr).unwrap();
    let sent = b"queued\n";
    queued.write_all(sent).unwrap();
    // Accepted, and waiting in the pool's queue behind the busy worker, before the drain
    // begins: a returned `connect` is not an accepted connection (its final ACK may wait in
    // a busy CPU's backlog), and one still in the kernel's backlog when the drain closes
    // the listener is reset, which is not what this test is about. So the signal waits
    // for the acceptor's line naming this peer, and for its bytes to wait unread at the
    // server, where a close that does not linger would answer them with a reset.
    let Conn::Tcp(stream) = &queued else {
        unreachable!("a TCP listener")
    };
    let peer = format!("peer={}", stream.local_addr().unwrap());
    server.wait_for_log_line(&["accepted", &peer]);
    assert!(
        TcpQueues::wait_server_unread(&queued, sent.len()),
        "the queued client's bytes never reached the server's socket"
    );
    server.terminate();
    let (got, error) = queued.read_to_end_lossy();
    assert!(
        error.is_none() && got.is_empty(),
        "the queued client read {got:?} then {error:?}"
    );
    let mut server = server;
    let status = server.wait_exit(PATIENCE).expect("exits");
    assert!(status.success(), "exit {status}; {}", server.stderr());
}

/// CPU ticks (utime + stime) of each of the server's threads named `reverb-{model}-N`.
fn loop_ticks(server: &Server, model: &str) -> Vec<(String, u64)> {
    let tasks = std::fs::read_dir(format!("/proc/{}/task", server.pid())).unwrap();
    let mut loops: Vec<(String, u64)> = tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("stat")).ok())
        .filter_map(|stat| {
            let name = stat[stat.find('(')? + 1..stat.rfind(')')?].to_string();
            let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split_whitespace().collect();
            let ticks = fields[11].parse::<u64>().ok()? + fields[12].parse::<u64>().ok()?;
            name.starts_with(&format!("reverb-{model}-"))
                .then_some((name, ticks))
        })
        .collect();
    loops.sort();
    loops
}

/// `epoll --threads 2` on a Unix stream socket, whose one accept queue both loops watch
/// with EPOLLEXCLUSIVE: connections made one after another go round the loops (a loop
/// that accepted moves to the back of the listener's wait queue), so both loops do work.
/// Without the move the kernel wakes the same loop every time and the other stays idle.
#[test]
fn epoll_loops_take_turns_on_a_shared_listener() {
    let path = common::temp_socket_path("turns");
    let unix = format!("unix://{}", path.display());
    let server = Server::start(
        "epoll",
        &["--threads", "2", "--unix", &path.to_string_lossy()],
    );
    // Enough bytes that each loop's share costs it many scheduler ticks (10 ms each).
    for n in 0..16 {
        let conn = Conn::connect(&unix).unwrap();
        let input = pattern(16 << 20, n);
        assert!(round_trip(conn, input.clone()) == input, "connection {n}");
    }
    let loops = loop_ticks(&server, "epoll");
    assert_eq!(loops.len(), 2, "{loops:?}");
    assert!(
        loops.iter().all(|(_, ticks)| *ticks > 0),
        "a loop did no work: {loops:?}"
    );
}
