//! Per-packet cost of the XDP program (`lb_xdp`) next to the TC program
//! (`lb_tc`) on the same north-south frames (`BPF_PROG_TEST_RUN`,
//! kernel-timed), each next to the empty program of its hook (`lb_xdp_floor`,
//! `lb_floor`). Root. Sends no packet anywhere: the frames only go through
//! `BPF_PROG_TEST_RUN`, in a network namespace of this process's own.
//! Run through `cargo xtask bench` (stage `xdp`), or:
//!
//! ```text
//! xdp_cost [--quick] [--json FILE]
//! ```
//!
//! The case: a `NodePort` (TCP) of one dual-stack Service with one backend
//! behind another node (externalTrafficPolicy Cluster: source NAT to the
//! node), per family:
//!
//! - `new`: a client's SYN (backend choice, conntrack inserts, SNAT port,
//!   DNAT);
//! - `reply`: the backend's SYN-ACK to the node (reverse translation);
//! - `established`: the client's next segment.
//!
//! Each frame is a fresh flow (new) or a flow's next packet, so every
//! packet is one `BPF_PROG_TEST_RUN` with repeat 1 (a translated frame is a
//! different packet at the next repeat): the kernel's timer overhead is in
//! every number, which the floor of each hook shows. Both programs get the
//! same frames, on flows of their own (distinct client ports).
//!
//! What each program does after translating differs, and is what a
//! deployment gets: XDP looks the next hop up in the FIB (this namespace
//! has the routes and permanent neighbours of a node: `up0` towards the
//! clients, `be0` towards the backends' node) and returns `XDP_REDIRECT`
//! (through the devmap; the redirect itself happens after the program, not
//! in a test run); TC (`--forward=stack`, the default) returns the packet
//! to the stack, whose routing is not in its number. Every verdict is
//! checked.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail, ensure};
use aya::{
    Ebpf,
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use lb_common::{LbConfig, prog_names, xdp as names};
use lb_userspace::{
    datapath::{loader, maps::Maps, xdp},
    model::{Backend, Frontend, FrontendKind, FrontendSpec, Protocol, ServiceRef},
    plan,
};
use serde_json::{Value, json};

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const XDP_REDIRECT: u32 = 4;
const TC_ACT_OK: u32 = 0;
const NODE4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const NODE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
const NODE_PORT: u16 = 30080;

fn client(v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7))
    } else {
        IpAddr::V6("2001:db8:7::7".parse().unwrap_or(Ipv6Addr::LOCALHOST))
    }
}

fn node(v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4(NODE4)
    } else {
        IpAddr::V6(NODE6)
    }
}

fn backend(v4: bool) -> SocketAddr {
    if v4 {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 12, 2)), 8080)
    } else {
        SocketAddr::new(
            IpAddr::V6(Ipv6Addr::new(0xfd00, 0x12, 0, 0, 0, 0, 0, 2)),
            8080,
        )
    }
}

/// Ones'-complement sum of `data` from `initial`.
fn sum16(data: &[u8], initial: u32) -> u32 {
    let mut sum = initial;
    for chunk in data.chunks(2) {
        let hi = u32::from(chunk[0]) << 8;
        sum += hi | chunk.get(1).map_or(0, |b| u32::from(*b));
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    #[expect(clippy::cast_possible_truncation, reason = "folded to 16 bits")]
    let folded = sum as u16;
    !folded
}

/// An Ethernet + IP + TCP (no payload) frame with correct checksums.
fn frame(src: SocketAddr, dst: SocketAddr, tcp_flags: u8) -> Vec<u8> {
    let mut tcp = Vec::new();
    tcp.extend(src.port().to_be_bytes());
    tcp.extend(dst.port().to_be_bytes());
    tcp.extend(1_u32.to_be_bytes());
    tcp.extend(u32::from(tcp_flags & TCP_ACK != 0).to_be_bytes());
    tcp.extend([5 << 4, tcp_flags, 0xfa, 0xf0, 0, 0, 0, 0]);
    let mut pseudo = Vec::new();
    let mut out = vec![2, 0, 0, 0, 0x0a, 0, 2, 0, 0, 0, 0x0a, 1];
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.extend([0x08, 0x00]);
            let mut ip = vec![0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0];
            ip.extend(s.octets());
            ip.extend(d.octets());
            let csum = fold(sum16(&ip, 0));
            ip[10..12].copy_from_slice(&csum.to_be_bytes());
            out.extend(ip);
            pseudo.extend(s.octets());
            pseudo.extend(d.octets());
            pseudo.extend([0, 6, 0, 20]);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            out.extend([0x86, 0xdd]);
            out.extend([0x60, 0, 0, 0, 0, 20, 6, 64]);
            out.extend(s.octets());
            out.extend(d.octets());
            pseudo.extend(s.octets());
            pseudo.extend(d.octets());
            pseudo.extend([0, 0, 0, 20, 0, 0, 0, 6]);
        }
        _ => unreachable!("one family per frame"),
    }
    let csum = fold(sum16(&tcp, sum16(&pseudo, 0)));
    tcp[16..18].copy_from_slice(&csum.to_be_bytes());
    out.extend(tcp);
    out
}

