//! The config loader: every error message is asserted word for word
//! against a fixture, along with warnings, resolution and the CLI contract.

use std::process::Command;
use std::time::Duration;

use umbra::config::model::{
    AbortReply, Answer, LoadBalancer, RedirectPort, RetryPolicy, UpstreamProtocol,
};
use umbra::config::{self, Config};

fn errors(fixture: &str) -> Vec<String> {
    let path = format!("tests/fixtures/{fixture}");
    match config::load(&[&path]) {
        Ok(_) => panic!("{fixture} should not load"),
        Err(e) => e.errors.iter().map(ToString::to_string).collect(),
    }
}

fn loads(fixture: &str) -> Config {
    let path = format!("tests/fixtures/{fixture}");
    config::load(&[&path]).unwrap_or_else(|e| panic!("{fixture}: {e}"))
}

#[test]
fn weights_must_be_whole_and_not_all_0() {
    assert_eq!(
        errors("weights.yaml"),
        [
            "tests/fixtures/weights.yaml:9:7: weights of spec.http[0].route add up to 0, so no destination would get traffic. Give at least one a `weight` above 0 (weights are relative: 1 and 3 send a quarter and three quarters).",
            "tests/fixtures/weights.yaml:14:15: spec.http[1].route[0].weight -5 is not a weight. Use a whole number from 0 to 2147483647 (weights are relative: 1 and 3 send a quarter and three quarters).",
        ]
    );
}

/// As in Istio, weights are relative (a destination gets its weight over
/// their sum) and need not add up to 100, and the only destination of a
/// route gets all of it whatever its weight.
#[test]
fn weights_are_relative() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: split}
spec:
  hosts: [split]
  http:
  - route:
    - destination: {host: 127.0.0.1, port: {number: 9001}}
      weight: 1
    - destination: {host: 127.0.0.1, port: {number: 9002}}
      weight: 3
  - route:
    - destination: {host: 127.0.0.1, port: {number: 9001}}
      weight: 0
"#;
    let config = config::load_str("split.yaml", yaml).unwrap_or_else(|e| panic!("{e}"));
    let summary = config::summary(&config);
    assert!(summary.contains("→  25%  127.0.0.1||9001"), "{summary}");
    assert!(summary.contains("→  75%  127.0.0.1||9002"), "{summary}");
    let routes = &config.virtual_services[0].routes;
    assert_eq!(
        routes[1].destinations[0].weight, 100,
        "the only destination"
    );
}

#[test]
fn a_host_with_a_port_is_an_error() {
    assert_eq!(
        errors("host-port.yaml"),
        ["tests/fixtures/host-port.yaml:6:20: spec.hosts \"reviews.shop.svc.cluster.local:9080\" has a port, which a VirtualService host cannot have (the request's port is ignored when its host is matched). Write `reviews.shop.svc.cluster.local` instead of `reviews.shop.svc.cluster.local:9080`, and route by the port with `match: [{port: 9080}]`.",
            "tests/fixtures/host-port.yaml:8:20: spec.http[0].match[0].port 70000 is not a valid port. Use 1 to 65535."]
    );
}

#[test]
fn host_header_rules_istio_refuses_are_errors() {
    assert_eq!(
        errors("header-host.yaml"),
        [
            "tests/fixtures/header-host.yaml:9:35: spec.http[0].headers.request.remove: the Host header cannot be removed (Istio refuses it too): every HTTP/1.1 request needs one. Drop `Host` from the list, or set it to the value wanted.",
            "tests/fixtures/header-host.yaml:10:24: spec.http[0].headers.response.set.host: Host is a request header, and Istio refuses it here. Drop it, or set it under `headers.request`.",
            "tests/fixtures/header-host.yaml:10:49: spec.http[0].headers.response.remove: the Host header cannot be removed (Istio refuses it too): every HTTP/1.1 request needs one. Drop `:authority` from the list, or set it to the value wanted.",
        ]
    );
}

#[test]
fn unknown_subset_names_the_rule_and_its_subsets() {
    assert_eq!(
        errors("unknown-subset.yaml"),
        ["tests/fixtures/unknown-subset.yaml:29:44: spec.http[0].route[0].destination.subset \"v3\" is not defined in DestinationRule \"reviews\" (it has: v1). Use one of those, or add the subset."]
    );
}

/// Istio refuses a connect or idle timeout under 1 ms; umbra would time
/// every connection out at once, or never reuse one.
#[test]
fn zero_connect_and_idle_timeouts_and_sub_millisecond_request_timeouts_are_errors() {
    assert_eq!(
        errors("zero-durations.yaml"),
        [
            "tests/fixtures/zero-durations.yaml:9:29: connectionPool.tcp.connectTimeout \"0s\" is under 1ms, which Istio refuses: every connection would time out before it is made. Write a duration such as `1s`, or leave it out for 10s.",
            "tests/fixtures/zero-durations.yaml:10:27: connectionPool.http.idleTimeout \"0ms\" is under 1ms, which Istio refuses: every connection would close as soon as it is idle, and none would be reused. Write a duration such as `60s`, or leave it out for 90s.",
            "tests/fixtures/zero-durations.yaml:11:42: outlierDetection.baseEjectionTime \"0s\" is under 1ms, which Istio refuses: an ejected endpoint would be back at once. Write a duration such as `30s`, or leave it out for 30s.",
            "tests/fixtures/zero-durations.yaml:11:66: outlierDetection.maxEjectionPercent 150 is outside 0–100. Use a percentage such as 10.",
            "tests/fixtures/zero-durations.yaml:32:14: spec.http[0].timeout \"500us\" is under 1ms, which Istio refuses: requests would time out before the upstream could answer. Write a duration such as `5s`, or `0s` for none.",
            "tests/fixtures/zero-durations.yaml:33:43: spec.http[0].retries.perTryTimeout \"0.2ms\" is under 1ms, which Istio refuses: requests would time out before the upstream could answer. Write a duration such as `5s`, or `0s` for none.",
        ]
    );
}

#[test]
fn mirror_and_mirrors_are_exclusive() {
    assert_eq!(
        errors("mirror-and-mirrors.yaml"),
        ["tests/fixtures/mirror-and-mirrors.yaml:12:7: spec.http[0] sets both `mirror` and `mirrors`. Use one: move the `mirror` destination into `mirrors`, or drop `mirrors`."]
    );
}

#[test]
fn percentage_must_be_within_0_and_100() {
    assert_eq!(
        errors("percentage.yaml"),
        [
            "tests/fixtures/percentage.yaml:12:14: spec.http[0].mirrorPercentage.value 150 is outside 0–100. Use a percentage such as 10.0.",
            "tests/fixtures/percentage.yaml:25:20: spec.http[0].mirrorPercent sets the field `mirror_percent` already sets at 24:21. Keep one, better as `mirrorPercentage: {value: ...}`.",
        ]
    );
}

#[test]
fn bad_regex_reports_the_reason() {
    assert_eq!(
        errors("regex.yaml"),
        ["tests/fixtures/regex.yaml:10:9: spec.http[0].match[0].uri.regex \"/items/([0-9]+\" is not a valid regular expression (unclosed group). Fix the pattern (RE2 syntax)."]
    );
}

#[test]
fn bad_yaml_points_at_the_syntax_error() {
    assert_eq!(
        errors("bad-yaml.yaml"),
        ["tests/fixtures/bad-yaml.yaml:6:10: invalid YAML: this `[` is never closed (the parser gave up at line 7, column 7: illegal placement of ':' indicator). Close it with `]`."]
    );
}

#[test]
fn an_unclosed_flow_mapping_is_placed_where_it_opened() {
    // In the second document; the quote, brackets and comment after the
    // `{` open nothing.
    assert_eq!(
        errors("unclosed.yaml"),
        ["tests/fixtures/unclosed.yaml:10:11: invalid YAML: this `{` is never closed (the parser gave up at line 11, column 1: invalid indentation). Close it with `}`."]
    );
}

#[test]
fn mis_indented_spec_children_are_explained() {
    assert_eq!(
        errors("mis-indented.yaml"),
        [
            "tests/fixtures/mis-indented.yaml:6:1: `hosts` is at the top level of this VirtualService, but it belongs under `spec:`. Indent it (and its siblings) by two spaces under `spec:`.",
            "tests/fixtures/mis-indented.yaml:8:1: `http` is at the top level of this VirtualService, but it belongs under `spec:`. Indent it (and its siblings) by two spaces under `spec:`.",
        ]
    );
}

#[test]
fn a_second_resource_of_a_kind_and_name_is_an_error() {
    // The same name in another namespace, or of another kind, is fine.
    assert_eq!(
        errors("duplicates.yaml"),
        [
            "tests/fixtures/duplicates.yaml:11:18: ServiceEntry \"shop\" is defined twice in namespace \"default\" (first at tests/fixtures/duplicates.yaml:3). Rename or remove one.",
            "tests/fixtures/duplicates.yaml:31:18: DestinationRule \"shop\" is defined twice in namespace \"default\" (first at tests/fixtures/duplicates.yaml:25). Rename or remove one.",
            "tests/fixtures/duplicates.yaml:43:18: WorkloadEntry \"shop-1\" is defined twice in namespace \"default\" (first at tests/fixtures/duplicates.yaml:37). Rename or remove one.",
            "tests/fixtures/duplicates.yaml:58:18: VirtualService \"shop\" is defined twice in namespace \"default\" (first at tests/fixtures/duplicates.yaml:49). Rename or remove one.",
            "tests/fixtures/duplicates.yaml:72:18: ShadowAnalysis \"shop\" is defined twice in namespace \"default\" (first at tests/fixtures/duplicates.yaml:66). Rename or remove one.",
        ]
    );
}

