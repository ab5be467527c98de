//! Listening sockets: bound once by the monitor, inherited by every child.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::PermissionsExt;

use socket2::{Domain, Socket, Type};

use crate::config::{Config, ListenAddr};
use crate::sys::bpf::op;

/// A bound, listening socket.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(std::net::TcpListener, ListenAddr),
    /// Unix stream.
    Unix(std::os::unix::net::UnixListener, ListenAddr),
}

/// A listener could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {reason}")]
pub struct BindError {
    /// The address.
    pub addr: ListenAddr,
    /// Why.
    pub reason: String,
}

impl Listener {
    /// The configured address (for a TCP port 0, the address actually bound).
    pub fn addr(&self) -> ListenAddr {
        match self {
            Listener::Tcp(l, a) => l
                .local_addr()
                .map(ListenAddr::Tcp)
                .unwrap_or_else(|_| a.clone()),
            Listener::Unix(_, a) => a.clone(),
        }
    }

    /// Binds every address of the config.
    pub fn bind_all(cfg: &Config) -> Result<Vec<Listener>, BindError> {
        cfg.listen
            .iter()
            .map(|addr| Listener::bind(addr, cfg))
            .collect()
    }

    fn bind(addr: &ListenAddr, cfg: &Config) -> Result<Listener, BindError> {
        let fail = |e: io::Error| BindError {
            addr: addr.clone(),
            reason: e.to_string(),
        };
        match addr {
            ListenAddr::Tcp(sa) => {
                let socket =
                    Socket::new(Domain::for_address(*sa), Type::STREAM, None).map_err(fail)?;
                socket.set_reuse_address(true).map_err(fail)?;
                if cfg.reuseport {
                    socket.set_reuse_port(true).map_err(fail)?;
                }
                if sa.is_ipv6() {
                    socket.set_only_v6(true).map_err(fail)?;
                }
                socket.bind(&(*sa).into()).map_err(fail)?;
                socket.listen(cfg.backlog).map_err(fail)?;
                Ok(Listener::Tcp(socket.into(), addr.clone()))
            }
            ListenAddr::Unix(path) => {
                remove_stale_socket(path).map_err(fail)?;
                let listener = std::os::unix::net::UnixListener::bind(path).map_err(fail)?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(cfg.unix_mode))
                    .map_err(fail)?;
                // std's bind uses a fixed backlog; set ours.
                nix::sys::socket::listen(
                    &listener,
                    nix::sys::socket::Backlog::new(cfg.backlog)
                        .unwrap_or(nix::sys::socket::Backlog::MAXCONN),
                )
                .map_err(|e| fail(e.into()))?;
                Ok(Listener::Unix(listener, addr.clone()))
            }
        }
    }

    /// Wraps an inherited listening socket (systemd socket activation, or a re-exec handover),
    /// telling TCP from unix by its address family.
    pub fn from_inherited(fd: std::os::fd::OwnedFd) -> io::Result<Listener> {
        // It came across an execve, so without FD_CLOEXEC: a worker's subprocess must not get it.
        crate::sys::io::set_cloexec(fd.as_raw_fd())?;
        let socket = Socket::from(fd);
        let local = socket.local_addr()?;
        if let Some(addr) = local.as_socket() {
            Ok(Listener::Tcp(socket.into(), ListenAddr::Tcp(addr)))
        } else {
            let path = local
                .as_pathname()
                .map(|p| p.to_path_buf())
                .unwrap_or_default();
            Ok(Listener::Unix(
                std::os::unix::net::UnixListener::from(std::os::fd::OwnedFd::from(socket)),
                ListenAddr::Unix(path),
            ))
        }
    }

    /// The descriptor.
    pub fn raw_fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l, _) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
        }
    }

    /// Stops listening in this process: the descriptor is pointed at `/dev/null` (close-on-exec),
    /// which drops this process's reference to the socket. The descriptor number stays valid and
    /// owned by the listener, closed as usual when it drops.
    ///
    /// For a stop of the whole tree: once every process has done this (or exited), the kernel
    /// refuses new connections instead of queuing them where nobody will accept them, to be
    /// reset at exit with their requests already written.
    pub(crate) fn close_in_place(&self) -> io::Result<()> {
        let null = std::fs::File::open("/dev/null")?;
        nix::unistd::dup3(
            null.as_raw_fd(),
            self.as_fd().as_raw_fd(),
            nix::fcntl::OFlag::O_CLOEXEC,
        )?;
        Ok(())
    }

    /// Stops new connections from joining this socket's queue, for every process that holds it,
    /// while the connections already queued stay there to be accepted: the first step of a stop
    /// of the whole tree, before any process lets go of the socket.
    ///
    /// Closing alone cannot do it. The kernel resets the connections queued on a listening socket
    /// when its last descriptor closes, and those clients have usually written their request
    /// already. Whatever process closes last (a worker just after taking its queue, or the mold,
    /// which never accepts, exiting after every worker has drained) leaves a window in which new
    /// connections are queued only to be reset: at 16 connections reconnecting after
    /// `Connection: close`, a mold exiting 20 ms after the last worker cost every one of them.
    ///
    /// TCP: a socket filter dropping SYN segments is attached, shared by every descriptor of the
    /// socket. A new connect is not answered; its SYN is retried (1 s later) and meets the closed
    /// port then: refused, no request written. A handshake already answered completes (its ACK
    /// has no SYN flag) and joins the queue. Unix: the socket's path is removed, so a new connect
    /// fails at once (`ENOENT`); those queued stay.
    ///
    /// Not for a socket systemd passed in: systemd keeps it for the next start, which must be
    /// able to connect (the caller skips it).
    pub(crate) fn refuse_new_connections(&self) -> io::Result<()> {
        match self {
            Listener::Tcp(l, _) => socket2::SockRef::from(l).attach_filter(&DROP_SYN_FILTER),
            Listener::Unix(_, ListenAddr::Unix(path)) => match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
            Listener::Unix(..) => Ok(()),
        }
    }

    /// The address a TCP listener is bound to (`None` for a unix one, or if it cannot be read):
    /// kept by the monitor to watch handshakes on the socket after its own copy closed.
    pub(crate) fn tcp_local_addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            Listener::Tcp(l, _) => l.local_addr().ok(),
            Listener::Unix(..) => None,
        }
    }

    /// Listens again in this process after [`Listener::close_in_place`]: `socket` (the same
    /// listening socket, passed by the monitor) takes the descriptor number back.
    pub(crate) fn reopen_in_place(&self, socket: std::os::fd::OwnedFd) -> io::Result<()> {
        nix::unistd::dup3(
            socket.as_raw_fd(),
            self.as_fd().as_raw_fd(),
            nix::fcntl::OFlag::O_CLOEXEC,
        )?;
        Ok(())
    }

    /// Removes the socket file of a unix listener (on exit).
    pub fn cleanup(&self) {
        if let Listener::Unix(_, ListenAddr::Unix(path)) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Tcp(l, _) => l.as_fd(),
            Listener::Unix(l, _) => l.as_fd(),
        }
    }
}

