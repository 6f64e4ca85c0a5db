//! Shadow analysis: compares each shadow response with its primary response
//! (status, headers, JSON-aware body), filters noise, aggregates per route and
//! endpoint, and gives a PROMOTE / HOLD / REJECT verdict.
//!
//! The proxy and mirror modules only build [`Sample`]s and hand them to
//! [`Analyzer::submit`], which never blocks: comparison runs on a bounded
//! worker queue off the hot path. [`diff`] compares one pair (noise rules 1
//! and 2), [`report`] aggregates and judges (rules 3 and 4, verdicts),
//! [`stats`] holds the tests, [`template`] groups paths into endpoints and
//! [`store`] persists aggregates to SQLite.

pub mod diff;
pub mod report;
pub mod stats;
pub mod store;
pub mod template;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tracing::{error, warn};

use crate::config::model::AnalysisSettings;
use crate::metrics;
use diff::Rules;
pub use report::{render_table, Report};
use report::{EndpointState, Example, RouteState, Thresholds};

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

impl Captured {
    /// About the memory it holds: the header map's slots (a name, a value
    /// and links each), the names and values, and the body.
    fn size(&self) -> usize {
        const SLOT: usize = size_of::<(HeaderName, HeaderValue)>() + 2 * size_of::<usize>();
        let bytes: usize = self
            .headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len())
            .sum();
        self.headers.capacity() * SLOT + bytes + self.body.len()
    }
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
    /// Not sent: the target is ejected for failing shadows in a row
    /// (`mirror::ejection`). For v2 that is an error like the failures
    /// that got it ejected; leaving such pairs out would hide a dead v2
    /// behind "not enough traffic".
    Unresponsive,
}

impl Outcome {
    fn size(&self) -> usize {
        match self {
            Outcome::Response(captured) => captured.size(),
            Outcome::Failed(reason) => reason.len(),
            Outcome::ConnectFailure | Outcome::Timeout | Outcome::Unresponsive => 0,
        }
    }
}

/// A primary/shadow pair for one request, joined by request id.
#[derive(Debug, Clone)]
pub struct Sample {
    pub virtual_service: Arc<str>,
    pub route: Arc<str>,
    pub host: String,
    /// The Host the shadow's `-shadow` Host was made from: the one the
    /// primary carried upstream, after `rewrite.authority`. `None` when
    /// the suffix is off, so nothing is mapped back.
    pub suffixed_host: Option<String>,
    /// The primary destination key and the shadow's mirror label, for the
    /// report's `primary` and `shadow` fields.
    pub primary_destination: Arc<str>,
    pub shadow_destination: Arc<str>,
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

impl Sample {
    /// About the memory it holds, for the queue's byte budget.
    fn size(&self) -> usize {
        size_of::<Sample>()
            + self.host.len()
            + self.suffixed_host.as_ref().map_or(0, String::len)
            + self.path.len()
            + self.request_id.len()
            + self.primary.size()
            + self.shadow.size()
            + self.baseline.as_ref().map_or(0, Outcome::size)
    }
}

/// Samples waiting for the worker; beyond this they are dropped and counted.
const QUEUE: usize = 4096;
/// Memory those samples may hold ([`Sample::size`]); beyond this they are
/// dropped and counted the same way. A pair of small JSON responses (the
/// soak test's) is about 2.6 KiB, so ~1,600 fit: 65 ms of pairs at 25k/s.
/// Pairs of 256 KiB bodies would have taken 2 GiB under the count alone.
const QUEUE_BYTES: usize = 4 * 1024 * 1024;
/// Identical-request fingerprints remembered per endpoint (noise rule 4).
const LEARNED_PER_ENDPOINT: usize = 256;
/// How often changed aggregates are written to SQLite.
const PERSIST_EVERY: Duration = Duration::from_secs(1);
/// How long the worker lets samples queue up after draining the queue.
const LINGER: Duration = Duration::from_millis(1);
/// How much nicer than the proxy the worker runs. Comparing is background
/// work: when the CPU is short, the proxy's workers must win it, and the
/// bounded queue drops (and counts) what the worker cannot keep up with.
/// At the proxy's priority the worker's wake-ups preempted them: with +5
/// (about a third of a proxy thread's share when they contend) the
/// bench's analysis route served 3-15% more requests in alternating runs
/// and still compared every pair.
const NICER_BY: i32 = 5;

/// The database's and the state's errors are shown, not chained as
/// sources: with both, `{:#}` said each cause twice ("file is not a
/// database: file is not a database: Error code 26: …").
#[derive(Debug, thiserror::Error)]
pub enum AnalysisError {
    #[error("analysis database: {0}")]
    Database(rusqlite::Error),
    #[error("analysis state: {0}")]
    State(serde_json::Error),
    #[error("cannot start the analysis worker: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot fetch the report from {0}: {1}")]
    Fetch(String, String),
    /// `umbra report --db` with a path where nothing is: a typo, most
    /// likely, and not an empty report.
    #[error("no analysis database at {}: check the path (`umbra run --analysis-db` writes it)", .0.display())]
    NoDatabase(PathBuf),
    /// `umbra report --db` with a file umbra cannot read a report from.
    #[error("{} is not an analysis database umbra can read ({why}): check the path (`umbra run --analysis-db` writes it)", .path.display())]
    NotADatabase { path: PathBuf, why: String },
}

impl From<rusqlite::Error> for AnalysisError {
    fn from(error: rusqlite::Error) -> Self {
        AnalysisError::Database(error)
    }
}

impl From<serde_json::Error> for AnalysisError {
    fn from(error: serde_json::Error) -> Self {
        AnalysisError::State(error)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    route: metrics::Label,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    route: metrics::Label,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: metrics::Label,
}

#[derive(Default)]
struct AnalysisMetrics {
    comparisons: Family<ResultLabels, Counter>,
    differences: Family<KindLabels, Counter>,
    dropped: Family<ReasonLabels, Counter>,
    verdict: Family<RouteLabel, Gauge>,
}

struct Shared {
    routes: Mutex<BTreeMap<Arc<str>, RouteState>>,
    /// Shared, so a sample takes a reference count, not a copy of lists.
    settings: RwLock<BTreeMap<String, Arc<AnalysisSettings>>>,
    metrics: AnalysisMetrics,
    /// [`Sample::size`] of the samples in the queue.
    queued_bytes: AtomicUsize,
    /// Set when a reload changed routes' thresholds: the worker saves every
    /// route at its next write, so the database judges by them too.
    resave: AtomicBool,
    /// The analysed routes of the config in force (`None` until one is
    /// set): a late sample of another is not counted.
    current: RwLock<Option<HashSet<Arc<str>>>>,
    /// Routes a reload removed, for the worker to forget (its own state
    /// and the database's).
    forgotten: Mutex<Vec<Arc<str>>>,
}

impl Shared {
    fn new(routes: BTreeMap<Arc<str>, RouteState>, metrics: AnalysisMetrics) -> Shared {
        Shared {
            routes: Mutex::new(routes),
            settings: RwLock::new(BTreeMap::new()),
            metrics,
            queued_bytes: AtomicUsize::new(0),
            resave: AtomicBool::new(false),
            current: RwLock::new(None),
            forgotten: Mutex::new(Vec::new()),
        }
    }

