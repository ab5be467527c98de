//! The messages between the monitor and its children.
//!
//! One message per `SOCK_SEQPACKET` packet: a little-endian `u16` format version, then the
//! message in postcard's compact binary encoding. A packet of another version is never parsed:
//! the receiver retires that peer instead (see DESIGN.md, reload).

use serde::{Deserialize, Serialize};

/// The wire format version of [`Command`] and [`Report`].
pub const WIRE_VERSION: u16 = 2;

/// What the monitor tells a child.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// To a mold: fork worker `nr` of your generation; its channel travels with this message.
    SpawnWorker {
        /// Worker number.
        nr: u32,
        /// Scoreboard slot the worker writes.
        slot: u32,
        /// Identifies this request (a slot can be reused before a late report of the last one).
        request: u64,
    },
    /// To a worker or mold: stop. Graceful: finish in-flight requests first.
    Stop {
        /// Drain first (true) or exit at once (false).
        graceful: bool,
    },
    /// To a worker or mold: the log file was reopened; its new descriptor comes with this
    /// message and replaces stdout and stderr.
    ReopenLogs,
    /// To a worker: become the mold of `generation`.
    Promote {
        /// The new generation.
        generation: u32,
        /// The scoreboard slot the new mold writes.
        slot: u32,
    },
    /// To a worker (`tine ctl profile`): profile for `seconds` (capped by `profile_max_seconds`),
    /// then write the flamegraph and report [`Report::ProfileWritten`]. Appended after the
    /// others, so every earlier message keeps its encoding.
    Profile {
        /// How long.
        seconds: u32,
    },
    /// To a mold: fork a hot spare of your generation, a worker that boots, reports `Ready` and
    /// accepts nothing until [`Command::Activate`]; its channel travels with this message. Sent
    /// only to molds of a build that knows it (appended after the others, so that they keep their
    /// encoding).
    SpawnSpare {
        /// Scoreboard slot the spare writes.
        slot: u32,
        /// Identifies this request, like [`Command::SpawnWorker`]'s.
        request: u64,
    },
    /// To a hot spare: start accepting now, as worker `nr`. The listening sockets travel with
    /// this message, in the order of the spare's listeners: a spare drops its own references
    /// while it stands by, so that it can neither accept nor keep a socket open that the rest of
    /// the tree has closed (a stop would then reset what is queued).
    Activate {
        /// The worker number it takes.
        nr: u32,
    },
    /// To a hot spare, just before its [`Command::Activate`], when its listening sockets are more
    /// than one packet carries: the first of them (a packet carries at most 8), in order; the
    /// `Activate` that follows carries the rest. Appended after the others, so that they keep
    /// their encoding.
    ListeningSockets,
}

/// How a worker's [`Report::Exiting`] reason starts when its tokio runtime could not be built:
/// the monitor tells a lack of resources there (`… (os error 11)`) from a real failure by it.
pub const RUNTIME_BUILD_FAILED: &str = "cannot build the runtime: ";

/// What a child tells the monitor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Report {
    /// First message of a new process on its channel.
    Hello {
        /// Its pid.
        pid: i32,
    },
    /// The process is ready: a mold can fork, a worker serves.
    Ready,
    /// From a mold: worker `nr` was forked with this pid (and, as a descriptor, a pidfd for it).
    Spawned {
        /// Scoreboard slot of the request.
        slot: u32,
        /// The request this answers.
        request: u64,
        /// The new worker's pid.
        pid: i32,
    },
    /// From a mold: the fork of the worker in `slot` failed.
    SpawnFailed {
        /// Scoreboard slot of the request.
        slot: u32,
        /// The request this answers.
        request: u64,
        /// Why.
        error: String,
    },
    /// From a process about to exit on purpose, with the reason (a worker whose runtime could
    /// not be built starts it with [`RUNTIME_BUILD_FAILED`], followed by the `io::Error`).
    Exiting {
        /// Why.
        reason: String,
    },
    /// From a worker being promoted: it could not become a mold and stays a worker (or exits).
    PromotionFailed {
        /// Why.
        reason: String,
    },
    /// From a worker: a profile started (`SIGUSR2` or [`Command::Profile`]); it stops by itself
    /// after `seconds` at the latest.
    ProfileStarted {
        /// The longest it runs.
        seconds: u32,
    },
    /// From a worker: the profile stopped and its flamegraph was written.
    ProfileWritten {
        /// The SVG file (absolute); the folded stacks are beside it (`.folded`).
        svg: String,
        /// Samples in it.
        samples: u64,
    },
    /// From a worker: the profile stopped but could not be written, or could not start.
    ProfileFailed {
        /// Why.
        error: String,
        /// A profile (started earlier) is still running.
        still_running: bool,
    },
    /// From a worker: its profiler thread runs, so it takes [`Command::Profile`] (a worker of an
    /// older tine, adopted across a reload, never says so and is never sent one).
    ProfilerReady,
}

