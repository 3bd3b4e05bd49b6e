//! reverb: an echo-server toolkit, and a ladder of I/O models to learn event loops from.
//!
//! One sans-IO protocol core ([`protocol`]) is served by every I/O model ([`models`]),
//! each a rung of the ladder the tutorials climb:
//!
//! | model       | technique                                   | limit                                         |
//! |-------------|---------------------------------------------|-----------------------------------------------|
//! | `blocking`  | accept, serve to the end, accept again      | one client at a time per listener             |
//! | `threaded`  | a thread per connection                     | a thread's memory and scheduling per client   |
//! | `pool`      | a fixed pool of worker threads              | at most `--threads` clients served at once    |
//! | `forking`   | a process per connection                    | a fork per client; the parent reaps them all  |
//! | `busy-poll` | non-blocking sockets polled in a loop       | burns a core even while idle                  |
//! | `select`    | `select(2)` over fd sets                    | no fd >= 1024; O(n) scan per wake-up          |
//! | `poll`      | `poll(2)` over a pollfd array               | O(n) scan per wake-up                         |
//! | `epoll`     | `epoll(7)` reactors, one per core           | Linux only; readiness, then a syscall per I/O |
//! | `async`     | our own executor and reactor, from scratch  | as epoll, plus a task per connection          |
//! | `tokio`     | the mainstream async runtime                | as `async`                                    |
//! | `uring`     | io_uring completions                        | newest kernels; disabled in some sandboxes    |
//!
//! Layers point one way: [`buffer`] and [`slab`] import nothing from the crate,
//! [`protocol`] only `buffer`, [`sys`] only `slab`, [`net`] only `sys`, [`runtime`] only
//! those, [`server`] the layers below it, [`models`] everything below, and only `main.rs`
//! all of it. [`sys`] is the only module that calls the OS directly.

pub mod addr;
pub mod bench;
pub mod buffer;
pub mod client;
pub mod compare;
pub mod flags;
pub mod metrics;
pub mod models;
pub mod net;
pub mod protocol;
pub mod runtime;
pub mod server;
pub mod service;
pub mod slab;
pub mod sys;
