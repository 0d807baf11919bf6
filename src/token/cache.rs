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
//! A failed fetch starts a cool-down, doubling with each failure in a row, or as long as the
//! token endpoint asked with `Retry-After` if that is longer ([`asked_pause`]): until it
//! ends, no new fetch starts, and a failed refresh ahead of expiry is tried again only after
//! it. A
//! request without a valid token rides the failure out: it waits for the one attempt the
//! cool-down allows at its end, and the next, up to `max_token_wait` after it met the failure
//! (a [`TokenWait`] with a [`Ride`]). It gets the last error at once instead when waiting
//! will not fix it ([`is_permanent`]), when the next attempt comes after its bound, or when
//! the bound or the cool-down is zero.

use crate::{
    backoff,
    error::{BoxError, Error, FetchError},
    metrics::{Metrics, export},
    rejection::Verdict,
    token::{AccessToken, PermanentError, TokenSource},
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
    task::{Context, Poll, ready},
    time::Duration,
};
use tokio::{
    task::{AbortHandle, JoinHandle},
    time::{Instant, Sleep},
};

/// The longest cool-down, unless the configured first one is longer.
const MAX_COOLDOWN: Duration = Duration::from_secs(30);

/// The longest a token endpoint's `Retry-After` holds fetches back: see [`asked_pause`].
#[cfg(feature = "oauth2")]
const MAX_ASKED_PAUSE: Duration = Duration::from_secs(300);

/// The shortest time a token that arrived expired is kept: see [`TokenCache::expired_on_arrival`].
const MIN_EXPIRED_HOLD: Duration = Duration::from_secs(1);

/// Stands for a time too far ahead to add to the clock: about 30 years, as tokio's own.
const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);

/// How a cache refreshes tokens and backs off after failures.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CacheConfig {
    pub(crate) refresh_margin: Duration,
    pub(crate) refresh_jitter: Duration,
    pub(crate) fetch_cooldown: Duration,
    pub(crate) fetch_timeout: Duration,
    pub(crate) storm_window: Duration,
    /// How long a request that met a failed fetch waits for the next attempts; zero: it
    /// fails at once.
    pub(crate) max_token_wait: Duration,
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
    waits: AtomicU64,
    waits_given_up: AtomicU64,
}

#[derive(Default)]
struct Flight {
    /// The fetch under way and a handle telling whether its task is still alive.
    pending: Option<(Fetch, AbortHandle)>,
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
    fn live_pending(&self) -> Option<&Fetch> {
        let (wait, task) = self.pending.as_ref()?;
        (!task.is_finished()).then_some(wait)
    }
}

struct Failure {
    error: SharedError,
    until: Instant,
    in_a_row: u32,
    /// Waiting will not fix the error ([`is_permanent`]).
    permanent: bool,
}

/// Why a request without a valid token cannot wait for a fetch now.
struct Refusal {
    error: SharedError,
    /// When the next attempt may start; `None` if waiting will not fix the error.
    retry_at: Option<Instant>,
}

/// A token in the cache.
pub(crate) struct Entry {
    token: AccessToken,
    /// Tells this entry apart from every other of its cache: a 401 names the entry it hit.
    id: u64,
    /// When to refresh ahead of expiry, in nanoseconds since the cache's epoch. The request
    /// that swaps in [`CLAIMED`] starts the refresh; a failed refresh sets a later time.
    refresh_at: AtomicU64,
    /// The first `refresh_at`, which a failed refresh only ever puts later, and never after
    /// the expiry: until then a request compares the clock with this one instant, and
    /// neither checks the expiry, loads `refresh_at` nor converts the clock.
    refresh_from: Instant,
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
    pub(crate) sent: Sent,
}

/// Which cached token a request went out with: what [`TokenCache::after_response`] needs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sent {
    id: u64,
    /// Fetched after a 401 and not accepted by the server yet: the storm guard watches it.
    on_probation: bool,
    /// The request is the retry after a 401: its answer goes to the caller, whatever it is.
    retry: bool,
}

impl Sent {
    /// The same token, sent with the retry.
    pub(crate) fn as_retry(self) -> Self {
        Self {
            retry: true,
            ..self
        }
    }
}

pub(crate) enum Lookup {
    Ready(Credential),
    Wait(TokenWait),
    Failed(Error),
}

