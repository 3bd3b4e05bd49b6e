//! The deadline for a connection's setup: its PROXY header and its TLS handshake must be
//! done a fixed time after accept, however slowly the peer trickles bytes (a slowloris
//! resets an idle timer with every byte; this deadline it cannot move).
//!
//! One watcher thread per process keeps the deadlines in a heap. It holds a duplicate of
//! each watched socket's descriptor, so when a deadline passes with setup unfinished it
//! shuts the socket down (`shutdown(2)`, both ways): whatever model serves the connection
//! then sees its end as it would any peer's, and closes it by its usual path. The
//! duplicate is released the moment setup finishes, so a connection holds it only while
//! it is being set up; and because it is a descriptor of our own, a number reused by a
//! later socket can never be shut down by mistake. This works the same for threads,
//! event loops, completions and forked children (a child starts its own watcher).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// What a watched connection is still waiting for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetupStage {
    /// The PROXY protocol header.
    ProxyHeader,
    /// The end of the TLS handshake.
    TlsHandshake,
}

/// One connection's watch: shared by the connection and the watcher.
#[derive(Debug)]
pub struct SetupWatch {
    state: Mutex<WatchState>,
}

#[derive(Debug)]
struct WatchState {
    /// The duplicate descriptor; `None` once setup finished or the deadline fired.
    fd: Option<OwnedFd>,
    stage: SetupStage,
    has_fired: bool,
}

impl SetupWatch {
    /// Whether the watcher closed this connection (and logged why).
    pub fn has_fired(&self) -> bool {
        self.lock().has_fired
    }

    /// Setup moved on to `stage`.
    pub fn set_stage(&self, stage: SetupStage) {
        self.lock().stage = stage;
    }

