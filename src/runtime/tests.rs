//! Tests of the runtime itself: wake-ups from other threads, timers, cancellation, many
//! tasks, and a stress test where wakes race polls.

use super::*;
use crate::net::Stream;
use std::cell::Cell;
use std::future::poll_fn;
use std::io;
use std::os::unix::net as unix;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::task::{Poll, Waker};
use std::thread;
use std::time::{Duration, Instant};

/// Runs `test` on its own thread and fails if it takes longer than `limit`: a lost
/// wake-up shows up as a hang, and a hang must fail, not stall the suite.
fn within<T: Send + 'static>(limit: Duration, test: impl FnOnce() -> T + Send + 'static) -> T {
    let (done, result) = mpsc::channel();
    thread::spawn(move || done.send(test()));
    result
        .recv_timeout(limit)
        .expect("the runtime hung (a lost wake-up?)")
}

/// A flag another thread raises, with the waker of the task waiting for it.
#[derive(Default)]
struct Flag {
    is_set: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Flag {
    fn raise(&self) {
        self.is_set.store(true, Ordering::Release);
        if let Some(waker) = self.waker.lock().unwrap().take() {
            waker.wake();
        }
    }

    /// Waits for the flag and lowers it again.
    async fn wait(&self) {
        poll_fn(|cx| {
            // Store the waker before checking, so a raise in between is seen either here
            // or through the waker.
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            if self.is_set.swap(false, Ordering::AcqRel) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }
}

#[test]
fn spawn_and_join() {
    let runtime = Runtime::new().unwrap();
    let answer = runtime
        .block_on(async {
            let inner = spawn(async { spawn(async { 41 }).await.unwrap() + 1 });
            inner.await
        })
        .unwrap();
    assert_eq!(answer, Some(42));
    assert_eq!(runtime.counts(), (0, 0));
}

#[test]
fn a_detached_task_runs_to_its_end_and_leaves_nothing() {
    within(Duration::from_secs(10), || {
        let runtime = Runtime::new().unwrap();
        let (left, right) = unix::UnixStream::pair().unwrap();
        let got = Rc::new(Cell::new(0));
        let seen = got.clone();
        runtime
            .block_on(async move {
                let stream = Async::new(Stream::Unix(right)).unwrap();
                // It waits for input first, so it must be woken by the reactor to finish.
                spawn_detached(async move {
                    let mut buf = [0; 8];
                    seen.set(stream.read(&mut buf).await.unwrap());
                });
                std::io::Write::write_all(&mut &left, b"four").unwrap();
                all_tasks_done().await;
            })
            .unwrap();
        assert_eq!(got.get(), 4);
        assert_eq!(runtime.counts(), (0, 0));
    });
}

#[test]
fn wake_from_another_thread_ends_the_sleep() {
    within(Duration::from_secs(10), || {
        let runtime = Runtime::new().unwrap();
        let flag = Arc::new(Flag::default());
        let raiser = flag.clone();
        let started = Instant::now();
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(100));
            raiser.raise();
        });
        // No timer and no I/O: only the eventfd can end this runtime's epoll_wait.
        runtime.block_on(flag.wait()).unwrap();
        assert!(started.elapsed() >= Duration::from_millis(100));
    });
}

#[test]
fn no_lost_wake_ups_when_wakes_race_polls() {
    const ROUNDS: usize = 20_000;
    const TASKS: usize = 4;
    within(Duration::from_secs(60), || {
        let runtime = Runtime::new().unwrap();
        let flags: Vec<Arc<Flag>> = (0..TASKS).map(|_| Arc::default()).collect();
        let seen: Vec<Arc<AtomicUsize>> = (0..TASKS).map(|_| Arc::default()).collect();
        // Each raiser raises its flag again as soon as the task has seen the last one, so
        // raises land while the task is being polled, queued, or asleep.
        for (flag, seen) in flags.iter().zip(&seen) {
            let (flag, seen) = (flag.clone(), seen.clone());
            thread::spawn(move || {
                for round in 0..ROUNDS {
                    while seen.load(Ordering::Acquire) < round {
                        std::hint::spin_loop();
                    }
                    flag.raise();
                }
            });
        }
        runtime
            .block_on(async {
                let tasks: Vec<_> = flags
                    .iter()
                    .zip(&seen)
                    .map(|(flag, seen)| {
                        let (flag, seen) = (flag.clone(), seen.clone());
                        spawn(async move {
                            for round in 1..=ROUNDS {
                                flag.wait().await;
                                seen.store(round, Ordering::Release);
                            }
                        })
                    })
                    .collect();
                for task in tasks {
                    task.await.unwrap();
                }
            })
            .unwrap();
    });
}

