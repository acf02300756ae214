//! The watcher of Services and `EndpointSlice`s: kube-runtime's
//! list-then-watch, with the lists read as protobuf.
//!
//! kube-proxy asks the API server for protobuf; kube-rs reads only JSON.
//! At 100k Services the first list is 300k objects, and reading their
//! JSON was most of the list's time on the source's one thread. This is
//! kube-runtime's `watcher` state machine (the same events, errors and
//! backoff by the caller's `default_backoff`), with its pages asked for as
//! `application/vnd.kubernetes.protobuf, application/json`: an API server
//! that answers a page in JSON (a proxy, an aggregated API) is read as
//! JSON, and so is a protobuf page this reader refuses (asked for again in
//! JSON). The watch that follows stays JSON (kube-rs's): its events are few.
//!
//! Each protobuf page's successor is asked for as soon as the page has
//! come (its continue token is read ahead of its items), so the API
//! server makes and sends the next page while this one is read: the list
//! is bound by the slower of the two rather than their sum. One page is
//! ahead at most.

use std::fmt::Debug;

use futures::{Stream, StreamExt as _, stream::BoxStream};
use http_body_util::BodyExt as _;
use hyper::header::{ACCEPT, CONTENT_TYPE, HeaderValue};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    api::{ListParams, WatchEvent, WatchParams},
    core::{ObjectList, Status},
    runtime::watcher::{Error, Event},
};
use serde::de::DeserializeOwned;
use tokio::task::JoinHandle;
use tracing::Instrument as _;

use super::with_causes;
use crate::model::protobuf::{self, ListPage, WireError};
use crate::model::{ListedService, ListedSlice};

/// The API server's protobuf.
const PROTOBUF: &str = "application/vnd.kubernetes.protobuf";
/// What the API server is asked for: protobuf, else JSON.
const ACCEPTED: &str = "application/vnd.kubernetes.protobuf, application/json";
/// What a page the protobuf reader refused is asked for again in.
const JSON: &str = "application/json";
/// Objects per page, as kube-runtime's watcher and client-go's pager.
const PAGE_SIZE: u32 = 500;
/// A watch that sends nothing (not even a bookmark) for longer than the
/// timeout it asked for plus this is taken as dead, as kube-runtime does.
const IDLE_MARGIN: std::time::Duration = std::time::Duration::from_secs(5);
/// The watch's server-side timeout, kube-runtime's default.
const WATCH_TIMEOUT_SECS: u32 = 290;

/// A listed resource whose list pages can be read from protobuf.
pub(super) trait ProtobufList:
    Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static
{
    /// Reads a list body in the API server's protobuf.
    fn read_page(body: &[u8]) -> Result<ListPage<Self>, WireError>;
}

impl ProtobufList for ListedService {
    fn read_page(body: &[u8]) -> Result<ListPage<Self>, WireError> {
        protobuf::service_list(body)
    }
}

impl ProtobufList for ListedSlice {
    fn read_page(body: &[u8]) -> Result<ListPage<Self>, WireError> {
        protobuf::slice_list(body)
    }
}

/// Where the watcher is (kube-runtime's states, minus streaming lists).
enum Phase<K> {
    /// Nothing listed: the next step starts a list.
    Empty,
    /// Listing: the page's objects not yet sent, and where the next page
    /// starts (`None` after the last, whose version is then known).
    Page {
        objects: std::vec::IntoIter<K>,
        continue_token: Option<String>,
        version: Option<String>,
        /// The next page, already asked for.
        ahead: Option<Asked>,
    },
    /// Listed at a version: the next step starts the watch from it.
    Listed { version: String },
    /// Watching.
    Watching {
        version: String,
        stream: BoxStream<'static, kube::Result<WatchEvent<K>>>,
    },
}

struct Watcher<K: ProtobufList> {
    api: Api<K>,
    client: Client,
    labels: String,
    phase: Phase<K>,
}

/// List-then-watch of K (all namespaces) with LABELS, as kube-runtime's
/// `watcher` with `Config::default().labels(LABELS)`.
pub(super) fn watcher<K: ProtobufList>(
    client: Client,
    labels: String,
) -> impl Stream<Item = Result<Event<K>, Error>> + Send {
    let watcher = Watcher {
        api: Api::<K>::all(client.clone()),
        client,
        labels,
        phase: Phase::Empty,
    };
    futures::stream::unfold(watcher, |mut watcher| async move {
        let item = watcher.step().await;
        Some((item, watcher))
    })
}

