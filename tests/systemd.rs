//! systemd integration, black box, with real systemd tools and real sockets: socket activation
//! through Debian's `systemd-socket-activate`, the `sd_notify` protocol read from a datagram
//! socket the test binds (READY, RELOADING with MONOTONIC_USEC, STOPPING, STATUS, WATCHDOG, each
//! checked to come from the monitor's pid as `NotifyAccess=main` requires), privilege drop to
//! `nobody`, and the unit files of docs/DEPLOYMENT.md checked by `systemd-analyze verify`.
//!
//! What the app sees of its environment is asked from the app itself (`hello_v1`'s `/env/NAME`):
//! `/proc/PID/environ` of a tine process is blank, since tine writes its process titles over the
//! original argv and environment area.

mod common;

use std::io::IoSliceMut;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;
use nix::sys::socket::{
    recvmsg, setsockopt, sockopt::PassCred, ControlMessageOwned, MsgFlags, UnixCredentials,
};

/// A systemd tool: `/usr/bin/NAME` or `/lib/systemd/NAME`. CI installs package `systemd`
/// (`.ci/run`); a missing tool fails the test rather than skipping it.
fn systemd_tool(name: &str) -> PathBuf {
    ["/usr/bin", "/bin", "/lib/systemd", "/usr/lib/systemd"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} is not installed (Debian package `systemd`)"))
}

/// `GET path` on `addr` until every pid in `workers` has answered; returns the bodies by pid.
fn ask_every_worker(addr: &Addr, path: &str, workers: &[i32]) -> Vec<(i32, u16, String)> {
    let mut seen: Vec<(i32, u16, String)> = Vec::new();
    let all = poll_until(Duration::from_secs(10), || {
        let r = get(addr, path).ok()?;
        let pid = r.worker()?;
        if !seen.iter().any(|(p, _, _)| *p == pid) {
            seen.push((pid, r.status, r.text()));
        }
        workers
            .iter()
            .all(|w| seen.iter().any(|(p, _, _)| p == w))
            .then_some(())
    });
    assert!(
        all.is_some(),
        "not every worker of {workers:?} answered {path}: {seen:?}"
    );
    seen
}

