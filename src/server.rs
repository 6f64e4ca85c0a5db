//! The server: accept loops for every listener (HTTP/1.1 and cleartext
//! HTTP/2 on the same port), connection limits and timeouts, the admin
//! listener, hot reload (file changes and SIGHUP) and graceful drain.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn};

use crate::config;
use crate::proxy::{ClientCert, Peer, Proxy, Writer};

mod idle;
pub mod lean;
mod reload;
pub mod tls;

thread_local! {
    /// 1-based index of the worker thread running this code; 0 elsewhere.
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Which worker thread this is (0 outside the workers).
pub fn worker_index() -> usize {
    WORKER.with(|w| w.get())
}

/// The server's worker threads, for work that may run on any of them.
pub struct Workers {
    /// Each worker's runtime, set by the worker as it starts (before it
    /// accepts); unset if it could not start.
    handles: Box<[OnceLock<tokio::runtime::Handle>]>,
    /// Per worker: open connections plus side work (shadows) in flight, as
    /// a measure of its load.
    load: Box<[AtomicUsize]>,
    /// Per worker: open downstream connections, kept even at accept.
    connections: Box<[AtomicUsize]>,
    /// Per worker: connections other workers accepted for it to serve.
    /// Unbounded, but each entry holds a connection permit, so
    /// `max_connections` bounds it.
    inboxes: Box<[mpsc::UnboundedSender<Handoff>]>,
}

/// A connection accepted by one worker for another to serve.
struct Handoff {
    /// Deregistered from the accepting worker's reactor, to be registered
    /// with the serving one's.
    stream: std::net::TcpStream,
    peer: SocketAddr,
    /// Its listener (a TLS one: the serving worker does the handshake).
    inbound: Inbound,
    /// The connection's slot under `max_connections`.
    permit: OwnedSemaphorePermit,
    /// Counted on the serving worker from the moment it was chosen, so
    /// further accepts see it.
    counted: Load,
}

impl Workers {
    /// The workers and, per worker, the inbox it adopts connections from.
    fn new(count: usize) -> (Workers, Vec<mpsc::UnboundedReceiver<Handoff>>) {
        let (inboxes, receivers): (Vec<_>, _) =
            (0..count).map(|_| mpsc::unbounded_channel()).unzip();
        let workers = Workers {
            handles: (0..count).map(|_| OnceLock::new()).collect(),
            load: (0..count).map(|_| AtomicUsize::new(0)).collect(),
            connections: (0..count).map(|_| AtomicUsize::new(0)).collect(),
            inboxes: inboxes.into(),
        };
        (workers, receivers)
    }

    /// Runs side work (a shadow) on an idle worker (no connections, no side
    /// work in flight) if there is one, else here. With few clients the
    /// shadow's work is done by a spare core instead of delaying the
    /// primary. Busy workers keep their own: a task spawned from another
    /// thread waits in the runtime's inject queue, which a busy
    /// single-threaded runtime serves only every 31 tasks, so under load
    /// moved shadows pile up (measured: 30-40% dropped by the in-flight cap
    /// at 500 HTTP/2 streams when shadows moved to the less loaded worker).
    pub fn spawn<F>(self: &Arc<Self>, work: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let load = |i: usize| self.load[i].load(Ordering::Relaxed);
        let here = self.here();
        // Only a busy worker hands work to an idle one.
        let idle = here.filter(|&here| load(here) > 0).and_then(|here| {
            (0..self.handles.len())
                .filter(|&i| i != here && load(i) == 0)
                .find_map(|i| Some((i, self.handles[i].get()?)))
        });
        let (target, remote) = match idle {
            Some((index, handle)) => (Some(index), Some(handle)),
            None => (here, None),
        };
        let counted = target.map(|index| self.count(index, false));
        let work = async move {
            work.await;
            drop(counted);
        };
        match remote {
            Some(handle) => drop(handle.spawn(work)),
            None => drop(tokio::spawn(work)),
        }
    }

    /// This thread's worker (0-based), if it is one.
    fn here(&self) -> Option<usize> {
        worker_index()
            .checked_sub(1)
            .filter(|&here| here < self.handles.len())
    }

    /// Which worker serves a connection accepted by worker `here`: `here`,
    /// unless another has at least two fewer connections. Accepting workers
    /// race for each connection, and one that wakes first can take a whole
    /// burst (measured: in one of eight 50-connection wrk runs one worker
    /// did 81% of the work, 259 against 60 CPU ticks, and the run was
    /// 10-20% slower than the others). nginx spreads
    /// accepts with EPOLLEXCLUSIVE; here the connection is moved instead.
    fn place(&self, here: usize) -> usize {
        let open = |i: usize| self.connections[i].load(Ordering::Relaxed);
        let fewest = (0..self.connections.len())
            .filter(|&i| self.handles[i].get().is_some())
            .min_by_key(|&i| open(i))
            .unwrap_or(here);
        if open(here) >= open(fewest) + 2 {
            fewest
        } else {
            here
        }
    }

    fn count(self: &Arc<Self>, index: usize, connection: bool) -> Load {
        self.load[index].fetch_add(1, Ordering::Relaxed);
        if connection {
            self.connections[index].fetch_add(1, Ordering::Relaxed);
        }
        Load {
            workers: self.clone(),
            index,
            connection,
        }
    }
}

/// One unit of a worker's load (a connection or side work), until dropped.
struct Load {
    workers: Arc<Workers>,
    index: usize,
    /// A downstream connection (counted for balancing too), not side work.
    connection: bool,
}

impl Drop for Load {
    fn drop(&mut self) {
        self.workers.load[self.index].fetch_sub(1, Ordering::Relaxed);
        if self.connection {
            self.workers.connections[self.index].fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// CPUs this process may use: the default number of workers, and the most.
pub fn cpus() -> usize {
    static CPUS: OnceLock<usize> = OnceLock::new();
    *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Slots for per-worker state: one per possible worker plus one for
/// everything else.
pub fn worker_slots() -> usize {
    cpus() + 1
}

/// Connection-level limits and timeouts.
#[derive(Debug, Clone)]
pub struct Options {
    /// Open downstream connections; further clients wait in the backlog.
    pub max_connections: usize,
    /// How long a connection may have no request in flight (an idle
    /// keep-alive connection, a client that never sends a request, or a
    /// request head trickling in: the slowloris guard). Checked four
    /// times per period, so it is found idle between 1 and 1.25 times this
    /// after it went idle, asked to finish (HTTP/2: GOAWAY), and closed a
    /// quarter period later if still idle. HTTP/2 connections are left to
    /// HTTP/2 pings once their first request arrived.
    pub header_read_timeout: Duration,
    /// How long a client may leave its response untaken (an HTTP/1 socket
    /// full, an HTTP/2 stream without window) before the response and its
    /// upstream exchange are cut, as nginx's `send_timeout`; checked with
    /// the idle checks above. Zero: never.
    pub send_timeout: Duration,
    /// How long a client may send none of its request body (between two
    /// reads, as nginx's `client_body_timeout`) before the request ends:
    /// 408 `request_body_timeout` if the response has not begun, else the
    /// response is cut. Zero: never.
    pub body_read_timeout: Duration,
    /// HTTP/2 connections with no answer to a PING in this long are closed.
    pub idle_timeout: Duration,
    /// Largest request head accepted (431 beyond).
    pub max_header_bytes: usize,
    /// How long in-flight requests may take to finish on shutdown.
    pub drain_timeout: Duration,
    /// Threads that accept and serve connections, each with a
    /// single-threaded runtime. 0 serves on the caller's runtime.
    pub workers: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_connections: 16 * 1024,
            header_read_timeout: Duration::from_secs(10),
            send_timeout: Duration::from_secs(60),
            body_read_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            max_header_bytes: 60 * 1024,
            drain_timeout: Duration::from_secs(10),
            workers: 0,
        }
    }
}

/// Everything `run` needs: bound listeners, the proxy and its config source.
pub struct Server {
    pub proxy: Arc<Proxy>,
    pub listeners: Vec<TcpListener>,
    /// Listeners that terminate TLS with `tls`.
    pub tls_listeners: Vec<TcpListener>,
    pub tls: Option<Arc<tls::Termination>>,
    pub admin: Option<TcpListener>,
    pub registry: Arc<Registry>,
    /// Files and directories to re-read on change or SIGHUP.
    pub config_paths: Vec<PathBuf>,
    /// Watch `config_paths` for changes.
    pub watch_files: bool,
    pub options: Options,
}

/// Signals reload results to whoever watches (tests, logs): the number of
/// reload attempts so far and whether the last one succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReloadStatus {
    pub attempts: u64,
    pub last_ok: bool,
}

/// State shared by the accept loops, the reloader and the admin API.
pub struct Shared {
    pub proxy: Arc<Proxy>,
    pub registry: Arc<Registry>,
    pub ready: AtomicBool,
    pub reloads: watch::Sender<ReloadStatus>,
    config_paths: Vec<PathBuf>,
    /// The TLS listeners' certificate, re-read on every reload.
    tls: Option<Arc<tls::Termination>>,
    /// Watches the config and certificate files, if asked to.
    files: std::sync::Mutex<Option<reload::FileWatch>>,
}

impl Shared {
    /// Watches, if files are watched, the certificate files a reload
    /// re-reads: the TLS listeners' and `config`, those a config's
    /// DestinationRules name. Returns whether any of them was not watched
    /// before.
    fn follow_certificate_files(&self, config: &[PathBuf]) -> bool {
        let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        let Some(files) = files.as_mut() else {
            return false;
        };
        let listeners = self.tls.as_ref().map(|tls| tls.files()).unwrap_or_default();
        files.follow(&[listeners, config.to_vec()].concat())
    }

    /// The files the installed config's DestinationRules name.
    fn installed_files(&self) -> Vec<PathBuf> {
        self.proxy.table().config.files.clone()
    }

    /// Re-reads the config (and the TLS listeners' certificate); an invalid
    /// one is logged and the old one keeps serving. A certificate that
    /// cannot be read fails the reload, though a good config is still
    /// applied: the operator must hear of it.
    pub fn reload(&self) -> bool {
        let mut reading = self.read();
        // A file named for the first time is watched only from now on: read
        // everything once more, so that a change to it made between the
        // read and the watch is not missed.
        if self.follow_certificate_files(&reading.files(self)) {
            reading = self.read();
            self.follow_certificate_files(&reading.files(self));
        }
        let ok = self.apply(reading);
        let result = if ok { "success" } else { "failure" };
        self.proxy
            .metrics
            .reloads
            .get_or_create(&crate::metrics::ResultLabels { result })
            .inc();
        self.reloads.send_modify(|status| {
            status.attempts += 1;
            status.last_ok = ok;
        });
        ok
    }

    /// Reads the TLS listeners' certificate and the config, applying
    /// neither.
    fn read(&self) -> Reading {
        Reading {
            certificate: self.tls.as_ref().map(|tls| tls.read()),
            config: config::load(&self.config_paths),
        }
    }

    /// Installs what was read well and logs the rest: whether all of it was.
    fn apply(&self, reading: Reading) -> bool {
        let certificate_ok = match (reading.certificate, &self.tls) {
            (Some(Ok(certificate)), Some(tls)) => {
                tls.install(certificate);
                info!("TLS certificate reloaded");
                true
            }
            (Some(Err(error)), _) => {
                warn!(%error, "TLS certificate not reloaded; still serving the previous one");
                false
            }
            _ => true,
        };
        let config_ok = match reading.config {
            Ok(new) => {
                for warning in &new.warnings {
                    warn!("{warning}");
                }
                self.proxy.install(Arc::new(new));
                info!("config reloaded");
                true
            }
            Err(errors) => {
                for error in &errors.errors {
                    warn!("{error}");
                }
                warn!(
                    errors = errors.errors.len(),
                    "config reload rejected; still serving the previous config"
                );
                false
            }
        };
        certificate_ok && config_ok
    }
}

/// A reload's reading of its files, before anything is installed.
struct Reading {
    certificate: Option<Result<rustls::ServerConfig, tls::TlsError>>,
    config: Result<config::Config, config::LoadErrors>,
}

impl Reading {
    /// The config files to watch: those the new config names, or for one
    /// that will be rejected, those it named (one may be the file it waits
    /// for) and the installed config's, which keeps serving.
    fn files(&self, shared: &Shared) -> Vec<PathBuf> {
        match &self.config {
            Ok(new) => new.files.clone(),
            Err(errors) => [shared.installed_files(), errors.files.clone()].concat(),
        }
    }
}

/// A handle to a running server, for tests and `demo`.
pub struct Handle {
    pub shared: Arc<Shared>,
}

impl Handle {
    pub fn reloads(&self) -> watch::Receiver<ReloadStatus> {
        self.shared.reloads.subscribe()
    }
}

/// Serves until `shutdown` resolves, then drains. `started` receives a
/// handle once every listener is accepting.
pub async fn run(
    server: Server,
    shutdown: impl Future<Output = ()>,
    started: Option<tokio::sync::oneshot::Sender<Handle>>,
) -> std::io::Result<()> {
    let (reload_tx, _) = watch::channel(ReloadStatus::default());
    let shared = Arc::new(Shared {
        proxy: server.proxy.clone(),
        registry: server.registry.clone(),
        ready: AtomicBool::new(false),
        reloads: reload_tx,
        config_paths: server.config_paths.clone(),
        tls: server.tls.clone(),
        files: std::sync::Mutex::new(None),
    });
    if !server.tls_listeners.is_empty() && server.tls.is_none() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "TLS listeners need a certificate and key",
        ));
    }
    // Each listener, and whether it terminates TLS.
    let listeners: Vec<(TcpListener, bool)> = (server.listeners.into_iter())
        .map(|l| (l, false))
        .chain(server.tls_listeners.into_iter().map(|l| (l, true)))
        .collect();
    let (stop_tx, stop_rx) = watch::channel(false);
    let graceful = Arc::new(idle::Drain::new());
    let limit = Arc::new(Semaphore::new(server.options.max_connections));
    let options = Arc::new(server.options.clone());

    let mut acceptor = Acceptor {
        shared: shared.clone(),
        options: options.clone(),
        limit,
        graceful: graceful.clone(),
        stop: stop_rx.clone(),
        workers: None,
    };
    let mut accept_tasks = Vec::new();
    let mut threads = Vec::new();
    let (finished_tx, finished_rx) = watch::channel(false);
    for (listener, tls) in &listeners {
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, tls, "listening");
        }
    }
    if options.workers == 0 {
        for (listener, secure) in listeners {
            accept_tasks.push(tokio::spawn(acceptor.clone().run(listener, secure)));
        }
    } else {
        // Pools keep one idle list per possible worker.
        let count = options.workers.min(cpus());
        if count < options.workers {
            warn!(
                workers = options.workers,
                using = count,
                "more workers than CPUs asked for; using one per CPU"
            );
        }
        // Counted from the first accept on.
        let (workers, inboxes) = Workers::new(count);
        let workers = Arc::new(workers);
        let _ = shared.proxy.mirroring.workers.set(workers.clone());
        acceptor.workers = Some(workers.clone());
        let listeners = listeners
            .into_iter()
            .map(|(listener, secure)| Ok((listener.into_std()?, secure)))
            .collect::<std::io::Result<Vec<_>>>()?;
        // No worker accepts before all can take connections: one alone
        // would keep every early connection (see `Workers::place`).
        let started = Arc::new(std::sync::Barrier::new(count));
        for (index, inbox) in (1..=count).zip(inboxes) {
            let clones = listeners
                .iter()
                .map(|(listener, secure)| Ok((listener.try_clone()?, *secure)))
                .collect::<std::io::Result<Vec<_>>>()?;
            let (thread, stopped) = spawn_worker(
                index,
                clones,
                inbox,
                acceptor.clone(),
                workers.clone(),
                started.clone(),
                finished_rx.clone(),
            )?;
            threads.push(thread);
            accept_tasks.push(stopped);
        }
    }
    drop(acceptor);
    if let Some(admin) = server.admin {
        if let Ok(addr) = admin.local_addr() {
            if !addr.ip().is_loopback() {
                warn!(%addr, "admin listener is not on loopback: anyone who can reach it can read config and metrics");
            }
            info!(%addr, "admin listening");
        }
        // Open until the drain ends: `/ready` says 503 while it lasts, and
        // the metrics can still be scraped.
        tokio::spawn(crate::admin::serve(
            admin,
            shared.clone(),
            finished_rx.clone(),
        ));
    }
    if !server.config_paths.is_empty() {
        // SIGHUP reloads even without watching (it would end the process
        // otherwise: its default action).
        reload::spawn_reloader(shared.clone(), stop_rx.clone(), server.watch_files);
    }
    shared.ready.store(true, Ordering::Release);
    info!("ready");
    if let Some(started) = started {
        let _ = started.send(Handle {
            shared: shared.clone(),
        });
    }

    shutdown.await;
    info!("shutting down: draining in-flight requests");
    shared.ready.store(false, Ordering::Release);
    let _ = stop_tx.send(true);
    for task in accept_tasks {
        let _ = task.await;
    }
    let graceful = Arc::try_unwrap(graceful).unwrap_or_else(|_| {
        warn!("an accept loop still holds the shutdown watcher; not draining");
        idle::Drain::new()
    });
    if tokio::time::timeout(options.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        warn!("drain timeout reached; closing remaining connections");
        shared.proxy.cut_in_flight();
    }
    let _ = finished_tx.send(true);
    // Let the workers end their last exchanges (and log them) before the
    // analysis is flushed.
    let _ = tokio::task::spawn_blocking(move || {
        for thread in threads {
            let _ = thread.join();
        }
    })
    .await;
    if let Some(analyzer) = &shared.proxy.analyzer {
        analyzer.flush();
    }
    Ok(())
}

