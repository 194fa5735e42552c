//! MySQL/MariaDB: command packets and their responses, one packet per step.

use super::*;

#[inline(always)]
pub(crate) fn my_walk(c: &mut Conn, w: &mut Scratch, req: bool) {
    let len = w.len;
    let copied = w.copied;
    if !req {
        if c.my_resp_pending_ns != 0 {
            // The outcome byte of a response whose header came alone.
            let t = c.my_resp_pending_ns;
            c.my_resp_pending_ns = 0;
            let r = if copied > 0 && byte(w, 0) == 0xff {
                outcome::ERROR
            } else {
                outcome::OK
            };
            reply_done(c, w, r, t);
            return;
        }
        if c.phase == MY_HANDSHAKE {
            // Authentication ends with OK (or ERR); switch requests and more data go on.
            if copied >= 5 && (byte(w, 4) == 0x00 || byte(w, 4) == 0xff) {
                c.phase = READY;
            }
            return;
        }
        // The first packet after a command is its response; rows that follow are not walked
        // (the classic protocol has one command in flight).
        if c.head == c.tail && c.swallow == 0 {
            return;
        }
        if len == 4 {
            c.my_resp_pending_ns = w.now;
            return;
        }
        if copied >= 5 {
            let r = if byte(w, 4) == 0xff {
                outcome::ERROR
            } else {
                outcome::OK
            };
            reply_done(c, w, r, 0);
        }
        return;
    }
    let mut at: u32 = 0;
    if c.my_cmd_pending != 0 {
        // The body of a command whose header came alone: the command byte is first.
        let plen = c.my_cmd_pending;
        c.my_cmd_pending = 0;
        my_command(c, w, 0, plen);
        if plen > len as u64 {
            c.req_skip = plen - len as u64;
            return;
        }
        at = plen as u32;
    } else if c.req_skip > 0 {
        if c.req_skip >= len as u64 {
            c.req_skip -= len as u64;
            return;
        }
        at = c.req_skip as u32;
        c.req_skip = 0;
    }
    vset(&mut w.at, at);
    run_steps(c, w, DB_MAX_STEPS, my_step_req);
    if capped(w) {
        step_cap(c, w, true);
    }
}

/// One MySQL packet the client sent, at `w.at`; false when the walk is over.
#[inline(always)]
pub(crate) fn my_step(c: &mut Conn, w: &mut Scratch) -> bool {
    let at = vget(&w.at);
    let len = vget(&w.len);
    if at >= len {
        return false;
    }
    if at + 4 > len {
        desync(c, w, true);
        return false;
    }
    let Some(i) = window(w, at, 4) else {
        desync(c, w, true);
        return false;
    };
    let h = [w.buf[i], w.buf[i + 1], w.buf[i + 2], w.buf[i + 3]];
    let plen = u32::from_le_bytes([h[0], h[1], h[2], 0]) as u64;
    let seq = h[3];
    if c.phase == MY_HANDSHAKE {
        // A 32-byte handshake response is an SSL request: TLS follows.
        if seq == 1 && plen == 32 {
            c.phase = TLS;
            bump(counters::TLS);
            return false;
        }
    } else if seq == 0 {
        if at + 4 == len {
            c.my_cmd_pending = plen;
            vset(&mut w.at, len);
            return false;
        }
        my_command(c, w, at + 4, plen);
    }
    let end = at as u64 + 4 + plen;
    if end > len as u64 {
        c.req_skip = end - len as u64;
        vset(&mut w.at, len);
        return false;
    }
    vset(&mut w.at, end as u32);
    true
}

/// A command packet's body at `at`: starts timing commands that get a response.
#[inline(always)]
pub(crate) fn my_command(c: &mut Conn, w: &mut Scratch, at: u32, plen: u64) {
    if plen == 0 {
        return;
    }
    let Some(i) = window(w, at, 1) else {
        return;
    };
    let cmd = w.buf[i];
    // COM_QUIT, COM_STMT_SEND_LONG_DATA and COM_STMT_CLOSE get no response.
    if cmd == 0x01 || cmd == 0x18 || cmd == 0x19 {
        return;
    }
    note_request(c, w, 0, at);
}
