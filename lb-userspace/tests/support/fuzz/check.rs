//! The invariants every frame's outcome is checked against, each with the
//! name a violation is reported under:
//!
//! - the verdict is one of `TC_ACT_OK`, `TC_ACT_SHOT`, `TC_ACT_REDIRECT`,
//!   and its reason is one the datapath documents (`pass_*`, `drop_*`,
//!   `reject`, `nat_*`) with the action that reason means;
//! - a passed frame leaves byte for byte unchanged;
//! - a frame that carries no address the datapath has state for is
//!   passed (it is not service traffic);
//! - a translated frame keeps its length, differs only where NAT may
//!   write (addresses, ports, checksums; MACs and TTL / hop limit only when
//!   forwarded; for an ICMP error also the quoted packet's addresses, ports
//!   and checksums), keeps valid checksums valid, never carries a zero
//!   IPv6 UDP checksum, goes to a backend of its frontend (or comes back
//!   from the frontend a backend serves);
//! - a refusal is a TCP reset (RFC 9293 sequence numbers) or an ICMP port
//!   unreachable quoting the packet, with valid checksums, from the
//!   service address back to the sender.

use std::net::SocketAddr;

use super::corpus::Services;
use super::parse::{
    self, ICMP, ICMPV6, Ip, TCP, UDP, be16, be32, ip_at, ip_csum_ok, is_icmp_error, l4_csum_ok,
};
use crate::support::prog_test::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT};

/// One broken invariant: its name and what was seen.
#[derive(Clone, Debug)]
pub(crate) struct Violation {
    pub(crate) invariant: &'static str,
    pub(crate) detail: String,
}

fn violation(invariant: &'static str, detail: impl Into<String>) -> Violation {
    Violation {
        invariant,
        detail: detail.into(),
    }
}

/// What the program did with one frame.
pub(crate) struct Outcome<'a> {
    pub(crate) action: u32,
    pub(crate) out: &'a [u8],
    pub(crate) reason: &'static str,
}

/// Checks one frame's outcome against every invariant.
pub(crate) fn check(
    services: &Services,
    relevant: &[Vec<u8>],
    input: &[u8],
    outcome: &Outcome,
) -> Vec<Violation> {
    let mut found = Vec::new();
    let Outcome {
        action,
        out,
        reason,
    } = *outcome;
    if ![TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT].contains(&action) {
        found.push(violation("verdict_outside_set", format!("action {action}")));
    }
    if reason.starts_with("pass_") {
        if action != TC_ACT_OK {
            found.push(violation(
                "pass_not_ok",
                format!("{reason}: action {action}"),
            ));
        }
        if out != input {
            found.push(violation(
                "pass_changed_frame",
                format!("{reason}: {}", diff(input, out)),
            ));
        }
    } else if reason.starts_with("drop_") {
        if action != TC_ACT_SHOT {
            found.push(violation(
                "drop_not_shot",
                format!("{reason}: action {action}"),
            ));
        }
    } else if reason == "reject" || reason == "reject_no_flow" {
        if action == TC_ACT_REDIRECT {
            check_reject(services, input, out, &mut found);
        } else {
            found.push(violation("reject_not_redirect", format!("action {action}")));
        }
    } else if reason.starts_with("nat_") {
        if action == TC_ACT_OK || action == TC_ACT_REDIRECT {
            check_translated(services, input, outcome, &mut found);
        } else {
            found.push(violation(
                "nat_not_ok",
                format!("{reason}: action {action}"),
            ));
        }
    } else {
        found.push(violation("unknown_reason", reason));
    }
    let service_traffic = relevant
        .iter()
        .any(|addr| input.windows(addr.len()).any(|w| w == addr.as_slice()));
    if !service_traffic && !reason.starts_with("pass_") {
        found.push(violation("non_service_not_passed", reason));
    }
    found
}

/// The first differing offsets of two frames, for a report.
fn diff(a: &[u8], b: &[u8]) -> String {
    let offsets: Vec<usize> = (0..a.len().max(b.len()))
        .filter(|&i| a.get(i) != b.get(i))
        .take(8)
        .collect();
    format!(
        "lengths {}/{}, bytes differ at {offsets:?}",
        a.len(),
        b.len()
    )
}