#[test]
fn timers_fire_in_order_and_on_time() {
    within(Duration::from_secs(10), || {
        let runtime = Runtime::new().unwrap();
        runtime
            .block_on(async {
                let order = Rc::new(std::cell::RefCell::new(Vec::new()));
                let started = Instant::now();
                let tasks: Vec<_> = [60u64, 20, 40]
                    .into_iter()
                    .map(|ms| {
                        let order = order.clone();
                        spawn(async move {
                            sleep(Duration::from_millis(ms)).await;
                            order.borrow_mut().push(ms);
                        })
                    })
                    .collect();
                for task in tasks {
                    task.await.unwrap();
                }
                assert_eq!(*order.borrow(), [20, 40, 60]);
                let elapsed = started.elapsed();
                assert!(elapsed >= Duration::from_millis(60), "{elapsed:?}");
                assert!(elapsed < Duration::from_millis(500), "{elapsed:?}");
            })
            .unwrap();
    });
}

#[test]
fn timeout_and_reset() {
    within(Duration::from_secs(10), || {
        let runtime = Runtime::new().unwrap();
        runtime
            .block_on(async {
                let never = poll_fn(|_| Poll::<()>::Pending);
                assert_eq!(
                    timeout(Duration::from_millis(30), never).await,
                    Err(Elapsed)
                );
                assert_eq!(timeout(Duration::from_secs(5), async { 7 }).await, Ok(7));
                // Pushing a deadline back (as every read does to the idle timeout) delays
                // the timer; pulling it forward brings it back.
                let started = Instant::now();
                let mut timer = sleep(Duration::from_millis(20));
                timer.reset(Instant::now() + Duration::from_millis(120));
                (&mut timer).await;
                assert!(started.elapsed() >= Duration::from_millis(120));
                let started = Instant::now();
                timer.reset(Instant::now() + Duration::from_secs(30));
                timer.reset(Instant::now() + Duration::from_millis(10));
                (&mut timer).await;
                assert!(started.elapsed() < Duration::from_secs(5));
            })
            .unwrap();
        assert_eq!(runtime.counts(), (0, 0));
    });
}

/// Sets its flag when dropped, to see that a task's future was dropped.
struct DropFlag(Rc<Cell<bool>>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.set(true);
    }
}

#[test]
fn abort_cancels_the_task_and_deregisters_its_socket() {
    let runtime = Runtime::new().unwrap();
    let (ours, theirs) = unix::UnixStream::pair().unwrap();
    let dropped = Rc::new(Cell::new(false));
    let guard = DropFlag(dropped.clone());
    let reader = async move {
        let _guard = guard;
        let stream = UnixStream::new(Stream::Unix(ours))?;
        stream.read(&mut [0u8; 16]).await
    };
    let handle = runtime.spawn(reader);
    // Let the task start and park in its read.
    runtime
        .block_on(async { sleep(Duration::from_millis(20)).await })
        .unwrap();
    assert_eq!(runtime.counts(), (1, 1));
    handle.abort();
    assert!(dropped.get());
    assert_eq!(runtime.counts(), (0, 0));
    assert!(runtime.block_on(handle).unwrap().is_none());
    drop(theirs);
}

#[test]
fn dropping_the_runtime_cancels_its_tasks() {
    let dropped = Rc::new(Cell::new(false));
    let runtime = Runtime::new().unwrap();
    let (ours, _theirs) = unix::UnixStream::pair().unwrap();
    let guard = DropFlag(dropped.clone());
    runtime
        .block_on(async {
            spawn(async move {
                let _guard = guard;
                let stream = UnixStream::new(Stream::Unix(ours))?;
                stream.read(&mut [0u8; 16]).await
            });
            sleep(Duration::from_millis(10)).await;
        })
        .unwrap();
    assert!(!dropped.get());
    drop(runtime);
    assert!(dropped.get());
}

