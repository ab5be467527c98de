//! Measures what a per-request `Arc::clone` of shared data costs in a forking server, against reading
//! the same data through a plain reference (docs/FORK_SAFETY.md quotes its output).
//!
//! ```sh
//! cargo run --release --example cow_refcount                      # 64 Ki entries of 1 KiB, 4 children
//! cargo run --release --example cow_refcount -- --entries 16384 --entry-bytes 4096 --children 2
//! ```
//!
//! For each variant a fresh "preload" process builds a table of `--entries` entries of
//! `--entry-bytes` bytes (as a preload or a mold would), then forks `--children` processes (as
//! workers). Each child does `--lookups` lookups of random keys, the way request handlers read a
//! shared table, then reports; the preload process then reads PSS and USS of itself and every child
//! from `/proc/PID/smaps_rollup`. Variants:
//!
//! - `arc-clone`: `Vec<Arc<Entry>>`, each lookup does `Arc::clone` (and drops it): the reference count
//!   lives in the same allocation as the entry, so the increment is a write to a shared page and the
//!   kernel copies that page into the child.
//! - `arc-borrow`: the same `Vec<Arc<Entry>>`, each lookup borrows `&*table[k]`: no write.
//! - `static-ref`: the entries leaked at preload (`Box::leak`), each lookup reads a `&'static Entry`.
//! - `arc-clone-boxed`: `Vec<Arc<Vec<u8>>>`: the count sits in a small allocation of its own, apart
//!   from the bytes. That helps only when the bytes are on other pages: with small entries malloc
//!   places the count blocks between the byte buffers, every page holds some count, and the
//!   clones copy everything anyway (try `--entry-bytes 262144`: buffers that large are mmapped
//!   on their own pages, and only the pages of counts are copied).
//!
//! Every fork goes through `tine::sys::process::fork`, which refuses unless the process is
//! single-threaded; this example starts no thread.

use std::hint::black_box;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use nix::sys::wait::waitpid;
use tine::sys::meminfo;
use tine::sys::process::{exit_now, fork, Forked};

#[derive(Clone, Copy)]
struct Args {
    entries: usize,
    entry_bytes: usize,
    children: usize,
    lookups: usize,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Variant {
    ArcClone,
    ArcBorrow,
    StaticRef,
    ArcCloneBoxed,
}

impl Variant {
    const ALL: [Variant; 4] = [
        Variant::StaticRef,
        Variant::ArcBorrow,
        Variant::ArcClone,
        Variant::ArcCloneBoxed,
    ];

    fn name(self) -> &'static str {
        match self {
            Variant::ArcClone => "arc-clone",
            Variant::ArcBorrow => "arc-borrow",
            Variant::StaticRef => "static-ref",
            Variant::ArcCloneBoxed => "arc-clone-boxed",
        }
    }

    fn how(self) -> &'static str {
        match self {
            Variant::ArcClone => "`let e = Arc::clone(&table[k])` per lookup",
            Variant::ArcBorrow => "`let e: &Entry = &table[k]` (same Arcs, no clone)",
            Variant::StaticRef => "`let e: &'static Entry = table[k]` (leaked at preload)",
            Variant::ArcCloneBoxed => {
                "`Arc::clone` of an `Arc<Vec<u8>>` (count in its own small allocation)"
            }
        }
    }
}

/// The shared table as each variant holds it.
enum Table {
    Arcs(Vec<Arc<[u8]>>),
    Static(&'static [&'static [u8]]),
    Boxed(Vec<Arc<Vec<u8>>>),
}

fn entry(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|j| (i.wrapping_mul(31) ^ j) as u8).collect()
}

