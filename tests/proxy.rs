//! The core proxy: routing by host and match, weights, subsets, errors,
//! headers, HTTP/2, streaming, retries, reload, admin and drain.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;

use crate::support::*;

/// A VirtualService `matches` for hosts `app` and `*.example.com` with one
/// route per `(name, match lines)`, all to the backend on `port`; each
/// route stamps its name on the response (`x-route`) so the test sees
/// which one matched.
fn stamped_routes(port: u16, routes: &[(&str, &str)]) -> String {
    let mut http = String::new();
    for (name, matcher) in routes {
        http += &format!(
            "  - name: {name}\n    match:\n{matcher}    route:\n    - destination: {{host: 127.0.0.1, port: {{number: {port}}}}}\n    headers:\n      response:\n        set: {{x-route: {name}}}\n"
        );
    }
    format!(
        "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata: {{name: matches}}\nspec:\n  hosts: [app, '*.example.com']\n  http:\n{http}"
    )
}

/// One backend behind three hosts and a route per match kind.
fn match_config(port: u16) -> String {
    stamped_routes(
        port,
        &[
            ("uri-exact", "    - uri: {exact: /exact}\n"),
            ("uri-regex", "    - uri: {regex: '/items/[0-9]+'}\n"),
            (
                "ignore-case",
                "    - uri: {prefix: /CaSe}\n      ignoreUriCase: true\n",
            ),
            ("header", "    - headers: {x-user: {exact: alice}}\n"),
            ("header-regex", "    - headers: {x-user: {regex: 'b.b'}}\n"),
            ("query", "    - queryParams: {debug: {exact: 'on'}}\n"),
            ("method", "    - method: {exact: DELETE}\n"),
            ("authority", "    - authority: {prefix: 'canary.'}\n"),
            (
                "without",
                "    - uri: {prefix: /w}\n      withoutHeaders: {x-skip: {}}\n",
            ),
            ("prefix", "    - uri: {prefix: /}\n"),
        ],
    )
}

/// `match.port` holds for the port the client addressed: the Host's, else
/// that of the listener it came to (a sidecar's listener is the service
/// port the Host names; through umbra the two differ).
#[tokio::test]
async fn a_port_match_takes_the_hosts_port_else_the_listeners() {
    let backend = Backend::echo("b").await;
    let any = [("any", "    - uri: {prefix: /}\n")];
    let setup = Setup {
        second_listener: true,
        ..Setup::default()
    };
    let umbra = Umbra::start_with(&stamped_routes(backend.port(), &any), setup).await;
    let second = umbra.second.unwrap();
    let on_second = format!("    - port: {}\n", second.port());
    let routes = [
        ("named", "    - port: 8000\n"),
        ("second", &on_second),
        ("other", "    - uri: {prefix: /}\n"),
    ];
    assert!(
        umbra
            .reload_with(&stamped_routes(backend.port(), &routes))
            .await
    );
    for (listener, host, route) in [
        (umbra.addr, "app:8000", "named"),
        (second, "app:8000", "named"),
        (second, "app", "second"),
        (umbra.addr, "app", "other"),
        (second, "app:9", "other"),
    ] {
        let (status, headers, _) = fetch(&format!("http://{listener}/"), host).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["x-route"], route, "{host} to {listener}");
    }
}

/// The `x-route` of `GET path` to host `app` with `headers` (repeatable).
async fn route_taken(umbra: &Umbra, path: &str, headers: &[(&str, &str)]) -> String {
    let mut request = Request::get(umbra.url(path)).header("host", "app");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let (status, response_headers, _) = send(request.body(empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{path} {headers:?}");
    response_headers["x-route"].to_str().unwrap().to_string()
}

#[tokio::test]
async fn each_match_kind_selects_its_route() {
    let backend = Backend::echo("b").await;
    let umbra = Umbra::start(&match_config(backend.port())).await;
    type Case = (
        &'static str,
        &'static str,
        &'static str,
        Vec<(&'static str, &'static str)>,
        &'static str,
    );
    let cases: Vec<Case> = vec![
        ("GET", "/exact", "app", vec![], "uri-exact"),
        ("GET", "/exact/more", "app", vec![], "prefix"),
        ("GET", "/items/42", "app", vec![], "uri-regex"),
        ("GET", "/items/42x", "app", vec![], "prefix"),
        ("GET", "/case/x", "app", vec![], "ignore-case"),
        ("GET", "/", "app", vec![("x-user", "alice")], "header"),
        ("GET", "/", "app", vec![("x-user", "bob")], "header-regex"),
        ("GET", "/?a=1&debug=on", "app", vec![], "query"),
        ("GET", "/?debug=off", "app", vec![], "prefix"),
        ("DELETE", "/", "app", vec![], "method"),
        ("GET", "/", "canary.example.com", vec![], "authority"),
        ("GET", "/w", "app", vec![], "without"),
        ("GET", "/w", "app", vec![("x-skip", "1")], "prefix"),
        (
            "GET",
            "/",
            "app.default.svc.cluster.local:80",
            vec![],
            "prefix",
        ),
    ];
    for (method, path, host, headers, want) in cases {
        let mut request = Request::builder()
            .method(method)
            .uri(umbra.url(path))
            .header("host", host);
        for (k, v) in &headers {
            request = request.header(*k, *v);
        }
        let (status, response_headers, _) = send(request.body(empty()).unwrap()).await;
        assert_eq!(status, StatusCode::OK, "{method} {path} {host}");
        assert_eq!(
            response_headers["x-route"], want,
            "{method} {path} host={host} headers={headers:?}"
        );
    }
}

/// Envoy matches a header sent on several lines as its lines joined with
/// `,` (CVE-2020-25017), so a client cannot hide a value from a route, or
/// from a `withoutHeaders`, behind an earlier line the upstream gets too.
#[tokio::test]
async fn header_matches_see_every_line_of_a_header() {
    let backend = Backend::echo("b").await;
    let routes = [
        ("both", "    - headers: {x-tier: {exact: 'gold,beta'}}\n"),
        (
            "not-internal",
            "    - uri: {prefix: /ext}\n      withoutHeaders: {x-internal: {regex: '.*true.*'}}\n",
        ),
        ("rest", "    - uri: {prefix: /}\n"),
    ];
    let umbra = Umbra::start(&stamped_routes(backend.port(), &routes)).await;
    let two_lines = [("x-tier", "gold"), ("x-tier", "beta")];
    assert_eq!(route_taken(&umbra, "/", &two_lines).await, "both");
    assert_eq!(
        route_taken(&umbra, "/", &[("x-tier", "gold")]).await,
        "rest"
    );
    assert_eq!(route_taken(&umbra, "/ext", &[]).await, "not-internal");
    let hidden = [("x-internal", "no"), ("x-internal", "true")];
    assert_eq!(route_taken(&umbra, "/ext", &hidden).await, "rest");
}

/// Istio sets `treat_missing_header_as_empty` on a `withoutHeaders` entry
/// that is not a presence match: a missing header is matched as "".
#[tokio::test]
async fn without_headers_takes_a_missing_header_as_empty() {
    let backend = Backend::echo("b").await;
    let routes = [
        (
            "no-token",
            "    - uri: {prefix: /a}\n      withoutHeaders: {x-token: {regex: '.*'}}\n",
        ),
        (
            "not-empty",
            "    - uri: {prefix: /b}\n      withoutHeaders: {x-token: {exact: ''}}\n",
        ),
        (
            "absent",
            "    - uri: {prefix: /c}\n      withoutHeaders: {x-token: {}}\n",
        ),
        ("rest", "    - uri: {prefix: /}\n"),
    ];
    let umbra = Umbra::start(&stamped_routes(backend.port(), &routes)).await;
    // `.*` matches "" as well as any value: the route never holds.
    assert_eq!(route_taken(&umbra, "/a", &[]).await, "rest");
    assert_eq!(route_taken(&umbra, "/a", &[("x-token", "t")]).await, "rest");
    assert_eq!(route_taken(&umbra, "/b", &[]).await, "rest");
    assert_eq!(
        route_taken(&umbra, "/b", &[("x-token", "t")]).await,
        "not-empty"
    );
    // A presence match: only an absent header passes.
    assert_eq!(route_taken(&umbra, "/c", &[]).await, "absent");
    assert_eq!(route_taken(&umbra, "/c", &[("x-token", "")]).await, "rest");
}

/// `ignoreUriCase` covers exact and prefix URIs only: Envoy ignores its
/// `case_sensitive` for a regex path, so a regex stays case-sensitive.
#[tokio::test]
async fn ignore_uri_case_leaves_a_regex_case_sensitive() {
    let backend = Backend::echo("b").await;
    let routes = [
        (
            "regex",
            "    - uri: {regex: '/re/[a-z]+'}\n      ignoreUriCase: true\n",
        ),
        (
            "exact",
            "    - uri: {exact: /Ex}\n      ignoreUriCase: true\n",
        ),
        ("rest", "    - uri: {prefix: /}\n"),
    ];
    let umbra = Umbra::start(&stamped_routes(backend.port(), &routes)).await;
    assert_eq!(route_taken(&umbra, "/re/abc", &[]).await, "regex");
    assert_eq!(route_taken(&umbra, "/RE/ABC", &[]).await, "rest");
    assert_eq!(route_taken(&umbra, "/re/ABC", &[]).await, "rest");
    assert_eq!(route_taken(&umbra, "/eX", &[]).await, "exact");
}

#[tokio::test]
async fn weights_split_traffic_statistically() {
    let a = Backend::echo("a").await;
    let b = Backend::echo("b").await;
    let yaml = format!(
        r#"apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {{name: split}}
spec:
  hosts: [split]
  http:
  - route:
    - destination: {{host: 127.0.0.1, port: {{number: {}}}}}
      weight: 80
    - destination: {{host: 127.0.0.1, port: {{number: {}}}}}
      weight: 20
"#,
        a.port(),
        b.port()
    );
    let umbra = Umbra::start(&yaml).await;
    let total = 2000;
    for _ in 0..total {
        let (status, _, _) = fetch(&umbra.url("/"), "split").await;
        assert_eq!(status, StatusCode::OK);
    }
    // Binomial(2000, 0.2): mean 400, σ ≈ 17.9; ±6σ never flakes in practice.
    let to_b = b.count() as i64;
    assert_eq!(a.count() + b.count(), total);
    assert!(
        (400 - 107..=400 + 107).contains(&to_b),
        "b got {to_b} of {total}"
    );
}

/// Weights are relative, as in Istio: 0 and 7 send everything to the
/// second, and the only destination of a route gets everything whatever
/// its weight.
#[tokio::test]
async fn weights_are_relative_and_a_lone_destination_gets_everything() {
    let a = Backend::echo("a").await;
    let b = Backend::echo("b").await;
    let yaml = format!(
        r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: split}}
spec:
  hosts: [split]
  http:
  - match: [{{uri: {{prefix: /lone}}}}]
    route:
    - destination: {{host: 127.0.0.1, port: {{number: {a}}}}}
      weight: 0
  - route:
    - destination: {{host: 127.0.0.1, port: {{number: {a}}}}}
      weight: 0
    - destination: {{host: 127.0.0.1, port: {{number: {b}}}}}
      weight: 7
"#,
        a = a.port(),
        b = b.port()
    );
    let umbra = Umbra::start(&yaml).await;
    for _ in 0..20 {
        assert_eq!(&fetch(&umbra.url("/"), "split").await.2[..], b"b");
        assert_eq!(&fetch(&umbra.url("/lone"), "split").await.2[..], b"a");
    }
}

#[tokio::test]
async fn subsets_resolve_through_endpoint_labels() {
    let v1 = Backend::echo("v1").await;
    let v2 = Backend::echo("v2").await;
    let yaml = seed(v1.port(), v2.port(), "", "").replace("subset: v1", "subset: v2");
    let umbra = Umbra::start(&yaml).await;
    let (status, headers, body) = fetch(&umbra.url("/x"), "httpbin:8000").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&body[..], b"v2");
    assert_eq!(headers["x-backend"], "v2");
    assert_eq!(v1.count(), 0);
}

