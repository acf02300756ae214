//! The kube source (`--source kube`) against a stand-in API server.
//!
//! The server in this file speaks the Kubernetes list and watch protocol
//! over plain HTTP on 127.0.0.1 as the real API server does: a list answers
//! with the items and the list's `resourceVersion`; a watch streams one JSON
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

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use lb_userspace::{
    model::{self, ObjectError, ObjectKey, key_of},
    source::{
        self, Changes, Snapshot, SourceSpec, SourceUpdate,
        kube::{EventReporter, HEADLESS_LABEL, KubeSourceConfig, node_context, proxied_selector},
    },
};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::{broadcast, mpsc},
};

const NODE: &str = "node-a";

// ---------------------------------------------------------------------------
// The stand-in API server
// ---------------------------------------------------------------------------

/// The resources the source watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Res {
    Services,
    Slices,
    Nodes,
}

impl Res {
    fn from_path(path: &str) -> Option<Self> {
        match path {
            "/api/v1/services" => Some(Self::Services),
            "/apis/discovery.k8s.io/v1/endpointslices" => Some(Self::Slices),
            "/api/v1/nodes" => Some(Self::Nodes),
            _ => None,
        }
    }

    /// (apiVersion, kind of the list, kind of an item).
    fn kinds(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Self::Services => ("v1", "ServiceList", "Service"),
            Self::Slices => ("discovery.k8s.io/v1", "EndpointSliceList", "EndpointSlice"),
            Self::Nodes => ("v1", "NodeList", "Node"),
        }
    }
}

/// One write: the object after it (before it, for `DELETED`) and before.
#[derive(Clone, Debug)]
struct Write {
    res: Res,
    rv: u64,
    kind: &'static str,
    object: Value,
    previous: Option<Value>,
}

impl Write {
    /// The event a watch with QUERY gets for this write, if any: an object
    /// entering its selection is `ADDED`, one leaving it `DELETED`, as the
    /// API server's watch cache sends them.
    fn seen_by(&self, query: &BTreeMap<String, String>) -> Option<Value> {
        let now = selected(&self.object, query);
        let before = self.previous.as_ref().is_some_and(|p| selected(p, query));
        let (kind, object) = match (self.kind, before, now) {
            ("DELETED", _, true) => ("DELETED", &self.object),
            (_, true, true) => (self.kind, &self.object),
            (_, false, true) => ("ADDED", &self.object),
            (_, true, false) => ("DELETED", self.previous.as_ref()?),
            (_, false, false) => return None,
        };
        let mut object = object.clone();
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        Some(json!({"type": kind, "object": object}))
    }
}

/// What open watch streams are told.
#[derive(Clone, Debug)]
enum Wire {
    Event(Write),
    Bookmark { res: Res, rv: u64 },
    Gone { res: Res },
    DropAll,
}

#[derive(Default)]
struct State {
    rv: u64,
    objects: BTreeMap<Res, BTreeMap<String, Value>>,
    history: Vec<Write>,
    /// Refuse every connection (close it unanswered).
    down: bool,
    /// Delay before answering a list.
    list_delay: BTreeMap<Res, Duration>,
    /// `METHOD path?query` of every request.
    requests: Vec<String>,
    /// Bodies of the Events posted.
    events: Vec<Value>,
}

fn object_key(object: &Value) -> String {
    format!(
        "{}/{}",
        object["metadata"]["namespace"].as_str().unwrap_or(""),
        object["metadata"]["name"].as_str().unwrap_or("")
    )
}

struct ApiServer {
    state: Arc<Mutex<State>>,
    wire: broadcast::Sender<Wire>,
    task: tokio::task::JoinHandle<()>,
    kubeconfig: PathBuf,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

impl ApiServer {
    async fn start(objects: Vec<(Res, Value)>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (wire, _) = broadcast::channel(1024);
        let state = Arc::new(Mutex::new(State::default()));
        let task = {
            let (state, wire) = (Arc::clone(&state), wire.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let (state, wire) = (Arc::clone(&state), wire.clone());
                    tokio::spawn(async move {
                        let _ = serve(stream, &state, &wire).await;
                    });
                }
            })
        };
        let kubeconfig = write_kubeconfig(addr);
        let server = Self {
            state,
            wire,
            task,
            kubeconfig,
        };
        for (res, object) in objects {
            server.apply(res, object);
        }
        server
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Creates or replaces OBJECT (ADDED or MODIFIED), as a write would;
    /// returns its new resource version.
    fn apply(&self, res: Res, mut object: Value) -> u64 {
        let mut state = self.lock();
        state.rv += 1;
        let rv = state.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let previous = state
            .objects
            .entry(res)
            .or_default()
            .insert(object_key(&object), object.clone());
        let kind = if previous.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let write = Write {
            res,
            rv,
            kind,
            object,
            previous,
        };
        state.history.push(write.clone());
        let _ = self.wire.send(Wire::Event(write));
        rv
    }

