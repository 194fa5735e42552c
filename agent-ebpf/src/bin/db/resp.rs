//! Redis (RESP2/RESP3): requests as arrays or inline lines, responses as one value however
//! nested, a token or a bulk payload per step.

use super::*;

impl Resp {
    pub(crate) const fn zero() -> Self {
        Self {
            num: 0,
            skip: 0,
            remaining: 0,
            state: R_TYPE,
            num_kind: 0,
            neg: 0,
            at_top: 0,
            top: 0,
            _pad: [0; 7],
        }
    }
}

/// One RESP step: a jump over a bulk payload, or a token: a type byte and what follows it up
/// to its CRLF (a number) or LF (a simple value or inline command), at most `TOKEN_BYTES`
/// bytes; a longer one goes on in the next step. Requests are top-level arrays (or inline
/// lines), each response one top-level value however nested. False when the walk of this
/// read or write is over.
#[inline(always)]
pub(crate) fn resp_step<const REQ: bool>(c: &mut Conn, w: &mut Scratch) -> bool {
    let req = REQ;
    let at = vget(&w.at);
    let len = vget(&w.len);
    if at >= len {
        // RESP state is kept per direction, so a segment boundary is like a read boundary.
        return next_segment(w);
    }
    let r = if req { &mut c.req } else { &mut c.resp };
    let skip = vget(&r.skip);
    if skip > 0 {
        let left = (len - at) as u64;
        if skip > left {
            vset(&mut r.skip, skip - left);
            vset(&mut w.at, len);
            return next_segment(w);
        }
        vset(&mut w.at, at + skip as u32);
        vset(&mut r.skip, 0);
        if vget(&r.remaining) == 0 && !req {
            let o = resp_outcome(vget(&r.top));
            reply_done(c, w, o, 0);
        }
        return true;
    }
    let Some(i) = window(w, at, 1) else {
        desync(c, w, req);
        return false;
    };
    if vget(&r.state) == R_TYPE {
        let b = w.buf[i];
        vset(&mut w.at, at + 1);
        let r = if req { &mut c.req } else { &mut c.resp };
        if vget(&r.remaining) == 0 {
            vset(&mut r.remaining, 1);
            vset(&mut r.at_top, 1);
            vset(&mut r.top, 0);
            if req {
                note_request(c, w, 0, at);
            }
        }
        let r = if req { &mut c.req } else { &mut c.resp };
        vset(&mut r.num, 0);
        vset(&mut r.neg, 0);
        let (state, nk, flag) = match b {
            b'*' | b'~' | b'>' => (R_NUM, N_AGG, 0),
            b'%' | b'|' => (R_NUM, N_MAP, 0),
            b'$' | b'=' | b'!' => (R_NUM, N_BULK, 0),
            b'-' => (R_LINE, 0, TOP_ERR),
            b'_' => (R_LINE, 0, TOP_NULL),
            b'+' | b':' | b',' | b'#' | b'(' => (R_LINE, 0, 0),
            // An inline command: one line.
            _ if req && vget(&r.at_top) != 0 => (R_LINE, 0, 0),
            _ => (R_BAD, 0, 0),
        };
        if state == R_BAD {
            desync(c, w, req);
            return false;
        }
        vset(&mut r.state, state);
        vset(&mut r.num_kind, nk);
        if vget(&r.at_top) != 0 {
            let v = vget(&r.top) | flag;
            vset(&mut r.top, v);
        }
    }
    // The rest of the token, as far as the window goes.
    let mut end = T_MORE;
    for _ in 0..TOKEN_BYTES {
        let at = vget(&w.at);
        let base = vget(&w.base);
        if at >= vget(&w.len) || at < base || at >= base + vget(&w.copied) {
            break;
        }
        let b = w.buf[((at - base) & SCRATCH_MASK) as usize];
        vset(&mut w.at, at + 1);
        let r = if req { &mut c.req } else { &mut c.resp };
        match vget(&r.state) {
            R_NUM => {
                if b.is_ascii_digit() {
                    let n = vget(&r.num);
                    if n < (1 << 40) {
                        vset(&mut r.num, n * 10 + (b - b'0') as u64);
                    }
                } else if b == b'-' {
                    vset(&mut r.neg, 1);
                } else if b == b'\r' {
                    vset(&mut r.state, R_NUM_LF);
                } else {
                    end = T_BAD;
                    break;
                }
            }
            R_NUM_LF => {
                if b != b'\n' {
                    end = T_BAD;
                    break;
                }
                resp_number_done(r);
                end = T_DONE;
                break;
            }
            R_LINE => {
                // A simple value (or inline command) runs to its LF.
                if b == b'\n' {
                    vset(&mut r.state, R_TYPE);
                    let v = vget(&r.remaining).saturating_sub(1);
                    vset(&mut r.remaining, v);
                    vset(&mut r.at_top, 0);
                    end = T_DONE;
                    break;
                }
            }
            _ => break,
        }
    }
    if end == T_BAD {
        desync(c, w, req);
        return false;
    }
    let r = if req { &mut c.req } else { &mut c.resp };
    let skip = vget(&r.skip);
    if end == T_DONE && skip > 0 {
        // A bulk string's header: its payload is passed in this step when this segment
        // holds it (nearly always), not in a step of its own.
        let at = vget(&w.at);
        if skip <= (vget(&w.len).saturating_sub(at)) as u64 {
            vset(&mut w.at, at + skip as u32);
            vset(&mut r.skip, 0);
        }
    }
    if end == T_DONE && !req && vget(&r.remaining) == 0 && vget(&r.skip) == 0 {
        let o = resp_outcome(vget(&r.top));
        reply_done(c, w, o, 0);
    }
    true
}

/// An aggregate's count or a bulk string's length has been read.
#[inline(always)]
pub(crate) fn resp_number_done(r: &mut Resp) {
    vset(&mut r.state, R_TYPE);
    {
        let v = vget(&r.remaining).saturating_sub(1);
        vset(&mut r.remaining, v);
    }
    let null = vget(&r.neg) != 0;
    let at_top = vget(&r.at_top) != 0;
    if null && at_top {
        {
            let v = vget(&r.top) | TOP_NULL;
            vset(&mut r.top, v);
        }
    }
    vset(&mut r.at_top, 0);
    if null {
        return;
    }
    let num = vget(&r.num);
    if vget(&r.num_kind) == N_BULK {
        vset(&mut r.skip, num + 2);
    } else {
        let mut n = num;
        if vget(&r.num_kind) == N_MAP {
            n *= 2;
        }
        if n > 1 << 24 {
            n = 1 << 24;
        }
        {
            let v = vget(&r.remaining) + n as u32;
            vset(&mut r.remaining, v);
        }
    }
}

#[inline(always)]
pub(crate) fn resp_outcome(top: u8) -> u8 {
    if top & TOP_ERR != 0 {
        outcome::ERROR
    } else if top & TOP_NULL != 0 {
        outcome::NULL
    } else {
        outcome::OK
    }
}
