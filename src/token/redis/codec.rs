//! How tokens are written to and read from Redis.

use crate::token::AccessToken;
use base64::{Engine as _, engine::general_purpose::STANDARD as BASE64};
use chacha20poly1305::{
    XChaCha20Poly1305, XNonce,
    aead::{Aead, AeadCore, OsRng, Payload},
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::{
    fmt,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

/// A token as Redis keeps it.
#[derive(Serialize, Deserialize)]
pub(super) struct Stored {
    token_type: String,
    access_token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scope: Option<String>,
    /// Unix milliseconds; none: the token does not expire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_at_ms: Option<u64>,
    /// Unix milliseconds.
    stored_at_ms: u64,
}

impl Stored {
    /// The token, unless it is within `margin` (at most half its lifetime) of its expiry.
    pub(super) fn into_token(self, now_ms: u64, margin: Duration) -> Option<AccessToken> {
        let mut token = AccessToken::new(&self.token_type, &self.access_token).ok()?;
        if let Some(expires_at_ms) = self.expires_at_ms {
            let left = expires_at_ms.checked_sub(now_ms)?;
            let lifetime = expires_at_ms.saturating_sub(self.stored_at_ms);
            if left <= millis(margin).min(lifetime / 2) {
                return None;
            }
            token = token.with_expires_in(Duration::from_millis(left));
        }
        if let Some(scope) = self.scope {
            token = token.with_scope(scope);
        }
        Some(token)
    }
}

impl fmt::Debug for Stored {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stored")
            .field("token_type", &self.token_type)
            .field("access_token", &"[redacted]")
            .field("scope", &self.scope)
            .field("expires_at_ms", &self.expires_at_ms)
            .field("stored_at_ms", &self.stored_at_ms)
            .finish()
    }
}

/// How tokens are written to and read from Redis: `fingerprint ":json:" JSON` in clear, or
/// `fingerprint ":xc20p:" base64(nonce ciphertext)` encrypted, with the Redis key and the
/// fingerprint as associated data.
#[derive(Clone, Copy)]
pub(super) struct Codec<'a> {
    pub(super) cipher: Option<&'a XChaCha20Poly1305>,
    pub(super) aad: &'a str,
}

impl Codec<'_> {
    pub(super) fn encode(
        self,
        token: &AccessToken,
        now_ms: u64,
        expires_at_ms: Option<u64>,
    ) -> String {
        let stored = Stored {
            token_type: token.token_type().into(),
            access_token: token.secret().into(),
            scope: token.scope().map(Into::into),
            expires_at_ms,
            stored_at_ms: now_ms,
        };
        // Serializing strings and integers cannot fail.
        let json = serde_json::to_string(&stored).unwrap_or_default();
        let fp = fingerprint(token);
        let Some(cipher) = self.cipher else {
            return format!("{fp}:json:{json}");
        };
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let aad = format!("{}:{fp}", self.aad);
        let payload = Payload {
            msg: json.as_bytes(),
            aad: aad.as_bytes(),
        };
        // Encryption fails only for messages of gigabytes.
        let sealed = cipher.encrypt(&nonce, payload).unwrap_or_default();
        let mut bytes = nonce.to_vec();
        bytes.extend_from_slice(&sealed);
        format!("{fp}:xc20p:{}", BASE64.encode(bytes))
    }

    pub(super) fn decode(self, value: &str) -> Option<(&str, Stored)> {
        let (fp, rest) = value.split_once(':')?;
        let (format, payload) = rest.split_once(':')?;
        let json = match (format, self.cipher) {
            ("json", None) => payload.as_bytes().to_vec(),
            ("xc20p", Some(cipher)) => {
                let bytes = BASE64.decode(payload).ok()?;
                if bytes.len() < 24 {
                    return None;
                }
                let (nonce, sealed) = bytes.split_at(24);
                let aad = format!("{}:{fp}", self.aad);
                let payload = Payload {
                    msg: sealed,
                    aad: aad.as_bytes(),
                };
                cipher.decrypt(XNonce::from_slice(nonce), payload).ok()?
            }
            _ => return None,
        };
        Some((fp, serde_json::from_slice(&json).ok()?))
    }
}

/// A short digest that tells tokens apart without revealing them.
pub(super) fn fingerprint(token: &AccessToken) -> String {
    let mut hash = Sha256::new();
    hash.update(b"blaze-auth token fingerprint v1\0");
    hash.update(token.token_type());
    hash.update(b" ");
    hash.update(token.secret());
    hex(&hash.finalize()[..16])
}

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(super) fn now_ms() -> u64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    millis(since_epoch)
}

