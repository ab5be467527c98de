//! What a forked child inherits, black-box (docs/FORK_SAFETY.md): a file and a socket that
//! `preload` keeps open (`examples/preload_descriptors.rs`) are closed in every worker, before and
//! after a refork, and the mold names them in its log; the tree's own descriptors raise no such
//! warning, in the generation-0 mold or in a promoted one.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{poll_until, Launch, Server};

/// What `/proc/PID/fd/*` of `pid` point to.
fn fd_targets(pid: i32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.flatten()
                .filter_map(|entry| std::fs::read_link(entry.path()).ok())
                .map(|target| target.to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The pids of the tree's processes whose `ps` title starts with `prefix`.
fn pids_titled(server: &Server, prefix: &str) -> Vec<i32> {
    server.with_title(prefix).iter().map(|p| p.pid).collect()
}

/// No worker holds `file`, and a request answered by a worker says its copy of the number is closed
/// (or reused, never the file).
fn no_worker_holds(server: &Server, file: &Path, generation: u32) {
    let file = file.to_string_lossy().into_owned();
    let workers = pids_titled(server, "tine worker");
    assert_eq!(workers.len(), 2, "two workers: {workers:?}");
    for pid in workers {
        let targets = fd_targets(pid);
        assert!(
            !targets.contains(&file),
            "gen:{generation} worker {pid} holds {file}: {targets:?}"
        );
    }
    let answer = server.get("/").text();
    assert!(
        answer.starts_with("preload kept descriptors") && !answer.contains(&file),
        "gen:{generation}: {answer}"
    );
}

#[test]
fn descriptors_preload_keeps_are_named_and_closed_in_every_worker() {
    let server = Launch::example("preload_descriptors")
        .args(["--workers", "2"])
        .start();
    let file = server.dir.join("preload-kept.txt");
    let warning = server
        .log
        .wait_for_log("preload left descriptors open", Duration::from_secs(10));
    assert!(
        warning.contains(&*file.to_string_lossy()) && warning.contains("socket:["),
        "the warning names the file and the socket: {warning}"
    );
    server.wait_workers(2, Duration::from_secs(20));
    // The mold, where preload ran, still has the file; no worker has it.
    let molds = pids_titled(&server, "tine mold");
    assert_eq!(molds.len(), 1, "one mold: {molds:?}");
    assert!(fd_targets(molds[0]).contains(&file.to_string_lossy().into_owned()));
    no_worker_holds(&server, &file, 0);

    // A promoted worker holds nothing the app left (its workers had closed it): no warning, and
    // the new generation's workers hold nothing either.
    server.ctl(&["refork"]).expect("ctl refork");
    poll_until(Duration::from_secs(20), || {
        let titled = server.with_title("tine worker[");
        let gen1 = titled
            .iter()
            .filter(|p| p.title.ends_with("(gen:1)"))
            .count();
        (gen1 == 2 && titled.len() == 2).then_some(())
    })
    .unwrap_or_else(|| panic!("gen:1 not serving; log:\n{}", server.log.text()));
    no_worker_holds(&server, &file, 1);
    assert_eq!(
        server.log.count("left descriptors open"),
        1,
        "only preload's warning: {}",
        server.log.text()
    );
}
