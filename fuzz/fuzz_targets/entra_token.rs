//! Entra ID's `client_credentials` answer, as the broker reads it: `expires_in` is
//! required, and any JSON gives a bounded lifetime or an upstream error, never a panic.
#![no_main]

use cloudpass_broker::credential::{MAX_UPSTREAM_LIFETIME, parse_entra_answer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(answer) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    match parse_entra_answer(&answer) {
        Ok(token) => {
            let lifetime = token.expires_in.expect("Entra answers carry expires_in");
            assert!(lifetime.is_positive() && lifetime <= MAX_UPSTREAM_LIFETIME, "{lifetime:?}");
            jiff::Timestamp::now().checked_add(lifetime).expect("a bounded lifetime adds to now");
        }
        Err(refusal) => assert!(refusal.is_upstream(), "{refusal:?}"),
    }
});