#[tokio::test]
async fn local_errors_carry_status_and_reason() {
    let dead = refused_port().await;
    let hole = Blackhole::start().await;
    let yaml = format!(
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: empty}}
spec:
  hosts: [empty]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
  - address: 127.0.0.1
    labels: {{version: v1}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: empty}}
spec:
  host: empty
  subsets:
  - name: v9
    labels: {{version: v9}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: errors}}
spec:
  hosts: [errors]
  http:
  - match: [{{uri: {{prefix: /dead}}}}]
    route: [{{destination: {{host: 127.0.0.1, port: {{number: {dead}}}}}}}]
  - match: [{{uri: {{prefix: /slow}}}}]
    timeout: 200ms
    route: [{{destination: {{host: 127.0.0.1, port: {{number: {hole}}}}}}}]
  - match: [{{uri: {{prefix: /none}}}}]
    route: [{{destination: {{host: empty, subset: v9, port: {{number: 80}}}}}}]
"#,
        hole = hole.addr.port()
    );
    let umbra = Umbra::start(&yaml).await;
    let cases = [
        ("/dead", "errors", 502, "upstream_connect_failure"),
        ("/slow", "errors", 504, "upstream_timeout"),
        ("/none", "errors", 503, "no_healthy_upstream"),
        ("/other", "errors", 404, "no_route"),
        ("/dead", "unknown.host", 404, "no_route"),
        ("/dead", "bad host!", 400, "invalid_host"),
        ("/dead", "errors:99999", 400, "invalid_host"),
    ];
    for (path, host, status, reason) in cases {
        let (got, headers, body) = fetch(&umbra.url(path), host).await;
        assert_eq!(got.as_u16(), status, "{path} {host}");
        assert_eq!(headers["x-umbra-error"], reason, "{path} {host}");
        assert!(!body.is_empty());
    }
    // Oversized headers: 431 from the HTTP/1 parser.
    let request = Request::get(umbra.url("/dead"))
        .header("host", "errors")
        .header("x-big", "a".repeat(70 * 1024))
        .body(empty())
        .unwrap();
    let (status, _, _) = send(request).await;
    assert_eq!(status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    let errors = umbra
        .metric(
            "umbra_upstream_errors_total",
            &[("reason", "upstream_connect_failure")],
        )
        .await;
    assert_eq!(
        errors, 1.0,
        "only the routed /dead request reached an upstream"
    );
    for (reason, count) in [("no_route", 2.0), ("invalid_host", 2.0)] {
        let replies = umbra
            .metric("umbra_local_replies_total", &[("reason", reason)])
            .await;
        assert_eq!(replies, count, "{reason}");
    }
}

#[tokio::test]
async fn request_headers_are_forwarded_as_istio_does() {
    let backend = Backend::echo("b").await;
    let yaml = format!(
        r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: h}}
spec:
  hosts: [h]
  http:
  - headers:
      request:
        set: {{x-env: prod}}
        add: {{x-added: one}}
        remove: [x-secret]
      response:
        set: {{x-resp: route}}
    route:
    - destination: {{host: 127.0.0.1, port: {{number: {}}}}}
      headers:
        request:
          set: {{x-dest: yes}}
        response:
          remove: [x-backend]
"#,
        backend.port()
    );
    let umbra = Umbra::start(&yaml).await;
    let request = Request::get(umbra.url("/p?q=1"))
        .header("host", "h:8080")
        .header("x-request-id", "given-id")
        .header("x-secret", "s")
        .header("x-forwarded-for", "10.1.2.3")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "1")
        .header("keep-alive", "timeout=5")
        .body(empty())
        .unwrap();
    let (_, headers, _) = send(request).await;
    assert_eq!(headers["x-resp"], "route");
    assert!(headers.get("x-backend").is_none());
    let seen = &backend.received()[0];
    assert_eq!(seen.uri.path_and_query().unwrap(), "/p?q=1");
    assert_eq!(seen.header("host"), Some("h:8080"));
    assert_eq!(seen.header("x-request-id"), Some("given-id"));
    assert_eq!(seen.header("x-forwarded-for"), Some("10.1.2.3, 127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(seen.header("x-env"), Some("prod"));
    assert_eq!(seen.header("x-added"), Some("one"));
    assert_eq!(seen.header("x-dest"), Some("yes"));
    assert_eq!(seen.header("x-secret"), None);
    assert_eq!(seen.header("x-hop"), None);
    assert_eq!(seen.header("keep-alive"), None);

    // Without an incoming id, a UUID is generated.
    fetch(&umbra.url("/"), "h").await;
    let generated = backend.received()[1]
        .header("x-request-id")
        .unwrap()
        .to_string();
    assert_eq!(generated.len(), 36, "{generated}");
}

/// Route and destination header rules combine as in the Envoy config
/// Istio builds: with one destination both sit in the route's lists (every
/// `remove` first, then the route's `set`/`add`, then the destination's);
/// with several, the destination's are its weighted cluster's, applied
/// before the route's.
#[tokio::test]
async fn route_and_destination_header_rules_combine_as_in_istio() {
    let backend = Backend::echo("b").await;
    let port = backend.port();
    let yaml = format!(
        r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: h}}
spec:
  hosts: [h]
  http:
  - match: [{{uri: {{prefix: /one}}}}]
    headers:
      request: {{add: {{x-added: route}}, set: {{x-set: route}}}}
      response: {{add: {{x-added: route}}}}
    route:
    - destination: {{host: 127.0.0.1, port: {{number: {port}}}}}
      headers:
        request: {{remove: [x-added], set: {{x-set: dest}}}}
        response: {{remove: [x-added]}}
  - headers:
      request: {{set: {{x-set: route}}}}
      response: {{set: {{x-set: route}}}}
    route:
    - destination: {{host: 127.0.0.1, port: {{number: {port}}}}}
      weight: 1
      headers:
        request: {{set: {{x-set: dest}}}}
        response: {{set: {{x-set: dest}}}}
    - destination: {{host: 127.0.0.1, port: {{number: {port}}}}}
      weight: 1
      headers:
        request: {{set: {{x-set: dest}}}}
        response: {{set: {{x-set: dest}}}}
"#
    );
    let umbra = Umbra::start(&yaml).await;
    let (_, headers, _) = fetch(&umbra.url("/one"), "h").await;
    assert_eq!(headers["x-added"], "route", "removes go before every add");
    let seen = &backend.received()[0];
    assert_eq!(seen.header("x-added"), Some("route"));
    assert_eq!(
        seen.header("x-set"),
        Some("dest"),
        "one destination: its set is last"
    );
    let (_, headers, _) = fetch(&umbra.url("/two"), "h").await;
    assert_eq!(
        headers["x-set"], "route",
        "several: the route's set is last"
    );
    assert_eq!(backend.received()[1].header("x-set"), Some("route"));
}

/// Istio makes a request `host` (or `:authority`) in `add` or `set` the
/// authority Envoy rewrites to: the upstream gets one Host, never two.
/// (Both spellings in one route are a config error, as in Istio.)
#[tokio::test]
async fn adding_a_host_header_replaces_it() {
    for rule in [
        "add: {host: backend.internal}",
        "set: {':authority': backend.internal}",
    ] {
        let backend = Backend::echo("b").await;
        let yaml = format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: h}}\nspec:\n  hosts: [h]\n  http:\n  - headers: {{request: {{{rule}}}}}\n    route: [{{destination: {{host: 127.0.0.1, port: {{number: {}}}}}}}]\n",
            backend.port()
        );
        let umbra = Umbra::start(&yaml).await;
        let (status, _, _) = fetch(&umbra.url("/"), "h").await;
        assert_eq!(status, StatusCode::OK, "{rule}");
        let seen = &backend.received()[0];
        let hosts: Vec<_> = seen.headers.get_all("host").iter().collect();
        assert_eq!(hosts, ["backend.internal"], "{rule}");
    }
}

#[tokio::test]
async fn rewrite_replaces_prefix_and_authority() {
    let backend = Backend::echo("b").await;
    let yaml = format!(
        r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: rw}}
spec:
  hosts: [rw]
  http:
  - match: [{{uri: {{prefix: /api/v1}}}}]
    rewrite: {{uri: /v2, authority: backend.internal}}
    route: [{{destination: {{host: 127.0.0.1, port: {{number: {}}}}}}}]
"#,
        backend.port()
    );
    let umbra = Umbra::start(&yaml).await;
    fetch(&umbra.url("/api/v1/users?id=3"), "rw").await;
    let seen = &backend.received()[0];
    assert_eq!(seen.uri.path_and_query().unwrap(), "/v2/users?id=3");
    assert_eq!(seen.header("host"), Some("backend.internal"));
}

/// `rewrite.uri` is Envoy's `prefix_rewrite` on the route Istio builds
/// for each `match[]` entry: the matched prefix is replaced, an exact or
/// regex match's whole path, and for an entry without `uri` (or a route
/// without `match`), Istio's `prefix: /`, the leading `/` only.
#[tokio::test]
async fn rewrite_replaces_what_each_kind_of_match_matched() {
    let backend = Backend::echo("b").await;
    let port = backend.port();
    let yaml = format!(
        r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: rw}}
spec:
  hosts: [rw]
  http:
  - match:
    - uri: {{prefix: /old/}}
    - uri: {{exact: /legacy}}
    - uri: {{regex: '/v[0-9]+/items'}}
    - headers: {{x-tenant: {{exact: a}}}}
    rewrite: {{uri: /new/}}
    route: [{{destination: {{host: 127.0.0.1, port: {{number: {port}}}}}}}]
  - rewrite: {{uri: /api/}}
    route: [{{destination: {{host: 127.0.0.1, port: {{number: {port}}}}}}}]
"#
    );
    let umbra = Umbra::start(&yaml).await;
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 5] = [
        ("/old/a/b?x=1", &[], "/new/a/b?x=1"),
        ("/legacy?x=1", &[], "/new/?x=1"),
        ("/v2/items", &[], "/new/"),
        ("/users/7?x=1", &[("x-tenant", "a")], "/new/users/7?x=1"),
        ("/users/7", &[], "/api/users/7"),
    ];
    for (i, (path, headers, want)) in cases.into_iter().enumerate() {
        let mut request = Request::get(umbra.url(path)).header("host", "rw");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let (status, _, _) = send(request.body(empty()).unwrap()).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        let seen = &backend.received()[i];
        assert_eq!(
            seen.uri.path_and_query().unwrap(),
            want,
            "{path} {headers:?}"
        );
    }
}

/// `rewrite.uriRegexRewrite`, as Envoy's `regex_rewrite`: every match in
/// the path replaced, `\1` naming a group, the query kept; the mirror gets
/// the rewritten path too. Istio's documentation example first.
#[tokio::test]
async fn a_regex_rewrite_replaces_every_match_in_the_path() {
    let backend = Backend::echo("b").await;
    let shadow = Backend::echo("s").await;
    let (port, shadow_port) = (backend.port(), shadow.port());
    let yaml = format!(
        r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: rw}}
spec:
  hosts: [rw]
  http:
  - match: [{{uri: {{prefix: /service}}}}]
    rewrite:
      uriRegexRewrite:
        match: ^/service/([^/]+)(/.*)$
        rewrite: /customprefix\2/\1
    route: [{{destination: {{host: 127.0.0.1, port: {{number: {port}}}}}}}]
    mirror: {{host: 127.0.0.1, port: {{number: {shadow_port}}}}}
  - rewrite: {{uriRegexRewrite: {{match: "a+", rewrite: "_\\0_"}}}}
    route: [{{destination: {{host: 127.0.0.1, port: {{number: {port}}}}}}}]
