//! The dashboard's tokens (pure but for the key): login links and session
//! cookies, both HMAC-SHA256-signed with a key made at random when the
//! manager starts and never written anywhere.
//!
//! A token is `edash1.<kind>.<tenant>.<expires_ms>.<nonce>.<mac>`: the kind
//! (`login` or `session`, so that one never passes for the other), the
//! tenant it shows, its expiry (Unix ms), 16 random hex digits and the MAC
//! of everything before it (64 hex digits). Tenant names are `[a-z0-9-]`
//! (checked when a tenant certificate is issued and again here), so the
//! dots split a token unambiguously and a token is safe in a URL and in a
//! cookie. Nothing is stored: a manager restart (a new key) ends every
//! link and session.

use ring::hmac;

const PREFIX: &str = "edash1";

/// What a token is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// In a login link (`/login?token=`): exchanged for a session.
    Login,
    /// In the session cookie: checked on every data request.
    Session,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Login => "login",
            Kind::Session => "session",
        }
    }
}

/// A token's content, once its MAC checked out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claims {
    pub tenant: String,
    pub expires_ms: u64,
}

/// Why a token was refused (each answered 401).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("not a dashboard token")]
    Malformed,
    #[error("the token's signature is wrong (forged, or from before the manager restarted)")]
    BadSignature,
    #[error("a {0} token is not accepted here")]
    WrongKind(&'static str),
    #[error("the token has expired")]
    Expired,
}

/// The signing key of one manager run.
pub struct Keys {
    key: hmac::Key,
}

impl Keys {
    /// A fresh random key.
    pub fn random() -> Keys {
        let mut secret = [0u8; 32];
        crate::random::fill(&mut secret);
        Keys::from_secret(&secret)
    }

    pub fn from_secret(secret: &[u8]) -> Keys {
        Keys {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    /// A token of `kind` for `tenant`, valid until `expires_ms`.
    pub fn mint(&self, kind: Kind, tenant: &str, expires_ms: u64) -> String {
        let body = format!(
            "{PREFIX}.{}.{tenant}.{expires_ms}.{}",
            kind.name(),
            crate::random::hex_token(8)
        );
        let mac = hmac::sign(&self.key, body.as_bytes());
        format!("{body}.{}", hex(mac.as_ref()))
    }

    /// The claims of `token` if it is a genuine, unexpired token of `kind`.
    pub fn verify(&self, kind: Kind, token: &str, now_ms: u64) -> Result<Claims, TokenError> {
        let (body, mac_hex) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let mac = unhex(mac_hex).ok_or(TokenError::Malformed)?;
        hmac::verify(&self.key, body.as_bytes(), &mac).map_err(|_| TokenError::BadSignature)?;
        let parts: Vec<&str> = body.split('.').collect();
        let [prefix, got_kind, tenant, expires, _nonce] = parts[..] else {
            return Err(TokenError::Malformed);
        };
        if prefix != PREFIX || edgepool_common::identity::validate_name("tenant", tenant).is_err() {
            return Err(TokenError::Malformed);
        }
        if got_kind != kind.name() {
            return Err(TokenError::WrongKind(match got_kind {
                "login" => "login",
                "session" => "session",
                _ => return Err(TokenError::Malformed),
            }));
        }
        let expires_ms: u64 = expires.parse().map_err(|_| TokenError::Malformed)?;
        if now_ms >= expires_ms {
            return Err(TokenError::Expired);
        }
        Ok(Claims {
            tenant: tenant.to_string(),
            expires_ms,
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || s.len() > 128 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minted_token_verifies_for_its_kind_and_tenant_only() {
        let keys = Keys::from_secret(b"k");
        let t = keys.mint(Kind::Login, "acme", 2_000);
        assert_eq!(
            keys.verify(Kind::Login, &t, 1_000),
            Ok(Claims {
                tenant: "acme".into(),
                expires_ms: 2_000
            })
        );
        assert_eq!(
            keys.verify(Kind::Session, &t, 1_000),
            Err(TokenError::WrongKind("login"))
        );
        assert_eq!(
            keys.verify(Kind::Login, &t, 2_000),
            Err(TokenError::Expired)
        );
    }

    #[test]
    fn forged_and_foreign_tokens_are_refused() {
        let keys = Keys::from_secret(b"k");
        let other = Keys::from_secret(b"another run");
        let t = keys.mint(Kind::Session, "acme", 2_000);
        assert_eq!(
            other.verify(Kind::Session, &t, 1_000),
            Err(TokenError::BadSignature)
        );
        // Another tenant or a later expiry under the same MAC.
        for forged in [
            t.replacen(".acme.", ".evil.", 1),
            t.replacen(".2000.", ".9999999.", 1),
        ] {
            assert_eq!(
                keys.verify(Kind::Session, &forged, 1_000),
                Err(TokenError::BadSignature)
            );
        }
        for junk in ["", "x", "a.b", "edash1.session.acme.2000.00.zz"] {
            assert!(keys.verify(Kind::Session, junk, 1_000).is_err(), "{junk}");
        }
    }
}
