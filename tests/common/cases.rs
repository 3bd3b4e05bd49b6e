//! The conformance cases: what every model must do, stated once.
//!
//! Each function takes a model name, starts that model, checks one behaviour over real
//! sockets, and stops the server with SIGTERM expecting exit 0.

use super::*;
use std::net::UdpSocket;
use std::os::unix::net::UnixDatagram;
use std::sync::PoisonError;

/// Models that serve one client at a time per listener.
fn is_serial(model: &str) -> bool {
    model == "blocking"
}

/// 1 MiB of random bytes comes back byte-exact, then EOF after our half-close.
pub fn echo_byte_exact(model: &str) {
    let server = Server::start(model, &["--tcp", "127.0.0.1:0"]);
    let input = pattern(1 << 20, 1);
    let got = round_trip(server.connect_conn(), input.clone());
    assert!(got == input, "{} bytes back, not the 1 MiB sent", got.len());
    server.stop();
}

/// IPv6 and Unix stream listeners echo too, and the socket file goes away at exit.
pub fn every_stream_transport(model: &str) {
    let path = temp_socket_path(model);
    let path_arg = path.to_str().unwrap().to_string();
    let server = Server::start(model, &["--tcp", "[::1]:0", "--unix", &path_arg]);
    assert!(
        server.addrs[0].starts_with("tcp://[::1]:"),
        "{:?}",
        server.addrs
    );
    for addr in server.addrs.clone() {
        let input = pattern(100_000, 2);
        let got = round_trip(Conn::connect(&addr).expect("connect"), input.clone());
        assert!(got == input, "{addr}: echo differs");
    }
    assert!(exists(&path));
    server.stop();
    assert!(!exists(&path), "the Unix socket file is removed at exit");
}

/// UDP and Unix datagrams: each comes back whole, up to the 65,507-byte UDP maximum.
pub fn datagram_each(model: &str) {
    let path = temp_socket_path(model);
    let path_arg = path.to_str().unwrap().to_string();
    let server = Server::start(
        model,
        &[
            "--udp",
            "127.0.0.1:0",
            "--unix-dgram",
            &path_arg,
            "--protocol",
            "lines",
            "--prefix",
            "> ",
        ],
    );
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(PATIENCE)).unwrap();
    udp.connect(server.addr("udp")).unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    for size in [0usize, 1, 1000, 65_505] {
        let datagram = pattern(size, size as u64);
        udp.send(&datagram).unwrap();
        let n = udp.recv(&mut buf).expect("udp reply");
        assert_eq!(n, size + 2, "one whole reply per datagram");
        assert!(buf[..2] == *b"> " && buf[2..n] == datagram[..]);
    }
    let own = temp_socket_path("client");
    let unix = UnixDatagram::bind(&own).unwrap();
    unix.set_read_timeout(Some(PATIENCE)).unwrap();
    unix.connect(&path).unwrap();
    let datagram = pattern(100_000, 9);
    unix.send(&datagram).unwrap();
    let n = unix.recv(&mut buf[..]).expect("unix datagram reply");
    assert!(n == 100_002 && buf[2..n] == datagram[..]);
    let _ = std::fs::remove_file(&own);
    server.stop();
    assert!(!exists(&path));
}

/// Stream listeners and datagram sockets in one server: every one is served, whichever
/// order they were given in (a loop numbers its sockets in one sequence, listeners first).
pub fn streams_and_datagrams_together(model: &str) {
    let stream_path = temp_socket_path(model);
    let datagram_path = temp_socket_path(model);
    let server = Server::start(
        model,
        &[
            "--udp",
            "127.0.0.1:0",
            "--tcp",
            "127.0.0.1:0",
            "--unix-dgram",
            datagram_path.to_str().unwrap(),
            "--unix",
            stream_path.to_str().unwrap(),
        ],
    );
    for scheme in ["tcp", "unix"] {
        let addr = format!("{scheme}://{}", server.addr(scheme));
        let input = pattern(10_000, 3);
        let got = round_trip(Conn::connect(&addr).expect("connect"), input.clone());
        assert!(got == input, "{addr}: echo differs");
    }
    let mut buf = [0u8; 64];
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(PATIENCE)).unwrap();
    udp.connect(server.addr("udp")).unwrap();
    udp.send(b"over udp").unwrap();
    let n = udp.recv(&mut buf).expect("a reply over UDP");
    assert_eq!(&buf[..n], b"over udp");
    let own = temp_socket_path("client");
    let unix = UnixDatagram::bind(&own).unwrap();
    unix.set_read_timeout(Some(PATIENCE)).unwrap();
    unix.connect(&datagram_path).unwrap();
    unix.send(b"over unix-dgram").unwrap();
    let n = unix.recv(&mut buf).expect("a reply over unix-dgram");
    assert_eq!(&buf[..n], b"over unix-dgram");
    let _ = std::fs::remove_file(&own);
    server.stop();
}

/// Datagrams that get no reply leave the socket serving: a datagram equal to the
/// `--panic-on` word (logged with its sender), one from an unnamed Unix socket, and one
/// from a source port below 1024 (the reflection guard; only tried where we may bind it).
pub fn datagram_no_reply_cases(model: &str) {
    let path = temp_socket_path(model);
    let path_arg = path.to_str().unwrap().to_string();
    let server = Server::start(
        model,
        &[
            "--udp",
            "127.0.0.1:0",
            "--unix-dgram",
            &path_arg,
            "--protocol",
            "lines",
            "--panic-on",
            "boom",
        ],
    );
    let silence = Duration::from_millis(300);
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.connect(server.addr("udp")).unwrap();
    let mut buf = [0u8; 64];
    for word in [&b"boom\n"[..], b"boom"] {
        udp.send(word).unwrap();
        udp.set_read_timeout(Some(silence)).unwrap();
        assert!(udp.recv(&mut buf).is_err(), "{word:?} got a reply");
    }
    // Logged with the sender's address.
    let sender = format!("peer={}", udp.local_addr().unwrap());
    server.wait_for_log_line(&["handler panicked", &sender]);
    let unnamed = UnixDatagram::unbound().unwrap();
    unnamed.send_to(b"anonymous\n", &path).unwrap();
    // The guard's boundary: port 1023 is dropped, 1024 answered.
    if let Some(low) = bind_udp_source_port(1023) {
        low.send_to(b"spoofed\n", server.addr("udp")).unwrap();
        low.set_read_timeout(Some(silence)).unwrap();
        assert!(
            low.recv(&mut buf).is_err(),
            "a port-1023 source got a reply"
        );
    }
    let lowest = bind_udp_source_port(1024).expect("bind a UDP socket to port 1024");
    lowest.set_read_timeout(Some(PATIENCE)).unwrap();
    lowest.send_to(b"port 1024\n", server.addr("udp")).unwrap();
    let n = lowest
        .recv(&mut buf)
        .expect("a port-1024 source is answered");
    assert_eq!(&buf[..n], b"port 1024\n");
    udp.set_read_timeout(Some(PATIENCE)).unwrap();
    udp.send(b"after\n").unwrap();
    let n = udp.recv(&mut buf).expect("udp still answers");
    assert_eq!(&buf[..n], b"after\n");
    let own = temp_socket_path("client");
    let unix = UnixDatagram::bind(&own).unwrap();
    unix.set_read_timeout(Some(PATIENCE)).unwrap();
    unix.send_to(b"named\n", &path).unwrap();
    let n = unix.recv(&mut buf).expect("unix datagram still answers");
    assert_eq!(&buf[..n], b"named\n");
    let _ = std::fs::remove_file(&own);
    server.stop();
}

/// A UDP socket bound to `port` on some loopback address 127.0.0.2-254 that is free, so
/// that tests running at once do not take each other's fixed port; `None` when none
/// could be bound (a port below 1024 without the privilege to bind it).
fn bind_udp_source_port(port: u16) -> Option<UdpSocket> {
    let start = std::process::id() as usize + thread_id_number();
    (0..253)
        .map(|n| 2 + (start + n) % 253)
        .find_map(|host| UdpSocket::bind(format!("127.0.0.{host}:{port}")).ok())
}

