//! Tests of the in-flight area: the layout against the vhost crate's
//! structures, every interleaving of take / publish / crash on a small
//! queue (crashes also in the middle of a publish), and hostile regions.

use super::*;
use vhost::vhost_user::message::{DescStateSplit, QueueRegionSplit};

const Q: u16 = 4;

fn area(num_queues: u16, queue_size: u16) -> Arc<InflightArea> {
    Arc::new(InflightArea::create(num_queues, queue_size, 16, 1024).unwrap())
}

fn bytes(a: &InflightArea) -> Vec<u8> {
    let s = a.map.as_volatile_slice();
    let mut v = vec![0u8; s.len()];
    s.read_slice(&mut v, 0).unwrap();
    v
}

fn restore(a: &InflightArea, v: &[u8]) {
    a.map.as_volatile_slice().write_slice(v, 0).unwrap();
}

fn poke_u8(a: &InflightArea, off: usize, v: u8) {
    a.map.as_volatile_slice().write_obj(v, off).unwrap();
}

fn poke_u16(a: &InflightArea, off: usize, v: u16) {
    a.map.as_volatile_slice().write_obj(v.to_le(), off).unwrap();
}

fn reopen(a: &InflightArea) -> Arc<InflightArea> {
    Arc::new(InflightArea::open(a.file().unwrap(), a.layout(), 16, 1024).unwrap())
}

#[test]
fn layout_matches_the_vhost_crates_structures() {
    assert_eq!(std::mem::size_of::<DescStateSplit>(), DESC);
    // QueueRegionSplit ends with a u64 standing for the descriptor array.
    assert_eq!(std::mem::size_of::<QueueRegionSplit>() - 8, HEADER);
    assert_eq!(queue_region_size(1), 64);
    assert_eq!(queue_region_size(4), 128);
    assert_eq!(queue_region_size(256), 4160);
    let a = area(3, 256);
    assert_eq!(a.layout().mmap_size, 3 * 4160);
    assert_eq!(a.layout().mmap_offset, 0);
    assert!(a.queue(2).is_some() && a.queue(3).is_none());
}

#[test]
fn a_fresh_region_starts_empty_and_keeps_the_frontends_base() {
    let a = area(1, Q);
    let mut q = a.queue(0).unwrap();
    let r = q.recover(Q, 7, 9).unwrap();
    assert_eq!(
        r,
        Recovered {
            in_flight: 0,
            next_avail: None,
            repaired: false
        }
    );
    // Now initialized: a second start finds it consistent and empty.
    let r = a.queue(0).unwrap().recover(Q, 7, 9).unwrap();
    assert_eq!(r.next_avail, Some(7));
    assert_eq!(r.in_flight, 0);
    assert!(!r.repaired);
}

/// The model of one queue between crashes.
#[derive(Clone)]
struct Model {
    /// Heads the guest may make available.
    free: Vec<u16>,
    /// Heads in avail-ring order.
    avail: Vec<u16>,
    /// Avail-ring entries the daemon took (its next avail index).
    taken: usize,
    /// Taken and not published, in take order.
    in_flight: Vec<u16>,
    /// The ring's used index.
    used: u16,
}

#[derive(Clone, Copy, Debug)]
enum Step {
    MakeAvailable,
    Take,
    /// Publish the n-th request in flight.
    Publish(usize),
    /// A crash in the middle of publishing the n-th request: after
    /// `before_used`, after the ring update, after the mark was cleared.
    TornPublish(usize, u8),
    Crash,
}

struct World {
    area: Arc<InflightArea>,
    q: QueueInflight,
    m: Model,
}

impl World {
    fn restart(&mut self, torn: Option<(u16, u8)>) {
        let area = reopen(&self.area);
        let mut q = area.queue(0).unwrap();
        let avail = u16::try_from(self.m.avail.len()).unwrap();
        let r = q.recover(Q, self.m.used, avail).unwrap();
        let expect_repaired = matches!(torn, Some((_, 1 | 2)));
        assert_eq!(r.repaired, expect_repaired, "repaired after {torn:?}");
        assert_eq!(usize::from(r.in_flight), self.m.in_flight.len());
        let next = r.next_avail.unwrap();
        assert_eq!(usize::from(next), self.m.taken, "next avail");
        let mut got = Vec::new();
        while let Some(h) = q.next_resubmit() {
            got.push(h);
        }
        assert_eq!(got, self.m.in_flight, "resubmitted oldest first");
        // The daemon resubmits them: they stay in flight, in that order.
        self.q = q;
        self.area = area;
    }

