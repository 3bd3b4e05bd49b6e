//! One `reverb serve` child per model: started on a free port, found through its
//! `listening` line, stopped with SIGTERM (SIGKILL if it will not go).

use crate::models::Model;
use crate::sys::process;
use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

/// How long a server may take to print its `listening` line.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);
/// The `--drain-timeout` given to every server: the load is over when it is stopped.
pub const SERVER_DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a stopped server may take to exit after SIGTERM before it is killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(4);
/// The last stderr lines kept, to explain a server that would not start.
const STDERR_LINES_KEPT: usize = 20;

/// A running server.
pub struct Server {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    stderr: Arc<Mutex<VecDeque<String>>>,
}

/// Why a server did not start.
#[derive(Debug)]
pub enum StartError {
    /// It exited (or closed stdout) before listening; the reason is its last stderr line.
    Exited(String),
    /// It printed nothing usable within the start timeout; it has been killed.
    TimedOut(Duration),
    /// It could not be spawned at all.
    Spawn(io::Error),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Exited(reason) => f.write_str(reason),
            StartError::TimedOut(timeout) => write!(
                f,
                "printed no listening line within {:.1} s",
                timeout.as_secs_f64()
            ),
            StartError::Spawn(e) => write!(f, "cannot start: {e}"),
        }
    }
}

/// How a server ended when stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// Exited 0 after SIGTERM.
    Clean,
    /// Exited otherwise (a code, or a signal).
    Failed(Option<i32>),
    /// Did not exit within [`STOP_TIMEOUT`] of SIGTERM and was killed.
    Killed,
    /// Had already exited before it was asked to stop (`None`: killed by a signal).
    DiedEarly(Option<i32>),
}

impl Server {
    /// Starts `exe serve --model MODEL --tcp 127.0.0.1:0` and waits up to `timeout` for
    /// its address.
    ///
    /// # Errors
    ///
    /// See [`StartError`]; in every case no child is left running.
    pub fn start(exe: &Path, model: Model, timeout: Duration) -> Result<Server, StartError> {
        let mut child = Command::new(exe)
            .args(["serve", "--model", model.name(), "--tcp", "127.0.0.1:0"])
            .args([
                "--drain-timeout",
                &SERVER_DRAIN_TIMEOUT.as_secs().to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(StartError::Spawn)?;
        let stderr = Arc::new(Mutex::new(VecDeque::new()));
        if let Some(pipe) = child.stderr.take() {
            let kept = Arc::clone(&stderr);
            // Drained for the child's whole life, so its logging never blocks on a full pipe.
            let _ = thread::Builder::new()
                .name("compare-stderr".into())
                .spawn(move || keep_last_lines(pipe, &kept));
        }
        let (lines, listening) = mpsc::channel();
        if let Some(pipe) = child.stdout.take() {
            let _ = thread::Builder::new()
                .name("compare-stdout".into())
                .spawn(move || {
                    for line in BufReader::new(pipe).lines() {
                        let Ok(line) = line else { break };
                        if lines.send(line).is_err() {
                            break;
                        }
                    }
                });
        }
        let mut server = Server {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            stderr,
        };
        match listening.recv_timeout(timeout) {
            Ok(line) => match parse_listening(&line) {
                Some(addr) => {
                    server.addr = addr;
                    Ok(server)
                }
                None => {
                    server.stop();
                    Err(StartError::Exited(format!("unexpected output {line:?}")))
                }
            },
            Err(RecvTimeoutError::Disconnected) => {
                // stdout closed: the server exited. Wait for it so stderr is complete.
                let _ = server.wait_for_exit(STOP_TIMEOUT);
                let _ = server.child.kill();
                let _ = server.child.wait();
                thread::sleep(Duration::from_millis(50));
                let reason = server
                    .last_stderr_line()
                    .unwrap_or_else(|| "exited before listening".to_string());
                Err(StartError::Exited(reason))
            }
            Err(RecvTimeoutError::Timeout) => {
                server.stop();
                Err(StartError::TimedOut(timeout))
            }
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last thing the server logged, without the log's timestamp and level.
    pub fn last_stderr_line(&self) -> Option<String> {
        let lines = self.stderr.lock().unwrap_or_else(PoisonError::into_inner);
        let line = lines.back()?;
        let line = line.strip_prefix("reverb: ").unwrap_or(line);
        Some(line.trim().to_string())
    }

    /// SIGTERM, then up to [`STOP_TIMEOUT`] for a clean exit, then SIGKILL.
    pub fn stop(&mut self) -> Stopped {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Stopped::DiedEarly(status.code());
        }
        let _ = process::kill(self.pid() as process::Pid, process::SIGTERM);
        match self.wait_for_exit(STOP_TIMEOUT) {
            Some(status) => stopped(status),
            None => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                Stopped::Killed
            }
        }
    }

    /// Polls for the child's exit until `timeout`.
    fn wait_for_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Never leave a server behind, whatever happened to the run.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn stopped(status: ExitStatus) -> Stopped {
    if status.success() {
        Stopped::Clean
    } else {
        Stopped::Failed(status.code())
    }
}

fn keep_last_lines(pipe: impl io::Read, kept: &Mutex<VecDeque<String>>) {
    for line in BufReader::new(pipe).lines() {
        let Ok(line) = line else { break };
        let mut lines = kept.lock().unwrap_or_else(PoisonError::into_inner);
        if lines.len() == STDERR_LINES_KEPT {
            lines.pop_front();
        }
        lines.push_back(line);
    }
}

/// `listening tcp://127.0.0.1:41234` -> the address.
fn parse_listening(line: &str) -> Option<SocketAddr> {
    line.trim()
        .strip_prefix("listening tcp://")?
        .parse::<SocketAddr>()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_lines() {
        assert_eq!(
            parse_listening("listening tcp://127.0.0.1:41234\n"),
            Some(SocketAddr::from(([127, 0, 0, 1], 41234)))
        );
        assert_eq!(parse_listening("listening udp://127.0.0.1:1"), None);
        assert_eq!(parse_listening("hello"), None);
    }
}
