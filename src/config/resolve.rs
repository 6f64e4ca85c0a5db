//! Validation and resolution: turns parsed resources into the typed
//! [`Config`], checking every semantic rule and collecting every error, and
//! resolves each destination (host → ServiceEntry → subset labels →
//! endpoints → target port) into a shared [`Destination`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method};
use marked_yaml::Span;
use regex::Regex;
use rustls::pki_types::ServerName;

use super::document::{self, Findings, Origin, Resource};
use super::istio;
use super::model::*;

const ISTIO_VERSIONS: [&str; 3] = [
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
];
const UMBRA_VERSION: &str = "umbra.io/v1alpha1";

/// Annotations umbra understands, all under `umbra.io/`.
const ANNOTATIONS: [&str; 5] = [
    "umbra.io/mirror-sampling",
    "umbra.io/shadow-host-suffix",
    "umbra.io/mirror-methods",
    "umbra.io/mirror-remove-headers",
    "umbra.io/mirror-max-body-bytes",
];

struct Parsed<T> {
    resource: Resource,
    spec: T,
}

/// Builds the config from every resource, or returns every error.
pub fn resolve(resources: Vec<Resource>, findings: &mut Findings) -> Config {
    let mut virtual_services = Vec::new();
    let mut rules = Vec::new();
    let mut entries = Vec::new();
    let mut workloads = Vec::new();
    let mut analyses = Vec::new();
    // Kubernetes keeps one resource per kind, namespace and name (a second
    // `kubectl apply` replaces the first), so two here are a mistake.
    // Each key maps to where its first definition's name is (file, line).
    let mut defined: HashMap<(String, String, String), (String, usize)> = HashMap::new();
    // What the resources that did not load would have named, so that what
    // refers to them is not reported as referring to nothing.
    let mut broken = Broken::default();
    for resource in resources {
        let declared = Broken::of(&resource);
        let expected: &[&str] = if resource.kind == "ShadowAnalysis" {
            &[UMBRA_VERSION]
        } else {
            &ISTIO_VERSIONS
        };
        if !expected.contains(&resource.api_version.as_str()) {
            let message = match resource.api_version.as_str() {
                "" => format!(
                    "this {} has no `apiVersion`. Add `apiVersion: {}`.",
                    resource.kind, expected[0]
                ),
                written => format!(
                    "apiVersion `{written}` is not supported for {}. Use {}.",
                    resource.kind,
                    versions(expected)
                ),
            };
            findings
                .errors
                .push(resource.origin.at(&resource.kind_span, message));
            broken.add(declared);
            continue;
        }
        let key = (
            resource.kind.clone(),
            resource.namespace.clone(),
            resource.name.clone(),
        );
        if let Some((file, line)) = defined.get(&key) {
            findings.errors.push(resource.origin.at(
                &resource.name_span,
                format!(
                    "{} \"{}\" is defined twice in namespace \"{}\" (first at {}:{}). Rename or remove one.",
                    resource.kind, resource.name, resource.namespace, file, line
                ),
            ));
            continue;
        }
        let at = resource.origin.at(&resource.name_span, "");
        defined.insert(key, (at.file, at.line));
        let loaded = match resource.kind.as_str() {
            "VirtualService" => push(&mut virtual_services, resource, findings),
            "DestinationRule" => push(&mut rules, resource, findings),
            "ServiceEntry" => push(&mut entries, resource, findings),
            "WorkloadEntry" => push(&mut workloads, resource, findings),
            _ => push(&mut analyses, resource, findings),
        };
        if !loaded {
            broken.add(declared);
        }
    }
    // Every VirtualService written, for a ShadowAnalysis: one that did not
    // load, or whose routes have errors, has its errors reported already.
    let declared: Vec<String> = (virtual_services.iter())
        .map(|vs| vs.resource.name.clone())
        .chain(broken.virtual_services.iter().cloned())
        .collect();
    let mut resolver = Resolver {
        entries: &entries,
        rules: &rules,
        workloads: &workloads,
        broken: &broken,
        destinations: BTreeMap::new(),
    };
    let mut config = Config::default();
    for vs in &virtual_services {
        if let Some(built) = virtual_service(vs, &mut resolver, findings) {
            config.virtual_services.push(built);
        }
    }
    shared_route_names(&virtual_services, findings);
    shared_hosts(&virtual_services, findings);
    distinct_mirror_labels(&mut config.virtual_services);
    for analysis in &analyses {
        let built = &config.virtual_services;
        if let Some((target, settings)) =
            shadow_analysis(analysis, built, &declared, &mut resolver, findings)
        {
            config.analysis.insert(target, settings);
        }
    }
    // Every rule's settings are checked, not only those a route reaches
    // (as `istioctl analyze` does): a typo in a rule for a host no route
    // uses yet would otherwise surface only once one does.
    for rule in &rules {
        check_rule(rule, findings);
    }
    one_rule_per_host(&rules, findings);
    // Ports and addresses too: one out of range would otherwise be cut to
    // 16 bits when a route first dials it (99999 to 34463).
    for entry in &entries {
        check_entry(entry, findings);
    }
    for workload in &workloads {
        let resource = &workload.resource;
        let span = *resource.spec.span();
        check_workload(&resource.origin, &workload.spec, "spec", &span, findings);
    }
    config.destinations = resolver.destinations;
    config
}

/// Mirror targets are named `host/subset` in metrics, logs and reports;
/// two that differ only by port get it in their names too, so that their
/// series, ejections and analyses stay apart.
fn distinct_mirror_labels(virtual_services: &mut [VirtualService]) {
    let mut keys: HashMap<String, BTreeSet<String>> = HashMap::new();
    let routes = virtual_services.iter().flat_map(|vs| &vs.routes);
    for mirror in routes.flat_map(|route| &route.mirrors) {
        let key = mirror.destination.key.clone();
        keys.entry(mirror.label.clone()).or_default().insert(key);
    }
    // Just built: nothing else holds the routes yet.
    let routes =
        (virtual_services.iter_mut().flat_map(|vs| &mut vs.routes)).filter_map(Arc::get_mut);
    for mirror in routes.flat_map(|route| &mut route.mirrors) {
        if keys
            .get(&mirror.label)
            .is_some_and(|shared| shared.len() > 1)
        {
            mirror.label = mirror.destination.label_with_port();
        }
    }
}

/// The accepted apiVersions as a fix names them: the first in full, the
/// others by their version only (`networking.istio.io/v1` (or `v1beta1`)).
fn versions(expected: &[&str]) -> String {
    let Some((first, others)) = expected.split_first() else {
        return String::new();
    };
    let others: Vec<String> = others
        .iter()
        .map(|v| format!("`{}`", v.rsplit('/').next().unwrap_or(v)))
        .collect();
    if others.is_empty() {
        format!("`{first}`")
    } else {
        format!("`{first}` (or {})", others.join(", "))
    }
}

/// Reports what is wrong in a DestinationRule's traffic policies: the
/// rule's, each subset's and each of their `portLevelSettings` entries,
/// TLS sections included (their files read, and watched, as if a route
/// used them; what a destination that does use one reported is not
/// reported again).
fn check_rule(rule: &Parsed<istio::DestinationRule>, findings: &mut Findings) {
    let origin = &rule.resource.origin;
    check_subset_names(rule, findings);
    let subsets = rule
        .spec
        .subsets
        .iter()
        .enumerate()
        .filter_map(|(index, subset)| {
            let policy = subset.traffic_policy.as_ref()?;
            Some((policy, format!("spec.subsets[{index}].trafficPolicy")))
        });
    let policies = (rule.spec.traffic_policy.iter())
        .map(|policy| (policy, "spec.trafficPolicy".to_string()))
        .chain(subsets);
    for (policy, field) in policies {
        let (whole, _) = Policy::on_port(policy, &field, None, origin, findings);
        traffic_settings(&whole, Some(origin), findings);
        check_tls(rule, &whole, findings);
        for (index, entry) in policy.port_level_settings.iter().enumerate() {
            let entry = Policy::port_entry(entry, &field, index);
            traffic_settings(&entry, Some(origin), findings);
            check_tls(rule, &entry, findings);
        }
    }
}

/// A destination takes the first DestinationRule for its host, so a
/// second one for that host would be ignored whole, its subsets and its
/// traffic policy. Istio merges such rules instead (the subsets of both,
/// the first's trafficPolicy), which umbra does not: say so where the
/// second one is, rather than drop it.
fn one_rule_per_host(rules: &[Parsed<istio::DestinationRule>], findings: &mut Findings) {
    let mut first: HashMap<String, (&str, String, usize)> = HashMap::new();
    for rule in rules {
        let resource = &rule.resource;
        let Some(host) = &rule.spec.host else {
            continue;
        };
        let canonical = canonical_host(host, &resource.namespace);
        let at = resource.origin.at(&resource.name_span, "");
        match first.get(&canonical) {
            Some((name, file, line)) => findings.errors.push(resource.origin.at(
                host.span(),
                format!(
                    "DestinationRule \"{}\" is for host \"{}\", as DestinationRule \"{name}\" is ({file}:{line}); umbra reads one rule per host, so this one would be ignored, subsets and trafficPolicy alike (Istio merges them: the subsets of both, the first's trafficPolicy). Merge them into one DestinationRule.",
                    resource.name,
                    host.as_str()
                ),
            )),
            None => {
                first.insert(canonical, (&resource.name, at.file, at.line));
            }
        }
    }
}

/// Every subset needs a name of its own, as in Istio's validation: a
/// route picks a subset by name, so one without a name is never used, and
/// of two with one name a route takes the first, whatever the second's
/// labels.
fn check_subset_names(rule: &Parsed<istio::DestinationRule>, findings: &mut Findings) {
    let origin = &rule.resource.origin;
    let mut seen: HashMap<&str, (usize, usize)> = HashMap::new();
    for (index, subset) in rule.spec.subsets.iter().enumerate() {
        let Some(name) = subset.name.as_ref().filter(|n| !n.is_empty()) else {
            findings.errors.push(origin.at(
                subset.span(),
                format!("spec.subsets[{index}] has no `name`, so no route can use it. Name it (routes pick it with `subset: NAME`), or remove it."),
            ));
            continue;
        };
        let line = origin.at(name.span(), "").line;
        match seen.get(name.as_str()) {
            Some((first, first_line)) => findings.errors.push(origin.at(
                name.span(),
                format!(
                    "spec.subsets[{index}].name \"{}\" is already the name of spec.subsets[{first}] (line {first_line}); a route's `subset: {}` would only ever take that one. Rename or remove one.",
                    name.as_str(),
                    name.as_str()
                ),
            )),
            None => {
                seen.insert(name.as_str(), (index, line));
            }
        }
    }
}

/// Checks `policy`'s TLS section as a destination of `rule`'s host would
/// use it. A host that is not a name to send as SNI (`*.example.com`) is
/// checked as a destination's own host would be, where one uses it.
fn check_tls(rule: &Parsed<istio::DestinationRule>, policy: &Policy, findings: &mut Findings) {
    let Some(tls) = policy.tls else { return };
    let host = rule.spec.host.as_ref().map_or("", |h| h.as_str());
    let host = match ServerName::try_from(host) {
        Ok(_) => host,
        Err(_) => "unused.invalid",
    };
    let origin = &rule.resource.origin;
    let field = &policy.tls_field;
    super::tls::origination(tls, host, UpstreamProtocol::Http1, field, origin, findings);
}

/// Adds the resource if its spec loads (else its errors are reported),
/// and says whether it did.
fn push<T: serde::de::DeserializeOwned + serde::Serialize>(
    into: &mut Vec<Parsed<T>>,
    resource: Resource,
    findings: &mut Findings,
) -> bool {
    match document::spec::<T>(&resource, findings) {
        Some(spec) => {
            into.push(Parsed { resource, spec });
            true
        }
        None => false,
    }
}

/// What resources that did not load (their errors already reported)
/// would have provided, read from the YAML as written: a reference to one
/// of these is not an error of its own, only a consequence.
#[derive(Default)]
struct Broken {
    /// Canonical hosts (or `*.` wildcards) of DestinationRules.
    rules: Vec<String>,
    /// Canonical hosts of ServiceEntries.
    entries: Vec<String>,
    /// Names of VirtualServices.
    virtual_services: Vec<String>,
}

impl Broken {
    /// What `resource` declares, as far as it can be read.
    fn of(resource: &Resource) -> Broken {
        let spec = resource.spec.as_mapping();
        let scalar = |key: &str| {
            spec.and_then(|s| s.get_scalar(key))
                .map(|h| h.as_str().to_string())
        };
        let canonical = |host: String| canonical_host(&host, &resource.namespace);
        let mut broken = Broken::default();
        match resource.kind.as_str() {
            "DestinationRule" => broken.rules.extend(scalar("host").map(canonical)),
            "ServiceEntry" => {
                let hosts = spec.and_then(|s| s.get_sequence("hosts"));
                let hosts = hosts.into_iter().flat_map(|h| h.iter());
                let hosts = hosts
                    .filter_map(|h| h.as_scalar())
                    .map(|h| h.as_str().to_string());
                broken.entries.extend(hosts.map(canonical));
            }
            "VirtualService" => broken.virtual_services.push(resource.name.clone()),
            _ => {}
        }
        broken
    }

    fn add(&mut self, other: Broken) {
        self.rules.extend(other.rules);
        self.entries.extend(other.entries);
        self.virtual_services.extend(other.virtual_services);
    }

