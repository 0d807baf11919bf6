//! The lock protocol: read the shared token, or take the lock and fetch it, or wait for the
//! process that holds the lock.

use super::{
    Shared,
    codec::{Codec, fingerprint, millis, now_ms, shareable_until},
    connection::Connection,
    scripts::{FAIL, INVALIDATE, RELEASE, RENEW, STORE},
};
use crate::{
    error::BoxError,
    token::{AccessToken, TokenSource},
};
use futures_util::future::{Either, select};
use redis::RedisError;
use std::{
    fmt,
    future::Future,
    pin::pin,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};
use tokio::time::Instant;

/// The longest shared cool-down, unless the configured first one is longer: the layer's.
const MAX_COOLDOWN: Duration = Duration::from_secs(30);

/// How long Redis remembers the count of failures in a row after a cool-down ends, so that
/// the next failure doubles it.
const FAILURE_MEMORY: Duration = Duration::from_secs(60);

/// Why a shared fetch did not give a token.
enum Failure {
    /// Redis failed or was too slow: fetch without it.
    Redis(BoxError),
    /// Another process held the lock for longer than the follower wait.
    WaitTimedOut,
    /// The wrapped source failed while this process held the lock.
    Source(BoxError),
    /// A process's fetch failed lately, and the fleet's cool-down has not ended.
    CoolingDown(u64),
}

/// What Redis holds for the fleet.
enum Found {
    /// A token to use.
    Token(AccessToken),
    /// No token, and the fleet's cool-down after this many failed fetches in a row.
    CoolingDown(u64),
    /// Neither: a token is to be fetched.
    Nothing,
}

/// The error of a fetch during the fleet's cool-down.
#[derive(Debug)]
struct FleetCoolingDown(u64);

impl fmt::Display for FleetCoolingDown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the token endpoint failed {} time(s) in a row for the processes sharing the token; \
             not asking it again before their cool-down ends",
            self.0
        )
    }
}

impl std::error::Error for FleetCoolingDown {}

