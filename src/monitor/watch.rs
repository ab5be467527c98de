//! Development mode (`--watch PATH`, `--watch-boot PATH`): an inotify fd in the monitor's poll
//! loop, no watcher thread. Directories are watched (editors and cargo replace files rather than
//! write them in place); changes are debounced for at most 20 ms. A change under a `--watch-boot`
//! path rolls the workers from the current mold (no preload: fast); any other change, a queue
//! overflow, or a rebuilt executable does the full reload.

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};

/// How long changes are gathered before acting.
pub(crate) const DEBOUNCE: Duration = Duration::from_millis(20);
/// Most directories watched under one path (a guard against watching a whole disk).
const MAX_DIRS: usize = 10_000;

/// What a change asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Scope {
    /// Only `boot` reads it: new workers from the current mold.
    Boot,
    /// Everything: re-exec, new preload.
    Full,
}

struct Watched {
    dir: PathBuf,
    scope: Scope,
    /// Only this entry of the directory (a watched file, or the executable).
    only: Option<OsString>,
}

/// The watcher: one inotify fd, its watches, and the change being debounced.
pub(crate) struct Watcher {
    inotify: Inotify,
    watches: HashMap<WatchDescriptor, Watched>,
    pending: Option<(Instant, Scope, PathBuf)>,
}

fn flags() -> AddWatchFlags {
    AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_ATTRIB
}

impl Watcher {
    /// Watches `full` and `boot` paths, and the executable (a rebuilt binary is a full reload).
    pub(crate) fn new(full: &[PathBuf], boot: &[PathBuf], exe: &Path) -> std::io::Result<Watcher> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        let mut w = Watcher {
            inotify,
            watches: HashMap::new(),
            pending: None,
        };
        for p in boot {
            w.watch_path(p, Scope::Boot)?;
        }
        for p in full {
            w.watch_path(p, Scope::Full)?;
        }
        if let (Some(dir), Some(name)) = (exe.parent(), exe.file_name()) {
            w.add(dir, Scope::Full, Some(name.to_owned()))?;
        }
        Ok(w)
    }

    fn watch_path(&mut self, path: &Path, scope: Scope) -> std::io::Result<()> {
        let meta = std::fs::metadata(path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("watch {}: {e}", path.display())))?;
        if meta.is_dir() {
            let mut stack = vec![path.to_path_buf()];
            let mut count = 0;
            while let Some(dir) = stack.pop() {
                count += 1;
                if count > MAX_DIRS {
                    break;
                }
                self.add(&dir, scope, None)?;
                if let Ok(entries) = std::fs::read_dir(&dir) {
                    for e in entries.flatten() {
                        if e.file_type().is_ok_and(|t| t.is_dir()) && !is_noise(&e.file_name()) {
                            stack.push(e.path());
                        }
                    }
                }
            }
            Ok(())
        } else {
            let dir = path
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            self.add(dir, scope, path.file_name().map(|n| n.to_owned()))
        }
    }

    fn add(&mut self, dir: &Path, scope: Scope, only: Option<OsString>) -> std::io::Result<()> {
        let wd = self.inotify.add_watch(dir, flags())?;
        // One directory may be watched for several reasons: keep the widest.
        let entry = self.watches.entry(wd).or_insert(Watched {
            dir: dir.to_path_buf(),
            scope,
            only: only.clone(),
        });
        if entry.only.is_some() && only.is_none() {
            entry.only = None;
        }
        entry.scope = entry.scope.max(scope);
        Ok(())
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.inotify.as_fd()
    }

    /// Reads pending events; starts the debounce window on the first relevant one.
    pub(crate) fn on_readable(&mut self) {
        while let Ok(events) = self.inotify.read_events() {
            if events.is_empty() {
                break;
            }
            for ev in events {
                if ev.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                    self.note(Scope::Full, PathBuf::from("(inotify queue overflow)"));
                    continue;
                }
                let Some(w) = self.watches.get(&ev.wd) else {
                    continue;
                };
                let Some(name) = ev.name else { continue };
                if is_noise(&name) || w.only.as_ref().is_some_and(|only| *only != name) {
                    continue;
                }
                let (scope, path) = (w.scope, w.dir.join(&name));
                if ev
                    .mask
                    .contains(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_ISDIR)
                    && w.only.is_none()
                {
                    let _ = self.add(&path, scope, None);
                }
                self.note(scope, path);
            }
        }
    }

    /// Adds a change to the pending one. The path kept is the first one of the widest scope: the
    /// log must name what made a boot-only change a full reload (a queue overflow, the executable).
    fn note(&mut self, scope: Scope, path: PathBuf) {
        match &mut self.pending {
            Some((_, s, p)) => {
                if scope > *s {
                    *s = scope;
                    *p = path;
                }
            }
            None => self.pending = Some((Instant::now() + DEBOUNCE, scope, path)),
        }
    }

    /// When the pending change is due, if any.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.pending.as_ref().map(|(d, _, _)| *d)
    }

    /// The debounced change, once its window has passed.
    pub(crate) fn take_due(&mut self) -> Option<(Scope, PathBuf)> {
        match &self.pending {
            Some((due, _, _)) if Instant::now() >= *due => {
                self.pending.take().map(|(_, s, p)| (s, p))
            }
            _ => None,
        }
    }
}

/// Editor swap files and build noise that never warrant a reload.
fn is_noise(name: &std::ffi::OsStr) -> bool {
    let n = name.to_string_lossy();
    n.starts_with(".#")
        || n.ends_with('~')
        || n.ends_with(".swp")
        || n.ends_with(".swx")
        || n == ".git"
        || n == "target"
}

impl super::Monitor {
    /// Acts on a debounced change, and times a boot-only reload to its end.
    pub(crate) fn check_watch(&mut self) {
        if let Some((since, path)) = &self.boot_reload {
            let rolling = self
                .children
                .values()
                .any(|c| c.recycle.as_deref() == Some(BOOT_RELOAD));
            if !rolling {
                tracing::info!(changed = %path.display(), ms = since.elapsed().as_millis() as u64, "boot reload complete");
                self.boot_reload = None;
            }
        }
        let Some((scope, path)) = self.watcher.as_mut().and_then(|w| w.take_due()) else {
            return;
        };
        if !self.is_running() {
            return;
        }
        match scope {
            Scope::Full => {
                tracing::info!(changed = %path.display(), "watch: full reload");
                self.reload(None, "watch");
            }
            Scope::Boot => {
                tracing::info!(changed = %path.display(), "watch: new workers from the current mold");
                for c in self.children.values_mut() {
                    if c.is_active_worker() {
                        c.recycle = Some(BOOT_RELOAD.into());
                    }
                }
                // Spares ran `boot` with the old files: new ones boot with the new.
                let spares: Vec<usize> = self
                    .children
                    .iter()
                    .filter(|(_, c)| c.kind == super::Kind::Spare)
                    .map(|(s, _)| *s)
                    .collect();
                for slot in spares {
                    self.retire(slot, BOOT_RELOAD);
                }
                self.boot_reload = Some((Instant::now(), path));
            }
        }
    }
}

/// Recycle reason of a boot-only reload (every worker at once, replace-then-retire).
pub(crate) const BOOT_RELOAD: &str = "boot reload";
