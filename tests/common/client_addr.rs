//! `examples/client_addr` (it answers with the peer and local address a request carries), started
//! on a TCP port and a unix socket: shared by the tests of `ConnectInfo` and of the PROXY protocol.

use std::net::SocketAddr;
use std::path::PathBuf;

use super::{Addr, Launch, Server, TempDir};

/// A running `examples/client_addr`, its TCP address and unix socket path.
pub struct ClientAddr {
    pub server: Server,
    pub tcp: SocketAddr,
    pub sock: PathBuf,
    /// Holds the socket's directory (dropped after the server).
    _dir: TempDir,
}

/// Starts `examples/client_addr` with one worker, `extra` serve flags, a TCP listener on a free
/// port and a unix socket in a fresh directory.
pub fn start(extra: &[&str]) -> ClientAddr {
    let dir = TempDir::new();
    let sock = dir.join("client_addr.sock");
    let server = Launch::example("client_addr")
        .args(["--workers", "1"])
        .args(extra)
        .args(["--listen", "127.0.0.1:0", "--listen"])
        .arg(format!("unix:{}", sock.display()))
        .start();
    let tcp = server
        .addrs()
        .iter()
        .find_map(|a| match a {
            Addr::Tcp(a) => Some(*a),
            Addr::Unix(_) => None,
        })
        .expect("a TCP listener");
    ClientAddr {
        server,
        tcp,
        sock,
        _dir: dir,
    }
}
