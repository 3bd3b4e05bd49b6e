//! Black-box tests of the `reverb` binary: exit codes, messages, stdout discipline, the
//! Unix path rules, and the client in piped mode.

mod common;

use common::{PATIENCE, Server, exists, reverb, temp_socket_path};
use std::io::Write;
use std::net::{TcpListener, UdpSocket};
use std::os::unix::net::UnixListener;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

fn run(args: &[&str]) -> Output {
    reverb()
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run reverb")
}

/// As [`run`], for a command that must exit by itself (a refused start): one that is still
/// running after `PATIENCE` (serving, say, where it should have refused) is killed and the
/// test fails, rather than waiting for ever.
fn run_bounded(args: &[&str]) -> Output {
    let mut command = reverb();
    command.args(args);
    run_command_bounded(command, args)
}

/// As [`run_bounded`], for `command`, whose reverb arguments are `args`.
fn run_command_bounded(mut command: std::process::Command, args: &[&str]) -> Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run reverb");
    let deadline = Instant::now() + PATIENCE;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let output = child.wait_with_output().expect("reap");
            panic!(
                "{args:?} still running after {PATIENCE:?}, where it should have exited: {}",
                stderr_of(&output)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn assert_usage_error(args: &[&str], mentions: &str) {
    let output = run(args);
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
    assert!(
        stderr.contains(mentions),
        "{args:?} should mention {mentions:?}: {stderr}"
    );
    assert!(stderr.contains("Usage"), "usage shown: {stderr}");
    assert!(output.stdout.is_empty());
}

#[test]
fn bad_flags_exit_2_with_usage() {
    assert_usage_error(&["serve", "--model", "nope"], "unknown model");
    assert_usage_error(&["serve", "--model", "nope"], "nope");
    assert_usage_error(
        &["bench", "127.0.0.1:1", "--conns", "0"],
        "Usage: reverb bench",
    );
    assert_usage_error(&["serve", "--tcp", "::1:7007"], "brackets");
    assert_usage_error(&["serve", "--tcp", "127.0.0.1:99999"], "port");
    assert_usage_error(&["serve", "--tcp", "example.com:1"], "example.com");
    assert_usage_error(&["serve", "--protocol", "chat"], "unknown protocol");
    assert_usage_error(&["serve", "--prefix", "x"], "--prefix");
    assert_usage_error(
        &["serve", "--protocol", "echo", "--panic-on", "boom"],
        "--panic-on",
    );
    assert_usage_error(&["serve", "--threads", "0"], "0");
    assert_usage_error(&["serve", "--max-buffer", "0"], "at least 1 byte");
    assert_usage_error(&["serve", "--max-buffer", "12Q"], "unit");
    assert_usage_error(&["serve", "--idle-timeout", "soon"], "seconds");
    assert_usage_error(&["serve", "--bogus"], "--bogus");
    assert_usage_error(&["client", "http://127.0.0.1:1"], "scheme");
    assert_usage_error(&["client", "unix://relative.sock"], "absolute");
}

#[test]
fn prefix_with_echo_is_fine_on_datagrams_only() {
    let server = Server::start("threaded", &["--udp", "127.0.0.1:0", "--prefix", "> "]);
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_read_timeout(Some(PATIENCE)).unwrap();
    socket.send_to(b"hi", server.addr("udp")).unwrap();
    let mut buf = [0u8; 16];
    let n = socket.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"> hi");
    server.stop();
}

#[test]
fn address_in_use_exits_1_naming_it() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let output = run(&["serve", "--model", "threaded", "--tcp", &addr]);
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("tcp://{addr}")), "{stderr}");
    assert!(stderr.to_lowercase().contains("in use"), "{stderr}");
    assert!(
        stderr.contains("  tip:") && stderr.contains("--tcp 127.0.0.1:0"),
        "says what to do: {stderr}"
    );
    assert!(
        output.stdout.is_empty(),
        "no listening line for a failed start"
    );
}

#[test]
fn address_in_use_for_a_reuseport_socket_unless_the_model_has_a_queue_per_loop() {
    // Only the models with an accept queue per loop set SO_REUSEPORT on their TCP
    // listeners, and so let another socket of the same user that sets it join the port;
    // the others refuse it (EADDRINUSE).
    use socket2::{Domain, SockAddr, Socket, Type};
    for (model, joins) in [("threaded", false), ("epoll", false), ("async", true)] {
        let server = Server::start(model, &["--tcp", "127.0.0.1:0"]);
        let addr: std::net::SocketAddr = server.addr("tcp").parse().unwrap();
        let other = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        other.set_reuse_port(true).unwrap();
        let bound = other.bind(&SockAddr::from(addr));
        if joins {
            assert!(bound.is_ok(), "{model}: {bound:?}");
        } else {
            let Err(error) = bound else {
                panic!("{model}: a reuseport socket joined the port");
            };
            assert_eq!(
                error.kind(),
                std::io::ErrorKind::AddrInUse,
                "{model}: {error}"
            );
        }
        drop(other);
        server.stop();
    }
}

