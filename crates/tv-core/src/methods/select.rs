//! Exact top-k selection of task-vector entries by magnitude, streaming.
//!
//! TIES, magnitude pruning and Breadcrumbs keep each task vector's k
//! largest entries by |d|, within one tensor or over a whole model. The k
//! largest are found without sorting and without holding the task vector:
//! selection on the bits of |d| as an f64 (for non-negative floats the bit
//! pattern orders like the value). A sample of the blocks places a narrow
//! window of keys around the threshold; one pass counts the keys above it
//! and gathers the few inside it (see [`super::window`]); further passes narrow
//! the bucket holding the k-th largest only when the sample misled. Equal
//! magnitudes at the threshold are kept in storage order (the lower flat
//! index first; over a model, the earlier tensor first): their counts per
//! block tell the merge, block by block, which of them fall within k.

use super::inputs::{per_thread, Block, TensorInputs, Visit, BLOCK};
use super::window::{self, Tuning, Window, WindowAcc, WindowPass};
use crate::error::{Error, Result};
use crate::magnitude::{CoarseBucket, CoarseCounts};
use crate::simd::keep_or_zero;
use rayon::prelude::*;

/// The key of a task-vector entry: the bits of |d| (NaN sorts highest).
#[inline(always)]
pub(crate) fn key(d: f64) -> u64 {
    d.abs().to_bits()
}

/// Keep the `rank` largest entries of model `model` (index in the family).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Target {
    pub model: usize,
    pub rank: u64,
}

/// A selection: entries with a key above `key` are kept, entries with a key
/// equal to it are kept while fewer than `need` equal ones precede them.
#[derive(Debug, Clone)]
pub(crate) struct Cut {
    key: u64,
    need: u64,
    /// (tensor ordinal, block index, equal keys in earlier blocks) for each
    /// block holding keys equal to `key`, in storage order.
    ties: Vec<(usize, usize, u64)>,
}

impl Cut {
    /// Keeps everything.
    pub fn all() -> Self {
        Self {
            key: 0,
            need: u64::MAX,
            ties: Vec::new(),
        }
    }

    /// Keeps nothing.
    pub fn none() -> Self {
        Self {
            key: u64::MAX,
            need: 0,
            ties: Vec::new(),
        }
    }

    /// Keeps every key from `key` up.
    pub fn at_least(key: u64) -> Self {
        Self {
            key,
            need: u64::MAX,
            ties: Vec::new(),
        }
    }

    /// Keeps the keys above `key` and the first `need` equal to it, given
    /// the equal keys before each block that holds some (see
    /// [`running_counts`]).
    pub fn with_ties(key: u64, need: u64, ties: Vec<(usize, usize, u64)>) -> Self {
        Self { key, need, ties }
    }

    /// Equal keys before block `block` of tensor `ordinal`, and how many
    /// the block holds.
    fn ties_at(&self, ordinal: usize, block: usize) -> (u64, u64) {
        if self.need == u64::MAX {
            return (0, 0);
        }
        let i = self
            .ties
            .partition_point(|&(o, b, _)| (o, b) < (ordinal, block));
        match self.ties.get(i) {
            Some(&(o, b, before)) if (o, b) == (ordinal, block) => {
                let next = self.ties.get(i + 1).map_or(u64::MAX, |t| t.2);
                (before, next.saturating_sub(before))
            }
            Some(&(_, _, before)) => (before, 0),
            None => (u64::MAX / 2, 0),
        }
    }

    /// Equal keys before block `block` of tensor `ordinal`.
    fn ties_before(&self, ordinal: usize, block: usize) -> u64 {
        self.ties_at(ordinal, block).0
    }

    /// Whether the cut keeps an entry of key `key`, given how many equal
    /// keys came before it (`equal_seen`, advanced here).
    #[inline(always)]
    fn keeps(&self, key: u64, equal_seen: &mut u64) -> bool {
        let equal = key == self.key;
        let kept = key > self.key || (equal && *equal_seen < self.need);
        *equal_seen += u64::from(equal);
        kept
    }

    /// Keeps in `out` the deltas the cut keeps and zeroes the others; the
    /// block starts at element `first` (a multiple of [`BLOCK`]) of tensor
    /// `ordinal`.
    #[inline(always)]
    pub fn apply(&self, ordinal: usize, first: usize, out: &mut [f64]) {
        // Only the block where the kept ties run out needs counting; before
        // it every equal key is kept, after it none.
        if let Some(cut) = self.threshold(ordinal, first / BLOCK) {
            for d in out.iter_mut() {
                *d = keep_or_zero(*d, cut.keeps(key(*d)));
            }
            return;
        }
        let mut seen = self.ties_before(ordinal, first / BLOCK);
        for d in out.iter_mut() {
            if !self.keeps(key(*d), &mut seen) {
                *d = 0.0;
            }
        }
    }

