//! `trafficPolicy.tls`: the TLS umbra originates to a destination, as an
//! Istio sidecar does for `SIMPLE` and `MUTUAL`. Certificates and keys are
//! files, as a sidecar reads its mounted ones (a relative path is taken from
//! the YAML file's directory); they are read and checked when the config
//! loads, so a bad file is a config error with its position, never a
//! failure on the request path.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{self, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tracing::{debug, warn};

use super::document::{Findings, Origin};
use super::istio::{ClientTlsSettings, S};
use super::model::{UpstreamProtocol, UpstreamTls};

/// Builds the TLS for a destination named `host` from the settings at
/// `field` (`spec.trafficPolicy.tls`, or a subset's). `Some(None)`:
/// plaintext (`DISABLE`); `None`: an error was reported.
pub fn origination(
    settings: &S<ClientTlsSettings>,
    host: &str,
    protocol: UpstreamProtocol,
    field: &str,
    origin: &Origin,
    findings: &mut Findings,
) -> Option<Option<Arc<UpstreamTls>>> {
    let mut errors = Vec::new();
    let mut error = |span: &marked_yaml::Span, message: String| {
        errors.push(origin.at(span, message));
    };
    let mode = match settings.mode.as_ref() {
        None => {
            let warning = origin.at(
                settings.span(),
                format!("{field} has no mode, so it is DISABLE (plaintext), as in Istio. Set `mode: SIMPLE` (or MUTUAL) to originate TLS."),
            );
            findings.warn_once(warning);
            return Some(None);
        }
        Some(mode) => mode,
    };
    let mode = match mode.to_ascii_uppercase().as_str() {
        "DISABLE" => return Some(None),
        "SIMPLE" => "SIMPLE",
        "MUTUAL" => "MUTUAL",
        "ISTIO_MUTUAL" => {
            error(
                mode.span(),
                format!("{field}.mode ISTIO_MUTUAL needs Istio's workload certificates, which umbra has no way to get. Use MUTUAL with clientCertificate, privateKey and caCertificates files."),
            );
            errors.into_iter().for_each(|e| findings.error_once(e));
            return None;
        }
        other => {
            error(
                mode.span(),
                format!("{field}.mode {other} is not valid. Use DISABLE, SIMPLE or MUTUAL."),
            );
            errors.into_iter().for_each(|e| findings.error_once(e));
            return None;
        }
    };
    if let Some(name) = &settings.credential_name {
        error(
            name.span(),
            format!("{field}.credentialName names a Kubernetes secret, which umbra cannot read. Use the file fields instead: caCertificates (and clientCertificate, privateKey for MUTUAL)."),
        );
    }
    let base = Path::new(&origin.file).parent().unwrap_or(Path::new("."));
    let mut digest = DefaultHasher::new();
    let file = |value: &S<String>| base.join(value.as_str());
    let named = [
        &settings.ca_certificates,
        &settings.ca_crl,
        &settings.client_certificate,
        &settings.private_key,
    ];
    findings.files.extend(named.into_iter().flatten().map(file));
    let insecure = settings.insecure_skip_verify.as_ref().is_some_and(|v| **v);
    let roots = match &settings.ca_certificates {
        Some(path) => match certificates(&file(path), &mut digest) {
            Ok(certs) => {
                let mut roots = RootCertStore::empty();
                let (_, unusable) = roots.add_parsable_certificates(certs);
                if roots.is_empty() {
                    error(
                        path.span(),
                        format!("{field}.caCertificates \"{}\": none of its {unusable} certificates can be used as a trust anchor. Point it at a PEM bundle of CA certificates.", path.as_str()),
                    );
                }
                roots
            }
            Err(why) => {
                error(path.span(), format!("{field}.caCertificates {why}"));
                RootCertStore::empty()
            }
        },
        // Nothing is checked against them.
        None if insecure => RootCertStore::empty(),
        None => system_roots().clone(),
    };
    let crls = match &settings.ca_crl {
        Some(path) if !insecure => revocation_lists(&file(path), &mut digest)
            .map_err(|why| error(path.span(), format!("{field}.caCrl {why}")))
            .unwrap_or_default(),
        _ => Vec::new(),
    };
    let identity = match (mode, &settings.client_certificate, &settings.private_key) {
        ("MUTUAL", Some(cert), Some(key)) => {
            let certs = certificates(&file(cert), &mut digest)
                .map_err(|why| error(cert.span(), format!("{field}.clientCertificate {why}")));
            let key = read(&file(key), &mut digest)
                .and_then(|bytes| {
                    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
                        format!(
                            "\"{}\": {e}. Point it at a PEM private key (PKCS#8, PKCS#1 or SEC1).",
                            file(key).display()
                        )
                    })
                })
                .map_err(|why| error(key.span(), format!("{field}.privateKey {why}")));
            certs.ok().zip(key.ok())
        }
        ("MUTUAL", _, _) => {
            error(
                settings.span(),
                format!("{field}.mode MUTUAL needs both clientCertificate and privateKey. Set them to PEM files, or use mode SIMPLE."),
            );
            None
        }
        _ => None,
    };
    let names = |value: &S<String>| {
        ServerName::try_from(value.as_str().to_string()).map_err(|_| {
            format!("\"{}\" is not a DNS name or IP address, the only names umbra can check a certificate for. Use one.", value.as_str())
        })
    };
    let sni = match &settings.sni {
        Some(sni) => names(sni)
            .map_err(|why| error(sni.span(), format!("{field}.sni {why}")))
            .ok(),
        None => ServerName::try_from(host.to_string()).ok().or_else(|| {
            error(
                settings.span(),
                format!(
                    "destination host \"{host}\" is not a DNS name to send as SNI. Set tls.sni."
                ),
            );
            None
        }),
    };
    let mut alt_names = Vec::new();
    for name in &settings.subject_alt_names {
        match names(name) {
            Ok(parsed) => alt_names.push(parsed),
            Err(why) => error(name.span(), format!("{field}.subjectAltNames {why}")),
        }
    }
    if !errors.is_empty() {
        errors.into_iter().for_each(|e| findings.error_once(e));
        return None;
    }
    let server_name = sni?;
    if let (true, Some(crl)) = (insecure, &settings.ca_crl) {
        findings.warn_once(origin.at(
            crl.span(),
            format!("{field}.caCrl is not checked: insecureSkipVerify accepts any certificate. Remove one of the two."),
        ));
    }
    let verify = match insecure {
        true => Verify::Nothing,
        false => Verify::Chain {
            roots,
            alt_names,
            crls,
        },
    };
    let client = match client_config(verify, identity, protocol) {
        Ok(client) => client,
        Err(why) => {
            findings.error_once(origin.at(settings.span(), format!("{field}: {why}")));
            return None;
        }
    };
    let path = |value: &Option<S<String>>| value.as_ref().map(|v| file(v).display().to_string());
    Some(Some(Arc::new(UpstreamTls {
        mode,
        sni: server_name.to_str().into_owned(),
        subject_alt_names: settings
            .subject_alt_names
            .iter()
            .map(|n| n.to_string())
            .collect(),
        ca_certificates: path(&settings.ca_certificates),
        ca_crl: path(&settings.ca_crl),
        client_certificate: path(&settings.client_certificate),
        insecure_skip_verify: insecure,
        files_digest: digest.finish(),
        client: Arc::new(client),
        server_name,
    })))
}

