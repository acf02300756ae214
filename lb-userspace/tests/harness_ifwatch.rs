//! Interface discovery in the veth harness: the agent runs with
//! `--attach-pattern 'h-*'` and no `--attach`, and a pod created after it
//! started is served without a restart; a pod that goes away is forgotten
//! (its link pin removed) and served again when it comes back.
//!
//! The agent runs with exactly the capabilities `deploy/daemonset.yaml`
//! grants (and nothing else: `setpriv` empties the bounding set but for
//! those), and each of them is shown to be necessary: without any one, the
//! agent does not start.
//!
//! ```text
//!   client (198.18.1.2)  late (198.18.9.2, created after the agent)
//!        | h-cl               | h-late
//!   node [lb agent --attach-pattern 'h-*']   VIP 198.19.0.10, fd00:96::10
//!        | h-be1              | h-be2 (created after the agent)
//!   be1 (198.18.2.2)     be2 (198.18.3.2)
//! ```
//!
//! Everything lives in namespaces this test creates (addresses in
//! `198.18.0.0/15` and `fd00::/8`); nothing is added to the root namespace.
//! Namespaces, the agent, pins, servers and files are removed by drop
//! guards, also when an assertion fails. Privileged: root and bpffs.

mod common;

use std::fmt::Write as _;
use std::io::{BufRead as _, BufReader, ErrorKind, Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;

use common::{
    ChildGuard, Netns, PinGuard, TempDir, enter_netns, have_program, in_netns, lb_binary,
    ns_command, output_with_timeout, require_privileged, sweep_stale_netns, unique_prefix,
};

const TAG: &str = "lbi";
const BACKEND_PORT: u16 = 8080;
const VIP_PORT: u16 = 80;
const METRICS_ADDR: &str = "127.0.0.1:9917";
const VIP4: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);

/// One pod: namespace `PREFIX-NAME`, `eth0` inside, `iface` on the node,
/// `198.18.K.2/24` and `fd00:K::2/64` (the node side `.1`, `::1`).
struct Pod {
    name: String,
    iface: String,
    k: u8,
    ns: Netns,
}

impl Pod {
    fn v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.k, 2)
    }

    fn v6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, u16::from(self.k), 0, 0, 0, 0, 0, 2)
    }

    /// Creates the namespace and the veth pair (directly inside the two
    /// namespaces), addresses and routes.
    fn create(node: &Netns, prefix: &str, name: &str, iface: &str, k: u8) -> Self {
        let ns = Netns::create(&format!("{prefix}-{name}"));
        ns.sysctls(&[
            ("net/ipv6/conf/all/accept_dad", "0"),
            ("net/ipv6/conf/default/accept_dad", "0"),
        ]);
        node.ip(&[
            "link",
            "add",
            iface,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ]);
        node.sysctls(&[(&format!("net/ipv4/conf/{iface}/rp_filter"), "0")]);
        node.ip(&["addr", "add", &format!("198.18.{k}.1/24"), "dev", iface]);
        node.ip(&[
            "-6",
            "addr",
            "add",
            &format!("fd00:{k}::1/64"),
            "dev",
            iface,
            "nodad",
        ]);
        node.ip(&["link", "set", iface, "up"]);
        ns.ip(&["addr", "add", &format!("198.18.{k}.2/24"), "dev", "eth0"]);
        ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("fd00:{k}::2/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        ns.ip(&["link", "set", "eth0", "up"]);
        let (gw4, gw6) = (format!("198.18.{k}.1"), format!("fd00:{k}::1"));
        ns.ip(&["route", "add", "198.18.0.0/16", "via", &gw4]);
        ns.ip(&["route", "add", "198.19.0.0/24", "via", &gw4]);
        ns.ip(&["-6", "route", "add", "fd00::/16", "via", &gw6]);
        Self {
            name: name.to_owned(),
            iface: iface.to_owned(),
            k,
            ns,
        }
    }
}

