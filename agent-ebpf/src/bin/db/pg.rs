//! PostgreSQL: the frontend/backend protocol's messages, one per step, with Sync groups.

use super::*;

/// The 5-byte PostgreSQL message header at `at`: type and length (which counts itself).
#[inline(always)]
pub(crate) fn pg_header(w: &mut Scratch, at: u32) -> (u8, u32) {
    let Some(i) = window(w, at, 5) else {
        return (0, 0);
    };
    let h = &w.buf[i..i + 5];
    (h[0], u32::from_be_bytes([h[1], h[2], h[3], h[4]]))
}

#[inline(always)]
pub(crate) fn pg_walk(c: &mut Conn, w: &mut Scratch, req: bool) {
    if c.phase == PG_SSL_WAIT {
        if req {
            return;
        }
        // One byte: 'S' (or 'G') and the rest is encrypted, 'N' and a startup packet follows.
        if w.copied > 0 && byte(w, 0) == b'N' {
            c.phase = PG_STARTUP;
        } else {
            c.phase = TLS;
            bump(counters::TLS);
        }
        return;
    }
    if c.phase == PG_STARTUP {
        if req {
            c.phase = READY;
        }
        return;
    }
    if !req && c.pg_hunt != 0 {
        pg_tail_ready(c, w);
        return;
    }
    let len = w.len as u64;
    let skip = if req { c.req_skip } else { c.resp_skip };
    if skip >= len {
        if req {
            c.req_skip = skip - len;
        } else {
            c.resp_skip = skip - len;
        }
        return;
    }
    if req {
        c.req_skip = 0;
    } else {
        c.resp_skip = 0;
    }
    vset(&mut w.at, skip as u32);
    // Where the current request's messages began (Parse/Bind... before its Execute).
    vset(&mut w.span, skip as u32);
    if req {
        run_steps(c, w, DB_MAX_STEPS, pg_step_req);
        if capped(w) {
            step_cap(c, w, true);
        }
    } else {
        run_steps(c, w, PG_RESP_MAX_MSGS, pg_step_resp);
        if capped(w) {
            // Too many messages for one pass (a long result): find its end by its last message.
            c.pg_hunt = 1;
            pg_tail_ready(c, w);
        }
    }
}

/// One PostgreSQL message at `w.at`; false when the walk of this read or write is over.
#[inline(always)]
pub(crate) fn pg_step(c: &mut Conn, w: &mut Scratch, req: bool) -> bool {
    let at = vget(&w.at);
    let len = vget(&w.len);
    if at >= len {
        return false;
    }
    if at + 5 > len {
        // A header split across reads.
        if req {
            desync(c, w, true);
        } else {
            c.pg_hunt = 1;
        }
        return false;
    }
    let (t, mlen) = pg_header(w, at);
    if mlen < 4 {
        desync(c, w, req);
        return false;
    }
    let end = at as u64 + 1 + mlen as u64;
    if req {
        match t {
            b'Q' | b'E' => {
                let span = vget(&w.span);
                note_request(c, w, if t == b'E' { Q_EXEC } else { 0 }, span);
                if t == b'Q' {
                    sync_push(c);
                }
                vset(&mut w.span, end as u32);
            }
            b'S' => {
                // A group that runs nothing (Parse/Describe only: a prepared statement)
                // is still a round trip, and userspace learns the statement's SQL from it.
                let span = vget(&w.span);
                if span < at {
                    note_request(c, w, 0, span);
                }
                sync_push(c);
                vset(&mut w.span, end as u32);
            }
            b'P' | b'B' | b'D' | b'C' | b'H' | b'X' | b'p' | b'd' | b'c' | b'f' | b'F' => {}
            _ => {
                desync(c, w, true);
                return false;
            }
        }
    } else {
        // A message completes the head only if the head belongs to the oldest Sync group:
        // otherwise it answers an untimed request of that group.
        let ours = head_in_oldest_group(c);
        match t {
            b'C' | b'I' | b's' => {
                if ours && head_flags(c).is_some_and(|f| f & Q_EXEC != 0) {
                    note_done(c, w, outcome::OK, 1);
                }
            }
            b'E' => match head_flags(c) {
                Some(f) if ours && f & Q_EXEC != 0 => {
                    note_done(c, w, outcome::ERROR, 1);
                    c.pg_aborted = 1;
                }
                Some(_) if ours => c.pg_err = 1,
                // An untimed request of the oldest group failed: the rest of it is skipped.
                _ => c.pg_aborted = 1,
            },
            b'Z' => pg_ready(c, w),
            b'1' | b'2' | b'3' | b'n' | b't' | b'T' | b'D' | b'N' | b'A' | b'S' | b'K' | b'R'
            | b'G' | b'H' | b'W' | b'd' | b'c' | b'v' | b'V' => {}
            _ => {
                desync(c, w, false);
                return false;
            }
        }
    }
    if end > len as u64 {
        if req {
            c.req_skip = end - len as u64;
        } else {
            c.resp_skip = end - len as u64;
        }
        vset(&mut w.at, len);
        return false;
    }
    vset(&mut w.at, end as u32);
    true
}

