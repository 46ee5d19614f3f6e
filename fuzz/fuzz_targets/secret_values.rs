//! What a cloud's secret store returns, as cloudpass hands it on: `jsonKey` extraction
//! from any text, and the file formats the agent writes it in. Errors name the key,
//! never the value; a dotenv line always parses back to the value; an AWS shared
//! credentials file never holds a line the value did not put there as one key.
#![no_main]

use cloudpass_agent::file::render;
use cloudpass_api::{broker::Credential, policy::FileFormat, secret::SecretString, secret_store::extract};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let until = jiff::Timestamp::UNIX_EPOCH;
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (key, value) = text.split_once('\u{0}').unwrap_or(("password", text));
    if let Err(why) = extract(value, Some(key))
        && value.len() > 8
    {
        assert!(!why.contains(value), "an extraction error shows no secret");
    }
    let credential = Credential::ApiKey { key: SecretString::new(value) };
    for format in [FileFormat::Raw, FileFormat::Json, FileFormat::Dotenv] {
        let written = render(&credential, format, until).expect("an API key renders in every format");
        if format == FileFormat::Json {
            let parsed: serde_json::Value = serde_json::from_str(written.expose()).expect("valid JSON");
            assert_eq!(parsed["apiKey"], value);
        }
        if format == FileFormat::Dotenv {
            // One line, single-quoted, every ' closed and escaped.
            let line = written.expose().strip_prefix("API_KEY='").and_then(|l| l.strip_suffix("'\n")).unwrap();
            assert_eq!(line.replace(r"'\''", "'"), value);
        }
    }
    let aws = Credential::Aws {
        access_key_id: "ASIAFUZZ".into(),
        secret_access_key: SecretString::new("s"),
        session_token: SecretString::new(value),
        account_id: None,
    };
    match render(&aws, FileFormat::Raw, until) {
        Ok(ini) => {
            let lines: Vec<&str> = ini.expose().lines().collect();
            assert_eq!(lines.len(), 4, "a profile header and three keys");
            assert_eq!(lines[3].strip_prefix("aws_session_token = "), Some(value));
        }
        Err(why) => assert!(value.contains(['\n', '\r']) && !why.to_string().contains(value)),
    }
});