type SharedError = Arc<dyn StdError + Send + Sync>;
type FetchResult = Result<Arc<Entry>, SharedError>;
/// A fetch under way; clones wait for the same fetch.
type Fetch = Shared<FetchTask>;

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
    /// that replaces it. (The layer's services look through their own view instead,
    /// [`get_through`](Self::get_through); the reqwest middleware has none.)
    #[cfg(feature = "reqwest-middleware")]
    pub(crate) fn get(self: &Arc<Self>) -> Lookup {
        self.lookup(&self.current.load())
    }

    /// The token for a new request, through a service's own [`TokenView`]: while the token stays the
    /// same, a pointer compare instead of arc-swap's protected load.
    pub(crate) fn get_through(self: &Arc<Self>, view: &mut TokenView) -> Lookup {
        self.lookup(view.0.load())
    }

    /// The lookup for a new request, with `current` as the cached token.
    // Inline in both: a frame of its own (with `Lookup` returned through memory) costs about
    // as much as the check itself.
    #[inline(always)]
    fn lookup(self: &Arc<Self>, current: &Option<Arc<Entry>>) -> Lookup {
        if let Some(entry) = current {
            let Some(expires_at) = entry.token.expires_at() else {
                return Lookup::Ready(entry.credential());
            };
            // Not `is_valid_at`: the clock is read only for a token that can expire.
            let now = Instant::now();
            // Until its refresh time, which is never after its expiry, a token is valid: the
            // common case in one compare.
            if now < entry.refresh_from {
                export::token_used(expires_at, now);
                return Lookup::Ready(entry.credential());
            }
            if now < expires_at {
                export::token_used(expires_at, now);
                let refresh_at = entry.refresh_at.load(Ordering::Acquire);
                if self.nanos(now) >= refresh_at {
                    self.refresh_ahead(entry, refresh_at);
                }
                return Lookup::Ready(entry.credential());
            }
        }
        self.renew(None)
    }

    /// Hears what the server said to the token a request was `sent` with, and says what the
    /// request does next: `None`, its response is the answer; `Some`, a retry gets its token
    /// from this lookup.
    ///
    /// A token on probation that the server accepted is off probation. A refused one is
    /// dropped, so that the next request does not meet it too, and a new one fetched, unless
    /// the storm guard says a new token will not help. Only the first refusal of the cached
    /// token fetches a new one; a request that was sent with an older token gets the current
    /// one, or joins the fetch under way. The retry's own answer goes to the caller as it is.
    // Every response pays for the first test, inline; a refusal is handled out of line.
    #[inline(always)]
    pub(crate) fn after_response(self: &Arc<Self>, sent: Sent, verdict: Verdict) -> Option<Lookup> {
        if verdict != Verdict::Refused {
            if sent.on_probation {
                self.accept(sent.id);
            }
            return None;
        }
        self.after_refusal(sent)
    }

    /// [`after_response`](Self::after_response) to a response that refused the token.
    #[inline(never)]
    fn after_refusal(self: &Arc<Self>, sent: Sent) -> Option<Lookup> {
        if sent.retry {
            return None;
        }
        if let Some(entry) = &*self.current.load() {
            if entry.id == sent.id && self.in_storm(entry, Instant::now()) {
                return None;
            }
        }
        Some(self.renew(Some(sent.id)))
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
        match self.attempt(&mut flight, now, rejected_token) {
            Ok(fetch) => Lookup::Wait(self.wait(Some(fetch))),
            // The cool-down ends soon enough: wait for the attempt at its end.
            Err(refusal) if self.ride_until(&refusal, self.wait_deadline(now)).is_some() => {
                Lookup::Wait(self.wait(None))
            }
            Err(refusal) => Lookup::Failed(Error::token(refusal.error)),
        }
    }

    /// The fetch a request without a valid token waits for: the one under way, or a new one
    /// unless a cool-down runs.
    fn attempt(
        self: &Arc<Self>,
        flight: &mut Flight,
        now: Instant,
        rejected: Option<AccessToken>,
    ) -> Result<Fetch, Refusal> {
        if let Some(fetch) = flight.live_pending() {
            return Ok(fetch.clone());
        }
        if let Some(failure) = flight.failure.as_ref().filter(|f| now < f.until) {
            return Err(Refusal {
                error: Arc::clone(&failure.error),
                retry_at: (!failure.permanent).then_some(failure.until),
            });
        }
        self.start(flight, rejected)
    }

    /// A wait for `fetch` that rides through its failure, unless [`rides`](Self::rides)
    /// says no; made under the flight lock, so that the failure count is that of the fetch
    /// joined. `None`: a cool-down runs, and the ride waits for its end.
    fn wait(self: &Arc<Self>, fetch: Option<Fetch>) -> TokenWait {
        TokenWait(match fetch {
            Some(fetch) if !self.rides() => Wait::Join(fetch),
            fetch => Wait::Ride(Box::new(Ride {
                cache: Arc::clone(self),
                fetch,
                failures_seen: self.counters.failures.load(Ordering::Relaxed),
                waiting: None,
            })),
        })
    }

    /// When a request refused by `refusal` wakes up to try again, if it waits at all: at the
    /// end of the cool-down, if waiting may fix the error and the next attempt starts before
    /// `deadline`.
    fn ride_until(&self, refusal: &Refusal, deadline: Instant) -> Option<Instant> {
        let rides = self.rides();
        refusal.retry_at.filter(|&at| rides && at < deadline)
    }

    /// When a request that meets a failure `now` gives up: `max_token_wait` later, or, for a
    /// bound the clock cannot add (`Duration::MAX` for "as long as it takes"), in
    /// [`FAR_FUTURE`].
    fn wait_deadline(&self, now: Instant) -> Instant {
        now.checked_add(self.config.max_token_wait)
            .unwrap_or_else(|| now + FAR_FUTURE)
    }

    /// Whether a request without a valid token rides through failed fetches at all: not with
    /// a bound of zero, and not without a cool-down, which leaves no attempt at its end to
    /// wait for: a waiter would start a fetch after each failure, as fast as the endpoint
    /// fails, until its bound.
    fn rides(&self) -> bool {
        !self.config.max_token_wait.is_zero() && !self.config.fetch_cooldown.is_zero()
    }

    /// Whether refusing `entry` is part of a storm that new tokens do not calm: it was itself
    /// fetched after a refusal, not long ago, and the server has accepted it for no request
    /// yet. Counts and logs the refusal if so.
    fn in_storm(&self, entry: &Entry, now: Instant) -> bool {
        let on_probation = entry.on_probation.load(Ordering::Relaxed);
        // Not `issued_at + storm_window`: the clock cannot add a window of `Duration::MAX`.
        let window_over =
            now.saturating_duration_since(entry.issued_at) >= self.config.storm_window;
        if !on_probation || window_over {
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
    fn accept(&self, id: u64) {
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
            token_waits: self.counters.waits.load(Ordering::Relaxed),
            token_waits_given_up: self.counters.waits_given_up.load(Ordering::Relaxed),
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
                // Without a runtime there is no refresh; requests go on with the cached token.
                let _ = self.start(&mut flight, None);
            }
        }
    }

    fn start(
        self: &Arc<Self>,
        flight: &mut Flight,
        rejected: Option<AccessToken>,
    ) -> Result<Fetch, Refusal> {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Err(Refusal {
                error: Arc::new(FetchError::NoRuntime),
                retry_at: None,
            });
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
            // A panicking source is reported like any failed fetch, whether `fetch` itself
            // panics or its future does (hence the call inside the caught future); a hanging
            // one times out.
            let fetch = AssertUnwindSafe(async { cache.source.fetch(rejected.as_ref()).await })
                .catch_unwind();
            let started = Instant::now();
            let result = match tokio::time::timeout(cache.config.fetch_timeout, fetch).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(FetchError::Panicked.into()),
                Err(_) => Err(FetchError::TimedOut.into()),
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
        let fetch = FetchTask(handle).shared();
        flight.pending = Some((fetch.clone(), task));
        Ok(fetch)
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
                let cooldown = self.cooldown(in_a_row, &*error);
                let permanent = is_permanent(&*error);
                tracing::warn!(%error, in_a_row, permanent, cooldown_ms = cooldown.as_millis() as u64, "token fetch failed");
                // A cool-down the clock cannot add (`Duration::MAX`) would panic this task
                // before the failure is recorded, and its waiters would fetch again at once.
                let until = now.checked_add(cooldown).unwrap_or(now + FAR_FUTURE);
                flight.failure = Some(Failure {
                    error: Arc::clone(&error),
                    until,
                    in_a_row,
                    permanent,
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
        let refresh_from = token.expires_at().map(|expires_at| {
            let lifetime = expires_at.saturating_duration_since(now);
            let margin = self.config.refresh_margin.saturating_add(jitter);
            expires_at - margin.min(lifetime / 2)
        });
        let refresh_at = refresh_from.map_or(CLAIMED, |at| self.nanos(at));
        Entry {
            token,
            id,
            refresh_at: AtomicU64::new(refresh_at),
            // For a token that never expires `get` returns before it looks at this.
            refresh_from: refresh_from.unwrap_or(now),
            issued_at: now,
            on_probation: AtomicBool::new(after_rejection),
            storm_logged: AtomicBool::new(false),
        }
    }

    /// The cool-down after `in_a_row` failed fetches, the last with `error`: the configured
    /// one, doubled for each failure after the first, up to [`MAX_COOLDOWN`] (or the
    /// configured one, if longer); or the pause the token endpoint asked for, if longer.
    /// None with a configured cool-down of zero.
    fn cooldown(&self, in_a_row: u32, error: &(dyn StdError + 'static)) -> Duration {
        let first = self.config.fetch_cooldown;
        if first.is_zero() {
            return Duration::ZERO;
        }
        backoff::exponential(first, in_a_row, MAX_COOLDOWN.max(first)).max(asked_pause(error))
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
            sent: Sent {
                id: self.id,
                on_probation: self.on_probation.load(Ordering::Relaxed),
                retry: false,
            },
        }
    }
}

/// One service's handle on its cache's current token, for [`TokenCache::get_through`].
///
/// `call` has the service to itself (`&mut self`), so the service can keep the entry it last
/// used and, on each request, only check that it is still the current one: an atomic load and
/// a compare, where arc-swap's protected load takes and pays back a debt slot in a
/// thread-local list (about 100 instructions per request). A clone of the service keeps the
/// same entry. Between requests it keeps the last entry alive, an old token at most until its
/// service is used or dropped again.
#[derive(Clone)]
pub(crate) struct TokenView(arc_swap::Cache<CurrentOf, Option<Arc<Entry>>>);

impl TokenView {
    pub(crate) fn new(cache: &Arc<TokenCache>) -> Self {
        Self(arc_swap::Cache::new(CurrentOf(Arc::clone(cache))))
    }
}

impl fmt::Debug for TokenView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The token is the cache's to show (redacted), not every service's.
        f.debug_struct("TokenView").finish_non_exhaustive()
    }
}

