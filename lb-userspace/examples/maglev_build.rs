//! Maglev table build time and table memory per frontend (userspace only:
//! no root, no maps). Run through `cargo xtask bench` (stage `maglev`), or:
//!
//! ```text
//! maglev_build [--quick] [--json FILE]
//! ```
//!
//! For 10, 100 and 1000 backends at M = 16381 (and 1000 at M = 65521 and
//! 131071, the sizes for large backend sets): the time of
//! `lb_userspace::maglev::build_table` (the agent builds one per changed
//! frontend), median / min / max of `rounds` builds with rotating seeds,
//! and the kernel memory a frontend's table takes (two rows of M x 4 B:
//! the active one and the one the next table is written into).

use std::{
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    time::Instant,
};

use lb_userspace::{
    maglev::{MaglevBackend, build_table},
    model::Protocol,
};

fn backends(n: u32) -> Vec<MaglevBackend> {
    (0..n)
        .map(|i| {
            let [_, _, a, b] = i.to_be_bytes();
            MaglevBackend {
                addr: IpAddr::V4(Ipv4Addr::new(10, 2, a, b)),
                port: 8080,
                proto: Protocol::Tcp,
                weight: 1,
                id: i + 1,
            }
        })
        .collect()
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let json: Option<PathBuf> = args
        .iter()
        .position(|a| a == "--json")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from);
    let rounds: u32 = if quick { 5 } else { 50 };
    let cases: [(u32, u32); 5] = [
        (10, 16381),
        (100, 16381),
        (1000, 16381),
        (1000, 65521),
        (1000, 131_071),
    ];
    let mut results = Vec::new();
    println!("| backends | M | build median (ms) | min | max | table memory per frontend |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for (n, m) in cases {
        let list = backends(n);
        let mut samples: Vec<f64> = (0..rounds)
            .map(|round| {
                let started = Instant::now();
                let table = build_table(u64::from(round), &list, m);
                let ms = started.elapsed().as_secs_f64() * 1000.0;
                assert_eq!(table.len(), m as usize);
                ms
            })
            .collect();
        samples.sort_by(f64::total_cmp);
        let median = samples[samples.len() / 2];
        let (min, max) = (samples[0], samples[samples.len() - 1]);
        let bytes = 2 * u64::from(m) * 4;
        println!(
            "| {n} | {m} | {median:.3} | {min:.3} | {max:.3} | {} KiB |",
            bytes / 1024
        );
        results.push(format!(
            r#"{{"backends":{n},"table_size":{m},"median_ms":{median:.4},"min_ms":{min:.4},"max_ms":{max:.4},"rounds":{rounds},"bytes_per_frontend":{bytes}}}"#
        ));
    }
    if let Some(path) = json {
        std::fs::write(&path, format!("{{\"maglev\":[{}]}}\n", results.join(",")))?;
        eprintln!("[maglev] wrote {}", path.display());
    }
    Ok(())
}
