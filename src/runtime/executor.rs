//! The executor: tasks, the run queue their wakers feed, and the loop that runs them.
//!
//! A task is a boxed future in a slab slot. Its waker, made once at spawn, is an
//! `Arc<TaskWaker>` holding the task's key; waking pushes the key onto the run queue
//! unless it is already there. The loop (`block_on`) takes the whole queue, polls each
//! task, and when nothing is queued sleeps in the reactor until I/O, a timer or a waker
//! from another thread ends the sleep. Nothing spins: an idle runtime is a thread asleep
//! in `epoll_wait`.

use super::reactor::Reactor;
use super::timer::{Timer, Timers};
use crate::slab::{Slab, Token};
use crate::sys::eventfd::EventFd;
use std::any::Any;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::io;
use std::os::fd::AsFd;
use std::panic::{self, AssertUnwindSafe};
use std::pin::{Pin, pin};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

/// The run-queue key of `block_on`'s own future, which no slab key can equal.
const MAIN_KEY: Token = Token::reserved(0);
/// I/O operations a task may complete in one poll before its next one returns `Pending`
/// (tokio's cooperative budget): a peer that floods a connection keeps its socket ready,
/// and without a budget its task would never give the others a turn.
const OPERATIONS_PER_TURN: u32 = 16;

thread_local! {
    /// The runtime inside whose `block_on` this thread is, for [`spawn`] and `Async::new`.
    static CURRENT: RefCell<Option<Rc<Core>>> = const { RefCell::new(None) };
}

/// The runtime inside whose `block_on` this thread is, if any.
pub(crate) fn current() -> Option<Rc<Core>> {
    CURRENT.with_borrow(Clone::clone)
}

/// Everything one runtime owns; shared (`Rc`) by its sockets, timers and join handles.
pub(crate) struct Core {
    pub(crate) reactor: Reactor,
    pub(crate) timers: RefCell<Timers>,
    /// The loop's idea of "now", read once per wake-up so timers cost no clock reads.
    pub(crate) now: Cell<Instant>,
    tasks: RefCell<Slab<Task>>,
    queue: Arc<Queue>,
    /// Woken when the last task ends (see [`Runtime::wait_for_tasks`]).
    all_done: Cell<Option<Waker>>,
    /// What is left of [`OPERATIONS_PER_TURN`] for the task being polled.
    budget: Cell<u32>,
}

struct Task {
    /// `None` while the task is being polled.
    future: Option<Pin<Box<dyn Future<Output = ()>>>>,
    waker: Arc<TaskWaker>,
}

/// The run queue: keys of tasks to poll; the only part of a runtime other threads touch.
struct Queue {
    state: Mutex<QueueState>,
    /// Written when a task is woken while the loop sleeps, to end the `epoll_wait`.
    wake_fd: EventFd,
}

#[derive(Default)]
struct QueueState {
    ready: VecDeque<Token>,
    /// The loop is (about to be) asleep in `epoll_wait` and must be woken through `wake_fd`.
    is_sleeping: bool,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // Nothing panics while holding it; if something did, the queue is still valid.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What a [`Waker`] is here: made once per task, so a wake-up allocates nothing.
struct TaskWaker {
    key: Token,
    /// The key is in the queue (or the task is about to be polled): don't queue it twice.
    is_queued: AtomicBool,
    queue: Arc<Queue>,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.is_queued.swap(true, Ordering::AcqRel) {
            return;
        }
        // Both sides decide under the lock, so a wake cannot fall between the loop's
        // "queue is empty" check and its sleep: either the loop sees the key, or we see
        // that it sleeps and write the eventfd.
        let must_notify = {
            let mut state = self.queue.lock();
            state.ready.push_back(self.key);
            std::mem::take(&mut state.is_sleeping)
        };
        if must_notify {
            if let Err(e) = self.queue.wake_fd.notify() {
                tracing::error!("cannot wake a runtime from another thread: {e}");
            }
        }
    }
}

impl TaskWaker {
    /// The task is about to be polled: a wake from now on must queue it again. A swap,
    /// not a store, so this reads (and synchronises with) the waker's `swap(true)`, and
    /// the poll that follows sees whatever that waker's thread wrote before waking.
    fn start_poll(&self) {
        self.is_queued.swap(false, Ordering::AcqRel);
    }
}

