//! The shadow analysis compares bodies that two untrusted backends sent:
//! arbitrary bytes, JSON or not, gzip or not, must compare without
//! panicking, and a response must never differ from itself.
//!
//! Input layout: byte 0 picks content types, encodings and rules; the rest
//! is split at the first `0xff` (never valid UTF-8) into primary and shadow
//! bodies, and the shadow's text may also name an ignore pattern.
#![no_main]

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use libfuzzer_sys::fuzz_target;
use umbra::analysis::diff::{compare, digest, fingerprint, path_covers, Hosts, Rules};
use umbra::analysis::Captured;

/// The capture cap the analysis uses by default.
const CAP: usize = 256 * 1024;

fn captured(body: &[u8], content_type: &str, truncated: bool) -> Captured {
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_str(content_type).unwrap(),
    );
    Captured {
        status: StatusCode::OK,
        headers,
        body: Bytes::copy_from_slice(body),
        body_len: body.len() as u64,
        truncated,
        latency: Duration::from_millis(1),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let (primary, shadow) = match rest.iter().position(|&b| b == 0xff) {
        Some(at) => (&rest[..at], &rest[at + 1..]),
        None => (rest, rest),
    };
    let content_type = match flags & 3 {
        0 | 1 => "application/json",
        2 => "text/plain",
        _ => "application/octet-stream",
    };
    let truncated = flags & 4 != 0;
    let mut p = captured(primary, content_type, truncated);
    let mut s = captured(shadow, content_type, false);
    if flags & 8 != 0 {
        // Not real gzip (usually): exercises the decode-error fallback.
        for c in [&mut p, &mut s] {
            c.headers.insert(
                http::header::CONTENT_ENCODING,
                HeaderValue::from_static("gzip"),
            );
        }
    }
    // Let the input choose an ignore pattern, `[*]` and all.
    let patterns: Vec<String> = if flags & 32 != 0 {
        let pattern = String::from_utf8_lossy(&shadow[..shadow.len().min(32)]).into_owned();
        let _ = path_covers(&pattern, "body.items[3].etag");
        vec![pattern]
    } else {
        Vec::new()
    };
    let mut rules = Rules {
        ignore_paths: &patterns,
        ..Rules::default()
    };
    let hosts = Hosts::new("httpbin:8000");
    if flags & 16 != 0 {
        rules.hosts = Some(&hosts);
    }

    let differences = compare(&p, &s, &rules, CAP);
    assert!(differences.len() <= 64);
    let _ = fingerprint(&p, &rules, CAP);
    let _ = fingerprint(&s, &rules, CAP);
    let _ = digest(&p);

    // Self-comparison finds nothing, whatever the bytes are.
    let same = compare(&s, &s, &Rules::default(), CAP);
    assert!(same.is_empty(), "{same:?}");
});
