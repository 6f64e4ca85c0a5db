//! Mirroring: decides per request and per mirror target whether to send a
//! shadow copy (method, upgrade, sampling, body size, in-flight limits), then
//! sends it fire-and-forget on its own connection pool with a `-shadow`
//! Host. Nothing here can hold up the primary: every limit is a `try_`
//! acquire that drops and counts, the body reaches shadows through the
//! non-blocking [`tee::Tee`], and the shadow's response is read and
//! discarded (or captured for analysis) in a detached task.

pub mod ejection;
pub mod tee;

use std::future::Future;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::Authority;
use http::{Request, Version};
use http_body::SizeHint;
use http_body_util::BodyExt;
use rand::Rng;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{info, warn};

use crate::accesslog::{AccessLog, Entry};
use crate::analysis::{Captured, Outcome};
use crate::config::model::Route;
use crate::metrics::{MirrorOutcome, MirrorStats};
use crate::proxy::body::{RouteTimer, Upload};
use crate::proxy::lean::{Edit, Keep, Lean, Prepared};
use crate::proxy::pool::Pool;
use crate::proxy::upstream::{HeaderLines, Picked, SendError, Upstream};
use crate::proxy::Pairing;
use ejection::{Admission, Change, Verdict};
use tee::{ShadowBody, Tee};

/// Shadow requests time out after this unless the route sets `timeout`.
pub const DEFAULT_SHADOW_TIMEOUT: Duration = Duration::from_secs(10);

/// Process-wide mirroring state shared by every route.
pub struct Mirroring {
    /// Caps shadow requests in flight across all targets.
    pub global: Arc<Semaphore>,
    /// Caps shadow body bytes buffered but not yet read by shadows.
    pub budget: Arc<tee::Budget>,
    pub access_log: AccessLog,
    /// The server's worker threads, when it has them: a shadow may run on
    /// an idle one rather than its primary's (see `Workers::spawn`).
    pub workers: std::sync::OnceLock<Arc<crate::server::Workers>>,
}

/// One mirror target of one route, ready to send.
pub struct MirrorTarget {
    pub label: Arc<str>,
    pub per_million: u32,
    /// Its own pool, with the per-target in-flight limit.
    pub upstream: Arc<Upstream<ShadowBody>>,
    pub stats: MirrorStats,
    /// A baseline (second copy of the primary version, for three-way
    /// analysis) rather than a shadow under test.
    pub baseline: bool,
    /// The route name its shadows are analysed under: the route's own when
    /// it has one shadow target, `route → label` when it has several, so
    /// each target gets its own verdict instead of a blend.
    pub analysed_as: Arc<str>,
}

impl MirrorTarget {
    /// Tells the target's [`ejection`] how a shadow let go at `sent` went
    /// (with its ticket if it was the probe), and logs a change of the
    /// target's standing.
    fn judge(&self, verdict: Verdict, probe: Option<ProbeTicket>, sent: Instant) {
        let change = match probe {
            Some(ticket) => ticket.punch(verdict),
            None => self
                .upstream
                .ejection()
                .record(verdict, false, sent, Instant::now),
        };
        match change {
            Some(Change::Ejected(length)) => warn!(
                mirror = %self.label,
                ejected_for_s = length.as_secs_f64(),
                "mirror target not answering: its shadows are dropped \
                 (dropped_unresponsive) until a probe finds it answering"
            ),
            Some(Change::Back) => info!(
                mirror = %self.label,
                "mirror target answers again: shadows resume"
            ),
            None => {}
        }
    }
}

/// The right to probe an ejected target, held by the one shadow sent to
/// do it. Handed back if that shadow ends without a verdict (never sent,
/// or its task dropped by a stopping runtime or a panic) so that another
/// can probe: kept, it would leave the target ejected for good.
struct ProbeTicket(Option<Arc<MirrorTarget>>);

impl ProbeTicket {
    fn new(target: &Arc<MirrorTarget>) -> ProbeTicket {
        ProbeTicket(Some(target.clone()))
    }

    /// Records the probe's verdict; the ticket is used up.
    fn punch(mut self, verdict: Verdict) -> Option<Change> {
        let target = self.0.take()?;
        let now = Instant::now();
        target
            .upstream
            .ejection()
            .record(verdict, true, now, || now)
    }
}

