//! What every socket probe reads of a `struct sock`: its family and its two ends.

/// Address families as `skc_family` holds them (and as the probes' events carry them).
pub mod af {
    pub const UNIX: u16 = 1;
    pub const INET: u16 = 2;
    pub const INET6: u16 = 10;
}

/// Byte offsets of the `struct sock_common` fields both the network and the database probes
/// read (from the start of `struct sock`), resolved by userspace from the running kernel's
/// BTF. Part of each probe's offsets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockOffsets {
    /// `skc_family` (u16): AF_INET, AF_INET6, AF_UNIX.
    pub skc_family: u32,
    /// `skc_daddr` (IPv4, network order): the remote address.
    pub skc_daddr: u32,
    /// `skc_rcv_saddr` (IPv4): the local address.
    pub skc_rcv_saddr: u32,
    /// `skc_dport` (u16, network order): the remote port.
    pub skc_dport: u32,
    /// `skc_num` (u16, host order): the local port.
    pub skc_num: u32,
    /// `skc_v6_daddr` (16 bytes).
    pub skc_v6_daddr: u32,
    /// `skc_v6_rcv_saddr` (16 bytes).
    pub skc_v6_rcv_saddr: u32,
}

impl SockOffsets {
    /// The placeholder the kernel objects are built with; userspace sets the real values.
    pub const ZERO: Self = Self {
        skc_family: 0,
        skc_daddr: 0,
        skc_rcv_saddr: 0,
        skc_dport: 0,
        skc_num: 0,
        skc_v6_daddr: 0,
        skc_v6_rcv_saddr: 0,
    };

    /// The `sock_common` paths, in field order, as BTF names them under `struct sock`.
    pub const PATHS: [&'static str; 7] = [
        "__sk_common.skc_family",
        "__sk_common.skc_daddr",
        "__sk_common.skc_rcv_saddr",
        "__sk_common.skc_dport",
        "__sk_common.skc_num",
        "__sk_common.skc_v6_daddr",
        "__sk_common.skc_v6_rcv_saddr",
    ];

    /// From the offsets of [`Self::PATHS`], in that order.
    pub const fn from_array(o: [u32; 7]) -> Self {
        Self {
            skc_family: o[0],
            skc_daddr: o[1],
            skc_rcv_saddr: o[2],
            skc_dport: o[3],
            skc_num: o[4],
            skc_v6_daddr: o[5],
            skc_v6_rcv_saddr: o[6],
        }
    }
}

const _: () = assert!(core::mem::size_of::<SockOffsets>() == 7 * 4);
