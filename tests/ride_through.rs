//! Riding through a failing token endpoint (`Builder::max_token_wait`): requests that meet a
//! failed fetch wait for the attempt the cool-down allows at its end, on tokio's paused clock,
//! through `ServiceBuilder` and the public API only.

use blaze_auth::{AccessToken, BlazeAuthLayer, BoxError, PermanentError, TokenFuture, TokenSource};
use http::{Request, Response, header::AUTHORIZATION};
use std::{
    convert::Infallible,
    error::Error as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};
use tokio::time::Instant;
use tokio_test::{assert_pending, assert_ready_err, task};
use tower::{ServiceBuilder, ServiceExt, util::BoxCloneSyncService};

/// The cool-down after a first failure, and the bound on waiting, when none is set.
const COOLDOWN: Duration = Duration::from_secs(1);

#[tokio::test(start_paused = true)]
async fn requests_during_a_cool_down_wait_and_succeed_when_the_next_attempt_does() {
    let source = Script::failing_first(1, Failure::Transient);
    let (layer, client) = stack(&source, None, None);
    // The first request meets the failure of the fetch it started.
    let mut first = task::spawn(client.clone().oneshot(get()));
    assert_pending!(first.poll());
    settle().await;
    assert_pending!(first.poll());
    assert_eq!(source.fetches(), 1);
    // The second arrives during the cool-down.
    let mut second = task::spawn(client.clone().oneshot(get()));
    assert_pending!(second.poll());

    tokio::time::advance(COOLDOWN - Duration::from_millis(1)).await;
    assert_pending!(first.poll());
    assert_pending!(second.poll());
    assert_eq!(source.fetches(), 1, "no fetch during the cool-down");

    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(first.await.unwrap().into_body(), "token-2");
    assert_eq!(second.await.unwrap().into_body(), "token-2");
    assert_eq!(source.fetches(), 2);
    let metrics = layer.metrics();
    assert_eq!((metrics.token_waits, metrics.token_waits_given_up), (2, 0));
    assert_eq!(metrics.fetch_failures, 1);
}

