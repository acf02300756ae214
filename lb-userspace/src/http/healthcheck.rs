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

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

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
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), respond(stream, answer)).await;
        });
    }
}

/// The response body and status, as kube-proxy writes them.
fn response(answer: Option<&Answer>) -> (&'static str, String) {
    let Some(answer) = answer else {
        return ("503 Service Unavailable", "{}".to_owned());
    };
    let body = serde_json::json!({
        "service": { "namespace": answer.namespace, "name": answer.name },
        "localEndpoints": answer.local_endpoints,
        "serviceProxyHealthy": true,
    })
    .to_string();
    let status = if answer.local_endpoints > 0 {
        "200 OK"
    } else {
        "503 Service Unavailable"
    };
    (status, body)
}

async fn respond(mut stream: TcpStream, answer: Option<Answer>) -> std::io::Result<()> {
    let mut buf = [0u8; 2048];
    let mut len = 0;
    while len < buf.len() && !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            break;
        }
        len += n;
    }
    let (status, body) = response(answer.as_ref());
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(reply.as_bytes()).await?;
    stream.shutdown().await
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
        assert_eq!(status, "200 OK");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["localEndpoints"], 2);
        assert_eq!(json["service"]["name"], "web");
        answer.local_endpoints = 0;
        assert_eq!(response(Some(&answer)).0, "503 Service Unavailable");
        assert_eq!(response(None).0, "503 Service Unavailable");
    }
}
