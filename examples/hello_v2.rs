//! Build B of the reload tests and benchmark: `examples/hello_v1.rs` built under the name
//! `hello_v2`, so that it answers `hello v2` on `GET /` (see that file).

#[path = "hello_v1.rs"]
mod hello;

fn main() -> std::process::ExitCode {
    hello::main()
}