/// A number that differs between the threads of this test process.
fn thread_id_number() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static NUMBER: usize = NEXT.fetch_add(7, Ordering::Relaxed);
    }
    NUMBER.with(|n| *n)
}

/// After the client half-closes, every owed reply arrives, then the server's EOF.
pub fn half_close_drains(model: &str) {
    let server = Server::start(
        model,
        &[
            "--tcp",
            "127.0.0.1:0",
            "--protocol",
            "lines",
            "--prefix",
            "P ",
        ],
    );
    let mut conn = server.connect_conn();
    conn.write_all(b"one\ntwo\nthree-without-newline").unwrap();
    conn.shutdown_write();
    let (got, error) = conn.read_to_end_lossy();
    assert!(error.is_none(), "{error:?}");
    assert_eq!(got, b"P one\nP two\nP three-without-newline");
    server.stop();
}

/// `lines` answers a line only once its newline has arrived, whatever the model; only a
/// line longer than `--max-buffer` comes back in pieces before its newline.
pub fn lines_wait_for_newline(model: &str) {
    let server = Server::start(
        model,
        &[
            "--tcp",
            "127.0.0.1:0",
            "--protocol",
            "lines",
            "--prefix",
            "You Got ",
            "--max-buffer",
            "16K",
        ],
    );
    let mut conn = server.connect_conn();
    conn.write_all(b"spl").unwrap();
    assert!(
        conn.receives_nothing_within(Duration::from_millis(300)),
        "a partial line was answered before its newline"
    );
    conn.write_all(b"it\n").unwrap();
    assert_eq!(conn.read_exactly(14), b"You Got split\n");
    let long = vec![b'y'; 100_000];
    conn.write_all(&long).unwrap();
    let first = conn.read_exactly(8 + 16 * 1024);
    assert!(
        first[..8] == *b"You Got " && first[8..].iter().all(|&b| b == b'y'),
        "a line past --max-buffer comes back in pieces before its newline"
    );
    conn.write_all(b"\n").unwrap();
    let rest = conn.read_exactly(long.len() - 16 * 1024 + 1);
    assert!(rest[..rest.len() - 1].iter().all(|&b| b == b'y') && rest.ends_with(b"\n"));
    conn.shutdown_write();
    assert!(conn.sees_close_within(PATIENCE));
    server.stop();
}

/// A client with a tiny receive buffer forces short writes; nothing is lost.
pub fn short_writes_lose_nothing(model: &str) {
    let server = Server::start(model, &["--tcp", "127.0.0.1:0", "--max-buffer", "64K"]);
    let conn = server.connect_slow_reader();
    let input = pattern(4 << 20, 3);
    let got = round_trip(conn, input.clone());
    assert!(got == input, "{} bytes back of {}", got.len(), input.len());
    server.stop();
}

/// A client that sends 64 MiB without reading: the server stops reading it once
/// `--max-buffer` is owed (what it took in and did not write back stays within the bound at
/// every sample), its memory stays bounded throughout, it sleeps while it waits for the
/// client to read, and afterwards every byte comes back.
pub fn unread_flood_bounded(model: &str) {
    let max_buffer = 256 * 1024;
    let server = Server::start(model, &["--tcp", "127.0.0.1:0", "--max-buffer", "256K"]);
    let before = server.rss_kib();
    let mut conn = server.connect_conn();
    let total = 64 << 20;
    let input = Arc::new(pattern(total, 4));
    let flood = Flood::start(&conn, input.clone());
    let peak_rss = RssSampler::start(server.pid());
    // Echo owes back exactly what it took in.
    let stopped = flood.wait_until_server_stops_reading(model, |s| {
        s.taken_in.saturating_sub(s.written) <= max_buffer
    });
    assert!(
        stopped.taken_in < total as u64,
        "the whole flood was absorbed without backpressure"
    );
    // Now the server waits for the client to read. The input it left unread must not keep
    // waking it (a readiness model that never told its mechanism to stop watching for
    // input would spin on it); busy-poll spins by design.
    if model != "busy-poll" {
        let (spent, spinning) =
            server.cpu_and_spinning_threads_while_still(Duration::from_secs(1), || flood.look());
        assert!(
            spent < Duration::from_millis(100) && spinning.is_empty(),
            "{model}: {spent:?} of CPU in 1 s while the client read nothing, threads \
             {spinning:?} never slept: spinning"
        );
    }
    conn.set_timeouts(PATIENCE);
    let mut got = vec![0u8; total];
    let deadline = Instant::now() + TRANSFER_DEADLINE;
    let mut filled = 0;
    while filled < total {
        assert!(
            Instant::now() < deadline,
            "{model}: only {filled} of {total} bytes came back within {TRANSFER_DEADLINE:?}"
        );
        match conn.read(&mut got[filled..]) {
            Ok(0) => panic!("EOF after {filled} of {total} bytes"),
            Ok(n) => filled += n,
            // A stop and continue of the test (a debugger, a loaded machine's job control)
            // ends a read with a timeout early.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("reading the flood back after {filled} bytes: {e}"),
        }
    }
    assert!(got == *input, "the flood came back altered");
    flood.finish();
    assert!(conn.sees_close_within(PATIENCE), "EOF after the flood");
    let peak = peak_rss.stop();
    eprintln!("{model}: server RSS {before} KiB before, at most {peak} KiB during a 64 MiB flood");
    assert!(
        peak < before + 16 * 1024,
        "server RSS grew from {before} KiB to {peak} KiB while the client did not read"
    );
    server.stop();
}

/// `lines` with a long prefix and a flood of bare newlines (each owes the whole prefix)
/// from a client that reads nothing: what the server owes never exceeds `--max-buffer`
/// by more than one line's reply, whatever it read at once.
pub fn prefix_flood_bounded(model: &str) {
    let max_buffer: u64 = 64 * 1024;
    let prefix = "p".repeat(1000);
    let reply_per_newline = prefix.len() as u64 + 1;
    let server = Server::start(
        model,
        &[
            "--tcp",
            "127.0.0.1:0",
            "--protocol",
            "lines",
            "--prefix",
            &prefix,
            "--max-buffer",
            "64K",
        ],
    );
    let conn = server.connect_conn();
    let flood = Flood::start(&conn, Arc::new(vec![b'\n'; 8 << 20]));
    flood.wait_until_server_stops_reading(model, |s| {
        s.taken_in * reply_per_newline <= max_buffer + reply_per_newline + s.written
    });
    drop(conn);
    flood.finish();
    server.stop();
}

/// A client writing a flood from a thread without ever reading, counting what it wrote.
struct Flood {
    /// The TCP connection's two ends, whose kernel queues are visible; `None` over a
    /// Unix socket, where only the client's count and the server's memory are.
    tcp_ends: Option<(std::net::SocketAddr, std::net::SocketAddr)>,
    /// What the kernel took from the writer. The writer holds the lock through each write
    /// and the count that follows it: a write blocked on a full socket may already have
    /// handed part of its bytes to the kernel, which its count does not show until the
    /// write returns, so only a holder of the lock sees a count that matches the kernel's.
    sent: Arc<Mutex<u64>>,
    /// Set while [`Flood::look`] waits for the lock: the writer lets it in before writing
    /// again.
    is_look_waiting: Arc<std::sync::atomic::AtomicBool>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    writer: thread::JoinHandle<()>,
}

/// The most one write of the flood blocks: the longest [`Flood::look`] waits for the writer.
const FLOOD_WRITE_TIMEOUT: Duration = Duration::from_millis(20);

/// One look at a flood: the writer's count and, over TCP, the kernel's queues at both ends,
/// read while no write is under way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FloodLook {
    sent: u64,
    queues: Option<TcpQueues>,
}

