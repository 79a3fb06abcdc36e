//! The first pass of a magnitude selection: a window around the threshold.
//!
//! A sample of the task vector's blocks estimates where the k-th largest
//! |d| lies; [`Window::place`] puts a narrow window of keys around that
//! estimate (five standard deviations of the sample's rank on each side),
//! with the estimated threshold key itself, `pred`, apart. One pass over
//! the tensors ([`WindowPass`]) then counts the keys above the window,
//! counts the keys equal to `pred` block by block, and gathers every other
//! key inside the window with its block, so that [`Window::resolve`] finds
//! the exact cut in memory: usually no further pass is needed. Should the
//! window hold too many keys to gather, histograms of it (taken in the same
//! pass) narrow the search instead; should the sample mislead, the search
//! continues above or below the window. Either costs passes, never
//! exactness.

use super::inputs::{Block, TensorInputs, Visit, BLOCK, SEGMENT};
use super::operands::{self, Bf16Block, Operands, Values};
use super::select::{key, running_counts, sources_of, Bucket, Cut, Range, Search};
use crate::error::{Error, Result};
use crate::magnitude::{CoarseBucket, COARSE_SHIFT};
use rayon::prelude::*;

/// At least one block in this many is sampled.
const SAMPLE_EVERY: usize = 64;
/// At most about this many keys are sampled per model (32 MB): larger
/// inputs are sampled more sparsely.
const MOST_SAMPLED: usize = 1 << 22;
/// The largest key: |d| clears the sign bit (NaN sorts above infinity).
pub(crate) const MAX_KEY: u64 = i64::MAX as u64;
/// Elements past a sampled block that the kernel may have mapped with it
/// (its fault-around is 64 KiB; this covers it for every element size).
const FAULT_AROUND: usize = 1 << 16;

/// Knobs of the selection, fixed in use; tests turn them to reach its
/// rarer paths.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tuning {
    /// Most keys inside one target's window gathered as candidates
    /// (16 bytes each, shared out among the threads); beyond this the
    /// window's histograms take over.
    pub candidates: usize,
    /// Moves the estimated threshold by this many sampled keys (tests make
    /// the sample mislead with it).
    pub skew: isize,
    /// At least this many blocks are sampled (all of them, when there are
    /// fewer).
    pub min_sampled_blocks: usize,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            candidates: 1 << 20,
            skew: 0,
            min_sampled_blocks: 8,
        }
    }
}

