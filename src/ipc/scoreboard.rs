//! The scoreboard: one shared, sealed memfd with a slot per process.
//!
//! The monitor creates it before the first fork; every child inherits the mapping and writes only
//! its own slot; the monitor reads them all. Every word is an atomic, and a slot is published under
//! a sequence counter (odd while being written), so a reader sees a consistent copy or retries.
//! Nothing read from it is trusted: a reader validates every field.
//!
//! In-flight requests: a worker keeps the exact set of its in-flight requests in its own memory
//! (unbounded, process-local) and publishes into its fixed-size slot only what the monitor needs:
//! how many are in flight, and the start, method and path of the *oldest* one. That is what hang
//! detection must see with `worker_threads > 1`: a spinning handler on one thread does not stop
//! the tick on another, but its request keeps getting older, whatever starts after it.
//!
//! The header also holds the tree's counters that must outlive any one process (and survive a
//! re-exec, which hands the memfd over): requests served by processes that have gone, and reforks.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::sys::shm::SharedWords;

/// Format version of the layout below.
pub const SCOREBOARD_VERSION: u64 = 2;
const MAGIC: u64 = u64::from_le_bytes(*b"tinesb\0\0");
const HEADER_WORDS: usize = 8;
// Header word offsets (0..4: magic, version, capacity, slot words).
/// The roster word, first half (a futex word): bumped, and its waiters woken, whenever a worker
/// starts owning its robust word (standing-by spares then watch it too), and by the monitor after
/// it sends a spare a command (the spare then reads its channel).
const H_ROSTER: usize = 7;
/// Requests served by processes whose slot was cleared or reclaimed.
const H_REQUESTS_GONE: usize = 4;
/// Completed reforks (a promoted worker became a mold).
const H_REFORKS: usize = 5;
/// Log lines that some process of the tree failed to write (zero in a scoreboard created by an
/// older version: the word was unused, so the layout version stays).
const H_LOG_DROPPED: usize = 6;
/// A requests counter larger than this in a slot is garbage, not traffic.
const MAX_SANE_REQUESTS: u64 = 1 << 48;
/// Words per slot: 256 bytes, four cache lines.
pub const SLOT_WORDS: usize = 32;
/// Bytes of the in-flight request's method and path kept in a slot.
pub const REQUEST_TEXT_BYTES: usize = 15 * 8;

// Word offsets inside a slot.
const SEQ: usize = 0;
const PID: usize = 1;
const ROLE: usize = 2;
const GENERATION: usize = 3;
const NR: usize = 4;
const STATE: usize = 5;
const HEARTBEAT_MS: usize = 6;
const REQUESTS: usize = 7;
const IN_FLIGHT: usize = 8;
const OLDEST_START_MS: usize = 9;
const FORK_SAFE: usize = 10;
const STARTED_MS: usize = 11;
/// Connections the worker holds (a gauge: added to and taken from by its connection tasks).
const CONNECTIONS: usize = 12;
/// Times the worker stopped accepting because it held `max_connections`.
const ACCEPT_PAUSES: usize = 13;
/// The worker's robust futex word, first half (see `worker::sentinel`): its death-notice thread's
/// id while it is capacity that a spare may replace at once, 0 otherwise; the kernel sets
/// `OWNER_DIED` in it when that thread dies. Second half: the pid of the holder of the worker's
/// memory (`crate::sys::holder`), written by the worker at boot, 0 if it has none (and in a
/// scoreboard of an older version, where the half was unused). Only ever accessed as two
/// `AtomicU32`s.
const OWNER: usize = 14;
/// Whether a spare may take this worker's place without the monitor (written by the monitor;
/// claimed by a spare with a compare-and-swap): see [`Takeover`].
const TAKEOVER: usize = 15;
/// Whether this spare watches the workers' robust words (it says so before it reports ready),
/// whether the monitor lets it take a place on its own, and whether it has been taken (by the
/// monitor's `Activate` or by the spare itself): see [`Scoreboard::take_standby`]. 0: none of
/// these (a spare that cannot watch, or not yet: the monitor never waits for it to claim).
const STANDBY: usize = 31;
const TEXT: usize = 16;

/// The role of the process in a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Slot unused.
    Free = 0,
    /// A mold.
    Mold = 1,
    /// A worker.
    Worker = 2,
}

/// What a process in a slot is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Starting up (boot or preload).
    Booting = 0,
    /// Serving, no request in flight.
    Ready = 1,
    /// Serving at least one request.
    Busy = 2,
    /// Draining before exit.
    Draining = 3,
    /// A mold, ready to fork.
    Mold = 4,
    /// Being promoted to a mold.
    Promoting = 5,
    /// A hot spare: booted, accepting nothing until the monitor activates it.
    Standby = 6,
}

impl State {
    /// The lower-case name used in status output.
    pub fn name(self) -> &'static str {
        match self {
            State::Booting => "booting",
            State::Ready => "ready",
            State::Busy => "busy",
            State::Draining => "draining",
            State::Mold => "mold",
            State::Promoting => "promoting",
            State::Standby => "standby",
        }
    }

    fn from_word(w: u64) -> Option<State> {
        Some(match w {
            0 => State::Booting,
            1 => State::Ready,
            2 => State::Busy,
            3 => State::Draining,
            4 => State::Mold,
            5 => State::Promoting,
            6 => State::Standby,
            _ => return None,
        })
    }
}

/// A consistent copy of one slot, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotView {
    /// Process id written by the owner.
    pub pid: i32,
    /// Generation.
    pub generation: u32,
    /// Worker number.
    pub nr: u32,
    /// State.
    pub state: State,
    /// Last heartbeat, ms on the monotonic clock.
    pub heartbeat_ms: u64,
    /// Requests served.
    pub requests: u64,
    /// Requests in flight.
    pub in_flight: u64,
    /// Start of the oldest tracked request in flight (ms, monotonic), 0 if none.
    pub oldest_start_ms: u64,
    /// Method and path (truncated) of the oldest request in flight; empty if none.
    pub request: String,
    /// Whether the process may be promoted.
    pub fork_safe: bool,
    /// Connections the worker holds.
    pub connections: u64,
    /// Times the worker stopped accepting because it held `max_connections`.
    pub accept_pauses: u64,
}

/// Milliseconds on the system-wide monotonic clock (comparable between processes).
///
/// The coarse clock (a few ms of resolution, read without a system call) is plenty for heartbeats
/// and request ages, and it is read on every request.
pub fn now_ms() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .unwrap_or(nix::sys::time::TimeSpec::new(0, 0));
    ts.tv_sec() as u64 * 1000 + ts.tv_nsec() as u64 / 1_000_000
}

