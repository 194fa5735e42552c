//! The statistics every bench prints: medians and their rough uncertainty for interleaved
//! rounds (robust to one disturbed round), means with Student's t intervals, spreads.

/// About a 95% interval half-width for the median of `v`: 2 standard errors, with the
/// standard error of a median taken as 1.25 σ / √n and σ estimated from the median absolute
/// deviation (× 1.4826), which one disturbed round does not inflate. Rough with few rounds.
pub(crate) fn uncertainty(v: &[f64]) -> f64 {
    if v.len() < 3 {
        return f64::NAN;
    }
    let m = median(v.to_vec());
    let mad = median(v.iter().map(|x| (x - m).abs()).collect());
    2.0 * 1.25 * 1.4826 * mad / (v.len() as f64).sqrt()
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// (max - min) / median, min, max.
pub(crate) fn spread(v: &[f64]) -> (f64, f64, f64) {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    ((max - min) / median(v.to_vec()), min, max)
}

pub(crate) fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// Sample standard deviation (NaN below two values).
pub(crate) fn sd(v: &[f64]) -> f64 {
    if v.len() < 2 {
        return f64::NAN;
    }
    let m = mean(v);
    (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt()
}

/// Half-width of a ~95% interval for the mean of `v` (Student's t).
pub(crate) fn ci95(v: &[f64]) -> f64 {
    const T: [f64; 10] = [12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23];
    let n = v.len();
    if n < 2 {
        return f64::NAN;
    }
    T.get(n - 2).copied().unwrap_or(2.1) * sd(v) / (n as f64).sqrt()
}
