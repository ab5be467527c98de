//! Accepting on the monitor's own sockets (the control socket, the metrics listener) without
//! spinning: an error that retrying at once would only repeat pauses accepting, with backoff.

use std::io;
use std::time::{Duration, Instant};

/// What to do after a failed `accept`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum AcceptError {
    /// Nothing is pending.
    Empty,
    /// That one connection failed (aborted by its client, interrupted): accept the next.
    Skip,
    /// A resource is short (`EMFILE`, `ENFILE`, `ENOBUFS`, `ENOMEM`): accepting is paused.
    Paused,
}

/// Pauses accepting on a listener after an error that retrying at once would only repeat. The
/// connection stays queued, so the listener stays readable: polling it again right away would
/// spin the single-threaded monitor at 100% CPU. The pause doubles with every failure in a row,
/// from 10 ms to 1 s; the listener is left out of the poll set meanwhile.
#[derive(Debug, Default)]
pub(crate) struct AcceptBackoff {
    failures: u32,
    until: Option<Instant>,
}

impl AcceptBackoff {
    /// Whether accepting is paused now.
    pub(crate) fn is_paused(&self) -> bool {
        self.until.is_some_and(|u| Instant::now() < u)
    }

    /// When the pause ends, if one is on.
    pub(crate) fn resumes_at(&self) -> Option<Instant> {
        self.until.filter(|u| Instant::now() < *u)
    }

    /// An accept succeeded: no pause.
    pub(crate) fn succeeded(&mut self) {
        self.failures = 0;
        self.until = None;
    }

    /// Classifies a failed accept on `what` and pauses if a resource is short.
    pub(crate) fn failed(&mut self, what: &str, e: &io::Error) -> AcceptError {
        if e.kind() == io::ErrorKind::WouldBlock {
            return AcceptError::Empty;
        }
        if matches!(
            e.raw_os_error(),
            Some(libc::ECONNABORTED | libc::EINTR | libc::EPROTO | libc::EPERM)
        ) {
            return AcceptError::Skip;
        }
        self.failures = self.failures.saturating_add(1);
        let pause = Duration::from_millis(10 << self.failures.min(7)).min(Duration::from_secs(1));
        self.until = Some(Instant::now() + pause);
        if self.failures == 1 {
            tracing::warn!(error = %e, "{what}: accept failed; pausing accepts (retried with backoff up to 1 s)");
        } else {
            tracing::debug!(error = %e, failures = self.failures, "{what}: accept failed again");
        }
        AcceptError::Paused
    }
}
