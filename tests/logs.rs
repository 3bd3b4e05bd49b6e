//! `serve --log-format json`: every line on stderr is one JSON object.

mod common;

use common::{PATIENCE, Server};
use std::thread;
use std::time::{Duration, Instant};

#[test]
fn json_logs_are_one_object_per_line() {
    let mut server = Server::start(
        "epoll",
        &["--tcp", "127.0.0.1:0", "--log-format", "json", "--verbose"],
    );
    let stream = server.connect_tcp();
    let peer = stream.local_addr().unwrap();
    drop(stream);
    // The connection's line must be there to be checked: a returned `connect` is not an
    // accepted connection (the client's final ACK may wait in a busy CPU's backlog), and
    // one still in the kernel's backlog at SIGTERM is never accepted, nor logged.
    server.wait_for_log_line(&[r#""message":"accepted""#, &format!(r#""peer":"{peer}""#)]);
    server.terminate();
    assert!(server.wait_exit(PATIENCE).expect("exit").success());
    server.wait_for_log(r#""message":"stopped""#);
    let stderr = server.stderr();
    for line in stderr.lines() {
        let object: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not one JSON object ({e}): {line:?}"));
        for key in ["timestamp", "level", "message"] {
            assert!(object.get(key).is_some(), "no {key} in {line}");
        }
    }
    assert!(stderr.lines().count() >= 2, "{stderr}");
}

/// With `--log-format json`, the peer, the listener and the reason are fields of their
/// own on every line that has them, never folded into the message: connections accepted,
/// refused by `--max-conns`, closed for idleness, datagrams dropped by the reflection
/// guard and by the handler's panic.
#[test]
fn json_logs_carry_peer_listener_and_reason_as_fields() {
    use std::io::{Read, Write};
    use std::net::UdpSocket;
    let server = Server::start(
        "epoll",
        &[
            "--tcp",
            "127.0.0.1:0",
            "--udp",
            "127.0.0.1:0",
            "--protocol",
            "lines",
            "--panic-on",
            "boom",
            "--max-conns",
            "1",
            "--idle-timeout",
            "1",
            "--log-format",
            "json",
            "--verbose",
        ],
    );
    let tcp_listener = format!("tcp://{}", server.addr("tcp"));
    let mut held = server.connect_tcp();
    held.write_all(b"hi\n").unwrap();
    let mut back = [0u8; 3];
    held.read_exact(&mut back).unwrap();
    let held_peer = held.local_addr().unwrap().to_string();
    let mut refused = server.connect_tcp();
    let refused_peer = refused.local_addr().unwrap().to_string();
    // `held` must still hold the only place when the server accepts `refused`, which may
    // be later than its `connect` returned (its final ACK may wait in a busy CPU's
    // backlog): so `held` keeps talking, and its idle timer restarting, until the refusal
    // is logged.
    let refused_field = format!(r#""peer":"{refused_peer}""#);
    let refusal = [r#""reason":"max_conns""#, refused_field.as_str()];
    let deadline = Instant::now() + PATIENCE;
    while !server.has_log_line(&refusal) {
        assert!(
            Instant::now() < deadline,
            "no refusal of {refused_peer}:\n{}",
            server.stderr()
        );
        held.write_all(b"hi\n").unwrap();
        held.read_exact(&mut back).unwrap();
        thread::sleep(Duration::from_millis(100));
    }
    let mut rest = Vec::new();
    let _ = refused.read_to_end(&mut rest);
    // The held connection is closed for idleness within 2 s.
    let _ = held.read_to_end(&mut rest);
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp_peer = udp.local_addr().unwrap().to_string();
    udp.send_to(b"boom\n", server.addr("udp")).unwrap();
    server.wait_for_log(r#""reason":"idle_timeout""#);
    server.wait_for_log(r#""reason":"max_conns""#);
    server.wait_for_log(r#""reason":"handler_panic""#);
    let stderr = server.stderr();
    server.stop();
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not one JSON object ({e}): {line:?}"))
        })
        .collect();
    let has = |peer: &str, key: &str, value: &str| {
        lines.iter().any(|l| l["peer"] == peer && l[key] == value)
    };
    assert!(
        has(&held_peer, "listener", &tcp_listener),
        "accepted:\n{stderr}"
    );
    assert!(has(&held_peer, "reason", "idle_timeout"), "idle:\n{stderr}");
    assert!(
        has(&refused_peer, "reason", "max_conns"),
        "refused:\n{stderr}"
    );
    assert!(
        has(&udp_peer, "reason", "handler_panic"),
        "panic:\n{stderr}"
    );
    for line in &lines {
        let message = line["message"].as_str().expect("a message");
        for folded in [&held_peer, &refused_peer, &udp_peer, &tcp_listener] {
            assert!(
                !message.contains(folded.as_str()),
                "{folded} folded into the message: {line}"
            );
        }
    }
}
