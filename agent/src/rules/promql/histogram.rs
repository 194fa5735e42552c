//! `histogram_quantile` over classic buckets: the `_bucket` series of a vector grouped by their
//! labels other than `le`, each group's quantile interpolated linearly within its bucket.
use super::{
    matching::{Chains, Filter},
    Labels, Sample,
};

/// One group: its output labels and (upper bound, count) pairs.
struct Group {
    labels: Labels,
    buckets: Vec<(f64, f64)>,
}

pub(super) fn quantile(q: f64, vector: &[Sample]) -> Vec<Sample> {
    let mut groups: Vec<Group> = Vec::new();
    // Signature (labels but `le`, `__name__` included as Prometheus does) -> group indices.
    let mut index = Chains::with_capacity(8);
    let mut not_le = Filter::new(|n: &str| n != "le");
    for s in vector {
        let Some(upper) = s.labels.get("le").and_then(parse_bound) else {
            continue;
        };
        let sig = not_le.signature(&s.labels);
        let found = index.get(sig).find(|&g| {
            groups
                .get(g)
                .is_some_and(|g| not_le.keeps_exactly(&s.labels, &g.labels))
        });
        let g = match found {
            Some(g) => g,
            None => {
                index.push(sig);
                groups.push(Group {
                    labels: s.labels.without(|n| n == "le"),
                    buckets: Vec::new(),
                });
                groups.len() - 1
            }
        };
        if let Some(group) = groups.get_mut(g) {
            group.buckets.push((upper, s.value));
        }
    }
    groups
        .into_iter()
        .map(|mut g| Sample {
            value: bucket_quantile(q, &mut g.buckets),
            labels: g.labels.without_name(),
        })
        .collect()
}

/// An `le` value as Go's `ParseFloat` reads it (`+Inf`, `Inf`, `NaN` and floats).
fn parse_bound(le: &str) -> Option<f64> {
    le.parse().ok()
}

/// The φ-quantile of one histogram: sorted by bound, equal bounds merged, counts made
/// monotonic, the rank found and interpolated within its bucket. NaN without a `+Inf` bucket,
/// with fewer than two buckets or no observations.
fn bucket_quantile(q: f64, buckets: &mut Vec<(f64, f64)>) -> f64 {
    if q.is_nan() {
        return f64::NAN;
    }
    if q < 0.0 {
        return f64::NEG_INFINITY;
    }
    if q > 1.0 {
        return f64::INFINITY;
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    if buckets.last().is_none_or(|b| b.0 != f64::INFINITY) {
        return f64::NAN;
    }
    buckets.dedup_by(|later, kept| {
        if later.0 == kept.0 {
            kept.1 += later.1;
            true
        } else {
            false
        }
    });
    let mut max = buckets.first().map_or(0.0, |b| b.1);
    for b in buckets.iter_mut().skip(1) {
        if b.1 > max {
            max = b.1;
        } else if b.1 < max {
            b.1 = max;
        }
    }
    let n = buckets.len();
    if n < 2 {
        return f64::NAN;
    }
    let observations = buckets.get(n - 1).map_or(0.0, |b| b.1);
    if observations == 0.0 {
        return f64::NAN;
    }
    let mut rank = q * observations;
    // The first bucket (the +Inf one aside) whose count reaches the rank.
    let b = buckets
        .get(..n - 1)
        .and_then(|finite| finite.iter().position(|b| b.1 >= rank))
        .unwrap_or(n - 1);
    let bound = |i: usize| buckets.get(i).map_or(f64::NAN, |b| b.0);
    if b == n - 1 {
        return bound(n - 2);
    }
    if b == 0 && bound(0) <= 0.0 {
        return bound(0);
    }
    let (end, mut count) = buckets.get(b).copied().unwrap_or((f64::NAN, f64::NAN));
    let mut start = 0.0;
    if let Some(&(prev_bound, prev_count)) = b.checked_sub(1).and_then(|p| buckets.get(p)) {
        start = prev_bound;
        count -= prev_count;
        rank -= prev_count;
    }
    start + (end - start) * (rank / count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(phi: f64, buckets: &[(f64, f64)]) -> f64 {
        bucket_quantile(phi, &mut buckets.to_vec())
    }

    #[test]
    fn interpolates_within_the_bucket() {
        let b = [(0.1, 10.0), (0.2, 30.0), (f64::INFINITY, 40.0)];
        // rank 20 lies half-way through (0.1, 0.2]: 10 of its 20 observations.
        assert!((q(0.5, &b) - 0.15).abs() < 1e-15);
        // rank 4 in the first bucket, interpolated from 0.
        assert!((q(0.1, &b) - 0.04).abs() < 1e-15);
        // rank 36 falls in +Inf: the highest finite bound.
        assert_eq!(q(0.9, &b), 0.2);
        // Unsorted and duplicated bounds are sorted and merged.
        let b = [(f64::INFINITY, 40.0), (0.2, 20.0), (0.1, 10.0), (0.2, 10.0)];
        assert!((q(0.5, &b) - 0.15).abs() < 1e-15);
    }

    #[test]
    fn nan_and_edge_cases() {
        let b = [(0.1, 10.0), (f64::INFINITY, 10.0)];
        assert!(q(f64::NAN, &b).is_nan());
        assert_eq!(q(-0.1, &b), f64::NEG_INFINITY);
        assert_eq!(q(1.1, &b), f64::INFINITY);
        // No +Inf bucket, one bucket only, no observations.
        assert!(q(0.5, &[(0.1, 1.0), (0.2, 2.0)]).is_nan());
        assert!(q(0.5, &[(f64::INFINITY, 2.0)]).is_nan());
        assert!(q(0.5, &[(0.1, 0.0), (f64::INFINITY, 0.0)]).is_nan());
        // A first bucket with a bound <= 0 is returned as is.
        assert_eq!(q(0.2, &[(-1.0, 5.0), (f64::INFINITY, 10.0)]), -1.0);
        // Non-monotonic counts are raised to the running max: 0.2 counts 10, not 5.
        let b = [(0.1, 10.0), (0.2, 5.0), (0.4, 20.0), (f64::INFINITY, 20.0)];
        assert!((q(0.75, &b) - 0.3).abs() < 1e-15);
    }
}
