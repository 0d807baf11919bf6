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
//!    lease, so a slow fetch keeps the lock and a crashed holder loses it within one lease;
//! 4. or, if another process holds the lock, waits for the token it stores, polling, and
//!    takes the lock over if the holder's lease runs out.
//!
//! However many processes need a new token at once, one of them fetches it.
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
//! With the default prefix and `D` the hex SHA-256 digest of the key inputs (never the
//! secret):
//!
//! - `blaze-auth:{D}:token`: `F:json:{"token_type":..,"access_token":..,"scope":..,
//!   "expires_at_ms":..,"stored_at_ms":..}`, where `F` is a fingerprint of the token (a
//!   truncated SHA-256), which the compare-and-delete after a 401 matches; times are Unix
//!   milliseconds, since processes share no monotonic clock. It expires (`PX`) with the
//!   token.
//!   With an [`encryption_key`](RedisSharedBuilder::encryption_key) the JSON is sealed:
//!   `F:xc20p:` and the base64 of a random nonce and the XChaCha20-Poly1305 ciphertext.
//! - `blaze-auth:{D}:lock`: a random holder id, with the lease as its `PX`.
//!
//! A token in Redis is a credential: whoever can read the key can act as the client. Keep
//! Redis private to the processes that share it (ACLs, TLS with `rediss://`, a private
//! network), and consider an [`EncryptionKey`].
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

