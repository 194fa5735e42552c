//! Binary operators: scalar/scalar, vector/scalar, one-to-one vector matching and the set
//! operators, keyed by label signatures (`on`/`ignoring`).
use std::{
    hash::{BuildHasher as _, Hasher as _},
    sync::Arc,
};

use foldhash::HashMap;

use super::{
    check::{BinOp, Matching, SetOp},
    eval::Val,
    Labels, Sample,
};

/// A hash of the labels `keep` accepts (equal label sets are still compared, so a collision
/// costs time, never a wrong match).
pub(super) fn signature(labels: &Labels, keep: impl Fn(&str) -> bool) -> u64 {
    signature_of(labels.pairs().iter().filter(|(n, _)| keep(n)))
}

/// The hash of these pairs, in order. foldhash eats a word at a time (a byte-wise hash was a
/// tenth of the engine's time).
pub(super) fn signature_of<'a>(pairs: impl Iterator<Item = &'a (Arc<str>, Arc<str>)>) -> u64 {
    let mut h = foldhash::fast::FixedState::with_seed(0x5157_3ca1).build_hasher();
    for (n, v) in pairs {
        h.write(n.as_bytes());
        // A separator that cannot appear inside UTF-8 text.
        h.write_u8(0xff);
        h.write(v.as_bytes());
        h.write_u8(0xff);
    }
    h.finish()
}

/// A label-name filter (`by (...)`, "all but `le`") with the positions it keeps remembered for
/// the last layout seen: the samples of one metric carry the same interned names in the same
/// order, so the filter's string comparisons run once per layout rather than once per sample
/// (they were a tenth of the engine's time in aggregations).
pub(super) struct Filter<F> {
    keep: F,
    /// The names' addresses of the layout the mask is for (compared, never read through).
    layout: Vec<*const u8>,
    mask: u64,
}

impl<F: Fn(&str) -> bool> Filter<F> {
    pub(super) fn new(keep: F) -> Self {
        Self {
            keep,
            layout: Vec::new(),
            mask: 0,
        }
    }

    /// Bit `i` set: pair `i` of `labels` is kept (`None` past 64 pairs: filter each).
    fn mask(&mut self, labels: &Labels) -> Option<u64> {
        let pairs = labels.pairs();
        if pairs.len() > 64 {
            return None;
        }
        let known = pairs.len() == self.layout.len()
            && (pairs.iter().zip(&self.layout)).all(|((n, _), &p)| std::ptr::eq(n.as_ptr(), p));
        if !known {
            self.layout.clear();
            self.layout.extend(pairs.iter().map(|(n, _)| n.as_ptr()));
            self.mask = (pairs.iter().enumerate())
                .filter(|(_, (n, _))| (self.keep)(n))
                .fold(0, |m, (i, _)| m | 1 << i);
        }
        Some(self.mask)
    }

    /// `signature(labels, keep)`.
    pub(super) fn signature(&mut self, labels: &Labels) -> u64 {
        match self.mask(labels) {
            Some(m) => signature_of(
                (labels.pairs().iter().enumerate())
                    .filter(|(i, _)| m >> i & 1 == 1)
                    .map(|(_, p)| p),
            ),
            None => signature(labels, &self.keep),
        }
    }

    /// Whether the pairs of `labels` the filter keeps are exactly `kept` (a group's labels,
    /// already filtered).
    pub(super) fn keeps_exactly(&mut self, labels: &Labels, kept: &Labels) -> bool {
        let mask = self.mask(labels);
        let keep = &self.keep;
        let mine = (labels.pairs().iter().enumerate())
            .filter(|(i, (n, _))| mask.map_or_else(|| keep(n), |m| m >> i & 1 == 1))
            .map(|(_, p)| p);
        pairs_eq(mine, kept.pairs().iter())
    }
}

/// Whether `a` and `b` agree on the labels `keep` accepts. Label sets of one series share
/// their storage, and names are interned: pointers decide most comparisons without reading
/// the text.
pub(super) fn same(a: &Labels, b: &Labels, keep: impl Fn(&str) -> bool) -> bool {
    a.same_storage(b)
        || pairs_eq(
            a.pairs().iter().filter(|(n, _)| keep(n)),
            b.pairs().iter().filter(|(n, _)| keep(n)),
        )
}

