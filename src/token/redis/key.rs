//! [`SharedKey`]: what a shared token is for, and the digest its Redis keys carry.

use super::codec::hex;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use std::fmt;

/// What the shared token is for: token URL, client id, client secret, scope and extra
/// token-request parameters. Processes whose keys are equal share a token.
///
/// Redis sees only a SHA-256 digest of these inputs; changing any input gives another key.
/// The secret enters it as a keyed hash (HMAC-SHA256 keyed with the secret), never itself:
/// a process with a wrong or rotated-out secret does not ride on its peers' token, it
/// fetches its own, and its mistake shows at once as the token endpoint refuses it. Get a
/// key from [`ClientCredentials::shared_key`], or build one for another source:
///
/// ```
/// use blaze_auth::token::redis::SharedKey;
///
/// let key = SharedKey::new("https://login.example.com/oauth/token", "my-client-id")
///     .client_secret("my-client-secret")
///     .scope("full")
///     .param("audience", "https://api.example.com");
/// assert_ne!(key.digest(), key.clone().scope("read").digest());
/// assert_ne!(key.digest(), key.clone().client_secret("rotated-secret").digest());
/// assert_eq!(key.digest().len(), 64);
/// ```
///
/// While a client secret is rotated, the processes on the old and on the new secret keep one
/// shared token per group, until every process runs the new one.
///
/// Whoever can list the Redis keys can test guesses of the secret against the digest, as
/// against any hash of it: a random secret (as token endpoints issue) is safe, a guessable
/// one is guessable anyway.
///
#[cfg_attr(
    feature = "oauth2",
    doc = "[`ClientCredentials::shared_key`]: crate::ClientCredentials::shared_key"
)]
#[cfg_attr(
    not(feature = "oauth2"),
    doc = "[`ClientCredentials::shared_key`]: crate#feature-flags"
)]
#[derive(Clone, PartialEq, Eq)]
pub struct SharedKey {
    token_url: Box<str>,
    client_id: Box<str>,
    scope: Option<Box<str>>,
    params: Vec<(Box<str>, Box<str>)>,
    /// HMAC-SHA256 of a fixed label, keyed with the client secret.
    secret_tag: Option<[u8; 32]>,
}

impl SharedKey {
    /// The key of tokens for `client_id` from `token_url`, with no scope and no extra
    /// parameters.
    pub fn new(token_url: &str, client_id: &str) -> Self {
        Self {
            token_url: token_url.into(),
            client_id: client_id.into(),
            scope: None,
            params: Vec::new(),
            secret_tag: None,
        }
    }

    /// Mixes the client secret into the key, as a keyed hash: processes with different
    /// secrets never share a token. Default: none (for sources without a secret).
    pub fn client_secret(mut self, secret: &str) -> Self {
        // HMAC takes keys of any length.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
        mac.update(b"blaze-auth shared key secret v1");
        self.secret_tag = Some(mac.finalize().into_bytes().into());
        self
    }

    /// Sets the scope requested. Default: none.
    pub fn scope(mut self, scope: &str) -> Self {
        self.scope = Some(scope.into());
        self
    }

    /// Adds an extra token-request parameter, e.g. `audience`. Their order does not matter.
    /// Default: none.
    pub fn param(mut self, name: &str, value: &str) -> Self {
        self.params.push((name.into(), value.into()));
        self
    }

    /// The hex SHA-256 digest of the inputs: what the Redis keys carry.
    pub fn digest(&self) -> String {
        let mut hash = Sha256::new();
        hash.update(b"blaze-auth shared key v2\0");
        let mut field = |bytes: &[u8]| {
            hash.update((bytes.len() as u64).to_be_bytes());
            hash.update(bytes);
        };
        field(self.token_url.as_bytes());
        field(self.client_id.as_bytes());
        match &self.scope {
            Some(scope) => {
                field(b"scope");
                field(scope.as_bytes());
            }
            None => field(b"no scope"),
        }
        let mut params: Vec<_> = self.params.iter().collect();
        params.sort();
        for (name, value) in params {
            field(name.as_bytes());
            field(value.as_bytes());
        }
        match &self.secret_tag {
            Some(tag) => {
                field(b"secret");
                field(tag);
            }
            None => field(b"no secret"),
        }
        hex(&hash.finalize())
    }
}

impl fmt::Debug for SharedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Parameter values may be anything; the digest tells keys apart.
        f.debug_struct("SharedKey")
            .field("client_id", &self.client_id)
            .field("digest", &self.digest())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_secret_changes_the_digest_and_never_shows() {
        let key = SharedKey::new("https://h/token", "id");
        let with = key.clone().client_secret("hunter2");
        assert_ne!(with.digest(), key.digest());
        assert_ne!(with.digest(), key.client_secret("hunter3").digest());
        assert_eq!(
            with.digest(),
            SharedKey::new("https://h/token", "id")
                .client_secret("hunter2")
                .digest()
        );
        let shown = format!("{with:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn key_digest_changes_with_every_input_and_not_with_param_order() {
        let base = SharedKey::new("https://h/token", "id")
            .scope("full")
            .param("a", "1")
            .param("b", "2");
        let digest = base.digest();
        assert_eq!(digest.len(), 64);
        assert_eq!(
            digest,
            SharedKey::new("https://h/token", "id")
                .scope("full")
                .param("b", "2")
                .param("a", "1")
                .digest()
        );
        let others = [
            SharedKey::new("https://h/token2", "id")
                .scope("full")
                .param("a", "1")
                .param("b", "2"),
            SharedKey::new("https://h/token", "id2")
                .scope("full")
                .param("a", "1")
                .param("b", "2"),
            SharedKey::new("https://h/token", "id")
                .scope("read")
                .param("a", "1")
                .param("b", "2"),
            SharedKey::new("https://h/token", "id")
                .param("a", "1")
                .param("b", "2"),
            SharedKey::new("https://h/token", "id")
                .scope("full")
                .param("a", "1"),
            SharedKey::new("https://h/token", "id")
                .scope("full")
                .param("a", "1")
                .param("b", "3"),
            SharedKey::new("https://h/token", "id")
                .scope("full")
                .param("a", "1")
                .param("b", "2")
                .client_secret("s"),
            // Field boundaries matter: "ab" + "c" is not "a" + "bc".
            SharedKey::new("https://h/token", "id")
                .scope("full")
                .param("a", "12")
                .param("b", ""),
        ];
        for other in others {
            assert_ne!(other.digest(), digest, "{other:?}");
        }
    }
}