/// The cache's current-token slot, as [`arc_swap::Cache`] reaches it.
#[derive(Clone)]
pub(crate) struct CurrentOf(Arc<TokenCache>);

impl std::ops::Deref for CurrentOf {
    type Target = ArcSwapOption<Entry>;

    fn deref(&self) -> &Self::Target {
        &self.0.current
    }
}

/// Waits for a token.
pub(crate) struct TokenWait(Wait);

enum Wait {
    /// For the fetch under way alone: its error is the answer (a bound of zero).
    Join(Fetch),
    /// For the fetch under way, if any, and through failed fetches for the attempts after.
    Ride(Box<Ride>),
}

/// How a [`TokenWait`] rides through failed fetches, up to its bound.
struct Ride {
    cache: Arc<TokenCache>,
    /// The fetch waited for; `None` while a cool-down runs, or before the first look at one.
    fetch: Option<Fetch>,
    /// The cache's failure count when the fetch was joined: if the fetch ends in an error
    /// without the count growing, it was cancelled (its runtime shut down), not failed, and
    /// no attempt follows it to wait for.
    failures_seen: u64,
    /// Set once the request met a failure and waits on.
    waiting: Option<Waiting>,
}

struct Waiting {
    /// When the request gives up.
    deadline: Instant,
    /// The last error met: the answer if the request gives up.
    error: SharedError,
    /// Fires at the end of the cool-down, or, while a fetch runs, at the deadline.
    timer: Pin<Box<Sleep>>,
}

impl Future for TokenWait {
    type Output = Result<Credential, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.0 {
            Wait::Join(fetch) => Pin::new(fetch)
                .poll(cx)
                .map(|result| result.map(|entry| entry.credential()).map_err(Error::token)),
            Wait::Ride(ride) => ride.poll(cx),
        }
    }
}