/// A TCP server in a backend namespace answering `NAME\n` to every
/// connection. Stops (and is joined) on drop.
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(pod: &Pod) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ns, name, flag) = (
            pod.ns.name().to_owned(),
            pod.name.clone(),
            Arc::clone(&stop),
        );
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            enter_netns(&ns);
            let listener = TcpListener::bind(("::", BACKEND_PORT))
                .and_then(|l| l.set_nonblocking(true).map(|()| l));
            let listener = match listener {
                Ok(l) => {
                    let _ = ready_tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("{name}: bind: {e}")));
                    return;
                }
            };
            while !flag.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        let _ = stream.set_nonblocking(false);
                        let _ = stream.write_all(format!("{name}\n").as_bytes());
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        });
        match ready_rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("backend server: {e}"),
            Err(e) => panic!("backend server did not start: {e}"),
        }
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The capabilities `deploy/daemonset.yaml` adds, as `setpriv` names them.
fn daemonset_capabilities() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/daemonset.yaml");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let ds: serde_yaml::Value = serde_yaml::from_str(&text).expect("daemonset.yaml parses");
    let add =
        &ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"];
    let caps: Vec<String> = add
        .as_sequence()
        .expect("capabilities.add is a list")
        .iter()
        .map(|c| c.as_str().expect("capability name").to_lowercase())
        .collect();
    assert!(!caps.is_empty(), "the DaemonSet adds capabilities");
    caps
}

/// `setpriv` so that CAPS are all the program's capabilities.
fn with_only(caps: &[String], program: &Path) -> Vec<String> {
    let mut bounding = String::new();
    for cap in caps {
        let _ = write!(bounding, ",+{cap}");
    }
    vec![
        format!("--bounding-set=-all{bounding}"),
        "--inh-caps=-all".to_owned(),
        "--".to_owned(),
        program.display().to_string(),
    ]
}

/// The dual-stack `web` Service and its slices; TRIGGER is the slices'
/// last-change trigger time annotation.
fn manifest(backends: &[&Pod], trigger: &str) -> String {
    let mut y = String::from(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: default\nspec:\n  \
         clusterIP: 198.19.0.10\n  clusterIPs: [198.19.0.10, \"fd00:96::10\"]\n  \
         ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: RequireDualStack\n  ports:\n  \
         - name: http\n    port: 80\n    protocol: TCP\n    targetPort: 8080\n",
    );
    for (suffix, family) in [("v4", "IPv4"), ("v6", "IPv6")] {
        let _ = write!(
            y,
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  \
             name: web-{suffix}\n  namespace: default\n  labels:\n    \
             kubernetes.io/service-name: web\n  annotations:\n    \
             endpoints.kubernetes.io/last-change-trigger-time: \"{trigger}\"\naddressType: {family}\nports:\n\
             - name: http\n  port: 8080\n  protocol: TCP\nendpoints:\n"
        );
        for pod in backends {
            let addr = if family == "IPv4" {
                pod.v4().to_string()
            } else {
                pod.v6().to_string()
            };
            let _ = write!(
                y,
                "- addresses: [\"{addr}\"]\n  conditions:\n    ready: true\n"
            );
        }
    }
    y
}

fn http_status(node_ns: &str, path: &str) -> Result<u16, String> {
    http_get(node_ns, path).map(|(code, _)| code)
}

/// GET PATH from the agent: status code and body.
fn http_get(node_ns: &str, path: &str) -> Result<(u16, String), String> {
    let addr: SocketAddr = METRICS_ADDR.parse().expect("metrics address");
    let text = in_netns(node_ns, || -> std::io::Result<String> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        write!(stream, "GET {path} HTTP/1.0\r\n\r\n")?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        Ok(text)
    })
    .map_err(|e| e.to_string())?;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("malformed response {text:?}"))?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((code, body.to_owned()))
}

