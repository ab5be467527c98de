//! A `SOCK_SEQPACKET` channel between the monitor and one child: one message per packet, with
//! file descriptors passed by `SCM_RIGHTS`.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};

use super::message::{decode, encode, DecodeError};

/// Largest packet accepted; bigger ones are truncated and rejected.
pub const MAX_PACKET: usize = 4096;
/// Most descriptors accepted with one packet.
pub(crate) const MAX_FDS: usize = 8;

/// Errors of a channel.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The socket failed.
    #[error("channel I/O: {0}")]
    Io(#[from] io::Error),
    /// The packet was longer than [`MAX_PACKET`] or carried too many descriptors.
    #[error("truncated packet")]
    Truncated,
    /// The packet did not decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

impl From<nix::Error> for ChannelError {
    fn from(e: nix::Error) -> Self {
        ChannelError::Io(e.into())
    }
}

/// One end of a channel.
#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
}

/// A received packet: the message and any descriptors that came with it.
pub struct Received<T> {
    /// The message.
    pub msg: T,
    /// Descriptors, owned by the receiver now.
    pub fds: Vec<OwnedFd>,
}

impl Channel {
    /// A connected pair (close-on-exec; the two ends go to two processes).
    pub fn pair() -> io::Result<(Channel, Channel)> {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        Ok((Channel { fd: a }, Channel { fd: b }))
    }

    /// Wraps a received or inherited descriptor.
    pub fn from_fd(fd: OwnedFd) -> Channel {
        Channel { fd }
    }

    /// The descriptor.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// Sends one message with `fds`, never blocking: a full socket buffer is an error
    /// (`WouldBlock`), so a hung peer cannot stall the sender.
    pub fn send<T: serde::Serialize>(&self, msg: &T, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let packet = encode(msg);
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let cmsgs: Vec<ControlMessage> = if raw.is_empty() {
            Vec::new()
        } else {
            vec![ControlMessage::ScmRights(&raw)]
        };
        let iov = [IoSlice::new(&packet)];
        sendmsg::<()>(
            self.fd.as_raw_fd(),
            &iov,
            &cmsgs,
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            None,
        )?;
        Ok(())
    }

    /// Receives one packet. `Ok(None)` means the peer closed its end. With `block == false`, an
    /// empty socket gives `Err(Io(WouldBlock))`.
    pub fn recv<T: serde::de::DeserializeOwned>(
        &self,
        block: bool,
    ) -> Result<Option<Received<T>>, ChannelError> {
        let mut buf = [0u8; MAX_PACKET];
        let mut cmsg_space = nix::cmsg_space!([RawFd; MAX_FDS]);
        let mut flags = MsgFlags::MSG_CMSG_CLOEXEC;
        if !block {
            flags |= MsgFlags::MSG_DONTWAIT;
        }
        let (len, msg_flags, fds) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = loop {
                match recvmsg::<()>(self.fd.as_raw_fd(), &mut iov, Some(&mut cmsg_space), flags) {
                    Err(nix::Error::EINTR) => continue,
                    other => break other?,
                }
            };
            let mut fds = Vec::new();
            if let Ok(cmsgs) = msg.cmsgs() {
                for cmsg in cmsgs {
                    if let ControlMessageOwned::ScmRights(received) = cmsg {
                        // Each descriptor was just created in this process by the kernel for us.
                        fds.extend(received.into_iter().map(crate::sys::fd::adopt));
                    }
                }
            }
            (msg.bytes, msg.flags, fds)
        };
        if msg_flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC) {
            return Err(ChannelError::Truncated);
        }
        if len == 0 && fds.is_empty() {
            return Ok(None);
        }
        let msg = decode(&buf[..len])?;
        Ok(Some(Received { msg, fds }))
    }
}

impl From<Channel> for OwnedFd {
    fn from(c: Channel) -> OwnedFd {
        c.fd
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Channel {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