impl Ride {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<Credential, Error>> {
        loop {
            let failed = match &mut self.fetch {
                Some(fetch) => match Pin::new(fetch).poll(cx) {
                    Poll::Ready(Ok(entry)) => return Poll::Ready(Ok(entry.credential())),
                    Poll::Ready(Err(error)) => Some(error),
                    Poll::Pending => {
                        // Until the request met a failure there is no timer: the fetch alone
                        // decides, within the fetch timeout.
                        ready!(self.poll_timer(cx));
                        return Poll::Ready(Err(self.give_up()));
                    }
                },
                None => {
                    // Without a timer, it arrived during a cool-down and looks at it first.
                    if self.waiting.is_some() {
                        ready!(self.poll_timer(cx));
                    }
                    None
                }
            };
            if let Some(credential) = self.next(failed)? {
                return Poll::Ready(Ok(credential));
            }
        }
    }

    /// Polls the timer; a request that has not met a failure yet has none, and waits for its
    /// fetch alone.
    fn poll_timer(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match &mut self.waiting {
            Some(waiting) => waiting.timer.as_mut().poll(cx),
            None => Poll::Pending,
        }
    }

    /// Takes the next step after the fetch waited for failed with `failed`, or, with `None`,
    /// after the cool-down waited out ended: the token if there is one now, else joins a
    /// fetch or waits for the end of the cool-down (`Ok(None)`), else gives up.
    fn next(&mut self, failed: Option<SharedError>) -> Result<Option<Credential>, Error> {
        let cache = Arc::clone(&self.cache);
        let mut flight = cache.lock();
        let now = Instant::now();
        let failures = cache.counters.failures.load(Ordering::Relaxed);
        if let Some(error) = &failed {
            if failures == self.failures_seen {
                return Err(Error::token(Arc::clone(error)));
            }
        }
        if let Some(entry) = cache.current.load_full().filter(|e| e.is_valid_at(now)) {
            return Ok(Some(entry.credential()));
        }
        let deadline = match &self.waiting {
            Some(waiting) if now >= waiting.deadline => return Err(self.give_up()),
            Some(waiting) => waiting.deadline,
            None => cache.wait_deadline(now),
        };
        let (wake_at, error) = match cache.attempt(&mut flight, now, None) {
            Ok(fetch) => {
                self.fetch = Some(fetch);
                self.failures_seen = failures;
                (deadline, failed)
            }
            Err(refusal) => match cache.ride_until(&refusal, deadline) {
                Some(at) => {
                    self.fetch = None;
                    (at, Some(refusal.error))
                }
                // Waiting will not fix the error, or the next attempt comes after the deadline.
                None => {
                    let gives_up = refusal.retry_at.is_some();
                    return Err(match &mut self.waiting {
                        Some(waiting) if gives_up => {
                            waiting.error = refusal.error;
                            self.give_up()
                        }
                        _ => Error::token(refusal.error),
                    });
                }
            },
        };
        drop(flight);
        match (&mut self.waiting, error) {
            (Some(waiting), error) => {
                waiting.timer.as_mut().reset(wake_at);
                if let Some(error) = error {
                    waiting.error = error;
                }
            }
            // Joined a fetch without having met a failure: the fetch's result decides.
            (None, None) => {}
            (None, Some(error)) => {
                // A timer needs the runtime; without one, no attempt can start anyway.
                if tokio::runtime::Handle::try_current().is_err() {
                    return Err(Error::token(error));
                }
                cache.counters.waits.fetch_add(1, Ordering::Relaxed);
                export::token_wait();
                self.waiting = Some(Waiting {
                    deadline,
                    error,
                    timer: Box::pin(tokio::time::sleep_until(wake_at)),
                });
            }
        }
        Ok(None)
    }

    /// The request waited up to its bound and got no token: the last error it met.
    fn give_up(&mut self) -> Error {
        let waiting = self
            .waiting
            .as_ref()
            .expect("only a waiting request gives up");
        (self.cache.counters.waits_given_up).fetch_add(1, Ordering::Relaxed);
        export::token_wait_given_up();
        Error::token(Arc::clone(&waiting.error))
    }
}

/// The fetch task.
struct FetchTask(JoinHandle<FetchResult>);

impl Future for FetchTask {
    type Output = FetchResult;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|joined| joined.unwrap_or_else(|_| Err(Arc::new(FetchError::Cancelled))))
    }
}

/// How long the token endpoint asked the client to wait before it fetches again: the
/// `Retry-After` of a [`TokenError`](crate::TokenError) in `error`'s chain, at most
/// [`MAX_ASKED_PAUSE`] (a value from the network: a hostile or broken server must not stop
/// the fetches for a day); zero if there is none. `ClientCredentials` itself waits out a
/// short `Retry-After` between its attempts, and ends the fetch on a long one: this keeps
/// the next fetch from coming sooner than that.
fn asked_pause(error: &(dyn StdError + 'static)) -> Duration {
    #[cfg(feature = "oauth2")]
    {
        let asked = causes(error)
            .find_map(|error| error.downcast_ref::<crate::TokenError>()?.retry_after());
        if let Some(asked) = asked {
            return asked.min(MAX_ASKED_PAUSE);
        }
    }
    let _ = error;
    Duration::ZERO
}

/// Whether waiting will not fix a fetch's `error`: a [`PermanentError`] anywhere in its
/// chain, or a [`TokenError`](crate::TokenError) that says the token endpoint refused the
/// client or its certificate is not trusted.
fn is_permanent(error: &(dyn StdError + 'static)) -> bool {
    causes(error).any(|error| {
        #[cfg(feature = "oauth2")]
        if let Some(error) = error.downcast_ref::<crate::TokenError>() {
            return error.is_permanent();
        }
        error.is::<PermanentError>()
    })
}

/// `error` and its sources, the first 32: a hostile `source` could make the chain endless.
fn causes<'a>(
    error: &'a (dyn StdError + 'static),
) -> impl Iterator<Item = &'a (dyn StdError + 'static)> {
    std::iter::successors(Some(error), |&error| error.source()).take(32)
}

