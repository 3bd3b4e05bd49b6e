//! Binding every socket the command line names, with its rules (stale Unix sockets are
//! replaced, a path that is not a socket is never touched), and counting connections
//! against `--max-conns`.

use super::{AcceptQueues, Limits, ServeError};
use crate::addr::ListenSpec;
use crate::net::{DatagramSocket, StreamListener, UnixPathState, probe_unix_path};
use crate::sys::dir_lock;
use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Counts open stream connections against `--max-conns`, across every thread or loop.
#[derive(Clone, Debug)]
pub struct ConnectionCounter {
    open: Arc<AtomicUsize>,
    max_conns: Option<usize>,
}

/// One admitted connection; dropping it frees its place under `--max-conns`.
#[derive(Debug)]
pub struct Admission {
    open: Arc<AtomicUsize>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ConnectionCounter {
    /// A counter for at most `max_conns` connections (`None`: unlimited).
    pub fn new(max_conns: Option<usize>) -> Self {
        ConnectionCounter {
            open: Arc::new(AtomicUsize::new(0)),
            max_conns,
        }
    }

    /// Takes a place, or `None` when `max_conns` are already open.
    pub fn admit(&self) -> Option<Admission> {
        let max = self.max_conns.unwrap_or(usize::MAX);
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < max).then_some(open + 1)
            })
            .ok()
            .map(|_| Admission {
                open: self.open.clone(),
            })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// The limit, if any.
    pub fn max_conns(&self) -> Option<usize> {
        self.max_conns
    }
}

/// Removes a Unix socket file we created when the server ends, unless something else
/// has replaced it meanwhile.
#[derive(Debug)]
struct UnixPathGuard {
    path: PathBuf,
    inode: u64,
    device: u64,
}

impl Drop for UnixPathGuard {
    fn drop(&mut self) {
        if let Ok(meta) = fs::symlink_metadata(&self.path) {
            if meta.ino() == self.inode && meta.dev() == self.device {
                let _ = fs::remove_file(&self.path);
            }
        }
    }
}

/// Every socket the server was asked to serve, bound and listening.
#[derive(Debug)]
pub struct Listeners {
    /// Stream listeners (TCP and Unix), in the order the flags were given.
    pub streams: Vec<StreamListener>,
    /// Datagram sockets (UDP and Unix), in the order the flags were given.
    pub datagrams: Vec<DatagramSocket>,
    /// The operator's limits.
    pub limits: Limits,
    /// Open connections against `--max-conns`, shared by every thread of the model.
    pub counter: ConnectionCounter,
    /// Every bound address in flag order, as the `listening` lines print it.
    pub(super) names: Vec<String>,
    unix_paths: Vec<UnixPathGuard>,
}