#[test]
fn an_unsupported_api_version_names_the_ones_accepted() {
    assert_eq!(
        errors("api-version.yaml"),
        [
            "tests/fixtures/api-version.yaml:2:7: apiVersion `networking.istio.io/v2` is not supported for VirtualService. Use `networking.istio.io/v1` (or `v1beta1`, `v1alpha3`).",
            "tests/fixtures/api-version.yaml:8:7: apiVersion `networking.istio.io/v1` is not supported for ShadowAnalysis. Use `umbra.io/v1alpha1`.",
            "tests/fixtures/api-version.yaml:13:7: this DestinationRule has no `apiVersion`. Add `apiVersion: networking.istio.io/v1`.",
        ]
    );
}

#[test]
fn misspelt_kinds_are_errors_and_misspelt_fields_warnings_that_name_the_right_spelling() {
    // `timeOut` is a near miss of a field left out of the YAML; `tcp` is
    // Istio's own, which umbra does not implement. A field is never fatal
    // (it may be Istio's): a lost destination fails as missing.
    let path = "tests/fixtures/misspelt.yaml";
    let failed = config::load(&[path]).unwrap_err();
    let errors: Vec<String> = failed.errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        errors,
        [
            "tests/fixtures/misspelt.yaml:2:7: kind `VirtualServce` is not one umbra reads; did you mean `VirtualService`? Fix the spelling.",
            "tests/fixtures/misspelt.yaml:8:7: kind `destinationrule` is not one umbra reads; did you mean `DestinationRule`? Fix the spelling.",
            "tests/fixtures/misspelt.yaml:21:7: spec.http[0].route[0].destination is missing. Add `destination: {host: ...}`.",
            "tests/fixtures/misspelt.yaml:23:7: spec.http[1].route[0].destination is missing. Add `destination: {host: ...}`.",
        ]
    );
    let warnings: Vec<String> = failed.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        [
            "tests/fixtures/misspelt.yaml:19:5: spec.http[0].timeOut is not a field umbra knows and is ignored; did you mean `timeout`? Fix the spelling.",
            "tests/fixtures/misspelt.yaml:21:7: spec.http[0].route[0].destinaton is not a field umbra knows and is ignored; did you mean `destination`? Fix the spelling.",
            "tests/fixtures/misspelt.yaml:23:7: spec.http[1].route[0].Destination is not a field umbra knows and is ignored; did you mean `destination`? Fix the spelling.",
            "tests/fixtures/misspelt.yaml:24:7: spec.http[1].route[0].wieght is not a field umbra knows and is ignored; did you mean `weight`? Fix the spelling.",
            "tests/fixtures/misspelt.yaml:25:3: spec.tcp is not supported by umbra yet and is ignored",
        ]
    );
}

#[test]
fn istio_fields_umbra_does_not_implement_are_not_taken_for_typos() {
    let config = loads("istio-fields.yaml");
    assert_eq!(config.warnings.len(), 31, "{:#?}", config.warnings);
    for warning in &config.warnings {
        assert!(
            warning
                .message
                .ends_with("is not supported by umbra yet and is ignored")
                || warning
                    .message
                    .contains("is not supported by umbra yet and is ignored;"),
            "{warning}"
        );
    }
}

#[test]
fn fault_rules_istio_refuses_are_errors() {
    assert_eq!(
        errors("faults.yaml"),
        [
            "tests/fixtures/faults.yaml:8:12: spec.http[0].fault has neither `delay` nor `abort`. Add one, e.g. `abort: {httpStatus: 503, percentage: {value: 10}}`, or remove `fault`.",
            "tests/fixtures/faults.yaml:11:14: spec.http[1].fault.delay has no `fixedDelay`. Add one, e.g. `fixedDelay: 5s`.",
            "tests/fixtures/faults.yaml:14:27: spec.http[2].fault.delay.fixedDelay must be at least 1ms, as in Istio.",
            "tests/fixtures/faults.yaml:17:27: spec.http[3].fault.abort.httpStatus 700 is not an HTTP status from 200 to 599.",
            "tests/fixtures/faults.yaml:17:52: spec.http[3].fault.abort.percentage.value 150 is outside 0–100. Use a percentage such as 10.0.",
            "tests/fixtures/faults.yaml:20:27: spec.http[4].fault.abort.grpcStatus \"14\" is not a gRPC status name. Use one of OK, CANCELLED, UNKNOWN, INVALID_ARGUMENT, DEADLINE_EXCEEDED, NOT_FOUND, ALREADY_EXISTS, PERMISSION_DENIED, RESOURCE_EXHAUSTED, FAILED_PRECONDITION, ABORTED, OUT_OF_RANGE, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS, UNAUTHENTICATED, in capitals, as Istio takes them.",
            "tests/fixtures/faults.yaml:23:44: spec.http[5].fault.abort sets both `httpStatus` and `grpcStatus`. Keep one.",
            "tests/fixtures/faults.yaml:26:14: spec.http[6].fault.abort has no `httpStatus`. Add one, e.g. `httpStatus: 503`, or `grpcStatus: UNAVAILABLE` for gRPC.",
        ]
    );
}

#[test]
fn redirects_and_direct_responses_istio_refuses_are_errors() {
    assert_eq!(
        errors("answers.yaml"),
        [
            "tests/fixtures/answers.yaml:8:15: spec.http[0].redirect changes nothing: Istio requires a `uri`, `authority`, `scheme` or `port`. Add the part of the URL to change.",
            "tests/fixtures/answers.yaml:9:15: spec.http[1] has both `route` and `redirect`, which Istio refuses: a route that answers itself forwards nothing. Keep one, in a route of its own.",
            "tests/fixtures/answers.yaml:9:41: spec.http[1].redirect.redirectCode 399 is not a redirect Istio sends. Use 301, 302, 303, 307 or 308.",
            "tests/fixtures/answers.yaml:11:24: spec.http[2].redirect.scheme \"ftp\" is not `http` or `https`, the two Istio takes.",
            "tests/fixtures/answers.yaml:11:35: spec.http[2].redirect.port 70000 is outside 1–65535.",
            "tests/fixtures/answers.yaml:12:31: spec.http[3].redirect sets both `port` and `derivePort`; Istio takes one. Keep one.",
            "tests/fixtures/answers.yaml:13:27: spec.http[4].redirect.authority \"bad host\" is not a host. Write it like `example.com` or `example.com:8443`.",
            "tests/fixtures/answers.yaml:13:51: spec.http[4].redirect.derivePort \"SOMETIMES\" is not one Istio knows. Write FROM_PROTOCOL_DEFAULT or FROM_REQUEST_PORT.",
            "tests/fixtures/answers.yaml:14:15: spec.http[5] has both `redirect` and `directResponse`, which Istio refuses. Keep one.",
            "tests/fixtures/answers.yaml:16:21: spec.http[6] has both `fault` and `directResponse`, which Istio refuses: there is nothing to inject a fault into. Keep one, in a route of its own.",
            "tests/fixtures/answers.yaml:16:30: spec.http[6].directResponse.status 700 is not an HTTP status from 200 to 599.",
            "tests/fixtures/answers.yaml:18:21: spec.http[7].directResponse has no `status`. Add one, e.g. `status: 503`.",
            "tests/fixtures/answers.yaml:19:41: spec.http[8].directResponse.body sets both `string` and `bytes`; Istio takes one. Keep one.",
            "tests/fixtures/answers.yaml:20:49: spec.http[9].directResponse.body.bytes is not base64 (Invalid symbol 32, offset 3.). Encode the body with `base64`, or write it as `string`.",
            "tests/fixtures/answers.yaml:21:5: spec.http[10] has no `route`, `redirect` or `directResponse`. Add at least one `route: [{destination: {host: ...}}]`.",
            "tests/fixtures/answers.yaml:22:21: spec.http[11].redirect.uri \"%PREFIX()%/v2\" uses `%PREFIX()%` (the Gateway API's prefix replacement), which umbra does not implement. Write the whole path.",
        ]
    );
}

/// Istio's documentation examples of `redirect` and `directResponse`,
/// and what they resolve to.
#[test]
fn redirects_and_direct_responses_load() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings}
spec:
  hosts: [ratings]
  http:
  - match:
    - uri:
        exact: /v1/getProductRatings
    redirect:
      uri: /v1/bookRatings
      authority: newratings.default.svc.cluster.local
  - match:
    - uri: {prefix: /moved}
    redirect: {scheme: https, derivePort: FROM_REQUEST_PORT, redirectCode: 308}
    mirror: {host: 127.0.0.1, port: {number: 9002}}
  - match:
    - uri:
        exact: /v1/getProductRatings
    directResponse:
      status: 503
      body:
        string: "unknown error"
  - directResponse: {status: 200, body: {bytes: aGk=}}
