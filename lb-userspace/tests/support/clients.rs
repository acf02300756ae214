//! Clients: TCP connections and UDP flows from threads that joined a
//! client's namespace, what they observed (`Outcome`), batches of requests,
//! and the assertions on what the backends answered.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, BufRead as _, BufReader, ErrorKind, Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::netns::in_netns;
use super::topo::Family;

/// Client read/write (and default connect) timeout.
pub(crate) const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// A rejected connection must be refused this fast (not a timeout), on
/// both families: the datapath answers TCP with a reset, which the client's
/// kernel acts on even while `connect()` still holds the socket lock (an
/// ICMP error arriving then is only a soft error, and the refusal would
/// wait for the SYN's retransmission, a second later).
pub(crate) const REFUSED_WITHIN: Duration = Duration::from_millis(100);
/// Source ports of the NodePort/LoadBalancer source NAT.
const SNAT_PORTS: RangeInclusive<u16> =
    lb_common::SNAT_PORT_MIN..=(lb_common::SNAT_PORT_MIN + (lb_common::SNAT_PORT_COUNT - 1));

/// One answer of a backend.
#[derive(Clone, Debug)]
pub(crate) struct Answer {
    /// `be1`, ...
    pub(crate) backend: String,
    /// The backend port that answered (the resolved targetPort).
    pub(crate) port: u16,
    /// The client address the backend saw (v4 canonicalised).
    pub(crate) peer: SocketAddr,
    /// The client socket's own address.
    pub(crate) local: SocketAddr,
    /// The address the client socket is connected to (what the kernel saw
    /// as the remote end: the service address if reverse NAT worked).
    pub(crate) remote: SocketAddr,
}

impl Answer {
    pub(crate) fn parse(line: &str, local: SocketAddr, remote: SocketAddr) -> Result<Self, String> {
        let mut words = line.split_whitespace();
        let (Some(backend), Some(port), Some(peer), None) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            return Err(format!("malformed answer {line:?}"));
        };
        let port = port
            .parse()
            .map_err(|e| format!("bad port in answer {line:?}: {e}"))?;
        let peer: SocketAddr = peer
            .parse()
            .map_err(|e| format!("bad peer in answer {line:?}: {e}"))?;
        Ok(Self {
            backend: backend.to_owned(),
            port,
            peer: SocketAddr::new(peer.ip().to_canonical(), peer.port()),
            local,
            remote,
        })
    }

    /// `be1:8080`.
    pub(crate) fn who(&self) -> String {
        format!("{}:{}", self.backend, self.port)
    }
}

/// What a client observed.
#[derive(Clone, Debug)]
#[expect(
    dead_code,
    reason = "the error text is read through `Debug` in failure messages"
)]
pub(crate) enum Outcome {
    Answer(Answer),
    /// ECONNREFUSED, this long after the attempt started.
    Refused(Duration),
    Timeout,
    /// ECONNRESET (or an abort/broken pipe).
    Reset,
    /// EOF on a connection.
    Closed,
    Error(String),
}

impl Outcome {
    fn from_error(e: &io::Error, start: Instant) -> Self {
        match e.kind() {
            ErrorKind::ConnectionRefused => Self::Refused(start.elapsed()),
            ErrorKind::TimedOut | ErrorKind::WouldBlock => Self::Timeout,
            ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => {
                Self::Reset
            }
            _ => Self::Error(e.to_string()),
        }
    }

    /// The answer; panics (WHAT: which request) on anything else.
    pub(crate) fn answer(self, what: &str) -> Answer {
        match self {
            Self::Answer(a) => a,
            other => panic!("{what}: expected an answer, got {other:?}"),
        }
    }
}

/// A TCP connection; stays open for further requests.
pub(crate) struct Conn {
    reader: BufReader<TcpStream>,
    local: SocketAddr,
    remote: SocketAddr,
}

