//! Self-managed serving certificate: a CA and a serving certificate kept in one Secret
//! shared by every replica, the CA bundle published where clients read it (the
//! `caBundle` of a MutatingWebhookConfiguration, a ConfigMap, or both), and rotation well
//! before expiry. The webhook and the operator's broker both use it.
//!
//! Rotation never breaks clients that read the published bundle, however late they see
//! it. With a CA lifetime V:
//! - when a third of V is left, the next CA is *staged*: created and added to the bundle,
//!   but nothing is signed with it yet;
//! - a sixth of V later it is *promoted*: it signs a new serving certificate, and the old
//!   CA stays in the bundle, *retired*, until it expires.
//!
//! So every client has had V/6 to pick up a new CA before anything it signed is served
//! (ten months for the default five years; a pod admitted since then trusts both). A
//! serving certificate is renewed when a third of its own lifetime is left. The Secret is
//! the source of truth and is written with optimistic concurrency, so replicas racing to
//! rotate cannot both win.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use k8s_openapi::{
    ByteString,
    api::{
        admissionregistration::v1::MutatingWebhookConfiguration,
        core::v1::{ConfigMap, Secret},
    },
};
use kube::{
    Api, Client, ResourceExt,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use tracing::{info, warn};

use cloudpass_api::secret::SecretString;

use crate::{Error, tls::ReloadableCert};

const CA_CERT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
const BUNDLE: &str = "ca-bundle.crt";
const TLS_CERT: &str = "tls.crt";
const TLS_KEY: &str = "tls.key";
const NEXT_CA_CERT: &str = "next-ca.crt";
const NEXT_CA_KEY: &str = "next-ca.key";
const PREVIOUS_CA_CERT: &str = "previous-ca.crt";
const CA_NOT_AFTER: &str = "cloudpass.dev/ca-not-after";
const CA_NAME: &str = "cloudpass.dev/ca-name";
const CERT_NOT_AFTER: &str = "cloudpass.dev/cert-not-after";
const NEXT_CA_NAME: &str = "cloudpass.dev/next-ca-name";
const NEXT_CA_NOT_AFTER: &str = "cloudpass.dev/next-ca-not-after";
const NEXT_CA_STAGED_AT: &str = "cloudpass.dev/next-ca-staged-at";
const PREVIOUS_CA_NOT_AFTER: &str = "cloudpass.dev/previous-ca-not-after";
/// Key of the CA bundle in the published ConfigMap (the name cert-manager and most
/// tools use for a CA file).
pub const CA_CONFIG_MAP_KEY: &str = "ca.crt";

/// Where and how long.
#[derive(Clone, Debug)]
pub struct CertSettings {
    /// Who manages the certificate (`cloudpass-webhook`, `cloudpass-broker`): the
    /// `app.kubernetes.io/managed-by` label of what it writes and the prefix of CA names.
    pub owner: String,
    /// Namespace of the server (and of the Secret and ConfigMap).
    pub namespace: String,
    /// Name of the Secret holding the CA and serving certificate.
    pub secret_name: String,
    /// MutatingWebhookConfiguration whose `caBundle` is kept in sync, if any.
    pub webhook_config_name: Option<String>,
    /// ConfigMap (in `namespace`) where the CA bundle is published under
    /// [`CA_CONFIG_MAP_KEY`], if any. The bundle is public; the CA key never leaves the
    /// Secret.
    pub ca_config_map: Option<String>,
    /// Names (DNS or IP) the serving certificate is valid for.
    pub names: Vec<String>,
    /// Lifetime of a CA.
    pub ca_validity: Duration,
    /// Lifetime of a serving certificate.
    pub cert_validity: Duration,
}

/// A CA: its certificate, key, unique name and expiry (unix seconds). Its `Debug`
/// never shows the key.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Ca {
    cert: String,
    key: SecretString,
    name: String,
    not_after: i64,
}

