//! The wire: versioned messages over `SOCK_SEQPACKET` sockets, with file descriptors.
//!
//! One message is one or more packets. Every packet starts with two bytes, the protocol version and
//! a flag byte (bit 0: more packets follow); the body of the message is the concatenation of the
//! packets' bodies, encoded with postcard. Descriptors travel with the first packet (SCM_RIGHTS) and
//! are received with `MSG_CMSG_CLOEXEC`. `MSG_TRUNC` and `MSG_CTRUNC` are checked: a truncated packet
//! is a protocol error, never a silently shortened message.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{self, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};

/// Version of the wire format; a peer of another version is refused.
pub(crate) const VERSION: u8 = 2;
/// Largest body of one packet; larger messages are split (AF_UNIX datagrams are bounded by the
/// socket send buffer, about 200 KiB by default).
const MAX_BODY: usize = 64 * 1024;
/// Largest body of one whole message. A receiver reassembling a message of many packets refuses it
/// past this size (and skips its remaining packets) instead of growing its buffer without bound on
/// a peer's say-so; a sender refuses to send one. Bigger data travels as a descriptor (a memfd).
pub(crate) const MAX_MESSAGE: usize = 64 * 1024 * 1024;
/// Most descriptors one message may carry (the kernel's SCM_MAX_FD is 253).
pub(crate) const MAX_FDS: usize = 200;
const FLAG_MORE: u8 = 1;

/// How long a `run_blocking` caller spins on its answer, and a worker on its next job, before
/// sleeping, when the job is the only one in flight in its pool. A wake-up on another CPU costs
/// ~45 µs on a VM (an IPI and a vCPU exit), ten times the round trip itself: a caller that gets
/// its answer, or a worker that gets its next job, within the budget saves it. Bounded, and only
/// right after a message: an idle pool spins not at all. With several jobs in flight nobody spins
/// (spinners would take the CPU their peers need: measured, it halves throughput). Spinning yields
/// the CPU between tries, so a peer on the same CPU still runs. `TINE_SPAWNER_SPIN_US` overrides
/// it (0: never spin).
const SPIN_DEFAULT_US: u64 = 50;

/// The spin budget: [`SPIN_DEFAULT_US`], or `TINE_SPAWNER_SPIN_US` read once per process.
pub(crate) fn spin_budget() -> Duration {
    static BUDGET: OnceLock<Duration> = OnceLock::new();
    *BUDGET.get_or_init(|| {
        let us = std::env::var("TINE_SPAWNER_SPIN_US")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(SPIN_DEFAULT_US);
        Duration::from_micros(us)
    })
}

/// A job call: the registered name of the job type and its serialized value.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Call {
    /// The stable name the job type was registered under.
    pub job: String,
    /// The job, postcard-encoded; descriptors it holds travel beside the message.
    pub payload: Vec<u8>,
    /// How long the worker spins for its next job after answering this one, in µs (0: it sleeps
    /// at once). The caller decides: only a lone job in flight is worth a spin.
    pub spin_us: u32,
}

/// Caller → worker.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum ToWorker {
    /// Run this job and answer with one [`FromWorker`].
    Run(Call),
}

/// A panic on the job's thread, as the worker's panic hook saw it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PanicReport {
    /// The panic message, with its location.
    pub message: String,
    /// The backtrace, bounded, when backtraces are enabled (`RUST_BACKTRACE`).
    pub backtrace: Option<String>,
}

/// Why a job failed inside a worker that is still able to talk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Failure {
    /// A panic escaped the job's `run`; the worker exits after reporting it.
    Panicked(PanicReport),
    /// The worker could not decode the job.
    Decode(String),
    /// The worker could not encode the job's output.
    Encode(String),
    /// The worker does not know this job type.
    UnknownJob(String),
}

/// Worker → caller.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum FromWorker {
    /// The job's output, postcard-encoded; descriptors travel beside the message.
    Done(Vec<u8>),
    /// The job did not produce an output.
    Failed(Failure),
    /// A panic happened on the job's thread. Not an answer: the job may catch it (a `Done` or
    /// `Failed` follows), or the worker may abort (`panic = "abort"`, a panic while unwinding: the
    /// channel closes), in which case this is the only word of the panic that gets out.
    Panicking(PanicReport),
}