#[test]
fn a_second_reverb_on_a_reuseport_port_is_refused_and_another_program_joins() {
    // `async` sets SO_REUSEPORT on its TCP listeners, but reverb binds each port once
    // without it first: a second reverb, whatever its model, is refused as "in use",
    // while a program that sets SO_REUSEPORT itself (as the same user) joins the port and
    // takes some of its connections.
    use socket2::{Domain, SockAddr, Socket, Type};
    let server = Server::start("async", &["--threads", "2", "--tcp", "127.0.0.1:0"]);
    let addr = server.addr("tcp");
    for model in ["async", "epoll"] {
        let output = run_bounded(&["serve", "--model", model, "--tcp", &addr]);
        let stderr = stderr_of(&output);
        assert_eq!(output.status.code(), Some(1), "{model}: {stderr}");
        assert!(
            stderr.contains(&format!("cannot bind tcp://{addr}"))
                && stderr.to_lowercase().contains("in use")
                && stderr.contains("  tip:"),
            "{model}: {stderr}"
        );
        assert!(output.stdout.is_empty(), "{model}: no listening line");
    }
    let other = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    other.set_reuse_port(true).unwrap();
    let target: std::net::SocketAddr = addr.parse().unwrap();
    other
        .bind(&SockAddr::from(target))
        .expect("a reuseport socket joins");
    other.listen(64).unwrap();
    other.set_nonblocking(true).unwrap();
    // The kernel spreads connections by a hash of their addresses over the server's two
    // loops and this socket: 32 connections all missing it would be a 1 in 400,000 chance.
    let clients: Vec<_> = (0..32)
        .map(|_| std::net::TcpStream::connect(target).expect("connect"))
        .collect();
    // A returned `connect` is not a connection in the joined socket's queue yet (a final
    // ACK may wait in a busy CPU's backlog, and these clients send nothing that would carry
    // another): it is waited for, up to PATIENCE, not sampled for a moment.
    let deadline = Instant::now() + PATIENCE;
    let mut taken = 0;
    while taken == 0 && Instant::now() < deadline {
        while other.accept().is_ok() {
            taken += 1;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(taken > 0, "the joined socket took no connection of 32");
    drop((clients, other));
    server.stop();
}

#[test]
fn readiness_lines_in_flag_order_and_nothing_else() {
    let path = temp_socket_path("order");
    let path_arg = path.to_str().unwrap();
    let server = Server::start(
        "threaded",
        &[
            "--udp",
            "localhost:0",
            "--unix",
            path_arg,
            "--tcp",
            "127.0.0.1:0",
            "--tcp",
            "[::1]:0",
        ],
    );
    assert_eq!(server.addrs.len(), 4);
    assert!(
        server.addrs[0].starts_with("udp://127.0.0.1:"),
        "{:?}",
        server.addrs
    );
    assert!(!server.addrs[0].ends_with(":0"), "port 0 is resolved");
    assert_eq!(server.addrs[1], format!("unix://{path_arg}"));
    assert!(server.addrs[2].starts_with("tcp://127.0.0.1:"));
    assert!(server.addrs[3].starts_with("tcp://[::1]:"));
    server.stop();
}

#[test]
fn readiness_names_relative_unix_paths_absolutely() {
    // `unix://` addresses are absolute, so a script can pass the line to `reverb client`.
    let dir = std::env::temp_dir();
    let stream = format!("reverb-test-{}-relative.sock", std::process::id());
    let datagram = format!("reverb-test-{}-relative-d.sock", std::process::id());
    let server = Server::start_in_dir(
        &dir,
        "threaded",
        &["--unix", &stream, "--unix-dgram", &datagram],
    );
    let stream_path = dir.join(&stream);
    let datagram_path = dir.join(&datagram);
    assert_eq!(
        server.addrs,
        [
            format!("unix://{}", stream_path.display()),
            format!("unix-dgram://{}", datagram_path.display())
        ]
    );
    for addr in &server.addrs {
        let output = client(addr, b"relative\n");
        assert!(output.status.success(), "{addr}: {}", stderr_of(&output));
        assert_eq!(output.stdout, b"relative\n");
    }
    server.stop();
    assert!(!exists(&stream_path) && !exists(&datagram_path));
}

/// The two tests that use the fixed default port take turns.
static DEFAULT_PORT_TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn default_listeners_are_loopback_7007() {
    let _turn = DEFAULT_PORT_TURN.lock().unwrap_or_else(|e| e.into_inner());
    // Needs the fixed default port; a server left running from the quick start holds it.
    let Some(server) = Server::start_on_default_port("threaded") else {
        return;
    };
    assert_eq!(
        server.addrs,
        ["tcp://127.0.0.1:7007", "udp://127.0.0.1:7007"],
        "the default listeners"
    );
    server.stop();
}

#[test]
fn default_port_test_skips_when_the_port_is_taken() {
    let _turn = DEFAULT_PORT_TURN.lock().unwrap_or_else(|e| e.into_inner());
    // Holding the port is what a quick-start server does; the test must say it skipped,
    // not fail with an unwrap.
    let Ok(holder) = TcpListener::bind(("127.0.0.1", common::DEFAULT_PORT)) else {
        // Already taken by someone else: the skip path runs all the same.
        assert!(Server::start_on_default_port("threaded").is_none());
        return;
    };
    assert!(Server::start_on_default_port("threaded").is_none());
    drop(holder);
}

#[test]
fn unix_path_rules() {
    // A path that is not a socket is never deleted.
    let path = temp_socket_path("file");
    std::fs::write(&path, b"precious").unwrap();
    let path_arg = path.to_str().unwrap();
    let output = run_bounded(&["serve", "--model", "threaded", "--unix", path_arg]);
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(path_arg) && stderr.contains("not a socket"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    std::fs::remove_file(&path).unwrap();

    // A live socket is in use.
    let live = UnixListener::bind(&path).unwrap();
    let output = run_bounded(&["serve", "--model", "threaded", "--unix", path_arg]);
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(path_arg) && stderr.contains("in use"),
        "{stderr}"
    );
    assert!(exists(&path), "a live socket is left alone");

    // A stale one (nobody listening) is replaced, and removed at exit.
    drop(live);
    assert!(exists(&path), "closing a listener leaves its file behind");
    let server = Server::start("threaded", &["--unix", path_arg]);
    let got = common::round_trip(
        common::Conn::connect(&server.addrs[0]).unwrap(),
        b"stale replaced".to_vec(),
    );
    assert_eq!(got, b"stale replaced");
    server.stop();
    assert!(!exists(&path), "removed at exit");
}

#[test]
fn unix_path_live_of_the_other_kind_is_in_use() {
    // A live socket of the other kind (the probe's connect says EPROTOTYPE) is in use too,
    // and left alone, either way round.
    let path = temp_socket_path("other-kind");
    let path_arg = path.to_str().unwrap();
    for (live_kind, serve_flag) in [("datagram", "--unix"), ("stream", "--unix-dgram")] {
        let live: Box<dyn std::any::Any> = if live_kind == "datagram" {
            Box::new(std::os::unix::net::UnixDatagram::bind(&path).unwrap())
        } else {
            Box::new(UnixListener::bind(&path).unwrap())
        };
        let output = run_bounded(&["serve", "--model", "threaded", serve_flag, path_arg]);
        let stderr = stderr_of(&output);
        assert_eq!(output.status.code(), Some(1), "{serve_flag}: {stderr}");
        assert!(
            stderr.contains(path_arg) && stderr.contains("in use"),
            "a live {live_kind} socket is in use for {serve_flag}: {stderr}"
        );
        assert!(exists(&path), "a live {live_kind} socket is left alone");
        drop(live);
        std::fs::remove_file(&path).unwrap();
    }
}

#[test]
fn unix_path_of_a_connected_datagram_socket_is_in_use() {
    // A live datagram socket connected to another peer takes datagrams from that peer
    // only, so the probe's connect is refused with EPERM: it is live all the same.
    let path = temp_socket_path("dgram-connected");
    let peer_path = temp_socket_path("dgram-peer");
    let path_arg = path.to_str().unwrap();
    let live = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    let peer = std::os::unix::net::UnixDatagram::bind(&peer_path).unwrap();
    live.connect(&peer_path).unwrap();
    for serve_flag in ["--unix-dgram", "--unix"] {
        let output = run_bounded(&["serve", "--model", "threaded", serve_flag, path_arg]);
        let stderr = stderr_of(&output);
        assert_eq!(output.status.code(), Some(1), "{serve_flag}: {stderr}");
        assert!(
            stderr.contains(&format!("{path_arg}: address in use (a live socket"))
                && stderr.contains("  tip:")
                && !stderr.contains("not permitted"),
            "{serve_flag}: names the path as in use and says what to do: {stderr}"
        );
        assert!(exists(&path), "{serve_flag}: a live socket is left alone");
    }
    drop((live, peer));
    std::fs::remove_file(&path).unwrap();
    std::fs::remove_file(&peer_path).unwrap();
}

#[test]
fn unix_path_of_a_listener_with_a_full_queue_is_in_use_at_once() {
    // A live listener that never accepts, its queue full: a blocking probe would wait for
    // a place in the queue for ever; the server must call it in use instead.
    use socket2::{Domain, SockAddr, Socket, Type};
    let path = temp_socket_path("full-queue");
    let path_arg = path.to_str().unwrap();
    let live = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
    live.bind(&SockAddr::unix(&path).unwrap()).unwrap();
    live.listen(1).unwrap();
    let mut queued = Vec::new();
    loop {
        let client = Socket::new(Domain::UNIX, Type::STREAM.nonblocking(), None).unwrap();
        match client.connect(&SockAddr::unix(&path).unwrap()) {
            Ok(()) => queued.push(client),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("filling the queue: {e}"),
        }
        assert!(queued.len() < 64, "the queue of listen(1) never filled");
    }
    let output = run_bounded(&["serve", "--model", "threaded", "--unix", path_arg]);
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("{path_arg}: address in use")) && stderr.contains("  tip:"),
        "{stderr}"
    );
    assert!(exists(&path), "a live socket is left alone");
    drop((live, queued));
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn unix_path_with_a_name_too_long_is_refused_saying_so() {
    // A file name past the kernel's 255 bytes is also past what sun_path holds: that is
    // checked first, saying how long the path is and what is accepted.
    let path = std::env::temp_dir().join(format!("{}.sock", "n".repeat(300)));
    let path_arg = path.to_str().unwrap();
    let output = run_bounded(&["serve", "--model", "threaded", "--unix", path_arg]);
    let stderr = stderr_of(&output);
    // A value no socket can take: a usage error, as for any bad value.
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("--unix {path_arg}: the path is"))
            && stderr.contains("bytes long")
            && stderr.contains("at most 107 bytes"),
        "{stderr}"
    );
}

