//! A fake I/O engine for driving `Worker` in-process: it queues what it
//! accepts, and does each operation for real on its fd (preadv, pwritev,
//! fdatasync, fallocate) only when the test completes it, in the order the
//! test chooses. It can refuse with `Full` at its capacity, fail chosen
//! submissions with another error, and cut reads short. Everything it
//! accepted, refused, failed and completed is logged for assertions.

use std::collections::VecDeque;
use std::io;
use std::ops::Range;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use vhost_user_cow::units::to_usize;

use vhost_user_cow::io_engine::{Completion, IoEngine, IoOp, SubmitError};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// What an operation is, told apart by its fd, its offset and whether its
/// buffers are guest memory (the worker's bounce buffers and the
/// scheduler's bitmap are not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// A read into guest buffers.
    GuestRead {
        fd: RawFd,
    },
    /// A write of guest data to the COW file or raw image.
    GuestWrite,
    /// Copy-up, first half: backing data into a bounce buffer.
    CopyRead,
    /// Copy-up, second half: a bounce buffer into the COW data area.
    CopyWrite,
    /// Bitmap bytes into the COW header area.
    BitmapWrite,
    Sync,
    Fallocate {
        mode: i32,
    },
}

/// One operation the engine saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpInfo {
    pub user_data: u64,
    pub class: Class,
    pub offset: u64,
    pub len: u64,
}

/// The engine's log, in the order things happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Accepted(OpInfo),
    Refused(OpInfo),
    /// Submission failed with an error other than Full.
    Failed(OpInfo),
    Completed(OpInfo, Result<u64, i32>),
}

/// Which error a chosen submission fails with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Invalid,
    Io,
}

/// What the engine needs to classify operations.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Host addresses of guest memory.
    pub guest: Range<usize>,
    pub cow_fd: RawFd,
    /// Offset of the COW data area (0 for a raw image): writes below it
    /// that are not guest data are bitmap writes.
    pub data_offset: u64,
}

struct Pending {
    info: OpInfo,
    op: IoOp,
}

pub struct State {
    layout: Layout,
    pub capacity: usize,
    pending: VecDeque<Pending>,
    completed: Vec<Completion>,
    pub log: Vec<Event>,
    /// Submissions of this class fail (each entry once) with the error.
    pub fail: Vec<(Class, Failure)>,
    /// Reads into guest buffers transfer at most this many bytes (once).
    pub short_read: Option<u64>,
    /// Most operations ever accepted and not yet reaped at once.
    pub max_in_flight: usize,
    event: EventFd,
}

impl State {
    fn in_flight(&self) -> usize {
        self.pending.len() + self.completed.len()
    }

    fn classify(&self, op: &IoOp) -> OpInfo {
        let in_guest = |iov: &vhost_user_cow::io_engine::IoVecs| {
            iov.as_slice()
                .iter()
                .all(|v| self.layout.guest.contains(&(v.iov_base as usize)))
        };
        let (class, offset, len) = match op {
            IoOp::Readv { fd, offset, iov } => {
                let class = if in_guest(iov) {
                    Class::GuestRead { fd: *fd }
                } else {
                    Class::CopyRead
                };
                (class, *offset, iov.total_len())
            }
            IoOp::Writev { fd, offset, iov } => {
                assert_eq!(*fd, self.layout.cow_fd, "writes go to the COW file only");
                let class = if in_guest(iov) {
                    Class::GuestWrite
                } else if *offset < self.layout.data_offset {
                    Class::BitmapWrite
                } else {
                    Class::CopyWrite
                };
                (class, *offset, iov.total_len())
            }
            IoOp::Fdatasync { fd } => {
                assert_eq!(*fd, self.layout.cow_fd, "only the COW file is synced");
                (Class::Sync, 0, 0)
            }
            IoOp::Fallocate {
                fd,
                mode,
                offset,
                len,
            } => {
                assert_eq!(*fd, self.layout.cow_fd, "only the COW file is zeroed");
                (Class::Fallocate { mode: *mode }, *offset, *len)
            }
        };
        OpInfo {
            user_data: 0,
            class,
            offset,
            len,
        }
    }

    /// Operations accepted and not completed yet, oldest first.
    pub fn pending(&self) -> Vec<OpInfo> {
        self.pending.iter().map(|p| p.info).collect()
    }

    /// Completes the pending operations `pick` chooses (indices into
    /// [`pending`](Self::pending)), in the order given, doing them for real.
    pub fn complete(&mut self, pick: &[usize]) {
        let mut taken: Vec<Option<Pending>> = self.pending.drain(..).map(Some).collect();
        for &i in pick {
            let p = taken[i].take().expect("an operation completed twice");
            let result = self.perform(&p);
            self.log.push(Event::Completed(p.info, result));
            self.completed.push(Completion {
                user_data: p.info.user_data,
                result,
            });
        }
        self.pending = taken.into_iter().flatten().collect();
        if !pick.is_empty() {
            self.event.write(1).expect("eventfd");
        }
    }