/// The `Uid:` or `Gid:` line of `/proc/PID/status`: real, effective, saved, filesystem.
fn ids(pid: i32, which: &str) -> Vec<u32> {
    status_field(pid, which)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Socket activation

#[test]
fn socket_activation_serves_the_passed_sockets_and_keeps_them_across_a_reload() {
    let (a, b) = (free_port(), free_port());
    let server = Launch::program(systemd_tool("systemd-socket-activate"))
        .subcommand(None)
        .args([
            "-l",
            &format!("127.0.0.1:{a}"),
            "-l",
            &format!("127.0.0.1:{b}"),
            "--fdname=web:api",
        ])
        .arg(example_bin("hello_v1"))
        // No --listen: the activated sockets are served. The control socket is in the run dir.
        .args([
            "serve",
            "--workers",
            "2",
            "--control-socket",
            "ctl.sock",
            "--debug-headers",
            // Every idle worker races for each connection, so that one after another, every
            // worker answers (exclusive wake-ups would hand them all to the first idle one).
            "--exclusive-accept",
            "false",
        ])
        .spawn();
    // systemd-socket-activate binds, then execs the server on the first connection: this very
    // request waits in the socket's queue and is answered by the exec'd tree.
    server
        .log
        .wait_for_log(&format!("Listening on 127.0.0.1:{b}"), READY_TIMEOUT);
    let (addr_a, addr_b): (Addr, Addr) = (
        format!("127.0.0.1:{a}").parse().unwrap(),
        format!("127.0.0.1:{b}").parse().unwrap(),
    );
    let first = get(&addr_a, "/").expect("the first connection is served");
    assert_eq!((first.status, first.text().as_str()), (200, "hello v1\n"));
    server.wait_ready();
    assert_eq!(
        get(&addr_b, "/").unwrap().text(),
        "hello v1\n",
        "both activated sockets are served"
    );
    let web = server.log.wait_for_log(
        "serving a socket-activated listener",
        Duration::from_secs(1),
    );
    assert!(
        web.contains("name=web") && web.contains(&format!("127.0.0.1:{a}")),
        "{web}"
    );
    assert!(server
        .log
        .find("name=api")
        .is_some_and(|l| l.contains(&format!("127.0.0.1:{b}"))));
    let started = server
        .log
        .wait_for_log("starting listen=", Duration::from_secs(1));
    assert!(
        started.contains(&format!("listen=127.0.0.1:{a},127.0.0.1:{b} ")),
        "exactly the activated sockets: {started}"
    );
    assert_eq!(
        title(server.pid)
            .as_deref()
            .map(|t| t.starts_with("tine monitor")),
        Some(true),
        "activate exec'd in place"
    );

    // Taken once: no child inherits LISTEN_*.
    let workers: Vec<i32> = server.wait_workers(2, READY_TIMEOUT);
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        for (pid, status, body) in ask_every_worker(&addr_a, &format!("/env/{var}"), &workers) {
            assert_eq!(status, 404, "worker {pid} sees {var}={body}");
        }
    }

    // A reload keeps serving the activated sockets (handed over, not re-read from the environment).
    let mark = server.log.mark();
    let out = server
        .ctl(&["reload"])
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", server.log.text()));
    assert!(out.starts_with("reloaded in "), "{out}");
    let adopted = server
        .log
        .wait_for_log_since(mark, "new image running", Duration::from_secs(1));
    assert!(
        adopted.contains(&format!("listen=127.0.0.1:{a},127.0.0.1:{b} ")),
        "{adopted}"
    );
    assert!(!server.log.lines()[mark..]
        .iter()
        .any(|l| l.contains("socket-activated listener")
            || l.contains("ignoring the socket-activated")));
    let workers = server.wait_workers(2, Duration::from_secs(10));
    for (pid, status, body) in ask_every_worker(&addr_b, "/env/LISTEN_FDS", &workers) {
        assert_eq!(status, 404, "new worker {pid} sees LISTEN_FDS={body}");
    }
}

#[test]
fn activated_sockets_are_ignored_when_listen_is_configured() {
    let (activated, configured) = (free_port(), free_port());
    let server = Launch::program(systemd_tool("systemd-socket-activate"))
        .subcommand(None)
        .args(["-l", &format!("127.0.0.1:{activated}")])
        .arg(example_bin("hello_v1"))
        .args([
            "serve",
            "--workers",
            "1",
            "--control-socket",
            "ctl.sock",
            "--listen",
            &format!("127.0.0.1:{configured}"),
        ])
        .spawn();
    server.log.wait_for_log("Listening on", READY_TIMEOUT);
    // The exec happens on the first connection to the activated socket, which nobody serves then.
    let _ = std::net::TcpStream::connect(("127.0.0.1", activated));
    server.wait_ready();
    server.log.wait_for_log(
        "`listen` is configured: ignoring the socket-activated listeners",
        Duration::from_secs(1),
    );
    assert_eq!(
        get(&format!("127.0.0.1:{configured}").parse().unwrap(), "/")
            .unwrap()
            .text(),
        "hello v1\n"
    );
}

// ---------------------------------------------------------------------------------------------
// sd_notify

/// One datagram received on the notification socket.
#[derive(Debug, Clone)]
struct Note {
    /// The sender's pid, from the kernel (SCM_CREDENTIALS).
    pid: i32,
    fields: Vec<(String, String)>,
}

