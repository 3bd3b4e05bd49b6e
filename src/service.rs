//! Running under a service manager (systemd): listeners passed by socket activation, and
//! the `READY=1` / `STOPPING=1` notifications.

use crate::server::{Limits, Listeners, ServeError};
use crate::sys::activation;
use std::io;
use std::os::unix::net::UnixDatagram;

/// The listeners passed by socket activation (`LISTEN_PID` is this process), in the order
/// passed; `None` when the server was not socket-activated. Call it at start, before any
/// thread is started.
///
/// # Errors
///
/// A malformed `LISTEN_FDS`, or a passed socket the server cannot serve.
pub fn passed_listeners(limits: Limits) -> Result<Option<Listeners>, ServeError> {
    let passed = activation::take_listen_fds().map_err(|source| ServeError::Bind {
        addr: "socket activation".to_string(),
        source,
    })?;
    passed.map(|fds| Listeners::adopt(fds, limits)).transpose()
}

/// What sd_notify(3) calls a service that finished starting up.
const READY_MESSAGE: &[u8] = b"READY=1";

/// The service manager's notification socket, when `NOTIFY_SOCKET` names one.
#[derive(Debug)]
pub struct Notifier {
    socket: Option<UnixDatagram>,
    /// `NOTIFY_SOCKET` as set, for the errors.
    target: String,
}

impl Notifier {
    /// Connects to `NOTIFY_SOCKET` if it is set.
    ///
    /// # Errors
    ///
    /// The socket it names cannot be reached.
    pub fn from_env() -> io::Result<Self> {
        Ok(Notifier {
            socket: activation::notify_socket()?,
            target: std::env::var_os("NOTIFY_SOCKET")
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned(),
        })
    }

    /// A notifier that sends nothing.
    pub fn disconnected() -> Self {
        Notifier {
            socket: None,
            target: String::new(),
        }
    }

    /// Tells the service manager the server is serving (`READY=1`), without waiting: the
    /// caller may be the thread that serves, which a manager slow to read its queue must
    /// not hold up.
    ///
    /// Call it only while shutdown has not fired. `STOPPING=1` always follows it: a
    /// SIGTERM/SIGINT before this call has its `STOPPING=1` sent here, right after.
    ///
    /// # Errors
    ///
    /// The OS error of sending; a manager whose notification queue is full fails with
    /// `WouldBlock`, saying that `READY=1` was not sent.
    pub fn ready(&self) -> io::Result<()> {
        let Some(socket) = &self.socket else {
            return Ok(());
        };
        let sent = socket.send(READY_MESSAGE);
        // A SIGTERM that came meanwhile left STOPPING=1 to be sent after READY=1.
        crate::sys::signal::ready_announced();
        match sent {
            // A datagram is sent whole or not at all.
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(io::Error::new(
                e.kind(),
                format!(
                    "NOTIFY_SOCKET={}: its notification queue is full, READY=1 not sent",
                    self.target
                ),
            )),
            Err(e) => Err(io::Error::new(
                e.kind(),
                format!("NOTIFY_SOCKET={}: {e}", self.target),
            )),
        }
    }

    /// Makes SIGTERM and SIGINT also send `STOPPING=1` as the drain starts; the signal
    /// handler sends it, so every model gets it without a thread of its own.
    ///
    /// # Errors
    ///
    /// The OS error of duplicating the socket.
    pub fn stopping_on_signals(&self) -> io::Result<()> {
        if let Some(socket) = &self.socket {
            crate::sys::signal::send_stopping_on_terminate(socket.try_clone()?);
        }
        Ok(())
    }
}