fn build(variant: Variant, a: Args) -> Table {
    match variant {
        Variant::ArcClone | Variant::ArcBorrow => Table::Arcs(
            (0..a.entries)
                .map(|i| Arc::from(entry(i, a.entry_bytes)))
                .collect(),
        ),
        Variant::StaticRef => {
            let v: Vec<&'static [u8]> = (0..a.entries)
                .map(|i| &*Box::leak(entry(i, a.entry_bytes).into_boxed_slice()))
                .collect();
            Table::Static(Box::leak(v.into_boxed_slice()))
        }
        Variant::ArcCloneBoxed => Table::Boxed(
            (0..a.entries)
                .map(|i| Arc::new(entry(i, a.entry_bytes)))
                .collect(),
        ),
    }
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// The "request handlers": `lookups` reads of random entries, one byte each.
fn serve(table: &Table, variant: Variant, a: Args, seed: u64) -> u64 {
    let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut sum = 0u64;
    for _ in 0..a.lookups {
        let k = (xorshift(&mut rng) % a.entries as u64) as usize;
        let i = (xorshift(&mut rng) % a.entry_bytes as u64) as usize;
        sum += match (table, variant) {
            (Table::Arcs(t), Variant::ArcClone) => {
                let e = Arc::clone(&t[k]);
                black_box(&e)[i] as u64
            }
            (Table::Arcs(t), _) => {
                let e: &[u8] = &t[k];
                black_box(e)[i] as u64
            }
            (Table::Static(t), _) => {
                let e: &'static [u8] = t[k];
                black_box(e)[i] as u64
            }
            (Table::Boxed(t), _) => {
                let e = Arc::clone(&t[k]);
                black_box(&e)[i] as u64
            }
        };
    }
    sum
}

/// One variant, measured: the preload process's and each child's memory, in KiB.
struct Measured {
    variant: Variant,
    preload: meminfo::Memory,
    children: Vec<meminfo::Memory>,
}

/// Runs in the per-variant preload process: build, fork children, let them serve, measure.
fn preload_process(variant: Variant, a: Args, report: &mut UnixStream) -> std::io::Result<()> {
    let table = build(variant, a);
    let mut links = Vec::new();
    let mut pids = Vec::new();
    for c in 0..a.children {
        let (mut mine, mut theirs) = UnixStream::pair()?;
        match fork()? {
            Forked::Child => {
                drop(mine);
                let sum = serve(&table, variant, a, c as u64 + 1);
                let _ = writeln!(theirs, "served {sum}");
                // Stay alive (and keep the copied pages) until the preload process has measured.
                let mut rest = Vec::new();
                let _ = theirs.read_to_end(&mut rest);
                exit_now(0);
            }
            Forked::Parent(pid) => {
                drop(theirs);
                mine.set_read_timeout(Some(std::time::Duration::from_secs(120)))?;
                let mut line = String::new();
                // Children are forked one at a time, each served before the next: no child runs
                // while the preload process forks.
                BufReader::new(&mut mine).read_line(&mut line)?;
                if !line.starts_with("served ") {
                    return Err(std::io::Error::other(format!(
                        "child {pid} did not report: {line:?}"
                    )));
                }
                links.push(mine);
                pids.push(pid);
            }
        }
    }
    let me = meminfo::memory(std::process::id() as i32)
        .ok_or_else(|| std::io::Error::other("smaps_rollup"))?;
    let kids: Vec<String> = pids
        .iter()
        .map(|p| {
            let m = meminfo::memory(p.as_raw()).unwrap_or_default();
            format!("{} {} {} {}", m.rss_kb, m.pss_kb, m.uss_kb, m.shared_kb)
        })
        .collect();
    writeln!(
        report,
        "{} {} {} {}|{}",
        me.rss_kb,
        me.pss_kb,
        me.uss_kb,
        me.shared_kb,
        kids.join("|")
    )?;
    drop(links);
    for p in pids {
        let _ = waitpid(p, None);
    }
    drop(table);
    Ok(())
}

fn parse_mem(s: &str) -> meminfo::Memory {
    let v: Vec<u64> = s
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    meminfo::Memory {
        rss_kb: v.first().copied().unwrap_or(0),
        pss_kb: v.get(1).copied().unwrap_or(0),
        uss_kb: v.get(2).copied().unwrap_or(0),
        shared_kb: v.get(3).copied().unwrap_or(0),
    }
}

fn measure(variant: Variant, a: Args) -> Result<Measured, String> {
    let (mut mine, mut theirs) = UnixStream::pair().map_err(|e| e.to_string())?;
    match fork().map_err(|e| e.to_string())? {
        Forked::Child => {
            drop(mine);
            let code = match preload_process(variant, a, &mut theirs) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("cow_refcount: {}: {e}", variant.name());
                    1
                }
            };
            exit_now(code);
        }
        Forked::Parent(pid) => {
            drop(theirs);
            let mut line = String::new();
            let read = BufReader::new(&mut mine).read_line(&mut line);
            let _ = waitpid(pid, None);
            read.map_err(|e| e.to_string())?;
            let mut parts = line.trim().split('|');
            let preload = parse_mem(parts.next().ok_or("empty report")?);
            let children: Vec<_> = parts.map(parse_mem).collect();
            if children.len() != a.children {
                return Err(format!(
                    "{}: got {} child reports: {line:?}",
                    variant.name(),
                    children.len()
                ));
            }
            Ok(Measured {
                variant,
                preload,
                children,
            })
        }
    }
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        entries: 65536,
        entry_bytes: 1024,
        children: 4,
        lookups: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let n: usize = value
            .parse()
            .map_err(|_| format!("invalid value {value:?} for {flag}: expected a number"))?;
        match flag.as_str() {
            "--entries" if n > 0 => a.entries = n,
            "--entry-bytes" if n > 0 => a.entry_bytes = n,
            "--children" if (1..=64).contains(&n) => a.children = n,
            "--lookups" => a.lookups = n,
            _ => {
                return Err(format!(
                    "unknown flag or out-of-range value: {flag} {value}"
                ))
            }
        }
    }
    if a.lookups == 0 {
        // About 4 lookups per entry: touches ~98% of them, like a warm cache.
        a.lookups = a.entries * 4;
    }
    Ok(a)
}

fn mib(kb: u64) -> String {
    format!("{:.1}", kb as f64 / 1024.0)
}

fn main() -> std::process::ExitCode {
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("cow_refcount: {e}\nusage: cow_refcount [--entries N] [--entry-bytes B] [--children C] [--lookups L]");
            return std::process::ExitCode::from(2);
        }
    };
    let data_kb = (a.entries * a.entry_bytes / 1024) as u64;
    println!(
        "shared table: {} entries x {} bytes = {} MiB; {} children, {} random lookups each\n",
        a.entries,
        a.entry_bytes,
        mib(data_kb),
        a.children,
        a.lookups
    );
    println!("| variant | lookup | USS per child (MiB) | total PSS, preload + children (MiB) | vs static-ref |");
    println!("|---|---|---:|---:|---:|");
    let mut baseline = None;
    for variant in Variant::ALL {
        let m = match measure(variant, a) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("cow_refcount: {e}");
                return std::process::ExitCode::FAILURE;
            }
        };
        let total: u64 = m.preload.pss_kb + m.children.iter().map(|c| c.pss_kb).sum::<u64>();
        let uss = m.children.iter().map(|c| c.uss_kb).sum::<u64>() / m.children.len() as u64;
        let base = *baseline.get_or_insert(total);
        println!(
            "| {} | {} | {} | {} | {:.2}x |",
            m.variant.name(),
            m.variant.how(),
            mib(uss),
            mib(total),
            total as f64 / base as f64
        );
    }
    println!("\nUSS: pages only that process maps (what the lookups copied); PSS: shared pages split evenly.");
    std::process::ExitCode::SUCCESS
}