// The cache's behaviour, driven through the layer as a client meets it.
#[cfg(test)]
mod tests {
    use crate::{
        AccessToken, BlazeAuth, BlazeAuthLayer, Error, FetchError,
        layer::{DEFAULT_FETCH_COOLDOWN, DEFAULT_STORM_WINDOW},
        test_helpers::{TestSource, fail_fast, get, inner, reject_first_token, sent_token},
    };
    use http::{Request, Response, StatusCode};
    use std::{
        convert::Infallible,
        error::Error as _,
        io::Write,
        sync::{
            Arc, Mutex,
            atomic::{AtomicBool, AtomicUsize, Ordering},
        },
        time::Duration,
    };
    use tokio::sync::Barrier;
    use tokio_test::assert_pending;
    use tower::{Layer, Service, ServiceExt, service_fn};

    #[tokio::test(start_paused = true)]
    async fn thousand_requests_at_expiry_cause_exactly_one_fetch() {
        let source = TestSource::expiring(Duration::from_secs(3600));
        let (service, calls) = inner::<String, _>(|_| StatusCode::OK);
        let client = BlazeAuth::new(service, source.clone(), "S");
        client.clone().oneshot(get()).await.unwrap();
        assert_eq!(source.fetches(), 1);

        tokio::time::advance(Duration::from_secs(3600)).await;
        let tasks: Vec<_> = (0..1000)
            .map(|_| tokio::spawn(client.clone().oneshot(get())))
            .collect();
        for task in tasks {
            let response = task.await.unwrap().unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(response.body(), "token-2");
        }
        assert_eq!(source.fetches(), 2);
        assert_eq!(calls.load(Ordering::SeqCst), 1001);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn thousand_threaded_requests_share_one_fetch() {
        let source = TestSource::gated();
        let (service, _) = inner::<String, _>(|_| StatusCode::OK);
        let client = BlazeAuth::new(service, source.clone(), "S");
        let waiting = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..1000)
            .map(|_| {
                let mut client = client.clone();
                let waiting = Arc::clone(&waiting);
                tokio::spawn(async move {
                    // `call` joins (or starts) the fetch before it returns.
                    let future = client.ready().await.unwrap().call(get());
                    waiting.fetch_add(1, Ordering::SeqCst);
                    future.await
                })
            })
            .collect();
        while waiting.load(Ordering::SeqCst) < 1000 {
            tokio::task::yield_now().await;
        }
        source.open();
        for task in tasks {
            assert_eq!(task.await.unwrap().unwrap().body(), "token-1");
        }
        assert_eq!(source.fetches(), 1);
    }

    #[tokio::test]
    async fn hundred_concurrent_401s_on_one_token_cause_one_refresh() {
        let source = TestSource::new();
        let barrier = Arc::new(Barrier::new(100));
        let calls = Arc::new(AtomicUsize::new(0));
        let (barrier_in, calls_in) = (Arc::clone(&barrier), Arc::clone(&calls));
        // Every first call waits until all 100 were sent with token-1: then all get 401.
        let service = service_fn(move |request: Request<String>| {
            let barrier = Arc::clone(&barrier_in);
            calls_in.fetch_add(1, Ordering::SeqCst);
            async move {
                let token = sent_token(&request);
                // The bound turns a broken single flight into a failure, not a hang.
                if token == "token-1"
                    && tokio::time::timeout(Duration::from_secs(10), barrier.wait())
                        .await
                        .is_err()
                {
                    return Ok(Response::new("barrier timed out".to_owned()));
                }
                let mut response = Response::new(token.clone());
                *response.status_mut() = reject_first_token(&token);
                Ok::<_, Infallible>(response)
            }
        });
        let client = BlazeAuth::new(service, source.clone(), "S");
        let tasks: Vec<_> = (0..100)
            .map(|_| tokio::spawn(client.clone().oneshot(get())))
            .collect();
        for task in tasks {
            let response = task.await.unwrap().unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(response.body(), "token-2");
        }
        assert_eq!(source.fetches(), 2);
        assert_eq!(source.rejected(), ["token-1"]);
        assert_eq!(calls.load(Ordering::SeqCst), 200);
    }

    #[tokio::test]
    async fn a_401_on_an_already_replaced_token_does_not_refresh_again() {
        let source = TestSource::new();
        let (service, _) = inner::<String, _>(reject_first_token);
        let mut client = BlazeAuth::new(service, source.clone(), "S");
        // Sent with token-1; its 401 arrives only after another request replaced token-1.
        let late = client.ready().await.unwrap().call(get());
        let first = client.clone().oneshot(get()).await.unwrap();
        assert_eq!(first.body(), "token-2");
        let late = late.await.unwrap();
        assert_eq!(late.status(), StatusCode::OK);
        assert_eq!(late.body(), "token-2");
        assert_eq!(source.fetches(), 2);
    }

