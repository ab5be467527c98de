//! What the kernel itself reports about starving its own threads, read from `/dev/kmsg`.
//!
//! On this project's test machine (a 2-vCPU VM, Linux 6.18 built with `PREEMPT_NONE`) the kernel
//! sometimes runs user tasks on both CPUs for tens of seconds while its own threads starve: it
//! then logs "rcu_preempt kthread starved for 14752 jiffies" (59 s at HZ=250) and "workqueue
//! lockup - pool cpus=0 ... stuck for 52s!". Meanwhile everything that waits for a grace period or
//! a kworker waits too (a process's exit, a `wait4` reaping it, reads of `/proc`), in every
//! program on the machine: the first such reports came hours before tine's monitor changed any
//! priority, with the test's own client threads on the CPUs. A test that blames the program under
//! test for a timeout must first ask whether the kernel said it was starving then;
//! [`KernelLog::starvation`] answers with the time windows the kernel reported.
//!
//! Reading `/dev/kmsg` needs root (or `kernel.dmesg_restrict = 0`); without it [`KernelLog::open`]
//! returns `None` and nothing is excused.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

/// A time window in which the kernel reported starving its own threads, as this process's
/// [`Instant`]s (`/dev/kmsg` stamps records with the monotonic clock in µs).
#[derive(Debug, Clone)]
pub struct Starvation {
    pub from: Instant,
    pub to: Instant,
    /// The kernel's line.
    pub line: String,
}

impl Starvation {
    /// Whether `[began, ended]` overlaps this window widened by `margin` on each side.
    pub fn overlaps(&self, began: Instant, ended: Instant, margin: Duration) -> bool {
        began <= self.to + margin && ended + margin >= self.from
    }
}

/// The kernel's log from the moment [`KernelLog::open`] was called.
pub struct KernelLog {
    file: File,
    /// The kernel log's clock minus the monotonic clock, in µs: printk stamps come from the
    /// scheduler's clock, close to the monotonic one (13 ms apart on this VM) but not the same.
    offset_us: i64,
    /// Every starvation report read so far.
    seen: Vec<Starvation>,
}

/// The kernel's jiffy rate, for the RCU report (given in jiffies): `CONFIG_HZ` from
/// `/proc/config.gz` is not readable without a decompressor, so it is measured from
/// `/proc/timer_list` when that is readable, else taken as 250 (this VM's).
fn hz() -> f64 {
    let jiffies = || -> Option<u64> {
        let text = std::fs::read_to_string("/proc/timer_list").ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("jiffies: "))
            .and_then(|v| v.trim().parse().ok())
    };
    let (Some(a), t) = (jiffies(), Instant::now()) else {
        return 250.0;
    };
    std::thread::sleep(Duration::from_millis(200));
    match jiffies() {
        Some(b) if b > a => (b - a) as f64 / t.elapsed().as_secs_f64(),
        _ => 250.0,
    }
}

/// The monotonic clock now, in µs (the clock of `/dev/kmsg`'s stamps).
fn monotonic_us() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000
}

impl KernelLog {
    /// Starts reading the kernel's log from now on; `None` when `/dev/kmsg` cannot be read.
    pub fn open() -> Option<KernelLog> {
        let file = reader_from_now()?;
        let offset_us = calibrate().unwrap_or(0);
        Some(KernelLog {
            file,
            offset_us,
            seen: Vec::new(),
        })
    }

    /// Every window, since [`KernelLog::open`], in which the kernel reported starving its own
    /// threads: an RCU grace-period kthread starved, a workqueue pool stuck, a soft lockup.
    pub fn starvation(&mut self) -> Vec<Starvation> {
        let now_us = monotonic_us();
        let now = Instant::now();
        let mut hz = None;
        let mut buf = vec![0u8; 8192];
        loop {
            // One record per read; EAGAIN at the end; EPIPE when records were overwritten
            // meanwhile (the read position then moves on to the oldest one left).
            let n = match self.file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.raw_os_error() == Some(nix::libc::EPIPE) => continue,
                Err(_) => break,
            };
            let record = String::from_utf8_lossy(&buf[..n]);
            let Some((header, message)) = record.split_once(';') else {
                continue;
            };
            let Some(stamp_us) = header.split(',').nth(2).and_then(|s| s.parse::<u64>().ok())
            else {
                continue;
            };
            let message = message.lines().next().unwrap_or("").trim().to_string();
            let Some(lasted) = starved_for(&message, || *hz.get_or_insert_with(self::hz)) else {
                continue;
            };
            let stamp_us = (stamp_us as i64 - self.offset_us).max(0) as u64;
            let to = now
                .checked_sub(Duration::from_micros(now_us.saturating_sub(stamp_us)))
                .unwrap_or(now);
            let from = to.checked_sub(lasted).unwrap_or(to);
            self.seen.push(Starvation {
                from,
                to,
                line: message,
            });
        }
        self.seen.clone()
    }
}

/// `/dev/kmsg` opened for non-blocking reads of the records written from now on.
fn reader_from_now() -> Option<File> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open("/dev/kmsg")
        .ok()?;
    file.seek(SeekFrom::End(0)).ok()?;
    Some(file)
}

/// The kernel log's clock minus the monotonic clock (µs), from a line this process writes to
/// `/dev/kmsg` (root) and reads back with its stamp; `None` when it cannot.
fn calibrate() -> Option<i64> {
    use std::io::Write;
    let mut reader = reader_from_now()?;
    let marker = format!("tine test: kmsg clock marker {}", std::process::id());
    let before = monotonic_us();
    std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/kmsg")
        .ok()?
        .write_all(marker.as_bytes())
        .ok()?;
    let after = monotonic_us();
    let mut buf = vec![0u8; 8192];
    for _ in 0..100 {
        match reader.read(&mut buf) {
            Ok(n) if n > 0 => {
                let record = String::from_utf8_lossy(&buf[..n]);
                if record.contains(&marker) {
                    let stamp: i64 = record.split(',').nth(2)?.split(';').next()?.parse().ok()?;
                    return Some(stamp - ((before + after) / 2) as i64);
                }
            }
            Ok(_) => return None,
            Err(e) if e.raw_os_error() == Some(nix::libc::EAGAIN) => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(_) => {}
        }
    }
    None
}

/// How long the kernel says its threads starved, if `message` is such a report.
pub fn starved_for(message: &str, hz: impl FnOnce() -> f64) -> Option<Duration> {
    let number_after = |prefix: &str| -> Option<f64> {
        let rest = &message[message.find(prefix)? + prefix.len()..];
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        digits.parse().ok()
    };
    if message.contains("workqueue lockup") {
        // "BUG: workqueue lockup - pool cpus=0 node=0 flags=0x0 nice=0 stuck for 52s!"
        return number_after("stuck for ").map(Duration::from_secs_f64);
    }
    if message.contains("kthread starved for") {
        // "rcu: rcu_preempt kthread starved for 14752 jiffies! g7461317 ..."
        return number_after("starved for ").map(|j| Duration::from_secs_f64(j / hz()));
    }
    if message.contains("soft lockup") {
        // "watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [name:pid]"
        return number_after("stuck for ").map(Duration::from_secs_f64);
    }
    None
}