use crate::{
    error::{BoxError, Error},
    token::{AccessToken, TokenFuture, TokenSource},
};
use base64::{Engine as _, engine::general_purpose::STANDARD as BASE64};
use chacha20poly1305::{
    XChaCha20Poly1305, XNonce,
    aead::{Aead, AeadCore, KeyInit, OsRng, Payload},
};
use futures_util::future::{Either, select};
use redis::{
    Client, RedisError, Script,
    aio::{ConnectionManager, ConnectionManagerConfig},
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::{
    fmt,
    future::Future,
    pin::pin,
    sync::{
        Arc, LazyLock, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};
use tokio::time::Instant;

/// The Redis server when none is set: see [`RedisSharedBuilder::redis_url`].
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379/";
/// The key prefix when none is set: see [`RedisSharedBuilder::key_prefix`].
pub const DEFAULT_KEY_PREFIX: &str = "blaze-auth:";
/// The lock's lease when none is set: see [`RedisSharedBuilder::lease`].
pub const DEFAULT_LEASE: Duration = Duration::from_secs(10);
/// How long a process waits for another's token when not set: see
/// [`RedisSharedBuilder::follower_wait`].
pub const DEFAULT_FOLLOWER_WAIT: Duration = Duration::from_secs(20);
/// The limit on one Redis operation when none is set: see [`RedisSharedBuilder::op_timeout`].
pub const DEFAULT_OP_TIMEOUT: Duration = Duration::from_millis(250);
/// How often a waiting process looks for the token when not set: see
/// [`RedisSharedBuilder::poll_interval`].
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// What the shared token is for: token URL, client id, scope and extra token-request
/// parameters. Processes whose keys are equal share a token.
///
/// Redis sees only a SHA-256 digest of these inputs, and the secret is not one of them;
/// changing any input gives another key. Get one from
/// [`ClientCredentials::shared_key`], or build one for another source:
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
    connection: OnceLock<Result<ConnectionManager, Arc<RedisError>>>,
    client: Option<Client>,
    connection_config: ConnectionManagerConfig,
    token_key: String,
    lock_key: String,
    lease: Duration,
    follower_wait: Duration,
    op_timeout: Duration,
    poll_interval: Duration,
    refresh_margin: Duration,
    cipher: Option<XChaCha20Poly1305>,
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
}

impl<S: TokenSource> RedisShared<S> {
    /// A [`RedisSharedBuilder`] for a source that shares the tokens of `source` under `key`.
    pub fn builder(source: S, key: SharedKey) -> RedisSharedBuilder<S> {
        RedisSharedBuilder {
            source,
            key,
            redis_url: None,
            connection: None,
            key_prefix: DEFAULT_KEY_PREFIX.into(),
            lease: DEFAULT_LEASE,
            follower_wait: DEFAULT_FOLLOWER_WAIT,
            op_timeout: DEFAULT_OP_TIMEOUT,
            poll_interval: DEFAULT_POLL_INTERVAL,
            refresh_margin: crate::DEFAULT_REFRESH_MARGIN,
            encryption_key: None,
        }
    }
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

/// Configures a [`RedisShared`]; made by [`RedisShared::builder`].
pub struct RedisSharedBuilder<S> {
    source: S,
    key: SharedKey,
    redis_url: Option<String>,
    connection: Option<ConnectionManager>,
    key_prefix: String,
    lease: Duration,
    follower_wait: Duration,
    op_timeout: Duration,
    poll_interval: Duration,
    refresh_margin: Duration,
    encryption_key: Option<EncryptionKey>,
}

impl<S> RedisSharedBuilder<S> {
    /// Sets the Redis server, as a `redis://` or `rediss://` (TLS) URL; credentials go in its
    /// user info. Default: [`DEFAULT_REDIS_URL`]. The connection is made at the first fetch,
    /// so a Redis that is down at start-up delays nothing.
    pub fn redis_url(mut self, url: &str) -> Self {
        self.redis_url = Some(url.into());
        self
    }

    /// Uses a connection manager the application already has, instead of
    /// [`redis_url`](Self::redis_url). Its own timeouts and retries apply, under
    /// [`op_timeout`](Self::op_timeout). Default: none.
    pub fn connection(mut self, connection: ConnectionManager) -> Self {
        self.connection = Some(connection);
        self
    }

    /// Sets the prefix of the Redis keys, e.g. to keep several deployments apart on one
    /// Redis. Default: [`DEFAULT_KEY_PREFIX`], `blaze-auth:`.
    pub fn key_prefix(mut self, prefix: &str) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// Sets the lease of the lock a process holds while it fetches the token.
    ///
    /// The holder renews it every third of a lease while its fetch runs, so a slow fetch
    /// keeps the lock; a holder that crashed loses it at most one lease later, and a waiting
    /// process takes over. Default: [`DEFAULT_LEASE`], 10 s.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(Duration::from_millis(3));
        self
    }

    /// Sets how long a process waits for the token another process is fetching before it
    /// fetches one itself. Keep it above the lease, so that a crashed holder is taken over
    /// rather than bypassed, and below the layer's fetch timeout. Default:
    /// [`DEFAULT_FOLLOWER_WAIT`], 20 s.
    pub fn follower_wait(mut self, wait: Duration) -> Self {
        self.follower_wait = wait;
        self
    }

    /// Sets the limit on each Redis operation; one that takes longer counts as Redis being
    /// down, and the process fetches its token without Redis. Default:
    /// [`DEFAULT_OP_TIMEOUT`], 250 ms.
    pub fn op_timeout(mut self, timeout: Duration) -> Self {
        self.op_timeout = timeout;
        self
    }

    /// Sets how often a waiting process looks for the token in Redis. Default:
    /// [`DEFAULT_POLL_INTERVAL`], 50 ms.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// Sets how close to its expiry a token in Redis counts as absent, so that the next
    /// process to ask fetches a new one; capped at half the token's lifetime, as the
    /// layer's refresh margin is. Set it to the layer's
    /// [`refresh_margin`](crate::Builder::refresh_margin): the layer then finds a fresh
    /// token in Redis when it refreshes. Default: [`DEFAULT_REFRESH_MARGIN`](crate::DEFAULT_REFRESH_MARGIN),
    /// 60 s, the layer's default.
    pub fn refresh_margin(mut self, margin: Duration) -> Self {
        self.refresh_margin = margin;
        self
    }

    /// Encrypts the tokens kept in Redis with `key` (XChaCha20-Poly1305, bound to the Redis
    /// key they are stored under), so that whoever reads Redis without the key gets no usable
    /// token. Every process sharing the token needs the same key: a process reads only what
    /// it can decrypt, and one with another key (or none) fetches and stores a token of its
    /// own, with a warning. Default: none, tokens are stored in clear.
    pub fn encryption_key(mut self, key: EncryptionKey) -> Self {
        self.encryption_key = Some(key);
        self
    }

    /// Builds the source. No connection is made yet.
    ///
    /// # Errors
    ///
    /// If the Redis URL is not valid ([`Error::is_invalid_url`]); the error does not repeat
    /// it, since it may hold a password.
    pub fn build(self) -> Result<RedisShared<S>, Error> {
        let (client, connection) = match self.connection {
            Some(connection) => (None, OnceLock::from(Ok(connection))),
            None => {
                let url = self.redis_url.as_deref().unwrap_or(DEFAULT_REDIS_URL);
                let client = Client::open(url)
                    .map_err(|_| Error::invalid_url(Some("not a valid Redis URL".into())))?;
                (Some(client), OnceLock::new())
            }
        };
        // Fail fast: a Redis that does not answer is a Redis that is down, and the process
        // goes on without it; the next fetch tries again.
        let connection_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.op_timeout))
            .set_response_timeout(Some(self.op_timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(self.op_timeout);
        let digest = self.key.digest();
        let prefix = self.key_prefix;
        Ok(RedisShared {
            inner: Arc::new(Shared {
                source: self.source,
                connection,
                client,
                connection_config,
                // The digest is a hash tag: on a Redis Cluster both keys live on one node.
                token_key: format!("{prefix}{{{digest}}}:token"),
                lock_key: format!("{prefix}{{{digest}}}:lock"),
                lease: self.lease,
                follower_wait: self.follower_wait,
                op_timeout: self.op_timeout,
                poll_interval: self.poll_interval,
                refresh_margin: self.refresh_margin,
                cipher: self
                    .encryption_key
                    .map(|key| XChaCha20Poly1305::new(&(*key.0).into())),
                counters: Counters::default(),
            }),
        })
    }
}

impl<S: fmt::Debug> fmt::Debug for RedisSharedBuilder<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // No URL: it may hold a password.
        f.debug_struct("RedisSharedBuilder")
            .field("source", &self.source)
            .field("key", &self.key)
            .field("key_prefix", &self.key_prefix)
            .field("lease", &self.lease)
            .field("follower_wait", &self.follower_wait)
            .field("op_timeout", &self.op_timeout)
            .field("encryption_key", &self.encryption_key)
            .finish_non_exhaustive()
    }
}