    /// The routes' state. A panic while it was held (a bug in one
    /// comparison) may have left one sample half counted; that is better
    /// than stopping the analysis.
    fn routes(&self) -> MutexGuard<'_, BTreeMap<Arc<str>, RouteState>> {
        self.routes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `route` is of the config in force. Asked with the routes'
    /// lock held, as `keep_routes` changes both under it: a sample then
    /// either counts before a reload removes its route, or not at all.
    fn is_current(&self, route: &str) -> bool {
        let current = self.current.read();
        let current = current.unwrap_or_else(PoisonError::into_inner);
        current.as_ref().is_none_or(|c| c.contains(route))
    }
}

enum Message {
    /// With its size, taken off `queued_bytes` when the worker takes it.
    Sample(Box<Sample>, usize),
    Flush(SyncSender<()>),
}

/// The analysis engine: a bounded queue in front of one worker thread.
pub struct Analyzer {
    tx: SyncSender<Message>,
    shared: Arc<Shared>,
}

impl Analyzer {
    /// Starts the worker. With `db`, aggregates are loaded from and saved
    /// to that SQLite file, so counts survive restarts.
    pub fn start(
        db: Option<&Path>,
        registry: &mut Registry,
    ) -> Result<Arc<Analyzer>, AnalysisError> {
        let store = db.map(store::Store::open).transpose()?;
        let routes = match &store {
            Some(store) => store.load()?,
            None => BTreeMap::new(),
        };
        let metrics = AnalysisMetrics::default();
        registry.register(
            metrics::SHADOW_COMPARISONS,
            "Shadow/primary comparisons by route and result",
            metrics.comparisons.clone(),
        );
        registry.register(
            metrics::SHADOW_DIFFERENCES,
            "Differences found (after built-in and configured noise rules) by route and kind",
            metrics.differences.clone(),
        );
        registry.register(
            metrics::SHADOW_DROPPED,
            "Analysis samples dropped, by reason",
            metrics.dropped.clone(),
        );
        registry.register(
            metrics::SHADOW_VERDICT,
            "Verdict per route: 1 PROMOTE, 0 HOLD, -1 REJECT",
            metrics.verdict.clone(),
        );
        let shared = Arc::new(Shared::new(routes, metrics));
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let worker = Worker {
            shared: shared.clone(),
            store,
            dirty: BTreeSet::new(),
            routes: HashMap::new(),
            key: String::new(),
            hosts: None,
            persisted: Instant::now(),
        };
        std::thread::Builder::new()
            .name("umbra-analysis".into())
            .spawn(move || worker.run(rx))?;
        Ok(Arc::new(Analyzer { tx, shared }))
    }

    /// Settings per VirtualService name; missing ones use the defaults.
    /// Routes judge by the new thresholds at once, not from their next
    /// sample on: a route without traffic would keep the old ones for good.
    pub fn set_settings(&self, settings: BTreeMap<String, AnalysisSettings>) {
        let settings: BTreeMap<String, Arc<AnalysisSettings>> = settings
            .into_iter()
            .map(|(name, s)| (name, Arc::new(s)))
            .collect();
        let defaults = AnalysisSettings::default();
        let mut changed = false;
        for route in self.shared.routes().values_mut() {
            if route.virtual_service.is_empty() {
                continue;
            }
            let wanted = settings.get(&route.virtual_service);
            let wanted = Thresholds::from(wanted.map_or(&defaults, |s| &**s));
            if route.thresholds != wanted {
                route.thresholds = wanted;
                changed = true;
            }
        }
        if changed {
            self.shared.resave.store(true, Ordering::Relaxed);
        }
        if let Ok(mut current) = self.shared.settings.write() {
            *current = settings;
        }
    }

