//! Byte-exact mirrors of the structs in `src/bpf/sluice.h`, and the address encoding they use.
//!
//! The kernel hashes map keys as raw bytes, so every struct here is `#[repr(C)]` with explicit
//! padding fields that are always zero. Sizes are pinned at compile time on both sides (const
//! assertions here, `_Static_assert` in the header); aya checks key and value sizes again when
//! each map is opened.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub(crate) const AF_INET: u16 = 2;
pub(crate) const AF_INET6: u16 = 10;

/// `SKF_BYPASS` in `sluice.h`: never rewrite this socket's connect().
pub(crate) const SKF_BYPASS: u32 = 4;

/// `struct sluice_config`: the single CONFIG entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Config {
    pub self_cgroup_id: u64,
    pub netns_cookie: u64,
    pub credit_bytes: i64,
}

/// `struct svc_key`: a Service VIP:port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct SvcKey {
    pub ip: [u32; 4],
    pub port: u16,
    pub family: u16,
}

/// `struct svc_target`: the proxy listener a VIP is rewritten to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct SvcTarget {
    pub ip: [u32; 4],
    pub port: u16,
    pub family: u16,
}

/// `struct listen_key`: a proxy listener address in Sluice's network namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct ListenKey {
    pub netns: u64,
    pub ip: [u32; 4],
    pub port: u16,
    pub family: u16,
    pub _pad: u32,
}

/// `struct sock_key`: a TCP connection seen from one end.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct SockKey {
    pub local_ip: [u32; 4],
    pub remote_ip: [u32; 4],
    pub local_port: u32,
    pub remote_port: u32,
    pub family: u32,
    pub _pad: u32,
    pub netns: u64,
}

/// `struct orig_dst`: the destination a redirected client asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct OrigDst {
    pub ip: [u32; 4],
    pub cookie: u64,
    pub netns: u64,
    pub port: u16,
    pub family: u16,
    pub flags: u32,
}

/// `struct sk_state`: per-socket state in SKSTATE (socket-local storage).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct SkState {
    pub orig_ip: [u32; 4],
    pub proxy_ip: [u32; 4],
    pub pair_netns: u64,
    pub orig_port: u16,
    pub proxy_port: u16,
    pub flags: u32,
}

const _: () = {
    assert!(size_of::<Config>() == 24);
    assert!(size_of::<SvcKey>() == 20);
    assert!(size_of::<SvcTarget>() == 20);
    assert!(size_of::<ListenKey>() == 32);
    assert!(size_of::<SockKey>() == 56);
    assert!(size_of::<OrigDst>() == 40);
    assert!(size_of::<SkState>() == 48);
};

// SAFETY: `aya::Pod` requires plain data that is valid for any bit pattern and has no
// uninitialised bytes. Each type below is `#[repr(C)]`, consists only of integer fields and
// integer arrays, and has no implicit padding (explicit `_pad` fields fill every gap; the
// const assertions above pin the sizes to the sum of the fields).
unsafe impl aya::Pod for Config {}
// SAFETY: see above.
unsafe impl aya::Pod for SvcKey {}
// SAFETY: see above.
unsafe impl aya::Pod for SvcTarget {}
// SAFETY: see above.
unsafe impl aya::Pod for ListenKey {}
// SAFETY: see above.
unsafe impl aya::Pod for SockKey {}
// SAFETY: see above.
unsafe impl aya::Pod for OrigDst {}
// SAFETY: see above.
unsafe impl aya::Pod for SkState {}

/// Maps `::ffff:a.b.c.d` to `a.b.c.d`, as the BPF programs do before building any key.
pub(crate) fn normalize_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// Maps a v4-mapped IPv6 socket address (`[::ffff:a.b.c.d]:p`) to `a.b.c.d:p`, as the BPF
/// programs do before building any key; other addresses are returned unchanged.
pub fn normalize(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(normalize_ip(addr.ip()), addr.port())
}

/// Encodes a (normalised) address the way the maps store it: network-order words, IPv4 in
/// word 0, and the address family.
pub(crate) fn encode_ip(ip: IpAddr) -> ([u32; 4], u16) {
    match normalize_ip(ip) {
        IpAddr::V4(v4) => ([u32::from_ne_bytes(v4.octets()), 0, 0, 0], AF_INET),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            ([word(0), word(4), word(8), word(12)], AF_INET6)
        }
    }
}

/// Inverse of [`encode_ip`]; `None` for an unknown family.
pub(crate) fn decode_ip(ip: [u32; 4], family: u16) -> Option<IpAddr> {
    match family {
        AF_INET => Some(IpAddr::V4(Ipv4Addr::from(ip[0].to_ne_bytes()))),
        AF_INET6 => {
            let mut o = [0u8; 16];
            for (chunk, word) in o.chunks_exact_mut(4).zip(ip) {
                chunk.copy_from_slice(&word.to_ne_bytes());
            }
            Some(IpAddr::V6(Ipv6Addr::from(o)))
        }
        _ => None,
    }
}

impl SockKey {
    /// The key of a connection as Sluice's accepted socket sees it (`local` = the listener
    /// address, `remote` = the client), with netns 0: the form ORIG_DST and PAUSED use.
    /// `None` when the two addresses are of different families after normalisation.
    pub(crate) fn accepted(peer: SocketAddr, local: SocketAddr) -> Option<Self> {
        let (local_ip, lf) = encode_ip(local.ip());
        let (remote_ip, rf) = encode_ip(peer.ip());
        (lf == rf).then_some(Self {
            local_ip,
            remote_ip,
            local_port: u32::from(local.port()),
            remote_port: u32::from(peer.port()),
            family: u32::from(lf),
            _pad: 0,
            netns: 0,
        })
    }
}

impl OrigDst {
    pub(crate) fn addr(&self) -> Option<SocketAddr> {
        decode_ip(self.ip, self.family).map(|ip| SocketAddr::new(ip, self.port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_mapped_addresses_encode_as_ipv4() {
        let v4: SocketAddr = "127.96.0.10:80".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:127.96.0.10]:80".parse().unwrap();
        assert_eq!(encode_ip(v4.ip()), encode_ip(mapped.ip()));
        assert_eq!(normalize(mapped), v4);
        let (words, family) = encode_ip(v4.ip());
        assert_eq!(family, AF_INET);
        // Network byte order in memory: the first octet comes first.
        assert_eq!(words[0].to_ne_bytes(), [127, 96, 0, 10]);
        assert_eq!(&words[1..], &[0, 0, 0]);
    }

    #[test]
    fn ipv6_round_trips() {
        for text in ["::1", "fd00::1:2", "::"] {
            let ip: IpAddr = text.parse().unwrap();
            let (words, family) = encode_ip(ip);
            assert_eq!(family, AF_INET6);
            assert_eq!(decode_ip(words, family), Some(ip));
        }
        assert_eq!(decode_ip([0; 4], 99), None);
    }

    #[test]
    fn accepted_key_is_the_listener_view() {
        let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let local: SocketAddr = "[::ffff:127.0.0.1]:15001".parse().unwrap();
        let key = SockKey::accepted(peer, local).unwrap();
        assert_eq!(key.local_port, 15001);
        assert_eq!(key.remote_port, 40000);
        assert_eq!(key.family, u32::from(AF_INET));
        assert_eq!(key.netns, 0);
        let v6: SocketAddr = "[::1]:1".parse().unwrap();
        assert!(SockKey::accepted(peer, v6).is_none(), "mixed families have no key");
    }
}
