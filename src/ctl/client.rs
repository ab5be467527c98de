//! The client side of the control socket (`tine ctl`, and `tine top`'s requests).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use super::protocol;

/// Sends `command` to the control socket at `path`; returns the reply.
pub(crate) fn request(path: &Path, command: &str) -> protocol::Reply {
    let mut stream = UnixStream::connect(path)
        .map_err(|e| format!("cannot connect to {}: {e}", path.display()))?;
    stream
        .set_read_timeout(Some(protocol::patience(command)))
        .map_err(|e| e.to_string())?;
    // A server that refuses us may close before we finish writing: its reply still counts.
    let sent = stream.write_all(format!("{command}\n").as_bytes());
    // Read to EOF; a reset after the reply (the server closed with our bytes unread) still
    // leaves the reply readable.
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if bytes.is_empty() => return Err(format!("reading the reply: {e}")),
            Err(_) => break,
        }
    }
    if let (Err(e), true) = (sent, bytes.is_empty()) {
        return Err(format!("sending the command: {e}"));
    }
    protocol::decode_reply(&bytes)
}
