//! Rate-limit arithmetic, shared by the kernel programs that enforce limits and the agent that
//! configures and checks them: a token bucket (the default) and a sliding-window counter (two
//! fixed windows weighted, as the platform's HTTP middleware counts).
//!
//! Both are updated lazily from a monotonic clock (`bpf_ktime_get_ns` in the kernel) and use
//! integer arithmetic that cannot overflow, whatever the idle time, and whatever timestamp
//! another CPU wrote last: the elapsed time saturates at zero when the clock reading is older
//! than the state's, and is clamped to the refill horizon before it is multiplied. Nothing
//! here divides on the token bucket's path (the horizon is computed once per limit), and
//! nothing needs 128-bit arithmetic, which the BPF target lacks.

/// Nano-tokens per token. A bucket holds `tokens x 10^9`, so a refill over `elapsed` ns at
/// `rate` tokens/s is exactly `elapsed x rate`: no rounding, no division.
pub const NANO: u64 = 1_000_000_000;
/// Largest burst, in tokens: a full bucket holds less than 2^62 nano-tokens.
pub const MAX_BURST: u64 = 1 << 32;
/// Largest rate, in tokens per second (about 10^12: bytes/s of a 8 Tbit/s link).
pub const MAX_RATE: u64 = 1 << 40;
/// Largest cost of one admission, in tokens (a packet's bytes, or 1).
pub const MAX_COST: u64 = 1 << 32;
/// Longest sliding window, in ns (about 13 days).
pub const MAX_WINDOW_NS: u64 = 1 << 50;

/// A rate and a burst, with what the bucket needs precomputed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limit {
    /// Tokens per second (0: only the burst, once).
    pub rate: u64,
    /// Tokens the bucket holds when full.
    pub burst: u64,
    /// Time to refill from empty to full, in ns: more idle time than this adds nothing.
    pub horizon_ns: u64,
}

impl Limit {
    /// `rate` tokens/s with room for `burst`, each clamped to its maximum.
    pub const fn new(rate: u64, burst: u64) -> Self {
        let rate = if rate > MAX_RATE { MAX_RATE } else { rate };
        let burst = if burst > MAX_BURST { MAX_BURST } else { burst };
        let horizon_ns = if rate == 0 {
            0
        } else {
            // Rounded up: the clamp never stops a refill short of full.
            (burst * NANO).div_ceil(rate)
        };
        Self {
            rate,
            burst,
            horizon_ns,
        }
    }

    /// The bucket's capacity in nano-tokens.
    #[inline(always)]
    pub const fn capacity(&self) -> u64 {
        self.burst * NANO
    }
}

/// The two words of a key's state, shared by every CPU: the kernel updates them with BPF
/// atomics (compare-and-exchange), the tests with std's. One budget per key, never a copy per
/// CPU that would multiply the rate.
///
/// Why atomics and not `bpf_spin_lock`: a lock needs the map's value type in BTF, which the
/// loader's legacy map definitions do not carry, and a lock makes every CPU wait on a hot key.
/// Here a refused admission under a flood costs two loads and at most one compare-and-exchange
/// (the refill), and an admission one more.
pub trait Cells {
    fn load(&self, i: usize) -> u64;
    /// Stores `new` in word `i` if it holds `old`; returns whether it did.
    fn cas(&self, i: usize, old: u64, new: u64) -> bool;
}

/// Tries per compare-and-exchange loop. Two CPUs rarely collide twice on one key; after this
/// many lost races the admission is refused (a limiter errs towards refusing).
pub const CAS_TRIES: usize = 4;

/// A token bucket's words: tokens x [`NANO`], and the latest clock reading it was refilled to.
pub const TOKENS: usize = 0;
pub const LAST_NS: usize = 1;

