//! What the fuzzer does to a valid frame: truncations, one header field
//! set to an edge or random value, bit flips, bytes inserted or removed,
//! trailing padding, and a checksum steered to its edge (a translation
//! that should land on a zero checksum). Most mutations then fix the
//! checksums up, so that the frame gets past checksum-sensitive code and
//! into the deeper paths.

use super::corpus::{Services, some_address};
use super::parse::{self, ICMP, ICMPV6, TCP, UDP, fix_checksums, ones_sum, pseudo_sum};
use super::rng::Rng;

/// Mutation kinds, named in the report.
pub(crate) const KINDS: [&str; 7] = [
    "truncate",
    "field",
    "bit_flip",
    "splice",
    "padding",
    "checksum_edge",
    "address",
];

/// Applies one mutation of a random kind to `frame`; returns its name.
pub(crate) fn mutate(rng: &mut Rng, services: &Services, frame: &mut Vec<u8>) -> &'static str {
    let kind = KINDS[rng.below(KINDS.len())];
    match kind {
        "truncate" => truncate(rng, frame),
        "field" => set_field(rng, frame),
        "bit_flip" => {
            for _ in 0..rng.range(1, 4) {
                let at = rng.below(frame.len());
                frame[at] ^= 1 << rng.below(8);
            }
        }
        "splice" => splice(rng, frame),
        "padding" => {
            let extra = rng.range(1, 40);
            frame.extend(rng.bytes(extra));
        }
        "checksum_edge" => steer_checksum(rng, services, frame),
        _ => set_address(rng, services, frame),
    }
    if kind != "checksum_edge" && kind != "truncate" && rng.chance(60) {
        fix_checksums(frame);
    }
    kind
}

/// Cut the frame: anywhere, or at a header boundary give or take a byte.
/// Sometimes below the Ethernet header or inside the IP header, which
/// `BPF_PROG_TEST_RUN` refuses.
fn truncate(rng: &mut Rng, frame: &mut Vec<u8>) {
    let boundaries: Vec<usize> = parse::ip(frame).map_or_else(
        || vec![14],
        |ip| {
            vec![
                ip.l3_off,
                ip.l3_off + 20,
                ip.l4_off,
                ip.l4_off + 4,
                ip.l4_off + 8,
                ip.l4_off + 20,
            ]
        },
    );
    let cut = if rng.chance(70) {
        let at = *rng.pick(&boundaries);
        (at + rng.below(3)).saturating_sub(1)
    } else {
        rng.below(frame.len() + 1)
    };
    frame.truncate(cut.min(frame.len()));
}

/// (offset, width) of every header field of the frame as parsed that
/// the frame holds whole.
fn fields(frame: &[u8]) -> Vec<(usize, usize)> {
    let mut out = header_fields(frame);
    out.retain(|(off, width)| off + width <= frame.len());
    out
}

fn header_fields(frame: &[u8]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = vec![(0, 6), (6, 6), (12, 2)];
    let Some(link) = parse::link(frame) else {
        return out;
    };
    if link.vlan_tags > 0 {
        out.extend([(14, 2), (16, 2)]);
    }
    let Some(ip) = parse::ip(frame) else {
        return out;
    };
    let l3 = ip.l3_off;
    if ip.v4 {
        out.extend([
            (l3, 1),
            (l3 + 1, 1),
            (l3 + 2, 2),
            (l3 + 4, 2),
            (l3 + 6, 2),
            (l3 + 8, 1),
            (l3 + 9, 1),
            (l3 + 10, 2),
            (l3 + 12, 4),
            (l3 + 16, 4),
        ]);
        if ip.hlen > 20 {
            out.push((l3 + 20, 1));
        }
    } else {
        out.extend([
            (l3, 1),
            (l3 + 1, 3),
            (l3 + 4, 2),
            (l3 + 6, 1),
            (l3 + 7, 1),
            (l3 + 8, 16),
            (l3 + 24, 16),
        ]);
        if ip.ext_headers {
            out.extend([(l3 + 40, 1), (l3 + 41, 1), (l3 + 42, 2)]);
        }
    }
    let l4 = ip.l4_off;
    match ip.proto {
        TCP => out.extend([
            (l4, 2),
            (l4 + 2, 2),
            (l4 + 4, 4),
            (l4 + 8, 4),
            (l4 + 12, 1),
            (l4 + 13, 1),
            (l4 + 14, 2),
            (l4 + 16, 2),
            (l4 + 18, 2),
        ]),
        UDP => out.extend([(l4, 2), (l4 + 2, 2), (l4 + 4, 2), (l4 + 6, 2)]),
        ICMP | ICMPV6 => out.extend([(l4, 1), (l4 + 1, 1), (l4 + 2, 2), (l4 + 4, 4)]),
        _ => {}
    }
    out
}