    #[tokio::test]
    async fn a_dropped_caller_does_not_cancel_the_fetch_for_others() {
        let source = TestSource::gated();
        let (service, _) = inner::<String, _>(|_| StatusCode::OK);
        let mut client = BlazeAuth::new(service, source.clone(), "S");
        let mut starter = tokio_test::task::spawn(client.ready().await.unwrap().call(get()));
        assert_pending!(starter.poll());
        let other = tokio::spawn(client.clone().oneshot(get()));
        drop(starter);
        source.open();
        assert_eq!(other.await.unwrap().unwrap().body(), "token-1");

        // With every caller gone, the fetch still completes and fills the cache.
        let source = TestSource::gated();
        let (service, _) = inner::<String, _>(|_| StatusCode::OK);
        let mut client = BlazeAuth::new(service, source.clone(), "S");
        let mut only = tokio_test::task::spawn(client.ready().await.unwrap().call(get()));
        assert_pending!(only.poll());
        drop(only);
        source.open();
        while source.fetches() == 0 {
            tokio::task::yield_now().await;
        }
        tokio::task::yield_now().await;
        let response = client.oneshot(get()).await.unwrap();
        assert_eq!(response.body(), "token-1");
        assert_eq!(source.fetches(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_fetch_fails_every_waiter_and_the_next_request_tries_again() {
        let source = TestSource::gated();
        source.set_failing(true);
        let (service, calls) = inner::<String, _>(|_| StatusCode::OK);
        let client = fail_fast(source.clone(), service);
        let mut waiters: Vec<_> = (0..10)
            .map(|_| tokio_test::task::spawn(client.clone().oneshot(get())))
            .collect();
        for waiter in &mut waiters {
            assert_pending!(waiter.poll());
        }
        source.open();
        for waiter in waiters {
            let error = waiter.await.unwrap_err();
            assert!(error.is_token(), "{error:?}");
            assert_eq!(error.source().unwrap().to_string(), "fetch 1 failed");
        }
        assert_eq!(
            calls.load(Ordering::SeqCst),
            0,
            "no request is sent without a token"
        );
        assert_eq!(source.fetches(), 1);

        // After the cool-down (1 s by default), the next request fetches again.
        source.set_failing(false);
        tokio::time::advance(DEFAULT_FETCH_COOLDOWN).await;
        let response = client.oneshot(get()).await.unwrap();
        assert_eq!(response.body(), "token-2");
        assert_eq!(source.fetches(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn during_the_cool_down_requests_fail_fast_without_fetching() {
        let source = TestSource::new();
        source.set_failing(true);
        let (service, calls) = inner::<String, _>(|_| StatusCode::OK);
        let client = fail_fast(source.clone(), service);
        let mut fetches_seen = Vec::new();
        // Cool-downs of 1, 2, 4, 8, 16, 30, 30 s: a fetch at each of their ends, no other.
        for cooldown in [1, 2, 4, 8, 16, 30, 30] {
            for _ in 0..100 {
                let error = client.clone().oneshot(get()).await.unwrap_err();
                assert!(error.is_token());
            }
            fetches_seen.push(source.fetches());
            tokio::time::advance(Duration::from_secs(cooldown) - Duration::from_millis(1)).await;
            assert!(client.clone().oneshot(get()).await.is_err());
            assert_eq!(source.fetches(), *fetches_seen.last().unwrap());
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        assert_eq!(fetches_seen, [1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        source.set_failing(false);
        assert_eq!(client.oneshot(get()).await.unwrap().body(), "token-8");
    }

    #[tokio::test(start_paused = true)]
    async fn a_401_whose_refresh_fails_ends_in_the_token_error_not_the_401() {
        let source = TestSource::new();
        let down = source.clone();
        // Every token is refused, and the token endpoint goes down with the first refusal.
        let (service, calls) = inner::<String, _>(move |_| {
            down.set_failing(true);
            StatusCode::UNAUTHORIZED
        });
        for client in [
            fail_fast(source.clone(), service.clone()),
            // With the default bound the request rides the failures through first.
            BlazeAuth::new(service, source.clone(), "S"),
        ] {
            source.set_failing(false);
            calls.store(0, Ordering::SeqCst);
            let error = client.oneshot(get()).await.unwrap_err();
            assert!(error.is_token(), "{error}");
            assert_eq!(calls.load(Ordering::SeqCst), 1, "the 401 was not retried");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_refresh_ahead_of_expiry_keeps_the_cached_token() {
        let source = TestSource::expiring(Duration::from_secs(3600));
        let (service, calls) = inner::<String, _>(|_| StatusCode::OK);
        let client = BlazeAuth::new(service, source.clone(), "S");
        client.clone().oneshot(get()).await.unwrap();
        source.set_failing(true);
        tokio::time::advance(Duration::from_secs(3600 - 30)).await;
        // In the margin: every request is served with token-1, one refresh is tried per
        // cool-down, and none waits for it.
        for _ in 0..5 {
            for _ in 0..20 {
                assert_eq!(
                    client.clone().oneshot(get()).await.unwrap().body(),
                    "token-1"
                );
                tokio::task::yield_now().await;
            }
            tokio::time::advance(Duration::from_millis(900)).await;
        }
        assert_eq!(
            source.fetches(),
            3,
            "tried at 0 s, after 1 s and after 2 s more"
        );
        source.set_failing(false);
        tokio::time::advance(Duration::from_secs(4)).await;
        client.clone().oneshot(get()).await.unwrap();
        tokio::task::yield_now().await;
        assert_eq!(client.oneshot(get()).await.unwrap().body(), "token-4");
        assert_eq!(calls.load(Ordering::SeqCst), 103);
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_source_is_an_error_not_a_stuck_cache() {
        let panicked = Arc::new(AtomicBool::new(false));
        let once = Arc::clone(&panicked);
        let source = crate::token_fn(move |_| {
            let first = !once.swap(true, Ordering::SeqCst);
            async move {
                assert!(!first, "source bug");
                AccessToken::bearer("ok")
            }
        });
        let (service, _) = inner::<String, _>(|_| StatusCode::OK);
        let client = fail_fast(source, service);
        let error = client.clone().oneshot(get()).await.unwrap_err();
        assert!(error.is_token() && !error.is_timeout());
        assert_eq!(cause(&error), Some(&FetchError::Panicked));
        tokio::time::advance(DEFAULT_FETCH_COOLDOWN).await;
        assert_eq!(client.oneshot(get()).await.unwrap().body(), "ok");
    }

    #[tokio::test(start_paused = true)]
    async fn a_source_that_panics_before_its_future_is_ridden_through_like_any_failure() {
        let panicked = Arc::new(AtomicBool::new(false));
        let once = Arc::clone(&panicked);
        // The closure itself panics, in `TokenSource::fetch`, not in the future it returns.
        let source = crate::token_fn(move |_| {
            assert!(once.swap(true, Ordering::SeqCst), "source bug");
            async { AccessToken::bearer("ok") }
        });
        let (service, _) = inner::<String, _>(|_| StatusCode::OK);
        let client = BlazeAuth::new(service, source, "S");
        let started = tokio::time::Instant::now();
        let response = client.clone().oneshot(get()).await.unwrap();
        assert_eq!(response.body(), "ok");
        assert_eq!(
            started.elapsed(),
            DEFAULT_FETCH_COOLDOWN,
            "the attempt after the cool-down"
        );
        let metrics = client.metrics();
        assert_eq!((metrics.token_fetches, metrics.fetch_failures), (2, 1));
        assert_eq!(metrics.token_waits, 1);
    }

    #[test]
    fn a_request_outside_a_tokio_runtime_fails_with_a_typed_cause() {
        let (service, calls) = inner::<String, _>(|_| StatusCode::OK);
        let client = BlazeAuth::new(service, TestSource::new(), "S");
        let error = futures_util::FutureExt::now_or_never(client.oneshot(get()))
            .expect("fails at once")
            .unwrap_err();
        assert!(error.is_token());
        assert_eq!(cause(&error), Some(&FetchError::NoRuntime));
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_fetch_whose_runtime_shut_down_fails_its_waiters_with_a_typed_cause() {
        let source = TestSource::gated();
        let (service, _) = inner::<String, _>(|_| StatusCode::OK);
        let mut client = BlazeAuth::new(service, source, "S");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        // The fetch starts on `runtime`, and waits at the gate when the runtime goes.
        runtime.block_on(client.ready()).unwrap();
        let waiting = {
            let _runtime = runtime.enter();
            client.call(get())
        };
        drop(runtime);
        let error = futures_util::FutureExt::now_or_never(waiting)
            .expect("the cancelled fetch is ready")
            .unwrap_err();
        assert!(error.is_token());
        assert_eq!(cause(&error), Some(&FetchError::Cancelled));
    }

    #[tokio::test(start_paused = true)]
    async fn token_is_refreshed_ahead_of_expiry_without_making_requests_wait() {
        let source = TestSource::expiring(Duration::from_secs(3600));
        let (service, _) = inner::<String, _>(|_| StatusCode::OK);
        let client = BlazeAuth::new(service, source.clone(), "S");
        let body = |client: &BlazeAuth<_>| {
            let client = client.clone();
            async move { client.oneshot(get()).await.unwrap().into_body() }
        };
        assert_eq!(body(&client).await, "token-1");
        tokio::time::advance(Duration::from_secs(3600 - 61)).await;
        assert_eq!(body(&client).await, "token-1");
        assert_eq!(source.fetches(), 1, "before the margin, no refresh");

        tokio::time::advance(Duration::from_secs(2)).await;
        // Inside the margin: the cached token is still used, a fetch starts behind it.
        assert_eq!(body(&client).await, "token-1");
        tokio::task::yield_now().await;
        assert_eq!(source.fetches(), 2);
        assert_eq!(body(&client).await, "token-2");
    }

    #[tokio::test(start_paused = true)]
    async fn margin_of_zero_refreshes_at_expiry_and_not_before() {
        let source = TestSource::expiring(Duration::from_secs(10));
        let (service, _) = inner::<String, _>(|_| StatusCode::OK);
        let layer = BlazeAuthLayer::builder(source.clone())
            .study("S")
            .refresh_margin(Duration::ZERO)
            .build()
            .unwrap();
        let client = layer.layer(service);
        client.clone().oneshot(get()).await.unwrap();
        tokio::time::advance(Duration::from_millis(9_999)).await;
        assert_eq!(
            client.clone().oneshot(get()).await.unwrap().body(),
            "token-1"
        );
        tokio::task::yield_now().await;
        assert_eq!(source.fetches(), 1);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(client.oneshot(get()).await.unwrap().body(), "token-2");
    }

    #[tokio::test(start_paused = true)]
    async fn margin_is_capped_at_half_the_lifetime() {
        // A 5 s token with the default 60 s margin is refreshed after 2.5 s, not at once.
        let source = TestSource::expiring(Duration::from_secs(5));
        let (service, _) = inner::<String, _>(|_| StatusCode::OK);
        let client = BlazeAuth::new(service, source.clone(), "S");
        for _ in 0..10 {
            client.clone().oneshot(get()).await.unwrap();
            tokio::time::advance(Duration::from_millis(200)).await;
        }
        assert_eq!(source.fetches(), 1);
        tokio::time::advance(Duration::from_millis(600)).await;
        client.clone().oneshot(get()).await.unwrap();
        tokio::task::yield_now().await;
        assert_eq!(source.fetches(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn ten_thousand_401s_cause_a_handful_of_fetches() {
        // A 401 no token can fix (Blaze says 401 to a wrong x-partnerid too).
        let source = TestSource::new();
        let (service, calls) = inner::<String, _>(|_| StatusCode::UNAUTHORIZED);
        let client = BlazeAuth::new(service, source.clone(), "S");
        let first = client.clone().oneshot(get()).await.unwrap();
        assert_eq!(first.status(), StatusCode::UNAUTHORIZED);
        let tasks: Vec<_> = (0..10_000)
            .map(|_| tokio::spawn(client.clone().oneshot(get())))
            .collect();
        for task in tasks {
            assert_eq!(
                task.await.unwrap().unwrap().status(),
                StatusCode::UNAUTHORIZED
            );
        }
        assert_eq!(source.fetches(), 2, "the first token and one refresh");
        assert_eq!(
            calls.load(Ordering::SeqCst),
            10_002,
            "one retry, for the first request"
        );
        let metrics = client.metrics();
        assert_eq!((metrics.token_fetches, metrics.retries), (2, 1));
        assert_eq!(metrics.refreshes_skipped, 10_000);

        // After the window, a 401 may be fixable again: one more refresh and retry.
        tokio::time::advance(DEFAULT_STORM_WINDOW).await;
        client.clone().oneshot(get()).await.unwrap();
        client.oneshot(get()).await.unwrap();
        assert_eq!(source.fetches(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_storm_window_too_long_for_the_clock_guards_without_panicking() {
        let layer = BlazeAuthLayer::builder(TestSource::new())
            .study("S")
            .storm_window(Duration::MAX)
            .build()
            .unwrap();
        let (service, calls) = inner::<String, _>(|_| StatusCode::UNAUTHORIZED);
        let client = layer.layer(service);
        for _ in 0..3 {
            let response = client.clone().oneshot(get()).await.unwrap();
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 4, "one retry, then the guard");
        let metrics = client.metrics();
        assert_eq!((metrics.token_fetches, metrics.refreshes_skipped), (2, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_that_worked_is_refreshed_when_it_is_revoked_too() {
        // Revocations in quick succession are not a storm: each new token was accepted
        // before the server revoked it.
        let valid = Arc::new(AtomicUsize::new(1));
        let current = Arc::clone(&valid);
        let (service, _) = inner::<String, _>(move |token| {
            if token == format!("token-{}", current.load(Ordering::SeqCst)) {
                StatusCode::OK
            } else {
                StatusCode::UNAUTHORIZED
            }
        });
        let source = TestSource::new();
        let client = BlazeAuth::new(service, source.clone(), "S");
        for generation in 1..=5 {
            valid.store(generation, Ordering::SeqCst);
            let response = client.clone().oneshot(get()).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK, "generation {generation}");
        }
        assert_eq!(source.fetches(), 5);
        assert_eq!(client.metrics().refreshes_skipped, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_storm_window_of_zero_refreshes_on_every_first_401() {
        let layer = BlazeAuthLayer::builder(TestSource::new())
            .study("S")
            .storm_window(Duration::ZERO)
            .build()
            .unwrap();
        let (service, calls) = inner::<String, _>(|_| StatusCode::UNAUTHORIZED);
        let client = layer.layer(service);
        for _ in 0..3 {
            client.clone().oneshot(get()).await.unwrap();
        }
        assert_eq!(calls.load(Ordering::SeqCst), 6);
        assert_eq!(client.metrics().token_fetches, 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_source_fails_its_waiters_at_the_fetch_timeout() {
        let source = crate::token_fn(|_| std::future::pending::<Result<AccessToken, Error>>());
        let layer = BlazeAuthLayer::builder(source)
            .study("S")
            .fetch_timeout(Duration::from_secs(5))
            .max_token_wait(Duration::ZERO)
            .build()
            .unwrap();
        let (service, calls) = inner::<String, _>(|_| StatusCode::OK);
        let client = layer.layer(service);
        let started = tokio::time::Instant::now();
        let waiters: Vec<_> = (0..3)
            .map(|_| tokio::spawn(client.clone().oneshot(get())))
            .collect();
        for waiter in waiters {
            let error = waiter.await.unwrap().unwrap_err();
            assert!(error.is_token() && error.is_timeout(), "{error:?}");
            assert_eq!(cause(&error), Some(&FetchError::TimedOut));
            assert_eq!(error.source().unwrap().to_string(), "token fetch timed out");
        }
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            0,
            "fail closed: nothing sent without a token"
        );
        assert_eq!(client.metrics().fetch_failures, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn refresh_jitter_adds_to_the_margin_within_its_bound() {
        for _ in 0..20 {
            let source = TestSource::expiring(Duration::from_secs(3600));
            let layer = BlazeAuthLayer::builder(source.clone())
                .study("S")
                .refresh_jitter(Duration::from_secs(10))
                .build()
                .unwrap();
            let (service, _) = inner::<String, _>(|_| StatusCode::OK);
            let client = layer.layer(service);
            client.clone().oneshot(get()).await.unwrap();
            tokio::time::advance(Duration::from_secs(3600 - 70) - Duration::from_millis(1)).await;
            client.clone().oneshot(get()).await.unwrap();
            tokio::task::yield_now().await;
            assert_eq!(source.fetches(), 1, "not before margin + jitter");
            tokio::time::advance(Duration::from_secs(10)).await;
            client.clone().oneshot(get()).await.unwrap();
            tokio::task::yield_now().await;
            assert_eq!(source.fetches(), 2, "by the margin at the latest");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn metrics_report_the_token_age_and_lifetime() {
        let source = TestSource::expiring(Duration::from_secs(3600));
        let (service, _) = inner::<String, _>(reject_first_token);
        let client = BlazeAuth::new(service, source, "S");
        assert_eq!(client.metrics(), crate::Metrics::default());
        client.clone().oneshot(get()).await.unwrap();
        tokio::time::advance(Duration::from_secs(10)).await;
        let metrics = client.metrics();
        assert_eq!(
            (
                metrics.token_fetches,
                metrics.retries,
                metrics.fetch_failures
            ),
            (2, 1, 0)
        );
        assert_eq!(metrics.token_age, Some(Duration::from_secs(10)));
        assert_eq!(metrics.token_lifetime, Some(Duration::from_secs(3600)));
    }

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
        for _ in 0..10 {
            let response = client.clone().oneshot(get()).await.unwrap();
            assert_eq!(response.body(), "token-1");
        }
        assert_eq!(source.fetches(), 1, "not a fetch per request");
        assert_eq!(calls.load(Ordering::SeqCst), 10);

        // After the cool-down (1 s by default), one more fetch for the next 10.
        tokio::time::advance(DEFAULT_FETCH_COOLDOWN).await;
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

    /// The cache's own cause of a fetch failure, if it is one.
    fn cause(error: &Error) -> Option<&FetchError> {
        error.source()?.downcast_ref()
    }
}