#[test]
fn a_panicking_task_ends_alone() {
    let runtime = Runtime::new().unwrap();
    let (panicked, survivor) = runtime
        .block_on(async {
            let doomed = spawn(async {
                sleep(Duration::from_millis(5)).await;
                panic!("deliberate panic in a task");
            });
            let survivor = spawn(async {
                sleep(Duration::from_millis(20)).await;
                "still here"
            });
            (doomed.await, survivor.await)
        })
        .unwrap();
    assert!(panicked.is_none());
    assert_eq!(survivor, Some("still here"));
}

#[test]
fn thousands_of_tasks_over_socket_pairs() {
    const PAIRS: usize = 5_000;
    crate::sys::raise_open_file_limit().unwrap();
    within(Duration::from_secs(60), || {
        let runtime = Runtime::new().unwrap();
        let echoed = runtime
            .block_on(async {
                let mut clients = Vec::new();
                for _ in 0..PAIRS {
                    let (server, client) = unix::UnixStream::pair()?;
                    // An echo task per connection, as the async model runs them.
                    spawn(async move {
                        let server = UnixStream::new(Stream::Unix(server))?;
                        let mut buf = [0u8; 64];
                        loop {
                            match server.read(&mut buf).await? {
                                0 => return io::Result::Ok(()),
                                n => server.write_all(&buf[..n]).await?,
                            }
                        }
                    });
                    clients.push(UnixStream::new(Stream::Unix(client))?);
                }
                let mut echoed = 0;
                for (i, client) in clients.iter().enumerate() {
                    let message = format!("message {i}");
                    client.write_all(message.as_bytes()).await?;
                    let mut buf = [0u8; 64];
                    let mut got = 0;
                    while got < message.len() {
                        got += client.read(&mut buf[got..]).await?;
                    }
                    assert_eq!(&buf[..got], message.as_bytes());
                    echoed += 1;
                }
                io::Result::Ok(echoed)
            })
            .unwrap()
            .unwrap();
        assert_eq!(echoed, PAIRS);
        // Closing the clients ends every echo task, which deregisters its socket.
        runtime.wait_for_tasks().unwrap();
        assert_eq!(runtime.counts(), (0, 0));
    });
}

#[test]
fn eof_after_a_short_read_is_seen() {
    within(Duration::from_secs(10), || {
        let runtime = Runtime::new().unwrap();
        let (ours, theirs) = unix::UnixStream::pair().unwrap();
        let (got, eof) = runtime
            .block_on(async {
                let stream = UnixStream::new(Stream::Unix(ours))?;
                let peer = UnixStream::new(Stream::Unix(theirs))?;
                // Let the loop see the write edge of `peer` and park once.
                sleep(Duration::from_millis(10)).await;
                peer.write_all(b"abc").await?;
                peer.shutdown(std::net::Shutdown::Write)?;
                // The loop takes the one edge for bytes and FIN before the read below.
                sleep(Duration::from_millis(10)).await;
                let mut buf = [0u8; 64];
                // A short read emptied the socket, so `read` forgot its readiness (no
                // EAGAIN to come); the FIN, remembered apart, must still end the next read.
                let got = stream.read(&mut buf).await?;
                let eof = stream.read(&mut buf).await?;
                io::Result::Ok((got, eof))
            })
            .unwrap()
            .unwrap();
        assert_eq!((got, eof), (3, 0));
    });
}

/// CPU time this thread has used (user + system), from `/proc/thread-self/stat`.
fn thread_cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
    // Fields after the command name (which may hold spaces): utime and stime are 14 and 15.
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<u64> = after_name
        .split(' ')
        .skip(11)
        .take(2)
        .map(|f| f.parse().unwrap())
        .collect();
    // Clock ticks are 10 ms on Linux (USER_HZ = 100).
    Duration::from_millis((fields[0] + fields[1]) * 10)
}

