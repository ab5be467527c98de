//! systemd integration: socket activation and `sd_notify` (READY, RELOADING, STOPPING, STATUS,
//! WATCHDOG). `NOTIFY_SOCKET` stays with the monitor; children drop it after their fork.

use std::time::{Duration, Instant};

use sd_notify::NotifyState;

use super::Monitor;
use crate::listener::Listener;

/// Takes the sockets passed by systemd socket activation (`LISTEN_PID`, `LISTEN_FDS`,
/// `LISTEN_FDNAMES`, `LISTEN_FDS_FIRST_FD`), once: the variables are removed so that a re-exec does
/// not misread them. Returns the listeners and their names.
pub(crate) fn take_activated_sockets() -> Result<Vec<(Listener, String)>, String> {
    let var = |k: &str| std::env::var(k).ok();
    let (pid, count, names, first) = (
        var("LISTEN_PID"),
        var("LISTEN_FDS"),
        var("LISTEN_FDNAMES"),
        var("LISTEN_FDS_FIRST_FD"),
    );
    // Single-threaded here: changing the environment is sound.
    for k in [
        "LISTEN_PID",
        "LISTEN_FDS",
        "LISTEN_FDNAMES",
        "LISTEN_FDS_FIRST_FD",
    ] {
        std::env::remove_var(k);
    }
    let (Some(pid), Some(count)) = (pid, count) else {
        return Ok(Vec::new());
    };
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(Vec::new()); // meant for another process
    }
    let count: i32 = count
        .trim()
        .parse()
        .map_err(|_| format!("LISTEN_FDS={count:?} is not a number"))?;
    let first: i32 = match first {
        Some(f) => f
            .trim()
            .parse()
            .map_err(|_| format!("LISTEN_FDS_FIRST_FD={f:?} is not a number"))?,
        None => 3,
    };
    let names: Vec<String> = names
        .map(|n| n.split(':').map(str::to_string).collect())
        .unwrap_or_default();
    let mut out = Vec::new();
    for i in 0..count {
        let fd = crate::sys::fd::adopt(first + i);
        let listener = Listener::from_inherited(fd)
            .map_err(|e| format!("socket-activated fd {}: {e}", first + i))?;
        let name = names
            .get(i as usize)
            .cloned()
            .unwrap_or_else(|| "unknown".into());
        out.push((listener, name));
    }
    Ok(out)
}

/// The watchdog interval systemd asked for, halved (ping twice per period).
///
/// As libsystemd's `sd_watchdog_enabled`: `WATCHDOG_USEC` enables it; `WATCHDOG_PID`, when set,
/// must name this process (the `sd-notify` crate also requires it to be set). The variables stay:
/// the pid is the same after a reload's re-exec, which reads them again.
pub(crate) fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

fn send(states: &[NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        if let Err(e) = sd_notify::notify(false, states) {
            tracing::warn!(error = %e, "sd_notify failed");
        }
    }
}

pub(crate) fn notify_ready(m: &Monitor, status: &str) {
    let status = format!("{status}; {} workers", m.target);
    send(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

pub(crate) fn notify_reloading(_m: &Monitor) {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[
            NotifyState::Reloading,
            now,
            NotifyState::Status("reloading"),
        ]),
        Err(_) => send(&[NotifyState::Reloading, NotifyState::Status("reloading")]),
    }
}

pub(crate) fn notify_stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// Pings the watchdog when due.
pub(crate) fn watchdog_tick(m: &mut Monitor) {
    if let Some((interval, last)) = m.watchdog {
        if last.elapsed() >= interval {
            send(&[NotifyState::Watchdog]);
            m.watchdog = Some((interval, Instant::now()));
        }
    }
}
