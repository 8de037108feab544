//! In-flight I/O tracking for split virtqueues (the vhost-user
//! specification's "Inflight I/O tracking", VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD).
//!
//! The frontend keeps a shared memory area across restarts of the daemon:
//! one region per queue, marking each request the daemon took and has not
//! yet published. After a restart the daemon repairs the last used-ring
//! update it may have torn, and resubmits every request still marked,
//! oldest first, before it takes new ones (docs/design.md, "In-flight
//! tracking").
//!
//! A queue's region, all fields little-endian at these byte offsets:
//!
//! | offset | field |
//! |---|---|
//! | 0 | `features` u64 (unused, 0) |
//! | 8 | `version` u16 (0: never used, 1: this layout) |
//! | 10 | `desc_num` u16 (the queue size) |
//! | 12 | `last_batch_head` u16 (the head whose used element was being published) |
//! | 14 | `used_idx` u16 (the used index once that element was published) |
//! | 16 + 16·i | descriptor `i`: `inflight` u8, 5 bytes padding, `next` u16, `counter` u64 |
//!
//! Regions follow each other, each rounded up to 64 bytes. Every access
//! goes through bounds-checked atomic loads and stores of a mapping
//! whose file cannot shrink (the memfd is sealed), and every value read
//! back is checked before use: the frontend can write anything there.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use thiserror::Error;
use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, FileOffset, VolatileMemory};

/// Bytes of a queue region's header.
const HEADER: usize = 16;
/// Bytes of one descriptor's state.
const DESC: usize = 16;
/// Regions are laid out at multiples of this.
const ALIGN: u64 = 64;
/// The layout above.
const VERSION: u16 = 1;

const OFF_VERSION: usize = 8;
const OFF_DESC_NUM: usize = 10;
const OFF_LAST_BATCH_HEAD: usize = 12;
const OFF_USED_IDX: usize = 14;
const OFF_INFLIGHT: usize = 0;
const OFF_COUNTER: usize = 8;

/// Bytes of one queue's region for a queue of `queue_size` entries.
pub fn queue_region_size(queue_size: u16) -> u64 {
    (HEADER as u64 + DESC as u64 * u64::from(queue_size)).div_ceil(ALIGN) * ALIGN
}

/// The area's shape, as GET_INFLIGHT_FD answers and SET_INFLIGHT_FD
/// hands it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub mmap_size: u64,
    pub mmap_offset: u64,
    pub num_queues: u16,
    pub queue_size: u16,
}

/// Why an in-flight area or one of its regions was refused.
#[derive(Debug, Error)]
pub enum InflightError {
    #[error("in-flight area for {num_queues} queues; this device has {max}")]
    TooManyQueues { num_queues: u16, max: u16 },
    #[error("in-flight area: queue size {queue_size} (must be a power of two from 1 to {max})")]
    BadQueueSize { queue_size: u16, max: u16 },
    #[error(
        "in-flight area of {mmap_size} bytes; {num_queues} queues of {queue_size} need {needed}"
    )]
    TooSmall {
        mmap_size: u64,
        num_queues: u16,
        queue_size: u16,
        needed: u64,
    },
    #[error("in-flight area: its file is not a memfd sealed against shrinking ({0})")]
    NotSealed(String),
    #[error(
        "in-flight area: bytes {start}..{end} are past the end of its file ({file_size} bytes)"
    )]
    PastEnd {
        start: u64,
        end: u64,
        file_size: u64,
    },
    #[error("in-flight area: {0}")]
    Io(#[from] io::Error),
    #[error("in-flight area: cannot map it: {0}")]
    Map(String),
    #[error("queue {queue}: in-flight region version {version} (only 0 and {VERSION} exist)")]
    BadVersion { queue: u16, version: u16 },
    #[error("queue {queue}: in-flight region is for {region} descriptors, the area says {layout}")]
    DescNumMismatch {
        queue: u16,
        region: u16,
        layout: u16,
    },
    #[error("queue {queue}: the ring has {ring} entries, its in-flight region {region}")]
    RingSizeMismatch { queue: u16, ring: u16, region: u16 },
    #[error("queue {queue}: in-flight state of descriptor {head} is {value} (must be 0 or 1)")]
    BadState { queue: u16, head: u16, value: u8 },
    #[error("queue {queue}: last batch head {head} is outside the {desc_num} descriptors")]
    BadLastBatchHead {
        queue: u16,
        head: u16,
        desc_num: u16,
    },
    #[error(
        "queue {queue}: {in_flight} requests marked in flight, but only {available} were made \
         available since used index {used_idx}"
    )]
    TooManyInFlight {
        queue: u16,
        in_flight: u16,
        available: u16,
        used_idx: u16,
    },
}

