//! `casf-verifier dev-token`: a JWT for the quickstart, signed with the dev
//! key in `envoy/dev/jwks.json`.
//!
//! The Envoy door takes the caller's role and tenant only from verified JWT
//! claims, so a newcomer needs a token that some Envoy trusts before any call
//! can be allowed. The dev Envoy configs (`envoy/envoy-dev.yaml`,
//! `deploy/compose/envoy.yaml`) trust this key and nothing else does: the key
//! is public, shipped in the repository, and must never be configured in a
//! production identity provider. The key is compiled in so that the command
//! works the same from a checkout and inside the container.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::domain::Role;

/// The dev JWKS, as the dev Envoy configs load it.
pub const DEV_JWKS: &str = include_str!("../envoy/dev/jwks.json");
/// The `iss` the dev Envoy configs require.
pub const DEV_ISSUER: &str = "casf-dev";
/// The `aud` the dev Envoy configs require, as the production one does.
pub const DEV_AUDIENCE: &str = "casf-tools";

#[derive(Debug, thiserror::Error)]
pub enum DevTokenError {
    #[error("the dev JWKS is malformed: {0}")]
    Jwks(&'static str),
}

/// The claims of a dev token. Claim names are the shipped route map's
/// (`identity.jwt.role_claim` and `tenant_claim`).
pub struct DevClaims<'a> {
    pub subject: &'a str,
    pub role: Role,
    pub tenant: &'a str,
    pub ttl_seconds: u64,
    /// Seconds since the epoch.
    pub now: i64,
}

/// An HS256 JWT for `claims`, signed with the dev key.
pub fn mint(claims: &DevClaims<'_>) -> Result<String, DevTokenError> {
    let (kid, key) = dev_key()?;
    let header = json!({"alg": "HS256", "typ": "JWT", "kid": kid});
    let payload = json!({
        "iss": DEV_ISSUER,
        "aud": DEV_AUDIENCE,
        "sub": claims.subject,
        "iat": claims.now,
        "exp": claims.now.saturating_add_unsigned(claims.ttl_seconds),
        "casf_role": claims.role.as_str(),
        "casf_tenant_id": claims.tenant,
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(payload.to_string())
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).map_err(|_| DevTokenError::Jwks("key"))?;
    mac.update(signing_input.as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    Ok(format!("{signing_input}.{signature}"))
}

/// The `kid` and raw bytes of the one HS256 key in [`DEV_JWKS`].
fn dev_key() -> Result<(String, Vec<u8>), DevTokenError> {
    let jwks: Value = serde_json::from_str(DEV_JWKS).map_err(|_| DevTokenError::Jwks("JSON"))?;
    let key = &jwks["keys"][0];
    if key["kty"] != "oct" || key["alg"] != "HS256" {
        return Err(DevTokenError::Jwks("keys[0] is not an HS256 oct key"));
    }
    let kid = key["kid"]
        .as_str()
        .ok_or(DevTokenError::Jwks("keys[0].kid"))?;
    let secret = key["k"].as_str().ok_or(DevTokenError::Jwks("keys[0].k"))?;
    let secret = URL_SAFE_NO_PAD
        .decode(secret)
        .map_err(|_| DevTokenError::Jwks("keys[0].k is not base64url"))?;
    Ok((kid.to_owned(), secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(part: &str) -> Value {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
    }

    #[test]
    fn a_token_carries_the_route_maps_claims_and_expires() {
        let token = mint(&DevClaims {
            subject: "alice",
            role: Role::Receptionist,
            tenant: "clinic-a",
            ttl_seconds: 600,
            now: 1_000,
        })
        .unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        assert_eq!(decode(parts[0])["kid"], "casf-dev");
        let claims = decode(parts[1]);
        assert_eq!(claims["casf_role"], "receptionist");
        assert_eq!(claims["casf_tenant_id"], "clinic-a");
        assert_eq!(claims["iss"], DEV_ISSUER);
        assert_eq!(claims["exp"], 1_600);
    }

    /// RFC 4231 test case 2 through the same HMAC the tokens use, so a
    /// signature that Envoy rejects is not a wrong MAC.
    #[test]
    fn the_mac_is_hmac_sha256() {
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn the_signature_covers_the_claims() {
        let claims = |tenant| DevClaims {
            subject: "alice",
            role: Role::Doctor,
            tenant,
            ttl_seconds: 60,
            now: 0,
        };
        let a = mint(&claims("clinic-a")).unwrap();
        let b = mint(&claims("clinic-b")).unwrap();
        assert_ne!(a.rsplit('.').next(), b.rsplit('.').next());
    }
}
