//! An OAuth2 token endpoint's `client_credentials` answer, as the broker reads it: any
//! JSON (hostile `expires_in` numbers, huge strings, wrong types) gives a token with a
//! lifetime the broker can add to a time, or an upstream error, never a panic.
#![no_main]

use cloudpass_broker::credential::{MAX_UPSTREAM_LIFETIME, parse_oauth2_answer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(answer) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    match parse_oauth2_answer(&answer) {
        Ok(token) => {
            if let Some(lifetime) = token.expires_in {
                assert!(lifetime.is_positive() && lifetime <= MAX_UPSTREAM_LIFETIME, "{lifetime:?}");
                jiff::Timestamp::now().checked_add(lifetime).expect("a bounded lifetime adds to now");
            }
        }
        Err(refusal) => assert!(refusal.is_upstream(), "{refusal:?}"),
    }
});
