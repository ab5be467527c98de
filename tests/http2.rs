//! HTTP/2 settings (issue 16): what a client sees on the wire, read frame by frame from a raw
//! socket: the advertised SETTINGS, the connection window, keep-alive PINGs, and the GOAWAY that
//! closes an idle connection.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::Launch;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const WINDOW_UPDATE: u8 = 0x8;
const ACK: u8 = 0x1;

/// One frame as read: type, flags, stream, payload.
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

/// A client that speaks raw HTTP/2 frames (h2 and hyper hide SETTINGS and PINGs).
struct RawH2 {
    stream: TcpStream,
}

impl RawH2 {
    /// Connects and sends the preface and an empty SETTINGS frame.
    fn connect(addr: std::net::SocketAddr) -> RawH2 {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut c = RawH2 { stream };
        c.stream.write_all(PREFACE).unwrap();
        c.send(SETTINGS, 0, 0, &[]);
        c
    }

    fn send(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let len = payload.len() as u32;
        let mut frame = len.to_be_bytes()[1..].to_vec();
        frame.extend([kind, flags]);
        frame.extend(stream.to_be_bytes());
        frame.extend(payload);
        self.stream.write_all(&frame).unwrap();
    }

    /// The next frame; panics on close or after the read timeout.
    fn read(&mut self) -> Frame {
        let mut head = [0u8; 9];
        self.stream.read_exact(&mut head).expect("a frame header");
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        self.stream
            .read_exact(&mut payload)
            .expect("a frame payload");
        Frame {
            kind: head[3],
            flags: head[4],
            stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
            payload,
        }
    }

    /// Reads the server's first frames: its SETTINGS (acknowledged) and, if it sends one, the
    /// connection's WINDOW_UPDATE; returns the settings and the window increment.
    fn handshake(&mut self) -> (HashMap<u16, u32>, Option<u32>) {
        let first = self.read();
        assert_eq!((first.kind, first.flags), (SETTINGS, 0), "SETTINGS first");
        let settings = first
            .payload
            .chunks(6)
            .map(|c| {
                (
                    u16::from_be_bytes([c[0], c[1]]),
                    u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
                )
            })
            .collect();
        self.send(SETTINGS, ACK, 0, &[]);
        let mut window = None;
        // Then, in some order: its ack of our SETTINGS and maybe a connection WINDOW_UPDATE.
        for _ in 0..2 {
            let f = self.read();
            match (f.kind, f.stream) {
                (WINDOW_UPDATE, 0) => {
                    window = Some(u32::from_be_bytes(f.payload[..4].try_into().unwrap()))
                }
                (SETTINGS, 0) if f.flags & ACK != 0 => {}
                other => panic!("unexpected frame {other:?} in the handshake"),
            }
            if window.is_some() {
                break;
            }
        }
        (settings, window)
    }
}

const MAX_CONCURRENT_STREAMS: u16 = 0x3;
const INITIAL_WINDOW_SIZE: u16 = 0x4;
const MAX_FRAME_SIZE: u16 = 0x5;

#[test]
fn a_client_sees_the_configured_settings() {
    let server = Launch::tine()
        .args([
            "--workers",
            "1",
            "--http2-max-concurrent-streams",
            "7",
            "--http2-initial-stream-window",
            "70000",
            "--http2-initial-connection-window",
            "1000000",
            "--http2-max-frame-size",
            "32768",
        ])
        .start();
    let mut client = RawH2::connect(server.tcp_addr());
    let (settings, window) = client.handshake();
    assert_eq!(
        settings.get(&MAX_CONCURRENT_STREAMS),
        Some(&7),
        "{settings:?}"
    );
    assert_eq!(
        settings.get(&INITIAL_WINDOW_SIZE),
        Some(&70000),
        "{settings:?}"
    );
    assert_eq!(settings.get(&MAX_FRAME_SIZE), Some(&32768), "{settings:?}");
    // The connection window starts at 65535 (RFC 9113): the server raises it by the rest.
    assert_eq!(window, Some(1_000_000 - 65_535));
}

