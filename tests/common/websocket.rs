//! A real WebSocket client for the tests: tokio-tungstenite on a current-thread runtime of its own,
//! every call bounded in time.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// How a server ended a WebSocket connection.
#[derive(Debug)]
pub struct Ending {
    /// The server's close frame, if it sent one.
    pub close: Option<CloseFrame>,
    /// What came after: the end of the connection (`None`) or an error, as the client saw it.
    pub then: Option<String>,
    /// Messages other than the close frame that arrived meanwhile.
    pub messages: Vec<Message>,
}

impl Ending {
    /// The close frame's code, if a close frame came.
    pub fn code(&self) -> Option<u16> {
        self.close.as_ref().map(|f| u16::from(f.code))
    }
}

/// One WebSocket connection.
pub struct WebSocket {
    runtime: tokio::runtime::Runtime,
    stream: WebSocketStream<tokio::net::TcpStream>,
    /// The upgrade response's `x-tine-worker` header (with `--debug-headers`).
    pub worker: Option<i32>,
}

impl WebSocket {
    /// Connects to `ws://addr{path}`; panics if the handshake fails within `timeout`.
    pub fn connect(addr: SocketAddr, path: &str, timeout: Duration) -> WebSocket {
        let socket = std::net::TcpStream::connect_timeout(&addr, timeout).expect("connect");
        WebSocket::handshake(socket, path, timeout).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The opening handshake for `path` on a connection opened already; `Err` says why it
    /// failed (within `timeout`).
    pub fn handshake(
        socket: std::net::TcpStream,
        path: &str,
        timeout: Duration,
    ) -> Result<WebSocket, String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for the client");
        let addr = socket.peer_addr().expect("a connected socket");
        let url = format!("ws://{addr}{path}");
        socket.set_nonblocking(true).expect("non-blocking");
        let (stream, response) = runtime
            .block_on(async {
                let socket = tokio::net::TcpStream::from_std(socket)?;
                let handshake = tokio_tungstenite::client_async(url.as_str(), socket);
                Ok::<_, std::io::Error>(tokio::time::timeout(timeout, handshake).await)
            })
            .map_err(|e| format!("WebSocket handshake with {url}: {e}"))?
            .map_err(|_| format!("WebSocket handshake with {url}: timed out"))?
            .map_err(|e| format!("WebSocket handshake with {url}: {e}"))?;
        let worker = response
            .headers()
            .get("x-tine-worker")
            .and_then(|v| v.to_str().ok()?.parse().ok());
        Ok(WebSocket {
            runtime,
            stream,
            worker,
        })
    }

    /// Sends a text message and returns the next message's text; panics on anything else.
    pub fn round_trip(&mut self, text: &str, timeout: Duration) -> String {
        let stream = &mut self.stream;
        let reply = self.runtime.block_on(async {
            tokio::time::timeout(timeout, async {
                stream.send(Message::text(text)).await?;
                stream.next().await.transpose()
            })
            .await
        });
        match reply {
            Ok(Ok(Some(Message::Text(t)))) => t.to_string(),
            other => panic!("sent {text:?}, got {other:?}"),
        }
    }

    /// Reads until the server's close frame, at most `timeout`, without answering it yet (a
    /// client's close reply goes out with its next read); panics if none came by then.
    pub fn until_close(&mut self, timeout: Duration) -> Ending {
        self.read(timeout, true)
    }

    /// Reads until the connection ends (answering a close frame as a client must), at most
    /// `timeout`; panics if it is still open then.
    pub fn until_end(&mut self, timeout: Duration) -> Ending {
        self.read(timeout, false)
    }

    fn read(&mut self, timeout: Duration, stop_at_close: bool) -> Ending {
        let stream = &mut self.stream;
        let ended = self.runtime.block_on(async {
            tokio::time::timeout(timeout, async {
                let mut ending = Ending {
                    close: None,
                    then: None,
                    messages: Vec::new(),
                };
                loop {
                    match stream.next().await {
                        Some(Ok(Message::Close(frame))) => {
                            ending.close = frame;
                            if stop_at_close {
                                return ending;
                            }
                        }
                        Some(Ok(m)) => ending.messages.push(m),
                        Some(Err(e)) => {
                            ending.then = Some(e.to_string());
                            return ending;
                        }
                        None => return ending,
                    }
                }
            })
            .await
        });
        ended.unwrap_or_else(|_| {
            panic!("no close frame nor end of the WebSocket connection within {timeout:?}")
        })
    }
}
