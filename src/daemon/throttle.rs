//! I/O limits: token buckets for IOPS and bytes per second, each for
//! reads, writes or both (`serve --throttle-iops/--throttle-bps`, the
//! control socket's `set-throttle`). A request over the limit is delayed,
//! never failed: the worker keeps it and submits it when its buckets allow
//! (`worker.rs`), sleeping in epoll until then. Time is passed in, so the
//! arithmetic is tested without clocks.
//!
//! A bucket holds up to `burst` tokens and gains `rate` per second. A
//! request is admitted when each of its buckets holds its cost, and takes
//! it from each. A request costing more than the burst is admitted when
//! the bucket is full and puts it in debt, which the next request waits
//! out: large requests get through, at the rate.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    Iops,
    Bps,
}

/// Which requests a limit applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Read,
    Write,
    /// Reads and writes together.
    Total,
}

/// One limit: `rate` per second, up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limit {
    pub unit: Unit,
    pub direction: Direction,
    pub rate: u64,
    pub burst: u64,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum LimitError {
    #[error("{0:?}: expected [read=|write=|total=]RATE[:BURST]")]
    Syntax(String),
    #[error("{0:?}: the rate must be a positive number")]
    Rate(String),
    #[error("{0:?}: the burst must be at least 1")]
    Burst(String),
    #[error("two {unit:?} limits for {direction:?}")]
    Duplicate { unit: Unit, direction: Direction },
}

/// A count with an optional K/M/G/T suffix (powers of 1024).
fn parse_count(s: &str) -> Option<u64> {
    let (digits, mult) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 1u64 << 10),
        (i, 'm' | 'M') => (&s[..i], 1 << 20),
        (i, 'g' | 'G') => (&s[..i], 1 << 30),
        (i, 't' | 'T') => (&s[..i], 1 << 40),
        _ => (s, 1),
    };
    digits.parse::<u64>().ok()?.checked_mul(mult)
}

impl Limit {
    /// Parses `[read=|write=|total=]RATE[:BURST]` (RATE and BURST may have
    /// a K/M/G/T suffix); the burst defaults to one second's worth.
    pub fn parse(unit: Unit, s: &str) -> Result<Limit, LimitError> {
        let (direction, rest) = match s.split_once('=') {
            None => (Direction::Total, s),
            Some(("read", r)) => (Direction::Read, r),
            Some(("write", r)) => (Direction::Write, r),
            Some(("total", r)) => (Direction::Total, r),
            Some(_) => return Err(LimitError::Syntax(s.into())),
        };
        let (rate, burst) = match rest.split_once(':') {
            None => (rest, None),
            Some((r, b)) => (r, Some(b)),
        };
        let rate = parse_count(rate)
            .filter(|r| *r > 0)
            .ok_or_else(|| LimitError::Rate(s.into()))?;
        let burst = match burst {
            None => rate,
            Some(b) => parse_count(b)
                .filter(|b| *b > 0)
                .ok_or_else(|| LimitError::Burst(s.into()))?,
        };
        Ok(Limit {
            unit,
            direction,
            rate,
            burst,
        })
    }
}

/// Checks that no two limits count the same thing for the same requests.
pub fn validate(limits: &[Limit]) -> Result<(), LimitError> {
    for (i, a) in limits.iter().enumerate() {
        if limits[..i]
            .iter()
            .any(|b| b.unit == a.unit && b.direction == a.direction)
        {
            return Err(LimitError::Duplicate {
                unit: a.unit,
                direction: a.direction,
            });
        }
    }
    Ok(())
}

/// What a request costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Charge {
    pub reads: u64,
    pub writes: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
}

impl Charge {
    pub fn is_free(&self) -> bool {
        self.reads == 0 && self.writes == 0
    }

    fn cost(&self, l: &Limit) -> u64 {
        let (r, w) = match l.unit {
            Unit::Iops => (self.reads, self.writes),
            Unit::Bps => (self.read_bytes, self.write_bytes),
        };
        match l.direction {
            Direction::Read => r,
            Direction::Write => w,
            Direction::Total => r + w,
        }
    }
}