    fn delete(&self, res: Res, namespace: &str, name: &str) {
        let mut state = self.lock();
        state.rv += 1;
        let rv = state.rv;
        let mut object = state
            .objects
            .entry(res)
            .or_default()
            .remove(&format!("{namespace}/{name}"))
            .expect("object to delete exists");
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let write = Write {
            res,
            rv,
            kind: "DELETED",
            object,
            previous: None,
        };
        state.history.push(write.clone());
        let _ = self.wire.send(Wire::Event(write));
    }

    /// Deletes an object without any watch event, as if the event had been
    /// compacted away: only a re-list shows it.
    fn delete_silently(&self, res: Res, namespace: &str, name: &str) {
        let mut state = self.lock();
        state.rv += 1;
        state
            .objects
            .entry(res)
            .or_default()
            .remove(&format!("{namespace}/{name}"))
            .expect("object to delete exists");
    }

    /// Changes OBJECT without any watch event, as if the event had been
    /// compacted away: only a re-list shows it.
    fn apply_silently(&self, res: Res, mut object: Value) {
        let mut state = self.lock();
        state.rv += 1;
        object["metadata"]["resourceVersion"] = json!(state.rv.to_string());
        state
            .objects
            .entry(res)
            .or_default()
            .insert(object_key(&object), object);
    }

    fn bookmark(&self, res: Res) {
        let mut state = self.lock();
        state.rv += 1;
        let _ = self.wire.send(Wire::Bookmark { res, rv: state.rv });
    }

    /// Ends RES's open watches with `410 Gone`; history is compacted, so a
    /// watch from any older version gets 410 too.
    fn gone(&self, res: Res) {
        let mut state = self.lock();
        state.history.retain(|write| write.res != res);
        let _ = self.wire.send(Wire::Gone { res });
    }

    /// Closes every open watch mid-stream (no final chunk).
    fn drop_watches(&self) {
        let _ = self.wire.send(Wire::DropAll);
    }

    fn set_down(&self, down: bool) {
        self.lock().down = down;
        if down {
            self.drop_watches();
        }
    }

    fn set_list_delay(&self, res: Res, delay: Duration) {
        self.lock().list_delay.insert(res, delay);
    }

    fn lists(&self, res: Res) -> usize {
        let path = match res {
            Res::Services => "/api/v1/services",
            Res::Slices => "/apis/discovery.k8s.io/v1/endpointslices",
            Res::Nodes => "/api/v1/nodes",
        };
        self.lock()
            .requests
            .iter()
            .filter(|r| r.starts_with(&format!("GET {path}?")) && !r.contains("watch=true"))
            .count()
    }

    fn posted_events(&self) -> Vec<Value> {
        self.lock().events.clone()
    }

    fn source_config(&self) -> KubeSourceConfig {
        KubeSourceConfig {
            node_name: NODE.to_owned(),
            kubeconfig: Some(self.kubeconfig.clone()),
        }
    }
}

fn write_kubeconfig(addr: SocketAddr) -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let path = std::env::temp_dir().join(format!(
        "lb-kube-test-{}-{}.yaml",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: http://{addr}\n\
         contexts:\n- name: local\n  context:\n    cluster: local\n    user: nobody\n\
         current-context: local\nusers:\n- name: nobody\n  user: {{}}\n"
    );
    std::fs::write(&path, text).expect("write kubeconfig");
    path
}

struct Request {
    method: String,
    path: String,
    query: BTreeMap<String, String>,
    body: Vec<u8>,
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn read_request(stream: &mut TcpStream) -> std::io::Result<Option<Request>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.lines();
    let mut first = lines.next().unwrap_or("").split_whitespace();
    let method = first.next().unwrap_or("").to_owned();
    let target = first.next().unwrap_or("").to_owned();
    let length: usize = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let query = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    Ok(Some(Request {
        method,
        path: path.to_owned(),
        query,
        body,
    }))
}