    /// The analysed routes (`MirrorTarget::analysed_as`) of the config now
    /// in force. The others' analysis (a route the reload removed, or one
    /// renamed) is dropped from the report, the verdict gauge and the
    /// database, and a sample of theirs still in flight is not counted: the
    /// report is of the routes that exist.
    pub fn keep_routes(&self, current: HashSet<Arc<str>>) {
        let mut removed = Vec::new();
        // All under the routes' lock, which the worker holds to count a
        // sample and a report to set a route's gauge: neither can bring
        // back a route removed here.
        let mut routes = self.shared.routes();
        routes.retain(|name, _| {
            let kept = current.contains(name);
            if !kept {
                removed.push(name.clone());
            }
            kept
        });
        for name in &removed {
            let label = RouteLabel {
                route: metrics::Label::from(&**name),
            };
            self.shared.metrics.verdict.remove(&label);
        }
        if let Ok(mut known) = self.shared.current.write() {
            *known = Some(current);
        }
        drop(routes);
        (self.shared.forgotten.lock())
            .unwrap_or_else(PoisonError::into_inner)
            .extend(removed);
    }

    /// Queues a sample; never blocks. A full queue (by count or by bytes)
    /// drops it, counted. A sample larger than the byte budget still goes
    /// into an empty queue.
    pub fn submit(&self, sample: Sample) {
        let size = sample.size();
        let queued = &self.shared.queued_bytes;
        let before = queued.fetch_add(size, Ordering::Relaxed);
        let reason = if before > 0 && before + size > QUEUE_BYTES {
            "queue_full"
        } else {
            match self.tx.try_send(Message::Sample(Box::new(sample), size)) {
                Ok(()) => return,
                Err(TrySendError::Full(_)) => "queue_full",
                Err(TrySendError::Disconnected(_)) => "worker_stopped",
            }
        };
        queued.fetch_sub(size, Ordering::Relaxed);
        self.shared
            .metrics
            .dropped
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Waits until every queued sample is processed and saved.
    pub fn flush(&self) {
        let (ack, done) = mpsc::sync_channel(1);
        if self.tx.send(Message::Flush(ack)).is_ok() {
            let _ = done.recv_timeout(Duration::from_secs(10));
        }
    }

    /// Judges every route now, and sets `umbra_shadow_verdict` to match.
    /// The routes' lock is taken route by route, not across all of them:
    /// the worker needs it for every sample, and while a report holds it
    /// samples queue up (and past the queue's bounds are dropped).
    pub fn report(&self) -> Report {
        let names: Vec<Arc<str>> = self.shared.routes().keys().cloned().collect();
        let routes: Vec<_> = names
            .iter()
            .filter_map(|name| {
                // The gauge is set under the lock: a reload that removed
                // the route meanwhile has removed its gauge for good.
                let routes = self.shared.routes();
                let route = routes.get(name).map(RouteState::report)?;
                self.shared
                    .metrics
                    .verdict
                    .get_or_create(&RouteLabel {
                        route: metrics::Label::from(route.name.as_str()),
                    })
                    .set(report::verdict_value(&route.verdict));
                Some(route)
            })
            .collect();
        Report { routes }
    }

    /// Brings `umbra_shadow_verdict` up to date, for a Prometheus scrape:
    /// the gauges are set when the report is made, and a user who only
    /// scrapes would otherwise never see a verdict, or see a stale one.
    pub fn update_verdicts(&self) {
        self.report();
    }
}

/// Lowers the calling thread's priority by [`NICER_BY`].
#[cfg(target_os = "linux")]
fn run_nicer() {
    // SAFETY: both calls only take integers. On Linux a nice value belongs
    // to a thread and `who == 0` names the caller, so this changes the
    // calling thread alone; raising it needs no privilege (the kernel
    // stops it at 19).
    let failed = unsafe {
        let current = libc::getpriority(libc::PRIO_PROCESS, 0);
        libc::setpriority(libc::PRIO_PROCESS, 0, current + NICER_BY) != 0
    };
    if failed {
        let error = std::io::Error::last_os_error();
        warn!(%error, "the analysis thread keeps the proxy's priority");
    }
}

/// Elsewhere `nice` would slow the whole process down.
#[cfg(not(target_os = "linux"))]
fn run_nicer() {}

/// The report stored in an analysis database, without a running proxy.
/// Whatever keeps it from being read (a directory, a file that is not a
/// database, one that is but not umbra's, a route's state that does not
/// parse) names the path.
pub fn report_from_db(path: &Path) -> Result<Report, AnalysisError> {
    let unreadable = |why: String| AnalysisError::NotADatabase {
        path: path.to_path_buf(),
        why,
    };
    let routes = store::Store::open_existing(path)
        .and_then(|store| store.load())
        .map_err(|error| match error {
            AnalysisError::Database(why) => unreadable(why.to_string()),
            AnalysisError::State(why) => unreadable(why.to_string()),
            other => other,
        })?;
    Ok(Report {
        routes: routes.values().map(RouteState::report).collect(),
    })
}

/// Primary fingerprints of recent requests for one endpoint.
#[derive(Default)]
struct Learned {
    order: VecDeque<u64>,
    /// By request fingerprint: the last primary's digest and fingerprint.
    seen: HashMap<u64, (u64, BTreeMap<String, u64>)>,
}

struct Worker {
    shared: Arc<Shared>,
    store: Option<store::Store>,
    dirty: BTreeSet<String>,
    /// Worker-only state per route (the report's is `shared.routes`).
    routes: HashMap<Arc<str>, PerRoute>,
    /// Reused for each sample's endpoint key (`METHOD /template`).
    key: String,
    /// The last sample's Host and its shadow Host.
    hosts: Option<diff::Hosts>,
    /// When aggregates were last written (or found clean).
    persisted: Instant,
}

/// What the worker keeps per route: its `umbra_shadow_comparisons_total`
/// series, taken from the family once (each lookup there allocates the
/// label and takes a lock), and the noise learned per endpoint.
struct PerRoute {
    error: Counter,
    matched: Counter,
    mismatched: Counter,
    /// By endpoint key.
    learned: HashMap<String, Learned>,
    /// The rules the learned fingerprints were made under (ignored paths,
    /// capture cap): a reload that changes them starts the learning over.
    learned_under: (Vec<String>, usize),
}

impl PerRoute {
    fn of(family: &Family<ResultLabels, Counter>, route: &str) -> PerRoute {
        let series = |result| {
            family
                .get_or_create(&ResultLabels {
                    route: metrics::Label::from(route),
                    result,
                })
                .clone()
        };
        PerRoute {
            error: series("error"),
            matched: series("match"),
            mismatched: series("mismatch"),
            learned: HashMap::new(),
            learned_under: (Vec::new(), 0),
        }
    }
}

impl Worker {
    fn run(mut self, rx: mpsc::Receiver<Message>) {
        run_nicer();
        loop {
            match rx.recv_timeout(PERSIST_EVERY.saturating_sub(self.persisted.elapsed())) {
                Ok(message) => {
                    self.handle(message);
                    while let Ok(message) = rx.try_recv() {
                        self.handle(message);
                        // A queue that never empties (overload) must not
                        // hold back the writes either.
                        self.persist_when_due();
                    }
                    // Let samples gather before blocking again: a blocked
                    // worker costs each submit a futex wake-up and preempts
                    // a proxy thread (measured: 55k wake-ups in 5 s at 19k
                    // compared pairs/s).
                    std::thread::sleep(LINGER);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.persist();
                    return;
                }
            }
            // Also under steady traffic, which never lets the wait time out.
            self.persist_when_due();
        }
    }

