//! What the multi-loop models (`epoll`, `async`, `tokio`, `uring`) share about running
//! several event loops: handing each loop its listeners, and a thread per loop behind one
//! start gate.

use super::{Listeners, OnServing, Shutdown};
use crate::net::{DatagramSocket, StreamListener};
use std::io;
use std::sync::{Condvar, Mutex, PoisonError};

/// The sockets one event loop serves.
#[derive(Debug, Default)]
pub struct LoopSources {
    /// Its stream listeners, in flag order.
    pub streams: Vec<StreamListener>,
    /// Its datagram sockets, in flag order.
    pub datagrams: Vec<DatagramSocket>,
}

impl LoopSources {
    /// Every socket of `listeners`, for a model with a single loop.
    pub fn take_all(listeners: &mut Listeners) -> LoopSources {
        LoopSources {
            streams: std::mem::take(&mut listeners.streams),
            datagrams: std::mem::take(&mut listeners.datagrams),
        }
    }
}

/// Takes every socket out of `listeners` and gives each of `loops` loops its share.
///
/// Loop 0 gets the originals: with SO_REUSEPORT the kernel queues connections on every
/// socket of the group, so none may go unserved. The others get
/// [`listener_for_another_loop`]s, and, when `share_datagrams`, duplicates of the datagram
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
                .map(listener_for_another_loop)
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

/// A listener on `listener`'s address for one more event loop: a sibling with its own
/// accept queue when `listener` was bound for [`super::AcceptQueues::OnePerLoop`], else the
/// same socket with its shared queue. The model chose when binding (`Model::accept_queues`).
///
/// # Errors
///
/// The OS error of binding the sibling or duplicating the descriptor.
pub fn listener_for_another_loop(listener: &StreamListener) -> io::Result<StreamListener> {
    if listener.can_have_own_queue() {
        listener.bind_own_queue()
    } else {
        listener.share_queue()
    }
}

/// Hidden, for tests only: `REVERB_TEST_FAIL_LOOP=N` makes the setup of loop `N` fail, so
/// a test can prove that a server whose loop cannot start exits instead of hanging.
/// Honoured by debug builds only (the tests run the debug binary): a release build never
/// lets its environment break it.
const FAIL_LOOP_VAR: &str = "REVERB_TEST_FAIL_LOOP";

/// The loop [`FAIL_LOOP_VAR`] asks to fail, in a debug build.
///
/// # Errors
///
/// The variable is set to something other than a loop number.
fn failing_loop() -> io::Result<Option<usize>> {
    if !cfg!(debug_assertions) {
        return Ok(None);
    }
    let Some(value) = std::env::var_os(FAIL_LOOP_VAR) else {
        return Ok(None);
    };
    let number = value.to_str().and_then(|n| n.parse::<usize>().ok());
    match number {
        Some(n) => Ok(Some(n)),
        None => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{FAIL_LOOP_VAR} is {value:?}: expected a loop number (0, 1, ...)"),
        )),
    }
}

/// Runs one event loop per item and returns when all have returned: a single loop on the
/// calling thread itself (why: `run_one_loop`), several on one thread each, named
/// `reverb-MODEL-INDEX`.
///
/// Each thread runs `setup(index, item)` to build its loop (epoll instance, runtime,
/// ring, ...) and then waits at a start gate: no loop serves before every loop was built,
/// because a busy first loop could use up the descriptors the others still need. Once
/// the gate opens, the calling thread tells `on_serving`. If a thread cannot be spawned
/// or a setup fails, the gate opens with the failure, the loops already built return
/// without serving, `on_serving` is never told, and the error is returned: the server
/// stops with one line instead of running crippled, waiting for ever, or announcing a
/// readiness it does not have. A loop that fails while serving fires `shutdown`, so the
/// others drain and stop.
///
/// # Errors
///
/// The first setup or loop error (naming the loop), or the OS error of spawning a thread.
pub fn run_loops<T: Send, L>(
    model: &str,
    items: Vec<T>,
    shutdown: &Shutdown,
    on_serving: &OnServing,
    setup: impl Fn(usize, T) -> io::Result<L> + Sync,
    serve: impl Fn(L) -> io::Result<()> + Sync,
) -> io::Result<()> {
    let failing_loop = failing_loop()?;
    if items.len() == 1 {
        let item = items.into_iter().next().expect("one item");
        return run_one_loop(model, item, failing_loop, on_serving, setup, serve);
    }
    let gate = StartGate::new(items.len());
    let (gate, setup, serve) = (&gate, &setup, &serve);
    std::thread::scope(|scope| {
        let mut handles = Vec::with_capacity(items.len());
        let mut outcome = Ok(());
        for (index, item) in items.into_iter().enumerate() {
            let spawned = std::thread::Builder::new()
                .name(format!("reverb-{model}-{index}"))
                .spawn_scoped(scope, move || {
                    // A setup that panics must open the gate too, or everyone waits.
                    let arrival = Arrival(Some(gate));
                    let built = if failing_loop == Some(index) {
                        Err(io::Error::other(format!("{FAIL_LOOP_VAR} is {index}")))
                    } else {
                        setup(index, item)
                    };
                    let event_loop = match built {
                        Ok(event_loop) => event_loop,
                        Err(e) => {
                            return Err(io::Error::new(
                                e.kind(),
                                format!("cannot start {model} loop {index}: {e}"),
                            ));
                        }
                    };
                    if !arrival.arrive_and_wait() {
                        return Ok(());
                    }
                    let result = serve(event_loop);
                    if result.is_err() {
                        shutdown.fire();
                    }
                    result
                });
            match spawned {
                Ok(handle) => handles.push(handle),
                Err(e) => {
                    gate.fail();
                    outcome = Err(io::Error::new(
                        e.kind(),
                        format!("cannot start a thread for {model} loop {index}: {e}"),
                    ));
                    break;
                }
            }
        }
        if outcome.is_ok() && gate.wait_open() {
            on_serving.serving();
        }
        // Every started loop is joined before the first error is returned.
        for handle in handles {
            let result = (handle.join())
                .unwrap_or_else(|_| Err(io::Error::other(format!("a {model} loop panicked"))));
            if outcome.is_ok() {
                outcome = result;
            }
        }
        outcome
    })
}

