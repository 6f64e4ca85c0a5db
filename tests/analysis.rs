//! Shadow analysis end to end: real v1/v2 backends behind umbra, the
//! report, its verdicts, persistence, the CLI and the dashboard.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use serde_json::{json, Value};

use crate::support::*;
use umbra::analysis::{Analyzer, Captured, Outcome, Report, Sample};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A JSON response with fresh noise in it: a UUID, a timestamp, an
/// increasing counter-derived token, and keys in the given order.
fn noisy_json(fields: &[(&str, Value)], reorder: bool) -> Response<Body> {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let id = format!("{:08x}-1234-4abc-9def-{:012x}", n, n * 7919);
    let at = format!(
        "2026-11-25T06:{:02}:{:02}.{:03}Z",
        n % 60,
        (n / 60) % 60,
        n % 1000
    );
    let mut pairs: Vec<(String, Value)> = fields
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    pairs.push(("requestId".into(), Value::String(id)));
    pairs.push(("generatedAt".into(), Value::String(at)));
    if reorder {
        pairs.reverse();
    }
    // Build the text by hand so key order is what we chose.
    let body = format!(
        "{{{}}}",
        pairs
            .iter()
            .map(|(k, v)| format!("{}:{}", Value::String(k.clone()), v))
            .collect::<Vec<_>>()
            .join(",")
    );
    let mut response = Response::new(full(body));
    response
        .headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    response
        .headers_mut()
        .insert("date", httpdate_now().parse().unwrap());
    response
}

fn httpdate_now() -> String {
    httpdate::fmt_http_date(std::time::SystemTime::now())
}

/// v1 and v2 of a small API. `regressions` makes v2 change `/json`'s name,
/// fail `/orders` with 500 and answer `/slow` 40 ms later; without it v2
/// differs only in noise.
async fn versions(regressions: bool) -> (Backend, Backend) {
    let v1 = Backend::start("v1", |seen| match seen.uri.path() {
        "/json" => noisy_json(&[("name", json!("widget")), ("price", json!(3))], false),
        "/orders" => noisy_json(&[("ok", json!(true))], false),
        "/slow" => noisy_json(&[("slow", json!(false))], false),
        _ => noisy_json(&[("path", json!(seen.uri.path()))], false),
    })
    .await;
    let v2 = Backend::start("v2", move |seen| match (regressions, seen.uri.path()) {
        (true, "/json") => noisy_json(&[("name", json!("gadget")), ("price", json!(3))], true),
        (true, "/orders") => {
            let mut response = noisy_json(&[("ok", json!(true))], true);
            *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            response
        }
        (true, "/slow") => {
            let (tx, body) = channel_body();
            let ready = noisy_json(&[("slow", json!(false))], true);
            let (parts, ready_body) = ready.into_parts();
            tokio::spawn(async move {
                use http_body_util::BodyExt;
                // The latency regression under test, not a synchronisation.
                tokio::time::sleep(Duration::from_millis(40)).await;
                if let Ok(bytes) = ready_body.collect().await {
                    let _ = tx.send(bytes.to_bytes()).await;
                }
            });
            Response::from_parts(parts, body)
        }
        (_, "/json") => noisy_json(&[("name", json!("widget")), ("price", json!(3))], true),
        (_, "/orders") => noisy_json(&[("ok", json!(true))], true),
        (_, "/slow") => noisy_json(&[("slow", json!(false))], true),
        (_, path) => noisy_json(&[("path", json!(path))], true),
    })
    .await;
    (v1, v2)
}

async fn analysed_umbra(v1: &Backend, v2: &Backend) -> Umbra {
    analysing(&seed_mirror(v1.port(), v2.port(), "", 100.0)).await
}

/// umbra serving `yaml` with the analysis on.
async fn analysing(yaml: &str) -> Umbra {
    let setup = Setup {
        analysis: true,
        ..Setup::default()
    };
    Umbra::start_with(yaml, setup).await
}

/// Where a route's reported differences are, over its endpoints.
fn locations(route: &umbra::analysis::report::RouteReport) -> Vec<&str> {
    (route.endpoints.iter())
        .flat_map(|e| e.differences.iter().map(|d| d.location.as_str()))
        .collect()
}

/// Sends `rounds` requests to each path, waits for every shadow to finish
/// and the analysis queue to drain, and returns the report.
async fn drive(umbra: &Umbra, paths: &[&str], rounds: usize) -> Report {
    mirror(umbra, paths, rounds).await;
    let (status, text) = umbra.admin_get("/shadow/report").await;
    assert_eq!(status, StatusCode::OK);
    serde_json::from_str(&text).unwrap()
}

/// Sends `rounds` requests to each path and waits for every shadow to
/// finish and the analysis queue to drain.
async fn mirror(umbra: &Umbra, paths: &[&str], rounds: usize) {
    let before = umbra
        .metric("umbra_mirror_requests_total", &[("outcome", "sent")])
        .await;
    for _ in 0..rounds {
        for path in paths {
            let (status, _, _) = fetch(&umbra.url(path), "httpbin:8000").await;
            assert!(status.is_success(), "the client only ever sees v1");
        }
    }
    let expected = before + (rounds * paths.len()) as f64;
    let sent = umbra
        .wait_metric(
            "umbra_mirror_requests_total",
            &[("outcome", "sent")],
            expected,
        )
        .await;
    assert_eq!(sent, expected);
    umbra
        .wait_metric(
            "umbra_mirror_requests_total",
            &[("outcome", "completed")],
            sent,
        )
        .await;
    let analyzer = umbra.proxy.analyzer.clone().expect("analysis on");
    tokio::task::spawn_blocking(move || analyzer.flush())
        .await
        .unwrap();
}