"#
    );
    let umbra = Umbra::start(&yaml).await;
    let cases = [
        (
            "/service/update/v1/api?x=1",
            "/customprefix/v1/api/update?x=1",
        ),
        ("/service/nothing", "/service/nothing"),
        ("/banana/aa?a=aa", "/b_a_n_a_n_a_/_aa_?a=aa"),
    ];
    for (i, (path, want)) in cases.into_iter().enumerate() {
        let (status, _, _) = fetch(&umbra.url(path), "rw").await;
        assert_eq!(status, StatusCode::OK, "{path}");
        let seen = &backend.received()[i];
        assert_eq!(seen.uri.path_and_query().unwrap(), want, "{path}");
    }
    shadow.wait_for(2).await;
    let mirrored: Vec<String> = (shadow.received().iter())
        .map(|seen| seen.uri.path_and_query().unwrap().to_string())
        .collect();
    assert_eq!(
        mirrored,
        ["/customprefix/v1/api/update?x=1", "/service/nothing"]
    );
}

#[tokio::test]
async fn retries_replay_bodiless_requests_only() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    // Fails every other request with 503.
    let flaky = Backend::start("flaky", move |_| {
        let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut response = Response::new(full(format!("call {n}")));
        if n.is_multiple_of(2) {
            *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        }
        response
    })
    .await;
    let yaml = format!(
        r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: retry}}
spec:
  hosts: [retry]
  http:
  - retries: {{attempts: 2, perTryTimeout: 1s, retryOn: "5xx"}}
    route: [{{destination: {{host: 127.0.0.1, port: {{number: {}}}}}}}]
"#,
        flaky.port()
    );
    let umbra = Umbra::start(&yaml).await;
    let (status, _, body) = fetch(&umbra.url("/"), "retry").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&body[..], b"call 1");
    assert_eq!(flaky.count(), 2);

    // A POST with a body cannot be replayed: the 503 goes to the client.
    let request = Request::post(umbra.url("/"))
        .header("host", "retry")
        .body(full("payload"))
        .unwrap();
    let (status, _, _) = send(request).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(flaky.count(), 3);
}

/// A VirtualService `retry` routing to the backend on `port` with
/// `retries`.
fn retry_route(port: u16, retries: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: retry}}\nspec:\n  hosts: [retry]\n  http:\n  - retries: {retries}\n    route: [{{destination: {{host: 127.0.0.1, port: {{number: {port}}}}}}}]\n"
    )
}

/// A retry waits its back-off (a random time under `backoff`), within the
/// route's timeout: with a back-off of 1000 hours, the 200 ms timeout runs
/// out first (unless the draw is under 200 ms: a chance of 6 in 10⁸).
#[tokio::test]
async fn a_retry_waits_its_backoff_within_the_route_timeout() {
    let backend = Backend::status("b", 503).await;
    let yaml = retry_route(backend.port(), "{attempts: 1, backoff: 1000h}")
        .replace("  - retries:", "  - timeout: 200ms\n    retries:");
    let umbra = Umbra::start(&yaml).await;
    let (status, headers, _) = fetch(&umbra.url("/"), "retry").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(headers["x-umbra-error"], "upstream_timeout");
    assert_eq!(backend.count(), 1, "the retry never went out");
}

/// `retries` without `retryOn` takes Istio's conditions (connect-failure,
/// refused-stream and status 503), not every gateway error; a status
/// written in `retryOn` is one to retry on, as Istio reads it.
#[tokio::test]
async fn retry_conditions_are_istios() {
    for (status, retry_on, calls) in [
        (503, "", 3),
        (502, "", 1),
        (504, "", 1),
        (429, ", retryOn: '429'", 3),
        (
            429,
            ", retryOn: 'gateway-error,503,retriable-status-codes'",
            1,
        ),
        (
            503,
            ", retryOn: 'gateway-error,503,retriable-status-codes'",
            3,
        ),
    ] {
        let backend = Backend::status("b", status).await;
        let yaml = retry_route(backend.port(), &format!("{{attempts: 2{retry_on}}}"));
        let umbra = Umbra::start(&yaml).await;
        let (got, _, _) = fetch(&umbra.url("/"), "retry").await;
        assert_eq!(got.as_u16(), status, "{status} {retry_on}");
        assert_eq!(backend.count(), calls, "{status} {retry_on}");
    }
}

/// A route without `retries` gets Istio's mesh default: two retries on a
/// connect failure, a refused stream or a 503; `attempts: 0` turns it off.
/// Each try carries the whole request again.
#[tokio::test]
async fn routes_without_retries_get_istios_default() {
    let backend = Backend::status("b", 503).await;
    let umbra = Umbra::start(&single_route("retry", backend.port())).await;
    let mut request = get(&umbra.url("/a?b=c"), "retry");
    request
        .headers_mut()
        .insert("x-kept", "yes".parse().unwrap());
    let (status, _, _) = send(request).await;
    assert_eq!(status.as_u16(), 503);
    let tries = backend.received();
    assert_eq!(tries.len(), 3, "the first try and two retries");
    for seen in &tries {
        assert_eq!(seen.uri, "/a?b=c");
        assert_eq!(seen.header("host"), Some("retry"));
        assert_eq!(seen.header("x-kept"), Some("yes"));
    }

    // An HTTP/2 upstream takes its copy of the request from hyper's client.
    let h2 = Backend::start_with("h2", true, |_| {
        let mut response = Response::new(full("busy"));
        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        response
    })
    .await;
    let policy = "{connectionPool: {http: {h2UpgradePolicy: UPGRADE}}}";
    let yaml = format!(
        "{}---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: up}}\nspec:\n  host: 127.0.0.1\n  trafficPolicy: {policy}\n",
        single_route("retry", h2.port())
    );
    let umbra = Umbra::start(&yaml).await;
    let mut request = get(&umbra.url("/a?b=c"), "retry");
    request
        .headers_mut()
        .insert("x-kept", "yes".parse().unwrap());
    let (status, _, body) = send(request).await;
    assert_eq!((status.as_u16(), &body[..]), (503, &b"busy"[..]));
    let tries = h2.received();
    assert_eq!(tries.len(), 3, "the first try and two retries, over HTTP/2");
    for seen in &tries {
        assert_eq!(seen.version, http::Version::HTTP_2);
        assert_eq!(seen.uri.path_and_query().unwrap(), "/a?b=c");
        assert_eq!(seen.header("x-kept"), Some("yes"));
    }

    let off = Backend::status("off", 503).await;
    let umbra = Umbra::start(&retry_route(off.port(), "{attempts: 0}")).await;
    let (status, _, _) = fetch(&umbra.url("/"), "retry").await;
    assert_eq!(status.as_u16(), 503);
    assert_eq!(off.count(), 1, "attempts: 0 turns retries off");
}

/// Envoy retries an exchange that got no response (a refused connection,
/// a per-try timeout) under `reset`, `5xx` and `gateway-error` alike.
#[tokio::test]
async fn reset_and_gateway_error_retry_exchanges_without_a_response() {
    let backend = Backend::echo("live").await;
    let blackhole = Blackhole::start().await;
    let dead = refused_port().await;
    for retry_on in ["reset", "gateway-error", "5xx"] {
        for other in [dead, blackhole.addr.port()] {
            // Round robin over the two: one of two requests tries the
            // failing endpoint first, and must be retried on the live one.
            let yaml = format!(
                r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: pair}}
spec:
  hosts: [pair]
  ports: [{{number: 80, name: http}}]
  resolution: STATIC
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {other}}}}}
  - {{address: 127.0.0.1, ports: {{http: {live}}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: pair}}
spec:
  hosts: [pair]
  http:
  - retries: {{attempts: 1, perTryTimeout: 200ms, retryOn: {retry_on}}}
    route: [{{destination: {{host: pair}}}}]
"#,
                live = backend.port()
            );
            let umbra = Umbra::start(&yaml).await;
            for _ in 0..2 {
                let (status, _, body) = fetch(&umbra.url("/"), "pair").await;
                assert_eq!(status, StatusCode::OK, "{retry_on} {other}");
                assert_eq!(&body[..], b"live");
            }
        }
    }
}

/// Envoy's `per_try_timeout` bounds every attempt, the first included, so
/// it holds for a request with a body too, which is not replayed and so
/// gets no retry: without a route `timeout` (Istio sets none) nothing
/// else would end its wait for an upstream that never answers.
#[tokio::test]
async fn per_try_timeout_bounds_a_request_with_a_body() {
    let blackhole = Blackhole::start().await;
    let yaml = retry_route(blackhole.addr.port(), "{attempts: 2, perTryTimeout: 200ms}");
    let umbra = Umbra::start(&yaml).await;
    let request = Request::post(umbra.url("/"))
        .header("host", "retry")
        .body(full("payload"))
        .unwrap();
    let (status, headers, _) = tokio::time::timeout(PATIENCE, send(request))
        .await
        .expect("the per-try timeout ends the attempt");
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(headers["x-umbra-error"], "upstream_timeout");
    assert_eq!(blackhole.accepted(), 1, "a body is not replayed");
}

/// A `perTryTimeout` of 0 sets no per-try timeout, as Envoy reads a zero
/// `per_try_timeout` and umbra a zero route `timeout`: it must not time
/// every attempt out before the upstream can answer.
#[tokio::test]
async fn a_zero_per_try_timeout_is_no_timeout() {
    let backend = Backend::echo("live").await;
    let yaml = retry_route(backend.port(), "{attempts: 2, perTryTimeout: 0s}");
    let umbra = Umbra::start(&yaml).await;
    let (status, headers, body) = fetch(&umbra.url("/"), "retry").await;
    assert_eq!(status, StatusCode::OK, "{headers:?}");
    assert_eq!(&body[..], b"live");
}

/// Over HTTP/2 a stream takes large upstream chunks in pieces (so that the
/// send timeout sees a slow client's progress): they arrive whole and in
/// order.
#[tokio::test]
async fn a_large_body_arrives_whole_over_http2() {
    let body: Bytes = (0..4 * 1024 * 1024 + 7)
        .map(|i: u32| (i % 251) as u8)
        .collect();
    let served = body.clone();
    let backend = Backend::start("big", move |_| Response::new(full(served.clone()))).await;
    let umbra = Umbra::start(&single_route("big", backend.port())).await;
    let request = Request::get("http://big/").body(empty()).unwrap();
    let response = h2_send(umbra.addr, request).await;
    assert_eq!(response.status(), StatusCode::OK);
    let received = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(received.len(), body.len());
    assert!(received == body, "the same bytes in the same order");
}

/// The seed route to v1 mirrored to v2, with `fault` and `extra` lines.
fn faulty(v1: u16, v2: u16, fault: &str, extra: &str) -> String {
    let lines = format!(
        "    mirror: {{host: httpbin, subset: v2, port: {{number: 8000}}}}\n    fault: {fault}\n{extra}"
    );
    seed(v1, v2, "", &lines)
}

const FAULTS: &str = "umbra_faults_injected_total";

/// umbra serving `yaml`, writing its access log to the file returned.
async fn logging(yaml: &str) -> (Umbra, tempfile::NamedTempFile) {
    let log = tempfile::NamedTempFile::new().unwrap();
    let setup = Setup {
        access_log: Some(log.path().to_path_buf()),
        ..Setup::default()
    };
    (Umbra::start_with(yaml, setup).await, log)
}

/// `fault.abort`, as Envoy's fault filter runs it ahead of its router: the
/// client gets the status with Envoy's body, and the request goes nowhere,
/// its mirror included.
#[tokio::test]
async fn an_injected_abort_answers_and_sends_nothing() {
    let v1 = Backend::echo("v1").await;
    let v2 = Backend::echo("v2").await;
    let fault = "{abort: {httpStatus: 418, percentage: {value: 100}}}";
    let (umbra, log) = logging(&faulty(v1.port(), v2.port(), fault, "")).await;
    let (status, headers, body) = fetch(&umbra.url("/"), "httpbin:8000").await;
    let line = logged(log.path()).await.expect("an access-log line");
    assert!(
        line.contains(" 418 ") && line.contains("error=fault_filter_abort"),
        "{line}"
    );
    assert_eq!(status, StatusCode::IM_A_TEAPOT);
    assert_eq!(&body[..], b"fault filter abort\n");
    assert_eq!(headers["x-umbra-error"], "fault_filter_abort");
    assert_eq!(umbra.metric(FAULTS, &[("kind", "abort")]).await, 1.0);
    let sent = [("outcome", "sent")];
    assert_eq!(
        umbra.metric("umbra_mirror_requests_total", &sent).await,
        0.0
    );
    assert_eq!((v1.count(), v2.count()), (0, 0));
}

