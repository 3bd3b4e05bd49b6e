//! Shared test machinery: start the real `reverb` binary, read its `listening` lines
//! instead of sleeping, talk to it over real sockets, stop it with SIGTERM.
//!
//! Every blocking read here has a timeout, so a broken model fails a test instead of
//! hanging CI.

#![allow(dead_code)]

pub mod cases;

use std::cell::RefCell;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How the current test thread runs the cases: over TCP (the default) or a Unix stream
/// socket, and with which extra `serve` flags. Set by [`with_variant`]; each test runs on
/// its own thread, so one test's variant never leaks into another.
#[derive(Clone, Debug, Default)]
pub struct Variant {
    /// Serve `--unix PATH` wherever a case asks for `--tcp 127.0.0.1:0`.
    pub is_unix: bool,
    /// Flags added to every `serve`, unless the case sets the same flag itself.
    pub extra_args: Vec<String>,
}

thread_local! {
    static VARIANT: std::cell::RefCell<Variant> = std::cell::RefCell::default();
}

/// Runs `case` with `variant` in force on this thread.
pub fn with_variant(variant: Variant, case: impl FnOnce()) {
    VARIANT.with(|v| *v.borrow_mut() = variant);
    case();
}

/// The variant in force on this thread.
pub fn variant() -> Variant {
    VARIANT.with(|v| v.borrow().clone())
}

/// A case's `serve` arguments under the thread's variant.
fn apply_variant(args: &[&str]) -> Vec<String> {
    let variant = variant();
    let mut out: Vec<String> = Vec::new();
    let mut iter = args.iter().peekable();
    while let Some(arg) = iter.next() {
        if variant.is_unix && *arg == "--tcp" && iter.peek() == Some(&&"127.0.0.1:0") {
            iter.next();
            out.push("--unix".into());
            out.push(temp_socket_path("variant").to_str().unwrap().into());
        } else {
            out.push(arg.to_string());
        }
    }
    for pair in variant.extra_args.chunks(2) {
        if !out.contains(&pair[0]) {
            out.extend(pair.iter().cloned());
        }
    }
    out
}

/// The default patience for anything a server should do promptly.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// How long a whole transfer (everything back until EOF) may take before it counts as
/// hung: each read also has its own timeout, but a server that trickles a byte at a time
/// would otherwise keep a test alive for ever.
pub const TRANSFER_DEADLINE: Duration = Duration::from_secs(30);

/// How long one conformance case may take in all. Past it the case fails, naming itself,
/// and the servers it started are killed, so one hung model cannot stall the suite.
pub const CASE_DEADLINE: Duration = Duration::from_secs(60);

/// Servers started by one case, so that its watchdog can kill them: pid and stderr.
type CaseServers = Arc<Mutex<Vec<(u32, Arc<Mutex<String>>)>>>;

thread_local! {
    /// The registry of the case running on this thread, if it runs under [`run_case`].
    static CASE_SERVERS: RefCell<Option<CaseServers>> = const { RefCell::new(None) };
}

/// Runs `case` for `model` on its own thread with a watchdog: a case that does not finish
/// within [`CASE_DEADLINE`] fails with its name and its servers' logs, and its servers are
/// killed (which also unblocks the case's own reads and writes).
pub fn run_case(model: &str, name: &str, case: impl FnOnce(&str) + Send + 'static) {
    let servers: CaseServers = Arc::default();
    let registry = servers.clone();
    let model_name = model.to_string();
    let (done_tx, done_rx) = mpsc::channel();
    let worker = thread::Builder::new()
        .name(format!("{model}::{name}"))
        .spawn(move || {
            CASE_SERVERS.with(|slot| *slot.borrow_mut() = Some(registry));
            let result =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| case(&model_name)));
            let _ = done_tx.send(result);
        })
        .expect("spawn the case thread");
    match done_rx.recv_timeout(CASE_DEADLINE) {
        Ok(Ok(())) => {
            let _ = worker.join();
        }
        Ok(Err(payload)) => {
            let _ = worker.join();
            let message = (payload.downcast_ref::<String>().map(String::as_str))
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            stop_if_failing_fast(model, name, message);
            std::panic::resume_unwind(payload);
        }
        Err(_) => {
            let mut logs = String::new();
            for (pid, stderr) in servers.lock().unwrap().iter() {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
                logs.push_str(&format!("--- server {pid}:\n{}\n", stderr.lock().unwrap()));
            }
            let why = format!(
                "{model}: {name} hung: not finished within {CASE_DEADLINE:?}; its servers were killed; their logs:\n{logs}"
            );
            stop_if_failing_fast(model, name, &why);
            panic!("{why}");
        }
    }
}