impl Drop for ProbeTicket {
    fn drop(&mut self) {
        if let Some(target) = self.0.take() {
            let now = Instant::now();
            let ejection = target.upstream.ejection();
            ejection.record(Verdict::NotJudged, true, now, || now);
        }
    }
}

/// What `dispatch` needs to know about the primary request.
pub struct Primary<'a> {
    /// Headers and URI as sent upstream (after route header rules).
    pub parts: &'a Parts,
    /// The Host/authority the client sent.
    pub host: &'a str,
    pub request_id: &'a HeaderValue,
    pub client: IpAddr,
    /// The client's protocol, for the access log.
    pub version: Version,
    /// CONNECT or an Upgrade request (checked before hop-by-hop stripping).
    pub upgrade: bool,
    /// The body's size hint; exact(0) when there is no body.
    pub body: SizeHint,
    /// How far the client's upload has got, for shadows' timeouts.
    pub upload: &'a Upload,
}

/// Decides and launches every mirror of `route` for one request. Returns
/// the tee to wrap the primary body in when some shadow needs the body.
/// `make_pairing(bodies)` joins the request to the analysis, capturing
/// bodies or not.
pub fn dispatch(
    mirroring: &Mirroring,
    route: &Route,
    route_name: &Arc<str>,
    targets: &[Arc<MirrorTarget>],
    primary: &Primary<'_>,
    make_pairing: impl FnOnce(bool) -> Option<Pairing>,
) -> (Option<Tee>, Option<Pairing>) {
    // Built only once a shadow is really sent (or dropped by an ejection):
    // most sampled-out requests never pay for the analysis join.
    let mut make_pairing = Some(make_pairing);
    let mut pairing = None::<Pairing>;
    // The shadow targets found ejected (allocates only if one is).
    let mut unresponsive = Vec::<&MirrorTarget>::new();
    let policy = &route.mirror_policy;
    let no_body = primary.body.exact() == Some(0);
    let mut tee = None::<Tee>;
    let request_roll = policy
        .sample_by_request_id
        .then(|| request_id_roll(primary.request_id.as_bytes()));
    for target in targets {
        if primary.upgrade {
            target.stats.outcome(MirrorOutcome::skipped_upgrade);
            continue;
        }
        if let Some(methods) = &policy.methods {
            if !methods.contains(&primary.parts.method) {
                target.stats.outcome(MirrorOutcome::skipped_method);
                continue;
            }
        }
        let roll = request_roll.unwrap_or_else(|| rand::rng().random_range(0..1_000_000));
        if roll >= target.per_million {
            target.stats.outcome(MirrorOutcome::skipped_sampling);
            continue;
        }
        if primary.body.lower() > policy.max_body_bytes {
            target.stats.outcome(MirrorOutcome::body_too_large);
            continue;
        }
        // First: while its target is ejected, no limit, connection or
        // timer is touched.
        let probe = match target.upstream.ejection().admit(Instant::now) {
            Admission::Open => None,
            Admission::Probe => Some(ProbeTicket::new(target)),
            Admission::Ejected => {
                target.stats.outcome(MirrorOutcome::dropped_unresponsive);
                if !target.baseline {
                    unresponsive.push(target);
                }
                continue;
            }
        };
        let Admitted {
            global,
            local,
            place,
            picked,
        } = match admit(mirroring, target, no_body) {
            Ok(admitted) => admitted,
            Err(outcome) => {
                // A probe's ticket is handed back as it drops here.
                target.stats.outcome(outcome);
                continue;
            }
        };
        let (body, abort) = if no_body {
            (ShadowBody::empty(), None)
        } else {
            let tee = tee.get_or_insert_with(|| Tee::new(mirroring.budget.clone()));
            let (body, reason) = tee.tap(policy.max_body_bytes, primary.body);
            (body, Some(reason))
        };
        let edit = Edit {
            host: policy
                .host_suffix
                .then(|| shadow_host_pieces(upstream_host(primary.parts, primary.host))),
            keep: |name: &HeaderName| !policy.remove_headers.iter().any(|h| h.0 == name),
        };
        // Only when logging: four header lookups and a copy of the URI.
        let logged = (mirroring.access_log.enabled())
            .then(|| Box::new(Logged::of(primary, &edit, route_name)));
        let request = if let Some(pool) = target.upstream.lean(picked.index()) {
            // Its head encoded now, from the primary's: no copy of the
            // header map, and nothing of the client's buffer held.
            let prepared = Prepared::edited(primary.parts, &body, &edit);
            ShadowRequest::Lean(pool.clone(), prepared, body)
        } else {
            let mut request = shadow_request(primary, &edit, body);
            if place.is_none() {
                // It may wait until its timeout: let go of the client's buffer.
                crate::proxy::headers::detach(request.headers_mut());
            }
            *request.uri_mut() = target.upstream.uri(
                &picked,
                request.headers(),
                primary.parts.uri.path_and_query(),
            );
            ShadowRequest::Hyper(request)
        };
        let slot = pair_slot(&mut make_pairing, &mut pairing, target, true);
        let task = ShadowTask {
            target: target.clone(),
            timeout: route.timeout.unwrap_or(DEFAULT_SHADOW_TIMEOUT),
            upload: if no_body {
                Upload::none()
            } else {
                primary.upload.clone()
            },
            abort,
            log: mirroring.access_log.clone(),
            logged,
            client: primary.client,
            endpoint_index: picked.index(),
            endpoint: picked.authority,
            slot,
            probe,
            let_go: None,
            inflight: InFlight::new(&target.stats.inflight),
            _held: (global, local, picked.guard),
        };
        let shadow = task.start(request, place);
        match mirroring.workers.get() {
            Some(workers) => workers.spawn(shadow),
            None => drop(tokio::spawn(shadow)),
        }
    }
    // An ejected target's shadow counts against it in the analysis (see
    // Outcome::Unresponsive). Last, so that the bodies are captured if
    // another target's shadow is compared: for this one they are not.
    for target in unresponsive {
        if let Some(slot) = pair_slot(&mut make_pairing, &mut pairing, target, false) {
            slot.fill(Outcome::Unresponsive);
        }
    }
    (tee.filter(|tee| !tee.is_empty()), pairing)
}

