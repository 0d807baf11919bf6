//! [`RedisShared`]: one token for many processes, kept in Redis.
//!
//! A partner that runs many workers should not have every process fetch a token of its own:
//! token endpoints rate-limit, and the server sees one partner. [`RedisShared`] wraps any
//! [`TokenSource`] (usually [`ClientCredentials`]) and keeps the
//! current token in Redis, where every process that uses the same [`SharedKey`] reads it.
//!
//! Each process still has its layer's in-memory cache on top: requests never touch Redis.
//! Only when that cache needs a token (the first request, a refresh ahead of expiry, a 401)
//! does it ask this source, which
//!
//! 1. after a 401, deletes the refused token from Redis, but only if it is still the stored
//!    one (compare-and-delete in one Lua script), so a token another process stored since is
//!    kept;
//! 2. reads the shared token, and returns it if it is not within the refresh margin of its
//!    expiry;
//! 3. otherwise takes the lock (`SET lock id NX PX lease`), fetches a token from the wrapped
//!    source, stores it with its expiry and releases the lock; while it fetches it renews the
//!    lease every third of a lease from when it took the lock, so a slow fetch keeps the lock
//!    and a crashed holder loses it within one lease;
//! 4. or, if another process holds the lock, waits for the token it stores, polling, and
//!    takes the lock over if the holder's lease runs out.
//!
//! However many processes need a new token at once, one of them fetches it.
//!
//! When that fetch fails, the lock holder records the failure in Redis before it releases
//! the lock, and until the fleet's cool-down ends
//! ([`failure_cooldown`](RedisSharedBuilder::failure_cooldown): 1 s, doubling with each
//! failure in a row up to 30 s) every process that asks gets an error at once, without a
//! token request: an endpoint that is down sees one schedule of retries from the fleet, not
//! one per process. The next token stored ends it.
//!
//! # When Redis is down
//!
//! Redis is never a single point of failure. Every Redis operation has a short timeout
//! ([`op_timeout`](RedisSharedBuilder::op_timeout), 250 ms); when one fails or times out, the
//! process fetches its token from the wrapped source by itself, as it would without Redis,
//! logs a warning and counts it ([`RedisMetrics::fallbacks`]). The next fetch tries Redis
//! again, so sharing resumes as soon as Redis answers. A process that waited for another's
//! token longer than [`follower_wait`](RedisSharedBuilder::follower_wait) fetches its own
//! too.
//!
//! # Example
//!
//! ```no_run
//! use blaze_auth::{
//!     AccessToken, BlazeAuthLayer, token_fn,
//!     token::redis::{RedisShared, SharedKey},
//! };
//! use std::time::Duration;
//!
//! # fn run() -> Result<(), blaze_auth::Error> {
//! // In real use: `ClientCredentials`, and `ClientCredentials::shared_key()` for the key.
//! let source = token_fn(|_rejected| async {
//!     let token = AccessToken::bearer("fetched")?.with_expires_in(Duration::from_secs(3600));
//!     Ok::<_, blaze_auth::Error>(token)
//! });
//! let key = SharedKey::new("https://login.example.com/oauth/token", "my-client-id").scope("full");
//! let shared = RedisShared::builder(source, key)
//!     .redis_url("redis://127.0.0.1:6379/")
//!     .lease(Duration::from_secs(5))
//!     .build()?;
//! let layer = BlazeAuthLayer::new(shared, "FHIR-T");
//! # let _ = layer;
//! # Ok(())
//! # }
//! ```
//!
//! # Data in Redis
//!
//! With the default prefix and `D` the hex SHA-256 digest of the key inputs (the client
//! secret enters only as a keyed hash, see [`SharedKey`]):
//!
//! - `blaze-auth:{D}:token`: `F:json:{"token_type":..,"access_token":..,"scope":..,
//!   "expires_at_ms":..,"stored_at_ms":..}`, where `F` is a fingerprint of the token (a
//!   truncated SHA-256), which the compare-and-delete after a 401 matches; times are Unix
//!   milliseconds, since processes share no monotonic clock. It expires (`PX`) with the
//!   token.
//!   With an [`encryption_key`](RedisSharedBuilder::encryption_key) the JSON is sealed:
//!   `F:xc20p:K:` and the base64 of a random nonce and the XChaCha20-Poly1305 ciphertext,
//!   `K` the key's id (8 hex digits of a hash of it), so that a reader picks the key that
//!   opens it.
//! - `blaze-auth:{D}:lock`: a random holder id, with the lease as its `PX`.
//! - `blaze-auth:{D}:failures`: the number of failed fetches in a row, with the cool-down
//!   plus 60 s as its `PX`: a PTTL over 60 s means the cool-down runs (Redis's clock only).
//!
//! # Redis Cluster
//!
//! [`cluster_urls`](RedisSharedBuilder::cluster_urls) takes the nodes of a Redis Cluster
//! (self-hosted, or a managed Redis or Valkey in cluster mode) instead of one server. The
//! keys of one [`SharedKey`] carry its digest as a hash tag (`{D}`), so they all live in one
//! slot and each Lua script touches one node. When the master that holds the slot is down,
//! Redis operations fail and processes fetch without Redis, as with one server down, until a
//! replica is promoted or the master returns; sharing then resumes by itself. Tested against
//! a real 3-master cluster on 127.0.0.1, the master of the key stopped mid-run.
//!
//! # Threat model
//!
//! A token in Redis is a credential: whoever can read the key can act as the client. Keep
//! Redis private to the processes that share it (ACLs, TLS with `rediss://`, a private
//! network).
//!
//! **Write access to Redis means token substitution, unless tokens are sealed.** Whoever can
//! write the key can make every process send a token of their choosing (one of their own
//! client's, say, so that the fleet's writes land in their account). What a process accepts
//! from Redis is bounded by what its own source would give: a `Bearer` token with an expiry
//! at most a day away; anything else (a `Basic` credential, a token that never expires) is
//! ignored and replaced. Within those bounds only sealing helps: with an [`EncryptionKey`], a
//! process accepts only tokens sealed with a key it holds, so a writer without the key can
//! delete the token (the fleet fetches a new one) but not plant one. A process without the
//! key never replaces a sealed token (the store script refuses), so a fleet in which some
//! processes lack the key does not alternate between clear and sealed;
//! [`require_encryption`](RedisSharedBuilder::require_encryption) makes a missing key a
//! start-up error. Keys rotate without an outage:
//! [`previous_encryption_key`](RedisSharedBuilder::previous_encryption_key).
//!
//! Sealing protects the token, not availability. Whatever bytes Redis holds are read as
//! untrusted: a value that is not one this crate writes (not UTF-8, over 128 KiB, a token
//! over 64 KiB, unparsable) is ignored and replaced, never an error. But the lock and the
//! failure record are not sealed: a writer can hold the lock (each fetch then waits
//! [`follower_wait`](RedisSharedBuilder::follower_wait) and fetches by itself), or plant a
//! failure record, which stops the fleet's fetches for at most the longest cool-down (30 s,
//! or a longer [`failure_cooldown`](RedisSharedBuilder::failure_cooldown)) per write.
//!
//! # Clocks
//!
//! Expiry is stored as wall-clock time, so the processes' clocks must roughly agree (NTP);
//! the refresh margin absorbs the difference. Timeouts, leases and waits run on Tokio's
//! clock: in a test with paused time, Tokio would skip over a Redis round trip and time it
//! out, so test with real time, as Redis's own lease expiry needs anyway.
//!
#![cfg_attr(
    feature = "oauth2",
    doc = "[`ClientCredentials`]: crate::ClientCredentials"
)]
#![cfg_attr(
    not(feature = "oauth2"),
    doc = "[`ClientCredentials`]: crate#feature-flags"
)]

