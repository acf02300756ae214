//! Level-3 harness for every Kubernetes Service behaviour (issue 3): two
//! "node" namespaces joined by a fabric link, each running its own `lb`
//! agent, pods behind each node, and two "external" clients on uplinks of
//! node 1. Real TCP/UDP clients and servers, IPv4 and IPv6, dual-stack
//! Services; the assertions are what the clients observe (which endpoint
//! answered, the source address the server saw, refused versus timeout,
//! the health check's HTTP status and body).
//!
//! ```text
//!   ext (198.18.200.2, fd00:200::2)     ext2 (198.18.201.2, fd00:201::2)
//!        | h-ext                            | h-ext2
//!   node1 [lb agent --node-name node1 --zone zone-a
//!          --node-ip 198.18.200.1,fd00:200::1]
//!        | h-client1 | h-be1 | h-be2                 fab1
//!   client1 (.1.2)  be1 (.2.2)  be2 (.3.2)             |  198.18.100.0/24
//!                                                    fab2    fd00:100::/64
//!   node2 [lb agent --node-name node2 --zone zone-b
//!          --node-ip 198.18.100.2,fd00:100::2]
//!        | h-be3 | h-be4
//!   be3 (198.18.4.2)  be4 (198.18.5.2)
//! ```
//!
//! Pod K lives on `198.18.K.0/24` and `fd00:K::/64` (the node is `.1`/`::1`,
//! the pod's default route). Service addresses: `ClusterIP`s `198.19.0.N` /
//! `fd00:96::N`, load-balancer ingress `198.19.1.N` / `fd00:97::N`,
//! external IPs `198.19.2.N` / `fd00:98::N`. Both agents read the same
//! manifest directory, as two nodes of one cluster would. Every backend
//! answers, on TCP and UDP ports 8080 and 9090, `NAME PORT PEER` (PEER: the
//! client address it saw).
//!
//! Each test builds the topology once and runs named sub-scenarios on it
//! (per behaviour and family); a failing sub-scenario is reported and the
//! others still run, so one run shows every failing behaviour.
//!
//! Everything lives in namespaces this test creates (the nodes included);
//! nothing is added to the root namespace, and no traffic leaves the test's
//! namespaces. Namespaces, agents, pins, server threads and temporary files
//! are removed by drop guards, also when an assertion fails (both agents'
//! logs, `lb services` and `lb conntrack` are printed first). Privileged:
//! needs root and bpffs (see `common`).
//!
//! Run: `cargo test -p lb-userspace --test harness_services -- --nocapture`
//! (the tests run one at a time; each builds its own topology).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::{self, BufRead as _, BufReader, ErrorKind, Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::ops::RangeInclusive;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use common::{
    ChildGuard, Netns, PinGuard, TempDir, enter_netns, have_program, in_netns, lb_binary,
    ns_command, output_with_timeout, require_privileged, sweep_stale_netns, unique_prefix,
};

/// Namespace name tag: namespaces are `lbs<pid>-<n>-<role>`.
const TAG: &str = "lbs";
/// Pin directories are `/sys/fs/bpf/lbs-pins-<pid>-<n>`.
const PIN_TAG: &str = "lbs-pins-";
/// Ports every backend serves, TCP and UDP (`[::]`, dual-stack).
const SERVER_PORTS: [u16; 2] = [8080, 9090];
const BACKENDS: [&str; 4] = ["be1", "be2", "be3", "be4"];
/// Metrics/health address of each agent, inside its node namespace.
const METRICS_ADDR: &str = "127.0.0.1:9917";
/// Client read/write (and default connect) timeout.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Both agents must have synced a manifest change within this.
const APPLY_DEADLINE: Duration = Duration::from_secs(2);
/// A rejected connection must be refused this fast (not a timeout).
const REFUSED_WITHIN: Duration = Duration::from_secs(1);
/// The same for an IPv6 TCP client: its first SYN retransmission (1 s)
/// plus margin (see `assert_tcp_refused`).
const TCP6_REFUSED_WITHIN: Duration = Duration::from_millis(1500);
/// Connect timeout of clients that expect a refusal (longer than any
/// allowance, so that a drop shows as a timeout).
const REFUSE_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a client waits before concluding that nothing answers.
const UNANSWERED_WAIT: Duration = Duration::from_millis(500);
/// How long a denied (dropped) client waits before calling it a timeout.
const DENIED_WAIT: Duration = Duration::from_secs(1);
/// Source addresses of hairpin flows (the agent's defaults).
const HAIRPIN4: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 1);
const HAIRPIN6: Ipv6Addr = Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0x6c62, 1);
/// Source ports of the NodePort/LoadBalancer source NAT.
const SNAT_PORTS: RangeInclusive<u16> = 61000..=65535;

/// One test at a time: their timing stays honest and their logs readable.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------
// Addresses
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Family {
    V4,
    V6,
}

impl Family {
    const BOTH: [Self; 2] = [Self::V4, Self::V6];

    fn unspecified(self) -> SocketAddr {
        match self {
            Self::V4 => (Ipv4Addr::UNSPECIFIED, 0).into(),
            Self::V6 => (Ipv6Addr::UNSPECIFIED, 0).into(),
        }
    }

    fn address_type(self) -> &'static str {
        match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            Self::V4 => "v4",
            Self::V6 => "v6",
        }
    }

    fn hairpin(self) -> IpAddr {
        match self {
            Self::V4 => IpAddr::V4(HAIRPIN4),
            Self::V6 => IpAddr::V6(HAIRPIN6),
        }
    }
}

/// One address of each family.
#[derive(Clone, Copy, Debug)]
struct Dual {
    v4: Ipv4Addr,
    v6: Ipv6Addr,
}

/// The decimal digits of K read as hex, so that subnet 200 is `fd00:200::`.
fn hex_digits(k: u8) -> u16 {
    u16::from_str_radix(&k.to_string(), 16).expect("decimal digits are hex digits")
}

impl Dual {
    /// `198.18.K.H` and `fd00:K::H`.
    fn host(k: u8, h: u8) -> Self {
        Self {
            v4: Ipv4Addr::new(198, 18, k, h),
            v6: Ipv6Addr::new(0xfd00, hex_digits(k), 0, 0, 0, 0, 0, hex_digits(h)),
        }
    }

    /// `198.19.BLOCK.N` and `fd00:SIX::N`: service addresses (never on a link).
    fn service(block: u8, six: u16, n: u8) -> Self {
        Self {
            v4: Ipv4Addr::new(198, 19, block, n),
            v6: Ipv6Addr::new(0xfd00, six, 0, 0, 0, 0, 0, hex_digits(n)),
        }
    }

    fn get(self, family: Family) -> IpAddr {
        match family {
            Family::V4 => IpAddr::V4(self.v4),
            Family::V6 => IpAddr::V6(self.v6),
        }
    }

    fn sock(self, family: Family, port: u16) -> SocketAddr {
        SocketAddr::new(self.get(family), port)
    }
}

/// `ClusterIP`s of Service N.
fn vip(n: u8) -> Dual {
    Dual::service(0, 0x96, n)
}

/// `status.loadBalancer.ingress` IPs of Service N.
fn lb_ip(n: u8) -> Dual {
    Dual::service(1, 0x97, n)
}

/// `spec.externalIPs` of Service N.
fn ext_ip(n: u8) -> Dual {
    Dual::service(2, 0x98, n)
}

// ---------------------------------------------------------------------------
// Topology
// ---------------------------------------------------------------------------

/// A pod or external client: a namespace with `eth0`, whose peer `iface` is
/// in node `node`.
#[derive(Clone, Debug)]
struct Host {
    name: &'static str,
    ns: String,
    node: usize,
    iface: String,
    addr: Dual,
}

/// (name, node index, subnet K).
const HOSTS: [(&str, usize, u8); 7] = [
    ("client1", 0, 1),
    ("be1", 0, 2),
    ("be2", 0, 3),
    ("be3", 1, 4),
    ("be4", 1, 5),
    ("ext", 0, 200),
    ("ext2", 0, 201),
];

/// A node namespace and what its agent is told.
#[derive(Clone, Debug)]
struct NodeNet {
    name: &'static str,
    ns: String,
    /// `--node-ip`.
    ips: Dual,
    zone: &'static str,
    /// Every interface of the namespace (all get the TC program).
    ifaces: Vec<String>,
}

const NODE_SYSCTLS: [(&str, &str); 6] = [
    ("net/ipv4/ip_forward", "1"),
    ("net/ipv6/conf/all/forwarding", "1"),
    ("net/ipv4/conf/all/rp_filter", "0"),
    ("net/ipv4/conf/default/rp_filter", "0"),
    ("net/ipv6/conf/all/accept_dad", "0"),
    ("net/ipv6/conf/default/accept_dad", "0"),
];

const HOST_SYSCTLS: [(&str, &str); 4] = [
    ("net/ipv4/conf/all/rp_filter", "0"),
    ("net/ipv4/conf/default/rp_filter", "0"),
    ("net/ipv6/conf/all/accept_dad", "0"),
    ("net/ipv6/conf/default/accept_dad", "0"),
];

/// The namespaces and links; dropping it deletes every namespace (and the
/// veth pairs with them).
struct Topology {
    hosts: Vec<Host>,
    nodes: Vec<NodeNet>,
    _host_netns: Vec<Netns>,
    _node_netns: Vec<Netns>,
}

/// Adds ADDR/LEN (v4 /24, v6 /64) to IFACE in NS and brings it up.
fn address(ns: &Netns, iface: &str, addr: Dual) {
    ns.ip(&["addr", "add", &format!("{}/24", addr.v4), "dev", iface]);
    ns.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{}/64", addr.v6),
        "dev",
        iface,
        "nodad",
    ]);
    ns.ip(&["link", "set", iface, "up"]);
}

/// Creates HOST's namespace and its veth pair to NODE (directly inside the
/// two namespaces, never in the root one), addresses and a default route
/// via the node (`.1` / `::1` of subnet K).
fn wire_host(node_ns: &Netns, host: &Host, k: u8) -> Netns {
    let ns = Netns::create(&host.ns);
    ns.sysctls(&HOST_SYSCTLS);
    node_ns.ip(&[
        "link",
        "add",
        &host.iface,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &host.ns,
    ]);
    address(node_ns, &host.iface, Dual::host(k, 1));
    address(&ns, "eth0", host.addr);
    let gw = Dual::host(k, 1);
    ns.ip(&["route", "add", "default", "via", &gw.v4.to_string()]);
    ns.ip(&["-6", "route", "add", "default", "via", &gw.v6.to_string()]);
    ns
}