/// The listener a connection came in on.
#[derive(Clone, Copy)]
struct Inbound {
    /// It terminates TLS.
    secure: bool,
    /// Its port, which `match.port` falls back on.
    port: u16,
}

/// What an accept loop needs; cloned into each loop.
#[derive(Clone)]
struct Acceptor {
    shared: Arc<Shared>,
    options: Arc<Options>,
    /// Open downstream connections, across all loops.
    limit: Arc<Semaphore>,
    graceful: Arc<idle::Drain>,
    stop: watch::Receiver<bool>,
    /// The worker threads this loop runs on, if any; connections are kept
    /// even across them.
    workers: Option<Arc<Workers>>,
}

impl Acceptor {
    /// `secure`: the listener terminates TLS.
    async fn run(mut self, listener: TcpListener, secure: bool) {
        let port = listener.local_addr().map_or(0, |addr| addr.port());
        let inbound = Inbound { secure, port };
        loop {
            // Take a connection slot before accepting: at the limit, clients
            // wait in the kernel backlog instead of being served badly.
            let permit = tokio::select! {
                permit = self.limit.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
                _ = self.stop.changed() => return,
            };
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = self.stop.changed() => return,
            };
            let _ = stream.set_nodelay(true);
            let workers = self.workers.as_ref();
            let Some((workers, here)) = workers.and_then(|w| Some((w, w.here()?))) else {
                self.serve(stream, peer, inbound, permit, None);
                continue;
            };
            let index = workers.place(here);
            let counted = workers.count(index, true);
            if index == here {
                self.serve(stream, peer, inbound, permit, Some(counted));
                continue;
            }
            match stream.into_std() {
                Ok(stream) => {
                    let handoff = Handoff {
                        stream,
                        peer,
                        inbound,
                        permit,
                        counted,
                    };
                    if let Err(refused) = workers.inboxes[index].send(handoff) {
                        // That worker has stopped taking connections: serve
                        // this one here after all.
                        let mut handoff = refused.0;
                        handoff.counted = workers.count(here, true);
                        self.adopt_one(handoff);
                    }
                }
                Err(error) => debug!(%peer, %error, "cannot hand a connection over"),
            }
        }
    }

    /// Serves connections other workers accepted for this one.
    async fn adopt(mut self, mut inbox: mpsc::UnboundedReceiver<Handoff>) {
        loop {
            tokio::select! {
                handoff = inbox.recv() => match handoff {
                    Some(handoff) => self.adopt_one(handoff),
                    None => return,
                },
                _ = self.stop.changed() => break,
            }
        }
        // Stopping: what was handed over already is served (and drained
        // with the rest), not closed unanswered; later hand-overs are
        // refused and served where they were accepted.
        inbox.close();
        while let Some(handoff) = inbox.recv().await {
            self.adopt_one(handoff);
        }
    }

    /// Serves a connection taken out of another reactor.
    fn adopt_one(&self, handoff: Handoff) {
        let Handoff {
            stream,
            peer,
            inbound,
            permit,
            counted,
        } = handoff;
        match TcpStream::from_std(stream) {
            Ok(stream) => self.serve(stream, peer, inbound, permit, Some(counted)),
            Err(error) => debug!(%peer, %error, "cannot adopt a connection"),
        }
    }

    fn serve(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        inbound: Inbound,
        permit: OwnedSemaphorePermit,
        counted: Option<Load>,
    ) {
        serve_connection(
            stream,
            peer,
            inbound,
            &self.shared,
            &self.options,
            &self.graceful,
            (permit, counted),
        );
    }
}

