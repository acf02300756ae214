//! The kube source (`--source kube`) against a stand-in API server.
//!
//! The server (`api_server`) speaks the Kubernetes list and watch protocol
//! over plain HTTP on 127.0.0.1 as the real API server does: a list answers
//! with the items and the list's `resourceVersion`, page by page with
//! `limit` and `continue` (the source asks for 500 at a time), in protobuf
//! (`api_protobuf`) to a client that accepts it, else in JSON; a watch streams one JSON
//! event per chunk (`ADDED`, `MODIFIED`, `DELETED`, `BOOKMARK`, and an
//! `ERROR` with a `410 Gone` Status that forces a re-list), from the
//! requested resource version on. It honours field and label selectors (an
//! object leaving a watch's selection is `DELETED` for it, one entering it
//! `ADDED`), serves single objects by name, and can drop every connection
//! or refuse them all (an unreachable API server). The objects are real API
//! JSON: Services, `EndpointSlice`s and a Node as a v1.3x API server serves
//! them.
//!
//! The real kube-rs client drives it through `source::spawn`, with a
//! kubeconfig pointing at the server. The tests check the updates the
//! source sends, and the state they add up to (as the agent holds it)
//! through `model::build`: the resulting frontends for a dual-stack, an
//! IPv4-only and an IPv6-only cluster. No root, no cluster.
//!
//! - `api_server`: the stand-in API server;
//! - `objects`: real API JSON and the clusters the tests start from;
//! - `driver`: the source under test, the state its updates add up to,
//!   and what that gives through the model;
//! - here: list and watch, outages, single-stack clusters, Events;
//! - `changes`: what one update carries, re-lists, the label selector,
//!   the source's log span, a list of several pages.

mod api_protobuf;
mod api_server;
mod changes;
mod driver;
mod objects;

use std::time::{Duration, Instant};

use lb_userspace::{
    model::{self, ObjectError},
    source::{
        Snapshot,
        kube::{EventReporter, QUIET, node_context},
    },
};
use serde_json::json;

use api_server::*;
use driver::*;
use objects::*;

const NODE: &str = "node-a";