/// The source of a translated frame (the SNAT address and port).
fn source_of(frame: &[u8]) -> SocketAddr {
    let (ip, l4): (IpAddr, usize) = if frame[12] == 0x08 {
        let b: [u8; 4] = frame[26..30].try_into().unwrap_or_default();
        (IpAddr::from(b), 34)
    } else {
        let b: [u8; 16] = frame[22..38].try_into().unwrap_or_default();
        (IpAddr::from(b), 54)
    };
    SocketAddr::new(ip, u16::from_be_bytes([frame[l4], frame[l4 + 1]]))
}

/// The hook a program runs at.
#[derive(Clone, Copy)]
enum Hook {
    Tc,
    Xdp,
}

/// One kernel-timed single run; (ns, return value, output frame). XDP
/// runs get `ctx` (the `xdp_md` naming the ingress device).
fn run_one(
    ebpf: &mut Ebpf,
    hook: Hook,
    name: &str,
    frame: &[u8],
    ctx: &[u8],
) -> anyhow::Result<(f64, u32, Vec<u8>)> {
    let mut out = vec![0u8; frame.len() + 256];
    let program = ebpf
        .program_mut(name)
        .with_context(|| format!("no program {name}"))?;
    let result = match hook {
        Hook::Tc => {
            let tc: &mut SchedClassifier = program.try_into()?;
            tc.test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                repeat: 1,
                ..TestRunOptions::default()
            })
        }
        Hook::Xdp => {
            let xdp: &mut Xdp = program.try_into()?;
            xdp.test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(ctx),
                repeat: 1,
                ..TestRunOptions::default()
            })
        }
    }
    .with_context(|| format!("BPF_PROG_TEST_RUN {name}"))?;
    out.truncate(result.data_size_out as usize);
    Ok((
        result.duration.as_secs_f64() * 1e9,
        result.return_value,
        out,
    ))
}

/// Per-case mean ns of one hook and family, each case's verdict checked.
fn measure(
    ebpf: &mut Ebpf,
    hook: Hook,
    v4: bool,
    flows: u16,
    first_port: u16,
    ctx: [&[u8]; 2],
) -> anyhow::Result<Value> {
    let (name, floor, expect) = match hook {
        Hook::Tc => (prog_names::TC_LB, prog_names::TC_FLOOR, TC_ACT_OK),
        Hook::Xdp => (names::PROG, names::FLOOR, XDP_REDIRECT),
    };
    let to = SocketAddr::new(node(v4), NODE_PORT);
    let mut totals = [0.0_f64; 4];
    for i in 0..flows {
        let from = SocketAddr::new(client(v4), first_port + i);
        let syn = frame(from, to, TCP_SYN);
        let (ns, _, _) = run_one(ebpf, hook, floor, &syn, ctx[0])?;
        totals[0] += ns;
        let (ns, verdict, out) = run_one(ebpf, hook, name, &syn, ctx[0])?;
        ensure!(verdict == expect, "{name}: new flow verdict {verdict}");
        totals[1] += ns;
        let snat = source_of(&out);
        ensure!(snat.ip() == node(v4), "{name}: no source NAT ({snat})");
        let reply = frame(backend(v4), snat, TCP_SYN | TCP_ACK);
        let (ns, verdict, out) = run_one(ebpf, hook, name, &reply, ctx[1])?;
        ensure!(verdict == expect, "{name}: reply verdict {verdict}");
        ensure!(
            source_of(&out) == to,
            "{name}: reply not reverse translated"
        );
        totals[2] += ns;
        let ack = frame(from, to, TCP_ACK);
        let (ns, verdict, out) = run_one(ebpf, hook, name, &ack, ctx[0])?;
        ensure!(verdict == expect, "{name}: established verdict {verdict}");
        ensure!(
            source_of(&out) == snat,
            "{name}: established flow lost its SNAT"
        );
        totals[3] += ns;
    }
    let n = f64::from(flows);
    Ok(json!({
        "floor": totals[0] / n,
        "new": totals[1] / n,
        "reply": totals[2] / n,
        "established": totals[3] / n,
    }))
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new("ip").args(args).status().context("ip")?;
    ensure!(status.success(), "ip {}", args.join(" "));
    Ok(())
}