    /// Whether a DestinationRule that did not load may be the one for
    /// `host` (canonical).
    fn rule_for(&self, host: &str) -> bool {
        self.rules.iter().any(|rule| {
            rule == host
                || rule
                    .strip_prefix('*')
                    .is_some_and(|suffix| host.ends_with(suffix))
        })
    }

    /// Whether a ServiceEntry that did not load names `host` (canonical).
    fn entry_for(&self, host: &str) -> bool {
        self.entries.iter().any(|entry| entry == host)
    }
}

/// Resolves destinations against ServiceEntries, DestinationRules and
/// WorkloadEntries, sharing one `Arc<Destination>` per key.
struct Resolver<'a> {
    entries: &'a [Parsed<istio::ServiceEntry>],
    rules: &'a [Parsed<istio::DestinationRule>],
    workloads: &'a [Parsed<istio::WorkloadEntry>],
    broken: &'a Broken,
    destinations: BTreeMap<String, Arc<Destination>>,
}

/// `httpbin` in namespace `ns` and `httpbin.ns.svc.cluster.local` are the
/// same service.
fn canonical_host(host: &str, namespace: &str) -> String {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    match host.matches('.').count() {
        0 => format!("{host}.{namespace}.svc.cluster.local"),
        1 if !host.contains(':') => match host.split_once('.') {
            Some((name, ns)) if ns.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') => {
                format!("{name}.{ns}.svc.cluster.local")
            }
            _ => host,
        },
        _ => host,
    }
}

impl Resolver<'_> {
    fn resolve(
        &mut self,
        origin: &Origin,
        destination: &istio::S<istio::Destination>,
        namespace: &str,
        path: &str,
        findings: &mut Findings,
    ) -> Option<Arc<Destination>> {
        let Some(host) = &destination.host else {
            findings.errors.push(origin.at(
                destination.span(),
                format!("{path}.host is missing. Set the destination's `host`."),
            ));
            return None;
        };
        let port = destination
            .port
            .as_ref()
            .and_then(|p| p.number.as_ref())
            .map(|n| (**n, *n.span()));
        if let Some((number, span)) = port {
            if number == 0 || number > 65535 {
                findings.errors.push(origin.at(
                    &span,
                    format!("{path}.port.number {number} is not a valid port. Use 1 to 65535."),
                ));
                return None;
            }
        }
        let port = port.map(|(n, _)| n as u16);
        let subset = destination.subset.as_ref().map(|s| s.as_str().to_string());
        let key = format!(
            "{}|{}|{}",
            host.as_str(),
            subset.as_deref().unwrap_or(""),
            port.map(|p| p.to_string()).unwrap_or_default()
        );
        if let Some(existing) = self.destinations.get(&key) {
            return Some(existing.clone());
        }
        let canonical = canonical_host(host, namespace);

        // Subset labels and traffic policy from the DestinationRule: the
        // one for this host, else the most specific wildcard (`*.example.com`,
        // `*`) that covers it, as Istio picks.
        let rule_host = |r: &&Parsed<istio::DestinationRule>| {
            r.spec
                .host
                .as_ref()
                .map(|h| canonical_host(h, &r.resource.namespace))
        };
        let rule = (self.rules.iter())
            .find(|r| rule_host(r).is_some_and(|h| h == canonical))
            .or_else(|| {
                (self.rules.iter())
                    .filter_map(|r| {
                        let host = rule_host(&r)?;
                        let suffix = host.strip_prefix('*')?;
                        canonical.ends_with(suffix).then_some((suffix.len(), r))
                    })
                    .max_by_key(|(specificity, _)| *specificity)
                    .map(|(_, r)| r)
            });
        let mut labels = BTreeMap::new();
        let rule_policy = rule.and_then(|r| r.spec.traffic_policy.as_ref());
        let mut subset_policy = None;
        if let Some(name) = &destination.subset {
            let Some(rule) = rule else {
                if self.broken.rule_for(&canonical) {
                    return None;
                }
                findings.errors.push(origin.at(
                    name.span(),
                    format!(
                        "{path}.subset \"{}\" needs a DestinationRule for host \"{}\", and there is none. Add one with this subset, or drop `subset`.",
                        name.as_str(),
                        host.as_str()
                    ),
                ));
                return None;
            };
            match rule
                .spec
                .subsets
                .iter()
                .enumerate()
                .find(|(_, s)| s.name.as_ref().is_some_and(|n| n.as_str() == name.as_str()))
            {
                Some((index, found)) => {
                    labels = found.labels.clone();
                    subset_policy = found.traffic_policy.as_ref().map(|p| (index, p));
                }
                None => {
                    let known: Vec<&str> = rule
                        .spec
                        .subsets
                        .iter()
                        .filter_map(|s| s.name.as_ref().map(|n| n.as_str()))
                        .collect();
                    findings.errors.push(origin.at(
                        name.span(),
                        format!(
                            "{path}.subset \"{}\" is not defined in DestinationRule \"{}\" (it has: {}). Use one of those, or add the subset.",
                            name.as_str(),
                            rule.resource.name,
                            if known.is_empty() { "none".to_string() } else { known.join(", ") }
                        ),
                    ));
                    return None;
                }
            }
        }
        let entry = self.entries.iter().find(|e| {
            e.spec.hosts.as_ref().is_some_and(|hosts| {
                hosts
                    .iter()
                    .any(|h| canonical_host(h, &e.resource.namespace) == canonical)
            })
        });
        // The service port `portLevelSettings` are matched against: the
        // route's, else the ServiceEntry's only one.
        let service_port = port.or_else(|| match entry?.spec.ports.as_slice() {
            [only] => only.number.as_ref().and_then(|n| u16::try_from(**n).ok()),
            _ => None,
        });
        let policy = match rule {
            Some(rule) => Policy::merged(
                rule_policy,
                subset_policy,
                service_port,
                &rule.resource.origin,
                findings,
            ),
            None => Policy::default(),
        };
        let settings = traffic_settings(&policy, rule.map(|r| &r.resource.origin), findings);

        let (endpoints, protocol) = match entry {
            Some(entry) => {
                let (endpoints, protocol) = self.entry_endpoints(
                    entry,
                    &labels,
                    port,
                    policy.tls.is_some_and(|tls| {
                        tls.mode.as_ref().is_some_and(|mode| {
                            matches!(mode.to_ascii_uppercase().as_str(), "SIMPLE" | "MUTUAL")
                        })
                    }),
                    origin,
                    destination,
                    path,
                    findings,
                )?;
                (endpoints, protocol)
            }
            None if self.broken.entry_for(&canonical) => return None,
            None => {
                // Dialled by name, every subset of the host would reach
                // the same place: a mirror to `v2` would copy each request
                // back to the primary `v1`, and the analysis compare v1
                // with itself.
                if let (Some(name), false) = (&destination.subset, labels.is_empty()) {
                    let wanted: Vec<String> =
                        labels.iter().map(|(k, v)| format!("{k}: {v}")).collect();
                    findings.errors.push(origin.at(
                        name.span(),
                        format!(
                            "{path}.subset \"{}\" selects endpoints labelled {{{}}}, but host \"{}\" has no ServiceEntry whose endpoints carry labels: umbra would dial the host itself for every subset alike. Add a ServiceEntry for \"{}\" with labelled endpoints, or drop `subset`.",
                            name.as_str(),
                            wanted.join(", "),
                            host.as_str(),
                            host.as_str()
                        ),
                    ));
                    return None;
                }
                let Some(port) = port else {
                    findings.errors.push(origin.at(
                        host.span(),
                        format!(
                            "{path}: host \"{}\" has no ServiceEntry, so umbra dials it directly and needs `port.number`. Set it, or add a ServiceEntry.",
                            host.as_str()
                        ),
                    ));
                    return None;
                };
                // A name is resolved at each connection, as Envoy's
                // STRICT_DNS clusters re-resolve: never at load, which
                // would block it on DNS (and `validate` with it) and leave
                // the route without an endpoint until the next reload if
                // the name did not resolve then.
                let address = host.trim_start_matches('[').trim_end_matches(']');
                // Built as the upstream builds it to dial: one it cannot
                // build is dropped there, and every request gets 503.
                let target = match address.contains(':') {
                    true => format!("[{address}]:{port}"),
                    false => format!("{address}:{port}"),
                };
                if target.parse::<http::uri::Authority>().is_err() {
                    findings.warnings.push(origin.at(
                        host.span(),
                        format!(
                            "{path}: host \"{}\" has no ServiceEntry and is not a host name or an IP address, so it cannot be dialled: requests to it get 503. Correct the host, or add a ServiceEntry with endpoints.",
                            host.as_str()
                        ),
                    ));
                }
                let endpoints = vec![Endpoint {
                    address: address.to_string(),
                    port,
                    labels: BTreeMap::new(),
                }];
                (endpoints, UpstreamProtocol::Http1)
            }
        };
        let protocol = if settings.upgrade_h2 {
            UpstreamProtocol::Http2
        } else {
            protocol
        };
        let tls = match (policy.tls, rule) {
            (Some(tls), Some(rule)) => {
                let (field, origin) = (&policy.tls_field, &rule.resource.origin);
                super::tls::origination(tls, host, protocol, field, origin, findings)?
            }
            _ => None,
        };
        let built = Arc::new(Destination {
            key: key.clone(),
            host: host.as_str().to_string(),
            subset,
            port,
            endpoints,
            lb: settings.lb,
            protocol,
            pool: settings.pool,
            outlier: settings.outlier,
            tls,
        });
        self.destinations.insert(key, built.clone());
        Some(built)
    }

    #[allow(clippy::too_many_arguments)]
    fn entry_endpoints(
        &self,
        entry: &Parsed<istio::ServiceEntry>,
        labels: &BTreeMap<String, String>,
        port: Option<u16>,
        tls: bool,
        origin: &Origin,
        destination: &istio::S<istio::Destination>,
        path: &str,
        findings: &mut Findings,
    ) -> Option<(Vec<Endpoint>, UpstreamProtocol)> {
        let ports = &entry.spec.ports;
        let chosen = match port {
            Some(number) => ports
                .iter()
                .find(|p| p.number.as_ref().is_some_and(|n| **n == u32::from(number))),
            None if ports.len() == 1 => ports.first(),
            None => None,
        };
        let Some(chosen) = chosen else {
            let known: Vec<String> = ports
                .iter()
                .filter_map(|p| p.number.as_ref().map(|n| n.to_string()))
                .collect();
            let message = match port {
                Some(number) => format!(
                    "{path}.port.number {number} is not a port of ServiceEntry \"{}\" (it has: {}). Use one of those.",
                    entry.resource.name,
                    if known.is_empty() { "none".into() } else { known.join(", ") }
                ),
                None => format!(
                    "{path} has no port.number and ServiceEntry \"{}\" has {} ports. Set `port.number` to one of: {}.",
                    entry.resource.name,
                    ports.len(),
                    known.join(", ")
                ),
            };
            findings.errors.push(origin.at(destination.span(), message));
            return None;
        };
        let number = match chosen.number.as_ref() {
            Some(n) if (1..=65535).contains(&**n) => **n as u16,
            found => {
                let span = found.map_or_else(|| *chosen.span(), |n| *n.span());
                let value = found.map_or_else(|| "missing".to_string(), |n| n.to_string());
                findings.error_once(entry.resource.origin.at(
                    &span,
                    format!(
                        "ServiceEntry \"{}\" port number {value} is not a valid port. Use 1 to 65535.",
                        entry.resource.name
                    ),
                ));
                return None;
            }
        };
        let port_name = chosen.name.as_deref().unwrap_or("");
        // Out of range, it is reported by `check_entry`.
        let target = (chosen.target_port.as_ref()).and_then(|t| u16::try_from(**t).ok());
        let protocol = match chosen
            .protocol
            .as_ref()
            .map(|p| p.to_ascii_uppercase())
            .as_deref()
        {
            Some("HTTP2" | "GRPC" | "GRPC-WEB") => UpstreamProtocol::Http2,
            Some(secure @ ("HTTPS" | "TLS")) if !tls => {
                // For Istio that port carries TLS the app started; here
                // umbra is the one that must start it.
                let span = chosen
                    .protocol
                    .as_ref()
                    .map_or_else(Span::new_blank, |p| *p.span());
                let warning = entry.resource.origin.at(
                    &span,
                    format!(
                        "ServiceEntry \"{}\" port {number} is {secure}, but umbra would send it plaintext HTTP: no DestinationRule gives it trafficPolicy.tls with mode SIMPLE or MUTUAL. Add `tls: {{mode: SIMPLE}}` to one, or declare the port HTTP.",
                        entry.resource.name
                    ),
                );
                findings.warn_once(warning);
                UpstreamProtocol::Http1
            }
            _ => UpstreamProtocol::Http1,
        };
        let mut candidates: Vec<&istio::WorkloadEntry> =
            entry.spec.endpoints.iter().map(|e| &**e).collect();
        if let Some(selector) = &entry.spec.workload_selector {
            candidates.extend(
                self.workloads
                    .iter()
                    .filter(|w| w.resource.namespace == entry.resource.namespace)
                    .filter(|w| contains(&w.spec.labels, &selector.labels))
                    .map(|w| &w.spec),
            );
        }
        let dns_name =
            entry.spec.resolution.as_ref().is_some_and(|r| {
                matches!(r.to_ascii_uppercase().as_str(), "DNS" | "DNS_ROUND_ROBIN")
            });
        let mut endpoints: Vec<Endpoint> = candidates
            .into_iter()
            .filter(|w| contains(&w.labels, labels))
            .filter_map(|w| {
                let address = w.address.as_ref()?.as_str().to_string();
                let port = (w.ports.get(port_name))
                    .and_then(|p| u16::try_from(**p).ok())
                    .or(target)
                    .unwrap_or(number);
                Some(Endpoint {
                    address,
                    port,
                    labels: w.labels.clone(),
                })
            })
            .collect();
        if endpoints.is_empty() && dns_name && entry.spec.endpoints.is_empty() && labels.is_empty()
        {
            // DNS resolution without endpoints: dial the host name itself.
            if let Some(host) = &destination.host {
                endpoints.push(Endpoint {
                    address: host.as_str().to_string(),
                    port: target.unwrap_or(number),
                    labels: BTreeMap::new(),
                });
            }
        }
        if endpoints.is_empty() {
            findings.warnings.push(origin.at(
                destination.span(),
                format!(
                    "{path}: no endpoint of ServiceEntry \"{}\" has the labels {:?}; requests to it get 503.",
                    entry.resource.name, labels
                ),
            ));
        }
        Some((endpoints, protocol))
    }
}

