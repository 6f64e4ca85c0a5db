//! TLS termination on the `--tls-listen` listeners. Certificates, keys and
//! the client CA are PEM files, read at start (a bad one stops umbra with
//! the reason) and again on every reload, as nginx re-reads them on SIGHUP;
//! a reload that cannot read them keeps the ones in use. ALPN offers `h2`
//! and `http/1.1`.
//!
//! With several certificates, the client's SNI picks one by the DNS names
//! in their subjectAltName ([`BySni`]); the first certificate serves
//! everything else, clients without SNI included.
//! With `--tls-client-ca`, clients are asked for a certificate and it must
//! chain to that CA (unless `--tls-client-optional` and they send none).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::HeaderValue;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
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
    /// Revocation lists client certificates are checked against.
    pub client_crl: Option<PathBuf>,
    /// A client may send no certificate at all.
    pub client_optional: bool,
}

impl Settings {
    /// One certificate, no client certificates asked for.
    pub fn one(cert: &Path, key: &Path) -> Settings {
        Settings {
            identities: vec![(cert.to_path_buf(), key.to_path_buf())],
            client_ca: None,
            client_crl: None,
            client_optional: false,
        }
    }
}

/// A TLS file umbra cannot use: which flag and file, what is wrong, and
/// what to give instead.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{flag} {}: {source}", path.display())]
    Read {
        flag: &'static str,
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{flag} {}: no PEM certificate in it; give PEM `-----BEGIN CERTIFICATE-----` blocks", path.display())]
    NoCertificate { flag: &'static str, path: PathBuf },
    #[error("--tls-key {}: {source}; give a PEM private key (PKCS#8, PKCS#1 or SEC1)", path.display())]
    Key {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("--tls-cert {} and --tls-key {} do not go together ({source}): give the private key the certificate was issued for", cert.display(), key.display())]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    #[error("--tls-client-ca {}: {reason}; give the CA certificates clients' certificates chain to", path.display())]
    ClientCa { path: PathBuf, reason: String },
    #[error("--tls-client-crl {}: {reason}; give the PEM revocation lists (`-----BEGIN X509 CRL-----` blocks) of the CAs clients' certificates chain to", path.display())]
    ClientCrl { path: PathBuf, reason: String },
    #[error("TLS settings: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The TLS listeners' configuration, swapped on reload.
pub struct Termination {
    settings: Settings,
    config: ArcSwap<ServerConfig>,
}

impl Termination {
    /// Reads every file; the error says which one is wrong and how.
    pub fn load(settings: Settings) -> Result<Termination, TlsError> {
        let config = server_config(&settings)?;
        Ok(Termination {
            settings,
            config: ArcSwap::from_pointee(config),
        })
    }

    /// Re-reads the files, for [`Termination::install`].
    pub fn read(&self) -> Result<ServerConfig, TlsError> {
        server_config(&self.settings)
    }

    /// Serves new connections with `config`; those open keep theirs.
    pub fn install(&self, config: ServerConfig) {
        self.config.store(Arc::new(config));
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
            .chain(self.settings.client_crl.clone())
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
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    HeaderValue::try_from(format!("Hash={hex}")).ok()
}

fn server_config(settings: &Settings) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let identities = (settings.identities.iter())
        .map(|(cert, key)| certified_key(cert, key, &provider).map(Arc::new))
        .collect::<Result<Vec<_>, _>>()?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match &settings.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let unusable = |reason: String| TlsError::ClientCa {
                path: ca.clone(),
                reason,
            };
            let mut roots = RootCertStore::empty();
            for cert in read_chain(ca, "--tls-client-ca")? {
                let added = roots.add(cert);
                added.map_err(|e| unusable(format!("not a usable CA certificate ({e})")))?;
            }
            let crls = match &settings.client_crl {
                Some(path) => revocation_lists(path)?,
                None => Vec::new(),
            };
            // As Envoy checks a `crl`: every certificate of the chain below
            // its root; one whose status is unknown, or whose list is past
            // its `nextUpdate`, is refused.
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .with_crls(crls)
                .enforce_revocation_expiration();
            let verifier = if settings.client_optional {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            let verifier = verifier.build().map_err(|e| unusable(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let resolver = BySni::new(identities, &settings.identities);
    let mut config = builder.with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The revocation lists of `--tls-client-crl`: at least one, each one
/// rustls can check against.
fn revocation_lists(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let unusable = |reason: String| TlsError::ClientCrl {
        path: path.to_path_buf(),
        reason,
    };
    let lists: Vec<_> = CertificateRevocationListDer::pem_file_iter(path)
        .and_then(|lists| lists.collect())
        .map_err(|e| unusable(e.to_string()))?;
    if lists.is_empty() {
        return Err(unusable("no PEM revocation list in it".into()));
    }
    match lists
        .iter()
        .find_map(crate::config::tls::unusable_revocation_list)
    {
        Some(why) => Err(unusable(why)),
        None => Ok(lists),
    }
}

fn read_chain(path: &Path, flag: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect())
        .map_err(|source| TlsError::Read {
            flag,
            path: path.to_path_buf(),
            source,
        })?;
    if chain.is_empty() {
        let path = path.to_path_buf();
        return Err(TlsError::NoCertificate { flag, path });
    }
    Ok(chain)
}

fn certified_key(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain = read_chain(cert, "--tls-cert")?;
    let der = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::Key {
        path: key.to_path_buf(),
        source,
    })?;
    CertifiedKey::from_der(chain, der, provider).map_err(|source| TlsError::Mismatch {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        source,
    })
}

/// Picks a certificate by the client's SNI, as nginx picks a
/// `server_name` and Envoy a filter chain: a certificate naming it exactly
/// first, else one whose wildcard (`*.example.com`) covers it, the earlier
/// given first each time; no match (or no SNI), the first of all.
struct BySni {
    identities: Vec<Arc<CertifiedKey>>,
    /// DNS names from the certificates' subjectAltName, lowercase, to the
    /// first certificate that has each.
    exact: HashMap<String, usize>,
    /// `example.com` for `*.example.com`, likewise.
    wildcard: HashMap<String, usize>,
}

impl BySni {
    fn new(identities: Vec<Arc<CertifiedKey>>, files: &[(PathBuf, PathBuf)]) -> BySni {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for (index, identity) in identities.iter().enumerate() {
            let leaf = (identity.end_entity_cert().ok())
                .and_then(|der| webpki::EndEntityCert::try_from(der).ok());
            let names: Vec<String> = leaf
                .iter()
                .flat_map(|leaf| leaf.valid_dns_names())
                .map(str::to_ascii_lowercase)
                .collect();
            if names.is_empty() && index > 0 {
                let cert = files.get(index).map(|(cert, _)| cert.display());
                tracing::warn!(
                    cert = %cert.map(|c| c.to_string()).unwrap_or_default(),
                    "this --tls-cert has no DNS name in its subjectAltName, so no client's SNI picks it"
                );
            }
            for name in names {
                match name.strip_prefix("*.") {
                    Some(parent) => wildcard.entry(parent.to_string()).or_insert(index),
                    None => exact.entry(name).or_insert(index),
                };
            }
        }
        BySni {
            identities,
            exact,
            wildcard,
        }
    }

    fn pick(&self, name: &str) -> Option<usize> {
        let name = name.to_ascii_lowercase();
        let covering = || {
            let (_, parent) = name.split_once('.')?;
            self.wildcard.get(parent)
        };
        self.exact.get(&name).or_else(covering).copied()
    }
}

impl ResolvesServerCert for BySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let picked = hello.server_name().and_then(|name| self.pick(name));
        self.identities.get(picked.unwrap_or(0)).cloned()
    }
}

impl fmt::Debug for BySni {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BySni({} certificates)", self.identities.len())
    }
}
