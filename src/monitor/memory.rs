//! The tree's memory figures (RSS, PSS, USS per process), read once and shared by everything in
//! the monitor that shows them: `ctl status` (so every `tine top` refresh), the Prometheus
//! endpoint and the `max_pss_mb` limit.
//!
//! PSS and USS come from `/proc/PID/smaps_rollup`, which walks the process's page tables under
//! its mmap lock: a few hundred microseconds for a small worker, much more for a big one, and it
//! briefly holds off that process's own page faults. Without a cache each viewer of `tine top`
//! (one status a second) and each metrics scrape read every process again. With it, a process is
//! read at most once per [`MEMORY_TTL`], however many viewers, scrapers and limits ask.
//!
//! The TTL is 1 s: `tine top` refreshes once a second, so its figures are at most one refresh
//! old, and a test (or an operator) comparing `status` with its own reading of `/proc` sees a
//! figure at most 1 s old. Metrics scrapes (usually every 10–60 s) always get a fresh reading.

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::sys::meminfo::{self, Memory};

/// How long a process's memory figures are reused.
pub(crate) const MEMORY_TTL: Duration = Duration::from_secs(1);

/// Memory figures by pid, each with the time it was read.
///
/// Behind a `RefCell` so that readers holding `&Monitor` (status and metrics build their rows from
/// a shared borrow) can fill it; the monitor is single-threaded, so no borrow is ever contended.
#[derive(Default)]
pub(crate) struct MemoryCache {
    read: RefCell<HashMap<i32, (Instant, Memory)>>,
}

impl MemoryCache {
    /// Memory of `pid`, read from `/proc` at most every [`MEMORY_TTL`]; zeros for a process that
    /// cannot be read (gone, or not ours to read).
    pub(crate) fn get(&self, pid: i32) -> Memory {
        if let Some((at, m)) = self.read.borrow().get(&pid) {
            if at.elapsed() < MEMORY_TTL {
                return *m;
            }
        }
        // Never wait on a process that is exiting or stopped (see `busy_with_exit_or_stopped`):
        // its last figures (or zeros) do, and it is read again once it runs.
        if meminfo::busy_with_exit_or_stopped(pid) {
            return self
                .read
                .borrow()
                .get(&pid)
                .map(|(_, m)| *m)
                .unwrap_or_default();
        }
        let m = meminfo::memory(pid).unwrap_or_default();
        self.read.borrow_mut().insert(pid, (Instant::now(), m));
        m
    }

    /// Forgets every process but `live` (pids of gone processes may be reused).
    pub(crate) fn retain(&self, live: &[i32]) {
        self.read.borrow_mut().retain(|pid, _| live.contains(pid));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stopped_process_is_not_read_and_keeps_its_last_figures() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let pid = child.id() as i32;
        let cache = MemoryCache::default();
        let running = cache.get(pid);
        assert!(running.rss_kb > 0, "{running:?}");
        let stale = Instant::now() - MEMORY_TTL;
        cache.read.borrow_mut().get_mut(&pid).expect("cached").0 = stale;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGSTOP)
            .expect("SIGSTOP");
        // Stopped: its last figures, not read again.
        let stopped = (0..100)
            .find_map(|_| {
                std::thread::sleep(Duration::from_millis(10));
                meminfo::busy_with_exit_or_stopped(pid).then(|| cache.get(pid))
            })
            .expect("seen stopped within a second");
        assert_eq!(stopped, running);
        assert_eq!(cache.read.borrow()[&pid].0, stale, "read while stopped");
        let _ = child.kill();
        let _ = child.wait();
        assert!(meminfo::busy_with_exit_or_stopped(pid), "a reaped pid");
    }

    #[test]
    fn a_reading_is_reused_within_the_ttl_and_forgotten_with_its_process() {
        let cache = MemoryCache::default();
        let me = std::process::id() as i32;
        let first = cache.get(me);
        assert!(first.rss_kb > 0 && first.pss_kb > 0, "{first:?}");
        let at = cache.read.borrow()[&me].0;
        assert_eq!(cache.get(me), first);
        assert_eq!(cache.read.borrow()[&me].0, at, "read again within the TTL");
        // Past the TTL it is read again.
        let stale = Instant::now() - MEMORY_TTL;
        cache
            .read
            .borrow_mut()
            .insert(me, (stale, Memory::default()));
        assert!(cache.get(me).rss_kb > 0);
        assert!(cache.read.borrow()[&me].0 > stale);
        cache.retain(&[]);
        assert!(cache.read.borrow().is_empty());
    }
}
