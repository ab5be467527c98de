//! `tine top`: a live terminal view of a running tree, from its control socket.
//!
//! Every `interval` (1 s) it asks `status --json` and draws one row per process (role, number,
//! pid, generation, state, requests/s, requests in flight, the oldest request and its age, CPU %,
//! RSS, PSS, USS, shared %), totals, the accept queues, restarts by reason and the recent events
//! (reforks, reloads, kills with their reasons). Rates come from two replies in a row: requests
//! from the scoreboard's counters, CPU % from each process's CPU time (`/proc/PID/stat`, read by
//! the monitor). Keys send the same commands as `tine ctl`: `+`/`-` scale by one, `r` refork,
//! `R` reload (confirmed), `k` kill the selected worker (confirmed), `p` profile the selected
//! worker for 10 s, arrows select, `q` quits.
//!
//! Requests run on short-lived threads of this client process (never in the server), so a slow
//! reply (a refork waits for the new generation) never freezes the screen or the keys. When the
//! server goes away the screen says so, keeps the last status greyed out, and keeps retrying.

mod status;
mod view;

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use status::{Rate, Sample, Status};

/// Seconds a profile started with `p` runs.
const PROFILE_SECONDS: u32 = 10;
/// How long a message stays on the message line.
const MESSAGE_TTL: Duration = Duration::from_secs(15);
/// A status request unanswered this long is shown as such (the figures on screen are getting
/// old); the request itself gives up after the control client's 10 s ("server went away").
const SLOW_STATUS: Duration = Duration::from_secs(2);

/// What `tine top` needs to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// The server's control socket.
    pub control_socket: PathBuf,
    /// Time between two status requests.
    pub interval: Duration,
}

/// Whether the server answers.
pub(crate) enum Connection {
    /// No reply yet.
    Connecting,
    /// The last status request was answered.
    Up,
    /// The last status request failed, since `since`.
    Lost { error: String, since: Instant },
}

/// An operation the keys ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    Scale(usize),
    Refork,
    Reload,
    Kill { nr: u32, pid: i32 },
    Profile { nr: u32, pid: i32 },
}

impl Action {
    fn command(&self) -> String {
        match self {
            Action::Scale(n) => format!("scale {n}"),
            Action::Refork => "refork".into(),
            Action::Reload => "reload".into(),
            Action::Kill { nr, pid } => format!("kill-worker {nr} --pid {pid}"),
            // By pid too: the process on the screen, never one that took its number since.
            Action::Profile { nr, pid } => {
                format!("profile {nr} --pid {pid} --seconds {PROFILE_SECONDS}")
            }
        }
    }

    fn label(&self) -> String {
        match self {
            Action::Scale(n) => format!("scale to {n}"),
            Action::Refork => "refork".into(),
            Action::Reload => "reload".into(),
            Action::Kill { nr, pid } => format!("kill worker[{nr}] (pid {pid})"),
            Action::Profile { nr, pid } => {
                format!("profile worker[{nr}] (pid {pid}) for {PROFILE_SECONDS} s")
            }
        }
    }

    /// The message line for the server's reply.
    fn outcome(&self, reply: Result<String, String>) -> Message {
        let label = self.label();
        match reply {
            Ok(out) => {
                let out = out.trim();
                let text = match self {
                    Action::Profile { nr, .. } => format!("profile of worker[{nr}]: {out}"),
                    _ => format!("{label}: {out}"),
                };
                Message::ok(text)
            }
            Err(e) if matches!(self, Action::Profile { .. }) && e.contains("unknown command") => {
                Message::error("profile: not available (this server has no `ctl profile`)".into())
            }
            // A tine from before `--pid`: asking by number alone could profile another process.
            Err(e)
                if matches!(self, Action::Profile { .. }) && e.contains("unexpected \"--pid\"") =>
            {
                Message::error(format!(
                    "{label}: this server cannot profile by pid (an older tine)"
                ))
            }
            Err(e) => Message::error(format!("{label} failed: {e}")),
        }
    }
}

/// A line for the operator.
pub(crate) struct Message {
    pub text: String,
    pub error: bool,
    at: Instant,
}

impl Message {
    fn ok(text: String) -> Message {
        Message {
            text,
            error: false,
            at: Instant::now(),
        }
    }

    fn error(text: String) -> Message {
        Message {
            text,
            error: true,
            at: Instant::now(),
        }
    }
}

/// An operation waiting for the operator's `y`.
pub(crate) struct Confirm {
    action: Action,
    pub prompt: String,
}

/// What the request threads send back.
enum Reply {
    Status(Result<String, String>, Instant),
    Done(Action, Result<String, String>),
}

