//! Comparing one primary response with one shadow response: status,
//! headers and a JSON-aware body diff, each difference named by its
//! location (`status`, `header.content-type`, `body.slideshow.slides[1].title`).
//!
//! Noise rules 1 and 2 apply here, before anything is counted:
//! 1. **Built-in rules.** Headers that always differ between two responses
//!    (`date`, `server`, `x-request-id`, `age`, `expires`, `etag`,
//!    `last-modified`, `set-cookie` values, tracing headers…) are ignored,
//!    and so is `content-length`, which the body comparison covers. The
//!    `-shadow` Host umbra gave the shadow is mapped back to the primary's
//!    Host wherever the shadow echoes it (bodies, `Location`…). In bodies, two
//!    values that have the same *volatile shape* are noise: both UUIDs, both
//!    timestamps (RFC 3339 / ISO 8601 / RFC 1123), both long random tokens,
//!    or both epoch numbers in a field whose name says it is a time (`*time*`,
//!    `*date*`, `*At`, `ts`, `created`, `updated`, `expires`).
//! 2. **Configured ignores.** `ShadowAnalysis.spec.ignore.headers` and
//!    `ignore.paths` (`body.meta.generatedAt`, `body.items[*].etag`; a path
//!    also covers everything below it).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::Read;

use bytes::Bytes;
use http::HeaderMap;
use serde_json::Value;

use super::template::is_uuid;
use super::Captured;

/// Longest example value kept in reports.
const EXAMPLE_CHARS: usize = 120;
/// Differences reported per comparison at most (a body rewrite could
/// otherwise produce thousands).
const MAX_DIFFERENCES: usize = 64;
/// Decompressed bodies are cut at this many times the capture cap.
const INFLATE_FACTOR: usize = 4;

/// Headers that differ between any two responses. A `match` on the text:
/// it is asked for every header of every compared pair, twice.
fn noisy(name: &str) -> bool {
    matches!(
        name,
        "date"
            | "server"
            | "x-request-id"
            | "age"
            | "expires"
            | "etag"
            | "last-modified"
            | "via"
            | "connection"
            | "keep-alive"
            | "transfer-encoding"
            | "x-envoy-upstream-service-time"
            | "x-served-by"
            | "x-trace-id"
            | "traceparent"
            | "tracestate"
            | "x-b3-traceid"
            | "x-b3-spanid"
            | "x-amzn-trace-id"
            | "x-runtime"
    )
}

/// One difference between primary and shadow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    pub location: String,
    pub kind: &'static str,
    pub primary: String,
    pub shadow: String,
}

/// What the comparison rules need from `ShadowAnalysis` (borrowed from it:
/// they are built for every sample).
#[derive(Debug, Clone, Default)]
pub struct Rules<'a> {
    pub ignore_headers: &'a [String],
    pub ignore_paths: &'a [String],
    /// Mirroring itself rewrote the Host, so a shadow echoing
    /// `httpbin-shadow:8000` where v1 echoed `httpbin:8000` is umbra's
    /// doing, not v2's. Undone before diffing.
    pub hosts: Option<&'a Hosts>,
}

/// A primary's Host and its shadow's, with a searcher for the latter (made
/// once per Host: building one costs more than a search).
#[derive(Debug, Clone)]
pub struct Hosts {
    /// What a shadow's mention is mapped back to.
    primary: String,
    /// What mirroring made of it (`-shadow` before the port).
    shadow: String,
    /// Searches for `shadow` in bodies and header values.
    finder: memchr::memmem::Finder<'static>,
}

impl Hosts {
    pub fn new(primary: &str) -> Hosts {
        let shadow = crate::mirror::shadow_host(primary);
        Hosts {
            finder: memchr::memmem::Finder::new(shadow.as_bytes()).into_owned(),
            primary: primary.to_owned(),
            shadow,
        }
    }

    pub fn primary(&self) -> &str {
        &self.primary
    }

    fn mentioned(&self, bytes: &[u8]) -> bool {
        self.finder.find(bytes).is_some()
    }
}

impl Rules<'_> {
    fn ignores(&self, location: &str) -> bool {
        self.ignore_paths.iter().any(|p| path_covers(p, location))
    }
}

/// Does ignore pattern `pattern` (with `[*]` for any index) cover `path`
/// or something above it?
pub fn path_covers(pattern: &str, path: &str) -> bool {
    let pattern = pattern.trim_end_matches(".*");
    let mut p = pattern.as_bytes();
    let mut s = path.as_bytes();
    while !p.is_empty() {
        if p.starts_with(b"[*]") {
            if s.first() != Some(&b'[') {
                return false;
            }
            let Some(close) = s.iter().position(|&b| b == b']') else {
                return false;
            };
            p = &p[3..];
            s = &s[close + 1..];
        } else {
            if s.first() != p.first() {
                return false;
            }
            p = &p[1..];
            s = &s[1..];
        }
    }
    s.is_empty() || s[0] == b'.' || s[0] == b'['
}