static GLOBAL: std::sync::OnceLock<Scoreboard> = std::sync::OnceLock::new();

/// Installs the process-wide scoreboard (the monitor, before its first fork; children inherit it).
pub fn install(board: Scoreboard) -> &'static Scoreboard {
    let _ = GLOBAL.set(board);
    global()
}

/// The process-wide scoreboard, if one was installed (the server's processes; not `tine ctl`,
/// not the spawner).
pub fn try_global() -> Option<&'static Scoreboard> {
    GLOBAL.get()
}

/// The process-wide scoreboard.
///
/// # Panics
/// If [`install`] was not called first: a programming error, never a run-time condition.
pub fn global() -> &'static Scoreboard {
    GLOBAL
        .get()
        .expect("scoreboard installed by the monitor before the first fork")
}

/// The shared scoreboard.
pub struct Scoreboard {
    mem: SharedWords,
    capacity: usize,
    /// This process's in-flight requests (process-local: each forked process has its own copy,
    /// reset when it claims a slot; only workers use it).
    requests: Mutex<RequestSet>,
}

/// Words of a slot's request text.
const TEXT_WORDS: usize = REQUEST_TEXT_BYTES / 8;

/// The method and path of a request, truncated, NUL-padded, as the slot's words hold it.
type RequestText = [u64; TEXT_WORDS];

/// The exact set of a worker's tracked in-flight requests, oldest first (ids grow with time).
#[derive(Default)]
struct RequestSet {
    next_id: u64,
    /// Sorted by id (ids only grow, so a push keeps the order): the oldest is at the front.
    /// A deque rather than a map: no allocation per request once it has grown.
    tracked: VecDeque<Tracked>,
    /// In flight but not subject to the age check (stream connections).
    untracked: u64,
    /// How many of the slot's text words the text written last used (the others are zero): a
    /// shorter text clears only those, and the common request (`GET /` and the like) writes one
    /// or two words instead of the whole text.
    text_words: usize,
}

/// A tracked request in flight.
struct Tracked {
    id: u64,
    /// When it started (ms, monotonic).
    start: u64,
    /// Its method and path, kept only while an older request is in flight: a request that is the
    /// oldest when it starts has its text written into the slot at once, and stays the oldest
    /// until it ends, so its text is never needed again (nothing is built or kept for it).
    text: Option<RequestText>,
}

impl RequestSet {
    fn in_flight(&self) -> u64 {
        self.tracked.len() as u64 + self.untracked
    }
}

/// Hands `put` each word of the text `method path` (little-endian, truncated to
/// [`REQUEST_TEXT_BYTES`], the last word NUL-padded), in order; returns how many words it has.
///
/// Word by word rather than through a zeroed byte buffer copied into the slot: the common
/// request's text is one or two words, written on every request (`bench/http/instructions.sh`).
fn text_words(method: &str, path: &str, mut put: impl FnMut(usize, u64)) -> usize {
    // `word` holds the `fill` bytes (0..8) of the next word gathered so far.
    let (mut word, mut fill, mut index) = (0u64, 0usize, 0usize);
    for part in [method.as_bytes(), b" ", path.as_bytes()] {
        let mut rest = part;
        while rest.len() >= 8 && index < TEXT_WORDS {
            let (eight, tail) = rest.split_at(8);
            let x = u64::from_le_bytes(eight.try_into().expect("8 bytes"));
            match fill {
                0 => put(index, x),
                _ => {
                    put(index, word | x << (8 * fill));
                    word = x >> (8 * (8 - fill));
                }
            }
            index += 1;
            rest = tail;
        }
        for &b in rest {
            if index == TEXT_WORDS {
                return index;
            }
            word |= u64::from(b) << (8 * fill);
            fill += 1;
            if fill == 8 {
                put(index, word);
                (word, fill, index) = (0, 0, index + 1);
            }
        }
    }
    if fill > 0 && index < TEXT_WORDS {
        put(index, word);
        index += 1;
    }
    index
}

/// How many words [`text_words`] hands over for `method path`.
fn text_word_count_of(method: &str, path: &str) -> usize {
    (method.len() + 1 + path.len())
        .min(REQUEST_TEXT_BYTES)
        .div_ceil(8)
}

/// The text `method path` as [`text_words`] makes it, kept, and how many words it has.
fn request_text(method: &str, path: &str) -> (RequestText, usize) {
    let mut text = [0u64; TEXT_WORDS];
    let words = text_words(method, path, |i, word| text[i] = word);
    (text, words)
}

/// How many words a kept text has (the others are zero).
fn text_word_count(text: &RequestText) -> usize {
    text.iter()
        .rposition(|w| *w != 0)
        .map_or(0, |last| last + 1)
}

impl Scoreboard {
    /// Creates a scoreboard with `capacity` slots.
    pub fn create(capacity: usize) -> io::Result<Scoreboard> {
        let mem = SharedWords::create("tine-scoreboard", HEADER_WORDS + capacity * SLOT_WORDS)?;
        let w = mem.words();
        w[0].store(MAGIC, Ordering::Relaxed);
        w[1].store(SCOREBOARD_VERSION, Ordering::Relaxed);
        w[2].store(capacity as u64, Ordering::Relaxed);
        w[3].store(SLOT_WORDS as u64, Ordering::Release);
        Ok(Scoreboard {
            mem,
            capacity,
            requests: Mutex::new(RequestSet::default()),
        })
    }

    /// Requests served by every process whose slot was cleared or reclaimed since the scoreboard
    /// was created. Add the live slots' counts for the tree's total.
    pub fn requests_of_gone(&self) -> u64 {
        self.mem.words()[H_REQUESTS_GONE].load(Ordering::Relaxed)
    }

    /// Completed reforks since the scoreboard was created.
    pub fn reforks(&self) -> u64 {
        self.mem.words()[H_REFORKS].load(Ordering::Relaxed)
    }

    /// Counts a completed refork (monitor only).
    pub fn count_refork(&self) {
        self.mem.words()[H_REFORKS].fetch_add(1, Ordering::Relaxed);
    }

    /// Log lines that processes of the tree failed to write (see `crate::log`).
    pub fn log_lines_dropped(&self) -> u64 {
        self.mem.words()[H_LOG_DROPPED].load(Ordering::Relaxed)
    }