fn contains(labels: &BTreeMap<String, String>, wanted: &BTreeMap<String, String>) -> bool {
    wanted.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Reports a ServiceEntry's `targetPort`s and endpoints that umbra could
/// not dial, whether a route uses the entry yet or not.
fn check_entry(entry: &Parsed<istio::ServiceEntry>, findings: &mut Findings) {
    let origin = &entry.resource.origin;
    if let Some(resolution) = &entry.spec.resolution {
        // Anything else was taken for STATIC: a misspelt `DNS` left an
        // entry without endpoints with none to dial.
        if !RESOLUTIONS.contains(&resolution.to_ascii_uppercase().as_str()) {
            let near = document::near_miss(resolution, RESOLUTIONS)
                .map(|n| format!("; did you mean `{n}`?"))
                .unwrap_or_else(|| ".".into());
            findings.errors.push(origin.at(
                resolution.span(),
                format!(
                    "spec.resolution \"{}\" is not one of Istio's (it refuses it too){near} Use {}.",
                    resolution.as_str(),
                    RESOLUTIONS.join(", ")
                ),
            ));
        }
    }
    for (index, port) in entry.spec.ports.iter().enumerate() {
        if let Some(target) = &port.target_port {
            let field = format!("spec.ports[{index}].targetPort");
            check_port(origin, target, &field, findings);
        }
        if let Some(protocol) = &port.protocol {
            let field = format!("spec.ports[{index}].protocol");
            check_protocol(origin, protocol, &field, findings);
        }
    }
    for (index, endpoint) in entry.spec.endpoints.iter().enumerate() {
        let field = format!("spec.endpoints[{index}]");
        check_workload(origin, endpoint, &field, endpoint.span(), findings);
    }
}

/// Checks a workload (a `WorkloadEntry` spec or a ServiceEntry endpoint,
/// written at `field`, `span` where it starts): an address umbra can
/// dial, and ports in range.
fn check_workload(
    origin: &Origin,
    workload: &istio::WorkloadEntry,
    field: &str,
    span: &Span,
    findings: &mut Findings,
) {
    match &workload.address {
        None => findings.error_once(origin.at(
            span,
            format!("{field} has no `address`. Set the workload's IP address (or host name); its port goes under `ports`."),
        )),
        Some(address) => {
            if let Some(problem) = address_problem(address) {
                findings.error_once(origin.at(
                    address.span(),
                    format!("{field}.address \"{}\" {problem}", address.as_str()),
                ));
            }
        }
    }
    for (name, port) in &workload.ports {
        check_port(origin, port, &format!("{field}.ports.{name}"), findings);
    }
}

/// A ServiceEntry's `resolution`s, as Istio spells them.
const RESOLUTIONS: [&str; 4] = ["NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN"];

/// The port protocols Istio knows that carry HTTP, which umbra speaks.
const HTTP_PROTOCOLS: [&str; 6] = ["HTTP", "HTTPS", "HTTP2", "GRPC", "GRPC-WEB", "TLS"];

/// Istio's other port protocols, which umbra cannot proxy.
const OTHER_PROTOCOLS: [&str; 7] = [
    "TCP",
    "UDP",
    "MONGO",
    "MYSQL",
    "REDIS",
    "THRIFT",
    "HTTP_PROXY",
];

/// A port protocol Istio does not know is an error, as in Istio (umbra
/// took any for HTTP/1.1); one that is not HTTP warns that umbra would
/// speak HTTP/1.1 to it all the same.
fn check_protocol(
    origin: &Origin,
    protocol: &istio::S<String>,
    field: &str,
    findings: &mut Findings,
) {
    let upper = protocol.to_ascii_uppercase();
    if HTTP_PROTOCOLS.contains(&upper.as_str()) {
        return;
    }
    if OTHER_PROTOCOLS.contains(&upper.as_str()) {
        findings.warnings.push(origin.at(
            protocol.span(),
            format!("{field} {} is not HTTP: umbra proxies HTTP only, and would speak HTTP/1.1 to this port.", protocol.as_str()),
        ));
        return;
    }
    let known = HTTP_PROTOCOLS.iter().chain(&OTHER_PROTOCOLS).copied();
    let near = document::near_miss(protocol, known)
        .map(|n| format!("; did you mean `{n}`?"))
        .unwrap_or_else(|| ".".into());
    findings.errors.push(origin.at(
        protocol.span(),
        format!(
            "{field} \"{}\" is not a protocol Istio knows (it refuses it too){near} Use {}.",
            protocol.as_str(),
            HTTP_PROTOCOLS.join(", ")
        ),
    ));
}

fn check_port(origin: &Origin, port: &istio::S<u32>, field: &str, findings: &mut Findings) {
    if !(1..=65535).contains(&**port) {
        findings.error_once(origin.at(
            port.span(),
            format!("{field} {} is not a valid port. Use 1 to 65535.", **port),
        ));
    }
}

/// What keeps umbra from dialling an endpoint address, as the end of a
/// sentence with its fix; `None` for an IP address or a host name.
fn address_problem(address: &str) -> Option<String> {
    if address.parse::<IpAddr>().is_ok() || host_name(address) {
        return None;
    }
    if address.starts_with("unix://") {
        return Some(
            "is a Unix domain socket, which umbra cannot dial. Give the workload's TCP address."
                .into(),
        );
    }
    let with_port = address.rsplit_once(':').filter(|(host, port)| {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        port.parse::<u16>().is_ok() && (host.parse::<IpAddr>().is_ok() || host_name(host))
    });
    Some(match with_port {
        Some((host, port)) => format!(
            "has a port. Write the address alone (`{host}`), and the port under `ports` (`ports: {{http: {port}}}`, by the ServiceEntry port's name) or as the port's `targetPort`."
        ),
        None => "is neither an IP address nor a host name. Write the workload's IP address, e.g. `10.0.0.7`.".into(),
    })
}

/// A DNS name, as an endpoint's address may be (with `resolution: DNS`).
fn host_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

/// The policy a destination runs on, merged as Istio merges it
/// (`MergeSubsetTrafficPolicy`): the rule's and the subset's policies are
/// each first taken as they apply on the destination's port (a
/// `portLevelSettings` entry naming the port replaces the whole policy, and
/// what it leaves out is default, not inherited); then each section comes
/// from the subset where it has it, else from the rule, except that a
/// subset's port-level entry replaces the rule's policy wholesale.
#[derive(Default)]
struct Policy<'a> {
    load_balancer: Option<&'a istio::LoadBalancerSettings>,
    connection_pool: Option<&'a istio::ConnectionPool>,
    outlier_detection: Option<&'a istio::S<istio::OutlierDetection>>,
    tls: Option<&'a istio::S<istio::ClientTlsSettings>>,
    /// Where `tls` is written (`spec.subsets[1].trafficPolicy.tls`), for
    /// its messages.
    tls_field: String,
}

impl<'a> Policy<'a> {
    fn merged(
        rule: Option<&'a istio::TrafficPolicy>,
        subset: Option<(usize, &'a istio::TrafficPolicy)>,
        port: Option<u16>,
        origin: &Origin,
        findings: &mut Findings,
    ) -> Policy<'a> {
        let rule = rule.map(|p| Policy::on_port(p, "spec.trafficPolicy", port, origin, findings));
        let subset = subset.map(|(index, p)| {
            let field = format!("spec.subsets[{index}].trafficPolicy");
            Policy::on_port(p, &field, port, origin, findings)
        });
        match (rule, subset) {
            (rule, None) => rule.map(|(rule, _)| rule).unwrap_or_default(),
            (None, Some((subset, _))) | (Some(_), Some((subset, true))) => subset,
            (Some((rule, _)), Some((subset, false))) => {
                let (tls, tls_field) = match subset.tls {
                    Some(tls) => (Some(tls), subset.tls_field),
                    None => (rule.tls, rule.tls_field),
                };
                Policy {
                    load_balancer: subset.load_balancer.or(rule.load_balancer),
                    connection_pool: subset.connection_pool.or(rule.connection_pool),
                    outlier_detection: subset.outlier_detection.or(rule.outlier_detection),
                    tls,
                    tls_field,
                }
            }
        }
    }

    /// The `portLevelSettings` entry at `index` of the policy at `field`.
    fn port_entry(entry: &'a istio::PortTrafficPolicy, field: &str, index: usize) -> Policy<'a> {
        Policy {
            load_balancer: entry.load_balancer.as_ref(),
            connection_pool: entry.connection_pool.as_ref(),
            outlier_detection: entry.outlier_detection.as_ref(),
            tls: entry.tls.as_ref(),
            tls_field: format!("{field}.portLevelSettings[{index}].tls"),
        }
    }

    /// `policy` as it applies on `port`, and whether a `portLevelSettings`
    /// entry gave it. Entries without a port number are errors.
    fn on_port(
        policy: &'a istio::TrafficPolicy,
        field: &str,
        port: Option<u16>,
        origin: &Origin,
        findings: &mut Findings,
    ) -> (Policy<'a>, bool) {
        let mut chosen = None;
        for (index, entry) in policy.port_level_settings.iter().enumerate() {
            let number = entry.port.as_ref().and_then(|p| p.number.as_ref());
            let Some(number) = number.filter(|n| (1..=65535).contains(&***n)) else {
                let (span, problem) = match number {
                    Some(n) => (n.span(), format!("port.number {} is not a valid port", **n)),
                    None => (entry.span(), "has no port.number".to_string()),
                };
                findings.error_once(origin.at(
                    span,
                    format!(
                        "{field}.portLevelSettings[{index}] {problem}. Set `port: {{number: N}}`, N from 1 to 65535: the destination port these settings are for."
                    ),
                ));
                continue;
            };
            // The first entry for the port wins, as in Istio.
            if chosen.is_none() && port == Some(**number as u16) {
                chosen = Some((index, &**entry));
            }
        }
        match chosen {
            Some((index, entry)) => (Policy::port_entry(entry, field, index), true),
            None => (
                Policy {
                    load_balancer: policy.load_balancer.as_ref(),
                    connection_pool: policy.connection_pool.as_ref(),
                    outlier_detection: policy.outlier_detection.as_ref(),
                    tls: policy.tls.as_ref(),
                    tls_field: format!("{field}.tls"),
                },
                false,
            ),
        }
    }
}

struct TrafficSettings {
    lb: LoadBalancer,
    pool: PoolSettings,
    outlier: Option<OutlierPolicy>,
    upgrade_h2: bool,
}

fn traffic_settings(
    policy: &Policy<'_>,
    origin: Option<&Origin>,
    findings: &mut Findings,
) -> TrafficSettings {
    let mut settings = TrafficSettings {
        lb: LoadBalancer::RoundRobin,
        pool: PoolSettings::default(),
        outlier: None,
        upgrade_h2: false,
    };
    let Some(origin) = origin else {
        return settings;
    };
    if let Some(simple) = policy.load_balancer.and_then(|l| l.simple.as_ref()) {
        settings.lb = match simple.to_ascii_uppercase().as_str() {
            "ROUND_ROBIN" | "UNSPECIFIED" => LoadBalancer::RoundRobin,
            "RANDOM" => LoadBalancer::Random,
            "LEAST_REQUEST" | "LEAST_CONN" => LoadBalancer::LeastRequest,
            other => {
                findings.warn_once(origin.at(
                    simple.span(),
                    format!("loadBalancer.simple {other} is not supported by umbra yet; using ROUND_ROBIN"),
                ));
                LoadBalancer::RoundRobin
            }
        };
    }
    if let Some(pool) = policy.connection_pool {
        if let Some(timeout) = pool.tcp.as_ref().and_then(|t| t.connect_timeout.as_ref()) {
            if let Some(d) = duration_or_error(
                origin,
                timeout,
                "connectionPool.tcp.connectTimeout",
                findings,
            ) {
                if d < MIN_POOL_DURATION {
                    findings.error_once(origin.at(
                        timeout.span(),
                        format!("connectionPool.tcp.connectTimeout \"{}\" is under 1ms, which Istio refuses: every connection would time out before it is made. Write a duration such as `1s`, or leave it out for 10s.", timeout.as_str()),
                    ));
                }
                settings.pool.connect_timeout = d;
            }
        }
        // Istio leaves Envoy's threshold unset (unlimited) for 0.
        let limit = |n: &Option<istio::S<u32>>| n.as_ref().map(|n| **n).filter(|&n| n > 0);
        if let Some(tcp) = &pool.tcp {
            settings.pool.max_connections = limit(&tcp.max_connections);
        }
        if let Some(http) = &pool.http {
            settings.pool.max_pending_requests = limit(&http.http1_max_pending_requests);
            settings.pool.max_requests = limit(&http.http2_max_requests);
            settings.pool.max_requests_per_connection = limit(&http.max_requests_per_connection);
            settings.pool.max_retries = limit(&http.max_retries);
            if let Some(idle) = &http.idle_timeout {
                if let Some(d) =
                    duration_or_error(origin, idle, "connectionPool.http.idleTimeout", findings)
                {
                    if d < MIN_POOL_DURATION {
                        findings.error_once(origin.at(
                            idle.span(),
                            format!("connectionPool.http.idleTimeout \"{}\" is under 1ms, which Istio refuses: every connection would close as soon as it is idle, and none would be reused. Write a duration such as `60s`, or leave it out for 90s.", idle.as_str()),
                        ));
                    }
                    settings.pool.idle_timeout = d;
                }
            }
            if let Some(upgrade) = &http.h2_upgrade_policy {
                match upgrade.to_ascii_uppercase().as_str() {
                    "UPGRADE" => settings.upgrade_h2 = true,
                    "DEFAULT" | "DO_NOT_UPGRADE" => {}
                    other => findings.error_once(origin.at(
                        upgrade.span(),
                        format!("h2UpgradePolicy {other} is not valid. Use DEFAULT, DO_NOT_UPGRADE or UPGRADE."),
                    )),
                }
            }
        }
    }
    if let Some(outlier) = policy.outlier_detection {
        settings.outlier = Some(outlier_policy(outlier, origin, findings));
    }
    settings
}

/// `outlierDetection`, with Istio's defaults for what it leaves out.
fn outlier_policy(
    outlier: &istio::S<istio::OutlierDetection>,
    origin: &Origin,
    findings: &mut Findings,
) -> OutlierPolicy {
    let mut policy = OutlierPolicy::default();
    if let Some(n) = &outlier.consecutive_5xx_errors {
        policy.consecutive_5xx = **n;
    }
    if let Some(n) = &outlier.consecutive_gateway_errors {
        policy.consecutive_gateway = **n;
    }
    let field = "outlierDetection.baseEjectionTime";
    if let Some(time) = &outlier.base_ejection_time {
        match duration_or_error(origin, time, field, findings) {
            Some(d) if d >= Duration::from_millis(1) => policy.base_ejection_time = d,
            Some(_) => findings.error_once(origin.at(
                time.span(),
                format!(
                    "{field} \"{}\" is under 1ms, which Istio refuses: an ejected endpoint would be back at once. Write a duration such as `30s`, or leave it out for 30s.",
                    time.as_str()
                ),
            )),
            None => {}
        }
    }
    if let Some(percent) = &outlier.max_ejection_percent {
        match u32::try_from(**percent) {
            // Istio passes on only a percentage above 0: 0 leaves Envoy's
            // default.
            Ok(0) => {}
            Ok(p) if p <= 100 => policy.max_ejection_percent = p,
            _ => findings.error_once(origin.at(
                percent.span(),
                format!("outlierDetection.maxEjectionPercent {} is outside 0–100. Use a percentage such as 10.", **percent),
            )),
        }
    }
    policy
}

/// Go/Istio durations: `1h`, `1m30s`, `1.5s`, `300ms`, `250us`, `10ns`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    let mut total = 0f64;
    let mut rest = text;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let value: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += value * scale;
        rest = &rest[unit_len..];
    }
    (total.is_finite() && total < 1e9).then(|| Duration::from_secs_f64(total))
}

