//! Process titles: what `ps` shows for each process of the tree.
//!
//! `ps` reads `/proc/PID/cmdline`, which is the memory between `arg_start` and `arg_end` of the
//! process (and, once the last byte of that has been overwritten, on into the environment area).
//! [`init`] copies the environment to the heap and points `environ` at the copy, which frees the
//! whole argv + environment area; [`set`] then writes the title there. The original argv must be
//! saved by the caller before `init` (Rust's `std::env::args` reads the original area).

use std::ffi::CString;
use std::sync::Mutex;

/// The writable area: start address and length.
static AREA: Mutex<Option<(usize, usize)>> = Mutex::new(None);

extern "C" {
    static mut environ: *mut *mut libc::c_char;
}

/// Reads `arg_start`, `arg_end`, `env_start`, `env_end` from `/proc/self/stat`.
fn stat_areas() -> Option<[usize; 4]> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field 48 of stat(5) is arg_start; `rest` starts at field 3.
    let get = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<usize>().ok());
    Some([get(48)?, get(49)?, get(50)?, get(51)?])
}

/// Moves the environment out of the argv area so that [`set`] may use all of it.
///
/// Call once, early, while the process is single-threaded, after saving argv.
pub fn init() {
    let mut area = AREA.lock().unwrap_or_else(|e| e.into_inner());
    if area.is_some() {
        return;
    }
    let Some([arg_start, arg_end, env_start, env_end]) = stat_areas() else {
        return;
    };
    // Copy every environment string to the heap and build a new NULL-terminated array. Leaked on
    // purpose: `environ` must stay valid for the life of the process.
    let vars: Vec<CString> = std::env::vars_os()
        .filter_map(|(k, v)| {
            let mut bytes = k.into_encoded_bytes();
            bytes.push(b'=');
            bytes.extend(v.into_encoded_bytes());
            CString::new(bytes).ok()
        })
        .collect();
    let mut ptrs: Vec<*mut libc::c_char> =
        vars.into_iter().map(|s| s.into_raw()).collect::<Vec<_>>();
    ptrs.push(std::ptr::null_mut());
    let table = Box::leak(ptrs.into_boxed_slice());
    // SAFETY: the process is single-threaded here (documented precondition), so nothing reads
    // `environ` while it is swapped; the new table and its strings are leaked and live forever.
    unsafe { environ = table.as_mut_ptr() };
    let end = if env_start >= arg_end && env_end > env_start {
        env_end
    } else {
        arg_end
    };
    *area = Some((arg_start, end - arg_start));
}

/// Sets the process title. Longer titles are cut to the available area.
pub fn set(title: &str) {
    let area = AREA.lock().unwrap_or_else(|e| e.into_inner());
    let Some((start, len)) = *area else { return };
    if len < 2 {
        return;
    }
    let bytes = title.as_bytes();
    let n = bytes.len().min(len - 1);
    // SAFETY: [start, start+len) is this process's own argv+environment area, mapped writable for
    // the life of the process; `init` moved every reader of the environment off it and the caller
    // saved argv, so nothing else reads these bytes as Rust data.
    unsafe {
        let dst = start as *mut u8;
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, n);
        std::ptr::write_bytes(dst.add(n), 0, len - n);
    }
}
