//! The certificate chain of a pool: an intermediate CA per pool, signed by
//! the root (path length 0, so it can sign only end-entity certificates),
//! and one member certificate per slot, signed by the pool CA for the key
//! the node already holds (taken from its identity certificate; no new key
//! is made or moved). Member certificates carry the URI SAN
//! `spiffe://<domain>/tenant/<t>/pool/<p>/member/<i>` and both serverAuth
//! and clientAuth, because members are both servers and clients of each
//! other on the peer port. Any two members verify each other against the
//! root CA with the pool CA as intermediate.

use edgepool_common::identity::Identity;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SubjectPublicKeyInfo,
};
use time::{Duration, OffsetDateTime};

use crate::ca::{Ca, CaError, SKEW, random_serial, serial_hex};

/// Lifetime of a pool CA.
const POOL_CA_VALIDITY: Duration = Duration::days(5 * 365);

/// A pool's intermediate CA (the key is kept in the manager's store, 0600).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PoolCa {
    pub cert_pem: String,
    pub key_pem: String,
}

/// One member certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberCert {
    pub cert_pem: String,
    pub serial_hex: String,
    pub not_after_ms: u64,
}

/// Creates the intermediate CA of pool `pool` of `tenant`.
pub fn issue_pool_ca(ca: &Ca, tenant: &str, pool: &str) -> Result<PoolCa, CaError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        format!("edgepool pool CA {tenant}/{pool}"),
    );
    dn.push(DnType::OrganizationName, "edgepool");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.use_authority_key_identifier_extension = true;
    let now = OffsetDateTime::now_utc();
    params.not_before = now - SKEW;
    params.not_after = now + POOL_CA_VALIDITY;
    params.serial_number = Some(random_serial());
    let cert = params.signed_by(&key, ca.issuer())?;
    Ok(PoolCa {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Issues the member certificate of `identity` (a `Member`) for the public
/// key in `node_cert_pem`, signed by `pool_ca`, valid for `validity`.
pub fn issue_member(
    ca: &Ca,
    pool_ca: &PoolCa,
    identity: &Identity,
    node_cert_pem: &str,
    validity: Duration,
) -> Result<MemberCert, CaError> {
    let key = KeyPair::from_pem(&pool_ca.key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&pool_ca.cert_pem, key)?;
    let public_key = node_public_key(node_cert_pem)?;
    let name = match identity {
        Identity::Member { pool, slot, .. } => format!("{pool} member {slot}"),
        other => other.to_uri(),
    };
    let mut params: CertificateParams = ca.leaf_params(identity, validity, &name)?;
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let serial_hex = serial_hex(&params);
    let not_after_ms = (params.not_after.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
    let cert = params.signed_by(&public_key, &issuer)?;
    Ok(MemberCert {
        cert_pem: cert.pem(),
        serial_hex,
        not_after_ms,
    })
}

/// The subject public key of a PEM certificate.
fn node_public_key(cert_pem: &str) -> Result<SubjectPublicKeyInfo, CaError> {
    let der = edgepool_common::tls::certs_from_pem(cert_pem, "node certificate")
        .map_err(|e| CaError::BadCsr(e.to_string()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(der[0].as_ref())
        .map_err(|e| CaError::BadCsr(e.to_string()))?;
    Ok(SubjectPublicKeyInfo::from_der(cert.public_key().raw)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{CertificateDer, UnixTime};

    fn member(slot: u32) -> Identity {
        Identity::Member {
            domain: "test.local".into(),
            tenant: "t".into(),
            pool: "p".into(),
            slot,
        }
    }

    fn der(pem: &str) -> CertificateDer<'static> {
        edgepool_common::tls::certs_from_pem(pem, "t")
            .unwrap()
            .remove(0)
    }

    #[test]
    fn members_verify_through_the_pool_ca_for_the_nodes_own_key() {
        let ca = Ca::generate("test.local").unwrap();
        let pool_ca = issue_pool_ca(&ca, "t", "p").unwrap();
        // The node's identity certificate, for a key only the node has.
        let node_key = KeyPair::generate().unwrap();
        let csr = CertificateParams::default()
            .serialize_request(&node_key)
            .unwrap()
            .pem()
            .unwrap();
        let node = ca
            .sign_node_csr(
                &csr,
                &Identity::Node {
                    domain: "test.local".into(),
                    tenant: "t".into(),
                    node_id: "n1".into(),
                },
                Duration::days(1),
            )
            .unwrap();
        let m = issue_member(
            &ca,
            &pool_ca,
            &member(2),
            &node.cert_pem,
            Duration::hours(24),
        )
        .unwrap();

        let leaf = der(&m.cert_pem);
        assert_eq!(Identity::from_cert_der(leaf.as_ref()).unwrap(), member(2));
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref()).unwrap();
        assert_eq!(
            parsed.public_key().subject_public_key.data.as_ref(),
            node_key.public_key_raw(),
            "member certificate must be for the node's own key"
        );
        // Verifies against the root with the pool CA as intermediate, and
        // not without it.
        let roots = edgepool_common::tls::roots(&[der(ca.cert_pem())]).unwrap();
        let end = rustls::server::ParsedCertificate::try_from(&leaf).unwrap();
        let algs = edgepool_common::tls::provider()
            .signature_verification_algorithms
            .all;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &end,
            &roots,
            &[der(&pool_ca.cert_pem)],
            UnixTime::now(),
            algs,
        )
        .unwrap();
        assert!(
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &end,
                &roots,
                &[],
                UnixTime::now(),
                algs
            )
            .is_err()
        );
        let expected_ms =
            (OffsetDateTime::now_utc() + Duration::hours(24)).unix_timestamp() as u64 * 1000;
        assert!(m.not_after_ms.abs_diff(expected_ms) < 60_000);
    }

    #[test]
    fn pool_ca_cannot_sign_another_ca() {
        let ca = Ca::generate("test.local").unwrap();
        let pool_ca = issue_pool_ca(&ca, "t", "p").unwrap();
        let ca_der = der(&pool_ca.cert_pem);
        let (_, parsed) = x509_parser::parse_x509_certificate(ca_der.as_ref()).unwrap();
        let bc = parsed.basic_constraints().unwrap().unwrap().value;
        assert!(bc.ca);
        assert_eq!(bc.path_len_constraint, Some(0));
    }
}
