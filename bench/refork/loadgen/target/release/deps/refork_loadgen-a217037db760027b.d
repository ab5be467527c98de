/work/main/bench/refork/loadgen/target/release/deps/refork_loadgen-a217037db760027b.d: src/main.rs

/work/main/bench/refork/loadgen/target/release/deps/refork_loadgen-a217037db760027b: src/main.rs

src/main.rs:
