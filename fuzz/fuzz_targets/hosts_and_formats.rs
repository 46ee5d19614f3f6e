//! The agent's proxy decisions on what the app sends: the Host it asks for against the
//! policy's patterns, the SigV4 scope derived from a host, and header formats.
#![no_main]

use cloudpass_agent::proxy::header_value;
use cloudpass_api::{
    broker::Credential,
    secret::SecretString,
    selector::{glob_matches, host_matches},
};
use cloudpass_outbound::sigv4::sigv4_scope_from_host;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (left, right) = text.split_at(text.char_indices().nth(text.chars().count() / 2).map_or(0, |(i, _)| i));
    let _ = host_matches(left, right);
    let _ = glob_matches(left, right);
    let _ = sigv4_scope_from_host(text);
    let credentials = [
        Credential::ApiKey { key: SecretString::new("k") },
        Credential::UsernamePassword { username: "u".into(), password: SecretString::new("p") },
    ];
    for credential in &credentials {
        if let Ok(value) = header_value(text, credential) {
            // What a header can carry: no line break, no other control character.
            assert!(!value.expose().chars().any(|c| c.is_control() && c != '\t'), "a header value is clean");
        }
    }
});
