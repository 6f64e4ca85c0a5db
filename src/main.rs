//! The `umbra` binary: parses the command line, sets up logging, loads the
//! config, binds, and hands over to `umbra::server::run`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tokio::net::TcpListener;

use umbra::accesslog::{self, AccessLog};
use umbra::analysis::AnalysisError;
use umbra::config;
use umbra::proxy::{MirrorLimits, Proxy};
use umbra::seconds;
use umbra::server::{self, Options, Server};

/// EX_USAGE: the config (or the command line, such as a `report --db`
/// path with no database) is wrong.
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "umbra",
    version,
    about = "A traffic-mirroring proxy configured with Istio resources"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run(Box<RunArgs>),
    /// Check a config and print the resolved routes.
    Validate {
        /// A YAML file (multi-document) or a directory of *.yaml/*.yml.
        #[arg(short, long = "config", required = true)]
        config: Vec<PathBuf>,
    },
    /// Start sample v1/v2 services, mirror real traffic, print what happened.
    Demo(umbra::demo::DemoArgs),
    /// Print the shadow-analysis report of a running proxy or a saved database.
    Report(umbra::analysis::ReportArgs),
    /// Serve the demo's httpbin-like sample service (for soak tests and trials).
    SampleBackend {
        #[arg(short, long = "listen")]
        listen: SocketAddr,
        /// v1 (the baseline behaviour) or v2 (with the demo's regressions).
        #[arg(long, default_value = "v1", value_parser = ["v1", "v2"])]
        flavor: String,
    },
}

#[derive(Args)]
struct RunArgs {
    /// A YAML file (multi-document) or a directory of *.yaml/*.yml; repeatable.
    #[arg(short, long = "config", required = true)]
    config: Vec<PathBuf>,
    /// Address to serve proxied traffic on; repeatable.
    #[arg(short, long = "listen", required_unless_present = "tls_listen")]
    listen: Vec<SocketAddr>,
    /// Address to serve proxied traffic on over TLS (HTTP/1.1, and HTTP/2
    /// by ALPN), with --tls-cert and --tls-key; repeatable.
    #[arg(long = "tls-listen", requires_all = ["tls_cert", "tls_key"])]
    tls_listen: Vec<SocketAddr>,
    /// PEM certificate chain (leaf first) for the TLS listeners; re-read on
    /// every reload. Repeatable: the client's SNI picks the certificate
    /// naming it exactly, else one whose wildcard covers it; the first
    /// serves everyone else.
    #[arg(long, requires = "tls_listen")]
    tls_cert: Vec<PathBuf>,
    /// PEM private key of each --tls-cert, in the same order.
    #[arg(long, requires = "tls_listen")]
    tls_key: Vec<PathBuf>,
    /// PEM CA certificates: TLS clients must present a certificate that
    /// chains to one; requests then carry `x-forwarded-client-cert:
    /// Hash=<sha256>` (a client's own is removed, on every listener).
    #[arg(long, requires = "tls_listen")]
    tls_client_ca: Option<PathBuf>,
    /// With --tls-client-ca: PEM revocation lists the client certificate's
    /// chain is checked against (every certificate below the root must be
    /// covered and not revoked).
    #[arg(long, requires = "tls_client_ca")]
    tls_client_crl: Option<PathBuf>,
    /// With --tls-client-ca: a client that sends no certificate is served
    /// too (one that sends a bad one is not).
    #[arg(long, requires = "tls_client_ca")]
    tls_client_optional: bool,
    /// Admin address (metrics, config dump, analysis report, dashboard).
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
    /// Access log destination: a path, `-` for stdout, or `off`.
    #[arg(long, default_value = "-")]
    access_log: accesslog::Target,
    #[arg(long, value_enum, default_value = "combined")]
    access_log_format: accesslog::Format,
    /// Seconds in-flight requests get to finish after SIGTERM/SIGINT.
    #[arg(long, default_value = "10", value_parser = seconds)]
    drain_timeout: Duration,
    /// Maximum open downstream connections.
    #[arg(long, default_value_t = 16 * 1024)]
    max_connections: usize,
    /// Seconds a connection may sit with no request in flight: idle
    /// keep-alive, or request headers trickling in (slowloris guard);
    /// also a TLS handshake's limit.
    #[arg(long, default_value = "10", value_parser = idle_seconds)]
    header_read_timeout: Duration,
    /// Seconds a client may leave its response untaken (nothing read)
    /// before the response and its upstream exchange are cut: an HTTP/1
    /// connection is closed, an HTTP/2 stream reset (nginx's send_timeout;
    /// 0: never).
    #[arg(long, default_value = "60", value_parser = seconds)]
    send_timeout: Duration,
    /// Seconds a client may send none of its request body (between two
    /// reads, nginx's client_body_timeout) before the request ends with 408
    /// (0: never).
    #[arg(long, default_value = "60", value_parser = seconds)]
    body_read_timeout: Duration,
    /// Shadow requests in flight (sent or queued) across all mirror targets.
    #[arg(long, default_value_t = MirrorLimits::default().global)]
    mirror_max_inflight: usize,
    /// Shadow requests sent and not yet answered, per mirror target (the
    /// target's DestinationRule `maxConnections` or `http2MaxRequests`, if
    /// tighter, wins).
    #[arg(long, default_value_t = MirrorLimits::default().per_target)]
    mirror_max_inflight_per_target: usize,
    /// Shadow requests without a body, per mirror target, that may wait for
    /// a place under the in-flight limit (0: drop at once).
    #[arg(long, default_value_t = MirrorLimits::default().queued_per_target)]
    mirror_max_queued_per_target: usize,
    /// Failures in a row (no connection, no answer within the timeout, a
    /// broken exchange; any HTTP status is an answer) after which a mirror
    /// target is ejected: its shadows are dropped until one probe finds it
    /// answering again (0: never eject).
    #[arg(long, default_value_t = MirrorLimits::default().eject_after)]
    mirror_eject_after: u32,
    /// Seconds of a target's first ejection (at most 300); each failed
    /// probe in a row adds as many again, up to 300.
    #[arg(long, default_value = "30", value_parser = ejection_seconds)]
    mirror_eject_time: Duration,
    /// SQLite file for analysis aggregates (in memory when absent).
    #[arg(long)]
    analysis_db: Option<PathBuf>,
    /// Do not watch config or TLS certificate files (SIGHUP still reloads).
    #[arg(long)]
    no_watch: bool,
    /// Threads serving connections, each with its own event loop and
    /// upstream connections [default: one per CPU; 0: one shared
    /// multi-threaded runtime].
    #[arg(long)]
    workers: Option<usize>,
}