/// Token bucket: refills lazily for the time since the last refill, then takes `cost` tokens if
/// there are that many. A refused admission takes nothing. Zeroed words are a bucket that fills
/// to full on first use (its last refill is at time zero).
///
/// Each interval of time is credited once: a CPU claims `(last, now]` by swapping `now` into
/// [`LAST_NS`], and only the winner adds its tokens. A CPU that read an older clock than the one
/// stored claims nothing (no wrap to an enormous elapsed time); a CPU that loses the race leaves
/// its part of the interval to the next refill, so no time is lost. An admission that could
/// not pass even after the refill writes nothing at all.
#[inline(always)]
pub fn take_bucket<C: Cells>(c: &C, limit: &Limit, now_ns: u64, cost: u64) -> bool {
    let want = if cost > MAX_COST { MAX_COST } else { cost } * NANO;
    let last = c.load(LAST_NS);
    let elapsed = now_ns.saturating_sub(last);
    let elapsed = if elapsed > limit.horizon_ns {
        limit.horizon_ns
    } else {
        elapsed
    };
    // elapsed x rate <= horizon x rate < capacity + rate < 2^63: no overflow.
    let earned = elapsed * limit.rate;
    // Not enough even with the refill: refused without a write. The interval stays
    // unclaimed and is credited whole by a later refill, and a flood that is refused costs
    // only loads, not a cache line bounced between CPUs per packet.
    if c.load(TOKENS).saturating_add(earned) < want {
        return false;
    }
    if earned > 0 && c.cas(LAST_NS, last, now_ns) {
        let cap = limit.capacity();
        let mut i = 0;
        while i < CAS_TRIES {
            let have = c.load(TOKENS);
            let total = have.saturating_add(earned);
            let total = if total > cap { cap } else { total };
            if total == have || c.cas(TOKENS, have, total) {
                break;
            }
            i += 1;
        }
    }
    let mut i = 0;
    while i < CAS_TRIES {
        let have = c.load(TOKENS);
        if have < want {
            return false;
        }
        if c.cas(TOKENS, have, have - want) {
            return true;
        }
        i += 1;
    }
    false
}

/// Gives back `cost` tokens taken by [`take_bucket`] (a lower level of the hierarchy refused the
/// admission), up to the capacity.
#[inline(always)]
pub fn refund_bucket<C: Cells>(c: &C, limit: &Limit, cost: u64) {
    let back = if cost > MAX_COST { MAX_COST } else { cost } * NANO;
    let cap = limit.capacity();
    let mut i = 0;
    while i < CAS_TRIES {
        let have = c.load(TOKENS);
        let total = have.saturating_add(back);
        let total = if total > cap { cap } else { total };
        if total == have || c.cas(TOKENS, have, total) {
            return;
        }
        i += 1;
    }
}

/// Weights of the previous window, in 1/1024ths.
const WEIGHT_ONE: u64 = 1024;
/// A sliding window's word: the fixed window's number (low 24 bits) above its count (40 bits),
/// so that one compare-and-exchange moves to a new window and counts in it.
const COUNT_BITS: u32 = 40;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;
const EPOCH_MASK: u64 = (1 << (64 - COUNT_BITS)) - 1;
/// Largest limit per window a sliding window counts to.
pub const MAX_WINDOW_COUNT: u64 = COUNT_MASK;

#[inline(always)]
fn window_count(word: u64, epoch: u64) -> u64 {
    if word >> COUNT_BITS == epoch & EPOCH_MASK {
        word & COUNT_MASK
    } else {
        0
    }
}

