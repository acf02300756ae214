//! The decisions of socket-level load balancing that are plain integers:
//! which sockets are translated, how a `sockaddr` port and IPv6 address are
//! read, which addresses are loopback or IPv4-mapped, and the number that
//! picks a backend slot. This file also builds and is tested on the host
//! (`cargo test -p lb-ebpf`): `BPF_PROG_TEST_RUN` cannot run cgroup
//! `sock_addr` programs, so what the harness does not reach is tested here.

use lb_common::{SockConfig, limits, proto, sock_flags};

/// True when a socket of the network namespace `netns_cookie` is to be
/// translated under `config`.
#[inline(always)]
pub(crate) fn translates(config: &SockConfig, netns_cookie: u64) -> bool {
    config.flags & sock_flags::ENABLED != 0
        && (config.flags & sock_flags::ALL_NETNS != 0 || netns_cookie == config.netns_cookie)
}

/// True for the protocols the service maps hold (TCP, UDP).
#[inline(always)]
pub(crate) fn served_protocol(protocol: u32) -> bool {
    protocol == u32::from(proto::TCP) || protocol == u32::from(proto::UDP)
}

/// The port of `bpf_sock_addr::user_port` (a 4-byte field holding the
/// 2-byte network-order port in its first two bytes), in the datapath's
/// representation: the network-order bytes read as a native `u16`.
#[inline(always)]
pub(crate) fn port_from_user(user_port: u32) -> u16 {
    let b = user_port.to_ne_bytes();
    u16::from_ne_bytes([b[0], b[1]])
}

/// The inverse of [`port_from_user`].
#[inline(always)]
pub(crate) fn port_to_user(port_be: u16) -> u32 {
    let b = port_be.to_ne_bytes();
    u32::from_ne_bytes([b[0], b[1], 0, 0])
}

/// The address bytes of a context's 4-byte word (`user_ip4`, or one word
/// of `user_ip6`): stored in network order, read as a native `u32`.
#[inline(always)]
pub(crate) fn addr_from_word(word: u32) -> [u8; 4] {
    word.to_ne_bytes()
}

/// The inverse of [`addr_from_word`].
#[inline(always)]
pub(crate) fn word_from_addr(addr: [u8; 4]) -> u32 {
    u32::from_ne_bytes(addr)
}

/// The 16 address bytes of the four words of `user_ip6`.
#[inline(always)]
pub(crate) fn addr6_from_words(words: [u32; 4]) -> [u8; 16] {
    let (w0, w1, w2, w3) = (
        words[0].to_ne_bytes(),
        words[1].to_ne_bytes(),
        words[2].to_ne_bytes(),
        words[3].to_ne_bytes(),
    );
    [
        w0[0], w0[1], w0[2], w0[3], w1[0], w1[1], w1[2], w1[3], w2[0], w2[1], w2[2], w2[3], w3[0],
        w3[1], w3[2], w3[3],
    ]
}

/// The inverse of [`addr6_from_words`].
#[inline(always)]
pub(crate) fn words_from_addr6(a: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

/// True when the words of `user_ip6` hold an IPv4-mapped address
/// (`::ffff:a.b.c.d`): an IPv6 socket talking IPv4, served like IPv4.
#[inline(always)]
pub(crate) fn is_v4_mapped(w: [u32; 4]) -> bool {
    w[0] == 0 && w[1] == 0 && w[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff])
}

/// True for 127.0.0.0/8: a `NodePort` there is served as on the node
/// address.
#[inline(always)]
pub(crate) fn is_loopback4(addr: &[u8; 4]) -> bool {
    addr[0] == 127
}

/// True for `::1`.
#[inline(always)]
pub(crate) fn is_loopback6(addr: &[u8; 16]) -> bool {
    let mut i = 0;
    while i < 15 {
        if addr[i] != 0 {
            return false;
        }
        i += 1;
    }
    addr[15] == 1
}

/// The number that picks a new connection's backend slot. TCP: a random
/// number per `connect()`, as the TC path's hash of a new 5-tuple spreads
/// connections (at `connect()` the socket has no source port yet). UDP: a
/// hash of the socket cookie, so that every datagram an unconnected socket
/// sends to the service goes to the same backend while the backends stay
/// (as Cilium's socket-LB does).
#[inline(always)]
pub(crate) fn slot_seed(protocol: u32, random: u32, socket_cookie: u64) -> u32 {
    if protocol == u32::from(proto::TCP) {
        random
    } else {
        cookie_hash(socket_cookie)
    }
}

