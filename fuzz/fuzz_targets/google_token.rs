//! Google's answers as the broker reads them: the STS token exchange (`expires_in`) and
//! IAM Credentials' `generateAccessToken` (`expireTime`, an RFC 3339 time). Any JSON
//! gives a bounded expiry after the request or an upstream error, never a panic.
#![no_main]

use cloudpass_broker::credential::{MAX_UPSTREAM_LIFETIME, parse_google_iam_answer, parse_google_sts_answer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(answer) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    match parse_google_sts_answer(&answer) {
        Ok(token) => {
            let lifetime = token.expires_in.expect("STS answers carry expires_in");
            assert!(lifetime.is_positive() && lifetime <= MAX_UPSTREAM_LIFETIME, "{lifetime:?}");
        }
        Err(refusal) => assert!(refusal.is_upstream(), "{refusal:?}"),
    }
    // A fixed request time, so that a found input reproduces.
    let issued_at = jiff::Timestamp::from_second(1_800_000_000).expect("a valid time");
    match parse_google_iam_answer(&answer, issued_at) {
        Ok((_, expires_at)) => {
            let lifetime = expires_at.duration_since(issued_at);
            assert!(lifetime.is_positive() && lifetime <= MAX_UPSTREAM_LIFETIME, "{lifetime:?}");
        }
        Err(refusal) => assert!(refusal.is_upstream(), "{refusal:?}"),
    }
});