/// The target's slot in the request's analysis pair, the pair made on
/// first use (capturing bodies or not).
fn pair_slot(
    make_pairing: &mut Option<impl FnOnce(bool) -> Option<Pairing>>,
    pairing: &mut Option<Pairing>,
    target: &MirrorTarget,
    bodies: bool,
) -> Option<crate::proxy::PairSlot> {
    if let Some(make) = make_pairing.take() {
        *pairing = make(bodies);
    }
    pairing.as_ref()?.slot_for(target)
}

/// What lets a shadow go: its places under the limits, and its endpoint.
struct Admitted {
    /// Its share of the limit on all shadows.
    global: OwnedSemaphorePermit,
    /// Its admission under the target's limit (with a queue: into it).
    local: Option<OwnedSemaphorePermit>,
    /// `None`: it must wait for a place (see `Upstream::place`).
    place: Option<Option<OwnedSemaphorePermit>>,
    /// Its endpoint, counted busy until the shadow ends.
    picked: Picked,
}

/// Admits a shadow under the global and per-target limits, or says why
/// not.
fn admit(
    mirroring: &Mirroring,
    target: &MirrorTarget,
    no_body: bool,
) -> Result<Admitted, MirrorOutcome> {
    let overload = MirrorOutcome::dropped_overload;
    let global = mirroring.global.clone().try_acquire_owned();
    let global = global.map_err(|_| overload)?;
    let local = target.upstream.try_admit().ok_or(overload)?;
    // A place on the wire now, or a wait for one. Only a shadow without a
    // body waits: one with a body would hold what it tees from the primary
    // for as long as it waits, against the budget all shadows share, so a
    // dead target taking uploads would starve healthy ones.
    let place = target.upstream.try_place();
    if place.is_none() && !no_body {
        return Err(overload);
    }
    // No endpoint: the shadow fails without touching the network.
    let picked = target.upstream.pick().ok_or(MirrorOutcome::failed)?;
    Ok(Admitted {
        global,
        local,
        place,
        picked,
    })
}

/// A shadow request as it goes out.
enum ShadowRequest {
    /// Encoded for umbra's own HTTP/1.1 exchange on the endpoint's pool
    /// (an invalid `content-length` fails it there).
    Lean(Arc<Pool<Lean>>, Result<Prepared, SendError>, ShadowBody),
    /// For hyper's client (HTTP/2).
    Hyper(Request<ShadowBody>),
}

