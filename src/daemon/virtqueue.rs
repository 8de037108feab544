//! One virtqueue of a connection, shared by the frontend-message thread
//! (which sets it up and stops it) and the worker thread that serves it.
//!
//! Locking: a virtqueue's mutex is held only to set the queue up, to pop
//! descriptor chains, or to publish used elements; never while taking the
//! scheduler's mutex (docs/architecture.md, "Locks").

use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::dirty_log::DirtyLog;
use super::guest_memory::{Memory, MemoryGuard};
use super::inflight::QueueInflight;
use crate::virtio::request::BlkRequest;
use crate::virtio::split_ring::SplitRing;

/// What the frontend set up for one virtqueue.
pub struct VirtqueueState {
    pub queue: Queue,
    /// The avail and used rings' per-request accesses.
    ring: SplitRing<Memory>,
    /// The frontend's kick (the guest made buffers available).
    pub kick: Option<EventFd>,
    /// Signalled when used elements were added and the driver wants to know.
    pub call: Option<EventFd>,
    /// SET_VRING_ENABLE (or no PROTOCOL_FEATURES, where rings start enabled).
    pub enabled: bool,
    /// Handed to its worker and not stopped since.
    pub started: bool,
    /// The ring was found broken (avail index too far ahead): not served
    /// again until the frontend sets it up anew.
    pub broken: bool,
    /// Was broken and has been set up anew: its worker serves it again at
    /// the next kick.
    pub revived: bool,
    /// Its in-flight region, when the frontend handed one over
    /// (SET_INFLIGHT_FD).
    pub inflight: Option<QueueInflight>,
    /// Where the used ring's writes are logged while dirty logging is on
    /// (SET_VRING_ADDR with VHOST_VRING_F_LOG).
    pub log_used: Option<u64>,
    /// The connection's dirty log (docs/design.md, "Dirty logging").
    pub log: Option<Arc<DirtyLog>>,
}

pub struct Virtqueue {
    pub index: u16,
    state: Mutex<VirtqueueState>,
}

impl Virtqueue {
    pub fn new(index: u16, max_size: u16) -> Result<Virtqueue, virtio_queue::Error> {
        Ok(Virtqueue {
            index,
            state: Mutex::new(VirtqueueState {
                queue: Queue::new(max_size)?,
                ring: SplitRing::default(),
                kick: None,
                call: None,
                enabled: false,
                started: false,
                broken: false,
                revived: false,
                inflight: None,
                log_used: None,
                log: None,
            }),
        })
    }

    /// The queue's state; a poisoned lock (a panicked worker) still holds
    /// the best state there is.
    pub fn lock(&self) -> MutexGuard<'_, VirtqueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl VirtqueueState {
    /// Tells the driver about used elements.
    pub fn signal_used(&self) {
        if let Some(call) = &self.call {
            let _ = call.write(1);
        }
    }

    /// Descriptors are available that were not taken yet.
    pub fn has_avail(&self, mem: &Memory) -> bool {
        self.queue.ready()
            && self
                .queue
                .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
                .is_ok_and(|idx| idx.0 != self.queue.next_avail())
    }

    /// The frontend set the ring up again (SET_VRING_NUM, ADDR or BASE).
    pub fn revive(&mut self) {
        self.ring.reset();
        if std::mem::take(&mut self.broken) {
            self.revived = true;
        }
    }

    /// Records `head` as taken in the in-flight region, if there is one.
    pub fn mark_taken(&mut self, head: u16) {
        if let Some(t) = &mut self.inflight {
            t.mark(head);
        }
    }

    /// The next request still in flight from before a restart.
    pub fn next_resubmit(&mut self) -> Option<u16> {
        self.inflight.as_mut()?.next_resubmit()
    }

    /// Publishes `head`'s used element, and clears its in-flight mark
    /// around it so that a crash in between can be repaired.
    pub fn add_used(&mut self, mem: &MemoryGuard, head: u16, len: u32) -> bool {
        if let Some(t) = &self.inflight {
            t.before_used(head);
        }
        let ok = self.ring.add_used(&mut self.queue, mem, head, len);
        if let Some(t) = &self.inflight {
            t.after_used(head, self.queue.next_used());
        }
        ok
    }

    /// Appends up to `room` heads the driver made available to `out`.
    pub fn take_heads(
        &mut self,
        mem: &MemoryGuard,
        room: usize,
        out: &mut Vec<u16>,
    ) -> Result<(), virtio_queue::Error> {
        self.ring.take_heads(&mut self.queue, mem, room, out)
    }

    /// Whether the driver wants to know of the used elements added since
    /// the last call.
    pub fn needs_notification(&mut self, mem: &MemoryGuard) -> bool {
        self.ring.needs_notification(&self.queue, mem)
    }

    /// The dirty log, if logging is on (one atomic load when off; the
    /// marking itself is out of line).
    #[inline]
    fn logging(&self) -> Option<&DirtyLog> {
        self.log.as_deref().filter(|l| l.is_on())
    }

    /// Logs what a finished request wrote and the used ring it goes on.
    pub fn log_published(&self, req: &BlkRequest) {
        if let Some(l) = self.logging() {
            l.mark_published(req, self.log_used, self.queue.size());
        }
    }

    /// Logs a status byte written at `gpa`.
    pub fn log_status(&self, gpa: u64) {
        if let Some(l) = self.logging() {
            l.mark(gpa, 1);
        }
    }

    /// Logs the used ring (notification flags, avail_event, elements).
    pub fn log_used_ring(&self) {
        if let Some(l) = self.logging() {
            l.mark_used_ring(self.log_used, self.queue.size());
        }
    }

    /// Ready to be served: set up, kicked, enabled.
    pub fn can_start(&self) -> bool {
        self.kick.is_some() && self.enabled && self.queue.ready() && !self.broken
    }
}
