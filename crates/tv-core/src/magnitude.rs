//! Histograms of task-vector magnitudes |d|, and the energy trimming keeps.
//!
//! An entry's bucket is the bits of |d| as an f64 shifted right by
//! [`SHIFT`]: the 11 exponent bits and the top 10 mantissa bits of the key
//! the merge's selection ranks entries by (`methods::select`). A bucket [lo, hi) spans at most 2^-10 of its
//! own values (hi ≤ lo · (1 + 2^-10)), so counting each of its entries as
//! (lo² + hi²)/2 is within (2^-10 + 2^-21) · d² of the entry's own d²: the
//! energy of any set of entries estimated from bucket counts is within
//! [`ENERGY_BOUND`] of its true energy, relatively, whichever entries of a
//! bucket the set holds. Trimming to density ρ keeps k = max(1, ⌊ρn⌋) of n
//! entries, as the merge's trim does; over a whole task vector the
//! histograms of its tensors add up, so one pass gives both scopes.
//!
//! A tensor's histogram is built from the analysis' delta buffer (after its
//! quantiles, which only reorder it) in a window of 32 binades below the
//! largest |d|; the rare entries outside it are binned one by one.

use crate::quantile::{level1_bucket, Sample, LEVEL1_BUCKETS};
use rayon::prelude::*;

/// Bits of |d| (as f64) dropped for a bucket: 10 mantissa bits are kept.
pub const SHIFT: u32 = 42;
/// The shift of the compact histogram `analysis.json` records: the top 16
/// bits of |d| (exponent and 4 mantissa bits).
pub const COARSE_SHIFT: u32 = 47;
/// Relative bound on an energy estimated from buckets: 2^-10 + 2^-21.
pub const ENERGY_BOUND: f64 = 1.0 / 1024.0 + 1.0 / 2_097_152.0;
/// Buckets per binade (one exponent value).
const PER_BINADE: usize = 1 << (52 - SHIFT);
/// Binades of the window counted in a dense table.
const WINDOW_BINADES: u64 = 32;
/// Empty buckets a run of the compact histogram may hold.
pub const RUN_GAP: u64 = 8;
/// Binades of an f64 (exponent values).
const BINADES: usize = 2048;

/// A whole task vector's entries counted by the top 16 bits of their keys
/// (`key >> COARSE_SHIFT`), as the analysis records them in
/// `magnitude_histogram`: what lets a whole-model selection place its
/// window without a sample.
#[derive(Debug, Clone, PartialEq)]
pub struct CoarseCounts {
    /// Entries counted in all.
    pub entries: u64,
    /// Runs of consecutive buckets, ascending: (first bucket, counts).
    pub runs: Vec<(u64, Vec<u64>)>,
}

/// Where the `rank`-th largest key lies by [`CoarseCounts`]: its bucket
/// (keys `bucket << COARSE_SHIFT` to the next bucket's first minus one),
/// how many keys lie in higher buckets, and how many in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoarseBucket {
    pub bucket: u64,
    pub above: u64,
    pub count: u64,
}

impl CoarseCounts {
    /// Whether every bucket is one a key can fall in and the counts add up
    /// to `entries`.
    pub fn is_consistent(&self) -> bool {
        let buckets = (i64::MAX as u64 >> COARSE_SHIFT) + 1;
        let mut sum = 0u64;
        for (first, counts) in &self.runs {
            if first
                .checked_add(counts.len() as u64)
                .is_none_or(|end| end > buckets)
            {
                return false;
            }
            for &c in counts {
                match sum.checked_add(c) {
                    Some(s) => sum = s,
                    None => return false,
                }
            }
        }
        sum == self.entries
    }

    /// The bucket holding the `rank`-th largest key (rank from 1), if the
    /// counts reach that far.
    pub fn bucket_of_rank(&self, rank: u64) -> Option<CoarseBucket> {
        let mut above = 0u64;
        for (first, counts) in self.runs.iter().rev() {
            for (i, &count) in counts.iter().enumerate().rev() {
                if above + count >= rank && count > 0 {
                    let bucket = first + i as u64;
                    return Some(CoarseBucket {
                        bucket,
                        above,
                        count,
                    });
                }
                above += count;
            }
        }
        None
    }
}