/// Pool (in the user's process) → spawner.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum ToSpawner {
    /// Fork a worker and send back the caller's end of its channel. With a call, the worker runs
    /// that one job (descriptors beside the message) and exits: one-shot mode.
    Spawn {
        /// The job for a one-shot worker.
        one_shot: Option<Call>,
    },
    /// Wait for `pid` to exit (after a SIGKILL if `kill`) and report how it ended.
    Reap {
        /// The worker.
        pid: i32,
        /// Kill it first.
        kill: bool,
    },
    /// The pool is done with `pid`: reap it whenever it exits (after a SIGKILL if `kill`); no reply.
    Release {
        /// The worker.
        pid: i32,
        /// Kill it first.
        kill: bool,
    },
}

/// How a process ended, as `waitpid` told the spawner.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) enum Status {
    /// It exited with this code.
    Exited(i32),
    /// A signal killed it.
    Signaled {
        /// The signal number.
        signal: i32,
        /// Whether it dumped core.
        core: bool,
    },
    /// The spawner could not tell (not its child, or already reaped).
    Unknown,
}

/// Spawner → pool.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum FromSpawner {
    /// The worker runs; the caller's end of its channel is attached.
    Spawned {
        /// Its pid.
        pid: i32,
    },
    /// Forking failed.
    SpawnFailed(String),
    /// The answer to [`ToSpawner::Reap`].
    Reaped {
        /// The worker.
        pid: i32,
        /// How it ended.
        status: Status,
    },
}

/// Encodes a message body.
pub(crate) fn encode<T: Serialize>(msg: &T) -> io::Result<Vec<u8>> {
    postcard::to_stdvec(msg).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Decodes a message body; malformed input is an error, never a panic.
pub(crate) fn decode<'a, T: Deserialize<'a>>(body: &'a [u8]) -> io::Result<T> {
    postcard::from_bytes(body).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("malformed message: {e}"),
        )
    })
}

/// Sends one message, split into packets as needed, with `fds` attached to the first packet.
///
/// Blocking: the peer is known to be reading (a worker waits for a job, a caller for its answer).
/// `MSG_NOSIGNAL` turns a dead peer into `EPIPE` instead of a SIGPIPE.
pub(crate) fn send(fd: BorrowedFd<'_>, body: &[u8], fds: &[RawFd]) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "too many descriptors in one message ({} > {MAX_FDS})",
                fds.len()
            ),
        ));
    }
    if body.len() > MAX_MESSAGE {
        return Err(too_large(body.len()));
    }
    let mut chunks = body.chunks(MAX_BODY).peekable();
    let mut first = true;
    if body.is_empty() {
        return send_packet(fd, &[VERSION, 0], &[], fds);
    }
    while let Some(chunk) = chunks.next() {
        let flags = if chunks.peek().is_some() {
            FLAG_MORE
        } else {
            0
        };
        let attach: &[RawFd] = if first { fds } else { &[] };
        send_packet(fd, &[VERSION, flags], chunk, attach)?;
        first = false;
    }
    Ok(())
}

fn send_packet(fd: BorrowedFd<'_>, header: &[u8; 2], body: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let iov = [IoSlice::new(header), IoSlice::new(body)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    loop {
        match socket::sendmsg::<()>(fd.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(n) if n == header.len() + body.len() => return Ok(()),
            Ok(n) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("short packet: {n} of {} bytes", header.len() + body.len()),
                ))
            }
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// What one receive call produced.
#[derive(Debug)]
pub(crate) enum Received {
    /// A whole message: its body and the descriptors that came with it.
    Message(Vec<u8>, Vec<OwnedFd>),
    /// The peer closed its end (for a worker channel: the worker is gone).
    Eof,
    /// Nothing to read yet (only with `dontwait`).
    WouldBlock,
}

/// Reassembles messages from packets on one socket.
#[derive(Debug)]
pub(crate) struct Receiver {
    scratch: Vec<u8>,
    cmsg: Vec<u8>,
    partial: Vec<u8>,
    fds: Vec<OwnedFd>,
    in_message: bool,
    /// The rest of a refused message's packets are still to come: they are dropped.
    skipping: bool,
}

impl Default for Receiver {
    fn default() -> Self {
        Self::new()
    }
}

impl Receiver {
    /// A receiver with an empty buffer.
    pub(crate) fn new() -> Self {
        Receiver {
            scratch: vec![0; MAX_BODY + 2],
            cmsg: nix::cmsg_space!([RawFd; MAX_FDS]),
            partial: Vec::new(),
            fds: Vec::new(),
            in_message: false,
            skipping: false,
        }
    }

