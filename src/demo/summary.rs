//! What the demo prints at the end: per side what each backend received
//! (the Host values prove the `-shadow` rewrite), latency as the client saw
//! it and as umbra measured the shadows, mirror outcomes from umbra's own
//! metrics, and the shadow-analysis report.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::backend::Stats;
use super::traffic;
use crate::analysis::Analyzer;
use crate::metrics;

/// Mirror outcomes shown, in this order; the rest are listed when non-zero.
const MAIN_OUTCOMES: [&str; 4] = ["sent", "completed", "failed", "timeout"];
const OTHER_OUTCOMES: [&str; 6] = [
    "dropped_overload",
    "dropped_unresponsive",
    "skipped_sampling",
    "skipped_method",
    "skipped_upgrade",
    "body_too_large",
];

/// Everything the summary is made of, kept for tests.
pub struct Summary {
    pub traffic: traffic::Outcome,
    pub v1: Stats,
    pub v2: Stats,
    /// `umbra_mirror_requests_total` by outcome, summed over routes.
    pub mirror: BTreeMap<&'static str, f64>,
    /// Shadow latency quantiles (p50, p99) as bucket upper bounds, seconds.
    pub shadow_latency: Option<(f64, f64)>,
    pub shadow_latency_mean: Option<f64>,
    /// The rendered analysis section.
    pub analysis: String,
}

/// `GET http://{admin}{path}` on umbra's admin listener, whole body as text.
pub async fn admin_get(admin: SocketAddr, path: &str) -> anyhow::Result<String> {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let request = Request::get(format!("http://{admin}{path}")).body(Empty::new())?;
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(request))
        .await
        .map_err(|_| anyhow::anyhow!("admin {path} did not answer in time"))??;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    anyhow::ensure!(status.is_success(), "admin {path} answered {status}");
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// The sum of every sample of counter/gauge `name` (exact series name, as
/// exposed) whose labels include all of `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples(text, name)
        .filter(|(series_labels, _)| {
            labels
                .iter()
                .all(|(k, v)| series_labels.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|(_, value)| value)
        .sum()
}

/// `(labels, value)` of every sample of exactly `name`.
fn samples<'a>(text: &'a str, name: &'a str) -> impl Iterator<Item = (&'a str, f64)> + 'a {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(move |line| {
            let rest = line.strip_prefix(name)?;
            let (labels, value) = match rest.as_bytes().first()? {
                b'{' => {
                    let end = rest.find('}')?;
                    (&rest[1..end], rest[end + 1..].trim())
                }
                b' ' => ("", rest.trim()),
                _ => return None,
            };
            // OpenMetrics may append a timestamp or exemplar: the value is
            // the first field.
            let value = value.split_whitespace().next()?.parse::<f64>().ok()?;
            Some((labels, value))
        })
}

/// Estimates the `quantile` of histogram `name` (base name, without
/// `_bucket`) over all its series: the upper bound of the first bucket
/// holding that share of observations. `None` when empty.
pub fn histogram_quantile(text: &str, name: &str, quantile: f64) -> Option<f64> {
    let bucket_name = format!("{name}_bucket");
    let mut cumulative: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for (labels, count) in samples(text, &bucket_name) {
        let le = labels
            .split(',')
            .find_map(|pair| pair.trim().strip_prefix("le=\""))
            .and_then(|v| v.strip_suffix('"'))?;
        let bound = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse::<f64>().ok()?
        };
        // f64 is not Ord; the bit pattern of a non-negative float sorts the
        // same way as the float.
        cumulative.entry(bound.to_bits()).or_insert((bound, 0.0)).1 += count;
    }
    let total = cumulative.values().last()?.1;
    if total <= 0.0 {
        return None;
    }
    cumulative
        .values()
        .find(|(_, count)| *count >= quantile * total)
        .map(|(bound, _)| *bound)
}

/// The histogram's mean from `_sum` and `_count`.
pub fn histogram_mean(text: &str, name: &str) -> Option<f64> {
    let sum = metric_sum(text, &format!("{name}_sum"), &[]);
    let count = metric_sum(text, &format!("{name}_count"), &[]);
    (count > 0.0).then(|| sum / count)
}

