//! Exact top-k selection of task-vector entries by magnitude, streaming.
//!
//! TIES, magnitude pruning and Breadcrumbs keep each task vector's k
//! largest entries by |d|, within one tensor or over a whole model. The k
//! largest are found without sorting and without holding the task vector:
//! radix selection on the bits of |d| as an f64 (for non-negative floats the
//! bit pattern orders like the value). A first pass counts the top 16 bits
//! of every key; each later pass counts the next bits of the keys in the one
//! bucket that holds the k-th largest, until the bucket is either kept whole
//! or holds a single value. Equal magnitudes at the threshold are kept in
//! storage order (the lower flat index first; over a model, the earlier
//! tensor first): a last pass counts them per block so the merge can tell,
//! block by block, which of them fall within k.

use super::inputs::{per_thread, Block, TensorInputs, Visit, BLOCK};
use crate::error::{Error, Result};

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
        if let Some(ties_kept) = self.plain(ordinal, first / BLOCK) {
            for d in out.iter_mut() {
                let k = key(*d);
                let kept = k > self.key || (ties_kept && k == self.key);
                *d = if kept { *d } else { 0.0 };
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
        let (outer_plain, inner_plain) = (self.plain(ordinal, block), inner.plain(ordinal, block));
        if let (Some(outer_ties), Some(inner_ties)) = (outer_plain, inner_plain) {
            // Vectorised: no cut has to count its ties in this block.
            for d in out.iter_mut() {
                let k = key(*d);
                let outer = k > self.key || (outer_ties && k == self.key);
                let outlier = k > inner.key || (inner_ties && k == inner.key);
                *d = if outer && !outlier { *d } else { 0.0 };
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

/// Radix levels: (shift, bits) of the key, most significant first. Keys of
/// non-negative floats have a zero top bit.
/// The first level is wide (every entry is counted once, into one table
/// per model); later ones are narrow, so their tables stay in the L2 cache.
const LEVELS: [(u32, u32); 5] = [(47, 16), (35, 12), (23, 12), (11, 12), (0, 11)];

/// Where one target's search stands.
#[derive(Debug, Clone)]
enum Search {
    /// Entries whose key >> shift equals `prefix` hold the threshold; the
    /// top `need` of them are kept.
    Narrowing {
        prefix: u64,
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
/// Costs two to six reads of the tensors (usually three).
pub(crate) fn select(tensors: &[TensorInputs<'_>], targets: &[Target]) -> Result<Vec<Cut>> {
    let models: Vec<usize> = {
        let mut m: Vec<usize> = targets.iter().map(|t| t.model).collect();
        m.sort_unstable();
        m.dedup();
        m
    };
    let slot = |model: usize| models.binary_search(&model).expect("target model");

    // Level 1: the top 16 bits of every key, per model.
    let (shift, bits) = LEVELS[0];
    let width = 1usize << bits;
    let mut hists = per_thread(|| vec![0u64; models.len() * width]);
    for t in tensors {
        let sources = sources_of(t, &models);
        t.scan(
            false,
            &mut hists,
            &TopBits {
                sources,
                shift,
                width,
            },
        )?;
    }
    let hist = sum_rows(hists);
    let mut searches: Vec<Search> = targets
        .iter()
        .map(|t| {
            let h = &hist[slot(t.model) * width..(slot(t.model) + 1) * width];
            let total: u64 = h.iter().sum();
            if t.rank == 0 {
                Search::Done(Cut::none())
            } else if t.rank >= total {
                Search::Done(Cut::all())
            } else {
                narrow(h, 0, t.rank, shift, None)
            }
        })
        .collect();

    // Later levels: the next bits of the keys in each target's bucket.
    for (level, &(shift, bits)) in LEVELS.iter().enumerate().skip(1) {
        let open: Vec<(usize, u64)> = searches
            .iter()
            .enumerate()
            .filter_map(|(k, s)| match s {
                Search::Narrowing { prefix, .. } => Some((k, *prefix)),
                _ => None,
            })
            .collect();
        if open.is_empty() {
            break;
        }
        let width = 1usize << bits;
        let above = LEVELS[level - 1].0;
        let mut accs = per_thread(|| LevelAcc::new(open.len(), width));
        for t in tensors {
            let sources: Vec<(usize, usize, u64)> = open
                .iter()
                .enumerate()
                .filter_map(|(o, &(k, prefix))| {
                    source_of(t, targets[k].model).map(|i| (i, o, prefix))
                })
                .collect();
            t.scan(
                false,
                &mut accs,
                &NextBits {
                    sources,
                    above,
                    shift,
                    width,
                },
            )?;
        }
        let acc = accs.into_iter().reduce(LevelAcc::merge).expect("one part");
        for (o, &(k, prefix)) in open.iter().enumerate() {
            let Search::Narrowing { need, .. } = searches[k] else {
                unreachable!()
            };
            let buckets = &acc.buckets[o * width..(o + 1) * width];
            let counts: Vec<u64> = buckets.iter().map(|b| b.count).collect();
            let extremes: Vec<(u64, u64)> = buckets.iter().map(|b| (b.min, b.max)).collect();
            searches[k] = narrow(&counts, prefix << bits, need, shift, Some(&extremes));
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
        let mut blocks = std::mem::take(&mut counts[o]);
        blocks.sort_unstable();
        let mut before = 0;
        let ties = blocks
            .into_iter()
            .map(|(ordinal, block, n)| {
                let entry = (ordinal, block, before);
                before += n;
                entry
            })
            .collect();
        searches[*k] = Search::Done(Cut { key, need, ties });
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

/// Level 1: counts the top bits of every key, per model slot.
struct TopBits {
    /// (position among the tensor's models, slot).
    sources: Vec<(usize, usize)>,
    shift: u32,
    width: usize,
}

impl Visit for TopBits {
    type Acc = Vec<u64>;

    #[inline(always)]
    fn visit(&self, h: &mut Vec<u64>, block: &Block<'_>) {
        for &(i, s) in &self.sources {
            let h = &mut h[s * self.width..(s + 1) * self.width];
            for (&m, &b) in block.model(i).iter().zip(block.base) {
                h[(key(m - b) >> self.shift) as usize & (self.width - 1)] += 1;
            }
        }
    }
}

/// Later levels: counts the next bits of the keys under each open prefix.
struct NextBits {
    /// (position among the tensor's models, open target, prefix).
    sources: Vec<(usize, usize, u64)>,
    above: u32,
    shift: u32,
    width: usize,
}

impl Visit for NextBits {
    type Acc = LevelAcc;

    #[inline(always)]
    fn visit(&self, acc: &mut LevelAcc, block: &Block<'_>) {
        for &(i, o, prefix) in &self.sources {
            for (&m, &b) in block.model(i).iter().zip(block.base) {
                let key = key(m - b);
                if key >> self.above == prefix {
                    acc.add(o, ((key >> self.shift) as usize) & (self.width - 1), key);
                }
            }
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

/// Picks the bucket of `counts` (keys `prefix | bucket` at `shift`) that
/// holds the `need`-th largest entry.
fn narrow(
    counts: &[u64],
    prefix: u64,
    need: u64,
    shift: u32,
    extremes: Option<&[(u64, u64)]>,
) -> Search {
    let mut above = 0;
    for bucket in (0..counts.len()).rev() {
        let c = counts[bucket];
        if above + c < need {
            above += c;
            continue;
        }
        let need = need - above;
        let prefix = prefix | bucket as u64;
        if need == c {
            return Search::Done(Cut {
                key: prefix << shift,
                need: u64::MAX,
                ties: Vec::new(),
            });
        }
        if shift == 0 {
            return Search::Ties { key: prefix, need };
        }
        if let Some(extremes) = extremes {
            let (min, max) = extremes[bucket];
            if min == max {
                return Search::Ties { key: min, need };
            }
        }
        return Search::Narrowing { prefix, need };
    }
    // The counts no longer hold the rank: an input changed between passes.
    Search::Changed
}

/// Count, smallest and largest key of one bucket, side by side so an
/// update touches one cache line.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    count: u64,
    min: u64,
    max: u64,
}

/// The buckets of one level, per open target.
struct LevelAcc {
    width: usize,
    buckets: Vec<Bucket>,
}

impl LevelAcc {
    fn new(targets: usize, width: usize) -> Self {
        let empty = Bucket {
            count: 0,
            min: u64::MAX,
            max: 0,
        };
        Self {
            width,
            buckets: vec![empty; targets * width],
        }
    }

    #[inline(always)]
    fn add(&mut self, target: usize, bucket: usize, key: u64) {
        let b = &mut self.buckets[target * self.width + bucket];
        b.count += 1;
        b.min = b.min.min(key);
        b.max = b.max.max(key);
    }

    fn merge(mut self, other: Self) -> Self {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets) {
            a.count += b.count;
            a.min = a.min.min(b.min);
            a.max = a.max.max(b.max);
        }
        self
    }
}

/// Adds per-thread rows element by element.
fn sum_rows(rows: Vec<Vec<u64>>) -> Vec<u64> {
    rows.into_iter()
        .reduce(|mut a, b| {
            for (a, b) in a.iter_mut().zip(&b) {
                *a += b;
            }
            a
        })
        .unwrap_or_default()
}

/// (position among the tensor's models, slot in `models`) of each model.
fn sources_of(t: &TensorInputs<'_>, models: &[usize]) -> Vec<(usize, usize)> {
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
