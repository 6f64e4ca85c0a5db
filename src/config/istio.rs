//! A faithful serde model of the Istio resources umbra reads, spelled as
//! Istio spells them (camelCase). Fields umbra does not implement are left
//! out on purpose: the loader reports each one it meets as a warning with
//! its YAML path, so nothing is ignored silently.
//!
//! Values whose position matters for an error message are `Spanned`.

use std::collections::{BTreeMap, HashMap};

use marked_yaml::Spanned;
use serde::{Deserialize, Serialize};

pub type S<T> = Spanned<T>;

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VirtualService {
    #[serde(default)]
    pub hosts: Option<S<Vec<S<String>>>>,
    #[serde(default)]
    pub gateways: Vec<S<String>>,
    #[serde(default)]
    pub http: Vec<S<HttpRoute>>,
    /// Visibility across namespaces: meaningless outside a mesh.
    #[serde(default)]
    pub export_to: Vec<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRoute {
    pub name: Option<S<String>>,
    #[serde(rename = "match", default)]
    pub matches: Vec<S<HttpMatchRequest>>,
    #[serde(default)]
    pub route: Option<S<Vec<S<HttpRouteDestination>>>>,
    pub timeout: Option<S<String>>,
    pub retries: Option<S<HttpRetry>>,
    pub rewrite: Option<S<HttpRewrite>>,
    pub headers: Option<Headers>,
    pub mirror: Option<S<Destination>>,
    pub mirror_percentage: Option<S<Percent>>,
    /// The deprecated integer form, as Istio still accepts it, in either
    /// spelling (apart, so a warning names the one written).
    #[serde(rename = "mirror_percent")]
    pub mirror_percent: Option<S<u32>>,
    #[serde(rename = "mirrorPercent")]
    pub mirror_percent_camel: Option<S<u32>>,
    pub mirrors: Option<S<Vec<S<HttpMirrorPolicy>>>>,
    pub fault: Option<S<HttpFaultInjection>>,
    pub redirect: Option<S<HttpRedirect>>,
    pub direct_response: Option<S<HttpDirectResponse>>,
    pub cors_policy: Option<S<CorsPolicy>>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CorsPolicy {
    pub allow_origins: Option<Vec<S<StringMatch>>>,
    /// Deprecated in Istio: exact origins.
    pub allow_origin: Option<Vec<S<String>>>,
    pub allow_methods: Option<Vec<S<String>>>,
    pub allow_headers: Option<Vec<S<String>>>,
    pub expose_headers: Option<Vec<S<String>>>,
    pub max_age: Option<S<String>>,
    pub allow_credentials: Option<S<bool>>,
    pub unmatched_preflights: Option<S<String>>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRedirect {
    pub uri: Option<S<String>>,
    pub authority: Option<S<String>>,
    pub port: Option<S<i64>>,
    pub derive_port: Option<S<String>>,
    pub scheme: Option<S<String>>,
    pub redirect_code: Option<S<i64>>,
}

#[derive(Debug, Deserialize, Serialize)]
pub struct HttpDirectResponse {
    pub status: Option<S<i64>>,
    pub body: Option<S<HttpBody>>,
}

#[derive(Debug, Deserialize, Serialize)]
pub struct HttpBody {
    pub string: Option<S<String>>,
    pub bytes: Option<S<String>>,
}

#[derive(Debug, Deserialize, Serialize)]
pub struct HttpFaultInjection {
    pub delay: Option<S<FaultDelay>>,
    pub abort: Option<S<FaultAbort>>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultDelay {
    pub fixed_delay: Option<S<String>>,
    pub percentage: Option<S<Percent>>,
    /// The deprecated integer form.
    pub percent: Option<S<u32>>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultAbort {
    pub http_status: Option<S<i64>>,
    pub grpc_status: Option<S<String>>,
    pub percentage: Option<S<Percent>>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpMatchRequest {
    pub name: Option<String>,
    pub uri: Option<S<StringMatch>>,
    pub method: Option<S<StringMatch>>,
    pub authority: Option<S<StringMatch>>,
    #[serde(default)]
    pub headers: HashMap<S<String>, S<StringMatch>>,
    #[serde(default)]
    pub query_params: HashMap<S<String>, S<StringMatch>>,
    #[serde(default)]
    pub without_headers: HashMap<S<String>, S<StringMatch>>,
    pub ignore_uri_case: Option<S<bool>>,
    pub port: Option<S<u32>>,
}

/// Exactly one of the three must be set (or none, for "present").
#[derive(Debug, Deserialize, Serialize)]
pub struct StringMatch {
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub regex: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteDestination {
    pub destination: Option<S<Destination>>,
    pub weight: Option<S<i64>>,
    pub headers: Option<Headers>,
}

#[derive(Debug, Deserialize, Serialize)]
pub struct Destination {
    pub host: Option<S<String>>,
    pub subset: Option<S<String>>,
    pub port: Option<PortSelector>,
}

#[derive(Debug, Deserialize, Serialize)]
pub struct PortSelector {
    pub number: Option<S<u32>>,
}

#[derive(Debug, Deserialize, Serialize)]
pub struct Percent {
    /// Absent (`{}`) is 0, as in Istio's proto.
    pub value: Option<S<f64>>,
}

#[derive(Debug, Deserialize, Serialize)]
pub struct HttpMirrorPolicy {
    pub destination: Option<S<Destination>>,
    pub percentage: Option<S<Percent>>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRetry {
    pub attempts: Option<S<i64>>,
    pub per_try_timeout: Option<S<String>>,
    pub retry_on: Option<S<String>>,
    pub backoff: Option<S<String>>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRewrite {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub uri_regex_rewrite: Option<S<RegexRewrite>>,
}

#[derive(Debug, Deserialize, Serialize)]
pub struct RegexRewrite {
    #[serde(rename = "match")]
    pub pattern: Option<S<String>>,
    pub rewrite: Option<S<String>>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
pub struct Headers {
    pub request: Option<HeaderOperations>,
    pub response: Option<HeaderOperations>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
pub struct HeaderOperations {
    #[serde(default)]
    pub set: HashMap<S<String>, String>,
    #[serde(default)]
    pub add: HashMap<S<String>, String>,
    #[serde(default)]
    pub remove: Vec<S<String>>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationRule {
    pub host: Option<S<String>>,
    pub traffic_policy: Option<TrafficPolicy>,
    #[serde(default)]
    pub subsets: Vec<S<Subset>>,
    #[serde(default)]
    pub export_to: Vec<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Subset {
    pub name: Option<S<String>>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub traffic_policy: Option<TrafficPolicy>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicy {
    pub load_balancer: Option<LoadBalancerSettings>,
    pub connection_pool: Option<ConnectionPool>,
    pub outlier_detection: Option<S<OutlierDetection>>,
    pub tls: Option<S<ClientTlsSettings>>,
    #[serde(default)]
    pub port_level_settings: Vec<S<PortTrafficPolicy>>,
}

/// One entry of `portLevelSettings`: the policy of one destination port.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PortTrafficPolicy {
    pub port: Option<PortSelector>,
    pub load_balancer: Option<LoadBalancerSettings>,
    pub connection_pool: Option<ConnectionPool>,
    pub outlier_detection: Option<S<OutlierDetection>>,
    pub tls: Option<S<ClientTlsSettings>>,
}

/// `trafficPolicy.tls`: the TLS the sidecar (here umbra) originates.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientTlsSettings {
    pub mode: Option<S<String>>,
    pub client_certificate: Option<S<String>>,
    pub private_key: Option<S<String>>,
    pub ca_certificates: Option<S<String>>,
    pub ca_crl: Option<S<String>>,
    pub credential_name: Option<S<String>>,
    #[serde(default)]
    pub subject_alt_names: Vec<S<String>>,
    pub sni: Option<S<String>>,
    pub insecure_skip_verify: Option<S<bool>>,
}

#[derive(Debug, Deserialize, Serialize)]
pub struct LoadBalancerSettings {
    pub simple: Option<S<String>>,
}

/// The fields of Istio's `OutlierDetection` umbra implements.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    #[serde(rename = "consecutive5xxErrors")]
    pub consecutive_5xx_errors: Option<S<u32>>,
    pub consecutive_gateway_errors: Option<S<u32>>,
    pub base_ejection_time: Option<S<String>>,
    pub max_ejection_percent: Option<S<i64>>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
pub struct ConnectionPool {
    pub tcp: Option<TcpSettings>,
    pub http: Option<HttpSettings>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpSettings {
    pub connect_timeout: Option<S<String>>,
    pub max_connections: Option<S<u32>>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpSettings {
    pub http1_max_pending_requests: Option<S<u32>>,
    pub http2_max_requests: Option<S<u32>>,
    pub max_requests_per_connection: Option<S<u32>>,
    pub max_retries: Option<S<u32>>,
    pub idle_timeout: Option<S<String>>,
    pub h2_upgrade_policy: Option<S<String>>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntry {
    #[serde(default)]
    pub hosts: Option<S<Vec<S<String>>>>,
    #[serde(default)]
    pub ports: Vec<S<ServicePort>>,
    pub resolution: Option<S<String>>,
    #[serde(default)]
    pub endpoints: Vec<S<WorkloadEntry>>,
    pub workload_selector: Option<WorkloadSelector>,
    /// MESH_EXTERNAL / MESH_INTERNAL: no data-plane effect here.
    pub location: Option<String>,
    #[serde(default)]
    pub export_to: Vec<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    pub number: Option<S<u32>>,
    pub name: Option<String>,
    pub protocol: Option<S<String>>,
    pub target_port: Option<S<u32>>,
}

#[derive(Debug, Deserialize, Serialize)]
pub struct WorkloadSelector {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Both a `WorkloadEntry` spec and a `ServiceEntry.endpoints[]` item.
#[derive(Debug, Deserialize, Serialize)]
pub struct WorkloadEntry {
    pub address: Option<S<String>>,
    #[serde(default)]
    pub ports: BTreeMap<String, S<u32>>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Locality and weight do not change where umbra sends traffic.
    pub locality: Option<String>,
    pub weight: Option<u32>,
    pub network: Option<String>,
}

/// umbra's own resource, `umbra.io/v1alpha1` `ShadowAnalysis`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ShadowAnalysis {
    pub target_ref: Option<S<TargetRef>>,
    pub enabled: Option<bool>,
    pub ignore: Option<AnalysisIgnore>,
    pub baseline: Option<S<Destination>>,
    pub thresholds: Option<Thresholds>,
    pub min_samples: Option<S<i64>>,
    pub capture: Option<Capture>,
}

#[derive(Debug, Deserialize, Serialize)]
pub struct TargetRef {
    pub kind: Option<S<String>>,
    pub name: Option<S<String>>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
pub struct AnalysisIgnore {
    #[serde(default)]
    pub headers: Vec<S<String>>,
    #[serde(default)]
    pub paths: Vec<S<String>>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Thresholds {
    pub relative: Option<S<f64>>,
    pub absolute: Option<S<f64>>,
    pub max_mismatch_rate: Option<S<f64>>,
    pub confidence: Option<S<f64>>,
    pub latency_effect: Option<S<f64>>,
    pub latency_margin: Option<S<String>>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Capture {
    pub max_body_bytes: Option<S<i64>>,
}
