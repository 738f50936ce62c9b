//! Who a certificate speaks for.
//!
//! Every certificate edgepool issues carries exactly one URI SAN in the
//! SPIFFE form `spiffe://<domain>/...`. The manager and the agents take the
//! caller's identity from that SAN of the *verified* peer certificate and
//! from nothing else (never from message fields).

use std::fmt;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The identity a certificate carries.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Identity {
    /// The manager's server certificate: `spiffe://<domain>/manager`.
    Manager { domain: String },
    /// An enrolled edge node: `spiffe://<domain>/tenant/<t>/node/<id>`.
    Node {
        domain: String,
        tenant: String,
        node_id: String,
    },
    /// A tenant's API client: `spiffe://<domain>/tenant/<t>/user/<name>`.
    Tenant {
        domain: String,
        tenant: String,
        user: String,
    },
    /// Slot `slot` (1..M) of a pool:
    /// `spiffe://<domain>/tenant/<t>/pool/<p>/member/<slot>`.
    Member {
        domain: String,
        tenant: String,
        pool: String,
        slot: u32,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("certificate could not be parsed: {0}")]
    BadCertificate(String),
    #[error("certificate has no spiffe:// URI SAN")]
    NoSpiffeUri,
    #[error("certificate has more than one spiffe:// URI SAN")]
    AmbiguousUri,
    #[error("malformed identity URI {0:?}")]
    BadUri(String),
    #[error("invalid {what} {value:?}: {why}")]
    BadName {
        what: &'static str,
        value: String,
        why: &'static str,
    },
}

impl Identity {
    pub fn domain(&self) -> &str {
        match self {
            Identity::Manager { domain }
            | Identity::Node { domain, .. }
            | Identity::Tenant { domain, .. }
            | Identity::Member { domain, .. } => domain,
        }
    }

    /// The tenant this identity acts for, if any.
    pub fn tenant(&self) -> Option<&str> {
        match self {
            Identity::Manager { .. } => None,
            Identity::Node { tenant, .. }
            | Identity::Tenant { tenant, .. }
            | Identity::Member { tenant, .. } => Some(tenant),
        }
    }

    pub fn to_uri(&self) -> String {
        self.to_string()
    }

    /// Parses `spiffe://<domain>/...` into an identity, validating every name.
    pub fn parse_uri(uri: &str) -> Result<Identity, IdentityError> {
        let bad = || IdentityError::BadUri(uri.to_string());
        let rest = uri.strip_prefix("spiffe://").ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split('/').collect();
        let domain = parts.first().copied().ok_or_else(bad)?;
        validate_domain(domain)?;
        let domain = domain.to_string();
        match parts[1..] {
            ["manager"] => Ok(Identity::Manager { domain }),
            ["tenant", t, "node", n] => {
                validate_name("tenant", t)?;
                validate_name("node id", n)?;
                Ok(Identity::Node {
                    domain,
                    tenant: t.into(),
                    node_id: n.into(),
                })
            }
            ["tenant", t, "user", u] => {
                validate_name("tenant", t)?;
                validate_name("user", u)?;
                Ok(Identity::Tenant {
                    domain,
                    tenant: t.into(),
                    user: u.into(),
                })
            }
            ["tenant", t, "pool", p, "member", i] => {
                validate_name("tenant", t)?;
                validate_name("pool", p)?;
                // Canonical decimal only (no sign, no leading zeros), so the
                // URI form of a slot is unique.
                let slot: u32 = i.parse().map_err(|_| bad())?;
                if slot == 0 || slot.to_string() != i {
                    return Err(bad());
                }
                Ok(Identity::Member {
                    domain,
                    tenant: t.into(),
                    pool: p.into(),
                    slot,
                })
            }
            _ => Err(bad()),
        }
    }

    /// Reads the identity out of a DER certificate. The caller must already
    /// have verified the certificate's chain (the TLS handshake does).
    pub fn from_cert_der(der: &[u8]) -> Result<Identity, IdentityError> {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
        let mut uris = san
            .into_iter()
            .flat_map(|s| s.value.general_names.iter())
            .filter_map(|n| match n {
                GeneralName::URI(u) if u.starts_with("spiffe://") => Some(*u),
                _ => None,
            });
        let first = uris.next().ok_or(IdentityError::NoSpiffeUri)?;
        if uris.next().is_some() {
            return Err(IdentityError::AmbiguousUri);
        }
        Identity::parse_uri(first)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Manager { domain } => write!(f, "spiffe://{domain}/manager"),
            Identity::Node {
                domain,
                tenant,
                node_id,
            } => write!(f, "spiffe://{domain}/tenant/{tenant}/node/{node_id}"),
            Identity::Tenant {
                domain,
                tenant,
                user,
            } => write!(f, "spiffe://{domain}/tenant/{tenant}/user/{user}"),
            Identity::Member {
                domain,
                tenant,
                pool,
                slot,
            } => write!(
                f,
                "spiffe://{domain}/tenant/{tenant}/pool/{pool}/member/{slot}"
            ),
        }
    }
}

