//! Fairness within one loop: a connection whose peer keeps its socket full does not keep
//! the loop from serving another connection. One loop (`--threads 1`), so both
//! connections share it.

mod common;

use common::{Conn, PATIENCE, Server, TcpQueues, pattern};
use socket2::{Domain, SockAddr, Socket, Type};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// The kernel buffers asked for at the flooding client, each way (Linux doubles them, up to
/// `net.core.wmem_max` and `rmem_max`): megabytes queued at the server whenever it reads,
/// and room for its replies, so its reads keep finding a full buffer's worth.
const FLOOD_BUFFER_BYTES: usize = 4 << 20;
/// Bytes per write of the flooding client.
const FLOOD_CHUNK_BYTES: usize = 256 * 1024;
/// How much of the flood's echo must come back before the probe starts: the server is
/// busy with the flood by then.
const FLOOD_WARMUP_BYTES: u64 = 4 << 20;
/// The most of the flood's echo that may come back while the probe waits for its own.
/// A loop that serves each connection a read buffer (64 KiB) per turn answers the probe
/// within a turn or two: 0 to 1.2 MiB came back meanwhile in test runs at load 15-18, the
/// test's own wake-up included. A task that read until its socket ran dry (no budget of
/// any kind) let 200-600 MB through first, or now and then none, when the flood happened
/// to leave its socket empty.
const FLOOD_DURING_PROBE_BYTES: u64 = 64 << 20;

/// A client that sends as fast as the kernel takes its bytes and reads the echo as fast
/// as it comes, until told to stop (or three times `PATIENCE` passed: nothing runs for
/// ever).
struct Flood {
    stop: Arc<AtomicBool>,
    echoed: Arc<AtomicU64>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Flood {
    fn start(addr: SocketAddr) -> Flood {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        socket.set_send_buffer_size(FLOOD_BUFFER_BYTES).unwrap();
        socket.set_recv_buffer_size(FLOOD_BUFFER_BYTES).unwrap();
        socket.connect(&SockAddr::from(addr)).expect("connect");
        let stream = TcpStream::from(socket);
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        stream.set_write_timeout(Some(PATIENCE)).unwrap();
        let (stop, echoed) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let deadline = Instant::now() + 3 * PATIENCE;
        let mut writer = stream.try_clone().unwrap();
        let is_stopped = stop.clone();
        let sender = thread::spawn(move || {
            let chunk = pattern(FLOOD_CHUNK_BYTES, 1);
            while !is_stopped.load(Ordering::Relaxed) && Instant::now() < deadline {
                if writer.write_all(&chunk).is_err() {
                    break;
                }
            }
            let _ = writer.shutdown(std::net::Shutdown::Write);
        });
        let (mut reader, count) = (stream, echoed.clone());
        let receiver = thread::spawn(move || {
            let mut buf = vec![0; FLOOD_CHUNK_BYTES];
            while let Ok(n @ 1..) = reader.read(&mut buf) {
                count.fetch_add(n as u64, Ordering::Relaxed);
            }
        });
        Flood {
            stop,
            echoed,
            threads: vec![sender, receiver],
        }
    }

    fn echoed(&self) -> u64 {
        self.echoed.load(Ordering::Relaxed)
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            thread.join().expect("flood thread");
        }
    }
}

/// While one connection floods, a new client is accepted and its small message echoed
/// before much of the flood has come back (`FLOOD_DURING_PROBE_BYTES`) and within
/// `PATIENCE`. A task that read until its socket ran dry, or a loop that served one
/// connection until `WouldBlock`, would come back to the others only when the flood
/// happened to leave its socket empty for a moment.
fn a_flood_does_not_starve_a_small_echo(model: &str) {
    let server = Server::start(model, &["--threads", "1", "--tcp", "127.0.0.1:0"]);
    let addr: SocketAddr = server.addr("tcp").parse().unwrap();
    let flood = Flood::start(addr);
    let started = Instant::now();
    while flood.echoed() < FLOOD_WARMUP_BYTES {
        assert!(
            started.elapsed() < PATIENCE,
            "{model}: the flood's echo never reached {FLOOD_WARMUP_BYTES} bytes"
        );
        thread::sleep(Duration::from_millis(5));
    }
    let mut before = flood.echoed();
    let mut probe = Conn::connect(&format!("tcp://{addr}")).expect("connect the probe");
    let message = pattern(1024, 2);
    probe.write_all(&message).expect("send the probe's message");
    // A returned `connect` is not an accepted connection: the handshake's final ACK and the
    // message behind it may wait in a busy CPU's backlog while the flood goes on through the
    // other CPU (a 200 ms wait let 350 MB of it through), and what the flood echoes
    // meanwhile says nothing about the server. So the count starts at the last look that
    // found the message not yet in the server's socket (neither acknowledged nor held
    // unread there): from before it arrived, never after.
    let has_arrived = |q: TcpQueues| q.client_unacked == 0 || q.server_unread > 0;
    let deadline = Instant::now() + PATIENCE;
    loop {
        let echoed = flood.echoed();
        if TcpQueues::of_conn(&probe).is_some_and(has_arrived) {
            break;
        }
        before = echoed;
        assert!(
            Instant::now() < deadline,
            "{model}: the probe's message never reached the server's socket"
        );
        thread::sleep(Duration::from_millis(1));
    }
    let mut echo = vec![0; message.len()];
    let answered = probe.read_exact(&mut echo);
    let during = flood.echoed() - before;
    flood.stop();
    assert!(
        answered.is_ok(),
        "{model}: a 1 KiB echo got no answer within {PATIENCE:?} while another connection \
         flooded ({during} bytes of the flood echoed meanwhile): {answered:?}"
    );
    assert_eq!(echo, message, "{model}: the probe got wrong bytes");
    assert!(
        during <= FLOOD_DURING_PROBE_BYTES,
        "{model}: {during} bytes of another connection's flood came back before a 1 KiB \
         echo (at most {FLOOD_DURING_PROBE_BYTES})"
    );
    server.stop();
}

#[test]
fn epoll_a_flood_does_not_starve_a_small_echo() {
    a_flood_does_not_starve_a_small_echo("epoll");
}

#[test]
fn async_a_flood_does_not_starve_a_small_echo() {
    a_flood_does_not_starve_a_small_echo("async");
}

#[test]
fn tokio_a_flood_does_not_starve_a_small_echo() {
    a_flood_does_not_starve_a_small_echo("tokio");
}
