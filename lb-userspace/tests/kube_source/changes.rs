//! What one update carries: only the changed objects, the Node, a re-list's
//! difference; the label selector; the source's log span.

use std::{collections::BTreeSet, sync::PoisonError, time::Duration};

use lb_userspace::{
    model,
    source::{
        self,
        kube::{node_context, proxied_selector},
    },
};
use serde_json::json;

use crate::NODE;
use crate::api_server::*;
use crate::driver::*;
use crate::objects::*;

/// After the first list, an update carries only what changed: one slice,
/// one removed Service, the Node (whose new address and zone reach the
/// frontends); several writes of one object in a burst send it once.
#[tokio::test]
async fn a_change_sends_only_the_changed_object() {
    let server = ApiServer::start(dual_stack_objects()).await;
    let mut source = start_source(&server);
    let first = source.next_changes(STEP, "initial lists").await;
    assert_eq!(first.services.len(), 4);
    assert_eq!(first.slices.len(), 5);
    assert!(matches!(first.node, Some(source::NodeChange::Set(_))));

    server.apply(
        Res::Slices,
        slice(
            "np-v4",
            "np",
            "IPv4",
            &[("198.18.5.2", true), ("198.18.5.3", true)],
            &[("http", 8080, "TCP")],
        ),
    );
    let changes = source.next_changes(STEP, "one slice").await;
    assert_eq!(
        object_names(changes.slices.iter().map(|s| &s.metadata)),
        ["np-v4"]
    );
    assert!(changes.services.is_empty() && changes.removed_services.is_empty());
    assert!(changes.removed_slices.is_empty() && changes.node.is_none());

    // The Node gets another address and zone.
    let mut moved = node(&[("InternalIP", "198.18.0.9"), ("InternalIP", "fd00:18::9")]);
    moved["metadata"]["labels"]["topology.kubernetes.io/zone"] = json!("zone-b");
    server.apply(Res::Nodes, moved);
    let changes = source.next_changes(STEP, "the Node").await;
    assert!(changes.services.is_empty() && changes.slices.is_empty());
    let Some(source::NodeChange::Set(node)) = &changes.node else {
        panic!("the Node change is sent: {changes:?}");
    };
    let context = node_context(Some(node), NODE);
    assert_eq!(context.zone.as_deref(), Some("zone-b"));
    let f = frontends(&source.held.snapshot());
    expect(
        &f,
        "198.18.0.9:30080/TCP",
        &["198.18.5.2:8080", "198.18.5.3:8080"],
    );
    assert!(!f.contains_key("198.18.0.1:30080/TCP"), "{f:#?}");

    server.delete(Res::Services, "default", "np");
    let changes = source.next_changes(STEP, "one deletion").await;
    assert_eq!(changes.removed_services, [key("np")]);
    assert!(changes.services.is_empty() && changes.slices.is_empty());
    assert!(changes.removed_slices.is_empty() && changes.node.is_none());

    // A burst of writes to one slice: each update carries it once.
    for i in 0..20u8 {
        let address = format!("198.18.6.{}", 2 + i % 3);
        server.apply(Res::Slices, web_slice_one(&address));
    }
    let last = server.apply(Res::Slices, web_slice_one("198.18.6.9"));
    loop {
        let changes = source.next_changes(STEP, "burst on one slice").await;
        assert_eq!(
            object_names(changes.slices.iter().map(|s| &s.metadata)),
            ["web-abc12"]
        );
        assert!(changes.services.is_empty() && changes.removed_slices.is_empty());
        if changes.slices[0].metadata.resource_version == Some(last.to_string()) {
            break;
        }
    }
    expect(
        &frontends(&source.held.snapshot()),
        "198.19.0.10:80/TCP",
        &["198.18.6.9:8080"],
    );
}