/// The shortest `connectTimeout` and `idleTimeout` Istio's validation
/// accepts; shorter ones would fail every dial or never reuse a connection.
const MIN_POOL_DURATION: Duration = Duration::from_millis(1);

/// A route's `timeout` or `perTryTimeout`: 0 is none (as Envoy reads
/// it), and one above 0 but under 1 ms is an error, as Istio's validation
/// has it: it would time out nearly every request before the upstream
/// could answer.
fn request_timeout(
    origin: &Origin,
    value: &istio::S<String>,
    duration: Duration,
    field: &str,
    findings: &mut Findings,
) -> Option<Duration> {
    if duration.is_zero() {
        return None;
    }
    if duration < Duration::from_millis(1) {
        findings.errors.push(origin.at(
            value.span(),
            format!(
                "{field} \"{}\" is under 1ms, which Istio refuses: requests would time out before the upstream could answer. Write a duration such as `5s`, or `0s` for none.",
                value.as_str()
            ),
        ));
        return None;
    }
    Some(duration)
}

fn duration_or_error(
    origin: &Origin,
    value: &istio::S<String>,
    field: &str,
    findings: &mut Findings,
) -> Option<Duration> {
    let parsed = parse_duration(value);
    if parsed.is_none() {
        // Once: a rule's settings are read for each destination under it.
        findings.error_once(origin.at(
            value.span(),
            format!(
                "{field} \"{}\" is not a duration. Write it like `1.5s`, `300ms` or `1m`.",
                value.as_str()
            ),
        ));
    }
    parsed
}

fn virtual_service(
    parsed: &Parsed<istio::VirtualService>,
    resolver: &mut Resolver<'_>,
    findings: &mut Findings,
) -> Option<VirtualService> {
    let resource = &parsed.resource;
    let origin = &resource.origin;
    let spec = &parsed.spec;
    let errors_before = findings.errors.len();
    let hosts = match &spec.hosts {
        Some(hosts) if !hosts.is_empty() => {
            for host in hosts.iter() {
                // Istio refuses a port here (a host is DNS labels or an IP
                // address); umbra would take it and never match it, since
                // the request's port is left out when matching.
                let name = host.as_str();
                if let Some((bare, port)) = name.rsplit_once(':') {
                    if name.parse::<IpAddr>().is_err() {
                        findings.errors.push(origin.at(
                            host.span(),
                            format!(
                                "spec.hosts \"{name}\" has a port, which a VirtualService host cannot have (the request's port is ignored when its host is matched). Write `{bare}` instead of `{bare}:{port}`, and route by the port with `match: [{{port: {port}}}]`."
                            ),
                        ));
                    }
                }
            }
            hosts.iter().map(|h| host_pattern(h)).collect::<Vec<_>>()
        }
        _ => {
            findings.errors.push(origin.at(
                &resource.name_span,
                format!(
                    "VirtualService \"{}\" has no spec.hosts. Add the host names it serves, e.g. `hosts: [{}]`.",
                    resource.name, resource.name
                ),
            ));
            Vec::new()
        }
    };
    for gateway in &spec.gateways {
        if gateway.as_str() != "mesh" {
            findings.warnings.push(origin.at(
                gateway.span(),
                format!(
                    "spec.gateways \"{}\" is not supported by umbra (it serves every listener as one); ignored",
                    gateway.as_str()
                ),
            ));
        }
    }
    let policy = mirror_policy(resource, findings);
    let mut routes = Vec::new();
    for (index, http) in spec.http.iter().enumerate() {
        let path = format!("spec.http[{index}]");
        if let Some(route) = http_route(parsed, http, index, &path, &policy, resolver, findings) {
            routes.push(Arc::new(route));
        }
    }
    if spec.http.is_empty() {
        findings.warnings.push(origin.at(
            &resource.name_span,
            format!(
                "VirtualService \"{}\" has no spec.http routes; requests to its hosts get 404",
                resource.name
            ),
        ));
    }
    (findings.errors.len() == errors_before).then(|| VirtualService {
        name: resource.name.clone(),
        namespace: resource.namespace.clone(),
        hosts,
        routes,
    })
}

/// Routes are counted, analysed and judged by name (the metrics' `route`
/// label, the analysis report's routes): two routes with one name are
/// counted as one, and their verdict is a blend of both. Istio allows
/// that, so it is a warning at each later use of the name.
fn shared_route_names(virtual_services: &[Parsed<istio::VirtualService>], findings: &mut Findings) {
    let mut first: HashMap<String, (String, usize)> = HashMap::new();
    for vs in virtual_services {
        let resource = &vs.resource;
        for (index, http) in vs.spec.http.iter().enumerate() {
            // As `http_route` names it.
            let (name, span) = match &http.name {
                Some(name) => (name.as_str().to_string(), *name.span()),
                None => (
                    format!("{}.http[{index}]", resource.name),
                    resource.name_span,
                ),
            };
            if let Some((file, line)) = first.get(&name) {
                findings.warnings.push(resource.origin.at(
                    &span,
                    format!(
                        "route name `{name}` (spec.http[{index}] of VirtualService \"{}\") is already used at {file}:{line}, so their metrics and shadow analysis are counted as one route. Give each route its own `name`.",
                        resource.name
                    ),
                ));
            } else {
                let at = resource.origin.at(&span, "");
                first.insert(name, (at.file, at.line));
            }
        }
    }
}

/// A host is served by the first VirtualService that names it (as the
/// router takes it): a later one naming it too never sees its requests,
/// which `istioctl analyze` calls undefined behaviour (IST0109). Istio
/// takes that config, so it is a warning, at each later one.
fn shared_hosts(virtual_services: &[Parsed<istio::VirtualService>], findings: &mut Findings) {
    let mut first: HashMap<String, (usize, &str, String, usize)> = HashMap::new();
    for (index, vs) in virtual_services.iter().enumerate() {
        let resource = &vs.resource;
        let hosts = vs.spec.hosts.iter().flat_map(|hosts| hosts.iter());
        for host in hosts {
            // As the router keys it: a short name by its namespace.
            let key = match host.contains('*') {
                true => host.to_ascii_lowercase(),
                false => canonical_host(host, &resource.namespace),
            };
            match first.get(&key) {
                Some((owner, name, file, line)) if *owner != index => {
                    findings.warnings.push(resource.origin.at(
                        host.span(),
                        format!(
                            "spec.hosts \"{}\" is served by VirtualService \"{name}\" already ({file}:{line}), so requests for it never reach the routes of VirtualService \"{}\" (istioctl analyze reports this as IST0109). Merge the routes into one VirtualService.",
                            host.as_str(),
                            resource.name
                        ),
                    ));
                }
                Some(_) => {}
                None => {
                    let at = resource.origin.at(&resource.name_span, "");
                    first.insert(key, (index, &resource.name, at.file, at.line));
                }
            }
        }
    }
}

fn host_pattern(host: &str) -> HostPattern {
    let host = host.to_ascii_lowercase();
    if host == "*" {
        HostPattern::Any
    } else if let Some(suffix) = host.strip_prefix('*') {
        HostPattern::Suffix(suffix.to_string())
    } else {
        HostPattern::Exact(host)
    }
}

fn mirror_policy(resource: &Resource, findings: &mut Findings) -> MirrorPolicy {
    let origin = &resource.origin;
    let mut policy = MirrorPolicy::default();
    for (key, (value, span)) in &resource.annotations {
        if !key.starts_with("umbra.io/") {
            continue;
        }
        let mut bad = |expected: &str| {
            findings.errors.push(origin.at(
                span,
                format!("annotation {key}: \"{value}\" is not valid. {expected}"),
            ));
        };
        match key.as_str() {
            "umbra.io/mirror-sampling" => match value.as_str() {
                "request-id" => policy.sample_by_request_id = true,
                "random" => policy.sample_by_request_id = false,
                _ => bad("Use `random` or `request-id`."),
            },
            "umbra.io/shadow-host-suffix" => match value.as_str() {
                "true" => policy.host_suffix = true,
                "false" => policy.host_suffix = false,
                _ => bad("Use \"true\" or \"false\"."),
            },
            "umbra.io/mirror-methods" => {
                let methods: Result<Vec<Method>, _> = value
                    .split(',')
                    .map(|m| m.trim().to_ascii_uppercase())
                    .filter(|m| !m.is_empty())
                    .map(|m| Method::from_bytes(m.as_bytes()))
                    .collect();
                match methods {
                    Ok(methods) if !methods.is_empty() => policy.methods = Some(methods),
                    _ => bad("List HTTP methods separated by commas, e.g. \"GET,HEAD\"."),
                }
            }
            "umbra.io/mirror-remove-headers" => {
                let names: Result<Vec<Header>, _> = value
                    .split(',')
                    .map(str::trim)
                    .filter(|n| !n.is_empty())
                    .map(|n| HeaderName::from_bytes(n.as_bytes()).map(Header))
                    .collect();
                match names {
                    Ok(names) => policy.remove_headers = names,
                    Err(_) => {
                        bad("List header names separated by commas, e.g. \"authorization,cookie\".")
                    }
                }
            }
            "umbra.io/mirror-max-body-bytes" => match parse_bytes(value) {
                Some(bytes) => policy.max_body_bytes = bytes,
                None => bad("Give a byte count such as \"1048576\", \"512Ki\" or \"4Mi\"."),
            },
            _ => findings.warnings.push(origin.at(
                span,
                format!(
                    "annotation {key} is not known to umbra and is ignored (known: {})",
                    ANNOTATIONS.join(", ")
                ),
            )),
        }
    }
    policy
}