    /// Reads packets until one whole message is in, the peer is gone, or (with `dontwait`) nothing
    /// more is there yet. A message cut by a `WouldBlock` continues on the next call.
    pub(crate) fn recv(&mut self, fd: BorrowedFd<'_>, dontwait: bool) -> io::Result<Received> {
        loop {
            let mut flags = MsgFlags::MSG_CMSG_CLOEXEC;
            if dontwait {
                flags |= MsgFlags::MSG_DONTWAIT;
            }
            let mut iov = [IoSliceMut::new(&mut self.scratch)];
            let msg = match socket::recvmsg::<()>(
                fd.as_raw_fd(),
                &mut iov,
                Some(&mut self.cmsg),
                flags,
            ) {
                Ok(msg) => msg,
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return Ok(Received::WouldBlock),
                // A peer that dies with unread data in its queue resets the connection.
                Err(Errno::ECONNRESET) => return Ok(Received::Eof),
                Err(e) => return Err(e.into()),
            };
            let n = msg.bytes;
            let truncated = msg.flags.contains(MsgFlags::MSG_TRUNC);
            // Take the descriptors first, whatever else is wrong, so that none leaks.
            let mut ctrunc = false;
            let mut got = Vec::new();
            match msg.cmsgs() {
                Ok(cmsgs) => {
                    for c in cmsgs {
                        if let ControlMessageOwned::ScmRights(raw) = c {
                            got.extend(raw.into_iter().map(crate::sys::fd::adopt));
                        }
                    }
                }
                Err(_) => ctrunc = true,
            }
            self.fds.append(&mut got);
            if n == 0 && !self.in_message && self.fds.is_empty() {
                return Ok(Received::Eof);
            }
            if ctrunc || truncated {
                self.reset();
                return Err(bad(if ctrunc {
                    "descriptors were truncated (MSG_CTRUNC)"
                } else {
                    "packet truncated (MSG_TRUNC)"
                }));
            }
            if n < 2 {
                self.reset();
                return Err(bad("packet shorter than its header"));
            }
            if self.scratch[0] != VERSION {
                let v = self.scratch[0];
                self.reset();
                return Err(bad(&format!(
                    "peer speaks wire version {v}, this is version {VERSION}"
                )));
            }
            let more = self.scratch[1] & FLAG_MORE != 0;
            if self.skipping {
                // A packet of a message already refused as too large.
                self.fds.clear();
                self.skipping = more;
                continue;
            }
            if !more && !self.in_message {
                // The common case: a message of one packet.
                let body = self.scratch[2..n].to_vec();
                return Ok(Received::Message(body, std::mem::take(&mut self.fds)));
            }
            if self.partial.len() + (n - 2) > MAX_MESSAGE {
                let len = self.partial.len() + (n - 2);
                self.reset();
                // Give the memory back: a refused message should not keep its buffer.
                self.partial = Vec::new();
                self.skipping = more;
                return Err(too_large(len));
            }
            self.partial.extend_from_slice(&self.scratch[2..n]);
            self.in_message = more;
            if !more {
                let body = std::mem::take(&mut self.partial);
                return Ok(Received::Message(body, std::mem::take(&mut self.fds)));
            }
        }
    }

    /// Tries to receive without sleeping, for up to `budget`, yielding the CPU between tries (a
    /// peer on the same CPU then gets to run); `WouldBlock` if nothing whole came in time.
    pub(crate) fn spin(&mut self, fd: BorrowedFd<'_>, budget: Duration) -> io::Result<Received> {
        if budget.is_zero() {
            return Ok(Received::WouldBlock);
        }
        let until = Instant::now() + budget;
        loop {
            match self.recv(fd, true)? {
                Received::WouldBlock if Instant::now() < until => std::thread::yield_now(),
                received => return Ok(received),
            }
        }
    }

    fn reset(&mut self) {
        self.partial.clear();
        self.fds.clear();
        self.in_message = false;
    }
}