impl<K: ProtobufList> Watcher<K> {
    /// Steps until there is something to send.
    async fn step(&mut self) -> Result<Event<K>, Error> {
        loop {
            if let Some(item) = self.step_once().await {
                return item;
            }
        }
    }

    async fn step_once(&mut self) -> Option<Result<Event<K>, Error>> {
        match &mut self.phase {
            Phase::Empty => {
                self.phase = Phase::Page {
                    objects: Vec::new().into_iter(),
                    continue_token: None,
                    version: None,
                    ahead: None,
                };
                Some(Ok(Event::Init))
            }
            Phase::Page {
                objects,
                continue_token,
                version,
                ahead,
            } => {
                if let Some(object) = objects.next() {
                    return Some(Ok(Event::InitApply(object)));
                }
                if continue_token.is_none()
                    && let Some(version) = version.take()
                {
                    self.phase = Phase::Listed { version };
                    return Some(Ok(Event::InitDone));
                }
                let asked = match ahead.take() {
                    Some(asked) => asked,
                    None => ask::<K>(&self.client, &self.labels, continue_token.take()),
                };
                self.page_came(list_page::<K>(&self.client, &self.labels, asked).await)
            }
            Phase::Listed { version } => {
                let params = WatchParams {
                    label_selector: Some(self.labels.clone()),
                    timeout: Some(WATCH_TIMEOUT_SECS),
                    bookmarks: true,
                    ..WatchParams::default()
                };
                match self.api.watch(&params, version).await {
                    Ok(stream) => {
                        let version = std::mem::take(version);
                        self.phase = Phase::Watching {
                            version,
                            stream: stream.boxed(),
                        };
                        None
                    }
                    Err(error) => Some(Err(Error::WatchStartFailed(error))),
                }
            }
            Phase::Watching { version, stream } => {
                let idle = std::time::Duration::from_secs(WATCH_TIMEOUT_SECS.into()) + IDLE_MARGIN;
                let event = tokio::time::timeout(idle, stream.next())
                    .await
                    .unwrap_or(None);
                match event {
                    Some(Ok(WatchEvent::Added(object) | WatchEvent::Modified(object))) => {
                        Some(self.seen(object).map(Event::Apply))
                    }
                    Some(Ok(WatchEvent::Deleted(object))) => {
                        Some(self.seen(object).map(Event::Delete))
                    }
                    Some(Ok(WatchEvent::Bookmark(bookmark))) => {
                        *version = bookmark.metadata.resource_version;
                        None
                    }
                    Some(Ok(WatchEvent::Error(status))) => {
                        if status.code == 410 {
                            self.phase = Phase::Empty;
                        }
                        Some(Err(Error::WatchError(status.boxed())))
                    }
                    Some(Err(error)) => Some(Err(Error::WatchFailed(error))),
                    // Ended (its timeout, or idle): watch again from where it was.
                    None => {
                        let version = std::mem::take(version);
                        self.phase = Phase::Listed { version };
                        None
                    }
                }
            }
        }
    }

    /// What a list page that came (or failed) makes of the state.
    fn page_came(
        &mut self,
        page: kube::Result<(ListPage<K>, Option<Asked>)>,
    ) -> Option<Result<Event<K>, Error>> {
        match page {
            Ok((page, _)) if page.resource_version.is_none() && page.continue_token.is_none() => {
                self.phase = Phase::Empty;
                Some(Err(Error::NoResourceVersion))
            }
            Ok((page, ahead)) => {
                self.phase = Phase::Page {
                    objects: page.items.into_iter(),
                    continue_token: page.continue_token,
                    version: page.resource_version,
                    ahead,
                };
                None
            }
            Err(error) => {
                self.phase = Phase::Empty;
                Some(Err(Error::InitialListFailed(error)))
            }
        }
    }

    /// OBJECT came by the watch: its version is where a restarted watch
    /// resumes (none: re-list, as kube-runtime does).
    fn seen(&mut self, object: K) -> Result<K, Error> {
        let Some(seen) = object.resource_version().filter(|v| !v.is_empty()) else {
            self.phase = Phase::Empty;
            return Err(Error::NoResourceVersion);
        };
        if let Phase::Watching { version, .. } = &mut self.phase {
            *version = seen;
        }
        Ok(object)
    }
}