/// `fault.delay` holds the request, then it goes on, mirror included; the
/// route's timeout starts after it, as Envoy's router starts it.
#[tokio::test]
async fn an_injected_delay_holds_the_request_outside_the_route_timeout() {
    let v1 = Backend::echo("v1").await;
    let v2 = Backend::echo("v2").await;
    let fault = "{delay: {fixedDelay: 300ms, percentage: {value: 100}}}";
    let yaml = faulty(v1.port(), v2.port(), fault, "    timeout: 200ms\n");
    let umbra = Umbra::start(&yaml).await;
    let started = Instant::now();
    let (status, _, body) = fetch(&umbra.url("/"), "httpbin:8000").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&body[..], b"v1");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(umbra.metric(FAULTS, &[("kind", "delay")]).await, 1.0);
    v2.wait_for(1).await;
}

/// A client that leaves during an injected delay is logged and counted
/// as gone (Envoy logs it too); nothing is sent anywhere.
#[tokio::test]
async fn a_client_leaving_during_an_injected_delay_is_logged() {
    let v1 = Backend::echo("v1").await;
    let v2 = Backend::echo("v2").await;
    let fault = "{delay: {fixedDelay: 60s, percentage: {value: 100}}}";
    let (umbra, log) = logging(&faulty(v1.port(), v2.port(), fault, "")).await;
    let url = umbra.url("/held");
    let request = tokio::spawn(async move { send(get(&url, "httpbin:8000")).await.0 });
    // The delay was drawn: the request is being held.
    umbra.wait_metric(FAULTS, &[("kind", "delay")], 1.0).await;
    request.abort();
    let gone = [("reason", "downstream_remote_disconnect")];
    let left = umbra
        .wait_metric("umbra_downstream_errors_total", &gone, 1.0)
        .await;
    assert_eq!(left, 1.0);
    let line = logged(log.path())
        .await
        .expect("the abandoned request is logged");
    assert!(line.contains("\"GET /held HTTP/1.1\" 499 0 "), "{line}");
    assert!(
        line.contains("error=downstream_remote_disconnect"),
        "{line}"
    );
    assert_eq!((v1.count(), v2.count()), (0, 0));
}

/// The analysis times v1 from its sending, as it times v2: an injected
/// delay is the route's doing, not v1's latency.
#[tokio::test]
async fn an_injected_delay_is_not_counted_in_the_primarys_latency() {
    let v1 = Backend::echo("v1").await;
    let v2 = Backend::echo("v2").await;
    let fault = "{delay: {fixedDelay: 300ms, percentage: {value: 100}}}";
    let yaml = faulty(v1.port(), v2.port(), fault, "");
    let setup = Setup {
        analysis: true,
        ..Setup::default()
    };
    let umbra = Umbra::start_with(&yaml, setup).await;
    let (status, _, _) = fetch(&umbra.url("/"), "httpbin:8000").await;
    assert_eq!(status, StatusCode::OK);
    let report = umbra.analysed(1).await.expect("the pair analysed");
    let latency = &report.routes[0].latency;
    assert!(latency.primary.p50_ms < 250.0, "{latency:?}");
}

/// Istio's `redirect`, answered as Envoy's `RedirectAction`: the request's
/// URL with the parts the redirect names replaced, nothing forwarded.
#[tokio::test]
async fn a_redirect_route_answers_with_the_location_envoy_would_give() {
    let v1 = Backend::echo("v1").await;
    let yaml = format!(
        r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web}}
spec:
  hosts: [web]
  http:
  - match: [{{uri: {{exact: /old}}}}]
    redirect: {{uri: /new}}
  - match: [{{uri: {{prefix: /secure}}}}]
    redirect: {{scheme: https}}
  - match: [{{uri: {{prefix: /moved}}}}]
    redirect: {{authority: other.example, port: 9000, redirectCode: 307}}
  - match: [{{uri: {{prefix: /port}}}}]
    redirect: {{scheme: https, derivePort: FROM_REQUEST_PORT, uri: "/p?fresh=1"}}
  - match: [{{uri: {{prefix: /signin}}}}]
    redirect: {{uri: login}}
  - route: [{{destination: {{host: 127.0.0.1, port: {{number: {}}}}}}}]
"#,
        v1.port()
    );
    let (umbra, log) = logging(&yaml).await;
    let listener = umbra.addr.port();
    let cases = [
        (
            "/old?x=1",
            "web:8080",
            301,
            "http://web:8080/new?x=1".to_string(),
        ),
        // The new scheme drops the old one's default port.
        (
            "/secure/a",
            "web:80",
            301,
            "https://web/secure/a".to_string(),
        ),
        (
            "/secure/a",
            "web:8080",
            301,
            "https://web:8080/secure/a".to_string(),
        ),
        (
            "/moved?q",
            "web",
            307,
            "http://other.example:9000/moved?q".to_string(),
        ),
        // A query in the redirect's path replaces the request's.
        (
            "/port?x=1",
            "web:8080",
            301,
            format!("https://web:{listener}/p?fresh=1"),
        ),
        // Istio takes a `uri` without its `/`, and Envoy puts it first.
        (
            "/signin?next=home",
            "web",
            301,
            "http://web/login?next=home".to_string(),
        ),
    ];
    for (path, host, status, location) in cases {
        let (got, headers, body) = fetch(&umbra.url(path), host).await;
        assert_eq!(got.as_u16(), status, "{path} {host}");
        assert_eq!(headers["location"], location.as_str(), "{path} {host}");
        assert!(body.is_empty());
    }
    let line = logged(log.path()).await.expect("an access-log line");
    assert!(line.contains("\"GET /old?x=1 HTTP/1.1\" 301 "), "{line}");
    let redirects = [("route", "web.http[0]"), ("destination", "redirect")];
    assert_eq!(umbra.metric("umbra_requests_total", &redirects).await, 1.0);
    assert_eq!(v1.count(), 0, "nothing forwarded");
    let (status, _, body) = fetch(&umbra.url("/other"), "web").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"v1"[..]));
}

/// Istio's `directResponse`: the status and body, `text/plain` as Envoy's
/// local replies, with the route's response header rules.
#[tokio::test]
async fn a_direct_response_route_answers_with_its_status_and_body() {
    let yaml = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web}
spec:
  hosts: [web]
  http:
  - match: [{uri: {prefix: /down}}]
    directResponse: {status: 503, body: {string: "unknown error"}}
    headers: {response: {set: {retry-after: "120"}}}
  - directResponse: {status: 204}
"#;
    let umbra = Umbra::start(yaml).await;
    let (status, headers, body) = fetch(&umbra.url("/down"), "web").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(&body[..], b"unknown error");
    assert_eq!(headers["content-type"], "text/plain");
    assert_eq!(headers["retry-after"], "120");
    assert!(
        headers.get("x-umbra-error").is_none(),
        "not umbra's failure"
    );
    let (status, headers, body) = fetch(&umbra.url("/"), "web").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(body.is_empty() && headers.get("content-type").is_none());
    let direct = [("route", "web.http[0]"), ("destination", "direct_response")];
    assert_eq!(umbra.metric("umbra_requests_total", &direct).await, 1.0);
}

/// A request with `method`, `Host: web` and `headers`.
fn cors_request(
    umbra: &Umbra,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Request<Body> {
    let mut request = Request::builder()
        .method(method)
        .uri(umbra.url(path))
        .header("host", "web");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.body(empty()).unwrap()
}

/// Istio's `corsPolicy`, as Envoy's CORS filter: a preflight from an
/// allowed origin answered here, the others forwarded (or, with
/// `unmatchedPreflights: IGNORE`, answered without CORS headers); an
/// allowed origin's responses, umbra's own replies included, carry the
/// CORS headers.
#[tokio::test]
async fn a_cors_policy_answers_preflights_and_marks_allowed_responses() {
    let v1 = Backend::echo("v1").await;
    let dead = refused_port().await;
    let yaml = format!(
        r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web}}
spec:
  hosts: [web]
  http:
  - match: [{{uri: {{prefix: /strict}}}}]
    route: [{{destination: {{host: 127.0.0.1, port: {{number: {v1}}}}}}}]
    corsPolicy: {{allowOrigins: [{{exact: https://example.com}}], allowMethods: ["*"], unmatchedPreflights: IGNORE}}
  - match: [{{uri: {{prefix: /dead}}}}]
    route: [{{destination: {{host: 127.0.0.1, port: {{number: {dead}}}}}}}]
    retries: {{attempts: 0}}
    corsPolicy: {{allowOrigins: [{{prefix: "https://"}}], allowCredentials: true}}
  - route: [{{destination: {{host: 127.0.0.1, port: {{number: {v1}}}}}}}]
    corsPolicy:
      allowOrigins: [{{exact: https://example.com}}, {{regex: "https://.*[.]example[.]org"}}]
      allowMethods: [POST, GET]
      allowHeaders: [X-Foo-Bar]
      exposeHeaders: [X-Trace]
      maxAge: 24h
"#,
        v1 = v1.port()
    );
    let umbra = Umbra::start(&yaml).await;
    let preflight = |origin: &'static str, path: &'static str| {
        let headers = [
            ("origin", origin),
            ("access-control-request-method", "PUT"),
            ("access-control-request-headers", "x-foo-bar"),
        ];
        cors_request(&umbra, "OPTIONS", path, &headers)
    };

    // An allowed origin's preflight: answered, nothing forwarded.
    let (status, headers, body) = send(preflight("https://a.example.org", "/")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.is_empty());
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://a.example.org"
    );
    assert_eq!(headers["access-control-allow-methods"], "POST,GET");
    assert_eq!(headers["access-control-allow-headers"], "X-Foo-Bar");
    assert_eq!(headers["access-control-max-age"], "86400");
    assert!(headers.get("access-control-allow-credentials").is_none());
    assert_eq!(v1.count(), 0);
    let preflights = [("route", "web.http[2]"), ("destination", "cors_preflight")];
    assert_eq!(umbra.metric("umbra_requests_total", &preflights).await, 1.0);
    // `*` echoes the method asked for.
    let (_, headers, _) = send(preflight("https://example.com", "/strict")).await;
    assert_eq!(headers["access-control-allow-methods"], "PUT");

    // Another origin's preflight goes upstream, as in Envoy by default...
    let (status, headers, _) = send(preflight("https://evil.test", "/")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers.get("access-control-allow-origin").is_none());
    assert_eq!(v1.count(), 1, "forwarded");
    // ...or, with unmatchedPreflights: IGNORE, is answered without them.
    let (status, headers, _) = send(preflight("https://evil.test", "/strict")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers.get("access-control-allow-origin").is_none());
    assert_eq!(v1.count(), 1, "not forwarded");

    // An allowed origin's request: forwarded, its response marked.
    let get = cors_request(&umbra, "GET", "/", &[("origin", "https://example.com")]);
    let (status, headers, body) = send(get).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"v1"[..]));
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://example.com"
    );
    assert_eq!(headers["access-control-expose-headers"], "X-Trace");
    // Another origin's response is left alone; so is one without Origin.
    let get = cors_request(&umbra, "GET", "/", &[("origin", "https://evil.test")]);
    let (_, headers, _) = send(get).await;
    assert!(headers.get("access-control-allow-origin").is_none());
    // umbra's own reply to an allowed origin is marked too.
    let get = cors_request(&umbra, "GET", "/dead", &[("origin", "https://x.test")]);
    let (status, headers, _) = send(get).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(headers["access-control-allow-origin"], "https://x.test");
    assert_eq!(headers["access-control-allow-credentials"], "true");
}

/// A HEAD request to a `directResponse` gets its head, the body's length
/// included, as Envoy's local replies give it; the client was sent all it
/// asked for, so the access log has no error.
#[tokio::test]
async fn a_direct_response_to_head_is_its_head_and_logged_complete() {
    let yaml = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web}
spec:
  hosts: [web]
  http:
  - directResponse: {status: 503, body: {string: "unknown error"}}
"#;
    let (umbra, log) = logging(yaml).await;
    let head = Request::head(umbra.url("/"))
        .header("host", "web")
        .body(empty())
        .unwrap();
    let (status, headers, body) = send(head).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["content-length"], "13");
    assert!(body.is_empty());
    let line = logged(log.path()).await.expect("an access-log line");
    assert!(line.contains("\"HEAD / HTTP/1.1\" 503 0 "), "{line}");
    assert!(!line.contains("error="), "{line}");
}

/// A `directResponse` of 204 or 304 sends no body, whatever it was given:
/// neither status has content (RFC 9110 §15.3.5, §15.4.5). Over HTTP/1.1
/// hyper dropped it unread (logged as the client's failure), over HTTP/2
/// it was sent.
#[tokio::test]
async fn a_direct_response_without_content_sends_no_body() {
    let yaml = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web}
spec:
  hosts: ["*"]
  http:
  - match: [{uri: {prefix: /304}}]
    directResponse: {status: 304, body: {string: "not modified"}}
  - directResponse: {status: 204, body: {string: "no content"}}
"#;
    let (umbra, log) = logging(yaml).await;
    let (status, headers, body) = fetch(&umbra.url("/"), "web").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(body.is_empty() && headers.get("content-type").is_none());
    let (status, _, body) = fetch(&umbra.url("/304"), "web").await;
    assert_eq!(status, StatusCode::NOT_MODIFIED);
    assert!(body.is_empty());
    let response = h2_client()
        .request(Request::get(umbra.url("/")).body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert!(response
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .is_empty());
    let lines = eventually(|| async {
        let text = std::fs::read_to_string(log.path()).ok()?;
        (text.lines().count() == 3).then_some(text)
    })
    .await
    .expect("three access-log lines");
    for line in lines.lines() {
        assert!(line.contains(" 0 \"-\""), "{line}");
        assert!(!line.contains("error="), "{line}");
    }
}

/// To HEAD, umbra's own replies are logged for what they are, not as a
/// body the client left unread (hyper never sends one to HEAD).
#[tokio::test]
async fn a_local_reply_to_head_is_logged_with_its_own_reason() {
    let (umbra, log) = logging(&single_route("web", 9)).await;
    let head = Request::head(umbra.url("/"))
        .header("host", "elsewhere")
        .body(empty())
        .unwrap();
    let (status, _, body) = send(head).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.is_empty());
    let line = logged(log.path()).await.expect("an access-log line");
    assert!(line.contains("\"HEAD / HTTP/1.1\" 404 0 "), "{line}");
    assert!(line.trim_end().ends_with(" error=no_route"), "{line}");
}

