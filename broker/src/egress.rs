//! Outbound HTTPS to destinations that tenants choose: `jwksUri`, issuer discovery,
//! `tokenUrl`, `authorityHost`, STS, Google and IAM endpoints. A namespace admin names
//! them, the operator calls them from inside the cluster network, so each call is checked
//! against what it may reach:
//!
//! - always refused: unspecified, multicast, broadcast and reserved addresses, link-local
//!   addresses (`169.254.0.0/16`, `fe80::/10`, where clouds serve instance metadata and
//!   credentials) and the cloud metadata addresses, and the cluster's own service and pod
//!   ranges (`--cluster-cidrs`);
//! - refused unless `--allow-private-upstreams`: loopback, private (`10/8`, `172.16/12`,
//!   `192.168/16`, `fc00::/7`), shared (`100.64/10`) and other non-public addresses.
//!
//! The check is on the address actually connected to: names are resolved by
//! [`FilteringResolver`], which hands the connector only permitted addresses (a name
//! that resolves to a private address at connect time is refused however it resolved
//! before: no DNS rebinding), and URLs with a literal IP are checked before the request
//! is built. Redirects are never followed.
//!
//! Text that an upstream returns (error descriptions, codes) reaches callers and status
//! only through [`sanitize`] and [`sanitize_code`]: bounded, printable, one line.

use std::{
    error::Error as StdError,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use ipnet::IpNet;
use reqwest::{Method, RequestBuilder, Url, dns::Resolve};

use crate::Error;

/// Largest number of characters of upstream text passed on to callers.
pub const MAX_REASON_CHARS: usize = 200;
/// Largest number of characters of an upstream error code passed on to callers.
pub const MAX_CODE_CHARS: usize = 64;

/// What kind of address a destination is, as far as egress is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressClass {
    /// A public unicast address: always callable.
    Public,
    /// Loopback (`127.0.0.0/8`, `::1`): only with `--allow-private-upstreams`.
    Loopback,
    /// Private networks: `10/8`, `172.16/12`, `192.168/16`, unique local `fc00::/7`.
    Private,
    /// Shared address space of carrier-grade NAT, `100.64.0.0/10`.
    Shared,
    /// Other ranges that are not routed publicly (benchmarking, documentation, protocol
    /// assignments, deprecated site-local IPv6, Teredo).
    NonPublic,
    /// Link-local (`169.254/16`, `fe80::/10`): where clouds serve instance metadata.
    LinkLocal,
    /// A cloud's instance-metadata address outside link-local (`fd00:ec2::254`).
    Metadata,
    /// Unspecified, "this network", reserved, broadcast, multicast: never a server.
    Unusable,
}

impl AddressClass {
    /// Whether `--allow-private-upstreams` lifts the refusal of this class.
    fn private(self) -> bool {
        matches!(self, Self::Loopback | Self::Private | Self::Shared | Self::NonPublic)
    }

    fn describe(self) -> &'static str {
        match self {
            Self::Public => "a public address",
            Self::Loopback => "a loopback address",
            Self::Private => "a private address",
            Self::Shared => "a shared (carrier-grade NAT) address",
            Self::NonPublic => "an address that is not publicly routed",
            Self::LinkLocal => "a link-local address (instance metadata)",
            Self::Metadata => "a cloud instance-metadata address",
            Self::Unusable => "not a unicast server address",
        }
    }
}

fn v4_in(ip: Ipv4Addr, net: [u8; 4], prefix: u32) -> bool {
    let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix) };
    u32::from(ip) & mask == u32::from(Ipv4Addr::from(net)) & mask
}

fn classify_v4(ip: Ipv4Addr) -> AddressClass {
    use AddressClass::*;
    // "This network" 0/8, broadcast, multicast and reserved 240/4.
    if v4_in(ip, [0, 0, 0, 0], 8) || ip.is_broadcast() || ip.is_multicast() || v4_in(ip, [240, 0, 0, 0], 4) {
        Unusable
    } else if ip.is_loopback() {
        Loopback
    } else if ip.is_link_local() {
        LinkLocal
    } else if ip.is_private() {
        Private
    } else if v4_in(ip, [100, 64, 0, 0], 10) {
        Shared
    } else if v4_in(ip, [192, 0, 0, 0], 24)
        || v4_in(ip, [198, 18, 0, 0], 15)
        || ip.is_documentation()
        || v4_in(ip, [192, 88, 99, 0], 24)
    {
        NonPublic
    } else {
        Public
    }
}