#[test]
fn unix_path_the_server_may_not_probe_is_refused_with_its_reason() {
    // A live socket whose file the server may not write to (connect says EACCES) is
    // refused with that reason, neither called in use nor replaced. The server runs as
    // nobody (uid 65534): root is never refused.
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let is_root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    let has_setpriv = std::process::Command::new("setpriv")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !is_root || !has_setpriv {
        eprintln!("SKIPPED: needs root and setpriv (util-linux) to run the server as nobody");
        return;
    }
    // In /tmp itself, which nobody can search: TMPDIR may be a directory of root's own,
    // where looking at the path would fail before the probe does.
    let name = temp_socket_path("not-ours");
    let path = std::path::Path::new("/tmp").join(name.file_name().unwrap());
    let path_arg = path.to_str().unwrap();
    let live = UnixListener::bind(&path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let args = ["serve", "--model", "threaded", "--unix", path_arg];
    let mut command = std::process::Command::new("setpriv");
    command
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_reverb"))
        .args(args);
    let output = run_command_bounded(command, &args);
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot bind unix://{path_arg}"))
            && stderr.contains("Permission denied")
            && !stderr.contains("in use"),
        "{stderr}"
    );
    assert!(
        exists(&path),
        "a socket the server may not probe is left alone"
    );
    drop(live);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn unix_path_replaced_while_serving_is_left_at_exit() {
    // The server removes its socket file at exit only while the file is still its own:
    // another server that took the path over meanwhile keeps it.
    let path = temp_socket_path("replaced");
    let path_arg = path.to_str().unwrap();
    let server = Server::start("threaded", &["--unix", path_arg]);
    // Bound beside it and renamed over it, so the new file is a different inode (one
    // bound after an unlink may reuse the old inode's number).
    let other_path = temp_socket_path("replacement");
    let other = UnixListener::bind(&other_path).unwrap();
    std::fs::rename(&other_path, &path).unwrap();
    server.stop();
    assert!(
        exists(&path),
        "the socket file that replaced the server's is not the server's to remove"
    );
    drop(other);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn sigint_also_stops_cleanly() {
    let server = Server::start("pool", &["--tcp", "127.0.0.1:0"]);
    let pid = server.pid().to_string();
    std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    let mut server = server;
    let status = server.wait_exit(PATIENCE).expect("exits on SIGINT");
    assert!(status.success());
}

fn client(addr: &str, input: &[u8]) -> Output {
    let mut child = reverb()
        .args(["client", addr])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    // Feed stdin from a thread: the client's stdout must be drained meanwhile, or a
    // large echo fills both pipes and everyone waits.
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let pid = child.id();
    let watchdog = std::thread::spawn(move || {
        let start = Instant::now();
        while start.elapsed() < PATIENCE {
            std::thread::sleep(Duration::from_millis(50));
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                return true;
            }
        }
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
        false
    });
    let output = child.wait_with_output().unwrap();
    let _ = feeder.join();
    drop(watchdog);
    output
}

#[test]
fn piped_client_gets_everything_back() {
    let path = temp_socket_path("client");
    let dgram = temp_socket_path("client-dgram");
    let server = Server::start(
        "threaded",
        &[
            "--tcp",
            "127.0.0.1:0",
            "--udp",
            "[::1]:0",
            "--unix",
            path.to_str().unwrap(),
            "--unix-dgram",
            dgram.to_str().unwrap(),
        ],
    );
    let big: Vec<u8> = common::pattern(3 << 20, 7);
    for addr in [server.addrs[0].clone(), server.addrs[2].clone()] {
        let output = client(&addr, &big);
        assert!(output.status.success(), "{addr}: {}", stderr_of(&output));
        assert!(
            output.stdout == big,
            "{addr}: {} bytes back",
            output.stdout.len()
        );
    }
    let bare = server.addr("tcp");
    let output = client(&bare, b"hello\n");
    assert_eq!(output.stdout, b"hello\n", "a bare HOST:PORT is TCP");
    for addr in [server.addrs[1].clone(), server.addrs[3].clone()] {
        let lines = b"one\ntwo\n\nlast without newline";
        let output = client(&addr, lines);
        assert!(output.status.success(), "{addr}: {}", stderr_of(&output));
        assert_eq!(output.stdout, lines, "{addr}: stdout equals stdin");
    }
    server.stop();
}

#[test]
fn client_blames_stdout_not_the_server_when_its_reader_goes() {
    use std::io::Read;
    let server = Server::start("threaded", &["--tcp", "127.0.0.1:0"]);
    let addr = server.addrs[0].clone();
    let mut child = reverb()
        .args(["client", &addr])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&common::pattern(4 << 20, 3));
    });
    // `| head -c 10`: read a little, then stop reading for good.
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 10];
    stdout.read_exact(&mut first).unwrap();
    drop(stdout);
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the client kept running after its stdout closed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let _ = feeder.join();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("cannot write to stdout") && !stderr.contains(&addr),
        "{stderr}"
    );
    server.stop();
}

