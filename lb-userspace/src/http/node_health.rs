//! kube-proxy's node health server: `/healthz` and `/livez` on
//! `--healthz-bind-address` (default `0.0.0.0:10256`), which cloud load
//! balancers probe for `externalTrafficPolicy: Cluster` Services, and the
//! proxy health the `healthCheckNodePort` answers report as
//! `serviceProxyHealthy` (`pkg/proxy/healthcheck/proxy_health.go`).
//!
//! Healthy while every update the source gave is in the maps, or the
//! oldest one still pending is younger than [`HEALTH_TIMEOUT`]; `/healthz`
//! is also 503 while the Node is being deleted or carries the cluster
//! autoscaler's `ToBeDeletedByClusterAutoscaler` taint, so that load
//! balancers drain the node before it goes.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use hyper::{Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use k8s_openapi::api::core::v1::Node;
use tokio::net::TcpListener;

use super::{Body, connection, text_response};
use crate::agent::lock;

/// kube-proxy's default: twice its default sync period (30 s).
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(60);
/// The taint the cluster autoscaler puts on a node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// The proxy's health as the agent's loop records it.
#[derive(Debug)]
pub struct ProxyHealth {
    /// When the oldest source update not yet in the maps arrived; `None`:
    /// in sync (or nothing received yet: healthy while starting up).
    pending_since: Option<Instant>,
    /// When the maps last caught up with the source.
    last_updated: Option<SystemTime>,
    /// Neither being deleted nor tainted for deletion (no Node: eligible).
    node_eligible: bool,
}

impl Default for ProxyHealth {
    fn default() -> Self {
        Self {
            pending_since: None,
            last_updated: None,
            node_eligible: true,
        }
    }
}

impl ProxyHealth {
    /// The source gave an update (kube-proxy's `QueuedUpdate`).
    pub fn queued(&mut self, now: Instant) {
        self.pending_since.get_or_insert(now);
    }

    /// Everything the source gave is in the maps (kube-proxy's `Updated`).
    pub fn updated(&mut self, now: SystemTime) {
        self.pending_since = None;
        self.last_updated = Some(now);
    }

    /// Follows this agent's Node object; `follows_node`: the source
    /// watches it (kube), so its absence means it is gone or not yet seen.
    pub fn set_node(&mut self, node: Option<&Node>, follows_node: bool) {
        self.node_eligible = node_eligible(node, follows_node);
    }

    /// In sync, or not late yet.
    #[must_use]
    pub fn healthy(&self, now: Instant) -> bool {
        self.pending_since
            .is_none_or(|since| now.saturating_duration_since(since) < HEALTH_TIMEOUT)
    }
}

/// Not being deleted and not tainted by the cluster autoscaler for
/// deletion (kube-proxy's `NodeEligible`). Without a Node object: not
/// eligible where the source follows it (kube: deleted, or not seen yet,
/// as kube-proxy), eligible where there is none to follow (files).
#[must_use]
pub fn node_eligible(node: Option<&Node>, follows_node: bool) -> bool {
    let Some(node) = node else {
        return !follows_node;
    };
    node.metadata.deletion_timestamp.is_none()
        && !node
            .spec
            .as_ref()
            .and_then(|spec| spec.taints.as_deref())
            .unwrap_or_default()
            .iter()
            .any(|taint| taint.key == TO_BE_DELETED_TAINT)
}

/// How often a taken address is tried again.
const BIND_RETRY: Duration = Duration::from_secs(5);

/// Binds `addr` as kube-proxy does: an IPv4 wildcard (its default,
/// `0.0.0.0`) listens on both families, as Go's listener does (IPv4 only
/// where the kernel has no IPv6).
///
/// # Errors
/// The address cannot be bound.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let listener = match addr {
        SocketAddr::V4(v4) if v4.ip().is_unspecified() => {
            std::net::TcpListener::bind((std::net::Ipv6Addr::UNSPECIFIED, v4.port()))
                .or_else(|_| std::net::TcpListener::bind(addr))?
        }
        other => std::net::TcpListener::bind(other)?,
    };
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

/// Serves `/healthz` and `/livez` on `addr` until the process ends. An
/// address already taken (kube-proxy still running beside the agent
/// during an install) is logged once and tried again every few seconds,
/// so that the agent takes over once kube-proxy is gone.
pub async fn run(addr: SocketAddr, health: Arc<Mutex<ProxyHealth>>) {
    let mut logged = false;
    let listener = loop {
        match bind(addr) {
            Ok(listener) => break listener,
            Err(error) => {
                if !logged {
                    tracing::warn!(%addr, %error, "cannot serve the node health check (/healthz, /livez) yet; retrying");
                    logged = true;
                }
                tokio::time::sleep(BIND_RETRY).await;
            }
        }
    };
    if logged {
        tracing::info!(%addr, "serving the node health check");
    }
    serve(listener, health).await;
}

/// Serves `/healthz` and `/livez` until the process ends.
async fn serve(listener: TcpListener, health: Arc<Mutex<ProxyHealth>>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let health = Arc::clone(&health);
        let service = service_fn(move |request: Request<Incoming>| {
            let response = respond(request.uri().path(), &lock(&health));
            async move { Ok::<_, Infallible>(response) }
        });
        tokio::spawn(async move {
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                connection().serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            )
            .await;
        });
    }
}