    /// Keeps the deltas that `self` keeps and `inner` does not (Breadcrumbs'
    /// window below the outliers).
    #[inline(always)]
    pub fn apply_without(&self, inner: &Cut, ordinal: usize, first: usize, out: &mut [f64]) {
        let block = first / BLOCK;
        let (outer_plain, inner_plain) = (
            self.threshold(ordinal, block),
            inner.threshold(ordinal, block),
        );
        if let (Some(outer), Some(inner)) = (outer_plain, inner_plain) {
            // Vectorised: no cut has to count its ties in this block.
            for d in out.iter_mut() {
                let k = key(*d);
                *d = keep_or_zero(*d, outer.keeps(k) && !inner.keeps(k));
            }
            return;
        }
        let (mut seen, mut seen_inner) = (
            self.ties_before(ordinal, block),
            inner.ties_before(ordinal, block),
        );
        for d in out.iter_mut() {
            let key = key(*d);
            let outer = self.keeps(key, &mut seen);
            let outlier = inner.keeps(key, &mut seen_inner);
            if !outer || outlier {
                *d = 0.0;
            }
        }
    }

    /// The cut in block `block` of tensor `ordinal` as a plain threshold,
    /// unless it is the one block where the kept ties run out.
    #[inline(always)]
    pub fn threshold(&self, ordinal: usize, block: usize) -> Option<Threshold> {
        self.plain(ordinal, block)
            .map(|ties_kept| Threshold::new(self.key, ties_kept))
    }

    /// Whether every key equal to the threshold in block `block` is kept
    /// (`Some(true)`) or dropped (`Some(false)`); `None` for the one block
    /// where the kept ties run out.
    fn plain(&self, ordinal: usize, block: usize) -> Option<bool> {
        let (before, here) = self.ties_at(ordinal, block);
        if here == 0 || before + here <= self.need || before >= self.need {
            Some(before < self.need)
        } else {
            None
        }
    }
}

/// A cut within one block that needs no counting: keys above `key` are
/// kept, and keys equal to it when `ties_kept`. Held as the largest key
/// dropped, so that the test is one signed comparison (keys are at most
/// [`window::MAX_KEY`], which AVX2 compares as signed integers), and a loop
/// testing it keeps it in a register.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Threshold {
    /// Keys above this are kept; `i64::MAX` keeps none.
    dropped_up_to: i64,
}

impl Threshold {
    pub(crate) fn new(key: u64, ties_kept: bool) -> Self {
        let highest_dropped = if ties_kept {
            // Key 0 with its ties kept keeps every key.
            key.checked_sub(1)
                .map_or(-1, |k| k.min(window::MAX_KEY) as i64)
        } else {
            key.min(window::MAX_KEY) as i64
        };
        Self {
            dropped_up_to: highest_dropped,
        }
    }

    /// Whether an entry of key `key` is kept.
    #[inline(always)]
    pub fn keeps(self, key: u64) -> bool {
        key as i64 > self.dropped_up_to
    }

    /// Keys above this are kept (for kernels that compare lanes).
    #[inline(always)]
    pub fn dropped_up_to(self) -> i64 {
        self.dropped_up_to
    }
}

/// Buckets of a histogram over a [`Range`] of keys.
const BUCKETS: usize = 2048;

/// Where one target's search stands.
#[derive(Debug, Clone)]
pub(crate) enum Search {
    /// Not started: the window pass decides.
    Open,
    /// The threshold is a key in `from..=to`; the top `need` keys of that
    /// range are kept.
    Narrowing {
        from: u64,
        to: u64,
        need: u64,
    },
    Done(Cut),
    /// The threshold key is known; equal keys must be counted by block.
    Ties {
        key: u64,
        need: u64,
    },
    /// A later pass found fewer entries than an earlier one.
    Changed,
}

