#!/usr/bin/env bash
# Regenerates examples/grpc/greeter.rs from greeter.proto with tonic-prost-build and protoc
# (Debian: protobuf-compiler). The generated file is committed, so that building tine and running
# its tests needs neither protoc nor prost-build; .ci/run runs this and fails if the file changed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
command -v protoc >/dev/null || { echo "generate.sh needs protoc (apt-get install protobuf-compiler)" >&2; exit 1; }
# The generator's own build stays out of the source tree and out of tine's target dir.
target="${CARGO_TARGET_DIR:-$here/../../target}/grpc-codegen"
cargo run --quiet --locked --manifest-path "$here/codegen/Cargo.toml" --target-dir "$target" -- "$here"