    /// Runs `work` (on a sample of `route`) so that a panic (a bug in one
    /// comparison) costs its sample, counted, and not the worker thread
    /// with every later sample. Unwinding is safe here: `process` counts
    /// nothing before its comparisons are done.
    fn guarded(&mut self, route: &str, work: impl FnOnce(&mut Worker)) {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(self)));
        if let Err(panic) = outcome {
            let message = panic
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
                .unwrap_or("(no message)");
            error!(
                route,
                panic = message,
                "analysing a sample panicked: sample dropped, analysis goes on"
            );
            self.shared
                .metrics
                .dropped
                .get_or_create(&ReasonLabels {
                    reason: "analysis_panic",
                })
                .inc();
        }
    }

    fn persist_when_due(&mut self) {
        if self.persisted.elapsed() >= PERSIST_EVERY {
            self.persist();
        }
    }

    fn handle(&mut self, message: Message) {
        match message {
            Message::Sample(sample, size) => {
                self.shared.queued_bytes.fetch_sub(size, Ordering::Relaxed);
                let route = sample.route.clone();
                self.guarded(&route, |worker| worker.process(*sample));
            }
            Message::Flush(ack) => {
                self.persist();
                let _ = ack.send(());
            }
        }
    }

    fn persist(&mut self) {
        self.persisted = Instant::now();
        self.forget();
        if self.shared.resave.swap(false, Ordering::Relaxed) {
            let names: Vec<String> = self.shared.routes().keys().map(|n| n.to_string()).collect();
            self.dirty.extend(names);
        }
        if self.dirty.is_empty() {
            return;
        }
        let Some(store) = self.store.as_mut() else {
            self.dirty.clear();
            return;
        };
        let routes = self.shared.routes();
        let snapshot: Vec<RouteState> = self
            .dirty
            .iter()
            .filter_map(|name| routes.get(name.as_str()).cloned())
            .collect();
        drop(routes);
        match store.save(&snapshot) {
            Ok(()) => self.dirty.clear(),
            Err(error) => warn!(%error, "cannot save analysis state"),
        }
    }

    /// Drops what it keeps of the routes a reload removed, here and in the
    /// database.
    fn forget(&mut self) {
        let forgotten = std::mem::take(
            &mut *(self.shared.forgotten.lock()).unwrap_or_else(PoisonError::into_inner),
        );
        if forgotten.is_empty() {
            return;
        }
        // Left dirty: a route a later reload brought back has new state
        // to save after the delete (a removed one's is gone, so skipped).
        for name in &forgotten {
            self.routes.remove(name);
        }
        if let Some(store) = self.store.as_mut() {
            if let Err(error) = store.delete(forgotten.iter().map(|name| &**name)) {
                warn!(%error, "cannot remove removed routes from the analysis database");
            }
        }
    }