#[test]
fn client_that_cannot_connect_exits_1_with_one_line() {
    let free = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = free.local_addr().unwrap().to_string();
    drop(free);
    let output = client(&format!("tcp://{addr}"), b"x");
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&addr) && stderr.contains("cannot connect"),
        "{stderr}"
    );
    let output = client("unix:///nonexistent/reverb.sock", b"x");
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr_of(&output).contains("/nonexistent/reverb.sock"));
    // A name that does not resolve cannot be connected to either (glibc rejects the empty
    // label without asking DNS, so this stays fast offline); a malformed one is usage.
    for addr in ["a..b:7", "udp://a..b:7"] {
        let output = client(addr, b"x");
        let stderr = stderr_of(&output);
        assert_eq!(output.status.code(), Some(1), "{addr}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains(&format!("cannot connect to {addr}:")),
            "{stderr}"
        );
    }
    assert_usage_error(&["client", "a..b:port"], "a..b:port");
}

#[test]
fn client_reads_until_server_closes_after_quit() {
    let server = Server::start(
        "threaded",
        &[
            "--tcp",
            "127.0.0.1:0",
            "--protocol",
            "until-quit",
            "--greeting",
            "hi\n",
        ],
    );
    let output = client(&server.addrs[0], b"a\nquit\nignored\n");
    assert!(output.status.success(), "{}", stderr_of(&output));
    assert_eq!(output.stdout, b"hi\na\nquit\n");
    server.stop();
}