    /// Counts a log line this process failed to write (any process of the tree).
    pub fn count_log_line_dropped(&self) {
        self.mem.words()[H_LOG_DROPPED].fetch_add(1, Ordering::Relaxed);
    }

    /// Maps a scoreboard handed over across a re-exec; refuses one of another layout version.
    pub fn adopt(fd: std::os::fd::OwnedFd, capacity: usize) -> io::Result<Scoreboard> {
        let mem = SharedWords::map(fd, HEADER_WORDS + capacity * SLOT_WORDS)?;
        let w = mem.words();
        let header = [0, 1, 2, 3].map(|i| w[i].load(Ordering::Acquire));
        if header
            != [
                MAGIC,
                SCOREBOARD_VERSION,
                capacity as u64,
                SLOT_WORDS as u64,
            ]
        {
            return Err(io::Error::other(format!(
                "scoreboard header {header:x?} is not version {SCOREBOARD_VERSION}"
            )));
        }
        Ok(Scoreboard {
            mem,
            capacity,
            requests: Mutex::new(RequestSet::default()),
        })
    }

    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The memfd (for handing over across a re-exec).
    pub fn fd(&self) -> &std::os::fd::OwnedFd {
        self.mem.fd()
    }

    fn words(&self, slot: usize) -> &[AtomicU64] {
        let start = HEADER_WORDS + slot * SLOT_WORDS;
        &self.mem.words()[start..start + SLOT_WORDS]
    }

    /// Writes any value into `slot`'s request count, as a corrupt or hostile worker could (for
    /// tests of what the monitor makes of it).
    #[cfg(test)]
    pub(crate) fn write_requests_count(&self, slot: usize, count: u64) {
        self.words(slot)[REQUESTS].store(count, Ordering::Relaxed);
    }

    /// Clears a slot so a new process can claim it (monitor only).
    pub fn clear(&self, slot: usize) {
        if slot >= self.capacity {
            return;
        }
        let w = self.words(slot);
        let seq = w[SEQ].load(Ordering::Relaxed);
        w[SEQ].store(seq | 1, Ordering::Relaxed);
        move_requests_to_header(w, &self.mem.words()[H_REQUESTS_GONE]);
        for (i, word) in w.iter().enumerate().skip(1) {
            if i != OWNER {
                word.store(0, Ordering::Relaxed);
            }
        }
        if let Some(h) = self.mem.halves(HEADER_WORDS + slot * SLOT_WORDS + OWNER) {
            h[0].store(0, Ordering::Relaxed);
            h[1].store(0, Ordering::Relaxed);
        }
        w[SEQ].store((seq | 1) + 1, Ordering::Release);
    }

    /// The writer handle of `slot`, for the process that owns it.
    pub fn slot(&self, slot: usize) -> Option<SlotWriter<'_>> {
        (slot < self.capacity).then(|| SlotWriter {
            w: self.words(slot),
            gone: &self.mem.words()[H_REQUESTS_GONE],
            requests: &self.requests,
        })
    }

    /// Reads `slot` consistently; `None` if free, torn for too long, or invalid.
    pub fn read(&self, slot: usize) -> Option<SlotView> {
        if slot >= self.capacity {
            return None;
        }
        let w = self.words(slot);
        for _ in 0..100 {
            let before = w[SEQ].load(Ordering::Acquire);
            if before & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            // (Not the robust word: it is read only as two halves.)
            let copy: Vec<u64> = w
                .iter()
                .enumerate()
                .map(|(i, x)| {
                    if i == OWNER {
                        0
                    } else {
                        x.load(Ordering::Relaxed)
                    }
                })
                .collect();
            std::sync::atomic::fence(Ordering::Acquire);
            if w[SEQ].load(Ordering::Relaxed) != before {
                continue;
            }
            if copy[ROLE] == Role::Free as u64 {
                return None;
            }
            // The text of the last request stays after it ends: it means nothing while nothing
            // is in flight.
            let mut text: Vec<u8> = match copy[IN_FLIGHT] {
                0 => Vec::new(),
                _ => copy[TEXT..TEXT + REQUEST_TEXT_BYTES / 8]
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            };
            text.retain(|b| *b != 0);
            return Some(SlotView {
                pid: i32::try_from(copy[PID]).ok()?,
                generation: u32::try_from(copy[GENERATION]).ok()?,
                nr: u32::try_from(copy[NR]).ok()?,
                state: State::from_word(copy[STATE])?,
                heartbeat_ms: copy[HEARTBEAT_MS],
                requests: copy[REQUESTS],
                in_flight: copy[IN_FLIGHT],
                oldest_start_ms: copy[OLDEST_START_MS],
                request: String::from_utf8_lossy(&text).into_owned(),
                fork_safe: copy[FORK_SAFE] == 0,
                connections: copy[CONNECTIONS],
                accept_pauses: copy[ACCEPT_PAUSES],
            });
        }
        None
    }
}

/// A serving worker's [`TAKEOVER`] word, as the monitor and the spares see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Takeover {
    /// No spare may take this worker's place on its own (not serving, retiring, being promoted,
    /// a rollout or reload under way, the tree stopping, or its death already handled).
    Closed,
    /// If this worker dies abnormally, a spare may take its place as worker `nr`.
    Open {
        /// Its worker number.
        nr: u32,
    },
    /// The spare in this slot took its place (it died); the monitor ratifies it.
    Claimed {
        /// The spare's slot.
        by: usize,
    },
}

const OPEN: u64 = 1 << 32;
const CLAIMED: u64 = 2 << 32;
const KIND_MASK: u64 = 0xffff_ffff << 32;

impl Takeover {
    fn from_word(w: u64) -> Takeover {
        match w & KIND_MASK {
            OPEN => Takeover::Open { nr: w as u32 },
            CLAIMED => Takeover::Claimed {
                by: w as u32 as usize,
            },
            _ => Takeover::Closed,
        }
    }
}

/// A spare's [`STANDBY`] word: the monitor lets it take a place on its own.
const ARMED: u64 = 1;
/// A spare's [`STANDBY`] word: it was activated (by the monitor, or it took a place itself).
const TAKEN: u64 = 2;
/// A spare's [`STANDBY`] word: it watches the workers' robust words, not armed (yet, or any more).
const WATCHING: u64 = 3;

impl Scoreboard {
    fn slot_word(&self, slot: usize, word: usize) -> Option<&AtomicU64> {
        (slot < self.capacity).then(|| &self.words(slot)[word])
    }