/// A 256-bit key that encrypts the tokens kept in Redis: see
/// [`RedisSharedBuilder::encryption_key`].
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
pub struct EncryptionKey(Arc<[u8; 32]>);

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
    /// If `encoded` is not base64 of exactly 32 bytes ([`Error::is_invalid_key`]).
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

/// Deletes `KEYS[1]` if its value starts with `ARGV[1]`: the refused token's fingerprint.
static INVALIDATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, string.len(ARGV[1])) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0",
    )
});

/// Deletes the lock `KEYS[1]` if `ARGV[1]` still holds it.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0",
    )
});

/// Sets the lease of the lock `KEYS[1]` to `ARGV[2]` ms if `ARGV[1]` still holds it.
static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0",
    )
});

/// Why a shared fetch did not give a token.
enum Failure {
    /// Redis failed or was too slow: fetch without it.
    Redis(BoxError),
    /// Another process held the lock for longer than the follower wait.
    WaitTimedOut,
    /// The wrapped source failed while this process held the lock.
    Source(BoxError),
}

impl<S: TokenSource> Shared<S> {
    async fn fetch(&self, rejected: Option<&AccessToken>) -> Result<AccessToken, BoxError> {
        let why = match self.fetch_shared(rejected).await {
            Ok(token) => return Ok(token),
            Err(Failure::Source(error)) => return Err(error),
            Err(Failure::Redis(error)) => {
                tracing::warn!(%error, "Redis unavailable: fetching the token without it");
                "redis"
            }
            Err(Failure::WaitTimedOut) => {
                self.counters.wait_timeouts.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    wait_ms = self.follower_wait.as_millis() as u64,
                    "no token from the process holding the Redis lock: fetching one here"
                );
                "wait"
            }
        };
        self.counters.fallbacks.fetch_add(1, Ordering::Relaxed);
        crate::metrics::export::redis_fallback();
        self.counters.source_fetches.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(reason = why, "token fetch without Redis");
        self.source.fetch(rejected).await
    }

    async fn fetch_shared(&self, rejected: Option<&AccessToken>) -> Result<AccessToken, Failure> {
        let mut con = self.connection()?;
        let rejected_fp = rejected.map(fingerprint);
        if let Some(fp) = &rejected_fp {
            let mut invocation = INVALIDATE.key(&self.token_key);
            invocation.arg(format!("{fp}:"));
            let deleted: i64 = self.op(invocation.invoke_async(&mut con)).await?;
            if deleted > 0 {
                self.counters.invalidations.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("refused token removed from Redis");
            }
        }
        let deadline = Instant::now() + self.follower_wait;
        let mut waiting = false;
        loop {
            if let Some(token) = self.read(&mut con, rejected_fp.as_deref()).await? {
                self.counters.shared_hits.fetch_add(1, Ordering::Relaxed);
                return Ok(token);
            }
            let holder = format!("{:032x}", fastrand::u128(..));
            let locked: Option<String> = self
                .op(redis::cmd("SET")
                    .arg(&self.lock_key)
                    .arg(&holder)
                    .arg("NX")
                    .arg("PX")
                    .arg(millis(self.lease))
                    .query_async(&mut con))
                .await?;
            if locked.is_some() {
                return self.lead(&mut con, &holder, rejected, rejected_fp).await;
            }
            if !waiting {
                waiting = true;
                self.counters.waits.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("another process is fetching the token: waiting for it");
            }
            if Instant::now() >= deadline {
                return Err(Failure::WaitTimedOut);
            }
            tokio::time::sleep(self.poll_interval).await;
        }
    }

    /// Fetches the token as the lock holder, stores it and releases the lock.
    async fn lead(
        &self,
        con: &mut ConnectionManager,
        holder: &str,
        rejected: Option<&AccessToken>,
        rejected_fp: Option<String>,
    ) -> Result<AccessToken, Failure> {
        // The token may have been stored between our read and our lock.
        if let Ok(Some(token)) = self.read(con, rejected_fp.as_deref()).await {
            self.release(con, holder).await;
            self.counters.shared_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(token);
        }
        self.counters.source_fetches.fetch_add(1, Ordering::Relaxed);
        tracing::debug!("holding the Redis lock: fetching the token");
        let result = self.fetch_renewing(con, holder, rejected).await;
        if let Ok(token) = &result {
            if let Err(Failure::Redis(error)) = self.store(con, token).await {
                tracing::warn!(%error, "could not store the token in Redis");
            }
        }
        self.release(con, holder).await;
        result.map_err(Failure::Source)
    }

    /// Fetches from the wrapped source, renewing the lease until the fetch ends.
    async fn fetch_renewing(
        &self,
        con: &ConnectionManager,
        holder: &str,
        rejected: Option<&AccessToken>,
    ) -> Result<AccessToken, BoxError> {
        let mut renew_con = con.clone();
        let renew = async {
            loop {
                tokio::time::sleep(self.lease / 3).await;
                let mut invocation = RENEW.key(&self.lock_key);
                invocation.arg(holder).arg(millis(self.lease));
                let renewed: Result<i64, _> =
                    self.op(invocation.invoke_async(&mut renew_con)).await;
                if matches!(renewed, Ok(0)) {
                    tracing::warn!("lost the Redis lock while fetching the token");
                }
            }
        };
        match select(pin!(self.source.fetch(rejected)), pin!(renew)).await {
            Either::Left((result, _)) => result,
            Either::Right(((), fetch)) => fetch.await,
        }
    }

    /// The stored token, if there is one that is neither near its expiry nor `rejected_fp`.
    async fn read(
        &self,
        con: &mut ConnectionManager,
        rejected_fp: Option<&str>,
    ) -> Result<Option<AccessToken>, Failure> {
        let value: Option<String> = self
            .op(redis::cmd("GET").arg(&self.token_key).query_async(con))
            .await?;
        let Some(value) = value else {
            return Ok(None);
        };
        let Some((fp, stored)) = self.codec().decode(&value) else {
            tracing::warn!("the token stored in Redis cannot be read: fetching a new one");
            return Ok(None);
        };
        if rejected_fp == Some(fp) {
            return Ok(None);
        }
        Ok(stored.into_token(now_ms(), self.refresh_margin))
    }

    async fn store(&self, con: &mut ConnectionManager, token: &AccessToken) -> Result<(), Failure> {
        let now = now_ms();
        let expires_at_ms = token.expires_at().map(|at| {
            let left = at.saturating_duration_since(Instant::now());
            now.saturating_add(millis(left))
        });
        let mut set = redis::cmd("SET");
        set.arg(&self.token_key)
            .arg(self.codec().encode(token, now, expires_at_ms));
        match expires_at_ms {
            Some(at) if at <= now => return Ok(()),
            Some(at) => {
                set.arg("PX").arg(at - now);
            }
            None => {}
        }
        self.op(set.query_async::<()>(con)).await
    }

    fn codec(&self) -> Codec<'_> {
        Codec {
            cipher: self.cipher.as_ref(),
            aad: &self.token_key,
        }
    }

    async fn release(&self, con: &mut ConnectionManager, holder: &str) {
        let mut invocation = RELEASE.key(&self.lock_key);
        invocation.arg(holder);
        // A lock that cannot be released ends with its lease.
        let _: Result<i64, _> = self.op(invocation.invoke_async(con)).await;
    }

    fn connection(&self) -> Result<ConnectionManager, Failure> {
        let connection = self.connection.get_or_init(|| {
            let client = self.client.clone().ok_or_else(|| {
                Arc::new(RedisError::from((
                    redis::ErrorKind::Client,
                    "no Redis client",
                )))
            })?;
            ConnectionManager::new_lazy_with_config(client, self.connection_config.clone())
                .map_err(Arc::new)
        });
        match connection {
            Ok(connection) => Ok(connection.clone()),
            Err(error) => {
                self.counters.redis_errors.fetch_add(1, Ordering::Relaxed);
                Err(Failure::Redis(Box::new(SharedRedisError(Arc::clone(
                    error,
                )))))
            }
        }
    }

    /// Runs one Redis operation under the op timeout, counting failures.
    async fn op<T>(
        &self,
        operation: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, Failure> {
        let error: BoxError = match tokio::time::timeout(self.op_timeout, operation).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(error)) => Box::new(error),
            Err(_) => "Redis operation timed out".into(),
        };
        self.counters.redis_errors.fetch_add(1, Ordering::Relaxed);
        Err(Failure::Redis(error))
    }
}