/// Tokens are counted in billionths, so that a nanosecond at `rate` per
/// second adds exactly `rate` of them: no rounding anywhere.
const NANO: i128 = 1_000_000_000;

struct Bucket {
    limit: Limit,
    /// Billionths of a token, negative while in debt.
    level: i128,
    last: Instant,
}

impl Bucket {
    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_nanos();
        self.last = self.last.max(now);
        let gained = i128::try_from(dt)
            .unwrap_or(i128::MAX)
            .saturating_mul(i128::from(self.limit.rate));
        self.level = self
            .level
            .saturating_add(gained)
            .min(i128::from(self.limit.burst) * NANO);
    }

    /// What must be in the bucket to admit `cost`.
    fn needed(&self, cost: u64) -> i128 {
        i128::from(cost.min(self.limit.burst)) * NANO
    }

    /// How long until the bucket holds `needed`.
    fn wait(&self, needed: i128) -> Duration {
        let short = (needed - self.level).max(0);
        let ns = short.div_euclid(i128::from(self.limit.rate))
            + i128::from(short % i128::from(self.limit.rate) != 0);
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }
}

/// The buckets of one set of limits.
pub struct Buckets {
    buckets: Vec<Bucket>,
}

impl Buckets {
    /// Full buckets at `now`.
    pub fn new(limits: &[Limit], now: Instant) -> Buckets {
        Buckets {
            buckets: limits
                .iter()
                .map(|&limit| Bucket {
                    limit,
                    level: i128::from(limit.burst) * NANO,
                    last: now,
                })
                .collect(),
        }
    }

    /// Admits a request costing `charge` at `now`, or says how long to wait
    /// before asking again.
    pub fn admit(&mut self, charge: &Charge, now: Instant) -> Result<(), Duration> {
        let mut wait = Duration::ZERO;
        for b in &mut self.buckets {
            let cost = charge.cost(&b.limit);
            if cost == 0 {
                continue;
            }
            b.refill(now);
            let needed = b.needed(cost);
            if b.level < needed {
                wait = wait.max(b.wait(needed));
            }
        }
        if !wait.is_zero() {
            // At least a millisecond: epoll's resolution.
            return Err(wait.max(Duration::from_millis(1)));
        }
        for b in &mut self.buckets {
            b.level -= i128::from(charge.cost(&b.limit)) * NANO;
        }
        Ok(())
    }

    pub fn limits(&self) -> Vec<Limit> {
        self.buckets.iter().map(|b| b.limit).collect()
    }
}

/// The device's limits, shared by its workers.
pub struct Throttle {
    /// Any limit set: without one, admission is a load.
    active: AtomicBool,
    buckets: Mutex<Buckets>,
}

impl Throttle {
    pub fn new(limits: &[Limit]) -> Throttle {
        Throttle {
            active: AtomicBool::new(!limits.is_empty()),
            buckets: Mutex::new(Buckets::new(limits, Instant::now())),
        }
    }

    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// Replaces every limit (none: no throttling); buckets start full.
    pub fn set(&self, limits: &[Limit]) {
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        *b = Buckets::new(limits, Instant::now());
        self.active.store(!limits.is_empty(), Ordering::Release);
    }

    pub fn limits(&self) -> Vec<Limit> {
        self.buckets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .limits()
    }

