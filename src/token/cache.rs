//! The token cache every request goes through.
//!
//! Reads are lock-free: the current token sits in an [`ArcSwapOption`], and a request with a
//! valid token loads it, clones its header value and goes. Only a request that finds no valid
//! token takes the mutex, and only to join the fetch under way or start one. The fetch runs in
//! a task of its own, so a caller that gives up does not cancel it for the others; every waiter
//! gets its result, success or error.
//!
//! A token is refreshed ahead of its expiry: from its refresh time (the expiry less the
//! refresh margin) the first request starts a background fetch while all requests keep using
//! the cached token until it expires, so no request waits for a routine refresh.
//!
//! A failed fetch starts a cool-down, doubling with each failure in a row: until it ends,
//! requests without a valid token get the last error at once instead of a new fetch, and a
//! failed refresh ahead of expiry is tried again only after it.

use crate::{
    error::{BoxError, Error},
    metrics::{Metrics, export},
    token::{AccessToken, TokenSource},
};
use arc_swap::ArcSwapOption;
use futures_util::future::{FutureExt, Shared};
use http::HeaderValue;
use std::{
    error::Error as StdError,
    fmt,
    future::Future,
    panic::AssertUnwindSafe,
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};
use tokio::{
    task::{AbortHandle, JoinHandle},
    time::Instant,
};

/// The longest cool-down, unless the configured first one is longer.
const MAX_COOLDOWN: Duration = Duration::from_secs(30);

/// The shortest time a token that arrived expired is kept: see [`TokenCache::expired_on_arrival`].
const MIN_EXPIRED_HOLD: Duration = Duration::from_secs(1);

/// How a cache refreshes tokens and backs off after failures.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CacheConfig {
    pub(crate) refresh_margin: Duration,
    pub(crate) refresh_jitter: Duration,
    pub(crate) fetch_cooldown: Duration,
    pub(crate) fetch_timeout: Duration,
    pub(crate) storm_window: Duration,
}

/// The cached token of one layer (and of every service and clone made from it).
pub(crate) struct TokenCache {
    source: Box<dyn TokenSource>,
    current: ArcSwapOption<Entry>,
    flight: Mutex<Flight>,
    config: CacheConfig,
    /// Origin of the nanosecond timestamps in [`Entry::refresh_at`].
    epoch: Instant,
    counters: Counters,
}

#[derive(Default)]
struct Counters {
    fetches: AtomicU64,
    failures: AtomicU64,
    retries: AtomicU64,
    skipped: AtomicU64,
}

#[derive(Default)]
struct Flight {
    /// The fetch under way and a handle telling whether its task is still alive.
    pending: Option<(TokenWait, AbortHandle)>,
    /// The last fetch failed: its error stands for every fetch until the cool-down ends.
    failure: Option<Failure>,
    /// The last token arrived expired (and that was logged).
    arrived_expired: bool,
    next_id: u64,
}

impl Flight {
    /// The fetch under way, if its task is alive. A task that ended without clearing
    /// `pending` was cancelled (its runtime shut down): another must start rather than its
    /// error be handed out forever.
    fn live_pending(&self) -> Option<&TokenWait> {
        let (wait, task) = self.pending.as_ref()?;
        (!task.is_finished()).then_some(wait)
    }
}

struct Failure {
    error: SharedError,
    until: Instant,
    in_a_row: u32,
}

/// A token in the cache.
pub(crate) struct Entry {
    token: AccessToken,
    /// Tells this entry apart from every other of its cache: a 401 names the entry it hit.
    id: u64,
    /// When to refresh ahead of expiry, in nanoseconds since the cache's epoch. The request
    /// that swaps in [`CLAIMED`] starts the refresh; a failed refresh sets a later time.
    refresh_at: AtomicU64,
    issued_at: Instant,
    /// Fetched because the server refused the token before, and not yet accepted by it: if
    /// this one is refused too, soon, a new token is not what the server wants (see
    /// `storm_window`).
    on_probation: AtomicBool,
    /// Whether the storm guard has said so in the log for this token.
    storm_logged: AtomicBool,
}

/// [`Entry::refresh_at`] of an entry whose refresh is under way, or that never expires.
const CLAIMED: u64 = u64::MAX;

/// The token one request is sent with.
pub(crate) struct Credential {
    pub(crate) header: HeaderValue,
    pub(crate) id: u64,
    /// The token is on probation: tell the cache when the server accepts it.
    pub(crate) on_probation: bool,
}

pub(crate) enum Lookup {
    Ready(Credential),
    Wait(TokenWait),
    Failed(Error),
}

type SharedError = Arc<dyn StdError + Send + Sync>;
type FetchResult = Result<Arc<Entry>, SharedError>;

