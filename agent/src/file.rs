//! The `file` delivery: the credential written into the pod's in-memory volume, in the
//! format the policy names, replaced atomically (written beside, then renamed) so a
//! reader never sees half of it, and removed when the broker refuses the pod.

use std::{io::Write as _, os::unix::fs::PermissionsExt, path::Path};

use cloudpass_api::{broker::Credential, policy::FileFormat, secret::SecretString};
use jiff::Timestamp;
use serde_json::json;

use crate::error::AgentError;

/// A value between single quotes for a POSIX shell or a dotenv loader: `'` becomes
/// `'\''`.
fn quoted(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

fn dotenv(pairs: &[(&str, &str)]) -> String {
    pairs.iter().map(|(k, v)| format!("{k}={}\n", quoted(v))).collect()
}

/// The file's content for `credential` in `format`; `until` is when the agent stops
/// serving it (the expiry the AWS and access-token formats carry). API keys, usernames and
/// passwords, access tokens and JWTs are written as themselves; AWS credentials in the
/// formats the AWS SDKs and CLI read: `Raw` the shared credentials file (a `[default]`
/// profile, for `AWS_SHARED_CREDENTIALS_FILE`), `Json` the output of a
/// `credential_process` (which the SDKs run again before `Expiration`), `Dotenv` the
/// variables of `aws configure export-credentials --format env-no-export`.
pub fn render(credential: &Credential, format: FileFormat, until: Timestamp) -> Result<SecretString, AgentError> {
    let expires = crate::aws::rfc3339_seconds(until);
    let text = match (credential, format) {
        (Credential::ApiKey { key }, FileFormat::Raw) => key.expose().to_owned(),
        (Credential::ApiKey { key }, FileFormat::Json) => json!({"apiKey": key.expose()}).to_string(),
        (Credential::ApiKey { key }, FileFormat::Dotenv) => dotenv(&[("API_KEY", key.expose())]),
        (Credential::UsernamePassword { password, .. }, FileFormat::Raw) => password.expose().to_owned(),
        (Credential::UsernamePassword { username, password }, FileFormat::Json) => {
            json!({"username": username, "password": password.expose()}).to_string()
        }
        (Credential::UsernamePassword { username, password }, FileFormat::Dotenv) => {
            dotenv(&[("USERNAME", username), ("PASSWORD", password.expose())])
        }
        (Credential::AccessToken { access_token, .. }, FileFormat::Raw) => access_token.expose().to_owned(),
        (Credential::AccessToken { access_token, token_type, .. }, FileFormat::Json) => {
            json!({"accessToken": access_token.expose(), "tokenType": token_type, "expiresAt": expires}).to_string()
        }
        (Credential::AccessToken { access_token, .. }, FileFormat::Dotenv) => {
            dotenv(&[("ACCESS_TOKEN", access_token.expose())])
        }
        (Credential::Jwt { token }, FileFormat::Raw) => token.expose().to_owned(),
        (Credential::Jwt { token }, FileFormat::Json) => json!({"token": token.expose()}).to_string(),
        (Credential::Jwt { token }, FileFormat::Dotenv) => dotenv(&[("TOKEN", token.expose())]),
        (Credential::Aws { access_key_id, secret_access_key, session_token, .. }, FileFormat::Raw) => {
            // An INI value runs to the end of its line: a line break would start another key.
            if [access_key_id.as_str(), secret_access_key.expose(), session_token.expose()]
                .iter()
                .any(|v| v.contains(['\n', '\r']))
            {
                return Err(AgentError::BrokerResponse("AWS credentials with a line break".into()));
            }
            format!(
                "[default]\naws_access_key_id = {access_key_id}\naws_secret_access_key = {}\naws_session_token = {}\n",
                secret_access_key.expose(),
                session_token.expose()
            )
        }
        (Credential::Aws { access_key_id, secret_access_key, session_token, .. }, FileFormat::Json) => json!({
            "Version": 1,
            "AccessKeyId": access_key_id,
            "SecretAccessKey": secret_access_key.expose(),
            "SessionToken": session_token.expose(),
            "Expiration": expires,
        })
        .to_string(),
        (Credential::Aws { access_key_id, secret_access_key, session_token, .. }, FileFormat::Dotenv) => dotenv(&[
            ("AWS_ACCESS_KEY_ID", access_key_id),
            ("AWS_SECRET_ACCESS_KEY", secret_access_key.expose()),
            ("AWS_SESSION_TOKEN", session_token.expose()),
            ("AWS_CREDENTIAL_EXPIRATION", &expires),
        ]),
    };
    Ok(SecretString::new(text))
}

/// Writes `content` to `<dir>/<name>`: mode 0444 (the app may run as another user; the
/// volume is mounted only into the containers the policy selects), synced, then renamed
/// over the old file.
pub fn write(dir: &Path, name: &str, content: &SecretString) -> Result<(), AgentError> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let wrap = |source| AgentError::TokenFile { path: path.clone(), source };
    // A leftover of an interrupted write is read-only: make room for a new one.
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::File::create(&tmp).map_err(wrap)?;
    file.write_all(content.expose().as_bytes()).map_err(wrap)?;
    file.sync_all().map_err(wrap)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o444)).map_err(wrap)?;
    std::fs::rename(&tmp, &path).map_err(wrap)
}