mod builder;
mod codec;
mod connection;
mod encryption;
mod key;
mod lock;
mod scripts;

pub use self::{builder::RedisSharedBuilder, encryption::EncryptionKey, key::SharedKey};

use self::{connection::Redis, encryption::KeyRing};
use crate::token::{AccessToken, TokenFuture, TokenSource};
use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

/// A [`TokenSource`] that shares the tokens of `S` among processes through Redis. See the
/// [module docs](self).
///
/// Put it under the layer as any source: `BlazeAuthLayer::new(shared, study)`. Cloning is
/// cheap; clones share the connection and the counters.
pub struct RedisShared<S> {
    inner: Arc<Shared<S>>,
}

struct Shared<S> {
    source: S,
    redis: Redis,
    token_key: String,
    lock_key: String,
    failure_key: String,
    failure_cooldown: Duration,
    lease: Duration,
    follower_wait: Duration,
    op_timeout: Duration,
    poll_interval: Duration,
    refresh_margin: Duration,
    keys: KeyRing,
    counters: Counters,
}

#[derive(Default)]
struct Counters {
    shared_hits: AtomicU64,
    source_fetches: AtomicU64,
    waits: AtomicU64,
    wait_timeouts: AtomicU64,
    fallbacks: AtomicU64,
    redis_errors: AtomicU64,
    invalidations: AtomicU64,
    cooldowns: AtomicU64,
}