/// Set (to anything) by `scripts/mutants.sh`: the first case that fails ends the whole
/// test binary, since a mutant needs one failure to count as caught, and a mutant that
/// breaks every case would otherwise cost each case its own timeouts.
const FAIL_FAST_VAR: &str = "REVERB_TEST_FAIL_FAST";

/// Under [`FAIL_FAST_VAR`], exits the test binary (status 101, as a failed test run) after
/// writing which case failed and why to stderr itself (the test harness's capture of the
/// case's output is never printed on this exit); the servers other cases started are left
/// to whoever set it (`scripts/mutants.sh` kills every server whose test process is gone).
fn stop_if_failing_fast(model: &str, name: &str, why: &str) {
    if std::env::var_os(FAIL_FAST_VAR).is_some() {
        let _ = writeln!(
            io::stderr(),
            "{model}: {name} failed: {why}\n{FAIL_FAST_VAR} is set: no other case runs"
        );
        std::process::exit(101);
    }
}

fn register_case_server(pid: u32, stderr: &Arc<Mutex<String>>) {
    CASE_SERVERS.with(|slot| {
        if let Some(servers) = &*slot.borrow() {
            servers.lock().unwrap().push((pid, stderr.clone()));
        }
    });
}

/// Forgets a server that was reaped, so the watchdog never signals a reused pid.
fn unregister_case_server(pid: u32) {
    CASE_SERVERS.with(|slot| {
        if let Some(servers) = &*slot.borrow() {
            servers.lock().unwrap().retain(|(p, _)| *p != pid);
        }
    });
}

/// The binary under test.
pub fn reverb() -> Command {
    Command::new(env!("CARGO_BIN_EXE_reverb"))
}

/// A running `reverb serve`.
pub struct Server {
    child: Option<Child>,
    /// The `listening` lines' addresses, in order (`tcp://127.0.0.1:41234`, ...).
    pub addrs: Vec<String>,
    stderr: Arc<Mutex<String>>,
    stdout_rest: Arc<Mutex<String>>,
}

