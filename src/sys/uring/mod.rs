//! Bindings to io_uring (Linux 5.19+): operations go into a submission ring, results come
//! back on a completion ring, and in between the kernel reads and writes our buffers.
//!
//! io-uring's `push` is `unsafe` because the kernel may use an operation's buffers until
//! that operation's completion arrives. [`Ring`] keeps that promise once, for every
//! operation it offers: each buffer lives in its operation's slot, and a slot is freed only
//! when every operation on it has completed, even after the model closed it (closing
//! cancels the operations, then waits for their completions). Above this module nothing
//! can free a buffer too early, and no model ever sees a raw pointer.
//!
//! Each file holds one of the promises the kernel relies on:
//! - `key.rs`: a completion's `user_data` names the slot's token and the operation, so a
//!   late completion for a reused slot is recognised as stale;
//! - `provided.rs`: receive buffers the kernel picks from; a completion hands one to us,
//!   as a [`Received`] that names it, until we give it back;
//! - `message.rs`: datagram message headers, which point into themselves and must not
//!   move while the kernel holds them;
//! - `setup.rs`: the probe before anything is bound, and the ring's set-up;
//! - `ring.rs`: the slots, their operations in flight, and the completions; and the
//!   registered file table that names each socket in its sends, kept in step with the
//!   slots by updates queued in order with the operations.
//!
//! A receive is armed with a byte *budget* (multishot, with the budget as its total limit,
//! on Linux 6.17+; single-shot, with the budget as its length, before that), so the kernel
//! itself never delivers more than the model said it can take: that is how `--max-buffer`
//! holds without copying input aside.

mod key;
mod message;
mod provided;
mod ring;
mod setup;

pub use message::ReceivedDatagram;
pub use provided::Received;
pub use ring::{Completion, Ring, SentBytes};
pub use setup::{explain_setup_error, probe};

#[cfg(test)]
mod tests;