/// The abort's percentage is a draw per request: 50% of 400 requests is
/// within 200 ± 60 (over 6 standard deviations).
#[tokio::test]
async fn an_injected_abort_hits_its_percentage() {
    let v1 = Backend::echo("v1").await;
    let v2 = Backend::echo("v2").await;
    let fault = "{abort: {httpStatus: 503, percentage: {value: 50}}}";
    let umbra = Umbra::start(&faulty(v1.port(), v2.port(), fault, "")).await;
    let mut aborted = 0;
    for _ in 0..400 {
        let (status, _, _) = fetch(&umbra.url("/"), "httpbin:8000").await;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            aborted += 1;
        }
    }
    assert!((140..=260).contains(&aborted), "{aborted} of 400");
    assert_eq!(v1.count(), 400 - aborted);
}

/// `grpcStatus` answers as gRPC does a call that fails before any message:
/// 200 with `grpc-status` in a head that ends the stream (trailers-only).
#[tokio::test]
async fn an_injected_grpc_abort_is_a_trailers_only_response() {
    use http_body::Body as _;
    let v1 = Backend::echo("v1").await;
    let v2 = Backend::echo("v2").await;
    let fault = "{abort: {grpcStatus: UNAVAILABLE, percentage: {value: 100}}}";
    let umbra = Umbra::start(&faulty(v1.port(), v2.port(), fault, "")).await;
    let request = Request::post("http://httpbin:8000/pkg.Service/Call")
        .header("content-type", "application/grpc")
        .body(full("\0\0\0\0\0"))
        .unwrap();
    let response = h2_send(umbra.addr, request).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["grpc-status"], "14");
    assert_eq!(response.headers()["content-type"], "application/grpc");
    assert!(response.body().is_end_stream(), "the head ended the stream");
}

/// `grpcish`: GRPC (HTTP/2) endpoints v1 and v2 on ports `v1` and `v2`,
/// routed to v1 and mirrored to v2, with `extra` lines in the route.
fn grpcish(v1: u16, v2: u16, extra: &str) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: grpcish}}
spec:
  hosts: [grpcish]
  ports: [{{number: 9000, name: grpc, protocol: GRPC}}]
  resolution: STATIC
  endpoints:
  - {{address: 127.0.0.1, ports: {{grpc: {}}}, labels: {{version: v1}}}}
  - {{address: 127.0.0.1, ports: {{grpc: {}}}, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: grpcish}}
spec:
  host: grpcish
  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: grpcish}}
spec:
  hosts: [grpcish]
  http:
  - route: [{{destination: {{host: grpcish, subset: v1, port: {{number: 9000}}}}}}]
    mirror: {{host: grpcish, subset: v2, port: {{number: 9000}}}}
{extra}"#,
        v1, v2
    )
}

#[tokio::test]
async fn http2_downstream_and_upstream() {
    let echo_version = |seen: &Recorded| Response::new(full(format!("{:?}", seen.version)));
    let v1 = Backend::start_with("v1", true, echo_version).await;
    let v2 = Backend::start_with("v2", true, echo_version).await;
    let yaml = grpcish(v1.port(), v2.port(), "");
    let umbra = Umbra::start(&yaml).await;
    // HTTP/2 prior knowledge in, the authority in the URI.
    let request = Request::get("http://grpcish:9000/svc/Method")
        .body(empty())
        .unwrap();
    let response = h2_send(umbra.addr, request).await;
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"HTTP/2.0");
    // Over HTTP/2 upstream the Host travels as :authority, as Envoy sends
    // it, and the shadow's carries the -shadow suffix.
    let seen = &v1.received()[0];
    assert_eq!(seen.uri.path(), "/svc/Method");
    assert_eq!(
        seen.uri.authority().map(|a| a.as_str()),
        Some("grpcish:9000")
    );
    assert_eq!(seen.header("host"), Some("grpcish:9000"));
    let shadow = &v2.wait_for(1).await[0];
    assert_eq!(shadow.uri.path(), "/svc/Method");
    assert_eq!(
        shadow.uri.authority().map(|a| a.as_str()),
        Some("grpcish-shadow:9000")
    );
    assert_eq!(shadow.header("host"), Some("grpcish-shadow:9000"));
}

#[tokio::test]
async fn http2_upstream_never_gets_a_host_other_than_its_authority() {
    let v1 = Backend::start_with("v1", true, |_| Response::new(full("v1"))).await;
    let v2 = Backend::start_with("v2", true, |_| Response::new(full("v2"))).await;
    // A Host no `:authority` can be made of: the endpoint's goes instead,
    // and the Host is not sent beside it to differ.
    let set = "    headers: {request: {set: {host: \"not a host\"}}}\n";
    let umbra = Umbra::start(&grpcish(v1.port(), v2.port(), set)).await;
    let request = Request::get("http://grpcish:9000/x").body(empty()).unwrap();
    assert_eq!(h2_send(umbra.addr, request).await.status(), StatusCode::OK);
    let seen = &v1.received()[0];
    let endpoint = format!("127.0.0.1:{}", v1.port());
    assert_eq!(
        seen.uri.authority().map(|a| a.as_str()),
        Some(&endpoint[..])
    );
    assert_eq!(seen.header("host"), None);
}

#[tokio::test]
async fn response_streams_before_upstream_finishes() {
    // The upstream sends one chunk, then waits for the test's signal to
    // finish. A buffering proxy would deadlock here and time out.
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let release = std::sync::Mutex::new(Some(release_rx));
    let backend = Backend::start("stream", move |_| {
        let release = release.lock().unwrap().take();
        let (sender, body) = channel_body();
        tokio::spawn(async move {
            sender.send(Bytes::from_static(b"first")).await.ok();
            if let Some(release) = release {
                let _ = release.await;
            }
            sender.send(Bytes::from_static(b"-last")).await.ok();
        });
        Response::new(body)
    })
    .await;
    let yaml = single_route("s", backend.port());
    let umbra = Umbra::start(&yaml).await;
    let response = client().request(get(&umbra.url("/"), "s")).await.unwrap();
    let mut body = response.into_body();
    let first = tokio::time::timeout(PATIENCE, body.frame())
        .await
        .expect("first chunk arrives while upstream is still open")
        .unwrap()
        .unwrap();
    assert_eq!(first.data_ref().unwrap(), &Bytes::from_static(b"first"));
    release_tx.send(()).unwrap();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(&rest[..], b"-last");
}

#[tokio::test]
async fn route_timeout_covers_the_response_body() {
    // Headers and a first chunk at once, then the body stalls for good:
    // Envoy's route timeout spans the whole response, so the client's
    // stream is cut when it runs out instead of hanging.
    let backend = Backend::start("stall", move |_| {
        let (sender, body) = channel_body();
        tokio::spawn(async move {
            sender.send(Bytes::from_static(b"first")).await.ok();
            sender.closed().await;
        });
        Response::new(body)
    })
    .await;
    let yaml = format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: t}}\nspec:\n  hosts: [t]\n  http:\n  - route: [{{destination: {{host: 127.0.0.1, port: {{number: {}}}}}}}]\n    timeout: 300ms\n",
        backend.port()
    );
    let (umbra, log) = logging(&yaml).await;
    let response = client().request(get(&umbra.url("/"), "t")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = tokio::time::timeout(PATIENCE, response.into_body().collect())
        .await
        .expect("the route timeout cuts a stalled body");
    assert!(
        body.is_err(),
        "a stalled body must end in an error, not look complete"
    );
    let logged = eventually(|| async {
        let text = std::fs::read_to_string(log.path()).unwrap_or_default();
        text.contains("upstream_response_timeout").then_some(text)
    })
    .await;
    assert!(logged.is_some(), "the access log names the timeout");
    let reason = [("reason", "upstream_response_timeout")];
    assert_eq!(
        umbra.metric("umbra_upstream_errors_total", &reason).await,
        1.0
    );
    assert_eq!(
        umbra.metric("umbra_downstream_errors_total", &[]).await,
        0.0
    );
}

/// `timeout: 300ms` or a `perTryTimeout` of 300 ms on a route to `port`.
fn timed_route(port: u16, policy: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: t}}\nspec:\n  hosts: [t]\n  http:\n  - route: [{{destination: {{host: 127.0.0.1, port: {{number: {port}}}}}}}]\n    {policy}\n"
    )
}

const TIMEOUTS: [&str; 2] = [
    "timeout: 300ms",
    "retries: {attempts: 1, perTryTimeout: 300ms}",
];

/// A POST whose body comes in 8 chunks 100 ms apart; returns the request
/// and when the client sent the last of it.
fn slow_upload(url: &str) -> (Request<Body>, tokio::task::JoinHandle<Instant>) {
    let (sender, body) = channel_body();
    let uploaded = tokio::spawn(async move {
        for _ in 0..8 {
            // The slow client under test, not a wait for an event.
            tokio::time::sleep(Duration::from_millis(100)).await;
            sender.send(Bytes::from_static(b"chunk")).await.unwrap();
        }
        Instant::now()
    });
    let request = Request::post(url).header("host", "t").body(body).unwrap();
    (request, uploaded)
}

