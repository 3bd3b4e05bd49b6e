//! What the readiness models (`epoll`, `tokio`, ...) share about running several event
//! loops: handing each loop its own listeners, and a thread per loop.

use super::{DatagramSocket, Listeners, Shutdown, StreamListener};
use std::io;

/// The sockets one event loop serves.
#[derive(Debug, Default)]
pub struct LoopSources {
    /// Its stream listeners, in flag order.
    pub streams: Vec<StreamListener>,
    /// Its datagram sockets, in flag order.
    pub datagrams: Vec<DatagramSocket>,
}

/// Takes every socket out of `listeners` and gives each of `loops` loops its share.
///
/// Loop 0 gets the originals: with SO_REUSEPORT the kernel queues connections on every
/// socket of the group, so none may go unserved. The others get
/// [`StreamListener::sibling`]s, and, when `share_datagrams`, duplicates of the datagram
/// sockets (one receive queue; otherwise only loop 0 answers datagrams).
///
/// # Errors
///
/// The OS error of binding a sibling or duplicating a descriptor.
pub fn split_sources(
    listeners: &mut Listeners,
    loops: usize,
    share_datagrams: bool,
) -> io::Result<Vec<LoopSources>> {
    let streams = std::mem::take(&mut listeners.streams);
    let datagrams = std::mem::take(&mut listeners.datagrams);
    let mut sources = Vec::with_capacity(loops);
    for _ in 1..loops.max(1) {
        sources.push(LoopSources {
            streams: streams
                .iter()
                .map(StreamListener::sibling)
                .collect::<io::Result<_>>()?,
            datagrams: if share_datagrams {
                datagrams
                    .iter()
                    .map(DatagramSocket::try_clone)
                    .collect::<io::Result<_>>()?
            } else {
                Vec::new()
            },
        });
    }
    sources.insert(0, LoopSources { streams, datagrams });
    Ok(sources)
}

/// Runs `body` for each loop on its own thread, named `reverb-MODEL-INDEX`, and returns
/// when all have returned. A loop that fails fires `shutdown`, so the others drain and stop
/// and the server reports the failure instead of running on crippled.
///
/// # Errors
///
/// The first loop's error, or the OS error of spawning a thread.
pub fn run_on_threads<T: Send>(
    model: &str,
    loops: Vec<T>,
    shutdown: &Shutdown,
    body: impl Fn(T) -> io::Result<()> + Sync,
) -> io::Result<()> {
    let body = &body;
    std::thread::scope(|scope| {
        let handles: Vec<_> = (loops.into_iter().enumerate())
            .map(|(index, event_loop)| {
                let spawned = std::thread::Builder::new()
                    .name(format!("reverb-{model}-{index}"))
                    .spawn_scoped(scope, move || {
                        let result = body(event_loop);
                        if result.is_err() {
                            shutdown.fire();
                        }
                        result
                    });
                if spawned.is_err() {
                    // The loops already running would wait for a shutdown nobody sends.
                    shutdown.fire();
                }
                spawned
            })
            .collect();
        let mut outcome = Ok(());
        for handle in handles {
            let result = handle.and_then(|handle| {
                (handle.join()).unwrap_or_else(|_| Err(io::Error::other("event loop panicked")))
            });
            outcome = outcome.and(result);
        }
        outcome
    })
}
