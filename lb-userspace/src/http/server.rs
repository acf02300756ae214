//! The agent's HTTP server: `/healthz`, `/readyz` and `/metrics` over
//! HTTP/1.x (hyper). Three GET routes, one response per connection.

use std::{
    convert::Infallible,
    sync::{Arc, Mutex},
    time::Duration,
};

use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use tokio::net::TcpListener;

use super::metrics::{CONTENT_TYPE, metrics};
use super::{Body, connection, text_response};
use crate::agent::{Shared, lock};

/// Serves until the process ends.
pub async fn serve(listener: TcpListener, shared: Arc<Mutex<Shared>>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let shared = Arc::clone(&shared);
                let service = service_fn(move |request: Request<Incoming>| {
                    let shared = Arc::clone(&shared);
                    async move { Ok::<_, Infallible>(handle(&request, &shared).await) }
                });
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(5),
                        connection()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                    )
                    .await;
                });
            }
            Err(error) => {
                tracing::warn!(%error, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle(request: &Request<Incoming>, shared: &Mutex<Shared>) -> Response<Body> {
    let method = request.method();
    if method != Method::GET && method != Method::HEAD {
        return text_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".to_owned(),
        );
    }
    let (status, content_type, body) = if request.uri().path() == "/metrics" {
        (StatusCode::OK, CONTENT_TYPE, metrics(shared).await)
    } else {
        route(request.uri().path(), &lock(shared))
    };
    text_response(status, content_type, body)
}

fn route(path: &str, shared: &Shared) -> (StatusCode, &'static str, String) {
    match path {
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        "/readyz" if shared.ready => (StatusCode::OK, "text/plain", "ready\n".to_owned()),
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            format!("not ready: {}\n", shared.not_ready_reason),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
    }
}