impl Topology {
    fn build(prefix: &str) -> Self {
        let node_netns: Vec<Netns> = ["node1", "node2"]
            .iter()
            .map(|n| Netns::create(&format!("{prefix}-{n}")))
            .collect();
        for node in &node_netns {
            node.sysctls(&NODE_SYSCTLS);
        }
        let mut nodes = vec![
            NodeNet {
                name: "node1",
                ns: node_netns[0].name().to_owned(),
                ips: Dual::host(200, 1),
                zone: "zone-a",
                ifaces: vec!["fab1".to_owned()],
            },
            NodeNet {
                name: "node2",
                ns: node_netns[1].name().to_owned(),
                ips: Dual::host(100, 2),
                zone: "zone-b",
                ifaces: vec!["fab2".to_owned()],
            },
        ];

        // Fabric: node1 fab1 (.100.1) <-> node2 fab2 (.100.2).
        node_netns[0].ip(&[
            "link",
            "add",
            "fab1",
            "type",
            "veth",
            "peer",
            "name",
            "fab2",
            "netns",
            node_netns[1].name(),
        ]);
        address(&node_netns[0], "fab1", Dual::host(100, 1));
        address(&node_netns[1], "fab2", Dual::host(100, 2));

        let mut hosts = Vec::new();
        let mut host_netns = Vec::new();
        for (name, node, k) in HOSTS {
            let host = Host {
                name,
                ns: format!("{prefix}-{name}"),
                node,
                iface: format!("h-{name}"),
                addr: Dual::host(k, 2),
            };
            let ns = wire_host(&node_netns[node], &host, k);
            nodes[node].ifaces.push(host.iface.clone());
            host_netns.push(ns);
            hosts.push(host);
        }
        for (node, iface) in nodes
            .iter()
            .enumerate()
            .flat_map(|(i, n)| n.ifaces.iter().map(move |iface| (i, iface)))
        {
            node_netns[node].sysctls(&[(&format!("net/ipv4/conf/{iface}/rp_filter"), "0")]);
        }

        // node1 reaches node2's pods over the fabric; node2 reaches
        // everything else (node1's pods, ext, ext2) over it.
        for k in [4, 5] {
            let net = Dual::host(k, 0);
            node_netns[0].ip(&[
                "route",
                "add",
                &format!("{}/24", net.v4),
                "via",
                "198.18.100.2",
            ]);
            node_netns[0].ip(&[
                "-6",
                "route",
                "add",
                &format!("{}/64", net.v6),
                "via",
                "fd00:100::2",
            ]);
        }
        node_netns[1].ip(&["route", "add", "198.18.0.0/15", "via", "198.18.100.1"]);
        node_netns[1].ip(&["-6", "route", "add", "fd00::/8", "via", "fd00:100::1"]);

        Self {
            hosts,
            nodes,
            _host_netns: host_netns,
            _node_netns: node_netns,
        }
    }

    fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name}"))
    }

    /// The host name owning IP, else the address itself.
    fn name_of(&self, ip: IpAddr) -> String {
        let ip = ip.to_canonical();
        self.hosts
            .iter()
            .find(|h| h.addr.get(Family::V4) == ip || h.addr.get(Family::V6) == ip)
            .map_or_else(|| ip.to_string(), |h| h.name.to_owned())
    }
}

// ---------------------------------------------------------------------------
// Backend servers (threads of this process, each setns'd into its pod)
// ---------------------------------------------------------------------------

/// TCP and UDP name servers on `[::]:8080` and `[::]:9090` in every backend.
/// Dropping it stops and joins every thread (they poll a stop flag).
struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    fn start(topo: &Topology) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut servers = Self {
            stop: Arc::clone(&stop),
            threads: Vec::new(),
        };
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let mut expected = 0;
        for name in BACKENDS {
            let host = topo.host(name);
            for port in SERVER_PORTS {
                for udp in [false, true] {
                    let (ns, stop, ready) = (host.ns.clone(), Arc::clone(&stop), ready_tx.clone());
                    expected += 1;
                    servers.threads.push(std::thread::spawn(move || {
                        enter_netns(&ns);
                        if udp {
                            udp_server(name, port, &stop, &ready);
                        } else {
                            tcp_server(name, port, &stop, &ready);
                        }
                    }));
                }
            }
        }
        drop(ready_tx);
        for _ in 0..expected {
            match ready_rx.recv_timeout(Duration::from_secs(5)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => panic!("backend server failed to start: {e}"),
                Err(e) => panic!("backend server did not report readiness: {e}"),
            }
        }
        servers
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                eprintln!("warning: a backend server thread panicked");
            }
        }
    }
}

/// The reply to every request: `NAME PORT PEER`.
fn reply(name: &str, port: u16, peer: SocketAddr) -> String {
    format!("{name} {port} {peer}\n")
}

