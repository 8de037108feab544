//! Where the requests go: each queue's share of the disk, the offset
//! generators, and the stamps of the data check.

use std::sync::Arc;

use crate::args::{Args, Pattern};

/// xorshift64*: fast, good enough to spread offsets.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        ((self.next() as u128 * n as u128) >> 64) as u64
    }
}

/// A pseudo-random bijection of [0, n): an invertible mixing function on
/// the smallest power of two >= n, walked until it lands inside [0, n).
pub struct Permutation {
    n: u64,
    bits: u32,
    mask: u64,
    keys: [u64; 3],
}

impl Permutation {
    pub fn new(n: u64, seed: u64) -> Self {
        let bits = (64 - n.saturating_sub(1).leading_zeros()).max(2);
        let mask = if bits == 64 {
            u64::MAX
        } else {
            (1 << bits) - 1
        };
        let mut r = Rng::new(seed ^ 0x5EED);
        Permutation {
            n,
            bits,
            mask,
            keys: [r.next(), r.next() | 1, r.next() | 1],
        }
    }
    fn mix(&self, mut x: u64) -> u64 {
        let m = self.mask;
        let sh = self.bits / 2 + 1;
        // Each step is a bijection on `bits`-bit values.
        x = (x ^ self.keys[0]) & m;
        x ^= x >> sh;
        x = x.wrapping_mul(self.keys[1]) & m;
        x ^= x >> sh;
        x = x.wrapping_mul(self.keys[2]) & m;
        x ^= x >> sh;
        x
    }
    pub fn get(&self, i: u64) -> u64 {
        let mut x = self.mix(i);
        while x >= self.n {
            x = self.mix(x);
        }
        x
    }
}

/// One queue's share of the work.
pub struct Share {
    pattern: Pattern,
    bs: u64,
    rwmixread: u32,
    /// Sequential patterns walk [area_start, area_end) and wrap.
    area_start: u64,
    area_end: u64,
    /// Random patterns draw block indexes from the whole span.
    blocks: u64,
    /// With --random-map: the permutation and this queue's share of it.
    perm: Option<Arc<Permutation>>,
    perm_range: (u64, u64),
    /// Stop issuing after this many bytes.
    io_limit: Option<u64>,
}