#[tokio::test]
async fn regressions_are_reported_and_nothing_else() {
    let (v1, v2) = versions(true).await;
    let umbra = analysed_umbra(&v1, &v2).await;
    let report = drive(&umbra, &["/json", "/orders", "/slow", "/same/1"], 40).await;
    let route = &report.routes[0];
    assert_eq!(route.samples, 160);
    assert_eq!(route.compared, 160);
    assert_eq!(route.verdict, "REJECT", "{:?}", route.reasons);

    let found: Vec<(String, String, String)> = route
        .endpoints
        .iter()
        .flat_map(|e| {
            e.differences.iter().map(move |d| {
                (
                    format!("{} {}", e.method, e.path),
                    d.location.clone(),
                    d.kind.clone(),
                )
            })
        })
        .collect();
    assert_eq!(
        found,
        [
            (
                "GET /json".to_string(),
                "body.name".to_string(),
                "changed".to_string()
            ),
            (
                "GET /orders".to_string(),
                "status".to_string(),
                "status_changed".to_string()
            ),
            (
                "GET /slow".to_string(),
                "latency".to_string(),
                "slower".to_string()
            ),
        ],
        "exactly the three regressions, no noise"
    );
    let json = route.endpoints.iter().find(|e| e.path == "/json").unwrap();
    assert_eq!(json.mismatched, 40);
    assert_eq!(json.differences[0].count, 40);
    let example = &json.differences[0].examples[0];
    assert_eq!(
        (example.primary.as_str(), example.shadow.as_str()),
        ("\"widget\"", "\"gadget\"")
    );
    assert_eq!(example.request_id.len(), 36, "examples carry request ids");
    assert_eq!(
        route.mismatched, 80,
        "/json and /orders responses differ; /slow's only in time"
    );
    assert!((route.shadow_error_rate - 0.25).abs() < 1e-9);
    assert_eq!(route.primary_error_rate, 0.0);
    let reasons = route.reasons.join("\n");
    assert!(
        reasons.contains("shadow error rate 25.0% is significantly higher"),
        "{reasons}"
    );
    assert!(
        reasons.contains("shadow is slower on GET /slow"),
        "{reasons}"
    );
    assert!(reasons.contains("differ beyond noise"), "{reasons}");
    assert!(route.latency.shadow.p99_ms >= 40.0, "{:?}", route.latency);

    let metrics = umbra.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "umbra_shadow_comparisons_total",
            &[("result", "mismatch")]
        ),
        80.0
    );
    assert_eq!(
        metric_value(
            &metrics,
            "umbra_shadow_comparisons_total",
            &[("result", "match")]
        ),
        80.0
    );
    assert_eq!(
        metric_value(
            &metrics,
            "umbra_shadow_differences_total",
            &[("kind", "status_changed")]
        ),
        40.0
    );
    assert_eq!(metric_value(&metrics, "umbra_shadow_verdict", &[]), -1.0);
}

#[tokio::test]
async fn a_scrape_alone_shows_the_current_verdict() {
    let (v1, v2) = versions(true).await;
    let umbra = analysed_umbra(&v1, &v2).await;
    // Under the 100 samples a verdict needs: HOLD.
    mirror(&umbra, &["/json", "/orders"], 25).await;
    let route = "umbra_shadow_verdict{route=\"httpbin.http[0]\"}";
    let metrics = umbra.metrics().await;
    assert!(metrics.contains(&format!("{route} 0\n")), "{metrics}");
    // Past them, with v2 failing /orders: REJECT, and no one ever asked
    // for /shadow/report.
    mirror(&umbra, &["/json", "/orders"], 25).await;
    let metrics = umbra.metrics().await;
    assert!(metrics.contains(&format!("{route} -1\n")), "{metrics}");
}

/// One sample of an exposition (text or OpenMetrics) as `(name, labels,
/// value)`, label values unescaped; `None` for a line a scraper rejects.
type Exposed = (String, Vec<(String, String)>, f64);

/// The samples of an exposition; panics on a line a scraper would reject.
fn parse_exposition(text: &str) -> Vec<Exposed> {
    (text.lines())
        .filter(|line| !line.starts_with('#'))
        .map(|line| {
            parse_sample(line)
                .unwrap_or_else(|| panic!("a scraper rejects this line: {line:?}\n{text}"))
        })
        .collect()
}

fn parse_sample(line: &str) -> Option<Exposed> {
    let (name, mut rest) = line.split_at(line.find(['{', ' '])?);
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        rest = inner;
        while !rest.starts_with('}') {
            let (key, after) = rest.split_once("=\"")?;
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next()? {
                    (at, '"') => break at,
                    (_, '\\') => value.push(match chars.next()?.1 {
                        '\\' => '\\',
                        '"' => '"',
                        'n' => '\n',
                        _ => return None,
                    }),
                    (_, c) => value.push(c),
                }
            };
            labels.push((key.to_string(), value));
            rest = &after[end + 1..];
            rest = rest.strip_prefix(',').unwrap_or(rest);
        }
        rest = &rest[1..];
    }
    let value = rest.strip_prefix(' ')?.split(' ').next()?.parse().ok()?;
    Some((name.to_string(), labels, value))
}

#[tokio::test]
async fn metrics_stay_readable_whatever_a_route_is_named() {
    let (v1, v2) = versions(false).await;
    // A quote, a backslash and a line feed: Istio takes any string here.
    let yaml = seed(
        v1.port(),
        v2.port(),
        "",
        "    mirror: {host: httpbin, subset: v2, port: {number: 8000}}\n    name: \"we\\\"ird\\\\name\\nline\"\n",
    );
    let name = "we\"ird\\name\nline";
    let umbra = analysing(&yaml).await;
    for _ in 0..3 {
        fetch(&umbra.url("/json"), "httpbin:8000").await;
    }
    // Waited for through the analysis: the metrics are what is under test.
    umbra.analysed(3).await.expect("three pairs analysed");
    let samples = parse_exposition(&umbra.metrics().await);
    let route_of = |series: &str| {
        samples
            .iter()
            .filter(|(sample, _, _)| sample == series)
            .find_map(|(_, labels, _)| labels.iter().find(|(key, _)| key == "route"))
            .map(|(_, value)| value.as_str())
    };
    for series in [
        "umbra_requests_total",
        "umbra_mirror_requests_total",
        "umbra_shadow_comparisons_total",
        "umbra_shadow_verdict",
    ] {
        assert_eq!(route_of(series), Some(name), "{series}");
    }
}

#[tokio::test]
async fn a_reload_that_changes_the_shadow_starts_its_analysis_over() {
    let (v1, v2) = versions(true).await;
    let umbra = analysed_umbra(&v1, &v2).await;
    let before = drive(&umbra, &["/orders"], 20).await;
    assert_eq!(before.routes[0].errors.shadow_5xx, 20, "v2 fails /orders");
    // The route now mirrors to v1's subset, which answers /orders.
    let to_v1 = seed(
        v1.port(),
        v2.port(),
        "",
        "    mirror: {host: httpbin, subset: v1, port: {number: 8000}}\n",
    );
    assert!(umbra.reload_with(&to_v1).await, "reload accepted");
    let after = drive(&umbra, &["/orders"], 5).await;
    let route = &after.routes[0];
    assert_eq!(route.shadow, "httpbin/v1");
    assert_eq!(
        (route.samples, route.errors.shadow_5xx),
        (5, 0),
        "v2's failures are not the new shadow's"
    );
    // The same target after a reload keeps its counts.
    assert!(umbra.reload_with(&to_v1).await, "reload accepted");
    let kept = drive(&umbra, &["/orders"], 5).await;
    assert_eq!(kept.routes[0].samples, 10);
}

