//! Per-queue request counters and latency histograms, kept by the worker
//! threads with relaxed atomic adds (each queue is served by one thread,
//! so the adds do not contend) and read by the control socket's
//! `query-stats`. Latency is from the sweep that took a request off its
//! ring to the batch that published it: one clock read per sweep and per
//! batch, not per request.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::Serialize;

use crate::units::to_usize;

/// Sub-buckets per power of two: latencies are kept to within 1/8.
const SUB_BITS: u32 = 3;
const SUB: u64 = 1 << SUB_BITS;
/// Longest latency told apart: 2^40 ns (18 minutes); longer ones are
/// counted in the last bucket.
const MAX_BITS: u32 = 40;
/// Exact below 2 * SUB, then SUB per power of two, then one for the rest.
const BUCKETS: usize = to_usize(SUB * 2 + (MAX_BITS as u64 - SUB_BITS as u64 - 1) * SUB + 1);

/// A log-linear histogram of nanoseconds.
pub struct Histogram {
    buckets: Box<[AtomicU64]>,
    max: AtomicU64,
}

fn bucket_of(ns: u64) -> usize {
    if ns < 2 * SUB {
        return to_usize(ns);
    }
    let msb = 63 - ns.leading_zeros();
    if msb >= MAX_BITS {
        return BUCKETS - 1;
    }
    let sub = (ns >> (msb - SUB_BITS)) & (SUB - 1);
    to_usize(2 * SUB + u64::from(msb - SUB_BITS - 1) * SUB + sub)
}

/// The largest value that falls in bucket `i`.
fn bucket_top(i: usize) -> u64 {
    let i = i as u64;
    if i < 2 * SUB {
        return i;
    }
    let octave = (i - 2 * SUB) / SUB + u64::from(SUB_BITS) + 1;
    let sub = (i - 2 * SUB) % SUB;
    let step = 1u64 << (octave - u64::from(SUB_BITS));
    (1u64 << octave) + (sub + 1) * step - 1
}

/// Percentiles of one histogram, in microseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl Default for Histogram {
    fn default() -> Histogram {
        Histogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            max: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn record(&self, ns: u64) {
        self.buckets[bucket_of(ns)].fetch_add(1, Relaxed);
        self.max.fetch_max(ns, Relaxed);
    }

    fn counts(&self) -> Vec<u64> {
        self.buckets.iter().map(|b| b.load(Relaxed)).collect()
    }

    /// Percentiles of the sum of `hists` (a queue's own, or all queues').
    pub fn summarise<'a>(hists: impl IntoIterator<Item = &'a Histogram>) -> Latency {
        let mut counts = vec![0u64; BUCKETS];
        let mut max = 0;
        for h in hists {
            for (c, n) in counts.iter_mut().zip(h.counts()) {
                *c += n;
            }
            max = max.max(h.max.load(Relaxed));
        }
        let total: u64 = counts.iter().sum();
        let us = |ns: u64| ns as f64 / 1000.0;
        let at = |per_100k: u128| -> f64 {
            // The smallest bucket top with at least that share of the
            // samples at or below it (never above the largest sample seen).
            let want = (u128::from(total) * per_100k).div_ceil(100_000).max(1);
            let mut seen = 0u128;
            for (i, c) in counts.iter().enumerate() {
                seen += u128::from(*c);
                if seen >= want {
                    return us(bucket_top(i).min(max));
                }
            }
            us(max)
        };
        if total == 0 {
            return Latency::default();
        }
        Latency {
            count: total,
            p50_us: at(50_000),
            p90_us: at(90_000),
            p99_us: at(99_000),
            p999_us: at(99_900),
            max_us: us(max),
        }
    }
}

/// What a finished request counts as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Read,
    Write,
    Flush,
    /// Discard, write-zeroes, get-id, refused types.
    Other,
}

/// One queue's counters.
#[derive(Default)]
pub struct QueueStats {
    /// Requests taken off the ring; those not yet finished are in flight.
    pub taken: AtomicU64,
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub others: AtomicU64,
    pub errors: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub read_latency: Histogram,
    pub write_latency: Histogram,
    pub flush_latency: Histogram,
}

impl QueueStats {
    /// Counts a request taken off the ring (it finishes with `finished`).
    pub fn taken(&self) {
        self.taken.fetch_add(1, Relaxed);
    }

    /// Counts a finished request of `bytes` that took `ns`.
    pub fn finished(&self, kind: Kind, ok: bool, bytes: u64, ns: u64) {
        if !ok {
            self.errors.fetch_add(1, Relaxed);
        }
        match kind {
            Kind::Read => {
                self.reads.fetch_add(1, Relaxed);
                self.bytes_read.fetch_add(bytes, Relaxed);
                self.read_latency.record(ns);
            }
            Kind::Write => {
                self.writes.fetch_add(1, Relaxed);
                self.bytes_written.fetch_add(bytes, Relaxed);
                self.write_latency.record(ns);
            }
            Kind::Flush => {
                self.flushes.fetch_add(1, Relaxed);
                self.flush_latency.record(ns);
            }
            Kind::Other => {
                self.others.fetch_add(1, Relaxed);
            }
        }
    }
}

/// A snapshot of some queues' counters.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct QueueSnapshot {
    /// Taken off the ring and not yet finished.
    pub in_flight: u64,
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub others: u64,
    pub errors: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub read_latency: Latency,
    pub write_latency: Latency,
    pub flush_latency: Latency,
}

