//! Pools of job workers: checkout, send, wait (blocking or async), check in or replace.

use std::future::Future;
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::{Death, Error, Side};
use super::job::{self, Job};
use super::link::Link;
use super::wire::{
    self, Call, Failure, FromSpawner, FromWorker, PanicReport, Received, Receiver, ToSpawner,
    ToWorker,
};

/// The settings of a pool; see [`PoolBuilder`] for what each means.
#[derive(Debug, Clone)]
struct Config {
    min_workers: usize,
    max_workers: usize,
    max_jobs_per_worker: Option<u64>,
    timeout: Option<Duration>,
    memory_limit_kb: Option<u64>,
    memory_poll: Duration,
    idle_timeout: Option<Duration>,
    one_shot: bool,
}

/// Builds a [`Pool`]; get one from [`Spawner::pool`](super::Spawner::pool).
#[derive(Clone)]
pub struct PoolBuilder {
    link: Arc<Link>,
    config: Config,
}

impl PoolBuilder {
    pub(crate) fn new(link: Arc<Link>) -> Self {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        PoolBuilder {
            link,
            config: Config {
                min_workers: 0,
                max_workers: cpus,
                max_jobs_per_worker: None,
                timeout: None,
                memory_limit_kb: None,
                memory_poll: Duration::from_millis(10),
                idle_timeout: None,
                one_shot: false,
            },
        }
    }

    /// Workers kept when idle ones are shrunk away (default 0). Workers start lazily, when a job
    /// needs one; [`Pool::prestart`] starts this many up front.
    pub fn min_workers(mut self, n: usize) -> Self {
        self.config.min_workers = n;
        self
    }

    /// Most workers (and so jobs) at once (default: the number of CPUs). Further callers wait.
    pub fn max_workers(mut self, n: usize) -> Self {
        self.config.max_workers = n.max(1);
        self
    }

    /// A worker that has run this many jobs exits and is replaced lazily (default: never).
    pub fn max_jobs_per_worker(mut self, n: u64) -> Self {
        self.config.max_jobs_per_worker = Some(n.max(1));
        self
    }

    /// A job running longer gets [`Error::Timeout`]; its worker is killed and replaced.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.config.timeout = Some(timeout);
        self
    }

    /// A worker whose resident memory passes this many KiB during a job is killed
    /// ([`Error::MemoryLimit`]); one found over it after a job is retired quietly. RSS is read from
    /// `/proc` every [`memory_poll`](Self::memory_poll) while a job runs, so a job that allocates
    /// very fast can overshoot by what it allocates in one interval.
    pub fn memory_limit_kb(mut self, kb: u64) -> Self {
        self.config.memory_limit_kb = Some(kb);
        self
    }

    /// How often a running job's memory is checked (default 10 ms).
    pub fn memory_poll(mut self, every: Duration) -> Self {
        self.config.memory_poll = every.max(Duration::from_millis(1));
        self
    }

    /// Idle workers beyond [`min_workers`](Self::min_workers) exit after this long unused. Checked
    /// on every pool call, and by a background task when the pool is built inside a tokio runtime.
    pub fn idle_timeout(mut self, idle: Duration) -> Self {
        self.config.idle_timeout = Some(idle);
        self
    }

    /// One-shot mode: every job gets a freshly forked process that exits after it. The job travels
    /// with the fork request, so it costs one fork and no extra round trip.
    pub fn one_shot(mut self) -> Self {
        self.config.one_shot = true;
        self
    }

    /// Builds the pool. No worker starts yet.
    pub fn build(self) -> Pool {
        let inner = Arc::new(Inner {
            permits: Arc::new(Semaphore::new(self.config.max_workers)),
            link: self.link,
            config: self.config,
            idle: Mutex::new(Vec::new()),
            live: AtomicUsize::new(0),
        });
        if let (Some(idle), Ok(rt)) = (
            inner.config.idle_timeout,
            tokio::runtime::Handle::try_current(),
        ) {
            let weak: Weak<Inner> = Arc::downgrade(&inner);
            let period = (idle / 2).max(Duration::from_millis(10));
            rt.spawn(async move {
                loop {
                    tokio::time::sleep(period).await;
                    match weak.upgrade() {
                        Some(inner) => inner.shrink(),
                        None => break,
                    }
                }
            });
        }
        Pool { inner }
    }
}

