//! Load for the lifecycle proofs (`harness_lifecycle*.rs`, and their
//! longer run in `cargo xtask bench`): a steady rate of new TCP
//! connections (`Load`), each one's outcome counted exactly (`counts`; the
//! long-lived flows beside it are `keepers`).
//!
//! A new connection is one `connect`, one request line, one answer line,
//! then a close by the client; it succeeds only when the answer is a
//! well-formed `NAME 8080 PEER` of a known backend whose PEER is the client
//! itself (or, through a `NodePort` to an endpoint on another node, the
//! node's source NAT address). Everything else is counted by kind:
//! refused, timeout, reset, closed before the answer, wrong answer, other
//! error. Connections that needed a retransmission (a lost packet, seen in
//! `TCP_INFO`) are counted too, as a sign of drops even when they succeed.
//!
//! The load is split into named epochs (`Load::epoch`, e.g. "agent down")
//! so that a phase's counts can be read for the exact window of an event.

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd as _;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::clients::{Answer, IO_TIMEOUT};
use super::counts::{Counts, EpochReport, Kind, LoadReport, Tally};
use super::netns::{enter_netns, in_netns};

/// Backends the answers may name.
const BACKENDS: [&str; 4] = ["be1", "be2", "be3", "be4"];
/// The port every backend listens on.
const BACKEND_PORT: u16 = 8080;
/// Epochs a load can have (names beyond are refused).
const MAX_EPOCHS: usize = 8;
/// Failures whose details are kept for the report.
const MAX_SAMPLES: usize = 20;

/// Where new connections go.
#[derive(Clone, Debug)]
pub(crate) struct Target {
    /// `v4 ClusterIP`, ...
    pub(crate) label: String,
    /// The client's namespace.
    pub(crate) ns: String,
    pub(crate) addr: SocketAddr,
    /// The node address a backend may see instead of the client (source
    /// NAT of external traffic to an endpoint on another node).
    pub(crate) snat: Option<IpAddr>,
}

/// Settings of a steady load.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LoadSpec {
    /// New connections per second, over all targets together (each gets
    /// an equal share, from a thread of its own).
    pub(crate) rate: u32,
}

impl LoadSpec {
    /// `LB_LOAD_RATE` (default 1000) connections/s.
    pub(crate) fn from_env() -> Self {
        let rate = std::env::var("LB_LOAD_RATE").ok().map_or(1000, |v| {
            v.parse()
                .unwrap_or_else(|e| panic!("LB_LOAD_RATE={v:?}: not a number ({e})"))
        });
        Self { rate }
    }
}

/// State shared by the load's threads and the test.
struct Shared {
    stop: AtomicBool,
    started: Instant,
    /// Index of the current epoch.
    epoch: AtomicUsize,
    /// (name, start) of every epoch so far.
    epochs: Mutex<Vec<(String, Instant)>>,
    /// `[epoch][target]`.
    tallies: Vec<Vec<Tally>>,
    samples: Mutex<Vec<String>>,
}

