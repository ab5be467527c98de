//! Hot spares (`spare_workers`): a worker booted ahead of need that accepts nothing until the
//! monitor activates it, then takes over at once from a worker that died, was recycled or was
//! added; a new spare is made in the background; reforks and reloads refresh it.
//!
//! Everything runs the real `tine` binary (reference `hello` app, `--debug-headers`: every
//! response names the pid that served it) and reads the tree through `ctl status --json`.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::status::{child_rows, Row};
use common::*;
use nix::sys::signal::Signal;

/// How long the tree may take to settle after a change (a debug build on a busy machine).
const SETTLE: Duration = Duration::from_secs(20);

fn launch(workers: usize, extra: &[&str]) -> Server {
    let workers = workers.to_string();
    Launch::tine()
        .args(["--workers", workers.as_str(), "--debug-headers"])
        .args(extra)
        .start()
}

fn rows(server: &Server) -> Vec<Row> {
    child_rows(server, &server.status()).expect("a process list")
}

/// Waits until the tree shows exactly one spare, standing by, for which `fits` holds; returns it.
fn wait_spare(server: &Server, what: &str, fits: impl Fn(&Row) -> bool) -> Row {
    let mut last = Vec::new();
    poll_until(SETTLE, || {
        last = rows(server);
        let spares: Vec<&Row> = last.iter().filter(|r| r.role == "spare").collect();
        match spares.as_slice() {
            [one] if one.state == "standby" && fits(one) => Some((*one).clone()),
            _ => None,
        }
    })
    .unwrap_or_else(|| panic!("no spare {what}: {last:#?}\nlog:\n{}", server.log.text()))
}

/// Waits until worker `nr` is `pid`, serving.
fn wait_worker_is(server: &Server, nr: u64, pid: i32) {
    let mut last = Vec::new();
    poll_until(SETTLE, || {
        last = server.workers();
        last.iter()
            .any(|(n, p, state)| *n == nr && *p == pid && (state == "ready" || state == "busy"))
            .then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "worker {nr} is not {pid}: {last:?}\nlog:\n{}",
            server.log.text()
        )
    });
}

/// `GET /` answered by: the pid in `x-tine-worker`.
fn served_by(server: &Server) -> i32 {
    let response = server.get("/");
    assert_eq!(response.status, 200);
    response
        .header("x-tine-worker")
        .and_then(|p| p.parse().ok())
        .expect("an x-tine-worker header")
}

/// SIGKILLs `worker` (worker 0) and waits until `spare` is worker 0 in its place, activated as a
/// hot spare (the log says so), and answers.
fn kill_worker_0_and_see_the_spare_take_over(server: &Server, worker: i32, spare: i32) {
    let mark = server.log.mark();
    server.signal_process(worker, Signal::SIGKILL);
    wait_worker_is(server, 0, spare);
    server
        .log
        .wait_for_log_since(mark, "hot_spare=true", SETTLE);
    assert_eq!(served_by(server), spare);
}

/// A graceful recycle, a drain, a refork or a reload is the monitor's to replace: no spare took
/// a place on its own (neither the spare's nor the monitor's log says so).
fn assert_no_takeover_of_its_own(server: &Server) {
    let log = server.log.text();
    for said in ["took_over=true", "without waiting for the monitor"] {
        assert!(
            !log.contains(said),
            "a spare took a place on its own ({said}):\n{log}"
        );
    }
}

/// Holds the monitor stopped (SIGSTOP; it is this test's child); SIGCONT when dropped, pass or
/// fail, so that the tree can be stopped.
struct MonitorStopped(nix::unistd::Pid);

impl MonitorStopped {
    fn new(server: &Server) -> MonitorStopped {
        let pid = nix::unistd::Pid::from_raw(server.pid);
        nix::sys::signal::kill(pid, Signal::SIGSTOP).expect("SIGSTOP to the monitor");
        wait_stopped(server.pid, "the monitor");
        MonitorStopped(pid)
    }
}

/// Waits until `/proc` shows `pid` stopped: a `SIGSTOP` takes effect asynchronously.
fn wait_stopped(pid: i32, what: &str) {
    poll_until(SETTLE, || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit(')')
            .next()?
            .trim_start()
            .starts_with('T')
            .then_some(())
    })
    .unwrap_or_else(|| panic!("{what} ({pid}) did not stop"));
}

impl Drop for MonitorStopped {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.0, Signal::SIGCONT);
    }
}

/// Logs the monitor's arming and disarming of spares (`wait_armed`).
const ARMING_LOGGED: [&str; 2] = ["--log-level", "info,tine::monitor::spares=debug"];

/// Waits until the monitor says it armed the spare `pid` (launched with [`ARMING_LOGGED`]): from
/// then on it may take a dead worker's place on its own. Standing by in `ctl status` is not
/// enough: the monitor arms a spare at the end of the turn in which it saw it ready, and a status
/// reply of that turn may come first (a monitor stopped in between never arms it).
fn wait_armed(server: &Server, pid: i32) {
    let named = format!(" pid={pid} ");
    server
        .log
        .wait_for_line_since(0, SETTLE, |l| {
            l.contains("spare armed") && l.contains(&named)
        })
        .unwrap_or_else(|| panic!("the spare {pid} was not armed; log:\n{}", server.log.text()));
}