impl TokenCache {
    pub(crate) fn new(source: Box<dyn TokenSource>, config: CacheConfig) -> Self {
        Self {
            source,
            current: ArcSwapOption::empty(),
            flight: Mutex::default(),
            config,
            epoch: Instant::now(),
            counters: Counters::default(),
        }
    }

    /// The token for a new request: the cached one if it is valid, else a wait for the fetch
    /// that replaces it.
    pub(crate) fn get(self: &Arc<Self>) -> Lookup {
        if let Some(entry) = &*self.current.load() {
            let Some(expires_at) = entry.token.expires_at() else {
                return Lookup::Ready(entry.credential());
            };
            // Not `is_valid_at`: the clock is read only for a token that can expire.
            let now = Instant::now();
            if now < expires_at {
                export::token_used(expires_at - now);
                let refresh_at = entry.refresh_at.load(Ordering::Acquire);
                if self.nanos(now) >= refresh_at {
                    self.refresh_ahead(entry, refresh_at);
                }
                return Lookup::Ready(entry.credential());
            }
        }
        self.renew(None)
    }

    /// The token to retry with after the server rejected the one with id `rejected`, or
    /// `None` if the storm guard says a new token will not help: the 401 is the answer.
    ///
    /// Only the first rejection of the cached token fetches a new one; a request that was
    /// sent with an older token gets the current one, or joins the fetch under way.
    pub(crate) fn reject(self: &Arc<Self>, rejected: u64) -> Option<Lookup> {
        if let Some(entry) = &*self.current.load() {
            if entry.id == rejected && self.in_storm(entry, Instant::now()) {
                return None;
            }
        }
        Some(self.renew(Some(rejected)))
    }

    fn renew(self: &Arc<Self>, rejected: Option<u64>) -> Lookup {
        let mut flight = self.lock();
        let now = Instant::now();
        let mut rejected_token = None;
        if let Some(entry) = self.current.load_full() {
            if Some(entry.id) == rejected {
                self.current.store(None);
                rejected_token = Some(entry.token.clone());
            } else if entry.is_valid_at(now) {
                return Lookup::Ready(entry.credential());
            }
        }
        if let Some(wait) = flight.live_pending() {
            return Lookup::Wait(wait.clone());
        }
        if let Some(failure) = flight.failure.as_ref().filter(|f| now < f.until) {
            return Lookup::Failed(Error::token(Arc::clone(&failure.error)));
        }
        Lookup::Wait(self.start(&mut flight, rejected_token))
    }