/// A Redis error kept for every later fetch.
#[derive(Debug)]
struct SharedRedisError(Arc<RedisError>);

impl fmt::Display for SharedRedisError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for SharedRedisError {}

/// A token as Redis keeps it.
#[derive(Serialize, Deserialize)]
struct Stored {
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
    fn into_token(self, now_ms: u64, margin: Duration) -> Option<AccessToken> {
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
struct Codec<'a> {
    cipher: Option<&'a XChaCha20Poly1305>,
    aad: &'a str,
}

impl Codec<'_> {
    fn encode(self, token: &AccessToken, now_ms: u64, expires_at_ms: Option<u64>) -> String {
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

    fn decode(self, value: &str) -> Option<(&str, Stored)> {
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
fn fingerprint(token: &AccessToken) -> String {
    let mut hash = Sha256::new();
    hash.update(b"blaze-auth token fingerprint v1\0");
    hash.update(token.token_type());
    hash.update(b" ");
    hash.update(token.secret());
    hex(&hash.finalize()[..16])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn now_ms() -> u64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    millis(since_epoch)
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
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
        let cipher = XChaCha20Poly1305::new(&(*key.0).into());
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

        let other_key = XChaCha20Poly1305::new(&(*EncryptionKey::generate().0).into());
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
    fn encryption_keys_come_as_base64_of_32_bytes_and_never_show() {
        let encoded = BASE64.encode([7u8; 32]);
        let key = EncryptionKey::from_base64(&format!(" {encoded}\n")).unwrap();
        assert_eq!(*key.0, [7u8; 32]);
        assert_eq!(format!("{key:?}"), "EncryptionKey([redacted])");
        let short = BASE64.encode([7u8; 31]);
        let long = BASE64.encode([7u8; 33]);
        for bad in ["", "not base64!", &short, &long] {
            let error = EncryptionKey::from_base64(bad).unwrap_err();
            assert!(error.is_invalid_key(), "{bad}");
        }
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

    #[test]
    fn invalid_redis_url_is_an_error_that_does_not_echo_it() {
        let source = crate::StaticToken::new(AccessToken::bearer("t").unwrap());
        let error = RedisShared::builder(source, SharedKey::new("https://h/t", "id"))
            .redis_url("http://user:hunter2@h/")
            .build()
            .unwrap_err();
        assert!(error.is_invalid_url());
        assert!(!format!("{error:?}").contains("hunter2"));
    }

    #[test]
    fn debug_shows_no_secret() {
        let source = crate::StaticToken::new(AccessToken::bearer("s3cr3t").unwrap());
        let key = SharedKey::new("https://h/t", "id").param("audience", "aud-value");
        let builder = RedisShared::builder(source, key).redis_url("redis://:hunter2@127.0.0.1/");
        let shown = format!("{builder:?}");
        let shared = builder.build().unwrap();
        let shown = format!("{shown} {shared:?}");
        assert!(
            !shown.contains("s3cr3t") && !shown.contains("hunter2"),
            "{shown}"
        );
        assert!(!shown.contains("aud-value"), "{shown}");
    }

    fn _send_sync(shared: RedisShared<crate::StaticToken>) -> impl Send + Sync {
        shared
    }
}