/// `GET /` on a new connection, answered within `within` (the monitor may be stopped: nothing
/// here asks it anything): the pid in `x-tine-worker`, or `None` if no answer came.
fn served_by_within(server: &Server, within: Duration) -> Option<i32> {
    let mut s = TcpStream::connect(server.tcp_addr()).ok()?;
    s.set_read_timeout(Some(within)).ok()?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let lower = text.to_ascii_lowercase();
    let at = lower.find("x-tine-worker: ")? + "x-tine-worker: ".len();
    lower[at..].split("\r\n").next()?.trim().parse().ok()
}

/// The inodes of the listening sockets, as `worker` holds them: the sockets the monitor and a
/// worker share (their channel's two ends are two sockets). At least one.
fn listening_sockets(server: &Server, worker: i32) -> Vec<u64> {
    let monitor = socket_inodes(server.pid);
    let listening: Vec<u64> = socket_inodes(worker)
        .into_iter()
        .filter(|i| monitor.contains(i))
        .collect();
    assert!(
        !listening.is_empty(),
        "the worker holds the listening socket"
    );
    listening
}

#[test]
fn a_spare_never_accepts_before_it_is_activated() {
    let server = launch(1, &["--spare-workers", "1"]);
    let worker = server.wait_workers(1, READY_TIMEOUT)[0];
    let spare = wait_spare(&server, "at start", |_| true);
    assert_ne!(spare.pid, worker);
    // The spare keeps a copy of the listening socket aside (to take a dead worker's place on its
    // own), but its reactor waits on none: nothing of it can accept.
    let listening = listening_sockets(&server, worker);
    let registered: Vec<EpollEntry> = epoll_registrations(spare.pid)
        .into_iter()
        .filter(|r| listening.contains(&r.ino))
        .collect();
    assert!(
        registered.is_empty(),
        "the standing-by spare's reactor waits on the listening socket: {registered:?}"
    );

    // The only worker stops: connections queue, and a spare that accepted would answer them.
    let stopped = server.process(worker);
    assert!(stopped.signal(Signal::SIGSTOP), "SIGSTOP to the worker");
    let addr = server.tcp_addr();
    let mut clients: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut s = TcpStream::connect(addr).expect("connect");
            s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                .expect("write");
            s.set_read_timeout(Some(Duration::from_millis(1500)))
                .expect("timeout");
            s
        })
        .collect();
    for c in &mut clients {
        let mut byte = [0u8; 1];
        match c.read(&mut byte) {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            other => {
                stopped.signal(Signal::SIGCONT);
                panic!("a connection was answered while the only worker was stopped: {other:?}");
            }
        }
    }
    let standing = rows(&server);
    assert!(
        standing
            .iter()
            .any(|r| r.pid == spare.pid && r.role == "spare" && r.state == "standby"),
        "the spare still stands by: {standing:#?}"
    );

    // The worker resumes and answers every queued connection itself.
    assert!(stopped.signal(Signal::SIGCONT), "SIGCONT to the worker");
    for mut c in clients {
        c.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        let mut text = String::new();
        c.read_to_string(&mut text).expect("the response");
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(
            text.to_ascii_lowercase()
                .contains(&format!("x-tine-worker: {worker}\r\n")),
            "answered by the worker {worker}, not the spare {}: {text}",
            spare.pid
        );
    }
}

#[test]
fn a_spare_takes_over_when_a_worker_dies_and_a_new_spare_is_made() {
    let server = launch(1, &["--spare-workers", "1"]);
    let worker = server.wait_workers(1, READY_TIMEOUT)[0];
    let spare = wait_spare(&server, "at start", |_| true);
    kill_worker_0_and_see_the_spare_take_over(&server, worker, spare.pid);
    // It was handed the listening socket when activated.
    let monitor = socket_inodes(server.pid);
    assert!(
        socket_inodes(spare.pid).iter().any(|i| monitor.contains(i)),
        "the activated spare holds the listening socket"
    );
    let next = wait_spare(&server, "made after the takeover", |r| {
        r.pid != spare.pid && r.pid != worker
    });
    assert_eq!(next.generation, 0);
    let status = server.status();
    assert_eq!(status["spare_activations"], 1, "{status}");
}

#[test]
fn a_spare_takes_over_from_a_worker_recycled_at_max_requests() {
    let server = launch(
        1,
        &[
            "--spare-workers",
            "1",
            "--max-requests",
            "10",
            "--max-requests-jitter",
            "0",
        ],
    );
    let worker = server.wait_workers(1, READY_TIMEOUT)[0];
    let spare = wait_spare(&server, "at start", |_| true);
    let mark = server.log.mark();
    for _ in 0..10 {
        assert_eq!(served_by(&server), worker);
    }
    wait_worker_is(&server, 0, spare.pid);
    let line = server
        .log
        .wait_for_log_since(mark, "hot_spare=true", SETTLE);
    assert!(line.contains(&format!("pid={}", spare.pid)), "{line}");
    server
        .log
        .wait_for_log_since(mark, "reason=max_requests", SETTLE);
    assert_eq!(served_by(&server), spare.pid);
    wait_spare(&server, "made after the recycle", |r| r.pid != spare.pid);
    assert_no_takeover_of_its_own(&server);
}

#[test]
fn a_spare_is_the_worker_a_scale_up_adds() {
    let server = launch(1, &["--spare-workers", "1"]);
    let worker = server.wait_workers(1, READY_TIMEOUT)[0];
    let spare = wait_spare(&server, "at start", |_| true);
    assert_eq!(server.ctl(&["scale", "2"]).unwrap().trim(), "workers: 2");
    wait_worker_is(&server, 1, spare.pid);
    wait_worker_is(&server, 0, worker);
    wait_spare(&server, "made after the scale-up", |r| r.pid != spare.pid);
}