/// The state of the screen.
pub(crate) struct Top {
    socket: PathBuf,
    interval: Duration,
    pub connection: Connection,
    /// The latest status that was read.
    pub sample: Option<Sample>,
    pub rates: HashMap<i32, Rate>,
    pub total_rate: Option<f64>,
    /// The selected process, by pid (kept across refreshes while it lives), and its row.
    selected_pid: Option<i32>,
    selected_row: usize,
    pub confirm: Option<Confirm>,
    pub message: Option<Message>,
    /// Operations sent and not answered yet.
    pub pending: Vec<String>,
    /// When the status request under way was sent.
    status_sent: Option<Instant>,
    next_poll: Instant,
    replies: mpsc::Sender<Reply>,
}

impl Top {
    fn new(options: &Options, replies: mpsc::Sender<Reply>) -> Top {
        Top {
            socket: options.control_socket.clone(),
            interval: options.interval,
            connection: Connection::Connecting,
            sample: None,
            rates: HashMap::new(),
            total_rate: None,
            selected_pid: None,
            selected_row: 0,
            confirm: None,
            message: None,
            pending: Vec::new(),
            status_sent: None,
            next_poll: Instant::now(),
            replies,
        }
    }

    /// How long the status request under way has waited, once that is longer than
    /// [`SLOW_STATUS`]: a monitor that is busy, stopped or starved shows as such at once, not as
    /// figures that silently stop changing.
    pub(crate) fn status_waiting(&self) -> Option<Duration> {
        self.status_sent
            .map(|sent| sent.elapsed())
            .filter(|waited| *waited > SLOW_STATUS)
    }

    fn processes(&self) -> &[status::Process] {
        self.sample
            .as_ref()
            .map(|s| s.status.processes.as_slice())
            .unwrap_or(&[])
    }

    /// The row of the selected process.
    pub(crate) fn selected_index(&self) -> Option<usize> {
        let rows = self.processes();
        if rows.is_empty() {
            return None;
        }
        Some(self.selected_row.min(rows.len() - 1))
    }

    fn selected(&self) -> Option<&status::Process> {
        self.selected_index().map(|i| &self.processes()[i])
    }

    /// Sends a status request (`None`) or an action's command on a thread of its own; its reply
    /// comes back through the channel.
    fn send(&self, job: Option<Action>) {
        let reply = |job: Option<Action>, result| match job {
            None => Reply::Status(result, Instant::now()),
            Some(action) => Reply::Done(action, result),
        };
        let command = job
            .as_ref()
            .map(Action::command)
            .unwrap_or_else(|| "status --json".into());
        let (socket, replies, sent) = (self.socket.clone(), self.replies.clone(), job.clone());
        let spawned = std::thread::Builder::new()
            .name("tine-top-ctl".into())
            .spawn(move || {
                let result = crate::ctl::client::request(&socket, &command);
                let _ = replies.send(reply(sent, result));
            });
        if let Err(e) = spawned {
            let error = format!("cannot start a request thread: {e}");
            let _ = self.replies.send(reply(job, Err(error)));
        }
    }

    fn poll_status(&mut self) {
        if self.status_sent.is_some() || Instant::now() < self.next_poll {
            return;
        }
        self.status_sent = Some(Instant::now());
        self.send(None);
    }

    fn run_action(&mut self, action: Action) {
        self.pending.push(action.label());
        self.message = None;
        self.send(Some(action));
    }

    fn on_reply(&mut self, reply: Reply) {
        match reply {
            Reply::Status(result, at) => {
                self.status_sent = None;
                self.next_poll = at + self.interval;
                match result.and_then(|text| Status::parse(&text)) {
                    Ok(status) => self.on_status(status, at),
                    Err(error) => {
                        if !matches!(self.connection, Connection::Lost { .. }) {
                            self.connection = Connection::Lost {
                                error,
                                since: Instant::now(),
                            };
                        } else if let Connection::Lost { error: e, .. } = &mut self.connection {
                            *e = error;
                        }
                    }
                }
            }
            Reply::Done(action, result) => {
                let label = action.label();
                if let Some(i) = self.pending.iter().position(|p| *p == label) {
                    self.pending.remove(i);
                }
                self.message = Some(action.outcome(result));
                // Show what the operation changed at once.
                self.next_poll = Instant::now();
            }
        }
    }

