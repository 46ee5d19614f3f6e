//! Reading a JWT's parts without verifying them: to choose how to verify a token (its
//! issuer), to refuse early what cannot be one, or to pick among tokens the broker
//! signed. Nothing read here is trusted as such.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use serde_json::Value;

/// One part of a compact JWS, base64url-decoded (padding tolerated) and parsed, if it is
/// a JSON object.
pub fn unverified_part(part: &str) -> Option<Value> {
    let bytes = URL_SAFE_NO_PAD.decode(part.trim_end_matches('=')).ok()?;
    let value: Value = serde_json::from_slice(&bytes).ok()?;
    value.is_object().then_some(value)
}

/// The claims of a compact JWS (its second part), if they are a JSON object.
pub fn unverified_claims(token: &str) -> Option<Value> {
    unverified_part(token.split('.').nth(1)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_read_tolerantly_and_only_objects_count() {
        let payload = URL_SAFE_NO_PAD.encode(r#"{"iss":"https://i"}"#);
        assert_eq!(unverified_claims(&format!("x.{payload}.y")).unwrap()["iss"], "https://i");
        assert_eq!(unverified_claims(&format!("x.{payload}==.y")).unwrap()["iss"], "https://i");
        for junk in ["", "a", "a.b.c", "a.!!!.c", &format!("x.{}.y", URL_SAFE_NO_PAD.encode("[1]"))] {
            assert_eq!(unverified_claims(junk), None, "{junk}");
        }
    }
}