/// How many of `pid`'s descriptors are each of the listening sockets `listening`.
fn descriptors_per_listener(pid: i32, listening: &[u64]) -> Vec<usize> {
    let held = socket_inodes(pid);
    listening
        .iter()
        .map(|l| held.iter().filter(|i| *i == l).count())
        .collect()
}

/// A spare the monitor activates holds each listening socket as often as a worker booted as
/// such does (its descriptor and its accept loop's copy): the copy it kept aside for a takeover
/// of its own goes when the monitor's `Activate` comes. (Before, it kept them for its whole life: past its own close of the listener at a
/// graceful stop, the socket stayed open, with its SYNs dropped, until the drain ended.)
#[test]
fn a_spare_the_monitor_activates_holds_each_listening_socket_once() {
    let server = launch(1, &["--spare-workers", "1"]);
    let worker = server.wait_workers(1, READY_TIMEOUT)[0];
    let spare = wait_spare(&server, "at start", |_| true);
    let mut listening = listening_sockets(&server, worker);
    listening.sort_unstable();
    listening.dedup();
    assert_eq!(server.ctl(&["scale", "2"]).unwrap().trim(), "workers: 2");
    wait_worker_is(&server, 1, spare.pid);
    // A worker holds each listener twice: its own descriptor and its accept loop's copy.
    let booted = descriptors_per_listener(worker, &listening);
    // Its slot says `ready` (what `wait_worker_is` waited for) only after its gates opened,
    // which is after the standby ended.
    assert_eq!(
        descriptors_per_listener(spare.pid, &listening),
        booted,
        "the activated spare {} holds each listening socket {listening:?} as often as the \
         worker booted as such",
        spare.pid
    );
}

#[test]
fn a_spare_that_dies_is_replaced_and_the_workers_are_untouched() {
    let server = launch(2, &["--spare-workers", "1"]);
    let workers = server.wait_workers(2, READY_TIMEOUT);
    let spare = wait_spare(&server, "at start", |_| true);
    let mark = server.log.mark();
    server.signal_process(spare.pid, Signal::SIGKILL);
    server.log.wait_for_log_since(mark, "spare died", SETTLE);
    wait_spare(&server, "replacing the one killed", |r| r.pid != spare.pid);
    assert_eq!(server.wait_workers(2, READY_TIMEOUT), workers);
}

#[test]
fn a_refork_refreshes_the_spare_from_the_new_mold() {
    let server = launch(2, &["--spare-workers", "1"]);
    server.wait_workers(2, READY_TIMEOUT);
    let old = wait_spare(&server, "at start", |r| r.generation == 0);
    let reply = server.ctl(&["refork"]).expect("refork");
    assert!(reply.contains("gen:1"), "{reply}");
    let new = wait_spare(&server, "of gen:1", |r| r.generation == 1);
    assert_ne!(new.pid, old.pid);
    let rows = rows(&server);
    assert!(
        rows.iter()
            .filter(|r| r.role == "worker")
            .all(|r| r.generation == 1),
        "{rows:#?}"
    );
    assert_no_takeover_of_its_own(&server);
}

#[test]
fn a_reload_refreshes_the_spare_from_the_new_mold() {
    let server = launch(2, &["--spare-workers", "1"]);
    server.wait_workers(2, READY_TIMEOUT);
    let old = wait_spare(&server, "at start", |r| r.generation == 0);
    let reply = server.ctl(&["reload"]).expect("reload");
    assert!(reply.contains("reloaded"), "{reply}");
    let new = wait_spare(&server, "of the reloaded generation", |r| r.generation >= 1);
    assert_ne!(new.pid, old.pid);
    assert!(
        poll_until(SETTLE, || gone(old.pid).then_some(())).is_some(),
        "the old spare {} is still alive",
        old.pid
    );
    let rows = rows(&server);
    let mold = rows.iter().find(|r| r.role == "mold").expect("a mold");
    assert_eq!(new.generation, mold.generation, "{rows:#?}");
    assert_no_takeover_of_its_own(&server);
}

#[test]
fn with_no_spares_a_dead_worker_is_replaced_by_a_fresh_boot() {
    let server = launch(1, &["--spare-workers", "0"]);
    let worker = server.wait_workers(1, READY_TIMEOUT)[0];
    let status = server.status();
    assert_eq!(status["spare_workers"], 0, "{status}");
    let mark = server.log.mark();
    server.signal_process(worker, Signal::SIGKILL);
    let ready = server
        .log
        .wait_for_log_since(mark, "worker[0] (gen:0) ready", SETTLE);
    assert!(
        ready.contains("elapsed_ms=") && !ready.contains("spare"),
        "a worker forked and booted: {ready}"
    );
    let pid = server.wait_workers(1, READY_TIMEOUT)[0];
    assert_ne!(pid, worker);
    let rows = rows(&server);
    assert!(rows.iter().all(|r| r.role != "spare"), "{rows:#?}");
    assert!(
        !server.log.text().contains("spare"),
        "{}",
        server.log.text()
    );
}

