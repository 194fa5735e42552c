//! Requests in flight: the FIFO of start times, statement keys, completions paired with
//! their requests, and what is counted in `DB_STATS`.

use super::*;

/// Starts timing a request; returns its sequence number, or None if too many are in flight:
/// then it is counted untimed and, but for PostgreSQL (done by Sync group), noted after the
/// last slot so that its response is matched in order.
#[inline(always)]
pub(crate) fn push(c: &mut Conn, flags: u8, key: u64, now: u64) -> Option<u64> {
    let (head, tail) = (vget(&c.head), vget(&c.tail));
    if tail.wrapping_sub(head) >= DB_INFLIGHT as u64 {
        bump(counters::INFLIGHT_FULL);
        vadd(&mut c.untimed, 1);
        vadd(&mut c.loss_untimed, 1);
        vset(&mut c.loss_pending, 1);
        if c.system == system::POSTGRESQL {
            vadd(&mut c.pg_open_untimed, 1);
        } else {
            let last = (tail.wrapping_sub(1) & INFLIGHT_MASK) as usize;
            if last < DB_INFLIGHT {
                c.gap[last] += 1;
            }
        }
        return None;
    }
    let i = (tail & INFLIGHT_MASK) as usize;
    if i < DB_INFLIGHT {
        c.start[i] = now;
        c.key[i] = key;
        c.qflags[i] = flags;
        c.gap[i] = 0;
    }
    vset(&mut c.tail, tail + 1);
    Some(tail)
}

#[inline(always)]
pub(crate) fn head_flags(c: &Conn) -> Option<u8> {
    let head = vget(&c.head);
    if head == vget(&c.tail) {
        return None;
    }
    let i = (head & INFLIGHT_MASK) as usize;
    if i < DB_INFLIGHT {
        Some(vget(&c.qflags[i]))
    } else {
        None
    }
}

/// Times a request that starts at `at` of this read or write (or counts it untimed), and
/// sends its text if its statement key is not known yet.
#[inline(always)]
pub(crate) fn note_request(c: &mut Conn, w: &mut Scratch, flags: u8, at: u32) {
    let key = statement_key(c, w, flags, at);
    let gen = vget(&w.known_gen);
    if vget(&c.known_key) != key || vget(&c.known_gen) != gen {
        // SAFETY: a lookup; the value is not kept.
        if unsafe { DB_KNOWN.get(key) }.is_some() {
            vset(&mut c.known_key, key);
            vset(&mut c.known_gen, gen);
        } else if !sent_lately(w, key) {
            text_event(c, key, w.buf_addr, at, w.len);
        }
    }
    if push(c, flags, key, w.now).is_none() {
        account(c, w, key, outcome::UNTIMED, 1, 0, 0);
    }
}

/// This CPU sent `key`'s text less than `TEXT_RESEND_NS` ago (else notes that it sends it
/// now): a statement new while userspace is slow to name it (or stopped) costs a text every
/// `TEXT_RESEND_NS` per CPU, not one per request.
#[inline(always)]
pub(crate) fn sent_lately(w: &mut Scratch, key: u64) -> bool {
    let i = ((key ^ (key >> 29)) & (SENT_SLOTS as u64 - 1)) as usize;
    if i >= SENT_SLOTS {
        return false;
    }
    let now = w.now;
    if w.sent_key[i] == key && now.wrapping_sub(w.sent_at[i]) < TEXT_RESEND_NS {
        return true;
    }
    w.sent_key[i] = key;
    w.sent_at[i] = now;
    false
}

