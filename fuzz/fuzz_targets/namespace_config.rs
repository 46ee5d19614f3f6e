//! The compiled namespace config the webhook and broker read from ConfigMaps: unknown
//! versions, tampered hashes and dangling references must be refused, never panic.
#![no_main]

use cloudpass_api::config::NamespaceConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(config) = NamespaceConfig::from_json(text) {
        // Whatever is accepted round-trips to the same document.
        let again = NamespaceConfig::from_json(&config.to_json()).expect("an accepted config re-reads");
        assert_eq!(again, config);
    }
});