/// Envoy starts the route's timeout, and each try's, once it has the
/// client's whole request: an upload slower than the timeout is not cut
/// while it moves (umbra cut it with 504 at 300 ms).
#[tokio::test]
async fn route_timeouts_do_not_count_a_moving_upload() {
    let backend = Backend::echo("live").await;
    for policy in TIMEOUTS {
        let umbra = Umbra::start(&timed_route(backend.port(), policy)).await;
        let (request, _) = slow_upload(&umbra.url("/"));
        let (status, headers, body) = send(request).await;
        assert_eq!(status, StatusCode::OK, "{policy}: {headers:?}");
        assert_eq!(&body[..], b"live");
    }
    let received = backend.received();
    assert!(received.iter().all(|r| r.body.len() == 40), "whole bodies");
}

/// ... and counts from the upload's end: an upstream that takes the body
/// and never answers has the request timed out 300 ms after it, not before.
#[tokio::test]
async fn route_timeouts_count_from_the_end_of_the_upload() {
    let blackhole = Blackhole::start().await;
    for policy in TIMEOUTS {
        let umbra = Umbra::start(&timed_route(blackhole.addr.port(), policy)).await;
        let (request, uploaded) = slow_upload(&umbra.url("/"));
        let (status, headers, _) = send(request).await;
        let answered = Instant::now();
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{policy}");
        assert_eq!(headers["x-umbra-error"], "upstream_timeout");
        let uploaded = uploaded.await.unwrap();
        let waited = answered - uploaded;
        assert!(waited >= Duration::from_millis(300), "{policy}: {waited:?}");
    }
}

/// An upload that stops moving because the upstream reads none of it is
/// not waited for: the timeout fires once it has seen no progress for its
/// whole length.
#[tokio::test]
async fn route_timeouts_fire_on_an_upload_the_upstream_never_reads() {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    const SIZE: usize = 64 * 1024 * 1024;
    for policy in TIMEOUTS {
        let umbra = Umbra::start(&timed_route(port, policy)).await;
        let mut stream = tokio::net::TcpStream::connect(umbra.addr).await.unwrap();
        let head = format!("POST / HTTP/1.1\r\nHost: t\r\nContent-Length: {SIZE}\r\n\r\n");
        stream.write_all(head.as_bytes()).await.unwrap();
        let (mut reader, mut writer) = stream.into_split();
        tokio::spawn(async move {
            let chunk = vec![b'x'; 1024 * 1024];
            for _ in 0..SIZE / chunk.len() {
                if writer.write_all(&chunk).await.is_err() {
                    return;
                }
            }
        });
        let head = tokio::time::timeout(PATIENCE, read_head(&mut reader))
            .await
            .expect("a stuck upload is timed out");
        assert!(head.starts_with("HTTP/1.1 504"), "{policy}: {head}");
    }
}

/// A bidirectional stream (the upload still open while the response
/// streams back) is not cut by the timeout while either side moves: the
/// client sends one chunk and waits for the whole response, which comes
/// in 8 chunks 100 ms apart (Envoy, whose timeout starts at the upload's
/// end, never cuts it).
#[tokio::test]
async fn route_timeouts_do_not_cut_a_moving_bidirectional_stream() {
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = service_fn(|request: Request<hyper::body::Incoming>| async move {
                let (sender, body) = channel_body();
                tokio::spawn(async move {
                    let _upload = request;
                    for _ in 0..8 {
                        // The slow upstream under test, not a wait for an event.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        sender.send(Bytes::from_static(b"tick")).await.unwrap();
                    }
                });
                Ok::<_, std::convert::Infallible>(Response::new(body))
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::spawn(connection);
        }
    });
    for policy in TIMEOUTS {
        let umbra = Umbra::start(&timed_route(port, policy)).await;
        let (sender, body) = channel_body();
        sender.send(Bytes::from_static(b"hello")).await.unwrap();
        let request = Request::post(umbra.url("/"))
            .header("host", "t")
            .body(body)
            .unwrap();
        let (status, headers, body) = send(request).await;
        assert_eq!(status, StatusCode::OK, "{policy}: {headers:?}");
        assert_eq!(&body[..], "tick".repeat(8).as_bytes(), "{policy}");
        drop(sender);
    }
}

#[tokio::test]
async fn route_timeout_holds_for_a_client_reading_slowly() {
    // The upstream sends its whole body at once; the client reads 64 KiB
    // every 10 ms (32 MiB would take 5 s). Envoy's route timeout covers the
    // whole response, so the stream is cut at 300 ms even though data was
    // always ready when umbra was asked for more.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const SIZE: usize = 32 * 1024 * 1024;
    let backend = Backend::start("big", |_| Response::new(full(vec![b'x'; SIZE]))).await;
    let yaml = format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: t}}\nspec:\n  hosts: [t]\n  http:\n  - route: [{{destination: {{host: 127.0.0.1, port: {{number: {}}}}}}}]\n    timeout: 300ms\n",
        backend.port()
    );
    let umbra = Umbra::start(&yaml).await;
    let mut stream = tokio::net::TcpStream::connect(umbra.addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut received = 0;
    let mut chunk = vec![0u8; 64 * 1024];
    let ended = tokio::time::timeout(PATIENCE, async {
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received += n,
            }
            // The slow reader under test, not a wait for an event.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(ended.is_ok(), "the response was cut, not read to the end");
    assert!(received < SIZE, "cut before the end: {received} bytes");
}

#[tokio::test]
async fn reload_swaps_good_config_and_keeps_old_on_error() {
    let a = Backend::echo("a").await;
    let b = Backend::echo("b").await;
    let vs = |port: u16| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: r}}\nspec:\n  hosts: [r]\n  http:\n  - route: [{{destination: {{host: 127.0.0.1, port: {{number: {port}}}}}}}]\n"
        )
    };
    let umbra = Umbra::start(&vs(a.port())).await;
    assert_eq!(&fetch(&umbra.url("/"), "r").await.2[..], b"a");

    assert!(
        umbra.reload_with(&vs(b.port())).await,
        "good reload accepted"
    );
    assert_eq!(&fetch(&umbra.url("/"), "r").await.2[..], b"b");

    let broken = vs(a.port()).replace("hosts: [r]", "hosts: [r\n  http: {");
    assert!(!umbra.reload_with(&broken).await, "bad reload rejected");
    assert_eq!(
        &fetch(&umbra.url("/"), "r").await.2[..],
        b"b",
        "old config still serves"
    );

    let metrics = umbra.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "umbra_config_reloads_total",
            &[("result", "success")]
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            &metrics,
            "umbra_config_reloads_total",
            &[("result", "failure")]
        ),
        1.0
    );
}

#[tokio::test]
async fn an_empty_config_directory_serves_the_files_added_to_it() {
    let v1 = Backend::echo("v1").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_str().unwrap();
    let umbra = Process::spawn(
        &[
            "run",
            "-c",
            path,
            "-l",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ],
        &[],
    );
    let addr = umbra.logged_addr("umbra::server: listening").await;
    umbra.line("umbra::server: ready").await; // Watching from here.
    assert_eq!(umbra.count("has no *.yaml or *.yml files"), 1);
    let url = format!("http://{addr}/get");
    assert_eq!(fetch(&url, "r").await.0, StatusCode::NOT_FOUND);

    // Written aside and renamed in, as kubectl and editors do.
    let staging = dir.path().join(".routes.tmp");
    std::fs::write(&staging, single_route("r", v1.port())).unwrap();
    std::fs::rename(&staging, dir.path().join("routes.yaml")).unwrap();
    let served = eventually(|| async {
        let (status, _, body) = fetch(&url, "r").await;
        (status == StatusCode::OK).then_some(body)
    })
    .await;
    assert_eq!(served.as_deref(), Some(&b"v1"[..]), "{}", umbra.stderr());
}

#[tokio::test]
async fn admin_refuses_other_methods_saying_which_it_allows() {
    let umbra = Umbra::start(&single_route("adm", refused_port().await)).await;
    for path in ["/shadow/report", "/metrics", "/"] {
        let request = Request::post(format!("http://{}{path}", umbra.admin))
            .body(empty())
            .unwrap();
        let (status, headers, _) = send(request).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{path}");
        assert_eq!(
            headers.get("allow").map(|v| v.as_bytes()),
            Some(&b"GET, HEAD"[..]),
            "{path}"
        );
    }
    assert_eq!(
        umbra.admin_get("/shadow/reports").await.0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn admin_reports_ready_metrics_and_config() {
    let backend = Backend::echo("b").await;
    let yaml = format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: adm}}\nspec:\n  hosts: [adm]\n  http:\n  - name: main\n    headers:\n      request:\n        set: {{authorization: Bearer hunter2}}\n    route: [{{destination: {{host: 127.0.0.1, port: {{number: {}}}}}}}]\n",
        backend.port()
    );
    let umbra = Umbra::start(&yaml).await;
    assert_eq!(umbra.admin_get("/ready").await.0, StatusCode::OK);
    fetch(&umbra.url("/"), "adm").await;
    let metrics = umbra.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "umbra_requests_total",
            &[("route", "main"), ("class", "2xx")]
        ),
        1.0
    );
    assert!(metrics.contains("umbra_request_duration_seconds_bucket"));
    let (status, dump) = umbra.admin_get("/config_dump").await;
    assert_eq!(status, StatusCode::OK);
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(dump["virtual_services"][0]["name"], "adm");
    let text = dump.to_string();
    assert!(!text.contains("hunter2"), "secrets are redacted: {text}");
}

/// Values a route matches credential headers (and query parameters) against
/// are secrets as much as those a header rule sets: the dump keeps the
/// match's kind and the names, and hides the value.
#[tokio::test]
async fn config_dump_redacts_credential_match_values() {
    let backend = Backend::echo("b").await;
    let yaml = format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: adm}}\nspec:\n  hosts: [adm]\n  http:\n  - match:\n    - uri: {{prefix: /api}}\n      headers:\n        authorization: {{exact: Bearer matchsecret}}\n        x-env: {{exact: prod}}\n      withoutHeaders:\n        cookie: {{prefix: session=cookiesecret}}\n      queryParams:\n        access_token: {{regex: querysecret.*}}\n    route: [{{destination: {{host: 127.0.0.1, port: {{number: {}}}}}}}]\n",
        backend.port()
    );
    let umbra = Umbra::start(&yaml).await;
    let (status, dump) = umbra.admin_get("/config_dump").await;
    assert_eq!(status, StatusCode::OK);
    for secret in ["matchsecret", "cookiesecret", "querysecret"] {
        assert!(!dump.contains(secret), "{secret} is redacted: {dump}");
    }
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    let matched = &dump["virtual_services"][0]["routes"][0]["matches"][0];
    assert_eq!(matched["uri"]["Prefix"], "/api");
    let headers = matched["headers"].as_array().unwrap();
    assert!(headers.contains(&serde_json::json!(["authorization", {"Exact": "[redacted]"}])));
    assert!(headers.contains(&serde_json::json!(["x-env", {"Exact": "prod"}])));
    assert_eq!(
        matched["without_headers"][0],
        serde_json::json!(["cookie", {"Prefix": "[redacted]"}])
    );
    assert_eq!(
        matched["query_params"][0],
        serde_json::json!(["access_token", {"Regex": "[redacted]"}])
    );
}