impl FloodLook {
    /// What the server took in and wrote back; over a Unix socket, what the client sent
    /// stands for what the server took in.
    fn sample(&self) -> FloodSample {
        match self.queues {
            Some(queues) => FloodSample::of(queues, self.sent),
            None => FloodSample {
                taken_in: self.sent,
                written: 0,
            },
        }
    }
}

impl Flood {
    /// Starts writing `input` on `conn` (then half-closes); each write's count is added
    /// as the kernel takes it.
    fn start(conn: &Conn, input: Arc<Vec<u8>>) -> Flood {
        let tcp_ends = match conn {
            Conn::Tcp(stream) => Some((stream.local_addr().unwrap(), stream.peer_addr().unwrap())),
            Conn::Unix(_) => None,
        };
        let mut writer = conn.try_clone();
        // Short write timeouts, so the thread notices `stop` while the server is not
        // reading, and a look waits for the lock no longer than one write.
        writer.set_timeouts(FLOOD_WRITE_TIMEOUT);
        let sent = Arc::new(Mutex::new(0));
        let is_look_waiting = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (progress, look_waiting, stopping) =
            (sent.clone(), is_look_waiting.clone(), stop.clone());
        let writer = thread::spawn(move || {
            let mut at = 0;
            while at < input.len() && !stopping.load(Ordering::Relaxed) {
                while look_waiting.load(Ordering::SeqCst) && !stopping.load(Ordering::Relaxed) {
                    thread::sleep(Duration::from_millis(1));
                }
                let mut sent = progress.lock().unwrap_or_else(PoisonError::into_inner);
                let end = (at + 64 * 1024).min(input.len());
                match writer.write(&input[at..end]) {
                    Ok(n) => {
                        at += n;
                        *sent += n as u64;
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock
                                | io::ErrorKind::TimedOut
                                | io::ErrorKind::Interrupted
                        ) => {}
                    Err(_) => return,
                }
            }
            if at == input.len() {
                writer.shutdown_write();
            }
        });
        Flood {
            tcp_ends,
            sent,
            is_look_waiting,
            stop,
            writer,
        }
    }

    /// The writer's count and the connection's queues, read while the writer waits
    /// between two writes, so that the count is what the client's kernel took.
    fn look(&self) -> FloodLook {
        self.is_look_waiting.store(true, Ordering::SeqCst);
        let held = self.sent.lock().unwrap_or_else(PoisonError::into_inner);
        let queues = (self.tcp_ends).map(|(client, server)| TcpQueues::read_listed(client, server));
        let sent = *held;
        drop(held);
        self.is_look_waiting.store(false, Ordering::SeqCst);
        let queues = queues.map(|queues| queues.expect("the connection left /proc/net/tcp"));
        FloodLook { sent, queues }
    }

    /// Samples the connection every 50 ms until the server has taken in nothing more for
    /// 500 ms and, over TCP, has written something back: a connection still in the
    /// kernel's backlog (a returned `connect` is not an accepted connection) takes in
    /// nothing either, and would meet every bound without being served. Fails if the
    /// server is still reading, or never wrote back, after twice [`PATIENCE`] (a loaded
    /// machine may take seconds to settle). `within_bound` is asserted on every look equal
    /// to the one before, the writer's count and all four queues: the kernel lists the two
    /// ends at slightly different moments, so only a look at a still connection gives
    /// exact counts (a count equal to the one before is not enough: the queues of a
    /// connection in motion can shift bytes from one end to the other and leave it equal),
    /// and a server that reads past its bound and then stops is still seen. Over a Unix
    /// socket the kernel's queues are not visible: the bound is not checked (the server's
    /// memory still is, by the caller). Returns the last sample.
    fn wait_until_server_stops_reading(
        &self,
        model: &str,
        within_bound: impl Fn(&FloodSample) -> bool,
    ) -> FloodSample {
        let start = Instant::now();
        let mut previous: Option<FloodLook> = None;
        let mut taken_in_since = Instant::now();
        loop {
            thread::sleep(Duration::from_millis(50));
            let look = self.look();
            let sample = look.sample();
            let is_still = previous == Some(look);
            if is_still && self.tcp_ends.is_some() {
                assert!(
                    within_bound(&sample),
                    "{model}: the server read past its bound from a client that reads \
                     nothing: took in {} bytes, wrote back {} ({look:?})",
                    sample.taken_in,
                    sample.written
                );
            }
            if previous.is_none_or(|p| p.sample().taken_in != sample.taken_in) {
                taken_in_since = Instant::now();
            } else if is_still
                && taken_in_since.elapsed() >= Duration::from_millis(500)
                && (self.tcp_ends.is_none() || sample.written > 0)
            {
                return sample;
            }
            assert!(
                start.elapsed() < 2 * PATIENCE,
                "{model}: the server kept reading a client that reads nothing, or never \
                 answered it, for {:?} (took in {} bytes, wrote back {})",
                2 * PATIENCE,
                sample.taken_in,
                sample.written
            );
            previous = Some(look);
        }
    }

    /// Stops writing and waits for the writer thread.
    fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.writer.join().expect("flood writer");
    }
}

/// Samples a process tree's resident memory every 20 ms and keeps the peak.
struct RssSampler {
    stop: Arc<std::sync::atomic::AtomicBool>,
    sampler: thread::JoinHandle<u64>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = stop.clone();
        let sampler = thread::spawn(move || {
            let mut peak = 0;
            while !stopping.load(Ordering::Relaxed) {
                peak = peak.max(tree_rss_kib(pid));
                thread::sleep(Duration::from_millis(20));
            }
            peak
        });
        RssSampler { stop, sampler }
    }

    /// The peak resident memory seen, in KiB.
    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.sampler.join().expect("RSS sampler")
    }
}

/// A handler panic closes only its own connection, is logged with the peer's address,
/// and the server keeps serving everyone else and every later client.
pub fn panic_is_isolated(model: &str) {
    let server = Server::start(
        model,
        &[
            "--tcp",
            "127.0.0.1:0",
            "--protocol",
            "lines",
            "--panic-on",
            "boom",
        ],
    );
    let concurrent = !is_serial(model);
    let mut calm = server.connect_conn();
    // Settled by its echo before the victim connects: a returned `connect` is not an
    // accepted connection (its final ACK may wait in a busy CPU's backlog while the next
    // handshake completes), and a serial model that took the victim first would wait on
    // it while the test waits on `calm`.
    calm.write_all(b"before\n").unwrap();
    assert_eq!(calm.read_exactly(7), b"before\n");
    let mut victim = server.connect_conn();
    if !concurrent {
        // The victim waits in the backlog until `calm` leaves.
        calm.shutdown_write();
        assert!(calm.sees_close_within(PATIENCE));
    }
    // A Unix client is unnamed: the log can only say "unix:".
    let victim_addr = match &victim {
        Conn::Tcp(s) => s.local_addr().unwrap().to_string(),
        Conn::Unix(_) => "unix:".to_string(),
    };
    victim.write_all(b"fine\n").unwrap();
    assert_eq!(victim.read_exactly(5), b"fine\n");
    victim.write_all(b"boom\n").unwrap();
    assert!(
        victim.sees_close_within(PATIENCE),
        "the panicking connection is closed"
    );
    if concurrent {
        calm.write_all(b"after\n").unwrap();
        assert_eq!(
            calm.read_exactly(6),
            b"after\n",
            "the other connection lives on"
        );
    }
    let later = round_trip(server.connect_conn(), b"later\n".to_vec());
    assert_eq!(later, b"later\n");
    server.wait_for_log(&victim_addr);
    server.wait_for_log("panicked");
    server.stop();
}

/// The greeting comes first, before any reply.
pub fn greeting_first(model: &str) {
    let server = Server::start(
        model,
        &["--tcp", "127.0.0.1:0", "--greeting", "欢迎访问服务器!\n"],
    );
    let got = round_trip(server.connect_conn(), b"hi".to_vec());
    assert_eq!(got, "欢迎访问服务器!\nhi".as_bytes());
    server.stop();
}

