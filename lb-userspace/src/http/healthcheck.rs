//! `healthCheckNodePort` servers for Services with
//! `externalTrafficPolicy: Local`, as kube-proxy serves them: HTTP 200 with
//! the number of local endpoints while there are any, 503 otherwise, so
//! that load balancers send traffic only to nodes that can serve it.

use std::{
    collections::BTreeMap,
    net::{Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use hyper::{Response, StatusCode, header, service::service_fn};
use tokio::{net::TcpListener, task::JoinHandle};

use super::{Body, connection, text_response};
use crate::model::HealthCheck;

/// What one port answers.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Answer {
    namespace: String,
    name: String,
    local_endpoints: usize,
}

/// The running health-check listeners, one per port.
#[derive(Default)]
pub struct HealthServers {
    answers: Arc<Mutex<BTreeMap<u16, Answer>>>,
    listeners: BTreeMap<u16, JoinHandle<()>>,
}

impl HealthServers {
    /// Serves exactly `checks`: opens listeners for new ports, closes those
    /// no longer wanted, and updates the answers of the others.
    pub fn update(&mut self, checks: &[HealthCheck]) {
        let wanted: BTreeMap<u16, Answer> = checks
            .iter()
            .map(|check| {
                (
                    check.port,
                    Answer {
                        namespace: check.service.namespace.clone(),
                        name: check.service.name.clone(),
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
                    let port = *port;
                    self.listeners
                        .insert(port, tokio::spawn(serve(listener, port, answers)));
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

async fn serve(listener: TcpListener, port: u16, answers: Arc<Mutex<BTreeMap<u16, Answer>>>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let answer = answers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&port)
            .cloned();
        // Any method and path get the answer, as kube-proxy's do.
        let service = service_fn(move |_request| {
            let response = respond(answer.as_ref());
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

/// The response body and status, as kube-proxy writes them.
fn response(answer: Option<&Answer>) -> (StatusCode, String) {
    let Some(answer) = answer else {
        return (StatusCode::SERVICE_UNAVAILABLE, "{}".to_owned());
    };
    let body = serde_json::json!({
        "service": { "namespace": answer.namespace, "name": answer.name },
        "localEndpoints": answer.local_endpoints,
        "serviceProxyHealthy": true,
    })
    .to_string();
    let status = if answer.local_endpoints > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body)
}

fn respond(answer: Option<&Answer>) -> Response<Body> {
    let (status, body) = response(answer);
    let mut response = text_response(status, "application/json", body);
    response.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ok_with_local_endpoints_unavailable_without() {
        let mut answer = Answer {
            namespace: "shop".into(),
            name: "web".into(),
            local_endpoints: 2,
        };
        let (status, body) = response(Some(&answer));
        assert_eq!(status, StatusCode::OK);
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["localEndpoints"], 2);
        assert_eq!(json["service"]["name"], "web");
        answer.local_endpoints = 0;
        assert_eq!(response(Some(&answer)).0, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response(None).0, StatusCode::SERVICE_UNAVAILABLE);
    }
}