/// The keys of one block in every [`SAMPLE_EVERY`] of `tensors` (or fewer,
/// to at most about [`MOST_SAMPLED`] keys; every block when there are few),
/// per model slot of `models`, and whether every block was taken.
///
/// The sampled block of each stride of `every` blocks is chosen by a hash
/// of the stride's index, so that the sample does not follow rows or
/// columns (a fixed offset would see the same columns of every matrix).
pub(crate) fn sample(
    tensors: &[TensorInputs<'_>],
    models: &[usize],
    tuning: &Tuning,
) -> Result<(Vec<Vec<u64>>, bool)> {
    #[cfg(test)]
    SAMPLES.with(|n| n.set(n.get() + 1));
    let blocks: usize = tensors.iter().map(|t| t.numel().div_ceil(BLOCK)).sum();
    let every = (blocks / tuning.min_sampled_blocks.max(1))
        .clamp(1, SAMPLE_EVERY.max(blocks * BLOCK / MOST_SAMPLED));
    // The sampled blocks, in storage order: (tensor, first, last).
    let mut picked: Vec<(usize, usize, usize)> = Vec::new();
    let mut global = 0;
    for (ti, t) in tensors.iter().enumerate() {
        let n = t.numel();
        let count = n.div_ceil(BLOCK);
        for stride in global / every..(global + count).div_ceil(every) {
            let Some(b) = (stride * every + pick(stride, every)).checked_sub(global) else {
                continue;
            };
            if b < count {
                picked.push((ti, b * BLOCK, ((b + 1) * BLOCK).min(n)));
            }
        }
        global += count;
    }
    // Groups of consecutive blocks share out the threads; each writes its
    // keys at their place in every model's sample, reserved exactly.
    let sources: Vec<Vec<(usize, usize)>> = tensors.iter().map(|t| sources_of(t, models)).collect();
    let groups = (rayon::current_num_threads() * 4).clamp(1, picked.len().max(1));
    let chunks: Vec<&[(usize, usize, usize)]> = picked
        .chunks(picked.len().div_ceil(groups).max(1))
        .collect();
    let lens: Vec<Vec<usize>> = chunks
        .iter()
        .map(|chunk| {
            let mut len = vec![0usize; models.len()];
            for &(ti, first, last) in chunk.iter() {
                for &(_, s) in &sources[ti] {
                    len[s] += last - first;
                }
            }
            len
        })
        .collect();
    let mut keys: Vec<Vec<u64>> = (0..models.len())
        .map(|s| vec![0u64; lens.iter().map(|l| l[s]).sum()])
        .collect();
    let mut outs: Vec<Vec<&mut [u64]>> = chunks.iter().map(|_| Vec::new()).collect();
    for (s, all) in keys.iter_mut().enumerate() {
        let mut rest: &mut [u64] = all;
        for (out, len) in outs.iter_mut().zip(&lens) {
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(len[s]);
            out.push(head);
            rest = tail;
        }
    }
    chunks
        .into_par_iter()
        .zip(outs)
        .try_for_each(|(chunk, mut out)| -> Result<()> {
            let mut scratch = super::inputs::Scratch::default();
            let mut expanded = super::inputs::Expanded::default();
            let mut at = vec![0usize; models.len()];
            // The kernel maps an aligned 64 KiB around a fault too, before
            // and after it: what was mapped is dropped, so that a sampled
            // tensor is not left resident (unless the passes after keep
            // it), up to a segment's span of the tensor at a time per
            // thread: every release makes the other threads flush their
            // TLBs, which costs more than the dropping itself.
            // (tensor, first, end) of what awaits release.
            let mut mapped: Option<(usize, usize, usize)> = None;
            let release = |(ti, first, end): (usize, usize, usize)| {
                let t: &TensorInputs<'_> = &tensors[ti];
                if !t.keep_pages {
                    t.release(first, end);
                }
            };
            let read = (|| -> Result<()> {
                for &(ti, first, last) in chunk {
                    if crate::interrupt::requested() {
                        return Err(Error::Interrupted);
                    }
                    let t = &tensors[ti];
                    // Adapters' task vectors of the sampled block only.
                    t.expand(first, last, &mut expanded)?;
                    let block = t.decode(first, last, &expanded, &mut scratch);
                    for &(i, s) in &sources[ti] {
                        let dst = &mut out[s][at[s]..at[s] + block.len];
                        for ((k, &m), &b) in dst.iter_mut().zip(block.model(i)).zip(block.base) {
                            *k = key(m - b);
                        }
                        at[s] += block.len;
                    }
                    let around = (
                        ti,
                        first.saturating_sub(FAULT_AROUND),
                        (first + BLOCK + FAULT_AROUND).min(t.numel()),
                    );
                    mapped = match mapped {
                        Some((tj, from, _)) if tj == ti && around.2 - from <= SEGMENT => {
                            Some((ti, from, around.2))
                        }
                        earlier => {
                            if let Some(earlier) = earlier {
                                release(earlier);
                            }
                            Some(around)
                        }
                    };
                }
                Ok(())
            })();
            // However the loop ended, nothing stays mapped.
            if let Some(last) = mapped {
                release(last);
            }
            read
        })?;
    crate::guard::check()?;
    Ok((keys, every == 1))
}

#[cfg(test)]
thread_local! {
    static SAMPLES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many samples this thread has taken (tests see which selections
/// needed one).
#[cfg(test)]
pub(crate) fn samples_taken() -> usize {
    SAMPLES.with(|n| n.get())
}

/// The block sampled in stride `stride` of `every` blocks: SplitMix64's
/// output for the stride's index, modulo `every`.
fn pick(stride: usize, every: usize) -> usize {
    let mut z = (stride as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) % every as u64) as usize
}

/// What places one target's window: the selection's size and rank, and
/// its model's sample and/or its bucket by an analysis' counts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Placement {
    /// Entries selected over.
    pub total: u64,
    pub rank: u64,
    /// The sample holds every entry.
    pub complete: bool,
    pub skew: isize,
}

impl Placement {
    /// Whether counts alone place the window well: its bucket holds few
    /// enough keys for every thread part to gather its share (with room
    /// for uneven parts), so one pass finds the threshold whatever the
    /// sample would say.
    pub fn needs_no_sample(bucket: Option<&CoarseBucket>, tuning: &Tuning) -> bool {
        let share = tuning.candidates / rayon::current_num_threads().max(1);
        bucket.is_some_and(|b| b.count <= share as u64 / 2)
    }

    /// The window from the sample, narrowed to the bucket the counts say
    /// holds the threshold; the bucket itself without a sample or when the
    /// sample's window misses it. Counts that do not describe the inputs
    /// only cost passes: the window pass checks what it finds.
    pub fn place(self, sample: Option<&mut [u64]>, bucket: Option<&CoarseBucket>) -> Window {
        let of_bucket = |b: &CoarseBucket| {
            let lo = b.bucket << COARSE_SHIFT;
            let hi = (((b.bucket + 1) << COARSE_SHIFT) - 1).min(MAX_KEY);
            (lo, hi)
        };
        match (sample, bucket) {
            (Some(sample), None) => {
                Window::place(sample, self.total, self.rank, self.complete, self.skew)
            }
            (Some(sample), Some(b)) => {
                let w = Window::place(sample, self.total, self.rank, self.complete, self.skew);
                let (lo, hi) = of_bucket(b);
                if w.hi < lo || w.lo > hi {
                    Window::new(lo, hi, lo)
                } else {
                    let (lo, hi) = (w.lo.max(lo), w.hi.min(hi));
                    Window::new(lo, hi, w.pred.clamp(lo, hi))
                }
            }
            (None, Some(b)) => {
                let (lo, hi) = of_bucket(b);
                Window::new(lo, hi, lo)
            }
            // Not reached (a target without counts has its sample); every
            // key then lies in the window.
            (None, None) => Window::new(0, MAX_KEY, 0),
        }
    }
}

/// Where a target's threshold is expected: keys above `hi` are kept, keys
/// equal to `pred` are counted by block, the other keys from `lo` to `hi`
/// are gathered (and histogrammed on either side of `pred`), keys below
/// `lo` are dropped.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Window {
    pred: u64,
    hi: u64,
    lo: u64,
    /// `pred + 1..=hi`, when not empty.
    upper: Option<Range>,
    /// `lo..=pred - 1`, when not empty.
    lower: Option<Range>,
}

