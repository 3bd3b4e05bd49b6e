//! `Connection`: one stream peer's protocol session, its owed bytes, and where it stands.
//!
//! Models own the socket and the waiting; this type owns every decision about bytes, so
//! that half-close, backpressure and panic isolation are written once for all models.
//! The layers of [`crate::layer`] (a PROXY protocol header, TLS, the greeting template)
//! sit inside it, between the socket's bytes and the session, so every model gets them
//! without a line of its own: a model offers [`Connection::unsent`] to the kernel and
//! hands what it read to [`Connection::receive`], whatever the connection speaks.

use super::Limits;
use super::lifecycle::{CloseReason, LoopLog};
use super::setup_deadline::{self, SetupStage, SetupWatch};
use crate::buffer::WriteBuffer;
use crate::layer::greeting::Greeting;
use crate::layer::proxy::{ProxyAddresses, ProxyHeader, ProxyLayer, ProxyProgress};
use crate::layer::tls::{TlsInput, TlsLayer};
use crate::metrics::Transport;
use crate::net::{Peer, Stream};
use crate::protocol::{Flow, Protocol, Session};
use std::cell::Cell;
use std::io;
use std::os::fd::BorrowedFd;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;

/// Above this many bytes, an output allocation with nothing in it is given back, so an
/// idle TLS connection holds little memory (its plaintext was already encrypted).
const RELEASE_IDLE_BUFFER_BYTES: usize = 16 * 1024;

/// What one read of a peer's socket did ([`Connection::read_some`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadOutcome {
    /// Input or the peer's EOF arrived.
    pub has_arrived: bool,
    /// The socket may still hold input this read did not take: the read filled all it
    /// asked for, was interrupted, or was not made (the bound allowed none). A loop that
    /// is told of input only when more arrives (edge-triggered epoll) must read again
    /// without waiting; one told while any is queued (level-triggered) need not care.
    pub may_hold_more: bool,
}

/// The connection's handler panicked; it was logged, and the model should close it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandlerPanicked;

/// One stream peer, from accept to close.
///
/// `repr(C)`: the fields every message reads (the flags, the owed bytes, the layers) come
/// first and share a cache line; the session and the peer's address, which a plain echo
/// does not touch per message, come last. A loop serving many connections finds each one's
/// state out of cache after the kernel's work, so every extra line is a miss per message.
#[derive(Debug)]
#[repr(C)]
pub struct Connection {
    /// Whether we still read this peer: false after its EOF, after the protocol asked to
    /// close, after a layer refused its bytes, and during drain.
    is_reading: bool,
    /// Whether the peer half-closed (rather than the protocol or a drain stopping us).
    has_seen_eof: bool,
    /// Whether the protocol handler panicked: nothing more is read, and the replies owed
    /// before the panic still go out.
    has_panicked: bool,
    /// Whether the session is stream `echo` ([`Session::echoes_input`]), kept here so the
    /// per-message decisions need not read the session.
    echoes_input: bool,
    /// What the socket is, for the counters (the peer may change with a PROXY header).
    transport: Transport,
    /// Plaintext owed to the peer; with TLS it is encrypted into `Layers::wire` as soon as
    /// the handshake allows.
    out: WriteBuffer,
    /// `None` for a plain connection, which then costs nothing extra.
    layers: Option<Box<Layers>>,
    session: Session,
    peer: Peer,
}

/// The per-connection state of the layers.
#[derive(Debug)]
struct Layers {
    /// Present until the PROXY header is complete.
    proxy: Option<ProxyLayer>,
    tls: Option<TlsLayer>,
    /// Ciphertext owed to the peer (TLS only).
    wire: WriteBuffer,
    greeting: Option<Arc<Greeting>>,
    /// The address the client reached: the socket's, or the PROXY header's destination.
    local: Option<Peer>,
    /// Whether the session has been told the peer connected.
    has_started: bool,
    /// A layer refused the peer's bytes: send only what is already owed (an alert).
    has_failed: bool,
    /// The setup was refused (a bad PROXY header, a failed TLS handshake, the setup
    /// deadline), rather than stopped by a drain.
    is_rejected: bool,
    watch: Option<Arc<SetupWatch>>,
}

impl Connection {
    /// A new connection on `socket`, its greeting (if any) already owed unless a PROXY
    /// header must come first.
    pub fn new(protocol: &Protocol, peer: Peer, limits: &Limits, socket: BorrowedFd<'_>) -> Self {
        let session = protocol.new_session();
        let mut connection = Connection {
            echoes_input: session.echoes_input(),
            session,
            out: WriteBuffer::new(limits.max_buffer_bytes),
            is_reading: true,
            has_seen_eof: false,
            has_panicked: false,
            transport: match peer {
                Peer::Ip(_) => Transport::Tcp,
                Peer::Unix(_) => Transport::Unix,
            },
            layers: None,
            peer,
        };
        let settings = &limits.layers;
        if !settings.proxy_protocol && settings.tls.is_none() && settings.greeting.is_none() {
            connection.session.on_connect(&mut connection.out);
            return connection;
        }
        let tls = match settings.tls.as_ref().map(|config| config.new_layer()) {
            None => None,
            Some(Ok(layer)) => Some(layer),
            Some(Err(e)) => {
                tracing::warn!(peer = %connection.peer, "closing: cannot start TLS: {e}");
                connection.is_reading = false;
                return connection;
            }
        };
        let stage = match (settings.proxy_protocol, &tls) {
            (true, _) => Some(SetupStage::ProxyHeader),
            (false, Some(_)) => Some(SetupStage::TlsHandshake),
            (false, None) => None,
        };
        let watch = stage.map(|stage| {
            setup_deadline::watch(
                socket,
                stage,
                connection.peer.to_string(),
                settings.proxy_timeout,
                settings.tls_handshake_timeout,
            )
        });
        let watch = match watch.transpose() {
            Ok(watch) => watch,
            Err(e) => {
                tracing::warn!(peer = %connection.peer, "closing: cannot keep its setup deadline: {e}");
                connection.is_reading = false;
                return connection;
            }
        };
        connection.layers = Some(Box::new(Layers {
            proxy: settings.proxy_protocol.then(ProxyLayer::new),
            tls,
            wire: WriteBuffer::new(limits.max_buffer_bytes),
            greeting: settings.greeting.clone(),
            local: settings.greeting.as_ref().and_then(|_| local_of(socket)),
            has_started: false,
            has_failed: false,
            is_rejected: false,
            watch,
        }));
        if !settings.proxy_protocol {
            connection.start_session();
        }
        connection
    }

    /// Who is at the other end (after a PROXY header: the client it names).
    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    /// Whether to ask the kernel for input now: still reading, and the owed bytes are
    /// under the bound (backpressure: a peer that does not read stops being read).
    #[inline]
    pub fn wants_read(&self) -> bool {
        self.read_budget() > 0
    }

    /// Whether bytes are owed to the peer now.
    #[inline]
    pub fn wants_write(&self) -> bool {
        !self.unsent().is_empty()
    }

    /// Whether everything is done: no more reading and nothing owed. The model then shuts
    /// down its write side (the peer reads EOF after the last reply) and closes.
    #[inline]
    pub fn is_finished(&self) -> bool {
        if self.is_reading || !self.unsent().is_empty() {
            return false;
        }
        match &self.layers {
            // Plaintext that can no longer be encrypted (the handshake never finished, or
            // failed) is owed to nobody.
            Some(layers) if layers.tls.is_some() => {
                layers.has_failed
                    || layers.tls.as_ref().is_some_and(TlsLayer::is_handshaking)
                    || self.out.is_empty()
            }
            _ => self.out.is_empty(),
        }
    }

    /// How many bytes to read at most now, given a read buffer of `buf_len` bytes: as many
    /// as fit under the bound, with the bytes the protocol holds and the ciphertext owed
    /// counted against it, once the protocol has expanded them; 0 when reading is off.
    /// TLS needs no margin: plaintext is never longer than the ciphertext carrying it.
    #[inline]
    pub fn read_limit(&self, buf_len: usize) -> usize {
        self.read_budget().min(buf_len)
    }

    /// The bytes that may be read now under `--max-buffer`; 0 stops reading, and
    /// [`Connection::wants_read`] says the same, so a readiness model never watches for
    /// input it would not read.
    #[inline(always)]
    fn read_budget(&self) -> usize {
        if !self.is_reading {
            return 0;
        }
        // Stream echo with no layer, the case of every message a benchmark sends: asked up
        // to three times per message, so it is inlined and costs a few instructions (the
        // rest below, with neither held bytes nor ciphertext, gives the same answer).
        if self.echoes_input && self.layers.is_none() {
            return self.echo_budget();
        }
        self.read_budget_layered()
    }

    /// [`Connection::read_budget`] of stream echo with no layer, still reading.
    #[inline(always)]
    fn echo_budget(&self) -> usize {
        match self.out.room() {
            0 if self.out.is_empty() => 1,
            room => room,
        }
    }

