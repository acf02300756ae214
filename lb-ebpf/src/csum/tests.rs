use super::{CsumDiff, fold};

/// The checksum of `bytes` computed from scratch (RFC 1071): the sum of
/// 16-bit words as they sit in memory, folded.
fn full(bytes: &[u8]) -> [u8; 2] {
    let sum: u64 = bytes
        .chunks(2)
        .map(|pair| u64::from(u16::from_ne_bytes([pair[0], pair[1]])))
        .sum();
    let sum = (sum & 0xffff_ffff) + (sum >> 32);
    let sum = (sum & 0xffff_ffff) + (sum >> 32);
    fold(u32::try_from(sum).unwrap())
}

/// The IPv4 header of the example on Wikipedia's "Internet checksum"
/// page, checksum field zeroed; its checksum is 0xb861.
const HEADER: [u8; 20] = [
    0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00, 0x01,
    0xc0, 0xa8, 0x00, 0xc7,
];
const CHECK_OFF: usize = 10;

fn with_check(mut header: [u8; 20]) -> [u8; 20] {
    header[CHECK_OFF..CHECK_OFF + 2].copy_from_slice(&[0, 0]);
    let check = full(&header);
    header[CHECK_OFF..CHECK_OFF + 2].copy_from_slice(&check);
    header
}

fn check_of(header: &[u8; 20]) -> u16 {
    u16::from_ne_bytes([header[CHECK_OFF], header[CHECK_OFF + 1]])
}

fn word_at(bytes: &[u8], off: usize) -> [u8; 4] {
    [bytes[off], bytes[off + 1], bytes[off + 2], bytes[off + 3]]
}

/// A byte from xorshift32: reproducible inputs without a dependency.
fn next(state: &mut u32) -> u8 {
    *state ^= *state << 13;
    *state ^= *state >> 17;
    *state ^= *state << 5;
    state.to_le_bytes()[0]
}

#[test]
fn fold_known_answers() {
    let sum: u32 = HEADER
        .chunks(2)
        .map(|pair| u32::from(u16::from_ne_bytes([pair[0], pair[1]])))
        .sum();
    assert_eq!(fold(sum), [0xb8, 0x61]);
    // Zero sums to all ones; all ones (-0) and its carried forms to zero.
    assert_eq!(fold(0), [0xff, 0xff]);
    assert_eq!(fold(0xffff), [0, 0]);
    assert_eq!(fold(0x0001_fffe), [0, 0]);
    assert_eq!(fold(0xffff_ffff), [0, 0]);
}

/// RFC 1624 section 4: HC = 0xdd2f, m = 0x5555 -> m' = 0x3285 gives
/// HC' = 0x0000 by eqn. 3 (eqn. 2 would give the -0 form 0xffff).
#[test]
fn rfc1624_minus_zero_corner() {
    let check = u16::from_be_bytes([0xdd, 0x2f]);
    let old = u16::from_be_bytes([0x55, 0x55]);
    let new = u16::from_be_bytes([0x32, 0x85]);
    let diff = CsumDiff::NONE.word(u32::from(old), u32::from(new));
    assert_eq!(diff.apply(check), 0x0000);
    // The same bytes read natively (as the datapath reads them).
    let check = u16::from_ne_bytes([0xdd, 0x2f]);
    let old = u16::from_ne_bytes([0x55, 0x55]);
    let new = u16::from_ne_bytes([0x32, 0x85]);
    let diff = CsumDiff::NONE.word(u32::from(old), u32::from(new));
    assert_eq!(diff.apply(check), 0x0000);
}

#[test]
fn no_change_keeps_the_checksum() {
    let header = with_check(HEADER);
    assert_eq!(CsumDiff::NONE.apply(check_of(&header)), check_of(&header));
    let same = word_at(&header, 12);
    let diff = CsumDiff::NONE.bytes4(same, same);
    assert_eq!(diff.apply(check_of(&header)), check_of(&header));
}

#[test]
fn address_rewrite_matches_a_full_recompute() {
    let header = with_check(HEADER);
    assert_eq!(check_of(&header).to_ne_bytes(), [0xb8, 0x61]);
    let mut rewritten = header;
    rewritten[12..16].copy_from_slice(&[10, 0, 0, 1]);
    rewritten[16..20].copy_from_slice(&[10, 96, 0, 10]);
    let diff = CsumDiff::NONE
        .bytes4(word_at(&header, 12), word_at(&rewritten, 12))
        .bytes4(word_at(&header, 16), word_at(&rewritten, 16));
    let expected = with_check(rewritten);
    assert_eq!(diff.apply(check_of(&header)), check_of(&expected));
}

