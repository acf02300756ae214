//! The stand-in API server: the Kubernetes list and watch protocol over
//! plain HTTP on 127.0.0.1, as the real API server speaks it.
//!
//! Also compiled into `lb-bench` (its kube-source control-plane benchmark),
//! so it depends on nothing of this test crate: `driver.rs` adds the
//! source configuration the tests use.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use serde_json::{Value, json};

use crate::api_protobuf;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::broadcast,
};

/// The resources the source watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Res {
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
        let selector = Selector::of(query);
        let now = selector.selects(&Selectable::of(&self.object));
        let before = self
            .previous
            .as_ref()
            .is_some_and(|p| selector.selects(&Selectable::of(p)));
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
pub(crate) struct State {
    rv: u64,
    objects: BTreeMap<Res, BTreeMap<String, Stored>>,
    history: Vec<Write>,
    /// Refuse every connection (close it unanswered).
    down: bool,
    /// Delay before answering a list.
    list_delay: BTreeMap<Res, Duration>,
    /// Answer lists in JSON even to a client that accepts protobuf.
    json_only: bool,
    /// Cut every protobuf list body short (a body the client refuses).
    garble_protobuf: bool,
    /// `METHOD path?query` of every request.
    pub(crate) requests: Vec<String>,
    /// Bodies of the Events posted.
    events: Vec<Value>,
    /// Per resource, the version [`ApiServer::gone`] compacted to: a
    /// watch from an older one gets `410 Gone`, also one opened after.
    compacted: BTreeMap<Res, u64>,
}

/// One stored object, and its text as a list item (without `kind` and
/// `apiVersion`, as lists carry items), made once when it is written: a
/// page of a list is then a join of texts. (Serializing each page's
/// objects anew made this server, not the client under test, what a
/// 100k-object list waited for.)
struct Stored {
    object: Value,
    item: String,
    /// The item's protobuf message (Services and slices only).
    item_protobuf: Vec<u8>,
    /// What selectors read of it, taken out once (looking them up in
    /// the JSON for every page was most of this server's time).
    selectable: Selectable,
    /// `metadata.resourceVersion`.
    rv: u64,
}