/// Finds up to `max` (at most `DB_PREFIX_LEN`) bytes of the request at `at` for its key:
/// in the scratch window if they are there (nearly always: it holds the read or write's
/// first KiB), else copied into `w.text` (a user read costs 100 to 200 ns here). Returns how
/// many; `kb` reads them.
#[inline(always)]
pub(crate) fn read_text(w: &mut Scratch, at: u32, max: u32) -> u32 {
    let mut n = vget(&w.len).saturating_sub(at);
    if n > max {
        n = max;
    }
    if n > DB_PREFIX_LEN as u32 {
        n = DB_PREFIX_LEN as u32;
    }
    let base = vget(&w.base);
    if at >= base && at + n <= base + vget(&w.copied) {
        vset(&mut w.key_in_buf, 1);
        vset(&mut w.key_off, at - base);
        return n;
    }
    vset(&mut w.key_in_buf, 0);
    vset(&mut w.key_off, 0);
    if n == 0 || !read_user(w.text.as_mut_ptr(), n, vget(&w.buf_addr) + at as u64) {
        return 0;
    }
    n
}

/// Byte `i` of the bytes `read_text` found.
#[inline(always)]
pub(crate) fn kb(w: &Scratch, i: u32) -> u8 {
    key_byte(w, vget(&w.key_in_buf), vget(&w.key_off), i)
}

#[inline(always)]
pub(crate) fn key_byte(w: &Scratch, in_buf: u32, off: u32, i: u32) -> u8 {
    if in_buf != 0 {
        w.buf[((off + i) & SCRATCH_MASK) as usize]
    } else {
        w.text[(i & (DB_PREFIX_LEN as u32 - 1)) as usize]
    }
}

/// The statement key of the request at `at`: the same for every run of one statement (as
/// far as its first `DB_PREFIX_LEN` bytes tell), different for different statements.
#[inline(always)]
pub(crate) fn statement_key(c: &Conn, w: &mut Scratch, flags: u8, at: u32) -> u64 {
    // Per role: each end's text names its own process.
    let seed = mix(
        FNV_OFFSET,
        c.system as u64 | (flags as u64) << 8 | (c.role as u64) << 16,
    );
    match c.system {
        system::REDIS => {
            // Up to the end of the command name: `*N\r\n$L\r\nNAME\r\n` (an inline command:
            // its first line).
            let n = read_text(w, at, RESP_KEY_BYTES);
            let lines = if kb(w, 0) == b'*' { 3 } else { 1 };
            let (in_buf, off) = (vget(&w.key_in_buf), vget(&w.key_off));
            let (mut h, mut nl) = (seed, 0);
            for i in 0..RESP_KEY_BYTES {
                if i >= n || nl >= lines {
                    break;
                }
                let b = key_byte(w, in_buf, off, i);
                h = mix(h, b as u64);
                if b == b'\n' {
                    nl += 1;
                }
            }
            h
        }
        system::POSTGRESQL => {
            let n = read_text(w, at, DB_PREFIX_LEN as u32);
            if n < 6 {
                return mix(seed, c.conn_id);
            }
            let t = kb(w, 0);
            let mlen = u32::from_be_bytes([kb(w, 1), kb(w, 2), kb(w, 3), kb(w, 4)]);
            let end = if mlen < n { mlen + 1 } else { n };
            let seed = mix(seed, t as u64);
            match t {
                // A simple query: its text.
                b'Q' => text_hash(w, seed, 5, end, 1),
                // An unnamed statement: its text, whoever parses it.
                b'P' if kb(w, 5) == 0 => text_hash(w, seed, 5, end, 2),
                // A named statement (Parse) or one bound by name (Bind): the name means
                // something on this connection only.
                b'P' | b'B' => mix(text_hash(w, seed, 5, end, 2), c.conn_id),
                _ => mix(seed, c.conn_id),
            }
        }
        _ => {
            // MySQL: the command byte, and a query's or prepared statement's text.
            let n = read_text(w, at, DB_PREFIX_LEN as u32);
            let cmd = kb(w, 0);
            let seed = mix(seed, cmd as u64);
            if n > 1 && (cmd == 0x03 || cmd == 0x16) {
                text_hash(w, seed, 1, n, 0)
            } else {
                seed
            }
        }
    }
}

