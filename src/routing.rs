//! Routing: the first step on the request path after the config. Picks the
//! `VirtualService` by Host/`:authority`, the first `http[]` rule whose
//! `match[]` holds, then a destination by weight.
//!
//! The router is built once per config snapshot and only reads the request;
//! it never allocates on the hot path except to join the lines of a
//! matched header the request repeats.

use std::borrow::Cow;
use std::collections::HashMap;

use http::request::Parts;

use crate::config::model::{
    Config, HostPattern, RequestMatch, StringMatch, VirtualService, WeightedDestination,
};

/// Host → VirtualService index, built from every `hosts[]` entry.
#[derive(Debug, Default)]
pub struct Router {
    /// Lowercase exact names, including the expanded forms of short names.
    /// foldhash (randomly seeded, as std's SipHash is): hashing the Host
    /// with SipHash was a fifth of routing a request.
    exact: HashMap<String, usize, foldhash::fast::RandomState>,
    /// `*.example.com` patterns as `(".example.com", vs)`, longest first so
    /// the most specific wildcard wins.
    suffixes: Vec<(String, usize)>,
    /// A `*` host, if any: the catch-all.
    any: Option<usize>,
}

/// Where a request goes: indexes into `Config::virtual_services` and its
/// `routes`, so callers can keep parallel per-route runtime state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteIndex {
    pub virtual_service: usize,
    pub route: usize,
    /// The route's `match[]` entry that held (the first that did), `None`
    /// for a route without one: a prefix `rewrite` replaces what it matched.
    pub matched: Option<usize>,
}

impl Router {
    pub fn new(config: &Config) -> Router {
        let mut router = Router::default();
        for (index, vs) in config.virtual_services.iter().enumerate() {
            for pattern in &vs.hosts {
                match pattern {
                    HostPattern::Exact(name) => {
                        for form in host_forms(name, &vs.namespace) {
                            // First VirtualService to claim a host keeps it,
                            // as Istio merges in creation order.
                            router.exact.entry(form).or_insert(index);
                        }
                    }
                    HostPattern::Suffix(suffix) => {
                        router.suffixes.push((suffix.to_ascii_lowercase(), index))
                    }
                    HostPattern::Any => {
                        router.any.get_or_insert(index);
                    }
                }
            }
        }
        router
            .suffixes
            .sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        router
    }

    /// The VirtualService serving `host` (a Host header value; any port is
    /// ignored).
    pub fn virtual_service(&self, host: &str) -> Option<usize> {
        let name = strip_port(host);
        let owned;
        let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            owned = name.to_ascii_lowercase();
            owned.as_str()
        } else {
            name
        };
        let name = name.strip_suffix('.').unwrap_or(name);
        if let Some(&index) = self.exact.get(name) {
            return Some(index);
        }
        self.suffixes
            .iter()
            .find(|(suffix, _)| name.len() > suffix.len() && name.ends_with(suffix.as_str()))
            .map(|&(_, index)| index)
            .or(self.any)
    }

    /// The first matching rule for a request with this `host` that came
    /// in on `listener_port`.
    pub fn route(
        &self,
        config: &Config,
        host: &str,
        request: &Parts,
        listener_port: u16,
    ) -> Option<RouteIndex> {
        let vs_index = self.virtual_service(host)?;
        let vs: &VirtualService = &config.virtual_services[vs_index];
        vs.routes.iter().enumerate().find_map(|(route, rule)| {
            let matched = if rule.matches.is_empty() {
                None
            } else {
                Some(
                    rule.matches
                        .iter()
                        .position(|m| matches(m, host, request, listener_port))?,
                )
            };
            Some(RouteIndex {
                virtual_service: vs_index,
                route,
                matched,
            })
        })
    }
}

