//! Fuzzing the datapath (root): random and mutated frames through the
//! real TC program with `BPF_PROG_TEST_RUN`, each outcome checked against
//! the invariants in `support::fuzz::check`, conntrack growth held to the
//! flows the frames may open (see `support::fuzz`).
//!
//! A short run (`LB_FUZZ_FRAMES`, default 20 000) is part of the test
//! suite; `cargo xtask fuzz` runs a million and writes docs/fuzzing.md.
//! The seed is printed; `LB_FUZZ_SEED` replays a run frame for frame.
//! `LB_FUZZ_REPORT=FILE` also writes the report (Markdown) there.

mod support;

use std::net::SocketAddr;

use support::fuzz::check::{Outcome, check};
use support::fuzz::corpus::{Services, Spec};
use support::fuzz::parse::{UDP, fix_checksums};
use support::fuzz::{campaign, rng::seed_from_env};
use support::prog_test::{Fixture, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT};

/// Invariants the datapath is known to break today, each with the issue
/// that tracks it. A violation of one of these is listed (printed with its
/// count), not failed; any other violation fails the test.
const KNOWN_DATAPATH_BUGS: &[(&str, &str)] = &[];

fn frames_from_env() -> u64 {
    std::env::var("LB_FUZZ_FRAMES").map_or(20_000, |text| {
        text.trim()
            .replace('_', "")
            .parse()
            .unwrap_or_else(|_| panic!("LB_FUZZ_FRAMES={text} is not a number"))
    })
}

#[test]
fn random_and_mutated_frames_keep_the_datapath_invariants() {
    let Some(mut fx) = Fixture::new("random_and_mutated_frames_keep_the_datapath_invariants")
    else {
        return;
    };
    let services = Services::new();
    services.install(&mut fx);
    let seed = seed_from_env();
    let frames = frames_from_env();
    println!("fuzz: seed {seed:#x} (replay with LB_FUZZ_SEED={seed:#x}), {frames} frames");
    let report = campaign::run(&mut fx, &services, seed, frames);
    let text = campaign::markdown(&report, KNOWN_DATAPATH_BUGS);
    println!("{text}");
    if let Ok(path) = std::env::var("LB_FUZZ_REPORT") {
        std::fs::write(&path, &text).unwrap_or_else(|e| panic!("writing {path}: {e}"));
    }
    for (invariant, note) in KNOWN_DATAPATH_BUGS {
        let frames_seen = report.violations.get(invariant).map_or(0, |(n, _)| *n);
        println!("known datapath bug `{invariant}` ({note}): {frames_seen} frames");
    }
    let unexplained: Vec<&str> = report
        .violations
        .keys()
        .copied()
        .filter(|invariant| {
            !KNOWN_DATAPATH_BUGS
                .iter()
                .any(|(known, _)| known == invariant)
        })
        .collect();
    assert!(
        unexplained.is_empty(),
        "seed {seed:#x}: invariants broken: {unexplained:?} (see the report above)"
    );
    // Every reason family was reached: the corpus does reach the program.
    for wanted in [
        "nat_new",
        "nat_established",
        "nat_reply",
        "nat_icmp_error",
        "reject",
        "pass_no_service",
    ] {
        assert!(
            report.reasons.get(wanted).copied().unwrap_or(0) > 0,
            "seed {seed:#x}: no frame was counted under {wanted}"
        );
    }
}

/// The checks themselves (no root needed): a right outcome passes them,
/// outcomes broken on purpose are each caught under their invariant.
#[test]
fn the_invariant_checks_catch_broken_outcomes() {
    let services = Services::new();
    let relevant = services.relevant_bytes();
    let at = |s: &str| s.parse::<SocketAddr>().unwrap();
    let (client, vip, backend) = (
        at("198.18.1.2:40000"),
        at("198.19.0.10:53"),
        at("198.18.2.2:8080"),
    );
    let input = Spec::new(client, vip, UDP).bytes();
    let caught =
        |input: &[u8], out: &[u8], action: u32, reason: &'static str| -> Vec<&'static str> {
            let outcome = Outcome {
                action,
                out,
                reason,
            };
            let found = check(&services, &relevant, input, &outcome);
            found.into_iter().map(|v| v.invariant).collect()
        };
    let translated = Spec::new(client, backend, UDP).bytes();
    assert_eq!(caught(&input, &translated, TC_ACT_OK, "nat_new"), [""; 0]);
    assert_eq!(
        caught(&input, &input, TC_ACT_OK, "pass_no_service"),
        [""; 0]
    );

    let mut ttl = translated.clone();
    ttl[22] -= 1;
    fix_checksums(&mut ttl);
    assert_eq!(
        caught(&input, &ttl, TC_ACT_OK, "nat_new"),
        ["nat_changed_other_bytes"]
    );
    let mut bad = translated.clone();
    bad[40] ^= 1;
    assert_eq!(
        caught(&input, &bad, TC_ACT_OK, "nat_new"),
        ["nat_bad_l4_checksum"]
    );
    let elsewhere = Spec::new(client, at("198.18.9.9:8080"), UDP).bytes();
    assert_eq!(
        caught(&input, &elsewhere, TC_ACT_OK, "nat_new"),
        ["nat_not_to_a_backend"]
    );
    assert_eq!(
        caught(&input, &translated, TC_ACT_OK, "pass_no_service"),
        ["pass_changed_frame"]
    );
    assert_eq!(
        caught(&input, &input, 3, "pass_no_service"),
        ["verdict_outside_set", "pass_not_ok"]
    );
    assert_eq!(
        caught(&input, &input, TC_ACT_OK, "frobnicated"),
        ["unknown_reason"]
    );
    let stranger = Spec::new(at("10.0.0.1:1"), at("10.0.0.2:2"), UDP).bytes();
    assert_eq!(
        caught(&stranger, &[], TC_ACT_SHOT, "drop_source_range"),
        ["non_service_not_passed"]
    );

    // A port unreachable as the datapath builds it, then broken.
    let mut unreachable = input[6..12].to_vec();
    unreachable.extend(&input[0..6]);
    unreachable.extend([0x08, 0x00, 0x45, 0xc0, 0, 56, 0, 0, 0, 0, 64, 1, 0, 0]);
    unreachable.extend(&input[30..34]);
    unreachable.extend(&input[26..30]);
    unreachable.extend([3, 3, 0, 0, 0, 0, 0, 0]);
    unreachable.extend(&input[14..42]);
    fix_checksums(&mut unreachable);
    assert_eq!(
        caught(&input, &unreachable, TC_ACT_REDIRECT, "reject"),
        [""; 0]
    );
    let mut misquoted = unreachable.clone();
    misquoted[70 - 1] ^= 1;
    fix_checksums(&mut misquoted);
    assert_eq!(
        caught(&input, &misquoted, TC_ACT_REDIRECT, "reject"),
        ["reject_bad_quote"]
    );
    let mut misaddressed = unreachable.clone();
    misaddressed[33] ^= 1;
    fix_checksums(&mut misaddressed);
    assert_eq!(
        caught(&input, &misaddressed, TC_ACT_REDIRECT, "reject"),
        ["reject_not_back_to_sender"]
    );
}