/// The material in the Secret. Its `Debug` never shows a private key.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Material {
    /// The CA that signs the serving certificate.
    ca: Ca,
    /// A staged CA (and when it was staged): trusted, not yet signing.
    next: Option<(Ca, i64)>,
    /// A retired CA's certificate and expiry: trusted until then.
    previous: Option<(String, i64)>,
    tls_cert: String,
    tls_key: SecretString,
    cert_not_after: i64,
}

fn now() -> i64 {
    jiff::Timestamp::now().as_second()
}

fn offset(unix: i64) -> Result<time::OffsetDateTime, Error> {
    time::OffsetDateTime::from_unix_timestamp(unix).map_err(|e| Error::Certificate(e.to_string()))
}

fn rcgen_err(e: rcgen::Error) -> Error {
    Error::Certificate(e.to_string())
}

fn ca_params(name: &str, not_after: i64) -> Result<CertificateParams, Error> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(rcgen_err)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.not_before = offset(now() - 300)?;
    params.not_after = offset(not_after)?;
    Ok(params)
}

fn new_ca(settings: &CertSettings) -> Result<Ca, Error> {
    let key = KeyPair::generate().map_err(rcgen_err)?;
    let not_after = now() + settings.ca_validity.as_secs() as i64;
    // A unique name per CA, so that the old and the new CA are told apart during overlap.
    let name = format!("{}-ca-{}", settings.owner, cloudpass_rand::hex(6));
    let cert = ca_params(&name, not_after)?.self_signed(&key).map_err(rcgen_err)?;
    Ok(Ca { cert: cert.pem(), key: key.serialize_pem().into(), name, not_after })
}

fn issue_serving(settings: &CertSettings, ca: &Ca) -> Result<(String, SecretString, i64), Error> {
    let ca_key = KeyPair::from_pem(ca.key.expose()).map_err(rcgen_err)?;
    // The issuer is rebuilt from the CA's name and key: all a signature needs.
    let issuer = Issuer::new(ca_params(&ca.name, ca.not_after)?, ca_key);
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(rcgen_err)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, settings.names.first().cloned().unwrap_or_else(|| settings.owner.clone()));
    params.distinguished_name = dn;
    params.subject_alt_names = settings
        .names
        .iter()
        .map(|n| match n.parse() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => n.clone().try_into().map(SanType::DnsName).map_err(rcgen_err),
        })
        .collect::<Result<_, _>>()?;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    // Never outlive the CA that signs it.
    let not_after = (now() + settings.cert_validity.as_secs() as i64).min(ca.not_after);
    params.not_before = offset(now() - 300)?;
    params.not_after = offset(not_after)?;
    let key = KeyPair::generate().map_err(rcgen_err)?;
    let cert = params.signed_by(&key, &issuer).map_err(rcgen_err)?;
    Ok((cert.pem(), key.serialize_pem().into(), not_after))
}

/// Renew when a third of the lifetime is left.
fn due(not_after: i64, validity: Duration) -> bool {
    not_after - now() < validity.as_secs() as i64 / 3
}

impl Material {
    fn fresh(settings: &CertSettings) -> Result<Self, Error> {
        let ca = new_ca(settings)?;
        let (tls_cert, tls_key, cert_not_after) = issue_serving(settings, &ca)?;
        Ok(Self { ca, next: None, previous: None, tls_cert, tls_key, cert_not_after })
    }

    /// Every CA a client must trust: the staged, the current and the retired one.
    fn bundle(&self) -> String {
        let next = self.next.as_ref().map(|(ca, _)| ca.cert.as_str());
        let previous = self.previous.as_ref().map(|(cert, _)| cert.as_str());
        [next, Some(self.ca.cert.as_str()), previous].into_iter().flatten().collect()
    }