    fn process(&mut self, sample: Sample) {
        if !self.shared.is_current(&sample.route) {
            // Of a route a reload removed, still in flight then.
            return;
        }
        let settings = self
            .shared
            .settings
            .read()
            .ok()
            .and_then(|s| s.get(&*sample.virtual_service).cloned())
            .unwrap_or_default();
        if !settings.enabled {
            return;
        }
        let metrics = &self.shared.metrics;
        let per_route = self
            .routes
            .entry(sample.route.clone())
            .or_insert_with(|| PerRoute::of(&metrics.comparisons, &sample.route));
        let Outcome::Response(primary) = &sample.primary else {
            // The primary failed: nothing to compare, and nothing v2 did.
            let mut routes = self.shared.routes();
            if !self.shared.is_current(&sample.route) {
                return;
            }
            let route = route_entry(&mut routes, &sample, &settings);
            route.errors.primary_failures += 1;
            // Saved like any other count: `umbra report --db` shows it.
            if !self.dirty.contains(&route.name) {
                self.dirty.insert(route.name.clone());
            }
            per_route.error.inc();
            return;
        };
        // Made again only when the Host changes (rarely, within a route).
        // Nothing is mapped back when the shadow kept the primary's Host.
        let hosts = match sample.suffixed_host.as_deref() {
            Some(host) => {
                if self.hosts.as_ref().is_none_or(|h| h.primary() != host) {
                    self.hosts = Some(diff::Hosts::new(host));
                }
                self.hosts.as_ref()
            }
            None => None,
        };
        let rules = Rules {
            ignore_headers: &settings.ignore_headers,
            ignore_paths: &settings.ignore_paths,
            hosts,
        };
        let cap = settings.max_capture_bytes;
        let key = &mut self.key;
        key.clear();
        key.push_str(sample.method.as_str());
        key.push(' ');
        template::template_into(&sample.path, key);
        let endpoint_key = key.as_str();

        if per_route.learned_under.0 != settings.ignore_paths || per_route.learned_under.1 != cap {
            per_route.learned.clear();
            per_route.learned_under = (settings.ignore_paths.clone(), cap);
        }
        // Rule 4: learn noise from identical requests (only without a
        // baseline), under the endpoint's key, capped with the endpoints
        // below. Digested before the lock. Not from a pair whose shadow an
        // ejection dropped: its primary body was not captured, and an
        // empty body would look like every field changing.
        let learns = settings.baseline.is_none() && !matches!(sample.shadow, Outcome::Unresponsive);
        let digest = learns.then(|| diff::digest(primary));

        let mut routes = self.shared.routes();
        // Again under the lock: a reload may have removed the route while
        // this sample was compared (see `keep_routes`).
        if !self.shared.is_current(&sample.route) {
            return;
        }
        let route = route_entry(&mut routes, &sample, &settings);
        let overflow;
        let (key, path) = if route.endpoints.contains_key(endpoint_key)
            || route.endpoints.len() < template::MAX_ENDPOINTS
        {
            (
                endpoint_key,
                &endpoint_key[sample.method.as_str().len() + 1..],
            )
        } else {
            overflow = format!("{} {}", sample.method, template::OVERFLOW);
            (overflow.as_str(), template::OVERFLOW)
        };
        // Everything that could fail (a bug in one comparison panics) runs
        // before anything is counted: a panic then costs only its sample
        // (see `guarded`), never half of one.
        let changed = digest.and_then(|digest| {
            learn(
                &mut per_route.learned,
                key,
                sample.request_fingerprint,
                digest,
                || diff::fingerprint(primary, &rules, cap),
            )
        });
        let compared = match &sample.shadow {
            Outcome::Response(shadow) => {
                #[cfg(test)]
                if tests::PANIC_IN_COMPARISON.get() {
                    panic!("a bug in one comparison");
                }
                let differences = diff::compare(primary, shadow, &rules, cap);
                // Rule 3: the baseline measures how much v1 differs from itself.
                let baseline = match &sample.baseline {
                    Some(Outcome::Response(baseline)) => {
                        Some(diff::compare(primary, baseline, &rules, cap))
                    }
                    _ => None,
                };
                Ok((shadow, differences, baseline))
            }
            failure => Err(failure),
        };

        if !self.dirty.contains(&route.name) {
            self.dirty.insert(route.name.clone());
        }
        route.samples += 1;
        if primary.status.is_server_error() {
            route.primary_errors += 1;
            route.errors.primary_5xx += 1;
        }
        let micros = |d: Duration| d.as_micros().min(u128::from(u64::MAX)) as u64;
        route.latency_primary.record(micros(primary.latency));
        route
            .reservoir_primary
            .add(primary.latency.as_secs_f64() * 1000.0);
        let endpoint = match route.endpoints.get_mut(key) {
            Some(endpoint) => endpoint,
            None => route
                .endpoints
                .entry(key.into())
                .or_insert_with(|| EndpointState {
                    method: sample.method.to_string(),
                    path: path.into(),
                    ..EndpointState::default()
                }),
        };
        if let Some(changed) = changed {
            endpoint.noise_pairs += 1;
            for location in changed {
                endpoint.fields.entry(location).or_default().learned += 1;
            }
        }
        let (shadow, differences, baseline) = match compared {
            Ok(compared) => compared,
            Err(failure) => {
                route.shadow_errors += 1;
                match failure {
                    Outcome::ConnectFailure => route.errors.shadow_connect_failures += 1,
                    Outcome::Timeout => route.errors.shadow_timeouts += 1,
                    Outcome::Unresponsive => route.errors.shadow_unresponsive += 1,
                    _ => route.errors.shadow_failures += 1,
                }
                per_route.error.inc();
                return;
            }
        };
        if shadow.status.is_server_error() {
            route.shadow_errors += 1;
            route.errors.shadow_5xx += 1;
        }
        route.latency_shadow.record(micros(shadow.latency));
        route
            .reservoir_shadow
            .add(shadow.latency.as_secs_f64() * 1000.0);
        endpoint.latency_primary.add_capped(
            primary.latency.as_secs_f64() * 1000.0,
            report::ENDPOINT_RESERVOIR,
        );
        endpoint.latency_shadow.add_capped(
            shadow.latency.as_secs_f64() * 1000.0,
            report::ENDPOINT_RESERVOIR,
        );
        route.compared += 1;
        endpoint.compared += 1;
        let mut locations: Vec<&str> = Vec::with_capacity(differences.len());
        for d in &differences {
            let field = endpoint.fields.entry(d.location.clone()).or_default();
            field.kind = d.kind.to_string();
            field.raw += 1;
            field.example(Example {
                request_id: sample.request_id.clone(),
                primary: d.primary.clone(),
                shadow: d.shadow.clone(),
            });
            locations.push(&d.location);
            metrics
                .differences
                .get_or_create(&KindLabels {
                    route: metrics::Label::from(&*sample.route),
                    kind: d.kind,
                })
                .inc();
        }
        endpoint.count_signature(&locations);
        if differences.is_empty() {
            per_route.matched.inc();
        } else {
            per_route.mismatched.inc();
        }
        if let Some(baseline) = baseline {
            endpoint.baseline_compared += 1;
            for d in baseline {
                endpoint.fields.entry(d.location).or_default().baseline += 1;
            }
        }
    }
}
/// Remembers the primary's `digest` and fingerprint for the request with
/// fingerprint `request`, under endpoint `key`; returns the locations that
/// differ from the last primary of an identical request, if there was one.
/// The fingerprint is made only when the digest differs from that
/// primary's (or there was none).
fn learn(
    learned: &mut HashMap<String, Learned>,
    key: &str,
    request: u64,
    digest: u64,
    fingerprint: impl FnOnce() -> BTreeMap<String, u64>,
) -> Option<Vec<String>> {
    // Looked up before inserting: the key is allocated only once.
    let learned = match learned.get_mut(key) {
        Some(learned) => learned,
        None => learned.entry(key.into()).or_default(),
    };
    let previous = learned.seen.get(&request);
    if previous.is_some_and(|(last, _)| *last == digest) {
        // Answered exactly as last time: nothing is noise here.
        return Some(Vec::new());
    }
    let current = fingerprint();
    let changed = previous.map(|(_, previous)| {
        let mut changed: Vec<String> = current
            .iter()
            .filter(|(k, v)| previous.get(*k) != Some(v))
            .map(|(k, _)| k.clone())
            .collect();
        changed.extend(
            previous
                .keys()
                .filter(|k| !current.contains_key(*k))
                .cloned(),
        );
        changed
    });
    // Moved in, not copied.
    if learned.seen.insert(request, (digest, current)).is_none() {
        learned.order.push_back(request);
        if learned.order.len() > LEARNED_PER_ENDPOINT {
            if let Some(old) = learned.order.pop_front() {
                learned.seen.remove(&old);
            }
        }
    }
    changed
}

fn route_entry<'a>(
    routes: &'a mut BTreeMap<Arc<str>, RouteState>,
    sample: &Sample,
    settings: &AnalysisSettings,
) -> &'a mut RouteState {
    let fresh = || RouteState {
        name: sample.route.to_string(),
        ..RouteState::default()
    };
    let route = routes.entry(sample.route.clone()).or_insert_with(fresh);
    // A reload (or a restart with the database) that mirrors the route to
    // another target starts its analysis over: the counts so far are the
    // old target's, and judging the new one by them would blame (or
    // clear) it for what another version did. A shadow still in flight to
    // the old target when the new one answered starts it over once more,
    // costing the few samples taken in between, never mixing the two.
    if !route.shadow.is_empty() && *route.shadow != *sample.shadow_destination {
        *route = fresh();
    }
    // Refreshed for each sample (a reload may change them), copied only
    // when they did change.
    if *route.virtual_service != *sample.virtual_service {
        route.virtual_service = sample.virtual_service.to_string();
    }
    if route.host != sample.host {
        route.host.clone_from(&sample.host);
    }
    if *route.primary != *sample.primary_destination {
        route.primary = sample.primary_destination.to_string();
    }
    if *route.shadow != *sample.shadow_destination {
        route.shadow = sample.shadow_destination.to_string();
    }
    route.thresholds = Thresholds::from(settings);
    route
}

