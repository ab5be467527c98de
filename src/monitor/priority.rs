//! The tree's CPU priority: the nice value tine was started with (handed over across a reload's
//! re-exec, and set back by each mold after its fork) and the monitor's boost above it
//! (`monitor_nice_boost`).

use std::sync::atomic::{AtomicI32, Ordering};

use crate::sys::process;

/// Records the tree's nice value and raises the monitor `boost` levels above it.
pub(super) fn settle(tree_nice: i32, boost: u8) {
    TREE_NICE.store(tree_nice, Ordering::Relaxed);
    boost_priority(tree_nice, boost);
}

/// The nice value of the tree: the one tine was started with (handed over across a reload's
/// re-exec). The mold sets it back after its fork, so the monitor's boost is its own.
static TREE_NICE: AtomicI32 = AtomicI32::new(0);

/// See [`TREE_NICE`].
pub(super) fn tree_nice() -> i32 {
    TREE_NICE.load(Ordering::Relaxed)
}

/// Runs the monitor `boost` nice levels above the tree (`monitor_nice_boost`): it needs little
/// CPU, but at once (a `ctl` reply, a child to reap, a hang to catch), and on a saturated machine
/// a process at the same level as the busy ones waits behind them for seconds at a time. Without
/// the privilege to lower its nice value the monitor stays at the tree's level, and says so.
fn boost_priority(tree_nice: i32, boost: u8) {
    let wanted = (tree_nice - i32::from(boost)).clamp(-20, 19);
    let now = process::nice().unwrap_or(tree_nice);
    if now == wanted {
        return;
    }
    match process::set_nice(wanted) {
        Ok(()) => tracing::info!(
            nice = wanted,
            tree_nice,
            "the monitor runs above the tree's CPU priority (monitor_nice_boost)"
        ),
        Err(e) => tracing::info!(
            error = %e,
            nice = now,
            tree_nice,
            "cannot raise the monitor's CPU priority (monitor_nice_boost needs CAP_SYS_NICE or RLIMIT_NICE); it stays where it is"
        ),
    }
}
