//! umbra: a traffic-mirroring ("shadowing") proxy configured with Istio
//! resources.
//!
//! The modules follow a request through the proxy:
//! `config` (Istio YAML → validated model) → `routing` (pick a route and a
//! weighted destination) → `proxy` (forward to the primary, stream the
//! response back) → `mirror` (sample, tee the body, fire-and-forget shadow
//! with a `-shadow` host) → `analysis` (compare primary with shadow, verdict)
//! → `admin` (metrics, JSON API, dashboard). `server` owns listeners,
//! connection limits, reload and shutdown.

pub mod accesslog;
pub mod admin;
pub mod analysis;
pub mod config;
pub mod deadline;
pub mod demo;
pub mod metrics;
pub mod mirror;
pub mod proxy;
pub mod routing;
pub mod server;

use std::io::Write;
use std::time::Duration;

/// A command-line number of seconds (`--interval 0.5`): one a `Duration`
/// can hold. An infinite or huge value would make a sleep on it panic,
/// and a negative one or NaN would be taken for zero.
pub fn seconds(text: &str) -> Result<Duration, String> {
    text.parse::<f64>()
        .ok()
        .filter(|seconds| *seconds >= 0.0)
        .and_then(|seconds| Duration::try_from_secs_f64(seconds).ok())
        .ok_or_else(|| format!("`{text}` is not a number of seconds (2, or 0.5, say)"))
}

/// Stdout could not take the output of `umbra report`, `demo` or `validate`.
#[derive(Debug, thiserror::Error)]
pub enum StdoutError {
    /// Its reader went away (`umbra report | head`). The binary exits
    /// quietly on this, as ripgrep does, where `print!` would panic.
    #[error("stdout was closed")]
    Closed,
    #[error("cannot write to stdout: {0}")]
    Failed(std::io::Error),
}

/// Writes `text` to stdout and flushes it, returning the errors `print!`
/// would panic on. A closed pipe is [`StdoutError::Closed`], so that the
/// binary does not take some other broken pipe (a socket's) for it.
pub fn print(text: &str) -> Result<(), StdoutError> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(|error| match error.kind() {
            std::io::ErrorKind::BrokenPipe => StdoutError::Closed,
            _ => StdoutError::Failed(error),
        })
}
