//! TLS origination (`DestinationRule` `trafficPolicy.tls`): primaries and
//! shadows reach TLS backends, certificates are checked as configured, and
//! a failed handshake is a clear 502, never a plaintext request.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType, IsCa, Issuer,
    KeyIdMethod, KeyPair, RevocationReason, RevokedCertParams, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use umbra::server::tls::Settings;

use crate::support::*;

/// A throwaway CA, its certificate and the ones it issues written to a
/// temporary directory.
struct Pki {
    dir: tempfile::TempDir,
    issuer: Issuer<'static, KeyPair>,
    /// The root: what `ca_file` holds and clients trust.
    ca: CertificateDer<'static>,
    /// The CA certificates between the issuer and the root, the issuer's
    /// first: empty for the root itself.
    above: Vec<CertificateDer<'static>>,
}

/// A certificate the CA issued, with its key, in memory and on disk.
struct Issued {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    cert_file: PathBuf,
    key_file: PathBuf,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let (params, key) = ca_params("root");
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.path().join("ca.pem"), cert.pem()).unwrap();
        Pki {
            dir,
            ca: cert.der().clone(),
            issuer: Issuer::new(params, key),
            above: Vec::new(),
        }
    }

    /// A CA this one certifies, named `name`: what it issues chains up
    /// through it to this one's root (which its `ca_file` holds).
    fn intermediate(&self, name: &str) -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let (mut params, key) = ca_params(name);
        params.serial_number = Some(serial(name));
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        std::fs::copy(self.ca_file(), dir.path().join("ca.pem")).unwrap();
        Pki {
            dir,
            ca: self.ca.clone(),
            issuer: Issuer::new(params, key),
            above: [vec![cert.der().clone()], self.above.clone()].concat(),
        }
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A certificate for `names`, written as `<file>.pem` and `<file>.key`.
    fn issue(&self, file: &str, names: &[&str]) -> Issued {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.serial_number = Some(serial(file));
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let cert_file = self.dir.path().join(format!("{file}.pem"));
        let key_file = self.dir.path().join(format!("{file}.key"));
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        Issued {
            chain: [vec![cert.der().clone()], self.above.clone()].concat(),
            key: PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
            cert_file,
            key_file,
        }
    }

    /// A revocation list of this CA, written as `<file>.pem`, revoking the
    /// certificates issued as `revoked` (`server-<first name>` for a server).
    fn crl(&self, file: &str, revoked: &[&str]) -> PathBuf {
        self.crl_until(file, revoked, (2099, 1, 1))
    }

    /// A revocation list as `crl` makes, due for renewal on `next_update`
    /// (year, month, day).
    fn crl_until(&self, file: &str, revoked: &[&str], next_update: (i32, u8, u8)) -> PathBuf {
        let long_ago = rcgen::date_time_ymd(2025, 1, 1);
        let params = CertificateRevocationListParams {
            this_update: long_ago,
            next_update: rcgen::date_time_ymd(next_update.0, next_update.1, next_update.2),
            crl_number: SerialNumber::from(1),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|file| RevokedCertParams {
                    serial_number: serial(file),
                    revocation_time: long_ago,
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.issuer).unwrap();
        let path = self.dir.path().join(format!("{file}.pem"));
        std::fs::write(&path, crl.pem().unwrap()).unwrap();
        path
    }

    /// A server answering as `names`, offering HTTP/2 and HTTP/1.1.
    fn server(&self, names: &[&str]) -> Arc<ServerConfig> {
        self.server_with(names, false)
    }

    /// `mutual`: it demands a client certificate this CA issued.
    fn server_with(&self, names: &[&str], mutual: bool) -> Arc<ServerConfig> {
        let issued = self.issue(&format!("server-{}", names[0]), names);
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = if mutual {
            let mut roots = RootCertStore::empty();
            roots.add(self.ca.clone()).unwrap();
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder.with_single_cert(issued.chain, issued.key).unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

/// A CA's parameters, with `name` as its common name, and its key.
fn ca_params(name: &str) -> (CertificateParams, KeyPair) {
    let mut params = CertificateParams::new(Vec::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    (params, KeyPair::generate().unwrap())
}

/// The serial number of the certificate issued as `file`, so that a
/// revocation list can name it.
fn serial(file: &str) -> SerialNumber {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut hasher = DefaultHasher::new();
    file.hash(&mut hasher);
    SerialNumber::from(hasher.finish() >> 1)
}

/// `httpbin` with its v1 and v2 endpoints, its port's `protocol`, and a
/// DestinationRule whose rule-level policy is `tls` (YAML flow mapping)
/// and whose v2 subset's is `v2_tls`.
fn tls_config(v1: u16, v2: u16, protocol: &str, tls: &str, v2_tls: &str) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: httpbin}}
spec:
  hosts: [httpbin]
  ports: [{{number: 8443, name: https, protocol: {protocol}}}]
  resolution: STATIC
  endpoints:
  - {{address: 127.0.0.1, ports: {{https: {v1}}}, labels: {{version: v1}}}}
  - {{address: 127.0.0.1, ports: {{https: {v2}}}, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: httpbin}}
spec:
  host: httpbin
  trafficPolicy:
    connectionPool: {{http: {{maxRequestsPerConnection: 100}}}}
    tls: {tls}
  subsets:
  - name: v1
    labels: {{version: v1}}
  - name: v2
    labels: {{version: v2}}
    trafficPolicy:
      tls: {v2_tls}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: httpbin}}
spec:
  hosts: [httpbin]
  http:
  - route: [{{destination: {{host: httpbin, subset: v1}}}}]
    mirror: {{host: httpbin, subset: v2}}
    mirrorPercentage: {{value: 100}}
"#
    )
}

fn simple(ca: &Path, sni: &str) -> String {
    format!(
        "{{mode: SIMPLE, caCertificates: {}, sni: {sni}}}",
        ca.display()
    )
}

/// umbra sending to `v1` and mirroring to `v2` over `protocol`, both
/// checked against `pki`'s CA as `v1.test` and `v2.test`.
async fn verified(pki: &Pki, v1: &Backend, v2: &Backend, protocol: &str) -> Umbra {
    let ca = pki.ca_file();
    let (tls, v2_tls) = (simple(&ca, "v1.test"), simple(&ca, "v2.test"));
    Umbra::start(&tls_config(v1.port(), v2.port(), protocol, &tls, &v2_tls)).await
}

#[tokio::test]
async fn primaries_and_shadows_reach_tls_backends_with_their_own_sni() {
    let pki = Pki::new();
    let v1 = Backend::tls("v1", pki.server(&["v1.test"])).await;
    let v2 = Backend::tls("v2", pki.server(&["v2.test"])).await;
    // The rule's tls names v1; the v2 subset's own replaces it, while the
    // rule's connectionPool still applies to both (Istio merges sections).
    let umbra = verified(&pki, &v1, &v2, "HTTP").await;
    for _ in 0..3 {
        let (status, headers, body) = fetch(&umbra.url("/get"), "httpbin").await;
        assert_eq!(status, 200);
        assert_eq!(headers["x-backend"], "v1");
        assert_eq!(body, "v1");
    }
    let primaries = v1.wait_for(3).await;
    let tls = primaries[0].tls.as_ref().expect("v1 was reached over TLS");
    assert_eq!(tls.sni.as_deref(), Some("v1.test"));
    assert_eq!(tls.alpn.as_deref(), Some("http/1.1"));
    assert!(!tls.client_certificate, "SIMPLE presents no certificate");
    assert_eq!(
        v1.connections(),
        1,
        "one pooled TLS connection carried all three"
    );

    let shadows = v2.wait_for(3).await;
    assert_eq!(shadows[0].header("host"), Some("httpbin-shadow"));
    let tls = shadows[0].tls.as_ref().expect("v2 was reached over TLS");
    assert_eq!(tls.sni.as_deref(), Some("v2.test"));

    let config = umbra::config::load(&[&umbra.config_file]).unwrap();
    let route = &config.virtual_services[0].routes[0];
    let v1_destination = &route.destinations[0].destination;
    assert_eq!(v1_destination.pool.max_requests_per_connection, Some(100));
    assert_eq!(
        route.mirrors[0]
            .destination
            .pool
            .max_requests_per_connection,
        Some(100)
    );
}