impl Window {
    /// Places the window for the `rank`-th largest of `total` keys from a
    /// sample of them (`complete`: the sample is every key, in any order).
    pub fn place(sample: &mut [u64], total: u64, rank: u64, complete: bool, skew: isize) -> Self {
        let s = sample.len();
        if s == 0 {
            return Self::new(0, MAX_KEY, 0);
        }
        let desc = |a: &u64, b: &u64| b.cmp(a);
        let estimate = if complete {
            rank as usize - 1
        } else {
            let q = rank as f64 / total as f64;
            ((q * s as f64).ceil() as usize).max(1) - 1
        };
        let r = estimate.saturating_add_signed(skew).min(s - 1);
        // Five standard deviations of the sample's rank (rather than four:
        // a sample of whole blocks is not one of independent keys).
        let margin = if complete {
            0
        } else {
            let q = rank as f64 / total as f64;
            (5.0 * (s as f64 * q * (1.0 - q)).sqrt()) as usize + 8
        };
        sample.select_nth_unstable_by(r, desc);
        let pred = sample[r];
        let hi = if r < margin {
            MAX_KEY
        } else if margin == 0 {
            pred
        } else {
            sample[..r].select_nth_unstable_by(r - margin, desc);
            sample[r - margin]
        };
        let lo = if r + margin >= s {
            0
        } else if margin == 0 {
            pred
        } else {
            let below = &mut sample[r + 1..];
            below.select_nth_unstable_by(margin - 1, desc);
            below[margin - 1]
        };
        Self::new(lo, hi, pred)
    }

    fn new(lo: u64, hi: u64, pred: u64) -> Self {
        Self {
            pred,
            hi,
            lo,
            upper: (hi > pred).then(|| Range::new(pred + 1, hi)),
            lower: (lo < pred).then(|| Range::new(lo, pred - 1)),
        }
    }

    /// The search for the `rank`-th largest key after the window pass.
    pub fn resolve(&self, mut acc: WindowAcc, rank: u64) -> Search {
        if acc.above >= rank {
            return Search::Narrowing {
                from: self.hi + 1,
                to: MAX_KEY,
                need: rank,
            };
        }
        let need = rank - acc.above;
        let found = if acc.overflow {
            self.search_histograms(&acc, need)
        } else {
            self.search_candidates(&mut acc.candidates, acc.equal, need)
        };
        match found {
            Ok(search) => search,
            Err(need) => Search::Done(if need == acc.equal {
                Cut::at_least(self.pred)
            } else {
                Cut::with_ties(self.pred, need, running_counts(acc.equal_blocks))
            }),
        }
    }