/// Offsets NAT may change in a frame laid out as `ip`.
fn writable(frame: &[u8], ip: &Ip, forwarded: bool) -> Vec<std::ops::Range<usize>> {
    let mut ranges = vec![ip.addr_range()];
    if forwarded {
        ranges.push(0..12);
        ranges.push(ip.ttl_off()..ip.ttl_off() + 1);
    }
    if ip.v4 {
        ranges.push(ip.l3_off + 10..ip.l3_off + 12);
    }
    if parse::ports(frame, ip).is_some() {
        ranges.push(ip.l4_off..ip.l4_off + 4);
    }
    if let Some(field) = parse::l4_csum_field(ip.proto) {
        ranges.push(ip.l4_off + field..ip.l4_off + field + 2);
    }
    let icmp_type = frame.get(ip.l4_off).copied().unwrap_or(0);
    let icmp_error =
        (ip.proto == ICMP || ip.proto == ICMPV6) && is_icmp_error(ip.v4, ip.proto, icmp_type);
    if icmp_error && let Some(inner) = ip_at(frame, ip.l4_off + 8, ip.v4) {
        ranges.push(inner.addr_range());
        if inner.v4 {
            ranges.push(inner.l3_off + 10..inner.l3_off + 12);
        }
        if !inner.later_fragment && (inner.proto == TCP || inner.proto == UDP) {
            ranges.push(inner.l4_off..inner.l4_off + 4);
        }
        if let Some(field) = parse::l4_csum_field(inner.proto) {
            ranges.push(inner.l4_off + field..inner.l4_off + field + 2);
        }
    }
    ranges
}

fn check_translated(
    services: &Services,
    input: &[u8],
    outcome: &Outcome,
    found: &mut Vec<Violation>,
) {
    let (out, reason) = (outcome.out, outcome.reason);
    if out.len() != input.len() {
        found.push(violation(
            "nat_length_changed",
            format!("{reason}: {}", diff(input, out)),
        ));
        return;
    }
    let (Some(before), Some(after)) = (parse::ip(input), parse::ip(out)) else {
        found.push(violation("nat_not_ip", reason));
        return;
    };
    let allowed = writable(input, &before, outcome.action == TC_ACT_REDIRECT);
    let stray: Vec<usize> = (0..input.len())
        .filter(|&i| input[i] != out[i] && !allowed.iter().any(|r| r.contains(&i)))
        .collect();
    if !stray.is_empty() {
        found.push(violation(
            "nat_changed_other_bytes",
            format!("{reason}: offsets {stray:?}"),
        ));
    }
    if ip_csum_ok(input, &before) == Some(true) && ip_csum_ok(out, &after) != Some(true) {
        found.push(violation(
            "nat_bad_ip_checksum",
            "a valid IPv4 header checksum became invalid",
        ));
    }
    if l4_csum_ok(input, &before) == Some(true) && l4_csum_ok(out, &after) != Some(true) {
        found.push(violation(
            "nat_bad_l4_checksum",
            "a valid L4 checksum became invalid",
        ));
    }
    let csum_field = |f: &[u8], ip: &Ip| {
        if ip.proto == UDP && !ip.later_fragment {
            be16(f, ip.l4_off + 6)
        } else {
            None
        }
    };
    match (csum_field(input, &before), csum_field(out, &after)) {
        (Some(0), Some(c)) if before.v4 && c != 0 => {
            found.push(violation(
                "nat_udp4_no_checksum_changed",
                "a zero (no) IPv4 UDP checksum was changed",
            ));
        }
        (Some(_), Some(0)) if !after.v4 => {
            found.push(violation(
                "nat_ipv6_udp_zero_checksum",
                "the translated IPv6 UDP checksum is 0x0000",
            ));
        }
        _ => {}
    }
    let (Some(from), Some(to)) = (parse::ports(input, &before), parse::ports(out, &after)) else {
        return;
    };
    let (in_src, in_dst) = (
        SocketAddr::new(before.src, from.0),
        SocketAddr::new(before.dst, from.1),
    );
    let (out_src, out_dst) = (
        SocketAddr::new(after.src, to.0),
        SocketAddr::new(after.dst, to.1),
    );
    match reason {
        "nat_new" | "nat_established" => {
            if !services.serves(in_dst, before.proto, out_dst) {
                found.push(violation(
                    "nat_not_to_a_backend",
                    format!("{reason}: {in_dst} -> {out_dst}"),
                ));
            }
            // Source NAT to the node or loopback address, or (a reply
            // tuple another flow held) to the client's own address with a
            // port of the SNAT range.
            let pool =
                lb_common::SNAT_PORT_MIN..lb_common::SNAT_PORT_MIN + lb_common::SNAT_PORT_COUNT;
            let remapped = out_src.ip() == in_src.ip() && pool.contains(&out_src.port());
            if out_src != in_src && !Services::snat_addrs().contains(&out_src.ip()) && !remapped {
                found.push(violation(
                    "nat_source_not_snat_address",
                    format!("{reason}: {in_src} -> {out_src}"),
                ));
            }
        }
        "nat_reply" if !services.serves(out_src, before.proto, in_src) => {
            found.push(violation(
                "nat_reply_not_from_its_service",
                format!("{in_src} -> {out_src}"),
            ));
        }
        _ => {}
    }
}