/// Runs accept loops for `listeners` on a thread of its own with a
/// single-threaded runtime (thread-per-core, as nginx and Envoy run): a
/// connection, its requests, their shadows and their pooled upstream
/// connections stay on one thread, with no work stealing and no
/// cross-thread wake-ups. The thread keeps serving open connections after
/// the loops stop, until `finished`. Returns the thread and a task that ends
/// when its loops have stopped.
fn spawn_worker(
    index: usize,
    listeners: Vec<(std::net::TcpListener, bool)>,
    inbox: mpsc::UnboundedReceiver<Handoff>,
    acceptor: Acceptor,
    workers: Arc<Workers>,
    started: Arc<std::sync::Barrier>,
    mut finished: watch::Receiver<bool>,
) -> std::io::Result<(std::thread::JoinHandle<()>, tokio::task::JoinHandle<()>)> {
    let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name(format!("umbra-worker-{index}"))
        .spawn(move || {
            WORKER.with(|worker| worker.set(index));
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => {
                    started.wait();
                    return warn!(index, %error, "worker cannot start its runtime");
                }
            };
            let _ = workers.handles[index - 1].set(runtime.handle().clone());
            started.wait();
            runtime.block_on(async move {
                let mut loops = vec![tokio::spawn(acceptor.clone().adopt(inbox))];
                for (listener, secure) in listeners {
                    match TcpListener::from_std(listener) {
                        Ok(listener) => {
                            loops.push(tokio::spawn(acceptor.clone().run(listener, secure)))
                        }
                        Err(error) => warn!(index, %error, "worker cannot listen"),
                    }
                }
                // Only the loops may hold the shutdown watcher now.
                drop(acceptor);
                for accept in loops {
                    let _ = accept.await;
                }
                let _ = stopped_tx.send(());
                let _ = finished.wait_for(|&done| done).await;
            });
        })?;
    let stopped = tokio::spawn(async move {
        let _ = stopped_rx.await;
    });
    Ok((thread, stopped))
}