/// The shadow copy for hyper's client: same method, path, query, headers
/// and body, changed by `edit`.
fn shadow_request<F: Fn(&HeaderName) -> bool>(
    primary: &Primary<'_>,
    edit: &Edit<'_, F>,
    body: ShadowBody,
) -> Request<ShadowBody> {
    let mut request = Request::new(body);
    *request.method_mut() = primary.parts.method.clone();
    // HTTP/1.1 shadows go lean.
    *request.version_mut() = Version::HTTP_2;
    let headers = request.headers_mut();
    *headers = primary.parts.headers.clone();
    if let Some(pieces) = edit.host {
        // The String becomes the header's bytes without another copy.
        if let Ok(value) = HeaderValue::from_maybe_shared(Bytes::from(pieces.concat())) {
            headers.insert(header::HOST, value);
        }
    }
    let removed: Vec<HeaderName> = (headers.keys())
        .filter(|name| !(edit.keep)(name))
        .cloned()
        .collect();
    for name in removed {
        headers.remove(name);
    }
    request
}

/// The Host a primary carries upstream (after `rewrite.authority`), which
/// its shadows' `-shadow` Host is made from; `host`, the client's, if it
/// has none.
pub fn upstream_host<'a>(parts: &'a Parts, host: &'a str) -> &'a str {
    (parts.headers.get(header::HOST))
        .and_then(|h| h.to_str().ok())
        .unwrap_or(host)
}

/// What Envoy appends to a mirrored request's host.
const SHADOW_SUFFIX: &str = "-shadow";

/// `httpbin:8000` → `httpbin-shadow:8000`, `httpbin` → `httpbin-shadow`,
/// `[::1]:8000` → `[::1]-shadow:8000`, as Envoy appends before the port.
pub fn shadow_host(host: &str) -> String {
    shadow_host_pieces(host).concat()
}

/// The shadow host in pieces to write one after the other: the host, the
/// suffix, the port.
fn shadow_host_pieces(host: &str) -> [&str; 3] {
    let split = if host.starts_with('[') {
        host.find(']').map(|end| end + 1)
    } else {
        host.rfind(':')
    };
    let split = match split {
        Some(at) if at < host.len() => at,
        _ => host.len(),
    };
    [&host[..split], SHADOW_SUFFIX, &host[split..]]
}

/// A roll in `0..1_000_000` derived from the request id, so every target
/// (and every umbra replica) samples the same requests.
fn request_id_roll(id: &[u8]) -> u32 {
    // FNV-1a: stable across processes and versions, unlike `DefaultHasher`.
    let mut hasher = Fnv(0xcbf2_9ce4_8422_2325);
    id.hash(&mut hasher);
    (hasher.finish() % 1_000_000) as u32
}

struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 ^= u64::from(byte);
            self.0 = self.0.wrapping_mul(0x100_0000_01b3);
        }
    }
}

/// Everything a detached shadow exchange needs.
struct ShadowTask {
    /// Shared, not its parts cloned: the stats alone are 16 counters, each
    /// an `Arc` (an atomic increment and decrement per shadow each).
    target: Arc<MirrorTarget>,
    /// Counted as the primary's route timeout is, from the end of the
    /// client's upload.
    timeout: Duration,
    upload: Upload,
    abort: Option<Arc<tee::AbortReason>>,
    log: AccessLog,
    /// Only when logging; boxed so the task stays small without it.
    logged: Option<Box<Logged>>,
    client: IpAddr,
    endpoint: Authority,
    endpoint_index: usize,
    slot: Option<crate::proxy::PairSlot>,
    /// Its ticket, when it is the probe of an ejected target.
    probe: Option<ProbeTicket>,
    /// When its target's standing let it go after it waited for a place
    /// (`None`: at admission). A failure counts against the target only if
    /// it was let go after the target's last return.
    let_go: Option<Instant>,
    /// Counts the shadow in `umbra_mirror_inflight` until it ends, on
    /// every path (even a task dropped unpolled by a stopping runtime).
    inflight: InFlight,
    /// The global and per-target admissions and the endpoint's count of
    /// active requests, released when the shadow ends.
    _held: (
        OwnedSemaphorePermit,
        Option<OwnedSemaphorePermit>,
        crate::proxy::upstream::EndpointGuard,
    ),
}

/// A shadow counted in flight; uncounted when dropped.
struct InFlight(prometheus_client::metrics::gauge::Gauge);