    fn apply(&mut self, s: Step) -> bool {
        let m = &mut self.m;
        match s {
            Step::MakeAvailable => {
                let Some(h) = m.free.pop() else { return false };
                m.avail.push(h);
            }
            Step::Take => {
                if m.taken == m.avail.len() {
                    return false;
                }
                let h = m.avail[m.taken];
                m.taken += 1;
                self.q.mark(h);
                m.in_flight.push(h);
            }
            Step::Publish(n) => {
                if n >= m.in_flight.len() {
                    return false;
                }
                let h = m.in_flight.remove(n);
                self.q.before_used(h);
                m.used = m.used.wrapping_add(1);
                self.q.after_used(h, m.used);
                m.free.push(h);
            }
            Step::TornPublish(n, at) => {
                if n >= m.in_flight.len() {
                    return false;
                }
                let h = m.in_flight[n];
                self.q.before_used(h);
                if at >= 1 {
                    // The used element reached the ring: published.
                    m.in_flight.remove(n);
                    m.used = m.used.wrapping_add(1);
                    m.free.push(h);
                }
                if at >= 2 {
                    self.q.clear(h);
                }
                self.restart(Some((h, at)));
            }
            Step::Crash => self.restart(None),
        }
        true
    }
}

fn explore(w: &mut World, depth: usize, count: &mut usize) {
    *count += 1;
    if depth == 0 {
        return;
    }
    let mut steps = vec![Step::MakeAvailable, Step::Take, Step::Crash];
    for n in 0..usize::from(Q) {
        steps.push(Step::Publish(n));
        for at in 0..3 {
            steps.push(Step::TornPublish(n, at));
        }
    }
    for s in steps {
        let snapshot = bytes(&w.area);
        let (m, area) = (w.m.clone(), w.area.clone());
        let (counter, resubmit) = (w.q.counter, w.q.resubmit.clone());
        if w.apply(s) {
            explore(w, depth - 1, count);
        }
        w.area = area;
        restore(&w.area, &snapshot);
        w.q = w.area.queue(0).unwrap();
        w.q.counter = counter;
        w.q.resubmit = resubmit;
        w.m = m;
    }
}

/// Every interleaving of up to 9 steps on a 4-entry queue whose head
/// numbers are reused: after any crash, the requests resubmitted are
/// exactly those taken and not published, oldest first, and the ring
/// continues after the last one taken.
#[test]
fn every_crash_resubmits_exactly_the_unpublished_requests_in_order() {
    let area = area(1, Q);
    let mut q = area.queue(0).unwrap();
    q.recover(Q, 0, 0).unwrap();
    let mut w = World {
        area,
        q,
        m: Model {
            free: (0..Q).rev().collect(),
            avail: Vec::new(),
            taken: 0,
            in_flight: Vec::new(),
            used: 0,
        },
    };
    let mut count = 0;
    explore(&mut w, 9, &mut count);
    assert!(count > 200_000, "only {count} states explored");
}

#[test]
fn indices_wrap_around() {
    let a = area(1, Q);
    let mut q = a.queue(0).unwrap();
    q.recover(Q, u16::MAX - 1, u16::MAX - 1).unwrap();
    q.mark(2);
    q.mark(0);
    q.before_used(2);
    q.after_used(2, u16::MAX);
    q.mark(1);
    // avail 0xfffe.. taken 3 (wraps to 1), used 0xffff
    let r = reopen(&a)
        .queue(0)
        .unwrap()
        .recover(Q, u16::MAX, 1)
        .unwrap();
    assert_eq!(r.in_flight, 2);
    assert_eq!(r.next_avail, Some(1));
}

#[test]
fn equal_counters_resubmit_in_head_order() {
    let a = area(1, Q);
    let mut q = a.queue(0).unwrap();
    q.recover(Q, 0, 0).unwrap();
    for h in [3, 1, 2] {
        q.mark(h);
    }
    for h in 0..Q {
        let off = q.desc(h) + OFF_COUNTER;
        a.map.as_volatile_slice().write_obj(5u64, off).unwrap();
    }
    let mut q = a.queue(0).unwrap();
    q.recover(Q, 0, 3).unwrap();
    let got: Vec<u16> = std::iter::from_fn(|| q.next_resubmit()).collect();
    assert_eq!(got, vec![1, 2, 3]);
}