    fn on_status(&mut self, status: Status, at: Instant) {
        let current = Sample { status, at };
        match &self.sample {
            Some(prev) if matches!(self.connection, Connection::Up) => {
                let elapsed = at.saturating_duration_since(prev.at);
                self.rates = status::rates(&prev.status, &current.status, elapsed);
                self.total_rate = Some(status::total_rate(prev, &current, &self.rates));
            }
            _ => {
                // First reply, or the first after an outage: no rate until the next one.
                self.rates.clear();
                self.total_rate = None;
            }
        }
        let procs = &current.status.processes;
        self.selected_row = match self
            .selected_pid
            .and_then(|pid| procs.iter().position(|p| p.pid == pid))
        {
            Some(i) => i,
            // First reply: the first worker; a process that went: whatever took its row.
            None if self.selected_pid.is_none() => {
                procs.iter().position(|p| p.role == "worker").unwrap_or(0)
            }
            None => self.selected_row.min(procs.len().saturating_sub(1)),
        };
        self.selected_pid = procs.get(self.selected_row).map(|p| p.pid);
        self.sample = Some(current);
        self.connection = Connection::Up;
    }

    fn select(&mut self, delta: isize) {
        let n = self.processes().len();
        if n == 0 {
            return;
        }
        let row = self.selected_row.min(n - 1) as isize + delta;
        self.selected_row = row.clamp(0, n as isize - 1) as usize;
        self.selected_pid = self.processes().get(self.selected_row).map(|p| p.pid);
    }

    /// The selected worker, or the reason there is none to act on.
    fn selected_worker(&self, verb: &str) -> Result<(u32, i32), String> {
        let p = self
            .selected()
            .ok_or_else(|| format!("{verb}: no status yet"))?;
        match (p.role.as_str(), p.nr) {
            ("worker", Some(_)) if p.state == "retiring" => Err(format!(
                "{verb}: worker[{}] (pid {}) is already leaving",
                p.nr.unwrap_or(0),
                p.pid
            )),
            ("worker", Some(nr)) => Ok((nr, p.pid)),
            (role, _) => Err(format!(
                "{verb}: select a worker with ↑/↓ (this row is the {role})"
            )),
        }
    }

    /// Handles a key; returns false to quit.
    fn on_key(&mut self, key: KeyEvent) -> bool {
        if key.kind == KeyEventKind::Release {
            return true;
        }
        let ctrl_c =
            key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c');
        if ctrl_c {
            return false;
        }
        if let Some(confirm) = self.confirm.take() {
            match key.code {
                KeyCode::Char('y') | KeyCode::Char('Y') => self.run_action(confirm.action),
                _ => {
                    self.message = Some(Message::ok(format!(
                        "{}: cancelled",
                        confirm.action.label()
                    )))
                }
            }
            return true;
        }
        let target = self.sample.as_ref().map(|s| s.status.target);
        let max = self.sample.as_ref().and_then(|s| s.status.max_workers);
        match key.code {
            KeyCode::Char('q') | KeyCode::Esc => return false,
            KeyCode::Up => self.select(-1),
            KeyCode::Down => self.select(1),
            KeyCode::PageUp | KeyCode::Home => self.select(isize::MIN / 2),
            KeyCode::PageDown | KeyCode::End => self.select(isize::MAX / 2),
            KeyCode::Char('+') | KeyCode::Char('=') => match target {
                Some(t) if max.is_some_and(|m| t >= m) => {
                    self.message = Some(Message::error(format!(
                        "scale: already at max_workers ({t})"
                    )))
                }
                Some(t) => self.run_action(Action::Scale(t + 1)),
                None => self.message = Some(Message::error("scale: no status yet".into())),
            },
            KeyCode::Char('-') => match target {
                Some(t) if t <= 1 => {
                    self.message = Some(Message::error("scale: one worker is the least".into()))
                }
                Some(t) => self.run_action(Action::Scale(t - 1)),
                None => self.message = Some(Message::error("scale: no status yet".into())),
            },
            KeyCode::Char('r') => self.run_action(Action::Refork),
            KeyCode::Char('R') => {
                self.confirm = Some(Confirm {
                    action: Action::Reload,
                    prompt: "Reload the server (preflight, re-exec, every worker replaced)?".into(),
                })
            }
            KeyCode::Char('k') => match self.selected_worker("kill") {
                Ok((nr, pid)) => {
                    let action = Action::Kill { nr, pid };
                    self.confirm = Some(Confirm {
                        prompt: format!("Kill worker[{nr}] (pid {pid}) now (SIGKILL)?"),
                        action,
                    });
                }
                Err(e) => self.message = Some(Message::error(e)),
            },
            KeyCode::Char('p') => match self.selected_worker("profile") {
                Ok((nr, pid)) => self.run_action(Action::Profile { nr, pid }),
                Err(e) => self.message = Some(Message::error(e)),
            },
            _ => {}
        }
        true
    }