    /// Whether refusing `entry` is part of a storm that new tokens do not calm: it was itself
    /// fetched after a refusal, not long ago, and the server has accepted it for no request
    /// yet. Counts and logs the refusal if so.
    fn in_storm(&self, entry: &Entry, now: Instant) -> bool {
        let on_probation = entry.on_probation.load(Ordering::Relaxed);
        if !on_probation || now >= entry.issued_at + self.config.storm_window {
            return false;
        }
        self.counters.skipped.fetch_add(1, Ordering::Relaxed);
        export::storm_guard_skip();
        if !entry.storm_logged.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                window_s = self.config.storm_window.as_secs(),
                "a token fetched after a 401 was refused too: returning 401s without a new token for the rest of the window"
            );
        }
        true
    }

    /// The server accepted the token with id `id`: it is off probation.
    pub(crate) fn accept(&self, id: u64) {
        if let Some(entry) = &*self.current.load() {
            if entry.id == id {
                entry.on_probation.store(false, Ordering::Relaxed);
            }
        }
    }

    /// Counts a request sent again after a 401.
    pub(crate) fn count_retry(&self) {
        self.counters.retries.fetch_add(1, Ordering::Relaxed);
        export::retry();
    }

    pub(crate) fn metrics(&self) -> Metrics {
        let current = self.current.load();
        let now = Instant::now();
        Metrics {
            token_fetches: self.counters.fetches.load(Ordering::Relaxed),
            fetch_failures: self.counters.failures.load(Ordering::Relaxed),
            retries: self.counters.retries.load(Ordering::Relaxed),
            refreshes_skipped: self.counters.skipped.load(Ordering::Relaxed),
            token_age: current
                .as_ref()
                .map(|entry| now.saturating_duration_since(entry.issued_at)),
            token_lifetime: current.as_ref().and_then(|entry| {
                Some(
                    entry
                        .token
                        .expires_at()?
                        .saturating_duration_since(entry.issued_at),
                )
            }),
        }
    }

    /// Starts the refresh ahead of expiry, unless another request did (or is in the way of
    /// doing so) since `refresh_at` was read.
    fn refresh_ahead(self: &Arc<Self>, entry: &Entry, refresh_at: u64) {
        let claimed = entry
            .refresh_at
            .compare_exchange(refresh_at, CLAIMED, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok();
        if claimed {
            let mut flight = self.lock();
            if flight.live_pending().is_none() {
                self.start(&mut flight, None);
            }
        }
    }

    fn start(self: &Arc<Self>, flight: &mut Flight, rejected: Option<AccessToken>) -> TokenWait {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return TokenWait::failed("no Tokio runtime to fetch the token on");
        };
        let cache = Arc::clone(self);
        self.counters.fetches.fetch_add(1, Ordering::Relaxed);
        export::fetch_started();
        let after_rejection = rejected.is_some();
        // The fetch task runs in a span of its own, a root: it serves every request that
        // waits for it, not the one that happened to start it. A source's events
        // (ClientCredentials' attempts) nest under it.
        let span = tracing::debug_span!(parent: None, "blaze_auth::cache_fetch", after_rejection);
        let fetch = async move {
            tracing::debug!("fetching a token");
            // A panicking source is reported like any failed fetch; a hanging one times out.
            let fetch = AssertUnwindSafe(cache.source.fetch(rejected.as_ref())).catch_unwind();
            let started = Instant::now();
            let result = match tokio::time::timeout(cache.config.fetch_timeout, fetch).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err("token source panicked".into()),
                Err(_) => Err("token fetch timed out".into()),
            };
            let ended = Instant::now();
            let remaining = |token: &AccessToken| token.expires_at()?.checked_duration_since(ended);
            export::fetch_ended(
                ended - started,
                result.as_ref().map(remaining).map_err(drop),
            );
            cache.finish(result, after_rejection)
        };
        let handle = runtime.spawn(tracing::Instrument::instrument(fetch, span));
        let task = handle.abort_handle();
        let wait = TokenWait(FetchTask(Ok(handle)).shared());
        flight.pending = Some((wait.clone(), task));
        wait
    }

    fn finish(&self, result: Result<AccessToken, BoxError>, after_rejection: bool) -> FetchResult {
        let mut flight = self.lock();
        flight.pending = None;
        let now = Instant::now();
        match result {
            Ok(token) => {
                flight.failure = None;
                flight.next_id += 1;
                let (token, expired) = self.expired_on_arrival(token, now, &mut flight);
                let entry = self.entry(token, flight.next_id, now, after_rejection);
                if expired {
                    entry.refresh_at.store(CLAIMED, Ordering::Release);
                }
                let entry = Arc::new(entry);
                tracing::debug!(
                    lifetime_s = entry
                        .token
                        .expires_at()
                        .map(|at| at.saturating_duration_since(now).as_secs()),
                    "token cached"
                );
                self.current.store(Some(Arc::clone(&entry)));
                Ok(entry)
            }
            Err(error) => {
                let error = SharedError::from(error);
                self.counters.failures.fetch_add(1, Ordering::Relaxed);
                let in_a_row = flight.failure.as_ref().map_or(1, |f| f.in_a_row + 1);
                let cooldown = self.cooldown(in_a_row);
                tracing::warn!(%error, in_a_row, cooldown_ms = cooldown.as_millis() as u64, "token fetch failed");
                let until = now + cooldown;
                flight.failure = Some(Failure {
                    error: Arc::clone(&error),
                    until,
                    in_a_row,
                });
                // A still-valid token stays in use; its refresh is tried again after the
                // cool-down.
                if let Some(entry) = &*self.current.load() {
                    entry.refresh_at.store(self.nanos(until), Ordering::Release);
                }
                Err(error)
            }
        }
    }

    /// A token that arrived already expired (a source with a wrong clock, or one that
    /// hands out what it has) would make every request fetch again. It is used instead until
    /// the fetch cool-down (at least [`MIN_EXPIRED_HOLD`]) ends, with no refresh before, so
    /// such a source is asked at most once per cool-down; a WARN says so, once per run of
    /// expired tokens. Returns the token to cache and whether it arrived expired.
    fn expired_on_arrival(
        &self,
        token: AccessToken,
        now: Instant,
        flight: &mut Flight,
    ) -> (AccessToken, bool) {
        if token.expires_at().is_none_or(|at| at > now) {
            flight.arrived_expired = false;
            return (token, false);
        }
        let hold = self.config.fetch_cooldown.max(MIN_EXPIRED_HOLD);
        if !std::mem::replace(&mut flight.arrived_expired, true) {
            tracing::warn!(
                hold_ms = hold.as_millis() as u64,
                "the token source returned an expired token: using it, and fetching again no sooner than the cool-down"
            );
        }
        (token.with_expires_in(hold), true)
    }

    fn entry(&self, token: AccessToken, id: u64, now: Instant, after_rejection: bool) -> Entry {
        // The jitter spreads the refreshes of many clients that fetched at once; the margin
        // never takes more than half the token's lifetime, so that a token that lives 5 s is
        // not refreshed on every request because the margin is 60 s.
        let jitter = self.config.refresh_jitter.mul_f64(fastrand::f64());
        let refresh_at = token.expires_at().map_or(CLAIMED, |expires_at| {
            let lifetime = expires_at.saturating_duration_since(now);
            let margin = self.config.refresh_margin.saturating_add(jitter);
            self.nanos(expires_at - margin.min(lifetime / 2))
        });
        Entry {
            token,
            id,
            refresh_at: AtomicU64::new(refresh_at),
            issued_at: now,
            on_probation: AtomicBool::new(after_rejection),
            storm_logged: AtomicBool::new(false),
        }
    }

    /// The cool-down after `in_a_row` failed fetches: the configured one, doubled for each
    /// failure after the first, up to [`MAX_COOLDOWN`].
    fn cooldown(&self, in_a_row: u32) -> Duration {
        let first = self.config.fetch_cooldown;
        let doubled = first.saturating_mul(1 << in_a_row.saturating_sub(1).min(16));
        doubled.min(MAX_COOLDOWN.max(first))
    }

    fn nanos(&self, at: Instant) -> u64 {
        let nanos = at.saturating_duration_since(self.epoch).as_nanos();
        u64::try_from(nanos).unwrap_or(CLAIMED)
    }

    fn lock(&self) -> MutexGuard<'_, Flight> {
        // Nothing panics while holding the lock; recover the state if something ever does.
        self.flight.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let current = self.current.load();
        f.debug_struct("TokenCache")
            .field("token", &current.as_ref().map(|entry| &entry.token))
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Entry {
    fn is_valid_at(&self, now: Instant) -> bool {
        self.token.expires_at().is_none_or(|at| now < at)
    }

    fn credential(&self) -> Credential {
        Credential {
            header: self.token.header().clone(),
            id: self.id,
            on_probation: self.on_probation.load(Ordering::Relaxed),
        }
    }
}

