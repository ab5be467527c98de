//! The control socket: peer credentials decide who may talk, garbage gets an error reply and the
//! monitor keeps serving, and `status --json` tells the truth about the tree (checked against our
//! own reading of `/proc`).

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// Sends raw bytes to the control socket (then closes our writing half) and returns the reply,
/// read until the server closes (a reset after the reply still leaves it readable).
fn raw_ctl(server: &Server, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(&server.control_socket).expect("connect to the control socket");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(e) if out.is_empty() && !is_closed_error(&e) => {
                panic!("no reply to {} bytes: {e}", bytes.len())
            }
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Pss of one process in KiB, from our own reading of `/proc/PID/smaps_rollup`.
fn pss_kb(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

#[test]
fn a_client_of_another_uid_is_refused_by_the_peer_credential_check() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: running a client as another uid needs root (setpriv)");
        return;
    }
    let server = Launch::tine().args(["--workers", "1"]).start();
    // Open every fence but the server's own check: a traversable directory and a socket anyone
    // may connect to. What refuses `nobody` now can only be the peer-credential check.
    std::fs::set_permissions(server.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mode = std::fs::metadata(&server.control_socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "the server creates its control socket 0600");
    std::fs::set_permissions(
        &server.control_socket,
        std::fs::Permissions::from_mode(0o666),
    )
    .unwrap();

    let mark = server.log.mark();
    let out = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .arg(tine_bin())
        .arg("ctl")
        .arg("--control-socket")
        .arg(&server.control_socket)
        .arg("status")
        .stdin(Stdio::null())
        .output()
        .expect("run setpriv");
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "as nobody: {} / stdout {:?} / stderr {stderr:?}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(out.status.code(), Some(1), "ctl as nobody fails");
    assert!(out.stdout.is_empty(), "no status leaks to another uid");
    // The refusal is the server's own reply (it connected: file permissions let it in).
    assert!(
        stderr.contains(
            "permission denied: only root or the server's owner may use the control socket"
        ),
        "{stderr}"
    );
    let line = server.log.wait_for_log_since(
        mark,
        "refused a client of another user",
        Duration::from_secs(5),
    );
    assert!(
        line.contains("WARN") && line.contains("peer_uid=65534"),
        "{line}"
    );
    // The owner is still served, and the monitor did not stop for it.
    assert!(server
        .ctl(&["status"])
        .expect("ctl as root")
        .contains("monitor"));
    assert_eq!(server.get("/").status, 200);
}

#[test]
fn garbage_on_the_control_socket_gets_an_error_reply_and_the_monitor_keeps_serving() {
    let server = Launch::tine().args(["--workers", "1"]).start();
    let monitor = server.pid;
    let worker = server.wait_workers(1, READY_TIMEOUT)[0];

    // Random bytes (deterministic xorshift), no newline.
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let random: Vec<u8> = (0..700)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("random bytes", random, "ERR "),
        (
            "oversized line",
            vec![b'a'; 64 * 1024],
            "ERR command longer than 1024 bytes",
        ),
        (
            "oversized with newline far away",
            [vec![b's'; 5000], b"\n".to_vec()].concat(),
            "ERR command longer than 1024 bytes",
        ),
        ("empty", Vec::new(), "ERR empty command"),
        ("blank line", b"   \n".to_vec(), "ERR empty command"),
        (
            "not UTF-8",
            b"sta\xff\xfetus\n".to_vec(),
            "ERR command is not UTF-8",
        ),
        ("NUL bytes", b"status\0\0\n".to_vec(), "ERR unknown command"),
        (
            "unknown",
            b"frobnicate --hard\n".to_vec(),
            "ERR unknown command",
        ),
        (
            "scale garbage",
            b"scale -1\n".to_vec(),
            "ERR scale: \"-1\" is not a number",
        ),
        (
            "scale out of range",
            b"scale 100000\n".to_vec(),
            "ERR scale: 100000 is out of range",
        ),
        (
            "kill-worker garbage",
            b"kill-worker x\n".to_vec(),
            "ERR kill-worker: \"x\" is not a worker number",
        ),
        (
            "kill-worker unknown",
            b"kill-worker 77\n".to_vec(),
            "ERR kill-worker: no worker 77",
        ),
        ("two commands", b"status\nstop\n".to_vec(), "OK\n"),
    ];
    for (what, bytes, expected) in &cases {
        let reply = raw_ctl(&server, bytes);
        assert!(
            reply.starts_with(expected),
            "{what}: expected a reply starting {expected:?}, got {reply:?}"
        );
    }
    // "status\nstop\n" ran only its first line: nothing is stopping.
    assert_eq!(server.log.count("stopping"), 0, "{}", server.log.text());

    // Many clients that connect and say nothing: a real call still gets through at once.
    let idle: Vec<UnixStream> = (0..48)
        .map(|_| UnixStream::connect(&server.control_socket).unwrap())
        .collect();
    let status = server.status();
    assert_eq!(status["processes"][0]["pid"].as_i64(), Some(monitor as i64));
    // Half a command, then silence: does not block anyone either.
    let mut half = UnixStream::connect(&server.control_socket).unwrap();
    half.write_all(b"stat").unwrap();
    assert!(server.ctl(&["status"]).is_ok());
    drop(idle);
    drop(half);

    // Nothing was killed, restarted or stopped; the monitor still serves HTTP and the socket.
    assert!(!gone(monitor));
    assert_eq!(
        server.wait_workers(1, READY_TIMEOUT),
        vec![worker],
        "the same worker serves"
    );
    assert_eq!(server.get("/").status, 200);
    assert_eq!(server.log.count("killing"), 0);
    assert!(server.ctl(&["status", "--json"]).is_ok());
}

