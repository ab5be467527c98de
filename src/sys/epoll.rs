//! Exclusive wake-ups for a listening socket registered with the tokio reactor.
//!
//! Every worker waits for new connections on the same listening socket, each in its own epoll
//! instance (its runtime's reactor). Registered plainly, one new connection wakes every idle worker,
//! and all but one find nothing to accept: the thundering herd. `EPOLLEXCLUSIVE` (Linux 4.5) wakes
//! one idle waiter instead, as nginx does; a worker that is busy is skipped and picks the readiness
//! up at its next look, so load still spreads when workers are busy.
//!
//! Neither mio nor tokio lets a registration carry `EPOLLEXCLUSIVE`, and the flag can only be given
//! when a descriptor is added (`EPOLL_CTL_MOD` refuses it). So the listener is registered with the
//! reactor as usual, and then its registration is replaced by an identical one plus the flag: the
//! reactor's epoll descriptor and the registration's token are read from `/proc/self/fdinfo` (a
//! documented kernel interface, proc(5)), the descriptor is deleted and added back with the same
//! token. The reactor keeps delivering its readiness to the same waiter; it never re-registers a
//! listener, and it deletes the registration by descriptor when the listener is dropped.

use std::io;
use std::os::fd::RawFd;
use std::sync::Mutex;

/// One registration in an epoll instance, as `/proc/self/fdinfo/<epfd>` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Registration {
    events: u32,
    data: u64,
}

/// The events an `EPOLLEXCLUSIVE` registration may carry besides the flag (epoll_ctl(2)).
const EXCLUSIVE_COMPATIBLE: u32 =
    (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLWAKEUP | libc::EPOLLET) as u32;

impl Registration {
    /// The same registration waking one idle waiter per event: the events `EPOLLEXCLUSIVE` allows
    /// (epoll_ctl(2) refuses the others beside it) plus the flag, same token.
    fn exclusive(self) -> Registration {
        Registration {
            events: (self.events & EXCLUSIVE_COMPATIBLE) | libc::EPOLLEXCLUSIVE as u32,
            data: self.data,
        }
    }
}

/// What happened to the listener's registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exclusive {
    /// The registration now wakes one idle waiter per event.
    Done,
    /// No epoll instance of this process holds `listener` (not registered yet, or not by epoll).
    NotRegistered,
}

/// Replaces `listener`'s registration in this process's epoll instance with the same one plus
/// `EPOLLEXCLUSIVE`.
///
/// Call it once, right after the listener was registered with the reactor, before anything waits
/// on it. On error the original registration has been put back, or, if even that failed, the
/// error says so and the listener must be dropped and registered anew.
pub fn make_exclusive(listener: RawFd) -> io::Result<Exclusive> {
    let inode = nix::sys::stat::fstat(listener)?.st_ino;
    let Some((epfd, found)) = find_registration(listener, inode)? else {
        return Ok(Exclusive::NotRegistered);
    };
    if found.events & libc::EPOLLEXCLUSIVE as u32 != 0 {
        return Ok(Exclusive::Done);
    }
    let wanted = found.exclusive();
    ctl(epfd, libc::EPOLL_CTL_DEL, listener, None)?;
    // Adding back checks the descriptor's current readiness, so a connection that arrived
    // between the two calls is still reported (edge-triggered registrations included).
    match ctl(epfd, libc::EPOLL_CTL_ADD, listener, Some(wanted)) {
        Ok(()) => Ok(Exclusive::Done),
        Err(e) => match ctl(epfd, libc::EPOLL_CTL_ADD, listener, Some(found)) {
            Ok(()) => Err(e),
            Err(restore) => Err(io::Error::new(
                restore.kind(),
                format!("EPOLLEXCLUSIVE refused ({e}) and the registration lost: {restore}"),
            )),
        },
    }
}

/// A descriptor's registration in this process's epoll instance, learned ahead of time so that
/// another descriptor can take it over in two system calls (see [`Learned::take_over`]).
///
/// Crate-private, and neither `Clone` nor `Copy`: the token it carries is whatever the reactor
/// put there (tokio: a pointer to its per-registration state), so it may be handed to the kernel
/// again only once and only while that registration's owner is alive (see its `# Contract`).
#[cfg(feature = "server")]
#[derive(Debug)]
pub(crate) struct Learned {
    epfd: RawFd,
    registration: Registration,
}

/// Finds how `fd` is registered in one of this process's epoll instances (reading `fdinfo`, as
/// [`make_exclusive`] does), for a later [`Learned::take_over`].
#[cfg(feature = "server")]
pub(crate) fn learn_registration(fd: RawFd) -> io::Result<Option<Learned>> {
    let inode = nix::sys::stat::fstat(fd)?.st_ino;
    Ok(find_registration(fd, inode)?.map(|(epfd, registration)| Learned { epfd, registration }))
}