/// A reload whose new generation cannot boot is rolled back to the gen:0 mold, which the reloaded
/// image adopted with the gen:0 spare: both still act as such. The adopted spare takes over from a
/// worker that dies, and the adopted mold makes the next spare. (Before, the new image never
/// activated an adopted spare nor asked an adopted mold for one: after such a rollback the tree
/// had no working spare.)
#[test]
fn after_a_reload_rolls_back_the_adopted_mold_and_spare_still_work_as_such() {
    let dir = TempDir::new();
    let broken = dir.join("break-preload");
    let server = Launch::tine()
        .args(["--workers", "1", "--debug-headers", "--debug-routes"])
        .args(["--spare-workers", "1", "--spawn-timeout", "10"])
        .env("TINE_DEBUG_PRELOAD_BREAKS_BOOT", &broken)
        .start();
    let worker = server.wait_workers(1, READY_TIMEOUT)[0];
    let spare = wait_spare(&server, "at start", |r| r.generation == 0);
    std::fs::write(&broken, "").unwrap();
    let err = server
        .ctl(&["reload"])
        .expect_err("the reloaded generation cannot boot: the reload fails");
    assert!(err.contains("rolled back"), "{err}");
    std::fs::remove_file(&broken).unwrap();
    assert_eq!(
        wait_spare(&server, "after the rollback", |r| r.generation == 0).pid,
        spare.pid
    );
    kill_worker_0_and_see_the_spare_take_over(&server, worker, spare.pid);
    wait_spare(&server, "made by the adopted gen:0 mold", |r| {
        r.pid != spare.pid && r.generation == 0
    });
}

/// More listening sockets than one packet carries (8): a tree with 10 still keeps a spare, and the
/// spare, activated when the worker dies, serves on every one of them. (Before, such a tree kept
/// no spare at all.)
#[test]
fn with_more_listeners_than_one_message_carries_the_spare_serves_on_all() {
    let dir = TempDir::new();
    let addrs: Vec<Addr> = (0..10)
        .map(|i| Addr::Unix(dir.join(format!("l{i}.sock"))))
        .collect();
    let mut launch =
        Launch::tine().args(["--workers", "1", "--debug-headers", "--spare-workers", "1"]);
    for a in &addrs {
        launch = launch.arg("--listen").arg(a.to_string());
    }
    let server = launch.start();
    let worker = server.wait_workers(1, READY_TIMEOUT)[0];
    let spare = wait_spare(&server, "with 10 listeners", |_| true);
    server.signal_process(worker, Signal::SIGKILL);
    wait_worker_is(&server, 0, spare.pid);
    for a in &addrs {
        let response = get(a, "/").unwrap_or_else(|e| panic!("GET on {a}: {e}"));
        assert_eq!(response.status, 200, "{a}");
        assert_eq!(
            response.header("x-tine-worker"),
            Some(spare.pid.to_string().as_str()),
            "{a} is served by the activated spare"
        );
    }
}

/// A spare has no worker number until it is activated, and nothing shows a placeholder for one:
/// the monitor's lines about a spare carry no `nr`; once activated as worker 0, its runtime threads
/// are named `tine-w0` and its profile `tine-profile-worker0-…`, like a worker booted as 0.
/// (Before, all three said 4294967295.)
#[test]
fn an_activated_spare_takes_its_number_everywhere() {
    let dir = TempDir::new();
    let profiles = dir.join("profiles");
    std::fs::create_dir_all(&profiles).expect("mkdir");
    let server = Launch::tine()
        .args(["--workers", "1", "--debug-headers", "--spare-workers", "1"])
        .args(["--worker-threads", "2"])
        .arg("--profile-dir")
        .arg(&profiles)
        .start();
    let worker = server.wait_workers(1, READY_TIMEOUT)[0];
    let first = wait_spare(&server, "at start", |_| true);
    let mark = server.log.mark();
    server.signal_process(first.pid, Signal::SIGKILL);
    let died = server.log.wait_for_log_since(mark, "spare died", SETTLE);
    assert!(!died.contains("nr="), "{died}");
    let spare = wait_spare(&server, "replacing the one killed", |r| r.pid != first.pid);
    server.signal_process(worker, Signal::SIGKILL);
    wait_worker_is(&server, 0, spare.pid);
    // Each runtime thread renames itself when it wakes after the activation (which wakes them).
    let names = || -> Vec<String> {
        std::fs::read_dir(format!("/proc/{}/task", spare.pid))
            .expect("its threads")
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
            .map(|name| name.trim_end().to_string())
            .collect()
    };
    let mut threads = names();
    let _ = poll_until(SETTLE, || {
        threads = names();
        (threads.iter().filter(|t| *t == "tine-w0").count() >= 2).then_some(())
    });
    assert!(
        threads.iter().filter(|t| *t == "tine-w0").count() >= 2,
        "the runtime's two threads are named after worker 0: {threads:?}"
    );
    assert!(
        threads
            .iter()
            .all(|t| !t.contains("4294967") && !t.contains("spare")),
        "{threads:?}"
    );
    let out = ctl_within(
        &server.control_socket,
        &["profile", "0", "--seconds", "1"],
        Duration::from_secs(60),
    )
    .expect("ctl profile 0");
    let svg = std::path::PathBuf::from(out.trim());
    let name = svg.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    assert!(
        name.starts_with(&format!("tine-profile-worker0-{}-", spare.pid)),
        "{out}"
    );
    let title = std::fs::read_to_string(&svg).expect("the flamegraph");
    assert!(title.contains("tine worker[0] (gen:0)"), "{svg:?}");
    assert!(
        !server.log.text().contains("4294967295"),
        "{}",
        server.log.text()
    );
}

