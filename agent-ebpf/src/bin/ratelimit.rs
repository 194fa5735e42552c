//! Rate-limit enforcement: an XDP program on ingress (per destination port and protocol, per
//! source address and CIDR class) and a cgroup connect hook on egress (per service and
//! destination port). The arithmetic is `agent_common::ratelimit`'s, on words every CPU shares
//! through compare-and-exchange.
//!
//! Rules, classes and the allowlist are maps read per packet (`RL_RULES`, `RL_PORTS`,
//! `RL_EGRESS`, `RL_CLASSES`), apart from the limiter state (`RL_SOURCES`, `RL_AGGREGATES`):
//! userspace changes a limit by rewriting a rule, which resets no bucket and reloads nothing.
//! Every map is pinned by name under the agent's pin directory, so enforcement and its state
//! outlive the agent's process.
//!
//! A packet costs a header parse and one hash lookup when its port has no rule. On a rule's
//! port it costs an LPM lookup (classes and allowlist), the source's LRU entry and, with an
//! aggregate, the rule's shared bucket. A flood that is refused touches its state with loads
//! and at most one compare-and-exchange per packet.
#![no_std]
#![no_main]

agent_ebpf::license!();

use agent_common::ratelimit::{
    flag, global, proto, refund_bucket, refund_window, rule, take_bucket, take_window, unit,
    v4_mapped, Addr, Cells, ClassBits, Counters, EgressKey, Limit, PortKey, RuleConfig, RuleName,
    RuleSet, Settings, SourceKey, SourceState, ALLOW_BIT, MAX_CGROUP_LEVELS, MAX_RULES,
    RULES_PER_PORT,
};
use agent_ebpf::util::{atomic_add, atomic_cas, now_ns};
use aya_ebpf::{
    bindings::{xdp_action, BPF_F_NO_PREALLOC, BPF_NOEXIST},
    helpers::generated::{bpf_get_current_ancestor_cgroup_id, bpf_set_retval},
    macros::{cgroup_sock_addr, classifier, map, xdp},
    maps::{
        lpm_trie::{Key as LpmKey, LpmTrie},
        Array, HashMap, LruHashMap, PerCpuArray,
    },
    programs::{SockAddrContext, TcContext, XdpContext},
};

