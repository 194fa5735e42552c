use std::time::Duration;

use super::*;

fn needs(pairs: &[(&str, u64)]) -> Needs {
    let mut n = Needs::default();
    for (name, ms) in pairs {
        n.add(name, Duration::from_millis(*ms));
    }
    n
}

fn small() -> Bounds {
    Bounds {
        max_series: 100,
        step: Duration::from_secs(1),
        fine_span: Duration::from_secs(5),
        coarse_step: Duration::from_secs(3),
        coarse_span: Duration::from_secs(30),
    }
}

/// All samples of the series of `metric` in `(from, to]`.
fn read(db: &Tsdb, metric: &str, from: i64, to: i64) -> Vec<(i64, f64)> {
    read_at(db, metric, from, to, db.is_coarse(to - from))
}

fn read_at(db: &Tsdb, metric: &str, from: i64, to: i64, coarse: bool) -> Vec<(i64, f64)> {
    let mut out = Vec::new();
    if let Some(w) = db.window(from, to, coarse) {
        for s in db.series(metric) {
            db.samples(s, &w, &mut out);
        }
    }
    out
}

fn last(db: &Tsdb, metric: &str, at: i64) -> Vec<(String, f64)> {
    let Some(w) = db.instant(at, false) else {
        return Vec::new();
    };
    db.series(metric)
        .filter_map(|s| db.last_value(s, &w).map(|v| (s.labels().to_string(), v)))
        .collect()
}

#[test]
fn keeps_only_needed_metrics_and_counts() {
    let mut db = Tsdb::new(small());
    db.set_needs(&needs(&[("x_total", 2000)]));
    let text =
        "# HELP x_total X.\n# TYPE x_total counter\nx_total{a=\"1\"} 3\nx_total{a=\"2\"} 4\n\
                y 5\ny_bucket{le=\"+Inf\"} 1\n# EOF\n";
    let got = db.ingest(1000, text);
    assert_eq!(
        got,
        Ingested {
            samples: 4,
            kept: 2,
            refused: 0,
            malformed: 0
        }
    );
    assert_eq!(db.stats().series, 2);
    assert_eq!(
        last(&db, "x_total", 1000),
        vec![
            ("x_total{a=\"1\"}".to_string(), 3.0),
            ("x_total{a=\"2\"}".to_string(), 4.0)
        ]
    );
    assert!(last(&db, "y", 1000).is_empty());
}

#[test]
fn absence_at_the_latest_tick_is_staleness() {
    let mut db = Tsdb::new(small());
    db.set_needs(&needs(&[("x", 3000)]));
    db.ingest(0, "x{a=\"1\"} 1\nx{a=\"2\"} 2\n");
    db.ingest(1000, "x{a=\"1\"} 3\n");
    assert_eq!(last(&db, "x", 1000), vec![("x{a=\"1\"}".to_string(), 3.0)]);
    // Between ticks, the latest tick at or before counts.
    assert_eq!(last(&db, "x", 1999).len(), 1);
    assert_eq!(last(&db, "x", 500).len(), 2);
    // The range still holds the gone series' earlier sample.
    assert_eq!(
        read(&db, "x", -1, 1000),
        vec![(0, 1.0), (1000, 3.0), (0, 2.0)]
    );
}

#[test]
fn nan_samples_are_samples() {
    let mut db = Tsdb::new(small());
    db.set_needs(&needs(&[("x", 0)]));
    db.ingest(0, "x NaN\n");
    let got = last(&db, "x", 0);
    assert_eq!(got.len(), 1);
    assert!(got[0].1.is_nan());
}

#[test]
fn fine_ring_wraps_around() {
    let mut db = Tsdb::new(small());
    db.set_needs(&needs(&[("x", 5000)]));
    for i in 0..20 {
        db.ingest(i * 1000, &format!("x {i}\n"));
    }
    // Left-open: (14 s, 19 s] holds 15..=19.
    let got = read(&db, "x", 14_000, 19_000);
    assert_eq!(
        got,
        (15..20).map(|i| (i * 1000, i as f64)).collect::<Vec<_>>()
    );
    // Older ticks are gone, not wrapped into the window.
    assert_eq!(read_at(&db, "x", 0, 19_000, false).len(), 5 + 2);
    assert_eq!(
        read_at(&db, "x", 0, 19_000, false).first(),
        Some(&(13_000, 13.0))
    );
}

#[test]
fn ranges_beyond_the_fine_span_read_the_coarse_ring() {
    let mut db = Tsdb::new(small());
    db.set_needs(&needs(&[("x", 20_000)]));
    for i in 0..40 {
        db.ingest(i * 1000, &format!("x {i}\n"));
    }
    // Coarse ticks are the first scrape of each 3 s: 0, 3, ..., 39.
    let got = read(&db, "x", 19_000, 39_000);
    assert_eq!(
        got,
        (7..14)
            .map(|i| (i * 3000, (i * 3) as f64))
            .collect::<Vec<_>>()
    );
    // A metric read only within the fine span keeps no coarse ring.
    db.set_needs(&needs(&[("x", 2_000)]));
    assert!(read(&db, "x", 19_000, 39_000).is_empty());
    assert_eq!(
        read(&db, "x", 37_000, 39_000),
        vec![(38_000, 38.0), (39_000, 39.0)]
    );
}

