//! Listening sockets: bound once by the monitor, inherited by every child.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::PermissionsExt;

use socket2::{Domain, Socket, Type};

use crate::config::{Config, ListenAddr};

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
