//! A set of `u64` numbers kept as sorted, disjoint, non-adjacent ranges:
//! what a sparse file's data regions look like, at a cost that follows the
//! number of regions, not their size.

use std::collections::BTreeMap;
use std::ops::Range;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    /// start -> end (exclusive); ranges neither overlap nor touch.
    ranges: BTreeMap<u64, u64>,
}

impl RangeSet {
    pub fn new() -> RangeSet {
        RangeSet::default()
    }

    pub fn contains(&self, n: u64) -> bool {
        self.ranges
            .range(..=n)
            .next_back()
            .is_some_and(|(_, &end)| n < end)
    }

    /// Adds `[r.start, r.end)`, merging with the ranges it overlaps or touches.
    pub fn insert(&mut self, r: Range<u64>) {
        if r.is_empty() {
            return;
        }
        let (mut start, mut end) = (r.start, r.end);
        // A range that starts at or before `start` may reach it.
        if let Some((&s, &e)) = self.ranges.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
            }
        }
        // Ranges starting inside the new one (or right at its end) join it.
        while let Some((&s, &e)) = self.ranges.range(start..=end).next() {
            self.ranges.remove(&s);
            end = end.max(e);
        }
        self.ranges.insert(start, end);
    }

    /// The ranges in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.ranges.iter().map(|(&s, &e)| s..e)
    }

    /// How many ranges (not numbers) the set holds.
    pub fn range_count(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn matches_a_model(ops in proptest::collection::vec((0u64..200, 0u64..20), 0..40)) {
            let mut set = RangeSet::new();
            let mut model = [false; 230];
            for (s, n) in ops {
                set.insert(s..s + n);
                for i in s..s + n {
                    model[crate::units::to_usize(i)] = true;
                }
            }
            for (i, &m) in model.iter().enumerate() {
                prop_assert_eq!(set.contains(i as u64), m, "at {}", i);
            }
            // Disjoint and non-adjacent: the ranges are the model's runs.
            let mut prev_end = None;
            for r in set.iter() {
                prop_assert!(r.start < r.end);
                if let Some(e) = prev_end {
                    prop_assert!(r.start > e);
                }
                prev_end = Some(r.end);
            }
        }
    }
}
