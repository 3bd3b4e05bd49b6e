//! `reverb client ADDR`: talk to a server by hand, or pipe data through it.
//!
//! With a terminal on stdin it prompts `> `, sends each line and prints the reply; `exit`
//! quits. With a pipe it behaves like `nc`: stdin streams to the server, replies stream to
//! stdout, and after stdin's EOF it half-closes and keeps printing until the server closes,
//! so `printf data | reverb client ...` always gets everything back. On datagram addresses
//! each input line is one datagram and its reply is awaited.

use crate::addr::Endpoint;
use std::fs;
use std::io::{self, BufRead, IsTerminal, Read, Write};
use std::net::{Shutdown, TcpStream, UdpSocket};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::PathBuf;
use std::thread;
use std::time::Duration;

/// How long a datagram's reply is awaited.
pub const DATAGRAM_REPLY_TIMEOUT: Duration = Duration::from_secs(2);
/// In interactive stream mode, how long the first bytes of a reply are awaited.
const FIRST_REPLY_TIMEOUT: Duration = Duration::from_secs(2);
/// In interactive stream mode, a pause this long ends a reply.
const REPLY_QUIET: Duration = Duration::from_millis(100);
/// The largest datagram: the UDP payload limit.
const MAX_DATAGRAM_BYTES: usize = 65_507;

/// Why the client failed; each message names the address.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting failed.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The address.
        addr: String,
        /// The OS error.
        source: io::Error,
    },
    /// The connection failed after it was made.
    #[error("connection to {addr} failed: {source}")]
    Io {
        /// The address.
        addr: String,
        /// The OS error.
        source: io::Error,
    },
    /// Writing to our own stdout failed (say, `| head` stopped reading): not the server's fault.
    #[error("cannot write to stdout: {source}")]
    Stdout {
        /// The OS error.
        source: io::Error,
    },
    /// Some datagrams got no reply in time.
    #[error("{missing} datagram(s) to {addr} got no reply within {} s", DATAGRAM_REPLY_TIMEOUT.as_secs())]
    NoReply {
        /// The address.
        addr: String,
        /// How many.
        missing: usize,
    },
}

/// Connects to `endpoint` and runs interactively or piped, depending on stdin.
///
/// # Errors
///
/// [`ClientError`] when it cannot connect, the connection breaks, or datagrams got no reply.
pub fn run(endpoint: &Endpoint) -> Result<(), ClientError> {
    let addr = endpoint.to_string();
    let connect_error = |source| ClientError::Connect {
        addr: addr.clone(),
        source,
    };
    let io_error = |source: io::Error| match into_stdout_error(source) {
        Ok(source) => ClientError::Stdout { source },
        Err(source) => ClientError::Io {
            addr: addr.clone(),
            source,
        },
    };
    let interactive = io::stdin().is_terminal();
    match endpoint {
        Endpoint::Tcp(target) => {
            let stream = TcpStream::connect(target).map_err(connect_error)?;
            let _ = stream.set_nodelay(true);
            run_stream(StreamConn::Tcp(stream), interactive).map_err(io_error)
        }
        Endpoint::Tls {
            addr: target,
            server_name,
            verify,
        } => {
            let stream = TcpStream::connect(target).map_err(connect_error)?;
            let _ = stream.set_nodelay(true);
            let plain =
                crate::tls_client::connect(stream, server_name, verify).map_err(connect_error)?;
            run_stream(StreamConn::Unix(plain), interactive).map_err(io_error)
        }
        Endpoint::Unix(path) => {
            let stream = UnixStream::connect(path).map_err(connect_error)?;
            run_stream(StreamConn::Unix(stream), interactive).map_err(io_error)
        }
        Endpoint::Udp(target) => {
            let local = if target.is_ipv6() {
                "[::]:0"
            } else {
                "0.0.0.0:0"
            };
            let socket = UdpSocket::bind(local).map_err(connect_error)?;
            socket.connect(target).map_err(connect_error)?;
            let missing = run_datagrams(&DatagramConn::Udp(socket), interactive, &addr)?;
            no_reply_check(&addr, missing)
        }
        Endpoint::UnixDatagram(path) => {
            // A Unix datagram server can only answer a sender that has a name.
            let own = TempSocketPath::new();
            let socket = UnixDatagram::bind(&own.0).map_err(connect_error)?;
            socket.connect(path).map_err(connect_error)?;
            let missing = run_datagrams(&DatagramConn::Unix(socket), interactive, &addr)?;
            no_reply_check(&addr, missing)
        }
    }
}

