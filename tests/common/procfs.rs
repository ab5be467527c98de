//! The process table, from `/proc`: processes, their titles, descendants, sockets; signals.

use super::*;

/// One process, from `/proc/PID/stat` and `/proc/PID/cmdline`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proc {
    /// Process id.
    pub pid: i32,
    /// Parent process id.
    pub ppid: i32,
    /// Process group id.
    pub pgid: i32,
    /// State letter (`R`, `S`, `Z`, …).
    pub state: char,
    /// Start time in clock ticks since boot (tells a reused pid apart).
    pub start_time: u64,
    /// The title `ps` shows (cmdline, NULs as spaces, trimmed).
    pub title: String,
    /// The command name (`comm`, from the same read of `/proc/PID/stat` as the state).
    pub comm: String,
}

/// Reads one process; `None` if it does not exist (any more).
pub fn proc_info(pid: i32) -> Option<Proc> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces and parentheses.
    let comm = stat.get(stat.find('(')? + 1..stat.rfind(')')?)?.to_string();
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state) of proc_pid_stat(5).
    let field = |n: usize| fields.get(n - 3).copied();
    Some(Proc {
        pid,
        state: field(3)?.chars().next()?,
        ppid: field(4)?.parse().ok()?,
        pgid: field(5)?.parse().ok()?,
        start_time: field(22)?.parse().ok()?,
        title: title(pid).unwrap_or_default(),
        comm,
    })
}

/// The value of `key` in `/proc/PID/status` (the text after `key:`, trimmed), if the process
/// and the line exist.
pub fn status_field(pid: i32, key: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        let value = l.strip_prefix(key)?.strip_prefix(':')?;
        Some(value.trim().to_string())
    })
}

/// The first number of `key` in `/proc/PID/status` (`VmRSS` in kB, `voluntary_ctxt_switches`).
///
/// # Panics
/// If the process or the line is gone: the caller asked about a process it knows is alive.
pub fn status_number(pid: i32, key: &str) -> u64 {
    status_field(pid, key)
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

/// Whether `p` is the holder of a worker's memory (`teardown_holder`): a child of the worker
/// that shares its address space, so its title and memory figures are the worker's (or empty,
/// while it exits); only its command name tells it apart.
pub fn is_holder(p: &Proc) -> bool {
    p.comm == "tine-holder"
}

/// The title `ps` shows for `pid`: `/proc/PID/cmdline` with NULs as spaces, trimmed.
pub fn title(pid: i32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let text: String = String::from_utf8_lossy(&raw)
        .chars()
        .map(|c| if c == '\0' { ' ' } else { c })
        .collect();
    Some(text.trim().to_string())
}

/// Every process on the machine.
pub fn all_procs() -> Vec<Proc> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(proc_info)
        .collect()
}

/// Every descendant of `root` (children, grandchildren…), found through the parent pids.
pub fn descendants(root: i32) -> Vec<Proc> {
    let procs = all_procs();
    let mut by_parent: HashMap<i32, Vec<&Proc>> = HashMap::new();
    for p in &procs {
        by_parent.entry(p.ppid).or_default().push(p);
    }
    let mut out = Vec::new();
    let mut queue = vec![root];
    while let Some(pid) = queue.pop() {
        for child in by_parent.get(&pid).into_iter().flatten() {
            queue.push(child.pid);
            out.push((*child).clone());
        }
    }
    out.sort_by_key(|p| p.pid);
    out
}

/// Whether `pid` is gone: no such process, or a zombie.
pub fn gone(pid: i32) -> bool {
    match proc_info(pid) {
        Some(p) => p.state == 'Z',
        None => true,
    }
}

/// Sends `sig` to `pid` by number, ignoring a process that is already gone. Only for the test's
/// own child not reaped yet (a monitor), whose number cannot name another process; any other
/// process of a tree is signalled through a pidfd ([`Server::signal_process`]).
pub fn signal(pid: i32, sig: Signal) {
    let _ = kill(Pid::from_raw(pid), sig);
}

/// The inodes of the sockets open in `pid` (`/proc/PID/fd/* -> socket:[INODE]`), one entry per
/// descriptor (a duplicated socket appears twice).
pub fn socket_inodes(pid: i32) -> Vec<u64> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|target| {
            let t = target
                .to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?;
            t.parse().ok()
        })
        .collect()
}

/// The inode of the IPv4 TCP socket bound to `local` and connected to `remote` (for a listening
/// socket, pass `0.0.0.0:0` as `remote`), from `/proc/net/tcp`.
pub fn tcp_socket_inode(local: SocketAddr, remote: SocketAddr) -> Option<u64> {
    fn hex(addr: SocketAddr) -> Option<String> {
        let SocketAddr::V4(a) = addr else { return None };
        // The kernel prints the address as a native-endian u32 (little-endian here), the port
        // big-endian.
        Some(format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(a.ip().octets()),
            a.port()
        ))
    }
    let (local, remote) = (hex(local)?, hex(remote)?);
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.get(1) == Some(&local.as_str()) && f.get(2) == Some(&remote.as_str()))
            .then(|| f.get(9)?.parse().ok())
            .flatten()
    })
}
