//! [`EncryptionKey`]: the key that seals the tokens kept in Redis.

use super::codec::hex;
use crate::error::Error;
use base64::{Engine as _, engine::general_purpose::STANDARD as BASE64};
use chacha20poly1305::{
    XChaCha20Poly1305,
    aead::{KeyInit, OsRng},
};
use sha2::{Digest, Sha256};
use std::{fmt, sync::Arc};

/// A 256-bit key that encrypts the tokens kept in Redis: see
/// [`RedisSharedBuilder::encryption_key`](super::RedisSharedBuilder::encryption_key).
///
/// It protects credentials: keep it where the client secret is kept. `Debug` prints
/// `[redacted]`; there is no `Display`.
///
/// ```
/// use blaze_auth::token::redis::EncryptionKey;
///
/// // E.g. made by `openssl rand -base64 32` and handed to every process like a secret.
/// let key = EncryptionKey::from_base64("q83vASNFZ4mrze8BI0VniavN7wEjRWeJq83vASNFZ4k=")?;
/// assert_eq!(format!("{key:?}"), "EncryptionKey([redacted])");
/// # Ok::<_, blaze_auth::Error>(())
/// ```
#[derive(Clone)]
pub struct EncryptionKey(pub(super) Arc<[u8; 32]>);

impl EncryptionKey {
    /// The key made of these 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(Arc::new(bytes))
    }

    /// The key from 32 bytes in standard base64 (with padding, white space around it
    /// ignored).
    ///
    /// # Errors
    ///
    /// If `encoded` is not base64 of exactly 32 bytes ([`Error::is_config`]).
    pub fn from_base64(encoded: &str) -> Result<Self, Error> {
        let bytes = BASE64
            .decode(encoded.trim())
            .map_err(|_| Error::invalid_key())?;
        let bytes = <[u8; 32]>::try_from(bytes).map_err(|_| Error::invalid_key())?;
        Ok(Self::from_bytes(bytes))
    }

    /// A new random key, from the operating system's generator.
    pub fn generate() -> Self {
        Self::from_bytes(XChaCha20Poly1305::generate_key(&mut OsRng).into())
    }
}

impl fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EncryptionKey([redacted])")
    }
}

impl EncryptionKey {
    /// The cipher that seals and opens tokens with this key.
    pub(super) fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(&(*self.0).into())
    }

    /// A short public name of the key, stored beside what it sealed so that a reader picks the
    /// key that opens it: 8 hex digits of a SHA-256 of the key, which tell nothing of it.
    pub(super) fn id(&self) -> String {
        let mut hash = Sha256::new();
        hash.update(b"blaze-auth encryption key id v1\0");
        hash.update(*self.0);
        hex(&hash.finalize()[..4])
    }
}

/// The keys of one process: the current one seals and opens, the previous ones only open, so
/// that a fleet can move to a new key without an outage.
#[derive(Default)]
pub(super) struct KeyRing {
    current: Option<Sealer>,
    previous: Vec<Sealer>,
}

/// A key's cipher and id.
pub(super) struct Sealer {
    pub(super) id: String,
    pub(super) cipher: XChaCha20Poly1305,
}

impl Sealer {
    fn new(key: &EncryptionKey) -> Self {
        Self {
            id: key.id(),
            cipher: key.cipher(),
        }
    }
}

impl KeyRing {
    pub(super) fn new(current: Option<&EncryptionKey>, previous: &[EncryptionKey]) -> Self {
        Self {
            current: current.map(Sealer::new),
            previous: previous.iter().map(Sealer::new).collect(),
        }
    }

    /// The key that seals, if this process seals.
    pub(super) fn current(&self) -> Option<&Sealer> {
        self.current.as_ref()
    }

    /// The key whose id is `id`, current or previous.
    pub(super) fn opener(&self, id: &str) -> Option<&Sealer> {
        self.current
            .iter()
            .chain(&self.previous)
            .find(|sealer| sealer.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encryption_keys_come_as_base64_of_32_bytes_and_never_show() {
        let encoded = BASE64.encode([7u8; 32]);
        let key = EncryptionKey::from_base64(&format!(" {encoded}\n")).unwrap();
        assert_eq!(*key.0, [7u8; 32]);
        assert_eq!(format!("{key:?}"), "EncryptionKey([redacted])");
        let short = BASE64.encode([7u8; 31]);
        let long = BASE64.encode([7u8; 33]);
        for bad in ["", "not base64!", &short, &long] {
            let error = EncryptionKey::from_base64(bad).unwrap_err();
            assert!(error.is_config(), "{bad}");
        }
    }

    #[test]
    fn key_ids_tell_keys_apart_and_are_stable() {
        let key = EncryptionKey::from_bytes([7; 32]);
        let other = EncryptionKey::from_bytes([8; 32]);
        assert_eq!(key.id(), EncryptionKey::from_bytes([7; 32]).id());
        assert_ne!(key.id(), other.id());
        assert_eq!(key.id().len(), 8);
        let ring = KeyRing::new(Some(&key), std::slice::from_ref(&other));
        assert_eq!(ring.current().unwrap().id, key.id());
        assert!(ring.opener(&other.id()).is_some());
        assert!(ring.opener(&EncryptionKey::generate().id()).is_none());
    }
}