/// A node's devices, routes and neighbours in this thread's namespace.
fn topology() -> anyhow::Result<()> {
    ip(&["link", "set", "lo", "up"])?;
    for (dev, peer) in [("up0", "up1"), ("be0", "be1")] {
        ip(&["link", "add", dev, "type", "veth", "peer", "name", peer])?;
        ip(&["link", "set", dev, "up"])?;
        ip(&["link", "set", peer, "up"])?;
    }
    ip(&["addr", "add", "198.18.0.1/24", "dev", "up0"])?;
    ip(&["addr", "add", "fd00::1/64", "dev", "up0", "nodad"])?;
    ip(&["addr", "add", "198.18.1.1/24", "dev", "be0"])?;
    ip(&["addr", "add", "fd00:1::1/64", "dev", "be0", "nodad"])?;
    for (addr, dev) in [
        ("198.18.0.254", "up0"),
        ("fd00::fe", "up0"),
        ("198.18.1.2", "be0"),
        ("fd00:1::2", "be0"),
    ] {
        ip(&[
            "neigh",
            "add",
            addr,
            "lladdr",
            "02:00:00:00:0c:01",
            "dev",
            dev,
            "nud",
            "permanent",
        ])?;
    }
    ip(&["route", "add", "203.0.113.0/24", "via", "198.18.0.254"])?;
    ip(&["-6", "route", "add", "2001:db8:7::/64", "via", "fd00::fe"])?;
    ip(&["route", "add", "198.18.12.0/24", "via", "198.18.1.2"])?;
    ip(&["-6", "route", "add", "fd00:12::/64", "via", "fd00:1::2"])?;
    for path in [
        "/proc/sys/net/ipv4/conf/all/forwarding",
        "/proc/sys/net/ipv6/conf/all/forwarding",
    ] {
        std::fs::write(path, "1").with_context(|| path.to_owned())?;
    }
    Ok(())
}

fn populate(maps: &mut Maps) -> anyhow::Result<()> {
    maps.write_config(&LbConfig {
        node_addr4: NODE4.octets(),
        loopback4: [169, 254, 42, 1],
        node_addr6: NODE6.octets(),
        loopback6: Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0x6c62, 1).octets(),
        flags: 0,
        snat_seed: 0,
    })?;
    let mut desired = std::collections::BTreeMap::new();
    for v4 in [true, false] {
        let be = backend(v4);
        desired.insert(
            Frontend {
                addr: node(v4),
                port: NODE_PORT,
                proto: Protocol::Tcp,
            },
            FrontendSpec {
                service: ServiceRef {
                    namespace: "default".into(),
                    name: "bench".into(),
                    port_name: "".into(),
                },
                kind: FrontendKind::NodePort,
                backends: vec![Backend {
                    addr: be.ip(),
                    port: be.port(),
                    node_local: false,
                }],
                terminating: Vec::new(),
                not_ready: Vec::new(),
                not_serving: Vec::new(),
                external_local: false,
                internal_local: false,
                no_local_endpoints: false,
                affinity_timeout_s: 0,
                source_ranges: Vec::new(),
            },
        );
    }
    let plan = plan::diff(&maps.read_state()?, &desired);
    if !plan.problems.is_empty() {
        bail!("plan problems: {:?}", plan.problems);
    }
    for op in &plan.ops {
        maps.apply_op(op)?;
    }
    Ok(())
}

struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = loader::cleanup(&self.0, &[]);
    }
}

fn main() -> anyhow::Result<()> {
    let mut quick = false;
    let mut json_path: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--json" => json_path = Some(args.next().context("--json FILE")?.into()),
            other => bail!("unknown argument {other}; usage: xdp_cost [--quick] [--json FILE]"),
        }
    }
    // A namespace of this (main) thread's own: the FIB the XDP program asks.
    // SAFETY: unshare affects only this thread.
    ensure!(
        unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0,
        "unshare(CLONE_NEWNET): {}",
        std::io::Error::last_os_error()
    );
    topology()?;
    let pins = PinDir(PathBuf::from(format!(
        "/sys/fs/bpf/lb-xdpcost-{}",
        std::process::id()
    )));
    let report = run(&pins.0, quick);
    drop(pins);
    let report = report?;
    if let Some(path) = json_path {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("write {}", path.display()))?;
        eprintln!("[xdp] wrote {}", path.display());
    }
    Ok(())
}