fn tcp_server(
    name: &'static str,
    port: u16,
    stop: &Arc<AtomicBool>,
    ready: &mpsc::Sender<Result<(), String>>,
) {
    let listener =
        match TcpListener::bind(("::", port)).and_then(|l| l.set_nonblocking(true).map(|()| l)) {
            Ok(l) => l,
            Err(e) => {
                let _ = ready.send(Err(format!("{name}: tcp bind [::]:{port}: {e}")));
                return;
            }
        };
    let _ = ready.send(Ok(()));
    let mut connections: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => {
                let stop = Arc::clone(stop);
                connections.push(std::thread::spawn(move || {
                    serve_tcp(name, port, stream, peer, &stop);
                }));
                connections.retain(|c| !c.is_finished());
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => {
                eprintln!("{name}: accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    for c in connections {
        let _ = c.join();
    }
}

/// Answers every line with `reply`, keeping the connection open.
fn serve_tcp(name: &str, port: u16, mut stream: TcpStream, peer: SocketAddr, stop: &AtomicBool) {
    if stream.set_nonblocking(false).is_err()
        || stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .is_err()
    {
        return;
    }
    let mut pending = Vec::new();
    let mut chunk = [0_u8; 512];
    while !stop.load(Ordering::SeqCst) {
        match stream.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => {
                pending.extend_from_slice(&chunk[..n]);
                while let Some(pos) = pending.iter().position(|&b| b == b'\n') {
                    pending.drain(..=pos);
                    if stream
                        .write_all(reply(name, port, peer).as_bytes())
                        .is_err()
                    {
                        return;
                    }
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

fn udp_server(name: &str, port: u16, stop: &AtomicBool, ready: &mpsc::Sender<Result<(), String>>) {
    let socket = match UdpSocket::bind(("::", port)).and_then(|s| {
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .map(|()| s)
    }) {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Err(format!("{name}: udp bind [::]:{port}: {e}")));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    let mut buf = [0_u8; 1500];
    while !stop.load(Ordering::SeqCst) {
        match socket.recv_from(&mut buf) {
            Ok((_, peer)) => {
                let _ = socket.send_to(reply(name, port, peer).as_bytes(), peer);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => {
                eprintln!("{name}: udp recv: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Clients (sockets created on threads setns'd into the client's namespace)
// ---------------------------------------------------------------------------

/// One answer of a backend.
#[derive(Clone, Debug)]
struct Answer {
    /// `be1`, ...
    backend: String,
    /// The backend port that answered (the resolved targetPort).
    port: u16,
    /// The client address the backend saw (v4 canonicalised).
    peer: SocketAddr,
    /// The client socket's own address.
    local: SocketAddr,
}

impl Answer {
    fn parse(line: &str, local: SocketAddr) -> Result<Self, String> {
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
        })
    }

    /// `be1:8080`.
    fn who(&self) -> String {
        format!("{}:{}", self.backend, self.port)
    }
}

/// What a client observed.
#[derive(Clone, Debug)]
#[expect(
    dead_code,
    reason = "the error text is read through `Debug` in failure messages"
)]
enum Outcome {
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

    fn answer(self, what: &str) -> Answer {
        match self {
            Self::Answer(a) => a,
            other => panic!("{what}: expected an answer, got {other:?}"),
        }
    }
}

/// A TCP connection; stays open for further requests.
struct Conn {
    reader: BufReader<TcpStream>,
    local: SocketAddr,
}

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
        Ok(Self {
            reader: BufReader::new(stream),
            local,
        })
    }

    fn open(ns: &str, to: SocketAddr) -> Result<Self, Outcome> {
        in_netns(ns, || Self::connect(to, IO_TIMEOUT))
    }

    /// Sends one line and reads the answer.
    fn ask(&mut self) -> Outcome {
        let start = Instant::now();
        if let Err(e) = self.reader.get_mut().write_all(b"ping\n") {
            return Outcome::from_error(&e, start);
        }
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Outcome::Closed,
            Ok(_) => Answer::parse(&line, self.local).map_or_else(Outcome::Error, Outcome::Answer),
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

/// A UDP socket connected to a service address (the kernel drops replies
/// from any other source, so an answer proves the reverse NAT).
struct UdpFlow {
    socket: UdpSocket,
    local: SocketAddr,
}

impl UdpFlow {
    /// Creates the socket in the current thread's namespace.
    fn connect(to: SocketAddr) -> io::Result<Self> {
        let family = if to.is_ipv4() { Family::V4 } else { Family::V6 };
        let socket = UdpSocket::bind(family.unspecified())?;
        socket.connect(to)?;
        let local = socket.local_addr()?;
        Ok(Self { socket, local })
    }

    fn open(ns: &str, to: SocketAddr) -> Self {
        in_netns(ns, || Self::connect(to)).unwrap_or_else(|e| panic!("udp socket to {to}: {e}"))
    }

    /// One datagram, one answer awaited for at most WAIT.
    fn ask(&self, wait: Duration) -> Outcome {
        let start = Instant::now();
        if let Err(e) = self.socket.set_read_timeout(Some(wait)) {
            return Outcome::Error(e.to_string());
        }
        if let Err(e) = self.socket.send(b"ping\n") {
            return Outcome::from_error(&e, start);
        }
        let mut buf = [0_u8; 1500];
        match self.socket.recv(&mut buf) {
            Ok(len) => Answer::parse(&String::from_utf8_lossy(&buf[..len]), self.local)
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

/// N fresh TCP connections from NS, one request each.
fn tcp_batch(ns: &str, to: SocketAddr, n: usize) -> Vec<Answer> {
    let outcomes = in_netns(ns, || batch(n, || tcp_request(to, IO_TIMEOUT)));
    expect_answers(&format!("TCP {to} from {ns}"), outcomes)
}

/// N requests from fresh connected UDP sockets in NS (3 tries each).
fn udp_batch(ns: &str, to: SocketAddr, n: usize) -> Vec<Answer> {
    let outcomes = in_netns(ns, || {
        batch(n, || udp_request(to, 3, Duration::from_millis(700)))
    });
    expect_answers(&format!("UDP {to} from {ns}"), outcomes)
}

fn tcp_once(ns: &str, to: SocketAddr, connect_timeout: Duration) -> Outcome {
    in_netns(ns, || tcp_request(to, connect_timeout))
}

fn udp_once(ns: &str, to: SocketAddr, wait: Duration) -> Outcome {
    in_netns(ns, || udp_request(to, 1, wait))
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

fn counts(answers: &[Answer]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for a in answers {
        *counts.entry(a.who()).or_insert(0) += 1;
    }
    counts
}

/// The answering set (`be1:8080`, ...) is exactly EXPECTED.
fn assert_spread(what: &str, answers: &[Answer], expected: &[&str]) {
    let counts = counts(answers);
    eprintln!("{what}: {counts:?}");
    let seen: BTreeSet<String> = counts.keys().cloned().collect();
    assert_eq!(
        seen,
        set(expected),
        "{what}: wrong set of answering endpoints ({counts:?})"
    );
}

/// Every answer came from ALLOWED.
fn assert_only(what: &str, answers: &[Answer], allowed: &[&str]) {
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
fn assert_source_preserved(what: &str, answers: &[Answer]) {
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

/// Answers from LOCAL backends saw the client itself; the others saw
/// `NODE_IP` with a port of the source NAT range.
fn assert_nodeport_sources(what: &str, answers: &[Answer], local: &[&str], node_ip: IpAddr) {
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
fn assert_sticky(what: &str, answers: &[Answer]) -> String {
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

/// A UDP client (connected socket) or an IPv4 TCP client is refused within
/// `REFUSED_WITHIN`.
fn assert_refused(what: &str, outcome: &Outcome) {
    assert_refused_within(what, outcome, REFUSED_WITHIN);
}

/// A TCP client of FAMILY is refused at once. For IPv6 the allowance is one
/// SYN retransmission longer: on a veth the datapath's `ICMPv6` error reaches
/// the client synchronously, while `connect()` still holds the socket lock,
/// and Linux's `tcp_v6_err` then only records a soft error
/// (`TcpExtLockDroppedIcmps`); the answer to the retransmitted SYN (1 s
/// later) refuses the connection. The kernel's own `nft ... reject` (what
/// kube-proxy uses) behaves exactly the same in this topology; a dropped
/// SYN would instead run into the connect timeout.
fn assert_tcp_refused(what: &str, family: Family, outcome: &Outcome) {
    let limit = match family {
        Family::V4 => REFUSED_WITHIN,
        Family::V6 => TCP6_REFUSED_WITHIN,
    };
    assert_refused_within(what, outcome, limit);
}

fn assert_refused_within(what: &str, outcome: &Outcome, limit: Duration) {
    match outcome {
        Outcome::Refused(after) if *after < limit => {
            eprintln!("{what}: refused after {after:?}");
        }
        other => panic!(
            "{what}: expected connection refused within {limit:?} (ICMP port unreachable \
             from the datapath), got {other:?}"
        ),
    }
}

fn assert_timeout(what: &str, outcome: &Outcome) {
    assert!(
        matches!(outcome, Outcome::Timeout),
        "{what}: expected the client to be dropped (timeout), got {outcome:?}"
    );
    eprintln!("{what}: dropped (timeout)");
}

fn assert_unanswered(what: &str, outcome: &Outcome) {
    assert!(
        !matches!(outcome, Outcome::Answer(_)),
        "{what}: no endpoint may answer, got {outcome:?}"
    );
    eprintln!("{what}: not answered ({outcome:?})");
}

/// Opens TCP connections from NS to TO until one lands on BACKEND (bounded).
fn conn_to(ns: &str, to: SocketAddr, backend: &str) -> Conn {
    for _ in 0..60 {
        let mut conn = Conn::open(ns, to).unwrap_or_else(|o| panic!("connect {to}: {o:?}"));
        if conn.ask().answer(&format!("TCP {to}")).backend == backend {
            return conn;
        }
    }
    panic!("60 TCP connections to {to}, none landed on {backend}");
}

/// Opens UDP sockets from NS to TO until one's flow lands on BACKEND.
fn udp_flow_to(ns: &str, to: SocketAddr, backend: &str) -> UdpFlow {
    for _ in 0..60 {
        let flow = UdpFlow::open(ns, to);
        if flow.ask(IO_TIMEOUT).answer(&format!("UDP {to}")).backend == backend {
            return flow;
        }
    }
    panic!("60 UDP sockets to {to}, none landed on {backend}");
}

/// HTTP/1.0 GET from a thread in NS; returns status and body.
fn http_get(ns: &str, addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
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
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

// ---------------------------------------------------------------------------
// Manifests (JSON: a `kind: List` per file)
// ---------------------------------------------------------------------------

/// A Service port; TARGET is a number or a port name.
#[derive(Clone, Copy, Debug)]
struct SvcPort {
    name: &'static str,
    port: u16,
    proto: &'static str,
    target: &'static str,
    node_port: Option<u16>,
}

const fn sp(name: &'static str, port: u16, proto: &'static str, target: &'static str) -> SvcPort {
    SvcPort {
        name,
        port,
        proto,
        target,
        node_port: None,
    }
}

impl SvcPort {
    const fn node(self, node_port: u16) -> Self {
        Self {
            node_port: Some(node_port),
            ..self
        }
    }
}

/// `http` 80/TCP and `dns` 53/UDP, both to 8080.
const HTTP_DNS: [SvcPort; 2] = [sp("http", 80, "TCP", "8080"), sp("dns", 53, "UDP", "8080")];
/// The matching `EndpointSlice` ports.
const HTTP_DNS_EP: [(&str, u16, &str); 2] = [("http", 8080, "TCP"), ("dns", 8080, "UDP")];

/// A dual-stack Service N (`ClusterIP`s `vip(N)`) of TYPE.
fn service(name: &str, n: u8, type_: &str, ports: &[SvcPort]) -> Value {
    let vip = vip(n);
    let ports: Vec<Value> = ports
        .iter()
        .map(|p| {
            let target = p
                .target
                .parse::<u16>()
                .map_or_else(|_| json!(p.target), |n| json!(n));
            let mut v = json!({
                "name": p.name, "port": p.port, "protocol": p.proto, "targetPort": target,
            });
            if let Some(node_port) = p.node_port {
                v["nodePort"] = json!(node_port);
            }
            v
        })
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "type": type_,
            "clusterIP": vip.v4.to_string(),
            "clusterIPs": [vip.v4.to_string(), vip.v6.to_string()],
            "ipFamilies": ["IPv4", "IPv6"],
            "ipFamilyPolicy": "RequireDualStack",
            "ports": ports,
        },
    })
}

/// Endpoint conditions.
#[derive(Clone, Copy, Debug)]
enum Cond {
    /// ready, serving, not terminating.
    Ready,
    /// not ready, not serving, not terminating.
    NotReady,
    /// not ready, serving, terminating (draining but still able to serve).
    ServingTerminating,
    /// not ready, not serving, terminating.
    Terminating,
}

impl Cond {
    fn json(self) -> Value {
        let (ready, serving, terminating) = match self {
            Self::Ready => (true, true, false),
            Self::NotReady => (false, false, false),
            Self::ServingTerminating => (false, true, true),
            Self::Terminating => (false, false, true),
        };
        json!({"ready": ready, "serving": serving, "terminating": terminating})
    }
}

/// An endpoint of a slice: the pod, its conditions, its zone and zone hint.
#[derive(Clone, Copy, Debug)]
struct Ep {
    pod: &'static str,
    cond: Cond,
    zone: Option<&'static str>,
    hint: Option<&'static str>,
}

const fn ep(pod: &'static str, cond: Cond) -> Ep {
    Ep {
        pod,
        cond,
        zone: None,
        hint: None,
    }
}

const fn ready(pod: &'static str) -> Ep {
    ep(pod, Cond::Ready)
}

impl Ep {
    const fn zoned(self, zone: &'static str, hint: Option<&'static str>) -> Self {
        Self {
            zone: Some(zone),
            hint,
            ..self
        }
    }
}

fn list(items: Vec<Value>) -> Value {
    let mut list = json!({"apiVersion": "v1", "kind": "List"});
    list["items"] = Value::Array(items);
    list
}

// ---------------------------------------------------------------------------
// `lb services --json`
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct View {
    addr: IpAddr,
    port: u16,
    proto: String,
    /// (address, state, local).
    backends: Vec<(SocketAddr, String, bool)>,
}

fn parse_services(json: &str) -> Result<Vec<View>, String> {
    let value: Value = serde_json::from_str(json).map_err(|e| format!("not JSON ({e}): {json}"))?;
    let list = value
        .as_array()
        .ok_or_else(|| format!("not a JSON array: {json}"))?;
    let ip = |v: &Value| -> Result<IpAddr, String> {
        v.as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad address {v}"))
    };
    let port = |v: &Value| -> Result<u16, String> {
        v.as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .ok_or_else(|| format!("bad port {v}"))
    };
    let mut out = Vec::new();
    for svc in list {
        let mut backends = Vec::new();
        for be in svc["backends"]
            .as_array()
            .ok_or_else(|| format!("backends is not an array in {svc}"))?
        {
            backends.push((
                SocketAddr::new(ip(&be["address"])?, port(&be["port"])?),
                be["state"].as_str().unwrap_or("?").to_ascii_lowercase(),
                be["local"].as_bool().unwrap_or(false),
            ));
        }
        out.push(View {
            addr: ip(&svc["address"])?,
            port: port(&svc["port"])?,
            proto: svc["protocol"]
                .as_str()
                .ok_or("bad protocol")?
                .to_ascii_uppercase(),
            backends,
        });
    }
    Ok(out)
}

/// (address, port, protocol) of a frontend.
type Fe = (IpAddr, u16, String);

fn fe(addr: IpAddr, port: u16, proto: &str) -> Fe {
    (addr, port, proto.to_owned())
}

// ---------------------------------------------------------------------------
// The lab: topology + servers + manifest directory + two agents
// ---------------------------------------------------------------------------

/// Fields drop in declaration order, the teardown order: agents, pins
/// (need the node namespaces), servers, namespaces, files.
struct Lab {
    agents: Vec<ChildGuard>,
    pins: Vec<PinGuard>,
    _servers: Servers,
    topo: Topology,
    _work: TempDir,
    manifests: PathBuf,
    staging: PathBuf,
    logs: Vec<PathBuf>,
}

impl Lab {
    fn new(what: &str) -> Self {
        for tool in ["ip", "nsenter"] {
            assert!(
                have_program(tool),
                "the harness needs `{tool}` on PATH (iproute2, util-linux)"
            );
        }
        sweep_stale_netns(TAG);
        common::sweep_stale_pins(PIN_TAG);
        let started = Instant::now();
        let prefix = unique_prefix(TAG);
        let work = TempDir(std::env::temp_dir().join(&prefix));
        let manifests = work.0.join("manifests");
        let staging = work.0.join("staging");
        for dir in [&manifests, &staging] {
            std::fs::create_dir_all(dir)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        }
        let topo = Topology::build(&prefix);
        let servers = Servers::start(&topo);
        let pins: Vec<PinGuard> = topo
            .nodes
            .iter()
            .map(|node| PinGuard {
                path: Path::new(common::BPFFS).join(unique_prefix(PIN_TAG)),
                node_ns: node.ns.clone(),
            })
            .collect();
        let logs: Vec<PathBuf> = topo
            .nodes
            .iter()
            .map(|node| work.0.join(format!("agent-{}.log", node.name)))
            .collect();
        eprintln!(
            "lab {prefix} ({what}): manifests {}, work {}",
            manifests.display(),
            work.0.display()
        );
        let mut lab = Self {
            agents: Vec::new(),
            pins,
            _servers: servers,
            topo,
            _work: work,
            manifests,
            staging,
            logs,
        };
        for i in 0..lab.topo.nodes.len() {
            lab.start_agent(i);
        }
        for i in 0..lab.topo.nodes.len() {
            lab.wait_ready(i);
        }
        eprintln!("lab {prefix} up in {:?}", started.elapsed());
        lab
    }

    fn start_agent(&mut self, i: usize) {
        let node = &self.topo.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.logs[i])
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", self.logs[i].display()));
        let stderr = log.try_clone().expect("clone log file handle");
        let mut cmd = ns_command(&node.ns, lb_binary());
        cmd.arg("agent")
            .arg("--source")
            .arg(format!("file:{}", self.manifests.display()))
            .arg("--attach")
            .arg(node.ifaces.join(","))
            .arg("--pin-path")
            .arg(&self.pins[i].path)
            .arg("--metrics-addr")
            .arg(METRICS_ADDR)
            .arg("--node-name")
            .arg(node.name)
            .arg("--node-ip")
            .arg(format!("{},{}", node.ips.v4, node.ips.v6))
            .arg("--zone")
            .arg(node.zone)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        self.agents.push(ChildGuard(child));
    }

    fn assert_agents_alive(&mut self) {
        for (i, agent) in self.agents.iter_mut().enumerate() {
            if let Ok(Some(status)) = agent.0.try_wait() {
                panic!("the agent of {} exited ({status})", self.topo.nodes[i].name);
            }
        }
    }

    fn metrics_addr() -> SocketAddr {
        METRICS_ADDR.parse().expect("valid metrics address")
    }

    fn wait_ready(&mut self, i: usize) {
        let start = Instant::now();
        let mut last = String::from("never asked");
        while start.elapsed() < Duration::from_secs(15) {
            self.assert_agents_alive();
            match http_get(&self.topo.nodes[i].ns, Self::metrics_addr(), "/readyz") {
                Ok((200, _)) => return,
                Ok((code, body)) => last = format!("HTTP {code} {body}"),
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "agent of {} not ready within 15 s (last /readyz: {last})",
            self.topo.nodes[i].name
        );
    }

    /// `lb_sync_total` of agent I (completed syncs).
    fn syncs(&self, i: usize) -> Result<u64, String> {
        let (status, body) = http_get(&self.topo.nodes[i].ns, Self::metrics_addr(), "/metrics")?;
        if status != 200 {
            return Err(format!("/metrics: HTTP {status}"));
        }
        body.lines()
            .find_map(|line| line.strip_prefix("lb_sync_total "))
            .and_then(|n| n.trim().parse().ok())
            .ok_or_else(|| "no lb_sync_total in /metrics".to_owned())
    }

    fn all_syncs(&self) -> Vec<u64> {
        (0..self.topo.nodes.len())
            .map(|i| self.syncs(i).unwrap_or_else(|e| panic!("{e}")))
            .collect()
    }

    /// Waits until every agent completed a sync after BEFORE was read (the
    /// file source sends a snapshot only when a file changed, so that sync
    /// carried the change).
    fn wait_synced(&mut self, before: &[u64], since: Instant, what: &str) -> Duration {
        let mut now = Vec::new();
        while since.elapsed() < APPLY_DEADLINE {
            self.assert_agents_alive();
            now = self.all_syncs();
            if now.iter().zip(before).all(|(n, b)| n > b) {
                let took = since.elapsed();
                eprintln!("{what}: applied by both agents {took:?} after the rename");
                return took;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "{what}: not applied by both agents within {APPLY_DEADLINE:?} (lb_sync_total \
             before {before:?}, now {now:?})"
        );
    }

    /// Writes FILE atomically (temp + rename) and waits until both agents
    /// synced it.
    fn apply(&mut self, file: &str, content: &Value) -> Duration {
        let before = self.all_syncs();
        let tmp = self.staging.join(file);
        let text = serde_json::to_string_pretty(content).expect("serialisable manifest");
        std::fs::write(&tmp, text)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", tmp.display()));
        let dst = self.manifests.join(file);
        std::fs::rename(&tmp, &dst)
            .unwrap_or_else(|e| panic!("cannot rename to {}: {e}", dst.display()));
        self.wait_synced(&before, Instant::now(), file)
    }

    fn pod(&self, name: &str) -> &Host {
        self.topo.host(name)
    }

    fn ns(&self, name: &str) -> String {
        self.topo.host(name).ns.clone()
    }

    fn node_ip(&self, i: usize, family: Family) -> IpAddr {
        self.topo.nodes[i].ips.get(family)
    }

    /// One `EndpointSlice` per family for SERVICE (GROUP distinguishes
    /// several slices of one Service).
    fn slices(
        &self,
        service: &str,
        group: &str,
        ports: &[(&str, u16, &str)],
        eps: &[Ep],
    ) -> Vec<Value> {
        Family::BOTH
            .iter()
            .map(|&family| {
                let endpoints: Vec<Value> = eps
                    .iter()
                    .map(|e| {
                        let host = self.pod(e.pod);
                        let mut v = json!({
                            "addresses": [host.addr.get(family).to_string()],
                            "conditions": e.cond.json(),
                            "nodeName": self.topo.nodes[host.node].name,
                        });
                        if let Some(zone) = e.zone {
                            v["zone"] = json!(zone);
                        }
                        if let Some(hint) = e.hint {
                            v["hints"] = json!({"forZones": [{"name": hint}]});
                        }
                        v
                    })
                    .collect();
                let ports: Vec<Value> = ports
                    .iter()
                    .map(|(name, port, proto)| json!({"name": name, "port": port, "protocol": proto}))
                    .collect();
                json!({
                    "apiVersion": "discovery.k8s.io/v1",
                    "kind": "EndpointSlice",
                    "metadata": {
                        "name": format!("{service}-{group}-{}", family.suffix()),
                        "namespace": "default",
                        "labels": {"kubernetes.io/service-name": service},
                    },
                    "addressType": family.address_type(),
                    "ports": ports,
                    "endpoints": endpoints,
                })
            })
            .collect()
    }

    /// SERVICE (named NAME) plus one slice per family with EPS on
    /// `http`/`dns` 8080.
    fn simple(&self, name: &str, service: Value, eps: &[Ep]) -> Value {
        let mut items = vec![service];
        items.extend(self.slices(name, "a", &HTTP_DNS_EP, eps));
        list(items)
    }

    fn services(&self, i: usize) -> Result<Vec<View>, String> {
        let mut cmd = Command::new(lb_binary());
        cmd.args(["services", "--json", "--pin-path"])
            .arg(&self.pins[i].path);
        let out = output_with_timeout(&mut cmd, Duration::from_secs(10))
            .map_err(|e| format!("lb services: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "lb services failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        parse_services(&String::from_utf8_lossy(&out.stdout))
    }

    fn views(&self, i: usize) -> Vec<View> {
        self.services(i).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Every frontend in agent I's maps.
    fn frontends(&self, i: usize) -> BTreeSet<Fe> {
        self.views(i)
            .into_iter()
            .map(|v| (v.addr, v.port, v.proto))
            .collect()
    }

    /// The backends (`be1:8080`, ...) in the slots of frontend
    /// ADDR:PORT/PROTO of agent I; `None` when there is no such frontend.
    fn slot_names(
        &self,
        i: usize,
        addr: IpAddr,
        port: u16,
        proto: &str,
    ) -> Option<BTreeSet<String>> {
        self.views(i)
            .into_iter()
            .find(|v| v.addr == addr && v.port == port && v.proto == proto)
            .map(|v| {
                v.backends
                    .iter()
                    .map(|(a, _, _)| format!("{}:{}", self.topo.name_of(a.ip()), a.port()))
                    .collect()
            })
    }

    /// Frontend ADDR:PORT/PROTO of agent I takes new flows to EXPECTED.
    fn expect_slots(&self, i: usize, addr: IpAddr, port: u16, proto: &str, expected: &[&str]) {
        let got = self.slot_names(i, addr, port, proto);
        assert_eq!(
            got.as_ref(),
            Some(&set(expected)),
            "`lb services` of {}: frontend {} {proto}: wrong backends in the slots \
             (None: no such frontend)",
            self.topo.nodes[i].name,
            SocketAddr::new(addr, port)
        );
    }

    /// Raw `lb ARGS --pin-path` output of agent I, for diagnostics.
    fn lb_output(&self, i: usize, args: &[&str]) -> String {
        let mut cmd = Command::new(lb_binary());
        cmd.args(args).arg("--pin-path").arg(&self.pins[i].path);
        match output_with_timeout(&mut cmd, Duration::from_secs(10)) {
            Ok(out) => format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => format!("cannot run lb {args:?}: {e}"),
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for (i, node) in self.topo.nodes.iter().enumerate() {
            let log = std::fs::read_to_string(&self.logs[i]).unwrap_or_default();
            let mut text = String::new();
            let _ = writeln!(
                text,
                "======== {} agent log ({}) ========\n{log}",
                node.name,
                self.logs[i].display()
            );
            let _ = writeln!(
                text,
                "======== {} `lb services` ========\n{}",
                node.name,
                self.lb_output(i, &["services"])
            );
            let _ = writeln!(
                text,
                "======== {} `lb conntrack` ========\n{}======== end of {} ========",
                node.name,
                self.lb_output(i, &["conntrack"]),
                node.name
            );
            eprintln!("{text}");
        }
    }
}

// ---------------------------------------------------------------------------
// Sub-scenarios
// ---------------------------------------------------------------------------

/// The named sub-scenarios of one test: a failing one is recorded and the
/// next one still runs (each sets up the manifests it needs), so that one
/// run reports every failing behaviour; `finish` then fails the test with
/// the list (and the lab prints both agents' logs).
#[derive(Default)]
struct Scenarios {
    passed: Vec<String>,
    failed: Vec<String>,
}

impl Scenarios {
    fn run(&mut self, name: &str, scenario: impl FnOnce()) {
        eprintln!("---- scenario: {name}");
        match std::panic::catch_unwind(AssertUnwindSafe(scenario)) {
            Ok(()) => {
                eprintln!("---- passed: {name}");
                self.passed.push(name.to_owned());
            }
            Err(payload) => {
                let message = payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_else(|| "(no message)".to_owned());
                eprintln!("---- FAILED: {name}");
                self.failed.push(format!("{name}: {message}"));
            }
        }
    }

    fn finish(self, lab: &mut Lab) {
        lab.assert_agents_alive();
        eprintln!("{} scenarios passed: {:#?}", self.passed.len(), self.passed);
        assert!(
            self.failed.is_empty(),
            "{} of {} scenarios failed:\n{}",
            self.failed.len(),
            self.failed.len() + self.passed.len(),
            self.failed.join("\n\n")
        );
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// The topology alone (agents running, no Services): pods and external
/// clients reach every backend directly, both families, through the nodes'
/// routing and the fabric. If this fails, the problem is the harness or the
/// host, not the load balancer.
#[test]
fn topology_routes_directly() {
    let _serial = serial();
    if !require_privileged("harness_services: topology_routes_directly") {
        return;
    }
    let lab = Lab::new("routes");
    for from in ["client1", "ext", "ext2", "be4"] {
        for be in BACKENDS {
            for family in Family::BOTH {
                let to = lab.pod(be).addr.sock(family, 8080);
                let what = format!("{from} -> {be} {to}");
                let expected = format!("{be}:8080");
                let answers = tcp_batch(&lab.ns(from), to, 1);
                assert_spread(&what, &answers, &[expected.as_str()]);
                assert_source_preserved(&what, &answers);
                let answers = udp_batch(&lab.ns(from), to, 1);
                assert_spread(&what, &answers, &[expected.as_str()]);
            }
        }
    }
}

/// Behaviours 1, 2 and 5: multi-port Services with the same port on TCP
/// and UDP and a named targetPort resolved per slice; unserved ports and
/// Services without usable endpoints refused at once; internalTrafficPolicy
/// Local (only this node's endpoints; none: refused).
#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario per behaviour, sharing one topology"
)]
fn ports_reject_and_internal_traffic_policy() {
    let _serial = serial();
    if !require_privileged("harness_services: ports_reject_and_internal_traffic_policy") {
        return;
    }
    let mut lab = Lab::new("ports");
    let client = lab.ns("client1");

    // multi (10): http 80/TCP and dns 80/UDP -> named port "web" (8080 in
    // slice a for be1/be2, 9090 in slice b for be3); alt 81/TCP -> 9090.
    let mut items = vec![service(
        "multi",
        10,
        "ClusterIP",
        &[
            sp("http", 80, "TCP", "web"),
            sp("dns", 80, "UDP", "web"),
            sp("alt", 81, "TCP", "9090"),
        ],
    )];
    items.extend(lab.slices(
        "multi",
        "a",
        &[
            ("http", 8080, "TCP"),
            ("dns", 8080, "UDP"),
            ("alt", 9090, "TCP"),
        ],
        &[ready("be1"), ready("be2")],
    ));
    items.extend(lab.slices(
        "multi",
        "b",
        &[
            ("http", 9090, "TCP"),
            ("dns", 9090, "UDP"),
            ("alt", 9090, "TCP"),
        ],
        &[ready("be3")],
    ));
    lab.apply("multi.json", &list(items));
    // empty (11): a slice without endpoints; unready (14): only not-ready,
    // not-serving endpoints; noslice (15): no slice at all.
    let empty = lab.simple("empty", service("empty", 11, "ClusterIP", &HTTP_DNS), &[]);
    lab.apply("empty.json", &empty);
    let unready = lab.simple(
        "unready",
        service("unready", 14, "ClusterIP", &HTTP_DNS),
        &[ep("be1", Cond::NotReady), ep("be2", Cond::NotReady)],
    );
    lab.apply("unready.json", &unready);
    lab.apply(
        "noslice.json",
        &list(vec![service("noslice", 15, "ClusterIP", &HTTP_DNS)]),
    );
    // itp (12): internalTrafficPolicy Local, endpoints on both nodes;
    // itp-remote (13): the same with endpoints on node2 only.
    let mut itp = service("itp", 12, "ClusterIP", &HTTP_DNS);
    itp["spec"]["internalTrafficPolicy"] = json!("Local");
    let itp = lab.simple("itp", itp, &[ready("be1"), ready("be2"), ready("be3")]);
    lab.apply("itp.json", &itp);
    let mut itp_remote = service("itp-remote", 13, "ClusterIP", &HTTP_DNS);
    itp_remote["spec"]["internalTrafficPolicy"] = json!("Local");
    let itp_remote = lab.simple("itp-remote", itp_remote, &[ready("be3"), ready("be4")]);
    lab.apply("itp-remote.json", &itp_remote);

    let mut sc = Scenarios::default();
    for family in Family::BOTH {
        sc.run(
            &format!("{family:?} multi-port, same port TCP+UDP, named targetPort per slice"),
            || {
                let v = vip(10).get(family);
                for i in 0..2 {
                    lab.expect_slots(i, v, 80, "TCP", &["be1:8080", "be2:8080", "be3:9090"]);
                    lab.expect_slots(i, v, 80, "UDP", &["be1:8080", "be2:8080", "be3:9090"]);
                    lab.expect_slots(i, v, 81, "TCP", &["be1:9090", "be2:9090", "be3:9090"]);
                }
                let what = format!("{family:?} multi TCP 80");
                let answers = tcp_batch(&client, vip(10).sock(family, 80), 30);
                assert_spread(&what, &answers, &["be1:8080", "be2:8080", "be3:9090"]);
                assert_source_preserved(&what, &answers);
                let what = format!("{family:?} multi UDP 80");
                let answers = udp_batch(&client, vip(10).sock(family, 80), 24);
                assert_spread(&what, &answers, &["be1:8080", "be2:8080", "be3:9090"]);
                assert_source_preserved(&what, &answers);
                let what = format!("{family:?} multi TCP 81 (numeric targetPort 9090)");
                let answers = tcp_batch(&client, vip(10).sock(family, 81), 24);
                assert_spread(&what, &answers, &["be1:9090", "be2:9090", "be3:9090"]);
            },
        );
        sc.run(
            &format!("{family:?} ports the Service does not define are refused"),
            || {
                assert_tcp_refused(
                    &format!("{family:?} multi TCP 82 (unserved port)"),
                    family,
                    &tcp_once(&client, vip(10).sock(family, 82), REFUSE_CONNECT_TIMEOUT),
                );
                assert_refused(
                    &format!("{family:?} multi UDP 81 (port only defined for TCP)"),
                    &udp_once(&client, vip(10).sock(family, 81), IO_TIMEOUT),
                );
                assert_refused(
                    &format!("{family:?} multi UDP 82 (unserved port)"),
                    &udp_once(&client, vip(10).sock(family, 82), IO_TIMEOUT),
                );
            },
        );
        sc.run(
            &format!("{family:?} no usable endpoints: refused at once"),
            || {
                for (n, name) in [(11, "empty"), (14, "unready"), (15, "noslice")] {
                    lab.expect_slots(0, vip(n).get(family), 80, "TCP", &[]);
                    assert_tcp_refused(
                        &format!("{family:?} {name} TCP"),
                        family,
                        &tcp_once(&client, vip(n).sock(family, 80), REFUSE_CONNECT_TIMEOUT),
                    );
                    assert_refused(
                        &format!("{family:?} {name} UDP"),
                        &udp_once(&client, vip(n).sock(family, 53), IO_TIMEOUT),
                    );
                }
            },
        );
        sc.run(&format!("{family:?} internalTrafficPolicy Local"), || {
            let v = vip(12).get(family);
            lab.expect_slots(0, v, 80, "TCP", &["be1:8080", "be2:8080"]);
            lab.expect_slots(1, v, 80, "TCP", &["be3:8080"]);
            let what = format!("{family:?} itp Local TCP");
            let answers = tcp_batch(&client, vip(12).sock(family, 80), 30);
            assert_spread(&what, &answers, &["be1:8080", "be2:8080"]);
            assert_source_preserved(&what, &answers);
            let what = format!("{family:?} itp Local UDP");
            let answers = udp_batch(&client, vip(12).sock(family, 53), 16);
            assert_spread(&what, &answers, &["be1:8080", "be2:8080"]);
            lab.expect_slots(0, vip(13).get(family), 80, "TCP", &[]);
            assert_tcp_refused(
                &format!("{family:?} itp Local without local endpoints TCP"),
                family,
                &tcp_once(&client, vip(13).sock(family, 80), REFUSE_CONNECT_TIMEOUT),
            );
            assert_refused(
                &format!("{family:?} itp Local without local endpoints UDP"),
                &udp_once(&client, vip(13).sock(family, 53), IO_TIMEOUT),
            );
        });
    }
    sc.finish(&mut lab);
}

/// Checks a kube-proxy style health-check answer. `localEndpoints` counts
/// local ready endpoint addresses over both families (the model's rule: a
/// dual-stack pod counts once per family).
fn assert_health(
    what: &str,
    got: Result<(u16, String), String>,
    status: u16,
    local: u64,
    name: &str,
) {
    let (code, body) = got.unwrap_or_else(|e| panic!("{what}: {e}"));
    eprintln!("{what}: HTTP {code} {body}");
    assert_eq!(code, status, "{what}: HTTP status (body {body})");
    let json: Value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("{what}: body not JSON ({e}): {body}"));
    assert_eq!(
        json["localEndpoints"].as_u64(),
        Some(local),
        "{what}: localEndpoints in {body}"
    );
    assert_eq!(
        json["service"]["name"].as_str(),
        Some(name),
        "{what}: service name in {body}"
    );
}

/// Behaviours 3 and 4: `NodePort` on both nodes' addresses with
/// externalTrafficPolicy Cluster (source NAT for remote endpoints only) and
/// Local (node-local endpoints, source preserved, health check); a
/// `LoadBalancer` ingress IP and an external IP, with source ranges enforced
/// on every external path of the Service.
#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario per behaviour, sharing one topology"
)]
fn nodeport_loadbalancer_and_external_ips() {
    let _serial = serial();
    if !require_privileged("harness_services: nodeport_loadbalancer_and_external_ips") {
        return;
    }
    let mut lab = Lab::new("nodeport");
    let ext = lab.ns("ext");
    let ext2 = lab.ns("ext2");
    let client = lab.ns("client1");
    let node2_ns = lab.topo.nodes[1].ns.clone();

    let np_cluster = service(
        "np-cluster",
        20,
        "NodePort",
        &[HTTP_DNS[0].node(30080), HTTP_DNS[1].node(30053)],
    );
    let np_cluster = lab.simple("np-cluster", np_cluster, &[ready("be1"), ready("be3")]);
    lab.apply("np-cluster.json", &np_cluster);

    let mut np_local = service(
        "np-local",
        21,
        "NodePort",
        &[HTTP_DNS[0].node(30081), HTTP_DNS[1].node(30054)],
    );
    np_local["spec"]["externalTrafficPolicy"] = json!("Local");
    np_local["spec"]["healthCheckNodePort"] = json!(32001);
    np_local["spec"]["externalIPs"] = json!([ext_ip(21).v4.to_string(), ext_ip(21).v6.to_string()]);
    let np_local_all = lab.simple(
        "np-local",
        np_local.clone(),
        &[ready("be1"), ready("be2"), ready("be3")],
    );
    lab.apply("np-local.json", &np_local_all);

    let mut lb = service(
        "lb",
        22,
        "LoadBalancer",
        &[HTTP_DNS[0].node(30082), HTTP_DNS[1].node(30055)],
    );
    lb["spec"]["externalIPs"] = json!([ext_ip(22).v4.to_string(), ext_ip(22).v6.to_string()]);
    lb["spec"]["loadBalancerSourceRanges"] = json!(["198.18.200.0/24", "fd00:200::/64"]);
    lb["status"]["loadBalancer"]["ingress"] = json!([
        {"ip": lb_ip(22).v4.to_string()},
        {"ip": lb_ip(22).v6.to_string()},
    ]);
    let lb = lab.simple("lb", lb, &[ready("be1"), ready("be3")]);
    lab.apply("lb.json", &lb);

    let mut sc = Scenarios::default();
    for family in Family::BOTH {
        let n1 = lab.node_ip(0, family);
        let n2 = lab.node_ip(1, family);
        sc.run(
            &format!("{family:?} LoadBalancer IP and external IP from ext"),
            || {
                for (path, to) in [
                    ("LB IP", lb_ip(22).sock(family, 80)),
                    ("external IP", ext_ip(22).sock(family, 80)),
                ] {
                    lab.expect_slots(0, to.ip(), 80, "TCP", &["be1:8080", "be3:8080"]);
                    let what = format!("{family:?} ext -> lb {path} {to} TCP");
                    let answers = tcp_batch(&ext, to, 30);
                    assert_spread(&what, &answers, &["be1:8080", "be3:8080"]);
                    assert_nodeport_sources(&what, &answers, &["be1", "be2"], n1);
                }
                let what = format!("{family:?} ext -> lb LB IP UDP");
                let answers = udp_batch(&ext, lb_ip(22).sock(family, 53), 16);
                assert_spread(&what, &answers, &["be1:8080", "be3:8080"]);
                assert_nodeport_sources(&what, &answers, &["be1", "be2"], n1);
            },
        );
        sc.run(
            &format!("{family:?} loadBalancerSourceRanges deny ext2 on every path"),
            || {
                // Control: through the same node, ext2 reaches the external
                // IP of a Service without source ranges (np-local: node1's
                // endpoints, no source NAT).
                let what = format!("{family:?} ext2 -> np-local external IP (no ranges)");
                let answers = tcp_batch(&ext2, ext_ip(21).sock(family, 80), 6);
                assert_only(&what, &answers, &["be1:8080", "be2:8080"]);
                assert_source_preserved(&what, &answers);
                for (path, to) in [
                    ("LB IP", lb_ip(22).sock(family, 80)),
                    ("external IP", ext_ip(22).sock(family, 80)),
                    ("node1 NodePort", SocketAddr::new(n1, 30082)),
                    ("node2 NodePort", SocketAddr::new(n2, 30082)),
                ] {
                    assert_timeout(
                        &format!("{family:?} ext2 -> lb {path} {to} TCP"),
                        &tcp_once(&ext2, to, DENIED_WAIT),
                    );
                }
                assert_timeout(
                    &format!("{family:?} ext2 -> lb LB IP UDP"),
                    &udp_once(&ext2, lb_ip(22).sock(family, 53), DENIED_WAIT),
                );
            },
        );
        sc.run(
            &format!("{family:?} LoadBalancer NodePorts allow ext"),
            || {
                for (i, node_ip, local) in [(0, n1, ["be1", "be2"]), (1, n2, ["be3", "be4"])] {
                    let what = format!("{family:?} ext -> lb node{} NodePort TCP", i + 1);
                    let answers = tcp_batch(&ext, SocketAddr::new(node_ip, 30082), 30);
                    assert_spread(&what, &answers, &["be1:8080", "be3:8080"]);
                    assert_nodeport_sources(&what, &answers, &local, node_ip);
                }
            },
        );
        sc.run(
            &format!("{family:?} NodePort externalTrafficPolicy Cluster"),
            || {
                lab.expect_slots(0, n1, 30080, "TCP", &["be1:8080", "be3:8080"]);
                lab.expect_slots(1, n2, 30080, "TCP", &["be1:8080", "be3:8080"]);
                let what = format!("{family:?} ext -> node1 NodePort TCP");
                let answers = tcp_batch(&ext, SocketAddr::new(n1, 30080), 30);
                assert_spread(&what, &answers, &["be1:8080", "be3:8080"]);
                assert_nodeport_sources(&what, &answers, &["be1", "be2"], n1);
                let what = format!("{family:?} ext -> node2 NodePort TCP");
                let answers = tcp_batch(&ext, SocketAddr::new(n2, 30080), 30);
                assert_spread(&what, &answers, &["be1:8080", "be3:8080"]);
                assert_nodeport_sources(&what, &answers, &["be3", "be4"], n2);
                let what = format!("{family:?} ext -> node1 NodePort UDP");
                let answers = udp_batch(&ext, SocketAddr::new(n1, 30053), 24);
                assert_spread(&what, &answers, &["be1:8080", "be3:8080"]);
                assert_nodeport_sources(&what, &answers, &["be1", "be2"], n1);
            },
        );
        sc.run(
            &format!("{family:?} NodePort externalTrafficPolicy Local"),
            || {
                lab.expect_slots(0, n1, 30081, "TCP", &["be1:8080", "be2:8080"]);
                lab.expect_slots(1, n2, 30081, "TCP", &["be3:8080"]);
                let what = format!("{family:?} ext -> node1 NodePort (ETP Local) TCP");
                let answers = tcp_batch(&ext, SocketAddr::new(n1, 30081), 30);
                assert_spread(&what, &answers, &["be1:8080", "be2:8080"]);
                assert_source_preserved(&what, &answers);
                let what = format!("{family:?} ext -> node2 NodePort (ETP Local) TCP");
                let answers = tcp_batch(&ext, SocketAddr::new(n2, 30081), 10);
                assert_spread(&what, &answers, &["be3:8080"]);
                assert_source_preserved(&what, &answers);
                let what = format!("{family:?} ext -> node1 NodePort (ETP Local) UDP");
                let answers = udp_batch(&ext, SocketAddr::new(n1, 30054), 16);
                assert_only(&what, &answers, &["be1:8080", "be2:8080"]);
                assert_source_preserved(&what, &answers);
                // The ClusterIP of an ETP Local Service still uses every endpoint.
                let what = format!("{family:?} client1 -> np-local ClusterIP");
                let answers = tcp_batch(&client, vip(21).sock(family, 80), 30);
                assert_spread(&what, &answers, &["be1:8080", "be2:8080", "be3:8080"]);
            },
        );
        sc.run(
            &format!("{family:?} healthCheckNodePort with local endpoints"),
            || {
                assert_health(
                    &format!("{family:?} health check of node1 from ext"),
                    http_get(&ext, SocketAddr::new(n1, 32001), "/"),
                    200,
                    4,
                    "np-local",
                );
                assert_health(
                    &format!("{family:?} health check of node2 from node2"),
                    http_get(&node2_ns, SocketAddr::new(n2, 32001), "/"),
                    200,
                    2,
                    "np-local",
                );
            },
        );
    }

    // be3 (node2's only local endpoint) leaves np-local.
    let np_local_node1 = lab.simple("np-local", np_local, &[ready("be1"), ready("be2")]);
    lab.apply("np-local.json", &np_local_node1);
    for family in Family::BOTH {
        let n1 = lab.node_ip(0, family);
        let n2 = lab.node_ip(1, family);
        sc.run(
            &format!("{family:?} healthCheckNodePort 503 without local endpoints"),
            || {
                assert_health(
                    &format!("{family:?} health check of node2 without local endpoints"),
                    http_get(&node2_ns, SocketAddr::new(n2, 32001), "/"),
                    503,
                    0,
                    "np-local",
                );
                assert_health(
                    &format!("{family:?} health check of node1 after the change"),
                    http_get(&ext, SocketAddr::new(n1, 32001), "/"),
                    200,
                    4,
                    "np-local",
                );
            },
        );
        sc.run(
            &format!("{family:?} ETP Local NodePort without local endpoints"),
            || {
                lab.expect_slots(1, n2, 30081, "TCP", &[]);
                assert_unanswered(
                    &format!("{family:?} ext -> node2 NodePort (no local endpoint)"),
                    &tcp_once(&ext, SocketAddr::new(n2, 30081), UNANSWERED_WAIT),
                );
                let what = format!("{family:?} ext -> node1 NodePort (ETP Local) after the change");
                let answers = tcp_batch(&ext, SocketAddr::new(n1, 30081), 20);
                assert_spread(&what, &answers, &["be1:8080", "be2:8080"]);
                assert_source_preserved(&what, &answers);
            },
        );
    }
    sc.finish(&mut lab);
}

/// Behaviour 6: `sessionAffinity: ClientIP`: 15 connections in a row land
/// on one endpoint; after `timeoutSeconds` of silence a new choice is made;
/// switching affinity off spreads again, switching it on (default timeout)
/// sticks again.
#[test]
fn session_affinity_client_ip() {
    let _serial = serial();
    if !require_privileged("harness_services: session_affinity_client_ip") {
        return;
    }
    let mut lab = Lab::new("affinity");
    let client = lab.ns("client1");
    let eps = [ready("be1"), ready("be2"), ready("be3")];
    let all = ["be1:8080", "be2:8080", "be3:8080"];
    let timeout_s: u64 = 2;
    let mut sc = Scenarios::default();

    let mut sticky = service("sticky", 30, "ClusterIP", &HTTP_DNS);
    sticky["spec"]["sessionAffinity"] = json!("ClientIP");
    sticky["spec"]["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"] = json!(timeout_s);
    let file = lab.simple("sticky", sticky, &eps);
    lab.apply("sticky.json", &file);
    let mut first = BTreeMap::new();
    for family in Family::BOTH {
        sc.run(
            &format!("{family:?} ClientIP affinity: 15 in a row"),
            || {
                let what = format!("{family:?} affinity TCP, 15 in a row");
                let backend =
                    assert_sticky(&what, &tcp_batch(&client, vip(30).sock(family, 80), 15));
                first.insert(family, backend);
                let what = format!("{family:?} affinity UDP, 15 in a row");
                assert_sticky(&what, &udp_batch(&client, vip(30).sock(family, 53), 15));
            },
        );
    }

    // After the timeout (no new connection for longer than it), a new
    // choice: bounded attempts, each after a pause longer than the timeout,
    // until another endpoint answers (1/3 chance per attempt to stay).
    sc.run("ClientIP affinity expires after timeoutSeconds", || {
        let mut pending: Vec<Family> = first.keys().copied().collect();
        assert_eq!(pending.len(), 2, "no first choice recorded for some family");
        let mut attempts = 0;
        while !pending.is_empty() && attempts < 8 {
            attempts += 1;
            std::thread::sleep(Duration::from_millis(timeout_s * 1000 + 600));
            pending.retain(|family| {
                let answer = tcp_once(&client, vip(30).sock(*family, 80), IO_TIMEOUT)
                    .answer(&format!("{family:?} affinity after expiry"));
                eprintln!(
                    "{family:?} affinity: attempt {attempts} after the timeout: {} (first {})",
                    answer.backend, first[family]
                );
                answer.backend == first[family]
            });
        }
        assert!(
            pending.is_empty(),
            "{pending:?}: after {attempts} pauses longer than timeoutSeconds ({timeout_s} s), \
             every new connection still landed on the first endpoint: affinity does not expire"
        );
    });

    // Affinity off: spread again.
    let plain = lab.simple(
        "sticky",
        service("sticky", 30, "ClusterIP", &HTTP_DNS),
        &eps,
    );
    lab.apply("sticky.json", &plain);
    for family in Family::BOTH {
        sc.run(&format!("{family:?} affinity switched off: spread"), || {
            let what = format!("{family:?} affinity switched off, TCP");
            assert_spread(
                &what,
                &tcp_batch(&client, vip(30).sock(family, 80), 40),
                &all,
            );
            let what = format!("{family:?} affinity switched off, UDP");
            assert_spread(
                &what,
                &udp_batch(&client, vip(30).sock(family, 53), 30),
                &all,
            );
        });
    }

    // Affinity on again, default timeout (10800 s): sticks.
    let mut sticky = service("sticky", 30, "ClusterIP", &HTTP_DNS);
    sticky["spec"]["sessionAffinity"] = json!("ClientIP");
    let file = lab.simple("sticky", sticky, &eps);
    lab.apply("sticky.json", &file);
    for family in Family::BOTH {
        sc.run(
            &format!("{family:?} affinity switched on again (default timeout)"),
            || {
                let what = format!("{family:?} affinity on again, TCP");
                assert_sticky(&what, &tcp_batch(&client, vip(30).sock(family, 80), 15));
                let what = format!("{family:?} affinity on again, UDP");
                assert_sticky(&what, &udp_batch(&client, vip(30).sock(family, 53), 15));
            },
        );
    }
    sc.finish(&mut lab);
}

/// The flows of the conntrack churn scenario, per family.
struct Flows {
    family: Family,
    keep: Conn,
    udp: UdpFlow,
    doomed: Conn,
}

/// Behaviours 7 and 8: ready / serving / terminating endpoints and
/// `publishNotReadyAddresses`; a terminating endpoint drains its
/// established connection; connection tracking under endpoint churn (TCP
/// keeps its endpoint, UDP moves at once when its endpoint goes, TCP to a
/// removed endpoint is reset).
#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario per behaviour, sharing one topology"
)]
fn endpoint_conditions_and_conntrack_churn() {
    let _serial = serial();
    if !require_privileged("harness_services: endpoint_conditions_and_conntrack_churn") {
        return;
    }
    let mut lab = Lab::new("conditions");
    let client = lab.ns("client1");
    let cond = service("cond", 40, "ClusterIP", &HTTP_DNS);
    let mut sc = Scenarios::default();

    sc.run("ready endpoints only (not-ready excluded)", || {
        let file = lab.simple(
            "cond",
            cond.clone(),
            &[ready("be1"), ep("be2", Cond::NotReady), ready("be3")],
        );
        lab.apply("cond.json", &file);
        for family in Family::BOTH {
            lab.expect_slots(0, vip(40).get(family), 80, "TCP", &["be1:8080", "be3:8080"]);
            let what = format!("{family:?} ready endpoints only, TCP");
            let answers = tcp_batch(&client, vip(40).sock(family, 80), 30);
            assert_spread(&what, &answers, &["be1:8080", "be3:8080"]);
            let what = format!("{family:?} ready endpoints only, UDP");
            let answers = udp_batch(&client, vip(40).sock(family, 53), 12);
            assert_only(&what, &answers, &["be1:8080", "be3:8080"]);
        }
    });

    sc.run("none ready: serving+terminating fallback", || {
        let file = lab.simple(
            "cond",
            cond.clone(),
            &[
                ep("be1", Cond::ServingTerminating),
                ep("be2", Cond::Terminating),
                ep("be3", Cond::NotReady),
            ],
        );
        lab.apply("cond.json", &file);
        for family in Family::BOTH {
            lab.expect_slots(0, vip(40).get(family), 80, "TCP", &["be1:8080"]);
            let what = format!("{family:?} serving+terminating fallback, TCP");
            let answers = tcp_batch(&client, vip(40).sock(family, 80), 10);
            assert_spread(&what, &answers, &["be1:8080"]);
            let what = format!("{family:?} serving+terminating fallback, UDP");
            let answers = udp_batch(&client, vip(40).sock(family, 53), 6);
            assert_spread(&what, &answers, &["be1:8080"]);
        }
    });

    sc.run("publishNotReadyAddresses", || {
        let mut publish = cond.clone();
        publish["spec"]["publishNotReadyAddresses"] = json!(true);
        let file = lab.simple(
            "cond",
            publish,
            &[ep("be1", Cond::NotReady), ep("be2", Cond::NotReady)],
        );
        lab.apply("cond.json", &file);
        for family in Family::BOTH {
            lab.expect_slots(0, vip(40).get(family), 80, "TCP", &["be1:8080", "be2:8080"]);
            let what = format!("{family:?} publishNotReadyAddresses, TCP");
            let answers = tcp_batch(&client, vip(40).sock(family, 80), 30);
            assert_spread(&what, &answers, &["be1:8080", "be2:8080"]);
        }
    });

    sc.run(
        "terminating endpoint: no new flows, established drains until removed",
        || {
            let file = lab.simple("cond", cond.clone(), &[ready("be1"), ready("be2")]);
            lab.apply("cond.json", &file);
            let mut draining: Vec<(Family, Conn)> = Family::BOTH
                .iter()
                .map(|&f| (f, conn_to(&client, vip(40).sock(f, 80), "be2")))
                .collect();
            let file = lab.simple(
                "cond",
                cond.clone(),
                &[ready("be1"), ep("be2", Cond::ServingTerminating)],
            );
            lab.apply("cond.json", &file);
            for (family, conn) in &mut draining {
                lab.expect_slots(0, vip(40).get(*family), 80, "TCP", &["be1:8080"]);
                let what = format!("{family:?} be2 terminating: new flows");
                let answers = tcp_batch(&client, vip(40).sock(*family, 80), 20);
                assert_spread(&what, &answers, &["be1:8080"]);
                for round in 0..2 {
                    let answer = conn.ask().answer(&format!(
                        "{family:?} established connection to terminating be2 (round {round})"
                    ));
                    assert_eq!(
                        answer.backend, "be2",
                        "{family:?}: draining connection moved"
                    );
                }
            }
            let file = lab.simple("cond", cond.clone(), &[ready("be1")]);
            lab.apply("cond.json", &file);
            for (family, conn) in &mut draining {
                let outcome = conn.ask();
                eprintln!("{family:?} connection to be2 after be2 left the slice: {outcome:?}");
                assert!(
                    matches!(outcome, Outcome::Reset | Outcome::Closed),
                    "{family:?}: the established connection to be2, gone from the slice, \
                     should be reset; got {outcome:?}"
                );
            }
        },
    );

    sc.run("conntrack under endpoint churn", || {
        let churn = service("churn", 41, "ClusterIP", &HTTP_DNS);
        let file = lab.simple(
            "churn",
            churn.clone(),
            &[ready("be1"), ready("be2"), ready("be3")],
        );
        lab.apply("churn.json", &file);
        let mut flows: Vec<Flows> = Family::BOTH
            .iter()
            .map(|&family| Flows {
                family,
                keep: conn_to(&client, vip(41).sock(family, 80), "be1"),
                udp: udp_flow_to(&client, vip(41).sock(family, 53), "be2"),
                doomed: conn_to(&client, vip(41).sock(family, 80), "be3"),
            })
            .collect();
        // Another endpoint comes: every established flow keeps its endpoint.
        let file = lab.simple(
            "churn",
            churn.clone(),
            &[ready("be1"), ready("be2"), ready("be3"), ready("be4")],
        );
        lab.apply("churn.json", &file);
        for f in &mut flows {
            let family = f.family;
            lab.expect_slots(
                0,
                vip(41).get(family),
                80,
                "TCP",
                &["be1:8080", "be2:8080", "be3:8080", "be4:8080"],
            );
            let what = format!("{family:?} churn: be4 added");
            assert_eq!(
                f.keep.ask().answer(&what).backend,
                "be1",
                "{what}: TCP flow moved"
            );
            assert_eq!(
                f.udp.ask(IO_TIMEOUT).answer(&what).backend,
                "be2",
                "{what}: UDP flow moved"
            );
            assert_eq!(
                f.doomed.ask().answer(&what).backend,
                "be3",
                "{what}: TCP flow moved"
            );
        }
        // be2 and be3 go: TCP to be1 stays; the UDP socket's next datagram
        // reaches a remaining endpoint at once; TCP to be3 is reset.
        let file = lab.simple("churn", churn, &[ready("be1"), ready("be4")]);
        lab.apply("churn.json", &file);
        for f in &mut flows {
            let family = f.family;
            lab.expect_slots(0, vip(41).get(family), 80, "TCP", &["be1:8080", "be4:8080"]);
            let what = format!("{family:?} churn: be2 and be3 removed");
            assert_eq!(
                f.keep.ask().answer(&what).backend,
                "be1",
                "{what}: TCP flow to be1 moved"
            );
            let start = Instant::now();
            let outcome = f.udp.ask(REFUSED_WITHIN);
            eprintln!(
                "{what}: UDP socket's next datagram: {outcome:?} after {:?}",
                start.elapsed()
            );
            let answer = outcome.answer(&format!(
                "{what}: the UDP socket whose endpoint (be2) left should reach a remaining \
                 endpoint with its next datagram"
            ));
            assert!(
                ["be1", "be4"].contains(&answer.backend.as_str()),
                "{what}: UDP answered by {}",
                answer.backend
            );
            let again = f.udp.ask(IO_TIMEOUT).answer(&what);
            assert_eq!(
                again.backend, answer.backend,
                "{what}: the re-selected UDP flow moved again"
            );
            let outcome = f.doomed.ask();
            eprintln!("{what}: TCP connection to be3: {outcome:?}");
            assert!(
                matches!(outcome, Outcome::Reset | Outcome::Closed),
                "{what}: the TCP connection to removed be3 should be reset, got {outcome:?}"
            );
        }
    });
    sc.finish(&mut lab);
}

/// The frontends `ClusterIP`s x PORTS of Service N.
fn cluster_fes(n: u8, ports: &[(u16, &str)]) -> Vec<Fe> {
    Family::BOTH
        .iter()
        .flat_map(|&f| {
            ports
                .iter()
                .map(move |(port, proto)| fe(vip(n).get(f), *port, proto))
        })
        .collect()
}

/// One step of the type-change scenario.
struct Stage {
    name: &'static str,
    type_: &'static str,
}

impl Stage {
    fn node_port(&self) -> bool {
        matches!(self.type_, "NodePort" | "LoadBalancer")
    }
}

/// Behaviours 9, 10 and 11: hairpin on both nodes; Services skipped
/// (proxy-name label, headless, `ExternalName`); topology-aware routing with
/// `--zone`; type changes `ClusterIP` -> `NodePort` -> `LoadBalancer` ->
/// `NodePort` -> `ClusterIP` -> `ExternalName` with nothing stale in either
/// agent's maps.
#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario per behaviour, sharing one topology"
)]
fn hairpin_skipping_topology_and_type_changes() {
    let _serial = serial();
    if !require_privileged("harness_services: hairpin_skipping_topology_and_type_changes") {
        return;
    }
    let mut lab = Lab::new("hairpin");
    let client = lab.ns("client1");
    let ext = lab.ns("ext");
    let mut sc = Scenarios::default();

    // Hairpin: be1 (node1) and be3 (node2) reach their own Service.
    let file = lab.simple(
        "self",
        service("self", 50, "ClusterIP", &HTTP_DNS),
        &[ready("be1")],
    );
    lab.apply("self.json", &file);
    let file = lab.simple(
        "self3",
        service("self3", 55, "ClusterIP", &HTTP_DNS),
        &[ready("be3")],
    );
    lab.apply("self3.json", &file);
    for family in Family::BOTH {
        sc.run(&format!("{family:?} hairpin"), || {
            for (pod, n) in [("be1", 50), ("be3", 55)] {
                let expected = format!("{pod}:8080");
                let what = format!("{family:?} hairpin {pod} -> own Service TCP");
                let answers = tcp_batch(&lab.ns(pod), vip(n).sock(family, 80), 3);
                assert_spread(&what, &answers, &[expected.as_str()]);
                for a in &answers {
                    assert_eq!(
                        a.peer.ip(),
                        family.hairpin(),
                        "{what}: the server saw {} (client {}), expected the hairpin source",
                        a.peer,
                        a.local
                    );
                }
                let what = format!("{family:?} hairpin {pod} -> own Service UDP");
                let answers = udp_batch(&lab.ns(pod), vip(n).sock(family, 53), 3);
                assert_spread(&what, &answers, &[expected.as_str()]);
                assert!(
                    answers.iter().all(|a| a.peer.ip() == family.hairpin()),
                    "{what}: the server should see the hairpin source: {answers:?}"
                );
            }
            // Not hairpin: another pod reaching that Service keeps its source.
            let what = format!("{family:?} be2 -> be1's Service (no hairpin)");
            let answers = tcp_batch(&lab.ns("be2"), vip(50).sock(family, 80), 3);
            assert_spread(&what, &answers, &["be1:8080"]);
            assert_source_preserved(&what, &answers);
        });
    }

    // Skipped Services: another proxy's, headless, ExternalName (with a
    // clusterIP, so that only its type can make it skipped).
    let mut foreign = service("foreign", 51, "ClusterIP", &HTTP_DNS);
    foreign["metadata"]["labels"] =
        json!({"service.kubernetes.io/service-proxy-name": "other-proxy"});
    let file = lab.simple("foreign", foreign, &[ready("be1")]);
    lab.apply("foreign.json", &file);
    let mut headless = service("headless", 52, "ClusterIP", &HTTP_DNS);
    headless["spec"]["clusterIP"] = json!("None");
    headless["spec"]["clusterIPs"] = json!(["None"]);
    let file = lab.simple("headless", headless, &[ready("be1")]);
    lab.apply("headless.json", &file);
    let mut extname = service("extname", 56, "ExternalName", &HTTP_DNS);
    extname["spec"]["externalName"] = json!("backend.cluster.invalid");
    let file = lab.simple("extname", extname, &[ready("be1")]);
    lab.apply("extname.json", &file);

    // Topology: node1 is zone-a, node2 zone-b.
    let zoned = |hints: [Option<&'static str>; 4]| -> [Ep; 4] {
        [
            ready("be1").zoned("zone-a", hints[0]),
            ready("be2").zoned("zone-b", hints[1]),
            ready("be3").zoned("zone-a", hints[2]),
            ready("be4").zoned("zone-b", hints[3]),
        ]
    };
    let hinted = zoned([
        Some("zone-a"),
        Some("zone-b"),
        Some("zone-a"),
        Some("zone-b"),
    ]);
    let mut topo = service("topo", 54, "ClusterIP", &HTTP_DNS);
    topo["spec"]["trafficDistribution"] = json!("PreferClose");
    let file = lab.simple("topo", topo.clone(), &hinted);
    lab.apply("topo.json", &file);

    // Frontends of both agents from here on, besides `morph`'s.
    let base: BTreeSet<Fe> = [50, 55, 54]
        .iter()
        .flat_map(|&n| cluster_fes(n, &[(80, "TCP"), (53, "UDP")]))
        .collect();
    sc.run(
        "skipped Services (proxy-name, headless, ExternalName)",
        || {
            for i in 0..2 {
                assert_eq!(
                    lab.frontends(i),
                    base,
                    "`lb services` of {}: skipped Services must have no frontends",
                    lab.topo.nodes[i].name
                );
            }
            for family in Family::BOTH {
                for (n, name) in [(51, "foreign"), (56, "extname")] {
                    assert_unanswered(
                        &format!("{family:?} client1 -> skipped Service {name}"),
                        &tcp_once(&client, vip(n).sock(family, 80), UNANSWERED_WAIT),
                    );
                }
            }
        },
    );

    let near = ["be1:8080", "be3:8080"];
    let far = ["be2:8080", "be4:8080"];
    let all4 = ["be1:8080", "be2:8080", "be3:8080", "be4:8080"];
    sc.run("topology: PreferClose keeps this zone's endpoints", || {
        for family in Family::BOTH {
            let v = vip(54).get(family);
            lab.expect_slots(0, v, 80, "TCP", &near);
            lab.expect_slots(1, v, 80, "TCP", &far);
            let what = format!("{family:?} PreferClose from zone-a");
            let answers = tcp_batch(&client, vip(54).sock(family, 80), 30);
            assert_spread(&what, &answers, &near);
        }
    });
    sc.run("topology: nothing hinted for this zone -> all", || {
        let file = lab.simple(
            "topo",
            topo.clone(),
            &zoned([
                Some("zone-c"),
                Some("zone-b"),
                Some("zone-c"),
                Some("zone-b"),
            ]),
        );
        lab.apply("topo.json", &file);
        for family in Family::BOTH {
            let v = vip(54).get(family);
            lab.expect_slots(0, v, 80, "TCP", &all4);
            lab.expect_slots(1, v, 80, "TCP", &far);
            let what = format!("{family:?} PreferClose, nothing hinted for zone-a");
            let answers = tcp_batch(&client, vip(54).sock(family, 80), 40);
            assert_spread(&what, &answers, &all4);
        }
    });
    sc.run("topology: an endpoint without hints -> all", || {
        let file = lab.simple(
            "topo",
            topo.clone(),
            &zoned([Some("zone-a"), Some("zone-b"), Some("zone-a"), None]),
        );
        lab.apply("topo.json", &file);
        for family in Family::BOTH {
            let v = vip(54).get(family);
            lab.expect_slots(0, v, 80, "TCP", &all4);
            lab.expect_slots(1, v, 80, "TCP", &all4);
        }
    });
    sc.run("topology: topology-mode Auto annotation", || {
        let mut annotated = service("topo", 54, "ClusterIP", &HTTP_DNS);
        annotated["metadata"]["annotations"] =
            json!({"service.kubernetes.io/topology-mode": "Auto"});
        let file = lab.simple("topo", annotated, &hinted);
        lab.apply("topo.json", &file);
        for family in Family::BOTH {
            let v = vip(54).get(family);
            lab.expect_slots(0, v, 80, "TCP", &near);
            lab.expect_slots(1, v, 80, "TCP", &far);
            let what = format!("{family:?} topology-mode Auto from zone-a");
            let answers = tcp_batch(&client, vip(54).sock(family, 80), 30);
            assert_spread(&what, &answers, &near);
        }
    });

    // Type changes of `morph` (53): each agent's whole frontend set is
    // compared (nothing stale), then the client's view.
    let morph_eps = [ready("be1"), ready("be3")];
    let both = ["be1:8080", "be3:8080"];
    let stages = [
        Stage {
            name: "ClusterIP",
            type_: "ClusterIP",
        },
        Stage {
            name: "NodePort",
            type_: "NodePort",
        },
        Stage {
            name: "LoadBalancer",
            type_: "LoadBalancer",
        },
        Stage {
            name: "back to NodePort",
            type_: "NodePort",
        },
        Stage {
            name: "back to ClusterIP",
            type_: "ClusterIP",
        },
        Stage {
            name: "ExternalName",
            type_: "ExternalName",
        },
    ];
    for stage in &stages {
        let port = if stage.node_port() {
            sp("http", 80, "TCP", "8080").node(30090)
        } else {
            sp("http", 80, "TCP", "8080")
        };
        // As the API server and the service controller leave them: a
        // nodePort only on NodePort/LoadBalancer, an ingress status only on
        // LoadBalancer; the clusterIPs stay (also on ExternalName, so that
        // only the type can make it skipped).
        let mut morph = service("morph", 53, stage.type_, &[port]);
        if stage.type_ == "LoadBalancer" {
            morph["status"]["loadBalancer"]["ingress"] =
                json!([{"ip": lb_ip(53).v4.to_string()}, {"ip": lb_ip(53).v6.to_string()}]);
        }
        if stage.type_ == "ExternalName" {
            morph["spec"]["externalName"] = json!("morph.cluster.invalid");
        }
        let mut items = vec![morph];
        items.extend(lab.slices("morph", "a", &[("http", 8080, "TCP")], &morph_eps));
        lab.apply("morph.json", &list(items));
        sc.run(&format!("type change to {}: maps", stage.name), || {
            for i in 0..2 {
                let mut morph_fes = Vec::new();
                if stage.type_ != "ExternalName" {
                    morph_fes.extend(cluster_fes(53, &[(80, "TCP")]));
                }
                if stage.node_port() {
                    for family in Family::BOTH {
                        morph_fes.push(fe(lab.node_ip(i, family), 30090, "TCP"));
                    }
                }
                if stage.type_ == "LoadBalancer" {
                    for family in Family::BOTH {
                        morph_fes.push(fe(lb_ip(53).get(family), 80, "TCP"));
                    }
                }
                let mut expected = base.clone();
                expected.extend(morph_fes.iter().cloned());
                let got = lab.frontends(i);
                assert_eq!(
                    got,
                    expected,
                    "morph {}: `lb services` of {} (stale: {:?}, missing: {:?})",
                    stage.name,
                    lab.topo.nodes[i].name,
                    got.difference(&expected).collect::<Vec<_>>(),
                    expected.difference(&got).collect::<Vec<_>>()
                );
                for (addr, port, proto) in &morph_fes {
                    lab.expect_slots(i, *addr, *port, proto, &both);
                }
            }
        });
        for family in Family::BOTH {
            sc.run(
                &format!("{family:?} type change to {}: traffic", stage.name),
                || {
                    let what = format!("{family:?} morph {}", stage.name);
                    let cluster = vip(53).sock(family, 80);
                    if stage.type_ == "ExternalName" {
                        assert_unanswered(
                            &format!("{what}: client1 -> former ClusterIP"),
                            &tcp_once(&client, cluster, UNANSWERED_WAIT),
                        );
                    } else {
                        let answers = tcp_batch(&client, cluster, 20);
                        assert_spread(&format!("{what}: client1 -> ClusterIP"), &answers, &both);
                    }
                    let node_port = SocketAddr::new(lab.node_ip(0, family), 30090);
                    if stage.node_port() {
                        let answers = tcp_batch(&ext, node_port, 20);
                        assert_spread(&format!("{what}: ext -> NodePort"), &answers, &both);
                    } else {
                        assert_unanswered(
                            &format!("{what}: ext -> former NodePort"),
                            &tcp_once(&ext, node_port, UNANSWERED_WAIT),
                        );
                    }
                    let lb_addr = lb_ip(53).sock(family, 80);
                    if stage.type_ == "LoadBalancer" {
                        let answers = tcp_batch(&ext, lb_addr, 20);
                        assert_spread(&format!("{what}: ext -> LB IP"), &answers, &both);
                    } else {
                        assert_unanswered(
                            &format!("{what}: ext -> LB IP"),
                            &tcp_once(&ext, lb_addr, UNANSWERED_WAIT),
                        );
                    }
                },
            );
        }
    }
    sc.finish(&mut lab);
}