/// Removes a unix socket file left by a dead server; refuses if a server still answers on it or if
/// the path is not a socket.
pub fn remove_stale_socket(path: &std::path::Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "path exists and is not a socket",
        ));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "another server is listening on this socket",
        )),
        Err(_) => std::fs::remove_file(path),
    }
}

/// A classic BPF program for a listening TCP socket: drop a segment with the SYN flag, keep the
/// rest. The kernel runs a TCP socket's filter with the packet starting at the TCP header (see
/// `tcp_filter`), whose byte 13 holds the flags; SYN is 0x02.
const DROP_SYN_FILTER: [libc::sock_filter; 4] = [
    // A = the flags byte.
    op(libc::BPF_LD | libc::BPF_B | libc::BPF_ABS, 0, 0, 13),
    // SYN set: on to "drop", else skip it.
    op(libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K, 0, 1, 0x02),
    // Drop: keep 0 bytes.
    op(libc::BPF_RET | libc::BPF_K, 0, 0, 0),
    // Keep the whole segment.
    op(libc::BPF_RET | libc::BPF_K, 0, 0, u32::MAX),
];

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    /// After `refuse_new_connections`, a connection queued before it is still accepted and
    /// served, a new connect gets no answer (its SYN is dropped, not queued to be reset later),
    /// and once the socket closes a connect is refused.
    #[test]
    fn a_refusing_tcp_listener_keeps_its_queue_and_queues_nothing_new() {
        let std_listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = std_listener.local_addr().unwrap();
        let listener = Listener::Tcp(std_listener, ListenAddr::Tcp(addr));
        let mut queued = TcpStream::connect(addr).unwrap();
        queued.write_all(b"ping").unwrap();

        listener.refuse_new_connections().unwrap();

        let late = TcpStream::connect_timeout(&addr, Duration::from_millis(300));
        assert!(
            late.as_ref()
                .is_err_and(|e| e.kind() == io::ErrorKind::TimedOut),
            "a connect after refuse_new_connections: {late:?}"
        );
        let Listener::Tcp(l, _) = &listener else {
            unreachable!()
        };
        let (mut accepted, _) = l.accept().unwrap();
        let mut got = [0u8; 4];
        accepted.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
        accepted.write_all(b"pong").unwrap();
        queued.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"pong");
        // Nothing else made it into the queue.
        l.set_nonblocking(true).unwrap();
        assert_eq!(
            l.accept().map(|_| ()).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );

        drop(listener);
        let closed = TcpStream::connect(addr);
        assert!(
            closed
                .as_ref()
                .is_err_and(|e| e.kind() == io::ErrorKind::ConnectionRefused),
            "a connect once the socket closed: {closed:?}"
        );
    }

    /// A unix listener that refuses new connections cannot be reached by its path any more;
    /// the connection queued before is still accepted.
    #[test]
    fn a_refusing_unix_listener_keeps_its_queue() {
        let dir = std::env::temp_dir().join(format!("tine-refuse-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let _ = std::fs::remove_file(&path);
        let std_listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let listener = Listener::Unix(std_listener, ListenAddr::Unix(path.clone()));
        let mut queued = std::os::unix::net::UnixStream::connect(&path).unwrap();
        queued.write_all(b"ping").unwrap();

        listener.refuse_new_connections().unwrap();

        assert!(std::os::unix::net::UnixStream::connect(&path).is_err());
        let Listener::Unix(l, _) = &listener else {
            unreachable!()
        };
        let (mut accepted, _) = l.accept().unwrap();
        let mut got = [0u8; 4];
        accepted.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
