//! Hand-made vhost-user messages, for what the `vhost` crate's `Frontend`
//! refuses to send (a queue index past GET_QUEUE_NUM, an unknown request
//! code, a body of the wrong size): written straight to the connection's
//! socket, with their file descriptors, and the reply read back with a
//! time limit. Only between two `Frontend` calls, never during one.

use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use super::handshake::VhostUserBlk;

/// The header's version bits (vhost-user version 1).
const VERSION: u32 = 0x1;
const REPLY: u32 = 0x4;
pub const NEED_REPLY: u32 = 0x8;

/// Request codes (vhost-user spec, "Front-end message types").
pub mod code {
    pub const GET_VRING_BASE: u32 = 11;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const SET_VRING_ENABLE: u32 = 18;
    pub const SET_VRING_NUM: u32 = 8;
    pub const REM_MEM_REG: u32 = 38;
}

/// What the backend did with a hand-made message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawReply {
    /// The reply's body (for REPLY_ACK: the u64 ack, 0 = success).
    Body(Vec<u8>),
    /// No reply was asked for and the connection is still open.
    Sent,
    /// The backend closed the connection.
    Closed,
    /// Nothing came back within the limit and the connection is open.
    Silent,
}

impl RawReply {
    /// The REPLY_ACK value, if this is one.
    pub fn ack(&self) -> Option<u64> {
        match self {
            RawReply::Body(b) if b.len() == 8 => {
                Some(u64::from_le_bytes(b[..8].try_into().unwrap()))
            }
            _ => None,
        }
    }
}

fn send(fd: RawFd, bytes: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    let fds_len = u32::try_from(std::mem::size_of_val(fds)).expect("a few fds");
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(fds_len) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8).max(1)];
    // SAFETY: all-zero is a valid msghdr.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: msg_control points to `space` bytes, enough for one
        // header carrying `fds`.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(fds_len) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr(),
                libc::CMSG_DATA(c).cast::<RawFd>(),
                fds.len(),
            );
        }
    }
    // SAFETY: a valid msghdr over live buffers.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if n as usize != bytes.len() {
        return Err(std::io::Error::other(format!(
            "short send: {n} of {}",
            bytes.len()
        )));
    }
    Ok(())
}

/// Reads exactly `out.len()` bytes unless the peer closes or the deadline
/// passes; returns how many were read.
fn recv_exact(fd: RawFd, out: &mut [u8], deadline: Instant) -> std::io::Result<usize> {
    let mut got = 0;
    while got < out.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(got);
        }
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, left.as_millis().clamp(1, 60_000) as i32) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            continue;
        }
        // SAFETY: reading into the unfilled tail of `out`.
        let n = unsafe {
            libc::recv(
                fd,
                out[got..].as_mut_ptr().cast(),
                out.len() - got,
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR)) {
                continue;
            }
            if e.raw_os_error() == Some(libc::ECONNRESET) {
                return Ok(got);
            }
            return Err(e);
        }
        if n == 0 {
            return Ok(got);
        }
        got += n as usize;
    }
    Ok(got)
}

/// Whether the peer has closed `fd` (without consuming data).
pub fn peer_closed(fd: RawFd, wait: Duration) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut p, 1, wait.as_millis().clamp(0, 60_000) as i32) };
    r > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

impl VhostUserBlk {
    /// Sends request `code` with `body` and `fds` (flags: [`NEED_REPLY`] or
    /// 0). When `reply` is set (the request has a reply of its own, or
    /// NEED_REPLY was asked for with REPLY_ACK negotiated), waits at most
    /// `opts.reply_timeout` for it.
    pub fn raw_message(
        &mut self,
        code: u32,
        flags: u32,
        body: &[u8],
        fds: &[RawFd],
        reply: bool,
    ) -> Result<RawReply, String> {
        let fd = self.socket_fd();
        let mut msg = Vec::with_capacity(12 + body.len());
        msg.extend_from_slice(&code.to_le_bytes());
        msg.extend_from_slice(&(VERSION | flags).to_le_bytes());
        msg.extend_from_slice(
            &u32::try_from(body.len())
                .expect("a small body")
                .to_le_bytes(),
        );
        msg.extend_from_slice(body);
        match send(fd, &msg, fds) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => return Ok(RawReply::Closed),
            Err(e) => return Err(format!("send request {code}: {e}")),
        }
        if !reply {
            return Ok(if peer_closed(fd, Duration::from_millis(200)) {
                RawReply::Closed
            } else {
                RawReply::Sent
            });
        }
        let deadline = Instant::now() + self.opts.reply_timeout;
        let mut hdr = [0u8; 12];
        let n = recv_exact(fd, &mut hdr, deadline).map_err(|e| format!("reply to {code}: {e}"))?;
        if n == 0 {
            return Ok(if peer_closed(fd, Duration::ZERO) {
                RawReply::Closed
            } else {
                RawReply::Silent
            });
        }
        if n < 12 {
            return Err(format!("reply to {code}: {n}-byte header"));
        }
        let rcode = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
        let rflags = u32::from_le_bytes(hdr[4..8].try_into().unwrap());
        let size = u32::from_le_bytes(hdr[8..12].try_into().unwrap()) as usize;
        if rcode != code || rflags & REPLY == 0 || size > 4096 {
            return Err(format!(
                "reply to {code}: header code {rcode} flags {rflags:#x} size {size}"
            ));
        }
        let mut b = vec![0u8; size];
        let n = recv_exact(fd, &mut b, deadline).map_err(|e| format!("reply to {code}: {e}"))?;
        if n < size {
            return Err(format!("reply to {code}: {n} of {size} body bytes"));
        }
        Ok(RawReply::Body(b))
    }
}

/// `struct vhost_vring_state`.
pub fn vring_state(index: u32, num: u32) -> Vec<u8> {
    [index.to_le_bytes(), num.to_le_bytes()].concat()
}

/// The u64 body of SET_VRING_KICK/CALL/ERR: the index, bit 8 = no fd.
pub fn vring_fd_body(index: u8, no_fd: bool) -> Vec<u8> {
    (u64::from(index) | if no_fd { 0x100 } else { 0 })
        .to_le_bytes()
        .to_vec()
}
