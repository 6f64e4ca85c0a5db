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

/// What a redacted value reads as.
const REDACTED: &str = "[redacted]";

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
        // RFC 9110 §15.5.6: a 405 says which methods are allowed.
        let mut refused = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        refused
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return refused;
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

/// Values that may carry credentials never leave the process: what header
/// rules set or add, and what header and query parameter matches compare
/// with, under a name that carries credentials. A match keeps its kind
/// (`{"Exact": "[redacted]"}`), so the dump still shows how a route matches.
fn redact(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Array(items) => items.iter_mut().for_each(redact),
        serde_json::Value::Object(map) => {
            for (field, child) in map.iter_mut() {
                match (field.as_str(), child) {
                    // Header rules and a match's conditions serialize as
                    // [name, value] pairs; a rule's `headers` is an object.
                    ("set" | "add", serde_json::Value::Array(pairs)) => {
                        pairs.iter_mut().for_each(|pair| redact_pair(pair, false));
                    }
                    (
                        "headers" | "without_headers" | "query_params",
                        serde_json::Value::Array(pairs),
                    ) => pairs.iter_mut().for_each(|pair| redact_pair(pair, true)),
                    (_, child) => redact(child),
                }
            }
        }
        _ => {}
    }
}

/// Hides the value of a `[name, value]` pair whose name carries credentials:
/// a header rule's string, or (for a `matcher`) the one inside its kind.
fn redact_pair(pair: &mut serde_json::Value, matcher: bool) {
    let serde_json::Value::Array(items) = pair else {
        return;
    };
    let [serde_json::Value::String(name), value] = items.as_mut_slice() else {
        return;
    };
    if !is_credential(name) {
        return;
    }
    let hidden = match value {
        // `{"Exact": ...}`, `{"Prefix": ...}`, `{"Regex": ...}`; a presence
        // match (`"Present"`) compares with no value.
        serde_json::Value::Object(kind) if matcher => kind.values_mut().next(),
        serde_json::Value::String(_) if !matcher => Some(value),
        _ => None,
    };
    if let Some(hidden) = hidden {
        *hidden = REDACTED.into();
    }
}

/// Header or query parameter names whose values are credentials: the usual
/// headers, and any name with a credential word in it (`x-internal-token`,
/// `access_token`, `api_key`), as the cost of hiding a harmless value is
/// far lower than that of leaking a secret.
fn is_credential(name: &str) -> bool {
    const NAMES: [&str; 6] = [
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "auth",
        "key",
    ];
    const WORDS: [&str; 10] = [
        "authoriz",
        "authenticat",
        "token",
        "secret",
        "passw",
        "cookie",
        "session",
        "api-key",
        "apikey",
        "signature",
    ];
    let name = name.to_ascii_lowercase().replace('_', "-");
    NAMES.contains(&name.as_str()) || WORDS.iter().any(|word| name.contains(word))
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

    #[test]
    fn redacts_match_values_keeping_their_kind() {
        let mut value = serde_json::json!({"matches": [{
            "uri": {"Exact": "/login"},
            "headers": [
                ["authorization", {"Regex": "^(?:Bearer .*)$"}],
                ["x-internal-token", "Present"],
                ["x-env", {"Exact": "prod"}],
            ],
            "without_headers": [["cookie", {"Prefix": "session="}]],
            "query_params": [["access_token", {"Exact": "abc"}], ["page", {"Exact": "2"}]],
        }]});
        redact(&mut value);
        let route = &value["matches"][0];
        assert_eq!(route["uri"]["Exact"], "/login");
        assert_eq!(route["headers"][0][1]["Regex"], "[redacted]");
        assert_eq!(route["headers"][1][1], "Present");
        assert_eq!(route["headers"][2][1]["Exact"], "prod");
        assert_eq!(route["without_headers"][0][1]["Prefix"], "[redacted]");
        assert_eq!(route["query_params"][0][1]["Exact"], "[redacted]");
        assert_eq!(route["query_params"][1][1]["Exact"], "2");
    }

    #[test]
    fn credential_names() {
        for name in [
            "Authorization",
            "X-API-Key",
            "x-auth-token",
            "api_key",
            "X-Amz-Security-Token",
            "sessionid",
            "key",
        ] {
            assert!(is_credential(name), "{name}");
        }
        for name in ["x-env", "user-agent", "page", "monkey", "author"] {
            assert!(!is_credential(name), "{name}");
        }
    }
}
