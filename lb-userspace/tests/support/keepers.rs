//! Long-lived flows for the lifecycle proofs: TCP connections and UDP
//! sessions asked in turn, every 50 ms, by one thread (`Keepers`), and
//! what each observed: answers, lost datagrams, answers from another
//! backend than the first, and what ended a connection.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::clients::{Conn, Outcome, UdpFlow};

/// How often every long-lived flow is asked.
const PERIOD: Duration = Duration::from_millis(50);
/// How long a long-lived UDP session waits for an answer before calling
/// the datagram lost.
const UDP_WAIT: Duration = Duration::from_millis(500);

/// A long-lived flow.
pub(crate) enum Flow {
    Tcp(Conn),
    Udp(UdpFlow),
}

/// What one long-lived flow observed.
#[derive(Clone, Debug)]
pub(crate) struct FlowReport {
    /// `v4 ClusterIP TCP #1`, ...
    pub(crate) label: String,
    /// The backend it answered from first.
    pub(crate) backend: String,
    pub(crate) asks: u64,
    pub(crate) answers: u64,
    /// UDP datagrams without an answer within `UDP_WAIT`.
    pub(crate) lost: u64,
    /// Answers from another backend than the first.
    pub(crate) moved: u64,
    /// What ended a TCP connection (or a UDP socket), with when.
    pub(crate) broken: Option<String>,
}

impl FlowReport {
    /// Asked throughout, always answered by its first backend.
    pub(crate) fn intact(&self) -> bool {
        self.broken.is_none() && self.moved == 0 && self.lost == 0 && self.answers > 0
    }
}

/// Long-lived flows asked in turn every `PERIOD` by one thread
/// until `stop`.
pub(crate) struct Keepers {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<FlowReport>>>,
}

impl Keepers {
    /// FLOWS (label, flow, the backend it is on) start being asked.
    pub(crate) fn start(flows: Vec<(String, Flow, String)>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || keep(flows, &flag));
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops asking and returns what every flow observed.
    pub(crate) fn stop(mut self) -> Vec<FlowReport> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .expect("running")
            .join()
            .unwrap_or_else(|payload| std::panic::resume_unwind(payload))
    }
}

impl Drop for Keepers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn keep(flows: Vec<(String, Flow, String)>, stop: &AtomicBool) -> Vec<FlowReport> {
    let started = Instant::now();
    let mut live: Vec<(Flow, FlowReport)> = flows
        .into_iter()
        .map(|(label, flow, backend)| {
            let report = FlowReport {
                label,
                backend,
                asks: 0,
                answers: 0,
                lost: 0,
                moved: 0,
                broken: None,
            };
            (flow, report)
        })
        .collect();
    while !stop.load(Ordering::SeqCst) {
        let round = Instant::now();
        for (flow, report) in &mut live {
            if report.broken.is_some() {
                continue;
            }
            report.asks += 1;
            let outcome = match flow {
                Flow::Tcp(conn) => conn.ask(),
                Flow::Udp(udp) => udp.ask(UDP_WAIT),
            };
            match (outcome, &flow) {
                (Outcome::Answer(a), _) => {
                    report.answers += 1;
                    if a.backend != report.backend {
                        report.moved += 1;
                    }
                }
                (Outcome::Timeout, Flow::Udp(_)) => report.lost += 1,
                (other, _) => {
                    report.broken = Some(format!(
                        "{other:?} at {:.3} s",
                        started.elapsed().as_secs_f64()
                    ));
                }
            }
        }
        std::thread::sleep(PERIOD.saturating_sub(round.elapsed()));
    }
    live.into_iter().map(|(_, report)| report).collect()
}

/// The flow reports as lines.
pub(crate) fn flows_text(flows: &[FlowReport]) -> String {
    let mut text = String::new();
    for f in flows {
        let _ = write!(
            text,
            "  {} on {}: {} asks, {} answers, {} lost, {} moved",
            f.label, f.backend, f.asks, f.answers, f.lost, f.moved
        );
        if let Some(broken) = &f.broken {
            let _ = write!(text, ", BROKEN: {broken}");
        }
        text.push('\n');
    }
    text
}

pub(crate) fn flows_json(flows: &[FlowReport]) -> Value {
    let broken = flows.iter().filter(|f| f.broken.is_some()).count();
    json!({
        "flows": flows.len(),
        "intact": flows.iter().filter(|f| f.intact()).count(),
        "broken": broken,
        "asks": flows.iter().map(|f| f.asks).sum::<u64>(),
        "lost": flows.iter().map(|f| f.lost).sum::<u64>(),
        "moved": flows.iter().map(|f| f.moved).sum::<u64>(),
    })
}
