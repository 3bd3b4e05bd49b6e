//! The HTTP side: `/metrics`, `/healthz` and `/readyz`, served by tiny_http on threads of
//! its own, never on a loop thread.

use super::Metrics;
use super::exposition::{CONTENT_TYPE, render};
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

/// How long the endpoint waits before accepting again after tiny_http stopped, so that a
/// process out of descriptors is not made to spin (as the loops' accept pause).
const RESTART_PAUSE: Duration = Duration::from_millis(100);

/// Whether the server is draining, asked at each `/readyz`.
pub type Probe = Box<dyn Fn() -> bool + Send + 'static>;

/// A bound metrics endpoint, not yet answering.
///
/// Binding and serving are split so that a bind error stops the server before it prints
/// its readiness lines, and so that the `forking` model can bind in the server and serve
/// from a helper process (its parent must stay single-threaded, and tiny_http starts
/// threads as soon as it serves).
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

    /// Answers requests on this thread for the rest of the process.
    ///
    /// tiny_http stops accepting at its first accept error (the process out of
    /// descriptors, say) and then ends its requests; so the endpoint starts again on a
    /// duplicate of the same listening socket after [`RESTART_PAUSE`], however often that
    /// happens: a server that ran out of descriptors once must still be scraped.
    pub fn run(self, metrics: Metrics, is_draining: Probe) {
        loop {
            let server = (self.listener.try_clone()).and_then(|listener| {
                tiny_http::Server::from_listener(listener, None).map_err(io::Error::other)
            });
            match server {
                Ok(server) => answer_all(&server, metrics, &is_draining),
                Err(e) => tracing::warn!("metrics endpoint cannot start: {e}"),
            }
            tracing::warn!(
                "metrics endpoint stopped accepting; accepting again in {} ms",
                RESTART_PAUSE.as_millis()
            );
            std::thread::sleep(RESTART_PAUSE);
        }
    }
}

/// Answers `server`'s requests until it stops accepting.
fn answer_all(server: &tiny_http::Server, metrics: Metrics, is_draining: &Probe) {
    for request in server.incoming_requests() {
        let (status, content_type, body) = answer(request.url(), metrics, is_draining);
        let mut response = tiny_http::Response::from_string(body).with_status_code(status);
        if let Ok(header) = tiny_http::Header::from_bytes("Content-Type", content_type) {
            response = response.with_header(header);
        }
        // A scraper that went away is its own problem; the next one gets an answer.
        let _ = request.respond(response);
    }
}

/// Status, content type and body for a request path (query strings are ignored).
fn answer(url: &str, metrics: Metrics, is_draining: &Probe) -> (u16, &'static str, String) {
    const PLAIN: &str = "text/plain; charset=utf-8";
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