/// Hex serial number of a DER certificate (lower case, no separators).
pub fn cert_serial_hex(der: &[u8]) -> Result<String, IdentityError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    Ok(hex(cert.raw_serial()))
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Names (tenants, node ids, users): 1-63 chars of `[a-z0-9-]`, not starting
/// or ending with `-`. They appear in URIs, file names and log lines, so the
/// alphabet is kept small on purpose.
pub fn validate_name(what: &'static str, value: &str) -> Result<(), IdentityError> {
    let err = |why| IdentityError::BadName {
        what,
        value: value.to_string(),
        why,
    };
    if value.is_empty() || value.len() > 63 {
        return Err(err("must be 1 to 63 characters"));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(err("only lower-case letters, digits and '-' are allowed"));
    }
    if value.starts_with('-') || value.ends_with('-') {
        return Err(err("must not start or end with '-'"));
    }
    Ok(())
}

/// Trust domains are DNS-like: labels of `[a-z0-9-]` separated by dots.
pub fn validate_domain(value: &str) -> Result<(), IdentityError> {
    if value.is_empty() || value.len() > 253 {
        return Err(IdentityError::BadName {
            what: "trust domain",
            value: value.to_string(),
            why: "must be 1 to 253 characters",
        });
    }
    for label in value.split('.') {
        validate_name("trust domain label", label)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_round_trip() {
        for uri in [
            "spiffe://edgepool.local/manager",
            "spiffe://edgepool.local/tenant/acme/node/dev-1",
            "spiffe://a.b/tenant/t1/user/admin",
            "spiffe://a.b/tenant/t1/pool/p-1/member/3",
        ] {
            let id = Identity::parse_uri(uri).unwrap();
            assert_eq!(id.to_uri(), uri);
        }
    }

    #[test]
    fn rejects_bad_uris() {
        for uri in [
            "https://edgepool.local/manager",
            "spiffe://edgepool.local/tenant/acme/node",
            "spiffe://edgepool.local/tenant/ACME/node/x",
            "spiffe://edgepool.local/tenant/acme/node/x/extra",
            "spiffe://edgepool.local/tenant/acme/node/-x",
            "spiffe:///manager",
            "spiffe://edgepool.local/tenant/../node/x",
            "spiffe://d/tenant/t/pool/p/member/0",
            "spiffe://d/tenant/t/pool/p/member/01",
            "spiffe://d/tenant/t/pool/p/member/+1",
            "spiffe://d/tenant/t/pool/p/member/x",
        ] {
            assert!(Identity::parse_uri(uri).is_err(), "{uri} accepted");
        }
    }

    #[test]
    fn reads_identity_from_certificate() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://d.example/tenant/acme/node/n1".try_into().unwrap(),
        ));
        let cert = params.self_signed(&key).unwrap();
        let id = Identity::from_cert_der(cert.der()).unwrap();
        assert_eq!(
            id,
            Identity::Node {
                domain: "d.example".into(),
                tenant: "acme".into(),
                node_id: "n1".into()
            }
        );
        assert_eq!(id.tenant(), Some("acme"));
    }

    #[test]
    fn certificate_without_uri_is_refused() {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(
            Identity::from_cert_der(cert.der()),
            Err(IdentityError::NoSpiffeUri)
        );
    }

    #[test]
    fn certificate_with_two_uris_is_refused() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        for u in [
            "spiffe://d/tenant/a/node/n1",
            "spiffe://d/tenant/b/user/admin",
        ] {
            params
                .subject_alt_names
                .push(rcgen::SanType::URI(u.try_into().unwrap()));
        }
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(
            Identity::from_cert_der(cert.der()),
            Err(IdentityError::AmbiguousUri)
        );
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        assert!(matches!(
            Identity::from_cert_der(b"not a certificate"),
            Err(IdentityError::BadCertificate(_))
        ));
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        fn name() -> impl Strategy<Value = String> {
            "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?"
        }

        proptest! {
            #[test]
            fn valid_identities_round_trip(d in name(), t in name(), n in name(), node in any::<bool>()) {
                let id = if node {
                    Identity::Node { domain: d, tenant: t, node_id: n }
                } else {
                    Identity::Tenant { domain: d, tenant: t, user: n }
                };
                prop_assert_eq!(Identity::parse_uri(&id.to_uri()), Ok(id));
            }

            #[test]
            fn parsing_never_panics_and_accepts_only_canonical_uris(s in "\\PC{0,80}") {
                if let Ok(id) = Identity::parse_uri(&s) {
                    prop_assert_eq!(id.to_uri(), s);
                }
            }

            #[test]
            fn der_parsing_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
                let _ = Identity::from_cert_der(&bytes);
                let _ = cert_serial_hex(&bytes);
            }
        }
    }
}
