//! Per-packet cost of the TC program (`BPF_PROG_TEST_RUN`, kernel-timed),
//! next to the empty program of the same hook (`lb_floor`) on the same
//! packet. Root (loads programs, pins maps under `/sys/fs/bpf`). Sends no
//! packet anywhere: every frame only goes through `BPF_PROG_TEST_RUN`.
//! Run through `cargo xtask bench`, or:
//!
//! ```text
//! datapath_cost [--quick] [--json FILE]
//! ```
//!
//! What is measured, for IPv4 and IPv6, TCP and UDP, at 1, 1k, 10k and 100k
//! dual-stack Services with 10 endpoints each (the measured Service is the
//! last one):
//!
//! - `established`, `reply`, `miss`: one frame run `repeat` times (1M) in one
//!   `BPF_PROG_TEST_RUN`; the kernel reports the mean. The kernel reuses the
//!   same skb for every repeat, so a translated frame would be a different
//!   packet at the next repeat (a backend address is not a service: the old
//!   runner measured the miss path after the first repeat). Ten *mirror*
//!   Services (one per endpoint: `endpoint:8080 -> VIP:80`, `endpoint:5353
//!   -> VIP:53`) make every repeat the same work: the frame is translated
//!   VIP -> endpoint, then endpoint -> VIP by the mirror's own established
//!   flow, and so on; replies likewise. The verdict counters are checked
//!   after every run: all repeats must have taken the path named.
//! - `first`: the first packet of a flow (slot selection, two conntrack
//!   inserts, translation) cannot be repeated on one skb, so it is measured
//!   as one `BPF_PROG_TEST_RUN` with repeat 1 per fresh flow (distinct
//!   source ports, conntrack emptied before each batch), next to the floor
//!   and the established path measured the same way (`*_single` cases):
//!   single runs include the kernel's timer overhead, which the floor shows.
//!
//! Rounds alternate floor and program; the JSON holds every sample and the
//! median / min / max per case.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    maps::{HashMap, Map, MapData},
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use lb_common::{Ct4Key, Ct6Key, CtEntry, map_names, prog_names};
use lb_userspace::{
    datapath::{loader, maps::Maps},
    model::{self, NodeContext},
    plan,
};
use serde_json::{Value, json};

/// Endpoints per Service.
const ENDPOINTS: u32 = 10;
/// Service ports and target ports.
const HTTP_PORT: u16 = 80;
const HTTP_TARGET: u16 = 8080;
const DNS_PORT: u16 = 53;
const DNS_TARGET: u16 = 5353;
/// Client port of the repeated flows.
const CLIENT_PORT: u16 = 40_000;
/// First client port of the single-run flows.
const FIRST_SPORT: u16 = 1024;

const TCP: u8 = 6;
const UDP: u8 = 17;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// All addresses are inside 198.18.0.0/15 and `fd00::/8` (never sent anywhere).
fn v4_at(offset: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + offset)
}

/// Service VIPs: 198.18.64.0 + i (up to 114k services fit in the /15).
fn vip4(i: u32) -> Ipv4Addr {
    v4_at(16_384 + i)
}

fn vip6(i: u32) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0)) + u128::from(i))
}

/// Endpoint `b` of service `i`. IPv4 endpoints wrap around in 198.18.0.0/18
/// (16k addresses; the backend map deduplicates equal ones), IPv6 ones are
/// unique.
fn endpoint4(i: u32, b: u32) -> Ipv4Addr {
    v4_at((i * ENDPOINTS + b) % 16_384)
}

fn endpoint6(i: u32, b: u32) -> Ipv6Addr {
    Ipv6Addr::new(
        0xfd00,
        0x2,
        0,
        0,
        (i >> 16) as u16,
        (i & 0xffff) as u16,
        0,
        u16::try_from(b).unwrap_or(0) + 1,
    )
}

const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 254);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x1, 0, 0, 0, 0, 0, 2);
const MISS4: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 253);
const MISS6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x9, 0, 0, 0, 0, 0, 9);