#[tokio::test]
async fn a_reload_that_changes_thresholds_judges_by_them_at_once() {
    let (v1, v2) = versions(false).await;
    let yaml = seed_mirror(v1.port(), v2.port(), "", 100.0);
    let umbra = analysing(&yaml).await;
    let report = drive(&umbra, &["/json"], 100).await;
    assert_ne!(report.routes[0].verdict, "HOLD", "100 samples are enough");
    let stricter = format!(
        "{yaml}---\napiVersion: umbra.io/v1alpha1\nkind: ShadowAnalysis\nmetadata: {{name: httpbin}}\nspec:\n  targetRef: {{kind: VirtualService, name: httpbin}}\n  minSamples: 1000\n"
    );
    assert!(umbra.reload_with(&stricter).await, "reload accepted");
    // No request since: the verdict follows the new thresholds anyway.
    let (_, text) = umbra.admin_get("/shadow/report").await;
    let report: Report = serde_json::from_str(&text).unwrap();
    assert_eq!(
        report.routes[0].reasons,
        ["not enough traffic: 100 of 1000 samples needed"]
    );
    let verdict = umbra.metric("umbra_shadow_verdict", &[]).await;
    assert_eq!(verdict, 0.0, "HOLD on a scrape too");
}

#[tokio::test]
async fn noise_only_differences_promote() {
    let (v1, v2) = versions(false).await;
    let umbra = analysed_umbra(&v1, &v2).await;
    let report = drive(
        &umbra,
        &["/json", "/orders", "/slow", "/same/1", "/same/2"],
        24,
    )
    .await;
    let route = &report.routes[0];
    assert_eq!(route.compared, 120);
    let differences = locations(route);
    assert!(
        differences.is_empty(),
        "noise reported as differences: {differences:?}"
    );
    assert_eq!(route.mismatched, 0);
    assert_eq!(route.verdict, "PROMOTE", "{:?}", route.reasons);
    assert!(
        route.endpoints.iter().any(|e| e.path == "/same/{id}"),
        "paths are templated"
    );
}

/// A backend that echoes the Host it was sent, in its body and in a
/// `Location`, as httpbin's `/headers` and redirects do.
async fn host_echo(name: &str) -> Backend {
    Backend::start(name, |seen| {
        let host = seen.header("host").unwrap_or_default().to_string();
        let mut response = Response::new(full(json!({ "host": host }).to_string()));
        let headers = response.headers_mut();
        headers.insert("content-type", "application/json".parse().unwrap());
        headers.insert("location", format!("http://{host}/next").parse().unwrap());
        response
    })
    .await
}

#[tokio::test]
async fn the_shadow_host_is_mapped_back_after_an_authority_rewrite() {
    // The shadow's Host is made from the one the primary carries upstream,
    // `api.internal:9000`: that is what the analysis must map back, not the
    // client's `httpbin:8000`.
    let (v1, v2) = (host_echo("v1").await, host_echo("v2").await);
    let yaml = seed(
        v1.port(),
        v2.port(),
        "",
        "    rewrite: {authority: \"api.internal:9000\"}\n    mirror: {host: httpbin, subset: v2, port: {number: 8000}}\n",
    );
    let umbra = analysing(&yaml).await;
    let report = drive(&umbra, &["/echo"], 5).await;
    let shadows = v2.received();
    assert_eq!(
        shadows[0].header("host"),
        Some("api.internal-shadow:9000"),
        "the shadow's Host"
    );
    let route = &report.routes[0];
    assert_eq!(route.compared, 5);
    let differences = locations(route);
    assert!(
        differences.is_empty(),
        "umbra's own Host rewrite reported as v2's: {differences:?}"
    );
    assert_eq!(route.mismatched, 0);
}

#[tokio::test]
async fn without_the_suffix_nothing_is_mapped_back() {
    // The shadow is sent `httpbin:8000` as it is, so a v2 that answers
    // `httpbin-shadow:8000` made that up itself: a real difference.
    let v1 = host_echo("v1").await;
    let v2 = Backend::start("v2", |_| {
        let mut response = Response::new(full(r#"{"host":"httpbin-shadow:8000"}"#));
        let headers = response.headers_mut();
        headers.insert("content-type", "application/json".parse().unwrap());
        headers.insert("location", "http://httpbin:8000/next".parse().unwrap());
        response
    })
    .await;
    let yaml = seed(
        v1.port(),
        v2.port(),
        "umbra.io/shadow-host-suffix: \"false\"",
        "    mirror: {host: httpbin, subset: v2, port: {number: 8000}}\n",
    );
    let umbra = analysing(&yaml).await;
    let report = drive(&umbra, &["/echo"], 5).await;
    assert_eq!(v2.received()[0].header("host"), Some("httpbin:8000"));
    let route = &report.routes[0];
    let differences = locations(route);
    assert_eq!(differences, ["body.host"]);
    assert_eq!(route.mismatched, 5);
}

#[test]
fn header_paths_in_ignore_rules_match_in_any_case() {
    // Header names are case-insensitive: `ignore.paths: [header.X-Version]`
    // covers the difference found at `header.x-version`.
    let yaml = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: web}\nspec:\n  hosts: [web]\n  http:\n  - route: [{destination: {host: 127.0.0.1, port: {number: 1}}}]\n    mirror: {host: 127.0.0.1, port: {number: 2}}\n---\napiVersion: umbra.io/v1alpha1\nkind: ShadowAnalysis\nmetadata: {name: web}\nspec:\n  targetRef: {kind: VirtualService, name: web}\n  ignore: {paths: [header.X-Version]}\n";
    let config = umbra::config::load_str("a.yaml", yaml).unwrap();
    let settings = &config.analysis["web"];
    let response = |version: &'static str| {
        let mut headers = http::HeaderMap::new();
        headers.insert("x-version", version.parse().unwrap());
        Captured {
            status: StatusCode::OK,
            headers,
            body: Bytes::new(),
            body_len: 0,
            truncated: false,
            latency: Duration::from_millis(1),
        }
    };
    let rules = umbra::analysis::diff::Rules {
        ignore_headers: &settings.ignore_headers,
        ignore_paths: &settings.ignore_paths,
        hosts: None,
    };
    let differences =
        umbra::analysis::diff::compare(&response("v1"), &response("v2"), &rules, 1024);
    assert_eq!(differences, []);
}