    /// [`Connection::read_budget`] of a protocol that holds input back or expands it, or
    /// of a connection with a layer (PROXY, TLS).
    #[inline(never)]
    fn read_budget_layered(&self) -> usize {
        // Ciphertext owed counts against the bound too: with either buffer full, no room.
        let wire = self.layers.as_ref().map_or(0, |layers| layers.wire.len());
        let room = self.out.room().saturating_sub(wire);
        // Echo holds nothing back and its reply is the input itself: no division (tens of
        // cycles) per message.
        let room = match self.echoes_input {
            true => room,
            false => room.saturating_sub(self.session.held_bytes()) / self.session.max_expansion(),
        };
        match room {
            // The bound is reached and nothing can be sent: one more byte moves the
            // connection on. Either the protocol's held input alone fills it (a line past the
            // hold limit then goes out in pieces, `until-quit` streams early), or plaintext
            // owed before the TLS handshake ended (a greeting) does, which cannot be
            // encrypted until the peer's next handshake bytes are read.
            0 if self.unsent().is_empty() => 1,
            // Replies are owed: more input waits until the peer takes them, or held and
            // owed bytes together would pass the bound.
            room => room,
        }
    }

    /// Whether the reply to the next input is that input itself, owed right after what is
    /// owed now: stream `echo` with no layer, still reading. Only then may the input leave
    /// straight from the read buffer ([`Connection::receive_through`]).
    #[inline]
    fn is_write_through(&self) -> bool {
        self.is_reading && self.layers.is_none() && self.echoes_input
    }

    /// Feeds bytes the peer sent to the protocol, as [`Connection::receive`] does; but when
    /// nothing is owed and the reply is `input` itself (stream `echo`, no layer), first
    /// offers `input` to `write` straight from where it was read (write-through), so only
    /// what the kernel did not take is copied into the write buffer. Order, the bound and
    /// half-close are as with `receive`: the bytes written through are exactly the first
    /// bytes the session would have owed. Returns how many bytes `write` took.
    ///
    /// `write` is one non-blocking write: it returns how many bytes the kernel took (fewer
    /// than offered is a short write), or `WouldBlock` when it takes none now.
    ///
    /// # Errors
    ///
    /// What `write` returned other than `WouldBlock` and `Interrupted` (the peer reset or
    /// went away): the connection must close. A handler panic ends reading, as with
    /// `receive`.
    // Inlined into the read that feeds it: once per message, and the rare rest (owing
    // what the kernel did not take) is a call of its own.
    #[inline(always)]
    pub fn receive_through(
        &mut self,
        input: &[u8],
        write: impl FnMut(&[u8]) -> io::Result<usize>,
    ) -> io::Result<usize> {
        let mut sent = 0;
        if self.may_write_through() {
            sent = write_through(input, write)?;
        }
        if sent < input.len() {
            self.receive_rest(&input[sent..]);
        }
        Ok(sent)
    }

    /// [`Connection::receive`], out of line for [`Connection::receive_through`].
    #[inline(never)]
    fn receive_rest(&mut self, input: &[u8]) {
        self.receive(input);
    }

    /// As [`Connection::receive_through`] for a send that takes `input` from where it lies
    /// and completes later (io_uring's, from the buffer the kernel received into): returns
    /// true when `may_send` and the reply is all of `input`, owed right after nothing; the
    /// caller then sends it from there, owing none of it here (what that send does not take
    /// comes back through [`Connection::owe_first`]). Otherwise `input` is received as by
    /// [`Connection::receive`], and false returned.
    pub fn receive_lent(&mut self, input: &[u8], may_send: bool) -> bool {
        let is_lent = may_send && self.out.is_empty() && self.is_write_through();
        if !is_lent {
            self.receive(input);
        }
        is_lent
    }

    /// Feeds bytes the peer sent through the layers to the protocol.
    ///
    /// Nothing here closes the connection at once: a handler panic (logged here with the
    /// peer's address) and bytes a layer refuses (a bad PROXY header, a TLS error, logged
    /// here too) end reading, and the connection finishes by the ordinary path, sending
    /// what was owed before them. [`Connection::finish_reason`] tells why.
    pub fn receive(&mut self, input: &[u8]) {
        if !self.is_reading {
            // Bytes after the protocol closed, or during drain, are owed nothing.
            return;
        }
        if self.layers.is_none() {
            return self.deliver(input);
        }
        let Some(input) = self.through_proxy(input) else {
            return;
        };
        if input.is_empty() {
            return;
        }
        let Some(mut layers) = self.layers.take() else {
            return self.deliver(input);
        };
        let Some(tls) = layers.tls.as_mut() else {
            self.layers = Some(layers);
            return self.deliver(input);
        };
        let was_handshaking = tls.is_handshaking();
        let Connection {
            session,
            out,
            peer,
            is_reading,
            ..
        } = self;
        let mut outcome = Ok(());
        let received = tls.receive(input, &mut |plaintext| {
            if *is_reading && outcome.is_ok() {
                match catch_handler_panic(peer, || session.on_data(plaintext, out)) {
                    Ok(Flow::Continue) => {}
                    Ok(Flow::Close) => *is_reading = false,
                    Err(panicked) => outcome = Err(panicked),
                }
            }
        });
        if was_handshaking && !tls.is_handshaking() {
            tracing::debug!(peer = %self.peer, "TLS established, {}", tls.describe());
            if let Some(watch) = &layers.watch {
                watch.finish();
            }
        }
        self.layers = Some(layers);
        match received {
            Err(e) => {
                let during = if was_handshaking {
                    "TLS handshake failed"
                } else {
                    "TLS error"
                };
                tracing::warn!(peer = %self.peer, "closing: {during}: {e}");
                self.reject();
            }
            Ok(TlsInput::PeerClosed) if outcome.is_ok() => self.receive_eof(),
            Ok(_) => {}
        }
        if outcome.is_err() {
            self.stop_after_panic();
        }
        self.pump();
    }

