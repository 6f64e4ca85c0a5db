//! The admin listener: readiness, Prometheus metrics, the resolved config,
//! the shadow-analysis report (JSON) and the dashboard. Served on its own
//! port (loopback by default), never on the proxy listeners.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::debug;

use crate::server::Shared;

/// The dashboard page, embedded so the admin port needs no network.
const DASHBOARD: &str = include_str!("admin/dashboard.html");

pub async fn serve(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(_) => continue,
            },
            _ = stop.changed() => return,
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(route(&shared, request).await) }
            });
            let result = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(error) = result {
                debug!(%error, "admin connection error");
            }
        });
    }
}

async fn route(shared: &Shared, request: Request<Incoming>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    match request.uri().path() {
        "/ready" => {
            if shared.ready.load(Ordering::Acquire) {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        "/metrics" => {
            if let Some(analyzer) = &shared.proxy.analyzer {
                analyzer.update_verdicts();
            }
            let mut body = String::new();
            match prometheus_client::encoding::text::encode(&mut body, &shared.registry) {
                Ok(()) => with_type(
                    StatusCode::OK,
                    body,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
                Err(_) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "metrics encoding failed\n",
                ),
            }
        }
        "/config_dump" => {
            let table = shared.proxy.table();
            let mut value = serde_json::to_value(&*table.config).unwrap_or_default();
            redact(&mut value);
            json(&value)
        }
        "/shadow/report" => match &shared.proxy.analyzer {
            Some(analyzer) => json(&serde_json::to_value(analyzer.report()).unwrap_or_default()),
            None => json(&serde_json::json!({ "routes": [] })),
        },
        "/" | "/dashboard" => with_type(
            StatusCode::OK,
            DASHBOARD.to_string(),
            "text/html; charset=utf-8",
        ),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Header values that may carry credentials never leave the process.
fn redact(value: &mut serde_json::Value) {
    const SENSITIVE: [&str; 6] = [
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "x-api-key",
        "x-auth-token",
    ];
    match value {
        serde_json::Value::Array(items) => {
            // Header rules serialize as [name, value] pairs.
            if let [serde_json::Value::String(name), serde_json::Value::String(secret)] =
                items.as_mut_slice()
            {
                if SENSITIVE.contains(&name.to_ascii_lowercase().as_str()) {
                    *secret = "[redacted]".into();
                }
                return;
            }
            items.iter_mut().for_each(redact);
        }
        serde_json::Value::Object(map) => map.values_mut().for_each(redact),
        _ => {}
    }
}

fn json(value: &serde_json::Value) -> Response<Full<Bytes>> {
    let body = serde_json::to_string_pretty(value).unwrap_or_default();
    with_type(StatusCode::OK, body, "application/json")
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    with_type(status, body.to_string(), "text/plain")
}

fn with_type(
    status: StatusCode,
    body: String,
    content_type: &'static str,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_credential_headers_only() {
        let mut value = serde_json::json!({
            "set": [["authorization", "Bearer s3cret"], ["x-env", "prod"]],
        });
        redact(&mut value);
        assert_eq!(value["set"][0][1], "[redacted]");
        assert_eq!(value["set"][1][1], "prod");
    }
}
