//! Endpoint templates are computed from the request path of every mirrored
//! request, so any path (including non-ASCII and query strings) must map
//! to a template without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use umbra::analysis::template::template;

fuzz_target!(|data: &[u8]| {
    let path = String::from_utf8_lossy(data);
    let out = template(&path);
    assert!(!out.is_empty());
    // The query never leaks into the endpoint name.
    assert!(!out.contains('?'));
    // Templating is idempotent: `{id}` is not itself an id.
    assert_eq!(template(&out), out, "{path:?}");
});
