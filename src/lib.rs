//! tine: a preforking, reforking application server and process-pool library for Linux.
//!
//! (The theory of operation is written as the pieces land.)
#![deny(missing_docs)]

pub mod spawner;
pub mod sys;
