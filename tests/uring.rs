//! What `uring` alone does: an echo leaves straight from the provided buffer the kernel
//! received it into (zero-copy), and the kernel may take only part of such a send.

mod common;

use common::{Conn, PATIENCE, Server, TcpQueues, pattern};
use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

/// A peer that reads nothing until the end, with a 4 KiB receive buffer and 536-byte
/// segments, so the server's fresh socket holds only about 96 KB, sends 60,000 bytes three
/// times, a pause after each. Each time the server receives them into two provided buffers
/// in one batch: the first leaves zero-copy, the second is copied and owed behind it. Once
/// the socket is nearly full the kernel takes only part of the zero-copy send (a short
/// send), and its rest must go out next, ahead of the bytes owed behind it: every byte
/// comes back, in order. A new connection each round, so the socket is small again.
#[test]
fn short_sends_from_a_provided_buffer_lose_nothing() {
    let server = Server::start("uring", &["--threads", "1", "--tcp", "127.0.0.1:0"]);
    let addr: SocketAddr = server.addr("tcp").parse().unwrap();
    for round in 0..8 {
        let (mut conn, local) = connect_small(addr);
        let messages: Vec<u8> = (0..6)
            .flat_map(|n| pattern(30_000, round * 8 + n))
            .collect();
        for message in messages.chunks(60_000) {
            conn.write_all(message).expect("send");
            // Time to echo them, so the next ones find nothing owed: the zero-copy path.
            thread::sleep(Duration::from_millis(5));
        }
        thread::sleep(Duration::from_millis(20));
        let queues = TcpQueues::read(local, addr).expect("the connection's queues");
        let written = queues.server_unacked + queues.client_unread;
        assert!(
            written < messages.len() as u64,
            "the server's socket took all {written} bytes: no send met a full socket here"
        );
        let got = conn.read_exactly(messages.len());
        let first_wrong = (got.iter().zip(&messages)).position(|(a, b)| a != b);
        assert!(
            first_wrong.is_none(),
            "round {round}: byte {first_wrong:?} of the echoes differs"
        );
    }
    server.stop();
}

/// A TCP connection to `addr` with a 4 KiB receive buffer and 536-byte segments, which keep
/// the server's send buffer small; and its local address.
fn connect_small(addr: SocketAddr) -> (Conn, SocketAddr) {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    socket.set_tcp_mss(536).expect("TCP_MAXSEG");
    socket.connect(&addr.into()).expect("connect");
    let local = socket.local_addr().unwrap().as_socket().unwrap();
    let conn = Conn::Tcp(socket.into());
    conn.set_timeouts(PATIENCE);
    (conn, local)
}

/// Peers that send without reading hold at most `--max-buffer` each of the server's memory:
/// what a send in flight holds counts against the bound together with what the connection
/// still owes. (A send that copied the owed bytes while the connection kept them held both:
/// about twice the bound per peer: 73 MiB here.) 300 such peers at 128 KiB each may cost
/// 37.5 MiB; the server may grow by that, two fifths more for the allocator (freed chunks
/// between live ones: 52-54 MiB in all was measured), and its 8 MiB of provided buffers,
/// but not by twice the bound.
#[test]
fn unread_peers_hold_at_most_max_buffer_each() {
    const PEERS: usize = 300;
    const MAX_BUFFER_KIB: u64 = 128;
    let args = [
        "--threads",
        "1",
        "--tcp",
        "127.0.0.1:0",
        "--max-buffer",
        "128K",
    ];
    let server = Server::start("uring", &args);
    let addr: SocketAddr = server.addr("tcp").parse().unwrap();
    let before = server.rss_kib();
    let peers: Vec<TcpStream> = (0..PEERS)
        .map(|_| {
            let (conn, _) = connect_small(addr);
            let Conn::Tcp(stream) = conn else {
                unreachable!("connect_small connects over TCP")
            };
            stream.set_nonblocking(true).expect("O_NONBLOCK");
            stream
        })
        .collect();
    // Write to every peer until no write has been taken for a second: the server stopped
    // reading each of them (its bound reached) and the kernel's queues are full.
    let chunk = vec![b'u'; 64 * 1024];
    let (start, mut last_taken) = (Instant::now(), Instant::now());
    while last_taken.elapsed() < Duration::from_secs(1) {
        assert!(
            start.elapsed() < 4 * PATIENCE,
            "the server kept reading peers that read nothing"
        );
        for mut peer in &peers {
            match peer.write(&chunk) {
                Ok(n) if n > 0 => last_taken = Instant::now(),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("a peer's write failed: {e}"),
            }
        }
        thread::sleep(Duration::from_millis(10));
    }
    let grown = server.rss_kib().saturating_sub(before);
    let bound = PEERS as u64 * MAX_BUFFER_KIB * 7 / 5 + 8 * 1024;
    eprintln!("uring: {PEERS} unread peers at --max-buffer 128K: RSS grew by {grown} KiB");
    assert!(
        grown <= bound,
        "RSS grew by {grown} KiB for {PEERS} unread peers: more than {bound} KiB, the bound \
         of {MAX_BUFFER_KIB} KiB each with room for the allocator and the provided buffers"
    );
    drop(peers);
    server.stop();
}