fn map_error(e: impl std::fmt::Display) -> InflightError {
    InflightError::Map(e.to_string())
}

/// One in-flight area, mapped.
pub struct InflightArea {
    map: MmapRegion<()>,
    file: Arc<File>,
    layout: Layout,
}

impl InflightArea {
    /// A new, zeroed area for GET_INFLIGHT_FD: a memfd sealed against
    /// growing and shrinking, so that neither side can make the other's
    /// mapping fault.
    pub fn create(
        num_queues: u16,
        queue_size: u16,
        max_queues: u16,
        max_queue_size: u16,
    ) -> Result<InflightArea, InflightError> {
        check_shape(num_queues, queue_size, max_queues, max_queue_size)?;
        let size = u64::from(num_queues) * queue_region_size(queue_size);
        // SAFETY: a plain memfd_create with a NUL-terminated name; the fd
        // is owned right after.
        let fd = unsafe {
            libc::memfd_create(
                c"vhost-user-cow-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error().into());
        }
        // SAFETY: `fd` was just created and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size)?;
        // SAFETY: F_ADD_SEALS on our own memfd.
        let r = unsafe {
            libc::fcntl(
                file.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error().into());
        }
        let layout = Layout {
            mmap_size: size,
            mmap_offset: 0,
            num_queues,
            queue_size,
        };
        InflightArea::open(file, layout, max_queues, max_queue_size)
    }

    /// The area SET_INFLIGHT_FD hands over, checked: its shape, its size,
    /// and a file that cannot shrink under the mapping.
    pub fn open(
        file: File,
        layout: Layout,
        max_queues: u16,
        max_queue_size: u16,
    ) -> Result<InflightArea, InflightError> {
        check_shape(
            layout.num_queues,
            layout.queue_size,
            max_queues,
            max_queue_size,
        )?;
        let needed = u64::from(layout.num_queues) * queue_region_size(layout.queue_size);
        if layout.mmap_size < needed {
            return Err(InflightError::TooSmall {
                mmap_size: layout.mmap_size,
                num_queues: layout.num_queues,
                queue_size: layout.queue_size,
                needed,
            });
        }
        // SAFETY: F_GET_SEALS reads the seals of an fd we own.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 {
            return Err(InflightError::NotSealed(
                io::Error::last_os_error().to_string(),
            ));
        }
        if seals & libc::F_SEAL_SHRINK == 0 {
            return Err(InflightError::NotSealed(format!("seals {seals:#x}")));
        }
        let file_size = file.metadata()?.len();
        let end = layout.mmap_offset.checked_add(needed);
        if end.is_none_or(|end| end > file_size) {
            return Err(InflightError::PastEnd {
                start: layout.mmap_offset,
                end: end.unwrap_or(u64::MAX),
                file_size,
            });
        }
        let file = Arc::new(file);
        let size = usize::try_from(needed).map_err(map_error)?;
        let map =
            MmapRegion::from_file(FileOffset::from_arc(file.clone(), layout.mmap_offset), size)
                .map_err(map_error)?;
        Ok(InflightArea { map, file, layout })
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// A new handle to the area's file, for the GET_INFLIGHT_FD reply.
    pub fn file(&self) -> io::Result<File> {
        self.file.try_clone()
    }

    /// Queue `index`'s region; None for queues the area does not cover.
    pub fn queue(self: &Arc<Self>, index: u16) -> Option<QueueInflight> {
        (index < self.layout.num_queues).then(|| QueueInflight {
            area: self.clone(),
            index,
            base: usize::from(index) * to_usize(queue_region_size(self.layout.queue_size)),
            desc_num: self.layout.queue_size,
            counter: 0,
            resubmit: VecDeque::new(),
            resubmitting: 0,
        })
    }

    /// Checks every queue's region as [`QueueInflight::check`] does.
    pub fn check(self: &Arc<Self>) -> Result<(), InflightError> {
        for i in 0..self.layout.num_queues {
            if let Some(q) = self.queue(i) {
                q.check()?;
            }
        }
        Ok(())
    }
}

fn to_usize(v: u64) -> usize {
    crate::units::to_usize(v)
}

fn check_shape(
    num_queues: u16,
    queue_size: u16,
    max_queues: u16,
    max_queue_size: u16,
) -> Result<(), InflightError> {
    if num_queues == 0 || num_queues > max_queues {
        return Err(InflightError::TooManyQueues {
            num_queues,
            max: max_queues,
        });
    }
    if !queue_size.is_power_of_two() || queue_size > max_queue_size {
        return Err(InflightError::BadQueueSize {
            queue_size,
            max: max_queue_size,
        });
    }
    Ok(())
}

/// What a ring start found in its region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// Requests marked in flight, to be resubmitted (oldest first).
    pub in_flight: u16,
    /// The avail index to continue from: the used index plus the requests
    /// in flight. None for a region never used (the frontend's base holds).
    pub next_avail: Option<u16>,
    /// The last used-ring update was torn and has been repaired.
    pub repaired: bool,
}