/// The counter of the reverse-entry filter (`map_names::SOCK_REVNAT_FILTER`)
/// for a connected socket's peer: its address words folded together
/// (`fold_words`) and its port (network order). The peer, not the socket
/// cookie: a release reads it from the socket, while asking for the
/// cookie makes the kernel give the socket one (~0.2 µs) and most
/// sockets released never had one.
#[inline(always)]
pub(crate) fn filter_slot(addr_fold: u32, port_be: u16) -> u32 {
    cookie_hash((u64::from(addr_fold) << 16) | u64::from(port_be))
        & (limits::SOCK_REVNAT_FILTER_SLOTS - 1)
}

/// The two slots (`lb_common::SockSlot`) a TCP socket with COOKIE may
/// hold, in the order they are tried: its near slot among the table's
/// first `SOCK_NEAR_SLOTS`, then its far one among all `SOCK_SLOTS` (the
/// same slot when the cookie's low 16 bits are below `SOCK_NEAR_SLOTS`).
#[inline(always)]
#[expect(
    clippy::cast_possible_truncation,
    reason = "the cookie's low bits index the table"
)]
pub(crate) fn socket_slots(cookie: u64) -> [u32; 2] {
    let low = cookie as u32;
    [
        low & (limits::SOCK_NEAR_SLOTS - 1),
        low & (limits::SOCK_SLOTS - 1),
    ]
}

/// The words of an address (as the context holds them) folded into one.
#[inline(always)]
pub(crate) fn fold_words(words: [u32; 4]) -> u32 {
    words[0] ^ words[1] ^ words[2] ^ words[3]
}