    /// With every key of the window gathered: the cut, or, when the
    /// threshold is `pred`, how many keys equal to it are kept.
    fn search_candidates(
        &self,
        candidates: &mut [Candidate],
        equal: u64,
        need: u64,
    ) -> std::result::Result<Search, u64> {
        let pred = self.pred;
        let split = partition(candidates, |c| c.0 > pred);
        let (upper, lower) = candidates.split_at_mut(split);
        let mut need = need;
        if need <= upper.len() as u64 {
            return Ok(Search::Done(cut_among(upper, need)));
        }
        need -= upper.len() as u64;
        if need <= equal {
            return Err(need);
        }
        need -= equal;
        if need <= lower.len() as u64 {
            return Ok(Search::Done(cut_among(lower, need)));
        }
        Ok(self.below(need - lower.len() as u64))
    }

    /// With histograms of the window: the bucket holding the threshold, or,
    /// when the threshold is `pred`, how many keys equal to it are kept.
    fn search_histograms(&self, acc: &WindowAcc, need: u64) -> std::result::Result<Search, u64> {
        let mut need = need;
        if let Some(upper) = &self.upper {
            match upper.walk(&acc.upper, need) {
                Ok(found) => return Ok(found),
                Err(count) => need -= count,
            }
        }
        if need <= acc.equal {
            return Err(need);
        }
        need -= acc.equal;
        if let Some(lower) = &self.lower {
            match lower.walk(&acc.lower, need) {
                Ok(found) => return Ok(found),
                Err(count) => need -= count,
            }
        }
        Ok(self.below(need))
    }

    /// The search below the window for its `need`-th largest key.
    fn below(&self, need: u64) -> Search {
        if self.lo == 0 {
            // Every key was counted, and there are fewer than the rank.
            return Search::Changed;
        }
        Search::Narrowing {
            from: 0,
            to: self.lo - 1,
            need,
        }
    }
}

/// A key inside a window: (key, tensor ordinal, block index).
type Candidate = (u64, u32, u32);

/// What the window pass gathers for one target.
#[derive(Debug)]
pub(crate) struct WindowAcc {
    above: u64,
    equal: u64,
    /// Keys equal to `pred` in the block being counted.
    equal_here: u64,
    /// (tensor ordinal, block index, keys equal to `pred` in the block).
    equal_blocks: Vec<(usize, usize, u64)>,
    /// The keys inside the window other than `pred`, while there are at
    /// most [`Tuning::candidates`] of them.
    candidates: Vec<Candidate>,
    /// More keys fell inside the window than `candidates` may hold.
    overflow: bool,
    /// Histograms of the keys above and below `pred`: empty until the
    /// candidates overflow.
    upper: Vec<Bucket>,
    lower: Vec<Bucket>,
}

impl WindowAcc {
    /// Nothing counted yet. The histograms are made only when the
    /// candidates overflow ([`Self::spill_to_histograms`]).
    pub fn new() -> Self {
        Self {
            above: 0,
            equal: 0,
            equal_here: 0,
            equal_blocks: Vec::new(),
            candidates: Vec::new(),
            overflow: false,
            upper: Vec::new(),
            lower: Vec::new(),
        }
    }

    /// Gives up the candidates for histograms of both sides of window `w`,
    /// made from the candidates gathered so far.
    fn spill_to_histograms(&mut self, w: &Window) {
        if self.overflow {
            return;
        }
        self.overflow = true;
        let buckets = |r: &Option<Range>| r.as_ref().map_or(Vec::new(), Range::buckets);
        self.upper = buckets(&w.upper);
        self.lower = buckets(&w.lower);
        for (k, _, _) in std::mem::take(&mut self.candidates) {
            self.histogram(w, k);
        }
    }

    /// Counts key `k`, inside window `w` and not its `pred`, in the
    /// histogram of its side.
    #[inline(always)]
    fn histogram(&mut self, w: &Window, k: u64) {
        let (range, buckets) = if k > w.pred {
            (w.upper.as_ref(), &mut self.upper)
        } else {
            (w.lower.as_ref(), &mut self.lower)
        };
        let range = range.expect("a key inside the window has its side");
        buckets[range.bucket(k)].add(k);
    }