/// `reverb client` on a real pseudo-terminal, as a person at a keyboard runs it: script(1)
/// gives it a terminal and copies what it draws (stdout and stderr) to a pipe read here.
struct Terminal {
    child: std::process::Child,
    keyboard: std::process::ChildStdin,
    screen: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Terminal {
    fn run_client(addr: &str, tmpdir: Option<&std::path::Path>) -> Terminal {
        let command = format!("{} client {addr}", env!("CARGO_BIN_EXE_reverb"));
        let mut script = std::process::Command::new("script");
        script.args(["-qec", &command, "/dev/null"]);
        if let Some(dir) = tmpdir {
            script.env("TMPDIR", dir);
        }
        let mut child = script
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("script(1) from util-linux runs the client on a terminal");
        let keyboard = child.stdin.take().unwrap();
        let screen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = screen.clone();
        let mut out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = std::io::Read::read(&mut out, &mut buf) {
                if n == 0 {
                    break;
                }
                let text = String::from_utf8_lossy(&buf[..n]).replace('\r', "");
                sink.lock().unwrap().push_str(&text);
            }
        });
        Terminal {
            child,
            keyboard,
            screen,
        }
    }

    fn type_keys(&mut self, keys: &[u8]) {
        self.keyboard.write_all(keys).unwrap();
        self.keyboard.flush().unwrap();
    }

    fn screen(&self) -> String {
        self.screen.lock().unwrap().clone()
    }

    /// Waits until the screen holds `needle` `count` times; false after `patience`.
    fn shows(&self, needle: &str, count: usize, patience: Duration) -> bool {
        self.shows_in(|screen| screen.to_string(), needle, count, patience)
    }

    /// [`Terminal::shows`] on the screen as a person sees it ([`as_seen`]).
    fn shows_seen(&self, needle: &str, count: usize, patience: Duration) -> bool {
        self.shows_in(as_seen, needle, count, patience)
    }

    fn shows_in(
        &self,
        view: impl Fn(&str) -> String,
        needle: &str,
        count: usize,
        patience: Duration,
    ) -> bool {
        let deadline = Instant::now() + patience;
        while view(&self.screen()).matches(needle).count() < count {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    fn wait_exit(mut self) -> (std::process::ExitStatus, String) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(100));
                return (status, self.screen());
            }
            assert!(
                Instant::now() < deadline,
                "client still running: {:?}",
                self.screen()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A drawn screen as a person sees it: a line the client erased (`\r`, gone already, and
/// erase to the end of the line, drawn over a prompt that a late reply replaces) is gone.
fn as_seen(drawn: &str) -> String {
    let mut seen = String::new();
    for (n, piece) in drawn.split("\x1b[K").enumerate() {
        if n > 0 {
            seen.truncate(seen.rfind('\n').map_or(0, |end| end + 1));
        }
        seen.push_str(piece);
    }
    seen
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn interactive_client_prompts_and_exits() {
    // A greeting without a newline still leaves the prompt a line of its own.
    let server = Server::start(
        "threaded",
        &["--tcp", "127.0.0.1:0", "--greeting", "welcome"],
    );
    let mut terminal = Terminal::run_client(&server.addrs[0], None);
    // The greeting comes once the server accepts, which may be after the client's first
    // prompt: a returned `connect` is not an accepted connection (its final ACK may wait in
    // a busy CPU's backlog). The client then draws the greeting over that prompt and
    // prompts again below it, so the screen is compared as a person sees it, and nothing
    // is typed before the greeting is there.
    assert!(
        terminal.shows("welcome", 1, PATIENCE),
        "{:?}",
        terminal.screen()
    );
    assert!(
        terminal.shows_seen("> ", 1, PATIENCE),
        "{:?}",
        terminal.screen()
    );
    terminal.type_keys(b"hello\n");
    assert!(
        terminal.shows_seen("> ", 2, PATIENCE),
        "{:?}",
        terminal.screen()
    );
    terminal.type_keys(b"exit\n");
    let (status, screen) = terminal.wait_exit();
    assert!(status.success(), "{screen}");
    let seen = as_seen(&screen);
    assert!(
        seen.starts_with("welcome\n> hello\nhello\n> exit"),
        "the greeting on its line, a prompt, the echo, a prompt: {seen:?} (drawn: {screen:?})"
    );
    server.stop();
}

#[test]
fn interactive_client_prints_late_replies_and_never_freezes() {
    // until-quit answers nothing until `quit`: the prompt must come back at once, not after
    // a wait for a reply that is not coming.
    let server = Server::start(
        "threaded",
        &["--tcp", "127.0.0.1:0", "--protocol", "until-quit"],
    );
    let mut terminal = Terminal::run_client(&server.addrs[0], None);
    assert!(terminal.shows("> ", 1, PATIENCE), "{:?}", terminal.screen());
    terminal.type_keys(b"hello\n");
    let typed = Instant::now();
    assert!(terminal.shows("> ", 2, PATIENCE), "{:?}", terminal.screen());
    let prompt_after = typed.elapsed();
    // The old client waited 2 s for a first reply byte before prompting.
    assert!(
        prompt_after < Duration::from_millis(1500),
        "prompt after {prompt_after:?}"
    );
    terminal.type_keys(b"quit\n");
    // The collected answer arrives, then the server closes: said on stderr, exit 0.
    let (status, screen) = terminal.wait_exit();
    assert!(status.success(), "{screen}");
    assert!(screen.contains("hello\nquit\n"), "{screen:?}");
    assert!(
        screen.contains("the server closed the connection"),
        "{screen:?}"
    );
    server.stop();

    // A reply that comes late, while the client waits at its prompt, is shown at once, not
    // after the next line is typed.
    let late = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = late.local_addr().unwrap().to_string();
    let server = std::thread::spawn(move || {
        let (mut peer, _) = late.accept().unwrap();
        let mut line = [0u8; 5];
        std::io::Read::read_exact(&mut peer, &mut line).unwrap();
        std::thread::sleep(Duration::from_millis(2500));
        peer.write_all(b"late reply\n").unwrap();
        // Hold the connection until the client leaves.
        let _ = std::io::Read::read(&mut peer, &mut line);
    });
    let mut terminal = Terminal::run_client(&addr, None);
    assert!(terminal.shows("> ", 1, PATIENCE), "{:?}", terminal.screen());
    terminal.type_keys(b"ping\n");
    assert!(
        terminal.shows("late reply\n", 1, PATIENCE),
        "{:?}",
        terminal.screen()
    );
    assert!(
        terminal.shows("> ", 3, PATIENCE),
        "the prompt comes back: {:?}",
        terminal.screen()
    );
    terminal.type_keys(b"exit\n");
    let (status, screen) = terminal.wait_exit();
    assert!(status.success(), "{screen}");
    server.join().unwrap();
}

#[test]
fn interactive_datagram_client_removes_its_socket_on_ctrl_c() {
    let path = temp_socket_path("ctrl-c");
    let server = Server::start("threaded", &["--unix-dgram", path.to_str().unwrap()]);
    let tmpdir =
        std::env::temp_dir().join(format!("reverb-test-{}-ctrl-c-dir", std::process::id()));
    std::fs::create_dir_all(&tmpdir).unwrap();
    let sockets = || std::fs::read_dir(&tmpdir).unwrap().count();
    let mut terminal = Terminal::run_client(&server.addrs[0], Some(&tmpdir));
    assert!(terminal.shows("> ", 1, PATIENCE), "{:?}", terminal.screen());
    terminal.type_keys(b"one\n");
    assert!(
        terminal.shows("one\none\n", 1, PATIENCE),
        "{:?}",
        terminal.screen()
    );
    assert_eq!(sockets(), 1, "the client's own socket, while it runs");
    // Ctrl-C, as the terminal sends it.
    terminal.type_keys(&[0x03]);
    let (status, screen) = terminal.wait_exit();
    assert_eq!(status.code(), Some(130), "{screen}");
    assert_eq!(sockets(), 0, "the client's socket is removed on Ctrl-C");
    std::fs::remove_dir(&tmpdir).unwrap();
    server.stop();
}

#[test]
fn forking_reaps_every_child() {
    let server = Server::start("forking", &["--tcp", "127.0.0.1:0"]);
    for n in 0..20u64 {
        let input = common::pattern(1000, n);
        let got = common::round_trip(
            common::Conn::connect(&server.addrs[0]).unwrap(),
            input.clone(),
        );
        assert!(got == input);
    }
    let children = || -> Vec<String> {
        let list = std::fs::read_to_string(format!(
            "/proc/{}/task/{}/children",
            server.pid(),
            server.pid()
        ))
        .unwrap_or_default();
        list.split_whitespace().map(str::to_string).collect()
    };
    let deadline = Instant::now() + PATIENCE;
    while !children().is_empty() {
        assert!(
            Instant::now() < deadline,
            "children left unreaped (zombies): {:?}",
            children()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    server.stop();
}

/// A `forking` child that does not end when shutdown's drain and lingering bounds have
/// passed (stopped here with SIGSTOP) is killed, a second after both and not sooner, and
/// its connection is counted closed (reason `error`); the server then exits 0.
#[test]
fn forking_kills_a_child_stuck_past_the_drain() {
    let mut server = Server::start(
        "forking",
        &["--tcp", "127.0.0.1:0", "--drain-timeout", "1", "--verbose"],
    );
    let before = children_of(server.pid());
    let mut stream = server.connect_tcp();
    stream.write_all(b"stuck").unwrap();
    let mut back = [0u8; 5];
    std::io::Read::read_exact(&mut stream, &mut back).unwrap();
    let child = children_of(server.pid())
        .into_iter()
        .find(|pid| !before.contains(pid))
        .expect("the connection's child");
    let signal = |name: &str| {
        std::process::Command::new("kill")
            .args([name, &child])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    assert!(signal("-STOP"), "stop child {child}");
    let terminated_at = Instant::now();
    server.terminate();
    let status = server.wait_exit(PATIENCE);
    let waited = terminated_at.elapsed();
    // Whatever happened, the stopped child must not outlive the test.
    let _ = signal("-KILL");
    let status = status.expect("the server exits once its stuck child is killed");
    let log = server.stderr();
    assert!(status.success(), "exit {status}:\n{log}");
    assert!(
        log.contains("killing 1 children still draining"),
        "the stuck child is killed:\n{log}"
    );
    assert!(
        log.lines().any(|line| line.contains("reason=\"error\"")
            && line.contains(&format!("its child {child} was killed by signal 9"))),
        "its connection is counted closed, reason error:\n{log}"
    );
    assert!(
        !log.contains("did not exit"),
        "the killed child is reaped:\n{log}"
    );
    // The drain (1 s) and the lingering bound after it (1 s) are the child's, then a
    // second of grace: killed at 3 s, so certainly not before 2 s.
    assert!(
        waited >= Duration::from_secs(2),
        "the child was killed {waited:?} after SIGTERM, inside its drain and lingering bounds"
    );
}

/// The pids of `parent`'s children, from `/proc`.
fn children_of(parent: u32) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// An IPv4-mapped IPv6 address binds as written, TCP and UDP, and the readiness lines
/// print it; IPv4 clients reach it. `[::]` alone stays IPv6-only.
#[test]
fn ipv4_mapped_addresses_bind() {
    use std::io::Read;
    let server = Server::start(
        "epoll",
        &[
            "--tcp",
            "[::ffff:127.0.0.1]:0",
            "--udp",
            "[::ffff:127.0.0.1]:0",
        ],
    );
    let tcp = server.addr("tcp");
    let udp = server.addr("udp");
    assert!(tcp.starts_with("[::ffff:127.0.0.1]:"), "{:?}", server.addrs);
    assert!(udp.starts_with("[::ffff:127.0.0.1]:"), "{:?}", server.addrs);
    let tcp_port = tcp.rsplit(':').next().unwrap();
    let mut stream = std::net::TcpStream::connect(format!("127.0.0.1:{tcp_port}")).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream.write_all(b"mapped").unwrap();
    let mut got = [0u8; 6];
    stream.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"mapped");
    let udp_port = udp.rsplit(':').next().unwrap();
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_read_timeout(Some(PATIENCE)).unwrap();
    socket
        .send_to(b"mapped", format!("127.0.0.1:{udp_port}"))
        .unwrap();
    let mut buf = [0u8; 16];
    let n = socket.recv(&mut buf).expect("a reply over UDP");
    assert_eq!(&buf[..n], b"mapped");
    server.stop();

    // `[::]` is IPv6 only: the same port is still free for IPv4.
    let server = Server::start("epoll", &["--tcp", "[::]:0"]);
    let port = server.addr("tcp").rsplit(':').next().unwrap().to_string();
    let v4 = TcpListener::bind(format!("127.0.0.1:{port}"));
    assert!(v4.is_ok(), "[::] also took IPv4 port {port}: {v4:?}");
    server.stop();
}

/// Every usage error: exit 2, nothing on stdout, one `error:` line, at most one `tip:` line,
/// then the usage of the subcommand that was run.
fn assert_error_points_at_fix(args: &[&str], error_mentions: &[&str], tip_mentions: Option<&str>) {
    let output = run(args);
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
    assert!(
        output.stdout.is_empty(),
        "{args:?}: stdout is for data only"
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(lines[0].starts_with("error: "), "{args:?}: {stderr}");
    for mention in error_mentions {
        assert!(
            lines[0].contains(mention),
            "{args:?}: {mention:?} in the error line: {stderr}"
        );
    }
    let tips: Vec<&&str> = lines
        .iter()
        .filter(|l| l.trim_start().starts_with("tip:"))
        .collect();
    match tip_mentions {
        Some(tip) => {
            assert_eq!(tips.len(), 1, "{args:?}: one hint: {stderr}");
            assert!(
                tips[0].contains(tip),
                "{args:?}: hint should say {tip:?}: {stderr}"
            );
            assert_eq!(
                lines[1], *tips[0],
                "{args:?}: the hint follows the error: {stderr}"
            );
        }
        None => assert!(tips.len() <= 1, "{args:?}: {stderr}"),
    }
    let usage = format!("Usage: reverb {}", args[0]);
    assert!(
        stderr.contains(&usage),
        "{args:?}: the usage of {:?}: {stderr}",
        args[0]
    );
}

#[test]
fn errors_name_flag_value_and_what_is_accepted() {
    assert_error_points_at_fix(
        &["serve", "--model", "epol"],
        &["--model", "'epol'", "blocking", "uring"],
        Some("did you mean 'epoll'?"),
    );
    assert_error_points_at_fix(
        &["serve", "--protocol", "line"],
        &["--protocol", "'line'", "until-quit"],
        Some("did you mean 'lines'?"),
    );
    assert_error_points_at_fix(
        &["compare", "--models", "epoll,pol"],
        &["--models", "'pol'"],
        Some("did you mean 'poll'?"),
    );
    // clap alone would suggest --protocol here.
    assert_error_points_at_fix(
        &["serve", "--port", "7007"],
        &["'--port'"],
        Some("--tcp 127.0.0.1:PORT"),
    );
    assert_error_points_at_fix(
        &["bench", "127.0.0.1:1", "--conns", "0"],
        &["--conns", "0", "1 to"],
        None,
    );
    assert_error_points_at_fix(
        &["serve", "--threads", "0"],
        &["--threads", "'0'", "1 to 4096"],
        None,
    );
    assert_error_points_at_fix(
        &["serve", "--max-buffer", "12Q"],
        &["--max-buffer", "'12Q'", "K, M or G"],
        None,
    );
    assert_error_points_at_fix(
        &["serve", "--prefix", "> "],
        &["--prefix", "--protocol echo"],
        Some("--protocol lines"),
    );
    assert_error_points_at_fix(
        &["serve", "--udp", "tcp://127.0.0.1:7007"],
        &["--udp", "'tcp://127.0.0.1:7007'"],
        Some("--tcp 127.0.0.1:7007"),
    );
    // The port is what is wrong here, not the host.
    assert_error_points_at_fix(
        &["client", "foo:abc"],
        &["foo:abc", "port \"abc\"", "0 to 65535"],
        None,
    );
    assert_error_points_at_fix(&["client", ":7007"], &["host is missing"], None);
    assert_error_points_at_fix(
        &["serve", "--tcp", ":7007"],
        &["--tcp", "host is missing"],
        None,
    );
    assert_error_points_at_fix(&["bench"], &["<ADDR>"], None);
}

#[test]
fn listen_flags_take_the_form_the_readiness_lines_print() {
    let server = Server::start(
        "threaded",
        &["--tcp", "tcp://127.0.0.1:0", "--udp", "udp://127.0.0.1:0"],
    );
    assert!(
        server.addrs[0].starts_with("tcp://127.0.0.1:"),
        "{:?}",
        server.addrs
    );
    assert!(
        server.addrs[1].starts_with("udp://127.0.0.1:"),
        "{:?}",
        server.addrs
    );
    // A readiness line, pasted back, binds again.
    let again = format!(
        "{}0",
        server.addrs[0].trim_end_matches(|c: char| c.is_ascii_digit())
    );
    server.stop();
    let server = Server::start("threaded", &["--tcp", &again]);
    assert_eq!(server.addrs.len(), 1);
    server.stop();
}

#[test]
fn help_teaches_models_protocols_defaults_and_addresses() {
    let serve = run(&["serve", "--help"]);
    assert!(serve.status.success());
    let serve = String::from_utf8_lossy(&serve.stdout);
    for model in [
        "blocking",
        "threaded",
        "pool",
        "forking",
        "busy-poll",
        "select",
        "poll",
        "epoll",
        "async",
        "tokio",
        "uring",
    ] {
        assert!(
            serve.contains(&format!("- {model}:")),
            "{model} with its technique: {serve}"
        );
    }
    for needle in [
        "until-quit:",
        "127.0.0.1:7007",
        "default 16",
        "one per core",
        "[default: epoll]",
        "[default: 256K]",
        "[default: 5]",
        "<BYTES>",
        "<SECS>",
    ] {
        assert!(
            serve.contains(needle),
            "serve --help mentions {needle:?}: {serve}"
        );
    }
    let bench = run(&["bench", "--help"]);
    let bench = String::from_utf8_lossy(&bench.stdout);
    for needle in [
        "tcp://",
        "udp://",
        "unix:///",
        "unix-dgram:///",
        "<BYTES>",
        "<SECS>",
        "[default: 10]",
    ] {
        assert!(
            bench.contains(needle),
            "bench --help mentions {needle:?}: {bench}"
        );
    }
    let compare = run(&["compare", "--help"]);
    let compare = String::from_utf8_lossy(&compare.stdout);
    for needle in [
        "[default: 1,10,100]",
        "[default: 64]",
        "<BYTES>",
        "<SECS>",
        "[default: compare-out]",
    ] {
        assert!(
            compare.contains(needle),
            "compare --help mentions {needle:?}: {compare}"
        );
    }
}

#[test]
fn man_page_and_completions_cover_every_subcommand() {
    let subcommands = ["serve", "client", "bench", "compare", "generate"];
    let man = run(&["generate", "man"]);
    assert!(man.status.success(), "{}", stderr_of(&man));
    let page = String::from_utf8_lossy(&man.stdout);
    assert!(page.contains("\n.TH reverb 1"), "a roff page: {page}");
    assert!(
        !page.contains("reverb\\-serve(1)"),
        "no page names that do not exist"
    );
    for sub in subcommands {
        let heading = format!(".SH \"REVERB {}\"", sub.to_uppercase());
        assert!(
            page.contains(&heading),
            "the man page has {heading}: {page}"
        );
    }
    for flag in ["max\\-buffer", "drain\\-timeout", "conns", "unix\\-dgram"] {
        assert!(page.contains(flag), "the man page documents --{flag}");
    }
    for shell in ["bash", "zsh", "fish"] {
        let output = run(&["generate", &format!("complete-{shell}")]);
        assert!(output.status.success(), "{shell}: {}", stderr_of(&output));
        let script = String::from_utf8_lossy(&output.stdout);
        for sub in subcommands {
            assert!(script.contains(sub), "{shell} completes {sub}: {script}");
        }
        assert!(
            script.contains("busy-poll"),
            "{shell} completes model names"
        );
    }
    let syntax = std::process::Command::new("bash")
        .args([
            "-n",
            "-c",
            &String::from_utf8_lossy(&run(&["generate", "complete-bash"]).stdout),
        ])
        .status()
        .expect("run bash");
    assert!(syntax.success(), "the bash completion parses");
}

/// Any positive `--idle-timeout` is accepted, and what it costs does not grow with it: a
/// timeout of a billion seconds once asked the idle wheel of epoll and uring for one slot
/// per 250 ms tick (96 GB) and aborted the server.
#[test]
fn a_huge_idle_timeout_costs_no_more_than_a_short_one() {
    for model in ["epoll", "uring", "poll"] {
        let server = Server::start(
            model,
            &[
                "--threads",
                "2",
                "--tcp",
                "127.0.0.1:0",
                "--idle-timeout",
                "1e9",
            ],
        );
        let mut stream = server.connect_tcp();
        stream.write_all(b"still here\n").expect("write");
        let mut got = [0; 11];
        std::io::Read::read_exact(&mut stream, &mut got).expect("echo");
        assert_eq!(&got, b"still here\n");
        let rss = server.rss_kib();
        assert!(rss < 64 * 1024, "{model}: {rss} KiB resident");
        server.stop();
    }
}

#[test]
fn two_servers_starting_over_one_stale_file_never_both_serve() {
    // Probe, unlink and bind are three steps: without the directory lock two servers
    // could both find the file stale and both bind, one left holding a path nobody
    // reaches. Exactly one must serve; the other exits 1, "in use". Bounded rounds.
    let started = Instant::now();
    for round in 0..60 {
        if round > 3 && started.elapsed() > Duration::from_secs(20) {
            break;
        }
        let path = temp_socket_path("stale-race");
        drop(UnixListener::bind(&path).expect("a stale socket file"));
        let start = || {
            reverb()
                .args(["serve", "--model", "blocking", "--unix"])
                .arg(&path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start reverb")
        };
        let mut servers = [start(), start()];
        let deadline = Instant::now() + PATIENCE;
        let loser = loop {
            if let Some(i) = (0..2).find(|&i| servers[i].try_wait().expect("wait").is_some()) {
                break i;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: both servers serve {}",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let winner = 1 - loser;
        let status = servers[loser].wait().expect("wait");
        let mut stderr = String::new();
        std::io::Read::read_to_string(
            &mut servers[loser].stderr.take().expect("stderr"),
            &mut stderr,
        )
        .expect("stderr");
        let still_serving = servers[winner].try_wait().expect("wait").is_none();
        let _ = servers[winner].kill();
        let _ = servers[winner].wait();
        let _ = std::fs::remove_file(&path);
        assert_eq!(status.code(), Some(1), "round {round}: {stderr}");
        assert!(stderr.contains("in use"), "round {round}: {stderr}");
        assert!(still_serving, "round {round}: the other server stopped too");
    }
}

#[test]
fn one_unix_path_given_twice_is_named_as_given_twice() {
    let path = temp_socket_path("twice");
    for second in ["--unix", "--unix-dgram"] {
        let out = reverb()
            .args(["serve", "--unix"])
            .arg(&path)
            .arg(second)
            .arg(&path)
            .stdin(Stdio::null())
            .output()
            .expect("run reverb");
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Two flags that cannot both hold: a usage error, found before anything is bound.
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("given twice"), "{stderr}");
        assert!(!stderr.contains("another program"), "{stderr}");
        assert!(!path.exists(), "the first socket file was left behind");
    }
}

#[test]
fn a_unix_path_longer_than_sun_path_says_how_long_and_what_is_accepted() {
    let long = format!("/tmp/{}", "x".repeat(103));
    let at_most = "at most 107 bytes";
    let serve = reverb()
        .args(["serve", "--unix", &long])
        .stdin(Stdio::null())
        .output()
        .expect("run reverb serve");
    let stderr = String::from_utf8_lossy(&serve.stderr);
    assert_eq!(serve.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("108 bytes long") && stderr.contains(at_most),
        "{stderr}"
    );
    let client = reverb()
        .args(["client", &format!("unix://{long}")])
        .stdin(Stdio::null())
        .output()
        .expect("run reverb client");
    let stderr = String::from_utf8_lossy(&client.stderr);
    assert_eq!(client.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("108 bytes long") && stderr.contains(at_most),
        "{stderr}"
    );
}