/// A re-list after `410 Gone` converges exactly: an object deleted while
/// no event could tell removes it, one added meanwhile is added, and the
/// unchanged ones are not sent again.
#[tokio::test]
async fn relist_after_gone_removes_objects_deleted_meanwhile() {
    let server = ApiServer::start(dual_stack_objects()).await;
    let mut source = start_source(&server);
    source.until(STEP, "initial lists", |_| true).await;

    server.delete_silently(Res::Services, "default", "np");
    server.delete_silently(Res::Slices, "default", "np-v6");
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
    server.gone(Res::Slices);
    let mut sent = BTreeSet::new();
    let mut removed = BTreeSet::new();
    let snapshot = loop {
        let changes = source.next_changes(STEP, "re-list after 410").await;
        sent.extend(object_names(changes.services.iter().map(|s| &s.metadata)));
        sent.extend(object_names(changes.slices.iter().map(|s| &s.metadata)));
        removed.extend(
            changes
                .removed_services
                .iter()
                .map(|(_, name)| name.clone()),
        );
        removed.extend(changes.removed_slices.iter().map(|(_, name)| name.clone()));
        let held = source.held.snapshot();
        if !names(&held).contains(&"np".to_owned())
            && !has_slice(&held, "np-v6")
            && names(&held).contains(&"late".to_owned())
        {
            break held;
        }
    };
    assert_eq!(
        sent,
        BTreeSet::from(["late".to_owned()]),
        "only what changed is sent"
    );
    assert_eq!(
        removed,
        BTreeSet::from(["np".to_owned(), "np-v6".to_owned()])
    );
    assert_eq!(names(&snapshot), ["db", "headless", "late", "web"]);
    let f = frontends(&snapshot);
    assert!(
        !f.keys()
            .any(|k| k.starts_with("198.19.0.20:") || k.contains("30080")),
        "{f:#?}"
    );
    assert!(f.contains_key("198.19.0.50:80/TCP"));
}

/// As kube-proxy, the source asks the API server to leave out Services
/// handed to another proxy and the slices of headless Services: they never
/// reach the agent, and a Service labelled so later leaves it.
#[tokio::test]
async fn label_selector_keeps_ignored_objects_out() {
    let web = Svc {
        cluster_ips: &["198.19.0.10"],
        families: &["IPv4"],
        ..Svc::default()
    };
    let server = ApiServer::start(objects_with_ignored_ones(&web)).await;
    let mut source = start_source(&server);
    let first = source.next_changes(STEP, "initial lists").await;
    assert_eq!(
        object_names(first.services.iter().map(|s| &s.metadata)),
        ["hl", "web"]
    );
    assert_eq!(
        object_names(first.slices.iter().map(|s| &s.metadata)),
        ["web-1"]
    );
    let f = frontends(&source.held.snapshot());
    expect(&f, "198.19.0.10:80/TCP", &["198.18.2.2:8080"]);
    assert!(!f.keys().any(|k| k.starts_with("198.19.0.30")), "{f:#?}");
    let selector = format!("labelSelector={}", proxied_selector());
    for path in [
        "/api/v1/services?",
        "/apis/discovery.k8s.io/v1/endpointslices?",
    ] {
        let requests: Vec<String> = server
            .lock()
            .requests
            .iter()
            .filter(|r| r.starts_with(&format!("GET {path}")) && !r.contains("limit=1"))
            .cloned()
            .collect();
        assert!(!requests.is_empty());
        assert!(
            requests.iter().all(|r| r.contains(&selector)),
            "{requests:#?}"
        );
    }

    // A new Service for another proxy: nothing at all reaches the agent.
    server.apply(
        Res::Services,
        service(&Svc {
            name: "other-2",
            cluster_ips: &["198.19.0.31"],
            families: &["IPv4"],
            labels: proxy_label(),
            ..Svc::default()
        }),
    );
    source
        .quiet(Duration::from_millis(300), "an ignored Service")
        .await;

    // A Service handed to another proxy later leaves the selection: removed.
    server.apply(
        Res::Services,
        service(&Svc {
            labels: proxy_label(),
            ..web
        }),
    );
    let changes = source.next_changes(STEP, "web handed over").await;
    assert_eq!(changes.removed_services, [key("web")]);
    assert!(changes.services.is_empty());
    let f = frontends(&source.held.snapshot());
    assert!(!f.contains_key("198.19.0.10:80/TCP"), "{f:#?}");
}

/// The source's log lines name it: which source, for which node.
#[tokio::test]
async fn log_lines_carry_the_source_span() {
    let logs = captured_logs();
    let server = ApiServer::start(dual_stack_objects()).await;
    server.set_down(true);
    let mut source = start_source(&server);
    source.until_stale(STEP, "API server down").await;
    let logs =
        String::from_utf8_lossy(&logs.lock().unwrap_or_else(PoisonError::into_inner)).into_owned();
    let line = logs
        .lines()
        .find(|line| line.contains("watch failed"))
        .unwrap_or_else(|| panic!("no watch failure logged: {logs}"));
    assert!(
        line.contains(&format!("source{{kind=\"kube\" node={NODE}}}")),
        "{line}"
    );
}