/// `until-quit` answers once, with the prefix, when the input ends with `quit\n`, and
/// closes; also at a half-close.
pub fn until_quit(model: &str) {
    let server = Server::start(
        model,
        &[
            "--tcp",
            "127.0.0.1:0",
            "--protocol",
            "until-quit",
            "--prefix",
            "got:",
        ],
    );
    let mut conn = server.connect_conn();
    conn.write_all(b"a\nb").unwrap();
    thread::sleep(Duration::from_millis(50));
    conn.write_all(b"\nquit\n").unwrap();
    let (got, error) = conn.read_to_end_lossy();
    assert!(error.is_none(), "{error:?}");
    assert_eq!(got, b"got:a\nb\nquit\n");
    let got = round_trip(server.connect_conn(), b"no quit here".to_vec());
    assert_eq!(got, b"got:no quit here");
    server.stop();
}

/// Many clients at once all get their own bytes back (serial models: one after another).
pub fn many_clients(model: &str) {
    let server = Server::start(model, &["--tcp", "127.0.0.1:0"]);
    let addr = server.addrs[0].clone();
    if is_serial(model) {
        for n in 0..10u64 {
            let input = pattern(10_000, n);
            let got = round_trip(Conn::connect(&addr).unwrap(), input.clone());
            assert!(got == input);
        }
    } else {
        // All 50 connect first, so the model must hold them all open at once.
        let conns: Vec<Conn> = (0..50).map(|_| Conn::connect(&addr).unwrap()).collect();
        let workers: Vec<_> = conns
            .into_iter()
            .enumerate()
            .map(|(n, conn)| {
                thread::spawn(move || {
                    let input = pattern(64 * 1024, n as u64 + 100);
                    round_trip(conn, input.clone()) == input
                })
            })
            .collect();
        for worker in workers {
            assert!(worker.join().unwrap(), "a client got wrong bytes");
        }
    }
    server.stop();
}

/// `--max-conns 2`: a third connection is closed at once, and logged; once one leaves,
/// a new one is served.
pub fn max_conns(model: &str) {
    let server = Server::start(model, &["--tcp", "127.0.0.1:0", "--max-conns", "2"]);
    let mut first = server.connect_conn();
    first.write_all(b"1").unwrap();
    assert_eq!(first.read_exactly(1), b"1");
    let mut second = server.connect_conn();
    if !is_serial(model) {
        second.write_all(b"2").unwrap();
        assert_eq!(second.read_exactly(1), b"2");
        let mut third = server.connect_conn();
        assert!(
            third.sees_close_within(PATIENCE),
            "the third connection is refused"
        );
        // Refused without a lingering close (it is owed nothing): closed at once, so what
        // it sends next is answered with a reset, not read and thrown away for seconds.
        let refused_at = Instant::now();
        let is_closed = loop {
            if third.write_all(b"late").is_err() {
                break true;
            }
            if refused_at.elapsed() > Duration::from_millis(1500) {
                break false;
            }
            thread::sleep(Duration::from_millis(50));
        };
        assert!(
            is_closed,
            "the refused connection still took bytes 1.5 s after its EOF: it lingered"
        );
        // The refusal names the limit it hit.
        server.wait_for_log("refusing: already 2 connections open (--max-conns)");
    }
    drop(first);
    drop(second);
    // The server notices the departures asynchronously; retry briefly.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let mut conn = server.connect_conn();
        conn.write_all(b"again").unwrap();
        let mut buf = [0u8; 5];
        if conn.read_exact(&mut buf).is_ok() {
            assert_eq!(&buf, b"again");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no place freed after clients left"
        );
        thread::sleep(Duration::from_millis(50));
    }
    server.stop();
}

/// `--idle-timeout 1`: a silent connection is closed between 1 s and 2 s; a talkative
/// one is not.
pub fn idle_timeout(model: &str) {
    let server = Server::start(model, &["--tcp", "127.0.0.1:0", "--idle-timeout", "1"]);
    let mut talkative = if is_serial(model) {
        None
    } else {
        Some(server.connect_conn())
    };
    let mut silent = server.connect_conn();
    let start = Instant::now();
    if let Some(conn) = talkative.as_mut() {
        for _ in 0..6 {
            conn.write_all(b"x").unwrap();
            assert_eq!(conn.read_exactly(1), b"x");
            thread::sleep(Duration::from_millis(300));
        }
    }
    assert!(
        silent.sees_close_within(Duration::from_secs(3)),
        "idle connection closed"
    );
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(950) && waited <= Duration::from_millis(2600),
        "closed after {waited:?}, not within 1..2 s"
    );
    if let Some(mut conn) = talkative {
        conn.write_all(b"y").unwrap();
        assert_eq!(
            conn.read_exactly(1),
            b"y",
            "an active connection stays open"
        );
    }
    server.stop();
}

/// A peer that sends 4 MiB and never reads its replies, nothing more, sent nothing for
/// `--idle-timeout`: it is closed within the timeout and one second, as idle, however much
/// the server still owes it (or it would hold its place and `--max-buffer` bytes for
/// ever, and with `blocking` the whole listener).
pub fn idle_while_replies_are_owed(model: &str) {
    let server = Server::start(model, &["--tcp", "127.0.0.1:0", "--idle-timeout", "1"]);
    let flood = server.connect_slow_reader();
    flood.set_timeouts(Duration::from_secs(20));
    let mut writer = flood.try_clone();
    let started = Instant::now();
    // Blocks once every buffer on the way is full; the lingering close after the idle
    // close reads and discards the rest.
    let sender = thread::spawn(move || drop(writer.write_all(&pattern(4 << 20, 5))));
    let closed_at = loop {
        let log = server.stderr();
        if log.lines().any(|line| line.contains("closing: idle")) {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "a peer owed replies it does not read was never closed as idle:\n{log}"
        );
        thread::sleep(Duration::from_millis(20));
    };
    // The server read its last byte a moment after the start, when its buffer filled.
    assert!(
        closed_at <= Duration::from_millis(3000),
        "closed as idle after {closed_at:?}, not within 1..2 s of its last byte"
    );
    server.wait_for_log_line(&["closing: idle", "idle_timeout"]);
    drop(flood);
    let _ = sender.join();
    server.stop();
}

/// A peer that keeps taking its replies, however slowly, is never idle. Over a Unix stream
/// socket, which turns writable only once three quarters of its send buffer are free, the
/// server meets no writable edge, and reads nothing (its output is full), for longer than
/// the timeout while the peer steadily drains: 400,000 bytes sent at once and read 8 KiB
/// every 100 ms under `--idle-timeout 1 --max-buffer 16K` all come back, byte-exact, before
/// any EOF. (Once the kernel holds every reply, the server owes nothing and may close idle:
/// its close is graceful, so those bytes still arrive first.)
pub fn slow_steady_reader_is_not_idle(model: &str) {
    if model == "uring" {
        // Not yet: its send waits in the ring for that writable edge, and nothing retries
        // it at the deadline, so such a peer is still closed idle.
        return;
    }
    let path = temp_socket_path(model);
    let path_arg = path.to_str().unwrap().to_string();
    let args = [
        "--unix",
        &path_arg,
        "--idle-timeout",
        "1",
        "--max-buffer",
        "16K",
    ];
    let server = Server::start(model, &args);
    let mut conn = server.connect_conn();
    conn.set_timeouts(Duration::from_secs(5));
    let input = pattern(400_000, 12);
    let mut writer = conn.try_clone();
    let sent = input.clone();
    let sender = thread::spawn(move || writer.write_all(&sent).map_err(|e| e.to_string()));
    let mut got = Vec::with_capacity(input.len());
    let mut buf = [0u8; 8192];
    while got.len() < input.len() {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!("{model}: reading after {} bytes: {e}", got.len()),
        }
        thread::sleep(Duration::from_millis(100));
    }
    let log = server.stderr();
    assert!(
        got == input,
        "{model}: {} of {} bytes came back before EOF, from a peer still taking its replies:\n{log}",
        got.len(),
        input.len()
    );
    assert_eq!(sender.join().unwrap(), Ok(()));
    server.stop();
}