/// Hash of `w.text[from..to]` with numeric literals (digits not inside a word) and the insides
/// of quoted strings skipped, ending after the `nuls`th NUL byte (0: at `to`).
#[inline(always)]
pub(crate) fn text_hash(w: &mut Scratch, seed: u64, from: u32, to: u32, nuls: u32) -> u64 {
    vset(&mut w.hash_h, seed);
    vset(&mut w.hash_i, from);
    vset(&mut w.hash_end, to);
    vset(&mut w.hash_nuls, nuls);
    vset(&mut w.hash_ident, 0);
    vset(&mut w.hash_quote, 0);
    let mut l = LoopCtx {
        c: core::ptr::null_mut(),
        w: core::ptr::from_mut(w),
    };
    // SAFETY: as in `run_steps`.
    unsafe {
        bpf_loop(
            (DB_PREFIX_LEN / HASH_CHUNK) as u32 + 1,
            hash_step as *mut _,
            (&raw mut l).cast(),
            0,
        )
    };
    vget(&w.hash_h)
}

/// Keys whose text each CPU remembers sending (a power of two), and for how long.
pub(crate) const SENT_SLOTS: usize = 32;
pub(crate) const TEXT_RESEND_NS: u64 = 50_000_000;

/// Bytes one `hash_step` takes.
pub(crate) const HASH_CHUNK: usize = 8;

/// `HASH_CHUNK` bytes of a `text_hash`; 1 when done.
pub(crate) extern "C" fn hash_step(_i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: `text_hash` passes its `LoopCtx`, whose scratch pointer is the per-CPU scratch.
    let w = unsafe { &mut *(*ctx.cast::<LoopCtx>()).w };
    let mut h = vget(&w.hash_h);
    let mut i = vget(&w.hash_i);
    let mut end = vget(&w.hash_end);
    let mut nuls = vget(&w.hash_nuls);
    let mut ident = vget(&w.hash_ident);
    let mut quote = vget(&w.hash_quote);
    let (in_buf, off) = (vget(&w.key_in_buf), vget(&w.key_off));
    for _ in 0..HASH_CHUNK {
        if i >= end {
            break;
        }
        let b = key_byte(w, in_buf, off, i);
        i += 1;
        if quote != 0 {
            if b == b'\'' {
                quote = 0;
            }
            continue;
        }
        if b == 0 {
            h = mix(h, 0);
            ident = 0;
            if nuls == 1 {
                end = i;
            } else if nuls > 1 {
                nuls -= 1;
            }
            continue;
        }
        if b == b'\'' {
            quote = 1;
            ident = 0;
            h = mix(h, b'?' as u64);
            continue;
        }
        let digit = b.wrapping_sub(b'0') < 10;
        if digit && ident == 0 {
            continue;
        }
        let word = (b | 0x20).wrapping_sub(b'a') < 26 || b == b'_' || b == b'$' || b >= 0x80;
        h = mix(h, b as u64);
        ident = (word || digit) as u32;
    }
    vset(&mut w.hash_h, h);
    vset(&mut w.hash_i, i);
    vset(&mut w.hash_end, end);
    vset(&mut w.hash_nuls, nuls);
    vset(&mut w.hash_ident, ident);
    vset(&mut w.hash_quote, quote);
    (i >= end) as i64
}

/// Completes the oldest `count` timed requests in flight with `result`.
#[inline(always)]
pub(crate) fn note_done(c: &mut Conn, w: &mut Scratch, result: u8, count: u64) {
    let inflight = vget(&c.tail).wrapping_sub(vget(&c.head));
    let n = if count > inflight { inflight } else { count };
    if n == 0 || n > DB_INFLIGHT as u64 {
        return;
    }
    complete(c, w, result, n, 0);
}