impl idle::Stallable for crate::proxy::body::ResponseBody {
    fn send_timed_out(&mut self) {
        self.end_for_send_timeout();
    }
}

/// Serves one downstream connection on a task of its own, after its TLS
/// handshake when it came to a TLS listener.
fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    inbound: Inbound,
    shared: &Arc<Shared>,
    options: &Arc<Options>,
    graceful: &idle::Drain,
    held: (OwnedSemaphorePermit, Option<Load>),
) {
    let drain = graceful.watch();
    let gauge = shared.proxy.metrics.connections(worker_index());
    gauge.inc();
    let served = Served {
        peer,
        shared: shared.clone(),
        gauge,
        _held: held,
    };
    // One instance of the server per stream type: plaintext reads and
    // writes reach the socket without a TLS-or-not branch.
    if !inbound.secure {
        let client = Peer::new(peer, inbound.port, false, client_cert(shared, None))
            .with_body_read_timeout(options.body_read_timeout);
        let connection = own_connection(stream, client, shared, options, drain);
        tokio::spawn(async move { served.log(connection.await) });
        return;
    }
    let acceptor = shared.tls.as_ref().map(|tls| tls.acceptor());
    let options = options.clone();
    tokio::spawn(async move {
        let mut drain = drain;
        match handshake(acceptor, stream, &options, &mut drain).await {
            Ok(Some(stream)) => {
                let shared = &served.shared;
                let leaf = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first());
                let client = Peer::new(peer, inbound.port, true, client_cert(shared, leaf))
                    .with_body_read_timeout(options.body_read_timeout);
                let ended = match stream.get_ref().1.alpn_protocol() {
                    Some(b"h2") => connection(stream, client, shared, &options, drain).await,
                    _ => own_connection(stream, client, shared, &options, drain).await,
                };
                served.log(ended)
            }
            Ok(None) => debug!(%peer, "shutting down: connection closed in its TLS handshake"),
            Err(error) => {
                debug!(%peer, %error, "TLS handshake failed");
                served.shared.proxy.metrics.tls_handshake_errors.inc();
            }
        }
    });
}

