//! Configuration: every bad case exits 2 with one line naming the key and starts nothing;
//! `tine check`; precedence flag > env > file > default.

mod common;

use std::net::TcpListener;
use std::time::Duration;

use common::*;

/// Runs `launch`, expecting a refusal: exit code 2, exactly one error line and it names `key`,
/// nothing forked, no process left holding the output, no control socket. Returns the line.
fn assert_refused(launch: Launch, key: &str) -> String {
    let done = launch.run(Duration::from_secs(10));
    let stderr = done.stderr_text();
    assert_eq!(
        done.code(),
        Some(2),
        "exit code 2 for a bad config; stderr:\n{stderr}"
    );
    let errors: Vec<&String> = done
        .stderr
        .iter()
        .filter(|l| l.to_ascii_lowercase().contains("error"))
        .collect();
    assert_eq!(
        errors.len(),
        1,
        "one error line, not {}:\n{stderr}",
        errors.len()
    );
    assert!(
        errors[0].contains(key),
        "the error line names {key:?}: {}",
        errors[0]
    );
    for started in ["forked", "tine ready", "starting listen="] {
        assert!(
            !stderr.contains(started),
            "nothing started ({started:?} in the log):\n{stderr}"
        );
    }
    assert!(
        done.pipes_closed,
        "no process of the command is left holding its output"
    );
    assert!(!done.control_socket_exists, "no control socket left behind");
    assert!(
        done.elapsed < Duration::from_secs(5),
        "refused promptly: {:?}",
        done.elapsed
    );
    errors[0].clone()
}

fn serve() -> Launch {
    Launch::tine()
}

#[test]
fn unknown_key_in_the_file() {
    let dir = TempDir::new();
    let file = dir.write("tine.toml", "workers = 1\nbogus_key = 1\n");
    let line = assert_refused(serve().arg("--config").arg(&file), "bogus_key");
    assert!(line.contains("tine.toml"), "names the file: {line}");
}

#[test]
fn bad_values_in_the_file() {
    let dir = TempDir::new();
    for (i, (toml, key)) in [
        ("workers = \"many\"\n", "workers"),
        ("graceful_timeout = \"soon\"\n", "graceful_timeout"),
        ("listen = [\"nowhere\"]\n", "listen"),
        ("reload_strategy = \"sideways\"\n", "reload_strategy"),
        ("refork_after = [10, true]\n", "refork_after"),
        ("workers = -3\n", "workers"),
        ("nodelay = \"yes\"\n", "nodelay"),
    ]
    .into_iter()
    .enumerate()
    {
        let file = dir.write(&format!("bad{i}.toml"), toml);
        assert_refused(serve().arg("--config").arg(&file), key);
    }
}

#[test]
fn file_that_is_not_toml_or_missing() {
    let dir = TempDir::new();
    let file = dir.write("broken.toml", "workers = \n[[[\n");
    assert_refused(serve().arg("--config").arg(&file), "broken.toml");
    assert_refused(
        serve().arg("--config").arg(dir.join("missing.toml")),
        "missing.toml",
    );
}

#[test]
fn bad_flag_values() {
    for (args, key) in [
        (&["--workers", "abc"][..], "--workers"),
        (&["--listen", "nowhere"], "--listen"),
        (&["--graceful-timeout", "soon"], "--graceful-timeout"),
        (&["--reload-strategy", "sideways"], "--reload-strategy"),
        (&["--no-such-flag"], "--no-such-flag"),
    ] {
        assert_refused(serve().args(args), key);
    }
}

#[test]
fn bad_values_in_the_environment() {
    for (var, value, key) in [
        ("TINE_WORKERS", "abc", "workers"),
        ("TINE_GRACEFUL_TIMEOUT", "soon", "graceful"),
        ("TINE_LISTEN", "nowhere", "listen"),
    ] {
        let line = assert_refused(serve().env(var, value), key);
        assert!(line.contains(value), "names the value {value:?}: {line}");
    }
}

