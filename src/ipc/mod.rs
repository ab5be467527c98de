//! Inter-process communication: the per-child channel, its messages, and the scoreboard.

pub mod channel;
pub mod message;
pub mod scoreboard;