#[expect(
    clippy::result_large_err,
    reason = "a failed connect is an observation (`Outcome`) the tests inspect, not an error"
)]
impl Conn {
    /// Connects from the current thread's namespace.
    fn connect(to: SocketAddr, timeout: Duration) -> Result<Self, Outcome> {
        let start = Instant::now();
        let stream =
            TcpStream::connect_timeout(&to, timeout).map_err(|e| Outcome::from_error(&e, start))?;
        stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
            .map_err(|e| Outcome::Error(format!("set timeouts: {e}")))?;
        let local = stream
            .local_addr()
            .map_err(|e| Outcome::Error(format!("local_addr: {e}")))?;
        let remote = stream
            .peer_addr()
            .map_err(|e| Outcome::Error(format!("peer_addr: {e}")))?;
        Ok(Self {
            reader: BufReader::new(stream),
            local,
            remote,
        })
    }

    /// Connects from namespace NS.
    pub(crate) fn open(ns: &str, to: SocketAddr) -> Result<Self, Outcome> {
        in_netns(ns, || Self::connect(to, IO_TIMEOUT))
    }

    /// Connects from namespace NS out of LOCAL (see `connect_from`).
    pub(crate) fn open_from(ns: &str, local: SocketAddr, to: SocketAddr) -> Result<Self, Outcome> {
        in_netns(ns, || Self::connect_from(local, to, IO_TIMEOUT))
    }

    /// Connects from the current thread's namespace out of the source
    /// address and port LOCAL, bound with `SO_REUSEADDR`, as a client that
    /// picks its port: a socket bound so may take a port that another one
    /// bound so holds in `TIME_WAIT` towards another peer.
    fn connect_from(local: SocketAddr, to: SocketAddr, timeout: Duration) -> Result<Self, Outcome> {
        use nix::sys::socket::{
            AddressFamily, SockFlag, SockType, SockaddrStorage, bind, connect, setsockopt, socket,
            sockopt,
        };
        let start = Instant::now();
        let failed = |e: nix::Error| Outcome::from_error(&io::Error::from(e), start);
        let family = if local.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).map_err(failed)?;
        setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(failed)?;
        // A blocking connect gives up after the send timeout.
        let limit = nix::sys::time::TimeVal::new(
            i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
            i64::from(timeout.subsec_micros()),
        );
        setsockopt(&fd, sockopt::SendTimeout, &limit).map_err(failed)?;
        bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &SockaddrStorage::from(local),
        )
        .map_err(failed)?;
        connect(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &SockaddrStorage::from(to),
        )
        .map_err(|e| {
            // What a blocking connect returns when the send timeout ends it.
            if e == nix::Error::EINPROGRESS {
                Outcome::Timeout
            } else {
                failed(e)
            }
        })?;
        let stream = TcpStream::from(fd);
        stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
            .map_err(|e| Outcome::Error(format!("set timeouts: {e}")))?;
        Ok(Self {
            reader: BufReader::new(stream),
            local,
            remote: to,
        })
    }

    /// Sends one line and reads the answer.
    pub(crate) fn ask(&mut self) -> Outcome {
        let start = Instant::now();
        if let Err(e) = self.reader.get_mut().write_all(b"ping\n") {
            return Outcome::from_error(&e, start);
        }
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Outcome::Closed,
            Ok(_) => Answer::parse(&line, self.local, self.remote)
                .map_or_else(Outcome::Error, Outcome::Answer),
            Err(e) => Outcome::from_error(&e, start),
        }
    }
}

/// One request on a fresh TCP connection (current thread's namespace).
fn tcp_request(to: SocketAddr, connect_timeout: Duration) -> Outcome {
    match Conn::connect(to, connect_timeout) {
        Ok(mut conn) => conn.ask(),
        Err(outcome) => outcome,
    }
}

/// How many client ports UDP flows cycle through (`udp_client_port`).
const UDP_CLIENT_PORTS: u32 = 8000;

/// The client port of the next UDP flow of this test process: each flow
/// its own, cycling over 20000-27999 (below Linux's ephemeral range, so no
/// socket of the machine's own takes them). A flow that reused the port
/// of one still live in the datapath's conntrack (60 s for UDP) through
/// another frontend to the same endpoint would get its source port
/// remapped, as the kernel's NAT remaps a clashing reply tuple (README
/// "One client port, two frontends"), and a test asserting the client's
/// own port would fail; the kernel's random ephemeral ports repeat about
/// once in a few hundred flows.
fn udp_client_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let offset = NEXT.fetch_add(1, Ordering::Relaxed) % UDP_CLIENT_PORTS;
    20_000 + u16::try_from(offset).expect("below 8000")
}