/// One queue's region, and the order requests are taken in.
pub struct QueueInflight {
    area: Arc<InflightArea>,
    index: u16,
    base: usize,
    desc_num: u16,
    /// The next request's counter (the order requests were taken in).
    counter: u64,
    /// Heads to resubmit, oldest first.
    resubmit: VecDeque<u16>,
    /// Heads found in flight at the last start (for the log line).
    resubmitting: u16,
}

impl QueueInflight {
    fn desc(&self, head: u16) -> usize {
        self.base + HEADER + DESC * usize::from(head)
    }

    // Loads and stores cannot fail: every offset is inside the mapping
    // (heads are checked against `desc_num`, and the mapping holds
    // `desc_num` descriptors per queue); a failure would only skip the
    // access.
    fn load_u16(&self, off: usize) -> u16 {
        let s = self.area.map.as_volatile_slice();
        s.load::<u16>(off, Ordering::Acquire)
            .map_or(0, u16::from_le)
    }

    fn store_u16(&self, off: usize, v: u16) {
        let s = self.area.map.as_volatile_slice();
        let _ = s.store(v.to_le(), off, Ordering::Release);
    }

    fn load_u8(&self, off: usize) -> u8 {
        let s = self.area.map.as_volatile_slice();
        s.load::<u8>(off, Ordering::Acquire).unwrap_or(0)
    }

    fn store_u8(&self, off: usize, v: u8) {
        let s = self.area.map.as_volatile_slice();
        let _ = s.store(v, off, Ordering::Release);
    }

    fn load_u64(&self, off: usize) -> u64 {
        let s = self.area.map.as_volatile_slice();
        s.load::<u64>(off, Ordering::Acquire)
            .map_or(0, u64::from_le)
    }

    fn store_u64(&self, off: usize, v: u64) {
        let s = self.area.map.as_volatile_slice();
        let _ = s.store(v.to_le(), off, Ordering::Release);
    }

    /// Checks the region's fields without changing anything.
    pub fn check(&self) -> Result<(), InflightError> {
        let queue = self.index;
        let version = self.load_u16(self.base + OFF_VERSION);
        if version == 0 {
            return Ok(()); // never used: it is initialized at the start
        }
        if version != VERSION {
            return Err(InflightError::BadVersion { queue, version });
        }
        let region = self.load_u16(self.base + OFF_DESC_NUM);
        if region != self.desc_num {
            return Err(InflightError::DescNumMismatch {
                queue,
                region,
                layout: self.desc_num,
            });
        }
        let head = self.load_u16(self.base + OFF_LAST_BATCH_HEAD);
        if head >= self.desc_num {
            return Err(InflightError::BadLastBatchHead {
                queue,
                head,
                desc_num: self.desc_num,
            });
        }
        for head in 0..self.desc_num {
            let value = self.load_u8(self.desc(head) + OFF_INFLIGHT);
            if value > 1 {
                return Err(InflightError::BadState { queue, head, value });
            }
        }
        Ok(())
    }

