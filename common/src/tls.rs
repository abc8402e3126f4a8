//! TLS for the HTTPS servers: rustls with the `ring` provider (the only crypto provider in the
//! dependency tree), a serving certificate read from PEM files and reloaded when they change.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::reload::{spawn_watch, ReloadEvent, Reloadable};

/// Why a certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate file could not be read or holds no PEM certificate.
    #[error("cannot load certificate {path}: {message}")]
    Cert {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// The key file could not be read, holds no PEM key, or the key type is unsupported.
    #[error("cannot load private key {path}: {message}")]
    Key {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// The key does not belong to the certificate, or rustls refused the configuration.
    #[error("invalid TLS configuration: {0}")]
    Config(String),
}

/// The crypto provider used everywhere in agentvm.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs [`provider`] as the process default, for libraries that ask rustls for it.
pub fn install_default_provider() {
    // Already installed (by a previous call) is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Reads a certificate chain and its private key from PEM files.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let cert_err = |message: String| TlsError::Cert {
        path: cert.display().to_string(),
        message,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| cert_err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| cert_err(e.to_string()))?;
    if chain.is_empty() {
        return Err(cert_err("no PEM certificate in the file".into()));
    }
    let key_err = |message: String| TlsError::Key {
        path: key.display().to_string(),
        message,
    };
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| key_err(e.to_string()))?;
    let signing = provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| key_err(e.to_string()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|e| TlsError::Config(format!("{e} (certificate {})", cert.display())))?;
    Ok(certified)
}

/// Serves the current certificate and swaps in a new one when the files change.
#[derive(Debug)]
pub struct ReloadingCert {
    current: Arc<Reloadable<Arc<CertifiedKey>>>,
}

impl ReloadingCert {
    /// Loads the certificate now (an error stops start-up) and, when `interval` is given,
    /// watches both files; a bad new pair is logged and the previous one stays in force.
    /// Watching needs a Tokio runtime.
    pub fn new(cert: PathBuf, key: PathBuf, interval: Option<Duration>) -> Result<Self, TlsError> {
        let first = Arc::new(load_certified_key(&cert, &key)?);
        let current = Arc::new(Reloadable::new(first));
        if let Some(interval) = interval {
            let (c, k) = (cert.clone(), key.clone());
            spawn_watch(
                current.clone(),
                vec![cert, key],
                interval,
                move || load_certified_key(&c, &k).map(Arc::new),
                |event| match event {
                    ReloadEvent::Reloaded => tracing::info!("serving certificate reloaded"),
                    ReloadEvent::Rejected(e) => {
                        tracing::error!(error = %e, "new serving certificate rejected, keeping the old one");
                    }
                },
            );
        }
        Ok(Self { current })
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some((*self.current.get()).clone())
    }
}

/// A rustls server configuration (TLS 1.2 and 1.3, ALPN h2 and http/1.1) around a resolver.
pub fn server_config(
    resolver: Arc<dyn ResolvesServerCert>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_a_generated_pair_and_names_bad_files() {
        let dir = std::env::temp_dir().join(format!("agentvm-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        std::fs::write(dir.join("tls.crt"), ck.cert.pem()).unwrap();
        std::fs::write(dir.join("tls.key"), ck.signing_key.serialize_pem()).unwrap();
        load_certified_key(&dir.join("tls.crt"), &dir.join("tls.key")).unwrap();
        let err = load_certified_key(&dir.join("tls.key"), &dir.join("tls.key")).unwrap_err();
        assert!(err.to_string().contains("tls.key"), "{err}");
        let other = rcgen::generate_simple_self_signed(vec!["x".into()]).unwrap();
        std::fs::write(dir.join("other.key"), other.signing_key.serialize_pem()).unwrap();
        let err = load_certified_key(&dir.join("tls.crt"), &dir.join("other.key")).unwrap_err();
        assert!(matches!(err, TlsError::Config(_)), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