/// Every difference between two responses, noise rules 1 and 2 applied.
pub fn compare(
    primary: &Captured,
    shadow: &Captured,
    rules: &Rules,
    cap: usize,
) -> Vec<Difference> {
    let mut out = Vec::new();
    if primary.status != shadow.status {
        out.push(Difference {
            location: "status".into(),
            kind: "status_changed",
            primary: primary.status.as_u16().to_string(),
            shadow: shadow.status.as_u16().to_string(),
        });
    }
    let bodies_equal = compare_bodies(primary, shadow, rules, cap, &mut out);
    let shadow_headers = unshadow_headers(&shadow.headers, rules);
    compare_headers(
        &primary.headers,
        &shadow_headers,
        rules,
        bodies_equal,
        &mut out,
    );
    out.retain(|d| !rules.ignores(&d.location));
    out.truncate(MAX_DIFFERENCES);
    out
}

fn compare_headers<'a>(
    primary: &'a HeaderMap,
    shadow: &'a HeaderMap,
    rules: &Rules,
    bodies_equal: bool,
    out: &mut Vec<Difference>,
) {
    let skipped = |name: &str| {
        noisy(name)
            || rules.ignore_headers.iter().any(|h| h == name)
            // Lengths follow from the body comparison, which says more.
            || name == "content-length"
            || (name == "content-encoding" && bodies_equal)
    };
    // The usual pair (one server's software on both sides) lists the same
    // compared headers in the same order: settled without a lookup. (The
    // primary's hop-by-hop headers are gone, the shadow's are not.)
    let compared = |map: &'a HeaderMap| map.iter().filter(|(name, _)| !skipped(name.as_str()));
    if compared(primary).eq(compared(shadow)) {
        return;
    }
    // Each name once, unsorted: sorting every pair's names cost more than
    // the comparison; the few differences found are sorted instead.
    let first = out.len();
    let only_shadow = shadow.keys().filter(|n| !primary.contains_key(*n));
    for name in primary.keys().chain(only_shadow).map(|n| n.as_str()) {
        if skipped(name) {
            continue;
        }
        // Nearly every header is equal: decide that without allocating.
        if primary.get_all(name).iter().eq(shadow.get_all(name).iter()) {
            continue;
        }
        let join = |map: &HeaderMap| -> Option<String> {
            let values: Vec<String> = map
                .get_all(name)
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect();
            (!values.is_empty()).then(|| values.join(", "))
        };
        let (p, s) = (join(primary), join(shadow));
        let location = format!("header.{name}");
        match (p, s) {
            (Some(_), None) => out.push(diff(
                location,
                "missing",
                primary_value(primary, name),
                "(absent)".into(),
            )),
            (None, Some(_)) => out.push(diff(
                location,
                "added",
                "(absent)".into(),
                primary_value(shadow, name),
            )),
            (Some(p), Some(s)) if p != s => {
                // Cookie values are per-session; only their presence counts.
                if name == "set-cookie" {
                    continue;
                }
                out.push(diff(location, "changed", p, s));
            }
            _ => {}
        }
    }
    out[first..].sort_by(|a, b| a.location.cmp(&b.location));
}

fn primary_value(map: &HeaderMap, name: &str) -> String {
    map.get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default()
}

fn diff(location: String, kind: &'static str, primary: String, shadow: String) -> Difference {
    Difference {
        location,
        kind,
        primary: truncate(&primary),
        shadow: truncate(&shadow),
    }
}

fn truncate(text: &str) -> String {
    if text.chars().count() <= EXAMPLE_CHARS {
        return text.to_string();
    }
    let mut cut: String = text.chars().take(EXAMPLE_CHARS).collect();
    cut.push('…');
    cut
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    Json,
    Text,
    Bytes,
}

pub fn body_kind(headers: &HeaderMap) -> BodyKind {
    let content_type = headers
        .get(http::header::CONTENT_TYPE)
        .map_or(&b""[..], |v| v.as_bytes());
    // Media types are case-insensitive; compared without a lowercase copy.
    let contains = |needle: &str| {
        content_type
            .windows(needle.len())
            .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
    };
    if contains("json") {
        BodyKind::Json
    } else if content_type
        .get(..5)
        .is_some_and(|t| t.eq_ignore_ascii_case(b"text/"))
        || contains("xml")
        || contains("javascript")
        || contains("x-www-form-urlencoded")
    {
        BodyKind::Text
    } else {
        BodyKind::Bytes
    }
}

/// The body as the application sees it: a `gzip` (`x-gzip`), `deflate`
/// or `br` content coding is undone (bounded); any other, or a body that
/// does not decode, is compared as sent.
pub fn decoded_body(captured: &Captured, cap: usize) -> Bytes {
    let coding = captured.headers.get(http::header::CONTENT_ENCODING);
    let Some(coding) = coding.filter(|_| !captured.truncated) else {
        return captured.body.clone();
    };
    let limit = (cap.max(1024) * INFLATE_FACTOR) as u64;
    let body = &captured.body[..];
    let is = |name: &str| {
        coding
            .as_bytes()
            .trim_ascii()
            .eq_ignore_ascii_case(name.as_bytes())
    };
    let decoded = if is("gzip") || is("x-gzip") {
        inflate(flate2::read::GzDecoder::new(body), limit)
    } else if is("deflate") {
        // RFC 9110's deflate is zlib-wrapped; some servers send it raw.
        inflate(flate2::read::ZlibDecoder::new(body), limit)
            .or_else(|| inflate(flate2::read::DeflateDecoder::new(body), limit))
    } else if is("br") {
        inflate(brotli_decompressor::Decompressor::new(body, 4096), limit)
    } else {
        None
    };
    decoded.map_or_else(|| captured.body.clone(), Bytes::from)
}

