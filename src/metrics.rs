//! Metric names, declared once. Every Prometheus series umbra exports is
//! named here so the admin API, the README and the dashboard agree.
//! Registration and recording live with the code that owns each value.

/// Requests served, by `route`, `destination` and status `class` (2xx…, or
/// `error` when umbra answered itself).
pub const REQUESTS: &str = "umbra_requests";
/// Primary request latency, by `route` and `destination`.
pub const REQUEST_DURATION: &str = "umbra_request_duration_seconds";
/// Primary requests that got no whole upstream response through the
/// upstream's fault, by `route`, `destination` and `reason`: before the
/// response head (`upstream_reset`, `upstream_timeout`…) or in its body
/// (`upstream_reset_after_response_started`, `upstream_response_timeout`).
pub const UPSTREAM_ERRORS: &str = "umbra_upstream_errors";
/// Primary requests that got no whole response for reasons that are not
/// the upstream's, by `route`, `destination` and `reason`: the client left
/// before the response head (`downstream_remote_disconnect`) or during its
/// body (`downstream_body_incomplete`), stopped reading it
/// (`downstream_send_timeout`), its request body broke
/// (`downstream_request_body_error`) or stalled (`request_body_timeout`),
/// or the drain timeout cut the request
/// (`drain_timeout`).
pub const DOWNSTREAM_ERRORS: &str = "umbra_downstream_errors";
/// Requests umbra answered before choosing a route, by `reason`
/// (`invalid_host`, `connect_not_supported`, `no_route`): Envoy's
/// `no_route` and local-reply counts.
pub const LOCAL_REPLIES: &str = "umbra_local_replies";
/// Retries of primary requests by `route`, `destination` and `result`:
/// `retried`, or `overflow` when the destination's `maxRetries` retries
/// were already outstanding and the try stood (Envoy's `upstream_rq_retry`
/// and `upstream_rq_retry_overflow`).
pub const UPSTREAM_RETRIES: &str = "umbra_upstream_retries";
/// Faults a route's `fault` injected, by `route`, `destination` and
/// `kind` (`delay` or `abort`): Envoy's `fault.delays_injected` and
/// `fault.aborts_injected`.
pub const FAULTS_INJECTED: &str = "umbra_faults_injected";
/// Endpoints of a primary destination out of load balancing now for
/// failing in a row (its DestinationRule's `outlierDetection`), by
/// `destination` (Envoy's `outlier_detection.ejections_active`).
pub const UPSTREAM_EJECTED: &str = "umbra_upstream_ejected";
/// Ejections of a primary destination's endpoints, by `destination`
/// (Envoy's `outlier_detection.ejections_enforced_total`).
pub const UPSTREAM_EJECTIONS: &str = "umbra_upstream_ejections";
/// Primary requests waiting for a place under the destination's
/// `maxConnections` or for an HTTP/1.1 connection being dialled for them,
/// by `route` and `destination` (Envoy's `upstream_rq_pending_active`).
pub const UPSTREAM_PENDING: &str = "umbra_upstream_pending_requests";
/// Config reloads by `result` (success, failure).
pub const CONFIG_RELOADS: &str = "umbra_config_reloads";
/// Open downstream connections by `worker` (thread; 0 when umbra runs on
/// the caller's runtime).
pub const DOWNSTREAM_CONNECTIONS: &str = "umbra_downstream_connections";
/// Downstream connections closed for idling past `--header-read-timeout`
/// (idle keep-alive, no request ever sent, a head trickling in).
pub const DOWNSTREAM_IDLE_CLOSED: &str = "umbra_downstream_idle_closed";
/// Connections to a TLS listener whose handshake failed or timed out.
pub const DOWNSTREAM_TLS_HANDSHAKE_ERRORS: &str = "umbra_downstream_tls_handshake_errors";
/// Cuts because a client took none of its response for `--send-timeout`:
/// HTTP/1 connections closed, HTTP/2 streams whose upstream was cut, and
/// HTTP/2 connections closed because a cut stream stayed stalled.
pub const DOWNSTREAM_SEND_TIMEOUTS: &str = "umbra_downstream_send_timeouts";