/// `1048576`, `512Ki`, `4Mi`, `1Gi`, `64k`, `1M`.
fn parse_bytes(text: &str) -> Option<u64> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let number: u64 = text[..digits].parse().ok()?;
    let scale = match &text[digits..] {
        "" => 1,
        "k" | "K" => 1000,
        "M" => 1000 * 1000,
        "G" => 1000 * 1000 * 1000,
        "Ki" => 1024,
        "Mi" => 1024 * 1024,
        "Gi" => 1024 * 1024 * 1024,
        _ => return None,
    };
    number.checked_mul(scale)
}

#[allow(clippy::too_many_arguments)]
fn http_route(
    parsed: &Parsed<istio::VirtualService>,
    http: &istio::S<istio::HttpRoute>,
    index: usize,
    path: &str,
    policy: &MirrorPolicy,
    resolver: &mut Resolver<'_>,
    findings: &mut Findings,
) -> Option<Route> {
    let resource = &parsed.resource;
    let origin = &resource.origin;
    let namespace = &resource.namespace;
    let before = findings.errors.len();
    let name = http
        .name
        .as_ref()
        .map(|n| n.as_str().to_string())
        .unwrap_or_else(|| format!("{}.http[{index}]", resource.name));

    let matches: Vec<RequestMatch> = http
        .matches
        .iter()
        .enumerate()
        .filter_map(|(i, m)| {
            let path = format!("{path}.match[{i}]");
            request_match(origin, &resource.spec, m, &path, findings)
        })
        .collect();

    let mut destinations = Vec::new();
    match &http.route {
        Some(route) if !route.is_empty() => {
            // Weights are relative, as in Istio (a destination gets
            // weight / sum of weights; a missing one is 0); the only
            // destination of a route gets everything, whatever its weight.
            let mut sum = 0i64;
            for (i, item) in route.iter().enumerate() {
                let item_path = format!("{path}.route[{i}]");
                let weight = match &item.weight {
                    Some(w) if **w < 0 || **w > i64::from(i32::MAX) => {
                        findings.errors.push(origin.at(
                            w.span(),
                            format!("{item_path}.weight {} is not a weight. Use a whole number from 0 to 2147483647 (weights are relative: 1 and 3 send a quarter and three quarters).", **w),
                        ));
                        0
                    }
                    _ if route.len() == 1 => 100,
                    Some(w) => **w,
                    None => 0,
                };
                sum += weight;
                let Some(destination) = &item.destination else {
                    findings.errors.push(origin.at(
                        item.span(),
                        format!("{item_path}.destination is missing. Add `destination: {{host: ...}}`."),
                    ));
                    continue;
                };
                let Some(resolved) = resolver.resolve(
                    origin,
                    destination,
                    namespace,
                    &format!("{item_path}.destination"),
                    findings,
                ) else {
                    continue;
                };
                destinations.push(WeightedDestination {
                    weight: weight as u32,
                    destination: resolved,
                    headers: header_rules(origin, item.headers.as_ref(), &item_path, findings),
                });
            }
            if route.len() > 1 && sum == 0 {
                findings.errors.push(origin.at(
                    route.span(),
                    format!("weights of {path}.route add up to 0, so no destination would get traffic. Give at least one a `weight` above 0 (weights are relative: 1 and 3 send a quarter and three quarters)."),
                ));
            }
            if sum > i64::from(u32::MAX) {
                findings.errors.push(origin.at(
                    route.span(),
                    format!("weights of {path}.route add up to {sum}, more than 4294967295. Scale them down: only their proportions matter."),
                ));
            }
        }
        _ if http.redirect.is_some() || http.direct_response.is_some() => {}
        _ => findings.errors.push(origin.at(
            http.span(),
            format!("{path} has no `route`, `redirect` or `directResponse`. Add at least one `route: [{{destination: {{host: ...}}}}]`."),
        )),
    }
    let answer = answer(origin, http, path, findings);
    let mut cors = http.cors_policy.as_ref().and_then(|policy| {
        let path = format!("{path}.corsPolicy");
        cors(origin, policy, &path, findings)
    });
    if let (Some(_), Some(policy)) = (&answer, &http.cors_policy) {
        findings.warnings.push(origin.at(
            policy.span(),
            format!("{path}.corsPolicy is not applied: the route answers itself (`redirect` or `directResponse`), and Envoy's CORS filter runs only on routes that forward. Move it to the route that serves the resource."),
        ));
        cors = None;
    }

    let timeout = http.timeout.as_ref().and_then(|t| {
        let field = format!("{path}.timeout");
        let d = duration_or_error(origin, t, &field, findings)?;
        request_timeout(origin, t, d, &field, findings)
    });
    // Without `retries`, Istio's mesh default (`defaultHttpRetryPolicy`):
    // two retries on its default conditions. `attempts: 0` turns it off.
    let retries = match &http.retries {
        Some(r) => retry_policy(origin, r, path, findings),
        None => Some(RetryPolicy {
            attempts: 2,
            per_try_timeout: None,
            retry_on: RetryOn::istio_default(),
            backoff: RetryPolicy::BACKOFF,
        }),
    };
    let rewrite = http
        .rewrite
        .as_ref()
        .and_then(|r| rewrite(origin, r, &format!("{path}.rewrite"), findings));
    let headers = header_rules(origin, http.headers.as_ref(), path, findings);
    authority_set_once(origin, http, path, findings);
    let mut mirrors = mirrors(http, path, origin, namespace, resolver, findings);
    if answer.is_some() && !mirrors.is_empty() {
        let span = (http.mirror.as_ref().map(|m| m.span()))
            .or(http.mirrors.as_ref().map(|m| m.span()))
            .unwrap_or(http.span());
        findings.warnings.push(origin.at(
            span,
            format!("{path} answers itself (`redirect` or `directResponse`), so its mirror is never sent: like Envoy, umbra mirrors only requests it forwards. Remove the mirror, or mirror from a route that forwards."),
        ));
        mirrors.clear();
    }
    let fault = http
        .fault
        .as_ref()
        .and_then(|f| fault(origin, f, &format!("{path}.fault"), findings));

    (findings.errors.len() == before).then(|| Route {
        name,
        virtual_service: resource.name.clone(),
        matches,
        destinations,
        timeout,
        retries,
        rewrite,
        headers,
        mirrors,
        mirror_policy: policy.clone(),
        fault,
        answer,
        cors,
    })
}

/// Istio's `rewrite`, checked as Istio's `validateHTTPRewrite`. Istio
/// drops an empty `uri` or `authority` rather than rewriting to "".
fn rewrite(
    origin: &Origin,
    written: &istio::S<istio::HttpRewrite>,
    path: &str,
    findings: &mut Findings,
) -> Option<Rewrite> {
    let uri = written.uri.clone().filter(|uri| !uri.is_empty());
    let authority = written.authority.clone().filter(|a| !a.is_empty());
    let uri_regex = match &written.uri_regex_rewrite {
        None => None,
        Some(_) if uri.is_some() => {
            findings.errors.push(origin.at(
                written.span(),
                format!("{path} has both `uri` and `uriRegexRewrite`; Istio takes one. Keep one."),
            ));
            return None;
        }
        Some(regex) => {
            let field = format!("{path}.uriRegexRewrite");
            let (Some(pattern), Some(rewrite)) =
                (non_empty(&regex.pattern), non_empty(&regex.rewrite))
            else {
                findings.errors.push(origin.at(
                    regex.span(),
                    format!("{field} needs both `match` and `rewrite`, as in Istio. Add the missing one, e.g. `{{match: ^/v1/(.*), rewrite: /v2/\\1}}`."),
                ));
                return None;
            };
            match Regex::new(pattern) {
                Ok(compiled) => Some(RegexRewrite {
                    pattern: compiled,
                    substitution: rewrite.to_string(),
                }),
                Err(error) => {
                    let reason = error.to_string();
                    let reason = reason.lines().last().unwrap_or("invalid").trim();
                    let reason = reason.trim_start_matches("error: ");
                    findings.errors.push(origin.at(
                        pattern.span(),
                        format!("{field}.match \"{}\" is not a valid regular expression ({reason}). Fix the pattern (RE2 syntax).", pattern.as_str()),
                    ));
                    return None;
                }
            }
        }
    };
    if uri.is_none() && authority.is_none() && uri_regex.is_none() {
        findings.errors.push(origin.at(
            written.span(),
            format!("{path} changes nothing: Istio requires a `uri`, `uriRegexRewrite` or `authority`. Add one, or remove `rewrite`."),
        ));
        return None;
    }
    Some(Rewrite {
        uri,
        authority,
        uri_regex,
    })
}

/// The methods Istio's validation takes in `corsPolicy.allowMethods`.
const CORS_METHODS: [&str; 10] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "*",
];

/// Istio's `corsPolicy`, checked as Istio's validation checks it.
fn cors(
    origin: &Origin,
    policy: &istio::S<istio::CorsPolicy>,
    path: &str,
    findings: &mut Findings,
) -> Option<Cors> {
    let before = findings.errors.len();
    let mut origins = Vec::new();
    for (i, allowed) in policy.allow_origins.iter().flatten().enumerate() {
        let at = format!("{path}.allowOrigins[{i}]");
        if let Some(matcher) = string_match(origin, allowed, None, &at, false, findings) {
            origins.push(matcher);
        }
    }
    if let Some(old) = &policy.allow_origin {
        let span = old.first().map_or(policy.span(), |o| o.span());
        findings.warnings.push(origin.at(
            span,
            format!("{path}.allowOrigin is deprecated in Istio; read as exact matches. Write `allowOrigins: [{{exact: ...}}]`."),
        ));
        if policy.allow_origins.is_none() {
            origins.extend(old.iter().map(|o| StringMatch::Exact(o.to_string())));
        }
    }
    for method in policy.allow_methods.iter().flatten() {
        if !CORS_METHODS.contains(&method.as_str()) {
            findings.errors.push(origin.at(
                method.span(),
                format!("{path}.allowMethods: \"{}\" is not a method Istio takes. Use GET, HEAD, POST, PUT, DELETE, CONNECT, OPTIONS, TRACE, PATCH or *.", method.as_str()),
            ));
        }
    }
    let names = |list: &Option<Vec<istio::S<String>>>, field: &str, findings: &mut Findings| {
        let list = list.as_ref().filter(|l| !l.is_empty())?;
        for name in list {
            header_name(origin, name, &format!("{path}.{field}"), findings);
        }
        Some(
            list.iter()
                .map(|n| n.as_str())
                .collect::<Vec<_>>()
                .join(","),
        )
    };
    let headers = names(&policy.allow_headers, "allowHeaders", findings);
    let expose = names(&policy.expose_headers, "exposeHeaders", findings);
    let methods = (policy.allow_methods.as_ref())
        .filter(|m| !m.is_empty())
        .map(|m| m.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(","));
    let max_age = policy.max_age.as_ref().and_then(|age| {
        let field = format!("{path}.maxAge");
        let parsed = duration_or_error(origin, age, &field, findings)?;
        if parsed.subsec_nanos() != 0 {
            findings.errors.push(origin.at(
                age.span(),
                format!("{field} \"{}\" has a fraction of a second; Istio takes whole seconds. Write it like `24h` or `600s`.", age.as_str()),
            ));
        }
        Some(parsed.as_secs())
    });
    let forward_unmatched = match policy.unmatched_preflights.as_ref() {
        None => true,
        Some(value) => match value.as_str() {
            "UNSPECIFIED" | "FORWARD" => true,
            "IGNORE" => false,
            other => {
                findings.errors.push(origin.at(
                    value.span(),
                    format!("{path}.unmatchedPreflights \"{other}\" is not one Istio knows. Write FORWARD or IGNORE."),
                ));
                true
            }
        },
    };
    (findings.errors.len() == before).then(|| Cors {
        origins,
        methods,
        headers,
        expose,
        max_age,
        credentials: policy.allow_credentials.as_ref().is_some_and(|c| **c),
        forward_unmatched,
    })
}

/// Istio's `redirect` or `directResponse`, checked as Istio's validation
/// checks them, with what they may not be combined with.
fn answer(
    origin: &Origin,
    http: &istio::HttpRoute,
    path: &str,
    findings: &mut Findings,
) -> Option<Answer> {
    let (own, span) = match (&http.redirect, &http.direct_response) {
        (None, None) => return None,
        (Some(redirect), Some(_)) => {
            findings.errors.push(origin.at(
                redirect.span(),
                format!("{path} has both `redirect` and `directResponse`, which Istio refuses. Keep one."),
            ));
            return None;
        }
        (Some(redirect), None) => ("redirect", redirect.span()),
        (None, Some(direct)) => ("directResponse", direct.span()),
    };
    let others = [
        (
            "route",
            http.route.as_ref().is_some_and(|r| !r.is_empty()),
            "a route that answers itself forwards nothing",
        ),
        (
            "fault",
            http.fault.is_some(),
            "there is nothing to inject a fault into",
        ),
        (
            "rewrite",
            http.rewrite.is_some(),
            "no request goes upstream to be rewritten",
        ),
    ];
    for (other, _, why) in others.iter().filter(|(_, present, _)| *present) {
        findings.errors.push(origin.at(
            span,
            format!("{path} has both `{other}` and `{own}`, which Istio refuses: {why}. Keep one, in a route of its own."),
        ));
    }
    match (&http.redirect, &http.direct_response) {
        (Some(redirect), _) => {
            redirect_answer(origin, redirect, &format!("{path}.redirect"), findings)
        }
        (_, Some(direct)) => {
            direct_answer(origin, direct, &format!("{path}.directResponse"), findings)
        }
        (None, None) => None,
    }
}