    /// The two halves of `slot`'s [`OWNER`] word.
    fn owner_halves(&self, slot: usize) -> Option<&[AtomicU32; 2]> {
        if slot >= self.capacity {
            return None;
        }
        self.mem.halves(HEADER_WORDS + slot * SLOT_WORDS + OWNER)
    }

    /// The robust futex word of `slot` (see [`OWNER`]).
    pub fn owner_word(&self, slot: usize) -> Option<&AtomicU32> {
        self.owner_halves(slot).map(|h| &h[0])
    }

    /// The word of `slot` that names the holder of its process's memory (see [`OWNER`]).
    pub fn holder_word(&self, slot: usize) -> Option<&AtomicU32> {
        self.owner_halves(slot).map(|h| &h[1])
    }

    /// The pid of the holder of the memory of the process in `slot`, if it said it has one.
    pub fn holder(&self, slot: usize) -> Option<i32> {
        let pid = self.holder_word(slot)?.load(Ordering::Acquire) as i32;
        (pid > 1).then_some(pid)
    }

    /// The roster word (see [`H_ROSTER`]).
    pub fn roster_word(&self) -> &AtomicU32 {
        &self
            .mem
            .halves(H_ROSTER)
            .expect("the header is part of the mapping")[0]
    }

    /// Tells the spares watching the robust words that the set of owners changed.
    pub fn bump_roster(&self) {
        let roster = self.roster_word();
        roster.fetch_add(1, Ordering::Release);
        let _ = crate::sys::futex::wake(roster, u32::MAX, false);
    }

    /// `slot`'s takeover word.
    pub fn takeover(&self, slot: usize) -> Takeover {
        self.slot_word(slot, TAKEOVER)
            .map_or(Takeover::Closed, |w| {
                Takeover::from_word(w.load(Ordering::Acquire))
            })
    }

    /// Lets a spare take worker `nr`'s place (in `slot`) on its own, unless one has (monitor).
    pub fn open_takeover(&self, slot: usize, nr: u32) {
        let Some(w) = self.slot_word(slot, TAKEOVER) else {
            return;
        };
        let cur = w.load(Ordering::Acquire);
        if cur & KIND_MASK != CLAIMED && cur != OPEN | nr as u64 {
            let _ = w.compare_exchange(cur, OPEN | nr as u64, Ordering::AcqRel, Ordering::Acquire);
        }
    }

    /// No spare may take `slot`'s place on its own from now on; a claim already made stays, for
    /// [`Self::settle_takeover`] (monitor).
    pub fn close_takeover(&self, slot: usize) {
        let Some(w) = self.slot_word(slot, TAKEOVER) else {
            return;
        };
        let cur = w.load(Ordering::Acquire);
        if cur & KIND_MASK == OPEN {
            let _ = w.compare_exchange(cur, 0, Ordering::AcqRel, Ordering::Acquire);
        }
    }

    /// The worker in `slot` died: closes its takeover word and says which spare took its place
    /// on its own, if one did (monitor). Exactly once per claim.
    pub fn settle_takeover(&self, slot: usize) -> Option<usize> {
        let w = self.slot_word(slot, TAKEOVER)?;
        match Takeover::from_word(w.swap(0, Ordering::AcqRel)) {
            Takeover::Claimed { by } => Some(by),
            _ => None,
        }
    }

    /// The spare in slot `by` takes the place of the worker in `dead` on its own: its worker
    /// number if the takeover word was open (it is now claimed), `None` otherwise.
    pub fn claim_takeover(&self, dead: usize, by: usize) -> Option<u32> {
        let w = self.slot_word(dead, TAKEOVER)?;
        let cur = w.load(Ordering::Acquire);
        let Takeover::Open { nr } = Takeover::from_word(cur) else {
            return None;
        };
        w.compare_exchange(
            cur,
            CLAIMED | by as u64,
            Ordering::AcqRel,
            Ordering::Acquire,
        )
        .ok()
        .map(|_| nr)
    }

    /// The spare in `slot` watches the workers' robust words (the spare, before it reports
    /// ready): the monitor may arm it. False if it was taken already.
    pub fn watch_standby(&self, slot: usize) -> bool {
        self.slot_word(slot, STANDBY).is_some_and(|w| {
            w.compare_exchange(0, WATCHING, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        })
    }

    /// The spare in `slot` no longer watches (the spare: its wait failed): never armed again, and
    /// disarmed if it was, unless it was taken.
    pub fn unwatch_standby(&self, slot: usize) {
        if let Some(w) = self.slot_word(slot, STANDBY) {
            let _ = w.fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                (cur != TAKEN).then_some(0)
            });
        }
    }

    /// Lets the spare in `slot` take a place on its own (monitor), if it watches and was neither
    /// armed nor taken: true if it was armed now. A spare that does not watch (it cannot, or is
    /// of a build that does not say so) is left alone: no death waits for it.
    pub fn arm_standby(&self, slot: usize) -> bool {
        self.slot_word(slot, STANDBY).is_some_and(|w| {
            w.compare_exchange(WATCHING, ARMED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        })
    }

    /// The spare in `slot` may no longer take a place on its own (monitor): false if it has
    /// taken one already (or was activated).
    pub fn disarm_standby(&self, slot: usize) -> bool {
        let Some(w) = self.slot_word(slot, STANDBY) else {
            return true;
        };
        match w.compare_exchange(ARMED, WATCHING, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => true,
            Err(cur) => cur != TAKEN,
        }
    }

    /// Takes the spare in `slot` for an activation: by the monitor (`armed_only` false: armed,
    /// watching or not) or by the spare itself (only if armed). False if it was taken already.
    pub fn take_standby(&self, slot: usize, armed_only: bool) -> bool {
        let Some(w) = self.slot_word(slot, STANDBY) else {
            return false;
        };
        if armed_only {
            return w
                .compare_exchange(ARMED, TAKEN, Ordering::AcqRel, Ordering::Acquire)
                .is_ok();
        }
        w.fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
            (cur != TAKEN).then_some(TAKEN)
        })
        .is_ok()
    }

    /// Whether the spare in `slot` was taken for an activation.
    pub fn standby_taken(&self, slot: usize) -> bool {
        self.slot_word(slot, STANDBY)
            .is_some_and(|w| w.load(Ordering::Acquire) == TAKEN)
    }

    /// Whether the spare in `slot` may take a place on its own (armed, not taken).
    pub fn standby_armed(&self, slot: usize) -> bool {
        self.slot_word(slot, STANDBY)
            .is_some_and(|w| w.load(Ordering::Acquire) == ARMED)
    }

    /// Whether the owner of `slot`'s robust word died owning it (the kernel marked it).
    pub fn owner_died(&self, slot: usize) -> bool {
        self.owner_word(slot)
            .is_some_and(|w| w.load(Ordering::Acquire) & crate::sys::futex::OWNER_DIED != 0)
    }

    /// Undoes the spare's own [`Self::take_standby`] when its claim failed.
    pub fn release_standby(&self, slot: usize) {
        if let Some(w) = self.slot_word(slot, STANDBY) {
            let _ = w.compare_exchange(TAKEN, ARMED, Ordering::AcqRel, Ordering::Acquire);
        }
    }
}