    /// Setup is done: release the duplicate descriptor now.
    pub fn finish(&self) {
        self.lock().fd = None;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WatchState> {
        // A poisoned lock only means a panic elsewhere; the state is plain data.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

struct Due {
    at: Instant,
    watch: Arc<SetupWatch>,
    /// Each stage's deadline after accept.
    proxy_timeout: Duration,
    handshake_timeout: Duration,
    accepted: Instant,
    peer: String,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Due {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.at.cmp(&other.at)
    }
}

struct Watcher {
    heap: Mutex<BinaryHeap<Reverse<Due>>>,
    wake: Condvar,
}

/// The process's watcher; after `fork` the child has no threads, so it keys on the pid.
///
/// # Errors
///
/// The thread cannot be started (the process or its cgroup is out of threads); the next
/// call tries again.
fn watcher() -> io::Result<Arc<Watcher>> {
    static WATCHER: Mutex<Option<(u32, Arc<Watcher>)>> = Mutex::new(None);
    let pid = std::process::id();
    let mut slot = WATCHER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((owner, watcher)) = slot.as_ref()
        && *owner == pid
    {
        return Ok(watcher.clone());
    }
    let watcher = Arc::new(Watcher {
        heap: Mutex::new(BinaryHeap::new()),
        wake: Condvar::new(),
    });
    let running = watcher.clone();
    std::thread::Builder::new()
        .name("setup-deadline".into())
        .spawn(move || run(&running))?;
    *slot = Some((pid, watcher.clone()));
    Ok(watcher)
}

/// Watches a connection whose setup starts at `stage`: the PROXY header is due
/// `proxy_timeout` after now, the TLS handshake `handshake_timeout` after now.
///
/// # Errors
///
/// The descriptor cannot be duplicated (the process is out of descriptors), or the
/// watcher thread cannot be started. The deadline cannot be kept then, so the caller
/// refuses the connection: serving it without one would let a slowloris hold it.
pub fn watch(
    socket: BorrowedFd<'_>,
    stage: SetupStage,
    peer: String,
    proxy_timeout: Duration,
    handshake_timeout: Duration,
) -> io::Result<Arc<SetupWatch>> {
    let watcher = watcher()?;
    let fd = socket.try_clone_to_owned()?;
    let watch = Arc::new(SetupWatch {
        state: Mutex::new(WatchState {
            fd: Some(fd),
            stage,
            has_fired: false,
        }),
    });
    let accepted = Instant::now();
    let first = match stage {
        SetupStage::ProxyHeader => proxy_timeout,
        SetupStage::TlsHandshake => handshake_timeout,
    };
    let mut heap = watcher
        .heap
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    heap.push(Reverse(Due {
        at: accepted + first,
        watch: watch.clone(),
        proxy_timeout,
        handshake_timeout,
        accepted,
        peer,
    }));
    drop(heap);
    watcher.wake.notify_one();
    Ok(watch)
}

fn run(watcher: &Watcher) {
    let mut heap = watcher
        .heap
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    loop {
        let now = Instant::now();
        let wait = match heap.peek() {
            None => Duration::from_secs(3600),
            Some(Reverse(due)) if due.at > now => due.at - now,
            Some(_) => {
                let Some(Reverse(due)) = heap.pop() else {
                    continue;
                };
                if let Some(later) = expire(due) {
                    heap.push(Reverse(later));
                }
                continue;
            }
        };
        heap = watcher
            .wake
            .wait_timeout(heap, wait)
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0;
    }
}

/// Acts on a deadline that came: nothing if setup finished, a later deadline if the
/// connection moved on to a stage that is due later, otherwise the socket is shut down.
fn expire(due: Due) -> Option<Due> {
    let mut state = due.watch.lock();
    let fd = state.fd.take()?;
    let timeout = match state.stage {
        SetupStage::ProxyHeader => due.proxy_timeout,
        SetupStage::TlsHandshake => due.handshake_timeout,
    };
    let stage_deadline = due.accepted + timeout;
    if stage_deadline > Instant::now() {
        state.fd = Some(fd);
        drop(state);
        return Some(Due {
            at: stage_deadline,
            ..due
        });
    }
    state.has_fired = true;
    let what = match state.stage {
        SetupStage::ProxyHeader => "no PROXY protocol header",
        SetupStage::TlsHandshake => "TLS handshake not finished",
    };
    tracing::warn!(
        peer = %due.peer,
        "closing: {what} within {:.1} s of accept",
        timeout.as_secs_f64()
    );
    // Failing means the peer is already gone; the model closes the connection either way.
    let _ = socket2::SockRef::from(&fd).shutdown(std::net::Shutdown::Both);
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;
    use std::thread;

    const LONG: Duration = Duration::from_secs(60);

    /// A connection `ours` and its peer, watched from `stage` with the two timeouts.
    fn watched(
        stage: SetupStage,
        proxy_timeout: Duration,
        handshake_timeout: Duration,
    ) -> (Arc<SetupWatch>, UnixStream, UnixStream) {
        let (ours, peer) = UnixStream::pair().unwrap();
        let watch = watch(
            ours.as_fd(),
            stage,
            "peer".into(),
            proxy_timeout,
            handshake_timeout,
        )
        .unwrap();
        (watch, ours, peer)
    }

    /// Whether the watcher has shut `ours` down: its peer reads EOF.
    fn is_cut(peer: &mut UnixStream) -> bool {
        peer.set_nonblocking(true).unwrap();
        let mut byte = [0u8; 1];
        matches!(peer.read(&mut byte), Ok(0))
    }

    /// Waits up to `limit` for the watcher to shut `ours` down.
    fn is_cut_within(peer: &mut UnixStream, limit: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < limit {
            if is_cut(peer) {
                return true;
            }
            thread::sleep(Duration::from_millis(10));
        }
        false
    }

    #[test]
    fn the_process_has_one_watcher() {
        assert!(Arc::ptr_eq(&watcher().unwrap(), &watcher().unwrap()));
    }

    /// A connection whose PROXY header came in time is due at the handshake's deadline,
    /// counted from accept, not at the header's.
    #[test]
    fn a_later_stage_is_due_at_its_own_deadline() {
        // The stage moves on well within the header's deadline, however loaded the
        // machine; the check comes between the two deadlines.
        let (watch, _ours, mut peer) = watched(
            SetupStage::ProxyHeader,
            Duration::from_secs(1),
            Duration::from_secs(3),
        );
        watch.set_stage(SetupStage::TlsHandshake);
        thread::sleep(Duration::from_millis(1800));
        assert!(!is_cut(&mut peer), "cut at the PROXY header's deadline");
        assert!(!watch.has_fired());
        assert!(is_cut_within(&mut peer, Duration::from_secs(5)));
        assert!(watch.has_fired());
    }

    /// A connection that finished its setup is never cut.
    #[test]
    fn a_finished_setup_is_not_cut() {
        // Finished well within the deadline, however loaded the machine.
        let (watch, _ours, mut peer) =
            watched(SetupStage::TlsHandshake, LONG, Duration::from_secs(1));
        watch.finish();
        thread::sleep(Duration::from_millis(1500));
        assert!(!is_cut(&mut peer));
        assert!(!watch.has_fired());
    }

    /// The earliest deadline is kept first, whichever order the connections came in.
    #[test]
    fn deadlines_fire_in_order_of_time_whatever_order_they_came_in() {
        let short = Duration::from_millis(200);
        // A long one, then a short one.
        let (long_first, _a, _a_peer) = watched(SetupStage::ProxyHeader, LONG, LONG);
        let (_, _b, mut b_peer) = watched(SetupStage::ProxyHeader, short, LONG);
        assert!(
            is_cut_within(&mut b_peer, Duration::from_secs(3)),
            "a deadline after a later one was late"
        );
        // A short one, then a long one.
        let (_, _c, mut c_peer) = watched(SetupStage::ProxyHeader, short, LONG);
        let (long_last, _d, _d_peer) = watched(SetupStage::ProxyHeader, LONG, LONG);
        assert!(
            is_cut_within(&mut c_peer, Duration::from_secs(3)),
            "a deadline before a later one was late"
        );
        long_first.finish();
        long_last.finish();
    }

    /// While a deadline is pending (and after it moved on to a later stage), the watcher
    /// sleeps until it is due: a new connection is watched at once, not held up on the
    /// watcher's lock until the pending deadline passes.
    #[test]
    fn a_pending_deadline_holds_up_no_new_watch() {
        let (pending, _ours, _peer) = watched(
            SetupStage::ProxyHeader,
            Duration::from_millis(100),
            Duration::from_secs(3),
        );
        pending.set_stage(SetupStage::TlsHandshake);
        thread::sleep(Duration::from_millis(300));
        let start = Instant::now();
        let (next, _next_ours, _next_peer) = watched(SetupStage::ProxyHeader, LONG, LONG);
        let took = start.elapsed();
        assert!(
            took < Duration::from_secs(1),
            "a new watch waited {took:?} for a pending deadline"
        );
        pending.finish();
        next.finish();
    }
}