    /// Takes the bucket lock (a leaf: nothing is taken while it is held).
    pub fn admit(&self, charge: &Charge, now: Instant) -> Result<(), Duration> {
        if charge.is_free() || !self.is_active() {
            return Ok(());
        }
        self.buckets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(charge, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(bytes: u64) -> Charge {
        Charge {
            reads: 1,
            read_bytes: bytes,
            ..Charge::default()
        }
    }

    fn write(bytes: u64) -> Charge {
        Charge {
            writes: 1,
            write_bytes: bytes,
            ..Charge::default()
        }
    }

    #[test]
    fn limits_parse_with_direction_suffix_and_burst() {
        let l = Limit::parse(Unit::Iops, "500").unwrap();
        assert_eq!((l.direction, l.rate, l.burst), (Direction::Total, 500, 500));
        let l = Limit::parse(Unit::Bps, "read=10M:20M").unwrap();
        assert_eq!(
            (l.direction, l.rate, l.burst),
            (Direction::Read, 10 << 20, 20 << 20)
        );
        let l = Limit::parse(Unit::Iops, "write=1k").unwrap();
        assert_eq!((l.direction, l.rate), (Direction::Write, 1024));
        for bad in [
            "",
            "0",
            "x",
            "read=",
            "up=5",
            "5:0",
            "5:",
            "-1",
            "99999999999999999999",
        ] {
            assert!(Limit::parse(Unit::Iops, bad).is_err(), "{bad:?}");
        }
        let a = Limit::parse(Unit::Iops, "read=1").unwrap();
        let b = Limit::parse(Unit::Bps, "read=1").unwrap();
        assert!(validate(&[a, b]).is_ok());
        assert_eq!(
            validate(&[a, b, a]),
            Err(LimitError::Duplicate {
                unit: Unit::Iops,
                direction: Direction::Read
            })
        );
    }

    #[test]
    fn a_burst_goes_through_then_requests_wait_for_the_rate() {
        let t0 = Instant::now();
        let limit = Limit::parse(Unit::Iops, "100:10").unwrap();
        let mut b = Buckets::new(&[limit], t0);
        // Ten at once: the burst.
        for _ in 0..10 {
            assert_eq!(b.admit(&read(4096), t0), Ok(()));
        }
        let wait = b.admit(&read(4096), t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(10));
        // Refilled by exactly the debt: admitted.
        assert_eq!(b.admit(&read(4096), t0 + wait), Ok(()));
        // Over a long time the rate holds: 100 per second.
        let mut now = t0 + wait;
        let mut admitted = 0;
        while now < t0 + wait + Duration::from_secs(10) {
            match b.admit(&write(0), now) {
                Ok(()) => admitted += 1,
                Err(w) => now += w,
            }
        }
        assert!((999..=1001).contains(&admitted), "{admitted}");
    }

    #[test]
    fn directions_and_units_charge_only_their_requests() {
        let t0 = Instant::now();
        let reads = Limit::parse(Unit::Iops, "read=1:1").unwrap();
        let bytes = Limit::parse(Unit::Bps, "write=1000:1000").unwrap();
        let mut b = Buckets::new(&[reads, bytes], t0);
        assert_eq!(b.admit(&read(1 << 20), t0), Ok(()));
        assert_eq!(
            b.admit(&read(0), t0),
            Err(Duration::from_secs(1)),
            "second read within the second"
        );
        // Writes are not limited by the read IOPS bucket...
        assert_eq!(b.admit(&write(600), t0), Ok(()));
        // ...but by their bytes: 400 left, 500 wanted at 1000/s.
        assert_eq!(b.admit(&write(500), t0), Err(Duration::from_millis(100)));
        // Larger than the burst: waits for a full bucket, then goes into debt.
        let full = t0 + Duration::from_millis(600);
        assert_eq!(
            b.admit(&write(1500), full - Duration::from_millis(1)),
            Err(Duration::from_millis(1))
        );
        assert_eq!(b.admit(&write(1500), full), Ok(()));
        assert_eq!(b.admit(&write(1), full), Err(Duration::from_millis(501)));
        // A flush costs nothing anywhere.
        assert_eq!(b.admit(&Charge::default(), t0), Ok(()));
        // Time past the burst does not bank more than the burst.
        let later = t0 + Duration::from_secs(100);
        assert_eq!(b.admit(&read(0), later), Ok(()));
        assert!(b.admit(&read(0), later).is_err());
    }

    #[test]
    fn throttle_set_replaces_limits_and_none_turns_it_off() {
        let t = Throttle::new(&[]);
        assert!(!t.is_active());
        let now = Instant::now();
        assert_eq!(t.admit(&read(1), now), Ok(()));
        t.set(&[Limit::parse(Unit::Iops, "1:1").unwrap()]);
        assert!(t.is_active());
        assert_eq!(t.admit(&read(1), now), Ok(()));
        assert!(t.admit(&read(1), now).is_err());
        assert_eq!(t.limits().len(), 1);
        t.set(&[]);
        assert_eq!(t.admit(&read(1), now), Ok(()));
    }
}
