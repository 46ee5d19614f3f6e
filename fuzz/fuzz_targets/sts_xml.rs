//! STS answers (XML) as the broker parses them: success fields and error codes. Hostile
//! XML (deep nesting, entities, huge text) must give an error, never a panic.
#![no_main]

use cloudpass_broker::aws::{sts_error, xml_fields};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(xml) = std::str::from_utf8(data) else { return };
    let _ = xml_fields(
        xml,
        &[&["AssumeRoleWithWebIdentityResult", "Credentials", "AccessKeyId"], &["GetCallerIdentityResult", "Arn"]],
    );
    let _ = sts_error(xml);
});
