//! The process tree of `tine serve`: start and stop, titles, load spread over workers, deaths and
//! replacements, scaling, and the signals that stop the tree.

mod common;

use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

/// Starts `tine serve --workers N --debug-headers --debug-routes` on a free port.
fn start(workers: usize) -> Server {
    Launch::tine()
        .args([
            "--workers",
            &workers.to_string(),
            "--debug-headers",
            "--debug-routes",
        ])
        .start()
}

/// One worker with debug routes and a long graceful_timeout (a drain is never cut short).
fn start_one_draining_worker() -> Server {
    Launch::tine()
        .args([
            "--workers",
            "1",
            "--debug-routes",
            "--graceful-timeout",
            "20",
        ])
        .start()
}

/// Asserts that every pid is gone within `within`.
fn assert_all_gone(pids: &[i32], within: Duration, log: &Log) {
    let left = poll_until(within, || {
        let alive: Vec<i32> = pids.iter().copied().filter(|p| !gone(*p)).collect();
        alive.is_empty().then_some(())
    });
    if left.is_none() {
        let alive: Vec<(i32, String)> = pids
            .iter()
            .filter(|p| !gone(**p))
            .map(|p| (*p, title(*p).unwrap_or_default()))
            .collect();
        panic!(
            "still alive after {within:?}: {alive:?}; log:\n{}",
            log.text()
        );
    }
}

#[test]
fn starts_serves_and_stops_gracefully() {
    let mut server = start(2);
    let r = server.get("/");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "hello\n");
    assert!(server.control_socket.exists(), "control socket is created");
    common::spares::wait_spares(&server, 1, READY_TIMEOUT);
    let pids = server.all_pids();
    assert_eq!(
        pids.len(),
        5,
        "monitor, mold, 2 workers and the hot spare: {:?}",
        server.tree()
    );
    server.signal(Signal::SIGTERM);
    assert_eq!(
        server.exit_code_within(Duration::from_secs(10)),
        0,
        "graceful stop exits 0"
    );
    assert_all_gone(&pids, Duration::from_secs(2), &server.log);
    assert!(
        server.log.wait_eof(Duration::from_secs(2)),
        "no process of the tree holds its stderr"
    );
    assert!(
        !server.control_socket.exists(),
        "control socket removed on exit"
    );
    server.log.wait_for_log("stopped", Duration::from_secs(1));
}

#[test]
fn ctl_stop_stops_the_tree() {
    let mut server = start(1);
    let pids = server.all_pids();
    assert_eq!(server.ctl(&["stop"]).expect("ctl stop"), "stopping\n");
    assert_eq!(server.exit_code_within(Duration::from_secs(10)), 0);
    assert_all_gone(&pids, Duration::from_secs(2), &server.log);
}

#[test]
fn titles_in_ps_show_roles_and_generations() {
    let server = start(2);
    server.wait_workers(2, READY_TIMEOUT);
    common::spares::wait_spares(&server, 1, READY_TIMEOUT);
    // The monitor's title is updated by its loop right after the workers report ready.
    let monitor = poll_until(Duration::from_secs(5), || {
        title(server.pid).filter(|t| t == "tine monitor (gen:0 workers:2/2)")
    });
    assert!(monitor.is_some(), "monitor title: {:?}", title(server.pid));
    let tree = server.tree();
    let mut titles: Vec<&str> = tree.iter().map(|p| p.title.as_str()).collect();
    titles.sort();
    assert_eq!(
        titles,
        [
            "tine mold (gen:0)",
            "tine spare (gen:0)",
            "tine worker[0] (gen:0)",
            "tine worker[1] (gen:0)"
        ],
        "{tree:?}"
    );
    for p in &tree {
        assert_eq!(
            p.ppid, server.pid,
            "{} is a direct child of the monitor (workers are siblings of the mold)",
            p.title
        );
        assert_ne!(
            p.pgid, server.pid,
            "{} has a process group of its own",
            p.title
        );
    }
    // `ps` reads the same thing.
    let ps = std::process::Command::new("ps")
        .args(["-o", "args=", "-p", &server.pid.to_string()])
        .output();
    if let Ok(out) = ps {
        if out.status.success() {
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                "tine monitor (gen:0 workers:2/2)"
            );
        }
    }
}

