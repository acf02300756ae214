//! `cargo xtask fuzz`: a million random and mutated frames through the
//! datapath (`lb-userspace/tests/fuzz.rs`, root), its report written into
//! docs/fuzzing.md between the result markers.
//!
//! The test is built in the test profile like the rest of the suite (no
//! separate release build): the time per frame is the syscall's, not the
//! generator's.

use std::path::Path;

use anyhow::{Context as _, bail};

use crate::{cargo, run};

const DOC: &str = "docs/fuzzing.md";
/// The campaign's test in `lb-userspace/tests/fuzz.rs`.
const TEST: &str = "random_and_mutated_frames_keep_the_datapath_invariants";
const START: &str = "<!-- fuzz-results:start (written by `cargo xtask fuzz`) -->";
const END: &str = "<!-- fuzz-results:end -->";

/// Runs `frames` frames (from `seed`, else a fresh one) and updates the
/// report, also when the run finds a violation (then fails after).
pub(crate) fn run_fuzz(root: &Path, frames: u64, seed: Option<&str>) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("cargo xtask fuzz runs BPF_PROG_TEST_RUN: run it as root");
    }
    let report = root.join("target/fuzz-report.md");
    let _ = std::fs::remove_file(&report);
    let mut cmd = cargo();
    cmd.current_dir(root)
        .args(["test", "-p", "lb-userspace", "--test", "fuzz", "--"])
        .args([TEST, "--exact", "--nocapture"])
        .env("LB_FUZZ_FRAMES", frames.to_string())
        .env("LB_FUZZ_REPORT", &report)
        .env("RUST_BACKTRACE", "0");
    if let Some(seed) = seed {
        cmd.env("LB_FUZZ_SEED", seed);
    }
    let outcome = run(cmd);
    let results = std::fs::read_to_string(&report)
        .with_context(|| format!("the run wrote no report ({})", report.display()))?;
    write_results(&root.join(DOC), &results)?;
    eprintln!("[xtask] results written to {DOC}");
    outcome
}

/// Replaces what is between the markers of `doc` with `results`, headed
/// by the date and the kernel.
fn write_results(doc: &Path, results: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(doc).with_context(|| format!("read {}", doc.display()))?;
    let (Some(start), Some(end)) = (text.find(START), text.find(END)) else {
        bail!("{} lacks the result markers", doc.display());
    };
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".to_owned(), |k| k.trim().to_owned());
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .unwrap_or_default();
    let updated = format!(
        "{}{START}\n\nRun of {date}, kernel {kernel}, test profile build.\n\n{}\n{END}{}",
        &text[..start],
        results.trim_end(),
        &text[end + END.len()..]
    );
    std::fs::write(doc, updated).with_context(|| format!("write {}", doc.display()))
}
