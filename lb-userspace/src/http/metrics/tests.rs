use super::*;
use crate::datapath::capacity::CapacityStatus;

fn scrape(registry: &Registry) -> String {
    text(registry)
}

#[test]
fn counters_gauges_and_labels_keep_their_names() {
    let shared = Shared {
        syncs: 3,
        ready: true,
        invalid_objects: 2,
        ..Shared::default()
    };
    let out = scrape(&agent_metrics(&shared));
    for line in [
        "# HELP lb_sync_total Syncs that wrote the whole plan.",
        "# TYPE lb_sync_total counter",
        "lb_sync_total 3",
        "# TYPE lb_ready gauge",
        "lb_ready 1",
        "lb_invalid_objects 2",
        "lb_invalid_objects_reported_total 0",
        "lb_map_drift_repairs_total 0",
        "lb_services_unfit 0",
    ] {
        assert!(out.lines().any(|l| l == line), "{line} missing in\n{out}");
    }
}

#[test]
fn capacity_metrics_name_the_full_maps() {
    let mut status = CapacityStatus::default();
    status.capacities.push(("LB4_RNAT_V2", 8));
    status.full_total.insert("LB4_RNAT_V2", 4);
    status.unfit.push("ns/a:http".into());
    let mut registry = Registry::default();
    capacity_metrics(&status, &mut registry);
    let out = scrape(&registry);
    assert!(
        out.contains("lb_map_full_total{map=\"LB4_RNAT_V2\"} 4"),
        "{out}"
    );
    assert!(
        out.contains("lb_map_capacity{map=\"LB4_RNAT_V2\"} 8"),
        "{out}"
    );
    assert!(out.contains("lb_services_unfit 1"), "{out}");
}

#[test]
fn histogram_buckets_are_cumulative_up_to_inf() {
    let mut histogram = Histogram::default();
    histogram.observe(0.0003);
    histogram.observe(0.7);
    histogram.observe(1000.0);
    let mut registry = Registry::default();
    registry.register("lb_h_seconds", "A histogram", histogram);
    let out = scrape(&registry);
    for line in [
        "# TYPE lb_h_seconds histogram",
        "lb_h_seconds_bucket{le=\"0.0005\"} 1",
        "lb_h_seconds_bucket{le=\"0.5\"} 1",
        "lb_h_seconds_bucket{le=\"1\"} 2",
        "lb_h_seconds_bucket{le=\"300\"} 2",
        "lb_h_seconds_bucket{le=\"+Inf\"} 3",
        "lb_h_seconds_count 3",
    ] {
        assert!(out.lines().any(|l| l == line), "{line} missing in\n{out}");
    }
    assert_eq!(
        out.lines().filter(|l| l.contains("_bucket")).count(),
        BUCKETS.len() + 1
    );
}

#[test]
fn label_values_are_escaped() {
    let mut registry = Registry::default();
    registry.register(
        "lb_x",
        "Escaping",
        ByLabel::gauges("frontend", [("a\"b\\c\nd", 1_u64)]),
    );
    assert!(
        scrape(&registry).contains(r#"lb_x{frontend="a\"b\\c\nd"} 1"#),
        "{}",
        scrape(&registry)
    );
}
