//! Accept balance (`accept_balance`, on by default): a worker that holds clearly more connections
//! than another serving worker leaves the next new connections to it, for a few milliseconds at
//! most.
//!
//! Why: with exclusive wake-ups the kernel wakes one waiting worker per new connection, and the
//! second connection of a burst wakes a second worker; but workers run under `SCHED_BATCH`, so the
//! second one, woken on a busy CPU, waits for the first one's time slice, and the first one's
//! accept loop has meanwhile taken the whole listen queue. With keep-alive clients (a load tester,
//! a proxy's pool) that start-up imbalance lasts as long as the connections: one worker serves
//! them all while the other idles. Without exclusive wake-ups the race is the same.
//!
//! The rule, in the spirit of nginx's `accept_disabled` but across workers: before each accept, a
//! worker holding more than twice the connections of the least loaded serving peer, plus 2, at
//! most one of whose connections closed in the last [`QUIET`], stops accepting — it leaves the
//! reactor, as it does at `max_connections` (see [`super::http::Gate`]: a worker that stayed
//! registered would keep taking the exclusive wake-ups) — so that the kernel wakes the peer for
//! what comes, and the peer, which was woken for the burst already, takes what is queued. It comes
//! back as soon as the balance is restored: looked at again each time one of its own connections
//! closes, and every [`POLL`]. A burst of 16 on two idle workers ends 11/5 at worst (the rule's margin), mostly 7/9
//! (16/0 without it).
//!
//! Connection churn (a new connection per request) is left alone. There the counts wobble between
//! 0 and a few, often over the margin for a moment (a worker accepts what queued while it was
//! serving), and weighed at every accept they made the two workers take turns leaving the
//! reactor thousands of times a second, each staying out a [`POLL`] tick after its own count had
//! dropped (`hello`, `wrk -H "Connection: close" -c16`: ~2.9k req/s against ~21k). Under churn
//! the counts say nothing durable (a connection that closes is replaced by one the kernel gives to
//! whichever worker waits), so a worker whose connections are closing does not defer: churn
//! closes one every few hundred microseconds, a burst of connections that stay closes none. One
//! close alone is not churn: `wrk` connects once and closes to check the address just before it
//! opens its connections (a health check before a pool connects is alike), and while one close
//! held deferrals up, the worker that took it took the whole burst in some runs (64/0 or 63/1 of
//! `wrk -c64`). It is a count, not a rate: two closes just before a burst still hold its
//! deferrals up, and churn slower than two closes per [`QUIET`] per worker is weighed as
//! keep-alive connections are (its deferrals are then few: each waits for the count to move).
//! A deferral that does start ends the moment a close of its own restores the balance, not at the
//! next tick; and leaving costs one `epoll_ctl` each way (the listener's registration taken out of
//! the reactor's epoll instance and put back, read from fdinfo once:
//! [`crate::sys::epoll::Switch`]), not a duplicate registered anew and read back every time.
//! Measured numbers: the commit that made it the default, and docs/FAQ.md.
//!
//! It never stalls on a peer: the counts are the scoreboard's (`SlotWriter::count_connection`),
//! and only a worker that serves (ready or busy, not booting, a spare, draining, being promoted)
//! and has room under `max_connections` counts as a peer. A deferral lasts while the peer's
//! connection count moves, [`NO_PROGRESS`] at most without a move and [`LONGEST`] in all; a peer
//! given up on (hung, stopped by `SIGSTOP`, slow to run, or simply not woken: with exclusive
//! wake-ups a connection the kernel gave this worker alone reaches no one else) is passed over
//! until it shows life (its count or its requests served move) or [`PASSED_OVER`] has passed, so
//! a stopped or hung peer costs one bounded deferral now and then, not one per connection. One
//! worker, or a worker not that far above its peers, never defers: the check is then a few loads of
//! shared words per accept (none while it holds no more than the minimal slack), no system call,
//! no lock; a close costs a clock read and two atomic writes.

use std::time::{Duration, Instant};

use crate::ipc::scoreboard::Scoreboard;

/// How often a deferring worker looks at the balance again (at once when one of its own
/// connections closes).
pub(super) const POLL: Duration = Duration::from_millis(1);
/// A deferral ends when the peer's count has not moved for this long.
pub(super) const NO_PROGRESS: Duration = Duration::from_millis(5);
/// A deferral never lasts longer than this.
pub(super) const LONGEST: Duration = Duration::from_millis(10);
/// A peer given up on is passed over this long at most, even if its count never moves (it may have
/// come back to the count it was given up at).
pub(super) const PASSED_OVER: Duration = Duration::from_millis(250);
/// A worker may always hold this many connections more than twice its lightest peer's.
const MIN_SLACK: u64 = 2;
/// A deferral starts only when at most one connection of this worker has closed in this long:
/// under churn the counts say nothing durable (a connection that closes is replaced by one the
/// kernel gives to whichever worker waits), while a burst of connections that stay closes none,
/// and one close alone (a client checking the address, a health check) is no churn.
pub(super) const QUIET: Duration = Duration::from_millis(5);