/// A pool of job worker processes. Cheap to clone; the workers exit when the last clone is dropped.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    link: Arc<Link>,
    config: Config,
    permits: Arc<Semaphore>,
    /// Idle workers, most recently used last.
    idle: Mutex<Vec<Worker>>,
    /// Workers alive: idle and busy.
    live: AtomicUsize,
}

struct Worker {
    pid: i32,
    fd: OwnedFd,
    rx: Receiver,
    jobs: u64,
    last_used: Instant,
}

/// A job on its way: the encoded call and the descriptors it carries (owned by the job value,
/// which must outlive the send).
struct Outgoing {
    call: Call,
    fds: Vec<RawFd>,
}

impl Pool {
    /// Runs `job` in a worker and waits for its output without blocking the async runtime's thread.
    ///
    /// Dropping the future before it completes kills the worker running the job (it is replaced
    /// lazily). Needs a tokio runtime with the time driver when the pool has a timeout, memory
    /// limit or idle timeout.
    pub async fn run<J: Job>(&self, job: J) -> Result<J::Output, Error> {
        let out = self.encode(&job)?;
        let permit = self
            .inner
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let mut busy = self.inner.start(permit, out)?;
        drop(job);
        loop {
            let (body, fds) = busy.wait_async().await?;
            if let Some(answer) = busy.answer::<J>(body, fds) {
                return answer;
            }
        }
    }

    /// Runs `job` in a worker and blocks this thread until its output is back.
    ///
    /// When it is the only job in flight in the pool, this thread spins (yielding) for up to
    /// 50 µs on the answer before sleeping, which saves a cross-CPU wake-up for short jobs (see
    /// docs/SPAWNER.md, "Costs"; `TINE_SPAWNER_SPIN_US=0` turns it off).
    pub fn run_blocking<J: Job>(&self, job: J) -> Result<J::Output, Error> {
        let out = self.encode(&job)?;
        let permit = match self.inner.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => block_on(self.inner.permits.clone().acquire_owned())
                .expect("the semaphore is never closed"),
        };
        let mut busy = self.inner.start(permit, out)?;
        drop(job);
        loop {
            let (body, fds) = busy.wait_blocking()?;
            if let Some(answer) = busy.answer::<J>(body, fds) {
                return answer;
            }
        }
    }

    /// Starts workers until [`min_workers`](PoolBuilder::min_workers) are alive (not in one-shot mode).
    pub fn prestart(&self) -> Result<(), Error> {
        if self.inner.config.one_shot {
            return Ok(());
        }
        while self.inner.live.load(Ordering::Relaxed) < self.inner.config.min_workers {
            let w = self.inner.spawn(None)?;
            self.inner
                .idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(w);
        }
        Ok(())
    }

    /// Lets idle workers beyond `min_workers` that passed the idle timeout exit now.
    pub fn shrink_idle(&self) {
        self.inner.shrink();
    }

    /// Workers alive, idle or busy.
    pub fn live_workers(&self) -> usize {
        self.inner.live.load(Ordering::Relaxed)
    }

    /// The pids of the idle workers, most recently used last.
    pub fn idle_pids(&self) -> Vec<i32> {
        self.inner
            .idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|w| w.pid)
            .collect()
    }

    fn encode<J: Job>(&self, job: &J) -> Result<Outgoing, Error> {
        if self.inner.link.registry().get(J::NAME).is_none() {
            return Err(Error::UnknownJob {
                name: J::NAME.to_string(),
            });
        }
        let (payload, fds) = job::encode(job).map_err(|message| Error::Serialization {
            pid: None,
            side: Side::EncodeJob,
            message,
        })?;
        Ok(Outgoing {
            call: Call {
                job: J::NAME.to_string(),
                payload,
                spin_us: 0,
            },
            fds,
        })
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let idle = std::mem::take(self.idle.get_mut().unwrap_or_else(|e| e.into_inner()));
        for w in idle {
            self.link.notify(&ToSpawner::Release {
                pid: w.pid,
                kill: false,
            });
        }
    }
}

