//! What the kernel holds in listening sockets' queues, through `sock_diag` netlink: the accept
//! queue's depth of each listener (unix listeners' too; matched by socket inode), and the TCP
//! handshakes under way on a port (the SYN queue). The kernel dumps only the sockets asked for (a
//! state, a port): cheap, unlike `/proc/net/tcp`, which formats every socket on the machine.

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
const TCP_SYN_RECV: u32 = 3;
const TCP_LISTEN: u32 = 10;
const AF_UNIX: u8 = 1;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const IPPROTO_TCP: u8 = 6;
const UDIAG_SHOW_RQLEN: u32 = 0x10;
const UNIX_DIAG_RQLEN: u16 = 4;
/// `INET_DIAG_REQ_BYTECODE`: the request's filter program.
const INET_DIAG_REQ_BYTECODE: u16 = 1;
/// Filter operations: jump on local port ≥ / ≤ the port held in the next 4 bytes.
const INET_DIAG_BC_S_GE: u8 = 2;
const INET_DIAG_BC_S_LE: u8 = 3;

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
        let unix = request.get(16) == Some(&AF_UNIX);
        let collect = |msg: &[u8]| {
            let entry = if unix {
                parse_unix(msg)
            } else {
                parse_inet(msg)
            };
            if let Some((inode, depth)) = entry {
                found.insert(inode, depth);
            }
        };
        match dump(&request, collect) {
            Ok(()) => {}
            Err(e) => tracing::debug!(error = %e, "metrics: sock_diag failed"),
        }
    }
    inodes
        .into_iter()
        .map(|ino| ino.and_then(|i| found.get(&i).copied()))
        .collect()
}

