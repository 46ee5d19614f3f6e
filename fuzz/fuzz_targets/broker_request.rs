//! What reaches the broker from a pod, and what reaches the agent from the broker: the
//! credential request (JSON, unknown fields refused), the bearer token's unverified
//! issuer (read before verification to pick the keys), and the broker's answers.
#![no_main]

use cloudpass_api::broker::{BrokerError, CredentialRequest, CredentialResponse};
use cloudpass_broker::{authn::unverified_issuer, jwt::claim_strings};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = serde_json::from_slice::<CredentialRequest>(data) {
        // What parses must serialize back (the agent sends what the broker reads).
        serde_json::to_vec(&request).expect("a parsed request serializes");
    }
    let _ = serde_json::from_slice::<CredentialResponse>(data);
    let _ = serde_json::from_slice::<BrokerError>(data);
    if let Ok(token) = std::str::from_utf8(data) {
        let _ = unverified_issuer(token);
    }
    if let Ok(claims) = serde_json::from_slice::<serde_json::Value>(data) {
        for path in ["sub", "google.compute_engine.project_id", "xms_mirid", "kubernetes.io.pod.name"] {
            let _ = claim_strings(&claims, path);
        }
    }
});
