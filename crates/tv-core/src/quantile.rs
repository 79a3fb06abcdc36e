//! Exact quantiles by radix selection.
//!
//! Quantiles follow numpy's default ("linear"): position p/100 · (n − 1),
//! linear interpolation between the two order statistics around it. The
//! order statistics are found exactly, without sorting everything: one
//! histogram pass over the top 16 bits of an order-preserving integer key,
//! one pass gathering the few buckets that hold the wanted ranks, then a
//! selection inside each small bucket. Degenerate inputs (every value in a
//! handful of buckets) fall back to in-place selection on the buffer.

use rayon::prelude::*;

/// The quantile levels reported, in percent.
pub const LEVELS: [f64; 11] = [
    0.0, 1.0, 5.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 100.0,
];

/// A buffer element: f32 or f64 with an order-preserving 64-bit key.
pub trait Sample: Copy + Send + Sync + PartialOrd {
    fn to_f64(self) -> f64;
    /// A key whose unsigned order is the numeric order (NaN sorts last).
    fn key(self) -> u64;
}

impl Sample for f32 {
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    fn key(self) -> u64 {
        let b = self.to_bits();
        let k = if b & 0x8000_0000 != 0 {
            !b
        } else {
            b | 0x8000_0000
        };
        u64::from(k) << 32
    }
}

impl Sample for f64 {
    fn to_f64(self) -> f64 {
        self
    }
    fn key(self) -> u64 {
        let b = self.to_bits();
        if b & (1 << 63) != 0 {
            !b
        } else {
            b | (1 << 63)
        }
    }
}

/// numpy's linear interpolation between `a` and `b` at `t` in [0, 1].
pub fn lerp(a: f64, b: f64, t: f64) -> f64 {
    let diff = b - a;
    if t >= 0.5 {
        b - diff * (1.0 - t)
    } else {
        a + diff * t
    }
}

/// The quantiles at [`LEVELS`] of `values` (which is reordered). Empty input
/// gives NaN.
pub fn quantiles<T: Sample>(values: &mut [T]) -> [f64; LEVELS.len()] {
    let n = values.len();
    if n == 0 {
        return [f64::NAN; LEVELS.len()];
    }
    // Positions and the ranks they need.
    let positions: Vec<(usize, usize, f64)> = LEVELS
        .iter()
        .map(|p| {
            let pos = p / 100.0 * (n - 1) as f64;
            let lo = (pos.floor() as usize).min(n - 1);
            let hi = (lo + 1).min(n - 1);
            (lo, hi, pos - lo as f64)
        })
        .collect();
    let mut ranks: Vec<usize> = positions.iter().flat_map(|&(lo, hi, _)| [lo, hi]).collect();
    ranks.sort_unstable();
    ranks.dedup();
    let stats = order_statistics(values, &ranks);
    let at = |r: usize| stats[ranks.binary_search(&r).expect("rank selected")];
    let mut out = [0.0; LEVELS.len()];
    for (o, &(lo, hi, t)) in out.iter_mut().zip(&positions) {
        *o = lerp(at(lo), at(hi), t);
    }
    out
}