/// A server with nothing to do sleeps: with an idle connection open and `--idle-timeout`
/// timing it, it spends next to no CPU (a wait that returns at once, or a loop that waits
/// for a connection to become writable while it owes nothing, would spin). busy-poll spins
/// by design.
pub fn idle_server_sleeps(model: &str) {
    if model == "busy-poll" {
        return;
    }
    let server = Server::start(model, &["--tcp", "127.0.0.1:0", "--idle-timeout", "60"]);
    let mut conn = server.connect_conn();
    conn.write_all(b"served, then idle\n").unwrap();
    assert_eq!(conn.read_exactly(18), b"served, then idle\n");
    // Let the reply's bookkeeping and any start-up work settle first.
    server.wait_until_asleep();
    let spent = server.cpu_spent_over(Duration::from_secs(1));
    assert!(
        spent < Duration::from_millis(50),
        "{model}: {spent:?} of CPU in 1 s with nothing to do: spinning"
    );
    server.stop();
}

/// SIGTERM: replies owed for bytes already received still arrive, then EOF, and exit 0.
pub fn shutdown_drains(model: &str) {
    drain_what_is_owed(model, 5, &[]);
}

/// SIGTERM while a slow reader is owed 200,000 bytes; it then sends `late`, which the
/// draining server no longer reads. Every owed byte still arrives, then EOF (never a
/// reset), and the server exits 0.
fn drain_what_is_owed(model: &str, seed: u64, late: &[u8]) {
    drain_bytes_owed(model, seed, late, 200_000, &[]);
}

/// SIGTERM while a slow reader is owed 3 MB under `--max-buffer 4M`: more than the kernel's
/// socket buffers hold, so the server itself still holds most of it when the drain begins,
/// and every byte of it must still arrive.
pub fn shutdown_drains_what_the_server_holds(model: &str) {
    drain_bytes_owed(model, 6, &[], 3_000_000, &["--max-buffer", "4M"]);
}

/// While it drains a connection whose peer reads nothing, the server waits for the peer,
/// not in a spin (a datagram socket it no longer serves, with a datagram queued, kept
/// watched).
pub fn drain_waits_without_spinning(model: &str) {
    if model == "busy-poll" {
        return;
    }
    let server = Server::start(
        model,
        &[
            "--tcp",
            "127.0.0.1:0",
            "--udp",
            "127.0.0.1:0",
            // Long enough that a loaded machine never cuts the slow reader's 3 MB (it
            // did at 3 s): the drain ends when they are taken.
            "--drain-timeout",
            "20",
            "--max-buffer",
            "4M",
        ],
    );
    let mut conn = server.connect_slow_reader();
    // More than the kernel's buffers take (see shutdown_drains_what_the_server_holds).
    let input = pattern(3_000_000, 8);
    conn.write_all(&input).unwrap();
    let received = wait_until_the_server_read_all_it_will(&conn, model, input.len());
    server.terminate();
    thread::sleep(Duration::from_millis(200));
    // A datagram the draining server no longer answers: its socket must not stay watched.
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let _ = udp.send_to(b"late", server.addr("udp"));
    // Measured while the replies stand still: a server that a loaded machine held back may
    // still be handing the kernel what fits after the wait above.
    let (spent, spinning) = server
        .cpu_and_spinning_threads_while_still(Duration::from_secs(1), || TcpQueues::of_conn(&conn));
    assert!(
        spent < Duration::from_millis(100) && spinning.is_empty(),
        "{model}: {spent:?} of CPU in 1 s of draining, threads {spinning:?} never slept: \
         spinning"
    );
    let (got, error) = conn.read_to_end_lossy();
    assert!(
        error.is_none() && got == input[..received],
        "{} bytes back of {received}",
        got.len()
    );
    let mut server = server;
    let status = server.wait_exit(PATIENCE).expect("exits after draining");
    assert!(status.success(), "exit {status}; {}", server.stderr());
}

/// While it drains, the server refuses new clients: its listeners are closed when the drain
/// begins, so a connect fails at once instead of completing a handshake in the kernel's
/// queue and waiting, unanswered, until the server exits.
pub fn drain_refuses_new_clients(model: &str) {
    // A long drain timeout: the slow reader takes its 3 MB only after the connects, and a
    // loaded machine (busy-poll spinning beside the tests) must not cut it first.
    let args = [
        "--tcp",
        "127.0.0.1:0",
        "--drain-timeout",
        "20",
        "--max-buffer",
        "4M",
    ];
    let server = Server::start(model, &args);
    // A slow reader owed more than the kernel's buffers take holds the drain open; the
    // signal comes only once the server has read all of it, since what is unread then is
    // never answered (reading stops at the signal).
    let mut conn = server.connect_slow_reader();
    let input = pattern(3_000_000, 9);
    conn.write_all(&input).unwrap();
    let received = wait_until_the_server_read_all_it_will(&conn, model, input.len());
    server.terminate();
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut accepted = 0;
    let refused = loop {
        match Conn::connect(&server.addrs[0]) {
            Err(e) => break Some(e),
            Ok(_) if Instant::now() >= deadline => break None,
            Ok(_) => {
                accepted += 1;
                thread::sleep(Duration::from_millis(50));
            }
        }
    };
    // A connect racing the listener's close may see its handshake reset instead of
    // refused: either way the kernel turned it away rather than queueing it.
    let kind = refused.as_ref().map(io::Error::kind);
    assert!(
        matches!(
            kind,
            Some(io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset)
        ),
        "{model}: {accepted} connects still completed during 3 s of the drain ({kind:?})"
    );
    let (got, error) = conn.read_to_end_lossy();
    assert!(
        error.is_none() && got == input[..received],
        "{} bytes back of {received}",
        got.len()
    );
    let mut server = server;
    let status = server.wait_exit(PATIENCE).expect("exits after draining");
    assert!(status.success(), "exit {status}; {}", server.stderr());
}

/// Whether `model` serves a connection as a task that does not read while the kernel
/// refuses the replies it owes (`server::task::converse`: backpressure before
/// `--max-buffer`); the others read on until `--max-buffer` bytes are owed.
fn reads_only_when_nothing_is_owed(model: &str) -> bool {
    matches!(model, "async" | "tokio")
}

/// Waits until `model`'s server has read what it will of the `sent` bytes `conn` wrote,
/// and returns how many it read, so that it owes replies to exactly those: every byte
/// (within `--max-buffer`) for a model that reads while it owes, checked over TCP until
/// neither the client's unacknowledged queue nor the server's unread one holds any (a
/// fixed sleep was too short on a loaded machine); for a task model, whatever it read
/// before the kernel refused its replies, once replies have come back and the queues stay
/// still for half a second.
/// Over Unix, where no such queue is listed: half a second, and everything.
fn wait_until_the_server_read_all_it_will(conn: &Conn, model: &str, sent: usize) -> usize {
    let Conn::Tcp(stream) = conn else {
        thread::sleep(Duration::from_millis(500));
        return sent;
    };
    let (client, server) = (stream.local_addr().unwrap(), stream.peer_addr().unwrap());
    let deadline = Instant::now() + PATIENCE;
    let mut still_since: Option<(TcpQueues, Instant)> = None;
    let mut last: Option<TcpQueues> = None;
    let unread = |queues: TcpQueues| queues.client_unacked + queues.server_unread;
    while Instant::now() < deadline {
        let queues = TcpQueues::read(client, server);
        if let Some(queues) = queues {
            // The kernel lists the two ends at slightly different moments: bytes that reach
            // the server after its line is listed, and are acknowledged before the client's
            // is, are in neither queue. Two empty looks in a row rule that out: the first
            // saw every byte acknowledged, so the second saw the server's queue after all
            // of them had reached it.
            if unread(queues) == 0 && last.is_some_and(|last| unread(last) == 0) {
                return sent;
            }
            // Only queues that all stay as they were count as still: bytes in flight sit
            // in both ends' queues, and the sum alone can stay equal while they move. And
            // only once a reply came back: a connection still in the kernel's backlog (a
            // returned `connect` is not an accepted connection) has still queues too, and
            // would be reset at the signal, never drained.
            if reads_only_when_nothing_is_owed(model) && queues.client_unread > 0 {
                match still_since {
                    Some((before, since)) if before == queues => {
                        if since.elapsed() >= Duration::from_millis(500) {
                            return sent - usize::try_from(unread(queues)).unwrap();
                        }
                    }
                    _ => still_since = Some((queues, Instant::now())),
                }
            }
        }
        last = queues;
        thread::sleep(Duration::from_millis(20));
    }
    panic!("{model}: the server did not read what it was sent within {PATIENCE:?}: {last:?}");
}

