//! Process per connection: `fork(2)` a child for every client.
//!
//! Technique: a single-threaded parent waits on every listener with `poll(2)`, accepts,
//! and forks; the child serves that one client and exits (`socketserver.ForkingTCPServer`,
//! step 4 of the ladder). Datagrams get a child each too, as `ForkingUDPServer` does.
//! Cost: a fork per client (page tables copied, copy-on-write faults) and a process each.
//! Limit: processes are the heaviest unit of concurrency; the parent must reap every child
//! (or zombies pile up; `server::children` does, and kills one stuck at shutdown) and must
//! stay single-threaded to fork safely.
//!
//! Idle timeouts: the scan, over the one connection a thread (or child) serves: its
//! `poll` waits no longer than that connection's idle deadline.

use crate::net::DatagramSocket;
use crate::server::children::Children;
use crate::server::one_socket::{LingerOn, serve_connection};
use crate::server::{
    ACCEPT_PAUSE, Accepted, CloseReason, DatagramReplier, Listeners, LoopLog, Protocol, Receipt,
    RunOptions, ServeError, Shutdown, accept_and_admit, receive_datagram, stream_transport,
};
use crate::server::{DatagramDrop, datagram_transport};
use crate::sys::poll::{self, POLLIN};
use crate::sys::process::{self, Forked};
use std::io;
use std::os::fd::AsFd;
use std::panic::{self, AssertUnwindSafe};
use std::time::{Duration, Instant};

/// How often the parent wakes to reap children when nothing else happens; a zombie waits
/// at most this long.
const REAP_INTERVAL: Duration = Duration::from_millis(200);

/// Serves every listener with a child per connection until `shutdown` fires, then waits
/// for the children to drain.
///
/// # Errors
///
/// A listener that broke, or `fork` refusing a parent that has threads.
pub fn run(
    mut listeners: Listeners,
    protocol: Protocol,
    shutdown: Shutdown,
    options: RunOptions,
) -> Result<(), ServeError> {
    for listener in &listeners.streams {
        listener.set_nonblocking(true)?;
    }
    for socket in &listeners.datagrams {
        socket.set_nonblocking(true)?;
    }
    let RunOptions {
        threads: _,
        on_serving,
    } = options;
    let most = (listeners.datagrams.iter()).map(DatagramSocket::max_datagram_bytes);
    let (metrics, drain_timeout) = (listeners.limits.metrics, listeners.limits.drain_timeout);
    let mut parent = Parent {
        buf: vec![0u8; most.max().unwrap_or(0)],
        replier: DatagramReplier::new(protocol.clone()),
        log: LoopLog::new(metrics),
        children: Children::default(),
        listeners: &mut listeners,
        protocol: &protocol,
        shutdown: &shutdown,
        paused_until: None,
    };
    on_serving.serving();
    loop {
        parent.children.reap(metrics, &parent.log)?;
        let now = Instant::now();
        let pause = (parent.paused_until).and_then(|end| end.checked_duration_since(now));
        let Parent { listeners, .. } = &parent;
        // During an accept pause the listeners are not watched (they stay readable), but
        // datagrams are still answered and children still reaped.
        let listening = if pause.is_some() { 0 } else { POLLIN };
        let streams = listeners
            .streams
            .iter()
            .map(|l| poll::entry(l.as_fd(), listening));
        let sockets = listeners.datagrams.iter().map(AsFd::as_fd);
        let fds = sockets.chain([parent.shutdown.fd()]);
        let mut entries: Vec<_> = streams
            .chain(fds.map(|fd| poll::entry(fd, POLLIN)))
            .collect();
        let timeout = pause.map_or(REAP_INTERVAL, |left| left.min(REAP_INTERVAL));
        poll::poll(&mut entries, Some(timeout))?;
        if entries.last().is_some_and(|e| e.revents != 0) {
            break;
        }
        let streams = listeners.streams.len();
        for (index, entry) in entries[..entries.len() - 1].iter().enumerate() {
            match (entry.revents != 0, index.checked_sub(streams)) {
                (false, _) => {}
                (true, None) => parent.accept_one(index)?,
                (true, Some(index)) => parent.answer_one(index)?,
            }
        }
    }
    // While the children drain, new clients are refused rather than left in the backlog.
    close_listeners(parent.listeners);
    (parent.children).wait_for_drain(drain_timeout, metrics, &parent.log)?;
    Ok(())
}