/// A string field that is set and not empty (Istio takes "" for unset).
fn non_empty(text: &Option<istio::S<String>>) -> Option<&istio::S<String>> {
    text.as_ref().filter(|t| !t.is_empty())
}

/// The redirect codes Istio translates for Envoy.
const REDIRECT_CODES: [i64; 5] = [301, 302, 303, 307, 308];

fn redirect_answer(
    origin: &Origin,
    redirect: &istio::S<istio::HttpRedirect>,
    path: &str,
    findings: &mut Findings,
) -> Option<Answer> {
    let before = findings.errors.len();
    let (uri, authority) = (non_empty(&redirect.uri), non_empty(&redirect.authority));
    let scheme = non_empty(&redirect.scheme);
    if uri.is_none()
        && authority.is_none()
        && scheme.is_none()
        && redirect.port.is_none()
        && redirect.derive_port.is_none()
    {
        findings.errors.push(origin.at(
            redirect.span(),
            format!("{path} changes nothing: Istio requires a `uri`, `authority`, `scheme` or `port`. Add the part of the URL to change."),
        ));
    }
    // Envoy puts a `/` before a path without one (Istio takes `login` as
    // it takes `/login`), so only the rest must make a path.
    let is_path = |uri: &str| match uri.starts_with('/') {
        true => uri.parse::<http::uri::PathAndQuery>().is_ok(),
        false => format!("/{uri}").parse::<http::uri::PathAndQuery>().is_ok(),
    };
    if let Some(uri) = uri.filter(|u| u.contains("%PREFIX()%")) {
        // Taken for a path, it would be sent as `/%PREFIX()%/v2`.
        findings.errors.push(origin.at(
            uri.span(),
            format!(
                "{path}.uri \"{}\" uses `%PREFIX()%` (the Gateway API's prefix replacement), which umbra does not implement. Write the whole path.",
                uri.as_str()
            ),
        ));
    } else if let Some(uri) = uri.filter(|u| !is_path(u)) {
        findings.errors.push(origin.at(
            uri.span(),
            format!(
                "{path}.uri \"{}\" is not a path. Write it like `/v2/login` or `/login?next=home`.",
                uri.as_str()
            ),
        ));
    }
    if let Some(authority) = authority.filter(|a| a.parse::<http::uri::Authority>().is_err()) {
        findings.errors.push(origin.at(
            authority.span(),
            format!("{path}.authority \"{}\" is not a host. Write it like `example.com` or `example.com:8443`.", authority.as_str()),
        ));
    }
    if let Some(scheme) = scheme.filter(|s| !matches!(s.as_str(), "http" | "https")) {
        findings.errors.push(origin.at(
            scheme.span(),
            format!(
                "{path}.scheme \"{}\" is not `http` or `https`, the two Istio takes.",
                scheme.as_str()
            ),
        ));
    }
    let port = match (&redirect.port, &redirect.derive_port) {
        (Some(port), Some(_)) => {
            findings.errors.push(origin.at(
                port.span(),
                format!("{path} sets both `port` and `derivePort`; Istio takes one. Keep one."),
            ));
            RedirectPort::Default
        }
        (Some(port), None) => match u16::try_from(**port) {
            Ok(number) if number > 0 => RedirectPort::Port(number),
            _ => {
                findings.errors.push(origin.at(
                    port.span(),
                    format!("{path}.port {} is outside 1–65535.", **port),
                ));
                RedirectPort::Default
            }
        },
        (None, Some(derive)) => match derive.as_str() {
            "FROM_PROTOCOL_DEFAULT" => RedirectPort::Default,
            "FROM_REQUEST_PORT" => RedirectPort::FromRequest,
            other => {
                findings.errors.push(origin.at(
                    derive.span(),
                    format!("{path}.derivePort \"{other}\" is not one Istio knows. Write FROM_PROTOCOL_DEFAULT or FROM_REQUEST_PORT."),
                ));
                RedirectPort::Default
            }
        },
        (None, None) => RedirectPort::Default,
    };
    let code = match &redirect.redirect_code {
        None => 301,
        Some(code) if REDIRECT_CODES.contains(&**code) => **code as u16,
        Some(code) => {
            findings.errors.push(origin.at(
                code.span(),
                format!("{path}.redirectCode {} is not a redirect Istio sends. Use 301, 302, 303, 307 or 308.", **code),
            ));
            301
        }
    };
    (findings.errors.len() == before).then(|| {
        Answer::Redirect(Redirect {
            uri: uri.map(|u| u.to_string()),
            authority: authority.map(|a| a.to_string()),
            port,
            scheme: scheme.map(|s| s.to_string()),
            code,
        })
    })
}

/// Istio warns of a `directResponse` body this large.
const LARGE_DIRECT_BODY: usize = 1024 * 1024;

fn direct_answer(
    origin: &Origin,
    direct: &istio::S<istio::HttpDirectResponse>,
    path: &str,
    findings: &mut Findings,
) -> Option<Answer> {
    let before = findings.errors.len();
    let status = match &direct.status {
        Some(status) if (200..=599).contains(&**status) => **status as u16,
        Some(status) => {
            findings.errors.push(origin.at(
                status.span(),
                format!(
                    "{path}.status {} is not an HTTP status from 200 to 599.",
                    **status
                ),
            ));
            0
        }
        None => {
            findings.errors.push(origin.at(
                direct.span(),
                format!("{path} has no `status`. Add one, e.g. `status: 503`."),
            ));
            0
        }
    };
    let body = match direct.body.as_ref().map(|b| (b, &b.string, &b.bytes)) {
        None | Some((_, None, None)) => bytes::Bytes::new(),
        Some((body, Some(_), Some(_))) => {
            findings.errors.push(origin.at(
                body.span(),
                format!("{path}.body sets both `string` and `bytes`; Istio takes one. Keep one."),
            ));
            bytes::Bytes::new()
        }
        Some((_, Some(text), None)) => bytes::Bytes::from(text.as_str().to_string()),
        Some((_, None, Some(encoded))) => {
            use base64::Engine;
            match base64::engine::general_purpose::STANDARD.decode(encoded.as_str()) {
                Ok(decoded) => bytes::Bytes::from(decoded),
                Err(error) => {
                    findings.errors.push(origin.at(
                        encoded.span(),
                        format!("{path}.body.bytes is not base64 ({error}). Encode the body with `base64`, or write it as `string`."),
                    ));
                    bytes::Bytes::new()
                }
            }
        }
    };
    if body.len() > LARGE_DIRECT_BODY {
        findings.warnings.push(origin.at(
            direct.span(),
            format!("{path}.body is {} bytes: Istio warns that bodies over 1 MiB slow its control plane, and umbra holds it in memory. Serve it from a backend instead.", body.len()),
        ));
    }
    (findings.errors.len() == before).then_some(Answer::Direct { status, body })
}

/// gRPC's status codes by name, as Istio takes `grpcStatus`.
const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// Istio's `fault`, checked as Istio's validation does.
fn fault(
    origin: &Origin,
    fault: &istio::S<istio::HttpFaultInjection>,
    path: &str,
    findings: &mut Findings,
) -> Option<Fault> {
    let before = findings.errors.len();
    if fault.delay.is_none() && fault.abort.is_none() {
        findings.errors.push(origin.at(
            fault.span(),
            format!("{path} has neither `delay` nor `abort`. Add one, e.g. `abort: {{httpStatus: 503, percentage: {{value: 10}}}}`, or remove `fault`."),
        ));
    }
    // Istio injects nothing without a percentage: say so, as it is rarely
    // what is meant.
    let per_million = |percentage: Option<&istio::S<istio::Percent>>,
                       old: Option<&istio::S<u32>>,
                       span: &Span,
                       field: &str,
                       findings: &mut Findings| {
        if let Some(old) = old {
            let replaced = match percentage {
                Some(_) => {
                    " `percentage` is set too and is the one used: drop this one.".to_string()
                }
                None => format!(" Use `percentage: {{value: {}}}`.", **old),
            };
            findings.warnings.push(origin.at(
                old.span(),
                format!("{path}.{field}.percent is deprecated.{replaced}"),
            ));
        }
        let value = match (percentage, old) {
            (Some(percentage), _) => percentage.value.as_ref().map(|v| (**v, *v.span())),
            (None, Some(old)) => Some((f64::from(**old), *old.span())),
            (None, None) => None,
        };
        let Some((value, at)) = value else {
            findings.warnings.push(origin.at(
                span,
                format!("{path}.{field} has no percentage, which Istio reads as 0: no request gets it. Add `percentage: {{value: 100}}` for every request."),
            ));
            return Some(0);
        };
        if !(0.0..=100.0).contains(&value) || !value.is_finite() {
            findings.errors.push(origin.at(
                &at,
                format!("{path}.{field}.percentage.value {value} is outside 0–100. Use a percentage such as 10.0."),
            ));
            return None;
        }
        Some((value * 10_000.0).round() as u32)
    };
    let delay = fault.delay.as_ref().and_then(|delay| {
        let per_million = per_million(
            delay.percentage.as_ref(),
            delay.percent.as_ref(),
            delay.span(),
            "delay",
            findings,
        );
        let Some(fixed) = &delay.fixed_delay else {
            findings.errors.push(origin.at(
                delay.span(),
                format!("{path}.delay has no `fixedDelay`. Add one, e.g. `fixedDelay: 5s`."),
            ));
            return None;
        };
        let fixed = duration_or_error(origin, fixed, &format!("{path}.delay.fixedDelay"), findings)
            .and_then(|duration| {
                if duration < Duration::from_millis(1) {
                    findings.errors.push(origin.at(
                        fixed.span(),
                        format!("{path}.delay.fixedDelay must be at least 1ms, as in Istio."),
                    ));
                    return None;
                }
                Some(duration)
            })?;
        Some(FaultDelay {
            fixed,
            per_million: per_million?,
        })
    });
    let abort = fault.abort.as_ref().and_then(|abort| {
        let per_million = per_million(abort.percentage.as_ref(), None, abort.span(), "abort", findings);
        let reply = match (&abort.http_status, &abort.grpc_status) {
            (Some(_), Some(grpc)) => {
                findings.errors.push(origin.at(
                    grpc.span(),
                    format!("{path}.abort sets both `httpStatus` and `grpcStatus`. Keep one."),
                ));
                None
            }
            (Some(status), None) => match u16::try_from(**status) {
                Ok(code @ 200..=599) => Some(AbortReply::Http(code)),
                _ => {
                    findings.errors.push(origin.at(
                        status.span(),
                        format!("{path}.abort.httpStatus {} is not an HTTP status from 200 to 599.", **status),
                    ));
                    None
                }
            },
            (None, Some(name)) => match GRPC_CODES.iter().position(|code| *code == name.as_str()) {
                Some(code) => Some(AbortReply::Grpc(code as u8)),
                None => {
                    findings.errors.push(origin.at(
                        name.span(),
                        format!(
                            "{path}.abort.grpcStatus \"{}\" is not a gRPC status name. Use one of {}, in capitals, as Istio takes them.",
                            name.as_str(),
                            GRPC_CODES.join(", ")
                        ),
                    ));
                    None
                }
            },
            (None, None) => {
                findings.errors.push(origin.at(
                    abort.span(),
                    format!("{path}.abort has no `httpStatus`. Add one, e.g. `httpStatus: 503`, or `grpcStatus: UNAVAILABLE` for gRPC."),
                ));
                None
            }
        };
        Some(FaultAbort {
            reply: reply?,
            per_million: per_million?,
        })
    });
    (findings.errors.len() == before).then_some(Fault { delay, abort })
}