/// Finds the cut of every target over `tensors` (one tensor for a
/// per-tensor density, every tensor of the model for a whole-model one).
///
/// A sample and one pass place each threshold exactly in the usual case
/// (see [`super::window`]); otherwise narrowing passes histogram the range
/// that holds it until a bucket holds one value or is kept whole, and a
/// last pass counts the keys equal to the threshold block by block.
pub(crate) fn select(tensors: &[TensorInputs<'_>], targets: &[Target]) -> Result<Vec<Cut>> {
    select_tuned(tensors, targets, Tuning::default(), &[])
}

/// [`select`] with each model's magnitudes counted beforehand (indexed by
/// family model; see [`window::Placement`]): a count that holds for the
/// entries selected over places that model's window without a sample.
pub(crate) fn select_counted(
    tensors: &[TensorInputs<'_>],
    targets: &[Target],
    counts: &[Option<CoarseCounts>],
) -> Result<Vec<Cut>> {
    select_tuned(tensors, targets, Tuning::default(), counts)
}

/// [`select`] with its knobs and any counts given.
pub(crate) fn select_tuned(
    tensors: &[TensorInputs<'_>],
    targets: &[Target],
    tuning: Tuning,
    counts: &[Option<CoarseCounts>],
) -> Result<Vec<Cut>> {
    let models: Vec<usize> = {
        let mut m: Vec<usize> = targets.iter().map(|t| t.model).collect();
        m.sort_unstable();
        m.dedup();
        m
    };
    let slot = |model: usize| models.binary_search(&model).expect("target model");
    let mut totals = vec![0u64; models.len()];
    for t in tensors {
        for (_, s) in sources_of(t, &models) {
            totals[s] += t.numel() as u64;
        }
    }
    let mut searches: Vec<Search> = targets
        .iter()
        .map(|t| {
            if t.rank == 0 {
                Search::Done(Cut::none())
            } else if t.rank >= totals[slot(t.model)] {
                Search::Done(Cut::all())
            } else {
                Search::Open
            }
        })
        .collect();

    // The window pass.
    let open: Vec<usize> = (0..targets.len())
        .filter(|&k| matches!(searches[k], Search::Open))
        .collect();
    if !open.is_empty() {
        // Each target's bucket by the counts that hold for its model.
        let buckets: Vec<Option<CoarseBucket>> = open
            .iter()
            .map(|&k| {
                let Target { model, rank } = targets[k];
                let counts = counts.get(model)?.as_ref()?;
                (counts.entries == totals[slot(model)] && counts.is_consistent())
                    .then(|| counts.bucket_of_rank(rank))
                    .flatten()
            })
            .collect();
        // Sample only the models that some target still needs it for.
        let sampled: Vec<usize> = {
            let mut m: Vec<usize> = open
                .iter()
                .zip(&buckets)
                .filter(|(_, b)| !window::Placement::needs_no_sample(b.as_ref(), &tuning))
                .map(|(&k, _)| targets[k].model)
                .collect();
            m.sort_unstable();
            m.dedup();
            m
        };
        let (mut samples, complete) = if sampled.is_empty() {
            (Vec::new(), false)
        } else {
            window::sample(tensors, &sampled, &tuning)?
        };
        // The window of open target `o`.
        let place = |o: usize, sample: Option<&mut [u64]>| {
            let Target { model, rank } = targets[open[o]];
            window::Placement {
                total: totals[slot(model)],
                rank,
                complete,
                skew: tuning.skew,
            }
            .place(sample, buckets[o].as_ref())
        };
        // Placing selects within the sample (reordering it): each model's
        // targets in turn on its sample, the models side by side.
        let mut windows: Vec<Option<Window>> = vec![None; open.len()];
        debug_assert_eq!(samples.len(), sampled.len(), "a sample per sampled model");
        let placed: Vec<Vec<(usize, Window)>> = samples
            .par_iter_mut()
            .zip(&sampled)
            .map(|(sample, &model)| {
                (0..open.len())
                    .filter(|&o| targets[open[o]].model == model)
                    .map(|o| (o, place(o, Some(&mut sample[..]))))
                    .collect()
            })
            .collect();
        for (o, w) in placed.into_iter().flatten() {
            windows[o] = Some(w);
        }
        let windows: Vec<Window> = windows
            .into_iter()
            .enumerate()
            .map(|(o, w)| w.unwrap_or_else(|| place(o, None)))
            .collect();
        let mut accs = per_thread(|| windows.iter().map(|_| WindowAcc::new()).collect::<Vec<_>>());
        // Each thread part may gather its share of the candidates.
        let part_candidates = tuning.candidates.div_ceil(accs.len());
        for t in tensors {
            // The open targets of each of the tensor's models.
            let mut sources: Vec<(usize, Vec<usize>)> = Vec::new();
            for (o, &k) in open.iter().enumerate() {
                let Some(i) = source_of(t, targets[k].model) else {
                    continue;
                };
                match sources.iter_mut().find(|(j, _)| *j == i) {
                    Some((_, of_model)) => of_model.push(o),
                    None => sources.push((i, vec![o])),
                }
            }
            t.scan(
                false,
                &mut accs,
                &WindowPass {
                    sources,
                    windows: &windows,
                    ordinal: t.ordinal,
                    part_candidates,
                },
            )?;
        }
        // Per target: the thread parts' findings, merged and resolved, the
        // targets spread over the threads (sorting candidates takes time).
        let mut by_target: Vec<Vec<WindowAcc>> = (0..open.len()).map(|_| Vec::new()).collect();
        for part in accs {
            for (o, acc) in part.into_iter().enumerate() {
                by_target[o].push(acc);
            }
        }
        let resolved: Vec<Search> = by_target
            .into_par_iter()
            .zip(open.par_iter().zip(&windows))
            .map(|(parts, (&k, w))| {
                let acc = parts
                    .into_iter()
                    .reduce(|a, b| a.merge(b, w, &tuning))
                    .expect("one part");
                w.resolve(acc, targets[k].rank)
            })
            .collect();
        for (&k, search) in open.iter().zip(resolved) {
            searches[k] = search;
        }
    }

    // Narrowing passes: the buckets of the range that holds the threshold.
    loop {
        let open: Vec<(usize, Range)> = searches
            .iter()
            .enumerate()
            .filter_map(|(k, s)| match *s {
                Search::Narrowing { from, to, .. } => Some((k, Range::new(from, to))),
                _ => None,
            })
            .collect();
        if open.is_empty() {
            break;
        }
        let mut accs = per_thread(|| open.iter().map(|(_, r)| r.buckets()).collect::<Vec<_>>());
        for t in tensors {
            let sources: Vec<(usize, usize)> = open
                .iter()
                .enumerate()
                .filter_map(|(o, &(k, _))| source_of(t, targets[k].model).map(|i| (i, o)))
                .collect();
            let ranges: Vec<Range> = open.iter().map(|&(_, r)| r).collect();
            t.scan(false, &mut accs, &NarrowPass { sources, ranges })?;
        }
        let acc = accs
            .into_iter()
            .reduce(|mut a, b| {
                for (a, b) in a.iter_mut().zip(&b) {
                    Bucket::add_all(a, b);
                }
                a
            })
            .expect("one part");
        for ((k, range), buckets) in open.into_iter().zip(acc) {
            let Search::Narrowing { need, .. } = searches[k] else {
                unreachable!()
            };
            searches[k] = match range.walk(&buckets, need) {
                Ok(found) => found,
                Err(_) => Search::Changed,
            };
        }
    }

    // Last: count the keys equal to each threshold, block by block.
    let tied: Vec<(usize, u64)> = searches
        .iter()
        .enumerate()
        .filter_map(|(k, s)| match s {
            Search::Ties { key, .. } => Some((k, *key)),
            _ => None,
        })
        .collect();
    let mut counts: Vec<Vec<(usize, usize, u64)>> = vec![Vec::new(); tied.len()];
    if !tied.is_empty() {
        for t in tensors {
            let sources: Vec<(usize, usize, u64)> = tied
                .iter()
                .enumerate()
                .filter_map(|(o, &(k, key))| source_of(t, targets[k].model).map(|i| (i, o, key)))
                .collect();
            let mut accs = per_thread(|| vec![Vec::new(); tied.len()]);
            t.scan(
                false,
                &mut accs,
                &Equal {
                    sources,
                    ordinal: t.ordinal,
                },
            )?;
            for acc in accs {
                for (o, found) in acc.into_iter().enumerate() {
                    counts[o].extend(found);
                }
            }
        }
    }
    for (o, (k, _)) in tied.iter().enumerate() {
        let Search::Ties { key, need } = searches[*k] else {
            unreachable!()
        };
        let ties = running_counts(std::mem::take(&mut counts[o]));
        searches[*k] = Search::Done(Cut::with_ties(key, need, ties));
    }
    searches
        .into_iter()
        .map(|s| match s {
            Search::Done(cut) => Ok(cut),
            _ => Err(Error::Incompatible(
                "an input changed while being read (its entries no longer add up); nothing was written"
                    .into(),
            )),
        })
        .collect()
}

/// Sorts per-block counts of equal keys (tensor ordinal, block, count) into
/// storage order, adds up the entries of one block, and replaces each count
/// by the number of equal keys in earlier blocks.
pub(crate) fn running_counts(mut blocks: Vec<(usize, usize, u64)>) -> Vec<(usize, usize, u64)> {
    blocks.sort_unstable();
    blocks.dedup_by(|later, first| {
        let same = (later.0, later.1) == (first.0, first.1);
        if same {
            first.2 += later.2;
        }
        same
    });
    let mut before = 0;
    blocks
        .into_iter()
        .map(|(ordinal, block, n)| {
            let entry = (ordinal, block, before);
            before += n;
            entry
        })
        .collect()
}

/// A closed range of keys split into [`BUCKETS`] equal buckets.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Range {
    from: u64,
    to: u64,
    shift: u32,
}

impl Range {
    pub fn new(from: u64, to: u64) -> Self {
        let span = to - from;
        let mut shift = 0;
        while (span >> shift) >= BUCKETS as u64 {
            shift += 1;
        }
        Self { from, to, shift }
    }

    /// Empty buckets for a histogram of the range.
    pub fn buckets(&self) -> Vec<Bucket> {
        vec![Bucket::EMPTY; BUCKETS]
    }

    /// The bucket of `key`, which the range holds.
    #[inline(always)]
    pub fn bucket(&self, key: u64) -> usize {
        ((key - self.from) >> self.shift) as usize
    }

    /// Whether the range holds `key` (one unsigned comparison).
    #[inline(always)]
    fn holds(&self, key: u64) -> bool {
        key.wrapping_sub(self.from) <= self.to - self.from
    }

    /// Walks `buckets` from the largest keys down: the search for the
    /// `need`-th largest key of the range, or (as the error) how many keys
    /// the range holds when it holds fewer than `need`.
    pub fn walk(&self, buckets: &[Bucket], need: u64) -> std::result::Result<Search, u64> {
        let mut above = 0;
        for b in buckets.iter().rev() {
            if above + b.count < need {
                above += b.count;
                continue;
            }
            let need = need - above;
            return Ok(if need == b.count {
                Search::Done(Cut::at_least(b.min))
            } else if b.min == b.max {
                Search::Ties { key: b.min, need }
            } else {
                Search::Narrowing {
                    from: b.min,
                    to: b.max,
                    need,
                }
            });
        }
        Err(above)
    }
}

/// Calls `f(j)` for each `j < len` for which `holds(j)`, testing 64 at a
/// time without branches so that the test vectorises and `f` runs only
/// for the (few) entries it holds.
#[inline(always)]
fn for_each_marked(len: usize, holds: impl Fn(usize) -> bool, mut f: impl FnMut(usize)) {
    let mut start = 0;
    while start < len {
        let end = (start + 64).min(len);
        let mut bits = 0u64;
        for j in start..end {
            bits |= u64::from(holds(j)) << (j - start);
        }
        while bits != 0 {
            f(start + bits.trailing_zeros() as usize);
            bits &= bits - 1;
        }
        start = end;
    }
}

/// A narrowing pass: histograms the keys of each open target's range.
struct NarrowPass {
    /// (position among the tensor's models, open target).
    sources: Vec<(usize, usize)>,
    ranges: Vec<Range>,
}

impl Visit for NarrowPass {
    type Acc = Vec<Vec<Bucket>>;

    #[inline(always)]
    fn visit(&self, accs: &mut Self::Acc, block: &Block<'_>) {
        for &(i, o) in &self.sources {
            let range = &self.ranges[o];
            let buckets = &mut accs[o];
            let (m, b) = (block.model(i), block.base);
            for_each_marked(
                m.len(),
                |j| range.holds(key(m[j] - b[j])),
                |j| {
                    let k = key(m[j] - b[j]);
                    buckets[range.bucket(k)].add(k);
                },
            );
        }
    }
}

/// Last pass: counts, per block, the keys equal to each threshold.
struct Equal {
    /// (position among the tensor's models, tied target, threshold key).
    sources: Vec<(usize, usize, u64)>,
    ordinal: usize,
}

impl Visit for Equal {
    type Acc = Vec<Vec<(usize, usize, u64)>>;

    #[inline(always)]
    fn visit(&self, acc: &mut Self::Acc, block: &Block<'_>) {
        for &(i, o, wanted) in &self.sources {
            let n = block
                .model(i)
                .iter()
                .zip(block.base)
                .filter(|&(&m, &b)| key(m - b) == wanted)
                .count() as u64;
            if n > 0 {
                acc[o].push((self.ordinal, block.first / BLOCK, n));
            }
        }
    }
}

/// Count, smallest and largest key of one bucket, side by side so an
/// update touches one cache line.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bucket {
    count: u64,
    min: u64,
    max: u64,
}

impl Bucket {
    const EMPTY: Self = Self {
        count: 0,
        min: u64::MAX,
        max: 0,
    };

    #[inline(always)]
    pub fn add(&mut self, key: u64) {
        self.count += 1;
        self.min = self.min.min(key);
        self.max = self.max.max(key);
    }

    /// Adds another thread part's buckets to `into`.
    pub fn add_all(into: &mut [Bucket], other: &[Bucket]) {
        for (a, b) in into.iter_mut().zip(other) {
            a.count += b.count;
            a.min = a.min.min(b.min);
            a.max = a.max.max(b.max);
        }
    }
}

/// (position among the tensor's models, slot in `models`) of each model.
pub(crate) fn sources_of(t: &TensorInputs<'_>, models: &[usize]) -> Vec<(usize, usize)> {
    t.models
        .iter()
        .enumerate()
        .filter_map(|(i, (m, _))| models.binary_search(m).ok().map(|s| (i, s)))
        .collect()
}

/// Position of family model `model` among the tensor's models.
fn source_of(t: &TensorInputs<'_>, model: usize) -> Option<usize> {
    t.models.iter().position(|(m, _)| *m == model)
}

#[cfg(test)]
mod tests {
    //! Every path of the selection against a plain sort: the sample placing
    //! the window well, too few candidate slots (histograms and narrowing
    //! passes), and a sample that misleads high or low.

    use super::*;
    use crate::checkpoint::Checkpoint;
    use crate::methods::inputs::{Input, ModelInput};
    use safetensors::tensor::TensorView;

    /// Deterministic pseudo-random numbers in [0, 1).
    fn uniform(seed: u64, n: usize) -> Vec<f64> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 11) as f64 / (1u64 << 53) as f64
            })
            .collect()
    }

    /// Writes one f32 checkpoint with `tensors` (name, values) in order.
    fn write(path: &std::path::Path, tensors: &[(&str, Vec<f32>)]) {
        let bytes: Vec<Vec<u8>> = tensors
            .iter()
            .map(|(_, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
            .collect();
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .zip(&bytes)
            .map(|((name, v), b)| {
                let view = TensorView::new(safetensors::Dtype::F32, vec![v.len()], b).unwrap();
                (name.to_string(), view)
            })
            .collect();
        safetensors::serialize_to_file(views, None, path).unwrap();
    }

    /// Two tensors (a large one, sampled sparsely, and a small one) of a
    /// base and three fine-tunes: continuous deltas, deltas on a coarse
    /// grid (many equal magnitudes), and no change at all.
    fn family(dir: &std::path::Path) -> (Checkpoint, Vec<Checkpoint>) {
        let sizes = [("big", 200_000usize), ("small", 3_000)];
        let base: Vec<(&str, Vec<f32>)> = sizes
            .iter()
            .enumerate()
            .map(|(t, &(name, n))| {
                let v = uniform(t as u64 + 1, n)
                    .iter()
                    .map(|u| (u - 0.5) as f32)
                    .collect();
                (name, v)
            })
            .collect();
        let tune = |model: u64| -> Vec<(&str, Vec<f32>)> {
            base.iter()
                .enumerate()
                .map(|(t, (name, b))| {
                    let u = uniform(100 * model + t as u64, b.len());
                    let v = b
                        .iter()
                        .zip(&u)
                        .map(|(&b, &u)| match model {
                            0 => b + ((u - 0.5) * (u - 0.5) * 0.01) as f32,
                            1 => b + ((u * 9.0).floor() - 4.0) as f32 * 0.25,
                            _ => b,
                        })
                        .collect();
                    (*name, v)
                })
                .collect()
        };
        write(&dir.join("base.safetensors"), &base);
        let models = (0..3)
            .map(|m| {
                let path = dir.join(format!("m{m}.safetensors"));
                write(&path, &tune(m));
                Checkpoint::open(path.to_str().unwrap()).unwrap()
            })
            .collect();
        let base = Checkpoint::open(dir.join("base.safetensors").to_str().unwrap()).unwrap();
        (base, models)
    }

    fn inputs<'a>(base: &'a Checkpoint, models: &'a [Checkpoint]) -> Vec<TensorInputs<'a>> {
        let input = |ckpt: &'a Checkpoint, name: &str| {
            let tensor = ckpt.get(name).unwrap();
            Input {
                ckpt,
                tensor,
                ty: tensor.float_type().unwrap(),
            }
        };
        base.names()
            .iter()
            .enumerate()
            .map(|(ordinal, name)| TensorInputs {
                name,
                shape: &base.get(name).unwrap().shape,
                ordinal,
                base: input(base, name),
                models: models
                    .iter()
                    .enumerate()
                    .map(|(m, ckpt)| (m, ModelInput::Stored(input(ckpt, name))))
                    .collect(),
                device: candle_core::Device::Cpu,
                keep_pages: false,
            })
            .collect()
    }

    /// The deltas of `model` over `tensors` (`None` for a tensor it does
    /// not store), in f64.
    fn deltas(tensors: &[TensorInputs<'_>], model: usize) -> Vec<Option<Vec<f64>>> {
        let decode = |input: &Input<'_>, n| {
            let mut v = vec![0.0; n];
            crate::dtype::decode_f64(input.ty, input.range(0, n), &mut v);
            v
        };
        tensors
            .iter()
            .map(|t| {
                let (_, m) = t.models.iter().find(|(m, _)| *m == model)?;
                let ModelInput::Stored(m) = m else {
                    unreachable!("stored models only")
                };
                let (b, m) = (decode(&t.base, t.numel()), decode(m, t.numel()));
                Some(m.iter().zip(&b).map(|(m, b)| m - b).collect())
            })
            .collect()
    }

    /// Checks, bit for bit against a full sort by |d| (equal magnitudes in
    /// storage order), the cuts of `models` for several ranks over
    /// `tensors`, with each tuning.
    fn check(tensors: &[TensorInputs<'_>], models: &[usize], tunings: &[(Tuning, &str)]) {
        check_counted(tensors, models, tunings, &[]);
    }

    /// [`check`] with magnitude counts handed to the selection.
    fn check_counted(
        tensors: &[TensorInputs<'_>],
        models: &[usize],
        tunings: &[(Tuning, &str)],
        counts: &[Option<CoarseCounts>],
    ) {
        for &model in models {
            let d = deltas(tensors, model);
            let mut order: Vec<(u64, usize, usize)> = d
                .iter()
                .enumerate()
                .filter_map(|(t, d)| d.as_ref().map(|d| (t, d)))
                .flat_map(|(t, d)| d.iter().enumerate().map(move |(i, &x)| (key(x), t, i)))
                .collect();
            order.sort_by(|a, b| b.0.cmp(&a.0).then((a.1, a.2).cmp(&(b.1, b.2))));
            let n = order.len() as u64;
            let mut ranks = vec![1, 2, 7, n / 50, n / 5, n / 3, n / 2, n - 1];
            ranks.retain(|&r| r > 0 && r < n);
            let targets: Vec<Target> = ranks.iter().map(|&rank| Target { model, rank }).collect();
            for &(tuning, what) in tunings {
                let cuts = select_tuned(tensors, &targets, tuning, counts).unwrap();
                for (target, cut) in targets.iter().zip(&cuts) {
                    let mut want: Vec<Option<Vec<u64>>> = d
                        .iter()
                        .map(|d| d.as_ref().map(|d| vec![0u64; d.len()]))
                        .collect();
                    for &(_, t, i) in order.iter().take(target.rank as usize) {
                        want[t].as_mut().unwrap()[i] = d[t].as_ref().unwrap()[i].to_bits();
                    }
                    for (t, (tensor, dt)) in tensors.iter().zip(&d).enumerate() {
                        let Some(dt) = dt else { continue };
                        let mut out = dt.clone();
                        for (b, block) in out.chunks_mut(BLOCK).enumerate() {
                            cut.apply(tensor.ordinal, b * BLOCK, block);
                        }
                        let got: Vec<u64> = out.iter().map(|x| x.to_bits()).collect();
                        assert!(
                            got == *want[t].as_ref().unwrap(),
                            "{what}: model {model} rank {} of {n}, tensor {t}",
                            target.rank
                        );
                    }
                }
            }
        }
    }

    /// Tunings that reach every path: the big tensor is sampled one block
    /// in 24, the small one completely, both together one in 25.
    fn tunings() -> Vec<(Tuning, &'static str)> {
        let tuned = |candidates, skew| Tuning {
            candidates,
            skew,
            min_sampled_blocks: 4,
        };
        vec![
            (tuned(1 << 20, 0), "window from the sample"),
            (tuned(16, 0), "histograms of the window"),
            (tuned(16, 300), "sample misleading low, histograms"),
            (tuned(1 << 20, -300), "sample misleading high"),
            (tuned(16, -300), "sample misleading high, histograms"),
            (tuned(1 << 20, 3), "sample slightly off"),
            (tuned(1 << 20, -3), "sample slightly off the other way"),
        ]
    }

    #[test]
    fn every_path_of_the_selection_keeps_exactly_the_largest() {
        let dir = tempfile::tempdir().unwrap();
        let (base, models) = family(dir.path());
        let all = inputs(&base, &models);
        for t in &all {
            check(std::slice::from_ref(t), &[0, 1, 2], &tunings());
        }
        check(&all, &[0, 1, 2], &tunings());
    }

    /// Each model's exact counts by `key >> COARSE_SHIFT`, as the analysis
    /// records them (one run per bucket, written plainly).
    fn exact_counts(tensors: &[TensorInputs<'_>], model: usize) -> CoarseCounts {
        let mut by_bucket = std::collections::BTreeMap::<u64, u64>::new();
        let mut entries = 0;
        for d in deltas(tensors, model).into_iter().flatten() {
            for x in d {
                *by_bucket
                    .entry(key(x) >> crate::magnitude::COARSE_SHIFT)
                    .or_default() += 1;
                entries += 1;
            }
        }
        CoarseCounts {
            entries,
            runs: by_bucket.into_iter().map(|(b, c)| (b, vec![c])).collect(),
        }
    }

    /// Counts from an analysis place the windows: exact counts (the sample
    /// skipped where the threshold's bucket is small, which the sample
    /// counter shows), counts of another size (ignored) and counts that lie
    /// (a wrong bucket: more passes, the same cuts).
    #[test]
    fn counted_magnitudes_place_the_window_and_never_change_the_cut() {
        let dir = tempfile::tempdir().unwrap();
        let (base, models) = family(dir.path());
        let all = inputs(&base, &models);
        let exact: Vec<Option<CoarseCounts>> =
            (0..3).map(|m| Some(exact_counts(&all, m))).collect();
        let before = window::samples_taken();
        check_counted(&all, &[0, 1, 2], &tunings(), &exact);
        let sampled_with_counts = window::samples_taken() - before;
        let before = window::samples_taken();
        check(&all, &[0, 1, 2], &tunings());
        let sampled_without = window::samples_taken() - before;
        assert!(
            sampled_with_counts < sampled_without,
            "counts should spare samples: {sampled_with_counts} vs {sampled_without}"
        );
        // The exact counts, each changed by `edit`.
        let edited = |edit: fn(&mut CoarseCounts)| -> Vec<Option<CoarseCounts>> {
            exact
                .iter()
                .map(|c| {
                    let mut c = c.clone().unwrap();
                    edit(&mut c);
                    Some(c)
                })
                .collect()
        };
        let resized = edited(|c| c.entries += 1);
        check_counted(&all, &[0, 1, 2], &tunings(), &resized);
        let lying = edited(|c| {
            for (first, _) in &mut c.runs {
                *first += 3;
            }
        });
        check_counted(&all, &[0, 1, 2], &tunings(), &lying);
        // Buckets past the largest key (a hand-edited analysis) are not
        // used: no overflow, the same cuts.
        let hostile = edited(|c| c.runs = vec![(u64::MAX - 1, vec![c.entries])]);
        check_counted(&all, &[0, 1, 2], &tunings(), &hostile);
    }

    /// Model 0 lacks "small", model 1 lacks "big" (so its sample, one block
    /// in 25 of both, may hold none of its keys).
    #[test]
    fn models_missing_tensors_are_selected_over_what_they_store() {
        let dir = tempfile::tempdir().unwrap();
        let (base, models) = family(dir.path());
        let mut all = inputs(&base, &models);
        all[0].models.retain(|(m, _)| *m != 1);
        all[1].models.retain(|(m, _)| *m != 0);
        check(&all, &[0, 1, 2], &tunings());
    }

    /// NaN, ±infinity, zeros and repeated magnitudes.
    #[test]
    fn nonfinite_zero_and_repeated_magnitudes_are_ordered() {
        let dir = tempfile::tempdir().unwrap();
        let n = 50_000;
        let base: Vec<f32> = uniform(7, n).iter().map(|u| (*u - 0.5) as f32).collect();
        let u = uniform(8, n);
        let m: Vec<f32> = base
            .iter()
            .zip(&u)
            .enumerate()
            .map(|(i, (&b, &u))| match i % 97 {
                0 => f32::NAN,
                1 => f32::INFINITY,
                2 => f32::NEG_INFINITY,
                3..=40 => b,
                41..=60 => b + 0.5,
                _ => b + ((u - 0.5) * 0.01) as f32,
            })
            .collect();
        write(&dir.path().join("base.safetensors"), &[("w", base)]);
        write(&dir.path().join("m.safetensors"), &[("w", m)]);
        let open = |name: &str| Checkpoint::open(dir.path().join(name).to_str().unwrap()).unwrap();
        let (base, models) = (open("base.safetensors"), vec![open("m.safetensors")]);
        check(&inputs(&base, &models), &[0], &tunings());
    }

    /// Thread parts are merged whatever the machine's core count.
    #[test]
    fn the_cuts_do_not_depend_on_the_thread_count() {
        let dir = tempfile::tempdir().unwrap();
        let (base, models) = family(dir.path());
        let all = inputs(&base, &models);
        for threads in [1, 3] {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| check(&all, &[0, 1, 2], &tunings()));
        }
    }
}
