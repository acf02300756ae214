use super::first_word_delta;

/// `CRC32c` computed from scratch, bit by bit (RFC 9260 appendix A:
/// initial value all ones, reflected, final complement).
fn full(bytes: &[u8]) -> u32 {
    let mut crc = u32::MAX;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 0 {
                crc >> 1
            } else {
                (crc >> 1) ^ 0x82f6_3b78
            };
        }
    }
    !crc
}

/// A small deterministic generator for packet bytes.
struct Lcg(u64);

impl Lcg {
    fn byte(&mut self) -> u8 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 56) as u8
    }
}

#[test]
fn full_matches_the_standard_check_value() {
    // The CRC-32C check value of "123456789" (RFC 3720 B.4's catalogue).
    assert_eq!(full(b"123456789"), 0xe306_9283);
}

#[test]
fn updated_checksum_equals_a_recomputed_one() {
    let mut rng = Lcg(7);
    for len in [12_usize, 13, 16, 17, 60, 255, 256, 1500, 9000, 65_515] {
        let mut packet: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
        // The checksum is computed over the packet with its field zeroed.
        packet[8..12].fill(0);
        let old = full(&packet);
        let old_ports = [packet[0], packet[1], packet[2], packet[3]];
        let new_ports = [rng.byte(), rng.byte(), rng.byte(), rng.byte()];
        packet[0..4].copy_from_slice(&new_ports);
        let expected = full(&packet);
        let len = u32::try_from(len).unwrap();
        assert_eq!(
            old ^ first_word_delta(old_ports, new_ports, len),
            expected,
            "length {len}"
        );
    }
}

#[test]
fn unchanged_ports_change_nothing() {
    assert_eq!(first_word_delta([1, 2, 3, 4], [1, 2, 3, 4], 1500), 0);
}