/// Mirror decisions and results by `route`, `mirror` and `outcome`.
pub const MIRROR_REQUESTS: &str = "umbra_mirror_requests";
/// Shadow requests currently in flight.
pub const MIRROR_INFLIGHT: &str = "umbra_mirror_inflight";
/// Shadow request latency by `route` and `mirror`.
pub const MIRROR_DURATION: &str = "umbra_mirror_duration_seconds";
/// Shadow responses by `route`, `mirror` and status `class`.
pub const MIRROR_RESPONSES: &str = "umbra_mirror_responses";
/// 1 while a mirror target is ejected for not answering, by `mirror`.
pub const MIRROR_EJECTED: &str = "umbra_mirror_ejected";
/// Ejections of mirror targets by `mirror`, failed probes included.
pub const MIRROR_EJECTIONS: &str = "umbra_mirror_ejections";

/// Shadow/primary comparisons by `route` and `result` (match, mismatch).
pub const SHADOW_COMPARISONS: &str = "umbra_shadow_comparisons";
/// Reported (non-noise) differences by `route` and `kind`.
pub const SHADOW_DIFFERENCES: &str = "umbra_shadow_differences";
/// Analysis samples dropped by `reason` (queue_full, analysis_panic,
/// worker_stopped).
pub const SHADOW_DROPPED: &str = "umbra_shadow_dropped";
/// Verdict per `route`: 1 PROMOTE, 0 HOLD, -1 REJECT.
pub const SHADOW_VERDICT: &str = "umbra_shadow_verdict";

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// A label value from the config (a route, destination or mirror name),
/// escaped as the exposition format requires: a backslash, a double quote
/// and a line feed as `\\`, `\"` and `\n`. prometheus-client writes
/// label values as they are (client_rust#151), and a route `name` may hold
/// any of them; unescaped, one such name made the whole scrape unreadable.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Label(String);

impl From<&str> for Label {
    fn from(value: &str) -> Label {
        Label(value.to_owned())
    }
}

impl EncodeLabelValue for Label {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        let mut rest = self.0.as_str();
        // Written in runs between the characters to escape: most values
        // have none, and go out in one write.
        while let Some(at) = rest.find(['\\', '"', '\n']) {
            encoder.write_str(&rest[..at])?;
            encoder.write_str(match rest.as_bytes()[at] {
                b'\\' => "\\\\",
                b'"' => "\\\"",
                _ => "\\n",
            })?;
            rest = &rest[at + 1..];
        }
        encoder.write_str(rest)
    }
}

