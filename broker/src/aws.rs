//! AWS STS: sending a workload's pre-signed `GetCallerIdentity` (the `awsRole` trust
//! provider) and `AssumeRoleWithWebIdentity` with a broker-signed token (the `awsSts`
//! credential provider). Both answer in the STS query protocol's XML.

use std::collections::{BTreeMap, BTreeSet};

use cloudpass_api::{
    broker::{SERVER_ID_HEADER, SignedRequest},
    secret::SecretString,
    selector::glob_matches,
};
use quick_xml::{Reader, events::Event};

use crate::{
    Error, Refusal,
    egress::{Egress, error_reason, sanitize, sanitize_code},
    jwt::read_limited,
};

/// Largest STS answer read.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// The text of the first element named by each path's last segment inside the elements
/// before it, e.g. `["GetCallerIdentityResult", "Arn"]`. Hostile input (bad XML,
/// entities, deep nesting) gives an error, never a panic.
pub fn xml_fields(xml: &str, wanted: &[&[&str]]) -> Result<Vec<Option<String>>, Error> {
    let mut reader = Reader::from_str(xml);
    reader.config_mut().trim_text(true);
    let mut path: Vec<String> = Vec::new();
    let mut found: Vec<Option<String>> = vec![None; wanted.len()];
    let mut text = String::new();
    loop {
        match reader.read_event().map_err(|e| Error::Malformed(format!("malformed XML: {e}")))? {
            Event::Start(e) => {
                if path.len() > 16 {
                    return Err(Error::Malformed("XML nested too deeply".into()));
                }
                path.push(String::from_utf8_lossy(e.local_name().as_ref()).into_owned());
                text.clear();
            }
            Event::End(_) => {
                for (i, want) in wanted.iter().enumerate() {
                    if found[i].is_none() && path.len() >= want.len() && path[path.len() - want.len()..] == **want {
                        found[i] = Some(text.clone());
                    }
                }
                path.pop();
                text.clear();
            }
            Event::Text(t) => {
                text.push_str(&t.decode().map_err(|e| Error::Malformed(format!("malformed XML text: {e}")))?)
            }
            Event::CData(t) => text.push_str(&String::from_utf8_lossy(&t)),
            // Entity references arrive on their own; only XML's predefined entities and
            // character references exist in STS answers (no DTD is ever processed).
            Event::GeneralRef(r) => {
                let name = String::from_utf8_lossy(&r).into_owned();
                let resolved = match name.as_str() {
                    "amp" => Some('&'),
                    "lt" => Some('<'),
                    "gt" => Some('>'),
                    "quot" => Some('"'),
                    "apos" => Some('\''),
                    _ => r.resolve_char_ref().ok().flatten(),
                };
                text.push(resolved.ok_or_else(|| Error::Malformed(format!("unknown XML entity &{name};")))?);
            }
            Event::Eof => break,
            _ => {}
        }
    }
    Ok(found)
}

/// The `Code` and `Message` of an STS error answer, as passed on to callers (bounded,
/// printable: see [`sanitize`]).
pub fn sts_error(xml: &str) -> (Option<String>, Option<String>) {
    match xml_fields(xml, &[&["Error", "Code"], &["Error", "Message"]]) {
        Ok(mut f) => {
            let (code, message) = (f.remove(0), f.remove(0));
            (code.as_deref().and_then(sanitize_code), message.as_deref().map(sanitize))
        }
        Err(_) => (None, None),
    }
}

/// Who the workload's pre-signed `GetCallerIdentity` says it is, as STS answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallerIdentity {
    /// The caller's 12-digit AWS account ID.
    pub account: String,
    /// Caller ARN (`arn:aws:sts::<acct>:assumed-role/<role>/<session>` for a role).
    pub arn: String,
}

impl CallerIdentity {
    /// The IAM role behind an assumed-role session, if the caller is one.
    pub fn assumed_role(&self) -> Option<AssumedRole> {
        let (partition, rest) = self.arn.strip_prefix("arn:")?.split_once(":sts::")?;
        let (account, resource) = rest.split_once(':')?;
        let (name, _session) = resource.strip_prefix("assumed-role/")?.split_once('/')?;
        (!partition.is_empty() && !account.is_empty() && !name.is_empty()).then(|| AssumedRole {
            partition: partition.to_owned(),
            account: account.to_owned(),
            name: name.to_owned(),
        })
    }

