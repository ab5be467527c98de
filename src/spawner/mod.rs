//! The spawner: isolated job worker processes (in progress).
