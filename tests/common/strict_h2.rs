//! A strict HTTP/2 load client: what a client that never retries a request the server may have
//! seen makes of a drain.
//!
//! HTTP/2 says which requests a client may send again: a server that stops takes new streams no
//! more and sends `GOAWAY` naming the last stream it took; streams above it were never processed
//! and go again on a new connection (as does a stream reset with `REFUSED_STREAM`). A stream at or
//! below that id was taken: it must be answered. [`StrictH2Load`] counts exactly that: each of its
//! connections keeps `streams` concurrent `POST` streams going, reads each response whole, counts
//! a stream the server refused as `refused` (not lost, and opens a new connection), and counts as
//! lost a stream that was sent and got neither a complete response nor a refusal (a reset, a
//! connection that ended under it, an error `GOAWAY`, no answer within 5 s).
//!
//! The classification reads h2's errors: a stream above a `GOAWAY`'s last stream id fails with
//! the remote `GOAWAY`'s own error (`is_go_away`, `is_remote`, reason `NO_ERROR` for a graceful
//! one); a stream the connection's end caught fails with a broken pipe; a stream the server reset
//! fails with its reason.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::Reason;

/// The request body every stream carries.
const BODY: &[u8] = b"strict=1&lost=never";
/// A stream, a connect or a handshake unanswered this long fails (a stream: lost).
const PATIENCE: Duration = Duration::from_secs(5);

/// What a [`StrictH2Load`] saw, once stopped.
#[derive(Debug, Default, Clone)]
pub struct H2Report {
    /// Complete responses.
    pub answered: u64,
    /// Complete responses by status code.
    pub by_status: BTreeMap<u16, u64>,
    /// Streams the server refused (above a graceful `GOAWAY`'s last stream id, or reset with
    /// `REFUSED_STREAM`): never processed, sent again by any client.
    pub refused: u64,
    /// Streams sent that got neither a complete response nor a refusal: why, one line each.
    pub lost: Vec<String>,
    /// Connections that ended by a `GOAWAY` (or could take no new stream).
    pub connections_ended: u64,
    /// Connects or handshakes that failed (no stream was sent on them).
    pub connect_errors: u64,
}

impl H2Report {
    fn merge(&mut self, other: H2Report) {
        self.answered += other.answered;
        for (k, v) in other.by_status {
            *self.by_status.entry(k).or_default() += v;
        }
        self.refused += other.refused;
        self.lost.extend(other.lost);
        self.connections_ended += other.connections_ended;
        self.connect_errors += other.connect_errors;
    }

    /// A one-line summary for assertion messages.
    pub fn summary(&self) -> String {
        let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
        for why in &self.lost {
            *reasons.entry(why.as_str()).or_default() += 1;
        }
        format!(
            "answered {} {:?}, refused {}, lost {} {:?}, connections ended {}, connect errors {}",
            self.answered,
            self.by_status,
            self.refused,
            self.lost.len(),
            reasons,
            self.connections_ended,
            self.connect_errors
        )
    }
}

/// A running strict HTTP/2 load (see the module doc).
pub struct StrictH2Load {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    thread: Option<JoinHandle<H2Report>>,
}

impl StrictH2Load {
    /// `connections` HTTP/2 connections (prior knowledge, cleartext) to `addr`, each with
    /// `streams` concurrent streams sending `POST path` in a loop; a connection that gets a
    /// `GOAWAY` is replaced by a new one once its streams are done. Bounded: stops by itself after
    /// `max`.
    pub fn start(
        addr: SocketAddr,
        connections: usize,
        streams: usize,
        path: &str,
        max: Duration,
    ) -> StrictH2Load {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let until = Instant::now() + max;
        let uri: Arc<str> = format!("http://{addr}{path}").into();
        let thread = {
            let (stop, answered) = (stop.clone(), answered.clone());
            std::thread::Builder::new()
                .name("strict-h2".into())
                .spawn(move || {
                    let runtime = tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(2)
                        .enable_all()
                        .build()
                        .expect("a runtime for the strict HTTP/2 load");
                    runtime.block_on(async move {
                        let tasks: Vec<_> = (0..connections)
                            .map(|_| {
                                let shared = Shared {
                                    addr,
                                    uri: uri.clone(),
                                    stop: stop.clone(),
                                    answered: answered.clone(),
                                    until,
                                };
                                tokio::spawn(connection_loop(shared, streams))
                            })
                            .collect();
                        let mut all = H2Report::default();
                        for t in tasks {
                            all.merge(t.await.expect("a strict HTTP/2 connection task panicked"));
                        }
                        all
                    })
                })
                .expect("spawn the strict HTTP/2 load thread")
        };
        StrictH2Load {
            stop,
            answered,
            thread: Some(thread),
        }
    }