impl InFlight {
    fn new(gauge: &prometheus_client::metrics::gauge::Gauge) -> InFlight {
        gauge.inc();
        InFlight(gauge.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What the access log needs of a shadow request, kept before it is sent.
struct Logged {
    method: http::Method,
    /// Path and query ("/" if none).
    uri: String,
    /// The client's, as on the primary's line.
    version: Version,
    /// The shadow's Host, `-shadow` suffix included.
    host: Option<String>,
    /// Joins the line with the primary's.
    request_id: Option<String>,
    user_agent: Option<String>,
    referer: Option<String>,
    route: Arc<str>,
}

impl Logged {
    /// Of the shadow `edit` makes of `primary`.
    fn of<F: Fn(&HeaderName) -> bool>(
        primary: &Primary<'_>,
        edit: &Edit<'_, F>,
        route: &Arc<str>,
    ) -> Logged {
        // Copies, not the values: those are slices of the client
        // connection's read buffer, which a shadow waiting on a slow target
        // would pin until it times out.
        let header = |name| {
            ((edit.keep)(name))
                .then(|| crate::proxy::header_string(&primary.parts.headers, name))
                .flatten()
        };
        let host = match edit.host {
            Some(pieces) if (edit.keep)(&header::HOST) => Some(pieces.concat()),
            Some(_) => None,
            None => header(&header::HOST),
        };
        Logged {
            method: primary.parts.method.clone(),
            version: primary.version,
            uri: (primary.parts.uri.path_and_query()).map_or_else(|| "/".into(), |p| p.to_string()),
            host,
            request_id: header(&crate::proxy::headers::X_REQUEST_ID),
            user_agent: header(&header::USER_AGENT),
            referer: header(&header::REFERER),
            route: route.clone(),
        }
    }
}

/// How a shadow ended.
enum Ended {
    /// It never got a place under its target's limit.
    NoPlace,
    /// Its target was ejected while it waited for a place.
    Ejected,
    /// Sent: the response, or the exchange's error, or its timeout.
    Exchanged(Result<Result<Captured, ShadowError>, crate::deadline::Elapsed>),
}

impl ShadowTask {
    /// The shadow, boxed: its state is then written once, instead of being
    /// copied at each layer of spawning (ten copies of twice its ~3 KiB
    /// when it was not, measured: 82k of the 142k instructions a mirrored
    /// request took under callgrind).
    fn start(
        self,
        request: ShadowRequest,
        place: Option<Option<OwnedSemaphorePermit>>,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let admitted = Instant::now();
        match place {
            Some(place) => Box::pin(self.run(request, place, admitted)),
            None => Box::pin(self.wait(request, admitted)),
        }
    }

    /// Past the target's in-flight cap a shadow waits for a place, holding
    /// its request but no connection, for at most its timeout. Its exchange
    /// is boxed apart, so while waiting it holds a few hundred bytes instead
    /// of hyper's ~3 KiB of exchange state. The exchange then has a whole
    /// timeout of its own: time spent waiting on umbra's limit is never
    /// blamed on v2.
    async fn wait(mut self, request: ShadowRequest, admitted: Instant) {
        let placed = crate::deadline::within(self.timeout, self.target.upstream.place()).await;
        let Ok(place) = placed else {
            return self.finish(Ended::NoPlace, admitted, None);
        };
        // The target may have been ejected while this one waited: the
        // places it waited for were freed by failures.
        if self.probe.is_none() {
            let now = Instant::now();
            match self.target.upstream.ejection().admit(|| now) {
                Admission::Open => {}
                Admission::Probe => self.probe = Some(ProbeTicket::new(&self.target)),
                Admission::Ejected => return self.finish(Ended::Ejected, admitted, place),
            }
            self.let_go = Some(now);
        }
        Box::pin(self.run(request, place, admitted)).await
    }

    async fn run(
        self,
        request: ShadowRequest,
        place: Option<OwnedSemaphorePermit>,
        admitted: Instant,
    ) {
        // Counted here, on the wire: a shadow that never gets a place is
        // `dropped_overload` only.
        self.target.stats.outcome(MirrorOutcome::sent);
        let capture = self.slot.as_ref().map_or(0, |slot| slot.capture_limit());
        let timer = RouteTimer::new(self.timeout, self.upload.clone());
        let exchanged = std::pin::pin!(timer)
            .bound(exchange(
                &self.target.upstream,
                self.endpoint_index,
                request,
                self.slot.is_some(),
                capture,
                Instant::now(),
            ))
            .await;
        self.finish(Ended::Exchanged(exchanged), admitted, place);
    }

    /// Counts, updates the target's standing, gives up the shadow's
    /// `place`, hands the response to the analysis and logs.
    fn finish(self, result: Ended, admitted: Instant, place: Option<OwnedSemaphorePermit>) {
        let stats = &self.target.stats;
        let elapsed = match &result {
            Ended::Exchanged(Ok(Ok(captured))) => captured.latency,
            _ => admitted.elapsed(),
        };
        drop(self.inflight);
        let failed = (MirrorOutcome::failed, Verdict::Failed);
        let ((outcome, verdict), status, bytes, analysed) = match result {
            Ended::Exchanged(Ok(Ok(captured))) => {
                stats.response(captured.status, elapsed.as_secs_f64());
                let status = captured.status.as_u16();
                let bytes = captured.body_len;
                (
                    (MirrorOutcome::completed, Verdict::Answered),
                    status,
                    bytes,
                    Outcome::Response(captured),
                )
            }
            Ended::Exchanged(Ok(Err(ShadowError::Connect))) => {
                (failed, 0, 0, Outcome::ConnectFailure)
            }
            Ended::Exchanged(Ok(Err(ShadowError::Other(e)))) => {
                // Cut by the tee: the primary's body, not v2, ended it.
                let tee_reason = self.abort.as_ref().and_then(|r| r.get());
                let ended = tee_reason.map_or(failed, |r| (r, Verdict::NotJudged));
                (ended, 0, 0, Outcome::Failed(e))
            }
            Ended::Exchanged(Err(_)) => (
                // Still taking the client's body, it was not v2 that was
                // slow: the upload stood still for the whole timeout, held
                // up by the primary's upstream (the timer waits for a
                // client that stalls).
                match &self.abort {
                    Some(tap) if tee::still_feeding(tap) => {
                        (MirrorOutcome::timeout, Verdict::NotJudged)
                    }
                    _ => (MirrorOutcome::timeout, Verdict::Failed),
                },
                0,
                0,
                Outcome::Timeout,
            ),
            // Never sent: umbra's limit dropped it, not v2's latency.
            Ended::NoPlace => (
                (MirrorOutcome::dropped_overload, Verdict::NotJudged),
                0,
                0,
                Outcome::Timeout,
            ),
            Ended::Ejected => (
                (MirrorOutcome::dropped_unresponsive, Verdict::NotJudged),
                0,
                0,
                Outcome::Unresponsive,
            ),
        };
        // Timed out while the upload was held up: v1's doing, not v2's.
        let held_up = outcome == MirrorOutcome::timeout && verdict == Verdict::NotJudged;
        // Judged first: once the outcome is counted, or the place given up
        // to a waiting shadow, the standing must be up to date.
        let sent = self.let_go.unwrap_or(admitted);
        self.target.judge(verdict, self.probe, sent);
        drop(place);
        stats.outcome(outcome);
        if let Some(slot) = self.slot {
            // A shadow cut off by the tee never saw the request; comparing
            // its "response" would blame v2 for umbra's own limit, or for
            // v1's.
            match outcome {
                MirrorOutcome::body_too_large | MirrorOutcome::dropped_overload => slot.abandon(),
                _ if held_up => slot.abandon(),
                _ => slot.fill(analysed),
            }
        }
        if let Some(logged) = self.logged {
            self.log.write(&Entry {
                client: self.client,
                method: &logged.method,
                uri: &logged.uri,
                version: logged.version,
                status,
                bytes,
                host: logged.host.as_deref().unwrap_or("-"),
                referer: logged.referer.as_deref(),
                user_agent: logged.user_agent.as_deref(),
                upstream: self.endpoint.as_str(),
                duration: elapsed,
                request_id: logged.request_id.as_deref().unwrap_or("-"),
                route: &logged.route,
                shadow: Some(&self.target.label),
                error: (outcome != MirrorOutcome::completed).then(|| outcome_name(outcome)),
            });
        }
    }
}

fn outcome_name(outcome: MirrorOutcome) -> &'static str {
    match outcome {
        MirrorOutcome::failed => "shadow_failed",
        MirrorOutcome::timeout => "shadow_timeout",
        MirrorOutcome::body_too_large => "shadow_body_too_large",
        MirrorOutcome::dropped_overload => "shadow_overload",
        MirrorOutcome::dropped_unresponsive => "shadow_unresponsive",
        _ => "shadow",
    }
}

enum ShadowError {
    Connect,
    Other(String),
}

/// Sends the shadow request and reads its whole response, keeping at most
/// `capture` body bytes.
async fn exchange(
    upstream: &Upstream<ShadowBody>,
    endpoint: usize,
    request: ShadowRequest,
    analysed: bool,
    capture: usize,
    started: Instant,
) -> Result<Captured, ShadowError> {
    match request {
        ShadowRequest::Lean(pool, prepared, body) => {
            let keep = Keep {
                headers: analysed,
                body: capture,
            };
            let answer = pool.exchange_prepared(prepared.map_err(failed)?, body, keep);
            let answer = answer.await.map_err(failed)?;
            Ok(Captured {
                status: answer.status,
                headers: answer.headers,
                body: answer.kept,
                body_len: answer.body_len,
                truncated: answer.body_len > capture as u64,
                latency: started.elapsed(),
            })
        }
        // Boxed apart: hyper's client state would double the size of every
        // shadow's future (4 KiB against 1.9 KiB, copied and allocated per
        // shadow).
        ShadowRequest::Hyper(request) => {
            let exchanged = exchange_hyper(upstream, endpoint, request, capture, started);
            Box::pin(exchanged).await
        }
    }
}

/// A shadow's exchange through hyper's client (HTTP/2 targets).
async fn exchange_hyper(
    upstream: &Upstream<ShadowBody>,
    endpoint: usize,
    request: Request<ShadowBody>,
    capture: usize,
    started: Instant,
) -> Result<Captured, ShadowError> {
    let response = upstream
        .send(endpoint, request, None, HeaderLines::Map)
        .await
        .map_err(failed)?;
    let (mut parts, mut body) = response.into_parts();
    if capture > 0 {
        // Kept for the analysis, maybe long after this exchange.
        crate::proxy::headers::detach(&mut parts.headers);
    }
    let mut kept = Vec::new();
    let mut kept_len = 0usize;
    let mut body_len = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ShadowError::Other(e.to_string()))?;
        if let Some(data) = frame.data_ref() {
            body_len += data.len() as u64;
            if kept_len < capture {
                let take = data.len().min(capture - kept_len);
                kept.push(data.slice(..take));
                kept_len += take;
            }
        }
    }
    Ok(Captured {
        status: parts.status,
        headers: parts.headers,
        body: concat(kept),
        body_len,
        truncated: body_len > kept_len as u64,
        latency: started.elapsed(),
    })
}