/// Why a packet could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Too short to hold a version.
    #[error("packet of {0} bytes is too short")]
    Short(usize),
    /// Another format version.
    #[error("wire version {0} (this build speaks {WIRE_VERSION})")]
    Version(u16),
    /// Not a valid message of this version.
    #[error("malformed message: {0}")]
    Malformed(#[from] postcard::Error),
}

/// Encodes a message as one packet.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut out = WIRE_VERSION.to_le_bytes().to_vec();
    // Serializing these plain enums into a Vec cannot fail.
    out.extend(postcard::to_stdvec(msg).unwrap_or_default());
    out
}

/// Decodes one packet.
pub fn decode<'a, T: Deserialize<'a>>(packet: &'a [u8]) -> Result<T, DecodeError> {
    if packet.len() < 2 {
        return Err(DecodeError::Short(packet.len()));
    }
    let version = u16::from_le_bytes([packet[0], packet[1]]);
    if version != WIRE_VERSION {
        return Err(DecodeError::Version(version));
    }
    Ok(postcard::from_bytes(&packet[2..])?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_garbage() {
        let msg = Command::SpawnWorker {
            nr: 3,
            slot: 7,
            request: 11,
        };
        assert_eq!(decode::<Command>(&encode(&msg)).unwrap(), msg);
        assert!(matches!(
            decode::<Command>(&[1]),
            Err(DecodeError::Short(1))
        ));
        assert!(matches!(
            decode::<Command>(&[9, 0, 0]),
            Err(DecodeError::Version(9))
        ));
        let [lo, hi] = WIRE_VERSION.to_le_bytes();
        let garbage = [lo, hi, 200, 200, 200];
        assert!(matches!(
            decode::<Report>(&garbage),
            Err(DecodeError::Malformed(_))
        ));
    }
}

/// Property-based fuzzing (proptest; `PROPTEST_CASES` raises the case count): any packet from a
/// peer decodes to a message or a [`DecodeError`], never a panic.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    fn command() -> impl Strategy<Value = Command> {
        prop_oneof![
            (any::<u32>(), any::<u32>(), any::<u64>())
                .prop_map(|(nr, slot, request)| Command::SpawnWorker { nr, slot, request }),
            any::<bool>().prop_map(|graceful| Command::Stop { graceful }),
            Just(Command::ReopenLogs),
            (any::<u32>(), any::<u32>())
                .prop_map(|(generation, slot)| Command::Promote { generation, slot }),
            any::<u32>().prop_map(|seconds| Command::Profile { seconds }),
            (any::<u32>(), any::<u64>())
                .prop_map(|(slot, request)| Command::SpawnSpare { slot, request }),
            any::<u32>().prop_map(|nr| Command::Activate { nr }),
            Just(Command::ListeningSockets),
        ]
    }

    fn report() -> impl Strategy<Value = Report> {
        prop_oneof![
            any::<i32>().prop_map(|pid| Report::Hello { pid }),
            Just(Report::Ready),
            (any::<u32>(), any::<u64>(), any::<i32>())
                .prop_map(|(slot, request, pid)| Report::Spawned { slot, request, pid }),
            (any::<u32>(), any::<u64>(), ".*").prop_map(|(slot, request, error)| {
                Report::SpawnFailed {
                    slot,
                    request,
                    error,
                }
            }),
            ".*".prop_map(|reason| Report::Exiting { reason }),
            ".*".prop_map(|reason| Report::PromotionFailed { reason }),
            any::<u32>().prop_map(|seconds| Report::ProfileStarted { seconds }),
            (".*", any::<u64>()).prop_map(|(svg, samples)| Report::ProfileWritten { svg, samples }),
            (".*", any::<bool>()).prop_map(|(error, still_running)| Report::ProfileFailed {
                error,
                still_running
            }),
            Just(Report::ProfilerReady),
        ]
    }

    proptest! {
        #[test]
        fn any_packet_is_a_message_or_an_error(packet in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<Command>(&packet);
            let _ = decode::<Report>(&packet);
        }

        #[test]
        fn any_body_of_this_version_is_a_message_or_an_error(
            body in prop::collection::vec(any::<u8>(), 0..512)
        ) {
            let mut packet = WIRE_VERSION.to_le_bytes().to_vec();
            packet.extend(body);
            let _ = decode::<Command>(&packet);
            let _ = decode::<Report>(&packet);
        }

        #[test]
        fn messages_round_trip_and_survive_mutation(
            c in command(),
            r in report(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            cut in any::<prop::sample::Index>(),
        ) {
            prop_assert_eq!(decode::<Command>(&encode(&c)).unwrap(), c.clone());
            prop_assert_eq!(decode::<Report>(&encode(&r)).unwrap(), r.clone());
            for mut packet in [encode(&c), encode(&r)] {
                for (at, byte) in &flips {
                    let i = at.index(packet.len());
                    packet[i] ^= byte;
                }
                let _ = decode::<Command>(&packet);
                let _ = decode::<Report>(&packet);
                packet.truncate(cut.index(packet.len() + 1));
                let _ = decode::<Command>(&packet);
                let _ = decode::<Report>(&packet);
            }
        }
    }
}