/// What a connection's requests carry as `x-forwarded-client-cert`: as
/// the client sent it unless umbra verifies client certificates; then the
/// hash of the verified `leaf`, or nothing.
fn client_cert(
    shared: &Shared,
    leaf: Option<&rustls::pki_types::CertificateDer<'_>>,
) -> ClientCert {
    match &shared.tls {
        Some(tls) if tls.verifies_clients() => leaf
            .and_then(tls::client_cert_header)
            .map_or(ClientCert::Absent, ClientCert::Verified),
        _ => ClientCert::NotAsked,
    }
}

/// A served connection's accounting, settled when it ends.
struct Served {
    peer: SocketAddr,
    shared: Arc<Shared>,
    /// `umbra_downstream_connections` of its worker.
    gauge: prometheus_client::metrics::gauge::Gauge,
    /// Its place under `max_connections`, and its worker's load.
    _held: (OwnedSemaphorePermit, Option<Load>),
}

impl Served {
    fn log(self, ended: idle::Ended<Result<(), Box<dyn std::error::Error + Send + Sync>>>) {
        let peer = self.peer;
        match ended {
            idle::Ended::Finished(Err(error)) => {
                debug!(%peer, %error, "connection ended with an error")
            }
            idle::Ended::Finished(Ok(())) => {}
            idle::Ended::Idle => {
                debug!(%peer, "idle connection closed");
                self.shared.proxy.metrics.idle_closed.inc();
            }
            idle::Ended::Stalled => debug!(%peer, "client stopped taking its response"),
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// The server side of a TLS handshake, within the header read timeout (a
/// client that opens a connection and says nothing is the same slowloris
/// whether or not it would speak TLS); the connection's idle clock starts
/// after it. `None` acceptor: no certificate. `Ok(None)`: umbra began to
/// drain first, which a connection not yet serving does not wait for.
async fn handshake(
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    stream: TcpStream,
    options: &Options,
    drain: &mut idle::DrainWatch,
) -> Result<Option<tokio_rustls::server::TlsStream<TcpStream>>, std::io::Error> {
    let acceptor = acceptor.ok_or_else(|| std::io::Error::other("no certificate loaded"))?;
    let handshake = tokio::time::timeout(options.header_read_timeout, acceptor.accept(stream));
    tokio::select! {
        done = handshake => match done {
            Ok(stream) => stream.map(Some),
            Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")),
        },
        () = std::future::poll_fn(|cx| drain.poll_begun(cx)) => Ok(None),
    }
}

/// What a downstream connection's server needs: the proxy, the client,
/// and the connection's [`idle::Activity`].
fn parts(
    client: Peer,
    shared: &Shared,
    options: &Options,
) -> (Arc<Proxy>, Arc<Peer>, Arc<idle::Activity>) {
    let send_timeouts = shared.proxy.metrics.send_timeouts.clone();
    let watch_streams = !options.send_timeout.is_zero();
    let activity = Arc::new(idle::Activity::new(send_timeouts, watch_streams));
    (shared.proxy.clone(), Arc::new(client), activity)
}

type Ending = idle::Ended<Result<(), Box<dyn std::error::Error + Send + Sync>>>;

/// HTTP/1.1 and HTTP/2 served by hyper on one connection until it ends.
/// Not an `async fn`: the task polls the connection itself, with no layer
/// between.
fn connection<S>(
    stream: S,
    client: Peer,
    shared: &Shared,
    options: &Options,
    drain: idle::DrainWatch,
) -> impl Future<Output = Ending> + Send + 'static
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (proxy, client, activity) = parts(client, shared, options);
    let io = idle::Progress::new(stream, activity.clone());
    let connection = hyper_connection(io, proxy, client, activity.clone(), options);
    cut(connection, activity, options, drain)
}

/// A connection served by umbra's own HTTP/1.1 server ([`lean`]) until
/// a request needs hyper's: plaintext, or TLS without `h2` negotiated.
fn own_connection<S>(
    stream: S,
    client: Peer,
    shared: &Shared,
    options: &Arc<Options>,
    drain: idle::DrainWatch,
) -> impl Future<Output = Ending> + Send + 'static
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (proxy, client, activity) = parts(client, shared, options);
    let io = idle::Progress::new(stream, activity.clone());
    let handover: lean::Handover<S> = {
        let (proxy, client, activity) = (proxy.clone(), client.clone(), activity.clone());
        let options = options.clone();
        Box::new(move |io| Box::pin(hyper_connection(io, proxy, client, activity, &options)))
    };
    let limit = options.max_header_bytes.max(8192);
    let connection = lean::Connection::new(io, proxy, client, activity.clone(), limit, handover);
    cut(connection, activity, options, drain)
}

/// A connection under its idle, header and send timeouts and the drain.
fn cut<C: idle::Graceful>(
    connection: C,
    activity: Arc<idle::Activity>,
    options: &Options,
    drain: idle::DrainWatch,
) -> idle::IdleCut<C> {
    let (timeout, send_timeout) = (options.header_read_timeout, options.send_timeout);
    idle::IdleCut::new(connection, activity, timeout, send_timeout, drain)
}

/// hyper's server (HTTP/1.1 and HTTP/2) on `io`, to the connection's end.
fn hyper_connection<I>(
    io: I,
    proxy: Arc<Proxy>,
    client: Arc<Peer>,
    activity: Arc<idle::Activity>,
    options: &Options,
) -> impl idle::Graceful<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>> + Send + 'static
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |request: hyper::Request<_>| {
        let (proxy, client) = (proxy.clone(), client.clone());
        let busy = activity.begin(request.version());
        async move {
            let response =
                crate::proxy::handle(&proxy, &client, request.map(Some), Writer::Hyper).await;
            Ok::<_, Infallible>(response.map(|body| idle::Held::new(body, busy)))
        }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // `IdleCut` below does this job with one timer per connection.
        .header_read_timeout(None)
        .max_buf_size(options.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(options.max_header_bytes as u32)
        .max_concurrent_streams(256)
        .max_pending_accept_reset_streams(Some(20))
        .keep_alive_interval(Some(options.idle_timeout))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
        .serve_connection_with_upgrades(TokioIo::new(io), service)
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// Two worker threads as `spawn_worker` makes them, each running until
    /// its stop channel closes.
    fn two_workers() -> (Arc<Workers>, Vec<tokio::sync::oneshot::Sender<()>>) {
        let workers = Arc::new(Workers::new(2).0);
        let mut stops = Vec::new();
        for index in 1..=2 {
            let (handle_tx, handle_rx) = mpsc::channel();
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            std::thread::spawn(move || {
                WORKER.with(|worker| worker.set(index));
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                handle_tx.send(runtime.handle().clone()).unwrap();
                runtime.block_on(async {
                    let _ = stop_rx.await;
                });
            });
            workers.handles[index - 1]
                .set(handle_rx.recv().unwrap())
                .unwrap();
            stops.push(stop_tx);
        }
        (workers, stops)
    }

    /// From worker 1, which worker runs a spawned piece of work. Returns
    /// once the work's load has been taken off again.
    fn runs_on(workers: &Arc<Workers>) -> usize {
        let total = || -> usize { workers.load.iter().map(|l| l.load(Ordering::SeqCst)).sum() };
        let before = total();
        let (ran_tx, ran_rx) = mpsc::channel();
        let from = workers.clone();
        workers.handles[0].get().unwrap().spawn(async move {
            from.spawn(async move {
                ran_tx.send(worker_index()).unwrap();
            });
        });
        let ran = ran_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while total() != before {
            assert!(std::time::Instant::now() < deadline, "load never taken off");
            std::thread::yield_now();
        }
        ran
    }

    #[test]
    fn side_work_moves_only_to_an_idle_worker() {
        let (workers, _stops) = two_workers();
        assert_eq!(runs_on(&workers), 1, "both idle: stays local");
        workers.load[0].store(3, Ordering::Relaxed);
        assert_eq!(runs_on(&workers), 2, "the other worker is idle: moves");
        workers.load[1].store(1, Ordering::Relaxed);
        assert_eq!(
            runs_on(&workers),
            1,
            "the other worker is busy at all: stays"
        );
    }
}