    fn expire_message(&mut self) {
        if self
            .message
            .as_ref()
            .is_some_and(|m| m.at.elapsed() > MESSAGE_TTL)
        {
            self.message = None;
        }
    }
}

/// How `tine top` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The operator quit (`q`, Esc, Ctrl-C).
    Quit,
    /// A signal asked it to stop (SIGTERM, SIGHUP, SIGINT, SIGQUIT): the terminal was given back;
    /// exit with 128 + this number, as a shell reports a process ended by it.
    Signal(i32),
}

/// Signals that end `tine top` with the terminal given back (their default action would kill it
/// in raw mode on the alternate screen, leaving the operator's shell without echo).
const STOP_SIGNALS: [i32; 4] = [
    signal_hook::consts::SIGTERM,
    signal_hook::consts::SIGHUP,
    signal_hook::consts::SIGINT,
    signal_hook::consts::SIGQUIT,
];
/// How long the screen loop has, after a stop signal, to give the terminal back itself before the
/// signal thread does it and exits (the loop checks every ≤ 200 ms; this covers a loop stuck in a
/// write to a terminal nobody reads).
const STOP_GRACE: Duration = Duration::from_secs(1);
/// Room for one whole frame, so that each frame reaches the terminal in one write: a terminal
/// (or tmux) reading while a frame is half written would otherwise show half a frame.
const FRAME_BUFFER: usize = 256 * 1024;

/// The signal that asked `tine top` to stop (0: none yet).
static STOP: AtomicI32 = AtomicI32::new(0);

/// Puts the terminal back as it was: cooked mode (echo, line editing), the main screen, the
/// cursor shown. Written to stderr (the same terminal), not stdout: the screen loop may hold
/// stdout's lock in a write when a signal's thread calls this.
fn give_back_terminal() {
    let _ = ratatui::crossterm::terminal::disable_raw_mode();
    let _ = ratatui::crossterm::execute!(
        std::io::stderr(),
        ratatui::crossterm::terminal::LeaveAlternateScreen,
        ratatui::crossterm::cursor::Show
    );
}

/// Starts the thread that turns a stop signal into a clean exit: it tells the screen loop, and if
/// the loop has not ended the process within [`STOP_GRACE`], gives the terminal back itself and
/// exits with 128 + the signal.
fn watch_stop_signals() -> std::io::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new(STOP_SIGNALS)?;
    std::thread::Builder::new()
        .name("tine-top-signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                STOP.store(signal, Ordering::SeqCst);
                std::thread::sleep(STOP_GRACE);
                give_back_terminal();
                std::process::exit(128 + signal);
            }
        })?;
    Ok(())
}