/// A fresh path for a Unix socket in the temp dir.
pub fn temp_socket_path(tag: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "reverb-test-{}-{}-{}.sock",
        std::process::id(),
        tag,
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

impl Server {
    /// Starts `reverb serve --model MODEL ARGS...` and waits for its `listening` lines
    /// (one per listener flag in `args`).
    pub fn start(model: &str, args: &[&str]) -> Server {
        Server::spawn(reverb(), model, args)
    }

    /// Starts the server with its open-file limit (soft and hard) set to `limit`.
    pub fn start_with_fd_limit(model: &str, args: &[&str], limit: u32) -> Server {
        let mut command = Command::new("bash");
        command.args([
            "-c",
            &format!("ulimit -n {limit} && exec \"$0\" \"$@\""),
            env!("CARGO_BIN_EXE_reverb"),
        ]);
        Server::spawn(command, model, args)
    }

    /// Starts the server with the environment variables `env` set.
    pub fn start_with_env(model: &str, args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut command = reverb();
        command.envs(env.iter().copied());
        Server::spawn(command, model, args)
    }

    /// Starts the server in the working directory `dir` (for relative paths).
    pub fn start_in_dir(dir: &Path, model: &str, args: &[&str]) -> Server {
        let mut command = reverb();
        command.current_dir(dir);
        Server::spawn(command, model, args)
    }

    /// Starts `reverb serve --model MODEL` with no listener flag: the defaults, TCP and UDP
    /// on 127.0.0.1:7007. Returns `None`, after saying so on the terminal, when something
    /// else holds that port (a quick-start server left running, say).
    pub fn start_on_default_port(model: &str) -> Option<Server> {
        if let Err(holder) = default_port_is_free() {
            skip(&format!("127.0.0.1:{DEFAULT_PORT} is taken ({holder})"));
            return None;
        }
        Some(Server::spawn_expecting(reverb(), model, &[], 2))
    }

    fn spawn(command: Command, model: &str, args: &[&str]) -> Server {
        let args = apply_variant(args);
        let listeners = args
            .iter()
            .filter(|a| {
                matches!(
                    a.as_str(),
                    "--tcp" | "--udp" | "--unix" | "--unix-dgram" | "--metrics"
                )
            })
            .count();
        assert!(listeners > 0, "tests name their listeners");
        Server::spawn_expecting(command, model, &args, listeners)
    }

    fn spawn_expecting(
        mut command: Command,
        model: &str,
        args: &[String],
        listeners: usize,
    ) -> Server {
        let mut child = command
            .arg("serve")
            .args(["--model", model])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn reverb");
        let stderr = Arc::new(Mutex::new(String::new()));
        let stderr_sink = stderr.clone();
        let mut err = child.stderr.take().expect("stderr piped");
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                stderr_sink
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let (lines_tx, lines_rx) = mpsc::channel();
        let stdout_rest = Arc::new(Mutex::new(String::new()));
        let rest_sink = stdout_rest.clone();
        let out = child.stdout.take().expect("stdout piped");
        thread::spawn(move || {
            let mut seen = 0;
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if seen < listeners {
                    seen += 1;
                    let _ = lines_tx.send(line);
                } else {
                    rest_sink.lock().unwrap().push_str(&line);
                }
            }
        });
        let mut addrs = Vec::new();
        let deadline = Instant::now() + PATIENCE;
        while addrs.len() < listeners {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines_rx.recv_timeout(left) {
                Ok(line) => {
                    let addr = line
                        .strip_prefix("listening ")
                        .unwrap_or_else(|| panic!("unexpected stdout line {line:?}"));
                    addrs.push(addr.to_string());
                }
                Err(_) => {
                    let exited = child.try_wait().ok().flatten();
                    let _ = child.kill();
                    let _ = child.wait();
                    // The stderr reader may still be copying the last lines.
                    thread::sleep(Duration::from_millis(100));
                    let what = match exited {
                        Some(status) => format!("exited ({status}) before its listening lines"),
                        None => format!("no listening lines within {PATIENCE:?}"),
                    };
                    panic!("{model}: {what}; stderr:\n{}", stderr.lock().unwrap());
                }
            }
        }
        register_case_server(child.id(), &stderr);
        Server {
            child: Some(child),
            addrs,
            stderr,
            stdout_rest,
        }
    }

    /// The address of the first listener with this scheme, without the scheme
    /// (`127.0.0.1:41234` or `/tmp/x.sock`).
    pub fn addr(&self, scheme: &str) -> String {
        let prefix = format!("{scheme}://");
        self.addrs
            .iter()
            .find_map(|a| a.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no {scheme} listener in {:?}", self.addrs))
            .to_string()
    }

    /// Connects to the first TCP listener.
    pub fn connect_tcp(&self) -> TcpStream {
        let stream = TcpStream::connect(self.addr("tcp")).expect("connect");
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        stream.set_write_timeout(Some(PATIENCE)).unwrap();
        stream
    }

    /// The server's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Everything the server logged so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until the server's log contains `needle`; fails the test after `PATIENCE`.
    pub fn wait_for_log(&self, needle: &str) {
        let deadline = Instant::now() + PATIENCE;
        while !self.stderr().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "the log never said {needle:?}:\n{}",
                self.stderr()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until one line of the server's log holds every one of `needles` (a message
    /// and its fields, such as `peer=127.0.0.1:4000`); fails the test after `PATIENCE`.
    pub fn wait_for_log_line(&self, needles: &[&str]) {
        let deadline = Instant::now() + PATIENCE;
        while !self.has_log_line(needles) {
            assert!(
                Instant::now() < deadline,
                "no log line said all of {needles:?}:\n{}",
                self.stderr()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether one line of the server's log so far holds every one of `needles`.
    pub fn has_log_line(&self, needles: &[&str]) -> bool {
        let log = self.stderr();
        log.lines()
            .any(|line| needles.iter().all(|needle| line.contains(needle)))
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        self.signal("-TERM");
    }

    /// Sends `signal` (`-TERM`, `-STOP`, `-CONT`) to the server, without waiting for it
    /// to take effect.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {signal}");
    }

    /// Waits up to `timeout` for the server to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("running");
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                unregister_case_server(child.id());
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then asserts a clean exit (0) within `PATIENCE`, and that stdout held
    /// nothing but the `listening` lines.
    pub fn stop(mut self) {
        self.terminate();
        let status = self.wait_exit(PATIENCE);
        let stderr = self.stderr();
        let status = status.unwrap_or_else(|| panic!("no exit after SIGTERM; stderr:\n{stderr}"));
        assert!(
            status.success(),
            "exit {status} after SIGTERM; stderr:\n{stderr}"
        );
        assert_eq!(
            *self.stdout_rest.lock().unwrap(),
            "",
            "stdout holds only listening lines"
        );
    }

    /// CPU time (user + system) the server process has used so far.
    pub fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        let after_name = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        // USER_HZ is 100 on Linux.
        Duration::from_millis(ticks * 10)
    }

    /// CPU time the server spends while the test waits `span`.
    pub fn cpu_spent_over(&self, span: Duration) -> Duration {
        let before = self.cpu_time();
        std::thread::sleep(span);
        self.cpu_time() - before
    }

    /// Resident memory of the server and all its child processes, in KiB.
    pub fn rss_kib(&self) -> u64 {
        tree_rss_kib(self.pid())
    }
}

impl Server {
    /// The CPU the server used over `span`, and the threads (by id) that used CPU in that
    /// span (3 ticks or more) without sleeping once: spinning, whatever the machine's load
    /// (a loaded machine may give a spinning thread little CPU, but never a sleep).
    pub fn cpu_and_spinning_threads_over(&self, span: Duration) -> (Duration, Vec<String>) {
        let before = thread_cpu_and_sleeps(self.pid());
        let spent = self.cpu_spent_over(span);
        let after = thread_cpu_and_sleeps(self.pid());
        let mut spinning = Vec::new();
        for (tid, (ticks, sleeps)) in after {
            let (ticks_before, sleeps_before) = before.get(&tid).copied().unwrap_or_default();
            if ticks - ticks_before >= 3 && sleeps == sleeps_before {
                spinning.push(tid);
            }
        }
        (spent, spinning)
    }

    /// As [`Server::cpu_and_spinning_threads_over`], over a span in which nothing the
    /// server serves moved: `look` (the queues of its connection, say) gives the same
    /// before and after. A fixed wait before the span cannot promise that the server has
    /// done its last work (filled the buffers, read to its bound): a loaded machine may
    /// hold a server back for seconds, and the work it then catches up on is not
    /// spinning. A span in which something moved is measured again; fails if nothing
    /// stays still for a whole span within twice [`PATIENCE`].
    pub fn cpu_and_spinning_threads_while_still<T: PartialEq + std::fmt::Debug>(
        &self,
        span: Duration,
        look: impl Fn() -> T,
    ) -> (Duration, Vec<String>) {
        let start = Instant::now();
        loop {
            let before = look();
            let measured = self.cpu_and_spinning_threads_over(span);
            let after = look();
            if after == before {
                return measured;
            }
            assert!(
                start.elapsed() < 2 * PATIENCE,
                "nothing stayed still for {span:?} in {:?}: {before:?}, then {after:?}",
                2 * PATIENCE
            );
        }
    }
}

impl Server {
    /// Waits until no thread of the server runs or waits for a CPU (proc(5) state `R`),
    /// all at one look, so that a span measured next holds no work left over from before
    /// it: after a reply, say, a loaded machine may run the rest of the server's turn
    /// (and its start-up) only much later. Fails after [`PATIENCE`], naming the threads
    /// that never slept: a thread that spins never does.
    pub fn wait_until_asleep(&self) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let running = running_threads(self.pid());
            if running.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "threads {running:?} of the server never all slept within {PATIENCE:?}: \
                 spinning"
            );
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The threads (by id) of process `pid` that run or wait for a CPU (state `R`, proc(5)).
fn running_threads(pid: u32) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut running = Vec::new();
    for task in tasks.flatten() {
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // The state is the first field after the command name, which is in parentheses.
        let state = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .next();
        if state == Some("R") {
            running.push(task.file_name().to_string_lossy().into_owned());
        }
    }
    running
}

/// For each thread of process `pid`: the CPU it used (user and system, in clock ticks,
/// proc(5)) and how many times it went to sleep (voluntary context switches).
pub fn thread_cpu_and_sleeps(pid: u32) -> std::collections::HashMap<String, (u64, u64)> {
    let mut threads = std::collections::HashMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return threads;
    };
    for task in tasks.flatten() {
        let dir = task.path();
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
        // The fields after the command name, which is in parentheses: utime and stime are
        // the 14th and 15th of the line, the 12th and 13th after it.
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        let tick = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        let sleeps = status
            .lines()
            .find_map(|line| line.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0);
        let name = task.file_name().to_string_lossy().into_owned();
        threads.insert(name, (tick(11) + tick(12), sleeps));
    }
    threads
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
            unregister_case_server(child.id());
        }
        // A test that fails while a server runs shows what that server logged: the cause is
        // often there, not in the assertion.
        if thread::panicking() {
            eprintln!(
                "--- stderr of the reverb server (pid {}) ---\n{}--- end of its stderr ---",
                self.child.as_ref().map_or(0, Child::id),
                self.stderr()
            );
        }
    }
}

