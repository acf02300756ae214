//! Per-packet cost of the TC program (`BPF_PROG_TEST_RUN`, kernel-timed),
//! next to the empty program of the same hook on the same packet. Root.
//! Run through `cargo xtask bench`.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use lb_common::prog_names;
use lb_userspace::{
    loader,
    maps::Maps,
    model::{Backend, Frontend, FrontendSpec, Protocol, ServiceRef},
    plan,
};

/// Ethernet + IPv4 + TCP (ACK) frame with an 18-byte payload; checksums are
/// not needed for the cost measurement.
fn frame(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Vec<u8> {
    let payload = b"GET / HTTP/1.0\r\n\r\n";
    let mut tcp = Vec::new();
    tcp.extend(sport.to_be_bytes());
    tcp.extend(dport.to_be_bytes());
    tcp.extend([0, 0, 0, 1, 0, 0, 0, 1, 0x50, 0x10, 0xfa, 0xf0, 0, 0, 0, 0]);
    tcp.extend(payload);
    let mut out = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.extend([0x08, 0x00, 0x45, 0]);
            out.extend(u16::try_from(20 + tcp.len()).unwrap().to_be_bytes());
            out.extend([0, 0, 0x40, 0, 64, 6, 0, 0]);
            out.extend(s.octets());
            out.extend(d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            out.extend([0x86, 0xdd, 0x60, 0, 0, 0]);
            out.extend(u16::try_from(tcp.len()).unwrap().to_be_bytes());
            out.extend([6, 64]);
            out.extend(s.octets());
            out.extend(d.octets());
        }
        _ => unreachable!("mixed families"),
    }
    out.extend(tcp);
    out
}

fn ns_per_packet(program: &SchedClassifier, frame: &[u8], repeat: u32) -> f64 {
    let mut out = vec![0u8; frame.len() + 64];
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        repeat,
        ..TestRunOptions::default()
    };
    let result = program.test_run(opts).expect("BPF_PROG_TEST_RUN");
    // With repeat, the kernel reports the mean duration of one run.
    result.duration.as_secs_f64() * 1e9
}

/// `count` services (v4 and v6) with 10 endpoints each.
fn services(count: u32) -> BTreeMap<Frontend, FrontendSpec> {
    let mut desired = BTreeMap::new();
    for i in 0..count {
        let [_, _, hi, lo] = i.to_be_bytes();
        for v6 in [false, true] {
            let vip: IpAddr = if v6 {
                format!("fd00:96::{:x}", i + 1).parse().unwrap()
            } else {
                IpAddr::from([198, 19, hi, lo])
            };
            let backends = (0..10u8)
                .map(|b| Backend {
                    addr: if v6 {
                        format!("fd00:2::{:x}:{b}", i + 1).parse().unwrap()
                    } else {
                        IpAddr::from([198, 18, hi ^ b, lo])
                    },
                    port: 8080,
                })
                .collect();
            desired.insert(
                Frontend {
                    addr: vip,
                    port: 80,
                    proto: Protocol::Tcp,
                },
                FrontendSpec {
                    service: ServiceRef {
                        namespace: "bench".into(),
                        name: format!("svc-{i}"),
                        port_name: String::new(),
                    },
                    backends,
                },
            );
        }
    }
    desired
}

fn main() -> anyhow::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let repeat = if quick { 100_000 } else { 1_000_000 };
    let scales: &[u32] = if quick {
        &[1, 1000]
    } else {
        &[1, 1000, 10_000]
    };
    let pin_path = PathBuf::from(format!("/sys/fs/bpf/lb-bench-{}", std::process::id()));
    let mut ebpf = loader::load(&pin_path)?;
    let result = (|| -> anyhow::Result<()> {
        let mut maps = Maps::from_ebpf(&mut ebpf)?;
        {
            let floor: &mut SchedClassifier = ebpf
                .program_mut(prog_names::TC_FLOOR)
                .expect("floor program")
                .try_into()?;
            floor.load()?;
        }
        println!("per-packet cost, BPF_PROG_TEST_RUN, {repeat} repeats (ns/packet)");
        println!(
            "{:>9}  {:>7}  {:>9}  {:>9}  {:>9}  {:>9}  {:>9}",
            "services", "floor", "v4 hit", "v6 hit", "v4 reply", "v4 miss", "v6 miss"
        );
        for &count in scales {
            let desired = services(count);
            let state = maps.read_state()?;
            for op in &plan::diff(&state, &desired).ops {
                maps.apply_op(op)?;
            }
            let client4: IpAddr = "198.18.1.2".parse()?;
            let client6: IpAddr = "fd00:1::2".parse()?;
            let last4 = IpAddr::from({
                let [_, _, hi, lo] = (count - 1).to_be_bytes();
                [198, 19, hi, lo]
            });
            let last6: IpAddr = format!("fd00:96::{count:x}").parse()?;
            let hit4 = frame(client4, last4, 40000, 80);
            let hit6 = frame(client6, last6, 40000, 80);
            let miss4 = frame(client4, "198.18.9.9".parse()?, 40000, 80);
            let miss6 = frame(client6, "fd00:9::9".parse()?, 40000, 80);
            let floor: &SchedClassifier = ebpf
                .program(prog_names::TC_FLOOR)
                .expect("floor")
                .try_into()?;
            let floor_ns = ns_per_packet(floor, &hit4, repeat);
            let lb: &SchedClassifier = ebpf.program(prog_names::TC_LB).expect("lb").try_into()?;
            let hit4_ns = ns_per_packet(lb, &hit4, repeat);
            let hit6_ns = ns_per_packet(lb, &hit6, repeat);
            // The reply of the v4 flow just created: find its backend.
            let flows = maps.conntrack()?;
            let reply = flows
                .iter()
                .find(|f| f.direction == "reply" && f.destination.ip() == client4)
                .expect("reply entry");
            let reply4 = frame(reply.source.ip(), client4, reply.source.port(), 40000);
            let reply4_ns = ns_per_packet(lb, &reply4, repeat);
            let miss4_ns = ns_per_packet(lb, &miss4, repeat);
            let miss6_ns = ns_per_packet(lb, &miss6, repeat);
            println!(
                "{count:>9}  {floor_ns:>7.1}  {hit4_ns:>9.1}  {hit6_ns:>9.1}  {reply4_ns:>9.1}  {miss4_ns:>9.1}  {miss6_ns:>9.1}"
            );
        }
        Ok(())
    })();
    drop(ebpf);
    let _ = loader::cleanup(&pin_path, &[]);
    result
}
