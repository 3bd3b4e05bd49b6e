//! Setting up a ring: the probe that runs before anything is bound, the words for a refused
//! setup, the task-running mode, and the one submission field `io-uring` does not name.

use super::provided::ProvidedBuffers;
use io_uring::{IoUring, Probe, opcode, squeue};
use std::io;
use std::mem;

/// Submission queue entries; more are kept in a backlog until the kernel takes them.
const SUBMISSION_ENTRIES: u32 = 1024;
/// Completion queue entries: multishot operations post many per submission.
const COMPLETION_ENTRIES: u32 = 8192;
/// Where `optlen` sits in the kernel's 64-byte `io_uring_sqe` (a stable ABI). For a
/// multishot receive it is the total byte limit (Linux 6.17, IORING_RECV_MSHOT_LIM).
const SQE_OPTLEN_OFFSET: usize = 44;

/// Checks that io_uring can serve here, before anything is bound.
///
/// # Errors
///
/// Why not, in words: disabled by sysctl, blocked by seccomp, a kernel too old, or an
/// operation it lacks.
pub fn probe() -> io::Result<()> {
    let ring = IoUring::new(8).map_err(|e| {
        let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
            .ok()
            .and_then(|text| text.trim().parse().ok());
        explain_setup_error(&e, disabled)
    })?;
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe).map_err(|e| {
        io::Error::new(e.kind(), format!("cannot probe io_uring's operations: {e}"))
    })?;
    let needed = [
        (opcode::Accept::CODE, "ACCEPT"),
        (opcode::Recv::CODE, "RECV"),
        (opcode::Send::CODE, "SEND"),
        (opcode::RecvMsg::CODE, "RECVMSG"),
        (opcode::SendMsg::CODE, "SENDMSG"),
        (opcode::PollAdd::CODE, "POLL_ADD"),
        (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
    ];
    if let Some((_, name)) = needed.iter().find(|(code, _)| !probe.is_supported(*code)) {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "this kernel's io_uring lacks IORING_OP_{name} (Linux 5.19 or newer is needed)"
            ),
        ));
    }
    // Provided-buffer rings and multishot accept came with Linux 5.19.
    ProvidedBuffers::new(&ring, 1, 64).map(drop).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("this kernel's io_uring lacks provided-buffer rings (Linux 5.19 or newer is needed): {e}"),
        )
    })
}

/// Words for an `io_uring_setup` failure, given `kernel.io_uring_disabled` if readable.
pub fn explain_setup_error(error: &io::Error, disabled_sysctl: Option<u8>) -> io::Error {
    let message = match (error.raw_os_error(), disabled_sysctl) {
        (Some(libc::EPERM | libc::EACCES), Some(level)) if level > 0 => {
            format!("io_uring is disabled by sysctl kernel.io_uring_disabled={level} ({error})")
        }
        (Some(libc::ENOSYS), _) => format!(
            "io_uring is not available: the kernel lacks it or a seccomp filter blocks it ({error})"
        ),
        (Some(libc::EPERM | libc::EACCES), _) => format!(
            "io_uring_setup was refused, probably by a seccomp filter or container policy ({error})"
        ),
        _ => format!("io_uring_setup failed: {error}"),
    };
    io::Error::new(error.kind(), message)
}

/// Builds the ring with the cheapest task-running mode the kernel has.
pub(super) fn build_ring() -> io::Result<IoUring> {
    // DEFER_TASKRUN (6.1) runs completions only when we wait, in our thread, and
    // SINGLE_ISSUER lets the kernel skip locking; COOP_TASKRUN (5.19) avoids interrupting
    // us with IPIs. Each one falls back to the next on EINVAL.
    let attempts: [fn(&mut io_uring::Builder); 3] = [
        |b| {
            b.setup_single_issuer().setup_defer_taskrun();
        },
        |b| {
            b.setup_coop_taskrun();
        },
        |_| {},
    ];
    let mut last = io::Error::from(io::ErrorKind::Unsupported);
    for configure in attempts {
        let mut builder = IoUring::builder();
        builder.setup_cqsize(COMPLETION_ENTRIES).setup_submit_all();
        configure(&mut builder);
        match builder.build(SUBMISSION_ENTRIES) {
            Ok(ring) => return Ok(ring),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => last = e,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

/// Sets a receive SQE's `optlen`: the multishot total byte limit.
pub(super) fn with_total_limit(entry: squeue::Entry, limit: u32) -> squeue::Entry {
    // SAFETY: `squeue::Entry` is `#[repr(C)]` around the kernel's 64-byte `io_uring_sqe`
    // (transmute checks the size), which is integers only: every bit pattern is valid.
    let mut bytes: [u8; 64] = unsafe { mem::transmute(entry) };
    bytes[SQE_OPTLEN_OFFSET..SQE_OPTLEN_OFFSET + 4].copy_from_slice(&limit.to_ne_bytes());
    // SAFETY: as above; the bytes are a valid SQE with one integer field changed.
    unsafe { mem::transmute::<[u8; 64], squeue::Entry>(bytes) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setup_errors_name_the_cause() {
        let eperm = io::Error::from_raw_os_error(libc::EPERM);
        let text = explain_setup_error(&eperm, Some(2)).to_string();
        assert!(text.contains("kernel.io_uring_disabled=2"), "{text}");
        let enosys = io::Error::from_raw_os_error(libc::ENOSYS);
        assert!(
            explain_setup_error(&enosys, Some(0))
                .to_string()
                .contains("seccomp")
        );
    }
}
