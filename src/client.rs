//! `reverb client ADDR`: talk to a server by hand, or pipe data through it.
//!
//! With a terminal on stdin it prompts `> `, sends each line and prints the reply; `exit`
//! quits. With a pipe it behaves like `nc`: stdin streams to the server, replies stream to
//! stdout, and after stdin's EOF it half-closes and keeps printing until the server closes,
//! so `printf data | reverb client ...` always gets everything back. On datagram addresses
//! each input line is one datagram and its reply is awaited.
//!
//! The interactive client waits on the terminal, the server and Ctrl-C at once (`poll(2)`),
//! so a reply is printed the moment it arrives, even one that comes late, and the prompt
//! never waits on a reply that may not come.

use crate::addr::Endpoint;
use crate::server::Shutdown as Interrupt;
use crate::sys::poll;
use std::fs;
use std::io::{self, IsTerminal, Read, Write};
use std::net::{Shutdown, TcpStream, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

/// How long a datagram's reply is awaited.
pub const DATAGRAM_REPLY_TIMEOUT: Duration = Duration::from_secs(2);
/// In interactive stream mode, after the end of input (Ctrl-D), how long the client waits
/// for the server to send what it owes and close.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// In interactive stream mode, the prompt appears once the server has been quiet this long
/// after the last line sent or the last bytes received, so it does not cut into a reply.
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
    /// Ctrl-C (SIGINT) or SIGTERM ended an interactive or datagram session; its temporary
    /// socket, if any, was removed.
    #[error("interrupted")]
    Interrupted,
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
    // A piped stream client keeps the default Ctrl-C (the process ends at once, like nc);
    // the others watch for it, to restore the terminal line and remove their socket file.
    let interrupt = if interactive || endpoint.is_datagram() {
        let interrupt = Interrupt::new().map_err(connect_error)?;
        interrupt.fire_on_signals().map_err(connect_error)?;
        Some(interrupt)
    } else {
        None
    };
    let ended = |result: io::Result<Ending>| match result {
        Ok(Ending::Done) => Ok(()),
        Ok(Ending::Interrupted) => Err(ClientError::Interrupted),
        Err(e) => Err(io_error(e)),
    };
    match endpoint {
        Endpoint::Tcp(target) => {
            let stream = TcpStream::connect(target).map_err(connect_error)?;
            let _ = stream.set_nodelay(true);
            ended(run_stream(StreamConn::Tcp(stream), interrupt.as_ref()))
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
            ended(run_stream(StreamConn::Unix(plain), interrupt.as_ref()))
        }
        Endpoint::Unix(path) => {
            let stream = UnixStream::connect(path).map_err(connect_error)?;
            ended(run_stream(StreamConn::Unix(stream), interrupt.as_ref()))
        }
        Endpoint::Udp(target) => {
            let local = if target.is_ipv6() {
                "[::]:0"
            } else {
                "0.0.0.0:0"
            };
            let socket = UdpSocket::bind(local).map_err(connect_error)?;
            socket.connect(target).map_err(connect_error)?;
            let interrupt = interrupt.as_ref().expect("datagram clients watch Ctrl-C");
            let missing = run_datagrams(&DatagramConn::Udp(socket), interactive, &addr, interrupt)?;
            no_reply_check(&addr, missing)
        }
        Endpoint::UnixDatagram(path) => {
            // A Unix datagram server can only answer a sender that has a name.
            let own = TempSocketPath::new();
            let socket = UnixDatagram::bind(&own.0).map_err(connect_error)?;
            socket.connect(path).map_err(connect_error)?;
            let interrupt = interrupt.as_ref().expect("datagram clients watch Ctrl-C");
            // `own` is dropped on every way out of here, Ctrl-C included, removing the file.
            let missing =
                run_datagrams(&DatagramConn::Unix(socket), interactive, &addr, interrupt)?;
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
}

impl AsFd for StreamConn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            StreamConn::Tcp(s) => s.as_fd(),
            StreamConn::Unix(s) => s.as_fd(),
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

/// How a session ended.
enum Ending {
    /// Input ended, `exit` was typed, or the server closed.
    Done,
    /// Ctrl-C or SIGTERM.
    Interrupted,
}

fn run_stream(conn: StreamConn, interrupt: Option<&Interrupt>) -> io::Result<Ending> {
    match interrupt {
        Some(interrupt) => run_stream_interactive(conn, interrupt),
        None => run_stream_piped(conn).map(|()| Ending::Done),
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

/// The interactive client: prompt, send each line typed, print replies as they arrive.
fn run_stream_interactive(mut conn: StreamConn, interrupt: &Interrupt) -> io::Result<Ending> {
    let mut screen = Screen::new();
    let mut typed = LineReader::default();
    let mut buf = vec![0u8; 64 * 1024];
    // The last line sent or bytes received: the prompt waits for REPLY_QUIET after it.
    let mut last_activity = Instant::now();
    let mut is_input_open = true;
    loop {
        let quiet_for = last_activity.elapsed();
        let timeout = if !is_input_open {
            if quiet_for >= CLOSE_WAIT {
                return Ok(Ending::Done);
            }
            Some(CLOSE_WAIT - quiet_for)
        } else if screen.is_prompt_shown {
            None
        } else if quiet_for >= REPLY_QUIET {
            screen.prompt()?;
            continue;
        } else {
            Some(REPLY_QUIET - quiet_for)
        };
        let stdin = io::stdin();
        let ready = wait_ready(
            is_input_open.then(|| stdin.as_fd()),
            conn.as_fd(),
            interrupt,
            timeout,
        )?;
        if ready.is_interrupted {
            screen.end_line()?;
            return Ok(Ending::Interrupted);
        }
        if ready.is_connection_readable {
            match conn.read(&mut buf) {
                Ok(0) => {
                    screen.end_line()?;
                    if is_input_open {
                        eprintln!("reverb: the server closed the connection");
                    }
                    return Ok(Ending::Done);
                }
                Ok(n) => {
                    screen.reply(&buf[..n])?;
                    last_activity = Instant::now();
                }
                Err(e) if is_retry(&e) => {}
                Err(e) => return Err(e),
            }
        }
        if ready.is_input_readable {
            match typed.read_from(&mut io::stdin().lock())? {
                None => {
                    // Ctrl-D: half-close, then print what the server still owes.
                    is_input_open = false;
                    screen.end_line()?;
                    let _ = conn.shutdown_write();
                    last_activity = Instant::now();
                }
                Some(lines) => {
                    for line in lines {
                        screen.line_typed();
                        if line.trim_ascii_end() == b"exit" {
                            return Ok(Ending::Done);
                        }
                        conn.write_all(&line)?;
                        last_activity = Instant::now();
                    }
                }
            }
        }
    }
}

fn is_retry(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
    )
}

/// What [`wait_ready`] found.
struct Ready {
    is_input_readable: bool,
    is_connection_readable: bool,
    is_interrupted: bool,
}

/// Sleeps until the terminal (when `input` is given), the connection or Ctrl-C has
/// something, or `timeout` passes.
fn wait_ready(
    input: Option<BorrowedFd<'_>>,
    connection: BorrowedFd<'_>,
    interrupt: &Interrupt,
    timeout: Option<Duration>,
) -> io::Result<Ready> {
    let wanted = poll::POLLIN;
    let mut entries = [
        input.map_or_else(poll::unused_entry, |fd| poll::entry(fd, wanted)),
        poll::entry(connection, wanted),
        poll::entry(interrupt.fd(), wanted),
    ];
    poll::poll(&mut entries, timeout)?;
    // A hang-up or an error is reported as readable: the read that follows says which.
    let is_ready = |entry: &poll::pollfd| entry.revents != 0;
    Ok(Ready {
        is_input_readable: is_ready(&entries[0]),
        is_connection_readable: is_ready(&entries[1]),
        is_interrupted: is_ready(&entries[2]),
    })
}

/// Whole lines from the terminal, read as they are typed; a partial line waits.
#[derive(Default)]
struct LineReader {
    pending: Vec<u8>,
}

impl LineReader {
    /// Reads what is there (after `poll` said so) and returns the complete lines, each
    /// with its `\n`; `None` at the end of input, with any partial line as the last one.
    fn read_from(&mut self, input: &mut impl Read) -> io::Result<Option<Vec<Vec<u8>>>> {
        let mut chunk = [0u8; 4096];
        let n = loop {
            match input.read(&mut chunk) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => break other?,
            }
        };
        if n == 0 {
            return Ok(None);
        }
        self.pending.extend_from_slice(&chunk[..n]);
        let mut lines = Vec::new();
        while let Some(at) = memchr::memchr(b'\n', &self.pending) {
            lines.push(self.pending.drain(..=at).collect());
        }
        // A terminal hands over at most a line at a time, but a paste can be longer; a
        // line past the datagram limit is cut here rather than held without bound.
        if self.pending.len() >= MAX_DATAGRAM_BYTES {
            lines.push(std::mem::take(&mut self.pending));
        }
        Ok(Some(lines))
    }
}

/// The terminal as the interactive client draws on it: replies, and a `> ` prompt that
/// always starts a line of its own.
struct Screen {
    stdout: io::Stdout,
    is_terminal: bool,
    is_prompt_shown: bool,
    is_at_line_start: bool,
}

impl Screen {
    fn new() -> Screen {
        let stdout = io::stdout();
        let is_terminal = stdout.is_terminal();
        Screen {
            stdout,
            is_terminal,
            is_prompt_shown: false,
            is_at_line_start: true,
        }
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        let mut out = self.stdout.lock();
        out.write_all(bytes)
            .and_then(|()| out.flush())
            .map_err(stdout_error)
    }

    /// Shows `> `, on a line of its own (a greeting need not end with a newline).
    fn prompt(&mut self) -> io::Result<()> {
        if !self.is_at_line_start {
            self.write(b"\n")?;
        }
        self.write(b"> ")?;
        self.is_prompt_shown = true;
        self.is_at_line_start = false;
        Ok(())
    }

    /// Enter was pressed: the terminal echoed the newline.
    fn line_typed(&mut self) {
        self.is_prompt_shown = false;
        self.is_at_line_start = true;
    }

    /// Prints bytes from the server. One that arrives while the prompt waits replaces the
    /// prompt, which comes back after it.
    fn reply(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.is_prompt_shown {
            // Carriage return and erase the line, on a terminal; elsewhere a new line.
            let clear: &[u8] = if self.is_terminal { b"\r\x1b[K" } else { b"\n" };
            self.write(clear)?;
            self.is_prompt_shown = false;
        }
        self.write(bytes)?;
        self.is_at_line_start = bytes.ends_with(b"\n");
        Ok(())
    }

    /// Ends the current line before the client exits, so the shell's prompt starts clean.
    fn end_line(&mut self) -> io::Result<()> {
        if self.is_prompt_shown || !self.is_at_line_start {
            self.write(b"\n")?;
        }
        self.is_prompt_shown = false;
        self.is_at_line_start = true;
        Ok(())
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
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            DatagramConn::Udp(s) => s.as_fd(),
            DatagramConn::Unix(s) => s.as_fd(),
        }
    }
}

/// One datagram per input line (with its `\n`); returns how many got no reply.
fn run_datagrams(
    conn: &DatagramConn,
    interactive: bool,
    addr: &str,
    interrupt: &Interrupt,
) -> Result<usize, ClientError> {
    let io_error = |source| ClientError::Io {
        addr: addr.to_string(),
        source,
    };
    let stdout_failed = |source| ClientError::Stdout { source };
    let mut stdout = io::stdout().lock();
    let mut input = LineReader::default();
    let mut lines = std::collections::VecDeque::new();
    let mut is_input_open = true;
    let mut is_prompt_shown = false;
    let mut reply = vec![0u8; 256 * 1024];
    let mut missing = 0;
    let stdin = io::stdin();
    loop {
        let Some(line) = lines.pop_front() else {
            if !is_input_open {
                return Ok(missing);
            }
            if interactive && !is_prompt_shown {
                stdout.write_all(b"> ").map_err(stdout_failed)?;
                stdout.flush().map_err(stdout_failed)?;
                is_prompt_shown = true;
            }
            // Wait for input, or Ctrl-C; the socket is not read until a line was sent.
            let mut entries = [
                poll::entry(stdin.as_fd(), poll::POLLIN),
                poll::entry(interrupt.fd(), poll::POLLIN),
            ];
            poll::poll(&mut entries, None).map_err(io_error)?;
            if entries[1].revents != 0 {
                return Err(ClientError::Interrupted);
            }
            match input.read_from(&mut stdin.lock()).map_err(io_error)? {
                Some(complete) => lines.extend(complete),
                None => {
                    is_input_open = false;
                    lines.extend(
                        (!input.pending.is_empty()).then(|| std::mem::take(&mut input.pending)),
                    );
                }
            }
            continue;
        };
        is_prompt_shown = false;
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
        let deadline = Instant::now() + DATAGRAM_REPLY_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut entries = [
                poll::entry(conn.as_fd(), poll::POLLIN),
                poll::entry(interrupt.fd(), poll::POLLIN),
            ];
            let ready = poll::poll(&mut entries, Some(left)).map_err(io_error)?;
            if entries[1].revents != 0 {
                return Err(ClientError::Interrupted);
            }
            if ready == 0 {
                eprintln!(
                    "reverb: no reply from {addr} within {} s",
                    DATAGRAM_REPLY_TIMEOUT.as_secs()
                );
                missing += 1;
                break;
            }
            match conn.recv(&mut reply) {
                Ok(n) => {
                    stdout.write_all(&reply[..n]).map_err(stdout_failed)?;
                    stdout.flush().map_err(stdout_failed)?;
                    break;
                }
                Err(e) if is_retry(&e) => {}
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