/// The bucket of an entry with delta `d`.
#[inline(always)]
pub fn bucket(d: f64) -> u64 {
    d.abs().to_bits() >> SHIFT
}

/// The smallest magnitude in bucket `b`.
pub fn lower_edge(b: u64) -> f64 {
    f64::from_bits(b << SHIFT)
}

/// (lo² + hi²)/2 for bucket `b` = [lo, hi): what each of its entries counts
/// for in an energy estimate (infinite or NaN for non-finite buckets).
pub fn representative_sq(b: u64) -> f64 {
    let lo = lower_edge(b);
    let hi = f64::from_bits((b + 1) << SHIFT);
    (lo * lo + hi * hi) / 2.0
}

/// How many entries of `n` trimming to density `rho` keeps:
/// max(1, ⌊ρn⌋), all of them for ρ ≥ 1, none for ρ ≤ 0 (the merge's rule).
pub fn kept_count(rho: f64, n: u64) -> u64 {
    if rho >= 1.0 {
        n
    } else if rho <= 0.0 || n == 0 {
        0
    } else {
        ((rho * n as f64).floor() as u64).clamp(1, n)
    }
}

/// Energy kept by the `k` largest entries of a histogram given as
/// non-empty (bucket, count) pairs in descending bucket order, for each of
/// the ascending `ks`: the estimated Σ d² and the bucket holding the k-th
/// largest entry (0 when k is 0).
pub fn top_energy(descending: impl Iterator<Item = (u64, u64)>, ks: &[u64]) -> Vec<(f64, u64)> {
    let mut out = vec![(0.0, 0); ks.len()];
    let mut next = ks.iter().position(|&k| k > 0).unwrap_or(ks.len());
    let (mut above, mut energy) = (0u64, 0.0f64);
    for (b, count) in descending {
        if next == ks.len() {
            break;
        }
        let rep = representative_sq(b);
        while next < ks.len() && ks[next] <= above + count {
            let part = ks[next] - above;
            out[next] = (energy + part as f64 * rep, b);
            next += 1;
        }
        above += count;
        energy += count as f64 * rep;
    }
    // Ranks past the last entry keep everything.
    for o in &mut out[next..] {
        *o = (energy, 0);
    }
    out
}

/// One tensor's magnitude histogram for one model.
#[derive(Debug, Clone, Default)]
pub struct TensorMagnitudes {
    /// Non-empty (bucket, count), descending.
    pub buckets: Vec<(u64, u64)>,
    pub entries: u64,
}

impl TensorMagnitudes {
    /// `n` entries, all zero.
    pub fn zeros(n: u64) -> Self {
        Self {
            buckets: if n > 0 { vec![(0, n)] } else { Vec::new() },
            entries: n,
        }
    }