#[tokio::test]
async fn access_log_has_one_line_per_request() {
    let backend = Backend::echo("b").await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let yaml = single_route("log", backend.port());
    let umbra = Umbra::start_with(
        &yaml,
        Setup {
            access_log: Some(log.clone()),
            ..Setup::default()
        },
    )
    .await;
    let request = Request::get(umbra.url("/path?x=1"))
        .header("host", "log")
        .header("x-request-id", "rid-77")
        .header("user-agent", "tester/1")
        .body(empty())
        .unwrap();
    send(request).await;
    let line = logged(&log).await.expect("log line written");
    assert_eq!(line.lines().count(), 1);
    assert!(
        line.contains("\"GET /path?x=1 HTTP/1.1\" 200 1 \"-\" \"tester/1\""),
        "{line}"
    );
    assert!(
        line.contains(&format!("upstream={}", backend.addr)),
        "{line}"
    );
    assert!(line.contains("request_id=rid-77"), "{line}");
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish() {
    shutdown_drains(0).await;
}

#[tokio::test]
async fn shutdown_drains_worker_threads() {
    shutdown_drains(2).await;
}

/// A response still streaming when shutdown begins completes; then the
/// listener is closed. `workers` as in `server::Options`.
async fn shutdown_drains(workers: usize) {
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let release = std::sync::Mutex::new(Some(release_rx));
    let backend = Backend::start("slow", move |_| {
        let release = release.lock().unwrap().take();
        let (sender, body) = channel_body();
        tokio::spawn(async move {
            if let Some(release) = release {
                let _ = release.await;
            }
            sender.send(Bytes::from_static(b"done")).await.ok();
        });
        Response::new(body)
    })
    .await;
    let yaml = single_route("d", backend.port());
    let setup = Setup {
        options: umbra::server::Options {
            workers,
            ..Default::default()
        },
        ..Setup::default()
    };
    let mut umbra = Umbra::start_with(&yaml, setup).await;
    let response = client().request(get(&umbra.url("/"), "d")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // Start draining while the body is still in flight.
    umbra.begin_shutdown();
    release_tx.send(()).unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"done");
    umbra.shutdown().await;
    // New connections are refused once drained.
    assert!(tokio::net::TcpStream::connect(umbra.addr).await.is_err());
}

#[tokio::test]
async fn slow_headers_are_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = Backend::echo("b").await;
    let yaml = single_route("sl", backend.port());
    let umbra = Umbra::start_with(
        &yaml,
        Setup {
            options: umbra::server::Options {
                header_read_timeout: Duration::from_millis(200),
                ..Default::default()
            },
            ..Setup::default()
        },
    )
    .await;
    let mut stream = tokio::net::TcpStream::connect(umbra.addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: sl\r\n")
        .await
        .unwrap();
    // Never finish the headers: umbra must close the connection.
    let mut buf = Vec::new();
    let read = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "connection closed by the header timeout");
    assert_eq!(backend.count(), 0);
}

const IDLE_CLOSED: &str = "umbra_downstream_idle_closed_total";

/// umbra with a 200 ms idle timeout in front of `backend`, for host `idle`.
async fn idle_timeout_umbra(backend: &Backend) -> Umbra {
    let yaml = single_route("idle", backend.port());
    let options = umbra::server::Options {
        header_read_timeout: IDLE_TIMEOUT,
        ..Default::default()
    };
    Umbra::start_with(
        &yaml,
        Setup {
            options,
            ..Setup::default()
        },
    )
    .await
}

const IDLE_TIMEOUT: Duration = Duration::from_millis(200);

/// Reads from `stream` until `received` ends with `needle`.
async fn read_until(stream: &mut tokio::net::TcpStream, received: &mut Vec<u8>, needle: &[u8]) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1024];
    while !received.ends_with(needle) {
        let n = tokio::time::timeout(PATIENCE, stream.read(&mut buf))
            .await
            .expect("data in time")
            .expect("read");
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(received));
        received.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test]
async fn a_slow_response_is_not_idle_but_the_keep_alive_after_it_is() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let feed = std::sync::Arc::new(std::sync::Mutex::new(None));
    let backend = Backend::start("slow", {
        let feed = feed.clone();
        move |_| {
            let (tx, body) = channel_body();
            *feed.lock().unwrap() = Some(tx);
            Response::new(body)
        }
    })
    .await;
    let umbra = idle_timeout_umbra(&backend).await;
    let mut stream = tokio::net::TcpStream::connect(umbra.addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: idle\r\n\r\n")
        .await
        .unwrap();
    backend.wait_for(1).await;
    let tx = feed.lock().unwrap().take().unwrap();
    tx.send(Bytes::from_static(b"first")).await.unwrap();
    let mut received = Vec::new();
    read_until(&mut stream, &mut received, b"first\r\n").await;
    // Nothing moves on the connection for three idle timeouts, but a
    // response is in flight: the connection must stay.
    tokio::time::sleep(IDLE_TIMEOUT * 3).await;
    assert_eq!(umbra.metric(IDLE_CLOSED, &[]).await, 0.0);
    tx.send(Bytes::from_static(b"second")).await.unwrap();
    drop(tx);
    read_until(&mut stream, &mut received, b"second\r\n0\r\n\r\n").await;
    // Now the connection is idle between requests, and is closed.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "idle keep-alive connection closed");
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    umbra.wait_metric(IDLE_CLOSED, &[], 1.0).await;
}

#[tokio::test]
async fn a_connection_that_never_sends_a_request_is_closed() {
    use tokio::io::AsyncReadExt;
    let backend = Backend::echo("b").await;
    let umbra = idle_timeout_umbra(&backend).await;
    let mut stream = tokio::net::TcpStream::connect(umbra.addr).await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "silent connection closed by the idle timeout");
    assert!(buf.is_empty());
    umbra.wait_metric(IDLE_CLOSED, &[], 1.0).await;
}

#[tokio::test]
async fn an_http2_connection_that_never_sends_a_request_gets_a_goaway() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = Backend::echo("b").await;
    let umbra = idle_timeout_umbra(&backend).await;
    let mut stream = tokio::net::TcpStream::connect(umbra.addr).await.unwrap();
    // The client preface and an empty SETTINGS frame, then nothing.
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let mut received = Vec::new();
    let read = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut received)).await;
    assert!(read.is_ok(), "idle connection closed");
    // Walk the frames umbra sent: 9-byte headers (length, type, flags, stream).
    let mut frames = Vec::new();
    let mut rest = &received[..];
    while rest.len() >= 9 {
        let length = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
        frames.push(rest[3]);
        rest = &rest[(9 + length).min(rest.len())..];
    }
    const SETTINGS: u8 = 0x4;
    const GOAWAY: u8 = 0x7;
    assert_eq!(frames.first(), Some(&SETTINGS), "{frames:?}");
    assert!(frames.contains(&GOAWAY), "told why it closes: {frames:?}");
    umbra.wait_metric(IDLE_CLOSED, &[], 1.0).await;
}

#[tokio::test]
async fn idle_http2_connections_are_left_to_pings() {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let backend = Backend::echo("b").await;
    let umbra = idle_timeout_umbra(&backend).await;
    let stream = tokio::net::TcpStream::connect(umbra.addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let connection = tokio::spawn(connection);
    for _ in 0..2 {
        let request = Request::get("http://idle/").body(empty()).unwrap();
        let response = sender.send_request(request).await.expect("same connection");
        assert_eq!(response.status(), StatusCode::OK);
        // Idle for three timeouts between the two requests.
        tokio::time::sleep(IDLE_TIMEOUT * 3).await;
    }
    assert!(!connection.is_finished());
    assert_eq!(umbra.metric(IDLE_CLOSED, &[]).await, 0.0);
}

#[tokio::test]
async fn upgrades_are_tunnelled_end_to_end() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An upstream that switches to an echo protocol.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let head = read_head(&mut stream).await;
        assert!(
            head.to_ascii_lowercase().contains("upgrade: echo"),
            "{head}"
        );
        stream
            .write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n",
            )
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    });
    let yaml = format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: ws}}\nspec:\n  hosts: [ws]\n  http:\n  - route: [{{destination: {{host: 127.0.0.1, port: {{number: {port}}}}}}}]\n"
    );
    let umbra = Umbra::start(&yaml).await;
    let mut client = tokio::net::TcpStream::connect(umbra.addr).await.unwrap();
    client
        .write_all(
            b"GET /chat HTTP/1.1\r\nHost: ws\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
        )
        .await
        .unwrap();
    let head = read_head(&mut client).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    client.write_all(b"ping").await.unwrap();
    let mut echoed = [0u8; 4];
    tokio::time::timeout(PATIENCE, client.read_exact(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echoed, b"ping");
}

/// A backend that never answers: it reports when a request head has
/// arrived and, later, when umbra closed that connection.
async fn silent_backend() -> (
    u16,
    tokio::sync::oneshot::Receiver<()>,
    tokio::sync::oneshot::Receiver<()>,
) {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (arrived_tx, arrived) = tokio::sync::oneshot::channel();
    let (closed_tx, closed) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "umbra closed before sending the whole head");
            head.extend_from_slice(&buf[..n]);
        }
        arrived_tx.send(()).unwrap();
        while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
        closed_tx.send(()).unwrap();
    });
    (port, arrived, closed)
}

/// The client leaves while umbra waits for the upstream response head:
/// the upstream exchange is cancelled (its connection closed, as Envoy and
/// nginx do), and the request is counted and logged with nginx's 499.
async fn client_leaves_before_the_response(http2: bool) {
    let (port, arrived, closed) = silent_backend().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let yaml = format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: gone}}\nspec:\n  hosts: [gone]\n  http:\n  - name: main\n    route: [{{destination: {{host: 127.0.0.1, port: {{number: {port}}}}}}}]\n"
    );
    let setup = Setup {
        access_log: Some(log.clone()),
        ..Setup::default()
    };
    let umbra = Umbra::start_with(&yaml, setup).await;
    let request = if http2 {
        let request = get("http://gone/slow", "gone");
        let addr = umbra.addr;
        tokio::spawn(async move { h2_send(addr, request).await.status() })
    } else {
        let url = umbra.url("/slow");
        tokio::spawn(async move { send(get(&url, "gone")).await.0 })
    };
    tokio::time::timeout(PATIENCE, arrived)
        .await
        .expect("the request reaches the backend")
        .unwrap();
    // Dropping the client's request closes its HTTP/1.1 connection or
    // resets its HTTP/2 stream.
    request.abort();
    tokio::time::timeout(PATIENCE, closed)
        .await
        .expect("umbra closes the upstream connection when the client leaves")
        .unwrap();
    let labels = [
        ("route", "main"),
        ("reason", "downstream_remote_disconnect"),
    ];
    assert_eq!(
        umbra
            .wait_metric("umbra_downstream_errors_total", &labels, 1.0)
            .await,
        1.0
    );
    assert_eq!(
        umbra.metric("umbra_upstream_errors_total", &[]).await,
        0.0,
        "not the upstream's fault"
    );
    let line = logged(&log).await.expect("the abandoned request is logged");
    let protocol = if http2 { "HTTP/2.0" } else { "HTTP/1.1" };
    assert!(
        line.contains(&format!("\"GET /slow {protocol}\" 499 0 ")),
        "{line}"
    );
    assert!(
        line.contains("error=downstream_remote_disconnect"),
        "{line}"
    );
    // The endpoint it was waiting on, as Envoy's `%UPSTREAM_HOST%`.
    assert!(
        line.contains(&format!(" upstream=127.0.0.1:{port} ")),
        "{line}"
    );
    assert_eq!(
        umbra
            .metric("umbra_requests_total", &[("route", "main")])
            .await,
        0.0,
        "no upstream response was counted"
    );
}

#[tokio::test]
async fn client_leaving_http1_cancels_upstream_and_logs_499() {
    client_leaves_before_the_response(false).await;
}

#[tokio::test]
async fn client_resetting_http2_stream_cancels_upstream_and_logs_499() {
    client_leaves_before_the_response(true).await;
}