    fn from_secret(secret: &Secret) -> Option<Self> {
        let data = secret.data.as_ref()?;
        let text = |k: &str| data.get(k).and_then(|v| String::from_utf8(v.0.clone()).ok());
        let secret_text = |k: &str| text(k).map(SecretString::from);
        let ann = secret.annotations();
        let num = |k: &str| ann.get(k).and_then(|v| v.parse::<i64>().ok());
        let next = match (text(NEXT_CA_CERT), secret_text(NEXT_CA_KEY), ann.get(NEXT_CA_NAME)) {
            (Some(cert), Some(key), Some(name)) => Some((
                Ca { cert, key, name: name.clone(), not_after: num(NEXT_CA_NOT_AFTER)? },
                num(NEXT_CA_STAGED_AT)?,
            )),
            _ => None,
        };
        let previous = text(PREVIOUS_CA_CERT).zip(num(PREVIOUS_CA_NOT_AFTER));
        Some(Self {
            ca: Ca {
                cert: text(CA_CERT)?,
                key: secret_text(CA_KEY)?,
                name: ann.get(CA_NAME)?.clone(),
                not_after: num(CA_NOT_AFTER)?,
            },
            next,
            previous,
            tls_cert: text(TLS_CERT)?,
            tls_key: secret_text(TLS_KEY)?,
            cert_not_after: num(CERT_NOT_AFTER)?,
        })
    }

    fn apply_to(&self, secret: &mut Secret) {
        let bundle = self.bundle();
        // The keys leave the process here, on purpose: into the Secret.
        let mut data = vec![
            (CA_CERT, self.ca.cert.as_str()),
            (CA_KEY, self.ca.key.expose()),
            (BUNDLE, &bundle),
            (TLS_CERT, &self.tls_cert),
            (TLS_KEY, self.tls_key.expose()),
        ];
        if let Some((next, _)) = &self.next {
            data.extend([(NEXT_CA_CERT, next.cert.as_str()), (NEXT_CA_KEY, next.key.expose())]);
        }
        if let Some((cert, _)) = &self.previous {
            data.push((PREVIOUS_CA_CERT, cert));
        }
        secret.data = Some(data.iter().map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec()))).collect());
        let ann = secret.metadata.annotations.get_or_insert_with(BTreeMap::new);
        for key in [NEXT_CA_NAME, NEXT_CA_NOT_AFTER, NEXT_CA_STAGED_AT, PREVIOUS_CA_NOT_AFTER] {
            ann.remove(key);
        }
        ann.insert(CA_NAME.into(), self.ca.name.clone());
        ann.insert(CA_NOT_AFTER.into(), self.ca.not_after.to_string());
        ann.insert(CERT_NOT_AFTER.into(), self.cert_not_after.to_string());
        if let Some((next, staged_at)) = &self.next {
            ann.insert(NEXT_CA_NAME.into(), next.name.clone());
            ann.insert(NEXT_CA_NOT_AFTER.into(), next.not_after.to_string());
            ann.insert(NEXT_CA_STAGED_AT.into(), staged_at.to_string());
        }
        if let Some((_, not_after)) = &self.previous {
            ann.insert(PREVIOUS_CA_NOT_AFTER.into(), not_after.to_string());
        }
    }

    /// The next material, or `None` when nothing is due. Staging and promoting a CA
    /// never happen in the same round, so a staged CA is always published (by the round
    /// that staged it) before it signs.
    fn rotated(&self, settings: &CertSettings) -> Result<Option<Self>, Error> {
        let validity = settings.ca_validity.as_secs() as i64;
        let mut next = self.clone();
        if next.previous.as_ref().is_some_and(|(_, not_after)| *not_after <= now()) {
            // The retired CA has expired: nothing it signed can be valid any more.
            next.previous = None;
        }
        match next.next.take() {
            // Promote after a sixth of the lifetime, or at once if the current CA is
            // about to expire (a replica that was down for long).
            Some((staged, staged_at)) if now() >= staged_at + validity / 6 || self.ca.not_after - now() < 60 => {
                info!(ca = %staged.name, "staged CA promoted; the previous CA stays trusted until it expires");
                next.previous = Some((self.ca.cert.clone(), self.ca.not_after));
                next.ca = staged;
            }
            Some(staged) => next.next = Some(staged),
            None if due(self.ca.not_after, settings.ca_validity) => {
                let staged = new_ca(settings)?;
                info!(ca = %staged.name, "next CA staged: published now, signing later");
                next.next = Some((staged, now()));
            }
            None => {}
        }
        if next.ca.name != self.ca.name || due(self.cert_not_after, settings.cert_validity) {
            let (tls_cert, tls_key, cert_not_after) = issue_serving(settings, &next.ca)?;
            next.tls_cert = tls_cert;
            next.tls_key = tls_key;
            next.cert_not_after = cert_not_after;
            info!(ca = %next.ca.name, "serving certificate renewed");
        }
        Ok((next != *self).then_some(next))
    }
}