/// The port `reverb serve` listens on when no listener flag is given.
pub const DEFAULT_PORT: u16 = 7007;

/// Whether TCP and UDP 127.0.0.1:`DEFAULT_PORT` can be bound right now; `Err` says which
/// one is held.
pub fn default_port_is_free() -> Result<(), String> {
    let addr = ("127.0.0.1", DEFAULT_PORT);
    std::net::TcpListener::bind(addr).map_err(|e| format!("TCP: {e}"))?;
    std::net::UdpSocket::bind(addr).map_err(|e| format!("UDP: {e}"))?;
    Ok(())
}

/// Tells the person running the tests that a test did not run, and why. Written straight to
/// the terminal: the test harness would hide a `println!` of a passing test.
pub fn skip(why: &str) {
    let test = thread::current().name().unwrap_or("a test").to_string();
    let _ = writeln!(io::stderr().lock(), "\nskipped {test}: {why}");
}

/// Resident memory of process `pid` and all its descendants, in KiB.
pub fn tree_rss_kib(pid: u32) -> u64 {
    let own = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0);
    let children: u64 = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
                .collect::<Vec<_>>()
        })
        .map(tree_rss_kib)
        .sum();
    own + children
}

/// Deterministic pseudo-random bytes (xorshift), different per seed.
///
/// Eight bytes a step: the tests are built without optimisation, and at a byte a step the
/// 64 MiB of a flood case took most of the CPU the case used, which on a loaded machine
/// stretched the case past [`CASE_DEADLINE`].
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut bytes = vec![0u8; len];
    for word in bytes.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        word.copy_from_slice(&state.to_le_bytes()[..word.len()]);
    }
    bytes
}

