//! What every model receives: bound [`Listeners`] with their [`Limits`], the [`Protocol`]
//! to speak, and a [`Shutdown`] handle; plus the pieces two or more models share.
//!
//! A model is a function `run(listeners, protocol, shutdown, options) -> Result<(),
//! ServeError>` (see `crate::models`). Sockets arrive bound and listening, so a test can
//! bind port 0 and the binary can print its `listening` lines before the model starts.

mod accept;
mod activation;
pub mod children;
mod connection;
mod datagram;
pub mod event_loops;
pub mod idle_wheel;
mod lifecycle;
pub mod linger;
mod listeners;
pub mod loop_clock;
pub mod one_socket;
pub mod read_buffer;
pub mod readiness;
pub mod setup_deadline;
mod shutdown;
pub mod stop_signal;
pub mod task;
pub mod task_buffers;

pub use crate::protocol::Protocol;
pub use accept::{AcceptAction, Accepted, accept_action, accept_and_admit, on_accept};
pub use connection::{Connection, HandlerPanicked, ReadOutcome, is_in_handler};
pub use datagram::{
    DATAGRAM_BATCH, DatagramReplier, Receipt, datagram_source_allowed, is_per_peer_datagram_error,
    receive_datagram,
};
pub use lifecycle::{
    CloseReason, DatagramDrop, Ending, Linger, LoopLog, close, datagram_transport, end,
    listener_transport, stream_transport,
};
pub use listeners::{Admission, ConnectionCounter, Listeners};
pub use shutdown::Shutdown;

use crate::metrics::Metrics;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// Default `--max-buffer`: bytes owed to one peer before the server stops reading it.
pub const DEFAULT_MAX_BUFFER_BYTES: usize = 256 * 1024;
/// Default `--drain-timeout`.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long accepting pauses when the process is out of descriptors (EMFILE, ENFILE), so
/// that a full descriptor table never turns the accept loop into a spin.
pub const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// Bytes a model reads from a stream at once; also the largest UDP payload (65,507) fits.
pub const READ_BUFFER_BYTES: usize = 64 * 1024;
/// The operator's limits and stream settings, the same for every model.
#[derive(Clone, Debug)]
pub struct Limits {
    /// At most this many stream connections at once (`--max-conns`); `None`: no limit.
    pub max_conns: Option<usize>,
    /// Close a stream connection that sent nothing for this long (`--idle-timeout`).
    pub idle_timeout: Option<Duration>,
    /// Bytes owed to one peer before the server stops reading it (`--max-buffer`).
    pub max_buffer_bytes: usize,
    /// After SIGTERM, how long owed replies may take before connections are cut.
    pub drain_timeout: Duration,
    /// What stream connections put between socket and session: PROXY header, TLS,
    /// greeting template.
    pub layers: crate::layer::StreamLayers,
    /// Where every loop counts (`--metrics`); disabled by default.
    pub metrics: Metrics,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_conns: None,
            idle_timeout: None,
            max_buffer_bytes: DEFAULT_MAX_BUFFER_BYTES,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            layers: crate::layer::StreamLayers::default(),
            metrics: Metrics::disabled(),
        }
    }
}

/// What a model may use or ignore beyond its sockets, protocol and shutdown: the same
/// for every model, so `main.rs`, the tests and `compare` call all models alike.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// `--threads`: worker threads (`pool`) or event loops (the multi-loop models);
    /// `None` is the model's default, and single-threaded models ignore it.
    pub threads: Option<usize>,
    /// Called once every listener is being served: every thread, loop or worker the model
    /// needs has started. Never called when the model fails to start.
    pub on_serving: OnServing,
}

/// What to do once the server serves (print the `listening` lines, tell the service
/// manager `READY=1`): run at most once, by the model, only after everything it needs has
/// started, so that nobody is told "ready" by a server about to fail.
#[derive(Clone, Default)]
pub struct OnServing(Arc<Mutex<Option<Announcement>>>);

/// What [`OnServing`] runs once.
type Announcement = Box<dyn FnOnce() + Send>;

impl OnServing {
    /// Runs `announce` when the model serves.
    pub fn new(announce: impl FnOnce() + Send + 'static) -> Self {
        OnServing(Arc::new(Mutex::new(Some(Box::new(announce)))))
    }