/// What a failed send was, for the shadow's outcome.
fn failed(error: SendError) -> ShadowError {
    if error.is_connect() {
        ShadowError::Connect
    } else {
        ShadowError::Other(error.to_string())
    }
}

/// Joins captured chunks into one buffer of their own, even a single
/// chunk: chunks are slices of the connection's read buffer (8 KiB and up),
/// which a capture waiting for the analysis would otherwise pin.
pub fn concat(chunks: Vec<Bytes>) -> Bytes {
    chunks.concat().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captured_chunks_are_copied_out_of_the_read_buffer() {
        let read_buffer = Bytes::from(vec![b'x'; 8192]);
        let one = concat(vec![read_buffer.slice(0..10)]);
        assert!(read_buffer.is_unique(), "a single chunk still pinned");
        assert_eq!(one, "x".repeat(10));
        let two = concat(vec![Bytes::from_static(b"ab"), Bytes::from_static(b"cd")]);
        assert_eq!(two, "abcd");
        assert!(concat(Vec::new()).is_empty());
    }

    #[test]
    fn shadow_host_goes_before_the_port() {
        assert_eq!(shadow_host("httpbin:8000"), "httpbin-shadow:8000");
        assert_eq!(shadow_host("httpbin"), "httpbin-shadow");
        assert_eq!(shadow_host("[::1]:8000"), "[::1]-shadow:8000");
        assert_eq!(shadow_host("[::1]"), "[::1]-shadow");
        assert_eq!(shadow_host("api.example.com"), "api.example.com-shadow");
    }

    #[test]
    fn request_id_roll_is_stable_and_spread() {
        assert_eq!(request_id_roll(b"abc"), request_id_roll(b"abc"));
        let under_tenth = (0..10_000)
            .filter(|i| request_id_roll(format!("req-{i}").as_bytes()) < 100_000)
            .count();
        // 10% of 10 000 ± 5 standard deviations (σ = 30).
        assert!((850..=1150).contains(&under_tenth), "{under_tenth}");
    }
}
