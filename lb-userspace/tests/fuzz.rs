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

use support::fuzz::{campaign, corpus::Services, rng::seed_from_env};
use support::prog_test::Fixture;

/// Invariants the datapath is known to break today, each with the issue
/// that tracks it. A violation of one of these is listed (printed with its
/// count), not failed; any other violation fails the test.
const KNOWN_DATAPATH_BUGS: &[(&str, &str)] = &[(
    "nat_ipv6_udp_zero_checksum",
    "issue 12, Lengths and checksums: an IPv6 UDP checksum that the \
     incremental update lands on 0 is left 0 (no BPF_F_MARK_MANGLED_0 for IPv6)",
)];

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
        "reject",
        "pass_no_service",
    ] {
        assert!(
            report.reasons.get(wanted).copied().unwrap_or(0) > 0,
            "seed {seed:#x}: no frame was counted under {wanted}"
        );
    }
}