"#;
    let config = config::load_str("a.yaml", yaml).unwrap();
    let warnings: Vec<String> = config.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        ["a.yaml:17:13: spec.http[1] answers itself (`redirect` or `directResponse`), so its mirror is never sent: like Envoy, umbra mirrors only requests it forwards. Remove the mirror, or mirror from a route that forwards."]
    );
    let routes = &config.virtual_services[0].routes;
    assert!(routes
        .iter()
        .all(|r| r.destinations.is_empty() && r.mirrors.is_empty()));
    let Some(Answer::Redirect(redirect)) = &routes[0].answer else {
        panic!("{:?}", routes[0].answer);
    };
    assert_eq!(redirect.uri.as_deref(), Some("/v1/bookRatings"));
    assert_eq!(redirect.code, 301, "Istio's default");
    let Some(Answer::Redirect(redirect)) = &routes[1].answer else {
        panic!("{:?}", routes[1].answer);
    };
    assert_eq!(
        (redirect.scheme.as_deref(), &redirect.port, redirect.code),
        (Some("https"), &RedirectPort::FromRequest, 308)
    );
    let bodies: Vec<(u16, &[u8])> = routes[2..]
        .iter()
        .map(|route| match &route.answer {
            Some(Answer::Direct { status, body }) => (*status, &body[..]),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(bodies, [(503, &b"unknown error"[..]), (200, &b"hi"[..])]);
}

/// A lower-case method never matches (clients send capitals, matched
/// case-sensitively): said, not left to be found by a route that never
/// takes traffic.
#[test]
fn a_lower_case_method_match_is_warned_about() {
    let yaml = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: web}\nspec:\n  hosts: [web]\n  http:\n  - match: [{method: {exact: get}}, {method: {prefix: P}}]\n    route: [{destination: {host: 127.0.0.1, port: {number: 9001}}}]\n";
    let config = config::load_str("a.yaml", yaml).unwrap();
    let warnings: Vec<String> = config.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        ["a.yaml:7:22: spec.http[0].match[0].method \"get\" has lower-case letters, but methods are matched as sent, case-sensitively, and clients send them in capitals: it never matches. Write \"GET\"."]
    );
}

#[test]
fn rewrites_istio_refuses_are_errors() {
    let route = "    route: [{destination: {host: 127.0.0.1, port: {number: 9001}}}]\n";
    let rules = [
        "{}",
        "{uri: /a, uriRegexRewrite: {match: a, rewrite: b}}",
        "{uriRegexRewrite: {match: a, rewrite: \"\"}}",
        "{uriRegexRewrite: {match: \"(a\", rewrite: b}}",
    ];
    let http: String = (rules.iter())
        .map(|rule| format!("  - rewrite: {rule}\n{route}"))
        .collect();
    let yaml = format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: web}}\nspec:\n  hosts: [web]\n  http:\n{http}");
    let errors: Vec<String> = config::load_str("a.yaml", &yaml)
        .unwrap_err()
        .errors
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        errors,
        [
            "a.yaml:7:14: spec.http[0].rewrite changes nothing: Istio requires a `uri`, `uriRegexRewrite` or `authority`. Add one, or remove `rewrite`.",
            "a.yaml:9:14: spec.http[1].rewrite has both `uri` and `uriRegexRewrite`; Istio takes one. Keep one.",
            "a.yaml:11:32: spec.http[2].rewrite.uriRegexRewrite needs both `match` and `rewrite`, as in Istio. Add the missing one, e.g. `{match: ^/v1/(.*), rewrite: /v2/\\1}`.",
            "a.yaml:13:40: spec.http[3].rewrite.uriRegexRewrite.match \"(a\" is not a valid regular expression (unclosed group). Fix the pattern (RE2 syntax).",
        ]
    );
}

#[test]
fn cors_policies_istio_refuses_are_errors() {
    assert_eq!(
        errors("cors.yaml"),
        [
            "tests/fixtures/cors.yaml:8:33: spec.http[0].corsPolicy.allowOrigins[0] is empty. Set one of exact, prefix or regex.",
            "tests/fixtures/cors.yaml:8:58: spec.http[0].corsPolicy.allowMethods: \"FETCH\" is not a method Istio takes. Use GET, HEAD, POST, PUT, DELETE, CONNECT, OPTIONS, TRACE, PATCH or *.",
            "tests/fixtures/cors.yaml:10:33: spec.http[1].corsPolicy.allowOrigins[0].regex \"(unclosed\" is not a valid regular expression (unclosed group). Fix the pattern (RE2 syntax).",
            "tests/fixtures/cors.yaml:10:71: spec.http[1].corsPolicy.allowHeaders: \"bad header\" is not a valid header name. Use letters, digits and dashes.",
            "tests/fixtures/cors.yaml:12:26: spec.http[2].corsPolicy.maxAge \"1.5s\" has a fraction of a second; Istio takes whole seconds. Write it like `24h` or `600s`.",
            "tests/fixtures/cors.yaml:12:53: spec.http[2].corsPolicy.unmatchedPreflights \"DROP\" is not one Istio knows. Write FORWARD or IGNORE.",
            "tests/fixtures/cors.yaml:12:83: spec.http[2].corsPolicy.exposeHeaders: \"a:b\" is not a valid header name. Use letters, digits and dashes.",
            "tests/fixtures/cors.yaml:14:26: spec.http[3].corsPolicy.maxAge \"soon\" is not a duration. Write it like `1.5s`, `300ms` or `1m`.",
        ]
    );
}

/// Istio's `corsPolicy` example, as written in its reference, and the
/// header values it makes (joined as Istio joins them for Envoy).
#[test]
fn cors_policy_example_loads() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings}
spec:
  hosts: [ratings]
  http:
  - route:
    - destination: {host: 127.0.0.1, port: {number: 9001}}
    corsPolicy:
      allowOrigins:
      - exact: https://example.com
      allowMethods:
      - POST
      - GET
      allowCredentials: false
      allowHeaders:
      - X-Foo-Bar
      maxAge: "24h"
  - directResponse: {status: 200}
    corsPolicy: {allowOrigin: [https://old.example]}
"#;
    let config = config::load_str("a.yaml", yaml).unwrap();
    let warnings: Vec<String> = config.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        [
            "a.yaml:21:17: spec.http[1].corsPolicy is not applied: the route answers itself (`redirect` or `directResponse`), and Envoy's CORS filter runs only on routes that forward. Move it to the route that serves the resource.",
            "a.yaml:21:32: spec.http[1].corsPolicy.allowOrigin is deprecated in Istio; read as exact matches. Write `allowOrigins: [{exact: ...}]`.",
        ]
    );
    let routes = &config.virtual_services[0].routes;
    let cors = routes[0].cors.as_ref().expect("a CORS policy");
    assert_eq!(cors.methods.as_deref(), Some("POST,GET"));
    assert_eq!(cors.headers.as_deref(), Some("X-Foo-Bar"));
    assert_eq!(
        (cors.max_age, cors.credentials, cors.forward_unmatched),
        (Some(86400), false, true)
    );
    assert!(routes[1].cors.is_none());
}

/// Istio's fault injection task, as written there: a delay for one user,
/// an abort for every request.
#[test]
fn istio_fault_injection_examples_load() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: ratings
spec:
  hosts:
  - ratings
  http:
  - match:
    - headers:
        end-user:
          exact: jason
    fault:
      delay:
        percentage:
          value: 100.0
        fixedDelay: 7s
    route:
    - destination:
        host: 127.0.0.1
        port: {number: 9001}
  - fault:
      abort:
        percentage:
          value: 0.1
        httpStatus: 500
    route:
    - destination:
        host: 127.0.0.1
        port: {number: 9001}
"#;
    let config = config::load_str("ratings.yaml", yaml).unwrap_or_else(|e| panic!("{e}"));
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
    let routes = &config.virtual_services[0].routes;
    let delay = routes[0]
        .fault
        .as_ref()
        .and_then(|f| f.delay.as_ref())
        .unwrap();
    assert_eq!(
        (delay.fixed, delay.per_million),
        (Duration::from_secs(7), 1_000_000)
    );
    let abort = routes[1]
        .fault
        .as_ref()
        .and_then(|f| f.abort.as_ref())
        .unwrap();
    assert_eq!(abort.reply, AbortReply::Http(500));
    assert_eq!(abort.per_million, 1_000);
    let summary = config::summary(&config);
    assert!(summary.contains("fault: 100% delayed 7s"), "{summary}");
    assert!(
        summary.contains("fault: 0.1% aborted with HTTP 500"),
        "{summary}"
    );
}

#[test]
fn wrong_types_name_the_field() {
    assert_eq!(
        errors("wrong-type.yaml"),
        ["tests/fixtures/wrong-type.yaml:10:15: spec.http[0].route[0].weight: expected a whole number. Fix the value's type."]
    );
}

#[test]
fn every_error_is_collected_across_documents() {
    assert_eq!(
        errors("many-errors.yaml"),
        [
            "tests/fixtures/many-errors.yaml:8:14: spec.http[0].timeout \"soon\" is not a duration. Write it like `1.5s`, `300ms` or `1m`.",
            "tests/fixtures/many-errors.yaml:9:25: spec.http[0].retries.attempts -1 is negative. Use 0 to turn retries off, or a small count such as 2.",
            "tests/fixtures/many-errors.yaml:12:15: spec.http[0].route[0].weight -5 is not a weight. Use a whole number from 0 to 2147483647 (weights are relative: 1 and 3 send a quarter and three quarters).",
            "tests/fixtures/many-errors.yaml:17:9: VirtualService \"second\" has no spec.hosts. Add the host names it serves, e.g. `hosts: [second]`.",
            "tests/fixtures/many-errors.yaml:21:20: spec.http[0].route[0].destination.host is missing. Set the destination's `host`.",
        ]
    );
}