#[tokio::test]
async fn a_certificate_the_ca_did_not_sign_is_refused_with_a_502() {
    let trusted = Pki::new();
    let stranger = Pki::new();
    let v1 = Backend::tls("v1", stranger.server(&["v1.test"])).await;
    let v2 = Backend::tls("v2", trusted.server(&["v2.test"])).await;
    let yaml = tls_config(
        v1.port(),
        v2.port(),
        "HTTP",
        &simple(&trusted.ca_file(), "v1.test"),
        &simple(&trusted.ca_file(), "v2.test"),
    );
    let umbra = Umbra::start(&yaml).await;
    let (status, headers, _) = fetch(&umbra.url("/get"), "httpbin").await;
    assert_eq!(status, 502);
    assert_eq!(headers["x-umbra-error"], "upstream_connect_failure");
    assert_eq!(v1.count(), 0, "nothing reached the untrusted server");
    // The shadow's own handshake is fine: mirroring does not depend on v1.
    v2.wait_for(1).await;
}

#[tokio::test]
async fn insecure_skip_verify_accepts_any_certificate() {
    let trusted = Pki::new();
    let stranger = Pki::new();
    let v1 = Backend::tls("v1", stranger.server(&["v1.test"])).await;
    let v2 = Backend::tls("v2", stranger.server(&["v2.test"])).await;
    // A revocation list would refuse the stranger's chain if anything were
    // checked: nothing is, so the list is not even read (it is not there),
    // and the config says so.
    let crl = trusted.dir.path().join("not-there.pem");
    let skip = format!(
        "{{mode: SIMPLE, sni: anything.test, insecureSkipVerify: true, caCrl: {}}}",
        crl.display()
    );
    let checked = simple(&trusted.ca_file(), "v2.test");
    let yaml = tls_config(v1.port(), v2.port(), "HTTP", &skip, &checked);
    let umbra = Umbra::start(&yaml).await;
    let config = umbra::config::load(&[&umbra.config_file]).unwrap();
    let warnings: Vec<String> = config.warnings.iter().map(ToString::to_string).collect();
    assert!(
        warnings.iter().any(|w| w.ends_with(
            "spec.trafficPolicy.tls.caCrl is not checked: insecureSkipVerify accepts any certificate. Remove one of the two."
        )),
        "{warnings:?}"
    );
    let (status, _, body) = fetch(&umbra.url("/get"), "httpbin").await;
    assert_eq!((status.as_u16(), &body[..]), (200, &b"v1"[..]));
    assert_eq!(
        v1.received()[0].tls.as_ref().unwrap().sni.as_deref(),
        Some("anything.test")
    );
    // v2 keeps its own, checked, policy: its shadows fail the handshake.
    umbra
        .wait_metric("umbra_mirror_requests_total", &[("outcome", "failed")], 1.0)
        .await;
    assert_eq!(v2.count(), 0);
}

/// `SIMPLE` against `pki`'s CA with the revocation list `crl`.
fn revocation_checked(pki: &Pki, crl: &Path, sni: &str) -> String {
    format!(
        "{{mode: SIMPLE, caCertificates: {}, caCrl: {}, sni: {sni}}}",
        pki.ca_file().display(),
        crl.display()
    )
}

/// Starts umbra checking v1 against the list `v1_crl` and v2 against
/// `v2_crl`, both from `pki`; asserts v1 is refused at the handshake and
/// returns what reached v2, the shadow.
async fn v1_refused_shadow_delivered(pki: &Pki, v1_crl: &Path, v2_crl: &Path) -> Vec<Recorded> {
    let v1 = Backend::tls("v1", pki.server(&["v1.test"])).await;
    let v2 = Backend::tls("v2", pki.server(&["v2.test"])).await;
    let (tls, v2_tls) = (
        revocation_checked(pki, v1_crl, "v1.test"),
        revocation_checked(pki, v2_crl, "v2.test"),
    );
    let umbra = Umbra::start(&tls_config(v1.port(), v2.port(), "HTTP", &tls, &v2_tls)).await;
    let (status, headers, _) = fetch(&umbra.url("/get"), "httpbin").await;
    assert_eq!(status, 502);
    assert_eq!(headers["x-umbra-error"], "upstream_connect_failure");
    assert_eq!(v1.count(), 0, "nothing reached v1");
    v2.wait_for(1).await
}

#[tokio::test]
async fn a_revoked_server_certificate_is_refused_and_one_on_the_list_unrevoked_is_not() {
    let pki = Pki::new();
    let crl = pki.crl("crl", &["server-v1.test"]);
    // v2's certificate comes from the same CA, whose list does not revoke it.
    let shadows = v1_refused_shadow_delivered(&pki, &crl, &crl).await;
    assert_eq!(shadows[0].header("host"), Some("httpbin-shadow"));
}

#[tokio::test]
async fn a_chain_its_revocation_list_does_not_cover_is_refused_as_envoy_does() {
    let pki = Pki::new();
    // v1's list is another CA's: its certificate's status is unknown.
    let other = Pki::new();
    let foreign = other.crl("foreign", &[]);
    let own = pki.crl("own", &[]);
    v1_refused_shadow_delivered(&pki, &foreign, &own).await;
}

/// Every certificate below the root must be on a list from its issuer, as
/// Envoy checks the whole chain: with the root's list alone (which covers
/// the intermediate) the leaf's status is unknown and the chain refused;
/// with the intermediate's list too it passes, unless the root's list
/// revokes the intermediate.
#[tokio::test]
async fn every_certificate_below_the_root_needs_its_issuers_list() {
    let root = Pki::new();
    let middle = root.intermediate("middle");
    let root_only = root.crl("root-crl", &[]);
    let lists = |file: &str, root_list: &Path| {
        let path = middle.dir.path().join(file);
        let middle_list = std::fs::read(middle.crl("middle-crl", &[])).unwrap();
        std::fs::write(
            &path,
            [std::fs::read(root_list).unwrap(), middle_list].concat(),
        )
        .unwrap();
        path
    };
    let both = lists("both.pem", &root_only);
    v1_refused_shadow_delivered(&middle, &root_only, &both).await;
    // And the intermediate's revocation counts, not only the leaf's.
    let middle_revoked = lists("middle-revoked.pem", &root.crl("root-crl-2", &["middle"]));
    v1_refused_shadow_delivered(&middle, &middle_revoked, &both).await;

    // A client certificate at the listener, likewise.
    let v1 = Backend::echo("v1").await;
    let client = middle.issue("client", &["client.test"]);
    for (list, served) in [(&root_only, false), (&both, true)] {
        let umbra = checking_clients(&root, &v1, &root.ca_file(), Some(list)).await;
        let fetched = fetch_as(umbra.tls.unwrap(), &root, &client).await;
        assert_eq!(fetched.is_ok(), served, "{list:?}: {fetched:?}");
    }
}

/// A list past its `nextUpdate` no longer vouches for anything, as in
/// Envoy (BoringSSL's "CRL has expired").
#[tokio::test]
async fn an_expired_revocation_list_refuses_the_chain() {
    let pki = Pki::new();
    let expired = pki.crl_until("expired", &[], (2025, 6, 1));
    let fresh = pki.crl("fresh", &[]);
    v1_refused_shadow_delivered(&pki, &expired, &fresh).await;
}