fn classify_v6(ip: Ipv6Addr) -> AddressClass {
    use AddressClass::*;
    // Addresses that carry an IPv4 address are what that address is.
    if let Some(v4) = ip.to_ipv4_mapped() {
        return classify_v4(v4);
    }
    let s = ip.segments();
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
        // NAT64 (64:ff9b::/96).
        return classify_v4(Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8));
    }
    if s[0] == 0x2002 {
        // 6to4 (2002::/16): the IPv4 address is in the next 32 bits.
        return classify_v4(Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8));
    }
    if ip.is_unspecified() || ip.is_multicast() || s[..6] == [0; 6] {
        // ::, ff00::/8, and the deprecated IPv4-compatible ::/96.
        return if ip.is_loopback() { Loopback } else { Unusable };
    }
    if ip == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) {
        Metadata
    } else if ip.is_unicast_link_local() {
        LinkLocal
    } else if ip.is_unique_local() {
        Private
    } else if non_public_v6(s) {
        NonPublic
    } else {
        Public
    }
}

/// Deprecated site-local `fec0::/10`, documentation `2001:db8::/32`, Teredo
/// `2001::/32`, discard-only `100::/64`.
fn non_public_v6(s: [u16; 8]) -> bool {
    (s[0] & 0xffc0) == 0xfec0
        || (s[0] == 0x2001 && (s[1] == 0xdb8 || s[1] == 0))
        || (s[0] == 0x100 && s[1..4] == [0, 0, 0])
}

/// The class of `ip` (IPv4 inside IPv6 counts as the IPv4 address), which decides
/// whether the broker calls it.
pub fn classify(ip: IpAddr) -> AddressClass {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

/// Which destinations outbound requests may reach.
#[derive(Clone, Debug, Default)]
pub struct EgressPolicy {
    /// Allow loopback, private, shared and other non-public addresses (`--allow-private-upstreams`).
    pub allow_private: bool,
    /// The cluster's service and pod ranges (`--cluster-cidrs`): always refused.
    pub cluster_cidrs: Vec<IpNet>,
}

impl EgressPolicy {
    /// Why `ip` may not be called, or `Ok`.
    pub fn check(&self, ip: IpAddr) -> Result<(), Error> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        if let Some(net) = self.cluster_cidrs.iter().find(|n| n.contains(&ip)) {
            return Err(Error::Refused(format!(
                "{ip} is in the cluster's range {net} (--cluster-cidrs), which the broker never calls"
            )));
        }
        let class = classify(ip);
        match class {
            AddressClass::Public => Ok(()),
            c if c.private() && self.allow_private => Ok(()),
            c if c.private() => Err(Error::Refused(format!(
                "{ip} is {}; the broker calls loopback, private and cluster-internal addresses only with \
                 --allow-private-upstreams",
                c.describe()
            ))),
            c => Err(Error::Refused(format!("{ip} is {}, which the broker never calls", c.describe()))),
        }
    }

    /// Whether `url` may be requested: `https`, and a literal IP host must pass
    /// [`EgressPolicy::check`] (names are checked when they are resolved).
    pub fn check_url(&self, url: &Url) -> Result<(), Error> {
        if url.scheme() != "https" {
            return Err(Error::Refused(format!("{} is not an https URL", sanitize(url.as_str()))));
        }
        // The URL parser has already normalised every IPv4 spelling (`2130706433`,
        // `0x7f.1`) to dotted decimal; IPv6 hosts come in brackets.
        let host = url.host_str().ok_or_else(|| Error::Refused(format!("{} names no host", sanitize(url.as_str()))))?;
        let Ok(ip) = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() else {
            return Ok(());
        };
        self.check(ip).map_err(|why| Error::Refused(format!("refused to call {}: {why}", origin(url))))
    }
}

fn origin(url: &Url) -> String {
    url.origin().ascii_serialization()
}

/// Resolves names with the system resolver and keeps only the addresses the policy
/// permits, so the connector can only connect to those.
#[derive(Clone, Debug)]
pub struct FilteringResolver {
    policy: Arc<EgressPolicy>,
}