#[test]
fn status_json_is_complete_and_agrees_with_proc() {
    // A private copy of the binary: its pages are shared only inside this tree, so the PSS of the
    // tree does not move when other tests start and stop their own trees meanwhile.
    let bin_dir = TempDir::new();
    let bin = bin_dir.join("tine");
    std::fs::copy(tine_bin(), &bin).expect("copy the tine binary");
    let server = Launch::program(bin)
        .args(["--workers", "3", "--debug-headers"])
        .start();
    server.wait_workers(3, READY_TIMEOUT);
    server.wait_spare_standing_by(READY_TIMEOUT);
    let report = load(&server.addr(), "/", 3, 40, false, Duration::from_secs(30));
    assert_eq!(report.status(200), 120, "{report:?}");

    let status = server.status();
    let processes = status["processes"].as_array().expect("processes array");
    let roles: Vec<&str> = processes
        .iter()
        .map(|p| p["role"].as_str().unwrap())
        .collect();
    // The hot spare (spare_workers 1 by default) is listed last once it stands by.
    assert_eq!(
        roles,
        ["monitor", "mold", "worker", "worker", "worker", "spare"],
        "{status}"
    );
    for p in processes {
        for key in [
            "role",
            "nr",
            "pid",
            "generation",
            "state",
            "requests",
            "rss_kb",
            "pss_kb",
            "uss_kb",
            "uptime_s",
            "shared_percent",
        ] {
            assert!(p.get(key).is_some(), "{key} missing in {p}");
        }
        let (rss, pss, uss) = (
            p["rss_kb"].as_u64().unwrap(),
            p["pss_kb"].as_u64().unwrap(),
            p["uss_kb"].as_u64().unwrap(),
        );
        assert!(rss > 0 && pss > 0 && uss > 0, "{p}");
        assert!(uss <= pss && pss <= rss, "USS ≤ PSS ≤ RSS: {p}");
        let shared = p["shared_percent"].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&shared), "{p}");
        assert_eq!(p["generation"], 0);
        assert!(p["uptime_s"].as_u64().unwrap() < 300);
    }
    assert_eq!(processes[0]["pid"].as_i64(), Some(server.pid as i64));
    assert!(processes[0]["nr"].is_null() && processes[1]["nr"].is_null());
    assert_eq!(processes[1]["state"], "mold");
    let nrs: Vec<u64> = processes[2..5]
        .iter()
        .map(|p| p["nr"].as_u64().unwrap())
        .collect();
    assert_eq!(nrs, [0, 1, 2]);
    for w in &processes[2..5] {
        assert_eq!(w["state"], "ready", "{w}");
        assert_eq!(w["in_flight"], 0, "{w}");
    }
    // The spare has no number and has served nothing.
    let spare = &processes[5];
    assert!(spare["nr"].is_null(), "{spare}");
    assert_eq!(
        (spare["state"].as_str(), spare["requests"].as_u64()),
        (Some("standby"), Some(0))
    );
    // Requests: every one of ours, counted once (ctl calls are not requests).
    let requests: u64 = processes
        .iter()
        .map(|p| p["requests"].as_u64().unwrap())
        .sum();
    assert_eq!(requests, 120);

    // The pids are exactly the tree's.
    let listed: BTreeSet<i32> = processes
        .iter()
        .map(|p| p["pid"].as_i64().unwrap() as i32)
        .collect();
    let tree: BTreeSet<i32> = server.all_pids().into_iter().collect();
    assert_eq!(
        listed, tree,
        "status lists the monitor and every process under it"
    );

    // The sum of PSS is the tree's memory: compare with our own reading of smaps_rollup.
    let total = status["total_pss_kb"].as_u64().unwrap();
    let summed: u64 = processes
        .iter()
        .map(|p| p["pss_kb"].as_u64().unwrap())
        .sum();
    assert_eq!(total, summed);
    // Ours, read between two status calls that agree (the tree is idle; shared libraries' pages
    // may still be shared with other processes that come and go).
    let agreed = poll_until(Duration::from_secs(10), || {
        let before = server.status()["total_pss_kb"].as_u64().unwrap();
        let ours: u64 = tree
            .iter()
            .map(|pid| pss_kb(*pid).unwrap_or_else(|| panic!("smaps_rollup of {pid}")))
            .sum();
        let after = server.status()["total_pss_kb"].as_u64().unwrap();
        let tolerance = (ours / 20).max(1024);
        eprintln!("total PSS: status {before} and {after} KiB, our reading {ours} KiB");
        (before.abs_diff(ours) <= tolerance && after.abs_diff(ours) <= tolerance).then_some(())
    });
    assert!(
        agreed.is_some(),
        "status and /proc disagree on the tree's PSS (see above)"
    );

    // The text form shows the same tree.
    let text = server.ctl(&["status"]).unwrap();
    for pid in &tree {
        assert!(text.contains(&pid.to_string()), "{pid} missing in:\n{text}");
    }
    assert!(
        text.starts_with("ROLE") && text.contains("PSS_KB") && text.contains("total PSS:"),
        "{text}"
    );
}