/// Dual-stack cluster: list, watch (ADDED/MODIFIED/DELETED/BOOKMARK),
/// coalescing, `410 Gone` and re-list, a dropped connection.
#[tokio::test]
#[expect(clippy::too_many_lines, reason = "one scenario, step by step")]
async fn dual_stack_cluster_follows_list_and_watch() {
    let server = ApiServer::start(dual_stack_objects()).await;
    // The node list comes last: no update before all three are listed.
    server.set_list_delay(Res::Nodes, Duration::from_millis(300));
    let mut source = start_source(&server);

    let (first, _) = source.until(STEP, "initial lists", |_| true).await;
    assert!(
        first.node.is_some(),
        "the first update waits for the Node list"
    );
    assert_eq!(names(&first), ["db", "headless", "np", "web"]);
    assert_eq!(first.slices.len(), 5);
    assert!(
        first
            .services
            .iter()
            .all(|s| s.metadata.managed_fields.is_none()
                || s.metadata
                    .managed_fields
                    .as_ref()
                    .is_some_and(Vec::is_empty)),
        "managedFields are dropped"
    );
    let node = node_context(first.node.as_ref(), NODE);
    assert_eq!(
        node.addresses,
        ["198.18.0.1", "fd00:18::1", "198.18.100.1"]
            .map(|a| a.parse::<std::net::IpAddr>().unwrap())
    );
    assert_eq!(node.zone.as_deref(), Some("zone-a"));

    let f = frontends(&first);
    expect(
        &f,
        "198.19.0.10:80/TCP",
        &["198.18.2.2:8080", "198.18.3.2:8080"],
    );
    expect(
        &f,
        "[fd00:96::10]:80/TCP",
        &["[fd00:2::2]:8080", "[fd00:3::2]:8080"],
    );
    expect(
        &f,
        "198.19.0.10:53/UDP",
        &["198.18.2.2:8053", "198.18.3.2:8053"],
    );
    expect(
        &f,
        "[fd00:96::10]:53/UDP",
        &["[fd00:2::2]:8053", "[fd00:3::2]:8053"],
    );
    expect(&f, "198.19.0.20:80/TCP", &["198.18.5.2:8080"]);
    expect(&f, "[fd00:96::20]:80/TCP", &["[fd00:5::2]:8080"]);
    // NodePort on the node's addresses, from the Node object.
    expect(&f, "198.18.0.1:30080/TCP", &["198.18.5.2:8080"]);
    expect(&f, "[fd00:18::1]:30080/TCP", &["[fd00:5::2]:8080"]);
    assert!(
        !f.keys().any(|k| k.starts_with("198.19.0.30")),
        "the other proxy's Service is skipped"
    );

    // MODIFIED: one endpoint more, reaching the agent in milliseconds.
    let changed = Instant::now();
    server.apply(
        Res::Slices,
        slice(
            "web-abc12",
            "web",
            "IPv4",
            &[
                ("198.18.2.2", true),
                ("198.18.3.2", true),
                ("198.18.4.2", true),
            ],
            &[("http", 8080, "TCP"), ("dns", 8053, "UDP")],
        ),
    );
    let (snapshot, _) = source
        .until(STEP, "MODIFIED slice", |s| {
            frontends(s)["198.19.0.10:80/TCP"].len() == 3
        })
        .await;
    let latency = changed.elapsed();
    assert!(
        latency < Duration::from_millis(500),
        "change took {latency:?}"
    );
    eprintln!("watch event -> update: {latency:?}");
    drop(snapshot);

    // A burst of 40 changes becomes a few updates, the last one final.
    let mut last = 0;
    for i in 0..40u8 {
        let ready: Vec<(String, bool)> = (0..=i % 4)
            .map(|k| (format!("198.18.{}.2", 10 + k), true))
            .collect();
        let endpoints: Vec<(&str, bool)> = ready.iter().map(|(a, r)| (a.as_str(), *r)).collect();
        last = server.apply(
            Res::Slices,
            slice(
                "web-abc12",
                "web",
                "IPv4",
                &endpoints,
                &[("http", 8080, "TCP"), ("dns", 8053, "UDP")],
            ),
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Final state of the burst: i = 39 -> 39 % 4 = 3 -> four endpoints (as
    // at i = 35: the version tells the last write).
    let (snapshot, seen) = source
        .until(STEP, "burst", |s| {
            slice_version(s, "web-abc12") == Some(last.to_string())
        })
        .await;
    assert_eq!(frontends(&snapshot)["198.19.0.10:80/TCP"].len(), 4);
    source
        .quiet(Duration::from_millis(300), "after the burst")
        .await;
    assert!(seen <= 4, "40 changes gave {seen} updates; expected a few");

    // BOOKMARK: no change, no update.
    server.bookmark(Res::Services);
    server.bookmark(Res::Slices);
    source
        .quiet(Duration::from_millis(300), "after bookmarks")
        .await;

    // ADDED and DELETED.
    server.apply(
        Res::Services,
        service(&Svc {
            name: "api",
            cluster_ips: &["198.19.0.40", "fd00:96::40"],
            families: &["IPv4", "IPv6"],
            policy: "PreferDualStack",
            ..Svc::default()
        }),
    );
    server.delete(Res::Slices, "default", "web-def34");
    let (snapshot, _) = source
        .until(STEP, "ADDED + DELETED", |s| {
            names(s).contains(&"api".to_owned()) && !has_slice(s, "web-def34")
        })
        .await;
    let f = frontends(&snapshot);
    expect(&f, "[fd00:96::10]:80/TCP", &[]);
    expect(&f, "198.19.0.40:80/TCP", &[]);
    expect(&f, "[fd00:96::40]:80/TCP", &[]);

    // 410 Gone: history is compacted and a change is only in the store; the
    // watcher must re-list to see it.
    let lists_before = server.lists(Res::Services);
    server.apply_silently(
        Res::Services,
        service(&Svc {
            name: "late",
            cluster_ips: &["198.19.0.50"],
            families: &["IPv4"],
            ..Svc::default()
        }),
    );
    server.gone(Res::Services);
    let (snapshot, _) = source
        .until(STEP, "re-list after 410", |s| {
            names(s).contains(&"late".to_owned())
        })
        .await;
    assert!(
        server.lists(Res::Services) > lists_before,
        "410 Gone caused a re-list"
    );
    assert!(frontends(&snapshot).contains_key("198.19.0.50:80/TCP"));

    // A dropped connection: the watch resumes from its resource version and
    // the change made meanwhile arrives.
    server.drop_watches();
    server.delete(Res::Services, "default", "late");
    let (snapshot, _) = source
        .until(STEP, "after a dropped connection", |s| {
            !names(s).contains(&"late".to_owned())
        })
        .await;
    assert!(!frontends(&snapshot).contains_key("198.19.0.50:80/TCP"));
}

/// An unreachable API server: the source says so (the agent keeps its maps
/// and /readyz shows the reason), and catches up when it is back.
/// A change after a quiet spell is handed on at once, not after the
/// [`QUIET`] window a burst waits for: of a few lone changes (each after a
/// pause longer than `QUIET`), the fastest reaches the agent's channel
/// sooner than `QUIET` after the API server sent its watch event, which a
/// source that waits `QUIET` after every change never does. The fastest,
/// not each: on a loaded machine one of them may be scheduled late.
#[tokio::test]
async fn a_lone_change_is_sent_without_the_quiet_delay() {
    let server = ApiServer::start(dual_stack_objects()).await;
    let mut source = start_source(&server);
    source.until(STEP, "initial lists", |_| true).await;
    let mut times = Vec::new();
    for i in 0..5u8 {
        tokio::time::sleep(3 * QUIET).await;
        let address = format!("198.18.7.{}", 2 + i);
        let sent = Instant::now();
        let version = server.apply(Res::Slices, web_slice_one(&address));
        let changes = source.next_changes(STEP, "a lone change").await;
        times.push(sent.elapsed());
        assert_eq!(
            changes
                .slices
                .iter()
                .map(|s| s.metadata.resource_version.clone())
                .collect::<Vec<_>>(),
            [Some(version.to_string())],
            "the change, alone, in one update"
        );
    }
    let fastest = times.iter().min().copied().unwrap_or(Duration::MAX);
    eprintln!("watch event -> update, lone changes: {times:?}");
    assert!(
        fastest < QUIET,
        "a lone change waited: fastest {fastest:?} of {times:?}, QUIET {QUIET:?}"
    );
}

#[tokio::test]
async fn unreachable_api_server_is_reported_and_recovered() {
    let server = ApiServer::start(dual_stack_objects()).await;
    let mut source = start_source(&server);
    source.until(STEP, "initial lists", |_| true).await;

    server.set_down(true);
    let reason = source.until_stale(STEP, "API server down").await;
    assert!(reason.contains("cannot watch"), "stale reason: {reason}");
    eprintln!("stale: {reason}");
    server.delete(Res::Services, "default", "np");
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.set_down(false);
    // The watches come back within kube-runtime's backoff (seconds).
    let (snapshot, _) = source
        .until(Duration::from_secs(40), "API server back", |s| {
            !names(s).contains(&"np".to_owned())
        })
        .await;
    assert!(!frontends(&snapshot).contains_key("198.19.0.20:80/TCP"));
}

/// The API server is unreachable from the start: stale, no update.
#[tokio::test]
async fn unreachable_at_start_is_stale_without_snapshot() {
    let server = ApiServer::start(dual_stack_objects()).await;
    server.set_down(true);
    let mut source = start_source(&server);
    let reason = source.until_stale(STEP, "API server down at start").await;
    assert!(reason.contains("cannot watch"), "stale reason: {reason}");
    server.set_down(false);
    let (snapshot, _) = source
        .until(Duration::from_secs(40), "API server up", |_| true)
        .await;
    // The Service handed to another proxy is left out by the API server.
    assert_eq!(snapshot.services.len(), 4);
}

/// IPv4-only cluster: Services carry only `clusterIP` and one family, the
/// Node has one `InternalIP`.
#[tokio::test]
async fn single_stack_ipv4_cluster() {
    let server = ApiServer::start(ipv4_cluster()).await;
    source_reaches_ipv4_cluster(&server).await;
    // Services and slices were listed as protobuf, as kube-proxy lists
    // them; the Node (kube-runtime's watcher) as JSON.
    for (res, protobuf) in [
        (Res::Services, true),
        (Res::Slices, true),
        (Res::Nodes, false),
    ] {
        let lists = server.list_requests(res);
        assert!(
            !lists.is_empty() && lists.iter().all(|r| r.ends_with(" (protobuf)") == protobuf),
            "{res:?}: {lists:#?}"
        );
    }
}

/// An API server that answers lists in JSON although protobuf was asked
/// for (as a proxy in front of it may): read as JSON, to the same state.
#[tokio::test]
async fn lists_answered_in_json_are_read_as_json() {
    let server = ApiServer::start(ipv4_cluster()).await;
    server.set_json_only(true);
    source_reaches_ipv4_cluster(&server).await;
    let lists = server.list_requests(Res::Slices);
    assert!(
        lists.len() == 1 && lists[0].ends_with(" (protobuf)"),
        "protobuf asked for once, the JSON answer read: {lists:#?}"
    );
}

/// A protobuf page the source cannot read is asked for again in JSON:
/// the list goes on to the same state.
#[tokio::test]
async fn a_protobuf_page_that_cannot_be_read_is_asked_for_in_json() {
    let server = ApiServer::start(ipv4_cluster()).await;
    server.set_garble_protobuf(true);
    source_reaches_ipv4_cluster(&server).await;
    for res in [Res::Services, Res::Slices] {
        let lists = server.list_requests(res);
        assert!(
            lists.len() == 2
                && lists[0].ends_with(" (protobuf)")
                && !lists[1].ends_with(" (protobuf)"),
            "one page, asked for again in JSON: {lists:#?}"
        );
    }
}

/// A source started against SERVER reaches [`ipv4_cluster`]'s state.
async fn source_reaches_ipv4_cluster(server: &ApiServer) {
    let mut source = start_source(server);
    let (snapshot, _) = source.until(STEP, "initial lists", |_| true).await;
    expect_ipv4_cluster(&snapshot);
}

/// An IPv4-only cluster (a Service without `clusterIPs`, a `NodePort`).
fn ipv4_cluster() -> Vec<(Res, serde_json::Value)> {
    let mut web = service(&Svc {
        cluster_ips: &["198.19.0.10"],
        families: &["IPv4"],
        ports: &[("", 443, "TCP", 8443, None)],
        ..Svc::default()
    });
    // As older API servers send it: no clusterIPs.
    web["spec"].as_object_mut().unwrap().remove("clusterIPs");
    vec![
        (Res::Services, web),
        (
            Res::Services,
            service(&Svc {
                name: "np",
                type_: "NodePort",
                cluster_ips: &["198.19.0.20"],
                families: &["IPv4"],
                policy: "PreferDualStack",
                ports: &[("http", 80, "TCP", 8080, Some(30080))],
                ..Svc::default()
            }),
        ),
        (
            Res::Slices,
            slice(
                "web-1",
                "web",
                "IPv4",
                &[("198.18.2.2", true), ("198.18.3.2", true)],
                &[("", 8443, "TCP")],
            ),
        ),
        (
            Res::Slices,
            slice(
                "np-1",
                "np",
                "IPv4",
                &[("198.18.5.2", true)],
                &[("http", 8080, "TCP")],
            ),
        ),
        (Res::Nodes, node(&[("InternalIP", "198.18.0.1")])),
    ]
}

fn expect_ipv4_cluster(snapshot: &Snapshot) {
    let f = frontends(snapshot);
    expect(
        &f,
        "198.19.0.10:443/TCP",
        &["198.18.2.2:8443", "198.18.3.2:8443"],
    );
    expect(&f, "198.19.0.20:80/TCP", &["198.18.5.2:8080"]);
    expect(&f, "198.18.0.1:30080/TCP", &["198.18.5.2:8080"]);
    assert!(
        f.keys().all(|k| !k.starts_with('[')),
        "no IPv6 frontend: {f:#?}"
    );
}

/// IPv6-only cluster: every address IPv6, the Node's too.
#[tokio::test]
async fn single_stack_ipv6_cluster() {
    let server = ApiServer::start(vec![
        (
            Res::Services,
            service(&Svc {
                cluster_ips: &["fd00:96::10"],
                families: &["IPv6"],
                ports: &[
                    ("http", 80, "TCP", 8080, None),
                    ("dns", 53, "UDP", 8053, None),
                ],
                ..Svc::default()
            }),
        ),
        (
            Res::Services,
            service(&Svc {
                name: "np",
                type_: "NodePort",
                cluster_ips: &["fd00:96::20"],
                families: &["IPv6"],
                policy: "PreferDualStack",
                ports: &[("http", 80, "TCP", 8080, Some(30080))],
                ..Svc::default()
            }),
        ),
        (
            Res::Slices,
            slice(
                "web-1",
                "web",
                "IPv6",
                &[("fd00:2::2", true), ("fd00:3::2", false)],
                &[("http", 8080, "TCP"), ("dns", 8053, "UDP")],
            ),
        ),
        (
            Res::Slices,
            slice(
                "np-1",
                "np",
                "IPv6",
                &[("fd00:5::2", true)],
                &[("http", 8080, "TCP")],
            ),
        ),
        (Res::Nodes, node(&[("InternalIP", "fd00:18::1")])),
    ])
    .await;
    let mut source = start_source(&server);
    let (snapshot, _) = source.until(STEP, "initial lists", |_| true).await;
    let f = frontends(&snapshot);
    expect(&f, "[fd00:96::10]:80/TCP", &["[fd00:2::2]:8080"]);
    expect(&f, "[fd00:96::10]:53/UDP", &["[fd00:2::2]:8053"]);
    expect(&f, "[fd00:96::20]:80/TCP", &["[fd00:5::2]:8080"]);
    expect(&f, "[fd00:18::1]:30080/TCP", &["[fd00:5::2]:8080"]);
    assert!(
        f.keys().all(|k| k.starts_with('[')),
        "no IPv4 frontend: {f:#?}"
    );

    // A change of the single-stack slice arrives too.
    server.apply(
        Res::Slices,
        slice(
            "web-1",
            "web",
            "IPv6",
            &[("fd00:2::2", true), ("fd00:3::2", true)],
            &[("http", 8080, "TCP"), ("dns", 8053, "UDP")],
        ),
    );
    let (snapshot, _) = source
        .until(STEP, "MODIFIED", |s| {
            frontends(s)["[fd00:96::10]:80/TCP"].len() == 2
        })
        .await;
    expect(
        &frontends(&snapshot),
        "[fd00:96::10]:80/TCP",
        &["[fd00:2::2]:8080", "[fd00:3::2]:8080"],
    );
}

/// An object the model rejects raises a Warning Event on that object.
#[tokio::test]
async fn invalid_object_raises_an_event() {
    let mut bad = service(&Svc {
        name: "bad",
        cluster_ips: &["198.19.0.60"],
        families: &["IPv4"],
        ..Svc::default()
    });
    bad["spec"]["clusterIP"] = json!("198.19.0.300");
    bad["spec"]["clusterIPs"] = json!(["198.19.0.300"]);
    let server = ApiServer::start(vec![
        (Res::Services, bad),
        (Res::Nodes, node(&[("InternalIP", "198.18.0.1")])),
    ])
    .await;
    let mut source = start_source(&server);
    let (snapshot, _) = source.until(STEP, "initial lists", |_| true).await;
    let model = model::build(
        &snapshot.services,
        &snapshot.slices,
        &node_context(snapshot.node.as_ref(), NODE),
    );
    let errors: Vec<&ObjectError> = model.errors.iter().filter(|e| e.name == "bad").collect();
    assert_eq!(errors.len(), 1, "{:?}", model.errors);

    let reporter = EventReporter::spawn(&server.source_config());
    reporter.report(errors[0]);
    let deadline = Instant::now() + STEP;
    let event = loop {
        if let Some(event) = server.posted_events().pop() {
            break event;
        }
        assert!(Instant::now() < deadline, "no Event posted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(event["apiVersion"], "events.k8s.io/v1");
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reason"], "InvalidObject");
    assert_eq!(event["metadata"]["namespace"], "default");
    assert_eq!(event["regarding"]["kind"], "Service");
    assert_eq!(event["regarding"]["name"], "bad");
    assert_eq!(event["regarding"]["uid"], json!(uid("bad")));
    assert!(
        event["note"]
            .as_str()
            .is_some_and(|n| n.contains("198.19.0.300")),
        "note names the problem: {event}"
    );
    assert_eq!(event["reportingController"], "lb-agent");
    assert_eq!(event["reportingInstance"], format!("lb-agent-{NODE}"));
    let posted = server
        .lock()
        .requests
        .iter()
        .filter(|r| r.starts_with("POST /apis/events.k8s.io/v1/namespaces/default/events"))
        .count();
    assert_eq!(posted, 1);
}
