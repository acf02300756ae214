//! Level-3 harness: the `lb` agent in a "node" network namespace, a client and
//! four backends in namespaces of their own, joined to the node by veth pairs,
//! real TCP/UDP clients and servers over IPv4 and IPv6.
//!
//! ```text
//!            client (198.18.1.2, fd00:1::2)
//!              | eth0
//!              | h-cl
//!   node  [lb agent, TC ingress on every h-*]   VIPs 198.19.0.0/24, fd00:96::/112
//!     h-be1 | h-be2 | h-be3 | h-be4
//!     be1 (198.18.2.2, fd00:2::2) ... be4 (198.18.5.2, fd00:5::2)
//! ```
//!
//! Everything lives in namespaces this test creates (the node included);
//! nothing is added to the root namespace. Namespaces, agent processes, pins,
//! server threads and temporary files are removed by drop guards, also when an
//! assertion fails. Privileged: needs root and bpffs (see `common`).
//!
//! Run: `cargo test -p lb-userspace --test harness -- --nocapture`
//! (the tests run one at a time; each builds its own topology).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::fmt::Write as _;
use std::io::{self, BufRead as _, BufReader, ErrorKind, Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{
    Netns, PinGuard, TempDir, enter_netns, have_program, in_netns, lb_binary, ns_command,
    output_with_timeout, require_privileged, sweep_stale_netns, unique_prefix,
};

/// Namespace name tag: namespaces are `lbh<pid>-<n>-<role>`.
const TAG: &str = "lbh";
/// Port every backend listens on, TCP and UDP (`[::]`, dual-stack).
const BACKEND_PORT: u16 = 8080;
/// Service ports: `http` 80/TCP and `dns` 53/UDP, both to targetPort 8080.
const HTTP_PORT: u16 = 80;
const DNS_PORT: u16 = 53;
/// Metrics/health address of the agent, inside the node namespace.
const METRICS_ADDR: &str = "127.0.0.1:9917";
/// Client connect/read/write timeout.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// The agent must reflect a manifest change in the maps within this.
const CHANGE_DEADLINE: Duration = Duration::from_secs(1);

const WEB_VIP4: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const WEB_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);

/// The tests share nothing, but one at a time keeps their timing honest and
/// their logs readable.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------
// Topology
// ---------------------------------------------------------------------------

/// One pod: a namespace with `eth0`, whose peer `iface` is in the node.
#[derive(Clone, Debug)]
struct Pod {
    /// `client`, `be1`, ... (also what a backend answers).
    name: String,
    /// Namespace name.
    ns: String,
    /// Node-side veth name.
    iface: String,
    v4: Ipv4Addr,
    v6: Ipv6Addr,
    gw4: Ipv4Addr,
    gw6: Ipv6Addr,
}

impl Pod {
    /// Pod number K gets `198.18.K.2/24` and `fd00:K::2/64`, the node `.1` / `::1`.
    fn new(prefix: &str, name: &str, iface: &str, k: u8) -> Self {
        let k16 = u16::from(k);
        Self {
            name: name.to_owned(),
            ns: format!("{prefix}-{name}"),
            iface: iface.to_owned(),
            v4: Ipv4Addr::new(198, 18, k, 2),
            v6: Ipv6Addr::new(0xfd00, k16, 0, 0, 0, 0, 0, 2),
            gw4: Ipv4Addr::new(198, 18, k, 1),
            gw6: Ipv6Addr::new(0xfd00, k16, 0, 0, 0, 0, 0, 1),
        }
    }

    fn addr(&self, family: Family) -> IpAddr {
        match family {
            Family::V4 => IpAddr::V4(self.v4),
            Family::V6 => IpAddr::V6(self.v6),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    const BOTH: [Self; 2] = [Self::V4, Self::V6];

    fn web_vip(self) -> IpAddr {
        match self {
            Self::V4 => IpAddr::V4(WEB_VIP4),
            Self::V6 => IpAddr::V6(WEB_VIP6),
        }
    }
}

/// The namespaces and links. Dropping it deletes every namespace (which
/// deletes the veth pairs with them).
struct Topology {
    client: Pod,
    backends: Vec<Pod>,
    // Guards, dropped after the descriptions above (order is irrelevant).
    _pod_netns: Vec<Netns>,
    node: Netns,
}

impl Topology {
    fn build(prefix: &str, backends: u8) -> Self {
        let node = Netns::create(&format!("{prefix}-node"));
        node.sysctls(&[
            ("net/ipv4/ip_forward", "1"),
            ("net/ipv6/conf/all/forwarding", "1"),
            ("net/ipv4/conf/all/rp_filter", "0"),
            ("net/ipv4/conf/default/rp_filter", "0"),
            ("net/ipv6/conf/all/accept_dad", "0"),
            ("net/ipv6/conf/default/accept_dad", "0"),
        ]);
        let client = Pod::new(prefix, "client", "h-cl", 1);
        let backends: Vec<Pod> = (1..=backends)
            .map(|i| Pod::new(prefix, &format!("be{i}"), &format!("h-be{i}"), i + 1))
            .collect();
        let mut pod_netns = Vec::new();
        for pod in std::iter::once(&client).chain(&backends) {
            let ns = Netns::create(&pod.ns);
            pod_netns.push(ns);
            wire(&node, pod_netns.last().expect("just pushed"), pod);
        }
        Self {
            client,
            backends,
            _pod_netns: pod_netns,
            node,
        }
    }

    fn node_ifaces(&self) -> Vec<String> {
        std::iter::once(&self.client)
            .chain(&self.backends)
            .map(|p| p.iface.clone())
            .collect()
    }

    fn backend(&self, name: &str) -> &Pod {
        self.backends
            .iter()
            .find(|b| b.name == name)
            .unwrap_or_else(|| panic!("no backend {name}"))
    }
}

/// Creates the veth pair node:`pod.iface` <-> pod:`eth0` (directly inside the
/// two namespaces, never in the root one), addresses and routes.
fn wire(node: &Netns, pod_ns: &Netns, pod: &Pod) {
    pod_ns.sysctls(&[
        ("net/ipv6/conf/all/accept_dad", "0"),
        ("net/ipv6/conf/default/accept_dad", "0"),
    ]);
    node.ip(&[
        "link", "add", &pod.iface, "type", "veth", "peer", "name", "eth0", "netns", &pod.ns,
    ]);
    node.sysctls(&[(&format!("net/ipv4/conf/{}/rp_filter", pod.iface), "0")]);
    node.ip(&["addr", "add", &format!("{}/24", pod.gw4), "dev", &pod.iface]);
    node.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{}/64", pod.gw6),
        "dev",
        &pod.iface,
        "nodad",
    ]);
    node.ip(&["link", "set", &pod.iface, "up"]);
    pod_ns.ip(&["addr", "add", &format!("{}/24", pod.v4), "dev", "eth0"]);
    pod_ns.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{}/64", pod.v6),
        "dev",
        "eth0",
        "nodad",
    ]);
    pod_ns.ip(&["link", "set", "eth0", "up"]);
    let gw4 = pod.gw4.to_string();
    let gw6 = pod.gw6.to_string();
    // Other pod subnets and the VIP ranges, via the node. No default route.
    pod_ns.ip(&["route", "add", "198.18.0.0/16", "via", &gw4]);
    pod_ns.ip(&["route", "add", "198.19.0.0/24", "via", &gw4]);
    pod_ns.ip(&["-6", "route", "add", "fd00::/16", "via", &gw6]);
    pod_ns.ip(&["-6", "route", "add", "fd00:96::/112", "via", &gw6]);
}