impl Note {
    fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// A `NOTIFY_SOCKET` bound by the test, read by a thread until dropped (bounded: the thread polls a
/// stop flag every 50 ms).
struct NotifySocket {
    path: PathBuf,
    notes: Arc<Mutex<Vec<Note>>>,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
}

impl NotifySocket {
    fn bind(dir: &TempDir) -> NotifySocket {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notification socket");
        setsockopt(&socket, PassCred, &true).expect("SO_PASSCRED");
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let (notes, stop) = (
            Arc::new(Mutex::new(Vec::new())),
            Arc::new(AtomicBool::new(false)),
        );
        let reader = std::thread::spawn({
            let (notes, stop) = (notes.clone(), stop.clone());
            move || {
                while !stop.load(Ordering::Relaxed) {
                    let mut buf = [0u8; 4096];
                    let mut iov = [IoSliceMut::new(&mut buf)];
                    let mut space = nix::cmsg_space!(UnixCredentials);
                    let Ok(msg) = recvmsg::<()>(
                        socket.as_raw_fd(),
                        &mut iov,
                        Some(&mut space),
                        MsgFlags::empty(),
                    ) else {
                        continue;
                    };
                    let pid = msg
                        .cmsgs()
                        .ok()
                        .and_then(|mut c| {
                            c.find_map(|c| match c {
                                ControlMessageOwned::ScmCredentials(cred) => Some(cred.pid()),
                                _ => None,
                            })
                        })
                        .unwrap_or(0);
                    let n = msg.bytes;
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let fields = text
                        .lines()
                        .filter_map(|l| l.split_once('='))
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect();
                    notes.lock().unwrap().push(Note { pid, fields });
                }
            }
        });
        NotifySocket {
            path,
            notes,
            stop,
            reader: Some(reader),
        }
    }

    fn notes(&self) -> Vec<Note> {
        self.notes.lock().unwrap().clone()
    }

    fn mark(&self) -> usize {
        self.notes.lock().unwrap().len()
    }

    /// Waits for a datagram at index `since` or later with `key=value`; returns its index.
    fn wait_for(&self, since: usize, key: &str, value: &str, timeout: Duration) -> (usize, Note) {
        let found = poll_until(timeout, || {
            self.notes()
                .into_iter()
                .enumerate()
                .skip(since)
                .find(|(_, n)| n.get(key) == Some(value))
        });
        found.unwrap_or_else(|| {
            panic!(
                "no {key}={value} after datagram {since} within {timeout:?}: {:?}",
                self.notes()
            )
        })
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

fn monotonic_usec() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock_gettime");
    t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000
}

#[test]
fn sd_notify_ready_reloading_stopping_status_and_watchdog_from_the_monitor_only() {
    let dir = TempDir::new();
    let notify = NotifySocket::bind(&dir);
    // Every idle worker races for each connection, so that every worker answers in turn.
    let config = dir.write("tine.toml", "workers = 2\nexclusive_accept = false\n");
    let mut server = Launch::example("hello_v1")
        .args([
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--debug-headers",
        ])
        .arg("--config")
        .arg(&config)
        .env("NOTIFY_SOCKET", &notify.path)
        // Pings every 500 ms, from the monitor's loop. No WATCHDOG_PID: as for libsystemd, it
        // only restricts the watchdog to one pid when set.
        .env("WATCHDOG_USEC", "1000000")
        .start();
    let monitor = server.pid;
    let (i, ready) = notify.wait_for(0, "READY", "1", Duration::from_secs(5));
    assert_eq!(ready.get("STATUS"), Some("ready; 2 workers"), "{ready:?}");
    assert!(
        notify.notes()[..i].iter().all(|n| n.get("READY").is_none()),
        "READY=1 once the workers are ready, not before"
    );

    // The socket is the monitor's: the app does not see it.
    let workers = server.wait_workers(2, READY_TIMEOUT);
    for (pid, status, body) in ask_every_worker(&server.addr(), "/env/NOTIFY_SOCKET", &workers) {
        assert_eq!(status, 404, "worker {pid} sees NOTIFY_SOCKET={body}");
    }

    // A reload: RELOADING=1 with the monotonic time it started, then READY=1 once it is complete.
    let mark = notify.mark();
    let before = monotonic_usec();
    let out = server
        .ctl(&["reload"])
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", server.log.text()));
    let after = monotonic_usec();
    assert!(out.starts_with("reloaded in "), "{out}");
    let (r, reloading) = notify.wait_for(mark, "RELOADING", "1", Duration::from_secs(5));
    let usec: u64 = reloading
        .get("MONOTONIC_USEC")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("MONOTONIC_USEC in {reloading:?}"));
    assert!(
        before <= usec && usec <= after,
        "MONOTONIC_USEC={usec} is the monotonic clock during the reload [{before}, {after}]"
    );
    let (_, again) = notify.wait_for(r + 1, "READY", "1", Duration::from_secs(5));
    assert_eq!(again.get("STATUS"), Some("reloaded; 2 workers"));