/// Has worker `worker` leak (and touch) 1 GiB on a kept-alive connection (`--debug-routes`),
/// checked to be served by it; returns that connection.
fn leak_a_gib(server: &Server, worker: i32, headers: &[(&str, &str)]) -> Client {
    // Touching 1 GiB in a debug build on a loaded machine can take longer than IO_TIMEOUT.
    let mut client = Client::connect(&server.addr()).expect("connect");
    client
        .stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .expect("a read timeout");
    let leaked = client
        .request("GET", "/leak/1048576", headers, b"")
        .expect("GET /leak");
    assert_eq!(leaked.status, 200, "GET /leak: {}", leaked.text());
    assert_eq!(
        leaked.header("x-tine-worker"),
        Some(worker.to_string().as_str()),
        "the connection is the worker's"
    );
    client
}

/// A worker killed while the kernel has much to tear down (a 1 GiB heap) is replaced while that
/// teardown still runs: the monitor hears of the death from the worker's death notice, which hangs
/// up as its threads start exiting, not from its channel, which closes only once the address
/// space is gone (the kernel unmaps it before it closes a process's descriptors). Without the
/// holder of the worker's memory, which takes the teardown out of the worker's own exit (the
/// test after this one).
#[test]
fn a_spare_serves_while_the_killed_worker_is_still_being_torn_down() {
    let server = launch(
        1,
        &[
            "--spare-workers",
            "1",
            "--debug-routes",
            "--teardown-holder",
            "false",
        ],
    );
    let worker = server.wait_workers(1, READY_TIMEOUT)[0];
    leak_a_gib(&server, worker, &[("Connection", "close")]);
    let spare = wait_spare(&server, "at start", |_| true);
    let victim = pidfd::ProcessHandle::descendant_of(worker, server.pid).expect("the worker");
    let killed = std::time::Instant::now();
    assert!(victim.signal(Signal::SIGKILL), "the worker was alive");
    let mut answered_by = worker;
    // A probe the dying worker accepted before the kill waits for its teardown (its connections
    // close after the address space is gone): give up on it after a while and open another.
    let answered = poll_until(SETTLE, || {
        answered_by = served_by_within(&server, Duration::from_secs(2))?;
        (answered_by != worker).then(|| (killed.elapsed(), victim.alive()))
    });
    let (answered_after, still_tearing_down) = answered
        .unwrap_or_else(|| panic!("no answer but the victim's; log:\n{}", server.log.text()));
    let gone = poll_until(SETTLE, || (!victim.alive()).then(|| killed.elapsed()))
        .expect("the killed worker exits");
    eprintln!(
        "the spare answered {answered_after:?} after the kill; the victim was gone after {gone:?}"
    );
    assert_eq!(answered_by, spare.pid);
    // Before the teardown is half done (the unmapping is most of it): without the death notice
    // the spare could answer only after it, when the channel closes.
    assert!(
        still_tearing_down && answered_after * 2 < gone,
        "the spare answered {answered_after:?} after the kill, the killed worker was gone after \
         {gone:?}: not early in its teardown; log:\n{}",
        server.log.text()
    );
}