/// A single-threaded async runtime: [`Runtime::block_on`] runs a future and every task it
/// [`spawn`]s on the calling thread.
pub struct Runtime {
    core: Rc<Core>,
}

impl Runtime {
    /// A runtime with its own epoll instance and eventfd.
    ///
    /// # Errors
    ///
    /// The OS error of creating the epoll instance or the eventfd.
    pub fn new() -> io::Result<Self> {
        let wake_fd = EventFd::new()?;
        let reactor = Reactor::new(wake_fd.as_fd())?;
        let core = Core {
            reactor,
            timers: RefCell::new(Timers::default()),
            now: Cell::new(Instant::now()),
            tasks: RefCell::default(),
            queue: Arc::new(Queue {
                state: Mutex::default(),
                wake_fd,
            }),
            all_done: Cell::new(None),
            budget: Cell::new(OPERATIONS_PER_TURN),
        };
        Ok(Runtime {
            core: Rc::new(core),
        })
    }

    /// Runs `future` to completion on this thread, running spawned tasks meanwhile.
    /// Tasks still pending when it returns stay in the runtime (see
    /// [`Runtime::wait_for_tasks`]) until the runtime is dropped, which cancels them.
    ///
    /// # Errors
    ///
    /// The OS error of `epoll_wait` or of the eventfd.
    pub fn block_on<F: Future>(&self, future: F) -> io::Result<F::Output> {
        let _enter = Enter(CURRENT.replace(Some(self.core.clone())));
        let mut future = pin!(future);
        let main = Arc::new(TaskWaker {
            key: MAIN_KEY,
            is_queued: AtomicBool::new(false),
            queue: self.core.queue.clone(),
        });
        let waker = Waker::from(main.clone());
        main.wake_by_ref();
        let mut batch = VecDeque::new();
        loop {
            // One lock takes every queued key; tasks woken meanwhile wait for the next turn,
            // so a task that keeps waking itself cannot starve I/O.
            std::mem::swap(&mut batch, &mut self.core.queue.lock().ready);
            while let Some(key) = batch.pop_front() {
                if key != MAIN_KEY {
                    self.core.run(key);
                    continue;
                }
                main.start_poll();
                self.core.budget.set(OPERATIONS_PER_TURN);
                if let Poll::Ready(output) = future.as_mut().poll(&mut Context::from_waker(&waker))
                {
                    // Keys not yet run stay queued for the next `block_on`.
                    self.core.queue.lock().ready.extend(batch.drain(..));
                    return Ok(output);
                }
            }
            self.core.park()?;
        }
    }

    /// Runs until every spawned task has finished.
    ///
    /// # Errors
    ///
    /// As [`Runtime::block_on`].
    pub fn wait_for_tasks(&self) -> io::Result<()> {
        self.block_on(all_tasks_done())
    }

    /// Spawns `future` as a task of this runtime; it first runs inside `block_on`.
    pub fn spawn<F: Future + 'static>(&self, future: F) -> JoinHandle<F::Output> {
        let _enter = Enter(CURRENT.replace(Some(self.core.clone())));
        spawn(future)
    }

    /// How many tasks exist, and how many fds the reactor watches (for tests).
    #[cfg(test)]
    pub(crate) fn counts(&self) -> (usize, usize) {
        let tasks = self.core.tasks.borrow().len();
        (tasks, self.core.reactor.registrations())
    }
}

impl Drop for Runtime {
    /// Cancels every task: dropping a future drops its sockets (which leave epoll) and its
    /// timers. This also breaks the cycle task -> socket -> runtime.
    fn drop(&mut self) {
        let tasks = std::mem::take(&mut *self.core.tasks.borrow_mut());
        drop(tasks);
    }
}

/// Makes a runtime current on this thread for the length of a `block_on`.
struct Enter(Option<Rc<Core>>);

impl Drop for Enter {
    fn drop(&mut self) {
        CURRENT.set(self.0.take());
    }
}

