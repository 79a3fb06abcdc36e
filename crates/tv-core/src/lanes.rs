//! Reductions over f64 slices in sixteen independent lanes.
//!
//! A plain `iter().sum()` is one long chain of dependent additions, which
//! the compiler may not reorder; sixteen lanes let it keep several (SIMD)
//! accumulators busy, even two full AVX-512 registers. Lanes are combined
//! in a fixed order, so results are deterministic on every CPU.

const L: usize = 16;

#[inline(always)]
fn combine(acc: [f64; L]) -> f64 {
    let mut width = L;
    let mut acc = acc;
    while width > 1 {
        width /= 2;
        for l in 0..width {
            acc[l] += acc[l + width];
        }
    }
    acc[0]
}

/// Σ x.
#[inline(always)]
pub fn sum(xs: &[f64]) -> f64 {
    let mut acc = [0.0; L];
    let chunks = xs.chunks_exact(L);
    let tail: f64 = chunks.remainder().iter().sum();
    for c in chunks {
        for l in 0..L {
            acc[l] += c[l];
        }
    }
    combine(acc) + tail
}

/// Σ a·b.
#[inline(always)]
pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0.0; L];
    let (ca, cb) = (a.chunks_exact(L), b.chunks_exact(L));
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..L {
            acc[l] += x[l] * y[l];
        }
    }
    combine(acc) + tail
}

/// Σ(x − mean)^k for k = 2, 3, 4.
#[inline(always)]
pub fn central_moments(xs: &[f64], mean: f64) -> (f64, f64, f64) {
    let (mut m2, mut m3, mut m4) = ([0.0; L], [0.0; L], [0.0; L]);
    let chunks = xs.chunks_exact(L);
    let (mut t2, mut t3, mut t4) = (0.0, 0.0, 0.0);
    for &x in chunks.remainder() {
        let d = x - mean;
        let d2 = d * d;
        t2 += d2;
        t3 += d2 * d;
        t4 += d2 * d2;
    }
    for c in chunks {
        for l in 0..L {
            let d = c[l] - mean;
            let d2 = d * d;
            m2[l] += d2;
            m3[l] += d2 * d;
            m4[l] += d2 * d2;
        }
    }
    (combine(m2) + t2, combine(m3) + t3, combine(m4) + t4)
}

/// One pass over a block of deltas: the power sums Σ(x − shift)^k for
/// k = 1..4, and Σ|x|, max|x| (NaN ignored), zero and non-finite counts.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BlockSums {
    pub powers: [f64; 4],
    pub sum_abs: f64,
    pub max_abs: f64,
    pub zeros: u64,
    pub nonfinite: u64,
}

/// [`BlockSums`] of `xs` around `shift`.
#[inline(always)]
pub fn block_sums(xs: &[f64], shift: f64) -> BlockSums {
    let (mut p1, mut p2, mut p3, mut p4) = ([0.0; L], [0.0; L], [0.0; L], [0.0; L]);
    let (mut sa, mut ma) = ([0.0; L], [0.0f64; L]);
    let (mut zeros, mut nonfinite) = ([0u64; L], [0u64; L]);
    let chunks = xs.chunks_exact(L);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..L {
            let x = c[l];
            let d = x - shift;
            let d2 = d * d;
            p1[l] += d;
            p2[l] += d2;
            p3[l] += d2 * d;
            p4[l] += d2 * d2;
            let a = x.abs();
            sa[l] += a;
            if a > ma[l] {
                ma[l] = a;
            }
            zeros[l] += u64::from(x == 0.0);
            nonfinite[l] += u64::from(!x.is_finite());
        }
    }
    let mut out = BlockSums {
        powers: [combine(p1), combine(p2), combine(p3), combine(p4)],
        sum_abs: combine(sa),
        max_abs: ma.iter().fold(0.0f64, |m, &x| m.max(x)),
        zeros: zeros.iter().sum(),
        nonfinite: nonfinite.iter().sum(),
    };
    for &x in rest {
        let d = x - shift;
        let d2 = d * d;
        out.powers[0] += d;
        out.powers[1] += d2;
        out.powers[2] += d2 * d;
        out.powers[3] += d2 * d2;
        out.sum_abs += x.abs();
        out.max_abs = out.max_abs.max(x.abs());
        out.zeros += u64::from(x == 0.0);
        out.nonfinite += u64::from(!x.is_finite());
    }
    out
}

/// Sign agreement of two blocks of deltas, element by element: how many
/// pairs are both non-zero (NaN counts as zero), how many of those differ
/// in sign, Σ min(|a|, |b|) over them, and that sum over the differing ones.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PairSigns {
    pub both: f64,
    pub conflict: f64,
    pub weight: f64,
    pub weight_conflict: f64,
}