#[test]
fn random_rewrites_match_a_full_recompute() {
    let mut state = 0x2545_f491;
    for _ in 0..10_000 {
        let mut header = [0u8; 20];
        for byte in &mut header {
            *byte = next(&mut state);
        }
        let header = with_check(header);
        let mut rewritten = header;
        for byte in &mut rewritten[12..20] {
            *byte = next(&mut state);
        }
        let diff = CsumDiff::NONE
            .bytes4(word_at(&header, 12), word_at(&rewritten, 12))
            .bytes4(word_at(&header, 16), word_at(&rewritten, 16));
        rewritten[CHECK_OFF..CHECK_OFF + 2]
            .copy_from_slice(&diff.apply(check_of(&header)).to_ne_bytes());
        // A header with a right checksum sums to -0.
        let sum = full(&rewritten);
        assert_eq!(sum, [0, 0], "{header:02x?} -> {rewritten:02x?}");
    }
}

#[test]
fn sixteen_byte_rewrite_matches_four_words() {
    let old: [u8; 16] = [
        0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef,
    ];
    let new: [u8; 16] = [
        0xfd, 0x00, 0x00, 0x02, 0, 0, 0, 0, 0x12, 0x34, 0, 0, 0, 0, 0xff, 0x01,
    ];
    let by_words = (0..16).step_by(4).fold(CsumDiff::NONE, |diff, i| {
        diff.bytes4(word_at(&old, i), word_at(&new, i))
    });
    let diff = CsumDiff::NONE.bytes16(&old, &new);
    assert_eq!(diff.wsum(), by_words.wsum());
    // And the result matches a recompute of a buffer holding the field.
    let mut buf = [0u8; 20];
    buf[4..20].copy_from_slice(&old);
    let check = u16::from_ne_bytes(full(&buf));
    buf[4..20].copy_from_slice(&new);
    assert_eq!(diff.apply(check).to_ne_bytes(), full(&buf));
}

#[test]
fn wsum_known_answers() {
    // ~0 + 1: one end-around carry.
    assert_eq!(CsumDiff::NONE.word(0, 1).wsum(), 1);
    // ~x + x is all ones: -0.
    assert_eq!(
        CsumDiff::NONE.word(0x1234_5678, 0x1234_5678).wsum(),
        u32::MAX
    );
    // Two carries out of 32 bits.
    let diff = CsumDiff::NONE.word(0, u32::MAX).word(0, u32::MAX);
    assert_eq!(diff.wsum(), u32::MAX);
}

#[test]
fn a_folded_difference_adds_as_the_unfolded_one() {
    // Two changes of the header, applied as one difference built with
    // `add_wsum` or as one built word by word, give the same checksum.
    let old = with_check(HEADER);
    let check = check_of(&old);
    let first = CsumDiff::NONE.bytes4([192, 168, 0, 1], [10, 0, 0, 1]);
    let second = CsumDiff::NONE.bytes4([192, 168, 0, 199], [10, 0, 0, 2]);
    let both = CsumDiff::NONE
        .bytes4([192, 168, 0, 1], [10, 0, 0, 1])
        .bytes4([192, 168, 0, 199], [10, 0, 0, 2]);
    assert_eq!(
        first.add_wsum(second.wsum()).apply(check),
        both.apply(check)
    );
    assert_eq!(
        CsumDiff::NONE.add_wsum(0).wsum(),
        0,
        "nothing added stays 0"
    );
}

/// A message whose checksum covers a field that is itself a checksum (an
/// ICMP error quoting an IPv4 header): the outer checksum follows the
/// inner one's change through `half`, at either half of a word, and
/// `add` merges differences.
#[test]
fn nested_checksum_field_matches_a_full_recompute() {
    let mut state = 0x1357_9bdf;
    for _ in 0..2_000 {
        // [outer check 2][pad 2][inner header 20]: the outer checksum covers all.
        let mut msg = [0u8; 24];
        for byte in &mut msg[4..] {
            *byte = next(&mut state);
        }
        let inner = with_check(msg[4..].try_into().unwrap());
        msg[4..].copy_from_slice(&inner);
        msg[0..2].copy_from_slice(&[0, 0]);
        let outer = full(&msg);
        msg[0..2].copy_from_slice(&outer);
        let mut rewritten = inner;
        for byte in &mut rewritten[12..20] {
            *byte = next(&mut state);
        }
        let addrs = CsumDiff::NONE
            .bytes4(word_at(&inner, 12), word_at(&rewritten, 12))
            .bytes4(word_at(&inner, 16), word_at(&rewritten, 16));
        let new_check = addrs.apply(check_of(&inner));
        rewritten[CHECK_OFF..CHECK_OFF + 2].copy_from_slice(&new_check.to_ne_bytes());
        let outer_diff = CsumDiff::NONE.add(addrs).half(check_of(&inner), new_check);
        let old_outer = u16::from_ne_bytes([msg[0], msg[1]]);
        msg[4..].copy_from_slice(&rewritten);
        msg[0..2].copy_from_slice(&outer_diff.apply(old_outer).to_ne_bytes());
        assert_eq!(full(&rewritten), [0, 0]);
        assert_eq!(full(&msg), [0, 0], "{msg:02x?}");
    }
}
