//! The Rust blocks of `README.md` and `docs/*.md`, compiled by `cargo test` as doctests (and run,
//! unless marked `no_run`), so the examples people copy keep compiling.
//!
//! How a fenced block in those files is treated (rustdoc's rules):
//! * ```` ```rust ```` (or a fence with no language): compiled and run; it is wrapped in
//!   `fn main() { .. }` unless it has one. Mark it ```` ```rust,no_run ```` to compile it only.
//! * ```` ```rust,ignore ````: a sketch, not compiled. Say in the text that it is one.
//! * any other language (```` ```text ````, ```` ```sh ````, ```` ```toml ````, ...): not compiled.
//!
//! Every Markdown file of `docs/` must be listed here; `tests/docs.rs` checks that, and that every
//! fence names its language.

#[doc = include_str!("../README.md")]
pub struct Readme;

#[doc = include_str!("../docs/CONFIG.md")]
pub struct Config;

#[doc = include_str!("../docs/DEPLOYMENT.md")]
pub struct Deployment;

#[doc = include_str!("../docs/DEBUGGING.md")]
pub struct Debugging;

#[doc = include_str!("../docs/FAQ.md")]
pub struct Faq;

#[doc = include_str!("../docs/FORK_SAFETY.md")]
pub struct ForkSafety;

#[doc = include_str!("../docs/REFORKING.md")]
pub struct Reforking;

#[doc = include_str!("../docs/SIGNALS.md")]
pub struct Signals;

#[doc = include_str!("../docs/SPAWNER.md")]
pub struct Spawner;
