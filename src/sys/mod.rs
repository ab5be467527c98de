//! Every `unsafe` system call wrapper of tine lives here, each block with a `// SAFETY:` comment.
//!
//! The rest of the crate is safe Rust: it calls these wrappers, or nix's safe API directly.
//!
//! A public function here is sound for any arguments. Wrappers whose contract cannot be checked
//! (take ownership of any descriptor number, close every descriptor but some, fork without
//! counting threads, switch the policy of a thread named by number, replace descriptors other
//! values own, hand the kernel a reactor's token for
//! another descriptor, or for one whose owner is unknown) are crate-private, each with a
//! `# Contract` section its callers uphold; these do not compile outside the crate:
//!
//! ```compile_fail
//! let _ = tine::sys::fd::adopt(0);
//! ```
//! ```compile_fail
//! let _ = tine::sys::process::close_fds_except(&[0, 1, 2]);
//! ```
//! ```compile_fail
//! let _ = tine::sys::spawner::fork_single_threaded();
//! ```
//! ```compile_fail
//! let _ = tine::sys::fd::renew_socket_pair(3, 4);
//! ```
//! ```compile_fail
//! let _ = tine::sys::epoll::learn_registration(0);
//! ```
//! ```compile_fail
//! use tine::sys::process::{switch_policy_of, Policy};
//! let _ = switch_policy_of(1, Policy::Other, Policy::Batch);
//! ```
//! ```compile_fail
//! let _ = tine::sys::epoll::Switch::new(std::net::TcpListener::bind("127.0.0.1:0").unwrap());
//! ```

#[cfg(any(feature = "server", test))]
pub(crate) mod bpf;
pub mod epoll;
#[cfg(feature = "server")]
pub(crate) mod exe;
pub mod fd;
pub mod fs;
pub mod futex;
#[cfg(feature = "server")]
pub(crate) mod holder;
pub mod io;
pub mod meminfo;
pub mod pidfd;
pub mod process;
pub mod proctitle;
#[cfg(feature = "server")]
pub mod sampling;
pub mod shm;
pub mod spawner;