#[test]
fn concurrent_load_is_served_by_every_worker() {
    let server = start(2);
    let workers = server.wait_workers(2, READY_TIMEOUT);
    let report = load(&server.addr(), "/", 8, 40, false, Duration::from_secs(30));
    assert!(report.errors.is_empty(), "errors: {:?}", report.errors);
    assert_eq!(report.status(200), 320, "{report:?}");
    let pids: Vec<i32> = report.by_worker.keys().copied().collect();
    assert!(
        pids.len() >= 2,
        "requests served by more than one worker: {report:?}"
    );
    for pid in &pids {
        assert!(
            workers.contains(pid),
            "pid {pid} of a response is one of the workers {workers:?}"
        );
    }
}

/// The scheduling policy of a process (its main thread's): see `common::sched`.
fn policy(pid: i32) -> u32 {
    common::sched::policy_of_thread(pid, pid)
}

/// A spare stands by and is woken under `SCHED_OTHER`, and serves its first moments so (its
/// wake-ups must preempt while it takes the dead worker's queued connections); then every thread
/// of it but the death-notice thread moves to `SCHED_BATCH`, as a worker started as such runs —
/// runtime threads included (`--worker-threads 2`: they were started before activation).
#[test]
fn an_activated_spare_moves_to_sched_batch_after_its_first_moments_all_threads_but_the_sentinel() {
    use common::sched::{policy_of_thread, threads, threads_named, BATCH, OTHER};
    let settle = Duration::from_secs(20);
    let server = Launch::tine()
        .args([
            "--workers",
            "1",
            "--spare-workers",
            "1",
            "--sched-batch",
            "true",
        ])
        .args(["--worker-threads", "2"])
        .start();
    let worker = server.wait_workers(1, READY_TIMEOUT)[0];
    let spare = poll_until(settle, || {
        let rows = common::status::child_rows(&server, &server.status())?;
        rows.iter()
            .find(|r| r.role == "spare" && r.state == "standby")
            .map(|r| r.pid)
    })
    .expect("a spare standing by");
    assert_eq!(policy_of_thread(spare, spare), OTHER, "a standing-by spare");
    // Its runtime's threads too (`--worker-threads 2`: two `tine-spare-w` besides the main
    // thread), while its profiler's is SCHED_BATCH (started after the switch, as a worker's).
    // A thread runs its start hook (which gives it its policy) a moment after it is created:
    // the check waits for it.
    let mut last = Vec::new();
    poll_until(settle, || {
        last = threads_named(spare, "tine-spare-w")
            .into_iter()
            .map(|tid| (tid, policy_of_thread(spare, tid)))
            .collect();
        (!last.is_empty() && last.iter().all(|(_, p)| *p == OTHER)).then_some(())
    })
    .unwrap_or_else(|| panic!("the spare's runtime threads standing by (tid, policy): {last:?}"));
    for tid in threads_named(spare, "tine-profile") {
        assert_eq!(
            policy_of_thread(spare, tid),
            BATCH,
            "the spare's profiler thread"
        );
    }
    server.signal_process(worker, Signal::SIGKILL);
    // It becomes worker 0, then (FIRST_SERVICE, 50 ms, later) moves to SCHED_BATCH.
    server
        .wait_serving_as(0, spare, settle)
        .unwrap_or_else(|| panic!("the spare did not take over:\n{}", server.log.text()));
    poll_until(settle, || {
        (policy_of_thread(spare, spare) == BATCH).then_some(())
    })
    .expect("the activated spare's main thread moves to SCHED_BATCH");
    let sentinels = threads_named(spare, "tine-sentinel");
    assert!(!sentinels.is_empty(), "the death-notice thread");
    let threads = threads(spare);
    assert!(
        threads.len() >= 3,
        "main, the runtime's threads, the sentinel: {threads:?}"
    );
    for tid in threads {
        let expected = if sentinels.contains(&tid) {
            OTHER
        } else {
            BATCH
        };
        assert_eq!(
            policy_of_thread(spare, tid),
            expected,
            "thread {tid} of the activated spare"
        );
    }
}

