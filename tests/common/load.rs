//! A bounded concurrent load generator that counts responses by status and by worker pid.

use super::*;

/// What a [`load`] run saw.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    /// Responses by status code.
    pub by_status: BTreeMap<u16, usize>,
    /// Responses by the worker pid that answered (`x-tine-worker`; 0 when absent).
    pub by_worker: BTreeMap<i32, usize>,
    /// Requests that got no response, with why.
    pub errors: Vec<String>,
    /// Requests not sent because the deadline passed.
    pub skipped: usize,
}

impl LoadReport {
    /// Responses with status `code`.
    pub fn status(&self, code: u16) -> usize {
        self.by_status.get(&code).copied().unwrap_or(0)
    }

    /// Total responses.
    pub fn responses(&self) -> usize {
        self.by_status.values().sum()
    }
}

/// Sends `threads × per_thread` `GET path` requests concurrently, each on a new connection (or,
/// with `keep_alive`, one connection per thread, reopened if the server closes it). Bounded: every
/// socket has [`IO_TIMEOUT`], and no request starts after `deadline` from now.
pub fn load(
    addr: &Addr,
    path: &str,
    threads: usize,
    per_thread: usize,
    keep_alive: bool,
    deadline: Duration,
) -> LoadReport {
    let report = Mutex::new(LoadReport::default());
    let until = Instant::now() + deadline;
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut mine = LoadReport::default();
                let mut conn: Option<Client> = None;
                for i in 0..per_thread {
                    if Instant::now() >= until {
                        mine.skipped += per_thread - i;
                        break;
                    }
                    let result = if keep_alive {
                        let c = match conn.take() {
                            Some(c) => Ok(c),
                            None => Client::connect(addr),
                        };
                        c.and_then(|mut c| {
                            let r = c.get(path)?;
                            if !r.closes() {
                                conn = Some(c);
                            }
                            Ok(r)
                        })
                    } else {
                        get(addr, path)
                    };
                    match result {
                        Ok(r) => {
                            *mine.by_status.entry(r.status).or_default() += 1;
                            *mine.by_worker.entry(r.worker().unwrap_or(0)).or_default() += 1;
                        }
                        Err(e) => mine.errors.push(e.to_string()),
                    }
                }
                let mut all = report.lock().unwrap();
                for (k, v) in mine.by_status {
                    *all.by_status.entry(k).or_default() += v;
                }
                for (k, v) in mine.by_worker {
                    *all.by_worker.entry(k).or_default() += v;
                }
                all.errors.extend(mine.errors);
                all.skipped += mine.skipped;
            });
        }
    });
    report.into_inner().unwrap()
}
