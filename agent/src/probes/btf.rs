//! A small reader of kernel BTF (<https://docs.kernel.org/bpf/btf.html>) that resolves struct
//! member offsets and sizes. Our eBPF programs have no CO-RE relocations, so userspace looks the
//! offsets up here at load time and hands them to the programs. Written here because aya-obj
//! keeps its type lookup private and btf-rs is LGPL. Parsing never panics on arbitrary input.

use std::collections::HashMap;
use std::ops::Range;

const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading {VMLINUX}")]
    Read(#[source] std::io::Error),
    #[error("malformed BTF: {0}")]
    Malformed(String),
    #[error("no struct {0} in kernel BTF")]
    NoStruct(String),
    // The member variants carry (struct, dotted member path).
    #[error("struct {0} has no member {1}")]
    NoMember(String, String),
    #[error("{0}.{1} is a bitfield")]
    Bitfield(String, String),
    #[error("{0}.{1} is a pointer; cannot descend through it")]
    ThroughPointer(String, String),
    #[error("{0}.{1} is not a struct or union")]
    NotComposite(String, String),
    #[error("{0}.{1} has no fixed size")]
    NoSize(String, String),
}

type Res<T> = Result<T, BtfError>;

fn malformed(msg: impl Into<String>) -> BtfError {
    BtfError::Malformed(msg.into())
}

/// Where a member lives: bytes from the start of the outer struct, and its size in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    pub offset: u32,
    pub size: u32,
}

/// Only what offset and size resolution needs; every other kind collapses into `Other`.
#[derive(Debug)]
enum Ty {
    /// Void (id 0), FWD, FUNC, FUNC_PROTO, VAR, DATASEC, DECL_TAG: no data size.
    Other,
    /// INT, ENUM, ENUM64, FLOAT; the flag marks an INT narrower than its storage, which is how
    /// bitfields look in structs without kind_flag.
    Sized(u32, bool),
    Ptr,
    /// Element type, element count.
    Array(u32, u32),
    /// STRUCT or UNION: size, and where its members are in `KernelBtf::members`.
    Composite(u32, Range<usize>),
    /// TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG: transparent for layout.
    Alias(u32),
}

#[derive(Debug, Clone, Copy)]
struct Member {
    name: u32,
    ty: u32,
    bit_off: u32,
    bitfield: bool,
}

pub struct KernelBtf {
    types: Vec<Ty>, // indexed by type id; 0 is void
    members: Vec<Member>,
    strings: Vec<u8>,
    structs: HashMap<String, u32>,
    typedefs: HashMap<String, u32>,
}

/// `N` little-endian words at byte `at`, or an error if `b` is too short.
fn words<const N: usize>(b: &[u8], at: usize) -> Res<[u32; N]> {
    let bytes = b.get(at..).and_then(|b| b.get(..4 * N));
    let bytes = bytes.ok_or_else(|| malformed(format!("truncated at byte {at}")))?;
    let mut out = [0; N];
    for (w, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
        *w = u32::from_le_bytes(c.try_into().unwrap_or_default());
    }
    Ok(out)
}

fn cstr(strings: &[u8], off: u32) -> Res<&str> {
    let rest = strings.get(off as usize..).unwrap_or_default();
    let s = rest
        .iter()
        .position(|&b| b == 0)
        .and_then(|end| rest.get(..end));
    s.and_then(|s| std::str::from_utf8(s).ok())
        .ok_or_else(|| malformed(format!("bad string offset {off}")))
}

