//! Property-based fuzzing of the parsers that take input from outside the process: the config
//! file and flags (any TOML: a one-line error and exit code 2, never a panic) and the control
//! socket (any bytes: an `ERR` reply, never a dead monitor). The channel codec, the reload
//! handover reader and the spawner's wire format are fuzzed by unit tests next to them
//! (`cargo test --lib fuzz`).
//!
//! Case counts are small so the suite stays fast; `PROPTEST_CASES=N` raises them for a longer
//! run (CONTRIBUTING.md).

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use common::*;
use proptest::prelude::*;
use proptest::strategy::ValueTree as _;
use proptest::test_runner::{Config as RunnerConfig, TestRunner};

/// Cases per property, unless `PROPTEST_CASES` says otherwise.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Every key the config file takes, from the table of docs/CONFIG.md (so a new key is fuzzed as
/// soon as it is documented).
fn config_keys() -> Vec<String> {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/CONFIG.md"))
        .expect("docs/CONFIG.md");
    let keys: Vec<String> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .filter(|k| k.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .map(str::to_string)
        .collect();
    assert!(keys.len() > 30, "the key table of docs/CONFIG.md: {keys:?}");
    keys
}

/// A TOML basic string holding `s` exactly.
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A TOML float (TOML spells NaN and infinities `nan`, `inf`, `-inf`).
fn toml_float(f: f64) -> String {
    match f {
        f if f.is_nan() => "nan".into(),
        f if f.is_infinite() => (if f > 0.0 { "inf" } else { "-inf" }).into(),
        f => format!("{f:e}"),
    }
}

/// TOML values of every type, with the extremes that break naive conversions.
fn toml_value() -> impl Strategy<Value = String> {
    let scalar = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        prop_oneof![
            Just(i64::MAX),
            Just(i64::MIN),
            Just(0),
            Just(-1),
            Just(1 << 32),
            Just(4097)
        ]
        .prop_map(|n| n.to_string()),
        any::<f64>().prop_map(toml_float),
        prop_oneof![
            Just("1e300"),
            Just("-1.5"),
            Just("nan"),
            Just("inf"),
            Just("-inf"),
            Just("-0.0"),
            Just("5e-324"),
            Just("1.8446744073709552e19")
        ]
        .prop_map(str::to_string),
        any::<bool>().prop_map(|b| b.to_string()),
        ".{0,40}".prop_map(|s| toml_string(&s)),
        prop_oneof![
            Just("30s"),
            Just("500ms"),
            Just("1e300"),
            Just("99999999999999999999h"),
            Just("-1s"),
            Just("0x10"),
            Just("777"),
            Just("0o777"),
            Just("50,100,false"),
            Just("true"),
            Just("")
        ]
        .prop_map(toml_string),
    ];
    scalar.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
            prop::collection::vec(("[a-z_]{1,8}", inner), 0..3).prop_map(|kv| {
                let fields: Vec<String> =
                    kv.into_iter().map(|(k, v)| format!("{k} = {v}")).collect();
                format!("{{ {} }}", fields.join(", "))
            }),
        ]
    })
}

/// Values of keys whose arbitrary strings would reach the network or a user database: a fixed
/// pool of good and bad ones (a random host name would be looked up in DNS).
fn special_value(key: &str) -> Option<BoxedStrategy<String>> {
    let pool: &[&str] = match key {
        "listen" | "metrics_listen" => &[
            "\"127.0.0.1:0\"",
            "[\"127.0.0.1:0\", \"unix:/tmp/tine-fuzz.sock\"]",
            "\"unix:\"",
            "\"[::1]:99999\"",
            "\"127.0.0.1\"",
            "\"localhost:0\"",
            "[]",
            "7",
        ],
        "user" | "group" => &[
            "\"root\"",
            "\"0\"",
            "\"no-such-user-tine\"",
            "\"4294967295\"",
            "1",
        ],
        _ => return None,
    };
    Some(
        proptest::sample::select(pool)
            .prop_map(str::to_string)
            .boxed(),
    )
}

