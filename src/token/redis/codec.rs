//! How tokens are written to and read from Redis.

use super::encryption::KeyRing;
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
use tokio::time::Instant;

/// The longest remaining lifetime a token read from Redis may claim. Blaze's tokens live an
/// hour; a value that claims more was not stored by this crate.
pub(super) const MAX_SHARED_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// The longest token shared, as long as the longest token response `ClientCredentials` reads:
/// a longer token read from Redis was not stored by this crate, and a longer token fetched is
/// not stored.
const MAX_TOKEN_LEN: usize = 64 * 1024;

/// The longest value read from Redis: a sealed token of [`MAX_TOKEN_LEN`] in base64, with room
/// for the rest. Longer values are not decoded (nor decrypted, nor parsed).
const MAX_VALUE_LEN: usize = 2 * MAX_TOKEN_LEN;

/// A token as Redis keeps it.
#[derive(Serialize, Deserialize)]
pub(super) struct Stored {
    token_type: String,
    access_token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scope: Option<String>,
    /// Unix milliseconds.
    expires_at_ms: u64,
    /// Unix milliseconds.
    stored_at_ms: u64,
}

impl Stored {
    /// The token, if it is one this process's source would give (a `Bearer` token of at most
    /// [`MAX_TOKEN_LEN`] bytes that expires within [`MAX_SHARED_LIFETIME`]) and not within
    /// `margin` (at most half its lifetime) of its expiry.
    pub(super) fn into_token(self, now_ms: u64, margin: Duration) -> Option<AccessToken> {
        if !self.token_type.eq_ignore_ascii_case("bearer")
            || self.access_token.len() > MAX_TOKEN_LEN
        {
            return None;
        }
        let left = self.expires_at_ms.checked_sub(now_ms)?;
        if left > millis(MAX_SHARED_LIFETIME) {
            return None;
        }
        let lifetime = self.expires_at_ms.saturating_sub(self.stored_at_ms);
        if left <= millis(margin).min(lifetime / 2) {
            return None;
        }
        let token = AccessToken::bearer(&self.access_token).ok()?;
        let token = token.with_expires_in(Duration::from_millis(left));
        Some(match self.scope {
            Some(scope) => token.with_scope(scope),
            None => token,
        })
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

/// The time a token may be kept in Redis until: its expiry in Unix milliseconds, if it is one
/// that every process accepts when it reads it back (see [`Stored::into_token`]).
pub(super) fn shareable_until(token: &AccessToken, now_ms: u64) -> Option<u64> {
    if token.token_type() != "Bearer" || token.secret().len() > MAX_TOKEN_LEN {
        return None;
    }
    let left = token
        .expires_at()?
        .saturating_duration_since(Instant::now());
    (!left.is_zero() && left <= MAX_SHARED_LIFETIME).then(|| now_ms.saturating_add(millis(left)))
}

/// The format tag of a sealed value, which the store script looks for.
pub(super) const SEALED: &str = "xc20p";

/// How tokens are written to and read from Redis: `fingerprint ":json:" JSON` in clear, or
/// `fingerprint ":xc20p:" key-id ":" base64(nonce ciphertext)` sealed, with the Redis key,
/// the fingerprint and the key id as associated data.
#[derive(Clone, Copy)]
pub(super) struct Codec<'a> {
    pub(super) keys: &'a KeyRing,
    pub(super) aad: &'a str,
}

impl Codec<'_> {
    /// The value to store for `token`, which expires at `expires_at_ms`.
    pub(super) fn encode(self, token: &AccessToken, now_ms: u64, expires_at_ms: u64) -> String {
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
        let Some(sealer) = self.keys.current() else {
            return format!("{fp}:json:{json}");
        };
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let aad = format!("{}:{fp}:{}", self.aad, sealer.id);
        let payload = Payload {
            msg: json.as_bytes(),
            aad: aad.as_bytes(),
        };
        // Encryption fails only for messages of gigabytes.
        let sealed = sealer.cipher.encrypt(&nonce, payload).unwrap_or_default();
        let mut bytes = nonce.to_vec();
        bytes.extend_from_slice(&sealed);
        format!("{fp}:{SEALED}:{}:{}", sealer.id, BASE64.encode(bytes))
    }

