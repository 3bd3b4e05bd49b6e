//! One file per `--model`: the same protocol core served by each rung of the ladder.
//!
//! Every model has the same entry point,
//! `run(listeners: Listeners, protocol: Protocol, shutdown: Shutdown, options: RunOptions)
//! -> Result<(), ServeError>`: it serves every listener until `shutdown` fires, drains what
//! is owed, and returns.

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

use crate::server::{AcceptQueues, Listeners, Protocol, RunOptions, ServeError, Shutdown};
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

    /// How this model's event loops share a TCP address: the choice [`AcceptQueues`]
    /// makes and explains for every multi-loop model.
    pub fn accept_queues(self) -> AcceptQueues {
        match self {
            Model::Async | Model::Uring => AcceptQueues::OnePerLoop,
            _ => AcceptQueues::Shared,
        }
    }

    /// Checks, before anything is bound, that the model can run here.
    ///
    /// # Errors
    ///
    /// [`ServeError::ModelUnavailable`].
    pub fn check_available(self) -> Result<(), ServeError> {
        if self == Model::Uring {
            // io_uring can be missing or disabled (sysctl, seccomp): say why before binding.
            crate::sys::uring::probe().map_err(|source| ServeError::ModelUnavailable {
                model: "uring",
                source,
            })?;
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
/// # Errors
///
/// Setup failures, an unavailable model, or a listener that broke.
pub fn run(
    model: Model,
    listeners: Listeners,
    protocol: Protocol,
    shutdown: Shutdown,
    options: RunOptions,
) -> Result<(), ServeError> {
    model.check_available()?;
    let run = match model {
        Model::Blocking => blocking::run,
        Model::Threaded => threaded::run,
        Model::Pool => pool::run,
        Model::Forking => forking::run,
        Model::BusyPoll => busy_poll::run,
        Model::Select => select::run,
        Model::Poll => poll::run,
        Model::Epoll => epoll::run,
        Model::Async => own_runtime::run,
        Model::Tokio => self::tokio::run,
        Model::Uring => uring::run,
    };
    let drain_timeout = listeners.limits.drain_timeout;
    let served = run(listeners, protocol, shutdown, options);
    // Connections closed during the drain may still be lingering on the lingering thread.
    crate::server::linger::finish(drain_timeout);
    served
}

/// How many event loops a multi-loop model runs: `--threads`, or one per available core.
pub fn loop_count(options: &RunOptions) -> usize {
    options.threads.unwrap_or_else(default_loops).max(1)
}

/// The default number of event loops: one per available core.
pub fn default_loops() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
