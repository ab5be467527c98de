//! Writes `greeter.rs` (messages, client and server) from `greeter.proto`, both in the directory
//! given as the only argument. Needs `protoc` (Debian: `protobuf-compiler`).

fn main() -> std::io::Result<()> {
    let dir = std::env::args_os()
        .nth(1)
        .map(std::path::PathBuf::from)
        .expect("usage: codegen DIR (the directory of greeter.proto)");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .out_dir(&dir)
        .emit_rerun_if_changed(false)
        .compile_protos(&[dir.join("greeter.proto")], &[dir.clone()])
}