#[test]
fn an_idle_runtime_sleeps() {
    within(Duration::from_secs(10), || {
        let runtime = Runtime::new().unwrap();
        let (ours, _theirs) = unix::UnixStream::pair().unwrap();
        let before = thread_cpu_time();
        runtime
            .block_on(async {
                let stream = UnixStream::new(Stream::Unix(ours)).unwrap();
                let reader = spawn(async move { stream.read(&mut [0u8; 16]).await });
                // A socket with nothing to read and a timer far away: nothing to do.
                sleep(Duration::from_millis(500)).await;
                reader.abort();
            })
            .unwrap();
        let spent = thread_cpu_time() - before;
        assert!(
            spent <= Duration::from_millis(50),
            "{spent:?} of CPU while idle"
        );
    });
}

#[test]
fn write_all_survives_short_writes() {
    const BYTES: usize = 4 << 20;
    within(Duration::from_secs(30), || {
        let runtime = Runtime::new().unwrap();
        let (writer, reader) = unix::UnixStream::pair().unwrap();
        let got = runtime
            .block_on(async {
                let writer = UnixStream::new(Stream::Unix(writer))?;
                let reader = UnixStream::new(Stream::Unix(reader))?;
                let sent: Vec<u8> = (0..BYTES).map(|i| (i % 251) as u8).collect();
                // Far more than a socket buffer: the kernel takes it in pieces, and the
                // writer parks on EPOLLOUT until the reader makes room.
                let expected = sent.clone();
                let writing = spawn(async move {
                    writer.write_all(&sent).await?;
                    writer.shutdown(std::net::Shutdown::Write)
                });
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    match reader.read(&mut buf).await? {
                        0 => break,
                        n => got.extend_from_slice(&buf[..n]),
                    }
                }
                writing.await.unwrap()?;
                io::Result::Ok(got == expected)
            })
            .unwrap()
            .unwrap();
        assert!(got, "the bytes read differ from the bytes written");
    });
}

#[test]
fn a_task_whose_socket_stays_ready_lets_the_others_run() {
    const BYTES: usize = 4096;
    within(Duration::from_secs(10), || {
        let runtime = Runtime::new().unwrap();
        let (ours, theirs) = unix::UnixStream::pair().unwrap();
        let read_before_the_other_ran = runtime
            .block_on(async {
                let stream = UnixStream::new(Stream::Unix(ours))?;
                let peer = UnixStream::new(Stream::Unix(theirs))?;
                peer.write_all(&[7; BYTES]).await?;
                let has_run = Rc::new(Cell::new(false));
                let other = spawn({
                    let has_run = has_run.clone();
                    async move { has_run.set(true) }
                });
                // One byte per read: the socket never runs dry, so no read ever parks;
                // only the budget can make this task yield.
                let mut read = 0;
                let mut byte = [0u8; 1];
                while !has_run.get() && read < BYTES {
                    read += stream.read(&mut byte).await?;
                }
                other.await;
                io::Result::Ok(read)
            })
            .unwrap()
            .unwrap();
        assert!(
            read_before_the_other_ran < BYTES,
            "the reading task never yielded"
        );
    });
}

#[test]
fn ready_then_try_read_waits_for_the_next_edge() {
    within(Duration::from_secs(10), || {
        let runtime = Runtime::new().unwrap();
        let (ours, theirs) = unix::UnixStream::pair().unwrap();
        let (first, got) = runtime
            .block_on(async {
                let stream = UnixStream::new(Stream::Unix(ours))?;
                let peer = UnixStream::new(Stream::Unix(theirs))?;
                let mut buf = [0u8; 64];
                // Registration starts "ready": the first try finds nothing.
                stream.ready(Direction::Read).await;
                let first = stream.try_read(&mut buf).map_err(|e| e.kind());
                let writer = spawn(async move {
                    sleep(Duration::from_millis(20)).await;
                    peer.write_all(b"hello").await
                });
                // Now `ready` must wait for the bytes, not return at once.
                stream.ready(Direction::Read).await;
                let got = stream.try_read(&mut buf)?;
                writer.await.unwrap()?;
                io::Result::Ok((first, got))
            })
            .unwrap()
            .unwrap();
        assert_eq!(first, Err(io::ErrorKind::WouldBlock));
        assert_eq!(got, 5);
    });
}
