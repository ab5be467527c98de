//! `cache-demo`: lazily warmed blocks that make reforking's memory effect visible. The table of
//! empty cells is made by `preload` and shared by every worker; a worker fills the cells it needs
//! (`GET /cache/{k}`), and a refork shares what was warmed.

use std::sync::OnceLock;

use http::{Response, StatusCode};
use tine::app::{full, Body, Request};

use super::text;

/// One memoized block of the cache demo: its bytes and their checksum.
pub struct Block {
    bytes: &'static [u8],
    checksum: u64,
}

/// `GET /cache/{k}`: builds block k once in this process, then answers its checksum.
pub(super) fn cache(
    table: &'static [OnceLock<Block>],
    block_kb: u64,
    req: &Request,
) -> Response<Body> {
    let Some(key) = req
        .uri()
        .path()
        .strip_prefix("/cache/")
        .and_then(|k| k.parse::<usize>().ok())
    else {
        return text(StatusCode::NOT_FOUND, "try /cache/{key}\n");
    };
    let Some(cell) = table.get(key) else {
        return text(StatusCode::NOT_FOUND, "key out of range\n");
    };
    let block = cell.get_or_init(|| build_block(key as u64, block_kb));
    let mut r = Response::new(full(format!(
        "{key} {:016x} {}\n",
        block.checksum,
        block.bytes.len()
    )));
    *r.status_mut() = StatusCode::OK;
    r
}

/// A deterministic pseudo-random block (xorshift seeded by the key), leaked: it lives as long as
/// the process and is read by plain reference.
fn build_block(key: u64, block_kb: u64) -> Block {
    let mut state = key.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut bytes = vec![0u8; (block_kb * 1024) as usize];
    let mut checksum = 0u64;
    for chunk in bytes.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
        checksum = checksum.wrapping_add(state).rotate_left(1);
    }
    Block {
        bytes: Box::leak(bytes.into_boxed_slice()),
        checksum,
    }
}