/// Sliding-window counter: admits `cost` if the count of the current fixed window plus the
/// previous one's, weighted by how much of it the sliding window of `window_ns` still covers,
/// stays within `limit`. Words 0 and 1 hold the even and the odd fixed windows. A refused
/// admission counts nothing.
#[inline(always)]
pub fn take_window<C: Cells>(c: &C, limit: u64, window_ns: u64, now_ns: u64, cost: u64) -> bool {
    if window_ns == 0 {
        return false;
    }
    let window_ns = if window_ns > MAX_WINDOW_NS {
        MAX_WINDOW_NS
    } else {
        window_ns
    };
    let limit = if limit > MAX_WINDOW_COUNT {
        MAX_WINDOW_COUNT
    } else {
        limit
    };
    let cost = if cost > MAX_COST { MAX_COST } else { cost };
    let epoch = now_ns / window_ns;
    let into = now_ns - epoch * window_ns;
    let previous = if epoch == 0 {
        0
    } else {
        window_count(c.load(((epoch - 1) & 1) as usize), epoch - 1)
    };
    // The previous window's share, (window - into) / window, rounded up with the estimate: a
    // limiter errs towards refusing.
    let weight = ((window_ns - into) * WEIGHT_ONE).div_ceil(window_ns);
    let weighted = (previous * weight).div_ceil(WEIGHT_ONE);
    let slot = (epoch & 1) as usize;
    let mut i = 0;
    while i < CAS_TRIES {
        let word = c.load(slot);
        // Another CPU already counts in the next window of this slot: this reading is older
        // than its clock, and the slot is no longer ours to reset.
        if (word >> COUNT_BITS).wrapping_sub(epoch) & EPOCH_MASK == 2 {
            return false;
        }
        let current = window_count(word, epoch);
        if weighted + current + cost > limit {
            return false;
        }
        let new = ((epoch & EPOCH_MASK) << COUNT_BITS) | (current + cost);
        if c.cas(slot, word, new) {
            return true;
        }
        i += 1;
    }
    false
}

/// Gives back `cost` counted by [`take_window`] in the window of `now_ns`.
#[inline(always)]
pub fn refund_window<C: Cells>(c: &C, window_ns: u64, now_ns: u64, cost: u64) {
    if window_ns == 0 || window_ns > MAX_WINDOW_NS {
        return;
    }
    let cost = if cost > MAX_COST { MAX_COST } else { cost };
    let epoch = now_ns / window_ns;
    let slot = (epoch & 1) as usize;
    let mut i = 0;
    while i < CAS_TRIES {
        let word = c.load(slot);
        let current = window_count(word, epoch);
        if current == 0 {
            return;
        }
        let back = if cost > current { current } else { cost };
        let new = ((epoch & EPOCH_MASK) << COUNT_BITS) | (current - back);
        if c.cas(slot, word, new) {
            return;
        }
        i += 1;
    }
}

/// Rules the maps have room for: the slot of a rule indexes its counters and aggregate state.
pub const MAX_RULES: u32 = 256;
/// Rules one destination port (or one service and port) may carry, tried in order.
pub const RULES_PER_PORT: usize = 8;
/// Named CIDR classes (bits of [`ClassBits`]); bit 63 marks the allowlist.
pub const MAX_CLASSES: u32 = 63;
/// The allowlist's bit in a prefix's class bits.
pub const ALLOW_BIT: u64 = 1 << 63;
/// Cgroup levels an egress hook looks up, from the root down to the caller's own cgroup.
pub const MAX_CGROUP_LEVELS: i32 = 12;

/// What a rule counts.
pub mod unit {
    pub const PACKETS: u32 = 0;
    pub const BYTES: u32 = 1;
    /// TCP SYNs in, connect() out.
    pub const CONNECTIONS: u32 = 2;
}

/// [`RuleConfig::flags`].
pub mod flag {
    /// Low bits: the [`super::unit`].
    pub const UNIT_MASK: u32 = 0x3;
    pub const SLIDING_WINDOW: u32 = 1 << 2;
    /// A packet from a new source that the new-source budget refuses is dropped (else passed).
    pub const FAIL_CLOSED: u32 = 1 << 3;
    pub const PER_SOURCE: u32 = 1 << 4;
    pub const AGGREGATE: u32 = 1 << 5;
    /// Egress: refuse with ECONNREFUSED rather than EPERM.
    pub const REFUSE: u32 = 1 << 6;
}

/// IP protocol numbers a rule matches.
pub mod proto {
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
}

/// One rule, as the programs read it per packet (`RL_RULES`, indexed by its slot). Rates here
/// are the effective ones: load adaptation rewrites them, and no bucket is reset by it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleConfig {
    pub per_source: Limit,
    pub aggregate: Limit,
    /// Sliding windows: the window's length (limits are then tokens per window).
    pub window_ns: u64,
    /// The source classes the rule applies to (any of them); zero: every source.
    pub classes: u64,
    pub flags: u32,
    /// Generation of the slot: per-source state keyed with an older generation is stale.
    pub generation: u32,
}

