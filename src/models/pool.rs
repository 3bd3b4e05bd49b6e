//! Thread pool: a fixed set of workers serves connections taken from a queue.
//!
//! Technique: the acceptor queues each connection; `--threads` workers (default
//! [`DEFAULT_THREADS`]) each serve one connection at a time to its end
//! (`ThreadPoolExecutor(max_workers=5)` in the tutorials; step 3 of the ladder).
//! Cost: threads are made once, not per client, so a burst of short connections is cheap.
//! Limit: at most `--threads` clients are served at once; the next ones wait in the queue,
//! unanswered, until a worker's client leaves.

use super::blocking::join_all;
use crate::net::{Peer, Stream};
use crate::server::one_socket::{accept_until_shutdown, serve_connection, serve_datagrams};
use crate::server::{Admission, Listeners, Protocol, RunOptions, ServeError, Shutdown};
use std::sync::mpsc::{Receiver, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread;

/// Workers when `--threads` is not given.
pub const DEFAULT_THREADS: usize = 16;
/// Accepted connections waiting for a worker; when it is full, the acceptor waits and
/// new clients wait in the kernel's backlog instead.
pub const QUEUE_LEN: usize = 1024;

type Job = (Stream, Peer, Admission);

/// Serves every listener with `threads` workers until `shutdown` fires and they drained.
///
/// # Errors
///
/// A listener that broke.
pub fn run(
    listeners: Listeners,
    protocol: Protocol,
    shutdown: Shutdown,
    options: RunOptions,
) -> Result<(), ServeError> {
    let Listeners {
        streams,
        datagrams,
        limits,
        counter,
        ..
    } = &listeners;
    let threads = options.threads.unwrap_or(DEFAULT_THREADS);
    let (queue, jobs) = sync_channel::<Job>(QUEUE_LEN);
    let jobs = Arc::new(Mutex::new(jobs));
    let metrics = listeners.limits.metrics;
    thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            let jobs = jobs.clone();
            let (protocol, shutdown) = (&protocol, &shutdown);
            scope.spawn(move || {
                while let Some((stream, peer, admission)) = next_job(&jobs) {
                    if shutdown.is_fired() {
                        // Accepted but never served before shutdown: nothing is owed.
                        continue;
                    }
                    serve_connection(stream, peer, protocol, limits, shutdown);
                    drop(admission);
                }
            });
        }
        let mut threads = Vec::new();
        for listener in streams {
            let (queue, shutdown) = (queue.clone(), &shutdown);
            threads.push(scope.spawn(move || {
                accept_until_shutdown(
                    listener,
                    counter,
                    shutdown,
                    metrics,
                    move |stream, peer, admission| {
                        // Blocks while QUEUE_LEN connections already wait.
                        let _ = queue.send((stream, peer, admission));
                    },
                )
            }));
        }
        drop(queue);
        for socket in datagrams {
            threads.push(scope.spawn(|| serve_datagrams(socket, &protocol, &shutdown, metrics)));
        }
        join_all(threads)
        // Leaving the scope joins the workers: the queue's senders are gone, so each
        // worker returns once the queue is empty and its client is served.
    })
}

fn next_job(jobs: &Mutex<Receiver<Job>>) -> Option<Job> {
    // A worker that panicked while holding the lock cannot have left the receiver in a
    // broken state: recv is atomic.
    let jobs = jobs.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    jobs.recv().ok()
}