#[test]
fn unsupported_fields_kinds_and_deprecations_warn() {
    let config = loads("warnings.yaml");
    let warnings: Vec<String> = config.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        [
            "tests/fixtures/warnings.yaml:2:7: skipping Gateway \"ingress\": umbra reads VirtualService, DestinationRule, ServiceEntry, WorkloadEntry and ShadowAnalysis",
            "tests/fixtures/warnings.yaml:13:31: annotation umbra.io/mirror-smapling is not known to umbra and is ignored (known: umbra.io/mirror-sampling, umbra.io/shadow-host-suffix, umbra.io/mirror-methods, umbra.io/mirror-remove-headers, umbra.io/mirror-max-body-bytes)",
            "tests/fixtures/warnings.yaml:18:14: spec.http[0].fault.delay has no percentage, which Istio reads as 0: no request gets it. Add `percentage: {value: 100}` for every request.",
            "tests/fixtures/warnings.yaml:22:21: spec.http[0].mirror_percent is deprecated. Use `mirrorPercentage: {value: 50}`.",
            "tests/fixtures/warnings.yaml:31:72: spec.trafficPolicy.outlierDetection.interval is not supported by umbra yet and is ignored; an ejected endpoint comes back once its ejection time is up, and none is let back early for the destination's health",
            "tests/fixtures/warnings.yaml:32:10: spec.trafficPolicy.tls has no mode, so it is DISABLE (plaintext), as in Istio. Set `mode: SIMPLE` (or MUTUAL) to originate TLS.",
            "tests/fixtures/warnings.yaml:33:5: spec.trafficPolicy.proxyProtocol is not supported by umbra yet and is ignored",
            "tests/fixtures/warnings.yaml:46:20: spec.http[0].mirrorPercent is deprecated. Use `mirrorPercentage: {value: 20}`.",
            "tests/fixtures/warnings.yaml:50:23: spec.http[1].mirrorPercentage.value is not set, which Istio reads as 0: nothing is mirrored. Set it, e.g. `value: 100`.",
            "tests/fixtures/warnings.yaml:55:21: spec.http[2].mirror_percent is deprecated. `mirrorPercentage` is set too and is the one used, as in Istio: drop this one.",
            "tests/fixtures/warnings.yaml:66:22: spec.http[0].match[0].ignoreUriCase has no effect on a regex uri, as in Istio: the regex is matched case-sensitively. Make the regex itself case-insensitive with `(?i)`, or drop `ignoreUriCase`.",
            "tests/fixtures/warnings.yaml:69:37: spec.http[0].retries.retryOn \"unavailable\" is a gRPC condition, which never applies in umbra: gRPC calls carry a body, and umbra replays only bodiless requests. Ignored.",
            "tests/fixtures/warnings.yaml:72:25: spec.http[1].retries.attempts 50 sends a failing request up to 51 times, each try waiting for the last; under load only the DestinationRule's `connectionPool.http.maxRetries` bounds retries. Use a small count such as 2.",
        ]
    );
    let route = &config.virtual_services[0].routes[0];
    assert_eq!(route.mirrors[0].per_million, 500_000);
    let cart = &config.virtual_services[1].routes;
    assert_eq!(cart[0].mirrors[0].per_million, 200_000);
    assert_eq!(
        cart[1].mirrors[0].per_million, 0,
        "`{{}}` is 0, as in Istio"
    );
    assert_eq!(
        cart[2].mirrors[0].per_million, 50_000,
        "mirrorPercentage wins"
    );
    // A status code in `retryOn` is one to retry on, as Istio reads it.
    let retries = config.virtual_services[2].routes[0].retries.as_ref();
    assert_eq!(
        retries.map(|r| r.retry_on.statuses.clone()),
        Some(vec![503])
    );
    let backoff = |route: usize| {
        let retries = config.virtual_services[2].routes[route].retries.as_ref();
        retries.map(|r| r.backoff)
    };
    assert_eq!(backoff(0), Some(Duration::from_millis(25)), "Envoy's");
    assert_eq!(backoff(1), Some(Duration::from_millis(100)));
}

/// Envoy's fully jittered exponential back-off: a random time under a
/// ceiling that doubles per retry from the base, up to ten times it.
#[test]
fn retry_backoff_is_jittered_and_capped() {
    let policy = RetryPolicy {
        attempts: 9,
        per_try_timeout: None,
        retry_on: Default::default(),
        backoff: Duration::from_millis(25),
    };
    let ceilings: Vec<u64> = (1..=6)
        .map(|retry| policy.backoff(retry, 1.0).as_millis() as u64)
        .collect();
    assert_eq!(ceilings, [25, 50, 100, 200, 250, 250]);
    assert_eq!(policy.backoff(3, 0.5), Duration::from_millis(50));
    assert_eq!(policy.backoff(1, 0.0), Duration::ZERO);
}

#[test]
fn routes_sharing_a_name_warn_that_they_are_counted_as_one() {
    // Metrics and the shadow analysis know a route by its name alone.
    let config = loads("shared-route-names.yaml");
    let warnings: Vec<String> = config.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        [
            "tests/fixtures/shared-route-names.yaml:18:11: route name `primary` (spec.http[0] of VirtualService \"shop\") is already used at tests/fixtures/shared-route-names.yaml:7, so their metrics and shadow analysis are counted as one route. Give each route its own `name`.",
            "tests/fixtures/shared-route-names.yaml:31:18: route name `shop.http[0]` (spec.http[0] of VirtualService \"shop\") is already used at tests/fixtures/shared-route-names.yaml:23, so their metrics and shadow analysis are counted as one route. Give each route its own `name`.",
        ]
    );
}

/// A host name with no ServiceEntry is kept as the endpoint, to be
/// resolved at each connection: never at load (no DNS query there, no
/// warning, no route left without an endpoint if it did not resolve).
#[test]
fn a_host_without_a_service_entry_is_dialled_by_name() {
    let yaml = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: web}\nspec:\n  hosts: [web]\n  http:\n  - route: [{destination: {host: orders.example.invalid, port: {number: 8080}}}]\n";
    let config = config::load_str("a.yaml", yaml).unwrap();
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
    let primary = &config.virtual_services[0].routes[0].destinations[0].destination;
    let endpoints: Vec<(&str, u16)> = (primary.endpoints.iter())
        .map(|e| (e.address.as_str(), e.port))
        .collect();
    assert_eq!(endpoints, [("orders.example.invalid", 8080)]);
}

/// A host no connection can be made to (a name with a space, a path) is
/// told of at load: dialled by name, it would fail every request with 503
/// and nothing to say why.
#[test]
fn a_host_without_a_service_entry_that_cannot_be_dialled_warns() {
    let yaml = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: web}\nspec:\n  hosts: [web]\n  http:\n  - route: [{destination: {host: orders service, port: {number: 8080}}}]\n";
    let config = config::load_str("a.yaml", yaml).unwrap();
    let warnings: Vec<String> = config.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        ["a.yaml:7:34: spec.http[0].route[0].destination: host \"orders service\" has no ServiceEntry and is not a host name or an IP address, so it cannot be dialled: requests to it get 503. Correct the host, or add a ServiceEntry with endpoints."]
    );
}

#[test]
fn seed_example_resolves_through_labels() {
    let config = config::load(&["examples/httpbin"]).unwrap();
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
    let route = &config.virtual_services[0].routes[0];
    let primary = &route.destinations[0].destination;
    assert_eq!(primary.key, "httpbin|v1|8000");
    assert_eq!(primary.endpoints.len(), 1);
    assert_eq!(
        (
            primary.endpoints[0].address.as_str(),
            primary.endpoints[0].port
        ),
        ("127.0.0.1", 8001)
    );
    let mirror = &route.mirrors[0];
    assert_eq!(mirror.per_million, 1_000_000);
    assert_eq!(mirror.label, "httpbin/v2");
    assert_eq!(mirror.destination.endpoints[0].port, 8002);
    assert!(route.mirror_policy.host_suffix);
}

#[test]
fn workload_entries_policies_and_multiple_documents() {
    let yaml = r#"
apiVersion: networking.istio.io/v1beta1
kind: WorkloadEntry
metadata: {name: vm-1, namespace: shop}
spec:
  address: 10.0.0.7
  ports: {web: 9090}
  labels: {app: cart, version: v2}
---
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: cart, namespace: shop}
spec:
  hosts: [cart.shop.svc.cluster.local]
  ports: [{number: 80, name: web, protocol: HTTP2, targetPort: 8080}]
  resolution: STATIC
  workloadSelector: {labels: {app: cart}}
  endpoints:
  - {address: 10.0.0.5, labels: {app: cart, version: v1}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: cart, namespace: shop}
spec:
  host: cart
  trafficPolicy:
    loadBalancer: {simple: LEAST_REQUEST}
    connectionPool:
      tcp: {connectTimeout: 250ms, maxConnections: 100}
      http: {http1MaxPendingRequests: 64, http2MaxRequests: 0, idleTimeout: 30s}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      loadBalancer: {simple: RANDOM}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: cart, namespace: shop}
spec:
  hosts: [cart]
  http:
  - name: split
    route:
    - destination: {host: cart, subset: v1}
      weight: 90
    - destination: {host: cart.shop.svc.cluster.local, subset: v2}
      weight: 10
