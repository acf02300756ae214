//! The path-MTU lab of `harness_pmtu.rs`: a client, a router, the node
//! (the `lb` agent on both of its links), another router, a backend; one
//! link of the path, on the client's or on the backend's side, has a
//! smaller MTU than the rest.
//!
//! ```text
//!   client (198.18.1.2, fd00:1::2)         eth0 MTU 1500
//!     | rc-cl (198.18.1.1)                 MTU 1280 with `Small::ClientSide`
//!   client router
//!     | rc-node (198.18.4.2) / h-rc (198.18.4.1)
//!   node [lb agent on h-rc, h-rb]  ClusterIP 198.19.0.10 / fd00:96::10 :80 -> backend:8080
//!     | h-rb (198.18.2.1) / rb-node (198.18.2.2)
//!   backend router
//!     | rb-be (198.18.3.1)                 MTU 1280 with `Small::BackendSide`
//!   backend (198.18.3.2, fd00:3::2)        eth0 MTU 1500
//! ```
//!
//! Only the router's end of the small link is small, so that the MSS the
//! host behind it announces does not hide the link (as with a tunnel in
//! the middle of a path): the other host's full-sized segments reach the
//! router, which can only answer "fragmentation needed" / "packet too big"
//! to their source, quoting the packet as the node translated it. On the
//! backend's side the sender is the client (an upload), the quote
//! `client -> backend`; on the client's side the sender is the backend (a
//! download), the error goes to the `ClusterIP`, the quote is the reply as
//! translated, `ClusterIP -> client`.
//!
//! The backend's server reads an 8-byte big-endian count first: 0 means
//! an upload (it reads to EOF and answers the byte count), N a download
//! (it sends N bytes and closes).
//!
//! Teardown (drop order of `PmtuLab`'s fields): agent, pins (need the node
//! namespace), the server, namespaces, files.

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::clients::http_get;
use super::manifests::{Cond, Manifest, ManifestDir, service, slice, sp, suffix};
use super::netns::{Netns, enter_netns, in_netns, sweep_stale_netns, unique_prefix};
use super::pins::{PinGuard, sweep_stale_pins};
use super::process::{
    ChildGuard, LogOnPanic, METRICS_ADDR, TempDir, lb_binary, metrics_addr, require_tools, run_ok,
    spawn_logged,
};
use super::topo::{Dual, Family, address, node_netns};

/// Namespace name tag: namespaces are `lbp<pid>-<n>-<role>`.
const TAG: &str = "lbp";
/// Pin directories are `/sys/fs/bpf/lbp-pins-<pid>-<n>`.
const PIN_TAG: &str = "lbp-pins-";
/// The backend's port and the Service port.
const BACKEND_PORT: u16 = 8080;
const SERVICE_PORT: u16 = 80;
/// The small link's MTU (IPv6's minimum).
pub(crate) const SMALL_MTU: u32 = 1280;

const VIP4: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);

/// The Service address of FAMILY.
pub(crate) fn vip(family: Family) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(VIP4),
        Family::V6 => IpAddr::V6(VIP6),
    }
}

/// Sysctls of the client and the backend (no reverse-path filter, no
/// duplicate address detection).
const HOST_SYSCTLS: [(&str, &str); 4] = [
    ("net/ipv4/conf/all/rp_filter", "0"),
    ("net/ipv4/conf/default/rp_filter", "0"),
    ("net/ipv6/conf/all/accept_dad", "0"),
    ("net/ipv6/conf/default/accept_dad", "0"),
];

/// Which link of the path is the small one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Small {
    /// The backend router's link to the backend: uploads need the path MTU.
    BackendSide,
    /// The client router's link to the client: downloads need it.
    ClientSide,
}

/// The namespaces; dropped in order: hosts first, the node last.
struct Namespaces {
    client: Netns,
    backend: Netns,
    client_router: Netns,
    backend_router: Netns,
    node: Netns,
}

/// A veth pair: `a_if` in A, `b_if` in B.
fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) {
    a.ip(&[
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ]);
}

/// Default routes of NS via GW (both families).
fn default_via(ns: &Netns, gw: Dual) {
    ns.ip(&["route", "add", "default", "via", &gw.v4.to_string()]);
    ns.ip(&["-6", "route", "add", "default", "via", &gw.v6.to_string()]);
}

