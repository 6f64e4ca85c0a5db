//! Header work on the request path: hop-by-hop stripping, forwarding
//! headers, request ids and the VirtualService `headers` rules.

use std::cell::RefCell;
use std::net::IpAddr;

use bytes::{Bytes, BytesMut};
use http::header::Entry;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::config::model::HeaderOps;

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
pub static X_UMBRA_ERROR: HeaderName = HeaderName::from_static("x-umbra-error");
/// Connection-specific headers (RFC 9110 §7.6.1) that never cross a proxy.
/// `te` is handled apart: `te: trailers` survives, as gRPC needs it.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Where `name` (lower case) is in [`HOP_BY_HOP`]. A match on the text
/// compiles to a switch on its length, cheaper than comparing with each
/// name in turn.
pub fn hop_by_hop(name: &[u8]) -> Option<usize> {
    Some(match name {
        b"connection" => 0,
        b"keep-alive" => 1,
        b"proxy-connection" => 2,
        b"proxy-authenticate" => 3,
        b"proxy-authorization" => 4,
        b"trailer" => 5,
        b"transfer-encoding" => 6,
        b"upgrade" => 7,
        _ => return None,
    })
}

/// Replaces every value with a copy; the copies share one allocation.
/// hyper parses without copying, so each value is a slice of its
/// connection's read buffer (8 KiB and up): headers kept after their
/// exchange (an analysis capture, a shadow waiting for a place) would pin
/// whole buffers.
pub fn detach(headers: &mut HeaderMap) {
    let size = headers.values().map(HeaderValue::len).sum();
    let mut arena = BytesMut::with_capacity(size);
    for value in headers.values_mut() {
        arena.extend_from_slice(value.as_bytes());
        // `split` hands over what was just written, sharing the allocation.
        // The bytes are those of a valid value, so this cannot fail; if it
        // did, the original value would simply stay.
        if let Ok(mut copy) = HeaderValue::from_maybe_shared(arena.split().freeze()) {
            copy.set_sensitive(value.is_sensitive());
            *value = copy;
        }
    }
}

/// Removes connection-specific headers, including any the `Connection`
/// header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names finds what is there; removing only that is far
    // cheaper than a hashed removal for every listed name (most messages
    // carry one hop-by-hop header at most: `connection: keep-alive`).
    let mut present = [false; HOP_BY_HOP.len()];
    let mut te = false;
    for name in headers.keys() {
        if let Some(index) = hop_by_hop(name.as_str().as_bytes()) {
            present[index] = true;
        }
        te |= name == header::TE;
    }
    if present[0] {
        // (Index 0 is `connection`.) Every Connection value lists names to
        // remove; only valid header names are removable. Listed hop-by-hop
        // names (`keep-alive`, `upgrade`) need no parse, as the loop below
        // removes them anyway. Plain loops: iterator adapters over the
        // tokens cost four times as much for the usual `keep-alive`.
        let mut named = Vec::new();
        for value in headers.get_all(header::CONNECTION) {
            for token in value.as_bytes().split(|&b| b == b',') {
                let token = token.trim_ascii();
                let listed = |hop: &HeaderName| token.eq_ignore_ascii_case(hop.as_str().as_bytes());
                if token.is_empty() || HOP_BY_HOP.iter().any(listed) {
                    continue;
                }
                if let Ok(name) = HeaderName::from_bytes(token) {
                    named.push(name);
                }
            }
        }
        for name in named {
            headers.remove(name);
        }
    }
    for (name, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, here)| *here) {
        headers.remove(name);
    }
    if present[6] {
        // (Index 6 is `transfer-encoding`.) RFC 9112 §6.3: an intermediary
        // forwarding a message with both removes the Content-Length, which
        // would otherwise frame the decoded body.
        headers.remove(header::CONTENT_LENGTH);
    }
    if te {
        let trailers = headers
            .get(header::TE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
        if !trailers {
            headers.remove(header::TE);
        }
    }
}