pub(super) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::redis::EncryptionKey;

    #[test]
    fn stored_token_round_trips_and_near_expiry_counts_as_absent() {
        let token = AccessToken::bearer("s3cr3t").unwrap().with_scope("full");
        let now = 1_000_000;
        let codec = Codec {
            cipher: None,
            aad: "k",
        };
        let value = codec.encode(&token, now, Some(now + 3_600_000));
        assert!(value.starts_with(&format!("{}:json:", fingerprint(&token))));
        let (fp, stored) = codec.decode(&value).unwrap();
        assert_eq!(fp, fingerprint(&token));
        assert!(!format!("{stored:?}").contains("s3cr3t"));

        let (_, stored) = codec.decode(&value).unwrap();
        let read = stored
            .into_token(now + 1000, Duration::from_secs(60))
            .unwrap();
        assert_eq!((read.secret(), read.scope()), ("s3cr3t", Some("full")));
        assert!(read.expires_at().is_some());
        // Within the margin of expiry: absent.
        let (_, stored) = codec.decode(&value).unwrap();
        assert!(
            stored
                .into_token(now + 3_550_000, Duration::from_secs(60))
                .is_none()
        );
        // The margin is capped at half the lifetime.
        let short = codec.encode(&token, now, Some(now + 10_000));
        let (_, stored) = codec.decode(&short).unwrap();
        assert!(
            stored
                .into_token(now + 4_000, Duration::from_secs(60))
                .is_some()
        );
        let (_, stored) = codec.decode(&short).unwrap();
        assert!(
            stored
                .into_token(now + 5_000, Duration::from_secs(60))
                .is_none()
        );
        // Without expiry: always fresh.
        let forever = codec.encode(&token, now, None);
        let (_, stored) = codec.decode(&forever).unwrap();
        assert!(
            stored
                .into_token(u64::MAX, Duration::from_secs(60))
                .is_some()
        );
    }

    #[test]
    fn encrypted_tokens_hide_the_secret_and_need_the_key_and_the_redis_key() {
        let key = EncryptionKey::generate();
        let cipher = key.cipher();
        let codec = Codec {
            cipher: Some(&cipher),
            aad: "blaze-auth:{d}:token",
        };
        let token = AccessToken::bearer("s3cr3t-token").unwrap();
        let value = codec.encode(&token, 1, None);
        assert!(value.starts_with(&format!("{}:xc20p:", fingerprint(&token))));
        assert!(!value.contains("s3cr3t"), "{value}");
        assert_ne!(
            value,
            codec.encode(&token, 1, None),
            "a fresh nonce each time"
        );
        let (_, stored) = codec.decode(&value).unwrap();
        assert_eq!(stored.access_token, "s3cr3t-token");

        let other_key = EncryptionKey::generate().cipher();
        let clear = Codec {
            cipher: None,
            ..codec
        };
        let wrong_key = Codec {
            cipher: Some(&other_key),
            ..codec
        };
        let moved = Codec {
            aad: "blaze-auth:{e}:token",
            ..codec
        };
        for codec_that_cannot_read in [clear, wrong_key, moved] {
            assert!(codec_that_cannot_read.decode(&value).is_none());
        }
        // A process with a key reads no token stored in clear.
        assert!(codec.decode(&clear.encode(&token, 1, None)).is_none());
        // The fingerprint is bound too.
        let forged = format!("{}{}", "0".repeat(32), &value[32..]);
        assert!(codec.decode(&forged).is_none());
    }

    #[test]
    fn garbage_in_redis_is_not_a_token() {
        let codec = Codec {
            cipher: None,
            aad: "k",
        };
        for value in [
            "",
            "abc",
            "fp:xml:<t/>",
            "fp:json:{",
            "fp:json:{\"token_type\":\"Bearer\"}",
        ] {
            assert!(codec.decode(value).is_none(), "{value}");
        }
    }

    #[test]
    fn fingerprints_tell_tokens_apart_and_hide_them() {
        let a = AccessToken::bearer("token-a").unwrap();
        let b = AccessToken::bearer("token-b").unwrap();
        assert_ne!(fingerprint(&a), fingerprint(&b));
        assert_eq!(fingerprint(&a), fingerprint(&a.clone().with_scope("x")));
        assert_eq!(fingerprint(&a).len(), 32);
        assert!(!fingerprint(&a).contains("token"));
    }
}
