//! Thread pool: a fixed set of workers serves connections taken from a queue.
//!
//! Technique: the acceptor queues each connection; `--threads` workers (default
//! [`DEFAULT_THREADS`]) each serve one connection at a time to its end
//! (the tutorial's `ThreadPoolExecutor(max_workers=5)`, step 3 of the ladder).
//! Cost: threads are made once, not per client, so a burst of short connections is cheap.
//! Limit: at most `--threads` clients are served at once; the next ones wait in the queue,
//! unanswered, until a worker's client leaves. A connection the server closes first is
//! handed to the lingering thread, so a worker never waits on a peer it already finished.
//!
//! Idle timeouts: the scan, over the one connection a thread (or child) serves: its
//! `poll` waits no longer than that connection's idle deadline.

use crate::net::Stream;
use crate::server::one_socket::{
    LingerOn, accept_until_shutdown, close_unserved, serve_accepted, serve_each_socket,
};
use crate::server::{
    Admission, Connection, Listeners, LoopLog, Protocol, RunOptions, ServeError, Shutdown,
};
use std::io;
use std::os::fd::AsFd;
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, sync_channel};
use std::thread;

/// Workers when `--threads` is not given.
pub const DEFAULT_THREADS: usize = 16;
/// Accepted connections waiting for a worker; when it is full, the acceptor waits and
/// new clients wait in the kernel's backlog instead.
pub const QUEUE_LEN: usize = 1024;

/// A connection is made at accept, so its setup deadline runs while it waits for a worker.
type Job = (Stream, Connection, Admission);

/// Serves every listener with `threads` workers until `shutdown` fires and they drained.
///
/// # Errors
///
/// A listener that broke.
pub fn run(
    mut listeners: Listeners,
    protocol: Protocol,
    shutdown: Shutdown,
    options: RunOptions,
) -> Result<(), ServeError> {
    let workers = options.threads.unwrap_or(DEFAULT_THREADS).max(1);
    let (counter, limits) = (listeners.counter.clone(), listeners.limits.clone());
    let (queue, jobs) = sync_channel::<Job>(QUEUE_LEN);
    let jobs = Mutex::new(jobs);
    let (protocol, limits, shutdown_ref, jobs) = (&protocol, &limits, &shutdown, &jobs);
    thread::scope(|scope| {
        for worker in 0..workers {
            let started = thread::Builder::new().spawn_scoped(scope, move || {
                // One counter slot for the worker's life, as an event loop has: a slot per
                // connection would scan the slot table at every start and, at every end,
                // fold its counts under the lock every scrape takes.
                let log = LoopLog::new(limits.metrics);
                while let Some((stream, connection, admission)) = next_job(jobs) {
                    if shutdown_ref.is_fired() {
                        close_unserved(stream, &connection, admission, &log);
                        continue;
                    }
                    // A connection it closes first lingers on the lingering thread, with
                    // its place under --max-conns, so the worker moves on at once.
                    let linger = LingerOn::LingeringThread(admission);
                    serve_accepted(
                        stream,
                        connection,
                        limits,
                        shutdown_ref,
                        linger,
                        &log,
                        || {},
                    );
                }
            });
            if let Err(e) = started {
                // The workers started return once `queue`, dropped here, is gone.
                return Err(io::Error::other(format!(
                    "cannot start pool worker {worker}: {e}"
                )));
            }
        }
        let on_serving = &options.on_serving;
        let served = serve_each_socket(
            &mut listeners,
            protocol,
            shutdown_ref,
            on_serving,
            |listener| {
                let queue = queue.clone();
                accept_until_shutdown(
                    listener,
                    &counter,
                    shutdown_ref,
                    limits.metrics,
                    move |stream, peer, admission, _| {
                        let connection = Connection::new(protocol, peer, limits, stream.as_fd());
                        // Blocks while QUEUE_LEN connections already wait.
                        let _ = queue.send((stream, connection, admission));
                    },
                )
            },
        );
        // The workers return once the queue is empty and its senders are gone; leaving
        // the scope joins them.
        drop(queue);
        served
    })?;
    // Dropping the listeners removes the Unix socket files, once every thread is done.
    drop(listeners);
    Ok(())
}

fn next_job(jobs: &Mutex<Receiver<Job>>) -> Option<Job> {
    // A worker that panicked while holding the lock cannot have left the receiver in a
    // broken state: recv is atomic.
    let jobs = jobs.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    jobs.recv().ok()
}
