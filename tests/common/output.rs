//! Output captured from child processes: a server's log, line by line, and the pids it names.

use super::*;

#[derive(Default)]
struct LogState {
    lines: Vec<String>,
    eof: bool,
}

/// Lines read from a child's pipe by a background thread, shared with the test.
///
/// The pipe of a server's stderr is inherited by every process of the tree, so [`Log::wait_eof`]
/// returning `true` also proves that no process of the tree is left holding it.
#[derive(Clone, Default)]
pub struct Log {
    inner: Arc<(Mutex<LogState>, Condvar)>,
}

impl Log {
    /// Starts a thread that reads `reader` line by line until EOF.
    pub fn capture(reader: impl Read + Send + 'static) -> Log {
        let log = Log::default();
        let writer = log.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(reader);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf)
                            .trim_end_matches(['\n', '\r'])
                            .to_string();
                        let (state, cv) = &*writer.inner;
                        state.lock().unwrap().lines.push(line);
                        cv.notify_all();
                    }
                }
            }
            let (state, cv) = &*writer.inner;
            state.lock().unwrap().eof = true;
            cv.notify_all();
        });
        log
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<String> {
        self.inner.0.lock().unwrap().lines.clone()
    }

    /// Every line so far, joined.
    pub fn text(&self) -> String {
        self.lines().join("\n")
    }

    /// The number of lines so far: pass it to the `*_since` methods to look only at what comes
    /// after an action.
    pub fn mark(&self) -> usize {
        self.inner.0.lock().unwrap().lines.len()
    }

    /// The first line containing `pattern`.
    pub fn find(&self, pattern: &str) -> Option<String> {
        self.lines().into_iter().find(|l| l.contains(pattern))
    }

    /// How many lines contain `pattern`.
    pub fn count(&self, pattern: &str) -> usize {
        self.lines().iter().filter(|l| l.contains(pattern)).count()
    }

    /// Waits for a line at index `since` or later that satisfies `pred`; `None` on timeout or if
    /// the pipe closed without one.
    pub fn wait_for_line_since(
        &self,
        since: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let (state, cv) = &*self.inner;
        let mut guard = state.lock().unwrap();
        let mut checked = since;
        loop {
            if let Some(line) = guard.lines.iter().skip(checked).find(|l| pred(l)) {
                return Some(line.clone());
            }
            checked = checked.max(guard.lines.len());
            if guard.eof {
                return None;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            guard = cv.wait_timeout(guard, left).unwrap().0;
        }
    }

    /// Waits for a line containing `pattern` (anywhere in the log); panics with the log if none
    /// comes within `timeout`.
    pub fn wait_for_log(&self, pattern: &str, timeout: Duration) -> String {
        self.wait_for_log_since(0, pattern, timeout)
    }

    /// Waits for a line containing `pattern` at index `mark` or later; panics with the log if none
    /// comes within `timeout`.
    pub fn wait_for_log_since(&self, mark: usize, pattern: &str, timeout: Duration) -> String {
        match self.wait_for_line_since(mark, timeout, |l| l.contains(pattern)) {
            Some(line) => line,
            None => panic!(
                "no log line containing {pattern:?} (after line {mark}) within {timeout:?}{}; log:\n{}",
                if self.is_eof() { " (the pipe closed)" } else { "" },
                self.text()
            ),
        }
    }

    /// Whether the writing ends of the pipe are all closed.
    pub fn is_eof(&self) -> bool {
        self.inner.0.lock().unwrap().eof
    }

    /// Waits until every writer closed the pipe; `false` on timeout.
    pub fn wait_eof(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (state, cv) = &*self.inner;
        let mut guard = state.lock().unwrap();
        while !guard.eof {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            guard = cv.wait_timeout(guard, left).unwrap().0;
        }
        true
    }
}

impl fmt::Debug for Log {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text())
    }
}

/// Every `pid=N` in a log line (the line's own process and any pid it names).
pub fn pids_in(line: &str) -> Vec<i32> {
    line.match_indices("pid=")
        .filter_map(|(i, _)| {
            let digits: String = line[i + 4..]
                .chars()
                .take_while(|c| c.is_ascii_digit())
                .collect();
            digits.parse().ok()
        })
        .collect()
}