#[map]
static RL_SETTINGS: Array<Settings> = Array::pinned(1, 0);
#[map]
static RL_RULES: Array<RuleConfig> = Array::pinned(MAX_RULES, 0);
/// Rule names by slot: read only by the agent, to adopt this state after a restart.
#[map]
static RL_NAMES: Array<RuleName> = Array::pinned(MAX_RULES, 0);
#[map]
static RL_PORTS: HashMap<PortKey, RuleSet> = HashMap::pinned(8192, 0);
#[map]
static RL_EGRESS: HashMap<EgressKey, RuleSet> = HashMap::pinned(8192, 0);
#[map]
static RL_CLASSES: LpmTrie<Addr, ClassBits> = LpmTrie::pinned(262_144, BPF_F_NO_PREALLOC);
/// Sized by userspace at load (`ratelimit.max_sources`).
#[map]
static RL_SOURCES: LruHashMap<SourceKey, SourceState> = LruHashMap::pinned(65_536, 0);
#[map]
static RL_AGGREGATES: Array<SourceState> = Array::pinned(MAX_RULES, 0);
/// The new-source budget's bucket.
#[map]
static RL_BUDGET: Array<SourceState> = Array::pinned(1, 0);
#[map]
static RL_COUNTERS: PerCpuArray<Counters> = PerCpuArray::pinned(MAX_RULES + 1, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const ECONNREFUSED: i32 = 111;

/// A map value's limiter words, shared by every CPU.
struct Words(*mut u64);

impl Cells for Words {
    #[inline(always)]
    fn load(&self, i: usize) -> u64 {
        // SAFETY: `i` is 0 or 1, inside the value's two words; an aligned 8-byte load is atomic.
        unsafe { core::ptr::read_volatile(self.0.add(i)) }
    }
    #[inline(always)]
    fn cas(&self, i: usize, old: u64, new: u64) -> bool {
        // SAFETY: as above.
        unsafe { atomic_cas(self.0.add(i), old, new) }
    }
}

#[inline(always)]
fn words(state: *mut SourceState) -> Words {
    // SAFETY: a map value's address; `words` is its first field.
    Words(unsafe { core::ptr::addr_of_mut!((*state).words) }.cast())
}

/// Counts one under global counter `i` (slot `MAX_RULES`).
#[inline(always)]
fn add_global(i: usize) {
    RuleCounters::of(MAX_RULES).one(i);
}

/// A rule's counters on this CPU, looked up once per admission.
struct RuleCounters(*mut Counters);

impl RuleCounters {
    #[inline(always)]
    fn of(slot: u32) -> Self {
        Self(
            RL_COUNTERS
                .get_ptr_mut(slot)
                .unwrap_or(core::ptr::null_mut()),
        )
    }

    #[inline(always)]
    fn add(&self, i: usize, v: u64) {
        if !self.0.is_null() && i < 8 {
            // SAFETY: per-CPU slot; programs do not preempt each other on one CPU.
            unsafe { (*self.0).n[i] += v };
        }
    }

    #[inline(always)]
    fn one(&self, i: usize) {
        self.add(i, 1);
    }

    /// Counts one admission under `count` and its bytes under `bytes_at`.
    #[inline(always)]
    fn count(&self, count: usize, bytes_at: usize, bytes: u64) {
        self.one(count);
        self.add(bytes_at, bytes);
    }
}

#[inline(always)]
fn take(state: *mut SourceState, limit: &Limit, r: &RuleConfig, now: u64, cost: u64) -> bool {
    let w = words(state);
    if r.flags & flag::SLIDING_WINDOW != 0 {
        // A sliding window's limit per window is held as the burst.
        take_window(&w, limit.burst, r.window_ns, now, cost)
    } else {
        take_bucket(&w, limit, now, cost)
    }
}

#[inline(always)]
fn refund(state: *mut SourceState, limit: &Limit, r: &RuleConfig, now: u64, cost: u64) {
    let w = words(state);
    if r.flags & flag::SLIDING_WINDOW != 0 {
        refund_window(&w, r.window_ns, now, cost);
    } else {
        refund_bucket(&w, limit, cost);
    }
}

/// The source's state under rule `slot`, created (zeroed: a full bucket, an empty window) if
/// the new-source budget allows; `None` if it refused or the map could not take it.
#[inline(always)]
fn source_state(key: &SourceKey, now: u64) -> Option<*mut SourceState> {
    if let Some(s) = RL_SOURCES.get_ptr_mut(key) {
        return Some(s);
    }
    let settings = RL_SETTINGS.get(0)?;
    let budget = RL_BUDGET.get_ptr_mut(0)?;
    if !take_bucket(&words(budget), &settings.new_sources, now, 1) {
        add_global(global::SOURCES_REFUSED);
        return None;
    }
    // Another CPU may have created it meanwhile: NOEXIST fails then, and the lookup finds it.
    if RL_SOURCES
        .insert(key, SourceState::default(), BPF_NOEXIST as u64)
        .is_ok()
    {
        add_global(global::SOURCES_CREATED);
    }
    RL_SOURCES.get_ptr_mut(key)
}

/// Runs an admission of `cost` through the rule's levels; `bytes` is what the counters add.
/// Returns whether it passes.
#[inline(always)]
fn admit(slot: u32, r: &RuleConfig, addr: &Addr, cost: u64, bytes: u64) -> bool {
    let now = now_ns();
    let counters = RuleCounters::of(slot);
    let mut source: *mut SourceState = core::ptr::null_mut();
    if r.flags & flag::PER_SOURCE != 0 {
        let key = SourceKey {
            addr: *addr,
            slot,
            generation: r.generation,
        };
        match source_state(&key, now) {
            Some(s) => source = s,
            None => {
                if r.flags & flag::FAIL_CLOSED != 0 {
                    counters.count(rule::DROPPED_NEW_SOURCE, rule::DROPPED_BYTES, bytes);
                    return false;
                }
                counters.count(rule::PASSED_NEW_SOURCE, rule::PASSED_BYTES, bytes);
                return true;
            }
        }
        if !take(source, &r.per_source, r, now, cost) {
            // SAFETY: a map value.
            unsafe { atomic_add(core::ptr::addr_of_mut!((*source).dropped), 1) };
            counters.count(rule::DROPPED_SOURCE, rule::DROPPED_BYTES, bytes);
            return false;
        }
    }
    if r.flags & flag::AGGREGATE != 0 {
        if let Some(agg) = RL_AGGREGATES.get_ptr_mut(slot) {
            if !take(agg, &r.aggregate, r, now, cost) {
                if !source.is_null() {
                    // The source keeps what the aggregate refused: a source is not charged
                    // for traffic that did not pass.
                    refund(source, &r.per_source, r, now, cost);
                    // SAFETY: a map value.
                    unsafe { atomic_add(core::ptr::addr_of_mut!((*source).dropped), 1) };
                    counters.one(rule::PASSED_SOURCE);
                }
                counters.count(rule::DROPPED_AGGREGATE, rule::DROPPED_BYTES, bytes);
                return false;
            }
            counters.one(rule::PASSED_AGGREGATE);
        }
    }
    if !source.is_null() {
        // SAFETY: a map value.
        unsafe { atomic_add(core::ptr::addr_of_mut!((*source).passed), 1) };
        counters.count(rule::PASSED_SOURCE, rule::PASSED_BYTES, bytes);
    } else {
        counters.add(rule::PASSED_BYTES, bytes);
    }
    true
}

/// What a packet or connect is, for matching.
struct Packet {
    addr: Addr,
    bytes: u64,
    /// A TCP SYN without ACK (a new connection), or a connect().
    opens: bool,
}

/// Judges `p` by the first rule of `set` whose classes hold its source. Returns whether it
/// passes.
#[inline(always)]
fn judge(set: &RuleSet, p: &Packet) -> bool {
    let classes = RL_SETTINGS.get(0).is_some_and(|s| s.prefixes != 0);
    let bits = if classes {
        match RL_CLASSES.get(LpmKey::new(128, p.addr)) {
            Some(b) => *b,
            None => 0,
        }
    } else {
        0
    };
    if bits & ALLOW_BIT != 0 {
        add_global(global::ALLOWED);
        return true;
    }
    let mut i = 0;
    while i < RULES_PER_PORT {
        let n = set.slots[i] as u32;
        if n == 0 || n > MAX_RULES {
            break;
        }
        let slot = n - 1;
        i += 1;
        let Some(r) = RL_RULES.get(slot) else {
            break;
        };
        if r.classes != 0 && r.classes & bits == 0 {
            continue;
        }
        let cost = match r.flags & flag::UNIT_MASK {
            unit::BYTES => p.bytes,
            unit::CONNECTIONS => {
                if !p.opens {
                    continue;
                }
                1
            }
            _ => 1,
        };
        return admit(slot, r, &p.addr, cost, p.bytes);
    }
    true
}

/// A copy of the rules under `key` (userspace may rewrite the entry meanwhile).
#[inline(always)]
fn rule_set<K>(map: &HashMap<K, RuleSet>, key: &K) -> Option<RuleSet> {
    // SAFETY: a map value, copied at once.
    map.get_ptr(key).map(|p| unsafe { *p })
}

/// A frame from its Ethernet header on, as XDP and TC (whose ingress programs see the MAC
/// header too) hand it over.
trait Frame {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// The frame's length, the cost of a `bytes` rule.
    fn bytes(&self) -> u64;
}

impl Frame for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }
    #[inline(always)]
    fn bytes(&self) -> u64 {
        (XdpContext::data_end(self) - XdpContext::data(self)) as u64
    }
}