/// A config file: known keys (and some unknown ones) with arbitrary values, or raw text.
fn config_file(keys: Vec<String>) -> impl Strategy<Value = String> {
    let mut names = keys;
    names.extend(["no_such_key", "Workers", "workers "].map(str::to_string));
    let entry = proptest::sample::select(names).prop_flat_map(|key| {
        let value = special_value(&key).unwrap_or_else(|| toml_value().boxed());
        value.prop_map(move |v| {
            let k = if key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                key.clone()
            } else {
                toml_string(&key)
            };
            format!("{k} = {v}")
        })
    });
    prop_oneof![
        // Deserialization stops at the first bad entry: one entry alone reaches every key's
        // own checks most often.
        4 => entry.clone(),
        4 => prop::collection::vec(entry, 0..6).prop_map(|lines| lines.join("\n")),
        1 => ".{0,80}",
    ]
}

/// One line, no panic: parsing any config file and validating it gives a config or one error
/// line (what `tine check` and `serve` print before exiting 2).
#[test]
fn any_config_file_gives_a_config_or_one_error_line() {
    let dir = TempDir::new();
    let path = dir.join("fuzz.toml");
    let check = |text: &str| -> Result<(), TestCaseError> {
        std::fs::write(&path, text).unwrap();
        match tine::config::Options::from_file(&path).and_then(|o| o.resolve()) {
            Err(e) => {
                let message = e.to_string();
                prop_assert!(!message.contains('\n'), "{text:?} → {message:?}");
                prop_assert!(!message.is_empty());
            }
            Ok(c) => {
                // Every accepted duration can be added to the clock without overflow.
                for d in [
                    c.graceful_timeout,
                    c.header_read_timeout,
                    c.spawn_timeout,
                    c.timeout,
                    c.timeout_cleanup,
                    c.request_timeout,
                    c.max_lifetime,
                ] {
                    prop_assert!(d <= tine::config::Seconds::MAX, "{text:?} → {d:?}");
                    prop_assert!(std::time::Instant::now().checked_add(d).is_some());
                }
            }
        }
        Ok(())
    };
    // Found by this test on the old main: a float too large for a Duration panicked; an integer
    // near i64::MAX was accepted, then overflowed the clock when added to an Instant.
    for text in ["timeout = 1e300", "graceful_timeout = 9223372036854775807"] {
        check(text).unwrap();
    }
    let mut runner = TestRunner::new(RunnerConfig::with_cases(cases(512)));
    runner
        .run(&config_file(config_keys()), |text| check(&text))
        .unwrap();
}

/// The same through the binary, for a bounded number of files: `tine check` exits 0, or 2 with
/// exactly one line on stderr. Never 101 (a panic).
#[test]
fn tine_check_exits_0_or_2_with_one_line() {
    let dir = TempDir::new();
    let path = dir.join("fuzz.toml");
    let mut runner = TestRunner::new(RunnerConfig::with_cases(cases(24)));
    let mut files = vec![
        // Found by this test: a float too large for a Duration panicked (exit 101).
        "timeout = 1e300".to_string(),
        // Accepted, then overflowed the clock when added to an Instant.
        "graceful_timeout = 9223372036854775807".to_string(),
    ];
    let strategy = config_file(config_keys());
    for _ in 0..runner.config().cases {
        files.push(strategy.new_tree(&mut runner).unwrap().current());
    }
    for text in files {
        std::fs::write(&path, &text).unwrap();
        let out = Launch::tine()
            .subcommand(Some("check"))
            .no_default_listen()
            .no_default_control_socket()
            .arg("--config")
            .arg(&path)
            .run(Duration::from_secs(20));
        let stderr = out.stderr_text();
        match out.code() {
            Some(0) => {}
            Some(2) => assert!(
                stderr.lines().count() == 1 && stderr.starts_with("tine: error: "),
                "{text:?}: exit 2 with {stderr:?}"
            ),
            other => panic!("{text:?}: exit {other:?}, stderr {stderr:?}"),
        }
    }
}

