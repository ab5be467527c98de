//! The control protocol between `tine ctl` (or `tine top`) and the monitor's control socket:
//! one command line in, one reply out, then the connection closes.
//!
//! A command is one line of UTF-8 text (at most [`MAX_COMMAND`] bytes) ended by `\n`; the reply
//! is `OK\n` and the output, or `ERR message\n`. Both ends live here — the monitor's server
//! (`monitor/control.rs`) and the client ([`super::client`]) — so neither imports the other.

use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Longest command line accepted.
pub(crate) const MAX_COMMAND: usize = 1024;

/// A reply: success with output, or an error message.
pub(crate) type Reply = Result<String, String>;

/// A parsed control command (`reload` is handled by the monitor's loop before this).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Op {
    Status {
        json: bool,
    },
    Scale(usize),
    Stop {
        quick: bool,
    },
    /// `SIGKILL` worker `nr`; with `pid`, only if that is still its pid (a client that showed
    /// the operator a pid to confirm must not kill the worker that replaced it).
    KillWorker {
        nr: u32,
        pid: Option<i32>,
    },
    Refork,
    ReopenLogs,
    /// Profile worker `nr` for `seconds`; answered with the SVG's path (or JSON). With `pid`, only
    /// if that is still its pid (`tine top` profiles the process it showed, never the worker that
    /// took its number since).
    Profile {
        nr: u32,
        pid: Option<i32>,
        seconds: u32,
        json: bool,
    },
}

/// `ctl profile`'s length without `--seconds`.
pub(crate) const DEFAULT_PROFILE_SECONDS: u32 = 10;

/// `profile NR [--pid PID] [--seconds N] [--json]`, the options in any order.
fn parse_profile(args: &[&str]) -> Result<Op, String> {
    const USAGE: &str = "usage: profile NR [--pid PID] [--seconds N] [--json]";
    let Some((nr, mut rest)) = args.split_first() else {
        return Err(USAGE.into());
    };
    let nr = nr
        .parse()
        .map_err(|_| format!("profile: {nr:?} is not a worker number; {USAGE}"))?;
    let (mut seconds, mut json, mut pid) = (DEFAULT_PROFILE_SECONDS, false, None);
    while let Some((word, tail)) = rest.split_first() {
        rest = tail;
        match *word {
            "--json" => json = true,
            "--pid" => {
                let Some((n, tail)) = rest.split_first() else {
                    return Err(format!("profile: --pid needs a pid; {USAGE}"));
                };
                rest = tail;
                pid = Some(
                    n.parse()
                        .map_err(|_| format!("profile: --pid {n:?} is not a pid"))?,
                );
            }
            "--seconds" => {
                let Some((n, tail)) = rest.split_first() else {
                    return Err(format!("profile: --seconds needs a number; {USAGE}"));
                };
                rest = tail;
                seconds = n
                    .parse()
                    .map_err(|_| format!("profile: --seconds {n:?} is not a number of seconds"))?;
            }
            other => return Err(format!("profile: unexpected {other:?}; {USAGE}")),
        }
    }
    Ok(Op::Profile {
        nr,
        pid,
        seconds,
        json,
    })
}

fn parse_worker_nr(nr: &str) -> Result<u32, String> {
    nr.parse()
        .map_err(|_| format!("kill-worker: {nr:?} is not a worker number"))
}

/// Parses one command line; any text gives an [`Op`] or a message for the client.
pub(crate) fn parse(command: &str) -> Result<Op, String> {
    let words: Vec<&str> = command.split_whitespace().collect();
    Ok(match words.as_slice() {
        ["status"] => Op::Status { json: false },
        ["status", "--json"] => Op::Status { json: true },
        ["scale", n] => Op::Scale(n.parse().map_err(|_| format!("scale: {n:?} is not a number"))?),
        ["stop"] => Op::Stop { quick: false },
        ["stop", "--quick"] => Op::Stop { quick: true },
        ["kill-worker", nr] => Op::KillWorker {
            nr: parse_worker_nr(nr)?,
            pid: None,
        },
        ["kill-worker", nr, "--pid", pid] => Op::KillWorker {
            nr: parse_worker_nr(nr)?,
            pid: Some(
                pid.parse()
                    .map_err(|_| format!("kill-worker: --pid {pid:?} is not a pid"))?,
            ),
        },
        ["refork"] => Op::Refork,
        ["reopen-logs"] => Op::ReopenLogs,
        ["profile", args @ ..] => parse_profile(args)?,
        _ => return Err(format!(
            "unknown command {command:?}; expected status [--json], scale N, stop [--quick], kill-worker NR [--pid PID], refork, reload, reopen-logs, profile NR [--pid PID] [--seconds N] [--json]"
        )),
    })
}