/// The names a `hosts[]` entry answers to. A short name (`httpbin`) also
/// answers to its Kubernetes service names in its namespace.
fn host_forms(name: &str, namespace: &str) -> Vec<String> {
    let name = name.to_ascii_lowercase();
    // An IPv6 address arrives in brackets (`[::1]:8000`, the port then
    // stripped): match it so.
    if name.parse::<std::net::Ipv6Addr>().is_ok() {
        return vec![format!("[{name}]")];
    }
    if name.contains('.') || name.contains(':') {
        return vec![name];
    }
    let namespaced = format!("{name}.{namespace}");
    vec![
        format!("{namespaced}.svc.cluster.local"),
        format!("{namespaced}.svc"),
        namespaced,
        name,
    ]
}

/// `host:port` → `host`, keeping IPv6 literals (`[::1]:80` → `[::1]`).
pub fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    // A byte search: `rfind(':')` goes through the char searcher.
    match host.bytes().rposition(|b| b == b':') {
        Some(colon) if host[colon + 1..].bytes().all(|b| b.is_ascii_digit()) => &host[..colon],
        _ => host,
    }
}

/// Does one `match[]` entry hold for this request? All present conditions
/// must hold. `port` is matched against the port the client addressed: the
/// Host's, else `listener_port` (in the mesh the two are one: a sidecar's
/// listener is the service port the Host names; through umbra the Host
/// names the service, on whatever port umbra listens).
pub fn matches(m: &RequestMatch, host: &str, request: &Parts, listener_port: u16) -> bool {
    if let Some(want) = m.port {
        let named = host[strip_port(host).len()..].strip_prefix(':');
        if named
            .and_then(|port| port.parse().ok())
            .unwrap_or(listener_port)
            != want
        {
            return false;
        }
    }
    if let Some(uri) = &m.uri {
        let path = request.uri.path();
        let ok = if m.ignore_uri_case {
            string_match_ignore_case(uri, path)
        } else {
            string_match(uri, path)
        };
        if !ok {
            return false;
        }
    }
    if let Some(method) = &m.method {
        if !string_match(method, request.method.as_str()) {
            return false;
        }
    }
    if let Some(authority) = &m.authority {
        if !string_match(authority, host) {
            return false;
        }
    }
    for (name, want) in &m.headers {
        match header_value(&request.headers, &name.0) {
            Some(value) if string_match(want, &value) => {}
            _ => return false,
        }
    }
    for (name, unwanted) in &m.without_headers {
        // Istio sets Envoy's `treat_missing_header_as_empty` on these (but
        // for a presence match): an absent header is matched as "", so
        // `{regex: ".*"}` or `{exact: ""}` holds for it and excludes the
        // request, as it would in the mesh.
        let hit = match header_value(&request.headers, &name.0) {
            Some(value) => string_match(unwanted, &value),
            None => !matches!(unwanted, StringMatch::Present) && string_match(unwanted, ""),
        };
        if hit {
            return false;
        }
    }
    if !m.query_params.is_empty() {
        let query = request.uri.query().unwrap_or("");
        for (name, want) in &m.query_params {
            match query_param(query, name) {
                Some(value) if string_match(want, value) => {}
                _ => return false,
            }
        }
    }
    true
}

/// A request header's value as Envoy's header matchers see it: every line
/// of the header joined with `,` (since CVE-2020-25017: matching only the
/// first line let a client hide a value from a route, or a
/// `withoutHeaders`, behind an earlier line the upstream also gets).
fn header_value<'h>(headers: &'h http::HeaderMap, name: &http::HeaderName) -> Option<Cow<'h, str>> {
    let mut values = headers.get_all(name).iter();
    let first = String::from_utf8_lossy(values.next()?.as_bytes());
    let mut rest = values.peekable();
    if rest.peek().is_none() {
        return Some(first);
    }
    let mut joined = first.into_owned();
    for value in rest {
        joined.push(',');
        joined.push_str(&String::from_utf8_lossy(value.as_bytes()));
    }
    Some(Cow::Owned(joined))
}

/// The raw value of the first `name=` parameter in a query string.
fn query_param<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then_some(value)
    })
}