impl Core {
    /// Polls the task `key` once, isolating a panic to that task.
    fn run(&self, key: Token) {
        let (mut future, waker) = {
            let mut tasks = self.tasks.borrow_mut();
            // Gone (finished or aborted since it was woken), or already running.
            let Some(task) = tasks.get_mut(key) else {
                return;
            };
            let Some(future) = task.future.take() else {
                return;
            };
            task.waker.start_poll();
            (future, Waker::from(task.waker.clone()))
        };
        self.budget.set(OPERATIONS_PER_TURN);
        // The slab is not borrowed while the task runs, so it may spawn or abort tasks.
        let polled = panic::catch_unwind(AssertUnwindSafe(|| {
            future.as_mut().poll(&mut Context::from_waker(&waker))
        }));
        let is_finished = match polled {
            Ok(poll) => poll.is_ready(),
            Err(payload) => {
                tracing::error!(
                    "a task panicked: {}; dropping that task only",
                    message(&*payload)
                );
                true
            }
        };
        if !is_finished {
            if let Some(task) = self.tasks.borrow_mut().get_mut(key) {
                task.future = Some(future);
                return;
            }
        }
        self.remove(key);
        // Dropped outside the borrow: its sockets and timers deregister themselves.
        drop(future);
    }

    /// Adds a task and queues its first poll; returns its key.
    fn insert(&self, future: Pin<Box<dyn Future<Output = ()>>>) -> Token {
        let mut tasks = self.tasks.borrow_mut();
        let key = tasks.vacant_token();
        let waker = Arc::new(TaskWaker {
            key,
            is_queued: AtomicBool::new(false),
            queue: self.queue.clone(),
        });
        tasks.insert(Task {
            future: Some(future),
            waker: waker.clone(),
        });
        drop(tasks);
        waker.wake_by_ref();
        key
    }

    /// Takes one I/O operation from the polled task's budget; `Pending` when none is left,
    /// after queueing the task again behind the others (every later operation in this
    /// poll is `Pending` too, so the task yields at its next `.await`).
    pub(crate) fn poll_budget(&self, cx: &Context<'_>) -> Poll<()> {
        match self.budget.get() {
            0 => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            left => {
                self.budget.set(left - 1);
                Poll::Ready(())
            }
        }
    }

    /// Ends the task `key` (dropping its future, if not running), and wakes
    /// [`Runtime::wait_for_tasks`] if it was the last.
    fn remove(&self, key: Token) {
        let task = self.tasks.borrow_mut().remove(key);
        drop(task);
        if self.tasks.borrow().is_empty() {
            if let Some(waker) = self.all_done.take() {
                waker.wake();
            }
        }
    }

    /// Sleeps in the reactor until I/O, the next timer, or a cross-thread wake; then
    /// fires the timers that are due.
    fn park(&self) -> io::Result<()> {
        let timeout = {
            let mut state = self.queue.lock();
            if state.ready.is_empty() {
                state.is_sleeping = true;
                self.timers.borrow().next_timeout(Instant::now())
            } else {
                // Tasks are queued: only collect I/O that is already ready.
                Some(Duration::ZERO)
            }
        };
        let awake = || self.queue.lock().is_sleeping = false;
        if self.reactor.wait(timeout, awake)? {
            self.queue.wake_fd.drain()?;
        }
        let now = Instant::now();
        self.now.set(now);
        self.timers.borrow_mut().fire(now);
        Ok(())
    }
}

/// Spawns `future` on the runtime this thread is running.
///
/// # Panics
///
/// Outside a runtime's `block_on`: there is no loop to run the task.
pub fn spawn<F: Future + 'static>(future: F) -> JoinHandle<F::Output> {
    let core = current().expect("spawn called outside a runtime's block_on");
    let state = Rc::new(RefCell::new(JoinState {
        output: None,
        is_done: false,
        waiter: None,
    }));
    // Boxed apart from its wrapper: an `async move { future.await }` wrapper would hold
    // the future twice (as captured and as awaited) and double every task's memory.
    let task = Joined {
        future: Box::pin(future),
        state: state.clone(),
    };
    let key = core.insert(Box::pin(task));
    JoinHandle { key, state, core }
}

/// Spawns `future` as a task whose end nobody awaits (one per connection, say): without a
/// [`JoinHandle`] it needs no join state, so it costs its boxed future, its waker and its
/// slab slot, two allocations fewer than [`spawn`] (about 80 bytes per task).
///
/// # Panics
///
/// Outside a runtime's `block_on`, as [`spawn`].
pub fn spawn_detached(future: impl Future<Output = ()> + 'static) {
    let core = current().expect("spawn_detached called outside a runtime's block_on");
    core.insert(Box::pin(future));
}

