//! [`RedisSharedBuilder`]: the options of a [`RedisShared`] and their defaults.

use super::{
    Counters, EncryptionKey, RedisShared, Shared, SharedKey,
    connection::{Connection, Redis},
    encryption::KeyRing,
};
use crate::{error::Error, token::TokenSource};
use redis::{aio::ConnectionManager, cluster_async::ClusterConnection};
use std::{fmt, sync::Arc, time::Duration};

/// Where Redis is: the last of the builder's methods that say it wins.
enum Target {
    Url(String),
    Cluster(Vec<String>),
    Connection(Connection),
}

/// The Redis server when none is set: see [`RedisSharedBuilder::redis_url`].
const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379/";
/// The key prefix when none is set: see [`RedisSharedBuilder::key_prefix`].
const DEFAULT_KEY_PREFIX: &str = "blaze-auth:";
/// The lock's lease when none is set: see [`RedisSharedBuilder::lease`].
const DEFAULT_LEASE: Duration = Duration::from_secs(10);
/// How long a process waits for another's token when not set: see
/// [`RedisSharedBuilder::follower_wait`].
const DEFAULT_FOLLOWER_WAIT: Duration = Duration::from_secs(20);
/// The limit on one Redis operation when none is set: see [`RedisSharedBuilder::op_timeout`].
const DEFAULT_OP_TIMEOUT: Duration = Duration::from_millis(250);
/// The first shared cool-down after a failed fetch when none is set: see
/// [`RedisSharedBuilder::failure_cooldown`]; the layer's.
const DEFAULT_FAILURE_COOLDOWN: Duration = Duration::from_secs(1);
/// How often a waiting process looks for the token when not set: see
/// [`RedisSharedBuilder::poll_interval`].
const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(50);

impl<S: TokenSource> RedisShared<S> {
    /// A [`RedisSharedBuilder`] for a source that shares the tokens of `source` under `key`.
    pub fn builder(source: S, key: SharedKey) -> RedisSharedBuilder<S> {
        RedisSharedBuilder {
            source,
            key,
            target: Target::Url(DEFAULT_REDIS_URL.into()),
            key_prefix: DEFAULT_KEY_PREFIX.into(),
            lease: DEFAULT_LEASE,
            follower_wait: DEFAULT_FOLLOWER_WAIT,
            op_timeout: DEFAULT_OP_TIMEOUT,
            poll_interval: DEFAULT_POLL_INTERVAL,
            failure_cooldown: DEFAULT_FAILURE_COOLDOWN,
            refresh_margin: crate::layer::DEFAULT_REFRESH_MARGIN,
            encryption_key: None,
            previous_keys: Vec::new(),
            require_encryption: false,
        }
    }
}

/// Configures a [`RedisShared`]; made by [`RedisShared::builder`].
pub struct RedisSharedBuilder<S> {
    source: S,
    key: SharedKey,
    target: Target,
    key_prefix: String,
    lease: Duration,
    follower_wait: Duration,
    op_timeout: Duration,
    poll_interval: Duration,
    failure_cooldown: Duration,
    refresh_margin: Duration,
    encryption_key: Option<EncryptionKey>,
    previous_keys: Vec<EncryptionKey>,
    require_encryption: bool,
}

impl<S> RedisSharedBuilder<S> {
    /// Sets the Redis server, as a `redis://` or `rediss://` (TLS) URL; credentials go in its
    /// user info. Default: `redis://127.0.0.1:6379/`. The connection is made at the first
    /// fetch, so a Redis that is down at start-up delays nothing.
    pub fn redis_url(mut self, url: &str) -> Self {
        self.target = Target::Url(url.into());
        self
    }

    /// Uses a Redis Cluster (self-hosted, or managed in cluster mode: ElastiCache, Azure
    /// Cache, Valkey) instead of one server, reached first through any of `urls` (`redis://`
    /// or `rediss://`, each a node of the cluster; the others are discovered). The keys of
    /// one [`SharedKey`] carry its digest as a hash tag, so they live in one slot and every
    /// script runs on one node. When the master that holds that slot is down, Redis
    /// operations fail and the processes fetch without Redis (see the module docs) until a
    /// replica takes over or the master returns. Default: none, one server.
    pub fn cluster_urls(mut self, urls: &[&str]) -> Self {
        self.target = Target::Cluster(urls.iter().map(|url| (*url).into()).collect());
        self
    }