    /// The histogram of `values` plus `zeros` further zero entries, where
    /// `inexact` lists the true values of the entries `values` holds rounded
    /// (see [`crate::quantile::quantiles`]) and `max_abs` is the largest
    /// finite or infinite |d| (it places the dense window). Also returns the
    /// quantiles' first-level counts of `values` as stored
    /// ([`crate::quantile::level1_bucket`]), derived from the finer signed
    /// buckets counted here, so the quantiles need not count them again.
    pub fn from_values<T: Sample>(
        values: &[T],
        zeros: u64,
        inexact: &[f64],
        max_abs: f64,
    ) -> (Self, Vec<u32>) {
        // The window: finite magnitudes only, and for f32 buffers normal
        // f32 values only, so that each fine bucket lies inside one
        // first-level bucket of the quantiles; the rest is counted one by one.
        let top = if max_abs.is_finite() {
            (max_abs.abs().to_bits() >> 52).min(2046)
        } else {
            2046
        };
        let floor = if T::KEY_IS_32_BITS { 1023 - 126 } else { 0 };
        let first = top.saturating_sub(WINDOW_BINADES - 1).max(floor);
        let lo = first * PER_BINADE as u64;
        // Everything below the floor (tiny f32 values) goes one by one.
        let len = if top < first {
            0
        } else {
            ((top + 1 - first) as usize) * PER_BINADE
        };
        let part = values
            .len()
            .div_ceil(rayon::current_num_threads())
            .clamp(1 << 16, 1 << 30);
        // Per part: negative and positive window counts, the values outside
        // the window, and the zeros by sign.
        type Part<T> = (Vec<u32>, Vec<T>, [u64; 2]);
        let parts: Vec<Part<T>> = values
            .par_chunks(part)
            .map(|chunk| {
                let mut table = vec![0u32; 2 * len];
                let mut outside = Vec::new();
                let mut zero = [0u64; 2];
                for &v in chunk {
                    let bits = v.to_f64().to_bits();
                    let sign = (bits >> 63) as usize;
                    let b = (bits & !(1 << 63)) >> SHIFT;
                    let i = b.wrapping_sub(lo) as usize;
                    if i < len {
                        table[sign * len + i] += 1;
                    } else if b == 0 {
                        zero[sign] += 1;
                    } else {
                        outside.push(v);
                    }
                }
                (table, outside, zero)
            })
            .collect();
        let mut table = vec![0u64; 2 * len];
        let mut outside: Vec<T> = Vec::new();
        let mut zero = [0u64; 2];
        for (t, o, z) in parts {
            for (a, b) in table.iter_mut().zip(t) {
                *a += u64::from(b);
            }
            outside.extend(o);
            zero[0] += z[0];
            zero[1] += z[1];
        }

        // The quantiles' first level, from the stored values.
        let mut level1 = vec![0u32; LEVEL1_BUCKETS];
        for (sign, half) in table.chunks_exact(len.max(1)).enumerate() {
            for (i, &c) in half.iter().enumerate().filter(|(_, &c)| c > 0) {
                let edge = lower_edge(lo + i as u64);
                let v = T::from_f64(if sign == 1 { -edge } else { edge });
                level1[level1_bucket(v)] += c as u32;
            }
        }
        level1[level1_bucket(T::from_f64(0.0))] += zero[0] as u32;
        level1[level1_bucket(T::from_f64(-0.0))] += zero[1] as u32;
        for &v in &outside {
            level1[level1_bucket(v)] += 1;
        }

        // Magnitudes: both signs together, the rounded entries moved to
        // their true values' buckets, the zeros left out of the buffer added.
        let mut mags: Vec<u64> = table[..len]
            .iter()
            .zip(&table[len..])
            .map(|(a, b)| a + b)
            .collect();
        let mut zero = zero[0] + zero[1] + zeros;
        let mut extra: Vec<(u64, i64)> = outside.iter().map(|v| (bucket(v.to_f64()), 1)).collect();
        for &v in inexact {
            extra.push((bucket(T::from_f64(v).to_f64()), -1));
            extra.push((bucket(v), 1));
        }
        extra.retain(|&(b, delta)| {
            let i = b.wrapping_sub(lo) as usize;
            if i < len {
                mags[i] = mags[i].wrapping_add_signed(delta);
                false
            } else if b == 0 {
                zero = zero.wrapping_add_signed(delta);
                false
            } else {
                true
            }
        });
        extra.sort_unstable_by_key(|b| std::cmp::Reverse(b.0));
        let mut extra_counts: Vec<(u64, u64)> = Vec::new();
        for (b, delta) in extra {
            match extra_counts.last_mut() {
                Some((last, c)) if *last == b => *c = c.wrapping_add_signed(delta),
                _ => extra_counts.push((b, 0u64.wrapping_add_signed(delta))),
            }
        }
        let window = mags
            .iter()
            .enumerate()
            .rev()
            .filter(|&(_, &c)| c > 0)
            .map(|(i, &c)| (lo + i as u64, c));
        // Extras lie above the window (non-finite) or below it.
        let above = extra_counts.iter().copied().filter(|&(b, _)| b >= lo);
        let below = extra_counts.iter().copied().filter(|&(b, _)| b < lo);
        let mut buckets: Vec<(u64, u64)> = above
            .chain(window)
            .chain(below)
            .chain(std::iter::once((0, zero)))
            .filter(|&(_, c)| c > 0)
            .collect();
        buckets.dedup_by(|a, b| {
            if a.0 == b.0 {
                b.1 += a.1;
                true
            } else {
                false
            }
        });
        let entries = buckets.iter().map(|&(_, c)| c).sum();
        (Self { buckets, entries }, level1)
    }
}