/// A stream to a server, TCP or Unix, with timeouts set.
pub enum Conn {
    /// TCP.
    Tcp(TcpStream),
    /// Unix.
    Unix(UnixStream),
}

impl Conn {
    /// Connects to `tcp://...` or `unix://...` as printed by the server.
    pub fn connect(addr: &str) -> io::Result<Conn> {
        let conn = if let Some(path) = addr.strip_prefix("unix://") {
            Conn::Unix(UnixStream::connect(path)?)
        } else {
            let target = addr.strip_prefix("tcp://").unwrap_or(addr);
            Conn::Tcp(TcpStream::connect(target)?)
        };
        conn.set_timeouts(PATIENCE);
        Ok(conn)
    }

    /// Sets read and write timeouts.
    pub fn set_timeouts(&self, timeout: Duration) {
        match self {
            Conn::Tcp(s) => {
                s.set_read_timeout(Some(timeout)).unwrap();
                s.set_write_timeout(Some(timeout)).unwrap();
            }
            Conn::Unix(s) => {
                s.set_read_timeout(Some(timeout)).unwrap();
                s.set_write_timeout(Some(timeout)).unwrap();
            }
        }
    }

    /// A second handle, for a writer thread.
    pub fn try_clone(&self) -> Conn {
        match self {
            Conn::Tcp(s) => Conn::Tcp(s.try_clone().unwrap()),
            Conn::Unix(s) => Conn::Unix(s.try_clone().unwrap()),
        }
    }