/// [`drain_what_is_owed`] with `bytes` owed and `extra` flags for `serve`.
fn drain_bytes_owed(model: &str, seed: u64, late: &[u8], bytes: usize, extra: &[&str]) {
    let mut args = vec!["--tcp", "127.0.0.1:0", "--drain-timeout", "5"];
    args.extend_from_slice(extra);
    let server = Server::start(model, &args);
    let mut conn = server.connect_slow_reader();
    // Less than --max-buffer, so the server reads it all and owes it all (a task model:
    // all it reads before the kernel refuses its replies).
    let input = pattern(bytes, seed);
    conn.write_all(&input).unwrap();
    let received = wait_until_the_server_read_all_it_will(&conn, model, input.len());
    server.terminate();
    thread::sleep(Duration::from_millis(200));
    conn.write_all(late).unwrap();
    let (got, error) = conn.read_to_end_lossy();
    let (got_len, owed) = (got.len(), received);
    assert!(error.is_none(), "{error:?} after {got_len} of {owed} bytes");
    assert!(
        got == input[..received],
        "{got_len} of {owed} owed bytes arrived"
    );
    drop(conn);
    let mut server = server;
    let status = server.wait_exit(PATIENCE).expect("exits after draining");
    assert!(status.success(), "exit {status}; {}", server.stderr());
}

/// SIGTERM with an idle connection that is owed nothing: it is closed at once, not held
/// for the whole --drain-timeout (tokio once waited until the runtime was dropped).
pub fn shutdown_closes_idle_at_once(model: &str) {
    let server = Server::start(model, &["--tcp", "127.0.0.1:0", "--drain-timeout", "5"]);
    let mut conn = server.connect_conn();
    conn.write_all(b"x").unwrap();
    assert_eq!(conn.read_exactly(1), b"x");
    let start = Instant::now();
    server.terminate();
    assert!(
        conn.sees_close_within(Duration::from_secs(2)),
        "an idle connection stays open after SIGTERM"
    );
    let mut server = server;
    let status = server.wait_exit(Duration::from_secs(3)).expect("exits");
    assert!(status.success(), "exit {status}; {}", server.stderr());
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "took {took:?} with nothing owed and a 5 s drain"
    );
}

/// `--idle-timeout` counts during the drain as well: a peer that stops reading its replies
/// and sends nothing is closed as idle, long before a long `--drain-timeout` ends.
pub fn idle_timeout_counts_during_the_drain(model: &str) {
    let args = [
        "--tcp",
        "127.0.0.1:0",
        "--idle-timeout",
        "1",
        "--drain-timeout",
        "20",
        "--max-buffer",
        "4M",
    ];
    let server = Server::start(model, &args);
    let mut conn = server.connect_slow_reader();
    // More than the kernel's buffers take: the server owes most of it, and the peer
    // takes none of it.
    conn.write_all(&pattern(3_000_000, 10)).unwrap();
    wait_until_the_server_read_all_it_will(&conn, model, 3_000_000);
    let start = Instant::now();
    server.terminate();
    let mut server = server;
    let status = server
        .wait_exit(PATIENCE)
        .expect("exits long before the drain timeout");
    assert!(status.success(), "exit {status}; {}", server.stderr());
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(6),
        "{model}: exited {took:?} after SIGTERM with --idle-timeout 1 and a peer taking nothing"
    );
    drop(conn);
}

/// SIGTERM with a client that never reads: the server gives up after --drain-timeout.
pub fn drain_timeout_bounds_shutdown(model: &str) {
    let server = Server::start(model, &["--tcp", "127.0.0.1:0", "--drain-timeout", "1"]);
    let mut conn = server.connect_conn();
    // Settled by an echo: a returned `connect` is not an accepted connection (its final ACK
    // may wait in a busy CPU's backlog), and one still in the kernel's backlog at SIGTERM
    // is never drained, so the bound would go untested.
    conn.write_all(b"x").unwrap();
    assert_eq!(conn.read_exactly(1), b"x");
    let writer = conn.try_clone();
    writer.set_timeouts(Duration::from_secs(5));
    // Stops when the server goes away or a write times out.
    let flood = FloodWriter::start(writer, 7);
    thread::sleep(Duration::from_millis(700));
    let start = Instant::now();
    server.terminate();
    let mut server = server;
    let status = server.wait_exit(Duration::from_secs(5)).expect("exits");
    assert!(status.success(), "exit {status}; {}", server.stderr());
    let took = start.elapsed();
    assert!(
        took < Duration::from_millis(3500),
        "took {took:?} with a 1 s drain"
    );
    let _ = conn.read_to_end_lossy();
    flood.join();
}

impl Server {
    /// Connects to the first listener (TCP, or Unix under a Unix [`Variant`]).
    pub fn connect_conn(&self) -> Conn {
        Conn::connect(&self.addrs[0]).expect("connect")
    }

    /// Connects with a 4 KiB receive buffer, so the server meets short writes and a full
    /// socket long before its own bound.
    pub fn connect_slow_reader(&self) -> Conn {
        if let Some(path) = self.addrs[0].strip_prefix("unix://") {
            let socket =
                socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).unwrap();
            socket.set_recv_buffer_size(4096).unwrap();
            socket
                .connect(&socket2::SockAddr::unix(path).unwrap())
                .unwrap();
            let conn = Conn::Unix(socket.into());
            conn.set_timeouts(PATIENCE);
            return conn;
        }
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let addr: std::net::SocketAddr = self.addr("tcp").parse().unwrap();
        socket.connect(&addr.into()).unwrap();
        let conn = Conn::Tcp(socket.into());
        conn.set_timeouts(PATIENCE);
        conn
    }
}