/// murmur3's finaliser over the cookie's two halves.
#[inline(always)]
#[expect(
    clippy::cast_possible_truncation,
    reason = "the two halves of the cookie are folded on purpose"
)]
fn cookie_hash(cookie: u64) -> u32 {
    let mut h = (cookie as u32) ^ ((cookie >> 32) as u32).rotate_left(16);
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[cfg(test)]
mod tests {
    use lb_common::{SockConfig, proto, sock_flags};

    use super::*;

    fn config(flags: u32, netns_cookie: u64) -> SockConfig {
        SockConfig {
            netns_cookie,
            flags,
            _pad: 0,
        }
    }

    #[test]
    fn only_the_configured_namespace_is_translated_unless_all() {
        let hostns = config(sock_flags::ENABLED, 4096);
        assert!(translates(&hostns, 4096));
        assert!(!translates(&hostns, 4097));
        let all = config(sock_flags::ENABLED | sock_flags::ALL_NETNS, 4096);
        assert!(translates(&all, 4097));
        // Not written yet (all zero), or switched off: nothing, not even
        // a namespace whose cookie happens to be 0.
        assert!(!translates(&SockConfig::default(), 0));
        assert!(!translates(&config(sock_flags::ALL_NETNS, 0), 7));
    }

    #[test]
    fn ports_keep_their_network_order_bytes() {
        // What the kernel stores for port 8080 (0x1f90): bytes 1f 90 0 0.
        let user_port = u32::from_ne_bytes([0x1f, 0x90, 0, 0]);
        let port_be = port_from_user(user_port);
        assert_eq!(port_be, 8080u16.to_be());
        assert_eq!(port_to_user(port_be), user_port);
        assert_eq!(port_to_user(53u16.to_be()).to_ne_bytes(), [0, 53, 0, 0]);
    }

    #[test]
    fn addresses_round_trip_through_context_words() {
        let v4 = [10, 96, 0, 10];
        assert_eq!(addr_from_word(word_from_addr(v4)), v4);
        let v6: [u8; 16] = core::array::from_fn(|i| u8::try_from(i * 17).unwrap_or(0));
        assert_eq!(addr6_from_words(words_from_addr6(&v6)), v6);
        let words = words_from_addr6(&v6);
        assert_eq!(words[0].to_ne_bytes(), [v6[0], v6[1], v6[2], v6[3]]);
    }

    #[test]
    fn v4_mapped_addresses_are_recognised_and_nothing_else() {
        let mut mapped = [0u8; 16];
        mapped[10] = 0xff;
        mapped[11] = 0xff;
        mapped[12..].copy_from_slice(&[10, 96, 0, 10]);
        let words = words_from_addr6(&mapped);
        assert!(is_v4_mapped(words));
        assert_eq!(addr_from_word(words[3]), [10, 96, 0, 10]);
        // IPv4-compatible (::a.b.c.d) and a real IPv6 address are not.
        let mut compat = mapped;
        compat[10] = 0;
        compat[11] = 0;
        assert!(!is_v4_mapped(words_from_addr6(&compat)));
        let mut real = [0u8; 16];
        real[0] = 0xfd;
        real[10] = 0xff;
        real[11] = 0xff;
        assert!(!is_v4_mapped(words_from_addr6(&real)));
    }

    #[test]
    fn loopback_is_127_slash_8_and_colon_colon_1() {
        assert!(is_loopback4(&[127, 0, 0, 1]));
        assert!(is_loopback4(&[127, 1, 2, 3]));
        assert!(!is_loopback4(&[128, 0, 0, 1]));
        let mut one = [0u8; 16];
        one[15] = 1;
        assert!(is_loopback6(&one));
        one[0] = 0xfe;
        assert!(!is_loopback6(&one));
        assert!(!is_loopback6(&[0; 16]));
    }

    #[test]
    fn tcp_spreads_by_random_udp_sticks_to_the_socket() {
        let (tcp, udp) = (u32::from(proto::TCP), u32::from(proto::UDP));
        assert_eq!(slot_seed(tcp, 7, 1), 7);
        assert_eq!(slot_seed(tcp, 9, 1), 9);
        // UDP: the random number does not matter, the socket does.
        assert_eq!(slot_seed(udp, 7, 42), slot_seed(udp, 9, 42));
        // Sockets with consecutive cookies spread over the slots.
        let mut hits = [0u32; 4];
        for cookie in 0..4000u64 {
            hits[(slot_seed(udp, 0, cookie) % 4) as usize] += 1;
        }
        assert!(hits.iter().all(|&n| (800..1200).contains(&n)), "{hits:?}");
        assert!(served_protocol(tcp) && served_protocol(udp) && !served_protocol(1));
    }

    /// Neighbouring cookies take neighbouring near slots, which wrap
    /// inside the table's first `SOCK_NEAR_SLOTS`; the far slot is the
    /// cookie's place in the whole table; both are in the table.
    #[test]
    fn a_socket_tries_its_near_slot_then_its_far_one() {
        let near = u64::from(limits::SOCK_NEAR_SLOTS);
        assert_eq!(socket_slots(5), [5, 5]);
        assert_eq!(socket_slots(near + 5), [5, limits::SOCK_NEAR_SLOTS + 5]);
        assert_eq!(socket_slots(near * 3 + 6)[0], socket_slots(near + 5)[0] + 1);
        let wrapped = u64::from(limits::SOCK_SLOTS) + near + 5;
        assert_eq!(socket_slots(wrapped), socket_slots(near + 5));
        for cookie in [0, 1, near - 1, near, u64::MAX, 0x1234_5678_9abc_def0] {
            let [first, second] = socket_slots(cookie);
            assert!(first < limits::SOCK_NEAR_SLOTS && second < limits::SOCK_SLOTS);
            assert_eq!(second % limits::SOCK_NEAR_SLOTS, first, "{cookie:#x}");
        }
    }

    #[test]
    fn filter_slots_cover_the_array_and_spread_neighbouring_peers() {
        const { assert!(limits::SOCK_REVNAT_FILTER_SLOTS.is_power_of_two()) };
        // Backends are neighbours: 64 pod addresses of one /26 times 64
        // ports must not pile up in a few counters.
        let mut seen = std::collections::BTreeMap::<u32, u32>::new();
        for host in 0..64u8 {
            for port in 8000..8064u16 {
                let word = word_from_addr([10, 244, 1, host]);
                let slot = filter_slot(word, port.to_be());
                assert!(slot < limits::SOCK_REVNAT_FILTER_SLOTS);
                *seen.entry(slot).or_default() += 1;
            }
        }
        // 4096 into 32768: ~6% collide by chance; allow twice that.
        assert!(seen.len() > 3600, "{} distinct slots", seen.len());
        assert!(seen.values().all(|&n| n <= 3), "{:?}", seen.values().max());
        // An IPv6 peer's words are folded: each word counts.
        let v6 = words_from_addr6(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        let mut other = v6;
        other[1] ^= 1;
        assert_ne!(fold_words(v6), fold_words(other));
    }
}