"#;
    let config = config::load_str("inline.yaml", yaml).unwrap();
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
    let route = &config.virtual_services[0].routes[0];
    assert_eq!(route.name, "split");
    let v1 = &route.destinations[0].destination;
    assert_eq!(v1.endpoints[0].address, "10.0.0.5");
    assert_eq!(v1.endpoints[0].port, 8080, "targetPort applies");
    assert_eq!(v1.lb, LoadBalancer::LeastRequest);
    assert_eq!(v1.protocol, UpstreamProtocol::Http2);
    assert_eq!(v1.pool.connect_timeout.as_millis(), 250);
    assert_eq!(v1.pool.max_pending_requests, Some(64));
    assert_eq!(v1.pool.max_connections, Some(100));
    assert_eq!(v1.pool.max_requests, None, "0 is unlimited, as in Istio");
    let v2 = &route.destinations[1].destination;
    assert_eq!(
        v2.endpoints[0].address, "10.0.0.7",
        "selected WorkloadEntry"
    );
    assert_eq!(v2.endpoints[0].port, 9090, "the workload's named port wins");
    assert_eq!(v2.lb, LoadBalancer::Random, "subset policy overrides");
}

#[test]
fn directories_load_every_yaml_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a}\nspec:\n  hosts: [a]\n  http:\n  - route: [{destination: {host: 127.0.0.1, port: {number: 1}}}]\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("b.yml"),
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: b}\nspec:\n  hosts: [b]\n  http:\n  - route: [{destination: {host: 127.0.0.1, port: {number: 2}}}]\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not yaml").unwrap();
    let config = config::load(&[dir.path()]).unwrap();
    let names: Vec<&str> = config
        .virtual_services
        .iter()
        .map(|v| v.name.as_str())
        .collect();
    assert_eq!(names, ["a", "b"]);
}

#[test]
fn shadow_analysis_resource_is_validated() {
    let base = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: web}\nspec:\n  hosts: [web]\n  http:\n  - route: [{destination: {host: 127.0.0.1, port: {number: 1}}}]\n    mirror: {host: 127.0.0.1, port: {number: 2}}\n---\n";
    let good = format!("{base}apiVersion: umbra.io/v1alpha1\nkind: ShadowAnalysis\nmetadata: {{name: web}}\nspec:\n  targetRef: {{kind: VirtualService, name: web}}\n  ignore: {{headers: [X-Trace], paths: [body.meta.id]}}\n  thresholds: {{relative: 0.3, latencyMargin: 250us}}\n  minSamples: 20\n  capture: {{maxBodyBytes: 1024}}\n");
    let config = config::load_str("a.yaml", &good).unwrap();
    let settings = &config.analysis["web"];
    assert_eq!(settings.ignore_headers, ["x-trace"]);
    assert_eq!(settings.min_samples, 20);
    assert_eq!(settings.max_capture_bytes, 1024);
    assert!((settings.relative_threshold - 0.3).abs() < 1e-9);
    assert_eq!(settings.latency_margin, Duration::from_micros(250));

    let bad = format!("{base}apiVersion: umbra.io/v1alpha1\nkind: ShadowAnalysis\nmetadata: {{name: web}}\nspec:\n  targetRef: {{name: nope}}\n  minSamples: 0\n  thresholds: {{latencyMargin: 1 ms}}\n");
    let errors: Vec<String> = config::load_str("a.yaml", &bad)
        .unwrap_err()
        .errors
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        errors,
        [
            "a.yaml:14:21: spec.targetRef.name \"nope\" is not a VirtualService in this config (known: web). Fix the name.",
            "a.yaml:15:15: spec.minSamples 0 must be at least 1.",
            "a.yaml:16:31: spec.thresholds.latencyMargin \"1 ms\" is not a duration. Write it like `1.5s`, `300ms` or `1m`.",
        ]
    );
}

#[test]
fn junk_never_panics() {
    let samples = [
        "",
        "---\n---\n",
        "- a\n- b\n",
        "kind: VirtualService\n",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: x}\nspec: 7\n",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: x}\nspec:\n  hosts: [x]\n  http:\n  - route:\n    - destination: {host: 127.0.0.1, port: {number: 99999999999}}\n",
        "a: &x 1\nb: *x\n",
        "{{{{",
        "\u{0}\u{1}\u{2}",
        "kind: [1, {a: b}]\nspec: {http: [[[]]]}\n",
    ];
    for text in samples {
        let _ = config::load_str("junk.yaml", text);
    }
    let deep = "a:\n".to_string() + &"  ".repeat(200) + "b: 1\n";
    let _ = config::load_str("deep.yaml", &deep);
}

#[test]
fn validate_prints_routes_and_exits_zero() {
    let output = Command::new(env!("CARGO_BIN_EXE_umbra"))
        .args(["validate", "-c", "examples/httpbin"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("VirtualService default/httpbin  hosts: httpbin"),
        "{stdout}"
    );
    assert!(stdout.contains("100%  httpbin|v1|8000"), "{stdout}");
    assert!(stdout.contains("endpoints: 127.0.0.1:8001"), "{stdout}");
    assert!(
        stdout.contains("mirror 100% to httpbin|v2|8000"),
        "{stdout}"
    );
}

#[test]
fn validate_prints_a_destinations_circuit_breaker() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("cb.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a}\nspec:\n  hosts: [a]\n  http:\n  - route: [{destination: {host: 127.0.0.1, port: {number: 9}}}]\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: a}\nspec:\n  host: 127.0.0.1\n  trafficPolicy: {connectionPool: {tcp: {maxConnections: 4}, http: {http1MaxPendingRequests: 0, maxRequestsPerConnection: 9, maxRetries: 3}}, outlierDetection: {consecutiveGatewayErrors: 2}, tls: {mode: SIMPLE, sni: a.internal}}\n",
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_umbra"))
        .args(["validate", "-c"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains(
            "[RoundRobin, Http1, maxConnections 4, maxRequestsPerConnection 9, maxRetries 3, outlierDetection 5×5xx 2×gateway for 30s up to 10%, TLS SIMPLE sni a.internal]"
        ),
        "0 pending is unlimited, so not shown: {stdout}"
    );
}

#[test]
fn validate_and_run_exit_64_on_errors() {
    let validate = Command::new(env!("CARGO_BIN_EXE_umbra"))
        .args(["validate", "-c", "tests/fixtures/many-errors.yaml"])
        .output()
        .unwrap();
    assert_eq!(validate.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&validate.stderr);
    let located = stderr
        .lines()
        .filter(|l| l.starts_with("tests/fixtures/many-errors.yaml:"))
        .count();
    assert_eq!(located, 5, "{stderr}");

    let run = Command::new(env!("CARGO_BIN_EXE_umbra"))
        .args([
            "run",
            "-c",
            "tests/fixtures/weights.yaml",
            "-l",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&run.stderr).contains("weights.yaml:9:7: weights of"));
}

#[test]
fn tls_errors_name_the_field_and_the_fix() {
    assert_eq!(
        errors("tls-errors.yaml"),
        [
            "tests/fixtures/tls-errors.yaml:20:43: spec.subsets[0].trafficPolicy.tls.caCertificates \"tests/fixtures/no-such-ca.pem\": No such file or directory (os error 2). Point it at a readable PEM file.",
            "tests/fixtures/tls-errors.yaml:24:19: spec.subsets[1].trafficPolicy.tls.mode ISTIO_MUTUAL needs Istio's workload certificates, which umbra has no way to get. Use MUTUAL with clientCertificate, privateKey and caCertificates files.",
            "tests/fixtures/tls-errors.yaml:28:12: spec.subsets[2].trafficPolicy.tls.mode MUTUAL needs both clientCertificate and privateKey. Set them to PEM files, or use mode SIMPLE.",
            "tests/fixtures/tls-errors.yaml:32:43: spec.subsets[3].trafficPolicy.tls.credentialName names a Kubernetes secret, which umbra cannot read. Use the file fields instead: caCertificates (and clientCertificate, privateKey for MUTUAL).",
            "tests/fixtures/tls-errors.yaml:32:58: spec.subsets[3].trafficPolicy.tls.sni \"not a name!\" is not a DNS name or IP address, the only names umbra can check a certificate for. Use one.",
            "tests/fixtures/tls-errors.yaml:36:19: spec.subsets[4].trafficPolicy.tls.mode STRICT is not valid. Use DISABLE, SIMPLE or MUTUAL.",
            "tests/fixtures/tls-errors.yaml:40:43: spec.subsets[5].trafficPolicy.tls.caCertificates \"tests/fixtures/tls-errors.yaml\" holds no PEM certificate. Point it at a PEM file with `-----BEGIN CERTIFICATE-----` blocks.",
            "tests/fixtures/tls-errors.yaml:40:67: spec.subsets[5].trafficPolicy.tls.caCrl \"tests/fixtures/tls-errors.yaml\" holds no PEM revocation list. Point it at a PEM file with `-----BEGIN X509 CRL-----` blocks.",
            // A subset no route uses, and a port no route reaches.
            "tests/fixtures/tls-errors.yaml:44:43: spec.subsets[6].trafficPolicy.tls.caCertificates \"tests/fixtures/unrouted-ca.pem\": No such file or directory (os error 2). Point it at a readable PEM file.",
            "tests/fixtures/tls-errors.yaml:47:14: spec.subsets[6].trafficPolicy.portLevelSettings[0].tls.mode MUTUAL needs both clientCertificate and privateKey. Set them to PEM files, or use mode SIMPLE.",
            "tests/fixtures/tls-errors.yaml:47:45: spec.subsets[6].trafficPolicy.portLevelSettings[0].tls.caCertificates \"tests/fixtures/tls-errors.yaml\" holds no PEM certificate. Point it at a PEM file with `-----BEGIN CERTIFICATE-----` blocks.",
            // Once, though both subsets' destinations read the rule's tls.
            "tests/fixtures/tls-errors.yaml:83:41: spec.trafficPolicy.tls.caCertificates \"tests/fixtures/web-ca.pem\": No such file or directory (os error 2). Point it at a readable PEM file.",
            // A rule for hosts no route uses yet; its wildcard host is no
            // SNI, but a destination's own host would be.
            "tests/fixtures/tls-errors.yaml:104:41: spec.trafficPolicy.tls.caCertificates \"tests/fixtures/unrouted-ca.pem\": No such file or directory (os error 2). Point it at a readable PEM file.",
            "tests/fixtures/tls-errors.yaml:104:76: spec.trafficPolicy.tls.subjectAltNames \"bad name\" is not a DNS name or IP address, the only names umbra can check a certificate for. Use one.",
        ]
    );
}

#[test]
fn an_https_port_without_tls_origination_warns() {
    let config = loads("https-port.yaml");
    let warnings: Vec<String> = config.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        ["tests/fixtures/https-port.yaml:6:48: ServiceEntry \"payments\" port 443 is HTTPS, but umbra would send it plaintext HTTP: no DestinationRule gives it trafficPolicy.tls with mode SIMPLE or MUTUAL. Add `tls: {mode: SIMPLE}` to one, or declare the port HTTP."]
    );
}

#[test]
fn run_refuses_unreadable_or_unpaired_tls_certificates_and_a_zero_idle_limit() {
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_umbra"))
            .args(["run", "-c", "examples/httpbin", "--admin", "127.0.0.1:0"])
            .args(extra)
            .output()
            .unwrap()
    };
    let missing = run(&[
        "--tls-listen",
        "127.0.0.1:0",
        "--tls-cert",
        "tests/fixtures/no-such-cert.pem",
        "--tls-key",
        "tests/fixtures/no-such-key.pem",
    ]);
    assert_eq!(missing.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.contains("umbra: --tls-cert tests/fixtures/no-such-cert.pem: "),
        "{stderr}"
    );
    let zero = run(&["--header-read-timeout", "0"]);
    assert_eq!(zero.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&zero.stderr).contains("would close every connection at once"));
    // A TLS listener needs both files: clap's usage error.
    let half = run(&["--tls-listen", "127.0.0.1:0", "--tls-cert", "x.pem"]);
    assert_eq!(half.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&half.stderr).contains("--tls-key"));
    // Certificates and keys pair up in order.
    let unpaired = run(&[
        "--tls-listen",
        "127.0.0.1:0",
        "--tls-cert",
        "a.pem",
        "--tls-cert",
        "b.pem",
        "--tls-key",
        "a.key",
    ]);
    assert_eq!(unpaired.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&unpaired.stderr).contains(
        "umbra: 2 --tls-cert but 1 --tls-key: give each certificate its key, in the same order"
    ));
    // --tls-client-optional only means something with a client CA.
    let optional = run(&["--tls-client-optional"]);
    assert_eq!(optional.status.code(), Some(2));
}

