//! What the agent serves over HTTP: its own `/healthz`, `/readyz` and
//! `/metrics`, kube-proxy's node health server (`/healthz`, `/livez`), and
//! a `healthCheckNodePort` listener per Service that asks for one.

pub mod healthcheck;
mod metrics;
pub mod node_health;
mod server;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode, header};

pub use metrics::Histogram;
pub use server::serve;

/// Every response is one complete body.
type Body = Full<Bytes>;

/// HTTP/1.x connections as both servers want them: one response per
/// connection (`Connection: close`), headers in the usual capitalisation.
fn connection() -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.keep_alive(false).title_case_headers(true);
    builder
}

/// A response with `body`, its type and its length (also for `HEAD`, whose
/// body hyper leaves out).
fn text_response(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let length = body.len();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    headers.insert(header::CONTENT_LENGTH, header::HeaderValue::from(length));
    response
}