fn service_json(name: &str, ips: [IpAddr; 2], ports: &[(&str, u16, &str, u16)]) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "bench"},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": ips[0].to_string(),
            "clusterIPs": [ips[0].to_string(), ips[1].to_string()],
            "ipFamilies": ["IPv4", "IPv6"],
            "ipFamilyPolicy": "RequireDualStack",
            "ports": ports.iter().map(|(port_name, port, protocol, target)| json!({
                "name": port_name, "port": port, "protocol": protocol, "targetPort": target,
            })).collect::<Vec<_>>(),
        },
    })
}

fn slice_json(
    service: &str,
    v6: bool,
    addrs: &[IpAddr],
    ports: &[(&str, u16, &str, u16)],
) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{service}-{}", if v6 { "v6" } else { "v4" }),
            "namespace": "bench",
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": if v6 { "IPv6" } else { "IPv4" },
        "endpoints": addrs.iter().map(|a| json!({
            "addresses": [a.to_string()],
            "conditions": {"ready": true, "serving": true, "terminating": false},
        })).collect::<Vec<_>>(),
        "ports": ports.iter().map(|(port_name, _, protocol, target)| json!({
            "name": port_name, "port": target, "protocol": protocol,
        })).collect::<Vec<_>>(),
    })
}

/// `count` dual-stack Services (80/TCP -> 8080) with 10 endpoints each; the
/// last one also has 53/UDP -> 5353. Plus the ten mirror Services of the
/// last one's endpoints (see the module doc).
fn objects(count: u32) -> anyhow::Result<(Vec<Service>, Vec<EndpointSlice>)> {
    let mut services = Vec::new();
    let mut slices = Vec::new();
    let http = ("http", HTTP_PORT, "TCP", HTTP_TARGET);
    let dns = ("dns", DNS_PORT, "UDP", DNS_TARGET);
    let mut push = |name: &str, ips: [IpAddr; 2], ports: &[_], v4: &[IpAddr], v6: &[IpAddr]| {
        services.push(service_json(name, ips, ports));
        slices.push(slice_json(name, false, v4, ports));
        slices.push(slice_json(name, true, v6, ports));
    };
    let last = count - 1;
    for i in 0..count {
        let v4: Vec<IpAddr> = (0..ENDPOINTS).map(|b| endpoint4(i, b).into()).collect();
        let v6: Vec<IpAddr> = (0..ENDPOINTS).map(|b| endpoint6(i, b).into()).collect();
        let ports: &[_] = if i == last { &[http, dns] } else { &[http] };
        push(
            &format!("svc-{i}"),
            [vip4(i).into(), vip6(i).into()],
            ports,
            &v4,
            &v6,
        );
    }
    let mirror_ports = [
        ("http", HTTP_TARGET, "TCP", HTTP_PORT),
        ("dns", DNS_TARGET, "UDP", DNS_PORT),
    ];
    for b in 0..ENDPOINTS {
        push(
            &format!("mirror-{b}"),
            [endpoint4(last, b).into(), endpoint6(last, b).into()],
            &mirror_ports,
            &[vip4(last).into()],
            &[vip6(last).into()],
        );
    }
    let services = services
        .into_iter()
        .map(serde_json::from_value)
        .collect::<Result<Vec<Service>, _>>()
        .context("generated Service")?;
    let slices = slices
        .into_iter()
        .map(serde_json::from_value)
        .collect::<Result<Vec<EndpointSlice>, _>>()
        .context("generated EndpointSlice")?;
    Ok((services, slices))
}

/// Ethernet + IP + TCP/UDP frame with an 18-byte payload. L4 checksums are
/// arbitrary non-zero values: the program updates them incrementally and
/// never verifies them.
fn frame(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, l4: u8, tcp_flags: u8) -> Vec<u8> {
    let payload = b"GET / HTTP/1.0\r\n\r\n";
    let mut l4_bytes = Vec::new();
    l4_bytes.extend(sport.to_be_bytes());
    l4_bytes.extend(dport.to_be_bytes());
    if l4 == TCP {
        l4_bytes.extend([
            0, 0, 0, 1, 0, 0, 0, 1, 0x50, tcp_flags, 0xfa, 0xf0, 0x12, 0x34, 0, 0,
        ]);
    } else {
        let len = u16::try_from(8 + payload.len()).expect("small");
        l4_bytes.extend(len.to_be_bytes());
        l4_bytes.extend([0x12, 0x34]);
    }
    l4_bytes.extend(payload);
    let mut out = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.extend([0x08, 0x00, 0x45, 0]);
            out.extend(
                u16::try_from(20 + l4_bytes.len())
                    .expect("small")
                    .to_be_bytes(),
            );
            out.extend([0, 0, 0x40, 0, 64, l4, 0, 0]);
            out.extend(s.octets());
            out.extend(d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            out.extend([0x86, 0xdd, 0x60, 0, 0, 0]);
            out.extend(u16::try_from(l4_bytes.len()).expect("small").to_be_bytes());
            out.extend([l4, 64]);
            out.extend(s.octets());
            out.extend(d.octets());
        }
        _ => unreachable!("mixed families"),
    }
    out.extend(l4_bytes);
    out
}

