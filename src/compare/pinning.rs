//! CPU pinning: every server on one CPU, the load on another, so the load generator's own
//! work never shows up as server CPU and the two never steal each other's time slices.

use super::proc;
use crate::sys::affinity;

/// Which CPUs the servers and the load use.
pub(super) struct Pinning {
    /// CPUs this process could use at the start (restored at the end).
    pub(super) allowed: Vec<usize>,
    is_pinned: bool,
}

impl Pinning {
    pub(super) fn choose(wanted: bool) -> Pinning {
        let allowed = affinity::allowed_cpus(0).unwrap_or_default();
        let is_pinned = wanted && allowed.len() >= 2;
        Pinning { allowed, is_pinned }
    }

    pub(super) fn server_cpu(&self) -> Option<usize> {
        self.is_pinned.then(|| self.allowed[0])
    }

    pub(super) fn load_cpu(&self) -> Option<usize> {
        self.is_pinned.then(|| self.allowed[1])
    }

    /// Pins the calling thread to the load CPU; the bench's threads, spawned from it,
    /// inherit that.
    pub(super) fn pin_load(&self) {
        if let Some(cpu) = self.load_cpu() {
            if let Err(e) = affinity::pin(0, &[cpu]) {
                tracing::warn!("cannot pin the load to cpu {cpu}: {e}");
            }
        }
    }

    /// Pins every thread of the server; threads and children it makes later inherit.
    pub(super) fn pin_server(&self, pid: u32) {
        if let Some(cpu) = self.server_cpu() {
            for tid in proc::threads(pid) {
                if let Err(e) = affinity::pin(tid, &[cpu]) {
                    tracing::warn!("cannot pin server thread {tid} to cpu {cpu}: {e}");
                }
            }
        }
    }

    pub(super) fn restore(&self) {
        if self.is_pinned {
            let _ = affinity::pin(0, &self.allowed);
        }
    }
}