impl Namespaces {
    fn build(prefix: &str, small: Small) -> Self {
        let node = node_netns(&format!("{prefix}-node"));
        // The routers forward like a node (same sysctls).
        let client_router = node_netns(&format!("{prefix}-rc"));
        let backend_router = node_netns(&format!("{prefix}-rb"));
        let client = Netns::create(&format!("{prefix}-client"));
        let backend = Netns::create(&format!("{prefix}-backend"));
        client.sysctls(&HOST_SYSCTLS);
        backend.sysctls(&HOST_SYSCTLS);
        let mtu = SMALL_MTU.to_string();

        veth(&client_router, "rc-cl", &client, "eth0");
        if small == Small::ClientSide {
            client_router.ip(&["link", "set", "rc-cl", "mtu", &mtu]);
        }
        address(&client_router, "rc-cl", Dual::host(1, 1));
        address(&client, "eth0", Dual::host(1, 2));
        default_via(&client, Dual::host(1, 1));

        veth(&node, "h-rc", &client_router, "rc-node");
        address(&node, "h-rc", Dual::host(4, 1));
        address(&client_router, "rc-node", Dual::host(4, 2));
        default_via(&client_router, Dual::host(4, 1));

        veth(&node, "h-rb", &backend_router, "rb-node");
        address(&node, "h-rb", Dual::host(2, 1));
        address(&backend_router, "rb-node", Dual::host(2, 2));
        default_via(&backend_router, Dual::host(2, 1));

        veth(&backend_router, "rb-be", &backend, "eth0");
        if small == Small::BackendSide {
            backend_router.ip(&["link", "set", "rb-be", "mtu", &mtu]);
        }
        address(&backend_router, "rb-be", Dual::host(3, 1));
        address(&backend, "eth0", Dual::host(3, 2));
        default_via(&backend, Dual::host(3, 1));

        node.sysctls(&[
            ("net/ipv4/conf/h-rc/rp_filter", "0"),
            ("net/ipv4/conf/h-rb/rp_filter", "0"),
        ]);
        for (net, via) in [(1, 4), (3, 2)] {
            let (net, via) = (Dual::host(net, 0), Dual::host(via, 2));
            node.ip(&[
                "route",
                "add",
                &format!("{}/24", net.v4),
                "via",
                &via.v4.to_string(),
            ]);
            node.ip(&[
                "-6",
                "route",
                "add",
                &format!("{}/64", net.v6),
                "via",
                &via.v6.to_string(),
            ]);
        }
        Self {
            client,
            backend,
            client_router,
            backend_router,
            node,
        }
    }
}

/// The backend's server: a thread in its namespace serving one connection
/// at a time on `[::]:8080` (see the module's doc for what it does).
/// Dropping it stops and joins the thread.
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(ns: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (ns, flag) = (ns.to_owned(), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            enter_netns(&ns);
            let listener = TcpListener::bind((Ipv6Addr::UNSPECIFIED, BACKEND_PORT))
                .and_then(|l| l.set_nonblocking(true).map(|()| l));
            let listener = match listener {
                Ok(listener) => {
                    let _ = ready_tx.send(Ok(()));
                    listener
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return;
                }
            };
            while !flag.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => serve(stream, &flag),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => eprintln!("server: accept: {e}"),
                }
            }
        });
        match ready_rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("the server did not start: {e}"),
            Err(e) => panic!("the server did not report: {e}"),
        }
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

/// One connection: the 8-byte count, then an upload or a download.
fn serve(mut stream: TcpStream, stop: &AtomicBool) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
    let mut count = [0u8; 8];
    let mut have = 0;
    while have < count.len() && !stop.load(Ordering::SeqCst) {
        match stream.read(&mut count[have..]) {
            Ok(0) => return,
            Ok(n) => have += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
    let download = u64::from_be_bytes(count);
    if download == 0 {
        drain(stream, stop);
        return;
    }
    let chunk = vec![0xa5_u8; 64 * 1024];
    let mut sent = 0_u64;
    while sent < download && !stop.load(Ordering::SeqCst) {
        let n = chunk
            .len()
            .min(usize::try_from(download - sent).unwrap_or(usize::MAX));
        if stream.write_all(&chunk[..n]).is_err() {
            return;
        }
        sent += n as u64;
    }
}

/// Reads STREAM to EOF (or until STOP), then answers the count.
fn drain(mut stream: TcpStream, stop: &AtomicBool) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0_u64;
    while !stop.load(Ordering::SeqCst) {
        match stream.read(&mut buf) {
            Ok(0) => {
                let _ = stream.write_all(format!("{total}\n").as_bytes());
                return;
            }
            Ok(n) => total += n as u64,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            eprintln!("warning: the server thread panicked");
        }
    }
}

/// The lab. Fields drop in declaration order, the teardown order.
pub(crate) struct PmtuLab {
    agent: Option<ChildGuard>,
    pins: PinGuard,
    _server: Server,
    namespaces: Namespaces,
    manifests: ManifestDir,
    log: PathBuf,
    _log_on_panic: LogOnPanic,
    _work: TempDir,
}