/// Every queue's counters.
pub struct RequestStats {
    queues: Box<[QueueStats]>,
}

impl RequestStats {
    pub fn new(queues: usize) -> RequestStats {
        RequestStats {
            queues: (0..queues).map(|_| QueueStats::default()).collect(),
        }
    }

    /// A queue's counters; a ring index past the end (not possible for a
    /// ring the protocol accepted) shares the last queue's.
    pub fn queue(&self, ring: u16) -> &QueueStats {
        let i = usize::from(ring).min(self.queues.len().saturating_sub(1));
        &self.queues[i]
    }

    pub fn len(&self) -> usize {
        self.queues.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queues.is_empty()
    }

    /// The sum of the given queues (all of them for the total).
    pub fn snapshot(&self, which: impl Iterator<Item = usize> + Clone) -> QueueSnapshot {
        let qs: Vec<&QueueStats> = which.filter_map(|i| self.queues.get(i)).collect();
        let sum = |f: fn(&QueueStats) -> &AtomicU64| qs.iter().map(|q| f(q).load(Relaxed)).sum();
        let reads = sum(|q| &q.reads);
        let writes = sum(|q| &q.writes);
        let flushes = sum(|q| &q.flushes);
        let others = sum(|q| &q.others);
        // Loaded after the finished counts, so never below them: a request
        // is counted taken before it can finish.
        let taken: u64 = sum(|q| &q.taken);
        QueueSnapshot {
            in_flight: taken.saturating_sub(reads + writes + flushes + others),
            reads,
            writes,
            flushes,
            others,
            errors: sum(|q| &q.errors),
            bytes_read: sum(|q| &q.bytes_read),
            bytes_written: sum(|q| &q.bytes_written),
            read_latency: Histogram::summarise(qs.iter().map(|q| &q.read_latency)),
            write_latency: Histogram::summarise(qs.iter().map(|q| &q.write_latency)),
            flush_latency: Histogram::summarise(qs.iter().map(|q| &q.flush_latency)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_falls_in_a_bucket_whose_top_is_at_least_it_and_within_an_eighth() {
        let mut samples: Vec<u64> = (0..5000).collect();
        for shift in 0u32..45 {
            for d in [0u64, 1, 3, 7] {
                samples.push((1u64 << shift).saturating_add(d << shift.saturating_sub(3)));
                samples.push((1u64 << shift).saturating_sub(1));
            }
        }
        let mut last = 0;
        for ns in samples {
            let b = bucket_of(ns);
            assert!(b < BUCKETS, "{ns}");
            if ns < 1 << MAX_BITS {
                let top = bucket_top(b);
                assert!(top >= ns, "{ns} in bucket {b} with top {top}");
                assert!(top - ns <= ns / 8, "{ns}: bucket top {top} too far");
                if b > 0 {
                    assert!(bucket_top(b - 1) < ns, "{ns}: belongs in a lower bucket");
                }
            }
            last = last.max(b);
        }
        assert_eq!(last, BUCKETS - 1);
    }

    #[test]
    fn percentiles_of_known_samples() {
        let h = Histogram::default();
        assert_eq!(Histogram::summarise([&h]), Latency::default());
        for i in 1..=1000u64 {
            h.record(i * 1000); // 1..1000 µs
        }
        let l = Histogram::summarise([&h]);
        assert_eq!(l.count, 1000);
        assert!((500.0..=500.0 * 1.125).contains(&l.p50_us), "{l:?}");
        assert!((990.0..=1000.0).contains(&l.p99_us), "{l:?}");
        assert_eq!(l.max_us, 1000.0);
        assert!(l.p50_us <= l.p90_us && l.p90_us <= l.p99_us && l.p99_us <= l.p999_us);
    }

    #[test]
    fn snapshots_sum_the_chosen_queues() {
        let s = RequestStats::new(3);
        s.queue(0).finished(Kind::Read, true, 4096, 10_000);
        s.queue(1).finished(Kind::Write, false, 512, 20_000);
        s.queue(2).finished(Kind::Flush, true, 0, 30_000);
        s.queue(2).finished(Kind::Other, true, 0, 1);
        let all = s.snapshot(0..3);
        assert_eq!(
            (all.reads, all.writes, all.flushes, all.others),
            (1, 1, 1, 1)
        );
        assert_eq!(
            (all.bytes_read, all.bytes_written, all.errors),
            (4096, 512, 1)
        );
        assert_eq!(all.write_latency.count, 1);
        let one = s.snapshot(1..2);
        assert_eq!((one.reads, one.writes), (0, 1));
        assert_eq!(one.read_latency, Latency::default());
    }

    #[test]
    fn requests_taken_and_not_finished_are_in_flight() {
        let s = RequestStats::new(2);
        for _ in 0..3 {
            s.queue(0).taken();
        }
        s.queue(1).taken();
        s.queue(0).finished(Kind::Read, true, 4096, 1);
        s.queue(1).finished(Kind::Other, false, 0, 1);
        assert_eq!(s.snapshot(0..1).in_flight, 2);
        assert_eq!(s.snapshot(1..2).in_flight, 0);
        assert_eq!(s.snapshot(0..2).in_flight, 2);
    }
}
