//! Accept-queue depth of listening sockets through `sock_diag` netlink: the kernel dumps only
//! listening sockets (cheap, unlike `/proc/net/tcp`, which lists every connection), and it
//! reports unix listeners' queues too. Listeners are matched by socket inode.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd};

use nix::sys::socket::{
    recv, sendto, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag,
    SockProtocol, SockType,
};
use nix::sys::time::TimeVal;

use crate::listener::Listener;

/// A listener's accept queue: connections waiting, and the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Depth {
    pub waiting: u32,
    pub limit: u32,
}

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const TCP_LISTEN: u32 = 10;
const AF_UNIX: u8 = 1;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const IPPROTO_TCP: u8 = 6;
const UDIAG_SHOW_RQLEN: u32 = 0x10;
const UNIX_DIAG_RQLEN: u16 = 4;

/// The depth of each listener, in order; `None` where the kernel did not say.
pub(crate) fn depths(listeners: &[Listener]) -> Vec<Option<Depth>> {
    let inodes: Vec<Option<u64>> = listeners
        .iter()
        .map(|l| {
            nix::sys::stat::fstat(l.as_fd().as_raw_fd())
                .ok()
                .map(|s| s.st_ino)
        })
        .collect();
    let mut found: HashMap<u64, Depth> = HashMap::new();
    let has_tcp = listeners.iter().any(|l| matches!(l, Listener::Tcp(..)));
    let has_unix = listeners.iter().any(|l| matches!(l, Listener::Unix(..)));
    let mut requests = Vec::new();
    if has_tcp {
        requests.push(inet_request(AF_INET));
        requests.push(inet_request(AF_INET6));
    }
    if has_unix {
        requests.push(unix_request());
    }
    for request in requests {
        match dump(&request, &mut found) {
            Ok(()) => {}
            Err(e) => tracing::debug!(error = %e, "metrics: sock_diag failed"),
        }
    }
    inodes
        .into_iter()
        .map(|ino| ino.and_then(|i| found.get(&i).copied()))
        .collect()
}

fn header(payload_len: usize) -> Vec<u8> {
    let mut h = Vec::with_capacity(16 + payload_len);
    h.extend_from_slice(&((16 + payload_len) as u32).to_ne_bytes());
    h.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    h.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    h.extend_from_slice(&1u32.to_ne_bytes()); // sequence number
    h.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
    h
}

/// `struct inet_diag_req_v2` for listening TCP sockets of `family`.
fn inet_request(family: u8) -> Vec<u8> {
    let mut r = header(56);
    r.extend_from_slice(&[family, IPPROTO_TCP, 0, 0]);
    r.extend_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
    r.extend_from_slice(&[0u8; 48]); // struct inet_diag_sockid: any
    r
}

/// `struct unix_diag_req` for listening unix sockets, with their queue lengths.
fn unix_request() -> Vec<u8> {
    let mut r = header(24);
    r.extend_from_slice(&[AF_UNIX, 0, 0, 0]);
    r.extend_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
    r.extend_from_slice(&0u32.to_ne_bytes()); // inode: any
    r.extend_from_slice(&UDIAG_SHOW_RQLEN.to_ne_bytes());
    r.extend_from_slice(&[0xff; 8]); // cookie: none
    r
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Sends one dump request and collects `inode → depth` until the kernel says done.
fn dump(request: &[u8], found: &mut HashMap<u64, Depth>) -> io::Result<()> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )?;
    // The kernel answers at once; the timeout only guards the monitor against the unexpected.
    setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::new(0, 200_000))?;
    sendto(
        fd.as_raw_fd(),
        request,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )?;
    let unix = request.get(16) == Some(&AF_UNIX);
    let mut buf = vec![0u8; 64 * 1024];
    for _ in 0..10_000 {
        let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        let mut at = 0;
        while at + 16 <= n {
            let (Some(len), Some(kind)) = (u32_at(&buf, at), u16_at(&buf, at + 4)) else {
                break;
            };
            let len = len as usize;
            if len < 16 || at + len > n {
                return Err(io::Error::other("malformed netlink message"));
            }
            match kind {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => {
                    let errno = u32_at(&buf, at + 16).map(|e| -(e as i32)).unwrap_or(0);
                    return Err(io::Error::from_raw_os_error(errno));
                }
                SOCK_DIAG_BY_FAMILY => {
                    let msg = &buf[at + 16..at + len];
                    let entry = if unix {
                        parse_unix(msg)
                    } else {
                        parse_inet(msg)
                    };
                    if let Some((inode, depth)) = entry {
                        found.insert(inode, depth);
                    }
                }
                _ => {}
            }
            at += (len + 3) & !3;
        }
    }
    Err(io::Error::other("netlink dump did not end"))
}

/// `struct inet_diag_msg`: for a listener, rqueue is the accept queue, wqueue its limit.
fn parse_inet(msg: &[u8]) -> Option<(u64, Depth)> {
    let waiting = u32_at(msg, 56)?;
    let limit = u32_at(msg, 60)?;
    let inode = u32_at(msg, 68)?;
    Some((u64::from(inode), Depth { waiting, limit }))
}

/// `struct unix_diag_msg` and its `UNIX_DIAG_RQLEN` attribute.
fn parse_unix(msg: &[u8]) -> Option<(u64, Depth)> {
    let inode = u32_at(msg, 4)?;
    let mut at = 16;
    while at + 4 <= msg.len() {
        let len = u16_at(msg, at)? as usize;
        let kind = u16_at(msg, at + 2)?;
        if len < 4 {
            return None;
        }
        if kind == UNIX_DIAG_RQLEN {
            let waiting = u32_at(msg, at + 4)?;
            let limit = u32_at(msg, at + 8)?;
            return Some((u64::from(inode), Depth { waiting, limit }));
        }
        at += (len + 3) & !3;
    }
    None
}