#[test]
fn max_series_refuses_and_counts() {
    let mut db = Tsdb::new(Bounds {
        max_series: 3,
        ..small()
    });
    db.set_needs(&needs(&[("x", 1000)]));
    let text: String = (0..5).map(|i| format!("x{{i=\"{i}\"}} {i}\n")).collect();
    let got = db.ingest(0, &text);
    assert_eq!((got.kept, got.refused), (3, 2));
    let got = db.ingest(1000, &text);
    assert_eq!((got.kept, got.refused), (3, 2));
    let st = db.stats();
    assert_eq!((st.series, st.refused_total), (3, 4));
}

#[test]
fn malformed_lines_are_skipped_and_counted() {
    let mut db = Tsdb::new(small());
    db.set_needs(&needs(&[("x", 1000)]));
    let text = "x{a=\"1\"} 1\nx{a=\"2\" 2\nx{a=\"3\"} notanumber\nx{a=3} 3\nx{a=\"4\"}\n\
                x{a=\"5\",a=\"6\"} 1\nx{a=\"\\q\"} 1\nx{a=\"7\"} 7\n";
    let got = db.ingest(0, text);
    assert_eq!((got.kept, got.malformed), (2, 6));
    assert_eq!(db.stats().malformed_total, 6);
    assert_eq!(db.stats().series, 2);
}

#[test]
fn garbage_never_panics() {
    let mut db = Tsdb::new(small());
    db.set_needs(&needs(&[("x", 1000)]));
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let alphabet = b"x{}=\",\\ \n#aLe1.+-InfNa\t}";
    for t in 0..200 {
        let text: Vec<u8> = (0..300)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                alphabet[(seed % alphabet.len() as u64) as usize]
            })
            .collect();
        db.ingest(t * 1000, &String::from_utf8_lossy(&text));
    }
    assert!(db.stats().series <= 100);
}

#[test]
fn respelt_series_is_one_series() {
    let mut db = Tsdb::new(small());
    db.set_needs(&needs(&[("x", 1000)]));
    db.ingest(0, "x{a=\"1\",b=\"2\"} 1\n");
    db.ingest(1000, "x{b=\"2\", a=\"1\",} 2\n");
    assert_eq!(db.stats().series, 1);
    assert_eq!(read(&db, "x", -1, 1000), vec![(0, 1.0), (1000, 2.0)]);
}

#[test]
fn gone_series_are_freed_after_their_window() {
    let mut db = Tsdb::new(small());
    db.set_needs(&needs(&[("x", 2000)]));
    db.ingest(0, "x{a=\"1\"} 1\nx{a=\"2\"} 1\n");
    // Depth is 2 s / 1 s + 2 = 4 ticks.
    for i in 1..4 {
        db.ingest(i * 1000, "x{a=\"1\"} 1\n");
        assert_eq!(db.stats().series, 2, "tick {i}");
    }
    db.ingest(4000, "x{a=\"1\"} 1\n");
    assert_eq!(db.stats().series, 1);
    assert_eq!(last(&db, "x", 4000), vec![("x{a=\"1\"}".to_string(), 1.0)]);
    // It comes back as a new series.
    db.ingest(5000, "x{a=\"1\"} 1\nx{a=\"2\"} 5\n");
    assert_eq!(last(&db, "x", 5000).len(), 2);
}

#[test]
fn needs_resize_keeps_recent_samples_and_drop_frees() {
    let mut db = Tsdb::new(small());
    db.set_needs(&needs(&[("x", 1000), ("y", 1000)]));
    for i in 0..3 {
        db.ingest(i * 1000, &format!("x {i}\ny {i}\n"));
    }
    let before = db.stats().bytes;
    db.set_needs(&needs(&[("x", 4000)]));
    assert_eq!(db.stats().series, 1);
    // Depth was 3: ticks 0..=2 are all still there.
    assert_eq!(read(&db, "x", -1, 2000).len(), 3);
    for i in 3..6 {
        db.ingest(i * 1000, &format!("x {i}\ny {i}\n"));
    }
    assert_eq!(read(&db, "x", 1000, 5000).len(), 4);
    assert!(db.stats().bytes > 0 && before > 0);
}

#[test]
fn out_of_order_scrapes_are_ignored() {
    let mut db = Tsdb::new(small());
    db.set_needs(&needs(&[("x", 1000)]));
    db.ingest(1000, "x 1\n");
    assert_eq!(db.ingest(1000, "x 2\n"), Ingested::default());
    assert_eq!(db.ingest(500, "x 3\n"), Ingested::default());
    assert_eq!(last(&db, "x", 1000), vec![("x{}".to_string(), 1.0)]);
}

#[test]
fn bytes_track_series_and_depth() {
    let mut db = Tsdb::new(Bounds::default());
    db.set_needs(&needs(&[("x", 60_000)]));
    let empty = db.stats().bytes;
    let text: String = (0..1000)
        .map(|i| format!("x{{syscall=\"s{i}\",kind=\"k\"}} {i}\n"))
        .collect();
    db.ingest(0, &text);
    let per_series = (db.stats().bytes - empty) / 1000;
    // 242 ticks of 8 B, plus labels, the raw-text and label maps and the postings.
    assert!(
        (242 * 8..242 * 8 + 800).contains(&per_series),
        "{per_series}"
    );
}