async fn respond(stream: &mut TcpStream, status: &str, body: &Value) -> std::io::Result<()> {
    let body = body.to_string();
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// Whether OBJECT is in the selection of QUERY: `fieldSelector` (only
/// `metadata.name=NAME`, the one the source uses) and `labelSelector`
/// (`key`, `!key`, `key=value`, `key!=value`, comma-separated).
fn selected(object: &Value, query: &BTreeMap<String, String>) -> bool {
    let by_name = match query
        .get("fieldSelector")
        .and_then(|s| s.strip_prefix("metadata.name="))
    {
        Some(name) => object["metadata"]["name"].as_str() == Some(name),
        None => true,
    };
    let labels = &object["metadata"]["labels"];
    let by_labels = query.get("labelSelector").is_none_or(|selector| {
        selector
            .split(',')
            .filter(|r| !r.is_empty())
            .all(|requirement| {
                if let Some(key) = requirement.strip_prefix('!') {
                    labels.get(key).is_none()
                } else if let Some((key, value)) = requirement.split_once("!=") {
                    labels[key].as_str() != Some(value)
                } else if let Some((key, value)) = requirement.split_once('=') {
                    labels[key].as_str() == Some(value.trim_start_matches('='))
                } else {
                    labels.get(requirement).is_some()
                }
            })
    });
    by_name && by_labels
}

/// `GET` of one object: (resource, `namespace/name`).
fn named_object(path: &str) -> Option<(Res, String)> {
    let parts: Vec<&str> = path.split('/').collect();
    match parts.as_slice() {
        ["", "api", "v1", "namespaces", namespace, "services", name] => {
            Some((Res::Services, format!("{namespace}/{name}")))
        }
        [
            "",
            "apis",
            "discovery.k8s.io",
            "v1",
            "namespaces",
            namespace,
            "endpointslices",
            name,
        ] => Some((Res::Slices, format!("{namespace}/{name}"))),
        _ => None,
    }
}

async fn serve(
    mut stream: TcpStream,
    state: &Mutex<State>,
    wire: &broadcast::Sender<Wire>,
) -> std::io::Result<()> {
    if state.lock().unwrap_or_else(PoisonError::into_inner).down {
        return Ok(());
    }
    let Some(request) = read_request(&mut stream).await? else {
        return Ok(());
    };
    let line = format!(
        "{} {}?{}",
        request.method,
        request.path,
        request
            .query
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&")
    );
    state
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .requests
        .push(line);
    let res = Res::from_path(&request.path);
    match (request.method.as_str(), res) {
        ("GET", Some(res))
            if request
                .query
                .get("watch")
                .is_some_and(|w| w == "true" || w == "1") =>
        {
            watch(stream, state, wire, res, &request.query).await
        }
        ("GET", Some(res)) => list(&mut stream, state, res, &request.query).await,
        ("GET", None) if named_object(&request.path).is_some() => {
            let (res, key) = named_object(&request.path).expect("checked");
            let found = state
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .objects
                .get(&res)
                .and_then(|objects| objects.get(&key))
                .cloned();
            if let Some(object) = found {
                respond(&mut stream, "200 OK", &object).await
            } else {
                let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                    "status": "Failure", "reason": "NotFound", "code": 404,
                    "message": format!("{key} not found")});
                respond(&mut stream, "404 Not Found", &status).await
            }
        }
        ("POST", None) if request.path.ends_with("/events") => {
            let body: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
            state
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .events
                .push(body.clone());
            respond(&mut stream, "201 Created", &body).await
        }
        _ => {
            let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "reason": "NotFound", "code": 404,
                "message": format!("the server could not find {}", request.path)});
            respond(&mut stream, "404 Not Found", &status).await
        }
    }
}