/// One header field set to 0, all ones, one off its value, or random.
fn set_field(rng: &mut Rng, frame: &mut [u8]) {
    let fields = fields(frame);
    if fields.is_empty() {
        return;
    }
    let (off, width) = *rng.pick(&fields);
    let field = &mut frame[off..off + width];
    match rng.below(5) {
        0 => field.fill(0),
        1 => field.fill(0xff),
        2 => {
            let last = width - 1;
            field[last] = field[last].wrapping_add(1);
        }
        3 => {
            let last = width - 1;
            field[last] = field[last].wrapping_sub(1);
        }
        _ => {
            for b in field.iter_mut() {
                *b = rng.byte();
            }
        }
    }
}

/// Bytes inserted at or removed from a random place.
fn splice(rng: &mut Rng, frame: &mut Vec<u8>) {
    let at = rng.below(frame.len() + 1);
    if rng.chance(50) {
        let len = *rng.pick(&[1, 2, 4, 8, 40]);
        let bytes = rng.bytes(len);
        frame.splice(at..at, bytes);
    } else {
        let end = (at + rng.range(1, 8)).min(frame.len());
        frame.drain(at..end);
    }
}

/// The source or destination address replaced by a relevant, special or
/// random one.
fn set_address(rng: &mut Rng, services: &Services, frame: &mut [u8]) {
    let Some(ip) = parse::ip(frame) else { return };
    let range = ip.addr_range();
    let half = (range.end - range.start) / 2;
    let at = range.start + if rng.chance(50) { 0 } else { half };
    let addr = some_address(rng, services, ip.v4);
    if at + addr.len() <= frame.len() {
        frame[at..at + addr.len()].copy_from_slice(&addr);
    }
}

/// Sets a payload word so that, if the program translates the packet to
/// one of its frontend's backends (picked at random) without source NAT,
/// the updated L4 checksum lands on the ones'-complement zero edge; then
/// fixes the frame's own checksum. An IPv6 UDP checksum must then become
/// 0xffff, never 0 (RFC 8200).
fn steer_checksum(rng: &mut Rng, services: &Services, frame: &mut [u8]) {
    fix_checksums(frame);
    let Some(ip) = parse::ip(frame) else { return };
    let Some((_, dport)) = parse::ports(frame, &ip) else {
        return;
    };
    let dst = std::net::SocketAddr::new(ip.dst, dport);
    let Some(backends) = services.backends_of(dst, ip.proto) else {
        return;
    };
    if backends.is_empty() || !ip.complete(frame) || ip.fragment || ip.routed {
        return;
    }
    let header = if ip.proto == TCP { 20 } else { 8 };
    let l4_len = ip.declared_end - ip.l4_off;
    // A word-aligned payload word to steer.
    let word_at = ip.l4_off + header;
    if l4_len < header + 2 {
        return;
    }
    let backend = *rng.pick(&backends);
    let csum_at = ip.l4_off + if ip.proto == TCP { 16 } else { 6 };
    frame[csum_at..csum_at + 2].fill(0);
    frame[word_at..word_at + 2].fill(0);
    // The translated segment's sum without the steered word.
    let mut translated = frame[ip.l4_off..ip.declared_end].to_vec();
    translated[2..4].copy_from_slice(&backend.port().to_be_bytes());
    let pseudo = pseudo_sum(ip.src, backend.ip(), ip.proto, l4_len);
    let sum = ones_sum(&translated, pseudo);
    // sum + word == 0xffff: the translated checksum is then zero.
    frame[word_at..word_at + 2].copy_from_slice(&(!sum).to_be_bytes());
    fix_checksums(frame);
}