/// The mirror counters from the admin `/metrics` text.
pub fn mirror_outcomes(text: &str) -> BTreeMap<&'static str, f64> {
    let name = format!("{}_total", metrics::MIRROR_REQUESTS);
    MAIN_OUTCOMES
        .iter()
        .chain(OTHER_OUTCOMES.iter())
        .map(|outcome| (*outcome, metric_sum(text, &name, &[("outcome", outcome)])))
        .collect()
}

/// The analysis section: the report's table, as `umbra report` prints it,
/// once the analysis worker has caught up.
pub async fn analysis_section(analyzer: &std::sync::Arc<Analyzer>) -> String {
    // Comparisons run on a worker queue: let it catch up first.
    let flushed = {
        let analyzer = analyzer.clone();
        tokio::task::spawn_blocking(move || analyzer.flush()).await
    };
    if flushed.is_err() {
        return "  (the analysis worker did not answer)\n".to_string();
    }
    indent(&crate::analysis::render_table(&analyzer.report()))
}

fn indent(text: &str) -> String {
    text.lines().fold(String::new(), |mut out, line| {
        let _ = writeln!(out, "  {line}");
        out
    })
}

/// Milliseconds, or microseconds below one: local backends answer in µs.
fn ms(duration: Duration) -> String {
    if duration < Duration::from_millis(1) {
        format!("{} µs", duration.as_micros())
    } else {
        format!("{:.1} ms", duration.as_secs_f64() * 1000.0)
    }
}

fn seconds_as_ms(seconds: f64) -> String {
    if seconds.is_infinite() {
        "> 8 s".to_string()
    } else {
        format!("{:.1} ms", seconds * 1000.0)
    }
}

fn hosts(stats: &Stats) -> String {
    let parts: Vec<String> = stats
        .by_host
        .iter()
        .map(|(host, count)| format!("{host} ×{count}"))
        .collect();
    if parts.is_empty() {
        "-".to_string()
    } else {
        parts.join(", ")
    }
}

fn classes(by_class: &BTreeMap<&'static str, u64>) -> String {
    let parts: Vec<String> = metrics::StatusClass::ALL
        .iter()
        .filter_map(|class| {
            let count = by_class.get(class.as_str()).copied().unwrap_or(0);
            (count > 0).then(|| format!("{} ×{count}", class.as_str()))
        })
        .collect();
    if parts.is_empty() {
        "-".to_string()
    } else {
        parts.join(", ")
    }
}

impl Summary {
    /// The text printed on stdout.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let t = &self.traffic;
        let statuses: Vec<String> = t
            .by_status
            .iter()
            .map(|(status, count)| format!("{status} ×{count}"))
            .collect();
        let _ = writeln!(
            out,
            "\nSent {} requests in {:.2} s: {}; {} without a response.",
            t.sent,
            t.elapsed.as_secs_f64(),
            statuses.join(", "),
            t.errors
        );
        let _ = writeln!(
            out,
            "The client only ever sees v1's answers; v2 gets a copy of each request.\n"
        );

        let row = |out: &mut String, label: &str, one: String, two: String| {
            let _ = writeln!(out, "  {label:<24} {one:<28} {two}");
        };
        row(
            &mut out,
            "",
            "v1 (primary)".to_string(),
            "v2 (shadow)".to_string(),
        );
        row(
            &mut out,
            "requests received",
            self.v1.total.to_string(),
            self.v2.total.to_string(),
        );
        row(&mut out, "Host header", hosts(&self.v1), hosts(&self.v2));
        row(
            &mut out,
            "status classes",
            classes(&self.v1.by_class),
            classes(&self.v2.by_class),
        );
        row(
            &mut out,
            "service time p50 / p99",
            format!("{} / {}", ms(self.v1.service_p50), ms(self.v1.service_p99)),
            format!("{} / {}", ms(self.v2.service_p50), ms(self.v2.service_p99)),
        );