impl Inner {
    /// Gets a worker and hands it the job.
    fn start(self: &Arc<Self>, permit: OwnedSemaphorePermit, out: Outgoing) -> Result<Busy, Error> {
        if self.config.one_shot {
            let worker = self.spawn(Some(out))?;
            return Ok(Busy {
                inner: self.clone(),
                worker: Some(worker),
                _permit: permit,
                started: Instant::now(),
                panicking: Vec::new(),
                spin: Duration::ZERO,
            });
        }
        self.shrink();
        // Spin only for a lone job: the permit this job holds is the only one taken.
        let alone = self.permits.available_permits() + 1 >= self.config.max_workers;
        let spin = if alone {
            wire::spin_budget()
        } else {
            Duration::ZERO
        };
        let mut call = out.call;
        call.spin_us = u32::try_from(spin.as_micros()).unwrap_or(u32::MAX);
        let body = wire::encode(&ToWorker::Run(call)).map_err(|e| Error::Serialization {
            pid: None,
            side: Side::EncodeJob,
            message: e.to_string(),
        })?;
        if body.len() > wire::MAX_MESSAGE {
            return Err(Error::Serialization {
                pid: None,
                side: Side::EncodeJob,
                message: format!(
                    "the job is {} bytes encoded, over the wire's limit of {} (pass big data as a \
                     descriptor, e.g. a memfd)",
                    body.len(),
                    wire::MAX_MESSAGE
                ),
            });
        }
        // An idle worker may have died meanwhile (killed from outside): the job never reached it,
        // so it is safe to try once more on another one.
        for attempt in 0..2 {
            let reused = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let fresh = reused.is_none();
            let worker = match reused {
                Some(w) => w,
                None => self.spawn(None)?,
            };
            match wire::send(worker.fd.as_fd(), &body, &out.fds) {
                Ok(()) => {
                    return Ok(Busy {
                        inner: self.clone(),
                        worker: Some(worker),
                        _permit: permit,
                        started: Instant::now(),
                        panicking: Vec::new(),
                        spin,
                    })
                }
                Err(e) => {
                    let pid = worker.pid;
                    self.discard(worker, true);
                    if fresh || attempt == 1 {
                        return Err(Error::Io { pid, source: e });
                    }
                }
            }
        }
        unreachable!("the loop returns on its second attempt")
    }

    /// Asks the spawner for a worker (one-shot: with its job).
    fn spawn(&self, one_shot: Option<Outgoing>) -> Result<Worker, Error> {
        let (call, fds) = match one_shot {
            Some(out) => (Some(out.call), out.fds),
            None => (None, Vec::new()),
        };
        let (reply, mut got) = self
            .link
            .request(&ToSpawner::Spawn { one_shot: call }, &fds)?;
        match reply {
            FromSpawner::Spawned { pid } if got.len() == 1 => {
                self.live.fetch_add(1, Ordering::Relaxed);
                let fd = got.pop().expect("one descriptor");
                Ok(Worker {
                    pid,
                    fd,
                    rx: Receiver::new(),
                    jobs: 0,
                    last_used: Instant::now(),
                })
            }
            FromSpawner::SpawnFailed(e) => Err(Error::SpawnFailed(e)),
            other => Err(self.link.protocol(format!(
                "expected Spawned with one descriptor, got {other:?} with {}",
                got.len()
            ))),
        }
    }

