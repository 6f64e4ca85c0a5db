//! A client's request head, read as umbra's own HTTP/1.1 server reads it
//! (`server::lean`): whatever bytes arrive, no panic; a head it serves is
//! taken from the front of the buffer and nothing else, and one it does
//! not serve (incomplete, or left to hyper) leaves every byte in place.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use umbra::server::lean::read_head;

fuzz_target!(|data: &[u8]| {
    let mut read = BytesMut::from(data);
    match read_head(&mut read) {
        Some(request) => {
            assert!(read.len() < data.len());
            assert!(data.ends_with(&read));
            assert!(request.body().is_none());
        }
        None => assert_eq!(&read[..], data),
    }
});
