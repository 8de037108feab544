//! A split virtqueue (virtio 1.2 §2.7) laid out in the test's guest memory:
//! descriptor table, avail ring and used ring each in their own pages (no
//! overlap whatever the size), plus the kick and call eventfds.
//!
//! Chains are written verbatim from [`RawDesc`]s, so a test can build any
//! chain a buggy or hostile driver could: wrong flags, loops, indirect
//! tables of any length, addresses outside guest memory.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use vhost_user_cow::units::to_usize;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::guest_memory::{Arena, GuestMemory};

pub const VIRTQ_DESC_F_NEXT: u16 = 1;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;

/// Where a descriptor's `next` field points.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// The k-th descriptor of the same chain (resolved to its table slot),
    /// e.g. `Chain(0)` from the last descriptor makes a loop.
    Chain(usize),
    /// A raw descriptor-table index, possibly out of range.
    Table(u16),
}

/// One descriptor exactly as it will be written into the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawDesc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: Next,
}

/// One used-ring element.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    pub id: u32,
    pub len: u32,
}

/// Why no completion came.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WaitError {
    /// Nothing was put in the used ring before the deadline.
    Timeout { queue: usize, waited: Duration },
    /// The backend closed the vhost-user socket.
    Disconnected { queue: usize },
}

impl std::fmt::Display for WaitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WaitError::Timeout { queue, waited } => write!(
                f,
                "no completion on queue {queue} within {waited:?}: the backend hung or dropped the request"
            ),
            WaitError::Disconnected { queue } => write!(
                f,
                "the backend closed the connection while a request on queue {queue} was in flight"
            ),
        }
    }
}

pub struct SplitQueue {
    pub index: usize,
    pub size: u16,
    pub desc_gpa: u64,
    pub avail_gpa: u64,
    pub used_gpa: u64,
    event_idx: bool,
    /// Next avail index to publish (= number of chains made available).
    avail_idx: u16,
    /// Next used index to consume.
    last_used: u16,
    free: Vec<u16>,
    /// Table slots of each chain made available, by head.
    in_flight: HashMap<u16, Vec<u16>>,
    /// Used elements read from the ring but not yet taken by a waiter.
    done: HashMap<u16, u32>,
    pub kick: EventFd,
    pub call: EventFd,
}

impl SplitQueue {
    /// Lays out a queue of `size` entries (a power of two) in `arena`.
    pub fn new(
        index: usize,
        size: u16,
        event_idx: bool,
        mem: &GuestMemory,
        arena: &mut Arena,
    ) -> SplitQueue {
        assert!(size.is_power_of_two(), "queue size {size}");
        let n = u64::from(size);
        let desc_gpa = arena.alloc(16 * n, 4096);
        let avail_gpa = arena.alloc(6 + 2 * n, 4096);
        let used_gpa = arena.alloc(6 + 8 * n, 4096);
        mem.fill(desc_gpa, 16 * to_usize(n), 0);
        mem.fill(avail_gpa, 6 + 2 * to_usize(n), 0);
        mem.fill(used_gpa, 6 + 8 * to_usize(n), 0);
        SplitQueue {
            index,
            size,
            desc_gpa,
            avail_gpa,
            used_gpa,
            event_idx,
            avail_idx: 0,
            last_used: 0,
            free: (0..size).rev().collect(),
            in_flight: HashMap::new(),
            done: HashMap::new(),
            kick: EventFd::new(EFD_NONBLOCK).expect("kick eventfd"),
            call: EventFd::new(EFD_NONBLOCK).expect("call eventfd"),
        }
    }

    /// Forgets every chain and zeroes the rings (the eventfds stay).
    pub fn reset(&mut self, mem: &GuestMemory) {
        let n = usize::from(self.size);
        mem.fill(self.desc_gpa, 16 * n, 0);
        mem.fill(self.avail_gpa, 6 + 2 * n, 0);
        mem.fill(self.used_gpa, 6 + 8 * n, 0);
        self.avail_idx = 0;
        self.last_used = 0;
        self.free = (0..self.size).rev().collect();
        self.in_flight.clear();
        self.done.clear();
        let _ = self.call.read();
    }

    /// Number of chains made available so far (the avail index).
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Chains made available whose completion has not been taken.
    pub fn outstanding(&self) -> usize {
        self.in_flight.len()
    }

