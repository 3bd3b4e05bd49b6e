//! What a server process tree costs, read from `/proc`: CPU time and resident memory.
//!
//! CPU is `utime + stime` (fields 14 and 15 of `/proc/PID/stat`) over all its threads, plus
//! `cutime + cstime` (16, 17) for children it has reaped, plus the same for children still
//! alive (found through `/proc/PID/task/*/children`), so `forking` pays for its children.
//! A live process's time (the server's own, and each child's) is the larger of its `stat`
//! fields and the sum of its threads' `schedstat` (nanoseconds): `stat` truncates each
//! process to whole clock ticks, and a hundred forked children using 7 ms each, or a
//! server using 10 % of a core over a short window, would otherwise add up to zero.
//! Memory is the proportional set size (`Pss` in `smaps_rollup`) summed over the tree:
//! pages shared by a forked parent and its children are counted once in total, not once
//! per process. Where `smaps_rollup` is missing, `VmRSS` is used instead.

use crate::sys::affinity::clock_ticks_per_second;
use std::fs;
use std::io;
use std::time::Duration;

/// How deep live descendants are followed (a forking server's children fork no further).
const MAX_DEPTH: usize = 3;

/// One reading of a process tree.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    /// CPU time used so far by the process, its reaped children and its live descendants.
    pub cpu: Duration,
    /// Resident memory of the process and its live descendants, in bytes.
    pub memory_bytes: u64,
    /// How many processes the tree has (1 + live descendants).
    pub processes: usize,
}

/// Reads the process tree rooted at `pid`.
///
/// # Errors
///
/// When `/proc/PID/stat` of the root cannot be read or parsed (the process is gone);
/// descendants that vanish while being read are skipped.
pub fn usage(pid: u32) -> io::Result<Usage> {
    let ticks = clock_ticks_per_second();
    let root = cpu_ticks(pid, true)?;
    let mut child_nanos: u128 = 0;
    let mut memory_bytes = memory(pid).unwrap_or(0);
    let mut processes = 1;
    let mut frontier = vec![pid];
    for _ in 0..MAX_DEPTH {
        let mut next = Vec::new();
        for parent in frontier {
            for child in children(parent) {
                // A child that exits between the listing and this read is skipped: its
                // time reaches the parent's cutime once it is reaped.
                if let Ok(child_ticks) = cpu_ticks(child, true) {
                    let child_ns = u128::from(child_ticks) * 1_000_000_000 / u128::from(ticks);
                    child_nanos += child_ns.max(u128::from(scheduled_ns(child)));
                    memory_bytes += memory(child).unwrap_or(0);
                    processes += 1;
                    next.push(child);
                }
            }
        }
        if next.is_empty() {
            break;
        }
        frontier = next;
    }
    // The root's own time is floored by its live threads' `schedstat` as well: a server that
    // uses a few per cent of a core for a fraction of a second may not have reached a
    // whole tick yet.
    let root_ns = u128::from(root) * 1_000_000_000 / u128::from(ticks);
    let nanos = root_ns.max(u128::from(scheduled_ns(pid))) + child_nanos;
    Ok(Usage {
        cpu: Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX)),
        memory_bytes,
        processes,
    })
}

/// `utime + stime` (and, with `with_reaped`, `cutime + cstime`) of one process, in ticks.
fn cpu_ticks(pid: u32, with_reaped: bool) -> io::Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat_ticks(&stat, with_reaped)
        .ok_or_else(|| io::Error::other(format!("cannot parse /proc/{pid}/stat")))
}

/// Parses the CPU fields of a `/proc/PID/stat` line. The command name (field 2) is in
/// parentheses and may itself hold spaces or parentheses, so fields are counted from the
/// last `)`: the token after it is field 3.
fn parse_stat_ticks(stat: &str, with_reaped: bool) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let field = |number: usize| -> Option<u64> {
        let value: i64 = fields.get(number - 3)?.parse().ok()?;
        Some(value.max(0) as u64)
    };
    let own = field(14)? + field(15)?;
    if with_reaped {
        Some(own + field(16)? + field(17)?)
    } else {
        Some(own)
    }
}

/// Nanoseconds `pid`'s live threads have run, from `/proc/PID/task/*/schedstat` (its
/// first field); 0 where the kernel keeps no schedstat.
fn scheduled_ns(pid: u32) -> u64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|task| fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|text| text.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Live children of `pid`, over all its threads (a child belongs to the thread that
/// forked it).
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for task in tasks.flatten() {
        if let Ok(list) = fs::read_to_string(task.path().join("children")) {
            found.extend(
                list.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    found
}

/// Resident memory of one process in bytes: `Pss`, or `VmRSS` when that is unavailable.
fn memory(pid: u32) -> Option<u64> {
    let kib_field = |text: &str, name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .map(|kib| kib * 1024)
    };
    if let Ok(rollup) = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) {
        if let Some(bytes) = kib_field(&rollup, "Pss:") {
            return Some(bytes);
        }
    }
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    kib_field(&status, "VmRSS:")
}

/// The kernel ids of every thread of `pid`.
pub fn threads(pid: u32) -> Vec<i32> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| task.file_name().to_str()?.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
        // utime stime cutime cstime ...
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 11 13 20 0 1 0";
        assert_eq!(parse_stat_ticks(stat, false), Some(10));
        assert_eq!(parse_stat_ticks(stat, true), Some(34));
        assert_eq!(parse_stat_ticks("garbage", true), None);
    }

    #[test]
    fn this_process_has_cpu_and_memory() {
        let me = std::process::id();
        let spin = std::time::Instant::now();
        while spin.elapsed() < Duration::from_millis(30) {
            std::hint::black_box(0u64);
        }
        let usage = usage(me).expect("read own /proc");
        assert!(usage.memory_bytes > 0);
        assert!(usage.processes >= 1);
        assert!(!threads(me).is_empty());
    }
}
