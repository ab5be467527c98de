//! Peer server for `bench/http/run.sh`: the plainest hyper 1 + tokio setup.
//!
//! Usage: `hyper-hello ADDR [THREADS]` (default 127.0.0.1:8082, 2 threads).
//! `GET /` answers `hello\n`; anything else 404. HTTP/1.1 with keep-alive.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

async fn hello(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let resp = if req.method() == Method::GET && req.uri().path() == "/" {
        Response::new(Full::new(Bytes::from_static(b"hello\n")))
    } else {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::NOT_FOUND;
        r
    };
    Ok(resp)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr: SocketAddr = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:8082".into())
        .parse()?;
    let threads: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(2);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_io()
        .build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(addr).await?;
        eprintln!("hyper-hello listening on {addr} with {threads} threads");
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                // EMFILE and friends: keep serving the connections we have.
                Err(e) => {
                    eprintln!("accept: {e}");
                    continue;
                }
            };
            // Same as nginx's default `tcp_nodelay on` and tine's `nodelay` default.
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service_fn(hello))
                    .await;
            });
        }
    })
}
