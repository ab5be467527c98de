//! HTTP serving with hyper: HTTP/1.1 keep-alive, HTTP/2 with prior knowledge, the connection
//! deadlines (request head, keep-alive, request body), `max_connections`, PROXY protocol headers,
//! a request-head size limit, and graceful drain.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::Stop;
use crate::app::{full, AppFuture, HttpService, Peer, Request, RequestBody};
use crate::config::Config;
use crate::ipc::scoreboard::{InFlightRequest, SlotWriter};
use crate::listener::Listener;
use crate::request_body::BodyWatch;

/// Set when this worker starts draining. An HTTP/1 response written from then on says
/// `Connection: close` itself: hyper's graceful shutdown only marks a request it is already
/// serving, so the first request of a fresh connection, read and answered in the same turn as
/// the drain began, was answered as kept alive and then the connection closed under the client.
pub(super) static DRAINING: AtomicBool = AtomicBool::new(false);

/// An activated spare logs its first accepted connection and its first request (target
/// `tine::respawn`, debug).
pub(super) static LOG_FIRST_ACCEPT: AtomicBool = AtomicBool::new(false);
pub(super) static LOG_FIRST_REQUEST: AtomicBool = AtomicBool::new(false);
/// When they came ([`crate::log::respawn_stamp`]), for the activation to log once the first
/// response is out: a line written on the way would lengthen what it times.
pub(super) static FIRST_ACCEPTED: std::sync::Mutex<Option<crate::log::RespawnStamp>> =
    std::sync::Mutex::new(None);
pub(super) static FIRST_PARSED: std::sync::Mutex<Option<crate::log::RespawnStamp>> =
    std::sync::Mutex::new(None);

/// Set once a listener left the reactor by a duplicate (see [`Gate::leave`]): said once.
static LEFT_BY_DUPLICATE: AtomicBool = AtomicBool::new(false);

/// An accepted connection of either listener kind.
pub(super) enum Accepted {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

/// A listener converted to tokio (a duplicate of the inherited descriptor).
pub(super) enum AsyncListener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

/// A duplicate of a listening socket, not registered with the runtime: what an accept loop keeps
/// to register the listener again after a pause at `max_connections`.
pub(super) enum Dup {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

impl Dup {
    pub(super) fn of(listener: &Listener) -> io::Result<Dup> {
        Ok(match listener {
            Listener::Tcp(l, _) => Dup::Tcp(l.try_clone()?),
            Listener::Unix(l, _) => Dup::Unix(l.try_clone()?),
        })
    }
}

impl std::os::fd::AsFd for AsyncListener {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            AsyncListener::Tcp(l) => l.as_fd(),
            AsyncListener::Unix(l) => l.as_fd(),
        }
    }
}

impl AsyncListener {
    /// Registers a duplicate of `dup` with this thread's runtime. With `exclusive`, a new
    /// connection wakes one idle worker rather than all of them (see [`crate::sys::epoll`]).
    fn from_dup(dup: &Dup, exclusive: bool) -> io::Result<AsyncListener> {
        let registered = AsyncListener::register(dup)?;
        if !exclusive {
            return Ok(registered);
        }
        match crate::sys::epoll::make_exclusive(registered.as_raw_fd()) {
            Ok(crate::sys::epoll::Exclusive::Done) => Ok(registered),
            Ok(crate::sys::epoll::Exclusive::NotRegistered) => {
                tracing::debug!(
                    "listener not found in the reactor: every worker wakes per connection"
                );
                Ok(registered)
            }
            Err(e) => {
                tracing::warn!(error = %e, "exclusive accept wake-ups unavailable");
                drop(registered);
                AsyncListener::register(dup)
            }
        }
    }

    fn register(dup: &Dup) -> io::Result<AsyncListener> {
        Ok(match dup {
            Dup::Tcp(l) => {
                let l = l.try_clone()?;
                l.set_nonblocking(true)?;
                AsyncListener::Tcp(tokio::net::TcpListener::from_std(l)?)
            }
            Dup::Unix(l) => {
                let l = l.try_clone()?;
                l.set_nonblocking(true)?;
                AsyncListener::Unix(tokio::net::UnixListener::from_std(l)?)
            }
        })
    }

    /// A unix listener's path (once per listener: every connection's [`crate::ConnectInfo`]
    /// shares it).
    fn unix_path(&self) -> Option<Arc<std::path::Path>> {
        match self {
            AsyncListener::Tcp(_) => None,
            AsyncListener::Unix(l) => l.local_addr().ok()?.as_pathname().map(Arc::from),
        }
    }

    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        std::os::fd::AsFd::as_fd(self).as_raw_fd()
    }

    /// Accepts the next connection, waiting out transient errors (a full fd table, a connection
    /// reset before it was accepted) rather than ending the loop.
    async fn accept(&self, nodelay: bool) -> Accepted {
        loop {
            let result = match self {
                AsyncListener::Tcp(l) => l.accept().await.map(|(s, _)| {
                    if nodelay {
                        let _ = s.set_nodelay(true);
                    }
                    Accepted::Tcp(s)
                }),
                AsyncListener::Unix(l) => l.accept().await.map(|(s, _)| Accepted::Unix(s)),
            };
            match result {
                Ok(a) => return a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    /// Stops accepting: leaves the reactor, then takes the connections already queued on the
    /// listener, without waiting (a bounded number).
    ///
    /// With exclusive wake-ups the kernel may have woken only this worker for them, and no other
    /// worker hears of them until the next connection arrives. Leaving the reactor first means
    /// that a connection arriving from then on wakes another worker, and every one queued before
    /// is taken here. Served during the drain, they are answered with `Connection: close`.
    pub(super) fn into_queued(self, nodelay: bool) -> Vec<Accepted> {
        match self.into_dup() {
            Ok(dup) => dup.into_queued(nodelay),
            Err(_) => Vec::new(),
        }
    }

    /// Leaves the reactor, keeping the listener as an unregistered duplicate.
    fn into_dup(self) -> io::Result<Dup> {
        let dup = self.dup()?;
        drop(self); // deregisters (and closes) this listener's reactor-registered duplicate
        Ok(dup)
    }

    /// An unregistered duplicate of this listener.
    fn dup(&self) -> io::Result<Dup> {
        let fd = std::os::fd::AsFd::as_fd(self).try_clone_to_owned()?;
        Ok(match self {
            AsyncListener::Tcp(_) => Dup::Tcp(fd.into()),
            AsyncListener::Unix(_) => Dup::Unix(fd.into()),
        })
    }
}

impl Dup {
    /// Takes the connections queued on this listener, without waiting (see
    /// [`AsyncListener::into_queued`]).
    fn into_queued(self, nodelay: bool) -> Vec<Accepted> {
        match self {
            Dup::Tcp(listener) => take_queued(
                listener.set_nonblocking(true).map(|()| &listener),
                |l| l.accept().map(|(s, _)| s),
                |s| {
                    if nodelay {
                        let _ = s.set_nodelay(true);
                    }
                    s.set_nonblocking(true)?;
                    Ok(Accepted::Tcp(tokio::net::TcpStream::from_std(s)?))
                },
            ),
            Dup::Unix(listener) => take_queued(
                listener.set_nonblocking(true).map(|()| &listener),
                |l| l.accept().map(|(s, _)| s),
                |s| {
                    s.set_nonblocking(true)?;
                    Ok(Accepted::Unix(tokio::net::UnixStream::from_std(s)?))
                },
            ),
        }
    }
}

/// The connections one worker holds, over all its listeners, against `max_connections`.
pub(super) struct Capacity {
    open: std::sync::atomic::AtomicUsize,
    max: usize,
    /// Woken when a connection closes at the limit, for the accept loops waiting for room.
    room: tokio::sync::Notify,
    slot: SlotWriter<'static>,
    /// With `accept_balance`: how this worker weighs itself against its peers before an accept.
    balance: Option<super::balance::Balance>,
    /// With `accept_balance`: when a connection last closed, in nanoseconds after `epoch`, plus
    /// one (0: none yet).
    last_close: AtomicU64,
    /// The same for the close before the last: within [`super::balance::QUIET`], no deferral
    /// starts.
    close_before_last: AtomicU64,
    epoch: std::time::Instant,
    /// Accept loops deferring to a lighter peer, woken through `closed` when a connection closes:
    /// this worker's count dropping may end their deferral at once.
    deferring: AtomicUsize,
    closed: tokio::sync::Notify,
}

impl Capacity {
    /// `balance`: whether the accept loops leave a new connection to a lighter peer (see
    /// [`super::balance`]).
    pub(super) fn new(max: usize, slot: SlotWriter<'static>, balance: bool) -> Arc<Capacity> {
        Arc::new(Capacity {
            open: Default::default(),
            max,
            room: tokio::sync::Notify::new(),
            slot,
            balance: balance.then(|| super::balance::Balance::new(max)).flatten(),
            last_close: AtomicU64::new(0),
            close_before_last: AtomicU64::new(0),
            epoch: std::time::Instant::now(),
            deferring: AtomicUsize::new(0),
            closed: tokio::sync::Notify::new(),
        })
    }

    fn is_full(&self) -> bool {
        self.open.load(Ordering::SeqCst) >= self.max
    }

    /// Counts an accepted connection until the returned guard drops (when its socket closes).
    pub(super) fn admit(self: &Arc<Capacity>) -> Admitted {
        self.open.fetch_add(1, Ordering::SeqCst);
        self.slot.count_connection(true);
        Admitted(self.clone())
    }

    /// Resolves once the worker holds fewer than `max` connections.
    async fn room(&self) {
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            // Registered before the check: a close between the two still wakes this.
            notified.as_mut().enable();
            if !self.is_full() {
                return;
            }
            notified.await;
        }
    }

    /// One wait of a deferral to a lighter peer, decided while this worker held `mine`
    /// connections: until one of its connections closes (its count dropping may end the deferral;
    /// under churn that is within a request's time) or [`super::balance::POLL`] passes (the
    /// peer's count may have moved).
    async fn deferral_wait(&self, mine: usize) {
        let notified = self.closed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let _deferring = Deferring::new(&self.deferring);
        // SeqCst, as in Admitted::drop: either this load sees a close that came after the
        // verdict, or that close sees this loop deferring and wakes it.
        if self.open.load(Ordering::SeqCst) < mine {
            return;
        }
        tokio::select! {
            biased;
            _ = notified => {}
            _ = tokio::time::sleep(super::balance::POLL) => {}
        }
    }
}

/// An accept loop counted in [`Capacity::deferring`] while it waits (dropped: the wait was
/// cancelled or ended).
struct Deferring<'a>(&'a AtomicUsize);