#[tokio::test]
async fn too_little_traffic_holds() {
    let (v1, v2) = versions(true).await;
    let umbra = analysed_umbra(&v1, &v2).await;
    let report = drive(&umbra, &["/json"], 10).await;
    assert_eq!(report.routes[0].verdict, "HOLD");
    assert_eq!(
        report.routes[0].reasons,
        ["not enough traffic: 10 of 100 samples needed"]
    );
}

#[tokio::test]
async fn report_json_keeps_its_documented_names() {
    let (v1, v2) = versions(true).await;
    let umbra = analysed_umbra(&v1, &v2).await;
    drive(&umbra, &["/json"], 3).await;
    let (_, text) = umbra.admin_get("/shadow/report").await;
    let value: Value = serde_json::from_str(&text).unwrap();
    let route = &value["routes"][0];
    for key in [
        "name",
        "host",
        "primary",
        "shadow",
        "compared",
        "mismatched",
        "verdict",
        "reasons",
        "primary_error_rate",
        "shadow_error_rate",
        "latency",
        "endpoints",
    ] {
        assert!(route.get(key).is_some(), "routes[].{key} missing: {route}");
    }
    for side in ["primary", "shadow"] {
        for key in ["p50_ms", "p99_ms"] {
            assert!(
                route["latency"][side][key].is_number(),
                "latency.{side}.{key}"
            );
        }
    }
    let endpoint = &route["endpoints"][0];
    for key in ["method", "path", "compared", "mismatched", "differences"] {
        assert!(endpoint.get(key).is_some(), "endpoints[].{key}");
    }
    let difference = &endpoint["differences"][0];
    for key in ["location", "kind", "count", "examples"] {
        assert!(difference.get(key).is_some(), "differences[].{key}");
    }
    for key in ["request_id", "primary", "shadow"] {
        assert!(
            difference["examples"][0].get(key).is_some(),
            "examples[].{key}"
        );
    }
    assert_eq!(route["host"], "httpbin:8000");
    assert_eq!(route["primary"], "httpbin|v1|8000");
    assert_eq!(route["shadow"], "httpbin/v2");
}

fn sample(route: &str, path: &str, shadow_status: u16, body: &str) -> Sample {
    let captured = |status: u16, body: &str| {
        let mut headers = http::HeaderMap::new();
        headers.insert("content-type", "application/json".parse().unwrap());
        Outcome::Response(Captured {
            status: StatusCode::from_u16(status).unwrap(),
            headers,
            body: Bytes::from(body.to_string()),
            body_len: body.len() as u64,
            truncated: false,
            latency: Duration::from_millis(2),
        })
    };
    Sample {
        virtual_service: "vs".into(),
        route: route.into(),
        host: "api".into(),
        suffixed_host: Some("api".into()),
        primary_destination: "api|v1|80".into(),
        shadow_destination: "api/v2".into(),
        method: http::Method::GET,
        path: path.into(),
        request_id: "rid".into(),
        request_fingerprint: COUNTER.fetch_add(1, Ordering::Relaxed),
        primary: captured(200, r#"{"a":1}"#),
        shadow: captured(shadow_status, body),
        baseline: None,
    }
}

#[test]
fn aggregates_survive_a_restart_in_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("analysis.db");
    {
        let mut registry = prometheus_client::registry::Registry::default();
        let analyzer = Analyzer::start(Some(&db), &mut registry).unwrap();
        for _ in 0..30 {
            analyzer.submit(sample("r1", "/a/1", 200, r#"{"a":2}"#));
        }
        analyzer.flush();
        let live = analyzer.report();
        let stored = umbra::analysis::report_from_db(&db).unwrap();
        assert_eq!(
            serde_json::to_value(&live).unwrap(),
            serde_json::to_value(&stored).unwrap()
        );
        assert_eq!(stored.routes[0].compared, 30);
        assert_eq!(stored.routes[0].endpoints[0].path, "/a/{id}");
        assert_eq!(
            stored.routes[0].endpoints[0].differences[0].location,
            "body.a"
        );
    }
    // A restarted proxy continues the counts.
    let mut registry = prometheus_client::registry::Registry::default();
    let analyzer = Analyzer::start(Some(&db), &mut registry).unwrap();
    for _ in 0..5 {
        analyzer.submit(sample("r1", "/a/2", 500, r#"{"a":1}"#));
    }
    analyzer.flush();
    let report = analyzer.report();
    assert_eq!(report.routes[0].compared, 35);
    assert_eq!(report.routes[0].errors.shadow_5xx, 5);
}

#[test]
fn new_thresholds_reach_sqlite_without_new_samples() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("analysis.db");
    let mut registry = prometheus_client::registry::Registry::default();
    let analyzer = Analyzer::start(Some(&db), &mut registry).unwrap();
    for _ in 0..5 {
        analyzer.submit(sample("r1", "/a", 200, r#"{"a":1}"#));
    }
    analyzer.flush();
    let held = |report: &Report| report.routes[0].reasons.clone();
    let needed = ["not enough traffic: 5 of 100 samples needed"];
    assert_eq!(held(&umbra::analysis::report_from_db(&db).unwrap()), needed);
    let fewer = umbra::config::model::AnalysisSettings {
        min_samples: 10,
        ..Default::default()
    };
    analyzer.set_settings([("vs".to_string(), fewer)].into());
    analyzer.flush();
    let needed = ["not enough traffic: 5 of 10 samples needed"];
    assert_eq!(held(&analyzer.report()), needed);
    assert_eq!(held(&umbra::analysis::report_from_db(&db).unwrap()), needed);
}

#[test]
fn routes_the_config_no_longer_has_leave_the_report_and_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("analysis.db");
    let mut registry = prometheus_client::registry::Registry::default();
    let analyzer = Analyzer::start(Some(&db), &mut registry).unwrap();
    analyzer.keep_routes(["r1".into(), "r2".into()].into());
    analyzer.submit(sample("r1", "/a", 200, "{}"));
    analyzer.submit(sample("r2", "/a", 200, "{}"));
    analyzer.flush();
    let names = |report: Report| -> Vec<String> {
        report.routes.into_iter().map(|route| route.name).collect()
    };
    assert_eq!(names(analyzer.report()), ["r1", "r2"]);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains("umbra_shadow_verdict{route=\"r2\"}"),
        "{text}"
    );

    // A reload without r2; one of its samples was still in flight.
    analyzer.keep_routes(["r1".into()].into());
    analyzer.submit(sample("r2", "/a", 200, "{}"));
    analyzer.flush();
    assert_eq!(names(analyzer.report()), ["r1"]);
    assert_eq!(names(umbra::analysis::report_from_db(&db).unwrap()), ["r1"]);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        !text.contains("umbra_shadow_verdict{route=\"r2\"}"),
        "{text}"
    );
    assert!(
        text.contains("umbra_shadow_verdict{route=\"r1\"}"),
        "{text}"
    );
}

/// A reload that removes a route and another that brings it back before
/// the worker has written: the route's new analysis is saved, not deleted
/// with the old one's.
#[test]
fn a_route_removed_and_restored_between_two_writes_is_saved() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("analysis.db");
    let mut registry = prometheus_client::registry::Registry::default();
    let analyzer = Analyzer::start(Some(&db), &mut registry).unwrap();
    analyzer.keep_routes(["r1".into()].into());
    analyzer.submit(sample("r1", "/a", 200, "{}"));
    analyzer.flush();
    analyzer.keep_routes(HashSet::new());
    analyzer.keep_routes(["r1".into()].into());
    analyzer.submit(sample("r1", "/b", 200, "{}"));
    analyzer.flush();
    let names = |report: Report| -> Vec<String> {
        report.routes.into_iter().map(|route| route.name).collect()
    };
    assert_eq!(names(analyzer.report()), ["r1"]);
    assert_eq!(names(umbra::analysis::report_from_db(&db).unwrap()), ["r1"]);
}

/// A reload that removes a route while its samples stream in (a canary's
/// traffic does not stop for a reload): none counted after it brings the
/// route back into the report or the verdict gauge, whichever sample the
/// worker was comparing as the reload came.
#[test]
fn a_route_removed_under_traffic_stays_removed() {
    let mut registry = prometheus_client::registry::Registry::default();
    let analyzer = Analyzer::start(None, &mut registry).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                analyzer.submit(sample("r2", "/a", 200, "{}"));
                std::thread::yield_now();
            }
        });
        for round in 0..200 {
            analyzer.keep_routes(["r1".into(), "r2".into()].into());
            std::thread::sleep(Duration::from_micros(200));
            analyzer.keep_routes(["r1".into()].into());
            analyzer.flush();
            let report = analyzer.report();
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
            let back = report.routes.iter().any(|route| route.name == "r2")
                || text.contains("umbra_shadow_verdict{route=\"r2\"}");
            if back {
                stop.store(true, Ordering::Relaxed);
                panic!("r2 back after its removal, round {round}");
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
}

#[tokio::test]
async fn a_reload_that_stops_mirroring_a_route_drops_its_analysis() {
    let (v1, v2) = versions(false).await;
    let umbra = analysed_umbra(&v1, &v2).await;
    let report = drive(&umbra, &["/json"], 5).await;
    assert_eq!(report.routes.len(), 1);
    assert!(umbra.reload_with(&seed(v1.port(), v2.port(), "", "")).await);
    let (_, text) = umbra.admin_get("/shadow/report").await;
    let report: Report = serde_json::from_str(&text).unwrap();
    assert!(report.routes.is_empty(), "{text}");
    assert!(!umbra.metrics().await.contains("umbra_shadow_verdict{"));
}

#[test]
fn primary_failures_reach_sqlite_too() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("analysis.db");
    let mut registry = prometheus_client::registry::Registry::default();
    let analyzer = Analyzer::start(Some(&db), &mut registry).unwrap();
    let mut failed = sample("r1", "/a", 200, "{}");
    failed.primary = Outcome::ConnectFailure;
    analyzer.submit(failed);
    analyzer.flush();
    assert_eq!(analyzer.report().routes[0].errors.primary_failures, 1);
    let stored = umbra::analysis::report_from_db(&db).unwrap();
    let counted: Vec<u64> = (stored.routes.iter())
        .map(|route| route.errors.primary_failures)
        .collect();
    assert_eq!(counted, [1], "what `umbra report --db` shows");
}

