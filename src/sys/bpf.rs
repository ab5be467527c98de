//! Classic BPF instructions, for the programs tine hands the kernel: a listening socket's filter
//! (`listener`) and seccomp filters (the holder of a worker's memory, `sys::holder`; a test's).

/// One classic BPF instruction (`struct sock_filter`): opcode, jump offsets if true and if false
/// (counted from the next instruction), constant.
pub(crate) const fn op(code: u32, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    }
}
