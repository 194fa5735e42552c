//! Volatile accessors for loop state, and the events that go to userspace: losses, slow
//! queries and statement texts.

use super::*;

/// Loop state lives in map memory, read and written with volatile accesses: the verifier then
/// sees no data-dependent registers at the loop head and prunes every path after the first.
#[inline(always)]
pub(crate) fn vget<T: Copy>(p: &T) -> T {
    // SAFETY: a reference is a valid pointer.
    unsafe { core::ptr::read_volatile(p) }
}

#[inline(always)]
pub(crate) fn vset<T: Copy>(p: &mut T, v: T) {
    // SAFETY: a reference is a valid pointer.
    unsafe { core::ptr::write_volatile(p, v) }
}

#[inline(always)]
pub(crate) fn vadd<T: Copy + core::ops::Add<Output = T>>(p: &mut T, n: T) {
    let v = vget(p);
    vset(p, v + n);
}

/// Sends the connection's pending losses; on a full ring they wait for a later read or write.
#[inline(always)]
pub(crate) fn loss_event(c: &mut Conn) {
    let Some(mut e) = DB_EVENTS.reserve::<DbLossEvent>(0) else {
        bump(counters::DROPS);
        return;
    };
    let p = e.as_mut_ptr();
    // SAFETY: reserved ring space of exactly this type; every field is written.
    unsafe {
        (*p).kind = kind::LOSS;
        (*p).system = c.system;
        (*p).role = c.role;
        (*p)._pad = 0;
        (*p).pid = c.pid;
        (*p).sk = c.sk;
        (*p).conn_id = c.conn_id;
        (*p).untimed = c.loss_untimed;
        (*p).desync = c.loss_desync;
        (*p).event_lost = c.loss_event;
        (*p)._pad2 = 0;
        (*p).bytes = c.loss_bytes;
        (*p).dropped_from = c.loss_from;
        (*p).dropped_to = c.loss_to;
    }
    e.submit(wakeup_flags());
    bump(counters::EVENTS);
    c.loss_untimed = 0;
    c.loss_desync = 0;
    c.loss_event = 0;
    c.loss_bytes = 0;
    c.loss_from = 0;
    c.loss_to = 0;
    c.loss_pending = 0;
}

/// A request that took at least the slow threshold; a full ring loses the event (counted),
/// never the count.
#[inline(always)]
pub(crate) fn slow_event(c: &Conn, key: u64, result: u8, start: u64, end: u64) {
    let Some(mut e) = DB_EVENTS.reserve::<DbSlowEvent>(0) else {
        bump(counters::DROPS);
        bump(counters::SLOW_LOST);
        return;
    };
    let p = e.as_mut_ptr();
    // SAFETY: reserved ring space of exactly this type; every field is written.
    unsafe {
        (*p).kind = kind::SLOW;
        (*p).system = c.system;
        (*p).role = c.role;
        (*p).outcome = result;
        (*p).pid = c.pid;
        (*p).sk = c.sk;
        (*p).conn_id = c.conn_id;
        (*p).key = key;
        (*p).start_ns = start;
        (*p).end_ns = end;
    }
    e.submit(wakeup_flags());
    bump(counters::EVENTS);
}

/// The first bytes of a request whose statement key userspace has not named.
#[inline(always)]
pub(crate) fn text_event(c: &Conn, key: u64, buf: u64, at: u32, len: u32) {
    let Some(mut e) = DB_EVENTS.reserve::<DbTextEvent>(0) else {
        bump(counters::DROPS);
        return;
    };
    let p = e.as_mut_ptr();
    let avail = len.saturating_sub(at);
    let mut n = avail;
    if n > DB_PREFIX_LEN as u32 {
        n = DB_PREFIX_LEN as u32;
    }
    // SAFETY: reserved ring space of exactly this type; every field is written.
    unsafe {
        (*p).kind = kind::TEXT;
        (*p).system = c.system;
        (*p).role = c.role;
        (*p)._pad = 0;
        (*p).pid = c.pid;
        (*p).sk = c.sk;
        (*p).conn_id = c.conn_id;
        (*p).key = key;
        (*p).len = avail;
        (*p).prefix_len = 0;
        if n > 0 && read_user((*p).prefix.as_mut_ptr(), n, buf + at as u64) {
            (*p).prefix_len = n;
        }
    }
    e.submit(wakeup_flags());
    bump(counters::EVENTS);
    bump(counters::TEXTS);
}