#[tokio::test(start_paused = true)]
async fn one_token_request_per_cool_down_however_many_wait() {
    // Fetches at 0 s and 1 s fail; the one at 1 + 2 s succeeds, within every request's bound.
    let source = Script::failing_first(2, Failure::Transient);
    let (layer, client) = stack(&source, None, None);
    let started = Instant::now();
    let mut requests = Vec::new();
    for _ in 0..300 {
        requests.push(tokio::spawn(client.clone().oneshot(get())));
        settle().await;
        tokio::time::advance(Duration::from_millis(10)).await;
    }
    for request in requests {
        assert_eq!(request.await.unwrap().unwrap().into_body(), "token-3");
    }
    let offsets: Vec<_> = source.started().iter().map(|at| *at - started).collect();
    assert_eq!(
        offsets,
        [Duration::ZERO, COOLDOWN, COOLDOWN * 3],
        "one attempt at the end of each cool-down"
    );
    let metrics = layer.metrics();
    assert_eq!(
        (metrics.token_waits, metrics.token_waits_given_up),
        (300, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_token_request_per_cool_down_for_64_tasks_on_two_threads() {
    let source = Script::failing_first(3, Failure::Transient);
    let (layer, client) = stack(&source, None, Some(Duration::from_millis(5)));
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                for _ in 0..20 {
                    let response = client.clone().oneshot(get()).await.unwrap();
                    assert_eq!(response.into_body(), "token-4");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(source.fetches(), 4, "three failures, one success");
    let metrics = layer.metrics();
    assert_eq!(metrics.token_waits_given_up, 0);
    assert!(
        (1..=64).contains(&metrics.token_waits),
        "only requests that met a failure wait: {metrics:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_permanent_error_fails_at_once_and_the_next_fetch_waits_for_the_cool_down() {
    let source = Script::failing_first(1, Failure::Permanent);
    let (layer, client) = stack(&source, None, None);
    let error = client.clone().oneshot(get()).await.unwrap_err();
    assert!(error.is_token(), "{error:?}");
    assert!(error.source().unwrap().is::<PermanentError>());
    // During the cool-down: the same error, on the first poll.
    let mut during = task::spawn(client.clone().oneshot(get()));
    let error = assert_ready_err!(during.poll());
    assert!(error.source().unwrap().is::<PermanentError>());
    assert_eq!(source.fetches(), 1);
    assert_eq!(layer.metrics().token_waits, 0);
    // Fetched again after the cool-down, in case it was fixed.
    tokio::time::advance(COOLDOWN).await;
    assert_eq!(client.oneshot(get()).await.unwrap().into_body(), "token-2");
}

#[tokio::test(start_paused = true)]
async fn a_bound_of_zero_fails_during_the_cool_down_as_before() {
    let source = Script::failing_first(1, Failure::Transient);
    let (layer, client) = stack(&source, Some(Duration::ZERO), None);
    let error = client.clone().oneshot(get()).await.unwrap_err();
    assert_eq!(error.source().unwrap().to_string(), "fetch 1 failed");
    let mut during = task::spawn(client.clone().oneshot(get()));
    let error = assert_ready_err!(during.poll());
    assert_eq!(error.source().unwrap().to_string(), "fetch 1 failed");
    assert_eq!(source.fetches(), 1);
    tokio::time::advance(COOLDOWN).await;
    assert_eq!(client.oneshot(get()).await.unwrap().into_body(), "token-2");
    let metrics = layer.metrics();
    assert_eq!((metrics.token_waits, metrics.token_waits_given_up), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn a_waiter_gives_up_at_its_bound_with_the_last_error() {
    // Attempts at 0, 1 and 3 s fail; the next would be at 7 s, after the 5 s bound.
    let source = Script::failing_first(usize::MAX, Failure::Transient);
    let (layer, client) = stack(&source, None, None);
    let error = client.clone().oneshot(get()).await.unwrap_err();
    assert!(error.is_token(), "{error:?}");
    assert_eq!(error.source().unwrap().to_string(), "fetch 3 failed");
    assert_eq!(source.fetches(), 3);
    let metrics = layer.metrics();
    assert_eq!((metrics.token_waits, metrics.token_waits_given_up), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn a_waiter_gives_up_at_its_bound_while_the_next_attempt_hangs() {
    // The fetch timeout (60 s) would end the hanging attempt much later.
    let source = Script::failing_first(1, Failure::Transient).then_hanging();
    let (layer, client) = stack(&source, None, None);
    let started = Instant::now();
    let error = client.clone().oneshot(get()).await.unwrap_err();
    assert_eq!(error.source().unwrap().to_string(), "fetch 1 failed");
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(5),
        "the default bound"
    );
    assert_eq!(source.fetches(), 2);
    assert_eq!(layer.metrics().token_waits_given_up, 1);
}

#[tokio::test(start_paused = true)]
async fn the_callers_cancellation_ends_its_wait_and_the_attempt_serves_the_others() {
    let source = Script::failing_first(1, Failure::Transient);
    let (_, client) = stack(&source, None, None);
    let mut dropped = task::spawn(client.clone().oneshot(get()));
    let mut other = task::spawn(client.clone().oneshot(get()));
    assert_pending!(dropped.poll());
    assert_pending!(other.poll());
    settle().await;
    assert_pending!(dropped.poll());
    // A timeout outside the layer, shorter than the cool-down, ends a wait.
    let timed_out =
        tokio::time::timeout(Duration::from_millis(100), client.clone().oneshot(get())).await;
    assert!(timed_out.is_err(), "the caller's timeout ends the wait");
    drop(dropped);
    tokio::time::advance(COOLDOWN).await;
    assert_eq!(other.await.unwrap().into_body(), "token-2");
    assert_eq!(source.fetches(), 2);
}

#[tokio::test]
async fn a_cool_down_of_zero_fails_at_once_instead_of_fetching_in_a_loop() {
    // Without a cool-down there is no attempt at its end to wait for: a waiter would start a
    // fetch after every failure, as fast as the endpoint fails, until its bound.
    let source = Script::failing_first(usize::MAX, Failure::Transient);
    let (layer, client) = stack(
        &source,
        Some(Duration::from_millis(300)),
        Some(Duration::ZERO),
    );
    let error = client.oneshot(get()).await.unwrap_err();
    assert_eq!(error.source().unwrap().to_string(), "fetch 1 failed");
    assert_eq!(
        source.fetches(),
        1,
        "one request, one fetch, as without waiting"
    );
    assert_eq!(layer.metrics().token_waits, 0);
}

#[tokio::test(start_paused = true)]
async fn a_bound_too_far_to_add_to_the_clock_waits_without_panicking() {
    // `Duration::MAX` reads as "wait as long as it takes"; the deadline is not representable.
    let source = Script::failing_first(2, Failure::Transient);
    let (layer, client) = stack(&source, Some(Duration::MAX), None);
    assert_eq!(client.oneshot(get()).await.unwrap().into_body(), "token-3");
    assert_eq!(source.fetches(), 3);
    let metrics = layer.metrics();
    assert_eq!((metrics.token_waits, metrics.token_waits_given_up), (1, 0));
}

#[tokio::test]
async fn a_cool_down_too_long_for_the_clock_holds_and_no_waiter_loops() {
    // The cool-down's end could not be added to the clock: the fetch task panicked before it
    // recorded the failure, and its waiters, seeing a failure but no cool-down, fetched again
    // at once, in a loop, until their bound.
    let source = Script::failing_first(usize::MAX, Failure::Transient);
    let (layer, client) = stack(
        &source,
        Some(Duration::from_millis(300)),
        Some(Duration::MAX),
    );
    let error = client.clone().oneshot(get()).await.unwrap_err();
    assert_eq!(error.source().unwrap().to_string(), "fetch 1 failed");
    let error = client.oneshot(get()).await.unwrap_err();
    assert_eq!(error.source().unwrap().to_string(), "fetch 1 failed");
    assert_eq!(source.fetches(), 1, "no fetch during the cool-down");
    assert_eq!(layer.metrics().fetch_failures, 1);
}

#[tokio::test(start_paused = true)]
async fn a_request_that_waits_for_its_token_and_again_for_its_retrys_counts_two_waits() {
    // Fetches 1 and 3 fail; the server refuses token-2, so the retry needs token-4.
    let fetches = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&fetches);
    let source = blaze_auth::token_fn(move |_| {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            if n % 2 == 1 {
                return Err(BoxError::from(format!("fetch {n} failed")));
            }
            AccessToken::bearer(&format!("token-{n}")).map_err(BoxError::from)
        }
    });
    let layer = BlazeAuthLayer::builder(source).study("S").build().unwrap();
    let service =
        ServiceBuilder::new()
            .layer(layer.clone())
            .service_fn(|request: Request<String>| {
                let refused = request.headers()[AUTHORIZATION] == "Bearer token-2";
                let mut response = Response::new(String::new());
                if refused {
                    *response.status_mut() = http::StatusCode::UNAUTHORIZED;
                }
                std::future::ready(Ok::<_, Infallible>(response))
            });
    let response = service.oneshot(get()).await.unwrap();
    assert_eq!(response.status(), http::StatusCode::OK);
    assert_eq!(fetches.load(Ordering::SeqCst), 4);
    let metrics = layer.metrics();
    assert_eq!((metrics.token_waits, metrics.token_waits_given_up), (2, 0));
}

#[tokio::test(start_paused = true)]
async fn a_hanging_source_fails_its_waiters_at_the_fetch_timeout_and_the_bound() {
    // The fetch times out at 60 s; the request rides to the attempt at 61 s, which hangs as
    // well, and gives up at its bound, 5 s after the timeout it met.
    let source = Script::failing_first(0, Failure::Transient).then_hanging();
    let (layer, client) = stack(&source, None, None);
    let started = Instant::now();
    let error = client.oneshot(get()).await.unwrap_err();
    assert!(error.is_timeout(), "{error:?}");
    assert_eq!(started.elapsed(), Duration::from_secs(65));
    assert_eq!(source.fetches(), 2);
    let metrics = layer.metrics();
    assert_eq!((metrics.token_waits, metrics.token_waits_given_up), (1, 1));
}

// Helpers.

type Client = BoxCloneSyncService<Request<String>, Response<String>, blaze_auth::Error>;

/// The layer over `source`, with the bound and the first cool-down given or the defaults,
/// and a client whose inner service answers with the token each request carried.
fn stack(
    source: &Script,
    max_token_wait: Option<Duration>,
    cooldown: Option<Duration>,
) -> (BlazeAuthLayer, Client) {
    let mut builder = BlazeAuthLayer::builder(source.clone()).study("S");
    if let Some(wait) = max_token_wait {
        builder = builder.max_token_wait(wait);
    }
    if let Some(cooldown) = cooldown {
        builder = builder.fetch_cooldown(cooldown);
    }
    let layer = builder.build().unwrap();
    let service =
        ServiceBuilder::new()
            .layer(layer.clone())
            .service_fn(|request: Request<String>| {
                let token = request.headers()[AUTHORIZATION].to_str().unwrap();
                let token = token.trim_start_matches("Bearer ").to_owned();
                std::future::ready(Ok::<_, Infallible>(Response::new(token)))
            });
    (layer, BoxCloneSyncService::new(service))
}

fn get() -> Request<String> {
    Request::get("/Patient").body(String::new()).unwrap()
}

/// Lets the fetch tasks run.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[derive(Clone, Copy)]
enum Failure {
    Transient,
    Permanent,
}

/// A source whose first fetches fail, and that records when each fetch started.
#[derive(Clone)]
struct Script {
    fail_first: usize,
    failure: Failure,
    /// After the failures, fetches hang instead of succeeding.
    hang: bool,
    fetches: Arc<AtomicUsize>,
    started: Arc<Mutex<Vec<Instant>>>,
}

impl Script {
    fn failing_first(fail_first: usize, failure: Failure) -> Self {
        Self {
            fail_first,
            failure,
            hang: false,
            fetches: Arc::default(),
            started: Arc::default(),
        }
    }

    fn then_hanging(self) -> Self {
        Self { hang: true, ..self }
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    fn started(&self) -> Vec<Instant> {
        self.started.lock().unwrap().clone()
    }
}

impl TokenSource for Script {
    fn fetch(&self, _rejected: Option<&AccessToken>) -> TokenFuture {
        let n = self.fetches.fetch_add(1, Ordering::SeqCst) + 1;
        self.started.lock().unwrap().push(Instant::now());
        let this = self.clone();
        TokenFuture::new(async move {
            if n <= this.fail_first {
                let error: BoxError = format!("fetch {n} failed").into();
                return Err(match this.failure {
                    Failure::Transient => error,
                    Failure::Permanent => PermanentError::new(error).into(),
                });
            }
            if this.hang {
                std::future::pending::<()>().await;
            }
            Ok(AccessToken::bearer(&format!("token-{n}"))?)
        })
    }
}
