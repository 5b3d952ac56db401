//! Ed25519 keys and signatures for audit checkpoints and digests.
//!
//! A hash chain proves that rows were not changed in place, but a chain cut
//! short, or rebuilt from scratch, is still a valid chain. A signature over
//! the head (a checkpoint) or over a day's digest, made with a key the
//! attacker does not hold, is what ties the trail to what it was.
//!
//! Keys are PEM files that OpenSSL and Python's `cryptography` read as they
//! are: the private key as PKCS#8 (`BEGIN PRIVATE KEY`, file mode 0600), the
//! public key as SubjectPublicKeyInfo (`BEGIN PUBLIC KEY`). A key's id is the
//! hex SHA-256 of its public key's DER, which
//! `openssl pkey -pubin -in KEY -outform DER | sha256sum` also prints.
//!
//! A signed document is a JSON object with a `signature` member: the base64
//! Ed25519 signature of the canonical JSON ([`crate::canonical`]) of the
//! object without that member.

use std::io::Write;
use std::path::Path;

use base64::Engine;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::canonical;

/// The member of a signed document that holds the signature.
pub const SIGNATURE: &str = "signature";
/// The member naming the key that signed ([`key_id`]); part of what is signed.
pub const KEY_ID: &str = "key_id";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the key file {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("{path} is not an Ed25519 {what} in PEM ({expected}): {reason}")]
    Format {
        path: String,
        what: &'static str,
        expected: &'static str,
        reason: String,
    },
    #[error("cannot write {path}: {reason}")]
    Write { path: String, reason: String },
    #[error("cannot encode the key: {0}")]
    Encode(String),
    #[error("no randomness for a new key: {0}")]
    Random(String),
}

fn shown(path: &Path) -> String {
    path.display().to_string()
}

/// The private key that signs checkpoints and digests (`CASF_AUDIT_SIGNING_KEY`).
/// Its bytes never leave this type: `Debug` shows the key id only, and the
/// key is zeroed when dropped.
pub struct AuditSigningKey {
    key: SigningKey,
    id: String,
}

impl std::fmt::Debug for AuditSigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditSigningKey")
            .field("key_id", &self.id)
            .finish_non_exhaustive()
    }
}

impl AuditSigningKey {
    /// Reads a PKCS#8 PEM Ed25519 private key (ours or `openssl genpkey
    /// -algorithm ed25519`). Errors never quote the file's content.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let text = read(path)?;
        let key = SigningKey::from_pkcs8_pem(&text).map_err(|e| KeyError::Format {
            path: shown(path),
            what: "private key",
            expected: "PKCS#8, BEGIN PRIVATE KEY",
            reason: e.to_string(),
        })?;
        Ok(Self::from_key(key))
    }

    fn from_key(key: SigningKey) -> Self {
        let id = key_id(&key.verifying_key());
        AuditSigningKey { key, id }
    }

    /// A fresh key from the operating system's randomness.
    pub fn generate() -> Result<Self, KeyError> {
        let mut seed = zeroize::Zeroizing::new([0u8; 32]);
        getrandom::fill(seed.as_mut()).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(Self::from_key(SigningKey::from_bytes(&seed)))
    }

    pub fn key_id(&self) -> &str {
        &self.id
    }

    pub fn public_key(&self) -> AuditPublicKey {
        AuditPublicKey {
            key: self.key.verifying_key(),
            id: self.id.clone(),
        }
    }

    /// Signs `document` (a JSON object): sets its [`KEY_ID`], then adds the
    /// [`SIGNATURE`] over the canonical JSON of the rest.
    pub fn sign_document(&self, document: &mut Value) {
        if let Value::Object(map) = document {
            map.remove(SIGNATURE);
            map.insert(KEY_ID.into(), Value::String(self.id.clone()));
        }
        let signature = self.key.sign(signed_bytes(document).as_bytes());
        if let Value::Object(map) = document {
            map.insert(
                SIGNATURE.into(),
                Value::String(
                    base64::engine::general_purpose::STANDARD.encode(signature.to_bytes()),
                ),
            );
        }
    }

    /// Writes the key pair: the private key created new with mode 0600 (an
    /// existing file is never overwritten), the public key beside it.
    pub fn write_pair(&self, private: &Path, public: &Path) -> Result<(), KeyError> {
        // PKCS#8 v1 (the secret alone), the form `openssl genpkey` writes.
        let pem = ed25519_dalek::pkcs8::KeypairBytes {
            secret_key: self.key.to_bytes(),
            public_key: None,
        }
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| KeyError::Encode(e.to_string()))?;
        let public_pem = self
            .key
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .map_err(|e| KeyError::Encode(e.to_string()))?;
        let write_error = |path: &Path| {
            let path = shown(path);
            move |e: std::io::Error| KeyError::Write {
                path,
                reason: e.to_string(),
            }
        };
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(private).map_err(write_error(private))?;
        file.write_all(pem.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(write_error(private))?;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(public)
            .and_then(|mut file| file.write_all(public_pem.as_bytes()))
            .map_err(write_error(public))
    }
}

/// A public key that checks signatures (`--public-key`).
#[derive(Debug, Clone)]
pub struct AuditPublicKey {
    key: VerifyingKey,
    id: String,
}

