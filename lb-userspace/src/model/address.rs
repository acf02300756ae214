//! IP addresses as kube-proxy reads them, fast enough for a first list:
//! at 100k Services it holds 2M endpoint addresses, which Rust's parsers
//! read at ~450 (IPv4, tried twice) and ~640 (IPv6) instructions each.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An address as kube-proxy's `ParseIPSloppy` reads it (cluster IPs,
/// external and ingress IPs, endpoint addresses, source ranges): IPv4
/// octets may carry leading zeros (decimal, not octal), which the API
/// server accepted before Kubernetes 1.22; anything else as Rust parses it.
pub(super) fn parse_ip_sloppy(text: &str) -> Option<IpAddr> {
    let bytes = text.as_bytes();
    if let Some(addr) = parse_ipv4_sloppy(bytes) {
        return Some(IpAddr::V4(addr));
    }
    // No IPv4 address has a colon; every IPv6 address has one.
    if !bytes.contains(&b':') {
        return None;
    }
    parse_ipv6_plain(bytes)
        .or_else(|| text.parse().ok())
        .map(IpAddr::V6)
}

/// An IPv4 address whose octets may carry leading zeros (any number of
/// them, as Go's sloppy parser); what Rust's parser reads, this reads the
/// same.
fn parse_ipv4_sloppy(text: &[u8]) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let (mut index, mut value, mut digits) = (0, 0u32, 0);
    for &byte in text {
        match byte {
            b'0'..=b'9' => {
                value = value * 10 + u32::from(byte - b'0');
                digits += 1;
                if value > 255 {
                    return None;
                }
            }
            b'.' if digits > 0 && index < 3 => {
                octets[index] = u8::try_from(value).ok()?;
                (index, value, digits) = (index + 1, 0, 0);
            }
            _ => return None,
        }
    }
    if digits == 0 || index != 3 {
        return None;
    }
    octets[3] = u8::try_from(value).ok()?;
    Some(Ipv4Addr::from(octets))
}

/// An IPv6 address of hex groups only (at most one `::`, no IPv4 tail):
/// what Rust's parser reads the same; `None` for anything else, which
/// Rust's parser then reads or refuses.
fn parse_ipv6_plain(text: &[u8]) -> Option<Ipv6Addr> {
    // The groups before the `::` (or all of them), then those after it.
    let mut groups = [0u16; 8];
    let (mut count, mut gap_at) = (0, None);
    let mut at = 0;
    if text.starts_with(b"::") {
        gap_at = Some(0);
        at = 2;
    }
    while at < text.len() {
        let (mut value, start) = (0u16, at);
        while let Some(digit) = text.get(at).and_then(|&byte| char::from(byte).to_digit(16)) {
            if at - start == 4 {
                return None;
            }
            value = value << 4 | u16::try_from(digit).ok()?;
            at += 1;
        }
        if at == start || count == 8 {
            return None;
        }
        groups[count] = value;
        count += 1;
        match text.get(at) {
            None => break,
            Some(b':') => at += 1,
            Some(_) => return None,
        }
        if text.get(at) == Some(&b':') {
            if gap_at.is_some() {
                return None;
            }
            gap_at = Some(count);
            at += 1;
        } else if at == text.len() {
            // A single colon at the end.
            return None;
        }
    }
    match gap_at {
        // `::` stands for one group or more.
        Some(gap) if count < 8 => {
            let tail = count - gap;
            groups.copy_within(gap..count, 8 - tail);
            groups[gap..8 - tail].fill(0);
        }
        None if count == 8 => {}
        _ => return None,
    }
    Some(Ipv6Addr::from(groups))
}

#[cfg(test)]
mod tests;