/// Connections whose TCP handshake is under way on the ports of `addrs`: the SYN was answered,
/// the client's final ACK has not arrived (`SYN_RECV`). Such a client already sees its connection
/// open and may have sent its request; the kernel queues the connection only when the ACK
/// arrives, about a round trip later (or with the client's first data: a client can delay that
/// ACK). Matched by port alone (another address on the same port only makes a stop wait a little
/// longer). The kernel is asked for sockets in that state on those ports only.
pub(crate) fn handshakes_under_way(addrs: &[std::net::SocketAddr]) -> io::Result<usize> {
    let mut asked: Vec<(u8, u16)> = addrs
        .iter()
        .map(|a| (if a.is_ipv6() { AF_INET6 } else { AF_INET }, a.port()))
        .collect();
    asked.sort_unstable();
    asked.dedup();
    let mut count = 0;
    for (family, port) in asked {
        dump(&handshakes_request(family, port), |msg| {
            // The kernel filtered on both already; checked again all the same.
            let state = msg.get(1).copied().map(u32::from);
            let local_port = msg.get(4..6).map(|p| u16::from_be_bytes([p[0], p[1]]));
            if state == Some(TCP_SYN_RECV) && local_port == Some(port) {
                count += 1;
            }
        })?;
    }
    Ok(count)
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

/// `struct inet_diag_req_v2` for TCP sockets of `family` in `SYN_RECV` (the kernel adds request
/// sockets, which are what a listener's handshakes under way are) with local port `port`, the
/// port as a filter program in an `INET_DIAG_REQ_BYTECODE` attribute: `port ≥ P` then `port ≤ P`,
/// each jumping past the program's end (reject) when false.
fn handshakes_request(family: u8, port: u16) -> Vec<u8> {
    let port_at_least = [INET_DIAG_BC_S_GE, 8, 20, 0];
    let port_at_most = [INET_DIAG_BC_S_LE, 8, 12, 0];
    let mut program = Vec::with_capacity(16);
    for op in [port_at_least, port_at_most] {
        // `struct inet_diag_bc_op { u8 code; u8 yes; u16 no; }`, then the port in the `no`
        // field of a second op.
        program.extend_from_slice(&op[..2]);
        program.extend_from_slice(&u16::from(op[2]).to_ne_bytes());
        program.extend_from_slice(&[0, 0]);
        program.extend_from_slice(&port.to_ne_bytes());
    }
    let attribute_len = 4 + program.len();
    let mut r = header(56 + attribute_len);
    r.extend_from_slice(&[family, IPPROTO_TCP, 0, 0]);
    r.extend_from_slice(&(1u32 << TCP_SYN_RECV).to_ne_bytes());
    r.extend_from_slice(&[0u8; 48]); // struct inet_diag_sockid: any (the program filters)
    r.extend_from_slice(&(attribute_len as u16).to_ne_bytes());
    r.extend_from_slice(&INET_DIAG_REQ_BYTECODE.to_ne_bytes());
    r.extend_from_slice(&program);
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

/// Sends one dump request and hands each socket's message (`struct inet_diag_msg` or
/// `unix_diag_msg` and its attributes) to `on_socket` until the kernel says done.
fn dump(request: &[u8], mut on_socket: impl FnMut(&[u8])) -> io::Result<()> {
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
                SOCK_DIAG_BY_FAMILY => on_socket(&buf[at + 16..at + len]),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::time::Duration;

    /// A client whose handshake's final ACK is held back (`TCP_QUICKACK` off: it goes with the
    /// first data, or with the delayed-ACK timer's), connected to `addr`.
    fn holding_back_its_ack(addr: SocketAddr) -> socket2::Socket {
        let domain = socket2::Domain::for_address(addr);
        let client = socket2::Socket::new(domain, socket2::Type::STREAM, None).unwrap();
        client.set_quickack(false).unwrap();
        client.connect(&addr.into()).unwrap();
        client
    }

    /// A client that holds back its handshake's final ACK is counted as a handshake under way
    /// until then; once it has written, its connection is queued and no longer counted.
    #[test]
    fn a_handshake_is_under_way_until_the_clients_final_ack() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        assert_eq!(handshakes_under_way(&[addr]).unwrap(), 0);
        let mut client = TcpStream::from(holding_back_its_ack(addr));
        assert_eq!(handshakes_under_way(&[addr]).unwrap(), 1);
        client.write_all(b"ping").unwrap();
        let (mut accepted, _) = listener.accept().unwrap();
        let mut got = [0u8; 4];
        accepted.read_exact(&mut got).unwrap();
        assert_eq!(handshakes_under_way(&[addr]).unwrap(), 0);
    }

    /// Only the ports asked about count, IPv4 and IPv6 alike, each handshake once; established
    /// connections on the same port do not count.
    #[test]
    fn handshakes_are_counted_on_the_ports_asked_about_only() {
        let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let other = TcpListener::bind("127.0.0.1:0").unwrap();
        let v6 = TcpListener::bind("[::1]:0").unwrap();
        let (v4_addr, other_addr, v6_addr) = (
            v4.local_addr().unwrap(),
            other.local_addr().unwrap(),
            v6.local_addr().unwrap(),
        );
        let _established = TcpStream::connect(v4_addr).unwrap();
        let _pending = [
            holding_back_its_ack(v4_addr),
            holding_back_its_ack(v4_addr),
            holding_back_its_ack(other_addr),
            holding_back_its_ack(v6_addr),
        ];
        assert_eq!(handshakes_under_way(&[v4_addr]).unwrap(), 2);
        assert_eq!(handshakes_under_way(&[v6_addr]).unwrap(), 1);
        assert_eq!(
            handshakes_under_way(&[v4_addr, v6_addr, v4_addr]).unwrap(),
            3
        );
        assert_eq!(handshakes_under_way(&[]).unwrap(), 0);
    }

    /// What one count of the handshakes under way costs, with `TINE_BENCH_IDLE` (default 5,000)
    /// idle loopback connections open to the listener: through `sock_diag` (now) and by reading
    /// `/proc/net/tcp` and `tcp6` as the stop did before (that code, kept here to compare). A
    /// measurement, not a check: run by `bench/stop/handshake_scan.sh`, results in
    /// bench/results/stop.md.
    #[test]
    #[ignore = "a measurement: bench/stop/handshake_scan.sh"]
    fn handshake_scan_cost() {
        use nix::time::{clock_gettime, ClockId};
        let idle: usize = std::env::var("TINE_BENCH_IDLE")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(5_000);
        let calls = 200;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut open = Vec::with_capacity(idle * 2);
        for _ in 0..idle {
            open.push(TcpStream::connect(addr).unwrap());
            open.push(listener.accept().unwrap().0);
        }
        let lines = std::fs::read_to_string("/proc/net/tcp")
            .unwrap()
            .lines()
            .count()
            + std::fs::read_to_string("/proc/net/tcp6")
                .unwrap()
                .lines()
                .count();
        println!("{idle} idle connections open; /proc/net/tcp + tcp6: {lines} lines");
        type Count = fn(&[SocketAddr]) -> io::Result<usize>;
        let ways: [(&str, Count); 2] = [
            ("sock_diag", handshakes_under_way),
            ("/proc/net/tcp", handshakes_in_proc_net_tcp),
        ];
        for round in 0..3 {
            for (name, count) in ways {
                let cpu = || clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).unwrap();
                let (wall0, cpu0) = (std::time::Instant::now(), cpu());
                for _ in 0..calls {
                    assert_eq!(count(&[addr]).unwrap(), 0);
                }
                let cpu_used = Duration::from(cpu() - cpu0);
                let wall = wall0.elapsed();
                println!(
                    "round {round} {name:>14}: {calls} calls, per call {:>9.1} µs wall, {:>9.1} µs CPU",
                    wall.as_secs_f64() * 1e6 / calls as f64,
                    cpu_used.as_secs_f64() * 1e6 / calls as f64,
                );
            }
        }
    }

    /// The count as the stop made it before `sock_diag`: every line of `/proc/net/tcp` and
    /// `tcp6`, in state `SYN_RECV` (03), local port among `addrs`'.
    fn handshakes_in_proc_net_tcp(addrs: &[SocketAddr]) -> io::Result<usize> {
        const SYN_RECV: &str = "03";
        let mut count = 0;
        for (v6, table) in [(false, "/proc/net/tcp"), (true, "/proc/net/tcp6")] {
            let ports: Vec<u16> = addrs
                .iter()
                .filter(|a| a.is_ipv6() == v6)
                .map(|a| a.port())
                .collect();
            if ports.is_empty() {
                continue;
            }
            let text = std::fs::read_to_string(table)?;
            count += text
                .lines()
                .skip(1)
                .filter(|line| {
                    let mut fields = line.split_whitespace();
                    let local = fields.nth(1);
                    let state = fields.nth(1);
                    state == Some(SYN_RECV)
                        && local
                            .and_then(|l| l.rsplit(':').next())
                            .and_then(|port| u16::from_str_radix(port, 16).ok())
                            .is_some_and(|port| ports.contains(&port))
                })
                .count();
        }
        Ok(count)
    }
}