impl<'a> Deferring<'a> {
    fn new(count: &'a AtomicUsize) -> Deferring<'a> {
        count.fetch_add(1, Ordering::SeqCst);
        Deferring(count)
    }
}

impl Drop for Deferring<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One connection counted against `max_connections`, until dropped.
pub(super) struct Admitted(Arc<Capacity>);

impl Drop for Admitted {
    fn drop(&mut self) {
        let capacity = &self.0;
        capacity.slot.count_connection(false);
        let was = capacity.open.fetch_sub(1, Ordering::SeqCst);
        if capacity.balance.is_some() {
            let at = capacity.epoch.elapsed().as_nanos() as u64 + 1;
            // Two words, not one pair. With more than one runtime thread two closes may cross
            // here; `fetch_max` keeps the later of what each saw as the close before, so that
            // crossing leaves the pair no older than it is (it errs towards no deferral).
            let before = capacity.last_close.swap(at, Ordering::Relaxed);
            capacity
                .close_before_last
                .fetch_max(before, Ordering::Relaxed);
            // Only while a loop defers: no wake-up per close otherwise.
            if capacity.deferring.load(Ordering::SeqCst) != 0 {
                capacity.closed.notify_waiters();
            }
        }
        // Only the close that makes room wakes the accept loops: no wake-up per close otherwise.
        if was == capacity.max {
            capacity.room.notify_waiters();
        }
    }
}

/// A listener as its accept loop holds it: registered with the runtime while the worker has
/// room for another connection, out of the reactor while it holds `max_connections`.
///
/// Leaving the reactor (rather than merely not accepting) matters with exclusive wake-ups: the
/// kernel wakes one waiting worker per new connection, and a full worker that stayed registered
/// would take those wake-ups and leave the connections queued. Left, the kernel wakes workers
/// with room, and what they do not take waits in the listen queue until some worker has room
/// (registering again finds the queue non-empty at once). One gap remains, as in nginx: a
/// connection queued in the instant this worker fills up, for which the kernel woke only this
/// worker, waits for the next arrival (which wakes another worker) or for a close here.
///
/// The same holds while the worker leaves a new connection to a lighter peer (`accept_balance`,
/// see [`super::balance`]): it leaves the reactor for a few milliseconds at most. Leaving takes
/// the registration out of the reactor's epoll instance and coming back puts it back
/// ([`crate::sys::epoll::Switch`]: one `epoll_ctl` each way once the registration was read from
/// fdinfo, the first time); a duplicate registered anew is the fallback.
pub(super) struct Gate {
    /// Registered while the worker has room (its registration out of the epoll instance while
    /// it does not), else left as a duplicate (one descriptor either way).
    listener: Held,
    exclusive: bool,
    nodelay: bool,
    capacity: Arc<Capacity>,
    unix_path: Option<Arc<std::path::Path>>,
    /// A deferral to a lighter peer under way, and the peers this loop gave up on.
    deferral: Option<super::balance::Deferral>,
    passed_over: Option<super::balance::PassedOver>,
}

enum Held {
    Registered(crate::sys::epoll::Switch<AsyncListener>),
    Left(Dup),
}

impl Gate {
    pub(super) fn new(
        listener: &Listener,
        config: &Config,
        capacity: Arc<Capacity>,
    ) -> io::Result<Gate> {
        let registered = AsyncListener::from_dup(&Dup::of(listener)?, config.exclusive_accept)?;
        Ok(Gate::holding(
            registered,
            config.exclusive_accept,
            config.nodelay,
            capacity,
        ))
    }

    /// The gate of `registered`, just registered with this thread's reactor.
    fn holding(
        registered: AsyncListener,
        exclusive: bool,
        nodelay: bool,
        capacity: Arc<Capacity>,
    ) -> Gate {
        Gate {
            unix_path: registered.unix_path(),
            // It owns its descriptor and the reactor's registration of it (Switch's contract).
            listener: Held::Registered(crate::sys::epoll::Switch::new(registered)),
            exclusive,
            nodelay,
            deferral: None,
            passed_over: capacity.balance.as_ref().map(|b| b.passed_over()),
            capacity,
        }
    }

    /// Whether the kernel may wake this worker for the listener.
    fn in_reactor(&self) -> bool {
        matches!(&self.listener, Held::Registered(s) if !s.is_out())
    }

    /// Leaves the reactor: takes the registration out of the epoll instance, or failing that
    /// keeps the listener as a duplicate. If no descriptor is free for the copy, it stays
    /// registered: merely not accepting.
    fn leave(&mut self) {
        let Held::Registered(switch) = &mut self.listener else {
            return;
        };
        let why = match switch.take_out() {
            Ok(true) => return,
            Ok(false) => "its registration was not found".to_string(),
            Err(e) => e.to_string(),
        };
        // Unexpected (fdinfo's format?) and slower each time: said once, where it shows.
        if !LEFT_BY_DUPLICATE.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                error = why,
                "cannot take the listener out of the reactor: leaving it by a duplicate"
            );
        }
        // Replacing it deregisters (and closes) the registered duplicate.
        match switch.get().dup() {
            Ok(dup) => self.listener = Held::Left(dup),
            Err(e) => tracing::warn!(error = %e, "cannot leave the reactor"),
        }
    }

    /// Whether to leave the next connection to a lighter peer (see [`super::balance`]):
    /// `Some(connections held)` while deferring (the reactor left), to look again after
    /// [`Capacity::deferral_wait`].
    fn defers(&mut self) -> Option<usize> {
        let (Some(balance), Some(passed_over)) = (&self.capacity.balance, &mut self.passed_over)
        else {
            return None;
        };
        let mine = self.capacity.open.load(Ordering::Relaxed);
        let close_before_last = match self.capacity.close_before_last.load(Ordering::Relaxed) {
            0 => None,
            at => Some(self.capacity.epoch + Duration::from_nanos(at - 1)),
        };
        match balance.verdict(
            mine as u64,
            close_before_last,
            &mut self.deferral,
            passed_over,
        ) {
            super::balance::Verdict::Accept => None,
            super::balance::Verdict::Wait => Some(mine),
            super::balance::Verdict::Leave => {
                self.leave();
                Some(mine)
            }
        }
    }

    /// The listener registered and in the reactor: put back, or registered anew from its
    /// duplicate. `None` (said as a warning): neither worked, try again later.
    fn rejoin(&mut self) -> Option<&AsyncListener> {
        if let Held::Registered(switch) = &mut self.listener {
            if let Err(e) = switch.put_back() {
                tracing::warn!(error = %e, "cannot put the listener back: registering it anew");
                match switch.get().dup() {
                    // The switch drops here: the reactor keeps the state of a registration it
                    // cannot find to remove (tokio's choice), a small leak on a rare error.
                    Ok(dup) => self.listener = Held::Left(dup),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot duplicate the listener");
                        return None;
                    }
                }
            }
        }
        if let Held::Left(dup) = &self.listener {
            match AsyncListener::from_dup(dup, self.exclusive) {
                // The duplicate closes here: one descriptor again. The new registration is the
                // listener's own (Switch's contract).
                Ok(l) => self.listener = Held::Registered(crate::sys::epoll::Switch::new(l)),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot register the listener again");
                    return None;
                }
            }
        }
        match &self.listener {
            Held::Registered(switch) => Some(switch.get()),
            Held::Left(_) => None,
        }
    }

    /// A unix listener's path (see [`AsyncListener::unix_path`]).
    fn unix_path(&self) -> Option<Arc<std::path::Path>> {
        self.unix_path.clone()
    }

    /// The next connection, once the worker has room for it. Cancel-safe: dropped at any await,
    /// the next call carries on from the same state.
    pub(super) async fn accept(&mut self) -> (Accepted, Admitted) {
        loop {
            if self.capacity.is_full() {
                // A deferral to a peer (the reactor left already) ends here: this is a pause.
                let deferring = self.deferral.take().is_some();
                if deferring || self.in_reactor() {
                    self.leave();
                    self.capacity.slot.count_accept_pause();
                    tracing::debug!(
                        max_connections = self.capacity.max,
                        "holding max_connections: not accepting until one closes"
                    );
                }
                self.capacity.room().await;
                continue;
            }
            if let Some(mine) = self.defers() {
                self.capacity.deferral_wait(mine).await;
                continue;
            }
            let nodelay = self.nodelay;
            let Some(listener) = self.rejoin() else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            let accepted = listener.accept(nodelay).await;
            if LOG_FIRST_ACCEPT.load(Ordering::Relaxed)
                && LOG_FIRST_ACCEPT.swap(false, Ordering::Relaxed)
            {
                if let (Some(at), Ok(mut first)) =
                    (crate::log::respawn_stamp(), FIRST_ACCEPTED.lock())
                {
                    *first = Some(at);
                }
            }
            return (accepted, self.capacity.admit());
        }
    }

    /// Stops accepting and takes what is queued (see [`AsyncListener::into_queued`]), even past
    /// `max_connections`: a drain is bounded, and what this worker leaves queued may be lost.
    pub(super) fn into_queued(self) -> Vec<(Accepted, Admitted)> {
        let queued = match self.listener {
            // Put back first, so that the reactor's removal finds the registration.
            Held::Registered(switch) => switch.into_inner().into_queued(self.nodelay),
            Held::Left(dup) => dup.into_queued(self.nodelay),
        };
        queued
            .into_iter()
            .map(|a| (a, self.capacity.admit()))
            .collect()
    }
}

