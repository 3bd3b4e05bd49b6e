//! One file per `--model`: the same protocol core served by each rung of the ladder.
//!
//! Every model has the same entry point,
//! `run(listeners: Listeners, protocol: Protocol, shutdown: Shutdown) -> Result<(), ServeError>`:
//! it serves every listener until `shutdown` fires, drains what is owed, and returns.

pub mod blocking;
pub mod busy_poll;
pub mod epoll;
pub mod forking;
pub mod own_runtime;
pub mod poll;
pub mod pool;
pub mod select;
pub mod threaded;
pub mod tokio;
pub mod uring;

use crate::server::{Listeners, Protocol, ServeError, Shutdown};
use std::fmt;

/// The I/O models, in the order of the ladder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Model {
    /// One client at a time per listener.
    Blocking,
    /// A thread per connection.
    Threaded,
    /// A fixed pool of worker threads.
    Pool,
    /// A process per connection.
    Forking,
    /// Non-blocking sockets polled in a loop.
    BusyPoll,
    /// `select(2)`.
    Select,
    /// `poll(2)`.
    Poll,
    /// `epoll(7)` reactors, one per thread.
    Epoll,
    /// reverb's own async runtime.
    Async,
    /// tokio.
    Tokio,
    /// io_uring.
    Uring,
}

impl Model {
    /// Every model, in ladder order.
    pub const ALL: [Model; 11] = [
        Model::Blocking,
        Model::Threaded,
        Model::Pool,
        Model::Forking,
        Model::BusyPoll,
        Model::Select,
        Model::Poll,
        Model::Epoll,
        Model::Async,
        Model::Tokio,
        Model::Uring,
    ];

    /// The name used by `--model`.
    pub fn name(self) -> &'static str {
        match self {
            Model::Blocking => "blocking",
            Model::Threaded => "threaded",
            Model::Pool => "pool",
            Model::Forking => "forking",
            Model::BusyPoll => "busy-poll",
            Model::Select => "select",
            Model::Poll => "poll",
            Model::Epoll => "epoll",
            Model::Async => "async",
            Model::Tokio => "tokio",
            Model::Uring => "uring",
        }
    }

    /// Parses a `--model` name.
    pub fn from_name(name: &str) -> Option<Model> {
        Model::ALL.into_iter().find(|m| m.name() == name)
    }

    /// Whether the model has landed (others exit 1 with "not built yet").
    pub fn is_built(self) -> bool {
        match self {
            Model::Blocking | Model::Threaded | Model::Pool | Model::Forking => true,
            Model::BusyPoll => busy_poll::IS_BUILT,
            Model::Select => select::IS_BUILT,
            Model::Poll => poll::IS_BUILT,
            Model::Epoll => epoll::IS_BUILT,
            Model::Async => own_runtime::IS_BUILT,
            Model::Tokio => self::tokio::IS_BUILT,
            Model::Uring => uring::IS_BUILT,
        }
    }

    /// Whether the model wants TCP listeners that can get SO_REUSEPORT siblings.
    pub fn wants_reuseport(self) -> bool {
        matches!(self, Model::Async | Model::Uring)
    }

    /// Checks, before anything is bound, that the model can run here.
    ///
    /// # Errors
    ///
    /// [`ServeError::NotBuilt`] or [`ServeError::ModelUnavailable`].
    pub fn check_available(self) -> Result<(), ServeError> {
        if !self.is_built() {
            return Err(ServeError::NotBuilt { model: self.name() });
        }
        if self == Model::Uring {
            uring::check_available()?;
        }
        Ok(())
    }
}

impl fmt::Display for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Runs `model` over `listeners` until `shutdown` fires and the drain ends.
///
/// `threads` is `--threads` (`None`: the model's default).
///
/// # Errors
///
/// Setup failures, an unavailable model, or a listener that broke.
pub fn run(
    model: Model,
    listeners: Listeners,
    protocol: Protocol,
    shutdown: Shutdown,
    threads: Option<usize>,
) -> Result<(), ServeError> {
    model.check_available()?;
    match model {
        Model::Blocking => blocking::run(listeners, protocol, shutdown),
        Model::Threaded => threaded::run(listeners, protocol, shutdown),
        Model::Pool => pool::run(
            listeners,
            protocol,
            shutdown,
            threads.unwrap_or(pool::DEFAULT_THREADS),
        ),
        Model::Forking => forking::run(listeners, protocol, shutdown),
        Model::BusyPoll => busy_poll::run(listeners, protocol, shutdown, threads),
        Model::Select => select::run(listeners, protocol, shutdown, threads),
        Model::Poll => poll::run(listeners, protocol, shutdown, threads),
        Model::Epoll => epoll::run(listeners, protocol, shutdown, threads),
        Model::Async => own_runtime::run(listeners, protocol, shutdown, threads),
        Model::Tokio => self::tokio::run(listeners, protocol, shutdown, threads),
        Model::Uring => uring::run(listeners, protocol, shutdown, threads),
    }
}

/// The default number of event loops: one per available core.
pub fn default_loops() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