#[test]
fn the_default_settings_are_the_documented_ones() {
    let server = Launch::tine().args(["--workers", "1"]).start();
    let mut client = RawH2::connect(server.tcp_addr());
    let (settings, window) = client.handshake();
    assert_eq!(
        settings.get(&MAX_CONCURRENT_STREAMS),
        Some(&200),
        "{settings:?}"
    );
    assert_eq!(
        settings.get(&INITIAL_WINDOW_SIZE),
        Some(&(1 << 20)),
        "{settings:?}"
    );
    // 16384 is the protocol's default: a server may leave it out.
    assert!(
        matches!(settings.get(&MAX_FRAME_SIZE), None | Some(16384)),
        "{settings:?}"
    );
    assert_eq!(window, Some((1 << 20) - 65_535));
}

#[test]
fn an_idle_connection_gets_keepalive_pings() {
    let server = Launch::tine()
        .args([
            "--workers",
            "1",
            "--http2-keepalive-interval",
            "300ms",
            "--http2-keepalive-timeout",
            "5s",
        ])
        .start();
    let mut client = RawH2::connect(server.tcp_addr());
    client.handshake();
    // Answered, the pings keep coming, one per interval of silence.
    let started = Instant::now();
    let mut pings = 0;
    while pings < 3 {
        let f = client.read();
        if f.kind == PING && f.flags & ACK == 0 {
            pings += 1;
            client.send(PING, ACK, 0, &f.payload);
        }
    }
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "three pings 300 ms apart came in {:?}",
        started.elapsed()
    );
}

#[test]
fn no_pings_unless_configured() {
    let server = Launch::tine().args(["--workers", "1"]).start();
    let mut client = RawH2::connect(server.tcp_addr());
    client.handshake();
    client
        .stream
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let mut head = [0u8; 9];
    match client.stream.read(&mut head) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("expected silence, got {other:?} {head:?}"),
    }
}

const GOAWAY: u8 = 0x7;

#[test]
fn an_idle_connection_outlives_the_head_deadline_then_gets_a_goaway_at_keepalive_timeout() {
    let server = Launch::tine()
        .args([
            "--workers",
            "1",
            "--header-read-timeout",
            "1",
            "--keepalive-timeout",
            "4",
        ])
        .start();
    let mut client = RawH2::connect(server.tcp_addr());
    client.handshake();
    let idle = Instant::now();
    // Idle, the client answering the server's PINGs as real clients do, until the GOAWAY.
    let goaway = loop {
        let f = client.read();
        match f.kind {
            PING if f.flags & ACK == 0 => client.send(PING, ACK, 0, &f.payload),
            GOAWAY => break f,
            _ => {}
        }
    };
    let took = idle.elapsed();
    // The head deadline (1 s) did not close it; keepalive_timeout (4 s; judged every 0.5 s) did.
    assert!(took >= Duration::from_millis(3900), "GOAWAY after {took:?}");
    assert!(took < Duration::from_secs(6), "GOAWAY only after {took:?}");
    let error_code = u32::from_be_bytes(goaway.payload[4..8].try_into().unwrap());
    assert_eq!(error_code, 0, "NO_ERROR");
    // Then the server closes the connection (after its final GOAWAY, once the client has
    // answered the PING that follows the first).
    let closed = loop {
        let mut head = [0u8; 9];
        match client.stream.read_exact(&mut head) {
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break true,
            Err(e) if common::is_closed_error(&e) => break true,
            Err(_) => break false,
            Ok(()) => {
                let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                let mut payload = vec![0u8; len];
                client.stream.read_exact(&mut payload).unwrap();
                if head[3] == PING && head[4] & ACK == 0 {
                    client.send(PING, ACK, 0, &payload);
                }
            }
        }
    };
    assert!(closed, "closed after the GOAWAY");
    assert!(
        idle.elapsed() < Duration::from_secs(9),
        "{:?}",
        idle.elapsed()
    );
}
