//! Certificates without extra dependencies: `serve --certificates self-managed` keeps a CA and a
//! serving certificate in a Secret, writes the CA bundle into both webhook configurations,
//! renews the serving certificate well before it expires, rotates the CA with an overlap (the
//! bundle carries the old and the new CA until the old one expires), and writes the serving
//! certificate to the files `serve` reloads without a restart. Several replicas share the
//! Secret: the first writer wins and the others adopt what it wrote.

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{Api, PostParams};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::OffsetDateTime;

/// Lifetime of the CA.
const CA_LIFETIME: time::Duration = time::Duration::days(5 * 365);
/// A new CA is made when the current one has less than this left; the old one stays in the
/// bundle until it expires.
const CA_RENEW_BEFORE: time::Duration = time::Duration::days(365);
/// Lifetime of a serving certificate.
const CERT_LIFETIME: time::Duration = time::Duration::days(365);
/// A serving certificate is renewed when it has less than this left.
const CERT_RENEW_BEFORE: time::Duration = time::Duration::days(120);
/// Common name of the CA (the issuer of every serving certificate).
const CA_NAME: &str = "agentvm webhook CA";

const ANN_CA_NOT_AFTER: &str = "agentvm.dev/ca-not-after";
const ANN_CERT_NOT_AFTER: &str = "agentvm.dev/cert-not-after";
const ANN_OLD_CA_NOT_AFTER: &str = "agentvm.dev/previous-ca-not-after";
const ANN_NAMES: &str = "agentvm.dev/dns-names";

/// Where the certificates live and go.
#[derive(Debug, Clone)]
pub struct CertConfig {
    /// Namespace of the Secret (the release namespace).
    pub namespace: String,
    /// Name of the Secret.
    pub secret: String,
    /// DNS names of the serving certificate (`<service>.<namespace>.svc` and friends).
    pub dns_names: Vec<String>,
    /// Name of the MutatingWebhookConfiguration and of the ValidatingWebhookConfiguration.
    pub webhook_configuration: String,
    /// Where `serve` reads the serving certificate.
    pub cert_path: PathBuf,
    /// Where `serve` reads the key.
    pub key_path: PathBuf,
}

/// Checks the DNS names of the serving certificate: at least one, each a DNS name of lowercase
/// letters, digits, `-` and `.` (no empty labels, no wildcard).
pub fn check_names(names: &[String]) -> Result<(), String> {
    if names.is_empty() {
        return Err("--cert-dns-names needs at least one name".into());
    }
    for n in names {
        let ok = n.len() <= 253
            && n.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            });
        if !ok {
            return Err(format!("--cert-dns-names: {n:?} is not a DNS name"));
        }
    }
    Ok(())
}

/// Why the certificates could not be kept.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// Generating or signing failed.
    #[error("cannot make a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// The API server refused or failed.
    #[error("{what}: {message}")]
    Api {
        /// What was asked.
        what: String,
        /// What went wrong.
        message: String,
    },
    /// The files could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: String,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
}

/// The certificates as kept in the Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Material {
    /// The current CA certificate.
    pub ca_cert: String,
    /// Its key.
    pub ca_key: String,
    /// Until when it is valid (unix seconds).
    pub ca_not_after: i64,
    /// The previous CA, kept in the bundle until it expires.
    pub old_ca: Option<(String, i64)>,
    /// The serving certificate.
    pub cert: String,
    /// Its key.
    pub key: String,
    /// Until when it is valid (unix seconds).
    pub cert_not_after: i64,
    /// The names it was made for.
    pub dns_names: Vec<String>,
}

impl Material {
    /// The CA bundle clients must trust: the current CA, and the previous one while valid.
    pub fn bundle(&self) -> String {
        match &self.old_ca {
            Some((old, _)) => format!("{}{}", self.ca_cert, old),
            None => self.ca_cert.clone(),
        }
    }
}

fn ca_params(
    not_after: OffsetDateTime,
    not_before: OffsetDateTime,
) -> Result<CertificateParams, rcgen::Error> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::CommonName, CA_NAME);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = not_before;
    p.not_after = not_after;
    Ok(p)
}

fn new_ca(now: OffsetDateTime) -> Result<(String, String, i64), rcgen::Error> {
    let key = KeyPair::generate()?;
    let not_after = now + CA_LIFETIME;
    let cert = ca_params(not_after, now - time::Duration::hours(1))?.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem(), not_after.unix_timestamp()))
}

