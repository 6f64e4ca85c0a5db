//! TLS termination on the `--tls-listen` listeners. Certificates, keys and
//! the client CA are PEM files, read at start (a bad one stops umbra with
//! the reason) and again on every reload, as nginx re-reads them on SIGHUP;
//! a reload that cannot read them keeps the ones in use. ALPN offers `h2`
//! and `http/1.1`.
//!
//! With several certificates, the client's SNI picks the first whose
//! names cover it (wildcards included), as nginx picks a `server` by
//! `server_name` and Envoy a filter chain by `server_names`; the first
//! certificate serves everything else, clients without SNI included.
//! With `--tls-client-ca`, clients are asked for a certificate and it must
//! chain to that CA (unless `--tls-client-optional` and they send none).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::HeaderValue;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};

/// What the TLS listeners are told to present and ask for.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Certificate chain and key files, in order; the first is the default.
    pub identities: Vec<(PathBuf, PathBuf)>,
    /// CA bundle client certificates must chain to.
    pub client_ca: Option<PathBuf>,
    /// A client may send no certificate at all.
    pub client_optional: bool,
}

impl Settings {
    /// One certificate, no client certificates asked for.
    pub fn one(cert: &Path, key: &Path) -> Settings {
        Settings {
            identities: vec![(cert.to_path_buf(), key.to_path_buf())],
            client_ca: None,
            client_optional: false,
        }
    }
}

/// The TLS listeners' configuration, swapped on reload.
pub struct Termination {
    settings: Settings,
    config: ArcSwap<ServerConfig>,
}

impl Termination {
    /// Reads every file; the error says which one is wrong and how.
    pub fn load(settings: Settings) -> Result<Termination, String> {
        let config = server_config(&settings)?;
        Ok(Termination {
            settings,
            config: ArcSwap::from_pointee(config),
        })
    }

    /// Re-reads the files; on error the configuration in use stays.
    pub fn reload(&self) -> Result<(), String> {
        let config = server_config(&self.settings)?;
        self.config.store(Arc::new(config));
        Ok(())
    }

    /// For one connection: the configuration in use when it arrived.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.load_full())
    }

    /// The files it reads, to watch for rotation.
    pub fn files(&self) -> Vec<PathBuf> {
        let identities = self.settings.identities.iter();
        (identities.flat_map(|(cert, key)| [cert.clone(), key.clone()]))
            .chain(self.settings.client_ca.clone())
            .collect()
    }

    /// Whether clients are asked for certificates: requests then carry
    /// `x-forwarded-client-cert` as umbra sets it, never as the client sent it.
    pub fn verifies_clients(&self) -> bool {
        self.settings.client_ca.is_some()
    }
}

/// The `x-forwarded-client-cert` value for a verified client certificate,
/// as Envoy sets it with `forward_client_cert_details: SANITIZE_SET`: the
/// SHA-256 of the leaf certificate's DER, in hex.
pub fn client_cert_header(leaf: &CertificateDer<'_>) -> Option<HeaderValue> {
    let digest = ring::digest::digest(&ring::digest::SHA256, leaf.as_ref());
    let mut value = String::with_capacity(5 + 64);
    value.push_str("Hash=");
    for byte in digest.as_ref() {
        value.push_str(&format!("{byte:02x}"));
    }
    HeaderValue::try_from(value).ok()
}

fn server_config(settings: &Settings) -> Result<ServerConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let identities = (settings.identities.iter())
        .map(|(cert, key)| certified_key(cert, key, &provider).map(Arc::new))
        .collect::<Result<Vec<_>, _>>()?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match &settings.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in read_chain(ca, "--tls-client-ca")? {
                roots.add(cert).map_err(|e| {
                    format!(
                        "--tls-client-ca {}: {e}; give the CA certificates as PEM",
                        ca.display()
                    )
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if settings.client_optional {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            let verifier = verifier
                .build()
                .map_err(|e| format!("--tls-client-ca {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(BySni(identities)));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

fn read_chain(path: &Path, flag: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect())
        .map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "{flag} {}: no PEM certificate in it; give PEM `-----BEGIN CERTIFICATE-----` blocks{}",
            path.display(),
            if flag == "--tls-cert" {
                ", leaf first"
            } else {
                ""
            }
        ));
    }
    Ok(chain)
}

fn certified_key(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, String> {
    let chain = read_chain(cert, "--tls-cert")?;
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        format!(
            "--tls-key {}: {e}; give a PEM private key (PKCS#8, PKCS#1 or SEC1)",
            key.display()
        )
    })?;
    CertifiedKey::from_der(chain, der, provider).map_err(|e| {
        format!(
            "--tls-cert {} and --tls-key {} do not go together: {e}",
            cert.display(),
            key.display()
        )
    })
}

/// Picks a certificate by the client's SNI: the first that covers the
/// name, else the first of all.
struct BySni(Vec<Arc<CertifiedKey>>);

impl BySni {
    fn covers(identity: &CertifiedKey, name: &ServerName<'_>) -> bool {
        (identity.end_entity_cert().ok())
            .and_then(|der| webpki::EndEntityCert::try_from(der).ok())
            .is_some_and(|leaf| leaf.verify_is_valid_for_subject_name(name).is_ok())
    }
}

impl ResolvesServerCert for BySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let (default, _) = self.0.split_first()?;
        if self.0.len() == 1 {
            return Some(default.clone());
        }
        let name = hello
            .server_name()
            .and_then(|name| ServerName::try_from(name).ok());
        let chosen = name.and_then(|name| self.0.iter().find(|id| BySni::covers(id, &name)));
        Some(chosen.unwrap_or(default).clone())
    }
}

impl fmt::Debug for BySni {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BySni({} certificates)", self.0.len())
    }
}
