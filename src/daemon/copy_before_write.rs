//! The cluster bookkeeping of a backup job (docs/design.md, rule 10,
//! "Copy-before-write"): which clusters of the disk are copied to the
//! target, which are being copied, which wait for none, and which guest
//! writes wait for which cluster. No I/O: the scheduler asks it what to
//! copy next and tells it what finished.

use std::collections::VecDeque;

use rustc_hash::FxHashMap;

use super::scheduler::{ReqId, ThreadId};
use crate::fsutil::range_set::RangeSet;

/// How a job ended (or that it has not).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Running,
    Completed,
    Cancelled,
    Failed,
}

/// What `query-jobs` and the events show of a job, and what the scheduler
/// hands back once a job has ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct JobProgress {
    pub id: u64,
    pub state: JobState,
    pub clusters_done: u64,
    pub clusters_total: u64,
    pub cluster_bytes: u64,
    /// Bytes written to the target (all-zero clusters are skipped).
    pub bytes_written: u64,
    /// Guest writes that waited for a cluster to be copied first.
    pub writes_waited: u64,
    /// Why it failed.
    pub error: Option<String>,
}

/// A cluster being copied (its internal read, then its write to the
/// target): the bounce buffer its data goes through.
#[derive(Debug, Clone)]
pub struct Copying {
    pub bounce: u64,
}

#[derive(Debug, Clone)]
pub struct CopyJob {
    pub id: u64,
    /// The worker whose engine issues the copies.
    pub thread: ThreadId,
    pub cluster_sectors: u64,
    pub sectors: u64,
    pub state: JobState,
    pub error: Option<String>,
    copied: RangeSet,
    pub copying: FxHashMap<u64, Copying>,
    /// Every cluster below this is copied or being copied.
    cursor: u64,
    /// Clusters guest writes wait for, copied before the cursor's.
    urgent: VecDeque<u64>,
    /// Per cluster, the writes waiting for it.
    waiters: FxHashMap<u64, Vec<ReqId>>,
    /// Every waiting write, in arrival order, with how many clusters it
    /// still waits for.
    pub waiting: Vec<(ReqId, u32)>,
    pub clusters_done: u64,
    pub bytes_written: u64,
    pub writes_waited: u64,
    /// The final fdatasync of the target is in flight.
    pub syncing: bool,
    /// Something `query-jobs` shows changed since the last look.
    pub progressed: bool,
}

impl CopyJob {
    pub fn new(id: u64, thread: ThreadId, sectors: u64, cluster_sectors: u64) -> CopyJob {
        assert!(cluster_sectors > 0);
        CopyJob {
            id,
            thread,
            cluster_sectors,
            sectors,
            state: JobState::Running,
            error: None,
            copied: RangeSet::new(),
            copying: FxHashMap::default(),
            cursor: 0,
            urgent: VecDeque::new(),
            waiters: FxHashMap::default(),
            waiting: Vec::new(),
            clusters_done: 0,
            bytes_written: 0,
            writes_waited: 0,
            syncing: false,
            progressed: false,
        }
    }

    pub fn clusters(&self) -> u64 {
        self.sectors.div_ceil(self.cluster_sectors)
    }

    /// Sectors of `cluster`: `(first, count)` (the last may be short).
    pub fn cluster_span(&self, cluster: u64) -> (u64, u64) {
        let first = cluster * self.cluster_sectors;
        (first, self.cluster_sectors.min(self.sectors - first))
    }

    pub fn is_copied(&self, cluster: u64) -> bool {
        self.copied.contains(cluster)
    }

    /// Registers write `id` over sectors `[sector, sector + count)` as
    /// waiting for every cluster there not yet copied (copying ones
    /// included: their read may be in flight), those not started becoming
    /// urgent. Returns how many it waits for (0: it may go on).
    pub fn hold_write(&mut self, id: ReqId, sector: u64, count: u64) -> u32 {
        if self.state != JobState::Running || count == 0 {
            return 0;
        }
        let first = sector / self.cluster_sectors;
        let last = (sector + count - 1) / self.cluster_sectors;
        let mut n = 0;
        for c in first..=last {
            if self.copied.contains(c) {
                continue;
            }
            n += 1;
            self.waiters.entry(c).or_default().push(id);
            if !self.copying.contains_key(&c) {
                self.urgent.push_back(c);
            }
        }
        if n > 0 {
            self.writes_waited += 1;
            self.progressed = true;
            self.waiting.push((id, n));
        }
        n
    }