    /// Puts a worker that finished a job back, or retires it.
    fn checkin(&self, mut w: Worker) {
        w.jobs += 1;
        w.last_used = Instant::now();
        let worn_out = self.config.one_shot
            || self
                .config
                .max_jobs_per_worker
                .is_some_and(|max| w.jobs >= max);
        let bloated = self
            .config
            .memory_limit_kb
            .is_some_and(|limit| crate::sys::meminfo::rss_kb(w.pid).is_some_and(|rss| rss > limit));
        if worn_out || bloated {
            self.discard(w, false);
        } else {
            self.idle.lock().unwrap_or_else(|e| e.into_inner()).push(w);
        }
        self.shrink();
    }

    /// Lets go of a worker: closing its channel makes it exit, the spawner reaps it.
    fn discard(&self, w: Worker, kill: bool) {
        self.live.fetch_sub(1, Ordering::Relaxed);
        self.link.notify(&ToSpawner::Release { pid: w.pid, kill });
    }

    fn shrink(&self) {
        let Some(idle_timeout) = self.config.idle_timeout else {
            return;
        };
        let mut retired = Vec::new();
        {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            while let Some(oldest) = idle.first() {
                if oldest.last_used.elapsed() < idle_timeout
                    || self.live.load(Ordering::Relaxed) - retired.len() <= self.config.min_workers
                {
                    break;
                }
                retired.push(idle.remove(0));
            }
        }
        for w in retired {
            self.discard(w, false);
        }
    }
}

/// A worker with a job in flight. Dropped before the answer came (a cancelled future), it kills
/// the worker.
struct Busy {
    inner: Arc<Inner>,
    worker: Option<Worker>,
    _permit: OwnedSemaphorePermit,
    started: Instant,
    /// The panics the worker reported on the job's thread (the latest [`MAX_PANIC_NOTES`]): if the
    /// worker then dies of SIGABRT, they are why.
    panicking: Vec<PanicReport>,
    /// How long `run_blocking` spins on the answer before sleeping (see [`wire::spin_budget`]).
    spin: Duration,
}

/// Most panic notes kept per job (a job that catches panics in a loop sends one each).
const MAX_PANIC_NOTES: usize = 8;

/// The error for a worker that aborted after reporting `notes` (oldest first, not empty): the
/// messages in order (a panic, then a panic in a `Drop` while unwinding, ...), the last backtrace.
fn aborted_after_panic(pid: i32, mut notes: Vec<PanicReport>) -> Error {
    let last = notes.pop().expect("at least one note");
    let mut message = String::new();
    for note in notes {
        message.push_str(&note.message);
        message.push_str("; then: ");
    }
    message.push_str(&last.message);
    Error::Panicked {
        pid,
        message,
        backtrace: last.backtrace,
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if let Some(w) = self.worker.take() {
            self.inner.discard(w, true);
        }
    }
}