#[test]
fn workers_run_under_sched_batch_and_the_monitor_does_not() {
    const OTHER: u32 = 0;
    const BATCH: u32 = 3;
    let server = start(2);
    let workers = server.wait_workers(2, READY_TIMEOUT);
    for w in &workers {
        assert_eq!(policy(*w), BATCH, "worker {w}");
    }
    assert_eq!(policy(server.pid), OTHER, "the monitor preempts as usual");
    let mold = server.with_title("tine mold");
    assert_eq!(policy(mold[0].pid), OTHER, "the mold");
    // A worker promoted to mold moves back; the workers it forks move to SCHED_BATCH themselves.
    assert_eq!(server.ctl(&["refork"]).map(|_| ()), Ok(()));
    let gen1 = poll_until(Duration::from_secs(20), || {
        // The mold by its role: a process the mold has just forked bears the mold's title for a
        // moment, under the policy it already switched to.
        let rows = common::status::child_rows(&server, &server.status())?;
        let mold = rows
            .iter()
            .find(|r| r.role == "mold" && r.generation == 1 && r.pid > 0)?
            .pid;
        let workers = server.with_title("tine worker[");
        (workers.len() == 2 && workers.iter().all(|w| w.title.ends_with("(gen:1)")))
            .then_some((mold, workers))
    });
    let (mold, workers) = gen1.expect("generation 1 rolled out");
    assert_eq!(policy(mold), OTHER, "the promoted mold");
    for w in &workers {
        assert_eq!(policy(w.pid), BATCH, "gen-1 worker {}", w.pid);
    }
    // A policy the operator chose is left alone.
    const IDLE: u32 = 5;
    let chosen = Launch::program(std::path::PathBuf::from("/usr/bin/chrt"))
        .subcommand(None)
        .args([
            "-i",
            "0",
            env!("CARGO_BIN_EXE_tine"),
            "serve",
            "--workers",
            "1",
        ])
        .args(["--listen", "127.0.0.1:0", "--control-socket", "ctl.sock"])
        .start();
    let [w] = chosen.wait_workers(1, READY_TIMEOUT)[..] else {
        unreachable!()
    };
    assert_eq!(policy(w), IDLE, "SCHED_IDLE from chrt stays");
    let other = Launch::tine()
        .args(["--workers", "1", "--sched-batch", "false"])
        .start();
    let [w] = other.wait_workers(1, READY_TIMEOUT)[..] else {
        unreachable!()
    };
    assert_eq!(policy(w), OTHER, "sched_batch = false");
}

#[test]
fn a_killed_worker_is_replaced() {
    let server = start(2);
    let before = server.wait_workers(2, READY_TIMEOUT);
    let mark = server.log.mark();
    server.signal_process(before[0], Signal::SIGKILL);
    server.log.wait_for_log_since(
        mark,
        &format!("worker died pid={}", before[0]),
        Duration::from_secs(5),
    );
    let line =
        server
            .log
            .wait_for_log_since(mark, "worker[0] (gen:0) ready", Duration::from_secs(10));
    let new_pid = pids_in(&line)
        .into_iter()
        .last()
        .expect("pid in the ready line");
    assert_ne!(new_pid, before[0]);
    let after = server.wait_workers(2, Duration::from_secs(10));
    assert_eq!(
        after,
        [new_pid, before[1]],
        "worker[0] replaced, worker[1] untouched"
    );
    assert!(gone(before[0]));
    let report = load(&server.addr(), "/", 4, 10, false, Duration::from_secs(20));
    assert_eq!(report.status(200), 40, "{report:?}");
}

/// `tine serve` with two workers, its children reaped by the monitor's own `waitpid` if
/// `monitor_reaps`, else by the kernel where it can (docs/DEPLOYMENT.md, "Who reaps the children").
fn two_workers_reaped_by(monitor_reaps: bool) -> Server {
    Launch::tine()
        .args(["--workers", "2"])
        .env("TINE_MONITOR_REAPS", monitor_reaps.to_string())
        .start()
}

/// Waits for the monitor to log worker 0 (`pid`) dead since `mark`, of `how`, and its
/// replacement ready.
fn worker_0_died_and_was_replaced(server: &Server, mark: usize, pid: i32, how: &str) {
    server.log.wait_for_log_since(
        mark,
        &format!("worker died pid={pid} nr=0 generation=0 how={how}"),
        Duration::from_secs(5),
    );
    server
        .log
        .wait_for_log_since(mark, "worker[0] (gen:0) ready", Duration::from_secs(10));
}

