//! AWS Signature Version 4 in header form: the agent's `awsSigV4` deliveries and the
//! `GetCallerIdentity` request of its AWS evidence, and the broker's calls to AWS
//! Secrets Manager. The signing itself (with S3's own rules) and the service and region
//! an AWS host name implies.

use std::time::SystemTime;

use aws_credential_types::Credentials;
use aws_sigv4::{
    http_request::{PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings, sign},
    sign::v4,
};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

/// Why a request could not be signed.
#[derive(Debug, thiserror::Error)]
#[error("SigV4 signing: {0}")]
pub struct SigningError(String);

/// SigV4 signing name and region from an AWS host name: `<bucket>.s3.<region>`,
/// `s3.<region>`, `s3` (us-east-1), `<svc>.<region>`, `<svc>` (global services, which
/// sign for us-east-1), each under `amazonaws.com` (or `.com.cn`).
pub fn sigv4_scope_from_host(host: &str) -> Option<(String, String)> {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let rest = host.strip_suffix(".amazonaws.com").or_else(|| host.strip_suffix(".amazonaws.com.cn"))?;
    let labels: Vec<&str> = rest.split('.').collect();
    let is_s3 = |l: &str| l == "s3" || l.starts_with("s3-");
    if let Some(i) = labels.iter().rposition(|l| is_s3(l)) {
        let after: Vec<&str> = labels[i + 1..].iter().copied().filter(|l| *l != "dualstack").collect();
        return match after.as_slice() {
            [] => Some(("s3".into(), "us-east-1".into())),
            [region] => Some(("s3".into(), (*region).into())),
            _ => None,
        };
    }
    match labels.as_slice() {
        [service] if !service.is_empty() => Some(((*service).into(), "us-east-1".into())),
        [.., service, region] if !service.is_empty() && !region.is_empty() => {
            Some(((*service).into(), (*region).into()))
        }
        _ => None,
    }
}

/// Signs a request in place with SigV4 (header form): removes any `Authorization`,
/// `X-Amz-Date`, `X-Amz-Security-Token` and `X-Amz-Content-Sha256` the app sent, signs the
/// remaining headers plus `Host`, and adds the signature headers. S3 gets its own rules:
/// no path normalization, single URL encoding, `X-Amz-Content-Sha256`.
#[allow(clippy::too_many_arguments)]
pub fn sign_v4(
    method: &str,
    url: &str,
    headers: &mut HeaderMap,
    body: SignableBody<'_>,
    access_key_id: &str,
    secret_access_key: &str,
    session_token: Option<&str>,
    service: &str,
    region: &str,
    time: SystemTime,
) -> Result<(), SigningError> {
    for name in ["authorization", "x-amz-date", "x-amz-security-token", "x-amz-content-sha256"] {
        headers.remove(name);
    }
    let identity =
        Credentials::new(access_key_id, secret_access_key, session_token.map(str::to_owned), None, "cloudpass-broker")
            .into();
    let mut settings = SigningSettings::default();
    if service == "s3" {
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.uri_path_normalization_mode = false.into();
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
    }
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(service)
        .time(time)
        .settings(settings)
        .build()
        .map_err(|e| SigningError(e.to_string()))?
        .into();
    let signable_headers: Vec<(&str, &str)> =
        headers.iter().filter_map(|(k, v)| v.to_str().ok().map(|v| (k.as_str(), v))).collect();
    let request = SignableRequest::new(method, url, signable_headers.into_iter(), body)
        .map_err(|e| SigningError(e.to_string()))?;
    let (instructions, _signature) = sign(request, &params).map_err(|e| SigningError(e.to_string()))?.into_parts();
    let (new_headers, _params) = instructions.into_parts();
    for header in new_headers {
        let mut value = HeaderValue::from_str(header.value()).map_err(|e| SigningError(e.to_string()))?;
        value.set_sensitive(header.sensitive());
        headers.insert(HeaderName::from_static(header.name()), value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use reqwest::header::HOST;

    use super::*;

    /// 2015-08-30T12:36:00Z, the time of the AWS SigV4 test suite.
    fn suite_time() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_440_938_160)
    }

    #[test]
    fn sigv4_scope_from_aws_hosts() {
        let cases = [
            ("bucket.s3.eu-west-1.amazonaws.com", Some(("s3", "eu-west-1"))),
            ("my.dotted.bucket.s3.eu-west-1.amazonaws.com", Some(("s3", "eu-west-1"))),
            ("s3.eu-west-1.amazonaws.com", Some(("s3", "eu-west-1"))),
            ("s3.dualstack.eu-west-1.amazonaws.com", Some(("s3", "eu-west-1"))),
            ("bucket.s3.amazonaws.com", Some(("s3", "us-east-1"))),
            ("s3.amazonaws.com", Some(("s3", "us-east-1"))),
            ("ap-123.s3-accesspoint.us-west-2.amazonaws.com", Some(("s3", "us-west-2"))),
            ("sqs.eu-central-1.amazonaws.com", Some(("sqs", "eu-central-1"))),
            ("abc.execute-api.us-east-2.amazonaws.com", Some(("execute-api", "us-east-2"))),
            ("sts.amazonaws.com", Some(("sts", "us-east-1"))),
            ("dynamodb.cn-north-1.amazonaws.com.cn", Some(("dynamodb", "cn-north-1"))),
            ("api.example.com", None),
            ("localhost", None),
        ];
        for (host, want) in cases {
            let got = sigv4_scope_from_host(host);
            assert_eq!(got.as_ref().map(|(s, r)| (s.as_str(), r.as_str())), want, "{host}");
        }
    }

    #[test]
    fn sigv4_matches_the_aws_test_suite() {
        // get-vanilla and get-vanilla-with-session-token of the AWS SigV4 test suite
        // (shipped in the aws-sigv4 crate as aws-signing-test-suite/v4).
        let secret = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
        let mut headers = HeaderMap::new();
        headers.insert(HOST, HeaderValue::from_static("example.amazonaws.com"));
        let url = "https://example.amazonaws.com/";
        sign_v4(
            "GET",
            url,
            &mut headers,
            SignableBody::Bytes(&[]),
            "AKIDEXAMPLE",
            secret,
            None,
            "service",
            "us-east-1",
            suite_time(),
        )
        .unwrap();
        assert_eq!(headers["x-amz-date"], "20150830T123600Z");
        assert_eq!(
            headers["authorization"],
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=host;x-amz-date, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
        );

        let token = "6e86291e8372ff2a2260956d9b8aae1d763fbf315fa00fa31553b73ebf194267";
        let mut headers = HeaderMap::new();
        headers.insert(HOST, HeaderValue::from_static("example.amazonaws.com"));
        // Whatever the app put there is replaced.
        headers.insert("authorization", HeaderValue::from_static("AWS4-HMAC-SHA256 forged"));
        headers.insert("x-amz-security-token", HeaderValue::from_static("forged"));
        sign_v4(
            "GET",
            url,
            &mut headers,
            SignableBody::Bytes(&[]),
            "AKIDEXAMPLE",
            secret,
            Some(token),
            "service",
            "us-east-1",
            suite_time(),
        )
        .unwrap();
        assert_eq!(headers["x-amz-security-token"], token);
        assert!(headers["x-amz-security-token"].is_sensitive());
        assert_eq!(
            headers["authorization"],
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=host;x-amz-date;x-amz-security-token, Signature=07ec1639c89043aa0e3e2de82b96708f198cceab042d4a97044c66dd9f74e7f8"
        );
        assert_eq!(headers.get_all("authorization").iter().count(), 1);
    }
}