#[test]
fn values_out_of_range() {
    for (args, key) in [
        (&["--workers", "5", "--max-workers", "2"][..], "workers"),
        (&["--workers", "0"], "workers"),
        (&["--max-workers", "0"], "max_workers"),
        (&["--app", "nope"], "app"),
        (&["--header-read-timeout", "0"], "header_read_timeout"),
        (&["--max-header-bytes", "100"], "max_header_bytes"),
        (&["--unix-mode", "999"], "unix_mode"),
        (&["--worker-threads", "0"], "worker_threads"),
        (
            &["--http2-max-concurrent-streams", "0"],
            "http2_max_concurrent_streams",
        ),
        (
            &["--http2-keepalive-timeout", "0"],
            "http2_keepalive_timeout",
        ),
        (
            &["--http2-initial-stream-window", "2147483648"],
            "http2_initial_stream_window",
        ),
        (
            &["--http2-initial-connection-window", "0"],
            "http2_initial_connection_window",
        ),
        (&["--http2-max-frame-size", "1000"], "http2_max_frame_size"),
        (
            &["--http2-max-frame-size", "16777216"],
            "http2_max_frame_size",
        ),
        (&["--log-level", "not a [filter"], "log_level"),
    ] {
        assert_refused(serve().args(args), key);
    }
}

#[test]
fn static_app_needs_an_existing_root() {
    assert_refused(serve().args(["--app", "static"]), "root");
    let dir = TempDir::new();
    assert_refused(
        serve()
            .args(["--app", "static", "--root"])
            .arg(dir.join("missing")),
        "root",
    );
    let file = dir.write("file.txt", "not a dir");
    assert_refused(
        serve().args(["--app", "static", "--root"]).arg(&file),
        "root",
    );
}

#[test]
fn port_in_use() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let line = assert_refused(serve().args(["--listen", &addr]), &addr);
    assert!(
        line.to_ascii_lowercase().contains("in use"),
        "says why: {line}"
    );
    // Also when it is the second listener: the first one, already bound, is released.
    let first = free_port();
    let first_addr = format!("127.0.0.1:{first}");
    assert_refused(
        serve().args(["--listen", &first_addr, "--listen", &addr]),
        &addr,
    );
    TcpListener::bind(&first_addr).expect("the first listener's port was released");
}

#[test]
fn unix_listener_path_that_is_not_a_socket() {
    let dir = TempDir::new();
    let file = dir.write("regular-file", "keep me");
    let listen = format!("unix:{}", file.display());
    assert_refused(
        serve().args(["--listen", &listen]),
        &file.display().to_string(),
    );
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        "keep me",
        "the file is left alone"
    );
}

#[test]
fn control_socket_of_a_running_server() {
    let first = serve().args(["--workers", "1"]).start();
    let line = assert_refused(
        serve()
            .args(["--workers", "1"])
            .arg("--control-socket")
            .arg(&first.control_socket),
        "control socket",
    );
    assert!(
        line.contains(&first.control_socket.display().to_string()),
        "{line}"
    );
    // The running server is untouched.
    assert_eq!(first.get("/").status, 200);
    first
        .ctl(&["status"])
        .expect("its control socket still answers");
}

#[test]
fn check_accepts_a_good_config_and_starts_nothing() {
    let dir = TempDir::new();
    let file = dir.write(
        "good.toml",
        r#"
listen = ["127.0.0.1:0", "unix:/tmp/tine-check-never-bound.sock"]
workers = 3
max_workers = 8
graceful_timeout = "1500ms"
header_read_timeout = 2.5
timeout = "1m"
refork_after = [50, 100, false]
reload_strategy = "retire-first"
log_format = "json"
nodelay = false
unix_mode = "600"
"#,
    );
    // A port in use does not fail `check`: it validates, it does not bind (a reload's preflight
    // runs it while the old server holds the port).
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let done = Launch::tine()
        .subcommand(Some("check"))
        .arg("--config")
        .arg(&file)
        .args(["--listen", &taken.local_addr().unwrap().to_string()])
        .run(Duration::from_secs(10));
    assert_eq!(done.code(), Some(0), "{}", done.stderr_text());
    assert!(
        done.stdout_text().starts_with("configuration ok"),
        "{}",
        done.stdout_text()
    );
    assert!(!done.control_socket_exists);
    assert!(!std::path::Path::new("/tmp/tine-check-never-bound.sock").exists());
    assert!(done.pipes_closed);
    let done = Launch::tine()
        .subcommand(Some("check"))
        .args(["--app", "static", "--root"])
        .arg(dir.path())
        .run(Duration::from_secs(10));
    assert_eq!(done.code(), Some(0), "{}", done.stderr_text());
}