/// Whether two runs of pairs are equal, pointers first (names and values are interned).
fn pairs_eq<'a>(
    mut a: impl Iterator<Item = &'a (Arc<str>, Arc<str>)>,
    mut b: impl Iterator<Item = &'a (Arc<str>, Arc<str>)>,
) -> bool {
    let eq = |x: &Arc<str>, y: &Arc<str>| Arc::ptr_eq(x, y) || x == y;
    loop {
        match (a.next(), b.next()) {
            (None, None) => return true,
            (Some((an, av)), Some((bn, bv))) if eq(an, bn) && eq(av, bv) => {}
            _ => return false,
        }
    }
}

impl Matching {
    /// The match signature of `labels`: the hash they carry when every label but `__name__`
    /// takes part (the default, `ignoring()`), else computed.
    fn signature(&self, labels: &Labels) -> u64 {
        match self {
            Matching::Ignoring(ign) if ign.is_empty() => labels.hash_without_name(),
            _ => signature(labels, |n| self.keeps(n)),
        }
    }

    /// Whether a label takes part in the match.
    pub(super) fn keeps(&self, name: &str) -> bool {
        match self {
            Matching::On(on) => on.binary_search_by(|l| (**l).cmp(name)).is_ok(),
            Matching::Ignoring(ign) => {
                name != "__name__" && ign.binary_search_by(|l| (**l).cmp(name)).is_err()
            }
        }
    }
}

/// A multimap from hashes to the items `0..n` pushed in order, chained through one vector: no
/// allocation per key (a `Vec` per key was a tenth of the engine's time in `malloc`).
pub(super) struct Chains {
    heads: HashMap<u64, u32>,
    next: Vec<u32>,
}

const END: u32 = u32::MAX;

impl Chains {
    pub(super) fn with_capacity(n: usize) -> Self {
        Self {
            heads: HashMap::with_capacity_and_hasher(n, Default::default()),
            next: Vec::with_capacity(n),
        }
    }

    /// Adds the next item (numbered by how many came before) under `hash`.
    pub(super) fn push(&mut self, hash: u64) {
        let item = u32::try_from(self.next.len()).unwrap_or(END);
        let before = self.heads.insert(hash, item).unwrap_or(END);
        self.next.push(before);
    }

    /// The items under `hash`, newest first.
    pub(super) fn get(&self, hash: u64) -> impl Iterator<Item = usize> + '_ {
        let first = self.heads.get(&hash).copied().unwrap_or(END);
        std::iter::successors((first != END).then_some(first), |&i| {
            self.next.get(i as usize).copied().filter(|&n| n != END)
        })
        .map(|i| i as usize)
    }
}

/// Samples indexed by signature.
struct Index<'a> {
    by_sig: Chains,
    samples: &'a [Sample],
}

impl<'a> Index<'a> {
    fn new(samples: &'a [Sample], m: &Matching) -> Self {
        let mut by_sig = Chains::with_capacity(samples.len());
        for s in samples {
            by_sig.push(m.signature(&s.labels));
        }
        Self { by_sig, samples }
    }

    /// The indices of the samples matching `labels`.
    fn matches<'b>(
        &'b self,
        labels: &'b Labels,
        m: &'b Matching,
    ) -> impl Iterator<Item = usize> + 'b {
        self.by_sig.get(m.signature(labels)).filter(move |&i| {
            self.samples
                .get(i)
                .is_some_and(|s| same(&s.labels, labels, |n| m.keeps(n)))
        })
    }
}

fn arith(op: BinOp, l: f64, r: f64) -> f64 {
    match op {
        BinOp::Add => l + r,
        BinOp::Sub => l - r,
        BinOp::Mul => l * r,
        BinOp::Div => l / r,
        BinOp::Mod => l % r,
        BinOp::Pow => l.powf(r),
        _ => f64::NAN,
    }
}

fn compare(op: BinOp, l: f64, r: f64) -> bool {
    match op {
        BinOp::Eq => l == r,
        BinOp::Ne => l != r,
        BinOp::Gt => l > r,
        BinOp::Lt => l < r,
        BinOp::Ge => l >= r,
        BinOp::Le => l <= r,
        _ => false,
    }
}

/// One element: the value and whether it is kept (comparisons filter, keeping the left value).
fn elem(op: BinOp, l: f64, r: f64) -> (f64, bool) {
    if op.is_comparison() {
        (l, compare(op, l, r))
    } else {
        (arith(op, l, r), true)
    }
}

fn as_bool(keep: bool) -> f64 {
    if keep {
        1.0
    } else {
        0.0
    }
}