    /// Adds another thread part's counts (of the same window `w`).
    pub fn merge(mut self, mut other: Self, w: &Window, tuning: &Tuning) -> Self {
        self.above += other.above;
        self.equal += other.equal;
        self.equal_blocks.append(&mut other.equal_blocks);
        if self.overflow
            || other.overflow
            || self.candidates.len() + other.candidates.len() > tuning.candidates
        {
            self.spill_to_histograms(w);
            other.spill_to_histograms(w);
            Bucket::add_all(&mut self.upper, &other.upper);
            Bucket::add_all(&mut self.lower, &other.lower);
        } else {
            self.candidates.extend(other.candidates);
        }
        self
    }
}

/// The cut keeping the `need` largest of `candidates` (everything above
/// them is kept too), equal keys in storage order.
fn cut_among(candidates: &mut [Candidate], need: u64) -> Cut {
    let n = need as usize;
    candidates.select_nth_unstable_by(n - 1, |a, b| b.0.cmp(&a.0));
    let key = candidates[n - 1].0;
    let above = candidates[..n - 1].iter().filter(|c| c.0 > key).count() as u64;
    let need = need - above;
    let blocks: Vec<(usize, usize, u64)> = candidates
        .iter()
        .filter(|c| c.0 == key)
        .map(|c| (c.1 as usize, c.2 as usize, 1))
        .collect();
    if blocks.len() as u64 == need {
        Cut::at_least(key)
    } else {
        Cut::with_ties(key, need, running_counts(blocks))
    }
}

/// Moves the entries for which `first` holds to the front; returns how
/// many there are.
fn partition(v: &mut [Candidate], first: impl Fn(&Candidate) -> bool) -> usize {
    let mut split = 0;
    for i in 0..v.len() {
        if first(&v[i]) {
            v.swap(split, i);
            split += 1;
        }
    }
    split
}

/// The window pass over one tensor, for every open target.
pub(crate) struct WindowPass<'a> {
    /// (position among the tensor's models, its open targets).
    pub sources: Vec<(usize, Vec<usize>)>,
    pub windows: &'a [Window],
    pub ordinal: usize,
    /// Most candidates one thread part gathers per target.
    pub part_candidates: usize,
}

/// Entries whose keys are computed at once, then tested per target.
const CHUNK: usize = 64;

impl Visit for WindowPass<'_> {
    type Acc = Vec<WindowAcc>;

    #[inline(always)]
    fn visit(&self, accs: &mut Vec<WindowAcc>, block: &Block<'_>) {
        self.visit_operands(accs, block);
    }

    /// Only where the CPU has AVX2 (chunks of [`CHUNK`] are classified in
    /// its registers, shorter tails by the portable loop): elsewhere
    /// reading the words gains nothing over decoding.
    #[inline(always)]
    fn visit_bf16(&self, accs: &mut Vec<WindowAcc>, block: &Bf16Block<'_>) -> bool {
        if !operands::avx2() {
            return false;
        }
        self.visit_operands(accs, block);
        true
    }
}

impl WindowPass<'_> {
    /// Counts and gathers one block's keys for every open target.
    #[inline(always)]
    fn visit_operands<O: Operands>(&self, accs: &mut [WindowAcc], block: &O) {
        let here = block.first() / BLOCK;
        let len = block.len();
        for (i, of_model) in &self.sources {
            let (m, b) = (block.model(*i), block.base());
            let mut start = 0;
            while start < len {
                let end = (start + CHUNK).min(len);
                let (m, b) = (m.part(start..end), b.part(start..end));
                if let [first, second] = of_model[..] {
                    // Two targets of one model (Breadcrumbs' two cuts), from
                    // one computation of the keys.
                    let ws = [&self.windows[first], &self.windows[second]];
                    for (o, c) in [first, second].into_iter().zip(classify(ws, m, b)) {
                        self.record(&mut accs[o], &self.windows[o], c, m, b, here);
                    }
                } else {
                    for &o in of_model {
                        let w = &self.windows[o];
                        let [c] = classify([w], m, b);
                        self.record(&mut accs[o], w, c, m, b, here);
                    }
                }
                start = end;
            }
            for &o in of_model {
                let acc = &mut accs[o];
                if acc.equal_here > 0 {
                    acc.equal += acc.equal_here;
                    acc.equal_blocks.push((self.ordinal, here, acc.equal_here));
                    acc.equal_here = 0;
                }
            }
        }
    }

    /// Records one chunk's keys (deltas m − b) as classified against
    /// window `w` of one target: its counts, and the keys inside it.
    #[inline(always)]
    fn record<V: Values>(
        &self,
        acc: &mut WindowAcc,
        w: &Window,
        classified: Classified,
        m: V,
        b: V,
        block: usize,
    ) {
        let Classified {
            above,
            equal,
            mut inside,
        } = classified;
        acc.above += above;
        acc.equal_here += equal;
        if w.upper.is_none() && w.lower.is_none() {
            return;
        }
        while inside != 0 {
            let j = inside.trailing_zeros() as usize;
            inside &= inside - 1;
            acc.gather(
                w,
                key(m.at(j) - b.at(j)),
                self.ordinal,
                block,
                self.part_candidates,
            );
        }
    }
}