/// `umbra report`.
#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// The admin address of a running umbra.
    #[arg(long, default_value = "http://127.0.0.1:15000")]
    pub admin: String,
    /// Read a saved analysis database instead (works after umbra stopped).
    #[arg(long)]
    pub db: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "table")]
    pub format: ReportFormat,
    /// Refresh every `--interval` seconds until interrupted.
    #[arg(long)]
    pub watch: bool,
    /// Seconds between two refreshes with `--watch` (at least 0.2).
    #[arg(long, default_value = "2", value_parser = crate::seconds)]
    pub interval: Duration,
}

/// The shortest `--watch` interval: a redraw takes a report and a request.
const MIN_INTERVAL: Duration = Duration::from_millis(200);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    Table,
    Json,
}

pub async fn report_cli(args: ReportArgs) -> anyhow::Result<()> {
    loop {
        let report = match &args.db {
            Some(db) => report_from_db(db)?,
            None => fetch_report(&args.admin).await?,
        };
        let text = match args.format {
            ReportFormat::Table => render_table(&report),
            ReportFormat::Json => serde_json::to_string_pretty(&report)? + "\n",
        };
        // With --watch, clear the screen and redraw, like `watch`.
        let clear = if args.watch { "\x1b[2J\x1b[H" } else { "" };
        crate::print(&format!("{clear}{text}"))?;
        if !args.watch {
            return Ok(());
        }
        tokio::time::sleep(args.interval.max(MIN_INTERVAL)).await;
    }
}

