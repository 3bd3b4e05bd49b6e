//! Processes for the `forking` model: `fork(2)`, `waitpid(2)`, `kill(2)`, `_exit(2)`.

use super::cvt;
use std::io;

/// A process id.
pub type Pid = libc::pid_t;
/// A signal number, for [`kill`].
pub type Signal = libc::c_int;
pub use libc::{SIGKILL, SIGTERM};

/// Which side of a fork this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forked {
    /// The new process.
    Child,
    /// The original process; the child's pid.
    Parent(Pid),
}

/// How many threads this process has, from `/proc/self/status`.
///
/// # Errors
///
/// When `/proc` cannot be read or has no `Threads:` line.
pub fn thread_count() -> io::Result<usize> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Threads:"))
        .and_then(|count| count.trim().parse().ok())
        .ok_or_else(|| io::Error::other("no Threads: line in /proc/self/status"))
}

/// Forks this process.
///
/// Refuses when the process has more than one thread: the child would hold copies of
/// locks (the allocator's, the logger's) that other threads may own at that instant,
/// and could deadlock on its first allocation.
///
/// # Errors
///
/// `fork`'s OS error, or an error when the process is multi-threaded.
pub fn fork() -> io::Result<Forked> {
    let threads = thread_count()?;
    if threads != 1 {
        return Err(io::Error::other(format!(
            "refusing to fork a process with {threads} threads"
        )));
    }
    // SAFETY: the process has exactly one thread (checked above), so the child inherits
    // no lock held by another thread and may allocate and log like any process.
    let pid = cvt(unsafe { libc::fork() })?;
    Ok(if pid == 0 {
        Forked::Child
    } else {
        Forked::Parent(pid)
    })
}

/// How a reaped child ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChildEnd {
    /// It exited (`_exit`), with this status.
    Exited(i32),
    /// A signal killed it (SIGKILL, say): it ran no code of its own to the end.
    Killed(i32),
}

/// Reaps one exited child without waiting: its pid and how it ended; `None` when no
/// child has exited.
///
/// # Errors
///
/// `waitpid`'s OS error; `ECHILD` (no children at all) is reported as `None`.
pub fn reap_child() -> io::Result<Option<(Pid, ChildEnd)>> {
    let mut status = 0;
    // SAFETY: `status` is a valid, writable int for the duration of the call.
    match cvt(unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) }) {
        Ok(0) => Ok(None),
        Ok(pid) if libc::WIFSIGNALED(status) => {
            Ok(Some((pid, ChildEnd::Killed(libc::WTERMSIG(status)))))
        }
        Ok(pid) => Ok(Some((pid, ChildEnd::Exited(libc::WEXITSTATUS(status))))),
        Err(e) if e.raw_os_error() == Some(libc::ECHILD) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Sends `signal` to process `pid`.
///
/// # Errors
///
/// `kill`'s OS error, e.g. `ESRCH` when the process is gone.
pub fn kill(pid: Pid, signal: Signal) -> io::Result<()> {
    // SAFETY: kill takes no pointers; a stale pid yields ESRCH, not undefined behaviour.
    cvt(unsafe { libc::kill(pid, signal) })?;
    Ok(())
}

/// Ends this process at once with `code`, running no destructors.
///
/// A forked child uses this so that it never runs the parent's cleanup, such as removing
/// the Unix socket files the parent still serves.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit takes no pointers and never returns.
    unsafe { libc::_exit(code) }
}

/// This process's id.
pub fn id() -> libc::pid_t {
    // SAFETY: getpid takes no arguments and cannot fail.
    unsafe { libc::getpid() }
}

/// The parent's process id; 1 (or a subreaper's) once the parent has died.
pub fn parent_id() -> libc::pid_t {
    // SAFETY: getppid takes no arguments and cannot fail.
    unsafe { libc::getppid() }
}

/// Asks the kernel to send `signal` to this process when the thread that forked it exits,
/// so a helper process never outlives the server.
///
/// # Errors
///
/// `prctl`'s OS error.
pub fn set_parent_death_signal(signal: libc::c_int) -> io::Result<()> {
    // SAFETY: PR_SET_PDEATHSIG takes the signal number by value; no pointers.
    cvt(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong, 0, 0, 0) })?;
    Ok(())
}

/// Clock ticks per second, the unit of the CPU times in `/proc/PID/stat` (`sysconf(3)`).
pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf takes a constant by value and touches no memory of ours.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    // Linux has reported 100 on every architecture since 2.6; use it if sysconf fails.
    u64::try_from(ticks).ok().filter(|&t| t > 0).unwrap_or(100)
}

/// The page size in bytes, the unit of the resident set in `/proc/PID/stat`.
pub fn page_size() -> u64 {
    // SAFETY: sysconf takes a constant by value and touches no memory of ours.
    let bytes = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(bytes).ok().filter(|&b| b > 0).unwrap_or(4096)
}
