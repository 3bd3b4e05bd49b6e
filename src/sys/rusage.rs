//! `getrusage(2)`: the CPU time this process has used, for the bench's client cost.

use super::cvt;
use std::io;
use std::time::Duration;

/// User plus system CPU time used so far by every thread of this process.
///
/// # Errors
///
/// The OS error of `getrusage`.
pub fn process_cpu_time() -> io::Result<Duration> {
    // SAFETY: `rusage` is a plain C struct of integers; all-zero bytes are a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable rusage for the duration of the call.
    cvt(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) })?;
    let time = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
    };
    Ok(time(usage.ru_utime) + time(usage.ru_stime))
}
