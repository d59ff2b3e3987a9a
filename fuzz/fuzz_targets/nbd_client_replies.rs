//! Any bytes as what a server sends back on a connection with four requests waiting (a
//! READ, a BLOCK_STATUS, a short READ, a FLUSH; cookies 1 to 4), in the header mode the
//! first byte picks: the client's reply reader ends with an error or at EOF, never
//! panics, and every waiting request gets an answer (a hang would be a fuzz timeout).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tidemark_nbd::client::replay_replies;
use tidemark_nbd::proto::{Command, HeaderMode, Request};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, replies)) = data.split_first() else {
        return;
    };
    let mode = match first % 3 {
        0 => HeaderMode::Simple,
        1 => HeaderMode::Structured,
        _ => HeaderMode::Extended,
    };
    let request = |cookie, command, offset, length| Request {
        flags: 0,
        command,
        cookie,
        offset,
        length,
    };
    let requests = [
        request(1, Command::Read, 0, 4096),
        request(2, Command::BlockStatus, 0, 1 << 20),
        request(3, Command::Read, 8192, 512),
        request(4, Command::Flush, 0, 0),
    ];
    let outcomes = runtime().block_on(replay_replies(mode, &[1, 2], &requests, replies.to_vec()));
    assert_eq!(outcomes.len(), requests.len());
});