impl Scoreboard {
    /// How loaded the worker in `slot` is, as another worker weighs itself against it before an
    /// accept (`worker::balance`): five words loaded one by one, without the sequence counter's
    /// retry and without a copy of the slot (each word is meaningful alone; a torn view only
    /// makes one accept decision on slightly stale numbers). `None` unless a worker holds the slot.
    pub fn load(&self, slot: usize) -> Option<Load> {
        if slot >= self.capacity {
            return None;
        }
        let w = self.words(slot);
        if w[ROLE].load(Ordering::Relaxed) != Role::Worker as u64 {
            return None;
        }
        let state = w[STATE].load(Ordering::Relaxed);
        Some(Load {
            pid: w[PID].load(Ordering::Relaxed),
            serving: state == State::Ready as u64 || state == State::Busy as u64,
            connections: w[CONNECTIONS].load(Ordering::Relaxed),
            requests: w[REQUESTS].load(Ordering::Relaxed),
        })
    }
}

/// One slot's load (see [`Scoreboard::load`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    /// Process id written by the owner.
    pub pid: u64,
    /// A worker serving (ready or busy): not booting, a spare, draining or being promoted.
    pub serving: bool,
    /// Connections the worker holds.
    pub connections: u64,
    /// Requests it served.
    pub requests: u64,
}

/// Adds a slot's requests counter to the header's count of requests served by gone processes.
fn move_requests_to_header(w: &[AtomicU64], gone: &AtomicU64) {
    let served = w[REQUESTS].swap(0, Ordering::Relaxed);
    if served <= MAX_SANE_REQUESTS {
        gone.fetch_add(served, Ordering::Relaxed);
    }
}

/// Writes one slot; used by the process that owns it.
#[derive(Clone, Copy)]
pub struct SlotWriter<'a> {
    w: &'a [AtomicU64],
    gone: &'a AtomicU64,
    requests: &'a Mutex<RequestSet>,
}

/// A tracked request in flight; ends (and is counted as served) when dropped, however the
/// request ends, even if its future is dropped half-way.
pub struct InFlightRequest<'a> {
    slot: SlotWriter<'a>,
    id: u64,
}

impl Drop for InFlightRequest<'_> {
    fn drop(&mut self) {
        self.slot.finish_tracked(self.id);
    }
}

impl<'a> SlotWriter<'a> {
    /// Runs `f` with the slot's sequence counter odd, so readers retry meanwhile.
    ///
    /// Only the slot's owner writes it, and its writers (the threads of one worker) all hold the
    /// request-set lock, as `_held` witnesses: plain stores are enough, no read-modify-write.
    fn write(&self, _held: &RequestSet, f: impl FnOnce(&[AtomicU64])) {
        // An odd counter here was left by a writer that died mid-update: continue from it.
        let odd = self.w[SEQ].load(Ordering::Relaxed) | 1;
        self.w[SEQ].store(odd, Ordering::Relaxed);
        std::sync::atomic::fence(Ordering::Release);
        f(self.w);
        self.w[SEQ].store(odd + 1, Ordering::Release);
    }

    fn lock_requests(&self) -> std::sync::MutexGuard<'a, RequestSet> {
        self.requests.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Claims the slot for a process. A promoted worker claims the slot it served from: what it
    /// served moves to the header's count first, so the tree's total never drops.
    pub fn claim(&self, pid: i32, role: Role, generation: u32, nr: u32, state: State) {
        let now = now_ms();
        let mut set = self.lock_requests();
        // Ids keep growing across a claim: a guard of a request from before it (if any were
        // still alive) must not end a newer request that reused its id.
        *set = RequestSet {
            next_id: set.next_id,
            ..RequestSet::default()
        };
        self.write(&set, |w| {
            move_requests_to_header(w, self.gone);
            for (i, word) in w.iter().enumerate().skip(1) {
                if i != OWNER {
                    word.store(0, Ordering::Relaxed);
                }
            }
            w[PID].store(pid as u64, Ordering::Relaxed);
            w[ROLE].store(role as u64, Ordering::Relaxed);
            w[GENERATION].store(generation as u64, Ordering::Relaxed);
            w[NR].store(nr as u64, Ordering::Relaxed);
            w[STATE].store(state as u64, Ordering::Relaxed);
            w[HEARTBEAT_MS].store(now, Ordering::Relaxed);
            w[STARTED_MS].store(now, Ordering::Relaxed);
        });
    }

    /// A hot spare becomes worker `nr`: its number, and its uptime starts now.
    pub fn take_nr(&self, nr: u32) {
        let set = self.lock_requests();
        let now = now_ms();
        self.write(&set, |w| {
            w[NR].store(nr as u64, Ordering::Relaxed);
            w[STARTED_MS].store(now, Ordering::Relaxed);
        });
    }

    /// Sets the state.
    pub fn set_state(&self, state: State) {
        let set = self.lock_requests();
        self.write(&set, |w| w[STATE].store(state as u64, Ordering::Relaxed));
    }

    /// Refreshes the heartbeat.
    pub fn heartbeat(&self) {
        self.w[HEARTBEAT_MS].store(now_ms(), Ordering::Relaxed);
    }

    /// Counts a connection opened (`true`) or closed. Any of the worker's threads may call it
    /// (the word is a gauge on its own: no other field depends on it).
    pub fn count_connection(&self, opened: bool) {
        match opened {
            true => self.w[CONNECTIONS].fetch_add(1, Ordering::Relaxed),
            false => self.w[CONNECTIONS].fetch_sub(1, Ordering::Relaxed),
        };
    }

    /// Counts a pause of accepting at `max_connections`.
    pub fn count_accept_pause(&self) {
        self.w[ACCEPT_PAUSES].fetch_add(1, Ordering::Relaxed);
    }

    /// Marks the process as not fork-safe.
    pub fn set_not_fork_safe(&self) {
        self.w[FORK_SAFE].store(1, Ordering::Relaxed);
    }