impl PairSigns {
    /// Adds another range's sums.
    pub fn add(&mut self, o: &Self) {
        self.both += o.both;
        self.conflict += o.conflict;
        self.weight += o.weight;
        self.weight_conflict += o.weight_conflict;
    }
}

/// Σ a·b and the [`PairSigns`] of `a` and `b` (same length), in one pass.
/// Both non-zero means a·b ≠ 0 (and not NaN): a product that underflows
/// (|a·b| below 1e-308) counts as zero.
#[inline(always)]
pub fn dot_and_signs(a: &[f64], b: &[f64]) -> (f64, PairSigns) {
    let (mut dot, mut both, mut conflict, mut weight, mut weight_conflict) =
        ([0.0; L], [0.0; L], [0.0; L], [0.0; L], [0.0; L]);
    #[inline(always)]
    fn one(x: f64, y: f64) -> (f64, f64, f64, f64, f64) {
        let p = x * y;
        // NaN > 0 and NaN < 0 are false: a NaN delta counts as neither sign.
        let nz = p.abs() > 0.0;
        let differ = p < 0.0;
        let (ax, ay) = (x.abs(), y.abs());
        let m = if ax < ay { ax } else { ay };
        let m = if nz { m } else { 0.0 };
        (
            p,
            if nz { 1.0 } else { 0.0 },
            if differ { 1.0 } else { 0.0 },
            m,
            if differ { m } else { 0.0 },
        )
    }
    let (ca, cb) = (a.chunks_exact(L), b.chunks_exact(L));
    let mut tail = (0.0, PairSigns::default());
    for (&x, &y) in ca.remainder().iter().zip(cb.remainder()) {
        let (p, n, c, w, wc) = one(x, y);
        tail.0 += p;
        tail.1.both += n;
        tail.1.conflict += c;
        tail.1.weight += w;
        tail.1.weight_conflict += wc;
    }
    for (x, y) in ca.zip(cb) {
        for l in 0..L {
            let (p, n, c, w, wc) = one(x[l], y[l]);
            dot[l] += p;
            both[l] += n;
            conflict[l] += c;
            weight[l] += w;
            weight_conflict[l] += wc;
        }
    }
    let signs = PairSigns {
        both: combine(both) + tail.1.both,
        conflict: combine(conflict) + tail.1.conflict,
        weight: combine(weight) + tail.1.weight,
        weight_conflict: combine(weight_conflict) + tail.1.weight_conflict,
    };
    (combine(dot) + tail.0, signs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_reductions_match_plain_loops() {
        let xs: Vec<f64> = (0..1003)
            .map(|i| ((i * 37 % 101) as f64 - 50.0) * 0.125)
            .collect();
        let ys: Vec<f64> = (0..1003).map(|i| (i % 7) as f64).collect();
        assert_eq!(sum(&xs), xs.iter().sum::<f64>());
        assert_eq!(
            dot(&xs, &ys),
            xs.iter().zip(&ys).map(|(a, b)| a * b).sum::<f64>()
        );
        let (m2, _, m4) = central_moments(&xs, 1.0);
        assert_eq!(m2, xs.iter().map(|x| (x - 1.0).powi(2)).sum::<f64>());
        assert_eq!(m4, xs.iter().map(|x| (x - 1.0).powi(4)).sum::<f64>());
        let b = block_sums(&xs, 0.5);
        assert_eq!(b.sum_abs, xs.iter().map(|x| x.abs()).sum::<f64>());
        assert_eq!(b.max_abs, 6.25);
        assert_eq!(b.zeros, xs.iter().filter(|&&x| x == 0.0).count() as u64);
        assert_eq!(b.nonfinite, 0);
        let p3: f64 = xs.iter().map(|x| (x - 0.5).powi(3)).sum();
        let zs: Vec<f64> = (0..1003)
            .map(|i| ((i * 13 % 29) as f64 - 14.0) * 0.5)
            .collect();
        let mut want = PairSigns::default();
        for (&x, &z) in xs.iter().zip(&zs) {
            if x != 0.0 && z != 0.0 {
                want.both += 1.0;
                want.weight += x.abs().min(z.abs());
                if (x < 0.0) != (z < 0.0) {
                    want.conflict += 1.0;
                    want.weight_conflict += x.abs().min(z.abs());
                }
            }
        }
        let (d, signs) = dot_and_signs(&xs, &zs);
        assert_eq!(signs, want);
        assert_eq!(d, dot(&xs, &zs));
        let (_, nan) = dot_and_signs(&[f64::NAN, -1.0], &[1.0, f64::NAN]);
        assert_eq!(nan, PairSigns::default());
        assert!((b.powers[2] - p3).abs() <= 1e-12 * p3.abs());
    }
}
