//! The collector's task: the ring buffer drained, keys registered with the kernel, counts
//! folded into the store every tick.

use super::*;

/// Reads query events and the kernel's counts until the ring buffer's fd fails (the probe
/// was dropped).
pub async fn run_event_reader(
    maps: DbMaps,
    store: SharedStore,
    config: watch::Receiver<Arc<Config>>,
) {
    let DbMaps {
        ring,
        mut stats,
        mut stats_other,
        mut known,
        mut settings,
    } = maps;
    // SAFETY: the ring buffer owns its map fd, which stays open for as long as the AsyncFd
    // owns the ring buffer.
    let mut fd = match unsafe { AsyncFd::register(ring) } {
        Ok(fd) => fd,
        Err(e) => {
            warn!(error = %crate::probes::error_chain(&e), "cannot poll the query-event ring buffer");
            return;
        }
    };
    let mut tracker = Tracker::new(config.borrow().db.log_raw_text);
    let mut drain = tokio::time::interval(Duration::from_millis(DB_DRAIN_INTERVAL_MS));
    drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut fold = tokio::time::interval(FOLD_INTERVAL);
    fold.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut entries = Vec::new();
    let mut records = Vec::new();
    let mut applied = None;
    loop {
        let cfg = config.borrow().clone();
        tracker.set_raw_text(cfg.db.log_raw_text);
        let want = settings_of(&cfg.db, tracker.known_gen);
        if applied != Some(want) {
            match settings.set(0, want, 0) {
                Ok(()) => applied = Some(want),
                Err(e) => {
                    warn!(error = %crate::probes::error_chain(&e), "cannot set the database probe's slow thresholds")
                }
            }
        }
        let mut events = 0u64;
        let mut folding = false;
        let mut maps = KeyMaps {
            known: &mut known,
            settings: &mut settings,
            applied: &mut applied,
            cfg: &cfg.db,
        };
        tokio::select! {
            ready = fd.readable_mut() => {
                let mut guard = match ready {
                    Ok(g) => g,
                    Err(e) => {
                        debug!(error = %crate::probes::error_chain(&e), "query-event ring buffer closed");
                        return;
                    }
                };
                events += drain_ring(guard.get_inner_mut(), &mut tracker, &mut maps);
                guard.clear_ready();
            }
            _ = drain.tick() => events += drain_ring(fd.get_mut(), &mut tracker, &mut maps),
            _ = fold.tick() => {
                // Names first: the texts and connections the counts are waiting for.
                events += drain_ring(fd.get_mut(), &mut tracker, &mut maps);
                entries.clear();
                read_stats(&stats, "DB_STATS", &mut entries);
                read_stats(&stats_other, "DB_STATS_OTHER", &mut entries);
                tracker.fold(&entries, Instant::now(), &mut records);
                for k in tracker.idle.drain(..) {
                    let map = if k.key == 0 { &mut stats_other } else { &mut stats };
                    if map.remove(&k).is_ok() {
                        tracker.folded.remove(&k);
                    }
                }
                folding = true;
            }
        }
        register(&mut tracker, &mut maps);
        if events > 0 || folding || !tracker.slow.is_empty() || !tracker.losses.is_empty() {
            flush(&store, &cfg.db, &mut records, events, &mut tracker);
        }
    }
}

/// Entries of the kernel's count table read per syscall (1024 x 208 bytes).
pub(super) const READ_CHUNK: u32 = 1024;

/// Every entry of one of the kernel's count tables: batched, a few syscalls for the whole
/// table (8,192 entries one by one would be 16,384 syscalls a fold); kernels without batch
/// lookups (before 5.6) get one lookup per entry.
pub(super) fn read_stats(
    map: &aya::maps::HashMap<aya::maps::MapData, DbStatKey, DbStat>,
    name: &'static str,
    into: &mut Vec<(DbStatKey, DbStat)>,
) {
    match crate::probes::read_hash(map, name, READ_CHUNK) {
        Ok(v) => into.extend(v),
        Err(e) => {
            debug!(error = %crate::probes::error_chain(&e), "cannot read the kernel's query counts")
        }
    }
}