#[cfg(feature = "server")]
impl Learned {
    /// Registers `fd` as the learned registration was: same epoll instance, same events, same
    /// token, so that its events reach whoever waited on the learned one. With `exclusive`, plus
    /// `EPOLLEXCLUSIVE` (as [`make_exclusive`] would make it).
    ///
    /// For a descriptor number that was the learned one's, now pointing at another file (`dup3`
    /// over it): closing the learned file removed its registration, and the reactor, which knows
    /// the registration by its token, does not know the file changed. Adding checks the new
    /// file's readiness at once: a connection already queued is reported.
    ///
    /// # Contract
    ///
    /// The owner of the learned registration (the reactor's registration of the descriptor it
    /// was learned from) must still be alive, and must own `fd` from now on: the kernel will
    /// deliver `fd`'s events under the learned token, which the reactor dereferences. Taken by
    /// value so that a token is handed out once.
    pub(crate) fn take_over(self, fd: RawFd, exclusive: bool) -> io::Result<()> {
        let registration = if exclusive {
            self.registration.exclusive()
        } else {
            self.registration
        };
        ctl(self.epfd, libc::EPOLL_CTL_ADD, fd, Some(registration))
    }
}

/// A descriptor registered with the reactor that can leave the reactor's epoll instance for a
/// while and come back as it was (same events, same token), one `epoll_ctl` each way: the reactor
/// is none the wiser, and keeps its registration state (tokio: a `ScheduledIo`) throughout. A
/// worker's listener leaves the reactor like this at `max_connections` and while it leaves new
/// connections to a lighter peer (`accept_balance`): dropping and registering a duplicate again
/// costs a `dup`, registration and removal by the reactor, and a read of `/proc/self/fdinfo` to
/// make it exclusive again, each time. Here the registration is read from fdinfo once, at the
/// first [`Switch::take_out`].
///
/// Taken out, a descriptor's events reach no one; put back, adding it checks its readiness at
/// once, so what became ready meanwhile (a connection queued) is reported.
#[cfg(feature = "server")]
pub(crate) struct Switch<T: std::os::fd::AsFd> {
    /// `None` only inside [`Switch::into_inner`].
    io: Option<T>,
    /// The reactor's epoll instance and the registration, once learned.
    learned: Option<(RawFd, Registration)>,
    out: bool,
}

#[cfg(feature = "server")]
impl<T: std::os::fd::AsFd> Switch<T> {
    /// Takes `io`, registered with this process's reactor and in it (nothing learned yet).
    ///
    /// # Contract
    ///
    /// `io` owns its descriptor and the reactor's registration of it for as long as it lives (a
    /// tokio listener), and nothing else registers or deregisters that descriptor meanwhile:
    /// putting the registration back hands the kernel the reactor's token, which the reactor
    /// dereferences (see [`Learned`]). The switch keeps `io` alive while it may do so.
    pub(crate) fn new(io: T) -> Switch<T> {
        Switch {
            io: Some(io),
            learned: None,
            out: false,
        }
    }

    pub(crate) fn get(&self) -> &T {
        self.io
            .as_ref()
            .expect("a switch holds its descriptor until into_inner")
    }

    fn fd(&self) -> RawFd {
        use std::os::fd::AsRawFd;
        self.get().as_fd().as_raw_fd()
    }

    /// Whether the registration is out of the epoll instance.
    pub(crate) fn is_out(&self) -> bool {
        self.out
    }

    /// Takes the registration out of the reactor's epoll instance (nothing if it is out already).
    /// `Ok(false)`: no epoll instance of this process holds the descriptor (not registered by
    /// epoll): it stays as it is.
    pub(crate) fn take_out(&mut self) -> io::Result<bool> {
        if self.out {
            return Ok(true);
        }
        let fd = self.fd();
        let (epfd, _) = match self.learned {
            Some(learned) => learned,
            None => {
                let inode = nix::sys::stat::fstat(fd)?.st_ino;
                let Some(found) = find_registration(fd, inode)? else {
                    return Ok(false);
                };
                *self.learned.insert(found)
            }
        };
        ctl(epfd, libc::EPOLL_CTL_DEL, fd, None)?;
        self.out = true;
        Ok(true)
    }

    /// Puts the registration back as it was learned (nothing if it is in). On error it is still
    /// out: the reactor will never report this descriptor again, and the caller must register it
    /// anew (a duplicate).
    pub(crate) fn put_back(&mut self) -> io::Result<()> {
        let (true, Some((epfd, registration))) = (self.out, self.learned) else {
            return Ok(());
        };
        // fdinfo shows the flag; epoll_ctl refuses it beside some events, as make_exclusive does.
        let registration = if registration.events & libc::EPOLLEXCLUSIVE as u32 != 0 {
            registration.exclusive()
        } else {
            registration
        };
        ctl(epfd, libc::EPOLL_CTL_ADD, self.fd(), Some(registration))?;
        self.out = false;
        Ok(())
    }

