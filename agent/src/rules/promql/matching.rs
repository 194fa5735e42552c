//! Binary operators: scalar/scalar, vector/scalar, one-to-one vector matching and the set
//! operators, keyed by label signatures (`on`/`ignoring`).
use foldhash::HashMap;

use super::{
    check::{BinOp, Matching, SetOp},
    Labels, Sample, Value,
};

/// A hash of the labels `keep` accepts (FNV-1a; equal label sets are still compared, so a
/// collision costs time, never a wrong match).
pub(super) fn signature(labels: &Labels, keep: impl Fn(&str) -> bool) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        // A separator that cannot appear inside UTF-8 text.
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    };
    for (n, v) in labels.iter().filter(|(n, _)| keep(n)) {
        eat(n.as_bytes());
        eat(v.as_bytes());
    }
    h
}

/// Whether `a` and `b` agree on the labels `keep` accepts.
pub(super) fn same(a: &Labels, b: &Labels, keep: impl Fn(&str) -> bool) -> bool {
    a.iter()
        .filter(|(n, _)| keep(n))
        .eq(b.iter().filter(|(n, _)| keep(n)))
}

impl Matching {
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

/// Samples indexed by signature.
struct Index<'a> {
    by_sig: HashMap<u64, Vec<usize>>,
    samples: &'a [Sample],
}

impl<'a> Index<'a> {
    fn new(samples: &'a [Sample], m: &Matching) -> Self {
        let mut by_sig: HashMap<u64, Vec<usize>> =
            HashMap::with_capacity_and_hasher(samples.len(), Default::default());
        for (i, s) in samples.iter().enumerate() {
            by_sig
                .entry(signature(&s.labels, |n| m.keeps(n)))
                .or_default()
                .push(i);
        }
        Self { by_sig, samples }
    }

    /// The indices of the samples matching `labels`.
    fn matches<'b>(
        &'b self,
        labels: &'b Labels,
        m: &'b Matching,
    ) -> impl Iterator<Item = usize> + 'b {
        self.by_sig
            .get(&signature(labels, |n| m.keeps(n)))
            .into_iter()
            .flatten()
            .copied()
            .filter(move |&i| {
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

pub(super) fn binary(op: BinOp, lhs: Value, rhs: Value, return_bool: bool, m: &Matching) -> Value {
    match (lhs, rhs) {
        (Value::Scalar(l), Value::Scalar(r)) => Value::Scalar(if op.is_comparison() {
            as_bool(compare(op, l, r))
        } else {
            arith(op, l, r)
        }),
        (Value::Vector(v), Value::Scalar(s)) => {
            Value::Vector(vector_scalar(op, v, s, false, return_bool))
        }
        (Value::Scalar(s), Value::Vector(v)) => {
            Value::Vector(vector_scalar(op, v, s, true, return_bool))
        }
        (Value::Vector(l), Value::Vector(r)) => {
            Value::Vector(vector_vector(op, &l, &r, return_bool, m))
        }
    }
}

/// `swap`: the scalar is on the left. A comparison keeps the vector's value either way.
fn vector_scalar(op: BinOp, v: Vec<Sample>, s: f64, swap: bool, return_bool: bool) -> Vec<Sample> {
    let drop_name = !op.is_comparison() || return_bool;
    v.into_iter()
        .filter_map(|mut e| {
            let (l, r) = if swap { (s, e.value) } else { (e.value, s) };
            let (mut value, mut keep) = elem(op, l, r);
            if op.is_comparison() {
                value = e.value;
            }
            if return_bool {
                value = as_bool(keep);
                keep = true;
            }
            keep.then(|| {
                e.value = value;
                if drop_name {
                    e.labels = e.labels.without_name();
                }
                e
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
    let mut uses: HashMap<usize, usize> = HashMap::default();
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
        *uses.entry(ri).or_default() += 1;
        out.push((
            ri,
            Sample {
                labels: result_labels(&ls.labels, op, m, return_bool),
                value,
            },
        ));
    }
    out.into_iter()
        .filter(|(ri, _)| uses.get(ri).copied() == Some(1))
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

pub(super) fn set(op: SetOp, l: Vec<Sample>, r: Vec<Sample>, m: &Matching) -> Vec<Sample> {
    match op {
        SetOp::And => {
            if l.is_empty() || r.is_empty() {
                return Vec::new();
            }
            let right = Index::new(&r, m);
            l.into_iter()
                .filter(|s| right.matches(&s.labels, m).next().is_some())
                .collect()
        }
        SetOp::Unless => {
            if l.is_empty() || r.is_empty() {
                return l;
            }
            let right = Index::new(&r, m);
            l.into_iter()
                .filter(|s| right.matches(&s.labels, m).next().is_none())
                .collect()
        }
        SetOp::Or => {
            if l.is_empty() {
                return r;
            }
            let left = Index::new(&l, m);
            let extra: Vec<Sample> = r
                .into_iter()
                .filter(|s| left.matches(&s.labels, m).next().is_none())
                .collect();
            let mut out = l;
            out.extend(extra);
            out
        }
    }
}