/// At most `limit` bytes read from `decoder`, if it decodes.
fn inflate(decoder: impl Read, limit: u64) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    decoder.take(limit).read_to_end(&mut out).ok()?;
    Some(out)
}

/// Compares bodies; returns whether they are equal after noise rules.
fn compare_bodies(
    primary: &Captured,
    shadow: &Captured,
    rules: &Rules,
    cap: usize,
    out: &mut Vec<Difference>,
) -> bool {
    if primary.truncated || shadow.truncated {
        // Over the capture cap: compare length and the captured prefix.
        if primary.body_len != shadow.body_len || primary.body != shadow.body {
            out.push(diff(
                "body".into(),
                "truncated_body_changed",
                format!("{} bytes", primary.body_len),
                format!("{} bytes", shadow.body_len),
            ));
            return false;
        }
        return true;
    }
    let (p, s) = (
        decoded_body(primary, cap),
        unshadow(decoded_body(shadow, cap), rules),
    );
    if p == s {
        return true;
    }
    let before = out.len();
    match body_kind(&primary.headers) {
        BodyKind::Json => match (
            serde_json::from_slice::<Value>(&p),
            serde_json::from_slice::<Value>(&s),
        ) {
            (Ok(pv), Ok(sv)) => {
                let mut path = String::from("body");
                json_diff(&pv, &sv, None, &mut path, rules, out);
            }
            (Ok(_), Err(_)) | (Err(_), Ok(_)) => out.push(diff(
                "body".into(),
                "invalid_json",
                String::from_utf8_lossy(&p).into_owned(),
                String::from_utf8_lossy(&s).into_owned(),
            )),
            (Err(_), Err(_)) => text_diff(&p, &s, out),
        },
        BodyKind::Text => text_diff(&p, &s, out),
        BodyKind::Bytes => {
            let (primary, shadow) = first_difference(&p, &s);
            out.push(diff("body".into(), "bytes_changed", primary, shadow));
        }
    }
    out.len() == before
}

/// Two binary bodies, described where they first differ (their lengths
/// alone say nothing when they are equal).
fn first_difference(p: &[u8], s: &[u8]) -> (String, String) {
    let at = (p.iter().zip(s))
        .position(|(a, b)| a != b)
        .unwrap_or(p.len().min(s.len()));
    let side = |body: &[u8]| match body.get(at) {
        Some(byte) => format!("{} bytes; byte {at}: 0x{byte:02x}", body.len()),
        None => format!("{} bytes; ends before byte {at}", body.len()),
    };
    (side(p), side(s))
}

/// The shadow's body with its own Host mapped back to the primary's.
fn unshadow(body: Bytes, rules: &Rules) -> Bytes {
    let Some(hosts) = rules.hosts else {
        return body;
    };
    // Searched as bytes first: most bodies never name the shadow host, and
    // a UTF-8 check of the whole body would cost more than the search.
    if !hosts.mentioned(&body) {
        return body;
    }
    match std::str::from_utf8(&body) {
        Ok(text) => Bytes::from(text.replace(&hosts.shadow, &hosts.primary)),
        Err(_) => body,
    }
}

fn unshadow_headers<'a>(headers: &'a HeaderMap, rules: &Rules) -> Cow<'a, HeaderMap> {
    let Some(hosts) = rules.hosts else {
        return Cow::Borrowed(headers);
    };
    let mentions = |value: &http::HeaderValue| hosts.mentioned(value.as_bytes());
    // Copy the map only when some value names the shadow host.
    if !headers.values().any(mentions) {
        return Cow::Borrowed(headers);
    }
    let mut out = headers.clone();
    for value in out.values_mut().filter(|value| mentions(value)) {
        let Ok(text) = value.to_str() else {
            continue; // Not text: left as it is.
        };
        if let Ok(fixed) = http::HeaderValue::from_str(&text.replace(&hosts.shadow, &hosts.primary))
        {
            *value = fixed;
        }
    }
    Cow::Owned(out)
}

fn text_diff(p: &[u8], s: &[u8], out: &mut Vec<Difference>) {
    let (p, s) = (String::from_utf8_lossy(p), String::from_utf8_lossy(s));
    let first = p
        .char_indices()
        .zip(s.chars())
        .find(|((_, a), b)| a != b)
        .map_or(p.len().min(s.len()), |((i, _), _)| i);
    let window = |text: &str| {
        let start = text.floor_char_boundary(first.saturating_sub(40));
        let end = text.ceil_char_boundary((first + 40).min(text.len()));
        text.get(start..end).unwrap_or("").to_string()
    };
    out.push(diff("body".into(), "text_changed", window(&p), window(&s)));
}

