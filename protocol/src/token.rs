//! Ed25519-signed tokens: who a connection is (feature `token`).
//!
//! A token is base64url (no padding) of a fixed 90-byte layout:
//!
//! | bytes | field |
//! |---|---|
//! | 1 | version (1) |
//! | 4 | key id, BE |
//! | 8 | user, BE |
//! | 4 | device, BE |
//! | 1 | role (0 user, 1 agent) |
//! | 8 | expiry, seconds since the epoch, BE |
//! | 64 | Ed25519 signature of the 26 bytes above |
//!
//! The edge verifies it on `Hello`; `courier-edge token` and the load generator mint them. The
//! edge verifies it against the keys it knows by id, so keys can rotate: mint with
//! the new key while the old one is still accepted.

use std::collections::HashMap;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ed25519_dalek::{Signature, Signer, Verifier as _};
pub use ed25519_dalek::{SigningKey, VerifyingKey};

const VERSION: u8 = 1;
const CLAIMS_BYTES: usize = 1 + 4 + 8 + 4 + 1 + 8;
const TOKEN_BYTES: usize = CLAIMS_BYTES + 64;

/// What a client is allowed to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    User,
    Agent,
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(text: &str) -> Result<Role, String> {
        match text {
            "user" => Ok(Role::User),
            "agent" => Ok(Role::Agent),
            other => Err(format!("unknown role {other:?}: expected user or agent")),
        }
    }
}

/// The signed contents of a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claims {
    pub key_id: u32,
    pub user: u64,
    pub device: u32,
    pub role: Role,
    pub expires_at_secs: u64,
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("token is not valid base64url of the expected length")]
    Malformed,
    #[error("token was signed with unknown key id {0}")]
    UnknownKey(u32),
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token expired at {expired_at_secs} (now {now_secs}): mint a new one")]
    Expired { expired_at_secs: u64, now_secs: u64 },
    #[error("token names user 0, which is reserved")]
    ReservedUser,
}

/// Signs `claims` with `key`.
pub fn mint(key: &SigningKey, claims: &Claims) -> String {
    let mut bytes = Vec::with_capacity(TOKEN_BYTES);
    bytes.push(VERSION);
    bytes.extend_from_slice(&claims.key_id.to_be_bytes());
    bytes.extend_from_slice(&claims.user.to_be_bytes());
    bytes.extend_from_slice(&claims.device.to_be_bytes());
    bytes.push(match claims.role {
        Role::User => 0,
        Role::Agent => 1,
    });
    bytes.extend_from_slice(&claims.expires_at_secs.to_be_bytes());
    let signature = key.sign(&bytes);
    bytes.extend_from_slice(&signature.to_bytes());
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The public keys tokens are checked against, by key id.
#[derive(Debug, Clone, Default)]
pub struct TokenVerifier {
    keys: HashMap<u32, VerifyingKey>,
}

impl TokenVerifier {
    pub fn new(keys: HashMap<u32, VerifyingKey>) -> TokenVerifier {
        TokenVerifier { keys }
    }

    /// Checks a token from a `Hello` frame.
    pub fn verify(&self, token: &[u8], now_secs: u64) -> Result<Claims, AuthError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(token)
            .map_err(|_| AuthError::Malformed)?;
        let bytes: &[u8; TOKEN_BYTES] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| AuthError::Malformed)?;
        let (signed, signature) = bytes.split_at(CLAIMS_BYTES);
        if signed[0] != VERSION {
            return Err(AuthError::Malformed);
        }
        let be_u32 =
            |at: usize| u32::from_be_bytes(signed[at..at + 4].try_into().expect("4 bytes"));
        let be_u64 =
            |at: usize| u64::from_be_bytes(signed[at..at + 8].try_into().expect("8 bytes"));
        let key_id = be_u32(1);
        let key = self
            .keys
            .get(&key_id)
            .ok_or(AuthError::UnknownKey(key_id))?;
        let signature = Signature::from_slice(signature).map_err(|_| AuthError::Malformed)?;
        key.verify(signed, &signature)
            .map_err(|_| AuthError::BadSignature)?;
        let role = match signed[17] {
            0 => Role::User,
            1 => Role::Agent,
            _ => return Err(AuthError::Malformed),
        };
        let claims = Claims {
            key_id,
            user: be_u64(5),
            device: be_u32(13),
            role,
            expires_at_secs: be_u64(18),
        };
        if claims.user == 0 {
            return Err(AuthError::ReservedUser);
        }
        if claims.expires_at_secs <= now_secs {
            return Err(AuthError::Expired {
                expired_at_secs: claims.expires_at_secs,
                now_secs,
            });
        }
        Ok(claims)
    }
}