/// A steady rate of new TCP connections to every target, from threads in
/// the targets' namespaces, until `stop`. Dropping it stops it too.
pub(crate) struct Load {
    spec: LoadSpec,
    targets: Vec<Target>,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    /// Starts the load (epoch `start`).
    pub(crate) fn start(targets: &[Target], spec: LoadSpec) -> Self {
        assert!(!targets.is_empty() && spec.rate > 0);
        let now = Instant::now();
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            started: now,
            epoch: AtomicUsize::new(0),
            epochs: Mutex::new(vec![("start".to_owned(), now)]),
            tallies: (0..MAX_EPOCHS)
                .map(|_| targets.iter().map(|_| Tally::default()).collect())
                .collect(),
            samples: Mutex::new(Vec::new()),
        });
        let n = u32::try_from(targets.len()).expect("few targets");
        // Each target's share, as the time between two of its connections.
        let interval = Duration::from_secs(1) * n / spec.rate;
        let mut threads = Vec::new();
        for (t, target) in targets.iter().enumerate() {
            let (shared, target) = (Arc::clone(&shared), target.clone());
            // The targets' first connections spread over one interval.
            let offset = interval * u32::try_from(t).expect("few targets") / n;
            threads.push(std::thread::spawn(move || {
                enter_netns(&target.ns);
                worker(&shared, t, &target, now + offset, interval);
            }));
        }
        eprintln!(
            "load: {} new TCP connections/s over {} targets",
            spec.rate,
            targets.len()
        );
        Self {
            spec,
            targets: targets.to_vec(),
            shared,
            threads,
        }
    }

    /// Starts epoch NAME: connections started from now on count in it.
    pub(crate) fn epoch(&self, name: &str) {
        let mut epochs = self
            .shared
            .epochs
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        assert!(epochs.len() < MAX_EPOCHS, "at most {MAX_EPOCHS} epochs");
        epochs.push((name.to_owned(), Instant::now()));
        self.shared.epoch.store(epochs.len() - 1, Ordering::SeqCst);
        eprintln!(
            "load: epoch {name:?} at {:.2} s",
            self.shared.started.elapsed().as_secs_f64()
        );
    }

    /// Counts of every target so far (all epochs).
    pub(crate) fn so_far(&self) -> Counts {
        let mut total = Counts::default();
        for epoch in &self.shared.tallies {
            for tally in epoch {
                total.add(&tally.counts());
            }
        }
        total
    }

    /// Stops starting connections, lets the ones in flight finish (2 s at
    /// most), and returns what they observed.
    pub(crate) fn stop(mut self) -> LoadReport {
        self.halt();
        let ended = Instant::now();
        let epochs = self
            .shared
            .epochs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let reports = epochs
            .iter()
            .enumerate()
            .map(|(i, (name, start))| {
                let end = epochs.get(i + 1).map_or(ended, |(_, next)| *next);
                EpochReport {
                    name: name.clone(),
                    secs: (end - *start).as_secs_f64(),
                    per_target: self.shared.tallies[i].iter().map(Tally::counts).collect(),
                }
            })
            .collect();
        LoadReport {
            rate: self.spec.rate,
            targets: self.targets.iter().map(|t| t.label.clone()).collect(),
            epochs: reports,
            samples: self
                .shared
                .samples
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }

    fn halt(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                eprintln!("warning: a load thread panicked");
            }
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.halt();
    }
}