impl Resolve for FilteringResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let resolved: Vec<std::net::SocketAddr> = match tokio::net::lookup_host((host.as_str(), 0)).await {
                Ok(addrs) => addrs.collect(),
                Err(e) => return Err(Box::new(e) as Box<dyn StdError + Send + Sync>),
            };
            let mut refused = None;
            let allowed: Vec<std::net::SocketAddr> = resolved
                .into_iter()
                .filter(|addr| match policy.check(addr.ip()) {
                    Ok(()) => true,
                    Err(why) => {
                        refused.get_or_insert(why);
                        false
                    }
                })
                .collect();
            if allowed.is_empty() {
                let why = refused.map_or_else(|| "no address".to_owned(), |e| e.to_string());
                // Inside reqwest's error chain, where `error_reason` finds it.
                let err: Box<dyn StdError + Send + Sync> =
                    Box::new(Error::Refused(format!("refused to call {}: {why}", sanitize(&host))));
                return Err(err);
            }
            let addrs: reqwest::dns::Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}

/// The HTTP client for tenant-chosen destinations: every request passes the
/// [`EgressPolicy`], redirects are not followed.
#[derive(Clone, Debug)]
pub struct Egress {
    client: reqwest::Client,
    policy: Arc<EgressPolicy>,
}

impl Egress {
    /// A client from `builder` (timeouts, CAs, user agent) under `policy`.
    pub fn new(builder: reqwest::ClientBuilder, policy: EgressPolicy) -> Result<Self, Error> {
        let policy = Arc::new(policy);
        let client = builder
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(Arc::new(FilteringResolver { policy: policy.clone() }))
            .build()
            .map_err(|e| Error::HttpClient(e.to_string()))?;
        Ok(Self { client, policy })
    }

    /// The policy every request of this client is checked against.
    pub fn policy(&self) -> &EgressPolicy {
        &self.policy
    }

    /// A request to `url`, or why the destination is refused.
    pub fn request(&self, method: Method, url: &str) -> Result<RequestBuilder, Error> {
        let parsed = Url::parse(url).map_err(|e| Error::Refused(format!("{} is not a URL: {e}", sanitize(url))))?;
        self.policy.check_url(&parsed)?;
        Ok(self.client.request(method, parsed))
    }

    /// `GET url`, or why the destination is refused.
    pub fn get(&self, url: &str) -> Result<RequestBuilder, Error> {
        self.request(Method::GET, url)
    }

    /// `POST url`, or why the destination is refused.
    pub fn post(&self, url: &str) -> Result<RequestBuilder, Error> {
        self.request(Method::POST, url)
    }
}