impl Frame for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }
    #[inline(always)]
    fn bytes(&self) -> u64 {
        // The whole frame, paged parts included (the linear part may hold only headers).
        u64::from(self.len())
    }
}

#[inline(always)]
fn at<T, F: Frame>(ctx: &F, off: usize) -> Option<*const T> {
    let start = ctx.data();
    if start + off + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + off) as *const T)
}

#[inline(always)]
fn byte<F: Frame>(ctx: &F, off: usize) -> Option<u8> {
    // SAFETY: bounds checked by `at`.
    at::<u8, F>(ctx, off).map(|p| unsafe { *p })
}

#[inline(always)]
fn be16<F: Frame>(ctx: &F, off: usize) -> Option<u16> {
    let p = at::<[u8; 2], F>(ctx, off)?;
    // SAFETY: bounds checked by `at`.
    Some(u16::from_be_bytes(unsafe { *p }))
}

#[xdp]
pub fn insite_ratelimit(ctx: XdpContext) -> u32 {
    match ingress(&ctx) {
        Some(false) => xdp_action::XDP_DROP,
        Some(true) => xdp_action::XDP_PASS,
        None => {
            add_global(global::UNPARSED);
            xdp_action::XDP_PASS
        }
    }
}

/// The same rules at TC ingress (clsact, or TCX links on 6.6+), where XDP cannot attach or
/// costs more (generic XDP on virtual links).
#[classifier]
pub fn insite_ratelimit_tc(ctx: TcContext) -> i32 {
    const TC_ACT_OK: i32 = 0;
    const TC_ACT_SHOT: i32 = 2;
    match ingress(&ctx) {
        Some(false) => TC_ACT_SHOT,
        Some(true) => TC_ACT_OK,
        None => {
            add_global(global::UNPARSED);
            TC_ACT_OK
        }
    }
}