/// What the kernel needs of the config.
pub(super) fn settings_of(cfg: &DbConfig, known_gen: u64) -> DbSettings {
    let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1);
    let t = &cfg.slow_threshold;
    DbSettings {
        slow_ns: [0, ns(t.postgresql), ns(t.mysql), ns(t.redis)],
        known_gen,
    }
}

/// Reads what the ring holds; returns how many events. Keys are registered as they are
/// named, not when the ring is empty: under a flood it never is, and every request of a key
/// not registered sends its text.
pub(super) fn drain_ring(
    ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
    tracker: &mut Tracker,
    maps: &mut KeyMaps<'_>,
) -> u64 {
    let mut events = 0u64;
    while let Some(item) = ring.next() {
        events += 1;
        tracker.feed(&item, maps.cfg);
        if !tracker.named.is_empty() || !tracker.forgotten.is_empty() {
            register(tracker, maps);
        }
    }
    register(tracker, maps);
    events
}

/// What registering keys takes: the kernel's `DB_KNOWN` and settings, and the config.
pub(super) struct KeyMaps<'a> {
    pub(super) known: &'a mut aya::maps::HashMap<aya::maps::MapData, u64, u8>,
    pub(super) settings: &'a mut aya::maps::Array<aya::maps::MapData, DbSettings>,
    pub(super) applied: &'a mut Option<DbSettings>,
    pub(super) cfg: &'a DbConfig,
}

/// Tells the kernel which keys are named (their text stops coming) and which are forgotten:
/// those are removed first, then `known_gen` moves on, so that no connection goes on
/// trusting its memory of one (a request in between may skip its text; the next sends it).
pub(super) fn register(tracker: &mut Tracker, maps: &mut KeyMaps<'_>) {
    if !tracker.forgotten.is_empty() {
        for k in tracker.forgotten.drain(..) {
            let _ = maps.known.remove(&k);
        }
        tracker.known_gen += 1;
        let want = settings_of(maps.cfg, tracker.known_gen);
        match maps.settings.set(0, want, 0) {
            Ok(()) => *maps.applied = Some(want),
            Err(e) => {
                warn!(error = %crate::probes::error_chain(&e), "cannot update the database probe's settings")
            }
        }
    }
    let known = &mut maps.known;
    for k in tracker.named.drain(..) {
        if let Err(e) = known.insert(k, 1, 0) {
            debug!(error = %crate::probes::error_chain(&e), "cannot register a statement key");
        }
    }
}

/// Folds the kernel's counts into the store and logs the slow queries.
pub(super) fn flush(
    store: &SharedStore,
    cfg: &DbConfig,
    records: &mut Vec<QueryRecord>,
    events: u64,
    tracker: &mut Tracker,
) {
    let Ok(mut st) = store.write() else {
        records.clear();
        tracker.losses.clear();
        tracker.slow.clear();
        return;
    };
    let cap = cfg.slow_log_capacity.max(1);
    {
        let t = &mut st.db_live;
        t.events += events;
        t.unmatched = tracker.unmatched;
        t.undecodable = tracker.undecodable;
        t.tables = tracker.tables();
        for (k, l) in tracker.losses.drain(..) {
            t.record_loss(k, &l, cfg.max_series);
        }
    }
    for s in tracker.slow.drain(..) {
        // The process-controlled fields are quoted and escaped when they need it: one line
        // per slow query, whatever they hold.
        info!(
            target: "insite::slow_query",
            system = s.system.as_str(),
            role = s.role.as_str(),
            operation = %LogField(&s.operation),
            duration_ms = s.duration_ms,
            outcome = ?s.outcome,
            pid = s.pid,
            comm = %LogField(&s.comm),
            service = %LogField(&s.service),
            destination = %LogField(&s.destination),
            text = %LogField(&s.text),
            "slow query"
        );
        while st.db_slow.len() >= cap {
            st.db_slow.pop_front();
        }
        st.db_slow.push_back(s);
    }
    for r in records.drain(..) {
        st.db_live.record(r, cfg.max_series, cfg.max_fingerprints);
    }
}