/// N connections from `client_ns` to the VIP of each family; the names of the
/// backends that answered (a connection that completes to the VIP had its
/// replies translated back: reverse NAT on the backend's interface).
fn ask_vips(client_ns: &str, n: usize) -> Result<Vec<String>, String> {
    in_netns(client_ns, || {
        let mut names = Vec::new();
        for vip in [IpAddr::V4(VIP4), IpAddr::V6(VIP6)] {
            let to = SocketAddr::new(vip, VIP_PORT);
            for _ in 0..n {
                let stream = TcpStream::connect_timeout(&to, Duration::from_secs(2))
                    .map_err(|e| format!("connect {to}: {e}"))?;
                stream
                    .set_read_timeout(Some(Duration::from_secs(2)))
                    .map_err(|e| e.to_string())?;
                let peer = stream.peer_addr().map_err(|e| e.to_string())?;
                if peer != to {
                    return Err(format!("connected to {peer}, not {to}"));
                }
                let mut line = String::new();
                BufReader::new(stream)
                    .read_line(&mut line)
                    .map_err(|e| format!("read from {to}: {e}"))?;
                names.push(line.trim().to_owned());
            }
        }
        Ok(names)
    })
}

/// Polls F every 50 ms for at most 5 s.
fn wait_for(what: &str, mut f: impl FnMut() -> Result<(), String>) {
    let start = Instant::now();
    loop {
        match f() {
            Ok(()) => return,
            Err(e) if start.elapsed() > Duration::from_secs(5) => {
                panic!("{what}: not within 5 s: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, step by step")]
fn pods_created_after_the_agent_are_served() {
    if !require_privileged("harness_ifwatch: pods_created_after_the_agent_are_served") {
        return;
    }
    for tool in ["ip", "nsenter", "setpriv"] {
        assert!(have_program(tool), "this test needs `{tool}` on PATH");
    }
    sweep_stale_netns(TAG);
    let prefix = unique_prefix(TAG);
    let work = TempDir(std::env::temp_dir().join(&prefix));
    let manifests = work.0.join("manifests");
    std::fs::create_dir_all(&manifests).expect("manifest dir");
    let log_path = work.0.join("agent.log");

    let node = Netns::create(&format!("{prefix}-node"));
    node.sysctls(&[
        ("net/ipv4/ip_forward", "1"),
        ("net/ipv6/conf/all/forwarding", "1"),
        ("net/ipv4/conf/all/rp_filter", "0"),
        ("net/ipv4/conf/default/rp_filter", "0"),
        ("net/ipv6/conf/all/accept_dad", "0"),
        ("net/ipv6/conf/default/accept_dad", "0"),
    ]);
    let client = Pod::create(&node, &prefix, "client", "h-cl", 1);
    let be1 = Pod::create(&node, &prefix, "be1", "h-be1", 2);
    let _be1_server = Server::start(&be1);
    std::fs::write(
        manifests.join("web.yaml"),
        manifest(&[&be1], "2020-01-01T00:00:00Z"),
    )
    .expect("write manifest");
    let pins = PinGuard {
        path: Path::new(common::BPFFS).join(unique_prefix("lb-ifw-")),
        node_ns: node.name().to_owned(),
    };
    let caps = daemonset_capabilities();
    let agent_args = |pin_path: &Path| -> Vec<String> {
        vec![
            "agent".into(),
            "--source".into(),
            format!("file:{}", manifests.display()),
            "--attach-pattern".into(),
            "h-*".into(),
            "--pin-path".into(),
            pin_path.display().to_string(),
            "--metrics-addr".into(),
            METRICS_ADDR.into(),
        ]
    };

    // Each capability is necessary: without it the agent exits with an error.
    for missing in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let probe_pins = PinGuard {
            path: Path::new(common::BPFFS).join(unique_prefix("lb-ifw-cap-")),
            node_ns: node.name().to_owned(),
        };
        let mut cmd = ns_command(node.name(), "setpriv");
        cmd.args(with_only(&fewer, &lb_binary()))
            .args(agent_args(&probe_pins.path));
        let out = output_with_timeout(&mut cmd, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("the agent without {missing} kept running: {e}"));
        assert!(
            !out.status.success(),
            "the agent started without CAP_{}",
            missing.to_uppercase()
        );
        eprintln!(
            "without {missing}: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
    }

    // The agent with exactly the DaemonSet's capabilities.
    let log = std::fs::File::create(&log_path).expect("agent log");
    let mut cmd = ns_command(node.name(), "setpriv");
    cmd.args(with_only(&caps, &lb_binary()))
        .args(agent_args(&pins.path))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log handle"))
        .stderr(log);
    let mut agent = ChildGuard(cmd.spawn().expect("start the agent"));
    let show_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let guard = scopeguard_log(&log_path);
    wait_for("agent ready", || {
        if let Ok(Some(status)) = agent.0.try_wait() {
            panic!("the agent exited ({status}):\n{}", show_log());
        }
        match http_status(node.name(), "/readyz")? {
            200 => Ok(()),
            code => Err(format!("HTTP {code}")),
        }
    });
    let names = ask_vips(client.ns.name(), 4).expect("the client reaches the VIPs");
    assert!(names.iter().all(|n| n == "be1"), "{names:?}");

    // A client pod and a backend pod created after the agent started.
    let late = Pod::create(&node, &prefix, "late", "h-late", 9);
    let be2 = Pod::create(&node, &prefix, "be2", "h-be2", 3);
    let _be2_server = Server::start(&be2);
    std::fs::write(
        manifests.join("web.yaml"),
        manifest(&[&be1, &be2], &Timestamp::now().to_string()),
    )
    .expect("write manifest");
    for pod in [&late, &be2] {
        let pin = pins.path.join("links").join(&pod.iface);
        wait_for(&format!("{} attached", pod.iface), || {
            pin.exists()
                .then_some(())
                .ok_or_else(|| format!("no {}", pin.display()))
        });
    }
    let mut served = Vec::new();
    wait_for(
        "the late pod reaches both backends over both families",
        || {
            served = ask_vips(late.ns.name(), 12)?;
            if served.iter().any(|n| n == "be1") && served.iter().any(|n| n == "be2") {
                Ok(())
            } else {
                Err(format!("answers: {served:?}"))
            }
        },
    );
    assert!(
        served.iter().all(|n| n == "be1" || n == "be2"),
        "{served:?}"
    );

    // The late pod goes away: forgotten; it comes back: served again.
    let late_pin = pins.path.join("links").join(&late.iface);
    drop(late);
    wait_for("h-late forgotten", || {
        (!late_pin.exists())
            .then_some(())
            .ok_or_else(|| "pin still there".to_owned())
    });
    let late = Pod::create(&node, &prefix, "late", "h-late", 9);
    wait_for("h-late attached again", || {
        late_pin
            .exists()
            .then_some(())
            .ok_or_else(|| "no pin".to_owned())
    });
    wait_for("the re-created pod is served", || {
        ask_vips(late.ns.name(), 4).map(drop)
    });
    if let Ok(Some(status)) = agent.0.try_wait() {
        panic!("the agent exited ({status}):\n{}", show_log());
    }
    let text = show_log();
    assert!(text.contains("attached to new interface"), "{text}");

    // Metrics: map occupancy, sync durations, and the programming latency
    // of the one slice change made after the agent started.
    let (_, metrics) = http_get(node.name(), "/metrics").expect("GET /metrics");
    // Services: slot 0, two backend slots and the ClusterIP's marker.
    let names = lb_common::map_names::SERVICES4;
    let expected = [
        format!("lb_map_entries{{map=\"{names}\"}} 4"),
        format!(
            "lb_map_entries{{map=\"{}\"}} 4",
            lb_common::map_names::SERVICES6
        ),
        format!(
            "lb_map_entries{{map=\"{}\"}} 2",
            lb_common::map_names::BACKENDS4
        ),
        "lb_network_programming_duration_seconds_count 2".to_owned(),
    ];
    for line in &expected {
        assert!(
            metrics.lines().any(|l| l == line),
            "no `{line}` in:\n{metrics}"
        );
    }
    assert!(
        metrics.contains("lb_sync_proxy_rules_duration_seconds_count "),
        "{metrics}"
    );
    drop(guard);
}

/// Prints the agent log if the test panics from here on.
fn scopeguard_log(path: &Path) -> impl Drop {
    struct ShowLog(PathBuf);
    impl Drop for ShowLog {
        fn drop(&mut self) {
            if std::thread::panicking() {
                eprintln!(
                    "======== agent log ========\n{}\n======== end ========",
                    std::fs::read_to_string(&self.0).unwrap_or_default()
                );
            }
        }
    }
    ShowLog(path.to_owned())
}
