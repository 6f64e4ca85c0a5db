//! Metric names, declared once. Every Prometheus series umbra exports is
//! named here so the admin API, the README and the dashboard agree.
//! Registration and recording live with the code that owns each value.

/// Requests served, by `route`, `destination` and status `class` (2xx…, or
/// `error` when umbra answered itself).
pub const REQUESTS: &str = "umbra_requests";
/// Primary request latency, by `route` and `destination`.
pub const REQUEST_DURATION: &str = "umbra_request_duration_seconds";
/// Upstream failures by `route`, `destination` and `reason`.
pub const UPSTREAM_ERRORS: &str = "umbra_upstream_errors";
/// Config reloads by `result` (success, failure).
pub const CONFIG_RELOADS: &str = "umbra_config_reloads";
/// Open downstream connections.
pub const DOWNSTREAM_CONNECTIONS: &str = "umbra_downstream_connections";

/// Mirror decisions and results by `route`, `mirror` and `outcome`.
pub const MIRROR_REQUESTS: &str = "umbra_mirror_requests";
/// Shadow requests currently in flight.
pub const MIRROR_INFLIGHT: &str = "umbra_mirror_inflight";
/// Shadow request latency by `route` and `mirror`.
pub const MIRROR_DURATION: &str = "umbra_mirror_duration_seconds";
/// Shadow responses by `route`, `mirror` and status `class`.
pub const MIRROR_RESPONSES: &str = "umbra_mirror_responses";

/// Shadow/primary comparisons by `route` and `result` (match, mismatch).
pub const SHADOW_COMPARISONS: &str = "umbra_shadow_comparisons";
/// Reported (non-noise) differences by `route` and `kind`.
pub const SHADOW_DIFFERENCES: &str = "umbra_shadow_differences";
/// Analysis samples dropped by `reason` (queue_full, …).
pub const SHADOW_DROPPED: &str = "umbra_shadow_dropped";
/// Verdict per `route`: 1 PROMOTE, 0 HOLD, -1 REJECT.
pub const SHADOW_VERDICT: &str = "umbra_shadow_verdict";
