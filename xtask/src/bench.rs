//! `cargo xtask bench`: builds in release mode, runs the per-packet runner
//! (`lb-userspace/examples/datapath_cost.rs`, and `xdp_cost.rs`: XDP vs
//! TC), the end-to-end and
//! control-plane benchmarks, socket-level load balancing and the
//! `--forward=stack` vs `redirect` A/B (`lb-bench`), the lifecycle phases under
//! load (`lb-userspace/tests/harness_lifecycle*.rs`, run longer), then
//! renders the report.
//!
//! A stage that fails does not stop the others: the report is written with
//! what was measured, and the task exits non-zero naming the failed stages.
//! Numbers never fail it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, bail};
use serde_json::json;

use crate::{cargo, run, which};

/// Ignores SIGINT/SIGTERM in this process while a child runs, so that the
/// child (which gets Ctrl-C from the terminal too) can clean up its
/// namespaces and report before this task exits.
struct IgnoreSignals;

impl IgnoreSignals {
    fn new() -> Self {
        for signal in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: setting a signal disposition to SIG_IGN.
            unsafe { libc::signal(signal, libc::SIG_IGN) };
        }
        Self
    }
}

impl Drop for IgnoreSignals {
    fn drop(&mut self) {
        for signal in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: restoring the default disposition.
            unsafe { libc::signal(signal, libc::SIG_DFL) };
        }
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn text_of(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn stage(
    name: &str,
    mut cmd: Command,
    stages: &mut serde_json::Map<String, serde_json::Value>,
    failed: &mut Vec<String>,
) {
    eprintln!("\n[xtask] ==== {name}");
    let started = Instant::now();
    let outcome = {
        let _ignore = IgnoreSignals::new();
        cmd.env("RUST_BACKTRACE", "0");
        run(cmd)
    };
    let seconds = started.elapsed().as_secs_f64();
    if let Err(error) = &outcome {
        eprintln!("[xtask] {name} FAILED after {seconds:.0} s: {error:#}");
        failed.push(name.to_owned());
    } else {
        eprintln!("[xtask] {name} done in {seconds:.0} s");
    }
    stages.insert(
        name.to_owned(),
        json!({"seconds": seconds, "ok": outcome.is_ok()}),
    );
}

/// The lifecycle tests the benchmark runs longer.
const LIFECYCLE_TESTS: [&str; 2] = ["harness_lifecycle", "harness_lifecycle_flood"];

/// Builds `lb-userspace`'s lifecycle tests (release, or dev for QUICK)
/// and returns the paths of their executables.
fn lifecycle_tests(root: &Path, quick: bool) -> anyhow::Result<Vec<PathBuf>> {
    let mut build = cargo();
    build.current_dir(root).args([
        "test",
        "--no-run",
        "--message-format=json-render-diagnostics",
        "--package",
        "lb-userspace",
    ]);
    for test in LIFECYCLE_TESTS {
        build.args(["--test", test]);
    }
    if !quick {
        build.arg("--release");
    }
    let out = build.output().context("run cargo test --no-run")?;
    if !out.status.success() {
        bail!("cargo test --no-run failed ({})", out.status);
    }
    let messages: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect();
    LIFECYCLE_TESTS
        .iter()
        .map(|test| {
            messages
                .iter()
                .filter(|msg| msg["target"]["name"] == *test)
                .find_map(|msg| msg["executable"].as_str().map(PathBuf::from))
                .with_context(|| format!("cargo named no {test} executable"))
        })
        .collect()
}

/// Runs the lifecycle phases: the same as the test suite's, longer
/// (`--quick`: shorter); the flood phase too, ignored in the suite while it
/// fails. Each phase writes DIR/lifecycle-PHASE.json, with the violations
/// of its proof (if any).
fn lifecycle_stage(
    root: &Path,
    quick: bool,
    dir: &Path,
    stages: &mut serde_json::Map<String, serde_json::Value>,
    failed: &mut Vec<String>,
) {
    let tests = match lifecycle_tests(root, quick) {
        Ok(tests) => tests,
        Err(error) => {
            eprintln!("[xtask] lifecycle: cannot build the tests: {error:#}");
            failed.push("lifecycle".to_owned());
            return;
        }
    };
    let (scale, changes) = if quick { ("0.5", "30") } else { ("5", "300") };
    let mut outcome = Vec::new();
    for (name, test) in LIFECYCLE_TESTS.iter().zip(tests) {
        let mut cmd = Command::new(test);
        cmd.args(["--include-ignored", "--test-threads=1", "--nocapture"])
            .env("LB_LIFECYCLE_OUT", dir)
            .env("LB_LIFECYCLE_SCALE", scale)
            .env("LB_LIFECYCLE_CHANGES", changes);
        stage(name, cmd, stages, &mut outcome);
    }
    // A phase whose proof failed still wrote its counts, which the report
    // shows with the violations: numbers never fail the benchmarks (the
    // test suite is where they must hold). A phase that wrote nothing did
    // not run: that is a failure.
    let missing: Vec<&str> = ["sigkill", "upgrade", "churn", "flood"]
        .into_iter()
        .filter(|phase| !dir.join(format!("lifecycle-{phase}.json")).exists())
        .collect();
    if !missing.is_empty() {
        eprintln!("[xtask] lifecycle: no results of {}", missing.join(", "));
        failed.push("lifecycle".to_owned());
    } else if !outcome.is_empty() {
        eprintln!("[xtask] lifecycle: proofs failed; their counts are in the report");
    }
}

/// Runs the benchmarks.
///
/// # Errors
/// Not root, the build failed, or a stage failed.
#[expect(clippy::too_many_lines, reason = "the stages in order, one block each")]
pub fn run_bench(root: &Path, quick: bool, only: &[String]) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the benchmarks load eBPF programs and create network namespaces: run as root");
    }
    if which("bpf-linker").is_none() {
        bail!("bpf-linker not found on PATH: run `cargo xtask setup` (scripts/setup.sh)");
    }
    let wants = |part: &str| only.is_empty() || only.iter().any(|o| o == part);
    let started = Instant::now();
    // What is built and measured: taken now, before the build (the tree
    // may change while the benchmarks run).
    let commit =
        text_of(
            Command::new("git")
                .current_dir(root)
                .args(["rev-parse", "--short", "HEAD"]),
        )
        .unwrap_or_default();
    let dirty = text_of(Command::new("git").current_dir(root).args([
        "status",
        "--porcelain",
        "--untracked-files=no",
    ]))
    .is_some_and(|s| !s.is_empty());
    // A full run measures release builds. The smoke run checks that every
    // part still works, so it reuses the dev builds the test suite made.
    let profile = if quick { "debug" } else { "release" };
    eprintln!("[xtask] building ({profile}): lb, datapath_cost, xdp_cost, lb-bench");
    let mut build = cargo();
    build.current_dir(root).arg("build");
    if !quick {
        build.arg("--release");
    }
    build.args([
        "--package",
        "lb-userspace",
        "--package",
        "lb-bench",
        "--bin",
        "lb",
        "--bin",
        "lb-bench",
        "--example",
        "datapath_cost",
        "--example",
        "maglev_build",
        "--example",
        "xdp_cost",
    ]);
    run(build)?;
    let release = root.join("target").join(profile);