/// A file that is PEM but not a revocation list is a config error at
/// `caCrl`, naming the file.
#[test]
fn a_revocation_list_that_does_not_parse_is_a_config_error_at_its_field() {
    let pki = Pki::new();
    let garbage = pki.dir.path().join("garbage-crl.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
    )
    .unwrap();
    let tls = revocation_checked(&pki, &garbage, "v1.test");
    let yaml = tls_config(1, 2, "HTTP", &tls, &tls);
    let errors = umbra::config::load_str("rules.yaml", &yaml).unwrap_err();
    let first = errors.errors[0].to_string();
    let expected = format!(
        ": spec.trafficPolicy.tls.caCrl \"{}\": not a valid DER revocation list",
        garbage.display()
    );
    assert!(first.starts_with("rules.yaml:19:"), "{errors}");
    assert!(first.contains(&expected), "{errors}");
}

#[tokio::test]
async fn a_new_revocation_list_is_picked_up() {
    let pki = Pki::new();
    let v1 = Backend::tls("v1", pki.server(&["v1.test"])).await;
    let v2 = Backend::tls("v2", pki.server(&["v2.test"])).await;
    let crl = pki.crl("crl", &[]);
    let (tls, v2_tls) = (
        revocation_checked(&pki, &crl, "v1.test"),
        revocation_checked(&pki, &crl, "v2.test"),
    );
    let yaml = tls_config(v1.port(), v2.port(), "HTTP", &tls, &v2_tls);
    let umbra = Umbra::start(&yaml).await;
    let (status, _, body) = fetch(&umbra.url("/get"), "httpbin").await;
    assert_eq!((status.as_u16(), &body[..]), (200, &b"v1"[..]));

    // The CA revokes v1's certificate: same YAML, a new list renamed into
    // place. The pooled connection goes with the old destination; a new
    // handshake fails.
    umbra
        .reloads_after(|| {
            let next = pki.crl("crl-next", &["server-v1.test"]);
            std::fs::rename(next, &crl).unwrap();
        })
        .await;
    let (status, headers, _) = fetch(&umbra.url("/get"), "httpbin").await;
    assert_eq!(status, 502);
    assert_eq!(headers["x-umbra-error"], "upstream_connect_failure");
    assert_eq!(v1.count(), 1, "only the request before the revocation");
}

#[tokio::test]
async fn subject_alt_names_are_checked_instead_of_the_sni() {
    let pki = Pki::new();
    let v1 = Backend::tls("v1", pki.server(&["v1.internal"])).await;
    let v2 = Backend::tls("v2", pki.server(&["v2.internal"])).await;
    let ca = pki.ca_file();
    let by_san = format!(
        "{{mode: SIMPLE, caCertificates: {}, sni: v1.public, subjectAltNames: [other.internal, v1.internal]}}",
        ca.display()
    );
    // Without subjectAltNames, the SNI must match the certificate.
    let by_sni = simple(&ca, "v2.public");
    let yaml = tls_config(v1.port(), v2.port(), "HTTP", &by_san, &by_sni);
    let umbra = Umbra::start(&yaml).await;
    let (status, _, _) = fetch(&umbra.url("/get"), "httpbin").await;
    assert_eq!(status, 200);
    assert_eq!(
        v1.received()[0].tls.as_ref().unwrap().sni.as_deref(),
        Some("v1.public")
    );
    umbra
        .wait_metric("umbra_mirror_requests_total", &[("outcome", "failed")], 1.0)
        .await;
    assert_eq!(
        v2.count(),
        0,
        "a certificate without the SNI's name is refused"
    );
}

#[tokio::test]
async fn mutual_tls_presents_the_client_certificate() {
    let pki = Pki::new();
    let v1 = Backend::tls("v1", pki.server_with(&["v1.test"], true)).await;
    let v2 = Backend::tls("v2", pki.server_with(&["v2.test"], true)).await;
    let client = pki.issue("client", &["umbra.test"]);
    let mutual = format!(
        "{{mode: MUTUAL, caCertificates: {}, sni: v1.test, clientCertificate: {}, privateKey: {}}}",
        pki.ca_file().display(),
        client.cert_file.display(),
        client.key_file.display()
    );
    // v2 without a certificate of its own: the server turns it away.
    let yaml = tls_config(
        v1.port(),
        v2.port(),
        "HTTP",
        &mutual,
        &simple(&pki.ca_file(), "v2.test"),
    );
    let umbra = Umbra::start(&yaml).await;
    let (status, _, body) = fetch(&umbra.url("/get"), "httpbin").await;
    assert_eq!((status.as_u16(), &body[..]), (200, &b"v1"[..]));
    assert!(v1.received()[0].tls.as_ref().unwrap().client_certificate);
    umbra
        .wait_metric("umbra_mirror_requests_total", &[("outcome", "failed")], 1.0)
        .await;
    assert_eq!(v2.count(), 0);
}

#[tokio::test]
async fn http2_over_tls_negotiates_h2_with_the_https_scheme() {
    let pki = Pki::new();
    let v1 = Backend::tls("v1", pki.server(&["v1.test"])).await;
    let v2 = Backend::tls("v2", pki.server(&["v2.test"])).await;
    let umbra = verified(&pki, &v1, &v2, "HTTP2").await;
    let (status, _, body) = fetch(&umbra.url("/get?x=1"), "httpbin").await;
    assert_eq!((status.as_u16(), &body[..]), (200, &b"v1"[..]));
    let seen = &v1.received()[0];
    assert_eq!(seen.version, http::Version::HTTP_2);
    assert_eq!(seen.tls.as_ref().unwrap().alpn.as_deref(), Some("h2"));
    assert_eq!(seen.uri.scheme_str(), Some("https"));
    assert_eq!(seen.uri.path_and_query().unwrap(), "/get?x=1");
    let shadow = &v2.wait_for(1).await[0];
    assert_eq!(shadow.version, http::Version::HTTP_2);
    assert_eq!(shadow.uri.authority().unwrap(), "httpbin-shadow");
}

#[tokio::test]
async fn a_reload_picks_up_a_rotated_ca_file() {
    let old = Pki::new();
    let new = Pki::new();
    let v1 = Backend::tls("v1", new.server(&["v1.test"])).await;
    let v2 = Backend::tls("v2", new.server(&["v2.test"])).await;
    // The file umbra reads, holding the old CA at first.
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::copy(old.ca_file(), &ca).unwrap();
    let yaml = tls_config(
        v1.port(),
        v2.port(),
        "HTTP",
        &simple(&ca, "v1.test"),
        &simple(&ca, "v2.test"),
    );
    let umbra = Umbra::start(&yaml).await;
    let (status, _, _) = fetch(&umbra.url("/get"), "httpbin").await;
    assert_eq!(status, 502, "the server's CA is not trusted yet");

    // Same YAML, new file contents: the destination must be rebuilt.
    std::fs::copy(new.ca_file(), &ca).unwrap();
    assert!(umbra.reload_with(&yaml).await);
    let (status, _, body) = fetch(&umbra.url("/get"), "httpbin").await;
    assert_eq!((status.as_u16(), &body[..]), (200, &b"v1"[..]));
}