    /// Passes `input` through the PROXY layer, if one waits for its header: `None` while
    /// the header is incomplete or was refused, else the bytes that follow it.
    fn through_proxy<'a>(&mut self, input: &'a [u8]) -> Option<&'a [u8]> {
        let layers = self.layers.as_deref_mut()?;
        let Some(proxy) = layers.proxy.as_mut() else {
            return Some(input);
        };
        match proxy.receive(input) {
            Ok(ProxyProgress::Incomplete) => None,
            Ok(ProxyProgress::Complete { header, rest }) => {
                layers.proxy = None;
                match (&layers.watch, layers.tls.is_some()) {
                    (Some(watch), true) => watch.set_stage(SetupStage::TlsHandshake),
                    (Some(watch), false) => watch.finish(),
                    (None, _) => {}
                }
                self.apply_proxy_header(header);
                self.start_session();
                Some(rest)
            }
            Err(e) => {
                tracing::warn!(peer = %self.peer, "closing: {e}");
                self.reject();
                None
            }
        }
    }

    /// The header's addresses replace the socket's, as the PROXY protocol intends.
    fn apply_proxy_header(&mut self, header: ProxyHeader) {
        let (source, destination) = match header.addresses {
            ProxyAddresses::Ip {
                source,
                destination,
            } => (Peer::Ip(source), Peer::Ip(destination)),
            ProxyAddresses::Unix {
                source,
                destination,
            } => (unix_peer(&source), unix_peer(&destination)),
            ProxyAddresses::Unspecified => {
                tracing::debug!(
                    peer = %self.peer,
                    "PROXY v{} header without addresses; keeping the socket's",
                    header.version
                );
                return;
            }
        };
        tracing::debug!(
            peer = %self.peer,
            "PROXY v{} header: client {source}, reached {destination}",
            header.version
        );
        self.peer = source;
        if let Some(layers) = self.layers.as_deref_mut()
            && layers.local.is_some()
        {
            layers.local = Some(destination);
        }
    }

    /// The peer is known: greet it and let the session begin.
    fn start_session(&mut self) {
        let Some(layers) = self.layers.as_deref_mut() else {
            return;
        };
        layers.has_started = true;
        if let Some(greeting) = &layers.greeting {
            let local: &dyn std::fmt::Display = match &layers.local {
                Some(local) => local,
                None => &"unknown",
            };
            self.out.push(greeting.render(&self.peer, local).as_bytes());
        }
        self.session.on_connect(&mut self.out);
        self.pump();
    }

    /// A layer refused the peer: as [`Connection::fail`], and the connection is counted as
    /// rejected.
    fn reject(&mut self) {
        if let Some(layers) = self.layers.as_deref_mut() {
            layers.is_rejected = true;
        }
        self.fail();
    }

    /// A layer refused the peer: read nothing more, send only what the layer owes (a TLS
    /// alert), then close.
    fn fail(&mut self) {
        self.is_reading = false;
        let owed = self.out.len();
        self.out.advance(owed);
        if let Some(layers) = self.layers.as_deref_mut() {
            layers.has_failed = true;
            if let Some(watch) = &layers.watch {
                watch.finish();
            }
        }
    }

    /// Moves plaintext owed into TLS records once the handshake allows, and queues
    /// close_notify after the last of it once reading has ended.
    fn pump(&mut self) {
        let Some(layers) = self.layers.as_deref_mut() else {
            return;
        };
        let Some(tls) = layers.tls.as_mut() else {
            return;
        };
        tls.write_to(&mut layers.wire);
        if layers.has_failed || tls.is_handshaking() {
            return;
        }
        if !self.out.is_empty() {
            tls.send(self.out.unsent(), &mut layers.wire);
            let sent = self.out.len();
            self.out.advance(sent);
        }
        if self.out.capacity() > RELEASE_IDLE_BUFFER_BYTES {
            self.out = WriteBuffer::new(self.out.max_bytes());
        }
        if !self.is_reading {
            tls.close(&mut layers.wire);
        }
    }

    /// Feeds plaintext to the session.
    fn deliver(&mut self, input: &[u8]) {
        let Connection {
            session, out, peer, ..
        } = self;
        match catch_handler_panic(peer, || session.on_data(input, out)) {
            Ok(Flow::Continue) => {}
            Ok(Flow::Close) => self.is_reading = false,
            Err(HandlerPanicked) => self.stop_after_panic(),
        }
        self.pump();
    }

    /// The handler panicked (already logged): its session is never called again, and the
    /// replies it queued before the panic go out like any others before the close.
    fn stop_after_panic(&mut self) {
        self.is_reading = false;
        self.has_panicked = true;
    }

    /// The peer half-closed: queue what is still owed, then finish once it is sent. A
    /// handler panic is handled as in [`Connection::receive`].
    pub fn receive_eof(&mut self) {
        if !self.is_reading {
            return;
        }
        self.is_reading = false;
        self.has_seen_eof = true;
        if let Some(layers) = self.layers.as_deref() {
            let has_fired = layers.watch.as_ref().is_some_and(|watch| watch.has_fired());
            let waiting_for = if layers.proxy.is_some() {
                Some("its PROXY protocol header")
            } else if layers.tls.as_ref().is_some_and(TlsLayer::is_handshaking) {
                Some("the end of its TLS handshake")
            } else {
                None
            };
            if let Some(what) = waiting_for {
                // The setup deadline already logged the connection it cut.
                if has_fired {
                    self.reject();
                } else {
                    tracing::info!(peer = %self.peer, "closing: connection ended before {what}");
                    self.fail();
                }
                return;
            }
        }
        let Connection {
            session, out, peer, ..
        } = self;
        if catch_handler_panic(peer, || session.on_eof(out)).is_err() {
            self.stop_after_panic();
        }
        self.pump();
    }

    /// Why a finished connection ended: a refused setup, the peer's EOF, a drain, or the
    /// protocol (`quit`).
    pub fn finish_reason(&self, is_draining: bool) -> CloseReason {
        if self.has_panicked {
            CloseReason::HandlerPanicked
        } else if self
            .layers
            .as_deref()
            .is_some_and(|layers| layers.is_rejected)
        {
            CloseReason::Rejected
        } else if self.has_seen_eof {
            CloseReason::PeerEof
        } else if is_draining {
            CloseReason::Drained
        } else {
            CloseReason::Quit
        }
    }

    /// `tcp` or `unix`: the socket this connection came on.
    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// Handles what one read of the peer's socket returned into `buf`: bytes, EOF
    /// (`Ok(0)`), nothing yet, or an error. Returns whether input (or EOF) arrived.
    ///
    /// # Errors
    ///
    /// Why the connection must close at once: the read failed. (A handler panic is not
    /// one: the replies owed before it are sent first, see [`Connection::receive`].)
    pub fn on_read(
        &mut self,
        result: io::Result<usize>,
        buf: &[u8],
        log: &LoopLog,
    ) -> Result<bool, CloseReason> {
        self.on_read_through(result, buf, log, |_| Err(io::ErrorKind::WouldBlock.into()))
    }

    /// As [`Connection::on_read`], with the bytes read offered to `write` first when they
    /// may leave straight from `buf` ([`Connection::receive_through`]).
    ///
    /// # Errors
    ///
    /// Why the connection must close: the read or the write failed.
    #[inline(always)]
    pub fn on_read_through(
        &mut self,
        result: io::Result<usize>,
        buf: &[u8],
        log: &LoopLog,
        write: impl FnMut(&[u8]) -> io::Result<usize>,
    ) -> Result<bool, CloseReason> {
        match result {
            Ok(0) => self.receive_eof(),
            Ok(n) => {
                log.received(self.transport, n);
                let sent = self
                    .receive_through(&buf[..n], write)
                    .map_err(CloseReason::Failed)?;
                if sent > 0 {
                    log.sent(self.transport, sent);
                }
            }
            Err(e) if is_transient(&e) => return Ok(false),
            Err(e) => return Err(CloseReason::Failed(e)),
        }
        Ok(true)
    }

    /// Reads once from the non-blocking `stream`, as much as the bound allows, and
    /// handles the result ([`Connection::on_read`]); an echo goes straight back from `buf`
    /// when nothing is owed ([`Connection::receive_through`]).
    ///
    /// # Errors
    ///
    /// As [`Connection::on_read_through`].
    #[inline(always)]
    pub fn read_from(
        &mut self,
        stream: &Stream,
        buf: &mut [u8],
        log: &LoopLog,
    ) -> Result<bool, CloseReason> {
        self.read_some(stream, buf, log)
            .map(|read| read.has_arrived)
    }

    /// As [`Connection::read_from`], and also says whether the socket may still hold input
    /// this read did not take ([`ReadOutcome::may_hold_more`]).
    ///
    /// # Errors
    ///
    /// As [`Connection::on_read_through`].
    #[inline(always)]
    pub fn read_some(
        &mut self,
        stream: &Stream,
        buf: &mut [u8],
        log: &LoopLog,
    ) -> Result<ReadOutcome, CloseReason> {
        let limit = self.read_limit(buf.len());
        if limit == 0 {
            return Ok(ReadOutcome {
                has_arrived: false,
                may_hold_more: true,
            });
        }
        let result = stream.read(&mut buf[..limit]);
        let stops_short = stream.reads_may_stop_short();
        self.took_read(
            result,
            limit,
            stops_short,
            |bytes| stream.write(bytes),
            buf,
            log,
        )
    }

    /// As [`Connection::read_some`], for a connection that
    /// [`Connection::may_write_through`]: nearly every message a busy echo server reads,
    /// where knowing it spares asking again. Also says whether the connection is as it was
    /// before the read: every byte read went back out (or nothing came), so it still reads
    /// and owes nothing, and its interest is unchanged.
    ///
    /// # Errors
    ///
    /// As [`Connection::on_read_through`].
    #[inline(always)]
    pub fn read_through(
        &mut self,
        stream: &Stream,
        buf: &mut [u8],
        log: &LoopLog,
    ) -> Result<(ReadOutcome, bool), CloseReason> {
        self.read_through_with(
            |buf| stream.read(buf),
            |bytes| stream.write(bytes),
            || stream.reads_may_stop_short(),
            buf,
            log,
        )
    }

    /// [`Connection::read_through`] with `read` and `write` as the socket's one
    /// non-blocking read and write, and `stops_short` as [`Stream::reads_may_stop_short`]:
    /// the same steps without a socket, so tests can split reads and shorten writes at will.
    ///
    /// # Errors
    ///
    /// As [`Connection::on_read_through`].
    #[inline(always)]
    pub fn read_through_with(
        &mut self,
        read: impl FnOnce(&mut [u8]) -> io::Result<usize>,
        mut write: impl FnMut(&[u8]) -> io::Result<usize>,
        stops_short: impl Fn() -> bool,
        buf: &mut [u8],
        log: &LoopLog,
    ) -> Result<(ReadOutcome, bool), CloseReason> {
        debug_assert!(self.may_write_through());
        // Nothing is owed, so the bound's whole room is `read_budget`'s echo case.
        let limit = self.echo_budget().min(buf.len());
        let result = read(&mut buf[..limit]);
        let n = match result {
            Ok(n) if n > 0 => n,
            // EOF, nothing yet, an error: once per connection or per empty wake-up.
            result => {
                return self.took_read_rarely(result, limit, stops_short(), write, buf, log);
            }
        };
        log.received(self.transport, n);
        let sent = write_through(&buf[..n], &mut write).map_err(CloseReason::Failed)?;
        if sent > 0 {
            log.sent(self.transport, sent);
        }
        if sent < n {
            self.receive_rest(&buf[sent..n]);
        }
        let read = ReadOutcome {
            has_arrived: true,
            // As in `took_read`.
            may_hold_more: n == limit || stops_short(),
        };
        Ok((read, sent == n))
    }

    /// [`Connection::took_read`] out of line, for [`Connection::read_through_with`].
    #[inline(never)]
    fn took_read_rarely(
        &mut self,
        result: io::Result<usize>,
        limit: usize,
        stops_short: bool,
        write: impl FnMut(&[u8]) -> io::Result<usize>,
        buf: &[u8],
        log: &LoopLog,
    ) -> Result<(ReadOutcome, bool), CloseReason> {
        let read = self.took_read(result, limit, stops_short, write, buf, log)?;
        Ok((read, self.may_write_through()))
    }

    /// The rest of [`Connection::read_some`], once a read of at most `limit` bytes into
    /// `buf` returned `result`; `stops_short` is [`Stream::reads_may_stop_short`].
    #[inline(always)]
    fn took_read(
        &mut self,
        result: io::Result<usize>,
        limit: usize,
        stops_short: bool,
        write: impl FnMut(&[u8]) -> io::Result<usize>,
        buf: &[u8],
        log: &LoopLog,
    ) -> Result<ReadOutcome, CloseReason> {
        // A read that filled what it asked for may have left more, and so may a short one
        // where reads stop short (`Stream::reads_may_stop_short`).
        let may_hold_more = match &result {
            Ok(n) => *n == limit || (*n > 0 && stops_short),
            Err(e) => e.kind() == io::ErrorKind::Interrupted,
        };
        let has_arrived = self.on_read_through(result, buf, log, write)?;
        Ok(ReadOutcome {
            has_arrived,
            may_hold_more,
        })
    }

    /// Writes owed bytes to the non-blocking `stream` until none are left or the kernel's
    /// send buffer is full.
    ///
    /// # Errors
    ///
    /// The write failed (the peer reset or went away): the connection must close.
    #[inline]
    pub fn flush_to(&mut self, stream: &Stream, log: &LoopLog) -> Result<(), CloseReason> {
        // Checked here, inlined, because after a write-through nothing is owed: most calls
        // then cost a compare, not a call.
        if !self.wants_write() {
            return Ok(());
        }
        self.flush_with(|bytes| stream.write(bytes), log)
    }

    /// As [`Connection::flush_to`], and says whether the kernel took any byte: progress
    /// for `--idle-timeout`, which a peer still taking its replies makes however slowly.
    ///
    /// # Errors
    ///
    /// As [`Connection::flush_to`].
    pub fn flush_progress(&mut self, stream: &Stream, log: &LoopLog) -> Result<bool, CloseReason> {
        let mut is_taken = false;
        let write = |bytes: &[u8]| {
            let written = stream.write(bytes);
            is_taken |= matches!(written, Ok(n) if n > 0);
            written
        };
        self.flush_with(write, log).map(|()| is_taken)
    }

    /// As [`Connection::flush_to`], with `write` as the one non-blocking write.
    ///
    /// # Errors
    ///
    /// As [`Connection::flush_to`].
    pub fn flush_with(
        &mut self,
        mut write: impl FnMut(&[u8]) -> io::Result<usize>,
        log: &LoopLog,
    ) -> Result<(), CloseReason> {
        while self.wants_write() {
            match write(self.unsent()) {
                // A kernel that takes nothing without saying WouldBlock is asked later.
                Ok(0) => return Ok(()),
                // The kernel may take fewer bytes than offered; the rest waits for writable.
                Ok(written) => {
                    log.sent(self.transport, written);
                    self.advance(written);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(CloseReason::Failed(e)),
            }
        }
        Ok(())
    }

    /// Whether the server ends this connection before the peer's EOF, so that closing
    /// it needs a lingering close ([`super::linger`]).
    pub fn needs_linger(&self) -> bool {
        !self.has_seen_eof
    }

    /// The server ends this connection now, before the peer's EOF (an idle timeout, a
    /// drain cut): read nothing more, and offer what is owed (with TLS, ending with
    /// close_notify) to the non-blocking `stream` once, without waiting; the lingering
    /// close follows.
    pub fn close_first(&mut self, stream: &Stream, log: &LoopLog) {
        self.stop_reading();
        // Whatever the kernel does not take now is lost with the close anyway.
        let _ = self.flush_to(stream, log);
    }

    /// Shutdown began: read nothing more, finish sending what is owed.
    pub fn stop_reading(&mut self) {
        self.is_reading = false;
        let is_set_up = self.layers.as_deref().is_none_or(|layers| {
            layers.has_started && !layers.tls.as_ref().is_some_and(TlsLayer::is_handshaking)
        });
        if !is_set_up {
            self.fail();
        }
        self.pump();
    }

    /// The owed bytes: offer them to the kernel.
    #[inline]
    pub fn unsent(&self) -> &[u8] {
        match &self.layers {
            Some(layers) if layers.tls.is_some() => layers.wire.unsent(),
            _ => self.out.unsent(),
        }
    }

    /// The kernel took `written` bytes of [`Connection::unsent`].
    pub fn advance(&mut self, written: usize) {
        match self.layers.as_deref_mut() {
            Some(layers) if layers.tls.is_some() => {
                layers.wire.advance(written);
                if layers.wire.is_empty() && layers.wire.capacity() > RELEASE_IDLE_BUFFER_BYTES {
                    layers.wire = WriteBuffer::new(layers.wire.max_bytes());
                }
                self.pump();
            }
            _ => self.out.advance(written),
        }
    }

    /// Bytes handed to a send that completes later (io_uring's) and then took fewer of them
    /// than offered: the owed bytes [`Connection::advance`] let go of, or the input
    /// [`Connection::receive_lent`] lent. They are owed first, before any reply queued
    /// since, in the buffer they came from.
    pub fn owe_first(&mut self, unsent: &[u8]) {
        match self.layers.as_deref_mut() {
            Some(layers) if layers.tls.is_some() => layers.wire.push_front(unsent),
            _ => self.out.push_front(unsent),
        }
    }

    /// Whether the next input may leave straight from the read buffer
    /// ([`Connection::receive_through`] with a real write): nothing owed, stream `echo`,
    /// no layer. Such a connection needs no output allocation to be lent first: only
    /// what the kernel does not take is copied, into an allocation of its own (a full send
    /// buffer, rare), so a loop skips [`Connection::lend_spare`] and its swaps per message.
    #[inline]
    pub fn may_write_through(&self) -> bool {
        self.out.is_empty() && self.is_write_through()
    }

    /// Lends an event loop's spare output allocation to this connection (see
    /// [`WriteBuffer::lend_spare`]), so replies need no allocation of their own.
    #[inline]
    pub fn lend_spare(&mut self, spare: &mut Vec<u8>) {
        if self.layers.is_none() {
            self.out.lend_spare(spare);
        }
    }

    /// Gives the output allocation back once nothing is owed (see
    /// [`WriteBuffer::return_spare`]).
    #[inline]
    pub fn return_spare(&mut self, spare: &mut Vec<u8>) {
        if self.layers.is_none() {
            self.out.return_spare(spare);
        }
    }

    /// Bytes owed now (plaintext and ciphertext).
    pub fn owed(&self) -> usize {
        self.out.len() + self.layers.as_ref().map_or(0, |layers| layers.wire.len())
    }
}