fn check_reject(services: &Services, input: &[u8], out: &[u8], found: &mut Vec<Violation>) {
    let (Some(asked), Some(reply)) = (parse::ip(input), parse::ip(out)) else {
        found.push(violation("reject_malformed", "no IP header"));
        return;
    };
    if out.get(0..6) != input.get(6..12) || out.get(6..12) != input.get(0..6) {
        found.push(violation("reject_wrong_macs", "MACs not swapped"));
    }
    if (reply.src, reply.dst) != (asked.dst, asked.src) || reply.v4 != asked.v4 {
        found.push(violation(
            "reject_not_back_to_sender",
            format!(
                "{} -> {} answering {} -> {}",
                reply.src, reply.dst, asked.src, asked.dst
            ),
        ));
    }
    if !services.is_frontend_addr(asked.dst) {
        found.push(violation(
            "reject_not_for_a_service_address",
            asked.dst.to_string(),
        ));
    }
    if reply.v4 && ip_csum_ok(out, &reply) != Some(true) {
        found.push(violation("reject_bad_ip_checksum", ""));
    }
    if reply.declared_end != out.len() || l4_csum_ok(out, &reply) != Some(true) {
        found.push(violation("reject_bad_length_or_checksum", diff(input, out)));
    }
    if asked.proto == TCP {
        check_reset(input, &asked, out, &reply, found);
    } else {
        let (ty, code) = (out.get(reply.l4_off), out.get(reply.l4_off + 1));
        let want = if reply.v4 {
            (ICMP, 3, 3)
        } else {
            (ICMPV6, 1, 4)
        };
        if (reply.proto, ty, code) != (want.0, Some(&want.1), Some(&want.2)) {
            found.push(violation(
                "reject_not_port_unreachable",
                format!("{:?}", (reply.proto, ty, code)),
            ));
        }
        let quote_len = asked.l4_off - asked.l3_off + 8;
        let quote = input.get(asked.l3_off..asked.l3_off + quote_len);
        if out.get(reply.l4_off + 8..) != quote {
            found.push(violation("reject_bad_quote", diff(input, out)));
        }
    }
}

/// A TCP reset answering the TCP segment `input` (RFC 9293 3.10.7.1).
fn check_reset(input: &[u8], asked: &Ip, out: &[u8], reply: &Ip, found: &mut Vec<Violation>) {
    let at = reply.l4_off;
    if reply.proto != TCP || out.len() != at + 20 || out.get(at + 12) != Some(&0x50) {
        found.push(violation("reset_malformed", diff(input, out)));
        return;
    }
    let (Some(ports_in), Some(ports_out)) = (parse::ports(input, asked), parse::ports(out, reply))
    else {
        found.push(violation("reset_malformed", "no ports"));
        return;
    };
    if ports_out != (ports_in.1, ports_in.0) {
        found.push(violation(
            "reset_ports_not_swapped",
            format!("{ports_in:?} -> {ports_out:?}"),
        ));
    }
    let l4 = asked.l4_off;
    let (Some(&flags), Some(seq), Some(ack), Some(&doff)) = (
        input.get(l4 + 13),
        be32(input, l4 + 4),
        be32(input, l4 + 8),
        input.get(l4 + 12),
    ) else {
        found.push(violation("reset_malformed", "segment header cut"));
        return;
    };
    if flags & 0x04 != 0 {
        found.push(violation("reset_answers_a_reset", ""));
        return;
    }
    let l4_len = asked.declared_end.saturating_sub(asked.l4_off);
    let data = u32::try_from(l4_len.saturating_sub(usize::from(doff >> 4) * 4)).unwrap_or(0);
    let (want_flags, want_seq, want_ack) = if flags & 0x10 != 0 {
        (0x04, ack, 0)
    } else {
        let len = data + u32::from(flags & 0x02 != 0) + u32::from(flags & 0x01 != 0);
        (0x14, 0, seq.wrapping_add(len))
    };
    let got = (out[at + 13], be32(out, at + 4), be32(out, at + 8));
    if got != (want_flags, Some(want_seq), Some(want_ack)) {
        found.push(violation(
            "reset_wrong_numbers",
            format!("got {got:?}, want {:?}", (want_flags, want_seq, want_ack)),
        ));
    }
}