/// Why a signed document does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("it has no signature")]
    Missing,
    #[error("its signature is not 64 bytes of base64")]
    Malformed,
    #[error("it was signed by key {signed_by}, not by the given key {expected}")]
    OtherKey { signed_by: String, expected: String },
    #[error("its signature does not verify with key {0}: the signed content was changed")]
    Invalid(String),
}

impl AuditPublicKey {
    /// Reads a SubjectPublicKeyInfo PEM Ed25519 public key.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let text = read(path)?;
        let key = VerifyingKey::from_public_key_pem(&text).map_err(|e| KeyError::Format {
            path: shown(path),
            what: "public key",
            expected: "SubjectPublicKeyInfo, BEGIN PUBLIC KEY",
            reason: e.to_string(),
        })?;
        Ok(AuditPublicKey {
            id: key_id(&key),
            key,
        })
    }

    pub fn key_id(&self) -> &str {
        &self.id
    }

    /// Checks a document signed by [`AuditSigningKey::sign_document`].
    pub fn verify_document(&self, document: &Value) -> Result<(), SignatureError> {
        let signature = document
            .get(SIGNATURE)
            .and_then(Value::as_str)
            .ok_or(SignatureError::Missing)?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(signature)
            .map_err(|_| SignatureError::Malformed)?;
        let signature = Signature::from_slice(&bytes).map_err(|_| SignatureError::Malformed)?;
        if let Some(signed_by) = document.get(KEY_ID).and_then(Value::as_str)
            && signed_by != self.id
        {
            return Err(SignatureError::OtherKey {
                signed_by: signed_by.to_owned(),
                expected: self.id.clone(),
            });
        }
        self.key
            .verify(signed_bytes(document).as_bytes(), &signature)
            .map_err(|_| SignatureError::Invalid(self.id.clone()))
    }
}

/// The bytes a document's signature covers: the canonical JSON of the
/// document without its [`SIGNATURE`] member.
pub fn signed_bytes(document: &Value) -> String {
    match document {
        Value::Object(map) if map.contains_key(SIGNATURE) => {
            let mut rest = map.clone();
            rest.remove(SIGNATURE);
            canonical::to_string(&Value::Object(rest))
        }
        other => canonical::to_string(other),
    }
}

/// Hex SHA-256 of the key's SubjectPublicKeyInfo DER.
pub fn key_id(key: &VerifyingKey) -> String {
    match key.to_public_key_der() {
        Ok(der) => hex::encode(Sha256::digest(der.as_bytes())),
        // Encoding 32 bytes into a fixed structure does not fail; an id
        // from the raw key keeps this total regardless.
        Err(_) => hex::encode(Sha256::digest(key.as_bytes())),
    }
}

fn read(path: &Path) -> Result<String, KeyError> {
    std::fs::read_to_string(path).map_err(|e| KeyError::Read {
        path: shown(path),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_signed_document_verifies_and_any_change_is_caught() {
        let key = AuditSigningKey::generate().unwrap();
        let public = key.public_key();
        let mut doc = json!({"window": "2026-02-09", "event_count": 3, "name": "Zoë"});
        key.sign_document(&mut doc);
        assert_eq!(doc[KEY_ID], key.key_id());
        public.verify_document(&doc).unwrap();

        let mut changed = doc.clone();
        changed["event_count"] = json!(2);
        assert!(matches!(
            public.verify_document(&changed),
            Err(SignatureError::Invalid(_))
        ));

        let other = AuditSigningKey::generate().unwrap().public_key();
        assert!(matches!(
            other.verify_document(&doc),
            Err(SignatureError::OtherKey { .. })
        ));
        let mut unsigned = doc.clone();
        unsigned.as_object_mut().unwrap().remove(SIGNATURE);
        assert_eq!(
            public.verify_document(&unsigned),
            Err(SignatureError::Missing)
        );
    }

    #[test]
    fn the_signed_bytes_are_the_canonical_json_without_the_signature() {
        let doc = json!({"b": 1, "a": "x", "signature": "zzz"});
        assert_eq!(signed_bytes(&doc), r#"{"a":"x","b":1}"#);
    }

    #[test]
    fn debug_shows_the_key_id_and_never_the_key() {
        let key = AuditSigningKey::generate().unwrap();
        let shown = format!("{key:?}");
        assert!(shown.contains(key.key_id()), "{shown}");
        let secret = hex::encode(key.key.to_bytes());
        assert!(!shown.contains(&secret));
        assert!(!shown.to_lowercase().contains("secret"), "{shown}");
    }

    #[test]
    fn written_keys_read_back_and_the_private_one_is_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let (private, public) = (dir.path().join("k.pem"), dir.path().join("k.pub.pem"));
        let key = AuditSigningKey::generate().unwrap();
        key.write_pair(&private, &public).unwrap();
        let text = std::fs::read_to_string(&private).unwrap();
        assert!(text.starts_with("-----BEGIN PRIVATE KEY-----"), "{text}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&private).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_eq!(
            AuditSigningKey::load(&private).unwrap().key_id(),
            key.key_id()
        );
        assert_eq!(
            AuditPublicKey::load(&public).unwrap().key_id(),
            key.key_id()
        );
        // Never overwritten.
        assert!(
            key.write_pair(&private, &dir.path().join("other.pem"))
                .is_err()
        );
        assert!(AuditPublicKey::load(&private).is_err());
    }
}