    // A refused reload ends the RELOADING state too, with a status that says so.
    std::fs::write(&config, "workers = 2\nnot_a_key = 1\n").unwrap();
    let mark = notify.mark();
    server
        .ctl(&["reload"])
        .expect_err("an unknown key is refused");
    let (r, _) = notify.wait_for(mark, "RELOADING", "1", Duration::from_secs(5));
    let (_, failed) = notify.wait_for(r + 1, "READY", "1", Duration::from_secs(5));
    assert_eq!(
        failed.get("STATUS"),
        Some("reload failed; old generation serving; 2 workers")
    );

    // The watchdog is pinged by the new image as by the old one, again and again.
    let (w, _) = notify.wait_for(r + 1, "WATCHDOG", "1", Duration::from_secs(5));
    notify.wait_for(w + 1, "WATCHDOG", "1", Duration::from_secs(5));

    // Stop: STOPPING=1.
    let mark = notify.mark();
    server.signal(Signal::SIGTERM);
    notify.wait_for(mark, "STOPPING", "1", Duration::from_secs(5));
    assert_eq!(
        server
            .wait_exit(Duration::from_secs(15))
            .and_then(|s| s.code()),
        Some(0)
    );

    // Every datagram came from the monitor's pid (NotifyAccess=main).
    let notes = notify.notes();
    let strangers: Vec<&Note> = notes.iter().filter(|n| n.pid != monitor).collect();
    assert!(
        strangers.is_empty(),
        "datagrams from other pids than the monitor {monitor}: {strangers:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Privilege drop

#[test]
fn user_nobody_runs_the_mold_and_workers_unprivileged_and_the_monitor_as_root() {
    assert_eq!(
        nix::unistd::geteuid().as_raw(),
        0,
        "this test starts the server as root"
    );
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("user nobody");
    let (uid, gid) = (nobody.uid.as_raw(), nobody.gid.as_raw());
    let mut server = Launch::example("hello_v1")
        .args([
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--workers",
            "2",
            "--user",
            "nobody",
        ])
        .start();
    let check = |server: &Server| {
        assert_eq!(
            ids(server.pid, "Uid"),
            [0, 0, 0, 0],
            "the monitor keeps root (to bind and signal)"
        );
        // The mold, two workers and the hot spare (spare_workers 1 by default), which may still
        // be booting.
        let tree = poll_until(Duration::from_secs(10), || {
            let tree = server.tree();
            (tree.len() == 4).then_some(tree)
        })
        .unwrap_or_else(|| panic!("not 4 processes: {:?}", server.tree()));
        for p in &tree {
            assert_eq!(ids(p.pid, "Uid"), [uid; 4], "{} runs as nobody", p.title);
            assert_eq!(
                ids(p.pid, "Gid"),
                [gid; 4],
                "{} runs with nobody's group",
                p.title
            );
            let groups = status_field(p.pid, "Groups").unwrap_or_default();
            assert_eq!(
                groups.split_whitespace().collect::<Vec<_>>(),
                [gid.to_string()],
                "{}: no supplementary groups of root",
                p.title
            );
        }
        assert_eq!(server.get("/").text(), "hello v1\n");
    };
    check(&server);

    // The reloaded generation too (its mold is forked by the new image).
    server
        .ctl(&["reload"])
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", server.log.text()));
    server.wait_workers(2, Duration::from_secs(10));
    poll_until(Duration::from_secs(10), || {
        (server.tree().len() == 4).then_some(())
    });
    check(&server);

    // The parent-death signal is set after the uid change (which clears it): children of a
    // monitor killed outright exit by themselves.
    let children: Vec<i32> = server.tree().iter().map(|p| p.pid).collect();
    server.signal(Signal::SIGKILL);
    server
        .wait_exit(Duration::from_secs(5))
        .expect("the monitor is dead");
    let left = poll_until(Duration::from_secs(5), || {
        children.iter().all(|p| gone(*p)).then_some(())
    });
    assert!(
        left.is_some(),
        "children of a dead monitor still alive: {:?}",
        children.iter().filter(|p| !gone(**p)).collect::<Vec<_>>()
    );
}

#[test]
fn preload_runs_after_the_privilege_drop() {
    // A file only root may read: a preload running as nobody cannot.
    let dir = TempDir::new();
    let secret = dir.write("secret.txt", "root only\n");
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let run = |user: Option<&str>| {
        let mut launch = Launch::example("watch_demo")
            .args([
                "--listen",
                &format!("127.0.0.1:{}", free_port()),
                "--workers",
                "1",
                "--max-consecutive-spawn-errors",
                "2",
            ])
            .env("WATCH_DEMO_PRELOAD_FILE", &secret);
        if let Some(u) = user {
            launch = launch.args(["--user", u]);
        }
        launch
    };
    // As root it serves the file.
    let server = run(None).start();
    assert_eq!(server.get("/preload").text(), "root only\n");
    drop(server);
    // As nobody, preload is refused by the kernel, and the monitor gives up with a clear error.
    let finished = run(Some("nobody")).run(Duration::from_secs(30));
    assert_eq!(finished.code(), Some(1), "{}", finished.stderr_text());
    let log = finished.stderr_text();
    assert!(
        log.contains("preload failed") && log.contains("Permission denied"),
        "{log}"
    );
}

// ---------------------------------------------------------------------------------------------
// docs/DEPLOYMENT.md

/// The unit files in docs/DEPLOYMENT.md: fenced blocks whose first line is
/// `# /etc/systemd/system/NAME`.
fn units_in_deployment_doc() -> Vec<(String, String)> {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/DEPLOYMENT.md"))
            .expect("docs/DEPLOYMENT.md");
    let mut units = Vec::new();
    let mut lines = doc.lines();
    while let Some(line) = lines.next() {
        if !line.starts_with("```") {
            continue;
        }
        let block: Vec<&str> = lines
            .by_ref()
            .take_while(|l| !l.starts_with("```"))
            .collect();
        if let Some(name) = block
            .first()
            .and_then(|l| l.strip_prefix("# /etc/systemd/system/"))
        {
            units.push((name.trim().to_string(), block.join("\n") + "\n"));
        }
    }
    units
}

#[test]
fn deployment_unit_files_pass_systemd_analyze_verify() {
    let units = units_in_deployment_doc();
    let names: Vec<&str> = units.iter().map(|(n, _)| n.as_str()).collect();
    assert!(
        names.contains(&"tine.service") && names.contains(&"tine.socket"),
        "units in the doc: {names:?}"
    );
    let dir = TempDir::new();
    let bin = tine_bin();
    for (name, text) in &units {
        // The doc's install path, pointed at the binary under test.
        dir.write(
            name,
            text.replace("/usr/local/bin/tine", &bin.display().to_string()),
        );
    }
    let service = units.iter().find(|(n, _)| n == "tine.service").unwrap();
    assert!(
        service.1.contains("ExecStart=/usr/local/bin/tine serve"),
        "the service runs the installed tine"
    );
    for key in [
        "Type=notify",
        "NotifyAccess=main",
        "KillMode=mixed",
        "WatchdogSec=",
        "TimeoutStopSec=",
        "ExecReload=",
    ] {
        assert!(
            service.1.lines().any(|l| l.starts_with(key)),
            "tine.service sets {key}"
        );
    }
    let out = std::process::Command::new(systemd_tool("systemd-analyze"))
        .args(["verify", "--man=no"])
        .args(units.iter().map(|(n, _)| dir.join(n)))
        .env("SYSTEMD_LOG_LEVEL", "notice")
        .output()
        .expect("run systemd-analyze verify");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // In a container without systemd as pid 1, verify still parses and checks every unit; only
    // lines naming our files count.
    let about_ours: Vec<&str> = text
        .lines()
        .filter(|l| units.iter().any(|(n, _)| l.contains(n.as_str())))
        .collect();
    assert!(
        out.status.success() && about_ours.is_empty(),
        "systemd-analyze verify: {}\n{text}",
        out.status
    );
}

// ---------------------------------------------------------------------------------------------
// A container's PID 1 (docs/DEPLOYMENT.md, Kubernetes)

#[test]
fn as_pid_1_of_a_pid_namespace_term_from_outside_drains_and_exits_zero() {
    let port = free_port();
    let addr: Addr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut server = Launch::program(PathBuf::from("/usr/bin/unshare"))
        .subcommand(None)
        .args(["--pid", "--fork", "--kill-child"])
        .arg(tine_bin())
        .args([
            "serve",
            "--listen",
            &addr.to_string(),
            "--workers",
            "2",
            "--control-socket",
            "ctl.sock",
            "--debug-routes",
        ])
        .start();
    let monitor = server
        .with_title("tine monitor")
        .first()
        .map(|p| p.pid)
        .expect("the monitor under unshare");
    let nspid = status_field(monitor, "NSpid").expect("/proc/PID/status");
    assert!(
        nspid.ends_with("\t1"),
        "the monitor is PID 1 of its namespace: {nspid:?}"
    );
    // A request in flight when TERM comes (from outside the namespace, as the kubelet's runtime
    // sends it): it is answered, then the tree stops and the monitor exits 0.
    let slow = std::thread::spawn({
        let addr = addr.clone();
        move || get(&addr, "/sleep/1000").map(|r| r.status)
    });
    let busy = poll_until(Duration::from_secs(5), || {
        server.workers().iter().any(|w| w.2 == "busy").then_some(())
    });
    assert!(busy.is_some(), "the slow request is in flight");
    server.signal_process(monitor, Signal::SIGTERM);
    assert_eq!(
        slow.join().unwrap().expect("the slow request is answered"),
        200
    );
    server.log.wait_for_log("stopped", Duration::from_secs(10));
    // `unshare --fork` exits with its child's status.
    assert_eq!(
        server
            .wait_exit(Duration::from_secs(10))
            .and_then(|s| s.code()),
        Some(0)
    );
}

/// A socket-activated unix listener's file is systemd's (its socket unit keeps listening on it,
/// queuing connections for the next start): a graceful stop leaves it where it is, at the stop's
/// start (where tine removes its own sockets' paths so new connects fail at once) and at exit.
#[test]
fn a_socket_activated_unix_socket_file_outlives_the_server() {
    let dir = TempDir::new();
    let path = dir.path().join("web.sock");
    let server = Launch::program(systemd_tool("systemd-socket-activate"))
        .subcommand(None)
        .arg("-l")
        .arg(&path)
        .arg(tine_bin())
        .args(["serve", "--workers", "1", "--control-socket", "ctl.sock"])
        .spawn();
    server.log.wait_for_log("Listening on", READY_TIMEOUT);
    // The first connection makes systemd-socket-activate exec the server in place.
    let first = get(&Addr::Unix(path.clone()), "/").expect("served on the activated socket");
    assert_eq!(first.status, 200);
    server.wait_ready();
    stop_and_check_the_socket_file_is_kept(server, &path);
}

/// A reload whose `listen` names the address of a socket-activated listener keeps that socket (it
/// is the same listener), and the socket is still systemd's: a graceful stop leaves its file (as
/// it must leave a TCP socket unfiltered), since systemd's socket unit goes on listening on it.
/// Before, the reloaded tree took such a socket for its own: the stop removed the file.
#[test]
fn a_socket_activated_socket_kept_by_a_configured_listen_stays_systemds() {
    let dir = TempDir::new();
    let path = dir.path().join("web.sock");
    let server = activated_then_reloaded_with_listen(&dir, &path, &[&path]);
    stop_and_check_the_socket_file_is_kept(server, &path);
}

/// A tree serving a systemd socket and a socket of its own (a reload's `listen` names systemd's
/// socket and a new path): whether a socket is systemd's goes with the socket, not the tree. A
/// graceful stop leaves systemd's file for its socket unit and removes tine's own, as for any
/// tree. Before, one socket from systemd made the whole tree's sockets systemd's: the stop neither
/// closed off nor removed the socket tine had bound.
#[test]
fn a_stop_leaves_systemds_socket_and_removes_its_own_next_to_it() {
    let dir = TempDir::new();
    let activated = dir.path().join("web.sock");
    let own = dir.path().join("own.sock");
    let server = activated_then_reloaded_with_listen(&dir, &activated, &[&activated, &own]);
    let text = stop_and_check_the_socket_file_is_kept(server, &activated);
    assert!(
        std::fs::symlink_metadata(&own).is_err(),
        "tine's own socket file {} is still there after the stop; log:\n{text}",
        own.display()
    );
}

/// A tree started by `systemd-socket-activate` on the unix socket `activated` (no `listen`: it
/// serves that socket), then reloaded with a config whose `listen` names the unix sockets
/// `listen`; every one of them answers after the reload.
fn activated_then_reloaded_with_listen(
    dir: &TempDir,
    activated: &Path,
    listen: &[&Path],
) -> Server {
    let config = dir.write("tine.toml", "workers = 1\n");
    let server = Launch::program(systemd_tool("systemd-socket-activate"))
        .subcommand(None)
        .arg("-l")
        .arg(activated)
        .arg(tine_bin())
        .args(["serve", "--control-socket", "ctl.sock", "--config"])
        .arg(&config)
        .spawn();
    server.log.wait_for_log("Listening on", READY_TIMEOUT);
    // The first connection makes systemd-socket-activate exec the server in place.
    let first = get(&Addr::Unix(activated.to_path_buf()), "/");
    assert_eq!(first.expect("served").status, 200);
    server.wait_ready();
    let addrs: Vec<String> = listen
        .iter()
        .map(|p| format!("\"unix:{}\"", p.display()))
        .collect();
    std::fs::write(
        &config,
        format!("workers = 1\nlisten = [{}]\n", addrs.join(", ")),
    )
    .unwrap();
    let out = server
        .ctl(&["reload"])
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", server.log.text()));
    assert!(out.starts_with("reloaded in "), "{out}");
    for path in listen {
        let served = get(&Addr::Unix(path.to_path_buf()), "/");
        assert_eq!(
            served.as_ref().map(|r| r.status).ok(),
            Some(200),
            "{} after the reload: {served:?}",
            path.display()
        );
    }
    server
}

/// Stops `server` with TERM (exit 0) and checks that the socket file systemd activated it with is
/// still there: systemd keeps listening on it for the next start. Returns the server's log.
fn stop_and_check_the_socket_file_is_kept(mut server: Server, path: &Path) -> String {
    server.signal(Signal::SIGTERM);
    assert_eq!(
        server.exit_code_within(Duration::from_secs(30)),
        0,
        "log:\n{}",
        server.log.text()
    );
    let kept = std::fs::symlink_metadata(path)
        .map(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()));
    assert!(
        matches!(kept, Ok(true)),
        "the activated socket's file {} after the stop: {kept:?}; log:\n{}",
        path.display(),
        server.log.text()
    );
    server.log.text()
}