/// Where ingress rules are found (`RL_PORTS`): destination port and IP protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortKey {
    /// Host byte order; 0 holds the rules for every port.
    pub port: u16,
    pub proto: u8,
    pub reserved: u8,
}

/// Where egress rules are found (`RL_EGRESS`): the service's cgroup id, port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EgressKey {
    pub cgroup: u64,
    pub port: u16,
    pub proto: u8,
    pub reserved: [u8; 5],
}

/// The rules on one port, tried in order: slot + 1 each, 0 ends the list.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleSet {
    pub slots: [u16; RULES_PER_PORT],
}

/// An IPv6 address, or an IPv4 one mapped into it (`::ffff:a.b.c.d`), in network order.
pub type Addr = [u8; 16];

/// A prefix's class bits in `RL_CLASSES` (an LPM trie over [`Addr`]): every class whose CIDRs
/// cover it, and [`ALLOW_BIT`] if the allowlist does.
pub type ClassBits = u64;

/// Per-source state (`RL_SOURCES`, an LRU hash): for ingress the packet's source address, for
/// egress the destination the service connects to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourceKey {
    pub addr: Addr,
    pub slot: u32,
    pub generation: u32,
}

/// A key's limiter words ([`take_bucket`] or [`take_window`]) and what it let through.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceState {
    pub words: [u64; 2],
    pub passed: u64,
    pub dropped: u64,
}

/// A rule's name by its slot (`RL_NAMES`), for the agent to adopt pinned state after a
/// restart; the programs never read it. NUL-padded.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleName {
    pub bytes: [u8; 64],
}

impl Default for RuleName {
    fn default() -> Self {
        Self { bytes: [0; 64] }
    }
}

/// Settings every rule shares (`RL_SETTINGS[0]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// New per-source entries a second, across all rules: spoofed floods cannot churn the LRU
    /// faster than this.
    pub new_sources: Limit,
    /// Entries in the class trie (allowlist and classes): with none, the programs skip the
    /// trie lookup, the dearest step of a packet on a rule's port.
    pub prefixes: u64,
}

/// What a rule counted (`RL_COUNTERS`, per CPU, indexed by slot; slot [`MAX_RULES`] holds
/// the [`global`] counters): one lookup reads a rule's all.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub n: [u64; 8],
}

/// Indices into a rule's [`Counters`].
pub mod rule {
    pub const PASSED_SOURCE: usize = 0;
    pub const PASSED_AGGREGATE: usize = 1;
    pub const DROPPED_SOURCE: usize = 2;
    pub const DROPPED_AGGREGATE: usize = 3;
    /// New sources the budget refused, dropped (fail-closed)...
    pub const DROPPED_NEW_SOURCE: usize = 4;
    /// ...or passed unlimited (fail-open).
    pub const PASSED_NEW_SOURCE: usize = 5;
    pub const PASSED_BYTES: usize = 6;
    pub const DROPPED_BYTES: usize = 7;
}

/// Indices into the global [`Counters`] (slot [`MAX_RULES`]).
pub mod global {
    /// Packets (or connects) a rule's port matched but the allowlist let through.
    pub const ALLOWED: usize = 0;
    pub const SOURCES_CREATED: usize = 1;
    /// New per-source entries the new-source budget refused.
    pub const SOURCES_REFUSED: usize = 2;
    /// Packets whose headers the parser gave up on (passed).
    pub const UNPARSED: usize = 3;
}

/// `a.b.c.d` as an [`Addr`].
#[inline(always)]
pub const fn v4_mapped(v4: [u8; 4]) -> Addr {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}