/// Marks an error of our own stdout as it travels through `io::Result`s.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct StdoutFailed(io::Error);

fn stdout_error(source: io::Error) -> io::Error {
    io::Error::new(source.kind(), StdoutFailed(source))
}

/// The stdout error inside `error`, or `error` itself when it came from elsewhere.
fn into_stdout_error(error: io::Error) -> Result<io::Error, io::Error> {
    if !error
        .get_ref()
        .is_some_and(|inner| inner.is::<StdoutFailed>())
    {
        return Err(error);
    }
    let kind = error.kind();
    match error
        .into_inner()
        .map(|inner| inner.downcast::<StdoutFailed>())
    {
        Some(Ok(marked)) => Ok(marked.0),
        Some(Err(other)) => Err(io::Error::new(kind, other)),
        None => Err(io::Error::from(kind)),
    }
}

fn no_reply_check(addr: &str, missing: usize) -> Result<(), ClientError> {
    if missing == 0 {
        Ok(())
    } else {
        Err(ClientError::NoReply {
            addr: addr.to_string(),
            missing,
        })
    }
}

enum StreamConn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl StreamConn {
    fn try_clone(&self) -> io::Result<StreamConn> {
        Ok(match self {
            StreamConn::Tcp(s) => StreamConn::Tcp(s.try_clone()?),
            StreamConn::Unix(s) => StreamConn::Unix(s.try_clone()?),
        })
    }
    fn shutdown_write(&self) -> io::Result<()> {
        match self {
            StreamConn::Tcp(s) => s.shutdown(Shutdown::Write),
            StreamConn::Unix(s) => s.shutdown(Shutdown::Write),
        }
    }
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            StreamConn::Tcp(s) => s.set_read_timeout(timeout),
            StreamConn::Unix(s) => s.set_read_timeout(timeout),
        }
    }
}

impl Read for StreamConn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            StreamConn::Tcp(s) => s.read(buf),
            StreamConn::Unix(s) => s.read(buf),
        }
    }
}

impl Write for StreamConn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            StreamConn::Tcp(s) => s.write(buf),
            StreamConn::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn run_stream(conn: StreamConn, interactive: bool) -> io::Result<()> {
    if interactive {
        run_stream_interactive(conn)
    } else {
        run_stream_piped(conn)
    }
}