/// A list page asked for: the request runs on a task of its own, so that
/// it goes out and its answer is taken in while the page before is read.
/// Dropped, it is abandoned.
struct Asked {
    /// Where the page starts (`None`: the first page).
    continue_token: Option<String>,
    task: JoinHandle<kube::Result<Fetched>>,
}

impl Drop for Asked {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The parameters of the list with LABELS from `continue_token`.
fn list_params(labels: &str, continue_token: Option<String>) -> ListParams {
    ListParams {
        label_selector: Some(labels.to_owned()),
        limit: Some(PAGE_SIZE),
        continue_token,
        ..ListParams::default()
    }
}

/// Asks for the page of the list of K with LABELS that starts at
/// `continue_token` (the first without one), in protobuf or JSON.
fn ask<K: ProtobufList>(client: &Client, labels: &str, continue_token: Option<String>) -> Asked {
    let client = client.clone();
    let params = list_params(labels, continue_token.clone());
    let task = tokio::spawn(
        async move { fetch(&client, &K::url_path(&(), None), &params, ACCEPTED).await }
            .in_current_span(),
    );
    Asked {
        continue_token,
        task,
    }
}

/// The page ASKED for, read, with its successor already asked for when
/// it is protobuf and not the last. A protobuf page this reader refuses
/// (a string that is not UTF-8, a field of an unexpected type) is asked
/// for again in JSON, which kube-rs reads as it always did: the list goes
/// on (the page after a JSON page is asked for once the JSON is read, as
/// its token is known only then; in protobuf again).
async fn list_page<K: ProtobufList>(
    client: &Client,
    labels: &str,
    mut asked: Asked,
) -> kube::Result<(ListPage<K>, Option<Asked>)> {
    let page = match (&mut asked.task).await {
        Ok(fetched) => fetched?,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        // Cancelled: only the runtime shutting down does that (an `Asked`
        // is aborted only when dropped).
        Err(error) => return Err(kube::Error::Service(error.into())),
    };
    if page.is_protobuf {
        let ahead = match protobuf::continue_token(&page.body) {
            Ok(Some(next)) => {
                let ahead = ask::<K>(client, labels, Some(next));
                // The request goes out through the client's tasks on this
                // thread: let them run before the page is read.
                tokio::task::yield_now().await;
                Some(ahead)
            }
            Ok(None) | Err(_) => None,
        };
        match K::read_page(&page.body) {
            // (The token read ahead is the page's: both readers take the
            // last one sent.)
            Ok(read) => return Ok((read, ahead)),
            Err(error) => {
                drop(ahead);
                let error = with_causes(&error);
                tracing::warn!(
                    resource = %K::kind(&()),
                    %error,
                    "a protobuf list page could not be read; asking for it in JSON"
                );
            }
        }
    }
    let json = if page.is_protobuf {
        let params = list_params(labels, asked.continue_token.take());
        fetch(client, &K::url_path(&(), None), &params, JSON).await?
    } else {
        page
    };
    let list: ObjectList<K> =
        serde_json::from_slice(&json.body).map_err(kube::Error::SerdeError)?;
    let page = ListPage {
        items: list.items,
        resource_version: list.metadata.resource_version.filter(|v| !v.is_empty()),
        continue_token: list.metadata.continue_.filter(|c| !c.is_empty()),
    };
    Ok((page, None))
}

/// A list page's body, and whether it is protobuf.
struct Fetched {
    body: bytes::Bytes,
    is_protobuf: bool,
}

/// GETs the list at URL with PARAMS, accepting ACCEPT; a failure status
/// is an error, as kube-rs makes it.
async fn fetch(
    client: &Client,
    url: &str,
    params: &ListParams,
    accept: &'static str,
) -> kube::Result<Fetched> {
    let mut request = kube::core::Request::new(url)
        .list(params)
        .map_err(kube::Error::BuildRequest)?;
    request
        .headers_mut()
        .insert(ACCEPT, HeaderValue::from_static(accept));
    let response = client.send(request.map(kube::client::Body::from)).await?;
    let status = response.status();
    let is_protobuf = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with(PROTOBUF));
    let body = response.into_body().collect().await?.to_bytes();
    if status.is_client_error() || status.is_server_error() {
        return Err(kube::Error::Api(
            failure(&body, is_protobuf, status.as_u16()).boxed(),
        ));
    }
    Ok(Fetched { body, is_protobuf })
}