/// One response, in order (RESP, MySQL): it answers an untimed request ahead of the head if
/// any is owed one, else the head, whose own untimed followers are owed the next responses.
#[inline(always)]
pub(crate) fn reply_done(c: &mut Conn, w: &mut Scratch, result: u8, end: u64) {
    let owed = vget(&c.swallow);
    if owed > 0 {
        vset(&mut c.swallow, owed - 1);
        let u = vget(&c.untimed);
        vset(&mut c.untimed, u.saturating_sub(1));
        return;
    }
    let head = vget(&c.head);
    if head == vget(&c.tail) {
        // Nothing in flight: a push message, or a response to a request not seen.
        return;
    }
    let i = (head & INFLIGHT_MASK) as usize;
    if i < DB_INFLIGHT {
        vset(&mut c.swallow, vget(&c.gap[i]) as u64);
        c.gap[i] = 0;
    }
    complete(c, w, result, 1, end);
}

/// Completes the `n` oldest timed requests with `result` at `end` (0: now).
#[inline(always)]
pub(crate) fn complete(c: &mut Conn, w: &mut Scratch, result: u8, n: u64, end: u64) {
    if n == 1 {
        complete_one(c, w, result, end);
        return;
    }
    vset(&mut w.done_result, result);
    vset(&mut w.done_end, end);
    let mut l = LoopCtx {
        c: core::ptr::from_mut(c),
        w: core::ptr::from_mut(w),
    };
    // SAFETY: as in `run_steps`.
    unsafe { bpf_loop(n as u32, complete_step as *mut _, (&raw mut l).cast(), 0) };
}

pub(crate) extern "C" fn complete_step(_i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    step_with(ctx, |c, w| {
        let (r, e) = (vget(&w.done_result), vget(&w.done_end));
        complete_one(c, w, r, e);
        true
    })
}

/// Completes the head request: adds it to the run of completions to count (consecutive
/// ones of one statement, outcome and latency bucket: one update), and sends a slow-query
/// event if it took at least the threshold.
#[inline(always)]
pub(crate) fn complete_one(c: &mut Conn, w: &mut Scratch, result: u8, end: u64) {
    let head = vget(&c.head);
    let i = (head & INFLIGHT_MASK) as usize;
    let (start, key) = if i < DB_INFLIGHT {
        (c.start[i], c.key[i])
    } else {
        (0, 0)
    };
    vset(&mut c.head, head + 1);
    let end = if end != 0 { end } else { w.now };
    let d = end.saturating_sub(start);
    let slow = vget(&w.slow_ns);
    if slow != 0 && d >= slow {
        slow_event(c, key, result, start, end);
    }
    let bucket = log2_bucket(d) as u32;
    let run = vget(&w.run_count);
    if run != 0
        && run < MAX_RUN
        && vget(&w.run_key) == key
        && vget(&w.run_outcome) == result
        && vget(&w.run_bucket) == bucket
    {
        vset(&mut w.run_count, run + 1);
        vadd(&mut w.run_sum, d);
    } else {
        flush_run(c, w);
        vset(&mut w.run_key, key);
        vset(&mut w.run_outcome, result);
        vset(&mut w.run_bucket, bucket);
        vset(&mut w.run_sum, d);
        vset(&mut w.run_count, 1);
    }
}

/// Counts the run of completions, if any.
#[inline(always)]
pub(crate) fn flush_run(c: &mut Conn, w: &mut Scratch) {
    let n = vget(&w.run_count);
    if n == 0 {
        return;
    }
    vset(&mut w.run_count, 0);
    let (key, o, sum, b) = (
        vget(&w.run_key),
        vget(&w.run_outcome),
        vget(&w.run_sum),
        vget(&w.run_bucket),
    );
    account(c, w, key, o, n, sum, b);
}

/// The entry of `k`, inserted (zeroed) if missing; None if the map is full.
#[inline(always)]
pub(crate) fn stat_entry(
    map: &HashMap<DbStatKey, DbStat>,
    k: &DbStatKey,
    w: &Scratch,
) -> Option<*mut DbStat> {
    if let Some(v) = map.get_ptr_mut(k) {
        return Some(v);
    }
    // Another CPU may insert it first: then this one finds it. By reference: a copy of the
    // zeros would take 176 bytes of the 512-byte stack.
    #[allow(clippy::needless_borrows_for_generic_args)]
    let _ = map.insert(k, &w.zero, NOEXIST);
    map.get_ptr_mut(k)
}