/// Labels of per-route, per-destination series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: Label,
    pub destination: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    pub route: Label,
    pub destination: Label,
    pub class: StatusClass,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub route: Label,
    pub destination: Label,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DestinationLabels {
    pub destination: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    pub route: Label,
    pub destination: Label,
    /// `retried` or `overflow`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FaultLabels {
    pub route: Label,
    pub destination: Label,
    /// `delay` or `abort`.
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabels {
    /// 1-based worker thread; 0 when serving on the caller's runtime.
    pub worker: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// A mirror target as a whole, whichever routes mirror to it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabels {
    pub mirror: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MirrorLabels {
    pub route: Label,
    pub mirror: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MirrorOutcomeLabels {
    pub route: Label,
    pub mirror: Label,
    pub outcome: MirrorOutcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MirrorStatusLabels {
    pub route: Label,
    pub mirror: Label,
    pub class: StatusClass,
}

/// HTTP status class, or `error` for requests that got no upstream response.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum StatusClass {
    C1xx,
    C2xx,
    C3xx,
    C4xx,
    C5xx,
}

impl StatusClass {
    pub const ALL: [StatusClass; 5] = [
        StatusClass::C1xx,
        StatusClass::C2xx,
        StatusClass::C3xx,
        StatusClass::C4xx,
        StatusClass::C5xx,
    ];

    pub fn of(status: http::StatusCode) -> StatusClass {
        match status.as_u16() {
            0..=199 => StatusClass::C1xx,
            200..=299 => StatusClass::C2xx,
            300..=399 => StatusClass::C3xx,
            400..=499 => StatusClass::C4xx,
            _ => StatusClass::C5xx,
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        ["1xx", "2xx", "3xx", "4xx", "5xx"][self.index()]
    }
}

impl EncodeLabelValue for StatusClass {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(self.as_str())
    }
}

/// Why a mirror was or was not sent, and how it ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum MirrorOutcome {
    sent,
    completed,
    failed,
    timeout,
    dropped_overload,
    skipped_sampling,
    skipped_method,
    skipped_upgrade,
    body_too_large,
    /// The target was ejected for failing shadows in a row
    /// (`mirror::ejection`).
    dropped_unresponsive,
}

impl MirrorOutcome {
    /// In declaration order (`tee::AbortReason` stores the position).
    pub const ALL: [MirrorOutcome; 10] = [
        MirrorOutcome::sent,
        MirrorOutcome::completed,
        MirrorOutcome::failed,
        MirrorOutcome::timeout,
        MirrorOutcome::dropped_overload,
        MirrorOutcome::skipped_sampling,
        MirrorOutcome::skipped_method,
        MirrorOutcome::skipped_upgrade,
        MirrorOutcome::body_too_large,
        MirrorOutcome::dropped_unresponsive,
    ];
}

/// Every series the data plane records, registered once at start-up.
/// Families are internally reference counted, so per-route handles taken
/// at config-load time make recording on the hot path a few atomic adds.
pub struct Metrics {
    requests: Family<StatusLabels, Counter>,
    duration: Family<RouteLabels, Histogram>,
    upstream_errors: Family<ErrorLabels, Counter>,
    downstream_errors: Family<ErrorLabels, Counter>,
    retries: Family<RetryLabels, Counter>,
    faults: Family<FaultLabels, Counter>,
    ejected: Family<DestinationLabels, Gauge>,
    ejections: Family<DestinationLabels, Counter>,
    pending: Family<RouteLabels, Gauge>,
    local_replies: Family<ReasonLabels, Counter>,
    pub reloads: Family<ResultLabels, Counter>,
    connections: Family<WorkerLabels, Gauge>,
    pub idle_closed: Counter,
    pub tls_handshake_errors: Counter,
    pub send_timeouts: Counter,
    mirror_requests: Family<MirrorOutcomeLabels, Counter>,
    pub mirror_inflight: Gauge,
    mirror_duration: Family<MirrorLabels, Histogram>,
    mirror_responses: Family<MirrorStatusLabels, Counter>,
    mirror_ejected: Family<TargetLabels, Gauge>,
    mirror_ejections: Family<TargetLabels, Counter>,
}

fn latency_histogram() -> Histogram {
    // 0.25 ms .. ~8 s, doubling.
    Histogram::new(exponential_buckets(0.00025, 2.0, 16))
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Metrics {
        let metrics = Metrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(latency_histogram),
            upstream_errors: Family::default(),
            downstream_errors: Family::default(),
            retries: Family::default(),
            faults: Family::default(),
            ejected: Family::default(),
            ejections: Family::default(),
            pending: Family::default(),
            local_replies: Family::default(),
            reloads: Family::default(),
            connections: Family::default(),
            idle_closed: Counter::default(),
            tls_handshake_errors: Counter::default(),
            send_timeouts: Counter::default(),
            mirror_requests: Family::default(),
            mirror_inflight: Gauge::default(),
            mirror_duration: Family::new_with_constructor(latency_histogram),
            mirror_responses: Family::default(),
            mirror_ejected: Family::default(),
            mirror_ejections: Family::default(),
        };
        registry.register(
            REQUESTS,
            "Requests served, by route, destination and status class",
            metrics.requests.clone(),
        );
        registry.register(
            REQUEST_DURATION,
            "Primary request latency to response headers",
            metrics.duration.clone(),
        );
        registry.register(
            UPSTREAM_ERRORS,
            "Primary requests without a whole upstream response through the upstream's fault (before the head or mid-body), by route, destination and reason",
            metrics.upstream_errors.clone(),
        );
        registry.register(
            DOWNSTREAM_ERRORS,
            "Primary requests without a whole response for reasons not the upstream's (client gone or not reading, broken request body, drain timeout), by route, destination and reason",
            metrics.downstream_errors.clone(),
        );
        registry.register(
            UPSTREAM_RETRIES,
            "Retries of primary requests, by route, destination and result (retried, or overflow past the destination's maxRetries)",
            metrics.retries.clone(),
        );
        registry.register(
            FAULTS_INJECTED,
            "Faults injected by routes' fault rules, by route, destination and kind (delay or abort)",
            metrics.faults.clone(),
        );
        registry.register(
            UPSTREAM_EJECTED,
            "Endpoints of a primary destination ejected now by its outlierDetection, by destination",
            metrics.ejected.clone(),
        );
        registry.register(
            UPSTREAM_EJECTIONS,
            "Ejections of a primary destination's endpoints by its outlierDetection, by destination",
            metrics.ejections.clone(),
        );
        registry.register(
            LOCAL_REPLIES,
            "Requests answered before a route was chosen, by reason",
            metrics.local_replies.clone(),
        );
        registry.register(
            UPSTREAM_PENDING,
            "Primary requests waiting for a connection: under maxConnections, or while one is dialled (HTTP/1.1)",
            metrics.pending.clone(),
        );
        registry.register(
            CONFIG_RELOADS,
            "Config reloads by result",
            metrics.reloads.clone(),
        );
        registry.register(
            DOWNSTREAM_CONNECTIONS,
            "Open downstream connections by worker thread",
            metrics.connections.clone(),
        );
        registry.register(
            DOWNSTREAM_IDLE_CLOSED,
            "Downstream connections closed for idling past the header read timeout",
            metrics.idle_closed.clone(),
        );
        registry.register(
            DOWNSTREAM_TLS_HANDSHAKE_ERRORS,
            "Connections to a TLS listener whose handshake failed or timed out",
            metrics.tls_handshake_errors.clone(),
        );
        registry.register(
            DOWNSTREAM_SEND_TIMEOUTS,
            "Cuts because a client took none of its response for the send timeout: HTTP/1 connections closed, HTTP/2 streams whose upstream was cut, HTTP/2 connections whose cut stream stayed stalled",
            metrics.send_timeouts.clone(),
        );
        registry.register(
            MIRROR_REQUESTS,
            "Mirror decisions and results by route, mirror and outcome",
            metrics.mirror_requests.clone(),
        );
        registry.register(
            MIRROR_INFLIGHT,
            "Shadow requests in flight (sent or waiting for a place)",
            metrics.mirror_inflight.clone(),
        );
        registry.register(
            MIRROR_EJECTED,
            "1 while a mirror target is ejected for failing shadows in a row (its shadows dropped as dropped_unresponsive), 0 once a probe finds it answering",
            metrics.mirror_ejected.clone(),
        );
        registry.register(
            MIRROR_EJECTIONS,
            "Ejections of mirror targets, first ones and failed probes alike",
            metrics.mirror_ejections.clone(),
        );
        registry.register(
            MIRROR_DURATION,
            "Shadow request latency to the end of the response",
            metrics.mirror_duration.clone(),
        );
        registry.register(
            MIRROR_RESPONSES,
            "Shadow responses by status class",
            metrics.mirror_responses.clone(),
        );
        metrics
    }

    /// A request answered before a route was chosen.
    pub fn local_reply(&self, reason: &'static str) {
        self.local_replies
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// The open-connections gauge of one worker thread.
    pub fn connections(&self, worker: usize) -> Gauge {
        let worker = u32::try_from(worker).unwrap_or(u32::MAX);
        self.connections
            .get_or_create(&WorkerLabels { worker })
            .clone()
    }

    /// Handles for one route → destination pair.
    pub fn route(&self, route: &str, destination: &str) -> RouteStats {
        let labels = RouteLabels {
            route: Label::from(route),
            destination: Label::from(destination),
        };
        RouteStats {
            by_class: StatusClass::ALL.map(|class| {
                self.requests
                    .get_or_create(&StatusLabels {
                        route: labels.route.clone(),
                        destination: labels.destination.clone(),
                        class,
                    })
                    .clone()
            }),
            duration: self.duration.get_or_create(&labels).clone(),
            pending: self.pending.get_or_create(&labels).clone(),
            upstream_errors: self.upstream_errors.clone(),
            downstream_errors: self.downstream_errors.clone(),
            retries: self.retries.clone(),
            faults: self.faults.clone(),
            labels,
        }
    }

    /// A mirror target's standing, kept with its ejection state.
    pub fn mirror_target(&self, mirror: &str) -> TargetStats {
        let labels = TargetLabels {
            mirror: Label::from(mirror),
        };
        TargetStats {
            ejected: self.mirror_ejected.get_or_create(&labels).clone(),
            ejections: self.mirror_ejections.get_or_create(&labels).clone(),
        }
    }

    /// A primary destination's outlier ejections.
    pub fn destination_ejections(&self, destination: &str) -> TargetStats {
        let labels = DestinationLabels {
            destination: Label::from(destination),
        };
        TargetStats {
            ejected: self.ejected.get_or_create(&labels).clone(),
            ejections: self.ejections.get_or_create(&labels).clone(),
        }
    }

    /// Handles for one route → mirror pair.
    pub fn mirror(&self, route: &str, mirror: &str) -> MirrorStats {
        let labels = MirrorLabels {
            route: Label::from(route),
            mirror: Label::from(mirror),
        };
        MirrorStats {
            outcomes: MirrorOutcome::ALL.map(|outcome| {
                self.mirror_requests
                    .get_or_create(&MirrorOutcomeLabels {
                        route: labels.route.clone(),
                        mirror: labels.mirror.clone(),
                        outcome,
                    })
                    .clone()
            }),
            by_class: StatusClass::ALL.map(|class| {
                self.mirror_responses
                    .get_or_create(&MirrorStatusLabels {
                        route: labels.route.clone(),
                        mirror: labels.mirror.clone(),
                        class,
                    })
                    .clone()
            }),
            duration: self.mirror_duration.get_or_create(&labels).clone(),
            inflight: self.mirror_inflight.clone(),
        }
    }
}

/// Pre-resolved series for one route → destination.
#[derive(Clone)]
pub struct RouteStats {
    by_class: [Counter; 5],
    duration: Histogram,
    /// Requests waiting for a place under `maxConnections`.
    pending: Gauge,
    upstream_errors: Family<ErrorLabels, Counter>,
    downstream_errors: Family<ErrorLabels, Counter>,
    retries: Family<RetryLabels, Counter>,
    faults: Family<FaultLabels, Counter>,
    labels: RouteLabels,
}

/// Counts a request as pending while it lives.
pub struct Pending(Gauge);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl RouteStats {
    /// Counts a request as waiting for a place until the guard drops.
    pub fn pending(&self) -> Pending {
        self.pending.inc();
        Pending(self.pending.clone())
    }

    pub fn response(&self, status: http::StatusCode, seconds: f64) {
        self.by_class[StatusClass::of(status).index()].inc();
        self.duration.observe(seconds);
    }

    /// A request that got no whole response; rare, so the label lookup
    /// is fine here. Failures on the client's side (and the drain's) are
    /// counted apart from the upstream's, so that alerts on upstream errors
    /// do not fire for clients that leave.
    pub fn failure(&self, blame: Blame, reason: &'static str) {
        let family = match blame {
            Blame::Upstream => &self.upstream_errors,
            Blame::Downstream => &self.downstream_errors,
        };
        family
            .get_or_create(&ErrorLabels {
                route: self.labels.route.clone(),
                destination: self.labels.destination.clone(),
                reason,
            })
            .inc();
    }

    /// A retry made, or not made for the destination's `maxRetries`
    /// (`made: false`); rare, so the label lookup is fine here.
    pub fn retry(&self, made: bool) {
        self.retries
            .get_or_create(&RetryLabels {
                route: self.labels.route.clone(),
                destination: self.labels.destination.clone(),
                result: if made { "retried" } else { "overflow" },
            })
            .inc();
    }

    /// A fault injected: `delay` or `abort`.
    pub fn fault(&self, kind: &'static str) {
        self.faults
            .get_or_create(&FaultLabels {
                route: self.labels.route.clone(),
                destination: self.labels.destination.clone(),
                kind,
            })
            .inc();
    }
}

/// Whose failure a request's missing upstream response was: which error
/// family counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// `umbra_upstream_errors_total`.
    Upstream,
    /// `umbra_downstream_errors_total`: the client, or umbra's own drain.
    Downstream,
}

/// Pre-resolved series for one route → mirror.
#[derive(Clone)]
pub struct MirrorStats {
    outcomes: [Counter; MirrorOutcome::ALL.len()],
    by_class: [Counter; 5],
    duration: Histogram,
    pub inflight: Gauge,
}

/// What `mirror::ejection` shows of a target's standing.
#[derive(Clone, Debug)]
pub struct TargetStats {
    /// What is ejected now: a mirror target, 1 while ejected (probing
    /// included); a primary destination, how many of its endpoints.
    pub ejected: Gauge,
    /// Every ejection, the first of a run and each failed probe.
    pub ejections: Counter,
}

impl MirrorStats {
    pub fn outcome(&self, outcome: MirrorOutcome) {
        self.outcomes[outcome as usize].inc();
    }

    pub fn response(&self, status: http::StatusCode, seconds: f64) {
        self.by_class[StatusClass::of(status).index()].inc();
        self.duration.observe(seconds);
    }
}