fn too_large(len: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("message over the wire's limit ({len} > {MAX_MESSAGE} bytes)"),
    )
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// Property-based fuzzing (proptest; `PROPTEST_CASES` raises the case count): any message body
/// decodes to a message or an error, and any packets a peer sends are reassembled or refused,
/// never a panic; whole messages of any size arrive intact.
#[cfg(test)]
mod fuzz {
    use super::*;
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    use proptest::prelude::*;
    use std::os::fd::AsFd;

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap()
    }

    /// Packets a peer might send: raw bytes, or this version's header with any flags and body.
    fn packet() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..64),
            (any::<u8>(), prop::collection::vec(any::<u8>(), 0..256)).prop_map(|(flags, body)| {
                let mut p = vec![VERSION, flags];
                p.extend(body);
                p
            }),
        ]
    }

    proptest! {
        #[test]
        fn any_body_is_a_message_or_an_error(body in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<Call>(&body);
            let _ = decode::<ToWorker>(&body);
            let _ = decode::<FromWorker>(&body);
            let _ = decode::<ToSpawner>(&body);
            let _ = decode::<FromSpawner>(&body);
        }

        #[test]
        fn any_packets_are_reassembled_or_refused(packets in prop::collection::vec(packet(), 1..12)) {
            let (tx, rx) = pair();
            let mut receiver = Receiver::new();
            for p in &packets {
                let iov = [IoSlice::new(p)];
                socket::sendmsg::<()>(tx.as_raw_fd(), &iov, &[], MsgFlags::empty(), None).unwrap();
                loop {
                    match receiver.recv(rx.as_fd(), true) {
                        Ok(Received::WouldBlock) | Ok(Received::Eof) | Err(_) => break,
                        Ok(Received::Message(body, fds)) => {
                            prop_assert!(fds.is_empty());
                            let _ = decode::<FromWorker>(&body);
                        }
                    }
                }
            }
            // Whatever came before, a peer that closes is seen as gone.
            drop(tx);
            let mut seen_eof = false;
            for _ in 0..3 {
                if matches!(receiver.recv(rx.as_fd(), true), Ok(Received::Eof)) {
                    seen_eof = true;
                    break;
                }
            }
            prop_assert!(seen_eof);
        }

        #[test]
        fn whole_messages_of_any_size_arrive_intact(
            len in prop_oneof![0..16usize, 0..(3 * MAX_BODY), Just(MAX_BODY), Just(2 * MAX_BODY + 1)],
            seed in any::<u8>(),
        ) {
            // Bytes made from a seed: a random vector this long per case is slow to generate.
            let output: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect();
            let (tx, rx) = pair();
            let body = encode(&FromWorker::Done(output.clone())).unwrap();
            // The socket buffer holds a few packets; send from a thread while this one reads.
            let sender = std::thread::spawn(move || send(tx.as_fd(), &body, &[]));
            let mut receiver = Receiver::new();
            let got = receiver.recv(rx.as_fd(), false).unwrap();
            sender.join().unwrap().unwrap();
            match got {
                Received::Message(body, fds) => {
                    prop_assert!(fds.is_empty());
                    match decode::<FromWorker>(&body).unwrap() {
                        FromWorker::Done(out) => prop_assert_eq!(out, output),
                        other => prop_assert!(false, "{:?}", other),
                    }
                }
                other => prop_assert!(false, "{:?}", other),
            }
        }
    }

    /// A peer that sends a message of many packets past [`MAX_MESSAGE`] gets it refused before the
    /// receiver holds more than the limit, its remaining packets are skipped, and the next
    /// message on the same socket arrives whole.
    #[test]
    fn a_message_past_the_limit_is_refused_and_the_next_one_arrives() {
        let (tx, rx) = pair();
        let sender = std::thread::spawn(move || {
            let chunk = vec![7u8; MAX_BODY];
            let packets = MAX_MESSAGE / MAX_BODY + 2;
            for i in 0..packets {
                let flags = if i + 1 < packets { FLAG_MORE } else { 0 };
                send_packet(tx.as_fd(), &[VERSION, flags], &chunk, &[]).unwrap();
            }
            let next = encode(&FromWorker::Done(b"after".to_vec())).unwrap();
            send(tx.as_fd(), &next, &[]).unwrap();
            tx
        });
        let mut receiver = Receiver::new();
        let err = receiver.recv(rx.as_fd(), false).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        assert!(err.to_string().contains("limit"), "{err}");
        match receiver.recv(rx.as_fd(), false).unwrap() {
            Received::Message(body, _) => match decode::<FromWorker>(&body).unwrap() {
                FromWorker::Done(out) => assert_eq!(out, b"after"),
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
        let _tx = sender.join().unwrap();
        // And nobody sends one.
        let (tx, _rx) = pair();
        let err = send(tx.as_fd(), &vec![0; MAX_MESSAGE + 1], &[]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    }
}