/// The same frame with addresses and ports swapped (a reply).
fn swapped(frame: &[u8]) -> Vec<u8> {
    let mut out = frame.to_vec();
    let (addr_off, addr_len, l4_off) = if frame[12] == 0x08 {
        (26, 4, 34)
    } else {
        (22, 16, 54)
    };
    for k in 0..addr_len {
        out.swap(addr_off + k, addr_off + addr_len + k);
    }
    out.swap(l4_off, l4_off + 2);
    out.swap(l4_off + 1, l4_off + 3);
    out
}

/// The same frame with other TCP flags (a UDP frame unchanged).
fn with_flags(frame: &[u8], tcp_flags: u8) -> Vec<u8> {
    let mut out = frame.to_vec();
    let (proto_off, l4_off) = if frame[12] == 0x08 {
        (23, 34)
    } else {
        (20, 54)
    };
    if out[proto_off] == TCP {
        out[l4_off + 13] = tcp_flags;
    }
    out
}

/// Answers the flow whose first packet (client -> VIP) `lb` translated
/// into `to_endpoint`: the endpoint's SYN+ACK (or datagram) moves the flow
/// to the main conntrack map, as a real answer does, so that the
/// established and reply paths are measured on answered flows.
fn answer(lb: &SchedClassifier, to_endpoint: &[u8]) -> anyhow::Result<Vec<u8>> {
    let reply = with_flags(&swapped(to_endpoint), TCP_SYN | TCP_ACK);
    Ok(run(lb, &reply, 1)?.1)
}

/// Addresses and ports of a frame (the bytes translation changes).
fn flow_of(frame: &[u8]) -> Vec<u8> {
    let (addrs, l4_off) = if frame[12] == 0x08 {
        (26..34, 34)
    } else {
        (22..54, 54)
    };
    let mut out = frame[addrs].to_vec();
    out.extend(&frame[l4_off..l4_off + 4]);
    out
}

/// One kernel-timed run of `frame`, `repeat` times; returns the mean ns per
/// run and the output frame.
fn run(program: &SchedClassifier, frame: &[u8], repeat: u32) -> anyhow::Result<(f64, Vec<u8>)> {
    let mut out = vec![0u8; frame.len() + 256];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat,
            ..TestRunOptions::default()
        })
        .context("BPF_PROG_TEST_RUN")?;
    out.truncate(result.data_size_out as usize);
    // With repeat, the kernel reports the mean duration of one run.
    Ok((result.duration.as_secs_f64() * 1e9, out))
}

/// Mean ns over single runs of every frame.
fn run_each(program: &SchedClassifier, frames: &[Vec<u8>]) -> anyhow::Result<f64> {
    let mut total = 0.0;
    for frame in frames {
        total += run(program, frame, 1)?.0;
    }
    Ok(total / f64::from(u32::try_from(frames.len()).unwrap_or(u32::MAX)))
}

fn program<'a>(ebpf: &'a Ebpf, name: &str) -> anyhow::Result<&'a SchedClassifier> {
    Ok(ebpf
        .program(name)
        .with_context(|| format!("program {name} missing from the object"))?
        .try_into()?)
}

/// Verdict counters by name, summed over CPUs.
fn reasons(maps: &Maps) -> anyhow::Result<BTreeMap<&'static str, u64>> {
    Ok(maps.reason_counts()?.into_iter().collect())
}

