//! The standard `process_*` metrics, read from `/proc/PID` (proc(5)) at each scrape.

use crate::sys::process::{Pid, clock_ticks_per_second, page_size};
use std::fs;

/// One reading of the server process.
#[derive(Debug, Default)]
pub(super) struct ProcessSample {
    /// User and system CPU of the process and of the children it has reaped (a `forking`
    /// server's work is done in children), in seconds.
    pub cpu_seconds: f64,
    pub resident_memory_bytes: u64,
    pub virtual_memory_bytes: u64,
    /// Seconds since the Unix epoch.
    pub start_time_seconds: f64,
    pub open_fds: u64,
    pub max_fds: Option<u64>,
}

/// Reads `/proc/PID/stat`, `/proc/PID/fd`, `/proc/PID/limits` and `/proc/stat`; `None`
/// when the stat file cannot be read or parsed.
pub(super) fn sample(pid: Pid) -> Option<ProcessSample> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses; fields resume after the
    // last ')'. Counting from field 3 ("state") at index 0: utime is field 14.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let field = |number: usize| -> Option<u64> { fields.get(number - 3)?.parse().ok() };
    let ticks = clock_ticks_per_second() as f64;
    let cpu_ticks = field(14)? + field(15)? + field(16)? + field(17)?;
    let boot_time = fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines()
            .find_map(|line| line.strip_prefix("btime "))
            .and_then(|secs| secs.trim().parse::<u64>().ok())
    });
    let open_fds = fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |dir| dir.count() as u64);
    let max_fds = fs::read_to_string(format!("/proc/{pid}/limits"))
        .ok()
        .and_then(|limits| {
            limits
                .lines()
                .find(|line| line.starts_with("Max open files"))
                .and_then(|line| line.split_whitespace().nth(3)?.parse().ok())
        });
    Some(ProcessSample {
        cpu_seconds: cpu_ticks as f64 / ticks,
        resident_memory_bytes: field(24)? * page_size(),
        virtual_memory_bytes: field(23)?,
        start_time_seconds: boot_time.unwrap_or(0) as f64 + field(22)? as f64 / ticks,
        open_fds,
        max_fds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let sample = sample(crate::sys::process::id()).expect("own /proc");
        assert!(sample.resident_memory_bytes > 0);
        assert!(sample.open_fds >= 3);
        assert!(sample.start_time_seconds > 1.0e9);
    }
}