impl PmtuLab {
    /// Builds the topology with SMALL the small link, starts the server,
    /// writes the Service and starts the agent (waits until it is ready).
    pub(crate) fn start(small: Small) -> Self {
        require_tools(&["ip", "nsenter"]);
        sweep_stale_netns(TAG);
        sweep_stale_pins(PIN_TAG);
        let prefix = unique_prefix(TAG);
        let work = TempDir::create(&prefix);
        let manifests = ManifestDir::create(&work);
        let log = work.0.join("agent.log");
        let namespaces = Namespaces::build(&prefix, small);
        let server = Server::start(namespaces.backend.name());
        let pins = PinGuard::new(PIN_TAG, namespaces.node.name());
        let mut lab = Self {
            agent: None,
            pins,
            _server: server,
            namespaces,
            manifests,
            _log_on_panic: LogOnPanic::new(log.clone()),
            log,
            _work: work,
        };
        lab.manifests.write("web.json", &web());
        lab.start_agent();
        lab
    }

    fn start_agent(&mut self) {
        let mut cmd = self.namespaces.node.command(lb_binary());
        // No socket programs: they would attach to the machine's cgroup root.
        cmd.arg("agent")
            .arg("--socket-lb=off")
            .arg("--source")
            .arg(self.manifests.source())
            .arg("--attach")
            .arg("h-rc,h-rb")
            .arg("--pin-path")
            .arg(&self.pins.path)
            .arg("--metrics-addr")
            .arg(METRICS_ADDR);
        self.agent = Some(spawn_logged(&mut cmd, &self.log));
        let start = Instant::now();
        let mut last = String::from("never asked");
        while start.elapsed() < Duration::from_secs(10) {
            self.agent
                .as_mut()
                .expect("agent started")
                .assert_alive("the agent");
            match http_get(self.namespaces.node.name(), metrics_addr(), "/readyz") {
                Ok((200, _)) => break,
                Ok((code, _)) => last = format!("HTTP {code}"),
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "agent not ready within 10 s (last /readyz: {last})"
        );
        // Ready means synced: the frontends are in the maps.
        let services = self.pins.services().expect("lb services");
        for family in Family::BOTH {
            assert!(
                services
                    .iter()
                    .any(|s| s.addr == vip(family) && s.port == SERVICE_PORT),
                "{family:?} frontend missing: {services:#?}"
            );
        }
    }

    pub(crate) fn client_ns(&self) -> &str {
        self.namespaces.client.name()
    }

    /// The backend's address of FAMILY.
    pub(crate) fn backend_addr(family: Family) -> IpAddr {
        Dual::host(3, 2).get(family)
    }

    /// The client's address of FAMILY.
    pub(crate) fn client_addr(family: Family) -> IpAddr {
        Dual::host(1, 2).get(family)
    }

    /// The `/metrics` counter of datapath reason REASON.
    pub(crate) fn reason_count(&self, reason: &str) -> u64 {
        let (status, body) = http_get(self.namespaces.node.name(), metrics_addr(), "/metrics")
            .expect("GET /metrics");
        assert_eq!(status, 200, "/metrics");
        let series = format!("lb_datapath_packets_total{{reason=\"{reason}\"}}");
        super::clients::metric_value(&body, &series).unwrap_or(0)
    }

    /// The path MTU the client's (or with BACKEND the backend's) kernel
    /// holds for ADDR (`ip route get`'s `mtu`, from the route exception an
    /// ICMP error creates), if any.
    pub(crate) fn path_mtu(&self, backend: bool, addr: IpAddr) -> Option<u32> {
        let family = if addr.is_ipv4() { "-4" } else { "-6" };
        let ns = if backend {
            &self.namespaces.backend
        } else {
            &self.namespaces.client
        };
        let out = run_ok(
            ns.command("ip")
                .args([family, "route", "get", &addr.to_string()]),
        );
        let words: Vec<&str> = out.split_whitespace().collect();
        words
            .windows(2)
            .find(|w| w[0] == "mtu")
            .and_then(|w| w[1].parse().ok())
    }

    /// The router's counters of errors sent (`Icmp: OutDestUnreachs` /
    /// `Icmp6: OutPktTooBigs`), to show the errors were sent at all: the
    /// router on the SMALL side.
    pub(crate) fn router_errors_sent(&self, small: Small, family: Family) -> u64 {
        let router = match small {
            Small::BackendSide => &self.namespaces.backend_router,
            Small::ClientSide => &self.namespaces.client_router,
        };
        let (file, field) = match family {
            Family::V4 => ("/proc/thread-self/net/snmp", "OutDestUnreachs"),
            Family::V6 => ("/proc/thread-self/net/snmp6", "Icmp6OutPktTooBigs"),
        };
        // `thread-self`: `/proc/net` is the process's namespace, not the
        // thread's.
        let text = in_netns(router.name(), || {
            std::fs::read_to_string(file).expect("read snmp counters")
        });
        snmp_counter(&text, field).unwrap_or_else(|| panic!("no {field} in {file}"))
    }
}

/// FIELD's value in /proc/net/snmp (a header line of names, then a line of
/// values, per protocol) or /proc/net/snmp6 (`name value` lines).
fn snmp_counter(text: &str, field: &str) -> Option<u64> {
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.len() == 2 && words[0] == field {
            return words[1].parse().ok();
        }
        if let Some(pos) = words.iter().position(|w| *w == field)
            && let Some(values) = lines.get(i + 1)
        {
            return values.split_whitespace().nth(pos)?.parse().ok();
        }
    }
    None
}

