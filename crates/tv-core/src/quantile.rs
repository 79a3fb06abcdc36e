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
    /// Rounds an f64 to this type.
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    /// A key whose unsigned order is the numeric order; every NaN (of either
    /// sign) has the largest key, so NaN sorts last and is never q0.
    fn key(self) -> u64;
    /// The value of a key.
    fn from_key(key: u64) -> Self;
    /// Whether the top 32 key bits determine the value.
    const KEY_IS_32_BITS: bool;
}

impl Sample for f32 {
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    fn key(self) -> u64 {
        // Every NaN, whatever its sign and payload, gets the largest key.
        if self.is_nan() {
            return u64::from(u32::MAX) << 32;
        }
        let b = self.to_bits();
        let k = if b & 0x8000_0000 != 0 {
            !b
        } else {
            b | 0x8000_0000
        };
        u64::from(k) << 32
    }
    fn from_key(key: u64) -> Self {
        let k = (key >> 32) as u32;
        f32::from_bits(if k & 0x8000_0000 != 0 {
            k & 0x7FFF_FFFF
        } else {
            !k
        })
    }
    const KEY_IS_32_BITS: bool = true;
}

impl Sample for f64 {
    fn from_f64(x: f64) -> Self {
        x
    }
    fn to_f64(self) -> f64 {
        self
    }
    fn key(self) -> u64 {
        // Every NaN, whatever its sign and payload, gets the largest key.
        if self.is_nan() {
            return u64::MAX;
        }
        let b = self.to_bits();
        if b & (1 << 63) != 0 {
            !b
        } else {
            b | (1 << 63)
        }
    }
    fn from_key(key: u64) -> Self {
        f64::from_bits(if key & (1 << 63) != 0 {
            key & !(1 << 63)
        } else {
            !key
        })
    }
    const KEY_IS_32_BITS: bool = false;
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

/// The quantiles at [`LEVELS`] of `values` plus `zeros` further elements
/// equal to 0 (left out of the buffer: unchanged weights are often most of
/// a task vector). `values` is reordered. No elements at all gives NaN.
///
/// `inexact` lists the true values of elements that `values` holds rounded
/// to nearest (an f32 buffer of deltas that f32 cannot always represent):
/// rounding keeps the order between different stored values, so only ties
/// of a stored value need the true values to be ranked exactly.
pub fn quantiles<T: Sample>(
    values: &mut [T],
    zeros: usize,
    inexact: &mut [f64],
) -> [f64; LEVELS.len()] {
    quantiles_with(values, zeros, inexact, None)
}

/// [`quantiles`], given the counts of [`level1_bucket`] over `values` when
/// the caller has them already (a pass saved).
pub fn quantiles_with<T: Sample>(
    values: &mut [T],
    zeros: usize,
    inexact: &mut [f64],
    level1: Option<Vec<u32>>,
) -> [f64; LEVELS.len()] {
    let n = values.len() + zeros;
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

    // In sorted order the zeros sit between the negative and the positive
    // values; translate ranks to ranks among `values`.
    let small = values.len() < SMALL;
    let hist = match level1 {
        _ if small => Vec::new(),
        Some(h) if h.len() == BUCKETS => h,
        _ => histogram(values),
    };
    let negatives: usize = if small {
        values.iter().filter(|v| v.key() < ZERO_KEY).count()
    } else {
        hist[..ZERO_BUCKET].iter().map(|&c| c as usize).sum()
    };
    let mut inner: Vec<usize> = Vec::new();
    for &r in &ranks {
        if r < negatives {
            inner.push(r);
        } else if r >= negatives + zeros {
            inner.push(r - zeros);
        }
    }
    inexact.sort_by(f64::total_cmp);
    let found: Vec<f64> = if small {
        let found = select_in_place(values, &inner);
        if inexact.is_empty() {
            found
        } else {
            inner
                .iter()
                .zip(found)
                .map(|(&r, v)| {
                    let key = T::from_f64(v).key();
                    let below = values.iter().filter(|x| x.key() < key).count();
                    let group = values.iter().filter(|x| x.key() == key).count();
                    resolve(v, r - below, group, inexact)
                })
                .collect()
        }
    } else {
        order_statistics(values, &hist, &inner)
            .into_iter()
            .map(|(v, rank, group)| resolve(v, rank, group, inexact))
            .collect()
    };
    let at = |r: usize| {
        if r >= negatives && r < negatives + zeros {
            return 0.0;
        }
        let inner_rank = if r < negatives { r } else { r - zeros };
        found[inner.binary_search(&inner_rank).expect("rank selected")]
    };
    let mut out = [0.0; LEVELS.len()];
    for (o, &(lo, hi, t)) in out.iter_mut().zip(&positions) {
        *o = lerp(at(lo), at(hi), t);
    }
    out
}

/// The true value at rank `rank` among the `group` stored values equal to
/// `v`, some of which may stand for the (sorted) `inexact` values.
fn resolve(v: f64, rank: usize, group: usize, inexact: &[f64]) -> f64 {
    let stored = v as f32;
    let mine: Vec<f64> = inexact
        .iter()
        .copied()
        .filter(|&x| x as f32 == stored)
        .collect();
    if mine.is_empty() {
        return v;
    }
    let below = mine.iter().take_while(|&&x| x < v).count();
    let copies = group - mine.len();
    if rank < below {
        mine[rank]
    } else if rank < below + copies {
        v
    } else {
        mine[rank - copies]
    }
}

const BUCKETS: usize = 1 << 16;
/// Below this many values, plain selection beats building histograms.
const SMALL: usize = 1 << 16;
/// The key of +0.0: every key below it belongs to a negative value.
const ZERO_KEY: u64 = 1 << 63;
/// The bucket of +0.0: every key below it belongs to a negative value.
const ZERO_BUCKET: usize = 1 << 15;

/// The first radix level's bucket of a value: the top 16 key bits.
pub fn level1_bucket<T: Sample>(v: T) -> usize {
    (v.key() >> 48) as usize
}

/// Buckets of the first radix level.
pub const LEVEL1_BUCKETS: usize = BUCKETS;

/// Counts of the top 16 key bits.
fn histogram<T: Sample>(values: &[T]) -> Vec<u32> {
    count_per_thread(values, BUCKETS, |h, chunk| {
        for &v in chunk {
            h[level1_bucket(v)] += 1;
        }
    })
}

/// Runs `count` over one contiguous part of `values` per thread, each with
/// its own zeroed table of `len` counters, and adds the tables up.
fn count_per_thread<T: Sample>(
    values: &[T],
    len: usize,
    count: impl Fn(&mut [u32], &[T]) + Sync,
) -> Vec<u32> {
    let part = values
        .len()
        .div_ceil(rayon::current_num_threads())
        .max(1 << 16);
    values
        .par_chunks(part)
        .map(|chunk| {
            let mut table = vec![0u32; len];
            count(&mut table, chunk);
            table
        })
        .reduce_with(|mut a, b| {
            a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
            a
        })
        .unwrap_or_else(|| vec![0u32; len])
}

/// The values of the given ascending, distinct `ranks` (0-based) in sorted
/// order of `values`, whose [`histogram`] is `hist`, each with its rank
/// among the values of equal key and their count (for 32-bit keys; f64
/// values are exact and report a group of one).
///
/// The top 16 key bits of each rank come from `hist`; one more pass counts
/// the next 16 bits within the wanted buckets, which fixes an f32 value
/// completely. For f64, the few values sharing a rank's 32-bit prefix are
/// gathered and selected among.
fn order_statistics<T: Sample>(
    values: &mut [T],
    hist: &[u32],
    ranks: &[usize],
) -> Vec<(f64, usize, usize)> {
    // Level 1: the bucket of each rank and its rank within the bucket.
    let level1 = locate(hist, ranks);
    let mut slot_of_bucket = vec![u8::MAX; BUCKETS];
    let mut buckets: Vec<usize> = Vec::new();
    for &(b, _) in &level1 {
        if slot_of_bucket[b] == u8::MAX {
            slot_of_bucket[b] = buckets.len() as u8;
            buckets.push(b);
        }
    }
    // Levels 2 and 3: the next 8 key bits, then the 8 after, each counted
    // within the wanted prefixes only, in tables small enough for the L1
    // cache. Branch-free: values outside the wanted prefixes count in a
    // spare row, which is ignored.
    let slots = buckets.len();
    let row_of_bucket: Vec<u32> = slot_of_bucket
        .iter()
        .map(|&s| {
            if s == u8::MAX {
                slots as u32
            } else {
                u32::from(s)
            }
        })
        .collect();
    let level2_counts = count_per_thread(values, (slots + 1) * 256, |h, chunk| {
        for &v in chunk {
            let key = v.key();
            let row = row_of_bucket[(key >> 48) as usize] as usize;
            h[row * 256 + ((key >> 40) & 0xFF) as usize] += 1;
        }
    });
    let mut level2: Vec<(usize, usize, usize)> = Vec::with_capacity(level1.len()); // (bucket, byte, rank)
    for group in level1.chunk_by(|a, b| a.0 == b.0) {
        let b = group[0].0;
        let row = slot_of_bucket[b] as usize;
        let inner: Vec<usize> = group.iter().map(|&(_, r)| r).collect();
        for (byte, r) in locate(&level2_counts[row * 256..(row + 1) * 256], &inner) {
            level2.push((b, byte, r));
        }
    }
    // Rows of the level-3 table, one per wanted 24-bit prefix.
    let mut row_of_prefix = vec![u32::MAX; (slots + 1) * 256];
    let mut rows3 = 0u32;
    for &(b, byte, _) in &level2 {
        let i = slot_of_bucket[b] as usize * 256 + byte;
        if row_of_prefix[i] == u32::MAX {
            row_of_prefix[i] = rows3;
            rows3 += 1;
        }
    }
    for r in row_of_prefix.iter_mut().filter(|r| **r == u32::MAX) {
        *r = rows3;
    }
    let level3_counts = count_per_thread(values, (rows3 as usize + 1) * 256, |h, chunk| {
        for &v in chunk {
            let key = v.key();
            let row1 = row_of_bucket[(key >> 48) as usize] as usize;
            let row = row_of_prefix[row1 * 256 + ((key >> 40) & 0xFF) as usize] as usize;
            h[row * 256 + ((key >> 32) & 0xFF) as usize] += 1;
        }
    });
    // Each rank's 32-bit key prefix, its rank among values sharing it, and
    // their count.
    let mut prefixes: Vec<(u64, usize, usize)> = Vec::with_capacity(level2.len());
    for group in level2.chunk_by(|a, b| (a.0, a.1) == (b.0, b.1)) {
        let (b, byte) = (group[0].0, group[0].1);
        let row = row_of_prefix[slot_of_bucket[b] as usize * 256 + byte] as usize;
        let counts = &level3_counts[row * 256..(row + 1) * 256];
        let inner: Vec<usize> = group.iter().map(|&(_, _, r)| r).collect();
        for (last, r) in locate(counts, &inner) {
            let prefix = ((b as u64) << 16) | ((byte as u64) << 8) | last as u64;
            prefixes.push((prefix, r, counts[last] as usize));
        }
    }
    if T::KEY_IS_32_BITS {
        return prefixes
            .iter()
            .map(|&(p, r, g)| (T::from_key(p << 32).to_f64(), r, g))
            .collect();
    }

    // f64: gather the values of each wanted prefix, then select.
    let mut distinct: Vec<u64> = prefixes.iter().map(|&(p, _, _)| p).collect();
    distinct.dedup();
    let mut sized = prefixes.clone();
    sized.dedup_by_key(|p| p.0);
    let sizes: usize = sized.iter().map(|&(_, _, group)| group).sum();
    if sizes > values.len() / 4 + (1 << 16) {
        return select_in_place(values, ranks)
            .into_iter()
            .map(|v| (v, 0, 1))
            .collect();
    }
    let mut groups: Vec<Vec<T>> = vec![Vec::new(); distinct.len()];
    for &v in values.iter() {
        let p = v.key() >> 32;
        if slot_of_bucket[(p >> 16) as usize] != u8::MAX {
            if let Ok(g) = distinct.binary_search(&p) {
                groups[g].push(v);
            }
        }
    }
    let mut out = Vec::with_capacity(ranks.len());
    let mut lo_in = vec![0usize; groups.len()];
    for &(p, k, _) in &prefixes {
        let g = distinct.binary_search(&p).expect("gathered prefix");
        let (lo, group) = (lo_in[g], &mut groups[g]);
        let (_, v, _) = group[lo..].select_nth_unstable_by(k - lo, |a, b| a.key().cmp(&b.key()));
        out.push((v.to_f64(), 0, 1));
        lo_in[g] = k + 1;
    }
    out
}

/// For each of the ascending `ranks`, the bucket of `hist` holding it and
/// the rank within that bucket.
fn locate(hist: &[u32], ranks: &[usize]) -> Vec<(usize, usize)> {
    let mut out = Vec::with_capacity(ranks.len());
    let mut below = 0usize;
    let mut r = 0;
    for (b, &count) in hist.iter().enumerate() {
        if r == ranks.len() {
            break;
        }
        let count = count as usize;
        while r < ranks.len() && ranks[r] < below + count {
            out.push((b, ranks[r] - below));
            r += 1;
        }
        below += count;
    }
    out
}

/// Sequential in-place selection, for inputs concentrated in few buckets.
fn select_in_place<T: Sample>(values: &mut [T], ranks: &[usize]) -> Vec<f64> {
    if ranks.is_empty() {
        return Vec::new();
    }
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

    fn reference(values: &[f64], zeros: usize) -> Vec<f64> {
        let mut s = values.to_vec();
        s.extend(std::iter::repeat_n(0.0, zeros));
        s.sort_by(|a, b| a.partial_cmp(b).unwrap());
        reference_sorted(&s)
    }

    #[test]
    fn matches_a_full_sort_on_ties_small_and_skewed_inputs() {
        let cases: Vec<Vec<f64>> = vec![
            vec![],
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
            for zeros in [0, 1, 5000] {
                if case.is_empty() && zeros == 0 {
                    continue;
                }
                let want = reference(&case, zeros);
                let mut v64 = case.clone();
                assert_eq!(quantiles(&mut v64, zeros, &mut []).to_vec(), want);
                let mut v32: Vec<f32> = case.iter().map(|&x| x as f32).collect();
                let exact32: Vec<f64> = v32.iter().map(|&x| f64::from(x)).collect();
                assert_eq!(
                    quantiles(&mut v32, zeros, &mut []).to_vec(),
                    reference(&exact32, zeros)
                );
            }
        }
    }

    #[test]
    fn rounded_f32_values_are_ranked_by_their_true_values() {
        // 1 + 2^-30 and 1 - 2^-30 both round to 1.0 in f32.
        let (up, down) = (1.0 + 2f64.powi(-30), 1.0 - 2f64.powi(-30));
        for n in [11usize, 100_001] {
            let mut truth: Vec<f64> = (0..n).map(|i| (i % 5) as f64 * 0.5).collect();
            let mut inexact = Vec::new();
            // Replace some 1.0 values with values that round to 1.0.
            let mut flip = 0;
            for t in truth.iter_mut().filter(|t| **t == 1.0) {
                flip += 1;
                if flip % 3 == 1 {
                    *t = up;
                    inexact.push(up);
                } else if flip % 3 == 2 {
                    *t = down;
                    inexact.push(down);
                }
            }
            let mut stored: Vec<f32> = truth.iter().map(|&x| x as f32).collect();
            assert_eq!(
                quantiles(&mut stored, 0, &mut inexact).to_vec(),
                reference(&truth, 0),
                "n = {n}"
            );
        }
    }

    #[test]
    fn nan_of_either_sign_sorts_last() {
        let neg_nan = -f64::NAN;
        assert!(neg_nan.is_nan() && neg_nan.is_sign_negative());
        let nan_with_payload = f64::from_bits(0xFFF0_0000_0000_0001);
        assert!(nan_with_payload.is_nan());
        for n in [7usize, 70_001] {
            // Mostly finite values, a few NaN of each sign spread through.
            let mut values: Vec<f64> = (0..n).map(|i| (i as f64 * 0.37).sin()).collect();
            let nans = [f64::NAN, neg_nan, nan_with_payload];
            for (j, &x) in nans.iter().enumerate() {
                values[j * (n / 3)] = x;
            }
            let finite: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
            let lowest = finite.iter().copied().fold(f64::INFINITY, f64::min);
            let mut v64 = values.clone();
            let q = quantiles(&mut v64, 0, &mut []);
            assert_eq!(q[0], lowest, "n = {n}: q0 of f64 is {}", q[0]);
            assert!(q[10].is_nan(), "n = {n}: NaN sorts last");
            // Below the top 1%, every quantile is the finite reference's.
            let mut sorted = finite.clone();
            sorted.sort_by(f64::total_cmp);
            sorted.extend([f64::NAN; 3]);
            let want = reference_sorted(&sorted);
            for (k, (got, want)) in q.iter().zip(&want).enumerate().take(10) {
                assert!(
                    got == want || (got.is_nan() && want.is_nan()),
                    "n = {n}, level {k}: {got} vs {want}"
                );
            }
            let mut v32: Vec<f32> = values.iter().map(|&x| x as f32).collect();
            let q32 = quantiles(&mut v32, 0, &mut []);
            let lowest32 = finite
                .iter()
                .map(|&x| f64::from(x as f32))
                .fold(f64::INFINITY, f64::min);
            assert_eq!(q32[0], lowest32, "n = {n}: q0 of f32 is {}", q32[0]);
            assert!(q32[10].is_nan());
            // Keys: NaN of either sign above +infinity.
            for x in nans {
                assert!(x.key() > f64::INFINITY.key());
                assert!((x as f32).key() > f32::INFINITY.key());
            }
        }
    }

    fn reference_sorted(s: &[f64]) -> Vec<f64> {
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
    fn keys_order_negative_zero_and_positive_and_invert() {
        let xs = [-2.5f64, -1e-300, -0.0, 0.0, 1e-300, 7.0];
        for w in xs.windows(2) {
            assert!(w[0].key() <= w[1].key());
            assert!((w[0] as f32).key() <= (w[1] as f32).key());
        }
        for x in xs {
            assert_eq!(f64::from_key(x.key()).to_bits(), x.to_bits());
            assert_eq!(
                f32::from_key((x as f32).key()).to_bits(),
                (x as f32).to_bits()
            );
        }
    }
}