/// Out of descriptors: accept fails with EMFILE; the server logs, pauses accepting, does
/// not spin, keeps serving, and accepts the waiting clients once descriptors free up.
pub fn out_of_descriptors_pauses(model: &str) {
    let server = Server::start_with_fd_limit(model, &["--tcp", "127.0.0.1:0"], 48);
    let addr = server.addrs[0].clone();
    // More clients than descriptors: the kernel completes their handshakes in the backlog.
    let mut conns: Vec<Conn> = (0..60).map(|_| Conn::connect(&addr).unwrap()).collect();
    // A serial model holds one connection at a time; a forking parent hands each one to a
    // child and closes its own copy: neither runs out.
    if !is_serial(model) && model != "forking" {
        server.wait_for_log("pausing accepts");
    }
    // Every pause is counted, but told of at most once a second by each loop (one per core
    // in the multi-loop models, one per accepting thread in the others), so a full
    // descriptor table cannot flood the log.
    if !is_serial(model) && model != "forking" {
        let pause_lines = || -> Vec<String> {
            let stderr = server.stderr();
            let lines = stderr.lines().filter(|l| l.contains("pausing accepts"));
            lines.map(str::to_string).collect()
        };
        let (cpu_before, lines_before) = (server.cpu_time(), pause_lines().len());
        thread::sleep(Duration::from_secs(2));
        let spent = server.cpu_time() - cpu_before;
        let lines = pause_lines().split_off(lines_before);
        let loops = thread::available_parallelism().map_or(1, |n| n.get());
        assert!(
            lines.len() <= 3 * loops,
            "{} accept-pause lines in 2 s from {loops} loops: more than one a second each",
            lines.len()
        );
        // busy-poll spins by design, so only the others are held to "no spinning".
        if model != "busy-poll" {
            assert!(
                spent < Duration::from_millis(200),
                "{spent:?} of CPU in 2 s: spinning"
            );
            // A loop that kept watching the listener during a pause would fail accept over
            // and over; on a loaded machine its CPU time alone may not show it. Each line
            // tells how many pauses it stands for; one pause of ACCEPT_PAUSE (100 ms) after
            // another is about ten a second per loop, and these lines cover at most 3 s.
            let pauses: u64 = lines.iter().map(|line| pauses_told(line)).sum();
            assert!(
                pauses <= 60 * loops as u64,
                "{pauses} accept pauses in about 3 s from {loops} loops: spinning"
            );
        }
    }
    // Everyone is served eventually, as descriptors free up. Clients talk at once: with a
    // queue per loop (SO_REUSEPORT), accept order need not follow connect order.
    let clients: Vec<_> = conns
        .drain(..)
        .enumerate()
        .map(|(n, mut conn)| {
            thread::spawn(move || {
                conn.write_all(b"x").unwrap();
                conn.shutdown_write();
                let (got, error) = conn.read_to_end_lossy();
                assert!(
                    error.is_none() && got == b"x",
                    "client {n}: {got:?} {error:?}"
                );
            })
        })
        .collect();
    for client in clients {
        client.join().expect("every client is served");
    }
    drop(conns);
    let got = round_trip(Conn::connect(&addr).unwrap(), b"after".to_vec());
    assert_eq!(got, b"after");
    server.stop();
}

/// How many accept pauses an accept-pause line stands for: `pausing accepts for 100 ms
/// (N pauses since the last such line, ...)`.
fn pauses_told(line: &str) -> u64 {
    let count = line
        .split_once(" ms (")
        .and_then(|(_, rest)| rest.split(' ').next());
    count
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count of pauses in {line:?}"))
}

/// A Unix-datagram peer that never reads does not delay the replies to anyone else: a
/// reply that cannot be queued at once is dropped (and counted), and the log says so at
/// most once a second however many are dropped.
pub fn datagram_full_peer_does_not_stall(model: &str) {
    let path = temp_socket_path(model);
    let path_arg = path.to_str().unwrap().to_string();
    let server = Server::start(model, &["--threads", "1", "--unix-dgram", &path_arg]);
    // The kernel queues at most net.unix.max_dgram_qlen (10 by default) datagrams for a
    // Unix socket that does not read; the replies past that find the queue full.
    let silent_path = temp_socket_path("silent");
    let silent = UnixDatagram::bind(&silent_path).unwrap();
    silent
        .set_write_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    for n in 0..30u8 {
        silent
            .send_to(&[n; 100], &path)
            .expect("the server stopped reading while its replies could not be queued");
        thread::sleep(Duration::from_millis(20));
    }
    let other_path = temp_socket_path("other");
    let other = UnixDatagram::bind(&other_path).unwrap();
    other
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    other
        .set_write_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    other
        .send_to(b"still here", &path)
        .expect("the server reads");
    let mut buf = [0u8; 64];
    let n = other
        .recv(&mut buf)
        .expect("a peer that never reads stalled the reply to another peer");
    assert_eq!(&buf[..n], b"still here");
    server.wait_for_log("dropped");
    let silent_name = silent_path.display().to_string();
    let lines = server.stderr();
    let about_silent = lines.lines().filter(|l| l.contains(&silent_name)).count();
    // forking answers each datagram in a new child, which starts counting afresh.
    let most = if model == "forking" { 30 } else { 2 };
    assert!(
        (1..=most).contains(&about_silent),
        "{about_silent} log lines about the peer that never reads (at most one a second):\n{lines}"
    );
    drop(silent);
    let _ = std::fs::remove_file(&silent_path);
    let _ = std::fs::remove_file(&other_path);
    server.stop();
}

/// Unix datagrams above the default socket buffer (212,992 bytes here) come back whole:
/// the server sizes its buffers for every datagram a client can send it. The client
/// raises its own send buffer to send them; sizes it cannot send are not tried.
pub fn datagram_big_unix(model: &str) {
    let path = temp_socket_path(model);
    let path_arg = path.to_str().unwrap().to_string();
    let server = Server::start(model, &["--unix-dgram", &path_arg]);
    let own = temp_socket_path("big-client");
    let unix = UnixDatagram::bind(&own).unwrap();
    let client = socket2::SockRef::from(&unix);
    client.set_send_buffer_size(4 * 1024 * 1024).unwrap();
    // The kernel refuses a datagram longer than the sender's buffer less 32 bytes.
    let can_send = client.send_buffer_size().unwrap() - 32;
    unix.set_read_timeout(Some(PATIENCE)).unwrap();
    unix.set_write_timeout(Some(PATIENCE)).unwrap();
    unix.connect(&path).unwrap();
    let mut buf = vec![0u8; 2 * 1024 * 1024];
    for size in [212_961usize, 300_000, 1_000_000] {
        if size > can_send {
            skip(&format!(
                "{model}: a {size}-byte datagram (this client can send {can_send} bytes)"
            ));
            continue;
        }
        let datagram = pattern(size, size as u64);
        unix.send(&datagram)
            .unwrap_or_else(|e| panic!("send {size} bytes: {e}"));
        let n = unix
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("{model}: no reply to {size} bytes ({e})"));
        assert_eq!(n, size, "{model}: the reply to {size} bytes is whole");
        assert!(buf[..n] == datagram[..], "{model}: {size} bytes byte-exact");
    }
    let _ = std::fs::remove_file(&own);
    server.stop();
    assert!(!exists(&path));
}

/// A datagram longer than the server's maximum (UDP: 65,507 bytes; over IPv6 a payload of
/// up to 65,527 bytes can be sent) is read truncated: it is dropped, not echoed short,
/// logged, and counted as `too_large`; the next datagram is answered.
pub fn datagram_too_large_dropped(model: &str) {
    let Ok(udp) = UdpSocket::bind("[::1]:0") else {
        skip(&format!(
            "{model}: no IPv6 loopback to send a 65,508-byte UDP payload"
        ));
        return;
    };
    let server = Server::start(model, &["--udp", "[::1]:0", "--metrics", "127.0.0.1:0"]);
    udp.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    udp.connect(server.addr("udp")).unwrap();
    let mut buf = vec![0u8; 128 * 1024];
    udp.send(&pattern(65_508, 1))
        .expect("send 65,508 bytes over IPv6");
    assert!(
        udp.recv(&mut buf).is_err(),
        "{model}: a truncated datagram was answered"
    );
    udp.set_read_timeout(Some(PATIENCE)).unwrap();
    let whole = pattern(65_507, 2);
    udp.send(&whole).unwrap();
    let n = udp.recv(&mut buf).expect("the next datagram is answered");
    assert!(
        n == whole.len() && buf[..n] == whole[..],
        "{model}: whole reply"
    );
    server.wait_for_log("65508");
    let dropped = scrape_value(
        &server,
        "reverb_datagrams_dropped_total",
        &[("transport", "udp"), ("reason", "too_large")],
    );
    assert_eq!(dropped, Some(1), "{model}: counted as too_large");
    server.stop();
}
/// After the server closed first and `conn` has read its EOF: the server still reads and
/// discards what the peer sends (a lingering close), so more bytes from the peer meet no
/// reset, and the EOF stays readable. A server that closed outright would answer these
/// bytes with a reset.
pub fn assert_lingers(conn: &mut Conn, what: &str) {
    for _ in 0..3 {
        conn.write_all(&[b'z'; 16 * 1024])
            .unwrap_or_else(|e| panic!("{what}: the server stopped lingering at once: {e}"));
        thread::sleep(Duration::from_millis(100));
        let mut buf = [0u8; 16];
        match conn.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => panic!("{what}: {n} more bytes after EOF"),
            Err(e) => panic!("{what}: {e} after the server's EOF: it closed without lingering"),
        }
    }
}

