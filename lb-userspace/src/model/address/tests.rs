//! Addresses read as Rust and Go's sloppy parser read them.

use std::net::IpAddr;

use super::{parse_ip_sloppy, parse_ipv6_plain};

#[test]
fn addresses_are_read_as_rust_reads_them_and_with_leading_zeros() {
    for text in [
        "10.0.0.1",
        "0.0.0.0",
        "255.255.255.255",
        "::",
        "::1",
        "fd00::a:b",
        "2001:db8:0:0:0:0:0:1",
        "::ffff:10.0.0.1",
        "64:ff9b::192.0.2.1",
    ] {
        assert_eq!(parse_ip_sloppy(text), text.parse().ok(), "{text}");
    }
    // Decimal octets with leading zeros, as Go's ParseIPSloppy.
    let ip = |text: &str| text.parse::<IpAddr>().ok();
    assert_eq!(parse_ip_sloppy("010.000.000.002"), ip("10.0.0.2"));
    assert_eq!(parse_ip_sloppy("0000255.1.1.1"), ip("255.1.1.1"));
    // Neither.
    for text in [
        "",
        "10.0.0",
        "10.0.0.1.",
        "10.0.0.256",
        "10..0.1",
        "+10.0.0.1",
        "10.0.0.1 ",
        "0x0a.0.0.1",
        "fd00::g",
        "fd00:::1",
        "010.0.0.1:80",
        "not-an-ip",
    ] {
        assert_eq!(parse_ip_sloppy(text), None, "{text}");
    }
}

/// Texts made of hex digit groups, colons and dots: the plain IPv6 reader
/// reads each as Rust does, or leaves it to Rust.
#[test]
fn the_plain_ipv6_reader_never_reads_an_address_otherwise_than_rust() {
    let pieces = [
        "", "0", "1", "ab", "fFf", "0db8", "12345", ":", "::", ".", "1.2.3.4", "g",
    ];
    let (mut read, mut texts) = (0, 0);
    // Every sequence of up to 4 pieces joined by single colons, and the
    // same with a leading and a trailing `::` (~68k texts).
    let mut sequences: Vec<Vec<&str>> = vec![vec![]];
    let mut last = sequences.clone();
    for _ in 0..4 {
        last = last
            .iter()
            .flat_map(|sequence| {
                pieces.iter().map(move |piece| {
                    let mut next = sequence.clone();
                    next.push(*piece);
                    next
                })
            })
            .collect();
        sequences.extend(last.iter().cloned());
    }
    for sequence in &sequences {
        let joined = sequence.join(":");
        for text in [joined.clone(), format!("::{joined}"), format!("{joined}::")] {
            texts += 1;
            if let Some(addr) = parse_ipv6_plain(text.as_bytes()) {
                assert_eq!(Some(addr), text.parse().ok(), "{text}");
                read += 1;
            }
            let expected = text.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6);
            if !text.contains('.') || expected.is_some() {
                assert_eq!(
                    parse_ip_sloppy(&text).filter(IpAddr::is_ipv6),
                    expected,
                    "{text}"
                );
            }
        }
    }
    assert!(read > 1000, "{read} of {texts} read");
    // Eight full groups, and the longest `::` forms.
    for text in [
        "1:2:3:4:5:6:7:8",
        "1:2:3:4:5:6:7::",
        "::2:3:4:5:6:7:8",
        "1::8",
    ] {
        assert_eq!(
            parse_ipv6_plain(text.as_bytes()),
            text.parse().ok(),
            "{text}"
        );
    }
    for text in [
        "1:2:3:4:5:6:7:8:9",
        "1:2:3:4:5:6:7:8::",
        "::1:2:3:4:5:6:7:8",
        "1:2",
    ] {
        assert_eq!(parse_ipv6_plain(text.as_bytes()), None, "{text}");
        assert_eq!(text.parse::<std::net::Ipv6Addr>().ok(), None, "{text}");
    }
}