/// `nc`-style: stdin to the server on one thread, the server to stdout on this one.
fn run_stream_piped(mut conn: StreamConn) -> io::Result<()> {
    let mut sender = conn.try_clone()?;
    let uploader = thread::spawn(move || -> io::Result<()> {
        let mut stdin = io::stdin().lock();
        // A server that closes early (until-quit, --max-conns) makes this copy fail; what
        // it sent back is still printed by the other side, so that is not an error.
        if let Err(e) = io::copy(&mut stdin, &mut sender) {
            if !is_peer_gone(&e) {
                return Err(e);
            }
        }
        match sender.shutdown_write() {
            Err(e) if !is_peer_gone(&e) => Err(e),
            _ => Ok(()),
        }
    });
    let mut stdout = io::stdout().lock();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                stdout.write_all(&buf[..n]).map_err(stdout_error)?;
                stdout.flush().map_err(stdout_error)?;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    // The server closed. If stdin is still open (a terminal-less process that never ends
    // its input), the upload thread is left behind; the process exits anyway.
    if uploader.is_finished() {
        match uploader.join() {
            Ok(result) => result?,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
    Ok(())
}

fn is_peer_gone(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::NotConnected
    )
}

/// The seed's interactive client: prompt, send a line, print the reply.
fn run_stream_interactive(mut conn: StreamConn) -> io::Result<()> {
    let mut stdout = io::stdout();
    // A greeting arrives unasked.
    if !print_reply(&mut conn, REPLY_QUIET * 2, &mut stdout)? {
        return Ok(());
    }
    let stdin = io::stdin();
    let mut line = String::new();
    loop {
        stdout.write_all(b"> ").map_err(stdout_error)?;
        stdout.flush().map_err(stdout_error)?;
        line.clear();
        if stdin.lock().read_line(&mut line)? == 0 {
            let _ = conn.shutdown_write();
            print_reply(&mut conn, FIRST_REPLY_TIMEOUT, &mut stdout)?;
            return Ok(());
        }
        if line.trim_end_matches(['\r', '\n']) == "exit" {
            return Ok(());
        }
        conn.write_all(line.as_bytes())?;
        if !print_reply(&mut conn, FIRST_REPLY_TIMEOUT, &mut stdout)? {
            return Ok(());
        }
    }
}

/// Prints what arrives until a quiet pause; returns false when the server closed.
fn print_reply(
    conn: &mut StreamConn,
    first_wait: Duration,
    out: &mut impl Write,
) -> io::Result<bool> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut wait = first_wait;
    loop {
        conn.set_read_timeout(Some(wait))?;
        match conn.read(&mut buf) {
            Ok(0) => return Ok(false),
            Ok(n) => {
                out.write_all(&buf[..n]).map_err(stdout_error)?;
                out.flush().map_err(stdout_error)?;
                wait = REPLY_QUIET;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(true);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

enum DatagramConn {
    Udp(UdpSocket),
    Unix(UnixDatagram),
}

impl DatagramConn {
    fn send(&self, datagram: &[u8]) -> io::Result<usize> {
        match self {
            DatagramConn::Udp(s) => s.send(datagram),
            DatagramConn::Unix(s) => s.send(datagram),
        }
    }
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            DatagramConn::Udp(s) => s.recv(buf),
            DatagramConn::Unix(s) => s.recv(buf),
        }
    }
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            DatagramConn::Udp(s) => s.set_read_timeout(timeout),
            DatagramConn::Unix(s) => s.set_read_timeout(timeout),
        }
    }
}

/// One datagram per input line (with its `\n`); returns how many got no reply.
fn run_datagrams(conn: &DatagramConn, interactive: bool, addr: &str) -> Result<usize, ClientError> {
    let io_error = |source| ClientError::Io {
        addr: addr.to_string(),
        source,
    };
    let stdout_failed = |source| ClientError::Stdout { source };
    conn.set_read_timeout(Some(DATAGRAM_REPLY_TIMEOUT))
        .map_err(io_error)?;
    let mut stdin = io::stdin().lock();
    let mut stdout = io::stdout().lock();
    let mut line = Vec::new();
    let mut reply = vec![0u8; 256 * 1024];
    let mut missing = 0;
    loop {
        if interactive {
            stdout.write_all(b"> ").map_err(stdout_failed)?;
            stdout.flush().map_err(stdout_failed)?;
        }
        line.clear();
        if stdin.read_until(b'\n', &mut line).map_err(io_error)? == 0 {
            return Ok(missing);
        }
        if interactive && line.trim_ascii_end() == b"exit" {
            return Ok(missing);
        }
        if line.len() > MAX_DATAGRAM_BYTES {
            return Err(io_error(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "an input line of {} bytes exceeds the {MAX_DATAGRAM_BYTES}-byte datagram limit",
                    line.len()
                ),
            )));
        }
        conn.send(&line).map_err(io_error)?;
        match conn.recv(&mut reply) {
            Ok(n) => {
                stdout.write_all(&reply[..n]).map_err(stdout_failed)?;
                stdout.flush().map_err(stdout_failed)?;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                eprintln!(
                    "reverb: no reply from {addr} within {} s",
                    DATAGRAM_REPLY_TIMEOUT.as_secs()
                );
                missing += 1;
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                return Err(ClientError::Connect {
                    addr: addr.to_string(),
                    source: e,
                });
            }
            Err(e) => return Err(io_error(e)),
        }
    }
}

/// A socket path for the client's own Unix datagram socket, removed when dropped.
struct TempSocketPath(PathBuf);

impl TempSocketPath {
    fn new() -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "reverb-client-{}-{}.sock",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        TempSocketPath(std::env::temp_dir().join(name))
    }
}

impl Drop for TempSocketPath {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}