/// A whole task vector's magnitude histogram: the sum of its tensors'.
/// Stored in pages of one binade, allocated when first used.
#[derive(Debug, Clone)]
pub struct Histogram {
    pages: Vec<Option<Box<[u64]>>>,
    pub entries: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            pages: vec![None; BINADES],
            entries: 0,
        }
    }
}

impl Histogram {
    /// Adds one tensor's histogram.
    pub fn add(&mut self, t: &TensorMagnitudes) {
        for &(b, c) in &t.buckets {
            let page = (b as usize) / PER_BINADE;
            let slot = (b as usize) % PER_BINADE;
            self.pages[page].get_or_insert_with(|| vec![0u64; PER_BINADE].into_boxed_slice())
                [slot] += c;
        }
        self.entries += t.entries;
    }

    /// Non-empty (bucket, count), descending.
    pub fn descending(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.pages
            .iter()
            .enumerate()
            .rev()
            .filter_map(|(p, page)| page.as_ref().map(|page| (p, page)))
            .flat_map(|(p, page)| {
                page.iter()
                    .enumerate()
                    .rev()
                    .filter(|&(_, &c)| c > 0)
                    .map(move |(s, &c)| ((p * PER_BINADE + s) as u64, c))
            })
    }

    /// The counts by the top 16 bits of |d| (shifted by [`COARSE_SHIFT`])
    /// as runs of consecutive buckets: (first
    /// bucket, counts), ascending; gaps of more than [`RUN_GAP`] empty
    /// buckets start a new run.
    pub fn coarse_runs(&self) -> Vec<(u64, Vec<u64>)> {
        let coarse = COARSE_SHIFT - SHIFT;
        let mut asc: Vec<(u64, u64)> = Vec::new();
        for (b, c) in self.descending() {
            let k = b >> coarse;
            match asc.last_mut() {
                Some((last, n)) if *last == k => *n += c,
                _ => asc.push((k, c)),
            }
        }
        asc.reverse();
        let mut runs: Vec<(u64, Vec<u64>)> = Vec::new();
        for (k, c) in asc {
            match runs.last_mut() {
                Some((first, counts)) if k - (*first + counts.len() as u64) <= RUN_GAP => {
                    let gap = k - (*first + counts.len() as u64);
                    counts.extend(std::iter::repeat_n(0, gap as usize));
                    counts.push(c);
                }
                _ => runs.push((k, vec![c])),
            }
        }
        runs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact_top(values: &[f64], k: usize) -> f64 {
        let mut a: Vec<f64> = values.iter().map(|v| v.abs()).collect();
        a.sort_by(|x, y| y.total_cmp(x));
        a[..k].iter().map(|x| x * x).sum()
    }

    #[test]
    fn bucket_estimates_stay_within_the_bound_in_both_buffer_types() {
        // Values spread over many binades, ties, zeros, and a far-below tail.
        let mut values: Vec<f64> = (0..200_001)
            .map(|i| ((i as f64 * 0.7).sin() * 3.0).powi(5) * 1e-3)
            .collect();
        values.extend([1e-30, -1e-30, 0.0, -0.0, 2.5, -2.5, 1e-40, -3e-45, 1e-310]);
        let max_abs = values.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let total: f64 = values.iter().map(|v| v * v).sum();
        let n = values.len() as u64;
        let ks: Vec<u64> = [0.01, 0.1, 0.5, 0.9]
            .iter()
            .map(|&r| kept_count(r, n))
            .collect();
        let zeros = values.iter().filter(|v| **v == 0.0).count() as u64;
        let nonzero: Vec<f64> = values.iter().copied().filter(|v| *v != 0.0).collect();
        let (t64, level1) = TensorMagnitudes::from_values(&nonzero, zeros, &[], max_abs);
        let mut direct = vec![0u32; LEVEL1_BUCKETS];
        nonzero.iter().for_each(|&v| direct[level1_bucket(v)] += 1);
        assert!(level1 == direct, "f64 first-level counts differ");
        assert_eq!(t64.entries, n);
        // In an f32 buffer, rounded values with their true values listed.
        let stored: Vec<f32> = values.iter().map(|&v| v as f32).collect();
        let inexact: Vec<f64> = values
            .iter()
            .copied()
            .filter(|&v| f64::from(v as f32) != v)
            .collect();
        let (t32, level1) = TensorMagnitudes::from_values(&stored, 0, &inexact, max_abs);
        let mut direct = vec![0u32; LEVEL1_BUCKETS];
        stored.iter().for_each(|&v| direct[level1_bucket(v)] += 1);
        assert!(level1 == direct, "f32 first-level counts differ");
        assert_eq!(t32.buckets, t64.buckets);
        for (&k, (est, b)) in ks.iter().zip(top_energy(t64.buckets.iter().copied(), &ks)) {
            let exact = exact_top(&values, k as usize);
            assert!(
                (est - exact).abs() <= ENERGY_BOUND * exact,
                "k {k}: {est} vs {exact}"
            );
            assert!((est - exact).abs() / total < 0.001);
            // The threshold bucket holds the k-th largest magnitude.
            let mut a: Vec<f64> = values.iter().map(|v| v.abs()).collect();
            a.sort_by(|x, y| y.total_cmp(x));
            assert_eq!(b, bucket(a[k as usize - 1]));
        }
        // A model's histogram of two tensors, and the selection level.
        let mut h = Histogram::default();
        h.add(&t64);
        h.add(&TensorMagnitudes::zeros(10));
        assert_eq!(h.entries, n + 10);
        let asc: u64 = h.coarse_runs().iter().flat_map(|r| r.1.iter()).sum();
        assert_eq!(asc, n + 10);
        let runs = h.coarse_runs();
        assert_eq!(runs[0].0, 0);
        let lowest = values
            .iter()
            .filter(|v| v.abs().to_bits() >> COARSE_SHIFT == 0)
            .count() as u64;
        assert_eq!(runs[0].1[0], lowest + 10);
    }

    #[test]
    fn first_level_counts_hold_for_subnormal_f32_buffers() {
        let values: Vec<f32> = (1..5000)
            .map(|i| f32::from_bits(i * 977 % 8_000_000) * if i % 2 == 0 { -1.0 } else { 1.0 })
            .collect();
        let max_abs = values.iter().fold(0.0f64, |m, v| m.max(f64::from(v.abs())));
        let (t, level1) = TensorMagnitudes::from_values(&values, 0, &[], max_abs);
        let mut direct = vec![0u32; LEVEL1_BUCKETS];
        values.iter().for_each(|&v| direct[level1_bucket(v)] += 1);
        assert!(level1 == direct);
        assert_eq!(t.entries, values.len() as u64);
    }

    #[test]
    fn kept_counts_follow_the_merge() {
        assert_eq!(kept_count(0.01, 50), 1);
        assert_eq!(kept_count(0.2, 50), 10);
        assert_eq!(kept_count(1.0, 50), 50);
        assert_eq!(kept_count(0.0, 50), 0);
        let all = top_energy([(5u64, 2u64), (3, 1)].into_iter(), &[0, 2, 3, 9]);
        assert_eq!(all[0], (0.0, 0));
        assert_eq!(all[1].1, 5);
        assert_eq!(all[2].1, 3);
        assert_eq!(all[3].0, all[2].0);
    }
}
