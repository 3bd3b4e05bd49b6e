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

/// The connection's handler panicked; it was logged, and the model should close it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandlerPanicked;

/// One stream peer, from accept to close.
#[derive(Debug)]
pub struct Connection {
    session: Session,
    /// Plaintext owed to the peer; with TLS it is encrypted into `Layers::wire` as soon as
    /// the handshake allows.
    out: WriteBuffer,
    peer: Peer,
    /// Whether we still read this peer: false after its EOF, after the protocol asked to
    /// close, after a layer refused its bytes, and during drain.
    is_reading: bool,
    /// Whether the peer half-closed (rather than the protocol or a drain stopping us).
    has_seen_eof: bool,
    /// What the socket is, for the counters (the peer may change with a PROXY header).
    transport: Transport,
    /// `None` for a plain connection, which then costs nothing extra.
    layers: Option<Box<Layers>>,
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
    watch: Option<Arc<SetupWatch>>,
}

impl Connection {
    /// A new connection on `socket`, its greeting (if any) already owed unless a PROXY
    /// header must come first.
    pub fn new(protocol: &Protocol, peer: Peer, limits: &Limits, socket: BorrowedFd<'_>) -> Self {
        let mut connection = Connection {
            session: protocol.new_session(),
            out: WriteBuffer::new(limits.max_buffer_bytes),
            is_reading: true,
            has_seen_eof: false,
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
        let watch = stage.and_then(|stage| {
            setup_deadline::watch(
                socket,
                stage,
                connection.peer.to_string(),
                settings.proxy_timeout,
                settings.tls_handshake_timeout,
            )
        });
        connection.layers = Some(Box::new(Layers {
            proxy: settings.proxy_protocol.then(ProxyLayer::new),
            tls,
            wire: WriteBuffer::new(limits.max_buffer_bytes),
            greeting: settings.greeting.clone(),
            local: settings.greeting.as_ref().and_then(|_| local_of(socket)),
            has_started: false,
            has_failed: false,
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
    pub fn wants_read(&self) -> bool {
        self.is_reading
            && !self.out.is_full()
            && self
                .layers
                .as_ref()
                .is_none_or(|layers| !layers.wire.is_full())
    }

    /// Whether bytes are owed to the peer now.
    pub fn wants_write(&self) -> bool {
        !self.unsent().is_empty()
    }

    /// Whether everything is done: no more reading and nothing owed. The model then shuts
    /// down its write side (the peer reads EOF after the last reply) and closes.
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
    pub fn read_limit(&self, buf_len: usize) -> usize {
        if !self.wants_read() {
            return 0;
        }
        let wire = self.layers.as_ref().map_or(0, |layers| layers.wire.len());
        let room = self
            .out
            .room()
            .saturating_sub(self.session.held_bytes() + wire);
        (room / self.session.max_expansion()).clamp(1, buf_len)
    }

    /// Feeds bytes the peer sent through the layers to the protocol.
    ///
    /// # Errors
    ///
    /// [`HandlerPanicked`] when the protocol handler panicked (already logged with the
    /// peer's address); the model closes this connection and nothing else. Bytes a layer
    /// refuses (a bad PROXY header, a TLS error) are logged here and end reading, so the
    /// connection finishes by the ordinary path.
    pub fn receive(&mut self, input: &[u8]) -> Result<(), HandlerPanicked> {
        if !self.is_reading {
            // Bytes after the protocol closed, or during drain, are owed nothing.
            return Ok(());
        }
        if self.layers.is_none() {
            return self.deliver(input);
        }
        let Some(input) = self.through_proxy(input) else {
            return Ok(());
        };
        if input.is_empty() {
            return Ok(());
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
                self.fail();
            }
            Ok(TlsInput::PeerClosed) if outcome.is_ok() => outcome = self.receive_eof(),
            Ok(_) => {}
        }
        self.pump();
        outcome
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
                self.fail();
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
    fn deliver(&mut self, input: &[u8]) -> Result<(), HandlerPanicked> {
        let Connection {
            session, out, peer, ..
        } = self;
        let flow = catch_handler_panic(peer, || session.on_data(input, out))?;
        if flow == Flow::Close {
            self.is_reading = false;
        }
        self.pump();
        Ok(())
    }

    /// The peer half-closed: queue what is still owed, then finish once it is sent.
    ///
    /// # Errors
    ///
    /// As [`Connection::receive`].
    pub fn receive_eof(&mut self) -> Result<(), HandlerPanicked> {
        if !self.is_reading {
            return Ok(());
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
                if !has_fired {
                    tracing::info!(peer = %self.peer, "closing: connection ended before {what}");
                }
                self.fail();
                return Ok(());
            }
        }
        let Connection {
            session, out, peer, ..
        } = self;
        let result = catch_handler_panic(peer, || session.on_eof(out));
        self.pump();
        result
    }

    /// Why a finished connection ended: the peer's EOF, a drain, or the protocol (`quit`).
    pub fn finish_reason(&self, is_draining: bool) -> CloseReason {
        if self.has_seen_eof {
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
    /// Why the connection must close: the read failed, or the handler panicked.
    pub fn on_read(
        &mut self,
        result: io::Result<usize>,
        buf: &[u8],
        log: &LoopLog,
    ) -> Result<bool, CloseReason> {
        let received = match result {
            Ok(0) => self.receive_eof(),
            Ok(n) => {
                log.received(self.transport, n);
                self.receive(&buf[..n])
            }
            Err(e) if is_transient(&e) => return Ok(false),
            Err(e) => return Err(CloseReason::Failed(e)),
        };
        received.map_err(|HandlerPanicked| CloseReason::HandlerPanicked)?;
        Ok(true)
    }

    /// Reads once from the non-blocking `stream`, as much as the bound allows, and
    /// handles the result ([`Connection::on_read`]).
    ///
    /// # Errors
    ///
    /// As [`Connection::on_read`].
    pub fn read_from(
        &mut self,
        stream: &Stream,
        buf: &mut [u8],
        log: &LoopLog,
    ) -> Result<bool, CloseReason> {
        let limit = self.read_limit(buf.len());
        if limit == 0 {
            return Ok(false);
        }
        let result = stream.read(&mut buf[..limit]);
        self.on_read(result, buf, log)
    }

    /// Writes owed bytes to the non-blocking `stream` until none are left or the kernel's
    /// send buffer is full.
    ///
    /// # Errors
    ///
    /// The write failed (the peer reset or went away): the connection must close.
    pub fn flush_to(&mut self, stream: &Stream, log: &LoopLog) -> Result<(), CloseReason> {
        while self.wants_write() {
            match stream.write(self.unsent()) {
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

    /// Lends an event loop's spare output allocation to this connection (see
    /// [`WriteBuffer::lend_spare`]), so replies need no allocation of their own.
    pub fn lend_spare(&mut self, spare: &mut Vec<u8>) {
        if self.layers.is_none() {
            self.out.lend_spare(spare);
        }
    }

    /// Gives the output allocation back once nothing is owed (see
    /// [`WriteBuffer::return_spare`]).
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
