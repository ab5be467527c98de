//! Waiting that does not count time the machine did not run.
//!
//! On a shared virtual machine both CPUs sometimes stop for tens of seconds (the kernel then logs
//! "workqueue lockup ... stuck for 39s" for every CPU at once). Nothing runs meanwhile, neither the
//! program under test nor the test, but the monotonic clock goes on: a test waiting 30 s for the
//! program to react then gives up the moment the machine resumes, before the program has run at
//! all, and blames the program. A [`StallWatch`] measures such stalls (a thread that sleeps 20 ms
//! and notes how late it woke) so that a wait can give the program the time it was owed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long the watcher sleeps between two looks at the clock.
const TICK: Duration = Duration::from_millis(20);
/// A wake-up later than this counts as a stall (shorter delays are ordinary scheduling).
const STALL: Duration = Duration::from_millis(250);

/// Measures, from its start, the time this process could not run (see the module's docs).
pub struct StallWatch {
    stalled_us: Arc<AtomicU64>,
    over: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl StallWatch {
    pub fn start() -> StallWatch {
        let stalled_us = Arc::new(AtomicU64::new(0));
        let over = Arc::new(AtomicBool::new(false));
        let (total, done) = (stalled_us.clone(), over.clone());
        let thread = std::thread::spawn(move || {
            let mut last = Instant::now();
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(TICK);
                let now = Instant::now();
                let late = now.duration_since(last).saturating_sub(TICK);
                if late > STALL {
                    total.fetch_add(late.as_micros() as u64, Ordering::Relaxed);
                }
                last = now;
            }
        });
        StallWatch {
            stalled_us,
            over,
            thread: Some(thread),
        }
    }

    /// Time stalled so far.
    pub fn stalled(&self) -> Duration {
        Duration::from_micros(self.stalled_us.load(Ordering::Relaxed))
    }
}

impl Drop for StallWatch {
    fn drop(&mut self) {
        self.over.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Calls `f` every 10 ms until it returns `Some`, or gives up once `timeout` has passed, not
/// counting time the machine stalled meanwhile (at most `timeout` of it: the wait stays bounded by
/// twice `timeout`). Returns the value, or how long the machine stalled during the wait.
pub fn poll_until_running<T>(
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Result<T, Duration> {
    let watch = StallWatch::start();
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        let stalled = watch.stalled();
        if start.elapsed() >= timeout + stalled.min(timeout) {
            return Err(stalled);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
