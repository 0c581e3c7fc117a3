//! Token signing keys and the verifier, from the edge's configuration. The token format
//! itself is `courier_protocol::token`.

use std::path::{Path, PathBuf};

pub use courier_protocol::token::{AuthError, Claims, Role, SigningKey, TokenVerifier, mint};
use courier_protocol::token::{
    signing_key_from_base64, signing_key_to_base64, verifying_key_from_base64,
};

use crate::config::Config;

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
    crate::files::write_private_file(&path, signing_key_to_base64(&key).as_bytes())?;
    Ok((key, true))
}

/// Reads a signing key file: base64 of the 32-byte seed.
pub fn read_signing_key(path: &Path) -> Result<SigningKey, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read signing key {}: {e}", path.display()))?;
    signing_key_from_base64(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The verifier for `config`: the signing key's public half plus `auth.verify_keys`. An entry
/// under the signing key's id may stay there (step 2 of a rotation adds the new key's entry,
/// and step 3 makes it the signing key) as long as it is that key's public half.
pub fn verifier(config: &Config, signing_key: &SigningKey) -> Result<TokenVerifier, String> {
    let mut keys = verify_keys(config)?;
    let id = config.auth.signing_key_id;
    let public = signing_key.verifying_key();
    if keys.get(&id).is_some_and(|listed| *listed != public) {
        return Err(format!(
            "auth.verify_keys id {id} is auth.signing_key_id, with another public key than the \
             signing key's: remove that entry (the signing key's own tokens are accepted \
             anyway), or give one of the two keys another id"
        ));
    }
    keys.insert(id, public);
    Ok(TokenVerifier::new(keys))
}

/// `auth.verify_keys`, parsed, with ids distinct from each other (one under the signing key's
/// id is checked against that key by [`verifier`]).
pub fn verify_keys(
    config: &Config,
) -> Result<std::collections::HashMap<u32, courier_protocol::token::VerifyingKey>, String> {
    let mut keys = std::collections::HashMap::new();
    for extra in &config.auth.verify_keys {
        let key = verifying_key_from_base64(&extra.public_key)
            .map_err(|e| format!("auth.verify_keys id {}: {e}", extra.id))?;
        if keys.insert(extra.id, key).is_some() {
            return Err(format!(
                "auth.verify_keys: key id {} is used twice",
                extra.id
            ));
        }
    }
    Ok(keys)
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

/// The keys tokens are checked with, replaceable while the edge runs (SIGHUP reloads them).
/// Shards hold the cell and drop their cache of verified tokens when its generation changes,
/// so a token signed with a removed key stops working at its next login.
#[derive(Debug)]
pub struct VerifierCell {
    /// The verifier and its generation, under one lock: read apart, a reload between the two
    /// reads could pair the old keys with the new generation, and a token of a removed key
    /// verified then would stay in a shard's cache as current.
    current: std::sync::RwLock<(std::sync::Arc<TokenVerifier>, u64)>,
}

impl VerifierCell {
    pub fn new(verifier: TokenVerifier) -> VerifierCell {
        VerifierCell {
            current: std::sync::RwLock::new((std::sync::Arc::new(verifier), 0)),
        }
    }

    /// The verifier now, and its generation.
    pub fn current(&self) -> (std::sync::Arc<TokenVerifier>, u64) {
        let current = self
            .current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        (current.0.clone(), current.1)
    }

    pub fn replace(&self, verifier: TokenVerifier) {
        let mut current = self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *current = (std::sync::Arc::new(verifier), current.1 + 1);
    }
}

/// Tokens one shard verified recently: a client that reconnects with the same token (a network
/// change, a restart storm) skips the Ed25519 check, about 50 µs and a tenth of the edge's CPU
/// while clients reconnect. Only tokens that verified are kept, at most `entries_max` (the
/// oldest go first), and an entry counts only until the token's own expiry. When the keys are
/// reloaded (`VerifierCell`), the shard clears it.
#[derive(Debug)]
pub struct VerifiedTokens {
    entries: std::collections::HashMap<Vec<u8>, Claims>,
    /// Tokens in the order they were added, for eviction.
    order: std::collections::VecDeque<Vec<u8>>,
    entries_max: usize,
}

impl VerifiedTokens {
    pub fn new(entries_max: usize) -> VerifiedTokens {
        VerifiedTokens {
            entries: std::collections::HashMap::new(),
            order: std::collections::VecDeque::new(),
            entries_max,
        }
    }

    /// The token's claims: from the cache if it verified before and has not expired, else
    /// from `verifier` (and then cached).
    pub fn verify(
        &mut self,
        verifier: &TokenVerifier,
        token: &[u8],
        now_secs: u64,
    ) -> Result<Claims, AuthError> {
        if let Some(claims) = self.entries.get(token)
            && claims.expires_at_secs > now_secs
        {
            return Ok(*claims);
        }
        let claims = verifier.verify(token, now_secs)?;
        if self.entries_max == 0 {
            return Ok(claims);
        }
        if !self.entries.contains_key(token) {
            while self.entries.len() >= self.entries_max {
                let Some(oldest) = self.order.pop_front() else {
                    break;
                };
                self.entries.remove(&oldest);
            }
            self.order.push_back(token.to_vec());
        }
        self.entries.insert(token.to_vec(), claims);
        Ok(claims)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Forgets every verified token (the keys changed).
    pub fn clear(&mut self) {
        self.entries.clear();
        self.order.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rotation's steps, as docs/operations.md gives them: the new key's entry may stay
    /// once it is the signing key (before, the edge refused that config on SIGHUP and at
    /// start); an entry under the signing key's id with another key is refused, saying so.
    #[test]
    fn a_rotation_may_leave_the_new_keys_entry_and_refuses_a_clash() {
        let (old, new) = (
            SigningKey::from_bytes(&[1; 32]),
            SigningKey::from_bytes(&[2; 32]),
        );
        let entry = |id: u32, key: &SigningKey| crate::config::VerifyKey {
            id,
            public_key: courier_protocol::token::verifying_key_to_base64(&key.verifying_key()),
        };
        let mut config = Config::default();
        config.auth.signing_key_id = 2;
        config.auth.verify_keys = vec![entry(2, &new), entry(1, &old)];
        assert!(verifier(&config, &new).is_ok());
        config.auth.verify_keys = vec![entry(2, &old)];
        let error = verifier(&config, &new).unwrap_err();
        assert!(error.contains("auth.signing_key_id"), "{error}");
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration_secs("24h"), Ok(86_400));
        assert_eq!(parse_duration_secs("90s"), Ok(90));
        assert_eq!(parse_duration_secs("7d"), Ok(604_800));
        assert!(parse_duration_secs("1y").is_err());
        assert!(parse_duration_secs("h").is_err());
    }

    #[test]
    fn verified_tokens_skip_the_check_until_expiry_and_stay_bounded() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let verifier = TokenVerifier::new([(1, key.verifying_key())].into_iter().collect());
        let no_keys = TokenVerifier::new(std::collections::HashMap::new());
        let token = |user: u64| {
            mint(
                &key,
                &Claims {
                    key_id: 1,
                    user,
                    device: 0,
                    role: Role::User,
                    expires_at_secs: 1_000,
                },
            )
        };
        let mut cache = VerifiedTokens::new(2);
        let one = token(1);
        assert!(
            cache.verify(&no_keys, one.as_bytes(), 10).is_err(),
            "nothing cached yet"
        );
        assert_eq!(cache.verify(&verifier, one.as_bytes(), 10).unwrap().user, 1);
        // Cached: a verifier without keys is not consulted.
        assert_eq!(cache.verify(&no_keys, one.as_bytes(), 20).unwrap().user, 1);
        // Expired: checked again, and refused.
        assert_eq!(
            cache.verify(&verifier, one.as_bytes(), 1_000),
            Err(AuthError::Expired {
                expired_at_secs: 1_000,
                now_secs: 1_000
            })
        );
        // Bounded: the oldest goes first.
        cache.verify(&verifier, token(2).as_bytes(), 10).unwrap();
        cache.verify(&verifier, token(3).as_bytes(), 10).unwrap();
        assert_eq!(cache.len(), 2);
        assert!(cache.verify(&no_keys, one.as_bytes(), 10).is_err());
        assert!(cache.verify(&no_keys, token(3).as_bytes(), 10).is_ok());
        // A forged token is never cached.
        let mut forged = token(4).into_bytes();
        forged[5] ^= 1;
        assert!(cache.verify(&verifier, &forged, 10).is_err());
        assert_eq!(cache.len(), 2);
    }
}
