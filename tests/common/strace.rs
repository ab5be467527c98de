//! Watching the system calls of a running process with `strace` (installed by .ci/run): what a
//! worker does for a request, seen from outside.

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::poll_until;

/// `strace -f` attached to a process, writing the calls it traces to a file.
pub struct Trace {
    child: Child,
    out: PathBuf,
}

/// Whether `strace` is installed; when it is not, says that the test is skipped (CI installs it:
/// .ci/run).
pub fn available() -> bool {
    let there = Command::new("strace").arg("-V").output().is_ok();
    if !there {
        eprintln!(
            "SKIPPED: `strace` is not installed (apt-get install strace; .ci/run installs it)"
        );
    }
    there
}

impl Trace {
    /// Attaches to every thread of `pid`, tracing the calls named in `calls` (strace's
    /// `-e trace=` list), into a file in `dir`. Returns once every thread is traced.
    pub fn attach(pid: i32, calls: &str, dir: &Path) -> Trace {
        let out = dir.join(format!("strace-{pid}.txt"));
        let mut child = Command::new("strace")
            .args(["-f", "-qq", "-e", &format!("trace={calls}")])
            .arg("-o")
            .arg(&out)
            .args(["-p", &pid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("strace starts");
        // strace says nothing once attached with -qq: each thread's status names its tracer.
        let attached = poll_until(Duration::from_secs(20), || {
            let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
            let all = tasks.flatten().all(|t| {
                std::fs::read_to_string(t.path().join("status")).is_ok_and(|s| {
                    s.lines().any(|l| {
                        l.starts_with("TracerPid:") && l.split_whitespace().nth(1) != Some("0")
                    })
                })
            });
            all.then_some(())
        });
        if attached.is_none() {
            let _ = child.kill();
            let _ = child.wait();
            let mut why = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut why);
            }
            panic!("strace did not attach to {pid}: {why}");
        }
        Trace { child, out }
    }

    /// Detaches (strace lets the process go on) and returns the traced calls, one a line.
    pub fn finish(mut self) -> Vec<String> {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = self.child.wait();
        std::io::BufReader::new(std::fs::File::open(&self.out).expect("strace's output"))
            .lines()
            .map_while(Result::ok)
            .collect()
    }
}

impl Drop for Trace {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value a traced call returned (`... = 42`), if a number.
pub fn returned(line: &str) -> Option<u64> {
    line.rsplit_once(" = ")?
        .1
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
