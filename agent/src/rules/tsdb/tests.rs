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

/// Series share one matrix, a column each: freeing a series in the middle moves the others'
/// columns, and a new series takes a column that held someone else's samples.
#[test]
fn freed_columns_move_the_others_and_new_series_start_empty() {
    let mut db = Tsdb::new(small());
    db.set_needs(&needs(&[("x", 2000)]));
    let abc = |t: i64| {
        format!(
            "x{{a=\"1\"}} {}\nx{{a=\"2\"}} {}\nx{{a=\"3\"}} {}\n",
            t,
            100 + t,
            200 + t
        )
    };
    let ac = |t: i64| format!("x{{a=\"1\"}} {}\nx{{a=\"3\"}} {}\n", t, 200 + t);
    for t in 0..3 {
        db.ingest(t * 1000, &abc(t));
    }
    // a="2" is gone from tick 3 on and freed once its window (4 ticks) is empty.
    for t in 3..7 {
        db.ingest(t * 1000, &ac(t));
    }
    assert_eq!(db.stats().series, 2);
    let w = db.window(2500, 6000, false).unwrap();
    let mut got: Vec<(String, Vec<(i64, f64)>)> = Vec::new();
    for s in db.series("x") {
        let mut v = Vec::new();
        db.samples(s, &w, &mut v);
        got.push((s.labels().to_string(), v));
    }
    let want = |base: f64| {
        (3..7)
            .map(|t| (t * 1000, base + t as f64))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        got,
        vec![
            ("x{a=\"1\"}".to_string(), want(0.0)),
            ("x{a=\"3\"}".to_string(), want(200.0)),
        ]
    );
    // Many new series: the matrix grows and a new series has no sample before its first.
    let mut text = ac(7);
    for i in 0..40 {
        text.push_str(&format!("x{{b=\"{i}\"}} {i}\n"));
    }
    db.ingest(7000, &text);
    let w = db.window(0, 7000, false).unwrap();
    for s in db.series("x") {
        let mut v = Vec::new();
        db.samples(s, &w, &mut v);
        if s.labels().get("b").is_some() {
            assert_eq!(v.len(), 1, "{}: {v:?}", s.labels());
        } else {
            assert_eq!(v.len(), 4, "{}: {v:?}", s.labels());
        }
    }
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

/// The O(1) ends (first, last, count) of the only series of `metric` over `(from, to]`, if
/// its marks allow them (`steady`: no reset either), checked against the samples scanned.
fn ends(db: &Tsdb, metric: &str, from: i64, to: i64, steady: bool) -> Option<(f64, f64, usize)> {
    ends_at(db, metric, from, to, db.is_coarse(to - from), steady)
}

fn ends_at(
    db: &Tsdb,
    metric: &str,
    from: i64,
    to: i64,
    coarse: bool,
    steady: bool,
) -> Option<(f64, f64, usize)> {
    let w = db.window(from, to, coarse)?;
    let s = db.series(metric).next()?;
    let e = db.run(s, &w).ends(steady)?;
    let scanned = read_at(db, metric, from, to, coarse);
    assert_eq!(e.count, scanned.len(), "({from}, {to}]");
    assert_eq!(db.tick_ms(&w, e.first.0), scanned[0].0);
    assert_eq!(db.tick_ms(&w, e.last.0), scanned[e.count - 1].0);
    Some((e.first.1, e.last.1, e.count))
}

#[test]
fn ends_are_o1_over_gapless_ranges_across_the_wrap() {
    let mut db = Tsdb::new(small());
    db.set_needs(&needs(&[("x", 5000)]));
    // Depth 7: 30 ticks wrap the ring four times.
    for i in 0..30 {
        db.ingest(i * 1000, &format!("x {i}\n"));
        if i >= 5 {
            let want = Some(((i - 4) as f64, i as f64, 5));
            assert_eq!(ends(&db, "x", (i - 5) * 1000, i * 1000, true), want);
        }
    }
    // A range older than the ring's depth is clipped to what it holds.
    let clipped = ends_at(&db, "x", 0, 29_000, false, true);
    assert_eq!(clipped, Some((23.0, 29.0, 7)));
}

#[test]
fn gaps_and_resets_fall_back_to_scans() {
    let mut db = Tsdb::new(small());
    db.set_needs(&needs(&[("x", 5000)]));
    let vals = [
        Some(1),
        Some(2),
        None,
        Some(4),
        Some(5),
        Some(1),
        Some(2),
        Some(3),
    ];
    for (i, v) in vals.iter().enumerate() {
        let text = v.map_or(String::new(), |v| format!("x {v}\n"));
        db.ingest(i as i64 * 1000, &text);
    }
    // (1 s, 7 s] holds the gap at 2 s: scanned.
    assert_eq!(ends(&db, "x", 1000, 7000, false), None);
    // (2 s, 7 s]: present throughout, with the reset at 5 s.
    assert_eq!(ends(&db, "x", 2000, 7000, false), Some((4.0, 3.0, 5)));
    assert_eq!(ends(&db, "x", 2000, 7000, true), None);
    // Starting at the reset's sample, there is no drop within.
    assert_eq!(ends(&db, "x", 4000, 7000, true), Some((1.0, 3.0, 3)));
    // A series missing from the latest scrape: its last tick is absent.
    db.ingest(8000, "");
    assert_eq!(ends(&db, "x", 5000, 8000, false), None);
    db.ingest(9000, "x 4\n");
    assert_eq!(ends(&db, "x", 7000, 9000, false), None);
    db.ingest(10_000, "x 5\n");
    assert_eq!(ends(&db, "x", 8000, 10_000, true), Some((4.0, 5.0, 2)));
}

#[test]
fn ends_of_new_series_and_of_the_coarse_ring() {
    let mut db = Tsdb::new(small());
    db.set_needs(&needs(&[("x", 20_000)]));
    // The series appears at 4 s (a coarse step begins at 3 s, 6 s, ...).
    for i in 0..40 {
        let text = if i >= 4 {
            format!("x {i}\n")
        } else {
            String::new()
        };
        db.ingest(i * 1000, &text);
        if (5..8).contains(&i) {
            // The fine ring before its first sample is absent, not "present".
            let from = (i - 5) * 1000;
            assert_eq!(ends(&db, "x", from, i * 1000, false), None, "at {i}");
            assert_eq!(
                ends(&db, "x", 3000, i * 1000, true).map(|e| e.2),
                Some(i as usize - 3)
            );
        }
    }
    // Coarse ticks 6 s, 9 s, ... have it; 3 s (before it) does not.
    assert_eq!(ends(&db, "x", 19_000, 39_000, true), Some((21.0, 39.0, 7)));
    let mut db2 = Tsdb::new(small());
    db2.set_needs(&needs(&[("x", 20_000)]));
    for i in 0..12 {
        let text = if i >= 4 {
            format!("x {i}\n")
        } else {
            String::new()
        };
        db2.ingest(i * 1000, &text);
    }
    // (0 s, 11 s] coarse: ticks 3 s (absent), 6 s, 9 s.
    let w = db2.window(-1, 11_000, true);
    let s = db2.series("x").next();
    let run = w.zip(s).map(|(w, s)| db2.run(s, &w));
    assert!(run.is_some_and(|r| r.ends(false).is_none()));
    assert_eq!(ends(&db2, "x", 5000, 11_000, true), Some((6.0, 9.0, 2)));
}

#[test]
fn a_deeper_ring_is_not_regular_where_it_had_no_samples() {
    let mut db = Tsdb::new(small());
    db.set_needs(&needs(&[("x", 1000)]));
    for i in 0..10 {
        db.ingest(i * 1000, &format!("x {i}\n"));
    }
    // Depth 3 grows to 6: ticks 4..=6 were never kept.
    db.set_needs(&needs(&[("x", 4000)]));
    assert_eq!(read(&db, "x", 4000, 9000).len(), 3);
    assert_eq!(ends(&db, "x", 4000, 9000, false), None);
    assert_eq!(ends(&db, "x", 6000, 9000, true), Some((7.0, 9.0, 3)));
    db.ingest(10_000, "x 10\n");
    assert_eq!(ends(&db, "x", 6000, 10_000, true), Some((7.0, 10.0, 4)));
}