/// How many of the packets since `before` took path `reason`, and which
/// other paths were taken.
fn path_check(
    maps: &Maps,
    before: &BTreeMap<&'static str, u64>,
    reason: &str,
    expected: u64,
) -> anyhow::Result<(bool, String)> {
    let after = reasons(maps)?;
    let mut other = Vec::new();
    let mut hits = 0;
    for (name, count) in &after {
        let delta = count - before.get(name).copied().unwrap_or(0);
        if *name == reason {
            hits = delta;
        } else if delta > 0 {
            other.push(format!("{name}={delta}"));
        }
    }
    let ok = hits == expected && other.is_empty();
    let note = if ok {
        String::new()
    } else {
        format!("{reason}={hits} of {expected}; {}", other.join(" "))
    };
    Ok((ok, note))
}

fn clear_conntrack(pin_path: &Path) -> anyhow::Result<()> {
    fn clear<K: aya::Pod>(path: &Path) -> anyhow::Result<()> {
        let map = Map::from_map_data(MapData::from_pin(path)?)?;
        let mut map: HashMap<MapData, K, CtEntry> = HashMap::try_from(map)?;
        let keys: Vec<K> = map.keys().collect::<Result<_, _>>()?;
        for key in keys {
            map.remove(&key)?;
        }
        Ok(())
    }
    clear::<Ct4Key>(&pin_path.join(map_names::CT4))?;
    clear::<Ct6Key>(&pin_path.join(map_names::CT6))?;
    clear::<Ct4Key>(&pin_path.join(map_names::CT_NEW4))?;
    clear::<Ct6Key>(&pin_path.join(map_names::CT_NEW6))
}

#[derive(Clone, Copy)]
struct Combo {
    v6: bool,
    l4: u8,
}

impl Combo {
    const ALL: [Self; 4] = [
        Self { v6: false, l4: TCP },
        Self { v6: false, l4: UDP },
        Self { v6: true, l4: TCP },
        Self { v6: true, l4: UDP },
    ];

    fn family(self) -> &'static str {
        if self.v6 { "ipv6" } else { "ipv4" }
    }

    fn proto(self) -> &'static str {
        if self.l4 == TCP { "tcp" } else { "udp" }
    }

    fn client(self) -> IpAddr {
        if self.v6 {
            CLIENT6.into()
        } else {
            CLIENT4.into()
        }
    }

    fn vip(self, last: u32) -> IpAddr {
        if self.v6 {
            vip6(last).into()
        } else {
            vip4(last).into()
        }
    }

    fn miss(self) -> IpAddr {
        if self.v6 { MISS6.into() } else { MISS4.into() }
    }

    fn port(self) -> u16 {
        if self.l4 == TCP { HTTP_PORT } else { DNS_PORT }
    }
}

struct Config {
    repeat: u32,
    rounds: usize,
    flows: u16,
    scales: Vec<u32>,
    json: Option<PathBuf>,
    /// `--profile CASE`: run only that case (IPv4 TCP, 1k Services) in a
    /// loop for `profile_secs`, for `perf record` to sample.
    profile: Option<String>,
    profile_secs: u64,
}

impl Config {
    fn from_args() -> anyhow::Result<Self> {
        let mut quick = false;
        let mut json = None;
        let mut profile = None;
        let mut profile_secs = 10;
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--quick" => quick = true,
                "--json" => json = Some(PathBuf::from(args.next().context("--json FILE")?)),
                "--profile" => profile = Some(args.next().context("--profile CASE")?),
                "--seconds" => profile_secs = args.next().context("--seconds N")?.parse()?,
                other => bail!(
                    "unknown argument {other}; usage: datapath_cost [--quick] [--json FILE] \
                     | --profile established|reply|miss|first|churn [--seconds N]"
                ),
            }
        }
        let mut config = if quick {
            Self {
                repeat: 100_000,
                rounds: 2,
                flows: 2_000,
                scales: vec![1, 1_000],
                json,
                profile: None,
                profile_secs,
            }
        } else {
            Self {
                repeat: 1_000_000,
                rounds: 5,
                flows: 20_000,
                scales: vec![1, 1_000, 10_000, 100_000],
                json,
                profile: None,
                profile_secs,
            }
        };
        config.profile = profile;
        Ok(config)
    }
}