    /// The IAM role ARN behind an assumed-role session, if the caller is one, without the
    /// role's path: STS does not say it (see [`AssumedRole`]).
    pub fn role_arn(&self) -> Option<String> {
        self.assumed_role().map(|r| r.arn())
    }
}

/// The role behind an assumed-role session, as `GetCallerIdentity` shows it:
/// `arn:<partition>:sts::<account>:assumed-role/<name>/<session>`. The role's **path**
/// (`arn:aws:iam::<account>:role/<path>/<name>`) is not part of that answer, so it
/// cannot be checked; the role name alone identifies the role, because IAM role names
/// are unique within an account whatever their path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AssumedRole {
    /// `aws`, `aws-cn`, `aws-us-gov`.
    pub partition: String,
    /// The role's 12-digit AWS account ID.
    pub account: String,
    /// Role name (without path).
    pub name: String,
}

impl AssumedRole {
    /// `arn:<partition>:iam::<account>:role/<name>`.
    pub fn arn(&self) -> String {
        format!("arn:{}:iam::{}:role/{}", self.partition, self.account, self.name)
    }

    /// Whether a `roleArns` entry names this role. An entry without a path is a glob on
    /// the whole ARN (`*` in the account and name). An entry with a path
    /// (`arn:aws:iam::123456789012:role/team-a/deployer`) names one role by account and
    /// name, and the path is not compared (STS does not report it); since a wildcard
    /// there could then match roles of any path, an entry with a path must have no `*`
    /// in its path or name, and one that has is an error, never a match.
    pub fn matches(&self, pattern: &str) -> Result<bool, Error> {
        let Some((prefix, resource)) = pattern.split_once(":role/") else {
            return Err(Error::InvalidSpec(format!("roleArns entry {pattern:?} is not an IAM role ARN")));
        };
        let Some((path, name)) = resource.rsplit_once('/') else {
            return Ok(glob_matches(pattern, &self.arn()));
        };
        if path.contains('*') || name.contains('*') {
            return Err(Error::InvalidSpec(format!(
                "roleArns entry {pattern:?} has a path and a wildcard: GetCallerIdentity does not show a role's path, \
                 so only an exact role name can be matched with a path"
            )));
        }
        Ok(glob_matches(&format!("{prefix}:role/{name}"), &self.arn()))
    }
}

/// Checks that the evidence is bound to this broker: its [`SERVER_ID_HEADER`] names one
/// of `server_ids` and is covered by the SigV4 signature (`SignedHeaders` of the
/// `Authorization` header), so that a request signed for another server (or captured on
/// the way to it) cannot be replayed here. STS verifies the signature over the header
/// when the broker forwards the request.
pub fn check_server_id(request: &SignedRequest, server_ids: &[String]) -> Result<(), Error> {
    let mut seen = BTreeSet::new();
    for name in request.headers.keys() {
        if !seen.insert(name.to_ascii_lowercase()) {
            return Err(Error::Evidence(format!("evidence has the header {name:?} more than once")));
        }
    }
    let header = |wanted: &str| request.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(wanted)).map(|(_, v)| v);
    let Some(value) = header(SERVER_ID_HEADER) else {
        return Err(Error::Evidence(format!(
            "evidence has no {SERVER_ID_HEADER} header: the pre-signed GetCallerIdentity must name this broker"
        )));
    };
    let evidence = |why: &str| Error::Evidence(why.to_owned());
    let authorization = header("authorization")
        .ok_or_else(|| evidence("evidence is not signed with an Authorization header (SigV4)"))?
        .expose();
    let signed = authorization
        .strip_prefix("AWS4-HMAC-SHA256 ")
        .ok_or_else(|| evidence("evidence's Authorization header is not AWS4-HMAC-SHA256"))?
        .split(',')
        .find_map(|part| part.trim().strip_prefix("SignedHeaders="))
        .ok_or_else(|| evidence("evidence's Authorization header has no SignedHeaders"))?;
    if !signed.split(';').any(|h| h.eq_ignore_ascii_case(SERVER_ID_HEADER)) {
        return Err(Error::Evidence(format!(
            "evidence's {SERVER_ID_HEADER} header is not covered by the signature (SignedHeaders)"
        )));
    }
    let value = value.expose().trim();
    if !server_ids.iter().any(|id| id.eq_ignore_ascii_case(value)) {
        let shown: String = value.chars().take(64).collect();
        return Err(Error::Evidence(format!(
            "evidence is signed for server ID {shown:?}, not for this broker ({})",
            server_ids.join(", ")
        )));
    }
    Ok(())
}