/// Without `caCertificates` an upstream's certificate is checked against
/// the system's trust store, as Istio's sidecars check it: the real binary
/// trusts the test CA when `SSL_CERT_FILE` names it, and not otherwise.
#[tokio::test]
async fn without_a_ca_file_the_system_trust_store_decides() {
    let pki = Pki::new();
    let v1 = Backend::tls("v1", pki.server(&["v1.test"])).await;
    let v2 = Backend::tls("v2", pki.server(&["v2.test"])).await;
    let (tls, v2_tls) = (
        "{mode: SIMPLE, sni: v1.test}",
        "{mode: SIMPLE, sni: v2.test}",
    );
    let yaml = tls_config(v1.port(), v2.port(), "HTTP", tls, v2_tls);
    let ca = pki.ca_file();
    for (env, expected) in [(Some(ca.as_os_str()), 200), (None, 502)] {
        let env: Vec<_> = env.map(|ca| ("SSL_CERT_FILE", ca)).into_iter().collect();
        let (umbra, _dir) = Process::run(&yaml, "127.0.0.1:0", &env);
        let addr = umbra.logged_addr("umbra::server: listening").await;
        let (status, _, _) = fetch(&format!("http://{addr}/get"), "httpbin").await;
        assert_eq!(status, expected, "SSL_CERT_FILE: {env:?}");
    }
    assert_eq!(v1.count(), 1);
}

/// An upgrade (a WebSocket, say) to a destination umbra reaches over TLS
/// is tunnelled through the TLS connection, both ways.
#[tokio::test]
async fn upgrades_are_tunnelled_over_upstream_tls() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = Pki::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server(&["v1.test"]));
    // An upstream that switches to an echo protocol, over TLS.
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        let head = read_head(&mut tls).await.to_ascii_lowercase();
        assert!(head.contains("upgrade: echo"), "{head}");
        let switch =
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n";
        tls.write_all(switch).await.unwrap();
        let mut buf = [0u8; 64];
        while let Ok(n) = tls.read(&mut buf).await {
            if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    });
    let v2 = Backend::tls("v2", pki.server(&["v2.test"])).await;
    let ca = pki.ca_file();
    let (tls, v2_tls) = (simple(&ca, "v1.test"), simple(&ca, "v2.test"));
    let umbra = Umbra::start(&tls_config(port, v2.port(), "HTTP", &tls, &v2_tls)).await;

    let mut client = tokio::net::TcpStream::connect(umbra.addr).await.unwrap();
    let upgrade =
        b"GET /chat HTTP/1.1\r\nHost: httpbin\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n";
    client.write_all(upgrade).await.unwrap();
    let head = read_head(&mut client).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    for word in [&b"ping"[..], b"pong"] {
        client.write_all(word).await.unwrap();
        let mut echoed = [0u8; 4];
        tokio::time::timeout(PATIENCE, client.read_exact(&mut echoed))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&echoed, word);
    }
}

/// The files a DestinationRule names are watched as the config is: a CA
/// file replaced (by rename, as tools write) reloads with no signal and no
/// config change, and so does one the config names only after a reload.
#[tokio::test]
async fn a_rotated_upstream_ca_file_is_picked_up_without_a_reload() {
    let old = Pki::new();
    let new = Pki::new();
    let v1 = Backend::tls("v1", new.server(&["v1.test"])).await;
    let v2 = Backend::tls("v2", new.server(&["v2.test"])).await;
    let (first, second) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let config = |dir: &tempfile::TempDir| {
        let ca = dir.path().join("ca.pem");
        std::fs::copy(old.ca_file(), &ca).unwrap();
        let (v1_tls, v2_tls) = (simple(&ca, "v1.test"), simple(&ca, "v2.test"));
        tls_config(v1.port(), v2.port(), "HTTP", &v1_tls, &v2_tls)
    };
    let umbra = Umbra::start(&config(&first)).await;
    let (status, _, _) = fetch(&umbra.url("/get"), "httpbin").await;
    assert_eq!(status, 502, "the server's CA is not trusted yet");
    // Now the config names a file in another directory.
    assert!(umbra.reload_with(&config(&second)).await);

    umbra
        .reloads_after(|| {
            let staging = second.path().join(".ca.pem.tmp");
            std::fs::copy(new.ca_file(), &staging).unwrap();
            std::fs::rename(&staging, second.path().join("ca.pem")).unwrap();
        })
        .await;
    let (status, _, body) = fetch(&umbra.url("/get"), "httpbin").await;
    assert_eq!((status.as_u16(), &body[..]), (200, &b"v1"[..]));
}

/// A config naming a CA file that is not there yet, in a directory not
/// made yet (the config came before the secret), is rejected, and the file
/// is watched: when it arrives, the config is installed with no signal.
#[tokio::test]
async fn a_ca_file_a_rejected_config_waits_for_is_watched() {
    let pki = Pki::new();
    let v1 = Backend::tls("v1", pki.server(&["v1.test"])).await;
    let v2 = Backend::tls("v2", pki.server(&["v2.test"])).await;
    let umbra = Umbra::start(&single_route("httpbin", v1.port())).await;
    let secret = tempfile::tempdir().unwrap();
    let ca = secret.path().join("v1").join("ca.pem");
    let (tls, v2_tls) = (simple(&ca, "v1.test"), simple(&ca, "v2.test"));
    let yaml = tls_config(v1.port(), v2.port(), "HTTP", &tls, &v2_tls);
    assert!(!umbra.reload_with(&yaml).await, "the CA file is missing");

    umbra
        .reloads_after(|| {
            std::fs::create_dir(secret.path().join("v1")).unwrap();
            let staging = secret.path().join(".ca.pem.tmp");
            std::fs::copy(pki.ca_file(), &staging).unwrap();
            std::fs::rename(&staging, &ca).unwrap();
        })
        .await;
    let (status, _, body) = fetch(&umbra.url("/get"), "httpbin").await;
    assert_eq!((status.as_u16(), &body[..]), (200, &b"v1"[..]));
    assert_eq!(
        v1.received()[0].tls.as_ref().unwrap().sni.as_deref(),
        Some("v1.test")
    );
}

/// A reload that starts watching a file reads the config a second time
/// (a change to the file in between would be lost otherwise), but installs
/// it and logs its warnings and its success once.
#[tokio::test]
async fn a_reload_that_starts_watching_a_file_logs_once() {
    let pki = Pki::new();
    let v1 = Backend::tls("v1", pki.server(&["v1.test"])).await;
    let v2 = Backend::tls("v2", pki.server(&["v2.test"])).await;
    let (umbra, dir) = Process::watching(&single_route("httpbin", v1.port()), "127.0.0.1:0", &[]);
    let addr = umbra.logged_addr("umbra::server: listening").await;
    let admin = umbra.logged_addr("admin listening").await;
    umbra.line("umbra::server: ready").await; // Watching from here.

    let ca = pki.ca_file();
    let (tls, v2_tls) = (simple(&ca, "v1.test"), simple(&ca, "v2.test"));
    let yaml = tls_config(v1.port(), v2.port(), "HTTP", &tls, &v2_tls)
        + "---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: edge}\n";
    let staging = dir.path().join("config.yaml.tmp");
    std::fs::write(&staging, yaml).unwrap();
    std::fs::rename(&staging, dir.path().join("config.yaml")).unwrap();
    let reloaded = eventually(|| async {
        let metrics = fetch(&format!("http://{admin}/metrics"), "admin").await.2;
        let metrics = String::from_utf8_lossy(&metrics);
        let success = [("result", "success")];
        (metric_value(&metrics, "umbra_config_reloads_total", &success) == 1.0).then_some(())
    });
    assert!(reloaded.await.is_some(), "{}", umbra.stderr());
    let (status, _, body) = fetch(&format!("http://{addr}/get"), "httpbin").await;
    assert_eq!((status.as_u16(), &body[..]), (200, &b"v1"[..]));

    // Every line the reload logged comes before the shutdown's.
    umbra.terminate();
    umbra.line("shutting down").await;
    assert_eq!(umbra.count("config reloaded"), 1, "{}", umbra.stderr());
    assert_eq!(umbra.count("skipping Gateway"), 1, "{}", umbra.stderr());
}