/// `tine top`'s `k` asks "kill worker[1] (pid P)?" and then sends the pid it showed: if worker 1
/// is another process by the time the operator says yes, nothing is killed.
#[test]
fn kill_worker_with_a_pid_kills_only_that_process() {
    let server = Launch::tine().args(["--workers", "2"]).start();
    let pids = server.wait_workers(2, Duration::from_secs(20));
    let err = server
        .ctl(&["kill-worker", "1", "--pid", &pids[0].to_string()])
        .unwrap_err();
    assert!(
        err.contains(&format!(
            "worker 1 is pid {} now, not {}; nothing killed",
            pids[1], pids[0]
        )),
        "{err}"
    );
    let err = server.ctl(&["kill-worker", "1", "--pid", "x"]).unwrap_err();
    assert!(err.contains("--pid \"x\" is not a pid"), "{err}");
    assert_eq!(server.wait_workers(2, Duration::from_secs(5)), pids);

    server
        .ctl(&["kill-worker", "1", "--pid", &pids[1].to_string()])
        .expect("kill-worker with the right pid");
    let replaced = poll_until(Duration::from_secs(30), || {
        let now = server.wait_workers(2, Duration::from_secs(30));
        (now[1] != pids[1]).then_some(now)
    })
    .expect("worker 1 replaced");
    assert_eq!(replaced[0], pids[0], "only worker 1 was killed");
}