        let paths: BTreeSet<&String> = self
            .v1
            .by_path_class
            .keys()
            .chain(self.v2.by_path_class.keys())
            .collect();
        let differing: Vec<String> = paths
            .into_iter()
            .filter_map(|path| {
                let empty = BTreeMap::new();
                let one = self.v1.by_path_class.get(path).unwrap_or(&empty);
                let two = self.v2.by_path_class.get(path).unwrap_or(&empty);
                let differs = one.keys().collect::<Vec<_>>() != two.keys().collect::<Vec<_>>();
                differs
                    .then(|| format!("    {path:<22} v1 {:<18} v2 {}", classes(one), classes(two)))
            })
            .collect();
        if !differing.is_empty() {
            let _ = writeln!(out, "\n  Paths where v1 and v2 answer differently:");
            for line in differing {
                let _ = writeln!(out, "{line}");
            }
        }

        let _ = writeln!(out, "\nLatency");
        let _ = writeln!(
            out,
            "  primary, seen by the client through umbra   p50 {}   p99 {}",
            ms(t.latency_at(0.5)),
            ms(t.latency_at(0.99))
        );
        match self.shadow_latency {
            Some((p50, p99)) => {
                let mean = self
                    .shadow_latency_mean
                    .map(|mean| format!("   mean {}", seconds_as_ms(mean)))
                    .unwrap_or_default();
                let _ = writeln!(
                    out,
                    "  shadow, measured by umbra                   p50 ≤ {}   p99 ≤ {}{mean}",
                    seconds_as_ms(p50),
                    seconds_as_ms(p99)
                );
            }
            None => {
                let _ = writeln!(out, "  shadow, measured by umbra                   no data");
            }
        }

        let _ = writeln!(
            out,
            "\nMirror outcomes ({}_total)",
            metrics::MIRROR_REQUESTS
        );
        let main: Vec<String> = MAIN_OUTCOMES
            .iter()
            .map(|o| format!("{o} {}", self.mirror.get(o).copied().unwrap_or(0.0)))
            .collect();
        let _ = writeln!(out, "  {}", main.join("   "));
        let other: Vec<String> = OTHER_OUTCOMES
            .iter()
            .filter_map(|o| {
                let value = self.mirror.get(o).copied().unwrap_or(0.0);
                (value > 0.0).then(|| format!("{o} {value}"))
            })
            .collect();
        if !other.is_empty() {
            let _ = writeln!(out, "  {}", other.join("   "));
        }

        let _ = writeln!(out, "\nShadow analysis (v2 compared with v1)");
        out.push_str(&self.analysis);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# TYPE umbra_mirror_requests counter
umbra_mirror_requests_total{route="default",mirror="httpbin|v2",outcome="sent"} 10
umbra_mirror_requests_total{route="default",mirror="httpbin|v2",outcome="completed"} 9
umbra_mirror_requests_total{route="other",mirror="x",outcome="completed"} 1
umbra_mirror_requests_total{route="default",mirror="httpbin|v2",outcome="failed"} 0
umbra_mirror_duration_seconds_sum{route="default",mirror="httpbin|v2"} 0.5
umbra_mirror_duration_seconds_count{route="default",mirror="httpbin|v2"} 10
umbra_mirror_duration_seconds_bucket{le="0.001",route="default",mirror="httpbin|v2"} 5
umbra_mirror_duration_seconds_bucket{le="0.1",route="default",mirror="httpbin|v2"} 9
umbra_mirror_duration_seconds_bucket{le="+Inf",route="default",mirror="httpbin|v2"} 10
"#;

    #[test]
    fn sums_counters_by_label() {
        let outcomes = mirror_outcomes(TEXT);
        assert_eq!(outcomes["sent"], 10.0);
        assert_eq!(outcomes["completed"], 10.0);
        assert_eq!(outcomes["failed"], 0.0);
        assert_eq!(outcomes["timeout"], 0.0);
        assert_eq!(metric_sum(TEXT, "umbra_mirror_requests", &[]), 0.0);
    }

    #[test]
    fn estimates_quantiles_from_buckets() {
        let name = "umbra_mirror_duration_seconds";
        assert_eq!(histogram_quantile(TEXT, name, 0.5), Some(0.001));
        assert_eq!(histogram_quantile(TEXT, name, 0.9), Some(0.1));
        assert_eq!(histogram_quantile(TEXT, name, 0.99), Some(f64::INFINITY));
        assert_eq!(histogram_mean(TEXT, name), Some(0.05));
        assert_eq!(histogram_quantile("", name, 0.5), None);
    }
}