/// Samples of one case at one scale.
#[derive(Default)]
struct Samples {
    ns: Vec<f64>,
    path_ok: bool,
    notes: Vec<String>,
}

fn summary(samples: &[f64]) -> Value {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let median = if sorted.is_empty() {
        f64::NAN
    } else if sorted.len() % 2 == 1 {
        sorted[sorted.len() / 2]
    } else {
        f64::midpoint(sorted[sorted.len() / 2 - 1], sorted[sorted.len() / 2])
    };
    json!({
        "median": median,
        "min": sorted.first(),
        "max": sorted.last(),
        "samples": samples,
    })
}

/// One round of every case for one family/protocol at one scale.
fn measure_round(
    ebpf: &Ebpf,
    maps: &Maps,
    pin_path: &Path,
    config: &Config,
    combo: Combo,
    last: u32,
    results: &mut BTreeMap<&'static str, Samples>,
) -> anyhow::Result<()> {
    let lb = program(ebpf, prog_names::TC_LB)?;
    let floor = program(ebpf, prog_names::TC_FLOOR)?;
    let client = combo.client();
    let vip = combo.vip(last);
    let ack = if combo.l4 == TCP { TCP_ACK } else { 0 };
    let syn = if combo.l4 == TCP { TCP_SYN } else { 0 };
    let mut record = |case: &'static str, ns: f64, check: (bool, String)| {
        let entry = results.entry(case).or_insert_with(|| Samples {
            path_ok: true,
            ..Samples::default()
        });
        entry.ns.push(ns);
        entry.path_ok &= check.0;
        if !check.1.is_empty() {
            entry.notes.push(check.1);
        }
    };

    clear_conntrack(pin_path)?;

    // First packets: one single run per fresh flow.
    let firsts: Vec<Vec<u8>> = (0..config.flows)
        .map(|k| frame(client, vip, FIRST_SPORT + k, combo.port(), combo.l4, syn))
        .collect();
    let flows = u64::from(config.flows);
    let before = reasons(maps)?;
    let ns = run_each(floor, &firsts)?;
    record("floor_single", ns, path_check(maps, &before, "", 0)?);
    let before = reasons(maps)?;
    let ns = run_each(lb, &firsts)?;
    record(
        "first_single",
        ns,
        path_check(maps, &before, "nat_new", flows)?,
    );
    // The endpoints answer (not measured).
    for first in &firsts {
        let (_, to_endpoint) = run(lb, first, 1)?;
        answer(lb, &to_endpoint)?;
    }
    // The same flows again: now established, measured the same way.
    let again: Vec<Vec<u8>> = (0..config.flows)
        .map(|k| frame(client, vip, FIRST_SPORT + k, combo.port(), combo.l4, ack))
        .collect();
    let before = reasons(maps)?;
    let ns = run_each(lb, &again)?;
    record(
        "established_single",
        ns,
        path_check(maps, &before, "nat_established", flows)?,
    );
    clear_conntrack(pin_path)?;

    // Repeated runs: set up the flow and its mirror (see the module doc),
    // opened by a SYN and answered, as real flows are.
    let to_vip = frame(client, vip, CLIENT_PORT, combo.port(), combo.l4, ack);
    let (_, to_endpoint) = run(lb, &with_flags(&to_vip, syn), 1)?;
    let (_, back_to_vip) = run(lb, &to_endpoint, 1)?;
    let answered = answer(lb, &to_endpoint)?;
    run(lb, &answered, 1)?;
    let to_endpoint = with_flags(&to_endpoint, ack);
    if flow_of(&back_to_vip) != flow_of(&to_vip) {
        bail!(
            "{} {}: the mirror Service did not translate the frame back to the VIP",
            combo.family(),
            combo.proto()
        );
    }
    let reply = swapped(&to_endpoint);
    let miss = frame(
        client,
        combo.miss(),
        CLIENT_PORT,
        combo.port(),
        combo.l4,
        ack,
    );
    let repeat = config.repeat;
    let before = reasons(maps)?;
    let (ns, _) = run(floor, &to_vip, repeat)?;
    record("floor", ns, path_check(maps, &before, "", 0)?);
    for (case, frame, reason) in [
        ("established", &to_vip, "nat_established"),
        ("reply", &reply, "nat_reply"),
        ("miss", &miss, "pass_no_service"),
    ] {
        let before = reasons(maps)?;
        let (ns, _) = run(lb, frame, repeat)?;
        record(
            case,
            ns,
            path_check(maps, &before, reason, u64::from(repeat))?,
        );
    }
    Ok(())
}

