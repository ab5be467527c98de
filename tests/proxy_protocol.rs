//! PROXY protocol (issue 16 item 1, `proxy_protocol = true`): behind HAProxy, nginx
//! (`proxy_protocol on`) or a cloud load balancer, the client address a request carries is the
//! one the proxy's header names, over TCP and unix listeners, v1 (text) and v2 (binary); a
//! connection without a valid header is closed (the first logged as a warning), and one that sends
//! none is cut at `header_read_timeout`. Headers are written by hand, byte by byte, as a proxy
//! sends them; `examples/client_addr` answers what its request carries.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::client_addr::{self, ClientAddr};

const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// `examples/client_addr` behind the PROXY protocol (a short head deadline for the incomplete
/// header tests).
fn start() -> ClientAddr {
    client_addr::start(&["--proxy-protocol", "--header-read-timeout", "1"])
}

/// Sends `header`, then `GET path` with `Connection: close`; returns the whole answer (empty if
/// the server closed without one).
fn request_after(mut stream: impl Read + Write, header: &[u8], path: &str) -> String {
    stream.write_all(header).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    // A reset (the server closing with our request unread) counts as no answer.
    let _ = stream.read_to_end(&mut raw);
    String::from_utf8_lossy(&raw).into_owned()
}

fn body(answer: &str) -> &str {
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer:?}");
    answer.split_once("\r\n\r\n").unwrap().1
}

fn tcp(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s
}

/// A PROXY v2 header: `PROXY` command over TCP, or `LOCAL` (no addresses).
fn v2(addresses: Option<(SocketAddr, SocketAddr)>) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    match addresses {
        None => h.extend([0x20, 0x00, 0, 0]),
        Some((SocketAddr::V4(src), SocketAddr::V4(dst))) => {
            h.extend([0x21, 0x11, 0, 12]);
            h.extend(src.ip().octets());
            h.extend(dst.ip().octets());
            h.extend(src.port().to_be_bytes());
            h.extend(dst.port().to_be_bytes());
        }
        Some((SocketAddr::V6(src), SocketAddr::V6(dst))) => {
            h.extend([0x21, 0x21, 0, 36]);
            h.extend(src.ip().octets());
            h.extend(dst.ip().octets());
            h.extend(src.port().to_be_bytes());
            h.extend(dst.port().to_be_bytes());
        }
        _ => unreachable!("one family"),
    }
    h
}

#[test]
fn v1_headers_name_the_client_over_tcp_and_unix_listeners() {
    let r = start();
    let answer = request_after(
        tcp(r.tcp),
        b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 443\r\n",
        "/",
    );
    assert_eq!(
        body(&answer),
        "tcp peer=203.0.113.7:51234 local=192.0.2.1:443\n"
    );
    let answer = request_after(
        tcp(r.tcp),
        b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 8443\r\n",
        "/",
    );
    assert_eq!(
        body(&answer),
        "tcp peer=[2001:db8::7]:40000 local=[2001:db8::1]:8443\n"
    );
    // A proxy on the same host, connecting through the unix socket, for a TCP client.
    let stream = UnixStream::connect(&r.sock).unwrap();
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let answer = request_after(
        stream,
        b"PROXY TCP4 198.51.100.3 192.0.2.1 1234 80\r\n",
        "/",
    );
    assert_eq!(
        body(&answer),
        "tcp peer=198.51.100.3:1234 local=192.0.2.1:80\n"
    );
    // UNKNOWN (the proxy's own connection): the socket's addresses stay.
    let stream = tcp(r.tcp);
    let me = stream.local_addr().unwrap();
    let answer = request_after(stream, b"PROXY UNKNOWN\r\n", "/");
    assert_eq!(body(&answer), format!("tcp peer={me} local={}\n", r.tcp));
}

#[test]
fn v2_headers_name_the_client_even_split_across_packets() {
    let r = start();
    let client: SocketAddr = "198.51.100.9:40000".parse().unwrap();
    let proxy: SocketAddr = "192.0.2.2:8443".parse().unwrap();
    let answer = request_after(tcp(r.tcp), &v2(Some((client, proxy))), "/");
    assert_eq!(body(&answer), format!("tcp peer={client} local={proxy}\n"));
    let client6: SocketAddr = "[2001:db8::9]:40001".parse().unwrap();
    let proxy6: SocketAddr = "[2001:db8::2]:443".parse().unwrap();
    let answer = request_after(tcp(r.tcp), &v2(Some((client6, proxy6))), "/");
    assert_eq!(
        body(&answer),
        format!("tcp peer={client6} local={proxy6}\n")
    );
    // Part of the signature, a pause, then the rest: the worker waits for the whole header.
    let mut stream = tcp(r.tcp);
    stream.set_nodelay(true).unwrap();
    let header = v2(Some((client, proxy)));
    stream.write_all(&header[..7]).unwrap();
    std::thread::sleep(Duration::from_millis(200)); // two packets, not a synchronisation
    let answer = request_after(stream, &header[7..], "/");
    assert_eq!(body(&answer), format!("tcp peer={client} local={proxy}\n"));
    // LOCAL (a health check from the proxy itself): the socket's addresses.
    let stream = tcp(r.tcp);
    let me = stream.local_addr().unwrap();
    let answer = request_after(stream, &v2(None), "/");
    assert_eq!(body(&answer), format!("tcp peer={me} local={}\n", r.tcp));
}

#[test]
fn a_connection_without_a_valid_header_is_closed_and_logged_once() {
    let r = start();
    for garbage in [
        &b""[..],                                            // straight to HTTP
        b"PROXY TCP4 not-an-address 192.0.2.1 1 2\r\n",      // v1, bad address
        b"\r\n\r\n\0\r\nQUIT\n\x99\x11\x00\x0c0123456789ab", // v2, bad version
    ] {
        let answer = request_after(tcp(r.tcp), garbage, "/");
        assert!(answer.is_empty(), "{garbage:?} was answered: {answer:?}");
    }
    let warned = r
        .server
        .log
        .wait_for_log("without a valid PROXY header", Duration::from_secs(5));
    assert!(warned.contains("WARN"), "{warned}");
    assert_eq!(
        r.server.log.count("without a valid PROXY header"),
        1,
        "logged once: {}",
        r.server.log.text()
    );
    // Well-formed connections are served meanwhile.
    let answer = request_after(tcp(r.tcp), b"PROXY TCP4 203.0.113.8 192.0.2.1 1 2\r\n", "/");
    assert_eq!(body(&answer), "tcp peer=203.0.113.8:1 local=192.0.2.1:2\n");
}

#[test]
fn a_connection_that_sends_no_header_is_cut_at_the_head_deadline() {
    let r = start();
    for partial in [&b""[..], b"PROXY TCP4 203.0.113.7", b"\r\n\r\n\0\r\nQU"] {
        let mut stream = tcp(r.tcp);
        stream.write_all(partial).unwrap();
        let sent = Instant::now();
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
        let took = sent.elapsed();
        assert!(rest.is_empty(), "{rest:?}");
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(5),
            "{partial:?}: closed after {took:?} (header_read_timeout 1 s)"
        );
    }
}

#[cfg(feature = "axum")]
#[test]
fn axums_connect_info_gets_the_client_the_header_names() {
    let r = start();
    let answer = request_after(
        tcp(r.tcp),
        b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 443\r\n",
        "/axum",
    );
    assert_eq!(body(&answer), "axum peer=203.0.113.7:51234\n");
}
