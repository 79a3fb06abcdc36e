//! Runtime selection of vector instruction sets for the hot kernels.
//!
//! [`simd_dispatch!`] wraps an `#[inline(always)]` kernel in copies compiled
//! for AVX-512 and AVX2+FMA and picks the best the CPU has, falling back to
//! the baseline build. The arithmetic is the same in every copy (Rust never
//! fuses a multiply and an add on its own), so results are bit-identical
//! whichever copy runs; only the width of the vector registers differs.
//!
//! Each copy's feature list is written once: the same literals become its
//! `#[target_feature]` attributes and its `is_x86_feature_detected!` checks,
//! so a copy never runs on a CPU that lacks any feature it is compiled for.

/// Defines `fn $name(args) -> ret` that runs `$kernel(args)` compiled for
/// the widest vector extension available at run time.
macro_rules! simd_dispatch {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) => $kernel:path) => {
        $crate::simd::simd_dispatch! { @body [$(#[$meta])*] [$vis] $name ($($arg: $ty),*) ($($arg),*) [] [()] $kernel }
    };
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) -> $ret:ty => $kernel:path) => {
        $crate::simd::simd_dispatch! { @body [$(#[$meta])*] [$vis] $name ($($arg: $ty),*) ($($arg),*) [-> $ret] [$ret] $kernel }
    };
    (@body [$($meta:tt)*] [$vis:vis] $name:ident $params:tt $call:tt [$($sig:tt)*] [$ret:ty] $kernel:path) => {
        $($meta)*
        $vis fn $name $params $($sig)* {
            #[cfg(target_arch = "x86_64")]
            {
                $crate::simd::simd_variants! {
                    $params $call $ret, $kernel;
                    // Widest first.
                    Avx512: "avx512f", "avx512vl", "avx512dq", "avx512bw", "avx2", "fma";
                    Avx2: "avx2", "fma";
                }
            }
            #[cfg(test)]
            $crate::simd::note_used($crate::simd::Variant::Scalar);
            $kernel $call
        }
    };
}

/// The x86 copies of a kernel, each compiled for its features and run
/// only when the CPU has every one of them (and, in tests, when allowed).
#[cfg(target_arch = "x86_64")]
macro_rules! simd_variants {
    ($params:tt $call:tt $ret:ty, $kernel:path; $($variant:ident: $($feature:tt),+;)+) => {
        $(
            if $crate::simd::allowed($crate::simd::Variant::$variant)
                $(&& std::arch::is_x86_feature_detected!($feature))+
            {
                $(#[target_feature(enable = $feature)])+
                #[allow(clippy::unused_unit)]
                unsafe fn run $params -> $ret {
                    $kernel $call
                }
                #[cfg(test)]
                $crate::simd::note_used($crate::simd::Variant::$variant);
                // SAFETY: the CPU has every feature `run` is compiled for;
                // each was checked just above.
                return unsafe { run $call };
            }
        )+
    };
}

/// `x` where `keep` holds, else +0.0, as a bitwise AND. Written so because
/// `if keep { x } else { 0.0 }` over a slice compiles to a masked store,
/// which AMD's cores execute an order of magnitude slower than a plain one.
#[inline(always)]
pub(crate) fn keep_or_zero(x: f64, keep: bool) -> f64 {
    f64::from_bits(x.to_bits() & 0u64.wrapping_sub(u64::from(keep)))
}

/// `f64::NAN` (the same bits as everywhere else) where `poison` holds,
/// else `x`; a bitwise select, branch-free for the reason given at
/// [`keep_or_zero`].
#[inline(always)]
pub(crate) fn nan_if(x: f64, poison: bool) -> f64 {
    let mask = 0u64.wrapping_sub(u64::from(poison));
    f64::from_bits((x.to_bits() & !mask) | (f64::NAN.to_bits() & mask))
}

/// A piece of generic work to run compiled for the CPU's widest vector
/// extension (see [`fastest`]). Implementations mark `run` `#[inline(always)]`
/// and call only `#[inline(always)]` code in their hot loops, so the whole
/// loop is compiled inside the dispatched copy.
pub(crate) trait Kernel {
    type Output;
    fn run(self) -> Self::Output;
}

/// Runs `kernel` inside a copy compiled for the widest vector extension the
/// CPU has: the generic counterpart of [`simd_dispatch!`].
#[inline(always)]
pub(crate) fn fastest<K: Kernel>(kernel: K) -> K::Output {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")]
        unsafe fn avx512<K: Kernel>(kernel: K) -> K::Output {
            kernel.run()
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<K: Kernel>(kernel: K) -> K::Output {
            kernel.run()
        }
        if allowed(Variant::Avx512)
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has every feature `avx512` is compiled for.
            return unsafe { avx512(kernel) };
        }
        if allowed(Variant::Avx2)
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has every feature `avx2` is compiled for.
            return unsafe { avx2(kernel) };
        }
    }
    kernel.run()
}

pub(crate) use simd_dispatch;
#[cfg(target_arch = "x86_64")]
pub(crate) use simd_variants;

/// The compiled copies of a kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(test), allow(dead_code))] // the baseline is named in tests only
pub(crate) enum Variant {
    /// The baseline build (SSE2 on x86_64).
    Scalar,
    Avx2,
    Avx512,
}

impl Variant {
    /// Every variant, baseline first.
    #[cfg(test)]
    pub(crate) const ALL: [Variant; 3] = [Variant::Scalar, Variant::Avx2, Variant::Avx512];
}

#[cfg(test)]
thread_local! {
    static FORCED: std::cell::Cell<Option<Variant>> = const { std::cell::Cell::new(None) };
    static USED: std::cell::Cell<Option<Variant>> = const { std::cell::Cell::new(None) };
}

/// Whether dispatch may pick `variant` (always, outside tests).
#[inline(always)]
#[allow(dead_code)] // unused off x86_64
pub(crate) fn allowed(variant: Variant) -> bool {
    #[cfg(test)]
    return FORCED.with(|f| f.get().is_none_or(|f| f == variant));
    #[cfg(not(test))]
    {
        let _ = variant;
        true
    }
}

/// Records which copy ran, for [`with_variant`].
#[cfg(test)]
pub(crate) fn note_used(variant: Variant) {
    USED.with(|u| u.set(Some(variant)));
}

/// Runs `f` on this thread with dispatch limited to `variant` (or the
/// baseline when the CPU lacks it); returns its result and the copy that
/// the last dispatched call actually ran.
#[cfg(test)]
pub(crate) fn with_variant<R>(variant: Variant, f: impl FnOnce() -> R) -> (R, Option<Variant>) {
    FORCED.with(|c| c.set(Some(variant)));
    USED.with(|u| u.set(None));
    let r = f();
    FORCED.with(|c| c.set(None));
    (r, USED.with(|u| u.get()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::FloatType;
    use crate::kernels::{delta_into_f32, delta_into_f64, delta_stats, merge_range, Addend};
    use crate::testdata::noise;

    /// More than one merge segment (1 << 22 elements), and not a multiple
    /// of any block or task size.
    const N: usize = (1 << 22) + 4099;

    fn encode(ty: FloatType, values: &[f64]) -> Vec<u8> {
        let mut out = vec![0u8; values.len() * ty.size()];
        crate::dtype::encode_f64(ty, values, &mut out);
        out
    }

    /// Runs `f` under every variant the CPU has and checks each result
    /// equals the baseline's (compared as `Debug` text, which spells every
    /// f64 bit pattern but NaN payloads distinctly, or as bytes).
    fn same_everywhere<R: std::fmt::Debug + PartialEq>(what: &str, f: impl Fn() -> R) {
        let (scalar, used) = with_variant(Variant::Scalar, &f);
        assert_eq!(used, Some(Variant::Scalar), "{what}");
        let scalar_text = format!("{scalar:?}");
        let mut ran = 1;
        for v in [Variant::Avx2, Variant::Avx512] {
            let (r, used) = with_variant(v, &f);
            if used != Some(v) {
                eprintln!("{what}: {v:?} not available on this CPU; not compared");
                continue;
            }
            ran += 1;
            assert!(r == scalar, "{what}: {v:?} differs from the baseline");
            assert_eq!(format!("{r:?}"), scalar_text, "{what}: {v:?}");
        }
        assert!(ran >= 1);
    }

    #[test]
    fn every_variant_matches_the_baseline_bit_for_bit_across_segments() {
        let base_v = noise(1, N, 0.05);
        let base = encode(FloatType::BF16, &base_v);
        // Deltas of several sizes, some below the types' resolution, plus a
        // few exact zeros, NaN and infinity.
        let models: Vec<(FloatType, Vec<u8>)> = [
            (FloatType::BF16, 2u64, 1e-2),
            (FloatType::F16, 3, 1e-4),
            (FloatType::F32, 4, 1e-7),
        ]
        .iter()
        .map(|&(ty, seed, scale)| {
            let mut v: Vec<f64> = base_v
                .iter()
                .zip(noise(seed, N, scale))
                .enumerate()
                .map(|(i, (b, d))| if i % 11 == 0 { *b } else { b + d })
                .collect();
            if ty == FloatType::F32 {
                v[(1 << 22) + 5] = f64::NAN;
                v[17] = f64::INFINITY;
            }
            (ty, encode(ty, &v))
        })
        .collect();

        for out_ty in [FloatType::BF16, FloatType::F32] {
            let addends: Vec<Addend<'_>> = models
                .iter()
                .zip([0.7, -0.3, 1.1])
                .map(|((ty, bytes), lambda)| Addend {
                    lambda,
                    ty: *ty,
                    bytes,
                    is_delta: false,
                })
                .collect();
            // Whole, and split where the merge splits: at the segment size.
            let whole = || {
                let mut out = vec![0u8; N * out_ty.size()];
                let bad = merge_range(FloatType::BF16, &base, &addends, out_ty, &mut out);
                (bad, out)
            };
            same_everywhere(&format!("merge_range to {out_ty}"), whole);
            let split = 1 << 22;
            let pieces = || {
                let mut out = vec![0u8; N * out_ty.size()];
                let (lo, hi) = out.split_at_mut(split * out_ty.size());
                let part = |from: usize, to: usize| -> Vec<Addend<'_>> {
                    addends
                        .iter()
                        .map(|a| Addend {
                            bytes: &a.bytes[a.ty.byte_range(from, to)],
                            ..*a
                        })
                        .collect()
                };
                let b = FloatType::BF16;
                let bad = merge_range(
                    b,
                    &base[b.byte_range(0, split)],
                    &part(0, split),
                    out_ty,
                    lo,
                ) + merge_range(
                    b,
                    &base[b.byte_range(split, N)],
                    &part(split, N),
                    out_ty,
                    hi,
                );
                (bad, out)
            };
            assert!(
                whole() == pieces(),
                "a split merge differs from a whole one"
            );
        }

        let refs: Vec<crate::kernels::Operand<'_>> = models
            .iter()
            .map(|(t, b)| crate::kernels::Operand {
                ty: *t,
                bytes: b.as_slice(),
                is_delta: false,
            })
            .collect();
        same_everywhere("delta_stats", || {
            let acc = delta_stats(FloatType::BF16, &base, &refs);
            format!("{acc:?}")
        });
        for (ty, bytes) in &models {
            same_everywhere(&format!("delta_into_f32 from {ty}"), || {
                let mut out = vec![0f32; N];
                let mut inexact = Vec::new();
                delta_into_f32(FloatType::BF16, &base, *ty, bytes, &mut out, &mut inexact);
                let bits: Vec<u32> = out.iter().map(|x| x.to_bits()).collect();
                let inexact: Vec<u64> = inexact.iter().map(|x| x.to_bits()).collect();
                (bits, inexact)
            });
            same_everywhere(&format!("delta_into_f64 from {ty}"), || {
                let mut out = vec![0f64; N];
                let mut inexact = Vec::new();
                delta_into_f64(FloatType::BF16, &base, *ty, bytes, &mut out, &mut inexact);
                let bits: Vec<u64> = out.iter().map(|x| x.to_bits()).collect();
                (bits, inexact.len())
            });
        }
    }

    #[test]
    fn each_variant_is_reachable_only_with_its_features() {
        // A forced variant runs exactly when the CPU has its features.
        for v in Variant::ALL {
            let ((), used) = with_variant(v, || {
                let mut out = [0u8; 8];
                merge_range(FloatType::F32, &[0u8; 8], &[], FloatType::F32, &mut out);
            });
            #[cfg(target_arch = "x86_64")]
            let has = match v {
                Variant::Scalar => true,
                Variant::Avx2 => {
                    std::arch::is_x86_feature_detected!("avx2")
                        && std::arch::is_x86_feature_detected!("fma")
                }
                Variant::Avx512 => {
                    std::arch::is_x86_feature_detected!("avx512f")
                        && std::arch::is_x86_feature_detected!("avx512vl")
                        && std::arch::is_x86_feature_detected!("avx512dq")
                        && std::arch::is_x86_feature_detected!("avx512bw")
                        && std::arch::is_x86_feature_detected!("avx2")
                        && std::arch::is_x86_feature_detected!("fma")
                }
            };
            #[cfg(not(target_arch = "x86_64"))]
            let has = v == Variant::Scalar;
            let want = if has { v } else { Variant::Scalar };
            assert_eq!(used, Some(want), "{v:?}");
        }
    }
}
