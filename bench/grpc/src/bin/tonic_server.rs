//! The peer: the `SayHello` of `examples/grpc.rs`, served by tonic's own server
//! (`tonic::transport::Server`) on a tokio multi-thread runtime, as a tonic app runs without tine.
//!
//! Usage: `tonic-server ADDR THREADS`

use std::pin::Pin;

use futures_util::Stream;
use tonic::{Request, Response, Status};

#[path = "../greeter.rs"]
mod greeter;

use greeter::greeter_server::{Greeter, GreeterServer};
use greeter::{CountReply, CountRequest, HelloReply, HelloRequest, WaitReply, WaitRequest};

struct MyGreeter;

#[tonic::async_trait]
impl Greeter for MyGreeter {
    /// The same body as `examples/grpc.rs`'s on TCP (there, `caller` reads `UdsConnectInfo` only
    /// when `remote_addr()` is `None`).
    async fn say_hello(
        &self,
        request: Request<HelloRequest>,
    ) -> Result<Response<HelloReply>, Status> {
        let peer = request
            .remote_addr()
            .map_or_else(String::new, |a| a.to_string());
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

    /// Not benchmarked.
    async fn count(&self, _: Request<CountRequest>) -> Result<Response<Self::CountStream>, Status> {
        Err(Status::unimplemented("not in the benchmark"))
    }

    /// Not benchmarked.
    async fn wait(&self, _: Request<WaitRequest>) -> Result<Response<WaitReply>, Status> {
        Err(Status::unimplemented("not in the benchmark"))
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args.next().expect("usage: tonic-server ADDR THREADS");
    let threads: usize = args.next().map_or(2, |t| t.parse().expect("THREADS"));
    let addr = addr.parse().expect("ADDR");
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            tonic::transport::Server::builder()
                .tcp_nodelay(true)
                .add_service(GreeterServer::new(MyGreeter))
                .serve(addr)
                .await
                .unwrap();
        });
}
