//! Where a connection's life is recorded and ended: every event of a loop passes through
//! its [`LoopLog`], and every connection the server ends goes through [`close`].
//!
//! One place for each, so that what must reach every model is written once: the log lines
//! today, per-loop counters and a lingering close later.

use super::ACCEPT_PAUSE;
use crate::net::{Peer, Stream};
use std::io;
use std::time::Duration;

/// Why the server ends a connection.
#[derive(Debug)]
pub enum CloseReason {
    /// Everything owed was sent and nothing more will be read (the peer half-closed, the
    /// protocol said goodbye, or the drain sent the rest): the peer reads EOF after the
    /// last reply.
    Finished,
    /// Nothing arrived for `--idle-timeout`.
    Idle(Duration),
    /// `--max-conns` connections were already open.
    OverLimit(usize),
    /// The protocol handler panicked (already logged with the panic message).
    HandlerPanicked,
    /// The drain timeout passed with `owed` bytes still unsent.
    DrainTimeout {
        /// Bytes the peer never got.
        owed: usize,
    },
    /// The model cannot watch this connection (select's `FD_SETSIZE`, a failed
    /// `epoll_ctl`, a failed switch to non-blocking mode).
    CannotWatch(String),
    /// A read or write failed: the peer reset or went away.
    Failed(io::Error),
}

/// Why a datagram got no answer.
#[derive(Debug)]
pub enum DatagramDrop<'a> {
    /// Its source may be spoofed to turn the server into a reflector.
    ReflectionGuard,
    /// The protocol handler panicked (already logged).
    HandlerPanicked,
    /// `sendto` failed.
    SendFailed(&'a io::Error),
}

/// The one place every connection event of one loop (or thread) passes: accepted, refused,
/// closed with its reason, bytes in and out, datagrams answered and dropped, accepts
/// paused. It writes the log lines now; counters per loop belong here too.
#[derive(Debug, Default)]
pub struct LoopLog {}

impl LoopLog {
    /// A connection was accepted on `listener` and admitted.
    pub fn accepted(&self, peer: &Peer, listener: &str) {
        tracing::debug!("accepted {peer} on {listener}");
    }

    /// A connection ended for `reason`.
    pub fn closed(&self, peer: &Peer, reason: &CloseReason) {
        match reason {
            CloseReason::Finished | CloseReason::HandlerPanicked => {}
            CloseReason::Idle(timeout) => tracing::info!(
                "closing {peer}: idle for {:.1} s (--idle-timeout)",
                timeout.as_secs_f64()
            ),
            CloseReason::OverLimit(max_conns) => tracing::warn!(
                "refusing {peer}: already {max_conns} connections open (--max-conns)"
            ),
            CloseReason::DrainTimeout { owed } => {
                tracing::warn!("closing {peer}: drain timeout with {owed} bytes still owed");
            }
            CloseReason::CannotWatch(why) => tracing::warn!("closing {peer}: {why}"),
            CloseReason::Failed(e) => tracing::debug!("connection {peer} ended: {e}"),
        }
    }

    /// `bytes` arrived from a peer.
    pub fn received(&self, bytes: usize) {
        let _ = bytes;
    }

    /// The kernel took `bytes` owed to a peer.
    pub fn sent(&self, bytes: usize) {
        let _ = bytes;
    }

    /// A datagram from `peer` was answered with `bytes`.
    pub fn answered(&self, peer: &Peer, bytes: usize) {
        let _ = (peer, bytes);
    }

    /// A datagram from `peer` got no answer.
    pub fn dropped(&self, peer: &Peer, reason: &DatagramDrop<'_>) {
        match reason {
            DatagramDrop::ReflectionGuard => {
                tracing::debug!("dropping a datagram from {peer}: reflection guard");
            }
            DatagramDrop::HandlerPanicked => {}
            DatagramDrop::SendFailed(e) => super::datagram::log_dropped_reply(peer, e),
        }
    }

    /// Accepting on `listener` failed for want of descriptors or memory; it pauses for
    /// [`ACCEPT_PAUSE`].
    pub fn accept_paused(&self, listener: &str, error: &io::Error) {
        tracing::warn!(
            "accept on {listener} failed: {error}; pausing accepts for {} ms",
            ACCEPT_PAUSE.as_millis()
        );
    }
}

/// Ends a connection: the one way the server closes one, whatever the model.
///
/// A finished connection shuts down its sending side first, so the peer reads EOF after
/// the last reply; every other reason just closes the descriptor.
pub fn close(stream: Stream, peer: &Peer, reason: CloseReason, log: &LoopLog) {
    if matches!(reason, CloseReason::Finished) {
        // The peer may be gone already; closing is all that is left either way.
        let _ = stream.shutdown_write();
    }
    log.closed(peer, &reason);
    drop(stream);
}