    /// At a ring start: checks the region, repairs a torn used-ring
    /// update, and lists the requests still in flight, oldest first.
    /// `used_idx` and `avail_idx` are the ring's, as the guest's memory
    /// has them. Nothing is changed when the region is refused.
    pub fn recover(
        &mut self,
        ring_size: u16,
        used_idx: u16,
        avail_idx: u16,
    ) -> Result<Recovered, InflightError> {
        let queue = self.index;
        if ring_size != self.desc_num {
            return Err(InflightError::RingSizeMismatch {
                queue,
                ring: ring_size,
                region: self.desc_num,
            });
        }
        self.check()?;
        self.resubmit.clear();
        self.resubmitting = 0;
        if self.load_u16(self.base + OFF_VERSION) == 0 {
            // A fresh region (or one the frontend zeroed): start it.
            for head in 0..self.desc_num {
                self.store_u8(self.desc(head) + OFF_INFLIGHT, 0);
            }
            self.store_u16(self.base + OFF_DESC_NUM, self.desc_num);
            self.store_u16(self.base + OFF_LAST_BATCH_HEAD, 0);
            self.store_u16(self.base + OFF_USED_IDX, used_idx);
            fence(Ordering::SeqCst);
            self.store_u16(self.base + OFF_VERSION, VERSION);
            self.counter = 0;
            return Ok(Recovered {
                in_flight: 0,
                next_avail: None,
                repaired: false,
            });
        }
        let mut marked: Vec<(u64, u16)> = (0..self.desc_num)
            .filter(|&h| self.load_u8(self.desc(h) + OFF_INFLIGHT) == 1)
            .map(|h| (self.load_u64(self.desc(h) + OFF_COUNTER), h))
            .collect();
        // The used element of the last batch head reached the ring but its
        // mark was not cleared (or the region's used index not updated).
        let repaired = self.load_u16(self.base + OFF_USED_IDX) != used_idx;
        let last = self.load_u16(self.base + OFF_LAST_BATCH_HEAD);
        if repaired {
            marked.retain(|&(_, h)| h != last);
        }
        let in_flight = u16::try_from(marked.len()).unwrap_or(u16::MAX);
        let available = avail_idx.wrapping_sub(used_idx);
        if in_flight > available || in_flight > ring_size {
            return Err(InflightError::TooManyInFlight {
                queue,
                in_flight,
                available,
                used_idx,
            });
        }
        if repaired {
            self.store_u8(self.desc(last) + OFF_INFLIGHT, 0);
            fence(Ordering::SeqCst);
            self.store_u16(self.base + OFF_USED_IDX, used_idx);
        }
        // Oldest first; equal counters (only a frontend writes those) in
        // head order, so the order is always the same.
        marked.sort_unstable();
        self.counter = marked.last().map_or(0, |&(c, _)| c.wrapping_add(1));
        self.resubmit = marked.iter().map(|&(_, h)| h).collect();
        self.resubmitting = in_flight;
        Ok(Recovered {
            in_flight,
            next_avail: Some(used_idx.wrapping_add(in_flight)),
            repaired,
        })
    }

    /// The next request to resubmit, oldest first; logs once the last one
    /// has been taken.
    pub fn next_resubmit(&mut self) -> Option<u16> {
        let head = self.resubmit.pop_front()?;
        if self.resubmit.is_empty() {
            log::info!(
                "queue {}: resubmitted the {} requests that were in flight",
                self.index,
                self.resubmitting
            );
        }
        Some(head)
    }

    /// The queue's index.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Requests left to resubmit.
    pub fn resubmit_pending(&self) -> usize {
        self.resubmit.len()
    }

    /// Marks `head` in flight, before the request is processed. A
    /// resubmitted request keeps its mark and counter.
    pub fn mark(&mut self, head: u16) {
        if head >= self.desc_num {
            return; // the ring refuses such a head itself
        }
        let d = self.desc(head);
        self.store_u64(d + OFF_COUNTER, self.counter);
        self.counter = self.counter.wrapping_add(1);
        fence(Ordering::Release);
        self.store_u8(d + OFF_INFLIGHT, 1);
    }

    /// Before `head`'s used element is published: it is the one a torn
    /// update would leave marked.
    pub fn before_used(&self, head: u16) {
        if head < self.desc_num {
            self.store_u16(self.base + OFF_LAST_BATCH_HEAD, head);
            fence(Ordering::Release);
        }
    }

    /// After `head`'s used element was published and the used index is
    /// `used_idx`: clears the mark, then records the used index.
    pub fn after_used(&self, head: u16, used_idx: u16) {
        self.clear(head);
        self.set_used_idx(used_idx);
    }

    fn clear(&self, head: u16) {
        if head < self.desc_num {
            fence(Ordering::Release);
            self.store_u8(self.desc(head) + OFF_INFLIGHT, 0);
        }
    }

    fn set_used_idx(&self, used_idx: u16) {
        fence(Ordering::Release);
        self.store_u16(self.base + OFF_USED_IDX, used_idx);
    }
}

#[cfg(test)]
#[path = "inflight_tests.rs"]
mod tests;