async fn list(
    stream: &mut TcpStream,
    state: &Mutex<State>,
    res: Res,
    query: &BTreeMap<String, String>,
) -> std::io::Result<()> {
    let delay = state
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .list_delay
        .get(&res)
        .copied();
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    let body = {
        let state = state.lock().unwrap_or_else(PoisonError::into_inner);
        let limit: usize = query
            .get("limit")
            .and_then(|l| l.parse().ok())
            .unwrap_or(usize::MAX);
        let items: Vec<Value> = state
            .objects
            .get(&res)
            .into_iter()
            .flat_map(BTreeMap::values)
            .filter(|o| selected(o, query))
            .take(limit)
            .map(|o| {
                // Items in a list carry no kind/apiVersion, as the API sends them.
                let mut o = o.clone();
                if let Some(map) = o.as_object_mut() {
                    map.remove("kind");
                    map.remove("apiVersion");
                }
                o
            })
            .collect();
        let (api_version, kind, _) = res.kinds();
        json!({"kind": kind, "apiVersion": api_version,
            "metadata": {"resourceVersion": state.rv.to_string()}, "items": items})
    };
    respond(stream, "200 OK", &body).await
}

async fn chunk(stream: &mut TcpStream, line: &Value) -> std::io::Result<()> {
    let data = format!("{line}\n");
    stream
        .write_all(format!("{:x}\r\n{data}\r\n", data.len()).as_bytes())
        .await
}

async fn watch(
    mut stream: TcpStream,
    state: &Mutex<State>,
    wire: &broadcast::Sender<Wire>,
    res: Res,
    query: &BTreeMap<String, String>,
) -> std::io::Result<()> {
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|rv| rv.parse().ok())
        .unwrap_or(0);
    let (api_version, _, kind) = res.kinds();
    // Subscribe and read the backlog under one lock: nothing falls between.
    let (backlog, mut rx, compacted) = {
        let state = state.lock().unwrap_or_else(PoisonError::into_inner);
        let rx = wire.subscribe();
        let oldest = state
            .history
            .iter()
            .filter(|write| write.res == res)
            .map(|write| write.rv)
            .min();
        // History before the oldest kept event is gone: a watch from there
        // cannot be served (the API server's etcd compaction).
        let newest_of_res = state
            .objects
            .get(&res)
            .into_iter()
            .flat_map(BTreeMap::values)
            .filter_map(|o| {
                o["metadata"]["resourceVersion"]
                    .as_str()?
                    .parse::<u64>()
                    .ok()
            })
            .max()
            .unwrap_or(0);
        let compacted = oldest.is_none_or(|oldest| from + 1 < oldest) && newest_of_res > from;
        let backlog: Vec<Value> = state
            .history
            .iter()
            .filter(|write| write.res == res && write.rv > from)
            .filter_map(|write| write.seen_by(query))
            .collect();
        (backlog, rx, compacted)
    };
    stream
        .write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        )
        .await?;
    let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
        "metadata": {}, "status": "Failure", "reason": "Expired", "code": 410,
        "message": format!("too old resource version: {from}")}});
    if compacted {
        chunk(&mut stream, &gone).await?;
        return stream.write_all(b"0\r\n\r\n").await;
    }
    for event in backlog {
        chunk(&mut stream, &event).await?;
    }
    loop {
        match rx.recv().await {
            Ok(Wire::Event(write)) if write.res == res && write.rv > from => {
                if let Some(event) = write.seen_by(query) {
                    chunk(&mut stream, &event).await?;
                }
            }
            Ok(Wire::Bookmark { res: r, rv }) if r == res => {
                let bookmark = json!({"type": "BOOKMARK", "object": {"kind": kind,
                    "apiVersion": api_version, "metadata": {"resourceVersion": rv.to_string(),
                    "annotations": {"k8s.io/initial-events-end": "true"}}}});
                chunk(&mut stream, &bookmark).await?;
            }
            Ok(Wire::Gone { res: r }) if r == res => {
                chunk(&mut stream, &gone).await?;
                return stream.write_all(b"0\r\n\r\n").await;
            }
            // Mid-stream, no final chunk: the client sees a broken body.
            Ok(Wire::DropAll) | Err(_) => return Ok(()),
            Ok(_) => {}
        }
    }
}

// ---------------------------------------------------------------------------
// Real API JSON
// ---------------------------------------------------------------------------

const CREATED: &str = "2025-03-01T10:00:00Z";

fn uid(name: &str) -> String {
    let mut h: u32 = 2_166_136_261;
    for b in name.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(16_777_619);
    }
    format!("{h:08x}-1c2d-4e5f-8a9b-{:012x}", u64::from(h) * 7919)
}