/// The `Status` of a failed request's BODY, as kube-rs makes it of a body
/// that is none.
fn failure(body: &[u8], is_protobuf: bool, code: u16) -> Status {
    let read = if is_protobuf {
        protobuf::status(body)
            .ok()
            .map(|status| Status::failure(&status.message, &status.reason).with_code(status.code))
    } else {
        serde_json::from_slice::<Status>(body).ok()
    };
    read.unwrap_or_else(|| {
        let text = String::from_utf8_lossy(body);
        Status::failure(text.trim(), "Failed to parse error data").with_code(code)
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex, PoisonError};
    use std::time::Duration;

    use super::*;
    use crate::model::protobuf::write::Message;

    /// A slice's message named NAME (`None`: a name that is not UTF-8,
    /// which the protobuf reader refuses).
    fn slice(name: Option<&str>) -> Message {
        let meta = match name {
            Some(name) => Message::default().str(1, name),
            None => Message::default().bytes(1, b"\xff"),
        };
        Message::default()
            .message(1, &meta.str(3, "shop"))
            .str(4, "IPv4")
    }

    /// A list page of SLICES, continued at NEXT.
    fn slice_page(slices: &[Message], next: Option<&str>) -> Vec<u8> {
        Message::list(slices, "7", next.unwrap_or(""))
            .enveloped("discovery.k8s.io/v1", "EndpointSliceList")
    }

    fn named(names: &[&str], next: Option<&str>) -> Vec<u8> {
        let slices: Vec<Message> = names.iter().map(|name| slice(Some(name))).collect();
        slice_page(&slices, next)
    }

    /// An answer: status, content type, body.
    type Answer = (u16, &'static str, Vec<u8>);

    /// A client whose API server answers each request (its URI and
    /// `Accept`) with ANSWER, keeping `URI [ACCEPT]` of each.
    fn client_of(
        answer: impl Fn(&str, &str) -> Answer + Send + Sync + 'static,
    ) -> (Client, Arc<Mutex<Vec<String>>>) {
        let asked = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&asked);
        let answer = Arc::new(answer);
        let service = tower::service_fn(move |request: hyper::Request<kube::client::Body>| {
            let uri = request.uri().to_string();
            let accept = request
                .headers()
                .get(ACCEPT)
                .and_then(|value| value.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            log.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(format!("{uri} [{accept}]"));
            let (status, content_type, body) = answer(&uri, &accept);
            async move {
                hyper::Response::builder()
                    .status(status)
                    .header(CONTENT_TYPE, content_type)
                    .body(kube::client::Body::from(body))
            }
        });
        (Client::new(service, "default"), asked)
    }

    /// The page of PAGES whose continue token URI names, in protobuf.
    fn page_for(uri: &str, pages: &[(Option<&str>, Vec<u8>)]) -> Answer {
        let body = pages
            .iter()
            .find(|(token, _)| match token {
                Some(token) => uri.contains(&format!("continue={token}")),
                None => !uri.contains("continue="),
            })
            .map(|(_, body)| body.clone())
            .expect("a page for every token");
        (200, PROTOBUF, body)
    }

    fn name(event: Option<Result<Event<ListedSlice>, Error>>) -> String {
        match event {
            Some(Ok(Event::InitApply(slice))) => slice.metadata.name.unwrap_or_default(),
            other => panic!("expected a listed slice, got {other:?}"),
        }
    }

    fn requests(asked: &Mutex<Vec<String>>) -> Vec<String> {
        asked.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    #[tokio::test]
    async fn the_next_page_is_asked_for_while_this_one_is_read() {
        let pages = [
            (None, named(&["a", "b"], Some("after-b"))),
            (Some("after-b"), named(&["c", "d"], Some("after-d"))),
            (Some("after-d"), named(&["e"], None)),
        ];
        let (client, asked) = client_of(move |uri, _| page_for(uri, &pages));
        let mut events = std::pin::pin!(watcher::<ListedSlice>(client, "app=web".into()));
        assert!(matches!(events.next().await, Some(Ok(Event::Init))));
        assert_eq!(name(events.next().await), "a");
        // The first page is being read (its second slice not yet taken):
        // the second is asked for already, and only it.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while requests(&asked).len() < 2 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let seen = requests(&asked);
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert!(seen[1].contains("continue=after-b"), "{seen:?}");
        assert!(
            seen.iter()
                .all(|line| line.contains("limit=500") && line.ends_with(&format!("[{ACCEPTED}]"))),
            "{seen:?}"
        );
        for expected in ["b", "c", "d", "e"] {
            assert_eq!(name(events.next().await), expected);
        }
        assert!(matches!(events.next().await, Some(Ok(Event::InitDone))));
        let seen = requests(&asked);
        assert_eq!(
            seen.len(),
            3,
            "the last page asks for none after it: {seen:?}"
        );
        assert!(seen[2].contains("continue=after-d"), "{seen:?}");
    }

    #[tokio::test]
    async fn a_page_refused_while_the_next_is_asked_for_is_read_in_json() {
        // The second page's token is readable, one of its slices is not:
        // the page after it, asked for already, is abandoned, the second
        // is asked for again in JSON, and the list goes on from there.
        let pages = [
            (None, named(&["a", "b"], Some("after-b"))),
            (
                Some("after-b"),
                slice_page(&[slice(Some("c")), slice(None)], Some("after-d")),
            ),
            (Some("after-d"), named(&["e"], None)),
        ];
        let items = ["c", "d"].map(|name| {
            serde_json::json!({
                "metadata": {"name": name, "namespace": "shop"},
                "addressType": "IPv4", "endpoints": [],
            })
        });
        let json = serde_json::json!({
            "kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1",
            "metadata": {"resourceVersion": "7", "continue": "after-d"},
            "items": items,
        })
        .to_string();
        let (client, asked) = client_of(move |uri, accept| {
            if accept == JSON {
                assert!(uri.contains("continue=after-b"), "{uri}");
                return (200, "application/json", json.clone().into_bytes());
            }
            page_for(uri, &pages)
        });
        let events = watcher::<ListedSlice>(client, "app=web".into());
        let events: Vec<_> = events.take(7).collect().await;
        let mut events = events.into_iter();
        assert!(matches!(events.next(), Some(Ok(Event::Init))));
        for expected in ["a", "b", "c", "d", "e"] {
            assert_eq!(name(events.next()), expected);
        }
        assert!(matches!(events.next(), Some(Ok(Event::InitDone))));
        let seen = requests(&asked);
        let json_asked = seen
            .iter()
            .filter(|line| line.ends_with(&format!("[{JSON}]")))
            .count();
        assert_eq!(json_asked, 1, "{seen:?}");
        let last = seen.last().expect("requests");
        assert!(
            last.contains("continue=after-d") && last.ends_with(&format!("[{ACCEPTED}]")),
            "the page after the JSON one is asked for in protobuf again: {seen:?}"
        );
    }

    #[tokio::test]
    async fn a_page_that_fails_lists_again_from_the_start() {
        let pages = [
            (None, named(&["a", "b"], Some("after-b"))),
            (Some("after-b"), named(&["c"], None)),
        ];
        let failed = AtomicBool::new(false);
        let (client, _) = client_of(move |uri, _| {
            if uri.contains("continue=after-b") && !failed.swap(true, Ordering::Relaxed) {
                return (500, "text/plain", b"etcd is away".to_vec());
            }
            page_for(uri, &pages)
        });
        let events = watcher::<ListedSlice>(client, "app=web".into());
        let events: Vec<_> = events.take(10).collect().await;
        let mut events = events.into_iter();
        assert!(matches!(events.next(), Some(Ok(Event::Init))));
        // The second page failed while the first was read: the first
        // page's slices, then the error, then a new list from its start.
        assert_eq!(name(events.next()), "a");
        assert_eq!(name(events.next()), "b");
        match events.next() {
            Some(Err(Error::InitialListFailed(error))) => {
                assert!(error.to_string().contains("etcd is away"), "{error}");
            }
            other => panic!("expected the list's error, got {other:?}"),
        }
        assert!(matches!(events.next(), Some(Ok(Event::Init))));
        for expected in ["a", "b", "c"] {
            assert_eq!(name(events.next()), expected);
        }
        assert!(matches!(events.next(), Some(Ok(Event::InitDone))));
    }
}