fn run(pin_path: &Path, quick: bool) -> anyhow::Result<Value> {
    let mut ebpf = loader::load(pin_path)?;
    xdp::load(&mut ebpf)?;
    {
        let floor: &mut Xdp = ebpf
            .program_mut(names::FLOOR)
            .context("no XDP floor program")?
            .try_into()?;
        floor.load()?;
        let floor: &mut SchedClassifier = ebpf
            .program_mut(prog_names::TC_FLOOR)
            .context("no TC floor program")?
            .try_into()?;
        floor.load()?;
    }
    let mut maps = Maps::from_ebpf(&mut ebpf)?;
    populate(&mut maps)?;
    xdp::set_redirect_targets(&mut ebpf, &["up0".into(), "be0".into()])?;
    // `xdp_md` with the uplink as ingress device (the FIB lookup's).
    // (Replies come in from the backends' node, on `be0`.)
    let mut ctx = [[0u8; 24]; 2];
    for (ctx, dev) in ctx.iter_mut().zip(["up0", "be0"]) {
        let index = loader::if_index(dev).context("device")?;
        ctx[12..16].copy_from_slice(&index.to_ne_bytes());
    }
    let (flows, rounds): (u16, u16) = if quick { (200, 1) } else { (2000, 3) };
    eprintln!(
        "[xdp] per-packet cost, XDP vs TC, BPF_PROG_TEST_RUN single runs: {flows} flows x {rounds} rounds per family"
    );
    eprintln!(
        "[xdp] {:>6} {:>5} | {:>7} {:>7} {:>7} {:>7} | ns, program - floor; ratio TC/XDP",
        "family", "hook", "floor", "new", "reply", "estab"
    );
    let mut results = Vec::new();
    let mut port = 10_000_u16;
    for round in 0..rounds {
        for v4 in [true, false] {
            let mut row = serde_json::Map::new();
            for (hook, label) in [(Hook::Tc, "tc"), (Hook::Xdp, "xdp")] {
                let len = frame(
                    SocketAddr::new(client(v4), 1),
                    SocketAddr::new(node(v4), 1),
                    0,
                )
                .len();
                for ctx in &mut ctx {
                    ctx[4..8].copy_from_slice(&u32::try_from(len)?.to_ne_bytes());
                }
                let value = measure(&mut ebpf, hook, v4, flows, port, [&ctx[0], &ctx[1]])?;
                port += flows;
                eprintln!(
                    "[xdp] {:>6} {:>5} | {:>7.1} {:>7.1} {:>7.1} {:>7.1}",
                    if v4 { "v4" } else { "v6" },
                    label,
                    value["floor"].as_f64().unwrap_or(0.0),
                    value["new"].as_f64().unwrap_or(0.0),
                    value["reply"].as_f64().unwrap_or(0.0),
                    value["established"].as_f64().unwrap_or(0.0),
                );
                row.insert(label.into(), value);
            }
            let ratio = |case: &str| {
                let net = |h: &str| {
                    row[h][case].as_f64().unwrap_or(0.0) - row[h]["floor"].as_f64().unwrap_or(0.0)
                };
                net("tc") / net("xdp")
            };
            let ratios = json!({
                "new": ratio("new"),
                "reply": ratio("reply"),
                "established": ratio("established"),
            });
            eprintln!(
                "[xdp] {:>6} ratio TC/XDP (net of floor): new {:.2} reply {:.2} established {:.2}",
                if v4 { "v4" } else { "v6" },
                ratios["new"].as_f64().unwrap_or(0.0),
                ratios["reply"].as_f64().unwrap_or(0.0),
                ratios["established"].as_f64().unwrap_or(0.0)
            );
            row.insert("ratio_tc_over_xdp".into(), ratios);
            results
                .push(json!({ "round": round, "family": if v4 { "v4" } else { "v6" }, "ns": row }));
        }
    }
    Ok(json!({
        "what": "per-packet ns (BPF_PROG_TEST_RUN, single runs), NodePort TCP, remote backend, ETP=Cluster; XDP includes the FIB lookup and devmap redirect, TC (--forward=stack) hands the packet to the stack",
        "flows": flows,
        "rounds": rounds,
        "results": results,
    }))
}