/// Closing first (`until-quit` after `quit`): everything owed arrives, then EOF, even
/// though the client sent a byte after `quit\n` and reads only 0.2 s later; then the
/// server lingers instead of resetting.
pub fn quit_lingers(model: &str) {
    let server = Server::start(model, &["--tcp", "127.0.0.1:0", "--protocol", "until-quit"]);
    let mut conn = server.connect_conn();
    let mut input = pattern(300_000, 13);
    // The pattern never spells the quit line: its bytes are not newlines.
    input
        .iter_mut()
        .filter(|b| **b == b'\n')
        .for_each(|b| *b = b'.');
    input.extend_from_slice(b"quit\n");
    let expected = input.clone();
    input.push(b'!');
    let mut writer = conn.try_clone();
    let sender = thread::spawn(move || writer.write_all(&input));
    thread::sleep(Duration::from_millis(200));
    let (got, error) = conn.read_to_end_lossy();
    assert!(
        error.is_none(),
        "{error:?} after {} of {} bytes",
        got.len(),
        expected.len()
    );
    assert!(
        got == expected,
        "{} bytes back, not the {} before and with quit",
        got.len(),
        expected.len()
    );
    sender.join().unwrap().expect("send");
    assert_lingers(&mut conn, "after quit");
    drop(conn);
    server.stop();
}

/// Connects to an `until-quit` server, sends `quit`, reads the echo and EOF, and keeps the
/// socket open without a byte more: the server owes it a lingering close (2 s of silence).
fn quit_and_stay(server: &Server) -> Conn {
    let mut conn = server.connect_conn();
    conn.write_all(b"quit\n").expect("send quit");
    let (got, error) = conn.read_to_end_lossy();
    assert!(error.is_none(), "{error:?} after {got:?}");
    assert_eq!(got, b"quit\n");
    conn
}

/// `--max-conns 2` counts lingering connections: two clients that quit and then stay
/// silent are still owed a lingering close (2 s without a byte), so they hold their
/// places and a third client is refused; once their lingering ends, a client is served.
/// A serial model lingers on its one thread, so there a second client waits instead.
pub fn lingering_holds_its_place(model: &str) {
    let server = Server::start(
        model,
        &[
            "--tcp",
            "127.0.0.1:0",
            "--protocol",
            "until-quit",
            "--max-conns",
            "2",
        ],
    );
    let started = Instant::now();
    let lingering: Vec<Conn> = (0..if is_serial(model) { 1 } else { 2 })
        .map(|_| quit_and_stay(&server))
        .collect();
    let try_one = || {
        let mut conn = server.connect_conn();
        let _ = conn.write_all(b"again\nquit\n");
        conn.read_to_end_lossy().0
    };
    if !is_serial(model) {
        let got = try_one();
        // Past the lingering timeout the places are free again: nothing left to check.
        if started.elapsed() < Duration::from_millis(1500) {
            assert!(
                got.is_empty(),
                "a third client was served while two peers lingered: {got:?}"
            );
            server.wait_for_log("max-conns");
        }
    }
    let deadline = Instant::now() + PATIENCE;
    while try_one() != b"again\nquit\n" {
        assert!(
            Instant::now() < deadline,
            "no place freed after the lingering ended"
        );
        thread::sleep(Duration::from_millis(100));
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1500),
        "served after {waited:?}, before the lingering peers were cut"
    );
    drop(lingering);
    server.stop();
}

/// `ok\nboom\n` in one write: `ok` is answered before the panic closes the connection,
/// with a lingering close; the panic is logged once, with the peer.
pub fn panic_replies_first(model: &str) {
    let server = Server::start(
        model,
        &[
            "--tcp",
            "127.0.0.1:0",
            "--protocol",
            "lines",
            "--prefix",
            "You Got ",
            "--panic-on",
            "boom",
        ],
    );
    let mut conn = server.connect_conn();
    let victim = match &conn {
        Conn::Tcp(s) => s.local_addr().unwrap().to_string(),
        Conn::Unix(_) => "unix:".to_string(),
    };
    conn.write_all(b"ok\nboom\nnever\n").unwrap();
    let (got, error) = conn.read_to_end_lossy();
    assert!(error.is_none(), "{error:?} after {got:?}");
    assert_eq!(String::from_utf8_lossy(&got), "You Got ok\n");
    assert_lingers(&mut conn, "after the panic");
    drop(conn);
    server.wait_for_log("panicked");
    let log = server.stderr();
    let panics: Vec<&str> = log.lines().filter(|l| l.contains("panicked")).collect();
    assert_eq!(panics.len(), 1, "the panic is logged once:\n{log}");
    assert!(panics[0].contains(&victim), "{victim} not in {}", panics[0]);
    server.stop();
}

/// `--idle-timeout 1`: the idle connection is closed with a lingering close; then a peer
/// that keeps sending (and never closes) is cut at the lingering bound, not held for ever.
pub fn idle_close_lingers(model: &str) {
    let server = Server::start(model, &["--tcp", "127.0.0.1:0", "--idle-timeout", "1"]);
    let mut conn = server.connect_conn();
    assert!(
        conn.sees_close_within(Duration::from_secs(4)),
        "idle connection closed"
    );
    let closed_at = Instant::now();
    assert_lingers(&mut conn, "after the idle timeout");
    conn.set_timeouts(Duration::from_millis(200));
    // The documented bound is 5 s in all; allow for a loaded machine.
    let cut = loop {
        let waited = closed_at.elapsed();
        assert!(
            waited < Duration::from_secs(12),
            "a peer that never closes still holds its connection after {waited:?}"
        );
        let mut buf = [0u8; 16];
        let wrote = conn.write_all(b"still here");
        let read = conn.read(&mut buf);
        if wrote.is_err() || read.is_err() {
            break waited;
        }
        thread::sleep(Duration::from_millis(200));
    };
    assert!(
        cut >= Duration::from_millis(1500),
        "cut after {cut:?}: the lingering close gave up too early"
    );
    drop(conn);
    server.stop();
}

/// SIGTERM while replies are owed and the client keeps sending: every owed reply still
/// arrives, then EOF, never a reset (the drain closes with a lingering close).
pub fn drain_lingers(model: &str) {
    drain_what_is_owed(model, 21, &[b'u'; 10_000]);
}

/// `pool --threads 2`: two clients that got their reply and EOF after `quit` but keep their
/// sockets open (each lingering close waits up to 2 s for them) hold no worker: a third
/// client is answered well within that bound.
pub fn lingering_peers_hold_no_worker(model: &str) {
    let server = Server::start(
        model,
        &[
            "--tcp",
            "127.0.0.1:0",
            "--protocol",
            "until-quit",
            "--threads",
            "2",
        ],
    );
    let lingering: Vec<Conn> = (0..2).map(|_| quit_and_stay(&server)).collect();
    let started = Instant::now();
    let mut third = server.connect_conn();
    // until-quit answers once `quit\n` arrives.
    third.write_all(b"hello\nquit\n").expect("send");
    assert_eq!(third.read_exactly(11), b"hello\nquit\n");
    let waited = started.elapsed();
    // Lingering workers would keep it waiting for the 2 s lingering timeout.
    assert!(
        waited < Duration::from_secs(1),
        "the third client waited {waited:?}: lingering peers hold the workers"
    );
    drop(lingering);
    drop(third);
    server.stop();
}