/// umbra serving `https` on a TLS listener with a certificate for
/// `umbra.test` from `pki`, in front of one plaintext `v1` backend.
async fn terminating(pki: &Pki, v1: &Backend) -> Umbra {
    terminating_with(pki, v1, Default::default()).await
}

/// A TLS client trusting `ca`, offering `alpn`.
fn tls_client(ca: &CertificateDer<'static>, alpn: &[u8]) -> tokio_rustls::TlsConnector {
    tls_client_with(ca, alpn, None)
}

/// A TLS client trusting `ca`, offering `alpn`, presenting `identity` if
/// asked for a certificate.
fn tls_client_with(
    ca: &CertificateDer<'static>,
    alpn: &[u8],
    identity: Option<&Issued>,
) -> tokio_rustls::TlsConnector {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(id) => builder
            .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

type TlsStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// A TLS connection to `addr` as `umbra.test`.
async fn connect_tls(
    addr: std::net::SocketAddr,
    ca: &CertificateDer<'static>,
    alpn: &[u8],
) -> std::io::Result<TlsStream> {
    connect_as(addr, tls_client(ca, alpn), "umbra.test").await
}

/// A TLS connection to `addr` that checks the server is `name` (and sends
/// it as SNI unless it is an IP address).
async fn connect_as(
    addr: std::net::SocketAddr,
    client: tokio_rustls::TlsConnector,
    name: &str,
) -> std::io::Result<TlsStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
    client.connect(name, tcp).await
}

/// `GET /` with `Host: httpbin` over TLS to `addr` as `umbra.test`, by
/// the protocol ALPN settles on: status, version and body.
async fn get_over_tls(
    addr: std::net::SocketAddr,
    ca: &CertificateDer<'static>,
    alpn: &[u8],
) -> std::io::Result<(u16, http::Version, bytes::Bytes)> {
    get_on(connect_tls(addr, ca, alpn).await?, &[]).await
}

/// `GET /` with `Host: httpbin` and `headers` on `tls`, by the protocol
/// ALPN settled on: status, version and body.
async fn get_on(
    tls: TlsStream,
    headers: &[(&str, &str)],
) -> std::io::Result<(u16, http::Version, bytes::Bytes)> {
    use http_body_util::BodyExt;
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let io = hyper_util::rt::TokioIo::new(tls);
    let mut request = http::Request::get("https://httpbin/").header("host", "httpbin");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(empty()).unwrap();
    let response = if h2 {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                .await
                .map_err(std::io::Error::other)?;
        tokio::spawn(conn);
        sender.send_request(request).await
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(conn);
        let mut request = request;
        *request.uri_mut() = "/".parse().unwrap();
        sender.send_request(request).await
    }
    .map_err(std::io::Error::other)?;
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    Ok((parts.status.as_u16(), parts.version, body))
}

#[tokio::test]
async fn a_tls_listener_serves_http1_and_http2_by_alpn() {
    let pki = Pki::new();
    let v1 = Backend::echo("v1").await;
    let umbra = terminating(&pki, &v1).await;
    let addr = umbra.tls.unwrap();
    let (status, version, body) = get_over_tls(addr, &pki.ca, b"http/1.1").await.unwrap();
    assert_eq!(
        (status, version, &body[..]),
        (200, http::Version::HTTP_11, &b"v1"[..])
    );
    let (status, version, body) = get_over_tls(addr, &pki.ca, b"h2").await.unwrap();
    assert_eq!(
        (status, version, &body[..]),
        (200, http::Version::HTTP_2, &b"v1"[..])
    );
    let seen = v1.wait_for(2).await;
    assert!(seen
        .iter()
        .all(|r| r.header("x-forwarded-proto") == Some("https")));
    // The plaintext listener still says http.
    fetch(&umbra.url("/"), "httpbin").await;
    assert_eq!(
        v1.wait_for(3).await[2].header("x-forwarded-proto"),
        Some("http")
    );
}

#[tokio::test]
async fn a_failed_handshake_is_counted_and_the_listener_keeps_serving() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = Pki::new();
    let v1 = Backend::echo("v1").await;
    let umbra = terminating(&pki, &v1).await;
    let addr = umbra.tls.unwrap();
    // Plaintext HTTP to the TLS port: closed without an answer in HTTP.
    let mut plain = tokio::net::TcpStream::connect(addr).await.unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: httpbin\r\n\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, plain.read_to_end(&mut reply)).await;
    assert!(!reply.starts_with(b"HTTP/"), "no HTTP answer in the clear");
    // A client that does not trust umbra's certificate.
    let stranger = Pki::new();
    assert!(get_over_tls(addr, &stranger.ca, b"http/1.1").await.is_err());
    umbra
        .wait_metric("umbra_downstream_tls_handshake_errors_total", &[], 2.0)
        .await;
    let (status, _, _) = get_over_tls(addr, &pki.ca, b"http/1.1").await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(v1.count(), 1, "only the good handshake reached v1");
}

#[tokio::test]
async fn a_reload_swaps_the_listener_certificate() {
    let old = Pki::new();
    let new = Pki::new();
    let v1 = Backend::echo("v1").await;
    let umbra = terminating(&old, &v1).await;
    let addr = umbra.tls.unwrap();
    assert!(get_over_tls(addr, &new.ca, b"http/1.1").await.is_err());
    // The same files, rewritten with the new CA's certificate.
    let issued = new.issue("umbra", &["umbra.test"]);
    std::fs::copy(&issued.cert_file, old.dir.path().join("umbra.pem")).unwrap();
    std::fs::copy(&issued.key_file, old.dir.path().join("umbra.key")).unwrap();
    assert!(umbra.reload_with(&single_route("httpbin", v1.port())).await);
    let (status, _, _) = get_over_tls(addr, &new.ca, b"http/1.1").await.unwrap();
    assert_eq!(status, 200);
}

#[tokio::test]
async fn subject_alt_names_still_need_a_match_and_a_trusted_chain() {
    let pki = Pki::new();
    let stranger = Pki::new();
    let v1 = Backend::tls("v1", pki.server(&["v1.internal"])).await;
    let v2 = Backend::tls("v2", stranger.server(&["v2.internal"])).await;
    let ca = pki.ca_file();
    // None of the names is the certificate's.
    let no_match = format!(
        "{{mode: SIMPLE, caCertificates: {}, sni: v1.internal, subjectAltNames: [other.internal]}}",
        ca.display()
    );
    // The name matches, but the chain is not the trusted CA's.
    let untrusted = format!(
        "{{mode: SIMPLE, caCertificates: {}, subjectAltNames: [v2.internal]}}",
        ca.display()
    );
    let yaml = tls_config(v1.port(), v2.port(), "HTTP", &no_match, &untrusted);
    let umbra = Umbra::start(&yaml).await;
    let (status, headers, _) = fetch(&umbra.url("/get"), "httpbin").await;
    assert_eq!(status, 502);
    assert_eq!(headers["x-umbra-error"], "upstream_connect_failure");
    umbra
        .wait_metric("umbra_mirror_requests_total", &[("outcome", "failed")], 1.0)
        .await;
    assert_eq!((v1.count(), v2.count()), (0, 0));
}

