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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::thread;
    use std::time::{Duration, Instant};

    /// How long one `run_loops` under test may take: a gate that never opens fails the
    /// test within this instead of hanging it.
    const LIMIT: Duration = Duration::from_secs(10);

    /// How long the last loop's setup takes, so the others reach the gate well before it.
    const SLOW_SETUP: Duration = Duration::from_millis(200);

    /// What a loop's setup does.
    #[derive(Clone, Copy, PartialEq)]
    enum Setup {
        Builds,
        Fails,
        Panics,
    }

    /// What one `run_loops` did.
    #[derive(Default)]
    struct Outcome {
        /// `run_loops`'s error, as text (`None`: it returned `Ok`).
        error: Option<String>,
        /// Each loop that served: its item, how many loops were built when it began, the
        /// name of its thread, and whether it saw the shutdown fire.
        served: Vec<(usize, usize, String, bool)>,
        /// How many loops were built at each announcement.
        announced: Vec<usize>,
    }

    /// Runs `run_loops` over `loops` items on a thread named `caller`, the last loop's
    /// setup slow, loop `odd` set up (or, when `serve_fails`, served) as `setup` says;
    /// fails the test if it does not return within [`LIMIT`].
    fn run(loops: usize, odd: usize, setup: Setup, serve_fails: bool) -> Outcome {
        let outcome = Arc::new(Mutex::new(Outcome::default()));
        let built = Arc::new(AtomicUsize::new(0));
        let (done, finished) = mpsc::channel();
        let (log, count) = (Arc::clone(&outcome), Arc::clone(&built));
        let on_serving = OnServing::new(move || {
            let built = count.load(Ordering::SeqCst);
            log.lock().unwrap().announced.push(built);
        });
        let (log, count) = (Arc::clone(&outcome), Arc::clone(&built));
        thread::Builder::new()
            .name("caller".into())
            .spawn(move || {
                let shutdown = Shutdown::new().expect("an eventfd");
                let build = |index: usize, item: usize| {
                    assert_eq!(index, item, "each loop gets its own item");
                    if index == loops - 1 {
                        thread::sleep(SLOW_SETUP);
                    }
                    match (index == odd && !serve_fails, setup) {
                        (true, Setup::Fails) => Err(io::Error::other("no ring")),
                        (true, Setup::Panics) => panic!("a setup panicked"),
                        _ => {
                            count.fetch_add(1, Ordering::SeqCst);
                            Ok(item)
                        }
                    }
                };
                let serve = |item: usize| {
                    let built = count.load(Ordering::SeqCst);
                    let name = thread::current().name().unwrap_or_default().to_owned();
                    if serve_fails && item == odd {
                        log.lock().unwrap().served.push((item, built, name, false));
                        return Err(io::Error::other("lost the ring"));
                    }
                    // The others serve until the shutdown (bounded: a test never hangs).
                    let started = Instant::now();
                    while serve_fails && !shutdown.is_fired() && started.elapsed() < LIMIT {
                        thread::sleep(Duration::from_millis(5));
                    }
                    let saw = shutdown.is_fired();
                    log.lock().unwrap().served.push((item, built, name, saw));
                    Ok(())
                };
                let items = (0..loops).collect();
                let result = run_loops("test", items, &shutdown, &on_serving, build, serve);
                let _ = done.send(result.err().map(|e| e.to_string()));
            })
            .expect("a thread");
        let error = finished
            .recv_timeout(LIMIT)
            .expect("run_loops returns (a start gate that never opens hangs it)");
        // One loop is announced from a thread of its own, which may end after the loop.
        let started = Instant::now();
        while error.is_none()
            && outcome.lock().unwrap().announced.is_empty()
            && started.elapsed() < LIMIT
        {
            thread::sleep(Duration::from_millis(5));
        }
        let mut outcome = std::mem::take(&mut *outcome.lock().unwrap());
        outcome.error = error;
        outcome.served.sort();
        outcome
    }

    fn served(loops: &[(usize, usize, &str, bool)]) -> Vec<(usize, usize, String, bool)> {
        (loops.iter())
            .map(|&(item, built, name, saw)| (item, built, name.to_owned(), saw))
            .collect()
    }

    #[test]
    fn several_loops_serve_and_are_announced_once_every_loop_is_built() {
        let outcome = run(3, 0, Setup::Builds, false);
        assert_eq!(outcome.error, None);
        assert_eq!(
            outcome.served,
            served(&[
                (0, 3, "reverb-test-0", false),
                (1, 3, "reverb-test-1", false),
                (2, 3, "reverb-test-2", false),
            ]),
            "every loop serves on its own thread, none before the slow one is built"
        );
        assert_eq!(
            outcome.announced,
            [3],
            "one announcement, after every setup"
        );
    }

    #[test]
    fn one_loop_serves_on_the_calling_thread_and_is_announced() {
        let outcome = run(1, 0, Setup::Builds, false);
        assert_eq!(outcome.error, None);
        assert_eq!(outcome.served, served(&[(0, 1, "caller", false)]));
        assert_eq!(outcome.announced, [1]);
    }

    #[test]
    fn a_loop_that_cannot_be_built_lets_the_others_go_unannounced() {
        for odd in [0, 2] {
            let outcome = run(3, odd, Setup::Fails, false);
            assert_eq!(
                outcome.error.as_deref(),
                Some(format!("cannot start test loop {odd}: no ring").as_str())
            );
            assert!(outcome.served.is_empty(), "loop {odd}: a loop served");
            assert!(outcome.announced.is_empty(), "loop {odd}: announced");
        }
    }

    #[test]
    fn a_setup_that_panics_lets_the_others_go_unannounced() {
        let outcome = run(3, 2, Setup::Panics, false);
        assert_eq!(outcome.error.as_deref(), Some("a test loop panicked"));
        assert!(outcome.served.is_empty(), "a loop served");
        assert!(outcome.announced.is_empty(), "announced");
    }

    #[test]
    fn a_loop_that_fails_while_serving_shuts_the_others_down() {
        let outcome = run(3, 1, Setup::Builds, true);
        assert_eq!(outcome.error.as_deref(), Some("lost the ring"));
        assert_eq!(
            outcome.served,
            served(&[
                (0, 3, "reverb-test-0", true),
                (1, 3, "reverb-test-1", false),
                (2, 3, "reverb-test-2", true),
            ])
        );
    }
}