/// The values of the given ascending, distinct `ranks` (0-based) in sorted
/// order of `values`.
pub fn order_statistics<T: Sample>(values: &mut [T], ranks: &[usize]) -> Vec<f64> {
    let n = values.len();
    const BUCKETS: usize = 1 << 16;
    let bucket = |v: T| (v.key() >> 48) as usize;

    // Pass 1: histogram of the top 16 key bits.
    let hist = values
        .par_chunks(1 << 18)
        .map(|chunk| {
            let mut h = vec![0u32; BUCKETS];
            for &v in chunk {
                h[bucket(v)] += 1;
            }
            h
        })
        .reduce(
            || vec![0u32; BUCKETS],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                a
            },
        );

    // The bucket of each rank, and its rank within the bucket.
    let mut slot_of_bucket = vec![u8::MAX; BUCKETS];
    let mut slots: Vec<(usize, usize)> = Vec::new(); // (bucket, count)
    let mut wanted: Vec<(usize, usize)> = Vec::with_capacity(ranks.len()); // (slot, rank in bucket)
    let mut below = 0usize;
    let mut r = 0;
    for (b, &count) in hist.iter().enumerate() {
        let count = count as usize;
        while r < ranks.len() && ranks[r] < below + count {
            if slot_of_bucket[b] == u8::MAX {
                slot_of_bucket[b] = slots.len() as u8;
                slots.push((b, count));
            }
            wanted.push((slot_of_bucket[b] as usize, ranks[r] - below));
            r += 1;
        }
        below += count;
    }
    debug_assert_eq!(wanted.len(), ranks.len());

    let gathered: usize = slots.iter().map(|&(_, c)| c).sum();
    if gathered > n / 4 + (1 << 16) {
        return select_in_place(values, ranks);
    }

    // Pass 2: gather the wanted buckets.
    let mut groups: Vec<Vec<T>> = slots.iter().map(|&(_, c)| Vec::with_capacity(c)).collect();
    for &v in values.iter() {
        let s = slot_of_bucket[bucket(v)];
        if s != u8::MAX {
            groups[s as usize].push(v);
        }
    }
    // Selection within each bucket, ranks ascending.
    let mut out = Vec::with_capacity(ranks.len());
    let mut lo_in = vec![0usize; groups.len()];
    for &(slot, k) in &wanted {
        let g = &mut groups[slot];
        let lo = lo_in[slot];
        let (_, v, _) = g[lo..].select_nth_unstable_by(k - lo, |a, b| a.key().cmp(&b.key()));
        out.push(v.to_f64());
        lo_in[slot] = k + 1;
    }
    out
}

/// Sequential in-place selection, for inputs concentrated in few buckets.
fn select_in_place<T: Sample>(values: &mut [T], ranks: &[usize]) -> Vec<f64> {
    let (min, max) = values.iter().fold((u64::MAX, 0u64), |(lo, hi), v| {
        let k = v.key();
        (lo.min(k), hi.max(k))
    });
    if min == max {
        return vec![values[0].to_f64(); ranks.len()];
    }
    let mut out = Vec::with_capacity(ranks.len());
    let mut lo = 0;
    for &k in ranks {
        let (_, v, _) = values[lo..].select_nth_unstable_by(k - lo, |a, b| a.key().cmp(&b.key()));
        out.push(v.to_f64());
        lo = k + 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(values: &[f64]) -> Vec<f64> {
        let mut s = values.to_vec();
        s.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let n = s.len();
        LEVELS
            .iter()
            .map(|p| {
                let pos = p / 100.0 * (n - 1) as f64;
                let lo = pos.floor() as usize;
                let hi = (lo + 1).min(n - 1);
                lerp(s[lo], s[hi], pos - lo as f64)
            })
            .collect()
    }

    #[test]
    fn matches_a_full_sort_on_ties_small_and_skewed_inputs() {
        let cases: Vec<Vec<f64>> = vec![
            vec![3.0],
            vec![2.0, -1.0],
            vec![0.0; 1000],
            (0..1001).map(|i| ((i * 7919) % 13) as f64 - 6.0).collect(),
            (0..300_000)
                .map(|i| ((i as f64) * 0.618).sin() * 1e-3)
                .collect(),
            (0..200_000)
                .map(|i| if i % 3 == 0 { 0.0 } else { (i as f64).sqrt() })
                .collect(),
        ];
        for case in cases {
            let want = reference(&case);
            let mut v64 = case.clone();
            assert_eq!(quantiles(&mut v64).to_vec(), want);
            let mut v32: Vec<f32> = case.iter().map(|&x| x as f32).collect();
            let exact32: Vec<f64> = v32.iter().map(|&x| f64::from(x)).collect();
            assert_eq!(quantiles(&mut v32).to_vec(), reference(&exact32));
        }
    }

    #[test]
    fn keys_order_negative_zero_and_positive() {
        let xs = [-2.5f64, -1e-300, -0.0, 0.0, 1e-300, 7.0];
        for w in xs.windows(2) {
            assert!(w[0].key() <= w[1].key());
            assert!((w[0] as f32).key() <= (w[1] as f32).key());
        }
    }
}