/// How the keys of one chunk fall against a window.
#[derive(Clone, Copy)]
struct Classified {
    /// Keys above the window.
    above: u64,
    /// Keys equal to its `pred`.
    equal: u64,
    /// Bit j: key j is inside the window and not `pred`.
    inside: u64,
}

impl Classified {
    const NONE: Self = Self {
        above: 0,
        equal: 0,
        inside: 0,
    };
}

/// The keys of the deltas `m − b` (at most [`CHUNK`]) against each of the
/// windows `ws` (a model's targets: Breadcrumbs has two), each key computed
/// once.
#[inline(always)]
fn classify<const N: usize, V: Values>(ws: [&Window; N], m: V, b: V) -> [Classified; N] {
    let n = m.count();
    assert!(n <= CHUNK && b.count() >= n);
    #[cfg(target_arch = "x86_64")]
    if n == CHUNK && operands::avx2() {
        // SAFETY: the CPU has AVX2, checked just above; both hold CHUNK
        // entries.
        return unsafe { avx2::classify(ws, m, b) };
    }
    // Branch-free. Keys and bounds are at most MAX_KEY, so they compare as
    // signed integers.
    let mut out = [Classified::NONE; N];
    for j in 0..n {
        let k = key(m.at(j) - b.at(j)) as i64;
        for (w, c) in ws.iter().zip(out.iter_mut()) {
            let (hi, lo, pred) = (w.hi as i64, w.lo as i64, w.pred as i64);
            c.above += u64::from(k > hi);
            let is_pred = k == pred;
            c.equal += u64::from(is_pred);
            let held = (k >= lo) & (k <= hi) & !is_pred;
            c.inside |= u64::from(held) << j;
        }
    }
    out
}

/// [`classify`] four keys at a time in AVX2 registers (compilers turn the
/// portable loop's bit mask into slow variable shifts): the same
/// comparisons, so the same counts and bits.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Classified, Window, CHUNK};
    use crate::methods::operands::Values;
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU has AVX2, and `m` and `b` hold [`CHUNK`] entries.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn classify<const N: usize, V: Values>(
        ws: [&Window; N],
        m: V,
        b: V,
    ) -> [Classified; N] {
        let magnitude = _mm256_set1_epi64x(i64::MAX);
        let hi = ws.map(|w| _mm256_set1_epi64x(w.hi as i64));
        // k >= lo is k > lo − 1 (lo is at least 0, so this does not wrap).
        let below_lo = ws.map(|w| _mm256_set1_epi64x(w.lo as i64 - 1));
        let pred = ws.map(|w| _mm256_set1_epi64x(w.pred as i64));
        let mut above = [_mm256_setzero_si256(); N];
        let mut equal = [_mm256_setzero_si256(); N];
        let mut inside = [0u64; N];
        let mut j = 0;
        while j < CHUNK {
            // SAFETY: j + 4 <= CHUNK, which both hold.
            let d = _mm256_sub_pd(m.four(j), b.four(j));
            let k = _mm256_and_si256(_mm256_castpd_si256(d), magnitude);
            for t in 0..N {
                let over = _mm256_cmpgt_epi64(k, hi[t]);
                let is_pred = _mm256_cmpeq_epi64(k, pred[t]);
                let from_lo = _mm256_cmpgt_epi64(k, below_lo[t]);
                // A true mask is −1: subtracting it counts one.
                above[t] = _mm256_sub_epi64(above[t], over);
                equal[t] = _mm256_sub_epi64(equal[t], is_pred);
                let held = _mm256_andnot_si256(_mm256_or_si256(over, is_pred), from_lo);
                inside[t] |= (_mm256_movemask_pd(_mm256_castsi256_pd(held)) as u64) << j;
            }
            j += 4;
        }
        std::array::from_fn(|t| {
            let mut lanes = [[0u64; 4]; 2];
            // SAFETY: each store writes 32 bytes into a [u64; 4].
            unsafe {
                _mm256_storeu_si256(lanes[0].as_mut_ptr().cast(), above[t]);
                _mm256_storeu_si256(lanes[1].as_mut_ptr().cast(), equal[t]);
            }
            Classified {
                above: lanes[0].iter().sum(),
                equal: lanes[1].iter().sum(),
                inside: inside[t],
            }
        })
    }
}