/// With the holder of a worker's memory (`teardown_holder = true`), a worker killed with a
/// 1 GiB heap is gone, its clients' connections closed, while the memory is still mapped: the
/// kernel tears it down when the holder exits, after the worker. Its kept-alive client learns of
/// the death (its connection ends) while the holder still holds that memory.
#[test]
fn a_killed_workers_connections_close_before_its_memory_is_torn_down() {
    let server = launch(
        1,
        &[
            "--spare-workers",
            "1",
            "--debug-routes",
            "--teardown-holder",
            "true",
        ],
    );
    let worker = server.wait_workers(1, READY_TIMEOUT)[0];
    let mut client = leak_a_gib(&server, worker, &[]);
    let holders = server.holders();
    let holder = holders
        .iter()
        .find(|p| p.ppid == worker)
        .unwrap_or_else(|| panic!("the worker's holder among {holders:?}"));
    let holder = pidfd::ProcessHandle::descendant_of(holder.pid, server.pid).expect("the holder");
    let resident_kb = |pid: i32| status_number(pid, "VmRSS");
    assert!(
        resident_kb(holder.pid()) > 512 * 1024,
        "the holder maps the worker's 1 GiB"
    );
    wait_spare(&server, "at start", |_| true);
    // Held still (no signal can be blocked against SIGSTOP), so that what follows does not race
    // its 20 ms: the worker's death alone must end the connection.
    assert!(holder.signal(Signal::SIGSTOP), "the holder was alive");
    let victim = pidfd::ProcessHandle::descendant_of(worker, server.pid).expect("the worker");
    assert!(victim.signal(Signal::SIGKILL), "the worker was alive");
    // The kept-alive connection ends (EOF or reset) as the worker's threads exit; a timeout is
    // no end.
    client
        .stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("a read timeout");
    let mut byte = [0u8; 1];
    let ended = client.stream.read(&mut byte);
    assert!(
        matches!(&ended, Ok(0))
            || matches!(&ended, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "the dead worker's connection ended: {ended:?}"
    );
    let gone = poll_until(SETTLE, || (!victim.alive()).then_some(()));
    assert!(gone.is_some(), "the killed worker is gone");
    // ...while its memory is still mapped, by the holder alone.
    assert!(
        holder.alive() && resident_kb(holder.pid()) > 512 * 1024,
        "the holder let go of the memory before the worker was gone; log:\n{}",
        server.log.text()
    );
    // Let go, it goes by itself, the memory with it.
    assert!(holder.signal(Signal::SIGCONT), "the holder was alive");
    let released = poll_until(SETTLE, || (!holder.alive()).then_some(()));
    assert!(released.is_some(), "the holder let go");
}

/// A worker runs under SCHED_BATCH (`sched_batch`, the default), but its death notice's thread
/// does not: it only ever runs when the worker is killed, and then it must preempt whatever runs
/// (a SCHED_BATCH thread woken waits for the running task's time slice to end), since the
/// monitor's word of the death waits for it.
#[test]
fn a_workers_death_notice_thread_preempts_though_the_worker_runs_under_sched_batch() {
    use common::sched::{policy_of_thread, threads_named, BATCH, OTHER};
    // SCHED_BATCH named, not assumed from the default.
    let server = launch(1, &["--spare-workers", "0", "--sched-batch", "true"]);
    let worker = server.wait_workers(1, READY_TIMEOUT)[0];
    let sentinels = poll_until(SETTLE, || {
        let found = threads_named(worker, "tine-sentinel");
        (!found.is_empty()).then_some(found)
    })
    .expect("the worker's death-notice thread");
    assert_eq!(
        policy_of_thread(worker, worker),
        BATCH,
        "the worker's main thread"
    );
    for tid in sentinels {
        assert_eq!(
            policy_of_thread(worker, tid),
            OTHER,
            "the worker's death-notice thread {tid}"
        );
    }
}

/// An activated spare serves its first moments as it stood by (`SCHED_OTHER`, at the priority
/// the monitor raised it to), then moves back in a task of its runtime; a handler that blocks
/// that runtime from the first request would keep it there for as long as it hangs. The monitor
/// puts it back, and says so.
#[test]
fn a_spare_that_hangs_from_its_first_request_is_put_back_by_the_monitor() {
    use common::sched::{nice_of_thread, policy_of_thread, BATCH, OTHER};
    let server = launch(
        1,
        &[
            "--spare-workers",
            "1",
            "--sched-batch",
            "true",
            "--timeout",
            "120",
            "--debug-routes",
        ],
    );
    let worker = server.wait_workers(1, READY_TIMEOUT)[0];
    let spare = wait_spare(&server, "at start", |_| true);
    let nice_of = |pid: i32| nice_of_thread(pid, pid);
    let (tree, monitor) = (nice_of(worker), nice_of(server.pid));
    // Raised when the monitor runs above the tree (it has the privilege here if it does).
    let standby = poll_until(SETTLE, || {
        let (n, policy) = (nice_of(spare.pid), policy_of_thread(spare.pid, spare.pid));
        (n == monitor && policy == OTHER).then_some(n)
    })
    .unwrap_or_else(|| panic!("the spare does not stand by raised, under SCHED_OTHER"));

    // Its first request spins: queued while the only worker is stopped, then the worker dies.
    let stopped = server.process(worker);
    assert!(stopped.signal(Signal::SIGSTOP), "SIGSTOP to the worker");
    // It must not accept the request.
    wait_stopped(worker, "the worker");
    let mut spin = TcpStream::connect(server.tcp_addr()).expect("connect");
    spin.write_all(b"GET /spin HTTP/1.1\r\nHost: t\r\n\r\n")
        .expect("write");
    let mark = server.log.mark();
    server.signal_process(worker, Signal::SIGKILL);
    server
        .log
        .wait_for_log_since(mark, "hot_spare=true", SETTLE);
    let mut last = (standby, OTHER);
    poll_until(SETTLE, || {
        last = (nice_of(spare.pid), policy_of_thread(spare.pid, spare.pid));
        (last == (tree, BATCH)).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "the hung spare's main thread stays at nice {} policy {} (the tree: nice {tree}, \
             SCHED_BATCH); log:\n{}",
            last.0,
            last.1,
            server.log.text()
        )
    });
    server
        .log
        .wait_for_log_since(mark, "the monitor put back", SETTLE);
}

/// One registration in an epoll instance, as `/proc/PID/fdinfo` shows it (proc(5):
/// `tfd: N events: HEX data: HEX pos:0 ino:HEX ...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct EpollEntry {
    tfd: u64,
    events: u32,
    data: u64,
    ino: u64,
}

/// Every registration of `pid`'s epoll instances.
fn epoll_registrations(pid: i32) -> Vec<EpollEntry> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the spare's descriptors")
        .flatten()
    {
        let is_epoll = std::fs::read_link(entry.path())
            .is_ok_and(|t| t.to_str() == Some("anon_inode:[eventpoll]"));
        if !is_epoll {
            continue;
        }
        let fd = entry.file_name().to_string_lossy().into_owned();
        let Ok(info) = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")) else {
            continue;
        };
        for line in info.lines().filter(|l| l.starts_with("tfd:")) {
            let words: Vec<&str> = line.split_whitespace().collect();
            let after = |name: &str, radix: u32| {
                let at = words.iter().position(|w| *w == name)?;
                u64::from_str_radix(words.get(at + 1)?, radix).ok()
            };
            let ino = words
                .iter()
                .find_map(|w| w.strip_prefix("ino:"))
                .and_then(|h| u64::from_str_radix(h, 16).ok());
            if let (Some(tfd), Some(events), Some(data), Some(ino)) = (
                after("tfd:", 10),
                after("events:", 16),
                after("data:", 16),
                ino,
            ) {
                found.push(EpollEntry {
                    tfd,
                    events: events as u32,
                    data,
                    ino,
                });
            }
        }
    }
    found
}

