//! The fuzzing loop: generate a frame, run it through the program, read
//! which reason counted it, check the outcome; every epoch, hold the
//! growth of conntrack and affinity entries to what the epoch's frames may
//! create. Then the report.

use std::{collections::BTreeMap, fmt::Write as _, time::Instant};

use aya::programs::{TestRun, TestRunOptions};

use super::check::{Outcome, Violation, check};
use super::corpus::{Services, icmp_error_about, random_frame, reply_to, to_service};
use super::mutate::mutate;
use super::parse::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6};
use super::rng::Rng;
use super::state::GrownMaps;
use crate::support::prog_test::Fixture;

/// Frames per epoch: conntrack is counted and emptied after each.
const EPOCH: u64 = 2000;
/// Translated frames kept to build replies and ICMP errors from.
const RECENT: usize = 64;
/// Examples kept per broken invariant.
const EXAMPLES: usize = 3;

/// One frame that broke an invariant, enough to replay it.
#[derive(Clone, Debug)]
pub(crate) struct Example {
    pub(crate) index: u64,
    pub(crate) origin: String,
    pub(crate) reason: &'static str,
    pub(crate) detail: String,
    pub(crate) frame: Vec<u8>,
}

/// What a run saw.
#[derive(Debug, Default)]
pub(crate) struct Report {
    pub(crate) seed: u64,
    pub(crate) frames: u64,
    /// Frames `BPF_PROG_TEST_RUN` refused (shorter than an Ethernet header,
    /// or an IP `EtherType` with an incomplete IP header): never reached
    /// the program, so not counted under any reason.
    pub(crate) refused_by_kernel: u64,
    pub(crate) reasons: BTreeMap<&'static str, u64>,
    pub(crate) origins: BTreeMap<String, u64>,
    pub(crate) violations: BTreeMap<&'static str, (u64, Vec<Example>)>,
    pub(crate) epochs: u64,
    pub(crate) max_conntrack_per_epoch: usize,
    /// Conntrack and affinity entries created, over all epochs.
    pub(crate) conntrack_entries: usize,
    pub(crate) affinity_entries: usize,
    /// Their bounds: 2 per `nat_new` + 1 per `nat_established`; 1 per
    /// `nat_new`.
    pub(crate) conntrack_bound: usize,
    pub(crate) affinity_bound: usize,
    /// Frames expected to be refused by the kernel that it ran.
    pub(crate) accepted_short: u64,
    pub(crate) seconds: f64,
}

impl Report {
    fn violate(&mut self, violation: Violation, example: impl FnOnce(String) -> Example) {
        let entry = self.violations.entry(violation.invariant).or_default();
        entry.0 += 1;
        if entry.1.len() < EXAMPLES {
            entry.1.push(example(violation.detail));
        }
    }

    pub(crate) fn violation_count(&self) -> u64 {
        self.violations.values().map(|(n, _)| n).sum()
    }
}

/// Whether the kernel is expected to refuse `frame` before the program
/// runs: shorter than an Ethernet header, or an IPv4 / IPv6 `EtherType`
/// (untagged) without a whole IP header behind it.
fn kernel_refuses(frame: &[u8]) -> bool {
    if frame.len() < ETH_HLEN {
        return true;
    }
    match u16::from_be_bytes([frame[12], frame[13]]) {
        ETH_P_IP => frame.len() < ETH_HLEN + 20,
        ETH_P_IPV6 => frame.len() < ETH_HLEN + 40,
        _ => false,
    }
}

/// Generates the next frame; returns it and where it came from.
fn generate(rng: &mut Rng, services: &Services, recent: &[Vec<u8>]) -> (Vec<u8>, String) {
    let roll = rng.below(100);
    let (mut frame, base, mutate_percent) = if roll < 20 {
        return (random_frame(rng, services), "random".to_owned());
    } else if roll < 72 || recent.is_empty() {
        (to_service(rng, services).bytes(), "service", 70)
    } else if roll < 88 {
        let about = rng.pick(recent).clone();
        match reply_to(rng, &about) {
            Some(spec) => (spec.bytes(), "reply", 50),
            None => (to_service(rng, services).bytes(), "service", 70),
        }
    } else {
        let about = rng.pick(recent).clone();
        match icmp_error_about(rng, &about) {
            Some(frame) => (frame, "icmp_error", 40),
            None => (to_service(rng, services).bytes(), "service", 70),
        }
    };
    if !rng.chance(mutate_percent) {
        return (frame, base.to_owned());
    }
    let mut kinds = Vec::new();
    for _ in 0..rng.range(1, 3) {
        if frame.is_empty() {
            break;
        }
        kinds.push(mutate(rng, services, &mut frame));
    }
    (frame, format!("{base}+{}", kinds.join("+")))
}