#[tokio::test]
async fn a_tls_connection_the_server_closes_is_not_reused() {
    let pki = Pki::new();
    // Every response closes its connection, as a server at its keep-alive
    // limit does: the pool must notice and dial (and handshake) again.
    let v1 = Backend::tls_with("v1", pki.server(&["v1.test"]), |_| {
        let mut response = http::Response::new(full("v1"));
        response
            .headers_mut()
            .insert("connection", "close".parse().unwrap());
        response
    })
    .await;
    let v2 = Backend::tls("v2", pki.server(&["v2.test"])).await;
    let umbra = verified(&pki, &v1, &v2, "HTTP").await;
    for _ in 0..3 {
        let (status, _, body) = fetch(&umbra.url("/get"), "httpbin").await;
        assert_eq!((status.as_u16(), &body[..]), (200, &b"v1"[..]));
    }
    assert_eq!(v1.connections(), 3, "one TLS connection per request");
}

/// umbra terminating TLS with `pki`'s `umbra.test` certificate and these
/// server options, in front of `v1`.
async fn terminating_with(pki: &Pki, v1: &Backend, options: umbra::server::Options) -> Umbra {
    let issued = pki.issue("umbra", &["umbra.test"]);
    let settings = Settings::one(&issued.cert_file, &issued.key_file);
    terminating_as(settings, &single_route("httpbin", v1.port()), options).await
}

/// umbra terminating TLS as `settings` say, with these server options,
/// serving `yaml`.
async fn terminating_as(settings: Settings, yaml: &str, options: umbra::server::Options) -> Umbra {
    let tls = umbra::server::tls::Termination::load(settings).unwrap();
    let setup = Setup {
        tls: Some(Arc::new(tls)),
        options,
        ..Setup::default()
    };
    Umbra::start_with(yaml, setup).await
}

#[tokio::test]
async fn a_client_silent_in_its_handshake_is_closed_after_the_header_read_timeout() {
    use tokio::io::AsyncReadExt;
    let pki = Pki::new();
    let v1 = Backend::echo("v1").await;
    let options = umbra::server::Options {
        header_read_timeout: std::time::Duration::from_millis(300),
        ..Default::default()
    };
    let umbra = terminating_with(&pki, &v1, options).await;
    let mut silent = tokio::net::TcpStream::connect(umbra.tls.unwrap())
        .await
        .unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(PATIENCE, silent.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "umbra closed the silent connection");
    umbra
        .wait_metric("umbra_downstream_tls_handshake_errors_total", &[], 1.0)
        .await;
}

#[tokio::test]
async fn shutdown_does_not_wait_for_a_handshake() {
    let pki = Pki::new();
    let v1 = Backend::echo("v1").await;
    // Neither the handshake's time limit nor the drain's would end it
    // within the test's patience: only the drain signal can.
    let long = std::time::Duration::from_secs(60);
    let options = umbra::server::Options {
        header_read_timeout: long,
        drain_timeout: long,
        ..Default::default()
    };
    let mut umbra = terminating_with(&pki, &v1, options).await;
    let _silent = tokio::net::TcpStream::connect(umbra.tls.unwrap())
        .await
        .unwrap();
    umbra
        .wait_metric("umbra_downstream_connections", &[("worker", "0")], 1.0)
        .await;
    umbra.shutdown().await;
    assert_eq!(
        umbra.metric_after_shutdown("umbra_downstream_tls_handshake_errors_total", &[]),
        0.0,
        "closing for shutdown is not a handshake error"
    );
}

#[tokio::test]
async fn a_certificate_that_cannot_be_read_on_reload_keeps_the_old_one() {
    let pki = Pki::new();
    let v1 = Backend::echo("v1").await;
    let umbra = terminating(&pki, &v1).await;
    std::fs::write(pki.dir.path().join("umbra.pem"), "not a certificate").unwrap();
    assert!(
        !umbra.reload_with(&single_route("httpbin", v1.port())).await,
        "the reload reports the certificate it could not read"
    );
    let (status, _, _) = get_over_tls(umbra.tls.unwrap(), &pki.ca, b"http/1.1")
        .await
        .unwrap();
    assert_eq!(status, 200);
}

#[test]
fn unusable_tls_files_are_refused_naming_the_flag_and_the_fix() {
    let pki = Pki::new();
    let cert = pki.issue("one", &["umbra.test"]);
    let other = pki.issue("two", &["umbra.test"]);
    let refusal = |settings: Settings| match umbra::server::tls::Termination::load(settings) {
        Ok(_) => panic!("unusable files were accepted"),
        Err(error) => error.to_string(),
    };
    let mismatched = refusal(Settings::one(&cert.cert_file, &other.key_file));
    assert_eq!(
        mismatched,
        format!(
            "--tls-cert {} and --tls-key {} do not go together (keys may not be consistent: KeyMismatch): give the private key the certificate was issued for",
            cert.cert_file.display(),
            other.key_file.display()
        )
    );
    let garbage = pki.dir.path().join("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let with_ca = |ca: &Path| Settings {
        client_ca: Some(ca.to_path_buf()),
        ..Settings::one(&cert.cert_file, &cert.key_file)
    };
    let missing = pki.dir.path().join("missing.pem");
    for (ca, expected) in [
        (missing.as_path(), "No such file or directory".to_string()),
        (
            cert.key_file.as_path(),
            "no PEM certificate in it; give PEM `-----BEGIN CERTIFICATE-----` blocks".to_string(),
        ),
        (garbage.as_path(), "not a usable CA certificate".to_string()),
    ] {
        let error = refusal(with_ca(ca));
        let flagged = format!("--tls-client-ca {}: ", ca.display());
        assert!(error.starts_with(&flagged), "{error}");
        assert!(error.contains(&expected), "{error}");
    }
    // A file without a revocation list, and one whose list is not DER.
    let bad_crl = pki.dir.path().join("garbage-crl.pem");
    std::fs::write(
        &bad_crl,
        "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
    )
    .unwrap();
    for (crl, expected) in [
        (cert.cert_file.clone(), "no PEM revocation list in it"),
        (bad_crl, "not a valid DER revocation list"),
    ] {
        let error = refusal(Settings {
            client_crl: Some(crl.clone()),
            ..with_ca(&pki.ca_file())
        });
        let flagged = format!("--tls-client-crl {}: {expected}", crl.display());
        assert!(error.starts_with(&flagged), "{error}");
    }
}

/// With worker threads, each accepts on the TLS listener as TLS: all
/// connections served, on both workers, as `https`. (Whether one is handed
/// from its accepting worker to the other depends on which thread the
/// kernel wakes, so the hand-off's own flag is not pinned down here.)
#[tokio::test]
async fn a_tls_listener_serves_on_every_worker() {
    let pki = Pki::new();
    let v1 = Backend::echo("v1").await;
    let options = umbra::server::Options {
        workers: 2,
        ..Default::default()
    };
    let umbra = terminating_with(&pki, &v1, options).await;
    // Kept open, so each worker's gauge still counts its connections.
    let mut open = Vec::new();
    for _ in 0..6 {
        let tls = connect_tls(umbra.tls.unwrap(), &pki.ca, b"http/1.1")
            .await
            .unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        let request = http::Request::get("/")
            .header("host", "httpbin")
            .body(empty())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        open.push((sender, response));
    }
    for worker in ["1", "2"] {
        let labels = [("worker", worker)];
        let serving = umbra.metric("umbra_downstream_connections", &labels).await;
        assert!(
            serving >= 1.0,
            "worker {worker} serves {serving} connections"
        );
    }
    let seen = v1.wait_for(6).await;
    assert!(seen
        .iter()
        .all(|r| r.header("x-forwarded-proto") == Some("https")));
}