const _: () = assert!(core::mem::size_of::<Limit>() == 3 * 8);
const _: () = assert!(core::mem::size_of::<RuleConfig>() == 72);
const _: () = assert!(core::mem::size_of::<PortKey>() == 4);
const _: () = assert!(core::mem::size_of::<EgressKey>() == 16);
const _: () = assert!(core::mem::size_of::<RuleSet>() == 16);
const _: () = assert!(core::mem::size_of::<SourceKey>() == 24);
const _: () = assert!(core::mem::size_of::<SourceState>() == 32);
const _: () = assert!(core::mem::size_of::<Settings>() == 32);
const _: () = assert!(core::mem::size_of::<RuleName>() == 64);
const _: () = assert!(core::mem::size_of::<Counters>() == 64);
const _: () = assert!(MAX_RULES <= u16::MAX as u32);
// The bounds keep every product in range.
const _: () = assert!(MAX_BURST * NANO < 1 << 62);
const _: () = assert!(MAX_COST * NANO < 1 << 62);
const _: () = assert!(MAX_WINDOW_COUNT * WEIGHT_ONE < 1 << 62);
const _: () = assert!(MAX_WINDOW_NS * WEIGHT_ONE < 1 << 62);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] integers without padding (sizes checked above).
    unsafe impl aya::Pod for super::RuleConfig {}
    unsafe impl aya::Pod for super::PortKey {}
    unsafe impl aya::Pod for super::EgressKey {}
    unsafe impl aya::Pod for super::RuleSet {}
    unsafe impl aya::Pod for super::SourceKey {}
    unsafe impl aya::Pod for super::SourceState {}
    unsafe impl aya::Pod for super::Settings {}
    unsafe impl aya::Pod for super::RuleName {}
    unsafe impl aya::Pod for super::Counters {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use core::cell::Cell;
    use std::sync::atomic::{AtomicU64, Ordering};

    const SEC: u64 = NANO;

    /// One CPU's view: plain cells.
    #[derive(Default)]
    struct Plain([Cell<u64>; 2]);

    impl Cells for Plain {
        fn load(&self, i: usize) -> u64 {
            self.0[i].get()
        }
        fn cas(&self, i: usize, old: u64, new: u64) -> bool {
            if self.0[i].get() == old {
                self.0[i].set(new);
                true
            } else {
                false
            }
        }
    }

    impl Plain {
        fn bucket(tokens: u64, last: u64) -> Self {
            Self([Cell::new(tokens), Cell::new(last)])
        }
    }

    /// Shared between threads, as map values are between CPUs.
    #[derive(Default)]
    struct Shared([AtomicU64; 2]);

    impl Cells for Shared {
        fn load(&self, i: usize) -> u64 {
            self.0[i].load(Ordering::Relaxed)
        }
        fn cas(&self, i: usize, old: u64, new: u64) -> bool {
            self.0[i]
                .compare_exchange(old, new, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        }
    }

    /// Arrivals every `gap_ns` for `secs` seconds on a fresh bucket; returns how many passed.
    fn admitted_bucket(limit: &Limit, gap_ns: u64, secs: u64, cost: u64) -> u64 {
        let start = 5 * SEC;
        let b = Plain::default();
        let mut passed = 0;
        let mut t = start;
        while t < start + secs * SEC {
            if take_bucket(&b, limit, t, cost) {
                passed += 1;
            }
            t += gap_ns;
        }
        passed
    }

    #[test]
    fn a_flood_is_admitted_at_the_rate_plus_the_burst() {
        let limit = Limit::new(1000, 100);
        // 10x and 100x the rate, for 10 s: rate x 10 + burst admitted, within 0.1%.
        for factor in [10, 100] {
            let gap = SEC / (1000 * factor);
            let passed = admitted_bucket(&limit, gap, 10, 1);
            let want = 1000 * 10 + 100;
            assert!(
                passed.abs_diff(want) * 1000 <= want,
                "{factor}x: {passed} of {want}"
            );
        }
        // Under the rate, everything passes.
        assert_eq!(admitted_bucket(&limit, SEC / 500, 10, 1), 5000);
    }

    #[test]
    fn two_threads_share_one_budget() {
        // Two threads race on one bucket: together they get the rate once, not once each.
        let limit = Limit::new(1000, 10);
        let b = Shared::default();
        let start = 5 * SEC;
        // One clock both read, as CPUs read one monotonic clock.
        let clock = AtomicU64::new(start);
        let passed: u64 = std::thread::scope(|s| {
            let hs: std::vec::Vec<_> = (0..2u64)
                .map(|k| {
                    let (b, limit) = (&b, &limit);
                    let clock = &clock;
                    s.spawn(move || {
                        let mut n = 0u64;
                        loop {
                            let t = clock.fetch_add(10_000 + k, Ordering::Relaxed);
                            if t >= start + 10 * SEC {
                                return n;
                            }
                            if take_bucket(b, limit, t, 1) {
                                n += 1;
                            }
                        }
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap_or(0)).sum()
        });
        let want = 1000 * 10 + 10;
        assert!(passed.abs_diff(want) * 100 <= want, "{passed} of {want}");
    }

    #[test]
    fn bytes_cost_their_size() {
        // 1 MB/s, 64 KiB burst, 1500-byte packets at 10x: about 1 MB/s of packets pass.
        let limit = Limit::new(1_000_000, 65_536);
        let gap = SEC * 1500 / 10_000_000;
        let passed = admitted_bucket(&limit, gap, 10, 1500);
        let want = (10_000_000 + 65_536) / 1500;
        assert!(passed.abs_diff(want) * 100 <= want, "{passed} of {want}");
        // A packet larger than the burst never passes.
        let b = Plain::default();
        assert!(!take_bucket(&b, &limit, SEC, 70_000));
    }

    #[test]
    fn long_idle_refills_to_full_and_no_further_without_overflow() {
        for limit in [
            Limit::new(1, 1),
            Limit::new(MAX_RATE, MAX_BURST),
            Limit::new(u64::MAX, u64::MAX),
            Limit::new(7, MAX_BURST),
        ] {
            let b = Plain::bucket(0, 0);
            assert!(take_bucket(&b, &limit, u64::MAX, 0));
            assert_eq!(b.load(TOKENS), limit.capacity(), "{limit:?}");
            assert_eq!(b.load(LAST_NS), u64::MAX);
        }
    }

    #[test]
    fn an_older_clock_reading_refills_nothing_and_keeps_the_later_time() {
        let limit = Limit::new(1000, 10);
        // Another CPU stored 10 s; this one read 9 s before it could write.
        let b = Plain::bucket(0, 10 * SEC);
        assert!(!take_bucket(&b, &limit, 9 * SEC, 1));
        assert_eq!(b.load(TOKENS), 0);
        assert_eq!(b.load(LAST_NS), 10 * SEC);
        // A millisecond after the later time, one token.
        assert!(take_bucket(&b, &limit, 10 * SEC + SEC / 1000, 1));
        assert!(!take_bucket(&b, &limit, 10 * SEC + SEC / 1000, 1));
    }

    #[test]
    fn a_zero_rate_allows_the_burst_once() {
        let limit = Limit::new(0, 3);
        let b = Plain::bucket(limit.capacity(), 0);
        let passed = (0..100)
            .filter(|i| take_bucket(&b, &limit, i * SEC, 1))
            .count();
        assert_eq!(passed, 3);
    }

    #[test]
    fn a_refused_admission_takes_nothing_and_a_refund_gives_back() {
        let limit = Limit::new(10, 5);
        let b = Plain::default();
        assert!(!take_bucket(&b, &limit, SEC, 6));
        // Refused even after a refill: nothing written, the time stays unclaimed.
        assert_eq!((b.load(TOKENS), b.load(LAST_NS)), (0, 0));
        assert!(take_bucket(&b, &limit, SEC, 5));
        refund_bucket(&b, &limit, 3);
        assert_eq!(b.load(TOKENS), 3 * NANO);
        refund_bucket(&b, &limit, 30);
        assert_eq!(b.load(TOKENS), limit.capacity());
    }

    #[test]
    fn the_horizon_never_stops_a_refill_short() {
        // A rate that does not divide the capacity: the rounded-up horizon still fills it.
        let limit = Limit::new(3, 1);
        let b = Plain::bucket(0, 1);
        assert!(take_bucket(&b, &limit, 1 + limit.horizon_ns, 0));
        assert_eq!(b.load(TOKENS), limit.capacity());
    }

    fn admitted_window(limit: u64, gap: u64, secs: u64) -> u64 {
        let w = Plain::default();
        let mut passed = 0u64;
        let mut t = 100 * SEC;
        while t < (100 + secs) * SEC {
            if take_window(&w, limit, SEC, t, 1) {
                passed += 1;
            }
            t += gap;
        }
        passed
    }

    #[test]
    fn the_sliding_window_admits_the_limit_per_window() {
        // 1000 per second, a flood at 10x and 100x for 10 s: within 5% of 10,000 (the first
        // window has no previous one and admits its full 1000 at once).
        for factor in [10u64, 100] {
            let passed = admitted_window(1000, SEC / (1000 * factor), 10);
            assert!(
                passed.abs_diff(10_000) * 20 <= 10_000,
                "{factor}x: {passed}"
            );
        }
        // Under the limit, everything passes.
        assert_eq!(admitted_window(1000, SEC / 500, 10), 5000);
    }

    #[test]
    fn the_sliding_window_weighs_the_previous_window() {
        let w = Plain::default();
        let t0 = 40 * SEC;
        // A full window just before the boundary...
        for _ in 0..100 {
            assert!(take_window(&w, 100, SEC, t0 + SEC - 1, 1));
        }
        assert!(!take_window(&w, 100, SEC, t0 + SEC - 1, 1));
        // ...still counts almost fully just after it, and half at its middle.
        assert!(!take_window(&w, 100, SEC, t0 + SEC + 1000, 1));
        let mid = t0 + SEC + SEC / 2;
        let passed = (0..100)
            .filter(|_| take_window(&w, 100, SEC, mid, 1))
            .count();
        assert!((49..=51).contains(&passed), "{passed}");
        // A refund gives back in the current window.
        refund_window(&w, SEC, mid, 1);
        assert!(take_window(&w, 100, SEC, mid, 1));
        // After two idle windows nothing is remembered.
        let later = t0 + 10 * SEC;
        let passed = (0..200)
            .filter(|_| take_window(&w, 100, SEC, later, 1))
            .count();
        assert_eq!(passed, 100);
    }

    #[test]
    fn the_sliding_window_survives_extreme_clock_readings() {
        let w = Plain::default();
        assert!(take_window(&w, 10, SEC, u64::MAX, 1));
        assert!(!take_window(&w, 10, 0, 5, 1));
        let w = Plain::default();
        assert!(take_window(&w, 10, u64::MAX, u64::MAX / 2, 1));
        assert!(take_window(&w, u64::MAX, 1, 0, MAX_COST + 1));
        // An older reading than the stored window's: another window, counted apart.
        let w = Plain::default();
        assert!(take_window(&w, 1, SEC, 10 * SEC, 1));
        assert!(!take_window(&w, 1, SEC, 10 * SEC, 1));
        // A CPU whose reading is a window behind one already counting in its slot refuses
        // rather than reset the later window.
        assert!(!take_window(&w, 5, SEC, 8 * SEC, 1));
        assert!(!take_window(&w, 1, SEC, 10 * SEC, 1));
    }

    #[test]
    fn two_threads_share_one_window() {
        let w = Shared::default();
        let clock = AtomicU64::new(100 * SEC);
        let passed: u64 = std::thread::scope(|s| {
            let hs: std::vec::Vec<_> = (0..2u64)
                .map(|k| {
                    let (w, clock) = (&w, &clock);
                    s.spawn(move || {
                        let mut n = 0u64;
                        loop {
                            let t = clock.fetch_add(25_000 + k, Ordering::Relaxed);
                            if t >= 110 * SEC {
                                return n;
                            }
                            if take_window(w, 1000, SEC, t, 1) {
                                n += 1;
                            }
                        }
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap_or(0)).sum()
        });
        assert!(passed.abs_diff(10_000) * 20 <= 10_000, "{passed}");
    }

    #[test]
    fn mapped_v4_addresses() {
        assert_eq!(v4_mapped([10, 0, 0, 1])[10..], [0xff, 0xff, 10, 0, 0, 1]);
    }
}
