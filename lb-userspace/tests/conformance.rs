//! Conformance suite (root): kube-proxy's own statement of what a proxy
//! does (the `runPacketFlowTests` cases of
//! `pkg/proxy/nftables/proxier_test.go`, and the endpoint choices of
//! `topology_test.go` and `endpointslicecache_test.go`), kept as data in
//! `tests/conformance/*.yaml`, run through the real program with
//! `lb explain`'s code (see `support::conformance`) on IPv4, as the IPv6
//! mirror and dual-stack. docs/conformance.md's table is this run's
//! result: the test fails when it is out of date
//! (`LB_CONFORMANCE_UPDATE=1` rewrites it).

mod support;

use std::path::Path;

use support::conformance::{Report, Run, load, run_all, table};

const BEGIN: &str = "<!-- cases: written by tests/conformance.rs -->\n";
const END: &str = "<!-- end of cases -->\n";

#[test]
fn kube_proxy_packet_flows() {
    let _serial = support::serial();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<_> = std::fs::read_dir(root.join("tests/conformance"))
        .expect("tests/conformance")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no case files");
    let mut groups = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("case file");
        groups.extend(load(&text, &file.display().to_string()));
    }
    let mut report = Report::default();
    for run in [Run::V4, Run::V6, Run::DualStack] {
        run_all(&groups, run, &mut report);
    }
    let Report { rows, failures } = report;
    assert!(
        failures.is_empty(),
        "{} of {} flows differ:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );
    assert!(!rows.is_empty());

    // The documented table is this run's.
    let doc_path = root.join("../docs/conformance.md");
    let doc = std::fs::read_to_string(&doc_path).expect("docs/conformance.md");
    let (head, rest) = doc
        .split_once(BEGIN)
        .expect("the cases marker in docs/conformance.md");
    let (_, tail) = rest
        .split_once(END)
        .expect("the end marker in docs/conformance.md");
    let fresh = format!("{head}{BEGIN}{}{END}{tail}", table(&rows));
    if std::env::var_os("LB_CONFORMANCE_UPDATE").is_some() {
        std::fs::write(&doc_path, &fresh).expect("write docs/conformance.md");
    } else {
        assert!(
            fresh == doc,
            "docs/conformance.md is out of date: LB_CONFORMANCE_UPDATE=1 cargo test -p lb-userspace --test conformance"
        );
    }
}