    /// Half-closes our sending side.
    pub fn shutdown_write(&self) {
        match self {
            Conn::Tcp(s) => s.shutdown(Shutdown::Write).unwrap(),
            Conn::Unix(s) => s.shutdown(Shutdown::Write).unwrap(),
        }
    }

    /// Reads until EOF (or error, or [`TRANSFER_DEADLINE`]), returning what arrived.
    pub fn read_to_end_lossy(&mut self) -> (Vec<u8>, Option<io::Error>) {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        let deadline = Instant::now() + TRANSFER_DEADLINE;
        loop {
            if Instant::now() >= deadline {
                let error = io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no EOF within {TRANSFER_DEADLINE:?}"),
                );
                return (got, Some(error));
            }
            match self.read(&mut buf) {
                Ok(0) => return (got, None),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return (got, Some(e)),
            }
        }
    }

    /// Reads exactly `len` bytes.
    pub fn read_exactly(&mut self, len: usize) -> Vec<u8> {
        let mut got = vec![0u8; len];
        self.read_exact(&mut got)
            .unwrap_or_else(|e| panic!("reading {len} bytes: {e}"));
        got
    }

    /// Whether nothing at all arrives (no byte, no EOF) within `wait`.
    pub fn receives_nothing_within(&mut self, wait: Duration) -> bool {
        self.set_timeouts(wait);
        let mut buf = [0u8; 1];
        let silent = match self.read(&mut buf) {
            Ok(_) => false,
            Err(e) => matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
        };
        self.set_timeouts(PATIENCE);
        silent
    }

    /// Whether the server closed: EOF (or a reset) within `timeout`, with no data first.
    pub fn sees_close_within(&mut self, timeout: Duration) -> bool {
        self.set_timeouts(timeout);
        let mut buf = [0u8; 1];
        let closed = match self.read(&mut buf) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() == io::ErrorKind::ConnectionReset,
        };
        self.set_timeouts(PATIENCE);
        closed
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Sends `input` from a thread, half-closes, and reads everything back until EOF.
pub fn round_trip(mut conn: Conn, input: Vec<u8>) -> Vec<u8> {
    let mut writer = conn.try_clone();
    let sender = thread::spawn(move || {
        writer.write_all(&input).expect("send");
        writer.shutdown_write();
    });
    let (got, error) = conn.read_to_end_lossy();
    // A failed read fails the test at once; the sender may still be stuck in a write.
    if let Some(e) = error {
        panic!("reading the reply after {} bytes: {e}", got.len());
    }
    sender.join().expect("sender");
    got
}

