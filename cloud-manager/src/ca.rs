//! The certificate authority (rcgen).
//!
//! Files in the manager's data directory:
//! `ca.pem`/`ca.key` (root CA), `server.pem`/`server.key` (the manager's TLS
//! server certificate, chain = server + root), `tenant.pem`/`tenant.key` (the
//! first tenant's client bundle). Private keys are written with mode 0600.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use edgepool_common::fsutil::{write_private, write_public};
use edgepool_common::identity::{Identity, hex};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

/// Root CA lifetime.
const ROOT_VALIDITY: Duration = Duration::days(3650);
/// Manager server certificate lifetime.
const SERVER_VALIDITY: Duration = Duration::days(365);
/// Tenant client certificates.
/// Default lifetime of a tenant client certificate (`init`,
/// `tenant-bundle --validity-days`): short, because a tenant certificate
/// is a bearer of everything its tenant may do.
pub const DEFAULT_TENANT_CERT_DAYS: u32 = 30;
/// Lifetime of a replica's forwarding certificate (a standby makes a new
/// one well before; see `forward`).
const REPLICA_VALIDITY: Duration = Duration::days(30);
/// Certificates are back-dated this much to tolerate clock skew.
pub(crate) const SKEW: Duration = Duration::minutes(5);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error(
        "a CA already exists in {0} (use --force to replace it, which invalidates every issued certificate)"
    )]
    Exists(PathBuf),
    #[error("no CA in {0}: run `cloud-manager init --dir {0}` first")]
    Missing(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("invalid certificate signing request: {0}")]
    BadCsr(String),
    #[error("invalid server name {0:?}")]
    BadServerName(String),
    #[error("{path}: {why}")]
    BadFile { path: PathBuf, why: String },
}

/// Paths of the CA files in a data directory.
#[derive(Clone, Debug)]
pub struct CaFiles {
    pub dir: PathBuf,
}

impl CaFiles {
    pub fn new(dir: &Path) -> Self {
        CaFiles {
            dir: dir.to_path_buf(),
        }
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.pem")
    }
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }
    pub fn tenant_cert(&self) -> PathBuf {
        self.dir.join("tenant.pem")
    }
    pub fn tenant_key(&self) -> PathBuf {
        self.dir.join("tenant.key")
    }
}

/// A certificate issued by the CA.
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert_pem: String,
    pub serial_hex: String,
}

/// A certificate plus its freshly generated private key.
#[derive(Clone, Debug)]
pub struct IssuedWithKey {
    pub cert_pem: String,
    pub key_pem: String,
    pub serial_hex: String,
}

/// The root CA, loaded in memory.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    domain: String,
}

