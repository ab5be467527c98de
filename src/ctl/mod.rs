//! The control socket's protocol and its client: what `tine ctl` and `tine top` send, and what
//! the monitor (`monitor/control.rs`, the server) answers. Below both the command line and the
//! monitor, and using neither.

pub(crate) mod client;
pub(crate) mod protocol;
