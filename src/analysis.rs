//! Shadow analysis: compares each shadow response with its primary response
//! (status, headers, JSON-aware body), filters noise, aggregates per route and
//! endpoint, and gives a PROMOTE / HOLD / REJECT verdict.
//!
//! The proxy and mirror modules only build [`Sample`]s and hand them to
//! [`Analyzer::submit`], which never blocks: comparison runs on a bounded
//! worker queue off the hot path.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};

/// One response as captured off the stream: the body is a prefix of at most
/// the configured capture cap.
#[derive(Debug, Clone)]
pub struct Captured {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// The first `max_capture_bytes` of the body (still content-encoded).
    pub body: Bytes,
    /// The whole body's length as it streamed past.
    pub body_len: u64,
    /// True when `body` is only a prefix.
    pub truncated: bool,
    /// From sending the request to the end of the response body.
    pub latency: Duration,
}

/// How one side of a comparison ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    Response(Captured),
    /// Could not connect (refused, DNS, no endpoint).
    ConnectFailure,
    Timeout,
    /// Reset, protocol error, or a body that broke off.
    Failed(String),
}

/// A primary/shadow pair for one request, joined by request id.
#[derive(Debug, Clone)]
pub struct Sample {
    pub virtual_service: Arc<str>,
    pub route: Arc<str>,
    pub host: String,
    pub method: Method,
    /// Path without the query string.
    pub path: String,
    pub request_id: String,
    /// Hash of method, full URI and request body: equal fingerprints are
    /// identical requests, which is what learned noise relies on.
    pub request_fingerprint: u64,
    pub primary: Outcome,
    pub shadow: Outcome,
    /// The baseline mirror's outcome when `ShadowAnalysis.baseline` is set.
    pub baseline: Option<Outcome>,
}

// TEMPORARY: replaced by the analysis branch's engine at merge.
pub struct Analyzer;
impl Analyzer {
    pub fn set_settings(
        &self,
        _settings: std::collections::BTreeMap<String, crate::config::model::AnalysisSettings>,
    ) {
    }
    pub fn submit(&self, _sample: Sample) {}
}
impl Analyzer {
    pub fn flush(&self) {}
    pub fn report(&self) -> serde_json::Value {
        serde_json::json!({"routes": []})
    }
}
impl Analyzer {
    pub fn start(
        _db: Option<&std::path::Path>,
        _registry: &mut prometheus_client::registry::Registry,
    ) -> anyhow::Result<Arc<Analyzer>> {
        Ok(Arc::new(Analyzer))
    }
}
#[derive(clap::Args)]
pub struct ReportArgs {}
pub async fn report_cli(_args: ReportArgs) -> anyhow::Result<()> {
    Ok(())
}
