//! [`SharedKey`]: what a shared token is for, and the digest its Redis keys carry.

use super::codec::hex;
use sha2::{Digest, Sha256};
use std::fmt;

/// What the shared token is for: token URL, client id, scope and extra token-request
/// parameters. Processes whose keys are equal share a token.
///
/// Redis sees only a SHA-256 digest of these inputs, and the secret is not one of them;
/// changing any input gives another key. Get one from
/// [`ClientCredentials::shared_key`](crate::ClientCredentials::shared_key), or build one for
/// another source:
///
/// ```
/// use blaze_auth::token::redis::SharedKey;
///
/// let key = SharedKey::new("https://login.example.com/oauth/token", "my-client-id")
///     .scope("full")
///     .param("audience", "https://api.example.com");
/// assert_ne!(key.digest(), key.clone().scope("read").digest());
/// assert_eq!(key.digest().len(), 64);
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct SharedKey {
    token_url: Box<str>,
    client_id: Box<str>,
    scope: Option<Box<str>>,
    params: Vec<(Box<str>, Box<str>)>,
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
        }
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
        hash.update(b"blaze-auth shared key v1\0");
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
