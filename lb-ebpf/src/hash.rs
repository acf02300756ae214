//! The flow hash (murmur3's mixing steps over the flow's words) and the
//! backend slot it picks. Plain integers: this file also builds and is
//! tested on the host.

/// Seed of the flow hash.
const FLOW_HASH_SEED: u32 = 0x5f1b_6c3d;

/// murmur3 mixing step (`MurmurHash3_x86_32`'s body for one 4-byte block).
#[inline(always)]
fn hash_mix(h: u32, word: u32) -> u32 {
    let k = word
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

/// murmur3 finaliser (`fmix32`).
#[inline(always)]
fn hash_finish(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The hash of a flow: source and destination address word by word
/// (interleaved), then both ports, then the protocol. `N` is 4 or 16.
#[inline(always)]
pub(crate) fn flow_hash<const N: usize>(
    saddr: &[u8; N],
    daddr: &[u8; N],
    sport_be: u16,
    dport_be: u16,
    proto: u8,
) -> u32 {
    let mut h = FLOW_HASH_SEED;
    let mut i = 0;
    while i < N {
        let s = [saddr[i], saddr[i + 1], saddr[i + 2], saddr[i + 3]];
        let d = [daddr[i], daddr[i + 1], daddr[i + 2], daddr[i + 3]];
        h = hash_mix(h, u32::from_ne_bytes(s));
        h = hash_mix(h, u32::from_ne_bytes(d));
        i += 4;
    }
    h = hash_mix(h, (u32::from(sport_be) << 16) | u32::from(dport_be));
    hash_finish(hash_mix(h, u32::from(proto)))
}

/// Backend slot (1..=count) for a flow hash; `count` is non-zero.
#[inline(always)]
#[expect(
    clippy::cast_possible_truncation,
    reason = "the remainder is below `count`, a u16"
)]
pub(crate) fn slot_for(hash: u32, count: u16) -> u16 {
    // count >= 1, so the result fits in 1..=count.
    (hash % u32::from(count)) as u16 + 1
}

#[cfg(test)]
mod tests {
    use super::{flow_hash, hash_finish, hash_mix, slot_for};

    /// `MurmurHash3_x86_32` of one 4-byte block built from the two steps.
    fn murmur3_word(word: u32, seed: u32) -> u32 {
        hash_finish(hash_mix(seed, word) ^ 4)
    }

    /// Published `MurmurHash3_x86_32` test vectors.
    #[test]
    fn murmur3_known_answers() {
        // Empty input: only the finaliser runs on the seed.
        assert_eq!(hash_finish(0), 0);
        assert_eq!(hash_finish(1), 0x514e_28b7);
        assert_eq!(hash_finish(0xffff_ffff), 0x81f1_6f39);
        // Key bytes 21 43 65 87 (a little-endian block) and zero bytes.
        assert_eq!(murmur3_word(0x8765_4321, 0), 0xf55b_516b);
        assert_eq!(murmur3_word(0x8765_4321, 0x5082_edee), 0x2362_f9de);
        assert_eq!(murmur3_word(0, 0), 0x2362_f9de);
    }

    /// The flow hashes the datapath has always computed: a change here
    /// moves established clients to other backends after an upgrade.
    #[test]
    fn flow_hash_known_answers() {
        let v4 = flow_hash(
            &[10, 0, 0, 1],
            &[10, 96, 0, 10],
            40_000_u16.to_be(),
            80_u16.to_be(),
            6,
        );
        assert_eq!(v4, FLOW4);
        let mut client = [0u8; 16];
        client[..2].copy_from_slice(&[0xfd, 0x00]);
        client[15] = 2;
        let mut vip = [0u8; 16];
        vip[..2].copy_from_slice(&[0xfd, 0x00]);
        vip[15] = 0x0a;
        let v6 = flow_hash(&client, &vip, 40_000_u16.to_be(), 53_u16.to_be(), 17);
        assert_eq!(v6, FLOW6);
    }

    /// Computed from the pre-split per-family code (`V4::flow_hash`,
    /// `V6::flow_hash`) by an independent script.
    const FLOW4: u32 = 0x7515_dddd;
    const FLOW6: u32 = 0x492d_0594;

    #[test]
    fn slot_known_answers() {
        assert_eq!(slot_for(0, 1), 1);
        assert_eq!(slot_for(u32::MAX, 1), 1);
        assert_eq!(slot_for(10, 3), 2);
        assert_eq!(slot_for(11, 3), 3);
        assert_eq!(slot_for(12, 3), 1);
        assert_eq!(slot_for(u32::MAX, u16::MAX), 1);
        assert_eq!(slot_for(u32::MAX - 1, u16::MAX), u16::MAX);
    }

    #[test]
    fn slots_stay_in_range() {
        for count in [1, 2, 3, 10, 1000, u16::MAX - 1] {
            for hash in (0..50_000u32).map(hash_finish) {
                let slot = slot_for(hash, count);
                assert!((1..=count).contains(&slot));
            }
        }
    }
}