fn issue(
    ca_key: &str,
    names: &[String],
    now: OffsetDateTime,
) -> Result<(String, String, i64), rcgen::Error> {
    // The issuer is named as the CA certificate names it; only its key signs.
    let issuer = Issuer::new(ca_params(now, now)?, KeyPair::from_pem(ca_key)?);
    let mut p = CertificateParams::new(names.to_vec())?;
    p.distinguished_name.push(
        DnType::CommonName,
        names.first().cloned().unwrap_or_default(),
    );
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.not_before = now - time::Duration::hours(1);
    let not_after = now + CERT_LIFETIME;
    p.not_after = not_after;
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem(), not_after.unix_timestamp()))
}

/// Whether stored material can be used as it is: both keys parse, the CA key is the CA
/// certificate's, the serving key is the serving certificate's, and the serving certificate
/// verifies against the bundle for the first name at `now`. A Secret corrupted by hand or
/// written by another tool fails this and is replaced, instead of stopping the webhook.
pub fn usable(m: &Material, now: OffsetDateTime) -> bool {
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
    let check = || -> Option<()> {
        let provider = agentvm_common::tls::provider();
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(m.bundle().as_bytes()) {
            roots.add(c.ok()?).ok()?;
        }
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots.into(),
            provider.clone(),
        )
        .build()
        .ok()?;
        let unix = |t: i64| {
            Some(UnixTime::since_unix_epoch(Duration::from_secs(
                u64::try_from(t).ok()?,
            )))
        };
        let verify = |pem: &str, name: &str, at: UnixTime| -> Option<()> {
            let cert = CertificateDer::from_pem_slice(pem.as_bytes()).ok()?;
            let name = ServerName::try_from(name.to_owned()).ok()?;
            verifier
                .verify_server_cert(&cert, &[], &name, &[], at)
                .ok()
                .map(drop)
        };
        // The serving certificate and its key (checked within its lifetime: one that merely
        // expired is renewed by `plan`, under the same CA).
        let cert_time = now.unix_timestamp().min(m.cert_not_after - 60);
        verify(&m.cert, m.dns_names.first()?, unix(cert_time)?)?;
        let key = provider
            .key_provider
            .load_private_key(PrivateKeyDer::from_pem_slice(m.key.as_bytes()).ok()?)
            .ok()?;
        let chain = vec![CertificateDer::from_pem_slice(m.cert.as_bytes()).ok()?];
        rustls::sign::CertifiedKey::new(chain, key)
            .keys_match()
            .ok()?;
        // The CA key: a certificate it signs must verify against the CA.
        let probe = issue(&m.ca_key, &["probe.agentvm.invalid".to_owned()], now).ok()?;
        verify(
            &probe.0,
            "probe.agentvm.invalid",
            unix(now.unix_timestamp())?,
        )
    };
    check().is_some()
}

/// What the Secret should hold at `now`, given what it holds: nothing changes while everything
/// is valid long enough; a serving certificate near its end (or for other names) is renewed; a
/// CA near its end is replaced, the old one kept in the bundle.
pub fn plan(
    current: Option<&Material>,
    names: &[String],
    now: OffsetDateTime,
) -> Result<Option<Material>, rcgen::Error> {
    let t = now.unix_timestamp();
    let current = current.filter(|m| {
        let ok = usable(m, now);
        if !ok {
            tracing::warn!("the certificate Secret holds unusable certificates; making new ones");
        }
        ok
    });
    let Some(cur) = current else {
        let (ca_cert, ca_key, ca_not_after) = new_ca(now)?;
        let (cert, key, cert_not_after) = issue(&ca_key, names, now)?;
        return Ok(Some(Material {
            ca_cert,
            ca_key,
            ca_not_after,
            old_ca: None,
            cert,
            key,
            cert_not_after,
            dns_names: names.to_vec(),
        }));
    };
    let mut next = cur.clone();
    let mut changed = false;
    if next.old_ca.as_ref().is_some_and(|(_, until)| *until <= t) {
        next.old_ca = None;
        changed = true;
    }
    if cur.ca_not_after - t < CA_RENEW_BEFORE.whole_seconds() {
        let (ca_cert, ca_key, ca_not_after) = new_ca(now)?;
        next.old_ca = Some((cur.ca_cert.clone(), cur.ca_not_after));
        next.ca_cert = ca_cert;
        next.ca_key = ca_key;
        next.ca_not_after = ca_not_after;
        next.cert_not_after = 0; // re-issue under the new CA
        changed = true;
    }
    if next.cert_not_after - t < CERT_RENEW_BEFORE.whole_seconds() || next.dns_names != names {
        let (cert, key, not_after) = issue(&next.ca_key, names, now)?;
        next.cert = cert;
        next.key = key;
        next.cert_not_after = not_after;
        next.dns_names = names.to_vec();
        changed = true;
    }
    Ok(changed.then_some(next))
}