/// When to look at the job's limits next, if it has any.
fn next_check(cfg: &Config, started: Instant) -> Option<Instant> {
    let deadline = cfg.timeout.map(|t| started + t);
    let memory = cfg.memory_limit_kb.map(|_| {
        let polls = (started.elapsed().as_micros() / cfg.memory_poll.as_micros().max(1)) as u32 + 1;
        started + cfg.memory_poll * polls
    });
    match (deadline, memory) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Whether the job passed one of its limits.
fn check(cfg: &Config, started: Instant, pid: i32) -> Verdict {
    if cfg.timeout.is_some_and(|t| started.elapsed() >= t) {
        return Verdict::Timeout;
    }
    if let Some(limit) = cfg.memory_limit_kb {
        if let Some(rss) = crate::sys::meminfo::rss_kb(pid) {
            if rss > limit {
                return Verdict::Memory(rss);
            }
        }
    }
    Verdict::Wait
}

/// What a check while waiting found.
enum Verdict {
    Wait,
    Timeout,
    Memory(u64),
}

impl Busy {
    fn worker(&mut self) -> &mut Worker {
        self.worker
            .as_mut()
            .expect("a Busy holds its worker until it is consumed")
    }

    fn pid(&self) -> i32 {
        self.worker.as_ref().map(|w| w.pid).unwrap_or(0)
    }

    /// Kills the worker for a limit and returns the error that says so.
    fn enforce(&mut self, verdict: Verdict) -> Error {
        let w = self.worker.take().expect("worker present");
        let pid = w.pid;
        self.inner.live.fetch_sub(1, Ordering::Relaxed);
        drop(w);
        // The reap also makes sure the worker is gone before the caller hears of it.
        if let Err(e) = self.inner.link.reap(pid, true) {
            return e;
        }
        match verdict {
            Verdict::Memory(rss_kb) => Error::MemoryLimit {
                pid,
                rss_kb,
                limit_kb: self.inner.config.memory_limit_kb.unwrap_or(0),
            },
            _ => Error::Timeout {
                pid,
                timeout: self.inner.config.timeout.unwrap_or_default(),
            },
        }
    }

    /// The channel closed: the worker died. Ask the spawner how.
    fn died(&mut self) -> Error {
        let w = self.worker.take().expect("worker present");
        self.inner.live.fetch_sub(1, Ordering::Relaxed);
        let pid = w.pid;
        drop(w);
        match self.inner.link.reap(pid, false) {
            // Unwinding was not possible (`panic = "abort"`, a panic while unwinding): the abort
            // is the panics'.
            Ok(Death::Signaled {
                signal: libc::SIGABRT,
                ..
            }) if !self.panicking.is_empty() => {
                aborted_after_panic(pid, std::mem::take(&mut self.panicking))
            }
            Ok(death) => Error::WorkerDied { pid, death },
            Err(e) => e,
        }
    }

    /// A channel error: the worker is of no use any more.
    fn broken(&mut self, e: std::io::Error) -> Error {
        let w = self.worker.take().expect("worker present");
        let pid = w.pid;
        self.inner.discard(w, true);
        if e.kind() == std::io::ErrorKind::InvalidData {
            Error::Protocol {
                pid,
                detail: e.to_string(),
            }
        } else {
            Error::Io { pid, source: e }
        }
    }

    fn wait_blocking(&mut self) -> Result<(Vec<u8>, Vec<OwnedFd>), Error> {
        let spin = self.spin;
        let w = self.worker();
        match w.rx.spin(w.fd.as_fd(), spin) {
            Ok(Received::Message(body, fds)) => return Ok((body, fds)),
            Ok(Received::Eof) => return Err(self.died()),
            Ok(Received::WouldBlock) => {}
            Err(e) => return Err(self.broken(e)),
        }
        loop {
            let next = next_check(&self.inner.config, self.started);
            if let Some(next) = next {
                let wait = next.saturating_duration_since(Instant::now());
                let ms = u16::try_from(wait.as_micros().div_ceil(1000)).unwrap_or(u16::MAX);
                let w = self.worker();
                let mut fds = [PollFd::new(w.fd.as_fd(), PollFlags::POLLIN)];
                match poll(&mut fds, PollTimeout::from(ms)) {
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => return Err(self.broken(e.into())),
                }
            }
            let w = self.worker();
            match w.rx.recv(w.fd.as_fd(), next.is_some()) {
                Ok(Received::Message(body, fds)) => return Ok((body, fds)),
                Ok(Received::Eof) => return Err(self.died()),
                Ok(Received::WouldBlock) => {
                    match check(&self.inner.config, self.started, self.pid()) {
                        Verdict::Wait => {}
                        verdict => return Err(self.enforce(verdict)),
                    }
                }
                Err(e) => return Err(self.broken(e)),
            }
        }
    }

    async fn wait_async(&mut self) -> Result<(Vec<u8>, Vec<OwnedFd>), Error> {
        let (cfg, started) = (&self.inner.config, self.started);
        let Some(Worker { pid, fd, rx, .. }) = self.worker.as_mut() else {
            unreachable!("worker present")
        };
        let pid = *pid;
        let outcome = 'wait: {
            let afd = match crate::sys::spawner::watch_readable(fd.as_fd()) {
                Ok(afd) => afd,
                Err(e) => break 'wait Err(e),
            };
            loop {
                let ready = match next_check(cfg, started) {
                    None => Some(afd.readable().await),
                    Some(at) => tokio::select! {
                        r = afd.readable() => Some(r),
                        _ = tokio::time::sleep_until(at.into()) => None,
                    },
                };
                let mut guard = match ready {
                    Some(Ok(g)) => Some(g),
                    Some(Err(e)) => break 'wait Err(e),
                    None => None,
                };
                match rx.recv(fd.as_fd(), true) {
                    Ok(Received::WouldBlock) => {
                        if let Some(g) = guard.as_mut() {
                            g.clear_ready();
                        }
                        match check(cfg, started, pid) {
                            Verdict::Wait => {}
                            verdict => break 'wait Ok(Err(verdict)),
                        }
                    }
                    Ok(received) => break 'wait Ok(Ok(received)),
                    Err(e) => break 'wait Err(e),
                }
            }
        };
        match outcome {
            Ok(Ok(Received::Message(body, fds))) => Ok((body, fds)),
            Ok(Ok(_)) => Err(self.died()),
            Ok(Err(verdict)) => Err(self.enforce(verdict)),
            Err(e) => Err(self.broken(e)),
        }
    }

    /// Turns the worker's message into the job's result, and puts the worker back or away; `None`
    /// for a note that is no answer (a panic the job may still catch): keep waiting.
    fn answer<J: Job>(
        &mut self,
        body: Vec<u8>,
        fds: Vec<OwnedFd>,
    ) -> Option<Result<J::Output, Error>> {
        let pid = self.pid();
        let reply = match wire::decode::<FromWorker>(&body) {
            Ok(r) => r,
            Err(e) => return Some(Err(self.broken(e))),
        };
        let failure = match reply {
            FromWorker::Panicking(report) => {
                if self.panicking.len() == MAX_PANIC_NOTES {
                    self.panicking.remove(0);
                }
                self.panicking.push(report);
                return None;
            }
            FromWorker::Done(bytes) => {
                let w = self.worker.take().expect("worker present");
                self.inner.checkin(w);
                return Some(job::decode::<J::Output>(&bytes, fds).map_err(|message| {
                    Error::Serialization {
                        pid: Some(pid),
                        side: Side::DecodeOutput,
                        message,
                    }
                }));
            }
            FromWorker::Failed(failure) => failure,
        };
        let w = self.worker.take().expect("worker present");
        Some(Err(match failure {
            Failure::Panicked(report) => {
                // The worker exits by itself right after this (its state may be broken); it has
                // finished printing the panic already, so it is not killed.
                self.inner.discard(w, false);
                Error::Panicked {
                    pid,
                    message: report.message,
                    backtrace: report.backtrace,
                }
            }
            Failure::Decode(message) => {
                self.inner.checkin(w);
                Error::Serialization {
                    pid: Some(pid),
                    side: Side::DecodeJob,
                    message,
                }
            }
            Failure::Encode(message) => {
                self.inner.checkin(w);
                Error::Serialization {
                    pid: Some(pid),
                    side: Side::EncodeOutput,
                    message,
                }
            }
            Failure::UnknownJob(name) => {
                self.inner.checkin(w);
                Error::UnknownJob { name }
            }
        }))
    }
}

/// Drives a future to completion on this thread (for `run_blocking` waiting for a free worker).
fn block_on<F: Future>(fut: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    loop {
        if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return out;
        }
        std::thread::park();
    }
}