    /// Writes `descs` into free table slots, links `Next::Chain` references,
    /// publishes the head in the avail ring and kicks. Returns the head.
    pub fn add_chain(&mut self, mem: &GuestMemory, descs: &[RawDesc]) -> u16 {
        assert!(!descs.is_empty(), "a chain needs at least one descriptor");
        assert!(
            descs.len() <= self.free.len(),
            "queue {} full: {} descriptors wanted, {} free",
            self.index,
            descs.len(),
            self.free.len()
        );
        let slots: Vec<u16> = (0..descs.len()).map(|_| self.free.pop().unwrap()).collect();
        for (d, &slot) in descs.iter().zip(&slots) {
            let next = match d.next {
                Next::Chain(k) => slots[k],
                Next::Table(t) => t,
            };
            write_desc(mem, self.desc_gpa + 16 * u64::from(slot), d, next);
        }
        let head = slots[0];
        self.in_flight.insert(head, slots);
        self.publish(mem, head);
        head
    }

    /// Puts `head` in the avail ring as is (it may be out of range) and kicks.
    pub fn publish(&mut self, mem: &GuestMemory, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_u16(self.avail_gpa + 4 + 2 * slot, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.store_u16_release(self.avail_gpa + 2, self.avail_idx);
        self.kick.write(1).expect("kick");
    }

    fn used_event_gpa(&self) -> u64 {
        self.avail_gpa + 4 + 2 * u64::from(self.size)
    }

    /// Moves new used elements into `done`; returns how many there were.
    fn harvest(&mut self, mem: &GuestMemory) -> usize {
        let idx = mem.load_u16_acquire(self.used_gpa + 2);
        let mut n = 0;
        while self.last_used != idx {
            let slot = u64::from(self.last_used % self.size);
            let elem = self.used_gpa + 4 + 8 * slot;
            let id = mem.read_u32(elem);
            let len = mem.read_u32(elem + 4);
            let head = u16::try_from(id)
                .ok()
                .filter(|h| self.in_flight.contains_key(h))
                .unwrap_or_else(|| {
                    panic!(
                        "queue {}: backend returned id {id} (len {len}) that is not an outstanding head",
                        self.index
                    )
                });
            assert!(
                self.done.insert(head, len).is_none(),
                "queue {}: head {head} completed twice",
                self.index
            );
            self.last_used = self.last_used.wrapping_add(1);
            n += 1;
        }
        if self.event_idx {
            // Ask for a call as soon as anything past what we consumed is used.
            mem.store_u16_release(self.used_event_gpa(), self.last_used);
        }
        n
    }

    /// Takes the completion of `head` if it has arrived.
    pub fn take(&mut self, mem: &GuestMemory, head: u16) -> Option<u32> {
        if !self.done.contains_key(&head) {
            self.harvest(mem);
        }
        let len = self.done.remove(&head)?;
        for slot in self.in_flight.remove(&head).unwrap() {
            self.free.push(slot);
        }
        Some(len)
    }

    /// Waits until `head` completes, the backend hangs up (`sock`), or
    /// `timeout` passes. Polls the call eventfd; never sleeps blindly.
    pub fn wait(
        &mut self,
        mem: &GuestMemory,
        sock: RawFd,
        head: u16,
        timeout: Duration,
    ) -> Result<u32, WaitError> {
        let start = Instant::now();
        loop {
            if let Some(len) = self.take(mem, head) {
                return Ok(len);
            }
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(WaitError::Timeout {
                    queue: self.index,
                    waited: timeout,
                });
            }
            let mut fds = [
                libc::pollfd {
                    fd: self.call.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: sock,
                    events: libc::POLLRDHUP,
                    revents: 0,
                },
            ];
            let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1);
            // SAFETY: two valid pollfds.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                assert_eq!(e.kind(), std::io::ErrorKind::Interrupted, "poll: {e}");
                continue;
            }
            if fds[0].revents & libc::POLLIN != 0 {
                let _ = self.call.read();
            }
            if fds[1].revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
                return match self.take(mem, head) {
                    Some(len) => Ok(len),
                    None => Err(WaitError::Disconnected { queue: self.index }),
                };
            }
        }
    }
}

fn write_desc(mem: &GuestMemory, at: u64, d: &RawDesc, next: u16) {
    mem.write_u64(at, d.addr);
    mem.write_u32(at + 8, d.len);
    mem.write_u16(at + 12, d.flags);
    mem.write_u16(at + 14, next);
}

/// Bytes of an indirect descriptor table holding `descs`, with
/// `Next::Chain(k)` resolved to table index k.
pub fn indirect_table(descs: &[RawDesc]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 * descs.len());
    for d in descs {
        let next = match d.next {
            Next::Chain(k) => u16::try_from(k).unwrap(),
            Next::Table(t) => t,
        };
        out.extend_from_slice(&d.addr.to_le_bytes());
        out.extend_from_slice(&d.len.to_le_bytes());
        out.extend_from_slice(&d.flags.to_le_bytes());
        out.extend_from_slice(&next.to_le_bytes());
    }
    out
}