fn started(queue_size: u16) -> Arc<InflightArea> {
    let a = area(2, queue_size);
    for i in 0..2 {
        a.queue(i).unwrap().recover(queue_size, 0, 0).unwrap();
    }
    a
}

#[test]
fn hostile_region_contents_are_refused_without_changes() {
    type Poke = fn(&InflightArea, &QueueInflight);
    let cases: [(&str, Poke); 5] = [
        ("version", |a, q| poke_u16(a, q.base + OFF_VERSION, 7)),
        ("desc_num", |a, q| poke_u16(a, q.base + OFF_DESC_NUM, 8)),
        ("last batch head", |a, q| {
            poke_u16(a, q.base + OFF_LAST_BATCH_HEAD, Q)
        }),
        ("state", |a, q| poke_u8(a, q.desc(3) + OFF_INFLIGHT, 0x80)),
        ("all marked", |a, q| {
            for h in 0..Q {
                poke_u8(a, q.desc(h) + OFF_INFLIGHT, 1);
            }
        }),
    ];
    for (what, poke) in cases {
        let a = started(Q);
        let q = a.queue(1).unwrap();
        poke(&a, &q);
        let before = bytes(&a);
        let mut q = a.queue(1).unwrap();
        // Two requests made available, none used: four marked is too many.
        let e = q.recover(Q, 0, 2).expect_err(what);
        let msg = e.to_string();
        assert!(msg.starts_with("queue 1: "), "{what}: {msg}");
        assert_eq!(bytes(&a), before, "{what}: the region was changed");
        assert_eq!(q.resubmit_pending(), 0);
        // The other queue's region is still fine.
        assert!(a.queue(0).unwrap().recover(Q, 0, 0).is_ok());
        if what != "all marked" {
            assert!(a.check().is_err(), "{what}: SET_INFLIGHT_FD's check");
        }
    }
}

#[test]
fn a_ring_of_another_size_is_refused() {
    let a = started(Q);
    let e = a.queue(0).unwrap().recover(8, 0, 0).unwrap_err();
    assert!(
        matches!(
            e,
            InflightError::RingSizeMismatch {
                ring: 8,
                region: 4,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn hostile_layouts_are_refused() {
    let a = area(2, Q);
    let good = a.layout();
    let open = |layout: Layout| InflightArea::open(a.file().unwrap(), layout, 16, 1024);
    let cases = [
        (
            "too small",
            Layout {
                mmap_size: good.mmap_size - 1,
                ..good
            },
        ),
        (
            "past the end",
            Layout {
                mmap_offset: 4096,
                ..good
            },
        ),
        (
            "offset overflow",
            Layout {
                mmap_offset: u64::MAX - 10,
                ..good
            },
        ),
        (
            "more queues than the file",
            Layout {
                num_queues: 3,
                mmap_size: 3 * good.mmap_size,
                ..good
            },
        ),
        (
            "too many queues",
            Layout {
                num_queues: 17,
                ..good
            },
        ),
        (
            "queue size 0",
            Layout {
                queue_size: 0,
                ..good
            },
        ),
        (
            "queue size 3",
            Layout {
                queue_size: 3,
                ..good
            },
        ),
        (
            "queue size too big",
            Layout {
                queue_size: 2048,
                ..good
            },
        ),
    ];
    for (what, layout) in cases {
        let e = open(layout)
            .err()
            .unwrap_or_else(|| panic!("{what}: accepted"));
        assert!(e.to_string().starts_with("in-flight area"), "{what}: {e}");
    }
    // A larger mmap_size than needed is fine (only what is needed is mapped).
    assert!(open(Layout {
        mmap_size: good.mmap_size + 100,
        ..good
    })
    .is_ok());
}

#[test]
fn a_file_that_could_shrink_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("inflight");
    let f = File::create(&path).unwrap();
    f.set_len(4096).unwrap();
    let layout = Layout {
        mmap_size: 4096,
        mmap_offset: 0,
        num_queues: 1,
        queue_size: 4,
    };
    let e = InflightArea::open(f, layout, 16, 1024).err().unwrap();
    assert!(matches!(e, InflightError::NotSealed(_)), "{e}");
}

#[test]
fn marks_out_of_range_heads_are_ignored() {
    let a = area(1, Q);
    let mut q = a.queue(0).unwrap();
    q.recover(Q, 0, 0).unwrap();
    let before = bytes(&a);
    q.mark(Q);
    q.before_used(u16::MAX);
    q.clear(Q);
    assert_eq!(bytes(&a), before);
}