/// A UDP socket connected to a service address (the kernel drops replies
/// from any other source, so an answer proves the reverse NAT).
pub(crate) struct UdpFlow {
    socket: UdpSocket,
    local: SocketAddr,
    remote: SocketAddr,
}

impl UdpFlow {
    /// Creates the socket in the current thread's namespace, on a client
    /// port of its own (`udp_client_port`).
    fn connect(to: SocketAddr) -> io::Result<Self> {
        let mut bound = Err(io::Error::from(ErrorKind::AddrInUse));
        for _ in 0..UDP_CLIENT_PORTS {
            let mut local = Family::of(to).unspecified();
            local.set_port(udp_client_port());
            bound = UdpSocket::bind(local);
            if bound.is_ok() {
                break;
            }
        }
        let socket = bound?;
        socket.connect(to)?;
        let local = socket.local_addr()?;
        Ok(Self {
            socket,
            local,
            remote: to,
        })
    }

    /// Creates the socket in namespace NS.
    pub(crate) fn open(ns: &str, to: SocketAddr) -> Self {
        in_netns(ns, || Self::connect(to)).unwrap_or_else(|e| panic!("udp socket to {to}: {e}"))
    }

    /// The socket's own address.
    pub(crate) fn local(&self) -> SocketAddr {
        self.local
    }

    /// A datagram received within WAIT (without sending), if any.
    pub(crate) fn receive(&self, wait: Duration) -> Option<String> {
        self.socket.set_read_timeout(Some(wait)).ok()?;
        let mut buf = [0_u8; 1500];
        let len = self.socket.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..len]).into_owned())
    }

    /// One datagram, one answer awaited for at most WAIT.
    pub(crate) fn ask(&self, wait: Duration) -> Outcome {
        let start = Instant::now();
        if let Err(e) = self.socket.set_read_timeout(Some(wait)) {
            return Outcome::Error(e.to_string());
        }
        if let Err(e) = self.socket.send(b"ping\n") {
            return Outcome::from_error(&e, start);
        }
        let mut buf = [0_u8; 1500];
        match self.socket.recv(&mut buf) {
            Ok(len) => Answer::parse(
                &String::from_utf8_lossy(&buf[..len]),
                self.local,
                self.remote,
            )
            .map_or_else(Outcome::Error, Outcome::Answer),
            Err(e) => Outcome::from_error(&e, start),
        }
    }
}

/// One request from a fresh connected UDP socket, up to TRIES datagrams.
fn udp_request(to: SocketAddr, tries: usize, wait: Duration) -> Outcome {
    let flow = match UdpFlow::connect(to) {
        Ok(flow) => flow,
        Err(e) => return Outcome::Error(format!("udp socket to {to}: {e}")),
    };
    let start = Instant::now();
    for _ in 0..tries {
        match flow.ask(wait) {
            Outcome::Timeout => {}
            Outcome::Refused(_) => return Outcome::Refused(start.elapsed()),
            other => return other,
        }
    }
    Outcome::Timeout
}