/// Kernel queues of the two ends of one loopback TCP connection, from `/proc/net/tcp`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpQueues {
    /// Bytes the client wrote that the server's kernel has not acknowledged yet.
    pub client_unacked: u64,
    /// Bytes that arrived at the client and it has not read.
    pub client_unread: u64,
    /// Bytes the server wrote that the client's kernel has not acknowledged yet.
    pub server_unacked: u64,
    /// Bytes that arrived at the server and it has not read.
    pub server_unread: u64,
}

impl TcpQueues {
    /// The queues of `conn`'s connection ([`TcpQueues::read_listed`]); `None` over a Unix
    /// socket, whose queues are not listed, or once the connection is gone.
    pub fn of_conn(conn: &Conn) -> Option<TcpQueues> {
        let Conn::Tcp(stream) = conn else {
            return None;
        };
        let (client, server) = (stream.local_addr().unwrap(), stream.peer_addr().unwrap());
        TcpQueues::read_listed(client, server)
    }

    /// Waits up to [`PATIENCE`] until at least `bytes` sent on `conn` wait unread in the
    /// server's socket, where a close that does not linger would answer them with a reset;
    /// `false` if they never do (always over a Unix socket, whose queues are not listed).
    pub fn wait_server_unread(conn: &Conn, bytes: usize) -> bool {
        let deadline = Instant::now() + PATIENCE;
        while TcpQueues::of_conn(conn).is_none_or(|q| q.server_unread < bytes as u64) {
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// [`TcpQueues::read`], again while an end is missing: the kernel lists the table in
    /// pieces, so a socket can be missed while other sockets come and go; only a
    /// connection missing again and again (`None`) is gone.
    pub fn read_listed(client: SocketAddr, server: SocketAddr) -> Option<TcpQueues> {
        (0..50).find_map(|_| {
            TcpQueues::read(client, server).or_else(|| {
                thread::sleep(Duration::from_millis(2));
                None
            })
        })
    }

    /// Reads both ends of the IPv4 connection `client` -> `server` (`None` if either end
    /// is not listed, e.g. after it closed, or is listed twice).
    ///
    /// The kernel writes the table in pieces, one `read` at a time, and resumes each piece
    /// by position: a socket that opens or closes meanwhile shifts the rest, so a line can
    /// be listed twice while another is missed. Counting lines, two copies of one end
    /// would pass for both ends, with the other end's queues read as zero.
    pub fn read(client: SocketAddr, server: SocketAddr) -> Option<TcpQueues> {
        let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
        let hex = |addr: SocketAddr| match addr {
            SocketAddr::V4(v4) => format!(
                "{:08X}:{:04X}",
                u32::from_le_bytes(v4.ip().octets()),
                v4.port()
            ),
            SocketAddr::V6(_) => panic!("TcpQueues reads IPv4 connections only"),
        };
        let (client, server) = (hex(client), hex(server));
        let mut queues = TcpQueues::default();
        let (mut client_lines, mut server_lines) = (0, 0);
        for line in table.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [_, local, remote, _, tx_rx, ..] = fields[..] else {
                continue;
            };
            let (tx, rx) = tx_rx.split_once(':')?;
            let (tx, rx) = (
                u64::from_str_radix(tx, 16).ok()?,
                u64::from_str_radix(rx, 16).ok()?,
            );
            if local == client && remote == server {
                (queues.client_unacked, queues.client_unread) = (tx, rx);
                client_lines += 1;
            } else if local == server && remote == client {
                (queues.server_unacked, queues.server_unread) = (tx, rx);
                server_lines += 1;
            }
        }
        (client_lines == 1 && server_lines == 1).then_some(queues)
    }
}

/// What a server took in from one client that reads nothing, and what it wrote back, from
/// the client's count of bytes written and the kernel's queues at both ends.
///
/// A byte in flight sits both in one end's unacked queue and in the other's unread queue:
/// it makes `taken_in` low and `written` high, so "owed" (taken in and not yet written)
/// never overstates what the server holds. That holds only for a count taken while no
/// write is under way (a blocked write may have handed the kernel bytes it has not counted
/// yet) and queues read while nothing moves (the kernel lists the two ends at slightly
/// different moments).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FloodSample {
    /// Bytes the server's process read from the socket.
    pub taken_in: u64,
    /// Bytes the server's process wrote to the socket.
    pub written: u64,
}