/// With several certificates, the client's SNI picks the one naming it
/// exactly, else one whose wildcard covers it; a client sending no SNI, or
/// one no certificate covers, gets the first. Each handshake below only
/// succeeds if the certificate presented is valid for the name the client
/// checks.
#[tokio::test]
async fn sni_picks_the_certificate_that_covers_the_name() {
    let pki = Pki::new();
    let v1 = Backend::echo("v1").await;
    let default = pki.issue("default", &["umbra.test", "127.0.0.1"]);
    let wildcard = pki.issue("wildcard", &["*.shop.test"]);
    let exact = pki.issue("exact", &["pay.shop.test"]);
    let settings = Settings {
        identities: [&default, &wildcard, &exact]
            .iter()
            .map(|id| (id.cert_file.clone(), id.key_file.clone()))
            .collect(),
        client_ca: None,
        client_crl: None,
        client_optional: false,
    };
    let yaml = single_route("httpbin", v1.port());
    let umbra = terminating_as(settings, &yaml, Default::default()).await;
    let addr = umbra.tls.unwrap();
    let presented = |tls: &TlsStream| tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    for (name, expected) in [
        ("cart.shop.test", &wildcard),
        // Covered by the wildcard too, given first: the exact name wins,
        // as in nginx and Envoy.
        ("pay.shop.test", &exact),
        ("PAY.Shop.test", &exact),
        ("umbra.test", &default),
        // An IP address is not sent as SNI: the first certificate.
        ("127.0.0.1", &default),
    ] {
        let tls = connect_as(addr, tls_client(&pki.ca, b"http/1.1"), name)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(presented(&tls), expected.chain[0], "{name}");
        let (status, _, body) = get_on(tls, &[]).await.unwrap();
        assert_eq!((status, &body[..]), (200, &b"v1"[..]));
    }
    // A name no certificate covers gets the first, which is not valid for it.
    let unknown = connect_as(addr, tls_client(&pki.ca, b"http/1.1"), "other.test").await;
    match unknown {
        Err(error) => assert!(error.to_string().contains("not valid for name"), "{error}"),
        Ok(_) => panic!("the first certificate does not cover other.test"),
    }
}

/// umbra asking TLS clients for a certificate from `pki`'s CA, serving
/// `yaml`; `optional`: clients may send none.
async fn verifying_clients(pki: &Pki, yaml: &str, optional: bool) -> Umbra {
    let issued = pki.issue("umbra", &["umbra.test"]);
    let settings = Settings {
        client_ca: Some(pki.ca_file()),
        client_optional: optional,
        ..Settings::one(&issued.cert_file, &issued.key_file)
    };
    terminating_as(settings, yaml, Default::default()).await
}

/// A client presenting a certificate another CA issued gets no answer.
async fn refuses_a_foreign_certificate(pki: &Pki, addr: std::net::SocketAddr) {
    let stranger = Pki::new().issue("stranger", &["client.test"]);
    let foreign = async {
        let client = tls_client_with(&pki.ca, b"http/1.1", Some(&stranger));
        get_on(connect_as(addr, client, "umbra.test").await?, &[]).await
    };
    assert!(
        foreign.await.is_err(),
        "a certificate from another CA is accepted"
    );
}

/// `Hash=` and the SHA-256 of `cert`, as `x-forwarded-client-cert` carries it.
fn hash_of(cert: &CertificateDer<'_>) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, cert.as_ref());
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("Hash={hex}")
}

#[tokio::test]
async fn client_certificates_are_required_and_forwarded_as_their_hash() {
    let pki = Pki::new();
    let v1 = Backend::echo("v1").await;
    let umbra = verifying_clients(&pki, &single_route("httpbin", v1.port()), false).await;
    let addr = umbra.tls.unwrap();
    let spoofed = [("x-forwarded-client-cert", "Hash=spoofed")];

    // Without a certificate: refused (TLS 1.3 reports it after the
    // client's side of the handshake, so on the request).
    let anonymous = async {
        let tls = connect_as(addr, tls_client(&pki.ca, b"http/1.1"), "umbra.test").await?;
        get_on(tls, &[]).await
    };
    assert!(
        anonymous.await.is_err(),
        "a client without a certificate is served"
    );
    // A certificate from another CA: refused too.
    refuses_a_foreign_certificate(&pki, addr).await;

    // With one from the CA, over both protocols: the header is umbra's.
    let client_id = pki.issue("client", &["client.test"]);
    for alpn in [&b"http/1.1"[..], b"h2"] {
        let client = tls_client_with(&pki.ca, alpn, Some(&client_id));
        let tls = connect_as(addr, client, "umbra.test").await.unwrap();
        let (status, _, _) = get_on(tls, &spoofed).await.unwrap();
        assert_eq!(status, 200);
    }
    // The plaintext listener: a client's own header never passes.
    let mut plain = get(&umbra.url("/"), "httpbin");
    let spoof = http::HeaderValue::from_static("Hash=spoofed");
    plain.headers_mut().insert("x-forwarded-client-cert", spoof);
    let (status, _, _) = send(plain).await;
    assert_eq!(status, 200);
    let seen = v1.wait_for(3).await;
    let expected = hash_of(&client_id.chain[0]);
    assert_eq!(seen[0].header("x-forwarded-client-cert"), Some(&*expected));
    assert_eq!(seen[1].header("x-forwarded-client-cert"), Some(&*expected));
    assert_eq!(seen[2].header("x-forwarded-client-cert"), None);
}

#[tokio::test]
async fn optional_client_certificates_let_anonymous_clients_in_without_the_header() {
    let pki = Pki::new();
    let v1 = Backend::echo("v1").await;
    let umbra = verifying_clients(&pki, &single_route("httpbin", v1.port()), true).await;
    let addr = umbra.tls.unwrap();
    let tls = connect_as(addr, tls_client(&pki.ca, b"http/1.1"), "umbra.test")
        .await
        .unwrap();
    let (status, _, _) = get_on(tls, &[("x-forwarded-client-cert", "Hash=spoofed")])
        .await
        .unwrap();
    assert_eq!(status, 200);
    let client_id = pki.issue("client", &["client.test"]);
    let client = tls_client_with(&pki.ca, b"http/1.1", Some(&client_id));
    let tls = connect_as(addr, client, "umbra.test").await.unwrap();
    assert_eq!(get_on(tls, &[]).await.unwrap().0, 200);
    // Optional is not lax: a certificate from another CA is still refused.
    refuses_a_foreign_certificate(&pki, addr).await;
    let seen = v1.wait_for(2).await;
    assert_eq!(seen[0].header("x-forwarded-client-cert"), None);
    assert_eq!(
        seen[1].header("x-forwarded-client-cert"),
        Some(&*hash_of(&client_id.chain[0]))
    );
}

/// A certificate rotated as Kubernetes rotates a mounted secret (the files
/// are links through `..data`, a link swapped to a new directory by
/// rename) is picked up with no reload signal and no config change.
#[cfg(unix)]
#[tokio::test]
async fn a_certificate_rotated_like_a_mounted_secret_is_picked_up() {
    picks_up_a_swapped_link("..data", false).await;
}

/// Likewise for files named through a directory that is itself a link,
/// swapped as `ln -sfn v2 current` swaps it.
#[cfg(unix)]
#[tokio::test]
async fn a_certificate_directory_swapped_by_its_link_is_picked_up() {
    picks_up_a_swapped_link("current", true).await;
}