impl Listeners {
    /// Binds every spec in order.
    ///
    /// With [`AcceptQueues::OnePerLoop`], TCP listeners are bound with SO_REUSEPORT, so
    /// that each event loop can get a sibling with its own accept queue
    /// ([`StreamListener::bind_own_queue`]).
    ///
    /// # Errors
    ///
    /// The first spec that cannot be bound, naming it as the user typed it.
    pub fn bind(
        specs: &[ListenSpec],
        limits: Limits,
        queues: AcceptQueues,
    ) -> Result<Self, ServeError> {
        let mut listeners = Listeners::empty(limits);
        for spec in specs {
            let addr = spec.to_string();
            let bind_error = |source| ServeError::Bind {
                addr: addr.clone(),
                source,
            };
            match spec {
                ListenSpec::Tcp(want) => {
                    let reuseport = queues == AcceptQueues::OnePerLoop;
                    let listener =
                        StreamListener::bind_tcp(*want, reuseport).map_err(bind_error)?;
                    listeners.names.push(listener.name().to_string());
                    listeners.streams.push(listener);
                }
                ListenSpec::Udp(want) => {
                    let (socket, local) = DatagramSocket::bind_udp(*want).map_err(bind_error)?;
                    socket.size_buffers().map_err(bind_error)?;
                    listeners.names.push(format!("udp://{local}"));
                    listeners.datagrams.push(socket);
                }
                ListenSpec::Unix(path) => {
                    let _lock = lock_parent(path);
                    prepare_unix_path(&addr, path, false)?;
                    let listener = UnixListener::bind(path).map_err(bind_error)?;
                    listeners
                        .unix_paths
                        .push(guard_for(path).map_err(bind_error)?);
                    let name = ListenSpec::Unix(absolute_or_as_typed(path)).to_string();
                    listeners.names.push(name.clone());
                    listeners
                        .streams
                        .push(StreamListener::from_unix(listener, name));
                }
                ListenSpec::UnixDatagram(path) => {
                    let _lock = lock_parent(path);
                    prepare_unix_path(&addr, path, true)?;
                    let socket = UnixDatagram::bind(path).map_err(bind_error)?;
                    listeners
                        .unix_paths
                        .push(guard_for(path).map_err(bind_error)?);
                    let socket = DatagramSocket::Unix(socket);
                    socket.size_buffers().map_err(bind_error)?;
                    let name = ListenSpec::UnixDatagram(absolute_or_as_typed(path));
                    listeners.names.push(name.to_string());
                    listeners.datagrams.push(socket);
                }
            }
        }
        Ok(listeners)
    }

    /// No listener yet.
    pub(super) fn empty(limits: Limits) -> Self {
        Listeners {
            streams: Vec::new(),
            datagrams: Vec::new(),
            counter: ConnectionCounter::new(limits.max_conns),
            limits,
            names: Vec::new(),
            unix_paths: Vec::new(),
        }
    }

    /// Every bound address in flag order, e.g. `tcp://127.0.0.1:41234`.
    pub fn names(&self) -> &[String] {
        &self.names
    }
}

/// The path a readiness line names: absolute, as `unix:///abs/path` addresses are, so a
/// script can hand it to `reverb client` (errors still name the path as typed).
fn absolute_or_as_typed(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Applies the Unix path rules: a stale socket is replaced, a live one is in use (whatever
/// its kind, and however busy: see [`probe_unix_path`]), and a path that is not a socket
/// is never touched.
fn prepare_unix_path(addr: &str, path: &Path, datagram: bool) -> Result<(), ServeError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ServeError::Bind {
                addr: addr.to_string(),
                source,
            });
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ServeError::NotASocket {
            addr: addr.to_string(),
            path: path.to_path_buf(),
        });
    }
    match probe_unix_path(path, datagram) {
        Ok(UnixPathState::Stale) => {
            tracing::info!("replacing stale socket {}", path.display());
            fs::remove_file(path).map_err(|source| ServeError::Bind {
                addr: addr.to_string(),
                source,
            })
        }
        Ok(UnixPathState::Live) => Err(ServeError::UnixPathInUse {
            addr: addr.to_string(),
            path: path.to_path_buf(),
        }),
        Err(source) => Err(ServeError::Bind {
            addr: addr.to_string(),
            source,
        }),
    }
}

/// Locks the directory of a Unix socket path while the server checks, replaces and binds
/// it (see [`dir_lock`]), so that two servers starting at once over one stale file do not
/// both bind it: the second waits, then finds the first one's live socket. A directory
/// that cannot be locked (one the server may search but not read) is bound unlocked.
fn lock_parent(path: &Path) -> Option<dir_lock::DirLock> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    dir_lock::lock_exclusive(dir)
        .inspect_err(|e| tracing::debug!("binding {} unlocked: {e}", path.display()))
        .ok()
}

fn guard_for(path: &Path) -> io::Result<UnixPathGuard> {
    let meta = fs::symlink_metadata(path)?;
    Ok(UnixPathGuard {
        path: path.to_path_buf(),
        inode: meta.ino(),
        device: meta.dev(),
    })
}
