//! Aggregates per route and endpoint, the report (`GET /shadow/report`,
//! whose field names are a stable interface), the verdict, and the
//! terminal rendering used by `umbra report` and `umbra demo`.
//!
//! Noise rules 3 and 4 apply here, over aggregated counts (Diffy's method).
//! For each endpoint and field, the raw rate is the share of comparisons in
//! which primary and shadow differed there. The noise rate is either
//! (3) the share in which primary and *baseline* (a second copy of v1,
//! mirrored like the shadow) differed there, or, without a baseline,
//! (4) the share of *identical requests* (same method, URI and no body)
//! whose two primary responses differed there: a field that changes between
//! two answers of v1 to the same request is noise by definition. A field is
//! reported only when raw > noise, |raw − noise| / (raw + noise) exceeds the
//! relative threshold (20%), and |raw − noise| exceeds the absolute
//! threshold (0.03% of the endpoint's comparisons).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use super::stats::{self, Reservoir};
use crate::config::model::AnalysisSettings;

/// Examples kept per field.
const EXAMPLES: usize = 3;
/// Differences listed per endpoint in the report.
const TOP_DIFFERENCES: usize = 10;
/// Distinct difference signatures remembered per endpoint.
const MAX_SIGNATURES: usize = 512;
/// Latency samples kept per endpoint and side for the per-endpoint test.
pub const ENDPOINT_RESERVOIR: usize = 256;
/// Per-endpoint latency is only judged with at least this many samples.
const MIN_ENDPOINT_LATENCY_SAMPLES: usize = 20;

// ---------------------------------------------------------------- report --

/// `GET /shadow/report`. Names are stable: other tools read them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    pub routes: Vec<RouteReport>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RouteReport {
    pub name: String,
    pub host: String,
    /// The primary destination (`host|subset|port`).
    pub primary: String,
    /// The shadow (mirror) label.
    pub shadow: String,
    /// Pairs where both sides answered and were diffed.
    pub compared: u64,
    /// Compared pairs with at least one difference beyond noise.
    pub mismatched: u64,
    /// `PROMOTE`, `HOLD` or `REJECT`.
    pub verdict: String,
    pub reasons: Vec<String>,
    pub primary_error_rate: f64,
    pub shadow_error_rate: f64,
    pub latency: LatencyReport,
    pub endpoints: Vec<EndpointReport>,
    /// Pairs where the primary answered (the shadow may have failed).
    pub samples: u64,
    pub mismatches_by_kind: BTreeMap<String, u64>,
    pub errors: ErrorCounts,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ErrorCounts {
    pub primary_5xx: u64,
    pub shadow_5xx: u64,
    pub shadow_connect_failures: u64,
    pub shadow_timeouts: u64,
    pub shadow_failures: u64,
    /// Shadows not sent because their target was ejected for not answering.
    #[serde(default)]
    pub shadow_unresponsive: u64,
    /// Pairs skipped because the primary itself failed (never blamed on v2).
    pub primary_failures: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LatencyReport {
    pub primary: Percentiles,
    pub shadow: Percentiles,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50_ms: f64,
    pub p99_ms: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndpointReport {
    pub method: String,
    pub path: String,
    pub compared: u64,
    pub mismatched: u64,
    pub differences: Vec<DifferenceReport>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DifferenceReport {
    pub location: String,
    pub kind: String,
    pub count: u64,
    pub examples: Vec<Example>,
    pub raw_rate: f64,
    pub noise_rate: f64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    pub request_id: String,
    pub primary: String,
    pub shadow: String,
}

// ----------------------------------------------------------------- state --

/// Everything remembered about one route; persisted as JSON in SQLite.
/// A field a database written by an older umbra lacks reads as empty, so
/// such a database still loads (and `umbra report --db` still reads it).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RouteState {
    pub name: String,
    /// The VirtualService whose `ShadowAnalysis` judges it: a reload that
    /// changes its thresholds applies them at once. Empty in a database
    /// written before it was kept, until the route's next sample.
    pub virtual_service: String,
    pub host: String,
    pub primary: String,
    pub shadow: String,
    pub samples: u64,
    pub compared: u64,
    pub primary_errors: u64,
    pub shadow_errors: u64,
    pub errors: ErrorCounts,
    pub latency_primary: Latency,
    pub latency_shadow: Latency,
    pub reservoir_primary: Reservoir,
    pub reservoir_shadow: Reservoir,
    pub endpoints: BTreeMap<String, EndpointState>,
    pub thresholds: Thresholds,
}

/// The verdict settings in force, kept with the state so a report from the
/// database alone judges the same way. (A setting an older database lacks
/// reads as its default.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Thresholds {
    pub min_samples: u64,
    pub relative: f64,
    pub absolute: f64,
    pub max_mismatch_rate: f64,
    pub confidence: f64,
    pub latency_effect: f64,
    /// The least p50 difference, in milliseconds, judged slower.
    pub latency_margin_ms: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds::from(&AnalysisSettings::default())
    }
}