impl<S: TokenSource> Shared<S> {
    pub(super) async fn fetch(
        &self,
        rejected: Option<&AccessToken>,
    ) -> Result<AccessToken, BoxError> {
        let why = match self.fetch_shared(rejected).await {
            Ok(token) => return Ok(token),
            Err(Failure::Source(error)) => return Err(error),
            Err(Failure::CoolingDown(in_a_row)) => {
                self.counters.cooldowns.fetch_add(1, Ordering::Relaxed);
                return Err(FleetCoolingDown(in_a_row).into());
            }
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
            match self.read(&mut con, rejected_fp.as_deref()).await? {
                Found::Token(token) => {
                    self.counters.shared_hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(token);
                }
                Found::CoolingDown(in_a_row) => return Err(Failure::CoolingDown(in_a_row)),
                Found::Nothing => {}
            }
            let holder = format!("{:032x}", fastrand::u128(..));
            // Taken before the SET is sent: Redis starts the lease when the SET arrives, so
            // the lease runs out no sooner than one lease after this.
            let lease_start = Instant::now();
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
                return self
                    .lead(&mut con, &holder, lease_start, rejected, rejected_fp)
                    .await;
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

    /// Fetches the token as the lock holder, stores it and releases the lock. The lease
    /// started no sooner than `lease_start`.
    async fn lead(
        &self,
        con: &mut Connection,
        holder: &str,
        lease_start: Instant,
        rejected: Option<&AccessToken>,
        rejected_fp: Option<String>,
    ) -> Result<AccessToken, Failure> {
        // The token, or a failure, may have been stored between our read and our lock.
        match self.read(con, rejected_fp.as_deref()).await {
            Ok(Found::Token(token)) => {
                self.release(con, holder).await;
                self.counters.shared_hits.fetch_add(1, Ordering::Relaxed);
                return Ok(token);
            }
            Ok(Found::CoolingDown(in_a_row)) => {
                self.release(con, holder).await;
                return Err(Failure::CoolingDown(in_a_row));
            }
            Ok(Found::Nothing) | Err(_) => {}
        }
        self.counters.source_fetches.fetch_add(1, Ordering::Relaxed);
        tracing::debug!("holding the Redis lock: fetching the token");
        let result = self
            .fetch_renewing(con, holder, lease_start, rejected)
            .await;
        let recorded = match &result {
            Ok(token) => self.store(con, token).await,
            Err(_) => self.record_failure(con).await,
        };
        if let Err(Failure::Redis(error)) = recorded {
            tracing::warn!(%error, "could not record the fetch's outcome in Redis");
        }
        // Released after the outcome is recorded: a process that takes the lock next finds it.
        self.release(con, holder).await;
        result.map_err(Failure::Source)
    }

    /// Fetches from the wrapped source, renewing the lease until the fetch ends: every third
    /// of a lease from `lease_start`, not from the fetch's start, since the read in between
    /// may have taken an op timeout. A renewal that is due while the one before still runs
    /// is sent when that one ends.
    async fn fetch_renewing(
        &self,
        con: &Connection,
        holder: &str,
        lease_start: Instant,
        rejected: Option<&AccessToken>,
    ) -> Result<AccessToken, BoxError> {
        let mut renew_con = con.clone();
        let renew = async {
            // Since `lease_start`; saturating, as a lease may be "for good".
            let mut due = Duration::ZERO;
            loop {
                due = due.saturating_add(self.lease / 3);
                tokio::time::sleep(due.saturating_sub(lease_start.elapsed())).await;
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

    /// The stored token, if there is one that is neither near its expiry nor `rejected_fp`;
    /// else the fleet's cool-down, if one runs.
    async fn read(
        &self,
        con: &mut Connection,
        rejected_fp: Option<&str>,
    ) -> Result<Found, Failure> {
        // Bytes, not typed values: what Redis holds is not trusted to parse, and a value that
        // does not is ignored (and replaced), not an error that sends the fleet around Redis.
        let (value, failures, failure_ttl): (Option<Vec<u8>>, Option<Vec<u8>>, i64) = self
            .op(redis::pipe()
                .cmd("GET")
                .arg(&self.token_key)
                .cmd("GET")
                .arg(&self.failure_key)
                .cmd("PTTL")
                .arg(&self.failure_key)
                .query_async(con))
            .await?;
        if let Some(token) = value.and_then(|value| self.accept(&value, rejected_fp)) {
            return Ok(Found::Token(token));
        }
        // The failure's PTTL is the cool-down left plus the memory of the count. A count that
        // is not a number, or a cool-down longer than any this process records, was not
        // written by a process of the fleet: ignored, so that a planted record cannot stop
        // the fleet's fetches for longer than the longest cool-down.
        let in_a_row =
            failures.and_then(|count| std::str::from_utf8(&count).ok()?.parse::<u64>().ok());
        let cooldown_left = u64::try_from(failure_ttl)
            .ok()
            .and_then(|ttl| ttl.checked_sub(millis(FAILURE_MEMORY)))
            .filter(|&left| left > 0 && left <= millis(self.max_cooldown()));
        match (in_a_row, cooldown_left) {
            (Some(in_a_row), Some(_)) => Ok(Found::CoolingDown(in_a_row)),
            _ => Ok(Found::Nothing),
        }
    }

    /// The longest cool-down this process records: [`MAX_COOLDOWN`], or the first one if it
    /// is longer.
    fn max_cooldown(&self) -> Duration {
        MAX_COOLDOWN.max(self.failure_cooldown)
    }

    /// The token in `value`, if this process can read it and would accept it.
    fn accept(&self, value: &[u8], rejected_fp: Option<&str>) -> Option<AccessToken> {
        let Some((fp, stored)) = self.codec().decode(value) else {
            tracing::warn!(
                sealed = self.keys.current().is_some(),
                "the token stored in Redis cannot be read with this process's keys: fetching a new one"
            );
            return None;
        };
        if rejected_fp == Some(fp) {
            return None;
        }
        stored.into_token(now_ms(), self.refresh_margin)
    }

    /// Records a failed fetch for the fleet: its cool-down doubles with each failure in a
    /// row, as the layer's does.
    async fn record_failure(&self, con: &mut Connection) -> Result<(), Failure> {
        let first = self.failure_cooldown;
        let mut invocation = FAIL.key(&self.failure_key);
        invocation
            .arg(millis(first))
            .arg(millis(self.max_cooldown()))
            .arg(millis(FAILURE_MEMORY));
        let in_a_row: u64 = self.op(invocation.invoke_async(con)).await?;
        tracing::debug!(in_a_row, "token fetch failure recorded in Redis");
        Ok(())
    }

    /// Stores `token` for the fleet, if it is one the fleet accepts (see
    /// [`shareable_until`]) and the stored one is not sealed while this process is not.
    async fn store(&self, con: &mut Connection, token: &AccessToken) -> Result<(), Failure> {
        let now = now_ms();
        let Some(expires_at_ms) = shareable_until(token, now) else {
            tracing::debug!("not a Bearer token that expires within a day: not shared");
            return Ok(());
        };
        let mut invocation = STORE.key(&self.token_key);
        invocation
            .key(&self.failure_key)
            .arg(self.codec().encode(token, now, expires_at_ms))
            .arg(expires_at_ms - now)
            .arg(if self.keys.current().is_some() {
                "sealed"
            } else {
                "clear"
            });
        let stored: i64 = self.op(invocation.invoke_async(con)).await?;
        if stored == 0 {
            tracing::warn!(
                "a sealed token is stored in Redis and this process has no encryption key: \
                 its token is not shared"
            );
        }
        Ok(())
    }

    fn codec(&self) -> Codec<'_> {
        Codec {
            keys: &self.keys,
            aad: &self.token_key,
        }
    }

    async fn release(&self, con: &mut Connection, holder: &str) {
        let mut invocation = RELEASE.key(&self.lock_key);
        invocation.arg(holder);
        // A lock that cannot be released ends with its lease.
        let _: Result<i64, _> = self.op(invocation.invoke_async(con)).await;
    }

    fn connection(&self) -> Result<Connection, Failure> {
        self.redis.connection().map_err(|error| {
            self.counters.redis_errors.fetch_add(1, Ordering::Relaxed);
            Failure::Redis(Box::new(SharedRedisError(error)))
        })
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
