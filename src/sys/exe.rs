//! The executable and the command line this process started with, saved once at start: a
//! reload re-executes (and first preflights) the file at that path with those arguments, and
//! development mode watches it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

static ARGV: OnceLock<Vec<OsString>> = OnceLock::new();
static EXE: OnceLock<PathBuf> = OnceLock::new();

/// Saves the command line and the executable's path. Called first thing by `tine::run`, before
/// the process title overwrites the argument area; later calls change nothing.
pub(crate) fn save() {
    let _ = ARGV.set(std::env::args_os().collect());
    if let Ok(exe) = std::env::current_exe() {
        // After a rebuild replaced the file, the kernel's link names the old inode "(deleted)".
        let text = exe.to_string_lossy();
        let _ = EXE.set(PathBuf::from(
            text.strip_suffix(" (deleted)").unwrap_or(&text).to_string(),
        ));
    }
}

/// The absolute path of the executable, saved at start. A reload runs the file at this path (not
/// `/proc/self/exe`, which keeps naming the old inode after a rebuild replaced the file).
pub(crate) fn saved_exe() -> &'static Path {
    EXE.get()
        .map(PathBuf::as_path)
        .unwrap_or(Path::new("/proc/self/exe"))
}

/// The command line this process started with (saved before the process title overwrote it).
pub(crate) fn saved_argv() -> &'static [OsString] {
    ARGV.get().map(Vec::as_slice).unwrap_or(&[])
}