/// The trust store for a destination without `caCertificates`: the
/// system's, as Istio's sidecars use it (`SSL_CERT_FILE` and
/// `SSL_CERT_DIR` override where it is looked for), read once; if it holds
/// no usable certificate, the Mozilla roots built into umbra.
fn system_roots() -> &'static RootCertStore {
    static ROOTS: OnceLock<RootCertStore> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for error in &found.errors {
            debug!(%error, "a system CA certificate could not be read");
        }
        let mut roots = RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            warn!("no usable CA certificate in the system's trust store: destinations without caCertificates trust the Mozilla roots built into umbra");
            return RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            };
        }
        debug!(added, "system CA certificates read");
        roots
    })
}

/// How the server's certificate is checked.
enum Verify {
    /// `insecureSkipVerify`.
    Nothing,
    /// Against `roots`, for the SNI or (if any) one of `alt_names`; with
    /// `crls`, every certificate of the chain below its root must be on a
    /// list not past its `nextUpdate`, and not revoked (as Envoy checks a
    /// `crl`).
    Chain {
        roots: RootCertStore,
        alt_names: Vec<ServerName<'static>>,
        crls: Vec<CertificateRevocationListDer<'static>>,
    },
}

fn client_config(
    verify: Verify,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    protocol: UpstreamProtocol,
) -> Result<ClientConfig, String> {
    let provider = Arc::new(crypto::ring::default_provider());
    let (webpki, names) = match verify {
        Verify::Nothing => (None, Vec::new()),
        Verify::Chain {
            roots,
            alt_names,
            crls,
        } => {
            let webpki =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .with_crls(crls)
                    .enforce_revocation_expiration()
                    .build()
                    .map_err(|e| {
                        format!("the CA certificates cannot be used ({e}). Check caCertificates.")
                    })?;
            (Some(webpki), alt_names)
        }
    };
    let verifier = Arc::new(Verifier {
        webpki,
        names,
        algorithms: provider.signature_verification_algorithms,
    });
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut client = match identity {
        Some((certs, key)) => builder.with_client_auth_cert(certs, key).map_err(|e| {
            format!("clientCertificate and privateKey do not go together ({e}). Use the key of that certificate.")
        })?,
        None => builder.with_no_client_auth(),
    };
    client.alpn_protocols = vec![match protocol {
        UpstreamProtocol::Http1 => b"http/1.1".to_vec(),
        UpstreamProtocol::Http2 => b"h2".to_vec(),
    }];
    Ok(client)
}

