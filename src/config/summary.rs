//! The human-readable summary `umbra validate` prints: host → match →
//! weighted destinations → endpoints, plus mirrors and analysis settings.

use std::fmt::Write;

use super::model::{
    AbortReply, Answer, Config, Destination, HostPattern, Redirect, RedirectPort, RequestMatch,
    StringMatch,
};

pub fn summary(config: &Config) -> String {
    let mut out = String::new();
    for vs in &config.virtual_services {
        let hosts: Vec<String> = vs
            .hosts
            .iter()
            .map(|h| match h {
                HostPattern::Exact(name) => name.clone(),
                HostPattern::Suffix(suffix) => format!("*{suffix}"),
                HostPattern::Any => "*".into(),
            })
            .collect();
        let _ = writeln!(
            out,
            "VirtualService {}/{}  hosts: {}",
            vs.namespace,
            vs.name,
            hosts.join(", ")
        );
        for route in &vs.routes {
            let matches = if route.matches.is_empty() {
                "any request".to_string()
            } else {
                route
                    .matches
                    .iter()
                    .map(describe_match)
                    .collect::<Vec<_>>()
                    .join(" OR ")
            };
            let _ = writeln!(out, "  route {}  when {}", route.name, matches);
            if let Some(timeout) = route.timeout {
                let _ = writeln!(out, "    timeout {timeout:?}");
            }
            let fault = route.fault.as_ref();
            if let Some(delay) = fault.and_then(|f| f.delay.as_ref()) {
                let percent = f64::from(delay.per_million) / 10_000.0;
                let _ = writeln!(out, "    fault: {percent}% delayed {:?}", delay.fixed);
            }
            if let Some(abort) = fault.and_then(|f| f.abort.as_ref()) {
                let percent = f64::from(abort.per_million) / 10_000.0;
                let reply = match abort.reply {
                    AbortReply::Http(status) => format!("HTTP {status}"),
                    AbortReply::Grpc(code) => format!("grpc-status {code}"),
                };
                let _ = writeln!(out, "    fault: {percent}% aborted with {reply}");
            }
            match &route.answer {
                Some(Answer::Redirect(redirect)) => {
                    let _ = writeln!(
                        out,
                        "    → redirect {}: {}",
                        redirect.code,
                        describe_redirect(redirect)
                    );
                }
                Some(Answer::Direct { status, body }) => {
                    let _ = writeln!(out, "    → direct response {status}, {} bytes", body.len());
                }
                None => {}
            }
            // Weights are relative: each destination's share of the sum.
            let total = (route.destinations.iter())
                .map(|d| u64::from(d.weight))
                .sum::<u64>()
                .max(1);
            for weighted in &route.destinations {
                let share = u64::from(weighted.weight) as f64 * 100.0 / total as f64;
                let share = if share.fract() == 0.0 {
                    format!("{share:.0}")
                } else {
                    format!("{share:.1}")
                };
                let _ = writeln!(
                    out,
                    "    → {share:>3}%  {}",
                    describe(&weighted.destination)
                );
            }
            for mirror in &route.mirrors {
                let _ = writeln!(
                    out,
                    "    ⇉ mirror {}% to {}  (Host gets -shadow: {})",
                    f64::from(mirror.per_million) / 10_000.0,
                    describe(&mirror.destination),
                    if route.mirror_policy.host_suffix {
                        "yes"
                    } else {
                        "no"
                    }
                );
            }
        }
        if let Some(settings) = config.analysis.get(&vs.name) {
            let _ = writeln!(
                out,
                "  analysis {}  min samples {}, capture {} bytes{}",
                if settings.enabled { "on" } else { "off" },
                settings.min_samples,
                settings.max_capture_bytes,
                settings
                    .baseline
                    .as_ref()
                    .map(|b| format!(", baseline {}", describe(b)))
                    .unwrap_or_default()
            );
        }
    }
    if config.virtual_services.is_empty() {
        out.push_str("no VirtualServices: every request gets 404\n");
    }
    out
}

fn describe(destination: &Destination) -> String {
    let endpoints: Vec<String> = destination
        .endpoints
        .iter()
        .map(|e| {
            if e.address.contains(':') {
                format!("[{}]:{}", e.address, e.port)
            } else {
                format!("{}:{}", e.address, e.port)
            }
        })
        .collect();
    let pool = &destination.pool;
    let mut caps = String::new();
    for (name, value) in [
        ("maxConnections", pool.max_connections),
        ("http1MaxPendingRequests", pool.max_pending_requests),
        ("http2MaxRequests", pool.max_requests),
        ("maxRequestsPerConnection", pool.max_requests_per_connection),
        ("maxRetries", pool.max_retries),
    ] {
        if let Some(value) = value {
            let _ = write!(caps, ", {name} {value}");
        }
    }
    if let Some(outlier) = &destination.outlier {
        let _ = write!(
            caps,
            ", outlierDetection {}×5xx {}×gateway for {:?} up to {}%",
            outlier.consecutive_5xx,
            outlier.consecutive_gateway,
            outlier.base_ejection_time,
            outlier.max_ejection_percent
        );
    }
    if let Some(tls) = &destination.tls {
        let _ = write!(caps, ", TLS {} sni {}", tls.mode, tls.sni);
        if tls.insecure_skip_verify {
            caps.push_str(" unverified");
        }
    }
    format!(
        "{} [{:?}, {:?}{caps}] endpoints: {}",
        destination.key,
        destination.lb,
        destination.protocol,
        if endpoints.is_empty() {
            "none (503)".to_string()
        } else {
            endpoints.join(", ")
        }
    )
}

fn describe_match(m: &RequestMatch) -> String {
    let mut parts = Vec::new();
    let text = |s: &StringMatch| match s {
        StringMatch::Exact(v) => format!("= {v}"),
        StringMatch::Prefix(v) => format!("prefix {v}"),
        StringMatch::Regex(re) => format!("~ {}", re.as_str()),
        StringMatch::Present => "present".into(),
    };
    if let Some(uri) = &m.uri {
        parts.push(format!(
            "uri {}{}",
            text(uri),
            if m.ignore_uri_case { " (any case)" } else { "" }
        ));
    }
    if let Some(method) = &m.method {
        parts.push(format!("method {}", text(method)));
    }
    if let Some(authority) = &m.authority {
        parts.push(format!("authority {}", text(authority)));
    }
    for (name, value) in &m.headers {
        parts.push(format!("header {} {}", name.0, text(value)));
    }
    for (name, value) in &m.without_headers {
        parts.push(format!("without header {} {}", name.0, text(value)));
    }
    for (name, value) in &m.query_params {
        parts.push(format!("query {} {}", name, text(value)));
    }
    if let Some(port) = m.port {
        parts.push(format!("port {port}"));
    }
    if parts.is_empty() {
        "any request".into()
    } else {
        parts.join(" AND ")
    }
}

/// The parts of the URL a redirect changes, as `validate` prints them.
fn describe_redirect(redirect: &Redirect) -> String {
    let mut parts = Vec::new();
    if let Some(scheme) = &redirect.scheme {
        parts.push(format!("scheme {scheme}"));
    }
    if let Some(authority) = &redirect.authority {
        parts.push(format!("authority {authority}"));
    }
    match redirect.port {
        RedirectPort::Default => {}
        RedirectPort::FromRequest => parts.push("the request's port".to_string()),
        RedirectPort::Port(port) => parts.push(format!("port {port}")),
    }
    if let Some(uri) = &redirect.uri {
        parts.push(format!("path {uri}"));
    }
    parts.join(", ")
}