#[test]
fn endpoints_past_the_cap_share_the_overflow_bucket() {
    use umbra::analysis::template::{MAX_ENDPOINTS, OVERFLOW};
    let mut registry = prometheus_client::registry::Registry::default();
    let analyzer = Analyzer::start(None, &mut registry).unwrap();
    // Words, not ids: each path is an endpoint of its own.
    let word = |i: usize| {
        format!(
            "/{}{}/7",
            (b'a' + (i / 26) as u8) as char,
            (b'a' + (i % 26) as u8) as char
        )
    };
    for i in 0..MAX_ENDPOINTS + 5 {
        analyzer.submit(sample("r1", &word(i), 200, r#"{"a":1}"#));
    }
    // An endpoint known before the cap keeps its own counts.
    analyzer.submit(sample("r1", &word(0), 200, r#"{"a":1}"#));
    analyzer.flush();
    let report = analyzer.report();
    let endpoints = &report.routes[0].endpoints;
    assert_eq!(endpoints.len(), MAX_ENDPOINTS + 1);
    let find = |path: &str| endpoints.iter().find(|e| e.path == path);
    let first = find("/aa/{id}").expect("first endpoint");
    assert_eq!((first.method.as_str(), first.compared), ("GET", 2));
    let overflow = find(OVERFLOW).expect("overflow bucket");
    assert_eq!((overflow.method.as_str(), overflow.compared), ("GET", 5));
    assert!(find(&format!(
        "{}/{{id}}",
        word(MAX_ENDPOINTS).trim_end_matches("/7")
    ))
    .is_none());
}

#[test]
fn aggregates_reach_sqlite_while_traffic_never_pauses() {
    // A sample every 50 ms: the worker never waits a whole second for the
    // next one, and must still write about once a second.
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("analysis.db");
    let mut registry = prometheus_client::registry::Registry::default();
    let analyzer = Analyzer::start(Some(&db), &mut registry).unwrap();
    let start = std::time::Instant::now();
    let stored = loop {
        analyzer.submit(sample("r1", "/a/1", 200, r#"{"a":1}"#));
        let report = umbra::analysis::report_from_db(&db).unwrap();
        if let Some(route) = report.routes.first() {
            break route.compared;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "nothing stored after 5 s of steady traffic"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(stored > 0);
}

#[test]
fn aggregates_reach_sqlite_while_the_queue_never_empties() {
    // Samples as fast as the test can make them: the worker's queue stays
    // full (the surplus is dropped and counted), and it must still write.
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("analysis.db");
    let mut registry = prometheus_client::registry::Registry::default();
    let analyzer = Analyzer::start(Some(&db), &mut registry).unwrap();
    let start = std::time::Instant::now();
    loop {
        for _ in 0..1000 {
            analyzer.submit(sample("r1", "/a/1", 200, r#"{"a":1}"#));
        }
        let report = umbra::analysis::report_from_db(&db).unwrap();
        if report.routes.first().is_some_and(|r| r.compared > 0) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "nothing stored after 5 s of overload"
        );
    }
}

#[test]
fn baseline_noise_hides_fields_v1_changes_by_itself() {
    let mut registry = prometheus_client::registry::Registry::default();
    let analyzer = Analyzer::start(None, &mut registry).unwrap();
    let mut settings = std::collections::BTreeMap::new();
    let destination = std::sync::Arc::new(umbra::config::model::Destination {
        key: "api|v1b|80".into(),
        host: "api".into(),
        subset: Some("v1b".into()),
        port: Some(80),
        endpoints: Vec::new(),
        lb: Default::default(),
        protocol: Default::default(),
        pool: Default::default(),
        outlier: None,
        tls: None,
    });
    settings.insert(
        "vs".to_string(),
        umbra::config::model::AnalysisSettings {
            baseline: Some(destination),
            min_samples: 10,
            ..Default::default()
        },
    );
    analyzer.set_settings(settings);
    for i in 0..50 {
        // `seq` differs between any two responses, v1 included; `v`
        // differs only in the shadow.
        let mut s = sample("r", "/x", 200, &format!(r#"{{"seq":{},"v":2}}"#, i + 1000));
        s.primary = sample("r", "/x", 200, &format!(r#"{{"seq":{i},"v":1}}"#)).shadow;
        s.baseline =
            Some(sample("r", "/x", 200, &format!(r#"{{"seq":{},"v":1}}"#, i + 500)).shadow);
        analyzer.submit(s);
    }
    analyzer.flush();
    let report = analyzer.report();
    let differences: Vec<&str> = report.routes[0].endpoints[0]
        .differences
        .iter()
        .map(|d| d.location.as_str())
        .collect();
    assert_eq!(differences, ["body.v"], "seq is noise by the baseline");
}

#[tokio::test]
async fn a_baseline_gets_its_copy_and_one_name_in_log_and_metrics() {
    let (v1, v2) = versions(true).await;
    let v1b = Backend::echo("v1b").await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    // A third endpoint labelled apart, its subset, and a ShadowAnalysis
    // naming it as the baseline.
    // (The ServiceEntry's endpoints only: the DestinationRule's last
    // subset ends the same way.)
    let config = seed_mirror(v1.port(), v2.port(), "", 100.0)
        .replacen(
            "    labels: {version: v2}\n---",
            &format!(
                "    labels: {{version: v2}}\n  - address: 127.0.0.1\n    ports: {{http: {}}}\n    labels: {{version: v1b}}\n---",
                v1b.port()
            ),
            1,
        )
        .replace(
            "  - name: v2\n    labels: {version: v2}\n",
            "  - name: v2\n    labels: {version: v2}\n  - name: v1-baseline\n    labels: {version: v1b}\n",
        )
        + "---
apiVersion: umbra.io/v1alpha1
kind: ShadowAnalysis
metadata: {name: httpbin}
spec:
  targetRef: {kind: VirtualService, name: httpbin}
  baseline: {host: httpbin, subset: v1-baseline, port: {number: 8000}}
";
    let umbra = Umbra::start_with(
        &config,
        Setup {
            analysis: true,
            access_log: Some(log.clone()),
            ..Setup::default()
        },
    )
    .await;
    let (status, _, _) = fetch(&umbra.url("/json"), "httpbin:8000").await;
    assert_eq!(status, StatusCode::OK);
    let completed = |mirror: &'static str| {
        [
            ("route", "httpbin.http[0]"),
            ("mirror", mirror),
            ("outcome", "completed"),
        ]
    };
    let baseline = "baseline:httpbin/v1-baseline";
    umbra
        .wait_metric("umbra_mirror_requests_total", &completed(baseline), 1.0)
        .await;
    umbra
        .wait_metric("umbra_mirror_requests_total", &completed("httpbin/v2"), 1.0)
        .await;
    assert_eq!(v1b.count(), 1, "the baseline got its copy");
    let text = eventually(|| async {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|t| t.lines().count() >= 3)
    })
    .await
    .expect("three log lines");
    let mut shadows: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split(" shadow=").nth(1))
        .filter_map(|rest| rest.split(' ').next())
        .collect();
    shadows.sort_unstable();
    assert_eq!(shadows, [baseline, "httpbin/v2"], "{text}");
}

#[tokio::test]
async fn report_command_reads_the_admin_api_and_the_database() {
    let (v1, v2) = versions(true).await;
    let dir = tempfile::tempdir().unwrap();
    let umbra = analysed_umbra(&v1, &v2).await;
    drive(&umbra, &["/json"], 5).await;
    let admin = format!("http://{}", umbra.admin);
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_umbra"))
        .args(["report", "--admin", &admin, "--format", "json"])
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Report = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report.routes[0].compared, 5);
    let table = tokio::process::Command::new(env!("CARGO_BIN_EXE_umbra"))
        .args(["report", "--admin", &admin])
        .output()
        .await
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.starts_with("HOLD  httpbin.http[0]"), "{table}");
    assert!(table.contains("body.name"), "{table}");

    // --db works with no proxy running.
    let db = dir.path().join("a.db");
    {
        let mut registry = prometheus_client::registry::Registry::default();
        let analyzer = Analyzer::start(Some(&db), &mut registry).unwrap();
        analyzer.submit(sample("stored", "/x", 200, r#"{"a":9}"#));
        analyzer.flush();
    }
    let stored = tokio::process::Command::new(env!("CARGO_BIN_EXE_umbra"))
        .args(["report", "--db", db.to_str().unwrap(), "--format", "json"])
        .output()
        .await
        .unwrap();
    let stored: Report = serde_json::from_slice(&stored.stdout).unwrap();
    assert_eq!(stored.routes[0].name, "stored");
}

/// An analysis database whose report, as JSON or as a table, is far
/// larger than a pipe's buffer (64 KiB): long example values.
fn large_database(path: &std::path::Path) {
    use umbra::analysis::report::{EndpointState, Example, FieldState, RouteState};
    let example = Example {
        request_id: "rid".into(),
        primary: "p".repeat(20_000),
        shadow: "s".repeat(20_000),
    };
    let mut endpoint = EndpointState {
        method: "GET".into(),
        path: "/x".into(),
        compared: 10,
        ..Default::default()
    };
    for i in 0..10 {
        let field = FieldState {
            kind: "changed".into(),
            raw: 10,
            examples: vec![example.clone(); 3],
            ..Default::default()
        };
        endpoint.fields.insert(format!("body.f{i}"), field);
    }
    let route = RouteState {
        name: "big".into(),
        samples: 10,
        compared: 10,
        endpoints: [("GET /x".to_string(), endpoint)].into(),
        ..Default::default()
    };
    let mut store = umbra::analysis::store::Store::open(path).unwrap();
    store.save([&route]).unwrap();
}

#[test]
fn report_stops_quietly_when_its_reader_does() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("big.db");
    large_database(&db);
    for format in ["json", "table"] {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_umbra"))
            .args(["report", "--db", db.to_str().unwrap(), "--format", format])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // `| head -c 10`: read a little, then close the pipe while umbra
        // is still writing (the report is far larger than the pipe).
        let mut start = [0; 10];
        child.stdout.take().unwrap().read_exact(&mut start).unwrap();
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(0), "{format}: {stderr}");
        assert_eq!(stderr, "", "{format}");
    }
}

#[tokio::test]
async fn durations_a_duration_cannot_hold_are_usage_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("analysis.db");
    large_database(&db);
    let db = db.to_str().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, single_route("api", refused_port().await)).unwrap();
    let config = config.to_str().unwrap();
    let report = |interval: &'static str| vec!["report", "--db", db, "--watch", interval];
    let run = |flag: &'static str| {
        let listen = ["-l", "127.0.0.1:0", "--admin", "127.0.0.1:0"];
        [vec!["run", "-c", config, flag, "1e300"], listen.to_vec()].concat()
    };
    for args in [
        report("--interval=inf"),
        report("--interval=1e300"),
        report("--interval=NaN"),
        report("--interval=-1"),
        run("--drain-timeout"),
        run("--send-timeout"),
    ] {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_umbra"))
            .args(&args)
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(PATIENCE, output)
            .await
            .unwrap_or_else(|_| panic!("{args:?} was taken and ran on"))
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("is not a number of seconds"), "{stderr}");
    }
}

#[test]
fn report_of_a_missing_database_names_it_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("typo.db");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_umbra"))
        .args(["report", "--db", db.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains(&format!("no analysis database at {}", db.display())),
        "{stderr}"
    );
    assert!(output.stdout.is_empty());
    assert!(!db.exists(), "the mistyped path was created");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

    // A file that is not one (the access log, say) is named too.
    let log = dir.path().join("access.log");
    std::fs::write(
        &log,
        "127.0.0.1 - - [29/Nov/2026] \"GET / HTTP/1.1\" 200\n".repeat(20),
    )
    .unwrap();
    report_refuses_db(&log);
}

/// Runs `umbra report --db path`, asserts it exits 64 naming `path`, and
/// returns what it printed.
fn report_refuses_db(path: &std::path::Path) -> String {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_umbra"))
        .args(["report", "--db", path.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    let named = format!(
        "{} is not an analysis database umbra can read",
        path.display()
    );
    assert!(stderr.contains(&named), "{stderr}");
    stderr
}

#[test]
fn report_names_any_database_it_cannot_read_and_says_why_once() {
    let dir = tempfile::tempdir().unwrap();
    // A route whose saved state does not parse (a hand edit, a disk fault).
    let corrupt = dir.path().join("corrupt.db");
    drop(umbra::analysis::store::Store::open(&corrupt).unwrap());
    rusqlite::Connection::open(&corrupt)
        .unwrap()
        .execute(
            "INSERT INTO route_state (route, state, updated) VALUES ('r', '{not json', 0)",
            [],
        )
        .unwrap();
    for (path, why) in [
        (dir.path().to_path_buf(), "it is a directory"),
        (corrupt, "key must be a string"),
    ] {
        let stderr = report_refuses_db(&path);
        assert_eq!(stderr.matches(why).count(), 1, "{stderr}");
    }
}

#[tokio::test]
async fn report_says_why_it_cannot_reach_the_admin() {
    let port = refused_port().await;
    let plain = format!("127.0.0.1:{port}");
    let tls = format!("https://127.0.0.1:{port}");
    for (admin, why) in [
        (plain.as_str(), "Connection refused"),
        (tls.as_str(), "the admin listener speaks plain HTTP"),
    ] {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_umbra"))
            .args(["report", "--admin", admin])
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(why), "{admin}: {stderr}");
        assert!(!stderr.contains("http://https://"), "{stderr}");
    }
}

/// Renders the admin dashboard in headless Chromium and returns the DOM
/// after its scripts ran.
async fn render_in_chromium(url: &str) -> String {
    let chromium = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|name| {
            std::process::Command::new(name)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect("chromium is required for the dashboard test: `apt-get install chromium` (.ci/run does this)");
    let profile = tempfile::tempdir().unwrap();
    let output = tokio::process::Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=5000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), output)
        .await
        .expect("chromium finished")
        .unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn dashboard_renders_verdicts_and_differences_in_a_browser() {
    let (v1, v2) = versions(true).await;
    let umbra = analysed_umbra(&v1, &v2).await;
    drive(&umbra, &["/json", "/orders"], 60).await;
    let dom = render_in_chromium(&format!("http://{}/", umbra.admin)).await;
    assert!(
        dom.contains("badge verdict REJECT"),
        "verdict badge rendered:\n{dom}"
    );
    assert!(dom.contains("httpbin.http[0]"), "route name rendered");
    assert!(dom.contains("body.name"), "a difference rendered");
    assert!(
        dom.contains("\"gadget\""),
        "its shadow example rendered side by side"
    );
    assert!(dom.contains("shadow error rate"), "the reasons rendered");
}

#[tokio::test]
async fn analysis_can_be_turned_off_per_virtual_service() {
    let (v1, v2) = versions(true).await;
    let yaml = seed_mirror(v1.port(), v2.port(), "", 100.0)
        + "---\napiVersion: umbra.io/v1alpha1\nkind: ShadowAnalysis\nmetadata: {name: off}\nspec:\n  targetRef: {kind: VirtualService, name: httpbin}\n  enabled: false\n";
    let umbra = analysing(&yaml).await;
    let report = drive(&umbra, &["/json"], 5).await;
    assert!(report.routes.is_empty(), "{report:?}");
    // Mirroring itself still happened.
    assert_eq!(v2.count(), 5);
}

#[tokio::test]
async fn a_dead_v2_is_rejected_not_held_for_want_of_samples() {
    let v1 = Backend::echo("v1").await;
    let dead = refused_port().await;
    let setup = Setup {
        analysis: true,
        ..Setup::default()
    };
    let umbra = Umbra::start_with(&seed_mirror(v1.port(), dead, "", 100.0), setup).await;
    const REQUESTS: u64 = 100;
    for _ in 0..REQUESTS {
        let (status, _, body) = fetch(&umbra.url("/json"), "httpbin:8000").await;
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"v1"[..]));
    }
    // After five failures in a row v2 is ejected: the rest of its shadows
    // are never sent, but each pair still counts against it.
    let ejected = umbra
        .metric(
            "umbra_mirror_requests_total",
            &[("outcome", "dropped_unresponsive")],
        )
        .await;
    assert!(ejected >= 50.0, "{ejected} shadows dropped as unresponsive");
    let report = umbra.analysed(REQUESTS).await.expect("every pair analysed");
    let route = &report.routes[0];
    assert_eq!(route.verdict, "REJECT", "{:?}", route.reasons);
    assert_eq!(route.errors.shadow_unresponsive as f64, ejected);
    let why = format!(
        "{ejected} of those shadows were never sent: httpbin/v2 stopped answering and was ejected (umbra_mirror_ejected)"
    );
    assert!(route.reasons.contains(&why), "{:?}", route.reasons);
    assert_eq!(
        route.errors.shadow_connect_failures + route.errors.shadow_unresponsive,
        REQUESTS,
        "{:?}",
        route.errors
    );
}

#[tokio::test]
async fn each_mirror_target_is_analysed_on_its_own() {
    let v1 = Backend::echo("v1").await;
    let v3 = Backend::echo("v3").await;
    let dead = refused_port().await;
    // Two mirrors of every request: the dead subset first, then v3. Each
    // has its own verdict; v3's is not blended with the dead one's.
    let extra = format!(
        r#"    mirrors:
    - destination: {{host: httpbin, subset: v2, port: {{number: 8000}}}}
    - destination: {{host: 127.0.0.1, port: {{number: {}}}}}
"#,
        v3.port()
    );
    let setup = Setup {
        analysis: true,
        limits: umbra::proxy::MirrorLimits {
            eject_after: 1,
            ..Default::default()
        },
        ..Setup::default()
    };
    let umbra = Umbra::start_with(&seed(v1.port(), dead, "", &extra), setup).await;
    let sent = "umbra_mirror_requests_total";
    assert_eq!(fetch(&umbra.url("/"), "httpbin").await.0, StatusCode::OK);
    umbra.wait_metric(sent, &[("outcome", "failed")], 1.0).await;
    for _ in 0..10 {
        assert_eq!(fetch(&umbra.url("/"), "httpbin").await.0, StatusCode::OK);
    }
    let dropped = umbra
        .metric(sent, &[("outcome", "dropped_unresponsive")])
        .await;
    assert_eq!(dropped, 10.0, "the dead subset is ejected");
    umbra
        .wait_metric(sent, &[("outcome", "completed")], 11.0)
        .await;
    let report = umbra.analysed(22).await.expect("every pair analysed");
    let find = |name: String| {
        let route = report.routes.iter().find(|r| r.name == name);
        route.unwrap_or_else(|| panic!("no route {name} in {:?}", report.routes))
    };
    let dead = find("httpbin.http[0] → httpbin/v2".into());
    assert_eq!(dead.shadow, "httpbin/v2");
    // The first shadow's connection failed; the rest were never sent.
    assert_eq!(dead.errors.shadow_connect_failures, 1);
    assert_eq!(dead.errors.shadow_unresponsive, 10);
    assert_eq!(dead.compared, 0);
    assert_eq!(dead.samples, 11, "each request counts against it");
    let alive = find(format!("httpbin.http[0] → 127.0.0.1:{}", v3.port()));
    assert_eq!(alive.compared, 11, "{:?}", alive.errors);
    assert_eq!(alive.errors.shadow_unresponsive, 0);
    assert_eq!(alive.errors.shadow_connect_failures, 0);
    // The echo backends answer their names: every v3 body differs.
    assert_eq!(alive.mismatched, 11);
}

/// A client that leaves mid-response leaves nothing to compare, and it is
/// no failure of v1's: the pair is skipped, not counted in
/// `primary_failures`.
#[tokio::test]
async fn a_client_leaving_mid_response_is_not_a_primary_failure() {
    let (open, gate) = tokio::sync::watch::channel(false);
    let v1 = Backend::start("v1", move |seen| {
        if seen.uri.path() != "/held" {
            return Response::new(full("v1"));
        }
        Response::new(held_body(gate.clone()))
    })
    .await;
    let v2 = Backend::echo("v2").await;
    let umbra = analysed_umbra(&v1, &v2).await;
    let response = client()
        .request(get(&umbra.url("/held"), "httpbin:8000"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    drop(response);
    let gone = [("reason", "downstream_body_incomplete")];
    umbra
        .wait_metric("umbra_downstream_errors_total", &gone, 1.0)
        .await;
    let completed = [("outcome", "completed")];
    umbra
        .wait_metric("umbra_mirror_requests_total", &completed, 1.0)
        .await;
    // Both sides of the first pair are in: a sample of it would be too.
    let (status, _, _) = fetch(&umbra.url("/ok"), "httpbin:8000").await;
    assert_eq!(status, StatusCode::OK);
    let report = umbra.analysed(1).await.expect("only /ok's pair");
    assert_eq!(report.routes[0].errors.primary_failures, 0);
    drop(open);
}

/// A shadow's timeout counts from the end of the client's upload, as the
/// primary's does: an upload slower than the route's timeout is compared,
/// not counted against v2 as a shadow timeout (umbra timed the shadow out
/// at 300 ms while the client was still sending).
#[tokio::test]
async fn a_slow_upload_is_not_a_shadow_timeout() {
    let v1 = Backend::echo("v1").await;
    let v2 = Backend::echo("v1").await;
    let mirror =
        "    mirror: {host: httpbin, subset: v2, port: {number: 8000}}\n    timeout: 300ms\n";
    let umbra = analysing(&seed(v1.port(), v2.port(), "", mirror)).await;
    let (sender, body) = channel_body();
    tokio::spawn(async move {
        for _ in 0..8 {
            // The slow client under test, not a wait for an event.
            tokio::time::sleep(Duration::from_millis(100)).await;
            sender.send(Bytes::from_static(b"chunk")).await.unwrap();
        }
    });
    let request = Request::post(umbra.url("/upload"))
        .header("host", "httpbin:8000")
        .body(body)
        .unwrap();
    let (status, _, _) = send(request).await;
    assert_eq!(status, StatusCode::OK);
    let report = umbra.analysed(1).await.expect("the pair is compared");
    let errors = &report.routes[0].errors;
    assert_eq!(errors.shadow_timeouts, 0, "{errors:?}");
    assert_eq!(report.routes[0].shadow_error_rate, 0.0, "{errors:?}");
    assert_eq!(report.routes[0].compared, 1, "{errors:?}");
    assert_eq!(v2.received()[0].body.len(), 40, "the whole body went to v2");
}