fn reason_totals(fx: &Fixture) -> Vec<(&'static str, u64)> {
    fx.maps.reason_counts().expect("read the reasons map")
}

/// The loop's state between frames.
struct Campaign<'a> {
    services: &'a Services,
    relevant: Vec<Vec<u8>>,
    rng: Rng,
    report: Report,
    grown: GrownMaps,
    /// Translated frames (outputs) of this epoch.
    recent: Vec<Vec<u8>>,
    /// Reason counters before the next frame.
    before: Vec<(&'static str, u64)>,
    /// This epoch's `nat_new` and `nat_established` frames.
    epoch_flows: (usize, usize),
    out: Vec<u8>,
}

/// Runs `frames` frames from `seed` through `fx`'s program (with
/// `services` installed).
pub(crate) fn run(fx: &mut Fixture, services: &Services, seed: u64, frames: u64) -> Report {
    let started = Instant::now();
    let mut grown = GrownMaps::open(&fx.pin_path);
    grown.count_and_clear();
    let mut campaign = Campaign {
        services,
        relevant: services.relevant_bytes(),
        rng: Rng::new(seed),
        report: Report {
            seed,
            frames,
            ..Report::default()
        },
        grown,
        recent: Vec::new(),
        before: reason_totals(fx),
        epoch_flows: (0, 0),
        out: vec![0u8; 4096],
    };
    for index in 0..frames {
        campaign.frame(fx, index);
        if (index + 1) % EPOCH == 0 || index + 1 == frames {
            campaign.end_epoch(index);
        }
    }
    let mut report = campaign.report;
    report.seconds = started.elapsed().as_secs_f64();
    report
}

