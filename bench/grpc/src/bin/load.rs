//! A bounded gRPC load: `CONNS` tonic `Channel`s (one HTTP/2 connection each), `PER_CONN` callers
//! on each sending unary `SayHello` calls back to back for `SECONDS`, on a current-thread runtime.
//! Prints one JSON line: calls, failures, calls/s, latency percentiles (µs).
//!
//! Usage: `grpc-load ADDR CONNS PER_CONN SECONDS`

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[path = "../greeter.rs"]
mod greeter;

use greeter::greeter_client::GreeterClient;
use greeter::HelloRequest;

fn main() {
    let mut args = std::env::args().skip(1);
    let usage = "usage: grpc-load ADDR CONNS PER_CONN SECONDS";
    let addr = args.next().expect(usage);
    let conns: usize = args.next().expect(usage).parse().expect("CONNS");
    let per_conn: usize = args.next().expect(usage).parse().expect("PER_CONN");
    let seconds: f64 = args.next().expect(usage).parse().expect("SECONDS");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let mut clients = Vec::new();
        for _ in 0..conns {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .unwrap()
                .tcp_nodelay(true)
                .connect()
                .await
                .expect("connect");
            clients.push(GreeterClient::new(channel));
        }
        let latencies = Arc::new(Mutex::new(Vec::<u32>::new()));
        let failures = Arc::new(Mutex::new(Vec::<String>::new()));
        let started = Instant::now();
        let end = started + Duration::from_secs_f64(seconds);
        let mut tasks = Vec::new();
        for client in &clients {
            for _ in 0..per_conn {
                let mut client = client.clone();
                let (latencies, failures) = (latencies.clone(), failures.clone());
                tasks.push(tokio::spawn(async move {
                    let mut mine = Vec::new();
                    while Instant::now() < end {
                        let t = Instant::now();
                        let request = HelloRequest { name: "bench".into() };
                        match client.say_hello(request).await {
                            Ok(_) => mine.push(t.elapsed().as_micros() as u32),
                            Err(status) => failures.lock().unwrap().push(status.to_string()),
                        }
                    }
                    latencies.lock().unwrap().extend(mine);
                }));
            }
        }
        for task in tasks {
            task.await.unwrap();
        }
        let elapsed = started.elapsed().as_secs_f64();
        let mut latencies = latencies.lock().unwrap().clone();
        latencies.sort_unstable();
        let pct = |p: f64| {
            latencies
                .get(((latencies.len() as f64 - 1.0) * p) as usize)
                .copied()
                .unwrap_or(0)
        };
        let failures = failures.lock().unwrap();
        println!(
            "{{\"calls\":{},\"failures\":{},\"seconds\":{elapsed:.3},\"calls_per_s\":{:.0},\
             \"p50_us\":{},\"p90_us\":{},\"p99_us\":{},\"first_failure\":{:?}}}",
            latencies.len(),
            failures.len(),
            latencies.len() as f64 / elapsed,
            pct(0.5),
            pct(0.9),
            pct(0.99),
            failures.first().cloned().unwrap_or_default(),
        );
    });
}