/// A listener's [`Gate`] made ready while a hot spare stands by, before it holds the listening
/// socket: a placeholder socket (see [`placeholder_like`]) is registered with the reactor, and its
/// registration learned
/// (`sys::epoll::learn_registration`). Activation then points the placeholder's descriptor at the
/// listening socket (`dup3`) and gives it the learned registration, exclusive if configured
/// (`epoll_ctl`): the reactor serves it as the placeholder's. Without it, activation registered the
/// socket anew and read the registration back from `/proc/self/fdinfo` to make it exclusive
/// ([`Gate::new`]): ~80 µs of the just-woken spare's CPU, on the way to its first accept.
pub(super) struct StandbyGate {
    placeholder: AsyncListener,
    learned: crate::sys::epoll::Learned,
    exclusive: bool,
    nodelay: bool,
    capacity: Arc<Capacity>,
}

impl StandbyGate {
    /// Prepares the gate of `listener` (which this process does not hold yet). `None`, said as a
    /// warning, when the placeholder cannot be made or its registration is not found:
    /// activation then makes the gate the ordinary way.
    pub(super) fn prepare(
        listener: &Listener,
        config: &Config,
        capacity: Arc<Capacity>,
    ) -> Option<StandbyGate> {
        let prepared = (|| -> io::Result<Option<StandbyGate>> {
            let placeholder = AsyncListener::register(&placeholder_like(listener)?)?;
            let Some(learned) = crate::sys::epoll::learn_registration(placeholder.as_raw_fd())?
            else {
                return Ok(None);
            };
            Ok(Some(StandbyGate {
                placeholder,
                learned,
                exclusive: config.exclusive_accept,
                nodelay: config.nodelay,
                capacity,
            }))
        })();
        match prepared {
            Ok(Some(gate)) => Some(gate),
            Ok(None) => {
                // Slower activation only, but unexpected (fdinfo's format?): said where it shows.
                tracing::warn!(
                    "the placeholder's registration was not found: the gate is made at activation"
                );
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "no placeholder listener: the gate is made at activation");
                None
            }
        }
    }

    /// Opens the gate on `listener`, back in this process: its socket takes the placeholder's
    /// descriptor and registration. On error the placeholder is gone; make the gate with
    /// [`Gate::new`].
    pub(super) fn open(self, listener: &Listener) -> io::Result<Gate> {
        let fd = self.placeholder.as_raw_fd();
        // The registration waits for readiness; a blocking accept would stall the runtime. (The
        // socket's file status is shared by every process that holds it: usually set already.)
        match listener {
            Listener::Tcp(l, _) => l.set_nonblocking(true)?,
            Listener::Unix(l, _) => l.set_nonblocking(true)?,
        }
        // Closes the placeholder (its only descriptor), which ends its registration.
        nix::unistd::dup3(listener.raw_fd(), fd, nix::fcntl::OFlag::O_CLOEXEC)?;
        self.learned.take_over(fd, self.exclusive)?;
        // The placeholder's registration is the listener's now.
        Ok(Gate::holding(
            self.placeholder,
            self.exclusive,
            self.nodelay,
            self.capacity,
        ))
    }
}

/// The placeholder a [`StandbyGate`] registers, typed as `listener`'s kind (nothing is ever called
/// on it as such: its descriptor is the listener's before the gate opens): an unbound unix datagram
/// socket, which nobody can reach and which reports no event but writability (a writability the
/// reactor still remembers after the swap: harmless, an accept waits for readability only). Not an unconnected
/// stream socket: it reports a hang-up, which the reactor keeps as final (the accept loop would
/// find the listener readable for ever).
fn placeholder_like(listener: &Listener) -> io::Result<Dup> {
    let fd = std::os::fd::OwnedFd::from(socket2::Socket::new(
        socket2::Domain::UNIX,
        socket2::Type::DGRAM,
        None,
    )?);
    Ok(match listener {
        Listener::Tcp(..) => Dup::Tcp(std::net::TcpListener::from(fd)),
        Listener::Unix(..) => Dup::Unix(std::os::unix::net::UnixListener::from(fd)),
    })
}