/// Structural JSON diff: object keys by name (order never matters), arrays
/// by index.
fn json_diff(
    p: &Value,
    s: &Value,
    key: Option<&str>,
    path: &mut String,
    rules: &Rules,
    out: &mut Vec<Difference>,
) {
    if out.len() >= MAX_DIFFERENCES || rules.ignores(path) {
        return;
    }
    match (p, s) {
        (Value::Object(pm), Value::Object(sm)) => {
            let mut keys: Vec<&String> = pm.keys().chain(sm.keys()).collect();
            keys.sort_unstable();
            keys.dedup();
            for k in keys {
                let len = path.len();
                path.push('.');
                path.push_str(k);
                match (pm.get(k), sm.get(k)) {
                    (Some(a), Some(b)) => json_diff(a, b, Some(k), path, rules, out),
                    (Some(a), None) if !rules.ignores(path) => {
                        out.push(diff(path.clone(), "missing", compact(a), "(absent)".into()))
                    }
                    (None, Some(b)) if !rules.ignores(path) => {
                        out.push(diff(path.clone(), "added", "(absent)".into(), compact(b)))
                    }
                    _ => {}
                }
                path.truncate(len);
            }
        }
        (Value::Array(pa), Value::Array(sa)) => {
            if pa.len() != sa.len() {
                out.push(diff(
                    path.clone(),
                    "array_length",
                    format!("{} items", pa.len()),
                    format!("{} items", sa.len()),
                ));
            }
            for (i, (a, b)) in pa.iter().zip(sa).enumerate() {
                let len = path.len();
                path.push('[');
                path.push_str(&i.to_string());
                path.push(']');
                json_diff(a, b, key, path, rules, out);
                path.truncate(len);
            }
        }
        (a, b) if a == b => {}
        (Value::Number(a), Value::Number(b)) if same_number(a, b) => {}
        (a, b) if std::mem::discriminant(a) != std::mem::discriminant(b) => {
            out.push(diff(path.clone(), "type_changed", compact(a), compact(b)))
        }
        (a, b) => {
            if !volatile(key, a, b) {
                out.push(diff(path.clone(), "changed", compact(a), compact(b)));
            }
        }
    }
}

/// JSON has one number type: `1`, `1.0` and `1e0` are the same value,
/// written by two serializers (Python's float, Go's integer…), which
/// serde_json keeps apart as an integer and a float. Integers too large
/// for a float to hold exactly are compared as integers (above).
fn same_number(a: &serde_json::Number, b: &serde_json::Number) -> bool {
    let exact =
        |n: &serde_json::Number| n.is_f64() || n.as_f64().is_some_and(|f| f.abs() < 2f64.powi(53));
    exact(a) && exact(b) && a.as_f64() == b.as_f64()
}

fn compact(value: &Value) -> String {
    value.to_string()
}

/// Noise rule 1: two values of the same volatile shape.
pub fn volatile(key: Option<&str>, a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::String(a), Value::String(b)) => {
            let shape = |s: &str| {
                if is_uuid(s) {
                    Some(1)
                } else if is_timestamp(s) {
                    Some(2)
                } else if is_token(s) {
                    Some(3)
                } else {
                    None
                }
            };
            matches!((shape(a), shape(b)), (Some(x), Some(y)) if x == y)
        }
        (Value::Number(a), Value::Number(b)) => {
            let timeish = key.is_some_and(is_time_name);
            let epoch = |n: &serde_json::Number| {
                n.as_f64()
                    .is_some_and(|v| (1.0e9..1.0e10).contains(&v) || (1.0e12..1.0e13).contains(&v))
            };
            timeish && epoch(a) && epoch(b)
        }
        _ => false,
    }
}

fn is_time_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    [
        "time",
        "date",
        "timestamp",
        "created",
        "updated",
        "expires",
        "modified",
    ]
    .iter()
    .any(|w| lower.contains(w))
        || name.ends_with("At")
        || name.ends_with("_at")
        || lower == "ts"
}

/// RFC 3339 / ISO 8601 (`2026-11-25T05:06:57Z`, with fractions or offsets)
/// and RFC 1123 (`Wed, 25 Nov 2026 05:06:57 GMT`).
pub fn is_timestamp(s: &str) -> bool {
    let b = s.as_bytes();
    let iso = b.len() >= 19
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && b[7] == b'-'
        && (b[10] == b'T' || b[10] == b' ')
        && b[13] == b':'
        && b[16] == b':';
    let rfc1123 = b.len() == 29 && s.ends_with(" GMT") && b[3] == b',' && b[19] == b':';
    iso || rfc1123
}

/// Long random-looking tokens: ≥ 16 characters of hex or base64url with
/// both letters and digits.
fn is_token(s: &str) -> bool {
    s.len() >= 16
        && s.bytes().any(|b| b.is_ascii_digit())
        && s.bytes().any(|b| b.is_ascii_alphabetic())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'=' | b'+' | b'/'))
}