fn mirrors(
    http: &istio::HttpRoute,
    path: &str,
    origin: &Origin,
    namespace: &str,
    resolver: &mut Resolver<'_>,
    findings: &mut Findings,
) -> Vec<Mirror> {
    let mut out = Vec::new();
    if let (Some(mirror), Some(list)) = (&http.mirror, &http.mirrors) {
        findings.errors.push(origin.at(
            list.span(),
            format!("{path} sets both `mirror` and `mirrors`. Use one: move the `mirror` destination into `mirrors`, or drop `mirrors`."),
        ));
        let _ = mirror;
        return out;
    }
    let percent_of = |percent: &istio::S<istio::Percent>, field: &str, findings: &mut Findings| {
        let Some(spanned) = &percent.value else {
            findings.warnings.push(origin.at(
                percent.span(),
                format!("{path}.{field} is not set, which Istio reads as 0: nothing is mirrored. Set it, e.g. `value: 100`."),
            ));
            return Some(0);
        };
        let value = **spanned;
        if !(0.0..=100.0).contains(&value) || !value.is_finite() {
            findings.errors.push(origin.at(
                spanned.span(),
                format!("{path}.{field} {value} is outside 0–100. Use a percentage such as 10.0."),
            ));
            return None;
        }
        Some((value * 10_000.0).round() as u32)
    };
    if let Some(mirror) = &http.mirror {
        let mut per_million = Some(1_000_000);
        let old = (http.mirror_percent.as_ref().map(|v| ("mirror_percent", v)))
            .or_else(|| (http.mirror_percent_camel.as_ref()).map(|v| ("mirrorPercent", v)));
        if let (Some(first), Some(second)) = (&http.mirror_percent, &http.mirror_percent_camel) {
            // Two spellings of one Istio field: which one counts would be a guess.
            let at = origin.at(first.span(), "");
            findings.errors.push(origin.at(
                second.span(),
                format!(
                    "{path}.mirrorPercent sets the field `mirror_percent` already sets at {}:{}. Keep one, better as `mirrorPercentage: {{value: ...}}`.",
                    at.line, at.column
                ),
            ));
            per_million = None;
        }
        if let Some((name, old)) = old {
            let replaced = match &http.mirror_percentage {
                Some(_) => " `mirrorPercentage` is set too and is the one used, as in Istio: drop this one.".to_string(),
                None => format!(" Use `mirrorPercentage: {{value: {}}}`.", **old),
            };
            findings.warnings.push(origin.at(
                old.span(),
                format!("{path}.{name} is deprecated.{replaced}"),
            ));
            if **old > 100 {
                findings.errors.push(origin.at(
                    old.span(),
                    format!(
                        "{path}.{name} {} is outside 0–100. Use a percentage.",
                        **old
                    ),
                ));
                per_million = None;
            } else {
                per_million = per_million.map(|_| **old * 10_000);
            }
        }
        if let Some(percent) = &http.mirror_percentage {
            let percent = percent_of(percent, "mirrorPercentage.value", findings);
            per_million = per_million.and(percent);
        }
        let resolved = resolver.resolve(
            origin,
            mirror,
            namespace,
            &format!("{path}.mirror"),
            findings,
        );
        if let (Some(destination), Some(per_million)) = (resolved, per_million) {
            out.push(Mirror {
                label: destination.label(),
                destination,
                per_million,
            });
        }
    } else {
        for stray in [
            http.mirror_percentage.as_ref().map(|p| *p.span()),
            http.mirror_percent.as_ref().map(|p| *p.span()),
            http.mirror_percent_camel.as_ref().map(|p| *p.span()),
        ]
        .into_iter()
        .flatten()
        {
            findings.warnings.push(origin.at(
                &stray,
                format!("{path} sets a mirror percentage but no `mirror`; it has no effect"),
            ));
        }
    }
    if let Some(list) = &http.mirrors {
        for (i, item) in list.iter().enumerate() {
            let item_path = format!("{path}.mirrors[{i}]");
            let Some(destination) = &item.destination else {
                findings.errors.push(origin.at(
                    item.span(),
                    format!(
                        "{item_path}.destination is missing. Add `destination: {{host: ...}}`."
                    ),
                ));
                continue;
            };
            let per_million = match &item.percentage {
                Some(p) => percent_of(p, &format!("mirrors[{i}].percentage.value"), findings),
                None => Some(1_000_000),
            };
            let resolved = resolver.resolve(
                origin,
                destination,
                namespace,
                &format!("{item_path}.destination"),
                findings,
            );
            if let (Some(destination), Some(per_million)) = (resolved, per_million) {
                out.push(Mirror {
                    label: destination.label(),
                    destination,
                    per_million,
                });
            }
        }
    }
    out
}

/// `spec` is the VirtualService's spec as written, for the keys of a
/// matcher the model does not read.
fn request_match(
    origin: &Origin,
    spec: &marked_yaml::Node,
    m: &istio::S<istio::HttpMatchRequest>,
    path: &str,
    findings: &mut Findings,
) -> Option<RequestMatch> {
    let before = findings.errors.len();
    let string = |value: &istio::S<istio::StringMatch>,
                  field: &str,
                  allow_empty: bool,
                  findings: &mut Findings| {
        let path = format!("{path}.{field}");
        let written = path
            .strip_prefix("spec.")
            .and_then(|inner| document::node_at(spec, inner));
        string_match(origin, value, written, &path, allow_empty, findings)
    };
    let uri = m
        .uri
        .as_ref()
        .and_then(|u| string(u, "uri", false, findings));
    let method = m
        .method
        .as_ref()
        .and_then(|u| string(u, "method", false, findings));
    // Methods are matched case-sensitively, as in Envoy, and sent in
    // capitals: `get` would never match.
    let lower = match &method {
        Some(StringMatch::Exact(text) | StringMatch::Prefix(text)) => {
            text.chars().any(|c| c.is_ascii_lowercase()).then_some(text)
        }
        _ => None,
    };
    if let (Some(text), Some(written)) = (lower, &m.method) {
        findings.warnings.push(origin.at(
            written.span(),
            format!("{path}.method \"{text}\" has lower-case letters, but methods are matched as sent, case-sensitively, and clients send them in capitals: it never matches. Write \"{}\".", text.to_ascii_uppercase()),
        ));
    }
    let authority = m
        .authority
        .as_ref()
        .and_then(|u| string(u, "authority", false, findings));
    let mut headers = Vec::new();
    for (name, value) in sorted(&m.headers) {
        let field = format!("headers.{}", name.as_str());
        if let (Some(header), Some(matcher)) = (
            header_name(origin, name, &format!("{path}.{field}"), findings),
            string(value, &field, true, findings),
        ) {
            headers.push((header, matcher));
        }
    }
    let mut without_headers = Vec::new();
    for (name, value) in sorted(&m.without_headers) {
        let field = format!("withoutHeaders.{}", name.as_str());
        if let (Some(header), Some(matcher)) = (
            header_name(origin, name, &format!("{path}.{field}"), findings),
            string(value, &field, true, findings),
        ) {
            without_headers.push((header, matcher));
        }
    }
    let mut query_params = Vec::new();
    for (name, value) in sorted(&m.query_params) {
        if let Some(matcher) = string(
            value,
            &format!("queryParams.{}", name.as_str()),
            true,
            findings,
        ) {
            query_params.push((name.as_str().to_string(), matcher));
        }
    }
    // As in Istio (Envoy's `case_sensitive` is ignored for a regex path
    // match), `ignoreUriCase` applies to exact and prefix URIs only.
    let mut ignore_uri_case = m.ignore_uri_case.as_ref().is_some_and(|i| **i);
    if let (Some(StringMatch::Regex(_)), Some(flag)) = (&uri, &m.ignore_uri_case) {
        if ignore_uri_case {
            ignore_uri_case = false;
            findings.warnings.push(origin.at(
                flag.span(),
                format!("{path}.ignoreUriCase has no effect on a regex uri, as in Istio: the regex is matched case-sensitively. Make the regex itself case-insensitive with `(?i)`, or drop `ignoreUriCase`."),
            ));
        }
    }
    let port = m
        .port
        .as_ref()
        .and_then(|port| match u16::try_from(**port) {
            Ok(number) if number > 0 => Some(number),
            _ => {
                findings.errors.push(origin.at(
                    port.span(),
                    format!(
                        "{path}.port {} is not a valid port. Use 1 to 65535.",
                        **port
                    ),
                ));
                None
            }
        });
    (findings.errors.len() == before).then(|| RequestMatch {
        uri,
        method,
        authority,
        headers,
        query_params,
        without_headers,
        ignore_uri_case,
        port,
    })
}

fn sorted<V>(map: &HashMap<istio::S<String>, V>) -> Vec<(&istio::S<String>, &V)> {
    let mut entries: Vec<_> = map.iter().collect();
    entries.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
    entries
}

fn header_name(
    origin: &Origin,
    name: &istio::S<String>,
    path: &str,
    findings: &mut Findings,
) -> Option<Header> {
    match HeaderName::from_bytes(name.as_bytes()) {
        Ok(header) => Some(Header(header)),
        Err(_) => {
            findings.errors.push(origin.at(
                name.span(),
                format!(
                    "{path}: \"{}\" is not a valid header name. Use letters, digits and dashes.",
                    name.as_str()
                ),
            ));
            None
        }
    }
}

/// A header rule's name: `:authority` is the Host, as Istio reads it
/// (`isAuthorityHeader`).
fn rule_header_name(
    origin: &Origin,
    name: &istio::S<String>,
    path: &str,
    findings: &mut Findings,
) -> Option<Header> {
    if name.eq_ignore_ascii_case(":authority") {
        return Some(Header(http::header::HOST));
    }
    header_name(origin, name, path, findings)
}

/// `written` is the matcher as written, where it can be found.
fn string_match(
    origin: &Origin,
    value: &istio::S<istio::StringMatch>,
    written: Option<&marked_yaml::Node>,
    path: &str,
    allow_empty: bool,
    findings: &mut Findings,
) -> Option<StringMatch> {
    let set = [&value.exact, &value.prefix, &value.regex]
        .iter()
        .filter(|v| v.is_some())
        .count();
    if set > 1 {
        findings.errors.push(origin.at(
            value.span(),
            format!("{path} sets more than one of exact, prefix and regex. Keep one."),
        ));
        return None;
    }
    if let Some(exact) = &value.exact {
        return Some(StringMatch::Exact(exact.clone()));
    }
    if let Some(prefix) = &value.prefix {
        return Some(StringMatch::Prefix(prefix.clone()));
    }
    if let Some(regex) = &value.regex {
        return match Regex::new(&format!("^(?:{regex})$")) {
            Ok(re) => Some(StringMatch::Regex(re)),
            Err(error) => {
                let reason = error
                    .to_string()
                    .lines()
                    .last()
                    .unwrap_or("invalid")
                    .trim()
                    .trim_start_matches("error: ")
                    .to_string();
                findings.errors.push(origin.at(
                    value.span(),
                    format!("{path}.regex \"{regex}\" is not a valid regular expression ({reason}). Fix the pattern (RE2 syntax)."),
                ));
                None
            }
        };
    }
    // `{}` is "present" (any value); a matcher whose keys are all
    // misspellings (`{exatc: v}`, warned about as unknown) is not, and
    // taken for one it would match every value instead of one.
    let keys: Vec<String> = written
        .and_then(|node| node.as_mapping())
        .map(|map| {
            map.iter()
                .map(|(key, _)| format!("`{}`", key.as_str()))
                .collect()
        })
        .unwrap_or_default();
    if allow_empty && !keys.is_empty() {
        findings.errors.push(origin.at(
            value.span(),
            format!("{path} has {} but none of exact, prefix and regex, so it would match any value, as `{{}}` does. Write `exact`, `prefix` or `regex`, or `{{}}` to match any value.", keys.join(", ")),
        ));
        None
    } else if allow_empty {
        Some(StringMatch::Present)
    } else {
        findings.errors.push(origin.at(
            value.span(),
            format!("{path} is empty. Set one of exact, prefix or regex."),
        ));
        None
    }
}

fn header_rules(
    origin: &Origin,
    headers: Option<&istio::Headers>,
    path: &str,
    findings: &mut Findings,
) -> HeaderRules {
    let Some(headers) = headers else {
        return HeaderRules::default();
    };
    let mut ops = |section: Option<&istio::HeaderOperations>, which: &str| {
        let Some(section) = section else {
            return HeaderOps::default();
        };
        let pairs = |map: &HashMap<istio::S<String>, String>, op: &str, findings: &mut Findings| {
            sorted(map)
                .into_iter()
                .filter_map(|(name, value)| {
                    let field = format!("{path}.headers.{which}.{op}.{}", name.as_str());
                    let header = rule_header_name(origin, name, &field, findings)?;
                    if which == "response" && header.0 == http::header::HOST {
                        findings.errors.push(origin.at(
                            name.span(),
                            format!("{field}: Host is a request header, and Istio refuses it here. Drop it, or set it under `headers.request`."),
                        ));
                        return None;
                    }
                    if http::HeaderValue::from_str(value).is_err() {
                        findings.errors.push(origin.at(
                            name.span(),
                            format!("{field}: the value has characters not allowed in a header. Remove control characters."),
                        ));
                        return None;
                    }
                    Some((header, value.clone()))
                })
                .collect::<Vec<_>>()
        };
        let mut set = pairs(&section.set, "set", findings);
        let mut add = pairs(&section.add, "add", findings);
        // Istio makes a request's `host` in `add` or `set` the authority
        // Envoy rewrites to (`set` first), never a second Host line: not
        // even when `add` spells it both `host` and `:authority`.
        if let Some(at) = add
            .iter()
            .position(|(name, _)| name.0 == http::header::HOST)
        {
            let host = add.remove(at);
            add.retain(|(name, _)| name.0 != http::header::HOST);
            if !set.iter().any(|(name, _)| name.0 == http::header::HOST) {
                set.push(host);
            }
        }
        let remove = (section.remove.iter())
            .filter_map(|name| {
                let field = format!("{path}.headers.{which}.remove");
                let header = rule_header_name(origin, name, &field, findings)?;
                if header.0 == http::header::HOST {
                    findings.errors.push(origin.at(
                        name.span(),
                        format!("{field}: the Host header cannot be removed (Istio refuses it too): every HTTP/1.1 request needs one. Drop `{}` from the list, or set it to the value wanted.", name.as_str()),
                    ));
                    return None;
                }
                Some(header)
            })
            .collect();
        HeaderOps { set, add, remove }
    };
    HeaderRules {
        request: ops(headers.request.as_ref(), "request"),
        response: ops(headers.response.as_ref(), "response"),
    }
}

