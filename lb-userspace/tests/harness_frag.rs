//! Fragmented datagrams through a `ClusterIP` (issue 12, "Fragments"): a
//! 4000-byte UDP datagram from the client to the Service and a 4000-byte
//! answer back, on 1500-byte links, so that both are split into IP
//! fragments (by the client and by the backend) and every fragment crosses
//! the node's datapath: the requests' fragments translated to the backend,
//! the answers' back to the Service. Both families; the receiver of each
//! datagram checks it byte for byte (the kernel reassembles it and checks
//! its UDP checksum first).
//!
//! The single-node lab of `support::lab`, with a Service `big` (port 53/UDP
//! to 9053 on `be1`) answered by an echo server of this file. Privileged:
//! root and bpffs.
//!
//! Run: `cargo test -p lb-userspace --test harness_frag -- --nocapture`

mod support;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use support::lab::{Expect, Lab};
use support::manifests::{Cond, Manifest, service, slice, sp};
use support::netns::{enter_netns, in_netns, ns_command};
use support::pins::require_privileged;
use support::process::run_ok;
use support::serial;
use support::topo::Family;

/// The datagram size each way: above the 1500-byte MTU, three fragments.
const SIZE: usize = 4000;
/// The Service's port and the echo server's.
const PORT: u16 = 53;
const TARGET_PORT: u16 = 9053;

fn big_vip(family: Family) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::new(198, 19, 0, 20)),
        Family::V6 => IpAddr::V6(Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x20)),
    }
}

/// SIZE bytes that differ per direction and family and repeat nowhere
/// within a fragment.
fn pattern(seed: u8) -> Vec<u8> {
    (0..SIZE)
        .map(|i| u8::try_from((i * 7 + i / 251 + usize::from(seed)) % 256).unwrap())
        .collect()
}

fn request_of(family: Family) -> Vec<u8> {
    pattern(if family == Family::V4 { 1 } else { 2 })
}

fn answer_of(family: Family) -> Vec<u8> {
    pattern(if family == Family::V4 { 101 } else { 102 })
}

/// What the echo server received: from whom, and whether it was the
/// expected request byte for byte.
struct Received {
    peer: SocketAddr,
    len: usize,
    exact: bool,
}

/// A UDP server on `[::]:TARGET_PORT` in a pod: checks each datagram
/// against its family's request and answers with its family's answer.
/// Dropping it stops and joins the thread.
struct Echo {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    received: mpsc::Receiver<Received>,
}

impl Echo {
    fn start(ns: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, received) = mpsc::channel();
        let (ready_tx, ready) = mpsc::channel();
        let (ns, flag) = (ns.to_owned(), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            enter_netns(&ns);
            let socket = UdpSocket::bind(("::", TARGET_PORT)).expect("bind the echo server");
            socket
                .set_read_timeout(Some(Duration::from_millis(200)))
                .expect("timeout");
            ready_tx.send(()).expect("ready");
            let mut buf = vec![0u8; 65536];
            while !flag.load(Ordering::SeqCst) {
                let Ok((len, peer)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                let family = if peer.ip().to_canonical().is_ipv4() {
                    Family::V4
                } else {
                    Family::V6
                };
                let exact = buf[..len] == request_of(family)[..];
                let _ = tx.send(Received { peer, len, exact });
                if exact {
                    let _ = socket.send_to(&answer_of(family), peer);
                }
            }
        });
        ready
            .recv_timeout(Duration::from_secs(5))
            .expect("echo server ready");
        Self {
            stop,
            thread: Some(thread),
            received,
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            eprintln!("warning: the echo server thread panicked");
        }
    }
}