/// Who reaps the monitor's children: the kernel where it keeps exit statuses for pidfds (Linux
/// 6.15), the monitor's `waitpid` elsewhere or when `monitor_reaps = true` asks for it. Either
/// way the monitor learns how each child ended (a signal, an exit code), replaces it, and leaves
/// no zombie.
#[test]
fn either_reaper_tells_how_each_child_ended_and_leaves_no_zombie() {
    let kernel_can = tine::sys::pidfd::kernel_keeps_exit_status();
    for monitor_reaps in [false, true] {
        let server = two_workers_reaped_by(monitor_reaps);
        let reaper = if kernel_can && !monitor_reaps {
            "kernel"
        } else {
            "monitor"
        };
        server
            .log
            .wait_for_log_since(0, &format!("reaper={reaper}"), Duration::from_secs(5));
        let before = server.wait_workers(2, READY_TIMEOUT);
        let mark = server.log.mark();
        server.signal_process(before[0], Signal::SIGKILL);
        worker_0_died_and_was_replaced(&server, mark, before[0], "signal SIGKILL");
        let mold = server.with_title("tine mold").first().expect("a mold").pid;
        server.signal_process(mold, Signal::SIGKILL);
        server.log.wait_for_log_since(
            mark,
            &format!("mold died pid={mold} nr=0 generation=0 how=signal SIGKILL"),
            Duration::from_secs(5),
        );
        // A worker asked to go exits 0, and says so.
        let workers = server.wait_workers(2, Duration::from_secs(10));
        server.ctl(&["scale", "1"]).expect("ctl scale 1");
        server.log.wait_for_log_since(
            mark,
            &format!("worker exited pid={} nr=1", workers[1]),
            Duration::from_secs(10),
        );
        let line = server
            .log
            .lines()
            .into_iter()
            .skip(mark)
            .find(|l| l.contains(&format!("worker exited pid={}", workers[1])))
            .expect("the exit line");
        assert!(line.contains("how=exit code 0"), "{line}");
        let unknown = server.log.count("how=exit status");
        assert_eq!(unknown, 0, "{reaper} reaper: an exit without its status");
        for pid in [before[0], mold, workers[1]] {
            // Not even a zombie: released, by the kernel or by the monitor's `waitpid`.
            let released = poll_until(Duration::from_secs(5), || {
                proc_info(pid).is_none().then_some(())
            });
            assert!(
                released.is_some(),
                "{reaper} reaper: pid {pid} left behind: {:?}",
                proc_info(pid)
            );
        }
    }
}

/// A worker ended by a real-time signal (one nix's `WaitStatus` cannot name) is explained and
/// replaced like any other death, with either reaper: the monitor's `waitpid` once reaped such a
/// child and dropped it unhandled.
#[test]
fn a_worker_killed_by_a_real_time_signal_is_explained_and_replaced() {
    let number = libc::SIGRTMIN() + 10;
    for monitor_reaps in [false, true] {
        let server = two_workers_reaped_by(monitor_reaps);
        let before = server.wait_workers(2, READY_TIMEOUT);
        let mark = server.log.mark();
        // util-linux kill(1) names it; the pid is our tree's live worker.
        let status = std::process::Command::new("kill")
            .args([&format!("-{number}"), &before[0].to_string()])
            .status()
            .expect("kill(1)");
        assert!(status.success(), "kill -{number}");
        worker_0_died_and_was_replaced(&server, mark, before[0], &format!("signal {number}"));
        let after = server.wait_workers(2, Duration::from_secs(10));
        assert_ne!(
            after[0], before[0],
            "monitor_reaps={monitor_reaps}: replaced"
        );
    }
}

#[test]
fn a_killed_mold_is_replaced_and_workers_keep_serving() {
    let server = start(2);
    let workers = server.wait_workers(2, READY_TIMEOUT);
    let mold = server.with_title("tine mold").first().expect("a mold").pid;
    let mark = server.log.mark();
    server.signal_process(mold, Signal::SIGKILL);
    server.log.wait_for_log_since(
        mark,
        &format!("mold died pid={mold}"),
        Duration::from_secs(5),
    );
    // The workers keep serving while (and after) the mold is replaced.
    let report = load(&server.addr(), "/", 4, 10, false, Duration::from_secs(20));
    assert_eq!(report.status(200), 40, "{report:?}");
    let line = server
        .log
        .wait_for_log_since(mark, "mold (gen:0) ready", Duration::from_secs(10));
    let new_mold = pids_in(&line).into_iter().last().expect("pid");
    assert_ne!(new_mold, mold);
    assert_eq!(
        server.wait_workers(2, Duration::from_secs(5)),
        workers,
        "the workers were not restarted"
    );
    // The new mold works: a worker killed now is forked from it.
    let mark = server.log.mark();
    server.signal_process(workers[1], Signal::SIGKILL);
    server
        .log
        .wait_for_log_since(mark, "worker[1] (gen:0) ready", Duration::from_secs(10));
    let after = server.wait_workers(2, Duration::from_secs(5));
    assert_ne!(after[1], workers[1]);
    let molds = server.with_title("tine mold");
    assert_eq!(molds.len(), 1, "one mold: {molds:?}");
    assert_eq!(molds[0].pid, new_mold);
}

