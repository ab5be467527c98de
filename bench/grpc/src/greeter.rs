//! The code generated from `examples/grpc/greeter.proto`, as `examples/grpc.rs` uses it.
include!("../../../examples/grpc/greeter.rs");