/// Istio refuses a route that sets the authority (the Host sent upstream)
/// in more than one place (`validateAuthorityRewrite`): `rewrite.authority`,
/// and `host` or `:authority` in the request's `set` or `add`. umbra would
/// send one of them, whichever it applies last, which the YAML does not
/// show.
fn authority_set_once(
    origin: &Origin,
    http: &istio::HttpRoute,
    path: &str,
    findings: &mut Findings,
) {
    let mut first = http
        .rewrite
        .as_ref()
        .and_then(|r| r.authority.as_ref())
        .filter(|authority| !authority.is_empty())
        .map(|_| "rewrite.authority".to_string());
    let request = http.headers.as_ref().and_then(|h| h.request.as_ref());
    let sections = request
        .into_iter()
        .flat_map(|r| [("set", &r.set), ("add", &r.add)]);
    for (op, map) in sections {
        // In the order written.
        let mut names: Vec<&istio::S<String>> = (map.keys())
            .filter(|name| {
                name.eq_ignore_ascii_case("host") || name.eq_ignore_ascii_case(":authority")
            })
            .collect();
        names.sort_by_key(|name| name.span().start().map(|m| (m.line(), m.column())));
        for name in names {
            let field = format!("headers.request.{op}.{}", name.as_str());
            match &first {
                Some(earlier) => findings.errors.push(origin.at(
                    name.span(),
                    format!("{path}.{field} sets the authority (the Host sent upstream), which `{earlier}` sets already; Istio refuses a route that sets it twice. Keep one of them."),
                )),
                None => first = Some(field),
            }
        }
    }
}

const RETRY_ON: [&str; 8] = [
    "5xx",
    "gateway-error",
    "connect-failure",
    "reset",
    "refused-stream",
    "retriable-4xx",
    "retriable-status-codes",
    "HTTP status codes such as 503",
];

fn retry_policy(
    origin: &Origin,
    retries: &istio::S<istio::HttpRetry>,
    path: &str,
    findings: &mut Findings,
) -> Option<RetryPolicy> {
    let attempts = match &retries.attempts {
        Some(a) if **a < 0 => {
            findings.errors.push(origin.at(
                a.span(),
                format!(
                    "{path}.retries.attempts {} is negative. Use 0 to turn retries off, or a small count such as 2.",
                    **a
                ),
            ));
            return None;
        }
        Some(a) => {
            // Istio sets no limit; `maxRetries` bounds retries in flight.
            if **a > 10 {
                findings.warnings.push(origin.at(
                    a.span(),
                    format!(
                        "{path}.retries.attempts {} sends a failing request up to {} times, each try waiting for the last; under load only the DestinationRule's `connectionPool.http.maxRetries` bounds retries. Use a small count such as 2.",
                        **a,
                        **a + 1
                    ),
                ));
            }
            u32::try_from(**a).unwrap_or(u32::MAX)
        }
        None => 0,
    };
    // 0 is none, as Envoy reads a zero `per_try_timeout` (and as a zero
    // route `timeout` is read above).
    let per_try_timeout = retries.per_try_timeout.as_ref().and_then(|t| {
        let field = format!("{path}.retries.perTryTimeout");
        let d = duration_or_error(origin, t, &field, findings)?;
        request_timeout(origin, t, d, &field, findings)
    });
    let backoff = retries
        .backoff
        .as_ref()
        .and_then(|t| duration_or_error(origin, t, &format!("{path}.retries.backoff"), findings));
    let mut retry_on = RetryOn::default();
    match &retries.retry_on {
        Some(list) => {
            for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                // Istio takes a number that is an HTTP status for one to
                // retry on (Go's `http.StatusText` knows it).
                let status = item.parse::<u16>().ok().filter(|&n| {
                    http::StatusCode::from_u16(n).is_ok_and(|s| s.canonical_reason().is_some())
                });
                if let Some(status) = status {
                    if !retry_on.statuses.contains(&status) {
                        retry_on.statuses.push(status);
                    }
                    continue;
                }
                match item {
                    // What Istio adds itself when a status code is listed.
                    "retriable-status-codes" => {}
                    "5xx" => retry_on.server_error = true,
                    "gateway-error" => retry_on.gateway_error = true,
                    "connect-failure" => retry_on.connect_failure = true,
                    "reset" => retry_on.reset = true,
                    "refused-stream" => retry_on.refused_stream = true,
                    "retriable-4xx" => retry_on.retriable_4xx = true,
                    // Envoy's `x-envoy-retry-grpc-on` conditions.
                    "cancelled" | "deadline-exceeded" | "internal" | "resource-exhausted"
                    | "unavailable" => findings.warnings.push(origin.at(
                        list.span(),
                        format!(
                            "{path}.retries.retryOn \"{item}\" is a gRPC condition, which never applies in umbra: gRPC calls carry a body, and umbra replays only bodiless requests. Ignored."
                        ),
                    )),
                    // Istio's other conditions, which umbra does not implement.
                    "reset-before-request"
                    | "retriable-headers"
                    | "envoy-ratelimited"
                    | "http3-post-connect-failure" => findings.warnings.push(origin.at(
                        list.span(),
                        format!(
                            "{path}.retries.retryOn \"{item}\" is not supported by umbra yet and is ignored (supported: {})",
                            RETRY_ON.join(", ")
                        ),
                    )),
                    // Istio refuses the VirtualService for it; taken as a
                    // warning it would leave a route retrying on nothing.
                    other => {
                        let near = document::near_miss(other, RETRY_ON[..7].iter().copied())
                            .map(|n| format!("; did you mean `{n}`?"))
                            .unwrap_or_else(|| ".".into());
                        findings.errors.push(origin.at(
                            list.span(),
                            format!(
                                "{path}.retries.retryOn \"{other}\" is not a retry condition (Istio refuses it too){near} Use conditions separated by commas: {}.",
                                RETRY_ON.join(", ")
                            ),
                        ));
                    }
                }
            }
        }
        // Istio's default conditions.
        None => retry_on = RetryOn::istio_default(),
    }
    // Istio refuses a policy that would never be used: retries are off
    // without `attempts` (its proto's 0), whatever else is set.
    if attempts == 0 {
        let set: Vec<&str> = [
            retries.per_try_timeout.as_ref().map(|_| "`perTryTimeout`"),
            retries.retry_on.as_ref().map(|_| "`retryOn`"),
        ]
        .into_iter()
        .flatten()
        .collect();
        if !set.is_empty() {
            let why = match &retries.attempts {
                Some(_) => "`attempts: 0` turns retries off",
                None => "without `attempts` (0) retries are off",
            };
            findings.errors.push(origin.at(
                retries.span(),
                format!(
                    "{path}.retries sets {}, but {why}, so it would never apply (Istio refuses this too). Set `attempts`, e.g. `attempts: 3`, or drop `retries` for Istio's default of 2.",
                    set.join(" and ")
                ),
            ));
            return None;
        }
    }
    (attempts > 0).then_some(RetryPolicy {
        attempts,
        per_try_timeout,
        retry_on,
        backoff: backoff.unwrap_or(RetryPolicy::BACKOFF),
    })
}

/// `declared` names every VirtualService written, built or not.
fn shadow_analysis(
    parsed: &Parsed<istio::ShadowAnalysis>,
    virtual_services: &[VirtualService],
    declared: &[String],
    resolver: &mut Resolver<'_>,
    findings: &mut Findings,
) -> Option<(String, AnalysisSettings)> {
    let resource = &parsed.resource;
    let origin = &resource.origin;
    let spec = &parsed.spec;
    let before = findings.errors.len();
    let Some(target) = spec.target_ref.as_ref().and_then(|t| t.name.as_ref()) else {
        findings.errors.push(origin.at(
            &resource.name_span,
            format!(
                "ShadowAnalysis \"{}\" has no spec.targetRef.name. Name the VirtualService it tunes: `targetRef: {{kind: VirtualService, name: ...}}`.",
                resource.name
            ),
        ));
        return None;
    };
    if let Some(kind) = spec.target_ref.as_ref().and_then(|t| t.kind.as_ref()) {
        if kind.as_str() != "VirtualService" {
            findings.errors.push(origin.at(
                kind.span(),
                format!(
                    "spec.targetRef.kind \"{}\" is not supported. Use `VirtualService`.",
                    kind.as_str()
                ),
            ));
        }
    }
    let vs = virtual_services
        .iter()
        .find(|vs| vs.name == target.as_str());
    // One written but not built has its errors reported already.
    if vs.is_none() && !declared.iter().any(|name| name == target.as_str()) {
        let known: Vec<&str> = declared.iter().map(String::as_str).collect();
        findings.errors.push(origin.at(
            target.span(),
            format!(
                "spec.targetRef.name \"{}\" is not a VirtualService in this config (known: {}). Fix the name.",
                target.as_str(),
                if known.is_empty() { "none".to_string() } else { known.join(", ") }
            ),
        ));
    }
    let mut settings = AnalysisSettings {
        enabled: spec.enabled.unwrap_or(true),
        ..AnalysisSettings::default()
    };
    if let Some(ignore) = &spec.ignore {
        settings.ignore_headers = ignore
            .headers
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect();
        for p in &ignore.paths {
            if !(p.starts_with("body") || p.starts_with("header.")) {
                findings.errors.push(origin.at(
                    p.span(),
                    format!("spec.ignore.paths \"{}\" must start with `body` (e.g. `body.meta.id`) or `header.`.", p.as_str()),
                ));
            }
        }
        // A header is named in lower case where differences are found
        // (`header.x-version`), as `ignore.headers` is matched: a path
        // written `header.X-Version` would otherwise never match.
        settings.ignore_paths = ignore
            .paths
            .iter()
            .map(|p| match p.strip_prefix("header.") {
                Some(name) => format!("header.{}", name.to_ascii_lowercase()),
                None => p.as_str().to_string(),
            })
            .collect();
    }
    if let Some(thresholds) = &spec.thresholds {
        let mut fraction = |value: &Option<istio::S<f64>>,
                            field: &str,
                            low: f64,
                            high: f64,
                            target: &mut f64| {
            if let Some(v) = value {
                if !(low..=high).contains(&**v) {
                    findings.errors.push(origin.at(
                        v.span(),
                        format!("spec.thresholds.{field} {} is outside {low}–{high}. Use a fraction such as 0.2.", **v),
                    ));
                } else {
                    *target = **v;
                }
            }
        };
        fraction(
            &thresholds.relative,
            "relative",
            0.0,
            1.0,
            &mut settings.relative_threshold,
        );
        fraction(
            &thresholds.absolute,
            "absolute",
            0.0,
            1.0,
            &mut settings.absolute_threshold,
        );
        fraction(
            &thresholds.max_mismatch_rate,
            "maxMismatchRate",
            0.0,
            1.0,
            &mut settings.max_mismatch_rate,
        );
        fraction(
            &thresholds.confidence,
            "confidence",
            0.5,
            0.9999,
            &mut settings.confidence,
        );
        fraction(
            &thresholds.latency_effect,
            "latencyEffect",
            0.0,
            100.0,
            &mut settings.latency_effect,
        );
        if let Some(margin) = &thresholds.latency_margin {
            let field = "spec.thresholds.latencyMargin";
            if let Some(margin) = duration_or_error(origin, margin, field, findings) {
                settings.latency_margin = margin;
            }
        }
    }
    if let Some(min) = &spec.min_samples {
        if **min < 1 {
            findings.errors.push(origin.at(
                min.span(),
                format!("spec.minSamples {} must be at least 1.", **min),
            ));
        } else {
            settings.min_samples = **min as u64;
        }
    }
    if let Some(bytes) = spec
        .capture
        .as_ref()
        .and_then(|c| c.max_body_bytes.as_ref())
    {
        if **bytes < 0 || **bytes > 16 * 1024 * 1024 {
            findings.errors.push(origin.at(
                bytes.span(),
                format!(
                    "spec.capture.maxBodyBytes {} is outside 0–16777216.",
                    **bytes
                ),
            ));
        } else {
            settings.max_capture_bytes = **bytes as usize;
        }
    }
    if let Some(baseline) = &spec.baseline {
        settings.baseline = resolver.resolve(
            origin,
            baseline,
            &resource.namespace,
            "spec.baseline",
            findings,
        );
    }
    let vs = vs.filter(|_| findings.errors.len() == before)?;
    Some((vs.name.clone(), settings))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_go() {
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("300ms"), Some(Duration::from_millis(300)));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_duration("250us"), Some(Duration::from_micros(250)));
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration("1x"), None);
        assert_eq!(parse_duration(""), None);
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_bytes("1048576"), Some(1_048_576));
        assert_eq!(parse_bytes("512Ki"), Some(524_288));
        assert_eq!(parse_bytes("4Mi"), Some(4 * 1024 * 1024));
        assert_eq!(parse_bytes("1M"), Some(1_000_000));
        assert_eq!(parse_bytes("1Xi"), None);
        assert_eq!(parse_bytes("99999999999999999999"), None);
    }

    #[test]
    fn hosts_canonicalise() {
        assert_eq!(
            canonical_host("httpbin", "default"),
            "httpbin.default.svc.cluster.local"
        );
        assert_eq!(
            canonical_host("httpbin.prod", "default"),
            "httpbin.prod.svc.cluster.local"
        );
        assert_eq!(
            canonical_host("httpbin.prod.svc.cluster.local", "x"),
            "httpbin.prod.svc.cluster.local"
        );
        assert_eq!(
            canonical_host("api.example.com", "default"),
            "api.example.com"
        );
        assert_eq!(canonical_host("127.0.0.1", "default"), "127.0.0.1");
    }
}
