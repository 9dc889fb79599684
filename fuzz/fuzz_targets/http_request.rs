//! Fuzzes the HTTP request-head parser and what is read from a parsed request.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::http::{parse_request, valid_ws_key, Parse};

fuzz_target!(|data: &[u8]| {
    if let Ok(Parse::Complete(req, head_len)) = parse_request(data) {
        assert!(head_len <= data.len());
        let _ = req.query_param("token");
        let _ = req.query_param("since");
        let _ = req.token();
        if let Some(key) = req.ws_key.as_deref() {
            if valid_ws_key(key) {
                let _ = switchboard::http::upgrade_response(key);
            }
        }
    }
});
