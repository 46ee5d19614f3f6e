//! The `file` delivery: the credential written into the pod's in-memory volume, in the
//! format the policy names, replaced atomically (written beside, then renamed) so a
//! reader never sees half of it, and removed when the broker refuses the pod.

use std::{io::Write as _, os::unix::fs::PermissionsExt, path::Path};

use cloudpass_api::{broker::Credential, policy::FileFormat, secret::SecretString};
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

/// The file's content for `credential` in `format`. The credentials the fit table lets
/// reach a file are API keys, usernames and passwords, access tokens and JWTs.
pub fn render(credential: &Credential, format: FileFormat) -> Result<SecretString, AgentError> {
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
            json!({"accessToken": access_token.expose(), "tokenType": token_type}).to_string()
        }
        (Credential::AccessToken { access_token, .. }, FileFormat::Dotenv) => {
            dotenv(&[("ACCESS_TOKEN", access_token.expose())])
        }
        (Credential::Jwt { token }, FileFormat::Raw) => token.expose().to_owned(),
        (Credential::Jwt { token }, FileFormat::Json) => json!({"token": token.expose()}).to_string(),
        (Credential::Jwt { token }, FileFormat::Dotenv) => dotenv(&[("TOKEN", token.expose())]),
        (Credential::Aws { .. }, _) => {
            return Err(AgentError::BrokerResponse("AWS credentials are not delivered as a file".into()));
        }
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

    #[test]
    fn each_format_holds_the_credential_and_dotenv_quotes_it() {
        let pair = Credential::UsernamePassword { username: "app".into(), password: SecretString::new("it's-pw") };
        assert_eq!(render(&pair, FileFormat::Raw).unwrap().expose(), "it's-pw");
        assert_eq!(render(&pair, FileFormat::Json).unwrap().expose(), r#"{"password":"it's-pw","username":"app"}"#);
        assert_eq!(render(&pair, FileFormat::Dotenv).unwrap().expose(), "USERNAME='app'\nPASSWORD='it'\\''s-pw'\n");
        let key = Credential::ApiKey { key: SecretString::new("k-1") };
        assert_eq!(render(&key, FileFormat::Dotenv).unwrap().expose(), "API_KEY='k-1'\n");
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