/// Durations and refork lists given as flags (`--timeout 1e300`) go through the same `FromStr`.
#[test]
fn duration_and_list_flags_never_panic() {
    let mut runner = TestRunner::new(RunnerConfig::with_cases(cases(2048)));
    let text = prop_oneof![
        "[0-9.e+-]{0,30}(ms|s|m|h|)",
        ".{0,30}",
        "[0-9,false ]{0,30}",
        any::<f64>().prop_map(|f| format!("{f}")),
        any::<u64>().prop_map(|n| format!("{n}h")),
    ];
    runner
        .run(&text, |s| {
            if let Ok(d) = tine::config::Seconds::from_str(&s) {
                prop_assert!(d.0 <= tine::config::Seconds::MAX, "{s:?} → {d:?}");
            }
            let _ = tine::config::ReforkAfter::from_str(&s);
            Ok(())
        })
        .unwrap();
}

/// Whether `line` is a valid command (those that change the tree are not garbage: the fuzzing
/// leaves them out).
fn is_real_command(line: &[u8]) -> bool {
    let line = String::from_utf8_lossy(line);
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["stop"] | ["stop", "--quick"] | ["refork"] | ["reload"] | ["reopen-logs"] => true,
        ["status"] | ["status", "--json"] => true,
        ["scale" | "kill-worker", n] => n.parse::<u64>().is_ok(),
        _ => false,
    }
}

/// Any bytes on the control socket get an error reply and leave the monitor serving.
#[test]
fn any_bytes_on_the_control_socket_get_an_error_and_harm_nothing() {
    let server = Launch::tine().args(["--workers", "1"]).start();
    let mut runner = TestRunner::new(RunnerConfig::with_cases(cases(64)));
    let bytes = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..2048),
        // Near misses of real commands.
        (
            proptest::sample::select(vec![
                "status",
                "scale",
                "stop",
                "kill-worker",
                "refork",
                "reopen-logs",
                "reload",
            ]),
            "( [^\n]{0,20}){1,3}"
        )
            .prop_map(|(word, rest)| format!("{word}{rest}\n").into_bytes())
            .prop_filter("a real command", |b| !is_real_command(b)),
    ];
    let replies = std::sync::atomic::AtomicUsize::new(0);
    runner
        .run(&bytes, |payload| {
            let mut stream = UnixStream::connect(&server.control_socket).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            // The server may reply and close before reading everything: a failed write is fine.
            let _ = stream.write_all(&payload);
            let _ = stream.shutdown(std::net::Shutdown::Write);
            let mut reply = Vec::new();
            let _ = stream.read_to_end(&mut reply);
            let reply = String::from_utf8_lossy(&reply);
            prop_assert!(reply.starts_with("ERR "), "{payload:?} → {reply:?}");
            replies.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        })
        .unwrap();
    assert!(replies.into_inner() > 0);
    let status = server
        .ctl(&["status"])
        .expect("ctl status after the garbage");
    assert!(status.contains("worker"), "{status}");
    assert_eq!(server.get("/").status, 200);
}

/// Found by fuzzing: values that `check` accepted made `serve` panic while sizing the scoreboard
/// (`refork_max_unavailable` near `usize::MAX`). Now refused like any bad value: exit 2, one line.
#[test]
fn serve_refuses_what_would_overflow_the_scoreboard() {
    for value in ["9223372036854775807", "18446744073709551615", "65"] {
        let out = Launch::tine()
            .args(["--max-workers", "64", "--refork-max-unavailable", value])
            .run(Duration::from_secs(20));
        let stderr = out.stderr_text();
        assert_eq!(out.code(), Some(2), "{value}: {stderr}");
        assert!(
            stderr.lines().count() == 1 && stderr.contains("refork_max_unavailable"),
            "{value}: {stderr:?}"
        );
    }
}