#[test]
fn monitor_sigkill_takes_the_whole_tree_down_within_a_second() {
    let mut server = start(2);
    server.wait_workers(2, READY_TIMEOUT);
    common::spares::wait_spares(&server, 1, READY_TIMEOUT);
    let children: Vec<i32> = server.tree().iter().map(|p| p.pid).collect();
    assert_eq!(children.len(), 4, "the mold, 2 workers and the spare");
    server.signal(Signal::SIGKILL);
    let killed = Instant::now();
    server
        .wait_exit(Duration::from_secs(2))
        .expect("monitor dies");
    assert_all_gone(
        &children,
        Duration::from_secs(1).saturating_sub(killed.elapsed()),
        &server.log,
    );
}

#[test]
fn ttin_and_ttou_scale_the_workers() {
    let server = start(2);
    server.wait_workers(2, READY_TIMEOUT);
    server.signal(Signal::SIGTTIN);
    let three = server.wait_workers(3, Duration::from_secs(10));
    assert_eq!(server.status()["target"], 3);
    assert!(poll_until(Duration::from_secs(5), || title(server.pid)
        .filter(|t| t.ends_with("workers:3/3)")))
    .is_some());
    server.signal(Signal::SIGTTOU);
    server.wait_workers(2, Duration::from_secs(10));
    server.signal(Signal::SIGTTOU);
    let one = server.wait_workers(1, Duration::from_secs(10));
    assert_eq!(one[0], three[0], "the highest numbers are retired first");
    // Never below one worker. A `ctl` call after the signal is a barrier: the signal is pending
    // once kill() returns, and the monitor reads its signals before it reads a control command.
    server.signal(Signal::SIGTTOU);
    assert_eq!(server.status()["target"], 1);
    assert_eq!(server.wait_workers(1, Duration::from_secs(5)), [three[0]]);
    assert!(gone(three[2]) && gone(three[1]), "retired workers exited");
    assert_eq!(server.get("/").status, 200);
}

#[test]
fn ctl_scale_and_kill_worker() {
    let server = start(1);
    let before = server.wait_workers(1, READY_TIMEOUT);
    assert_eq!(
        server.ctl(&["scale", "3"]).expect("scale 3"),
        "workers: 3\n"
    );
    let three = server.wait_workers(3, Duration::from_secs(10));
    assert_eq!(three[0], before[0]);
    let err = server.ctl(&["scale", "0"]).expect_err("scale 0 is refused");
    assert!(err.contains("out of range"), "{err}");
    let err = server
        .ctl(&["scale", "65"])
        .expect_err("scale above max_workers is refused");
    assert!(err.contains("out of range"), "{err}");
    let err = server.ctl(&["frobnicate"]).expect_err("unknown command");
    assert!(err.contains("unknown command"), "{err}");
    let mark = server.log.mark();
    assert_eq!(
        server.ctl(&["kill-worker", "1"]).expect("kill-worker 1"),
        "killed worker 1\n"
    );
    server
        .log
        .wait_for_log_since(mark, "worker[1] (gen:0) ready", Duration::from_secs(10));
    let after = server.wait_workers(3, Duration::from_secs(10));
    assert_ne!(after[1], three[1]);
    assert_eq!((after[0], after[2]), (three[0], three[2]));
    let text = server.ctl(&["status"]).expect("status");
    assert!(
        text.contains("monitor") && text.contains("mold") && text.contains("worker"),
        "{text}"
    );
}

