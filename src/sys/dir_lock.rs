//! An exclusive `flock(2)` on a directory: serialises the servers that check, replace and
//! bind a Unix socket file in it, which no single system call does.

use super::cvt_r;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Holds an exclusive lock on a directory until dropped (closing the descriptor releases
/// it, as flock(2) says).
#[derive(Debug)]
pub struct DirLock {
    _dir: File,
}

/// Waits for, then takes, an exclusive lock on `dir`. Every reverb server takes it before
/// it probes, replaces and binds a socket file in `dir`, so two of them never interleave
/// those steps; other programs are not held back (the lock is advisory).
///
/// # Errors
///
/// The OS error of opening `dir` (e.g. `EACCES` for a directory the caller may search but
/// not read) or of `flock`.
pub fn lock_exclusive(dir: &Path) -> io::Result<DirLock> {
    // File::open is O_RDONLY | O_CLOEXEC, which opens a directory on Linux.
    let dir = File::open(dir)?;
    // SAFETY: flock takes a descriptor and a flag, no pointers; `dir` keeps the
    // descriptor open for the call.
    cvt_r(|| unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX) })?;
    Ok(DirLock { _dir: dir })
}
