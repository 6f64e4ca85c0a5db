//! Access log: one line per primary request and one per shadow request,
//! joined by request id. Lines are formatted on the request's task and
//! handed to a writer thread through a bounded queue, so a slow disk or a
//! blocked stdout never stalls the proxy; when the queue is full the line is
//! dropped and counted.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{Method, Version};

/// Lines that may wait for the writer before new ones are dropped.
const QUEUE_LINES: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Combined Log Format plus upstream, duration, request id and route.
    Combined,
    Json,
}

/// Where lines go: `-` (stdout), a file path, or `off`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Stdout,
    File(PathBuf),
    Off,
}

impl std::str::FromStr for Target {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "-" | "stdout" => Target::Stdout,
            "off" | "none" => Target::Off,
            path => Target::File(PathBuf::from(path)),
        })
    }
}

/// One exchange to log.
pub struct Entry<'a> {
    pub client: IpAddr,
    pub method: &'a Method,
    /// Path and query.
    pub uri: &'a str,
    pub version: Version,
    /// 0 when no response was received (shadow failures).
    pub status: u16,
    pub bytes: u64,
    pub host: &'a str,
    pub referer: Option<&'a str>,
    pub user_agent: Option<&'a str>,
    /// The endpoint that answered, `-` for local replies.
    pub upstream: &'a str,
    pub duration: Duration,
    pub request_id: &'a str,
    pub route: &'a str,
    /// The mirror label for shadow lines; `None` for primary lines.
    pub shadow: Option<&'a str>,
    /// Why the exchange did not complete normally.
    pub error: Option<&'a str>,
}

/// A cheap, cloneable handle to the access log.
#[derive(Clone)]
pub struct AccessLog {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    tx: SyncSender<String>,
    format: Format,
    dropped: AtomicU64,
}

impl AccessLog {
    pub fn off() -> AccessLog {
        AccessLog { inner: None }
    }

    /// Starts the writer thread for `target`.
    pub fn open(target: &Target, format: Format) -> std::io::Result<AccessLog> {
        let sink: Box<dyn std::io::Write + Send> = match target {
            Target::Off => return Ok(AccessLog::off()),
            Target::Stdout => Box::new(std::io::stdout()),
            Target::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
        };
        let (tx, rx) = sync_channel(QUEUE_LINES);
        std::thread::Builder::new()
            .name("umbra-access-log".into())
            .spawn(move || write_lines(rx, sink))?;
        Ok(AccessLog {
            inner: Some(Arc::new(Inner {
                tx,
                format,
                dropped: AtomicU64::new(0),
            })),
        })
    }

    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Lines dropped because the writer fell behind.
    pub fn dropped(&self) -> u64 {
        self.inner
            .as_ref()
            .map_or(0, |inner| inner.dropped.load(Ordering::Relaxed))
    }

    pub fn write(&self, entry: &Entry<'_>) {
        let Some(inner) = &self.inner else {
            return;
        };
        let line = match inner.format {
            Format::Combined => combined(entry),
            Format::Json => json(entry),
        };
        if let Err(TrySendError::Full(_)) = inner.tx.try_send(line) {
            inner.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn write_lines(rx: Receiver<String>, sink: Box<dyn std::io::Write + Send>) {
    let mut out = std::io::BufWriter::new(sink);
    while let Ok(line) = rx.recv() {
        let _ = out.write_all(line.as_bytes());
        // Drain what is queued before flushing: one syscall per batch.
        while let Ok(line) = rx.try_recv() {
            let _ = out.write_all(line.as_bytes());
        }
        let _ = out.flush();
    }
}

fn version(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

/// `127.0.0.1 - - [25/Nov/2026:05:06:57 +0000] "GET / HTTP/1.1" 200 12
/// "-" "curl/8" upstream=… duration_ms=… request_id=… route=… host=…`
fn combined(e: &Entry<'_>) -> String {
    let mut line = String::with_capacity(256);
    let _ = write!(
        line,
        "{} - - [{}] \"{} {} {}\" {} {} \"{}\" \"{}\" upstream={} duration_ms={:.3} request_id={} route={} host={}",
        e.client,
        clf_time(SystemTime::now()),
        e.method,
        e.uri,
        version(e.version),
        e.status,
        e.bytes,
        e.referer.unwrap_or("-"),
        e.user_agent.unwrap_or("-"),
        e.upstream,
        e.duration.as_secs_f64() * 1000.0,
        e.request_id,
        e.route,
        e.host,
    );
    if let Some(mirror) = e.shadow {
        let _ = write!(line, " shadow={}", mirror.replace(' ', "_"));
    }
    if let Some(error) = e.error {
        let _ = write!(line, " error={error}");
    }
    line.push('\n');
    line
}

fn json(e: &Entry<'_>) -> String {
    let value = serde_json::json!({
        "time": clf_time(SystemTime::now()),
        "client": e.client.to_string(),
        "method": e.method.as_str(),
        "uri": e.uri,
        "protocol": version(e.version),
        "status": e.status,
        "bytes": e.bytes,
        "host": e.host,
        "referer": e.referer,
        "user_agent": e.user_agent,
        "upstream": e.upstream,
        "duration_ms": e.duration.as_secs_f64() * 1000.0,
        "request_id": e.request_id,
        "route": e.route,
        "shadow": e.shadow.is_some(),
        "mirror": e.shadow,
        "error": e.error,
    });
    let mut line = value.to_string();
    line.push('\n');
    line
}

/// `25/Nov/2026:05:06:57 +0000`, the Common Log Format time in UTC.
fn clf_time(now: SystemTime) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's days-to-civil algorithm.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{:02}/{}/{}:{:02}:{:02}:{:02} +0000",
        day,
        MONTHS[(month - 1) as usize],
        year,
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clf_time_formats_utc() {
        let t = UNIX_EPOCH + Duration::from_secs(1_795_583_217); // 2026-11-25 05:06:57 UTC
        assert_eq!(clf_time(t), "25/Nov/2026:05:06:57 +0000");
        assert_eq!(clf_time(UNIX_EPOCH), "01/Jan/1970:00:00:00 +0000");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(clf_time(leap), "29/Feb/2000:00:00:00 +0000");
    }

    fn entry<'a>(method: &'a Method, shadow: Option<&'a str>) -> Entry<'a> {
        Entry {
            client: "127.0.0.1".parse().unwrap(),
            method,
            uri: "/headers?x=1",
            version: Version::HTTP_11,
            status: 200,
            bytes: 42,
            host: "httpbin:8000",
            referer: None,
            user_agent: Some("curl/8"),
            upstream: "127.0.0.1:8001",
            duration: Duration::from_micros(1500),
            request_id: "rid-1",
            route: "httpbin.http[0]",
            shadow,
            error: None,
        }
    }

    #[test]
    fn combined_line_has_the_join_fields() {
        let line = combined(&entry(&Method::GET, None));
        assert!(line.starts_with("127.0.0.1 - - ["), "{line}");
        assert!(line.contains("\"GET /headers?x=1 HTTP/1.1\" 200 42 \"-\" \"curl/8\""));
        assert!(line.contains("upstream=127.0.0.1:8001 duration_ms=1.500 request_id=rid-1"));
        assert!(!line.contains("shadow="));
        let shadow = combined(&entry(&Method::GET, Some("httpbin/v2")));
        assert!(shadow.contains(" shadow=httpbin/v2"), "{shadow}");
    }

    #[test]
    fn json_line_parses() {
        let line = json(&entry(&Method::POST, Some("v2")));
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["method"], "POST");
        assert_eq!(value["shadow"], true);
        assert_eq!(value["request_id"], "rid-1");
    }
}
