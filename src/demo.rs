//! `umbra demo`: shadowing end to end on one machine, with no setup. It
//! starts two httpbin-like backends (v1, the primary, and v2, a candidate
//! with deliberate regressions; see [`backend`]), loads the Istio YAML a
//! user would write for them ([`seed`]), runs umbra in-process with the same
//! wiring as `umbra run`, drives real HTTP traffic through it ([`traffic`]),
//! waits for the fire-and-forget shadows to finish, and prints what each
//! side received, latencies, mirror outcomes and the analysis
//! ([`summary`]). Everything binds to loopback on ephemeral ports, except
//! the admin listener, which prefers umbra's usual 127.0.0.1:15000.

pub mod backend;
pub mod seed;
pub mod summary;
pub mod traffic;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::accesslog::AccessLog;
use crate::analysis::Analyzer;
use crate::metrics::{self, Metrics};
use crate::proxy::{MirrorLimits, Proxy};
use crate::server::{self, Options, Server};
use backend::{Backend, Flavor};
use summary::Summary;

/// umbra's usual admin address; the demo falls back to an ephemeral port
/// when something already listens there.
const PREFERRED_ADMIN: &str = "127.0.0.1:15000";
/// Shadows time out after 10 s in umbra; waiting a little longer means
/// every shadow has an outcome by the deadline unless something is wrong.
const SHADOW_PATIENCE: Duration = Duration::from_secs(15);

#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Requests to send through umbra.
    #[arg(long, default_value_t = 600)]
    pub requests: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// After the summary, keep everything running until Ctrl-C.
    #[arg(long)]
    pub keep_running: bool,
    /// Address for umbra's proxy listener.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Admin address [default: 127.0.0.1:15000, or an ephemeral port if busy].
    #[arg(long)]
    pub admin: Option<SocketAddr>,
}

/// umbra running in-process.
struct Running {
    proxy: SocketAddr,
    admin: SocketAddr,
    analyzer: Arc<Analyzer>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

/// Everything the demo started, kept alive until it ends.
struct Session {
    umbra: Running,
    v1: Backend,
    v2: Backend,
}

/// Runs the demo and prints the summary on stdout.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let (summary, mut session) = demo(&args, |header| Ok(crate::print(header)?)).await?;
    // Drained the same when stdout is gone, which is then reported.
    let printed = match crate::print(&summary.render()) {
        Ok(()) if args.keep_running => session.keep_running().await,
        printed => printed,
    };
    session.umbra.shutdown().await;
    printed?;
    Ok(())
}

/// The demo up to the summary, so tests can inspect the numbers; `announce`
/// shows the header naming the addresses before the traffic starts.
/// Returns the session still running.
async fn demo(
    args: &DemoArgs,
    announce: impl FnOnce(&str) -> anyhow::Result<()>,
) -> anyhow::Result<(Summary, Session)> {
    let v1 = backend::start(Flavor::V1)
        .await
        .context("cannot start the v1 backend")?;
    let v2 = backend::start(Flavor::V2)
        .await
        .context("cannot start the v2 backend")?;
    let config = seed::load(v1.addr(), v2.addr())?;
    let umbra = start_umbra(config, args).await?;
    // Written in one piece: `println!` would panic if stdout is closed.
    let (proxy, admin, host) = (umbra.proxy, umbra.admin, seed::HOST);
    let (v1_addr, v2_addr) = (v1.addr(), v2.addr());
    let (requests, concurrency) = (args.requests, args.concurrency);
    let header = format!(
        "umbra demo: httpbin v1 (primary) shadowed by v2
  proxy  http://{proxy}  (Host: {host})
  admin  http://{admin}/
  v1     http://{v1_addr}
  v2     http://{v2_addr}
Sending {requests} requests, {concurrency} at a time…
"
    );
    announce(&header)?;

    let traffic = traffic::drive(umbra.proxy, args.requests, args.concurrency).await;
    let metrics_text = wait_for_shadows(umbra.admin).await;
    let duration = metrics::MIRROR_DURATION;
    let shadow_latency = summary::histogram_quantile(&metrics_text, duration, 0.5)
        .zip(summary::histogram_quantile(&metrics_text, duration, 0.99));
    let summary = Summary {
        v1: v1.recorder().stats(),
        v2: v2.recorder().stats(),
        mirror: summary::mirror_outcomes(&metrics_text),
        shadow_latency,
        shadow_latency_mean: summary::histogram_mean(&metrics_text, duration),
        analysis: summary::analysis_section(&umbra.analyzer).await,
        traffic,
    };
    Ok((summary, Session { umbra, v1, v2 }))
}

/// Binds and starts umbra the way `umbra run` does, with the access log off
/// (the summary replaces it) and an in-memory analysis database.
async fn start_umbra(config: crate::config::Config, args: &DemoArgs) -> anyhow::Result<Running> {
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let admin = bind_admin(args.admin).await?;
    let proxy_addr = listener.local_addr()?;
    let admin_addr = admin.local_addr()?;
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(Metrics::new(&mut registry));
    let analyzer = Analyzer::start(None, &mut registry).context("cannot start shadow analysis")?;
    let proxy = Arc::new(Proxy::new(
        Arc::new(config),
        metrics,
        AccessLog::off(),
        Some(analyzer.clone()),
        MirrorLimits::default(),
    ));
    let server = Server {
        proxy,
        listeners: vec![listener],
        tls_listeners: Vec::new(),
        tls: None,
        admin: Some(admin),
        registry: Arc::new(registry),
        // The config lives in memory: nothing to watch or reload.
        config_paths: Vec::new(),
        watch_files: false,
        options: Options::default(),
    };
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (started_tx, started_rx) = oneshot::channel();
    let task = tokio::spawn(server::run(
        server,
        async move {
            let _ = stop_rx.await;
        },
        Some(started_tx),
    ));
    if started_rx.await.is_err() {
        // The server ended before accepting: its result says why.
        return match task.await {
            Ok(Err(error)) => Err(error).context("umbra did not start"),
            _ => Err(anyhow::anyhow!("umbra did not start")),
        };
    }
    Ok(Running {
        proxy: proxy_addr,
        admin: admin_addr,
        analyzer,
        stop: Some(stop_tx),
        task,
    })
}