    /// Starts a tracked request: it counts for hang detection by its age, and the slot shows its
    /// method and path while it is the oldest in flight. Ends when the returned guard drops.
    pub fn track_request(&self, method: &str, path: &str) -> InFlightRequest<'a> {
        let now = now_ms();
        let mut set = self.lock_requests();
        let id = set.next_id;
        set.next_id += 1;
        if !set.tracked.is_empty() {
            // Not the oldest: its text is kept, to be shown once it is.
            let (text, _) = request_text(method, path);
            set.tracked.push_back(Tracked {
                id,
                start: now,
                text: Some(text),
            });
            let in_flight = set.in_flight();
            self.write(&set, |w| {
                w[IN_FLIGHT].store(in_flight, Ordering::Relaxed);
                w[STATE].store(State::Busy as u64, Ordering::Relaxed);
            });
            return InFlightRequest { slot: *self, id };
        }
        // The common request (nothing else in flight): its text goes straight into the slot, and
        // nothing of it is kept.
        set.tracked.push_back(Tracked {
            id,
            start: now,
            text: None,
        });
        let in_flight = set.in_flight();
        let cleared = replace_text_words(&mut set, text_word_count_of(method, path));
        self.write(&set, |w| {
            w[IN_FLIGHT].store(in_flight, Ordering::Relaxed);
            w[STATE].store(State::Busy as u64, Ordering::Relaxed);
            w[OLDEST_START_MS].store(now, Ordering::Relaxed);
            text_words(method, path, |i, word| {
                w[TEXT + i].store(word, Ordering::Relaxed)
            });
            clear_text_words(w, cleared);
        });
        drop(set);
        InFlightRequest { slot: *self, id }
    }

    fn finish_tracked(&self, id: u64) {
        let mut set = self.lock_requests();
        let was_oldest = set.tracked.front().is_some_and(|first| first.id == id);
        if was_oldest {
            set.tracked.pop_front();
        } else {
            let Ok(index) = set.tracked.binary_search_by_key(&id, |t| t.id) else {
                return; // claimed anew meanwhile (the set was reset): nothing of ours to end
            };
            set.tracked.remove(index);
        }
        let in_flight = set.in_flight();
        if in_flight == 0 {
            // The common end (nothing else in flight): no next oldest to publish, and the text
            // stays (readers ignore it while nothing is in flight; the next request rewrites
            // only the words it uses).
            self.write(&set, |w| {
                self.count_served(w, 0);
                w[OLDEST_START_MS].store(0, Ordering::Relaxed);
            });
            return;
        }
        // The next oldest (its text was kept: it started while this one was in flight), or the
        // stream connections' marker when only those are left. With nothing in flight the text
        // stays: readers ignore it then, and the next request rewrites only the words it uses.
        let next = match (was_oldest, set.tracked.front()) {
            (false, _) => None,
            (true, Some(next)) => Some((next.start, next.text)),
            (true, None) if set.untracked > 0 => Some((0, Some(request_text("STREAM", "").0))),
            (true, None) => Some((0, None)),
        };
        let next = next.map(|(start, text)| {
            let text = text.map(|text| {
                let words = text_word_count(&text);
                (text, words, replace_text_words(&mut set, words))
            });
            (start, text)
        });
        self.write(&set, |w| {
            self.count_served(w, in_flight);
            if let Some((start, text)) = next {
                w[OLDEST_START_MS].store(start, Ordering::Relaxed);
                if let Some((text, words, cleared)) = text {
                    write_text(w, &text, words, cleared);
                }
            }
        });
    }

    /// Records the start of an untracked unit of work (a stream connection: its life is not a
    /// request's, so its age never counts as a hang). Pair with [`SlotWriter::end_request`].
    pub fn begin_request(&self, method: &str, path: &str) {
        let mut set = self.lock_requests();
        set.untracked += 1;
        let in_flight = set.in_flight();
        let show = set.tracked.is_empty();
        let (text, words) = request_text(method, path);
        let cleared = match show {
            true => replace_text_words(&mut set, words),
            false => 0..0,
        };
        self.write(&set, |w| {
            w[IN_FLIGHT].store(in_flight, Ordering::Relaxed);
            w[STATE].store(State::Busy as u64, Ordering::Relaxed);
            if show {
                write_text(w, &text, words, cleared);
            }
        });
    }

    /// Records the end of an untracked unit of work started with [`SlotWriter::begin_request`].
    pub fn end_request(&self) {
        let mut set = self.lock_requests();
        set.untracked = set.untracked.saturating_sub(1);
        let in_flight = set.in_flight();
        let cleared = match in_flight {
            0 => replace_text_words(&mut set, 0),
            _ => 0..0,
        };
        self.write(&set, |w| {
            self.count_served(w, in_flight);
            if in_flight == 0 {
                write_text(w, &[0; TEXT_WORDS], 0, cleared);
            }
        });
    }

    /// Counts one request served and the new in-flight count (under the slot's write lock).
    fn count_served(&self, w: &[AtomicU64], in_flight: u64) {
        w[IN_FLIGHT].store(in_flight, Ordering::Relaxed);
        w[REQUESTS].store(w[REQUESTS].load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        if in_flight == 0 && w[STATE].load(Ordering::Relaxed) == State::Busy as u64 {
            w[STATE].store(State::Ready as u64, Ordering::Relaxed);
        }
    }
}

/// Records that the slot's text is about to be a text of `words` words; returns the words of
/// the previous text beyond it, which the write must clear.
fn replace_text_words(set: &mut RequestSet, words: usize) -> std::ops::Range<usize> {
    let previous = std::mem::replace(&mut set.text_words, words);
    words..previous.max(words)
}

/// Writes a text of `words` words into a slot being written, and zeros into the words `clear`
/// of a longer previous text (see [`replace_text_words`]).
fn write_text(w: &[AtomicU64], text: &RequestText, words: usize, clear: std::ops::Range<usize>) {
    for (i, word) in text.iter().take(words).enumerate() {
        w[TEXT + i].store(*word, Ordering::Relaxed);
    }
    clear_text_words(w, clear);
}

/// Zeros the slot's text words `clear` (those of a longer previous text).
fn clear_text_words(w: &[AtomicU64], clear: std::ops::Range<usize>) {
    for i in clear {
        w[TEXT + i].store(0, Ordering::Relaxed);
    }
}

