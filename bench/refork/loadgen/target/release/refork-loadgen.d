/work/main/bench/refork/loadgen/target/release/refork-loadgen: /work/main/bench/refork/loadgen/src/main.rs
