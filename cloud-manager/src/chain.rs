//! The certificate chain of a pool: an intermediate CA per pool, signed by
//! the root (path length 0, so it can sign only end-entity certificates),
//! and one member certificate per slot, signed by the pool CA for the key
//! the node already holds (taken from its identity certificate; no new key
//! is made or moved). Member certificates carry the URI SAN
//! `spiffe://<domain>/tenant/<t>/pool/<p>/member/<i>` and both serverAuth
//! and clientAuth, because members are both servers and clients of each
//! other on the peer port. Any two members verify each other with the pool
//! CA as the trust anchor (`edgepool_common::trust::MemberCheck`).
//!
//! A pool CA carries a critical name-constraints extension permitting only
//! its pool's SPIFFE path (`spiffe://<domain>/tenant/<t>/pool/<p>/`), so a
//! certificate its key signs is refused by any verifier that builds a path
//! through it to the root (the manager's port among them): pool CA keys
//! cannot mint tenant, node, manager or other pools' identities.

use edgepool_common::identity::Identity;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SubjectPublicKeyInfo,
};
use time::{Duration, OffsetDateTime};

use crate::ca::{Ca, CaError, SKEW, random_serial, serial_hex};
use edgepool_common::trust::{NAME_CONSTRAINTS_OID, pool_name_constraints, pool_prefix};

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
    let mut constraints = rcgen::CustomExtension::from_oid_content(
        NAME_CONSTRAINTS_OID,
        pool_name_constraints(&pool_prefix(ca.domain(), tenant, pool)),
    );
    constraints.set_criticality(true);
    params.custom_extensions = vec![constraints];
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

    /// The identity certificate of node `id` of tenant `t`, for `key`.
    fn node_cert(ca: &Ca, key: &KeyPair, id: &str) -> crate::ca::Issued {
        let csr = CertificateParams::default()
            .serialize_request(key)
            .unwrap()
            .pem()
            .unwrap();
        let node = Identity::Node {
            domain: "test.local".into(),
            tenant: "t".into(),
            node_id: id.into(),
        };
        ca.sign_node_csr(&csr, &node, Duration::days(1)).unwrap()
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
        // Verifies with its pool CA as the anchor, for its own pool only.
        let now = UnixTime::now();
        let check = |pool: &str| {
            edgepool_common::trust::MemberCheck::new(
                &der(&pool_ca.cert_pem),
                pool_prefix("test.local", "t", pool),
            )
        };
        assert_eq!(check("p").unwrap().server(&leaf, now).unwrap(), member(2));
        assert_eq!(check("p").unwrap().client(&leaf, now).unwrap(), member(2));
        assert!(check("q").is_err(), "the pool CA permits only pool p");
        // A path through the pool CA to the root is refused: the pool CA's
        // URI name constraint is one webpki does not apply, so it refuses
        // every URI name under it. This is what keeps pool CA keys away
        // from the manager's port.
        let roots = edgepool_common::tls::roots(&[der(ca.cert_pem())]).unwrap();
        let end = rustls::server::ParsedCertificate::try_from(&leaf).unwrap();
        let algs = edgepool_common::tls::provider()
            .signature_verification_algorithms
            .all;
        assert!(
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &end,
                &roots,
                &[der(&pool_ca.cert_pem)],
                now,
                algs,
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

    /// A certificate for `uri` with client and server auth, signed by
    /// `issuer`.
    fn minted(uri: &str, issuer: &Issuer<'_, KeyPair>) -> CertificateDer<'static> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params
            .subject_alt_names
            .push(rcgen::SanType::URI(uri.try_into().unwrap()));
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        der(&params.signed_by(&key, issuer).unwrap().pem())
    }

    #[test]
    fn identities_minted_with_a_pool_ca_key_are_refused() {
        use edgepool_common::trust::{IssuerVerifier, MemberCheck, RootIssued};
        let ca = Ca::generate("test.local").unwrap();
        let root = der(ca.cert_pem());
        let pool_ca = issue_pool_ca(&ca, "t", "p").unwrap();
        let other_ca = issue_pool_ca(&ca, "t", "q").unwrap();
        let pool_key = KeyPair::from_pem(&pool_ca.key_pem).unwrap();
        let pool_issuer = Issuer::from_ca_cert_pem(&pool_ca.cert_pem, pool_key).unwrap();
        let now = UnixTime::now();
        let manager_side =
            IssuerVerifier::new(RootIssued::new(&root).unwrap(), None, false, |_, _| Ok(()));
        let peer_side = IssuerVerifier::new(
            RootIssued::new(&root).unwrap(),
            Some(
                MemberCheck::new(&der(&pool_ca.cert_pem), pool_prefix("test.local", "t", "p"))
                    .unwrap(),
            ),
            true,
            |_, _| Ok(()),
        );
        // The root's own tenant certificate passes both.
        let tenant = ca
            .issue_tenant_client("t", "admin", Duration::days(1))
            .unwrap();
        assert!(manager_side.check(&der(&tenant.cert_pem), now).is_ok());
        assert!(peer_side.check(&der(&tenant.cert_pem), now).is_ok());
        // Tenant, node and manager names and another pool's member, minted
        // with pool p's key: refused on both sides.
        for uri in [
            "spiffe://test.local/tenant/t/user/admin",
            "spiffe://test.local/tenant/t2/user/admin",
            "spiffe://test.local/tenant/t/node/n1",
            "spiffe://test.local/manager",
            "spiffe://test.local/tenant/t/pool/q/member/1",
        ] {
            let forged = minted(uri, &pool_issuer);
            assert!(
                manager_side.check(&forged, now).is_err(),
                "manager accepted {uri}"
            );
            assert!(
                peer_side.check(&forged, now).is_err(),
                "peer accepted {uri}"
            );
        }
        // Its own pool's member name: only a member of that pool accepts it.
        let member = minted("spiffe://test.local/tenant/t/pool/p/member/1", &pool_issuer);
        assert!(peer_side.check(&member, now).is_ok());
        assert!(manager_side.check(&member, now).is_err());
        // A member of pool p signed by pool q's CA: refused by p's members.
        let q_key = KeyPair::from_pem(&other_ca.key_pem).unwrap();
        let q_issuer = Issuer::from_ca_cert_pem(&other_ca.cert_pem, q_key).unwrap();
        let cross = minted("spiffe://test.local/tenant/t/pool/p/member/1", &q_issuer);
        assert!(peer_side.check(&cross, now).is_err());
    }

    #[test]
    fn the_pool_ca_permits_exactly_its_pool_path() {
        let ca = Ca::generate("test.local").unwrap();
        let pool_ca = issue_pool_ca(&ca, "t", "p").unwrap();
        assert_eq!(
            edgepool_common::trust::permitted_uri(der(&pool_ca.cert_pem).as_ref()).as_deref(),
            Some("spiffe://test.local/tenant/t/pool/p/")
        );
    }

    #[test]
    fn a_member_dialing_a_peer_checks_the_slot_and_the_serial_it_holds() {
        use edgepool_common::trust::{MemberCheck, MemberServerVerifier};
        use rustls::client::danger::ServerCertVerifier;
        let ca = Ca::generate("test.local").unwrap();
        let pool_ca = issue_pool_ca(&ca, "t", "p").unwrap();
        let node = node_cert(&ca, &KeyPair::generate().unwrap(), "n2");
        let old = issue_member(
            &ca,
            &pool_ca,
            &member(2),
            &node.cert_pem,
            Duration::hours(1),
        )
        .unwrap();
        let new = issue_member(
            &ca,
            &pool_ca,
            &member(2),
            &node.cert_pem,
            Duration::hours(1),
        )
        .unwrap();
        let check =
            MemberCheck::new(&der(&pool_ca.cert_pem), pool_prefix("test.local", "t", "p")).unwrap();
        let name = rustls::pki_types::ServerName::try_from("peer").unwrap();
        let dial = |expected: Identity, serial: &str, cert: &MemberCert| {
            MemberServerVerifier::new(check.clone(), expected, serial.to_string())
                .verify_server_cert(&der(&cert.cert_pem), &[], &name, &[], UnixTime::now())
                .map(|_| ())
        };
        // The membership holds the new serial: the new certificate passes,
        // the replaced one fails, and so does the right one for a wrong slot.
        assert!(dial(member(2), &new.serial_hex, &new).is_ok());
        let stale = dial(member(2), &new.serial_hex, &old).unwrap_err();
        assert!(stale.to_string().contains("replaced or revoked"), "{stale}");
        assert!(dial(member(3), &new.serial_hex, &new).is_err());
    }

    /// The offline grace (issue 14): an expired member certificate passes
    /// both sides of the handshake only while the checking member is cut
    /// off from the manager, only within the window after its expiry, and
    /// only with the serial the held membership lists for its slot.
    #[test]
    fn an_expired_member_certificate_passes_only_offline_within_the_window() {
        use edgepool_common::trust::{
            IssuerVerifier, MemberCheck, MemberServerVerifier, OfflineGrace, RootIssued,
        };
        use rustls::client::danger::ServerCertVerifier;
        let ca = Ca::generate("test.local").unwrap();
        let pool_ca = issue_pool_ca(&ca, "t", "p").unwrap();
        let other_ca = issue_pool_ca(&ca, "t", "p").unwrap();
        let node = node_cert(&ca, &KeyPair::generate().unwrap(), "n2");
        let issue = || {
            issue_member(
                &ca,
                &pool_ca,
                &member(2),
                &node.cert_pem,
                Duration::hours(1),
            )
            .unwrap()
        };
        let (held, replaced) = (issue(), issue());
        let grace = OfflineGrace::new(std::time::Duration::from_secs(3 * 3600));
        let check = |ca_pem: &str| {
            MemberCheck::new(&der(ca_pem), pool_prefix("test.local", "t", "p"))
                .unwrap()
                .with_grace(grace.clone())
        };
        let at = |hours: u64| {
            UnixTime::since_unix_epoch(std::time::Duration::from_secs(
                UnixTime::now().as_secs() + hours * 3600,
            ))
        };
        let name = rustls::pki_types::ServerName::try_from("peer").unwrap();
        let dial = |ca_pem: &str, slot: u32, cert: &MemberCert, hours: u64| {
            MemberServerVerifier::new(check(ca_pem), member(slot), held.serial_hex.clone())
                .verify_server_cert(&der(&cert.cert_pem), &[], &name, &[], at(hours))
                .map(|_| ())
        };
        let held_serial = held.serial_hex.clone();
        let root = RootIssued::new(&der(ca.cert_pem())).unwrap();
        let server = |ca_pem: &str| {
            let held_serial = held_serial.clone();
            IssuerVerifier::new(
                root.clone(),
                Some(check(ca_pem)),
                true,
                move |id, serial| match id {
                    Identity::Member { slot: 2, .. } if serial == held_serial => Ok(()),
                    _ => Err(format!(
                        "{id} with serial {serial} is not in the membership"
                    )),
                },
            )
        };
        let accept = |ca_pem: &str, cert: &MemberCert, hours: u64| {
            server(ca_pem)
                .check(&der(&cert.cert_pem), at(hours))
                .map(|_| ())
        };
        let pool = pool_ca.cert_pem.clone();
        // Connected to the manager: expired is expired, on both sides.
        assert!(dial(&pool, 2, &held, 2).is_err());
        assert!(accept(&pool, &held, 2).is_err());
        grace.set_offline(true);
        // Cut off: the held serial passes an hour after its expiry, on both
        // sides, and while still valid as before.
        assert!(dial(&pool, 2, &held, 0).is_ok());
        assert!(dial(&pool, 2, &held, 2).is_ok());
        assert!(accept(&pool, &held, 2).is_ok());
        // Past the window (3 h after the expiry): refused.
        assert!(dial(&pool, 2, &held, 5).is_err());
        assert!(accept(&pool, &held, 5).is_err());
        // A replaced serial, a wrong slot, another pool CA: refused.
        assert!(dial(&pool, 2, &replaced, 2).is_err());
        assert!(accept(&pool, &replaced, 2).is_err());
        assert!(dial(&pool, 3, &held, 2).is_err());
        assert!(dial(&other_ca.cert_pem, 2, &held, 2).is_err());
        assert!(accept(&other_ca.cert_pem, &held, 2).is_err());
        // Back in touch with the manager: refused again.
        grace.set_offline(false);
        assert!(dial(&pool, 2, &held, 2).is_err());
        assert!(accept(&pool, &held, 2).is_err());
    }
}
