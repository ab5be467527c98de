//! Memory and CPU figures of a process, read from `/proc`.

/// Memory of one process in KiB, from `/proc/PID/smaps_rollup` (RSS, PSS) and `status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memory {
    /// Resident set size.
    pub rss_kb: u64,
    /// Proportional set size: private pages plus a fair share of shared ones.
    pub pss_kb: u64,
    /// Unique set size: pages only this process maps.
    pub uss_kb: u64,
    /// Resident pages shared with another process.
    pub shared_kb: u64,
}

/// Whether `pid` is exiting, stopped, traced or a zombie (`/proc/PID/stat`: its state, and the
/// kernel's `PF_EXITING` flag), or cannot be read: a process whose `smaps_rollup` may keep the
/// reader waiting. The kernel reads `smaps_rollup` under the process's mmap lock, which an exiting
/// process holds while it unmaps its memory (normally ~0.3 ms; a CI run saw the monitor wait 10 s
/// on a worker the chaos test had frozen and killed); `stat` takes no such lock.
pub fn busy_with_exit_or_stopped(pid: i32) -> bool {
    const PF_EXITING: u64 = 0x4;
    let Some(fields) = stat_fields(pid) else {
        return true;
    };
    let state = fields.first().and_then(|s| s.chars().next()).unwrap_or('?');
    let flags: u64 = fields.get(9 - 3).and_then(|f| f.parse().ok()).unwrap_or(0);
    !matches!(state, 'R' | 'S' | 'D' | 'I') || flags & PF_EXITING != 0
}

/// The fields of `/proc/PID/stat` from the third (the state) on: the command name before them, in
/// parentheses, may hold spaces. Field N of proc(5) is at index N - 3.
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// Reads RSS, PSS, USS of `pid` from `smaps_rollup` (costly: walks the page tables).
pub fn memory(pid: i32) -> Option<Memory> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let mut m = Memory::default();
    let (mut private_clean, mut private_dirty, mut shared_clean, mut shared_dirty) = (0, 0, 0, 0);
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let (Some(key), Some(value)) = (parts.next(), parts.next()) else {
            continue;
        };
        let value: u64 = value.parse().unwrap_or(0);
        match key {
            "Rss:" => m.rss_kb = value,
            "Pss:" => m.pss_kb = value,
            "Private_Clean:" => private_clean = value,
            "Private_Dirty:" => private_dirty = value,
            "Shared_Clean:" => shared_clean = value,
            "Shared_Dirty:" => shared_dirty = value,
            _ => {}
        }
    }
    m.uss_kb = private_clean + private_dirty;
    m.shared_kb = shared_clean + shared_dirty;
    Some(m)
}

/// Resident set size of `pid` in KiB, from `/proc/PID/statm` (cheap).
pub fn rss_kb(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = text.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size_kb())
}

/// CPU time (user + system) of `pid` in seconds, from `/proc/PID/stat`.
pub fn cpu_seconds(pid: i32) -> Option<f64> {
    let fields = stat_fields(pid)?;
    let utime: u64 = fields.get(14 - 3)?.parse().ok()?;
    let stime: u64 = fields.get(15 - 3)?.parse().ok()?;
    Some((utime + stime) as f64 / clock_ticks() as f64)
}

fn page_size_kb() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map(|p| p as u64 / 1024)
        .unwrap_or(4)
}

fn clock_ticks() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map(|t| t as u64)
        .unwrap_or(100)
}