/// What a [`RedisShared`] has done so far, from [`RedisShared::metrics`].
///
/// The counters only grow; export them as monotonic counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisMetrics {
    /// Fetches answered with a token read from Redis, stored by this process or another.
    pub shared_hits: u64,
    /// Tokens fetched from the wrapped source: as the lock holder, or as a fallback.
    pub source_fetches: u64,
    /// Fetches that found another process fetching and waited for its token.
    pub waits: u64,
    /// Waits that ended without a token after [`RedisSharedBuilder::follower_wait`]; each is
    /// also a fallback.
    pub wait_timeouts: u64,
    /// Fetches that went to the wrapped source without Redis, because Redis failed, was too
    /// slow, or the wait for another process's token ran out.
    pub fallbacks: u64,
    /// Redis operations that failed or timed out.
    pub redis_errors: u64,
    /// Refused tokens deleted from Redis by compare-and-delete.
    pub invalidations: u64,
    /// Fetches answered with an error and no token request, because a process's fetch failed
    /// lately and the fleet's cool-down ([`RedisSharedBuilder::failure_cooldown`]) runs.
    pub cooldowns: u64,
}

impl<S> RedisShared<S> {
    /// What this source has done so far, summed over its clones.
    pub fn metrics(&self) -> RedisMetrics {
        let c = &self.inner.counters;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        RedisMetrics {
            shared_hits: load(&c.shared_hits),
            source_fetches: load(&c.source_fetches),
            waits: load(&c.waits),
            wait_timeouts: load(&c.wait_timeouts),
            fallbacks: load(&c.fallbacks),
            redis_errors: load(&c.redis_errors),
            invalidations: load(&c.invalidations),
            cooldowns: load(&c.cooldowns),
        }
    }

    /// The wrapped source.
    pub fn get_ref(&self) -> &S {
        &self.inner.source
    }
}

impl<S> Clone for RedisShared<S> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for RedisShared<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &self.inner;
        f.debug_struct("RedisShared")
            .field("source", &inner.source)
            .field("token_key", &inner.token_key)
            .field("lease", &inner.lease)
            .field("follower_wait", &inner.follower_wait)
            .field("op_timeout", &inner.op_timeout)
            .field("refresh_margin", &inner.refresh_margin)
            .field("failure_cooldown", &inner.failure_cooldown)
            .finish_non_exhaustive()
    }
}

impl<S: TokenSource + 'static> TokenSource for RedisShared<S> {
    fn fetch(&self, rejected: Option<&AccessToken>) -> TokenFuture {
        let shared = Arc::clone(&self.inner);
        let rejected = rejected.cloned();
        TokenFuture::new(async move { shared.fetch(rejected.as_ref()).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn _send_sync(shared: RedisShared<crate::StaticToken>) -> impl Send + Sync {
        shared
    }
}