#[test]
fn an_activated_spare_waits_on_the_listener_once_exclusively_through_its_prepared_gate() {
    // The spare registers a placeholder while it stands by and, at activation, points its
    // descriptor at the listener and takes over its registration (`http::StandbyGate`): one
    // registration of the listener in the spare's reactor, with EPOLLEXCLUSIVE (the default), and
    // no fallback to registering anew (which works too, slower, and says so as a warning).
    const EPOLLEXCLUSIVE: u32 = 1 << 28;
    let server = launch(1, &["--spare-workers", "1"]);
    let worker = server.wait_workers(1, READY_TIMEOUT)[0];
    let spare = wait_spare(&server, "at start", |_| true);
    let listening = listening_sockets(&server, worker);
    // Standing by, the spare's reactor holds its placeholders' registrations: same descriptor
    // numbers and tokens as the listeners' after activation, when the prepared path is taken
    // (registering anew would give the listener another descriptor and another token).
    let standing_by = epoll_registrations(spare.pid);
    kill_worker_0_and_see_the_spare_take_over(&server, worker, spare.pid);
    let registrations: Vec<EpollEntry> = epoll_registrations(spare.pid)
        .into_iter()
        .filter(|r| listening.contains(&r.ino))
        .collect();
    assert_eq!(
        registrations.len(),
        listening.len(),
        "one registration per listener in the activated spare: {registrations:?}"
    );
    for r in &registrations {
        assert_ne!(
            r.events & EPOLLEXCLUSIVE,
            0,
            "listener registered without EPOLLEXCLUSIVE: {r:?}"
        );
        assert!(
            standing_by
                .iter()
                .any(|p| p.tfd == r.tfd && p.data == r.data && p.ino != r.ino),
            "the listener's registration {r:?} is not the placeholder's taken over: {standing_by:?}"
        );
    }
    let log = server.log.text();
    for fallback in [
        "the gate is made at activation",
        "the prepared gate did not open",
    ] {
        assert!(
            !log.contains(fallback),
            "the spare fell back ({fallback}):\n{log}"
        );
    }
}

/// The spare learns of a worker's death from the kernel (the robust futex of the worker's
/// death-notice thread, `worker::takeover`) and takes its place by itself: with the monitor
/// stopped, a worker killed is still replaced, and a new connection served by the spare. Once the
/// monitor runs again, it ratifies the takeover: the spare is worker 0 in its table, once, and a
/// new spare is made.
#[test]
fn a_spare_takes_a_killed_workers_place_on_its_own_while_the_monitor_is_stopped() {
    let server = launch(
        1,
        &["--spare-workers", "1", ARMING_LOGGED[0], ARMING_LOGGED[1]],
    );
    let worker = server.wait_workers(1, READY_TIMEOUT)[0];
    let spare = wait_spare(&server, "at start", |_| true);
    wait_armed(&server, spare.pid);
    let mark = server.log.mark();
    let stopped = MonitorStopped::new(&server);
    server.signal_process(worker, Signal::SIGKILL);
    let answered = poll_until(SETTLE, || {
        served_by_within(&server, Duration::from_secs(2)).filter(|p| *p != worker)
    });
    drop(stopped);
    assert_eq!(
        answered,
        Some(spare.pid),
        "with the monitor stopped, the spare did not take the killed worker's place; log:\n{}",
        server.log.text()
    );
    wait_worker_is(&server, 0, spare.pid);
    server
        .log
        .wait_for_log_since(mark, "took_over=true", SETTLE);
    server
        .log
        .wait_for_log_since(mark, "without waiting for the monitor", SETTLE);
    let next = wait_spare(&server, "made after the takeover", |r| {
        r.pid != spare.pid && r.pid != worker
    });
    assert_eq!(served_by(&server), spare.pid);
    let status = server.status();
    assert_eq!(status["spare_activations"], 1, "{status}");
    let log = server.log.text();
    let activations = log
        .lines()
        .skip(mark)
        .filter(|l| l.contains("hot_spare=true"))
        .count();
    assert_eq!(activations, 1, "activated once:\n{log}");
    let rows = rows(&server);
    assert_eq!(
        rows.iter()
            .filter(|r| r.role == "worker")
            .map(|r| r.pid)
            .collect::<Vec<_>>(),
        vec![spare.pid],
        "{rows:#?}"
    );
    assert!(rows.iter().any(|r| r.pid == next.pid && r.role == "spare"));
}

/// A spare that cannot stand by on futexes (Linux before 5.16, or a seccomp filter that refuses
/// `futex_waitv`; here `TINE_DEBUG_NO_FUTEX_WAITV`) says so before it reports ready, so the
/// monitor never arms it: a killed worker is replaced by the monitor at once, without leaving the
/// place for `TAKEOVER_WAIT` to a claim that cannot come (before, every death waited for it).
/// Standing by, such a spare keeps no copy of the listening sockets: it could never use one.
#[test]
fn a_spare_that_cannot_watch_is_activated_by_the_monitor_without_waiting_for_a_claim() {
    let server = Launch::tine()
        .args(["--workers", "1", "--debug-headers", "--debug-routes"])
        .args(["--spare-workers", "1"])
        .args(["--log-level", "info,tine::monitor::spares=debug"])
        .env("TINE_DEBUG_NO_FUTEX_WAITV", "1")
        .start();
    let worker = server.wait_workers(1, READY_TIMEOUT)[0];
    let spare = wait_spare(&server, "at start", |_| true);
    let listening = listening_sockets(&server, worker);
    let kept: Vec<u64> = socket_inodes(spare.pid)
        .into_iter()
        .filter(|i| listening.contains(i))
        .collect();
    assert!(
        kept.is_empty(),
        "the spare that cannot watch keeps copies of the listening sockets: {kept:?}"
    );
    let mark = server.log.mark();
    kill_worker_0_and_see_the_spare_take_over(&server, worker, spare.pid);
    let log = server.log.text();
    let since: Vec<&str> = log.lines().skip(mark).collect();
    for said in [
        // The monitor's own activation after it waited for a spare's claim.
        "no spare took the dead worker's place on its own",
        "took_over=true",
        "without waiting for the monitor",
    ] {
        assert!(
            !since.iter().any(|l| l.contains(said)),
            "{said:?} after the kill:\n{log}"
        );
    }
}