/// A value's identity for noise learning: CRC-32 (SIMD, a few instructions
/// per 16 bytes; SipHash cost ~1.5k instructions per 1 KiB body) with the
/// length. A collision only hides one change from the learner.
pub fn hash(bytes: &[u8]) -> u64 {
    u64::from(crc32fast::hash(bytes)) | ((bytes.len() as u64) << 32)
}

/// Whether a header takes part in a primary's [`fingerprint`].
fn fingerprinted(name: &str) -> bool {
    !(noisy(name) || name == "content-length" || name == "set-cookie")
}

/// One hash of everything [`fingerprint`] reads, as it arrived: two
/// responses with equal digests have equal fingerprints, so the fingerprint
/// (a JSON parse and a map of locations) is made only when the digest says
/// something changed. The reverse does not hold (JSON key order, header
/// order), which only costs the slow path.
pub fn digest(captured: &Captured) -> u64 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&captured.status.as_u16().to_le_bytes());
    for (name, value) in &captured.headers {
        if fingerprinted(name.as_str()) {
            hasher.update(name.as_str().as_bytes());
            hasher.update(b":");
            hasher.update(value.as_bytes());
            hasher.update(b"\n");
        }
    }
    hasher.update(&captured.body);
    u64::from(hasher.finalize()) ^ (captured.body_len << 32) ^ u64::from(captured.truncated)
}

/// A response reduced to `location → value hash`, with the same locations
/// `compare` uses. Two identical requests whose primaries differ somewhere
/// teach us that the location is noise (rule 4).
pub fn fingerprint(captured: &Captured, rules: &Rules, cap: usize) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    out.insert("status".to_string(), u64::from(captured.status.as_u16()));
    for (name, value) in &captured.headers {
        let name = name.as_str();
        if !fingerprinted(name) {
            continue;
        }
        let mut location = String::with_capacity("header.".len() + name.len());
        location.push_str("header.");
        location.push_str(name);
        out.insert(location, hash(value.as_bytes()));
    }
    if captured.truncated {
        out.insert("body".into(), hash(&captured.body) ^ captured.body_len);
        return out;
    }
    let body = decoded_body(captured, cap);
    let json = match body_kind(&captured.headers) {
        BodyKind::Json => serde_json::from_slice::<Value>(&body).ok(),
        _ => None,
    };
    match json {
        Some(value) => {
            let mut path = String::from("body");
            flatten(&value, &mut path, &mut out);
        }
        None => {
            out.insert("body".into(), hash(&body));
        }
    }
    out.retain(|location, _| !rules.ignores(location));
    out
}

