//! What `uring` alone does: an echo leaves straight from the provided buffer the kernel
//! received it into (zero-copy), and the kernel may take only part of such a send.

mod common;

use common::{Conn, PATIENCE, Server, TcpQueues, pattern};
use std::io::Write;
use std::net::SocketAddr;
use std::thread;
use std::time::Duration;

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