// ---------------------------------------------------------------------------
// Backend servers (threads of this process, each setns'd into its backend)
// ---------------------------------------------------------------------------

/// TCP and UDP echo-my-name servers on `[::]:8080` in every backend. Dropping
/// it stops and joins every thread (they poll a stop flag every 200 ms).
struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    fn start(backends: &[Pod]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut servers = Self {
            stop: Arc::clone(&stop),
            threads: Vec::new(),
        };
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        for pod in backends {
            for udp in [false, true] {
                let (name, ns, stop, ready) = (
                    pod.name.clone(),
                    pod.ns.clone(),
                    Arc::clone(&stop),
                    ready_tx.clone(),
                );
                servers.threads.push(std::thread::spawn(move || {
                    enter_netns(&ns);
                    if udp {
                        udp_server(&name, &stop, &ready);
                    } else {
                        tcp_server(&name, &stop, &ready);
                    }
                }));
            }
        }
        drop(ready_tx);
        for _ in 0..backends.len() * 2 {
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

/// The reply to every request: `NAME PEER` (the client address it saw).
fn reply(name: &str, peer: SocketAddr) -> String {
    format!("{name} {peer}\n")
}

fn tcp_server(name: &str, stop: &Arc<AtomicBool>, ready: &mpsc::Sender<Result<(), String>>) {
    let listener = match TcpListener::bind(("::", BACKEND_PORT))
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
    {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(format!("{name}: tcp bind [::]:{BACKEND_PORT}: {e}")));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    let mut connections: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => {
                let (name, stop) = (name.to_owned(), Arc::clone(stop));
                connections.push(std::thread::spawn(move || {
                    serve_tcp(&name, stream, peer, &stop);
                }));
                connections.retain(|c| !c.is_finished());
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
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
fn serve_tcp(name: &str, mut stream: TcpStream, peer: SocketAddr, stop: &AtomicBool) {
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
                    if stream.write_all(reply(name, peer).as_bytes()).is_err() {
                        return;
                    }
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

fn udp_server(name: &str, stop: &AtomicBool, ready: &mpsc::Sender<Result<(), String>>) {
    let socket = match UdpSocket::bind(("::", BACKEND_PORT)).and_then(|s| {
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .map(|()| s)
    }) {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Err(format!("{name}: udp bind [::]:{BACKEND_PORT}: {e}")));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    let mut buf = [0_u8; 1500];
    while !stop.load(Ordering::SeqCst) {
        match socket.recv_from(&mut buf) {
            Ok((_, peer)) => {
                let _ = socket.send_to(reply(name, peer).as_bytes(), peer);
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
// Clients (sockets created on threads setns'd into the client namespace)
// ---------------------------------------------------------------------------

/// What a client learned from one request.
#[derive(Clone, Debug)]
struct Answer {
    /// Name of the backend that answered.
    backend: String,
    /// Client address as the backend saw it (v4 canonicalised).
    seen_peer: SocketAddr,
    /// The client socket's own address.
    local: SocketAddr,
    /// The address the client socket is connected to (what the kernel saw as
    /// the remote end: the VIP if reverse NAT worked).
    remote: SocketAddr,
}

impl Answer {
    fn parse(line: &str, local: SocketAddr, remote: SocketAddr) -> Result<Self, String> {
        let (backend, peer) = line
            .trim_end()
            .split_once(' ')
            .ok_or_else(|| format!("malformed answer {line:?}"))?;
        let peer: SocketAddr = peer
            .parse()
            .map_err(|e| format!("malformed peer in answer {line:?}: {e}"))?;
        Ok(Self {
            backend: backend.to_owned(),
            seen_peer: SocketAddr::new(peer.ip().to_canonical(), peer.port()),
            local,
            remote,
        })
    }

    /// The client talked to VIA (the VIP: reverse NAT happened), and the
    /// backend saw the client's own address and port (DNAT only, no SNAT).
    fn check(&self, via: SocketAddr) -> Result<(), String> {
        if self.remote != via {
            return Err(format!("socket peer is {}, expected {via}", self.remote));
        }
        if self.seen_peer != self.local {
            return Err(format!(
                "backend {} saw the client as {}, but the client is {}",
                self.backend, self.seen_peer, self.local
            ));
        }
        Ok(())
    }
}

/// A TCP connection from the client; stays open for further requests.
struct Conn {
    reader: BufReader<TcpStream>,
    local: SocketAddr,
    remote: SocketAddr,
}

impl Conn {
    fn open(client_ns: &str, to: SocketAddr) -> Result<Self, String> {
        let stream = in_netns(client_ns, || TcpStream::connect_timeout(&to, IO_TIMEOUT))
            .map_err(|e| format!("connect {to}: {e}"))?;
        stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
            .map_err(|e| format!("set timeouts: {e}"))?;
        let local = stream
            .local_addr()
            .map_err(|e| format!("local_addr: {e}"))?;
        let remote = stream.peer_addr().map_err(|e| format!("peer_addr: {e}"))?;
        Ok(Self {
            reader: BufReader::new(stream),
            local,
            remote,
        })
    }

    /// Sends one line, reads the answer, and checks VIP and client address.
    fn ask(&mut self) -> Result<Answer, String> {
        let who = format!("{} -> {}", self.local, self.remote);
        self.reader
            .get_mut()
            .write_all(b"ping\n")
            .map_err(|e| format!("{who}: send: {e}"))?;
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => return Err(format!("{who}: connection closed")),
            Ok(_) => {}
            Err(e) => return Err(format!("{who}: receive: {e}")),
        }
        let answer = Answer::parse(&line, self.local, self.remote)?;
        answer.check(self.remote).map(|()| answer)
    }
}

/// N fresh TCP connections (distinct source ports), one request each.
fn tcp_many(client_ns: &str, to: SocketAddr, n: usize) -> Vec<Result<Answer, String>> {
    in_netns(client_ns, || {
        (0..n)
            .map(|_| {
                let stream = TcpStream::connect_timeout(&to, IO_TIMEOUT)
                    .map_err(|e| format!("connect {to}: {e}"))?;
                stream
                    .set_read_timeout(Some(IO_TIMEOUT))
                    .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
                    .map_err(|e| e.to_string())?;
                let local = stream.local_addr().map_err(|e| e.to_string())?;
                let remote = stream.peer_addr().map_err(|e| e.to_string())?;
                let mut conn = Conn {
                    reader: BufReader::new(stream),
                    local,
                    remote,
                };
                let answer = conn.ask()?;
                answer.check(to).map(|()| answer)
            })
            .collect()
    })
}

/// N UDP requests, each from a fresh socket connected to TO (so the kernel
/// drops any reply whose source is not TO). Up to 3 tries per request.
fn udp_many(client_ns: &str, to: SocketAddr, n: usize) -> Vec<Result<Answer, String>> {
    in_netns(client_ns, || {
        (0..n)
            .map(|_| {
                let any: SocketAddr = if to.is_ipv4() {
                    (Ipv4Addr::UNSPECIFIED, 0).into()
                } else {
                    (Ipv6Addr::UNSPECIFIED, 0).into()
                };
                let socket = UdpSocket::bind(any).map_err(|e| format!("udp bind: {e}"))?;
                socket
                    .connect(to)
                    .and_then(|()| socket.set_read_timeout(Some(Duration::from_millis(700))))
                    .map_err(|e| format!("udp connect {to}: {e}"))?;
                let local = socket.local_addr().map_err(|e| e.to_string())?;
                let mut buf = [0_u8; 1500];
                let mut last = String::new();
                for _ in 0..3 {
                    socket
                        .send(b"ping\n")
                        .map_err(|e| format!("udp send to {to}: {e}"))?;
                    match socket.recv(&mut buf) {
                        Ok(len) => {
                            let line = String::from_utf8_lossy(&buf[..len]);
                            let answer = Answer::parse(&line, local, to)?;
                            return answer.check(to).map(|()| answer);
                        }
                        Err(e) => last = e.to_string(),
                    }
                }
                Err(format!(
                    "udp {local} -> {to}: no answer after 3 tries ({last})"
                ))
            })
            .collect()
    })
}

/// All requests must have succeeded; returns answers per backend name.
fn tally(what: &str, results: Vec<Result<Answer, String>>) -> BTreeMap<String, usize> {
    let total = results.len();
    let (ok, errors): (Vec<_>, Vec<_>) = results.into_iter().partition(Result::is_ok);
    let errors: Vec<String> = errors.into_iter().filter_map(Result::err).collect();
    assert!(
        errors.is_empty(),
        "{what}: {} of {total} requests failed, first errors: {:#?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    let mut counts = BTreeMap::new();
    for answer in ok.into_iter().flatten() {
        *counts.entry(answer.backend).or_insert(0) += 1;
    }
    eprintln!("{what}: {counts:?}");
    counts
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// Every answer came from EXPECTED and every one of EXPECTED answered.
fn assert_spread(what: &str, counts: &BTreeMap<String, usize>, expected: &[&str]) {
    let seen: BTreeSet<String> = counts.keys().cloned().collect();
    assert_eq!(
        seen,
        names(expected),
        "{what}: the set of answering backends is wrong ({counts:?})"
    );
}

/// Every answer came from ALLOWED (not all need to answer).
fn assert_only(what: &str, counts: &BTreeMap<String, usize>, allowed: &[&str]) {
    let allowed = names(allowed);
    let stray: Vec<&String> = counts.keys().filter(|k| !allowed.contains(*k)).collect();
    assert!(
        stray.is_empty(),
        "{what}: answers from {stray:?}, only {allowed:?} may answer ({counts:?})"
    );
}

// ---------------------------------------------------------------------------
// Manifests
// ---------------------------------------------------------------------------

/// A Service port: name, port, protocol, targetPort (number or name).
struct PortSpec {
    name: &'static str,
    port: u16,
    protocol: &'static str,
    target: &'static str,
}

const WEB_PORTS: [PortSpec; 2] = [
    PortSpec {
        name: "http",
        port: HTTP_PORT,
        protocol: "TCP",
        target: "8080",
    },
    PortSpec {
        name: "dns",
        port: DNS_PORT,
        protocol: "UDP",
        target: "8080",
    },
];

fn service_yaml(name: &str, vips: &[IpAddr], ports: &[PortSpec]) -> String {
    let families: Vec<&str> = vips
        .iter()
        .map(|v| if v.is_ipv4() { "IPv4" } else { "IPv6" })
        .collect();
    let policy = if vips.len() > 1 {
        "RequireDualStack"
    } else {
        "SingleStack"
    };
    let mut y = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n\
         spec:\n  type: ClusterIP\n  clusterIP: \"{}\"\n  clusterIPs:\n",
        vips[0]
    );
    for vip in vips {
        let _ = writeln!(y, "  - \"{vip}\"");
    }
    let _ = writeln!(y, "  ipFamilies: [{}]", families.join(", "));
    let _ = writeln!(y, "  ipFamilyPolicy: {policy}\n  ports:");
    for p in ports {
        let target = if p.target.parse::<u16>().is_ok() {
            p.target.to_owned()
        } else {
            format!("\"{}\"", p.target)
        };
        let _ = writeln!(
            y,
            "  - name: {}\n    port: {}\n    protocol: {}\n    targetPort: {target}",
            p.name, p.port, p.protocol
        );
    }
    y
}

/// One `EndpointSlice` of SERVICE for FAMILY; ENDPOINTS are (address, ready).
fn slice_yaml(
    service: &str,
    family: Family,
    ports: &[PortSpec],
    endpoints: &[(IpAddr, bool)],
) -> String {
    let (suffix, address_type) = match family {
        Family::V4 => ("v4", "IPv4"),
        Family::V6 => ("v6", "IPv6"),
    };
    let mut y = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  \
         name: {service}-{suffix}\n  namespace: default\n  labels:\n    \
         kubernetes.io/service-name: {service}\naddressType: {address_type}\nports:\n"
    );
    for p in ports {
        let _ = writeln!(
            y,
            "- name: {}\n  port: {BACKEND_PORT}\n  protocol: {}",
            p.name, p.protocol
        );
    }
    if endpoints.is_empty() {
        y.push_str("endpoints: []\n");
    } else {
        y.push_str("endpoints:\n");
    }
    for (addr, ready) in endpoints {
        let _ = writeln!(
            y,
            "- addresses:\n  - \"{addr}\"\n  conditions:\n    ready: {ready}\n    \
             serving: {ready}\n    terminating: false"
        );
    }
    y
}

/// Service + one slice per family of its VIPs, as one multi-document file.
fn service_file(
    name: &str,
    vips: &[IpAddr],
    ports: &[PortSpec],
    endpoints: &[(&Pod, bool)],
) -> String {
    let mut docs = vec![service_yaml(name, vips, ports)];
    for family in Family::BOTH {
        if vips.iter().any(|v| v.is_ipv4() == (family == Family::V4)) {
            let eps: Vec<(IpAddr, bool)> = endpoints
                .iter()
                .map(|(pod, ready)| (pod.addr(family), *ready))
                .collect();
            docs.push(slice_yaml(name, family, ports, &eps));
        }
    }
    docs.join("---\n")
}

fn web_file(topo: &Topology, endpoints: &[(&str, bool)]) -> String {
    let eps: Vec<(&Pod, bool)> = endpoints
        .iter()
        .map(|(name, ready)| (topo.backend(name), *ready))
        .collect();
    service_file(
        "web",
        &[IpAddr::V4(WEB_VIP4), IpAddr::V6(WEB_VIP6)],
        &WEB_PORTS,
        &eps,
    )
}

// ---------------------------------------------------------------------------
// `lb services --json`
// ---------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct ServiceView {
    vip: IpAddr,
    port: u16,
    protocol: String,
    rev_nat_id: u64,
    /// (id, address, state), sorted.
    backends: Vec<(u64, SocketAddr, String)>,
}

fn parse_services(json: &str) -> Result<Vec<ServiceView>, String> {
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("not JSON ({e}): {json}"))?;
    let list = value
        .as_array()
        .ok_or_else(|| format!("not a JSON array: {json}"))?;
    let field = |v: &serde_json::Value, key: &str| -> Result<serde_json::Value, String> {
        v.get(key)
            .cloned()
            .ok_or_else(|| format!("missing {key:?} in {v}"))
    };
    let ip = |v: serde_json::Value| -> Result<IpAddr, String> {
        v.as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad address {v}"))
    };
    let port = |v: serde_json::Value| -> Result<u16, String> {
        v.as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .ok_or_else(|| format!("bad port {v}"))
    };
    let mut out = Vec::new();
    for svc in list {
        let mut backends = Vec::new();
        for be in field(svc, "backends")?
            .as_array()
            .ok_or_else(|| format!("backends is not an array in {svc}"))?
        {
            backends.push((
                field(be, "id")?.as_u64().ok_or("bad backend id")?,
                SocketAddr::new(ip(field(be, "address")?)?, port(field(be, "port")?)?),
                field(be, "state")?
                    .as_str()
                    .ok_or("bad backend state")?
                    .to_ascii_lowercase(),
            ));
        }
        backends.sort();
        out.push(ServiceView {
            vip: ip(field(svc, "address")?)?,
            port: port(field(svc, "port")?)?,
            protocol: field(svc, "protocol")?
                .as_str()
                .ok_or("bad protocol")?
                .to_ascii_uppercase(),
            rev_nat_id: field(svc, "rev_nat_id")?.as_u64().ok_or("bad rev_nat_id")?,
            backends,
        });
    }
    out.sort();
    Ok(out)
}

/// What one frontend should look like in the maps: its active backends.
#[derive(Debug)]
struct Expect {
    vip: IpAddr,
    port: u16,
    protocol: &'static str,
    active: BTreeSet<SocketAddr>,
}

impl Expect {
    fn met_by(&self, views: &[ServiceView]) -> bool {
        views.iter().any(|v| {
            v.vip == self.vip
                && v.port == self.port
                && v.protocol == self.protocol
                && v.backends
                    .iter()
                    .filter(|(_, _, state)| state == "active")
                    .map(|(_, addr, _)| *addr)
                    .collect::<BTreeSet<_>>()
                    == self.active
        })
    }
}

/// The four `web` frontends (v4/v6 x http/dns) with BACKENDS active.
fn web_expect(topo: &Topology, backends: &[&str]) -> Vec<Expect> {
    let mut out = Vec::new();
    for family in Family::BOTH {
        for (port, protocol) in [(HTTP_PORT, "TCP"), (DNS_PORT, "UDP")] {
            out.push(Expect {
                vip: family.web_vip(),
                port,
                protocol,
                active: backends
                    .iter()
                    .map(|b| SocketAddr::new(topo.backend(b).addr(family), BACKEND_PORT))
                    .collect(),
            });
        }
    }
    out
}

// ---------------------------------------------------------------------------
// The lab: topology + servers + manifest directory + agent + pins
// ---------------------------------------------------------------------------

/// The running agent; killed (SIGKILL) and reaped on drop.
struct Agent {
    child: Child,
}

impl Agent {
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Fields are dropped in declaration order, which is the teardown order:
/// agent, pins (needs the node namespace), servers, namespaces, files.
struct Lab {
    agent: Option<Agent>,
    pins: PinGuard,
    _servers: Servers,
    topo: Topology,
    _work: TempDir,
    manifests: PathBuf,
    staging: PathBuf,
    log: PathBuf,
}

impl Lab {
    fn new() -> Self {
        for tool in ["ip", "nsenter"] {
            assert!(
                have_program(tool),
                "the harness needs `{tool}` on PATH (iproute2, util-linux)"
            );
        }
        sweep_stale_netns(TAG);
        common::sweep_stale_pins("lb-test-");
        let prefix = unique_prefix(TAG);
        let work = TempDir(std::env::temp_dir().join(&prefix));
        let manifests = work.0.join("manifests");
        let staging = work.0.join("staging");
        for dir in [&manifests, &staging] {
            std::fs::create_dir_all(dir)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        }
        let log = work.0.join("agent.log");
        let topo = Topology::build(&prefix, 4);
        let servers = Servers::start(&topo.backends);
        let pins = PinGuard {
            path: Path::new(common::BPFFS).join(unique_prefix("lb-test-")),
            node_ns: topo.node.name().to_owned(),
        };
        eprintln!(
            "lab {prefix}: manifests {}, pins {}, log {}",
            manifests.display(),
            pins.path.display(),
            log.display()
        );
        Self {
            agent: None,
            pins,
            _servers: servers,
            topo,
            _work: work,
            manifests,
            staging,
            log,
        }
    }

    fn client_ns(&self) -> &str {
        &self.topo.client.ns
    }

    fn node_ns(&self) -> &str {
        self.topo.node.name()
    }

    /// Writes FILE into the manifest directory atomically (temp file in a
    /// sibling directory + rename); returns the instant of the rename.
    fn write_manifest(&self, file: &str, content: &str) -> Instant {
        let tmp = self.staging.join(file);
        std::fs::write(&tmp, content)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", tmp.display()));
        let dst = self.manifests.join(file);
        std::fs::rename(&tmp, &dst)
            .unwrap_or_else(|e| panic!("cannot rename to {}: {e}", dst.display()));
        Instant::now()
    }

    fn start_agent(&mut self) {
        assert!(self.agent.is_none(), "agent already running");
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", self.log.display()));
        let _ = writeln!(log, "==== harness: starting agent ====");
        let stderr = log.try_clone().expect("clone log file handle");
        let mut cmd = ns_command(self.node_ns(), lb_binary());
        cmd.arg("agent")
            .arg("--source")
            .arg(format!("file:{}", self.manifests.display()))
            .arg("--attach")
            .arg(self.topo.node_ifaces().join(","))
            .arg("--pin-path")
            .arg(&self.pins.path)
            .arg("--metrics-addr")
            .arg(METRICS_ADDR)
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
        self.agent = Some(Agent { child });
        self.wait_ready();
    }

    /// SIGKILL, like a crash or an OOM kill.
    fn kill_agent(&mut self) {
        let mut agent = self.agent.take().expect("agent running");
        agent.kill();
        if let Ok(mut log) = std::fs::OpenOptions::new().append(true).open(&self.log) {
            let _ = writeln!(log, "==== harness: agent SIGKILLed ====");
        }
    }

    fn assert_agent_alive(&mut self) {
        let agent = self.agent.as_mut().expect("agent started");
        if let Ok(Some(status)) = agent.child.try_wait() {
            panic!("the agent exited ({status})");
        }
    }

    fn wait_ready(&mut self) {
        let start = Instant::now();
        let mut last = String::from("never asked");
        while start.elapsed() < Duration::from_secs(10) {
            self.assert_agent_alive();
            match http_status(self.node_ns(), "/readyz") {
                Ok(200) => {
                    eprintln!("agent ready after {:?}", start.elapsed());
                    return;
                }
                Ok(code) => last = format!("HTTP {code}"),
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("agent not ready within 10 s (last /readyz: {last})");
    }

    fn services(&self) -> Result<Vec<ServiceView>, String> {
        let mut cmd = Command::new(lb_binary());
        cmd.args(["services", "--json", "--pin-path"])
            .arg(&self.pins.path);
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

    /// Polls `lb services --json` until every EXPECT is met (at most 5 s);
    /// returns the time from SINCE to the end of the first matching poll.
    fn wait_programmed(&self, since: Instant, expect: &[Expect]) -> Duration {
        let mut last = Err(String::from("never polled"));
        while since.elapsed() < Duration::from_secs(5) {
            last = self.services();
            if let Ok(views) = &last
                && expect.iter().all(|e| e.met_by(views))
            {
                return since.elapsed();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "maps never matched within 5 s.\nexpected: {expect:#?}\nlast `lb services`: {last:#?}"
        );
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "======== agent log ({}) ========\n{}\n======== end of agent log ========",
                self.log.display(),
                self.log_text()
            );
        }
        // Fields are then dropped in declaration order (see the struct).
    }
}

/// HTTP/1.0 GET of PATH on the agent's metrics address, from the node
/// namespace; returns the status code.
fn http_status(node_ns: &str, path: &str) -> Result<u16, String> {
    let addr: SocketAddr = METRICS_ADDR.parse().expect("valid metrics address");
    let response = in_netns(node_ns, || -> io::Result<String> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        stream.set_write_timeout(Some(Duration::from_secs(2)))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        Ok(text)
    })
    .map_err(|e| format!("GET {path}: {e}"))?;
    response
        .lines()
        .next()
        .and_then(|status| status.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("GET {path}: malformed response {response:?}"))
}

/// Programs attached at ingress of IFACE in the node namespace: TCX links
/// (queried with `BPF_PROG_QUERY` from a thread in the namespace) plus clsact
/// `bpf` filters (`tc filter show`). Returns the count and a description.
fn ingress_programs(node_ns: &str, iface: &str) -> (usize, String) {
    use aya::programs::{SchedClassifier, TcAttachType};
    let name = CString::new(iface).expect("interface name without NUL");
    let tcx = in_netns(node_ns, || {
        SchedClassifier::query_tcx(name.as_c_str(), TcAttachType::Ingress)
            .map(|(_, programs)| {
                programs
                    .iter()
                    .map(|p| p.name_as_str().unwrap_or("?").to_owned())
                    .collect::<Vec<_>>()
            })
            .map_err(|e| e.to_string())
    });
    let mut count = 0;
    let mut description = String::new();
    match tcx {
        Ok(programs) => {
            count += programs.len();
            let _ = write!(description, "tcx ingress: {programs:?}");
        }
        Err(e) => {
            let _ = write!(description, "tcx query failed ({e})");
        }
    }
    let mut tc = ns_command(node_ns, "tc");
    tc.args(["filter", "show", "dev", iface, "ingress"]);
    if let Ok(out) = output_with_timeout(&mut tc, Duration::from_secs(5)) {
        let text = String::from_utf8_lossy(&out.stdout);
        let filters: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(" bpf ") && l.contains(" handle "))
            .collect();
        count += filters.len();
        let _ = write!(description, "; tc ingress bpf filters: {filters:?}");
    }
    if have_program("bpftool") {
        let mut bpftool = ns_command(node_ns, "bpftool");
        bpftool.args(["net", "show", "dev", iface]);
        if let Ok(out) = output_with_timeout(&mut bpftool, Duration::from_secs(5)) {
            let _ = write!(
                description,
                "; bpftool net show: {:?}",
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
    }
    (count, description)
}

fn assert_single_attachment(lab: &Lab, when: &str) {
    for iface in lab.topo.node_ifaces() {
        let (count, description) = ingress_programs(lab.node_ns(), &iface);
        eprintln!("{when}: {iface}: {description}");
        assert_eq!(
            count, 1,
            "{when}: {iface} should have exactly one lb program at ingress: {description}"
        );
    }
}

fn vip(family: Family, port: u16) -> SocketAddr {
    SocketAddr::new(family.web_vip(), port)
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// The topology alone (no agent): the client reaches every backend directly
/// through the node's routing, both families, TCP and UDP. If this fails the
/// problem is the harness or the host, not the load balancer.
#[test]
fn topology_routes_directly() {
    let _serial = serial();
    if !require_privileged("harness: topology_routes_directly") {
        return;
    }
    let lab = Lab::new();
    for be in &lab.topo.backends {
        for family in Family::BOTH {
            let to = SocketAddr::new(be.addr(family), BACKEND_PORT);
            for results in [
                tcp_many(lab.client_ns(), to, 2),
                udp_many(lab.client_ns(), to, 2),
            ] {
                let counts = tally(&format!("direct {to}"), results);
                assert_spread(&format!("direct {to}"), &counts, &[&be.name]);
            }
        }
    }
}

/// Scenarios 1, 2 and 4: the dual-stack `web` Service answers on both VIPs,
/// spreads 60 connections over every ready endpoint (never the not-ready
/// one), the client's socket is connected to the VIP (TCP handshake and UDP
/// replies came back from the VIP: reverse NAT), and the backend saw the
/// client's own address. Single-stack Services (one with a named targetPort)
/// work too.
#[test]
fn balancing_and_reverse_nat() {
    let _serial = serial();
    if !require_privileged("harness: balancing_and_reverse_nat") {
        return;
    }
    let mut lab = Lab::new();
    let web = web_file(
        &lab.topo,
        &[("be1", true), ("be2", true), ("be3", true), ("be4", false)],
    );
    lab.write_manifest("web.yaml", &web);
    let solo4_vip = IpAddr::V4(Ipv4Addr::new(198, 19, 0, 20));
    let solo6_vip = IpAddr::V6(Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x20));
    let solo4 = service_file(
        "solo4",
        &[solo4_vip],
        &WEB_PORTS[..1],
        &[
            (lab.topo.backend("be1"), true),
            (lab.topo.backend("be2"), true),
        ],
    );
    let solo6_ports = [PortSpec {
        name: "http",
        port: HTTP_PORT,
        protocol: "TCP",
        target: "web",
    }];
    let solo6 = service_file(
        "solo6",
        &[solo6_vip],
        &solo6_ports,
        &[
            (lab.topo.backend("be3"), true),
            (lab.topo.backend("be4"), true),
        ],
    );
    lab.write_manifest("solo4.yaml", &solo4);
    lab.write_manifest("solo6.yaml", &solo6);
    lab.start_agent();

    for path in ["/healthz", "/metrics"] {
        assert_eq!(http_status(lab.node_ns(), path), Ok(200), "GET {path}");
    }
    let mut expect = web_expect(&lab.topo, &["be1", "be2", "be3"]);
    expect.push(Expect {
        vip: solo4_vip,
        port: HTTP_PORT,
        protocol: "TCP",
        active: ["be1", "be2"]
            .iter()
            .map(|b| SocketAddr::new(lab.topo.backend(b).addr(Family::V4), BACKEND_PORT))
            .collect(),
    });
    expect.push(Expect {
        vip: solo6_vip,
        port: HTTP_PORT,
        protocol: "TCP",
        active: ["be3", "be4"]
            .iter()
            .map(|b| SocketAddr::new(lab.topo.backend(b).addr(Family::V6), BACKEND_PORT))
            .collect(),
    });
    lab.wait_programmed(Instant::now(), &expect);

    for family in Family::BOTH {
        let what = format!("{family:?} TCP {}", vip(family, HTTP_PORT));
        let counts = tally(&what, tcp_many(lab.client_ns(), vip(family, HTTP_PORT), 60));
        assert_spread(&what, &counts, &["be1", "be2", "be3"]);

        let what = format!("{family:?} UDP {}", vip(family, DNS_PORT));
        let counts = tally(&what, udp_many(lab.client_ns(), vip(family, DNS_PORT), 30));
        assert_spread(&what, &counts, &["be1", "be2", "be3"]);
    }
    for (to, backends) in [
        (SocketAddr::new(solo4_vip, HTTP_PORT), ["be1", "be2"]),
        (SocketAddr::new(solo6_vip, HTTP_PORT), ["be3", "be4"]),
    ] {
        let what = format!("single-stack TCP {to}");
        let counts = tally(&what, tcp_many(lab.client_ns(), to, 20));
        assert_spread(&what, &counts, &backends);
    }
    lab.assert_agent_alive();
}

/// Opens connections to TO until one lands on BACKEND (bounded).
fn conn_to_backend(client_ns: &str, to: SocketAddr, backend: &str) -> Conn {
    for _ in 0..40 {
        let mut conn = Conn::open(client_ns, to).unwrap_or_else(|e| panic!("{e}"));
        let answer = conn.ask().unwrap_or_else(|e| panic!("{e}"));
        if answer.backend == backend {
            return conn;
        }
    }
    panic!("40 connections to {to}, none landed on {backend}");
}

/// Scenario 3: one manifest change removes be2, adds be4 and marks be3 not
/// ready. The maps follow within 1 s of the rename; new connections go only
/// to be1 and be4; established connections to be1 keep working.
#[test]
fn endpoint_change_applies_within_a_second() {
    let _serial = serial();
    if !require_privileged("harness: endpoint_change_applies_within_a_second") {
        return;
    }
    let mut lab = Lab::new();
    let before = web_file(&lab.topo, &[("be1", true), ("be2", true), ("be3", true)]);
    lab.write_manifest("web.yaml", &before);
    lab.start_agent();
    lab.wait_programmed(
        Instant::now(),
        &web_expect(&lab.topo, &["be1", "be2", "be3"]),
    );

    let mut kept: Vec<Conn> = Family::BOTH
        .iter()
        .map(|f| conn_to_backend(lab.client_ns(), vip(*f, HTTP_PORT), "be1"))
        .collect();

    let after = web_file(&lab.topo, &[("be1", true), ("be3", false), ("be4", true)]);
    let renamed = lab.write_manifest("web.yaml", &after);
    let took = lab.wait_programmed(renamed, &web_expect(&lab.topo, &["be1", "be4"]));
    eprintln!("endpoint change reached the maps {took:?} after the rename");
    assert!(
        took <= CHANGE_DEADLINE,
        "endpoint change took {took:?} to reach the maps (limit {CHANGE_DEADLINE:?})"
    );

    for family in Family::BOTH {
        let what = format!("{family:?} TCP after change");
        let counts = tally(&what, tcp_many(lab.client_ns(), vip(family, HTTP_PORT), 40));
        assert_spread(&what, &counts, &["be1", "be4"]);
        let what = format!("{family:?} UDP after change");
        let counts = tally(&what, udp_many(lab.client_ns(), vip(family, DNS_PORT), 20));
        assert_only(&what, &counts, &["be1", "be4"]);
    }
    for conn in &mut kept {
        let answer = conn
            .ask()
            .unwrap_or_else(|e| panic!("established connection broke across the change: {e}"));
        assert_eq!(answer.backend, "be1", "established connection moved");
    }
    lab.assert_agent_alive();
}

/// Scenario 5: broken YAML and a Service with an invalid clusterIP are
/// reported (by file / object name) and skipped; the working Service keeps
/// answering and a valid Service added at the same time is programmed.
#[test]
fn malformed_manifests_are_reported_and_skipped() {
    let _serial = serial();
    if !require_privileged("harness: malformed_manifests_are_reported_and_skipped") {
        return;
    }
    let mut lab = Lab::new();
    let web = web_file(&lab.topo, &[("be1", true), ("be2", true), ("be3", true)]);
    lab.write_manifest("web.yaml", &web);
    lab.start_agent();
    lab.wait_programmed(
        Instant::now(),
        &web_expect(&lab.topo, &["be1", "be2", "be3"]),
    );

    lab.write_manifest(
        "broken.yaml",
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: broken-yaml\n  namespace: default\n\
         spec:\n  clusterIPs: [\"198.19.0.40\"\n  ports: {port: 80\n - :\n",
    );
    let bad_ip = service_yaml(
        "bad-vip",
        &[IpAddr::V4(Ipv4Addr::new(198, 19, 0, 50))],
        &WEB_PORTS[..1],
    )
    .replace("198.19.0.50", "999.1.1.1");
    assert!(bad_ip.contains("999.1.1.1"));
    lab.write_manifest("bad-vip.yaml", &bad_ip);
    let extra_vips = [
        IpAddr::V4(Ipv4Addr::new(198, 19, 0, 30)),
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x30)),
    ];
    let extra = service_file(
        "extra",
        &extra_vips,
        &WEB_PORTS[..1],
        &[(lab.topo.backend("be4"), true)],
    );
    let added = lab.write_manifest("extra.yaml", &extra);

    let mut expect = web_expect(&lab.topo, &["be1", "be2", "be3"]);
    for (vip, family) in extra_vips.iter().zip(Family::BOTH) {
        expect.push(Expect {
            vip: *vip,
            port: HTTP_PORT,
            protocol: "TCP",
            active: std::iter::once(SocketAddr::new(
                lab.topo.backend("be4").addr(family),
                BACKEND_PORT,
            ))
            .collect(),
        });
    }
    lab.wait_programmed(added, &expect);

    let mut missing = vec!["bad-vip", "broken.yaml"];
    let start = Instant::now();
    while !missing.is_empty() && start.elapsed() < Duration::from_secs(3) {
        let log = lab.log_text();
        missing.retain(|needle| !log.contains(needle));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        missing.is_empty(),
        "the agent log does not mention {missing:?} (invalid input must be reported with its name)"
    );
    lab.assert_agent_alive();

    for family in Family::BOTH {
        let what = format!("{family:?} web after bad input");
        let counts = tally(&what, tcp_many(lab.client_ns(), vip(family, HTTP_PORT), 20));
        assert_only(&what, &counts, &["be1", "be2", "be3"]);
        let to = SocketAddr::new(extra_vips[usize::from(family == Family::V6)], HTTP_PORT);
        let what = format!("{family:?} extra {to}");
        let counts = tally(&what, tcp_many(lab.client_ns(), to, 5));
        assert_spread(&what, &counts, &["be4"]);
    }
    let views = lab.services().unwrap_or_else(|e| panic!("{e}"));
    assert!(
        views
            .iter()
            .all(|v| v.vip != IpAddr::V4(Ipv4Addr::new(198, 19, 0, 40))),
        "the broken file's VIP was programmed: {views:#?}"
    );
}

/// Scenario 6: SIGKILL the agent; established and new connections keep
/// working from the pinned state; a new agent on the same pins becomes ready,
/// keeps the same ids, does not stack a second program on any interface, and
/// the old connections still work.
#[test]
fn agent_restart_keeps_datapath() {
    let _serial = serial();
    if !require_privileged("harness: agent_restart_keeps_datapath") {
        return;
    }
    let mut lab = Lab::new();
    let web = web_file(&lab.topo, &[("be1", true), ("be2", true), ("be3", true)]);
    lab.write_manifest("web.yaml", &web);
    lab.start_agent();
    lab.wait_programmed(
        Instant::now(),
        &web_expect(&lab.topo, &["be1", "be2", "be3"]),
    );
    let state_before = lab.services().unwrap_or_else(|e| panic!("{e}"));
    assert_single_attachment(&lab, "first agent");

    let mut conns: Vec<(Conn, String)> = Family::BOTH
        .iter()
        .map(|f| {
            let mut conn =
                Conn::open(lab.client_ns(), vip(*f, HTTP_PORT)).unwrap_or_else(|e| panic!("{e}"));
            let backend = conn.ask().unwrap_or_else(|e| panic!("{e}")).backend;
            (conn, backend)
        })
        .collect();

    lab.kill_agent();
    for (conn, backend) in &mut conns {
        let answer = conn
            .ask()
            .unwrap_or_else(|e| panic!("connection broke with the agent down: {e}"));
        assert_eq!(
            &answer.backend, backend,
            "connection moved with the agent down"
        );
    }
    for family in Family::BOTH {
        let what = format!("{family:?} new connections, agent down");
        let counts = tally(&what, tcp_many(lab.client_ns(), vip(family, HTTP_PORT), 10));
        assert_only(&what, &counts, &["be1", "be2", "be3"]);
    }

    lab.start_agent();
    lab.wait_programmed(
        Instant::now(),
        &web_expect(&lab.topo, &["be1", "be2", "be3"]),
    );
    let state_after = lab.services().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        state_after, state_before,
        "ids/state changed across the restart (ids must be recovered from the pins)"
    );
    for (conn, backend) in &mut conns {
        let answer = conn
            .ask()
            .unwrap_or_else(|e| panic!("connection broke across the restart: {e}"));
        assert_eq!(
            &answer.backend, backend,
            "connection moved across the restart"
        );
    }
    for family in Family::BOTH {
        let what = format!("{family:?} new connections after restart");
        let counts = tally(&what, tcp_many(lab.client_ns(), vip(family, HTTP_PORT), 30));
        assert_spread(&what, &counts, &["be1", "be2", "be3"]);
    }
    assert_single_attachment(&lab, "restarted agent");
    lab.assert_agent_alive();
}