/// Removes `<dir>/<name>`, if it is there.
pub fn remove(dir: &Path, name: &str) -> Result<(), AgentError> {
    match std::fs::remove_file(dir.join(name)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(AgentError::TokenFile { path: dir.join(name), source: e })
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn until() -> Timestamp {
        "2026-12-03T12:00:00.250Z".parse().unwrap()
    }

    fn render(credential: &Credential, format: FileFormat) -> Result<SecretString, AgentError> {
        super::render(credential, format, until())
    }

    #[test]
    fn each_format_holds_the_credential_and_dotenv_quotes_it() {
        let pair = Credential::UsernamePassword { username: "app".into(), password: SecretString::new("it's-pw") };
        assert_eq!(render(&pair, FileFormat::Raw).unwrap().expose(), "it's-pw");
        assert_eq!(render(&pair, FileFormat::Json).unwrap().expose(), r#"{"password":"it's-pw","username":"app"}"#);
        assert_eq!(render(&pair, FileFormat::Dotenv).unwrap().expose(), "USERNAME='app'\nPASSWORD='it'\\''s-pw'\n");
        let key = Credential::ApiKey { key: SecretString::new("k-1") };
        assert_eq!(render(&key, FileFormat::Dotenv).unwrap().expose(), "API_KEY='k-1'\n");
        let token = Credential::AccessToken {
            access_token: SecretString::new("ya29.t"),
            token_type: "Bearer".into(),
            resource: None,
            client_id: None,
            service_account_email: None,
            project_id: None,
        };
        assert_eq!(
            render(&token, FileFormat::Json).unwrap().expose(),
            r#"{"accessToken":"ya29.t","expiresAt":"2026-12-03T12:00:00Z","tokenType":"Bearer"}"#
        );
    }

    #[test]
    fn aws_credentials_take_the_formats_the_aws_sdks_read() {
        let aws = Credential::Aws {
            access_key_id: "ASIAEXAMPLE".into(),
            secret_access_key: SecretString::new("s/ecret+key"),
            session_token: SecretString::new("FwoGZX=="),
            account_id: Some("123456789012".into()),
        };
        assert_eq!(
            render(&aws, FileFormat::Raw).unwrap().expose(),
            "[default]\naws_access_key_id = ASIAEXAMPLE\naws_secret_access_key = s/ecret+key\naws_session_token = FwoGZX==\n"
        );
        let broken = Credential::Aws {
            access_key_id: "ASIAEXAMPLE".into(),
            secret_access_key: SecretString::new("x\naws_access_key_id = other"),
            session_token: SecretString::new("t"),
            account_id: None,
        };
        let refused = render(&broken, FileFormat::Raw).unwrap_err().to_string();
        assert!(refused.contains("line break") && !refused.contains("other"), "{refused}");
        let process: serde_json::Value =
            serde_json::from_str(render(&aws, FileFormat::Json).unwrap().expose()).unwrap();
        assert_eq!(
            process,
            json!({"Version": 1, "AccessKeyId": "ASIAEXAMPLE", "SecretAccessKey": "s/ecret+key",
                "SessionToken": "FwoGZX==", "Expiration": "2026-12-03T12:00:00Z"})
        );
        assert_eq!(
            render(&aws, FileFormat::Dotenv).unwrap().expose(),
            "AWS_ACCESS_KEY_ID='ASIAEXAMPLE'\nAWS_SECRET_ACCESS_KEY='s/ecret+key'\nAWS_SESSION_TOKEN='FwoGZX=='\nAWS_CREDENTIAL_EXPIRATION='2026-12-03T12:00:00Z'\n"
        );
    }

    #[test]
    fn a_file_is_replaced_whole_readable_by_all_and_removed_on_request() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "db", &SecretString::new("one")).unwrap();
        write(dir.path(), "db", &SecretString::new("two")).unwrap();
        let path = dir.path().join("db");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "two");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o444);
        assert!(!dir.path().join(".db.tmp").exists());
        remove(dir.path(), "db").unwrap();
        remove(dir.path(), "db").unwrap();
        assert!(!path.exists());
    }
}
