//! Scheduling policies of processes and threads, as `/proc` shows them.

/// SCHED_OTHER, the kernel's default policy.
pub const OTHER: u32 = 0;
/// SCHED_BATCH (tine's workers by default, `sched_batch`).
pub const BATCH: u32 = 3;
/// SCHED_IDLE.
pub const IDLE: u32 = 5;

/// Field `n` (numbered from 1, as proc(5) does) of thread `tid`'s stat in process `pid`.
fn stat_field<T: std::str::FromStr>(pid: i32, tid: i32, n: usize) -> T {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).expect("a thread's stat");
    // Fields after the command (which may hold spaces) start at field 3.
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    let field = after.split(' ').nth(n - 3).expect("the field");
    field
        .parse()
        .unwrap_or_else(|_| panic!("field {n} of a stat is a number: {field}"))
}

/// The scheduling policy of thread `tid` of process `pid` (field 41 of its stat; `tid == pid`
/// is the main thread, whose policy `/proc/PID/stat` shows too).
pub fn policy_of_thread(pid: i32, tid: i32) -> u32 {
    stat_field(pid, tid, 41)
}

/// The nice value of thread `tid` of process `pid` (field 19 of its stat).
pub fn nice_of_thread(pid: i32, tid: i32) -> i32 {
    stat_field(pid, tid, 19)
}

/// The ids of `pid`'s threads.
pub fn threads(pid: i32) -> Vec<i32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("a process's threads")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .collect()
}

/// The ids of `pid`'s threads whose name (`comm`) is `name`.
pub fn threads_named(pid: i32, name: &str) -> Vec<i32> {
    threads(pid)
        .into_iter()
        .filter(|tid| {
            std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
                .is_ok_and(|comm| comm.trim_end() == name)
        })
        .collect()
}