/// The command a client received, from what it sent up to the first `\n` (or EOF): the line,
/// trimmed, or why it is refused.
pub(crate) fn decode_command(received: &[u8]) -> Result<String, String> {
    if received.len() > MAX_COMMAND {
        return Err(format!("command longer than {MAX_COMMAND} bytes"));
    }
    let line = received.split(|b| *b == b'\n').next().unwrap_or_default();
    match std::str::from_utf8(line) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        Ok(_) => Err("empty command".into()),
        Err(_) => Err("command is not UTF-8".into()),
    }
}

/// A reply as the server writes it.
pub(crate) fn encode_reply(reply: Reply) -> String {
    match reply {
        Ok(out) => format!("OK\n{out}"),
        Err(e) => format!("ERR {e}\n"),
    }
}

/// Writes a reply and closes the connection, never waiting: a reply (a few KiB) fits in a fresh
/// socket's send buffer, so only a client that sent much more than a command and reads nothing
/// can fill it, and then it loses the rest of its reply, not the monitor its time.
pub(crate) fn send_reply(mut stream: UnixStream, reply: Reply) -> io::Result<()> {
    stream.set_nonblocking(true)?;
    stream.write_all(encode_reply(reply).as_bytes())
}

/// A reply as the client read it (everything up to EOF).
pub(crate) fn decode_reply(received: &[u8]) -> Reply {
    let reply = String::from_utf8_lossy(received);
    if let Some(body) = reply.strip_prefix("OK\n") {
        Ok(body.to_string())
    } else if let Some(err) = reply.strip_prefix("ERR ") {
        Err(err.trim_end().to_string())
    } else {
        Err(format!("unexpected reply: {reply:?}"))
    }
}

/// How long a client waits for the reply to `command`.
pub(crate) fn patience(command: &str) -> Duration {
    let seconds = match parse(command.trim()) {
        // A reload or a refork waits for every worker of the new generation to be ready (preload
        // or promotion, boots, failed starts retried with backoff).
        _ if matches!(command.trim(), "reload" | "refork") => 600,
        // A profile answers once written: its length, then symbolizing (60 s is the monitor's own
        // limit for that).
        Ok(Op::Profile { seconds, .. }) => u64::from(seconds) + 70,
        _ => 10,
    };
    Duration::from_secs(seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_takes_a_pid_among_its_options() {
        assert_eq!(
            parse("profile 2 --seconds 5 --pid 4321 --json"),
            Ok(Op::Profile {
                nr: 2,
                pid: Some(4321),
                seconds: 5,
                json: true
            })
        );
        assert_eq!(
            parse("profile 2"),
            Ok(Op::Profile {
                nr: 2,
                pid: None,
                seconds: DEFAULT_PROFILE_SECONDS,
                json: false
            })
        );
        assert!(parse("profile 2 --pid").is_err_and(|e| e.contains("--pid needs a pid")));
        assert!(parse("profile 2 --pid x").is_err_and(|e| e.contains("not a pid")));
    }
}

/// Property-based fuzzing (proptest; `PROPTEST_CASES` raises the case count): any command text
/// parses to an operation or an error message, never a panic; tests/fuzz.rs sends any bytes
/// through a real control socket.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_text_is_an_op_or_an_error(text in ".{0,200}") {
            if let Err(e) = parse(&text) {
                prop_assert!(!e.is_empty());
            }
        }

        #[test]
        fn near_misses_are_parsed_exactly(
            word in prop::sample::select(vec![
                "status", "scale", "stop", "kill-worker", "refork", "reopen-logs", "reload", "statu",
            ]),
            args in prop::collection::vec("[-a-z0-9]{0,12}|--json|--quick|[0-9]{1,25}", 0..3),
            space in "[ \t]{1,3}",
        ) {
            let text = std::iter::once(word.to_string()).chain(args.clone()).collect::<Vec<_>>().join(&space);
            let args: Vec<&str> = args.iter().map(String::as_str).filter(|a| !a.is_empty()).collect();
            let expected = match (word, args.as_slice()) {
                ("status", []) => Some(Op::Status { json: false }),
                ("status", ["--json"]) => Some(Op::Status { json: true }),
                ("scale", [n]) => n.parse().ok().map(Op::Scale),
                ("stop", []) => Some(Op::Stop { quick: false }),
                ("stop", ["--quick"]) => Some(Op::Stop { quick: true }),
                ("kill-worker", [n]) => n.parse().ok().map(|nr| Op::KillWorker { nr, pid: None }),
                ("refork", []) => Some(Op::Refork),
                ("reopen-logs", []) => Some(Op::ReopenLogs),
                _ => None,
            };
            prop_assert_eq!(parse(&text).ok(), expected, "{:?}", text);
        }
    }
}