/// Runs `tine top` until `q` or a stop signal. Fails at once, with a clear message, without a
/// terminal. The terminal is given back on every way out: quitting, an error, a stop signal
/// (SIGTERM, SIGHUP, SIGINT, SIGQUIT) and a panic.
pub fn run(options: Options) -> Result<Ended, String> {
    if !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
        return Err("tine top needs a terminal (use `tine ctl status --json` in scripts)".into());
    }
    watch_stop_signals().map_err(|e| format!("cannot watch for stop signals: {e}"))?;
    let (tx, rx) = mpsc::channel();
    let mut top = Top::new(&options, tx);
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        give_back_terminal();
        hook(info);
    }));
    let mut terminal = (|| {
        ratatui::crossterm::terminal::enable_raw_mode()?;
        ratatui::crossterm::execute!(
            std::io::stdout(),
            ratatui::crossterm::terminal::EnterAlternateScreen
        )?;
        let out = std::io::BufWriter::with_capacity(FRAME_BUFFER, std::io::stdout());
        ratatui::Terminal::new(ratatui::backend::CrosstermBackend::new(out))
    })()
    .map_err(|e| {
        give_back_terminal();
        format!("cannot set up the terminal: {e}")
    })?;
    let result = (|| -> std::io::Result<Ended> {
        loop {
            if let signal @ 1.. = STOP.load(Ordering::SeqCst) {
                return Ok(Ended::Signal(signal));
            }
            top.poll_status();
            while let Ok(reply) = rx.try_recv() {
                top.on_reply(reply);
            }
            top.expire_message();
            terminal.draw(|frame| view::draw(frame, &top))?;
            // Wake for the next status, a key, or a reply (checked a few times a second).
            let wait = top
                .next_poll
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(10), Duration::from_millis(200));
            if event::poll(wait)? {
                match event::read()? {
                    Event::Key(key) if !top.on_key(key) => return Ok(Ended::Quit),
                    Event::Resize(..) => terminal.autoresize()?,
                    _ => {}
                }
            }
        }
    })();
    drop(terminal);
    give_back_terminal();
    result.map_err(|e| format!("terminal: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn top_with(rows: &[(&str, Option<u32>, i32, &str)]) -> Top {
        let (tx, _rx) = mpsc::channel();
        let options = Options {
            control_socket: "x.sock".into(),
            interval: Duration::from_secs(1),
        };
        let mut top = Top::new(&options, tx);
        let status = Status {
            processes: rows
                .iter()
                .map(|(role, nr, pid, state)| status::Process {
                    role: role.to_string(),
                    nr: *nr,
                    pid: *pid,
                    state: state.to_string(),
                    ..Default::default()
                })
                .collect(),
            target: 2,
            max_workers: Some(4),
            ..Default::default()
        };
        top.on_status(status, Instant::now());
        top
    }

    fn key(c: KeyCode) -> KeyEvent {
        KeyEvent::new(c, KeyModifiers::NONE)
    }

    #[test]
    fn the_first_worker_is_selected_and_the_selection_follows_its_pid() {
        let mut top = top_with(&[
            ("monitor", None, 1, "running"),
            ("mold", None, 2, "ready"),
            ("worker", Some(0), 3, "ready"),
            ("worker", Some(1), 4, "ready"),
        ]);
        assert_eq!(top.selected().map(|p| p.pid), Some(3));
        top.on_key(key(KeyCode::Down));
        assert_eq!(top.selected().map(|p| p.pid), Some(4));
        // A retiring older worker appears above it: the selection stays on pid 4.
        let mut status = top.sample.clone().unwrap().status;
        status.processes.insert(
            2,
            status::Process {
                role: "worker".into(),
                nr: Some(0),
                pid: 9,
                state: "retiring".into(),
                ..Default::default()
            },
        );
        top.on_status(status, Instant::now());
        assert_eq!(top.selected().map(|p| p.pid), Some(4));
    }

    #[test]
    fn kill_asks_first_and_only_for_a_worker() {
        let mut top = top_with(&[("mold", None, 2, "ready"), ("worker", Some(0), 3, "ready")]);
        top.on_key(key(KeyCode::Char('k')));
        let confirm = top.confirm.as_ref().expect("asks to confirm");
        assert_eq!(confirm.action, Action::Kill { nr: 0, pid: 3 });
        top.on_key(key(KeyCode::Char('n')));
        assert!(top.confirm.is_none() && top.pending.is_empty(), "n cancels");
        top.on_key(key(KeyCode::Up));
        top.on_key(key(KeyCode::Char('k')));
        assert!(top.confirm.is_none());
        assert!(top
            .message
            .as_ref()
            .is_some_and(|m| m.error && m.text.contains("mold")));
    }

    #[test]
    fn scaling_stays_within_one_and_max_workers() {
        let mut top = top_with(&[("worker", Some(0), 3, "ready")]);
        top.sample.as_mut().unwrap().status.target = 4;
        top.on_key(key(KeyCode::Char('+')));
        assert!(top.pending.is_empty());
        assert!(top
            .message
            .as_ref()
            .is_some_and(|m| m.text.contains("max_workers")));
        top.sample.as_mut().unwrap().status.target = 1;
        top.on_key(key(KeyCode::Char('-')));
        assert!(top.pending.is_empty());
        assert_eq!(Action::Scale(3).command(), "scale 3");
        assert_eq!(
            Action::Profile { nr: 2, pid: 5 }.command(),
            "profile 2 --pid 5 --seconds 10"
        );
    }

    #[test]
    fn a_server_without_profile_says_not_available() {
        let action = Action::Profile { nr: 1, pid: 5 };
        let m = action.outcome(Err(
            "unknown command \"profile 1 --pid 5 --seconds 10\"; expected …".into(),
        ));
        assert!(
            m.error && m.text.starts_with("profile: not available"),
            "{}",
            m.text
        );
        let m = action.outcome(Err(
            "profile: unexpected \"--pid\"; usage: profile NR [--seconds N] [--json]".into(),
        ));
        assert!(
            m.error && m.text.contains("cannot profile by pid"),
            "{}",
            m.text
        );
        let m = action.outcome(Ok("/tmp/tine-profile-worker1-5-1.svg\n".into()));
        assert_eq!(
            m.text,
            "profile of worker[1]: /tmp/tine-profile-worker1-5-1.svg"
        );
    }
}