impl Thresholds {
    /// Whether the shadow is slower, given the test of the two sides'
    /// samples and their p50s in milliseconds: significantly, by at least
    /// `latency_effect` and by at least `latency_margin_ms` (below that
    /// the difference is within what umbra's own scheduling adds to a
    /// side). The effect (shadow p50 ÷ primary p50 − 1) when it is.
    fn slower(&self, test: &stats::Test, p50: f64, s50: f64) -> Option<f64> {
        let effect = if p50 > 0.0 { s50 / p50 - 1.0 } else { 0.0 };
        let judged = test.significant(self.confidence)
            && effect >= self.latency_effect
            && s50 - p50 >= self.latency_margin_ms;
        judged.then_some(effect)
    }
}

impl From<&AnalysisSettings> for Thresholds {
    fn from(s: &AnalysisSettings) -> Self {
        Thresholds {
            min_samples: s.min_samples,
            relative: s.relative_threshold,
            absolute: s.absolute_threshold,
            max_mismatch_rate: s.max_mismatch_rate,
            confidence: s.confidence,
            latency_effect: s.latency_effect,
            latency_margin_ms: s.latency_margin.as_secs_f64() * 1000.0,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct EndpointState {
    pub method: String,
    pub path: String,
    pub compared: u64,
    /// Comparisons that also had a baseline response (rule 3's N).
    pub baseline_compared: u64,
    /// Identical-request primary pairs seen (rule 4's N).
    pub noise_pairs: u64,
    pub fields: BTreeMap<String, FieldState>,
    /// Sorted difference locations of each comparison → count, so
    /// `mismatched` can be recomputed once noise is known.
    pub signatures: BTreeMap<String, u64>,
    /// Comparisons whose signature did not fit in `signatures`.
    pub signature_overflow: u64,
    pub latency_primary: Reservoir,
    pub latency_shadow: Reservoir,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct FieldState {
    pub kind: String,
    /// Comparisons where primary and shadow differed here.
    pub raw: u64,
    /// Comparisons where primary and baseline differed here.
    pub baseline: u64,
    /// Identical-request primary pairs that differed here.
    pub learned: u64,
    pub examples: Vec<Example>,
}

impl FieldState {
    pub fn example(&mut self, example: Example) {
        if self.examples.len() < EXAMPLES {
            self.examples.push(example);
        }
    }
}

/// An hdrhistogram of microseconds that serializes as (value, count) pairs.
#[derive(Debug, Clone)]
pub struct Latency(pub Histogram<u64>);

impl Default for Latency {
    fn default() -> Self {
        // 1 µs .. 10 min at 3 significant digits; the bounds are valid.
        Latency(
            Histogram::new_with_bounds(1, 600_000_000, 3).unwrap_or_else(|_| {
                Histogram::new(3).unwrap_or_else(|_| unreachable!("3 significant digits is valid"))
            }),
        )
    }
}

impl Latency {
    pub fn record(&mut self, micros: u64) {
        self.0.saturating_record(micros.max(1));
    }

    fn millis_at(&self, quantile: f64) -> f64 {
        if self.0.is_empty() {
            0.0
        } else {
            self.0.value_at_quantile(quantile) as f64 / 1000.0
        }
    }
}

impl Serialize for Latency {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let pairs: Vec<(u64, u64)> = self
            .0
            .iter_recorded()
            .map(|v| (v.value_iterated_to(), v.count_at_value()))
            .collect();
        pairs.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Latency {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let pairs = Vec::<(u64, u64)>::deserialize(d)?;
        let mut latency = Latency::default();
        for (value, count) in pairs {
            let _ = latency.0.record_n(value.max(1), count);
        }
        Ok(latency)
    }
}

// --------------------------------------------------------------- verdict --

impl RouteState {
    pub fn report(&self) -> RouteReport {
        let t = &self.thresholds;
        let mut endpoints = Vec::new();
        let mut mismatched = 0;
        let mut by_kind: BTreeMap<String, u64> = BTreeMap::new();
        let mut top: Vec<(u64, String, String)> = Vec::new();
        for endpoint in self.endpoints.values() {
            let (report, kinds) = endpoint.report_and_kinds(t);
            mismatched += report.mismatched;
            for (kind, count) in kinds {
                *by_kind.entry(kind).or_default() += count;
            }
            for d in report
                .differences
                .iter()
                .filter(|d| d.location != "latency")
            {
                top.push((
                    d.count,
                    d.location.clone(),
                    format!("{} {}", report.method, report.path),
                ));
            }
            endpoints.push(report);
        }
        endpoints.sort_by(|a, b| {
            b.mismatched
                .cmp(&a.mismatched)
                .then(b.compared.cmp(&a.compared))
        });
        top.sort_by_key(|entry| std::cmp::Reverse(entry.0));
        let rate = |n: u64, d: u64| if d == 0 { 0.0 } else { n as f64 / d as f64 };
        let primary_error_rate = rate(self.primary_errors, self.samples);
        let shadow_error_rate = rate(self.shadow_errors, self.samples);
        let latency = LatencyReport {
            primary: Percentiles {
                p50_ms: self.latency_primary.millis_at(0.5),
                p99_ms: self.latency_primary.millis_at(0.99),
            },
            shadow: Percentiles {
                p50_ms: self.latency_shadow.millis_at(0.5),
                p99_ms: self.latency_shadow.millis_at(0.99),
            },
        };

        let mut reasons = Vec::new();
        let mut reject = false;
        let hold = self.samples < t.min_samples;
        if hold {
            reasons.push(format!(
                "not enough traffic: {} of {} samples needed",
                self.samples, t.min_samples
            ));
        } else {
            let errors = stats::two_proportion(
                self.primary_errors,
                self.samples,
                self.shadow_errors,
                self.samples,
            );
            if errors.significant(t.confidence) {
                reject = true;
                reasons.push(format!(
                    "shadow error rate {:.1}% is significantly higher than the primary's {:.1}% (two-proportion z = {:.1}, p = {:.4})",
                    100.0 * shadow_error_rate,
                    100.0 * primary_error_rate,
                    errors.statistic,
                    errors.p
                ));
                let unresponsive = self.errors.shadow_unresponsive;
                if unresponsive > 0 {
                    let target = match self.shadow.as_str() {
                        "" => "the shadow",
                        named => named,
                    };
                    reasons.push(format!(
                        "{unresponsive} of those shadows were never sent: {target} stopped answering and was ejected (umbra_mirror_ejected)"
                    ));
                }
            }
            let slower = stats::mann_whitney_greater(
                &self.reservoir_primary.values,
                &self.reservoir_shadow.values,
            );
            let (p50, s50) = (latency.primary.p50_ms, latency.shadow.p50_ms);
            if let Some(effect) = t.slower(&slower, p50, s50) {
                reject = true;
                reasons.push(format!(
                    "shadow is slower: p50 {s50:.1} ms vs the primary's {p50:.1} ms (+{:.0}%, Mann-Whitney p = {:.4})",
                    100.0 * effect,
                    slower.p
                ));
            }
            for endpoint in &endpoints {
                if let Some(slow) = endpoint
                    .differences
                    .iter()
                    .find(|d| d.location == "latency")
                {
                    if let Some(example) = slow.examples.first() {
                        reject = true;
                        reasons.push(format!(
                            "shadow is slower on {} {}: {} vs the primary's {} ({})",
                            endpoint.method,
                            endpoint.path,
                            example.shadow,
                            example.primary,
                            example.request_id
                        ));
                    }
                }
            }
            let mismatch_rate = rate(mismatched, self.compared);
            if mismatch_rate > t.max_mismatch_rate {
                reject = true;
                let worst: Vec<String> = top
                    .iter()
                    .take(3)
                    .map(|(count, location, endpoint)| {
                        format!("{location} on {endpoint} ({count}×)")
                    })
                    .collect();
                reasons.push(format!(
                    "{:.1}% of compared responses differ beyond noise (limit {:.1}%): {}",
                    100.0 * mismatch_rate,
                    100.0 * t.max_mismatch_rate,
                    worst.join(", ")
                ));
            }
            if !reject {
                // Primary first, as in the table below it, and each value
                // named: the line is read on its own too (the dashboard).
                reasons.push(format!(
                    "{} samples: error rate primary {:.1}% vs shadow {:.1}%, p50 primary {p50:.2} ms vs shadow {s50:.2} ms, {} of {} compared responses differ beyond noise",
                    self.samples,
                    100.0 * primary_error_rate,
                    100.0 * shadow_error_rate,
                    mismatched,
                    self.compared
                ));
            }
        }
        let verdict = if reject {
            "REJECT"
        } else if hold {
            "HOLD"
        } else {
            "PROMOTE"
        };
        RouteReport {
            name: self.name.clone(),
            host: self.host.clone(),
            primary: self.primary.clone(),
            shadow: self.shadow.clone(),
            compared: self.compared,
            mismatched,
            verdict: verdict.into(),
            reasons,
            primary_error_rate,
            shadow_error_rate,
            latency,
            endpoints,
            samples: self.samples,
            mismatches_by_kind: by_kind,
            errors: self.errors.clone(),
        }
    }
}

impl EndpointState {
    /// The noise rate for a field: baseline-measured when a baseline ran,
    /// else learned from identical requests.
    fn noise_rate(&self, field: &FieldState) -> f64 {
        if self.baseline_compared > 0 {
            field.baseline as f64 / self.baseline_compared as f64
        } else if self.noise_pairs > 0 {
            field.learned as f64 / self.noise_pairs as f64
        } else {
            0.0
        }
    }

    pub fn report(&self, t: &Thresholds) -> EndpointReport {
        self.report_and_kinds(t).0
    }

    /// The report, and every difference beyond noise counted by kind: the
    /// report lists only the first [`TOP_DIFFERENCES`], and a route's
    /// `mismatches_by_kind` summed over those alone came out short of
    /// `umbra_shadow_differences_total` for an endpoint with more.
    fn report_and_kinds(&self, t: &Thresholds) -> (EndpointReport, BTreeMap<String, u64>) {
        let n = self.compared.max(1) as f64;
        let mut reported = BTreeSet::new();
        let mut differences = Vec::new();
        let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
        for (location, field) in &self.fields {
            let raw = field.raw as f64 / n;
            let noise = self.noise_rate(field);
            if beyond_noise(raw, noise, t) {
                reported.insert(location.as_str());
                *kinds.entry(field.kind.clone()).or_default() += field.raw;
                differences.push(DifferenceReport {
                    location: location.clone(),
                    kind: field.kind.clone(),
                    count: field.raw,
                    examples: field.examples.clone(),
                    raw_rate: raw,
                    noise_rate: noise,
                });
            }
        }
        // Status changes first: they matter most and must never be cut.
        differences.sort_by(|a, b| {
            (b.location == "status")
                .cmp(&(a.location == "status"))
                .then(b.count.cmp(&a.count))
                .then(a.location.cmp(&b.location))
        });
        differences.truncate(TOP_DIFFERENCES);
        if let Some(slower) = self.slower(t) {
            differences.insert(0, slower);
        }
        let mut mismatched: u64 = self
            .signatures
            .iter()
            .filter(|(signature, _)| signature.split('\n').any(|l| reported.contains(l)))
            .map(|(_, count)| count)
            .sum();
        if !reported.is_empty() {
            mismatched += self.signature_overflow;
        }
        let report = EndpointReport {
            method: self.method.clone(),
            path: self.path.clone(),
            compared: self.compared,
            mismatched: mismatched.min(self.compared),
            differences,
        };
        (report, kinds)
    }

    /// A latency regression on this endpoint, reported as a difference at
    /// location `latency` (it does not count as a mismatched response).
    pub fn slower(&self, t: &Thresholds) -> Option<DifferenceReport> {
        let (p, s) = (&self.latency_primary.values, &self.latency_shadow.values);
        if p.len() < MIN_ENDPOINT_LATENCY_SAMPLES || s.len() < MIN_ENDPOINT_LATENCY_SAMPLES {
            return None;
        }
        let test = stats::mann_whitney_greater(p, s);
        let (p50, s50) = (stats::median(p), stats::median(s));
        let effect = t.slower(&test, p50, s50)?;
        Some(DifferenceReport {
            location: "latency".into(),
            kind: "slower".into(),
            count: self.latency_shadow.seen,
            examples: vec![Example {
                request_id: format!("Mann-Whitney p = {:.4}", test.p),
                primary: format!("p50 {p50:.2} ms"),
                shadow: format!("p50 {s50:.2} ms (+{:.0}%)", 100.0 * effect),
            }],
            raw_rate: 1.0,
            noise_rate: 0.0,
        })
    }

    pub fn count_signature(&mut self, locations: &[&str]) {
        if locations.is_empty() {
            return;
        }
        let signature = locations.join("\n");
        if let Some(count) = self.signatures.get_mut(&signature) {
            *count += 1;
        } else if self.signatures.len() < MAX_SIGNATURES {
            self.signatures.insert(signature, 1);
        } else {
            self.signature_overflow += 1;
        }
    }
}

/// Diffy's rule: a field's raw difference rate must beat its noise rate,
/// by more than the relative and the absolute thresholds.
pub fn beyond_noise(raw: f64, noise: f64, t: &Thresholds) -> bool {
    let delta = raw - noise;
    raw > noise && delta / (raw + noise) > t.relative && delta > t.absolute
}

/// Verdict as a gauge value.
pub fn verdict_value(verdict: &str) -> i64 {
    match verdict {
        "PROMOTE" => 1,
        "REJECT" => -1,
        _ => 0,
    }
}

// ------------------------------------------------------------- rendering --

/// The terminal table `umbra report` prints.
pub fn render_table(report: &Report) -> String {
    let mut out = String::new();
    if report.routes.is_empty() {
        out.push_str("No mirrored traffic analysed yet.\n");
        return out;
    }
    for route in &report.routes {
        let _ = writeln!(
            out,
            "{}  {}  ({} → shadow {})",
            route.verdict, route.name, route.primary, route.shadow
        );
        for reason in &route.reasons {
            let _ = writeln!(out, "  · {reason}");
        }
        let _ = writeln!(out, "  {:<22}{:>14}{:>14}", "", "primary", "shadow");
        let _ = writeln!(
            out,
            "  {:<22}{:>13.2}%{:>13.2}%",
            "error rate",
            100.0 * route.primary_error_rate,
            100.0 * route.shadow_error_rate
        );
        let _ = writeln!(
            out,
            "  {:<22}{:>11.2} ms{:>11.2} ms",
            "latency p50", route.latency.primary.p50_ms, route.latency.shadow.p50_ms
        );
        let _ = writeln!(
            out,
            "  {:<22}{:>11.2} ms{:>11.2} ms",
            "latency p99", route.latency.primary.p99_ms, route.latency.shadow.p99_ms
        );
        let _ = writeln!(
            out,
            "  samples {}, compared {}, mismatched {}",
            route.samples, route.compared, route.mismatched
        );
        for endpoint in &route.endpoints {
            if endpoint.differences.is_empty() {
                continue;
            }
            let _ = writeln!(
                out,
                "  {} {}  ({} of {} differ)",
                endpoint.method, endpoint.path, endpoint.mismatched, endpoint.compared
            );
            for d in &endpoint.differences {
                let _ = writeln!(out, "    {:<40} {:<16} {:>6}×", d.location, d.kind, d.count);
                if let Some(example) = d.examples.first() {
                    // A latency difference's example carries its test's
                    // result where others carry a request id.
                    let label = if d.location == "latency" {
                        ""
                    } else {
                        "request "
                    };
                    let _ = writeln!(
                        out,
                        "      primary {}  shadow {}  ({label}{})",
                        example.primary, example.shadow, example.request_id
                    );
                }
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thresholds() -> Thresholds {
        Thresholds {
            min_samples: 10,
            ..Thresholds::default()
        }
    }

    #[test]
    fn diffy_thresholds() {
        let t = thresholds();
        // Equal rates: noise.
        assert!(!beyond_noise(0.5, 0.5, &t));
        // Relative difference exactly 20% is not beyond it: (0.6-0.4)/1.0.
        assert!(!beyond_noise(0.6, 0.4, &t));
        assert!(beyond_noise(0.61, 0.4, &t));
        // Absolute difference must pass 0.03%.
        assert!(!beyond_noise(0.0003, 0.0, &t));
        assert!(beyond_noise(0.00031, 0.0, &t));
        // A field that never differed in noise and always in raw.
        assert!(beyond_noise(1.0, 0.0, &t));
        assert!(!beyond_noise(0.0, 0.0, &t));
    }

    fn endpoint_with(raw: u64, learned: u64, pairs: u64, compared: u64) -> EndpointState {
        let mut e = EndpointState {
            method: "GET".into(),
            path: "/x".into(),
            compared,
            noise_pairs: pairs,
            ..Default::default()
        };
        e.fields.insert(
            "body.t".into(),
            FieldState {
                kind: "changed".into(),
                raw,
                learned,
                ..Default::default()
            },
        );
        e.signatures.insert("body.t".into(), raw);
        e
    }

    #[test]
    fn learned_noise_hides_fields_that_change_between_identical_requests() {
        let t = thresholds();
        // Differs in every comparison, and in every identical-request pair.
        let noisy = endpoint_with(100, 50, 50, 100).report(&t);
        assert!(noisy.differences.is_empty());
        assert_eq!(noisy.mismatched, 0);
        // Differs in every comparison but never between identical requests.
        let real = endpoint_with(100, 0, 50, 100).report(&t);
        assert_eq!(real.differences.len(), 1);
        assert_eq!(real.mismatched, 100);
    }

    #[test]
    fn mismatches_by_kind_count_every_difference_not_only_those_listed() {
        let mut endpoint = endpoint_with(100, 0, 50, 100);
        for i in 0..TOP_DIFFERENCES {
            let field = FieldState {
                kind: "changed".into(),
                raw: 100,
                ..Default::default()
            };
            endpoint.fields.insert(format!("body.f{i}"), field);
        }
        let mut route = route(100, 0, 0);
        route.endpoints.insert("GET /x".into(), endpoint);
        let report = route.report();
        let listed = report.endpoints[0].differences.len();
        assert_eq!(listed, TOP_DIFFERENCES, "the list is cut");
        // body.t and the ten body.f*, 100 comparisons each.
        assert_eq!(report.mismatches_by_kind["changed"], 1100);
    }

    fn route(samples: u64, primary_errors: u64, shadow_errors: u64) -> RouteState {
        let mut r = RouteState {
            name: "r".into(),
            samples,
            compared: samples,
            primary_errors,
            shadow_errors,
            thresholds: thresholds(),
            ..Default::default()
        };
        for i in 0..samples {
            let v = 1000 + (i % 10) * 10;
            r.latency_primary.record(v);
            r.latency_shadow.record(v);
            r.reservoir_primary.add(v as f64);
            r.reservoir_shadow.add(v as f64);
        }
        r
    }

    #[test]
    fn zero_traffic_holds() {
        let report = route(0, 0, 0).report();
        assert_eq!(report.verdict, "HOLD");
        assert_eq!(
            report.reasons,
            ["not enough traffic: 0 of 10 samples needed"]
        );
        assert_eq!(report.shadow_error_rate, 0.0);
    }

    #[test]
    fn identical_behaviour_promotes() {
        let report = route(200, 0, 0).report();
        assert_eq!(report.verdict, "PROMOTE", "{:?}", report.reasons);
    }

    #[test]
    fn more_shadow_errors_reject() {
        let report = route(200, 0, 40).report();
        assert_eq!(report.verdict, "REJECT");
        assert!(
            report.reasons[0].starts_with(
                "shadow error rate 20.0% is significantly higher than the primary's 0.0%"
            ),
            "{:?}",
            report.reasons
        );
    }

    #[test]
    fn all_errors_on_both_sides_is_not_a_regression() {
        let report = route(200, 200, 200).report();
        assert_eq!(report.verdict, "PROMOTE", "{:?}", report.reasons);
        assert_eq!(report.primary_error_rate, 1.0);
    }

    #[test]
    fn slower_shadow_rejects_only_past_the_effect_size() {
        let mut r = route(200, 0, 0);
        r.latency_shadow = Latency::default();
        r.reservoir_shadow = Reservoir::default();
        for i in 0..200u64 {
            let v = 3000 + (i % 10) * 10;
            r.latency_shadow.record(v);
            r.reservoir_shadow.add(v as f64);
        }
        let report = r.report();
        assert_eq!(report.verdict, "REJECT");
        assert!(
            report.reasons[0].starts_with("shadow is slower: p50 3.0 ms vs the primary's 1.0 ms"),
            "{:?}",
            report.reasons
        );
        // Slower by 5%: significant but below the 20% effect size.
        let mut r = route(200, 0, 0);
        r.latency_shadow = Latency::default();
        r.reservoir_shadow = Reservoir::default();
        for i in 0..200u64 {
            let v = 1050 + (i % 10) * 10;
            r.latency_shadow.record(v);
            r.reservoir_shadow.add(v as f64);
        }
        assert_eq!(r.report().verdict, "PROMOTE");
    }

    /// 200 samples of v1 taking `primary` µs and v2 `shadow` µs (±45),
    /// on the route and on one endpoint.
    fn timed(primary: u64, shadow: u64) -> RouteState {
        let mut r = route(200, 0, 0);
        r.latency_primary = Latency::default();
        r.latency_shadow = Latency::default();
        r.reservoir_primary = Reservoir::default();
        r.reservoir_shadow = Reservoir::default();
        let mut endpoint = EndpointState {
            method: "GET".into(),
            path: "/x".into(),
            ..EndpointState::default()
        };
        for i in 0..200u64 {
            let (p, s) = (primary + (i % 10) * 10, shadow + (i % 10) * 10);
            r.latency_primary.record(p);
            r.latency_shadow.record(s);
            // The reservoirs hold milliseconds.
            let (p, s) = (p as f64 / 1000.0, s as f64 / 1000.0);
            r.reservoir_primary.add(p);
            r.reservoir_shadow.add(s);
            endpoint.latency_primary.add(p);
            endpoint.latency_shadow.add(s);
        }
        r.endpoints.insert("GET /x".into(), endpoint);
        r
    }

    #[test]
    fn a_difference_under_the_latency_margin_is_not_slower() {
        // 0.2 ms slower (+40%), significant: within the 1 ms margin.
        let report = timed(500, 700).report();
        assert_eq!(report.verdict, "PROMOTE", "{:?}", report.reasons);
        assert!(report.endpoints[0].differences.is_empty());
        // Without a margin it is judged, on the route and the endpoint.
        let mut r = timed(500, 700);
        r.thresholds.latency_margin_ms = 0.0;
        let report = r.report();
        assert_eq!(report.verdict, "REJECT");
        assert!(
            report.reasons[0].starts_with("shadow is slower: p50 0.7 ms vs the primary's 0.5 ms"),
            "{:?}",
            report.reasons
        );
        assert_eq!(report.endpoints[0].differences[0].kind, "slower");
        // Past the margin, as past the effect size, it is slower.
        let report = timed(500, 1600).report();
        assert_eq!(report.verdict, "REJECT", "{:?}", report.reasons);
        assert_eq!(report.endpoints[0].differences[0].kind, "slower");
    }

    #[test]
    fn a_route_saved_by_an_older_umbra_loads_with_what_it_has() {
        // No host, errors, latencies, endpoints' signatures or thresholds.
        let saved = r#"{"name":"r","samples":150,"compared":150,"shadow_errors":3,
            "endpoints":{"GET /a":{"method":"GET","path":"/a","compared":150}}}"#;
        let route: RouteState = serde_json::from_str(saved).unwrap();
        let report = route.report();
        assert_eq!((report.samples, report.compared), (150, 150));
        assert_eq!(report.endpoints[0].path, "/a");
        assert_eq!(route.thresholds, Thresholds::default());
    }

    #[test]
    fn thresholds_saved_without_a_setting_read_it_as_its_default() {
        let saved = r#"{"min_samples":10,"relative":0.2,"absolute":0.0003,"max_mismatch_rate":0.01,"confidence":0.98,"latency_effect":0.2}"#;
        let read: Thresholds = serde_json::from_str(saved).unwrap();
        assert_eq!(read.latency_margin_ms, 1.0);
        assert_eq!(read.min_samples, 10);
    }

    #[test]
    fn the_summary_names_each_side_primary_first() {
        let mut r = route(200, 2, 4);
        r.latency_shadow = Latency::default();
        for i in 0..200u64 {
            r.latency_shadow.record(1050 + (i % 10) * 10);
        }
        let report = r.report();
        assert_eq!(report.verdict, "PROMOTE", "{:?}", report.reasons);
        assert_eq!(
            report.reasons,
            ["200 samples: error rate primary 1.0% vs shadow 2.0%, p50 primary 1.04 ms vs shadow 1.09 ms, 0 of 200 compared responses differ beyond noise"]
        );
    }

    #[test]
    fn the_table_labels_a_latency_test_as_a_test_not_a_request() {
        let difference = |location: &str, kind: &str, note: &str| DifferenceReport {
            location: location.into(),
            kind: kind.into(),
            count: 30,
            examples: vec![Example {
                request_id: note.into(),
                primary: "p".into(),
                shadow: "s".into(),
            }],
            raw_rate: 1.0,
            noise_rate: 0.0,
        };
        let mut route = route(200, 0, 0).report();
        route.endpoints.push(EndpointReport {
            method: "GET".into(),
            path: "/x".into(),
            compared: 30,
            mismatched: 30,
            differences: vec![
                difference("latency", "slower", "Mann-Whitney p = 0.0001"),
                difference("body.a", "changed", "rid-1"),
            ],
        });
        let table = render_table(&Report {
            routes: vec![route],
        });
        assert!(
            table.contains("      primary p  shadow s  (Mann-Whitney p = 0.0001)\n"),
            "{table}"
        );
        assert!(
            table.contains("      primary p  shadow s  (request rid-1)\n"),
            "{table}"
        );
    }

    #[test]
    fn latency_round_trips_through_json() {
        let mut l = Latency::default();
        for v in [100, 200, 300, 5000] {
            l.record(v);
        }
        let json = serde_json::to_string(&l).unwrap();
        let back: Latency = serde_json::from_str(&json).unwrap();
        assert_eq!(back.0.len(), 4);
        assert_eq!(back.millis_at(0.5), l.millis_at(0.5));
    }
}