/// A list longer than a page (kube-rs asks for 500 items at a time) is read
/// page by page with `continue` tokens, and the state adds up to every
/// object; writes made while the pages are read (a listed Service changed,
/// one not yet listed deleted) arrive by the watch, which starts from the
/// first page's version. The first lists reach the agent in parts (marked
/// `more_follow`: the agent syncs only at the complete update), so that
/// not every API object of a large cluster is in memory at once.
#[tokio::test]
async fn a_long_list_is_read_page_by_page() {
    const COUNT: usize = 1_203;
    let names: Vec<String> = (0..COUNT).map(|i| format!("svc-{i:04}")).collect();
    let mut objects = vec![(Res::Nodes, node(&[("InternalIP", "198.18.0.1")]))];
    for name in &names {
        objects.push((
            Res::Services,
            service(&Svc {
                name,
                ..Svc::default()
            }),
        ));
    }
    let server = ApiServer::start(objects).await;
    // Three pages of Services, 150 ms each: the writes below land while
    // they are read.
    server.set_list_delay(Res::Services, Duration::from_millis(150));
    let mut source = start_source(&server);
    tokio::time::sleep(Duration::from_millis(225)).await;
    server.apply(
        Res::Services,
        service(&Svc {
            name: "svc-0000",
            type_: "NodePort",
            ports: &[("http", 80, "TCP", 8080, Some(30080))],
            ..Svc::default()
        }),
    );
    server.delete(Res::Services, "default", "svc-1202");
    let part = source.next_changes(STEP, "the first part").await;
    assert!(
        part.more_follow && part.services.len() >= 999,
        "a first part of 1000 objects: {} Services, more_follow {}",
        part.services.len(),
        part.more_follow
    );
    let (held, _) = source
        .until(STEP, "every page, then the writes", |held| {
            held.services.len() == COUNT - 1
                && held.services.iter().any(|s| {
                    s.metadata.name.as_deref() == Some("svc-0000")
                        && s.spec.as_ref().and_then(|spec| spec.type_.as_deref())
                            == Some("NodePort")
                })
        })
        .await;
    assert!(
        !held
            .services
            .iter()
            .any(|s| s.metadata.name.as_deref() == Some("svc-1202"))
    );
    let lists: Vec<String> = server
        .lock()
        .requests
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/services?") && !r.contains("watch=true"))
        .cloned()
        .collect();
    assert_eq!(lists.len(), 3, "{lists:#?}");
    assert!(
        lists[0].contains("limit=500") && !lists[0].contains("continue="),
        "{lists:#?}"
    );
    assert!(
        lists[1..].iter().all(|r| r.contains("continue=")),
        "{lists:#?}"
    );
}

/// Started as the agent starts it, the source hands the parts of the first
/// lists over as the model's records, parsed on its own thread; the
/// complete update after them carries the rest as API objects. Fed to a
/// model, they give every Service's frontend.
#[tokio::test]
async fn the_first_lists_come_as_records_when_asked() {
    const COUNT: usize = 1_203;
    let names: Vec<String> = (0..COUNT).map(|i| format!("svc-{i:04}")).collect();
    let ips: Vec<String> = (0..COUNT)
        .map(|i| format!("10.96.{}.{}", i / 250, i % 250 + 1))
        .collect();
    let mut objects = vec![(Res::Nodes, node(&[("InternalIP", "198.18.0.1")]))];
    for (name, ip) in names.iter().zip(&ips) {
        objects.push((
            Res::Services,
            service(&Svc {
                name,
                cluster_ips: &[ip.as_str()],
                ..Svc::default()
            }),
        ));
    }
    let server = ApiServer::start(objects).await;
    let mut source = start_source_preparing(&server);
    let mut model = model::Incremental::new(model::NodeContext::default());
    let mut prepared_parts = 0;
    loop {
        let changes = source.next_changes(STEP, "the first lists").await;
        if !changes.more_follow {
            drop(changes.feed(&mut model));
            break;
        }
        assert!(
            changes.services.is_empty() && changes.prepared_services.len() >= 999,
            "a part of records: {} objects, {} records",
            changes.services.len(),
            changes.prepared_services.len()
        );
        prepared_parts += 1;
        drop(changes.feed(&mut model));
    }
    assert_eq!(prepared_parts, 1);
    model.commit();
    assert_eq!(model.frontends().len(), COUNT);
    assert!(model.errors().is_empty(), "{:?}", model.errors());
}