#[test]
fn a_wildcard_rule_originates_tls_unless_a_host_rule_disables_it() {
    let config = loads("tls-rules.yaml");
    let routes = &config.virtual_services[0].routes;
    let pay = &routes[0].destinations[0].destination;
    let plain = &routes[1].destinations[0].destination;
    let api = &routes[2].destinations[0].destination;
    let tls = api
        .tls
        .as_ref()
        .expect("*.example.com covers api.example.com, on port 443 by portLevelSettings");
    assert_eq!((tls.mode, tls.sni.as_str()), ("SIMPLE", "api.example.com"));
    assert_eq!(
        api.pool.max_connections, None,
        "a port-level entry replaces the rule's policy: its connectionPool is not inherited"
    );
    assert!(plain.tls.is_none(), "port 80 has no port-level entry");
    assert_eq!(plain.pool.max_connections, Some(7), "the rule's own policy");
    assert!(
        pay.tls.is_none(),
        "the host's own rule wins over the wildcard"
    );
    let warnings: Vec<String> = config.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        ["tests/fixtures/tls-rules.yaml:7:42: ServiceEntry \"external\" port 443 is HTTPS, but umbra would send it plaintext HTTP: no DestinationRule gives it trafficPolicy.tls with mode SIMPLE or MUTUAL. Add `tls: {mode: SIMPLE}` to one, or declare the port HTTP."]
    );
}

/// `portLevelSettings` as Istio merges them: an entry for the port replaces
/// the policy it is in (what it leaves out is default), the first entry
/// for a port wins, and a subset's sections override the rule's unless the
/// subset has a port-level entry, which replaces the rule's wholesale.
#[test]
fn port_level_settings_replace_the_policy_on_their_port() {
    let config = loads("port-level.yaml");
    let routes = &config.virtual_services[0].routes;
    let at = |route: usize| &routes[route].destinations[0].destination;
    let (v1, v1_admin, v2_admin, v3) = (at(0), at(1), at(2), at(4));
    let single = at(3)
        .tls
        .as_ref()
        .expect("the only port of the ServiceEntry");
    assert_eq!(single.mode, "SIMPLE");
    assert_eq!(
        (v1.lb, v1.pool.max_connections),
        (LoadBalancer::Random, Some(5))
    );
    assert_eq!(
        (v1_admin.lb, v1_admin.pool.max_connections),
        (LoadBalancer::RoundRobin, Some(9)),
        "port 8443: the first entry, without the rule's loadBalancer"
    );
    assert_eq!(
        (v2_admin.lb, v2_admin.pool.max_connections),
        (LoadBalancer::LeastRequest, Some(9)),
        "the subset's loadBalancer over the rule's port-level policy"
    );
    let tls = v3.tls.as_ref().expect("the subset's port-level tls");
    assert_eq!((tls.mode, tls.sni.as_str()), ("SIMPLE", "v3.internal"));
    assert_eq!(
        (v3.lb, v3.pool.max_connections),
        (LoadBalancer::RoundRobin, None),
        "the subset's port-level entry replaces both its own sections and the rule's"
    );
    let outlier = |d: &umbra::config::model::Destination| d.outlier.clone();
    let three = umbra::config::model::OutlierPolicy {
        consecutive_5xx: 3,
        ..Default::default()
    };
    assert_eq!(outlier(v1_admin), Some(three.clone()), "the port's own");
    assert_eq!(outlier(v2_admin), Some(three), "the rule's port-level");
    assert_eq!(outlier(v1), None, "not on the other port");
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
}

#[test]
fn port_level_settings_need_a_port() {
    assert_eq!(
        errors("port-level-errors.yaml"),
        [
            "tests/fixtures/port-level-errors.yaml:8:7: spec.trafficPolicy.portLevelSettings[0] has no port.number. Set `port: {number: N}`, N from 1 to 65535: the destination port these settings are for.",
            "tests/fixtures/port-level-errors.yaml:9:23: spec.trafficPolicy.portLevelSettings[1] port.number 0 is not a valid port. Set `port: {number: N}`, N from 1 to 65535: the destination port these settings are for.",
            "tests/fixtures/port-level-errors.yaml:17:20: ServiceEntry \"big\" port number 65616 is not a valid port. Use 1 to 65535.",
        ]
    );
}