/// The bytes of a file the settings name, folded into `digest`.
fn read(path: &Path, digest: &mut DefaultHasher) -> Result<Vec<u8>, String> {
    let bytes = std::fs::read(path).map_err(|e| {
        format!(
            "\"{}\": {e}. Point it at a readable PEM file.",
            path.display()
        )
    })?;
    bytes.hash(digest);
    Ok(bytes)
}

/// The certificates of a PEM file, or why there are none.
fn certificates(
    path: &Path,
    digest: &mut DefaultHasher,
) -> Result<Vec<CertificateDer<'static>>, String> {
    pem_blocks(path, digest, "certificate", "CERTIFICATE")
}

/// The certificate revocation lists of a PEM file, or why there are none.
fn revocation_lists(
    path: &Path,
    digest: &mut DefaultHasher,
) -> Result<Vec<CertificateRevocationListDer<'static>>, String> {
    let lists = pem_blocks(path, digest, "revocation list", "X509 CRL")?;
    match lists.iter().find_map(|list| unusable_revocation_list(list)) {
        Some(why) => Err(format!(
            "\"{}\": {why}. Point it at the issuer's revocation lists in PEM.",
            path.display()
        )),
        None => Ok(lists),
    }
}

/// Why a PEM block labelled as a revocation list is not one rustls can
/// check certificates against, if it is not.
pub fn unusable_revocation_list(list: &CertificateRevocationListDer<'_>) -> Option<String> {
    webpki::OwnedCertRevocationList::from_der(list.as_ref())
        .err()
        .map(|e| format!("not a valid DER revocation list ({e})"))
}

/// The `-----BEGIN {label}-----` blocks of a PEM file: at least one.
fn pem_blocks<T: PemObject>(
    path: &Path,
    digest: &mut DefaultHasher,
    what: &str,
    label: &str,
) -> Result<Vec<T>, String> {
    let bytes = read(path, digest)?;
    let shown = path.display();
    match T::pem_slice_iter(&bytes).collect::<Result<Vec<_>, _>>() {
        Ok(blocks) if !blocks.is_empty() => Ok(blocks),
        Ok(_) => Err(format!("\"{shown}\" holds no PEM {what}. Point it at a PEM file with `-----BEGIN {label}-----` blocks.")),
        Err(e) => Err(format!("\"{shown}\": {e}. Fix the PEM file.")),
    }
}

/// How umbra checks an upstream's certificate: the chain against the
/// trusted roots, and the name (the SNI, or any one of `subjectAltNames`);
/// with `insecureSkipVerify`, nothing but the handshake's signatures.
#[derive(Debug)]
struct Verifier {
    /// `None`: `insecureSkipVerify`.
    webpki: Option<Arc<WebPkiServerVerifier>>,
    /// `subjectAltNames`; empty: the SNI.
    names: Vec<ServerName<'static>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        sni: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(webpki) = &self.webpki else {
            return Ok(ServerCertVerified::assertion());
        };
        if self.names.is_empty() {
            return webpki.verify_server_cert(end_entity, intermediates, sni, ocsp, now);
        }
        let mut last = None;
        for name in &self.names {
            match webpki.verify_server_cert(end_entity, intermediates, name, ocsp, now) {
                Ok(verified) => return Ok(verified),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(rustls::Error::General("no subjectAltNames".into())))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