/// Writes `count` Services (and the mirrors) into the maps, on top of what
/// is there.
fn populate(maps: &mut Maps, count: u32) -> anyhow::Result<()> {
    let started = Instant::now();
    let (services, slices) = objects(count)?;
    let model = model::build(&services, &slices, &NodeContext::default());
    if !model.errors.is_empty() {
        bail!("generated objects rejected: {:?}", &model.errors[..1]);
    }
    let state = maps.read_state()?;
    let plan = plan::diff(&state, &model.frontends);
    if !plan.problems.is_empty() {
        bail!("plan problems: {:?}", &plan.problems[..1]);
    }
    for op in &plan.ops {
        maps.apply_op(op)?;
    }
    eprintln!(
        "[datapath] {count} services (+10 mirrors): {} frontends, {} map writes in {:.1}s",
        model.frontends.len(),
        plan.ops.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Loops one IPv4 TCP case at 1k Services for `perf record`.
fn profile(ebpf: &mut Ebpf, pin_path: &Path, config: &Config, case: &str) -> anyhow::Result<Value> {
    let mut maps = Maps::from_ebpf(ebpf)?;
    let count = 1_000;
    populate(&mut maps, count)?;
    let lb = program(ebpf, prog_names::TC_LB)?;
    let combo = Combo::ALL[0];
    let (client, vip) = (combo.client(), combo.vip(count - 1));
    let to_vip = frame(client, vip, CLIENT_PORT, HTTP_PORT, TCP, TCP_ACK);
    let (_, to_endpoint) = run(lb, &with_flags(&to_vip, TCP_SYN), 1)?;
    run(lb, &to_endpoint, 1)?;
    let answered = answer(lb, &to_endpoint)?;
    run(lb, &answered, 1)?;
    let reply = swapped(&with_flags(&to_endpoint, TCP_ACK));
    let miss = frame(client, MISS4.into(), CLIENT_PORT, HTTP_PORT, TCP, TCP_ACK);
    let firsts: Vec<Vec<u8>> = (0..config.flows)
        .map(|k| frame(client, vip, FIRST_SPORT + k, HTTP_PORT, TCP, TCP_SYN))
        .collect();
    let deadline = Instant::now() + std::time::Duration::from_secs(config.profile_secs);
    let mut samples = Vec::new();
    while Instant::now() < deadline {
        let ns = match case {
            "established" => run(lb, &to_vip, config.repeat)?.0,
            "reply" => run(lb, &reply, config.repeat)?.0,
            "miss" => run(lb, &miss, config.repeat)?.0,
            "first" => {
                clear_conntrack(pin_path)?;
                run_each(lb, &firsts)?
            }
            "churn" => {
                // New flows from ever new clients, conntrack never cleared:
                // after ~64 rounds the LRU maps are full and every insert
                // evicts, as under sustained connection churn.
                let round = u32::try_from(samples.len() % 16_384).unwrap_or(0);
                let churn_client = IpAddr::V4(v4_at(65_536 + round));
                let flows: Vec<Vec<u8>> = (0..config.flows)
                    .map(|k| frame(churn_client, vip, FIRST_SPORT + k, HTTP_PORT, TCP, TCP_SYN))
                    .collect();
                run_each(lb, &flows)?
            }
            other => bail!("unknown case {other}: established, reply, miss, first or churn"),
        };
        samples.push(ns);
    }
    eprintln!(
        "[datapath] profile {case}: {:?} ns",
        summary(&samples)["median"]
    );
    Ok(json!({"profile": case, "ns": summary(&samples)}))
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        "kernel": kernel,
    })
}

