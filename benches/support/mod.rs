//! What the benches share: the request, the token, and the inner service.

// Each bench binary uses a part of this module.
#![allow(dead_code)]

use blaze_auth::{AccessToken, TokenSource, token_fn};
use bytes::Bytes;
use http::{
    HeaderValue, Request, Response, Uri,
    header::{ACCEPT, AUTHORIZATION},
    uri::PathAndQuery,
};
use http_body_util::Full;
use std::{
    convert::Infallible,
    fmt,
    future::{Ready, ready},
    hint::black_box,
    task::{Context, Poll},
    time::Duration,
};
use tower::{Service, ServiceExt};

/// A FHIR search as a client sends it through the layer (path and query).
pub(crate) const PATH: &str = "/msk-apim/external/v2/crit/blaze/api/Observation?patient=123&code=http://loinc.org|718-7&_count=50";
/// [`PATH`] on Blaze's staging gateway, in the layer's default credential scope.
pub(crate) const URI: &str = "https://apigateway.apps.stageapi.mskcc.org/msk-apim/external/v2/crit/blaze/api/Observation?patient=123&code=http://loinc.org|718-7&_count=50";
pub(crate) const STUDY: &str = "FHIR-T";
/// `researchstudy=<STUDY>`, encoded: what the hand-written baselines append.
pub(crate) const STUDY_PAIR: &str = "researchstudy=FHIR-T";
pub(crate) const TOKEN: &str =
    "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJwYXJ0bmVyLTQyIiwic2NvcGUiOiJmdWxsIn0.c2lnbmF0dXJl";

/// A token as Blaze issues it: it lives an hour, so a cached request checks its expiry.
pub(crate) fn token() -> Result<AccessToken, blaze_auth::Error> {
    Ok(AccessToken::bearer(TOKEN)?.with_expires_in(Duration::from_secs(3600)))
}

/// A source that yields [`token`] at once.
pub(crate) fn source() -> impl TokenSource + 'static {
    token_fn(|_| async { token() })
}

/// A `GET` of [`URI`] with `body` and no headers. Building it allocates nothing.
pub(crate) fn get<B>(body: B) -> Request<B> {
    let mut request = Request::new(body);
    *request.uri_mut() = Uri::from_static(URI);
    request
}

/// `uri` with [`STUDY_PAIR`] appended to its query: the least the study parameter needs.
pub(crate) fn with_study(uri: Uri) -> Uri {
    let mut parts = uri.into_parts();
    let (path_and_query, separator) = match &parts.path_and_query {
        Some(pq) if pq.query().is_some_and(|q| !q.is_empty()) => (pq.as_str(), "&"),
        Some(pq) => (pq.path(), "?"),
        None => ("/", "?"),
    };
    let mut new = String::with_capacity(path_and_query.len() + 1 + STUDY_PAIR.len());
    new.push_str(path_and_query);
    new.push_str(separator);
    new.push_str(STUDY_PAIR);
    parts.path_and_query = Some(PathAndQuery::try_from(new).expect("valid path and query"));
    Uri::from_parts(parts).expect("valid URI")
}

/// The inner service: always ready, answers 200 at once.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ok200;

impl<B> tower::Service<Request<B>> for Ok200 {
    type Response = Response<()>;
    type Error = Infallible;
    type Future = Ready<Result<Response<()>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // The request is looked at, so none of the work on it can be optimised away.
        black_box(&request);
        ready(Ok(Response::new(())))
    }
}

/// Sends each of `requests` through `service`, once it is ready, and drops the response.
pub(crate) async fn send_all<S, B>(service: &mut S, requests: Vec<Request<B>>)
where
    S: Service<Request<B>>,
    S::Error: fmt::Debug,
{
    for request in requests {
        let ready = service
            .ready()
            .await
            .expect("inner service is always ready");
        let response = ready.call(black_box(request)).await.expect("200");
        black_box(response);
    }
}

/// A `GET` with an empty, cloneable body.
pub(crate) fn clone_body() -> Request<Full<Bytes>> {
    with_accept(get(Full::new(Bytes::new())))
}

/// A `GET` with an empty body that cannot be cloned, like hyper's `Incoming`.
pub(crate) fn streaming_body() -> Request<Streaming> {
    with_accept(get(Streaming(Full::new(Bytes::new()))))
}

/// FHIR clients send `Accept`: the request has a header map of its own before the layer's.
pub(crate) fn with_accept<B>(mut request: Request<B>) -> Request<B> {
    request
        .headers_mut()
        .insert(ACCEPT, HeaderValue::from_static("application/fhir+json"));
    request
}

/// A body type without `Clone`.
pub(crate) struct Streaming(#[allow(dead_code)] Full<Bytes>);

/// (c): the least the job needs. A pre-built `Authorization` value (shared bytes, like the
/// cached token's, so one reference count per request) and the study pair appended to the
/// query in a new `PathAndQuery`. No study check, no fixed headers, no copy for a retry.
#[derive(Clone)]
pub(crate) struct HandWritten<S> {
    inner: S,
    authorization: HeaderValue,
}

impl<S> HandWritten<S> {
    pub(crate) fn new(inner: S) -> Self {
        let mut authorization =
            HeaderValue::try_from(format!("Bearer {TOKEN}")).expect("valid header value");
        authorization.set_sensitive(true);
        Self {
            inner,
            authorization,
        }
    }
}

impl<S, B> Service<Request<B>> for HandWritten<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> S::Future {
        request
            .headers_mut()
            .insert(AUTHORIZATION, self.authorization.clone());
        let uri = std::mem::take(request.uri_mut());
        *request.uri_mut() = with_study(uri);
        self.inner.call(request)
    }
}