/// Waits for a token fetch; clones wait for the same fetch.
#[derive(Clone)]
pub(crate) struct TokenWait(Shared<FetchTask>);

impl TokenWait {
    fn failed(reason: &'static str) -> Self {
        Self(FetchTask(Err(Arc::from(BoxError::from(reason)))).shared())
    }
}

impl Future for TokenWait {
    type Output = Result<Credential, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|result| result.map(|entry| entry.credential()).map_err(Error::token))
    }
}

/// The fetch task, or why there is none.
struct FetchTask(Result<JoinHandle<FetchResult>, SharedError>);

impl Future for FetchTask {
    type Output = FetchResult;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.0 {
            Ok(handle) => Pin::new(handle).poll(cx).map(|joined| {
                joined
                    .unwrap_or_else(|_| Err(Arc::from(BoxError::from("token fetch was cancelled"))))
            }),
            Err(error) => Poll::Ready(Err(Arc::clone(error))),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::{
        BlazeAuth,
        test_helpers::{TestSource, inner},
    };
    use http::{Request, StatusCode};
    use std::{
        io::Write,
        sync::{Arc, Mutex},
        time::Duration,
    };
    use tower::ServiceExt;

    /// Everything logged at WARN on this thread while the guard lives.
    #[derive(Clone, Default)]
    struct Warnings(Arc<Mutex<Vec<u8>>>);

    impl Write for Warnings {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_source_of_expired_tokens_is_asked_once_per_cool_down_and_warned_about_once() {
        let warnings = Warnings::default();
        let writer = warnings.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_writer(move || writer.clone())
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);

        // Every token it gives has expired as it arrives.
        let source = TestSource::expiring(Duration::ZERO);
        let (service, calls) = inner::<String, _>(|_| StatusCode::OK);
        let client = BlazeAuth::new(service, source.clone(), "S");
        let get = || Request::get("/Patient").body(String::new()).unwrap();
        for _ in 0..10 {
            let response = client.clone().oneshot(get()).await.unwrap();
            assert_eq!(response.body(), "token-1");
        }
        assert_eq!(source.fetches(), 1, "not a fetch per request");
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 10);

        // After the cool-down (1 s by default), one more fetch for the next 10.
        tokio::time::advance(crate::DEFAULT_FETCH_COOLDOWN).await;
        for _ in 0..10 {
            client.clone().oneshot(get()).await.unwrap();
        }
        assert_eq!(source.fetches(), 2);

        let logged = String::from_utf8(warnings.0.lock().unwrap().clone()).unwrap();
        assert_eq!(
            logged.matches("returned an expired token").count(),
            1,
            "{logged}"
        );
    }
}