/// Keeps the Secret, the published CA bundle and the in-process serving certificate in
/// step.
pub struct CertManager {
    client: Client,
    settings: CertSettings,
    cert: Arc<ReloadableCert>,
    on_reload: Box<dyn Fn() + Send + Sync>,
    loaded: std::sync::Mutex<Option<(String, SecretString)>>,
}

impl CertManager {
    /// A manager for these settings; nothing happens until [`CertManager::sync`].
    /// `on_reload` runs whenever a new serving certificate is installed (a metric).
    pub fn new(
        client: Client,
        settings: CertSettings,
        cert: Arc<ReloadableCert>,
        on_reload: impl Fn() + Send + Sync + 'static,
    ) -> Self {
        Self { client, settings, cert, on_reload: Box::new(on_reload), loaded: Default::default() }
    }

    /// One round: create or rotate the Secret as due, publish the bundle, reload.
    pub async fn sync(&self) -> Result<(), Error> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.settings.namespace);
        let material = loop {
            match api.get_opt(&self.settings.secret_name).await? {
                None => {
                    let material = Material::fresh(&self.settings)?;
                    let mut secret = Secret {
                        metadata: ObjectMeta {
                            name: Some(self.settings.secret_name.clone()),
                            labels: Some([(MANAGED_BY.into(), self.settings.owner.clone())].into()),
                            ..Default::default()
                        },
                        type_: Some("Opaque".into()),
                        ..Default::default()
                    };
                    material.apply_to(&mut secret);
                    match api.create(&PostParams::default(), &secret).await {
                        Ok(_) => {
                            info!(secret = %self.settings.secret_name, "created CA and serving certificate");
                            break material;
                        }
                        // Another replica created it first: use theirs.
                        Err(kube::Error::Api(s)) if s.code == 409 => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
                Some(mut secret) => {
                    let Some(current) = Material::from_secret(&secret) else {
                        return Err(Error::Certificate(format!(
                            "Secret {} exists but is not a {} certificate; delete it or name another Secret",
                            self.settings.secret_name, self.settings.owner
                        )));
                    };
                    let Some(next) = current.rotated(&self.settings)? else { break current };
                    next.apply_to(&mut secret);
                    match api.replace(&self.settings.secret_name, &PostParams::default(), &secret).await {
                        Ok(_) => break next,
                        // Another replica rotated first (resourceVersion changed): start over.
                        Err(kube::Error::Api(s)) if s.code == 409 => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        };
        self.sync_bundle(&material.bundle()).await?;
        let pair = (material.tls_cert.clone(), material.tls_key.clone());
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if loaded.as_ref() != Some(&pair) {
            self.cert.set(&pair.0, pair.1.expose())?;
            (self.on_reload)();
            info!(not_after = material.cert_not_after, "serving certificate loaded");
            *loaded = Some(pair);
        }
        Ok(())
    }

    /// Publishes the CA bundle: the ConfigMap and the webhook configuration, if set.
    async fn sync_bundle(&self, bundle: &str) -> Result<(), Error> {
        if let Some(name) = &self.settings.ca_config_map {
            publish_ca(&self.client, &self.settings.namespace, name, &self.settings.owner, bundle).await?;
        }
        self.sync_webhook_bundle(bundle).await
    }

    /// Sets the `caBundle` of every webhook of the configuration, if it differs.
    async fn sync_webhook_bundle(&self, bundle: &str) -> Result<(), Error> {
        let Some(name) = &self.settings.webhook_config_name else { return Ok(()) };
        let api: Api<MutatingWebhookConfiguration> = Api::all(self.client.clone());
        let Some(config) = api.get_opt(name).await? else {
            warn!(name, "MutatingWebhookConfiguration not found; caBundle not synced");
            return Ok(());
        };
        let webhooks = config.webhooks.unwrap_or_default();
        let wanted = ByteString(bundle.as_bytes().to_vec());
        if webhooks.iter().all(|w| w.client_config.ca_bundle.as_ref() == Some(&wanted)) {
            return Ok(());
        }
        // A JSON patch per webhook entry keeps everything else (owned by Helm or GitOps) as is.
        let ops: Vec<serde_json::Value> = (0..webhooks.len())
            .map(|i| {
                serde_json::json!({"op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"),
                    "value": wanted})
            })
            .collect();
        let patch: json_patch::Patch =
            serde_json::from_value(serde_json::Value::Array(ops)).map_err(|e| Error::Certificate(e.to_string()))?;
        api.patch(name, &PatchParams::default(), &Patch::<()>::Json(patch)).await?;
        info!(name, "caBundle updated");
        Ok(())
    }

    /// Runs [`CertManager::sync`] every `interval` forever, logging failures.
    pub async fn run(self: Arc<Self>, interval: Duration) {
        loop {
            tokio::time::sleep(interval).await;
            if let Err(e) = self.sync().await {
                warn!(error = %e, reason = e.metric_label(), "certificate sync failed; retrying");
            }
        }
    }
}

/// The label naming who manages an object the cloudpass components write.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";

/// Writes `bundle` (PEM) into the ConfigMap `name` under [`CA_CONFIG_MAP_KEY`], creating
/// it if absent; `Ok(true)` when something was written. Replicas may race: a conflict
/// is retried against the winner's version, and equal content is never rewritten.
pub async fn publish_ca(
    client: &Client,
    namespace: &str,
    name: &str,
    owner: &str,
    bundle: &str,
) -> Result<bool, Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    loop {
        let result = match api.get_opt(name).await? {
            Some(cm) if cm.data.as_ref().and_then(|d| d.get(CA_CONFIG_MAP_KEY)).map(String::as_str) == Some(bundle) => {
                return Ok(false);
            }
            Some(mut cm) => {
                cm.data.get_or_insert_with(BTreeMap::new).insert(CA_CONFIG_MAP_KEY.into(), bundle.into());
                api.replace(name, &PostParams::default(), &cm).await
            }
            None => {
                let cm = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(name.into()),
                        labels: Some([(MANAGED_BY.into(), owner.into())].into()),
                        ..Default::default()
                    },
                    data: Some([(CA_CONFIG_MAP_KEY.into(), bundle.into())].into()),
                    ..Default::default()
                };
                api.create(&PostParams::default(), &cm).await
            }
        };
        match result {
            Ok(_) => {
                info!(configmap = name, "CA bundle published");
                return Ok(true);
            }
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(ca: u64, cert: u64) -> CertSettings {
        CertSettings {
            owner: "cloudpass-test".into(),
            namespace: "ns".into(),
            secret_name: "s".into(),
            webhook_config_name: None,
            ca_config_map: None,
            names: vec!["cloudpass-webhook.ns.svc".into(), "127.0.0.1".into()],
            ca_validity: Duration::from_secs(ca),
            cert_validity: Duration::from_secs(cert),
        }
    }

    fn round_trip(m: &Material) -> Material {
        let mut secret = Secret::default();
        m.apply_to(&mut secret);
        Material::from_secret(&secret).expect("a Secret it wrote")
    }

    #[test]
    fn fresh_material_is_not_due_and_round_trips_through_a_secret() {
        let s = settings(3 * 86400, 86400);
        let m = Material::fresh(&s).unwrap();
        assert!(m.rotated(&s).unwrap().is_none(), "nothing is due right after creation");
        assert_eq!(round_trip(&m), m);
        assert_eq!(m.bundle(), m.ca.cert);
    }

    #[test]
    fn a_due_ca_is_staged_first_then_promoted_with_the_old_one_still_trusted() {
        let m = Material::fresh(&settings(3 * 86400, 86400)).unwrap();
        // With a validity far longer than what is left, the CA is due.
        let long = settings(100 * 86400, 100 * 86400);
        let staged = m.rotated(&long).unwrap().expect("staging due");
        let (next_ca, staged_at) = staged.next.clone().expect("a CA is staged");
        assert_eq!(staged.ca, m.ca, "a staged CA does not sign yet");
        assert!(staged.bundle().contains(&m.ca.cert) && staged.bundle().contains(&next_ca.cert), "both trusted");
        assert_eq!(round_trip(&staged), staged);
        let again = staged.rotated(&long).unwrap().unwrap_or_else(|| staged.clone());
        assert_eq!(again.ca, m.ca, "not promoted before a sixth of the lifetime has passed");

        let mut aged = staged.clone();
        aged.next = Some((next_ca.clone(), staged_at - long.ca_validity.as_secs() as i64 / 6));
        let promoted = aged.rotated(&long).unwrap().expect("promotion due");
        assert_eq!(promoted.ca, next_ca);
        assert_eq!(promoted.next, None);
        assert_eq!(promoted.previous, Some((m.ca.cert.clone(), m.ca.not_after)), "the old CA is retired, not dropped");
        assert_ne!(promoted.tls_cert, staged.tls_cert, "the serving certificate comes from the new CA");
        let certs = |b: String| {
            let mut v: Vec<String> = b.split_inclusive("-----END CERTIFICATE-----\n").map(str::to_owned).collect();
            v.sort();
            v
        };
        assert_eq!(certs(promoted.bundle()), certs(staged.bundle()), "promotion changes nothing clients trust");
        assert_eq!(round_trip(&promoted), promoted);

        let mut expired = promoted.clone();
        expired.previous.as_mut().unwrap().1 = now() - 1;
        let pruned = expired.rotated(&settings(100 * 86400, 86400)).unwrap().expect("pruning due");
        assert_eq!(pruned.previous, None);
        assert_eq!(pruned.bundle(), pruned.ca.cert, "an expired CA leaves the bundle");
    }

    #[test]
    fn a_ca_is_never_staged_and_promoted_in_the_same_round() {
        let s = settings(30, 30);
        let m = Material::fresh(&s).unwrap();
        let mut nearly_expired = m.clone();
        nearly_expired.ca.not_after = now() + 5;
        let next = nearly_expired.rotated(&s).unwrap().expect("staging due");
        assert_eq!(next.ca, nearly_expired.ca, "staged only: clients have not seen the new CA yet");
        let promoted = next.rotated(&s).unwrap().expect("promoted at once, the current CA being about to expire");
        assert_eq!(promoted.ca, next.next.unwrap().0);
    }

    #[test]
    fn debug_output_shows_no_private_key() {
        let m = Material::fresh(&settings(3 * 86400, 86400)).unwrap();
        // With a CA staged, all three keys are held.
        let staged = m.rotated(&settings(100 * 86400, 100 * 86400)).unwrap().expect("staging due");
        let mut secret = Secret::default();
        staged.apply_to(&mut secret);
        let data = secret.data.unwrap();
        let keys: Vec<String> =
            [CA_KEY, TLS_KEY, NEXT_CA_KEY].iter().map(|k| String::from_utf8(data[*k].0.clone()).unwrap()).collect();
        let shown = format!("{staged:?} {staged:#?} {:?}", staged.ca);
        assert!(!shown.contains("PRIVATE KEY"), "{shown}");
        for key in keys {
            // The base64 body of each PEM key, line by line.
            for line in key.lines().filter(|l| !l.starts_with("-----") && l.len() >= 16) {
                assert!(!shown.contains(line), "a private key appears in Debug output");
            }
        }
        assert!(shown.contains("redacted"), "{shown}");
    }

    #[test]
    fn serving_certificates_never_outlive_their_ca() {
        let s = settings(3600, 86400);
        let m = Material::fresh(&s).unwrap();
        assert!(m.cert_not_after <= m.ca.not_after);
    }
}