/// Waits until every task spawned on the current runtime has finished (the future
/// given to `block_on` is not one of them). Outside a runtime: at once.
pub async fn all_tasks_done() {
    let Some(core) = current() else {
        return;
    };
    poll_fn(|cx| {
        if core.tasks.borrow().is_empty() {
            return Poll::Ready(());
        }
        core.all_done.set(Some(cx.waker().clone()));
        Poll::Pending
    })
    .await;
}

/// Awaits `io` unless, first, `stop()` holds or `timer` expires: then `None`, and `io` is
/// left unfinished (the caller drops it: cancelled).
///
/// `stop` is checked each time the task is polled, before `io`; whoever changes what it
/// reads must wake the task (a loop-wide flag and [`wake_all`], say).
///
/// `io` comes pinned by the caller (`unless(stop, None, pin!(read(..))).await`), not by
/// value: an `async fn` keeps its arguments for its whole life, so one taking `io` by value
/// held it twice, and a connection task waiting here was some hundred bytes larger.
pub fn unless<F: Future>(
    stop: impl Fn() -> bool,
    mut timer: Option<&mut Timer>,
    mut io: Pin<&mut F>,
) -> impl Future<Output = Option<F::Output>> {
    poll_fn(move |cx| {
        if stop() {
            return Poll::Ready(None);
        }
        if let Poll::Ready(done) = io.as_mut().poll(cx) {
            return Poll::Ready(Some(done));
        }
        match &mut timer {
            Some(timer) => timer.poll_expired(cx).map(|()| None),
            None => Poll::Pending,
        }
    })
}

/// Wakes every task of the current runtime, to make each re-check a shared condition
/// (the model's "shutdown began" flag). Spurious wake-ups are harmless by contract.
pub fn wake_all() {
    if let Some(core) = current() {
        let mut tasks = core.tasks.borrow_mut();
        for key in tasks.tokens() {
            if let Some(task) = tasks.get_mut(key) {
                task.waker.wake_by_ref();
            }
        }
    }
}

/// Lets every other queued task run once before this one continues.
pub async fn yield_now() {
    let mut has_yielded = false;
    poll_fn(|cx| {
        if has_yielded {
            return Poll::Ready(());
        }
        has_yielded = true;
        // Queued behind the tasks already waiting: they run first.
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await;
}

struct JoinState<T> {
    output: Option<T>,
    is_done: bool,
    waiter: Option<Waker>,
}

/// A spawned future and where its output goes. Dropped when the task finishes, panics
/// or is aborted, and tells the [`JoinHandle`] so in every case.
struct Joined<F: Future> {
    future: Pin<Box<F>>,
    state: Rc<RefCell<JoinState<F::Output>>>,
}

impl<F: Future> Future for Joined<F> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let output = std::task::ready!(self.future.as_mut().poll(cx));
        self.state.borrow_mut().output = Some(output);
        Poll::Ready(())
    }
}

impl<F: Future> Drop for Joined<F> {
    fn drop(&mut self) {
        let waiter = {
            let mut state = self.state.borrow_mut();
            state.is_done = true;
            state.waiter.take()
        };
        if let Some(waiter) = waiter {
            waiter.wake();
        }
    }
}

/// Awaits a spawned task's output: `Some(output)`, or `None` if the task panicked or was
/// aborted. Dropping the handle detaches the task; it keeps running.
pub struct JoinHandle<T> {
    key: Token,
    state: Rc<RefCell<JoinState<T>>>,
    core: Rc<Core>,
}

impl<T> JoinHandle<T> {
    /// Cancels the task: its future is dropped now (its sockets leave epoll, its timers
    /// go), and the handle then yields `None`.
    pub fn abort(&self) {
        self.core.remove(self.key);
    }
}

impl<T> Future for JoinHandle<T> {
    type Output = Option<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut state = self.state.borrow_mut();
        if state.is_done {
            return Poll::Ready(state.output.take());
        }
        state.waiter = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// A panic payload's message, for the log.
fn message(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("(no message)")
}