/// What a worker weighs itself against: the scoreboard, and what it knows of itself.
pub(super) struct Balance {
    board: &'static Scoreboard,
    /// This process (its own slot is not a peer).
    pid: u64,
    /// A peer holding this many connections takes no more.
    max_connections: u64,
}

/// The least loaded serving peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Peer {
    slot: usize,
    pid: u64,
    connections: u64,
    requests: u64,
}

/// The peers one accept loop gave up on, by slot: passed over while they are the same process and
/// neither their count nor their requests served move, until the instant given.
pub(super) struct PassedOver(Vec<Option<(Peer, Instant)>>);

/// An accept loop's deferral under way.
pub(super) struct Deferral {
    began: Instant,
    /// The peer waited for, its count when last seen, and when that count last moved.
    peer: Peer,
    moved: Instant,
}

/// What an accept loop does next.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Accept.
    Accept,
    /// Start deferring: leave the reactor, look again after [`POLL`] or a close.
    Leave,
    /// Keep deferring: look again after [`POLL`] or a close.
    Wait,
}

impl Balance {
    /// The balance of this worker, whose process is `pid`; `None` without a scoreboard.
    pub(super) fn new(max_connections: usize) -> Option<Balance> {
        Some(Balance {
            board: crate::ipc::scoreboard::try_global()?,
            pid: std::process::id() as u64,
            max_connections: max_connections as u64,
        })
    }

    pub(super) fn passed_over(&self) -> PassedOver {
        PassedOver(vec![None; self.board.capacity()])
    }

    /// The least loaded serving peer, if this worker, holding `mine` connections, holds more than
    /// twice its count and [`MIN_SLACK`].
    fn lighter_peer(&self, mine: u64, passed_over: &PassedOver) -> Option<Peer> {
        if mine <= MIN_SLACK {
            return None;
        }
        let mut least: Option<Peer> = None;
        for slot in 0..self.board.capacity() {
            let Some(load) = self.board.load(slot) else {
                continue;
            };
            if !load.serving || load.pid == self.pid || load.connections >= self.max_connections {
                continue;
            }
            let peer = Peer {
                slot,
                pid: load.pid,
                connections: load.connections,
                requests: load.requests,
            };
            if let Some(Some((given_up, until))) = passed_over.0.get(slot) {
                if *given_up == peer && Instant::now() < *until {
                    continue;
                }
            }
            if least.is_none_or(|l| load.connections < l.connections) {
                least = Some(peer);
            }
        }
        let least = least?;
        (mine > 2 * least.connections + MIN_SLACK).then_some(least)
    }

    /// Whether the accept loop holding `mine` connections accepts now, given its `deferral` (kept
    /// and updated here), the peers it gave up on, and when the connection of this worker that
    /// closed before the last one closed (`None`: fewer than two closed yet; a deferral starts
    /// only [`QUIET`] after it, so that one close alone never holds one up).
    pub(super) fn verdict(
        &self,
        mine: u64,
        close_before_last: Option<Instant>,
        deferral: &mut Option<Deferral>,
        passed_over: &mut PassedOver,
    ) -> Verdict {
        let Some(peer) = self.lighter_peer(mine, passed_over) else {
            *deferral = None;
            return Verdict::Accept;
        };
        let now = Instant::now();
        let Some(d) = deferral else {
            if close_before_last.is_some_and(|at| now.saturating_duration_since(at) < QUIET) {
                return Verdict::Accept;
            }
            tracing::debug!(
                peer = peer.pid,
                peer_connections = peer.connections,
                connections = mine,
                "accept balance: leaving new connections to a lighter peer"
            );
            *deferral = Some(Deferral {
                began: now,
                peer,
                moved: now,
            });
            return Verdict::Leave;
        };
        // Progress is a move of its count (an accept, or a close); requests served are not.
        if (d.peer.slot, d.peer.pid, d.peer.connections) != (peer.slot, peer.pid, peer.connections)
        {
            d.moved = now;
        }
        d.peer = peer;
        if now.duration_since(d.moved) < NO_PROGRESS && now.duration_since(d.began) < LONGEST {
            return Verdict::Wait;
        }
        // Given up on: passed over until it moves (a connection or a request), for PASSED_OVER at
        // most.
        tracing::debug!(
            peer = peer.pid,
            peer_connections = peer.connections,
            connections = mine,
            "accept balance: the lighter peer took nothing; accepting"
        );
        if let Some(mark) = passed_over.0.get_mut(peer.slot) {
            *mark = Some((peer, now + PASSED_OVER));
        }
        *deferral = None;
        Verdict::Accept
    }
}
