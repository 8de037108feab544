//! File descriptors passed with control requests (SCM_RIGHTS): `ctl
//! backup` hands the daemon the target it created, so that a confined
//! daemon needs no access to the path.
//!
//! On a stream socket the kernel attaches a `sendmsg`'s descriptors to its
//! bytes, and a `recvmsg` that returns them stops at the end of those
//! bytes (bytes sent before may come in front of them). So the last byte
//! a `recvmsg` with descriptors returns was sent with them: a descriptor
//! belongs to the request line that byte is in, when each line and its
//! descriptor go out in one `sendmsg`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// Descriptors taken from one `recvmsg` at most; the kernel closes any
/// more that came with it (MSG_CTRUNC).
pub const MAX_FDS_PER_MESSAGE: usize = 4;

/// Bytes of `n` descriptors in a control message.
#[allow(clippy::cast_possible_truncation)] // a few descriptors: 4 bytes each
fn fd_bytes(n: usize) -> u32 {
    (n * std::mem::size_of::<RawFd>()) as u32
}

/// Control-message space for `n` descriptors, in u64 words (aligned as
/// `cmsghdr` needs).
fn cmsg_words(n: usize) -> usize {
    // SAFETY: CMSG_SPACE only computes a size.
    let bytes = unsafe { libc::CMSG_SPACE(fd_bytes(n)) } as usize;
    bytes.div_ceil(8)
}

/// Reads bytes into `buf` and the descriptors that came with them (closed
/// on exec). `Ok((0, _))` is the end of the stream.
pub fn recv_with_fds(stream: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut control = vec![0u64; cmsg_words(MAX_FDS_PER_MESSAGE)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is valid; the pointers set below live
    // across the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len() * 8;
    // SAFETY: a valid socket and message header.
    let n = unsafe {
        libc::recvmsg(
            stream.as_raw_fd(),
            &mut msg,
            libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: walking the control messages the kernel wrote into
    // `control`, with the CMSG_* macros and the lengths it set.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let len = (*cmsg).cmsg_len as usize - (data as usize - cmsg as usize);
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    #[allow(clippy::cast_sign_loss)] // checked non-negative
    Ok((n as usize, fds))
}

/// Sends all of `bytes`, the descriptor with the first of them
/// (vmm-sys-util's `sendmsg`, with MSG_NOSIGNAL).
pub fn send_with_fd(stream: &UnixStream, bytes: &[u8], fd: RawFd) -> io::Result<()> {
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let sent = stream
        .send_with_fd(bytes, fd)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    if sent < bytes.len() {
        // The descriptor went with the first byte; the rest is plain.
        use std::io::Write;
        let mut s = stream;
        s.write_all(&bytes[sent..])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};

    #[test]
    fn a_descriptor_arrives_with_the_last_bytes_it_was_sent_with() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"hello").unwrap();
        (&a).write_all(b"before\n").unwrap();
        send_with_fd(&a, b"with\n", f.as_raw_fd()).unwrap();
        (&a).write_all(b"after\n").unwrap();
        let mut got = Vec::new();
        let mut passed = None;
        let mut buf = [0u8; 64];
        while got.len() < 18 {
            let (n, fds) = recv_with_fds(&b, &mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
            if !fds.is_empty() {
                assert_eq!(fds.len(), 1);
                assert!(
                    got.ends_with(b"with\n"),
                    "{:?}",
                    String::from_utf8_lossy(&got)
                );
                passed = fds.into_iter().next();
            }
        }
        assert_eq!(got, b"before\nwith\nafter\n");
        let mut got = std::fs::File::from(passed.expect("no descriptor came"));
        got.rewind().unwrap();
        let mut s = String::new();
        got.read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello");
        // SAFETY: F_GETFD on a valid fd.
        let flags = unsafe { libc::fcntl(got.as_raw_fd(), libc::F_GETFD) };
        assert_ne!(
            flags & libc::FD_CLOEXEC,
            0,
            "received without close-on-exec"
        );
    }
}