/// The `x-forwarded-for` entry for a client address. Rendered once per
/// connection: formatting an address costs more than the rest of the header
/// work together.
pub fn forwarded_for(client: IpAddr) -> HeaderValue {
    HeaderValue::from_maybe_shared(Bytes::from(client.to_string()))
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// Appends the client address (from [`forwarded_for`]) to `x-forwarded-for`
/// and sets `x-forwarded-proto` to how the client reached umbra (`secure`:
/// over TLS).
pub fn add_forwarded(headers: &mut HeaderMap, client: &HeaderValue, secure: bool) {
    // One lookup for both reading and writing: custom header names hash
    // byte by byte.
    match headers.entry(&X_FORWARDED_FOR) {
        Entry::Occupied(mut entry) if !entry.get().is_empty() => {
            let existing = entry.get().as_bytes();
            let mut joined = Vec::with_capacity(existing.len() + 2 + client.len());
            joined.extend_from_slice(existing);
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(client.as_bytes());
            if let Ok(value) = HeaderValue::from_maybe_shared(Bytes::from(joined)) {
                entry.insert(value);
            }
        }
        Entry::Occupied(mut entry) => {
            entry.insert(client.clone());
        }
        Entry::Vacant(entry) => {
            entry.insert(client.clone());
        }
    }
    let proto = if secure { "https" } else { "http" };
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
}

/// Keeps a client's `x-request-id`, or sets a fresh UUID (version 4).
/// Returns the id.
pub fn ensure_request_id(headers: &mut HeaderMap) -> HeaderValue {
    match headers.entry(&X_REQUEST_ID) {
        Entry::Occupied(entry) if !entry.get().is_empty() => entry.get().clone(),
        Entry::Occupied(mut entry) => {
            let id = fresh_request_id();
            entry.insert(id.clone());
            id
        }
        Entry::Vacant(entry) => entry.insert(fresh_request_id()).clone(),
    }
}

/// A random UUID from a per-thread generator: ids need to be unique, not
/// unguessable, and this is several times cheaper than a CSPRNG.
fn fresh_request_id() -> HeaderValue {
    thread_local! {
        static RNG: RefCell<SmallRng> = RefCell::new(SmallRng::from_rng(&mut rand::rng()));
    }
    // One u128, not [u8; 16]: an array is drawn a byte at a time.
    let bytes = RNG.with(|rng| rng.borrow_mut().random::<u128>().to_le_bytes());
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .hyphenated()
        .encode_lower(&mut text);
    // One allocation holding the text and its count: clones (for the log,
    // the shadow and the analysis) are then a counter increment.
    HeaderValue::from_maybe_shared(Bytes::from_owner(text))
        .unwrap_or_else(|_| HeaderValue::from_static("-"))
}

/// Applies a route's and its chosen destination's header rules as the
/// Envoy config Istio builds does. For a route with one destination, Istio
/// puts both in the route's lists (route first): every `remove` of both
/// goes first, then the route's `set` and `add`, then the destination's.
/// With several, the destination's rules sit on its weighted cluster,
/// which Envoy applies before the route's (so the route's `set` wins).
pub fn apply_route(
    route: &HeaderOps,
    destination: &HeaderOps,
    single: bool,
    headers: &mut HeaderMap,
) {
    if single {
        for name in &destination.remove {
            headers.remove(&name.0);
        }
        apply(route, headers);
        apply_set_add(destination, headers);
    } else {
        apply(destination, headers);
        apply(route, headers);
    }
}

/// Applies Istio's `set`, `add`, `remove` in Envoy's order: remove, set, add.
pub fn apply(ops: &HeaderOps, headers: &mut HeaderMap) {
    for name in &ops.remove {
        headers.remove(&name.0);
    }
    apply_set_add(ops, headers);
}

fn apply_set_add(ops: &HeaderOps, headers: &mut HeaderMap) {
    for (name, value) in &ops.set {
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.insert(name.0.clone(), value);
        }
    }
    for (name, value) in &ops.add {
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.append(name.0.clone(), value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detached_values_let_go_of_the_read_buffer() {
        let read_buffer = Bytes::from(vec![b'a'; 8192]);
        let slice = |range| HeaderValue::from_maybe_shared(read_buffer.slice(range)).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("x-one", slice(0..3));
        let mut secret = slice(3..5);
        secret.set_sensitive(true);
        headers.append("x-two", secret);
        headers.append("x-one", HeaderValue::from_static("b"));
        headers.append("x-empty", slice(5..5));
        assert!(!read_buffer.is_unique());

        detach(&mut headers);
        assert!(read_buffer.is_unique(), "still pinned");
        let one: Vec<_> = headers.get_all("x-one").iter().collect();
        assert_eq!(one, ["aaa", "b"]);
        assert_eq!(headers["x-two"], "aa");
        assert!(headers["x-two"].is_sensitive());
        assert_eq!(headers["x-empty"], "");
        assert_eq!(headers.len(), 4);
    }

    #[test]
    fn strips_hop_by_hop_and_named_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, "close, x-private".parse().unwrap());
        headers.insert("x-private", "1".parse().unwrap());
        headers.insert("keep-alive", "timeout=5".parse().unwrap());
        headers.insert(header::TE, "gzip".parse().unwrap());
        headers.insert("x-keep", "1".parse().unwrap());
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key("x-keep"));
    }

    #[test]
    fn connection_tokens_match_in_any_case() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            "Keep-Alive, X-Private, Close".parse().unwrap(),
        );
        headers.insert("keep-alive", "timeout=5".parse().unwrap());
        headers.insert("x-private", "1".parse().unwrap());
        headers.insert("x-keep", "1".parse().unwrap());
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.keys().collect::<Vec<_>>(), ["x-keep"]);
    }

    #[test]
    fn hop_by_hop_indexes_the_list() {
        for (index, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop(name.as_str().as_bytes()), Some(index), "{name}");
        }
        assert_eq!(hop_by_hop(b"te"), None);
    }

    #[test]
    fn every_connection_value_names_headers_to_remove() {
        let mut headers = HeaderMap::new();
        headers.append(header::CONNECTION, "close".parse().unwrap());
        headers.append(header::CONNECTION, "x-second".parse().unwrap());
        headers.insert("close", "1".parse().unwrap());
        headers.insert("x-second", "1".parse().unwrap());
        headers.insert("x-keep", "1".parse().unwrap());
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.keys().collect::<Vec<_>>(), ["x-keep"]);
    }

    #[test]
    fn strips_every_listed_header_and_nothing_else() {
        let mut headers = HeaderMap::new();
        for name in &HOP_BY_HOP {
            headers.append(name, "x".parse().unwrap());
        }
        headers.insert("x-keep", "1".parse().unwrap());
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.keys().collect::<Vec<_>>(), ["x-keep"]);
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
    }

    #[test]
    fn a_content_length_beside_transfer_encoding_goes_with_it() {
        let mut headers = HeaderMap::new();
        headers.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        headers.insert(header::CONTENT_LENGTH, "5".parse().unwrap());
        strip_hop_by_hop(&mut headers);
        assert!(headers.is_empty(), "{headers:?}");
        headers.insert(header::CONTENT_LENGTH, "5".parse().unwrap());
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers[header::CONTENT_LENGTH], "5", "alone, it stays");
    }

    #[test]
    fn te_trailers_survives() {
        let mut headers = HeaderMap::new();
        headers.insert(header::TE, "trailers".parse().unwrap());
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers[header::TE], "trailers");
    }

    #[test]
    fn forwarded_for_appends() {
        let mut headers = HeaderMap::new();
        headers.insert(&X_FORWARDED_FOR, "10.0.0.1".parse().unwrap());
        add_forwarded(
            &mut headers,
            &forwarded_for("127.0.0.1".parse().unwrap()),
            false,
        );
        assert_eq!(headers[&X_FORWARDED_FOR], "10.0.0.1, 127.0.0.1");
        assert_eq!(headers[&X_FORWARDED_PROTO], "http");
        add_forwarded(&mut headers, &forwarded_for("::1".parse().unwrap()), true);
        assert_eq!(headers[&X_FORWARDED_FOR], "10.0.0.1, 127.0.0.1, ::1");
        assert_eq!(headers[&X_FORWARDED_PROTO], "https");
    }

    #[test]
    fn request_id_is_kept_or_generated() {
        let mut headers = HeaderMap::new();
        headers.insert(&X_REQUEST_ID, "abc".parse().unwrap());
        assert_eq!(ensure_request_id(&mut headers), "abc");
        let fresh = |headers: &mut HeaderMap| {
            let returned = ensure_request_id(headers);
            assert_eq!(headers[&X_REQUEST_ID], returned);
            let id = returned.to_str().unwrap().to_string();
            let uuid = uuid::Uuid::parse_str(&id).unwrap();
            assert_eq!(uuid.get_version_num(), 4, "{id}");
            id
        };
        let mut headers = HeaderMap::new();
        headers.insert(&X_REQUEST_ID, HeaderValue::from_static(""));
        let first = fresh(&mut headers);
        assert_ne!(first, fresh(&mut HeaderMap::new()));
    }
}
