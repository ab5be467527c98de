//! Unsafe wrappers used only by the spawner.