/// How long ago `ms` was, on the monotonic clock.
pub fn age(ms: u64) -> Duration {
    Duration::from_millis(now_ms().saturating_sub(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slot_shows_the_oldest_request_in_flight_whatever_ends_first() {
        let board = Scoreboard::create(2).expect("memfd");
        let slot = board.slot(1).unwrap();
        slot.claim(4242, Role::Worker, 3, 7, State::Ready);
        let first = slot.track_request("GET", "/spin");
        let started = board.read(1).unwrap().oldest_start_ms;
        std::thread::sleep(Duration::from_millis(5));
        let second = slot.track_request("POST", "/upload");
        let third = slot.track_request("GET", "/fast");
        let v = board.read(1).unwrap();
        assert_eq!(
            (v.in_flight, v.state, v.request.as_str()),
            (3, State::Busy, "GET /spin")
        );
        assert_eq!(
            v.oldest_start_ms, started,
            "newer requests do not move the oldest start"
        );
        drop(third);
        assert_eq!(board.read(1).unwrap().request, "GET /spin");
        drop(first);
        let v = board.read(1).unwrap();
        assert_eq!((v.in_flight, v.request.as_str()), (1, "POST /upload"));
        assert!(v.oldest_start_ms > started, "the next oldest takes over");
        drop(second);
        let v = board.read(1).unwrap();
        assert_eq!(
            (v.in_flight, v.oldest_start_ms, v.request.as_str(), v.state),
            (0, 0, "", State::Ready)
        );
        assert_eq!(v.requests, 3);
        assert_eq!((v.pid, v.generation, v.nr), (4242, 3, 7));
    }

    #[test]
    fn a_shorter_text_leaves_nothing_of_a_longer_one_before_it() {
        let board = Scoreboard::create(1).expect("memfd");
        let slot = board.slot(0).unwrap();
        slot.claim(7, Role::Worker, 1, 0, State::Ready);
        let long = slot.track_request("DELETE", "/a/rather/long/path/of/many/words");
        let short = slot.track_request("GET", "/");
        assert_eq!(
            board.read(0).unwrap().request,
            "DELETE /a/rather/long/path/of/many/words"
        );
        // The oldest ends: the kept text of the next one replaces it in the slot, word for word.
        drop(long);
        assert_eq!(board.read(0).unwrap().request, "GET /");
        drop(short);
        assert_eq!(board.read(0).unwrap().in_flight, 0);
        // A claim starts afresh but keeps counting ids: a guard from before it ends nothing newer
        // (before, ids restarted at 0 and the first request after a claim took the old one's).
        slot.claim(8, Role::Worker, 2, 0, State::Ready);
        let before = slot.track_request("PUT", "/x");
        slot.claim(9, Role::Worker, 3, 0, State::Ready);
        let after = slot.track_request("GET", "/after");
        drop(before);
        let v = board.read(0).unwrap();
        assert_eq!((v.in_flight, v.request.as_str()), (1, "GET /after"));
        drop(after);
        assert_eq!(board.read(0).unwrap().request, "");
    }

    proptest::proptest! {
        /// The slot's text words are `method path`'s bytes, truncated and NUL-padded, whatever
        /// the lengths (every alignment of the path's 8-byte chunks to the words).
        #[test]
        fn text_words_are_the_truncated_padded_bytes(method in "[A-Z]{0,12}", path in "/[ -~]{0,140}") {
            let mut bytes = format!("{method} {path}").into_bytes();
            bytes.truncate(REQUEST_TEXT_BYTES);
            let expected: Vec<u64> = bytes
                .chunks(8)
                .map(|c| {
                    let mut w = [0u8; 8];
                    w[..c.len()].copy_from_slice(c);
                    u64::from_le_bytes(w)
                })
                .collect();
            let mut got = Vec::new();
            let n = text_words(&method, &path, |i, w| {
                assert_eq!(i, got.len());
                got.push(w);
            });
            proptest::prop_assert_eq!(n, expected.len());
            proptest::prop_assert_eq!(text_word_count_of(&method, &path), n);
            proptest::prop_assert_eq!(got, expected);
            // A request shown after a longer one leaves no byte of it behind.
            let board = Scoreboard::create(1).expect("memfd");
            let slot = board.slot(0).unwrap();
            slot.claim(10, Role::Worker, 0, 0, State::Ready);
            drop(slot.track_request("DELETE", &format!("/{}", "y".repeat(200))));
            let _shown = slot.track_request(&method, &path);
            let shown = board.read(0).unwrap().request;
            proptest::prop_assert_eq!(shown.as_bytes(), &bytes[..]);
        }
    }

    #[test]
    fn untracked_work_counts_but_never_ages_and_long_paths_are_cut() {
        let board = Scoreboard::create(1).expect("memfd");
        let slot = board.slot(0).unwrap();
        slot.claim(10, Role::Worker, 0, 0, State::Ready);
        slot.begin_request("STREAM", "");
        let v = board.read(0).unwrap();
        assert_eq!(
            (v.in_flight, v.oldest_start_ms, v.request.as_str()),
            (1, 0, "STREAM ")
        );
        let long = format!("/{}", "x".repeat(500));
        let tracked = slot.track_request("GET", &long);
        let v = board.read(0).unwrap();
        assert_eq!(v.in_flight, 2);
        assert!(v.oldest_start_ms > 0);
        assert_eq!(v.request.len(), REQUEST_TEXT_BYTES);
        assert!(v.request.starts_with("GET /xxx"));
        drop(tracked);
        slot.end_request();
        let v = board.read(0).unwrap();
        assert_eq!((v.in_flight, v.requests, v.state), (0, 2, State::Ready));
    }

    #[test]
    fn served_requests_survive_the_slot_being_cleared_or_reclaimed() {
        let board = Scoreboard::create(2).expect("memfd");
        let slot = board.slot(0).unwrap();
        slot.claim(10, Role::Worker, 0, 0, State::Ready);
        for _ in 0..5 {
            drop(slot.track_request("GET", "/"));
        }
        // A promoted worker claims its slot as a mold: what it served moves to the header.
        slot.claim(10, Role::Mold, 1, 0, State::Mold);
        assert_eq!(
            (board.read(0).unwrap().requests, board.requests_of_gone()),
            (0, 5)
        );
        let other = board.slot(1).unwrap();
        other.claim(11, Role::Worker, 1, 1, State::Ready);
        drop(other.track_request("GET", "/"));
        board.clear(1);
        board.clear(1);
        assert_eq!(board.requests_of_gone(), 6, "cleared once, counted once");
        assert!(board.read(1).is_none());
        board.count_refork();
        assert_eq!(board.reforks(), 1);
    }

    #[test]
    fn garbage_in_a_slot_reads_as_nothing() {
        let board = Scoreboard::create(1).expect("memfd");
        let w = board.words(0);
        w[ROLE].store(Role::Worker as u64, Ordering::Relaxed);
        w[STATE].store(99, Ordering::Relaxed);
        assert!(board.read(0).is_none(), "an unknown state is refused");
        w[STATE].store(State::Ready as u64, Ordering::Relaxed);
        w[PID].store(u64::MAX, Ordering::Relaxed);
        assert!(board.read(0).is_none(), "a pid out of range is refused");
        w[PID].store(5, Ordering::Relaxed);
        w[IN_FLIGHT].store(1, Ordering::Relaxed);
        w[TEXT].store(
            u64::from_le_bytes(*b"\xff\xfe\0\0\0\0\0\0"),
            Ordering::Relaxed,
        );
        assert_eq!(board.read(0).unwrap().request, "\u{fffd}\u{fffd}");
        w[SEQ].store(1, Ordering::Relaxed); // a writer died mid-update: the seqlock stays odd
        assert!(board.read(0).is_none());
        board.clear(0);
        assert!(board.read(0).is_none());
        assert_eq!(
            w[SEQ].load(Ordering::Relaxed) & 1,
            0,
            "clearing releases a stuck slot"
        );
    }

    #[test]
    fn a_dead_workers_place_is_taken_once_by_a_spare_or_the_monitor() {
        let b = Scoreboard::create(4).expect("scoreboard");
        // A spare that does not say it watches is never armed.
        assert!(!b.arm_standby(2));
        assert!(!b.standby_armed(2));
        assert!(!b.take_standby(2, true));
        assert!(b.watch_standby(2));
        assert!(b.watch_standby(3));
        assert!(b.arm_standby(2));
        assert!(b.arm_standby(3));
        assert!(!b.arm_standby(3), "armed once");
        // Closed (the monitor has not opened it): no spare claims.
        assert_eq!(b.claim_takeover(0, 2), None);
        b.open_takeover(0, 7);
        assert_eq!(b.takeover(0), Takeover::Open { nr: 7 });
        // The first spare takes itself, then the place.
        assert!(b.take_standby(2, true));
        assert_eq!(b.claim_takeover(0, 2), Some(7));
        // Another spare cannot take the same place, and gives itself back.
        assert!(b.take_standby(3, true));
        assert_eq!(b.claim_takeover(0, 3), None);
        b.release_standby(3);
        assert!(!b.standby_taken(3));
        // The monitor neither activates nor retires the spare that took a place.
        assert!(!b.take_standby(2, false));
        assert!(!b.disarm_standby(2));
        // Closing or reopening leaves the claim for the monitor to settle, once.
        b.close_takeover(0);
        b.open_takeover(0, 7);
        assert_eq!(b.settle_takeover(0), Some(2));
        assert_eq!(b.settle_takeover(0), None);
        assert_eq!(b.claim_takeover(0, 3), None);
        // The monitor first: settling closes the word, and a spare's late claim fails.
        b.open_takeover(1, 1);
        assert_eq!(b.settle_takeover(1), None);
        assert!(b.take_standby(3, true));
        assert_eq!(b.claim_takeover(1, 3), None);
        b.release_standby(3);
        // A spare that is not armed cannot take itself; the monitor can take it.
        assert!(b.disarm_standby(3));
        assert!(!b.standby_armed(3));
        assert!(!b.take_standby(3, true));
        assert!(b.arm_standby(3), "armed again after a disarm");
        assert!(b.disarm_standby(3));
        assert!(b.take_standby(3, false));
        // A spare whose wait failed stops watching: never armed again, still activated by the
        // monitor.
        b.clear(1);
        assert!(b.watch_standby(1));
        assert!(b.arm_standby(1));
        b.unwatch_standby(1);
        assert!(!b.standby_armed(1));
        assert!(!b.arm_standby(1));
        assert!(b.disarm_standby(1));
        assert!(b.take_standby(1, false));
        b.unwatch_standby(1);
        assert!(b.standby_taken(1), "a taken spare stays taken");
        // Clearing a slot resets its words.
        b.clear(2);
        assert!(!b.standby_taken(2));
    }

    #[test]
    fn a_thread_that_dies_owning_its_robust_word_marks_it_and_wakes_a_waiter() {
        use crate::sys::futex::{gettid, own_robust_word, wait_any, Waiter, OWNER_DIED, WAITERS};
        let b: &'static Scoreboard =
            Box::leak(Box::new(Scoreboard::create(2).expect("scoreboard")));
        let word = b.owner_word(1).expect("slot 1");
        let (tx, rx) = std::sync::mpsc::channel();
        let owner = std::thread::spawn(move || {
            own_robust_word(word).expect("set_robust_list");
            word.store(gettid(), Ordering::Release);
            tx.send(()).expect("send");
            // Parked until told to go: it then exits still owning the word.
            std::thread::park();
        });
        rx.recv().expect("the owner runs");
        let held = word.load(Ordering::Acquire);
        assert_ne!(held & crate::sys::futex::TID_MASK, 0);
        word.compare_exchange(held, held | WAITERS, Ordering::AcqRel, Ordering::Acquire)
            .expect("set WAITERS");
        // A waiter sleeps on the word (as a spare's watcher does) before the owner goes.
        let (woke_tx, woke_rx) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let _ = woke_tx.send(gettid());
            let r = wait_any(
                &[Waiter {
                    word,
                    expected: held | WAITERS,
                    private: false,
                }],
                None,
            );
            let _ = woke_tx.send(r.map(|_| 0).unwrap_or(u32::MAX));
        });
        let tid = woke_rx.recv().expect("the waiter runs");
        let asleep = (0..1000).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(5));
            std::fs::read_to_string(format!("/proc/self/task/{tid}/wchan"))
                .is_ok_and(|w| w.contains("futex_wait"))
        });
        assert!(asleep, "the waiter sleeps in futex_waitv");
        owner.thread().unpark();
        owner.join().expect("the owner exits");
        // Woken by the kernel at the owner's exit (a successful wait, not EAGAIN: it was asleep).
        let woke = woke_rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the owner's death woke the waiter");
        assert_eq!(woke, 0);
        waiter.join().expect("the waiter ends");
        assert_eq!(word.load(Ordering::Acquire), OWNER_DIED | WAITERS);
    }
}
