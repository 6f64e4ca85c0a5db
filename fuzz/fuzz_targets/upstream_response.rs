//! A shadow target's response, read as umbra reads it (`proxy::lean`):
//! whatever bytes an upstream sends, reading ends with an answer or an
//! error, never a panic or a hang, and counts no more body than was sent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;
use umbra::proxy::lean::{read_response, Keep};

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        // A small pipe, so long inputs arrive in several reads.
        let (mut upstream, socket) = tokio::io::duplex(4096);
        let sent = data.to_vec();
        let sender = tokio::spawn(async move {
            let _ = upstream.write_all(&sent).await;
        });
        let keep = Keep {
            headers: true,
            body: 64,
        };
        let head_only = data.len() % 7 == 0;
        if let Ok(answer) = read_response(socket, head_only, keep).await {
            assert!(answer.body_len <= data.len() as u64);
            assert!(answer.kept.len() <= 64);
        }
        sender.abort();
    });
});