fn managed_fields(manager: &str) -> Value {
    json!([{"manager": manager, "operation": "Update", "apiVersion": "v1", "time": CREATED,
        "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:labels": {}}}}])
}

struct Svc<'a> {
    name: &'a str,
    type_: &'a str,
    cluster_ips: &'a [&'a str],
    families: &'a [&'a str],
    policy: &'a str,
    /// (name, port, protocol, targetPort, nodePort)
    ports: &'a [(&'a str, u16, &'a str, u16, Option<u16>)],
    labels: Value,
}

impl Default for Svc<'_> {
    fn default() -> Self {
        Self {
            name: "web",
            type_: "ClusterIP",
            cluster_ips: &[],
            families: &[],
            policy: "SingleStack",
            ports: &[("http", 80, "TCP", 8080, None)],
            labels: json!({}),
        }
    }
}

fn service(s: &Svc<'_>) -> Value {
    let ports: Vec<Value> = s
        .ports
        .iter()
        .map(|(name, port, protocol, target, node_port)| {
            let mut p =
                json!({"name": name, "protocol": protocol, "port": port, "targetPort": target});
            if let Some(node_port) = node_port {
                p["nodePort"] = json!(node_port);
            }
            p
        })
        .collect();
    let mut labels = s.labels.clone();
    labels["app"] = json!(s.name);
    let mut spec = json!({
        "ports": ports,
        "selector": {"app": s.name},
        "clusterIP": s.cluster_ips.first().copied().unwrap_or("None"),
        "clusterIPs": s.cluster_ips,
        "type": s.type_,
        "sessionAffinity": "None",
        "ipFamilies": s.families,
        "ipFamilyPolicy": s.policy,
        "internalTrafficPolicy": "Cluster",
    });
    if s.type_ == "NodePort" {
        spec["externalTrafficPolicy"] = json!("Cluster");
    }
    json!({
        "kind": "Service",
        "apiVersion": "v1",
        "metadata": {
            "name": s.name,
            "namespace": "default",
            "uid": uid(s.name),
            "resourceVersion": "1",
            "creationTimestamp": CREATED,
            "labels": labels,
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}\n"},
            "managedFields": managed_fields("kubectl-client-side-apply"),
        },
        "spec": spec,
        "status": {"loadBalancer": {}},
    })
}

fn external_name(name: &str) -> Value {
    json!({"kind": "Service", "apiVersion": "v1",
        "metadata": {"name": name, "namespace": "default", "uid": uid(name), "resourceVersion": "1",
            "creationTimestamp": CREATED},
        "spec": {"type": "ExternalName", "externalName": "db.example.com", "sessionAffinity": "None"},
        "status": {"loadBalancer": {}}})
}

/// A slice of SERVICE; ENDPOINTS are (address, ready).
fn slice(
    name: &str,
    service: &str,
    address_type: &str,
    endpoints: &[(&str, bool)],
    ports: &[(&str, u16, &str)],
) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .enumerate()
        .map(|(i, (addr, ready))| {
            json!({"addresses": [addr],
                "conditions": {"ready": ready, "serving": ready, "terminating": false},
                "nodeName": NODE, "zone": "zone-a",
                "targetRef": {"kind": "Pod", "namespace": "default", "name": format!("{service}-{i}"),
                    "uid": uid(&format!("{service}-{i}"))}})
        })
        .collect();
    let ports: Vec<Value> = ports
        .iter()
        .map(|(name, port, protocol)| json!({"name": name, "protocol": protocol, "port": port}))
        .collect();
    json!({
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": name,
            "generateName": format!("{service}-"),
            "namespace": "default",
            "uid": uid(name),
            "resourceVersion": "1",
            "generation": 1,
            "creationTimestamp": CREATED,
            "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                "app": service,
            },
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": CREATED},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": service,
                "uid": uid(service), "controller": true, "blockOwnerDeletion": true}],
            "managedFields": managed_fields("kube-controller-manager"),
        },
        "addressType": address_type,
        "endpoints": endpoints,
        "ports": ports,
    })
}