impl Stored {
    fn new(res: Res, object: Value) -> Self {
        let mut item = object.clone();
        if let Some(map) = item.as_object_mut() {
            map.remove("kind");
            map.remove("apiVersion");
        }
        let item_protobuf = match res {
            Res::Services => api_protobuf::message(api_protobuf::SERVICE, &item),
            Res::Slices => api_protobuf::message(api_protobuf::ENDPOINT_SLICE, &item),
            Res::Nodes => Vec::new(),
        };
        Self {
            item: item.to_string(),
            item_protobuf,
            selectable: Selectable::of(&object),
            rv: object["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|rv| rv.parse().ok())
                .unwrap_or(0),
            object,
        }
    }
}

fn object_key(object: &Value) -> String {
    format!(
        "{}/{}",
        object["metadata"]["namespace"].as_str().unwrap_or(""),
        object["metadata"]["name"].as_str().unwrap_or("")
    )
}

pub(crate) struct ApiServer {
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
    pub(crate) async fn start(objects: Vec<(Res, Value)>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (wire, _) = broadcast::channel(1024);
        let state = Arc::new(Mutex::new(State::default()));
        let task = {
            let (state, wire) = (Arc::clone(&state), wire.clone());
            tokio::spawn(async move {
                // The connections go with the server: dropping this task
                // (the server) drops them, open watches included.
                let mut connections = tokio::task::JoinSet::new();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    while connections.try_join_next().is_some() {}
                    let (state, wire) = (Arc::clone(&state), wire.clone());
                    connections.spawn(async move {
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

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Creates or replaces OBJECT (ADDED or MODIFIED), as a write would;
    /// returns its new resource version.
    pub(crate) fn apply(&self, res: Res, mut object: Value) -> u64 {
        let mut state = self.lock();
        state.rv += 1;
        let rv = state.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let previous = state
            .objects
            .entry(res)
            .or_default()
            .insert(object_key(&object), Stored::new(res, object.clone()))
            .map(|stored| stored.object);
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

    pub(crate) fn delete(&self, res: Res, namespace: &str, name: &str) {
        let mut state = self.lock();
        state.rv += 1;
        let rv = state.rv;
        let mut object = state
            .objects
            .entry(res)
            .or_default()
            .remove(&format!("{namespace}/{name}"))
            .expect("object to delete exists")
            .object;
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
    pub(crate) fn delete_silently(&self, res: Res, namespace: &str, name: &str) {
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
    pub(crate) fn apply_silently(&self, res: Res, mut object: Value) {
        let mut state = self.lock();
        state.rv += 1;
        object["metadata"]["resourceVersion"] = json!(state.rv.to_string());
        state
            .objects
            .entry(res)
            .or_default()
            .insert(object_key(&object), Stored::new(res, object));
    }

    pub(crate) fn bookmark(&self, res: Res) {
        let mut state = self.lock();
        state.rv += 1;
        let _ = self.wire.send(Wire::Bookmark { res, rv: state.rv });
    }

    /// Ends RES's open watches with `410 Gone`; history is compacted, so a
    /// watch from any older version gets 410 too.
    pub(crate) fn gone(&self, res: Res) {
        let mut state = self.lock();
        state.history.retain(|write| write.res != res);
        // A watcher that has listed but not opened its watch yet gets its
        // 410 there, as from etcd's compaction.
        state.rv += 1;
        let rv = state.rv;
        state.compacted.insert(res, rv);
        let _ = self.wire.send(Wire::Gone { res });
    }

    /// Closes every open watch mid-stream (no final chunk).
    pub(crate) fn drop_watches(&self) {
        let _ = self.wire.send(Wire::DropAll);
    }

    pub(crate) fn set_down(&self, down: bool) {
        self.lock().down = down;
        if down {
            self.drop_watches();
        }
    }

    /// Answers lists in JSON even to a client that accepts protobuf (as
    /// an API server of a type without protobuf, or a proxy, does).
    pub(crate) fn set_json_only(&self, json_only: bool) {
        self.lock().json_only = json_only;
    }

    /// Cuts every protobuf list body in half: a body the client cannot
    /// read.
    pub(crate) fn set_garble_protobuf(&self, garble: bool) {
        self.lock().garble_protobuf = garble;
    }

    pub(crate) fn set_list_delay(&self, res: Res, delay: Duration) {
        self.lock().list_delay.insert(res, delay);
    }

    pub(crate) fn lists(&self, res: Res) -> usize {
        self.list_requests(res).len()
    }

    /// The list requests of RES in order (` (protobuf)` at the end of one
    /// that accepted protobuf).
    pub(crate) fn list_requests(&self, res: Res) -> Vec<String> {
        let path = match res {
            Res::Services => "/api/v1/services",
            Res::Slices => "/apis/discovery.k8s.io/v1/endpointslices",
            Res::Nodes => "/api/v1/nodes",
        };
        self.lock()
            .requests
            .iter()
            .filter(|r| r.starts_with(&format!("GET {path}?")) && !r.contains("watch=true"))
            .cloned()
            .collect()
    }

    pub(crate) fn posted_events(&self) -> Vec<Value> {
        self.lock().events.clone()
    }

    /// A kubeconfig file that points at this server (removed on drop).
    pub(crate) fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
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
    /// The client accepts `application/vnd.kubernetes.protobuf`.
    accepts_protobuf: bool,
}

/// What a client that can read protobuf asks for, and gets.
const PROTOBUF: &str = "application/vnd.kubernetes.protobuf";

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

/// Reads the next request on STREAM; BUF holds what was read beyond the
/// previous one. `None`: the client closed the connection.
async fn read_request(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<Request>> {
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
    let header = |name: &str| {
        lines
            .clone()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_owned())
    };
    let length: usize = header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let accepts_protobuf = header("accept").is_some_and(|accept| accept.contains(PROTOBUF));
    while buf.len() < head_end + length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf[head_end..head_end + length].to_vec();
    buf.drain(..head_end + length);
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
        accepts_protobuf,
    }))
}

async fn respond(stream: &mut TcpStream, status: &str, body: &Value) -> std::io::Result<()> {
    respond_text(stream, status, &body.to_string()).await
}

async fn respond_text(stream: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    respond_bytes(stream, status, "application/json", body.as_bytes()).await
}

async fn respond_bytes(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<()> {
    // The connection stays open for the client's next request, as an API
    // server's does (HTTP/1.1).
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await
}

/// What a selector reads of an object: its name and labels (a label
/// whose value is not a string is present, and equal to no value).
#[derive(Debug, Default)]
struct Selectable {
    name: Option<String>,
    labels: BTreeMap<String, Option<String>>,
}

impl Selectable {
    fn of(object: &Value) -> Self {
        let metadata = &object["metadata"];
        let labels = metadata["labels"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(key, value)| (key.clone(), value.as_str().map(str::to_owned)))
            .collect();
        Self {
            name: metadata["name"].as_str().map(str::to_owned),
            labels,
        }
    }
}

/// A request's `fieldSelector` (only `metadata.name=NAME`, the one the
/// source uses) and `labelSelector` (`key`, `!key`, `key=value`,
/// `key!=value`, comma-separated), read once per request.
struct Selector<'a> {
    name: Option<&'a str>,
    labels: Vec<Requirement<'a>>,
}

enum Requirement<'a> {
    Present(&'a str),
    Absent(&'a str),
    Equal(&'a str, &'a str),
    NotEqual(&'a str, &'a str),
}

impl<'a> Selector<'a> {
    fn of(query: &'a BTreeMap<String, String>) -> Self {
        let name = query
            .get("fieldSelector")
            .and_then(|s| s.strip_prefix("metadata.name="));
        let labels = query
            .get("labelSelector")
            .into_iter()
            .flat_map(|selector| selector.split(','))
            .filter(|r| !r.is_empty())
            .map(|requirement| {
                if let Some(key) = requirement.strip_prefix('!') {
                    Requirement::Absent(key)
                } else if let Some((key, value)) = requirement.split_once("!=") {
                    Requirement::NotEqual(key, value)
                } else if let Some((key, value)) = requirement.split_once('=') {
                    Requirement::Equal(key, value.trim_start_matches('='))
                } else {
                    Requirement::Present(requirement)
                }
            })
            .collect();
        Self { name, labels }
    }

    fn selects(&self, object: &Selectable) -> bool {
        let value_of = |key: &str| object.labels.get(key).and_then(Option::as_deref);
        self.name
            .is_none_or(|name| object.name.as_deref() == Some(name))
            && self.labels.iter().all(|requirement| match *requirement {
                Requirement::Present(key) => object.labels.contains_key(key),
                Requirement::Absent(key) => !object.labels.contains_key(key),
                Requirement::Equal(key, value) => value_of(key) == Some(value),
                Requirement::NotEqual(key, value) => value_of(key) != Some(value),
            })
    }
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

/// Answers the requests on STREAM, one after another, until the client
/// closes it or a watch takes it over (a watch's answer ends with the
/// connection). While the server is down, a request is not answered: its
/// connection is closed.
async fn serve(
    mut stream: TcpStream,
    state: &Mutex<State>,
    wire: &broadcast::Sender<Wire>,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    loop {
        let Some(request) = read_request(&mut stream, &mut buf).await? else {
            return Ok(());
        };
        // Checked for each request: a connection opened before the server
        // went down gets no answer either.
        if state.lock().unwrap_or_else(PoisonError::into_inner).down {
            return Ok(());
        }
        log_request(state, &request);
        if let Some(res) = watched(&request) {
            return watch(stream, state, wire, res, &request.query).await;
        }
        answer(&mut stream, state, request).await?;
    }
}

/// The resource REQUEST watches, if it is a watch.
fn watched(request: &Request) -> Option<Res> {
    let watch = request
        .query
        .get("watch")
        .is_some_and(|w| w == "true" || w == "1");
    Res::from_path(&request.path).filter(|_| request.method == "GET" && watch)
}

/// Keeps REQUEST's `METHOD path?query` line.
fn log_request(state: &Mutex<State>, request: &Request) {
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
    ) + if request.accepts_protobuf {
        " (protobuf)"
    } else {
        ""
    };
    state
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .requests
        .push(line);
}

/// Answers REQUEST, which is not a watch.
async fn answer(
    stream: &mut TcpStream,
    state: &Mutex<State>,
    request: Request,
) -> std::io::Result<()> {
    match (request.method.as_str(), Res::from_path(&request.path)) {
        ("GET", Some(res)) => {
            list(stream, state, res, &request.query, request.accepts_protobuf).await
        }
        ("GET", None) if named_object(&request.path).is_some() => {
            let (res, key) = named_object(&request.path).expect("checked");
            let found = state
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .objects
                .get(&res)
                .and_then(|objects| objects.get(&key))
                .map(|stored| stored.object.clone());
            if let Some(object) = found {
                respond(stream, "200 OK", &object).await
            } else {
                let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                    "status": "Failure", "reason": "NotFound", "code": 404,
                    "message": format!("{key} not found")});
                respond(stream, "404 Not Found", &status).await
            }
        }
        ("POST", None) if request.path.ends_with("/events") => {
            let body: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
            state
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .events
                .push(body.clone());
            respond(stream, "201 Created", &body).await
        }
        _ => {
            let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "reason": "NotFound", "code": 404,
                "message": format!("the server could not find {}", request.path)});
            respond(stream, "404 Not Found", &status).await
        }
    }
}

async fn list(
    stream: &mut TcpStream,
    state: &Mutex<State>,
    res: Res,
    query: &BTreeMap<String, String>,
    accepts_protobuf: bool,
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
    let (body, protobuf) = {
        let state = state.lock().unwrap_or_else(PoisonError::into_inner);
        let protobuf = accepts_protobuf && res != Res::Nodes && !state.json_only;
        let mut body = list_page(&state, res, query, protobuf);
        if protobuf && state.garble_protobuf {
            body.truncate(body.len() / 2);
        }
        (body, protobuf)
    };
    let content_type = if protobuf {
        PROTOBUF
    } else {
        "application/json"
    };
    respond_bytes(stream, "200 OK", content_type, &body).await
}

/// One page of a list, as the API server pages it: at most `limit` items
/// (all without one), in key order, and a `continue` token when more are
/// left, which the next request passes back to get the items after it.
///
/// The real API server serves every page of a list from the snapshot of
/// the first; here later pages come from the current objects, but carry
/// the first page's `resourceVersion` (the token holds it), so a write
/// between pages also reaches the client through the watch it starts from
/// that version, as with the real one. Tokens are `VERSION/KEY`, the key
/// of the last item sent; the client treats them as opaque.
fn list_page(state: &State, res: Res, query: &BTreeMap<String, String>, protobuf: bool) -> Vec<u8> {
    let limit: usize = query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|&l| l > 0)
        .unwrap_or(usize::MAX);
    let (rv, after) = match query.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let (rv, key) = token.split_once('/').unwrap_or((token, ""));
            (rv.parse().unwrap_or(state.rv), Some(key.to_owned()))
        }
        None => (state.rv, None),
    };
    let from = match after {
        Some(key) => std::ops::Bound::Excluded(key),
        None => std::ops::Bound::Unbounded,
    };
    let selector = Selector::of(query);
    let mut selected_objects = state
        .objects
        .get(&res)
        .map(|objects| objects.range((from, std::ops::Bound::Unbounded)))
        .into_iter()
        .flatten()
        .filter(|(_, stored)| selector.selects(&stored.selectable));
    let mut items = Vec::new();
    let mut last_key = None;
    for (key, stored) in selected_objects.by_ref().take(limit) {
        items.push(stored);
        last_key = Some(key.clone());
    }
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if selected_objects.next().is_some()
        && let Some(key) = last_key
    {
        metadata["continue"] = json!(format!("{rv}/{key}"));
    }
    let (api_version, kind, _) = res.kinds();
    if protobuf {
        let items: Vec<&[u8]> = items.iter().map(|s| s.item_protobuf.as_slice()).collect();
        return api_protobuf::list(api_version, kind, &metadata, &items);
    }
    let head = json!({"kind": kind, "apiVersion": api_version, "metadata": metadata}).to_string();
    let items: Vec<&str> = items.iter().map(|s| s.item.as_str()).collect();
    // The head without its closing brace, then the items.
    format!(
        "{},\"items\":[{}]}}",
        head.strip_suffix('}').unwrap_or(&head),
        items.join(",")
    )
    .into_bytes()
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
            .map(|stored| stored.rv)
            .max()
            .unwrap_or(0);
        let compacted = (oldest.is_none_or(|oldest| from + 1 < oldest) && newest_of_res > from)
            || (query.contains_key("resourceVersion")
                && state.compacted.get(&res).is_some_and(|at| from < *at));
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