/// SIGHUP reloads even with `--no-watch`, instead of ending the process
/// (the signal's default action when nothing handles it).
#[cfg(target_os = "linux")]
#[test]
fn sighup_reloads_without_watching() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    use std::sync::mpsc;
    let mut child = Command::new(env!("CARGO_BIN_EXE_umbra"))
        .args(["run", "-c", "examples/httpbin", "-l", "127.0.0.1:0"])
        .args(["--admin", "127.0.0.1:0", "--no-watch", "--workers", "1"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let (lines, seen) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let patience = std::time::Duration::from_secs(10);
    let wait_for = |text: &str| loop {
        match seen.recv_timeout(patience) {
            Ok(line) if line.contains(text) => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
    };
    assert!(wait_for("ready"), "umbra started");
    // SAFETY: a plain kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    let reloaded = wait_for("config reloaded");
    let alive = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    assert!(reloaded && alive, "SIGHUP reloaded and umbra kept running");
}

#[test]
fn every_destination_rule_is_checked_used_or_not() {
    // As `istioctl analyze` does: a rule no route reaches yet is checked
    // too, its subsets and port-level entries included, and a used rule's
    // errors are reported once however many destinations read it.
    let at = |line_col: &str, text: &str| {
        format!("tests/fixtures/unused-rule-errors.yaml:{line_col}: {text}")
    };
    let not_a_duration = |field: &str, value: &str| {
        format!("{field} \"{value}\" is not a duration. Write it like `1.5s`, `300ms` or `1m`.")
    };
    assert_eq!(
        errors("unused-rule-errors.yaml"),
        [
            at("8:29", &not_a_duration("connectionPool.tcp.connectTimeout", "soon")),
            at("9:31", "h2UpgradePolicy SOMETIMES is not valid. Use DEFAULT, DO_NOT_UPGRADE or UPGRADE."),
            at("16:69", &not_a_duration("connectionPool.http.idleTimeout", "forever")),
            at("17:9", "spec.subsets[0].trafficPolicy.portLevelSettings[1] has no port.number. Set `port: {number: N}`, N from 1 to 65535: the destination port these settings are for."),
            at("25:44", &not_a_duration("connectionPool.tcp.connectTimeout", "1x")),
            at("27:69", &not_a_duration("connectionPool.tcp.connectTimeout", "banana")),
        ]
    );
}

/// Mirror targets are named `host/subset`; two that differ only by port get
/// the port in their names, so their metrics and analyses stay apart.
#[test]
fn mirror_targets_differing_by_port_are_named_apart() {
    let yaml = r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api}
spec:
  hosts: [api]
  ports: [{number: 80, name: http, protocol: HTTP}, {number: 81, name: alt, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api}
spec:
  host: api
  subsets: [{name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api}
spec:
  hosts: [api]
  http:
  - route: [{destination: {host: 127.0.0.1, port: {number: 9001}}}]
    mirrors:
    - destination: {host: api, subset: v2, port: {number: 80}}
    - destination: {host: api, subset: v2, port: {number: 81}}
  - route: [{destination: {host: 127.0.0.1, port: {number: 9001}}}]
    mirror: {host: api, subset: v2, port: {number: 80}}
"#;
    let config = config::load_str("ports.yaml", yaml).unwrap_or_else(|e| panic!("{e}"));
    let labels: Vec<&str> = (config.virtual_services[0].routes.iter())
        .flat_map(|route| route.mirrors.iter().map(|m| m.label.as_str()))
        .collect();
    assert_eq!(labels, ["api:80/v2", "api:81/v2", "api:80/v2"]);
}

/// `outlierDetection` with Istio's defaults for what it leaves out; a
/// `maxEjectionPercent` of 0 is left out too, as Istio passes on only a
/// percentage above 0.
#[test]
fn outlier_detection_takes_istios_defaults() {
    let yaml = |outlier: &str| {
        format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: a}}\nspec:\n  hosts: [a]\n  http:\n  - route: [{{destination: {{host: 127.0.0.1, port: {{number: 9}}}}}}]\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: a}}\nspec:\n  host: 127.0.0.1\n  trafficPolicy: {{outlierDetection: {outlier}}}\n")
    };
    let outlier = |text: &str| {
        let config = config::load_str("o.yaml", &yaml(text)).unwrap_or_else(|e| panic!("{e}"));
        let route = &config.virtual_services[0].routes[0];
        route.destinations[0].destination.outlier.clone().unwrap()
    };
    let defaults = umbra::config::model::OutlierPolicy::default();
    assert_eq!(outlier("{}"), defaults);
    assert_eq!(outlier("{maxEjectionPercent: 0}"), defaults);
    let set =
        outlier("{consecutiveGatewayErrors: 3, baseEjectionTime: 2m, maxEjectionPercent: 40}");
    assert_eq!(
        (
            set.consecutive_5xx,
            set.consecutive_gateway,
            set.base_ejection_time.as_secs(),
            set.max_ejection_percent
        ),
        (5, 3, 120, 40)
    );
}

#[test]
fn a_value_of_the_wrong_shape_is_placed_at_it_and_explained() {
    assert_eq!(
        errors("wrong-shapes.yaml"),
        [
            "tests/fixtures/wrong-shapes.yaml:12:23: spec.http[1].mirrorPercentage: expected a mapping of fields, found `50`. Write `mirrorPercentage: {value: 50}`.",
            "tests/fixtures/wrong-shapes.yaml:23:7: spec.http[0].retries: expected a mapping of fields, found a list. Write `retries` as one mapping: drop the `- ` before its fields (or the `[...]` around them).",
            "tests/fixtures/wrong-shapes.yaml:32:7: spec.http[0].match: expected a list, found a mapping. Write it as a list: put `- ` before its first field (or wrap it in `[...]`).",
            "tests/fixtures/wrong-shapes.yaml:42:34: spec.http[0].match[0].headers.x-tenant: expected a mapping of fields, found a list. Write `x-tenant` as one mapping: drop the `- ` before its fields (or the `[...]` around them).",
            "tests/fixtures/wrong-shapes.yaml:53:29: spec.trafficPolicy.connectionPool.tcp.maxConnections: this field cannot be negative. Use 0 or more.",
            "tests/fixtures/wrong-shapes.yaml:63:9: spec.trafficPolicy.connectionPool.http: expected a mapping of fields, found a list. Write `http` as one mapping: drop the `- ` before its fields (or the `[...]` around them).",
        ]
    );
}

#[test]
fn endpoint_addresses_and_ports_umbra_cannot_dial_are_errors() {
    assert_eq!(
        errors("endpoint-errors.yaml"),
        [
            "tests/fixtures/endpoint-errors.yaml:7:58: spec.ports[0].targetPort 99999 is not a valid port. Use 1 to 65535.",
            "tests/fixtures/endpoint-errors.yaml:9:39: spec.endpoints[0].ports.http 70000 is not a valid port. Use 1 to 65535.",
            "tests/fixtures/endpoint-errors.yaml:10:15: spec.endpoints[1].address \"10.0.0.8:8080\" has a port. Write the address alone (`10.0.0.8`), and the port under `ports` (`ports: {http: 8080}`, by the ServiceEntry port's name) or as the port's `targetPort`.",
            "tests/fixtures/endpoint-errors.yaml:11:15: spec.endpoints[2].address \"not an address\" is neither an IP address nor a host name. Write the workload's IP address, e.g. `10.0.0.7`.",
            "tests/fixtures/endpoint-errors.yaml:12:15: spec.endpoints[3].address \"unix:///var/run/shop.sock\" is a Unix domain socket, which umbra cannot dial. Give the workload's TCP address.",
            "tests/fixtures/endpoint-errors.yaml:13:5: spec.endpoints[4] has no `address`. Set the workload's IP address (or host name); its port goes under `ports`.",
            "tests/fixtures/endpoint-errors.yaml:19:12: spec.address \"shop-vm.internal:9000\" has a port. Write the address alone (`shop-vm.internal`), and the port under `ports` (`ports: {http: 9000}`, by the ServiceEntry port's name) or as the port's `targetPort`.",
            "tests/fixtures/endpoint-errors.yaml:20:17: spec.ports.http 0 is not a valid port. Use 1 to 65535.",
        ]
    );
}

#[test]
fn retries_istio_refuses_are_errors() {
    let failed = config::load(&["tests/fixtures/retries.yaml"]).unwrap_err();
    let errors: Vec<String> = failed.errors.iter().map(ToString::to_string).collect();
    let warnings: Vec<String> = failed.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        errors,
        [
            "tests/fixtures/retries.yaml:10:7: spec.http[0].retries sets `perTryTimeout`, but without `attempts` (0) retries are off, so it would never apply (Istio refuses this too). Set `attempts`, e.g. `attempts: 3`, or drop `retries` for Istio's default of 2.",
            "tests/fixtures/retries.yaml:13:14: spec.http[1].retries sets `perTryTimeout` and `retryOn`, but `attempts: 0` turns retries off, so it would never apply (Istio refuses this too). Set `attempts`, e.g. `attempts: 3`, or drop `retries` for Istio's default of 2.",
            "tests/fixtures/retries.yaml:16:37: spec.http[2].retries.retryOn \"gateway-errors\" is not a retry condition (Istio refuses it too); did you mean `gateway-error`? Use conditions separated by commas: 5xx, gateway-error, connect-failure, reset, refused-stream, retriable-4xx, retriable-status-codes, HTTP status codes such as 503.",
            "tests/fixtures/retries.yaml:19:37: spec.http[3].retries.retryOn \"on-failure\" is not a retry condition (Istio refuses it too). Use conditions separated by commas: 5xx, gateway-error, connect-failure, reset, refused-stream, retriable-4xx, retriable-status-codes, HTTP status codes such as 503.",
        ]
    );
    assert_eq!(
        warnings,
        ["tests/fixtures/retries.yaml:22:37: spec.http[4].retries.retryOn \"reset-before-request\" is not supported by umbra yet and is ignored (supported: 5xx, gateway-error, connect-failure, reset, refused-stream, retriable-4xx, retriable-status-codes, HTTP status codes such as 503)"]
    );
}

#[test]
fn a_subset_of_a_host_without_a_service_entry_is_an_error() {
    // Both would reach reviews.internal:9080: the mirror would copy each
    // request back to the primary. A subset without labels selects all.
    assert_eq!(
        errors("subset-without-entry.yaml"),
        [
            "tests/fixtures/subset-without-entry.yaml:18:53: spec.http[0].route[0].destination.subset \"v1\" selects endpoints labelled {version: v1}, but host \"reviews.internal\" has no ServiceEntry whose endpoints carry labels: umbra would dial the host itself for every subset alike. Add a ServiceEntry for \"reviews.internal\" with labelled endpoints, or drop `subset`.",
            "tests/fixtures/subset-without-entry.yaml:19:46: spec.http[0].mirror.subset \"v2\" selects endpoints labelled {version: v2}, but host \"reviews.internal\" has no ServiceEntry whose endpoints carry labels: umbra would dial the host itself for every subset alike. Add a ServiceEntry for \"reviews.internal\" with labelled endpoints, or drop `subset`.",
        ]
    );
}