fn node(addresses: &[(&str, &str)]) -> Value {
    let mut addrs: Vec<Value> = addresses
        .iter()
        .map(|(t, a)| json!({"type": t, "address": a}))
        .collect();
    addrs.push(json!({"type": "Hostname", "address": NODE}));
    json!({
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": {
            "name": NODE,
            "uid": uid(NODE),
            "resourceVersion": "1",
            "creationTimestamp": CREATED,
            "labels": {
                "kubernetes.io/hostname": NODE,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "topology.kubernetes.io/zone": "zone-a",
                "topology.kubernetes.io/region": "region-1",
            },
            "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
            "managedFields": managed_fields("kubelet"),
        },
        "spec": {"podCIDR": "198.18.0.0/24", "podCIDRs": ["198.18.0.0/24", "fd00:18::/64"]},
        "status": {
            "addresses": addrs,
            "capacity": {"cpu": "2", "memory": "8Gi", "pods": "110"},
            "allocatable": {"cpu": "2", "memory": "8Gi", "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "kubelet is posting ready status", "lastHeartbeatTime": CREATED,
                "lastTransitionTime": CREATED}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {"machineID": "m", "systemUUID": "s", "bootID": "b",
                "kernelVersion": "6.12.0", "osImage": "Debian GNU/Linux 13",
                "containerRuntimeVersion": "containerd://2.0.0", "kubeletVersion": "v1.33.0",
                "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"},
        },
    })
}

// ---------------------------------------------------------------------------
// Driving the source
// ---------------------------------------------------------------------------

struct Source {
    rx: mpsc::Receiver<SourceUpdate>,
    task: tokio::task::JoinHandle<()>,
    /// The state the updates so far add up to, as the agent holds it.
    held: Held,
}

impl Drop for Source {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn start_source(server: &ApiServer) -> Source {
    // The agent's channel size.
    let (tx, rx) = mpsc::channel(4);
    let task = source::spawn(&SourceSpec::Kube(server.source_config()), tx).expect("source starts");
    Source {
        rx,
        task,
        held: Held::default(),
    }
}

/// Objects as the agent holds them after applying each update.
#[derive(Default)]
struct Held {
    services: BTreeMap<ObjectKey, Service>,
    slices: BTreeMap<ObjectKey, EndpointSlice>,
    node: Option<Node>,
}

impl Held {
    fn apply(&mut self, update: &SourceUpdate) {
        match update {
            SourceUpdate::Snapshot(snapshot) => {
                self.services = snapshot
                    .services
                    .iter()
                    .map(|s| (key_of(&s.metadata), s.clone()))
                    .collect();
                self.slices = snapshot
                    .slices
                    .iter()
                    .map(|s| (key_of(&s.metadata), s.clone()))
                    .collect();
                self.node.clone_from(&snapshot.node);
            }
            SourceUpdate::Changes(changes) => {
                for key in &changes.removed_services {
                    self.services.remove(key);
                }
                for key in &changes.removed_slices {
                    self.slices.remove(key);
                }
                for service in &changes.services {
                    self.services
                        .insert(key_of(&service.metadata), service.clone());
                }
                for slice in &changes.slices {
                    self.slices.insert(key_of(&slice.metadata), slice.clone());
                }
                if let Some(node) = &changes.node {
                    self.node = node.clone().into_node();
                }
            }
            SourceUpdate::Stale(_) => {}
        }
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            services: self.services.values().cloned().collect(),
            slices: self.slices.values().cloned().collect(),
            node: self.node.clone(),
            errors: Vec::new(),
        }
    }
}

impl Source {
    /// The next update (applied to what is held), or a panic after TIMEOUT.
    async fn next(&mut self, timeout: Duration, what: &str) -> SourceUpdate {
        let update = match tokio::time::timeout(timeout, self.rx.recv()).await {
            Ok(Some(update)) => update,
            Ok(None) => panic!("{what}: the source ended"),
            Err(tokio::time::error::Elapsed { .. }) => {
                panic!("{what}: no update within {timeout:?}")
            }
        };
        self.held.apply(&update);
        update
    }

