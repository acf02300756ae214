//! Interleaved A/B connect timing (`lb-bench connect-pair`), for a
//! difference of about 1% that separate runs cannot show: on a shared
//! 2-core machine two rates measured one after the other differ by ±20%
//! from round to round, whatever the contenders. Here one process connects
//! to A and B in pairs (A B, B A, A B, ...), timing every `connect()`: both contenders
//! meet the same machine state within microseconds of each other, so load
//! that comes and goes slows both alike and cancels out of the ratio.
//!
//! The ratio is of typical connects: A's rate over B's is B's median
//! connect time over A's. Sums would be ruled by a few stalls (a SYN
//! dropped by a full accept queue costs its connect 1 s, a preemption
//! tens of ms; either side meets them at random), which the report counts
//! instead (connects over 100 ms). Every block of pairs gives a ratio of
//! medians, and the 95% confidence interval comes from the spread of the
//! block ratios (mean ± 1.96 standard errors). A first block warms both
//! paths up and is not counted.
//!
//! On a busy machine the connect times have two modes (a connect that is
//! preempted or waits for a softirq elsewhere takes 2-3× longer), and a
//! median sits in one or the other: a small shift in the mix moves the
//! ratio of medians by several percent. So the report also gives what A
//! costs more than B per connection, the median of the differences of
//! each pair's two connects (made microseconds apart, nearly always in
//! the same mode), with its interval over blocks as above, and the rate
//! ratio that extra makes: B's mean connect time (stalls left out) over
//! that plus the extra.
//!
//! The two connects of a pair swap places every pair (A then B, then B
//! then A). The first connect of a pair meets what the one before left
//! behind (the backend's accept and reset of it, on the other CPU): with
//! A always first, A against itself measured 0.18 µs of "extra" with an
//! interval of ±0.4 µs; alternating, -0.05 to +0.02 µs with intervals of
//! ±0.02 µs (20 s each). (Taking the median of each kind of pair apart
//! and averaging the two was worse: ±0.16 µs.) The socket benchmark runs
//! that control, the direct connect against itself, next to each
//! comparison.

use std::io::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::{Value, json};

use crate::stats::{mean_ci95, median, percentile};

/// Pairs per block.
const BLOCK: usize = 500;

/// One connect to TARGET and its close; its duration. Both sides close
/// with a reset (linger 0): the backend resets once it has accepted (a
/// reset seen by `connect()` is a connection made), and so does the
/// client's close if it comes first. The close is then one packet either
/// way, and no side keeps the connection in `TIME_WAIT`. (With a plain
/// close, the client's FIN raced the backend's reset, and the connect
/// times had two modes, ~15 and ~40 µs, whose mix moved the medians.)
pub(crate) fn timed_connect(target: SocketAddr) -> anyhow::Result<Duration> {
    let began = Instant::now();
    match TcpStream::connect_timeout(&target, Duration::from_secs(3)) {
        Ok(stream) => {
            crate::sys::linger_zero(&stream);
            drop(stream);
        }
        Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(error) => return Err(error).with_context(|| format!("connect {target}")),
    }
    Ok(began.elapsed())
}

/// Connects slower than this are counted as stalls.
const STALL: Duration = Duration::from_millis(100);

/// `lb-bench connect-pair`: alternates connects to A and B for SECS
/// seconds (after one uncounted block); prints one JSON line: pairs, each
/// side's median and mean connect time and stalls, A's rate over B's (the
/// ratio of medians over all pairs, and the mean and 95% interval over
/// blocks), A's extra time per connect and the rate ratio it makes.
///
/// # Errors
/// A connection failed.
pub fn connect_pair(a: SocketAddr, b: SocketAddr, secs: u32) -> anyhow::Result<()> {
    // CPU 0 for the client, CPU 1 for the backend (`socklb::accept_loop`):
    // neither waits for the other to be scheduled off its CPU.
    crate::sys::pin_thread(0);
    let limit = Duration::from_secs(u64::from(secs));
    let mut block_ratios = Vec::new();
    let mut block_extras = Vec::new();
    let (mut all_a, mut all_b) = (Vec::new(), Vec::new());
    let mut started = None;
    loop {
        let (mut block_a, mut block_b) = (Vec::with_capacity(BLOCK), Vec::with_capacity(BLOCK));
        // Even pairs A first, odd pairs B first (see the module doc).
        for pair in 0..BLOCK {
            if pair % 2 == 0 {
                block_a.push(timed_connect(a)?.as_secs_f64());
                block_b.push(timed_connect(b)?.as_secs_f64());
            } else {
                block_b.push(timed_connect(b)?.as_secs_f64());
                block_a.push(timed_connect(a)?.as_secs_f64());
            }
        }
        // The first block warms up (route and socket caches, the map
        // entries' cache lines); the clock starts after it.
        let Some(start) = started else {
            started = Some(Instant::now());
            continue;
        };
        all_a.extend_from_slice(&block_a);
        all_b.extend_from_slice(&block_b);
        block_ratios.push(median(&block_b) / median(&block_a));
        let differences: Vec<f64> = block_a.iter().zip(&block_b).map(|(a, b)| a - b).collect();
        block_extras.push(median(&differences) * 1e6);
        if start.elapsed() >= limit {
            break;
        }
    }
    let (mean, lo, hi) = mean_ci95(&block_ratios);
    let (extra, extra_lo, extra_hi) = mean_ci95(&block_extras);
    let stalls = |all: &[f64]| all.iter().filter(|&&t| is_stall(t)).count();
    let (stalls_a, stalls_b) = (stalls(&all_a), stalls(&all_b));
    let (median_a, median_b) = (median(&all_a), median(&all_b));
    // What the extra makes of a rate: B's mean connect time (without the
    // stalls, which either side meets at random) against A's, B's plus
    // the extra.
    let mean_b = mean_without_stalls(&all_b);
    let rate_ratio = |extra_us: f64| mean_b / (mean_b + extra_us * 1e-6);
    // To show a distribution with two modes (two CPUs, two wake-up paths).
    let deciles = |all: &[f64]| [percentile(all, 10.0) * 1e6, percentile(all, 90.0) * 1e6];
    let result: Value = json!({
        "pairs": all_a.len(),
        "a_median_us": median_a * 1e6,
        "b_median_us": median_b * 1e6,
        "a_p10_p90_us": deciles(&all_a),
        "b_p10_p90_us": deciles(&all_b),
        "a_stalls": stalls_a,
        "b_stalls": stalls_b,
        "ratio": median_b / median_a,
        "blocks": block_ratios.len(),
        "block_ratio_mean": mean,
        "ci95": [lo, hi],
        "a_extra_us": extra,
        "a_extra_us_ci95": [extra_lo, extra_hi],
        "a_mean_us": mean_without_stalls(&all_a) * 1e6,
        "b_mean_us": mean_b * 1e6,
        "rate_ratio": rate_ratio(extra),
        "rate_ratio_ci95": [rate_ratio(extra_hi), rate_ratio(extra_lo)],
    });
    writeln!(std::io::stdout(), "{result}")?;
    Ok(())
}

/// Whether a connect of T seconds counts as a stall.
fn is_stall(t: f64) -> bool {
    t > STALL.as_secs_f64()
}

/// The mean of the connect times ALL (seconds) but the stalls.
fn mean_without_stalls(all: &[f64]) -> f64 {
    let kept: Vec<f64> = all.iter().copied().filter(|&t| !is_stall(t)).collect();
    #[expect(clippy::cast_precision_loss, reason = "a count of connects")]
    let n = kept.len() as f64;
    kept.iter().sum::<f64>() / n
}
