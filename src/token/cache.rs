//! The token cache every request goes through.
//!
//! Reads are lock-free: the current token sits in an [`ArcSwapOption`], and a request with a
//! valid token loads it, clones its header value and goes. Only a request that finds no valid
//! token takes the mutex, and only to join the fetch under way or start one. The fetch runs in
//! a task of its own, so a caller that gives up does not cancel it for the others; every waiter
//! gets its result, success or error.
//!
//! A token is refreshed ahead of its expiry: from `refresh_at` (the expiry less the refresh
//! margin) the first request starts a background fetch while all requests keep using the
//! cached token until it expires, so no request waits for a routine refresh.

use crate::{
    error::{BoxError, Error},
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
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};
use tokio::{
    task::{AbortHandle, JoinHandle},
    time::Instant,
};

/// The cached token of one layer (and of every service and clone made from it).
pub(crate) struct TokenCache {
    source: Box<dyn TokenSource>,
    current: ArcSwapOption<Entry>,
    flight: Mutex<Flight>,
    refresh_margin: Duration,
}

#[derive(Default)]
struct Flight {
    /// The fetch under way and a handle telling whether its task is still alive.
    pending: Option<(TokenWait, AbortHandle)>,
    next_id: u64,
}

/// A token in the cache.
pub(crate) struct Entry {
    token: AccessToken,
    /// Tells this entry apart from every other of its cache: a 401 names the entry it hit.
    id: u64,
    refresh_at: Option<Instant>,
    /// Set once a request has started the refresh ahead of expiry, so no other starts one.
    refreshing: AtomicBool,
}

/// The token one request is sent with.
pub(crate) struct Credential {
    pub(crate) header: HeaderValue,
    pub(crate) id: u64,
}

pub(crate) enum Lookup {
    Ready(Credential),
    Wait(TokenWait),
}

type SharedError = Arc<dyn StdError + Send + Sync>;
type FetchResult = Result<Arc<Entry>, SharedError>;

impl TokenCache {
    pub(crate) fn new(source: Box<dyn TokenSource>, refresh_margin: Duration) -> Self {
        Self {
            source,
            current: ArcSwapOption::empty(),
            flight: Mutex::default(),
            refresh_margin,
        }
    }

    /// The token for a new request: the cached one if it is valid, else a wait for the fetch
    /// that replaces it.
    pub(crate) fn get(self: &Arc<Self>) -> Lookup {
        if let Some(entry) = &*self.current.load() {
            if entry.token.expires_at().is_none() {
                return Lookup::Ready(entry.credential());
            }
            let now = Instant::now();
            if entry.is_valid_at(now) {
                if entry.wants_refresh_at(now) {
                    self.refresh_ahead(entry);
                }
                return Lookup::Ready(entry.credential());
            }
        }
        self.renew(None)
    }

    /// The token to retry with after the server rejected the one with id `rejected`.
    ///
    /// Only the first rejection of the cached token fetches a new one; a request that was
    /// sent with an older token gets the current one, or joins the fetch under way.
    pub(crate) fn reject(self: &Arc<Self>, rejected: u64) -> Lookup {
        self.renew(Some(rejected))
    }

    fn renew(self: &Arc<Self>, rejected: Option<u64>) -> Lookup {
        let mut flight = self.lock();
        let mut rejected_token = None;
        if let Some(entry) = self.current.load_full() {
            if Some(entry.id) == rejected {
                self.current.store(None);
                rejected_token = Some(entry.token.clone());
            } else if entry.is_valid_at(Instant::now()) {
                return Lookup::Ready(entry.credential());
            }
        }
        match &flight.pending {
            // A fetch task that ended without clearing `pending` was cancelled (its runtime
            // shut down): start another rather than hand out its error forever.
            Some((wait, task)) if !task.is_finished() => Lookup::Wait(wait.clone()),
            _ => Lookup::Wait(self.start(&mut flight, rejected_token)),
        }
    }

    fn refresh_ahead(self: &Arc<Self>, entry: &Entry) {
        if entry.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut flight = self.lock();
        if flight.pending.is_none() {
            self.start(&mut flight, None);
        }
    }

    fn start(self: &Arc<Self>, flight: &mut Flight, rejected: Option<AccessToken>) -> TokenWait {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return TokenWait::failed("no Tokio runtime to fetch the token on");
        };
        let cache = Arc::clone(self);
        let handle = runtime.spawn(async move {
            // A panicking source is reported like any failed fetch.
            let fetch = AssertUnwindSafe(cache.source.fetch(rejected.as_ref())).catch_unwind();
            let result = fetch
                .await
                .unwrap_or_else(|_| Err("token source panicked".into()));
            cache.finish(result)
        });
        let task = handle.abort_handle();
        let wait = TokenWait(FetchTask(Ok(handle)).shared());
        flight.pending = Some((wait.clone(), task));
        wait
    }

    fn finish(&self, result: Result<AccessToken, BoxError>) -> FetchResult {
        let mut flight = self.lock();
        flight.pending = None;
        match result {
            Ok(token) => {
                flight.next_id += 1;
                let entry = Arc::new(Entry::new(
                    token,
                    flight.next_id,
                    self.refresh_margin,
                    Instant::now(),
                ));
                self.current.store(Some(Arc::clone(&entry)));
                Ok(entry)
            }
            Err(error) => {
                // Let the next request try again.
                if let Some(entry) = &*self.current.load() {
                    entry.refreshing.store(false, Ordering::Release);
                }
                Err(Arc::from(error))
            }
        }
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
            .field("refresh_margin", &self.refresh_margin)
            .finish_non_exhaustive()
    }
}

impl Entry {
    fn new(token: AccessToken, id: u64, margin: Duration, now: Instant) -> Self {
        // The margin never takes more than half the token's lifetime: a token that lives
        // 5 s must not be refreshed on every request because the margin is 60 s.
        let refresh_at = token.expires_at().map(|expires_at| {
            let lifetime = expires_at.saturating_duration_since(now);
            expires_at - margin.min(lifetime / 2)
        });
        Self {
            token,
            id,
            refresh_at,
            refreshing: AtomicBool::new(false),
        }
    }

    fn is_valid_at(&self, now: Instant) -> bool {
        self.token
            .expires_at()
            .is_none_or(|expires_at| now < expires_at)
    }

    fn wants_refresh_at(&self, now: Instant) -> bool {
        self.refresh_at.is_some_and(|at| now >= at) && !self.refreshing.load(Ordering::Relaxed)
    }

    fn credential(&self) -> Credential {
        Credential {
            header: self.token.header().clone(),
            id: self.id,
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