    /// Uses a connection manager the application already has, instead of
    /// [`redis_url`](Self::redis_url). Its own timeouts and retries apply, under
    /// [`op_timeout`](Self::op_timeout). Default: none.
    pub fn connection(mut self, connection: ConnectionManager) -> Self {
        self.target = Target::Connection(Connection::Single(connection));
        self
    }

    /// Uses a Redis Cluster connection the application already has, instead of
    /// [`cluster_urls`](Self::cluster_urls). Its own timeouts and retries apply, under
    /// [`op_timeout`](Self::op_timeout). Default: none.
    pub fn cluster_connection(mut self, connection: ClusterConnection) -> Self {
        self.target = Target::Connection(Connection::Cluster(connection));
        self
    }

    /// Sets the prefix of the Redis keys, e.g. to keep several deployments apart on one
    /// Redis. Default: `blaze-auth:`.
    pub fn key_prefix(mut self, prefix: &str) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// Sets the lease of the lock a process holds while it fetches the token.
    ///
    /// The holder renews it every third of a lease, counted from when it took the lock, while
    /// its fetch runs, so a slow fetch keeps the lock; a holder that crashed loses it at most
    /// one lease later, and a waiting process takes over.
    ///
    /// It must be longer than three [`op_timeout`](Self::op_timeout)s (750 ms with the
    /// default), or [`build`](Self::build) fails: taking the lock, reading the token again
    /// and the first renewal may each take up to an op timeout, and must all land before the
    /// lease runs out, or another process takes the lock and fetches a second token.
    /// Default: 10 s.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(Duration::from_millis(3));
        self
    }

    /// Sets how long a process waits for the token another process is fetching before it
    /// fetches one itself. Keep it above the lease, so that a crashed holder is taken over
    /// rather than bypassed, and below the layer's fetch timeout. Default:
    /// 20 s.
    pub fn follower_wait(mut self, wait: Duration) -> Self {
        self.follower_wait = wait;
        self
    }

    /// Sets the limit on each Redis operation; one that takes longer counts as Redis being
    /// down, and the process fetches its token without Redis. It must be under a third of the
    /// [`lease`](Self::lease) (see there why), or [`build`](Self::build) fails. Default:
    /// 250 ms.
    pub fn op_timeout(mut self, timeout: Duration) -> Self {
        self.op_timeout = timeout;
        self
    }

    /// Sets how often a waiting process looks for the token in Redis. Default:
    /// 50 ms.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// Sets the fleet's cool-down after a failed fetch. When the fetch of the process holding
    /// the lock fails, it records the failure in Redis, and until the cool-down ends every
    /// process sharing the token gets an error at once instead of asking the token endpoint
    /// again: for an endpoint that is down, the fleet's token requests follow one schedule,
    /// not one per process. The cool-down doubles with each failure in a row, up to 30 s (or
    /// this, if longer), as the layer's own does. A stored token ends it. Default: 1 s, the
    /// layer's [`fetch_cooldown`](crate::BlazeAuthLayerBuilder::fetch_cooldown).
    pub fn failure_cooldown(mut self, cooldown: Duration) -> Self {
        self.failure_cooldown = cooldown;
        self
    }

    /// Sets how close to its expiry a token in Redis counts as absent, so that the next
    /// process to ask fetches a new one; capped at half the token's lifetime, as the
    /// layer's refresh margin is. Set it to the layer's
    /// [`refresh_margin`](crate::BlazeAuthLayerBuilder::refresh_margin): the layer then finds a fresh
    /// token in Redis when it refreshes. Default: 60 s, the layer's
    /// default.
    pub fn refresh_margin(mut self, margin: Duration) -> Self {
        self.refresh_margin = margin;
        self
    }

    /// Seals the tokens kept in Redis with `key` (XChaCha20-Poly1305, bound to the Redis key
    /// they are stored under), so that whoever reads or writes Redis without the key can
    /// neither use the shared token nor plant one: a process with a key reads only what one
    /// of its keys sealed. Every process sharing the token needs the key. A process without
    /// it never replaces a sealed token (the store is refused in Redis): it fetches and keeps
    /// its own, with a warning. Default: none, tokens are stored in clear.
    pub fn encryption_key(mut self, key: EncryptionKey) -> Self {
        self.encryption_key = Some(key);
        self
    }

    /// Adds a key that tokens sealed earlier may be sealed with; it opens them but seals
    /// nothing. To rotate without an outage: give every process the new key as
    /// [`encryption_key`](Self::encryption_key) and the old one here (the fleet keeps reading
    /// the tokens sealed with the old key, and writes with the new one), then drop the old
    /// key once every process runs with the new one. Call it once per key. Default: none.
    pub fn previous_encryption_key(mut self, key: EncryptionKey) -> Self {
        self.previous_keys.push(key);
        self
    }

    /// Requires an [`encryption_key`](Self::encryption_key): [`build`](Self::build) fails
    /// without one, so a process whose key was left out of its configuration stops at
    /// start-up instead of sharing tokens in clear. Default: `false`.
    pub fn require_encryption(mut self, required: bool) -> Self {
        self.require_encryption = required;
        self
    }

    /// Builds the source. No connection is made yet.
    ///
    /// # Errors
    ///
    /// If the Redis URL, or a cluster URL, is not valid ([`Error::is_config`]); the
    /// error does not repeat it, since it may hold a password. If encryption is
    /// [required](Self::require_encryption), or previous keys are given, and no
    /// [`encryption_key`](Self::encryption_key) is ([`Error::is_config`]). If the
    /// [`lease`](Self::lease) is not longer than three [`op_timeout`](Self::op_timeout)s
    /// ([`Error::is_config`]).
    pub fn build(self) -> Result<RedisShared<S>, Error> {
        let needs_key = self.require_encryption || !self.previous_keys.is_empty();
        if needs_key && self.encryption_key.is_none() {
            return Err(Error::invalid_key());
        }
        // The SET that takes the lock, the read after it and the first renewal, each up to
        // an op timeout, all before the lease runs out.
        if self.op_timeout.saturating_mul(3) >= self.lease {
            return Err(Error::lease_too_short());
        }
        let invalid_url = |_| Error::invalid_url(Some("not a valid Redis URL".into()));
        let redis = match self.target {
            Target::Url(url) => Redis::single(&url, self.op_timeout).map_err(invalid_url)?,
            Target::Cluster(urls) => Redis::cluster(&urls, self.op_timeout).map_err(invalid_url)?,
            Target::Connection(connection) => Redis::given(connection),
        };
        let digest = self.key.digest();
        // The digest is a hash tag: on a Redis Cluster all three keys live on one node.
        let key = |name: &str| format!("{}{{{digest}}}:{name}", self.key_prefix);
        Ok(RedisShared {
            inner: Arc::new(Shared {
                token_key: key("token"),
                lock_key: key("lock"),
                failure_key: key("failures"),
                source: self.source,
                redis,
                failure_cooldown: self.failure_cooldown,
                lease: self.lease,
                follower_wait: self.follower_wait,
                op_timeout: self.op_timeout,
                poll_interval: self.poll_interval,
                refresh_margin: self.refresh_margin,
                keys: KeyRing::new(self.encryption_key.as_ref(), &self.previous_keys),
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
            .field("previous_keys", &self.previous_keys.len())
            .field("require_encryption", &self.require_encryption)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::AccessToken;

    #[test]
    fn invalid_redis_url_is_an_error_that_does_not_echo_it() {
        let source = crate::StaticToken::new(AccessToken::bearer("t").unwrap());
        let error = RedisShared::builder(source, SharedKey::new("https://h/t", "id"))
            .redis_url("http://user:hunter2@h/")
            .build()
            .unwrap_err();
        assert!(error.is_config());
        assert!(!format!("{error:?}").contains("hunter2"));
    }

    #[test]
    fn a_lease_not_longer_than_three_op_timeouts_is_refused() {
        let source = crate::StaticToken::new(AccessToken::bearer("t").unwrap());
        let builder = || RedisShared::builder(source.clone(), SharedKey::new("https://h/t", "id"));
        // Three times the default op timeout, 250 ms.
        let error = builder()
            .lease(Duration::from_millis(750))
            .build()
            .unwrap_err();
        assert!(error.is_config());
        assert_eq!(
            error.to_string(),
            "lease of the Redis lock is not longer than three op timeouts"
        );
        // The default lease, 10 s.
        let error = builder()
            .op_timeout(Duration::from_millis(3334))
            .build()
            .unwrap_err();
        assert!(error.is_config());
        assert!(builder().op_timeout(Duration::MAX).build().is_err());

        assert!(builder().lease(Duration::from_millis(751)).build().is_ok());
        assert!(
            builder()
                .op_timeout(Duration::from_millis(3333))
                .build()
                .is_ok()
        );
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
}