/// Forks, or says why this one client goes unserved: the OS out of processes (`EAGAIN`
/// from RLIMIT_NPROC or pid_max, `ENOMEM`: fork(2)) costs only that client, as a thread
/// that cannot start does in `threaded`.
///
/// # Errors
///
/// Refusing to fork a parent that has threads: a bug in reverb, which ends the server.
fn fork_or_why() -> io::Result<Result<Forked, String>> {
    match process::fork() {
        Ok(forked) => Ok(Ok(forked)),
        Err(e) if e.raw_os_error().is_some() => Ok(Err(format!("cannot start a process: {e}"))),
        Err(e) => Err(e),
    }
}

/// The single-threaded parent: what it serves, and the children serving it.
struct Parent<'a> {
    listeners: &'a mut Listeners,
    protocol: &'a Protocol,
    shutdown: &'a Shutdown,
    /// Each child holds its place under --max-conns until the parent reaps it.
    children: Children,
    replier: DatagramReplier,
    /// Receives datagrams: the longest any datagram socket answers.
    buf: Vec<u8>,
    /// The parent's own counters (accepts); every child counts in a slot of its own.
    log: LoopLog,
    /// Accepting stops until then after the process ran out of descriptors.
    paused_until: Option<Instant>,
}

impl Parent<'_> {
    fn accept_one(&mut self, index: usize) -> io::Result<()> {
        let (listener, counter) = (&self.listeners.streams[index], &self.listeners.counter);
        let (stream, peer, admission) = match accept_and_admit(listener, counter, &self.log)? {
            Accepted::Connection(stream, peer, admission) => (stream, peer, admission),
            Accepted::Again | Accepted::Empty => return Ok(()),
            Accepted::Paused => {
                self.paused_until = Some(Instant::now() + ACCEPT_PAUSE);
                return Ok(());
            }
        };
        match fork_or_why()? {
            Err(why) => {
                let transport = stream_transport(&stream);
                self.log
                    .closed(&peer, transport, &CloseReason::CannotWatch(why));
                Ok(())
            }
            Ok(Forked::Child) => {
                let limits = self.listeners.limits.clone();
                close_listeners(self.listeners);
                let (protocol, shutdown) = (self.protocol, self.shutdown);
                let linger = LingerOn::ThisThread;
                run_child(|| {
                    serve_connection(stream, peer, protocol, &limits, shutdown, linger, || {})
                })
            }
            Ok(Forked::Parent(pid)) => {
                tracing::debug!(peer = %peer, "child {pid} serves it");
                // The child has its own copy; the parent's must close, or the peer would
                // never see EOF after the child exits.
                let transport = stream_transport(&stream);
                drop(stream);
                (self.children).serving_connection(pid, admission, peer, transport);
                Ok(())
            }
        }
    }

    fn answer_one(&mut self, index: usize) -> io::Result<()> {
        let socket = &self.listeners.datagrams[index];
        let buf = &mut self.buf[..socket.max_datagram_bytes()];
        // One too large is dropped here, without a child: the parent counts it.
        let Receipt::Datagram(received, peer) = receive_datagram(socket, buf, &self.log)? else {
            return Ok(());
        };
        match fork_or_why()? {
            Err(why) => {
                let (transport, e) = (datagram_transport(socket), io::Error::other(why));
                self.log
                    .dropped(&peer, transport, &DatagramDrop::SendFailed(&e));
                Ok(())
            }
            Ok(Forked::Child) => {
                let socket = self.listeners.datagrams.swap_remove(index);
                close_listeners(self.listeners);
                let (metrics, replier) = (self.listeners.limits.metrics, &mut self.replier);
                run_child(|| {
                    // The child's own slot, in the mapping its parent's metrics server
                    // reads: the parent's log has one writer, the parent.
                    let log = LoopLog::new(metrics);
                    replier.answer(&socket, &peer, &self.buf[..received], &log);
                })
            }
            Ok(Forked::Parent(pid)) => {
                self.children.serving_datagram(pid);
                Ok(())
            }
        }
    }
}

/// Closes the listeners and datagram sockets, leaving the Unix socket files alone. In a
/// child, so that only the parent holds them and a child that outlives the parent does not
/// keep the port bound (the files are the parent's); in the parent, when the drain begins.
fn close_listeners(listeners: &mut Listeners) {
    listeners.streams.clear();
    listeners.datagrams.clear();
}

/// Runs the child's work and exits without unwinding into the parent's stack frames,
/// whose destructors (removing socket files, joining nothing) belong to the parent.
fn run_child(work: impl FnOnce()) -> ! {
    let code = match panic::catch_unwind(AssertUnwindSafe(work)) {
        Ok(()) => 0,
        Err(_) => 1,
    };
    process::exit_now(code)
}