impl FloodSample {
    /// The sample that `queues`, read after the client wrote `sent` bytes, give.
    pub fn of(queues: TcpQueues, sent: u64) -> FloodSample {
        FloodSample {
            taken_in: sent.saturating_sub(queues.client_unacked + queues.server_unread),
            written: queues.server_unacked + queues.client_unread,
        }
    }
}

/// The most a [`FloodWriter`] sends, in bytes and in time: a server that keeps reading cannot
/// keep a test running.
const FLOOD_MAX_BYTES: usize = 64 << 20;
const FLOOD_MAX_TIME: Duration = Duration::from_secs(20);

/// A client that sends without end and reads nothing, from a thread of its own.
pub struct FloodWriter {
    thread: thread::JoinHandle<usize>,
    failed: mpsc::Receiver<(Instant, io::Error)>,
}

impl FloodWriter {
    /// Writes `byte` in 64 KiB chunks on `writer` until a send fails (the peer is gone, or
    /// the kernel's buffers stayed full past the writer's timeout), [`FLOOD_MAX_BYTES`]
    /// went out, or [`FLOOD_MAX_TIME`] passed.
    pub fn start(mut writer: Conn, byte: u8) -> FloodWriter {
        let (failed_tx, failed) = mpsc::channel();
        let thread = thread::spawn(move || {
            let chunk = [byte; 64 * 1024];
            let start = Instant::now();
            let mut sent = 0usize;
            while sent < FLOOD_MAX_BYTES && start.elapsed() < FLOOD_MAX_TIME {
                match writer.write(&chunk) {
                    Ok(n) => sent += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        let _ = failed_tx.send((Instant::now(), e));
                        break;
                    }
                }
            }
            sent
        });
        FloodWriter { thread, failed }
    }

    /// The send failure that ended the flood and when it happened, waiting up to
    /// `timeout` for it; `None` if none came.
    pub fn failure_within(&self, timeout: Duration) -> Option<(Instant, io::Error)> {
        self.failed.recv_timeout(timeout).ok()
    }

    /// Waits for the flood to end; the bytes the kernel took.
    pub fn join(self) -> usize {
        self.thread.join().expect("the flood thread")
    }
}

/// Whether `path` exists (as anything).
pub fn exists(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

/// `GET /metrics` from the server's `--metrics` listener: the body.
pub fn scrape(server: &Server) -> String {
    let mut stream = TcpStream::connect(server.addr("http")).expect("connect to metrics");
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream.set_write_timeout(Some(PATIENCE)).unwrap();
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: test\r\n\r\n").expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    response
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, body)| body.to_string())
}

/// The value of the series `name` with exactly `labels` (in any order) in a scrape, read
/// until it is present and stable for `PATIENCE` at most (counts land just after the
/// event). `None` when the series never appears.
pub fn scrape_value(server: &Server, name: &str, labels: &[(&str, &str)]) -> Option<u64> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let body = scrape(server);
        let found = body.lines().find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, rest) = series.split_once('{').unwrap_or((series, "}"));
            let inner = rest.strip_suffix('}')?;
            let mut have: Vec<&str> = inner.split(',').filter(|p| !p.is_empty()).collect();
            let mut want: Vec<String> =
                labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
            have.sort_unstable();
            want.sort_unstable();
            (series_name == name && have == want).then(|| value.parse::<u64>().ok())?
        });
        match found {
            Some(value) if value > 0 || Instant::now() >= deadline => return Some(value),
            None if Instant::now() >= deadline => return None,
            _ => thread::sleep(Duration::from_millis(20)),
        }
    }
}