/// Splits `blocks` blocks of `args.bs` bytes over `args.queues` queues.
pub fn plan(args: &Args, blocks: u64) -> Vec<Share> {
    let queues = args.queues as u64;
    let slice = (blocks / queues).max(1) * args.bs;
    let random = !args.pattern.is_sequential();
    let perm = (random && args.random_map).then(|| Arc::new(Permutation::new(blocks, args.seed)));
    let share = |i: u64| blocks * i / queues;
    (0..queues)
        .map(|i| {
            let area_start = (i * slice).min((blocks - 1) * args.bs);
            Share {
                pattern: args.pattern,
                bs: args.bs,
                rwmixread: args.rwmixread,
                area_start,
                area_end: (area_start + slice).min(blocks * args.bs),
                blocks,
                perm: perm.clone(),
                perm_range: (share(i), share(i + 1)),
                io_limit: match (args.once, random) {
                    (false, _) => args.io_limit,
                    (true, true) => Some(
                        ((share(i + 1) - share(i)) * args.bs)
                            .min(args.io_limit.unwrap_or(u64::MAX)),
                    ),
                    (true, false) => Some(slice.min(args.io_limit.unwrap_or(u64::MAX))),
                },
            }
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub offset: u64,
    pub is_write: bool,
}

/// The requests of one queue, in order.
pub struct Workload {
    share: Share,
    rng: Rng,
    seq_pos: u64,
    perm_pos: u64,
    issued_bytes: u64,
}

impl Workload {
    pub fn new(share: Share, seed: u64) -> Self {
        Workload {
            rng: Rng::new(seed),
            seq_pos: share.area_start,
            perm_pos: share.perm_range.0,
            issued_bytes: 0,
            share,
        }
    }

    /// The next request, or None once the queue's byte limit is reached.
    pub fn next_request(&mut self) -> Option<Request> {
        let s = &self.share;
        if s.io_limit.is_some_and(|limit| self.issued_bytes >= limit) {
            return None;
        }
        let offset = if s.pattern.is_sequential() {
            if self.seq_pos + s.bs > s.area_end {
                self.seq_pos = s.area_start;
            }
            let o = self.seq_pos;
            self.seq_pos += s.bs;
            o
        } else {
            match &s.perm {
                Some(p) => {
                    if self.perm_pos >= s.perm_range.1 {
                        self.perm_pos = s.perm_range.0;
                    }
                    let b = p.get(self.perm_pos);
                    self.perm_pos += 1;
                    b * s.bs
                }
                None => self.rng.below(s.blocks) * s.bs,
            }
        };
        let is_write = match s.pattern {
            Pattern::Randread | Pattern::Read => false,
            Pattern::Randwrite | Pattern::Write => true,
            Pattern::Randrw => self.rng.below(100) >= s.rwmixread as u64,
        };
        self.issued_bytes += s.bs;
        Some(Request { offset, is_write })
    }
}

/// Puts the stamp for (`offset`, `tag`) at the start of every 512-byte
/// sector of `buf`, a block to be written at `offset`.
pub fn stamp(buf: &mut [u8], offset: u64, tag: u64) {
    for (i, sector) in buf.chunks_exact_mut(512).enumerate() {
        sector[..8].copy_from_slice(&(offset + i as u64 * 512).to_le_bytes());
        sector[8..16].copy_from_slice(&tag.to_le_bytes());
    }
}

/// Checks the stamps of `buf`, a block read at `offset`.
pub fn check_stamps(buf: &[u8], offset: u64, tag: u64) -> Option<String> {
    for (i, sector) in buf.chunks_exact(512).enumerate() {
        let want = offset + i as u64 * 512;
        let got_off = u64::from_le_bytes(sector[..8].try_into().unwrap());
        let got_tag = u64::from_le_bytes(sector[8..16].try_into().unwrap());
        if got_off != want || got_tag != tag {
            return Some(format!(
                "data check: sector at byte {want} holds the stamp of byte {got_off:#x} \
                 tag {got_tag:#x}, expected tag {tag:#x}"
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::to_usize;
    use clap::Parser;

    #[test]
    fn permutation_is_a_bijection() {
        for n in [1u64, 2, 3, 5, 64, 1000, 1024, 1025, 65_537] {
            for seed in [1u64, 7, 12345] {
                let p = Permutation::new(n, seed);
                let mut seen = vec![false; to_usize(n)];
                for i in 0..n {
                    let x = p.get(i);
                    assert!(x < n);
                    assert!(!seen[to_usize(x)], "n={n} seed={seed}: {x} twice");
                    seen[to_usize(x)] = true;
                }
            }
        }
    }

    fn args(extra: &[&str]) -> Args {
        Args::try_parse_from(["load", "--socket", "s"].iter().chain(extra)).unwrap()
    }

    /// Every request of every queue until they stop, as block indexes.
    fn walk(a: &Args, blocks: u64) -> Vec<Vec<u64>> {
        plan(a, blocks)
            .into_iter()
            .map(|s| {
                let mut w = Workload::new(s, 1);
                std::iter::from_fn(|| w.next_request())
                    .map(|r| {
                        assert_eq!(r.offset % a.bs, 0, "unaligned");
                        r.offset / a.bs
                    })
                    .collect()
            })
            .collect()
    }

    /// --once covers every block exactly once, each queue its own share
    /// (a data check that reads with --once relies on it).
    #[test]
    fn once_covers_every_block_once() {
        for (pattern, queues, blocks) in [
            ("randwrite", "3", 1000u64),
            ("randread", "1", 17),
            ("write", "2", 64),
            ("read", "4", 1024),
        ] {
            let a = args(&[
                "--pattern",
                pattern,
                "--queues",
                queues,
                "--bs",
                "1k",
                "--once",
                "--random-map",
            ]);
            let per_queue = walk(&a, blocks);
            let mut all: Vec<u64> = per_queue.concat();
            all.sort_unstable();
            assert_eq!(all, (0..blocks).collect::<Vec<_>>(), "{pattern} {queues}");
            if pattern.starts_with("rand") {
                assert!(
                    per_queue
                        .iter()
                        .any(|q| q.windows(2).any(|w| w[1] != w[0] + 1)),
                    "{pattern}: a random map in sequential order"
                );
            }
        }
    }

    #[test]
    fn io_limit_and_read_mix() {
        let a = args(&[
            "--pattern",
            "randrw",
            "--io-limit",
            "400k",
            "--rwmixread",
            "70",
        ]);
        let mut w = Workload::new(plan(&a, 1 << 20).pop().unwrap(), 9);
        let reqs: Vec<Request> = std::iter::from_fn(|| w.next_request()).collect();
        assert_eq!(reqs.len(), 100, "400k in 4k requests");
        let reads = reqs.iter().filter(|r| !r.is_write).count();
        assert!((50..=90).contains(&reads), "{reads} reads of 100 at 70%");
    }

    #[test]
    fn stamps_round_trip() {
        let mut buf = vec![0u8; 2048];
        stamp(&mut buf, 4096, 77);
        assert_eq!(check_stamps(&buf, 4096, 77), None);
        assert!(check_stamps(&buf, 4096, 78).is_some(), "wrong tag");
        assert!(check_stamps(&buf, 0, 77).is_some(), "wrong offset");
        buf[1024] ^= 1;
        assert!(check_stamps(&buf, 4096, 77).is_some(), "third sector");
    }
}
