//! The HTTP side: `/metrics`, `/healthz` and `/readyz`, answered on a thread of its own
//! (never on a loop thread), one request per connection, requests parsed by `httparse`.
//!
//! The endpoint accepts for itself so that no accept error stops it: a server out of
//! descriptors pauses and accepts again, as the loops do, and can be scraped as soon as a
//! descriptor is free. Requests are answered one at a time; a client gets
//! [`REQUEST_TIMEOUT`] to send its request and take the answer, so one that stalls delays
//! the next scrape by at most that.

use super::Metrics;
use super::exposition::{CONTENT_TYPE, render};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

/// Whether the server is draining, asked at each `/readyz`.
pub type Probe = Box<dyn Fn() -> bool + Send + 'static>;

/// How long accepting pauses after a failed `accept` (out of descriptors, say), so that it
/// never spins; the loops' accept pause is as long.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// How long a client may take to send its request, and to take each part of the answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest request (request line and headers) read; a longer one is answered 431.
const MAX_REQUEST_BYTES: usize = 8 * 1024;

/// Headers parsed per request; more is answered 431.
const MAX_HEADERS: usize = 64;

/// A bound metrics endpoint, not yet answering.
///
/// Binding and serving are split so that a bind error stops the server before it prints
/// its readiness lines, and so that the `forking` model can bind in the server and serve
/// from a helper process (its parent must stay single-threaded).
#[derive(Debug)]
pub struct MetricsServer {
    listener: TcpListener,
}

impl MetricsServer {
    /// Binds `addr` for HTTP.
    ///
    /// # Errors
    ///
    /// The OS error of binding (address in use, permission denied).
    pub fn bind(addr: SocketAddr) -> io::Result<Self> {
        Ok(MetricsServer {
            listener: TcpListener::bind(addr)?,
        })
    }

    /// The bound address (port 0 resolved).
    ///
    /// # Errors
    ///
    /// The OS error of `getsockname`.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Answers requests on a thread of its own for the rest of the process.
    ///
    /// # Errors
    ///
    /// The thread could not be started.
    pub fn spawn(self, metrics: Metrics, is_draining: Probe) -> io::Result<()> {
        std::thread::Builder::new()
            .name("metrics-http".to_string())
            .spawn(move || self.run(metrics, is_draining))?;
        Ok(())
    }

    /// Answers requests on this thread for the rest of the process. A failed `accept` is
    /// logged (once until one succeeds again) and retried after 100 ms.
    pub fn run(self, metrics: Metrics, is_draining: Probe) {
        let mut is_failing = false;
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    is_failing = false;
                    if let Err(e) = answer_one(stream, metrics, &is_draining) {
                        tracing::debug!("metrics request not answered: {e}");
                    }
                }
                Err(e) => {
                    if !is_failing {
                        tracing::warn!(
                            "metrics endpoint: accept failed: {e}; trying again every {} ms",
                            ACCEPT_RETRY.as_millis()
                        );
                    }
                    is_failing = true;
                    std::thread::sleep(ACCEPT_RETRY);
                }
            }
        }
    }
}

/// Reads one request from `stream`, answers it, and closes the connection.
fn answer_one(mut stream: TcpStream, metrics: Metrics, is_draining: &Probe) -> io::Result<()> {
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let mut buf = vec![0u8; MAX_REQUEST_BYTES];
    let mut len = 0;
    loop {
        let n = stream.read(&mut buf[len..])?;
        if n == 0 {
            // The client left before its request was complete.
            return Ok(());
        }
        len += n;
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        let response = match request.parse(&buf[..len]) {
            Ok(httparse::Status::Complete(_)) => match (request.method, request.path) {
                (Some(method @ ("GET" | "HEAD")), Some(path)) => {
                    let (status, content_type, body) = answer(path, metrics, is_draining);
                    let mut whole = response(status, content_type, &body);
                    if method == "HEAD" {
                        // The same headers, Content-Length included, without the body.
                        whole.truncate(whole.len() - body.len());
                    }
                    whole
                }
                _ => response(405, PLAIN, "only GET and HEAD are answered\n"),
            },
            Ok(httparse::Status::Partial) if len < buf.len() => continue,
            Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => {
                response(431, PLAIN, "request header fields too large\n")
            }
            Err(e) => response(400, PLAIN, &format!("bad request: {e}\n")),
        };
        stream.write_all(response.as_bytes())?;
        if !response.starts_with("HTTP/1.1 200") {
            linger(&mut stream);
        }
        return Ok(());
    }
}

/// Closes a connection whose request may not have been read to its end without losing
/// the answer: closing with unread input would send a reset, which discards the answer
/// still queued. Shuts down the sending side, then reads and discards what the client
/// still sends until its EOF: at most eight reads of [`MAX_REQUEST_BYTES`], each waiting
/// at most a second.
fn linger(stream: &mut TcpStream) {
    if stream.shutdown(std::net::Shutdown::Write).is_err()
        || stream
            .set_read_timeout(Some(Duration::from_secs(1)))
            .is_err()
    {
        return;
    }
    let mut discard = [0u8; MAX_REQUEST_BYTES];
    for _ in 0..8 {
        if stream.read(&mut discard).is_ok_and(|n| n > 0) {
            continue;
        }
        return;
    }
}

/// The content type of the plain answers.
const PLAIN: &str = "text/plain; charset=utf-8";

/// A whole HTTP/1.1 response; the connection closes after it.
fn response(status: u16, content_type: &str, body: &str) -> String {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "",
    };
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Status, content type and body for a request path (query strings are ignored).
fn answer(url: &str, metrics: Metrics, is_draining: &Probe) -> (u16, &'static str, String) {
    let path = url.split('?').next().unwrap_or(url);
    let is_draining = is_draining();
    let is_ready = metrics.is_ready() && !is_draining;
    match path {
        "/metrics" => (200, CONTENT_TYPE, render(metrics, is_ready)),
        "/healthz" => (200, PLAIN, "ok\n".to_string()),
        "/readyz" if is_draining => (503, PLAIN, "draining\n".to_string()),
        "/readyz" if !is_ready => (503, PLAIN, "starting\n".to_string()),
        "/readyz" => (200, PLAIN, "ready\n".to_string()),
        _ => (
            404,
            PLAIN,
            "not found; try /metrics, /healthz or /readyz\n".to_string(),
        ),
    }
}

impl MetricsServer {
    /// Answers requests from a helper process forked now, for a server whose own process
    /// must stay single-threaded (the `forking` model). The helper reads the counters
    /// through the shared mapping, dies with the server (`PR_SET_PDEATHSIG`), and holds
    /// no lock a `forking` child could need.
    ///
    /// # Errors
    ///
    /// `fork` failed or the process already has threads.
    pub fn spawn_process(self, metrics: Metrics, is_draining: Probe) -> io::Result<()> {
        use crate::sys::process::{self, Forked};
        match process::fork()? {
            Forked::Child => {
                let is_orphan = process::set_parent_death_signal(libc::SIGKILL).is_err()
                    || process::parent_id() != metrics.server_pid();
                if !is_orphan {
                    self.run(metrics, is_draining);
                }
                process::exit_now(0)
            }
            // The server's copy of the listener closes here; the helper's stays open.
            Forked::Parent(_) => Ok(()),
        }
    }
}
