//! The demo's load generator: sends a fixed mix of httpbin requests through
//! umbra with `Host: httpbin:8000` from a few concurrent workers on one
//! pooled client, times each one to the end of its body, and shows progress
//! on stderr.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tracing::debug;

use super::seed::HOST;

/// A request neither the proxy nor a backend should ever take this long
/// for; past it the demo counts an error instead of hanging.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Width of the `[####....]` bar.
const BAR_WIDTH: usize = 30;

/// One kind of request in the mix.
struct Kind {
    method: Method,
    path: &'static str,
    /// A JSON body for POSTs.
    body: Option<&'static str>,
}

/// The mix, sent round-robin so every run sends the same requests. It hits
/// each of v2's deliberate differences and plenty of noise.
const MIX: [Kind; 8] = [
    Kind {
        method: Method::GET,
        path: "/headers",
        body: None,
    },
    Kind {
        method: Method::GET,
        path: "/json",
        body: None,
    },
    Kind {
        method: Method::GET,
        path: "/uuid",
        body: None,
    },
    Kind {
        method: Method::GET,
        path: "/status/200",
        body: None,
    },
    Kind {
        method: Method::GET,
        path: "/status/404",
        body: None,
    },
    Kind {
        method: Method::GET,
        path: "/delay/0.05",
        body: None,
    },
    Kind {
        method: Method::POST,
        path: "/anything?source=demo",
        body: Some(r#"{"item": "widget", "qty": 2}"#),
    },
    Kind {
        method: Method::POST,
        path: "/anything/orders",
        body: Some(r#"{"order": {"item": "widget", "qty": 1}}"#),
    },
];

/// What the client saw.
pub struct Outcome {
    pub sent: u64,
    /// Responses by status code.
    pub by_status: BTreeMap<u16, u64>,
    /// Requests that got no response (connect failure, reset, timeout).
    pub errors: u64,
    /// Client-observed latency in microseconds, to the end of the body.
    pub latency: hdrhistogram::Histogram<u64>,
    pub elapsed: Duration,
}

impl Outcome {
    pub fn latency_at(&self, quantile: f64) -> Duration {
        Duration::from_micros(self.latency.value_at_quantile(quantile))
    }
}

/// Sends `requests` requests to the proxy at `proxy` from `concurrency`
/// workers.
pub async fn drive(proxy: SocketAddr, requests: usize, concurrency: usize) -> Outcome {
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .build_http();
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let progress = tokio::spawn(show_progress(done.clone(), requests));
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let client = client.clone();
        let next = next.clone();
        let done = done.clone();
        workers.push(tokio::spawn(async move {
            let mut outcome = Outcome::empty();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= requests {
                    return outcome;
                }
                let kind = &MIX[index % MIX.len()];
                let began = Instant::now();
                match send(&client, proxy, kind).await {
                    Ok(status) => *outcome.by_status.entry(status).or_default() += 1,
                    Err(error) => {
                        debug!(path = kind.path, %error, "demo request failed");
                        outcome.errors += 1;
                    }
                }
                let micros = u64::try_from(began.elapsed().as_micros()).unwrap_or(u64::MAX);
                outcome.latency.saturating_record(micros.max(1));
                outcome.sent += 1;
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let mut total = Outcome::empty();
    for worker in workers {
        if let Ok(outcome) = worker.await {
            total.merge(outcome);
        }
    }
    total.elapsed = started.elapsed();
    // Every worker has returned: let the progress display finish even if
    // one of them died early.
    done.store(requests, Ordering::Relaxed);
    let _ = progress.await;
    total
}

async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    proxy: SocketAddr,
    kind: &Kind,
) -> anyhow::Result<u16> {
    let mut request = Request::builder()
        .method(kind.method.clone())
        .uri(format!("http://{proxy}{}", kind.path))
        .header(header::HOST, HOST);
    if kind.body.is_some() {
        request = request.header(header::CONTENT_TYPE, "application/json");
    }
    let request = request.body(Full::new(Bytes::from_static(
        kind.body.unwrap_or_default().as_bytes(),
    )))?;
    let exchange = async {
        let response = client.request(request).await?;
        let status = response.status().as_u16();
        // Read the whole body: latency is to the last byte, and the
        // connection goes back to the pool only once drained.
        response.into_body().collect().await?;
        anyhow::Ok(status)
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| anyhow::anyhow!("no response in {REQUEST_TIMEOUT:?}"))?
}

/// A single updating bar on a terminal; a line per quarter otherwise, so
/// logs and CI output stay readable.
async fn show_progress(done: Arc<AtomicUsize>, total: usize) {
    let terminal = std::io::stderr().is_terminal();
    let mut quarter_shown = 0;
    loop {
        let now = done.load(Ordering::Relaxed).min(total);
        if terminal {
            let filled = (now * BAR_WIDTH).checked_div(total).unwrap_or(BAR_WIDTH);
            let bar = "#".repeat(filled) + &".".repeat(BAR_WIDTH - filled);
            eprint!("\r[{bar}] {now}/{total}");
            let _ = std::io::stderr().flush();
        } else {
            let quarter = (now * 4).checked_div(total).unwrap_or(4);
            if quarter > quarter_shown {
                quarter_shown = quarter;
                eprintln!("sent {now}/{total} requests");
            }
        }
        if now >= total {
            if terminal {
                eprintln!();
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Outcome {
    fn empty() -> Outcome {
        Outcome {
            sent: 0,
            by_status: BTreeMap::new(),
            errors: 0,
            latency: super::backend::micros_histogram(),
            elapsed: Duration::ZERO,
        }
    }

    fn merge(&mut self, other: Outcome) {
        self.sent += other.sent;
        self.errors += other.errors;
        for (status, count) in other.by_status {
            *self.by_status.entry(status).or_default() += count;
        }
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.latency.add(&other.latency);
    }
}