    /// The fingerprint and the token of a stored value, if this process can read it: a
    /// process with keys reads only values sealed with one of them, one without only clear
    /// values. Any bytes may be in Redis: what is not such a value is `None`.
    pub(super) fn decode(self, value: &[u8]) -> Option<(&str, Stored)> {
        if value.len() > MAX_VALUE_LEN {
            return None;
        }
        let value = std::str::from_utf8(value).ok()?;
        let (fp, rest) = value.split_once(':')?;
        let (format, payload) = rest.split_once(':')?;
        let json = match (format, self.keys.current()) {
            ("json", None) => payload.as_bytes().to_vec(),
            (SEALED, Some(_)) => {
                let (id, payload) = payload.split_once(':')?;
                let sealer = self.keys.opener(id)?;
                let bytes = BASE64.decode(payload).ok()?;
                if bytes.len() < 24 {
                    return None;
                }
                let (nonce, sealed) = bytes.split_at(24);
                let aad = format!("{}:{fp}:{id}", self.aad);
                let payload = Payload {
                    msg: sealed,
                    aad: aad.as_bytes(),
                };
                sealer
                    .cipher
                    .decrypt(XNonce::from_slice(nonce), payload)
                    .ok()?
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

    const HOUR: u64 = 3_600_000;

    fn clear() -> KeyRing {
        KeyRing::default()
    }

    fn ring(current: &EncryptionKey, previous: &[EncryptionKey]) -> KeyRing {
        KeyRing::new(Some(current), previous)
    }

    #[test]
    fn stored_token_round_trips_and_near_expiry_counts_as_absent() {
        let token = AccessToken::bearer("s3cr3t").unwrap().with_scope("full");
        let now = 1_000_000;
        let keys = clear();
        let codec = Codec {
            keys: &keys,
            aad: "k",
        };
        let read = |value: &str, at: u64| {
            let (_, stored) = codec.decode(value.as_bytes()).unwrap();
            stored.into_token(at, Duration::from_secs(60))
        };
        let value = codec.encode(&token, now, now + HOUR);
        assert!(value.starts_with(&format!("{}:json:", fingerprint(&token))));
        let (fp, stored) = codec.decode(value.as_bytes()).unwrap();
        assert_eq!(fp, fingerprint(&token));
        assert!(!format!("{stored:?}").contains("s3cr3t"));

        let token = read(&value, now + 1000).unwrap();
        assert_eq!((token.secret(), token.scope()), ("s3cr3t", Some("full")));
        assert!(token.expires_at().is_some());
        // Within the margin of expiry: absent.
        assert!(read(&value, now + 3_550_000).is_none());
        // The margin is capped at half the lifetime.
        let short = codec.encode(&token, now, now + 10_000);
        assert!(read(&short, now + 4_000).is_some());
        assert!(read(&short, now + 5_000).is_none());
    }

    #[test]
    fn only_what_the_local_source_would_give_is_accepted_from_redis() {
        let now = 10 * HOUR;
        let keys = clear();
        let codec = Codec {
            keys: &keys,
            aad: "k",
        };
        let planted = |json: serde_json::Value| {
            let value = format!("{}:json:{json}", "0".repeat(32));
            codec
                .decode(value.as_bytes())
                .and_then(|(_, stored)| stored.into_token(now, Duration::from_secs(60)))
        };
        let good = serde_json::json!({"token_type": "bearer", "access_token": "t",
            "expires_at_ms": now + HOUR, "stored_at_ms": now});
        assert_eq!(planted(good.clone()).unwrap().token_type(), "Bearer");
        let mut basic = good.clone();
        basic["token_type"] = "Basic".into();
        let mut no_expiry = good.clone();
        no_expiry.as_object_mut().unwrap().remove("expires_at_ms");
        let mut for_a_year = good.clone();
        for_a_year["expires_at_ms"] = (now + 365 * 24 * HOUR).into();
        let mut expired = good.clone();
        expired["expires_at_ms"] = (now - 1).into();
        let mut header_breaking = good.clone();
        header_breaking["access_token"] = "t\r\nX-Evil: 1".into();
        let mut bad = vec![basic, no_expiry, for_a_year, expired, header_breaking];
        for token_type in [" Bearer", "Bearer ", "Bearer\t", "Bearer\0", "Bearer x", ""] {
            let mut padded = good.clone();
            padded["token_type"] = token_type.into();
            bad.push(padded);
        }
        let mut negative = good;
        negative["expires_at_ms"] = (-1).into();
        bad.push(negative);
        for bad in bad {
            assert!(planted(bad.clone()).is_none(), "{bad}");
        }
    }

    #[test]
    fn only_bearer_tokens_that_expire_within_a_day_are_shared() {
        let now = 10 * HOUR;
        let hour = Duration::from_secs(3600);
        let bearer = AccessToken::bearer("t").unwrap();
        let until = shareable_until(&bearer.clone().with_expires_in(hour), now).unwrap();
        assert!((now + HOUR - 1000..=now + HOUR).contains(&until), "{until}");
        let mac = AccessToken::new("MAC", "t").unwrap().with_expires_in(hour);
        for unshareable in [
            bearer.clone(),
            bearer.clone().with_expires_in(hour * 48),
            bearer.with_expires_in(Duration::ZERO),
            mac,
        ] {
            assert_eq!(shareable_until(&unshareable, now), None, "{unshareable:?}");
        }
    }

    #[test]
    fn sealed_tokens_hide_the_secret_and_need_the_key_and_the_redis_key() {
        let key = EncryptionKey::generate();
        let keys = ring(&key, &[]);
        let codec = Codec {
            keys: &keys,
            aad: "blaze-auth:{d}:token",
        };
        let token = AccessToken::bearer("s3cr3t-token").unwrap();
        let value = codec.encode(&token, 1, HOUR);
        let prefix = format!("{}:xc20p:{}:", fingerprint(&token), key.id());
        assert!(value.starts_with(&prefix), "{value}");
        assert!(!value.contains("s3cr3t"), "{value}");
        assert_ne!(
            value,
            codec.encode(&token, 1, HOUR),
            "a fresh nonce each time"
        );
        let (_, stored) = codec.decode(value.as_bytes()).unwrap();
        assert_eq!(stored.access_token, "s3cr3t-token");

        let clear_keys = clear();
        let other_keys = ring(&EncryptionKey::generate(), &[]);
        let clear = Codec {
            keys: &clear_keys,
            ..codec
        };
        let wrong_key = Codec {
            keys: &other_keys,
            ..codec
        };
        let moved = Codec {
            aad: "blaze-auth:{e}:token",
            ..codec
        };
        for codec_that_cannot_read in [clear, wrong_key, moved] {
            assert!(codec_that_cannot_read.decode(value.as_bytes()).is_none());
        }
        // A process with a key reads no token stored in clear.
        assert!(
            codec
                .decode(clear.encode(&token, 1, HOUR).as_bytes())
                .is_none()
        );
        // The fingerprint and the key id are bound too.
        let forged = format!("{}{}", "0".repeat(32), &value[32..]);
        assert!(codec.decode(forged.as_bytes()).is_none());
        let relabelled = value.replace(&key.id(), &EncryptionKey::generate().id());
        assert!(codec.decode(relabelled.as_bytes()).is_none());
    }

    #[test]
    fn a_rotated_key_reads_with_the_previous_keys_and_writes_with_the_current() {
        let old = EncryptionKey::generate();
        let new = EncryptionKey::generate();
        let (old_ring, new_ring) = (ring(&old, &[]), ring(&new, std::slice::from_ref(&old)));
        let before = Codec {
            keys: &old_ring,
            aad: "k",
        };
        let after = Codec {
            keys: &new_ring,
            ..before
        };
        let token = AccessToken::bearer("t").unwrap();
        let sealed_before = before.encode(&token, 1, HOUR);
        assert!(
            after.decode(sealed_before.as_bytes()).is_some(),
            "old values stay readable"
        );
        let sealed_after = after.encode(&token, 1, HOUR);
        assert!(sealed_after.contains(&format!(":xc20p:{}:", new.id())));
        assert!(before.decode(sealed_after.as_bytes()).is_none());
    }

    #[test]
    fn garbage_in_redis_is_not_a_token() {
        let keys = clear();
        let codec = Codec {
            keys: &keys,
            aad: "k",
        };
        for value in [
            "",
            "abc",
            "fp:xml:<t/>",
            "fp:json:{",
            "fp:json:{\"token_type\":\"Bearer\"}",
            "fp:xc20p:zz:AAAA",
        ] {
            assert!(codec.decode(value.as_bytes()).is_none(), "{value}");
        }
        assert!(codec.decode(b"fp:json:\xff\xfe").is_none(), "not UTF-8");
        let token = AccessToken::bearer("t").unwrap();
        let padded = format!(
            "{}{}",
            codec.encode(&token, 0, HOUR),
            " ".repeat(MAX_VALUE_LEN)
        );
        assert!(
            codec.decode(padded.as_bytes()).is_none(),
            "too long to decode"
        );
        let long = AccessToken::bearer(&"t".repeat(MAX_TOKEN_LEN + 1)).unwrap();
        let value = codec.encode(&long, 0, HOUR);
        let (_, stored) = codec.decode(value.as_bytes()).unwrap();
        assert!(
            stored.into_token(0, Duration::ZERO).is_none(),
            "longer than a token"
        );
        assert_eq!(
            shareable_until(&long.with_expires_in(Duration::from_secs(60)), 0),
            None
        );
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