/// A request body that breaks off or is malformed is the client's fault:
/// 400 with `x-umbra-error: downstream_request_body_error`, counted under
/// that reason, never as the upstream's reset.
#[tokio::test]
async fn broken_request_body_is_blamed_on_the_client() {
    use tokio::io::AsyncWriteExt;
    let (port, arrived, closed) = silent_backend().await;
    let yaml = format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: up}}\nspec:\n  hosts: [up]\n  http:\n  - name: main\n    route: [{{destination: {{host: 127.0.0.1, port: {{number: {port}}}}}}}]\n"
    );
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let setup = Setup {
        access_log: Some(log.clone()),
        ..Setup::default()
    };
    let umbra = Umbra::start_with(&yaml, setup).await;
    let mut stream = tokio::net::TcpStream::connect(umbra.addr).await.unwrap();
    stream
        .write_all(b"POST /upload HTTP/1.1\r\nHost: up\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        .await
        .unwrap();
    tokio::time::timeout(PATIENCE, arrived)
        .await
        .expect("the request head reaches the backend")
        .unwrap();
    // Not a chunk size: hyper fails the body mid-exchange.
    stream.write_all(b"zz\r\n").await.unwrap();
    let reply = read_reply(&mut stream).await;
    assert!(reply.starts_with("HTTP/1.1 400 "), "{reply}");
    assert!(
        reply.contains("x-umbra-error: downstream_request_body_error"),
        "{reply}"
    );
    tokio::time::timeout(PATIENCE, closed)
        .await
        .expect("the half-sent upstream request is abandoned")
        .unwrap();
    let reason = |reason| [("route", "main"), ("reason", reason)];
    assert_eq!(
        umbra
            .metric(
                "umbra_downstream_errors_total",
                &reason("downstream_request_body_error")
            )
            .await,
        1.0
    );
    assert_eq!(umbra.metric("umbra_upstream_errors_total", &[]).await, 0.0);
    let line = logged(&log).await.expect("the request is logged");
    assert!(line.contains("\"POST /upload HTTP/1.1\" 400 "), "{line}");
    assert!(
        line.contains("error=downstream_request_body_error"),
        "{line}"
    );
}

#[tokio::test]
async fn client_leaving_mid_upload_is_logged_as_499() {
    // Over HTTP/1.1 hyper keeps the handler running when the client closes
    // mid-body: the upstream exchange fails on the body, and that is the
    // client leaving, not a malformed body or an upstream reset.
    use tokio::io::AsyncWriteExt;
    let (port, arrived, closed) = silent_backend().await;
    let yaml = format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: up}}\nspec:\n  hosts: [up]\n  http:\n  - name: main\n    route: [{{destination: {{host: 127.0.0.1, port: {{number: {port}}}}}}}]\n"
    );
    let umbra = Umbra::start(&yaml).await;
    let mut stream = tokio::net::TcpStream::connect(umbra.addr).await.unwrap();
    stream
        .write_all(b"POST /upload HTTP/1.1\r\nHost: up\r\nContent-Length: 100000\r\n\r\npartial")
        .await
        .unwrap();
    tokio::time::timeout(PATIENCE, arrived)
        .await
        .expect("the request head reaches the backend")
        .unwrap();
    drop(stream);
    tokio::time::timeout(PATIENCE, closed)
        .await
        .expect("the half-sent upstream request is abandoned")
        .unwrap();
    let errors = "umbra_downstream_errors_total";
    let gone = [
        ("route", "main"),
        ("reason", "downstream_remote_disconnect"),
    ];
    assert_eq!(umbra.wait_metric(errors, &gone, 1.0).await, 1.0);
    assert_eq!(umbra.metric(errors, &[]).await, 1.0, "one reason only");
    assert_eq!(umbra.metric("umbra_upstream_errors_total", &[]).await, 0.0);
}

#[tokio::test]
async fn broken_request_body_to_an_http2_upstream_is_blamed_on_the_client() {
    // hyper's HTTP/2 client sends the body from a task of its own and
    // reports only a stream reset: the body itself must say it failed.
    let v1 = Backend::start_with("v1", true, |_| Response::new(full("v1"))).await;
    let policy = "{connectionPool: {http: {h2UpgradePolicy: UPGRADE}}}";
    let yaml = format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: up}}\nspec:\n  hosts: [up]\n  http:\n  - name: main\n    route: [{{destination: {{host: 127.0.0.1, port: {{number: {}}}}}}}]\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: up}}\nspec:\n  host: 127.0.0.1\n  trafficPolicy: {policy}\n",
        v1.port()
    );
    let umbra = Umbra::start(&yaml).await;
    let request = b"POST /upload HTTP/1.1\r\nHost: up\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n";
    let reply = exchange_raw(umbra.addr, request).await;
    assert!(reply.starts_with("HTTP/1.1 400 "), "{reply}");
    assert!(
        reply.contains("x-umbra-error: downstream_request_body_error"),
        "{reply}"
    );
    assert_eq!(v1.count(), 0, "v1 never got a whole request");
}

#[tokio::test]
async fn requests_cut_by_the_drain_timeout_are_not_blamed_on_clients() {
    use tokio::io::AsyncWriteExt;
    let (port, arrived, _closed) = silent_backend().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let yaml = format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: d}}\nspec:\n  hosts: [d]\n  http:\n  - route: [{{destination: {{host: 127.0.0.1, port: {{number: {port}}}}}}}]\n"
    );
    let setup = Setup {
        access_log: Some(log.clone()),
        options: umbra::server::Options {
            workers: 1,
            drain_timeout: Duration::from_millis(300),
            ..Default::default()
        },
        ..Setup::default()
    };
    let mut umbra = Umbra::start_with(&yaml, setup).await;
    let mut stream = tokio::net::TcpStream::connect(umbra.addr).await.unwrap();
    stream
        .write_all(b"GET /slow HTTP/1.1\r\nHost: d\r\n\r\n")
        .await
        .unwrap();
    tokio::time::timeout(PATIENCE, arrived)
        .await
        .expect("the request reaches the backend")
        .unwrap();
    umbra.shutdown().await;
    let line = logged(&log).await.expect("the cut request is logged");
    assert!(line.contains("\"GET /slow HTTP/1.1\" 0 0 "), "{line}");
    assert!(line.contains("error=drain_timeout"), "{line}");
    // umbra cut it, not the upstream: alerts on upstream errors stay quiet.
    let reason = [("reason", "drain_timeout")];
    assert_eq!(
        umbra.metric_after_shutdown("umbra_downstream_errors_total", &reason),
        1.0
    );
    assert_eq!(
        umbra.metric_after_shutdown("umbra_upstream_errors_total", &reason),
        0.0
    );
    drop(stream);
}

/// An HTTP/2 upstream that resets each of its first `refuse` streams with
/// REFUSED_STREAM (it never processed them) and answers 200 after that;
/// returns its port and the streams it saw.
async fn refusing_h2(refuse: usize) -> (u16, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(AtomicUsize::new(0));
    let counted = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let seen = counted.clone();
            tokio::spawn(async move {
                let Ok(mut connection) = h2::server::handshake(stream).await else {
                    return;
                };
                while let Some(Ok((_, mut respond))) = connection.accept().await {
                    if seen.fetch_add(1, Ordering::SeqCst) < refuse {
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                    } else {
                        let _ = respond.send_response(Response::new(()), true);
                    }
                }
            });
        }
    });
    (port, seen)
}

/// Envoy's `refused-stream`: an HTTP/2 stream the upstream refused was
/// never processed, so it is retried (for any method); in Istio's default
/// conditions, and under `reset`, but not under `connect-failure` alone.
#[tokio::test]
async fn refused_streams_are_retried() {
    let policy = "{connectionPool: {http: {h2UpgradePolicy: UPGRADE}}}";
    let route = |port: u16, retries: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: up}}\nspec:\n  hosts: [up]\n  http:\n  - route: [{{destination: {{host: 127.0.0.1, port: {{number: {port}}}}}}}]\n{retries}---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: up}}\nspec:\n  host: 127.0.0.1\n  trafficPolicy: {policy}\n"
        )
    };
    for (retries, method, answered) in [
        ("", "GET", 200),
        ("", "POST", 200),
        (
            "    retries: {attempts: 1, retryOn: refused-stream}\n",
            "POST",
            200,
        ),
        ("    retries: {attempts: 1, retryOn: reset}\n", "GET", 200),
        (
            "    retries: {attempts: 1, retryOn: connect-failure}\n",
            "GET",
            502,
        ),
        ("    retries: {attempts: 0}\n", "GET", 502),
    ] {
        let (port, seen) = refusing_h2(1).await;
        let umbra = Umbra::start(&route(port, retries)).await;
        let request = Request::builder()
            .method(method)
            .uri(umbra.url("/"))
            .header("host", "up")
            .body(empty())
            .unwrap();
        let (status, headers, _) = send(request).await;
        assert_eq!(status.as_u16(), answered, "{method} with {retries:?}");
        let tries = if answered == 200 { 2 } else { 1 };
        assert_eq!(
            seen.load(Ordering::SeqCst),
            tries,
            "{method} with {retries:?}"
        );
        if answered == 502 {
            let reason = headers.get("x-umbra-error").unwrap();
            assert_eq!(reason, "upstream_reset");
        }
    }
}

/// nginx's `client_body_timeout`: a client that stops sending its request
/// body mid-way has the request ended with 408 once it has sent nothing
/// for `--body-read-timeout`, and the upstream never gets a whole request.
#[tokio::test]
async fn a_stalled_request_body_times_out_with_408() {
    let backend = Backend::echo("b").await;
    let setup = Setup {
        options: umbra::server::Options {
            body_read_timeout: Duration::from_millis(200),
            ..Default::default()
        },
        ..Setup::default()
    };
    let umbra = Umbra::start_with(&single_route("up", backend.port()), setup).await;
    let request = b"POST /upload HTTP/1.1\r\nHost: up\r\nContent-Length: 10\r\n\r\nabc";
    let reply = exchange_raw(umbra.addr, request).await;
    assert!(reply.starts_with("HTTP/1.1 408 "), "{reply}");
    assert!(
        reply.contains("x-umbra-error: request_body_timeout"),
        "{reply}"
    );
    assert_eq!(backend.count(), 0, "no whole request reached it");
    let labels = [("reason", "request_body_timeout")];
    let errors = umbra.metric("umbra_downstream_errors_total", &labels).await;
    assert_eq!(errors, 1.0, "the client's doing");
}

/// A client that stalls its upload is the body read timeout's to end, as
/// its own failure (408), whatever the route's timeouts: they count from
/// the upload's end, as Envoy's do (umbra answered 504 at 300 ms and
/// blamed the upstream).
#[tokio::test]
async fn a_stalled_upload_is_not_a_route_timeout() {
    let backend = Backend::echo("b").await;
    for policy in TIMEOUTS {
        let setup = Setup {
            options: umbra::server::Options {
                body_read_timeout: Duration::from_secs(1),
                ..Default::default()
            },
            ..Setup::default()
        };
        let umbra = Umbra::start_with(&timed_route(backend.port(), policy), setup).await;
        let request = b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc";
        let reply = exchange_raw(umbra.addr, request).await;
        assert!(reply.starts_with("HTTP/1.1 408 "), "{policy}: {reply}");
        let labels = [("reason", "request_body_timeout")];
        let errors = umbra.metric("umbra_downstream_errors_total", &labels).await;
        assert_eq!(errors, 1.0, "{policy}: the client's doing");
        let upstream = umbra.metric("umbra_upstream_errors_total", &[]).await;
        assert_eq!(upstream, 0.0, "{policy}");
    }
}

/// The body read timeout is between two reads, not for the whole body:
/// an upload slower in all than the limit, but never silent that long,
/// goes through.
#[tokio::test]
async fn a_slow_but_steady_upload_is_not_cut() {
    let backend = Backend::echo("b").await;
    let setup = Setup {
        options: umbra::server::Options {
            body_read_timeout: Duration::from_secs(1),
            ..Default::default()
        },
        ..Setup::default()
    };
    let umbra = Umbra::start_with(&single_route("up", backend.port()), setup).await;
    let (sender, body) = channel_body();
    let request = Request::post(umbra.url("/upload"))
        .header("host", "up")
        .body(body)
        .unwrap();
    let sending = tokio::spawn(async move {
        for chunk in ["one ", "two ", "three ", "four"] {
            // The client's pace, not a synchronisation: 1.2 s in all.
            tokio::time::sleep(Duration::from_millis(300)).await;
            sender.send(Bytes::from(chunk)).await.unwrap();
        }
    });
    let (status, _, _) = send(request).await;
    sending.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(backend.received()[0].body, "one two three four");
}