/// The `big` Service on both families, endpoint `be1`.
fn big_file(lab: &Lab) -> Manifest {
    let be1 = lab.topo.backend("be1");
    let mut manifest = Manifest::default().with(
        &service(
            "big",
            "ClusterIP",
            &[big_vip(Family::V4), big_vip(Family::V6)],
            &[sp("dns", PORT, "UDP", "9053")],
        )
        .build(),
    );
    for family in Family::BOTH {
        let name = format!("big-{}", if family == Family::V4 { "v4" } else { "v6" });
        manifest = manifest.with(&slice(
            "big",
            &name,
            family,
            &[("dns", TARGET_PORT, "UDP")],
            [Cond::Ready.endpoint(be1.addr.get(family))],
        ));
    }
    manifest
}

/// The MTU of IFACE in NS.
fn mtu(ns: &str, iface: &str) -> u32 {
    let out = run_ok(ns_command(ns, "ip").args(["-o", "link", "show", iface]));
    let mut words = out.split_whitespace();
    words
        .find(|w| *w == "mtu")
        .and_then(|_| words.next())
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("no MTU in {out:?}"))
}

#[test]
fn a_4000_byte_udp_datagram_crosses_a_cluster_ip_each_way() {
    let _serial = serial();
    if !require_privileged("harness_frag") {
        return;
    }
    let mut lab = Lab::new();
    let echo = Echo::start(lab.topo.backend("be1").ns());
    let since = Instant::now();
    lab.write_manifest("big.yaml", &big_file(&lab));
    lab.start_agent();
    let be1 = lab.topo.backend("be1");
    let expect: Vec<Expect> = Family::BOTH
        .into_iter()
        .map(|family| Expect {
            vip: big_vip(family),
            port: PORT,
            protocol: "UDP",
            active: [be1.addr.sock(family, TARGET_PORT)].into(),
        })
        .collect();
    lab.wait_programmed(since, &expect);
    // Every link on the way carries 1500 bytes: the datagrams are split.
    assert_eq!(mtu(lab.client_ns(), "eth0"), 1500);
    assert_eq!(mtu(be1.ns(), "eth0"), 1500);
    assert_eq!(mtu(lab.node_ns(), &lab.topo.client.iface), 1500);
    assert_eq!(mtu(lab.node_ns(), &be1.iface), 1500);
    let client = lab.topo.client.addr;
    for family in Family::BOTH {
        let to = SocketAddr::new(big_vip(family), PORT);
        let unspecified: IpAddr = match family {
            Family::V4 => Ipv4Addr::UNSPECIFIED.into(),
            Family::V6 => Ipv6Addr::UNSPECIFIED.into(),
        };
        let (from, answer) = in_netns(lab.client_ns(), || {
            let socket = UdpSocket::bind((unspecified, 0)).expect("client socket");
            socket
                .set_read_timeout(Some(Duration::from_secs(2)))
                .expect("timeout");
            let mut buf = vec![0u8; 65536];
            // A lost datagram is retried (the first may find an empty
            // neighbour cache on the way); the answer must come.
            for _ in 0..3 {
                socket.send_to(&request_of(family), to).expect("send");
                if let Ok((len, from)) = socket.recv_from(&mut buf) {
                    return (from, buf[..len].to_vec());
                }
            }
            panic!("{family:?}: no answer from {to}");
        });
        // The backend got the whole request, from the client itself.
        let got = echo
            .received
            .recv_timeout(Duration::from_secs(1))
            .expect("the echo server saw the request");
        assert_eq!(got.len, SIZE, "{family:?}: request length at the backend");
        assert!(got.exact, "{family:?}: request bytes at the backend");
        assert_eq!(
            got.peer.ip().to_canonical(),
            client.get(family),
            "{family:?}: the backend saw another source"
        );
        // The answer came back from the Service, whole.
        assert_eq!(from, to, "{family:?}: answer not from the Service");
        assert_eq!(answer.len(), SIZE, "{family:?}: answer length");
        assert!(answer == answer_of(family), "{family:?}: answer bytes");
        while echo.received.try_recv().is_ok() {}
    }
    lab.assert_agent_alive();
}