    /// The next cluster to copy: urgent ones first, then in order.
    pub fn next_cluster(&mut self) -> Option<u64> {
        while let Some(c) = self.urgent.pop_front() {
            if !self.copied.contains(c) && !self.copying.contains_key(&c) {
                return Some(c);
            }
        }
        let total = self.clusters();
        while self.cursor < total {
            let c = self.cursor;
            self.cursor += 1;
            if !self.copied.contains(c) && !self.copying.contains_key(&c) {
                return Some(c);
            }
        }
        None
    }

    /// Whether urgent clusters wait to be started.
    pub fn has_urgent(&self) -> bool {
        self.urgent
            .iter()
            .any(|c| !self.copied.contains(*c) && !self.copying.contains_key(c))
    }

    /// Every cluster is copied and nothing is in flight.
    pub fn all_copied(&self) -> bool {
        self.copying.is_empty() && self.clusters_done == self.clusters()
    }

    /// `cluster` is in the target: returns the writes that waited for it
    /// and wait for nothing more, in arrival order.
    pub fn cluster_copied(&mut self, cluster: u64, bytes: u64) -> Vec<ReqId> {
        self.copying.remove(&cluster);
        self.copied.insert(cluster..cluster + 1);
        self.clusters_done += 1;
        self.bytes_written += bytes;
        self.progressed = true;
        let held = self.waiters.remove(&cluster).unwrap_or_default();
        let mut free = Vec::new();
        for (id, n) in &mut self.waiting {
            if held.contains(id) {
                *n -= 1;
                if *n == 0 {
                    free.push(*id);
                }
            }
        }
        self.waiting.retain(|(_, n)| *n > 0);
        free
    }

    /// Ends a running job (cancelled or failed): every waiting write may
    /// go on, in arrival order.
    pub fn stop(&mut self, state: JobState, error: Option<String>) -> Vec<ReqId> {
        if self.state == JobState::Running {
            self.state = state;
            self.error = error;
            self.progressed = true;
        }
        self.urgent.clear();
        self.waiters.clear();
        std::mem::take(&mut self.waiting)
            .into_iter()
            .map(|(id, _)| id)
            .collect()
    }

    pub fn progress(&self) -> JobProgress {
        JobProgress {
            id: self.id,
            state: self.state.clone(),
            clusters_done: self.clusters_done,
            clusters_total: self.clusters(),
            cluster_bytes: self.cluster_sectors * crate::units::SECTOR_BYTES,
            bytes_written: self.bytes_written,
            writes_waited: self.writes_waited,
            error: self.error.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urgent_clusters_go_first_and_waiters_are_freed_when_all_theirs_are_copied() {
        let mut j = CopyJob::new(1, 0, 10, 4); // clusters 0..3, the last 2 sectors
        assert_eq!(j.clusters(), 3);
        assert_eq!(j.cluster_span(2), (8, 2));
        assert_eq!(j.hold_write(7, 3, 2), 2); // clusters 0 and 1
        assert_eq!(j.next_cluster(), Some(0));
        j.copying.insert(0, Copying { bounce: 1 });
        assert_eq!(j.next_cluster(), Some(1));
        j.copying.insert(1, Copying { bounce: 2 });
        assert_eq!(j.next_cluster(), Some(2));
        assert!(j.cluster_copied(0, 0).is_empty());
        assert_eq!(j.cluster_copied(1, 2048), vec![7]);
        assert_eq!(j.hold_write(8, 0, 4), 0, "a copied cluster holds nothing");
        assert_eq!(j.bytes_written, 2048);
        assert!(!j.all_copied());
        j.cluster_copied(2, 0);
        assert!(j.all_copied());
    }

    #[test]
    fn stopping_frees_every_waiter_and_holds_no_more() {
        let mut j = CopyJob::new(1, 0, 8, 2);
        j.hold_write(1, 0, 1);
        j.hold_write(2, 0, 8);
        assert_eq!(j.stop(JobState::Cancelled, None), vec![1, 2]);
        assert_eq!(j.hold_write(3, 0, 8), 0);
        assert_eq!(j.state, JobState::Cancelled);
    }
}