/// One event loop, on the calling thread: [`run_loops`] for `--threads 1`.
///
/// Why no thread of its own: a process with one thread has a descriptor table nobody
/// shares, and the kernel's `fdget()` (fs/file.c, `__fget_light`) then lends each system
/// call the `struct file` without touching its reference count. As soon as a second
/// thread shares the table (`files->count > 1`), every `recv`, `send` and `epoll_ctl`
/// takes a reference on entry and drops it on exit (`fput`): two atomic operations per
/// call, which no other thread could ever need here, since the loop is the only thread
/// that serves. So the loop runs where the server already is, and once its announcement
/// is written ([`announce_aside`]) the process stays single-threaded until a feature needs
/// a thread of its own (the lingering close, `--metrics`, the setup deadline of `--proxy` and `--tls`): those
/// share the one table, so a descriptor means the same in every thread, and handing a
/// socket to another thread stays as correct as before. Several loops keep one thread
/// each: they share the table, and a private one per loop (`unshare(CLONE_FILES)`) would
/// have to pass every socket handed to the lingering thread through `SCM_RIGHTS`.
///
/// A loop that panics is reported as an error, as a loop thread's panic is.
///
/// # Errors
///
/// The setup's or the loop's error (naming the loop), or the panic of either.
fn run_one_loop<T, L>(
    model: &str,
    item: T,
    failing_loop: Option<usize>,
    on_serving: &OnServing,
    setup: impl Fn(usize, T) -> io::Result<L>,
    serve: impl Fn(L) -> io::Result<()>,
) -> io::Result<()> {
    let run = || {
        let built = if failing_loop == Some(0) {
            Err(io::Error::other(format!("{FAIL_LOOP_VAR} is 0")))
        } else {
            setup(0, item)
        };
        let event_loop = built
            .map_err(|e| io::Error::new(e.kind(), format!("cannot start {model} loop 0: {e}")))?;
        announce_aside(on_serving);
        serve(event_loop)
    };
    // The closure owns nothing that outlives a panic: whatever it built is dropped while
    // unwinding, and the error below is all that is left of it.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
        .unwrap_or_else(|_| Err(io::Error::other(format!("a {model} loop panicked"))))
}

/// Announces the server (the `listening` lines, `READY=1`) on a short-lived thread of its
/// own while the only loop starts serving: either may block (a stdout pipe nobody reads, a
/// service manager's full notification queue), and the server must serve meanwhile, as it
/// does with several loops. Once the announcement is written the thread ends, and the
/// descriptor table is the loop's alone again. If no thread can be started, the loop
/// announces itself.
fn announce_aside(on_serving: &OnServing) {
    let aside = on_serving.clone();
    let spawned = std::thread::Builder::new()
        .name("reverb-announce".into())
        .spawn(move || aside.serving());
    if spawned.is_err() {
        on_serving.serving();
    }
}

/// A loop on its way to the start gate: if it leaves any other way (a failed or
/// panicking setup), the gate opens with the failure.
struct Arrival<'a>(Option<&'a StartGate>);

impl Arrival<'_> {
    /// This loop is built: see [`StartGate::arrive_and_wait`].
    fn arrive_and_wait(mut self) -> bool {
        self.0.take().is_some_and(StartGate::arrive_and_wait)
    }
}

impl Drop for Arrival<'_> {
    fn drop(&mut self) {
        if let Some(gate) = self.0.take() {
            gate.fail();
        }
    }
}

/// Holds every loop until all are built, or lets them all go at once when one failed.
struct StartGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

struct GateState {
    /// Loops not yet built.
    waiting_for: usize,
    has_failed: bool,
}

impl StartGate {
    fn new(loops: usize) -> Self {
        StartGate {
            state: Mutex::new(GateState {
                waiting_for: loops,
                has_failed: false,
            }),
            changed: Condvar::new(),
        }
    }

    /// This loop is built; waits for the others. Returns whether every loop was built
    /// (`false`: one failed, so this one must not serve).
    fn arrive_and_wait(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.waiting_for = state.waiting_for.saturating_sub(1);
        self.changed.notify_all();
        let state = self
            .changed
            .wait_while(state, |s| s.waiting_for > 0 && !s.has_failed)
            .unwrap_or_else(PoisonError::into_inner);
        !state.has_failed
    }

    /// Waits until every loop was built or one failed. Returns whether every loop was
    /// built (the loops serve now).
    fn wait_open(&self) -> bool {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let state = self
            .changed
            .wait_while(state, |s| s.waiting_for > 0 && !s.has_failed)
            .unwrap_or_else(PoisonError::into_inner);
        !state.has_failed
    }

    /// A loop could not be built or started: open the gate for the others to leave.
    fn fail(&self) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.has_failed = true;
        self.changed.notify_all();
    }
}