#[test]
fn term_lets_a_slow_request_finish_then_exits_zero() {
    let mut server = start_one_draining_worker();
    let addr = server.addr();
    let pids = server.all_pids();
    let slow = std::thread::spawn(move || {
        let started = Instant::now();
        (get(&addr, "/sleep/1500"), started.elapsed())
    });
    // The request is in flight once the worker's scoreboard slot says busy.
    server.wait_busy(Duration::from_secs(10));
    server.signal(Signal::SIGTERM);
    let (response, took) = slow.join().expect("client thread");
    let response = response.expect("the in-flight request gets its response");
    assert_eq!(response.status, 200);
    assert_eq!(response.text(), "slept\n");
    assert!(took >= Duration::from_millis(1500), "{took:?}");
    assert_eq!(server.exit_code_within(Duration::from_secs(10)), 0);
    assert_all_gone(&pids, Duration::from_secs(2), &server.log);
}

#[test]
fn term_stops_accepting_new_connections() {
    let mut server = start_one_draining_worker();
    let addr = server.addr();
    let slow = std::thread::spawn({
        let addr = addr.clone();
        move || get(&addr, "/sleep/2000")
    });
    server.wait_busy(Duration::from_secs(10));
    let mark = server.log.mark();
    server.signal(Signal::SIGTERM);
    server
        .log
        .wait_for_log_since(mark, "retiring worker", Duration::from_secs(5));
    // While the slow request drains, a new connection is refused or never answered: the workers
    // closed their listening descriptors and so will the monitor on exit.
    let late = poll_until(Duration::from_secs(5), || match get(&addr, "/") {
        Err(e) => Some(e.to_string()),
        Ok(_) => None, // raced the TERM: try again
    });
    assert!(
        late.is_some(),
        "a new request after TERM is not served by a draining worker"
    );
    assert_eq!(slow.join().unwrap().expect("slow request").status, 200);
    assert_eq!(server.exit_code_within(Duration::from_secs(10)), 0);
}

#[test]
fn int_stops_quickly_without_waiting_for_requests() {
    let mut server = Launch::tine()
        .args([
            "--workers",
            "2",
            "--debug-routes",
            "--graceful-timeout",
            "30",
        ])
        .start();
    let addr = server.addr();
    let pids = server.all_pids();
    let slow = std::thread::spawn(move || get(&addr, "/sleep/8000"));
    server.wait_busy(Duration::from_secs(10));
    let sent = Instant::now();
    server.signal(Signal::SIGINT);
    let status = server
        .wait_exit(Duration::from_secs(4))
        .expect("INT stops within a few seconds, not after the slow request");
    assert!(
        sent.elapsed() < Duration::from_secs(3),
        "quick stop took {:?}",
        sent.elapsed()
    );
    assert_eq!(status.code(), Some(0));
    assert_all_gone(&pids, Duration::from_secs(1), &server.log);
    let r = slow.join().unwrap();
    assert!(
        r.is_err(),
        "the slow request was cut short, not answered: {r:?}"
    );
}

#[test]
fn ctrl_c_to_the_foreground_group_reaches_only_the_monitor_and_stops_the_tree() {
    // A terminal sends SIGINT to its foreground process group: the monitor's (the harness starts
    // it as a group leader). The children are in groups of their own and are stopped by the
    // monitor, not by the terminal.
    let mut server = start(2);
    server.wait_workers(2, READY_TIMEOUT);
    let pids = server.all_pids();
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(server.pid), Signal::SIGINT)
        .expect("killpg");
    assert_eq!(server.exit_code_within(Duration::from_secs(5)), 0);
    assert_all_gone(&pids, Duration::from_secs(1), &server.log);
    server
        .log
        .wait_for_log("SIGINT: stopping", Duration::from_secs(1));
    assert_eq!(
        server.log.count(" died "),
        0,
        "no child died of the SIGINT itself:\n{}",
        server.log.text()
    );
}

#[test]
fn pid_file_is_written_and_removed() {
    let dir = TempDir::new();
    let pid_file = dir.join("tine.pid");
    let mut server = Launch::tine()
        .args(["--workers", "1"])
        .arg("--pid-file")
        .arg(&pid_file)
        .start();
    let text = std::fs::read_to_string(&pid_file).expect("pid file");
    assert_eq!(text.trim(), server.pid.to_string());
    server.signal(Signal::SIGTERM);
    assert_eq!(server.exit_code_within(Duration::from_secs(10)), 0);
    assert!(!pid_file.exists(), "pid file removed on exit");
}