/// An explicit `--admin` must bind; the default falls back to an ephemeral
/// port so a second demo (or a running umbra) does not get in the way.
async fn bind_admin(requested: Option<SocketAddr>) -> anyhow::Result<TcpListener> {
    if let Some(addr) = requested {
        return TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot bind the admin listener on {addr}"));
    }
    match TcpListener::bind(PREFERRED_ADMIN).await {
        Ok(listener) => Ok(listener),
        Err(error) => {
            info!(addr = PREFERRED_ADMIN, %error, "admin port busy; using an ephemeral port");
            TcpListener::bind("127.0.0.1:0")
                .await
                .context("cannot bind the admin listener")
        }
    }
}

/// Polls the admin `/metrics` until every sent shadow has an outcome
/// (completed, failed or timed out), or `SHADOW_PATIENCE` runs out; returns
/// the last metrics text.
async fn wait_for_shadows(admin: SocketAddr) -> String {
    let deadline = Instant::now() + SHADOW_PATIENCE;
    loop {
        let text = match summary::admin_get(admin, "/metrics").await {
            Ok(text) => text,
            Err(error) => {
                warn!(%error, "cannot read umbra's metrics");
                String::new()
            }
        };
        let outcomes = summary::mirror_outcomes(&text);
        let get = |name: &str| outcomes.get(name).copied().unwrap_or(0.0);
        let finished = get("completed") + get("failed") + get("timeout");
        if finished >= get("sent") && !text.is_empty() {
            return text;
        }
        if Instant::now() >= deadline {
            warn!(
                sent = get("sent"),
                finished, "shadows still in flight; summarising anyway"
            );
            return text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Session {
    /// Prints where to look and waits for Ctrl-C.
    async fn keep_running(&self) -> Result<(), crate::StdoutError> {
        let (umbra, v1, v2) = (&self.umbra, &self.v1, &self.v2);
        let (proxy, admin, host) = (umbra.proxy, umbra.admin, seed::HOST);
        let (v1, v2) = (v1.addr(), v2.addr());
        let help = format!(
            "
Still running; press Ctrl-C to stop.
  proxy            curl -H 'Host: {host}' http://{proxy}/json
  dashboard        http://{admin}/
  metrics          http://{admin}/metrics
  analysis report  http://{admin}/shadow/report
  v1 (direct)      http://{v1}/json
  v2 (direct)      http://{v2}/json
"
        );
        crate::print(&help)?;
        if let Err(error) = tokio::signal::ctrl_c().await {
            warn!(%error, "cannot wait for Ctrl-C; stopping now");
        }
        Ok(())
    }
}

impl Running {
    /// Stops accepting, drains, and waits for `server::run` to return.
    async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let drain = Options::default().drain_timeout + Duration::from_secs(1);
        match tokio::time::timeout(drain, &mut self.task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => warn!(%error, "umbra stopped with an error"),
            Ok(Err(error)) => warn!(%error, "umbra's task failed"),
            Err(_) => warn!("umbra did not finish draining in time"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn demo_mirrors_every_request_with_a_shadow_host() {
        let args = DemoArgs {
            requests: 40,
            concurrency: 4,
            keep_running: false,
            listen: "127.0.0.1:0".parse().unwrap(),
            admin: Some("127.0.0.1:0".parse().unwrap()),
        };
        let mut header = String::new();
        let (summary, mut session) = demo(&args, |text| {
            header = text.to_string();
            Ok(())
        })
        .await
        .unwrap();
        session.umbra.shutdown().await;
        let proxy = format!(
            "proxy  http://{}  (Host: httpbin:8000)",
            session.umbra.proxy
        );
        assert!(header.contains(&proxy), "{header}");
        assert_eq!(summary.traffic.sent, 40);
        assert_eq!(summary.traffic.errors, 0);
        // The client sees v1 only: orders succeed, nothing is a 5xx.
        assert!(summary.traffic.by_status.keys().all(|s| *s < 500));
        assert_eq!(summary.v1.total, 40);
        assert_eq!(summary.v2.total, 40);
        assert_eq!(summary.v1.by_host.get("httpbin:8000"), Some(&40));
        assert_eq!(summary.v2.by_host.get("httpbin-shadow:8000"), Some(&40));
        assert_eq!(summary.mirror["sent"], 40.0);
        assert_eq!(summary.mirror["completed"], 40.0);
        assert_eq!(summary.v2.by_path_class["/anything/orders"]["5xx"], 5);
        assert_eq!(summary.v1.by_path_class["/anything/orders"]["2xx"], 5);
        let text = summary.render();
        assert!(text.contains("httpbin-shadow:8000 ×40"), "{text}");
        assert!(text.contains("/anything/orders"), "{text}");
    }
}
