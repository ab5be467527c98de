//! A gRPC service written with tonic, served by tine: no adapter, `tonic::service::Routes` is an
//! HTTP service like any other.
//!
//! ```sh
//! cargo run --example grpc --features tonic -- serve --listen 127.0.0.1:50051 --workers 4 \
//!     --listen unix:/tmp/grpc.sock
//! grpcurl -plaintext -import-path examples/grpc -proto greeter.proto \
//!     -d '{"name": "tine"}' 127.0.0.1:50051 greeter.Greeter/SayHello
//! ```
//!
//! Three kinds of call (the service is `examples/grpc/greeter.proto`):
//! - `SayHello`, unary: `hello, NAME`, the answering worker's pid and the caller: its address from
//!   `tonic::Request::remote_addr()`, or on a unix socket its credentials from tonic's
//!   `UdsConnectInfo` (tine's `tonic` feature puts tonic's `TcpConnectInfo` or `UdsConnectInfo` in
//!   each request). An empty name is refused with `INVALID_ARGUMENT` and a message.
//! - `Count`, server streaming: `count` numbered replies, `pause_ms` apart.
//! - `Wait`, unary and slow on purpose: answers after `millis`.
//!
//! Deadlines: tonic's own server ends a call at the deadline its client sent (`grpc-timeout`);
//! `Routes` alone does not, so the routes are wrapped in [`tine::grpc::DeadlineLayer`], and a
//! `Wait` of 10 s called with a 50 ms deadline ends with `DEADLINE_EXCEEDED` after 50 ms, its work
//! dropped. Without the layer it would run its 10 s for a caller that gave up.
//!
//! The message and service code in `examples/grpc/greeter.rs` is generated from the `.proto` by
//! tonic-prost-build and committed, so that building needs no `protoc`; `examples/grpc/generate.sh`
//! regenerates it. An app of your own would more likely generate it in its `build.rs`
//! (`tonic_prost_build::compile_protos("proto/greeter.proto")`, then `tonic::include_proto!`).
//!
//! A reload (`HUP`) or a refork (`USR2`) loses no call: a draining worker sends its HTTP/2
//! connections a `GOAWAY`, finishes the calls and streams already started on them, and the client
//! opens a new connection to a worker that stays.

use std::pin::Pin;
use std::time::{Duration, Instant};

use futures_util::Stream;
use tine::{App, Context, Handler, Worker};
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};
use tower::Layer;

/// The code generated from `examples/grpc/greeter.proto`.
mod greeter {
    include!("grpc/greeter.rs");
}

use greeter::greeter_server::{Greeter, GreeterServer};
use greeter::{CountReply, CountRequest, HelloReply, HelloRequest, WaitReply, WaitRequest};

/// Longest `Count` stream and `Wait` a caller may ask for.
const MAX_COUNT: u32 = 100_000;
const MAX_WAIT_MS: u32 = 60_000;

struct GrpcApp;

impl App for GrpcApp {
    fn preload(_ctx: &Context) -> anyhow::Result<Self> {
        Ok(GrpcApp)
    }

    fn boot(&self, _worker: &Worker) -> anyhow::Result<Handler> {
        let routes = tonic::service::Routes::new(GreeterServer::new(MyGreeter));
        Ok(Handler::http(
            tine::grpc::DeadlineLayer::new().layer(routes),
        ))
    }
}

struct MyGreeter;

#[tonic::async_trait]
impl Greeter for MyGreeter {
    async fn say_hello(
        &self,
        request: Request<HelloRequest>,
    ) -> Result<Response<HelloReply>, Status> {
        let peer = caller(&request);
        let name = request.into_inner().name;
        if name.is_empty() {
            return Err(Status::invalid_argument("name must not be empty"));
        }
        Ok(Response::new(HelloReply {
            message: format!("hello, {name}"),
            pid: std::process::id(),
            peer,
        }))
    }

    type CountStream = Pin<Box<dyn Stream<Item = Result<CountReply, Status>> + Send>>;

    async fn count(
        &self,
        request: Request<CountRequest>,
    ) -> Result<Response<Self::CountStream>, Status> {
        let CountRequest { count, pause_ms } = request.into_inner();
        if count > MAX_COUNT || pause_ms > MAX_WAIT_MS {
            return Err(Status::invalid_argument(format!(
                "count is at most {MAX_COUNT} and pause_ms at most {MAX_WAIT_MS}"
            )));
        }
        let pause = Duration::from_millis(pause_ms.into());
        let pid = std::process::id();
        let replies = futures_util::stream::unfold(0, move |n| async move {
            if n == count {
                return None;
            }
            if n > 0 && !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            Some((Ok(CountReply { n, pid }), n + 1))
        });
        Ok(Response::new(Box::pin(replies)))
    }

    async fn wait(&self, request: Request<WaitRequest>) -> Result<Response<WaitReply>, Status> {
        let millis = request.into_inner().millis;
        if millis > MAX_WAIT_MS {
            return Err(Status::invalid_argument(format!(
                "millis is at most {MAX_WAIT_MS}"
            )));
        }
        let start = Instant::now();
        tokio::time::sleep(Duration::from_millis(millis.into())).await;
        Ok(Response::new(WaitReply {
            waited_ms: start.elapsed().as_millis() as u32,
        }))
    }
}

/// Who called: `remote_addr()` on TCP; on a unix socket (where tonic's `remote_addr()` is `None`)
/// the client's credentials from tonic's `UdsConnectInfo`. tine's `tonic` feature puts tonic's
/// types in each request, as tonic's own server does.
fn caller<T>(request: &Request<T>) -> String {
    if let Some(addr) = request.remote_addr() {
        return addr.to_string();
    }
    let uds = request.extensions().get::<UdsConnectInfo>();
    match uds.and_then(|uds| uds.peer_cred) {
        Some(cred) => format!("unix pid={} uid={}", cred.pid().unwrap_or(0), cred.uid()),
        None => String::new(),
    }
}

fn main() -> std::process::ExitCode {
    tine::run::<GrpcApp>()
}
