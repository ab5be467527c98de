//! The last things that happened to the tree, for operators: reforks, reloads, rollouts, kills,
//! deaths, recycles and scaling, each with its reason. A bounded ring (the log keeps the full
//! story); `ctl status --json` shows it and `tine top` lists it. Carried across a reload's re-exec
//! in the handover, so the reload that replaced the monitor's image is still in the list.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// Events kept: enough to see what led to an incident, small enough for every status reply.
pub(crate) const CAPACITY: usize = 50;
/// Longest text kept for one event (a reason may quote a request line or an error).
const MAX_TEXT: usize = 240;

/// One event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Event {
    /// Wall-clock time, milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// What kind of event: `refork`, `reload`, `rollout`, `kill`, `died`, `recycle`, `timeout`,
    /// `scale`.
    pub kind: String,
    /// What happened and why, in one line.
    pub text: String,
}

/// The ring of recent events, oldest first.
#[derive(Debug, Default)]
pub(crate) struct Events {
    ring: VecDeque<Event>,
}

impl Events {
    /// Records an event now; the oldest goes once the ring is full.
    pub(crate) fn push(&mut self, kind: &str, text: impl Into<String>) {
        let mut text: String = text.into();
        if text.len() > MAX_TEXT {
            let mut end = MAX_TEXT;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
            text.push('…');
        }
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.ring.push_back(Event {
            unix_ms,
            kind: kind.to_string(),
            text,
        });
        while self.ring.len() > CAPACITY {
            self.ring.pop_front();
        }
    }

    /// The events, oldest first.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Event> {
        self.ring.iter()
    }

    /// A copy for the handover.
    pub(crate) fn to_vec(&self) -> Vec<Event> {
        self.ring.iter().cloned().collect()
    }

    /// The ring a previous image handed over (bounded again: the handover is not trusted blindly).
    pub(crate) fn from_handover(events: Vec<Event>) -> Events {
        let mut out = Events::default();
        let skip = events.len().saturating_sub(CAPACITY);
        for e in events.into_iter().skip(skip) {
            let mut text = e.text;
            if text.len() > MAX_TEXT + '…'.len_utf8() {
                let mut end = MAX_TEXT;
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                text.truncate(end);
            }
            out.ring.push_back(Event { text, ..e });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_newest_and_bounds_each_text() {
        let mut events = Events::default();
        for i in 0..CAPACITY + 7 {
            events.push("kill", format!("event {i}"));
        }
        let texts: Vec<_> = events.iter().map(|e| e.text.clone()).collect();
        assert_eq!(texts.len(), CAPACITY);
        assert_eq!(texts[0], "event 7");
        assert_eq!(texts[CAPACITY - 1], format!("event {}", CAPACITY + 6));
        events.push("died", "é".repeat(500));
        let last = events.iter().last().unwrap();
        assert!(
            last.text.len() <= MAX_TEXT + '…'.len_utf8(),
            "{}",
            last.text.len()
        );
        assert!(last.text.ends_with('…'));
    }

    #[test]
    fn a_handed_over_ring_is_bounded_again() {
        let many: Vec<Event> = (0..CAPACITY * 3)
            .map(|i| Event {
                unix_ms: i as u64,
                kind: "reload".into(),
                text: "x".repeat(10_000),
            })
            .collect();
        let events = Events::from_handover(many);
        assert_eq!(events.iter().count(), CAPACITY);
        assert_eq!(events.iter().next().unwrap().unix_ms, (CAPACITY * 2) as u64);
        assert!(events.iter().all(|e| e.text.len() <= MAX_TEXT + 3));
    }
}