/// `None`: the headers did not parse (passed and counted).
#[inline(always)]
fn ingress<F: Frame>(ctx: &F) -> Option<bool> {
    let mut l3 = ETH_HLEN;
    let mut ethertype = be16(ctx, 12)?;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype = be16(ctx, 16)?;
        l3 += 4;
    }
    let (protocol, addr, l4) = match ethertype {
        ETH_P_IP => {
            let vihl = byte(ctx, l3)?;
            let ihl = ((vihl & 0x0f) as usize) << 2;
            if ihl < 20 {
                return None;
            }
            // A later fragment carries no ports: it passes, as its first fragment did or not.
            if be16(ctx, l3 + 6)? & 0x1fff != 0 {
                return Some(true);
            }
            let protocol = byte(ctx, l3 + 9)?;
            let src = at::<[u8; 4], F>(ctx, l3 + 12)?;
            // SAFETY: bounds checked by `at`.
            (protocol, v4_mapped(unsafe { *src }), l3 + ihl)
        }
        ETH_P_IPV6 => {
            let protocol = byte(ctx, l3 + 6)?;
            let src = at::<Addr, F>(ctx, l3 + 8)?;
            // SAFETY: bounds checked by `at`.
            (protocol, unsafe { *src }, l3 + 40)
        }
        _ => return Some(true),
    };
    if protocol != proto::TCP && protocol != proto::UDP {
        return Some(true);
    }
    let port = be16(ctx, l4 + 2)?;
    let opens = protocol == proto::TCP && byte(ctx, l4 + 13)? & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let mut key = PortKey {
        port,
        proto: protocol,
        reserved: 0,
    };
    let set = match rule_set(&RL_PORTS, &key) {
        Some(s) => s,
        None => {
            key.port = 0;
            match rule_set(&RL_PORTS, &key) {
                Some(s) => s,
                None => return Some(true),
            }
        }
    };
    let p = Packet {
        addr,
        bytes: ctx.bytes(),
        opens,
    };
    Some(judge(&set, &p))
}

#[cgroup_sock_addr(connect4)]
pub fn insite_ratelimit_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context the kernel passed.
    let (ip, port, protocol) = unsafe {
        let a = &*ctx.sock_addr;
        (a.user_ip4, a.user_port, a.protocol)
    };
    egress(v4_mapped(ip.to_ne_bytes()), port, protocol)
}

#[cgroup_sock_addr(connect6)]
pub fn insite_ratelimit_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context the kernel passed.
    let (ip, port, protocol) = unsafe {
        let a = &*ctx.sock_addr;
        (a.user_ip6, a.user_port, a.protocol)
    };
    let mut addr = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = ip[i].to_ne_bytes();
        addr[i * 4] = b[0];
        addr[i * 4 + 1] = b[1];
        addr[i * 4 + 2] = b[2];
        addr[i * 4 + 3] = b[3];
        i += 1;
    }
    egress(addr, port, protocol)
}

/// 1 lets the connect go on; 0 refuses it (EPERM, or the errno set with `bpf_set_retval`).
#[inline(always)]
fn egress(addr: Addr, user_port: u32, protocol: u32) -> i32 {
    if protocol != proto::TCP as u32 && protocol != proto::UDP as u32 {
        return 1;
    }
    // The port is in network order in the low 16 bits.
    let port = u16::from_be(user_port as u16);
    let mut level = 1;
    while level <= MAX_CGROUP_LEVELS {
        // SAFETY: no preconditions; 0 past the caller's own level.
        let cgroup = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if cgroup == 0 {
            break;
        }
        level += 1;
        let mut key = EgressKey {
            cgroup,
            port,
            proto: protocol as u8,
            reserved: [0; 5],
        };
        let set = match rule_set(&RL_EGRESS, &key) {
            Some(s) => s,
            None => {
                key.port = 0;
                match rule_set(&RL_EGRESS, &key) {
                    Some(s) => s,
                    None => continue,
                }
            }
        };
        let p = Packet {
            addr,
            bytes: 0,
            opens: true,
        };
        if judge(&set, &p) {
            return 1;
        }
        if refuses(&set) {
            // SAFETY: no preconditions; the caller's connect() returns this errno.
            unsafe { bpf_set_retval(-ECONNREFUSED) };
        }
        return 0;
    }
    1
}

/// Whether the service's rules answer ECONNREFUSED (the first rule says for the set).
#[inline(always)]
fn refuses(set: &RuleSet) -> bool {
    let n = set.slots[0] as u32;
    if n == 0 || n > MAX_RULES {
        return false;
    }
    match RL_RULES.get(n - 1) {
        Some(r) => r.flags & flag::REFUSE != 0,
        None => false,
    }
}