/// `GET {admin}/shadow/report` from a running umbra.
pub async fn fetch_report(admin: &str) -> Result<Report, AnalysisError> {
    use http_body_util::BodyExt;
    let admin = admin.trim_end_matches('/');
    let base = match admin.split_once("://") {
        Some(("http", _)) => admin.to_string(),
        // `https://…` became `http://https://…`, which failed to connect.
        Some(_) => return Err(AnalysisError::Fetch(
            format!("{admin}/shadow/report"),
            "the admin listener speaks plain HTTP: give --admin as http://HOST:PORT or HOST:PORT"
                .into(),
        )),
        None => format!("http://{admin}"),
    };
    let url = format!("{base}/shadow/report");
    let fail = |e: &dyn std::fmt::Display| AnalysisError::Fetch(url.clone(), e.to_string());
    let uri: http::Uri = url.parse().map_err(|e| fail(&e))?;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<Bytes>>();
    let response = tokio::time::timeout(Duration::from_secs(10), client.get(uri))
        .await
        .map_err(|e| fail(&e))?
        .map_err(|e| {
            // The client's own message is "client error (Connect)": the
            // cause (refused, unreachable…) is in its sources.
            let mut why = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                why = format!("{why}: {cause}");
                source = cause.source();
            }
            if e.is_connect() {
                why.push_str(" (is umbra running, with its --admin at this address?)");
            }
            fail(&why)
        })?;
    if !response.status().is_success() {
        return Err(fail(&response.status()));
    }
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| fail(&e))?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| fail(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(path: &str, primary: Outcome) -> Sample {
        Sample {
            virtual_service: "vs".into(),
            route: "r1".into(),
            host: "api".into(),
            suffixed_host: Some("api".into()),
            primary_destination: "api|v1|80".into(),
            shadow_destination: "api/v2".into(),
            method: Method::GET,
            path: path.into(),
            request_id: "rid".into(),
            request_fingerprint: 0,
            primary,
            shadow: Outcome::ConnectFailure,
            baseline: None,
        }
    }

    fn worker() -> Worker {
        Worker {
            shared: Arc::new(Shared::new(BTreeMap::new(), AnalysisMetrics::default())),
            store: None,
            dirty: BTreeSet::new(),
            routes: HashMap::new(),
            key: String::new(),
            hosts: None,
            persisted: Instant::now(),
        }
    }

    thread_local! {
        /// Makes `process` panic where it compares, as a bug there would.
        pub static PANIC_IN_COMPARISON: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    #[test]
    fn a_panicking_comparison_costs_its_sample_not_the_analysis() {
        let mut worker = worker();
        let pair = || {
            let mut pair = sample("/", ok());
            pair.shadow = ok();
            Message::Sample(Box::new(pair), 0)
        };
        let dropped = |worker: &Worker| {
            worker
                .shared
                .metrics
                .dropped
                .get_or_create(&ReasonLabels {
                    reason: "analysis_panic",
                })
                .get()
        };
        PANIC_IN_COMPARISON.set(true);
        worker.handle(pair());
        PANIC_IN_COMPARISON.set(false);
        assert_eq!(dropped(&worker), 1);
        assert!(
            worker.shared.routes.is_poisoned(),
            "it panicked holding the lock"
        );
        let counted = |worker: &Worker| {
            let routes = worker.shared.routes();
            routes.get("r1").map(|r| (r.samples, r.compared))
        };
        assert_eq!(
            counted(&worker),
            Some((0, 0)),
            "nothing of the dropped sample is counted"
        );
        worker.handle(pair());
        assert_eq!(counted(&worker), Some((1, 1)), "the next one is analysed");
        assert_eq!(dropped(&worker), 1);
    }

    #[test]
    fn learning_starts_over_when_the_rules_change() {
        let mut worker = worker();
        let with = |ignore_paths: &[&str]| {
            let mut settings = BTreeMap::new();
            settings.insert(
                "vs".to_string(),
                AnalysisSettings {
                    ignore_paths: ignore_paths.iter().map(|p| p.to_string()).collect(),
                    ..AnalysisSettings::default()
                },
            );
            settings
        };
        let json = |body: &'static str| {
            let mut pair = sample("/", Outcome::Response(json_response(body)));
            pair.shadow = pair.primary.clone();
            pair
        };
        let analyzer = Analyzer {
            tx: mpsc::sync_channel(1).0,
            shared: worker.shared.clone(),
        };
        analyzer.set_settings(with(&["body.a"]));
        worker.process(json(r#"{"a":1,"b":1}"#));
        // A reload stops ignoring body.a; the same bytes come again, then
        // only b changes. Fingerprints from under the old rules would make
        // body.a look changed too.
        analyzer.set_settings(with(&[]));
        worker.process(json(r#"{"a":1,"b":1}"#));
        worker.process(json(r#"{"a":1,"b":2}"#));
        let routes = worker.shared.routes();
        let fields = &routes["r1"].endpoints["GET /"].fields;
        assert_eq!(fields.get("body.b").map(|f| f.learned), Some(1));
        assert_eq!(
            fields.get("body.a").map_or(0, |f| f.learned),
            0,
            "{:?}",
            fields.keys()
        );
    }

    #[test]
    fn pairs_whose_shadow_an_ejection_dropped_teach_no_noise() {
        let mut worker = worker();
        let pair = |body: &'static str, shadow: Outcome| {
            let mut pair = sample("/", Outcome::Response(json_response(body)));
            pair.shadow = shadow;
            pair
        };
        let same = || Outcome::Response(json_response(r#"{"a":1}"#));
        worker.process(pair(r#"{"a":1}"#, same()));
        // While v2 is ejected the primary's body is not captured.
        worker.process(pair("", Outcome::Unresponsive));
        worker.process(pair(r#"{"a":1}"#, same()));
        let routes = worker.shared.routes();
        let route = &routes["r1"];
        assert_eq!(route.errors.shadow_unresponsive, 1);
        let endpoint = &route.endpoints["GET /"];
        let learned: Vec<_> = endpoint
            .fields
            .iter()
            .filter(|(_, field)| field.learned > 0)
            .map(|(location, _)| location)
            .collect();
        assert!(learned.is_empty(), "learned as noise: {learned:?}");
        // Only the third pair was learned from, against the first.
        assert_eq!(endpoint.noise_pairs, 1);
    }

    /// A small JSON response, as either side gives it.
    fn ok() -> Outcome {
        Outcome::Response(json_response(r#"{"ok":true}"#))
    }

    /// A 200 JSON response with `body`.
    fn json_response(body: &'static str) -> Captured {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        Captured {
            status: StatusCode::OK,
            headers,
            body: Bytes::from_static(body.as_bytes()),
            body_len: body.len() as u64,
            truncated: false,
            latency: Duration::from_millis(1),
        }
    }

    #[test]
    fn noise_is_fingerprinted_only_when_the_digest_changed() {
        let response = |body: &'static str| {
            let mut captured = json_response(body);
            let date = HeaderValue::from_static("noise, never digested");
            captured.headers.insert("date", date);
            captured
        };
        let mut learned = HashMap::new();
        let mut made = 0;
        let mut learn_from = |captured: Captured, date: &'static str| {
            let mut captured = captured;
            captured
                .headers
                .insert("date", HeaderValue::from_static(date));
            let rules = Rules::default();
            learn(&mut learned, "GET /a", 7, diff::digest(&captured), || {
                made += 1;
                diff::fingerprint(&captured, &rules, 1 << 20)
            })
        };
        assert_eq!(learn_from(response(r#"{"a":1,"b":2}"#), "d1"), None);
        assert_eq!(
            learn_from(response(r#"{"a":1,"b":2}"#), "d2"),
            Some(vec![]),
            "the same answer (noisy headers aside)"
        );
        assert_eq!(
            learn_from(response(r#"{"b":2,"a":1}"#), "d3"),
            Some(vec![]),
            "other bytes, the same fields"
        );
        assert_eq!(
            learn_from(response(r#"{"b":3,"a":1}"#), "d4"),
            Some(vec!["body.b".to_string()])
        );
        assert_eq!(made, 3, "not for the answer equal to the last");
    }

    #[test]
    fn learned_noise_is_capped_per_route_like_the_endpoints() {
        let mut worker = worker();
        let response = || {
            Outcome::Response(Captured {
                status: http::StatusCode::OK,
                headers: http::HeaderMap::new(),
                body: Bytes::from_static(b"ok"),
                body_len: 2,
                truncated: false,
                latency: Duration::from_millis(1),
            })
        };
        // A client walking many paths (words, not ids: each its own template).
        for i in 0..template::MAX_ENDPOINTS + 50 {
            let path = format!(
                "/{}{}",
                (b'a' + (i / 26) as u8) as char,
                (b'a' + (i % 26) as u8) as char
            );
            worker.process(sample(&path, response()));
        }
        let learned = &worker.routes["r1"].learned;
        assert_eq!(learned.len(), template::MAX_ENDPOINTS + 1);
        assert!(learned.contains_key(&format!("GET {}", template::OVERFLOW)));
        assert!(learned.contains_key("GET /aa"));
    }

    /// Submits `total` samples while the worker is held up, then counts the
    /// `queue_full` drops. The worker blocks on the routes lock with at most
    /// one sample taken off the queue; the queue fills and the rest must be
    /// dropped, without the submitting (proxy) thread ever waiting.
    fn dropped_while_the_worker_waits(
        analyzer: &Analyzer,
        total: usize,
        primary: impl Fn() -> Outcome,
    ) -> u64 {
        {
            let _held = analyzer.shared.routes.lock().unwrap();
            for _ in 0..total {
                analyzer.submit(sample("/", primary()));
            }
        }
        analyzer.flush();
        analyzer
            .shared
            .metrics
            .dropped
            .get_or_create(&ReasonLabels {
                reason: "queue_full",
            })
            .get()
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_worker_runs_nicer_than_the_proxy() {
        /// Field 19 of `/proc/.../stat`, counted after the `(comm)` field.
        /// None for a thread that has ended since it was listed.
        fn nice(stat_path: &std::path::Path) -> Option<i32> {
            let stat = std::fs::read_to_string(stat_path).ok()?;
            let after_comm = &stat[stat.rfind(')')? + 2..];
            after_comm.split(' ').nth(16)?.parse().ok()
        }
        let mut registry = Registry::default();
        let analyzer = Analyzer::start(None, &mut registry).unwrap();
        // A worker that answers a flush is running.
        analyzer.flush();
        let own = nice(Path::new("/proc/thread-self/stat")).unwrap();
        let workers: Vec<i32> = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .map(|task| task.unwrap().path())
            .filter(|task| {
                std::fs::read_to_string(task.join("comm"))
                    .is_ok_and(|comm| comm.trim_end() == "umbra-analysis")
            })
            .filter_map(|task| nice(&task.join("stat")))
            .collect();
        // Other tests' workers may not have started yet; this one has.
        assert!(
            workers.contains(&(own + NICER_BY).min(19)),
            "own nice {own}, workers {workers:?}"
        );
    }

    #[test]
    fn the_queue_holds_at_most_its_byte_budget() {
        let mut registry = Registry::default();
        let analyzer = Analyzer::start(None, &mut registry).unwrap();
        let body = Bytes::from(vec![b'x'; 1024 * 1024]);
        let big = || {
            Outcome::Response(Captured {
                status: StatusCode::OK,
                headers: HeaderMap::new(),
                body: body.clone(),
                body_len: body.len() as u64,
                truncated: false,
                latency: Duration::from_millis(1),
            })
        };
        let total = 40;
        let kept = QUEUE_BYTES / sample("/", big()).size();
        let dropped = dropped_while_the_worker_waits(&analyzer, total, big);
        assert!(
            (total - kept - 1..=total - kept).contains(&(dropped as usize)),
            "dropped {dropped}"
        );
        assert_eq!(analyzer.shared.queued_bytes.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking() {
        let mut registry = Registry::default();
        let analyzer = Analyzer::start(None, &mut registry).unwrap();
        let total = QUEUE + 10;
        let dropped = dropped_while_the_worker_waits(&analyzer, total, || Outcome::ConnectFailure);
        let processed = analyzer.report().routes[0].errors.primary_failures;
        assert!((9..=10).contains(&dropped), "dropped {dropped}");
        assert_eq!(processed + dropped, total as u64);
    }
}