impl KernelBtf {
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        Self::parse(&std::fs::read(VMLINUX).map_err(BtfError::Read)?)
    }

    /// Parses a little-endian BTF blob: header, then type and string sections.
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        let [magic, hdr_len, type_off, type_len, str_off, str_len] = words(data, 0)?;
        match magic & 0xffff {
            0xeb9f => {}
            0x9feb => return Err(malformed("big-endian BTF is not supported")),
            _ => return Err(malformed("bad magic")),
        }
        if hdr_len < 24 {
            return Err(malformed(format!("header length {hdr_len} < 24")));
        }
        // Section offsets are relative to the end of the header.
        let section = |off: u32, len: u32| {
            let start = (hdr_len as usize).checked_add(off as usize)?;
            data.get(start..start.checked_add(len as usize)?)
        };
        let (Some(tsec), Some(strings)) = (section(type_off, type_len), section(str_off, str_len))
        else {
            return Err(malformed("section out of bounds"));
        };
        let mut btf = KernelBtf {
            types: vec![Ty::Other],
            members: Vec::new(),
            strings: strings.to_vec(),
            structs: HashMap::new(),
            typedefs: HashMap::new(),
        };
        let mut pos = 0;
        while pos < tsec.len() {
            let id = btf.types.len() as u32;
            let [name, info, sot] = words(tsec, pos)?;
            let (vlen, kind, body) = ((info & 0xffff) as usize, (info >> 24) & 0x1f, pos + 12);
            let (ty, extra) = match kind {
                1 => {
                    let [enc] = words(tsec, body)?; // bits 0-7: width, 16-23: bit offset
                    let narrow = enc & 0xff_0000 != 0 || Some(enc & 0xff) != sot.checked_mul(8);
                    (Ty::Sized(sot, narrow), 4)
                }
                2 => (Ty::Ptr, 0),
                3 => {
                    let [elem, _index, nelems] = words(tsec, body)?;
                    (Ty::Array(elem, nelems), 12)
                }
                4 | 5 => {
                    let start = btf.members.len();
                    for i in 0..vlen {
                        let [name, ty, off] = words(tsec, body + 12 * i)?;
                        // kind_flag: low 24 bits are the bit offset, high 8 the bitfield size.
                        let (bit_off, bitfield) = match info >> 31 {
                            1 => (off & 0xff_ffff, off >> 24 != 0),
                            _ => (off, false),
                        };
                        btf.members.push(Member {
                            name,
                            ty,
                            bit_off,
                            bitfield,
                        });
                    }
                    (Ty::Composite(sot, start..btf.members.len()), 12 * vlen)
                }
                6 => (Ty::Sized(sot, false), 8 * vlen),
                7 | 12 => (Ty::Other, 0),
                8..=11 | 18 => (Ty::Alias(sot), 0),
                13 => (Ty::Other, 8 * vlen),
                14 | 17 => (Ty::Other, 4),
                15 => (Ty::Other, 12 * vlen),
                16 => (Ty::Sized(sot, false), 0),
                19 => (Ty::Sized(sot, false), 12 * vlen),
                k => return Err(malformed(format!("unknown kind {k} at type id {id}"))),
            };
            pos = body + extra;
            if pos > tsec.len() {
                return Err(malformed(format!("type id {id} runs past its section")));
            }
            btf.types.push(ty);
            if name == 0 || (kind != 4 && kind != 8) {
                continue;
            }
            let name = cstr(&btf.strings, name)?.to_owned();
            if kind == 8 {
                btf.typedefs.entry(name).or_insert(id);
                continue;
            }
            // Prefer the first STRUCT with a non-zero size over an earlier empty one.
            let e = btf.structs.entry(name).or_insert(id);
            let empty = matches!(btf.types.get(*e as usize), Some(Ty::Composite(0, _)));
            if sot != 0 && empty {
                *e = id;
            }
        }
        Ok(btf)
    }

    fn ty(&self, id: u32) -> Res<&Ty> {
        let ty = self.types.get(id as usize);
        ty.ok_or_else(|| malformed(format!("type id {id} out of range")))
    }

    /// Follows typedef/modifier chains; bounded so a cyclic blob errors instead of looping.
    fn strip(&self, mut id: u32) -> Res<u32> {
        for _ in 0..64 {
            match self.ty(id)? {
                Ty::Alias(t) => id = *t,
                _ => return Ok(id),
            }
        }
        Err(malformed(format!("type chain too long at id {id}")))
    }

    /// Byte size, or None for void/functions/overflow/cycles.
    fn size(&self, mut id: u32) -> Option<u32> {
        let mut mult = 1u32;
        for _ in 0..64 {
            match self.types.get(id as usize)? {
                Ty::Sized(size, _) | Ty::Composite(size, _) => return size.checked_mul(mult),
                Ty::Ptr => return mult.checked_mul(8),
                Ty::Array(elem, nelems) => (mult, id) = (mult.checked_mul(*nelems)?, *elem),
                Ty::Alias(t) => id = *t,
                Ty::Other => return None,
            }
        }
        None
    }

    /// Finds `name` in the members of `id`, descending into anonymous struct/union members; the
    /// result's `bit_off` is relative to `id`. Depth and total work are bounded so a hostile
    /// blob (self-nesting, huge fan-out) can neither overflow the stack nor spin.
    fn find(&self, id: u32, name: &str, depth: u32, budget: &mut u32) -> Res<Option<Member>> {
        let Ty::Composite(_, members) = self.ty(self.strip(id)?)? else {
            return Ok(None);
        };
        if depth > 16 {
            return Err(malformed("anonymous members nested too deep"));
        }
        for m in self.members.get(members.clone()).unwrap_or_default() {
            let left = budget.checked_sub(1);
            *budget = left.ok_or_else(|| malformed("member search too large"))?;
            if m.name != 0 {
                if cstr(&self.strings, m.name)? == name {
                    return Ok(Some(*m));
                }
            } else if let Some(f) = self.find(m.ty, name, depth + 1, budget)? {
                let bit_off = m.bit_off.checked_add(f.bit_off);
                let bit_off = bit_off.ok_or_else(|| malformed("offset overflow"))?;
                return Ok(Some(Member { bit_off, ..f }));
            }
        }
        Ok(None)
    }

    /// `path` is dotted ("__sk_common.skc_dport"); anonymous members are searched
    /// transparently, typedefs and modifiers resolved, pointers never followed.
    pub fn field(&self, struct_name: &str, path: &str) -> Result<Field, BtfError> {
        let err = |f: fn(String, String) -> BtfError, m: &str| Err(f(struct_name.into(), m.into()));
        let Some(&(mut id)) = self.structs.get(struct_name) else {
            return Err(BtfError::NoStruct(struct_name.into()));
        };
        let (mut offset, mut done) = (0u32, 0usize); // path[..done] is resolved
        for part in path.split('.') {
            let parent = path.get(..done).unwrap_or(path);
            done += part.len() + usize::from(done > 0);
            let member = path.get(..done).unwrap_or(path);
            let cur = self.strip(id)?;
            match self.ty(cur)? {
                Ty::Composite(..) => {}
                Ty::Ptr => return err(BtfError::ThroughPointer, parent),
                _ => return err(BtfError::NotComposite, parent),
            }
            let found = match part {
                "" => None,
                _ => self.find(cur, part, 0, &mut (1 << 20))?,
            };
            let Some(m) = found else {
                return err(BtfError::NoMember, member);
            };
            let narrow_int = matches!(self.ty(self.strip(m.ty)?)?, Ty::Sized(_, true));
            if m.bitfield || m.bit_off % 8 != 0 || narrow_int {
                return err(BtfError::Bitfield, member);
            }
            let next = offset.checked_add(m.bit_off / 8);
            offset = next.ok_or_else(|| malformed("offset overflow"))?;
            id = m.ty;
        }
        match self.size(id) {
            Some(size) => Ok(Field { offset, size }),
            None => err(BtfError::NoSize, path),
        }
    }

    pub fn has_struct(&self, name: &str) -> bool {
        self.structs.contains_key(name)
    }

    /// Whether vmlinux has the typedef `btf_trace_<tracepoint>` that tp_btf programs attach to.
    pub fn has_tracepoint(&self, tracepoint: &str) -> bool {
        let name = format!("btf_trace_{tracepoint}");
        self.typedefs.contains_key(&name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_kernel_fields() {
        let btf = KernelBtf::from_sys_fs().unwrap();
        let field = |s: &str, p: &str| btf.field(s, p).unwrap_or_else(|e| panic!("{e}"));
        for (s, p, size) in [
            ("tcp_sock", "srtt_us", 4),
            ("tcp_sock", "bytes_acked", 8),
            ("tcp_sock", "bytes_received", 8),
            ("sock", "__sk_common.skc_dport", 2),
            ("sock", "__sk_common.skc_num", 2),
            ("sock", "__sk_common.skc_family", 2),
            ("sock", "__sk_common.skc_daddr", 4),
            ("sock", "__sk_common.skc_v6_daddr", 16),
            ("sock", "sk_err", 4),
            ("sock", "sk_protocol", 2),
            ("sock", "sk_cgrp_data.cgroup", 8),
            ("cgroup", "kn", 8),
            ("kernfs_node", "id", 8),
        ] {
            assert_eq!(field(s, p).size, size, "{s}.{p}");
        }
        // sock starts with __sk_common; these offsets inside anonymous unions/structs have
        // been stable on 64-bit kernels for a decade.
        let dport = field("sock", "__sk_common.skc_dport");
        assert_eq!(dport, field("sock_common", "skc_dport"));
        assert_eq!(dport.offset, 12);
        assert_eq!(field("sock_common", "skc_daddr").offset, 0);
        assert_eq!(field("sock_common", "skc_family").offset, 16);
        assert!(btf.has_struct("sock") && !btf.has_struct("no_such_struct"));
        for tp in [
            "inet_sock_set_state",
            "tcp_retransmit_skb",
            "tcp_rcv_space_adjust",
        ] {
            assert!(btf.has_tracepoint(tp), "{tp}");
        }
        assert!(!btf.has_tracepoint("no_such_tp"));
        let err = |s: &str, p: &str| btf.field(s, p).unwrap_err().to_string();
        assert_eq!(
            err("tcp_sock", "nope"),
            "struct tcp_sock has no member nope"
        );
        assert_eq!(
            err("sock", "sk_cgrp_data.x"),
            "struct sock has no member sk_cgrp_data.x"
        );
        assert_eq!(
            err("cgroup", "kn.id"),
            "cgroup.kn is a pointer; cannot descend through it"
        );
        assert_eq!(
            err("sock_common", "skc_reuse"),
            "sock_common.skc_reuse is a bitfield"
        );
        assert_eq!(
            err("no_such_struct", "x"),
            "no struct no_such_struct in kernel BTF"
        );
    }

    /// Builds a little-endian BTF blob from raw type words and a string table.
    #[derive(Default)]
    struct Blob {
        types: Vec<u32>,
        strs: Vec<u8>,
    }

    impl Blob {
        fn s(&mut self, name: &str) -> u32 {
            if self.strs.is_empty() {
                self.strs.push(0); // offset 0 is the empty name
            }
            let off = self.strs.len() as u32;
            self.strs.extend(name.bytes().chain([0]));
            off
        }
        fn ty(&mut self, name: &str, kind: u32, kflag: bool, vlen: u32, sot: u32, extra: &[u32]) {
            let name = if name.is_empty() { 0 } else { self.s(name) };
            let info = (kind << 24) | vlen | (u32::from(kflag) << 31);
            self.types.extend([name, info, sot].iter().chain(extra));
        }
        fn finish(&mut self) -> Vec<u8> {
            let tlen = self.types.len() as u32 * 4;
            let hdr = [0x0101_eb9f, 24, 0, tlen, tlen, self.strs.len() as u32];
            let words = hdr.iter().chain(&self.types).flat_map(|w| w.to_le_bytes());
            words.chain(self.strs.iter().copied()).collect()
        }
    }

    /// struct outer { int x; union { int a; char b; }; int flags:3; struct outer *p;
    /// const int_t arr[3]; } with kind_flag set, plus typedef btf_trace_foo.
    fn tiny() -> Vec<u8> {
        let mut b = Blob::default();
        b.ty("int", 1, false, 0, 4, &[32]); // 1
        b.ty("char", 1, false, 0, 1, &[8]); // 2
        let (a, bb) = (b.s("a"), b.s("b"));
        b.ty("", 5, false, 2, 4, &[a, 1, 0, bb, 2, 0]); // 3: the anonymous union
        let (x, flags, p, arr) = (b.s("x"), b.s("flags"), b.s("p"), b.s("arr"));
        let members = [
            [x, 1, 0],
            [0, 3, 32],
            [flags, 1, (3 << 24) | 64],
            [p, 5, 128],
            [arr, 7, 192],
        ];
        b.ty("outer", 4, true, 5, 40, &members.concat()); // 4
        b.ty("", 2, false, 0, 4, &[]); // 5: struct outer *
        b.ty("btf_trace_foo", 8, false, 0, 5, &[]); // 6
        b.ty("", 3, false, 0, 0, &[9, 1, 3]); // 7: const int_t[3]
        b.ty("int_t", 8, false, 0, 1, &[]); // 8
        b.ty("", 10, false, 0, 8, &[]); // 9: const int_t
        b.finish()
    }

    #[test]
    fn hand_built_blob() {
        let btf = KernelBtf::parse(&tiny()).unwrap();
        let f = |p: &str| btf.field("outer", p).map(|f| (f.offset, f.size));
        assert_eq!(f("x").unwrap(), (0, 4));
        assert_eq!(f("a").unwrap(), (4, 4));
        assert_eq!(f("b").unwrap(), (4, 1));
        assert_eq!(f("p").unwrap(), (16, 8));
        assert_eq!(f("arr").unwrap(), (24, 12));
        assert_eq!(
            f("flags").unwrap_err().to_string(),
            "outer.flags is a bitfield"
        );
        assert!(matches!(f("p.x"), Err(BtfError::ThroughPointer(..))));
        assert!(matches!(f("x.y"), Err(BtfError::NotComposite(..))));
        assert!(matches!(f(""), Err(BtfError::NoMember(..))));
        assert!(btf.has_struct("outer") && !btf.has_struct("int"));
        assert!(btf.has_tracepoint("foo") && !btf.has_tracepoint("bar"));
    }

    #[test]
    fn garbage_never_panics() {
        let real = std::fs::read(VMLINUX).unwrap();
        let head = real.get(..4096).unwrap_or(&real);
        for n in 0..=head.len() {
            let _ = KernelBtf::parse(&head[..n]);
        }
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let tiny = tiny();
        for _ in 0..20_000 {
            let mut buf: Vec<u8> = (0..next() % 512).map(|_| next() as u8).collect();
            if next() % 2 == 0 {
                // A valid header over random sections, so the type walker is reached.
                let (len, split) = (buf.len() as u32, (next() % (buf.len() as u64 + 1)) as u32);
                let hdr = [0x0101_eb9f, 24, 0, split, split, len - split];
                buf.splice(..0, hdr.iter().flat_map(|w| w.to_le_bytes()));
            }
            // And a valid blob with a few bytes flipped, queried if it still parses.
            let mut t = tiny.clone();
            for _ in 0..1 + next() % 4 {
                let i = (next() % t.len() as u64) as usize;
                t[i] = next() as u8;
            }
            for btf in [&buf, &t]
                .into_iter()
                .filter_map(|b| KernelBtf::parse(b).ok())
            {
                for p in ["x", "a", "b", "p", "p.x", "arr", "flags", "x.y"] {
                    let _ = btf.field("outer", p);
                }
            }
        }
    }
}
