//! Jobs, the registry of job types, and descriptors inside serialized values.

use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, IntoRawFd, OwnedFd, RawFd};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::wire::Failure;

/// A unit of work that runs in a worker process.
///
/// The job value is serialized in the caller (postcard), sent to a worker, decoded there, and
/// [`run`](Job::run); the output travels back the same way. Register every job type on the
/// [`SpawnerBuilder`](super::SpawnerBuilder) before the spawner starts: the worker finds the code
/// by [`NAME`](Job::NAME), so no code address travels on the wire.
///
/// File descriptors can ride along in the job or its output as [`Fd`] fields.
pub trait Job: Serialize + DeserializeOwned + Send + 'static {
    /// A stable name, unique among the registered job types (e.g. `"myapp.resize"`).
    const NAME: &'static str;
    /// What the job returns. Use a `Result` for failures the job itself reports.
    type Output: Serialize + DeserializeOwned + Send + 'static;
    /// Runs the job in the worker process.
    fn run(self) -> Self::Output;
}

/// What a worker does with one encoded job: decode, run, encode.
pub(crate) type Handler = fn(&[u8], Vec<OwnedFd>) -> Result<Encoded, Failure>;

/// A serialized value, the descriptors it refers to, and the value itself, kept alive (it owns
/// those descriptors) until the message is sent.
pub(crate) struct Encoded {
    pub bytes: Vec<u8>,
    pub fds: Vec<RawFd>,
    pub _keep: Box<dyn Any>,
}

fn handle<J: Job>(payload: &[u8], fds: Vec<OwnedFd>) -> Result<Encoded, Failure> {
    let job: J = decode(payload, fds).map_err(Failure::Decode)?;
    let output = job.run();
    let (bytes, fds) = encode(&output).map_err(Failure::Encode)?;
    Ok(Encoded {
        bytes,
        fds,
        _keep: Box::new(output),
    })
}

/// The job types a spawner knows, by name.
#[derive(Default, Clone)]
pub(crate) struct Registry {
    handlers: HashMap<&'static str, Handler>,
    duplicate: Option<&'static str>,
}

impl Registry {
    pub(crate) fn register<J: Job>(&mut self) {
        if self.handlers.insert(J::NAME, handle::<J>).is_some() && self.duplicate.is_none() {
            self.duplicate = Some(J::NAME);
        }
    }

    pub(crate) fn get(&self, name: &str) -> Option<Handler> {
        self.handlers.get(name).copied()
    }

    pub(crate) fn duplicate(&self) -> Option<&'static str> {
        self.duplicate
    }
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.handlers.keys()).finish()
    }
}

thread_local! {
    /// While a value is being encoded: the descriptors its [`Fd`] fields refer to.
    static OUTGOING: RefCell<Option<Vec<RawFd>>> = const { RefCell::new(None) };
    /// While a value is being decoded: the descriptors that came with it.
    static INCOMING: RefCell<Option<Vec<Option<OwnedFd>>>> = const { RefCell::new(None) };
}

/// Encodes `value`, collecting the descriptors of its [`Fd`] fields.
pub(crate) fn encode<T: Serialize>(value: &T) -> Result<(Vec<u8>, Vec<RawFd>), String> {
    OUTGOING.with(|o| *o.borrow_mut() = Some(Vec::new()));
    let result = postcard::to_stdvec(value);
    let fds = OUTGOING.with(|o| o.borrow_mut().take()).unwrap_or_default();
    let bytes = result.map_err(|e| e.to_string())?;
    if fds.len() > super::wire::MAX_FDS {
        return Err(format!(
            "value holds {} descriptors, more than {}",
            fds.len(),
            super::wire::MAX_FDS
        ));
    }
    Ok((bytes, fds))
}

/// Decodes a `T`, handing the received descriptors to its [`Fd`] fields. Descriptors that no field
/// takes are closed.
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8], fds: Vec<OwnedFd>) -> Result<T, String> {
    INCOMING.with(|i| *i.borrow_mut() = Some(fds.into_iter().map(Some).collect()));
    let result = postcard::from_bytes(bytes);
    INCOMING.with(|i| i.borrow_mut().take());
    result.map_err(|e| e.to_string())
}

/// A file descriptor that travels inside a job or its output (SCM_RIGHTS), such as an accepted
/// socket that the worker answers on.
///
/// Sending duplicates the descriptor into the receiver; the sender's copy closes when the job
/// value is dropped after sending. An `Fd` can only be (de)serialized by the spawner's own
/// encoding: any other serializer gets an error.
#[derive(Debug)]
pub struct Fd(OwnedFd);

impl Fd {
    /// Wraps anything that owns a descriptor (`TcpStream`, `File`, `OwnedFd`, ...).
    pub fn new(fd: impl Into<OwnedFd>) -> Self {
        Fd(fd.into())
    }

    /// Gives the descriptor back, e.g. for `TcpStream::from`.
    pub fn into_owned(self) -> OwnedFd {
        self.0
    }
}

impl From<OwnedFd> for Fd {
    fn from(fd: OwnedFd) -> Self {
        Fd(fd)
    }
}

impl AsFd for Fd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl IntoRawFd for Fd {
    fn into_raw_fd(self) -> RawFd {
        self.0.into_raw_fd()
    }
}

impl Serialize for Fd {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let index = OUTGOING.with(|o| {
            o.borrow_mut().as_mut().map(|fds| {
                fds.push(self.0.as_raw_fd());
                fds.len() - 1
            })
        });
        match index {
            Some(i) => s.serialize_u32(i as u32),
            None => Err(serde::ser::Error::custom(
                "tine::spawner::Fd can only be serialized by the spawner",
            )),
        }
    }
}

impl<'de> Deserialize<'de> for Fd {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let index = u32::deserialize(d)? as usize;
        let fd = INCOMING.with(|i| {
            i.borrow_mut()
                .as_mut()
                .and_then(|fds| fds.get_mut(index).and_then(Option::take))
        });
        fd.map(Fd).ok_or_else(|| {
            serde::de::Error::custom(format!("descriptor #{index} did not come with the message"))
        })
    }
}