/// Serves a certificate from versioned directories under a temporary
/// mount, the current one chosen by the link `link`; the files are named
/// through it (`link/tls.crt`) if `through_link`, else beside it through
/// links of their own (`tls.crt` → `link/tls.crt`, as Kubernetes mounts a
/// secret). A rotation by renaming a new link over `link` must be picked
/// up with no reload signal and no config change.
#[cfg(unix)]
async fn picks_up_a_swapped_link(link: &str, through_link: bool) {
    use std::os::unix::fs::symlink;
    let pki = Pki::new();
    let v1 = Backend::echo("v1").await;
    let mount = tempfile::tempdir().unwrap();
    let version = |name: &str, issued: &Issued| {
        let dir = mount.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        std::fs::copy(&issued.cert_file, dir.join("tls.crt")).unwrap();
        std::fs::copy(&issued.key_file, dir.join("tls.key")).unwrap();
    };
    version("..v1", &pki.issue("first", &["umbra.test"]));
    symlink("..v1", mount.path().join(link)).unwrap();
    let named = match through_link {
        true => mount.path().join(link),
        false => {
            for file in ["tls.crt", "tls.key"] {
                symlink(format!("{link}/{file}"), mount.path().join(file)).unwrap();
            }
            mount.path().to_path_buf()
        }
    };
    let settings = Settings::one(&named.join("tls.crt"), &named.join("tls.key"));
    let yaml = single_route("httpbin", v1.port());
    let umbra = terminating_as(settings, &yaml, Default::default()).await;
    let addr = umbra.tls.unwrap();
    let as_rotated = || connect_as(addr, tls_client(&pki.ca, b"http/1.1"), "rotated.test");
    assert!(
        as_rotated().await.is_err(),
        "the first certificate is not for rotated.test"
    );

    umbra
        .reloads_after(|| {
            version(
                "..v2",
                &pki.issue("second", &["umbra.test", "rotated.test"]),
            );
            symlink("..v2", mount.path().join("link_tmp")).unwrap();
            std::fs::rename(mount.path().join("link_tmp"), mount.path().join(link)).unwrap();
        })
        .await;
    let tls = as_rotated()
        .await
        .expect("the rotated certificate is presented");
    assert_eq!(get_on(tls, &[]).await.unwrap().0, 200);
}

/// `GET /` over TLS to `addr` as `umbra.test`, trusting `pki`'s CA and
/// presenting `id`: status, version and body.
async fn fetch_as(
    addr: std::net::SocketAddr,
    pki: &Pki,
    id: &Issued,
) -> std::io::Result<(u16, http::Version, bytes::Bytes)> {
    let client = tls_client_with(&pki.ca, b"http/1.1", Some(id));
    get_on(connect_as(addr, client, "umbra.test").await?, &[]).await
}

/// umbra presenting `pki`'s certificate for `umbra.test` in front of `v1`,
/// requiring client certificates from the CAs in `client_ca`, checked
/// against `client_crl` if given.
async fn checking_clients(
    pki: &Pki,
    v1: &Backend,
    client_ca: &Path,
    client_crl: Option<&Path>,
) -> Umbra {
    let issued = pki.issue("umbra", &["umbra.test"]);
    let settings = Settings {
        client_ca: Some(client_ca.to_path_buf()),
        client_crl: client_crl.map(Path::to_path_buf),
        ..Settings::one(&issued.cert_file, &issued.key_file)
    };
    let yaml = single_route("httpbin", v1.port());
    terminating_as(settings, &yaml, Default::default()).await
}

/// The CA clients' certificates are checked against is re-read as the
/// certificate is: replaced by rename, it trusts the new CA's clients, and
/// no longer the old one's, with no reload signal.
#[tokio::test]
async fn a_rotated_client_ca_is_picked_up() {
    let (pki, old, new) = (Pki::new(), Pki::new(), Pki::new());
    let v1 = Backend::echo("v1").await;
    let dir = tempfile::tempdir().unwrap();
    let client_ca = dir.path().join("clients.pem");
    std::fs::copy(old.ca_file(), &client_ca).unwrap();
    let umbra = checking_clients(&pki, &v1, &client_ca, None).await;
    let addr = umbra.tls.unwrap();
    let (old_id, new_id) = (
        old.issue("old", &["client.test"]),
        new.issue("new", &["client.test"]),
    );
    assert_eq!(fetch_as(addr, &pki, &old_id).await.unwrap().0, 200);
    assert!(
        fetch_as(addr, &pki, &new_id).await.is_err(),
        "the new CA is not trusted yet"
    );

    umbra
        .reloads_after(|| {
            let staging = dir.path().join(".clients.pem.tmp");
            std::fs::copy(new.ca_file(), &staging).unwrap();
            std::fs::rename(&staging, &client_ca).unwrap();
        })
        .await;
    assert_eq!(fetch_as(addr, &pki, &new_id).await.unwrap().0, 200);
    assert!(
        fetch_as(addr, &pki, &old_id).await.is_err(),
        "the old CA is still trusted"
    );
}

/// With `--tls-client-crl`, a revoked client certificate is refused and
/// one the list does not revoke is served; a new list, renamed into place,
/// is picked up as the certificates are.
#[tokio::test]
async fn client_certificates_are_checked_against_the_revocation_list() {
    let pki = Pki::new();
    let v1 = Backend::echo("v1").await;
    let crl = pki.crl("clients-crl", &["revoked"]);
    let umbra = checking_clients(&pki, &v1, &pki.ca_file(), Some(&crl)).await;
    let addr = umbra.tls.unwrap();
    let (good, revoked) = (
        pki.issue("good", &["client.test"]),
        pki.issue("revoked", &["client.test"]),
    );
    assert_eq!(fetch_as(addr, &pki, &good).await.unwrap().0, 200);
    assert!(
        fetch_as(addr, &pki, &revoked).await.is_err(),
        "a revoked certificate is served"
    );

    umbra
        .reloads_after(|| {
            let next = pki.crl("clients-crl-next", &["revoked", "good"]);
            std::fs::rename(next, &crl).unwrap();
        })
        .await;
    assert!(
        fetch_as(addr, &pki, &good).await.is_err(),
        "the new list is not applied"
    );
    assert_eq!(v1.count(), 1);
}

/// A route matching on `x-forwarded-client-cert` sees umbra's value: a
/// client's own is gone before routing, on either listener.
#[tokio::test]
async fn a_made_up_client_certificate_header_cannot_pick_a_route() {
    let pki = Pki::new();
    let v1 = Backend::echo("v1").await;
    let admin = Backend::echo("admin").await;
    let yaml = format!(
        r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: httpbin}}
spec:
  hosts: [httpbin]
  http:
  - match: [{{headers: {{x-forwarded-client-cert: {{prefix: "Hash="}}}}}}]
    route: [{{destination: {{host: 127.0.0.1, port: {{number: {admin}}}}}}}]
  - route: [{{destination: {{host: 127.0.0.1, port: {{number: {v1}}}}}}}]
"#,
        admin = admin.port(),
        v1 = v1.port()
    );
    let umbra = verifying_clients(&pki, &yaml, true).await;
    let spoofed = [("x-forwarded-client-cert", "Hash=spoofed")];
    let tls = connect_tls(umbra.tls.unwrap(), &pki.ca, b"h2")
        .await
        .unwrap();
    let (_, _, body) = get_on(tls, &spoofed).await.unwrap();
    assert_eq!(&body[..], b"v1", "over TLS without a certificate");
    let mut plain = get(&umbra.url("/"), "httpbin");
    let spoof = http::HeaderValue::from_static("Hash=spoofed");
    plain.headers_mut().insert("x-forwarded-client-cert", spoof);
    assert_eq!(&send(plain).await.2[..], b"v1", "over plaintext");
    // With a certificate the route is taken, by umbra's own header.
    let client_id = pki.issue("client", &["client.test"]);
    let client = tls_client_with(&pki.ca, b"http/1.1", Some(&client_id));
    let tls = connect_as(umbra.tls.unwrap(), client, "umbra.test")
        .await
        .unwrap();
    let (_, _, body) = get_on(tls, &spoofed).await.unwrap();
    assert_eq!(&body[..], b"admin");
    let seen = admin.wait_for(1).await;
    let expected = hash_of(&client_id.chain[0]);
    assert_eq!(seen[0].header("x-forwarded-client-cert"), Some(&*expected));
}
