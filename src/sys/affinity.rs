//! `sched_setaffinity(2)`: which CPUs a thread may run on, so `reverb compare` can keep the
//! server on one core and its load on another.

use super::cvt;
use std::io;

/// A thread (or process: its main thread) by kernel id; `0` means the calling thread.
pub type ThreadId = libc::pid_t;

/// The CPUs thread `tid` may run on, in increasing order.
///
/// # Errors
///
/// `sched_getaffinity`'s OS error, e.g. `ESRCH` when the thread is gone.
pub fn allowed_cpus(tid: ThreadId) -> io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is a plain bit array; all-zero bytes are the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable cpu_set_t of exactly the size passed, for the
    // duration of the call.
    cvt(unsafe { libc::sched_getaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mut set) })?;
    let cpus = (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below CPU_SETSIZE, so CPU_ISSET reads inside `set`.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect();
    Ok(cpus)
}

/// Lets thread `tid` run only on `cpus`. Threads it creates later inherit the set.
///
/// # Errors
///
/// `InvalidInput` for an empty set or a CPU number of `CPU_SETSIZE` or more;
/// `sched_setaffinity`'s OS error (`ESRCH`: the thread is gone; `EINVAL`: none of the CPUs
/// is usable).
pub fn pin(tid: ThreadId, cpus: &[usize]) -> io::Result<()> {
    if cpus.is_empty() || cpus.iter().any(|&cpu| cpu >= libc::CPU_SETSIZE as usize) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("no usable CPU in {cpus:?}"),
        ));
    }
    // SAFETY: cpu_set_t is a plain bit array; all-zero bytes are the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        // SAFETY: `cpu` is below CPU_SETSIZE (checked above), so CPU_SET writes inside `set`.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: `set` is a valid cpu_set_t of exactly the size passed; the kernel only reads
    // it during the call.
    cvt(unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) })?;
    Ok(())
}

/// Clock ticks per second: the unit of the CPU times in `/proc/PID/stat`.
pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf takes no pointers and only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    // The kernel's USER_HZ is 100 wherever sysconf could fail to say so.
    if ticks > 0 { ticks as u64 } else { 100 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_and_restore_the_calling_thread() {
        let before = allowed_cpus(0).expect("getaffinity on self");
        assert!(!before.is_empty());
        pin(0, &before[..1]).expect("pin to one allowed cpu");
        assert_eq!(allowed_cpus(0).expect("getaffinity"), before[..1]);
        pin(0, &before).expect("restore");
        assert_eq!(allowed_cpus(0).expect("getaffinity"), before);
    }

    #[test]
    fn empty_set_is_refused() {
        assert!(pin(0, &[]).is_err());
        assert!(clock_ticks_per_second() > 0);
    }
}