impl Ca {
    /// Creates a new root CA for `domain`.
    pub fn generate(domain: &str) -> Result<Ca, CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("edgepool root CA ({domain})"));
        dn.push(DnType::OrganizationName, "edgepool");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - SKEW;
        params.not_after = now + ROOT_VALIDITY;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        Ok(Ca {
            issuer: Issuer::new(params, key),
            cert_pem,
            domain: domain.to_string(),
        })
    }

    /// Loads `ca.pem` and `ca.key` from `files`.
    pub fn load(files: &CaFiles, domain: &str) -> Result<Ca, CaError> {
        if !files.ca_cert().exists() || !files.ca_key().exists() {
            return Err(CaError::Missing(files.dir.clone()));
        }
        let cert_pem = read(&files.ca_cert())?;
        let key = KeyPair::from_pem(&read(&files.ca_key())?)?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)?;
        Ok(Ca {
            issuer,
            cert_pem,
            domain: domain.to_string(),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn domain(&self) -> &str {
        &self.domain
    }

    pub(crate) fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }

    pub(crate) fn leaf_params(
        &self,
        identity: &Identity,
        validity: Duration,
        common_name: &str,
    ) -> Result<CertificateParams, CaError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "edgepool");
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(identity.to_uri().try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - SKEW;
        params.not_after = now + validity;
        params.serial_number = Some(random_serial());
        Ok(params)
    }

    /// The manager's TLS server certificate: DNS/IP SANs from `names` plus
    /// the URI `spiffe://<domain>/manager`.
    pub fn issue_server(&self, names: &[String]) -> Result<IssuedWithKey, CaError> {
        let identity = Identity::Manager {
            domain: self.domain.clone(),
        };
        let mut params = self.leaf_params(&identity, SERVER_VALIDITY, "edgepool manager")?;
        for name in names {
            let san = match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    name.clone()
                        .try_into()
                        .map_err(|_| CaError::BadServerName(name.clone()))?,
                ),
            };
            params.subject_alt_names.push(san);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue_with_new_key(params)
    }

    /// A replica's client certificate (URI `spiffe://<domain>/manager`,
    /// client auth only, signed by the root itself): a standby presents it
    /// when it forwards a call to the leader. Made in memory, never written.
    pub fn issue_replica_client(&self) -> Result<IssuedWithKey, CaError> {
        let identity = Identity::Manager {
            domain: self.domain.clone(),
        };
        let mut params =
            self.leaf_params(&identity, REPLICA_VALIDITY, "edgepool manager replica")?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue_with_new_key(params)
    }

    /// A tenant API client certificate (`spiffe://<domain>/tenant/<t>/user/<u>`).
    pub fn issue_tenant_client(
        &self,
        tenant: &str,
        user: &str,
        validity: Duration,
    ) -> Result<IssuedWithKey, CaError> {
        let identity = Identity::Tenant {
            domain: self.domain.clone(),
            tenant: tenant.to_string(),
            user: user.to_string(),
        };
        let mut params = self.leaf_params(&identity, validity, &format!("{user}@{tenant}"))?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue_with_new_key(params)
    }

    /// Signs a node's CSR. Only the CSR's public key (and its proof of
    /// possession) is used: subject, SANs and extensions come from
    /// `identity`, never from what the node asked for.
    pub fn sign_node_csr(
        &self,
        csr_pem: &str,
        identity: &Identity,
        validity: Duration,
    ) -> Result<Issued, CaError> {
        // from_pem verifies the CSR's self-signature (proof the node holds the key).
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::BadCsr(e.to_string()))?;
        let name = match identity {
            Identity::Node { node_id, .. } => node_id.clone(),
            other => other.to_uri(),
        };
        let mut params = self.leaf_params(identity, validity, &name)?;
        // Node certificates serve (peer port) and connect (manager, peers).
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let serial_hex = serial_hex(&params);
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            serial_hex,
        })
    }

    fn issue_with_new_key(&self, params: CertificateParams) -> Result<IssuedWithKey, CaError> {
        let key = KeyPair::generate()?;
        let serial_hex = serial_hex(&params);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedWithKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            serial_hex,
        })
    }
}

/// What `init` created.
pub struct InitReport {
    pub fingerprint: String,
    pub files: CaFiles,
    /// The names the server certificate covers.
    pub server_names: Vec<String>,
}

/// The names the server certificate covers: the ones given, then
/// localhost, 127.0.0.1, ::1 and this host's name, each once. Loopback is
/// always included so that a manager initialised for its public name can
/// still be reached (and checked) on the machine itself.
pub fn server_names_with_defaults(given: &[String]) -> Vec<String> {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let mut names: Vec<String> = Vec::new();
    for n in given
        .iter()
        .map(|n| n.trim().to_string())
        .chain(["localhost", "127.0.0.1", "::1"].map(String::from))
        .chain(std::iter::once(host))
    {
        if !n.is_empty() && !names.iter().any(|m| m.eq_ignore_ascii_case(&n)) {
            names.push(n);
        }
    }
    names
}

