//! `healthCheckNodePort` servers for Services with
//! `externalTrafficPolicy: Local`, as kube-proxy serves them
//! (`service_health.go`): HTTP 200 with the number of local endpoints
//! while there are any and the agent is in sync, 503 otherwise, so that
//! load balancers send traffic only to nodes that can serve it. The count
//! is of the family the probe came in on (kube-proxy answers from one
//! proxier per family) and is also sent as the
//! `X-Load-Balancing-Endpoint-Weight` header.

use std::{
    collections::BTreeMap,
    net::{Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hyper::{Response, StatusCode, header, service::service_fn};
use tokio::{net::TcpListener, task::JoinHandle};

use super::node_health::ProxyHealth;
use super::{Body, connection, text_response};
use crate::{agent::lock, model::HealthCheck};

/// What one port answers.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Answer {
    namespace: String,
    name: String,
    /// IPv4, IPv6.
    local_endpoints: [usize; 2],
}

/// The running health-check listeners, one per port.
#[derive(Default)]
pub struct HealthServers {
    answers: Arc<Mutex<BTreeMap<u16, Answer>>>,
    listeners: BTreeMap<u16, JoinHandle<()>>,
    /// The agent's health (`serviceProxyHealthy`), shared with the node
    /// health server.
    proxy: Arc<Mutex<ProxyHealth>>,
}

impl HealthServers {
    /// The proxy health these answers report; the agent's loop records
    /// into it, the node health server reads it.
    #[must_use]
    pub fn proxy_health(&self) -> Arc<Mutex<ProxyHealth>> {
        Arc::clone(&self.proxy)
    }

    /// Serves exactly `checks`: opens listeners for new ports, closes those
    /// no longer wanted, and updates the answers of the others.
    pub fn update(&mut self, checks: &[HealthCheck]) {
        let wanted: BTreeMap<u16, Answer> = checks
            .iter()
            .map(|check| {
                (
                    check.port,
                    Answer {
                        namespace: check.service.namespace.to_string(),
                        name: check.service.name.to_string(),
                        local_endpoints: check.local_endpoints,
                    },
                )
            })
            .collect();
        *self
            .answers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = wanted.clone();
        self.listeners.retain(|port, task| {
            let keep = wanted.contains_key(port);
            if !keep {
                task.abort();
                tracing::info!(port, "health check port closed");
            }
            keep
        });
        for port in wanted.keys() {
            if self.listeners.contains_key(port) {
                continue;
            }
            // One dual-stack socket on every address of the node.
            let addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, *port));
            match std::net::TcpListener::bind(addr).and_then(|listener| {
                listener.set_nonblocking(true)?;
                TcpListener::from_std(listener)
            }) {
                Ok(listener) => {
                    tracing::info!(port, "serving health check");
                    let answers = Arc::clone(&self.answers);
                    let proxy = Arc::clone(&self.proxy);
                    let port = *port;
                    self.listeners
                        .insert(port, tokio::spawn(serve(listener, port, answers, proxy)));
                }
                Err(error) => tracing::error!(port, %error, "cannot serve health check"),
            }
        }
    }
}

impl Drop for HealthServers {
    fn drop(&mut self) {
        for task in self.listeners.values() {
            task.abort();
        }
    }
}

async fn serve(
    listener: TcpListener,
    port: u16,
    answers: Arc<Mutex<BTreeMap<u16, Answer>>>,
    proxy: Arc<Mutex<ProxyHealth>>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let answer = lock(&answers).get(&port).cloned();
        let proxy_healthy = lock(&proxy).healthy(Instant::now());
        // The family the probe came in on (an IPv4 one arrives mapped on
        // the dual-stack socket).
        let ipv4 = stream.local_addr().is_ok_and(|local| match local {
            SocketAddr::V4(_) => true,
            SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped().is_some(),
        });
        // Any method and path get the answer, as kube-proxy's do.
        let service = service_fn(move |_request| {
            let response = respond(answer.as_ref(), ipv4, proxy_healthy);
            async move { Ok::<_, std::convert::Infallible>(response) }
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

/// The response status, body and endpoint weight, as kube-proxy writes
/// them, for a probe on `ipv4` (else IPv6).
fn response(
    answer: Option<&Answer>,
    ipv4: bool,
    proxy_healthy: bool,
) -> (StatusCode, String, usize) {
    let Some(answer) = answer else {
        return (StatusCode::SERVICE_UNAVAILABLE, "{}".to_owned(), 0);
    };
    let count = answer.local_endpoints[usize::from(!ipv4)];
    let body = serde_json::json!({
        "service": { "namespace": answer.namespace, "name": answer.name },
        "localEndpoints": count,
        "serviceProxyHealthy": proxy_healthy,
    })
    .to_string();
    let status = if count > 0 && proxy_healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body, count)
}

fn respond(answer: Option<&Answer>, ipv4: bool, proxy_healthy: bool) -> Response<Body> {
    let (status, body, weight) = response(answer, ipv4, proxy_healthy);
    let mut response = text_response(status, "application/json", body);
    let headers = response.headers_mut();
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        "X-Load-Balancing-Endpoint-Weight",
        header::HeaderValue::from(weight),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ok_with_local_endpoints_of_the_family_unavailable_without() {
        let mut answer = Answer {
            namespace: "shop".into(),
            name: "web".into(),
            local_endpoints: [2, 0],
        };
        let (status, body, weight) = response(Some(&answer), true, true);
        assert_eq!((status, weight), (StatusCode::OK, 2));
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["localEndpoints"], 2);
        assert_eq!(json["service"]["name"], "web");
        assert_eq!(json["serviceProxyHealthy"], true);
        // The IPv6 proxier of this node has none.
        let (status, _, weight) = response(Some(&answer), false, true);
        assert_eq!((status, weight), (StatusCode::SERVICE_UNAVAILABLE, 0));
        answer.local_endpoints = [0, 0];
        assert_eq!(
            response(Some(&answer), true, true).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            response(None, true, true).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn an_agent_out_of_sync_is_unhealthy_whatever_the_endpoints() {
        let answer = Answer {
            namespace: "shop".into(),
            name: "web".into(),
            local_endpoints: [1, 1],
        };
        let (status, body, weight) = response(Some(&answer), false, false);
        assert_eq!((status, weight), (StatusCode::SERVICE_UNAVAILABLE, 1));
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["serviceProxyHealthy"], false);
        let response = respond(Some(&answer), true, true);
        assert_eq!(response.headers()["X-Load-Balancing-Endpoint-Weight"], "1");
    }
}