/// An ejection's length: above zero (which would probe on every shadow)
/// and at most the longest ejection.
fn ejection_seconds(text: &str) -> Result<Duration, String> {
    let longest = umbra::mirror::ejection::MAX_EJECTION;
    match seconds(text)? {
        ejection if ejection > longest => Err(format!(
            "{text} s is longer than the longest ejection; use at most {} s",
            longest.as_secs()
        )),
        ejection if ejection.is_zero() => {
            Err("an ejection must last; to never eject, use --mirror-eject-after 0".to_string())
        }
        ejection => Ok(ejection),
    }
}

/// The idle limit: above zero, which would close every connection before
/// its first request (and fail every TLS handshake).
fn idle_seconds(text: &str) -> Result<Duration, String> {
    match seconds(text)? {
        idle if idle < Duration::from_millis(10) => Err(format!(
            "{text} s would close every connection at once; use 0.01 or more"
        )),
        idle => Ok(idle),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("umbra: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Validate { config } => validate(&config),
        Command::Run(args) => runtime.block_on(run(*args)),
        Command::Demo(args) => report_error(runtime.block_on(umbra::demo::run(args))),
        Command::Report(args) => report_error(runtime.block_on(umbra::analysis::report_cli(args))),
        Command::SampleBackend { listen, flavor } => {
            report_error(runtime.block_on(sample_backend(listen, &flavor)))
        }
    }
}

fn report_error(result: anyhow::Result<()>) -> ExitCode {
    let Err(error) = result else {
        return ExitCode::SUCCESS;
    };
    // `umbra report | head`: the reader has what it wanted. Quiet and 0,
    // as ripgrep.
    if error
        .chain()
        .any(|cause| matches!(cause.downcast_ref(), Some(umbra::StdoutError::Closed)))
    {
        return ExitCode::SUCCESS;
    }
    eprintln!("umbra: {error:#}");
    if error.chain().any(|cause| {
        matches!(
            cause.downcast_ref(),
            Some(AnalysisError::NoDatabase(_) | AnalysisError::NotADatabase { .. })
        )
    }) {
        ExitCode::from(EXIT_CONFIG)
    } else {
        ExitCode::FAILURE
    }
}

fn validate(paths: &[PathBuf]) -> ExitCode {
    match config::load(paths) {
        Ok(config) => {
            for warning in &config.warnings {
                eprintln!("warning: {warning}");
            }
            match umbra::print(&config::summary(&config)) {
                Ok(()) | Err(umbra::StdoutError::Closed) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("umbra: {error}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(errors) => {
            print_load_errors(&errors);
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

fn print_load_errors(errors: &config::LoadErrors) {
    for warning in &errors.warnings {
        eprintln!("warning: {warning}");
    }
    for error in &errors.errors {
        eprintln!("{error}");
    }
    eprintln!(
        "umbra: {} error{} in the config",
        errors.errors.len(),
        if errors.errors.len() == 1 { "" } else { "s" }
    );
}

async fn run(args: RunArgs) -> ExitCode {
    let config = match config::load(&args.config) {
        Ok(config) => config,
        Err(errors) => {
            print_load_errors(&errors);
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    let tls = match termination(&args) {
        Ok(tls) => tls,
        Err(error) => {
            eprintln!("umbra: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match serve(args, config, tls).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("umbra: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The TLS listeners' certificates, keys and client CA, read from their files.
fn termination(args: &RunArgs) -> anyhow::Result<Option<Arc<server::tls::Termination>>> {
    if args.tls_listen.is_empty() {
        return Ok(None);
    }
    if args.tls_cert.len() != args.tls_key.len() {
        anyhow::bail!(
            "{} --tls-cert but {} --tls-key: give each certificate its key, in the same order",
            args.tls_cert.len(),
            args.tls_key.len()
        );
    }
    let settings = server::tls::Settings {
        identities: args
            .tls_cert
            .iter()
            .cloned()
            .zip(args.tls_key.iter().cloned())
            .collect(),
        client_ca: args.tls_client_ca.clone(),
        client_crl: args.tls_client_crl.clone(),
        client_optional: args.tls_client_optional,
    };
    Ok(Some(Arc::new(server::tls::Termination::load(settings)?)))
}

async fn serve(
    args: RunArgs,
    config: config::Config,
    tls: Option<Arc<server::tls::Termination>>,
) -> anyhow::Result<()> {
    let shutdown = shutdown_signal();
    let mut listeners = Vec::new();
    for addr in &args.listen {
        listeners.push(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?,
        );
    }
    let mut tls_listeners = Vec::new();
    for addr in &args.tls_listen {
        tls_listeners.push(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?,
        );
    }
    let admin = TcpListener::bind(args.admin)
        .await
        .with_context(|| format!("cannot bind the admin listener on {}", args.admin))?;
    let access_log = AccessLog::open(&args.access_log, args.access_log_format)
        .context("cannot open the access log")?;
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(umbra::metrics::Metrics::new(&mut registry));
    let analyzer = umbra::analysis::Analyzer::start(args.analysis_db.as_deref(), &mut registry)
        .with_context(|| match &args.analysis_db {
            Some(db) => format!("cannot start shadow analysis with {}", db.display()),
            None => "cannot start shadow analysis".to_string(),
        })?;
    let proxy = Arc::new(Proxy::new(
        Arc::new(config),
        metrics,
        access_log,
        Some(analyzer),
        MirrorLimits {
            global: args.mirror_max_inflight,
            per_target: args.mirror_max_inflight_per_target,
            queued_per_target: args.mirror_max_queued_per_target,
            eject_after: args.mirror_eject_after,
            eject_for: args.mirror_eject_time,
            ..MirrorLimits::default()
        },
    ));
    let server = Server {
        proxy,
        listeners,
        tls_listeners,
        tls,
        admin: Some(admin),
        registry: Arc::new(registry),
        config_paths: args.config.clone(),
        watch_files: !args.no_watch,
        options: Options {
            max_connections: args.max_connections,
            header_read_timeout: args.header_read_timeout,
            send_timeout: args.send_timeout,
            body_read_timeout: args.body_read_timeout,
            drain_timeout: args.drain_timeout,
            workers: args.workers.unwrap_or_else(server::cpus),
            ..Options::default()
        },
    };
    server::run(server, shutdown, None).await?;
    Ok(())
}

async fn sample_backend(listen: SocketAddr, flavor: &str) -> anyhow::Result<()> {
    use umbra::demo::backend::{self, Flavor};
    let shutdown = shutdown_signal();
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let flavor = if flavor == "v2" {
        Flavor::V2
    } else {
        Flavor::V1
    };
    let backend = backend::start_on(listener, flavor)?;
    eprintln!("sample backend {flavor:?} on http://{}", backend.addr());
    shutdown.await;
    Ok(())
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is
/// called, not when it is first polled: call it before binding, so a signal
/// that arrives while umbra starts drains it instead of killing it.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let signals = {
        use tokio::signal::unix::{signal, SignalKind};
        signal(SignalKind::terminate())
            .and_then(|term| Ok((term, signal(SignalKind::interrupt())?)))
            .ok()
    };
    async move {
        #[cfg(unix)]
        if let Some((mut term, mut int)) = signals {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    }
}
