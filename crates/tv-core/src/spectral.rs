//! Spectral structure of 2-D task-vector tensors (`ta-analyze --spectral`):
//! the top singular values of each Δ, by a randomized range finder
//! (Halko, Martinsson and Tropp): a Gaussian sketch Y = Δ Ω of
//! [`RANK`] + [`OVERSAMPLE`] columns, [`POWER_ITERS`] power iterations,
//! each step orthonormalised, then the singular values of Qᵀ Δ from the
//! eigenvalues of its small Gram matrix. The large products are candle
//! matmuls in f64 (on the GPU in a CUDA build's device); the small
//! symmetric eigenproblems use nalgebra on the CPU. A matrix whose smaller
//! side is within the sketch's width is done exactly from its Gram matrix.
//! Memory: the matrix and its sketches.

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use nalgebra::{DMatrix, SymmetricEigen};

/// The largest k of energy_topk reported.
pub const RANK: usize = 128;
/// Extra sketch columns beyond [`RANK`].
pub const OVERSAMPLE: usize = 16;
/// Power iterations of the range finder.
pub const POWER_ITERS: usize = 3;
/// The k of the energy_topk columns.
pub const TOPS: [usize; 4] = [1, 8, 32, 128];

/// A matrix's Frobenius norm and its top singular values, descending.
#[derive(Debug, Clone)]
pub struct Spectrum {
    pub fro: f64,
    pub sigma: Vec<f64>,
}

impl Spectrum {
    /// ‖Δ‖_F² / σ₁² (0 for a zero matrix).
    pub fn stable_rank(&self) -> f64 {
        match self.sigma.first() {
            Some(&s) if s > 0.0 => self.fro * self.fro / (s * s),
            _ => 0.0,
        }
    }

    /// Σ_{i≤k} σ_i² / ‖Δ‖_F², at most 1 (0 for a zero matrix).
    pub fn energy_top(&self, k: usize) -> f64 {
        let total = self.fro * self.fro;
        if total <= 0.0 {
            return 0.0;
        }
        let top: f64 = self.sigma.iter().take(k).map(|s| s * s).sum();
        (top / total).min(1.0)
    }
}

fn candle(e: candle_core::Error) -> Error {
    Error::Incompatible(format!("spectral sketch failed: {e}"))
}

/// The spectrum of the `rows` × `cols` row-major matrix `a`, sketched on
/// `device` with Gaussian draws from `seed`. Takes the matrix by value: on
/// the CPU it becomes the tensor without a copy.
pub fn spectrum(
    a: Vec<f64>,
    rows: usize,
    cols: usize,
    device: &Device,
    seed: u64,
) -> Result<Spectrum> {
    let fro = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let n = rows.min(cols);
    let width = (RANK + OVERSAMPLE).min(n);
    if !fro.is_finite() || fro == 0.0 || n == 0 {
        return Ok(Spectrum {
            fro,
            sigma: Vec::new(),
        });
    }
    let m = Tensor::from_vec(a, (rows, cols), device).map_err(candle)?;
    let gram = if n <= width {
        // Small side within the sketch: exact, from the Gram matrix.
        if rows <= cols {
            m.matmul(&m.t().map_err(candle)?).map_err(candle)?
        } else {
            m.t().map_err(candle)?.matmul(&m).map_err(candle)?
        }
    } else {
        let omega = Tensor::from_vec(gaussian(seed, cols * width), (cols, width), device)
            .map_err(candle)?;
        let mut q = orthonormal(&m.matmul(&omega).map_err(candle)?)?;
        for _ in 0..POWER_ITERS {
            // (Qᵀ Δ)ᵀ = Δᵀ Q without transposing Δ itself.
            let z = q.t().map_err(candle)?.matmul(&m).map_err(candle)?;
            let w = orthonormal(&z.t().map_err(candle)?.contiguous().map_err(candle)?)?;
            q = orthonormal(&m.matmul(&w).map_err(candle)?)?;
        }
        let b = q.t().map_err(candle)?.matmul(&m).map_err(candle)?;
        b.matmul(&b.t().map_err(candle)?).map_err(candle)?
    };
    let mut sigma: Vec<f64> = eigenvalues(&gram)?
        .into_iter()
        .map(|l| l.max(0.0).sqrt())
        .collect();
    sigma.sort_by(|x, y| y.total_cmp(x));
    sigma.truncate(RANK);
    Ok(Spectrum { fro, sigma })
}

