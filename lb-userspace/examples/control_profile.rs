//! Where the control plane's memory and CPU go, phase by phase, for a
//! manifest directory (userspace only: no root, no maps, no program).
//!
//! ```text
//! lb-bench manifests --services 100000 --dir /tmp/m100k
//! control_profile /tmp/m100k [--changes N]
//! ```
//!
//! Runs the agent's pipeline on the file source as `lb agent` does on its
//! first sync (the first read file by file into the model, the commit, the
//! plan over everything, the plan applied to the agent's state, the plan
//! index; the agent plans and applies a cold start's plan in pieces while
//! they are written, here one after the other), then N endpoint changes (one address of one file rewritten, as
//! `lb-bench` does, and looked at as inotify names it; their times, and of
//! those the source's re-read of the file). For each phase: CPU time (user + system), the heap
//! alive after it and its peak during it (a counting allocator, as
//! heaptrack counts), and the process's `VmRSS` / `VmHWM`. The map writes
//! themselves are not here (they are the kernel's); their userspace
//! buffers are a batch of 64k ops at most.

#![expect(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "byte counts and times printed as MiB and ms"
)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use lb_userspace::model::{Incremental, NodeContext};
use lb_userspace::plan::{self, DatapathState, PlanIndex};
use lb_userspace::source::{SourceUpdate, file::DirState};

/// The system allocator, counting the bytes alive and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let live = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

// SAFETY: every call is forwarded to `System` unchanged; only counts are kept.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            grew(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            grew(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            grew(new_size);
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const MIB: f64 = 1024.0 * 1024.0;

fn cpu_ms() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &raw mut usage);
        usage
    };
    let ms = |t: libc::timeval| t.tv_sec as f64 * 1000.0 + t.tv_usec as f64 / 1000.0;
    ms(usage.ru_utime) + ms(usage.ru_stime)
}

fn status_mib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status.lines().find_map(|line| {
                line.strip_prefix(field)?
                    .strip_prefix(':')?
                    .trim()
                    .strip_suffix("kB")?
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

/// Times one phase and prints its line.
fn phase<T>(name: &str, work: impl FnOnce() -> T) -> T {
    PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
    let cpu = cpu_ms();
    let wall = Instant::now();
    let out = work();
    println!(
        "| {name} | {:.0} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} |",
        cpu_ms() - cpu,
        wall.elapsed().as_secs_f64() * 1000.0,
        LIVE.load(Ordering::Relaxed) as f64 / MIB,
        PEAK.load(Ordering::Relaxed) as f64 / MIB,
        status_mib("VmRSS"),
        status_mib("VmHWM"),
    );
    out
}

/// Rewrites one endpoint address of the first file of `dir` (temporary
/// file + rename); `k` picks the address. Returns the file's name (what
/// inotify tells the agent).
fn change_one(dir: &Path, k: u32) -> String {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("list")
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    let file = &files[0];
    let text = std::fs::read_to_string(file).expect("read");
    // The first endpoint address of the first IPv4 slice.
    let at = text.find("\"addresses\":[\"").expect("an endpoint") + 14;
    let end = at + text[at..].find('"').expect("address end");
    let new = format!("198.18.3.{}", k % 250 + 1);
    let text = format!("{}{new}{}", &text[..at], &text[end..]);
    let tmp = dir.join(".change.tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, file).expect("rename");
    file.file_name()
        .and_then(|name| name.to_str())
        .expect("a UTF-8 name")
        .to_owned()
}

fn main() {
    // The agent's setting (main.rs): one malloc arena.
    // SAFETY: mallopt before any thread starts.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    let args: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(
        args.get(1)
            .expect("usage: control_profile DIR [--changes N]"),
    );
    let changes: u32 = args
        .iter()
        .position(|a| a == "--changes")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(20);

    println!(
        "| phase | CPU ms | wall ms | heap alive MiB | heap peak MiB | VmRSS MiB | VmHWM MiB |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let total_cpu = cpu_ms();
    let mut model = Incremental::new(NodeContext::default());
    let mut source = DirState::new(&dir);
    // As the agent's file source reads and its loop feeds: the plain
    // objects come as records, the rest prepared per part (on one thread
    // here).
    phase("read + feed the model", || {
        let rest = source
            .refresh_streaming(&mut |mut part| {
                part.prepare();
                drop(part.feed(&mut model));
            })
            .expect("read dir");
        if let Some(SourceUpdate::Changes(mut rest)) = rest {
            rest.prepare();
            drop(rest.feed(&mut model));
        }
    });
    // As the agent's first sync: the plan over everything needs no changes.
    phase("model commit", || model.commit_for_full_plan());
    let mut state = DatapathState::default();
    let mut plan = phase("plan (diff over everything)", || {
        plan::diff(&state, model.frontends())
    });
    let ops = std::mem::take(&mut plan.ops);
    let ops_len = ops.len();
    let sizes = phase("apply the plan to the state", || {
        plan::apply_owned_to_state(&mut state, ops)
    });
    drop(plan);
    phase("repack the state", || sizes.repack_grown(&mut state));
    let mut index = phase("plan index", || PlanIndex::new(&state, model.frontends()));
    println!(
        "\nfirst sync: {ops_len} ops, {} frontends, {} backends; CPU {:.0} ms in all\n",
        state.frontends.len(),
        state.backends.len(),
        cpu_ms() - total_cpu
    );

    let mut times = Vec::new();
    let mut reads = Vec::new();
    for k in 0..changes {
        let named = std::collections::BTreeSet::from([change_one(&dir, k)]);
        let started = Instant::now();
        // As the agent looks after inotify named the file.
        let Ok(Some(SourceUpdate::Changes(update))) = source.refresh_files(&named) else {
            panic!("the change is seen as changes");
        };
        reads.push(started.elapsed().as_secs_f64() * 1000.0);
        drop(update.feed(&mut model));
        let touched = model.commit();
        let mut plan = plan::diff_changes(&state, &mut index, model.frontends(), &touched);
        index.note_applied(&state, &plan.ops);
        let sizes = plan::apply_owned_to_state(&mut state, std::mem::take(&mut plan.ops));
        sizes.repack_grown(&mut state);
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    reads.sort_by(f64::total_cmp);
    if !times.is_empty() {
        let at = |times: &[f64], q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
        println!(
            "{changes} changes (file re-read + model + plan + state, no map writes): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; of which the re-read p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            at(&times, 0.5),
            at(&times, 0.99),
            at(&times, 1.0),
            at(&reads, 0.5),
            at(&reads, 0.99),
            at(&reads, 1.0)
        );
    }
    println!(
        "end: heap alive {:.1} MiB, VmRSS {:.1} MiB, VmHWM {:.1} MiB",
        LIVE.load(Ordering::Relaxed) as f64 / MIB,
        status_mib("VmRSS"),
        status_mib("VmHWM")
    );
}