fn text(secret: &Secret, key: &str) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(key)?;
    String::from_utf8(bytes.0.clone()).ok()
}

fn annotation(secret: &Secret, key: &str) -> Option<String> {
    secret.metadata.annotations.as_ref()?.get(key).cloned()
}

/// Reads what a Secret holds, if it is complete.
pub fn from_secret(secret: &Secret) -> Option<Material> {
    let number = |key: &str| annotation(secret, key)?.parse::<i64>().ok();
    let ca_cert = text(secret, "ca-current.crt")?;
    let old_ca = match (
        text(secret, "ca-previous.crt"),
        number(ANN_OLD_CA_NOT_AFTER),
    ) {
        (Some(c), Some(t)) => Some((c, t)),
        _ => None,
    };
    Some(Material {
        ca_cert,
        ca_key: text(secret, "ca.key")?,
        ca_not_after: number(ANN_CA_NOT_AFTER)?,
        old_ca,
        cert: text(secret, "tls.crt")?,
        key: text(secret, "tls.key")?,
        cert_not_after: number(ANN_CERT_NOT_AFTER)?,
        dns_names: annotation(secret, ANN_NAMES)?
            .split(',')
            .map(str::to_owned)
            .collect(),
    })
}

fn to_secret(m: &Material, cfg: &CertConfig, resource_version: Option<String>) -> Secret {
    let mut data = std::collections::BTreeMap::new();
    let mut put = |k: &str, v: &str| {
        data.insert(k.to_owned(), ByteString(v.as_bytes().to_vec()));
    };
    put("ca.crt", &m.bundle());
    put("ca-current.crt", &m.ca_cert);
    put("ca.key", &m.ca_key);
    put("tls.crt", &m.cert);
    put("tls.key", &m.key);
    let mut annotations = std::collections::BTreeMap::from([
        (ANN_CA_NOT_AFTER.to_owned(), m.ca_not_after.to_string()),
        (ANN_CERT_NOT_AFTER.to_owned(), m.cert_not_after.to_string()),
        (ANN_NAMES.to_owned(), m.dns_names.join(",")),
    ]);
    if let Some((old, until)) = &m.old_ca {
        data.insert(
            "ca-previous.crt".into(),
            ByteString(old.as_bytes().to_vec()),
        );
        annotations.insert(ANN_OLD_CA_NOT_AFTER.into(), until.to_string());
    }
    let mut secret = Secret {
        type_: Some("kubernetes.io/tls".into()),
        data: Some(data),
        ..Secret::default()
    };
    secret.metadata.name = Some(cfg.secret.clone());
    secret.metadata.namespace = Some(cfg.namespace.clone());
    secret.metadata.annotations = Some(annotations);
    secret.metadata.labels = Some(std::collections::BTreeMap::from([(
        "app.kubernetes.io/managed-by".to_owned(),
        "agentvm".to_owned(),
    )]));
    secret.metadata.resource_version = resource_version;
    secret
}

const API_TIMEOUT: Duration = Duration::from_secs(10);

fn api_err(what: &str) -> impl Fn(String) -> CertError + '_ {
    move |message| CertError::Api {
        what: what.to_owned(),
        message,
    }
}