/// A failed request's reason for callers: a refused destination says why; other
/// failures name their kind (connect, timeout, TLS...) and the innermost cause, bounded.
pub fn error_reason(e: &reqwest::Error) -> String {
    let mut source: Option<&(dyn StdError + 'static)> = Some(e);
    let mut innermost = None;
    while let Some(err) = source {
        if let Some(refused @ Error::Refused(_)) = err.downcast_ref::<Error>() {
            return refused.to_string();
        }
        innermost = Some(err);
        source = err.source();
    }
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else if e.is_body() || e.is_decode() {
        "reading the answer failed"
    } else {
        "request failed"
    };
    match innermost.map(|i| i.to_string()) {
        Some(cause) if cause != e.to_string() => format!("{kind}: {}", sanitize(&cause)),
        _ => kind.to_owned(),
    }
}

/// Upstream text as passed on to callers: printable characters only, whitespace
/// collapsed to single spaces, at most [`MAX_REASON_CHARS`] characters.
pub fn sanitize(text: &str) -> String {
    let mut out = String::new();
    let mut chars = 0;
    let mut pending_space = false;
    for c in text.chars() {
        if c.is_whitespace() || c.is_control() {
            pending_space = !out.is_empty();
            continue;
        }
        if chars + usize::from(pending_space) + 1 > MAX_REASON_CHARS {
            out.push('…');
            return out;
        }
        if pending_space {
            out.push(' ');
            chars += 1;
            pending_space = false;
        }
        out.push(c);
        chars += 1;
    }
    out
}

/// An upstream error code as passed on to callers: letters, digits and `_.:-/` only, at
/// most [`MAX_CODE_CHARS`]; `None` when nothing is left.
pub fn sanitize_code(code: &str) -> Option<String> {
    let clean: String =
        code.chars().filter(|c| c.is_ascii_alphanumeric() || "_.:-/".contains(*c)).take(MAX_CODE_CHARS).collect();
    (!clean.is_empty()).then_some(clean)
}

/// The error code and description of an upstream's JSON error answer: OAuth2's
/// (`{"error": "...", "error_description": "..."}`), Google's (`{"error": {"status":
/// "...", "message": "..."}}`), Azure Key Vault's (`{"error": {"code": "...",
/// "message": "..."}}`) or the AWS JSON protocol's (`{"__type": "...#Code", "message":
/// "..."}`), through [`sanitize_code`] and [`sanitize`] (the first line of the
/// description). Nothing of any other answer, which may be an internal service's page.
pub fn json_error(value: &serde_json::Value) -> (Option<String>, Option<String>) {
    use serde_json::Value;
    let text = |v: Option<&Value>| v.and_then(Value::as_str).map(|d| sanitize(d.lines().next().unwrap_or("")));
    match value.get("error") {
        Some(Value::String(code)) => (sanitize_code(code), text(value.get("error_description"))),
        Some(Value::Object(e)) => (
            e.get("status").or_else(|| e.get("code")).and_then(Value::as_str).and_then(sanitize_code),
            text(e.get("message")),
        ),
        _ => match value.get("__type").and_then(Value::as_str) {
            Some(kind) => (
                sanitize_code(kind.rsplit('#').next().unwrap_or(kind)),
                text(value.get("message").or_else(|| value.get("Message"))),
            ),
            None => (None, None),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(ip: &str) -> AddressClass {
        classify(ip.parse().unwrap())
    }

    #[test]
    fn addresses_are_classified() {
        use AddressClass::*;
        for (ip, want) in [
            ("8.8.8.8", Public),
            ("52.94.0.1", Public),
            ("2606:4700::1111", Public),
            ("127.0.0.1", Loopback),
            ("127.255.0.9", Loopback),
            ("::1", Loopback),
            ("10.0.0.1", Private),
            ("10.244.77.1", Private),
            ("172.16.0.1", Private),
            ("172.31.255.255", Private),
            ("192.168.1.1", Private),
            ("fd12:3456::1", Private),
            ("fc00::1", Private),
            ("100.64.0.1", Shared),
            ("100.127.255.254", Shared),
            ("100.100.100.200", Shared),
            ("192.0.2.1", NonPublic),
            ("198.18.0.1", NonPublic),
            ("2001:db8::1", NonPublic),
            ("fec0::1", NonPublic),
            ("169.254.169.254", LinkLocal),
            ("169.254.0.1", LinkLocal),
            ("fe80::1", LinkLocal),
            ("febf::1", LinkLocal),
            ("fd00:ec2::254", Metadata),
            ("0.0.0.0", Unusable),
            ("0.1.2.3", Unusable),
            ("::", Unusable),
            ("255.255.255.255", Unusable),
            ("224.0.0.1", Unusable),
            ("ff02::1", Unusable),
            ("240.0.0.1", Unusable),
            // IPv4 inside IPv6 is what the IPv4 address is.
            ("::ffff:127.0.0.1", Loopback),
            ("::ffff:169.254.169.254", LinkLocal),
            ("::ffff:8.8.8.8", Public),
            ("64:ff9b::a00:1", Private),
            ("2002:a9fe:a9fe::1", LinkLocal),
            ("::7f00:1", Unusable),
        ] {
            assert_eq!(class(ip), want, "{ip}");
        }
        // Neighbours of the ranges are public.
        for ip in ["172.32.0.1", "172.15.255.255", "100.128.0.1", "100.63.255.255", "169.255.0.1", "11.0.0.1"] {
            assert_eq!(class(ip), Public, "{ip}");
        }
    }

    #[test]
    fn the_policy_refuses_and_allows_by_flag() {
        let strict = EgressPolicy::default();
        let lenient = EgressPolicy {
            allow_private: true,
            cluster_cidrs: vec!["10.96.0.0/12".parse().unwrap(), "fd00:10:96::/108".parse().unwrap()],
        };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(strict.check(ip("8.8.8.8")).is_ok());
        let err = strict.check(ip("127.0.0.1")).unwrap_err().to_string();
        assert!(err.contains("loopback") && err.contains("--allow-private-upstreams"), "{err}");
        assert!(strict.check(ip("10.1.2.3")).unwrap_err().to_string().contains("private"));
        assert!(lenient.check(ip("127.0.0.1")).is_ok());
        assert!(lenient.check(ip("10.244.77.1")).is_ok());
        assert!(lenient.check(ip("::ffff:10.244.77.1")).is_ok());
        // Link-local (metadata), unusable and the cluster's ranges: refused even so.
        for refused in ["169.254.169.254", "fe80::1", "fd00:ec2::254", "0.0.0.0", "224.0.0.1"] {
            let err = lenient.check(ip(refused)).unwrap_err().to_string();
            assert!(err.contains("never calls"), "{refused}: {err}");
        }
        let err = lenient.check(ip("10.96.0.1")).unwrap_err().to_string();
        assert!(err.contains("10.96.0.0/12") && err.contains("--cluster-cidrs"), "{err}");
        assert!(lenient.check(ip("::ffff:10.96.0.10")).is_err());
        assert!(lenient.check(ip("fd00:10:96::1")).is_err());
    }

    #[test]
    fn urls_with_literal_addresses_are_checked_before_sending() {
        let strict = EgressPolicy::default();
        let url = |s: &str| Url::parse(s).unwrap();
        assert!(strict.check_url(&url("https://sts.amazonaws.com/")).is_ok());
        assert!(strict.check_url(&url("https://8.8.8.8/x")).is_ok());
        assert!(strict.check_url(&url("http://8.8.8.8/x")).unwrap_err().to_string().contains("not an https URL"));
        for refused in [
            "https://127.0.0.1:8443/token",
            "https://[::1]/",
            "https://2130706433/",
            "https://0x7f.1/",
            "https://169.254.169.254/latest/meta-data/",
            "https://[::ffff:a9fe:a9fe]/",
            "https://10.0.0.1/",
        ] {
            let err = strict.check_url(&url(refused)).unwrap_err().to_string();
            assert!(err.starts_with("refused to call https://"), "{refused}: {err}");
        }
    }

    #[tokio::test]
    async fn names_resolving_to_refused_addresses_are_not_connected() {
        let egress = Egress::new(reqwest::Client::builder(), EgressPolicy::default()).unwrap();
        // `localhost` resolves to loopback only: the connector never gets an address.
        let err = egress.get("https://localhost:9/").unwrap().send().await.unwrap_err();
        let reason = error_reason(&err);
        assert!(reason.starts_with("refused to call localhost") && reason.contains("loopback"), "{reason}");
        // A literal address is refused before any request exists.
        assert!(egress.get("https://127.0.0.1:9/").unwrap_err().to_string().contains("loopback"));
    }

    #[test]
    fn upstream_text_is_bounded_and_printable() {
        assert_eq!(sanitize("  invalid\tclient\r\n\u{0}secret  "), "invalid client secret");
        let long = "é".repeat(1000);
        let s = sanitize(&long);
        assert_eq!(s.chars().count(), MAX_REASON_CHARS + 1);
        assert!(s.ends_with('…'));
        assert_eq!(sanitize_code("invalid_grant").as_deref(), Some("invalid_grant"));
        assert_eq!(sanitize_code("Sender:AccessDenied").as_deref(), Some("Sender:AccessDenied"));
        assert_eq!(sanitize_code("<html>\n").as_deref(), Some("html"));
        assert_eq!(sanitize_code(&"A".repeat(500)).map(|c| c.len()), Some(MAX_CODE_CHARS));
        assert_eq!(sanitize_code("<>"), None);
    }

    #[test]
    fn upstream_errors_become_a_bounded_reason() {
        use serde_json::json;
        let (code, message) =
            json_error(&json!({"error": "invalid_grant", "error_description": "AADSTS70021: no match\r\nTrace ID: 1"}));
        assert_eq!((code.as_deref(), message.as_deref()), (Some("invalid_grant"), Some("AADSTS70021: no match")));
        let (code, message) = json_error(&json!({"error": {"status": "PERMISSION_DENIED", "message": "denied"}}));
        assert_eq!((code.as_deref(), message.as_deref()), (Some("PERMISSION_DENIED"), Some("denied")));
        // An internal service's long answer: bounded and on one line.
        let page = format!("<html><body>{}</body></html>", "internal inventory row\t".repeat(5000));
        let (code, message) = json_error(&json!({"error": page.clone(), "error_description": page}));
        assert!(code.unwrap().len() <= MAX_CODE_CHARS);
        let message = message.unwrap();
        assert!(message.chars().count() <= MAX_REASON_CHARS + 1 && !message.contains('\t'), "{message}");
        // Azure Key Vault and the AWS JSON protocol.
        let (code, message) = json_error(&json!({"error": {"code": "SecretNotFound", "message": "not here"}}));
        assert_eq!((code.as_deref(), message.as_deref()), (Some("SecretNotFound"), Some("not here")));
        let (code, message) =
            json_error(&json!({"__type": "com.amazonaws.secretsmanager#AccessDeniedException", "Message": "no"}));
        assert_eq!((code.as_deref(), message.as_deref()), (Some("AccessDeniedException"), Some("no")));
        // Anything else says nothing of the body.
        assert_eq!(json_error(&json!({"rows": ["secret"]})), (None, None));
        assert_eq!(json_error(&serde_json::Value::Null), (None, None));
    }
}