fn flatten(value: &Value, path: &mut String, out: &mut BTreeMap<String, u64>) {
    if out.len() > 4096 {
        return;
    }
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                let len = path.len();
                path.push('.');
                path.push_str(k);
                flatten(v, path, out);
                path.truncate(len);
            }
        }
        Value::Array(items) => {
            out.insert(path.clone(), items.len() as u64);
            for (i, v) in items.iter().enumerate() {
                let len = path.len();
                path.push('[');
                path.push_str(&i.to_string());
                path.push(']');
                flatten(v, path, out);
                path.truncate(len);
            }
        }
        leaf => {
            out.insert(path.clone(), hash(leaf.to_string().as_bytes()));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::time::Duration;

    use http::StatusCode;

    use super::*;

    fn response(status: u16, content_type: &str, body: &str) -> Captured {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", content_type.parse().unwrap());
        Captured {
            status: StatusCode::from_u16(status).unwrap(),
            headers,
            body: Bytes::from(body.to_string()),
            body_len: body.len() as u64,
            truncated: false,
            latency: Duration::from_millis(1),
        }
    }

    fn json(body: &str) -> Captured {
        response(200, "application/json", body)
    }

    fn locations(diffs: &[Difference]) -> Vec<(&str, &str)> {
        diffs
            .iter()
            .map(|d| (d.location.as_str(), d.kind))
            .collect()
    }

    #[test]
    fn header_differences_come_sorted_whatever_the_header_order() {
        // Signatures join locations in order, so it must not depend on the
        // order the backends wrote their headers in.
        let mut p = json("{}");
        let mut s = json("{}");
        for (name, value) in [("x-zeta", "1"), ("x-alpha", "1"), ("x-mid", "1")] {
            p.headers.insert(name, value.parse().unwrap());
        }
        for (name, value) in [("x-beta", "2"), ("x-mid", "2"), ("x-zeta", "2")] {
            s.headers.insert(name, value.parse().unwrap());
        }
        assert_eq!(
            locations(&compare(&p, &s, &Rules::default(), 1 << 20)),
            [
                ("header.x-alpha", "missing"),
                ("header.x-beta", "added"),
                ("header.x-mid", "changed"),
                ("header.x-zeta", "changed"),
            ]
        );
    }

    #[test]
    fn header_order_and_skipped_headers_never_make_a_difference() {
        // Equal maps written in another order miss the in-order fast path;
        // the by-name path must still find them equal, and must keep the
        // order of one header's values, which HTTP gives meaning.
        let with = |pairs: &[(&'static str, &'static str)]| {
            let mut captured = json("{}");
            captured.headers.clear();
            for (name, value) in pairs {
                captured.headers.append(*name, value.parse().unwrap());
            }
            captured
        };
        let primary = with(&[
            ("content-type", "application/json"),
            ("vary", "accept"),
            ("date", "Mon, 01 Jan 2024 00:00:00 GMT"),
            ("vary", "origin"),
            ("cache-control", "no-store"),
            ("content-length", "2"),
        ]);
        let differences = |shadow: &Captured| {
            let diffs = compare(&primary, shadow, &Rules::default(), 1 << 20);
            locations(&diffs)
                .into_iter()
                .map(|(location, kind)| format!("{location} {kind}"))
                .collect::<Vec<_>>()
        };
        let same_in_order = with(&[
            ("content-type", "application/json"),
            ("vary", "accept"),
            ("vary", "origin"),
            ("cache-control", "no-store"),
        ]);
        assert!(differences(&same_in_order).is_empty());
        let reordered = with(&[
            ("connection", "keep-alive"),
            ("cache-control", "no-store"),
            ("date", "Tue, 02 Jan 2024 00:00:00 GMT"),
            ("vary", "accept"),
            ("content-length", "3"),
            ("content-type", "application/json"),
            ("vary", "origin"),
        ]);
        assert!(differences(&reordered).is_empty());
        let values_swapped = with(&[
            ("content-type", "application/json"),
            ("vary", "origin"),
            ("vary", "accept"),
            ("cache-control", "no-store"),
        ]);
        assert_eq!(differences(&values_swapped), ["header.vary changed"]);
        let one_more_value = with(&[
            ("cache-control", "no-store"),
            ("vary", "accept"),
            ("vary", "origin"),
            ("vary", "cookie"),
            ("content-type", "application/json"),
        ]);
        assert_eq!(differences(&one_more_value), ["header.vary changed"]);
        let one_missing = with(&[("vary", "accept"), ("vary", "origin")]);
        assert_eq!(
            differences(&one_missing),
            [
                "header.cache-control missing",
                "header.content-type missing"
            ]
        );
    }

    #[test]
    fn media_types_are_matched_in_any_case() {
        let kind = |content_type: &str| body_kind(&response(200, content_type, "").headers);
        assert_eq!(kind("Application/JSON; charset=UTF-8"), BodyKind::Json);
        assert_eq!(kind("application/problem+json"), BodyKind::Json);
        assert_eq!(kind("TEXT/html"), BodyKind::Text);
        assert_eq!(kind("application/XML"), BodyKind::Text);
        assert_eq!(kind("image/png"), BodyKind::Bytes);
        assert_eq!(kind("js"), BodyKind::Bytes);
    }

    #[test]
    fn json_diff_reports_field_paths() {
        let p = json(
            r#"{"slideshow":{"author":"Yours Truly","slides":[{"title":"A"},{"title":"B"}]}}"#,
        );
        let s =
            json(r#"{"slideshow":{"slides":[{"title":"A"},{"title":"C"}],"author":"Someone"}}"#);
        let diffs = compare(&p, &s, &Rules::default(), 1 << 20);
        assert_eq!(
            locations(&diffs),
            [
                ("body.slideshow.author", "changed"),
                ("body.slideshow.slides[1].title", "changed")
            ]
        );
        assert_eq!(diffs[0].primary, "\"Yours Truly\"");
        assert_eq!(diffs[0].shadow, "\"Someone\"");
    }

    #[test]
    fn key_order_is_never_a_difference() {
        let p = json(r#"{"a":1,"b":{"c":[1,2],"d":"x"}}"#);
        let s = json(r#"{"b":{"d":"x","c":[1,2]},"a":1}"#);
        assert!(compare(&p, &s, &Rules::default(), 1 << 20).is_empty());
    }

    #[test]
    fn missing_added_type_and_length() {
        let p = json(r#"{"gone":1,"n":1,"items":[1,2,3]}"#);
        let s = json(r#"{"new":true,"n":"1","items":[1,2]}"#);
        let diffs = compare(&p, &s, &Rules::default(), 1 << 20);
        assert_eq!(
            locations(&diffs),
            [
                ("body.gone", "missing"),
                ("body.items", "array_length"),
                ("body.n", "type_changed"),
                ("body.new", "added"),
            ]
        );
    }

    #[test]
    fn status_and_headers() {
        let mut p = response(200, "text/plain", "ok");
        let mut s = response(500, "text/plain", "ok");
        p.headers.insert("x-feature", "on".parse().unwrap());
        p.headers
            .insert("date", "Mon, 01 Jan 2024 00:00:00 GMT".parse().unwrap());
        s.headers
            .insert("date", "Tue, 02 Jan 2024 00:00:00 GMT".parse().unwrap());
        s.headers.insert("x-new", "1".parse().unwrap());
        s.headers.insert("content-length", "2".parse().unwrap());
        let diffs = compare(&p, &s, &Rules::default(), 1 << 20);
        assert_eq!(
            locations(&diffs),
            [
                ("status", "status_changed"),
                ("header.x-feature", "missing"),
                ("header.x-new", "added")
            ]
        );
    }

    #[test]
    fn text_and_bytes() {
        let diffs = compare(
            &response(200, "text/html", "<p>hello world</p>"),
            &response(200, "text/html", "<p>hello there</p>"),
            &Rules::default(),
            1 << 20,
        );
        assert_eq!(locations(&diffs), [("body", "text_changed")]);
        assert!(diffs[0].primary.contains("world") && diffs[0].shadow.contains("there"));
        let diffs = compare(
            &response(200, "image/png", "\u{1}\u{2}"),
            &response(200, "image/png", "\u{1}\u{3}\u{4}"),
            &Rules::default(),
            1 << 20,
        );
        assert_eq!(locations(&diffs), [("body", "bytes_changed")]);
        assert_eq!(
            (diffs[0].primary.as_str(), diffs[0].shadow.as_str()),
            ("2 bytes; byte 1: 0x02", "3 bytes; byte 1: 0x03")
        );
        // Equal lengths: where they differ is what tells them apart.
        let diffs = compare(
            &response(200, "image/png", "\u{1}\u{2}\u{3}\u{4}"),
            &response(200, "image/png", "\u{1}\u{2}\u{9}\u{4}"),
            &Rules::default(),
            1 << 20,
        );
        assert_eq!(
            (diffs[0].primary.as_str(), diffs[0].shadow.as_str()),
            ("4 bytes; byte 2: 0x03", "4 bytes; byte 2: 0x09")
        );
        // One a prefix of the other.
        let (primary, shadow) = first_difference(b"ab", b"abc");
        assert_eq!(
            (primary.as_str(), shadow.as_str()),
            ("2 bytes; ends before byte 2", "3 bytes; byte 2: 0x63")
        );
    }

    #[test]
    fn gzip_bodies_are_compared_decoded() {
        let gz = |text: &str| {
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            encoder.write_all(text.as_bytes()).unwrap();
            Bytes::from(encoder.finish().unwrap())
        };
        let mut p = json("");
        let mut s = json("");
        for (c, text) in [(&mut p, r#"{"a":1,"b":2}"#), (&mut s, r#"{"b":2,"a":3}"#)] {
            c.body = gz(text);
            c.body_len = c.body.len() as u64;
            c.headers
                .insert("content-encoding", "gzip".parse().unwrap());
        }
        let diffs = compare(&p, &s, &Rules::default(), 1 << 20);
        assert_eq!(locations(&diffs), [("body.a", "changed")]);
    }

    #[test]
    fn deflate_and_brotli_bodies_are_compared_decoded() {
        let zlib = |text: &str| {
            let mut encoder =
                flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
            encoder.write_all(text.as_bytes()).unwrap();
            Bytes::from(encoder.finish().unwrap())
        };
        let raw = |text: &str| {
            let mut encoder =
                flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
            encoder.write_all(text.as_bytes()).unwrap();
            Bytes::from(encoder.finish().unwrap())
        };
        // `{"name":"widget","price":3}` and `{"name":"gadget","price":3}`,
        // made with Python's `brotli.compress`.
        let unhex = |hex: &str| {
            let digits = |i: usize| u8::from_str_radix(&hex[i..i + 2], 16).unwrap();
            Bytes::from((0..hex.len()).step_by(2).map(digits).collect::<Vec<_>>())
        };
        let br = [
            unhex("0b0d807b226e616d65223a22776964676574222c227072696365223a337d03"),
            unhex("0b0d807b226e616d65223a22676164676574222c227072696365223a337d03"),
        ];
        let widget = r#"{"name":"widget","price":3}"#;
        let gadget = r#"{"name":"gadget","price":3}"#;
        let cases = [
            ("deflate", zlib(widget), zlib(gadget)),
            ("deflate", raw(widget), raw(gadget)),
            ("BR", br[0].clone(), br[1].clone()),
        ];
        for (coding, primary, shadow) in cases {
            let mut p = json("");
            let mut s = json("");
            for (c, body) in [(&mut p, primary), (&mut s, shadow)] {
                c.body_len = body.len() as u64;
                c.body = body;
                c.headers
                    .insert("content-encoding", coding.parse().unwrap());
            }
            let diffs = compare(&p, &s, &Rules::default(), 1 << 20);
            assert_eq!(locations(&diffs), [("body.name", "changed")], "{coding}");
        }
    }

    #[test]
    fn truncated_bodies_compare_length_and_prefix() {
        let mut p = json(r#"{"a":1"#);
        let mut s = json(r#"{"a":1"#);
        p.truncated = true;
        s.truncated = true;
        p.body_len = 1000;
        s.body_len = 1000;
        assert!(compare(&p, &s, &Rules::default(), 6).is_empty());
        s.body_len = 1200;
        let diffs = compare(&p, &s, &Rules::default(), 6);
        assert_eq!(locations(&diffs), [("body", "truncated_body_changed")]);
    }

    #[test]
    fn invalid_json_on_one_side() {
        let diffs = compare(
            &json(r#"{"a":1}"#),
            &json("oops"),
            &Rules::default(),
            1 << 20,
        );
        assert_eq!(locations(&diffs), [("body", "invalid_json")]);
    }

    #[test]
    fn numbers_are_compared_by_value_not_by_spelling() {
        let p = json(r#"{"a":1,"b":100,"c":2.5,"d":[0]}"#);
        let s = json(r#"{"a":1.0,"b":1e2,"c":2.50,"d":[0.0]}"#);
        assert!(compare(&p, &s, &Rules::default(), 1 << 20).is_empty());
        let diffs = compare(
            &json(r#"{"a":1,"big":9007199254740993}"#),
            &json(r#"{"a":1.5,"big":9007199254740992}"#),
            &Rules::default(),
            1 << 20,
        );
        assert_eq!(
            locations(&diffs),
            [("body.a", "changed"), ("body.big", "changed")]
        );
    }

    #[test]
    fn volatile_values_are_noise() {
        let p = json(
            r#"{"id":"3fa85f64-5717-4562-b3fc-2c963f66afa6","at":"2026-11-25T05:06:57Z","createdAt":1764047217,"token":"a1b2c3d4e5f6a7b8c9d0","n":1}"#,
        );
        let s = json(
            r#"{"id":"1c2b9e5a-8d2f-4b1e-9a3c-5f6e7d8c9b0a","at":"2026-11-25T05:07:01.123+00:00","createdAt":1764047221,"token":"f0e9d8c7b6a5f4e3d2c1","n":2}"#,
        );
        let diffs = compare(&p, &s, &Rules::default(), 1 << 20);
        assert_eq!(locations(&diffs), [("body.n", "changed")]);
        // A UUID replaced by a plain word is a real change.
        let diffs = compare(
            &json(r#"{"id":"3fa85f64-5717-4562-b3fc-2c963f66afa6"}"#),
            &json(r#"{"id":"none"}"#),
            &Rules::default(),
            1 << 20,
        );
        assert_eq!(locations(&diffs), [("body.id", "changed")]);
        // Epoch numbers only count as time in time-named fields.
        let diffs = compare(
            &json(r#"{"count":1764047217}"#),
            &json(r#"{"count":1764047221}"#),
            &Rules::default(),
            1 << 20,
        );
        assert_eq!(locations(&diffs), [("body.count", "changed")]);
    }

    #[test]
    fn ignore_paths_cover_children_and_wildcards() {
        assert!(path_covers("body.items[*].etag", "body.items[3].etag"));
        assert!(path_covers("body.meta", "body.meta.generatedAt"));
        assert!(path_covers("body.meta.*", "body.meta.x"));
        assert!(!path_covers("body.meta", "body.metadata"));
        assert!(!path_covers("body.items[*].etag", "body.items.etag"));
        let rules = Rules {
            ignore_headers: &["x-version".into()],
            ignore_paths: &["body.items[*].etag".into(), "body.meta".into()],
            hosts: None,
        };
        let mut p = json(r#"{"items":[{"etag":"a","v":1}],"meta":{"t":1},"keep":1}"#);
        let mut s = json(r#"{"items":[{"etag":"b","v":1}],"meta":{"t":2},"keep":2}"#);
        p.headers.insert("x-version", "1".parse().unwrap());
        s.headers.insert("x-version", "2".parse().unwrap());
        assert_eq!(
            locations(&compare(&p, &s, &rules, 1 << 20)),
            [("body.keep", "changed")]
        );
    }

    #[test]
    fn the_shadow_host_rewrite_is_not_a_difference() {
        let hosts = Hosts::new("httpbin:8000");
        let rules = Rules {
            hosts: Some(&hosts),
            ..Rules::default()
        };
        let mut p = json(r#"{"url":"http://httpbin:8000/get","headers":{"Host":"httpbin:8000"}}"#);
        let mut s = json(
            r#"{"url":"http://httpbin-shadow:8000/get","headers":{"Host":"httpbin-shadow:8000"}}"#,
        );
        p.headers
            .insert("location", "http://httpbin:8000/next".parse().unwrap());
        s.headers.insert(
            "location",
            "http://httpbin-shadow:8000/next".parse().unwrap(),
        );
        s.headers.insert("content-length", "99".parse().unwrap());
        assert!(compare(&p, &s, &rules, 1 << 20).is_empty());
        // Without the mapping the same pair differs.
        assert_eq!(compare(&p, &s, &Rules::default(), 1 << 20).len(), 3);
    }

    #[test]
    fn fingerprints_use_the_same_locations() {
        let a = fingerprint(
            &json(r#"{"x":{"y":[1,2]},"z":"q"}"#),
            &Rules::default(),
            1 << 20,
        );
        let b = fingerprint(
            &json(r#"{"x":{"y":[1,3]},"z":"q"}"#),
            &Rules::default(),
            1 << 20,
        );
        let changed: Vec<&String> = a.keys().filter(|k| a.get(*k) != b.get(*k)).collect();
        assert_eq!(changed, ["body.x.y[1]"]);
    }
}