    /// Completes every pending operation matching `f`, oldest first;
    /// returns how many.
    pub fn complete_matching(&mut self, f: impl Fn(&OpInfo) -> bool) -> usize {
        let pick: Vec<usize> = (0..self.pending.len())
            .filter(|&i| f(&self.pending[i].info))
            .collect();
        self.complete(&pick);
        pick.len()
    }

    fn perform(&mut self, p: &Pending) -> Result<u64, i32> {
        let errno = || {
            io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO)
        };
        match &p.op {
            IoOp::Readv { fd, offset, iov } => {
                let mut limit = iov.total_len();
                if matches!(p.info.class, Class::GuestRead { .. }) {
                    if let Some(n) = self.short_read.take() {
                        limit = limit.min(n);
                    }
                }
                // Like the real engines: loop until done or end of file.
                let mut done = 0u64;
                for v in iov.as_slice() {
                    let mut seg = 0usize;
                    while seg < v.iov_len && done < limit {
                        let want = (v.iov_len - seg).min(to_usize(limit - done));
                        // SAFETY: the worker keeps the buffer valid and
                        // untouched until this completion is reaped.
                        let n = unsafe {
                            libc::pread(
                                *fd,
                                v.iov_base.cast::<u8>().add(seg).cast(),
                                want,
                                (offset + done) as i64,
                            )
                        };
                        if n < 0 {
                            return Err(errno());
                        }
                        if n == 0 {
                            return Ok(done);
                        }
                        seg += n as usize;
                        done += n as u64;
                    }
                }
                Ok(done)
            }
            IoOp::Writev { fd, offset, iov } => {
                let mut done = 0u64;
                for v in iov.as_slice() {
                    let mut seg = 0usize;
                    while seg < v.iov_len {
                        // SAFETY: as above; the buffer is only read.
                        let n = unsafe {
                            libc::pwrite(
                                *fd,
                                v.iov_base.cast::<u8>().add(seg).cast(),
                                v.iov_len - seg,
                                (offset + done) as i64,
                            )
                        };
                        if n <= 0 {
                            return Err(if n == 0 { libc::EIO } else { errno() });
                        }
                        seg += n as usize;
                        done += n as u64;
                    }
                }
                Ok(done)
            }
            IoOp::Fdatasync { fd } => {
                // SAFETY: plain syscall on an fd the device keeps open.
                if unsafe { libc::fdatasync(*fd) } < 0 {
                    return Err(errno());
                }
                Ok(0)
            }
            IoOp::Fallocate {
                fd,
                mode,
                offset,
                len,
            } => {
                // SAFETY: plain syscall on an fd the device keeps open.
                if unsafe { libc::fallocate(*fd, *mode, *offset as i64, *len as i64) } < 0 {
                    return Err(errno());
                }
                Ok(0)
            }
        }
    }
}

/// The engine handed to the worker; the test keeps [`FakeEngine::state`].
pub struct FakeEngine {
    state: Arc<Mutex<State>>,
    event_fd: RawFd,
}

impl FakeEngine {
    pub fn new(layout: Layout, capacity: usize) -> (FakeEngine, Arc<Mutex<State>>) {
        let event = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let event_fd = event.as_raw_fd();
        let state = Arc::new(Mutex::new(State {
            layout,
            capacity,
            pending: VecDeque::new(),
            completed: Vec::new(),
            log: Vec::new(),
            fail: Vec::new(),
            short_read: None,
            max_in_flight: 0,
            event,
        }));
        (
            FakeEngine {
                state: state.clone(),
                event_fd,
            },
            state,
        )
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }
}

impl IoEngine for FakeEngine {
    unsafe fn submit(&mut self, op: IoOp, user_data: u64) -> Result<(), SubmitError> {
        let mut s = self.lock();
        let info = OpInfo {
            user_data,
            ..s.classify(&op)
        };
        if let Some(i) = s.fail.iter().position(|(c, _)| *c == info.class) {
            let (_, f) = s.fail.remove(i);
            s.log.push(Event::Failed(info));
            return Err(match f {
                Failure::Invalid => SubmitError::Invalid("injected by the test"),
                Failure::Io => SubmitError::Io(io::Error::from_raw_os_error(libc::EIO)),
            });
        }
        if s.in_flight() >= s.capacity {
            s.log.push(Event::Refused(info));
            return Err(SubmitError::Full(op));
        }
        s.log.push(Event::Accepted(info));
        s.pending.push_back(Pending { info, op });
        s.max_in_flight = s.max_in_flight.max(s.in_flight());
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        let mut s = self.lock();
        if !s.completed.is_empty() {
            let _ = s.event.read();
            out.append(&mut s.completed);
        }
    }

    fn wait(&mut self, min: usize) -> io::Result<()> {
        let mut s = self.lock();
        while s.completed.len() < min.min(s.in_flight()) {
            s.complete(&[0]);
        }
        Ok(())
    }

    fn event_fd(&self) -> RawFd {
        self.event_fd
    }

    fn in_flight(&self) -> usize {
        self.lock().in_flight()
    }

    fn capacity(&self) -> usize {
        self.lock().capacity
    }

    fn name(&self) -> &'static str {
        "fake"
    }
}