    /// The model serves: runs the announcement, the first time only.
    pub fn serving(&self) {
        let announce = (self.0.lock())
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(announce) = announce {
            announce();
        }
    }
}

impl std::fmt::Debug for OnServing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let lock = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let state = if lock.is_some() { "pending" } else { "done" };
        f.debug_tuple("OnServing").field(&state).finish()
    }
}

/// How the event loops of a multi-loop model (`epoll`, `async`, `tokio`, `uring`) take
/// connections from one address, and who answers datagrams: the one place this choice is
/// made and explained for all of them (`Model::accept_queues` applies it; the model
/// headers point here).
///
/// Both kinds of queue spread connections evenly and cost the same per message
/// (docs/benchmarks.md, "Accepting with several loops"). They differ when the process runs
/// out of descriptors: with a queue per loop, a connection can wait in one loop's queue
/// while another loop takes every freed descriptor, whereas one shared queue serves
/// connections in arrival order. So loops share one queue wherever a connection wakes
/// just one of them, or where every loop waking costs only an `EAGAIN`:
///
/// - `epoll` shares: it watches the listener with `EPOLLEXCLUSIVE`, so a connection wakes
///   one idle loop, and a loop that accepted re-adds the listener to go to the back of
///   the wake-up queue, which spreads connections round the loops;
/// - `tokio` shares: a loop that loses the race for a connection pays one `EAGAIN`;
/// - `async` and `uring` take a queue per loop: on a shared one every loop would wake for
///   every connection (edge-triggered registrations, multishot accepts), and
///   `EPOLLEXCLUSIVE` is not available to them.
///
/// Unix listeners have no SO_REUSEPORT and are always shared. A datagram socket has one
/// receive queue whatever the model: every loop watches a duplicate of it (`epoll`
/// exclusively), except under `tokio`, which registers without `EPOLLEXCLUSIVE`, so
/// loop 0 alone answers datagrams there rather than every loop waking per datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcceptQueues {
    /// Every loop accepts from the one listening socket (a second descriptor of it).
    Shared,
    /// Each loop gets an SO_REUSEPORT sibling with its own accept queue.
    OnePerLoop,
}

/// Why a server could not start or had to stop; each names the address or path as typed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Binding or listening failed (in use, permission denied, ...).
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address as the user wrote it, with its scheme.
        addr: String,
        /// The OS error.
        source: io::Error,
    },
    /// A live socket (a listener, or a datagram socket) is bound to this Unix socket path.
    #[error("cannot bind {addr}: address in use (a live socket is bound to {})", path.display())]
    UnixPathInUse {
        /// The address as the user wrote it.
        addr: String,
        /// The socket path.
        path: PathBuf,
    },
    /// The path exists and is not a socket; it is never deleted.
    #[error("cannot bind {addr}: {} exists and is not a socket (not removing it)", path.display())]
    NotASocket {
        /// The address as the user wrote it.
        addr: String,
        /// The path.
        path: PathBuf,
    },
    /// The model cannot run on this kernel (io_uring disabled, ...).
    #[error("model {model} is unavailable here: {source}")]
    ModelUnavailable {
        /// The model's name.
        model: &'static str,
        /// Why.
        source: io::Error,
    },
    /// The server failed while running.
    #[error("server failed: {0}")]
    Io(#[from] io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_librarys_defaults_are_the_command_lines() {
        // docs/cli.md: `--max-buffer` defaults to 256K, `--drain-timeout` to 5 s.
        let limits = Limits::default();
        assert_eq!(limits.max_buffer_bytes, 256 * 1024);
        assert_eq!(limits.drain_timeout, Duration::from_secs(5));
    }

    #[test]
    fn the_announcement_runs_once_when_the_model_serves() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&runs);
        let on_serving = OnServing::new(move || {
            counted.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(format!("{on_serving:?}"), r#"OnServing("pending")"#);
        on_serving.clone().serving();
        on_serving.serving();
        assert_eq!(runs.load(Ordering::SeqCst), 1, "a second loop says nothing");
        assert_eq!(format!("{on_serving:?}"), r#"OnServing("done")"#);
    }
}
