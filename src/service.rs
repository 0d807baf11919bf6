//! [`BlazeAuth`], the service that authenticates requests.

use crate::{
    error::{BoxError, Error},
    future::{RequestCopy, ResponseFuture, Retry},
    layer::{BlazeAuthLayer, Config},
    metrics::Metrics,
    replay::{CloneBody, Replay},
    token::TokenSource,
};
use http::{Request, Response};
use std::{
    fmt,
    sync::Arc,
    task::{Context, Poll},
};
use tower::{Layer, Service};

/// Authenticates every request for the Blaze FHIR API; made by [`BlazeAuthLayer`].
///
/// Each request gets the `Authorization` header of the cached token (replacing one it had),
/// the `researchstudy` query parameter and the layer's fixed headers. If the inner service
/// answers 401, a new token is fetched and the request sent once more, when its body can be
/// replayed (see [`crate::replay`]). See the [crate docs](crate) for examples.
pub struct BlazeAuth<S, R = CloneBody> {
    inner: S,
    config: Arc<Config>,
    replay: R,
}

impl<S> BlazeAuth<S> {
    /// Wraps `inner`: tokens come from `source`, requests are for research study `study`.
    ///
    /// # Panics
    ///
    /// If `study` is not a valid study id; see [`BlazeAuthLayer::new`].
    pub fn new(inner: S, source: impl TokenSource + 'static, study: &str) -> Self {
        BlazeAuthLayer::new(source, study).layer(inner)
    }

    /// A [`BlazeAuthLayer`]: the same as [`BlazeAuthLayer::new`].
    ///
    /// # Panics
    ///
    /// If `study` is not a valid study id.
    pub fn layer(source: impl TokenSource + 'static, study: &str) -> BlazeAuthLayer {
        BlazeAuthLayer::new(source, study)
    }
}

impl<S, R> BlazeAuth<S, R> {
    pub(crate) fn from_parts(inner: S, config: Arc<Config>, replay: R) -> Self {
        Self {
            inner,
            config,
            replay,
        }
    }

    /// What the layer's token cache has done so far; see [`BlazeAuthLayer::metrics`].
    pub fn metrics(&self) -> Metrics {
        self.config.cache.metrics()
    }

    crate::macros::define_inner_service_accessors!();
}

impl<S, R, ReqBody, ResBody> Service<Request<ReqBody>> for BlazeAuth<S, R>
where
    S: Service<Request<R::Body>, Response = Response<ResBody>> + Clone,
    S::Error: Into<BoxError>,
    R: Replay<ReqBody>,
{
    type Response = Response<ResBody>;
    type Error = Error;
    type Future = ResponseFuture<S, R::Body>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Error::inner)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // `self.inner` was polled ready, a clone of it may not be: call the ready one and
        // keep the clone (see tower-service's docs on `Service::call` and cloning).
        let not_ready_inner = self.inner.clone();
        let mut ready_inner = std::mem::replace(&mut self.inner, not_ready_inner);

        let (mut parts, body) = request.into_parts();
        match self.config.authenticates(&parts.uri) {
            Ok(true) => {}
            Ok(false) => {
                let request = Request::from_parts(parts, self.replay.once(body));
                return ResponseFuture::untouched(ready_inner.call(request));
            }
            Err(error) => return ResponseFuture::failed(error),
        }
        if let Err(error) = self.config.prepare(&mut parts) {
            return ResponseFuture::failed(error);
        }
        let (body, retry) = if self.config.retries(&parts.method) {
            let (body, copy) = self.replay.replayable(body);
            let retry = copy.map(|copy| Retry {
                copy: RequestCopy::new(&parts, copy),
                can_replay: R::can_replay,
            });
            (body, retry)
        } else {
            (self.replay.once(body), None)
        };
        let request = Request::from_parts(parts, body);
        ResponseFuture::new(ready_inner, request, retry, &self.config.cache)
    }
}

impl<S: Clone, R: Clone> Clone for BlazeAuth<S, R> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            config: Arc::clone(&self.config),
            replay: self.replay.clone(),
        }
    }
}