    /// Responses so far (for waiting until the load is flowing).
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    /// Stops sending (each stream under way is finished, its answer awaited) and joins.
    pub fn stop(mut self) -> H2Report {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("joined once")
            .join()
            .expect("the strict HTTP/2 load thread panicked")
    }
}

impl Drop for StrictH2Load {
    fn drop(&mut self) {
        // A test that panicked before `stop`: let the load end on its own, soon.
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[derive(Clone)]
struct Shared {
    addr: SocketAddr,
    uri: Arc<str>,
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    until: Instant,
}

impl Shared {
    fn done(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || Instant::now() >= self.until
    }
}

/// One connection slot: a connection at a time, replaced when it ends.
async fn connection_loop(shared: Shared, streams: usize) -> H2Report {
    let mut report = H2Report::default();
    while !shared.done() {
        let connected = tokio::time::timeout(PATIENCE, async {
            let io = tokio::net::TcpStream::connect(shared.addr).await?;
            h2::client::handshake(io)
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))
        })
        .await;
        let Ok(Ok((client, connection))) = connected else {
            report.connect_errors += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        let driver = tokio::spawn(async move {
            let _ = connection.await;
        });
        let loops: Vec<_> = (0..streams)
            .map(|_| tokio::spawn(stream_loop(client.clone(), shared.clone())))
            .collect();
        drop(client);
        for l in loops {
            report.merge(l.await.expect("a strict HTTP/2 stream task panicked"));
        }
        report.connections_ended += 1;
        driver.abort();
    }
    report
}

/// Streams on one connection, one after the other, until it takes no new one.
async fn stream_loop(mut client: h2::client::SendRequest<Bytes>, shared: Shared) -> H2Report {
    let mut report = H2Report::default();
    while !shared.done() {
        // A connection that got a GOAWAY takes no new stream: nothing was sent.
        client = match tokio::time::timeout(PATIENCE, client.ready()).await {
            Ok(Ok(c)) => c,
            _ => break,
        };
        let request = http::Request::post(&*shared.uri)
            .header("content-type", "application/x-www-form-urlencoded")
            .header("content-length", BODY.len())
            .body(())
            .expect("a request");
        let Ok((response, mut body)) = client.send_request(request, false) else {
            break;
        };
        // From here the stream exists: the server answers it or refuses it.
        let outcome = tokio::time::timeout(PATIENCE, async move {
            // A stream the server closed before its body went (a GOAWAY naming a lower last
            // stream, a reset) fails here only as h2's "inactive stream": what the server did
            // with it is what the response says, so that decides.
            let _sent = body.send_data(Bytes::from_static(BODY), true);
            let response = response.await?;
            let status = response.status().as_u16();
            let mut data = response.into_body();
            while let Some(chunk) = data.data().await {
                let chunk = chunk?;
                let _ = data.flow_control().release_capacity(chunk.len());
            }
            Ok::<u16, h2::Error>(status)
        })
        .await;
        match outcome {
            Ok(Ok(status)) => {
                report.answered += 1;
                *report.by_status.entry(status).or_default() += 1;
                shared.answered.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(e)) if refused(&e) => {
                report.refused += 1;
                break;
            }
            Ok(Err(e)) => {
                report.lost.push(why_lost(&e));
                break;
            }
            Err(_) => {
                report.lost.push("no answer within 5 s".into());
                break;
            }
        }
    }
    report
}

/// Whether the server refused the stream without processing it (see the module doc).
fn refused(e: &h2::Error) -> bool {
    let graceful_go_away = e.is_go_away() && e.is_remote() && e.reason() == Some(Reason::NO_ERROR);
    let refused_stream =
        e.is_reset() && e.is_remote() && e.reason() == Some(Reason::REFUSED_STREAM);
    graceful_go_away || refused_stream
}

/// Why a stream was lost, as a short line (grouped in [`H2Report::summary`]).
fn why_lost(e: &h2::Error) -> String {
    if e.is_io() {
        let kind = e.get_io().map(|io| io.kind());
        format!("the connection ended under the stream ({kind:?})")
    } else if e.is_go_away() {
        format!("GOAWAY {:?} under the stream", e.reason())
    } else if e.is_reset() {
        format!("stream reset {:?}", e.reason())
    } else {
        format!("h2 error: {e}")
    }
}