pub fn string_match(m: &StringMatch, value: &str) -> bool {
    match m {
        StringMatch::Exact(want) => value == want,
        StringMatch::Prefix(prefix) => value.starts_with(prefix.as_str()),
        StringMatch::Regex(re) => re.is_match(value),
        StringMatch::Present => true,
    }
}

fn string_match_ignore_case(m: &StringMatch, value: &str) -> bool {
    match m {
        StringMatch::Exact(want) => value.eq_ignore_ascii_case(want),
        StringMatch::Prefix(prefix) => value
            .get(..prefix.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(prefix)),
        // Never reached for a validated config (the loader clears
        // `ignoreUriCase` on a regex, as Envoy ignores it there).
        StringMatch::Regex(re) => re.is_match(value),
        StringMatch::Present => true,
    }
}

/// Picks a destination index by weight. `roll` is uniform in `0..total`
/// where `total` is the sum of weights (100 for validated routes).
pub fn pick_weighted(destinations: &[WeightedDestination], roll: u32) -> usize {
    let mut remaining = roll;
    for (index, destination) in destinations.iter().enumerate() {
        if remaining < destination.weight {
            return index;
        }
        remaining -= destination.weight;
    }
    destinations.len().saturating_sub(1)
}

/// Sum of weights, the exclusive upper bound for `pick_weighted`'s roll.
pub fn total_weight(destinations: &[WeightedDestination]) -> u32 {
    destinations.iter().map(|d| d.weight).sum::<u32>().max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strip_port_handles_names_and_ipv6() {
        assert_eq!(strip_port("httpbin:8000"), "httpbin");
        assert_eq!(strip_port("httpbin"), "httpbin");
        assert_eq!(strip_port("[::1]:8000"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
        assert_eq!(strip_port("a:b"), "a:b");
    }

    #[test]
    fn query_param_finds_first_value() {
        assert_eq!(query_param("a=1&b=2&a=3", "a"), Some("1"));
        assert_eq!(query_param("flag&b=2", "flag"), Some(""));
        assert_eq!(query_param("b=2", "a"), None);
    }

    #[test]
    fn short_names_expand_to_cluster_forms() {
        let forms = host_forms("HttpBin", "prod");
        assert!(forms.contains(&"httpbin.prod.svc.cluster.local".to_string()));
        assert!(forms.contains(&"httpbin".to_string()));
        assert_eq!(
            host_forms("api.example.com", "prod"),
            vec!["api.example.com"]
        );
    }

    #[test]
    fn an_ipv6_host_matches_its_bracketed_form() {
        let config = Config {
            virtual_services: vec![crate::config::model::VirtualService {
                name: "v6".into(),
                namespace: "default".into(),
                hosts: vec![HostPattern::Exact("::1".into())],
                routes: Vec::new(),
            }],
            ..Config::default()
        };
        let router = Router::new(&config);
        assert_eq!(router.virtual_service("[::1]:8000"), Some(0));
        assert_eq!(router.virtual_service("[::1]"), Some(0));
    }

    #[test]
    fn ignore_case_prefix_does_not_split_utf8() {
        let m = StringMatch::Prefix("/ab".into());
        assert!(string_match_ignore_case(&m, "/AB/c"));
        assert!(!string_match_ignore_case(&m, "/é"));
    }
}

#[cfg(test)]
mod properties {
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::*;
    use crate::config::model::{Destination, LoadBalancer, PoolSettings, UpstreamProtocol};

    fn destinations(weights: &[u32]) -> Vec<WeightedDestination> {
        weights
            .iter()
            .map(|&weight| WeightedDestination {
                weight,
                destination: Arc::new(Destination {
                    key: String::new(),
                    host: String::new(),
                    subset: None,
                    port: None,
                    endpoints: Vec::new(),
                    lb: LoadBalancer::RoundRobin,
                    protocol: UpstreamProtocol::Http1,
                    pool: PoolSettings::default(),
                    outlier: None,
                    tls: None,
                }),
                headers: Default::default(),
            })
            .collect()
    }

    proptest! {
        #[test]
        fn weighted_pick_lands_in_the_rolled_interval(
            weights in prop::collection::vec(0u32..100, 1..8),
            roll_seed in any::<u32>(),
        ) {
            let total: u32 = weights.iter().sum();
            prop_assume!(total > 0);
            let roll = roll_seed % total;
            let picked = pick_weighted(&destinations(&weights), roll);
            let before: u32 = weights[..picked].iter().sum();
            prop_assert!(weights[picked] > 0, "never picks a zero weight");
            prop_assert!(before <= roll && roll < before + weights[picked]);
        }

        #[test]
        fn every_weight_is_reachable(weights in prop::collection::vec(1u32..50, 1..6)) {
            let total: u32 = weights.iter().sum();
            let dests = destinations(&weights);
            let mut hits = vec![0u32; weights.len()];
            for roll in 0..total {
                hits[pick_weighted(&dests, roll)] += 1;
            }
            prop_assert_eq!(hits, weights, "each destination gets exactly its weight of rolls");
        }

        #[test]
        fn string_matches_agree_with_std(value in "[a-zA-Z/]{0,12}", pattern in "[a-zA-Z/]{0,6}") {
            prop_assert_eq!(string_match(&StringMatch::Exact(pattern.clone()), &value), value == pattern);
            prop_assert_eq!(
                string_match(&StringMatch::Prefix(pattern.clone()), &value),
                value.starts_with(&pattern)
            );
            prop_assert_eq!(
                string_match_ignore_case(&StringMatch::Prefix(pattern.clone()), &value),
                value.to_ascii_lowercase().starts_with(&pattern.to_ascii_lowercase())
            );
        }

        #[test]
        fn strip_port_returns_a_prefix(host in "\\PC{0,40}") {
            let stripped = strip_port(&host);
            prop_assert!(host.starts_with(stripped));
        }

        #[test]
        fn exact_hosts_always_route_to_their_service(
            names in prop::collection::btree_set("[a-z]{1,8}(\\.[a-z]{1,5})?", 1..6),
            port in proptest::option::of(1u16..),
        ) {
            let names: Vec<String> = names.into_iter().collect();
            let config = Config {
                virtual_services: names
                    .iter()
                    .map(|name| crate::config::model::VirtualService {
                        name: name.clone(),
                        namespace: "default".into(),
                        hosts: vec![HostPattern::Exact(name.clone())],
                        routes: Vec::new(),
                    })
                    .collect(),
                ..Config::default()
            };
            let router = Router::new(&config);
            for (index, name) in names.iter().enumerate() {
                let host = match port {
                    Some(port) => format!("{}:{port}", name.to_ascii_uppercase()),
                    None => name.clone(),
                };
                prop_assert_eq!(router.virtual_service(&host), Some(index));
            }
            prop_assert_eq!(router.virtual_service("unrelated-host.invalid"), None);
        }

        #[test]
        fn most_specific_wildcard_wins(sub in "[a-z]{1,6}") {
            let config = Config {
                virtual_services: ["*.com", "*.example.com", "*"]
                    .iter()
                    .map(|pattern| crate::config::model::VirtualService {
                        name: pattern.to_string(),
                        namespace: "default".into(),
                        hosts: vec![match *pattern {
                            "*" => HostPattern::Any,
                            p => HostPattern::Suffix(p[1..].to_string()),
                        }],
                        routes: Vec::new(),
                    })
                    .collect(),
                ..Config::default()
            };
            let router = Router::new(&config);
            prop_assert_eq!(router.virtual_service(&format!("{sub}.example.com")), Some(1));
            prop_assert_eq!(router.virtual_service(&format!("{sub}.other.com")), Some(0));
            prop_assert_eq!(router.virtual_service(&format!("{sub}.org")), Some(2));
            // A wildcard never matches the bare suffix itself.
            prop_assert_eq!(router.virtual_service("example.com"), Some(0));
        }
    }
}