/// Accepts from `listener` until it would block (a bounded number of tries), converting each
/// connection with `adopt`. A listener that could not be made non-blocking (`Err`) is left alone:
/// a blocking accept must never stall a drain. Transient errors (a connection reset before it was
/// taken, no descriptor free) skip to the next.
fn take_queued<L, S>(
    listener: io::Result<&L>,
    accept: impl Fn(&L) -> io::Result<S>,
    adopt: impl Fn(S) -> io::Result<Accepted>,
) -> Vec<Accepted> {
    const LIMIT: usize = 256;
    let mut taken = Vec::new();
    let Ok(listener) = listener else {
        return taken;
    };
    for _ in 0..LIMIT {
        match accept(listener) {
            Ok(s) => taken.extend(adopt(s).ok()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(_) => continue,
        }
    }
    taken
}

/// The addresses every request of a connection carries. A failed lookup (the client already
/// gone) leaves the unspecified address: the connection fails at its first read anyway.
fn peer_of(accepted: &Accepted, unix_path: &Option<Arc<std::path::Path>>) -> Peer {
    match accepted {
        Accepted::Tcp(s) => {
            let unknown = std::net::SocketAddr::from(([0, 0, 0, 0], 0));
            Peer::tcp(
                s.peer_addr().unwrap_or(unknown),
                s.local_addr().unwrap_or(unknown),
            )
        }
        Accepted::Unix(s) => Peer::unix(s, unix_path.clone()),
    }
}

impl From<Accepted> for crate::app::Connection {
    fn from(accepted: Accepted) -> crate::app::Connection {
        match accepted {
            Accepted::Tcp(s) => crate::app::Connection::Tcp(s),
            Accepted::Unix(s) => crate::app::Connection::Unix(s),
        }
    }
}

/// Spawns the accept loop of the listener whose [`Gate`] comes through `gate` (dropped unsent: the
/// task ends). Everything else is made now: a hot spare spawns its loops before it is activated,
/// so that all that is left on the way to its first accept is the gate.
pub(super) fn spawn_accept_loop(
    gate: oneshot::Receiver<Gate>,
    service: HttpService,
    config: Arc<Config>,
    slot: SlotWriter<'static>,
    stop: watch::Receiver<Stop>,
    connect_info: bool,
) -> JoinHandle<()> {
    accept_loop(gate, service, config, slot, stop, false, connect_info)
}

/// Runs one request through this worker's HTTP stack — an accept loop, a connection, hyper, the
/// request service — on a private loopback listener of its own, answered by tine itself (`204`,
/// neither the app called nor the request counted). A hot spare does it while it stands by: the
/// same code then runs warm for its first real request after activation (its pages mapped, its
/// allocations made), where it would otherwise cost a waiting client a few hundred microseconds.
/// HTTP/1 only.
pub(super) async fn warm_up(
    service: HttpService,
    config: Arc<Config>,
    slot: SlotWriter<'static>,
) -> io::Result<()> {
    let private = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    let addr = private.local_addr()?;
    let listener = Listener::Tcp(private, crate::config::ListenAddr::Tcp(addr));
    let (stop_tx, stop_rx) = watch::channel(Stop::Running);
    let (gate_tx, gate_rx) = oneshot::channel();
    // No addresses: the app is not called.
    let task = accept_loop(gate_rx, service, config.clone(), slot, stop_rx, true, false);
    // Its one connection is no load to weigh.
    let capacity = Capacity::new(config.max_connections, slot, false);
    let _ = gate_tx.send(Gate::new(&listener, &config, capacity)?);
    let exchange = async {
        let client = tokio::net::TcpStream::connect(addr).await?;
        let mut request: &[u8] =
            b"GET / HTTP/1.1\r\nHost: tine-warm-up\r\nConnection: close\r\n\r\n";
        while !request.is_empty() {
            client.writable().await?;
            match client.try_write(request) {
                Ok(n) => request = &request[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        let mut buf = [0u8; 512];
        loop {
            client.readable().await?;
            match client.try_read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    };
    let outcome = tokio::time::timeout(Duration::from_secs(2), exchange).await;
    let _ = stop_tx.send(Stop::Quick);
    let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
    match outcome {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "no answer in 2 s")),
    }
}

/// The accept loop; `warm_up`: the private one of [`warm_up`]. `connect_info`: requests carry
/// their connection's addresses ([`crate::App::connect_info`]).
fn accept_loop(
    gate: oneshot::Receiver<Gate>,
    service: HttpService,
    config: Arc<Config>,
    slot: SlotWriter<'static>,
    mut stop: watch::Receiver<Stop>,
    warm_up: bool,
    connect_info: bool,
) -> JoinHandle<()> {
    // The builder lives as long as the worker; leaking it gives connections a 'static borrow.
    let builder: &'static Builder = Box::leak(Box::new(Builder::new(&config)));
    tokio::spawn(async move {
        // Every connection task holds a clone of `open`; `recv` returns None once all have ended.
        let (open, mut all_closed) = mpsc::channel::<()>(1);
        let mut connections = Connections::new(&config);
        let Ok(mut gate) = gate.await else { return };
        let unix_path = gate.unix_path();
        let mut sweep = connections.sweep_interval();
        // Owns the service and the drain tracker's sender: dropping it is part of the drain.
        let serve = {
            let config = config.clone();
            let bodies = connections.bodies.clone();
            move |(accepted, admitted): (Accepted, Admitted), connections: &mut Connections| {
                let life = Life {
                    shared: connections.add(),
                    patience: config.header_read_timeout,
                    _open: open.clone(),
                    admitted,
                };
                // Looked up only for an app that reads them: two system calls per connection.
                let peer = connect_info.then(|| peer_of(&accepted, &unix_path));
                // Made in the connection's task: with `proxy_protocol` the peer is known only
                // once the PROXY header has been read.
                let make_service = {
                    let (service, config) = (service.clone(), config.clone());
                    let (shared, bodies) = (life.shared.clone(), bodies.clone());
                    move |peer: Option<Peer>| {
                        let extensions = peer.map(|peer| peer.extensions());
                        request_service(
                            service, config, slot, &shared, &bodies, extensions, warm_up,
                        )
                    }
                };
                builder.spawn(accepted, peer, make_service, life);
            }
        };
        loop {
            let accepted = tokio::select! {
                biased;
                _ = stop.changed() => break,
                _ = sweep.tick() => {
                    connections.sweep();
                    continue;
                }
                a = gate.accept() => a,
            };
            serve(accepted, &mut connections);
        }
        // Stop accepting before draining: take what is queued already; the listener's
        // duplicates close here.
        for accepted in gate.into_queued() {
            serve(accepted, &mut connections);
        }
        // Kept-alive connections answer their next request with `Connection: close` (HTTP/2:
        // GOAWAY); idle ones stay until it comes, for the drain grace at most (the sweep's idle
        // deadline applies too). The monitor's graceful_timeout bounds the whole drain.
        let drained = connections.drain();
        drop(serve);
        let grace = tokio::time::sleep(drain_grace(&config, *stop.borrow()));
        tokio::pin!(grace);
        let mut graced = false;
        loop {
            tokio::select! {
                _ = all_closed.recv() => break,
                _ = sweep.tick() => connections.sweep(),
                _ = &mut grace, if !graced => {
                    graced = true;
                    close_idle_since(&drained);
                }
            }
        }
    })
}

/// How long idle connections are kept by this drain: `drain_grace`, but at most a quarter of
/// `spawn_timeout` for a worker being promoted, which must become a mold within `spawn_timeout`
/// (the rest of the drain, the runtime's shutdown and `before_mold` follow).
fn drain_grace(config: &Config, stop: Stop) -> Duration {
    match stop {
        Stop::Promote { .. } => config.drain_grace.min(config.spawn_timeout / 4),
        _ => config.drain_grace,
    }
}

/// The open connections of one listener, as its accept loop sees them: it sweeps them for
/// deadlines and tells them to drain.
///
/// Deadlines are kept coarsely, by one sweep of all connections every `period` (half the shortest
/// of `header_read_timeout`, `keepalive_timeout` and `body_read_timeout`) instead of a timer per
/// connection or per request: a deadline of T is "no progress over ⌈T / period⌉ whole sweep
/// periods", so it is met between T and T + period. Each connection is judged in one of three
/// phases:
///
/// - **Active**: a request or HTTP/2 stream is open. Progress is a request head or a write; a
///   request waiting on the app (its response head not out yet, or a response body that pauses,
///   as server-sent events do) is never cut here. A client that stops reading a response is cut
///   after `header_read_timeout`: nothing is written and nothing waits on the app. A request body
///   the app waits for is judged by itself (`body_read_timeout`, see [`BodyList`]).
/// - **Head**: a new connection, or an HTTP/1.1 one that has read bytes of its next request.
///   The head must complete within `header_read_timeout` (slowloris: a trickled head is cut).
/// - **Keep-alive**: an HTTP/1.1 connection between requests that has read nothing since its
///   last response, or an HTTP/2 connection with no stream open (its PINGs and SETTINGS do not
///   count as progress). Closed after `keepalive_timeout`; HTTP/2 with a GOAWAY first (hyper's
///   graceful shutdown: GOAWAY, a PING, the final GOAWAY), and closed outright if it has not
///   ended `header_read_timeout` later.
///
/// Nothing of this runs on a connection's request path but a few counter updates.
struct Connections {
    period: Duration,
    /// Each deadline in sweep periods.
    head: u32,
    keepalive: u32,
    body: u32,
    list: Vec<Judged>,
    /// The list's length at which `add` forgets ended connections, so that under connection
    /// churn the list stays within twice the open connections, however long the sweep period.
    compact_at: usize,
    /// The request bodies the app waits for, judged by the same sweep.
    bodies: Arc<BodyList>,
}

/// A connection as the sweep saw it last.
struct Judged {
    shared: Arc<Shared>,
    phase: Phase,
    /// The phase's measure of progress at the last sweep.
    progress: u64,
    /// Sweep periods in this phase without progress (`None`: not swept yet, so a connection
    /// accepted just before a sweep is never judged on a partial period).
    idle: Option<u32>,
    /// Sweeps since an idle HTTP/2 connection was sent its GOAWAY.
    goaway: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Active,
    Head,
    KeepAlive,
}

/// How many whole sweep periods make `timeout` (at least one).
fn periods(timeout: Duration, period: Duration) -> u32 {
    let n = timeout.as_nanos().div_ceil(period.as_nanos().max(1));
    n.clamp(1, u32::MAX as u128) as u32
}

impl Connections {
    fn new(config: &Config) -> Connections {
        // A zero body_read_timeout is no limit: it does not shorten the period.
        let body_read_timeout = match config.body_read_timeout.is_zero() {
            true => Duration::MAX,
            false => config.body_read_timeout,
        };
        let shortest = config
            .header_read_timeout
            .min(config.keepalive_timeout)
            .min(body_read_timeout);
        let period = (shortest / 2).max(Duration::from_millis(1));
        Connections {
            period,
            head: periods(config.header_read_timeout, period),
            keepalive: periods(config.keepalive_timeout, period),
            body: periods(body_read_timeout, period),
            list: Vec::new(),
            compact_at: 64,
            bodies: Arc::new(BodyList::new(config.body_read_timeout)),
        }
    }

    fn sweep_interval(&self) -> tokio::time::Interval {
        let period = self.period;
        let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval
    }

    fn add(&mut self) -> Arc<Shared> {
        if self.list.len() >= self.compact_at {
            self.list.retain(|c| Arc::strong_count(&c.shared) > 1);
            self.compact_at = (self.list.len() * 2).max(64);
        }
        let shared = Arc::new(Shared::default());
        self.list.push(Judged {
            shared: shared.clone(),
            phase: Phase::Head,
            progress: 0,
            idle: None,
            goaway: None,
        });
        shared
    }

    /// Forgets ended connections and closes those past their phase's deadline; judges the
    /// request bodies.
    fn sweep(&mut self) {
        let (head, keepalive) = (self.head, self.keepalive);
        self.list.retain_mut(|c| {
            let shared = &c.shared;
            if Arc::strong_count(shared) == 1 {
                return false; // the connection's task has ended
            }
            if let Some(sweeps) = &mut c.goaway {
                // GOAWAY sent: hyper closes once the client has acknowledged it; a client that
                // does not is closed outright.
                *sweeps += 1;
                if *sweeps > head {
                    shared.order(CLOSE);
                    return false;
                }
                return true;
            }
            let (phase, progress) = shared.phase();
            c.idle = match c.idle {
                Some(n) if phase == c.phase && progress == c.progress => Some(n + 1),
                _ => Some(0),
            };
            c.phase = phase;
            c.progress = progress;
            let limit = match phase {
                Phase::Active if shared.busy.load(Ordering::Relaxed) > 0 => return true,
                Phase::Active | Phase::Head => head,
                Phase::KeepAlive => keepalive,
            };
            if c.idle < Some(limit) {
                return true;
            }
            if phase == Phase::KeepAlive && shared.h2.load(Ordering::Relaxed) {
                shared.order(DRAIN);
                c.goaway = Some(0);
                return true;
            }
            shared.order(CLOSE);
            false
        });
        self.bodies.sweep(self.body);
    }

    /// Tells every connection to drain. HTTP/2 connections send `GOAWAY`; HTTP/1 ones need no
    /// order (their next response says `Connection: close`, see `DRAINING`), and an idle one is
    /// kept for the drain grace (see [`close_idle_since`]). Returns each connection with its
    /// progress now (weakly held: the sweep tells ended connections by their strong count).
    fn drain(&mut self) -> Vec<(std::sync::Weak<Shared>, u64)> {
        self.list
            .iter()
            .map(|c| {
                c.shared.order(DRAIN);
                (Arc::downgrade(&c.shared), c.shared.progress())
            })
            .collect()
    }
}

/// The request bodies of one listener's connections that may make the app wait (those not
/// complete when their head arrived), for the sweep to judge against `body_read_timeout`.
struct BodyList {
    timeout: Duration,
    /// The bodies, and the length at which `add` forgets ended ones (as [`Connections::add`]).
    list: std::sync::Mutex<(Vec<Arc<BodyWatch>>, usize)>,
}

impl BodyList {
    fn new(timeout: Duration) -> BodyList {
        BodyList {
            timeout,
            list: std::sync::Mutex::new((Vec::new(), 64)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Vec<Arc<BodyWatch>>, usize)> {
        self.list.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add(&self) -> Arc<BodyWatch> {
        let watch = Arc::new(BodyWatch::new(self.timeout));
        let mut guard = self.lock();
        let (list, compact_at) = &mut *guard;
        if list.len() >= *compact_at {
            list.retain(|w| Arc::strong_count(w) > 1);
            *compact_at = (list.len() * 2).max(64);
        }
        list.push(watch.clone());
        watch
    }

    /// Forgets ended bodies (their request is over) and fails those the app has waited on for
    /// `limit` sweep periods with nothing received.
    fn sweep(&self, limit: u32) {
        self.lock()
            .0
            .retain(|w| Arc::strong_count(w) > 1 && !w.sweep(limit));
    }
}

/// At the end of the drain grace: closes the connections that made no progress since the drain
/// began and have nothing in flight (idle kept-alive connections whose client sent nothing).
/// Those that sent a request were answered with `Connection: close` and closed by themselves.
fn close_idle_since(drained: &[(std::sync::Weak<Shared>, u64)]) {
    for (shared, progress) in drained {
        let Some(shared) = shared.upgrade() else {
            continue; // ended, and forgotten by the sweep
        };
        if shared.busy.load(Ordering::Relaxed) == 0 && shared.progress() == *progress {
            shared.order(CLOSE);
        }
    }
}

/// Adds one to a counter that only one task writes (others only read it).
fn bump(counter: &AtomicU64) {
    counter.store(counter.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
}

/// Orders from the accept loop to a connection.
const DRAIN: u8 = 1;
const CLOSE: u8 = 2;

/// What a connection and its accept loop share: counters the connection updates on its request
/// path (request heads, reads, writes, requests in flight) and orders the accept loop gives it.
#[derive(Default)]
struct Shared {
    heads: AtomicU64,
    writes: AtomicU64,
    /// Reads that returned bytes.
    reads: AtomicU64,
    /// `reads` when the last open request ended: more since means the next head is arriving.
    reads_at_rest: AtomicU64,
    /// Work on the app's side: requests whose response head is not out yet, and response bodies
    /// waiting for the app to produce their next part (a stream that pauses).
    busy: AtomicU64,
    /// Requests (HTTP/2: streams) whose response has not ended.
    open: AtomicU64,
    /// An HTTP/2 connection.
    h2: AtomicBool,
    /// Close this connection with a lingering close even outside a drain (it answered a request
    /// whose body it did not read to the end: unread bytes would make the close a reset).
    linger: AtomicBool,
    orders: AtomicU8,
    /// An HTTP/1 connection: a file body ([`crate::Body::file`]) is sent with `sendfile(2)`.
    zero_copy: AtomicBool,
    /// The file windows hyper has been given placeholders for and has not written out yet, in
    /// the order it writes them (see [`Counted::poll_write_zero_copy`]).
    windows: std::sync::Mutex<std::collections::VecDeque<crate::file_body::Window>>,
    /// The connection task's waker. Kept (woken by reference, never taken) so the task can
    /// skip registering again while its waker stays the same; cleared when the task ends, so an
    /// ended connection waiting for the next sweep does not keep its task's memory.
    waker: std::sync::Mutex<Option<std::task::Waker>>,
}

/// What a connection's task holds besides the connection.
struct Life {
    shared: Arc<Shared>,
    /// The request-head deadline (for the HTTP/2 preface; later ones are the sweep's).
    patience: Duration,
    /// Dropped when the task ends: the accept loop's drain waits for all of these.
    _open: mpsc::Sender<()>,
    /// The connection's place under `max_connections`, held by its socket.
    admitted: Admitted,
}

impl Shared {
    /// Called for every request head.
    fn mark(&self) {
        // Only the connection's own task counts heads and writes (hyper calls the service, and
        // does all I/O, in the connection's task, for HTTP/2 too): a plain store is enough.
        bump(&self.heads);
    }

    fn progress(&self) -> u64 {
        self.heads.load(Ordering::Relaxed) + self.writes.load(Ordering::Relaxed)
    }

    /// The connection's phase for the sweep, and that phase's measure of progress.
    fn phase(&self) -> (Phase, u64) {
        let h2 = self.h2.load(Ordering::Relaxed);
        let heads = self.heads.load(Ordering::Relaxed);
        let open = self.open.load(Ordering::Relaxed) > 0 || self.busy.load(Ordering::Relaxed) > 0;
        if open {
            return (Phase::Active, self.progress());
        }
        if h2 {
            // Only a new stream ends an HTTP/2 connection's idleness: PINGs and SETTINGS are
            // reads and writes too.
            return (Phase::KeepAlive, heads);
        }
        let reading =
            self.reads.load(Ordering::Relaxed) != self.reads_at_rest.load(Ordering::Relaxed);
        match heads == 0 || reading {
            true => (Phase::Head, self.progress()),
            false => (Phase::KeepAlive, self.progress()),
        }
    }

    /// Adds one to, or takes one from, a request counter (`busy`, `open`). On HTTP/1 only the
    /// connection's own task changes them (hyper calls the service, polls its future and drops
    /// the response body in that task), so a load and a store do, as in [`bump`]: no locked
    /// instruction on the request path. On HTTP/2 a stream's response runs in a task of its own
    /// (hyper spawns it), possibly on another thread at the same time: a read-modify-write.
    fn count(&self, counter: &AtomicU64, up: bool) {
        match (self.h2.load(Ordering::Relaxed), up) {
            (false, true) => counter.store(counter.load(Ordering::Relaxed) + 1, Ordering::Relaxed),
            (false, false) => counter.store(
                counter.load(Ordering::Relaxed).wrapping_sub(1),
                Ordering::Relaxed,
            ),
            (true, true) => {
                counter.fetch_add(1, Ordering::Relaxed);
            }
            (true, false) => {
                counter.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    fn order(&self, order: u8) {
        self.orders.fetch_or(order, Ordering::Release);
        if let Some(waker) = &*self.waker() {
            waker.wake_by_ref();
        }
    }

    fn waker(&self) -> std::sync::MutexGuard<'_, Option<std::task::Waker>> {
        self.waker.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The connection builders: HTTP/1.1, and HTTP/2 with prior knowledge when enabled.
///
/// The protocol is told by peeking at the first bytes (the HTTP/2 preface) before hyper sees the
/// socket, once per connection. hyper-util's auto builder does that by wrapping the stream in a
/// rewind buffer that every later read goes through, and its `serve_connection_with_upgrades`
/// ignores `http1_only`; peeking keeps the request path as short as plain hyper's.
struct Builder {
    http1: http1::Builder,
    http2: Option<http2::Builder<TokioExecutor>>,
    /// Every connection starts with a PROXY protocol header.
    proxy_protocol: bool,
}

/// A socket whose first bytes can be looked at without consuming them.
trait Peek: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + Sync + 'static {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send;
    /// Peeks at the first bytes; a strict prefix of the HTTP/2 preface counts as not ready.
    fn try_peek_preface(&self, buf: &mut [u8; PREFACE.len()]) -> io::Result<usize>;
    /// Runs `f` on the socket's descriptor; `WouldBlock` from it clears the read readiness.
    fn try_read_with<T>(
        &self,
        f: impl FnOnce(std::os::fd::RawFd) -> io::Result<T>,
    ) -> io::Result<T>;
    /// Ready once the socket may take more bytes (registering `cx` to be woken otherwise).
    fn poll_write_ready(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>>;
    /// Runs `f` on the socket's descriptor; `WouldBlock` from it clears the write readiness.
    fn try_write_with<T>(
        &self,
        f: impl FnOnce(std::os::fd::BorrowedFd<'_>) -> io::Result<T>,
    ) -> io::Result<T>;
}

/// The bytes an HTTP/2 client with prior knowledge opens with.
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Peeks at the first bytes. A strict prefix of the preface (one split across packets, or a client
/// that sent `P` and stopped) is reported as `WouldBlock`: inside `try_io` that clears the socket's
/// readiness, so the task sleeps until more bytes arrive (the poller is edge-triggered) instead of
/// peeking at the same bytes again and again until the head deadline.
fn peek_preface(fd: std::os::fd::RawFd, buf: &mut [u8; PREFACE.len()]) -> io::Result<usize> {
    use nix::sys::socket::{recv, MsgFlags};
    let n = recv(fd, buf, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT).map_err(io::Error::from)?;
    if n > 0 && n < PREFACE.len() && buf[..n] == PREFACE[..n] {
        return Err(io::ErrorKind::WouldBlock.into());
    }
    Ok(n)
}

/// Either socket type, dispatched per call: connections are served through this one type, so
/// that hyper's connection code is compiled once. Compiled twice (once per socket type), the
/// compiler kept more of hyper's functions out of line in both copies: 163 user-space
/// instructions per `hello` request more (`bench/http/instructions.sh`, 7,008 vs 6,845).
macro_rules! either_stream {
    ($self:expr, $s:ident => $e:expr) => {
        match $self {
            Accepted::Tcp($s) => $e,
            Accepted::Unix($s) => $e,
        }
    };
}

/// Waits with tokio's readiness and peeks with `MSG_PEEK`, on either socket type.
impl Peek for Accepted {
    async fn readable(&self) -> io::Result<()> {
        either_stream!(self, s => s.readable().await)
    }
    fn try_peek_preface(&self, buf: &mut [u8; PREFACE.len()]) -> io::Result<usize> {
        self.try_read_with(|fd| peek_preface(fd, buf))
    }
    fn try_read_with<T>(
        &self,
        f: impl FnOnce(std::os::fd::RawFd) -> io::Result<T>,
    ) -> io::Result<T> {
        use std::os::fd::AsRawFd;
        either_stream!(self, s => s.try_io(tokio::io::Interest::READABLE, || f(s.as_raw_fd())))
    }
    fn poll_write_ready(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        either_stream!(self, s => s.poll_write_ready(cx))
    }
    fn try_write_with<T>(
        &self,
        f: impl FnOnce(std::os::fd::BorrowedFd<'_>) -> io::Result<T>,
    ) -> io::Result<T> {
        use std::os::fd::AsFd;
        either_stream!(self, s => s.try_io(tokio::io::Interest::WRITABLE, || f(s.as_fd())))
    }
}

impl tokio::io::AsyncRead for Accepted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        either_stream!(self.get_mut(), s => Pin::new(s).poll_read(cx, buf))
    }
}

impl tokio::io::AsyncWrite for Accepted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        either_stream!(self.get_mut(), s => Pin::new(s).poll_write(cx, buf))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        either_stream!(self.get_mut(), s => Pin::new(s).poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        either_stream!(self, s => s.is_write_vectored())
    }
    fn poll_flush(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        either_stream!(self.get_mut(), s => Pin::new(s).poll_flush(cx))
    }
    fn poll_shutdown(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        either_stream!(self.get_mut(), s => Pin::new(s).poll_shutdown(cx))
    }
}

/// Whether the client opens with the HTTP/2 preface. `Err` if it closed first.
async fn starts_with_http2_preface<S: Peek>(stream: &S) -> io::Result<bool> {
    let mut buf = [0u8; PREFACE.len()];
    loop {
        stream.readable().await?;
        match stream.try_peek_preface(&mut buf) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => return Ok(n == PREFACE.len() && buf == *PREFACE),
            // Nothing yet, or only part of the preface: readiness is cleared, wait for more bytes
            // (the caller's deadline bounds the wait).
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

/// The longest PROXY header read: v1's is at most 107 bytes, v2's 16 plus its addresses and
/// extensions (TLVs), which proxies keep to a few hundred bytes.
const MAX_PROXY_HEADER: usize = 4096;

/// Reads the PROXY protocol header (v1 or v2) that opens the connection, and nothing more: the
/// bytes after it are the client's, left for HTTP. Returns the client's and the proxy's
/// addresses, `None` for a connection of the proxy's own (v2 `LOCAL`, v1 `UNKNOWN`), or why
/// the header is refused. Parsing is the `ppp` crate's.
async fn read_proxy_header<S: Peek>(
    stream: &S,
) -> Result<Option<(std::net::SocketAddr, std::net::SocketAddr)>, String> {
    use nix::sys::socket::{recv, MsgFlags};
    use ppp::{HeaderResult, PartialResult};
    use std::net::SocketAddr;
    let mut buf = vec![0u8; MAX_PROXY_HEADER];
    loop {
        stream.readable().await.map_err(|e| e.to_string())?;
        let read = stream.try_read_with(|fd| {
            let n = recv(fd, &mut buf, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT)
                .map_err(io::Error::from)?;
            if n == 0 {
                return Ok(Err(
                    "the connection closed before its PROXY header".to_string()
                ));
            }
            let parsed = HeaderResult::parse(&buf[..n]);
            if parsed.is_incomplete() {
                if n == buf.len() {
                    return Ok(Err(format!("no PROXY header in the first {n} bytes")));
                }
                // Part of a header (split across packets): readiness is cleared, wait for more.
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let v4 = |ip: std::net::Ipv4Addr, port| SocketAddr::from((ip, port));
            let v6 = |ip: std::net::Ipv6Addr, port| SocketAddr::from((ip, port));
            let (len, addresses) = match parsed {
                HeaderResult::V1(Ok(h)) => (
                    h.header.len(),
                    match h.addresses {
                        ppp::v1::Addresses::Tcp4(a) => Some((
                            v4(a.source_address, a.source_port),
                            v4(a.destination_address, a.destination_port),
                        )),
                        ppp::v1::Addresses::Tcp6(a) => Some((
                            v6(a.source_address, a.source_port),
                            v6(a.destination_address, a.destination_port),
                        )),
                        ppp::v1::Addresses::Unknown => None,
                    },
                ),
                HeaderResult::V2(Ok(h)) => (
                    h.len(),
                    match (h.command, h.addresses) {
                        (ppp::v2::Command::Local, _) => None,
                        (_, ppp::v2::Addresses::IPv4(a)) => Some((
                            v4(a.source_address, a.source_port),
                            v4(a.destination_address, a.destination_port),
                        )),
                        (_, ppp::v2::Addresses::IPv6(a)) => Some((
                            v6(a.source_address, a.source_port),
                            v6(a.destination_address, a.destination_port),
                        )),
                        // A unix or unspecified source: no address to give; the socket's stay.
                        (_, ppp::v2::Addresses::Unix(_) | ppp::v2::Addresses::Unspecified) => None,
                    },
                ),
                HeaderResult::V1(Err(e)) => return Ok(Err(format!("bad PROXY v1 header: {e}"))),
                HeaderResult::V2(Err(e)) => return Ok(Err(format!("bad PROXY v2 header: {e}"))),
            };
            // Consumes exactly the header: it is all in the socket's buffer (just peeked).
            let taken =
                recv(fd, &mut buf[..len], MsgFlags::MSG_DONTWAIT).map_err(io::Error::from)?;
            Ok(match taken == len {
                true => Ok(addresses),
                false => Err(format!("read {taken} of the PROXY header's {len} bytes")),
            })
        });
        match read {
            Ok(result) => return result,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Logs a refused PROXY header: the first in this worker as a warning (a proxy sending none is
/// a misconfiguration to notice), later ones at debug level, so that a client sending garbage on
/// every connection cannot flood the log. Either way the connection is closed.
fn proxy_header_refused(why: &str) {
    static LOGGED: AtomicBool = AtomicBool::new(false);
    if !LOGGED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            reason = why,
            "closing a connection without a valid PROXY header (proxy_protocol = true; further ones are logged at debug level)"
        );
    } else {
        tracing::debug!(
            reason = why,
            "closing a connection without a valid PROXY header"
        );
    }
}

impl Builder {
    fn new(config: &Config) -> Builder {
        // No timer for HTTP/1: hyper would arm a boxed sleep for every request head. The head
        // deadline is kept per connection instead, by the accept loop's sweep (`Connections`).
        let mut http1 = http1::Builder::new();
        http1.max_buf_size(config.max_header_bytes).keep_alive(true);
        let http2 = config.http2.then(|| {
            let settings = &config.http2_settings;
            let mut b = http2::Builder::new(TokioExecutor::new());
            b.timer(TokioTimer::new())
                .max_concurrent_streams(settings.max_concurrent_streams)
                .keep_alive_interval(settings.keepalive_interval)
                .keep_alive_timeout(settings.keepalive_timeout)
                .initial_stream_window_size(settings.initial_stream_window)
                .initial_connection_window_size(settings.initial_connection_window)
                .max_frame_size(settings.max_frame_size);
            b
        });
        Builder {
            http1,
            http2,
            proxy_protocol: config.proxy_protocol,
        }
    }

    /// Serves one connection in a task of its own, with the service `make_service` makes for
    /// its peer (`peer`, or the client a PROXY header names; `None` for an app that reads none).
    fn spawn<I, S>(
        &'static self,
        io: I,
        peer: Option<Peer>,
        make_service: impl FnOnce(Option<Peer>) -> S + Send + 'static,
        life: Life,
    ) where
        I: Peek,
        S: hyper::service::Service<
                http::Request<hyper::body::Incoming>,
                Response = http::Response<Sending>,
                Error = std::convert::Infallible,
            > + Send
            + 'static,
        S::Future: Send + 'static,
    {
        tokio::spawn(async move {
            // Hold all of `life` (its drain-tracking sender too) for as long as the task runs.
            let life = life;
            let peer = match self.proxy_protocol {
                false => peer,
                true => {
                    match tokio::time::timeout(life.patience, read_proxy_header(&io)).await {
                        // (Only for an app that reads addresses: `peer` is `None` otherwise.)
                        Ok(Ok(Some((client, proxy)))) => peer.map(|_| Peer::tcp(client, proxy)),
                        // LOCAL (v2) or UNKNOWN (v1): the proxy's own connection (a health
                        // check); its addresses are the socket's.
                        Ok(Ok(None)) => peer,
                        Ok(Err(why)) => {
                            proxy_header_refused(&why);
                            return;
                        }
                        // Silent past the head deadline: dropped as any slow head is.
                        Err(_) => return,
                    }
                }
            };
            let service = make_service(peer);
            let sniffed = match &self.http2 {
                None => false,
                Some(_) => {
                    match tokio::time::timeout(life.patience, starts_with_http2_preface(&io)).await
                    {
                        Ok(Ok(h2)) => h2,
                        // Closed, failed, or silent past the head deadline (slowloris): drop it.
                        _ => return,
                    }
                }
            };
            let io = Counted {
                inner: io,
                shared: life.shared.clone(),
                _open: life._open.clone(),
                _admitted: life.admitted,
                closing: None,
            };
            if let (true, Some(http2)) = (sniffed, &self.http2) {
                life.shared.h2.store(true, Ordering::Relaxed);
                // GOAWAY: hyper sends one naming no stream and a ping, then the last stream it
                // took once the ping returns; clients resend only what it never saw.
                let conn = http2.serve_connection(TokioIo::new(io), service);
                return drive(conn, &life.shared, Some(|c| c.graceful_shutdown())).await;
            }
            life.shared.zero_copy.store(true, Ordering::Relaxed);
            // No graceful shutdown for HTTP/1: it would close an idle kept-alive connection at
            // once, under a request the client may already be sending. The next response says
            // `Connection: close` instead (see `DRAINING`), and an idle connection is kept until
            // its next request or the sweep's idle deadline, as any idle connection is.
            let conn = self
                .http1
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades();
            drive(conn, &life.shared, None).await
        });
    }
}

/// Serves `conn` to its end, or until its accept loop orders it closed. When ordered to drain,
/// `drain` (if any) asks it to finish gracefully.
async fn drive<C: Future>(conn: C, shared: &Shared, drain: Option<fn(Pin<&mut C>)>) {
    /// Clears the registered waker when the connection ends, however it ends.
    struct Unregister<'a>(&'a Shared);
    impl Drop for Unregister<'_> {
        fn drop(&mut self) {
            self.0.waker().take();
        }
    }
    let _unregister = Unregister(shared);
    let mut conn = std::pin::pin!(conn);
    let mut draining = false;
    // The waker last stored in `shared.waker`: storing again only when it changes keeps the
    // request path free of the lock.
    let mut registered: Option<std::task::Waker> = None;
    std::future::poll_fn(|cx| loop {
        if conn.as_mut().poll(cx).is_ready() {
            return std::task::Poll::Ready(());
        }
        if !registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            *shared.waker() = Some(cx.waker().clone());
            registered = Some(cx.waker().clone());
        }
        // Read after registering: an order given since finds the waker just stored (the lock
        // orders the two), and one given before is seen here.
        let orders = shared.orders.load(Ordering::Acquire);
        if orders & CLOSE != 0 {
            return std::task::Poll::Ready(()); // dropping the connection closes the socket
        }
        if let (true, false, Some(drain)) = (orders & DRAIN != 0, draining, drain) {
            draining = true;
            drain(conn.as_mut());
            continue; // poll the connection again: the drain may let it finish now
        }
        return std::task::Poll::Pending;
    })
    .await
}

/// A request on its connection, from its head until its response has ended (hyper drops the
/// response body) or the request is dropped: the connection is not idle meanwhile.
struct Open(Arc<Shared>);

impl Open {
    fn new(shared: &Arc<Shared>) -> Open {
        shared.count(&shared.open, true);
        Open(shared.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        let shared = &self.0;
        // What the connection reads from now on belongs to the next request (HTTP/1.1).
        shared
            .reads_at_rest
            .store(shared.reads.load(Ordering::Relaxed), Ordering::Relaxed);
        shared.count(&shared.open, false);
    }
}

/// Counts a request as busy (waiting on the app) until its response head is out, or until
/// dropped (however the request ends).
struct Busy(Option<Open>);

impl Busy {
    fn new(shared: &Arc<Shared>) -> Busy {
        shared.count(&shared.busy, true);
        Busy(Some(Open::new(shared)))
    }

    /// The response head is out: no longer busy, still open until the response body ends.
    fn into_open(mut self) -> Open {
        let open = self.0.take().expect("held until into_open");
        open.0.count(&open.0.busy, false);
        open
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if let Some(open) = &self.0 {
            open.0.count(&open.0.busy, false);
        }
    }
}

/// A connection's socket, counting successful writes for the coarse deadline watch, and closing
/// with a lingering close.
struct Counted<I> {
    inner: I,
    shared: Arc<Shared>,
    /// An upgraded connection (a WebSocket) outlives its connection task: hyper hands this socket
    /// to the app. Holding the drain tracker's sender here keeps it counted as open until the app
    /// drops it, so a drain waits for it (the app hears of the drain through `Worker::shutdown`)
    /// instead of cutting it when the runtime goes.
    _open: mpsc::Sender<()>,
    /// Its place under `max_connections`: an upgraded connection keeps it until the app drops it.
    _admitted: Admitted,
    /// Set once the write side is shut: the lingering close's deadline, armed only if the client
    /// has not closed its side by then.
    closing: Option<Option<Pin<Box<tokio::time::Sleep>>>>,
}

/// The longest a lingering close waits for the client to close its side.
const LINGER: Duration = Duration::from_secs(2);

impl<I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Counted<I> {
    /// While the worker drains, a lingering close (hyper calls shutdown when it closes a
    /// connection: after a response that said `Connection: close`, or when the client closed):
    /// the write side is shut (the client reads the response, then EOF), then whatever the client
    /// still sends is read and discarded until it closes, or for at most [`LINGER`]. Closing a
    /// socket with unread bytes (a request body the app never read, a request sent as the
    /// response was on its way) makes the kernel send a reset, which can destroy the response
    /// before the client reads it. Outside a drain (the client asked to close, or sent
    /// something hyper refuses), the close stays as short as before: no timer, no extra wake-up.
    fn poll_linger(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        use std::task::Poll;
        if self.closing.is_none()
            && !DRAINING.load(Ordering::Relaxed)
            && !self.shared.linger.load(Ordering::Relaxed)
        {
            return Pin::new(&mut self.inner).poll_shutdown(cx);
        }
        if self.closing.is_none() {
            std::task::ready!(Pin::new(&mut self.inner).poll_shutdown(cx))?;
            self.closing = Some(None);
        }
        let mut scratch = [0u8; 4096];
        // Bounded per poll, so a client that floods cannot hold the task; the deadline ends it.
        let mut flooding = true;
        for _ in 0..16 {
            let mut buf = tokio::io::ReadBuf::new(&mut scratch);
            match Pin::new(&mut self.inner).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => continue,
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Pending => {
                    flooding = false;
                    break;
                }
            }
        }
        let deadline = self
            .closing
            .get_or_insert(None)
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(LINGER)));
        if deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Ok(()));
        }
        if flooding {
            // Not waiting on the socket (it still had data): come back after other tasks.
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }
}

impl<I: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counted<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            bump(&self.shared.reads);
        }
        r
    }
}

impl<I: Peek> Counted<I> {
    /// Writes `bufs`, some of which are placeholders of file windows
    /// ([`crate::file_body::placeholder_offset`]): the other buffers are sent as they are, each
    /// placeholder is replaced by its window of the file, sent with `sendfile(2)`. A response
    /// head followed by a window is sent with `MSG_MORE`, so it leaves with the file's first
    /// bytes. Returns the bytes written, as a write would (hyper advances past them: the rest of
    /// a window comes back as the rest of its placeholder).
    ///
    /// A placeholder that matches no window would be a bug; it fails the connection rather than
    /// send the placeholder's zeros as if they were the file.
    fn poll_write_zero_copy(
        &mut self,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        use crate::file_body::placeholder_offset;
        use std::os::fd::AsFd as _;
        use std::task::Poll;
        let send = |fd: std::os::fd::BorrowedFd<'_>| -> io::Result<usize> {
            let mut written = 0;
            let mut rest = bufs;
            // What was written so far, or the error if nothing was.
            let partial = |written: usize, e: io::Error| match written {
                0 => Err(e),
                n => Ok(n),
            };
            while !rest.is_empty() {
                let plain = rest
                    .iter()
                    .position(|b| placeholder_offset(b).is_some())
                    .unwrap_or(rest.len());
                if plain > 0 {
                    let want: usize = rest[..plain].iter().map(|b| b.len()).sum();
                    let more = plain < rest.len();
                    match crate::sys::io::send_vectored(fd, &rest[..plain], more) {
                        Ok(n) => {
                            written += n;
                            if n < want {
                                return Ok(written);
                            }
                        }
                        Err(e) => return partial(written, e),
                    }
                    rest = &rest[plain..];
                    continue;
                }
                let buf = &rest[0];
                let at = placeholder_offset(buf).expect("found above");
                let mut windows = self
                    .shared
                    .windows
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                let Some(window) = windows.front().filter(|w| at + buf.len() == w.len) else {
                    return Err(io::Error::other(
                        "a file window's placeholder does not match the window being sent",
                    ));
                };
                let sent = crate::sys::io::sendfile_at(
                    fd,
                    window.file.as_fd(),
                    window.offset + at as u64,
                    buf.len(),
                );
                match sent {
                    Ok(0) => return partial(written, crate::file_body::shrank()),
                    Ok(n) => {
                        written += n;
                        if at + n == window.len {
                            windows.pop_front();
                        }
                        if n < buf.len() {
                            return Ok(written);
                        }
                    }
                    Err(e) => return partial(written, e),
                }
                rest = &rest[1..];
            }
            Ok(written)
        };
        loop {
            std::task::ready!(self.inner.poll_write_ready(cx))?;
            match self.inner.try_write_with(send) {
                Ok(n) => {
                    bump(&self.shared.writes);
                    return Poll::Ready(Ok(n));
                }
                // Readiness cleared: the next poll registers for the socket's room.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// Whether hyper is writing a file window's placeholder (see [`Counted::poll_write_zero_copy`]).
fn has_placeholder(bufs: &[io::IoSlice<'_>]) -> bool {
    bufs.iter()
        .any(|b| crate::file_body::placeholder_offset(b).is_some())
}

impl<I: Peek> tokio::io::AsyncWrite for Counted<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        if crate::file_body::placeholder_offset(buf).is_some() {
            return self.poll_write_zero_copy(cx, &[io::IoSlice::new(buf)]);
        }
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            if *n > 0 {
                bump(&self.shared.writes);
            }
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        if has_placeholder(bufs) {
            return self.poll_write_zero_copy(cx, bufs);
        }
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            if *n > 0 {
                bump(&self.shared.writes);
            }
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        self.poll_linger(cx)
    }
}

/// The size of a request head as sent, near enough: request line and header lines.
fn head_size(req: &Request) -> usize {
    let line = req.method().as_str().len()
        + req.uri().path_and_query().map_or(1, |p| p.as_str().len())
        + 12;
    req.headers()
        .iter()
        .fold(line, |n, (k, v)| n + k.as_str().len() + v.len() + 4)
}

/// Wraps the app's service: the connection's addresses (`extensions`, made once per connection
/// and cloned into each request; `None` for an app that reads none), scoreboard accounting, the
/// request timeout, the debug header.
fn request_service(
    service: HttpService,
    config: Arc<Config>,
    slot: SlotWriter<'static>,
    shared: &Arc<Shared>,
    bodies: &Arc<BodyList>,
    extensions: Option<http::Extensions>,
    warm_up: bool,
) -> impl hyper::service::Service<
    http::Request<hyper::body::Incoming>,
    Response = http::Response<Sending>,
    Error = std::convert::Infallible,
    Future = impl std::future::Future<
        Output = Result<http::Response<Sending>, std::convert::Infallible>,
    > + Send,
> + Clone {
    // Per-connection copies of what every request needs: no reference count touched per request.
    let (max_head, request_timeout, debug_headers, watch_bodies) = (
        config.max_header_bytes,
        config.request_timeout,
        config.debug_headers,
        !config.body_read_timeout.is_zero(),
    );
    // The connection's own handle on the service, called in place (`call_in_place`): no clone
    // of the boxed service per request.
    let own = std::cell::RefCell::new(service);
    let shared = shared.clone();
    let bodies = bodies.clone();
    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        if LOG_FIRST_REQUEST.load(Ordering::Relaxed)
            && LOG_FIRST_REQUEST.swap(false, Ordering::Relaxed)
        {
            if let (Some(at), Ok(mut first)) = (crate::log::respawn_stamp(), FIRST_PARSED.lock()) {
                *first = Some(at);
            }
        }
        shared.mark();
        // Only a body still to come can make the app wait on the client (most requests have
        // none): only those are watched for `body_read_timeout`.
        let watch =
            (watch_bodies && !http_body::Body::is_end_stream(req.body())).then(|| bodies.add());
        let mut req: Request = req.map(|body| RequestBody::new(body, watch.clone()));
        if let Some(extensions) = &extensions {
            req.extensions_mut().extend(extensions.clone());
        }
        let busy = Busy::new(&shared);
        // hyper bounds its read buffer by max_header_bytes, but a head that arrives in one large
        // read can pass whole; the limit is a promise, so check it exactly.
        let oversized = head_size(&req) > max_head;
        let http1 = req.version() <= http::Version::HTTP_11;
        // Ends (counted, and no longer the oldest in flight) when dropped, however the request
        // ends: the scoreboard's hang detection sees the oldest request's age.
        // A warm-up request (see `warm_up`) is neither counted nor shown to the app.
        let guard = (!warm_up).then(|| slot.track_request(req.method().as_str(), req.uri().path()));
        // The common request (no request timeout, no body to watch, a head within the limit) is
        // answered by the app's future awaited directly, so the future hyper keeps and moves is
        // small; whatever only the rare cases need is in their own boxed future.
        let answer = match (
            oversized || warm_up,
            request_timeout.is_zero() && watch.is_none(),
        ) {
            (true, _) => Answer::Refused { warm_up },
            (false, true) => Answer::App(own.borrow_mut().call_in_place(req)),
            (false, false) => {
                // The app is called now (its synchronous part runs here), as in the common case.
                let call = own.borrow_mut().call_in_place(req);
                let linger = http1.then(|| shared.clone());
                Answer::App(Box::pin(guarded(call, request_timeout, watch, linger)))
            }
        };
        Respond {
            answer,
            guard,
            busy: Some(busy),
            http1,
            debug_headers,
        }
    })
}

/// A request's answer on its way to hyper: the app's (or tine's own) response, and what the
/// connection adds to it. A future of its own rather than an `async` block: its fields are all
/// `Unpin`, so it is polled where hyper keeps it, holds each value once, and the response is
/// moved only into what hyper receives.
struct Respond {
    answer: Answer,
    /// The request's scoreboard entry, ended once the app has answered (`None` for a warm-up).
    guard: Option<InFlightRequest<'static>>,
    /// Taken when the response is handed over (the future is done then).
    busy: Option<Busy>,
    http1: bool,
    debug_headers: bool,
}

impl Future for Respond {
    type Output = Result<http::Response<Sending>, std::convert::Infallible>;

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        use std::task::{ready, Poll};
        let this = &mut *self;
        let response = match &mut this.answer {
            Answer::App(call) => ready!(call.as_mut().poll(cx))?,
            // Answered by tine itself: no app, nothing more to add.
            Answer::Refused { warm_up } => {
                let r = refused(*warm_up);
                this.guard = None;
                let busy = this.busy.take().expect("a future is not polled once done");
                return Poll::Ready(Ok(r.map(|body| Sending::new(body, busy.into_open()))));
            }
        };
        this.guard = None;
        // Taken apart at once: the head is changed in place and the response is put together
        // again only where hyper receives it (one move of the whole response fewer).
        let (mut head, body) = response.into_parts();
        // Not on a `101 Switching Protocols`: its `Connection: upgrade` must stay.
        if this.http1
            && DRAINING.load(Ordering::Relaxed)
            && head.status != http::StatusCode::SWITCHING_PROTOCOLS
        {
            head.headers.insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("close"),
            );
        }
        if this.debug_headers {
            head.headers
                .insert("x-tine-worker", http::HeaderValue::from(std::process::id()));
        }
        // The request is no longer busy once its head is out; a body that waits on the app
        // makes the connection busy by itself, and the request stays open until its body has
        // ended.
        let busy = this.busy.take().expect("a future is not polled once done");
        let body = Sending::new(body, busy.into_open());
        Poll::Ready(Ok(http::Response::from_parts(head, body)))
    }
}

/// How a request is answered.
enum Answer {
    /// By the app: its future as called in place, or under a request timeout or a body watch
    /// that future in one of [`guarded`] (only those requests pay for the timer and the race).
    App(AppFuture),
    /// By tine, without calling the app: a warm-up request, or a head over the limit (the
    /// response is made only then: kept here, it would grow every request's future).
    Refused { warm_up: bool },
}

/// tine's own answer to a request the app never sees: a warm-up request (see `warm_up`), or a
/// head over `max_header_bytes`.
fn refused(warm_up: bool) -> http::Response<crate::app::Body> {
    if warm_up {
        let mut r = http::Response::new(full(""));
        *r.status_mut() = http::StatusCode::NO_CONTENT;
        return r;
    }
    let mut r = http::Response::new(full("request header fields too large\n"));
    *r.status_mut() = http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE;
    r.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    r
}

/// The app's answer under `request_timeout` (if not zero) and, for a request whose body is
/// still to come, `body_read_timeout` (`watch`). `linger`: the connection's shared state on
/// HTTP/1, where a body that timed out closes the connection.
async fn guarded(
    call: AppFuture,
    request_timeout: Duration,
    watch: Option<Arc<BodyWatch>>,
    linger: Option<Arc<Shared>>,
) -> Result<http::Response<crate::app::Body>, std::convert::Infallible> {
    let app = async move {
        if request_timeout.is_zero() {
            return call.await;
        }
        Ok(match tokio::time::timeout(request_timeout, call).await {
            Ok(r) => r?,
            Err(_) => {
                // The handler's future was dropped with the timeout.
                let mut r = http::Response::new(full("request timed out\n"));
                *r.status_mut() = http::StatusCode::GATEWAY_TIMEOUT;
                r
            }
        })
    };
    let answered = match watch {
        None => Some(app.await),
        // The stall first: the app, woken by its failed body read, may have answered in the same
        // poll; the client is owed the 408.
        Some(watch) => tokio::select! {
            biased;
            () = watch.stalled() => None,
            r = app => Some(r),
        },
    };
    Ok(match answered {
        Some(r) => r?,
        None => {
            // The client stopped sending the body: the handler's future is dropped, and whatever
            // it would have answered, the client learns why (as nginx's client_body_timeout).
            // The rest of the body is never read, so the connection cannot serve another
            // request: it closes, lingering, so that the bytes still arriving do not turn the
            // close into a reset that destroys this answer.
            tracing::debug!("request body timed out (body_read_timeout)");
            let mut r = http::Response::new(full("request body timed out\n"));
            *r.status_mut() = http::StatusCode::REQUEST_TIMEOUT;
            if let Some(shared) = linger {
                shared.linger.store(true, Ordering::Relaxed);
                r.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
            }
            r
        }
    })
}

/// A response body as hyper writes it. While the app has not produced the next part of a body
/// (a stream that pauses between events), the connection counts as busy, so the sweep does not
/// close it; a client that stops reading is still cut off (no writes, nothing waited on).
struct Sending {
    body: crate::app::Body,
    /// The request, open until this body is dropped.
    open: Open,
    /// Whether the body may wait on the app (not for a complete buffer: the common response
    /// costs nothing more).
    may_wait: bool,
    waiting: bool,
    /// A file body on an HTTP/1 connection: sent in windows by `sendfile(2)`.
    zero_copy: bool,
}

impl Sending {
    fn new(mut body: crate::app::Body, open: Open) -> Sending {
        Sending {
            may_wait: !body.is_complete(),
            zero_copy: body.file_mut().is_some() && open.0.zero_copy.load(Ordering::Relaxed),
            body,
            open,
            waiting: false,
        }
    }

    /// The next window of a file body, queued for the connection's socket to send, as the
    /// placeholder hyper writes in its place.
    fn poll_window(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, crate::app::BoxError>>> {
        let file = self
            .body
            .file_mut()
            .expect("zero_copy is set for file bodies");
        let next = std::task::ready!(file.poll_next_window(cx));
        std::task::Poll::Ready(next.map(|next| match next {
            Ok((window, placeholder)) => {
                let shared = &self.open.0;
                let mut windows = shared.windows.lock().unwrap_or_else(|e| e.into_inner());
                windows.push_back(window);
                Ok(http_body::Frame::data(placeholder))
            }
            Err(e) => Err(e.into()),
        }))
    }

    fn set_waiting(&mut self, waiting: bool) {
        if waiting == self.waiting || !self.may_wait {
            return;
        }
        self.waiting = waiting;
        let shared = &self.open.0;
        shared.count(&shared.busy, waiting);
    }
}

impl Drop for Sending {
    fn drop(&mut self) {
        self.set_waiting(false);
    }
}

impl http_body::Body for Sending {
    type Data = bytes::Bytes;
    type Error = crate::app::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        let polled = match self.zero_copy {
            true => self.poll_window(cx),
            false => Pin::new(&mut self.body).poll_frame(cx),
        };
        self.set_waiting(polled.is_pending());
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