    let date =
        text_of(Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])).unwrap_or_default();
    let stamp: String = date.chars().filter(char::is_ascii_alphanumeric).collect();
    let dir: PathBuf = root
        .join("docs/bench-results")
        .join(format!("{stamp}{}", if quick { "-quick" } else { "" }));
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    eprintln!("[xtask] results: {}", dir.display());

    let mut stages = serde_json::Map::new();
    let mut failed = Vec::new();
    if wants("datapath") {
        let mut cmd = Command::new(release.join("examples/datapath_cost"));
        cmd.arg("--json").arg(dir.join("datapath.json"));
        if quick {
            cmd.arg("--quick");
        }
        stage("datapath", cmd, &mut stages, &mut failed);
    }
    if wants("xdp") {
        let mut cmd = Command::new(release.join("examples/xdp_cost"));
        cmd.arg("--json").arg(dir.join("xdp.json"));
        if quick {
            cmd.arg("--quick");
        }
        stage("xdp", cmd, &mut stages, &mut failed);
    }
    if wants("maglev") {
        let mut cmd = Command::new(release.join("examples/maglev_build"));
        cmd.arg("--json").arg(dir.join("maglev.json"));
        if quick {
            cmd.arg("--quick");
        }
        stage("maglev", cmd, &mut stages, &mut failed);
    }
    if wants("e2e") {
        let mut cmd = Command::new(release.join("lb-bench"));
        cmd.arg("run")
            .arg("--lb")
            .arg(release.join("lb"))
            .arg("--json")
            .arg(dir.join("e2e.json"));
        if quick {
            cmd.arg("--quick");
        }
        stage("e2e", cmd, &mut stages, &mut failed);
    }
    if wants("socklb") {
        let mut cmd = Command::new(release.join("lb-bench"));
        cmd.arg("socklb")
            .arg("--lb")
            .arg(release.join("lb"))
            .arg("--json")
            .arg(dir.join("socklb.json"));
        if quick {
            cmd.arg("--quick");
        }
        stage("socklb", cmd, &mut stages, &mut failed);
    }
    if wants("forward") {
        let mut cmd = Command::new(release.join("lb-bench"));
        cmd.arg("forward")
            .arg("--lb")
            .arg(release.join("lb"))
            .arg("--json")
            .arg(dir.join("forward.json"));
        if quick {
            cmd.arg("--quick");
        }
        stage("forward", cmd, &mut stages, &mut failed);
    }
    if wants("xdp-e2e") {
        let mut cmd = Command::new(release.join("lb-bench"));
        cmd.arg("xdp-e2e")
            .arg("--lb")
            .arg(release.join("lb"))
            .arg("--json")
            .arg(dir.join("xdp-e2e.json"));
        if quick {
            cmd.arg("--quick");
        }
        stage("xdp-e2e", cmd, &mut stages, &mut failed);
    }

    if wants("lifecycle") {
        lifecycle_stage(root, quick, &dir, &mut stages, &mut failed);
    }

    let run_info = json!({
        "quick": quick,
        "date": date,
        "commit": if dirty { format!("{commit} (with uncommitted changes)") } else { commit },
        "total_s": started.elapsed().as_secs_f64(),
        "stages": stages,
    });
    std::fs::write(
        dir.join("run.json"),
        serde_json::to_string_pretty(&run_info)?,
    )?;

    let mut report = Command::new(release.join("lb-bench"));
    report.arg("report").arg("--dir").arg(&dir);
    // Only a complete full run replaces the committed report.
    if !quick && only.is_empty() && failed.is_empty() {
        report.arg("--publish").arg(root.join("docs"));
    }
    run(report)?;
    eprintln!(
        "[xtask] benchmarks finished in {:.0} s; report: {}",
        started.elapsed().as_secs_f64(),
        dir.join("benchmarks.md").display()
    );
    if !failed.is_empty() {
        bail!("benchmark stages failed: {}", failed.join(", "));
    }
    Ok(())
}