/// The connections of one target: a new one every INTERVAL from FIRST on,
/// whatever the earlier ones are doing (non-blocking sockets, one `poll`
/// over all of them), so that slow or failing connections neither hold
/// the rate down nor hide behind it. A thread that fell behind (no CPU)
/// catches up at most 100 ms' worth, so a stall is not followed by a
/// burst.
fn worker(shared: &Shared, t: usize, target: &Target, first: Instant, interval: Duration) {
    let mut next = first;
    let mut pending: Vec<Attempt> = Vec::new();
    let mut fds: Vec<libc::pollfd> = Vec::new();
    loop {
        let now = Instant::now();
        let stopping = shared.stop.load(Ordering::Relaxed);
        if stopping && pending.is_empty() {
            return;
        }
        while !stopping && next <= now {
            next =
                (next + interval).max(now.checked_sub(Duration::from_millis(100)).unwrap_or(now));
            let epoch = shared.epoch.load(Ordering::SeqCst);
            match connect_nonblocking(target.addr) {
                Ok(stream) => pending.push(Attempt {
                    stream,
                    started: now,
                    epoch,
                    answering: false,
                    line: Vec::new(),
                }),
                Err(e) => {
                    let done = (error_kind(&e), false, Some(format!("connect: {e}")));
                    shared.record(t, target, epoch, now, done);
                }
            }
        }
        fds.clear();
        fds.extend(pending.iter().map(|a| libc::pollfd {
            fd: a.stream.as_raw_fd(),
            events: if a.answering {
                libc::POLLIN
            } else {
                libc::POLLOUT
            },
            revents: 0,
        }));
        let wait = if stopping {
            Duration::from_millis(5)
        } else {
            next.saturating_duration_since(Instant::now())
        };
        let wait_ms = libc::c_int::try_from(wait.as_millis().clamp(1, 50)).expect("small");
        let nfds = libc::nfds_t::try_from(fds.len()).expect("few");
        // SAFETY: FDS holds NFDS pollfd entries of open sockets.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), nfds, wait_ms) };
        if ready < 0 {
            continue; // EINTR; nothing else can fail with valid arguments.
        }
        let mut i = 0;
        while i < pending.len() {
            let revents = fds.get(i).map_or(0, |f| f.revents);
            let attempt = &mut pending[i];
            let done = if revents == 0 {
                (attempt.started.elapsed() > IO_TIMEOUT).then(|| {
                    let what = if attempt.answering {
                        "no answer"
                    } else {
                        "connect"
                    };
                    // The local address names the flow in `lb conntrack`.
                    let local = attempt
                        .stream
                        .local_addr()
                        .map_or_else(|e| format!("local_addr: {e}"), |a| a.to_string());
                    (
                        Kind::Timeout,
                        false,
                        Some(format!(
                            "{what} from {local}: timed out after {IO_TIMEOUT:?}"
                        )),
                    )
                })
            } else {
                attempt.advance(target)
            };
            if let Some(done) = done {
                let attempt = pending.swap_remove(i);
                fds.swap_remove(i);
                shared.record(t, target, attempt.epoch, attempt.started, done);
            } else {
                i += 1;
            }
        }
    }
}

impl Shared {
    /// Counts one finished attempt (started at STARTED, in EPOCH) and
    /// keeps the first failures' details.
    fn record(&self, t: usize, target: &Target, epoch: usize, started: Instant, done: Done) {
        let (kind, retransmitted, detail) = done;
        self.tallies[epoch][t].record(kind, retransmitted, started.elapsed());
        if let Some(detail) = detail {
            let mut samples = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
            if samples.len() < MAX_SAMPLES {
                samples.push(format!(
                    "{:.3} s, {}: {detail}",
                    (started - self.started).as_secs_f64(),
                    target.label
                ));
            }
        }
    }
}

/// One new connection in flight.
struct Attempt {
    stream: TcpStream,
    started: Instant,
    epoch: usize,
    /// Connected and the request sent; waiting for the answer.
    answering: bool,
    line: Vec<u8>,
}

/// Outcome of a finished attempt: its kind, whether a packet was
/// retransmitted, and a description of a failure.
type Done = (Kind, bool, Option<String>);