/// The holders of workers' memory (`teardown_holder`, on by default): each worker (and spare)
/// has one, its child, sharing its memory and holding only a pidfd; a worker's death leaves the
/// holder to go a moment later on its own, reaped by either reaper without an orphan's log line;
/// with `teardown_holder = false` there is none.
#[test]
fn each_worker_has_a_holder_of_its_memory_that_goes_after_it() {
    let holders_of =
        |pid: i32| -> Vec<Proc> { descendants(pid).into_iter().filter(is_holder).collect() };
    for monitor_reaps in [false, true] {
        let server = Launch::tine()
            .args([
                "--workers",
                "1",
                "--log-level",
                "debug",
                "--teardown-holder",
                "true",
            ])
            .env("TINE_MONITOR_REAPS", monitor_reaps.to_string())
            .start();
        let worker = server.wait_workers(1, READY_TIMEOUT)[0];
        let holders = holders_of(worker);
        assert_eq!(holders.len(), 1, "one holder per worker: {holders:?}");
        let holder = holders[0].pid;
        server.remember(holder);
        assert_eq!(holders[0].ppid, worker, "the worker's own child");
        // The same memory: its size is the worker's (read twice, so asked again until two reads
        // agree), its resident set far beyond its own 16 KiB stack.
        let size = |pid: i32| status_number(pid, "VmSize");
        let same = poll_until(Duration::from_secs(5), || {
            (size(holder) == size(worker)).then_some(())
        });
        assert!(
            same.is_some(),
            "one address space: {} vs {} kB",
            size(holder),
            size(worker)
        );
        assert!(status_number(holder, "VmRSS") > 1024);
        // Confined: it may only wait, sleep and exit.
        assert_eq!(status_field(holder, "NoNewPrivs").as_deref(), Some("1"));
        assert_eq!(
            status_field(holder, "Seccomp").as_deref(),
            Some("2"),
            "a seccomp filter"
        );
        // Every signal blocked (the kernel keeps SIGKILL and SIGSTOP deliverable).
        let blocked = u64::from_str_radix(&status_field(holder, "SigBlk").expect("SigBlk"), 16)
            .expect("a hex mask");
        assert_eq!(
            blocked | (1 << 8) | (1 << 18),
            u64::MAX,
            "SigBlk {blocked:x}"
        );
        // Only its pidfd: none of the worker's sockets, so it keeps no connection open.
        let fds: Vec<String> = std::fs::read_dir(format!("/proc/{holder}/fd"))
            .expect("the holder's descriptors")
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .map(|l| l.display().to_string())
            .collect();
        assert_eq!(fds, ["anon_inode:[pidfd]"], "monitor_reaps={monitor_reaps}");
        let mark = server.log.mark();
        server.signal_process(worker, Signal::SIGKILL);
        worker_0_died_and_was_replaced(&server, mark, worker, "signal SIGKILL");
        // It goes by itself once the worker's threads are gone, and is released by whichever
        // reaper the tree has: not even a zombie stays.
        let released = poll_until(Duration::from_secs(5), || {
            proc_info(holder).is_none().then_some(())
        });
        assert!(
            released.is_some(),
            "monitor_reaps={monitor_reaps}: the dead worker's holder is still there: {:?}",
            proc_info(holder)
        );
        // It exited of itself (code 0), not killed by its own seccomp filter: what the
        // monitor's `waitpid` saw.
        if monitor_reaps {
            server.log.wait_for_log_since(
                mark,
                &format!(
                    "reaped the holder of a dead worker's memory pid={holder} how=exit code 0"
                ),
                Duration::from_secs(5),
            );
        }
        // The replacement has its own.
        let replacement = server.wait_workers(1, Duration::from_secs(10))[0];
        assert_eq!(holders_of(replacement).len(), 1);
        assert_eq!(
            server.log.count("reaped an orphan"),
            0,
            "an expected holder is not an orphan to report:\n{}",
            server.log.text()
        );
    }
    // On by default; `--teardown-holder false` starts none.
    let server = Launch::tine().args(["--workers", "1"]).start();
    let worker = server.wait_workers(1, READY_TIMEOUT)[0];
    assert_eq!(holders_of(worker).len(), 1, "teardown_holder's default");
    drop(server);
    let server = Launch::tine()
        .args(["--workers", "1", "--teardown-holder", "false"])
        .start();
    let worker = server.wait_workers(1, READY_TIMEOUT)[0];
    assert!(holders_of(worker).is_empty(), "teardown_holder = false");
}