/// Adds `n` requests of statement `key` with `outcome`, `sum` ns together, all in latency
/// bucket `bucket`, to this connection's series in `DB_STATS`.
#[inline(always)]
pub(crate) fn account(
    c: &mut Conn,
    w: &Scratch,
    key: u64,
    outcome: u8,
    n: u32,
    sum: u64,
    bucket: u32,
) {
    let mut k = DbStatKey {
        owner: c.owner,
        dest: c.dest,
        key,
        system: c.system,
        role: c.role,
        outcome,
        _pad: [0; 5],
    };
    let v = match stat_entry(&DB_STATS, &k, w) {
        Some(v) => v,
        None => {
            k.key = 0;
            match stat_entry(&DB_STATS_OTHER, &k, w) {
                Some(v) => v,
                None => {
                    bump_by(counters::STATS_FULL, n as u64);
                    vadd(&mut c.loss_event, n);
                    vset(&mut c.loss_pending, 1);
                    return;
                }
            }
        }
    };
    // SAFETY: a map value, alive while this program runs; other CPUs update it too, with
    // atomic adds like these.
    unsafe {
        atomic_add(&raw mut (*v).count, n as u64);
        if outcome != outcome::UNTIMED {
            atomic_add(&raw mut (*v).sum_ns, sum);
            let b = bucket as usize;
            if b < HIST_BUCKETS {
                atomic_add(&raw mut (*v).buckets[b], n);
            }
        }
    }
}

/// The end of a walk: what is left to count and to report.
#[inline(always)]
pub(crate) fn finish(c: &mut Conn, w: &mut Scratch) {
    flush_run(c, w);
    if vget(&c.loss_pending) != 0 {
        loss_event(c);
    }
}

/// Drops the requests in flight: the framing of one direction is lost, responses can no
/// longer be told apart. Counts the timed ones (untimed ones were counted when seen), and the
/// bytes of this read or write left undecoded; the direction resynchronises on its next read
/// or write.
#[inline(always)]
pub(crate) fn desync(c: &mut Conn, w: &mut Scratch, req: bool) {
    bump(counters::DESYNC);
    let (head, tail) = (vget(&c.head), vget(&c.tail));
    let mut timed = tail.wrapping_sub(head);
    if timed > DB_INFLIGHT as u64 {
        timed = DB_INFLIGHT as u64;
    }
    if timed > 0 {
        bump_by(counters::LOST_DESYNC, timed);
        vadd(&mut c.loss_desync, timed as u32);
        if vget(&c.loss_to) != vget(&c.loss_from) {
            vset(&mut c.loss_to, tail);
        } else {
            vset(&mut c.loss_from, tail - timed);
            vset(&mut c.loss_to, tail);
        }
        vset(&mut c.loss_pending, 1);
    }
    let (at, len) = (vget(&w.at), vget(&w.len));
    let left = (len.saturating_sub(at) + vget(&w.seg_rest)) as u64;
    if left > 0 {
        bump_by(counters::BYTES_NOT_DECODED, left);
        vadd(&mut c.loss_bytes, left);
        vset(&mut c.loss_pending, 1);
    }
    // Nothing more of this read or write is walked.
    vset(&mut w.at, len);
    vset(&mut w.seg_rest, 0);
    c.head = tail;
    c.untimed = 0;
    c.swallow = 0;
    c.sync_head = c.sync_tail;
    c.pg_open_untimed = 0;
    c.pg_err = 0;
    c.pg_aborted = 0;
    if req {
        c.req_skip = 0;
        c.req = Resp::zero();
        c.my_cmd_pending = 0;
    } else {
        c.resp_skip = 0;
        c.resp = Resp::zero();
        c.my_resp_pending_ns = 0;
        c.pg_hunt = 0;
    }
}