#[test]
fn a_matcher_with_only_misspelt_keys_is_an_error() {
    // Taken for `{}` ("present"), each would match any value: a canary
    // route for every request that has the header.
    assert_eq!(
        errors("misspelt-matcher.yaml"),
        [
            "tests/fixtures/misspelt-matcher.yaml:9:19: spec.http[0].match[0].headers.x-canary has `exatc` but none of exact, prefix and regex, so it would match any value, as `{}` does. Write `exact`, `prefix` or `regex`, or `{}` to match any value.",
            "tests/fixtures/misspelt-matcher.yaml:12:16: spec.http[0].match[0].queryParams.debug has `prefx` but none of exact, prefix and regex, so it would match any value, as `{}` does. Write `exact`, `prefix` or `regex`, or `{}` to match any value.",
            "tests/fixtures/misspelt-matcher.yaml:14:21: spec.http[0].match[0].withoutHeaders.x-internal has `regexp` but none of exact, prefix and regex, so it would match any value, as `{}` does. Write `exact`, `prefix` or `regex`, or `{}` to match any value.",
        ]
    );
}

#[test]
fn a_byte_order_mark_is_skipped_and_other_encodings_refused() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: café\nspec:\n  hosts: [a]\n  http:\n  - route: [{destination: {host: 127.0.0.1, port: {number: 1}}}]\n";
    let bom = dir.path().join("bom.yaml");
    std::fs::write(&bom, [b"\xef\xbb\xbf", yaml.as_bytes()].concat()).unwrap();
    let config = config::load(&[&bom]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.virtual_services[0].name, "café");
    let latin1 = dir.path().join("latin1.yaml");
    // `café` as Latin-1 writes it: a lone 0xE9.
    let (before, after) = yaml.split_once('é').unwrap();
    std::fs::write(
        &latin1,
        [before.as_bytes(), b"\xe9", after.as_bytes()].concat(),
    )
    .unwrap();
    let failed = config::load(&[&latin1]).unwrap_err();
    assert_eq!(
        failed.to_string(),
        format!("{}:4:12: the file is not UTF-8 (byte 0xE9 here is not valid UTF-8; Latin-1 or UTF-16 perhaps). Save it as UTF-8.", latin1.display())
    );
}

#[test]
fn references_to_a_resource_with_errors_are_not_errors_of_their_own() {
    // Not also "host shop has no ServiceEntry", "needs a DestinationRule
    // for host shop, and there is none" or "cart is not a VirtualService".
    assert_eq!(
        errors("broken-references.yaml"),
        [
            "tests/fixtures/broken-references.yaml:8:57: spec.endpoints[0].weight: expected a whole number. Fix the value's type.",
            "tests/fixtures/broken-references.yaml:15:12: spec.subsets: expected a list, found a mapping. Write it as a list: put `- ` before its first field (or wrap it in `[...]`).",
            "tests/fixtures/broken-references.yaml:36:14: spec.http[0].timeout \"soon\" is not a duration. Write it like `1.5s`, `300ms` or `1m`.",
        ]
    );
}

#[test]
fn subsets_need_a_name_of_their_own() {
    assert_eq!(
        errors("subset-names.yaml"),
        [
            "tests/fixtures/subset-names.yaml:8:11: spec.subsets[1].name \"v1\" is already the name of spec.subsets[0] (line 7); a route's `subset: v1` would only ever take that one. Rename or remove one.",
            "tests/fixtures/subset-names.yaml:10:5: spec.subsets[2] has no `name`, so no route can use it. Name it (routes pick it with `subset: NAME`), or remove it.",
        ]
    );
}

#[test]
fn a_second_destination_rule_for_a_host_is_an_error() {
    assert_eq!(
        errors("two-rules.yaml"),
        ["tests/fixtures/two-rules.yaml:16:9: DestinationRule \"httpbin-breaker\" is for host \"httpbin.default.svc.cluster.local\", as DestinationRule \"httpbin\" is (tests/fixtures/two-rules.yaml:5); umbra reads one rule per host, so this one would be ignored, subsets and trafficPolicy alike (Istio merges them: the subsets of both, the first's trafficPolicy). Merge them into one DestinationRule."]
    );
}

#[test]
fn a_host_two_virtual_services_name_warns_that_the_second_never_sees_it() {
    let config = loads("shared-hosts.yaml");
    let warnings: Vec<String> = config.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        [
            "tests/fixtures/shared-hosts.yaml:15:11: spec.hosts \"shop.default.svc.cluster.local\" is served by VirtualService \"shop-a\" already (tests/fixtures/shared-hosts.yaml:3), so requests for it never reach the routes of VirtualService \"shop-b\" (istioctl analyze reports this as IST0109). Merge the routes into one VirtualService.",
            "tests/fixtures/shared-hosts.yaml:15:43: spec.hosts \"*.example.com\" is served by VirtualService \"shop-a\" already (tests/fixtures/shared-hosts.yaml:3), so requests for it never reach the routes of VirtualService \"shop-b\" (istioctl analyze reports this as IST0109). Merge the routes into one VirtualService.",
        ]
    );
}

#[test]
fn a_kubectl_list_loads_its_items() {
    let config = loads("kubectl-list.yaml");
    assert!(config.warnings.is_empty(), "{:#?}", config.warnings);
    let summary = config::summary(&config);
    assert!(summary.contains("endpoints: 127.0.0.1:9001"), "{summary}");
    assert!(summary.contains("mirror 100% to shop|v2|"), "{summary}");
    // An item that is not a resource is placed in the list.
    let yaml = "apiVersion: v1\nkind: List\nitems:\n- just a string\n";
    let failed = config::load_str("list.yaml", yaml).unwrap_err();
    assert_eq!(
        failed.to_string(),
        "list.yaml:4:3: items[0] of this List is not a resource. Write each item as a mapping with apiVersion, kind, metadata and spec."
    );
}

#[test]
fn istios_circuit_breaking_rule_loads_and_says_what_it_ignores() {
    let config = loads("istio-circuit-breaking.yaml");
    let warnings: Vec<String> = config.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        [
            "tests/fixtures/istio-circuit-breaking.yaml:16:7: spec.trafficPolicy.outlierDetection.consecutiveErrors is not supported by umbra yet and is ignored; it is deprecated and Istio ignores it too, leaving the default of 5 consecutive 5xx: set `consecutiveGatewayErrors` (502, 503, 504 and failures to connect, what it counted) or `consecutive5xxErrors`",
            "tests/fixtures/istio-circuit-breaking.yaml:17:7: spec.trafficPolicy.outlierDetection.interval is not supported by umbra yet and is ignored; an ejected endpoint comes back once its ejection time is up, and none is let back early for the destination's health",
        ]
    );
}

#[test]
fn a_route_that_sets_the_authority_twice_is_an_error() {
    // The Host umbra sent was whichever it applied last (the header rule
    // over the rewrite). An empty `rewrite.authority` is none, as in Istio,
    // so that rewrite changes nothing, which Istio refuses.
    assert_eq!(
        errors("authority-twice.yaml"),
        [
            "tests/fixtures/authority-twice.yaml:8:31: spec.http[0].headers.request.set.Host sets the authority (the Host sent upstream), which `rewrite.authority` sets already; Istio refuses a route that sets it twice. Keep one of them.",
            "tests/fixtures/authority-twice.yaml:10:56: spec.http[1].headers.request.add.:authority sets the authority (the Host sent upstream), which `headers.request.set.host` sets already; Istio refuses a route that sets it twice. Keep one of them.",
            "tests/fixtures/authority-twice.yaml:12:49: spec.http[2].headers.request.add.:authority sets the authority (the Host sent upstream), which `headers.request.add.host` sets already; Istio refuses a route that sets it twice. Keep one of them.",
            "tests/fixtures/authority-twice.yaml:14:14: spec.http[3].rewrite changes nothing: Istio requires a `uri`, `uriRegexRewrite` or `authority`. Add one, or remove `rewrite`.",
        ]
    );
}

#[test]
fn a_service_entry_resolution_or_protocol_istio_does_not_know_is_an_error() {
    // `DNSS` was taken for STATIC (no endpoints: nothing to dial), and
    // `HTTTP` for HTTP/1.1.
    let failed = config::load(&["tests/fixtures/entry-enums.yaml"]).unwrap_err();
    let errors: Vec<String> = failed.errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        errors,
        [
            "tests/fixtures/entry-enums.yaml:8:46: spec.ports[1].protocol \"HTTTP\" is not a protocol Istio knows (it refuses it too); did you mean `HTTP`? Use HTTP, HTTPS, HTTP2, GRPC, GRPC-WEB, TLS.",
            "tests/fixtures/entry-enums.yaml:10:15: spec.resolution \"DNSS\" is not one of Istio's (it refuses it too); did you mean `DNS`? Use NONE, STATIC, DNS, DNS_ROUND_ROBIN.",
        ]
    );
    let warnings: Vec<String> = failed.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        ["tests/fixtures/entry-enums.yaml:9:40: spec.ports[2].protocol TCP is not HTTP: umbra proxies HTTP only, and would speak HTTP/1.1 to this port."]
    );
}

#[test]
fn an_unclosed_quote_says_so_where_it_opens() {
    // The parser stops at the end of the document, and says so in its
    // own words ("while scanning a quoted scalar, found unexpected end of
    // stream"); the second document's line is counted from the file's.
    assert_eq!(
        errors("unclosed-quote.yaml"),
        [
            "tests/fixtures/unclosed-quote.yaml:7:40: invalid YAML: the string this quote opens is never closed. Close it with `\"`.",
            "tests/fixtures/unclosed-quote.yaml:15:5: invalid YAML: the string this quote opens is never closed. Close it with `'`.",
        ]
    );
}