impl WindowAcc {
    /// Records key `k`, inside window `w` and not its `pred`: as a
    /// candidate while there are at most `most`, then in the histograms.
    #[inline(always)]
    fn gather(&mut self, w: &Window, k: u64, ordinal: usize, block: usize, most: usize) {
        if !self.overflow {
            if self.candidates.len() < most {
                // Ordinals and block indices fit: 2³² blocks are 8.8·10¹²
                // entries.
                self.candidates.push((k, ordinal as u32, block as u32));
                return;
            }
            self.spill_to_histograms(w);
        }
        self.histogram(w, k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd::{with_variant, Variant};
    use crate::testdata::stored_bf16;

    #[test]
    fn classify_counts_as_the_definition_says_in_every_form() {
        // Deltas on a coarse grid, so that many keys land on the window's
        // bounds and on its predicted threshold.
        let mut s = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let b: Vec<f64> = (0..CHUNK).map(|_| (next() % 64) as f64 / 32.0).collect();
        let grid = |k: u64| (k as f64 - 8.0) / 64.0;
        for round in 0..200 {
            let m: Vec<f64> = b.iter().map(|b| b + grid(next() % 17)).collect();
            let keys: Vec<u64> = m.iter().zip(&b).map(|(m, b)| key(m - b)).collect();
            let mut sorted = keys.clone();
            sorted.sort_unstable();
            let (lo, pred, hi) = match round % 3 {
                0 => (sorted[10], sorted[30], sorted[50]),
                1 => (0, sorted[0], sorted[63]),
                _ => (sorted[20], sorted[20], sorted[20]),
            };
            let w = Window::new(lo, hi, pred);
            // A second window, as Breadcrumbs' second target: above the first.
            let w2 = Window::new(sorted[40], sorted[60], sorted[50]);
            let definition = |w: &Window| {
                let (lo, pred, hi) = (w.lo, w.pred, w.hi);
                let above = keys.iter().filter(|&&k| k > hi).count() as u64;
                let equal = keys.iter().filter(|&&k| k == pred).count() as u64;
                let inside = keys
                    .iter()
                    .enumerate()
                    .filter(|&(_, &k)| k >= lo && k <= hi && k != pred)
                    .fold(0u64, |bits, (j, _)| bits | 1 << j);
                (above, equal, inside)
            };
            // The grid's values are exact in bf16: the stored words too.
            let words = |v: &[f64]| -> Vec<u16> {
                let (words, decoded) = stored_bf16(v);
                for (x, d) in v.iter().zip(&decoded) {
                    assert_eq!(x.to_bits(), d.to_bits(), "{x} is a bf16");
                }
                words
            };
            let (m16, b16) = (words(&m), words(&b));
            let counts = |c: &Classified| (c.above, c.equal, c.inside);
            for variant in [Variant::Scalar, Variant::Avx2] {
                let (decoded, _) = with_variant(variant, || {
                    (
                        classify([&w], &m[..], &b[..]),
                        classify([&w, &w2], &m[..], &b[..]),
                    )
                });
                let (stored, _) = with_variant(variant, || {
                    (
                        classify([&w], &m16[..], &b16[..]),
                        classify([&w, &w2], &m16[..], &b16[..]),
                    )
                });
                for ((one, two), form) in [(decoded, "f64"), (stored, "bf16")] {
                    let what = format!("{variant:?} {form}, round {round}");
                    assert_eq!(counts(&one[0]), definition(&w), "{what}");
                    assert_eq!(counts(&two[0]), definition(&w), "{what}, pair");
                    assert_eq!(counts(&two[1]), definition(&w2), "{what}, pair");
                }
            }
        }
    }
}
