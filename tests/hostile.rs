//! Hostile inputs (issue 11): clients and children that try to spin a worker or fool the monitor.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

/// CPU time (user + system) `pid` has used, in clock ticks, from `/proc/PID/stat`.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/stat: {e}"));
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 of proc_pid_stat(5); utime is field 14, stime field 15.
    let field = |n: usize| -> u64 { fields[n - 3].parse().expect("a number") };
    field(14) + field(15)
}

fn clock_ticks_per_second() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .expect("CLK_TCK") as u64
}

#[test]
fn partial_http2_prefaces_do_not_spin_the_worker() {
    // HTTP/2 is on by default: every connection's first bytes are peeked at for its preface.
    let server = Launch::tine()
        .args(["--workers", "1", "--header-read-timeout", "20"])
        .start();
    let worker = server.wait_workers(1, Duration::from_secs(10))[0];
    let addr = server.addr();
    let sockets_before = socket_inodes(worker).len();

    // 200 clients that sent the first byte of the preface and then nothing.
    let clients: Vec<Stream> = (0..200)
        .map(|i| {
            let mut s = Stream::connect(&addr).unwrap_or_else(|e| panic!("connect {i}: {e}"));
            s.write_all(b"P").expect("write P");
            s
        })
        .collect();
    let accepted = poll_until(Duration::from_secs(10), || {
        (socket_inodes(worker).len() >= sockets_before + 200).then_some(())
    });
    assert!(
        accepted.is_some(),
        "the worker did not accept the 200 connections: {} sockets",
        socket_inodes(worker).len()
    );

    // Measure the worker's CPU over about two seconds while the 200 partial prefaces sit there.
    let (ticks_before, started) = (cpu_ticks(worker), Instant::now());
    std::thread::sleep(Duration::from_secs(2)); // the measurement window itself, not a wait
    let (ticks, elapsed) = (cpu_ticks(worker) - ticks_before, started.elapsed());
    let share = ticks as f64 / clock_ticks_per_second() as f64 / elapsed.as_secs_f64();
    eprintln!("worker CPU: {ticks} ticks in {elapsed:?}");
    assert!(
        share < 0.10,
        "the worker used {:.0}% of a CPU holding 200 one-byte prefaces ({ticks} ticks in {elapsed:?})",
        share * 100.0
    );

    // The clients are still held (not cut early), and others are served meanwhile.
    assert_eq!(server.get("/").status, 200);
    assert!(socket_inodes(worker).len() >= sockets_before + 200);
    drop(clients);
}

/// A process the test owns, killed when the test ends (pass or fail).
struct Planted(std::process::Child);

impl Drop for Planted {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn forged_spawn_reports_from_a_worker_are_ignored() {
    // A process of the test's own: a compromised worker names it as a worker it "spawned", hoping
    // the monitor (root in production) signals it later.
    let mut planted = Planted(
        std::process::Command::new("sleep")
            .arg("120")
            .spawn()
            .expect("spawn sleep"),
    );
    let dir = TempDir::new();
    let claim = dir.write("forge", planted.0.id().to_string());
    let mut server = Launch::tine()
        .args(["--workers", "1", "--debug-routes"])
        .env("TINE_DEBUG_FORGE_SPAWN_REPORTS", &claim)
        .start();
    let forger = server.wait_workers(1, Duration::from_secs(10))[0];
    server
        .log
        .wait_for_log("forged spawn reports sent", Duration::from_secs(10));
    // The monitor has read the forgeries once it says it ignores them (or, without the fix, once
    // it counted more failed spawns than max_consecutive_spawn_errors).
    let read = poll_until(Duration::from_secs(10), || {
        let log = server.log.text();
        (log.contains("ignoring a SpawnFailed report")
            || log.contains("max_consecutive_spawn_errors reached"))
        .then_some(())
    });
    assert!(
        read.is_some(),
        "forgeries not read; log:\n{}",
        server.log.text()
    );

    // With no worker serving, counted spawn failures would make the monitor give up.
    server.signal_process(forger, Signal::SIGKILL);
    let replaced = poll_until(Duration::from_secs(15), || {
        assert!(
            !server.has_exited(),
            "the monitor gave up after forged reports; log:\n{}",
            server.log.text()
        );
        // Asked directly: a monitor that gave up must fail the assertion above, not a helper.
        let status = server.ctl(&["status", "--json"]).ok()?;
        let status: serde_json::Value = serde_json::from_str(&status).ok()?;
        status["processes"]
            .as_array()?
            .iter()
            .any(|p| p["role"] == "worker" && p["pid"] != forger && p["state"] == "ready")
            .then_some(())
    });
    assert!(
        replaced.is_some(),
        "no new worker after the forger was killed; log:\n{}",
        server.log.text()
    );
    assert_eq!(server.get("/").status, 200, "the tree keeps serving");
    let log = server.log.text();
    assert_eq!(
        log.matches("ignoring a").count(),
        1,
        "stray reports are logged once per child; log:\n{log}"
    );
    assert!(
        !log.contains("mold could not fork a worker"),
        "a forged failure was counted; log:\n{log}"
    );

    // A graceful stop signals every worker the monitor knows of: never the planted pid.
    server.signal(Signal::SIGTERM);
    assert_eq!(server.exit_code_within(Duration::from_secs(20)), 0);
    assert!(
        planted.0.try_wait().expect("try_wait").is_none(),
        "the planted process was signalled by the monitor"
    );
}