/// Creates the root CA, the server certificate and the first tenant bundle
/// in `dir`. Refuses to replace an existing CA unless `force`.
pub fn init(
    dir: &Path,
    domain: &str,
    server_names: &[String],
    tenant: &str,
    tenant_validity: Duration,
    force: bool,
) -> Result<InitReport, CaError> {
    let files = CaFiles::new(dir);
    if !force && (files.ca_cert().exists() || files.ca_key().exists()) {
        return Err(CaError::Exists(dir.to_path_buf()));
    }
    std::fs::create_dir_all(dir).map_err(|source| CaError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let server_names = server_names_with_defaults(server_names);
    let ca = Ca::generate(domain)?;
    let server = ca.issue_server(&server_names)?;
    let tenant_bundle = ca.issue_tenant_client(tenant, "admin", tenant_validity)?;
    let ca_key = ca.issuer.key().serialize_pem();
    // Key first: a crash between the two writes leaves no certificate without its key.
    write(&files.ca_key(), ca_key.as_bytes(), true)?;
    write(&files.ca_cert(), ca.cert_pem.as_bytes(), false)?;
    write_server(&files, &server, &ca)?;
    write(&files.tenant_key(), tenant_bundle.key_pem.as_bytes(), true)?;
    write(
        &files.tenant_cert(),
        tenant_bundle.cert_pem.as_bytes(),
        false,
    )?;
    Ok(InitReport {
        fingerprint: fingerprint_of_pem(&ca.cert_pem)?,
        files,
        server_names,
    })
}

/// Issues the first tenant bundle (`tenant.pem`, `tenant.key`) again when
/// it has ended or ends within `margin`, for tenant `tenant`: `dev` keeps
/// its data dir for longer than a tenant certificate lasts. Returns whether
/// it did.
pub fn renew_tenant_bundle(
    files: &CaFiles,
    domain: &str,
    tenant: &str,
    margin: Duration,
) -> Result<bool, CaError> {
    let path = files.tenant_cert();
    let bad = |why: String| CaError::BadFile {
        path: path.clone(),
        why,
    };
    let pem = read(&path)?;
    let der =
        edgepool_common::tls::certs_from_pem(&pem, "tenant.pem").map_err(|e| bad(e.to_string()))?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(der[0].as_ref()).map_err(|e| bad(e.to_string()))?;
    let ends = cert.validity().not_after.timestamp();
    if ends > (OffsetDateTime::now_utc() + margin).unix_timestamp() {
        return Ok(false);
    }
    let ca = Ca::load(files, domain)?;
    let bundle = ca.issue_tenant_client(
        tenant,
        "admin",
        Duration::days(i64::from(DEFAULT_TENANT_CERT_DAYS)),
    )?;
    write(&files.tenant_key(), bundle.key_pem.as_bytes(), true)?;
    write(&files.tenant_cert(), bundle.cert_pem.as_bytes(), false)?;
    Ok(true)
}

/// Writes the server key and its chain (server certificate, then root).
pub fn write_server(files: &CaFiles, server: &IssuedWithKey, ca: &Ca) -> Result<(), CaError> {
    write(&files.server_key(), server.key_pem.as_bytes(), true)?;
    let chain = format!("{}{}", server.cert_pem, ca.cert_pem());
    write(&files.server_cert(), chain.as_bytes(), false)
}

/// `sha256:<hex>` of the first certificate in a PEM string.
pub fn fingerprint_of_pem(pem: &str) -> Result<String, CaError> {
    let certs = edgepool_common::tls::certs_from_pem(pem, "CA certificate")
        .map_err(|e| CaError::BadCsr(e.to_string()))?;
    Ok(edgepool_common::tls::fingerprint(certs[0].as_ref()))
}

fn write(path: &Path, bytes: &[u8], private: bool) -> Result<(), CaError> {
    let r = if private {
        write_private(path, bytes)
    } else {
        write_public(path, bytes)
    };
    r.map_err(|source| CaError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|source| CaError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// 16 random bytes, top bit cleared so the DER integer stays positive.
pub(crate) fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    crate::random::fill(&mut bytes);
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

pub(crate) fn serial_hex(params: &CertificateParams) -> String {
    params
        .serial_number
        .as_ref()
        .map(|s| hex(&s.to_bytes()))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;
    use std::os::unix::fs::PermissionsExt;

    fn node_id(t: &str, n: &str) -> Identity {
        Identity::Node {
            domain: "test.local".into(),
            tenant: t.into(),
            node_id: n.into(),
        }
    }

    fn csr(key: &KeyPair) -> String {
        let params = CertificateParams::new(vec!["ignored.example".to_string()]).unwrap();
        params.serialize_request(key).unwrap().pem().unwrap()
    }

    #[test]
    fn init_writes_private_keys_0600_and_refuses_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let report = init(
            dir.path(),
            "test.local",
            &names,
            "default",
            Duration::days(30),
            false,
        )
        .unwrap();
        assert!(report.fingerprint.starts_with("sha256:"));
        for key in [
            report.files.ca_key(),
            report.files.server_key(),
            report.files.tenant_key(),
        ] {
            let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        let before = std::fs::read(report.files.ca_cert()).unwrap();
        let err = init(
            dir.path(),
            "test.local",
            &names,
            "default",
            Duration::days(30),
            false,
        )
        .err()
        .unwrap();
        assert!(matches!(err, CaError::Exists(_)), "{err}");
        assert_eq!(std::fs::read(report.files.ca_cert()).unwrap(), before);
        init(
            dir.path(),
            "test.local",
            &names,
            "default",
            Duration::days(30),
            true,
        )
        .unwrap();
        assert_ne!(std::fs::read(report.files.ca_cert()).unwrap(), before);
    }

    #[test]
    fn signed_node_cert_carries_identity_not_csr_names() {
        let ca = Ca::generate("test.local").unwrap();
        let key = KeyPair::generate().unwrap();
        let issued = ca
            .sign_node_csr(&csr(&key), &node_id("acme", "n1"), Duration::days(1))
            .unwrap();
        let der = edgepool_common::tls::certs_from_pem(&issued.cert_pem, "t").unwrap();
        assert_eq!(
            Identity::from_cert_der(der[0].as_ref()).unwrap(),
            node_id("acme", "n1")
        );
        assert_eq!(
            edgepool_common::identity::cert_serial_hex(der[0].as_ref()).unwrap(),
            issued.serial_hex
        );
        // The CSR's DNS name must not have been copied.
        let (_, cert) = x509_parser::parse_x509_certificate(der[0].as_ref()).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert_eq!(san.value.general_names.len(), 1);
        // Signed for the node's own key.
        assert_eq!(
            cert.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );
    }

    #[test]
    fn garbage_csr_is_refused() {
        let ca = Ca::generate("test.local").unwrap();
        let err = ca
            .sign_node_csr(
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                &node_id("a", "b"),
                Duration::days(1),
            )
            .err()
            .unwrap();
        assert!(matches!(err, CaError::BadCsr(_)), "{err}");
        assert!(
            ca.sign_node_csr("hello", &node_id("a", "b"), Duration::days(1))
                .is_err()
        );
    }

    #[test]
    fn issued_certs_verify_against_root_with_rustls() {
        let ca = Ca::generate("test.local").unwrap();
        let server = ca.issue_server(&["127.0.0.1".to_string()]).unwrap();
        let roots = edgepool_common::tls::roots(
            &edgepool_common::tls::certs_from_pem(ca.cert_pem(), "ca").unwrap(),
        )
        .unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots.into(),
            edgepool_common::tls::provider(),
        )
        .build()
        .unwrap();
        let leaf = edgepool_common::tls::certs_from_pem(&server.cert_pem, "s").unwrap();
        verifier
            .verify_server_cert(
                &leaf[0],
                &[],
                &rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap(),
                &[],
                rustls::pki_types::UnixTime::now(),
            )
            .unwrap();
    }

    #[test]
    fn a_tenant_bundle_ending_within_the_margin_is_issued_again() {
        let dir = tempfile::tempdir().unwrap();
        init(
            dir.path(),
            "test.local",
            &[],
            "default",
            Duration::days(1),
            false,
        )
        .unwrap();
        let files = CaFiles::new(dir.path());
        let before = std::fs::read_to_string(files.tenant_cert()).unwrap();
        assert!(renew_tenant_bundle(&files, "test.local", "default", Duration::days(7)).unwrap());
        let after = std::fs::read_to_string(files.tenant_cert()).unwrap();
        assert_ne!(before, after);
        // Now it lasts 30 days: nothing to do.
        assert!(!renew_tenant_bundle(&files, "test.local", "default", Duration::days(7)).unwrap());
        let der = edgepool_common::tls::certs_from_pem(&after, "t").unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(der[0].as_ref()).unwrap();
        let days = (cert.validity().not_after.timestamp()
            - OffsetDateTime::now_utc().unix_timestamp())
            / 86_400;
        assert_eq!(days, i64::from(DEFAULT_TENANT_CERT_DAYS));
        assert!(matches!(
            Identity::from_cert_der(der[0].as_ref()).unwrap(),
            Identity::Tenant { .. }
        ));
    }

    #[test]
    fn load_round_trips_and_keeps_signing() {
        let dir = tempfile::tempdir().unwrap();
        init(
            dir.path(),
            "test.local",
            &["localhost".into()],
            "default",
            Duration::days(30),
            false,
        )
        .unwrap();
        let ca = Ca::load(&CaFiles::new(dir.path()), "test.local").unwrap();
        let key = KeyPair::generate().unwrap();
        ca.sign_node_csr(&csr(&key), &node_id("t", "n"), Duration::hours(1))
            .unwrap();
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            Ca::load(&CaFiles::new(empty.path()), "x"),
            Err(CaError::Missing(_))
        ));
    }
}