/// Whether `url` is an STS endpoint the evidence may be sent to: AWS's public global,
/// regional and FIPS endpoints, or one listed in `extra`.
pub fn allowed_sts_url(url: &reqwest::Url, extra: &[String]) -> bool {
    if url.scheme() != "https" || !url.username().is_empty() || url.password().is_some() {
        return false;
    }
    let Some(host) = url.host_str() else { return false };
    let origin = |u: &reqwest::Url| (u.host_str().map(str::to_owned), u.port_or_known_default());
    if extra.iter().filter_map(|e| reqwest::Url::parse(e).ok()).any(|e| origin(&e) == origin(url)) {
        return true;
    }
    if url.port_or_known_default() != Some(443) {
        return false;
    }
    let regional = |h: &str| {
        let labels: Vec<&str> = h.split('.').collect();
        labels.len() == 2
            && (labels[0] == "sts" || labels[0] == "sts-fips")
            && labels[1].split('-').count() >= 3
            && labels[1].chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    };
    host == "sts.amazonaws.com"
        || host.strip_suffix(".amazonaws.com").is_some_and(regional)
        || host.strip_suffix(".amazonaws.com.cn").is_some_and(regional)
}

/// Sends the workload's pre-signed `GetCallerIdentity` request, once it is found bound
/// to this broker (one of `server_ids`, see [`check_server_id`]), and returns who it is.
pub async fn get_caller_identity(
    http: &Egress,
    request: &SignedRequest,
    extra_endpoints: &[String],
    server_ids: &[String],
) -> Result<CallerIdentity, Error> {
    let url =
        reqwest::Url::parse(&request.url).map_err(|e| Error::Evidence(format!("evidence URL is invalid: {e}")))?;
    if !allowed_sts_url(&url, extra_endpoints) {
        return Err(Error::Evidence(format!(
            "evidence is addressed to {}, which is not an allowed STS endpoint",
            url.origin().ascii_serialization()
        )));
    }
    if request.method != "POST" {
        return Err(Error::Evidence(format!("evidence must be a POST, not {}", request.method)));
    }
    // Only GetCallerIdentity: the broker must not send any other signed action.
    let params: BTreeMap<String, String> = form_urlencoded::parse(request.body.as_bytes()).into_owned().collect();
    if params.get("Action").map(String::as_str) != Some("GetCallerIdentity")
        || params.keys().any(|k| k != "Action" && k != "Version")
        || url.query().is_some()
    {
        return Err(Error::Evidence("evidence must be exactly an sts:GetCallerIdentity request".into()));
    }
    check_server_id(request, server_ids)?;
    let mut builder = http.post(url.as_str())?.body(request.body.clone());
    for (name, value) in &request.headers {
        let lower = name.to_ascii_lowercase();
        if matches!(lower.as_str(), "host" | "content-length" | "connection" | "transfer-encoding") {
            continue;
        }
        builder = builder.header(name, value.expose());
    }
    let response =
        builder.send().await.map_err(|e| Error::Upstream(format!("STS unreachable: {}", error_reason(&e))))?;
    let status = response.status();
    let body = read_limited(response, MAX_ANSWER_BYTES).await?;
    let text = String::from_utf8_lossy(&body);
    if !status.is_success() {
        let (code, message) = sts_error(&text);
        return Err(Error::Upstream(format!(
            "STS refused the evidence: {} ({})",
            code.unwrap_or_else(|| format!("HTTP {}", status.as_u16())),
            message.unwrap_or_default()
        )));
    }
    let fields = xml_fields(&text, &[&["GetCallerIdentityResult", "Account"], &["GetCallerIdentityResult", "Arn"]])?;
    match (fields[0].clone(), fields[1].clone()) {
        (Some(account), Some(arn)) => Ok(CallerIdentity { account, arn }),
        _ => Err(Error::Malformed("STS answer has no Account and Arn".into())),
    }
}

/// Temporary credentials from `AssumeRoleWithWebIdentity`; `Debug` shows no secret.
#[derive(Debug)]
pub struct StsCredentials {
    /// `AccessKeyId` (`ASIA...`), not secret.
    pub access_key_id: String,
    /// `SecretAccessKey`, redacted in `Debug`.
    pub secret_access_key: SecretString,
    /// `SessionToken`, redacted in `Debug`.
    pub session_token: SecretString,
    /// `Expiration`: when STS says the credentials stop working.
    pub expiration: jiff::Timestamp,
    /// The assumed role's account, from `AssumedRoleUser.Arn`, when STS names it.
    pub account_id: Option<String>,
    /// `AssumedRoleUser.Arn`, when STS names it.
    pub assumed_role_arn: Option<String>,
}