/// The dual-stack `web` Service: 80/TCP of both VIPs to the backend:8080.
fn web() -> Manifest {
    let ports = [sp("http", SERVICE_PORT, "TCP", "8080")];
    let mut manifest = Manifest::default().with(
        &service(
            "web",
            "ClusterIP",
            &[vip(Family::V4), vip(Family::V6)],
            &ports,
        )
        .build(),
    );
    for family in Family::BOTH {
        let backend = Dual::host(3, 2).get(family);
        manifest = manifest.with(&slice(
            "web",
            &format!("web-{}", suffix(family)),
            family,
            &[("http", BACKEND_PORT, "TCP")],
            [Cond::Ready.endpoint(backend)],
        ));
    }
    manifest
}

/// What one transfer saw.
#[derive(Debug)]
pub(crate) struct Upload {
    /// The byte count the other side saw (upload) or the client got
    /// (download).
    pub(crate) echoed: u64,
    pub(crate) took: Duration,
}

/// From NS, sends BYTES to TO and reads the byte count back; every socket
/// call bounded by LIMIT (a stalled path is an error, not a hang).
pub(crate) fn upload(
    ns: &str,
    to: SocketAddr,
    bytes: usize,
    limit: Duration,
) -> Result<Upload, String> {
    in_netns(ns, || {
        let start = Instant::now();
        let mut stream =
            TcpStream::connect_timeout(&to, limit).map_err(|e| format!("connect: {e}"))?;
        stream
            .set_write_timeout(Some(limit))
            .map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(limit))
            .map_err(|e| e.to_string())?;
        stream
            .write_all(&0_u64.to_be_bytes())
            .map_err(|e| format!("write: {e}"))?;
        let chunk = vec![0x5a_u8; 64 * 1024];
        let mut sent = 0;
        while sent < bytes {
            let n = chunk.len().min(bytes - sent);
            stream
                .write_all(&chunk[..n])
                .map_err(|e| format!("write after {sent} bytes, {:?}: {e}", start.elapsed()))?;
            sent += n;
        }
        stream
            .shutdown(Shutdown::Write)
            .map_err(|e| e.to_string())?;
        let mut answer = String::new();
        stream
            .read_to_string(&mut answer)
            .map_err(|e| format!("reading the count, {:?}: {e}", start.elapsed()))?;
        let echoed = answer
            .trim()
            .parse()
            .map_err(|e| format!("answer {answer:?}: {e}"))?;
        Ok(Upload {
            echoed,
            took: start.elapsed(),
        })
    })
}

/// From NS, asks TO for BYTES and reads them to EOF; returns how many came
/// and how long it took, every socket call bounded by LIMIT.
pub(crate) fn download(
    ns: &str,
    to: SocketAddr,
    bytes: u64,
    limit: Duration,
) -> Result<Upload, String> {
    in_netns(ns, || {
        let start = Instant::now();
        let mut stream =
            TcpStream::connect_timeout(&to, limit).map_err(|e| format!("connect: {e}"))?;
        stream
            .set_read_timeout(Some(limit))
            .map_err(|e| e.to_string())?;
        stream
            .write_all(&bytes.to_be_bytes())
            .map_err(|e| format!("write: {e}"))?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0_u64;
        loop {
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got += n as u64,
                Err(e) => {
                    return Err(format!(
                        "read after {got} bytes, {:?}: {e}",
                        start.elapsed()
                    ));
                }
            }
        }
        Ok(Upload {
            echoed: got,
            took: start.elapsed(),
        })
    })
}