    /// The descriptor, its registration put back first, so that the reactor's deregistration
    /// when it is dropped finds it (tokio keeps its registration state for ever when that fails).
    pub(crate) fn into_inner(mut self) -> T {
        let _ = self.put_back();
        self.io
            .take()
            .expect("a switch holds its descriptor until into_inner")
    }
}

#[cfg(feature = "server")]
impl<T: std::os::fd::AsFd> Drop for Switch<T> {
    fn drop(&mut self) {
        // As into_inner; `io` (the reactor's registration) drops after this.
        if self.io.is_some() {
            let _ = self.put_back();
        }
    }
}

fn ctl(epfd: RawFd, op: libc::c_int, fd: RawFd, reg: Option<Registration>) -> io::Result<()> {
    let mut event = libc::epoll_event {
        events: reg.map_or(0, |r| r.events),
        u64: reg.map_or(0, |r| r.data),
    };
    // SAFETY: epoll_ctl only reads `event` (a valid, initialized struct that outlives the call);
    // `epfd` and `fd` are plain numbers to the kernel, which checks them and fails with EBADF or
    // ENOENT rather than touching memory if they are wrong.
    let rc = unsafe { libc::epoll_ctl(epfd, op, fd, &mut event) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The epoll instances of this process found by the last scan of `/proc/self/fd`: looked at first,
/// so that registering a listener reads one fdinfo rather than every descriptor's link (a hot spare
/// learns them while it stands by, off the path of its activation).
static KNOWN_EPOLL_FDS: Mutex<Vec<RawFd>> = Mutex::new(Vec::new());

/// Finds the epoll instance of this process that holds `target` (whose inode is `inode`), and
/// its registration there.
fn find_registration(target: RawFd, inode: u64) -> io::Result<Option<(RawFd, Registration)>> {
    let known = KNOWN_EPOLL_FDS
        .lock()
        .map(|k| k.clone())
        .unwrap_or_default();
    // A number reused since by another file shows no registration of `target` (with its inode).
    for fd in known {
        if let Some(reg) = registration_in(fd, target, inode) {
            return Ok(Some((fd, reg)));
        }
    }
    for fd in learn_epoll_instances()? {
        if let Some(reg) = registration_in(fd, target, inode) {
            return Ok(Some((fd, reg)));
        }
    }
    Ok(None)
}

/// Scans `/proc/self/fd` for the process's epoll instances (the runtime's reactor among them),
/// remembers them for the next registration and returns them.
pub fn learn_epoll_instances() -> io::Result<Vec<RawFd>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let Ok(entry) = entry else { continue };
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<RawFd>().ok())
        else {
            continue;
        };
        let is_epoll = std::fs::read_link(entry.path())
            .is_ok_and(|l| l.as_os_str() == "anon_inode:[eventpoll]");
        if is_epoll {
            found.push(fd);
        }
    }
    if let Ok(mut known) = KNOWN_EPOLL_FDS.lock() {
        known.clone_from(&found);
    }
    Ok(found)
}

/// `target`'s registration in epoll instance `epfd`, if it is one and holds it.
fn registration_in(epfd: RawFd, target: RawFd, inode: u64) -> Option<Registration> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{epfd}")).ok()?;
    parse_fdinfo(&info, target, inode)
}

/// Reads `target`'s line of an epoll fdinfo:
/// `tfd: <fd> events: <hex> data: <hex> pos: <n> ino: <hex> sdev: <hex>`. The inode must match
/// too: a number alone could name a descriptor closed and reused since it was registered.
fn parse_fdinfo(info: &str, target: RawFd, inode: u64) -> Option<Registration> {
    info.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next()? == "tfd:").then_some(())?;
        (words.next()?.parse::<RawFd>().ok()? == target).then_some(())?;
        (words.next()? == "events:").then_some(())?;
        let events = u32::from_str_radix(words.next()?, 16).ok()?;
        (words.next()? == "data:").then_some(())?;
        let data = u64::from_str_radix(words.next()?, 16).ok()?;
        let ino = words.find_map(|w| w.strip_prefix("ino:"))?;
        (u64::from_str_radix(ino, 16).ok()? == inode).then_some(())?;
        Some(Registration { events, data })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_registration_of_one_descriptor() {
        let info = "pos:\t0\nflags:\t02\nmnt_id:\t17\nino:\t1039\n\
                    tfd:        5 events: 10000019 data:     7f1ad012d010  pos:0 ino:5ba5aa sdev:9\n\
                    tfd:       11 events: 80000019 data:     55f183279340  pos:0 ino:40f sdev:10\n";
        assert_eq!(
            parse_fdinfo(info, 11, 0x40f),
            Some(Registration {
                events: 0x8000_0019,
                data: 0x55f1_8327_9340
            })
        );
        assert_eq!(parse_fdinfo(info, 11, 0x410), None, "another file");
        assert_eq!(parse_fdinfo(info, 1, 0x40f), None);
        assert_eq!(
            parse_fdinfo("tfd: 5 events: zz data: 1 ino:1\n", 5, 1),
            None
        );
    }
}
