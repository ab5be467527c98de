//! A terminal program under test, as a person sees it: tmux runs it in a detached session of a
//! given size, [`Tmux::keys`] types, [`Tmux::screen`] reads what is shown. Each [`Tmux`] has a
//! tmux server of its own (its socket in a temp dir of its own, no config file), killed with
//! everything in it when the value drops, pass or fail, and its socket removed.

use std::ffi::OsStr;
use std::process::{Command, Output};
use std::time::Duration;

use super::stall::poll_until_running;
use super::TempDir;

/// One tmux server with one session running one shell command.
pub struct Tmux {
    /// Holds the server's socket; removed after the server is killed (fields drop after `drop`).
    dir: TempDir,
}

impl Tmux {
    /// Starts `sh -c SCRIPT` in a new detached session of `width`×`height` cells. `env` is set in
    /// the shell. Panics with a clear message if tmux is missing (`.ci/run` installs it).
    pub fn start(width: u16, height: u16, script: &str, env: &[(&str, &OsStr)]) -> Tmux {
        let tmux = Tmux {
            dir: TempDir::new(),
        };
        // The script is given through the environment, so no quoting of it is needed.
        let mut cmd = tmux.command();
        cmd.args(["new-session", "-d", "-s", "test", "-x"])
            .arg(width.to_string())
            .arg("-y")
            .arg(height.to_string())
            .arg("sh -c \"$TINE_TEST_SCRIPT\"")
            .env("TINE_TEST_SCRIPT", script)
            .env_remove("TMUX");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap_or_else(|e| {
            panic!("cannot run tmux ({e}): the tests of `tine top` need it (.ci/run installs it)")
        });
        assert!(out.status.success(), "tmux new-session: {}", text(&out));
        tmux
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new("tmux");
        cmd.args(["-u", "-f", "/dev/null", "-S"])
            .arg(self.dir.join("tmux.sock"));
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        let out = self
            .command()
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("tmux {args:?}: {e}"));
        assert!(out.status.success(), "tmux {args:?}: {}", text(&out));
        out
    }

    /// What the pane shows now, one line per row.
    pub fn screen(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "test"]).stdout).into()
    }

    /// Types keys, in tmux's names (`Down`, `q`, `Enter`, `C-c`); `+` and the like are literal.
    pub fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "test"];
        args.extend(keys);
        self.run(&args);
    }

    /// Resizes the window (and so the program's terminal).
    pub fn resize(&self, width: u16, height: u16) {
        let (w, h) = (width.to_string(), height.to_string());
        self.run(&["resize-window", "-t", "test", "-x", &w, "-y", &h]);
    }

    /// Waits until the screen satisfies `pred`; returns that screen. Panics with `what` and the
    /// last screen after `timeout` of time the machine ran (see [`poll_until_running`]: a stall of
    /// the whole machine stops the program under test too).
    pub fn wait(&self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let mut last = String::new();
        poll_until_running(timeout, || {
            last = self.screen();
            pred(&last).then(|| last.clone())
        })
        .unwrap_or_else(|stalled| {
            panic!(
                "the screen never showed {what} within {timeout:?} (plus {stalled:.1?} the \
                 machine stalled meanwhile):\n{last}"
            )
        })
    }

    /// Waits until the screen contains `text`.
    pub fn wait_for(&self, text: &str, timeout: Duration) -> String {
        self.wait(&format!("{text:?}"), timeout, |s| s.contains(text))
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        // Closing the session's terminal hangs up everything in it.
        let _ = self.command().arg("kill-server").output();
    }
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}