/// Every outcome must be an answer.
fn expect_answers(what: &str, outcomes: Vec<Outcome>) -> Vec<Answer> {
    let total = outcomes.len();
    let mut answers = Vec::new();
    let mut failures = Vec::new();
    for outcome in outcomes {
        match outcome {
            Outcome::Answer(a) => answers.push(a),
            other => failures.push(other),
        }
    }
    assert!(
        failures.is_empty(),
        "{what}: {} of {total} requests failed (stopped after 3 failures), first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    answers
}

/// Up to N outcomes of REQUEST; stops early after 3 failures (so that a
/// broken path fails in seconds, not N timeouts).
fn batch(n: usize, mut request: impl FnMut() -> Outcome) -> Vec<Outcome> {
    let mut outcomes = Vec::with_capacity(n);
    let mut failures = 0;
    while outcomes.len() < n && failures < 3 {
        let outcome = request();
        if !matches!(outcome, Outcome::Answer(_)) {
            failures += 1;
        }
        outcomes.push(outcome);
    }
    outcomes
}

/// N fresh TCP connections from NS, one request each; all must answer.
pub(crate) fn tcp_batch(ns: &str, to: SocketAddr, n: usize) -> Vec<Answer> {
    let outcomes = in_netns(ns, || batch(n, || tcp_request(to, IO_TIMEOUT)));
    expect_answers(&format!("TCP {to} from {ns}"), outcomes)
}

/// N requests from fresh connected UDP sockets in NS (3 tries each); all
/// must answer.
pub(crate) fn udp_batch(ns: &str, to: SocketAddr, n: usize) -> Vec<Answer> {
    let outcomes = in_netns(ns, || {
        batch(n, || udp_request(to, 3, Duration::from_millis(700)))
    });
    expect_answers(&format!("UDP {to} from {ns}"), outcomes)
}

/// One request on a fresh TCP connection from NS.
pub(crate) fn tcp_once(ns: &str, to: SocketAddr, connect_timeout: Duration) -> Outcome {
    in_netns(ns, || tcp_request(to, connect_timeout))
}

/// One request on a fresh TCP connection from NS out of LOCAL (see
/// `Conn::connect_from`).
pub(crate) fn tcp_once_from(
    ns: &str,
    local: SocketAddr,
    to: SocketAddr,
    connect_timeout: Duration,
) -> Outcome {
    in_netns(ns, || {
        match Conn::connect_from(local, to, connect_timeout) {
            Ok(mut conn) => conn.ask(),
            Err(outcome) => outcome,
        }
    })
}

/// One datagram from a fresh connected UDP socket in NS.
pub(crate) fn udp_once(ns: &str, to: SocketAddr, wait: Duration) -> Outcome {
    in_netns(ns, || udp_request(to, 1, wait))
}

/// Opens TCP connections from NS to TO until one lands on BACKEND (bounded).
pub(crate) fn conn_to(ns: &str, to: SocketAddr, backend: &str) -> Conn {
    for _ in 0..60 {
        let mut conn = Conn::open(ns, to).unwrap_or_else(|o| panic!("connect {to}: {o:?}"));
        if conn.ask().answer(&format!("TCP {to}")).backend == backend {
            return conn;
        }
    }
    panic!("60 TCP connections to {to}, none landed on {backend}");
}

/// Opens UDP sockets from NS to TO until one's flow lands on BACKEND.
pub(crate) fn udp_flow_to(ns: &str, to: SocketAddr, backend: &str) -> UdpFlow {
    for _ in 0..60 {
        let flow = UdpFlow::open(ns, to);
        if flow.ask(IO_TIMEOUT).answer(&format!("UDP {to}")).backend == backend {
            return flow;
        }
    }
    panic!("60 UDP sockets to {to}, none landed on {backend}");
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// Answers per endpoint (`be1:8080`).
fn counts(answers: &[Answer]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for a in answers {
        *counts.entry(a.who()).or_insert(0) += 1;
    }
    counts
}

/// The answering set (`be1:8080`, ...) is exactly EXPECTED.
pub(crate) fn assert_spread(what: &str, answers: &[Answer], expected: &[&str]) {
    let counts = counts(answers);
    eprintln!("{what}: {counts:?}");
    let seen: BTreeSet<String> = counts.keys().cloned().collect();
    assert_eq!(
        seen,
        set(expected),
        "{what}: wrong set of answering endpoints ({counts:?})"
    );
}

/// Every answer came from ALLOWED (not all need to answer).
pub(crate) fn assert_only(what: &str, answers: &[Answer], allowed: &[&str]) {
    let counts = counts(answers);
    eprintln!("{what}: {counts:?}");
    let allowed = set(allowed);
    let stray: Vec<&String> = counts.keys().filter(|k| !allowed.contains(*k)).collect();
    assert!(
        stray.is_empty(),
        "{what}: answers from {stray:?}, only {allowed:?} may answer ({counts:?})"
    );
}

/// Every backend saw the client's own address and port (no source NAT).
pub(crate) fn assert_source_preserved(what: &str, answers: &[Answer]) {
    for a in answers {
        assert_eq!(
            a.peer,
            a.local,
            "{what}: {} saw the client as {}, but the client is {}",
            a.who(),
            a.peer,
            a.local
        );
    }
}

/// Every client socket is connected to VIA (the service address: the
/// replies were translated back, reverse NAT).
pub(crate) fn assert_connected_to(what: &str, answers: &[Answer], via: SocketAddr) {
    for a in answers {
        assert_eq!(
            a.remote, via,
            "{what}: socket peer is {}, expected {via}",
            a.remote
        );
    }
}

/// Answers from LOCAL backends saw the client itself; the others saw
/// `NODE_IP` with a port of the source NAT range.
pub(crate) fn assert_nodeport_sources(
    what: &str,
    answers: &[Answer],
    local: &[&str],
    node_ip: IpAddr,
) {
    for a in answers {
        if local.contains(&a.backend.as_str()) {
            assert_eq!(
                a.peer,
                a.local,
                "{what}: local endpoint {} saw {} instead of the client {} (source must be \
                 preserved for a local endpoint)",
                a.who(),
                a.peer,
                a.local
            );
        } else {
            assert!(
                a.peer.ip() == node_ip && SNAT_PORTS.contains(&a.peer.port()),
                "{what}: remote endpoint {} saw {}, expected the node address {node_ip} with a \
                 port in {SNAT_PORTS:?} (client {})",
                a.who(),
                a.peer,
                a.local
            );
        }
    }
}

/// The backend every answer came from (all the same).
pub(crate) fn assert_sticky(what: &str, answers: &[Answer]) -> String {
    let counts = counts(answers);
    eprintln!("{what}: {counts:?}");
    assert_eq!(
        counts.len(),
        1,
        "{what}: {} requests in a row should land on one endpoint ({counts:?})",
        answers.len()
    );
    answers[0].backend.clone()
}

/// A client (TCP, or a connected UDP socket) is refused within
/// `REFUSED_WITHIN`.
pub(crate) fn assert_refused(what: &str, outcome: &Outcome) {
    assert_refused_within(what, outcome, REFUSED_WITHIN);
}

fn assert_refused_within(what: &str, outcome: &Outcome, limit: Duration) {
    match outcome {
        Outcome::Refused(after) if *after < limit => {
            eprintln!("{what}: refused after {after:?}");
        }
        other => panic!(
            "{what}: expected connection refused within {limit:?} (a TCP reset or an \
             ICMP port unreachable from the datapath), got {other:?}"
        ),
    }
}

/// The client was dropped: no answer and no refusal.
pub(crate) fn assert_timeout(what: &str, outcome: &Outcome) {
    assert!(
        matches!(outcome, Outcome::Timeout),
        "{what}: expected the client to be dropped (timeout), got {outcome:?}"
    );
    eprintln!("{what}: dropped (timeout)");
}

/// No endpoint answered (whatever else happened).
pub(crate) fn assert_unanswered(what: &str, outcome: &Outcome) {
    assert!(
        !matches!(outcome, Outcome::Answer(_)),
        "{what}: no endpoint may answer, got {outcome:?}"
    );
    eprintln!("{what}: not answered ({outcome:?})");
}

/// HTTP/1.0 GET from a thread in NS; returns status and body.
pub(crate) fn http_get(ns: &str, addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    http_get_with_headers(ns, addr, path).map(|(status, _, body)| (status, body))
}

/// HTTP/1.0 GET from a thread in NS; returns status, the header block
/// (status line excluded) and body.
pub(crate) fn http_get_with_headers(
    ns: &str,
    addr: SocketAddr,
    path: &str,
) -> Result<(u16, String, String), String> {
    let response = in_netns(ns, || -> io::Result<String> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(700))?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        Ok(text)
    })
    .map_err(|e| format!("GET http://{addr}{path}: {e}"))?;
    let status = response
        .lines()
        .next()
        .and_then(|status| status.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("GET http://{addr}{path}: malformed response {response:?}"))?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let headers = head.split_once("\r\n").map_or("", |(_, headers)| headers);
    Ok((status, headers.to_owned(), body.to_owned()))
}

/// The value of the sample `series` (a metric name, with its labels if it
/// has any) in a Prometheus text exposition.
pub(crate) fn metric_value(exposition: &str, series: &str) -> Option<u64> {
    exposition.lines().find_map(|line| {
        line.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}
