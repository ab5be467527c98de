//! Every request knows its connection's two ends (issue 16): tine's `ConnectInfo` always, on TCP
//! and unix listeners, and with the `axum` feature axum's `ConnectInfo<SocketAddr>`, read by real
//! axum handlers (`examples/client_addr.rs`) over HTTP/1.1 and HTTP/2.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::client_addr::{self, ClientAddr};

const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts `examples/client_addr` on a TCP port and a unix socket.
fn start() -> ClientAddr {
    client_addr::start(&[])
}

/// Sends `GET path` with `Connection: close` on `stream`; returns the status and body.
fn get_on(mut stream: impl Read + Write, path: &str) -> (u16, String) {
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (status, body.to_string())
}

fn tcp(addr: std::net::SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s
}

fn unix(path: &std::path::Path) -> UnixStream {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s
}

#[test]
fn a_tcp_request_carries_its_peer_and_local_address() {
    let ClientAddr { tcp: addr, .. } = &start();
    let addr = *addr;
    for _ in 0..3 {
        let stream = tcp(addr);
        let me = stream.local_addr().unwrap();
        let (status, body) = get_on(stream, "/");
        assert_eq!(status, 200, "{body}");
        assert_eq!(body, format!("tcp peer={me} local={addr}\n"));
    }
}

#[test]
fn a_unix_request_carries_the_client_credentials_and_socket_path() {
    let ClientAddr { sock, .. } = &start();
    let (status, body) = get_on(unix(sock), "/");
    assert_eq!(status, 200, "{body}");
    let (uid, gid) = (nix::unistd::getuid(), nix::unistd::getgid());
    assert_eq!(
        body,
        format!(
            "unix pid={} uid={uid} gid={gid} local={}\n",
            std::process::id(),
            sock.display()
        )
    );
}

#[cfg(feature = "axum")]
#[test]
fn axums_connect_info_extractor_gets_the_tcp_peer() {
    let ClientAddr {
        tcp: addr, sock, ..
    } = &start();
    let addr = *addr;
    let stream = tcp(addr);
    let me = stream.local_addr().unwrap();
    let (status, body) = get_on(stream, "/axum");
    assert_eq!((status, body), (200, format!("axum peer={me}\n")));
    // A unix socket has no `SocketAddr`: the extractor refuses, as under `axum::serve`.
    let (status, body) = get_on(unix(sock), "/axum");
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("ConnectInfo"), "{body}");
}

/// The same over HTTP/2 (prior knowledge), with the h2 crate as the client.
#[test]
fn an_http2_request_carries_its_peer_too() {
    let ClientAddr { tcp: addr, .. } = &start();
    let addr = *addr;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (me, body) = runtime.block_on(async move {
        let io = tokio::net::TcpStream::connect(addr).await.unwrap();
        let me = io.local_addr().unwrap();
        let (mut client, connection) = h2::client::handshake(io).await.unwrap();
        tokio::spawn(connection);
        let request = http::Request::get(format!("http://{addr}/"))
            .body(())
            .unwrap();
        let (response, _) = client.send_request(request, true).unwrap();
        let response = tokio::time::timeout(IO_TIMEOUT, response)
            .await
            .expect("a response in time")
            .unwrap();
        assert_eq!(response.status(), 200);
        let mut body = response.into_body();
        let mut text = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            body.flow_control().release_capacity(chunk.len()).unwrap();
            text.extend_from_slice(&chunk);
        }
        (me, String::from_utf8(text).unwrap())
    });
    assert_eq!(body, format!("tcp peer={me} local={addr}\n"));
}