/// The head request belongs to the oldest Sync group in flight (or no group is).
#[inline(always)]
pub(crate) fn head_in_oldest_group(c: &Conn) -> bool {
    let sh = vget(&c.sync_head);
    sh == vget(&c.sync_tail)
        || vget(&c.head) < vget(&c.syncs[(sh & (PG_SYNCS as u64 - 1)) as usize])
}

/// A Sync (or simple Query) closes a group: its ReadyForQuery completes what is left of it.
#[inline(always)]
pub(crate) fn sync_push(c: &mut Conn) {
    let st = vget(&c.sync_tail);
    if st.wrapping_sub(vget(&c.sync_head)) >= PG_SYNCS as u64 {
        return;
    }
    let j = (st & (PG_SYNCS as u64 - 1)) as usize;
    c.syncs[j] = vget(&c.tail);
    c.sync_untimed[j] = vget(&c.pg_open_untimed);
    vset(&mut c.pg_open_untimed, 0);
    vset(&mut c.sync_tail, st + 1);
}

/// ReadyForQuery: the requests of the oldest group still in flight are done: a simple query
/// (failed if an ErrorResponse came), or Executes the server skipped after an error (or whose
/// CommandCompletes were in a part of a long response that was not walked). Its untimed
/// requests are done too.
#[inline(always)]
pub(crate) fn pg_ready(c: &mut Conn, w: &mut Scratch) {
    let aborted = c.pg_aborted != 0;
    let failed = c.pg_err != 0;
    c.pg_aborted = 0;
    c.pg_err = 0;
    let sh = vget(&c.sync_head);
    if sh == vget(&c.sync_tail) {
        return;
    }
    let j = (sh & (PG_SYNCS as u64 - 1)) as usize;
    let end = vget(&c.syncs[j]);
    let untimed = vget(&c.sync_untimed[j]) as u64;
    c.sync_untimed[j] = 0;
    let left = vget(&c.untimed).saturating_sub(untimed);
    vset(&mut c.untimed, left);
    vset(&mut c.sync_head, sh + 1);
    let n = end.wrapping_sub(vget(&c.head));
    if n == 0 || n > DB_INFLIGHT as u64 {
        return;
    }
    let result = match head_flags(c) {
        _ if aborted => outcome::SKIPPED,
        Some(f) if f & Q_EXEC == 0 && failed => outcome::ERROR,
        _ => outcome::OK,
    };
    note_done(c, w, result, n);
}

/// In a long response whose messages were not all walked: a read that ends with
/// ReadyForQuery ends it.
#[inline(always)]
pub(crate) fn pg_tail_ready(c: &mut Conn, w: &mut Scratch) {
    let len = w.len;
    if len < 6 {
        return;
    }
    let mut t = [0u8; 6];
    let at = len - 6;
    let base = vget(&w.base);
    if at >= base && len <= base + vget(&w.copied) {
        let i = ((at - base) & SCRATCH_MASK) as usize;
        t.copy_from_slice(&w.buf[i..i + 6]);
    } else if !read_user(t.as_mut_ptr(), 6, w.buf_addr + at as u64) {
        return;
    }
    if t[0] != b'Z' || t[1..5] != [0, 0, 0, 5] {
        return;
    }
    c.pg_hunt = 0;
    c.resp_skip = 0;
    pg_ready(c, w);
}