/// Parses a signing key file's contents: base64 of the 32-byte Ed25519 seed.
pub fn signing_key_from_base64(text: &str) -> Result<SigningKey, String> {
    let seed = STANDARD
        .decode(text.trim())
        .map_err(|e| format!("signing key is not base64: {e}"))?;
    let seed: [u8; 32] = seed
        .try_into()
        .map_err(|_| "signing key must hold 32 bytes".to_string())?;
    Ok(SigningKey::from_bytes(&seed))
}

/// The contents of a signing key file for `key`.
pub fn signing_key_to_base64(key: &SigningKey) -> String {
    STANDARD.encode(key.to_bytes())
}

/// A public key as config holds it (`auth.verify_keys`): base64 of its 32 bytes.
pub fn verifying_key_to_base64(key: &VerifyingKey) -> String {
    STANDARD.encode(key.to_bytes())
}

/// Parses a public key from config: base64 of its 32 bytes.
pub fn verifying_key_from_base64(text: &str) -> Result<VerifyingKey, String> {
    let bytes = STANDARD
        .decode(text.trim())
        .map_err(|e| format!("public key is not base64: {e}"))?;
    let bytes: [u8; 32] = bytes
        .try_into()
        .map_err(|_| "public key must hold 32 bytes".to_string())?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| format!("not an Ed25519 public key: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn claims(key_id: u32, expires_at_secs: u64) -> Claims {
        Claims {
            key_id,
            user: 42,
            device: 3,
            role: Role::Agent,
            expires_at_secs,
        }
    }

    #[test]
    fn minted_token_verifies_and_keeps_its_claims() {
        let verifier = TokenVerifier::new(HashMap::from([(7, key(1).verifying_key())]));
        let token = mint(&key(1), &claims(7, 1000));
        assert_eq!(verifier.verify(token.as_bytes(), 999), Ok(claims(7, 1000)));
    }

    #[test]
    fn expired_forged_unknown_and_garbage_tokens_are_refused() {
        let verifier = TokenVerifier::new(HashMap::from([(7, key(1).verifying_key())]));
        let token = mint(&key(1), &claims(7, 1000));
        assert!(matches!(
            verifier.verify(token.as_bytes(), 1000),
            Err(AuthError::Expired { .. })
        ));
        let forged = mint(&key(2), &claims(7, 1000));
        assert_eq!(
            verifier.verify(forged.as_bytes(), 1),
            Err(AuthError::BadSignature)
        );
        let other_key = mint(&key(1), &claims(8, 1000));
        assert_eq!(
            verifier.verify(other_key.as_bytes(), 1),
            Err(AuthError::UnknownKey(8))
        );
        assert_eq!(
            verifier.verify(b"not a token", 1),
            Err(AuthError::Malformed)
        );
        let mut tampered = URL_SAFE_NO_PAD.decode(&token).unwrap();
        tampered[8] ^= 1;
        let tampered = URL_SAFE_NO_PAD.encode(tampered);
        assert_eq!(
            verifier.verify(tampered.as_bytes(), 1),
            Err(AuthError::BadSignature)
        );
    }
}