impl Attempt {
    /// The socket is ready (writable while connecting, readable after):
    /// moves on, and returns the outcome when the attempt is over.
    fn advance(&mut self, target: &Target) -> Option<Done> {
        let fail = |kind: Kind, what: String| Some((kind, false, Some(what)));
        if !self.answering {
            match self.stream.take_error() {
                Ok(None) => {}
                Ok(Some(e)) | Err(e) => return fail(error_kind(&e), format!("connect: {e}")),
            }
            // Five bytes into an empty send buffer: never partial.
            return match self.stream.write(b"ping\n") {
                Ok(5) => {
                    self.answering = true;
                    None
                }
                Ok(n) => fail(Kind::Error, format!("send: {n} of 5 bytes")),
                Err(e) if e.kind() == ErrorKind::WouldBlock => None,
                Err(e) => fail(error_kind(&e), format!("send: {e}")),
            };
        }
        let mut chunk = [0_u8; 256];
        match self.stream.read(&mut chunk) {
            Ok(0) => fail(Kind::Closed, "closed before the answer".to_owned()),
            Ok(n) => {
                self.line.extend_from_slice(&chunk[..n]);
                if !self.line.contains(&b'\n') {
                    return None;
                }
                let line = String::from_utf8_lossy(&self.line).into_owned();
                let local = match self.stream.local_addr() {
                    Ok(local) => local,
                    Err(e) => return fail(Kind::Error, format!("local_addr: {e}")),
                };
                if let Err(why) = check_answer(&line, local, target) {
                    return fail(Kind::Wrong, why);
                }
                let retransmitted = total_retransmits(&self.stream).is_some_and(|n| n > 0);
                Some((Kind::Answered, retransmitted, None))
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => None,
            Err(e) => fail(error_kind(&e), format!("receive: {e}")),
        }
    }
}

/// A non-blocking TCP socket whose connect to TO is under way.
fn connect_nonblocking(to: SocketAddr) -> std::io::Result<TcpStream> {
    use std::os::fd::FromRawFd as _;
    let domain = if to.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe {
        libc::socket(
            domain,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor, owned (and closed) by the stream from now on.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let (addr, len) = sockaddr(to);
    // SAFETY: ADDR holds a socket address of LEN bytes.
    let rc = unsafe { libc::connect(fd, (&raw const addr).cast(), len) };
    if rc == 0 {
        return Ok(stream);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EINPROGRESS) {
        Ok(stream)
    } else {
        Err(e)
    }
}

/// TO as the kernel wants it, and its length.
pub(crate) fn sockaddr(to: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all zeroes is valid.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match to {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::sa_family_t::try_from(libc::AF_INET).expect("AF_INET"),
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::sa_family_t::try_from(libc::AF_INET6).expect("AF_INET6"),
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, libc::socklen_t::try_from(len).expect("small"))
}

fn error_kind(e: &std::io::Error) -> Kind {
    match e.kind() {
        ErrorKind::ConnectionRefused => Kind::Refused,
        ErrorKind::TimedOut | ErrorKind::WouldBlock => Kind::Timeout,
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => {
            Kind::Reset
        }
        _ => Kind::Error,
    }
}

/// The answer names a backend, its port, and the client as the backend
/// saw it: the client itself, or the node's source NAT address.
fn check_answer(line: &str, local: SocketAddr, target: &Target) -> Result<(), String> {
    let answer = Answer::parse(line, local, target.addr)?;
    if !BACKENDS.contains(&answer.backend.as_str()) || answer.port != BACKEND_PORT {
        return Err(format!("answer from an unknown backend: {line:?}"));
    }
    let snat = target.snat.is_some_and(|ip| answer.peer.ip() == ip);
    // One client port reaching one backend through two frontends at once
    // (the kernel hands out a local port per destination): the second
    // flow's source port is remapped into the SNAT range, the address kept
    // (issue 9 item 4, as the kernel's NAT remaps a clashing reply tuple).
    let pool = lb_common::SNAT_PORT_MIN..lb_common::SNAT_PORT_MIN + lb_common::SNAT_PORT_COUNT;
    let remapped = answer.peer.ip() == local.ip() && pool.contains(&answer.peer.port());
    if answer.peer != local && !snat && !remapped {
        return Err(format!(
            "{} saw the client as {}, the client is {local}",
            answer.who(),
            answer.peer
        ));
    }
    Ok(())
}

/// `tcpi_total_retrans` of STREAM (SYN retransmissions included).
pub(crate) fn total_retransmits(stream: &TcpStream) -> Option<u32> {
    // SAFETY: tcp_info is plain data; all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::tcp_info>()).ok()?;
    // SAFETY: a valid socket and a buffer of LEN bytes.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &raw mut len,
        )
    };
    (rc == 0).then_some(info.tcpi_total_retrans)
}

/// Sets the client side up for a sustained connection rate in NS: the
/// whole port range, so that no 4-tuple is used twice while the load runs
/// (a port in `TIME_WAIT` is not taken again for the same destination).
pub(crate) fn tune_client(ns: &str) {
    in_netns(ns, || {
        std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "1024 65535")
            .unwrap_or_else(|e| panic!("netns {ns}: ip_local_port_range: {e}"));
    });
}