fn program_info(ebpf: &Ebpf, name: &str) -> Value {
    let Ok(program) = program(ebpf, name) else {
        return Value::Null;
    };
    match program.info() {
        Ok(info) => json!({
            "id": info.id(),
            "xlated_insns": info.size_translated().map(|bytes| bytes / 8),
            "jited_bytes": info.size_jitted(),
            "verified_insns": info.verified_instruction_count(),
        }),
        Err(error) => json!({"error": error.to_string()}),
    }
}

/// The run's own pin directory, removed however the run ends (a program
/// the verifier refuses included).
struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = loader::cleanup(&self.0, &[]);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn main() -> anyhow::Result<()> {
    let config = Config::from_args()?;
    let pins = PinDir(PathBuf::from(format!(
        "/sys/fs/bpf/lb-bench-{}",
        std::process::id()
    )));
    let pin_path = pins.0.clone();
    let mut ebpf = loader::load(&pin_path)?;
    let result = if let Some(case) = &config.profile {
        profile(&mut ebpf, &pin_path, &config, case)
    } else {
        measure(&mut ebpf, &pin_path, &config)
    };
    drop(ebpf);
    drop(pins);
    let report = result?;
    if let Some(path) = &config.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("write {}", path.display()))?;
        eprintln!("[datapath] wrote {}", path.display());
    }
    Ok(())
}

fn measure(ebpf: &mut Ebpf, pin_path: &Path, config: &Config) -> anyhow::Result<Value> {
    let mut maps = Maps::from_ebpf(ebpf)?;
    {
        let floor: &mut SchedClassifier = ebpf
            .program_mut(prog_names::TC_FLOOR)
            .context("floor program")?
            .try_into()?;
        floor.load()?;
    }
    eprintln!(
        "[datapath] per-packet cost, BPF_PROG_TEST_RUN: {} repeats, {} single-run flows, {} rounds",
        config.repeat, config.flows, config.rounds
    );
    println!(
        "{:>8} {:>4} {:>3} | {:>6} {:>7} {:>6} {:>6} | {:>6} {:>6} {:>6}  (ns/packet, median)",
        "services", "fam", "l4", "floor", "estab", "reply", "miss", "floor1", "first1", "estab1"
    );
    let mut rows = Vec::new();
    for &count in &config.scales {
        populate(&mut maps, count)?;
        for combo in Combo::ALL {
            let mut results = BTreeMap::new();
            for _ in 0..config.rounds {
                measure_round(
                    ebpf,
                    &maps,
                    pin_path,
                    config,
                    combo,
                    count - 1,
                    &mut results,
                )?;
            }
            let median = |case: &str| {
                results.get(case).map_or(f64::NAN, |s| {
                    summary(&s.ns)["median"].as_f64().unwrap_or(f64::NAN)
                })
            };
            println!(
                "{count:>8} {:>4} {:>3} | {:>6.1} {:>7.1} {:>6.1} {:>6.1} | {:>6.1} {:>6.1} {:>6.1}",
                if combo.v6 { "v6" } else { "v4" },
                combo.proto(),
                median("floor"),
                median("established"),
                median("reply"),
                median("miss"),
                median("floor_single"),
                median("first_single"),
                median("established_single"),
            );
            for (case, samples) in &results {
                if !samples.path_ok {
                    eprintln!(
                        "[datapath] WARNING {count} {} {} {case}: not every run took the expected path: {}",
                        combo.family(),
                        combo.proto(),
                        samples.notes.join("; ")
                    );
                }
                rows.push(json!({
                    "services": count,
                    "family": combo.family(),
                    "proto": combo.proto(),
                    "case": case,
                    "mode": if case.ends_with("_single") { "single" } else { "repeat" },
                    "ns": summary(&samples.ns),
                    "path_ok": samples.path_ok,
                    "notes": samples.notes,
                }));
            }
        }
    }
    Ok(json!({
        "machine": machine(),
        "repeat": config.repeat,
        "rounds": config.rounds,
        "single_run_flows": config.flows,
        "endpoints_per_service": ENDPOINTS,
        "programs": {
            "lb_tc": program_info(ebpf, prog_names::TC_LB),
            "lb_floor": program_info(ebpf, prog_names::TC_FLOOR),
        },
        "results": rows,
    }))
}
