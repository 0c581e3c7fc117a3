//! Ed25519-signed tokens: who a connection is.
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
//! The edge verifies it on `Hello` against the keys it knows by id, so keys can rotate: mint with
//! the new key while the old one is still accepted.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier as _, VerifyingKey};

use crate::config::Config;

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

/// Where the signing key lives for `config`.
pub fn signing_key_path(config: &Config) -> PathBuf {
    if config.auth.signing_key_path.as_os_str().is_empty() {
        config
            .server
            .data_dir
            .join("keys")
            .join("token-signing.key")
    } else {
        config.auth.signing_key_path.clone()
    }
}

/// Loads the signing key, generating the development key on first use when the config names
/// none. Returns the key and whether it was just generated.
pub fn load_or_create_signing_key(config: &Config) -> Result<(SigningKey, bool), String> {
    let path = signing_key_path(config);
    if path.exists() {
        return read_signing_key(&path).map(|key| (key, false));
    }
    if !config.auth.signing_key_path.as_os_str().is_empty() {
        return Err(format!(
            "auth.signing_key_path {} does not exist: create it or leave the key empty for a development key",
            path.display()
        ));
    }
    let mut seed = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
    let key = SigningKey::from_bytes(&seed);
    write_private_file(&path, STANDARD.encode(seed).as_bytes())?;
    Ok((key, true))
}

/// Reads a signing key file: base64 of the 32-byte seed.
pub fn read_signing_key(path: &Path) -> Result<SigningKey, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read signing key {}: {e}", path.display()))?;
    let seed = STANDARD
        .decode(text.trim())
        .map_err(|e| format!("signing key {} is not base64: {e}", path.display()))?;
    let seed: [u8; 32] = seed
        .try_into()
        .map_err(|_| format!("signing key {} must hold 32 bytes", path.display()))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// The verifier for `config`: the signing key's public half plus `auth.verify_keys`.
pub fn verifier(config: &Config, signing_key: &SigningKey) -> Result<TokenVerifier, String> {
    let mut keys = HashMap::new();
    keys.insert(config.auth.signing_key_id, signing_key.verifying_key());
    for extra in &config.auth.verify_keys {
        let bytes = STANDARD.decode(extra.public_key.trim()).map_err(|e| {
            format!(
                "auth.verify_keys id {}: public_key is not base64: {e}",
                extra.id
            )
        })?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| {
            format!(
                "auth.verify_keys id {}: public_key must hold 32 bytes",
                extra.id
            )
        })?;
        let key = VerifyingKey::from_bytes(&bytes)
            .map_err(|e| format!("auth.verify_keys id {}: not an Ed25519 key: {e}", extra.id))?;
        if keys.insert(extra.id, key).is_some() {
            return Err(format!(
                "auth.verify_keys: key id {} is used twice",
                extra.id
            ));
        }
    }
    Ok(TokenVerifier::new(keys))
}

/// Writes a file readable by its owner only, creating its directory.
pub fn write_private_file(path: &Path, contents: &[u8]) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Parses a duration like `90s`, `30m`, `24h` or `7d` into seconds.
pub fn parse_duration_secs(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| {
        format!("invalid duration {text:?}: expected a number and a unit, like 24h")
    })?;
    let scale = match unit {
        "s" | "" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => return Err(format!("invalid duration unit {other:?}: use s, m, h or d")),
    };
    Ok(number.saturating_mul(scale))
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

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration_secs("24h"), Ok(86_400));
        assert_eq!(parse_duration_secs("90s"), Ok(90));
        assert_eq!(parse_duration_secs("7d"), Ok(604_800));
        assert!(parse_duration_secs("1y").is_err());
        assert!(parse_duration_secs("h").is_err());
    }
}