/// Offers `input` to the one non-blocking `write` until the kernel has taken all of it or
/// takes no more now; returns how many bytes it took.
///
/// # Errors
///
/// What `write` returned other than `WouldBlock` and `Interrupted`.
#[inline(always)]
fn write_through(
    input: &[u8],
    mut write: impl FnMut(&[u8]) -> io::Result<usize>,
) -> io::Result<usize> {
    let mut sent = 0;
    while sent < input.len() {
        match write(&input[sent..]) {
            // A kernel that takes nothing without saying WouldBlock is asked later.
            Ok(0) => break,
            Ok(written) => sent += written,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(sent)
}

/// Errors after which the same read simply comes again later.
fn is_transient(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// The address a client reached on `socket`, for the greeting's `{local}`.
fn local_of(socket: BorrowedFd<'_>) -> Option<Peer> {
    let addr = socket2::SockRef::from(&socket).local_addr().ok()?;
    if let Some(ip) = addr.as_socket() {
        return Some(Peer::Ip(ip));
    }
    addr.as_unix().map(Peer::Unix)
}

/// A Unix address from a PROXY header's path bytes.
fn unix_peer(path: &[u8]) -> Peer {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::OsStr::from_bytes(path);
    let addr = std::os::unix::net::SocketAddr::from_pathname(path)
        .or_else(|_| std::os::unix::net::SocketAddr::from_pathname(""));
    Peer::Unix(addr.expect("an empty path is short enough"))
}

thread_local! {
    /// Whether this thread is inside a protocol handler right now.
    static IS_IN_HANDLER: Cell<bool> = const { Cell::new(false) };
}

/// Whether the calling thread is running a protocol handler: a panic hook uses it to tell
/// an isolated handler panic (reported with its peer when caught) from a bug in reverb.
pub fn is_in_handler() -> bool {
    IS_IN_HANDLER.with(Cell::get)
}

/// Runs a protocol handler, turning a panic into a logged [`HandlerPanicked`].
fn catch_handler_panic<T>(peer: &Peer, handler: impl FnOnce() -> T) -> Result<T, HandlerPanicked> {
    IS_IN_HANDLER.with(|flag| flag.set(true));
    let result = catch_unwind_logged(peer, handler);
    IS_IN_HANDLER.with(|flag| flag.set(false));
    result
}

fn catch_unwind_logged<T>(peer: &Peer, handler: impl FnOnce() -> T) -> Result<T, HandlerPanicked> {
    // The session is dropped with the connection after a panic, so no broken state is
    // ever observed; that is why asserting unwind safety is sound here.
    panic::catch_unwind(AssertUnwindSafe(handler)).map_err(|payload| {
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("(no message)");
        tracing::error!(
            peer = %peer,
            reason = "handler_panic",
            "handler panicked: {message}; closing that connection only"
        );
        HandlerPanicked
    })
}

/// Runs a datagram handler the same way.
pub(super) fn catch_datagram_panic<T>(
    peer: &Peer,
    handler: impl FnOnce() -> T,
) -> Result<T, HandlerPanicked> {
    catch_handler_panic(peer, handler)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::greeting::Greeting;
    use crate::protocol::ProtocolKind;
    use proptest::prelude::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;
    use std::sync::mpsc;
    use std::thread;
    use std::time::Duration;

    fn ip_peer() -> Peer {
        Peer::Ip("127.0.0.1:40000".parse().unwrap())
    }

    fn limits(max_buffer_bytes: usize) -> Limits {
        Limits {
            max_buffer_bytes,
            ..Limits::default()
        }
    }

    /// A connection without layers: its socket is never touched, so any descriptor does.
    fn plain(protocol: &Protocol, max_buffer_bytes: usize) -> Connection {
        let (socket, _peer) = UnixStream::pair().unwrap();
        Connection::new(
            protocol,
            ip_peer(),
            &limits(max_buffer_bytes),
            socket.as_fd(),
        )
    }

    fn echo() -> Protocol {
        Protocol::new(ProtocolKind::Echo, 64)
    }

    #[test]
    fn reading_stops_at_the_bound_and_resumes_below_it() {
        let mut conn = plain(&echo(), 64);
        assert!(conn.wants_read());
        assert!(!conn.wants_write());
        assert_eq!(conn.read_limit(1000), 64, "the whole bound, nothing owed");
        assert_eq!(conn.read_limit(10), 10, "never more than the read buffer");
        conn.receive(&[b'x'; 40]);
        assert_eq!(conn.owed(), 40);
        assert!(conn.wants_write());
        assert_eq!(conn.read_limit(1000), 24);
        conn.receive(&[b'y'; 24]);
        assert!(!conn.wants_read(), "the bound is owed: stop reading");
        assert_eq!(conn.read_limit(1000), 0);
        conn.advance(1);
        assert!(conn.wants_read());
        assert_eq!(conn.read_limit(1000), 1);
        assert_eq!(conn.unsent().len(), 63);
        assert_eq!(conn.unsent()[..39], [b'x'; 39]);
    }

    #[test]
    fn the_read_limit_leaves_room_for_the_prefix_and_the_held_line() {
        // Each input byte may owe up to 10 bytes (a newline owes the 9-byte prefix too).
        let lines = Protocol::new(ProtocolKind::Lines, 1000).with_prefix(b"123456789");
        let mut conn = plain(&lines, 1000);
        assert_eq!(conn.read_limit(1 << 16), 100);
        conn.receive(b"abc");
        assert_eq!(conn.owed(), 0, "a partial line is held, not owed");
        assert_eq!(conn.read_limit(1 << 16), 99, "(1000 - 3 held) / 10");
        conn.receive(b"\n");
        assert_eq!(conn.unsent(), b"123456789abc\n");
        assert_eq!(conn.read_limit(1 << 16), 98, "(1000 - 13 owed) / 10");
        conn.receive(&[b'z'; 995]);
        assert!(
            !conn.wants_read(),
            "held and owed fill the bound: no more input until the peer reads"
        );
        assert_eq!(conn.read_limit(1 << 16), 0);
        conn.advance(13);
        assert!(
            conn.wants_read(),
            "nothing owed: the held line must move on"
        );
        assert_eq!(
            conn.read_limit(1 << 16),
            1,
            "held input alone fills the bound: one byte makes it go out"
        );
    }

    /// `until-quit` collects up to the bound, and what it streams early is owed: while the
    /// peer reads nothing, held and owed bytes together stay within `--max-buffer` (plus
    /// the one byte that makes held input go out).
    #[test]
    fn held_and_owed_bytes_stay_within_the_bound_together() {
        for kind in [ProtocolKind::UntilQuit, ProtocolKind::Lines] {
            let protocol = Protocol::new(kind, 1000);
            let mut conn = plain(&protocol, 1000);
            let mut taken_by_kernel = 300;
            for _ in 0..5000 {
                let limit = conn.read_limit(1 << 16);
                if limit == 0 {
                    break;
                }
                conn.receive(&vec![b'y'; limit]);
                // The kernel takes a part of the first replies, then the peer stops reading.
                let taken = taken_by_kernel.min(conn.unsent().len());
                conn.advance(taken);
                taken_by_kernel -= taken;
                let held = conn.session.held_bytes();
                assert!(
                    conn.owed() + held <= 1001,
                    "{kind:?}: {} owed + {held} held past the bound of 1000",
                    conn.owed()
                );
            }
            assert!(!conn.wants_read(), "{kind:?}: reading stops at the bound");
        }
    }

    #[test]
    fn eof_finishes_once_everything_owed_is_sent() {
        let mut conn = plain(&echo(), 64);
        assert!(!conn.is_finished(), "still reading");
        conn.receive(b"abc");
        conn.receive_eof();
        assert!(!conn.wants_read());
        assert_eq!(conn.read_limit(1000), 0);
        assert!(!conn.is_finished(), "three bytes still owed");
        assert_eq!(conn.unsent(), b"abc");
        conn.advance(3);
        assert!(conn.is_finished());
        assert!(matches!(conn.finish_reason(false), CloseReason::PeerEof));
        assert!(matches!(conn.finish_reason(true), CloseReason::PeerEof));
        conn.receive(b"late");
        conn.receive_eof();
        assert_eq!(conn.owed(), 0, "nothing is owed for bytes after EOF");
    }

    #[test]
    fn eof_queues_the_held_partial_line() {
        let lines = Protocol::new(ProtocolKind::Lines, 64).with_prefix(b"> ");
        let mut conn = plain(&lines, 64);
        conn.receive(b"one\ntw");
        assert_eq!(conn.unsent(), b"> one\n");
        conn.receive_eof();
        assert_eq!(conn.unsent(), b"> one\n> tw");
    }

    #[test]
    fn quit_and_drain_finish_with_their_own_reasons() {
        let until_quit = Protocol::new(ProtocolKind::UntilQuit, 64);
        let mut conn = plain(&until_quit, 64);
        conn.receive(b"hi\n");
        assert!(conn.wants_read());
        conn.receive(b"quit\n");
        assert!(!conn.wants_read(), "quit ends reading");
        assert_eq!(conn.unsent(), b"hi\nquit\n");
        conn.receive(b"more\n");
        assert_eq!(conn.owed(), 8, "nothing after quit is collected");
        conn.advance(8);
        assert!(conn.is_finished());
        assert!(matches!(conn.finish_reason(false), CloseReason::Quit));
        assert!(matches!(conn.finish_reason(true), CloseReason::Drained));
    }

    #[test]
    fn stop_reading_keeps_what_is_owed() {
        let mut conn = plain(&echo(), 64);
        conn.receive(b"abc");
        conn.stop_reading();
        assert!(!conn.wants_read());
        assert_eq!(conn.unsent(), b"abc", "a drain still sends what is owed");
        conn.receive(b"def");
        assert_eq!(conn.unsent(), b"abc", "nothing read during drain is owed");
        conn.advance(3);
        assert!(conn.is_finished());
    }

    #[test]
    fn a_handler_panic_closes_only_this_connection() {
        let lines = Protocol::new(ProtocolKind::Lines, 64).with_panic_on(b"boom");
        let mut conn = plain(&lines, 64);
        conn.receive(b"ok\n");
        conn.receive(b"boom\n");
        assert!(!conn.wants_read(), "nothing more is read after a panic");
        assert_eq!(
            conn.unsent(),
            b"ok\n",
            "the line before the panic is still owed"
        );
        assert!(!conn.is_finished(), "not before the owed line is sent");
        conn.advance(3);
        assert!(conn.is_finished());
        assert!(matches!(
            conn.finish_reason(false),
            CloseReason::HandlerPanicked
        ));
        let log = LoopLog::default();
        let mut conn = plain(&lines, 64);
        assert_eq!(conn.on_read(Ok(5), b"boom\n", &log).ok(), Some(true));
        assert!(conn.is_finished());
        assert!(matches!(
            conn.finish_reason(false),
            CloseReason::HandlerPanicked
        ));
        assert!(!is_in_handler(), "the flag is cleared after the handler");
    }

    #[test]
    fn on_read_tells_input_eof_retry_and_failure_apart() {
        let log = LoopLog::default();
        let mut conn = plain(&echo(), 64);
        assert_eq!(conn.on_read(Ok(3), b"abcdef", &log).ok(), Some(true));
        assert_eq!(conn.unsent(), b"abc", "only the bytes read");
        for transient in [io::ErrorKind::WouldBlock, io::ErrorKind::Interrupted] {
            assert_eq!(
                conn.on_read(Err(transient.into()), b"", &log).ok(),
                Some(false),
                "{transient:?} is tried again later"
            );
        }
        assert!(conn.wants_read());
        assert!(matches!(
            conn.on_read(Err(io::ErrorKind::ConnectionReset.into()), b"", &log),
            Err(CloseReason::Failed(_))
        ));
        assert_eq!(
            conn.on_read(Ok(0), b"", &log).ok(),
            Some(true),
            "EOF is news too"
        );
        assert!(!conn.wants_read());
    }

    /// A non-blocking socket pair: the server's end as a [`Stream`], and the client's.
    fn socket_pair() -> (Stream, UnixStream) {
        let (server, client) = UnixStream::pair().unwrap();
        server.set_nonblocking(true).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        (Stream::Unix(server), client)
    }

    /// Runs `f` on a thread and fails if it has not returned within five seconds, so a
    /// loop that never ends fails the test instead of hanging it.
    fn within_seconds<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("did not return within 5 s")
    }

    #[test]
    fn read_from_reads_what_is_there_and_within_the_bound() {
        use std::io::{Read, Write};
        let log = LoopLog::default();
        let (stream, mut client) = socket_pair();
        let mut conn = plain(&echo(), 4);
        let mut buf = [0u8; 64];
        assert_eq!(
            conn.read_from(&stream, &mut buf, &log).ok(),
            Some(false),
            "nothing sent yet"
        );
        client.write_all(b"abcdef").unwrap();
        assert_eq!(conn.read_from(&stream, &mut buf, &log).ok(), Some(true));
        // Nothing was owed, so the echo left straight from the read buffer: nothing is
        // owed now, and the peer got only what one read under the bound took.
        assert!(!conn.wants_write(), "written through");
        let mut echoed = [0u8; 4];
        client.read_exact(&mut echoed).unwrap();
        assert_eq!(&echoed, b"abcd", "one read takes only the bound");
        assert_eq!(conn.read_from(&stream, &mut buf, &log).ok(), Some(true));
        let mut echoed = [0u8; 2];
        client.read_exact(&mut echoed).unwrap();
        assert_eq!(&echoed, b"ef");
        drop(client);
        assert_eq!(
            conn.read_from(&stream, &mut buf, &log).ok(),
            Some(true),
            "EOF"
        );
        assert!(!conn.wants_read());
    }

    /// A connected TCP pair over loopback: the server's side non-blocking.
    fn tcp_pair() -> (Stream, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        (Stream::Tcp(server), client)
    }

    #[test]
    fn read_some_says_when_the_socket_may_still_hold_input() {
        use std::io::{Read, Write};
        let log = LoopLog::default();
        let (stream, mut client) = tcp_pair();
        let mut conn = plain(&echo(), 4);
        let mut buf = [0u8; 64];
        let outcome = |has_arrived, may_hold_more| {
            Some(ReadOutcome {
                has_arrived,
                may_hold_more,
            })
        };
        let nothing = conn.read_some(&stream, &mut buf, &log).ok();
        assert_eq!(nothing, outcome(false, false), "WouldBlock: nothing queued");
        client.write_all(b"abcdef").unwrap();
        let full = conn.read_some(&stream, &mut buf, &log).ok();
        assert_eq!(
            full,
            outcome(true, true),
            "the bound (4) filled: 2 bytes left"
        );
        let short = conn.read_some(&stream, &mut buf, &log).ok();
        assert_eq!(short, outcome(true, false), "2 of 4: all that was queued");
        let mut echoed = [0u8; 6];
        client.read_exact(&mut echoed).unwrap();
        assert_eq!(&echoed, b"abcdef");
        // A reply the peer does not take fills the bound: no read is made, and whatever
        // is queued is still there.
        conn.receive(b"wxyz");
        let none = conn.read_some(&stream, &mut buf, &log).ok();
        assert_eq!(none, outcome(false, true), "no room: not read");
        drop(client);
        conn.advance(4);
        let eof = conn.read_some(&stream, &mut buf, &log).ok();
        assert_eq!(eof, outcome(true, false), "EOF");
    }

    /// A short read of a Unix stream socket does not prove it empty: the read stops after
    /// a message that carried descriptors. Only a read that finds nothing does.
    #[test]
    fn a_short_unix_read_may_still_leave_input() {
        use std::io::Write;
        let log = LoopLog::default();
        let (stream, mut client) = socket_pair();
        let mut conn = plain(&echo(), 64);
        let mut buf = [0u8; 64];
        client.write_all(b"ab").unwrap();
        let short = conn.read_some(&stream, &mut buf, &log).ok();
        let outcome = |has_arrived, may_hold_more| {
            Some(ReadOutcome {
                has_arrived,
                may_hold_more,
            })
        };
        assert_eq!(short, outcome(true, true), "short, yet maybe more");
        let nothing = conn.read_some(&stream, &mut buf, &log).ok();
        assert_eq!(nothing, outcome(false, false), "found nothing: empty");
    }

    #[test]
    fn flush_to_stops_when_the_kernel_is_full_and_fails_when_the_peer_is_gone() {
        use std::io::Read;
        let (stream, mut client) = socket_pair();
        let big = vec![7u8; 4 << 20];
        let (stream, conn) = within_seconds(move || {
            let log = LoopLog::default();
            let mut conn = plain(&echo(), 8 << 20);
            conn.receive(&big);
            conn.flush_to(&stream, &log).unwrap();
            (stream, conn)
        });
        assert!(
            conn.wants_write(),
            "4 MiB do not fit a socket buffer: the rest waits for writable"
        );
        let sent = (4 << 20) - conn.owed();
        assert!(sent > 0, "the kernel took some");
        let mut got = vec![0u8; sent];
        client.read_exact(&mut got).unwrap();
        drop(client);
        let failed = within_seconds(move || {
            let (stream, mut conn) = (stream, conn);
            conn.flush_to(&stream, &LoopLog::default())
        });
        assert!(matches!(failed, Err(CloseReason::Failed(_))), "{failed:?}");
    }

    #[test]
    fn closing_first_stops_reading_and_offers_what_is_owed() {
        use std::io::Read;
        let log = LoopLog::default();
        let (stream, mut client) = socket_pair();
        let mut conn = plain(&echo(), 64);
        conn.receive(b"owed");
        conn.close_first(&stream, &log);
        assert!(!conn.wants_read(), "nothing more is read");
        assert!(!conn.wants_write(), "the kernel took what was owed");
        let mut got = [0u8; 4];
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"owed");
    }

    #[test]
    fn a_handler_runs_flagged_as_one() {
        assert_eq!(
            catch_handler_panic(&ip_peer(), is_in_handler).ok(),
            Some(true),
            "a panic hook tells a handler's panic from reverb's own"
        );
        assert!(!is_in_handler());
    }

    #[test]
    fn a_spare_allocation_is_lent_and_returned() {
        let mut conn = plain(&echo(), 4096);
        let mut spare = Vec::with_capacity(4096);
        conn.lend_spare(&mut spare);
        assert_eq!(spare.capacity(), 0, "lent to the connection");
        conn.receive(b"abc");
        conn.advance(3);
        conn.return_spare(&mut spare);
        assert!(spare.capacity() >= 4096, "given back once nothing is owed");
    }

    #[test]
    fn the_transport_follows_the_peer() {
        let (socket, _peer) = UnixStream::pair().unwrap();
        let unix_peer = Peer::Unix(socket.local_addr().unwrap());
        let conn = Connection::new(&echo(), unix_peer, &limits(64), socket.as_fd());
        assert_eq!(conn.transport(), Transport::Unix);
        assert_eq!(plain(&echo(), 64).transport(), Transport::Tcp);
    }

    /// A connection that expects a PROXY protocol header first, with `greeting`.
    fn behind_proxy(greeting: Option<&str>) -> (Connection, UnixStream) {
        let (socket, peer) = UnixStream::pair().unwrap();
        let mut limits = limits(1024);
        limits.layers.proxy_protocol = true;
        limits.layers.greeting = greeting.map(|g| Arc::new(Greeting::parse(g).unwrap()));
        let conn = Connection::new(&echo(), ip_peer(), &limits, socket.as_fd());
        // The setup deadline holds its own copy of the descriptor; the pair's other end
        // stays open so that nothing is cut while the test runs.
        (conn, peer)
    }

    #[test]
    fn a_proxy_header_names_the_peer_and_starts_the_session() {
        let (mut conn, _keep) = behind_proxy(Some("hello {peer}\n"));
        assert!(conn.wants_read(), "reading the header");
        assert_eq!(conn.owed(), 0, "no greeting before the header");
        conn.receive(b"PROXY TCP4 192.0.2.1 198.51.100.2 40001 7");
        assert_eq!(conn.owed(), 0, "the header is not complete yet");
        conn.receive(b"\r\necho me");
        assert_eq!(conn.peer().to_string(), "192.0.2.1:40001");
        assert_eq!(conn.unsent(), b"hello 192.0.2.1:40001\necho me");
        assert_eq!(conn.transport(), Transport::Tcp);
        conn.advance(22);
        assert_eq!(
            conn.unsent(),
            b"echo me",
            "what the kernel took is not owed"
        );
    }

    /// Bytes a send that completes later did not take are owed first again, in the
    /// buffer [`Connection::unsent`] offers: the plaintext one when the layers are there
    /// for a greeting and TLS is not.
    #[test]
    fn what_a_send_did_not_take_is_owed_first_again() {
        let (socket, _peer) = UnixStream::pair().unwrap();
        let mut limits = limits(1024);
        limits.layers.greeting = Some(Arc::new(Greeting::parse("hello\n").unwrap()));
        let mut conn = Connection::new(&echo(), ip_peer(), &limits, socket.as_fd());
        conn.receive(b"more");
        assert_eq!(conn.unsent(), b"hello\nmore");
        conn.advance(10);
        conn.receive(b" and");
        conn.owe_first(b"lo\nmore");
        assert_eq!(conn.unsent(), b"lo\nmore and");
    }

    #[test]
    fn a_greeting_names_the_address_the_client_reached() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let reached = listener.local_addr().unwrap();
        let _client = std::net::TcpStream::connect(reached).unwrap();
        let (socket, _) = listener.accept().unwrap();
        let mut limits = limits(1024);
        limits.layers.greeting = Some(Arc::new(Greeting::parse("via {local}\n").unwrap()));
        let conn = Connection::new(&echo(), ip_peer(), &limits, socket.as_fd());
        assert_eq!(conn.unsent(), format!("via {reached}\n").as_bytes());
    }

    #[test]
    fn a_bad_proxy_header_ends_the_connection() {
        let (mut conn, _keep) = behind_proxy(None);
        conn.receive(b"GET / HTTP/1.1\r\n\r\n");
        assert!(!conn.wants_read(), "a refused header ends reading");
        assert_eq!(conn.owed(), 0, "and owes nothing");
        assert!(conn.is_finished());
        assert_eq!(
            conn.peer().to_string(),
            "127.0.0.1:40000",
            "the socket's peer is kept"
        );
    }

    #[test]
    fn eof_before_the_proxy_header_owes_nothing() {
        let (mut conn, _keep) = behind_proxy(Some("hello\n"));
        conn.receive(b"PROXY TCP4");
        conn.receive_eof();
        assert!(!conn.wants_read());
        assert_eq!(
            conn.owed(),
            0,
            "no greeting for a peer that never said who it is"
        );
        assert!(conn.is_finished());
        let (mut conn, _keep) = behind_proxy(Some("hello\n"));
        conn.stop_reading();
        assert_eq!(
            conn.owed(),
            0,
            "a drain before the header owes nothing either"
        );
        assert!(conn.is_finished());
    }

    /// A TLS connection (a throwaway certificate) and a client that trusts anything, and
    /// the socket pair the connection was made on (the server's end, then the peer's): the
    /// setup deadline shuts the server's end down if it fires, which the peer's end sees.
    fn over_tls(
        protocol: &Protocol,
        max_buffer_bytes: usize,
        handshake_timeout: Duration,
    ) -> (
        Connection,
        rustls::ClientConnection,
        (UnixStream, UnixStream),
    ) {
        let (socket, peer) = UnixStream::pair().unwrap();
        let mut limits = limits(max_buffer_bytes);
        limits.layers.tls = Some(crate::layer::tls::TlsConfig::self_signed().unwrap());
        limits.layers.tls_handshake_timeout = handshake_timeout;
        let conn = Connection::new(protocol, ip_peer(), &limits, socket.as_fd());
        let config = crate::tls_client::client_config(&crate::addr::TlsVerify::Insecure).unwrap();
        let client =
            rustls::ClientConnection::new(config, "localhost".try_into().unwrap()).unwrap();
        (conn, client, (socket, peer))
    }

    /// What the client made of the server's bytes so far.
    #[derive(Debug, Default)]
    struct ClientView {
        plaintext: Vec<u8>,
        has_seen_close_notify: bool,
    }

    /// Moves bytes both ways until neither side has more to say. The server's bytes are
    /// taken `piece` bytes at a time, as a kernel taking short writes would.
    fn exchange(
        conn: &mut Connection,
        client: &mut rustls::ClientConnection,
        piece: usize,
        view: &mut ClientView,
    ) {
        use std::io::Read;
        for _ in 0..1000 {
            let mut to_server = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut to_server).unwrap();
            }
            if !to_server.is_empty() {
                conn.receive(&to_server);
            }
            let mut to_client = Vec::new();
            while conn.wants_write() {
                assert!(!conn.unsent().is_empty(), "wants_write with nothing unsent");
                assert!(
                    to_client.len() < 16 << 20,
                    "the server keeps producing bytes the client never asked for"
                );
                let n = conn.unsent().len().min(piece);
                to_client.extend_from_slice(&conn.unsent()[..n]);
                conn.advance(n);
            }
            let mut slice = to_client.as_slice();
            while !slice.is_empty() {
                if client.read_tls(&mut slice).unwrap() == 0 {
                    // After close_notify the client takes nothing more.
                    break;
                }
                client
                    .process_new_packets()
                    .expect("the client understands every record");
                let mut buf = [0u8; 4096];
                loop {
                    match client.reader().read(&mut buf) {
                        Ok(0) => {
                            view.has_seen_close_notify = true;
                            break;
                        }
                        Ok(n) => view.plaintext.extend_from_slice(&buf[..n]),
                        Err(_) => break,
                    }
                }
            }
            if to_server.is_empty() && to_client.is_empty() {
                return;
            }
        }
        panic!("no quiet point after 1000 rounds");
    }

    #[test]
    fn tls_carries_replies_and_closes_with_close_notify() {
        use std::io::Write;
        let (mut conn, mut client, _peer) = over_tls(&echo(), 64 * 1024, Duration::from_secs(10));
        assert!(conn.wants_read(), "reading the ClientHello");
        assert!(!conn.wants_write());
        assert!(!conn.is_finished());
        let mut view = ClientView::default();
        exchange(&mut conn, &mut client, 1000, &mut view);
        assert!(!client.is_handshaking());
        // 64 KiB through records of at most 16 KiB, sent to the client 1000 bytes at a time.
        let input: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        client.writer().write_all(&input).unwrap();
        exchange(&mut conn, &mut client, 1000, &mut view);
        assert!(
            view.plaintext == input,
            "{} bytes back",
            view.plaintext.len()
        );
        assert!(
            !view.has_seen_close_notify,
            "still open while the client is"
        );
        assert_eq!(conn.owed(), 0);
        assert!(!conn.is_finished());
        client.send_close_notify();
        exchange(&mut conn, &mut client, 1000, &mut view);
        assert!(
            view.has_seen_close_notify,
            "close_notify answers close_notify"
        );
        assert!(conn.is_finished());
        assert!(matches!(conn.finish_reason(false), CloseReason::PeerEof));
    }

    /// docs/cli.md: "An idle TLS connection holds no output buffer: buffers above 16 KiB
    /// are given back once empty."
    #[test]
    fn an_idle_tls_connection_gives_back_its_buffers() {
        use std::io::Write;
        let (mut conn, mut client, _peer) = over_tls(&echo(), 256 * 1024, Duration::from_secs(10));
        let mut view = ClientView::default();
        exchange(&mut conn, &mut client, 1 << 20, &mut view);
        let input = vec![b'x'; 64 * 1024];
        client.writer().write_all(&input).unwrap();
        exchange(&mut conn, &mut client, 1 << 20, &mut view);
        assert_eq!(view.plaintext.len(), input.len());
        assert_eq!(conn.owed(), 0);
        let wire = conn.layers.as_ref().unwrap().wire.capacity();
        assert!(
            conn.out.capacity() <= RELEASE_IDLE_BUFFER_BYTES,
            "plaintext buffer kept: {} bytes",
            conn.out.capacity()
        );
        assert!(
            wire <= RELEASE_IDLE_BUFFER_BYTES,
            "ciphertext buffer kept: {wire} bytes"
        );
    }

    /// docs/cli.md, reverb_connections_closed_total: `rejected` is "the setup refused the
    /// peer"; a peer that leaves during the handshake (before any deadline) was not refused.
    #[test]
    fn eof_during_the_handshake_is_the_peers_eof_not_a_refusal() {
        let (mut conn, _client, _peer) = over_tls(&echo(), 64 * 1024, Duration::from_secs(10));
        conn.receive_eof();
        assert!(conn.is_finished());
        let reason = conn.finish_reason(false);
        assert!(matches!(reason, CloseReason::PeerEof), "{reason:?}");
    }

    #[test]
    fn tls_bytes_owed_count_against_the_bound() {
        let (mut conn, mut client, _peer) = over_tls(&echo(), 64 * 1024, Duration::from_secs(10));
        assert_eq!(conn.read_limit(1 << 20), 64 * 1024);
        let mut hello = Vec::new();
        client.write_tls(&mut hello).unwrap();
        conn.receive(&hello);
        let owed = conn.unsent().len();
        assert!(owed > 0, "the server's handshake flight is owed");
        assert_eq!(conn.owed(), owed);
        assert!(conn.wants_write());
        assert_eq!(
            conn.read_limit(1 << 20),
            64 * 1024 - owed,
            "ciphertext owed counts against --max-buffer"
        );
        // A bound smaller than the server's flight: nothing more is read until it is sent.
        let (mut conn, mut client, _peer) = over_tls(&echo(), 64, Duration::from_secs(10));
        let mut hello = Vec::new();
        client.write_tls(&mut hello).unwrap();
        conn.receive(&hello);
        assert!(!conn.wants_read(), "the flight alone fills the bound");
        assert_eq!(conn.read_limit(1 << 20), 0);
    }

    /// Plaintext owed before the handshake ends (a greeting) cannot be sent until it does:
    /// when it alone fills the bound, the handshake's bytes must still be read, as little
    /// as the bound allows, or the handshake could never end.
    #[test]
    fn plaintext_held_for_the_handshake_leaves_it_read() {
        use std::io::Read;
        let greeting = [b'g'; 100];
        let protocol = echo().with_greeting(&greeting);
        let (mut conn, mut client, _peer) = over_tls(&protocol, 64, Duration::from_secs(10));
        assert_eq!(
            conn.owed(),
            greeting.len(),
            "the greeting waits for the handshake"
        );
        assert!(!conn.wants_write(), "and nothing can be sent yet");
        let (mut pending, mut plaintext) = (Vec::new(), Vec::new());
        for _ in 0..10_000 {
            while client.wants_write() {
                client.write_tls(&mut pending).unwrap();
            }
            // Only what the server asks for, as a model reads.
            let limit = conn.read_limit(pending.len());
            assert!(
                limit > 0 || pending.is_empty() || conn.wants_write(),
                "the server reads nothing, sends nothing, and the handshake waits for it"
            );
            conn.receive(&pending[..limit]);
            pending.drain(..limit);
            let mut unsent = conn.unsent();
            let sent = unsent.len();
            while !unsent.is_empty() {
                client.read_tls(&mut unsent).unwrap();
            }
            conn.advance(sent);
            client.process_new_packets().unwrap();
            let mut buf = [0u8; 256];
            while let Ok(n) = client.reader().read(&mut buf) {
                plaintext.extend_from_slice(&buf[..n]);
            }
            if plaintext.len() >= greeting.len() {
                break;
            }
        }
        assert_eq!(plaintext, greeting);
    }

    #[test]
    fn tls_garbage_ends_the_connection_after_an_alert() {
        let (mut conn, _client, _peer) = over_tls(&echo(), 64 * 1024, Duration::from_secs(10));
        conn.receive(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(!conn.wants_read());
        assert!(conn.wants_write(), "an alert is owed");
        let alert = conn.unsent().len();
        assert!(!conn.is_finished());
        conn.advance(alert);
        assert!(conn.is_finished());
    }

    #[test]
    fn tls_eof_or_drain_during_the_handshake_owes_nothing_more() {
        let greeting = echo().with_greeting(b"hello\n");
        let (mut conn, _client, _peer) = over_tls(&greeting, 64 * 1024, Duration::from_secs(10));
        conn.receive_eof();
        assert!(!conn.wants_read());
        assert!(conn.is_finished(), "the greeting is owed to nobody now");
        let (mut conn, _client, _peer) = over_tls(&greeting, 64 * 1024, Duration::from_secs(10));
        conn.stop_reading();
        assert!(!conn.wants_read());
        assert!(conn.is_finished());
    }

    /// Whether `peer` reads EOF within two seconds: every descriptor of the other end,
    /// the setup deadline's duplicate too, is closed.
    fn reads_eof(peer: &mut UnixStream) -> bool {
        use std::io::Read;
        peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut byte = [0u8; 1];
        matches!(peer.read(&mut byte), Ok(0))
    }

    #[test]
    fn a_drain_during_setup_lets_go_of_the_deadlines_descriptor() {
        // Behind PROXY, before the header.
        let (socket, mut peer) = UnixStream::pair().unwrap();
        let mut limits = limits(1024);
        limits.layers.proxy_protocol = true;
        let mut conn = Connection::new(&echo(), ip_peer(), &limits, socket.as_fd());
        conn.stop_reading();
        assert!(conn.is_finished());
        drop((conn, socket));
        assert!(reads_eof(&mut peer), "closed, not held until the deadline");
        // During the TLS handshake.
        let (mut conn, _client, (socket, mut peer)) =
            over_tls(&echo(), 64 * 1024, Duration::from_secs(10));
        conn.stop_reading();
        assert!(conn.is_finished());
        drop((conn, socket));
        assert!(reads_eof(&mut peer), "closed, not held until the deadline");
    }

    #[test]
    fn a_tls_panic_sends_the_replies_before_it_and_nothing_after() {
        use std::io::Write;
        let lines = Protocol::new(ProtocolKind::Lines, 1024).with_panic_on(b"boom");
        let (mut conn, mut client, _peer) = over_tls(&lines, 64 * 1024, Duration::from_secs(10));
        let mut view = ClientView::default();
        exchange(&mut conn, &mut client, 1 << 20, &mut view);
        // Three records in one read: the panic must stop the session at the second.
        client.writer().write_all(b"ok\n").unwrap();
        client.writer().write_all(b"boom\n").unwrap();
        client.writer().write_all(b"after\n").unwrap();
        client.send_close_notify();
        exchange(&mut conn, &mut client, 1 << 20, &mut view);
        assert_eq!(view.plaintext, b"ok\n");
        assert!(
            view.has_seen_close_notify,
            "close_notify after the last reply"
        );
        assert!(conn.is_finished());
        assert!(
            matches!(conn.finish_reason(false), CloseReason::HandlerPanicked),
            "the panic is reported even with the peer's close_notify in the same read"
        );
    }

    #[test]
    fn the_handshake_deadline_cuts_only_a_handshake_that_stalls() {
        use std::io::Read;
        let deadline = Duration::from_millis(200);
        // Established in time: the deadline no longer applies.
        let (mut conn, mut client, (_socket, mut peer)) = over_tls(&echo(), 64 * 1024, deadline);
        exchange(&mut conn, &mut client, 1 << 20, &mut ClientView::default());
        assert!(!client.is_handshaking());
        // Stalled after its ClientHello: cut at the deadline.
        let (mut stalled, mut stalled_client, (_stalled_socket, mut stalled_peer)) =
            over_tls(&echo(), 64 * 1024, deadline);
        let mut hello = Vec::new();
        stalled_client.write_tls(&mut hello).unwrap();
        stalled.receive(&hello);
        thread::sleep(3 * deadline);
        let mut buf = [0u8; 1];
        stalled_peer
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let read = stalled_peer
            .read(&mut buf)
            .expect("a handshake stalled past its deadline is shut down, not left open");
        assert_eq!(read, 0);
        peer.set_nonblocking(true).unwrap();
        let read = peer.read(&mut buf);
        assert!(
            read.as_ref()
                .is_err_and(|e| e.kind() == io::ErrorKind::WouldBlock),
            "an established connection was cut by the handshake deadline: {read:?}"
        );
    }

    fn lines_with_panic_word() -> (Connection, UnixStream) {
        let protocol = Protocol::new(ProtocolKind::Lines, 1024)
            .with_prefix(b"You Got ")
            .with_panic_on(b"boom");
        let (socket, other) = UnixStream::pair().expect("socketpair");
        let peer = Peer::Unix(socket.local_addr().expect("local address"));
        let connection = Connection::new(&protocol, peer, &Limits::default(), socket.as_fd());
        (connection, other)
    }

    proptest! {
        /// However TCP splits `ok\nboom\n...`, the reply to `ok` is owed when the handler
        /// panics, nothing after it, and the connection finishes as a handler panic once
        /// that reply is sent.
        #[test]
        fn replies_before_a_panic_survive_any_split(
            cuts in proptest::collection::vec(0usize..=20, 0..6),
        ) {
            let input = b"ok\nboom\nnever\n";
            let (mut connection, _other) = lines_with_panic_word();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(input.len())).collect();
            cuts.push(input.len());
            cuts.sort_unstable();
            let mut from = 0;
            for to in cuts {
                connection.receive(&input[from..to]);
                from = to;
            }
            connection.receive_eof();
            prop_assert_eq!(connection.unsent(), b"You Got ok\n");
            prop_assert!(!connection.wants_read());
            prop_assert!(!connection.is_finished());
            let owed = connection.unsent().len();
            connection.advance(owed);
            prop_assert!(connection.is_finished());
            prop_assert!(matches!(connection.finish_reason(false), CloseReason::HandlerPanicked));
            prop_assert!(connection.needs_linger());
        }
    }
}

#[cfg(test)]
mod write_through_tests;