/// Two workers die at once and one spare stands by: it takes one place (on its own: the monitor
/// is stopped), and the other worker is replaced by a fresh fork once the monitor runs again.
#[test]
fn two_deaths_and_one_spare_make_one_takeover_and_one_fresh_worker() {
    let server = launch(
        2,
        &["--spare-workers", "1", ARMING_LOGGED[0], ARMING_LOGGED[1]],
    );
    let workers = server.wait_workers(2, READY_TIMEOUT);
    let spare = wait_spare(&server, "at start", |_| true);
    wait_armed(&server, spare.pid);
    let mark = server.log.mark();
    let stopped = MonitorStopped::new(&server);
    for w in &workers {
        server.signal_process(*w, Signal::SIGKILL);
    }
    let answered = poll_until(SETTLE, || {
        served_by_within(&server, Duration::from_secs(2)).filter(|p| !workers.contains(p))
    });
    drop(stopped);
    assert_eq!(answered, Some(spare.pid), "log:\n{}", server.log.text());
    let now = poll_until(SETTLE, || {
        let w = server.wait_workers(2, READY_TIMEOUT);
        (!w.iter().any(|p| workers.contains(p))).then_some(w)
    })
    .expect("two workers again");
    assert!(now.contains(&spare.pid), "{now:?}");
    let log = server.log.text();
    let since: Vec<&str> = log.lines().skip(mark).collect();
    assert_eq!(
        since
            .iter()
            .filter(|l| l.contains("took_over=true"))
            .count(),
        1,
        "one takeover:\n{log}"
    );
    assert_eq!(
        since
            .iter()
            .filter(|l| l.contains("hot_spare=true"))
            .count(),
        1,
        "one spare activation:\n{log}"
    );
    let status = server.status();
    assert_eq!(status["spare_activations"], 1, "{status}");
}

/// During a rollout the monitor alone replaces a dead worker (with the new generation's rules):
/// it closes the workers' takeover words and disarms the spares while a refork or reload is under
/// way. So with the monitor stopped in the middle of a refork's rollout, workers killed are not
/// taken over by a standing-by spare, though one was armed before the refork.
#[test]
fn no_spare_takes_a_place_on_its_own_during_a_rollout() {
    // Each boot takes 2 s: the rollout lasts several seconds.
    let server = Launch::tine()
        .args(["--workers", "2", "--debug-headers", "--debug-routes"])
        .args(["--spare-workers", "2"])
        .args(ARMING_LOGGED)
        .env("TINE_DEBUG_BOOT_SLEEP_MS", "2000")
        .start();
    server.wait_workers(2, READY_TIMEOUT);
    for pid in common::spares::wait_spares(&server, 2, SETTLE) {
        wait_armed(&server, pid);
    }
    let mark = server.log.mark();
    // A signal, not `ctl refork`, which answers only once every worker is rolled.
    server.signal(Signal::SIGUSR2);
    server
        .log
        .wait_for_log_since(mark, "rolling worker to the new generation", SETTLE);
    // Asked before the monitor stops (it answers `ctl status`); nothing boots faster than 2 s.
    let rows = rows(&server);
    let old: Vec<i32> = rows
        .iter()
        .filter(|r| r.role == "worker" && r.generation == 0)
        .map(|r| r.pid)
        .collect();
    let spares: Vec<i32> = rows
        .iter()
        .filter(|r| r.role == "spare")
        .map(|r| r.pid)
        .collect();
    assert!(
        !old.is_empty() && !spares.is_empty(),
        "gen:0 workers still serving and a spare standing by: {rows:#?}"
    );
    let mark = server.log.mark();
    let stopped = MonitorStopped::new(&server);
    for w in &old {
        server.signal_process(*w, Signal::SIGKILL);
    }
    // Every serving worker is dead and the new ones are still in `boot`: only a spare that took
    // a place could answer (within milliseconds, if it could).
    let answered = served_by_within(&server, Duration::from_secs(1));
    let claimed = server
        .log
        .wait_for_line_since(mark, Duration::from_millis(200), |l| {
            l.contains("without waiting for the monitor")
        });
    drop(stopped);
    assert!(
        answered.is_none_or(|p| !spares.contains(&p)) && claimed.is_none(),
        "a spare took a place on its own during the rollout (answered by {answered:?}, spares \
         {spares:?}: {claimed:?}); log:\n{}",
        server.log.text()
    );
    // The monitor replaces them once it runs again.
    let now = poll_until(SETTLE, || {
        let w = server.wait_workers(2, READY_TIMEOUT);
        (!w.iter().any(|p| old.contains(p))).then_some(w)
    })
    .expect("two workers again");
    let log = server.log.text();
    assert!(
        !log.lines().skip(mark).any(|l| l.contains("took_over=true")),
        "{now:?}: a spare took a place on its own:\n{log}"
    );
}