async fn bounded<T>(
    what: &str,
    fut: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, CertError> {
    match tokio::time::timeout(API_TIMEOUT, fut).await {
        Ok(r) => r.map_err(|e| api_err(what)(e.to_string())),
        Err(_) => Err(api_err(what)("timed out".into())),
    }
}

/// One round: read the Secret, renew what needs it, write it back (or adopt a concurrent
/// writer's), put the bundle in both webhook configurations, and the serving pair in the files.
pub async fn reconcile(
    client: &kube::Client,
    cfg: &CertConfig,
    now: OffsetDateTime,
) -> Result<Material, CertError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &cfg.namespace);
    let existing = bounded("read the certificate Secret", secrets.get_opt(&cfg.secret)).await?;
    let current = existing.as_ref().and_then(from_secret);
    let material = match plan(current.as_ref(), &cfg.dns_names, now)? {
        None => current.unwrap_or_else(|| unreachable!("plan makes material when there is none")),
        Some(next) => {
            let version = existing
                .as_ref()
                .and_then(|s| s.metadata.resource_version.clone());
            let secret = to_secret(&next, cfg, version.clone());
            let written = match version {
                Some(_) => {
                    secrets
                        .replace(&cfg.secret, &PostParams::default(), &secret)
                        .await
                }
                None => secrets.create(&PostParams::default(), &secret).await,
            };
            match written {
                Ok(_) => {
                    tracing::info!(secret = %cfg.secret, "webhook certificates written");
                    next
                }
                // Another replica wrote first: use what it wrote.
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    let theirs =
                        bounded("read the certificate Secret", secrets.get(&cfg.secret)).await?;
                    from_secret(&theirs).ok_or_else(|| {
                        api_err("read the certificate Secret")(
                            "incomplete after a concurrent write".into(),
                        )
                    })?
                }
                Err(e) => return Err(api_err("write the certificate Secret")(e.to_string())),
            }
        }
    };
    let bundle = ByteString(material.bundle().into_bytes());
    let name = &cfg.webhook_configuration;
    publish::<MutatingWebhookConfiguration>(client, name, &bundle, |c| {
        c.webhooks
            .iter_mut()
            .flatten()
            .map(|w| &mut w.client_config)
            .collect()
    })
    .await?;
    publish::<ValidatingWebhookConfiguration>(client, name, &bundle, |c| {
        c.webhooks
            .iter_mut()
            .flatten()
            .map(|w| &mut w.client_config)
            .collect()
    })
    .await?;
    write_if_changed(&cfg.cert_path, &material.cert)?;
    write_if_changed(&cfg.key_path, &material.key)?;
    Ok(material)
}

/// Writes the CA bundle into every entry of one webhook configuration, if it differs. Returns
/// whether the configuration exists (it may not yet: the chart may still be installing). A
/// concurrent writer (another replica) makes it read again and retry.
async fn publish<K>(
    client: &kube::Client,
    name: &str,
    bundle: &ByteString,
    entries: impl Fn(&mut K) -> Vec<&mut WebhookClientConfig>,
) -> Result<bool, CertError>
where
    K: kube::Resource<Scope = k8s_openapi::ClusterResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let what = K::kind(&K::DynamicType::default()).into_owned();
    let api: Api<K> = Api::all(client.clone());
    for _ in 0..5 {
        let Some(mut config) = bounded(&format!("read the {what}"), api.get_opt(name)).await?
        else {
            return Ok(false);
        };
        let mut configs = entries(&mut config);
        if configs.iter().all(|c| c.ca_bundle.as_ref() == Some(bundle)) {
            return Ok(true);
        }
        configs
            .iter_mut()
            .for_each(|c| c.ca_bundle = Some(bundle.clone()));
        drop(configs);
        match tokio::time::timeout(
            API_TIMEOUT,
            api.replace(name, &PostParams::default(), &config),
        )
        .await
        {
            Ok(Ok(_)) => return Ok(true),
            Ok(Err(kube::Error::Api(e))) if e.code == 409 => continue,
            Ok(Err(e)) => return Err(api_err(&format!("write the {what}"))(e.to_string())),
            Err(_) => return Err(api_err(&format!("write the {what}"))("timed out".into())),
        }
    }
    Err(api_err(&format!("write the {what}"))(
        "kept conflicting with other writers".into(),
    ))
}

