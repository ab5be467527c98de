//! Every `unsafe` system call wrapper of tine lives here, each block with a `// SAFETY:` comment.
//!
//! The rest of the crate is safe Rust: it calls these wrappers, or nix's safe API directly.

pub mod epoll;
pub mod fd;
pub mod fs;
pub mod io;
pub mod meminfo;
pub mod process;
pub mod proctitle;
pub mod shm;
pub mod spawner;