/// Eigenvalues of a small symmetric candle matrix.
fn eigenvalues(g: &Tensor) -> Result<Vec<f64>> {
    let (r, c) = g.dims2().map_err(candle)?;
    let data: Vec<f64> = g
        .to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .map_err(candle)?;
    let mat = DMatrix::from_row_slice(r, c, &data);
    let mat = (&mat + mat.transpose()) * 0.5;
    Ok(SymmetricEigen::new(mat)
        .eigenvalues
        .iter()
        .copied()
        .collect())
}

/// An orthonormal basis of the column space of `y` (tall), by the
/// eigenvectors of YᵀY, twice for accuracy; directions with eigenvalues
/// below 1e-13 of the largest are dropped (they carry no energy).
fn orthonormal(y: &Tensor) -> Result<Tensor> {
    let mut q = y.clone();
    for _ in 0..2 {
        let g = q.t().map_err(candle)?.matmul(&q).map_err(candle)?;
        let (l, _) = g.dims2().map_err(candle)?;
        let data: Vec<f64> = g.flatten_all().and_then(|t| t.to_vec1()).map_err(candle)?;
        let mat = DMatrix::from_row_slice(l, l, &data);
        let eig = SymmetricEigen::new((&mat + mat.transpose()) * 0.5);
        let top = eig.eigenvalues.iter().copied().fold(0.0f64, f64::max);
        let keep: Vec<usize> = (0..l)
            .filter(|&i| eig.eigenvalues[i] > top * 1e-13 && eig.eigenvalues[i] > 0.0)
            .collect();
        // Columns v_i / sqrt(λ_i) of the kept eigenvectors.
        let mut scale = vec![0.0; l * keep.len()];
        for (c, &i) in keep.iter().enumerate() {
            let s = 1.0 / eig.eigenvalues[i].sqrt();
            for r in 0..l {
                scale[r * keep.len() + c] = eig.eigenvectors[(r, i)] * s;
            }
        }
        let s = Tensor::from_vec(scale, (l, keep.len()), q.device()).map_err(candle)?;
        q = q.matmul(&s).map_err(candle)?;
    }
    Ok(q)
}

/// `n` standard normal draws (Box–Muller over SplitMix64), deterministic.
fn gaussian(seed: u64, n: usize) -> Vec<f64> {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let (u, v) = (next(), next());
        let r = (-2.0 * u.ln()).sqrt();
        let t = std::f64::consts::TAU * v;
        out.push(r * t.cos());
        out.push(r * t.sin());
    }
    out.truncate(n);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Low rank plus noise: Σ_r s_r u_r v_rᵀ + ε N.
    fn matrix(rows: usize, cols: usize, rank: usize, noise: f64, seed: u64) -> Vec<f64> {
        let u = gaussian(seed, rows * rank);
        let v = gaussian(seed + 1, cols * rank);
        let e = gaussian(seed + 2, rows * cols);
        let mut a = vec![0.0; rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                let mut x = noise * e[r * cols + c];
                for k in 0..rank {
                    x += (rank - k) as f64 * u[r * rank + k] * v[c * rank + k];
                }
                a[r * cols + c] = x;
            }
        }
        a
    }

    #[test]
    fn sketched_energies_are_within_a_hundredth_of_an_exact_svd() {
        for (rows, cols, rank, noise) in [
            (300, 200, 10, 0.5),
            (200, 350, 40, 2.0),
            (400, 400, 150, 1.0),
            (260, 180, 5, 0.0),
            (100, 90, 20, 0.3),
        ] {
            let a = matrix(rows, cols, rank, noise, rows as u64);
            let got = spectrum(a.clone(), rows, cols, &Device::Cpu, 42).unwrap();
            let svd = DMatrix::from_row_slice(rows, cols, &a).svd(false, false);
            let mut s: Vec<f64> = svd.singular_values.iter().copied().collect();
            s.sort_by(|x, y| y.total_cmp(x));
            let exact = Spectrum {
                fro: s.iter().map(|x| x * x).sum::<f64>().sqrt(),
                sigma: s,
            };
            assert!((got.fro - exact.fro).abs() <= 1e-9 * exact.fro);
            for k in TOPS {
                let (g, e) = (got.energy_top(k), exact.energy_top(k));
                assert!(
                    (g - e).abs() <= 0.01,
                    "{rows}x{cols} rank {rank}: top{k} {g} vs {e}"
                );
            }
            let (g, e) = (got.stable_rank(), exact.stable_rank());
            assert!((g - e).abs() <= 0.01 * e, "stable rank {g} vs {e}");
        }
    }
}