#[test]
fn check_refuses_bad_configs() {
    let check = || Launch::tine().subcommand(Some("check"));
    assert_refused(check().args(["--app", "static"]), "root");
    assert_refused(
        check().args(["--workers", "9", "--max-workers", "4"]),
        "workers",
    );
    let dir = TempDir::new();
    let file = dir.write("bad.toml", "bogus = true\n");
    assert_refused(check().arg("--config").arg(&file), "bogus");
    assert_refused(check().env("TINE_WORKERS", "lots"), "workers");
}

/// The worker target a started server reports.
fn target(server: &Server) -> u64 {
    server.status()["target"].as_u64().expect("target")
}

#[test]
fn precedence_is_flag_then_env_then_file_then_default() {
    let dir = TempDir::new();
    let file = dir.write("tine.toml", "workers = 1\nmax_workers = 8\n");
    let with_file = || serve().arg("--config").arg(&file);
    assert_eq!(target(&with_file().start()), 1, "file over default");
    assert_eq!(
        target(&with_file().env("TINE_WORKERS", "2").start()),
        2,
        "env over file"
    );
    assert_eq!(
        target(
            &with_file()
                .env("TINE_WORKERS", "2")
                .args(["--workers", "3"])
                .start()
        ),
        3,
        "flag over env"
    );
    // TINE_CONFIG names the file too; max_workers from the file bounds a flag.
    let server = serve()
        .env("TINE_CONFIG", &file)
        .args(["--workers", "8"])
        .start();
    assert_eq!(target(&server), 8);
    drop(server);
    assert_refused(with_file().args(["--workers", "9"]), "workers");
    // Defaults: one worker per CPU (bounded by max_workers).
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(64) as u64;
    assert_eq!(target(&serve().start()), cpus);
}

#[test]
fn listen_address_from_file_and_env() {
    let dir = TempDir::new();
    let sock = dir.join("from-file.sock");
    let file = dir.write(
        "tine.toml",
        format!("listen = [\"unix:{}\"]\nworkers = 1\n", sock.display()),
    );
    let server = serve()
        .no_default_listen()
        .arg("--config")
        .arg(&file)
        .start();
    assert_eq!(server.addrs(), [Addr::Unix(sock.clone())]);
    assert_eq!(server.get("/").status, 200);
    drop(server);
    let sock2 = dir.join("from-env.sock");
    let server = serve()
        .no_default_listen()
        .arg("--config")
        .arg(&file)
        .env("TINE_LISTEN", format!("unix:{}", sock2.display()))
        .start();
    assert_eq!(server.addrs(), [Addr::Unix(sock2)], "env over file");
    assert_eq!(server.get("/").status, 200);
}

#[test]
fn boolean_flags_take_an_optional_value() {
    let server = serve().args(["--workers", "1", "--debug-headers"]).start();
    assert!(
        server.get("/").worker().is_some(),
        "--debug-headers alone turns it on"
    );
    drop(server);
    let server = serve()
        .args(["--workers", "1", "--debug-headers", "false"])
        .start();
    assert_eq!(
        server.get("/").worker(),
        None,
        "--debug-headers false turns it off"
    );
    drop(server);
    let server = serve()
        .args(["--workers", "1"])
        .env("TINE_DEBUG_HEADERS", "true")
        .start();
    assert!(
        server.get("/").worker().is_some(),
        "TINE_DEBUG_HEADERS=true"
    );
}