    /// The next update that is not a stale reason: changes, as the kube
    /// source sends them.
    async fn next_changes(&mut self, timeout: Duration, what: &str) -> Changes {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left, what).await {
                SourceUpdate::Changes(changes) => return changes,
                SourceUpdate::Stale(reason) => eprintln!("{what}: stale: {reason}"),
                SourceUpdate::Snapshot(_) => panic!("{what}: the kube source sends changes"),
            }
        }
    }

    /// The first state held for which PREDICATE holds (stale updates are
    /// skipped), with the number of updates seen.
    async fn until(
        &mut self,
        timeout: Duration,
        what: &str,
        predicate: impl Fn(&Snapshot) -> bool,
    ) -> (Snapshot, usize) {
        let deadline = Instant::now() + timeout;
        let mut seen = 0;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            self.next_changes(left, what).await;
            seen += 1;
            let held = self.held.snapshot();
            if predicate(&held) {
                return (held, seen);
            }
        }
    }

    async fn until_stale(&mut self, timeout: Duration, what: &str) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if let SourceUpdate::Stale(reason) = self.next(left, what).await {
                return reason;
            }
        }
    }

    /// Asserts that nothing arrives for FOR.
    async fn quiet(&mut self, period: Duration, what: &str) {
        if let Ok(update) = tokio::time::timeout(period, self.rx.recv()).await {
            panic!("{what}: expected no update, got {update:?}");
        }
    }
}

/// Frontend -> its backends, through the model, as `ADDR:PORT/PROTO` ->
/// `[ADDR:PORT, ...]`.
fn frontends(snapshot: &Snapshot) -> BTreeMap<String, Vec<String>> {
    let node = node_context(snapshot.node.as_ref(), NODE);
    let model = model::build(&snapshot.services, &snapshot.slices, &node);
    model
        .frontends
        .iter()
        .map(|(frontend, spec)| {
            (
                frontend.to_string(),
                spec.backends.iter().map(ToString::to_string).collect(),
            )
        })
        .collect()
}

fn names(snapshot: &Snapshot) -> Vec<String> {
    let mut names: Vec<String> = snapshot
        .services
        .iter()
        .filter_map(|s| s.metadata.name.clone())
        .collect();
    names.sort();
    names
}

fn slice_version(snapshot: &Snapshot, name: &str) -> Option<String> {
    snapshot
        .slices
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some(name))
        .and_then(|s| s.metadata.resource_version.clone())
}

fn has_slice(snapshot: &Snapshot, name: &str) -> bool {
    snapshot
        .slices
        .iter()
        .any(|s| s.metadata.name.as_deref() == Some(name))
}

fn expect(frontends: &BTreeMap<String, Vec<String>>, frontend: &str, backends: &[&str]) {
    let got = frontends
        .get(frontend)
        .unwrap_or_else(|| panic!("no frontend {frontend}; frontends: {frontends:#?}"));
    assert_eq!(
        got,
        &backends.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "backends of {frontend}"
    );
}

const STEP: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[expect(clippy::too_many_lines, reason = "the fixture: a list of objects")]
fn dual_stack_objects() -> Vec<(Res, Value)> {
    vec![
        (
            Res::Services,
            service(&Svc {
                cluster_ips: &["198.19.0.10", "fd00:96::10"],
                families: &["IPv4", "IPv6"],
                policy: "RequireDualStack",
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
                cluster_ips: &["fd00:96::20", "198.19.0.20"],
                families: &["IPv6", "IPv4"],
                policy: "PreferDualStack",
                ports: &[("http", 80, "TCP", 8080, Some(30080))],
                ..Svc::default()
            }),
        ),
        // Handed to another proxy: left out by the API server (the watch's
        // label selector), and by the model too, as in the file source.
        (
            Res::Services,
            service(&Svc {
                name: "other-proxy",
                cluster_ips: &["198.19.0.30"],
                families: &["IPv4"],
                labels: json!({"service.kubernetes.io/service-proxy-name": "someone-else"}),
                ..Svc::default()
            }),
        ),
        (Res::Services, external_name("db")),
        (
            Res::Services,
            service(&Svc {
                name: "headless",
                families: &["IPv4", "IPv6"],
                policy: "RequireDualStack",
                ..Svc::default()
            }),
        ),
        (
            Res::Slices,
            slice(
                "web-abc12",
                "web",
                "IPv4",
                &[
                    ("198.18.2.2", true),
                    ("198.18.3.2", true),
                    ("198.18.4.2", false),
                ],
                &[("http", 8080, "TCP"), ("dns", 8053, "UDP")],
            ),
        ),
        (
            Res::Slices,
            slice(
                "web-def34",
                "web",
                "IPv6",
                &[("fd00:2::2", true), ("fd00:3::2", true)],
                &[("http", 8080, "TCP"), ("dns", 8053, "UDP")],
            ),
        ),
        (
            Res::Slices,
            slice(
                "web-fqdn",
                "web",
                "FQDN",
                &[("web.example.com", true)],
                &[("http", 8080, "TCP")],
            ),
        ),
        (
            Res::Slices,
            slice(
                "np-v4",
                "np",
                "IPv4",
                &[("198.18.5.2", true)],
                &[("http", 8080, "TCP")],
            ),
        ),
        (
            Res::Slices,
            slice(
                "np-v6",
                "np",
                "IPv6",
                &[("fd00:5::2", true)],
                &[("http", 8080, "TCP")],
            ),
        ),
        (
            Res::Nodes,
            node(&[
                ("InternalIP", "198.18.0.1"),
                ("InternalIP", "fd00:18::1"),
                ("ExternalIP", "198.18.100.1"),
            ]),
        ),
    ]
}

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
    let mut web = service(&Svc {
        cluster_ips: &["198.19.0.10"],
        families: &["IPv4"],
        ports: &[("", 443, "TCP", 8443, None)],
        ..Svc::default()
    });
    // As older API servers send it: no clusterIPs.
    web["spec"].as_object_mut().unwrap().remove("clusterIPs");
    let server = ApiServer::start(vec![
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
    ])
    .await;
    let mut source = start_source(&server);
    let (snapshot, _) = source.until(STEP, "initial lists", |_| true).await;
    let f = frontends(&snapshot);
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

