//! The sequence every child runs right after its fork, in DESIGN.md's order.

use std::os::fd::RawFd;

use nix::sys::signal::Signal;
use nix::unistd::{getppid, setpgid, Pid};

use crate::config::RunAs;
use crate::sys::process;

/// Runs the after-fork sequence: own process group, close inherited fds not in `keep`, reset
/// signals, drop privileges to `run_as`, parent-death signal, check the parent is `monitor`.
/// Exits the process on failure.
///
/// A worker forked through a mold's double fork is re-parented to the monitor (a subreaper) only
/// when the middle process exits, so it first waits, briefly, to be the monitor's child: setting the
/// parent-death signal earlier would tie it to the middle process.
pub fn after_fork(monitor: Pid, keep: &[RawFd], run_as: Option<RunAs>) {
    // A terminal's Ctrl-C goes to the foreground process group: only the monitor's.
    let _ = setpgid(Pid::from_raw(0), Pid::from_raw(0));
    let mut keep = keep.to_vec();
    keep.extend([0, 1, 2]);
    if process::close_fds_except(&keep).is_err() {
        process::exit_now(70);
    }
    if process::reset_signals().is_err() {
        process::exit_now(70);
    }
    // systemd's notification socket belongs to the monitor alone. Single-threaded here, so
    // changing the environment is sound.
    std::env::remove_var("NOTIFY_SOCKET");
    // Rust's runtime ignores SIGPIPE so that writes to closed sockets are errors, not deaths.
    let _ = process::ignore_signal(Signal::SIGPIPE);
    // Privileges go before the parent-death signal: a uid change clears it.
    // A worker forked by a mold that already dropped them has nothing left to drop.
    let already = |uid: u32, gid: u32| {
        nix::unistd::getuid().as_raw() == uid && nix::unistd::getgid().as_raw() == gid
    };
    if let Some(RunAs { uid, gid }) = run_as.filter(|r| !already(r.uid, r.gid)) {
        let gid = nix::unistd::Gid::from_raw(gid);
        if nix::unistd::setgroups(&[gid]).is_err()
            || nix::unistd::setgid(gid).is_err()
            || nix::unistd::setuid(nix::unistd::Uid::from_raw(uid)).is_err()
        {
            crate::log::print_stderr(format_args!("tine: cannot switch to uid {uid} gid {gid}"));
            process::exit_now(73);
        }
    }
    let until = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while getppid() != monitor {
        if std::time::Instant::now() > until {
            process::exit_now(71);
        }
        std::thread::yield_now();
    }
    if process::set_parent_death_signal(Signal::SIGKILL).is_err() {
        process::exit_now(70);
    }
    // The monitor may have died between the check above and the prctl.
    if getppid() != monitor {
        process::exit_now(71);
    }
}

/// Runs `f` in a forked child and ends the process: a panic must never unwind into the parent's
/// code, which would then run on in the child.
pub fn run_child(f: impl FnOnce() -> i32) -> ! {
    let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(101);
    process::exit_now(code)
}
