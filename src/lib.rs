//! tine: a preforking, reforking application server and process-pool library for Linux.
#![deny(missing_docs)]

pub mod app;
mod child;
pub mod cli;
pub mod config;
mod control;
pub mod ipc;
pub mod listener;
mod log;
mod monitor;
mod mold;
pub mod spawner;
pub mod sys;
mod worker;

pub use app::{App, Connection, Context, Handler, Worker};
pub use cli::run;
pub use config::Config;
pub use monitor::MonitorError;