fn key(name: &str) -> ObjectKey {
    ("default".to_owned(), name.to_owned())
}

fn object_names<'a>(
    objects: impl IntoIterator<Item = &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>,
) -> Vec<String> {
    let mut names: Vec<String> = objects
        .into_iter()
        .filter_map(|meta| meta.name.clone())
        .collect();
    names.sort();
    names
}

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
        server.apply(
            Res::Slices,
            slice(
                "web-abc12",
                "web",
                "IPv4",
                &[(&address, true)],
                &[("http", 8080, "TCP")],
            ),
        );
    }
    let last = server.apply(
        Res::Slices,
        slice(
            "web-abc12",
            "web",
            "IPv4",
            &[("198.18.6.9", true)],
            &[("http", 8080, "TCP")],
        ),
    );
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

fn proxy_label() -> Value {
    json!({"service.kubernetes.io/service-proxy-name": "someone-else"})
}

/// `web` with its slice; `other` (another proxy's) and `hl` (headless) with
/// theirs, labelled as the `EndpointSlice` controller labels them.
fn objects_with_ignored_ones(web: &Svc<'_>) -> Vec<(Res, Value)> {
    let mut other_slice = slice(
        "other-1",
        "other",
        "IPv4",
        &[("198.18.7.2", true)],
        &[("http", 8080, "TCP")],
    );
    other_slice["metadata"]["labels"]["service.kubernetes.io/service-proxy-name"] =
        json!("someone-else");
    let mut headless_slice = slice(
        "hl-1",
        "hl",
        "IPv4",
        &[("198.18.8.2", true)],
        &[("http", 8080, "TCP")],
    );
    headless_slice["metadata"]["labels"][HEADLESS_LABEL] = json!("");
    vec![
        (Res::Services, service(web)),
        (
            Res::Slices,
            slice(
                "web-1",
                "web",
                "IPv4",
                &[("198.18.2.2", true)],
                &[("http", 8080, "TCP")],
            ),
        ),
        (
            Res::Services,
            service(&Svc {
                name: "other",
                cluster_ips: &["198.19.0.30"],
                families: &["IPv4"],
                labels: proxy_label(),
                ..Svc::default()
            }),
        ),
        (Res::Slices, other_slice),
        (
            Res::Services,
            service(&Svc {
                name: "hl",
                families: &["IPv4"],
                ..Svc::default()
            }),
        ),
        (Res::Slices, headless_slice),
        (Res::Nodes, node(&[("InternalIP", "198.18.0.1")])),
    ]
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

/// Log output of this test binary, from the moment a test asks for it.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: std::sync::OnceLock<Arc<Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    Arc::clone(LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let writer = Arc::clone(&logs);
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || LogWriter(Arc::clone(&writer)))
            .finish();
        // Global: the source logs from the runtime's threads.
        tracing::subscriber::set_global_default(subscriber).expect("no other subscriber");
        logs
    }))
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
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