fn write_if_changed(path: &std::path::Path, text: &str) -> Result<(), CertError> {
    if std::fs::read_to_string(path).ok().as_deref() == Some(text) {
        return Ok(());
    }
    let err = |source| CertError::Write {
        path: path.display().to_string(),
        source,
    };
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// Reconciles every five minutes (three reads when nothing changed), so that a re-created webhook
/// configuration gets its CA bundle soon; a failed round is retried after a minute.
pub fn spawn(client: kube::Client, cfg: CertConfig) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let wait = match reconcile(&client, &cfg, OffsetDateTime::now_utc()).await {
                Ok(_) => Duration::from_secs(300),
                Err(e) => {
                    tracing::error!(error = %e, "certificate reconcile failed");
                    Duration::from_secs(60)
                }
            };
            tokio::time::sleep(wait).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        vec!["agentvm.agentvm-system.svc".into()]
    }

    #[test]
    fn plans_renewal_and_rotation_with_overlap() {
        let t0 = OffsetDateTime::now_utc();
        let first = plan(None, &names(), t0).unwrap().unwrap();
        assert!(plan(Some(&first), &names(), t0 + time::Duration::days(30))
            .unwrap()
            .is_none());
        let renewed = plan(Some(&first), &names(), t0 + time::Duration::days(250))
            .unwrap()
            .unwrap();
        assert_eq!(renewed.ca_cert, first.ca_cert, "same CA");
        assert_ne!(renewed.cert, first.cert);
        let rotated = plan(
            Some(&first),
            &names(),
            t0 + time::Duration::days(4 * 365 + 10),
        )
        .unwrap()
        .unwrap();
        assert_ne!(rotated.ca_cert, first.ca_cert);
        assert_eq!(
            rotated.old_ca.as_ref().unwrap().0,
            first.ca_cert,
            "old CA kept in the bundle"
        );
        assert!(
            rotated.bundle().contains(&first.ca_cert)
                && rotated.bundle().contains(&rotated.ca_cert)
        );
        let after = plan(
            Some(&rotated),
            &names(),
            t0 + time::Duration::days(5 * 365 + 1),
        )
        .unwrap()
        .unwrap();
        assert!(after.old_ca.is_none(), "the expired CA leaves the bundle");
        let other = plan(Some(&first), &["x.y.svc".to_owned()], t0)
            .unwrap()
            .unwrap();
        assert_eq!(other.dns_names, ["x.y.svc"]);
        // Each serving certificate verifies against the bundle published at its time.
        for (m, when) in [
            (&first, t0),
            (&renewed, t0 + time::Duration::days(250)),
            (&rotated, t0 + time::Duration::days(4 * 365 + 10)),
        ] {
            verify(m, when);
        }
    }

    #[test]
    fn dns_names_are_checked() {
        assert!(check_names(&names()).is_ok());
        for bad in [
            vec![],
            vec!["".to_owned()],
            vec!["a..b".to_owned()],
            vec!["*.x".to_owned()],
            vec!["A.b".to_owned()],
        ] {
            assert!(check_names(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn unusable_material_is_replaced_not_trusted() {
        let t0 = OffsetDateTime::now_utc();
        let good = plan(None, &names(), t0).unwrap().unwrap();
        assert!(usable(&good, t0));
        let other = plan(None, &names(), t0).unwrap().unwrap();
        let broken = [
            Material {
                cert: "garbage".into(),
                ..good.clone()
            },
            Material {
                ca_key: "not a key".into(),
                ..good.clone()
            },
            Material {
                ca_key: other.ca_key.clone(),
                ..good.clone()
            },
            Material {
                key: other.key.clone(),
                ..good.clone()
            },
            Material {
                ca_cert: other.ca_cert.clone(),
                ..good.clone()
            },
        ];
        for (i, m) in broken.iter().enumerate() {
            assert!(!usable(m, t0), "case {i} passed as usable");
            let next = plan(Some(m), &names(), t0).unwrap().expect("replaced");
            assert!(usable(&next, t0), "case {i}: the replacement is usable");
        }
    }

    fn verify(m: &Material, when: OffsetDateTime) {
        use rustls::client::danger::ServerCertVerifier;
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(m.bundle().as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            agentvm_common::tls::provider(),
        )
        .build()
        .unwrap();
        let cert = CertificateDer::from_pem_slice(m.cert.as_bytes()).unwrap();
        let name = ServerName::try_from("agentvm.agentvm-system.svc").unwrap();
        let at = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            when.unix_timestamp() as u64
        ));
        verifier
            .verify_server_cert(&cert, &[], &name, &[], at)
            .unwrap();
    }
}
