//! [`BlazeAuth`], the service that authenticates requests.

use crate::{
    error::{BoxError, Error},
    future::{ResponseFuture, Unsent, authorize},
    layer::{BlazeAuthLayer, Config},
    metrics::Metrics,
    replay::{CloneBody, Replay, RequestCopy},
    token::{
        TokenSource,
        cache::{Lookup, TokenView},
    },
};
use http::{Request, Response};
use std::{
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
#[derive(Clone, Debug)]
pub struct BlazeAuth<S, R = CloneBody> {
    inner: S,
    config: Arc<Config>,
    replay: R,
    /// The cached token as this service last saw it: see [`TokenView`].
    token: TokenView,
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
            token: TokenView::new(&config.cache),
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

        // A request for an origin the layer does not serve goes as it is.
        let replay = &self.replay;
        match self.config.authenticates(request.uri()) {
            Ok(true) => {}
            Ok(false) => {
                let request = request.map(|body| replay.once(body));
                return ResponseFuture::pass_through(ready_inner.call(request));
            }
            Err(error) => return ResponseFuture::failed(error),
        }
        // A copy for the retry after a 401, of the request as the caller sent it.
        let mut copy = None;
        let mut request = if self.config.may_retry(request.method()) {
            request.map(|body| {
                let (body, kept) = replay.replayable(body);
                copy = kept;
                body
            })
        } else {
            request.map(|body| replay.once(body))
        };
        let copy = copy.map(|body| RequestCopy::new(&request, body, R::claim));
        // The study and the layer's headers; then the token, cached or fetched.
        if let Err(error) = self.config.prepare(&mut request) {
            return ResponseFuture::failed(error);
        }
        let config = Arc::clone(&self.config);
        match config.cache.get_through(&mut self.token) {
            Lookup::Ready(credential) => {
                let sent = authorize(&mut request, credential);
                let future = ready_inner.call(request);
                ResponseFuture::called(future, sent, config, ready_inner, copy)
            }
            Lookup::Wait(wait) => {
                let unsent = Unsent {
                    inner: ready_inner,
                    request,
                    config,
                    copy,
                };
                ResponseFuture::fetch_token(wait, unsent)
            }
            Lookup::Failed(error) => ResponseFuture::failed(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        AccessToken, NoReplay, ResearchStudy, StaticToken,
        test_helpers::{TestSource, get, inner, reject_first_token, sent_token},
    };
    use http::{HeaderValue, Method, StatusCode, header::AUTHORIZATION};
    use http_body_util::{BodyExt, Full, StreamBody};
    use std::{convert::Infallible, error::Error as _, sync::atomic::Ordering};
    use tokio_test::{assert_pending, assert_ready, assert_ready_ok};
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
    async fn a_service_sends_the_token_another_clone_got_after_a_401() {
        // Each service keeps the entry it last used: it must still see the cache's current
        // one once another clone's 401 has replaced it.
        let source = TestSource::new();
        let refused = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let refuse = Arc::clone(&refused);
        let (service, calls) = inner::<String, _>(move |token| {
            if token == "token-1" && refuse.load(Ordering::SeqCst) {
                StatusCode::UNAUTHORIZED
            } else {
                StatusCode::OK
            }
        });
        let mut first = BlazeAuth::new(service, source.clone(), "S");
        let mut other = first.clone();
        let response = first.ready().await.unwrap().call(get()).await.unwrap();
        assert_eq!(response.body(), "token-1");
        refused.store(true, Ordering::SeqCst);
        let response = other.ready().await.unwrap().call(get()).await.unwrap();
        assert_eq!(response.body(), "token-2");
        let response = first.ready().await.unwrap().call(get()).await.unwrap();
        assert_eq!(response.body(), "token-2");
        assert_eq!(source.fetches(), 2);
        // The first request, the refused one and its retry, and the last: no 401 for it.
        assert_eq!(calls.load(Ordering::SeqCst), 4);
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
        // Polled by hand, never awaited: a broken layer fails here rather than hangs. The
        // mock panics if a clone that was not polled ready is called.
        let (mock, mut handle) = tower_test::mock::pair::<Request<String>, Response<()>>();
        let mut client = BlazeAuth::new(mock, TestSource::new(), "S");
        let mut task = tokio_test::task::spawn(());
        handle.allow(0);
        assert_pending!(task.enter(|cx, _| client.poll_ready(cx)));
        handle.allow(1);
        assert!(task.is_woken(), "the wake-up reaches the caller");
        assert_ready_ok!(task.enter(|cx, _| client.poll_ready(cx)));

        // The cache is cold: the request waits for the fetch, a task of its own, which one
        // yield to the (current-thread) scheduler runs to its end.
        let mut response = tokio_test::task::spawn(client.call(get()));
        assert_pending!(response.poll());
        tokio::task::yield_now().await;
        assert!(response.is_woken(), "the fetched token wakes the request");
        assert_pending!(response.poll());
        let (request, send) = assert_ready!(handle.poll_request()).unwrap();
        assert_eq!(request.uri(), "/Patient?researchstudy=S");
        assert_eq!(sent_token(&request), "token-1");
        send.send_response(Response::new(()));
        assert_eq!(assert_ready_ok!(response.poll()).status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn call_uses_the_clone_that_was_polled_ready() {
        // Readiness belongs to the instance that was polled, as with a permit: a clone
        // starts out not ready.
        struct MustBeReady(bool);
        impl Clone for MustBeReady {
            fn clone(&self) -> Self {
                Self(false)
            }
        }
        impl Service<Request<String>> for MustBeReady {
            type Response = Response<()>;
            type Error = Infallible;
            type Future = std::future::Ready<Result<Response<()>, Infallible>>;
            fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
                self.0 = true;
                Poll::Ready(Ok(()))
            }
            fn call(&mut self, request: Request<String>) -> Self::Future {
                assert!(std::mem::take(&mut self.0), "called without poll_ready");
                let mut response = Response::new(());
                *response.status_mut() = reject_first_token(&sent_token(&request));
                std::future::ready(Ok(response))
            }
        }
        let mut client = BlazeAuth::new(MustBeReady(false), TestSource::new(), "S");
        // The first answer is a 401: the retry, too, polls its service ready before calling.
        for _ in 0..3 {
            let response = client.ready().await.unwrap().call(get()).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
        }
        assert_eq!(client.metrics().retries, 1);
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
        use crate::{BufferBody, ReplayBody, future::ResponseFuture};
        use bytes::Bytes;
        use hyper_util::client::legacy::{Client, connect::HttpConnector};
        fn assert_send<T: Send>() {}
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<BlazeAuthLayer>();

        // hyper-util's client: its future is `Sync` too, and so is ours.
        type Hyper<B> = Client<HttpConnector, B>;
        assert_send_sync::<BlazeAuth<Hyper<Full<Bytes>>>>();
        assert_send_sync::<ResponseFuture<Hyper<Full<Bytes>>, Full<Bytes>>>();
        assert_send_sync::<BlazeAuth<Hyper<ReplayBody<Full<Bytes>>>, BufferBody>>();
        assert_send_sync::<ResponseFuture<Hyper<ReplayBody<Full<Bytes>>>, ReplayBody<Full<Bytes>>>>(
        );

        // A boxed service's future is a `dyn Future + Send`, not `Sync`: ours is `Send` only.
        type Boxed = tower::util::BoxCloneSyncService<Request<String>, Response<()>, BoxError>;
        assert_send_sync::<BlazeAuth<Boxed>>();
        assert_send::<ResponseFuture<Boxed, String>>();
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
}