impl<S: fmt::Debug, R: fmt::Debug> fmt::Debug for BlazeAuth<S, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlazeAuth")
            .field("inner", &self.inner)
            .field("config", &self.config)
            .field("replay", &self.replay)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        AccessToken, DEFAULT_FETCH_COOLDOWN, NoReplay, ResearchStudy, StaticToken,
        test_helpers::{TestSource, inner, reject_first_token, sent_token},
    };
    use http::{HeaderValue, Method, StatusCode, header::AUTHORIZATION};
    use http_body_util::{BodyExt, Full, StreamBody};
    use std::{
        convert::Infallible,
        error::Error as _,
        sync::atomic::{AtomicBool, AtomicUsize, Ordering},
        time::Duration,
    };
    use tokio::sync::Barrier;
    use tokio_test::{assert_pending, assert_ready_ok};
    use tower::{ServiceBuilder, ServiceExt, service_fn};

    #[tokio::test]
    async fn adds_sensitive_authorization_replacing_the_old_one() {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(None));
        let record = Arc::clone(&seen);
        let client = ServiceBuilder::new()
            .layer(BlazeAuthLayer::new(TestSource::new(), "FHIR-T"))
            .service_fn(move |request: Request<String>| {
                let values: Vec<HeaderValue> = request
                    .headers()
                    .get_all(AUTHORIZATION)
                    .iter()
                    .cloned()
                    .collect();
                *record.lock().unwrap() = Some(values);
                async { Ok::<_, Infallible>(Response::new(())) }
            });
        let request = Request::get("/Patient")
            .header(AUTHORIZATION, "Basic old")
            .header(AUTHORIZATION, "Bearer older")
            .body(String::new())
            .unwrap();
        client.oneshot(request).await.unwrap();
        let values = seen.lock().unwrap().take().unwrap();
        assert_eq!(values, ["Bearer token-1"]);
        assert!(values[0].is_sensitive());
    }

    #[tokio::test]
    async fn study_and_fixed_headers_are_added_and_the_rest_kept() {
        let layer = BlazeAuthLayer::builder(TestSource::new())
            .study("FHIR-T")
            .partner_id("partner-42")
            .header("x-other", "1")
            .origin("https://h")
            .build()
            .unwrap();
        let client =
            ServiceBuilder::new()
                .layer(layer)
                .service_fn(|request: Request<String>| async move {
                    Ok::<_, Infallible>(Response::new(request))
                });
        let uri =
            "https://h/api/Observation?code=http://loinc.org|777-3,http://loinc.org|751-8&_count=5";
        let request = Request::post(uri)
            .header("x-other", "0")
            .header("accept", "application/fhir+json")
            .body("body".to_owned())
            .unwrap();
        let seen = client.oneshot(request).await.unwrap().into_body();
        assert_eq!(
            seen.uri().to_string(),
            format!("{uri}&researchstudy=FHIR-T")
        );
        assert_eq!(seen.method(), Method::POST);
        assert_eq!(seen.headers()["x-partnerid"], "partner-42");
        assert!(seen.headers()["x-partnerid"].is_sensitive());
        assert_eq!(seen.headers().get_all("x-other").iter().count(), 1);
        assert_eq!(seen.headers()["x-other"], "1");
        assert_eq!(seen.headers()["accept"], "application/fhir+json");
        assert_eq!(seen.body(), "body");
    }

    #[tokio::test]
    async fn a_request_extension_names_its_own_study() {
        let (service, _) = inner::<String, _>(|_| StatusCode::OK);
        let uris = Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = Arc::clone(&uris);
        let client = ServiceBuilder::new()
            .layer(BlazeAuthLayer::new(TestSource::new(), "FHIR-T"))
            .map_request(move |request: Request<String>| {
                record.lock().unwrap().push(request.uri().to_string());
                request
            })
            .service(service);
        let mut request = Request::get("/Patient").body(String::new()).unwrap();
        request
            .extensions_mut()
            .insert(ResearchStudy::new("12-345").unwrap());
        client.clone().oneshot(request).await.unwrap();
        let plain = Request::get("/Patient").body(String::new()).unwrap();
        client.oneshot(plain).await.unwrap();
        assert_eq!(
            *uris.lock().unwrap(),
            [
                "/Patient?researchstudy=12-345",
                "/Patient?researchstudy=FHIR-T"
            ]
        );
    }

    #[tokio::test]
    async fn conflicting_or_missing_study_fails_without_sending() {
        let (service, calls) = inner::<String, _>(|_| StatusCode::OK);
        let client = BlazeAuth::new(service.clone(), TestSource::new(), "FHIR-T");
        let request = Request::get("/Patient?researchstudy=OTHER&page=2")
            .body(String::new())
            .unwrap();
        let error = client.oneshot(request).await.unwrap_err();
        assert!(error.is_study_conflict(), "{error:?}");

        let no_study = BlazeAuthLayer::builder(TestSource::new()).build().unwrap();
        let request = Request::get("/Patient").body(String::new()).unwrap();
        let error = no_study.layer(service).oneshot(request).await.unwrap_err();
        assert!(error.is_missing_study(), "{error:?}");
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn invalid_configuration_is_rejected_when_the_layer_is_built() {
        let build = |study: &str, name: &str, value: &str| {
            BlazeAuthLayer::builder(TestSource::new())
                .study(study)
                .header(name, value)
                .build()
                .map(drop)
        };
        assert!(
            build("", "x-partnerid", "p")
                .unwrap_err()
                .is_invalid_study()
        );
        assert!(build("S", "bad name", "p").unwrap_err().is_invalid_header());
        assert!(
            build("S", "x-partnerid", "a\nb")
                .unwrap_err()
                .is_invalid_header()
        );
        assert!(
            build("S", "authorization", "x")
                .unwrap_err()
                .is_invalid_header()
        );
        assert!(build("S", "x-partnerid", "p").is_ok());
    }

    #[test]
    #[should_panic(expected = "invalid research study id")]
    fn new_panics_on_an_invalid_study() {
        BlazeAuthLayer::new(TestSource::new(), "FHIR-T\n");
    }

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
    async fn one_401_causes_one_refresh_and_one_retry() {
        let source = TestSource::new();
        let (service, calls) = inner::<String, _>(reject_first_token);
        let client = BlazeAuth::new(service, source.clone(), "S");
        let response = client.oneshot(get()).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.body(), "token-2");
        assert_eq!(source.fetches(), 2);
        assert_eq!(source.rejected(), ["token-1"]);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn second_401_is_returned_unchanged() {
        let source = TestSource::new();
        let (service, calls) = inner::<String, _>(|_| StatusCode::UNAUTHORIZED);
        let client = BlazeAuth::new(service, source.clone(), "S");
        let response = client.oneshot(get()).await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(response.body(), "token-2");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(source.fetches(), 2);
    }

    #[tokio::test]
    async fn other_statuses_are_never_retried() {
        for status in [
            StatusCode::FORBIDDEN,
            StatusCode::BAD_REQUEST,
            StatusCode::NOT_FOUND,
        ] {
            let source = TestSource::new();
            let (service, calls) = inner::<String, _>(move |_| status);
            let client = BlazeAuth::new(service, source.clone(), "S");
            let response = client.oneshot(get()).await.unwrap();
            assert_eq!(response.status(), status);
            assert_eq!(calls.load(Ordering::SeqCst), 1);
            assert_eq!(source.fetches(), 1);
        }
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
        let client = BlazeAuth::new(service, source.clone(), "S");
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
        let client = BlazeAuth::new(service, source.clone(), "S");
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
        let client = BlazeAuth::new(service, source, "S");
        let error = client.clone().oneshot(get()).await.unwrap_err();
        assert!(error.is_token());
        tokio::time::advance(DEFAULT_FETCH_COOLDOWN).await;
        assert_eq!(client.oneshot(get()).await.unwrap().body(), "ok");
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

    #[tokio::test]
    async fn bodies_that_cannot_be_copied_are_not_retried_but_the_token_is_dropped() {
        type Streaming = StreamBody<
            futures_util::stream::Empty<Result<http_body::Frame<bytes::Bytes>, Infallible>>,
        >;
        let streaming = || {
            Request::get("/")
                .body(StreamBody::new(futures_util::stream::empty()))
                .unwrap()
        };
        let source = TestSource::new();
        let (service, calls) = inner::<Streaming, _>(reject_first_token);
        let layer = BlazeAuthLayer::new(source.clone(), "S").replay(NoReplay);
        let client = layer.layer(service);
        let response = client.clone().oneshot(streaming()).await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // The refused token is not used again: the next request gets a new one.
        let response = client.oneshot(streaming()).await.unwrap();
        assert_eq!(response.body(), "token-2");
        assert_eq!(source.fetches(), 2);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn the_retry_sends_the_same_head_with_a_new_token() {
        #[derive(Clone, Debug, PartialEq)]
        struct Tag(u32);
        let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = Arc::clone(&heads);
        let service = service_fn(move |mut request: Request<String>| {
            let token = sent_token(&request);
            let headers = request.headers_mut();
            assert!(headers.get(AUTHORIZATION).unwrap().is_sensitive());
            headers.remove(AUTHORIZATION);
            let head = (
                request.method().clone(),
                request.uri().clone(),
                request.version(),
                request.headers().clone(),
                request.extensions().get::<Tag>().cloned(),
            );
            record.lock().unwrap().push(head);
            let mut response = Response::new(());
            *response.status_mut() = reject_first_token(&token);
            async { Ok::<_, Infallible>(response) }
        });
        let layer = BlazeAuthLayer::builder(TestSource::new())
            .study("S")
            .partner_id("p")
            .build()
            .unwrap();
        let mut request = Request::put("/Patient/1?a=1")
            .version(http::Version::HTTP_2)
            .header("x-b", "1")
            .header("accept", "a")
            .header("x-b", "2")
            .body(String::new())
            .unwrap();
        request.extensions_mut().insert(Tag(7));
        let response = layer.layer(service).oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let heads = heads.lock().unwrap();
        assert_eq!(heads.len(), 2);
        assert_eq!(heads[0], heads[1]);
        let (method, uri, version, headers, tag) = &heads[1];
        assert_eq!(
            (method, uri.to_string(), *version, tag),
            (
                &Method::PUT,
                "/Patient/1?a=1&researchstudy=S".to_owned(),
                http::Version::HTTP_2,
                &Some(Tag(7))
            )
        );
        let values: Vec<_> = headers.get_all("x-b").iter().collect();
        assert_eq!(values, ["1", "2"]);
        assert_eq!(headers["accept"], "a");
        assert!(headers["x-partnerid"].is_sensitive());
    }

    #[tokio::test]
    async fn cloneable_bodies_are_replayed_whole() {
        let bodies = Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = Arc::clone(&bodies);
        let service = service_fn(move |request: Request<Full<bytes::Bytes>>| {
            let record = Arc::clone(&record);
            async move {
                let token = sent_token(&request);
                let body = request.into_body().collect().await.unwrap().to_bytes();
                record.lock().unwrap().push(body);
                let mut response = Response::new(());
                *response.status_mut() = reject_first_token(&token);
                Ok::<_, Infallible>(response)
            }
        });
        let client = BlazeAuth::new(service, TestSource::new(), "S");
        let request = Request::post("/Patient")
            .body(Full::from("{\"a\":1}"))
            .unwrap();
        assert_eq!(
            client.oneshot(request).await.unwrap().status(),
            StatusCode::OK
        );
        assert_eq!(*bodies.lock().unwrap(), ["{\"a\":1}", "{\"a\":1}"]);
    }

    #[tokio::test]
    async fn idempotent_only_does_not_retry_a_post() {
        let layer = BlazeAuthLayer::builder(TestSource::new())
            .study("S")
            .retry_idempotent_only(true)
            .build()
            .unwrap();
        let (service, calls) = inner::<String, _>(reject_first_token);
        let client = layer.layer(service);
        let post = Request::post("/Patient").body(String::new()).unwrap();
        let response = client.clone().oneshot(post).await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let put = Request::put("/Patient/1").body(String::new()).unwrap();
        assert_eq!(client.oneshot(put).await.unwrap().status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn backpressure_passes_through_and_the_ready_service_is_called() {
        let (mock, mut handle) = tower_test::mock::pair::<Request<String>, Response<()>>();
        let mut client = BlazeAuth::new(mock, TestSource::new(), "S");
        let mut task = tokio_test::task::spawn(());
        handle.allow(0);
        task.enter(|cx, _| assert!(client.poll_ready(cx).is_pending()));
        handle.allow(1);
        task.enter(|cx, _| assert_ready_ok!(client.poll_ready(cx)));
        let response = tokio::spawn(client.call(get()));
        let (request, send) = handle.next_request().await.unwrap();
        assert_eq!(request.uri(), "/Patient?researchstudy=S");
        assert_eq!(sent_token(&request), "token-1");
        send.send_response(Response::new(()));
        assert_eq!(response.await.unwrap().unwrap().status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn call_uses_the_clone_that_was_polled_ready() {
        #[derive(Clone)]
        struct MustBeReady(bool);
        impl Service<Request<String>> for MustBeReady {
            type Response = Response<()>;
            type Error = Infallible;
            type Future = std::future::Ready<Result<Response<()>, Infallible>>;
            fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
                self.0 = true;
                Poll::Ready(Ok(()))
            }
            fn call(&mut self, _: Request<String>) -> Self::Future {
                assert!(std::mem::take(&mut self.0), "called without poll_ready");
                std::future::ready(Ok(Response::new(())))
            }
        }
        let mut client = BlazeAuth::new(MustBeReady(false), TestSource::new(), "S");
        for _ in 0..3 {
            client.ready().await.unwrap().call(get()).await.unwrap();
        }
    }

    #[tokio::test]
    async fn inner_errors_are_kept_apart_from_token_errors() {
        let service = service_fn(|_: Request<String>| async {
            Err::<Response<()>, _>(std::io::Error::other("connection reset"))
        });
        let error = BlazeAuth::new(service, TestSource::new(), "S")
            .oneshot(get())
            .await
            .unwrap_err();
        assert!(error.is_inner() && !error.is_token());
        assert!(error.source().unwrap().is::<std::io::Error>());
    }

    #[test]
    fn debug_shows_no_secret() {
        let token = AccessToken::bearer("very-secret-token").unwrap();
        let layer = BlazeAuthLayer::builder(StaticToken::new(token.clone()))
            .study("S")
            .partner_id("partner-secret")
            .build()
            .unwrap();
        let service = layer.layer(tower::service_fn(|_: Request<String>| async {
            Ok::<_, Infallible>(Response::new(()))
        }));
        let debug = format!("{layer:?} {service:?} {token:?}");
        assert!(
            !debug.contains("very-secret") && !debug.contains("partner-secret"),
            "{debug}"
        );
    }

    #[test]
    fn services_layers_and_futures_are_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        type Inner = tower::util::BoxCloneSyncService<Request<String>, Response<()>, BoxError>;
        assert_send_sync::<BlazeAuthLayer>();
        assert_send_sync::<BlazeAuth<Inner>>();
        fn assert_send<T: Send>() {}
        assert_send::<crate::future::ResponseFuture<Inner, String>>();
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
        tokio::time::advance(crate::DEFAULT_STORM_WINDOW).await;
        client.clone().oneshot(get()).await.unwrap();
        client.oneshot(get()).await.unwrap();
        assert_eq!(source.fetches(), 3);
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

    #[tokio::test]
    async fn a_challenge_a_new_token_cannot_meet_is_not_retried() {
        let source = TestSource::new();
        let service = service_fn(|_: Request<String>| async {
            let response = Response::builder()
                .status(StatusCode::UNAUTHORIZED)
                .header(
                    "www-authenticate",
                    r#"Bearer error="insufficient_scope", scope="admin""#,
                )
                .body(String::new());
            Ok::<_, Infallible>(response.unwrap())
        });
        let client = BlazeAuth::new(service, source.clone(), "S");
        let response = client.oneshot(get()).await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(source.fetches(), 1);
    }

    #[tokio::test]
    async fn grpc_unauthenticated_is_refreshed_and_retried() {
        let source = TestSource::new();
        let service = service_fn(|request: Request<String>| async move {
            let mut response = Response::new(sent_token(&request));
            if response.body() == "token-1" {
                response
                    .headers_mut()
                    .insert("grpc-status", HeaderValue::from_static("16"));
            }
            Ok::<_, Infallible>(response)
        });
        let client = BlazeAuth::new(service, source.clone(), "S");
        let response = client.oneshot(get()).await.unwrap();
        assert_eq!(response.body(), "token-2");
        assert!(response.headers().get("grpc-status").is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_source_fails_its_waiters_at_the_fetch_timeout() {
        let source = crate::token_fn(|_| std::future::pending::<Result<AccessToken, Error>>());
        let layer = BlazeAuthLayer::builder(source)
            .study("S")
            .fetch_timeout(Duration::from_secs(5))
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

    #[tokio::test]
    async fn credentials_go_only_to_the_configured_origin() {
        let layer = BlazeAuthLayer::builder(TestSource::new())
            .study("S")
            .partner_id("p")
            .origin("https://blaze.example")
            .build()
            .unwrap();
        let client = layer.layer(service_fn(|request: Request<String>| async move {
            Ok::<_, Infallible>(Response::new(request))
        }));
        let seen = |uri: &'static str| {
            let client = client.clone();
            async move {
                let request = Request::get(uri).body(String::new()).unwrap();
                client.oneshot(request).await.unwrap().into_body()
            }
        };
        for ours in [
            "https://blaze.example/api/Patient",
            "https://BLAZE.example:443/api/Patient",
            "/api/Patient",
        ] {
            let request = seen(ours).await;
            assert_eq!(sent_token(&request), "token-1", "{ours}");
            assert!(request.uri().query().unwrap().contains("researchstudy=S"));
        }
        for foreign in [
            "https://evil.example/api/Patient",
            "http://blaze.example/api/Patient",
            "https://blaze.example:8443/api/Patient",
            "https://blaze.example.evil.example/api/Patient",
        ] {
            let request = seen(foreign).await;
            assert_eq!(request.uri(), foreign, "untouched");
            assert!(
                request.headers().is_empty(),
                "{foreign}: {:?}",
                request.headers()
            );
        }
    }

    #[tokio::test]
    async fn a_redirect_to_another_origin_carries_no_credentials() {
        use tower_http::follow_redirect::FollowRedirectLayer;
        let hops = Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = Arc::clone(&hops);
        let servers = service_fn(move |request: Request<String>| {
            let auth = request.headers().get(AUTHORIZATION).cloned();
            let partner = request.headers().get("x-partnerid").cloned();
            record
                .lock()
                .unwrap()
                .push((request.uri().to_string(), auth, partner));
            let redirect = request.uri().host() == Some("blaze.example");
            async move {
                let mut response = Response::new(String::new());
                if redirect {
                    *response.status_mut() = StatusCode::FOUND;
                    response.headers_mut().insert(
                        "location",
                        HeaderValue::from_static("https://elsewhere.example/x?y=1"),
                    );
                }
                Ok::<_, Infallible>(response)
            }
        });
        let layer = BlazeAuthLayer::builder(TestSource::new())
            .study("S")
            .partner_id("p")
            .origin("https://blaze.example")
            .build()
            .unwrap();
        let client = ServiceBuilder::new()
            .layer(FollowRedirectLayer::new())
            .layer(layer)
            .service(servers);
        let request = Request::get("https://blaze.example/api/Patient")
            .body(String::new())
            .unwrap();
        assert_eq!(
            client.oneshot(request).await.unwrap().status(),
            StatusCode::OK
        );
        let hops = hops.lock().unwrap();
        assert_eq!(hops.len(), 2);
        assert_eq!(
            hops[0].0,
            "https://blaze.example/api/Patient?researchstudy=S"
        );
        assert!(hops[0].1.is_some() && hops[0].2.is_some());
        assert_eq!(
            hops[1],
            ("https://elsewhere.example/x?y=1".to_owned(), None, None)
        );
    }

    /// What `client` sent for a request to `uri`: the request itself, or the error.
    async fn sent_for(layer: &BlazeAuthLayer, uri: &str) -> Result<Request<String>, crate::Error> {
        let echo = service_fn(|request: Request<String>| async move {
            Ok::<_, Infallible>(Response::new(request))
        });
        let request = Request::get(uri).body(String::new()).unwrap();
        let response = layer.layer(echo).oneshot(request).await?;
        Ok(response.into_body())
    }

    #[tokio::test]
    async fn by_default_only_blazes_gateways_and_loopback_get_credentials() {
        let layer = BlazeAuthLayer::builder(TestSource::new())
            .study("S")
            .partner_id("p")
            .header("x-extra", "e")
            .build()
            .unwrap();
        for ours in [
            "https://apigateway.apps.stageapi.mskcc.org/api/Patient",
            "https://apigateway.apps.prodapi.mskcc.org/api/Patient",
            "http://127.0.0.1:8080/api/Patient",
            "http://localhost:3000/api/Patient",
            "http://[::1]/api/Patient",
            "/api/Patient",
        ] {
            let request = sent_for(&layer, ours).await.unwrap();
            assert_eq!(sent_token(&request), "token-1", "{ours}");
            assert_eq!(request.headers()["x-partnerid"], "p");
            assert!(request.uri().query().unwrap().contains("researchstudy=S"));
        }
        for foreign in [
            "https://evil.example/collect",
            "http://evil.example/collect",
            "http://apigateway.apps.stageapi.mskcc.org/api/Patient",
            "https://apigateway.apps.stageapi.mskcc.org:8443/api/Patient",
            "https://10.0.0.1/api/Patient",
        ] {
            let request = sent_for(&layer, foreign).await.unwrap();
            assert_eq!(request.uri(), foreign, "untouched");
            assert!(request.headers().is_empty(), "{foreign}");
        }
    }

    #[tokio::test]
    async fn any_origin_opens_the_scope_but_never_to_cleartext() {
        let open = |allow_http| {
            BlazeAuthLayer::builder(TestSource::new())
                .study("S")
                .any_origin()
                .allow_http(allow_http)
                .build()
                .unwrap()
        };
        let layer = open(false);
        let request = sent_for(&layer, "https://anywhere.example/x")
            .await
            .unwrap();
        assert_eq!(sent_token(&request), "token-1");
        let request = sent_for(&layer, "http://127.0.0.1:1/x").await.unwrap();
        assert_eq!(sent_token(&request), "token-1");
        // Neither sent with the token nor silently without it.
        let (service, calls) = inner::<String, _>(|_| StatusCode::OK);
        let request = Request::get("http://anywhere.example/x")
            .body(String::new())
            .unwrap();
        let error = layer.layer(service).oneshot(request).await.unwrap_err();
        assert!(error.is_insecure_url(), "{error:?}");
        assert_eq!(calls.load(Ordering::SeqCst), 0);

        let request = sent_for(&open(true), "http://anywhere.example/x")
            .await
            .unwrap();
        assert_eq!(sent_token(&request), "token-1");
    }

    #[tokio::test]
    async fn a_cleartext_origin_needs_allow_http() {
        let named = |allow_http| {
            BlazeAuthLayer::builder(TestSource::new())
                .study("S")
                .origin("http://blaze.internal:8080")
                .allow_http(allow_http)
                .build()
        };
        assert!(named(false).unwrap_err().is_insecure_url());
        let layer = named(true).unwrap();
        let request = sent_for(&layer, "http://blaze.internal:8080/x")
            .await
            .unwrap();
        assert_eq!(sent_token(&request), "token-1");
        // Naming an origin replaces the default scope: loopback is no longer in it.
        let request = sent_for(&layer, "http://127.0.0.1:8080/x").await.unwrap();
        assert!(request.headers().is_empty());
    }

    #[test]
    fn an_origin_without_scheme_or_host_is_rejected() {
        for bad in ["blaze.example", "/path", "not a url", "ftp:/x"] {
            let error = BlazeAuthLayer::builder(TestSource::new())
                .origin(bad)
                .build()
                .unwrap_err();
            assert!(error.is_invalid_url(), "{bad}");
        }
    }

    fn get() -> Request<String> {
        Request::get("/Patient").body(String::new()).unwrap()
    }
}