/// Calls `AssumeRoleWithWebIdentity` at `endpoint` with the broker-signed `token` (under
/// the egress policy). STS's refusal becomes an upstream failure carrying STS's error code;
/// a refused endpoint address is a denial.
pub async fn assume_role_with_web_identity(
    http: &Egress,
    endpoint: &str,
    role_arn: &str,
    session_name: &str,
    duration_seconds: u64,
    token: &str,
    session_policy: Option<&str>,
) -> Result<StsCredentials, Refusal> {
    let duration = duration_seconds.to_string();
    let mut form = vec![
        ("Action", "AssumeRoleWithWebIdentity"),
        ("Version", "2011-06-15"),
        ("RoleArn", role_arn),
        ("RoleSessionName", session_name),
        ("DurationSeconds", &duration),
        ("WebIdentityToken", token),
    ];
    if let Some(policy) = session_policy {
        form.push(("Policy", policy));
    }
    let response = http
        .post(endpoint)
        .map_err(|e| Refusal::denied(e.to_string()))?
        .header("accept", "application/xml")
        .form(&form)
        .send()
        .await
        .map_err(|e| Refusal::upstream(format!("AWS STS at {endpoint} unreachable: {}", error_reason(&e)), None))?;
    let status = response.status();
    let body = read_limited(response, MAX_ANSWER_BYTES).await.map_err(|e| Refusal::upstream(e.to_string(), None))?;
    let text = String::from_utf8_lossy(&body);
    if !status.is_success() {
        let (code, message) = sts_error(&text);
        return Err(Refusal::upstream(
            format!(
                "AWS STS refused AssumeRoleWithWebIdentity for {role_arn} (HTTP {}): {}",
                status.as_u16(),
                message.unwrap_or_else(|| "no message".into())
            ),
            code,
        ));
    }
    let r = "AssumeRoleWithWebIdentityResult";
    let f = xml_fields(
        &text,
        &[
            &[r, "Credentials", "AccessKeyId"],
            &[r, "Credentials", "SecretAccessKey"],
            &[r, "Credentials", "SessionToken"],
            &[r, "Credentials", "Expiration"],
            &[r, "AssumedRoleUser", "Arn"],
        ],
    )
    .map_err(|e| Refusal::upstream(format!("AWS STS answer: {e}"), None))?;
    let missing = || Refusal::upstream("AWS STS answer lacks credentials", None);
    let expiration = f[3]
        .as_deref()
        .ok_or_else(missing)?
        .parse::<jiff::Timestamp>()
        .map_err(|e| Refusal::upstream(format!("AWS STS answer has an invalid Expiration: {e}"), None))?;
    let account_id = f[4].as_deref().and_then(|arn| arn.split(':').nth(4)).map(str::to_owned);
    Ok(StsCredentials {
        access_key_id: f[0].clone().ok_or_else(missing)?,
        secret_access_key: SecretString::new(f[1].clone().ok_or_else(missing)?),
        session_token: SecretString::new(f[2].clone().ok_or_else(missing)?),
        expiration,
        account_id,
        assumed_role_arn: f[4].clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sts_answers_and_errors() {
        let ok = r#"<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
 <AssumeRoleWithWebIdentityResult>
  <AssumedRoleUser><Arn>arn:aws:sts::123456789012:assumed-role/R/s</Arn></AssumedRoleUser>
  <Credentials><AccessKeyId>ASIA1</AccessKeyId><SecretAccessKey>se&amp;cret</SecretAccessKey><SessionToken>tok</SessionToken><Expiration>2030-01-01T00:00:00Z</Expiration></Credentials>
 </AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>"#;
        let f = xml_fields(
            ok,
            &[&["Credentials", "SecretAccessKey"], &["AssumedRoleUser", "Arn"], &["Credentials", "Missing"]],
        )
        .unwrap();
        assert_eq!(f[0].as_deref(), Some("se&cret"));
        assert_eq!(f[1].as_deref(), Some("arn:aws:sts::123456789012:assumed-role/R/s"));
        assert_eq!(f[2], None);
        let err = r#"<ErrorResponse><Error><Type>Sender</Type><Code>InvalidIdentityToken</Code><Message>No OpenIDConnect provider found</Message></Error></ErrorResponse>"#;
        assert_eq!(
            sts_error(err),
            (Some("InvalidIdentityToken".into()), Some("No OpenIDConnect provider found".into()))
        );
        for junk in ["", "<", "<a><b></a>", "<!DOCTYPE x [<!ENTITY e SYSTEM \"file:///etc/passwd\">]><a>&e;</a>"] {
            let _ = xml_fields(junk, &[&["a"]]);
        }
        let deep = "<a>".repeat(100);
        assert!(xml_fields(&deep, &[&["a"]]).is_err());
    }

    #[test]
    fn role_behind_a_session() {
        let id = CallerIdentity { account: "1".into(), arn: "arn:aws:sts::123456789012:assumed-role/app/i-123".into() };
        assert_eq!(id.role_arn().as_deref(), Some("arn:aws:iam::123456789012:role/app"));
        let user = CallerIdentity { account: "1".into(), arn: "arn:aws:iam::123456789012:user/bob".into() };
        assert_eq!(user.role_arn(), None);
        let cn = CallerIdentity { account: "1".into(), arn: "arn:aws-cn:sts::123456789012:assumed-role/app/s".into() };
        assert_eq!(cn.role_arn().as_deref(), Some("arn:aws-cn:iam::123456789012:role/app"));
        for junk in
            ["", "arn:aws:sts::1:assumed-role/", "arn:aws:sts::1:assumed-role/app", "arn::sts::1:assumed-role/a/s"]
        {
            assert_eq!(CallerIdentity { account: "1".into(), arn: junk.into() }.assumed_role(), None, "{junk}");
        }
    }

    /// Finding: `role_arn()` drops the role's path, so an entry with a path never matched.
    /// STS does not report the path; role names are unique per account, so an entry with
    /// a path matches by account and exact name, and a wildcard next to a path is refused.
    #[test]
    fn role_arns_with_paths_match_by_name() {
        let session = |arn: &str| CallerIdentity { account: "123456789012".into(), arn: arn.into() };
        let deployer = session("arn:aws:sts::123456789012:assumed-role/deployer/ci-42").assumed_role().unwrap();
        let matches = |pattern: &str| deployer.matches(pattern);
        assert_eq!(matches("arn:aws:iam::123456789012:role/team-a/deployer"), Ok(true));
        assert_eq!(matches("arn:aws:iam::123456789012:role/team-a/nested/deployer"), Ok(true));
        assert_eq!(matches("arn:aws:iam::*:role/team-a/deployer"), Ok(true), "account glob with a path");
        assert_eq!(matches("arn:aws:iam::123456789012:role/deployer"), Ok(true));
        assert_eq!(matches("arn:aws:iam::123456789012:role/deploy*"), Ok(true));
        assert_eq!(matches("arn:aws:iam::123456789012:role/*"), Ok(true));
        assert_eq!(matches("arn:aws:iam::123456789012:role/team-a/other"), Ok(false));
        assert_eq!(matches("arn:aws:iam::210987654321:role/team-a/deployer"), Ok(false), "another account");
        assert_eq!(matches("arn:aws-cn:iam::123456789012:role/team-a/deployer"), Ok(false), "another partition");
        assert_eq!(matches("arn:aws:iam::123456789012:role/deployer-x"), Ok(false));
        // The path cannot be checked, so a wildcard that relies on it is an error.
        for pattern in [
            "arn:aws:iam::123456789012:role/team-a/*",
            "arn:aws:iam::123456789012:role/*/deployer",
            "arn:aws:iam::123456789012:role/team-a/deploy*",
        ] {
            let err = matches(pattern).unwrap_err().to_string();
            assert!(err.contains("path and a wildcard"), "{pattern}: {err}");
        }
        assert!(matches("arn:aws:iam::123456789012:user/deployer").is_err());
    }

    fn signed(headers: &[(&str, &str)]) -> SignedRequest {
        SignedRequest {
            method: "POST".into(),
            url: "https://sts.amazonaws.com/".into(),
            headers: headers.iter().map(|(k, v)| (k.to_string(), SecretString::new(*v))).collect(),
            body: "Action=GetCallerIdentity&Version=2011-06-15".into(),
        }
    }

    const AUTH_WITH_ID: &str = "AWS4-HMAC-SHA256 Credential=ASIA/20260101/us-east-1/sts/aws4_request, \
        SignedHeaders=content-type;host;x-amz-date;x-cloudpass-server-id, Signature=abc";
    const AUTH_WITHOUT_ID: &str = "AWS4-HMAC-SHA256 Credential=ASIA/20260101/us-east-1/sts/aws4_request, \
        SignedHeaders=content-type;host;x-amz-date, Signature=abc";

    /// Finding: evidence was not bound to this broker and could be replayed. The server
    /// ID header must be present, signed and name this broker.
    #[test]
    fn evidence_must_be_signed_for_this_broker() {
        let ids = ["cloudpass-broker.cloudpass-system.svc".to_owned(), "127.0.0.1".to_owned()];
        let check = |headers: &[(&str, &str)]| check_server_id(&signed(headers), &ids);
        assert_eq!(check(&[("Authorization", AUTH_WITH_ID), ("X-Cloudpass-Server-Id", "127.0.0.1")]), Ok(()));
        assert_eq!(
            check(&[
                ("authorization", AUTH_WITH_ID),
                ("x-cloudpass-server-id", "cloudpass-broker.cloudpass-system.svc")
            ]),
            Ok(())
        );
        let refused = |headers: &[(&str, &str)], want: &str| {
            let err = check(headers).unwrap_err().to_string();
            assert!(err.contains(want), "{want}: {err}");
        };
        refused(&[("Authorization", AUTH_WITHOUT_ID)], "no x-cloudpass-server-id header");
        refused(
            &[("Authorization", AUTH_WITHOUT_ID), ("x-cloudpass-server-id", "127.0.0.1")],
            "not covered by the signature",
        );
        refused(
            &[("Authorization", AUTH_WITH_ID), ("x-cloudpass-server-id", "other-broker")],
            "signed for server ID \"other-broker\"",
        );
        refused(&[("x-cloudpass-server-id", "127.0.0.1")], "not signed");
        refused(&[("Authorization", "Bearer x"), ("x-cloudpass-server-id", "127.0.0.1")], "not AWS4-HMAC-SHA256");
        refused(
            &[
                ("Authorization", AUTH_WITH_ID),
                ("x-cloudpass-server-id", "other"),
                ("X-Cloudpass-Server-Id", "127.0.0.1"),
            ],
            "more than once",
        );
        let long = "x".repeat(10_000);
        let err = check(&[("Authorization", AUTH_WITH_ID), ("x-cloudpass-server-id", &long)]).unwrap_err().to_string();
        assert!(err.len() < 200, "bounded: {err}");
        // A header named like the server ID inside another header's value does not count.
        let sneaky = "AWS4-HMAC-SHA256 Credential=x, SignedHeaders=host;x-cloudpass-server-id-not, Signature=abc";
        refused(&[("Authorization", sneaky), ("x-cloudpass-server-id", "127.0.0.1")], "not covered");
    }

    /// Finding: the STS credentials derived `Debug` with the secret key and session token.
    #[test]
    fn sts_credentials_do_not_print_secrets() {
        let creds = StsCredentials {
            access_key_id: "ASIAEXAMPLE".into(),
            secret_access_key: SecretString::new("wJalrXUtnFEMI-secret"),
            session_token: SecretString::new("FwoGZXIvYXdzE-token"),
            expiration: jiff::Timestamp::UNIX_EPOCH,
            account_id: None,
            assumed_role_arn: None,
        };
        let shown = format!("{creds:?} {creds:#?}");
        assert!(!shown.contains("wJalrXUtnFEMI") && !shown.contains("FwoGZXIvYXdzE"), "{shown}");
        assert!(shown.contains("ASIAEXAMPLE"));
    }

    #[test]
    fn only_sts_endpoints_receive_evidence() {
        let ok = |u: &str| allowed_sts_url(&reqwest::Url::parse(u).unwrap(), &["https://vpce.example:8443/".into()]);
        assert!(ok("https://sts.amazonaws.com/"));
        assert!(ok("https://sts.eu-west-1.amazonaws.com/"));
        assert!(ok("https://sts-fips.us-east-1.amazonaws.com/"));
        assert!(ok("https://sts.cn-north-1.amazonaws.com.cn/"));
        assert!(ok("https://vpce.example:8443/"));
        assert!(!ok("http://sts.amazonaws.com/"));
        assert!(!ok("https://sts.amazonaws.com.evil.example/"));
        assert!(!ok("https://evil.example/sts.amazonaws.com"));
        assert!(!ok("https://s3.us-east-1.amazonaws.com/"));
        assert!(!ok("https://sts.amazonaws.com:8443/"));
        assert!(!ok("https://user@sts.amazonaws.com/"));
        assert!(!ok("https://vpce.example/"));
    }
}