pub(super) fn binary(op: BinOp, lhs: Val, rhs: Val, return_bool: bool, m: &Matching) -> Val {
    let vector = |v: Vec<Sample>| Val::Vector(Arc::new(v));
    match (lhs, rhs) {
        (Val::Scalar(l), Val::Scalar(r)) => Val::Scalar(if op.is_comparison() {
            as_bool(compare(op, l, r))
        } else {
            arith(op, l, r)
        }),
        (Val::Vector(v), Val::Scalar(s)) => vector(vector_scalar(op, &v, s, false, return_bool)),
        (Val::Scalar(s), Val::Vector(v)) => vector(vector_scalar(op, &v, s, true, return_bool)),
        (Val::Vector(l), Val::Vector(r)) => vector(vector_vector(op, &l, &r, return_bool, m)),
    }
}

/// `swap`: the scalar is on the left. A comparison keeps the vector's value either way, and
/// copies only the samples it keeps.
fn vector_scalar(op: BinOp, v: &[Sample], s: f64, swap: bool, return_bool: bool) -> Vec<Sample> {
    let drop_name = !op.is_comparison() || return_bool;
    v.iter()
        .filter_map(|e| {
            let (l, r) = if swap { (s, e.value) } else { (e.value, s) };
            let (mut value, mut keep) = elem(op, l, r);
            if op.is_comparison() {
                value = e.value;
            }
            if return_bool {
                value = as_bool(keep);
                keep = true;
            }
            keep.then(|| Sample {
                value,
                labels: if drop_name {
                    e.labels.without_name()
                } else {
                    e.labels.clone()
                },
            })
        })
        .collect()
}

/// One-to-one matching. A match group with more than one series on a side (an error in
/// Prometheus) gives no result.
fn vector_vector(
    op: BinOp,
    l: &[Sample],
    r: &[Sample],
    return_bool: bool,
    m: &Matching,
) -> Vec<Sample> {
    if l.is_empty() || r.is_empty() {
        return Vec::new();
    }
    let right = Index::new(r, m);
    // (right index, sample); a right index used twice means duplicates on the left.
    let mut out: Vec<(usize, Sample)> = Vec::new();
    let mut uses = vec![0u32; r.len()];
    for ls in l {
        let mut found = right.matches(&ls.labels, m);
        let (Some(ri), None) = (found.next(), found.next()) else {
            continue;
        };
        let Some(rs) = r.get(ri) else { continue };
        let (mut value, mut keep) = elem(op, ls.value, rs.value);
        if return_bool {
            value = as_bool(keep);
            keep = true;
        }
        if !keep {
            continue;
        }
        if let Some(n) = uses.get_mut(ri) {
            *n += 1;
        }
        out.push((
            ri,
            Sample {
                labels: result_labels(&ls.labels, op, m, return_bool),
                value,
            },
        ));
    }
    out.into_iter()
        .filter(|(ri, _)| uses.get(*ri).copied() == Some(1))
        .map(|(_, s)| s)
        .collect()
}

/// The left side's labels: no `__name__` after arithmetic or `bool`, only the `on` labels or
/// without the `ignoring` ones.
fn result_labels(l: &Labels, op: BinOp, m: &Matching, return_bool: bool) -> Labels {
    let drop_name = !op.is_comparison() || return_bool;
    l.without(|n| {
        (drop_name && n == "__name__")
            || match m {
                Matching::On(_) => !m.keeps(n),
                Matching::Ignoring(ign) => ign.binary_search_by(|x| (**x).cmp(n)).is_ok(),
            }
    })
}

pub(super) fn set(op: SetOp, l: &[Sample], r: &[Sample], m: &Matching) -> Vec<Sample> {
    match op {
        SetOp::And => {
            if l.is_empty() || r.is_empty() {
                return Vec::new();
            }
            let right = Index::new(r, m);
            (l.iter())
                .filter(|s| right.matches(&s.labels, m).next().is_some())
                .cloned()
                .collect()
        }
        SetOp::Unless => {
            if l.is_empty() || r.is_empty() {
                return l.to_vec();
            }
            let right = Index::new(r, m);
            (l.iter())
                .filter(|s| right.matches(&s.labels, m).next().is_none())
                .cloned()
                .collect()
        }
        SetOp::Or => {
            if l.is_empty() {
                return r.to_vec();
            }
            let left = Index::new(l, m);
            let extra = (r.iter()).filter(|s| left.matches(&s.labels, m).next().is_none());
            l.iter().chain(extra).cloned().collect()
        }
    }
}
