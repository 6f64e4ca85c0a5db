//! Host handling on the request path: validation, port stripping and the
//! `-shadow` suffix must never panic, and must agree with each other.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(host) = std::str::from_utf8(data) else {
        return;
    };
    let valid = umbra::proxy::valid_host(host);
    let stripped = umbra::routing::strip_port(host);
    assert!(host.starts_with(stripped));
    let shadow = umbra::mirror::shadow_host(host);
    assert!(shadow.contains("-shadow"));
    if valid {
        // A valid host keeps its port after the suffix is inserted.
        let port = &host[stripped.len()..];
        assert!(shadow.ends_with(port), "{host} -> {shadow}");
        assert_eq!(shadow.len(), host.len() + "-shadow".len());
    }
});