fn respond(path: &str, health: &ProxyHealth) -> Response<Body> {
    let (status, body) = match path {
        "/healthz" => answer(health, Instant::now(), SystemTime::now(), true),
        "/livez" => answer(health, Instant::now(), SystemTime::now(), false),
        _ => {
            return text_response(StatusCode::NOT_FOUND, "text/plain", "not found\n".into());
        }
    };
    let mut response = text_response(status, "application/json", body);
    response.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    response
}

/// kube-proxy's answer: `/healthz` (`with_node`) adds the node's
/// eligibility to the proxy's health; `lastUpdated` is the current time
/// while healthy, as kube-proxy keeps it for older clients.
fn answer(
    health: &ProxyHealth,
    now: Instant,
    wall: SystemTime,
    with_node: bool,
) -> (StatusCode, String) {
    let proxy_healthy = health.healthy(now);
    let healthy = proxy_healthy && (!with_node || health.node_eligible);
    let last_updated = if healthy {
        Some(wall)
    } else {
        health.last_updated
    };
    let mut body = serde_json::json!({
        "lastUpdated": last_updated.map_or_else(String::new, rfc3339),
        "currentTime": rfc3339(wall),
        "healthy": proxy_healthy,
    });
    if with_node {
        body["nodeEligible"] = health.node_eligible.into();
    }
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body.to_string())
}

fn rfc3339(time: SystemTime) -> String {
    k8s_openapi::jiff::Timestamp::try_from(time).map_or_else(|_| String::new(), |t| t.to_string())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{NodeSpec, Taint};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;

    fn json(body: &str) -> serde_json::Value {
        serde_json::from_str(body).unwrap()
    }

    #[test]
    fn healthy_while_starting_in_sync_or_not_late_yet() {
        let start = Instant::now();
        let wall = SystemTime::now();
        let mut health = ProxyHealth::default();
        assert_eq!(answer(&health, start, wall, true).0, StatusCode::OK);
        health.queued(start);
        // A second update does not move the oldest pending one.
        health.queued(start + Duration::from_secs(30));
        let late = start + HEALTH_TIMEOUT;
        assert!(health.healthy(start + Duration::from_secs(59)));
        let (status, body) = answer(&health, late, wall, false);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(json(&body)["healthy"], false);
        assert_eq!(json(&body)["lastUpdated"], "", "never updated");
        health.updated(wall);
        let (status, body) = answer(&health, late, wall, true);
        assert_eq!(status, StatusCode::OK);
        assert_eq!(json(&body)["nodeEligible"], true);
        assert!(json(&body).get("healthy").is_some());
    }

    /// kube-proxy holds the port while both run side by side: the agent
    /// serves it once kube-proxy lets go (loopback only).
    #[tokio::test]
    async fn a_taken_address_is_served_once_it_is_free() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = squatter.local_addr().unwrap();
        let task = tokio::spawn(run(addr, Arc::new(Mutex::new(ProxyHealth::default()))));
        tokio::time::sleep(Duration::from_millis(200)).await;
        drop(squatter);
        let deadline = Instant::now() + BIND_RETRY + Duration::from_secs(3);
        let response = loop {
            if let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await {
                stream
                    .write_all(b"GET /livez HTTP/1.0\r\n\r\n")
                    .await
                    .unwrap();
                let mut text = String::new();
                stream.read_to_string(&mut text).await.unwrap();
                break text;
            }
            assert!(Instant::now() < deadline, "{addr} never served");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        task.abort();
        assert!(response.starts_with("HTTP/1.0 200"), "{response}");
        assert!(response.contains("\"healthy\":true"), "{response}");
    }

    #[test]
    fn healthz_fails_for_a_node_going_away_livez_does_not() {
        let tainted = Node {
            spec: Some(NodeSpec {
                taints: Some(vec![Taint {
                    key: TO_BE_DELETED_TAINT.into(),
                    effect: "NoSchedule".into(),
                    ..Taint::default()
                }]),
                ..NodeSpec::default()
            }),
            ..Node::default()
        };
        let mut deleting = Node::default();
        deleting.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        let other_taint = Node {
            spec: Some(NodeSpec {
                taints: Some(vec![Taint {
                    key: "node.kubernetes.io/unschedulable".into(),
                    effect: "NoSchedule".into(),
                    ..Taint::default()
                }]),
                ..NodeSpec::default()
            }),
            ..Node::default()
        };
        let (now, wall) = (Instant::now(), SystemTime::now());
        for (node, follows_node, eligible) in [
            (None, false, true),
            (None, true, false),
            (Some(&Node::default()), true, true),
            (Some(&other_taint), true, true),
            (Some(&tainted), true, false),
            (Some(&deleting), true, false),
        ] {
            let mut health = ProxyHealth::default();
            health.set_node(node, follows_node);
            let (status, body) = answer(&health, now, wall, true);
            assert_eq!(status == StatusCode::OK, eligible, "{node:?}");
            assert_eq!(json(&body)["nodeEligible"], eligible);
            // /livez is the proxy alone.
            let (status, body) = answer(&health, now, wall, false);
            assert_eq!(status, StatusCode::OK);
            assert!(json(&body).get("nodeEligible").is_none());
        }
    }
}