impl Campaign<'_> {
    /// Generates, runs and checks frame `index`.
    fn frame(&mut self, fx: &mut Fixture, index: u64) {
        let (frame, origin) = generate(&mut self.rng, self.services, &self.recent);
        let report = &mut self.report;
        let generic = origin.split('+').next().unwrap_or("").to_owned();
        *report.origins.entry(generic).or_default() += 1;
        for kind in origin.split('+').skip(1) {
            *report
                .origins
                .entry(format!("mutation: {kind}"))
                .or_default() += 1;
        }
        let example = |reason: &'static str| {
            let (frame, origin) = (frame.clone(), origin.clone());
            move |detail| Example {
                index,
                origin,
                reason,
                detail,
                frame,
            }
        };
        let broken = |invariant, detail| Violation { invariant, detail };
        let result = fx.program().test_run(TestRunOptions {
            data_in: Some(&frame),
            data_out: Some(&mut self.out),
            ..TestRunOptions::default()
        });
        let after = reason_totals(fx);
        let counted: Vec<(&'static str, u64)> = after
            .iter()
            .zip(&self.before)
            .filter(|(a, b)| a.1 != b.1)
            .map(|(a, b)| (a.0, a.1 - b.1))
            .collect();
        self.before = after;
        let result = match result {
            Ok(result) => result,
            Err(error) => {
                report.refused_by_kernel += 1;
                if !kernel_refuses(&frame) {
                    let detail = format!("{error}");
                    report.violate(broken("kernel_refused_unexpectedly", detail), example("-"));
                }
                if !counted.is_empty() {
                    let detail = format!("{counted:?}");
                    report.violate(broken("refused_frame_counted", detail), example("-"));
                }
                return;
            }
        };
        if kernel_refuses(&frame) {
            // Another kernel may run what this one refuses: then the
            // outcome is checked like any other.
            report.accepted_short += 1;
        }
        let [(reason, 1)] = counted.as_slice() else {
            let detail = format!("reason counters moved by {counted:?}");
            report.violate(broken("not_counted_once", detail), example("-"));
            return;
        };
        let reason = *reason;
        *report.reasons.entry(reason).or_default() += 1;
        let len = usize::try_from(result.data_size_out).map_or(0, |n| n.min(self.out.len()));
        let output = &self.out[..len];
        let outcome = Outcome {
            action: result.return_value,
            out: output,
            reason,
        };
        for violation in check(self.services, &self.relevant, &frame, &outcome) {
            report.violate(violation, example(reason));
        }
        match reason {
            "nat_new" => self.epoch_flows.0 += 1,
            "nat_established" => self.epoch_flows.1 += 1,
            _ => {}
        }
        if reason.starts_with("nat_") {
            if self.recent.len() == RECENT {
                self.recent.swap_remove(self.rng.below(RECENT));
            }
            self.recent.push(output.to_vec());
        }
    }

    /// Counts and empties conntrack and affinity: a new flow writes at
    /// most a service and a reply entry (and one affinity entry), a packet
    /// of a tracked flow at most re-creates its reply entry, nothing else
    /// writes.
    fn end_epoch(&mut self, index: u64) {
        let counted = self.grown.count_and_clear();
        let (new, established) = std::mem::take(&mut self.epoch_flows);
        self.recent.clear();
        let report = &mut self.report;
        report.epochs += 1;
        report.max_conntrack_per_epoch = report.max_conntrack_per_epoch.max(counted.conntrack);
        report.conntrack_entries += counted.conntrack;
        report.affinity_entries += counted.affinity;
        report.conntrack_bound += 2 * new + established;
        report.affinity_bound += new;
        for (invariant, entries, limit) in [
            (
                "conntrack_growth_unbounded",
                counted.conntrack,
                2 * new + established,
            ),
            ("affinity_growth_unbounded", counted.affinity, new),
        ] {
            if entries > limit {
                let violation = Violation {
                    invariant,
                    detail: format!("{entries} entries, at most {limit} allowed"),
                };
                report.violate(violation, |detail| Example {
                    index,
                    origin: "epoch".to_owned(),
                    reason: "-",
                    detail,
                    frame: Vec::new(),
                });
            }
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The report as Markdown: the run, frames per reason and per origin,
/// violations with replayable examples, and `known` (invariant, note)
/// pairs listed as known datapath bugs.
pub(crate) fn markdown(report: &Report, known: &[(&str, &str)]) -> String {
    let mut md = String::new();
    let frames = f64::from(u32::try_from(report.frames).unwrap_or(u32::MAX));
    let rate = frames / report.seconds.max(1e-9);
    let _ = writeln!(
        md,
        "Seed `{:#x}` (replay: `LB_FUZZ_SEED={:#x}`), {} frames in {:.1} s ({:.0} frames/s), \
         {} epochs of up to {EPOCH} frames, at most {} conntrack entries in one epoch.\n",
        report.seed,
        report.seed,
        report.frames,
        report.seconds,
        rate,
        report.epochs,
        report.max_conntrack_per_epoch
    );
    let _ = writeln!(
        md,
        "Map growth: {} conntrack entries created (bound: {}, two per `nat_new` and one per \
         `nat_established`), {} affinity entries (bound: {}, one per `nat_new`).\n",
        report.conntrack_entries,
        report.conntrack_bound,
        report.affinity_entries,
        report.affinity_bound
    );
    let _ = writeln!(md, "| Verdict reason | Frames |\n|---|---:|");
    for (reason, count) in &report.reasons {
        let _ = writeln!(md, "| `{reason}` | {count} |");
    }
    let _ = writeln!(
        md,
        "| refused by the kernel (never reached the program) | {} |\n",
        report.refused_by_kernel
    );
    if report.accepted_short > 0 {
        let _ = writeln!(
            md,
            "This kernel ran {} frames the fuzzer expected it to refuse (checked like any other).\n",
            report.accepted_short
        );
    }
    let _ = writeln!(md, "| Origin / mutation | Frames |\n|---|---:|");
    for (origin, count) in &report.origins {
        let _ = writeln!(md, "| {origin} | {count} |");
    }
    let _ = writeln!(
        md,
        "\nInvariant violations: {}.\n",
        report.violation_count()
    );
    for (invariant, (count, examples)) in &report.violations {
        let note = known
            .iter()
            .find(|(name, _)| name == invariant)
            .map_or(String::new(), |(_, note)| {
                format!(" (known datapath bug: {note})")
            });
        let _ = writeln!(md, "- `{invariant}`: {count} frames{note}");
        for e in examples {
            let _ = writeln!(
                md,
                "  - frame {} ({}, reason `{}`): {}\n    `{}`",
                e.index,
                e.origin,
                e.reason,
                e.detail,
                hex(&e.frame)
            );
        }
    }
    md
}
